// selftest_warp.cu: warp shuffles, votes, __activemask, __syncwarp and the
// __syncthreads_{count,and,or} family, checked by tests/warp.rs.
#include "selftest.cuh"

namespace {

constexpr int kShflOps = 27;

// x: i32[threads], y: i32[threads * 27], dx: u64[threads * 3]. Thread t = global index.
// For each width in {32, 16, 8}: idx (lane*7+3), idx (-1), up 1, up 3, down 1, down 5,
// xor 1, xor 6, xor 16.
__device__ void shfl_body(const BnParams& p) {
    const bn::Gmem<int32_t> x(p.x);
    const bn::Gmem<int32_t> y(p.y);
    const bn::Gmem<uint64_t> dx(p.dx);
    const unsigned t = blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned lane = threadIdx.x % 32u;
    const int v = x.ld(t);
    const unsigned full = 0xffffffffu;
    const int widths[3] = {32, 16, 8};
    int k = 0;
    for (int wi = 0; wi < 3; ++wi) {
        const int w = widths[wi];
        y.st(t * kShflOps + k++, __shfl_sync(full, v, static_cast<int>(lane * 7u + 3u), w));
        y.st(t * kShflOps + k++, __shfl_sync(full, v, -1, w));
        y.st(t * kShflOps + k++, __shfl_up_sync(full, v, 1u, w));
        y.st(t * kShflOps + k++, __shfl_up_sync(full, v, 3u, w));
        y.st(t * kShflOps + k++, __shfl_down_sync(full, v, 1u, w));
        y.st(t * kShflOps + k++, __shfl_down_sync(full, v, 5u, w));
        y.st(t * kShflOps + k++, __shfl_xor_sync(full, v, 1, w));
        y.st(t * kShflOps + k++, __shfl_xor_sync(full, v, 6, w));
        y.st(t * kShflOps + k++, __shfl_xor_sync(full, v, 16, w));
    }
    // Other value types.
    const float f = __shfl_xor_sync(full, static_cast<float>(v) * 0.5f, 3);
    const double d = __shfl_down_sync(full, static_cast<double>(v) * 0.25, 2u, 16);
    const long long ll = __shfl_up_sync(full, static_cast<long long>(v) * (1LL << 31), 1u, 8);
    dx.st(t * 3 + 0, static_cast<uint64_t>(__float_as_uint(f)));
    dx.st(t * 3 + 1, static_cast<uint64_t>(__double_as_longlong(d)));
    dx.st(t * 3 + 2, static_cast<uint64_t>(ll));
}

// x: i32[threads], y: u32[threads * 8].
__device__ void vote_body(const BnParams& p) {
    const bn::Gmem<int32_t> x(p.x);
    const bn::Gmem<uint32_t> y(p.y);
    const unsigned t = blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned lane = threadIdx.x % 32u;
    const int v = x.ld(t);
    const unsigned full = 0xffffffffu;
    y.st(t * 8 + 0, __ballot_sync(full, v & 1));
    y.st(t * 8 + 1, static_cast<uint32_t>(__all_sync(full, v > 0)));
    y.st(t * 8 + 2, static_cast<uint32_t>(__any_sync(full, v > 1000)));
    // Two independent half-warp groups at once.
    const unsigned half = lane < 16 ? 0x0000ffffu : 0xffff0000u;
    y.st(t * 8 + 3, __ballot_sync(half, v & 2));
    // Divergent __activemask: only lanes with lane % 3 == 0 execute it.
    unsigned am = 0xdeadbeefu;
    if (lane % 3u == 0) am = __activemask();
    __syncwarp();
    y.st(t * 8 + 4, am);
    y.st(t * 8 + 5, static_cast<uint32_t>(__syncthreads_count(v & 1)));
    y.st(t * 8 + 6, static_cast<uint32_t>(__syncthreads_and(v > 0)));
    y.st(t * 8 + 7, static_cast<uint32_t>(__syncthreads_or(v == 7)));
}

// A block whose size is not a multiple of 32: the last warp is partial.
// x: i32[threads], y: u32[threads * 3].
__device__ void partial_warp_body(const BnParams& p) {
    const bn::Gmem<int32_t> x(p.x);
    const bn::Gmem<uint32_t> y(p.y);
    const unsigned t = blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned lane = threadIdx.x % 32u;
    const unsigned warp = threadIdx.x / 32u;
    const unsigned lanes = min(32u, blockDim.x - warp * 32u);
    const unsigned mask = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
    const int v = x.ld(t);
    y.st(t * 3 + 0, static_cast<uint32_t>(__shfl_down_sync(mask, v, 1u)));
    y.st(t * 3 + 1, __ballot_sync(mask, 1));
    (void)lane;
    y.st(t * 3 + 2, __activemask());
}

}  // namespace

BN_KERNEL(emu_test_shfl, shfl_body);
BN_KERNEL(emu_test_vote, vote_body);
BN_KERNEL(emu_test_partial_warp, partial_warp_body);

// selftest_reduce.cu: reductions, correct and with classic bugs, checked by
// tests/reduce.rs.
#include "selftest.cuh"

namespace {

constexpr uint32_t kSkipBarrier = 1u << 0;     // remove the barrier before reading warp sums
constexpr uint32_t kWrongOffset = 1u << 1;     // start the shuffle tree at offset 8
constexpr uint32_t kFirstFinalises = 1u << 2;  // first block to arrive finalises
constexpr uint32_t kSkipFence = 1u << 3;       // no fence between the partial and the atomic
constexpr uint32_t kBlockFence = 1u << 4;      // a block-scope fence there instead
constexpr uint32_t kSkipReadFence = 1u << 5;   // the last block reads without a fence

// Each block sums x[blockIdx.x * chunk ..< min(n, (blockIdx.x + 1) * chunk)].
// x: i64[n] (Input), y: i64[gridDim.x] (Output), chunk, flags.
__device__ long long chunk_sum(const BnParams& p, const bn::Gmem<long long>& x) {
    const int64_t begin = static_cast<int64_t>(blockIdx.x) * p.chunk;
    const int64_t end = min(p.n, begin + p.chunk);
    long long acc = 0;
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) acc += x.ld(i);
    return acc;
}

__device__ void block_reduce_body(const BnParams& p) {
    const bn::Gmem<long long> x(p.x);
    const bn::Gmem<long long> y(p.y);
    BN_SHARED(long long, red, bn::kWarps);
    const long long acc = chunk_sum(p, x);
    const long long total =
        selftest::block_sum(acc, red, (p.flags & kSkipBarrier) != 0, (p.flags & kWrongOffset) ? 8 : 16);
    if (threadIdx.x == 0) y.st(blockIdx.x, total);
}

// Multi-block sum, finalised by the last block to arrive.
// x: i64[n], ws_partials: i64[gridDim.x] (Scratch), ws_counters: u32[1] (Counters),
// y: i64[1] (Output), chunk, flags (kFirstFinalises, kSkipFence, kBlockFence,
// kSkipReadFence: the bugs).
__device__ void last_block_body(const BnParams& p) {
    const bn::Gmem<long long> x(p.x);
    const bn::Gmem<long long> y(p.y);
    const bn::Gmem<long long> partials(p.ws_partials);
    const bn::Gmem<unsigned int> counters(p.ws_counters);
    BN_SHARED(long long, red, bn::kWarps);
    BN_SHARED(unsigned int, role, 2);
    const long long acc = selftest::block_sum(chunk_sum(p, x), red, false, 16);
    if (threadIdx.x == 0) {
        partials.st(blockIdx.x, acc);
        if (p.flags & kBlockFence) {
            __threadfence_block();
        } else if (!(p.flags & kSkipFence)) {
            __threadfence();
        }
        const unsigned int prev = atomicAdd(counters.at(0), 1u);
        const bool last = prev == gridDim.x - 1;
        role[0] = (p.flags & kFirstFinalises) ? prev == 0 : last;  // finalise
        role[1] = last;                                            // reset the counter
    }
    __syncthreads();
    if (role[0]) {
        if (!(p.flags & kSkipReadFence)) __threadfence();
        long long sum = 0;
        for (unsigned i = threadIdx.x; i < gridDim.x; i += blockDim.x) sum += partials.ld_cg(i);
        sum = selftest::block_sum(sum, red, false, 16);
        if (threadIdx.x == 0) y.st(0, sum);
    }
    if (role[1] && threadIdx.x == 0) counters.st(0, 0u);
}

// Order-dependent float sum: every thread atomically adds its elements to y[0].
// x: f32[n] (Input), y: f32[1] (InOut, zero on entry).
__device__ void float_atomic_body(const BnParams& p) {
    const bn::Gmem<float> x(p.x);
    const bn::Gmem<float> y(p.y);
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n; i += stride) {
        atomicAdd(y.at(0), x.ld(i));
    }
}

}  // namespace

BN_KERNEL(emu_test_block_reduce, block_reduce_body);
BN_KERNEL(emu_test_last_block, last_block_body);
BN_KERNEL(emu_test_float_atomic, float_atomic_body);

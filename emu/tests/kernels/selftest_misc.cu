// selftest_misc.cu: conversions, cooperative launches, atomics, shared-memory sites,
// multi-dimensional blocks, params layout and a speed kernel; checked by tests/*.rs.
#include "selftest.cuh"

namespace {

// Conversions over a grid-stride loop, mode = p.flags:
//   0: x u16[n] (half bits)  -> y f32[n]     1: x f32[n] -> y u16[n] (half bits)
//   2: x u16[n] (bf16 bits)  -> y f32[n]     3: x f32[n] -> y u16[n] (bf16 bits)
__device__ void convert_body(const BnParams& p) {
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    switch (p.flags) {
        case 0: {
            const bn::Gmem<__half> x(p.x);
            const bn::Gmem<float> y(p.y);
            for (int64_t i = first; i < p.n; i += stride) y.st(i, bn::Num<__half>::to_f32(x.ld(i)));
            break;
        }
        case 1: {
            const bn::Gmem<float> x(p.x);
            const bn::Gmem<__half> y(p.y);
            for (int64_t i = first; i < p.n; i += stride) y.st(i, bn::from_acc<__half, float>(x.ld(i)));
            break;
        }
        case 2: {
            const bn::Gmem<__nv_bfloat16> x(p.x);
            const bn::Gmem<float> y(p.y);
            for (int64_t i = first; i < p.n; i += stride) y.st(i, bn::to_acc<float, __nv_bfloat16>(x.ld(i)));
            break;
        }
        default: {
            const bn::Gmem<float> x(p.x);
            const bn::Gmem<__nv_bfloat16> y(p.y);
            for (int64_t i = first; i < p.n; i += stride) y.st(i, __float2bfloat16_rn(x.ld(i)));
            break;
        }
    }
}

// Cooperative: every block writes its sum to ws_partials, grid_sync, then every block
// reads all partials and writes the total to y[blockIdx.x]. x: i64[n], chunk per block.
__device__ void coop_body(const BnParams& p) {
    const bn::Gmem<long long> x(p.x);
    const bn::Gmem<long long> y(p.y);
    const bn::Gmem<long long> partials(p.ws_partials);
    BN_SHARED(long long, red, bn::kWarps);
    const int64_t begin = static_cast<int64_t>(blockIdx.x) * p.chunk;
    const int64_t end = min(p.n, begin + p.chunk);
    long long acc = 0;
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) acc += x.ld(i);
    acc = selftest::block_sum(acc, red, false, 16);
    if (threadIdx.x == 0) partials.st(blockIdx.x, acc);
    bn_emu::grid_sync();
    long long total = 0;
    for (unsigned i = threadIdx.x; i < gridDim.x; i += blockDim.x) total += partials.ld_cg(i);
    total = selftest::block_sum(total, red, false, 16);
    if (threadIdx.x == 0) y.st(blockIdx.x, total);
}

// Atomics on global (y: InOut, u64 slots) and shared memory. y layout (as u64 words):
//   0: i32 add tid      1: u32 add 1       2: u64 add tid       3: f32 add 0.5 (bits)
//   4: f64 add 0.25     5: i32 sub 1       6: u32 sub 2         7: i32 max tid
//   8: i32 min -tid     9: u32 max        10: u32 min          11: i64 max
//  12: i64 min         13: u64 max        14: u64 min          15: u32 inc (limit 9)
//  16: u32 exch tid    17: i32 CAS add 3  18: u64 CAS add 5    19: f32 exch
//  20: shared i32 add tid, written by thread 0 after the block's barrier
//  21: i32 exch        22: u64 exch tid
__device__ void atomics_body(const BnParams& p) {
    const bn::Gmem<unsigned long long> y(p.y);
    const unsigned tid = blockIdx.x * blockDim.x + threadIdx.x;
    const int itid = static_cast<int>(tid);
    auto i32 = [&](int k) { return reinterpret_cast<int*>(y.at(k)); };
    auto u32 = [&](int k) { return reinterpret_cast<unsigned int*>(y.at(k)); };
    atomicAdd(i32(0), itid);
    atomicAdd(u32(1), 1u);
    atomicAdd(y.at(2), static_cast<unsigned long long>(tid));
    atomicAdd(reinterpret_cast<float*>(y.at(3)), 0.5f);
    atomicAdd(reinterpret_cast<double*>(y.at(4)), 0.25);
    atomicSub(i32(5), 1);
    atomicSub(u32(6), 2u);
    atomicMax(i32(7), itid);
    atomicMin(i32(8), -itid);
    atomicMax(u32(9), tid * 3u);
    atomicMin(u32(10), tid + 7u);
    atomicMax(reinterpret_cast<long long*>(y.at(11)), -static_cast<long long>(tid) * 100000000000LL);
    atomicMin(reinterpret_cast<long long*>(y.at(12)), -static_cast<long long>(tid) * 100000000000LL);
    atomicMax(y.at(13), static_cast<unsigned long long>(tid) << 40);
    atomicMin(y.at(14), (static_cast<unsigned long long>(tid) << 40) + 1);
    atomicInc(u32(15), 9u);
    atomicExch(u32(16), tid);
    {
        int old = *i32(17);
        for (;;) {
            const int seen = atomicCAS(i32(17), old, old + 3);
            if (seen == old) break;
            old = seen;
        }
        unsigned long long o = *y.at(18);
        for (;;) {
            const unsigned long long seen = atomicCAS(y.at(18), o, o + 5);
            if (seen == o) break;
            o = seen;
        }
    }
    atomicExch(reinterpret_cast<float*>(y.at(19)), static_cast<float>(tid));
    BN_SHARED(int, s, 1);
    if (threadIdx.x == 0) s[0] = 0;
    __syncthreads();
    atomicAdd(&s[0], itid);
    __syncthreads();
    if (threadIdx.x == 0) atomicAdd(i32(20), s[0]);
    atomicExch(i32(21), itid);
    atomicExch(y.at(22), static_cast<unsigned long long>(tid));
}

// Shared-memory sites: each BN_SHARED site (and each template instantiation) is one
// block-wide allocation, the same on every execution; different sites never alias.
// y: i32[gridDim.x * 4].
template <int K>
__device__ int site_value() {
    BN_SHARED(int, cell, 1);
    if (threadIdx.x == 0) cell[0] = K * 100 + static_cast<int>(blockIdx.x);
    __syncthreads();
    const int v = cell[0];
    __syncthreads();
    return v;
}

__device__ int loop_site(int iter) {
    BN_SHARED(int, acc, 1);
    if (threadIdx.x == 0) acc[0] = iter == 0 ? 0 : acc[0];
    __syncthreads();
    if (threadIdx.x == 0) acc[0] += iter + 1;
    __syncthreads();
    return acc[0];
}

__device__ void shared_sites_body(const BnParams& p) {
    const bn::Gmem<int32_t> y(p.y);
    const int a = site_value<1>();
    const int b = site_value<2>();
    int c = 0;
    for (int i = 0; i < 4; ++i) c = loop_site(i);  // same site 4 times: 1 + 2 + 3 + 4
    __syncthreads();
    const int a2 = site_value<1>();
    if (threadIdx.x == 0) {
        y.st(blockIdx.x * 4 + 0, a);
        y.st(blockIdx.x * 4 + 1, b);
        y.st(blockIdx.x * 4 + 2, c);
        y.st(blockIdx.x * 4 + 3, a2);
    }
}

// Multi-dimensional blocks and grids: every thread writes its indices and the warp
// lane computed CUDA's way (linear id from x, y, z), checked with __shfl_sync.
// y: u32[total threads * 8], threads ordered by (block linear, thread linear).
__device__ void dims_body(const BnParams& p) {
    const bn::Gmem<uint32_t> y(p.y);
    const unsigned tlin = threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y;
    const unsigned nthr = blockDim.x * blockDim.y * blockDim.z;
    const unsigned blin = blockIdx.x + blockIdx.y * gridDim.x + blockIdx.z * gridDim.x * gridDim.y;
    const unsigned lanes = min(32u, nthr - (tlin / 32u) * 32u);
    const unsigned mask = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
    // Lane 0 of each warp: its linear id, broadcast.
    const unsigned lane0 = __shfl_sync(mask, tlin, 0);
    const uint64_t o = (static_cast<uint64_t>(blin) * nthr + tlin) * 8u;
    y.st(o + 0, threadIdx.x);
    y.st(o + 1, threadIdx.y);
    y.st(o + 2, threadIdx.z);
    y.st(o + 3, blockIdx.x);
    y.st(o + 4, blockIdx.y);
    y.st(o + 5, blockIdx.z);
    y.st(o + 6, lane0);
    y.st(o + 7, blockDim.x * 1000000u + blockDim.y * 1000u + blockDim.z + gridDim.x * 0u);
}

// Echoes every BnParams field into y (u64[26]), to check the test mirror's layout.
__device__ void params_body(const BnParams& p) {
    const bn::Gmem<uint64_t> y(p.y);
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    const uint64_t addrs[17] = {p.x,           p.y,         p.dy,           p.dx,          p.weight,
                                p.bias,        p.running_mean, p.running_var, p.save_mean, p.save_invstd,
                                p.grad_weight, p.grad_bias, p.ws_counters,  p.ws_partials, p.ws_channel,
                                p.z,           p.dz};
    int k = 0;
    for (uint64_t a : addrs) y.st(k++, a);
    y.st(k++, static_cast<uint64_t>(p.n));
    y.st(k++, static_cast<uint64_t>(p.c));
    y.st(k++, static_cast<uint64_t>(p.s));
    y.st(k++, static_cast<uint64_t>(p.chunk));
    y.st(k++, static_cast<uint64_t>(__double_as_longlong(p.eps)));
    y.st(k++, static_cast<uint64_t>(__double_as_longlong(p.momentum)));
    y.st(k++, static_cast<uint64_t>(__double_as_longlong(p.bessel)));
    y.st(k++, p.flags);
    y.st(k++, p.splits);
    y.st(k++, p.tile_x);
    y.st(k++, p.reserved);
}

// Speed: p.chunk rounds of (__syncthreads + __shfl_xor_sync); y: u32[threads] (Output).
__device__ void speed_body(const BnParams& p) {
    const bn::Gmem<uint32_t> y(p.y);
    unsigned v = threadIdx.x;
    for (int64_t r = 0; r < p.chunk; ++r) {
        __syncthreads();
        v += __shfl_xor_sync(0xffffffffu, v, static_cast<int>(r & 31));
    }
    y.st(blockIdx.x * blockDim.x + threadIdx.x, v);
}

// Vector loads and stores: y[i] = 2 * x[i] with 16-byte packs where aligned, scalar
// elsewhere; x, y: f32[n], p.chunk = element offset of the view start.
__device__ void vec_body(const BnParams& p) {
    const bn::Gmem<float> x(p.x + static_cast<uint64_t>(p.chunk) * 4u);
    const bn::Gmem<float> y(p.y + static_cast<uint64_t>(p.chunk) * 4u);
    const int64_t n = p.n - p.chunk;
    const int head = min(static_cast<int64_t>(x.head_to_align(0)), n);
    if (threadIdx.x == 0) {
        for (int i = 0; i < head; ++i) y.st(i, 2.0f * x.ld(i));
    }
    const int64_t nvec = (n - head) / 4;
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
        bn::Pack<float, 4> pk = x.ld_vec<4>(head + v * 4);
        for (int j = 0; j < 4; ++j) pk.v[j] *= 2.0f;
        y.st_vec<4>(head + v * 4, pk);
    }
    if (threadIdx.x == 0) {
        for (int64_t i = head + nvec * 4; i < n; ++i) y.st(i, 2.0f * x.ld(i));
    }
}

}  // namespace

BN_KERNEL(emu_test_convert, convert_body);
BN_KERNEL(emu_test_coop, coop_body);
BN_KERNEL(emu_test_atomics, atomics_body);
BN_KERNEL(emu_test_shared_sites, shared_sites_body);
BN_KERNEL(emu_test_dims, dims_body);
BN_KERNEL(emu_test_params, params_body);
BN_KERNEL(emu_test_speed, speed_body);
BN_KERNEL(emu_test_vec, vec_body);

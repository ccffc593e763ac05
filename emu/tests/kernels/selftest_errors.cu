// selftest_errors.cu: one kernel with a deliberate bug per mode (p.flags), checked by
// tests/errors.rs. x: f32[n] (Input), y: f32[n] (Output), ws_counters: u32[1]
// (Counters), dy: address used for the null / unknown-address views.
#include "selftest.cuh"

namespace {

enum Mode : uint32_t {
    kNone = 0,
    kReadPastEnd = 1,
    kWritePastEnd = 2,
    kMisalignedVec = 3,
    kWriteInput = 4,
    kNullView = 5,
    kCountersLeft = 6,
    kPartialBarrier = 7,
    kDivergentBarrier = 8,
    kShflLaneMissing = 9,
    kDeadlock = 10,
    kSharedIndex = 11,
    kSharedTooMuch = 12,
    kGridSyncNotCoop = 13,
    kMaskWithoutSelf = 14,
    kDynamicIndex = 15,
    kUnknownAddress = 16,
    kNegativeIndex = 17,
    kAtomicOnInput = 18,
    kDivergentCollective = 19,
    kExitBeforeBarrier = 20,
    kSharedNegativeIndex = 21,
    kMaskNamesMissingLane = 22,
    kExitBeforeGridSync = 23,
    kBadWidth = 24,
};

__device__ void errors_body(const BnParams& p) {
    const bn::Gmem<float> x(p.x);
    const bn::Gmem<float> y(p.y);
    const bn::Gmem<float> other(p.dy);
    const bn::Gmem<unsigned int> counters(p.ws_counters);
    const unsigned tid = threadIdx.x;
    const unsigned lane = tid % 32u;
    const unsigned full = 0xffffffffu;
    // Every mode first does something legal.
    if (tid < p.n) y.st(tid, x.ld(tid) * 2.0f);
    switch (static_cast<Mode>(p.flags)) {
        case kNone:
            break;
        case kReadPastEnd:
            if (tid == 0) y.st(0, x.ld(p.n));
            break;
        case kWritePastEnd:
            if (tid == 0) y.st(p.n, 1.0f);
            break;
        case kMisalignedVec:
            if (tid == 0) {
                const bn::Pack<float, 4> v = x.ld_vec<4>(1);
                y.st(0, v.v[0]);
            }
            break;
        case kWriteInput:
            if (tid == 0) x.st(0, 1.0f);
            break;
        case kNullView:
            if (tid == 0) y.st(0, other.ld(0));
            break;
        case kCountersLeft:
            if (tid == 0) atomicAdd(counters.at(0), 1u);
            break;
        case kPartialBarrier:
            if (tid >= 16) return;
            __syncthreads();
            break;
        case kDivergentBarrier:
            if (tid & 1u) {
                __syncthreads();
            } else {
                __syncthreads();
            }
            break;
        case kShflLaneMissing: {
            if (lane == 5) return;
            const float v = __shfl_sync(full, 1.0f, 0);
            y.st(tid, v);
            break;
        }
        case kDeadlock: {
            if (lane < 16) {
                __syncthreads();
            } else {
                const float v = __shfl_sync(full, 1.0f, 0);
                y.st(tid, v);
            }
            break;
        }
        case kSharedIndex: {
            BN_SHARED(float, s, 64);
            s[tid] = 1.0f;
            __syncthreads();
            y.st(tid, s[tid + 1]);  // thread 63 reads s[64]
            break;
        }
        case kSharedTooMuch: {
            BN_SHARED(float, a, 8192);
            BN_SHARED(float, b, 8192);
            a[tid] = 1.0f;
            b[tid] = 2.0f;
            break;
        }
        case kGridSyncNotCoop:
            bn_emu::grid_sync();
            break;
        case kMaskWithoutSelf: {
            const float v = __shfl_sync(0x1u, 1.0f, 0);
            y.st(tid, v);
            break;
        }
        case kDynamicIndex: {
            BN_DYNAMIC_SHARED(float, d);
            d[tid] = 1.0f;  // blockDim.x elements of dynamic shared memory: thread blockDim.x - 1 is the last
            d[tid + 1] = 2.0f;
            break;
        }
        case kUnknownAddress:
            if (tid == 0) y.st(0, other.ld(0));
            break;
        case kNegativeIndex:
            if (tid == 0) y.st(0, x.ld(-1));
            break;
        case kAtomicOnInput: {
            const bn::Gmem<unsigned int> xi(p.x);
            if (tid == 0) atomicAdd(xi.at(0), 1u);
            break;
        }
        case kDivergentCollective: {
            float v;
            if (lane & 1u) {
                v = __shfl_xor_sync(full, 1.0f, 1);
            } else {
                v = __shfl_xor_sync(full, 2.0f, 1);
            }
            y.st(tid, v);
            break;
        }
        case kExitBeforeBarrier:
            if (tid == 0) return;
            __syncthreads();
            break;
        case kMaskNamesMissingLane: {
            // Launched with a block size that is not a multiple of 32.
            const float v = __shfl_sync(full, 1.0f, 0);
            y.st(tid, v);
            break;
        }
        case kExitBeforeGridSync:
            if (blockIdx.x == 1 && tid == 3) return;
            bn_emu::grid_sync();
            break;
        case kBadWidth: {
            const float v = __shfl_xor_sync(full, 1.0f, 1, 12);
            y.st(tid, v);
            break;
        }
        case kSharedNegativeIndex: {
            BN_SHARED(int, s, 64);
            const int i = static_cast<int>(tid) - 1;
            s[i] = 1;
            break;
        }
    }
}

// Reads shared and scratch memory before anything wrote it: the 0xFF fill shows up.
// y: u32[4] (Output), ws_partials: u32[1] (Scratch). Dynamic shared memory >= 4 bytes.
__device__ void poison_body(const BnParams& p) {
    const bn::Gmem<uint32_t> y(p.y);
    const bn::Gmem<uint32_t> scratch(p.ws_partials);
    BN_SHARED(uint32_t, s, 4);
    BN_SHARED(float, sf, 4);
    BN_DYNAMIC_SHARED(uint32_t, d);
    if (threadIdx.x == 0) {
        y.st(0, s[3]);
        y.st(1, __float_as_uint(sf[0]));
        y.st(2, d[0]);
        y.st(3, scratch.ld(0));
    }
}

}  // namespace

BN_KERNEL(emu_test_errors, errors_body);
BN_KERNEL(emu_test_poison, poison_body);

namespace {

// Records the order in which blocks and threads first run. y: u32[gridDim.x] block
// arrival order, dx: u32[blockDim.x] thread order in block 0, ws_channel: u32[1]
// (InOut, zero) block counter.
__device__ void order_body(const BnParams& p) {
    const bn::Gmem<uint32_t> y(p.y);
    const bn::Gmem<uint32_t> dx(p.dx);
    const bn::Gmem<uint32_t> ctr(p.ws_channel);
    BN_SHARED(unsigned, seen, 1);
    if (threadIdx.x == 0) seen[0] = 0;
    __syncthreads();
    // Each thread's first atomic happens in ring order.
    const unsigned k = atomicAdd(&seen[0], 1u);
    if (blockIdx.x == 0) dx.st(threadIdx.x, k);
    if (threadIdx.x == 0) y.st(blockIdx.x, atomicAdd(ctr.at(0), 1u));
}

}  // namespace

BN_KERNEL(emu_test_order, order_body);

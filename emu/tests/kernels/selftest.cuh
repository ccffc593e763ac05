// selftest.cuh: helpers shared by the emulator's self-test kernels.
//
// Self-test kernels are written like project kernels: common.cuh, BN_KERNEL, Gmem views
// built from BnParams fields, BN_SHARED. The BnParams fields are used as generic
// arguments (x, dy: inputs; y, dx: outputs; ws_partials: scratch; ws_counters:
// counters; n, c, s, chunk, flags, splits, reserved: integers), as each kernel says.
#pragma once

#include "common.cuh"

namespace selftest {

__device__ __forceinline__ unsigned lane_id() { return threadIdx.x % 32u; }
__device__ __forceinline__ unsigned warp_id() { return threadIdx.x / 32u; }

// Sum over a full warp with __shfl_down_sync, offsets first_offset, first_offset/2, ..., 1.
// Correct only with first_offset == 16 (a smaller one is the "wrong shuffle offset" bug).
template <class T>
__device__ __forceinline__ T warp_sum(T v, int first_offset) {
    for (int o = first_offset; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, static_cast<unsigned>(o));
    return v;
}

// Block-wide sum (blockDim.x a multiple of 32, blockDim.y == blockDim.z == 1); the
// result is valid in thread 0. smem holds at least one T per warp. skip_barrier removes
// the __syncthreads between publishing the warp sums and reading them (a bug).
template <class T, class S>
__device__ __forceinline__ T block_sum(T v, S& smem, bool skip_barrier, int first_offset) {
    const unsigned lane = lane_id();
    const unsigned warp = warp_id();
    const unsigned nwarps = (blockDim.x + 31u) / 32u;
    v = warp_sum(v, first_offset);
    if (lane == 0) smem[warp] = v;
    if (!skip_barrier) __syncthreads();
    if (warp == 0) {
        v = lane < nwarps ? smem[lane] : T(0);
        v = warp_sum(v, first_offset);
    }
    __syncthreads();  // smem may be reused by the caller
    return v;
}

}  // namespace selftest

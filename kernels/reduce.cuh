// reduce.cuh: Welford statistics and their merges, for one thread, a warp, a block.
//
// Welford<A> holds (n, mean, m2) of a set of values: count, mean, and the sum of squared
// deviations from that mean. Adding one value and merging two sets (Chan et al.) stay
// accurate where sum / sum-of-squares would cancel (a channel with mean 1e4 and std 1
// loses every digit of its variance in f32 sums of squares).
//
// Assumptions:
//   * blocks are 1-D with bn::kBlockThreads threads for the block-wide merges here;
//   * counts are kept in A; the launch plan keeps a block's count at or under 2^24, so
//     they are exact in f32;
//   * every merge runs in a fixed order, so a launch's result does not depend on which
//     block finishes first.
//
// Non-finite values: PyTorch's mean of a channel that holds inf or NaN is what a plain
// sum gives (inf, -inf, or NaN when both signs or a NaN occur) and its variance is NaN.
// A Welford state whose mean is not finite stands for exactly that: adding a value or
// merging a state adds the non-finite means as a sum would (inf + x = inf,
// inf + -inf = NaN), and m2 becomes NaN. Without that rule one inf turns every later
// delta into -inf and the mean into NaN.
#pragma once

#include "common.cuh"

namespace bn {

constexpr unsigned kFullMask = 0xffffffffu;

template <class A>
struct Welford {
    A n;
    A mean;
    A m2;
};

template <class A>
__device__ __forceinline__ Welford<A> welford_empty() {
    return Welford<A>{A(0), A(0), A(0)};
}

// Whether v is finite: v - v is 0 for finite v and NaN for inf and NaN.
template <class A>
__device__ __forceinline__ bool is_finite(A v) {
    return v - v == A(0);
}

// Adds value v; rcp_n must be 1 / (w.n + 1), passed in so that callers that add one
// value to several channels per step pay for one reciprocal.
template <class A>
__device__ __forceinline__ void welford_add(Welford<A>& w, A v, A n_new, A rcp_n) {
    const A delta = v - w.mean;
    w.n = n_new;
    w.mean = is_finite(w.mean) ? w.mean + delta * rcp_n : w.mean + v;
    w.m2 += delta * (v - w.mean);
}

template <class A>
__device__ __forceinline__ void welford_add(Welford<A>& w, A v) {
    const A n_new = w.n + A(1);
    welford_add(w, v, n_new, A(1) / n_new);
}

// Chan's merge of two disjoint sets.
template <class A>
__device__ __forceinline__ Welford<A> welford_merge(const Welford<A>& a, const Welford<A>& b) {
    if (b.n == A(0)) return a;
    if (a.n == A(0)) return b;
    const A n = a.n + b.n;
    if (!is_finite(a.mean) || !is_finite(b.mean)) {
        const A sum = a.mean + b.mean;  // inf, -inf or NaN, as a plain sum
        return Welford<A>{n, sum, sum * A(0)};
    }
    const A delta = b.mean - a.mean;
    const A fb = b.n / n;
    return Welford<A>{n, a.mean + delta * fb, a.m2 + b.m2 + delta * delta * a.n * fb};
}

// Lane 0 ends with the merge of the warp's 32 states (other lanes hold partial merges).
template <class A>
__device__ __forceinline__ Welford<A> warp_merge(Welford<A> w) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        Welford<A> o;
        o.n = __shfl_down_sync(kFullMask, w.n, offset);
        o.mean = __shfl_down_sync(kFullMask, w.mean, offset);
        o.m2 = __shfl_down_sync(kFullMask, w.m2, offset);
        w = welford_merge(w, o);
    }
    return w;
}

// Thread 0 ends with the merge of the block's states. Every thread of the block must
// call it; it may be called repeatedly (it ends with a barrier before the shared
// arrays are reused).
template <class A>
__device__ __forceinline__ Welford<A> block_merge(Welford<A> w) {
    BN_SHARED(A, s_n, kWarps);
    BN_SHARED(A, s_mean, kWarps);
    BN_SHARED(A, s_m2, kWarps);
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    w = warp_merge(w);
    if (lane == 0) {
        s_n[warp] = w.n;
        s_mean[warp] = w.mean;
        s_m2[warp] = w.m2;
    }
    __syncthreads();
    if (warp == 0) {
        Welford<A> v = welford_empty<A>();
        if (lane < kWarps) {
            v.n = s_n[lane];
            v.mean = s_mean[lane];
            v.m2 = s_m2[lane];
        }
        w = warp_merge(v);
    }
    __syncthreads();
    return w;
}

// Sums of two quantities (the backward's sum_dy and dotp).
template <class A>
struct Sum2 {
    A a;
    A b;
};

template <class A>
__device__ __forceinline__ Sum2<A> warp_sum(Sum2<A> s) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        s.a += __shfl_down_sync(kFullMask, s.a, offset);
        s.b += __shfl_down_sync(kFullMask, s.b, offset);
    }
    return s;
}

// Thread 0 ends with the block's sums; same calling rules as block_merge.
template <class A>
__device__ __forceinline__ Sum2<A> block_sum(Sum2<A> s) {
    BN_SHARED(A, s_a, kWarps);
    BN_SHARED(A, s_b, kWarps);
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    s = warp_sum(s);
    if (lane == 0) {
        s_a[warp] = s.a;
        s_b[warp] = s.b;
    }
    __syncthreads();
    if (warp == 0) {
        Sum2<A> v{A(0), A(0)};
        if (lane < kWarps) {
            v.a = s_a[lane];
            v.b = s_b[lane];
        }
        s = warp_sum(v);
    }
    __syncthreads();
    return s;
}

}  // namespace bn

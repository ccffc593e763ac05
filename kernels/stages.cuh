// stages.cuh: what the stages of every kernel family share: vector loads to and from
// accumulators, the per-channel coefficients of the normalisation and of dx, the
// finalisation of a channel's statistics and sums, the staged running-statistics
// commit, and the last-block arrival protocol.
//
// Types: T storage, P parameters and running statistics, A accumulator, I index.
#pragma once

#include "common.cuh"
#include "reduce.cuh"

namespace bn {

template <class I>
__device__ __forceinline__ I imin(I a, I b) {
    return a < b ? a : b;
}

// The channel data fwd_stats leaves in ws_channel, A[5 * C] (CHANNEL_SLOTS in
// src/launch.rs): the shift, the mean of the shifted values, invstd, and (when
// updating) the new running mean and variance.
enum ChannelSlot { kShift = 0, kShiftedMean = 1, kInvstd = 2, kNewRunningMean = 3, kNewRunningVar = 4 };

// The shift of a channel whose first value is v.
template <class A>
__device__ __forceinline__ A shift_of(A v) {
    return is_finite(v) ? v : A(0);
}

// Loads V consecutive values starting at element i as accumulators (one 16-byte vector
// when V > 1; the plan guarantees its alignment).
template <int V, class A, class T, class I>
__device__ __forceinline__ void load_acc(const Gmem<const T>& g, I i, A (&out)[V]) {
    if constexpr (V == 1) {
        out[0] = to_acc<A>(g.ld(i));
    } else {
        const Pack<T, V> v = g.template ld_vec<V>(i);
        BN_UNROLL
        for (int j = 0; j < V; ++j) out[j] = to_acc<A>(v.v[j]);
    }
}

template <int V, class A, class T, class I>
__device__ __forceinline__ void store_acc(const Gmem<T>& g, I i, const A (&in)[V]) {
    if constexpr (V == 1) {
        g.st(i, from_acc<T>(in[0]));
    } else {
        Pack<T, V> v;
        BN_UNROLL
        for (int j = 0; j < V; ++j) v.v[j] = from_acc<T>(in[j]);
        g.template st_vec<V>(i, v);
    }
}

// ---------------------------------------------------------------------------------------
// Per-channel coefficients, loaded once per block (nchw) or per thread (nhwc).

template <class P, class A, class I>
__device__ __forceinline__ A param_or(uint64_t addr, I c, A fallback) {
    return addr ? to_acc<A>(Gmem<const P>(addr).ld(c)) : fallback;
}

// y = ((x - shift) - delta) * scale + bias
template <class A>
struct NormCoeffs {
    A shift, delta, scale, bias;
    __device__ __forceinline__ A apply(A v) const { return ((v - shift) - delta) * scale + bias; }
};

template <class P, class A, class I>
__device__ __forceinline__ NormCoeffs<A> norm_coeffs(const BnParams& p, I c) {
    NormCoeffs<A> k;
    if (p.flags & BN_F_FROZEN) {
        // Frozen: y = x * scale + shift, coefficients computed once when the module was
        // built. (v - 0) - 0 is v exactly, so apply() is one multiply-add here.
        const Gmem<const A> ch(p.ws_channel);
        k.shift = A(0);
        k.delta = A(0);
        k.scale = ch.ld(c);
        k.bias = ch.ld(static_cast<I>(p.c) + c);
        return k;
    }
    A invstd;
    if (p.flags & BN_F_BATCH_STATS) {
        const Gmem<const A> ch(p.ws_channel);
        const I C = static_cast<I>(p.c);
        k.shift = ch.ld(kShift * C + c);
        k.delta = ch.ld(kShiftedMean * C + c);
        invstd = ch.ld(kInvstd * C + c);
    } else {
        k.shift = to_acc<A>(Gmem<const P>(p.running_mean).ld(c));
        k.delta = A(0);
        invstd = acc_rsqrt(to_acc<A>(Gmem<const P>(p.running_var).ld(c)) + static_cast<A>(p.eps));
    }
    k.scale = invstd * param_or<P, A>(p.weight, c, A(1));
    k.bias = param_or<P, A>(p.bias, c, A(0));
    return k;
}

// The mean and invstd the backward differentiates through: the saved batch statistics
// in training, the running statistics in eval.
template <class A>
struct BwdStats {
    A mean, invstd;
};

template <class P, class A, class I>
__device__ __forceinline__ BwdStats<A> bwd_stats(const BnParams& p, I c) {
    if (p.flags & BN_F_BATCH_STATS) {
        return BwdStats<A>{Gmem<const A>(p.save_mean).ld(c), Gmem<const A>(p.save_invstd).ld(c)};
    }
    return BwdStats<A>{to_acc<A>(Gmem<const P>(p.running_mean).ld(c)),
                       acc_rsqrt(to_acc<A>(Gmem<const P>(p.running_var).ld(c)) + static_cast<A>(p.eps))};
}

// Training: dx = (dy - (x - mean) * proj - grad_mean) * grad_scale.
// Eval: dx = dy * grad_scale, which never looks at the mean (a non-finite running mean
// must not make (x - mean) * 0 a NaN; PyTorch's eval dx is finite there).
template <class A>
struct DxCoeffs {
    A mean, proj, grad_mean, grad_scale;
    __device__ __forceinline__ A apply(A dy, A x) const { return (dy - (x - mean) * proj - grad_mean) * grad_scale; }
    __device__ __forceinline__ A apply_eval(A dy) const { return dy * grad_scale; }
};

template <class P, class A, class I>
__device__ __forceinline__ DxCoeffs<A> dx_coeffs(const BnParams& p, I c) {
    DxCoeffs<A> k;
    if (p.flags & BN_F_FROZEN) {
        // Frozen (eval): dx = dy * scale.
        k.mean = A(0);
        k.grad_scale = Gmem<const A>(p.ws_channel).ld(c);
        k.grad_mean = A(0);
        k.proj = A(0);
        return k;
    }
    const BwdStats<A> st = bwd_stats<P, A>(p, c);
    k.mean = st.mean;
    k.grad_scale = st.invstd * param_or<P, A>(p.weight, c, A(1));
    if (p.flags & BN_F_BATCH_STATS) {
        const Gmem<const A> ch(p.ws_channel);
        const A norm = A(1) / static_cast<A>(p.n * p.s);
        k.grad_mean = ch.ld(c) * norm;
        k.proj = ch.ld(static_cast<I>(p.c) + c) * norm * st.invstd * st.invstd;
    } else {
        k.grad_mean = A(0);
        k.proj = A(0);
    }
    return k;
}

// ---------------------------------------------------------------------------------------
// Finalisation of one channel, by one thread of the block that finishes it.

template <class P, class A, class I>
__device__ __forceinline__ void finalize_stats(const BnParams& p, I c, const Welford<A>& w, A shift) {
    const I C = static_cast<I>(p.c);
    const A var = w.m2 / w.n;
    const A invstd = acc_rsqrt(var + static_cast<A>(p.eps));
    const A mean = shift + w.mean;
    if (p.save_mean) Gmem<A>(p.save_mean).st(c, mean);
    if (p.save_invstd) Gmem<A>(p.save_invstd).st(c, invstd);
    const Gmem<A> ch(p.ws_channel);
    ch.st(kShift * C + c, shift);
    ch.st(kShiftedMean * C + c, w.mean);
    ch.st(kInvstd * C + c, invstd);
    if (p.flags & BN_F_UPDATE_RUNNING) {
        // Staged: fwd_norm commits them (commit_running).
        const A momentum = static_cast<A>(p.momentum);
        const Gmem<const P> rm(p.running_mean);
        const Gmem<const P> rv(p.running_var);
        const A unbiased = var * static_cast<A>(p.bessel);
        ch.st(kNewRunningMean * C + c, mean * momentum + (A(1) - momentum) * to_acc<A>(rm.ld(c)));
        ch.st(kNewRunningVar * C + c, unbiased * momentum + (A(1) - momentum) * to_acc<A>(rv.ld(c)));
    }
}

// fwd_norm's commit of the running statistics fwd_stats staged for channel c.
template <class P, class A, class I>
__device__ __forceinline__ void commit_running(const BnParams& p, I c) {
    const I C = static_cast<I>(p.c);
    const Gmem<const A> ch(p.ws_channel);
    Gmem<P>(p.running_mean).st(c, from_acc<P>(ch.ld(kNewRunningMean * C + c)));
    Gmem<P>(p.running_var).st(c, from_acc<P>(ch.ld(kNewRunningVar * C + c)));
}

template <class P, class A, class I>
__device__ __forceinline__ void finalize_backward(const BnParams& p, I c, const Sum2<A>& s, A invstd) {
    // s.a = sum_dy, s.b = dotp
    if (p.grad_bias) Gmem<P>(p.grad_bias).st(c, from_acc<P>(s.a));
    if (p.grad_weight) Gmem<P>(p.grad_weight).st(c, from_acc<P>(s.b * invstd));
    const Gmem<A> ch(p.ws_channel);
    ch.st(c, s.a);
    ch.st(static_cast<I>(p.c) + c, s.b);
}

// Values in split j of a range of `total` cut into `chunk`-sized splits.
template <class I>
__device__ __forceinline__ I split_count(I j, I chunk, I total) {
    return imin(total - j * chunk, chunk);
}

// The last-block protocol, shared by the reductions: publish this block's partial
// (done by the caller before), count the block in, and tell whether it was the last of
// its group. The last block also resets the counter for the next launch.
__device__ __forceinline__ bool arrive_last(const BnParams& p, uint64_t counter, unsigned group_size) {
    BN_SHARED(int, s_last, 1);
    __threadfence();
    __syncthreads();
    const bool lead = threadIdx.x == 0 && threadIdx.y == 0;
    const Gmem<unsigned> counters(p.ws_counters);
    if (lead) {
        const unsigned prev = atomicAdd(counters.at(counter), 1u);
        s_last[0] = prev == group_size - 1u ? 1 : 0;
    }
    __syncthreads();
    const bool last = s_last[0] != 0;
    if (last) {
        __threadfence();
        if (lead) counters.st(counter, 0u);
    }
    return last;
}

}  // namespace bn

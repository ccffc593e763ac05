// stream.cuh: the streaming building blocks of the ilp, flat and persistent kernel
// families, and the one split / publish / arrive / merge / finalise skeleton their
// reductions share.
//
//   * Loads in flight: every streaming loop loads its U 16-byte vectors per input into
//     registers before any arithmetic on them (U = 4 with one input, 2 with two: 64 bytes
//     per thread in flight), through the read-only path, with an L2 eviction policy on
//     sm_80 and newer (the compute_90 build): evict_last for a first pass whose data a
//     second pass reads again, evict_first for that second pass.
//   * No division per element: statistics merge a group of G values at a time (a
//     two-pass mean and m2 of the group in registers, then Chan's merge with one
//     reciprocal per group).
//   * Reductions: a Policy says what is accumulated (Welford states for the statistics,
//     pairs of sums for the backward) and how a channel is finalised; the skeletons below
//     do the rest for one channel per block (nchw) or a tile of channels per block (nhwc):
//     block merge, partials to the workspace, the last-block arrival, a parallel merge of
//     the splits in a fixed order (ILP over the partials' loads), finalisation.
//
// Types: T storage, P parameters, A accumulator, I index (int32_t or int64_t).
#pragma once

#include "stages.cuh"

namespace bn {

// ---------------------------------------------------------------------------------------
// Read-only 16-byte loads with an L2 policy.

enum class L2Keep : int { Normal = 0, Last = 1, First = 2 };

#if !defined(BN_EMULATION) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define BN_L2_HINTS 1
template <L2Keep K>
__device__ __forceinline__ uint64_t l2_policy() {
    uint64_t pol;
    if constexpr (K == L2Keep::Last) {
        asm("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(pol));
    } else if constexpr (K == L2Keep::First) {
        asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
    } else {
        asm("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;" : "=l"(pol));
    }
    return pol;
}
#endif

// A read-only input viewed for streaming: 16-byte loads through the non-coherent path,
// with the L2 policy K where the build has them.
template <class T, L2Keep K = L2Keep::Normal>
struct Stream {
    Gmem<const T> g;
#if defined(BN_L2_HINTS)
    uint64_t policy;
#endif
    __device__ __forceinline__ explicit Stream(uint64_t addr)
        : g(addr)
#if defined(BN_L2_HINTS)
          ,
          policy(l2_policy<K>())
#endif
    {
    }

    template <int N, class I>
    __device__ __forceinline__ Pack<T, N> vec(I i) const {
#if defined(BN_EMULATION)
        return g.template ld_vec<N>(i);
#else
        static_assert(sizeof(Pack<T, N>) == 16, "16-byte packs only");
        const uint4* a = reinterpret_cast<const uint4*>(g.base + i);
        uint4 r;
#if defined(BN_L2_HINTS)
        // volatile: keeps the loads where the source puts them, all U ahead of the
        // arithmetic (without it the compiler sinks them next to their uses and the
        // static report shows half the bytes in flight)
        asm volatile("ld.global.nc.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
            : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
            : "l"(a), "l"(policy));
#else
        r = __ldg(a);
#endif
        Pack<T, N> out;
        memcpy(&out, &r, sizeof(out));
        return out;
#endif
    }

    // One value, through the same path and policy (the flat family's loads).
    template <class I>
    __device__ __forceinline__ T one(I i) const {
#if defined(BN_L2_HINTS)
        const T* a = g.base + i;
        T out;
        if constexpr (sizeof(T) == 2) {
            unsigned short r;
            asm volatile("ld.global.nc.L2::cache_hint.b16 %0, [%1], %2;" : "=h"(r) : "l"(a), "l"(policy));
            memcpy(&out, &r, 2);
        } else if constexpr (sizeof(T) == 4) {
            unsigned int r;
            asm volatile("ld.global.nc.L2::cache_hint.b32 %0, [%1], %2;" : "=r"(r) : "l"(a), "l"(policy));
            memcpy(&out, &r, 4);
        } else {
            unsigned long long r;
            asm volatile("ld.global.nc.L2::cache_hint.b64 %0, [%1], %2;" : "=l"(r) : "l"(a), "l"(policy));
            memcpy(&out, &r, 8);
        }
        return out;
#else
        return g.ld(i);
#endif
    }
};

template <int V, class A, class T, L2Keep K, class I>
__device__ __forceinline__ void load_acc(const Stream<T, K>& s, I i, A (&out)[V]) {
    if constexpr (V == 1) {
        out[0] = to_acc<A>(s.one(i));
    } else {
        const Pack<T, V> v = s.template vec<V>(i);
        BN_UNROLL
        for (int j = 0; j < V; ++j) out[j] = to_acc<A>(v.v[j]);
    }
}

// ---------------------------------------------------------------------------------------
// Division-free Welford: a group of G values merged at once.

// 1 / n for a count n (exact small integers): the IEEE-rounded reciprocal, no division.
__device__ __forceinline__ float count_rcp(float n) { return __frcp_rn(n); }
__device__ __forceinline__ double count_rcp(double n) { return __drcp_rn(n); }

// The two-pass mean and m2 of G values in registers.
template <class A, int G>
__device__ __forceinline__ Welford<A> group_stats(const A (&v)[G]) {
    A sum = A(0);
    BN_UNROLL
    for (int i = 0; i < G; ++i) sum += v[i];
    const A mean = sum * (A(1) / A(G));
    A m2 = A(0);
    BN_UNROLL
    for (int i = 0; i < G; ++i) {
        const A d = v[i] - mean;
        m2 += d * d;
    }
    return Welford<A>{A(G), mean, m2};
}

// Chan's merge of a group of nb values (mean_b, m2_b) into w, given r = nb / (w.n + nb):
// one reciprocal per group, shared by the lanes of a vector of channels. Non-finite
// means follow reduce.cuh's rule (the plain sum's inf or NaN, m2 NaN).
template <class A>
__device__ __forceinline__ void welford_absorb(Welford<A>& w, A nb, A mean_b, A m2_b, A r) {
    const A na = w.n;
    const bool finite = is_finite(w.mean) && is_finite(mean_b);
    const A delta = mean_b - w.mean;
    w.n = na + nb;
    w.mean = finite ? w.mean + delta * r : w.mean + mean_b;
    w.m2 = finite ? w.m2 + m2_b + delta * delta * (na * r) : w.mean * A(0);
}

template <class A, int G>
__device__ __forceinline__ void welford_group(Welford<A>& w, const A (&v)[G]) {
    const Welford<A> g = group_stats<A, G>(v);
    welford_absorb(w, A(G), g.mean, g.m2, A(G) * count_rcp(w.n + A(G)));
}

// ---------------------------------------------------------------------------------------
// Reduction policies: what a reduction accumulates, as K accumulator values.

template <class A>
struct StatsPolicy {
    using State = Welford<A>;
    static constexpr int K = 3;
    __device__ static State empty() { return welford_empty<A>(); }
    __device__ static State merge(const State& a, const State& b) { return welford_merge(a, b); }
    __device__ static State block(const State& s) { return block_merge(s); }
    __device__ static State warp(const State& s) { return warp_merge(s); }
    __device__ static A get(const State& s, int q) { return q == 0 ? s.n : (q == 1 ? s.mean : s.m2); }
    __device__ static State make(A n, A mean, A m2) { return State{n, mean, m2}; }
};

template <class A>
struct SumPolicy {
    using State = Sum2<A>;
    static constexpr int K = 2;
    __device__ static State empty() { return State{A(0), A(0)}; }
    __device__ static State merge(const State& a, const State& b) { return State{a.a + b.a, a.b + b.b}; }
    __device__ static State block(const State& s) { return block_sum(s); }
    __device__ static State warp(const State& s) { return warp_sum(s); }
    __device__ static A get(const State& s, int q) { return q == 0 ? s.a : s.b; }
    __device__ static State make(A a, A b, A) { return State{a, b}; }
};

// Partials in the workspace: K values per (split, channel), value q of split s of channel
// c at (q * splits + s) * C + c.
template <class Pol, class A, class I>
__device__ __forceinline__ void publish(const Gmem<A>& part, I C, I splits, I s, I c, const typename Pol::State& st) {
    BN_UNROLL
    for (int q = 0; q < Pol::K; ++q) part.st((static_cast<I>(q) * splits + s) * C + c, Pol::get(st, q));
}

template <class Pol, class A, class I>
__device__ __forceinline__ typename Pol::State fetch(const Gmem<A>& part, I C, I splits, I s, I c) {
    A v[3] = {A(0), A(0), A(0)};
    BN_UNROLL
    for (int q = 0; q < Pol::K; ++q) v[q] = part.ld_cg((static_cast<I>(q) * splits + s) * C + c);
    return Pol::make(v[0], v[1], v[2]);
}

// The last block's merge of channel c's splits by `lanes` threads (lane `me` of them):
// each takes splits me, me + lanes, ... in that order, loading kMergeIlp partials before
// merging them, so that the loads overlap. The caller merges the lanes' states in a
// fixed tree.
constexpr int kMergeIlp = 4;

template <class Pol, class A, class I>
__device__ __forceinline__ typename Pol::State merge_splits(const Gmem<A>& part, I C, I splits, I c, I me, I lanes) {
    using S = typename Pol::State;
    S acc = Pol::empty();
    for (I s0 = me; s0 < splits; s0 += lanes * kMergeIlp) {
        S got[kMergeIlp];
        BN_UNROLL
        for (int u = 0; u < kMergeIlp; ++u) {
            const I s = s0 + static_cast<I>(u) * lanes;
            got[u] = s < splits ? fetch<Pol>(part, C, splits, s, c) : Pol::empty();
        }
        BN_UNROLL
        for (int u = 0; u < kMergeIlp; ++u) acc = Pol::merge(acc, got[u]);
    }
    return acc;
}

// The nchw skeleton: one channel per block (the block's split k of channel c), its
// threads' states merged, finalised at once when the channel has one split, else
// published, and the channel's last block merges every split and finalises.
template <class Pol, class I, class Finalize>
__device__ __forceinline__ void reduce_channel(const BnParams& p, I c, I k, I splits, typename Pol::State st,
                                               Finalize&& finalize) {
    using A = decltype(Pol::get(st, 0));
    st = Pol::block(st);
    if (splits == 1) {
        if (threadIdx.x == 0) finalize(st);
        return;
    }
    const I C = static_cast<I>(p.c);
    const Gmem<A> part(p.ws_partials);
    if (threadIdx.x == 0) publish<Pol>(part, C, splits, k, c, st);
    if (!arrive_last(p, static_cast<uint64_t>(c), static_cast<unsigned>(splits))) return;
    typename Pol::State acc =
        merge_splits<Pol>(part, C, splits, c, static_cast<I>(threadIdx.x), static_cast<I>(kBlockThreads));
    acc = Pol::block(acc);
    if (threadIdx.x == 0) finalize(acc);
}

// A state's K values at a[o], a[o + 1], ... (an array in shared memory), and back.
template <class Pol, class Arr>
__device__ __forceinline__ void put_state(Arr&& a, int o, const typename Pol::State& s) {
    BN_UNROLL
    for (int q = 0; q < Pol::K; ++q) a[o + q] = Pol::get(s, q);
}

template <class Pol, class Arr>
__device__ __forceinline__ typename Pol::State take_state(Arr&& a, int o) {
    using A = decltype(Pol::get(Pol::empty(), 0));
    A v[3] = {A(0), A(0), A(0)};
    BN_UNROLL
    for (int q = 0; q < Pol::K; ++q) v[q] = a[o + q];
    return Pol::make(v[0], v[1], v[2]);
}

// The rows of a 2-D block (x across channels, y across rows) merged into threadIdx.y ==
// 0, in a fixed tree: V states per thread, K values each, through shared memory.
template <class Pol, int V>
__device__ __forceinline__ void merge_rows(typename Pol::State (&s)[V]) {
    using A = decltype(Pol::get(s[0], 0));
    constexpr int K = Pol::K;
    BN_SHARED(A, sh, kBlockThreads * V * K);
    const int me = threadIdx.y * blockDim.x + threadIdx.x;
    auto put = [&](int who) {
        BN_UNROLL
        for (int j = 0; j < V; ++j) put_state<Pol>(sh, (who * V + j) * K, s[j]);
    };
    put(me);
    __syncthreads();
    for (int stride = blockDim.y / 2; stride > 0; stride >>= 1) {
        if (static_cast<int>(threadIdx.y) < stride) {
            const int other = me + stride * static_cast<int>(blockDim.x);
            BN_UNROLL
            for (int j = 0; j < V; ++j) s[j] = Pol::merge(s[j], take_state<Pol>(sh, (other * V + j) * K));
            put(me);
        }
        __syncthreads();
    }
}

// The nhwc skeleton: a tile of channels per block, V channels per thread (from c0); the
// rows merged, finalised at once with one split, else published per channel, and the
// tile's last block merges every split: threadIdx.y strides over the splits (with ILP),
// then the rows are merged again.
template <class Pol, int V, class I, class Finalize>
__device__ __forceinline__ void reduce_tile(const BnParams& p, I c0, bool active, I tile, I k, I splits,
                                            typename Pol::State (&st)[V], Finalize&& finalize) {
    using A = decltype(Pol::get(st[0], 0));
    merge_rows<Pol, V>(st);
    const bool lead = threadIdx.y == 0 && active;
    if (splits == 1) {
        if (lead) {
            BN_UNROLL
            for (int j = 0; j < V; ++j) finalize(j, st[j]);
        }
        return;
    }
    const I C = static_cast<I>(p.c);
    const Gmem<A> part(p.ws_partials);
    if (lead) {
        BN_UNROLL
        for (int j = 0; j < V; ++j) publish<Pol>(part, C, splits, k, c0 + j, st[j]);
    }
    if (!arrive_last(p, static_cast<uint64_t>(tile), static_cast<unsigned>(splits))) return;
    typename Pol::State acc[V];
    BN_UNROLL
    for (int j = 0; j < V; ++j) {
        acc[j] = active ? merge_splits<Pol>(part, C, splits, c0 + j, static_cast<I>(threadIdx.y),
                                            static_cast<I>(blockDim.y))
                        : Pol::empty();
    }
    merge_rows<Pol, V>(acc);
    if (lead) {
        BN_UNROLL
        for (int j = 0; j < V; ++j) finalize(j, acc[j]);
    }
}

// ---------------------------------------------------------------------------------------
// Vectors of one channel (nchw with S a multiple of V): vector j of channel c is at
// element ((j / vpr) * C + c) * S + (j % vpr) * V, vpr = S / V vectors per plane. A
// Walk follows one thread's vector through a block's range in steps of `step` vectors
// without dividing: it keeps the plane and the offset in it.

template <class I>
struct Walk {
    I elem;   // element index of the vector
    I off;    // its offset in its plane, in vectors
    __device__ __forceinline__ Walk() : elem(0), off(0) {}
    __device__ __forceinline__ Walk(I j0, I c, I C, I S, I vpr, int V) {
        const I n = j0 / vpr;
        off = j0 - n * vpr;
        elem = (n * C + c) * S + off * static_cast<I>(V);
    }
    // Advances by dq planes and dr vectors (dr < vpr): `delem` = dq * C * S + dr * V
    // elements, and `wrap` = C * S - S more when the offset passes the plane's end.
    __device__ __forceinline__ void advance(I dr, I delem, I wrap, I vpr) {
        off += dr;
        elem += delem;
        if (off >= vpr) {
            off -= vpr;
            elem += wrap;
        }
    }
};

}  // namespace bn

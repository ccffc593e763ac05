// ilp.cuh: the streaming rewrite of the baseline's stages, in two widths: the "ilp"
// family (ilp.cu: 16-byte vectors) and the "flat" family (flat.cu: one value per lane,
// for the planes and channel counts vectors cannot take).
//
// What it changes against the baseline (batchnorm.cu), each for a finding of the static
// report (kernels/NOTES.md):
//   * 64 bytes of independent loads in flight per thread in every streaming loop: U loads
//     per input into registers before any arithmetic (ilp: U = 4 vectors with one input,
//     2 with x and dy; flat: 64 / sizeof(T) values, half with two inputs), through the
//     read-only path (Stream in stream.cuh), compiled for a register budget that keeps
//     them together (BN_KERNEL_RESIDENT);
//   * no division per element: the statistics merge U * V values at a time
//     (welford_group: a two-pass group in registers, one reciprocal per group);
//   * one entry point per (family, stage, layout, types, index width, mode): no runtime
//     variant dispatch, so each kernel is compiled for exactly the case it runs;
//   * the nhwc last block merges its splits in parallel over threadIdx.y with its loads
//     overlapped (merge_splits), not one dependent load after another;
//   * L2 policies (compute_90 build): the first pass of a training forward or backward
//     reads with evict_last, the second with evict_first, and the second walks the blocks
//     in reverse, so that it starts on the data the first pass read last (still in L2).
//
// Layouts and what they need (the plan guarantees it, src/launch.rs), V the width:
//   nchw   channels as sequences of V-value units: S a multiple of V and (V > 1) every
//          tensor 16-byte aligned, so no vector crosses a plane. A block takes `chunk`
//          units of one channel (grid.x = C * splits, blockIdx.x = c * splits + k);
//          thread t takes units j0 + t + 256 u + 256 U i, located by a Walk (no
//          division). With V = 1 (flat) any S works and every lane is busy: a plane of
//          49 values is 49 consecutive lanes, the next plane the next ones.
//   nhwc   C a multiple of V and (V > 1) every tensor aligned: tile_x threads across
//          channels (V each) by 256 / tile_x threads across rows, grid (tiles, splits),
//          `chunk` rows per split; each thread takes U rows per step. With V = 1 any C.
//
// Assumptions otherwise as in batchnorm.cu (M >= 1, C >= 1, counters zero on entry,
// at most 2^24 values per split).

#include "stream.cuh"

namespace bn {

// Widths: V values per unit and U units per step (`inputs` tensors streamed).
struct VectorWidth {
    template <class T>
    static constexpr int vec() { return VecWidth<T>::value; }
    template <class T>
    static constexpr int steps(int inputs) { return inputs == 1 ? 4 : 2; }
};
struct ScalarWidth {
    template <class T>
    static constexpr int vec() { return 1; }
    template <class T>
    static constexpr int steps(int inputs) { return 64 / static_cast<int>(sizeof(T)) / inputs; }
};

// The block's (channel, split) in nchw; reversed for a second pass.
template <class I>
struct IlpNchwBlock {
    I c, k, splits;
    __device__ __forceinline__ IlpNchwBlock(const BnParams& p, bool reverse) {
        splits = static_cast<I>(p.splits);
        const I b = reverse ? static_cast<I>(gridDim.x) - 1 - static_cast<I>(blockIdx.x) : static_cast<I>(blockIdx.x);
        c = b / splits;
        k = b - c * splits;
    }
};

// One thread's walk over its block's units of one channel, U units per step: slot u is
// unit j + 256 u of the channel. With few slots (ilp: 4 or 2) each keeps its own walk
// state; with many (flat: 8 to 32) one walk is kept and the slots' positions are chained
// from it, 256 units at a time, each step (registers for the loads, not for U walks).
template <class I, int U, int V>
struct IlpNchwWalk {
    using Index = I;
    static constexpr int kUnits = U;
    static constexpr bool kChain = U > 4;
    static constexpr int kWalks = kChain ? 1 : U;
    Walk<I> w[kWalks];
    I j, end, dr, delem, dr1, delem1, wrap, vpr;
    __device__ __forceinline__ IlpNchwWalk(const BnParams& p, I c, I k) {
        const I C = static_cast<I>(p.c);
        const I S = static_cast<I>(p.s);
        vpr = S / V;
        const I chunk = static_cast<I>(p.chunk);
        const I total = static_cast<I>(p.n) * vpr;
        const I j0 = k * chunk;
        end = imin(total, j0 + chunk);
        const I step = static_cast<I>(kBlockThreads) * U;
        const I dq = step / vpr;
        dr = step - dq * vpr;
        delem = dq * C * S + dr * static_cast<I>(V);
        const I dq1 = static_cast<I>(kBlockThreads) / vpr;
        dr1 = static_cast<I>(kBlockThreads) - dq1 * vpr;
        delem1 = dq1 * C * S + dr1 * static_cast<I>(V);
        wrap = C * S - S;
        j = j0 + static_cast<I>(threadIdx.x);
        BN_UNROLL
        for (int u = 0; u < kWalks; ++u) {
            w[u] = Walk<I>(j + static_cast<I>(u) * kBlockThreads, c, C, S, vpr, V);
        }
    }
    // Whether all U units of this step lie in the block's range.
    __device__ __forceinline__ bool full() const { return j + static_cast<I>((U - 1) * kBlockThreads) < end; }
    __device__ __forceinline__ bool has(int u) const { return j + static_cast<I>(u * kBlockThreads) < end; }
    // The element indices of this step's U units.
    __device__ __forceinline__ void elems(I (&e)[U]) const {
        if constexpr (kChain) {
            Walk<I> t = w[0];
            e[0] = t.elem;
            BN_UNROLL
            for (int u = 1; u < U; ++u) {
                t.advance(dr1, delem1, wrap, vpr);
                e[u] = t.elem;
            }
        } else {
            BN_UNROLL
            for (int u = 0; u < U; ++u) e[u] = w[u].elem;
        }
    }
    __device__ __forceinline__ void advance() {
        j += static_cast<I>(kBlockThreads) * U;
        BN_UNROLL
        for (int u = 0; u < kWalks; ++u) w[u].advance(dr, delem, wrap, vpr);
    }
};

// Calls full(e[U]) for each step whose U vectors all lie in the block's range (e: their
// element indices), then one(e) for each remaining vector.
template <int U, int V, class I, class Full, class One>
__device__ __forceinline__ void ilp_nchw_each(IlpNchwWalk<I, U, V>& walk, Full&& full, One&& one) {
    for (; walk.full(); walk.advance()) {
        I e[U];
        walk.elems(e);
        full(e);
    }
    I e[U];
    walk.elems(e);
    BN_UNROLL
    for (int u = 0; u < U; ++u) {
        if (walk.has(u)) one(e[u]);
    }
}

template <class T, class P, class A, class I, class W>
struct IlpFwdStatsNchw {
    static constexpr int V = W::template vec<T>();
    static constexpr int U = W::template steps<T>(1);
    __device__ static void run(const BnParams& p) {
        const IlpNchwBlock<I> b(p, false);
        const I S = static_cast<I>(p.s);
        const Stream<T, L2Keep::Last> x(p.x);
        const A shift = shift_of(to_acc<A>(x.one(b.c * S)));
        IlpNchwWalk<I, U, V> walk(p, b.c, b.k);
        Welford<A> w = welford_empty<A>();
        ilp_nchw_each(
            walk,
            [&](const I (&e)[U]) {
                A v[U * V];
                BN_UNROLL
                for (int u = 0; u < U; ++u) {
                    A part[V];
                    load_acc<V>(x, e[u], part);
                    BN_UNROLL
                    for (int j = 0; j < V; ++j) v[u * V + j] = part[j];
                }
                BN_UNROLL
                for (int i = 0; i < U * V; ++i) v[i] -= shift;
                welford_group<A, U * V>(w, v);
            },
            [&](I e) {
                A v[V];
                load_acc<V>(x, e, v);
                BN_UNROLL
                for (int j = 0; j < V; ++j) v[j] -= shift;
                welford_group<A, V>(w, v);
            });
        reduce_channel<StatsPolicy<A>>(p, b.c, b.k, b.splits, w,
                                       [&](const Welford<A>& s) { finalize_stats<P, A>(p, b.c, s, shift); });
    }
};

template <class T, class P, class A, class I, class W>
struct IlpFwdNormNchw {
    static constexpr int V = W::template vec<T>();
    static constexpr int U = W::template steps<T>(1);
    __device__ static void run(const BnParams& p) {
        const bool second = (p.flags & BN_F_BATCH_STATS) != 0;
        const IlpNchwBlock<I> b(p, second);
        const NormCoeffs<A> k = norm_coeffs<P, A>(p, b.c);
        if ((p.flags & BN_F_UPDATE_RUNNING) && b.k == 0 && threadIdx.x == 0) commit_running<P, A>(p, b.c);
        const Stream<T, L2Keep::First> x(p.x);
        const Gmem<T> y(p.y);
        IlpNchwWalk<I, U, V> walk(p, b.c, b.k);
        ilp_nchw_each(
            walk,
            [&](const I (&e)[U]) {
                A v[U][V];
                BN_UNROLL
                for (int u = 0; u < U; ++u) load_acc<V>(x, e[u], v[u]);
                BN_UNROLL
                for (int u = 0; u < U; ++u) {
                    BN_UNROLL
                    for (int j = 0; j < V; ++j) v[u][j] = k.apply(v[u][j]);
                    store_acc<V>(y, e[u], v[u]);
                }
            },
            [&](I e) {
                A v[V];
                load_acc<V>(x, e, v);
                BN_UNROLL
                for (int j = 0; j < V; ++j) v[j] = k.apply(v[j]);
                store_acc<V>(y, e, v);
            });
    }
};

template <class T, class P, class A, class I, class W>
struct IlpBwdReduceNchw {
    static constexpr int V = W::template vec<T>();
    static constexpr int U = W::template steps<T>(2);
    __device__ static void run(const BnParams& p) {
        const IlpNchwBlock<I> b(p, false);
        const BwdStats<A> st = bwd_stats<P, A>(p, b.c);
        const Stream<T, L2Keep::Last> x(p.x);
        const Stream<T, L2Keep::Last> dy(p.dy);
        IlpNchwWalk<I, U, V> walk(p, b.c, b.k);
        // one pair of sums per vector slot, so that the adds of a step are independent
        Sum2<A> s[U];
        BN_UNROLL
        for (int u = 0; u < U; ++u) s[u] = Sum2<A>{A(0), A(0)};
        ilp_nchw_each(
            walk,
            [&](const I (&e)[U]) {
                A xv[U][V], gv[U][V];
                BN_UNROLL
                for (int u = 0; u < U; ++u) {
                    load_acc<V>(x, e[u], xv[u]);
                    load_acc<V>(dy, e[u], gv[u]);
                }
                BN_UNROLL
                for (int u = 0; u < U; ++u) {
                    BN_UNROLL
                    for (int j = 0; j < V; ++j) {
                        s[u].a += gv[u][j];
                        s[u].b += gv[u][j] * (xv[u][j] - st.mean);
                    }
                }
            },
            [&](I e) {
                A xv[V], gv[V];
                load_acc<V>(x, e, xv);
                load_acc<V>(dy, e, gv);
                BN_UNROLL
                for (int j = 0; j < V; ++j) {
                    s[0].a += gv[j];
                    s[0].b += gv[j] * (xv[j] - st.mean);
                }
            });
        Sum2<A> total = s[0];
        BN_UNROLL
        for (int u = 1; u < U; ++u) total = SumPolicy<A>::merge(total, s[u]);
        reduce_channel<SumPolicy<A>>(p, b.c, b.k, b.splits, total,
                                     [&](const Sum2<A>& r) { finalize_backward<P, A>(p, b.c, r, st.invstd); });
    }
};

// dx; kTrain: the training formula (reads x), else eval's dy * invstd * w.
template <bool kTrain>
struct IlpDx {
    template <class T, class P, class A, class I, class W>
    struct Nchw {
        static constexpr int V = W::template vec<T>();
        static constexpr int U = W::template steps<T>(kTrain ? 2 : 1);
        __device__ static void run(const BnParams& p) {
            const IlpNchwBlock<I> b(p, kTrain);
            const DxCoeffs<A> k = dx_coeffs<P, A>(p, b.c);
            const Stream<T, L2Keep::First> x(p.x);
            const Stream<T, L2Keep::First> dy(p.dy);
            const Gmem<T> dx(p.dx);
            IlpNchwWalk<I, U, V> walk(p, b.c, b.k);
            auto apply = [&](A (&g)[V], const A (&xv)[V]) {
                BN_UNROLL
                for (int j = 0; j < V; ++j) g[j] = kTrain ? k.apply(g[j], xv[j]) : k.apply_eval(g[j]);
            };
            ilp_nchw_each(
                walk,
                [&](const I (&e)[U]) {
                    A gv[U][V], xv[U][V];
                    BN_UNROLL
                    for (int u = 0; u < U; ++u) {
                        load_acc<V>(dy, e[u], gv[u]);
                        if constexpr (kTrain) load_acc<V>(x, e[u], xv[u]);
                    }
                    BN_UNROLL
                    for (int u = 0; u < U; ++u) {
                        apply(gv[u], xv[u]);
                        store_acc<V>(dx, e[u], gv[u]);
                    }
                },
                [&](I e) {
                    A gv[V], xv[V];
                    load_acc<V>(dy, e, gv);
                    if constexpr (kTrain) load_acc<V>(x, e, xv);
                    apply(gv, xv);
                    store_acc<V>(dx, e, gv);
                });
        }
    };

    template <class T, class P, class A, class I, class W>
    struct Nhwc;
};

// ---------------------------------------------------------------------------------------
// nhwc

template <class I, int V>
struct IlpNhwcThread {
    I c0, tile, k, splits;
    bool active;
    __device__ __forceinline__ IlpNhwcThread(const BnParams& p, bool reverse) {
        tile = reverse ? static_cast<I>(gridDim.x) - 1 - static_cast<I>(blockIdx.x) : static_cast<I>(blockIdx.x);
        k = reverse ? static_cast<I>(gridDim.y) - 1 - static_cast<I>(blockIdx.y) : static_cast<I>(blockIdx.y);
        splits = static_cast<I>(p.splits);
        c0 = (tile * static_cast<I>(blockDim.x) + static_cast<I>(threadIdx.x)) * V;
        active = c0 < static_cast<I>(p.c);
    }
};

// Calls full(e[U]) for each step of U rows of split k all in range (e: the element
// indices of (row, c0)), then one(e) for the rows left.
template <int U, class I, class Full, class One>
__device__ __forceinline__ void ilp_nhwc_each(const BnParams& p, I c0, I k, Full&& full, One&& one) {
    const I C = static_cast<I>(p.c);
    const I R = static_cast<I>(p.n) * static_cast<I>(p.s);
    const I chunk = static_cast<I>(p.chunk);
    const I r0 = k * chunk;
    const I r1 = r0 + split_count(k, chunk, R);
    const I ty = static_cast<I>(blockDim.y);
    I r = r0 + static_cast<I>(threadIdx.y);
    for (; r + (U - 1) * ty < r1; r += U * ty) {
        I e[U];
        BN_UNROLL
        for (int u = 0; u < U; ++u) e[u] = (r + static_cast<I>(u) * ty) * C + c0;
        full(e);
    }
    for (; r < r1; r += ty) one(r * C + c0);
}

template <class T, class P, class A, class I, class W>
struct IlpFwdStatsNhwc {
    static constexpr int V = W::template vec<T>();
    static constexpr int U = W::template steps<T>(1);
    __device__ static void run(const BnParams& p) {
        const IlpNhwcThread<I, V> th(p, false);
        const Stream<T, L2Keep::Last> x(p.x);
        A shift[V];
        Welford<A> w[V];
        BN_UNROLL
        for (int j = 0; j < V; ++j) {
            shift[j] = A(0);
            w[j] = welford_empty<A>();
        }
        if (th.active) {
            load_acc<V>(x, th.c0, shift);  // row 0
            BN_UNROLL
            for (int j = 0; j < V; ++j) shift[j] = shift_of(shift[j]);
            A n = A(0);
            ilp_nhwc_each<U>(
                p, th.c0, th.k,
                [&](const I (&e)[U]) {
                    A v[U][V];
                    BN_UNROLL
                    for (int u = 0; u < U; ++u) load_acc<V>(x, e[u], v[u]);
                    // one reciprocal for the V lanes' groups of U rows
                    const A r = A(U) * count_rcp(n + A(U));
                    n += A(U);
                    BN_UNROLL
                    for (int j = 0; j < V; ++j) {
                        A g[U];
                        BN_UNROLL
                        for (int u = 0; u < U; ++u) g[u] = v[u][j] - shift[j];
                        const Welford<A> gs = group_stats<A, U>(g);
                        welford_absorb(w[j], A(U), gs.mean, gs.m2, r);
                    }
                },
                [&](I e) {
                    A v[V];
                    load_acc<V>(x, e, v);
                    const A r = count_rcp(n + A(1));
                    n += A(1);
                    BN_UNROLL
                    for (int j = 0; j < V; ++j) welford_absorb(w[j], A(1), v[j] - shift[j], A(0), r);
                });
        }
        reduce_tile<StatsPolicy<A>, V>(p, th.c0, th.active, th.tile, th.k, th.splits, w,
                                       [&](int j, const Welford<A>& s) {
                                           finalize_stats<P, A>(p, th.c0 + j, s, shift[j]);
                                       });
    }
};

template <class T, class P, class A, class I, class W>
struct IlpFwdNormNhwc {
    static constexpr int V = W::template vec<T>();
    static constexpr int U = W::template steps<T>(1);
    __device__ static void run(const BnParams& p) {
        const IlpNhwcThread<I, V> th(p, (p.flags & BN_F_BATCH_STATS) != 0);
        if (!th.active) return;
        NormCoeffs<A> k[V];
        BN_UNROLL
        for (int j = 0; j < V; ++j) k[j] = norm_coeffs<P, A>(p, th.c0 + j);
        if ((p.flags & BN_F_UPDATE_RUNNING) && th.k == 0 && threadIdx.y == 0) {
            BN_UNROLL
            for (int j = 0; j < V; ++j) commit_running<P, A>(p, th.c0 + j);
        }
        const Stream<T, L2Keep::First> x(p.x);
        const Gmem<T> y(p.y);
        ilp_nhwc_each<U>(
            p, th.c0, th.k,
            [&](const I (&e)[U]) {
                A v[U][V];
                BN_UNROLL
                for (int u = 0; u < U; ++u) load_acc<V>(x, e[u], v[u]);
                BN_UNROLL
                for (int u = 0; u < U; ++u) {
                    BN_UNROLL
                    for (int j = 0; j < V; ++j) v[u][j] = k[j].apply(v[u][j]);
                    store_acc<V>(y, e[u], v[u]);
                }
            },
            [&](I e) {
                A v[V];
                load_acc<V>(x, e, v);
                BN_UNROLL
                for (int j = 0; j < V; ++j) v[j] = k[j].apply(v[j]);
                store_acc<V>(y, e, v);
            });
    }
};

template <class T, class P, class A, class I, class W>
struct IlpBwdReduceNhwc {
    static constexpr int V = W::template vec<T>();
    static constexpr int U = W::template steps<T>(2);
    __device__ static void run(const BnParams& p) {
        const IlpNhwcThread<I, V> th(p, false);
        BwdStats<A> st[V];
        Sum2<A> s[V];
        BN_UNROLL
        for (int j = 0; j < V; ++j) {
            st[j] = BwdStats<A>{A(0), A(0)};
            s[j] = Sum2<A>{A(0), A(0)};
        }
        if (th.active) {
            BN_UNROLL
            for (int j = 0; j < V; ++j) st[j] = bwd_stats<P, A>(p, th.c0 + j);
            const Stream<T, L2Keep::Last> x(p.x);
            const Stream<T, L2Keep::Last> dy(p.dy);
            ilp_nhwc_each<U>(
                p, th.c0, th.k,
                [&](const I (&e)[U]) {
                    A xv[U][V], gv[U][V];
                    BN_UNROLL
                    for (int u = 0; u < U; ++u) {
                        load_acc<V>(x, e[u], xv[u]);
                        load_acc<V>(dy, e[u], gv[u]);
                    }
                    BN_UNROLL
                    for (int j = 0; j < V; ++j) {
                        BN_UNROLL
                        for (int u = 0; u < U; ++u) {
                            s[j].a += gv[u][j];
                            s[j].b += gv[u][j] * (xv[u][j] - st[j].mean);
                        }
                    }
                },
                [&](I e) {
                    A xv[V], gv[V];
                    load_acc<V>(x, e, xv);
                    load_acc<V>(dy, e, gv);
                    BN_UNROLL
                    for (int j = 0; j < V; ++j) {
                        s[j].a += gv[j];
                        s[j].b += gv[j] * (xv[j] - st[j].mean);
                    }
                });
        }
        reduce_tile<SumPolicy<A>, V>(p, th.c0, th.active, th.tile, th.k, th.splits, s,
                                     [&](int j, const Sum2<A>& r) {
                                         finalize_backward<P, A>(p, th.c0 + j, r, st[j].invstd);
                                     });
    }
};

template <bool kTrain>
template <class T, class P, class A, class I, class W>
struct IlpDx<kTrain>::Nhwc {
    static constexpr int V = W::template vec<T>();
    static constexpr int U = W::template steps<T>(kTrain ? 2 : 1);
    __device__ static void run(const BnParams& p) {
        const IlpNhwcThread<I, V> th(p, kTrain);
        if (!th.active) return;
        DxCoeffs<A> k[V];
        BN_UNROLL
        for (int j = 0; j < V; ++j) k[j] = dx_coeffs<P, A>(p, th.c0 + j);
        const Stream<T, L2Keep::First> x(p.x);
        const Stream<T, L2Keep::First> dy(p.dy);
        const Gmem<T> dx(p.dx);
        auto apply = [&](A (&g)[V], const A (&xv)[V]) {
            BN_UNROLL
            for (int j = 0; j < V; ++j) g[j] = kTrain ? k[j].apply(g[j], xv[j]) : k[j].apply_eval(g[j]);
        };
        ilp_nhwc_each<U>(
            p, th.c0, th.k,
            [&](const I (&e)[U]) {
                A gv[U][V], xv[U][V];
                BN_UNROLL
                for (int u = 0; u < U; ++u) {
                    load_acc<V>(dy, e[u], gv[u]);
                    if constexpr (kTrain) load_acc<V>(x, e[u], xv[u]);
                }
                BN_UNROLL
                for (int u = 0; u < U; ++u) {
                    apply(gv[u], xv[u]);
                    store_acc<V>(dx, e[u], gv[u]);
                }
            },
            [&](I e) {
                A gv[V], xv[V];
                load_acc<V>(dy, e, gv);
                if constexpr (kTrain) load_acc<V>(x, e, xv);
                apply(gv, xv);
                store_acc<V>(dx, e, gv);
            });
    }
};

template <template <class, class, class, class, class> class Stage, class W, class T, class P, class A, class I>
__device__ __forceinline__ void run_ilp(const BnParams& p) {
    Stage<T, P, A, I, W>::run(p);
}

// Blocks per multiprocessor an ilp kernel is compiled for (BN_KERNEL_RESIDENT): 4 (64
// registers at most), which keeps 64 bytes ahead per thread and 64 KB or more in flight
// per SM; 3 (85 registers) where 64 would spill, as the static report shows: the nhwc
// statistics of 2-byte inputs (8 channels' Welford states, shifts and 4 rows of values per
// thread), the f64 statistics, and the nhwc normalisation of f16 / bf16 with 2-byte
// parameters; and the nchw statistics with 64-bit indices.
enum class IlpStage { Stats, Norm, Other };
template <IlpStage S, bool kNhwc, class T, class P, class I>
constexpr int ilp_resident() {
    const bool two = sizeof(T) == 2;
    if (S == IlpStage::Stats && (sizeof(T) == 8 || (kNhwc && two))) return 3;
    // 64-bit indices: the nchw statistics' walks need the registers too
    if (S == IlpStage::Stats && sizeof(I) == 8) return 3;
    if (S == IlpStage::Norm && kNhwc && two && sizeof(P) == 2) return 3;
    return 4;
}

// The flat family's: one value per lane means 8 to 32 loads per thread, so 3 blocks (85
// registers), and 2 (128) for 2-byte inputs in nchw (32 loads and their element indices;
// the static report shows fewer bytes ahead at 3). The nhwc statistics keep 4.
template <IlpStage S, bool kNhwc, class T, class P>
constexpr int flat_resident() {
    if (!kNhwc && sizeof(T) == 2 && S != IlpStage::Stats) return 2;
    return 3;
}

}  // namespace bn


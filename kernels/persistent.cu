// persistent.cu: the "persistent" kernel family: the training forward and the training
// backward each in one cooperative launch, for tensors whose channel slabs fit on chip
// across the whole grid (registers, then shared memory), so that x (and dy) are read
// from memory once.
//
//   bn_persistent_fwd_train_nchw_<tag>[_i64]: statistics, running-statistics update,
//       saved statistics and y. Each thread keeps its units of its block's slab as raw
//       16-byte vectors: the first step of R = 8 in registers (32 registers whatever T),
//       each further step of R in dynamic shared memory (32 KB a step per block). Welford
//       over them (one reciprocal per vector), the block's state published as the split's
//       partial, a grid-wide barrier, then every block of the channel merges all its
//       splits in the same fixed order (the same bits in each), normalises what it kept
//       and writes y; split 0 writes save_mean / save_invstd and the running statistics.
//   bn_persistent_bwd_train_nchw_<tag>[_i64]: sum_dy and dotp from x and dy kept the
//       same way (R = 4 vectors of each a step: 32 KB of shared memory a further step),
//       published, barrier, merged as above, dx from what was kept; split 0 writes
//       grad_weight and grad_bias.
//
// Layout and what it needs (the plan guarantees it, src/launch.rs plan_persistent_stage):
// nchw, S a multiple of the vector width V, every tensor 16-byte aligned, a block's
// split at most 256 R x steps vectors with (steps - 1) x 32 KB of dynamic shared memory
// (kSlabStepBytes), and the grid (C * splits blocks) no larger than the device keeps
// resident with that much (the launch is cooperative: the driver refuses it otherwise).
// One pass over memory: 2 E b bytes for the forward, 3 E b for the backward, the floors.
// Assumptions otherwise as in batchnorm.cu (M >= 1, C >= 1).

#include "ilp.cuh"

#if !defined(BN_EMULATION)
#include <cooperative_groups.h>
#endif

namespace bn {

// Every block of the grid waits here until all have arrived; writes before it are
// visible after it (a cooperative launch's grid barrier).
__device__ __forceinline__ void grid_barrier() {
#if defined(BN_EMULATION)
    bn_emu::grid_sync();
#else
    cooperative_groups::this_grid().sync();
#endif
}

// What thread 0 holds after a block reduction, for every thread of the block.
template <class A>
__device__ __forceinline__ Welford<A> broadcast(const Welford<A>& w) {
    BN_SHARED(A, s_state, 3);
    if (threadIdx.x == 0) {
        s_state[0] = w.n;
        s_state[1] = w.mean;
        s_state[2] = w.m2;
    }
    __syncthreads();
    const Welford<A> out{s_state[0], s_state[1], s_state[2]};
    __syncthreads();
    return out;
}

template <class A>
__device__ __forceinline__ Sum2<A> broadcast(const Sum2<A>& s) {
    BN_SHARED(A, s_sums, 2);
    if (threadIdx.x == 0) {
        s_sums[0] = s.a;
        s_sums[1] = s.b;
    }
    __syncthreads();
    const Sum2<A> out{s_sums[0], s_sums[1]};
    __syncthreads();
    return out;
}

// The channel's merged state in every thread of every block of the channel: the block's
// own when the channel has one split, else every split's partial merged in a fixed order
// after the grid barrier. Every block calls it (the barrier is grid-wide).
template <class Pol, class I>
__device__ __forceinline__ typename Pol::State merge_channel(const BnParams& p, I c, I k, I splits,
                                                             typename Pol::State st) {
    using A = decltype(Pol::get(st, 0));
    st = Pol::block(st);
    if (splits == 1) return broadcast(st);
    const I C = static_cast<I>(p.c);
    const Gmem<A> part(p.ws_partials);
    if (threadIdx.x == 0) publish<Pol>(part, C, splits, k, c, st);
    grid_barrier();
    typename Pol::State acc =
        merge_splits<Pol>(part, C, splits, c, static_cast<I>(threadIdx.x), static_cast<I>(kBlockThreads));
    return broadcast(Pol::block(acc));
}

// Bytes of shared memory that one further step of a block's slab takes (256 threads x
// R vectors of 16 bytes, R x 2 in the backward: 32 KB both), src/launch.rs
// PERSISTENT_STEP_BYTES.
constexpr int kSlabStepBytes = 32 * 1024;

// A thread's units of its block's slab, as raw 16-byte packs.
template <class T, int R>
struct Slab {
    static constexpr int V = VecWidth<T>::value;
    Pack<T, V> v[R];
    template <class I>
    __device__ __forceinline__ void load(const Stream<T, L2Keep::First>& s, const IlpNchwWalk<I, R, V>& walk,
                                         const I (&e)[R]) {
        BN_UNROLL
        for (int u = 0; u < R; ++u) {
            if (walk.has(u)) v[u] = s.template vec<V>(e[u]);
        }
    }
    // A step that lies in the block's range (every step but a block's last): all R loads
    // at once, none predicated.
    template <class I>
    __device__ __forceinline__ void load_full(const Stream<T, L2Keep::First>& s, const I (&e)[R]) {
        BN_UNROLL
        for (int u = 0; u < R; ++u) v[u] = s.template vec<V>(e[u]);
    }
    template <class A>
    __device__ __forceinline__ void get(int u, A (&out)[V]) const {
        BN_UNROLL
        for (int j = 0; j < V; ++j) out[j] = to_acc<A>(v[u].v[j]);
    }
    // Slot `slot` of this thread's packs in shared memory (the step's R packs of each of
    // `ways` tensors, thread-minor: conflict-free 16-byte accesses).
    template <class Smem>
    __device__ __forceinline__ void put(const Smem& smem, int slot, int ways, int way, int u) const {
        smem[((slot * R + u) * ways + way) * kBlockThreads + static_cast<int>(threadIdx.x)] = v[u];
    }
    template <class Smem>
    __device__ __forceinline__ void take(const Smem& smem, int slot, int ways, int way, int u) {
        v[u] = smem[((slot * R + u) * ways + way) * kBlockThreads + static_cast<int>(threadIdx.x)];
    }
};

// Walks a thread's later steps of its block's slab (shared memory, slot = step - 1),
// after step 0 (registers) at `walk` as made, while the block's range lasts.
template <class I, int R, int V, class Later>
__device__ __forceinline__ void each_later_step(IlpNchwWalk<I, R, V> walk, Later&& later) {
    int slot = 0;
    for (walk.advance(); walk.has(0); walk.advance(), ++slot) {
        I e[R];
        walk.elems(e);
        later(walk, e, slot);
    }
}

template <class T, class P, class A, class I>
struct PersistentFwd {
    static constexpr int V = VecWidth<T>::value;
    static constexpr int R = 8;
    static_assert(kBlockThreads * R * 16 == kSlabStepBytes, "a step of slab is PERSISTENT_STEP_BYTES");
    __device__ static void run(const BnParams& p) {
        const IlpNchwBlock<I> b(p, false);
        const I S = static_cast<I>(p.s);
        const Stream<T, L2Keep::First> x(p.x);
        const A shift = shift_of(to_acc<A>(x.one(b.c * S)));
        const IlpNchwWalk<I, R, V> walk(p, b.c, b.k);
        using Packed = Pack<T, V>;
        BN_DYNAMIC_SHARED(Packed, s_slab);
        Slab<T, R> slab;
        Welford<A> w = welford_empty<A>();
        const auto stats = [&](const IlpNchwWalk<I, R, V>& at, const Slab<T, R>& from) {
            BN_UNROLL
            for (int u = 0; u < R; ++u) {
                if (!at.has(u)) continue;
                A v[V];
                from.get(u, v);
                BN_UNROLL
                for (int j = 0; j < V; ++j) v[j] -= shift;
                welford_group<A, V>(w, v);
            }
        };
        // The later steps first, through a second register set into shared memory, so that
        // the first step's registers are loaded last and the two sets are never live
        // together.
        each_later_step(walk, [&](const IlpNchwWalk<I, R, V>& at, const I (&at_e)[R], int slot) {
            // Stored before any arithmetic, so that the loads issue together.
            Slab<T, R> t;
            if (at.full()) {
                t.load_full(x, at_e);
                BN_UNROLL
                for (int u = 0; u < R; ++u) t.put(s_slab, slot, 1, 0, u);
            } else {
                t.load(x, at, at_e);
                BN_UNROLL
                for (int u = 0; u < R; ++u) {
                    if (at.has(u)) t.put(s_slab, slot, 1, 0, u);
                }
            }
            stats(at, t);
        });
        I e[R];
        walk.elems(e);
        slab.load(x, walk, e);
        stats(walk, slab);
        const Welford<A> total = merge_channel<StatsPolicy<A>>(p, b.c, b.k, b.splits, w);
        const A var = total.m2 / total.n;
        const A invstd = acc_rsqrt(var + static_cast<A>(p.eps));
        if (b.k == 0 && threadIdx.x == 0) {
            const A mean = shift + total.mean;
            if (p.save_mean) Gmem<A>(p.save_mean).st(b.c, mean);
            if (p.save_invstd) Gmem<A>(p.save_invstd).st(b.c, invstd);
            if (p.flags & BN_F_UPDATE_RUNNING) {
                const A momentum = static_cast<A>(p.momentum);
                const Gmem<P> rm(p.running_mean);
                const Gmem<P> rv(p.running_var);
                const A unbiased = var * static_cast<A>(p.bessel);
                rm.st(b.c, from_acc<P>(mean * momentum + (A(1) - momentum) * to_acc<A>(rm.ld(b.c))));
                rv.st(b.c, from_acc<P>(unbiased * momentum + (A(1) - momentum) * to_acc<A>(rv.ld(b.c))));
            }
        }
        NormCoeffs<A> k;
        k.shift = shift;
        k.delta = total.mean;
        k.scale = invstd * param_or<P, A>(p.weight, b.c, A(1));
        k.bias = param_or<P, A>(p.bias, b.c, A(0));
        const Gmem<T> y(p.y);
        const auto normalise = [&](const IlpNchwWalk<I, R, V>& at, const I (&at_e)[R], const Slab<T, R>& from) {
            BN_UNROLL
            for (int u = 0; u < R; ++u) {
                if (!at.has(u)) continue;
                A v[V];
                from.get(u, v);
                BN_UNROLL
                for (int j = 0; j < V; ++j) v[j] = k.apply(v[j]);
                store_acc<V>(y, at_e[u], v);
            }
        };
        normalise(walk, e, slab);
        each_later_step(walk, [&](const IlpNchwWalk<I, R, V>& at, const I (&at_e)[R], int slot) {
            Slab<T, R> t;
            BN_UNROLL
            for (int u = 0; u < R; ++u) {
                if (at.has(u)) t.take(s_slab, slot, 1, 0, u);
            }
            normalise(at, at_e, t);
        });
    }
};

template <class T, class P, class A, class I>
struct PersistentBwd {
    static constexpr int V = VecWidth<T>::value;
    static constexpr int R = 4;
    static_assert(kBlockThreads * R * 2 * 16 == kSlabStepBytes, "a step of slab is PERSISTENT_STEP_BYTES");
    __device__ static void run(const BnParams& p) {
        const IlpNchwBlock<I> b(p, false);
        const BwdStats<A> st = bwd_stats<P, A>(p, b.c);
        const Stream<T, L2Keep::First> x(p.x);
        const Stream<T, L2Keep::First> dy(p.dy);
        const IlpNchwWalk<I, R, V> walk(p, b.c, b.k);
        using Packed = Pack<T, V>;
        BN_DYNAMIC_SHARED(Packed, s_slab);
        Slab<T, R> xs, gs;
        Sum2<A> s{A(0), A(0)};
        const auto sums = [&](const IlpNchwWalk<I, R, V>& at, const Slab<T, R>& xf, const Slab<T, R>& gf) {
            BN_UNROLL
            for (int u = 0; u < R; ++u) {
                if (!at.has(u)) continue;
                A xv[V], gv[V];
                xf.get(u, xv);
                gf.get(u, gv);
                BN_UNROLL
                for (int j = 0; j < V; ++j) {
                    s.a += gv[j];
                    s.b += gv[j] * (xv[j] - st.mean);
                }
            }
        };
        // As in the forward: the later steps first.
        each_later_step(walk, [&](const IlpNchwWalk<I, R, V>& at, const I (&at_e)[R], int slot) {
            Slab<T, R> tx, tg;
            tx.load(x, at, at_e);
            tg.load(dy, at, at_e);
            BN_UNROLL
            for (int u = 0; u < R; ++u) {
                if (!at.has(u)) continue;
                tx.put(s_slab, slot, 2, 0, u);
                tg.put(s_slab, slot, 2, 1, u);
            }
            sums(at, tx, tg);
        });
        I e[R];
        walk.elems(e);
        xs.load(x, walk, e);
        gs.load(dy, walk, e);
        sums(walk, xs, gs);
        const Sum2<A> total = merge_channel<SumPolicy<A>>(p, b.c, b.k, b.splits, s);
        if (b.k == 0 && threadIdx.x == 0) {
            if (p.grad_bias) Gmem<P>(p.grad_bias).st(b.c, from_acc<P>(total.a));
            if (p.grad_weight) Gmem<P>(p.grad_weight).st(b.c, from_acc<P>(total.b * st.invstd));
        }
        DxCoeffs<A> k;
        const A norm = A(1) / static_cast<A>(p.n * p.s);
        k.mean = st.mean;
        k.grad_scale = st.invstd * param_or<P, A>(p.weight, b.c, A(1));
        k.grad_mean = total.a * norm;
        k.proj = total.b * norm * st.invstd * st.invstd;
        const Gmem<T> dx(p.dx);
        const auto grads = [&](const IlpNchwWalk<I, R, V>& at, const I (&at_e)[R], const Slab<T, R>& xf,
                               const Slab<T, R>& gf) {
            BN_UNROLL
            for (int u = 0; u < R; ++u) {
                if (!at.has(u)) continue;
                A xv[V], gv[V];
                xf.get(u, xv);
                gf.get(u, gv);
                BN_UNROLL
                for (int j = 0; j < V; ++j) gv[j] = k.apply(gv[j], xv[j]);
                store_acc<V>(dx, at_e[u], gv);
            }
        };
        grads(walk, e, xs, gs);
        each_later_step(walk, [&](const IlpNchwWalk<I, R, V>& at, const I (&at_e)[R], int slot) {
            Slab<T, R> tx, tg;
            BN_UNROLL
            for (int u = 0; u < R; ++u) {
                if (!at.has(u)) continue;
                tx.take(s_slab, slot, 2, 0, u);
                tg.take(s_slab, slot, 2, 1, u);
            }
            grads(at, at_e, tx, tg);
        });
    }
};

template <template <class, class, class, class> class Stage, class T, class P, class A, class I>
__device__ __forceinline__ void run_persistent(const BnParams& p) {
    Stage<T, P, A, I>::run(p);
}

}  // namespace bn

// Entry points of one (input, parameter, accumulator) triple and index width. The slab's
// registers are the point: compiled for 2 resident blocks (128 registers), so that
// nothing spills.
#define BN_PERSISTENT_INDEX(tag, T, P, A, I, suffix)                                                     \
    BN_KERNEL_RESIDENT(bn_persistent_fwd_train_nchw_##tag##suffix, 2,                                    \
                       bn::run_persistent<bn::PersistentFwd, T, P, A, I>);                               \
    BN_KERNEL_RESIDENT(bn_persistent_bwd_train_nchw_##tag##suffix, 2,                                    \
                       bn::run_persistent<bn::PersistentBwd, T, P, A, I>)

#define BN_PERSISTENT_ENTRIES(tag, T, P, A)             \
    BN_PERSISTENT_INDEX(tag, T, P, A, int32_t, /*32*/); \
    BN_PERSISTENT_INDEX(tag, T, P, A, int64_t, _i64)

BN_PERSISTENT_ENTRIES(f32, float, float, float);
BN_PERSISTENT_ENTRIES(f64, double, double, double);
BN_PERSISTENT_ENTRIES(f16, __half, __half, float);
BN_PERSISTENT_ENTRIES(bf16, __nv_bfloat16, __nv_bfloat16, float);
BN_PERSISTENT_ENTRIES(f16_f32, __half, float, float);
BN_PERSISTENT_ENTRIES(bf16_f32, __nv_bfloat16, float, float);

// persistent.cu: the "persistent" kernel family: the training forward and the training
// backward each in one cooperative launch, for tensors whose channel slabs fit on chip
// across the whole grid (registers, then shared memory), so that x (and dy) are read
// from memory once.
//
//   bn_persistent_fwd_train_{nchw,nhwc}_<tag>[_i64]: statistics, running-statistics
//       update, saved statistics and y. Each thread keeps its units of its block's slab
//       as raw 16-byte vectors: the first step of R = 8 in registers (32 registers
//       whatever T), each further step of R in dynamic shared memory (32 KB a step per
//       block). Welford over them (one reciprocal per vector in nchw, two per step of R
//       rows in nhwc), the block's state published as the split's partial, a grid-wide
//       barrier, then the splits merged in a fixed order (nchw: every block of the
//       channel merges all of them, the same bits in each; nhwc: merge_tile, each
//       channel merged once and read back after a second barrier), what it kept
//       normalised and written as y; split 0 writes save_mean / save_invstd and the
//       running statistics.
//   bn_persistent_bwd_train_{nchw,nhwc}_<tag>[_i64]: sum_dy and dotp from x and dy kept
//       the same way (R = 4 vectors of each a step: 32 KB of shared memory a further
//       step), published, barrier, merged as above, dx from what was kept; split 0 writes
//       grad_weight and grad_bias.
//
// One body per stage (PersistentFwd, PersistentBwd); what differs by layout is in a
// channel policy (FwdNchw / FwdNhwc, BwdNchw / BwdNhwc): where a thread's units lie
// (its Walk), which channels they hold, and how the block's states are merged.
//   nchw: one channel per block (split k of channel c: grid.x = C * splits); a unit is V
//         values of it, located by an IlpNchwWalk; the block merges its threads' states.
//   nhwc: a tile of tile_x * V channels per block (grid (tiles, splits), block (tile_x,
//         256 / tile_x)), V channels per thread from c0; a unit is one row's V channels,
//         rows threadIdx.y + blockDim.y u of the split a step; merge_tile merges the
//         block's rows per channel and the channel's splits, and every row takes the
//         result.
//
// Layout and what it needs (the plan guarantees it, src/launch.rs plan_persistent_stage):
// S (nchw) or C (nhwc) a multiple of the vector width V, every tensor 16-byte aligned, a
// block's split at most `steps` steps of 256 R vectors with (steps - 1) x 32 KB of dynamic
// shared memory (kSlabStepBytes), and the grid no larger than the device keeps resident
// with that much (the launch is cooperative: the driver refuses it otherwise). One pass
// over memory: 2 E b bytes for the forward, 3 E b for the backward, the floors.
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
template <class Pol>
__device__ __forceinline__ typename Pol::State broadcast(const typename Pol::State& st) {
    using A = decltype(Pol::get(st, 0));
    BN_SHARED(A, s_state, Pol::K);
    if (threadIdx.x == 0) put_state<Pol>(s_state, 0, st);
    __syncthreads();
    const typename Pol::State out = take_state<Pol>(s_state, 0);
    __syncthreads();
    return out;
}

// The channel's merged state in every thread of every block of the channel (nchw): the
// block's own when the channel has one split, else every split's partial merged in a
// fixed order after the grid barrier. Every block calls it (the barrier is grid-wide).
template <class Pol, class I>
__device__ __forceinline__ typename Pol::State merge_channel(const BnParams& p, I c, I k, I splits,
                                                             typename Pol::State st) {
    using A = decltype(Pol::get(st, 0));
    st = Pol::block(st);
    if (splits == 1) return broadcast<Pol>(st);
    const I C = static_cast<I>(p.c);
    const Gmem<A> part(p.ws_partials);
    if (threadIdx.x == 0) publish<Pol>(part, C, splits, k, c, st);
    grid_barrier();
    typename Pol::State acc =
        merge_splits<Pol>(part, C, splits, c, static_cast<I>(threadIdx.x), static_cast<I>(kBlockThreads));
    return broadcast<Pol>(Pol::block(acc));
}

// A state shuffled down `offset` lanes.
template <class Pol>
__device__ __forceinline__ typename Pol::State shfl_down_state(const typename Pol::State& s, int offset) {
    using A = decltype(Pol::get(s, 0));
    A v[3] = {A(0), A(0), A(0)};
    BN_UNROLL
    for (int q = 0; q < Pol::K; ++q) v[q] = __shfl_down_sync(kFullMask, Pol::get(s, q), offset);
    return Pol::make(v[0], v[1], v[2]);
}

// The same for a tile of channels (nhwc), V per thread, every thread ending with its
// channels' merged states.
//
// The block's rows: each thread's V states go to shared memory, then each channel of the
// tile is merged by a group of `lanes` threads of one warp, each lane taking `per_lane`
// rows in order and the group's tree (shuffles) the lanes: one channel a thread, so that
// the merges do not hold V channels' temporaries beside the slab's registers (they
// spilled when each thread merged its V channels over the rows).
//
// The splits: every block merging every split of all its tile's channels would move
// splits^2 x C partials through L2 (a tile holds up to 256 channels, a grid hundreds of
// splits), so each channel is merged once: the groups publish the block's partials; after
// the barrier the tile's blocks share out its channels, a warp a channel, each merging all
// the channel's splits in a fixed order (merge_splits over the warp's lanes, then the
// warp's tree) and writing the total over split 0's partial (the only reader of a
// channel's partials is its warp); after a second barrier every thread reads its
// channels' totals. One split: the block's merge, through shared memory.
template <class Pol, int V, class I>
__device__ __forceinline__ void merge_tile(const BnParams& p, const IlpNhwcThread<I, V>& th,
                                           typename Pol::State (&st)[V]) {
    using A = decltype(Pol::get(st[0], 0));
    using S = typename Pol::State;
    constexpr int K = Pol::K;
    BN_SHARED(A, s_rows, kBlockThreads * V * K);
    BN_SHARED(A, s_total, kBlockThreads * K);
    const int tx = static_cast<int>(blockDim.x);
    const int me = static_cast<int>(threadIdx.y) * tx + static_cast<int>(threadIdx.x);
    BN_UNROLL
    for (int j = 0; j < V; ++j) put_state<Pol>(s_rows, (me * V + j) * K, st[j]);
    __syncthreads();
    // the tile's channels (inactive ones included: empty states), tx V <= 256
    const int channels = tx * V;
    const int lanes = imin(32, kBlockThreads / channels);
    const int per_lane = static_cast<int>(blockDim.y) / lanes;
    const int i = me / lanes;
    const int lane = me - i * lanes;
    S acc = Pol::empty();
    if (i < channels) {
        const int x = i / V;
        const int j = i - x * V;
        for (int y = lane * per_lane; y < (lane + 1) * per_lane; ++y) {
            acc = Pol::merge(acc, take_state<Pol>(s_rows, ((y * tx + x) * V + j) * K));
        }
    }
    for (int offset = lanes / 2; offset > 0; offset >>= 1) acc = Pol::merge(acc, shfl_down_state<Pol>(acc, offset));
    const I C = static_cast<I>(p.c);
    const I splits = th.splits;
    const I c = th.tile * static_cast<I>(channels) + static_cast<I>(i);
    const bool owner = lane == 0 && i < channels && c < C;
    if (splits == 1) {
        if (owner) put_state<Pol>(s_total, i * K, acc);
        __syncthreads();
        BN_UNROLL
        for (int j = 0; j < V; ++j) {
            const int o = (static_cast<int>(threadIdx.x) * V + j) * K;
            st[j] = th.active ? take_state<Pol>(s_total, o) : Pol::empty();
        }
        return;
    }
    const Gmem<A> part(p.ws_partials);
    if (owner) publish<Pol>(part, C, splits, th.k, c, acc);
    grid_barrier();
    const I per_block = (static_cast<I>(channels) + splits - 1) / splits;
    const I first = th.tile * static_cast<I>(channels) + th.k * per_block;
    const I last = imin(imin(first + per_block, (th.tile + 1) * static_cast<I>(channels)), C);
    const I warp_lane = static_cast<I>(me & 31);
    for (I ch = first + static_cast<I>(me >> 5); ch < last; ch += static_cast<I>(kWarps)) {
        const S total = Pol::warp(merge_splits<Pol>(part, C, splits, ch, warp_lane, I(32)));
        if (warp_lane == 0) publish<Pol>(part, C, splits, I(0), ch, total);
    }
    grid_barrier();
    BN_UNROLL
    for (int j = 0; j < V; ++j) st[j] = th.active ? fetch<Pol>(part, C, splits, I(0), th.c0 + j) : Pol::empty();
}

// Bytes of shared memory that one further step of a block's slab takes (256 threads x
// R vectors of 16 bytes, R x 2 in the backward: 32 KB both), src/launch.rs
// PERSISTENT_STEP_BYTES.
constexpr int kSlabStepBytes = 32 * 1024;

// One thread's walk over its split's rows in nhwc, R rows a step (the IlpNchwWalk
// interface): unit u of a step is row j + blockDim.y u at channels c0 .. c0 + V - 1.
template <class I, int R>
struct NhwcSlabWalk {
    using Index = I;
    static constexpr int kUnits = R;
    I j, end, stride, C, c0;
    bool active;
    template <int V>
    __device__ __forceinline__ NhwcSlabWalk(const BnParams& p, const IlpNhwcThread<I, V>& th) {
        C = static_cast<I>(p.c);
        const I rows = static_cast<I>(p.n) * static_cast<I>(p.s);
        const I chunk = static_cast<I>(p.chunk);
        const I r0 = th.k * chunk;
        end = r0 + split_count(th.k, chunk, rows);
        stride = static_cast<I>(blockDim.y);
        j = r0 + static_cast<I>(threadIdx.y);
        c0 = th.c0;
        active = th.active;
    }
    __device__ __forceinline__ bool full() const { return active && j + static_cast<I>(R - 1) * stride < end; }
    __device__ __forceinline__ bool has(int u) const { return active && j + static_cast<I>(u) * stride < end; }
    __device__ __forceinline__ void elems(I (&e)[R]) const {
        BN_UNROLL
        for (int u = 0; u < R; ++u) e[u] = (j + static_cast<I>(u) * stride) * C + c0;
    }
    __device__ __forceinline__ void advance() { j += static_cast<I>(R) * stride; }
};

// One unit's values widened to the accumulator.
template <class A, int V>
struct Values {
    A v[V];
    __device__ __forceinline__ A& operator[](int j) { return v[j]; }
    __device__ __forceinline__ A operator[](int j) const { return v[j]; }
};

// The predicate of a step that lies in the block's range (every step but a block's
// last): every unit, so that its loads and stores are unpredicated.
struct EveryUnit {
    __device__ __forceinline__ bool has(int) const { return true; }
};

// The forward's later steps in the form that keeps the most loads ahead of their stores
// to shared memory, as the static report shows: for 4- and 8-byte types f(EveryUnit) for
// a whole step beside f(at) for a block's last (nhwc f32 112 bytes ahead against 96,
// nchw f64 64 against 16); 2-byte types predicated only (the two forms cut the nhwc
// f16 forward to 32 bytes ahead, against 128).
template <class T, class W, class F>
__device__ __forceinline__ void with_step(const W& at, F&& f) {
    if constexpr (sizeof(T) >= 4) {
        if (at.full()) {
            f(EveryUnit{});
            return;
        }
    }
    f(at);
}

// A thread's units of one step of its block's slab, as raw 16-byte packs; `in` says
// which units lie in the block's range (a walk, or EveryUnit).
template <class T, int R>
struct Slab {
    static constexpr int V = VecWidth<T>::value;
    Pack<T, V> v[R];

    template <class In, L2Keep K, class I>
    __device__ __forceinline__ void fill(const Stream<T, K>& s, const In& in, const I (&e)[R]) {
        BN_UNROLL
        for (int u = 0; u < R; ++u) {
            if (in.has(u)) v[u] = s.template vec<V>(e[u]);
        }
    }
    template <class A>
    __device__ __forceinline__ Values<A, V> widen(int u) const {
        Values<A, V> out;
        BN_UNROLL
        for (int j = 0; j < V; ++j) out[j] = value<A>(u, j);
        return out;
    }
    // Value j of unit u. bf16 from its 32-bit word (a shift or a mask makes the f32):
    // converting the 16-bit halves kept them as 16-bit registers, which spilled.
    template <class A>
    __device__ __forceinline__ A value(int u, int j) const {
        if constexpr (sizeof(T) == 2 && !std::is_same<T, __half>::value && std::is_same<A, float>::value) {
            uint32_t word;
            memcpy(&word, &v[u].v[j & ~1], sizeof(word));
            const uint32_t bits = (j & 1) ? (word & 0xffff0000u) : (word << 16);
            float out;
            memcpy(&out, &bits, sizeof(out));
            return out;
        } else {
            return to_acc<A>(v[u].v[j]);
        }
    }
    // Where unit u of tensor `way` (of `ways`) lies in shared step `slot`: the step's R
    // packs of each tensor, thread-minor, so that the 16-byte accesses do not conflict.
    __device__ __forceinline__ static int at_slot(int slot, int ways, int way, int u) {
        const int me = static_cast<int>(threadIdx.y * blockDim.x + threadIdx.x);
        return ((slot * R + u) * ways + way) * kBlockThreads + me;
    }
    template <class Smem, class In>
    __device__ __forceinline__ void put(const Smem& smem, int slot, int ways, int way, const In& in) const {
        BN_UNROLL
        for (int u = 0; u < R; ++u) {
            if (in.has(u)) smem[at_slot(slot, ways, way, u)] = v[u];
        }
    }
    template <class Smem, class In>
    __device__ __forceinline__ void take(const Smem& smem, int slot, int ways, int way, const In& in) {
        BN_UNROLL
        for (int u = 0; u < R; ++u) {
            if (in.has(u)) v[u] = smem[at_slot(slot, ways, way, u)];
        }
    }
};

// f(u, values of each slab's unit u) for each unit of the step in the block's range.
template <class A, class W, class F, class... S>
__device__ __forceinline__ void each_unit(const W& at, F&& f, const S&... slabs) {
    BN_UNROLL
    for (int u = 0; u < W::kUnits; ++u) {
        if (at.has(u)) f(u, slabs.template widen<A>(u)...);
    }
}

// Walks a thread's later steps of its block's slab (shared memory, slot = step - 1),
// after step 0 (registers) at `walk` as made, while the block's range lasts.
template <class W, class Later>
__device__ __forceinline__ void each_later_step(W walk, Later&& later) {
    int slot = 0;
    for (walk.advance(); walk.has(0); walk.advance(), ++slot) {
        typename W::Index e[W::kUnits];
        walk.elems(e);
        later(walk, e, slot);
    }
}

// A channel's batch statistics from its merged state: the normalisation's coefficients,
// and with `commit` (one thread of split 0 per channel) the saved and running statistics.
template <class P, class A, class I>
__device__ __forceinline__ NormCoeffs<A> fused_stats(const BnParams& p, I c, const Welford<A>& total, A shift,
                                                     bool commit) {
    const A var = total.m2 / total.n;
    const A invstd = acc_rsqrt(var + static_cast<A>(p.eps));
    if (commit) {
        const A mean = shift + total.mean;
        if (p.save_mean) Gmem<A>(p.save_mean).st(c, mean);
        if (p.save_invstd) Gmem<A>(p.save_invstd).st(c, invstd);
        if (p.flags & BN_F_UPDATE_RUNNING) {
            const A momentum = static_cast<A>(p.momentum);
            const Gmem<P> rm(p.running_mean);
            const Gmem<P> rv(p.running_var);
            const A unbiased = var * static_cast<A>(p.bessel);
            rm.st(c, from_acc<P>(mean * momentum + (A(1) - momentum) * to_acc<A>(rm.ld(c))));
            rv.st(c, from_acc<P>(unbiased * momentum + (A(1) - momentum) * to_acc<A>(rv.ld(c))));
        }
    }
    NormCoeffs<A> k;
    k.shift = shift;
    k.delta = total.mean;
    k.scale = invstd * param_or<P, A>(p.weight, c, A(1));
    k.bias = param_or<P, A>(p.bias, c, A(0));
    return k;
}

// A channel's dx coefficients from its merged sums (sum_dy, dotp); with `commit` also
// grad_bias and grad_weight.
template <class P, class A, class I>
__device__ __forceinline__ DxCoeffs<A> fused_grads(const BnParams& p, I c, const Sum2<A>& total,
                                                   const BwdStats<A>& st, bool commit) {
    if (commit) {
        if (p.grad_bias) Gmem<P>(p.grad_bias).st(c, from_acc<P>(total.a));
        if (p.grad_weight) Gmem<P>(p.grad_weight).st(c, from_acc<P>(total.b * st.invstd));
    }
    DxCoeffs<A> k;
    const A norm = A(1) / static_cast<A>(p.n * p.s);
    k.mean = st.mean;
    k.grad_scale = st.invstd * param_or<P, A>(p.weight, c, A(1));
    k.grad_mean = total.a * norm;
    k.proj = total.b * norm * st.invstd * st.invstd;
    return k;
}

// ---------------------------------------------------------------------------------------
// Channel policies: Walk, the statistics or sums of a step, finish() (merge, commit,
// coefficients), and coeffs(j) for the unit's value j.

template <class T, class P, class A, class I, int R>
struct FwdNchw {
    static constexpr int V = VecWidth<T>::value;
    using Walk = IlpNchwWalk<I, R, V>;
    IlpNchwBlock<I> b;
    A shift;
    Welford<A> w;
    NormCoeffs<A> k;
    __device__ __forceinline__ FwdNchw(const BnParams& p, const Stream<T, L2Keep::First>& x) : b(p, false) {
        shift = shift_of(to_acc<A>(x.one(b.c * static_cast<I>(p.s))));
        w = welford_empty<A>();
    }
    __device__ __forceinline__ Walk walk(const BnParams& p) const { return Walk(p, b.c, b.k); }
    __device__ __forceinline__ void stats(const Walk& at, const Slab<T, R>& from) {
        each_unit<A>(
            at,
            [&](int, Values<A, V> v) {
                BN_UNROLL
                for (int j = 0; j < V; ++j) v[j] -= shift;
                welford_group<A, V>(w, v.v);
            },
            from);
    }
    __device__ __forceinline__ void finish(const BnParams& p) {
        const Welford<A> total = merge_channel<StatsPolicy<A>>(p, b.c, b.k, b.splits, w);
        k = fused_stats<P, A>(p, b.c, total, shift, b.k == 0 && threadIdx.x == 0);
    }
    __device__ __forceinline__ const NormCoeffs<A>& coeffs(int) const { return k; }
};

// y = (x - shift) * scale + offset, offset = bias - delta * scale: three coefficients a
// channel where NormCoeffs keeps four (the nhwc forward holds V channels' in registers
// beside its slab). x - shift is exact near the mean, and delta (the shifted mean) is of
// the order of the deviation, so the fold rounds no more than the four-term form.
template <class A>
struct FoldedCoeffs {
    A shift, scale, offset;
    __device__ __forceinline__ A apply(A v) const { return (v - shift) * scale + offset; }
};

template <class T, class P, class A, class I, int R>
struct FwdNhwc {
    static constexpr int V = VecWidth<T>::value;
    using Walk = NhwcSlabWalk<I, R>;
    IlpNhwcThread<I, V> th;
    // the V channels' Welford states share their count n (every row holds them all)
    A n;
    A mean[V], m2[V];
    FoldedCoeffs<A> k[V];
    __device__ __forceinline__ FwdNhwc(const BnParams& p, const Stream<T, L2Keep::First>& x) : th(p, false) {
        n = A(0);
        BN_UNROLL
        for (int j = 0; j < V; ++j) {
            k[j] = FoldedCoeffs<A>{A(0), A(0), A(0)};
            mean[j] = A(0);
            m2[j] = A(0);
        }
        if (th.active) {
            A first[V];
            load_acc<V>(x, th.c0, first);  // row 0
            BN_UNROLL
            for (int j = 0; j < V; ++j) k[j].shift = shift_of(first[j]);
        }
    }
    __device__ __forceinline__ Walk walk(const BnParams& p) const { return Walk(p, th); }
    __device__ __forceinline__ void absorb(int j, A nb, A mean_b, A m2_b, A r) {
        Welford<A> w{n, mean[j], m2[j]};
        welford_absorb(w, nb, mean_b, m2_b, r);
        mean[j] = w.mean;
        m2[j] = w.m2;
    }
    // The step's m rows in range (a prefix of its R) as one group per channel, in one
    // branch-free form for full and partial steps: two reciprocals for the V channels'
    // groups (per-row merges of a partial step made a branch per row, and spilled).
    __device__ __forceinline__ void stats(const Walk& at, const Slab<T, R>& from) {
        A m = A(0);
        BN_UNROLL
        for (int u = 0; u < R; ++u) m += at.has(u) ? A(1) : A(0);
        if (m == A(0)) return;
        const A rm = count_rcp(m);
        const A r = m * count_rcp(n + m);
        BN_UNROLL
        for (int j = 0; j < V; ++j) {
            A g[R];
            A sum = A(0);
            BN_UNROLL
            for (int u = 0; u < R; ++u) {
                g[u] = at.has(u) ? from.template value<A>(u, j) - k[j].shift : A(0);
                sum += g[u];
            }
            const A mu = sum * rm;
            A m2 = A(0);
            BN_UNROLL
            for (int u = 0; u < R; ++u) {
                const A d = g[u] - mu;
                m2 += at.has(u) ? d * d : A(0);
            }
            absorb(j, m, mu, m2, r);
        }
        n += m;
    }
    __device__ __forceinline__ void finish(const BnParams& p) {
        Welford<A> w[V];
        BN_UNROLL
        for (int j = 0; j < V; ++j) w[j] = Welford<A>{n, mean[j], m2[j]};
        merge_tile<StatsPolicy<A>, V>(p, th, w);
        const bool commit = th.k == 0 && threadIdx.y == 0;
        BN_UNROLL
        for (int j = 0; j < V; ++j) {
            if (!th.active) continue;
            const NormCoeffs<A> full = fused_stats<P, A>(p, th.c0 + j, w[j], k[j].shift, commit);
            k[j].scale = full.scale;
            k[j].offset = full.bias - full.delta * full.scale;
        }
    }
    __device__ __forceinline__ const FoldedCoeffs<A>& coeffs(int j) const { return k[j]; }
};

template <class T, class P, class A, class I, int R>
struct BwdNchw {
    static constexpr int V = VecWidth<T>::value;
    using Walk = IlpNchwWalk<I, R, V>;
    IlpNchwBlock<I> b;
    BwdStats<A> st;
    Sum2<A> s;
    DxCoeffs<A> k;
    __device__ __forceinline__ explicit BwdNchw(const BnParams& p) : b(p, false) {
        st = bwd_stats<P, A>(p, b.c);
        s = Sum2<A>{A(0), A(0)};
    }
    __device__ __forceinline__ Walk walk(const BnParams& p) const { return Walk(p, b.c, b.k); }
    __device__ __forceinline__ Sum2<A>& sums(int) { return s; }
    __device__ __forceinline__ A mean(int) const { return st.mean; }
    __device__ __forceinline__ void finish(const BnParams& p) {
        const Sum2<A> total = merge_channel<SumPolicy<A>>(p, b.c, b.k, b.splits, s);
        k = fused_grads<P, A>(p, b.c, total, st, b.k == 0 && threadIdx.x == 0);
    }
    __device__ __forceinline__ const DxCoeffs<A>& coeffs(int) const { return k; }
};

template <class T, class P, class A, class I, int R>
struct BwdNhwc {
    static constexpr int V = VecWidth<T>::value;
    using Walk = NhwcSlabWalk<I, R>;
    IlpNhwcThread<I, V> th;
    BwdStats<A> st[V];
    Sum2<A> s[V];
    DxCoeffs<A> k[V];
    __device__ __forceinline__ explicit BwdNhwc(const BnParams& p) : th(p, false) {
        BN_UNROLL
        for (int j = 0; j < V; ++j) {
            st[j] = th.active ? bwd_stats<P, A>(p, th.c0 + j) : BwdStats<A>{A(0), A(0)};
            s[j] = Sum2<A>{A(0), A(0)};
        }
    }
    __device__ __forceinline__ Walk walk(const BnParams& p) const { return Walk(p, th); }
    __device__ __forceinline__ Sum2<A>& sums(int j) { return s[j]; }
    __device__ __forceinline__ A mean(int j) const { return st[j].mean; }
    __device__ __forceinline__ void finish(const BnParams& p) {
        merge_tile<SumPolicy<A>, V>(p, th, s);
        const bool commit = th.k == 0 && threadIdx.y == 0;
        BN_UNROLL
        for (int j = 0; j < V; ++j) {
            k[j] = th.active ? fused_grads<P, A>(p, th.c0 + j, s[j], st[j], commit) : DxCoeffs<A>{};
        }
    }
    __device__ __forceinline__ const DxCoeffs<A>& coeffs(int j) const { return k[j]; }
};

// ---------------------------------------------------------------------------------------
// The stages' one body each.

template <template <class, class, class, class, int> class Ch, class T, class P, class A, class I>
struct PersistentFwd {
    static constexpr int V = VecWidth<T>::value;
    static constexpr int R = 8;
    static_assert(kBlockThreads * R * 16 == kSlabStepBytes, "a step of slab is PERSISTENT_STEP_BYTES");
    using Chan = Ch<T, P, A, I, R>;
    using Walk = typename Chan::Walk;
    __device__ static void run(const BnParams& p) {
        const Stream<T, L2Keep::First> x(p.x);
        Chan ch(p, x);
        const Walk walk = ch.walk(p);
        using Packed = Pack<T, V>;
        BN_DYNAMIC_SHARED(Packed, s_slab);
        // The later steps first, through a second register set into shared memory (stored
        // before any arithmetic, so that the loads issue together), so that the first
        // step's registers are loaded last and the two sets are never live together.
        each_later_step(walk, [&](const Walk& at, const I (&at_e)[R], int slot) {
            Slab<T, R> t;
            with_step<T>(at, [&](const auto& in) {
                t.fill(x, in, at_e);
                t.put(s_slab, slot, 1, 0, in);
            });
            ch.stats(at, t);
        });
        Slab<T, R> slab;
        I e[R];
        walk.elems(e);
        slab.fill(x, walk, e);
        ch.stats(walk, slab);
        ch.finish(p);
        const Gmem<T> y(p.y);
        const auto normalise = [&](const Walk& at, const I (&at_e)[R], const Slab<T, R>& from) {
            each_unit<A>(
                at,
                [&](int u, Values<A, V> v) {
                    BN_UNROLL
                    for (int j = 0; j < V; ++j) v[j] = ch.coeffs(j).apply(v[j]);
                    store_acc<V>(y, at_e[u], v.v);
                },
                from);
        };
        normalise(walk, e, slab);
        each_later_step(walk, [&](const Walk& at, const I (&at_e)[R], int slot) {
            Slab<T, R> t;
            t.take(s_slab, slot, 1, 0, at);
            normalise(at, at_e, t);
        });
    }
};

template <template <class, class, class, class, int> class Ch, class T, class P, class A, class I>
struct PersistentBwd {
    static constexpr int V = VecWidth<T>::value;
    static constexpr int R = 4;
    static_assert(kBlockThreads * R * 2 * 16 == kSlabStepBytes, "a step of slab is PERSISTENT_STEP_BYTES");
    using Chan = Ch<T, P, A, I, R>;
    using Walk = typename Chan::Walk;
    __device__ static void run(const BnParams& p) {
        Chan ch(p);
        const Stream<T, L2Keep::First> x(p.x);
        const Stream<T, L2Keep::First> dy(p.dy);
        const Walk walk = ch.walk(p);
        using Packed = Pack<T, V>;
        BN_DYNAMIC_SHARED(Packed, s_slab);
        const auto sums = [&](const Walk& at, const Slab<T, R>& xf, const Slab<T, R>& gf) {
            each_unit<A>(
                at,
                [&](int, const Values<A, V>& xv, const Values<A, V>& gv) {
                    BN_UNROLL
                    for (int j = 0; j < V; ++j) {
                        Sum2<A>& s = ch.sums(j);
                        s.a += gv[j];
                        s.b += gv[j] * (xv[j] - ch.mean(j));
                    }
                },
                xf, gf);
        };
        // As in the forward: the later steps first, both tensors' loads before the stores
        // (predicated only: 128 bytes ahead for every type; the two forms cut that).
        each_later_step(walk, [&](const Walk& at, const I (&at_e)[R], int slot) {
            Slab<T, R> tx, tg;
            tx.fill(x, at, at_e);
            tg.fill(dy, at, at_e);
            tx.put(s_slab, slot, 2, 0, at);
            tg.put(s_slab, slot, 2, 1, at);
            sums(at, tx, tg);
        });
        Slab<T, R> xs, gs;
        I e[R];
        walk.elems(e);
        xs.fill(x, walk, e);
        gs.fill(dy, walk, e);
        sums(walk, xs, gs);
        ch.finish(p);
        const Gmem<T> dx(p.dx);
        const auto grads = [&](const Walk& at, const I (&at_e)[R], const Slab<T, R>& xf, const Slab<T, R>& gf) {
            each_unit<A>(
                at,
                [&](int u, const Values<A, V>& xv, Values<A, V> gv) {
                    BN_UNROLL
                    for (int j = 0; j < V; ++j) gv[j] = ch.coeffs(j).apply(gv[j], xv[j]);
                    store_acc<V>(dx, at_e[u], gv.v);
                },
                xf, gf);
        };
        grads(walk, e, xs, gs);
        each_later_step(walk, [&](const Walk& at, const I (&at_e)[R], int slot) {
            Slab<T, R> tx, tg;
            tx.take(s_slab, slot, 2, 0, at);
            tg.take(s_slab, slot, 2, 1, at);
            grads(at, at_e, tx, tg);
        });
    }
};

template <template <template <class, class, class, class, int> class, class, class, class, class> class Stage,
          template <class, class, class, class, int> class Ch, class T, class P, class A, class I>
__device__ __forceinline__ void run_persistent(const BnParams& p) {
    Stage<Ch, T, P, A, I>::run(p);
}

}  // namespace bn

// Entry points of one (input, parameter, accumulator) triple and index width, both
// layouts. The slab's registers are the point: compiled for 2 resident blocks (128
// registers), so that nothing spills.
#define BN_PERSISTENT_LAYOUT(tag, T, P, A, I, suffix, layout, Fwd, Bwd)                                  \
    BN_KERNEL_RESIDENT(bn_persistent_fwd_train_##layout##_##tag##suffix, 2,                              \
                       bn::run_persistent<bn::PersistentFwd, bn::Fwd, T, P, A, I>);                      \
    BN_KERNEL_RESIDENT(bn_persistent_bwd_train_##layout##_##tag##suffix, 2,                              \
                       bn::run_persistent<bn::PersistentBwd, bn::Bwd, T, P, A, I>)

#define BN_PERSISTENT_INDEX(tag, T, P, A, I, suffix)                            \
    BN_PERSISTENT_LAYOUT(tag, T, P, A, I, suffix, nchw, FwdNchw, BwdNchw);      \
    BN_PERSISTENT_LAYOUT(tag, T, P, A, I, suffix, nhwc, FwdNhwc, BwdNhwc)

#define BN_PERSISTENT_ENTRIES(tag, T, P, A)             \
    BN_PERSISTENT_INDEX(tag, T, P, A, int32_t, /*32*/); \
    BN_PERSISTENT_INDEX(tag, T, P, A, int64_t, _i64)

BN_PERSISTENT_ENTRIES(f32, float, float, float);
BN_PERSISTENT_ENTRIES(f64, double, double, double);
BN_PERSISTENT_ENTRIES(f16, __half, __half, float);
BN_PERSISTENT_ENTRIES(bf16, __nv_bfloat16, __nv_bfloat16, float);
BN_PERSISTENT_ENTRIES(f16_f32, __half, float, float);
BN_PERSISTENT_ENTRIES(bf16_f32, __nv_bfloat16, float, float);

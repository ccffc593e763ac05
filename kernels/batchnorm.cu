// batchnorm.cu: every cuda-batchnorm kernel.
//
// PyTorch's BatchNorm over an input seen as (N, C, S), S the product of the dimensions
// after C, M = N * S values per channel. Four stages, each in two layouts:
//
//   fwd_stats   per-channel batch statistics, fused with their finalisation: each block
//               computes Welford (n, mean, m2) of one slice of one channel (nchw) or of a
//               tile of channels (nhwc); the last block of a channel or tile to finish
//               merges the slices in a fixed order and writes save_mean, save_invstd
//               and the workspace channel data fwd_norm reads, the new running
//               statistics (unbiased variance, momentum) among them. One launch.
//   fwd_norm    y = (x - mean) * invstd * w + b, with this batch's statistics (from the
//               workspace) or the running ones (eval). In training it also commits the
//               new running statistics: they change only once both launches of the
//               forward were accepted, so a forward that fails at its second launch
//               leaves them as they were.
//   bwd_reduce  per-channel sum_dy = sum(dy) and dotp = sum(dy * (x - mean)), split and
//               finalised like fwd_stats: grad_bias = sum_dy, grad_weight = dotp * invstd.
//   bwd_dx      training: dx = (dy - (x - mean) * dotp * invstd^2 / M - sum_dy / M) * invstd * w
//               eval:     dx = dy * invstd * w
//
// Fused epilogues (this family only; BN_F_RELU, BN_F_ADD): fwd_norm writes
// y = relu(bn(x) + z), the add and the ReLU in the accumulator type before the one
// rounding to T; bwd_reduce and bwd_dx differentiate through it with dy masked by the
// forward's output (zero where y <= 0, as PyTorch's threshold_backward), and bwd_dx also
// writes that masked dy as the residual's gradient dz.
//
// Layouts:
//   nchw   channel planes of S contiguous values (contiguous format with S > 1). A block
//          owns one slice (`chunk` values) of one channel: whole planes when planes are
//          small, part of a plane when they are large. Threads work in groups of
//          `tile_x` per plane, each plane cut into a scalar head up to 16-byte alignment,
//          16-byte vectors, and a scalar tail.
//   nhwc   rows of C contiguous channels (channels-last, and every shape with S == 1).
//          A block is tile_x x (256 / tile_x) threads: x across channels (one vector of
//          channels per thread), y across rows; the grid is channel tiles x row splits.
//
// Variants, chosen per launch from BnParams.flags: 32- or 64-bit index arithmetic
// (BN_F_INDEX64) and scalar or 16-byte access (BN_F_VEC); the epilogue flags are read at
// run time (uniform branches).
//
// Types: T storage, P parameters and running statistics, A accumulator. Entry points
// bn_<stage>_<layout>_<tag> are stamped out at the bottom for f32, f64, f16, bf16,
// f16_f32 and bf16_f32 (tag = T, or T_P when P differs).
//
// Assumptions, all guaranteed by the launch plan in src/launch.rs:
//   * blocks have kBlockThreads (256) threads: nchw (256, 1, 1) with grid.x = C * splits,
//     tile_x (threads per plane group) a power of two from 32 to 256;
//     nhwc (tile_x, 256 / tile_x, 1), tile_x a power of two <= 32, grid (tiles, splits);
//   * M >= 1 and C >= 1 (empty inputs never launch);
//   * no split is empty, and a split holds at most 2^24 values (counts exact in f32);
//   * BN_F_VEC: nchw: x, y, dy, dx, z and dz share one misalignment modulo 16 bytes;
//     nhwc: all of them 16-byte aligned and C a multiple of the vector width;
//   * without BN_F_INDEX64 every index the kernels form stays below 2^31;
//   * ws_counters are zero on entry; every launch leaves them zero again.
//
// The shift K: Welford runs on x - K with K the channel's first value (0 if that value
// is not finite, so that inf - inf cannot turn an inf channel into NaN), so that the mean
// of a channel far from zero (1e4 with std 1) keeps its low digits; fwd_norm computes
// (x - K) - mean(x - K), never x - fl(mean).

#include "common.cuh"
#include "reduce.cuh"
#include "stages.cuh"

namespace bn {

// ---------------------------------------------------------------------------------------
// The fused epilogues, applied to V values at element i.

// PyTorch's relu: NaN stays NaN (clamp_min, not fmax), and so does -0.
template <class A>
__device__ __forceinline__ A relu(A v) {
    return v < A(0) ? A(0) : v;
}

template <class T>
struct Epilogue {
    Gmem<const T> z, y;  // residual (forward) and the forward's output (backward mask)
    Gmem<T> dz;          // residual gradient (backward)
    bool add, use_relu;
    __device__ __forceinline__ explicit Epilogue(const BnParams& p)
        : z(p.z), y(p.y), dz(p.dz), add((p.flags & BN_F_ADD) != 0), use_relu((p.flags & BN_F_RELU) != 0) {}

    // forward: v = relu(v + z)
    template <int V, class A, class I>
    __device__ __forceinline__ void forward(I i, A (&v)[V]) const {
        if (add) {
            A r[V];
            load_acc<V>(z, i, r);
            BN_UNROLL
            for (int j = 0; j < V; ++j) v[j] += r[j];
        }
        if (use_relu) {
            BN_UNROLL
            for (int j = 0; j < V; ++j) v[j] = relu(v[j]);
        }
    }

    // backward: g = 0 where the forward's output is <= 0, else dy (threshold_backward's
    // test: a NaN output passes its gradient)
    template <int V, class A, class I>
    __device__ __forceinline__ void mask(I i, A (&g)[V]) const {
        if (!use_relu) return;
        A out[V];
        load_acc<V>(y, i, out);
        BN_UNROLL
        for (int j = 0; j < V; ++j) g[j] = out[j] <= A(0) ? A(0) : g[j];
    }

    // backward dx stage: the residual's gradient is the masked dy
    template <int V, class A, class I>
    __device__ __forceinline__ void residual_grad(I i, const A (&g)[V]) const {
        if (add) store_acc<V>(dz, i, g);
    }
};

// ---------------------------------------------------------------------------------------
// nchw: iteration over one block's slice of one channel.

// Calls scalar(i) or vector(i) (V values from i) for every value of split k of channel
// c, i being the element index into x (and into y, dy, dx).
template <int V, class I, class T, class Scalar, class Vector>
__device__ __forceinline__ void nchw_slice(const BnParams& p, const Gmem<const T>& x, I c, I k, Scalar&& scalar,
                                           Vector&& vector) {
    const I C = static_cast<I>(p.c);
    const I S = static_cast<I>(p.s);
    const I M = static_cast<I>(p.n) * S;
    const I chunk = static_cast<I>(p.chunk);
    const I m0 = k * chunk;
    const I m1 = m0 + split_count(k, chunk, M);
    const int group = static_cast<int>(p.tile_x);
    const I stride_planes = static_cast<I>(kBlockThreads / group);
    const I t = static_cast<I>(threadIdx.x % group);
    const I n_first = m0 / S;
    const I n_last = (m1 - 1) / S;
    for (I n = n_first + static_cast<I>(threadIdx.x / group); n <= n_last; n += stride_planes) {
        const I lo = n == n_first ? m0 - n * S : I(0);
        const I hi = n == n_last ? m1 - n * S : S;
        const I base = (n * C + c) * S + lo;
        const I len = hi - lo;
        if constexpr (V == 1) {
            for (I i = t; i < len; i += group) scalar(base + i);
        } else {
            const I head = imin(len, static_cast<I>(x.head_to_align(base)));
            for (I i = t; i < head; i += group) scalar(base + i);
            const I vecs = (len - head) / V;
            for (I j = t; j < vecs; j += group) vector(base + head + j * V);
            for (I i = head + vecs * V + t; i < len; i += group) scalar(base + i);
        }
    }
}

template <class I>
struct NchwBlock {
    I c, k, splits;
    __device__ __forceinline__ explicit NchwBlock(const BnParams& p)
        : c(static_cast<I>(blockIdx.x) / static_cast<I>(p.splits)),
          k(static_cast<I>(blockIdx.x) - (static_cast<I>(blockIdx.x) / static_cast<I>(p.splits)) * static_cast<I>(p.splits)),
          splits(static_cast<I>(p.splits)) {}
};

template <class T, class P, class A, class I, int V>
struct FwdStatsNchw {
    __device__ static void run(const BnParams& p) {
        const NchwBlock<I> b(p);
        const I C = static_cast<I>(p.c);
        const Gmem<const T> x(p.x);
        const A shift = shift_of(to_acc<A>(x.ld(b.c * static_cast<I>(p.s))));
        Welford<A> w = welford_empty<A>();
        nchw_slice<V, I>(
            p, x, b.c, b.k, [&](I i) { welford_add(w, to_acc<A>(x.ld(i)) - shift); },
            [&](I i) {
                A v[V];
                load_acc<V>(x, i, v);
                BN_UNROLL
                for (int j = 0; j < V; ++j) welford_add(w, v[j] - shift);
            });
        w = block_merge(w);
        if (b.splits == 1) {
            if (threadIdx.x == 0) finalize_stats<P, A>(p, b.c, w, shift);
            return;
        }
        const Gmem<A> part(p.ws_partials);
        const I slot = b.c * b.splits;
        if (threadIdx.x == 0) {
            part.st(slot + b.k, w.mean);
            part.st(C * b.splits + slot + b.k, w.m2);
        }
        if (!arrive_last(p, static_cast<uint64_t>(b.c), static_cast<unsigned>(b.splits))) return;
        const I M = static_cast<I>(p.n) * static_cast<I>(p.s);
        const I chunk = static_cast<I>(p.chunk);
        Welford<A> acc = welford_empty<A>();
        for (I j = threadIdx.x; j < b.splits; j += kBlockThreads) {
            const Welford<A> pj{static_cast<A>(split_count(j, chunk, M)), part.ld_cg(slot + j),
                                part.ld_cg(C * b.splits + slot + j)};
            acc = welford_merge(acc, pj);
        }
        acc = block_merge(acc);
        if (threadIdx.x == 0) finalize_stats<P, A>(p, b.c, acc, shift);
    }
};

template <class T, class P, class A, class I, int V>
struct FwdNormNchw {
    __device__ static void run(const BnParams& p) {
        const NchwBlock<I> b(p);
        const NormCoeffs<A> k = norm_coeffs<P, A>(p, b.c);
        if ((p.flags & BN_F_UPDATE_RUNNING) && b.k == 0 && threadIdx.x == 0) commit_running<P, A>(p, b.c);
        const Gmem<const T> x(p.x);
        const Gmem<T> y(p.y);
        const Epilogue<T> ep(p);
        nchw_slice<V, I>(
            p, x, b.c, b.k,
            [&](I i) {
                A v[1] = {k.apply(to_acc<A>(x.ld(i)))};
                ep.template forward<1>(i, v);
                y.st(i, from_acc<T>(v[0]));
            },
            [&](I i) {
                A v[V];
                load_acc<V>(x, i, v);
                BN_UNROLL
                for (int j = 0; j < V; ++j) v[j] = k.apply(v[j]);
                ep.template forward<V>(i, v);
                store_acc<V>(y, i, v);
            });
    }
};

template <class T, class P, class A, class I, int V>
struct BwdReduceNchw {
    __device__ static void run(const BnParams& p) {
        const NchwBlock<I> b(p);
        const I C = static_cast<I>(p.c);
        const BwdStats<A> st = bwd_stats<P, A>(p, b.c);
        const Gmem<const T> x(p.x);
        const Gmem<const T> dy(p.dy);
        const Epilogue<T> ep(p);
        Sum2<A> s{A(0), A(0)};
        nchw_slice<V, I>(
            p, x, b.c, b.k,
            [&](I i) {
                A g[1] = {to_acc<A>(dy.ld(i))};
                ep.template mask<1>(i, g);
                s.a += g[0];
                s.b += g[0] * (to_acc<A>(x.ld(i)) - st.mean);
            },
            [&](I i) {
                A xv[V], gv[V];
                load_acc<V>(x, i, xv);
                load_acc<V>(dy, i, gv);
                ep.template mask<V>(i, gv);
                BN_UNROLL
                for (int j = 0; j < V; ++j) {
                    s.a += gv[j];
                    s.b += gv[j] * (xv[j] - st.mean);
                }
            });
        s = block_sum(s);
        if (b.splits == 1) {
            if (threadIdx.x == 0) finalize_backward<P, A>(p, b.c, s, st.invstd);
            return;
        }
        const Gmem<A> part(p.ws_partials);
        const I slot = b.c * b.splits;
        if (threadIdx.x == 0) {
            part.st(slot + b.k, s.a);
            part.st(C * b.splits + slot + b.k, s.b);
        }
        if (!arrive_last(p, static_cast<uint64_t>(b.c), static_cast<unsigned>(b.splits))) return;
        Sum2<A> acc{A(0), A(0)};
        for (I j = threadIdx.x; j < b.splits; j += kBlockThreads) {
            acc.a += part.ld_cg(slot + j);
            acc.b += part.ld_cg(C * b.splits + slot + j);
        }
        acc = block_sum(acc);
        if (threadIdx.x == 0) finalize_backward<P, A>(p, b.c, acc, st.invstd);
    }
};

template <class T, class P, class A, class I, int V>
struct BwdDxNchw {
    __device__ static void run(const BnParams& p) {
        const NchwBlock<I> b(p);
        const DxCoeffs<A> k = dx_coeffs<P, A>(p, b.c);
        const Gmem<const T> x(p.x);
        const Gmem<const T> dy(p.dy);
        const Gmem<T> dx(p.dx);
        // Eval's dx does not depend on x; it is not read then.
        const bool need_x = (p.flags & BN_F_BATCH_STATS) != 0;
        const Epilogue<T> ep(p);
        nchw_slice<V, I>(
            p, dy, b.c, b.k,
            [&](I i) {
                A g[1] = {to_acc<A>(dy.ld(i))};
                ep.template mask<1>(i, g);
                ep.template residual_grad<1>(i, g);
                dx.st(i, from_acc<T>(need_x ? k.apply(g[0], to_acc<A>(x.ld(i))) : k.apply_eval(g[0])));
            },
            [&](I i) {
                A gv[V], xv[V];
                load_acc<V>(dy, i, gv);
                ep.template mask<V>(i, gv);
                ep.template residual_grad<V>(i, gv);
                if (need_x) {
                    load_acc<V>(x, i, xv);
                    BN_UNROLL
                    for (int j = 0; j < V; ++j) gv[j] = k.apply(gv[j], xv[j]);
                } else {
                    BN_UNROLL
                    for (int j = 0; j < V; ++j) gv[j] = k.apply_eval(gv[j]);
                }
                store_acc<V>(dx, i, gv);
            });
    }
};

// ---------------------------------------------------------------------------------------
// nhwc: a thread owns V consecutive channels and walks its block's rows.

template <class I, int V>
struct NhwcThread {
    I c0;        // first channel of this thread
    I tile, k;   // channel tile and row split of the block
    bool active; // c0 < C
    __device__ __forceinline__ explicit NhwcThread(const BnParams& p)
        : c0((static_cast<I>(blockIdx.x) * static_cast<I>(blockDim.x) + static_cast<I>(threadIdx.x)) * V),
          tile(static_cast<I>(blockIdx.x)),
          k(static_cast<I>(blockIdx.y)),
          active((static_cast<I>(blockIdx.x) * static_cast<I>(blockDim.x) + static_cast<I>(threadIdx.x)) * V <
                 static_cast<I>(p.c)) {}
};

// Calls body(i) for each row of split k, i the element index of (row, c0).
template <class I, class Body>
__device__ __forceinline__ void nhwc_rows(const BnParams& p, I c0, I k, Body&& body) {
    const I C = static_cast<I>(p.c);
    const I R = static_cast<I>(p.n) * static_cast<I>(p.s);
    const I chunk = static_cast<I>(p.chunk);
    const I r0 = k * chunk;
    const I r1 = r0 + split_count(k, chunk, R);
    for (I r = r0 + static_cast<I>(threadIdx.y); r < r1; r += static_cast<I>(blockDim.y)) body(r * C + c0);
}

// Merges the V Welford states of all threads with the same threadIdx.x across
// threadIdx.y; threads with threadIdx.y == 0 end with the block's result.
template <class A, int V>
__device__ __forceinline__ void nhwc_merge_rows(Welford<A> (&w)[V]) {
    BN_SHARED(A, s_n, kBlockThreads);
    BN_SHARED(A, s_mean, kBlockThreads * V);
    BN_SHARED(A, s_m2, kBlockThreads * V);
    const int me = threadIdx.y * blockDim.x + threadIdx.x;
    s_n[me] = w[0].n;
    BN_UNROLL
    for (int j = 0; j < V; ++j) {
        s_mean[me * V + j] = w[j].mean;
        s_m2[me * V + j] = w[j].m2;
    }
    __syncthreads();
    for (int stride = blockDim.y / 2; stride > 0; stride >>= 1) {
        if (static_cast<int>(threadIdx.y) < stride) {
            const int other = me + stride * static_cast<int>(blockDim.x);
            const A on = s_n[other];
            BN_UNROLL
            for (int j = 0; j < V; ++j) {
                w[j] = welford_merge(w[j], Welford<A>{on, s_mean[other * V + j], s_m2[other * V + j]});
                s_mean[me * V + j] = w[j].mean;
                s_m2[me * V + j] = w[j].m2;
            }
            s_n[me] = w[0].n;
        }
        __syncthreads();
    }
}

template <class A, int V>
__device__ __forceinline__ void nhwc_sum_rows(Sum2<A> (&s)[V]) {
    BN_SHARED(A, s_a, kBlockThreads * V);
    BN_SHARED(A, s_b, kBlockThreads * V);
    const int me = threadIdx.y * blockDim.x + threadIdx.x;
    BN_UNROLL
    for (int j = 0; j < V; ++j) {
        s_a[me * V + j] = s[j].a;
        s_b[me * V + j] = s[j].b;
    }
    __syncthreads();
    for (int stride = blockDim.y / 2; stride > 0; stride >>= 1) {
        if (static_cast<int>(threadIdx.y) < stride) {
            const int other = me + stride * static_cast<int>(blockDim.x);
            BN_UNROLL
            for (int j = 0; j < V; ++j) {
                s[j].a += s_a[other * V + j];
                s[j].b += s_b[other * V + j];
                s_a[me * V + j] = s[j].a;
                s_b[me * V + j] = s[j].b;
            }
        }
        __syncthreads();
    }
}

template <class T, class P, class A, class I, int V>
struct FwdStatsNhwc {
    __device__ static void run(const BnParams& p) {
        const NhwcThread<I, V> th(p);
        const I C = static_cast<I>(p.c);
        const I splits = static_cast<I>(p.splits);
        const Gmem<const T> x(p.x);
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
            nhwc_rows(p, th.c0, th.k, [&](I i) {
                A v[V];
                load_acc<V>(x, i, v);
                n += A(1);
                const A rcp = A(1) / n;
                BN_UNROLL
                for (int j = 0; j < V; ++j) welford_add(w[j], v[j] - shift[j], n, rcp);
            });
        }
        nhwc_merge_rows<A, V>(w);
        const bool lead = threadIdx.y == 0 && th.active;
        if (splits == 1) {
            if (lead) {
                BN_UNROLL
                for (int j = 0; j < V; ++j) finalize_stats<P, A>(p, th.c0 + j, w[j], shift[j]);
            }
            return;
        }
        const Gmem<A> part(p.ws_partials);
        if (lead) {
            BN_UNROLL
            for (int j = 0; j < V; ++j) {
                part.st(th.k * C + th.c0 + j, w[j].mean);
                part.st(splits * C + th.k * C + th.c0 + j, w[j].m2);
            }
        }
        if (!arrive_last(p, static_cast<uint64_t>(th.tile), static_cast<unsigned>(splits))) return;
        const I R = static_cast<I>(p.n) * static_cast<I>(p.s);
        const I chunk = static_cast<I>(p.chunk);
        Welford<A> acc[V];
        BN_UNROLL
        for (int j = 0; j < V; ++j) acc[j] = welford_empty<A>();
        if (th.active) {
            for (I sj = threadIdx.y; sj < splits; sj += static_cast<I>(blockDim.y)) {
                const A cnt = static_cast<A>(split_count(sj, chunk, R));
                BN_UNROLL
                for (int j = 0; j < V; ++j) {
                    const Welford<A> pj{cnt, part.ld_cg(sj * C + th.c0 + j), part.ld_cg(splits * C + sj * C + th.c0 + j)};
                    acc[j] = welford_merge(acc[j], pj);
                }
            }
        }
        nhwc_merge_rows<A, V>(acc);
        if (lead) {
            BN_UNROLL
            for (int j = 0; j < V; ++j) finalize_stats<P, A>(p, th.c0 + j, acc[j], shift[j]);
        }
    }
};

template <class T, class P, class A, class I, int V>
struct FwdNormNhwc {
    __device__ static void run(const BnParams& p) {
        const NhwcThread<I, V> th(p);
        if (!th.active) return;
        NormCoeffs<A> k[V];
        BN_UNROLL
        for (int j = 0; j < V; ++j) k[j] = norm_coeffs<P, A>(p, th.c0 + j);
        if ((p.flags & BN_F_UPDATE_RUNNING) && th.k == 0 && threadIdx.y == 0) {
            BN_UNROLL
            for (int j = 0; j < V; ++j) commit_running<P, A>(p, th.c0 + j);
        }
        const Gmem<const T> x(p.x);
        const Gmem<T> y(p.y);
        const Epilogue<T> ep(p);
        nhwc_rows(p, th.c0, th.k, [&](I i) {
            A v[V];
            load_acc<V>(x, i, v);
            BN_UNROLL
            for (int j = 0; j < V; ++j) v[j] = k[j].apply(v[j]);
            ep.template forward<V>(i, v);
            store_acc<V>(y, i, v);
        });
    }
};

template <class T, class P, class A, class I, int V>
struct BwdReduceNhwc {
    __device__ static void run(const BnParams& p) {
        const NhwcThread<I, V> th(p);
        const I C = static_cast<I>(p.c);
        const I splits = static_cast<I>(p.splits);
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
            const Gmem<const T> x(p.x);
            const Gmem<const T> dy(p.dy);
            const Epilogue<T> ep(p);
            nhwc_rows(p, th.c0, th.k, [&](I i) {
                A xv[V], gv[V];
                load_acc<V>(x, i, xv);
                load_acc<V>(dy, i, gv);
                ep.template mask<V>(i, gv);
                BN_UNROLL
                for (int j = 0; j < V; ++j) {
                    s[j].a += gv[j];
                    s[j].b += gv[j] * (xv[j] - st[j].mean);
                }
            });
        }
        nhwc_sum_rows<A, V>(s);
        const bool lead = threadIdx.y == 0 && th.active;
        if (splits == 1) {
            if (lead) {
                BN_UNROLL
                for (int j = 0; j < V; ++j) finalize_backward<P, A>(p, th.c0 + j, s[j], st[j].invstd);
            }
            return;
        }
        const Gmem<A> part(p.ws_partials);
        if (lead) {
            BN_UNROLL
            for (int j = 0; j < V; ++j) {
                part.st(th.k * C + th.c0 + j, s[j].a);
                part.st(splits * C + th.k * C + th.c0 + j, s[j].b);
            }
        }
        if (!arrive_last(p, static_cast<uint64_t>(th.tile), static_cast<unsigned>(splits))) return;
        Sum2<A> acc[V];
        BN_UNROLL
        for (int j = 0; j < V; ++j) acc[j] = Sum2<A>{A(0), A(0)};
        if (th.active) {
            for (I sj = threadIdx.y; sj < splits; sj += static_cast<I>(blockDim.y)) {
                BN_UNROLL
                for (int j = 0; j < V; ++j) {
                    acc[j].a += part.ld_cg(sj * C + th.c0 + j);
                    acc[j].b += part.ld_cg(splits * C + sj * C + th.c0 + j);
                }
            }
        }
        nhwc_sum_rows<A, V>(acc);
        if (lead) {
            BN_UNROLL
            for (int j = 0; j < V; ++j) finalize_backward<P, A>(p, th.c0 + j, acc[j], st[j].invstd);
        }
    }
};

template <class T, class P, class A, class I, int V>
struct BwdDxNhwc {
    __device__ static void run(const BnParams& p) {
        const NhwcThread<I, V> th(p);
        if (!th.active) return;
        DxCoeffs<A> k[V];
        BN_UNROLL
        for (int j = 0; j < V; ++j) k[j] = dx_coeffs<P, A>(p, th.c0 + j);
        const Gmem<const T> x(p.x);
        const Gmem<const T> dy(p.dy);
        const Gmem<T> dx(p.dx);
        const bool need_x = (p.flags & BN_F_BATCH_STATS) != 0;
        const Epilogue<T> ep(p);
        nhwc_rows(p, th.c0, th.k, [&](I i) {
            A gv[V], xv[V];
            load_acc<V>(dy, i, gv);
            ep.template mask<V>(i, gv);
            ep.template residual_grad<V>(i, gv);
            if (need_x) {
                load_acc<V>(x, i, xv);
                BN_UNROLL
                for (int j = 0; j < V; ++j) gv[j] = k[j].apply(gv[j], xv[j]);
            } else {
                BN_UNROLL
                for (int j = 0; j < V; ++j) gv[j] = k[j].apply_eval(gv[j]);
            }
            store_acc<V>(dx, i, gv);
        });
    }
};

// ---------------------------------------------------------------------------------------
// The stats stage (SyncBatchNorm and the per-stage functions): per-channel kernels, one
// thread per channel (grid ceil(C / 256) x 256, no workspace protocol). They read and
// write per-channel data only, and prepare the channel data (ws_channel) that fwd_norm
// and bwd_dx of every split family read, so the streaming stages run as they are.
//
//   stats_gather  the global mean and invstd from R ranks' (mean, invstd, count), merged
//                 in rank order as Chan's parallel update (PyTorch's
//                 batch_norm_gather_stats_with_counts; a rank with count <= 0 is skipped,
//                 as PyTorch filters empty ranks). x = means, dy = invstds: rank r's
//                 channel c at r * chunk + c; z = counts at r * s; n = R. Writes
//                 save_mean and save_invstd; with BN_F_UPDATE_RUNNING the running
//                 statistics (momentum, the global batch's unbiased variance).
//   elemt_prep    ws_channel's shift, shifted mean and invstd from given statistics
//                 (save_mean, save_invstd): fwd_norm then computes (x - mean) * invstd * w
//                 + b, PyTorch's batch_norm_elemt.
//   dx_prep       ws_channel's sums for bwd_dx from the all-reduced sums (x: A[2C],
//                 sum_dy then sum_dy_xmu) and the ranks' counts (z at r * s, n = R):
//                 scaled by chunk / sum(counts), chunk being the local N * S that bwd_dx
//                 divides by, so that bwd_dx divides by the global count.

template <class A, class I>
__device__ __forceinline__ bool channel_thread(const BnParams& p, I& c) {
    c = static_cast<I>(blockIdx.x) * static_cast<I>(blockDim.x) + static_cast<I>(threadIdx.x);
    return c < static_cast<I>(p.c);
}

template <class T, class P, class A>
__device__ __forceinline__ void stats_gather(const BnParams& p) {
    int64_t c;
    if (!channel_thread<A>(p, c)) return;
    const Gmem<const A> means(p.x), invstds(p.dy), counts(p.z);
    const A eps = static_cast<A>(p.eps);
    A n = A(0), mean = A(0), m2 = A(0);
    for (int64_t r = 0; r < p.n; ++r) {
        const A count = counts.ld(r * p.s);
        if (!(count > A(0))) continue;
        const A m = means.ld(r * p.chunk + c);
        const A std = A(1) / invstds.ld(r * p.chunk + c);
        const A rank_m2 = (std * std - eps) * count;
        const A factor = A(1) / (n + count);
        const A d = mean - m;
        m2 += rank_m2 + d * d * n * count * factor;
        mean = n * factor * mean + count * factor * m;
        n += count;
    }
    const A var = m2 / n;
    Gmem<A>(p.save_mean).st(c, mean);
    Gmem<A>(p.save_invstd).st(c, A(1) / acc_sqrt(var + eps));
    if (p.flags & BN_F_UPDATE_RUNNING) {
        const A momentum = static_cast<A>(p.momentum);
        const Gmem<P> rm(p.running_mean), rv(p.running_var);
        const A unbiased = m2 / (n - A(1));
        rm.st(c, from_acc<P>(mean * momentum + (A(1) - momentum) * to_acc<A>(rm.ld(c))));
        rv.st(c, from_acc<P>(unbiased * momentum + (A(1) - momentum) * to_acc<A>(rv.ld(c))));
    }
}

template <class T, class P, class A>
__device__ __forceinline__ void elemt_prep(const BnParams& p) {
    int64_t c;
    if (!channel_thread<A>(p, c)) return;
    const int64_t C = p.c;
    const Gmem<A> ch(p.ws_channel);
    ch.st(kShift * C + c, Gmem<const A>(p.save_mean).ld(c));
    ch.st(kShiftedMean * C + c, A(0));
    ch.st(kInvstd * C + c, Gmem<const A>(p.save_invstd).ld(c));
}

template <class T, class P, class A>
__device__ __forceinline__ void dx_prep(const BnParams& p) {
    int64_t c;
    if (!channel_thread<A>(p, c)) return;
    const Gmem<const A> sums(p.x), counts(p.z);
    A total = A(0);
    for (int64_t r = 0; r < p.n; ++r) total += counts.ld(r * p.s);
    const A ratio = static_cast<A>(p.chunk) / total;
    const Gmem<A> ch(p.ws_channel);
    ch.st(c, sums.ld(c) * ratio);
    ch.st(p.c + c, sums.ld(p.c + c) * ratio);
}

// ---------------------------------------------------------------------------------------
// Variant dispatch and entry points.

template <template <class, class, class, class, int> class Stage, class T, class P, class A>
__device__ __forceinline__ void run_stage(const BnParams& p) {
    constexpr int V = VecWidth<T>::value;
    if (p.flags & BN_F_INDEX64) {
        if (p.flags & BN_F_VEC) {
            Stage<T, P, A, int64_t, V>::run(p);
        } else {
            Stage<T, P, A, int64_t, 1>::run(p);
        }
    } else {
        if (p.flags & BN_F_VEC) {
            Stage<T, P, A, int32_t, V>::run(p);
        } else {
            Stage<T, P, A, int32_t, 1>::run(p);
        }
    }
}

// Writes every BnParams field, widened to 64 bits, to y (as u64[28]), so tests can
// check that Rust and C++ agree on the struct's layout.
__device__ __forceinline__ void selftest_params(const BnParams& p) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    const Gmem<uint64_t> out(p.y);
    const uint64_t ptrs[17] = {p.x,           p.y,           p.dy,          p.dx,          p.weight,
                               p.bias,        p.running_mean, p.running_var, p.save_mean,   p.save_invstd,
                               p.grad_weight, p.grad_bias,   p.ws_counters, p.ws_partials, p.ws_channel,
                               p.z,           p.dz};
    int i = 0;
    for (int j = 0; j < 17; ++j) out.st(i++, ptrs[j]);
    out.st(i++, static_cast<uint64_t>(p.n));
    out.st(i++, static_cast<uint64_t>(p.c));
    out.st(i++, static_cast<uint64_t>(p.s));
    out.st(i++, static_cast<uint64_t>(p.chunk));
    out.st(i++, bits_of(p.eps));
    out.st(i++, bits_of(p.momentum));
    out.st(i++, bits_of(p.bessel));
    out.st(i++, static_cast<uint64_t>(p.flags));
    out.st(i++, static_cast<uint64_t>(p.splits));
    out.st(i++, static_cast<uint64_t>(p.tile_x));
    out.st(i++, static_cast<uint64_t>(p.reserved));
}

}  // namespace bn

// One set of entry points per (input, parameter, accumulator) type triple.
#define BN_ENTRIES(tag, T, P, A)                                                                  \
    BN_KERNEL(bn_fwd_stats_nchw_##tag, bn::run_stage<bn::FwdStatsNchw, T, P, A>);                 \
    BN_KERNEL(bn_fwd_stats_nhwc_##tag, bn::run_stage<bn::FwdStatsNhwc, T, P, A>);                 \
    BN_KERNEL(bn_fwd_norm_nchw_##tag, bn::run_stage<bn::FwdNormNchw, T, P, A>);                   \
    BN_KERNEL(bn_fwd_norm_nhwc_##tag, bn::run_stage<bn::FwdNormNhwc, T, P, A>);                   \
    BN_KERNEL(bn_bwd_reduce_nchw_##tag, bn::run_stage<bn::BwdReduceNchw, T, P, A>);               \
    BN_KERNEL(bn_bwd_reduce_nhwc_##tag, bn::run_stage<bn::BwdReduceNhwc, T, P, A>);               \
    BN_KERNEL(bn_bwd_dx_nchw_##tag, bn::run_stage<bn::BwdDxNchw, T, P, A>);                       \
    BN_KERNEL(bn_bwd_dx_nhwc_##tag, bn::run_stage<bn::BwdDxNhwc, T, P, A>);                       \
    BN_KERNEL(bn_stats_gather_##tag, (bn::stats_gather<T, P, A>));                                \
    BN_KERNEL(bn_elemt_prep_##tag, (bn::elemt_prep<T, P, A>));                                    \
    BN_KERNEL(bn_dx_prep_##tag, (bn::dx_prep<T, P, A>))

BN_ENTRIES(f32, float, float, float);
BN_ENTRIES(f64, double, double, double);
BN_ENTRIES(f16, __half, __half, float);
BN_ENTRIES(bf16, __nv_bfloat16, __nv_bfloat16, float);
BN_ENTRIES(f16_f32, __half, float, float);
BN_ENTRIES(bf16_f32, __nv_bfloat16, float, float);

BN_KERNEL(bn_selftest_params, bn::selftest_params);

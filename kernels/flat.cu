// flat.cu: the "flat" kernel family's entry points: the stages of ilp.cuh one value per
// lane, for what 16-byte vectors cannot take: nchw planes of any size (S = 49 keeps every
// lane busy, no head or tail phases) and nhwc with any C, at any element alignment, with
// 64 bytes of loads in flight per thread all the same.
//
// Entry points: bn_flat_<stage>_<layout>_<tag>[_i64], stage fwd_stats, fwd_norm,
// bwd_reduce, bwd_dx (training), bwd_dx_eval; _i64 for 64-bit index arithmetic.

#include "ilp.cuh"

// Entry points of one (input, parameter, accumulator) triple and index width.
#define BN_FLAT_INDEX(tag, T, P, A, I, suffix)                                                                     \
    BN_KERNEL_RESIDENT(bn_flat_fwd_stats_nchw_##tag##suffix, (bn::flat_resident<bn::IlpStage::Stats, false, T, P>()), bn::run_ilp<bn::IlpFwdStatsNchw, bn::ScalarWidth, T, P, A, I>);                 \
    BN_KERNEL_RESIDENT(bn_flat_fwd_stats_nhwc_##tag##suffix, (bn::flat_resident<bn::IlpStage::Stats, true, T, P>()), bn::run_ilp<bn::IlpFwdStatsNhwc, bn::ScalarWidth, T, P, A, I>);                 \
    BN_KERNEL_RESIDENT(bn_flat_fwd_norm_nchw_##tag##suffix, (bn::flat_resident<bn::IlpStage::Norm, false, T, P>()), bn::run_ilp<bn::IlpFwdNormNchw, bn::ScalarWidth, T, P, A, I>);                   \
    BN_KERNEL_RESIDENT(bn_flat_fwd_norm_nhwc_##tag##suffix, (bn::flat_resident<bn::IlpStage::Norm, true, T, P>()), bn::run_ilp<bn::IlpFwdNormNhwc, bn::ScalarWidth, T, P, A, I>);                   \
    BN_KERNEL_RESIDENT(bn_flat_bwd_reduce_nchw_##tag##suffix, (bn::flat_resident<bn::IlpStage::Other, false, T, P>()), bn::run_ilp<bn::IlpBwdReduceNchw, bn::ScalarWidth, T, P, A, I>);               \
    BN_KERNEL_RESIDENT(bn_flat_bwd_reduce_nhwc_##tag##suffix, (bn::flat_resident<bn::IlpStage::Other, true, T, P>()), bn::run_ilp<bn::IlpBwdReduceNhwc, bn::ScalarWidth, T, P, A, I>);               \
    BN_KERNEL_RESIDENT(bn_flat_bwd_dx_nchw_##tag##suffix, (bn::flat_resident<bn::IlpStage::Other, false, T, P>()), bn::run_ilp<bn::IlpDx<true>::Nchw, bn::ScalarWidth, T, P, A, I>);                  \
    BN_KERNEL_RESIDENT(bn_flat_bwd_dx_nhwc_##tag##suffix, (bn::flat_resident<bn::IlpStage::Other, true, T, P>()), bn::run_ilp<bn::IlpDx<true>::Nhwc, bn::ScalarWidth, T, P, A, I>);                  \
    BN_KERNEL_RESIDENT(bn_flat_bwd_dx_eval_nchw_##tag##suffix, (bn::flat_resident<bn::IlpStage::Other, false, T, P>()), bn::run_ilp<bn::IlpDx<false>::Nchw, bn::ScalarWidth, T, P, A, I>);            \
    BN_KERNEL_RESIDENT(bn_flat_bwd_dx_eval_nhwc_##tag##suffix, (bn::flat_resident<bn::IlpStage::Other, true, T, P>()), bn::run_ilp<bn::IlpDx<false>::Nhwc, bn::ScalarWidth, T, P, A, I>)

#define BN_FLAT_ENTRIES(tag, T, P, A)              \
    BN_FLAT_INDEX(tag, T, P, A, int32_t, /*32*/);  \
    BN_FLAT_INDEX(tag, T, P, A, int64_t, _i64)

BN_FLAT_ENTRIES(f32, float, float, float);
BN_FLAT_ENTRIES(f64, double, double, double);
BN_FLAT_ENTRIES(f16, __half, __half, float);
BN_FLAT_ENTRIES(bf16, __nv_bfloat16, __nv_bfloat16, float);
BN_FLAT_ENTRIES(f16_f32, __half, float, float);
BN_FLAT_ENTRIES(bf16_f32, __nv_bfloat16, float, float);

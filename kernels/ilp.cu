// ilp.cu: the "ilp" kernel family's entry points: the stages of ilp.cuh with 16-byte
// vectors (S, or C in nhwc, a multiple of the vector width; every tensor aligned).
//
// Entry points: bn_ilp_<stage>_<layout>_<tag>[_i64], stage fwd_stats, fwd_norm,
// bwd_reduce, bwd_dx (training), bwd_dx_eval; _i64 for 64-bit index arithmetic.

#include "ilp.cuh"

// Entry points of one (input, parameter, accumulator) triple and index width.
#define BN_ILP_INDEX(tag, T, P, A, I, suffix)                                                                     \
    BN_KERNEL_RESIDENT(bn_ilp_fwd_stats_nchw_##tag##suffix, (bn::ilp_resident<bn::IlpStage::Stats, false, T, P, I>()), bn::run_ilp<bn::IlpFwdStatsNchw, bn::VectorWidth, T, P, A, I>);                 \
    BN_KERNEL_RESIDENT(bn_ilp_fwd_stats_nhwc_##tag##suffix, (bn::ilp_resident<bn::IlpStage::Stats, true, T, P, I>()), bn::run_ilp<bn::IlpFwdStatsNhwc, bn::VectorWidth, T, P, A, I>);                 \
    BN_KERNEL_RESIDENT(bn_ilp_fwd_norm_nchw_##tag##suffix, (bn::ilp_resident<bn::IlpStage::Norm, false, T, P, I>()), bn::run_ilp<bn::IlpFwdNormNchw, bn::VectorWidth, T, P, A, I>);                   \
    BN_KERNEL_RESIDENT(bn_ilp_fwd_norm_nhwc_##tag##suffix, (bn::ilp_resident<bn::IlpStage::Norm, true, T, P, I>()), bn::run_ilp<bn::IlpFwdNormNhwc, bn::VectorWidth, T, P, A, I>);                   \
    BN_KERNEL_RESIDENT(bn_ilp_bwd_reduce_nchw_##tag##suffix, (bn::ilp_resident<bn::IlpStage::Other, false, T, P, I>()), bn::run_ilp<bn::IlpBwdReduceNchw, bn::VectorWidth, T, P, A, I>);               \
    BN_KERNEL_RESIDENT(bn_ilp_bwd_reduce_nhwc_##tag##suffix, (bn::ilp_resident<bn::IlpStage::Other, true, T, P, I>()), bn::run_ilp<bn::IlpBwdReduceNhwc, bn::VectorWidth, T, P, A, I>);               \
    BN_KERNEL_RESIDENT(bn_ilp_bwd_dx_nchw_##tag##suffix, (bn::ilp_resident<bn::IlpStage::Other, false, T, P, I>()), bn::run_ilp<bn::IlpDx<true>::Nchw, bn::VectorWidth, T, P, A, I>);                  \
    BN_KERNEL_RESIDENT(bn_ilp_bwd_dx_nhwc_##tag##suffix, (bn::ilp_resident<bn::IlpStage::Other, true, T, P, I>()), bn::run_ilp<bn::IlpDx<true>::Nhwc, bn::VectorWidth, T, P, A, I>);                  \
    BN_KERNEL_RESIDENT(bn_ilp_bwd_dx_eval_nchw_##tag##suffix, (bn::ilp_resident<bn::IlpStage::Other, false, T, P, I>()), bn::run_ilp<bn::IlpDx<false>::Nchw, bn::VectorWidth, T, P, A, I>);            \
    BN_KERNEL_RESIDENT(bn_ilp_bwd_dx_eval_nhwc_##tag##suffix, (bn::ilp_resident<bn::IlpStage::Other, true, T, P, I>()), bn::run_ilp<bn::IlpDx<false>::Nhwc, bn::VectorWidth, T, P, A, I>)

#define BN_ILP_ENTRIES(tag, T, P, A)              \
    BN_ILP_INDEX(tag, T, P, A, int32_t, /*32*/);  \
    BN_ILP_INDEX(tag, T, P, A, int64_t, _i64)

BN_ILP_ENTRIES(f32, float, float, float);
BN_ILP_ENTRIES(f64, double, double, double);
BN_ILP_ENTRIES(f16, __half, __half, float);
BN_ILP_ENTRIES(bf16, __nv_bfloat16, __nv_bfloat16, float);
BN_ILP_ENTRIES(f16_f32, __half, float, float);
BN_ILP_ENTRIES(bf16_f32, __nv_bfloat16, float, float);

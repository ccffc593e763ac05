// selftest_fp.cu: floating-point state across context switches, checked by tests/misc.rs.
#include <fenv.h>

#include "selftest.cuh"

namespace {

// Eight doubles live across every barrier (callee-saved FP registers where the ABI has
// them). x: f64[threads] (Input), y: f64[threads] (Output), chunk = rounds.
__device__ void fpregs_body(const BnParams& p) {
    const bn::Gmem<double> x(p.x);
    const bn::Gmem<double> y(p.y);
    const unsigned t = blockIdx.x * blockDim.x + threadIdx.x;
    const double v = x.ld(t);
    double a0 = v, a1 = v + 1, a2 = v + 2, a3 = v + 3, a4 = v + 4, a5 = v + 5, a6 = v + 6, a7 = v + 7;
    for (int64_t r = 0; r < p.chunk; ++r) {
        __syncthreads();
        a0 = a0 * 0.5 + a1;
        a1 = a1 * 0.5 + a2;
        a2 = a2 * 0.5 + a3;
        a3 = a3 * 0.5 + a4;
        __syncwarp();
        a4 = a4 * 0.5 + a5;
        a5 = a5 * 0.5 + a6;
        a6 = a6 * 0.5 + a7;
        a7 = a7 * 0.5 + a0;
    }
    y.st(t, a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7);
}

// Each fiber keeps its own rounding mode: odd threads round toward zero across
// barriers, even threads to nearest. x: f32[2] = {1, 3} (Input), y: u32[threads].
__device__ void fpenv_body(const BnParams& p) {
    const bn::Gmem<float> x(p.x);
    const bn::Gmem<uint32_t> y(p.y);
    const unsigned t = blockIdx.x * blockDim.x + threadIdx.x;
    const bool odd = (threadIdx.x & 1u) != 0;
    if (odd) fesetround(FE_TOWARDZERO);
    __syncthreads();
    const float q = x.ld(0) / x.ld(1);
    __syncthreads();
    y.st(t, __float_as_uint(q));
    if (odd) fesetround(FE_TONEAREST);
}

}  // namespace

BN_KERNEL(emu_test_fpregs, fpregs_body);
BN_KERNEL(emu_test_fpenv, fpenv_body);

//! Compile-time behaviour of bn_emu.h, checked by running the C++ compiler that the
//! build uses (skipped, with a note, if none can be run).
use std::path::{Path, PathBuf};
use std::process::Command;

fn compiler() -> Option<String> {
    let candidates = [
        std::env::var("CXX").ok(),
        Some("c++".into()),
        Some("g++".into()),
        Some("clang++".into()),
    ];
    candidates.into_iter().flatten().find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

fn dirs() -> (PathBuf, PathBuf) {
    let emu = Path::new(env!("CARGO_MANIFEST_DIR"));
    (emu.join("include"), emu.join("..").join("kernels"))
}

/// Compiles `source` (syntax only) with the build's flags plus -Werror; returns
/// (success, diagnostics).
fn compile(name: &str, source: &str) -> Option<(bool, String)> {
    let Some(cxx) = compiler() else {
        eprintln!("no C++ compiler found; skipping");
        return None;
    };
    let dir = std::env::temp_dir().join(format!("bn-emu-compile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{name}.cpp"));
    std::fs::write(&file, source).unwrap();
    let (include, kernels) = dirs();
    let out = Command::new(cxx)
        .args([
            "-std=c++17",
            "-fsyntax-only",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-DBN_EMULATION",
        ])
        .arg("-I")
        .arg(&include)
        .arg("-I")
        .arg(&kernels)
        .arg(&file)
        .output()
        .unwrap();
    Some((
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn plain_shared_is_a_compile_error() {
    let src = r#"
#include "common.cuh"
__device__ void f() {
    __shared__ float s[4];
    s[0] = 1.0f;
}
"#;
    if let Some((ok, diag)) = compile("plain_shared", src) {
        assert!(!ok, "plain __shared__ compiled");
        assert!(
            diag.contains("BN_SHARED"),
            "diagnostic does not point to BN_SHARED: {diag}"
        );
    }
}

/// Everything bn_emu.h promises, used once, compiles without a warning under
/// -Wall -Wextra -Werror, also with standard headers included after it.
#[test]
fn full_subset_compiles_warning_free() {
    let src = r#"
#include "common.cuh"
#include <algorithm>
#include <atomic>
#include <memory>
#include <vector>

__device__ __noinline__ int helper(const int* __restrict__ p) { return p[0]; }
__host__ __device__ __forceinline__ float twice(float v) { return 2.0f * v; }
struct __align__(16) Four { float v[4]; };

template <class T>
__device__ T shuffles(T v) {
    v = __shfl_sync(0xffffffffu, v, 3);
    v = __shfl_sync(0xffffffffu, v, 3, 16);
    v = __shfl_up_sync(0xffffffffu, v, 1u);
    v = __shfl_up_sync(0xffffffffu, v, 1u, 8);
    v = __shfl_down_sync(0xffffffffu, v, 2u);
    v = __shfl_down_sync(0xffffffffu, v, 2u, 16);
    v = __shfl_xor_sync(0xffffffffu, v, 4);
    v = __shfl_xor_sync(0xffffffffu, v, 4, 8);
    return v;
}

__device__ void everything(const BnParams& p) {
    const bn::Gmem<float> x(p.x);
    const bn::Gmem<float> y(p.y);
    BN_SHARED(float, s, 64);
    using Pack4 = bn::Pack<float, 4>;
    BN_SHARED(Pack4, packs, 4);
    BN_DYNAMIC_SHARED(double, dyn);
    const unsigned t = threadIdx.x + blockIdx.x * blockDim.x + threadIdx.y + threadIdx.z + blockIdx.y +
                       blockIdx.z + gridDim.x + gridDim.y + gridDim.z + blockDim.y + blockDim.z;
    const dim3 d = blockDim;
    const uint3 i3 = threadIdx;
    (void)d;
    (void)i3;
    s[t % 64] = x.ld(t);
    packs[0].v[0] = 1.0f;
    dyn[0] = 1.0;
    __syncthreads();
    (void)__syncthreads_count(1);
    (void)__syncthreads_and(1);
    (void)__syncthreads_or(0);
    __syncwarp();
    __syncwarp(0xffffu);
    int iv = shuffles<int>(1);
    unsigned uv = shuffles<unsigned>(1u);
    long long llv = shuffles<long long>(1);
    unsigned long long ullv = shuffles<unsigned long long>(1);
    float fv = shuffles<float>(1.0f);
    double dv = shuffles<double>(1.0);
    __half hv = shuffles<__half>(__float2half_rn(1.0f));
    unsigned b = __ballot_sync(0xffffffffu, iv > 0) + static_cast<unsigned>(__all_sync(0xffffffffu, 1)) +
                 static_cast<unsigned>(__any_sync(0xffffffffu, 0)) + __activemask();
    static_assert(warpSize == 32, "warp size");
    int* ip = reinterpret_cast<int*>(y.at(0));
    unsigned* up = reinterpret_cast<unsigned*>(y.at(1));
    unsigned long long* ullp = reinterpret_cast<unsigned long long*>(y.at(2));
    long long* llp = reinterpret_cast<long long*>(y.at(2));
    float* fp = y.at(4);
    double* dp = reinterpret_cast<double*>(y.at(6));
    iv += atomicAdd(ip, 1) + atomicSub(ip, 1) + atomicExch(ip, 1) + atomicCAS(ip, 1, 2) + atomicMax(ip, 3) +
          atomicMin(ip, 0);
    uv += atomicAdd(up, 1u) + atomicSub(up, 1u) + atomicExch(up, 1u) + atomicCAS(up, 1u, 2u) + atomicMax(up, 3u) +
          atomicMin(up, 0u) + atomicInc(up, 7u);
    ullv += atomicAdd(ullp, 1ull) + atomicExch(ullp, 1ull) + atomicCAS(ullp, 1ull, 2ull) + atomicMax(ullp, 3ull) +
            atomicMin(ullp, 0ull);
    llv += atomicMax(llp, 3ll) + atomicMin(llp, 0ll);
    fv += atomicAdd(fp, 1.0f) + atomicExch(fp, 2.0f);
    dv += atomicAdd(dp, 1.0);
    iv += atomicAdd(reinterpret_cast<int*>(&s[0]), 1);
    __threadfence();
    __threadfence_block();
    __threadfence_system();
    __nanosleep(100u);
    fv += rsqrtf(fv) + __fdividef(fv, 3.0f) + __frcp_rn(fv) + __fsqrt_rn(fv) + __fmul_rn(fv, fv) +
          __fadd_rn(fv, fv) + __fmaf_rn(fv, fv, fv) + __expf(fv) + __logf(fv) + sqrtf(fv) + fmaf(fv, fv, fv) +
          fmaxf(fv, 1.0f) + fminf(fv, 1.0f) + fabsf(fv) + expf(fv) + logf(fv) + twice(fv);
    dv += rsqrt(dv) + sqrt(dv) + fma(dv, dv, dv) + fmax(dv, 1.0) + fabs(dv) + exp(dv) + log(dv);
    iv += min(iv, 2) + max(iv, 2) + helper(&iv) + __popc(b) + __clz(iv) + __ffs(iv);
    uv += min(uv, 2u) + max(uv, 2u) + min(uv, 2) + max(2, uv);
    llv += min(llv, 2ll) + max(llv, 2ll);
    ullv += min(ullv, 2ull) + max(ullv, 2ull);
    int64_t i64 = min(p.n, p.c) + max(p.n, p.c);
    fv += min(fv, 2.0f) + max(fv, 2.0f);
    dv += min(dv, 2.0) + max(dv, 2.0);
    const __nv_bfloat16 bf = __float2bfloat16_rn(fv);
    fv += __half2float(hv) + __bfloat162float(bf) + __half2float(__float2half_rn(fv));
    Four four{};
    four.v[0] = fv;
    if (p.flags & 1u) bn_emu::grid_sync();
    y.st(t, fv + static_cast<float>(dv) + static_cast<float>(iv + uv + llv + ullv + i64) + four.v[0]);
    std::vector<int> v{1, 2, 3};
    (void)std::max_element(v.begin(), v.end());
    std::shared_ptr<int> sp = std::make_shared<int>(3);
    (void)sp;
}

BN_KERNEL(compile_check_everything, everything);
"#;
    if let Some((ok, diag)) = compile("everything", src) {
        assert!(ok, "the full subset did not compile warning-free:\n{diag}");
    }
}

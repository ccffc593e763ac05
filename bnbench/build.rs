//! Sets cfg `cuda_batchnorm_ptx` when cuda-batchnorm was built with its kernels (its
//! build script says so through `links` metadata), so that the tests that need them are
//! ignored, as the test runner reports them, in a build without.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(cuda_batchnorm_ptx)");
    println!("cargo:rerun-if-env-changed=DEP_CUDA_BATCHNORM_PTX");
    if std::env::var("DEP_CUDA_BATCHNORM_PTX").is_ok_and(|v| v == "1") {
        println!("cargo:rustc-cfg=cuda_batchnorm_ptx");
    }
}

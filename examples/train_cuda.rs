//! The same training loop as train_cpu, on CUDA. Without a GPU it says why and how to
//! run it anyway (on the emulated CUDA driver that the tests build), and exits 0.
//!
//!     cargo run --example train_cuda

mod common;

use cuda_batchnorm::{open_device, ptx_unavailable, Cuda};

fn main() -> cuda_batchnorm::Result<()> {
    if let Some(why) = ptx_unavailable() {
        println!("train_cuda: this build has no GPU kernels ({why})");
        return Ok(());
    }
    let ctx = match open_device(0) {
        Ok(ctx) => ctx,
        Err(e) => {
            println!("train_cuda: no GPU here: {e}");
            println!(
                "(to run it on the CPU emulation of the CUDA driver: `cargo test` builds it; then\n \
                 LD_LIBRARY_PATH=\"$(dirname \"$(ls -t target/debug/build/cuda-batchnorm-emu-*/out/driver/libcuda.so | head -1)\")\" \
                 cargo run --example train_cuda)"
            );
            return Ok(());
        }
    };
    println!("train_cuda: {}", ctx.name()?);
    let (w, b, loss) = common::train(Cuda::new(&ctx.default_stream()))?;
    println!("weight {w:.4?}, bias {b:.4?} (targets 2 and 1), loss {loss:.2e}");
    let close = |v: &[f32], t: f32| v.iter().all(|x| (x - t).abs() < 0.05);
    if !(close(&w, 2.0) && close(&b, 1.0)) {
        eprintln!("train_cuda: did not converge");
        std::process::exit(1);
    }
    Ok(())
}

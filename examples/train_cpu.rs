//! A training loop on the CPU backend: a BatchNorm2d learns, by SGD through its
//! backward, the affine map from normalised inputs to their targets (weight 2, bias 1).
//!
//!     cargo run --example train_cpu

mod common;

fn main() -> cuda_batchnorm::Result<()> {
    let (w, b, loss) = common::train(cuda_batchnorm::Cpu)?;
    println!("weight {w:.4?}, bias {b:.4?} (targets 2 and 1), loss {loss:.2e}");
    let close = |v: &[f32], t: f32| v.iter().all(|x| (x - t).abs() < 0.05);
    if !(close(&w, 2.0) && close(&b, 1.0)) {
        eprintln!("train_cpu: did not converge");
        std::process::exit(1);
    }
    Ok(())
}

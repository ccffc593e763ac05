//! A training step and an eval forward through cuda-batchnorm's CUDA modules, checked
//! against its CPU backend; prints `ok` and exits 0. Without a driver it prints the
//! crate's typed error and exits 3 (ci/dependents/run expects that where it runs it
//! without one).

use cuda_batchnorm::cpu::reference::to_f64;
use cuda_batchnorm::{cpu, nn, BatchNormOptions, Cpu, Cuda, Shape};

fn main() {
    if let Err(e) = run() {
        println!("error: {e}");
        std::process::exit(if matches!(e, cuda_batchnorm::BnError::NoDriver) {
            3
        } else {
            1
        });
    }
    println!("ok");
}

fn run() -> cuda_batchnorm::Result<()> {
    let ctx = cuda_batchnorm::open_device(0)?;
    let stream = ctx.default_stream();
    let shape = Shape::nchw(4, 6, 5, 7)?;
    let x: Vec<f32> = (0..shape.numel())
        .map(|i| ((i * 37) % 23) as f32 * 0.25 - 2.0)
        .collect();
    let dy: Vec<f32> = (0..shape.numel())
        .map(|i| ((i * 11) % 7) as f32 - 3.0)
        .collect();
    let opts = BatchNormOptions::default();
    let mut on_gpu = nn::BatchNorm2d::<f32>::new(Cuda::new(&stream), 6, opts)?;
    let mut on_cpu = cpu::BatchNorm2d::<f32>::new(Cpu, 6, opts)?;
    let (xg, dyg) = (stream.clone_htod(&x)?, stream.clone_htod(&dy)?);
    let y = stream.clone_dtoh(&on_gpu.forward(&xg, &shape)?)?;
    let g = on_gpu.backward(&dyg, &xg, &shape)?;
    let dx = stream.clone_dtoh(&g.input)?;
    let y_cpu = on_cpu.forward(&x, &shape)?;
    let g_cpu = on_cpu.backward(&dy, &x, &shape)?;
    on_gpu.eval();
    on_cpu.eval();
    let y_eval = stream.clone_dtoh(&on_gpu.forward(&xg, &shape)?)?;
    let y_eval_cpu = on_cpu.forward(&x, &shape)?;
    for (what, a, b) in [
        ("train y", &y, &y_cpu),
        ("dx", &dx, &g_cpu.input),
        ("eval y", &y_eval, &y_eval_cpu),
    ] {
        let worst = to_f64(a)
            .iter()
            .zip(to_f64(b))
            .map(|(u, v)| (u - v).abs())
            .fold(0.0, f64::max);
        if !(worst <= 1e-4) {
            return Err(cuda_batchnorm::BnError::Launch(format!(
                "{what} differs from the CPU backend by {worst}"
            )));
        }
    }
    Ok(())
}

//! An inference server's eval path: every BatchNorm layer of a PyTorch model loaded from
//! a `.safetensors` state dict, then served from several threads, each with its own
//! CUDA stream, through `infer` (shared references, no allocation in the call). Without
//! a GPU it serves on the CPU backend instead. With the fixture's recorded inputs and
//! outputs (tests/fixtures/cnn_layers.safetensors) it checks every answer against
//! PyTorch's.
//!
//!     cargo run --example serve_safetensors [MODEL.safetensors [LAYERS.safetensors]]

use std::sync::Arc;

use cuda_batchnorm::prelude::*;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let model = args.next().unwrap_or(format!("{fixtures}/cnn.safetensors"));
    let records = args
        .next()
        .unwrap_or(format!("{fixtures}/cnn_layers.safetensors"));
    let weights = Weights::read(&model)?;
    let io = Weights::read(&records)?;
    println!(
        "{model}: {} BatchNorm layers",
        weights.batchnorm_prefixes().len()
    );
    let gpu = if ptx_unavailable().is_none() {
        open_device(0).ok()
    } else {
        None
    };
    let mut worst = 0.0f64;
    for prefix in weights.batchnorm_prefixes() {
        let (Some(dims), Some(Ok(x)), Some(Ok(want))) = (
            io.shape(&format!("{prefix}.input")).map(<[usize]>::to_vec),
            io.values::<f32>(&format!("{prefix}.input")),
            io.values::<f32>(&format!("{prefix}.output")),
        ) else {
            println!("{prefix}: no recorded input, skipped");
            continue;
        };
        let shape = Shape::new(&dims, MemoryFormat::Contiguous)?;
        let y = match &gpu {
            Some(ctx) => serve_on_gpu(ctx, &weights, prefix, &shape, &x)?,
            None => serve_on_cpu(&weights, prefix, &shape, &x)?,
        };
        let err = y
            .iter()
            .zip(&want)
            .map(|(a, b)| f64::from((a - b).abs()))
            .fold(0.0, f64::max);
        worst = worst.max(err);
        println!("{prefix:<24} {dims:?}: max |y - PyTorch| = {err:.2e}");
    }
    println!(
        "served on {}; worst difference {worst:.2e}",
        gpu.as_ref()
            .and_then(|c| c.name().ok())
            .unwrap_or_else(|| "the CPU backend (no GPU here)".into())
    );
    if worst > 1e-4 {
        std::process::exit(1);
    }
    Ok(())
}

/// A served layer: its eval forward on a stream, host values in and out.
type Layer = dyn Fn(&Arc<cuda_batchnorm::cudarc::driver::CudaStream>, &[f32]) -> Result<Vec<f32>>
    + Send
    + Sync;

/// The layer as a CUDA module in eval mode, shared by four threads that each run it on
/// their own stream; returns the first thread's output.
fn serve_on_gpu(
    ctx: &Arc<cuda_batchnorm::cudarc::driver::CudaContext>,
    weights: &Weights,
    prefix: &str,
    shape: &Shape,
    x: &[f32],
) -> Result<Vec<f32>> {
    let c = shape.c();
    let stream = ctx.default_stream();
    // BatchNorm1d for (N, C), BatchNorm2d for (N, C, H, W): the rank each accepts.
    let layer: Arc<Layer> = if shape.rank() == 2 {
        let mut bn = BatchNorm1d::<f32>::new(Cuda::new(&stream), c, BatchNormOptions::default())?;
        bn.load_safetensors(weights, prefix, true)?;
        bn.eval();
        let shape = *shape;
        Arc::new(move |s, x| {
            let input = s.clone_htod(x)?;
            let mut out = s.alloc_zeros::<f32>(x.len())?;
            bn.infer(s, &input, &shape, &mut out)?;
            Ok(s.clone_dtoh(&out)?)
        })
    } else {
        let mut bn = BatchNorm2d::<f32>::new(Cuda::new(&stream), c, BatchNormOptions::default())?;
        bn.load_safetensors(weights, prefix, true)?;
        bn.eval();
        let shape = *shape;
        Arc::new(move |s, x| {
            let input = s.clone_htod(x)?;
            let mut out = s.alloc_zeros::<f32>(x.len())?;
            bn.infer(s, &input, &shape, &mut out)?;
            Ok(s.clone_dtoh(&out)?)
        })
    };
    let answers: Vec<Result<Vec<f32>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (layer, ctx) = (layer.clone(), ctx.clone());
                scope.spawn(move || layer(&ctx.new_stream()?, x))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or(Err(BnError::Launch("a serving thread panicked".into())))
            })
            .collect()
    });
    let mut answers = answers.into_iter();
    let first = answers
        .next()
        .unwrap_or(Err(BnError::Launch("no thread".into())))?;
    for other in answers {
        if other? != first {
            return Err(BnError::Launch("threads disagree".into()));
        }
    }
    Ok(first)
}

/// The layer as a CPU module in eval mode.
fn serve_on_cpu(weights: &Weights, prefix: &str, shape: &Shape, x: &[f32]) -> Result<Vec<f32>> {
    let c = shape.c();
    if shape.rank() == 2 {
        let mut bn = cpu::BatchNorm1d::<f32>::new(Cpu, c, BatchNormOptions::default())?;
        bn.load_safetensors(weights, prefix, true)?;
        bn.eval();
        bn.forward(x, shape)
    } else {
        let mut bn = cpu::BatchNorm2d::<f32>::new(Cpu, c, BatchNormOptions::default())?;
        bn.load_safetensors(weights, prefix, true)?;
        bn.eval();
        bn.forward(x, shape)
    }
}

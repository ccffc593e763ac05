//! Criterion benchmarks of cuda-batchnorm's GPU operations on a few representative
//! shapes: ResNet-50's (32, 256, 56, 56) in NCHW and NHWC, f32 and f16, and a
//! BatchNorm1d (4096, 1024) f32; training forward, eval forward and backward, the frozen
//! eval, and the fused add-ReLU epilogue beside our unfused sequence of it.
//!
//! Each sample runs the op `iters` times between two stream synchronisations and
//! reports the wall time; inputs stay in L2 where they fit (use `bnbench` for the
//! L2-flushed, event-timed numbers). Without a GPU, or in a build without PTX, it
//! prints one line and exits successfully.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use cuda_batchnorm::cudarc::driver::CudaStream;
use cuda_batchnorm::half::f16;
use cuda_batchnorm::{BnError, DType, Float, MemoryFormat, ParamFor, Shape, Workspace};

// The SyncBatchNorm ops need a communicator: bnbench times them, these benches do not.
#[allow(dead_code)]
#[path = "../bnbench/src/ops.rs"]
mod ops;

use ops::{Epi, FusedBuffers, OpBuffers};

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// The buffers of one shape, filled with a cheap deterministic pattern (never zero),
/// with saved statistics from one training forward for the backward.
fn case<T: Float, P: ParamFor<T>>(
    s: &Arc<CudaStream>,
    shape: Shape,
) -> Result<OpBuffers<T, P>, String> {
    let (n, c) = (shape.numel(), shape.c());
    let x: Vec<T> = (0..n)
        .map(|i| T::from_f64(((i * 7919) % 1009) as f64 / 200.0 - 2.4))
        .collect();
    let dy: Vec<T> = (0..n)
        .map(|i| T::from_f64(((i * 104_729) % 997) as f64 / 400.0 - 1.1))
        .collect();
    let p = |v: f64| s.clone_htod(&vec![P::from_f64(v); c]).map_err(err);
    let mut case = OpBuffers {
        shape,
        x: s.clone_htod(&x).map_err(err)?,
        y: s.alloc_zeros::<T>(n).map_err(err)?,
        dy: Some(s.clone_htod(&dy).map_err(err)?),
        dx: Some(s.alloc_zeros::<T>(n).map_err(err)?),
        w: p(1.25)?,
        b: p(0.5)?,
        rm: p(0.0)?,
        rv: p(1.0)?,
        sm: s.alloc_zeros::<T::Acc>(c).map_err(err)?,
        si: s.alloc_zeros::<T::Acc>(c).map_err(err)?,
        gw: s.alloc_zeros::<P>(c).map_err(err)?,
        gb: s.alloc_zeros::<P>(c).map_err(err)?,
        ws: Workspace::for_shape(s, &shape, T::DTYPE).map_err(err)?,
        fused: None,
        sync: None,
    };
    let mut identity = vec![<T::Acc as Float>::from_f64(1.0); c];
    identity.resize(2 * c, <T::Acc as Float>::from_f64(0.0));
    let frozen: Vec<T::Acc> = (0..2 * c)
        .map(|i| <T::Acc as Float>::from_f64(if i < c { 1.25 } else { 0.5 }))
        .collect();
    case.fused = Some(FusedBuffers {
        z: s.clone_htod(&dy).map_err(err)?,
        tmp: s.alloc_zeros::<T>(n).map_err(err)?,
        dz: s.alloc_zeros::<T>(n).map_err(err)?,
        identity: s.clone_htod(&identity).map_err(err)?,
        frozen: s.clone_htod(&frozen).map_err(err)?,
    });
    case.train(s).map_err(err)?;
    s.synchronize().map_err(err)?;
    Ok(case)
}

/// Runs `op` `iters` times between stream synchronisations.
fn timed(s: &Arc<CudaStream>, iters: u64, mut op: impl FnMut() -> Result<(), BnError>) -> Duration {
    s.synchronize().expect("stream synchronisation");
    let start = Instant::now();
    for _ in 0..iters {
        op().expect("batch norm call");
    }
    s.synchronize().expect("stream synchronisation");
    start.elapsed()
}

fn bench_case<T: Float, P: ParamFor<T>>(c: &mut Criterion, s: &Arc<CudaStream>, shape: Shape) {
    let name = format!(
        "{} {} {}",
        shape
            .dims()
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("x"),
        shape.format().name(),
        T::DTYPE.name()
    );
    let mut case = match case::<T, P>(s, shape) {
        Ok(case) => case,
        Err(e) => {
            println!("batchnorm bench: {name} skipped: {e}");
            return;
        }
    };
    let io = (shape.numel() * T::DTYPE.size()) as u64;
    let mut g = c.benchmark_group(name.clone());
    g.sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    g.throughput(Throughput::Bytes(2 * io));
    g.bench_function("train_fwd", |bch| {
        bch.iter_custom(|iters| timed(s, iters, || case.train(s)))
    });
    g.bench_function("eval_fwd", |bch| {
        bch.iter_custom(|iters| timed(s, iters, || case.eval(s)))
    });
    g.bench_function("frozen_eval", |bch| {
        bch.iter_custom(|iters| timed(s, iters, || case.frozen_eval(s)))
    });
    g.bench_function("eval_relu", |bch| {
        bch.iter_custom(|iters| timed(s, iters, || case.eval_fused(s, Epi::Relu)))
    });
    g.throughput(Throughput::Bytes(3 * io));
    g.bench_function("backward", |bch| {
        bch.iter_custom(|iters| timed(s, iters, || case.backward(s)))
    });
    g.bench_function("eval_add_relu", |bch| {
        bch.iter_custom(|iters| timed(s, iters, || case.eval_fused(s, Epi::AddRelu)))
    });
    g.bench_function("eval_add_relu_seq", |bch| {
        bch.iter_custom(|iters| timed(s, iters, || case.eval_seq(s, Epi::AddRelu)))
    });
    g.bench_function("train_fwd_add_relu", |bch| {
        bch.iter_custom(|iters| timed(s, iters, || case.train_fused(s, Epi::AddRelu)))
    });
    g.bench_function("train_fwd_add_relu_seq", |bch| {
        bch.iter_custom(|iters| timed(s, iters, || case.train_seq(s, Epi::AddRelu)))
    });
    // The fused backward's mask comes from the fused forward's y.
    if let Err(e) = case.train_fused(s, Epi::AddRelu) {
        println!("batchnorm bench: {name}: the fused forward failed: {e}");
        g.finish();
        return;
    }
    g.throughput(Throughput::Bytes(5 * io));
    g.bench_function("backward_add_relu", |bch| {
        bch.iter_custom(|iters| timed(s, iters, || case.backward_fused(s, Epi::AddRelu)))
    });
    g.throughput(Throughput::Bytes(4 * io));
    g.bench_function("backward_relu_seq", |bch| {
        bch.iter_custom(|iters| timed(s, iters, || case.backward_seq(s)))
    });
    g.finish();
}

/// The stream to benchmark on, or why there is none.
fn gpu() -> Result<Arc<CudaStream>, String> {
    let ptx = cuda_batchnorm::ptx_unavailable().map(|r| BnError::PtxUnavailable(r).to_string());
    let ctx = cuda_batchnorm::open_device(0).map_err(|e| match &ptx {
        Some(p) => format!("{e}; also, {p}"),
        None => e.to_string(),
    })?;
    if let Some(p) = ptx {
        return Err(p);
    }
    let s = ctx.default_stream();
    // Loads the kernels, so that a driver refusing the PTX says so here.
    Workspace::for_shape(&s, &Shape::nc(2, 1).map_err(err)?, DType::F32).map_err(err)?;
    Ok(s)
}

fn main() {
    let s = match gpu() {
        Ok(s) => s,
        Err(why) => {
            println!("batchnorm bench: no GPU run: {why}");
            return;
        }
    };
    let mut c = Criterion::default().configure_from_args();
    let resnet = [32, 256, 56, 56];
    for format in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
        let shape = Shape::new(&resnet, format).expect("valid shape");
        bench_case::<f32, f32>(&mut c, &s, shape);
        bench_case::<f16, f32>(&mut c, &s, shape);
    }
    bench_case::<f32, f32>(&mut c, &s, Shape::nc(4096, 1024).expect("valid shape"));
    c.final_summary();
}

//! The kernels on a real GPU against the f64 reference, through the safe functional API
//! and the modules, every output surrounded by sentinels that must survive.
//!
//! Built without PTX (no nvcc), every test is ignored, and the test runner reports it
//! so. Built with PTX on a machine without a CUDA driver, they run on the emulated CUDA
//! driver (below); with `CUDA_BATCHNORM_REQUIRE_GPU=1` (set by .gpu/run) a missing GPU
//! fails them instead. Tests named `huge_` allocate gigabytes and need a GPU's speed:
//! they are ignored unless asked for (`--include-ignored`, as .gpu/run does outside
//! compute-sanitizer).

mod common;

use std::io::Write;
use std::sync::Arc;

use common::{
    check_guards, fixtures, GradOut, Padded, Problem, Runner, TrainOut, CASES, TYPE_PAIRS,
};
use cuda_batchnorm::cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use cuda_batchnorm::functional::{
    self, batch_norm, batch_norm_backward, batch_norm_eval, BackwardStats, Eval, Forward, Grads,
    SaveStats,
};
use cuda_batchnorm::half::f16;
use cuda_batchnorm::nn::BatchNorm2d;
use cuda_batchnorm::{
    open_device, ptx_unavailable, Backend, BatchNormOptions, BnError, Cuda, DType, Float,
    MemoryFormat, ParamFor, Shape, Workspace,
};

/// A device for one test: a real GPU, or the emulated CUDA driver.
struct Gpu {
    stream: Arc<CudaStream>,
    emulated: bool,
}

/// Opens device 0 for `test`, or returns None (after printing why) when it should skip.
///
/// Where the process finds no CUDA driver at all, the tests run on the emulated driver
/// (`cuda_batchnorm_emu::driver`): cudarc, the module loading and every launch run as
/// on a GPU, with the kernels executed by the emulator. So plain `cargo test` runs this
/// file's host-side GPU path too. `CUDA_BATCHNORM_REQUIRE_GPU=1` asks for real hardware:
/// the emulated driver is not used, and a missing GPU fails the test.
fn gpu(test: &str) -> Option<Gpu> {
    let required = std::env::var("CUDA_BATCHNORM_REQUIRE_GPU").is_ok_and(|v| v == "1");
    let why = match (ptx_unavailable(), open_device(0)) {
        (None, Ok(ctx)) => {
            // The emulated driver, preloaded (below, by an earlier test) or found through
            // LD_LIBRARY_PATH (the .gpu/run dry run), is known by its device name.
            let emulated = ctx
                .name()
                .is_ok_and(|n| n == cuda_batchnorm_emu::driver::DEVICE_NAME);
            return Some(Gpu {
                stream: ctx.default_stream(),
                emulated,
            });
        }
        (Some(reason), _) => format!("built without PTX: {reason}"),
        (None, Err(BnError::NoDriver)) if !required => {
            match cuda_batchnorm_emu::driver::preload().map_err(BnError::NoDevice) {
                Ok(()) => match open_device(0) {
                    Ok(ctx) => {
                        assert_eq!(
                            ctx.name().ok().as_deref(),
                            Some(cuda_batchnorm_emu::driver::DEVICE_NAME),
                            "driver::DEVICE_NAME differs from the emulated driver's device name"
                        );
                        let _ = writeln!(
                            std::io::stderr(),
                            "{test}: no CUDA driver here, running on the emulated driver"
                        );
                        return Some(Gpu {
                            stream: ctx.default_stream(),
                            emulated: true,
                        });
                    }
                    Err(e) => format!("the emulated driver failed: {e}"),
                },
                Err(e) => e.to_string(),
            }
        }
        (None, Err(e)) => e.to_string(),
    };
    assert!(
        !required,
        "CUDA_BATCHNORM_REQUIRE_GPU=1 but {test} cannot run: {why}"
    );
    // Written to the stderr handle rather than with eprintln!, which the test harness
    // captures: the skip should be visible in a plain `cargo test`.
    let _ = writeln!(std::io::stderr(), "skipping GPU test {test}: {why}");
    None
}

/// Skips a test that is too large for the emulated driver (the emulated suite runs the
/// same check: `cargo test --release --test emulated -- --ignored`).
fn hardware_only(test: &str, gpu: Option<Gpu>) -> Option<Arc<CudaStream>> {
    let gpu = gpu?;
    if gpu.emulated {
        let _ = writeln!(
            std::io::stderr(),
            "skipping {test} on the emulated driver: it needs a GPU's speed and memory"
        );
        return None;
    }
    Some(gpu.stream)
}

struct GpuRunner {
    stream: Arc<CudaStream>,
    pad: usize,
}

impl GpuRunner {
    fn up<E: Float>(&self, p: &Padded<E>) -> CudaSlice<E> {
        self.stream.clone_htod(&p.data).expect("upload")
    }

    /// Downloads a padded buffer, checks its guards and returns the payload.
    fn down<E: Float>(&self, what: &str, b: &CudaSlice<E>, len: usize) -> Result<Vec<E>, String> {
        let all = self
            .stream
            .clone_dtoh(b)
            .map_err(|e| format!("{what}: {e}"))?;
        check_guards(what, &all, self.pad, len)?;
        Ok(all[self.pad..self.pad + len].to_vec())
    }

    fn opt_up<E: Float>(&self, v: &Option<Vec<E>>) -> Option<CudaSlice<E>> {
        v.as_ref().map(|v| self.up(&Padded::new(v, self.pad)))
    }
}

impl Runner for GpuRunner {
    fn train_forward<T: Float, P: ParamFor<T>>(
        &self,
        p: &Problem<T, P>,
    ) -> Result<TrainOut<T, P, T::Acc>, String> {
        let (n, c, pad) = (p.shape.numel(), p.shape.c(), self.pad);
        let x = self.up(&Padded::new(&p.x, pad));
        let mut y = self.up(&Padded::<T>::output(n, pad));
        let mut rm = self.up(&Padded::new(&p.running_mean, pad));
        let mut rv = self.up(&Padded::new(&p.running_var, pad));
        let mut sm = self.up(&Padded::<T::Acc>::output(c, pad));
        let mut si = self.up(&Padded::<T::Acc>::output(c, pad));
        let (w, b) = (self.opt_up(&p.weight), self.opt_up(&p.bias));
        {
            let xv = x.slice(pad..pad + n);
            let mut yv = y.slice_mut(pad..pad + n);
            let (mut rmv, mut rvv) = (rm.slice_mut(pad..pad + c), rv.slice_mut(pad..pad + c));
            let (mut smv, mut siv) = (sm.slice_mut(pad..pad + c), si.slice_mut(pad..pad + c));
            let wv = w.as_ref().map(|w| w.slice(pad..pad + c));
            let bv = b.as_ref().map(|b| b.slice(pad..pad + c));
            let args = Forward::<T, P> {
                input: &xv,
                shape: p.shape,
                running_mean: Some(&mut rmv),
                running_var: Some(&mut rvv),
                weight: wv.as_ref().map(|v| v as &dyn DevicePtr<P>),
                bias: bv.as_ref().map(|v| v as &dyn DevicePtr<P>),
                training: true,
                momentum: p.momentum,
                eps: p.eps,
            };
            let save = SaveStats {
                mean: &mut smv,
                invstd: &mut siv,
            };
            batch_norm(
                &self.stream,
                args,
                &mut yv,
                Some(save),
                &mut Workspace::new(),
            )
            .map_err(|e| e.to_string())?;
        }
        self.down("input", &x, n)?;
        Ok(TrainOut {
            y: self.down("output", &y, n)?,
            save_mean: self.down("save_mean", &sm, c)?,
            save_invstd: self.down("save_invstd", &si, c)?,
            running_mean: self.down("running_mean", &rm, c)?,
            running_var: self.down("running_var", &rv, c)?,
        })
    }

    fn eval_forward<T: Float, P: ParamFor<T>>(&self, p: &Problem<T, P>) -> Result<Vec<T>, String> {
        let (n, c, pad) = (p.shape.numel(), p.shape.c(), self.pad);
        let x = self.up(&Padded::new(&p.x, pad));
        let mut y = self.up(&Padded::<T>::output(n, pad));
        let rm = self.up(&Padded::new(&p.running_mean, pad));
        let rv = self.up(&Padded::new(&p.running_var, pad));
        let (w, b) = (self.opt_up(&p.weight), self.opt_up(&p.bias));
        {
            let (xv, rmv, rvv) = (
                x.slice(pad..pad + n),
                rm.slice(pad..pad + c),
                rv.slice(pad..pad + c),
            );
            let mut yv = y.slice_mut(pad..pad + n);
            let wv = w.as_ref().map(|w| w.slice(pad..pad + c));
            let bv = b.as_ref().map(|b| b.slice(pad..pad + c));
            let args = Eval::<T, P> {
                input: &xv,
                shape: p.shape,
                running_mean: &rmv,
                running_var: &rvv,
                weight: wv.as_ref().map(|v| v as &dyn DevicePtr<P>),
                bias: bv.as_ref().map(|v| v as &dyn DevicePtr<P>),
                eps: p.eps,
            };
            batch_norm_eval(&self.stream, args, &mut yv).map_err(|e| e.to_string())?;
        }
        self.down("output", &y, n)
    }

    fn backward<T: Float, P: ParamFor<T>>(
        &self,
        p: &Problem<T, P>,
        saved: common::Saved<'_, T::Acc>,
    ) -> Result<GradOut<T, P>, String> {
        let (n, c, pad) = (p.shape.numel(), p.shape.c(), self.pad);
        let x = self.up(&Padded::new(&p.x, pad));
        let dy = self.up(&Padded::new(&p.dy, pad));
        let mut dx = self.up(&Padded::<T>::output(n, pad));
        let w = self.opt_up(&p.weight);
        let affine = p.weight.is_some();
        let mut gw = affine.then(|| self.up(&Padded::<P>::output(c, pad)));
        let mut gb = affine.then(|| self.up(&Padded::<P>::output(c, pad)));
        let rm = self.up(&Padded::new(&p.running_mean, pad));
        let rv = self.up(&Padded::new(&p.running_var, pad));
        let (sm, si) = match saved {
            Some((m, i)) => (self.up(&Padded::new(m, pad)), self.up(&Padded::new(i, pad))),
            None => (
                self.up(&Padded::new(&vec![T::Acc::default(); c], pad)),
                self.up(&Padded::new(&vec![T::Acc::default(); c], pad)),
            ),
        };
        {
            let (xv, dyv) = (x.slice(pad..pad + n), dy.slice(pad..pad + n));
            let mut dxv = dx.slice_mut(pad..pad + n);
            let wv = w.as_ref().map(|w| w.slice(pad..pad + c));
            let (smv, siv, rmv, rvv) = (
                sm.slice(pad..pad + c),
                si.slice(pad..pad + c),
                rm.slice(pad..pad + c),
                rv.slice(pad..pad + c),
            );
            let mut gwv = gw.as_mut().map(|g| g.slice_mut(pad..pad + c));
            let mut gbv = gb.as_mut().map(|g| g.slice_mut(pad..pad + c));
            let stats = match saved {
                Some(_) => BackwardStats::Batch {
                    save_mean: &smv,
                    save_invstd: &siv,
                },
                None => BackwardStats::Running {
                    mean: &rmv,
                    var: &rvv,
                    eps: p.eps,
                },
            };
            let args = functional::Backward::<T, P> {
                grad_output: &dyv,
                input: &xv,
                shape: p.shape,
                weight: wv.as_ref().map(|v| v as &dyn DevicePtr<P>),
                stats,
            };
            let grads = Grads {
                input: &mut dxv,
                weight: gwv.as_mut().map(|g| g as _),
                bias: gbv.as_mut().map(|g| g as _),
            };
            batch_norm_backward(&self.stream, args, grads, &mut Workspace::new())
                .map_err(|e| e.to_string())?;
        }
        Ok(GradOut {
            dx: self.down("grad_input", &dx, n)?,
            dweight: gw
                .as_ref()
                .map(|g| self.down("grad_weight", g, c))
                .transpose()?,
            dbias: gb
                .as_ref()
                .map(|g| self.down("grad_bias", g, c))
                .transpose()?,
        })
    }
}

#[test]
#[cfg_attr(
    not(cuda_batchnorm_ptx),
    ignore = "built without PTX (no nvcc at build time; see the README's Getting nvcc)"
)]
fn kernels_match_the_reference() {
    let Some(Gpu { stream, .. }) = gpu("kernels_match_the_reference") else {
        return;
    };
    // Under compute-sanitizer (.gpu/run sets CUDA_BATCHNORM_GPU_TEST_SUBSET=1) every
    // launch is many times slower: three cases at each padding, the aligned one (16
    // values: the ilp and persistent families the planner gives real tensors; [64, 16,
    // 1, 1] and channels-last [8, 12, 16, 16] reach the persistent nhwc kernels) and the
    // misaligned one (17: baseline and flat).
    let subset = std::env::var("CUDA_BATCHNORM_GPU_TEST_SUBSET").is_ok_and(|v| v == "1");
    let aligned = [CASES[0], CASES[2], CASES[9]];
    let runs: [(usize, &[common::Case]); 2] = if subset {
        [(16, &aligned), (17, &CASES[..3])]
    } else {
        [(16, CASES), (17, CASES)]
    };
    for (pad, cases) in runs {
        let runner = GpuRunner {
            stream: stream.clone(),
            pad,
        };
        common::check_cases(&format!("pad {pad}"), &runner, cases, TYPE_PAIRS, 0);
    }
}

#[test]
#[cfg_attr(
    not(cuda_batchnorm_ptx),
    ignore = "built without PTX (no nvcc at build time; see the README's Getting nvcc)"
)]
fn fixtures_on_the_gpu() {
    let Some(Gpu { stream, .. }) = gpu("fixtures_on_the_gpu") else {
        return;
    };
    let mut failures = Vec::new();
    for case in fixtures::all() {
        let r = with_types!((case.dtype, case.param), |T, P| fixtures::replay::<
            Cuda,
            T,
            P,
        >(
            Cuda::new(&stream), &case
        ));
        if let Err(e) = r {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
#[cfg_attr(
    not(cuda_batchnorm_ptx),
    ignore = "built without PTX (no nvcc at build time; see the README's Getting nvcc)"
)]
fn eval_is_bitwise_equal_across_formats() {
    let Some(Gpu { stream, .. }) = gpu("eval_is_bitwise_equal_across_formats") else {
        return;
    };
    use cuda_batchnorm::half::f16;
    let runner = GpuRunner { stream, pad: 16 };
    let case = common::Case {
        dims: &[8, 24, 13, 13],
        data: common::Data::Normal,
        affine: true,
    };
    common::check_eval_bitwise_across_formats::<_, f32, f32>(&runner, &case).unwrap();
    common::check_eval_bitwise_across_formats::<_, f16, f16>(&runner, &case).unwrap();
}

/// PyTorch's half-overflow test shape: (4, 80, 500, 500) f16 whose naive f16 sum of
/// squares overflows normalises finitely and agrees with f32; the backward with f32
/// parameters stays finite.
#[test]
#[ignore = "needs a GPU's memory and speed: .gpu/run runs it (--include-ignored)"]
fn huge_half_overflow() {
    let Some(stream) = hardware_only("huge_half_overflow", gpu("huge_half_overflow")) else {
        return;
    };
    let case = common::Case {
        dims: &[4, 80, 500, 500],
        data: common::Data::Large,
        affine: true,
    };
    common::check_half_overflow(
        &GpuRunner { stream, pad: 16 },
        &case,
        MemoryFormat::Contiguous,
    )
    .unwrap();
}

/// A training forward's outputs through [`raw_forward`].
struct RawForward<T> {
    y: Vec<T>,
    save_mean: Vec<f32>,
    save_invstd: Vec<f32>,
    running_mean: Vec<f32>,
    running_var: Vec<f32>,
}

/// A training backward's outputs through [`raw_backward`].
struct RawBackward<T> {
    dx: Vec<T>,
    grad_weight: Vec<f32>,
    grad_bias: Vec<f32>,
}

fn gpu_err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Counters and scratch for `tuning`'s plans of `shape`, zeroed.
fn raw_workspace(
    s: &Arc<CudaStream>,
    launcher: &impl cuda_batchnorm::raw::Launcher,
    tuning: &cuda_batchnorm::launch::Tuning,
    shape: &Shape,
    input: DType,
) -> Result<(CudaSlice<u32>, CudaSlice<u8>), String> {
    let need =
        cuda_batchnorm::raw::workspace_size(launcher, shape, input, tuning).map_err(gpu_err)?;
    Ok((
        s.alloc_zeros::<u32>(need.counters.max(1))
            .map_err(gpu_err)?,
        s.alloc_zeros::<u8>(need.scratch_bytes.max(1))
            .map_err(gpu_err)?,
    ))
}

/// The training forward (running statistics from 0 and 1, momentum 0.1, eps 1e-5)
/// through the raw layer with the test's own tuning: the functional layer plans with
/// the context's, which every test thread shares, so a test that forces a family goes
/// through here. f32 parameters and statistics.
fn raw_forward<T: Float<Acc = f32> + cuda_batchnorm::cudarc::driver::DeviceRepr>(
    s: &Arc<CudaStream>,
    launcher: &impl cuda_batchnorm::raw::Launcher,
    tuning: &cuda_batchnorm::launch::Tuning,
    shape: &Shape,
    x: &[T],
    weight: &[f32],
    bias: &[f32],
) -> Result<RawForward<T>, String>
where
    f32: ParamFor<T>,
{
    use cuda_batchnorm::cudarc::driver::DevicePtrMut;
    use cuda_batchnorm::raw;
    let c = shape.c();
    let up = |v: &[f32]| s.clone_htod(v).map_err(gpu_err);
    let x = s.clone_htod(x).map_err(gpu_err)?;
    let (w, b) = (up(weight)?, up(bias)?);
    let mut y = s.alloc_zeros::<T>(shape.numel()).map_err(gpu_err)?;
    let (mut rm, mut rv) = (up(&vec![0.0; c])?, up(&vec![1.0; c])?);
    let (mut sm, mut si) = (up(&vec![0.0; c])?, up(&vec![0.0; c])?);
    let (mut counters, mut scratch) = raw_workspace(s, launcher, tuning, shape, T::DTYPE)?;
    let a = raw::ForwardArgs {
        x: x.device_ptr(s).0,
        y: y.device_ptr_mut(s).0,
        weight: w.device_ptr(s).0,
        bias: b.device_ptr(s).0,
        running_mean: rm.device_ptr_mut(s).0,
        running_var: rv.device_ptr_mut(s).0,
        save_mean: sm.device_ptr_mut(s).0,
        save_invstd: si.device_ptr_mut(s).0,
        counters: counters.device_ptr_mut(s).0,
        scratch: scratch.device_ptr_mut(s).0,
        batch_stats: true,
        update_running: true,
        eps: 1e-5,
        momentum: 0.1,
        ..raw::ForwardArgs::default()
    };
    // SAFETY: every address is a live allocation of this stream's context of the size the
    // call reads or writes; the workspace is sized for these plans, its counters zero.
    unsafe { raw::forward::<T, f32>(launcher, shape, &a, tuning) }.map_err(gpu_err)?;
    let host = |b: &CudaSlice<f32>| s.clone_dtoh(b).map_err(gpu_err);
    Ok(RawForward {
        y: s.clone_dtoh(&y).map_err(gpu_err)?,
        save_mean: host(&sm)?,
        save_invstd: host(&si)?,
        running_mean: host(&rm)?,
        running_var: host(&rv)?,
    })
}

/// The training backward through the saved statistics, as [`raw_forward`].
#[allow(clippy::too_many_arguments)]
fn raw_backward<T: Float<Acc = f32> + cuda_batchnorm::cudarc::driver::DeviceRepr>(
    s: &Arc<CudaStream>,
    launcher: &impl cuda_batchnorm::raw::Launcher,
    tuning: &cuda_batchnorm::launch::Tuning,
    shape: &Shape,
    x: &[T],
    dy: &[T],
    weight: &[f32],
    save_mean: &[f32],
    save_invstd: &[f32],
) -> Result<RawBackward<T>, String>
where
    f32: ParamFor<T>,
{
    use cuda_batchnorm::cudarc::driver::DevicePtrMut;
    use cuda_batchnorm::raw;
    let c = shape.c();
    let up = |v: &[f32]| s.clone_htod(v).map_err(gpu_err);
    let (x, dy) = (
        s.clone_htod(x).map_err(gpu_err)?,
        s.clone_htod(dy).map_err(gpu_err)?,
    );
    let (w, sm, si) = (up(weight)?, up(save_mean)?, up(save_invstd)?);
    let mut dx = s.alloc_zeros::<T>(shape.numel()).map_err(gpu_err)?;
    let (mut gw, mut gb) = (up(&vec![0.0; c])?, up(&vec![0.0; c])?);
    let (mut counters, mut scratch) = raw_workspace(s, launcher, tuning, shape, T::DTYPE)?;
    let a = raw::BackwardArgs {
        dy: dy.device_ptr(s).0,
        x: x.device_ptr(s).0,
        dx: dx.device_ptr_mut(s).0,
        weight: w.device_ptr(s).0,
        stats: raw::BackwardStats::Batch {
            save_mean: sm.device_ptr(s).0,
            save_invstd: si.device_ptr(s).0,
        },
        grad_weight: gw.device_ptr_mut(s).0,
        grad_bias: gb.device_ptr_mut(s).0,
        counters: counters.device_ptr_mut(s).0,
        scratch: scratch.device_ptr_mut(s).0,
        epilogue: raw::EpilogueGrad::None,
    };
    // SAFETY: as in raw_forward.
    unsafe { raw::backward::<T, f32>(launcher, shape, &a, tuning) }.map_err(gpu_err)?;
    Ok(RawBackward {
        dx: s.clone_dtoh(&dx).map_err(gpu_err)?,
        grad_weight: s.clone_dtoh(&gw).map_err(gpu_err)?,
        grad_bias: s.clone_dtoh(&gb).map_err(gpu_err)?,
    })
}

/// The GPU as a [`common::huge::Device`], with one family forced (`None`: the planner's
/// choice), through the raw layer.
struct HugeGpu {
    stream: Arc<CudaStream>,
    kernels: Arc<cuda_batchnorm::kernels::Kernels>,
    variant: Option<cuda_batchnorm::launch::Variant>,
    index64: bool,
}

impl HugeGpu {
    fn tuning(&self) -> cuda_batchnorm::launch::Tuning {
        cuda_batchnorm::launch::Tuning {
            variant: self.variant,
            force_index64: self.index64,
            ..self.kernels.tuning()
        }
    }
}

impl common::huge::Device for HugeGpu {
    fn forward(
        &self,
        shape: &Shape,
        x: &[f16],
        weight: &[f32],
        bias: &[f32],
        samples: &[usize],
    ) -> Result<common::huge::Forwarded, String> {
        let launcher = cuda_batchnorm::kernels::CudaLauncher::new(&self.stream, &self.kernels);
        let f = raw_forward(
            &self.stream,
            &launcher,
            &self.tuning(),
            shape,
            x,
            weight,
            bias,
        )?;
        Ok(common::huge::Forwarded {
            save_mean: f.save_mean,
            save_invstd: f.save_invstd,
            running_mean: f.running_mean,
            running_var: f.running_var,
            y: samples.iter().map(|&i| f.y[i]).collect(),
        })
    }

    fn backward(
        &self,
        shape: &Shape,
        x: &[f16],
        dy: &[f16],
        weight: &[f32],
        save_mean: &[f32],
        save_invstd: &[f32],
        samples: &[usize],
    ) -> Result<common::huge::Backwarded, String> {
        let launcher = cuda_batchnorm::kernels::CudaLauncher::new(&self.stream, &self.kernels);
        let (s, t) = (&self.stream, self.tuning());
        let g = raw_backward(
            s,
            &launcher,
            &t,
            shape,
            x,
            dy,
            weight,
            save_mean,
            save_invstd,
        )?;
        Ok(common::huge::Backwarded {
            grad_weight: g.grad_weight,
            grad_bias: g.grad_bias,
            dx: samples.iter().map(|&i| g.dx[i]).collect(),
        })
    }
}

/// A tensor of more than 2^31 elements (f16, 4.3 GB), both layouts: the kernels switch
/// to 64-bit index arithmetic. Statistics and gradients of weight and bias are checked
/// per channel, y and dx at indices beyond 2^31 (tests/common/huge.rs). The emulated
/// kernels run the same check (tests/emulated.rs, `--ignored`).
#[test]
#[ignore = "needs a GPU's memory and speed: .gpu/run runs it (--include-ignored)"]
fn huge_more_than_2_pow_31_elements() {
    let Some(stream) = hardware_only(
        "huge_more_than_2_pow_31_elements",
        gpu("huge_more_than_2_pow_31_elements"),
    ) else {
        return;
    };
    // The reference is computed once per layout for all of them.
    let devs = huge_families(&stream, false);
    for format in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
        common::huge::check_each(&huge_devices(&devs), format, common::huge::FULL).unwrap();
    }
}

/// The planner's choice and every streaming family forced (the persistent one cannot
/// hold the full-size tensor on chip), 64-bit indexing forced or not.
fn huge_families(stream: &Arc<CudaStream>, index64: bool) -> Vec<(&'static str, HugeGpu)> {
    use cuda_batchnorm::launch::Variant;
    let kernels = cuda_batchnorm::kernels::Kernels::for_context(stream.context()).unwrap();
    [
        ("auto", None),
        ("baseline", Some(Variant::Baseline)),
        ("ilp", Some(Variant::Ilp)),
        ("flat", Some(Variant::Flat)),
    ]
    .into_iter()
    .map(|(name, variant)| {
        let dev = HugeGpu {
            stream: stream.clone(),
            kernels: kernels.clone(),
            variant,
            index64,
        };
        (name, dev)
    })
    .collect()
}

fn huge_devices<'a>(
    devs: &'a [(&'static str, HugeGpu)],
) -> Vec<(&'static str, &'a dyn common::huge::Device)> {
    devs.iter()
        .map(|(n, d)| (*n, d as &dyn common::huge::Device))
        .collect()
}

/// The full-size test's device and checks on a small tensor, on any device (the
/// emulated driver included): the planner's choice and each streaming family forced
/// through the raw layer, with 64-bit indexing.
#[test]
#[cfg_attr(
    not(cuda_batchnorm_ptx),
    ignore = "built without PTX (no nvcc at build time; see the README's Getting nvcc)"
)]
fn more_than_2_pow_31_check_on_a_small_tensor_by_every_family() {
    let test = "more_than_2_pow_31_check_on_a_small_tensor_by_every_family";
    let Some(Gpu { stream, .. }) = gpu(test) else {
        return;
    };
    let devs = huge_families(&stream, true);
    for format in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
        // planes of 16 x 4099 / 8 values, which only the planner's choice takes, then
        // 64 x 1031 / 8, a multiple of the vector width
        common::huge::check_each(&huge_devices(&devs[..1]), format, 16 * 4099).unwrap();
        common::huge::check_each(&huge_devices(&devs), format, 64 * 1031).unwrap();
    }
}

/// The persistent family's slabs in more than 48 KiB of shared memory a block, through
/// the driver: the launcher raises each kernel's limit (`cuFuncSetAttribute`) before a
/// launch needs it (the emulated driver, like NVIDIA's, refuses the launch otherwise).
/// A launcher that reports one resident block per multiprocessor makes the plans take
/// four steps of slab in the nchw forward (96 KB of shared memory) and eight in the
/// backward (224 KB), three and six channels-last (64 KB, 160 KB); the results are
/// checked against the f64 reference.
#[test]
#[cfg_attr(
    not(cuda_batchnorm_ptx),
    ignore = "built without PTX (no nvcc at build time; see the README's Getting nvcc)"
)]
fn persistent_slabs_past_48_kib_through_the_driver() {
    use cuda_batchnorm::kernels::{CudaLauncher, Kernels};
    use cuda_batchnorm::launch::{BnParams, DeviceInfo, KernelId, LaunchConfig};
    use cuda_batchnorm::raw::{Launcher, Region};
    let Some(Gpu { stream: s, .. }) = gpu("persistent_slabs_past_48_kib_through_the_driver") else {
        return;
    };
    struct OneBlock<'a>(CudaLauncher<'a>);
    impl Launcher for OneBlock<'_> {
        fn device(&self) -> &DeviceInfo {
            self.0.device()
        }
        fn prepare(&self, k: &[KernelId]) -> cuda_batchnorm::Result<()> {
            self.0.prepare(k)
        }
        fn resident_blocks(&self, k: &KernelId, t: u32, b: u32) -> cuda_batchnorm::Result<u32> {
            Ok(self.0.resident_blocks(k, t, b)?.min(1))
        }
        fn dynamic_shared_limit(&self, k: &KernelId) -> cuda_batchnorm::Result<u32> {
            self.0.dynamic_shared_limit(k)
        }
        fn launch(
            &self,
            k: KernelId,
            c: &LaunchConfig,
            p: &BnParams,
            r: &[Region],
        ) -> cuda_batchnorm::Result<()> {
            self.0.launch(k, c, p, r)
        }
    }
    let kernels = Kernels::for_context(s.context()).unwrap();
    let launcher = OneBlock(CudaLauncher::new(&s, &kernels));
    let sms = launcher.device().sm_count as usize;
    // nchw: one channel per multiprocessor, 8192 vectors (128 KB) each, one block per
    // channel. nhwc: 32 channels (one tile of 8 threads by 32 rows) of 768 rows per
    // multiprocessor, one split per multiprocessor: 3 steps forward, 6 backward (its
    // static shared memory leaves no room for 8).
    let cases = [
        (Shape::nchw(2, sms, 64, 256).unwrap(), 96 << 10, 224 << 10),
        (
            Shape::new(&[sms, 32, 24, 32], MemoryFormat::ChannelsLast).unwrap(),
            64 << 10,
            160 << 10,
        ),
    ];
    for (shape, fwd_shared, bwd_shared) in cases {
        slabs_past_48_kib(&s, &launcher, &shape, fwd_shared, bwd_shared);
    }
}

/// One shape of [`persistent_slabs_past_48_kib_through_the_driver`]: the plans' shared
/// memory, then the forward and backward against the f64 reference.
fn slabs_past_48_kib(
    s: &Arc<CudaStream>,
    launcher: &impl cuda_batchnorm::raw::Launcher,
    shape: &Shape,
    fwd_shared: u32,
    bwd_shared: u32,
) {
    use cuda_batchnorm::cpu::reference;
    use cuda_batchnorm::launch::{Tuning, Variant};
    use cuda_batchnorm::raw;
    let c = shape.c();
    let layout = cuda_batchnorm::launch::Layout::of(shape).name();
    let tuning = Tuning {
        variant: Some(Variant::Persistent),
        ..Tuning::default()
    };
    let xs: Vec<f32> = (0..shape.numel())
        .map(|i| ((i * 7919) % 1013) as f32 / 300.0 - 1.5 + (i % 7) as f32 * 0.25)
        .collect();
    let dys: Vec<f32> = (0..shape.numel())
        .map(|i| ((i * 104_729) % 997) as f32 / 400.0 - 1.1)
        .collect();
    let (w, b) = (vec![1.5f32; c], vec![0.25f32; c]);
    // The plans (addresses 0: aligned, and planning reads no memory).
    let fa = raw::ForwardArgs {
        batch_stats: true,
        update_running: true,
        eps: 1e-5,
        momentum: 0.1,
        ..raw::ForwardArgs::default()
    };
    let plan = raw::plan_forward::<f32, f32>(launcher, shape, &fa, &tuning).unwrap();
    assert_eq!(plan.launches.len(), 1);
    assert_eq!(
        plan.launches[0].plan.config.shared_bytes, fwd_shared,
        "{layout}"
    );
    let ba = raw::BackwardArgs {
        dy: 0,
        x: 0,
        dx: 0,
        weight: 0,
        stats: raw::BackwardStats::Batch {
            save_mean: 0,
            save_invstd: 0,
        },
        grad_weight: 0,
        grad_bias: 0,
        counters: 0,
        scratch: 0,
        epilogue: raw::EpilogueGrad::None,
    };
    let plan = raw::plan_backward::<f32, f32>(launcher, shape, &ba, &tuning).unwrap();
    assert_eq!(
        plan.launches[0].plan.config.shared_bytes, bwd_shared,
        "{layout}"
    );
    let f = raw_forward(s, launcher, &tuning, shape, &xs, &w, &b).unwrap();
    let (sm, si) = (&f.save_mean, &f.save_invstd);
    let g = raw_backward(s, launcher, &tuning, shape, &xs, &dys, &w, sm, si).unwrap();

    let wide = |v: &[f32]| v.iter().map(|&a| f64::from(a)).collect::<Vec<f64>>();
    let (x64, dy64) = (wide(&xs), wide(&dys));
    let (mean, var) = reference::batch_stats(&x64, shape).unwrap();
    let invstd = reference::invstd(&var, 1e-5);
    let want_y = reference::normalize(
        &x64,
        shape,
        &mean,
        &invstd,
        Some(&wide(&w)),
        Some(&wide(&b)),
    )
    .unwrap();
    let want =
        reference::backward(&dy64, &x64, shape, &mean, &invstd, Some(&wide(&w)), true).unwrap();
    let rel = |got: &[f64], want: &[f64]| {
        let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b).powi(2)).sum();
        let den: f64 = want.iter().map(|b| b * b).sum();
        (num / den.max(1e-300)).sqrt()
    };
    for (name, got, want) in [
        ("save_mean", wide(&f.save_mean), mean),
        ("save_invstd", wide(&f.save_invstd), invstd),
        ("y", wide(&f.y), want_y),
        ("dx", wide(&g.dx), want.input),
        ("grad_weight", wide(&g.grad_weight), want.weight),
        ("grad_bias", wide(&g.grad_bias), want.bias),
    ] {
        // The parameter gradients are f32 sums of 32768 terms that partly cancel.
        let tol = if name.starts_with("grad_") {
            1e-4
        } else {
            1e-5
        };
        let e = rel(&got, &want);
        assert!(e < tol, "{layout} {name}: relative error {e:.2e}");
    }
}

/// Sizes the device cannot address are typed errors before cudarc computes them, and a
/// copy of the wrong length leaves the buffer as it was.
#[test]
#[cfg_attr(
    not(cuda_batchnorm_ptx),
    ignore = "built without PTX (no nvcc at build time; see the README's Getting nvcc)"
)]
fn unaddressable_allocations_and_short_copies_are_errors() {
    let Some(Gpu { stream, .. }) = gpu("unaddressable_allocations_and_short_copies_are_errors")
    else {
        return;
    };
    let cuda = Cuda::new(&stream);
    // No parameters or running statistics: only the f32 save buffers, 2^64 bytes each.
    let opts = BatchNormOptions {
        affine: false,
        track_running_stats: false,
        ..Default::default()
    };
    let e = BatchNorm2d::<f32>::new(cuda.clone(), 1 << 62, opts).err();
    assert!(
        matches!(
            e,
            Some(BnError::DeviceAllocTooLarge {
                len: 0x4000_0000_0000_0000,
                elem_bytes: 4
            })
        ),
        "{e:?}"
    );
    let e = cuda.alloc(usize::MAX / 2, 0.0f64).unwrap_err();
    assert!(matches!(e, BnError::DeviceAllocTooLarge { .. }), "{e:?}");

    let mut b = cuda.alloc(4, 1.5f32).unwrap();
    let e = cuda.copy_from_host(&mut b, &[0.0; 5]).unwrap_err();
    assert!(
        matches!(
            e,
            BnError::CopyLength {
                buffer: 4,
                values: 5
            }
        ),
        "{e:?}"
    );
    assert_eq!(stream.clone_dtoh(&b).unwrap(), vec![1.5; 4]);
}

/// `infer` shares one module across threads and streams.
#[test]
#[cfg_attr(
    not(cuda_batchnorm_ptx),
    ignore = "built without PTX (no nvcc at build time; see the README's Getting nvcc)"
)]
fn infer_from_many_threads() {
    let Some(Gpu { stream, .. }) = gpu("infer_from_many_threads") else {
        return;
    };
    let shape = Shape::nhwc(4, 32, 9, 9).unwrap();
    let mut bn =
        BatchNorm2d::<f32>::new(Cuda::new(&stream), 32, BatchNormOptions::default()).unwrap();
    let host: Vec<f32> = (0..shape.numel()).map(|i| (i % 17) as f32 * 0.3).collect();
    let x = stream.clone_htod(&host).unwrap();
    bn.forward(&x, &shape).unwrap();
    bn.eval();
    let expect = stream.clone_dtoh(&bn.forward(&x, &shape).unwrap()).unwrap();
    // The same steps on the CPU backend: the module's result is a real one.
    let mut on_cpu = cuda_batchnorm::cpu::BatchNorm2d::<f32>::new(
        cuda_batchnorm::Cpu,
        32,
        BatchNormOptions::default(),
    )
    .unwrap();
    on_cpu.forward(&host, &shape).unwrap();
    on_cpu.eval();
    let cpu_y = on_cpu.forward(&host, &shape).unwrap();
    common::check_close(
        "eval y",
        &expect,
        &cuda_batchnorm::cpu::reference::to_f64(&cpu_y),
    )
    .unwrap();
    let bn = Arc::new(bn);
    for y in on_threads(&stream, &host, move |s, x, y| {
        bn.infer(s, x, &shape, y).unwrap()
    }) {
        assert_eq!(y, expect);
    }
}

/// The eval hot path, as a server captures it into a CUDA graph: a module's `infer`, a
/// frozen module's, the functional eval and the fused epilogues (a module's add-ReLU, a
/// frozen module's ReLU), captured on a stream of their own and
/// replayed with new input. The capture runs nothing (the outputs keep their
/// sentinels), every replay equals the uncaptured calls on its input bitwise, and a host
/// synchronisation inside a capture fails it, as a driver does.
#[test]
#[cfg_attr(
    not(cuda_batchnorm_ptx),
    ignore = "built without PTX (no nvcc at build time; see the README's Getting nvcc)"
)]
fn eval_captured_in_a_graph_and_replayed() {
    use cuda_batchnorm::cudarc::driver::sys::{
        CUgraphInstantiate_flags, CUstreamCaptureMode, CUstreamCaptureStatus,
    };
    let Some(Gpu { stream, .. }) = gpu("eval_captured_in_a_graph_and_replayed") else {
        return;
    };
    let ctx = stream.context().clone();
    // SAFETY: the context is this test's own (gpu() opens one per test). Every buffer
    // below is used on `s` alone and read back in its order, so no event has to order
    // it; with tracking on, each launch would make the capturing stream wait on events
    // recorded before the capture, which a capture cannot take.
    unsafe { ctx.disable_event_tracking() };
    let s = ctx.new_stream().unwrap();
    let shape = Shape::nchw(2, 24, 7, 7).unwrap();
    let (c, n) = (24, shape.numel());
    let sd = trained_state(c);
    let mut bn = BatchNorm2d::<f32>::new(Cuda::new(&s), c, BatchNormOptions::default()).unwrap();
    bn.load_state_dict(&sd).unwrap();
    bn.eval();
    let frozen =
        cuda_batchnorm::nn::FrozenBatchNorm2d::<f32>::from_state_dict(Cuda::new(&s), c, 1e-5, &sd)
            .unwrap();
    let upload = |v: &Option<Vec<f32>>| s.clone_htod(v.as_ref().unwrap()).unwrap();
    let (rm, rv, w, b) = (
        upload(&sd.running_mean),
        upload(&sd.running_var),
        upload(&sd.weight),
        upload(&sd.bias),
    );
    // The residual of the fused calls.
    let z = s
        .clone_htod(
            &(0..n)
                .map(|i| (i % 7) as f32 * 0.4 - 1.2)
                .collect::<Vec<f32>>(),
        )
        .unwrap();
    let run = |x: &CudaSlice<f32>, ys: &mut [CudaSlice<f32>]| {
        let [y0, y1, y2, y3, y4] = ys else {
            unreachable!("five outputs")
        };
        bn.infer(&s, x, &shape, y0)?;
        frozen.infer(&s, x, &shape, y1)?;
        bn.infer_fused(
            &s,
            x,
            cuda_batchnorm::functional::Epilogue::AddRelu { residual: &z },
            &shape,
            y3,
        )?;
        frozen.infer_fused(
            &s,
            x,
            cuda_batchnorm::functional::Epilogue::Relu,
            &shape,
            y4,
        )?;
        let args = Eval {
            input: x,
            shape,
            running_mean: &rm,
            running_var: &rv,
            weight: Some(&w),
            bias: Some(&b),
            eps: 1e-5,
        };
        batch_norm_eval(&s, args, y2)
    };
    let inputs: Vec<Vec<f32>> = (0..3)
        .map(|k| {
            (0..n)
                .map(|i| ((i * (k + 2)) % 19) as f32 * 0.3 - 2.5)
                .collect()
        })
        .collect();
    let mut x = s.clone_htod(&inputs[0]).unwrap();
    let mut ys: Vec<CudaSlice<f32>> = (0..5).map(|_| s.alloc_zeros(n).unwrap()).collect();
    // Uncaptured, for each input (this also loads the kernels before any capture).
    let expect: Vec<Vec<Vec<f32>>> = inputs
        .iter()
        .map(|input| {
            s.memcpy_htod(input, &mut x).unwrap();
            run(&x, &mut ys).unwrap();
            ys.iter().map(|y| s.clone_dtoh(y).unwrap()).collect()
        })
        .collect();
    assert_ne!(
        expect[0][0], expect[1][0],
        "the inputs must give different outputs"
    );
    // The fused outputs are the plain ones through their epilogues.
    let relu = |v: f32| if v < 0.0 { 0.0 } else { v };
    let add_relu: Vec<f32> = expect[0][0]
        .iter()
        .zip(s.clone_dtoh(&z).unwrap())
        .map(|(y, z)| relu(y + z))
        .collect();
    assert_eq!(expect[0][3], add_relu);
    let frozen_relu: Vec<f32> = expect[0][1].iter().map(|&y| relu(y)).collect();
    assert_eq!(expect[0][4], frozen_relu);
    assert!(frozen_relu.contains(&0.0) && frozen_relu != expect[0][1]);
    let sentinel = vec![-7.0f32; n];
    for y in &mut ys {
        s.memcpy_htod(&sentinel, y).unwrap();
    }
    s.memcpy_htod(&inputs[0], &mut x).unwrap();
    s.synchronize().unwrap();

    let mode = CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
    s.begin_capture(mode).unwrap();
    assert_eq!(
        s.capture_status().unwrap(),
        CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE
    );
    run(&x, &mut ys).unwrap();
    let graph = s
        .end_capture(CUgraphInstantiate_flags(0))
        .unwrap()
        .expect("the capture's graph");
    for y in &ys {
        assert_eq!(
            s.clone_dtoh(y).unwrap(),
            sentinel,
            "the capture ran a kernel"
        );
    }
    for k in [1, 0, 2, 2] {
        s.memcpy_htod(&inputs[k], &mut x).unwrap();
        graph.launch().unwrap();
        for (j, y) in ys.iter().enumerate() {
            assert_eq!(
                s.clone_dtoh(y).unwrap(),
                expect[k][j],
                "replay with input {k}, output {j}"
            );
        }
    }
    drop(graph);

    s.begin_capture(mode).unwrap();
    run(&x, &mut ys).unwrap();
    assert!(
        s.synchronize().is_err(),
        "a stream synchronised while capturing"
    );
    assert!(
        s.end_capture(CUgraphInstantiate_flags(0)).is_err(),
        "a capture with a host synchronisation in it was instantiated"
    );
}

/// A trained BatchNorm's state of `c` channels: weights, biases and running statistics
/// that differ per channel.
fn trained_state(c: usize) -> cuda_batchnorm::StateDict<f32> {
    cuda_batchnorm::StateDict {
        weight: Some((0..c).map(|i| 0.5 + i as f32 * 0.1).collect()),
        bias: Some((0..c).map(|i| i as f32 * -0.05).collect()),
        running_mean: Some((0..c).map(|i| (i % 5) as f32 - 2.0).collect()),
        running_var: Some((0..c).map(|i| 0.25 + (i % 3) as f32).collect()),
        num_batches_tracked: None,
    }
}

/// Four threads, each with its own stream of `stream`'s context, upload `host` and run
/// `infer` on it ten times; their outputs.
fn on_threads(
    stream: &Arc<CudaStream>,
    host: &[f32],
    infer: impl Fn(&Arc<CudaStream>, &CudaSlice<f32>, &mut CudaSlice<f32>) + Sync,
) -> Vec<Vec<f32>> {
    let ctx = stream.context();
    concurrently(4, |_| {
        let s = ctx.new_stream().unwrap();
        let x = s.clone_htod(host).unwrap();
        let mut y = s.alloc_zeros::<f32>(host.len()).unwrap();
        for _ in 0..10 {
            infer(&s, &x, &mut y);
        }
        s.clone_dtoh(&y).unwrap()
    })
}

/// Runs `f(i)` for i below `n` on `n` threads at once (ranks that wait for each other
/// need that); the results in order.
fn concurrently<R: Send>(n: usize, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let f = &f;
                scope.spawn(move || f(i))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// A sized workspace serves every later call on its shape without growing.
#[test]
#[cfg_attr(
    not(cuda_batchnorm_ptx),
    ignore = "built without PTX (no nvcc at build time; see the README's Getting nvcc)"
)]
fn sized_workspace_does_not_grow() {
    let Some(Gpu { stream, .. }) = gpu("sized_workspace_does_not_grow") else {
        return;
    };
    let shape = Shape::nchw(8, 16, 20, 20).unwrap();
    let mut ws = Workspace::for_shape(&stream, &shape, DType::F32).unwrap();
    let size = ws.size();
    let x = stream.clone_htod(&vec![0.25f32; shape.numel()]).unwrap();
    let mut y = stream.clone_htod(&vec![7.0f32; shape.numel()]).unwrap();
    for _ in 0..3 {
        let args = Forward::<f32, f32> {
            input: &x,
            shape,
            running_mean: None,
            running_var: None,
            weight: None,
            bias: None,
            training: true,
            momentum: 0.1,
            eps: 1e-5,
        };
        batch_norm(&stream, args, &mut y, None, &mut ws).unwrap();
    }
    assert_eq!(ws.size(), size);
    // a constant input normalises to zero
    assert!(stream.clone_dtoh(&y).unwrap().iter().all(|&v| v == 0.0));
}

/// Empty batches and zero channels through the modules, every type pair and layout: an
/// empty output, the counter advanced in training, parameter gradients of the
/// parameters' length (zeros); a module of no channels builds, and without affine
/// parameters runs (with them PyTorch fails indexing weight[0], and so does the crate).
/// No zero-byte allocation reaches the driver (it refuses them).
#[test]
#[cfg_attr(
    not(cuda_batchnorm_ptx),
    ignore = "built without PTX (no nvcc at build time; see the README's Getting nvcc)"
)]
fn empty_batches_and_zero_channels() {
    let Some(Gpu { stream, .. }) = gpu("empty_batches_and_zero_channels") else {
        return;
    };
    let mut failures = Vec::new();
    for &pair in TYPE_PAIRS {
        for format in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
            let r = with_types!(pair, |T, P| empty_cases::<T, P>(&stream, format));
            if let Err(e) = r {
                failures.push(format!("{pair:?} {}: {e}", format.name()));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

fn empty_cases<T: Float, P: ParamFor<T>>(
    stream: &Arc<CudaStream>,
    format: MemoryFormat,
) -> Result<(), String> {
    let e = |e: BnError| e.to_string();
    let cuda = Cuda::new(stream);
    for input_c in [3, 5] {
        // a module of 3 channels given (0, C, 4, 4), C its own or not
        let mut bn =
            BatchNorm2d::<T, P>::new(cuda.clone(), 3, BatchNormOptions::default()).map_err(e)?;
        let shape = Shape::new(&[0, input_c, 4, 4], format).map_err(e)?;
        let x = cuda.alloc(0, T::from_f64(0.0)).map_err(e)?;
        let y = bn.forward(&x, &shape).map_err(e)?;
        if !y.is_empty() || bn.num_batches_tracked() != 1 {
            return Err(format!(
                "forward: {} values, counter {}",
                y.len(),
                bn.num_batches_tracked()
            ));
        }
        let g = bn.backward(&x, &x, &shape).map_err(e)?;
        let zeros = vec![0.0; 3];
        for (what, b) in [("weight", &g.weight), ("bias", &g.bias)] {
            let b = b.as_ref().ok_or(format!("no grad {what}"))?;
            let host = cuda.to_host(b).map_err(e)?;
            if cuda_batchnorm::cpu::reference::to_f64(&host) != zeros {
                return Err(format!("grad {what} {host:?}, expected three zeros"));
            }
        }
        if !g.input.is_empty() {
            return Err("grad input not empty".into());
        }
    }
    let shape = Shape::new(&[2, 0, 3, 3], format).map_err(e)?;
    let x = cuda.alloc(0, T::from_f64(0.0)).map_err(e)?;
    let plain = BatchNormOptions {
        affine: false,
        ..Default::default()
    };
    let mut bn = BatchNorm2d::<T, P>::new(cuda.clone(), 0, plain).map_err(e)?;
    let y = bn.forward(&x, &shape).map_err(e)?;
    let sd = bn.state_dict().map_err(e)?;
    if !y.is_empty() || sd.num_batches_tracked != Some(1) || sd.running_mean != Some(vec![]) {
        return Err(format!("C = 0: {} values, {sd:?}", y.len()));
    }
    let mut bn = BatchNorm2d::<T, P>::new(cuda, 0, BatchNormOptions::default()).map_err(e)?;
    let err = bn.forward(&x, &shape).err().map(|x| x.to_string());
    if err.as_deref()
        != Some("select(): index 0 out of range for tensor of size [0] at dimension 0")
        || bn.num_batches_tracked() != 0
    {
        return Err(format!("C = 0 with affine parameters: {err:?}"));
    }
    Ok(())
}

/// Infinities and NaN (PyTorch's answers), and eps below f32's range, on the device.
#[test]
#[cfg_attr(
    not(cuda_batchnorm_ptx),
    ignore = "built without PTX (no nvcc at build time; see the README's Getting nvcc)"
)]
fn non_finite_values_and_tiny_eps() {
    let Some(Gpu { stream, .. }) = gpu("non_finite_values_and_tiny_eps") else {
        return;
    };
    let runner = GpuRunner { stream, pad: 16 };
    let mut failures = Vec::new();
    for &pair in TYPE_PAIRS {
        for format in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
            let r = with_types!(pair, |T, P| common::check_non_finite::<_, T, P>(
                &runner, format
            )
            .and_then(|()| common::check_tiny_eps::<_, T, P>(&runner, format)));
            if let Err(e) = r {
                failures.push(format!("{pair:?} {}: {e}", format.name()));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// A forward whose second launch fails, or whose first does, and a load_state_dict whose
/// third copy fails, return the driver's error and leave the module as it was (the
/// running statistics are committed by the last launch; loads are staged). The failures
/// are injected into the emulated driver, so this runs there only.
#[test]
#[cfg_attr(
    not(cuda_batchnorm_ptx),
    ignore = "built without PTX (no nvcc at build time; see the README's Getting nvcc)"
)]
fn a_failed_launch_or_copy_changes_nothing() {
    let Some(gpu) = gpu("a_failed_launch_or_copy_changes_nothing") else {
        return;
    };
    if !gpu.emulated {
        let _ = writeln!(
            std::io::stderr(),
            "skipping a_failed_launch_or_copy_changes_nothing: it injects failures into the emulated driver"
        );
        return;
    }
    use cuda_batchnorm_emu::driver::{fail_call, Call};
    let stream = gpu.stream;
    let shape = Shape::nchw(4, 6, 5, 5).unwrap();
    let host: Vec<f32> = (0..shape.numel())
        .map(|i| ((i * 7) % 11) as f32 - 3.0)
        .collect();
    let x = stream.clone_htod(&host).unwrap();
    let mut bn =
        BatchNorm2d::<f32>::new(Cuda::new(&stream), 6, BatchNormOptions::default()).unwrap();
    bn.forward(&x, &shape).unwrap();
    let before = bn.state_dict().unwrap();
    for skip in [1, 0] {
        fail_call(Call::Launch, skip).unwrap();
        let e = bn.forward(&x, &shape).unwrap_err();
        assert!(
            e.to_string().contains("CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES"),
            "{e}"
        );
        assert_eq!(bn.state_dict().unwrap(), before, "launch {skip} failed");
    }
    // The module still works, and its backward still matches its last good forward.
    bn.forward(&x, &shape).unwrap();
    bn.backward(&x, &x, &shape).unwrap();
    let before = bn.state_dict().unwrap();
    let mut other = before.clone();
    other.running_mean = Some(vec![5.0; 6]);
    other.weight = Some(vec![2.0; 6]);
    other.num_batches_tracked = Some(77);
    fail_call(Call::CopyHtoD, 2).unwrap();
    let e = bn.load_state_dict(&other).unwrap_err();
    assert!(e.to_string().contains("CUDA_ERROR_INVALID_VALUE"), "{e}");
    assert_eq!(bn.state_dict().unwrap(), before);
    // Nothing changed, so the last forward is still differentiable.
    bn.backward(&x, &x, &shape).unwrap();
    bn.load_state_dict(&other).unwrap();
    assert_eq!(bn.state_dict().unwrap(), other);
}

/// A buffer type that reports more elements than bytes can count: a typed error where
/// the byte count would overflow (a panic in debug builds, a wrap in release).
#[test]
#[cfg_attr(
    not(cuda_batchnorm_ptx),
    ignore = "built without PTX (no nvcc at build time; see the README's Getting nvcc)"
)]
fn lengths_whose_bytes_overflow_are_errors() {
    let Some(Gpu { stream, .. }) = gpu("lengths_whose_bytes_overflow_are_errors") else {
        return;
    };
    use cuda_batchnorm::cudarc::driver::{DevicePtrMut, DeviceSlice, SyncOnDrop};
    /// A real buffer that claims `len` elements.
    struct Liar<'a> {
        inner: &'a mut CudaSlice<f32>,
        len: usize,
    }
    impl DeviceSlice<f32> for Liar<'_> {
        fn len(&self) -> usize {
            self.len
        }
        fn stream(&self) -> &Arc<CudaStream> {
            self.inner.stream()
        }
    }
    impl DevicePtrMut<f32> for Liar<'_> {
        fn device_ptr_mut<'a>(&'a mut self, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
            self.inner.device_ptr_mut(stream)
        }
    }
    let shape = Shape::nchw(0, 3, 2, 2).unwrap();
    let empty = Cuda::new(&stream).alloc(0, 0.0f32).unwrap();
    let mut dx = Cuda::new(&stream).alloc(0, 0.0f32).unwrap();
    let (mut a, mut b) = (
        stream.clone_htod(&[1.0f32; 3]).unwrap(),
        stream.clone_htod(&[1.0f32; 3]).unwrap(),
    );
    let mut gw = Liar {
        inner: &mut a,
        len: usize::MAX / 2,
    };
    let mut gb = Liar {
        inner: &mut b,
        len: 3,
    };
    let stats = [
        stream.clone_htod(&[0.0f32; 3]).unwrap(),
        stream.clone_htod(&[1.0f32; 3]).unwrap(),
    ];
    let e = batch_norm_backward(
        &stream,
        functional::Backward::<f32, f32> {
            grad_output: &empty,
            input: &empty,
            shape,
            weight: None,
            stats: BackwardStats::Batch {
                save_mean: &stats[0],
                save_invstd: &stats[1],
            },
        },
        Grads {
            input: &mut dx,
            weight: Some(&mut gw),
            bias: Some(&mut gb),
        },
        &mut Workspace::new(),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            BnError::BufferTooLarge {
                name: "grad_weight",
                ..
            }
        ),
        "{e}"
    );
}

/// The sentences of the rank and in-place checks through the CUDA modules and
/// functional API (the same code as on the CPU; here with device buffers).
#[test]
#[cfg_attr(
    not(cuda_batchnorm_ptx),
    ignore = "built without PTX (no nvcc at build time; see the README's Getting nvcc)"
)]
fn pytorch_sentences_on_cuda() {
    let Some(Gpu { stream, .. }) = gpu("pytorch_sentences_on_cuda") else {
        return;
    };
    use cuda_batchnorm::nn::BatchNorm1d;
    let cuda = Cuda::new(&stream);
    let x = stream.clone_htod(&[0.5f32, 1.5, -1.0, 2.0, 0.0]).unwrap();
    let mut m1 = BatchNorm1d::<f32>::new(cuda.clone(), 5, BatchNormOptions::default()).unwrap();
    let rank1 = Shape::new(&[5], MemoryFormat::Contiguous).unwrap();
    assert_eq!(
        m1.forward(&x, &rank1).err().unwrap().to_string(),
        "expected 2D or 3D input (got 1D input)"
    );
    let mut y = cuda.alloc(5, 0.0f32).unwrap();
    let (mut rm, mut rv) = (
        cuda.alloc(5, 0.0f32).unwrap(),
        cuda.alloc(5, 1.0f32).unwrap(),
    );
    let e = batch_norm(
        &stream,
        Forward::<f32, f32> {
            input: &x,
            shape: rank1,
            running_mean: Some(&mut rm),
            running_var: Some(&mut rv),
            weight: None,
            bias: None,
            training: true,
            momentum: 0.1,
            eps: 1e-5,
        },
        &mut y,
        None,
        &mut Workspace::new(),
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "running_mean should contain 0 elements not 5"
    );
    // the in-place check, with the CUDA tensor type's name
    let shape = Shape::nc(4, 5).unwrap();
    let x = stream.clone_htod(&[0.25f32; 20]).unwrap();
    m1.forward(&x, &shape).unwrap();
    m1.weight_mut().unwrap();
    assert_eq!(
        m1.backward(&x, &x, &shape).err().unwrap().to_string(),
        "one of the variables needed for gradient computation has been modified by an inplace \
         operation: [torch.cuda.FloatTensor [5]] is at version 2; expected version 1 instead."
    );
}

/// Every BatchNorm layer of the PyTorch CNN fixture, loaded from its `.safetensors`
/// file into CUDA modules, reproduces PyTorch's eval outputs (tests/weights.rs does the
/// same on the CPU backend).
#[test]
#[cfg_attr(
    not(cuda_batchnorm_ptx),
    ignore = "built without PTX (no nvcc at build time; see the README's Getting nvcc)"
)]
fn safetensors_layers_on_the_gpu() {
    let Some(Gpu { stream, .. }) = gpu("safetensors_layers_on_the_gpu") else {
        return;
    };
    use common::cnn::{self, LAYERS};
    let (weights, io) = cnn::load();
    let cuda = Cuda::new(&stream);
    let mut failures = Vec::new();
    for prefix in LAYERS {
        for format in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
            for r in [
                cnn::check_layer::<Cuda, f32, f32>(cuda.clone(), &weights, &io, prefix, format),
                cnn::check_layer::<Cuda, f16, f32>(cuda.clone(), &weights, &io, prefix, format),
                cnn::check_layer::<Cuda, cuda_batchnorm::half::bf16, cuda_batchnorm::half::bf16>(
                    cuda.clone(),
                    &weights,
                    &io,
                    prefix,
                    format,
                ),
                cnn::check_layer::<Cuda, f64, f64>(cuda.clone(), &weights, &io, prefix, format),
            ] {
                if let Err(e) = r {
                    failures.push(e);
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// torchvision's frozen fixtures and every layer of the CNN fixture, frozen, through
/// the CUDA frozen modules (tests/frozen.rs does the same on the CPU backend).
#[test]
#[cfg_attr(
    not(cuda_batchnorm_ptx),
    ignore = "built without PTX (no nvcc at build time; see the README's Getting nvcc)"
)]
fn frozen_on_the_gpu() {
    let Some(Gpu { stream, .. }) = gpu("frozen_on_the_gpu") else {
        return;
    };
    use common::cnn::{self, LAYERS};
    let cuda = Cuda::new(&stream);
    let mut failures = Vec::new();
    for case in fixtures::frozen() {
        let r = with_types!((case.dtype, case.param), |T, P| {
            fixtures::replay_frozen::<Cuda, T, P>(cuda.clone(), &case)
        });
        if let Err(e) = r {
            failures.push(e);
        }
    }
    let (weights, io) = cnn::load();
    for prefix in LAYERS {
        for format in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
            for r in [
                cnn::check_layer_as::<Cuda, f32, f32>(
                    true,
                    cuda.clone(),
                    &weights,
                    &io,
                    prefix,
                    format,
                ),
                cnn::check_layer_as::<Cuda, f16, f32>(
                    true,
                    cuda.clone(),
                    &weights,
                    &io,
                    prefix,
                    format,
                ),
            ] {
                if let Err(e) = r {
                    failures.push(e);
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// PyTorch's folded weights and biases with the folding done on the GPU.
#[test]
#[cfg_attr(
    not(cuda_batchnorm_ptx),
    ignore = "built without PTX (no nvcc at build time; see the README's Getting nvcc)"
)]
fn folding_on_the_gpu() {
    let Some(Gpu { stream, .. }) = gpu("folding_on_the_gpu") else {
        return;
    };
    let mut failures = Vec::new();
    for case in fixtures::fold_cases() {
        let r = with_types!((case.dtype, case.param), |T, P| {
            fixtures::replay_fold::<Cuda, T, P>(Cuda::new(&stream), &case)
        });
        if let Err(e) = r {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// One frozen module shared by threads, each on its own stream: every result equal bit
/// for bit to a serial run's.
#[test]
#[cfg_attr(
    not(cuda_batchnorm_ptx),
    ignore = "built without PTX (no nvcc at build time; see the README's Getting nvcc)"
)]
fn frozen_infer_from_many_threads() {
    let Some(Gpu { stream, .. }) = gpu("frozen_infer_from_many_threads") else {
        return;
    };
    let shape = Shape::nchw(2, 24, 7, 7).unwrap();
    let c = 24;
    let sd = trained_state(c);
    let bn = cuda_batchnorm::nn::FrozenBatchNorm2d::<f32>::from_state_dict(
        Cuda::new(&stream),
        c,
        1e-5,
        &sd,
    )
    .unwrap();
    let host: Vec<f32> = (0..shape.numel())
        .map(|i| (i % 13) as f32 * 0.4 - 2.0)
        .collect();
    let x = stream.clone_htod(&host).unwrap();
    let expect = stream.clone_dtoh(&bn.forward(&x, &shape).unwrap()).unwrap();
    let cpu = cuda_batchnorm::cpu::FrozenBatchNorm2d::<f32>::from_state_dict(
        cuda_batchnorm::Cpu,
        c,
        1e-5,
        &sd,
    )
    .unwrap();
    let cpu_y = cpu.forward(&host, &shape).unwrap();
    common::check_close(
        "frozen y",
        &expect,
        &cuda_batchnorm::cpu::reference::to_f64(&cpu_y),
    )
    .unwrap();
    let bn = Arc::new(bn);
    for y in on_threads(&stream, &host, move |s, x, y| {
        bn.infer(s, x, &shape, y).unwrap()
    }) {
        assert_eq!(y, expect);
    }
}

/// The frozen module's fused epilogues on the CUDA path: `infer_fused` and
/// `forward_fused` against the CPU's frozen module, the fused backward's dx and residual
/// gradient too, in both layouts.
#[test]
#[cfg_attr(
    not(cuda_batchnorm_ptx),
    ignore = "built without PTX (no nvcc at build time; see the README's Getting nvcc)"
)]
fn frozen_fused_on_the_gpu() {
    let Some(Gpu { stream, .. }) = gpu("frozen_fused_on_the_gpu") else {
        return;
    };
    use cuda_batchnorm::cpu::reference::to_f64;
    use cuda_batchnorm::Epilogue;
    let c = 12;
    let sd = trained_state(c);
    let bn = cuda_batchnorm::nn::FrozenBatchNorm2d::<f32>::from_state_dict(
        Cuda::new(&stream),
        c,
        1e-5,
        &sd,
    )
    .unwrap();
    let cpu = cuda_batchnorm::cpu::FrozenBatchNorm2d::<f32>::from_state_dict(
        cuda_batchnorm::Cpu,
        c,
        1e-5,
        &sd,
    )
    .unwrap();
    for format in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
        let shape = Shape::new(&[3, c, 5, 7], format).unwrap();
        let n = shape.numel();
        let host_x: Vec<f32> = (0..n).map(|i| (i % 17) as f32 * 0.3 - 2.4).collect();
        let host_z: Vec<f32> = (0..n).map(|i| (i % 11) as f32 * 0.2 - 1.0).collect();
        let host_dy: Vec<f32> = (0..n).map(|i| (i % 7) as f32 * 0.5 - 1.5).collect();
        let (x, z, dy) = (
            stream.clone_htod(&host_x).unwrap(),
            stream.clone_htod(&host_z).unwrap(),
            stream.clone_htod(&host_dy).unwrap(),
        );
        let want_y = cpu
            .forward_fused(&host_x, Epilogue::AddRelu { residual: &host_z }, &shape)
            .unwrap();
        let mut y = stream.alloc_zeros::<f32>(n).unwrap();
        bn.infer_fused(
            &stream,
            &x,
            Epilogue::AddRelu { residual: &z },
            &shape,
            &mut y,
        )
        .unwrap();
        let got_y = stream.clone_dtoh(&y).unwrap();
        common::check_close("infer_fused y", &got_y, &to_f64(&want_y)).unwrap();
        assert!(got_y.contains(&0.0) && got_y.iter().any(|v| *v > 0.0));
        let relu_y = bn.forward_fused(&x, Epilogue::Relu, &shape).unwrap();
        let want_relu = cpu.forward_fused(&host_x, Epilogue::Relu, &shape).unwrap();
        common::check_close(
            "forward_fused relu y",
            &stream.clone_dtoh(&relu_y).unwrap(),
            &to_f64(&want_relu),
        )
        .unwrap();
        // the backward, masked by the GPU's own y on both sides
        let (dx, dz) = bn.backward_fused(&dy, &y, true, &shape).unwrap();
        let (want_dx, want_dz) = cpu.backward_fused(&host_dy, &got_y, true, &shape).unwrap();
        common::check_close("dx", &stream.clone_dtoh(&dx).unwrap(), &to_f64(&want_dx)).unwrap();
        assert_eq!(
            stream.clone_dtoh(&dz.unwrap()).unwrap(),
            want_dz.unwrap(),
            "{format:?} grad_residual"
        );
    }
}

/// One rank's part of the stats-stage test: its slice of the batch on the device.
struct RankSlice<T: ParamFor<T> + cuda_batchnorm::Float> {
    shape: Shape,
    x: CudaSlice<T>,
    dy: CudaSlice<T>,
}

/// SyncBatchNorm's stats stage (`cuda_batchnorm::sync`) with `splits` ranks on one
/// device, the test playing the collectives on the host: the ranks' statistics
/// gathered, the merge, the normalisation, the backward's sums summed, the dx. Judged as
/// PyTorch's distributed tests judge SyncBatchNorm: against one BatchNorm (the
/// single-GPU kernels) over the concatenated batch, outputs, gradients and running
/// statistics to the dtype's tolerance. An empty rank takes part with count 0.
fn stats_stage_case<T, P>(s: &Arc<CudaStream>, full: Shape, splits: &[usize]) -> Result<(), String>
where
    T: cuda_batchnorm::Float + ParamFor<T>,
    P: ParamFor<T>,
{
    use cuda_batchnorm::sync::{self, BackwardElemt, BackwardReduce, Elemt, Gather, Stats};
    type Acc<T> = <T as cuda_batchnorm::Float>::Acc;
    let (n, c) = (full.n(), full.c());
    assert_eq!(splits.iter().sum::<usize>(), n);
    let per_sample = full.numel() / n;
    let mut rng = common::Rng::new(0x5eed ^ n as u64 ^ ((c as u64) << 8));
    let xs: Vec<T> = (0..full.numel())
        .map(|i| T::from_f64(3.0 + 2.0 * rng.normal() + (i % 5) as f64 * 0.1))
        .collect();
    let dys: Vec<T> = (0..full.numel())
        .map(|_| T::from_f64(rng.normal()))
        .collect();
    let w: Vec<P> = (0..c).map(|i| P::from_f64(0.5 + i as f64 * 0.25)).collect();
    let b: Vec<P> = (0..c).map(|i| P::from_f64(i as f64 * 0.1 - 0.2)).collect();
    let rm0: Vec<P> = (0..c).map(|i| P::from_f64(i as f64 * 0.05)).collect();
    let rv0: Vec<P> = (0..c).map(|i| P::from_f64(1.0 + i as f64 * 0.1)).collect();
    let (momentum, eps) = (0.1, 1e-5);
    let up = |v: &[f64]| -> Vec<f64> { v.to_vec() };
    let f64s = |v: &[T]| -> Vec<f64> { v.iter().map(|x| x.to_f64()).collect() };
    let p64 = |v: &[P]| -> Vec<f64> { v.iter().map(|x| x.to_f64()).collect() };

    // The reference: one BatchNorm over the whole batch.
    let x = s.clone_htod(&xs).map_err(gpu_err)?;
    let dy = s.clone_htod(&dys).map_err(gpu_err)?;
    let (wd, bd) = (
        s.clone_htod(&w).map_err(gpu_err)?,
        s.clone_htod(&b).map_err(gpu_err)?,
    );
    let mut rm = s.clone_htod(&rm0).map_err(gpu_err)?;
    let mut rv = s.clone_htod(&rv0).map_err(gpu_err)?;
    let mut y = s.alloc_zeros::<T>(full.numel()).map_err(gpu_err)?;
    let mut sm = s.alloc_zeros::<Acc<T>>(c).map_err(gpu_err)?;
    let mut si = s.alloc_zeros::<Acc<T>>(c).map_err(gpu_err)?;
    let args = Forward::<T, P> {
        input: &x,
        shape: full,
        running_mean: Some(&mut rm),
        running_var: Some(&mut rv),
        weight: Some(&wd),
        bias: Some(&bd),
        training: true,
        momentum,
        eps,
    };
    let save = SaveStats {
        mean: &mut sm,
        invstd: &mut si,
    };
    let mut ws = Workspace::new();
    batch_norm(s, args, &mut y, Some(save), &mut ws).map_err(gpu_err)?;
    let mut dx = s.alloc_zeros::<T>(full.numel()).map_err(gpu_err)?;
    let mut gw = s.alloc_zeros::<P>(c).map_err(gpu_err)?;
    let mut gb = s.alloc_zeros::<P>(c).map_err(gpu_err)?;
    let args = functional::Backward::<T, P> {
        grad_output: &dy,
        input: &x,
        shape: full,
        weight: Some(&wd),
        stats: BackwardStats::Batch {
            save_mean: &sm,
            save_invstd: &si,
        },
    };
    let grads = Grads {
        input: &mut dx,
        weight: Some(&mut gw),
        bias: Some(&mut gb),
    };
    batch_norm_backward(s, args, grads, &mut ws).map_err(gpu_err)?;
    let get = |b: &CudaSlice<T>| s.clone_dtoh(b).map_err(gpu_err);
    let getp = |b: &CudaSlice<P>| s.clone_dtoh(b).map_err(gpu_err);
    let (y_ref, dx_ref) = (f64s(&get(&y)?), f64s(&get(&dx)?));
    let (rm_ref, rv_ref) = (p64(&getp(&rm)?), p64(&getp(&rv)?));
    let (gw_ref, gb_ref) = (p64(&getp(&gw)?), p64(&getp(&gb)?));

    // The ranks.
    let mut ranks = Vec::new();
    let mut start = 0;
    for &k in splits {
        let range = start * per_sample..(start + k) * per_sample;
        let mut dims = full.dims().to_vec();
        dims[0] = k;
        let shape = Shape::new(&dims, full.format()).map_err(gpu_err)?;
        // An empty rank's buffers hold one unused element (the driver allocates none of
        // zero bytes).
        let pad = |v: &[T]| {
            if v.is_empty() {
                vec![T::from_f64(0.0)]
            } else {
                v.to_vec()
            }
        };
        ranks.push(RankSlice {
            shape,
            x: s.clone_htod(&pad(&xs[range.clone()])).map_err(gpu_err)?,
            dy: s.clone_htod(&pad(&dys[range])).map_err(gpu_err)?,
        });
        start += k;
    }
    // 1. local statistics, 2. the all-gather (here on the host).
    let (mut means, mut invstds, mut counts) = (Vec::new(), Vec::new(), Vec::new());
    for r in &ranks {
        let mut mean = s.alloc_zeros::<Acc<T>>(c).map_err(gpu_err)?;
        let mut invstd = s.alloc_zeros::<Acc<T>>(c).map_err(gpu_err)?;
        let args = Stats {
            input: &r.x,
            shape: r.shape,
            eps,
        };
        sync::batch_norm_stats(s, args, &mut mean, &mut invstd, &mut ws).map_err(gpu_err)?;
        means.extend(s.clone_dtoh(&mean).map_err(gpu_err)?);
        invstds.extend(s.clone_dtoh(&invstd).map_err(gpu_err)?);
        counts.push(<Acc<T>>::from_f64(r.shape.per_channel() as f64));
    }
    let means = s.clone_htod(&means).map_err(gpu_err)?;
    let invstds = s.clone_htod(&invstds).map_err(gpu_err)?;
    let counts = s.clone_htod(&counts).map_err(gpu_err)?;
    // 3. the merge (every rank computes the same; one does here).
    let mut rm = s.clone_htod(&rm0).map_err(gpu_err)?;
    let mut rv = s.clone_htod(&rv0).map_err(gpu_err)?;
    let mut mean = s.alloc_zeros::<Acc<T>>(c).map_err(gpu_err)?;
    let mut invstd = s.alloc_zeros::<Acc<T>>(c).map_err(gpu_err)?;
    let args = Gather::<Acc<T>, P> {
        means: &means,
        invstds: &invstds,
        counts: &counts,
        running_mean: Some(&mut rm),
        running_var: Some(&mut rv),
        momentum,
        eps,
    };
    sync::batch_norm_gather_stats_with_counts::<T, P>(s, c, args, &mut mean, &mut invstd)
        .map_err(gpu_err)?;
    let what = |v: &str| {
        format!(
            "{v} of {} ranks {splits:?} over {:?} {:?}, {} / {}",
            splits.len(),
            full.dims(),
            full.format(),
            T::DTYPE.name(),
            P::DTYPE.name()
        )
    };
    common::check_close(&what("running_mean"), &getp(&rm)?, &up(&rm_ref))?;
    common::check_close(&what("running_var"), &getp(&rv)?, &up(&rv_ref))?;
    let saved = |b: &CudaSlice<Acc<T>>| -> Result<Vec<f64>, String> {
        Ok(s.clone_dtoh(b)
            .map_err(gpu_err)?
            .iter()
            .map(|v| v.to_f64())
            .collect())
    };
    common::check_close(
        &what("mean"),
        &s.clone_dtoh(&mean).map_err(gpu_err)?,
        &saved(&sm)?,
    )?;
    common::check_close(
        &what("invstd"),
        &s.clone_dtoh(&invstd).map_err(gpu_err)?,
        &saved(&si)?,
    )?;
    // 4. each rank normalises; the backward's local sums.
    let (mut ys, mut sums) = (Vec::<T>::new(), vec![0.0f64; 2 * c]);
    let (mut gw_sum, mut gb_sum) = (vec![0.0f64; c], vec![0.0f64; c]);
    for r in &ranks {
        let mut y = s.alloc_zeros::<T>(r.x.len()).map_err(gpu_err)?;
        let args = Elemt::<T, P> {
            input: &r.x,
            shape: r.shape,
            weight: Some(&wd),
            bias: Some(&bd),
            mean: &mean,
            invstd: &invstd,
        };
        sync::batch_norm_elemt(s, args, &mut y, &mut ws).map_err(gpu_err)?;
        ys.extend_from_slice(&get(&y)?[..r.shape.numel()]);
        let mut local = s.alloc_zeros::<Acc<T>>(2 * c).map_err(gpu_err)?;
        let mut gw = s.alloc_zeros::<P>(c).map_err(gpu_err)?;
        let mut gb = s.alloc_zeros::<P>(c).map_err(gpu_err)?;
        let args = BackwardReduce::<T> {
            grad_output: &r.dy,
            input: &r.x,
            shape: r.shape,
            mean: &mean,
            invstd: &invstd,
        };
        sync::batch_norm_backward_reduce::<T, P>(
            s,
            args,
            &mut local,
            Some(&mut gw),
            Some(&mut gb),
            &mut ws,
        )
        .map_err(gpu_err)?;
        for (acc, v) in sums.iter_mut().zip(saved(&local)?) {
            *acc += v;
        }
        for (acc, v) in gw_sum.iter_mut().zip(p64(&getp(&gw)?)) {
            *acc += v;
        }
        for (acc, v) in gb_sum.iter_mut().zip(p64(&getp(&gb)?)) {
            *acc += v;
        }
    }
    common::check_close(&what("y"), &ys, &y_ref)?;
    // DDP's all-reduce of the parameter gradients, in P.
    let in_p = |v: &[f64]| -> Vec<P> { v.iter().map(|&x| P::from_f64(x)).collect() };
    common::check_close(
        &what("grad_weight (summed over ranks)"),
        &in_p(&gw_sum),
        &gw_ref,
    )?;
    common::check_close(
        &what("grad_bias (summed over ranks)"),
        &in_p(&gb_sum),
        &gb_ref,
    )?;
    // 5. the all-reduce (here on the host), then each rank's dx.
    let sums: Vec<Acc<T>> = sums.iter().map(|&v| <Acc<T>>::from_f64(v)).collect();
    let sums = s.clone_htod(&sums).map_err(gpu_err)?;
    let mut dxs = Vec::<T>::new();
    for r in &ranks {
        let mut dx = s.alloc_zeros::<T>(r.x.len()).map_err(gpu_err)?;
        let args = BackwardElemt::<T, P> {
            grad_output: &r.dy,
            input: &r.x,
            shape: r.shape,
            mean: &mean,
            invstd: &invstd,
            weight: Some(&wd),
            sums: &sums,
            counts: &counts,
        };
        sync::batch_norm_backward_elemt(s, args, &mut dx, &mut ws).map_err(gpu_err)?;
        dxs.extend_from_slice(&get(&dx)?[..r.shape.numel()]);
    }
    common::check_close(&what("dx"), &dxs, &dx_ref)
}

/// The stats-stage functions with 1 to 4 ranks, even and uneven batches and an empty
/// rank, every type pair, both layouts, against one BatchNorm over the whole batch.
#[test]
#[cfg_attr(
    not(cuda_batchnorm_ptx),
    ignore = "built without PTX (no nvcc at build time; see the README's Getting nvcc)"
)]
fn stats_stage_over_ranks_matches_one_batch_norm() {
    let Some(Gpu { stream, .. }) = gpu("stats_stage_over_ranks_matches_one_batch_norm") else {
        return;
    };
    let splits: [&[usize]; 4] = [&[6], &[3, 3], &[1, 0, 5], &[2, 1, 0, 3]];
    let mut failures = Vec::new();
    for format in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
        let full = Shape::new(&[6, 5, 3, 7], format).unwrap();
        for split in splits {
            let r = [
                stats_stage_case::<f32, f32>(&stream, full, split),
                stats_stage_case::<f64, f64>(&stream, full, split),
                stats_stage_case::<f16, f16>(&stream, full, split),
                stats_stage_case::<f16, f32>(&stream, full, split),
                stats_stage_case::<cuda_batchnorm::half::bf16, cuda_batchnorm::half::bf16>(
                    &stream, full, split,
                ),
                stats_stage_case::<cuda_batchnorm::half::bf16, f32>(&stream, full, split),
            ];
            failures.extend(r.into_iter().filter_map(Result::err));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// [`Collectives`](cuda_batchnorm::sync::Collectives) for ranks as threads of this
/// process, all on one device, through the host: each rank copies what it sends to
/// the host, waits for the others, and copies what it receives back. Slow and simple;
/// it lets the module's protocol be tested on the emulated driver and on one GPU.
struct HostCollectives {
    rank: usize,
    world: usize,
    shared: Arc<HostShared>,
}

struct HostShared {
    slots: std::sync::Mutex<Vec<Vec<u8>>>,
    barrier: std::sync::Barrier,
    /// Exchanges made, counted on rank 0.
    exchanges: std::sync::atomic::AtomicUsize,
}

impl HostCollectives {
    fn world(n: usize) -> Vec<HostCollectives> {
        let shared = Arc::new(HostShared {
            slots: std::sync::Mutex::new(vec![Vec::new(); n]),
            barrier: std::sync::Barrier::new(n),
            exchanges: std::sync::atomic::AtomicUsize::new(0),
        });
        (0..n)
            .map(|rank| HostCollectives {
                rank,
                world: n,
                shared: shared.clone(),
            })
            .collect()
    }

    /// The world of `n`, rank r's collectives handed out once, to whichever thread asks
    /// for r.
    fn handout(n: usize) -> impl Fn(usize) -> HostCollectives + Sync {
        let comms = std::sync::Mutex::new(Self::world(n).into_iter().map(Some).collect::<Vec<_>>());
        move |r| comms.lock().unwrap()[r].take().unwrap()
    }

    /// Every rank's `bytes` at `send`, rank by rank.
    fn exchange(&self, stream: &CudaStream, send: u64, bytes: usize) -> Vec<Vec<u8>> {
        use cuda_batchnorm::cudarc::driver::result;
        if self.rank == 0 {
            let n = &self.shared.exchanges;
            n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let mut mine = vec![0u8; bytes];
        // SAFETY: the module passes a live allocation of `bytes` bytes on this stream.
        unsafe { result::memcpy_dtoh_async(&mut mine, send, stream.cu_stream()) }.unwrap();
        stream.synchronize().unwrap();
        self.shared.slots.lock().unwrap()[self.rank] = mine;
        self.shared.barrier.wait();
        let all = self.shared.slots.lock().unwrap().clone();
        self.shared.barrier.wait();
        all
    }
}

impl cuda_batchnorm::sync::Collectives for HostCollectives {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    unsafe fn all_gather(
        &self,
        stream: &CudaStream,
        send: u64,
        recv: u64,
        count: usize,
        dtype: cuda_batchnorm::DType,
    ) -> cuda_batchnorm::Result<()> {
        use cuda_batchnorm::cudarc::driver::result;
        let bytes = count * dtype.size();
        let all: Vec<u8> = self.exchange(stream, send, bytes).concat();
        // SAFETY: the module passes a live allocation of world * bytes at `recv`.
        unsafe { result::memcpy_htod_async(recv, &all, stream.cu_stream()) }.unwrap();
        stream.synchronize().unwrap();
        Ok(())
    }

    unsafe fn all_reduce_sum(
        &self,
        stream: &CudaStream,
        buf: u64,
        count: usize,
        dtype: cuda_batchnorm::DType,
    ) -> cuda_batchnorm::Result<()> {
        use cuda_batchnorm::cudarc::driver::result;
        use cuda_batchnorm::DType;
        let all = self.exchange(stream, buf, count * dtype.size());
        let sum: Vec<u8> = match dtype {
            DType::F32 => (0..count)
                .flat_map(|i| {
                    let v: f32 = all
                        .iter()
                        .map(|b| f32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap()))
                        .sum();
                    v.to_le_bytes()
                })
                .collect(),
            DType::F64 => (0..count)
                .flat_map(|i| {
                    let v: f64 = all
                        .iter()
                        .map(|b| f64::from_le_bytes(b[8 * i..8 * i + 8].try_into().unwrap()))
                        .sum();
                    v.to_le_bytes()
                })
                .collect(),
            other => panic!("the module all-reduces accumulators only, not {other:?}"),
        };
        // SAFETY: as in all_gather, in place.
        unsafe { result::memcpy_htod_async(buf, &sum, stream.cu_stream()) }.unwrap();
        stream.synchronize().unwrap();
        Ok(())
    }
}

/// What one rank of a SyncBatchNorm run returns.
struct RankRun<T, P> {
    ys: Vec<Vec<T>>,
    dx: Vec<T>,
    grad_weight: Vec<P>,
    grad_bias: Vec<P>,
    running_mean: Vec<P>,
    running_var: Vec<P>,
    num_batches_tracked: i64,
}

/// SyncBatchNorm on `splits` ranks (threads, one stream each, the host collectives):
/// two training steps (the running statistics move twice, the second with the
/// cumulative average when `momentum` is None) and a backward, judged against one
/// BatchNorm over the concatenated batch: outputs, input gradients, the ranks' summed
/// parameter gradients, and every rank's running statistics.
fn sync_module_case<T, P>(
    ctx: &Arc<cuda_batchnorm::cudarc::driver::CudaContext>,
    full: Shape,
    splits: &[usize],
    momentum: Option<f64>,
) -> Result<(), String>
where
    T: cuda_batchnorm::Float + ParamFor<T>,
    P: ParamFor<T>,
{
    let comm = HostCollectives::handout(splits.len());
    let setup = |r: usize| -> Result<(Arc<CudaStream>, HostCollectives), String> {
        Ok((ctx.new_stream().map_err(gpu_err)?, comm(r)))
    };
    sync_ranks_case::<T, P, HostCollectives>(&ctx.default_stream(), &setup, full, splits, momentum)
}

/// [`sync_module_case`] with each rank's stream and collectives made by `setup(rank)`
/// on the rank's own thread (an NCCL communicator forms once every rank has called).
fn sync_ranks_case<T, P, C>(
    s: &Arc<CudaStream>,
    setup: &(dyn Fn(usize) -> Result<(Arc<CudaStream>, C), String> + Sync),
    full: Shape,
    splits: &[usize],
    momentum: Option<f64>,
) -> Result<(), String>
where
    T: cuda_batchnorm::Float + ParamFor<T>,
    P: ParamFor<T>,
    C: cuda_batchnorm::sync::Collectives,
{
    use cuda_batchnorm::sync::SyncBatchNorm;
    let (n, c) = (full.n(), full.c());
    let per_sample = full.numel() / n;
    let mut rng = common::Rng::new(0xbeef ^ ((splits.len() as u64) << 4));
    let xs: Vec<T> = (0..full.numel())
        .map(|_| T::from_f64(1.0 + 2.0 * rng.normal()))
        .collect();
    let dys: Vec<T> = (0..full.numel())
        .map(|_| T::from_f64(rng.normal()))
        .collect();
    let w: Vec<P> = (0..c)
        .map(|i| P::from_f64(0.75 + 0.125 * i as f64))
        .collect();
    let b: Vec<P> = (0..c).map(|i| P::from_f64(0.25 * i as f64 - 0.5)).collect();
    let options = BatchNormOptions {
        momentum,
        ..BatchNormOptions::default()
    };
    // The reference: BatchNorm over the whole batch, two steps.
    let mut bn = cuda_batchnorm::module::BatchNorm::<0, Cuda, T, P>::new(Cuda::new(s), c, options)
        .map_err(gpu_err)?;
    bn.set_weight(&w).map_err(gpu_err)?;
    bn.set_bias(&b).map_err(gpu_err)?;
    let x = s.clone_htod(&xs).map_err(gpu_err)?;
    let dy = s.clone_htod(&dys).map_err(gpu_err)?;
    let y_ref = (0..2)
        .map(|_| {
            let y = bn.forward(&x, &full).map_err(gpu_err)?;
            s.clone_dtoh(&y).map_err(gpu_err)
        })
        .collect::<Result<Vec<_>, String>>()?;
    let g = bn.backward(&dy, &x, &full).map_err(gpu_err)?;
    let f = |v: Vec<T>| v.iter().map(|x| x.to_f64()).collect::<Vec<_>>();
    let fp = |v: Vec<P>| v.iter().map(|x| x.to_f64()).collect::<Vec<_>>();
    let dx_ref = f(s.clone_dtoh(&g.input).map_err(gpu_err)?);
    let gw_ref = fp(s.clone_dtoh(g.weight.as_ref().unwrap()).map_err(gpu_err)?);
    let gb_ref = fp(s.clone_dtoh(g.bias.as_ref().unwrap()).map_err(gpu_err)?);
    let sd = bn.state_dict().map_err(gpu_err)?;
    let (rm_ref, rv_ref) = (
        fp(sd.running_mean.clone().unwrap()),
        fp(sd.running_var.clone().unwrap()),
    );

    // The ranks, as threads.
    let mut starts = vec![0];
    for k in splits {
        starts.push(starts.last().unwrap() + k);
    }
    let runs = concurrently(splits.len(), |r| -> Result<RankRun<T, P>, String> {
        let range = starts[r] * per_sample..starts[r + 1] * per_sample;
        let mut dims = full.dims().to_vec();
        dims[0] = splits[r];
        let shape = Shape::new(&dims, full.format()).map_err(gpu_err)?;
        let (s, comm) = setup(r)?;
        let mut m = SyncBatchNorm::<T, P, _>::new(&s, c, options, comm).map_err(gpu_err)?;
        // one rank too runs the collectives (the plain path has its own test)
        m.set_sync_options(cuda_batchnorm::sync::SyncOptions {
            force: true,
            ..m.sync_options()
        });
        m.local_mut().set_weight(&w).map_err(gpu_err)?;
        m.local_mut().set_bias(&b).map_err(gpu_err)?;
        // Buffers of at least one element (the driver allocates no zero-byte one).
        let pad = |v: &[T]| {
            let mut v = v.to_vec();
            v.resize(v.len().max(1), T::from_f64(0.0));
            v
        };
        let x = s.clone_htod(&pad(&xs[range.clone()])).map_err(gpu_err)?;
        let dy = s.clone_htod(&pad(&dys[range.clone()])).map_err(gpu_err)?;
        let mut ys = Vec::new();
        for _ in 0..2 {
            let mut y = s.clone_htod(&pad(&[])).map_err(gpu_err)?;
            if shape.numel() > 0 {
                y = s.alloc_zeros(shape.numel()).map_err(gpu_err)?;
            }
            m.forward_into(&x, &shape, &mut y).map_err(gpu_err)?;
            let mut host = s.clone_dtoh(&y).map_err(gpu_err)?;
            host.truncate(shape.numel());
            ys.push(host);
        }
        let mut dx = s.alloc_zeros::<T>(shape.numel().max(1)).map_err(gpu_err)?;
        let mut gw = s.alloc_zeros::<P>(c).map_err(gpu_err)?;
        let mut gb = s.alloc_zeros::<P>(c).map_err(gpu_err)?;
        m.backward_into(&dy, &x, &shape, &mut dx, Some(&mut gw), Some(&mut gb))
            .map_err(gpu_err)?;
        let mut dx = s.clone_dtoh(&dx).map_err(gpu_err)?;
        dx.truncate(shape.numel());
        let sd = m.local().state_dict().map_err(gpu_err)?;
        Ok(RankRun {
            ys,
            dx,
            grad_weight: s.clone_dtoh(&gw).map_err(gpu_err)?,
            grad_bias: s.clone_dtoh(&gb).map_err(gpu_err)?,
            running_mean: sd.running_mean.unwrap(),
            running_var: sd.running_var.unwrap(),
            num_batches_tracked: m.local().num_batches_tracked(),
        })
    });
    let runs = runs.into_iter().collect::<Result<Vec<_>, String>>()?;
    let what = |v: &str| {
        format!(
            "SyncBatchNorm {v}, ranks {splits:?} of {:?} {:?}, {} / {}, momentum {momentum:?}",
            full.dims(),
            full.format(),
            T::DTYPE.name(),
            P::DTYPE.name()
        )
    };
    for (step, y_ref) in y_ref.iter().enumerate() {
        let y: Vec<T> = runs.iter().flat_map(|r| r.ys[step].clone()).collect();
        common::check_close(&what(&format!("y, step {step}")), &y, &f(y_ref.clone()))?;
    }
    let dx: Vec<T> = runs.iter().flat_map(|r| r.dx.clone()).collect();
    common::check_close(&what("dx"), &dx, &dx_ref)?;
    let summed = |pick: &dyn Fn(&RankRun<T, P>) -> &Vec<P>| -> Vec<P> {
        (0..c)
            .map(|i| P::from_f64(runs.iter().map(|r| pick(r)[i].to_f64()).sum()))
            .collect()
    };
    common::check_close(
        &what("grad_weight (summed)"),
        &summed(&|r| &r.grad_weight),
        &gw_ref,
    )?;
    common::check_close(
        &what("grad_bias (summed)"),
        &summed(&|r| &r.grad_bias),
        &gb_ref,
    )?;
    for (k, r) in runs.iter().enumerate() {
        common::check_close(
            &what(&format!("running_mean of rank {k}")),
            &r.running_mean,
            &rm_ref,
        )?;
        common::check_close(
            &what(&format!("running_var of rank {k}")),
            &r.running_var,
            &rv_ref,
        )?;
        assert_eq!(r.num_batches_tracked, 2, "{}", what("num_batches_tracked"));
        // Every rank's statistics are the same computation on the same gathered data.
        assert_eq!(
            r.running_mean
                .iter()
                .map(|v| v.to_f64().to_bits())
                .collect::<Vec<_>>(),
            runs[0]
                .running_mean
                .iter()
                .map(|v| v.to_f64().to_bits())
                .collect::<Vec<_>>(),
            "{}",
            what("running_mean bitwise across ranks")
        );
    }
    Ok(())
}

/// SyncBatchNorm with 1 to 4 ranks, even, uneven and empty batches, both layouts,
/// every type pair, against one BatchNorm over the concatenated batch.
#[test]
#[cfg_attr(
    not(cuda_batchnorm_ptx),
    ignore = "built without PTX (no nvcc at build time; see the README's Getting nvcc)"
)]
fn sync_batch_norm_over_ranks_matches_one_batch_norm() {
    let Some(Gpu { stream, .. }) = gpu("sync_batch_norm_over_ranks_matches_one_batch_norm") else {
        return;
    };
    let ctx = stream.context().clone();
    let splits: [&[usize]; 5] = [&[5], &[2, 3], &[1, 0, 4], &[2, 1, 0, 2], &[3, 2]];
    let mut failures = Vec::new();
    for format in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
        let full = Shape::new(&[5, 3, 2, 3], format).unwrap();
        for (i, split) in splits.iter().enumerate() {
            // the last split with the cumulative average
            let momentum = if i == 4 { None } else { Some(0.1) };
            let r = [
                sync_module_case::<f32, f32>(&ctx, full, split, momentum),
                sync_module_case::<f64, f64>(&ctx, full, split, momentum),
                sync_module_case::<f16, f16>(&ctx, full, split, momentum),
                sync_module_case::<f16, f32>(&ctx, full, split, momentum),
                sync_module_case::<cuda_batchnorm::half::bf16, cuda_batchnorm::half::bf16>(
                    &ctx, full, split, momentum,
                ),
                sync_module_case::<cuda_batchnorm::half::bf16, f32>(&ctx, full, split, momentum),
            ];
            failures.extend(r.into_iter().filter_map(Result::err));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Runs `f(rank, comm)` on `world` threads with the host collectives; returns each
/// rank's result.
fn on_ranks<R: Send>(world: usize, f: impl Fn(usize, HostCollectives) -> R + Sync) -> Vec<R> {
    let comm = HostCollectives::handout(world);
    concurrently(world, |r| f(r, comm(r)))
}

/// Ranks that disagree, a global batch of one value per channel, and a rank whose own
/// call is wrong: every rank returns an error (none waits for the others), and no
/// rank's state changes. PyTorch's SyncBatchNorm rank and channel checks come first.
#[test]
#[cfg_attr(
    not(cuda_batchnorm_ptx),
    ignore = "built without PTX (no nvcc at build time; see the README's Getting nvcc)"
)]
fn sync_batch_norm_errors_reach_every_rank() {
    use cuda_batchnorm::sync::SyncBatchNorm;
    let Some(Gpu { stream, .. }) = gpu("sync_batch_norm_errors_reach_every_rank") else {
        return;
    };
    let ctx = stream.context().clone();
    // (channels, batch) per rank, and each rank's error.
    let run = |shapes: [(usize, usize); 2], short_output: [bool; 2]| -> Vec<String> {
        on_ranks(2, |r, comm| {
            let s = ctx.new_stream().unwrap();
            let (c, n) = shapes[r];
            let mut m = SyncBatchNorm::<f32, f32, _>::new(&s, c, BatchNormOptions::default(), comm)
                .unwrap();
            let shape = Shape::nchw(n, c, 1, 1).unwrap();
            let x = s.clone_htod(&vec![1.5f32; shape.numel().max(1)]).unwrap();
            let len = if short_output[r] {
                1
            } else {
                shape.numel().max(1)
            };
            let mut y = s.alloc_zeros::<f32>(len).unwrap();
            let before = m.local().state_dict().unwrap();
            let e = m.forward_into(&x, &shape, &mut y).unwrap_err().to_string();
            assert_eq!(
                m.local().state_dict().unwrap(),
                before,
                "rank {r} changed state"
            );
            e
        })
    };
    let errs = run([(3, 4), (5, 4)], [false, false]);
    assert!(errs.iter().all(|e| e.contains("channels")), "{errs:?}");
    let errs = run([(3, 1), (3, 0)], [false, false]);
    assert!(
        errs.iter()
            .all(|e| e.starts_with("Expected more than 1 value per channel when training")),
        "{errs:?}"
    );
    let errs = run([(3, 4), (3, 4)], [false, true]);
    assert!(
        errs[0].contains("rank 1's call failed its own checks"),
        "{errs:?}"
    );
    assert!(errs[1].contains("output holds 1 elements"), "{errs:?}");

    // Failures before a call's collectives: a rank whose input is too short for
    // `forward` (which allocates the output), one whose input is 1D, one whose backward
    // is wrong; the other rank returns an error too.
    let errs = on_ranks(2, |r, comm| {
        let s = ctx.new_stream().unwrap();
        let mut m =
            SyncBatchNorm::<f32, f32, _>::new(&s, 3, BatchNormOptions::default(), comm).unwrap();
        let shape = Shape::nchw(2, 3, 2, 2).unwrap();
        let short = s
            .clone_htod(&vec![1.0f32; if r == 1 { 5 } else { 24 }])
            .unwrap();
        let e1 = m.forward(&short, &shape).unwrap_err().to_string();
        let flat = Shape::new(&[24], MemoryFormat::Contiguous).unwrap();
        let x = s.clone_htod(&vec![1.0f32; 24]).unwrap();
        let e2 = m
            .forward(&x, if r == 0 { &flat } else { &shape })
            .unwrap_err()
            .to_string();
        let x = s
            .clone_htod(&(0..24).map(|i| i as f32).collect::<Vec<_>>())
            .unwrap();
        m.forward(&x, &shape).unwrap();
        let dy = s.clone_htod(&vec![0.5f32; 24]).unwrap();
        let mut dx = s.alloc_zeros::<f32>(if r == 0 { 3 } else { 24 }).unwrap();
        let e3 = m
            .backward_into(&dy, &x, &shape, &mut dx, None, None)
            .unwrap_err()
            .to_string();
        m.backward(&dy, &x, &shape).unwrap();
        [e1, e2, e3]
    });
    let [a, b] = [&errs[0], &errs[1]];
    assert!(
        a[0].contains("rank 1's call failed") && b[0].contains("input holds 5"),
        "{errs:?}"
    );
    assert!(
        a[1].contains("expected at least 2D input") && b[1].contains("rank 0's call failed"),
        "{errs:?}"
    );
    assert!(
        a[2].contains("grad_input holds 3") && b[2].contains("rank 0's call failed"),
        "{errs:?}"
    );

    // A module without per-channel state takes any C; a forward refused after the
    // exchange (a global batch of one value per channel) keeps the last forward's
    // statistics for its backward.
    let options = BatchNormOptions {
        affine: false,
        track_running_stats: false,
        ..BatchNormOptions::default()
    };
    let comm = HostCollectives::world(1).pop().unwrap();
    let mut m = SyncBatchNorm::<f32, f32, _>::new(&stream, 3, options, comm).unwrap();
    m.set_sync_options(cuda_batchnorm::sync::SyncOptions {
        force: true,
        ..m.sync_options()
    });
    let shape = Shape::nchw(2, 3, 2, 2).unwrap();
    let x = stream
        .clone_htod(&(0..24).map(|i| i as f32).collect::<Vec<_>>())
        .unwrap();
    let dy = stream.clone_htod(&vec![0.5f32; 24]).unwrap();
    let g0 = m
        .forward(&x, &shape)
        .and_then(|_| m.backward(&dy, &x, &shape))
        .unwrap();
    let other = Shape::nc(1, 5).unwrap();
    assert!(m
        .forward(&x, &other)
        .unwrap_err()
        .to_string()
        .starts_with("Expected more than 1"));
    let g1 = m.backward(&dy, &x, &shape).unwrap();
    assert_eq!(
        stream.clone_dtoh(&g0.input).unwrap(),
        stream.clone_dtoh(&g1.input).unwrap()
    );
    // Other batch sizes on the same buffers (the count is written anew): the plain
    // module's numbers.
    let mut plain =
        cuda_batchnorm::module::BatchNorm::<0, Cuda, f32, f32>::new(Cuda::new(&stream), 3, options)
            .unwrap();
    for n in [1, 2] {
        let shape = Shape::nchw(n, 3, 2, 2).unwrap();
        let (a, b) = (
            stream.clone_dtoh(&m.forward(&x, &shape).unwrap()).unwrap(),
            stream
                .clone_dtoh(&plain.forward(&x, &shape).unwrap())
                .unwrap(),
        );
        let reference: Vec<f64> = b.iter().map(|&v| f64::from(v)).collect();
        common::check_close(&format!("forced one-rank sync, N = {n}"), &a, &reference).unwrap();
        let (ga, gb) = (
            m.backward(&dy, &x, &shape).unwrap(),
            plain.backward(&dy, &x, &shape).unwrap(),
        );
        let reference: Vec<f64> = stream
            .clone_dtoh(&gb.input)
            .unwrap()
            .iter()
            .map(|&v| f64::from(v))
            .collect();
        let dx = stream.clone_dtoh(&ga.input).unwrap();
        common::check_close(
            &format!("forced one-rank sync dx, N = {n}"),
            &dx,
            &reference,
        )
        .unwrap();
    }

    // PyTorch's own checks, before any communication.
    let comm = HostCollectives::world(1).pop().unwrap();
    let mut m =
        SyncBatchNorm::<f32, f32, _>::new(&stream, 3, BatchNormOptions::default(), comm).unwrap();
    let x = stream.clone_htod(&[1.0f32; 4]).unwrap();
    let mut y = stream.alloc_zeros::<f32>(4).unwrap();
    let flat = Shape::new(&[4], MemoryFormat::Contiguous).unwrap();
    assert_eq!(
        m.forward_into(&x, &flat, &mut y).unwrap_err().to_string(),
        "expected at least 2D input (got 1D input)"
    );
    let none = Shape::nc(4, 0).unwrap();
    assert_eq!(
        m.forward_into(&x, &none, &mut y).unwrap_err().to_string(),
        "SyncBatchNorm number of input channels should be non-zero"
    );
}

/// On one rank, and in eval, SyncBatchNorm is the plain BatchNorm: bitwise the same
/// outputs, gradients and running statistics; `from_batch_norm` keeps a module's state.
#[test]
#[cfg_attr(
    not(cuda_batchnorm_ptx),
    ignore = "built without PTX (no nvcc at build time; see the README's Getting nvcc)"
)]
fn sync_batch_norm_on_one_rank_and_in_eval_is_batch_norm() {
    use cuda_batchnorm::sync::SyncBatchNorm;
    let Some(Gpu { stream: s, .. }) = gpu("sync_batch_norm_on_one_rank_and_in_eval_is_batch_norm")
    else {
        return;
    };
    let (c, shape) = (4, Shape::nhwc(3, 4, 2, 5).unwrap());
    let xs: Vec<f32> = (0..shape.numel())
        .map(|i| ((i * 7) % 13) as f32 * 0.3 - 1.0)
        .collect();
    let x = s.clone_htod(&xs).unwrap();
    let dy = s
        .clone_htod(&xs.iter().map(|v| v * 0.5 - 0.1).collect::<Vec<_>>())
        .unwrap();
    let sd = trained_state(c);
    let mut bn = BatchNorm2d::<f32>::new(Cuda::new(&s), c, BatchNormOptions::default()).unwrap();
    bn.load_state_dict(&sd).unwrap();
    let mut sync = SyncBatchNorm::from_batch_norm(
        {
            let mut b =
                BatchNorm2d::<f32>::new(Cuda::new(&s), c, BatchNormOptions::default()).unwrap();
            b.load_state_dict(&sd).unwrap();
            b
        },
        HostCollectives::world(1).pop().unwrap(),
    )
    .unwrap();
    assert_eq!(sync.local().state_dict().unwrap(), bn.state_dict().unwrap());
    // A rank past its world: the module comes back as it was.
    let mut past = HostCollectives::world(1).pop().unwrap();
    past.rank = 1;
    let mut b = BatchNorm2d::<f32>::new(Cuda::new(&s), c, BatchNormOptions::default()).unwrap();
    b.load_state_dict(&sd).unwrap();
    let refused = SyncBatchNorm::from_batch_norm(b, past).err().unwrap();
    assert_eq!(refused.to_string(), refused.error.to_string());
    assert!(
        refused.to_string().contains("rank 1 of a world of 1"),
        "{refused}"
    );
    assert_eq!(
        refused.module.state_dict().unwrap(),
        bn.state_dict().unwrap()
    );
    for training in [true, false] {
        if !training {
            bn.eval();
            sync.eval();
        }
        let y0 = s.clone_dtoh(&bn.forward(&x, &shape).unwrap()).unwrap();
        let y1 = s.clone_dtoh(&sync.forward(&x, &shape).unwrap()).unwrap();
        assert_eq!(y0, y1, "training {training}");
        let g0 = bn.backward(&dy, &x, &shape).unwrap();
        let g1 = sync.backward(&dy, &x, &shape).unwrap();
        assert_eq!(
            s.clone_dtoh(&g0.input).unwrap(),
            s.clone_dtoh(&g1.input).unwrap(),
            "training {training}"
        );
        assert_eq!(
            s.clone_dtoh(g0.weight.as_ref().unwrap()).unwrap(),
            s.clone_dtoh(g1.weight.as_ref().unwrap()).unwrap()
        );
        assert_eq!(bn.state_dict().unwrap(), sync.local().state_dict().unwrap());
    }
}

/// The layers of a model share one communicator through `&C` and `Rc<C>`: two forced
/// one-rank layers in a chain run their collectives through it and give the plain
/// modules' numbers.
#[test]
#[cfg_attr(
    not(cuda_batchnorm_ptx),
    ignore = "built without PTX (no nvcc at build time; see the README's Getting nvcc)"
)]
fn sync_batch_norm_layers_share_one_communicator() {
    use cuda_batchnorm::sync::{SyncBatchNorm, SyncOptions};
    use std::sync::atomic::Ordering;
    let Some(Gpu { stream: s, .. }) = gpu("sync_batch_norm_layers_share_one_communicator") else {
        return;
    };
    let (c, shape) = (3, Shape::nchw(4, 3, 2, 3).unwrap());
    let xs: Vec<f32> = (0..shape.numel())
        .map(|i| ((i * 5) % 11) as f32 * 0.4 - 1.5)
        .collect();
    let x = s.clone_htod(&xs).unwrap();
    let comm = std::rc::Rc::new(HostCollectives::world(1).pop().unwrap());
    let opts = BatchNormOptions::default();
    let forced = SyncOptions {
        force: true,
        ..SyncOptions::default()
    };
    let mut first = SyncBatchNorm::<f32, f32, _>::new(&s, c, opts, comm.clone()).unwrap();
    let mut second = SyncBatchNorm::<f32, f32, _>::new(&s, c, opts, &*comm).unwrap();
    first.set_sync_options(forced);
    second.set_sync_options(forced);
    let mut plain = [(); 2].map(|()| BatchNorm2d::<f32>::new(Cuda::new(&s), c, opts).unwrap());
    let h = first.forward(&x, &shape).unwrap();
    let y = s.clone_dtoh(&second.forward(&h, &shape).unwrap()).unwrap();
    let h0 = plain[0].forward(&x, &shape).unwrap();
    let y0 = s
        .clone_dtoh(&plain[1].forward(&h0, &shape).unwrap())
        .unwrap();
    // Each layer's forward: the verifying header, then the statistics.
    assert_eq!(comm.shared.exchanges.load(Ordering::Relaxed), 4);
    let err = y
        .iter()
        .zip(&y0)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(err < 1e-5, "max difference {err}");
    for (sync, bn) in [(first.local(), &plain[0]), (second.local(), &plain[1])] {
        let (a, b) = (sync.state_dict().unwrap(), bn.state_dict().unwrap());
        let rv = |sd: &cuda_batchnorm::StateDict<f32>| sd.running_var.clone().unwrap();
        let diff = rv(&a)
            .iter()
            .zip(&rv(&b))
            .map(|(p, q)| (p - q).abs())
            .fold(0.0, f32::max);
        assert!(diff < 1e-5, "running variance differs by {diff}");
    }
}

/// SyncBatchNorm over NCCL (`sync::Nccl`): one rank per device, ranks as threads, with
/// 1 to 4 ranks (as many as there are devices: the emulated driver's four with the
/// emulated NCCL where there is no GPU; a GPU machine's, with its libnccl) against one
/// BatchNorm over the concatenated batch. Where libnccl cannot be loaded the test skips
/// (`CUDA_BATCHNORM_REQUIRE_NCCL=1` makes that a failure).
#[test]
#[cfg_attr(
    not(cuda_batchnorm_ptx),
    ignore = "built without PTX (no nvcc at build time; see the README's Getting nvcc)"
)]
fn sync_batch_norm_over_nccl_matches_one_batch_norm() {
    use cuda_batchnorm::sync::{Nccl, NcclId};
    let test = "sync_batch_norm_over_nccl_matches_one_batch_norm";
    let Some(Gpu { stream, emulated }) = gpu(test) else {
        return;
    };
    if emulated {
        cuda_batchnorm_emu::nccl::preload().unwrap();
    }
    if let Err(e) = Nccl::version() {
        let required = std::env::var("CUDA_BATCHNORM_REQUIRE_NCCL").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "CUDA_BATCHNORM_REQUIRE_NCCL=1 but {test} cannot run: {e}"
        );
        let _ = writeln!(std::io::stderr(), "skipping {test}: {e}");
        return;
    }
    let devices = cuda_batchnorm::cudarc::driver::CudaContext::device_count().unwrap() as usize;
    let splits: [&[usize]; 4] = [&[5], &[2, 3], &[1, 0, 4], &[2, 1, 0, 2]];
    let mut failures = Vec::new();
    for format in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
        let full = Shape::new(&[5, 3, 2, 3], format).unwrap();
        for split in splits.iter().filter(|s| s.len() <= devices) {
            // A communicator per run, each from a fresh id (passed as bytes, as between
            // processes).
            let setup = || {
                let id = Nccl::unique_id().unwrap().bytes();
                move |r: usize| -> Result<(Arc<CudaStream>, Nccl), String> {
                    let ctx = open_device(r).map_err(gpu_err)?;
                    let comm = Nccl::from_rank(&ctx, r, split.len(), NcclId::from_bytes(id))
                        .map_err(gpu_err)?;
                    Ok((ctx.new_stream().map_err(gpu_err)?, comm))
                }
            };
            use cuda_batchnorm::half::bf16;
            let r = [
                sync_ranks_case::<f32, f32, _>(&stream, &setup(), full, split, Some(0.1)),
                sync_ranks_case::<f64, f64, _>(&stream, &setup(), full, split, Some(0.1)),
                sync_ranks_case::<f16, f16, _>(&stream, &setup(), full, split, Some(0.1)),
                sync_ranks_case::<f16, f32, _>(&stream, &setup(), full, split, None),
                sync_ranks_case::<bf16, bf16, _>(&stream, &setup(), full, split, Some(0.1)),
                sync_ranks_case::<bf16, f32, _>(&stream, &setup(), full, split, None),
            ];
            failures.extend(r.into_iter().filter_map(Result::err));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Over NCCL too, ranks whose channel counts differ all get an error, none hangs.
#[test]
#[cfg_attr(
    not(cuda_batchnorm_ptx),
    ignore = "built without PTX (no nvcc at build time; see the README's Getting nvcc)"
)]
fn sync_batch_norm_over_nccl_reports_mismatched_ranks() {
    use cuda_batchnorm::sync::{Nccl, NcclId, SyncBatchNorm};
    let test = "sync_batch_norm_over_nccl_reports_mismatched_ranks";
    let Some(Gpu { emulated, .. }) = gpu(test) else {
        return;
    };
    if emulated {
        cuda_batchnorm_emu::nccl::preload().unwrap();
    }
    let devices = cuda_batchnorm::cudarc::driver::CudaContext::device_count().unwrap();
    if Nccl::version().is_err() || devices < 2 {
        let _ = writeln!(
            std::io::stderr(),
            "skipping {test}: it needs NCCL and two devices"
        );
        return;
    }
    let id = Nccl::unique_id().unwrap().bytes();
    let errs = on_ranks(2, |r, _| {
        let ctx = open_device(r).unwrap();
        let comm = Nccl::from_rank(&ctx, r, 2, NcclId::from_bytes(id)).unwrap();
        let s = ctx.default_stream();
        let c = 3 + r;
        let mut m =
            SyncBatchNorm::<f32, f32, _>::new(&s, c, BatchNormOptions::default(), comm).unwrap();
        let shape = Shape::nchw(2, c, 2, 2).unwrap();
        let x = s.clone_htod(&vec![0.5f32; shape.numel()]).unwrap();
        m.forward(&x, &shape).unwrap_err().to_string()
    });
    assert!(
        errs.iter()
            .all(|e| e.contains("rank 1 has 4 channels") || e.contains("rank 0 has 3 channels")),
        "{errs:?}"
    );
}

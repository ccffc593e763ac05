//! Every kernel, every dtype pair and both layouts, executed on the CPU by the kernel
//! emulator (the `cuda-batchnorm-emu` dev-dependency compiles kernels/*.cu as host C++
//! and runs each CUDA thread as a fiber, checking every memory access, barrier and warp
//! collective) and checked against the f64 reference. Runs in every `cargo test`, with
//! or without nvcc or a GPU.
//!
//! The kernels are launched through the crate's own raw layer and launch plan
//! (`cuda_batchnorm::raw`, `cuda_batchnorm::launch`), exactly as on the GPU; [`Emu`] is a
//! [`Backend`] whose "device memory" is host memory, so the modules, the functional
//! argument checks and the PyTorch fixtures run over the real kernels too.

mod common;

use std::collections::BTreeSet;
use std::sync::Mutex;

use common::{
    check_cases, check_problem, fixtures, Case, Data, GradOut, Padded, Problem, Runner, TrainOut,
    CASES, TYPE_PAIRS,
};
use cuda_batchnorm::backend::{self, Backend, Epilogue, EpilogueGrad, Forward, Grads, SaveStats};
use cuda_batchnorm::cpu::reference;
use cuda_batchnorm::half::f16;
use cuda_batchnorm::launch::{
    self, Alignment, BnParams, DeviceInfo, KernelId, LaunchConfig, Stage, Tuning, Variant,
};
use cuda_batchnorm::raw::{self, Launcher, Region, RegionKind};
use cuda_batchnorm::validate::ForwardKind;
use cuda_batchnorm::{BnError, Cpu, DType, Float, MemoryFormat, ParamFor, Result, Shape};
use cuda_batchnorm_emu as emu;

/// Kernel names launched by any test of this binary.
static LAUNCHED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// A small device: grids of a few blocks keep the emulation fast.
const SMALL: DeviceInfo = DeviceInfo {
    sm_count: 4,
    compute_capability: (9, 0),
    l2_bytes: 1 << 20,
};

/// Tuning that gives even small shapes several blocks per channel.
const SPLIT: Tuning = Tuning {
    blocks_per_sm: 4,
    min_values_per_block: 64,
    force_index64: false,
    force_scalar: false,
    variant: None,
    table: None,
};

/// The emulator as a [`Launcher`].
struct EmuLauncher {
    device: DeviceInfo,
    options: emu::Options,
}

impl Launcher for EmuLauncher {
    fn device(&self) -> &DeviceInfo {
        &self.device
    }

    /// 4, or fewer where a device's whole grid of 256-thread blocks would exceed the
    /// emulator's 65536 co-resident threads of a cooperative launch (an H100's 132 SMs),
    /// or where the shared memory (the dynamic bytes asked for and the kernel's static
    /// bound) leaves room for fewer in an H100's 228 KB per multiprocessor (1 KB of it
    /// reserved per block); 0 past the opt-in.
    fn resident_blocks(&self, kernel: &KernelId, block_threads: u32, shared: u32) -> Result<u32> {
        if shared > self.dynamic_shared_limit(kernel)? {
            return Ok(0);
        }
        let cap = 65536 / block_threads.max(1) / self.device.sm_count.max(1);
        let used = shared + launch::static_shared_bound(kernel);
        let by_shared = (228 << 10) / (used + (1 << 10));
        let limit = self.options.max_resident_blocks.clamp(1, 4);
        Ok(cap.clamp(1, limit).min(by_shared))
    }

    /// An H100's opt-in per block, less the kernel's static shared memory.
    fn dynamic_shared_limit(&self, kernel: &KernelId) -> Result<u32> {
        Ok(emu::SHARED_OPTIN_BYTES - launch::static_shared_bound(kernel))
    }

    fn launch(
        &self,
        kernel: KernelId,
        config: &LaunchConfig,
        params: &BnParams,
        regions: &[Region],
    ) -> Result<()> {
        let name = kernel.name();
        let regions: Vec<emu::Region> = regions
            .iter()
            .filter(|r| r.bytes > 0)
            .map(|r| emu::Region {
                addr: r.addr,
                bytes: r.bytes,
                name: r.name,
                kind: match r.kind {
                    RegionKind::Input => emu::RegionKind::Input,
                    RegionKind::Output => emu::RegionKind::Output,
                    RegionKind::InOut => emu::RegionKind::InOut,
                    RegionKind::Scratch => emu::RegionKind::Scratch,
                    RegionKind::Counters => emu::RegionKind::Counters,
                },
            })
            .collect();
        let cfg = emu::Launch {
            grid: [config.grid.0, config.grid.1, config.grid.2],
            block: [config.block.0, config.block.1, config.block.2],
            dynamic_shared_bytes: config.shared_bytes,
            cooperative: config.cooperative,
            // The opt-in that dynamic_shared_limit stands for, which CudaLauncher sets
            // before any launch with dynamic shared memory (with its static shared
            // memory a kernel can pass 48 KiB at any dynamic size).
            shared_limit_bytes: if config.shared_bytes > 0 {
                emu::SHARED_OPTIN_BYTES
            } else {
                0
            },
        };
        // SAFETY: the raw layer lists in `regions` exactly the buffers of the call, and
        // every caller in this file passes host slices it owns and leaves alone until
        // the launch returns.
        unsafe { emu::launch(&name, &cfg, params.as_bytes(), &regions, &self.options) }
            .map_err(|e| BnError::Launch(e.to_string()))?;
        LAUNCHED.lock().unwrap().insert(name);
        Ok(())
    }
}

/// Counters and scratch of the emulated backend.
type EmuWorkspace = (Vec<u32>, Vec<u64>);

/// The emulated backend: host memory, kernels run by the emulator.
#[derive(Clone, Copy)]
struct Emu {
    device: DeviceInfo,
    tuning: Tuning,
    seed: u64,
    resident: u32,
    /// Global-access preemption (emu::Options::preempt_one_in).
    preempt: u32,
}

impl Emu {
    fn new(device: DeviceInfo, tuning: Tuning) -> Emu {
        Emu {
            device,
            tuning,
            // BN_EMU_SEED when set, so that a whole run can be repeated under other seeds
            seed: emu::Options::default().seed,
            resident: 4,
            // BN_EMU_PREEMPT likewise
            preempt: emu::Options::default().preempt_one_in,
        }
    }

    fn launcher(&self) -> EmuLauncher {
        EmuLauncher {
            device: self.device,
            options: emu::Options {
                seed: self.seed,
                max_resident_blocks: self.resident,
                preempt_one_in: self.preempt,
            },
        }
    }

    /// Grows the (counters, scratch) workspace for a shape and returns their addresses.
    fn workspace(&self, ws: &mut EmuWorkspace, shape: &Shape, input: DType) -> Result<(u64, u64)> {
        let need = raw::workspace_size(&self.launcher(), shape, input, &self.tuning)?;
        if ws.0.len() < need.counters {
            ws.0 = vec![0u32; need.counters];
        }
        if ws.1.len() * 8 < need.scratch_bytes {
            ws.1 = vec![0u64; need.scratch_bytes.div_ceil(8)];
        }
        Ok((ws.0.as_ptr() as u64, ws.1.as_ptr() as u64))
    }
}

fn addr<E>(s: &[E]) -> u64 {
    s.as_ptr() as u64
}

fn opt_addr<E>(s: &Option<&[E]>) -> u64 {
    s.map_or(0, addr)
}

fn raw_epilogue<T: Float>(e: &Option<Epilogue<'_, Emu, T>>) -> raw::Epilogue {
    match e {
        None => raw::Epilogue::None,
        Some(Epilogue::Relu) => raw::Epilogue::Relu,
        Some(Epilogue::AddRelu { residual }) => raw::Epilogue::AddRelu {
            residual: addr(residual),
        },
    }
}

fn raw_epilogue_grad<T: Float>(e: &Option<EpilogueGrad<'_, Emu, T>>) -> raw::EpilogueGrad {
    match e {
        None => raw::EpilogueGrad::None,
        Some(EpilogueGrad::Relu { output }) => raw::EpilogueGrad::Relu {
            output: addr(output),
        },
        Some(EpilogueGrad::AddRelu {
            output,
            grad_residual,
        }) => raw::EpilogueGrad::AddRelu {
            output: addr(output),
            grad_residual: addr(grad_residual),
        },
    }
}

impl Backend for Emu {
    type Tensor<'t, E: Float> = [E];
    type TensorMut<'t, E: Float> = [E];
    type Buffer<E: Float> = Vec<E>;
    type Workspace = EmuWorkspace;

    fn alloc<E: Float>(&self, len: usize, fill: E) -> Result<Vec<E>> {
        Ok(vec![fill; len])
    }
    fn buffer_len<E: Float>(b: &Vec<E>) -> usize {
        b.len()
    }
    fn tensor<E: Float>(b: &Vec<E>) -> &[E] {
        b
    }
    fn tensor_mut<E: Float>(b: &mut Vec<E>) -> &mut [E] {
        b
    }
    fn reborrow<'s, 'l: 's, E: Float>(t: &'s [E]) -> &'s [E] {
        t
    }
    fn reborrow_mut<'s, 'l: 's, E: Float>(t: &'s mut [E]) -> &'s mut [E] {
        t
    }
    fn to_host<E: Float>(&self, b: &Vec<E>) -> Result<Vec<E>> {
        Ok(b.clone())
    }
    fn copy_from_host<E: Float>(&self, b: &mut Vec<E>, v: &[E]) -> Result<()> {
        b.copy_from_slice(v);
        Ok(())
    }

    fn batch_norm_fused<T: Float, P: ParamFor<T>>(
        &self,
        args: Forward<'_, Emu, T, P>,
        epilogue: Option<Epilogue<'_, Emu, T>>,
        output: &mut [T],
        save: Option<SaveStats<'_, Emu, T::Acc>>,
        workspace: &mut EmuWorkspace,
    ) -> Result<()> {
        backend::validate_epilogue(&epilogue, &args.shape)?;
        let ForwardKind::Run {
            batch_stats,
            update_running,
        } = args.validate(output, save.as_ref())?
        else {
            return Ok(());
        };
        let (counters, scratch) = self.workspace(workspace, &args.shape, T::DTYPE)?;
        let (sm, si) = save
            .as_ref()
            .map_or((0, 0), |s| (addr(s.mean), addr(s.invstd)));
        let a = raw::ForwardArgs {
            x: addr(args.input),
            y: addr(output),
            weight: opt_addr(&args.weight),
            bias: opt_addr(&args.bias),
            running_mean: args.running_mean.as_deref().map_or(0, addr),
            running_var: args.running_var.as_deref().map_or(0, addr),
            save_mean: sm,
            save_invstd: si,
            counters,
            scratch,
            batch_stats,
            update_running,
            eps: args.eps,
            momentum: args.momentum,
            frozen: 0,
            epilogue: raw_epilogue(&epilogue),
        };
        // SAFETY: validation checked every slice against the shape; the slices and the
        // workspace live across the call; host memory is what the emulator executes on.
        unsafe { raw::forward::<T, P>(&self.launcher(), &args.shape, &a, &self.tuning) }
    }

    fn batch_norm_backward_fused<T: Float, P: ParamFor<T>>(
        &self,
        args: backend::Backward<'_, Emu, T, P>,
        epilogue: Option<EpilogueGrad<'_, Emu, T>>,
        grads: Grads<'_, Emu, T, P>,
        workspace: &mut EmuWorkspace,
    ) -> Result<()> {
        backend::validate_epilogue_grad(&epilogue, &args.shape)?;
        if !args.validate(&grads)? {
            for g in [grads.weight, grads.bias].into_iter().flatten() {
                g.fill(P::from_f64(0.0));
            }
            return Ok(());
        }
        let (counters, scratch) = self.workspace(workspace, &args.shape, T::DTYPE)?;
        let stats = match args.stats {
            backend::BackwardStats::Batch {
                save_mean,
                save_invstd,
            } => raw::BackwardStats::Batch {
                save_mean: addr(save_mean),
                save_invstd: addr(save_invstd),
            },
            backend::BackwardStats::Running { mean, var, eps } => raw::BackwardStats::Running {
                mean: addr(mean),
                var: addr(var),
                eps,
            },
        };
        let a = raw::BackwardArgs {
            dy: addr(args.grad_output),
            x: addr(args.input),
            dx: addr(grads.input),
            weight: opt_addr(&args.weight),
            stats,
            grad_weight: grads.weight.as_deref().map_or(0, addr),
            grad_bias: grads.bias.as_deref().map_or(0, addr),
            counters,
            scratch,
            epilogue: raw_epilogue_grad(&epilogue),
        };
        // SAFETY: as in batch_norm.
        unsafe { raw::backward::<T, P>(&self.launcher(), &args.shape, &a, &self.tuning) }
    }

    fn batch_norm_frozen_fused<T: Float>(
        &self,
        args: backend::Frozen<'_, Emu, T>,
        epilogue: Option<Epilogue<'_, Emu, T>>,
        output: &mut [T],
    ) -> Result<()> {
        backend::validate_epilogue(&epilogue, &args.shape)?;
        if !args.validate(output)? {
            return Ok(());
        }
        let a = raw::ForwardArgs {
            x: addr(args.input),
            y: addr(output),
            frozen: addr(args.scale_shift),
            epilogue: raw_epilogue(&epilogue),
            ..raw::ForwardArgs::default()
        };
        // SAFETY: as in batch_norm; a frozen eval uses no workspace.
        unsafe { raw::forward::<T, T::Native>(&self.launcher(), &args.shape, &a, &self.tuning) }
    }

    fn batch_norm_frozen_backward_fused<T: Float>(
        &self,
        args: backend::Frozen<'_, Emu, T>,
        epilogue: Option<EpilogueGrad<'_, Emu, T>>,
        grad_input: &mut [T],
    ) -> Result<()> {
        backend::validate_epilogue_grad(&epilogue, &args.shape)?;
        if !args.validate(grad_input)? {
            return Ok(());
        }
        let a = raw::BackwardArgs {
            dy: addr(args.input),
            x: 0,
            dx: addr(grad_input),
            weight: 0,
            stats: raw::BackwardStats::Frozen {
                scale_shift: addr(args.scale_shift),
            },
            grad_weight: 0,
            grad_bias: 0,
            counters: 0,
            scratch: 0,
            epilogue: raw_epilogue_grad(&epilogue),
        };
        // SAFETY: as in batch_norm.
        unsafe { raw::backward::<T, T::Native>(&self.launcher(), &args.shape, &a, &self.tuning) }
    }
}

/// Runs problems on the emulated kernels with every output surrounded by sentinels.
#[derive(Clone, Copy)]
struct EmuRunner {
    emu: Emu,
    /// Guard elements around each buffer; an odd number shifts every buffer off 16-byte
    /// alignment (all by the same amount).
    pad: usize,
    /// Extra guard elements before the output only: its misalignment then differs from
    /// the input's.
    skew: usize,
}

impl EmuRunner {
    fn new(emu: Emu) -> EmuRunner {
        EmuRunner {
            emu,
            pad: 8,
            skew: 0,
        }
    }
}

fn guarded<E: Float>(v: &Option<Vec<E>>, pad: usize) -> Option<Padded<E>> {
    v.as_deref().map(|v| Padded::new(v, pad))
}

impl Runner for EmuRunner {
    fn train_forward<T: Float, P: ParamFor<T>>(
        &self,
        p: &Problem<T, P>,
    ) -> Result<TrainOut<T, P, T::Acc>, String> {
        let (c, pad) = (p.shape.c(), self.pad);
        let x = Padded::new(&p.x, pad);
        let mut y = Padded::<T>::output(p.shape.numel(), pad + self.skew);
        let mut rm = Padded::new(&p.running_mean, pad);
        let mut rv = Padded::new(&p.running_var, pad);
        let mut sm = Padded::<T::Acc>::output(c, pad);
        let mut si = Padded::<T::Acc>::output(c, pad);
        let (w, b) = (guarded(&p.weight, pad), guarded(&p.bias, pad));
        let args = Forward::<Emu, T, P> {
            input: x.payload(),
            shape: p.shape,
            running_mean: Some(rm.payload_mut()),
            running_var: Some(rv.payload_mut()),
            weight: w.as_ref().map(Padded::payload),
            bias: b.as_ref().map(Padded::payload),
            training: true,
            momentum: p.momentum,
            eps: p.eps,
        };
        let save = SaveStats {
            mean: sm.payload_mut(),
            invstd: si.payload_mut(),
        };
        self.emu
            .batch_norm(
                args,
                y.payload_mut(),
                Some(save),
                &mut EmuWorkspace::default(),
            )
            .map_err(|e| e.to_string())?;
        x.checked("input")?;
        Ok(TrainOut {
            y: y.checked("output")?,
            save_mean: sm.checked("save_mean")?,
            save_invstd: si.checked("save_invstd")?,
            running_mean: rm.checked("running_mean")?,
            running_var: rv.checked("running_var")?,
        })
    }

    fn eval_forward<T: Float, P: ParamFor<T>>(&self, p: &Problem<T, P>) -> Result<Vec<T>, String> {
        let pad = self.pad;
        let x = Padded::new(&p.x, pad);
        let mut y = Padded::<T>::output(p.shape.numel(), pad + self.skew);
        let mut rm = Padded::new(&p.running_mean, pad);
        let mut rv = Padded::new(&p.running_var, pad);
        let (w, b) = (guarded(&p.weight, pad), guarded(&p.bias, pad));
        let args = Forward::<Emu, T, P> {
            input: x.payload(),
            shape: p.shape,
            running_mean: Some(rm.payload_mut()),
            running_var: Some(rv.payload_mut()),
            weight: w.as_ref().map(Padded::payload),
            bias: b.as_ref().map(Padded::payload),
            training: false,
            momentum: p.momentum,
            eps: p.eps,
        };
        self.emu
            .batch_norm(args, y.payload_mut(), None, &mut EmuWorkspace::default())
            .map_err(|e| e.to_string())?;
        if rm.checked("running_mean")? != p.running_mean
            || rv.checked("running_var")? != p.running_var
        {
            return Err("eval changed the running statistics".into());
        }
        y.checked("output")
    }

    fn backward<T: Float, P: ParamFor<T>>(
        &self,
        p: &Problem<T, P>,
        saved: common::Saved<'_, T::Acc>,
    ) -> Result<GradOut<T, P>, String> {
        let (c, pad) = (p.shape.c(), self.pad);
        let x = Padded::new(&p.x, pad);
        let dy = Padded::new(&p.dy, pad);
        let mut dx = Padded::<T>::output(p.shape.numel(), pad + self.skew);
        let w = guarded(&p.weight, pad);
        let affine = p.weight.is_some();
        let mut gw = affine.then(|| Padded::<P>::output(c, pad));
        let mut gb = affine.then(|| Padded::<P>::output(c, pad));
        let rm = Padded::new(&p.running_mean, pad);
        let rv = Padded::new(&p.running_var, pad);
        let (sm, si) = match saved {
            Some((m, i)) => (Padded::new(m, pad), Padded::new(i, pad)),
            None => (Padded::new(&[], pad), Padded::new(&[], pad)),
        };
        let stats = match saved {
            Some(_) => backend::BackwardStats::Batch {
                save_mean: sm.payload(),
                save_invstd: si.payload(),
            },
            None => backend::BackwardStats::Running {
                mean: rm.payload(),
                var: rv.payload(),
                eps: p.eps,
            },
        };
        let args = backend::Backward::<Emu, T, P> {
            grad_output: dy.payload(),
            input: x.payload(),
            shape: p.shape,
            weight: w.as_ref().map(Padded::payload),
            stats,
        };
        let grads = Grads {
            input: dx.payload_mut(),
            weight: gw.as_mut().map(Padded::payload_mut),
            bias: gb.as_mut().map(Padded::payload_mut),
        };
        self.emu
            .batch_norm_backward(args, grads, &mut EmuWorkspace::default())
            .map_err(|e| e.to_string())?;
        Ok(GradOut {
            dx: dx.checked("grad_input")?,
            dweight: gw.map(|g| g.checked("grad_weight")).transpose()?,
            dbias: gb.map(|g| g.checked("grad_bias")).transpose()?,
        })
    }
}

fn check_pair(pair: (DType, DType), runner: &EmuRunner) {
    check_cases("the case table", runner, CASES, &[pair], 0);
}

fn split_runner() -> EmuRunner {
    EmuRunner::new(Emu::new(SMALL, SPLIT))
}

#[test]
fn kernels_f32() {
    check_pair(TYPE_PAIRS[0], &split_runner());
}

#[test]
fn kernels_f64() {
    check_pair(TYPE_PAIRS[1], &split_runner());
}

#[test]
fn kernels_f16() {
    check_pair(TYPE_PAIRS[2], &split_runner());
}

#[test]
fn kernels_bf16() {
    check_pair(TYPE_PAIRS[3], &split_runner());
}

#[test]
fn kernels_f16_with_f32_parameters() {
    check_pair(TYPE_PAIRS[4], &split_runner());
}

#[test]
fn kernels_bf16_with_f32_parameters() {
    check_pair(TYPE_PAIRS[5], &split_runner());
}

/// Shapes every family takes in both layouts and every dtype (planes and channel counts
/// of a multiple of 8), with several splits per channel under SPLIT.
const ALIGNED_CASES: &[Case] = &[
    Case {
        dims: &[4, 16, 8, 8],
        data: Data::Normal,
        affine: true,
    },
    Case {
        dims: &[3, 24, 32],
        data: Data::Offset1e4,
        affine: true,
    },
    Case {
        dims: &[2, 8, 4, 4, 6],
        data: Data::Normal,
        affine: false,
    },
];

/// Whether `variant` (forced) takes `dims` in `format` for `pair`.
fn takes(variant: Variant, pair: (DType, DType), dims: &[usize], format: MemoryFormat) -> bool {
    let shape = Shape::new(dims, format).unwrap();
    let forced = Tuning {
        variant: Some(variant),
        ..SPLIT
    };
    let op = raw::Op::Forward { batch_stats: true };
    let launcher = Emu::new(SMALL, SPLIT).launcher();
    raw::plan_op(op, &shape, pair, Alignment::ALIGNED, &launcher, &forced).is_ok()
}

/// Runs every case of `cases` and the table that a forced family takes, on every pair,
/// and returns how many (case, format) runs there were per pair.
fn check_family(label: &str, tuning: Tuning, cases: &[Case], seed: u64) -> usize {
    let variant = tuning.variant.expect("a forced family");
    let runner = EmuRunner::new(Emu::new(SMALL, tuning));
    let mut failures = Vec::new();
    let mut runs = 0;
    for &pair in TYPE_PAIRS {
        runs = 0;
        for (i, case) in cases.iter().enumerate() {
            for format in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
                if !takes(variant, pair, case.dims, format) {
                    continue;
                }
                runs += 1;
                let r = with_types!(pair, |T, P| check_problem(
                    &runner,
                    &Problem::<T, P>::new(case, format, seed + i as u64)
                ));
                if let Err(e) = r {
                    failures.push(format!("{pair:?} {:?} {}: {e}", case.dims, format.name()));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{label}:\n{}", failures.join("\n"));
    runs
}

/// The ilp family forced, on every dtype pair and both layouts, with every case it takes
/// (planes of a multiple of the vector width, C a multiple of it), several splits per
/// channel, and in 64-bit index arithmetic.
#[test]
fn ilp_family_on_every_pair() {
    let cases: Vec<Case> = ALIGNED_CASES.iter().chain(CASES).copied().collect();
    let tuning = Tuning {
        variant: Some(Variant::Ilp),
        ..SPLIT
    };
    let runs = check_family("ilp", tuning, &cases, 11);
    assert!(runs >= 2 * ALIGNED_CASES.len(), "{runs} runs");
    let wide = Tuning {
        force_index64: true,
        ..tuning
    };
    check_family("ilp, 64-bit indices", wide, ALIGNED_CASES, 17);
}

/// The flat family forced, on every dtype pair and both layouts, with every case of the
/// table (it takes any plane, channel count and alignment), several splits per channel,
/// in 64-bit index arithmetic, and on views off 16-byte alignment.
#[test]
fn flat_family_on_every_pair() {
    let tuning = Tuning {
        variant: Some(Variant::Flat),
        ..SPLIT
    };
    let runs = check_family("flat", tuning, CASES, 31);
    assert_eq!(runs, 2 * CASES.len());
    let wide = Tuning {
        force_index64: true,
        ..tuning
    };
    check_family("flat, 64-bit indices", wide, &CASES[..3], 37);
    let runner = EmuRunner {
        emu: Emu::new(SMALL, tuning),
        pad: 9,
        skew: 1,
    };
    check_cases(
        "flat, misaligned",
        &runner,
        &[CASES[0], CASES[9]],
        TYPE_PAIRS,
        41,
    );
}

/// A device with room for every block of the persistent family's grids on the shapes
/// below (16 SMs x 4 resident blocks).
const ROOMY: DeviceInfo = DeviceInfo {
    sm_count: 16,
    ..SMALL
};

/// The persistent family forced (one cooperative launch per training forward and
/// backward; the eval calls it does not fuse fall to the predictions), on every dtype
/// pair, with one and several splits per channel, in 64-bit index arithmetic, and the
/// refusal of a tensor whose slabs do not fit.
#[test]
fn persistent_family_on_every_pair() {
    let tuning = Tuning {
        variant: Some(Variant::Persistent),
        ..SPLIT
    };
    let runner = EmuRunner::new(Emu::new(ROOMY, tuning));
    let mut failures = Vec::new();
    // nchw: [4, 16, 8, 8] one split, [2, 4, 64, 64] several (2048 f32 vectors a
    // channel). nhwc (the rank-4 ones channels-last too): [2, 4, 64, 64] a tile of 4
    // channels (f32: one thread a row; not 16-bit types, whose vectors are 8 channels),
    // [32, 512] several tiles of several splits, [64, 24] one with idle
    // threads in its tile, [100, 64] splits of uneven rows (rows of threads idle in some).
    let cases = [
        ALIGNED_CASES[0],
        Case {
            dims: &[2, 4, 64, 64],
            data: Data::Normal,
            affine: true,
        },
        Case {
            dims: &[3, 8, 16, 32],
            data: Data::Offset1e4,
            affine: false,
        },
        Case {
            dims: &[32, 512],
            data: Data::Normal,
            affine: true,
        },
        Case {
            dims: &[64, 24],
            data: Data::Offset1e4,
            affine: true,
        },
        Case {
            dims: &[100, 64],
            data: Data::Normal,
            affine: false,
        },
    ];
    for &pair in TYPE_PAIRS {
        for (i, case) in cases.iter().enumerate() {
            let r = with_types!(pair, |T, P| check_persistent::<T, P>(
                &runner,
                case,
                43 + i as u64
            ));
            if let Err(e) = r {
                failures.push(format!("{pair:?} {:?}: {e}", case.dims));
            }
        }
    }
    assert!(failures.is_empty(), "persistent:\n{}", failures.join("\n"));
    let launcher = Emu::new(ROOMY, tuning).launcher();
    let big = Shape::new(&[2, 80, 64, 64], MemoryFormat::Contiguous).unwrap();
    let op = raw::Op::Forward { batch_stats: true };
    let err = raw::plan_op(
        op,
        &big,
        (DType::F32, DType::F32),
        Alignment::ALIGNED,
        &launcher,
        &tuning,
    )
    .unwrap_err();
    assert!(err.to_string().contains("do not fit on chip"), "{err}");
    let plan = raw::plan_op(
        op,
        &Shape::new(&[2, 4, 64, 64], MemoryFormat::Contiguous).unwrap(),
        (DType::F32, DType::F32),
        Alignment::ALIGNED,
        &launcher,
        &tuning,
    )
    .unwrap();
    assert_eq!(plan.launches.len(), 1);
    assert!(plan.launches[0].plan.config.cooperative);
    assert!(
        plan.launches[0].plan.splits > 1,
        "{:?}",
        plan.launches[0].plan
    );
    // The nhwc cases' plans in f32 are what the comment above says: several tiles of
    // several splits, and splits of uneven rows.
    let nhwc_plan = |dims: &[usize]| {
        let shape = Shape::new(dims, MemoryFormat::Contiguous).unwrap();
        let pair = (DType::F32, DType::F32);
        let plan = raw::plan_op(op, &shape, pair, Alignment::ALIGNED, &launcher, &tuning);
        plan.unwrap().launches[0].plan
    };
    let tiles = nhwc_plan(&[32, 512]);
    assert!(tiles.tiles > 1 && tiles.splits > 1, "{tiles:?}");
    let uneven = nhwc_plan(&[100, 64]);
    assert!(uneven.splits > 1 && 100 % uneven.chunk != 0, "{uneven:?}");
}

/// The persistent family's slabs past its registers: one multiprocessor holding 2 blocks
/// (an H100 running these register-bound kernels, 2 a multiprocessor up to 96 KB of
/// shared memory each), so that the planner needs 2, 3 and 4 steps (1, 2 and 3 of them
/// in shared memory, opted in past 48 KiB), a partial last step, planes that wrap, and
/// one split per channel; every pair, the same bytes per channel for each.
#[test]
fn persistent_family_keeps_its_slabs_in_shared_memory() {
    let tuning = Tuning {
        variant: Some(Variant::Persistent),
        ..SPLIT
    };
    let one_sm = DeviceInfo {
        sm_count: 1,
        ..SMALL
    };
    let emu = Emu {
        resident: 2,
        ..Emu::new(one_sm, tuning)
    };
    let runner = EmuRunner::new(emu);
    // Dims for 4-byte values (the last size scales with 4 / sizeof(T)), then per stage
    // (forward, backward) the steps planned (dynamic shared memory, splits), or None where
    // the slabs do not fit (the backward keeps half the vectors of x a step, beside dy's).
    // Channels-last: 32 channels, a tile of 32 / V threads across them by 8 V rows (the
    // same bytes a step as in nchw), so the same steps for the same bytes a channel; no
    // more than 64 KB of dynamic shared memory in the backward, where the 16-bit kernels'
    // 18 KB of static shared memory would leave room for one block.
    type Steps = Option<(u32, u32)>;
    let nchw = MemoryFormat::Contiguous;
    let nhwc = MemoryFormat::ChannelsLast;
    let cases: [(&[usize], MemoryFormat, Steps, Steps); 7] = [
        (
            &[2, 1, 64, 256],
            nchw,
            Some((32 << 10, 2)),
            Some((96 << 10, 2)),
        ),
        // 6000 vectors: chunks of 3000, the last step of each partial in both stages
        (
            &[3, 1, 100, 80],
            nchw,
            Some((32 << 10, 2)),
            Some((64 << 10, 2)),
        ),
        (&[3, 1, 100, 160], nchw, Some((64 << 10, 2)), None),
        (&[4, 1, 64, 256], nchw, Some((96 << 10, 2)), None),
        (
            &[1, 2, 64, 256],
            nchw,
            Some((32 << 10, 1)),
            Some((96 << 10, 1)),
        ),
        (
            &[3, 32, 16, 16],
            nhwc,
            Some((32 << 10, 2)),
            Some((64 << 10, 2)),
        ),
        // 700 rows of f32: splits of 350, the last step of each partial in both stages
        (
            &[7, 32, 10, 10],
            nhwc,
            Some((32 << 10, 2)),
            Some((64 << 10, 2)),
        ),
    ];
    let mut failures = Vec::new();
    for &pair in TYPE_PAIRS {
        for (i, &(dims4, format, fwd, bwd)) in cases.iter().enumerate() {
            let size = pair.0.size();
            let mut dims = dims4.to_vec();
            let last = dims.len() - 1;
            dims[last] = dims[last] * 4 / size;
            let shape = Shape::new(&dims, format).unwrap();
            let stages = [
                (raw::Op::Forward { batch_stats: true }, fwd),
                (
                    raw::Op::Backward {
                        batch: true,
                        reduce: true,
                    },
                    bwd,
                ),
            ];
            for (op, want) in stages {
                let plan = raw::plan_op(
                    op,
                    &shape,
                    pair,
                    Alignment::ALIGNED,
                    &emu.launcher(),
                    &tuning,
                );
                let got = plan.as_ref().ok().map(|plan| {
                    let p = &plan.launches[0].plan;
                    assert!(p.config.cooperative);
                    (p.config.shared_bytes, p.splits)
                });
                if got != want {
                    failures.push(format!(
                        "{pair:?} {dims:?} {} {op:?}: planned {got:?}, not {want:?}",
                        format.name()
                    ));
                }
            }
            // Leaked: Case holds static sizes (a few per run).
            let case = Case {
                dims: Vec::leak(dims.clone()),
                data: if i == 1 {
                    Data::Offset1e4
                } else {
                    Data::Normal
                },
                affine: i != 3,
            };
            let runner = PersistentOrPredicted(&runner, bwd.is_some());
            let pr = with_types!(pair, |T, P| {
                check_problem(&runner, &Problem::<T, P>::new(&case, format, 47 + i as u64))
            });
            if let Err(e) = pr {
                failures.push(format!("{pair:?} {dims:?} {}: {e}", format.name()));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Without the opt-in (48 KiB with the static shared memory), two steps at most in
    // nchw: the 4-step slabs do not fit.
    struct NoOptIn(EmuLauncher);
    impl Launcher for NoOptIn {
        fn device(&self) -> &DeviceInfo {
            self.0.device()
        }
        fn resident_blocks(&self, k: &KernelId, threads: u32, shared: u32) -> Result<u32> {
            self.0.resident_blocks(k, threads, shared)
        }
        fn launch(&self, k: KernelId, c: &LaunchConfig, p: &BnParams, r: &[Region]) -> Result<()> {
            self.0.launch(k, c, p, r)
        }
    }
    let shape = Shape::new(&[4, 1, 64, 256], MemoryFormat::Contiguous).unwrap();
    let op = raw::Op::Forward { batch_stats: true };
    let pair = (DType::F32, DType::F32);
    let err = raw::plan_op(
        op,
        &shape,
        pair,
        Alignment::ALIGNED,
        &NoOptIn(emu.launcher()),
        &tuning,
    )
    .unwrap_err();
    assert!(err.to_string().contains("of 2 steps"), "{err}");
    // Channels-last 16-bit: 27 KB of static shared memory leave no room for a step in
    // shared memory without the opt-in (the 2-step slabs do not fit).
    let shape = Shape::new(&[3, 32, 16, 32], MemoryFormat::ChannelsLast).unwrap();
    let pair = (DType::F16, DType::F32);
    let err = raw::plan_op(
        op,
        &shape,
        pair,
        Alignment::ALIGNED,
        &NoOptIn(emu.launcher()),
        &tuning,
    )
    .unwrap_err();
    assert!(err.to_string().contains("of 1 steps"), "{err}");
}

/// The training forward and backward of one problem, as check_problem checks them (the
/// eval calls are another family's), in both index widths and, for shapes of rank 4 or
/// more, in both memory formats (nchw and nhwc kernels); a rank-2 shape is nhwc already.
fn check_persistent<T: Float, P: ParamFor<T>>(
    runner: &EmuRunner,
    case: &Case,
    seed: u64,
) -> Result<(), String> {
    let formats: &[MemoryFormat] = if case.dims.len() >= 4 {
        &[MemoryFormat::Contiguous, MemoryFormat::ChannelsLast]
    } else {
        &[MemoryFormat::Contiguous]
    };
    let mut checked = 0;
    for &format in formats {
        let shape = Shape::new(case.dims, format).unwrap();
        if launch::persistent_takes(Stage::FwdFused, &shape, T::DTYPE, Alignment::ALIGNED).is_err()
        {
            continue;
        }
        checked += 1;
        for index64 in [false, true] {
            let runner = EmuRunner {
                emu: Emu {
                    tuning: Tuning {
                        force_index64: index64,
                        ..runner.emu.tuning
                    },
                    ..runner.emu
                },
                ..*runner
            };
            let p = Problem::<T, P>::new(case, format, seed);
            check_problem(&PersistentOrPredicted(&runner, true), &p)
                .map_err(|e| format!("{} index64 {index64}: {e}", format.name()))?;
        }
    }
    if checked == 0 {
        return Err(format!(
            "the persistent kernels take {:?} in no format",
            case.dims
        ));
    }
    Ok(())
}

/// Runs the training calls with the runner's forced family (the backward only when the
/// flag says so) and the others with the predictions (the persistent family does not
/// take them).
struct PersistentOrPredicted<'a>(&'a EmuRunner, bool);

impl Runner for PersistentOrPredicted<'_> {
    fn train_forward<T: Float, P: ParamFor<T>>(
        &self,
        p: &Problem<T, P>,
    ) -> Result<TrainOut<T, P, T::Acc>, String> {
        self.0.train_forward(p)
    }
    fn eval_forward<T: Float, P: ParamFor<T>>(&self, p: &Problem<T, P>) -> Result<Vec<T>, String> {
        self.predicted().eval_forward(p)
    }
    fn backward<T: Float, P: ParamFor<T>>(
        &self,
        p: &Problem<T, P>,
        saved: common::Saved<'_, T::Acc>,
    ) -> Result<GradOut<T, P>, String> {
        match saved {
            Some(_) if self.1 => self.0.backward(p, saved),
            _ => self.predicted().backward(p, saved),
        }
    }
}

impl PersistentOrPredicted<'_> {
    fn predicted(&self) -> EmuRunner {
        EmuRunner {
            emu: Emu {
                tuning: Tuning {
                    variant: None,
                    ..self.0.emu.tuning
                },
                ..self.0.emu
            },
            ..*self.0
        }
    }
}

/// A forced family that cannot take a call says why, as a typed error.
#[test]
fn a_forced_family_explains_what_it_cannot_take() {
    let shape = Shape::new(&[4, 3, 5, 7], MemoryFormat::Contiguous).unwrap();
    let forced = Tuning {
        variant: Some(Variant::Ilp),
        ..SPLIT
    };
    let op = raw::Op::Forward { batch_stats: true };
    let launcher = Emu::new(SMALL, SPLIT).launcher();
    let err = raw::plan_op(
        op,
        &shape,
        (DType::F32, DType::F32),
        Alignment::ALIGNED,
        &launcher,
        &forced,
    )
    .unwrap_err();
    assert!(
        matches!(err, BnError::VariantUnavailable { variant: "ilp", .. }),
        "{err}"
    );
    assert!(err.to_string().contains("multiple of 4"), "{err}");
    // unforced, the same call falls to the family that takes any plane
    let plan = raw::plan_op(
        op,
        &shape,
        (DType::F32, DType::F32),
        Alignment::ALIGNED,
        &launcher,
        &SPLIT,
    )
    .unwrap();
    assert_eq!(plan.variant, Variant::Flat);
}

/// A tuning table steers the planner: its winner is planned when it can take the call
/// (and the results stay right), and a winner that cannot falls back to the predictions.
#[test]
fn a_tuning_table_picks_the_family() {
    use cuda_batchnorm::launch::{bytes_bucket, Layout, TunedOp, TuningEntry, TuningTable};
    const DIMS: &[usize] = &[4, 16, 8, 8];
    let dims = DIMS;
    let shape = Shape::new(dims, MemoryFormat::Contiguous).unwrap();
    let odd = Shape::new(&[4, 3, 5, 7], MemoryFormat::Contiguous).unwrap();
    let entry = |op, shape: &Shape, variant| TuningEntry {
        op,
        layout: Layout::Nchw,
        input: DType::F32,
        bytes_log2: bytes_bucket(shape.numel(), DType::F32),
        variant,
    };
    let table = TuningTable::leak(
        "emulated".into(),
        (9, 0),
        vec![
            entry(TunedOp::TrainForward, &shape, Variant::Baseline),
            entry(TunedOp::TrainBackward, &odd, Variant::Ilp),
        ],
    );
    let tuning = Tuning {
        table: Some(table),
        ..SPLIT
    };
    let launcher = Emu::new(SMALL, tuning).launcher();
    let plan = |op, shape: &Shape| {
        raw::plan_op(
            op,
            shape,
            (DType::F32, DType::F32),
            Alignment::ALIGNED,
            &launcher,
            &tuning,
        )
        .unwrap()
        .variant
    };
    let train = raw::Op::Forward { batch_stats: true };
    let back = raw::Op::Backward {
        batch: true,
        reduce: true,
    };
    // without the table the planner picks the one-launch family for this shape
    let untuned = raw::plan_op(
        train,
        &shape,
        (DType::F32, DType::F32),
        Alignment::ALIGNED,
        &launcher,
        &SPLIT,
    )
    .unwrap();
    assert_eq!(untuned.variant, Variant::Persistent);
    assert_eq!(plan(train, &shape), Variant::Baseline);
    // ilp cannot take planes of 35 values: the predictions decide
    assert_eq!(plan(back, &odd), Variant::Flat);
    // the backward's one entry is the nearest bucket for this shape too, and its winner
    // takes it
    assert_eq!(plan(back, &shape), Variant::Ilp);
    // ops the table has no entry for follow the predictions
    let eval = raw::Op::Forward { batch_stats: false };
    assert_eq!(plan(eval, &shape), Variant::Ilp);
    let runner = EmuRunner::new(Emu::new(SMALL, tuning));
    let case = Case {
        dims: DIMS,
        data: Data::Normal,
        affine: true,
    };
    check_cases("tuned", &runner, &[case], &[(DType::F32, DType::F32)], 23);
}

/// The baseline forced where the planner would pick another family.
#[test]
fn baseline_family_forced() {
    let tuning = Tuning {
        variant: Some(Variant::Baseline),
        ..SPLIT
    };
    let runner = EmuRunner::new(Emu::new(SMALL, tuning));
    let cases = [CASES[9], CASES[10], CASES[11]];
    check_cases("baseline forced", &runner, &cases, TYPE_PAIRS, 13);
}

/// A few cases on the launch plans an H100 gets (132 SMs, default tuning).
#[test]
fn gpu_launch_plans() {
    let runner = EmuRunner::new(Emu::new(DeviceInfo::H100, Tuning::default()));
    let normal = |dims| Case {
        dims,
        data: Data::Normal,
        affine: true,
    };
    let cases = [
        normal(&[2, 64, 28, 28][..]),
        normal(&[16, 2, 24, 24, 8]),
        normal(&[3000, 24]),
        normal(&[20, 6, 4096]),
    ];
    check_cases(
        "H100 plans",
        &runner,
        &cases,
        &[TYPE_PAIRS[0], TYPE_PAIRS[4]],
        5,
    );
}

/// 64-bit index arithmetic and the scalar path, on every layout and a few dtypes, in the
/// planner's families and in the baseline (whose runtime flags these are).
#[test]
fn index64_and_scalar_variants() {
    let cases = [CASES[0], CASES[3], CASES[6], CASES[9]];
    for tuning in [None, Some(Variant::Baseline)]
        .into_iter()
        .flat_map(|variant| {
            [
                Tuning {
                    force_index64: true,
                    variant,
                    ..SPLIT
                },
                Tuning {
                    force_scalar: true,
                    variant,
                    ..SPLIT
                },
            ]
        })
    {
        let runner = EmuRunner::new(Emu::new(SMALL, tuning));
        check_cases(&format!("{tuning:?}"), &runner, &cases, TYPE_PAIRS, 9);
    }
}

/// Views at offsets that break 16-byte alignment: all shifted alike (nchw keeps its
/// vectors after a scalar head) and shifted differently (scalar path).
#[test]
fn misaligned_views() {
    let cases = [CASES[0], CASES[9], CASES[10], CASES[6]];
    let baseline = Tuning {
        variant: Some(Variant::Baseline),
        ..SPLIT
    };
    for (pad, skew, tuning) in [(9, 0), (8, 1), (9, 2)]
        .into_iter()
        .flat_map(|(p, k)| [(p, k, SPLIT), (p, k, baseline)])
    {
        let runner = EmuRunner {
            emu: Emu::new(SMALL, tuning),
            pad,
            skew,
        };
        check_cases(
            &format!("pad {pad} skew {skew} {:?}", tuning.variant),
            &runner,
            &cases,
            TYPE_PAIRS,
            3,
        );
    }
}

/// Different block interleavings (seeds) and residencies give correct results: the
/// last-block protocol does not depend on which block finishes last.
#[test]
fn interleavings() {
    for seed in 1..=6 {
        for resident in [1, 2, 3, 8] {
            let emu = Emu {
                seed,
                resident,
                ..Emu::new(SMALL, SPLIT)
            };
            let runner = EmuRunner::new(emu);
            for format in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
                check_problem(&runner, &Problem::<f32, f32>::new(&CASES[11], format, seed))
                    .unwrap_or_else(|e| {
                        panic!("seed {seed} resident {resident} {}: {e}", format.name())
                    });
            }
        }
    }
}

/// Interleavings that also switch threads at plain global loads and stores (the
/// emulator's preemption mode), on a representative subset: multi-block splits in both
/// layouts, vector and scalar paths, several blocks resident. Races between plain
/// accesses with no barrier, atomic or fence between them can show only here (a lead
/// thread re-reading the arrival counter after its atomic, say).
#[test]
fn preemption_at_global_accesses() {
    let cases = [&CASES[0], &CASES[3], &CASES[6], &CASES[11]];
    for seed in 1..=3 {
        for resident in [2, 8] {
            let emu = Emu {
                seed,
                resident,
                preempt: 3,
                ..Emu::new(SMALL, SPLIT)
            };
            let runner = EmuRunner::new(emu);
            for &pair in &[TYPE_PAIRS[0], TYPE_PAIRS[4]] {
                for (i, case) in cases.iter().enumerate() {
                    for format in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
                        with_types!(pair, |T, P| check_problem(
                            &runner,
                            &Problem::<T, P>::new(case, format, seed + i as u64)
                        ))
                        .unwrap_or_else(|e| {
                            panic!(
                                "seed {seed} resident {resident} {pair:?} {:?} {}: {e}",
                                case.dims,
                                format.name()
                            )
                        });
                    }
                }
            }
        }
    }
}

/// One workspace across calls of different shapes and ops: the kernels leave the
/// counters zero (the emulator fails a launch that finds them otherwise).
#[test]
fn workspace_is_reusable() {
    let emu = Emu::new(SMALL, SPLIT);
    let mut ws = EmuWorkspace::default();
    for (i, case) in CASES.iter().take(8).enumerate() {
        let p = Problem::<f32, f32>::new(case, MemoryFormat::Contiguous, i as u64);
        let mut y = vec![0.0f32; p.shape.numel()];
        let (mut rm, mut rv) = (p.running_mean.clone(), p.running_var.clone());
        let (mut sm, mut si) = (vec![0.0f32; p.shape.c()], vec![0.0f32; p.shape.c()]);
        let args = Forward::<Emu, f32, f32> {
            input: &p.x,
            shape: p.shape,
            running_mean: Some(&mut rm),
            running_var: Some(&mut rv),
            weight: p.weight.as_deref(),
            bias: p.bias.as_deref(),
            training: true,
            momentum: 0.1,
            eps: 1e-5,
        };
        emu.batch_norm(
            args,
            &mut y,
            Some(SaveStats {
                mean: &mut sm[..],
                invstd: &mut si[..],
            }),
            &mut ws,
        )
        .unwrap();
        let mut dx = vec![0.0f32; p.shape.numel()];
        let args = backend::Backward::<Emu, f32, f32> {
            grad_output: &p.dy,
            input: &p.x,
            shape: p.shape,
            weight: None,
            stats: backend::BackwardStats::Batch {
                save_mean: &sm,
                save_invstd: &si,
            },
        };
        emu.batch_norm_backward(
            args,
            Grads {
                input: &mut dx[..],
                weight: None,
                bias: None,
            },
            &mut ws,
        )
        .unwrap();
    }
    assert!(ws.1.iter().any(|&w| w != 0), "the scratch was used");
    assert!(
        !ws.0.is_empty() && ws.0.iter().all(|&c| c == 0),
        "the counters were used and left zero"
    );
}

/// PyTorch's fixtures through the modules over the emulated kernels.
#[test]
fn fixtures_on_emulated_kernels() {
    let mut failures = Vec::new();
    for tuning in [SPLIT, Tuning::default()] {
        for case in fixtures::all() {
            let emu = Emu::new(SMALL, tuning);
            let r = with_types!(
                (case.dtype, case.param),
                |T, P| fixtures::replay::<Emu, T, P>(emu, &case)
            );
            if let Err(e) = r {
                failures.push(e);
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// PyTorch checks that eval on an NCHW input and on its NHWC copy agree bit for bit.
#[test]
fn eval_is_bitwise_equal_across_formats() {
    let runner = split_runner();
    common::check_eval_bitwise_across_formats::<_, f32, f32>(&runner, &CASES[10]).unwrap();
    common::check_eval_bitwise_across_formats::<_, f16, f16>(&runner, &CASES[10]).unwrap();
    common::check_eval_bitwise_across_formats::<_, f16, f32>(&runner, &CASES[10]).unwrap();
}

/// Infinities and NaN in training channels and in the running mean, every type pair
/// and layout, with splits across blocks (PyTorch's answers, see check_non_finite).
#[test]
fn non_finite_values() {
    let runner = split_runner();
    let mut failures = Vec::new();
    for &pair in TYPE_PAIRS {
        for format in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
            let r = with_types!(pair, |T, P| common::check_non_finite::<_, T, P>(
                &runner, format
            ));
            if let Err(e) = r {
                failures.push(format!("{pair:?} {}: {e}", format.name()));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// eps below f32's range or subnormal in it, every type pair and layout.
#[test]
fn tiny_eps() {
    let runner = split_runner();
    let mut failures = Vec::new();
    for &pair in TYPE_PAIRS {
        for format in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
            let r = with_types!(pair, |T, P| common::check_tiny_eps::<_, T, P>(
                &runner, format
            ));
            if let Err(e) = r {
                failures.push(format!("{pair:?} {}: {e}", format.name()));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Values whose f16 sum of squares overflows normalise without inf or NaN and agree with
/// the f32 computation; the backward with f32 parameters stays finite too.
#[test]
fn half_overflow() {
    let case = common::Case {
        dims: &[4, 8, 50, 50],
        data: common::Data::Large,
        affine: true,
    };
    for format in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
        common::check_half_overflow(&split_runner(), &case, format).unwrap();
    }
}

/// The same check at full size: (4, 80, 500, 500) f16 with the H100 plan, as PyTorch's
/// test. Minutes on the emulator: `cargo test --release --test emulated -- --ignored`.
#[test]
#[ignore = "minutes on the emulator; run with --ignored"]
fn huge_half_overflow() {
    let case = common::Case {
        dims: &[4, 80, 500, 500],
        data: common::Data::Large,
        affine: true,
    };
    let runner = EmuRunner::new(Emu::new(DeviceInfo::H100, Tuning::default()));
    for format in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
        common::check_half_overflow(&runner, &case, format).unwrap();
    }
}

/// The emulated kernels as a [`common::huge::Device`]: host slices are the buffers, so
/// nothing is copied.
impl common::huge::Device for Emu {
    fn forward(
        &self,
        shape: &Shape,
        x: &[f16],
        weight: &[f32],
        bias: &[f32],
        samples: &[usize],
    ) -> Result<common::huge::Forwarded, String> {
        let c = shape.c();
        let mut y = vec![f16::ZERO; shape.numel()];
        let (mut rm, mut rv) = (vec![0.0f32; c], vec![1.0f32; c]);
        let (mut sm, mut si) = (vec![0.0f32; c], vec![0.0f32; c]);
        let args = Forward::<Emu, f16, f32> {
            input: x,
            shape: *shape,
            running_mean: Some(&mut rm),
            running_var: Some(&mut rv),
            weight: Some(weight),
            bias: Some(bias),
            training: true,
            momentum: common::huge::MOMENTUM,
            eps: common::huge::EPS,
        };
        let save = SaveStats {
            mean: &mut sm[..],
            invstd: &mut si[..],
        };
        self.batch_norm(args, &mut y, Some(save), &mut EmuWorkspace::default())
            .map_err(|e| e.to_string())?;
        Ok(common::huge::Forwarded {
            save_mean: sm,
            save_invstd: si,
            running_mean: rm,
            running_var: rv,
            y: samples.iter().map(|&i| y[i]).collect(),
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
        let c = shape.c();
        let mut dx = vec![f16::ZERO; shape.numel()];
        let (mut gw, mut gb) = (vec![0.0f32; c], vec![0.0f32; c]);
        let args = backend::Backward::<Emu, f16, f32> {
            grad_output: dy,
            input: x,
            shape: *shape,
            weight: Some(weight),
            stats: backend::BackwardStats::Batch {
                save_mean,
                save_invstd,
            },
        };
        let grads = Grads {
            input: &mut dx[..],
            weight: Some(&mut gw[..]),
            bias: Some(&mut gb[..]),
        };
        self.batch_norm_backward(args, grads, &mut EmuWorkspace::default())
            .map_err(|e| e.to_string())?;
        Ok(common::huge::Backwarded {
            grad_weight: gw,
            grad_bias: gb,
            dx: samples.iter().map(|&i| dx[i]).collect(),
        })
    }
}

/// The checks of the 2^31-element test on a small tensor, with 64-bit indexing forced:
/// keeps the shared check itself exercised in every `cargo test`.
#[test]
fn more_than_2_pow_31_check_on_a_small_tensor() {
    let emu = Emu::new(
        SMALL,
        Tuning {
            force_index64: true,
            ..SPLIT
        },
    );
    let families = streaming_families(emu);
    for format in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
        // planes of 16 x 4099 / 8 values, which only the planner's choice takes, then
        // 64 x 1031 / 8, a multiple of the vector width
        common::huge::check_each(&huge_devices(&families[..1]), format, 16 * 4099).unwrap();
        common::huge::check_each(&huge_devices(&families), format, 64 * 1031).unwrap();
    }
}

/// `emu` as planned (auto) and with each streaming family forced: the families the
/// full-size check runs (the persistent one cannot hold its tensor on chip).
fn streaming_families(emu: Emu) -> Vec<(&'static str, Emu)> {
    let forced = |v| Emu {
        tuning: Tuning {
            variant: Some(v),
            ..emu.tuning
        },
        ..emu
    };
    vec![
        ("auto", emu),
        ("baseline", forced(Variant::Baseline)),
        ("ilp", forced(Variant::Ilp)),
        ("flat", forced(Variant::Flat)),
    ]
}

fn huge_devices<'a>(
    families: &'a [(&'static str, Emu)],
) -> Vec<(&'static str, &'a dyn common::huge::Device)> {
    families
        .iter()
        .map(|(n, e)| (*n, e as &dyn common::huge::Device))
        .collect()
}

/// A tensor of 2^31 + 2^20 f16 elements, both layouts, with the H100 plan: the kernels
/// pick 64-bit index arithmetic by themselves; the planner's choice and each streaming
/// family forced. Needs about 13 GB of memory and many minutes:
/// `cargo test --release --test emulated -- --ignored`.
#[test]
#[ignore = "13 GB and minutes on the emulator; run with --ignored"]
fn huge_more_than_2_pow_31_elements() {
    let emu = Emu::new(DeviceInfo::H100, Tuning::default());
    for format in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
        let plan = cuda_batchnorm::launch::plan_stage(
            cuda_batchnorm::launch::Stage::FwdStats,
            &common::huge::shape(format, common::huge::FULL),
            DType::F16,
            cuda_batchnorm::launch::Alignment::ALIGNED,
            &DeviceInfo::H100,
            &Tuning::default(),
        )
        .unwrap();
        assert!(plan.index64, "{format:?}: the plan keeps 32-bit indices");
        let t = std::time::Instant::now();
        let families = streaming_families(emu);
        common::huge::check_each(&huge_devices(&families), format, common::huge::FULL).unwrap();
        eprintln!(
            "{format:?}: forward and backward checked in {:.0?}",
            t.elapsed()
        );
    }
}

/// The Rust and C++ definitions of BnParams agree field for field.
#[test]
fn params_abi_matches_the_kernels() {
    let p = BnParams {
        x: 1,
        y: 0, // set below
        dy: 3,
        dx: 4,
        weight: 5,
        bias: 6,
        running_mean: 7,
        running_var: 8,
        save_mean: 9,
        save_invstd: 10,
        grad_weight: 11,
        grad_bias: 12,
        ws_counters: 13,
        ws_partials: 14,
        ws_channel: 15,
        z: 27,
        dz: 28,
        n: 16,
        c: 17,
        s: 18,
        chunk: 19,
        eps: 1.5,
        momentum: 2.5,
        bessel: 3.5,
        flags: 23,
        splits: 24,
        tile_x: 25,
        reserved: 26,
    };
    let mut out = vec![0u64; 28];
    let p = BnParams {
        y: out.as_mut_ptr() as u64,
        ..p
    };
    let region = emu::Region {
        addr: p.y,
        bytes: 28 * 8,
        name: "out",
        kind: emu::RegionKind::Output,
    };
    let cfg = emu::Launch {
        grid: [1, 1, 1],
        block: [32, 1, 1],
        dynamic_shared_bytes: 0,
        cooperative: false,
        shared_limit_bytes: 0,
    };
    // SAFETY: the one region is `out`, owned here and untouched during the launch; the
    // other addresses in `p` are in no region and the kernel does not dereference them.
    unsafe {
        emu::launch(
            "bn_selftest_params",
            &cfg,
            p.as_bytes(),
            &[region],
            &emu::Options::default(),
        )
    }
    .unwrap();
    let expect: Vec<u64> = [
        1, p.y, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 27, 28, 16, 17, 18, 19,
    ]
    .into_iter()
    .chain([1.5f64, 2.5, 3.5].map(f64::to_bits))
    .chain([23, 24, 25, 26])
    .collect();
    assert_eq!(out, expect);
}

/// Every entry point in kernels/*.cu runs in these tests: each (family, stage, layout,
/// dtype pair, index width) once here, compared with the emulator's list of compiled
/// kernels.
#[test]
fn every_kernel_runs() {
    let runner = EmuRunner::new(Emu::new(
        SMALL,
        Tuning {
            variant: Some(Variant::Baseline),
            ..SPLIT
        },
    ));
    for pair in TYPE_PAIRS {
        for format in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
            with_types!(*pair, |T, P| check_problem(
                &runner,
                &Problem::<T, P>::new(&CASES[0], format, 1)
            ))
            .unwrap();
        }
    }
    for index64 in [false, true] {
        let tuning = Tuning {
            variant: Some(Variant::Ilp),
            force_index64: index64,
            ..SPLIT
        };
        check_family("every ilp kernel", tuning, &ALIGNED_CASES[..1], 1);
    }
    let compiled: BTreeSet<String> = emu::kernel_names()
        .into_iter()
        .filter(|n| n.starts_with("bn_") && !n.starts_with("bn_selftest"))
        .collect();
    for index64 in [false, true] {
        let tuning = Tuning {
            variant: Some(Variant::Flat),
            force_index64: index64,
            ..SPLIT
        };
        check_family("every flat kernel", tuning, &ALIGNED_CASES[..1], 1);
    }
    let fused = Tuning {
        variant: Some(Variant::Persistent),
        ..SPLIT
    };
    for pair in TYPE_PAIRS {
        for index64 in [false, true] {
            let tuning = Tuning {
                force_index64: index64,
                ..fused
            };
            let runner = EmuRunner::new(Emu::new(ROOMY, tuning));
            with_types!(*pair, |T, P| check_persistent::<T, P>(
                &runner,
                &ALIGNED_CASES[0],
                1
            ))
            .unwrap();
        }
    }
    let emu = Emu::new(SMALL, SPLIT);
    for pair in TYPE_PAIRS {
        let full = Shape::new(&[3, 2, 5], MemoryFormat::Contiguous).unwrap();
        with_types!(*pair, |T, P| stats_stage_on::<T, P>(&emu, full, &[1, 2])).unwrap();
    }
    let mine = LAUNCHED.lock().unwrap().clone();
    // ilp and flat: 5 stages x 2 layouts x 6 pairs x 2 index widths each; persistent: 2
    // fused stages x 2 layouts x 6 pairs x 2 widths; the stats stage: 3 per-channel
    // kernels x 6 pairs
    let streaming = 5 * 2 * TYPE_PAIRS.len() * 2;
    let persistent = 2 * 2 * TYPE_PAIRS.len() * 2;
    let per_channel = 3 * TYPE_PAIRS.len();
    assert_eq!(
        compiled.len(),
        48 + 2 * streaming + persistent + per_channel,
        "{compiled:?}"
    );
    let missing: Vec<_> = compiled.difference(&mine).collect();
    assert!(missing.is_empty(), "kernels never launched: {missing:?}");
}

/// torchvision's frozen fixtures through the frozen modules over the emulated kernels,
/// under the default plan and with each family that has an eval forced.
#[test]
fn frozen_fixtures_on_emulated_kernels() {
    let mut failures = Vec::new();
    for variant in [
        None,
        Some(Variant::Baseline),
        Some(Variant::Ilp),
        Some(Variant::Flat),
    ] {
        let tuning = Tuning { variant, ..SPLIT };
        for case in fixtures::frozen() {
            let emu = Emu::new(SMALL, tuning);
            let r = with_types!((case.dtype, case.param), |T, P| {
                fixtures::replay_frozen::<Emu, T, P>(emu, &case)
            });
            match r {
                Err(e) if variant.is_some() && e.contains("cannot run this call") => {}
                Err(e) => failures.push(format!("{variant:?} {e}")),
                Ok(()) => {}
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The frozen forward and backward kernels of every input type and family, both
/// layouts, 16-byte aligned and not, with sentinels around every output: the CPU's
/// numbers, and NCHW and NHWC results equal bit for bit.
#[test]
fn frozen_kernels_on_every_type_and_layout() {
    let shapes: &[&[usize]] = &[
        &[4, 3, 5, 7],
        &[2, 5, 7, 7],
        &[8, 16, 2, 2],
        &[6, 5],
        &[2, 3, 2, 3, 4],
    ];
    let mut failures = Vec::new();
    let mut runs = 0;
    for variant in [
        None,
        Some(Variant::Baseline),
        Some(Variant::Ilp),
        Some(Variant::Flat),
    ] {
        let emu = Emu::new(SMALL, Tuning { variant, ..SPLIT });
        for dims in shapes {
            for pad in [8, 3] {
                for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
                    let r = match dtype {
                        DType::F32 => check_frozen::<f32>(emu, dims, pad),
                        DType::F64 => check_frozen::<f64>(emu, dims, pad),
                        DType::F16 => check_frozen::<f16>(emu, dims, pad),
                        _ => check_frozen::<cuda_batchnorm::half::bf16>(emu, dims, pad),
                    };
                    match r {
                        Ok(n) => runs += n,
                        Err(e) if variant.is_some() && e.contains("cannot run this call") => {}
                        Err(e) => {
                            failures.push(format!("{variant:?} {dims:?} pad {pad} {dtype}: {e}"))
                        }
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(runs >= 4 * shapes.len() * 2 * 4, "{runs} runs");
}

/// One shape in both layouts: forward and backward on the emulator against the CPU, and
/// the two layouts' results compared bit for bit. Returns the number of runs (2).
fn check_frozen<T: Float>(
    emu: Emu,
    dims: &[usize],
    pad: usize,
) -> std::result::Result<usize, String> {
    let e = |e: BnError| e.to_string();
    let c = dims[1];
    let mut rng = common::Rng::new(dims.iter().product::<usize>() as u64 + pad as u64);
    let coeffs: Vec<T::Acc> = (0..2 * c)
        .map(|_| T::Acc::from_f64(rng.normal() * 1.5))
        .collect();
    let contiguous = Shape::new(dims, MemoryFormat::Contiguous).map_err(e)?;
    let numel = contiguous.numel();
    let x: Vec<f64> = (0..numel).map(|_| rng.normal() * 3.0).collect();
    let dy: Vec<f64> = (0..numel).map(|_| rng.normal()).collect();
    let mut results: Vec<(Shape, Vec<T>, Vec<T>)> = Vec::new();
    for format in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
        let shape = contiguous.with_format(format);
        let cast = |v: &[f64]| -> Vec<T> {
            common::cnn::to_format(v, dims, format)
                .iter()
                .map(|&a| T::from_f64(a))
                .collect()
        };
        let (xt, dyt) = (Padded::new(&cast(&x), pad), Padded::new(&cast(&dy), pad));
        let mut y = Padded::<T>::output(numel, pad);
        let mut dx = Padded::<T>::output(numel, pad);
        let args = |input| backend::Frozen::<Emu, T> {
            input,
            shape,
            scale_shift: &coeffs,
        };
        emu.batch_norm_frozen(args(xt.payload()), y.payload_mut())
            .map_err(e)?;
        emu.batch_norm_frozen_backward(args(dyt.payload()), dx.payload_mut())
            .map_err(e)?;
        let (y, dx) = (y.checked("y")?, dx.checked("dx")?);
        let cpu_args = |input| backend::Frozen::<Cpu, T> {
            input,
            shape,
            scale_shift: &coeffs,
        };
        let mut want_y = vec![T::default(); numel];
        let mut want_dx = vec![T::default(); numel];
        Cpu.batch_norm_frozen(cpu_args(xt.payload()), &mut want_y)
            .map_err(e)?;
        Cpu.batch_norm_frozen_backward(cpu_args(dyt.payload()), &mut want_dx)
            .map_err(e)?;
        common::check_close("y", &y, &reference::to_f64(&want_y))?;
        common::check_close("dx", &dx, &reference::to_f64(&want_dx))?;
        results.push((shape, y, dx));
    }
    let (a, b) = (&results[0], &results[1]);
    for n in 0..a.0.n() {
        for ch in 0..c {
            for s in 0..a.0.spatial() {
                let (i, j) = (a.0.offset(n, ch, s), b.0.offset(n, ch, s));
                if a.1[i].to_f64().to_bits() != b.1[j].to_f64().to_bits()
                    || a.2[i].to_f64().to_bits() != b.2[j].to_f64().to_bits()
                {
                    return Err(format!("nchw and nhwc differ at ({n}, {ch}, {s})"));
                }
            }
        }
    }
    Ok(2)
}

/// PyTorch's folded weights and biases (tests/fixtures/fold.txt) with the folding done
/// by the emulated frozen kernels.
#[test]
fn folding_on_emulated_kernels() {
    let mut failures = Vec::new();
    for case in fixtures::fold_cases() {
        let emu = Emu::new(SMALL, SPLIT);
        let r = with_types!((case.dtype, case.param), |T, P| {
            fixtures::replay_fold::<Emu, T, P>(emu, &case)
        });
        if let Err(e) = r {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The fused epilogues (`relu(bn(x))`, `relu(bn(x) + z)`) on every type pair, both
/// layouts, 16-byte aligned and not, with sentinels around every output: the training
/// forward and backward, the eval forward and backward and the frozen ones against the
/// CPU backend (the backward masked by the emulated forward's own output), the residual's
/// gradient equal to the masked dy bit for bit, and the eval and frozen results of NCHW
/// and NHWC equal bit for bit.
#[test]
fn fused_epilogues_on_every_type_and_layout() {
    let shapes: &[&[usize]] = &[&[4, 3, 5, 7], &[8, 16, 2, 2], &[6, 5], &[2, 3, 2, 3, 4]];
    let mut failures = Vec::new();
    let mut runs = 0;
    let emu = Emu::new(SMALL, SPLIT);
    for &pair in TYPE_PAIRS {
        for dims in shapes {
            for add in [false, true] {
                for pad in [8, 3] {
                    let r = with_types!(pair, |T, P| check_fused::<T, P>(emu, dims, add, pad));
                    match r {
                        Ok(n) => runs += n,
                        Err(e) => {
                            failures.push(format!("{pair:?} {dims:?} add {add} pad {pad}: {e}"))
                        }
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(runs, TYPE_PAIRS.len() * shapes.len() * 2 * 2 * 2);
    // Only the baseline family runs epilogues: forcing another is a typed error.
    let ilp = Emu::new(
        SMALL,
        Tuning {
            variant: Some(Variant::Ilp),
            ..SPLIT
        },
    );
    let shape = Shape::nchw(2, 3, 4, 4).unwrap();
    let x = vec![1.0f32; shape.numel()];
    let mut y = vec![0.0f32; shape.numel()];
    let (rm, rv) = (vec![0.0f32; 3], vec![1.0f32; 3]);
    let r = ilp.batch_norm_fused(
        Forward {
            input: &x,
            shape,
            running_mean: Some(&mut rm.clone()),
            running_var: Some(&mut rv.clone()),
            weight: None,
            bias: None,
            training: false,
            momentum: 0.1,
            eps: 1e-5,
        },
        Some(Epilogue::Relu),
        &mut y,
        None,
        &mut EmuWorkspace::default(),
    );
    assert!(
        matches!(r, Err(BnError::VariantUnavailable { .. })),
        "{r:?}"
    );
}

/// What the layout-independent checks compare: eval y, dx, dz; frozen y, dx, dz (dz
/// empty without a residual).
type FusedBits = [Vec<f64>; 6];

/// One shape, both layouts (see [`fused_epilogues_on_every_type_and_layout`]). Returns
/// the number of layouts run (2).
fn check_fused<T: Float, P: ParamFor<T>>(
    emu: Emu,
    dims: &[usize],
    add: bool,
    pad: usize,
) -> std::result::Result<usize, String> {
    let e = |e: BnError| e.to_string();
    let c = dims[1];
    let mut rng = common::Rng::new(dims.iter().product::<usize>() as u64 * 3 + add as u64);
    let per_channel = |rng: &mut common::Rng, f: &dyn Fn(f64) -> f64| -> Vec<f64> {
        (0..c).map(|_| f(rng.normal())).collect()
    };
    let weight: Vec<P> = per_channel(&mut rng, &|v| 1.0 + 0.3 * v)
        .into_iter()
        .map(P::from_f64)
        .collect();
    let bias: Vec<P> = per_channel(&mut rng, &|v| 0.5 * v)
        .into_iter()
        .map(P::from_f64)
        .collect();
    let running_mean: Vec<P> = per_channel(&mut rng, &|v| v)
        .into_iter()
        .map(P::from_f64)
        .collect();
    let running_var: Vec<P> = per_channel(&mut rng, &|v| 1.0 + 0.5 * v.abs())
        .into_iter()
        .map(P::from_f64)
        .collect();
    let coeffs: Vec<T::Acc> = (0..2 * c).map(|_| T::Acc::from_f64(rng.normal())).collect();
    let contiguous = Shape::new(dims, MemoryFormat::Contiguous).map_err(e)?;
    let numel = contiguous.numel();
    let logical = |rng: &mut common::Rng, k: f64| -> Vec<f64> {
        (0..numel).map(|_| rng.normal() * k).collect()
    };
    let (x, z, dy) = (
        logical(&mut rng, 2.0),
        logical(&mut rng, 1.0),
        logical(&mut rng, 1.0),
    );
    let mut layouts: Vec<(Shape, FusedBits)> = Vec::new();
    for format in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
        let shape = contiguous.with_format(format);
        let cast = |v: &[f64]| -> Padded<T> {
            let v: Vec<T> = common::cnn::to_format(v, dims, format)
                .iter()
                .map(|&a| T::from_f64(a))
                .collect();
            Padded::new(&v, pad)
        };
        let (xt, zt, dyt) = (cast(&x), cast(&z), cast(&dy));
        let epilogue = || -> Option<Epilogue<'_, Emu, T>> {
            Some(if add {
                Epilogue::AddRelu {
                    residual: zt.payload(),
                }
            } else {
                Epilogue::Relu
            })
        };
        let cpu_epilogue = || -> Option<Epilogue<'_, Cpu, T>> {
            Some(if add {
                Epilogue::AddRelu {
                    residual: zt.payload(),
                }
            } else {
                Epilogue::Relu
            })
        };
        // Each mode: (training, frozen).
        let mut bits: Vec<Vec<f64>> = Vec::new();
        for (training, frozen) in [(true, false), (false, false), (false, true)] {
            let mode = if frozen {
                "frozen"
            } else if training {
                "train"
            } else {
                "eval"
            };
            let err = |m: String| format!("{format:?} {mode}: {m}");
            let mut y = Padded::<T>::output(numel, pad);
            let (mut sm, mut si) = (
                Padded::<T::Acc>::output(c, pad),
                Padded::<T::Acc>::output(c, pad),
            );
            let (mut rm, mut rv) = (running_mean.clone(), running_var.clone());
            let (mut cpu_rm, mut cpu_rv) = (running_mean.clone(), running_var.clone());
            let mut want_y = vec![T::default(); numel];
            let (mut cpu_sm, mut cpu_si) = (vec![T::Acc::default(); c], vec![T::Acc::default(); c]);
            let frozen_args = |input| backend::Frozen::<Emu, T> {
                input,
                shape,
                scale_shift: &coeffs,
            };
            let cpu_frozen_args = |input| backend::Frozen::<Cpu, T> {
                input,
                shape,
                scale_shift: &coeffs,
            };
            if frozen {
                emu.batch_norm_frozen_fused(frozen_args(xt.payload()), epilogue(), y.payload_mut())
                    .map_err(e)?;
                Cpu.batch_norm_frozen_fused(
                    cpu_frozen_args(xt.payload()),
                    cpu_epilogue(),
                    &mut want_y,
                )
                .map_err(e)?;
            } else {
                let mut ws = EmuWorkspace::default();
                emu.batch_norm_fused(
                    Forward {
                        input: xt.payload(),
                        shape,
                        running_mean: Some(&mut rm),
                        running_var: Some(&mut rv),
                        weight: Some(&weight),
                        bias: Some(&bias),
                        training,
                        momentum: 0.1,
                        eps: 1e-5,
                    },
                    epilogue(),
                    y.payload_mut(),
                    training.then(|| SaveStats {
                        mean: sm.payload_mut(),
                        invstd: si.payload_mut(),
                    }),
                    &mut ws,
                )
                .map_err(e)?;
                Cpu.batch_norm_fused(
                    Forward {
                        input: xt.payload(),
                        shape,
                        running_mean: Some(&mut cpu_rm),
                        running_var: Some(&mut cpu_rv),
                        weight: Some(&weight),
                        bias: Some(&bias),
                        training,
                        momentum: 0.1,
                        eps: 1e-5,
                    },
                    cpu_epilogue(),
                    &mut want_y,
                    training.then(|| SaveStats {
                        mean: &mut cpu_sm[..],
                        invstd: &mut cpu_si[..],
                    }),
                    &mut (),
                )
                .map_err(e)?;
                common::check_close("running_mean", &rm, &reference::to_f64(&cpu_rm))
                    .map_err(err)?;
                common::check_close("running_var", &rv, &reference::to_f64(&cpu_rv))
                    .map_err(err)?;
            }
            let y = y.checked("y").map_err(err)?;
            common::check_close("y", &y, &reference::to_f64(&want_y)).map_err(err)?;
            if training {
                let (sm, si) = (
                    sm.checked("save_mean").map_err(err)?,
                    si.checked("save_invstd").map_err(err)?,
                );
                common::check_close("save_mean", &sm, &reference::to_f64(&cpu_sm)).map_err(err)?;
                common::check_close("save_invstd", &si, &reference::to_f64(&cpu_si))
                    .map_err(err)?;
            }
            // The backward, masked by the emulated forward's own output on both sides.
            let mut dx = Padded::<T>::output(numel, pad);
            let mut dz = Padded::<T>::output(numel, pad);
            let (mut gw, mut gb) = (Padded::<P>::output(c, pad), Padded::<P>::output(c, pad));
            let mut want_dx = vec![T::default(); numel];
            let mut want_dz = vec![T::default(); numel];
            let (mut want_gw, mut want_gb) = (vec![P::default(); c], vec![P::default(); c]);
            if frozen {
                emu.batch_norm_frozen_backward_fused(
                    frozen_args(dyt.payload()),
                    emu_grad(add, &y, dz.payload_mut()),
                    dx.payload_mut(),
                )
                .map_err(e)?;
                Cpu.batch_norm_frozen_backward_fused(
                    cpu_frozen_args(dyt.payload()),
                    cpu_grad(add, &y, &mut want_dz),
                    &mut want_dx,
                )
                .map_err(e)?;
            } else {
                let saved = sm.payload().to_vec();
                let saved_invstd = si.payload().to_vec();
                let stats = || {
                    if training {
                        backend::BackwardStats::Batch {
                            save_mean: &saved[..],
                            save_invstd: &saved_invstd[..],
                        }
                    } else {
                        backend::BackwardStats::Running {
                            mean: &running_mean[..],
                            var: &running_var[..],
                            eps: 1e-5,
                        }
                    }
                };
                let cpu_stats = || {
                    if training {
                        backend::BackwardStats::Batch {
                            save_mean: &saved[..],
                            save_invstd: &saved_invstd[..],
                        }
                    } else {
                        backend::BackwardStats::Running {
                            mean: &running_mean[..],
                            var: &running_var[..],
                            eps: 1e-5,
                        }
                    }
                };
                let mut ws = EmuWorkspace::default();
                emu.batch_norm_backward_fused(
                    backend::Backward {
                        grad_output: dyt.payload(),
                        input: xt.payload(),
                        shape,
                        weight: Some(&weight),
                        stats: stats(),
                    },
                    emu_grad(add, &y, dz.payload_mut()),
                    Grads {
                        input: dx.payload_mut(),
                        weight: Some(gw.payload_mut()),
                        bias: Some(gb.payload_mut()),
                    },
                    &mut ws,
                )
                .map_err(e)?;
                Cpu.batch_norm_backward_fused(
                    backend::Backward {
                        grad_output: dyt.payload(),
                        input: xt.payload(),
                        shape,
                        weight: Some(&weight),
                        stats: cpu_stats(),
                    },
                    cpu_grad(add, &y, &mut want_dz),
                    Grads {
                        input: &mut want_dx,
                        weight: Some(&mut want_gw),
                        bias: Some(&mut want_gb),
                    },
                    &mut (),
                )
                .map_err(e)?;
                let (gw, gb) = (
                    gw.checked("grad_weight").map_err(err)?,
                    gb.checked("grad_bias").map_err(err)?,
                );
                common::check_close("grad_weight", &gw, &reference::to_f64(&want_gw))
                    .map_err(err)?;
                common::check_close("grad_bias", &gb, &reference::to_f64(&want_gb)).map_err(err)?;
            }
            let dx = dx.checked("dx").map_err(err)?;
            common::check_close("dx", &dx, &reference::to_f64(&want_dx)).map_err(err)?;
            let dz = if add {
                let dz = reference::to_f64(&dz.checked("grad_residual").map_err(err)?);
                // bits, so that NaN or a signed zero would show too
                let same = dz
                    .iter()
                    .zip(reference::to_f64(&want_dz))
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                if !same {
                    return Err(err("grad_residual is not the masked dy".into()));
                }
                dz
            } else if dz.data.iter().any(|v| *v != common::sentinel::<T>()) {
                return Err(err("relu's backward wrote a residual gradient".into()));
            } else {
                Vec::new()
            };
            if !training {
                bits.extend([reference::to_f64(&y), reference::to_f64(&dx), dz]);
            }
        }
        let bits: FusedBits = bits
            .try_into()
            .map_err(|_| "six layout-independent results".to_string())?;
        layouts.push((shape, bits));
    }
    let (a, b) = (&layouts[0], &layouts[1]);
    for (k, (va, vb)) in a.1.iter().zip(&b.1).enumerate() {
        for n in 0..a.0.n() {
            for ch in 0..c {
                for s in 0..a.0.spatial() {
                    let (i, j) = (a.0.offset(n, ch, s), b.0.offset(n, ch, s));
                    if !va.is_empty() && va[i].to_bits() != vb[j].to_bits() {
                        return Err(format!(
                            "result {k}: nchw and nhwc differ at ({n}, {ch}, {s})"
                        ));
                    }
                }
            }
        }
    }
    Ok(2)
}

fn emu_grad<'a, T: Float>(
    add: bool,
    output: &'a [T],
    dz: &'a mut [T],
) -> Option<EpilogueGrad<'a, Emu, T>> {
    Some(if add {
        EpilogueGrad::AddRelu {
            output,
            grad_residual: dz,
        }
    } else {
        EpilogueGrad::Relu { output }
    })
}

fn cpu_grad<'a, T: Float>(
    add: bool,
    output: &'a [T],
    dz: &'a mut [T],
) -> Option<EpilogueGrad<'a, Cpu, T>> {
    Some(if add {
        EpilogueGrad::AddRelu {
            output,
            grad_residual: dz,
        }
    } else {
        EpilogueGrad::Relu { output }
    })
}

/// The stats stage's raw calls (SyncBatchNorm's stages) on the emulated kernels, for
/// `splits` ranks of one batch in host memory, the test playing the collectives:
/// against the CPU backend's BatchNorm over the whole batch.
fn stats_stage_on<T: Float, P: ParamFor<T>>(
    emu: &Emu,
    full: Shape,
    splits: &[usize],
) -> std::result::Result<(), String> {
    let err = |e: BnError| e.to_string();
    let (c, per_sample) = (full.c(), full.numel() / full.n());
    let mut rng = common::Rng::new(0x57a7 ^ c as u64);
    let xs: Vec<T> = (0..full.numel())
        .map(|_| T::from_f64(3.0 + 2.0 * rng.normal()))
        .collect();
    let dys: Vec<T> = (0..full.numel())
        .map(|_| T::from_f64(rng.normal()))
        .collect();
    let w: Vec<P> = (0..c).map(|i| P::from_f64(0.5 + 0.25 * i as f64)).collect();
    let b: Vec<P> = (0..c).map(|i| P::from_f64(0.1 * i as f64)).collect();
    let (momentum, eps) = (0.1, 1e-5);
    // The reference.
    let (mut rm_ref, mut rv_ref) = (vec![P::from_f64(0.0); c], vec![P::from_f64(1.0); c]);
    let mut y_ref = vec![T::from_f64(0.0); full.numel()];
    let (mut sm, mut si) = (
        vec![T::Acc::from_f64(0.0); c],
        vec![T::Acc::from_f64(0.0); c],
    );
    let args = cuda_batchnorm::cpu::Forward::<T, P> {
        input: &xs,
        shape: full,
        running_mean: Some(&mut rm_ref),
        running_var: Some(&mut rv_ref),
        weight: Some(&w),
        bias: Some(&b),
        training: true,
        momentum,
        eps,
    };
    let save = SaveStats {
        mean: &mut sm[..],
        invstd: &mut si[..],
    };
    Cpu.batch_norm(args, &mut y_ref, Some(save), &mut ())
        .map_err(err)?;
    let mut dx_ref = vec![T::from_f64(0.0); full.numel()];
    let args = backend::Backward::<Cpu, T, P> {
        grad_output: &dys,
        input: &xs,
        shape: full,
        weight: Some(&w),
        stats: backend::BackwardStats::Batch {
            save_mean: &sm,
            save_invstd: &si,
        },
    };
    let grads = Grads::<Cpu, T, P> {
        input: &mut dx_ref,
        weight: None,
        bias: None,
    };
    Cpu.batch_norm_backward(args, grads, &mut ()).map_err(err)?;

    let launcher = emu.launcher();
    let mut ws = EmuWorkspace::default();
    let shapes: Vec<(Shape, std::ops::Range<usize>)> = {
        let mut start = 0;
        splits
            .iter()
            .map(|&k| {
                let mut dims = full.dims().to_vec();
                dims[0] = k;
                let r = start * per_sample..(start + k) * per_sample;
                start += k;
                (Shape::new(&dims, full.format()).unwrap(), r)
            })
            .collect()
    };
    // Per rank: [mean(C), invstd(C), count], the all-gathered rows.
    let row = 2 * c + 1;
    let mut gathered = vec![T::Acc::from_f64(0.0); splits.len() * row];
    for (r, (shape, range)) in shapes.iter().enumerate() {
        if shape.numel() == 0 {
            continue;
        }
        let (counters, scratch) = emu.workspace(&mut ws, shape, T::DTYPE).map_err(err)?;
        let (mean, rest) = gathered[r * row..(r + 1) * row].split_at_mut(c);
        let a = raw::ForwardArgs {
            x: addr(&xs[range.clone()]),
            save_mean: mean.as_mut_ptr() as u64,
            save_invstd: rest.as_mut_ptr() as u64,
            counters,
            scratch,
            eps,
            ..raw::ForwardArgs::default()
        };
        // SAFETY: the slices live across the call and hold what the shape needs.
        unsafe { raw::stats::<T, P>(&launcher, shape, &a, &emu.tuning) }.map_err(err)?;
        rest[c] = T::Acc::from_f64(shape.per_channel() as f64);
    }
    let (mut rm, mut rv) = (vec![P::from_f64(0.0); c], vec![P::from_f64(1.0); c]);
    let (mut mean, mut invstd) = (
        vec![T::Acc::from_f64(0.0); c],
        vec![T::Acc::from_f64(0.0); c],
    );
    let base = gathered.as_ptr() as u64;
    let acc = std::mem::size_of::<T::Acc>() as u64;
    let g = raw::GatherArgs {
        means: base,
        invstds: base + c as u64 * acc,
        counts: base + 2 * c as u64 * acc,
        stats_stride: row,
        counts_stride: row,
        ranks: splits.len(),
        running_mean: rm.as_mut_ptr() as u64,
        running_var: rv.as_mut_ptr() as u64,
        mean: mean.as_mut_ptr() as u64,
        invstd: invstd.as_mut_ptr() as u64,
        momentum,
        eps,
    };
    // SAFETY: as above; the gathered rows hold R rows of 2C + 1.
    unsafe { raw::gather_stats::<T, P>(&launcher, c, &g) }.map_err(err)?;
    let what = |v: &str| format!("{v}: {splits:?} of {:?} {:?}", full.dims(), full.format());
    let f = |v: &[P]| v.iter().map(|x| x.to_f64()).collect::<Vec<_>>();
    common::check_close(&what("running_mean"), &rm, &f(&rm_ref))?;
    common::check_close(&what("running_var"), &rv, &f(&rv_ref))?;
    let (mut y, mut dx) = (
        vec![T::from_f64(0.0); full.numel()],
        vec![T::from_f64(0.0); full.numel()],
    );
    let mut sums = vec![T::Acc::from_f64(0.0); 2 * c];
    let mut local = vec![T::Acc::from_f64(0.0); 2 * c];
    // A rank's backward through the global statistics: dx and weight as given.
    let backward_args =
        |range: &std::ops::Range<usize>, dx: u64, weight: u64, (counters, scratch)| {
            raw::BackwardArgs {
                dy: addr(&dys[range.clone()]),
                x: addr(&xs[range.clone()]),
                dx,
                weight,
                stats: raw::BackwardStats::Batch {
                    save_mean: addr(&mean),
                    save_invstd: addr(&invstd),
                },
                grad_weight: 0,
                grad_bias: 0,
                counters,
                scratch,
                epilogue: raw::EpilogueGrad::None,
            }
        };
    for (shape, range) in &shapes {
        if shape.numel() == 0 {
            continue;
        }
        let (counters, scratch) = emu.workspace(&mut ws, shape, T::DTYPE).map_err(err)?;
        let a = raw::ForwardArgs {
            x: addr(&xs[range.clone()]),
            y: y[range.clone()].as_mut_ptr() as u64,
            weight: addr(&w),
            bias: addr(&b),
            save_mean: addr(&mean),
            save_invstd: addr(&invstd),
            counters,
            scratch,
            ..raw::ForwardArgs::default()
        };
        // SAFETY: as above.
        unsafe { raw::elemt::<T, P>(&launcher, shape, &a, &emu.tuning) }.map_err(err)?;
        let a = backward_args(range, 0, 0, (counters, scratch));
        let out = local.as_mut_ptr() as u64;
        // SAFETY: as above; `local` holds 2C.
        unsafe { raw::backward_reduce::<T, P>(&launcher, shape, &a, out, &emu.tuning) }
            .map_err(err)?;
        for (s, l) in sums.iter_mut().zip(&local) {
            *s = T::Acc::from_f64(s.to_f64() + l.to_f64());
        }
    }
    common::check_close(
        &what("y"),
        &y,
        &y_ref.iter().map(|v| v.to_f64()).collect::<Vec<_>>(),
    )?;
    for (shape, range) in &shapes {
        if shape.numel() == 0 {
            continue;
        }
        let (counters, scratch) = emu.workspace(&mut ws, shape, T::DTYPE).map_err(err)?;
        let dx_addr = dx[range.clone()].as_mut_ptr() as u64;
        let a = backward_args(range, dx_addr, addr(&w), (counters, scratch));
        let counts = base + 2 * c as u64 * acc;
        // SAFETY: as above; the counts are the gathered rows'.
        unsafe {
            raw::backward_elemt::<T, P>(
                &launcher,
                shape,
                &a,
                addr(&sums),
                counts,
                row,
                splits.len(),
                &emu.tuning,
            )
        }
        .map_err(err)?;
    }
    common::check_close(
        &what("dx"),
        &dx,
        &dx_ref.iter().map(|v| v.to_f64()).collect::<Vec<_>>(),
    )
}

/// Every stats-stage kernel on the emulator: each type pair, both layouts, three ranks
/// with an empty one.
#[test]
fn stats_stage_kernels_match_one_batch_norm() {
    let emu = Emu::new(SMALL, SPLIT);
    let mut failures = Vec::new();
    for pair in TYPE_PAIRS {
        for format in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
            let full = Shape::new(&[5, 3, 4, 5], format).unwrap();
            let r = with_types!(*pair, |T, P| stats_stage_on::<T, P>(&emu, full, &[2, 0, 3]));
            failures.extend(r.err());
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

//! The raw layer: batch-norm operations on device addresses, run through any
//! [`Launcher`].
//!
//! This is the one place that turns an operation into kernel launches: it plans every
//! stage (through [`crate::launch`]), fills [`BnParams`], and hands each launch to the
//! launcher together with the memory regions the kernel may touch. The CUDA launcher
//! ignores the regions; the CPU emulator used by the tests checks every access against
//! them. Nothing here validates arguments: [`crate::functional`] and the modules do that
//! before calling in, which is why the entry points are `unsafe`.

use crate::dtype::{DType, Float, ParamFor};
use crate::error::{BnError, Result};
use crate::launch::{
    self, flags, workspace_layout, Alignment, BnParams, DeviceInfo, KernelId, LaunchConfig, Stage,
    StagePlan, TunedOp, Tuning, Variant, WorkspaceLayout,
};
use crate::shape::Shape;

/// How a kernel may use a region of memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionKind {
    /// Read only.
    Input,
    /// Written (and possibly read back).
    Output,
    /// Read and written.
    InOut,
    /// Scratch whose contents on entry do not matter.
    Scratch,
    /// Counters that are zero on entry and must be zero again on exit.
    Counters,
}

/// One buffer a launch may touch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// Device address.
    pub addr: u64,
    /// Length in bytes.
    pub bytes: u64,
    /// Argument name, for messages.
    pub name: &'static str,
    /// How the kernel may use it.
    pub kind: RegionKind,
}

impl Region {
    /// No region (an absent buffer): zero bytes.
    pub const NONE: Region = Region {
        addr: 0,
        bytes: 0,
        name: "",
        kind: RegionKind::Input,
    };
}

/// Something that runs kernels: the CUDA driver, or the CPU emulator in tests.
pub trait Launcher {
    /// The properties launch planning uses.
    fn device(&self) -> &DeviceInfo;
    /// Makes ready every kernel an operation is about to launch (looks them up), so
    /// that a missing kernel fails the operation before its first launch changes
    /// anything. The default has nothing to do.
    fn prepare(&self, kernels: &[KernelId]) -> Result<()> {
        let _ = kernels;
        Ok(())
    }
    /// Blocks of `kernel` resident per multiprocessor at `block_threads` threads and
    /// `shared_bytes` of dynamic shared memory, as the driver's occupancy calculator says
    /// (the families other than the baseline size their grids from it). The default,
    /// for executors without one, is the baseline's assumption of 4.
    fn resident_blocks(
        &self,
        kernel: &KernelId,
        block_threads: u32,
        shared_bytes: u32,
    ) -> Result<u32> {
        let _ = (kernel, block_threads, shared_bytes);
        Ok(4)
    }
    /// The most dynamic shared memory a block of `kernel` may have, in bytes (the
    /// persistent family keeps slabs there). An executor that can raise the limit
    /// (CUDA's opt-in, `cuFuncSetAttribute`) does so here, before any launch that needs
    /// it. The default is [`launch::default_dynamic_shared`], without the opt-in.
    fn dynamic_shared_limit(&self, kernel: &KernelId) -> Result<u32> {
        Ok(launch::default_dynamic_shared(kernel))
    }
    /// Runs one kernel. `regions` lists every buffer it may touch.
    fn launch(
        &self,
        kernel: KernelId,
        config: &LaunchConfig,
        params: &BnParams,
        regions: &[Region],
    ) -> Result<()>;
}

/// Device addresses and options of a forward call. An address of 0 means absent.
#[derive(Clone, Copy, Debug, Default)]
pub struct ForwardArgs {
    /// Input, `shape.numel()` elements of T.
    pub x: u64,
    /// Output, same size.
    pub y: u64,
    /// `P[C]` or 0 (weight 1).
    pub weight: u64,
    /// `P[C]` or 0 (bias 0).
    pub bias: u64,
    /// `P[C]`: read in eval, updated in training when `update_running`.
    pub running_mean: u64,
    /// `P[C]`, likewise.
    pub running_var: u64,
    /// `Acc[C]` or 0: the batch mean (training only).
    pub save_mean: u64,
    /// `Acc[C]` or 0: the batch invstd (training only).
    pub save_invstd: u64,
    /// Counter buffer of at least [`WorkspaceSize::counters`] u32, zero on entry.
    pub counters: u64,
    /// Scratch buffer of at least [`WorkspaceSize::scratch_bytes`] bytes.
    pub scratch: u64,
    /// Normalise with batch statistics (else with the running ones).
    pub batch_stats: bool,
    /// Update running_mean / running_var (requires `batch_stats`).
    pub update_running: bool,
    /// eps.
    pub eps: f64,
    /// The running-average factor of this call.
    pub momentum: f64,
    /// `Acc[2C]` or 0: a frozen eval, `y = x * scale + shift` with scale then shift
    /// here (see [`crate::frozen::coefficients`]); the statistics, weight and bias are not
    /// read, and `batch_stats` / `update_running` must be false.
    pub frozen: u64,
    /// What the normalisation pass applies before it writes y.
    pub epilogue: Epilogue,
}

/// A forward's fused epilogue, as the kernels see it (run by the baseline family; see
/// [`crate::backend::Epilogue`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Epilogue {
    /// `y = bn(x)`.
    #[default]
    None,
    /// `y = relu(bn(x))`.
    Relu,
    /// `y = relu(bn(x) + z)`.
    AddRelu {
        /// `T[N*C*S]`, in the input's memory format.
        residual: u64,
    },
}

/// A backward's fused epilogue: the ReLU mask comes from the forward's output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EpilogueGrad {
    /// A plain BatchNorm.
    #[default]
    None,
    /// The forward was `y = relu(bn(x))`.
    Relu {
        /// The forward's output y, `T[N*C*S]`.
        output: u64,
    },
    /// The forward was `y = relu(bn(x) + z)`.
    AddRelu {
        /// The forward's output y.
        output: u64,
        /// `T[N*C*S]`, written with the residual's gradient (the masked dy).
        grad_residual: u64,
    },
}

impl Epilogue {
    fn flags(self) -> u32 {
        match self {
            Epilogue::None => 0,
            Epilogue::Relu => flags::RELU,
            Epilogue::AddRelu { .. } => flags::RELU | flags::ADD,
        }
    }

    fn residual(self) -> u64 {
        match self {
            Epilogue::AddRelu { residual } => residual,
            _ => 0,
        }
    }
}

impl EpilogueGrad {
    fn flags(self) -> u32 {
        match self {
            EpilogueGrad::None => 0,
            EpilogueGrad::Relu { .. } => flags::RELU,
            EpilogueGrad::AddRelu { .. } => flags::RELU | flags::ADD,
        }
    }

    /// (output, grad_residual), 0 where absent.
    fn addrs(self) -> (u64, u64) {
        match self {
            EpilogueGrad::None => (0, 0),
            EpilogueGrad::Relu { output } => (output, 0),
            EpilogueGrad::AddRelu {
                output,
                grad_residual,
            } => (output, grad_residual),
        }
    }
}

/// Statistics the backward differentiates through.
#[derive(Clone, Copy, Debug)]
pub enum BackwardStats {
    /// Training: the saved batch statistics (`Acc[C]` each).
    Batch {
        /// save_mean.
        save_mean: u64,
        /// save_invstd.
        save_invstd: u64,
    },
    /// Eval: the running statistics (`P[C]` each) and eps.
    Running {
        /// running_mean.
        mean: u64,
        /// running_var.
        var: u64,
        /// eps.
        eps: f64,
    },
    /// A frozen eval's coefficients (`Acc[2C]`, scale then shift): `dx = dy * scale`.
    /// There are no parameter gradients: `grad_weight` and `grad_bias` are not written.
    Frozen {
        /// scale then shift.
        scale_shift: u64,
    },
}

/// Device addresses of a backward call. An address of 0 means absent.
#[derive(Clone, Copy, Debug)]
pub struct BackwardArgs {
    /// Gradient of the output.
    pub dy: u64,
    /// The forward's input.
    pub x: u64,
    /// Gradient of the input (written).
    pub dx: u64,
    /// `P[C]` or 0.
    pub weight: u64,
    /// Which statistics.
    pub stats: BackwardStats,
    /// `P[C]` or 0: written with dotp * invstd.
    pub grad_weight: u64,
    /// `P[C]` or 0: written with sum_dy.
    pub grad_bias: u64,
    /// Counter buffer of at least [`WorkspaceSize::counters`] u32, zero on entry.
    pub counters: u64,
    /// Scratch buffer of at least [`WorkspaceSize::scratch_bytes`] bytes.
    pub scratch: u64,
    /// The forward's fused epilogue, differentiated through.
    pub epilogue: EpilogueGrad,
}

/// The workspace every forward and backward call on a shape needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkspaceSize {
    /// u32 counters (zeroed once when allocated; the kernels keep them zero).
    pub counters: usize,
    /// Scratch bytes.
    pub scratch_bytes: usize,
}

impl WorkspaceSize {
    /// The larger of two needs, part by part.
    pub fn max(self, other: WorkspaceSize) -> WorkspaceSize {
        WorkspaceSize {
            counters: self.counters.max(other.counters),
            scratch_bytes: self.scratch_bytes.max(other.scratch_bytes),
        }
    }
}

/// What an operation computes, as planning sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// A forward: with the batch's statistics (training, or eval without running
    /// statistics) or the running ones.
    Forward {
        /// Normalise with this batch's statistics.
        batch_stats: bool,
    },
    /// A backward: through the batch's statistics (training) or the running ones, with
    /// the per-channel sums (`reduce`: training, or parameter gradients asked for).
    Backward {
        /// The forward normalised with the batch's statistics.
        batch: bool,
        /// The sums are computed (grad_weight, grad_bias, the training dx need them).
        reduce: bool,
    },
}

/// One launch of an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlannedLaunch {
    /// The entry point.
    pub kernel: KernelId,
    /// Grid, block and the cut of the work.
    pub plan: StagePlan,
}

/// Every launch of one operation, in order, by one kernel family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpPlan {
    /// The family.
    pub variant: Variant,
    /// The launches.
    pub launches: Vec<PlannedLaunch>,
}

impl OpPlan {
    /// Its launches, or only the one of stage `only` when given.
    fn launches_of(&self, only: Option<Stage>) -> Vec<&PlannedLaunch> {
        self.launches
            .iter()
            .filter(|l| only.is_none_or(|s| s == l.kernel.stage))
            .collect()
    }

    /// The workspace the operation needs.
    pub fn workspace(&self, c: usize, acc: DType) -> WorkspaceSize {
        let l = workspace_layout(self.launches.iter().map(|l| &l.plan), c, acc);
        WorkspaceSize {
            counters: l.counters,
            scratch_bytes: l.scratch_bytes,
        }
    }
}

/// The stages an operation runs in a family, or why the family cannot run it.
fn op_stages(op: Op, variant: Variant) -> Result<&'static [Stage]> {
    Ok(match (op, variant) {
        (Op::Forward { batch_stats: true }, Variant::Persistent) => &[Stage::FwdFused],
        (Op::Forward { batch_stats: true }, _) => &[Stage::FwdStats, Stage::FwdNorm],
        (Op::Forward { batch_stats: false }, Variant::Persistent) => {
            return Err(BnError::VariantUnavailable {
                variant: variant.name(),
                reason: "the eval forward is one pass already".into(),
            })
        }
        (Op::Forward { batch_stats: false }, _) => &[Stage::FwdNorm],
        (Op::Backward { batch: true, .. }, Variant::Persistent) => &[Stage::BwdFused],
        (Op::Backward { .. }, Variant::Persistent) => {
            return Err(BnError::VariantUnavailable {
                variant: variant.name(),
                reason: "the eval backward is one pass already".into(),
            })
        }
        (Op::Backward { reduce: true, .. }, Variant::Baseline) => &[Stage::BwdReduce, Stage::BwdDx],
        (Op::Backward { reduce: false, .. }, Variant::Baseline) => &[Stage::BwdDx],
        (Op::Backward { batch: true, .. }, _) => &[Stage::BwdReduce, Stage::BwdDx],
        (
            Op::Backward {
                batch: false,
                reduce: true,
            },
            _,
        ) => &[Stage::BwdReduce, Stage::BwdDxEval],
        (
            Op::Backward {
                batch: false,
                reduce: false,
            },
            _,
        ) => &[Stage::BwdDxEval],
    })
}

/// One stage's plan in one family, its grid sized from the occupancy of `kernel` (the
/// families other than the baseline).
fn plan_family_stage(
    kernel: &KernelId,
    shape: &Shape,
    align: Alignment,
    launcher: &impl Launcher,
    tuning: &Tuning,
) -> Result<StagePlan> {
    let (variant, stage, input, dev) = (
        kernel.variant,
        kernel.stage,
        kernel.input,
        launcher.device(),
    );
    match variant {
        Variant::Baseline => launch::plan_stage(stage, shape, input, align, dev, tuning),
        Variant::Ilp | Variant::Flat => {
            let resident = launcher.resident_blocks(kernel, launch::BLOCK_THREADS, 0)?;
            launch::plan_ilp_stage(variant, stage, shape, input, align, dev, tuning, resident)
        }
        Variant::Persistent => {
            launch::persistent_takes(stage, shape, input, align)?;
            let limit = launcher.dynamic_shared_limit(kernel)?;
            let mut resident =
                |shared| launcher.resident_blocks(kernel, launch::BLOCK_THREADS, shared);
            launch::plan_persistent_stage(
                stage,
                shape,
                input,
                align,
                dev,
                tuning,
                &mut resident,
                limit,
            )
        }
    }
}

/// One family's plan of an operation, or why it cannot take it.
fn plan_variant(
    variant: Variant,
    op: Op,
    shape: &Shape,
    (input, param): (DType, DType),
    align: Alignment,
    launcher: &impl Launcher,
    tuning: &Tuning,
) -> Result<OpPlan> {
    let layout = launch::Layout::of(shape);
    let mut launches = Vec::new();
    for &stage in op_stages(op, variant)? {
        let mut kernel = KernelId {
            variant,
            index64: false,
            stage,
            layout,
            input,
            param,
        };
        let mut plan = plan_family_stage(&kernel, shape, align, launcher, tuning)?;
        if plan.index64 && variant != Variant::Baseline {
            // The 64-bit entry point is another kernel with its own registers and
            // occupancy: plan again with its residency (a cooperative grid sized for the
            // 32-bit one could exceed what the driver keeps resident), keeping 64 bits.
            kernel.index64 = true;
            let wide = Tuning {
                force_index64: true,
                ..*tuning
            };
            plan = plan_family_stage(&kernel, shape, align, launcher, &wide)?;
        }
        kernel.index64 = plan.index64;
        launches.push(PlannedLaunch { kernel, plan });
    }
    Ok(OpPlan { variant, launches })
}

/// The families tried, in order, when none is asked for: the predictions of
/// kernels/NOTES.md (the fused single launch where it fits, the 16-byte streaming kernels
/// where vectors fit, the one-value-per-lane ones for the planes and channel counts they
/// do not, the baseline for the rest).
pub const PREDICTED_ORDER: [Variant; 4] = [
    Variant::Persistent,
    Variant::Ilp,
    Variant::Flat,
    Variant::Baseline,
];

/// Plans an operation: the family `tuning.variant` asks for (an error if it cannot take
/// the call), else the one `tuning.table` measured fastest for calls like it (when it can
/// take this one), else the first of [`PREDICTED_ORDER`] that can.
pub fn plan_op(
    op: Op,
    shape: &Shape,
    types: (DType, DType),
    align: Alignment,
    launcher: &impl Launcher,
    tuning: &Tuning,
) -> Result<OpPlan> {
    plan_op_fused(op, false, shape, types, align, launcher, tuning)
}

/// [`plan_op`] for a call with a fused epilogue when `fused`: only the baseline family
/// runs epilogues, so it is the plan (and any other family asked for is unavailable).
pub fn plan_op_fused(
    op: Op,
    fused: bool,
    shape: &Shape,
    types: (DType, DType),
    align: Alignment,
    launcher: &impl Launcher,
    tuning: &Tuning,
) -> Result<OpPlan> {
    plan_with(op, fused, false, shape, types, align, launcher, tuning)
}

/// [`plan_op`] for the stats-stage functions, which run an operation's stages as calls of
/// their own: the persistent family's single launch cannot be cut, so the plan is the
/// one [`plan_op`] would make without it (a persistent family asked for is unavailable).
pub fn plan_op_split(
    op: Op,
    shape: &Shape,
    types: (DType, DType),
    align: Alignment,
    launcher: &impl Launcher,
    tuning: &Tuning,
) -> Result<OpPlan> {
    plan_with(op, false, true, shape, types, align, launcher, tuning)
}

/// The one planner of [`plan_op_fused`] and [`plan_op_split`]: with `split`, the
/// persistent family is never chosen.
#[allow(clippy::too_many_arguments)]
fn plan_with(
    op: Op,
    fused: bool,
    split: bool,
    shape: &Shape,
    types: (DType, DType),
    align: Alignment,
    launcher: &impl Launcher,
    tuning: &Tuning,
) -> Result<OpPlan> {
    if shape.numel() == 0 {
        return Err(BnError::EmptyInput {
            size: shape.dims().to_vec(),
        });
    }
    if fused {
        return match tuning.variant {
            Some(v) if v != Variant::Baseline => Err(BnError::VariantUnavailable {
                variant: v.name(),
                reason: "fused epilogues (ReLU, residual add) run on the baseline kernels".into(),
            }),
            _ => plan_variant(Variant::Baseline, op, shape, types, align, launcher, tuning),
        };
    }
    let allowed = |v: Variant| !(split && v == Variant::Persistent);
    if let Some(v) = tuning.variant {
        if !allowed(v) {
            return Err(BnError::VariantUnavailable {
                variant: v.name(),
                reason: "the stats-stage functions run the statistics and the normalisation \
                         as launches of their own"
                    .into(),
            });
        }
        return plan_variant(v, op, shape, types, align, launcher, tuning);
    }
    let measured = tuning.table.and_then(|t| {
        let tuned = match op {
            Op::Forward { batch_stats: true } => TunedOp::TrainForward,
            Op::Forward { batch_stats: false } => TunedOp::EvalForward,
            Op::Backward { batch: true, .. } => TunedOp::TrainBackward,
            Op::Backward { batch: false, .. } => TunedOp::EvalBackward,
        };
        let bucket = launch::bytes_bucket(shape.numel(), types.0);
        t.choose(tuned, launch::Layout::of(shape), types.0, bucket)
    });
    if let Some(v) = measured.filter(|&v| allowed(v)) {
        match plan_variant(v, op, shape, types, align, launcher, tuning) {
            Err(BnError::VariantUnavailable { .. }) => {}
            other => return other,
        }
    }
    for v in PREDICTED_ORDER.into_iter().filter(|&v| allowed(v)) {
        match plan_variant(v, op, shape, types, align, launcher, tuning) {
            Err(BnError::VariantUnavailable { .. }) => continue,
            other => return other,
        }
    }
    plan_variant(Variant::Baseline, op, shape, types, align, launcher, tuning)
}

/// The workspace every forward and backward call on this shape with inputs of `input`
/// (any parameter type) needs with `launcher` and `tuning`, whatever the alignment of
/// its buffers. Zero for empty shapes.
pub fn workspace_size(
    launcher: &impl Launcher,
    shape: &Shape,
    input: DType,
    tuning: &Tuning,
) -> Result<WorkspaceSize> {
    let mut size = WorkspaceSize::default();
    if shape.numel() == 0 {
        return Ok(size);
    }
    let unaligned = Alignment {
        same_misalignment: false,
        all_aligned: false,
    };
    let pairs = crate::dtype::KERNEL_PAIRS.iter().filter(|p| p.0 == input);
    for (types, align) in pairs.flat_map(|&t| [(t, Alignment::ALIGNED), (t, unaligned)]) {
        for op in [
            Op::Forward { batch_stats: true },
            Op::Backward {
                batch: true,
                reduce: true,
            },
            Op::Backward {
                batch: false,
                reduce: true,
            },
        ] {
            // A forced family that cannot take one of these calls fails that call
            // itself; its workspace does not matter. The stats-stage functions plan
            // the same operations without the persistent family.
            for plan in [
                plan_op(op, shape, types, align, launcher, tuning),
                plan_op_split(op, shape, types, align, launcher, tuning),
            ] {
                match plan {
                    Ok(plan) => size = size.max(plan.workspace(shape.c(), types.0.acc())),
                    Err(BnError::VariantUnavailable { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Ok(size)
}

struct Workspace {
    layout: WorkspaceLayout,
    counters: u64,
    scratch: u64,
}

impl Workspace {
    fn new(plan: &OpPlan, c: usize, acc: DType, counters: u64, scratch: u64) -> Workspace {
        Workspace {
            layout: workspace_layout(plan.launches.iter().map(|l| &l.plan), c, acc),
            counters,
            scratch,
        }
    }

    fn counters(&self) -> u64 {
        self.counters
    }

    /// An address inside the scratch buffer; 0 (absent) when there is none (eval).
    fn in_scratch(&self, offset: usize) -> u64 {
        if self.scratch == 0 {
            0
        } else {
            self.scratch + offset as u64
        }
    }

    fn partials(&self) -> u64 {
        self.in_scratch(self.layout.partials)
    }

    fn channel(&self) -> u64 {
        self.in_scratch(self.layout.channel)
    }

    /// The counter and partial regions a reducing stage uses.
    fn reduction_regions(&self, plan: &StagePlan, acc: DType, c: usize) -> Result<[Region; 2]> {
        let used = plan.splits > 1;
        let partials = (launch::PARTIAL_VALUES * plan.splits as usize).saturating_mul(c);
        Ok([
            Region {
                addr: self.counters(),
                bytes: if used {
                    byte_count("workspace counters", plan.counters(), 4)?
                } else {
                    0
                },
                name: "workspace counters",
                kind: RegionKind::Counters,
            },
            Region {
                addr: self.partials(),
                bytes: if used {
                    byte_count("workspace partials", partials, acc.size())?
                } else {
                    0
                },
                name: "workspace partials",
                kind: RegionKind::Scratch,
            },
        ])
    }

    fn channel_region(&self, acc: DType, c: usize, kind: RegionKind) -> Result<Region> {
        let name = "workspace channel data";
        Ok(Region {
            addr: self.channel(),
            bytes: byte_count(name, launch::CHANNEL_SLOTS.saturating_mul(c), acc.size())?,
            name,
            kind,
        })
    }
}

/// The region of a frozen eval's coefficients (`Acc[2C]`), read only.
fn frozen_region(addr: u64, c: usize, acc: DType) -> Result<Region> {
    region(
        addr,
        c.saturating_mul(2),
        acc,
        "scale_shift",
        RegionKind::Input,
    )
}

/// The region of `elems` values of `dtype` at `addr` (none at address 0), or an error
/// when its byte count cannot be represented.
fn region(
    addr: u64,
    elems: usize,
    dtype: DType,
    name: &'static str,
    kind: RegionKind,
) -> Result<Region> {
    Ok(Region {
        addr,
        bytes: if addr == 0 {
            0
        } else {
            byte_count(name, elems, dtype.size())?
        },
        name,
        kind,
    })
}

/// `elems * elem_bytes` as u64, or [`BnError::BufferTooLarge`].
pub(crate) fn byte_count(name: &'static str, elems: usize, elem_bytes: usize) -> Result<u64> {
    elems
        .checked_mul(elem_bytes)
        .and_then(|b| u64::try_from(b).ok())
        .ok_or(BnError::BufferTooLarge {
            name,
            len: elems,
            elem_bytes,
        })
}

fn base_params(shape: &Shape, plan: &StagePlan) -> BnParams {
    BnParams {
        n: shape.n() as i64,
        c: shape.c() as i64,
        s: shape.spatial() as i64,
        chunk: plan.chunk as i64,
        splits: plan.splits,
        tile_x: plan.tile_x,
        flags: plan.flags(),
        ..BnParams::default()
    }
}

/// The forward: batch statistics (when `batch_stats`) then normalisation, planned by
/// [`plan_op`].
///
/// # Safety
/// Every non-zero address must be a live device allocation of the launcher's context
/// holding at least the elements described on [`ForwardArgs`] for `shape`; `y` must not
/// overlap any input; the workspace buffers must be at least [`workspace_size`] long (or
/// the plan's [`OpPlan::workspace`]) and the counters zero; `shape` must be non-empty
/// and validated (`crate::validate::forward`).
pub unsafe fn forward<T: Float, P: ParamFor<T>>(
    launcher: &impl Launcher,
    shape: &Shape,
    a: &ForwardArgs,
    tuning: &Tuning,
) -> Result<()> {
    let plan = plan_forward::<T, P>(launcher, shape, a, tuning)?;
    // SAFETY: the caller's contract, for the plan of these arguments.
    unsafe { forward_planned::<T, P>(launcher, shape, a, &plan) }
}

/// The plan [`forward`] runs for these arguments.
pub fn plan_forward<T: Float, P: ParamFor<T>>(
    launcher: &impl Launcher,
    shape: &Shape,
    a: &ForwardArgs,
    tuning: &Tuning,
) -> Result<OpPlan> {
    plan_op_fused(
        Op::Forward {
            batch_stats: a.batch_stats,
        },
        a.epilogue != Epilogue::None,
        shape,
        (T::DTYPE, P::DTYPE),
        Alignment::of(&[a.x, a.y, a.epilogue.residual()]),
        launcher,
        tuning,
    )
}

/// The forward by a given plan (of [`plan_forward`] for the same arguments).
///
/// # Safety
/// As for [`forward`], the workspace at least `plan.workspace(..)`.
pub unsafe fn forward_planned<T: Float, P: ParamFor<T>>(
    launcher: &impl Launcher,
    shape: &Shape,
    a: &ForwardArgs,
    plan: &OpPlan,
) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe { forward_launches::<T, P>(launcher, shape, a, plan, None) }
}

/// The launches of `plan` (only the one of stage `only` when given), the workspace laid
/// out for the whole plan.
///
/// # Safety
/// As for [`forward_planned`].
unsafe fn forward_launches<T: Float, P: ParamFor<T>>(
    launcher: &impl Launcher,
    shape: &Shape,
    a: &ForwardArgs,
    plan: &OpPlan,
    only: Option<Stage>,
) -> Result<()> {
    let (acc, c, numel) = (T::Acc::DTYPE, shape.c(), shape.numel());
    let ws = Workspace::new(plan, c, acc, a.counters, a.scratch);
    let frozen = a.frozen != 0;
    let mode = if a.batch_stats { flags::BATCH_STATS } else { 0 }
        | if a.update_running {
            flags::UPDATE_RUNNING
        } else {
            0
        }
        | if frozen { flags::FROZEN } else { 0 }
        | a.epilogue.flags();
    let input = RegionKind::Input;
    let x = region(a.x, numel, T::DTYPE, "input", input)?;
    // fwd_stats reads the running statistics and stages their update; fwd_norm commits
    // it, so the running statistics change only if both launches are accepted (a fused
    // launch updates them itself).
    let running = |kind| -> Result<[Region; 2]> {
        Ok([
            region(a.running_mean, c, P::DTYPE, "running_mean", kind)?,
            region(a.running_var, c, P::DTYPE, "running_var", kind)?,
        ])
    };
    let launches = plan.launches_of(only);
    let ids: Vec<KernelId> = launches.iter().map(|l| l.kernel).collect();
    launcher.prepare(&ids)?;

    for l in launches {
        let (stage_plan, id) = (&l.plan, l.kernel);
        let mut p = base_params(shape, stage_plan);
        p.flags |= mode;
        p.x = a.x;
        p.eps = a.eps;
        p.running_mean = a.running_mean;
        p.running_var = a.running_var;
        p.ws_channel = if frozen { a.frozen } else { ws.channel() };
        let stats = matches!(id.stage, Stage::FwdStats | Stage::FwdFused);
        let norm = matches!(id.stage, Stage::FwdNorm | Stage::FwdFused);
        let mut regions = vec![x];
        if stats {
            p.save_mean = a.save_mean;
            p.save_invstd = a.save_invstd;
            p.ws_counters = ws.counters();
            p.ws_partials = ws.partials();
            p.momentum = a.momentum;
            let n = shape.per_channel() as f64;
            p.bessel = n / (n - 1.0);
            let [counters, partials] = ws.reduction_regions(stage_plan, acc, c)?;
            regions.extend(running(if norm && a.update_running {
                RegionKind::InOut
            } else {
                input
            })?);
            regions.extend([
                region(a.save_mean, c, acc, "save_mean", RegionKind::Output)?,
                region(a.save_invstd, c, acc, "save_invstd", RegionKind::Output)?,
                counters,
                partials,
                ws.channel_region(acc, c, RegionKind::Output)?,
            ]);
        }
        if norm {
            p.y = a.y;
            p.weight = a.weight;
            p.bias = a.bias;
            p.z = a.epilogue.residual();
            regions.extend([
                region(a.y, numel, T::DTYPE, "output", RegionKind::Output)?,
                region(a.weight, c, P::DTYPE, "weight", input)?,
                region(a.bias, c, P::DTYPE, "bias", input)?,
                region(p.z, numel, T::DTYPE, "residual", input)?,
            ]);
            if frozen {
                regions.push(frozen_region(a.frozen, c, acc)?);
            } else if !stats {
                match (a.batch_stats, a.update_running) {
                    (false, _) => regions.extend(running(input)?),
                    (true, true) => regions.extend(running(RegionKind::InOut)?),
                    (true, false) => {}
                }
                if a.batch_stats {
                    regions.push(ws.channel_region(acc, c, input)?);
                }
            }
        }
        launcher.launch(id, &stage_plan.config, &p, &regions)?;
    }
    Ok(())
}

/// The backward: the per-channel reduction (when the mode needs sums, or parameter
/// gradients are asked for) then the input gradient, planned by [`plan_op`].
///
/// # Safety
/// As for [`forward`]: every non-zero address a live allocation of the launcher's
/// context large enough for `shape`, `dx` not overlapping an input, the workspace
/// buffers large enough and the counters zero, `shape` non-empty and validated
/// (`crate::validate::backward`).
pub unsafe fn backward<T: Float, P: ParamFor<T>>(
    launcher: &impl Launcher,
    shape: &Shape,
    a: &BackwardArgs,
    tuning: &Tuning,
) -> Result<()> {
    let plan = plan_backward::<T, P>(launcher, shape, a, tuning)?;
    // SAFETY: the caller's contract, for the plan of these arguments.
    unsafe { backward_planned::<T, P>(launcher, shape, a, &plan) }
}

/// The plan [`backward`] runs for these arguments.
pub fn plan_backward<T: Float, P: ParamFor<T>>(
    launcher: &impl Launcher,
    shape: &Shape,
    a: &BackwardArgs,
    tuning: &Tuning,
) -> Result<OpPlan> {
    let batch = matches!(a.stats, BackwardStats::Batch { .. });
    let frozen = matches!(a.stats, BackwardStats::Frozen { .. });
    let reduce = batch || (!frozen && (a.grad_weight != 0 || a.grad_bias != 0));
    let (y, dz) = a.epilogue.addrs();
    plan_op_fused(
        Op::Backward { batch, reduce },
        a.epilogue != EpilogueGrad::None,
        shape,
        (T::DTYPE, P::DTYPE),
        Alignment::of(&[a.x, a.dy, a.dx, y, dz]),
        launcher,
        tuning,
    )
}

/// The backward by a given plan (of [`plan_backward`] for the same arguments).
///
/// # Safety
/// As for [`backward`], the workspace at least `plan.workspace(..)`.
pub unsafe fn backward_planned<T: Float, P: ParamFor<T>>(
    launcher: &impl Launcher,
    shape: &Shape,
    a: &BackwardArgs,
    plan: &OpPlan,
) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe { backward_launches::<T, P>(launcher, shape, a, plan, None, 0) }
}

/// The launches of `plan` (only the one of stage `only` when given), the workspace laid
/// out for the whole plan; a reduction writes its sums to `sums` (`Acc[2C]`) instead of
/// the workspace when it is not 0.
///
/// # Safety
/// As for [`backward_planned`]; `sums`, when not 0, a live allocation of `2C` `T::Acc`.
unsafe fn backward_launches<T: Float, P: ParamFor<T>>(
    launcher: &impl Launcher,
    shape: &Shape,
    a: &BackwardArgs,
    plan: &OpPlan,
    only: Option<Stage>,
    sums: u64,
) -> Result<()> {
    let (acc, c, numel) = (T::Acc::DTYPE, shape.c(), shape.numel());
    let batch = matches!(a.stats, BackwardStats::Batch { .. });
    let ws = Workspace::new(plan, c, acc, a.counters, a.scratch);
    let input = RegionKind::Input;
    let (stats_regions, mode) = match a.stats {
        BackwardStats::Batch {
            save_mean,
            save_invstd,
        } => (
            [
                region(save_mean, c, acc, "save_mean", input)?,
                region(save_invstd, c, acc, "save_invstd", input)?,
            ],
            flags::BATCH_STATS,
        ),
        BackwardStats::Running { mean, var, .. } => (
            [
                region(mean, c, P::DTYPE, "running_mean", input)?,
                region(var, c, P::DTYPE, "running_var", input)?,
            ],
            0,
        ),
        BackwardStats::Frozen { scale_shift } => (
            [frozen_region(scale_shift, c, acc)?, Region::NONE],
            flags::FROZEN,
        ),
    };
    let frozen = mode == flags::FROZEN;
    let (y, dz) = a.epilogue.addrs();
    let launches = plan.launches_of(only);
    let ids: Vec<KernelId> = launches.iter().map(|l| l.kernel).collect();
    launcher.prepare(&ids)?;
    for l in launches {
        let (stage_plan, id) = (&l.plan, l.kernel);
        let mut p = base_params(shape, stage_plan);
        p.flags |= mode | a.epilogue.flags();
        p.x = a.x;
        p.dy = a.dy;
        p.y = y;
        p.weight = a.weight;
        p.ws_channel = ws.channel();
        match a.stats {
            BackwardStats::Frozen { scale_shift } => p.ws_channel = scale_shift,
            BackwardStats::Batch {
                save_mean,
                save_invstd,
            } => {
                p.save_mean = save_mean;
                p.save_invstd = save_invstd;
            }
            BackwardStats::Running { mean, var, eps } => {
                p.running_mean = mean;
                p.running_var = var;
                p.eps = eps;
            }
        }
        let reduce = matches!(id.stage, Stage::BwdReduce | Stage::BwdFused);
        let dx = matches!(id.stage, Stage::BwdDx | Stage::BwdDxEval | Stage::BwdFused);
        let reads_x = reduce || (dx && batch);
        let mut regions = vec![
            if reads_x {
                region(a.x, numel, T::DTYPE, "input", input)?
            } else {
                Region::NONE
            },
            region(a.dy, numel, T::DTYPE, "grad_output", input)?,
            region(y, numel, T::DTYPE, "output", input)?,
            stats_regions[0],
            stats_regions[1],
        ];
        if reduce && !frozen {
            if sums != 0 {
                p.ws_channel = sums;
            }
            p.grad_weight = a.grad_weight;
            p.grad_bias = a.grad_bias;
            p.ws_counters = ws.counters();
            p.ws_partials = ws.partials();
            let [counters, partials] = ws.reduction_regions(stage_plan, acc, c)?;
            regions.extend([
                region(
                    a.grad_weight,
                    c,
                    P::DTYPE,
                    "grad_weight",
                    RegionKind::Output,
                )?,
                region(a.grad_bias, c, P::DTYPE, "grad_bias", RegionKind::Output)?,
                counters,
                partials,
                if sums != 0 {
                    region(sums, c.saturating_mul(2), acc, "sums", RegionKind::Output)?
                } else {
                    ws.channel_region(acc, c, RegionKind::Output)?
                },
            ]);
        }
        regions.push(region(a.weight, c, P::DTYPE, "weight", input)?);
        if dx {
            p.dx = a.dx;
            p.dz = dz;
            regions.push(region(
                a.dx,
                numel,
                T::DTYPE,
                "grad_input",
                RegionKind::Output,
            )?);
            regions.push(region(
                dz,
                numel,
                T::DTYPE,
                "grad_residual",
                RegionKind::Output,
            )?);
            // a dx launch of its own reads the sums the reduction left
            if !reduce && batch {
                regions.push(ws.channel_region(acc, c, input)?);
            }
        }
        launcher.launch(id, &stage_plan.config, &p, &regions)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The stats stage: an operation's stages as calls of their own (SyncBatchNorm and
// frameworks with their own communication run them around their collectives).

/// Device addresses of the merge of several ranks' statistics
/// ([`gather_stats`]). Rank r's channel c has its mean at `means + r * stats_stride + c`
/// and its invstd likewise from `invstds`, its count at `counts + r * counts_stride`
/// (`T::Acc` each): separate `[R, C]` and `[R]` buffers (strides C and 1), or the rows of
/// one all-gathered buffer (`[mean(C), invstd(C), count]` per rank: stride 2C + 1).
#[derive(Clone, Copy, Debug, Default)]
pub struct GatherArgs {
    /// The ranks' means.
    pub means: u64,
    /// The ranks' invstds.
    pub invstds: u64,
    /// The ranks' value counts per channel (a count <= 0 is an empty rank, skipped).
    pub counts: u64,
    /// Elements between two ranks' means (and invstds).
    pub stats_stride: usize,
    /// Elements between two ranks' counts.
    pub counts_stride: usize,
    /// R.
    pub ranks: usize,
    /// `P[C]` or 0: updated with the global statistics when both are given.
    pub running_mean: u64,
    /// `P[C]` or 0.
    pub running_var: u64,
    /// `Acc[C]`, written: the global mean.
    pub mean: u64,
    /// `Acc[C]`, written: the global invstd.
    pub invstd: u64,
    /// The running-average factor.
    pub momentum: f64,
    /// eps.
    pub eps: f64,
}

/// The input regions of `parts` (address, elements), merged where they overlap (the
/// rows of one gathered buffer interleave the parts), as `name`.
fn input_span(parts: &[(u64, usize)], dtype: DType, name: &'static str) -> Result<Vec<Region>> {
    let mut spans: Vec<(u64, u64)> = Vec::new();
    for &(addr, elems) in parts.iter().filter(|p| p.0 != 0) {
        let end = addr
            .checked_add(byte_count(name, elems, dtype.size())?)
            .ok_or(BnError::BufferTooLarge {
                name,
                len: elems,
                elem_bytes: dtype.size(),
            })?;
        spans.push((addr, end));
    }
    spans.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (lo, hi) in spans {
        match merged.last_mut() {
            Some(last) if lo < last.1 => last.1 = last.1.max(hi),
            _ => merged.push((lo, hi)),
        }
    }
    Ok(merged
        .into_iter()
        .map(|(lo, hi)| Region {
            addr: lo,
            bytes: hi - lo,
            name,
            kind: RegionKind::Input,
        })
        .collect())
}

/// Elements a strided set of `rows` rows of `width` needs.
fn strided(rows: usize, stride: usize, width: usize) -> usize {
    rows.saturating_sub(1)
        .saturating_mul(stride)
        .saturating_add(width)
}

/// Runs the per-channel stage `stage` that prepares `plan`'s channel data, after looking
/// up every kernel of the plan too, so that a missing one fails before anything runs.
fn prep_launch(
    launcher: &impl Launcher,
    stage: Stage,
    c: usize,
    types: (DType, DType),
    plan: &OpPlan,
    p: &BnParams,
    regions: &[Region],
) -> Result<()> {
    let (id, config) = launch::channel_launch(stage, c, types)?;
    let mut ids = vec![id];
    ids.extend(plan.launches.iter().map(|l| l.kernel));
    launcher.prepare(&ids)?;
    launcher.launch(id, &config, p, regions)
}

/// The plan of an operation the stats stage cuts into its stages.
fn split_plan<T: Float, P: ParamFor<T>>(
    launcher: &impl Launcher,
    op: Op,
    shape: &Shape,
    addrs: &[u64],
    tuning: &Tuning,
) -> Result<OpPlan> {
    plan_op_split(
        op,
        shape,
        (T::DTYPE, P::DTYPE),
        Alignment::of(addrs),
        launcher,
        tuning,
    )
}

/// The batch statistics alone (PyTorch's `batch_norm_stats`): the forward's statistics
/// stage writes `a.save_mean` (the mean) and `a.save_invstd` (`1 / sqrt(var + eps)`,
/// biased variance); nothing else that outlives the call. `a.y`, the parameters, the
/// running statistics, `update_running` and the epilogue are not used.
///
/// # Safety
/// As for [`forward`], with `save_mean` and `save_invstd` live `Acc[C]` allocations.
pub unsafe fn stats<T: Float, P: ParamFor<T>>(
    launcher: &impl Launcher,
    shape: &Shape,
    a: &ForwardArgs,
    tuning: &Tuning,
) -> Result<()> {
    let op = Op::Forward { batch_stats: true };
    let plan = split_plan::<T, P>(launcher, op, shape, &[a.x], tuning)?;
    let a = ForwardArgs {
        batch_stats: true,
        update_running: false,
        running_mean: 0,
        running_var: 0,
        y: 0,
        frozen: 0,
        epilogue: Epilogue::None,
        ..*a
    };
    // SAFETY: the caller's contract; the statistics stage reads x and writes the saved
    // statistics and the workspace.
    unsafe { forward_launches::<T, P>(launcher, shape, &a, &plan, Some(Stage::FwdStats)) }
}

/// The merge of R ranks' statistics (PyTorch's `batch_norm_gather_stats_with_counts`):
/// the global mean and invstd, and the running statistics updated with the global
/// batch's unbiased variance when they are given. One per-channel launch.
///
/// # Safety
/// Every non-zero address a live allocation of the launcher's context holding what
/// [`GatherArgs`] describes for `c` channels; `mean` and `invstd` overlap no input;
/// `c >= 1`, `ranks >= 1`.
pub unsafe fn gather_stats<T: Float, P: ParamFor<T>>(
    launcher: &impl Launcher,
    c: usize,
    a: &GatherArgs,
) -> Result<()> {
    let acc = T::Acc::DTYPE;
    let (id, config) = launch::channel_launch(Stage::StatsGather, c, (T::DTYPE, P::DTYPE))?;
    let update = a.running_mean != 0 && a.running_var != 0;
    let (rm, rv) = if update {
        (a.running_mean, a.running_var)
    } else {
        (0, 0)
    };
    let rows = strided(a.ranks, a.stats_stride, c);
    let mut regions = input_span(
        &[
            (a.means, rows),
            (a.invstds, rows),
            (a.counts, strided(a.ranks, a.counts_stride, 1)),
        ],
        acc,
        "gathered statistics",
    )?;
    let running = if update {
        RegionKind::InOut
    } else {
        RegionKind::Input
    };
    regions.extend([
        region(a.mean, c, acc, "mean", RegionKind::Output)?,
        region(a.invstd, c, acc, "invstd", RegionKind::Output)?,
        region(rm, c, P::DTYPE, "running_mean", running)?,
        region(rv, c, P::DTYPE, "running_var", running)?,
    ]);
    let p = BnParams {
        x: a.means,
        dy: a.invstds,
        z: a.counts,
        n: a.ranks as i64,
        c: c as i64,
        chunk: a.stats_stride as i64,
        s: a.counts_stride as i64,
        save_mean: a.mean,
        save_invstd: a.invstd,
        running_mean: rm,
        running_var: rv,
        flags: if update { flags::UPDATE_RUNNING } else { 0 },
        momentum: a.momentum,
        eps: a.eps,
        ..BnParams::default()
    };
    launcher.prepare(&[id])?;
    launcher.launch(id, &config, &p, &regions)
}

/// The normalisation with given statistics (PyTorch's `batch_norm_elemt`):
/// `y = (x - mean) * invstd * weight + bias` with `a.save_mean` and `a.save_invstd` as
/// the statistics (read, `Acc[C]` each). Two launches: the
/// statistics into the workspace's channel data, then the forward's normalisation
/// stage. The running statistics and the epilogue are not used.
///
/// # Safety
/// As for [`forward`].
pub unsafe fn elemt<T: Float, P: ParamFor<T>>(
    launcher: &impl Launcher,
    shape: &Shape,
    a: &ForwardArgs,
    tuning: &Tuning,
) -> Result<()> {
    let acc = T::Acc::DTYPE;
    let c = shape.c();
    let op = Op::Forward { batch_stats: true };
    let plan = split_plan::<T, P>(launcher, op, shape, &[a.x, a.y], tuning)?;
    let ws = Workspace::new(&plan, c, acc, a.counters, a.scratch);
    let p = BnParams {
        c: c as i64,
        save_mean: a.save_mean,
        save_invstd: a.save_invstd,
        ws_channel: ws.channel(),
        ..BnParams::default()
    };
    let regions = [
        region(a.save_mean, c, acc, "mean", RegionKind::Input)?,
        region(a.save_invstd, c, acc, "invstd", RegionKind::Input)?,
        ws.channel_region(acc, c, RegionKind::Output)?,
    ];
    let types = (T::DTYPE, P::DTYPE);
    prep_launch(launcher, Stage::ElemtPrep, c, types, &plan, &p, &regions)?;
    let a = ForwardArgs {
        batch_stats: true,
        update_running: false,
        running_mean: 0,
        running_var: 0,
        save_mean: 0,
        save_invstd: 0,
        frozen: 0,
        epilogue: Epilogue::None,
        ..*a
    };
    // SAFETY: the caller's contract; the normalisation reads the channel data the launch
    // above wrote into the workspace of this plan.
    unsafe { forward_launches::<T, P>(launcher, shape, &a, &plan, Some(Stage::FwdNorm)) }
}

/// The backward's sums alone (PyTorch's `batch_norm_backward_reduce`): `sums` (`Acc[2C]`)
/// gets `sum_dy` then `sum_dy_xmu` (the sum of `dy * (x - mean)`), `a.grad_bias` and
/// `a.grad_weight` (when not 0) `sum_dy` and `sum_dy_xmu * invstd`. `a.stats` must be
/// [`BackwardStats::Batch`]; `a.dx` is not written and the epilogue is not used.
///
/// # Safety
/// As for [`backward`], with `sums` a live `Acc[2C]` allocation overlapping no input.
pub unsafe fn backward_reduce<T: Float, P: ParamFor<T>>(
    launcher: &impl Launcher,
    shape: &Shape,
    a: &BackwardArgs,
    sums: u64,
    tuning: &Tuning,
) -> Result<()> {
    let op = Op::Backward {
        batch: true,
        reduce: true,
    };
    let plan = split_plan::<T, P>(launcher, op, shape, &[a.x, a.dy], tuning)?;
    let a = BackwardArgs {
        dx: 0,
        epilogue: EpilogueGrad::None,
        ..*a
    };
    // SAFETY: the caller's contract; the reduction writes its sums to `sums`.
    unsafe { backward_launches::<T, P>(launcher, shape, &a, &plan, Some(Stage::BwdReduce), sums) }
}

/// The input gradient from all-reduced sums (PyTorch's `batch_norm_backward_elemt`):
/// `dx = (dy - sum_dy / M - (x - mean) * invstd^2 * sum_dy_xmu / M) * invstd * weight`,
/// `sums` (`Acc[2C]`, sum_dy then sum_dy_xmu) summed over every rank and M the sum of the
/// ranks' counts (`counts + r * counts_stride` for r < `ranks`, `T::Acc`). `a.stats` must
/// be [`BackwardStats::Batch`] (the global statistics); the epilogue is not used, as in
/// [`backward_reduce`]. Two launches: the scaled sums into the workspace's channel data,
/// then the backward's dx stage.
///
/// # Safety
/// As for [`backward`]; `sums` and the counts live allocations of the sizes above.
#[allow(clippy::too_many_arguments)]
pub unsafe fn backward_elemt<T: Float, P: ParamFor<T>>(
    launcher: &impl Launcher,
    shape: &Shape,
    a: &BackwardArgs,
    sums: u64,
    counts: u64,
    counts_stride: usize,
    ranks: usize,
    tuning: &Tuning,
) -> Result<()> {
    let acc = T::Acc::DTYPE;
    let c = shape.c();
    let op = Op::Backward {
        batch: true,
        reduce: true,
    };
    let plan = split_plan::<T, P>(launcher, op, shape, &[a.x, a.dy, a.dx], tuning)?;
    let ws = Workspace::new(&plan, c, acc, a.counters, a.scratch);
    let p = BnParams {
        x: sums,
        z: counts,
        n: ranks as i64,
        c: c as i64,
        s: counts_stride as i64,
        chunk: shape.per_channel() as i64,
        ws_channel: ws.channel(),
        ..BnParams::default()
    };
    let mut regions = input_span(&[(sums, c.saturating_mul(2))], acc, "sums")?;
    regions.extend(input_span(
        &[(counts, strided(ranks, counts_stride, 1))],
        acc,
        "counts",
    )?);
    regions.push(ws.channel_region(acc, c, RegionKind::Output)?);
    let types = (T::DTYPE, P::DTYPE);
    prep_launch(launcher, Stage::DxPrep, c, types, &plan, &p, &regions)?;
    let a = BackwardArgs {
        grad_weight: 0,
        grad_bias: 0,
        epilogue: EpilogueGrad::None,
        ..*a
    };
    // SAFETY: the caller's contract; the dx stage reads the sums the launch above wrote
    // into the workspace of this plan.
    unsafe { backward_launches::<T, P>(launcher, shape, &a, &plan, Some(Stage::BwdDx), 0) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shape::MemoryFormat;

    /// A device whose 64-bit-index kernels fit fewer blocks per SM than the 32-bit ones.
    struct Planner;

    impl Launcher for Planner {
        fn device(&self) -> &DeviceInfo {
            &DeviceInfo::H100
        }
        fn resident_blocks(&self, kernel: &KernelId, _: u32, _: u32) -> Result<u32> {
            Ok(if kernel.index64 { 1 } else { 3 })
        }
        fn launch(&self, _: KernelId, _: &LaunchConfig, _: &BnParams, _: &[Region]) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn grids_are_sized_for_the_entry_point_launched() {
        let shape = Shape::new(&[8, 132, 32, 32], MemoryFormat::Contiguous).unwrap();
        let op = Op::Forward { batch_stats: true };
        let types = (DType::F32, DType::F32);
        let plan = |force_index64| {
            let tuning = Tuning {
                variant: Some(Variant::Persistent),
                force_index64,
                ..Tuning::default()
            };
            plan_op(op, &shape, types, Alignment::ALIGNED, &Planner, &tuning)
                .unwrap()
                .launches[0]
        };
        let narrow = plan(false);
        assert!(!narrow.kernel.index64);
        assert_eq!(narrow.plan.config.grid.0, 132 * 3);
        // the 64-bit kernel resides one block per SM: a grid for three would not launch
        let wide = plan(true);
        assert!(wide.kernel.index64 && wide.plan.index64);
        assert_eq!(wide.plan.config.grid.0, 132);
    }
}

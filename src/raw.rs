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
    StagePlan, Tuning, WorkspaceLayout,
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
}

fn stage_plans(
    stages: &[Stage],
    shape: &Shape,
    input: DType,
    align: Alignment,
    dev: &DeviceInfo,
    tuning: &Tuning,
) -> Result<[Option<StagePlan>; 2]> {
    let mut out = [None, None];
    for (slot, &stage) in out.iter_mut().zip(stages) {
        *slot = Some(launch::plan_stage(stage, shape, input, align, dev, tuning)?);
    }
    Ok(out)
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

/// The workspace that every forward and backward call on this shape needs, whatever the
/// alignment of its buffers. Zero for empty shapes.
pub fn workspace_size(
    shape: &Shape,
    input: DType,
    dev: &DeviceInfo,
    tuning: &Tuning,
) -> Result<WorkspaceSize> {
    let mut size = WorkspaceSize::default();
    if shape.numel() == 0 {
        return Ok(size);
    }
    for align in [
        Alignment::ALIGNED,
        Alignment {
            same_misalignment: false,
            all_aligned: false,
        },
    ] {
        let mut plans = [None; 4];
        for (slot, &stage) in plans.iter_mut().zip(&Stage::ALL) {
            *slot = Some(launch::plan_stage(stage, shape, input, align, dev, tuning)?);
        }
        let l = workspace_layout(plans.iter().flatten(), shape.c(), input.acc());
        size = size.max(WorkspaceSize {
            counters: l.counters,
            scratch_bytes: l.scratch_bytes,
        });
    }
    Ok(size)
}

struct Workspace {
    layout: WorkspaceLayout,
    counters: u64,
    scratch: u64,
}

impl Workspace {
    fn new(
        plans: &[Option<StagePlan>; 2],
        c: usize,
        acc: DType,
        counters: u64,
        scratch: u64,
    ) -> Workspace {
        Workspace {
            layout: workspace_layout(plans.iter().flatten(), c, acc),
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
        let partials = (2 * plan.splits as usize).saturating_mul(c);
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

fn kernel<T: Float, P: Float>(stage: Stage, plan: &StagePlan) -> KernelId {
    KernelId {
        stage,
        layout: plan.layout,
        input: T::DTYPE,
        param: P::DTYPE,
    }
}

/// The forward: batch statistics (when `batch_stats`) then normalisation.
///
/// # Safety
/// Every non-zero address must be a live device allocation of the launcher's context
/// holding at least the elements described on [`ForwardArgs`] for `shape`; `y` must not
/// overlap any input; the workspace buffers must be at least [`workspace_size`] long and
/// the counters zero; `shape` must be non-empty and validated
/// (`crate::validate::forward`).
pub unsafe fn forward<T: Float, P: ParamFor<T>>(
    launcher: &impl Launcher,
    shape: &Shape,
    a: &ForwardArgs,
    tuning: &Tuning,
) -> Result<()> {
    let (acc, c, numel) = (T::Acc::DTYPE, shape.c(), shape.numel());
    let align = Alignment::of(&[a.x, a.y]);
    let stages: &[Stage] = if a.batch_stats {
        &[Stage::FwdStats, Stage::FwdNorm]
    } else {
        &[Stage::FwdNorm]
    };
    let plans = stage_plans(stages, shape, T::DTYPE, align, launcher.device(), tuning)?;
    let ws = Workspace::new(&plans, c, acc, a.counters, a.scratch);
    let mode = if a.batch_stats { flags::BATCH_STATS } else { 0 }
        | if a.update_running {
            flags::UPDATE_RUNNING
        } else {
            0
        };
    let input = RegionKind::Input;
    let x = region(a.x, numel, T::DTYPE, "input", input)?;
    // fwd_stats reads the running statistics and stages their update; fwd_norm commits
    // it, so the running statistics change only if both launches are accepted.
    let running = |kind| -> Result<[Region; 2]> {
        Ok([
            region(a.running_mean, c, P::DTYPE, "running_mean", kind)?,
            region(a.running_var, c, P::DTYPE, "running_var", kind)?,
        ])
    };
    let ids: Vec<KernelId> = plans
        .iter()
        .flatten()
        .zip(stages)
        .map(|(plan, &stage)| kernel::<T, P>(stage, plan))
        .collect();
    launcher.prepare(&ids)?;

    for ((i, plan), id) in plans.iter().flatten().enumerate().zip(ids) {
        let mut p = base_params(shape, plan);
        p.flags |= mode;
        p.x = a.x;
        p.eps = a.eps;
        p.running_mean = a.running_mean;
        p.running_var = a.running_var;
        p.ws_channel = ws.channel();
        if a.batch_stats && i == 0 {
            p.save_mean = a.save_mean;
            p.save_invstd = a.save_invstd;
            p.ws_counters = ws.counters();
            p.ws_partials = ws.partials();
            p.momentum = a.momentum;
            let n = shape.per_channel() as f64;
            p.bessel = n / (n - 1.0);
            let [counters, partials] = ws.reduction_regions(plan, acc, c)?;
            let [rm, rv] = running(input)?;
            let regions = [
                x,
                rm,
                rv,
                region(a.save_mean, c, acc, "save_mean", RegionKind::Output)?,
                region(a.save_invstd, c, acc, "save_invstd", RegionKind::Output)?,
                counters,
                partials,
                ws.channel_region(acc, c, RegionKind::Output)?,
            ];
            launcher.launch(id, &plan.config, &p, &regions)?;
        } else {
            p.y = a.y;
            p.weight = a.weight;
            p.bias = a.bias;
            let none = Region::NONE;
            let [rm, rv] = match (a.batch_stats, a.update_running) {
                (false, _) => running(input)?,
                (true, true) => running(RegionKind::InOut)?,
                (true, false) => [none, none],
            };
            let regions = [
                x,
                region(a.y, numel, T::DTYPE, "output", RegionKind::Output)?,
                region(a.weight, c, P::DTYPE, "weight", input)?,
                region(a.bias, c, P::DTYPE, "bias", input)?,
                rm,
                rv,
                if a.batch_stats {
                    ws.channel_region(acc, c, input)?
                } else {
                    none
                },
            ];
            launcher.launch(id, &plan.config, &p, &regions)?;
        }
    }
    Ok(())
}

/// The backward: the per-channel reduction (when the mode needs sums, or parameter
/// gradients are asked for) then the input gradient.
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
    let (acc, c, numel) = (T::Acc::DTYPE, shape.c(), shape.numel());
    let batch = matches!(a.stats, BackwardStats::Batch { .. });
    let reduce = batch || a.grad_weight != 0 || a.grad_bias != 0;
    let align = Alignment::of(&[a.x, a.dy, a.dx]);
    let stages: &[Stage] = if reduce {
        &[Stage::BwdReduce, Stage::BwdDx]
    } else {
        &[Stage::BwdDx]
    };
    let plans = stage_plans(stages, shape, T::DTYPE, align, launcher.device(), tuning)?;
    let ws = Workspace::new(&plans, c, acc, a.counters, a.scratch);
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
    };
    let ids: Vec<KernelId> = plans
        .iter()
        .flatten()
        .zip(stages)
        .map(|(plan, &stage)| kernel::<T, P>(stage, plan))
        .collect();
    launcher.prepare(&ids)?;
    for ((i, plan), id) in plans.iter().flatten().enumerate().zip(ids) {
        let mut p = base_params(shape, plan);
        p.flags |= mode;
        p.x = a.x;
        p.dy = a.dy;
        p.weight = a.weight;
        p.ws_channel = ws.channel();
        match a.stats {
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
        let dy = region(a.dy, numel, T::DTYPE, "grad_output", input)?;
        if reduce && i == 0 {
            p.grad_weight = a.grad_weight;
            p.grad_bias = a.grad_bias;
            p.ws_counters = ws.counters();
            p.ws_partials = ws.partials();
            let [counters, partials] = ws.reduction_regions(plan, acc, c)?;
            let regions = [
                region(a.x, numel, T::DTYPE, "input", input)?,
                dy,
                stats_regions[0],
                stats_regions[1],
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
                ws.channel_region(acc, c, RegionKind::Output)?,
            ];
            launcher.launch(id, &plan.config, &p, &regions)?;
        } else {
            p.dx = a.dx;
            let regions = [
                if batch {
                    region(a.x, numel, T::DTYPE, "input", input)?
                } else {
                    Region::NONE
                },
                dy,
                region(a.dx, numel, T::DTYPE, "grad_input", RegionKind::Output)?,
                region(a.weight, c, P::DTYPE, "weight", input)?,
                stats_regions[0],
                stats_regions[1],
                if batch {
                    ws.channel_region(acc, c, input)?
                } else {
                    Region::NONE
                },
            ];
            launcher.launch(id, &plan.config, &p, &regions)?;
        }
    }
    Ok(())
}

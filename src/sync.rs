//! SyncBatchNorm's stats stage: PyTorch's per-stage functions on cudarc buffers, for a
//! framework that brings its own communication.
//!
//! A synchronous BatchNorm's training step on each rank, as `torch.nn.SyncBatchNorm`
//! runs it:
//!
//! 1. [`batch_norm_stats`]: the local mean and invstd (`batch_norm_stats`).
//! 2. all-gather every rank's (mean, invstd, count);
//! 3. [`batch_norm_gather_stats_with_counts`]: the global mean and invstd, the running
//!    statistics updated with the global batch's unbiased variance;
//! 4. [`batch_norm_elemt`]: `y = (x - mean) * invstd * weight + bias`.
//!
//! and backward:
//!
//! 1. [`batch_norm_backward_reduce`]: the local `sum_dy`, `sum_dy_xmu` (the sum of
//!    `dy * (x - mean)`), grad_weight and grad_bias;
//! 2. all-reduce (sum) the sums;
//! 3. [`batch_norm_backward_elemt`]: dx from the global sums and the ranks' counts.
//!
//! The streaming stages are the single-GPU kernels' own statistics, normalisation,
//! reduction and dx launches, run one at a time; small per-channel kernels merge the
//! ranks' statistics and hand given statistics and sums to them. With one rank the
//! results equal [`crate::functional::batch_norm`]'s and
//! [`crate::functional::batch_norm_backward`]'s to rounding.
//!
//! Deliberate deviations from PyTorch's signatures: the channel sums are one buffer of
//! `2C` values (`sum_dy` then `sum_dy_xmu`, the buffer an all-reduce takes in one call),
//! and counts are in the accumulator type (PyTorch's backward takes them as int32). An
//! empty input's statistics are written as zeros with count 0 (what SyncBatchNorm sends
//! for an empty rank; the merge skips ranks whose count is not positive).
//!
//! Validation, stream ordering and buffer rules are those of [`crate::functional`].

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use crate::backend::Backend;
use crate::dtype::{DType, Float, ParamFor};
use crate::error::{BnError, Result};
use crate::functional::{prepare, read, same_context, write, zero, Cuda, Workspace};
use crate::kernels::{CudaLauncher, Kernels};
use crate::launch::Tuning;
use crate::module::{BatchNorm, BatchNormOptions, Gradients};
use crate::raw;
use crate::shape::Shape;
use crate::validate;

/// The driver step of zeroing an empty input's outputs, for messages.
const ZEROING: &str = "zeroing a buffer";

/// [`batch_norm_stats`]'s input.
pub struct Stats<'a, T: Float> {
    /// Input.
    pub input: &'a dyn DevicePtr<T>,
    /// Its size and memory format.
    pub shape: Shape,
    /// Added to the variance.
    pub eps: f64,
}

/// [`batch_norm_gather_stats_with_counts`]'s inputs: every rank's statistics, rank by
/// rank, and the running statistics to update.
pub struct Gather<'a, A: Float, P: Float> {
    /// `[R, C]`: each rank's mean.
    pub means: &'a dyn DevicePtr<A>,
    /// `[R, C]`: each rank's invstd.
    pub invstds: &'a dyn DevicePtr<A>,
    /// `[R]`: each rank's values per channel (an empty rank's 0 is skipped).
    pub counts: &'a dyn DevicePtr<A>,
    /// Updated when given (with `running_var`).
    pub running_mean: Option<&'a mut dyn DevicePtrMut<P>>,
    /// Updated when given (with `running_mean`).
    pub running_var: Option<&'a mut dyn DevicePtrMut<P>>,
    /// The running-average factor of this step.
    pub momentum: f64,
    /// Added to the variance.
    pub eps: f64,
}

/// [`batch_norm_elemt`]'s inputs.
pub struct Elemt<'a, T: Float, P: ParamFor<T>> {
    /// Input.
    pub input: &'a dyn DevicePtr<T>,
    /// Its size and memory format.
    pub shape: Shape,
    /// Scale (C); absent means 1.
    pub weight: Option<&'a dyn DevicePtr<P>>,
    /// Shift (C); absent means 0.
    pub bias: Option<&'a dyn DevicePtr<P>>,
    /// The (global) mean (C).
    pub mean: &'a dyn DevicePtr<T::Acc>,
    /// The (global) invstd (C).
    pub invstd: &'a dyn DevicePtr<T::Acc>,
}

/// [`batch_norm_backward_reduce`]'s inputs.
pub struct BackwardReduce<'a, T: Float> {
    /// Gradient of the output.
    pub grad_output: &'a dyn DevicePtr<T>,
    /// The forward's input.
    pub input: &'a dyn DevicePtr<T>,
    /// Their size and memory format.
    pub shape: Shape,
    /// The statistics the forward normalised with (C).
    pub mean: &'a dyn DevicePtr<T::Acc>,
    /// (C).
    pub invstd: &'a dyn DevicePtr<T::Acc>,
}

/// [`batch_norm_backward_elemt`]'s inputs.
pub struct BackwardElemt<'a, T: Float, P: ParamFor<T>> {
    /// Gradient of the output.
    pub grad_output: &'a dyn DevicePtr<T>,
    /// The forward's input.
    pub input: &'a dyn DevicePtr<T>,
    /// Their size and memory format.
    pub shape: Shape,
    /// The statistics the forward normalised with (C).
    pub mean: &'a dyn DevicePtr<T::Acc>,
    /// (C).
    pub invstd: &'a dyn DevicePtr<T::Acc>,
    /// Scale (C); absent means 1.
    pub weight: Option<&'a dyn DevicePtr<P>>,
    /// `[2C]`: sum_dy then sum_dy_xmu, summed over every rank.
    pub sums: &'a dyn DevicePtr<T::Acc>,
    /// `[R]`: every rank's values per channel.
    pub counts: &'a dyn DevicePtr<T::Acc>,
}

/// The local batch statistics (PyTorch's `torch.batch_norm_stats`): `mean` and `invstd`
/// (`1 / sqrt(biased variance + eps)`), C each. An input with no values writes zeros.
pub fn batch_norm_stats<T: Float>(
    stream: &Arc<CudaStream>,
    args: Stats<'_, T>,
    mean: &mut dyn DevicePtrMut<T::Acc>,
    invstd: &mut dyn DevicePtrMut<T::Acc>,
    workspace: &mut Workspace,
) -> Result<()> {
    let Stats { input, shape, eps } = args;
    let c = shape.c();
    validate::stats_stage(
        &shape,
        Some(("input", input.len())),
        &[("mean", mean.len(), c), ("invstd", invstd.len(), c)],
    )?;
    validate::check_eps(eps, true)?;
    same_context(stream, "input", input)?;
    same_context(stream, "mean", &*mean)?;
    same_context(stream, "invstd", &*invstd)?;
    let acc = std::mem::size_of::<T::Acc>();
    if shape.numel() == 0 {
        let (m, _gm) = mean.device_ptr_mut(stream);
        zero(stream, ZEROING, "mean", m, c, acc)?;
        let (i, _gi) = invstd.device_ptr_mut(stream);
        return zero(stream, ZEROING, "invstd", i, c, acc);
    }
    let (kernels, tuning) = prepare(stream, workspace, &shape, T::DTYPE)?;
    let (x, _gx) = input.device_ptr(stream);
    let (m, _gm) = mean.device_ptr_mut(stream);
    let (i, _gi) = invstd.device_ptr_mut(stream);
    let [(counters, _gc), (scratch, _gs)] = workspace.ptrs(stream)?;
    let a = raw::ForwardArgs {
        x,
        save_mean: m,
        save_invstd: i,
        counters,
        scratch,
        eps,
        ..raw::ForwardArgs::default()
    };
    // SAFETY: validation checked the input's length against the shape, the statistics'
    // lengths against C, and that all belong to the stream's context; the guards keep
    // them alive and ordered until the launch is queued; the workspace was reserved.
    unsafe { raw::stats::<T, T::Native>(&CudaLauncher::new(stream, &kernels), &shape, &a, &tuning) }
}

/// The global statistics from every rank's (PyTorch's
/// `torch.batch_norm_gather_stats_with_counts`): `mean` and `invstd` (C each), merged in
/// rank order; the running statistics, when given, move towards the global mean and
/// the global batch's unbiased variance by `momentum`. Ranks whose count is not
/// positive are skipped.
pub fn batch_norm_gather_stats_with_counts<T: Float, P: ParamFor<T>>(
    stream: &Arc<CudaStream>,
    channels: usize,
    args: Gather<'_, T::Acc, P>,
    mean: &mut dyn DevicePtrMut<T::Acc>,
    invstd: &mut dyn DevicePtrMut<T::Acc>,
) -> Result<()> {
    let Gather {
        means,
        invstds,
        counts,
        mut running_mean,
        mut running_var,
        momentum,
        eps,
    } = args;
    let (c, ranks) = (channels, counts.len());
    validate::gather(ranks, eps, momentum)?;
    if running_mean.is_some() != running_var.is_some() {
        return Err(BnError::RunningStatsPairing);
    }
    let rows = ranks.saturating_mul(c);
    let mut lengths = vec![
        ("means", means.len(), rows),
        ("invstds", invstds.len(), rows),
        ("mean", mean.len(), c),
        ("invstd", invstd.len(), c),
    ];
    for (name, b) in [
        ("running_mean", &running_mean),
        ("running_var", &running_var),
    ] {
        if let Some(b) = b {
            lengths.push((name, b.len(), c));
        }
    }
    for (name, got, expected) in lengths {
        validate::feature(name, expected, Some(got))?;
    }
    same_context(stream, "means", means)?;
    same_context(stream, "invstds", invstds)?;
    same_context(stream, "counts", counts)?;
    same_context(stream, "mean", &*mean)?;
    same_context(stream, "invstd", &*invstd)?;
    for (name, b) in [
        ("running_mean", &running_mean),
        ("running_var", &running_var),
    ] {
        if let Some(b) = b {
            same_context(stream, name, &**b)?;
        }
    }
    if c == 0 {
        return Ok(());
    }
    let kernels = Kernels::for_context(stream.context())?;
    let (ms, _gms) = means.device_ptr(stream);
    let (is, _gis) = invstds.device_ptr(stream);
    let (ns, _gns) = counts.device_ptr(stream);
    let (m, _gm) = mean.device_ptr_mut(stream);
    let (i, _gi) = invstd.device_ptr_mut(stream);
    let (rm, _grm) = write(&mut running_mean, stream);
    let (rv, _grv) = write(&mut running_var, stream);
    let a = raw::GatherArgs {
        means: ms,
        invstds: is,
        counts: ns,
        stats_stride: c,
        counts_stride: 1,
        ranks,
        running_mean: rm,
        running_var: rv,
        mean: m,
        invstd: i,
        momentum,
        eps,
    };
    // SAFETY: validation checked every length ([R, C], [R], C) and the contexts; the
    // guards keep the buffers alive and ordered until the launch is queued.
    unsafe { raw::gather_stats::<T, P>(&CudaLauncher::new(stream, &kernels), c, &a) }
}

/// The normalisation with given statistics (PyTorch's `torch.batch_norm_elemt`):
/// `output = (x - mean) * invstd * weight + bias`.
pub fn batch_norm_elemt<T: Float, P: ParamFor<T>>(
    stream: &Arc<CudaStream>,
    args: Elemt<'_, T, P>,
    output: &mut dyn DevicePtrMut<T>,
    workspace: &mut Workspace,
) -> Result<()> {
    let Elemt {
        input,
        shape,
        weight,
        bias,
        mean,
        invstd,
    } = args;
    let c = shape.c();
    let mut lengths = vec![("mean", mean.len(), c), ("invstd", invstd.len(), c)];
    for (name, b) in [("weight", weight), ("bias", bias)] {
        if let Some(b) = b {
            lengths.push((name, b.len(), c));
        }
    }
    validate::stats_stage(&shape, Some(("input", input.len())), &lengths)?;
    validate::buffer("output", shape.numel(), output.len(), &shape)?;
    same_context(stream, "input", input)?;
    same_context(stream, "output", &*output)?;
    same_context(stream, "mean", mean)?;
    same_context(stream, "invstd", invstd)?;
    for (name, b) in [("weight", weight), ("bias", bias)] {
        if let Some(b) = b {
            same_context(stream, name, b)?;
        }
    }
    if shape.numel() == 0 {
        return Ok(());
    }
    let (kernels, tuning) = prepare(stream, workspace, &shape, T::DTYPE)?;
    let (x, _gx) = input.device_ptr(stream);
    let (y, _gy) = output.device_ptr_mut(stream);
    let (w, _gw) = read(&weight, stream);
    let (b, _gb) = read(&bias, stream);
    let (m, _gm) = mean.device_ptr(stream);
    let (i, _gi) = invstd.device_ptr(stream);
    let [(counters, _gc), (scratch, _gs)] = workspace.ptrs(stream)?;
    let a = raw::ForwardArgs {
        x,
        y,
        weight: w,
        bias: b,
        save_mean: m,
        save_invstd: i,
        counters,
        scratch,
        ..raw::ForwardArgs::default()
    };
    // SAFETY: validation checked every length against the shape and C and the contexts;
    // the guards keep the buffers alive and ordered until the launches are queued; the
    // workspace was reserved for this shape.
    unsafe { raw::elemt::<T, P>(&CudaLauncher::new(stream, &kernels), &shape, &a, &tuning) }
}

/// The backward's local sums (PyTorch's `torch.batch_norm_backward_reduce`): `sums`
/// (2C) gets `sum_dy` then `sum_dy_xmu`; `grad_weight` (`sum_dy_xmu * invstd`) and
/// `grad_bias` (`sum_dy`) are written when given. An input with no values writes zeros.
pub fn batch_norm_backward_reduce<'g, T: Float, P: ParamFor<T>>(
    stream: &Arc<CudaStream>,
    args: BackwardReduce<'_, T>,
    sums: &mut dyn DevicePtrMut<T::Acc>,
    mut grad_weight: Option<&'g mut (dyn DevicePtrMut<P> + 'g)>,
    mut grad_bias: Option<&'g mut (dyn DevicePtrMut<P> + 'g)>,
    workspace: &mut Workspace,
) -> Result<()> {
    let BackwardReduce {
        grad_output,
        input,
        shape,
        mean,
        invstd,
    } = args;
    let c = shape.c();
    let mut lengths = vec![
        ("mean", mean.len(), c),
        ("invstd", invstd.len(), c),
        ("sums", sums.len(), c.saturating_mul(2)),
    ];
    for (name, g) in [("grad_weight", &grad_weight), ("grad_bias", &grad_bias)] {
        if let Some(g) = g {
            lengths.push((name, g.len(), c));
        }
    }
    validate::stats_stage(&shape, Some(("input", input.len())), &lengths)?;
    validate::buffer("grad_output", shape.numel(), grad_output.len(), &shape)?;
    same_context(stream, "grad_output", grad_output)?;
    same_context(stream, "input", input)?;
    same_context(stream, "mean", mean)?;
    same_context(stream, "invstd", invstd)?;
    same_context(stream, "sums", &*sums)?;
    for (name, g) in [("grad_weight", &grad_weight), ("grad_bias", &grad_bias)] {
        if let Some(g) = g {
            same_context(stream, name, &**g)?;
        }
    }
    if shape.numel() == 0 {
        let (s, _gs) = sums.device_ptr_mut(stream);
        zero(
            stream,
            ZEROING,
            "sums",
            s,
            c.saturating_mul(2),
            std::mem::size_of::<T::Acc>(),
        )?;
        let (gw, _ggw) = write(&mut grad_weight, stream);
        let (gb, _ggb) = write(&mut grad_bias, stream);
        for (name, p) in [("grad_weight", gw), ("grad_bias", gb)] {
            if p != 0 {
                zero(stream, ZEROING, name, p, c, std::mem::size_of::<P>())?;
            }
        }
        return Ok(());
    }
    let (kernels, tuning) = prepare(stream, workspace, &shape, T::DTYPE)?;
    let (dy, _gdy) = grad_output.device_ptr(stream);
    let (x, _gx) = input.device_ptr(stream);
    let (m, _gm) = mean.device_ptr(stream);
    let (i, _gi) = invstd.device_ptr(stream);
    let (s, _gs) = sums.device_ptr_mut(stream);
    let (gw, _ggw) = write(&mut grad_weight, stream);
    let (gb, _ggb) = write(&mut grad_bias, stream);
    let [(counters, _gc), (scratch, _gsc)] = workspace.ptrs(stream)?;
    let a = raw::BackwardArgs {
        dy,
        x,
        dx: 0,
        weight: 0,
        stats: raw::BackwardStats::Batch {
            save_mean: m,
            save_invstd: i,
        },
        grad_weight: gw,
        grad_bias: gb,
        counters,
        scratch,
        epilogue: raw::EpilogueGrad::None,
    };
    // SAFETY: validation checked every length against the shape and C and the contexts;
    // the guards keep the buffers alive and ordered until the launch is queued; the
    // workspace was reserved for this shape.
    unsafe {
        raw::backward_reduce::<T, P>(&CudaLauncher::new(stream, &kernels), &shape, &a, s, &tuning)
    }
}

/// The input gradient from the global sums (PyTorch's `torch.batch_norm_backward_elemt`):
/// `grad_input = (dy - sum_dy / M - (x - mean) * invstd^2 * sum_dy_xmu / M) * invstd *
/// weight`, M the sum of `counts`.
pub fn batch_norm_backward_elemt<T: Float, P: ParamFor<T>>(
    stream: &Arc<CudaStream>,
    args: BackwardElemt<'_, T, P>,
    grad_input: &mut dyn DevicePtrMut<T>,
    workspace: &mut Workspace,
) -> Result<()> {
    let BackwardElemt {
        grad_output,
        input,
        shape,
        mean,
        invstd,
        weight,
        sums,
        counts,
    } = args;
    let c = shape.c();
    let mut lengths = vec![
        ("mean", mean.len(), c),
        ("invstd", invstd.len(), c),
        ("sums", sums.len(), c.saturating_mul(2)),
    ];
    if let Some(w) = weight {
        lengths.push(("weight", w.len(), c));
    }
    validate::stats_stage(&shape, Some(("input", input.len())), &lengths)?;
    validate::buffer("grad_output", shape.numel(), grad_output.len(), &shape)?;
    validate::buffer("grad_input", shape.numel(), grad_input.len(), &shape)?;
    if counts.is_empty() {
        return Err(BnError::NoRanks);
    }
    same_context(stream, "grad_output", grad_output)?;
    same_context(stream, "input", input)?;
    same_context(stream, "grad_input", &*grad_input)?;
    same_context(stream, "mean", mean)?;
    same_context(stream, "invstd", invstd)?;
    same_context(stream, "sums", sums)?;
    same_context(stream, "counts", counts)?;
    if let Some(w) = weight {
        same_context(stream, "weight", w)?;
    }
    if shape.numel() == 0 {
        return Ok(());
    }
    let (kernels, tuning) = prepare(stream, workspace, &shape, T::DTYPE)?;
    let (dy, _gdy) = grad_output.device_ptr(stream);
    let (x, _gx) = input.device_ptr(stream);
    let (dx, _gdx) = grad_input.device_ptr_mut(stream);
    let (m, _gm) = mean.device_ptr(stream);
    let (i, _gi) = invstd.device_ptr(stream);
    let (w, _gw) = read(&weight, stream);
    let (s, _gs) = sums.device_ptr(stream);
    let (n, _gn) = counts.device_ptr(stream);
    let [(counters, _gc), (scratch, _gsc)] = workspace.ptrs(stream)?;
    let a = raw::BackwardArgs {
        dy,
        x,
        dx,
        weight: w,
        stats: raw::BackwardStats::Batch {
            save_mean: m,
            save_invstd: i,
        },
        grad_weight: 0,
        grad_bias: 0,
        counters,
        scratch,
        epilogue: raw::EpilogueGrad::None,
    };
    // SAFETY: validation checked every length against the shape, C and R and the
    // contexts; the guards keep the buffers alive and ordered until the launches are
    // queued; the workspace was reserved for this shape.
    unsafe {
        raw::backward_elemt::<T, P>(
            &CudaLauncher::new(stream, &kernels),
            &shape,
            &a,
            s,
            n,
            1,
            counts.len(),
            &tuning,
        )
    }
}

// ---------------------------------------------------------------------------------------
// SyncBatchNorm.

/// The collectives [`SyncBatchNorm`] runs, queued on the stream it passes (the module's):
/// an all-gather of the ranks' statistics in the forward and an all-reduce of the
/// channel sums in the backward. `Nccl` (the `nccl` feature) implements it over NCCL;
/// a framework with its own communication implements it over that.
///
/// Every rank must make the same calls in the same order with the same counts, as
/// NCCL's collectives require. The module's checked calls (the default,
/// [`SyncOptions::verify`]) open with an all-gather of a small header, so that ranks
/// that disagree all return an error rather than wait on each other.
pub trait Collectives {
    /// This rank, below [`world_size`](Self::world_size).
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn world_size(&self) -> usize;
    /// Gathers `count` values of `dtype` at `send` from every rank into `recv`
    /// (`world_size * count` values, rank r's at `r * count`), queued on `stream`.
    ///
    /// # Safety
    /// `send` and `recv` are live device allocations of `stream`'s context holding
    /// those many values; `recv` does not overlap `send`.
    unsafe fn all_gather(
        &self,
        stream: &CudaStream,
        send: u64,
        recv: u64,
        count: usize,
        dtype: DType,
    ) -> Result<()>;
    /// Replaces `count` values of `dtype` at `buf` by their sum over every rank, queued
    /// on `stream`.
    ///
    /// # Safety
    /// `buf` is a live device allocation of `stream`'s context holding `count` values.
    unsafe fn all_reduce_sum(
        &self,
        stream: &CudaStream,
        buf: u64,
        count: usize,
        dtype: DType,
    ) -> Result<()>;
}

// One communicator serves every layer of a model: `SyncBatchNorm<T, P, &C>`, `Rc<C>` or
// `Arc<C>` share it (each layer's collectives are queued in the order the layers run,
// which is the same on every rank).
macro_rules! shared_collectives {
    ($($ty:ty),*) => {$(
        impl<C: Collectives + ?Sized> Collectives for $ty {
            fn rank(&self) -> usize {
                (**self).rank()
            }

            fn world_size(&self) -> usize {
                (**self).world_size()
            }

            unsafe fn all_gather(
                &self,
                stream: &CudaStream,
                send: u64,
                recv: u64,
                count: usize,
                dtype: DType,
            ) -> Result<()> {
                // SAFETY: the caller's contract, passed on unchanged.
                unsafe { (**self).all_gather(stream, send, recv, count, dtype) }
            }

            unsafe fn all_reduce_sum(
                &self,
                stream: &CudaStream,
                buf: u64,
                count: usize,
                dtype: DType,
            ) -> Result<()> {
                // SAFETY: the caller's contract, passed on unchanged.
                unsafe { (**self).all_reduce_sum(stream, buf, count, dtype) }
            }
        }
    )*};
}

shared_collectives!(&C, std::rc::Rc<C>, Arc<C>);

/// [`SyncBatchNorm`]'s own options (the BatchNorm ones are [`BatchNormOptions`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncOptions {
    /// Open every synchronised call with an all-gather of each rank's (ok, channels,
    /// count), read on the host: ranks whose channel counts differ, a global batch of
    /// one value per channel, or a rank whose own checks failed give every rank an
    /// error instead of a hang (default true). This is one host synchronisation per
    /// call; without it a call queues its work and returns, a rank that fails its own
    /// checks returns before its collectives (the others then wait for it), and a
    /// global batch of one value per channel is not refused (its running variance
    /// becomes NaN, where PyTorch raises).
    pub verify: bool,
    /// Synchronise in training even on one rank (default false: PyTorch's module is
    /// the plain BatchNorm there). The numbers are the same to rounding; it runs the
    /// collectives' path where only one GPU is at hand, to test or time it.
    pub force: bool,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            verify: true,
            force: false,
        }
    }
}

/// The device buffers of the collectives, sized for one channel count and world. The
/// gathered rows of a synchronised forward stay until the next one: its backward reads
/// the ranks' counts there.
struct SyncBuffers<A: Float> {
    c: usize,
    world: usize,
    /// This rank's `[mean(C), invstd(C), count]`.
    send: CudaSlice<A>,
    /// Every rank's, rank by rank.
    gathered: CudaSlice<A>,
    /// `[sum_dy(C), sum_dy_xmu(C)]`, all-reduced.
    sums: CudaSlice<A>,
    /// The count `send` holds, once written.
    count: Option<usize>,
}

/// `[ok, channels, count]` of this rank, and of every rank: the opening exchange.
struct Headers {
    world: usize,
    mine: CudaSlice<f64>,
    all: CudaSlice<f64>,
}

const HEADER: usize = 3;

/// PyTorch's SyncBatchNorm checks of an input, before anything else.
fn sync_input(shape: &Shape) -> Result<()> {
    validate::module_rank(0, shape)?;
    if shape.c() == 0 {
        return Err(BnError::ZeroChannels);
    }
    Ok(())
}

/// What a synchronised forward allocates before its exchange and keeps only if every
/// rank goes ahead: collective buffers for a new channel count, save buffers for a
/// module without per-channel state given another one.
struct Staged<A: Float> {
    data: Option<SyncBuffers<A>>,
    save: Option<(CudaSlice<A>, CudaSlice<A>)>,
}

/// `torch.nn.SyncBatchNorm` over [`Collectives`]: in training on more than one rank,
/// the batch statistics cover every rank's batch (each rank normalises with the global
/// mean and invstd and updates its running statistics identically), and the backward
/// sums `sum_dy` and `sum_dy_xmu` over the ranks; the parameter gradients stay local (a
/// data-parallel wrapper all-reduces them, as PyTorch's DDP does). In eval, or on one
/// rank, it is the plain BatchNorm, as PyTorch's is. Uneven batches, an empty one
/// included, take part with their counts.
///
/// Inputs have two or more dimensions (`N, C, ...`, either memory format) on the
/// module's stream; every collective is queued there. Parameters, buffers, modes and
/// the state dict are the local module's ([`local`](Self::local),
/// [`local_mut`](Self::local_mut)); its own forward and backward are the
/// unsynchronised ones.
pub struct SyncBatchNorm<T: Float, P: ParamFor<T>, C: Collectives> {
    bn: BatchNorm<0, Cuda, T, P>,
    comm: C,
    options: SyncOptions,
    data: Option<SyncBuffers<T::Acc>>,
    headers: Option<Headers>,
    /// The last forward was synchronised (its backward is too).
    synced: bool,
}

impl<T: Float, P: ParamFor<T>, C: Collectives> std::fmt::Debug for SyncBatchNorm<T, P, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncBatchNorm")
            .field("module", &self.bn)
            .field("rank", &self.comm.rank())
            .field("world_size", &self.comm.world_size())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// A rank below a world of at least one.
fn check_ranks(comm: &impl Collectives) -> Result<()> {
    let (rank, world) = (comm.rank(), comm.world_size());
    if world == 0 || rank >= world {
        return Err(BnError::RankMismatch(format!(
            "rank {rank} of a world of {world} ranks"
        )));
    }
    Ok(())
}

/// Why [`SyncBatchNorm::from_batch_norm`] did not convert a module, with the module as
/// it was handed in.
pub struct NotConverted<M> {
    /// Why.
    pub error: BnError,
    /// The module, unchanged (boxed: a module is several hundred bytes).
    pub module: Box<M>,
}

impl<M> From<NotConverted<M>> for BnError {
    fn from(e: NotConverted<M>) -> BnError {
        e.error
    }
}

impl<M> std::fmt::Debug for NotConverted<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotConverted")
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl<M> std::fmt::Display for NotConverted<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.error, f)
    }
}

impl<M> std::error::Error for NotConverted<M> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.error)
    }
}

impl<T: Float, P: ParamFor<T>, C: Collectives> SyncBatchNorm<T, P, C> {
    /// A module in training mode with PyTorch's initial parameters and buffers, its
    /// collectives over `comm`.
    pub fn new(
        stream: &Arc<CudaStream>,
        num_features: usize,
        options: BatchNormOptions,
        comm: C,
    ) -> Result<Self> {
        check_ranks(&comm)?;
        let bn = BatchNorm::new(Cuda::new(stream), num_features, options)?;
        Ok(Self::assemble(bn, comm))
    }

    /// `torch.nn.SyncBatchNorm.convert_sync_batchnorm` for one module: `bn`'s
    /// parameters, buffers, counter and mode, synchronised over `comm`. The one error,
    /// a `comm` whose rank is not below its world size, hands `bn` back unchanged
    /// ([`NotConverted`]; `?` makes it the [`BnError`]).
    pub fn from_batch_norm<const D: usize>(
        bn: BatchNorm<D, Cuda, T, P>,
        comm: C,
    ) -> std::result::Result<Self, NotConverted<BatchNorm<D, Cuda, T, P>>> {
        match check_ranks(&comm) {
            Ok(()) => Ok(Self::assemble(bn.with_rank::<0>(), comm)),
            Err(error) => Err(NotConverted {
                error,
                module: Box::new(bn),
            }),
        }
    }

    fn assemble(bn: BatchNorm<0, Cuda, T, P>, comm: C) -> Self {
        SyncBatchNorm {
            bn,
            comm,
            options: SyncOptions::default(),
            data: None,
            headers: None,
            synced: false,
        }
    }

    /// The options of the synchronisation.
    pub fn sync_options(&self) -> SyncOptions {
        self.options
    }

    /// Replaces them.
    pub fn set_sync_options(&mut self, options: SyncOptions) {
        self.options = options;
    }

    /// The local module: parameters, buffers, mode, state dict.
    pub fn local(&self) -> &BatchNorm<0, Cuda, T, P> {
        &self.bn
    }

    /// The local module, mutably (an optimiser's step, `load_state_dict`, `train`,
    /// `eval`). Its own forward and backward do not synchronise.
    pub fn local_mut(&mut self) -> &mut BatchNorm<0, Cuda, T, P> {
        &mut self.bn
    }

    /// The collectives.
    pub fn comm(&self) -> &C {
        &self.comm
    }

    /// The module back as a plain BatchNorm of rank `D`, and its collectives.
    pub fn into_parts<const D: usize>(self) -> (BatchNorm<D, Cuda, T, P>, C) {
        (self.bn.with_rank::<D>(), self.comm)
    }

    /// Training mode.
    pub fn train(&mut self) {
        self.bn.train();
    }

    /// Eval mode (the plain BatchNorm with running statistics).
    pub fn eval(&mut self) {
        self.bn.eval();
    }

    /// PyTorch's `need_sync`: batch statistics in training, on more than one rank (or
    /// [`SyncOptions::force`]).
    fn needs_sync(&self) -> bool {
        self.bn.is_training() && (self.comm.world_size() > 1 || self.options.force)
    }

    fn stream(&self) -> Arc<CudaStream> {
        self.bn.backend().stream().clone()
    }

    /// The forward into a caller's output buffer (`shape.numel()` values).
    pub fn forward_into(
        &mut self,
        input: &dyn DevicePtr<T>,
        shape: &Shape,
        output: &mut dyn DevicePtrMut<T>,
    ) -> Result<()> {
        if !self.needs_sync() {
            sync_input(shape)?;
            self.bn.forward_into(input, shape, output)?;
            self.synced = false;
            return Ok(());
        }
        let stream = self.stream();
        let c = shape.c();
        // Everything that can fail on this rank alone happens before the exchange,
        // which every rank joins whatever its own verdict.
        let local = sync_input(shape)
            .and_then(|()| self.bn.check_sync_forward(input.len(), output.len(), shape))
            .and_then(|()| same_context(&stream, "input", input))
            .and_then(|()| same_context(&stream, "output", &*output))
            .and_then(|()| self.stage(c))
            .and_then(|staged| Ok((staged, self.prepared(&stream, shape)?)));
        let ((staged, (kernels, tuning)), total) = self.open_call(shape, local)?;
        if total.is_some_and(|t| t <= 1.0) {
            return Err(BnError::TooFewValues {
                size: shape.dims().to_vec(),
            });
        }
        if let Some(data) = staged.data {
            self.data = Some(data);
        }
        if let Some((m, i)) = staged.save {
            self.bn.set_save(m, i);
        }
        let launcher = CudaLauncher::new(&stream, &kernels);
        self.sync_forward(&launcher, &tuning, &stream, input, shape, output)?;
        self.bn.finish_sync_forward(shape);
        self.synced = true;
        Ok(())
    }

    /// The forward into a new buffer.
    pub fn forward(&mut self, input: &dyn DevicePtr<T>, shape: &Shape) -> Result<CudaSlice<T>> {
        let out = sync_input(shape)
            .and_then(|()| validate::buffer("input", shape.numel(), input.len(), shape))
            .and_then(|()| self.bn.backend().alloc(shape.numel(), T::from_f64(0.0)));
        match out {
            Ok(mut out) => {
                self.forward_into(input, shape, &mut out)?;
                Ok(out)
            }
            Err(e) => Err(self.abandon(self.needs_sync(), shape, e)),
        }
    }

    /// The kernels and tuning of a call on `shape`, its workspace reserved (before the
    /// exchange, so that a failed allocation is this rank's own verdict).
    fn prepared(
        &mut self,
        stream: &Arc<CudaStream>,
        shape: &Shape,
    ) -> Result<(Arc<Kernels>, Tuning)> {
        prepare(stream, self.bn.parts().workspace, shape, T::DTYPE)
    }

    /// The buffers a synchronised forward on `c` channels needs that it does not have.
    fn stage(&self, c: usize) -> Result<Staged<T::Acc>> {
        let world = self.comm.world_size();
        let backend = self.bn.backend();
        let zero = T::Acc::from_f64(0.0);
        let data = if self
            .data
            .as_ref()
            .is_some_and(|b| b.c == c && b.world == world)
        {
            None
        } else {
            let row = 2 * c + 1;
            Some(SyncBuffers {
                c,
                world,
                send: backend.alloc(row, zero)?,
                gathered: backend.alloc(row.saturating_mul(world), zero)?,
                sums: backend.alloc(2 * c, zero)?,
                count: None,
            })
        };
        let save = if self.bn.save_len() == c {
            None
        } else {
            Some((backend.alloc(c, zero)?, backend.alloc(c, zero)?))
        };
        Ok(Staged { data, save })
    }

    /// A call that fails before its collectives: on the synchronised path (`sync`) the
    /// rank still joins the opening exchange, as a failed rank, so that the others
    /// return too. Returns the error to report.
    fn abandon(&mut self, sync: bool, shape: &Shape, e: BnError) -> BnError {
        if !sync {
            return e;
        }
        match self.open_call::<()>(shape, Err(e)) {
            Err(e) => e,
            Ok(_) => BnError::RankMismatch("a failed call went ahead".into()),
        }
    }

    /// Opens a synchronised call: with [`SyncOptions::verify`], every rank's (ok,
    /// channels, count) gathered and read on the host. Returns this rank's own result
    /// with the global count (None without verify), this rank's own error, or the
    /// error every rank returns when they disagree or another rank failed.
    fn open_call<R>(&mut self, shape: &Shape, local: Result<R>) -> Result<(R, Option<f64>)> {
        if !self.options.verify {
            return local.map(|r| (r, None));
        }
        let stream = self.stream();
        let world = self.comm.world_size();
        if self.headers.as_ref().is_none_or(|h| h.world != world) {
            let backend = self.bn.backend();
            self.headers = Some(Headers {
                world,
                mine: backend.alloc(HEADER, 0.0)?,
                all: backend.alloc(HEADER * world, 0.0)?,
            });
        }
        let Some(h) = self.headers.as_mut() else {
            return Err(BnError::RankMismatch("no header buffers".into()));
        };
        let ok = local.is_ok();
        let mine = [
            f64::from(u8::from(ok)),
            shape.c() as f64,
            shape.per_channel() as f64,
        ];
        stream
            .memcpy_htod(&mine, &mut h.mine)
            .map_err(BnError::driver("copying the rank's header to the device"))?;
        {
            let (send, _gs) = h.mine.device_ptr(&stream);
            let (recv, _gr) = h.all.device_ptr_mut(&stream);
            // SAFETY: both are this module's allocations on the stream's context, of
            // HEADER and HEADER * world values.
            unsafe {
                self.comm
                    .all_gather(&stream, send, recv, HEADER, DType::F64)?;
            }
        }
        let all = stream
            .clone_dtoh(&h.all)
            .map_err(BnError::driver("copying the ranks' headers to the host"))?;
        let r = local?;
        let mut total = 0.0;
        for (rank, h) in all.chunks_exact(HEADER).enumerate() {
            if h[0] != 1.0 {
                return Err(BnError::RankMismatch(format!(
                    "rank {rank}'s call failed its own checks"
                )));
            }
            if h[1] != mine[1] {
                return Err(BnError::RankMismatch(format!(
                    "rank {rank} has {} channels, rank {} has {}",
                    h[1],
                    self.comm.rank(),
                    mine[1]
                )));
            }
            total += h[2];
        }
        Ok((r, Some(total)))
    }

    fn sync_forward(
        &mut self,
        launcher: &CudaLauncher<'_>,
        tuning: &Tuning,
        stream: &Arc<CudaStream>,
        input: &dyn DevicePtr<T>,
        shape: &Shape,
        output: &mut dyn DevicePtrMut<T>,
    ) -> Result<()> {
        let c = shape.c();
        let world = self.comm.world_size();
        let (training, track) = (self.bn.is_training(), self.bn.options().track_running_stats);
        let (momentum, eps) = (self.bn.factor(), self.bn.options().eps);
        let parts = self.bn.parts();
        let Some(b) = self.data.as_mut() else {
            return Err(BnError::Backward(
                "the collectives' buffers were not staged",
            ));
        };
        let acc = std::mem::size_of::<T::Acc>() as u64;
        let count = [T::Acc::from_f64(shape.per_channel() as f64)];
        // 1. This rank's statistics and count.
        {
            let (send, _gs) = b.send.device_ptr_mut(stream);
            if shape.numel() == 0 {
                zero(stream, ZEROING, "statistics", send, 2 * c, acc as usize)?;
            } else {
                let (x, _gx) = input.device_ptr(stream);
                let [(counters, _gc), (scratch, _gsc)] = parts.workspace.ptrs(stream)?;
                let a = raw::ForwardArgs {
                    x,
                    save_mean: send,
                    save_invstd: send + c as u64 * acc,
                    counters,
                    scratch,
                    eps,
                    ..raw::ForwardArgs::default()
                };
                // SAFETY: validation checked the input against the shape; `send` holds
                // 2C + 1 values of this context; the workspace was reserved for the
                // shape before the exchange.
                unsafe { raw::stats::<T, P>(launcher, shape, &a, tuning)? };
            }
        }
        // The statistics launch leaves the count's slot alone: it is written when it
        // changes only, since a copy from pageable host memory waits for the stream.
        if b.count != Some(shape.per_channel()) {
            b.count = None;
            stream
                .memcpy_htod(&count, &mut b.send.slice_mut(2 * c..))
                .map_err(BnError::driver("copying the rank's count to the device"))?;
            b.count = Some(shape.per_channel());
        }
        // 2. Every rank's.
        let row = 2 * c + 1;
        {
            let (send, _gs) = b.send.device_ptr(stream);
            let (recv, _gr) = b.gathered.device_ptr_mut(stream);
            // SAFETY: this module's allocations of `row` and `row * world` values.
            unsafe {
                self.comm
                    .all_gather(stream, send, recv, row, T::Acc::DTYPE)?
            };
        }
        // 3. The global statistics, 4. the normalisation, then the running statistics
        // (last, so that a failed normalisation leaves them as they were).
        let (gathered, _gg) = b.gathered.device_ptr(stream);
        let (mean, _gm) = parts.save_mean.device_ptr_mut(stream);
        let (invstd, _gi) = parts.save_invstd.device_ptr_mut(stream);
        let mut g = raw::GatherArgs {
            means: gathered,
            invstds: gathered + c as u64 * acc,
            counts: gathered + 2 * c as u64 * acc,
            stats_stride: row,
            counts_stride: row,
            ranks: world,
            mean,
            invstd,
            momentum,
            eps,
            ..raw::GatherArgs::default()
        };
        // SAFETY: the gathered rows hold `world` rows of 2C + 1; the module's save
        // buffers hold C (validation).
        unsafe { raw::gather_stats::<T, P>(launcher, c, &g)? };
        if shape.numel() > 0 {
            let (x, _gx) = input.device_ptr(stream);
            let (y, _gy) = output.device_ptr_mut(stream);
            let w = parts.weight.map(|w| w.device_ptr(stream));
            let bias = parts.bias.map(|b| b.device_ptr(stream));
            let [(counters, _gc), (scratch, _gsc)] = parts.workspace.ptrs(stream)?;
            let a = raw::ForwardArgs {
                x,
                y,
                weight: w.as_ref().map_or(0, |w| w.0),
                bias: bias.as_ref().map_or(0, |b| b.0),
                save_mean: mean,
                save_invstd: invstd,
                counters,
                scratch,
                ..raw::ForwardArgs::default()
            };
            // SAFETY: validation checked every length against the shape and C.
            unsafe { raw::elemt::<T, P>(launcher, shape, &a, tuning)? };
        }
        if training && track {
            if let (Some(rm), Some(rv)) = (parts.running_mean, parts.running_var) {
                let (rm, _grm) = rm.device_ptr_mut(stream);
                let (rv, _grv) = rv.device_ptr_mut(stream);
                // The merge again, now updating: its mean and invstd are the ones
                // written above, bit for bit.
                g.running_mean = rm;
                g.running_var = rv;
                // SAFETY: as above; the running statistics hold C (validation).
                unsafe { raw::gather_stats::<T, P>(launcher, c, &g)? };
            }
        }
        Ok(())
    }

    /// The backward of the last forward (same shape), written into the caller's
    /// buffers. Synchronised when that forward was: the all-reduce of the sums is
    /// queued on the module's stream.
    pub fn backward_into(
        &mut self,
        grad_output: &dyn DevicePtr<T>,
        input: &dyn DevicePtr<T>,
        shape: &Shape,
        grad_input: &mut dyn DevicePtrMut<T>,
        grad_weight: Option<&mut dyn DevicePtrMut<P>>,
        grad_bias: Option<&mut dyn DevicePtrMut<P>>,
    ) -> Result<()> {
        if !self.synced {
            return self.bn.backward_into(
                grad_output,
                input,
                shape,
                grad_input,
                grad_weight,
                grad_bias,
            );
        }
        let stream = self.stream();
        let c = shape.c();
        let numel = shape.numel();
        let world = self.comm.world_size();
        let mut local = self.bn.last_forward(shape).map(|_| ()).and_then(|()| {
            // The forward's gathered counts and statistics are still there (a later
            // forward that failed after its exchange may have replaced them).
            if !self
                .data
                .as_ref()
                .is_some_and(|b| b.c == c && b.world == world)
                || self.bn.save_len() != c
            {
                return Err(BnError::Backward(
                    "the last synchronised forward's statistics are gone: run the forward again",
                ));
            }
            validate::buffer("grad_output", numel, grad_output.len(), shape)?;
            validate::buffer("input", numel, input.len(), shape)?;
            validate::buffer("grad_input", numel, grad_input.len(), shape)?;
            same_context(&stream, "grad_output", grad_output)?;
            same_context(&stream, "input", input)?;
            same_context(&stream, "grad_input", &*grad_input)
        });
        if let Some(g) = &grad_weight {
            local = local
                .and_then(|()| validate::feature("grad_weight", c, Some(g.len())))
                .and_then(|()| same_context(&stream, "grad_weight", &**g));
        }
        if let Some(g) = &grad_bias {
            local = local
                .and_then(|()| validate::feature("grad_bias", c, Some(g.len())))
                .and_then(|()| same_context(&stream, "grad_bias", &**g));
        }
        let local = local.and_then(|()| self.prepared(&stream, shape));
        let ((kernels, tuning), _) = self.open_call(shape, local)?;
        let launcher = CudaLauncher::new(&stream, &kernels);
        self.sync_backward(
            &launcher,
            &tuning,
            &stream,
            grad_output,
            input,
            shape,
            grad_input,
            grad_weight,
            grad_bias,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn sync_backward(
        &mut self,
        launcher: &CudaLauncher<'_>,
        tuning: &Tuning,
        stream: &Arc<CudaStream>,
        grad_output: &dyn DevicePtr<T>,
        input: &dyn DevicePtr<T>,
        shape: &Shape,
        grad_input: &mut dyn DevicePtrMut<T>,
        mut grad_weight: Option<&mut dyn DevicePtrMut<P>>,
        mut grad_bias: Option<&mut dyn DevicePtrMut<P>>,
    ) -> Result<()> {
        let c = shape.c();
        let world = self.comm.world_size();
        let parts = self.bn.parts();
        let Some(b) = self.data.as_mut() else {
            return Err(BnError::Backward(
                "the collectives' buffers were not staged",
            ));
        };
        let acc = std::mem::size_of::<T::Acc>();
        let (mean, _gm) = parts.save_mean.device_ptr(stream);
        let (invstd, _gi) = parts.save_invstd.device_ptr(stream);
        let stats = raw::BackwardStats::Batch {
            save_mean: mean,
            save_invstd: invstd,
        };
        let (gw, _ggw) = match grad_weight.as_mut() {
            Some(g) => {
                let (p, guard) = g.device_ptr_mut(stream);
                (p, Some(guard))
            }
            None => (0, None),
        };
        let (gb, _ggb) = match grad_bias.as_mut() {
            Some(g) => {
                let (p, guard) = g.device_ptr_mut(stream);
                (p, Some(guard))
            }
            None => (0, None),
        };
        let (sums, _gs) = b.sums.device_ptr_mut(stream);
        if shape.numel() == 0 {
            zero(stream, ZEROING, "sums", sums, 2 * c, acc)?;
            for (name, p) in [("grad_weight", gw), ("grad_bias", gb)] {
                if p != 0 {
                    zero(stream, ZEROING, name, p, c, std::mem::size_of::<P>())?;
                }
            }
        } else {
            let (dy, _gdy) = grad_output.device_ptr(stream);
            let (x, _gx) = input.device_ptr(stream);
            let [(counters, _gc), (scratch, _gsc)] = parts.workspace.ptrs(stream)?;
            let a = raw::BackwardArgs {
                dy,
                x,
                dx: 0,
                weight: 0,
                stats,
                grad_weight: gw,
                grad_bias: gb,
                counters,
                scratch,
                epilogue: raw::EpilogueGrad::None,
            };
            // SAFETY: validation checked every length against the shape and C; `sums`
            // is this module's buffer of 2C.
            unsafe { raw::backward_reduce::<T, P>(launcher, shape, &a, sums, tuning)? };
        }
        // SAFETY: this module's buffer of 2C values.
        unsafe {
            self.comm
                .all_reduce_sum(stream, sums, 2 * c, T::Acc::DTYPE)?
        };
        if shape.numel() == 0 {
            return Ok(());
        }
        let (dy, _gdy) = grad_output.device_ptr(stream);
        let (x, _gx) = input.device_ptr(stream);
        let (dx, _gdx) = grad_input.device_ptr_mut(stream);
        let w = parts.weight.map(|w| w.device_ptr(stream));
        let (gathered, _gg) = b.gathered.device_ptr(stream);
        let [(counters, _gc), (scratch, _gsc)] = parts.workspace.ptrs(stream)?;
        let a = raw::BackwardArgs {
            dy,
            x,
            dx,
            weight: w.as_ref().map_or(0, |w| w.0),
            stats,
            grad_weight: 0,
            grad_bias: 0,
            counters,
            scratch,
            epilogue: raw::EpilogueGrad::None,
        };
        let row = 2 * c + 1;
        // SAFETY: as above; the counts are the gathered rows' (world rows of 2C + 1).
        unsafe {
            raw::backward_elemt::<T, P>(
                launcher,
                shape,
                &a,
                sums,
                gathered + (2 * c * acc) as u64,
                row,
                world,
                tuning,
            )
        }
    }

    /// The backward into new buffers (parameter gradients for affine modules).
    pub fn backward(
        &mut self,
        grad_output: &dyn DevicePtr<T>,
        input: &dyn DevicePtr<T>,
        shape: &Shape,
    ) -> Result<Gradients<Cuda, T, P>> {
        if !self.synced {
            return self.bn.backward(grad_output, input, shape);
        }
        let grads = self.bn.last_forward(shape).and_then(|_| {
            let backend = self.bn.backend();
            let affine = self.bn.options().affine;
            let c = self.bn.num_features();
            let zero = P::from_f64(0.0);
            let param = || -> Result<Option<CudaSlice<P>>> {
                affine.then(|| backend.alloc(c, zero)).transpose()
            };
            Ok((
                backend.alloc(shape.numel(), T::from_f64(0.0))?,
                param()?,
                param()?,
            ))
        });
        let (mut g_in, mut g_w, mut g_b) = match grads {
            Ok(g) => g,
            Err(e) => return Err(self.abandon(true, shape, e)),
        };
        self.backward_into(
            grad_output,
            input,
            shape,
            &mut g_in,
            g_w.as_mut().map(|g| g as &mut dyn DevicePtrMut<P>),
            g_b.as_mut().map(|g| g as &mut dyn DevicePtrMut<P>),
        )?;
        Ok(Gradients {
            input: g_in,
            weight: g_w,
            bias: g_b,
            residual: None,
        })
    }
}

// ---------------------------------------------------------------------------------------
// NCCL.

#[cfg(feature = "nccl")]
pub use self::nccl::{Nccl, NcclId};

#[cfg(feature = "nccl")]
mod nccl {
    use std::sync::Arc;

    use cudarc::driver::{CudaContext, CudaStream};
    use cudarc::nccl::{result, sys};

    use super::Collectives;
    use crate::dtype::DType;
    use crate::error::{BnError, Result};

    /// A communicator's unique id: made by one rank ([`Nccl::unique_id`]) and handed to
    /// every other by any channel (its bytes, [`NcclId::bytes`] / [`NcclId::from_bytes`]).
    #[derive(Clone, Copy)]
    pub struct NcclId(sys::ncclUniqueId);

    impl std::fmt::Debug for NcclId {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("NcclId(..)")
        }
    }

    impl NcclId {
        /// Its 128 bytes.
        pub fn bytes(&self) -> [u8; 128] {
            self.0.internal.map(|b| b as u8)
        }

        /// The id another rank made, from its bytes.
        pub fn from_bytes(bytes: [u8; 128]) -> NcclId {
            NcclId(sys::ncclUniqueId {
                internal: bytes.map(|b| b as std::ffi::c_char),
            })
        }
    }

    /// [`Collectives`] over an NCCL communicator (cudarc's `nccl` bindings, loaded
    /// dynamically): one rank per GPU, in one process per GPU or one thread per GPU.
    /// Without libnccl every call returns [`BnError::Communication`] saying so.
    pub struct Nccl {
        comm: sys::ncclComm_t,
        rank: usize,
        world: usize,
    }

    // SAFETY: an NCCL communicator may be used from any thread, one call at a time;
    // `&mut`-free use through `&self` is serialised by the caller's stream order and
    // by NCCL itself for the collectives this type issues. It is not Sync.
    unsafe impl Send for Nccl {}

    impl std::fmt::Debug for Nccl {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Nccl")
                .field("rank", &self.rank)
                .field("world_size", &self.world)
                .finish_non_exhaustive()
        }
    }

    fn nccl_err(op: &'static str) -> impl Fn(result::NcclError) -> BnError {
        move |e| BnError::Communication(format!("NCCL error in {op}: {:?}", e.0))
    }

    /// Whether libnccl can be loaded (cudarc's name for it, or the versioned name NVIDIA's
    /// packages install), checked before any cudarc NCCL call, which would panic
    /// without it.
    fn nccl_present() -> Result<()> {
        #[cfg(unix)]
        {
            use std::ffi::{c_char, c_int, c_void};
            extern "C" {
                fn dlopen(filename: *const c_char, flags: c_int) -> *mut c_void;
            }
            const RTLD_LAZY: c_int = 1;
            let found = [c"libnccl.so", c"libnccl.so.2"].iter().any(|name| {
                // SAFETY: dlopen with a NUL-terminated name only loads a library (its
                // initialisers run, as cudarc's loading would run them); the handle is
                // kept.
                !unsafe { dlopen(name.as_ptr(), RTLD_LAZY) }.is_null()
            });
            if found {
                return Ok(());
            }
        }
        Err(BnError::Communication(
            "libnccl was not found: install NCCL (e.g. the nvidia-nccl-cu12 or -cu13 \
             package) and put the directory holding libnccl.so on LD_LIBRARY_PATH"
                .into(),
        ))
    }

    /// Runs a cudarc NCCL call whose library loading may panic (a libnccl under a name
    /// cudarc does not try), as an error.
    fn guarded<R>(op: &'static str, f: impl FnOnce() -> Result<R>) -> Result<R> {
        nccl_present()?;
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
            Err(BnError::Communication(format!(
                "loading libnccl failed in {op} (cudarc looks for libnccl.so)"
            )))
        })
    }

    fn nccl_type(dtype: DType) -> sys::ncclDataType_t {
        match dtype {
            DType::F32 => sys::ncclDataType_t::ncclFloat32,
            DType::F64 => sys::ncclDataType_t::ncclFloat64,
            DType::F16 => sys::ncclDataType_t::ncclFloat16,
            DType::BF16 => sys::ncclDataType_t::ncclBfloat16,
        }
    }

    impl Nccl {
        /// A new communicator's id (on one rank; the others receive it).
        pub fn unique_id() -> Result<NcclId> {
            guarded("ncclGetUniqueId", || {
                result::get_uniqueid()
                    .map(NcclId)
                    .map_err(nccl_err("ncclGetUniqueId"))
            })
        }

        /// NCCL's version (e.g. 22807 for 2.28.7).
        pub fn version() -> Result<i32> {
            guarded("ncclGetVersion", || {
                result::get_nccl_version().map_err(nccl_err("ncclGetVersion"))
            })
        }

        /// This rank's communicator on `ctx`'s device: every rank of `world` calls it
        /// with the same id (it returns once all have joined).
        pub fn from_rank(
            ctx: &Arc<CudaContext>,
            rank: usize,
            world: usize,
            id: NcclId,
        ) -> Result<Nccl> {
            let (r, w) = match (i32::try_from(rank), i32::try_from(world)) {
                (Ok(r), Ok(w)) if rank < world => (r, w),
                _ => {
                    return Err(BnError::RankMismatch(format!(
                        "rank {rank} of a world of {world} ranks"
                    )))
                }
            };
            guarded("ncclCommInitRank", || {
                ctx.bind_to_thread()
                    .map_err(BnError::driver("binding the context"))?;
                let mut comm = std::mem::MaybeUninit::uninit();
                // SAFETY: `comm` is written by the call; the id is a valid unique id
                // (NCCL rejects one that is not).
                unsafe { result::comm_init_rank(comm.as_mut_ptr(), w, id.0, r) }
                    .map_err(nccl_err("ncclCommInitRank"))?;
                Ok(Nccl {
                    // SAFETY: initialised by the successful call above.
                    comm: unsafe { comm.assume_init() },
                    rank,
                    world,
                })
            })
        }
    }

    impl Drop for Nccl {
        fn drop(&mut self) {
            // SAFETY: the communicator is this value's own, used by nothing after this.
            // An error here cannot be reported; the communicator is gone either way.
            let _ = unsafe { result::comm_destroy(self.comm) };
        }
    }

    impl Collectives for Nccl {
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
            dtype: DType,
        ) -> Result<()> {
            // SAFETY: the caller's contract; the stream's context owns both buffers.
            unsafe {
                result::all_gather(
                    send as *const std::ffi::c_void,
                    recv as *mut std::ffi::c_void,
                    count,
                    nccl_type(dtype),
                    self.comm,
                    stream.cu_stream() as sys::cudaStream_t,
                )
            }
            .map(|_| ())
            .map_err(nccl_err("ncclAllGather"))
        }

        unsafe fn all_reduce_sum(
            &self,
            stream: &CudaStream,
            buf: u64,
            count: usize,
            dtype: DType,
        ) -> Result<()> {
            // SAFETY: the caller's contract; in place, as NCCL allows.
            unsafe {
                result::all_reduce(
                    buf as *const std::ffi::c_void,
                    buf as *mut std::ffi::c_void,
                    count,
                    nccl_type(dtype),
                    sys::ncclRedOp_t::ncclSum,
                    self.comm,
                    stream.cu_stream() as sys::cudaStream_t,
                )
            }
            .map(|_| ())
            .map_err(nccl_err("ncclAllReduce"))
        }
    }
}

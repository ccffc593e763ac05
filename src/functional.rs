//! Safe batch-norm functions on cudarc buffers, `torch.nn.functional.batch_norm`'s
//! semantics.
//!
//! * [`batch_norm`]: the general forward, all four modes (training or not, running
//!   statistics or not), the running-statistics update included.
//! * [`batch_norm_eval`]: the eval forward with running statistics, taking only shared
//!   references (for inference servers sharing one model across threads and streams);
//!   no workspace, no allocation, no host synchronisation.
//! * [`batch_norm_backward`]: input, weight and bias gradients, training or eval.
//! * `*_fused`: the same with a fused epilogue ([`Epilogue`]: `relu(bn(x))`,
//!   `relu(bn(x) + z)`) applied in the normalisation pass, and its backward
//!   ([`EpilogueGrad`]: the ReLU's mask from the forward's output, the residual's
//!   gradient written).
//!
//! Every function validates all of its arguments ([`crate::validate`]) before touching
//! the device; an `Err` leaves every buffer as it was. Buffers may be any
//! [`DevicePtr`] / [`DevicePtrMut`] (`CudaSlice`, `CudaView`, `CudaViewMut`), including
//! views at offsets that break 16-byte alignment. They must belong to the stream's
//! context; work is queued on `stream` and nothing waits for it.

use std::sync::Arc;

use cudarc::driver::{
    result, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, SyncOnDrop,
};

use crate::backend::{self, Backend, Len};
use crate::dtype::{DType, Float, ParamFor};
use crate::error::{BnError, Result};
use crate::kernels::{CudaLauncher, Kernels};
use crate::launch::Tuning;
use crate::raw::{self, WorkspaceSize};
use crate::shape::Shape;
use crate::validate::{self, ForwardKind, ForwardSpec};

/// Memory the training forward and the backward need: counters that coordinate the
/// blocks of a reduction (zeroed once, kept zero by the kernels) and scratch for
/// per-split partial results. Reuse one per stream; [`Workspace::for_shape`] sizes one
/// in advance so that later calls on that shape allocate nothing.
#[derive(Debug, Default)]
pub struct Workspace {
    counters: Option<CudaSlice<u32>>,
    scratch: Option<CudaSlice<u8>>,
}

impl Workspace {
    /// An empty workspace; the first call that needs one allocates it.
    pub const fn new() -> Workspace {
        Workspace {
            counters: None,
            scratch: None,
        }
    }

    /// A workspace large enough for every call on `shape` with input type `input`.
    pub fn for_shape(stream: &Arc<CudaStream>, shape: &Shape, input: DType) -> Result<Workspace> {
        let mut ws = Workspace::new();
        ws.reserve(stream, workspace_size(stream, shape, input)?)?;
        Ok(ws)
    }

    /// Current size: (counters, scratch bytes).
    pub fn size(&self) -> WorkspaceSize {
        WorkspaceSize {
            counters: self.counters.as_ref().map_or(0, |b| b.len()),
            scratch_bytes: self.scratch.as_ref().map_or(0, |b| b.len()),
        }
    }

    /// Grows to at least `size` (new memory zeroed), keeping allocations that are large
    /// enough and belong to the stream's context.
    pub fn reserve(&mut self, stream: &Arc<CudaStream>, size: WorkspaceSize) -> Result<()> {
        fn fits<E>(b: &Option<CudaSlice<E>>, len: usize, stream: &CudaStream) -> bool {
            b.as_ref().is_some_and(|b| {
                b.len() >= len && b.stream().context().cu_ctx() == stream.context().cu_ctx()
            })
        }
        // At least one element each, so that the addresses exist.
        let counters = size.counters.max(1);
        let scratch = size.scratch_bytes.max(1);
        if !fits(&self.counters, counters, stream) {
            self.counters = Some(
                stream
                    .alloc_zeros::<u32>(counters)
                    .map_err(BnError::driver("allocating the workspace"))?,
            );
        }
        if !fits(&self.scratch, scratch, stream) {
            self.scratch = Some(
                stream
                    .alloc_zeros::<u8>(scratch)
                    .map_err(BnError::driver("allocating the workspace"))?,
            );
        }
        Ok(())
    }

    /// Device addresses of the counters and the scratch, with their cudarc guards.
    pub(crate) fn ptrs<'a>(
        &'a mut self,
        stream: &'a CudaStream,
    ) -> Result<[(u64, SyncOnDrop<'a>); 2]> {
        let missing = || BnError::Backward("the workspace was not reserved");
        let counters = self.counters.as_mut().ok_or_else(missing)?;
        let scratch = self.scratch.as_mut().ok_or_else(missing)?;
        Ok([
            counters.device_ptr_mut(stream),
            scratch.device_ptr_mut(stream),
        ])
    }
}

/// The workspace any forward or backward call on `shape` needs on `stream`'s device.
pub fn workspace_size(
    stream: &Arc<CudaStream>,
    shape: &Shape,
    input: DType,
) -> Result<WorkspaceSize> {
    let kernels = Kernels::for_context(stream.context())?;
    let launcher = CudaLauncher::new(stream, &kernels);
    raw::workspace_size(&launcher, shape, input, &kernels.tuning())
}

/// The planner's knobs for every call on `stream`'s context: the embedded tuning table
/// for its device (bench/tuning/, matched by name) and no forced family, unless
/// [`set_tuning`] changed them.
pub fn tuning(stream: &Arc<CudaStream>) -> Result<Tuning> {
    Ok(Kernels::for_context(stream.context())?.tuning())
}

/// Replaces the planner's knobs for every later call on `stream`'s context, from any
/// thread: to force a kernel family (`Tuning { variant: Some(..), .. }`: a call it cannot
/// take then fails with [`BnError::VariantUnavailable`]) or to plan with a table just
/// measured. For benchmarks and tests; programs keep the default. A workspace sized
/// before must be sized again ([`Workspace::for_shape`]) if the new family needs more.
pub fn set_tuning(stream: &Arc<CudaStream>, tuning: Tuning) -> Result<()> {
    Kernels::for_context(stream.context())?.set_tuning(tuning);
    Ok(())
}

/// The CUDA backend: a stream, on whose context every buffer of a call must live.
#[derive(Clone, Debug)]
pub struct Cuda {
    stream: Arc<CudaStream>,
}

impl Cuda {
    /// A backend that queues its work on `stream`.
    pub fn new(stream: &Arc<CudaStream>) -> Cuda {
        Cuda {
            stream: stream.clone(),
        }
    }

    /// The stream.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl<E> Len for dyn DevicePtr<E> + '_ {
    fn len(&self) -> usize {
        DeviceSlice::len(self)
    }
}

impl<E> Len for dyn DevicePtrMut<E> + '_ {
    fn len(&self) -> usize {
        DeviceSlice::len(self)
    }
}

/// `torch.nn.functional.batch_norm`'s arguments on CUDA buffers.
pub type Forward<'a, T, P> = backend::Forward<'a, Cuda, T, P>;
/// Where a training forward leaves its batch statistics.
pub type SaveStats<'a, A> = backend::SaveStats<'a, Cuda, A>;
/// A backward's inputs on CUDA buffers.
pub type Backward<'a, T, P> = backend::Backward<'a, Cuda, T, P>;
/// The statistics a backward differentiates through.
pub type BackwardStats<'a, A, P> = backend::BackwardStats<'a, Cuda, A, P>;
/// A backward's outputs on CUDA buffers.
pub type Grads<'a, T, P> = backend::Grads<'a, Cuda, T, P>;
/// A frozen BatchNorm call's arguments on CUDA buffers.
pub type Frozen<'a, T> = backend::Frozen<'a, Cuda, T>;
/// A fused epilogue on CUDA buffers.
pub type Epilogue<'a, T> = backend::Epilogue<'a, Cuda, T>;
/// A fused epilogue's backward on CUDA buffers.
pub type EpilogueGrad<'a, T> = backend::EpilogueGrad<'a, Cuda, T>;

/// The eval forward's arguments: running statistics, no state changes.
pub struct Eval<'a, T: Float, P: ParamFor<T>> {
    /// Input.
    pub input: &'a dyn DevicePtr<T>,
    /// Its size and memory format.
    pub shape: Shape,
    /// Running mean (C).
    pub running_mean: &'a dyn DevicePtr<P>,
    /// Running variance (C).
    pub running_var: &'a dyn DevicePtr<P>,
    /// Scale (C); absent means 1.
    pub weight: Option<&'a dyn DevicePtr<P>>,
    /// Shift (C); absent means 0.
    pub bias: Option<&'a dyn DevicePtr<P>>,
    /// Added to the variance.
    pub eps: f64,
}

impl Backend for Cuda {
    type Tensor<'t, E: Float> = dyn DevicePtr<E> + 't;
    type TensorMut<'t, E: Float> = dyn DevicePtrMut<E> + 't;
    type Buffer<E: Float> = CudaSlice<E>;
    type Workspace = Workspace;

    fn torch_type(dtype: DType) -> String {
        crate::dtype::torch_tensor_type(dtype, "torch.cuda")
    }

    fn alloc<E: Float>(&self, len: usize, fill: E) -> Result<CudaSlice<E>> {
        // cudarc multiplies len by the element size unchecked.
        let elem_bytes = std::mem::size_of::<E>();
        if len
            .checked_mul(elem_bytes)
            .is_none_or(|b| b > isize::MAX as usize)
        {
            return Err(BnError::DeviceAllocTooLarge { len, elem_bytes });
        }
        if len == 0 {
            return empty_slice(&self.stream);
        }
        // Zeros (every output a module allocates) are a device memset, not a host
        // vector copied over the bus on each call.
        let r = if fill.to_f64().to_bits() == 0 {
            self.stream.alloc_zeros(len)
        } else {
            self.stream.clone_htod(&crate::cpu::host_vec(len, fill)?)
        };
        r.map_err(BnError::driver("allocating a buffer"))
    }

    fn upload<E: Float>(&self, values: &[E]) -> Result<CudaSlice<E>> {
        if values.is_empty() {
            return empty_slice(&self.stream);
        }
        // One copy, no fill first.
        self.stream
            .clone_htod(values)
            .map_err(BnError::driver("copying a buffer to the device"))
    }

    fn buffer_len<E: Float>(b: &CudaSlice<E>) -> usize {
        b.len()
    }

    fn tensor<E: Float>(b: &CudaSlice<E>) -> &(dyn DevicePtr<E> + '_) {
        b
    }

    fn tensor_mut<E: Float>(b: &mut CudaSlice<E>) -> &mut (dyn DevicePtrMut<E> + '_) {
        b
    }

    fn reborrow<'s, 'l: 's, E: Float>(
        t: &'s (dyn DevicePtr<E> + 'l),
    ) -> &'s (dyn DevicePtr<E> + 's) {
        t
    }

    fn reborrow_mut<'s, 'l: 's, E: Float>(
        t: &'s mut (dyn DevicePtrMut<E> + 'l),
    ) -> &'s mut (dyn DevicePtrMut<E> + 's) {
        t
    }

    fn to_host<E: Float>(&self, b: &CudaSlice<E>) -> Result<Vec<E>> {
        if b.is_empty() {
            return Ok(Vec::new());
        }
        self.stream
            .clone_dtoh(b)
            .map_err(BnError::driver("copying a buffer to the host"))
    }

    fn copy_from_host<E: Float>(&self, b: &mut CudaSlice<E>, v: &[E]) -> Result<()> {
        validate::copy_length(b.len(), v.len())?;
        if v.is_empty() {
            return Ok(());
        }
        self.stream
            .memcpy_htod(v, b)
            .map_err(BnError::driver("copying a buffer to the device"))
    }

    fn batch_norm_fused<T: Float, P: ParamFor<T>>(
        &self,
        args: Forward<'_, T, P>,
        epilogue: Option<Epilogue<'_, T>>,
        output: &mut (dyn DevicePtrMut<T> + '_),
        save: Option<SaveStats<'_, T::Acc>>,
        workspace: &mut Workspace,
    ) -> Result<()> {
        batch_norm_fused(&self.stream, args, epilogue, output, save, workspace)
    }

    fn batch_norm_backward_fused<T: Float, P: ParamFor<T>>(
        &self,
        args: Backward<'_, T, P>,
        epilogue: Option<EpilogueGrad<'_, T>>,
        grads: Grads<'_, T, P>,
        workspace: &mut Workspace,
    ) -> Result<()> {
        batch_norm_backward_fused(&self.stream, args, epilogue, grads, workspace)
    }

    fn batch_norm_frozen_fused<T: Float>(
        &self,
        args: Frozen<'_, T>,
        epilogue: Option<Epilogue<'_, T>>,
        output: &mut (dyn DevicePtrMut<T> + '_),
    ) -> Result<()> {
        batch_norm_frozen_fused(&self.stream, args, epilogue, output)
    }

    fn batch_norm_frozen_backward_fused<T: Float>(
        &self,
        args: Frozen<'_, T>,
        epilogue: Option<EpilogueGrad<'_, T>>,
        grad_input: &mut (dyn DevicePtrMut<T> + '_),
    ) -> Result<()> {
        batch_norm_frozen_backward_fused(&self.stream, args, epilogue, grad_input)
    }
}

/// Checks that an epilogue's buffers belong to the stream's context.
fn epilogue_context<T: Float>(stream: &CudaStream, e: &Option<Epilogue<'_, T>>) -> Result<()> {
    match e {
        Some(backend::Epilogue::AddRelu { residual }) => {
            same_context(stream, "residual", *residual)
        }
        _ => Ok(()),
    }
}

/// Checks that a backward epilogue's buffers belong to the stream's context.
fn epilogue_grad_context<T: Float>(
    stream: &CudaStream,
    e: &Option<EpilogueGrad<'_, T>>,
) -> Result<()> {
    match e {
        None => Ok(()),
        Some(backend::EpilogueGrad::Relu { output }) => same_context(stream, "output", *output),
        Some(backend::EpilogueGrad::AddRelu {
            output,
            grad_residual,
        }) => {
            same_context(stream, "output", *output)?;
            same_context(stream, "grad_residual", &**grad_residual)
        }
    }
}

/// An epilogue's raw form, with the guard of the residual it reads.
fn raw_epilogue<'a, T: Float>(
    e: &'a Option<Epilogue<'_, T>>,
    stream: &'a CudaStream,
) -> (raw::Epilogue, Option<SyncOnDrop<'a>>) {
    match e {
        None => (raw::Epilogue::None, None),
        Some(backend::Epilogue::Relu) => (raw::Epilogue::Relu, None),
        Some(backend::Epilogue::AddRelu { residual }) => {
            let (p, g) = residual.device_ptr(stream);
            (raw::Epilogue::AddRelu { residual: p }, Some(g))
        }
    }
}

/// A backward epilogue's raw form, with the guards of the output it reads and the
/// residual gradient it writes.
fn raw_epilogue_grad<'a, T: Float>(
    e: &'a mut Option<EpilogueGrad<'_, T>>,
    stream: &'a CudaStream,
) -> (raw::EpilogueGrad, [Option<SyncOnDrop<'a>>; 2]) {
    match e {
        None => (raw::EpilogueGrad::None, [None, None]),
        Some(backend::EpilogueGrad::Relu { output }) => {
            let (p, g) = output.device_ptr(stream);
            (raw::EpilogueGrad::Relu { output: p }, [Some(g), None])
        }
        Some(backend::EpilogueGrad::AddRelu {
            output,
            grad_residual,
        }) => {
            let (p, g) = output.device_ptr(stream);
            let (r, gr) = grad_residual.device_ptr_mut(stream);
            (
                raw::EpilogueGrad::AddRelu {
                    output: p,
                    grad_residual: r,
                },
                [Some(g), Some(gr)],
            )
        }
    }
}

/// Zeroes `len` elements of `elem_bytes` at `addr` on the stream (`name` for a size
/// that cannot be represented, `op` for a driver error). The caller passes a live allocation of the stream's
/// context of at least that many elements, kept alive by its guard until this is
/// queued.
pub(crate) fn zero(
    stream: &CudaStream,
    op: &'static str,
    name: &'static str,
    addr: u64,
    len: usize,
    elem_bytes: usize,
) -> Result<()> {
    let bytes = raw::byte_count(name, len, elem_bytes)? as usize;
    if bytes == 0 {
        return Ok(());
    }
    // SAFETY: the caller's contract above: `addr` holds at least `bytes` bytes of this
    // context and outlives the queued memset.
    unsafe { result::memset_d8_async(addr, 0, bytes, stream.cu_stream()) }
        .map_err(BnError::driver(op))
}

/// A buffer of no elements. The driver refuses zero-byte allocations, so it owns one
/// element that it does not count (freed with it).
fn empty_slice<E: Float>(stream: &Arc<CudaStream>) -> Result<CudaSlice<E>> {
    let one = stream
        .alloc_zeros::<E>(1)
        .map_err(BnError::driver("allocating a buffer"))?;
    let ptr = one.leak();
    // SAFETY: `ptr` is a live allocation of this stream's context that nothing else owns
    // (leaked just above); a slice of length 0 never reads or writes it, and frees it
    // when dropped.
    Ok(unsafe { stream.upgrade_device_ptr(ptr, 0) })
}

pub(crate) fn same_context<T, B: DeviceSlice<T> + ?Sized>(
    stream: &CudaStream,
    name: &'static str,
    b: &B,
) -> Result<()> {
    if b.stream().context().cu_ctx() == stream.context().cu_ctx() {
        Ok(())
    } else {
        Err(BnError::ContextMismatch { name })
    }
}

/// Device address of an optional buffer read by the launch, with its cudarc guard.
pub(crate) fn read<'a, T>(
    b: &'a Option<&'a (dyn DevicePtr<T> + 'a)>,
    stream: &'a CudaStream,
) -> (u64, Option<SyncOnDrop<'a>>) {
    match b {
        Some(b) => {
            let (p, g) = b.device_ptr(stream);
            (p, Some(g))
        }
        None => (0, None),
    }
}

/// Device address of an optional buffer written by the launch, with its cudarc guard.
pub(crate) fn write<'a, 'b: 'a, T>(
    b: &'a mut Option<&'b mut (dyn DevicePtrMut<T> + 'b)>,
    stream: &'a CudaStream,
) -> (u64, Option<SyncOnDrop<'a>>) {
    match b {
        Some(b) => {
            let (p, g) = b.device_ptr_mut(stream);
            (p, Some(g))
        }
        None => (0, None),
    }
}

/// The kernels of the stream's context and the tuning to plan with, after growing the
/// workspace for `shape` if it is too small.
pub(crate) fn prepare(
    stream: &Arc<CudaStream>,
    workspace: &mut Workspace,
    shape: &Shape,
    input: DType,
) -> Result<(Arc<Kernels>, Tuning)> {
    let kernels = Kernels::for_context(stream.context())?;
    let tuning = kernels.tuning();
    let launcher = CudaLauncher::new(stream, &kernels);
    let size = raw::workspace_size(&launcher, shape, input, &tuning)?;
    workspace.reserve(stream, size)?;
    Ok((kernels, tuning))
}

/// The forward of `torch.nn.functional.batch_norm`: batch statistics when `training`
/// (updating the running statistics if given, and writing `save` if given), running
/// statistics otherwise.
pub fn batch_norm<T: Float, P: ParamFor<T>>(
    stream: &Arc<CudaStream>,
    args: Forward<'_, T, P>,
    output: &mut dyn DevicePtrMut<T>,
    save: Option<SaveStats<'_, T::Acc>>,
    workspace: &mut Workspace,
) -> Result<()> {
    batch_norm_fused(stream, args, None, output, save, workspace)
}

/// [`batch_norm`] with a fused epilogue: the normalisation pass writes
/// `relu(bn(x))` or `relu(bn(x) + z)` (one read of x and z, one write of y).
pub fn batch_norm_fused<T: Float, P: ParamFor<T>>(
    stream: &Arc<CudaStream>,
    args: Forward<'_, T, P>,
    epilogue: Option<Epilogue<'_, T>>,
    output: &mut dyn DevicePtrMut<T>,
    save: Option<SaveStats<'_, T::Acc>>,
    workspace: &mut Workspace,
) -> Result<()> {
    backend::validate_epilogue(&epilogue, &args.shape)?;
    let ForwardKind::Run {
        batch_stats,
        update_running,
    } = args.validate(&*output, save.as_ref())?
    else {
        return Ok(());
    };
    let backend::Forward {
        input,
        shape,
        mut running_mean,
        mut running_var,
        weight,
        bias,
        momentum,
        eps,
        ..
    } = args;
    same_context(stream, "input", input)?;
    same_context(stream, "output", &*output)?;
    for (name, b) in [("weight", weight), ("bias", bias)] {
        if let Some(b) = b {
            same_context(stream, name, b)?;
        }
    }
    for (name, b) in [
        ("running_mean", &running_mean),
        ("running_var", &running_var),
    ] {
        if let Some(b) = b {
            same_context(stream, name, &**b)?;
        }
    }
    if let Some(s) = &save {
        same_context(stream, "save_mean", &*s.mean)?;
        same_context(stream, "save_invstd", &*s.invstd)?;
    }
    epilogue_context(stream, &epilogue)?;
    let (kernels, tuning) = prepare(stream, workspace, &shape, T::DTYPE)?;
    let (ep, _gz) = raw_epilogue(&epilogue, stream);

    let (x, _gx) = input.device_ptr(stream);
    let (y, _gy) = output.device_ptr_mut(stream);
    let (w, _gw) = read(&weight, stream);
    let (b, _gb) = read(&bias, stream);
    let (rm, _grm) = write(&mut running_mean, stream);
    let (rv, _grv) = write(&mut running_var, stream);
    let (mut save_mean, mut save_invstd) = match save {
        Some(s) => (Some(s.mean), Some(s.invstd)),
        None => (None, None),
    };
    let (sm, _gsm) = write(&mut save_mean, stream);
    let (si, _gsi) = write(&mut save_invstd, stream);
    let [(counters, _gc), (scratch, _gs)] = workspace.ptrs(stream)?;
    let a = raw::ForwardArgs {
        x,
        y,
        weight: w,
        bias: b,
        running_mean: rm,
        running_var: rv,
        save_mean: sm,
        save_invstd: si,
        counters,
        scratch,
        batch_stats,
        update_running,
        eps,
        momentum,
        frozen: 0,
        epilogue: ep,
    };
    // SAFETY: validation checked every buffer's length against the shape and that all
    // belong to the stream's context; the guards above keep them alive and ordered until
    // the launches are queued; the workspace was reserved for this shape.
    unsafe { raw::forward::<T, P>(&CudaLauncher::new(stream, &kernels), &shape, &a, &tuning) }
}

/// The eval forward: `(x - running_mean) / sqrt(running_var + eps) * weight + bias`.
/// Takes shared references only, needs no workspace and allocates nothing.
pub fn batch_norm_eval<T: Float, P: ParamFor<T>>(
    stream: &Arc<CudaStream>,
    args: Eval<'_, T, P>,
    output: &mut dyn DevicePtrMut<T>,
) -> Result<()> {
    batch_norm_eval_fused(stream, args, None, output)
}

/// [`batch_norm_eval`] with a fused epilogue, in the one pass: `relu(bn(x))` reads x
/// and writes y, `relu(bn(x) + z)` reads x and z and writes y.
pub fn batch_norm_eval_fused<T: Float, P: ParamFor<T>>(
    stream: &Arc<CudaStream>,
    args: Eval<'_, T, P>,
    epilogue: Option<Epilogue<'_, T>>,
    output: &mut dyn DevicePtrMut<T>,
) -> Result<()> {
    backend::validate_epilogue(&epilogue, &args.shape)?;
    let Eval {
        input,
        shape,
        running_mean,
        running_var,
        weight,
        bias,
        eps,
    } = args;
    let spec = ForwardSpec {
        shape,
        training: false,
        eps,
        momentum: 0.0,
        input: input.len(),
        output: output.len(),
        weight: weight.map(|b| b.len()),
        bias: bias.map(|b| b.len()),
        running_mean: Some(running_mean.len()),
        running_var: Some(running_var.len()),
        save_mean: None,
        save_invstd: None,
    };
    if validate::forward(&spec)? == ForwardKind::Empty {
        return Ok(());
    }
    same_context(stream, "input", input)?;
    same_context(stream, "output", &*output)?;
    for (name, b) in [
        ("running_mean", Some(running_mean)),
        ("running_var", Some(running_var)),
        ("weight", weight),
        ("bias", bias),
    ] {
        if let Some(b) = b {
            same_context(stream, name, b)?;
        }
    }
    epilogue_context(stream, &epilogue)?;
    let kernels = Kernels::for_context(stream.context())?;
    let (ep, _gz) = raw_epilogue(&epilogue, stream);
    let (x, _gx) = input.device_ptr(stream);
    let (y, _gy) = output.device_ptr_mut(stream);
    let (rm, _grm) = running_mean.device_ptr(stream);
    let (rv, _grv) = running_var.device_ptr(stream);
    let (w, _gw) = read(&weight, stream);
    let (b, _gb) = read(&bias, stream);
    let a = raw::ForwardArgs {
        x,
        y,
        weight: w,
        bias: b,
        running_mean: rm,
        running_var: rv,
        eps,
        epilogue: ep,
        ..raw::ForwardArgs::default()
    };
    // SAFETY: as in batch_norm; the eval path uses no workspace.
    unsafe {
        raw::forward::<T, P>(
            &CudaLauncher::new(stream, &kernels),
            &shape,
            &a,
            &kernels.tuning(),
        )
    }
}

/// A frozen BatchNorm's forward, `y = x * scale + shift` per channel with the
/// coefficients of [`crate::frozen::coefficients`]: one read of x, one write of y, a
/// multiply-add per element. Shared references only, on any stream of the buffers'
/// context; needs no workspace, allocates nothing on the device and never waits for the
/// stream, so it can be captured into a CUDA graph.
pub fn batch_norm_frozen<T: Float>(
    stream: &Arc<CudaStream>,
    args: Frozen<'_, T>,
    output: &mut dyn DevicePtrMut<T>,
) -> Result<()> {
    frozen_call(stream, &args, output, FrozenPass::Forward(None))
}

/// [`batch_norm_frozen`] with a fused epilogue: `relu(x * scale + shift [+ z])` in the
/// one pass, as capturable as the plain call.
pub fn batch_norm_frozen_fused<T: Float>(
    stream: &Arc<CudaStream>,
    args: Frozen<'_, T>,
    epilogue: Option<Epilogue<'_, T>>,
    output: &mut dyn DevicePtrMut<T>,
) -> Result<()> {
    frozen_call(stream, &args, output, FrozenPass::Forward(epilogue))
}

/// Its backward, `dx = dy * scale` per channel (`args.input` is dy).
pub fn batch_norm_frozen_backward<T: Float>(
    stream: &Arc<CudaStream>,
    args: Frozen<'_, T>,
    grad_input: &mut dyn DevicePtrMut<T>,
) -> Result<()> {
    frozen_call(stream, &args, grad_input, FrozenPass::Backward(None))
}

/// The frozen backward of a fused forward: `dx = mask(dy) * scale`, the residual's
/// gradient `mask(dy)` written for [`EpilogueGrad::AddRelu`].
pub fn batch_norm_frozen_backward_fused<T: Float>(
    stream: &Arc<CudaStream>,
    args: Frozen<'_, T>,
    epilogue: Option<EpilogueGrad<'_, T>>,
    grad_input: &mut dyn DevicePtrMut<T>,
) -> Result<()> {
    frozen_call(stream, &args, grad_input, FrozenPass::Backward(epilogue))
}

enum FrozenPass<'a, T: Float> {
    Forward(Option<Epilogue<'a, T>>),
    Backward(Option<EpilogueGrad<'a, T>>),
}

fn frozen_call<T: Float>(
    stream: &Arc<CudaStream>,
    args: &Frozen<'_, T>,
    output: &mut dyn DevicePtrMut<T>,
    mut pass: FrozenPass<'_, T>,
) -> Result<()> {
    match &pass {
        FrozenPass::Forward(e) => backend::validate_epilogue(e, &args.shape)?,
        FrozenPass::Backward(e) => backend::validate_epilogue_grad(e, &args.shape)?,
    }
    if !args.validate(output)? {
        return Ok(());
    }
    same_context(stream, "input", args.input)?;
    same_context(stream, "output", &*output)?;
    same_context(stream, "scale_shift", args.scale_shift)?;
    match &pass {
        FrozenPass::Forward(e) => epilogue_context(stream, e)?,
        FrozenPass::Backward(e) => epilogue_grad_context(stream, e)?,
    }
    let kernels = Kernels::for_context(stream.context())?;
    let launcher = CudaLauncher::new(stream, &kernels);
    let (input, _gi) = args.input.device_ptr(stream);
    let (out, _go) = output.device_ptr_mut(stream);
    let (coeffs, _gc) = args.scale_shift.device_ptr(stream);
    let shape = args.shape;
    // Frozen calls have no parameter type of their own: the kernels of (T, T) read
    // T::Acc coefficients, which is all a frozen launch reads per channel.
    if let FrozenPass::Forward(e) = &pass {
        let (epilogue, _gz) = raw_epilogue(e, stream);
        let a = raw::ForwardArgs {
            x: input,
            y: out,
            frozen: coeffs,
            epilogue,
            ..raw::ForwardArgs::default()
        };
        // SAFETY: validation checked the input, output and coefficient lengths against
        // the shape and that all belong to the stream's context; the guards keep them
        // alive and ordered until the launch is queued; a frozen eval uses no workspace.
        unsafe { raw::forward::<T, T::Native>(&launcher, &shape, &a, &kernels.tuning()) }
    } else {
        let FrozenPass::Backward(e) = &mut pass else {
            unreachable!("the forward returned above")
        };
        let (epilogue, _ge) = raw_epilogue_grad(e, stream);
        let a = raw::BackwardArgs {
            dy: input,
            x: 0,
            dx: out,
            weight: 0,
            stats: raw::BackwardStats::Frozen {
                scale_shift: coeffs,
            },
            grad_weight: 0,
            grad_bias: 0,
            counters: 0,
            scratch: 0,
            epilogue,
        };
        // SAFETY: as above; the eval dx launch reads dy and the coefficients only.
        unsafe { raw::backward::<T, T::Native>(&launcher, &shape, &a, &kernels.tuning()) }
    }
}

/// The backward: `grads.input` always, `grads.weight` / `grads.bias` when given.
pub fn batch_norm_backward<T: Float, P: ParamFor<T>>(
    stream: &Arc<CudaStream>,
    args: Backward<'_, T, P>,
    grads: Grads<'_, T, P>,
    workspace: &mut Workspace,
) -> Result<()> {
    batch_norm_backward_fused(stream, args, None, grads, workspace)
}

/// The backward of [`batch_norm_fused`] / [`batch_norm_eval_fused`]: `args.grad_output`
/// is the gradient of the epilogue's output; both passes mask it by the forward's
/// output, and the dx pass writes the residual's gradient.
pub fn batch_norm_backward_fused<T: Float, P: ParamFor<T>>(
    stream: &Arc<CudaStream>,
    args: Backward<'_, T, P>,
    mut epilogue: Option<EpilogueGrad<'_, T>>,
    grads: Grads<'_, T, P>,
    workspace: &mut Workspace,
) -> Result<()> {
    backend::validate_epilogue_grad(&epilogue, &args.shape)?;
    let run = args.validate(&grads)?;
    let backend::Backward {
        grad_output,
        input,
        shape,
        weight,
        stats,
    } = args;
    let backend::Grads {
        input: grad_input,
        weight: mut grad_weight,
        bias: mut grad_bias,
    } = grads;
    same_context(stream, "grad_output", grad_output)?;
    same_context(stream, "input", input)?;
    same_context(stream, "grad_input", &*grad_input)?;
    if let Some(w) = weight {
        same_context(stream, "weight", w)?;
    }
    for (name, g) in [("grad_weight", &grad_weight), ("grad_bias", &grad_bias)] {
        if let Some(g) = g {
            same_context(stream, name, &**g)?;
        }
    }
    match &stats {
        BackwardStats::Batch {
            save_mean,
            save_invstd,
        } => {
            same_context(stream, "save_mean", *save_mean)?;
            same_context(stream, "save_invstd", *save_invstd)?;
        }
        BackwardStats::Running { mean, var, .. } => {
            same_context(stream, "running_mean", *mean)?;
            same_context(stream, "running_var", *var)?;
        }
    }
    epilogue_grad_context(stream, &epilogue)?;
    if !run {
        // Empty input: the parameter gradients are zero, as in PyTorch.
        for g in [&mut grad_weight, &mut grad_bias].into_iter().flatten() {
            let len = g.len();
            let (p, _guard) = g.device_ptr_mut(stream);
            let op = "zeroing parameter gradients";
            zero(stream, op, "grad_weight", p, len, std::mem::size_of::<P>())?;
        }
        return Ok(());
    }
    let (kernels, tuning) = prepare(stream, workspace, &shape, T::DTYPE)?;
    let (dy, _gdy) = grad_output.device_ptr(stream);
    let (x, _gx) = input.device_ptr(stream);
    let (dx, _gdx) = grad_input.device_ptr_mut(stream);
    let (w, _gw) = read(&weight, stream);
    let (gw, _ggw) = write(&mut grad_weight, stream);
    let (gb, _ggb) = write(&mut grad_bias, stream);
    let (s0, _gs0, s1, _gs1, raw_stats);
    match &stats {
        BackwardStats::Batch {
            save_mean,
            save_invstd,
        } => {
            (s0, _gs0) = save_mean.device_ptr(stream);
            (s1, _gs1) = save_invstd.device_ptr(stream);
            raw_stats = raw::BackwardStats::Batch {
                save_mean: s0,
                save_invstd: s1,
            };
        }
        BackwardStats::Running { mean, var, eps } => {
            (s0, _gs0) = mean.device_ptr(stream);
            (s1, _gs1) = var.device_ptr(stream);
            raw_stats = raw::BackwardStats::Running {
                mean: s0,
                var: s1,
                eps: *eps,
            };
        }
    }
    let [(counters, _gc), (scratch, _gs)] = workspace.ptrs(stream)?;
    let (ep, _ge) = raw_epilogue_grad(&mut epilogue, stream);
    let a = raw::BackwardArgs {
        dy,
        x,
        dx,
        weight: w,
        stats: raw_stats,
        grad_weight: gw,
        grad_bias: gb,
        counters,
        scratch,
        epilogue: ep,
    };
    // SAFETY: validation checked every length against the shape and the contexts; the
    // guards keep the buffers alive and ordered until the launches are queued.
    unsafe { raw::backward::<T, P>(&CudaLauncher::new(stream, &kernels), &shape, &a, &tuning) }
}

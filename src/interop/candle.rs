//! BatchNorm for [candle](https://github.com/huggingface/candle) models, on this crate's
//! kernels (feature `candle`; the CUDA path with `candle-cuda`).
//!
//! [`BatchNorm`] is a drop-in for `candle_nn::BatchNorm` ([`batch_norm`] takes the same
//! arguments as `candle_nn::batch_norm`, and it implements [`ModuleT`]): the training
//! forward (batch statistics, running statistics updated), the eval forward, and the
//! backward through candle's autograd, each a candle custom op. On a CUDA device the op
//! runs this crate's kernels on the tensors' own device memory (candle's `CudaStorage`
//! holds a cudarc `CudaSlice`, its device a `CudaStream`): nothing is copied and nothing
//! of candle's own kernels runs. On the CPU it runs this crate's CPU backend.
//!
//! Layouts: the input must be contiguous (NCHW) or channels-last (NHWC, NDHWC, NLC:
//! the channel dimension with stride 1), at any start offset; [`shape_of`] says which
//! and refuses others (call `.contiguous()` first). The output has the input's layout.
//! Weight, bias and the running statistics are contiguous vectors of the input's dtype,
//! or f32 for f16 and bf16 inputs (PyTorch's mixed mode).

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp3, DType as CDType, Layout, ModuleT, Storage, Tensor, Var,
};

use crate::backend::{BackwardStats, Grads};
use crate::cpu;
use crate::dtype::{DType, Float, ParamFor};
use crate::error::BnError;
use crate::shape::{MemoryFormat, Shape};

type CResult<T> = candle_core::Result<T>;

fn err(e: BnError) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

fn msg(text: String) -> candle_core::Error {
    candle_core::Error::Msg(text)
}

/// The crate's [`Shape`] of a candle layout: dims `(N, C, ...)`, contiguous strides
/// ([`MemoryFormat::Contiguous`]) or channels-last ones ([`MemoryFormat::ChannelsLast`]:
/// `N, d1, ..., dk, C` row-major). Dimensions of size 1 may have any stride. Any other
/// layout (transposed, broadcast, sliced with gaps) is an error.
pub fn shape_of(layout: &Layout) -> Result<Shape, BnError> {
    let dims = layout.dims();
    let strides = layout.stride();
    let refuse = || {
        BnError::Layout(format!(
            "a tensor of size {dims:?} with strides {strides:?} is neither contiguous nor \
             channels-last; call .contiguous() first"
        ))
    };
    // Expected strides of each format, dims taken in memory order.
    let row_major = |order: &[usize]| {
        let mut expect = vec![0usize; dims.len()];
        let mut step = 1usize;
        for &d in order.iter().rev() {
            expect[d] = step;
            step = step.saturating_mul(dims[d]);
        }
        expect
    };
    let fits = |expect: &[usize]| (0..dims.len()).all(|d| dims[d] == 1 || strides[d] == expect[d]);
    let contiguous: Vec<usize> = (0..dims.len()).collect();
    if fits(&row_major(&contiguous)) {
        return Shape::new(dims, MemoryFormat::Contiguous);
    }
    if dims.len() >= 3 {
        let mut last: Vec<usize> = vec![0];
        last.extend(2..dims.len());
        last.push(1);
        if fits(&row_major(&last)) {
            return Shape::new(dims, MemoryFormat::ChannelsLast);
        }
    }
    Err(refuse())
}

/// The dims of a shape in memory order: `(N, C, ...)` or `(N, ..., C)`.
fn memory_dims(shape: &Shape) -> Vec<usize> {
    let d = shape.dims();
    match shape.format() {
        MemoryFormat::Contiguous => d.to_vec(),
        MemoryFormat::ChannelsLast => {
            let mut v = vec![d[0]];
            v.extend_from_slice(&d[2..]);
            v.push(d[1]);
            v
        }
    }
}

/// A tensor the ops made in memory order, seen with the logical dims `(N, C, ...)`
/// (a view: channels-last stays channels-last).
fn logical(t: Tensor, shape: &Shape) -> CResult<Tensor> {
    match shape.format() {
        MemoryFormat::Contiguous => Ok(t),
        MemoryFormat::ChannelsLast => {
            let r = shape.rank();
            let mut perm = vec![0, r - 1];
            perm.extend(1..r - 1);
            t.permute(perm)
        }
    }
}

/// The inverse of [`logical`]: a gradient of the logical output as the op's output.
fn physical(t: &Tensor, shape: &Shape) -> CResult<Tensor> {
    match shape.format() {
        MemoryFormat::Contiguous => Ok(t.clone()),
        MemoryFormat::ChannelsLast => {
            let r = shape.rank();
            let mut perm = vec![0];
            perm.extend(2..r);
            perm.push(1);
            t.permute(perm)
        }
    }
}

fn our_dtype(d: CDType) -> CResult<DType> {
    Ok(match d {
        CDType::F32 => DType::F32,
        CDType::F64 => DType::F64,
        CDType::F16 => DType::F16,
        CDType::BF16 => DType::BF16,
        other => {
            return Err(msg(format!(
                "BatchNorm takes f32, f64, f16 or bf16 inputs, not {other:?}"
            )))
        }
    })
}

/// Runs `$body` with `$t`, `$p` the Rust types of a supported (input, parameter) pair.
macro_rules! dispatch {
    ($input:expr, $param:expr, |$t:ident, $p:ident| $body:expr) => {{
        use half::{bf16, f16};
        match (our_dtype($input)?, our_dtype($param)?) {
            (DType::F32, DType::F32) => {
                type $t = f32;
                type $p = f32;
                $body
            }
            (DType::F64, DType::F64) => {
                type $t = f64;
                type $p = f64;
                $body
            }
            (DType::F16, DType::F16) => {
                type $t = f16;
                type $p = f16;
                $body
            }
            (DType::BF16, DType::BF16) => {
                type $t = bf16;
                type $p = bf16;
                $body
            }
            (DType::F16, DType::F32) => {
                type $t = f16;
                type $p = f32;
                $body
            }
            (DType::BF16, DType::F32) => {
                type $t = bf16;
                type $p = f32;
                $body
            }
            (i, p) => Err(err(BnError::UnsupportedTypes {
                input: i.name(),
                param: p.name(),
            })),
        }
    }};
}

/// Host vectors of a CPU tensor's storage (contiguous, at its offset).
trait HostData: Float + candle_core::WithDType {
    fn slice<'a>(s: &'a CpuStorage, l: &Layout, len: usize) -> CResult<&'a [Self]>;
    fn storage(v: Vec<Self>) -> CpuStorage;
}

macro_rules! host_data {
    ($t:ty, $v:ident) => {
        impl HostData for $t {
            fn slice<'a>(s: &'a CpuStorage, l: &Layout, len: usize) -> CResult<&'a [Self]> {
                match s {
                    CpuStorage::$v(v) => v
                        .get(l.start_offset()..l.start_offset() + len)
                        .ok_or_else(|| msg("storage shorter than its layout".into())),
                    _ => Err(msg(format!("expected {} storage", stringify!($t)))),
                }
            }
            fn storage(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$v(v)
            }
        }
    };
}
host_data!(f32, F32);
host_data!(f64, F64);
host_data!(half::f16, F16);
host_data!(half::bf16, BF16);

/// A per-channel vector (weight, bias, running statistics, saved statistics) as host
/// values, whatever device it is on.
fn host_vec<E: HostData>(t: &Tensor) -> CResult<Vec<E>> {
    let t = t.to_device(&candle_core::Device::Cpu)?;
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => Ok(E::slice(c, l, t.elem_count())?.to_vec()),
        _ => Err(msg("expected a CPU tensor".into())),
    }
}

/// What a training forward leaves for its backward and for the running statistics:
/// candle tensors on the input's device.
#[derive(Clone)]
struct Saved {
    save_mean: Tensor,
    save_invstd: Tensor,
    running: Option<(Tensor, Tensor)>,
}

/// A training forward's saved statistics, shared by its op and its module.
type SavedSlot = Arc<Mutex<Option<Saved>>>;

/// The statistics a backward differentiates through.
#[derive(Clone)]
enum StatsRef {
    /// The training forward's saved statistics.
    Batch(SavedSlot),
    /// The running statistics and eps (eval).
    Running(Tensor, Tensor, f64),
}

/// The forward op: x (and weight, bias for CustomOp3).
struct ForwardOp {
    shape: Shape,
    training: bool,
    eps: f64,
    momentum: f64,
    running: Option<(Tensor, Tensor)>,
    param: CDType,
    saved: SavedSlot,
    #[cfg(feature = "candle-cuda")]
    workspace: Arc<Mutex<crate::functional::Workspace>>,
}

impl ForwardOp {
    fn cpu<T: HostData, P: HostData + ParamFor<T>>(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        wb: Option<(&CpuStorage, &Layout, &CpuStorage, &Layout)>,
    ) -> CResult<(CpuStorage, candle_core::Shape)>
    where
        T::Acc: HostData,
    {
        let shape = self.shape;
        let (numel, c) = (shape.numel(), shape.c());
        let input = T::slice(x, lx, numel)?;
        let (w, b) = match wb {
            Some((sw, lw, sb, lb)) => (Some(P::slice(sw, lw, c)?), Some(P::slice(sb, lb, c)?)),
            None => (None, None),
        };
        let mut running = match &self.running {
            Some((m, v)) => Some((host_vec::<P>(m)?, host_vec::<P>(v)?)),
            None => None,
        };
        let mut y = vec![T::default(); numel];
        let zero = <T::Acc as Float>::from_f64(0.0);
        let (mut sm, mut si) = (vec![zero; c], vec![zero; c]);
        let (rm, rv) = match running.as_mut() {
            Some((m, v)) => (Some(m.as_mut_slice()), Some(v.as_mut_slice())),
            None => (None, None),
        };
        cpu::batch_norm::<T, P>(
            cpu::Forward {
                input,
                shape,
                running_mean: rm,
                running_var: rv,
                weight: w,
                bias: b,
                training: self.training,
                momentum: self.momentum,
                eps: self.eps,
            },
            &mut y,
            self.training.then_some(cpu::SaveStats {
                mean: &mut sm,
                invstd: &mut si,
            }),
        )
        .map_err(err)?;
        if self.training {
            let cpu = candle_core::Device::Cpu;
            let updated = match running {
                Some((m, v)) => {
                    Some((Tensor::from_vec(m, c, &cpu)?, Tensor::from_vec(v, c, &cpu)?))
                }
                None => None,
            };
            *self.saved.lock().map_err(|_| msg("poisoned".into()))? = Some(Saved {
                save_mean: Tensor::from_vec(sm, c, &cpu)?,
                save_invstd: Tensor::from_vec(si, c, &cpu)?,
                running: updated,
            });
        }
        Ok((T::storage(y), memory_dims(&shape).into()))
    }
}

fn cpu_forward(
    op: &ForwardOp,
    x: &CpuStorage,
    lx: &Layout,
    wb: Option<(&CpuStorage, &Layout, &CpuStorage, &Layout)>,
) -> CResult<(CpuStorage, candle_core::Shape)> {
    dispatch!(x.dtype(), op.param, |T, P| op.cpu::<T, P>(x, lx, wb))
}

impl CustomOp3 for ForwardOp {
    fn name(&self) -> &'static str {
        "cuda-batchnorm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> CResult<(CpuStorage, candle_core::Shape)> {
        cpu_forward(self, x, lx, Some((w, lw, b, lb)))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        w: &candle_core::CudaStorage,
        lw: &Layout,
        b: &candle_core::CudaStorage,
        lb: &Layout,
    ) -> CResult<(candle_core::CudaStorage, candle_core::Shape)> {
        cuda::forward(self, x, lx, Some((w, lw, b, lb)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = backward(self, x, Some(w), grad)?;
        Ok((Some(dx), dw, db))
    }
}

impl CustomOp1 for ForwardOp {
    fn name(&self) -> &'static str {
        "cuda-batchnorm"
    }

    fn cpu_fwd(&self, x: &CpuStorage, lx: &Layout) -> CResult<(CpuStorage, candle_core::Shape)> {
        cpu_forward(self, x, lx, None)
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
    ) -> CResult<(candle_core::CudaStorage, candle_core::Shape)> {
        cuda::forward(self, x, lx, None)
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(backward(self, x, None, grad)?.0))
    }
}

/// The backward op, on (dy, x) with the forward's statistics and weight captured:
/// returns dx and leaves the parameters' gradients.
struct BackwardOp {
    shape: Shape,
    stats: StatsRef,
    weight: Option<Tensor>,
    param: CDType,
    grads: Mutex<Option<(Tensor, Tensor)>>,
    #[cfg(feature = "candle-cuda")]
    workspace: Arc<Mutex<crate::functional::Workspace>>,
}

impl BackwardOp {
    fn cpu<T: HostData, P: HostData + ParamFor<T>>(
        &self,
        dy: &CpuStorage,
        ldy: &Layout,
        x: &CpuStorage,
        lx: &Layout,
    ) -> CResult<(CpuStorage, candle_core::Shape)>
    where
        T::Acc: HostData,
    {
        let shape = self.shape;
        let (numel, c) = (shape.numel(), shape.c());
        let (g, input) = (T::slice(dy, ldy, numel)?, T::slice(x, lx, numel)?);
        let weight = self.weight.as_ref().map(host_vec::<P>).transpose()?;
        let mut batch: Option<[Vec<T::Acc>; 2]> = None;
        let mut running: Option<(Vec<P>, Vec<P>, f64)> = None;
        match &self.stats {
            StatsRef::Batch(saved) => {
                let s = saved.lock().map_err(|_| msg("poisoned".into()))?;
                let s = s
                    .as_ref()
                    .ok_or_else(|| msg("backward before the forward".into()))?;
                batch = Some([host_vec(&s.save_mean)?, host_vec(&s.save_invstd)?]);
            }
            StatsRef::Running(m, v, eps) => running = Some((host_vec(m)?, host_vec(v)?, *eps)),
        }
        let stats = match (&batch, &running) {
            (Some([m, i]), _) => BackwardStats::Batch {
                save_mean: &m[..],
                save_invstd: &i[..],
            },
            (None, Some((m, v, eps))) => BackwardStats::Running {
                mean: &m[..],
                var: &v[..],
                eps: *eps,
            },
            (None, None) => return Err(msg("internal: no statistics".into())),
        };
        let mut dx = vec![T::default(); numel];
        let (mut gw, mut gb) = (vec![P::default(); c], vec![P::default(); c]);
        cpu::batch_norm_backward::<T, P>(
            crate::backend::Backward {
                grad_output: g,
                input,
                shape,
                weight: weight.as_deref(),
                stats,
            },
            Grads {
                input: &mut dx,
                weight: Some(&mut gw),
                bias: Some(&mut gb),
            },
        )
        .map_err(err)?;
        let cpu = candle_core::Device::Cpu;
        *self.grads.lock().map_err(|_| msg("poisoned".into()))? = Some((
            Tensor::from_vec(gw, c, &cpu)?,
            Tensor::from_vec(gb, c, &cpu)?,
        ));
        Ok((T::storage(dx), memory_dims(&shape).into()))
    }
}

impl candle_core::CustomOp2 for BackwardOp {
    fn name(&self) -> &'static str {
        "cuda-batchnorm-backward"
    }

    fn cpu_fwd(
        &self,
        dy: &CpuStorage,
        ldy: &Layout,
        x: &CpuStorage,
        lx: &Layout,
    ) -> CResult<(CpuStorage, candle_core::Shape)> {
        dispatch!(x.dtype(), self.param, |T, P| self
            .cpu::<T, P>(dy, ldy, x, lx))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        dy: &candle_core::CudaStorage,
        ldy: &Layout,
        x: &candle_core::CudaStorage,
        lx: &Layout,
    ) -> CResult<(candle_core::CudaStorage, candle_core::Shape)> {
        cuda::backward(self, dy, ldy, x, lx)
    }
}

/// dx (in the input's layout), and grad_weight, grad_bias when there is a weight.
fn backward(
    op: &ForwardOp,
    x: &Tensor,
    weight: Option<&Tensor>,
    grad: &Tensor,
) -> CResult<(Tensor, Option<Tensor>, Option<Tensor>)> {
    let shape = op.shape;
    // The gradient of the op's output, in its (memory-order) layout.
    let dy = grad.contiguous()?;
    // x as the forward saw it: in memory order.
    let xm = physical(x, &shape)?;
    let stats = if op.training {
        StatsRef::Batch(op.saved.clone())
    } else {
        let (m, v) = op
            .running
            .clone()
            .ok_or_else(|| msg("eval without running statistics".into()))?;
        StatsRef::Running(m, v, op.eps)
    };
    let bop = BackwardOp {
        shape,
        stats,
        weight: weight.cloned(),
        param: op.param,
        grads: Mutex::new(None),
        #[cfg(feature = "candle-cuda")]
        workspace: op.workspace.clone(),
    };
    let dx = dy.apply_op2_no_bwd(&xm, &bop)?;
    let dx = logical(dx, &shape)?;
    let grads = bop.grads.lock().map_err(|_| msg("poisoned".into()))?.take();
    let (dw, db) = match (weight, grads) {
        (Some(w), Some((dw, db))) => (
            Some(dw.to_device(w.device())?.to_dtype(w.dtype())?),
            Some(db.to_device(w.device())?.to_dtype(w.dtype())?),
        ),
        _ => (None, None),
    };
    Ok((dx, dw, db))
}

/// `torch.nn.BatchNorm*d` as a candle module, on this crate's kernels: a drop-in for
/// `candle_nn::BatchNorm` (the same constructors and accessors, [`ModuleT`]).
#[derive(Clone, Debug)]
pub struct BatchNorm {
    running_mean: Var,
    running_var: Var,
    weight_and_bias: Option<(Tensor, Tensor)>,
    eps: f64,
    momentum: f64,
    /// The last forward's mode and (training) its saved statistics, for [`backward`].
    ///
    /// [`backward`]: BatchNorm::backward
    last: Arc<Mutex<Option<(bool, SavedSlot)>>>,
    #[cfg(feature = "candle-cuda")]
    workspace: Arc<Mutex<crate::functional::Workspace>>,
}

impl std::fmt::Debug for Saved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Saved").finish_non_exhaustive()
    }
}

impl BatchNorm {
    fn make(
        num_features: usize,
        running_mean: Tensor,
        running_var: Tensor,
        weight_and_bias: Option<(Tensor, Tensor)>,
        eps: f64,
        momentum: f64,
    ) -> CResult<BatchNorm> {
        if eps < 0.0 || !eps.is_finite() {
            return Err(err(BnError::EpsNegative { eps }));
        }
        for (name, t) in [
            ("running_mean", &running_mean),
            ("running_var", &running_var),
        ]
        .into_iter()
        .chain(
            weight_and_bias
                .iter()
                .flat_map(|(w, b)| [("weight", w), ("bias", b)]),
        ) {
            if t.dims() != [num_features] {
                return Err(err(BnError::FeatureCount {
                    name,
                    expected: num_features,
                    got: t.elem_count(),
                }));
            }
        }
        Ok(BatchNorm {
            running_mean: Var::from_tensor(&running_mean)?,
            running_var: Var::from_tensor(&running_var)?,
            weight_and_bias,
            eps,
            momentum,
            last: Arc::new(Mutex::new(None)),
            #[cfg(feature = "candle-cuda")]
            workspace: Arc::new(Mutex::new(crate::functional::Workspace::new())),
        })
    }

    /// As `candle_nn::BatchNorm::new` (momentum 0.1).
    pub fn new(
        num_features: usize,
        running_mean: Tensor,
        running_var: Tensor,
        weight: Tensor,
        bias: Tensor,
        eps: f64,
    ) -> CResult<BatchNorm> {
        Self::make(
            num_features,
            running_mean,
            running_var,
            Some((weight, bias)),
            eps,
            0.1,
        )
    }

    /// As `candle_nn::BatchNorm::new_no_bias`: no weight and bias (weight 1, bias 0).
    pub fn new_no_bias(
        num_features: usize,
        running_mean: Tensor,
        running_var: Tensor,
        eps: f64,
    ) -> CResult<BatchNorm> {
        Self::make(num_features, running_mean, running_var, None, eps, 0.1)
    }

    /// As `candle_nn::BatchNorm::new_with_momentum`.
    pub fn new_with_momentum(
        num_features: usize,
        running_mean: Tensor,
        running_var: Tensor,
        weight: Tensor,
        bias: Tensor,
        eps: f64,
        momentum: f64,
    ) -> CResult<BatchNorm> {
        Self::make(
            num_features,
            running_mean,
            running_var,
            Some((weight, bias)),
            eps,
            momentum,
        )
    }

    /// As `candle_nn::BatchNorm::new_no_bias_with_momentum`.
    pub fn new_no_bias_with_momentum(
        num_features: usize,
        running_mean: Tensor,
        running_var: Tensor,
        eps: f64,
        momentum: f64,
    ) -> CResult<BatchNorm> {
        Self::make(num_features, running_mean, running_var, None, eps, momentum)
    }

    /// The running mean.
    pub fn running_mean(&self) -> &Tensor {
        self.running_mean.as_tensor()
    }

    /// The running variance.
    pub fn running_var(&self) -> &Tensor {
        self.running_var.as_tensor()
    }

    /// eps.
    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// momentum.
    pub fn momentum(&self) -> f64 {
        self.momentum
    }

    /// Weight and bias, if affine.
    pub fn weight_and_bias(&self) -> Option<(&Tensor, &Tensor)> {
        self.weight_and_bias.as_ref().map(|(w, b)| (w, b))
    }

    fn op(&self, x: &Tensor, training: bool) -> CResult<(ForwardOp, Shape)> {
        let (_, layout) = x.storage_and_layout();
        let shape = shape_of(layout).map_err(err)?;
        let c = self.running_mean.as_tensor().elem_count();
        if shape.rank() >= 2 && shape.c() != c {
            return Err(err(BnError::FeatureCount {
                name: "running_mean",
                expected: shape.c(),
                got: c,
            }));
        }
        let running = (
            self.running_mean.as_tensor().clone(),
            self.running_var.as_tensor().clone(),
        );
        let op = ForwardOp {
            shape,
            training,
            eps: self.eps,
            momentum: self.momentum,
            running: Some(running),
            param: self.running_mean.dtype(),
            saved: Arc::new(Mutex::new(None)),
            #[cfg(feature = "candle-cuda")]
            workspace: self.workspace.clone(),
        };
        Ok((op, shape))
    }

    fn apply(&self, x: &Tensor, op: ForwardOp, shape: &Shape) -> CResult<Tensor> {
        *self.last.lock().map_err(|_| msg("poisoned".into()))? =
            Some((op.training, op.saved.clone()));
        let y = match &self.weight_and_bias {
            Some((w, b)) => x.apply_op3_arc(w, b, Arc::new(Box::new(op)))?,
            None => x.apply_op1_arc(Arc::new(Box::new(op)))?,
        };
        logical(y, shape)
    }

    /// The training forward: normalised with the batch's statistics, which are folded
    /// into the running statistics (momentum, unbiased variance), as PyTorch's.
    pub fn forward_train(&self, x: &Tensor) -> CResult<Tensor> {
        let (op, shape) = self.op(x, true)?;
        let saved = op.saved.clone();
        let y = self.apply(x, op, &shape)?;
        let s = saved.lock().map_err(|_| msg("poisoned".into()))?.clone();
        if let Some(Saved {
            running: Some((m, v)),
            ..
        }) = s
        {
            self.running_mean.set(&m)?;
            self.running_var.set(&v)?;
        }
        Ok(y)
    }

    /// The eval forward with the running statistics.
    pub fn forward_eval(&self, x: &Tensor) -> CResult<Tensor> {
        let (op, shape) = self.op(x, false)?;
        self.apply(x, op, &shape)
    }

    /// The backward of the last forward, for code that drives its own backward pass
    /// (candle's autograd calls the same code through the op): given that forward's
    /// input and the gradient of its output, `(dx, dweight, dbias)` (the last two for an
    /// affine module), dx in x's layout.
    pub fn backward(
        &self,
        x: &Tensor,
        grad_y: &Tensor,
    ) -> CResult<(Tensor, Option<Tensor>, Option<Tensor>)> {
        let (training, saved) = self
            .last
            .lock()
            .map_err(|_| msg("poisoned".into()))?
            .clone()
            .ok_or_else(|| {
                err(BnError::Backward(
                    "backward needs a forward on this module first",
                ))
            })?;
        let (mut op, shape) = self.op(x, training)?;
        op.saved = saved;
        let grad = physical(grad_y, &shape)?;
        backward(&op, x, self.weight_and_bias.as_ref().map(|(w, _)| w), &grad)
    }
}

impl ModuleT for BatchNorm {
    fn forward_t(&self, x: &Tensor, train: bool) -> CResult<Tensor> {
        if train {
            self.forward_train(x)
        } else {
            self.forward_eval(x)
        }
    }
}

/// As `candle_nn::batch_norm`: the layer's tensors `running_mean`, `running_var`,
/// `weight`, `bias` from a var builder (PyTorch's names; initialised to 0, 1, 1, 0 when
/// the builder creates them).
pub fn batch_norm<C: Into<candle_nn::BatchNormConfig>>(
    num_features: usize,
    config: C,
    vb: candle_nn::VarBuilder,
) -> CResult<BatchNorm> {
    use candle_nn::Init;
    let config = config.into();
    if !config.remove_mean {
        return Err(msg(
            "cuda-batchnorm's BatchNorm always removes the mean (remove_mean: false is not PyTorch's BatchNorm)"
                .into(),
        ));
    }
    let running_mean = vb.get_with_hints(num_features, "running_mean", Init::Const(0.))?;
    let running_var = vb.get_with_hints(num_features, "running_var", Init::Const(1.))?;
    let weight_and_bias = if config.affine {
        let weight = vb.get_with_hints(num_features, "weight", Init::Const(1.))?;
        let bias = vb.get_with_hints(num_features, "bias", Init::Const(0.))?;
        Some((weight, bias))
    } else {
        None
    };
    BatchNorm::make(
        num_features,
        running_mean,
        running_var,
        weight_and_bias,
        config.eps,
        config.momentum,
    )
}

/// The CUDA path: this crate's kernels on candle's device memory.
#[cfg(feature = "candle-cuda")]
mod cuda {
    use super::*;
    use candle_core::cuda_backend::CudaDType;
    use candle_core::CudaStorage;
    use cudarc::driver::{CudaSlice, CudaView, DevicePtr, DevicePtrMut};

    use crate::backend::Backend;
    use crate::functional::{self, Cuda};

    fn view<'a, E: Float + CudaDType>(
        s: &'a CudaStorage,
        l: &Layout,
        len: usize,
    ) -> CResult<CudaView<'a, E>> {
        let slice = s.as_cuda_slice::<E>()?;
        let start = l.start_offset();
        if start + len > slice.len() {
            return Err(msg("storage shorter than its layout".into()));
        }
        Ok(slice.slice(start..start + len))
    }

    /// A copy of a per-channel candle tensor (contiguous, on the input's device).
    fn channel_copy<E: Float + CudaDType>(cuda: &Cuda, t: &Tensor) -> CResult<CudaSlice<E>> {
        let (s, l) = t.storage_and_layout();
        match &*s {
            Storage::Cuda(c) => {
                let v = view::<E>(c, l, t.elem_count())?;
                let mut out = cuda.alloc(t.elem_count(), E::default()).map_err(err)?;
                if !out.is_empty() {
                    cuda.stream()
                        .memcpy_dtod(&v, &mut out)
                        .map_err(|e| err(e.into()))?;
                }
                Ok(out)
            }
            _ => Err(msg(
                "the module's tensors must be on the input's device".into()
            )),
        }
    }

    fn wrap<E: Float + CudaDType>(
        s: CudaSlice<E>,
        dev: &candle_core::CudaDevice,
        c: usize,
    ) -> Tensor {
        Tensor::from_storage(
            Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone())),
            c,
            candle_core::op::BackpropOp::none(),
            false,
        )
    }

    pub(super) fn forward(
        op: &ForwardOp,
        x: &CudaStorage,
        lx: &Layout,
        wb: Option<(&CudaStorage, &Layout, &CudaStorage, &Layout)>,
    ) -> CResult<(CudaStorage, candle_core::Shape)> {
        dispatch!(x.dtype(), op.param, |T, P| forward_typed::<T, P>(
            op, x, lx, wb
        ))
    }

    fn forward_typed<T: Float + CudaDType, P: CudaDType + ParamFor<T>>(
        op: &ForwardOp,
        x: &CudaStorage,
        lx: &Layout,
        wb: Option<(&CudaStorage, &Layout, &CudaStorage, &Layout)>,
    ) -> CResult<(CudaStorage, candle_core::Shape)>
    where
        T::Acc: CudaDType,
    {
        let shape = op.shape;
        let (numel, c) = (shape.numel(), shape.c());
        let dev = &x.device;
        let cuda = Cuda::new(&dev.cuda_stream());
        let input = view::<T>(x, lx, numel)?;
        let (w, b) = match wb {
            Some((sw, lw, sb, lb)) => (Some(view::<P>(sw, lw, c)?), Some(view::<P>(sb, lb, c)?)),
            None => (None, None),
        };
        // The kernels update the running statistics in place: in copies, which the
        // module then sets its Vars to.
        let mut running = match &op.running {
            Some((m, v)) => Some((channel_copy::<P>(&cuda, m)?, channel_copy::<P>(&cuda, v)?)),
            None => None,
        };
        let mut y = cuda.alloc(numel, T::default()).map_err(err)?;
        let zero = <T::Acc as Float>::from_f64(0.0);
        let mut sm = cuda.alloc(c, zero).map_err(err)?;
        let mut si = cuda.alloc(c, zero).map_err(err)?;
        {
            let (rm, rv) = match running.as_mut() {
                Some((m, v)) => (
                    Some(m as &mut dyn DevicePtrMut<P>),
                    Some(v as &mut dyn DevicePtrMut<P>),
                ),
                None => (None, None),
            };
            let mut ws = op.workspace.lock().map_err(|_| msg("poisoned".into()))?;
            functional::batch_norm::<T, P>(
                cuda.stream(),
                functional::Forward {
                    input: &input,
                    shape,
                    running_mean: rm,
                    running_var: rv,
                    weight: w.as_ref().map(|v| v as &dyn DevicePtr<P>),
                    bias: b.as_ref().map(|v| v as &dyn DevicePtr<P>),
                    training: op.training,
                    momentum: op.momentum,
                    eps: op.eps,
                },
                &mut y,
                op.training.then_some(functional::SaveStats {
                    mean: &mut sm,
                    invstd: &mut si,
                }),
                &mut ws,
            )
            .map_err(err)?;
        }
        if op.training {
            *op.saved.lock().map_err(|_| msg("poisoned".into()))? = Some(Saved {
                save_mean: wrap(sm, dev, c),
                save_invstd: wrap(si, dev, c),
                running: running.map(|(m, v)| (wrap(m, dev, c), wrap(v, dev, c))),
            });
        }
        Ok((
            CudaStorage::wrap_cuda_slice(y, dev.clone()),
            memory_dims(&shape).into(),
        ))
    }

    pub(super) fn backward(
        op: &BackwardOp,
        dy: &CudaStorage,
        ldy: &Layout,
        x: &CudaStorage,
        lx: &Layout,
    ) -> CResult<(CudaStorage, candle_core::Shape)> {
        dispatch!(x.dtype(), op.param, |T, P| backward_typed::<T, P>(
            op, dy, ldy, x, lx
        ))
    }

    fn backward_typed<T: Float + CudaDType, P: CudaDType + ParamFor<T>>(
        op: &BackwardOp,
        dy: &CudaStorage,
        ldy: &Layout,
        x: &CudaStorage,
        lx: &Layout,
    ) -> CResult<(CudaStorage, candle_core::Shape)>
    where
        T::Acc: CudaDType,
    {
        let shape = op.shape;
        let (numel, c) = (shape.numel(), shape.c());
        let dev = &x.device;
        let cuda = Cuda::new(&dev.cuda_stream());
        let (g, input) = (view::<T>(dy, ldy, numel)?, view::<T>(x, lx, numel)?);
        let weight = op
            .weight
            .as_ref()
            .map(|w| channel_copy::<P>(&cuda, w))
            .transpose()?;
        let mut dx = cuda.alloc(numel, T::default()).map_err(err)?;
        let mut gw = cuda.alloc(c, P::default()).map_err(err)?;
        let mut gb = cuda.alloc(c, P::default()).map_err(err)?;
        let batch;
        let running;
        let stats = match &op.stats {
            StatsRef::Batch(saved) => {
                let s = saved.lock().map_err(|_| msg("poisoned".into()))?;
                let s = s
                    .as_ref()
                    .ok_or_else(|| msg("backward before the forward".into()))?;
                batch = (
                    channel_copy::<T::Acc>(&cuda, &s.save_mean)?,
                    channel_copy::<T::Acc>(&cuda, &s.save_invstd)?,
                );
                functional::BackwardStats::Batch {
                    save_mean: &batch.0 as &dyn DevicePtr<T::Acc>,
                    save_invstd: &batch.1 as &dyn DevicePtr<T::Acc>,
                }
            }
            StatsRef::Running(m, v, eps) => {
                running = (channel_copy::<P>(&cuda, m)?, channel_copy::<P>(&cuda, v)?);
                functional::BackwardStats::Running {
                    mean: &running.0 as &dyn DevicePtr<P>,
                    var: &running.1 as &dyn DevicePtr<P>,
                    eps: *eps,
                }
            }
        };
        let mut ws = op.workspace.lock().map_err(|_| msg("poisoned".into()))?;
        functional::batch_norm_backward::<T, P>(
            cuda.stream(),
            functional::Backward {
                grad_output: &g,
                input: &input,
                shape,
                weight: weight.as_ref().map(|w| w as &dyn DevicePtr<P>),
                stats,
            },
            functional::Grads {
                input: &mut dx,
                weight: Some(&mut gw),
                bias: Some(&mut gb),
            },
            &mut ws,
        )
        .map_err(err)?;
        *op.grads.lock().map_err(|_| msg("poisoned".into()))? =
            Some((wrap(gw, dev, c), wrap(gb, dev, c)));
        Ok((
            CudaStorage::wrap_cuda_slice(dx, dev.clone()),
            memory_dims(&shape).into(),
        ))
    }
}

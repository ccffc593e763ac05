//! Frozen BatchNorm, torchvision's `FrozenBatchNorm2d` (and 1-D, 3-D): BatchNorm with
//! fixed statistics and parameters, as detection and segmentation backbones and
//! inference servers use it.
//!
//! The module keeps weight, bias, running_mean and running_var as buffers (its state
//! dict, torchvision's keys) and computes `scale = weight * rsqrt(running_var + eps)`,
//! `shift = bias - running_mean * scale` once, when it is built or loaded
//! ([`coefficients`]); the forward is then `y = x * scale + shift`, one multiply-add per
//! element, through `&self`. Its backward is `dx = dy * scale` (nothing is learnt).
//!
//! ```
//! use cuda_batchnorm::prelude::*;
//! # fn main() -> cuda_batchnorm::Result<()> {
//! let mut bn = cpu::BatchNorm2d::<f32>::new(Cpu, 3, BatchNormOptions::default())?;
//! let shape = Shape::nchw(2, 3, 4, 4)?;
//! let x: Vec<f32> = (0..shape.numel()).map(|i| (i % 7) as f32).collect();
//! bn.forward(&x, &shape)?; // training updates the running statistics
//! let frozen = cpu::FrozenBatchNorm2d::from_batchnorm(&bn)?;
//! bn.eval();
//! let (y, y_frozen) = (bn.forward(&x, &shape)?, frozen.forward(&x, &shape)?);
//! assert!(y.iter().zip(&y_frozen).all(|(a, b)| (a - b).abs() < 1e-5));
//! # Ok(()) }
//! ```
//!
//! Numbers: torchvision computes scale and shift in the buffers' dtype and then `x *
//! scale + shift` in two roundings; here the coefficients are computed in the
//! accumulator type (f32, or f64 for f64) and the forward rounds once, so f16 and bf16
//! results are as close to the exact value as their type allows and within a rounding
//! of torchvision's.

use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

use crate::backend::{Backend, Epilogue, EpilogueGrad, Frozen, Len};
use crate::dtype::{Float, ParamFor};
use crate::error::{BnError, Result};
use crate::functional::{batch_norm_frozen, Cuda};
use crate::module::{check_state_dict, BatchNorm, Layout, StateDict};
use crate::shape::Shape;
use crate::validate;

/// `FrozenBatchNorm{D}d` on backend `B`, input type `T`, buffer type `P`.
pub struct FrozenBatchNorm<const D: usize, B: Backend, T: Float, P: ParamFor<T> = T> {
    backend: B,
    eps: f64,
    /// weight, bias, running_mean, running_var (C values each) on the host.
    buffers: [Vec<P>; 4],
    /// `Acc[2C]`: scale then shift.
    scale_shift: B::Buffer<T::Acc>,
}

impl<const D: usize, B: Backend + std::fmt::Debug, T: Float, P: ParamFor<T>> std::fmt::Debug
    for FrozenBatchNorm<D, B, T, P>
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct(self.name())
            .field("backend", &self.backend)
            .field("num_features", &self.num_features())
            .field("eps", &self.eps)
            .finish_non_exhaustive()
    }
}

impl<const D: usize, B: Backend, T: Float, P: ParamFor<T>> FrozenBatchNorm<D, B, T, P> {
    /// torchvision's initial state: weight 1, bias 0, running_mean 0, running_var 1
    /// (torchvision's default eps is 1e-5).
    pub fn new(backend: B, num_features: usize, eps: f64) -> Result<Self> {
        let one = || crate::cpu::host_vec(num_features, P::from_f64(1.0));
        let zero = || crate::cpu::host_vec(num_features, P::from_f64(0.0));
        Self::build(backend, [one()?, zero()?, zero()?, one()?], eps)
    }

    /// The frozen copy of a BatchNorm's eval: its weight and bias (1 and 0 without
    /// affine), running statistics and eps. A module without running statistics has
    /// no eval to freeze: [`BnError::MissingRunningStat`].
    pub fn from_batchnorm(bn: &BatchNorm<D, B, T, P>) -> Result<Self>
    where
        B: Clone,
    {
        let sd = bn.state_dict()?;
        let c = bn.num_features();
        let (Some(rm), Some(rv)) = (sd.running_mean, sd.running_var) else {
            return Err(BnError::MissingRunningStat {
                name: "running_mean",
            });
        };
        let w = match sd.weight {
            Some(w) => w,
            None => crate::cpu::host_vec(c, P::from_f64(1.0))?,
        };
        let b = match sd.bias {
            Some(b) => b,
            None => crate::cpu::host_vec(c, P::from_f64(0.0))?,
        };
        Self::build(bn.backend().clone(), [w, b, rm, rv], bn.options().eps)
    }

    /// A module of `num_features` channels loaded from a state dict, as torchvision's
    /// `FrozenBatchNorm2d(num_features, eps).load_state_dict(sd)` (strict): weight,
    /// bias, running_mean and running_var with C values each; `num_batches_tracked`
    /// is ignored, as torchvision drops it. Errors in PyTorch's words.
    pub fn from_state_dict(
        backend: B,
        num_features: usize,
        eps: f64,
        sd: &StateDict<P>,
    ) -> Result<Self> {
        let shapes = [&sd.weight, &sd.bias, &sd.running_mean, &sd.running_var]
            .map(|v| v.as_ref().map(|v| vec![v.len()]));
        Self::from_checked(
            backend,
            num_features,
            eps,
            sd,
            &shapes,
            &|n| n.to_string(),
            Vec::new(),
        )
    }

    fn from_checked(
        backend: B,
        num_features: usize,
        eps: f64,
        sd: &StateDict<P>,
        shapes: &[Option<Vec<usize>>; 4],
        key: &dyn Fn(&str) -> String,
        unexpected: Vec<String>,
    ) -> Result<Self> {
        let layout = Layout {
            module: frozen_name(D),
            c: num_features,
            expected: [true; 4],
            counter: true,
        };
        check_state_dict(&layout, sd, shapes, key, unexpected, true)?;
        let owned = |v: &Option<Vec<P>>| v.clone().unwrap_or_default();
        Self::build(
            backend,
            [
                owned(&sd.weight),
                owned(&sd.bias),
                owned(&sd.running_mean),
                owned(&sd.running_var),
            ],
            eps,
        )
    }

    fn build(backend: B, buffers: [Vec<P>; 4], eps: f64) -> Result<Self> {
        // The eval's rules for eps (a negative one would make rsqrt a NaN).
        if !eps.is_finite() {
            return Err(BnError::NonFinite {
                name: "eps",
                value: eps,
            });
        }
        if eps < 0.0 {
            return Err(BnError::EpsNegative { eps });
        }
        let host = host_coefficients::<T, P>(&buffers, eps)?;
        let scale_shift = backend.upload(&host)?;
        Ok(FrozenBatchNorm {
            backend,
            eps,
            buffers,
            scale_shift,
        })
    }

    /// The coefficients as [`Self::scale_shift`] holds them, computed again on the host
    /// from the buffers (no device round trip).
    pub(crate) fn host_coefficients(&self) -> Result<Vec<T::Acc>> {
        host_coefficients::<T, P>(&self.buffers, self.eps)
    }

    /// `FrozenBatchNorm1d`, `FrozenBatchNorm2d` or `FrozenBatchNorm3d`.
    pub fn name(&self) -> &'static str {
        frozen_name(D)
    }

    /// The backend its coefficients live on.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// C.
    pub fn num_features(&self) -> usize {
        self.buffers[0].len()
    }

    /// eps.
    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// `Acc[2C]` on the backend: scale (C) then shift (C).
    pub fn scale_shift(&self) -> &B::Buffer<T::Acc> {
        &self.scale_shift
    }

    /// torchvision's buffers (weight, bias, running_mean, running_var; no
    /// `num_batches_tracked`).
    pub fn state_dict(&self) -> StateDict<P> {
        let [w, b, rm, rv] = self.buffers.clone();
        StateDict {
            weight: Some(w),
            bias: Some(b),
            running_mean: Some(rm),
            running_var: Some(rv),
            num_batches_tracked: None,
        }
    }

    fn args<'a>(&'a self, input: &'a B::Tensor<'a, T>, shape: &Shape) -> Result<Frozen<'a, B, T>> {
        validate::module_rank(D, shape)?;
        Ok(Frozen {
            input,
            shape: *shape,
            scale_shift: B::tensor(&self.scale_shift),
        })
    }

    /// `y = x * scale + shift` into a caller's buffer.
    pub fn forward_into(
        &self,
        input: &B::Tensor<'_, T>,
        shape: &Shape,
        output: &mut B::TensorMut<'_, T>,
    ) -> Result<()> {
        let args = self.args(B::reborrow(input), shape)?;
        self.backend
            .batch_norm_frozen(args, B::reborrow_mut(output))
    }

    /// `y = x * scale + shift` into a new buffer.
    pub fn forward(&self, input: &B::Tensor<'_, T>, shape: &Shape) -> Result<B::Buffer<T>> {
        // Checked before the output is allocated.
        self.check(input.len(), shape)?;
        let mut out = self.backend.alloc(shape.numel(), T::from_f64(0.0))?;
        self.forward_into(input, shape, B::tensor_mut(&mut out))?;
        Ok(out)
    }

    /// The gradient of the input, `dx = dy * scale`, into a caller's buffer.
    pub fn backward_into(
        &self,
        grad_output: &B::Tensor<'_, T>,
        shape: &Shape,
        grad_input: &mut B::TensorMut<'_, T>,
    ) -> Result<()> {
        let args = self.args(B::reborrow(grad_output), shape)?;
        self.backend
            .batch_norm_frozen_backward(args, B::reborrow_mut(grad_input))
    }

    /// The gradient of the input into a new buffer.
    pub fn backward(&self, grad_output: &B::Tensor<'_, T>, shape: &Shape) -> Result<B::Buffer<T>> {
        self.check(grad_output.len(), shape)?;
        let mut out = self.backend.alloc(shape.numel(), T::from_f64(0.0))?;
        self.backward_into(grad_output, shape, B::tensor_mut(&mut out))?;
        Ok(out)
    }

    /// `y = relu(x * scale + shift)` or `relu(x * scale + shift + residual)` in one pass,
    /// into a caller's buffer.
    pub fn forward_fused_into(
        &self,
        input: &B::Tensor<'_, T>,
        epilogue: Epilogue<'_, B, T>,
        shape: &Shape,
        output: &mut B::TensorMut<'_, T>,
    ) -> Result<()> {
        let args = self.args(B::reborrow(input), shape)?;
        self.backend
            .batch_norm_frozen_fused(args, Some(epilogue), B::reborrow_mut(output))
    }

    /// The fused forward into a new buffer.
    pub fn forward_fused(
        &self,
        input: &B::Tensor<'_, T>,
        epilogue: Epilogue<'_, B, T>,
        shape: &Shape,
    ) -> Result<B::Buffer<T>> {
        self.check(input.len(), shape)?;
        epilogue.validate(shape)?;
        let mut out = self.backend.alloc(shape.numel(), T::from_f64(0.0))?;
        self.forward_fused_into(input, epilogue, shape, B::tensor_mut(&mut out))?;
        Ok(out)
    }

    /// The gradient of the input through a fused forward, `dx = mask(dy) * scale` (the
    /// mask from the forward's output), into a caller's buffer; the residual's gradient
    /// goes to [`EpilogueGrad::AddRelu`]'s buffer.
    pub fn backward_fused_into(
        &self,
        grad_output: &B::Tensor<'_, T>,
        epilogue: EpilogueGrad<'_, B, T>,
        shape: &Shape,
        grad_input: &mut B::TensorMut<'_, T>,
    ) -> Result<()> {
        let args = self.args(B::reborrow(grad_output), shape)?;
        self.backend.batch_norm_frozen_backward_fused(
            args,
            Some(epilogue),
            B::reborrow_mut(grad_input),
        )
    }

    /// The gradients through a fused forward into new buffers: the input's, and the
    /// residual's when `residual` (the forward was `relu(bn(x) + z)`).
    pub fn backward_fused(
        &self,
        grad_output: &B::Tensor<'_, T>,
        output: &B::Tensor<'_, T>,
        residual: bool,
        shape: &Shape,
    ) -> Result<FusedGrads<B, T>> {
        self.check(grad_output.len(), shape)?;
        crate::validate::buffer("output", shape.numel(), output.len(), shape)?;
        let zero = T::from_f64(0.0);
        let mut dx = self.backend.alloc(shape.numel(), zero)?;
        let mut dz = if residual {
            Some(self.backend.alloc(shape.numel(), zero)?)
        } else {
            None
        };
        let output = B::reborrow(output);
        let epilogue = match dz.as_mut() {
            None => EpilogueGrad::Relu { output },
            Some(g) => EpilogueGrad::AddRelu {
                output,
                grad_residual: B::tensor_mut(g),
            },
        };
        self.backward_fused_into(grad_output, epilogue, shape, B::tensor_mut(&mut dx))?;
        Ok((dx, dz))
    }

    fn check(&self, input: usize, shape: &Shape) -> Result<()> {
        validate::module_rank(D, shape)?;
        validate::frozen(shape, input, shape.numel(), 2 * self.num_features()).map(|_| ())
    }
}

/// A fused frozen backward's gradients: the input's, and the residual's after
/// `relu(bn(x) + z)`.
pub type FusedGrads<B, T> = (<B as Backend>::Buffer<T>, Option<<B as Backend>::Buffer<T>>);

#[cfg(feature = "safetensors")]
impl<const D: usize, B: Backend, T: Float, P: ParamFor<T>> FrozenBatchNorm<D, B, T, P> {
    /// The layer `{prefix}.weight`, ... of a `.safetensors` file (a BatchNorm's or a
    /// FrozenBatchNorm's, converted to `P`), with C from its running_mean, loaded as
    /// [`from_state_dict`](Self::from_state_dict) loads (strict: a missing key, a key of
    /// another shape or another key under the prefix is an error in PyTorch's words).
    pub fn from_safetensors(
        backend: B,
        weights: &crate::weights::Weights,
        prefix: &str,
        eps: f64,
    ) -> Result<Self> {
        let (sd, shapes, unexpected) = crate::weights::read_layer::<P>(weights, prefix)?;
        let c = match &shapes[2] {
            Some(s) if s.len() == 1 => s[0],
            _ => sd.running_mean.as_ref().map_or(0, Vec::len),
        };
        let key = |n: &str| crate::weights::join(prefix, n);
        Self::from_checked(backend, c, eps, &sd, &shapes, &key, unexpected)
    }
}

impl<const D: usize, T: Float, P: ParamFor<T>> FrozenBatchNorm<D, Cuda, T, P> {
    /// The forward on any stream of the module's context: many threads may share one
    /// module (`Arc`) and run it at once, each on its own stream. No allocation, no
    /// host synchronisation: a CUDA graph can capture it.
    pub fn infer(
        &self,
        stream: &Arc<CudaStream>,
        input: &dyn DevicePtr<T>,
        shape: &Shape,
        output: &mut dyn DevicePtrMut<T>,
    ) -> Result<()> {
        validate::module_rank(D, shape)?;
        let args = Frozen {
            input,
            shape: *shape,
            scale_shift: Cuda::tensor(&self.scale_shift),
        };
        batch_norm_frozen(stream, args, output)
    }

    /// [`infer`](Self::infer) with a fused epilogue (`relu(bn(x))`, `relu(bn(x) + z)`):
    /// one pass, shareable and capturable like `infer`.
    pub fn infer_fused(
        &self,
        stream: &Arc<CudaStream>,
        input: &dyn DevicePtr<T>,
        epilogue: crate::functional::Epilogue<'_, T>,
        shape: &Shape,
        output: &mut dyn DevicePtrMut<T>,
    ) -> Result<()> {
        validate::module_rank(D, shape)?;
        let args = Frozen {
            input,
            shape: *shape,
            scale_shift: Cuda::tensor(&self.scale_shift),
        };
        crate::functional::batch_norm_frozen_fused(stream, args, Some(epilogue), output)
    }
}

fn host_coefficients<T: Float, P: ParamFor<T>>(
    buffers: &[Vec<P>; 4],
    eps: f64,
) -> Result<Vec<T::Acc>> {
    let [w, b, rm, rv] = buffers;
    coefficients::<P, T::Acc>(Some(w), Some(b), rm, rv, eps)
}

fn frozen_name(d: usize) -> &'static str {
    match d {
        1 => "FrozenBatchNorm1d",
        2 => "FrozenBatchNorm2d",
        _ => "FrozenBatchNorm3d",
    }
}

/// A frozen BatchNorm's coefficients, `Acc[2C]` as [`crate::raw::ForwardArgs::frozen`] takes them:
/// `scale = weight / sqrt(running_var + eps)` then `shift = bias - running_mean *
/// scale`, computed in the accumulator type with eps added there (as every eval here
/// adds it). `None` for a weight or bias means 1 or 0. Slices shorter than
/// `running_mean` are an error.
pub fn coefficients<P: Float, A: Float>(
    weight: Option<&[P]>,
    bias: Option<&[P]>,
    running_mean: &[P],
    running_var: &[P],
    eps: f64,
) -> Result<Vec<A>> {
    let c = running_mean.len();
    for (name, len) in [
        ("running_var", Some(running_var.len())),
        ("weight", weight.map(<[P]>::len)),
        ("bias", bias.map(<[P]>::len)),
    ] {
        validate::feature(name, c, len)?;
    }
    let mut out = crate::cpu::host_vec(2 * c, A::default())?;
    let acc = |v: f64| A::from_f64(v).to_f64();
    let eps = acc(eps);
    for ch in 0..c {
        let w = weight.map_or(1.0, |w| w[ch].to_f64());
        let b = bias.map_or(0.0, |b| b[ch].to_f64());
        // Each step rounded to the accumulator type, as a kernel would compute it.
        let invstd = acc(1.0 / acc(acc(running_var[ch].to_f64()) + eps).sqrt());
        let scale = acc(w * invstd);
        let shift = acc(b - acc(running_mean[ch].to_f64() * scale));
        out[ch] = A::from_f64(scale);
        out[c + ch] = A::from_f64(shift);
    }
    Ok(out)
}

//! `BatchNorm1d`, `BatchNorm2d` and `BatchNorm3d` on CUDA: [`crate::module::BatchNorm`]
//! over the [`Cuda`] backend.
//!
//! ```no_run
//! use cuda_batchnorm::{nn::BatchNorm2d, open_device, BatchNormOptions, Cuda, Shape};
//! # fn main() -> cuda_batchnorm::Result<()> {
//! let ctx = open_device(0)?;
//! let stream = ctx.default_stream();
//! let mut bn = BatchNorm2d::<f32>::new(Cuda::new(&stream), 64, BatchNormOptions::default())?;
//! let shape = Shape::nchw(32, 64, 56, 56)?;
//! let x = stream.clone_htod(&vec![0.5f32; shape.numel()]).unwrap();
//! let y = bn.forward(&x, &shape)?;              // training: batch statistics
//! let dy = stream.clone_htod(&vec![1.0f32; shape.numel()]).unwrap();
//! let grads = bn.backward(&dy, &x, &shape)?;   // dx, dweight, dbias
//! bn.eval();
//! let y_eval = bn.forward(&x, &shape)?;         // running statistics
//! # let _ = (y, grads, y_eval); Ok(()) }
//! ```

use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

use crate::dtype::{Float, ParamFor};
use crate::error::{BnError, Result};
use crate::functional::{batch_norm_eval_fused, Cuda, Epilogue, Eval};
use crate::module::BatchNorm;
use crate::shape::Shape;
use crate::validate;

/// `torch.nn.BatchNorm1d` on CUDA: inputs (N, C) or (N, C, L).
pub type BatchNorm1d<T, P = T> = BatchNorm<1, Cuda, T, P>;
/// `torch.nn.BatchNorm2d` on CUDA: inputs (N, C, H, W).
pub type BatchNorm2d<T, P = T> = BatchNorm<2, Cuda, T, P>;
/// `torch.nn.BatchNorm3d` on CUDA: inputs (N, C, D, H, W).
pub type BatchNorm3d<T, P = T> = BatchNorm<3, Cuda, T, P>;
/// torchvision's `FrozenBatchNorm2d` for inputs (N, C) or (N, C, L), on CUDA
/// ([`crate::frozen`]).
pub type FrozenBatchNorm1d<T, P = T> = crate::frozen::FrozenBatchNorm<1, Cuda, T, P>;
/// torchvision's `FrozenBatchNorm2d` on CUDA: inputs (N, C, H, W).
pub type FrozenBatchNorm2d<T, P = T> = crate::frozen::FrozenBatchNorm<2, Cuda, T, P>;
/// `FrozenBatchNorm3d` on CUDA: inputs (N, C, D, H, W).
pub type FrozenBatchNorm3d<T, P = T> = crate::frozen::FrozenBatchNorm<3, Cuda, T, P>;

impl<const D: usize, T: Float, P: ParamFor<T>> BatchNorm<D, Cuda, T, P> {
    /// The eval forward with the running statistics, through a shared reference and on
    /// any stream of the module's context: many threads may run it on one module at
    /// once. Needs tracked running statistics; ignores the training flag; changes
    /// nothing, allocates nothing.
    pub fn infer(
        &self,
        stream: &Arc<CudaStream>,
        input: &dyn DevicePtr<T>,
        shape: &Shape,
        output: &mut dyn DevicePtrMut<T>,
    ) -> Result<()> {
        self.eval_with(stream, input, None, shape, output)
    }

    /// [`infer`](Self::infer) with a fused epilogue (`relu(bn(x))`, `relu(bn(x) + z)`)
    /// in the same one pass (as [`crate::FrozenBatchNorm::infer_fused`]).
    pub fn infer_fused(
        &self,
        stream: &Arc<CudaStream>,
        input: &dyn DevicePtr<T>,
        epilogue: Epilogue<'_, T>,
        shape: &Shape,
        output: &mut dyn DevicePtrMut<T>,
    ) -> Result<()> {
        self.eval_with(stream, input, Some(epilogue), shape, output)
    }

    fn eval_with(
        &self,
        stream: &Arc<CudaStream>,
        input: &dyn DevicePtr<T>,
        epilogue: Option<Epilogue<'_, T>>,
        shape: &Shape,
        output: &mut dyn DevicePtrMut<T>,
    ) -> Result<()> {
        validate::module_rank(D, shape)?;
        let (Some(running_mean), Some(running_var)) = (self.running_mean(), self.running_var())
        else {
            return Err(BnError::MissingRunningStat {
                name: "running_mean",
            });
        };
        let args = Eval {
            input,
            shape: *shape,
            running_mean,
            running_var,
            weight: self.weight().map(|w| w as &dyn DevicePtr<P>),
            bias: self.bias().map(|b| b as &dyn DevicePtr<P>),
            eps: self.options().eps,
        };
        batch_norm_eval_fused(stream, args, epilogue, output)
    }
}

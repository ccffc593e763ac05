//! Backends: where tensors live and how a validated batch-norm call runs there.
//!
//! [`Cuda`](crate::functional::Cuda) runs the kernels on a GPU stream;
//! [`Cpu`](crate::cpu::Cpu) computes on host slices in f64. The argument structs here
//! are shared by both, so that `torch.nn.functional.batch_norm`'s arguments are spelled
//! once, and the modules ([`crate::module::BatchNorm`]) are written once over any
//! backend.

use crate::dtype::{DType, Float, ParamFor};
use crate::error::Result;
use crate::shape::Shape;
use crate::validate::{self, BackwardSpec, ForwardKind, ForwardSpec};

/// Anything with a length in elements.
pub trait Len {
    /// Elements.
    fn len(&self) -> usize;
    /// No elements.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<E> Len for [E] {
    fn len(&self) -> usize {
        <[E]>::len(self)
    }
}

/// A place where tensors live and batch norm runs.
pub trait Backend: Sized + Send + Sync {
    /// A tensor read by a call: `dyn DevicePtr<E>` on CUDA, `[E]` on the CPU.
    type Tensor<'t, E: Float>: ?Sized + Len + 't;
    /// A tensor written by a call: `dyn DevicePtrMut<E>` on CUDA, `[E]` on the CPU.
    type TensorMut<'t, E: Float>: ?Sized + Len + 't;
    /// An owned buffer: `CudaSlice<E>` on CUDA, `Vec<E>` on the CPU.
    type Buffer<E: Float>: Send + Sync;
    /// Scratch memory reused across calls.
    type Workspace: Default + Send + Sync;

    /// PyTorch's name for a tensor of `dtype` on this backend (`torch.FloatTensor`,
    /// `torch.cuda.HalfTensor`, ...), for messages that quote autograd.
    fn torch_type(dtype: DType) -> String {
        crate::dtype::torch_tensor_type(dtype, "torch")
    }

    /// A buffer of `len` copies of `fill`.
    fn alloc<E: Float>(&self, len: usize, fill: E) -> Result<Self::Buffer<E>>;
    /// A new buffer holding `values`: a host-to-backend upload in one call.
    fn upload<E: Float>(&self, values: &[E]) -> Result<Self::Buffer<E>> {
        let mut b = self.alloc(values.len(), E::default())?;
        self.copy_from_host(&mut b, values)?;
        Ok(b)
    }
    /// A buffer's length.
    fn buffer_len<E: Float>(b: &Self::Buffer<E>) -> usize;
    /// A buffer as a read tensor.
    fn tensor<E: Float>(b: &Self::Buffer<E>) -> &Self::Tensor<'_, E>;
    /// A buffer as a written tensor.
    fn tensor_mut<E: Float>(b: &mut Self::Buffer<E>) -> &mut Self::TensorMut<'_, E>;
    /// The same read tensor for a shorter lifetime. (Associated types are invariant in
    /// their lifetime, so the modules shorten callers' tensors explicitly.)
    fn reborrow<'s, 'l: 's, E: Float>(t: &'s Self::Tensor<'l, E>) -> &'s Self::Tensor<'s, E>;
    /// The same written tensor for a shorter lifetime.
    fn reborrow_mut<'s, 'l: 's, E: Float>(
        t: &'s mut Self::TensorMut<'l, E>,
    ) -> &'s mut Self::TensorMut<'s, E>;
    /// A buffer's contents on the host.
    fn to_host<E: Float>(&self, b: &Self::Buffer<E>) -> Result<Vec<E>>;
    /// Overwrites a buffer with host values (same length, else
    /// [`BnError::CopyLength`](crate::BnError::CopyLength)).
    fn copy_from_host<E: Float>(&self, b: &mut Self::Buffer<E>, v: &[E]) -> Result<()>;

    /// The forward of `torch.nn.functional.batch_norm`, validated then run.
    fn batch_norm<T: Float, P: ParamFor<T>>(
        &self,
        args: Forward<'_, Self, T, P>,
        output: &mut Self::TensorMut<'_, T>,
        save: Option<SaveStats<'_, Self, T::Acc>>,
        workspace: &mut Self::Workspace,
    ) -> Result<()> {
        self.batch_norm_fused(args, None, output, save, workspace)
    }

    /// The forward with a fused epilogue (`relu(bn(x))`, `relu(bn(x) + z)`) when one is
    /// given, validated then run.
    fn batch_norm_fused<T: Float, P: ParamFor<T>>(
        &self,
        args: Forward<'_, Self, T, P>,
        epilogue: Option<Epilogue<'_, Self, T>>,
        output: &mut Self::TensorMut<'_, T>,
        save: Option<SaveStats<'_, Self, T::Acc>>,
        workspace: &mut Self::Workspace,
    ) -> Result<()>;

    /// The backward, validated then run.
    fn batch_norm_backward<T: Float, P: ParamFor<T>>(
        &self,
        args: Backward<'_, Self, T, P>,
        grads: Grads<'_, Self, T, P>,
        workspace: &mut Self::Workspace,
    ) -> Result<()> {
        self.batch_norm_backward_fused(args, None, grads, workspace)
    }

    /// The backward of a fused forward: `args.grad_output` is the gradient of the
    /// epilogue's output, masked by the ReLU here.
    fn batch_norm_backward_fused<T: Float, P: ParamFor<T>>(
        &self,
        args: Backward<'_, Self, T, P>,
        epilogue: Option<EpilogueGrad<'_, Self, T>>,
        grads: Grads<'_, Self, T, P>,
        workspace: &mut Self::Workspace,
    ) -> Result<()>;

    /// A frozen BatchNorm's forward, `y = x * scale + shift` per channel, validated
    /// then run ([`crate::frozen`]).
    fn batch_norm_frozen<T: Float>(
        &self,
        args: Frozen<'_, Self, T>,
        output: &mut Self::TensorMut<'_, T>,
    ) -> Result<()> {
        self.batch_norm_frozen_fused(args, None, output)
    }

    /// The frozen forward with a fused epilogue when one is given.
    fn batch_norm_frozen_fused<T: Float>(
        &self,
        args: Frozen<'_, Self, T>,
        epilogue: Option<Epilogue<'_, Self, T>>,
        output: &mut Self::TensorMut<'_, T>,
    ) -> Result<()>;

    /// Its backward, `dx = dy * scale` per channel (`args.input` is dy; the shift is not
    /// read), validated then run.
    fn batch_norm_frozen_backward<T: Float>(
        &self,
        args: Frozen<'_, Self, T>,
        grad_input: &mut Self::TensorMut<'_, T>,
    ) -> Result<()> {
        self.batch_norm_frozen_backward_fused(args, None, grad_input)
    }

    /// The frozen backward of a fused forward (dy masked by the ReLU first).
    fn batch_norm_frozen_backward_fused<T: Float>(
        &self,
        args: Frozen<'_, Self, T>,
        epilogue: Option<EpilogueGrad<'_, Self, T>>,
        grad_input: &mut Self::TensorMut<'_, T>,
    ) -> Result<()>;
}

/// What a fused call applies to the normalised values before it writes them, in the
/// same pass (cuDNN's `BN_ACTIVATION` and `BN_ADD_ACTIVATION`): PyTorch's
/// `relu(bn(x))` and ResNet's `relu(bn(x) + z)`. The add and the ReLU run in the
/// accumulator type, and y is rounded once.
pub enum Epilogue<'a, B: Backend, T: Float> {
    /// `y = relu(bn(x))`.
    Relu,
    /// `y = relu(bn(x) + residual)`.
    AddRelu {
        /// z: `shape.numel()` elements in the input's memory format.
        residual: &'a B::Tensor<'a, T>,
    },
}

impl<B: Backend, T: Float> Epilogue<'_, B, T> {
    /// Checks the residual's length against the shape.
    pub fn validate(&self, shape: &Shape) -> Result<()> {
        match self {
            Epilogue::Relu => Ok(()),
            Epilogue::AddRelu { residual } => {
                validate::buffer("residual", shape.numel(), residual.len(), shape)
            }
        }
    }
}

/// The backward of an [`Epilogue`]: the ReLU's mask is recovered from the forward's
/// output (a zero gradient where `y <= 0`, as PyTorch's `threshold_backward`), and the
/// residual's gradient, the masked dy, is written where there was a residual.
pub enum EpilogueGrad<'a, B: Backend, T: Float> {
    /// The forward was `y = relu(bn(x))`.
    Relu {
        /// Its output y.
        output: &'a B::Tensor<'a, T>,
    },
    /// The forward was `y = relu(bn(x) + z)`.
    AddRelu {
        /// Its output y.
        output: &'a B::Tensor<'a, T>,
        /// Written with d loss / d z.
        grad_residual: &'a mut B::TensorMut<'a, T>,
    },
}

impl<B: Backend, T: Float> EpilogueGrad<'_, B, T> {
    /// Checks the output's and the residual gradient's lengths against the shape.
    pub fn validate(&self, shape: &Shape) -> Result<()> {
        let numel = shape.numel();
        match self {
            EpilogueGrad::Relu { output } => validate::buffer("output", numel, output.len(), shape),
            EpilogueGrad::AddRelu {
                output,
                grad_residual,
            } => {
                validate::buffer("output", numel, output.len(), shape)?;
                validate::buffer("grad_residual", numel, grad_residual.len(), shape)
            }
        }
    }
}

/// Checks an optional epilogue (see [`Epilogue::validate`]).
pub fn validate_epilogue<B: Backend, T: Float>(
    e: &Option<Epilogue<'_, B, T>>,
    shape: &Shape,
) -> Result<()> {
    e.as_ref().map_or(Ok(()), |e| e.validate(shape))
}

/// Checks an optional backward epilogue (see [`EpilogueGrad::validate`]).
pub fn validate_epilogue_grad<B: Backend, T: Float>(
    e: &Option<EpilogueGrad<'_, B, T>>,
    shape: &Shape,
) -> Result<()> {
    e.as_ref().map_or(Ok(()), |e| e.validate(shape))
}

/// A frozen BatchNorm call's arguments: the coefficients are computed once
/// ([`crate::frozen::coefficients`]) and only read here.
pub struct Frozen<'a, B: Backend, T: Float> {
    /// x for the forward, dy for the backward; `shape.numel()` elements.
    pub input: &'a B::Tensor<'a, T>,
    /// Its size and memory format.
    pub shape: Shape,
    /// `Acc[2C]`: scale (C) then shift (C).
    pub scale_shift: &'a B::Tensor<'a, T::Acc>,
}

impl<B: Backend, T: Float> Frozen<'_, B, T> {
    /// Validates the call ([`validate::frozen`]) given the buffer it writes;
    /// `Ok(false)`: the input is empty and there is nothing to do.
    pub fn validate(&self, output: &B::TensorMut<'_, T>) -> Result<bool> {
        validate::frozen(
            &self.shape,
            self.input.len(),
            output.len(),
            self.scale_shift.len(),
        )
    }
}

/// `torch.nn.functional.batch_norm`'s arguments, output and saved statistics apart.
pub struct Forward<'a, B: Backend, T: Float, P: ParamFor<T>> {
    /// Input, `shape.numel()` elements in `shape`'s memory format.
    pub input: &'a B::Tensor<'a, T>,
    /// The input's size and memory format.
    pub shape: Shape,
    /// Running mean (C): read in eval, updated in training.
    pub running_mean: Option<&'a mut B::TensorMut<'a, P>>,
    /// Running variance (C), likewise.
    pub running_var: Option<&'a mut B::TensorMut<'a, P>>,
    /// Scale (C); absent means 1.
    pub weight: Option<&'a B::Tensor<'a, P>>,
    /// Shift (C); absent means 0.
    pub bias: Option<&'a B::Tensor<'a, P>>,
    /// Normalise with this batch's statistics (and update the running ones if given).
    pub training: bool,
    /// The running-average factor: `running = momentum * batch + (1 - momentum) * running`.
    pub momentum: f64,
    /// Added to the variance.
    pub eps: f64,
}

/// Where a training forward leaves the batch statistics for the backward.
pub struct SaveStats<'a, B: Backend, A: Float> {
    /// Batch mean (C).
    pub mean: &'a mut B::TensorMut<'a, A>,
    /// 1 / sqrt(biased batch variance + eps) (C).
    pub invstd: &'a mut B::TensorMut<'a, A>,
}

/// The statistics a backward differentiates through.
pub enum BackwardStats<'a, B: Backend, A: Float, P: Float> {
    /// Training: the forward's saved batch statistics.
    Batch {
        /// save_mean (C).
        save_mean: &'a B::Tensor<'a, A>,
        /// save_invstd (C).
        save_invstd: &'a B::Tensor<'a, A>,
    },
    /// Eval: the running statistics and eps the forward used.
    Running {
        /// running_mean (C).
        mean: &'a B::Tensor<'a, P>,
        /// running_var (C).
        var: &'a B::Tensor<'a, P>,
        /// eps.
        eps: f64,
    },
}

/// A backward's inputs.
pub struct Backward<'a, B: Backend, T: Float, P: ParamFor<T>> {
    /// Gradient of the output.
    pub grad_output: &'a B::Tensor<'a, T>,
    /// The forward's input.
    pub input: &'a B::Tensor<'a, T>,
    /// Their size and memory format.
    pub shape: Shape,
    /// The forward's weight; absent means 1.
    pub weight: Option<&'a B::Tensor<'a, P>>,
    /// Statistics of the forward.
    pub stats: BackwardStats<'a, B, T::Acc, P>,
}

/// A backward's outputs.
pub struct Grads<'a, B: Backend, T: Float, P: ParamFor<T>> {
    /// Gradient of the input.
    pub input: &'a mut B::TensorMut<'a, T>,
    /// Gradient of the weight, if wanted.
    pub weight: Option<&'a mut B::TensorMut<'a, P>>,
    /// Gradient of the bias, if wanted.
    pub bias: Option<&'a mut B::TensorMut<'a, P>>,
}

impl<B: Backend, T: Float, P: ParamFor<T>> Forward<'_, B, T, P> {
    /// Validates the call ([`validate::forward`]) given the output and saved-statistics
    /// buffers it writes. Every backend calls this before running anything.
    pub fn validate(
        &self,
        output: &B::TensorMut<'_, T>,
        save: Option<&SaveStats<'_, B, T::Acc>>,
    ) -> Result<ForwardKind> {
        validate::forward(&ForwardSpec {
            shape: self.shape,
            training: self.training,
            eps: self.eps,
            momentum: self.momentum,
            input: self.input.len(),
            output: output.len(),
            weight: self.weight.map(|b| b.len()),
            bias: self.bias.map(|b| b.len()),
            running_mean: self.running_mean.as_ref().map(|b| b.len()),
            running_var: self.running_var.as_ref().map(|b| b.len()),
            save_mean: save.map(|s| s.mean.len()),
            save_invstd: save.map(|s| s.invstd.len()),
        })
    }
}

impl<B: Backend, T: Float, P: ParamFor<T>> Backward<'_, B, T, P> {
    /// Validates the call ([`validate::backward`]) given the gradients it writes.
    /// `Ok(false)`: the input is empty and only the parameter gradients are zeroed.
    pub fn validate(&self, grads: &Grads<'_, B, T, P>) -> Result<bool> {
        let (batch_stats, stats, eps) = match &self.stats {
            BackwardStats::Batch {
                save_mean,
                save_invstd,
            } => (true, (Some(save_mean.len()), Some(save_invstd.len())), 0.0),
            BackwardStats::Running { mean, var, eps } => {
                (false, (Some(mean.len()), Some(var.len())), *eps)
            }
        };
        validate::backward(&BackwardSpec {
            shape: self.shape,
            batch_stats,
            eps,
            grad_output: self.grad_output.len(),
            input: self.input.len(),
            grad_input: grads.input.len(),
            weight: self.weight.map(|w| w.len()),
            stats,
            grad_weight: grads.weight.as_ref().map(|g| g.len()),
            grad_bias: grads.bias.as_ref().map(|g| g.len()),
        })
    }
}

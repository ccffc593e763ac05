//! `torch.nn.BatchNorm1d / 2d / 3d`, once, over any [`Backend`].
//!
//! [`BatchNorm<D, B, T, P>`]: `D` is 1, 2 or 3 (which input ranks it takes; 0, any rank
//! of 2 or more, is the local module of [`crate::sync::SyncBatchNorm`]), `B` the
//! backend ([`crate::functional::Cuda`] or [`crate::cpu::Cpu`]), `T` the input type and
//! `P` the parameter type. `crate::nn::BatchNorm2d<T>` and `crate::cpu::BatchNorm2d<T>`
//! are aliases.
//!
//! Semantics are PyTorch's: the four modes of (training, track_running_stats), the
//! running-statistics update with `momentum` or the cumulative average
//! (`momentum: None`), `num_batches_tracked`, empty batches (the counter still
//! advances in training). One deviation: a call that returns `Err` changes nothing, the
//! counter included (PyTorch increments it before validating the input).

use crate::backend::{
    Backend, BackwardStats, Epilogue, EpilogueGrad, Forward, Grads, Len, SaveStats,
};
use crate::dtype::{Float, ParamFor};
use crate::error::{BnError, Result};
use crate::shape::Shape;
use crate::validate::{self, ForwardSpec};

/// A module's options, PyTorch's defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNormOptions {
    /// Added to the variance (default 1e-5).
    pub eps: f64,
    /// Running-average factor (default `Some(0.1)`); `None` is the cumulative average.
    pub momentum: Option<f64>,
    /// Learnable weight and bias (default true).
    pub affine: bool,
    /// Keep running statistics and use them in eval (default true).
    pub track_running_stats: bool,
}

impl Default for BatchNormOptions {
    fn default() -> Self {
        BatchNormOptions {
            eps: 1e-5,
            momentum: Some(0.1),
            affine: true,
            track_running_stats: true,
        }
    }
}

/// A module's parameters and buffers on the host, under PyTorch's state_dict keys.
/// `None` is an absent key.
#[derive(Clone, Debug, PartialEq)]
pub struct StateDict<P> {
    /// `weight`.
    pub weight: Option<Vec<P>>,
    /// `bias`.
    pub bias: Option<Vec<P>>,
    /// `running_mean`.
    pub running_mean: Option<Vec<P>>,
    /// `running_var`.
    pub running_var: Option<Vec<P>>,
    /// `num_batches_tracked`.
    pub num_batches_tracked: Option<i64>,
}

/// The keys a non-strict load did not match, as PyTorch's `load_state_dict` returns
/// them (`_IncompatibleKeys`): empty lists when everything matched.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IncompatibleKeys {
    /// Keys the module has that the source lacks.
    pub missing_keys: Vec<String>,
    /// Keys the source has that the module does not.
    pub unexpected_keys: Vec<String>,
}

/// Gradients returned by [`BatchNorm::backward`].
pub struct Gradients<B: Backend, T: Float, P: Float> {
    /// d loss / d input.
    pub input: B::Buffer<T>,
    /// d loss / d weight (affine modules).
    pub weight: Option<B::Buffer<P>>,
    /// d loss / d bias (affine modules).
    pub bias: Option<B::Buffer<P>>,
    /// d loss / d residual, after a fused `relu(bn(x) + z)` forward
    /// ([`BatchNorm::backward_fused`]).
    pub residual: Option<B::Buffer<T>>,
}

/// Version counters of the tensors a backward reads from the module, as PyTorch's
/// autograd keeps them: every in-place change (an optimiser's step through
/// `weight_mut`, `load_state_dict`) counts one. They start at 1, as a fresh PyTorch
/// module's do after its initialisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Versions {
    weight: u64,
    running_mean: u64,
    running_var: u64,
}

impl Versions {
    const FRESH: Versions = Versions {
        weight: 1,
        running_mean: 1,
        running_var: 1,
    };
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct LastForward {
    shape: Shape,
    batch_stats: bool,
    /// The versions the forward saw, which its backward needs unchanged.
    versions: Versions,
    /// The forward's fused epilogue, which its backward must differentiate.
    fused: Fused,
}

/// Which epilogue a forward fused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fused {
    None,
    Relu,
    AddRelu,
}

impl Fused {
    pub(crate) fn of<B: Backend, T: Float>(e: &Option<Epilogue<'_, B, T>>) -> Fused {
        match e {
            None => Fused::None,
            Some(Epilogue::Relu) => Fused::Relu,
            Some(Epilogue::AddRelu { .. }) => Fused::AddRelu,
        }
    }

    pub(crate) fn of_grad<B: Backend, T: Float>(e: &Option<EpilogueGrad<'_, B, T>>) -> Fused {
        match e {
            None => Fused::None,
            Some(EpilogueGrad::Relu { .. }) => Fused::Relu,
            Some(EpilogueGrad::AddRelu { .. }) => Fused::AddRelu,
        }
    }
}

impl<B: Backend, T: Float, P: Float> std::fmt::Debug for Gradients<B, T, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gradients")
            .field("input", &B::buffer_len(&self.input))
            .field("weight", &self.weight.as_ref().map(B::buffer_len))
            .field("bias", &self.bias.as_ref().map(B::buffer_len))
            .finish()
    }
}

impl<const D: usize, B: Backend + std::fmt::Debug, T: Float, P: ParamFor<T>> std::fmt::Debug
    for BatchNorm<D, B, T, P>
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct(self.name())
            .field("num_features", &self.num_features)
            .field("input", &T::DTYPE)
            .field("param", &P::DTYPE)
            .field("options", &self.options)
            .field("training", &self.training)
            .field("num_batches_tracked", &self.num_batches_tracked)
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

/// A module's state, borrowed for one synchronised call (crate::sync).
pub(crate) struct Parts<'m, B: Backend, T: Float, P: ParamFor<T>> {
    pub(crate) weight: Option<&'m B::Buffer<P>>,
    pub(crate) bias: Option<&'m B::Buffer<P>>,
    pub(crate) running_mean: Option<&'m mut B::Buffer<P>>,
    pub(crate) running_var: Option<&'m mut B::Buffer<P>>,
    pub(crate) save_mean: &'m mut B::Buffer<T::Acc>,
    pub(crate) save_invstd: &'m mut B::Buffer<T::Acc>,
    pub(crate) workspace: &'m mut B::Workspace,
}

/// `BatchNorm{D}d` on backend `B`, input type `T`, parameter type `P`.
pub struct BatchNorm<const D: usize, B: Backend, T: Float, P: ParamFor<T> = T> {
    backend: B,
    num_features: usize,
    options: BatchNormOptions,
    training: bool,
    num_batches_tracked: i64,
    weight: Option<B::Buffer<P>>,
    bias: Option<B::Buffer<P>>,
    running_mean: Option<B::Buffer<P>>,
    running_var: Option<B::Buffer<P>>,
    save_mean: B::Buffer<T::Acc>,
    save_invstd: B::Buffer<T::Acc>,
    workspace: B::Workspace,
    last: Option<LastForward>,
    versions: Versions,
}

impl<const D: usize, B: Backend, T: Float, P: ParamFor<T>> BatchNorm<D, B, T, P> {
    /// A module in training mode with weight 1, bias 0, running_mean 0, running_var 1
    /// and num_batches_tracked 0, as PyTorch initialises it.
    pub fn new(backend: B, num_features: usize, options: BatchNormOptions) -> Result<Self> {
        let one = P::from_f64(1.0);
        let zero = P::from_f64(0.0);
        let (affine, track) = (options.affine, options.track_running_stats);
        Ok(BatchNorm {
            weight: if affine {
                Some(backend.alloc(num_features, one)?)
            } else {
                None
            },
            bias: if affine {
                Some(backend.alloc(num_features, zero)?)
            } else {
                None
            },
            running_mean: if track {
                Some(backend.alloc(num_features, zero)?)
            } else {
                None
            },
            running_var: if track {
                Some(backend.alloc(num_features, one)?)
            } else {
                None
            },
            save_mean: backend.alloc(num_features, T::Acc::from_f64(0.0))?,
            save_invstd: backend.alloc(num_features, T::Acc::from_f64(0.0))?,
            workspace: B::Workspace::default(),
            backend,
            num_features,
            options,
            training: true,
            num_batches_tracked: 0,
            last: None,
            versions: Versions::FRESH,
        })
    }

    /// `BatchNorm1d`, `BatchNorm2d` or `BatchNorm3d`.
    pub fn name(&self) -> &'static str {
        match D {
            0 => "SyncBatchNorm",
            1 => "BatchNorm1d",
            2 => "BatchNorm2d",
            _ => "BatchNorm3d",
        }
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// C.
    pub fn num_features(&self) -> usize {
        self.num_features
    }

    /// The options it was built with.
    pub fn options(&self) -> &BatchNormOptions {
        &self.options
    }

    /// Training mode (batch statistics; running statistics updated).
    pub fn train(&mut self) {
        self.training = true;
    }

    /// Evaluation mode (running statistics, if tracked).
    pub fn eval(&mut self) {
        self.training = false;
    }

    /// Whether in training mode.
    pub fn is_training(&self) -> bool {
        self.training
    }

    /// Training forwards counted so far (0 when running statistics are not tracked).
    pub fn num_batches_tracked(&self) -> i64 {
        self.num_batches_tracked
    }

    /// The weight, if affine.
    pub fn weight(&self) -> Option<&B::Buffer<P>> {
        self.weight.as_ref()
    }

    /// The weight, mutably (for an optimiser). Counts as an in-place change: a
    /// backward of a forward before this call fails, as in PyTorch.
    pub fn weight_mut(&mut self) -> Option<&mut B::Buffer<P>> {
        self.versions.weight += 1;
        self.weight.as_mut()
    }

    /// Overwrites the weight with host values (C of them): an in-place change, as
    /// [`weight_mut`](Self::weight_mut). Fails, changing nothing, for a module without
    /// affine parameters or values of another length.
    pub fn set_weight(&mut self, values: &[P]) -> Result<()> {
        let Some(w) = self.weight.as_mut() else {
            return Err(BnError::NoAffineParameters);
        };
        self.backend.copy_from_host(w, values)?;
        self.versions.weight += 1;
        Ok(())
    }

    /// Overwrites the bias with host values (C of them); as [`set_weight`](Self::set_weight).
    pub fn set_bias(&mut self, values: &[P]) -> Result<()> {
        let Some(b) = self.bias.as_mut() else {
            return Err(BnError::NoAffineParameters);
        };
        self.backend.copy_from_host(b, values)
    }

    /// The bias, if affine.
    pub fn bias(&self) -> Option<&B::Buffer<P>> {
        self.bias.as_ref()
    }

    /// The bias, mutably. (The backward does not read the bias, so changing it does
    /// not invalidate the last forward, as in PyTorch.)
    pub fn bias_mut(&mut self) -> Option<&mut B::Buffer<P>> {
        self.bias.as_mut()
    }

    /// The running mean, if tracked.
    pub fn running_mean(&self) -> Option<&B::Buffer<P>> {
        self.running_mean.as_ref()
    }

    /// The running variance, if tracked.
    pub fn running_var(&self) -> Option<&B::Buffer<P>> {
        self.running_var.as_ref()
    }

    /// The batch mean that the last forward saved for its backward (PyTorch's
    /// `save_mean`): `None` until a forward with batch statistics (in training, or in
    /// eval without running statistics) has run, and after one with the running
    /// statistics. A forward refused by validation leaves the last one's; after a call
    /// that failed in its kernels or collectives the values are unspecified (as its
    /// backward's would be).
    pub fn saved_mean(&self) -> Option<&B::Buffer<T::Acc>> {
        self.saved_batch_stats().then_some(&self.save_mean)
    }

    /// Its invstd, `1 / sqrt(var + eps)` of the biased variance (PyTorch's
    /// `save_invstd`), when [`saved_mean`](Self::saved_mean) is there.
    pub fn saved_invstd(&self) -> Option<&B::Buffer<T::Acc>> {
        self.saved_batch_stats().then_some(&self.save_invstd)
    }

    fn saved_batch_stats(&self) -> bool {
        self.last.as_ref().is_some_and(|l| l.batch_stats)
    }

    /// Whether a forward now normalises with batch statistics: in training, and in
    /// eval when no running statistics are tracked.
    pub(crate) fn uses_batch_stats(&self) -> bool {
        self.training || !self.options.track_running_stats
    }

    /// The running-average factor of the next forward, as PyTorch computes it.
    pub(crate) fn factor(&self) -> f64 {
        if self.training && self.options.track_running_stats {
            match self.options.momentum {
                Some(m) => m,
                None => 1.0 / self.num_batches_tracked.wrapping_add(1) as f64,
            }
        } else {
            self.options.momentum.unwrap_or(0.0)
        }
    }

    /// The forward into a caller's output buffer. In training (with tracked running
    /// statistics) it updates them and counts the batch.
    pub fn forward_into(
        &mut self,
        input: &B::Tensor<'_, T>,
        shape: &Shape,
        output: &mut B::TensorMut<'_, T>,
    ) -> Result<()> {
        self.forward_fused_into(input, None, shape, output)
    }

    /// [`forward_into`](Self::forward_into) with a fused epilogue: the output is
    /// `relu(bn(x))` or `relu(bn(x) + residual)`, written by the normalisation pass.
    /// Its backward is [`backward_fused_into`](Self::backward_fused_into).
    pub fn forward_fused_into(
        &mut self,
        input: &B::Tensor<'_, T>,
        epilogue: Option<Epilogue<'_, B, T>>,
        shape: &Shape,
        output: &mut B::TensorMut<'_, T>,
    ) -> Result<()> {
        // Everything is checked before anything is allocated for the call.
        self.check_forward(input.len(), output.len(), shape)?;
        crate::backend::validate_epilogue(&epilogue, shape)?;
        let fused = Fused::of(&epilogue);
        let batch_stats = self.uses_batch_stats();
        let momentum = self.factor();
        // A module with no per-channel state takes any channel count, as PyTorch's does;
        // its save buffers follow the input (committed only if the call succeeds).
        let c = shape.c();
        let mut regrown = None;
        if batch_stats
            && B::buffer_len(&self.save_mean) != c
            && !self.options.affine
            && !self.options.track_running_stats
        {
            let zero = T::Acc::from_f64(0.0);
            regrown = Some((self.backend.alloc(c, zero)?, self.backend.alloc(c, zero)?));
        }
        let (save_mean, save_invstd) = match regrown.as_mut() {
            Some((m, i)) => (m, i),
            None => (&mut self.save_mean, &mut self.save_invstd),
        };
        let args = Forward {
            input: B::reborrow(input),
            shape: *shape,
            running_mean: self.running_mean.as_mut().map(B::tensor_mut),
            running_var: self.running_var.as_mut().map(B::tensor_mut),
            weight: self.weight.as_ref().map(B::tensor),
            bias: self.bias.as_ref().map(B::tensor),
            training: batch_stats,
            momentum,
            eps: self.options.eps,
        };
        let save = batch_stats.then(|| SaveStats {
            mean: B::tensor_mut(save_mean),
            invstd: B::tensor_mut(save_invstd),
        });
        self.backend.batch_norm_fused(
            args,
            epilogue,
            B::reborrow_mut(output),
            save,
            &mut self.workspace,
        )?;
        if let Some((m, i)) = regrown {
            self.save_mean = m;
            self.save_invstd = i;
        }
        if self.training && self.options.track_running_stats {
            // Wrapping, like PyTorch's int64 counter: a state dict may set i64::MAX.
            self.num_batches_tracked = self.num_batches_tracked.wrapping_add(1);
        }
        self.last = Some(LastForward {
            shape: *shape,
            batch_stats,
            versions: self.versions,
            fused,
        });
        Ok(())
    }

    /// Every check of a forward on this input, made before anything is allocated for
    /// it, so that a bad size cannot ask for a huge output first.
    pub(crate) fn check_forward(&self, input: usize, output: usize, shape: &Shape) -> Result<()> {
        validate::module_rank(D, shape)?;
        validate::forward(&self.forward_spec(input, output, shape)).map(|_| ())
    }

    /// The checks of a synchronised training forward: [`check_forward`](Self::check_forward)'s,
    /// the values per channel left to the caller to count over every rank.
    pub(crate) fn check_sync_forward(
        &self,
        input: usize,
        output: usize,
        shape: &Shape,
    ) -> Result<()> {
        validate::module_rank(D, shape)?;
        validate::forward_sync(&self.forward_spec(input, output, shape)).map(|_| ())
    }

    /// A forward on `shape` as validation sees it.
    fn forward_spec(&self, input: usize, output: usize, shape: &Shape) -> ForwardSpec {
        let batch_stats = self.uses_batch_stats();
        ForwardSpec {
            shape: *shape,
            training: batch_stats,
            eps: self.options.eps,
            momentum: self.factor(),
            input,
            output,
            weight: self.weight.as_ref().map(B::buffer_len),
            bias: self.bias.as_ref().map(B::buffer_len),
            running_mean: self.running_mean.as_ref().map(B::buffer_len),
            running_var: self.running_var.as_ref().map(B::buffer_len),
            // forward_into gives a module without per-channel state C of each
            save_mean: batch_stats.then_some(shape.c()),
            save_invstd: batch_stats.then_some(shape.c()),
        }
    }

    /// The forward into a new buffer.
    pub fn forward(&mut self, input: &B::Tensor<'_, T>, shape: &Shape) -> Result<B::Buffer<T>> {
        self.forward_fused(input, None, shape)
    }

    /// The fused forward ([`forward_fused_into`](Self::forward_fused_into)) into a new
    /// buffer.
    pub fn forward_fused(
        &mut self,
        input: &B::Tensor<'_, T>,
        epilogue: Option<Epilogue<'_, B, T>>,
        shape: &Shape,
    ) -> Result<B::Buffer<T>> {
        self.check_forward(input.len(), shape.numel(), shape)?;
        crate::backend::validate_epilogue(&epilogue, shape)?;
        let mut out = self.backend.alloc(shape.numel(), T::from_f64(0.0))?;
        self.forward_fused_into(input, epilogue, shape, B::tensor_mut(&mut out))?;
        Ok(out)
    }

    /// The backward of the last forward (same shape, and the same mode: batch
    /// statistics or running ones). `input` must be that forward's input. Gradients are
    /// written, not accumulated.
    pub fn backward_into(
        &mut self,
        grad_output: &B::Tensor<'_, T>,
        input: &B::Tensor<'_, T>,
        shape: &Shape,
        grad_input: &mut B::TensorMut<'_, T>,
        grad_weight: Option<&mut B::TensorMut<'_, P>>,
        grad_bias: Option<&mut B::TensorMut<'_, P>>,
    ) -> Result<()> {
        self.backward_fused_into(
            grad_output,
            input,
            None,
            shape,
            grad_input,
            grad_weight,
            grad_bias,
        )
    }

    /// The backward of the last forward, which fused `epilogue`'s forward (or none):
    /// `grad_output` is the gradient of the epilogue's output; the ReLU's mask comes
    /// from that output, and [`EpilogueGrad::AddRelu`] receives the residual's gradient.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_fused_into(
        &mut self,
        grad_output: &B::Tensor<'_, T>,
        input: &B::Tensor<'_, T>,
        epilogue: Option<EpilogueGrad<'_, B, T>>,
        shape: &Shape,
        grad_input: &mut B::TensorMut<'_, T>,
        grad_weight: Option<&mut B::TensorMut<'_, P>>,
        grad_bias: Option<&mut B::TensorMut<'_, P>>,
    ) -> Result<()> {
        let last = self.last_forward(shape)?;
        if Fused::of_grad(&epilogue) != last.fused {
            return Err(BnError::Backward(
                "the backward's epilogue must be the one the last forward fused",
            ));
        }
        let stats = if last.batch_stats {
            BackwardStats::Batch {
                save_mean: B::tensor(&self.save_mean),
                save_invstd: B::tensor(&self.save_invstd),
            }
        } else {
            match (&self.running_mean, &self.running_var) {
                (Some(m), Some(v)) => BackwardStats::Running {
                    mean: B::tensor(m),
                    var: B::tensor(v),
                    eps: self.options.eps,
                },
                _ => {
                    return Err(BnError::MissingRunningStat {
                        name: "running_mean",
                    })
                }
            }
        };
        let args = crate::backend::Backward {
            grad_output: B::reborrow(grad_output),
            input: B::reborrow(input),
            shape: *shape,
            weight: self.weight.as_ref().map(B::tensor),
            stats,
        };
        let grads = Grads {
            input: B::reborrow_mut(grad_input),
            weight: grad_weight.map(|g| B::reborrow_mut(g)),
            bias: grad_bias.map(|g| B::reborrow_mut(g)),
        };
        self.backend
            .batch_norm_backward_fused(args, epilogue, grads, &mut self.workspace)
    }

    /// The last forward, which a backward on `shape` differentiates: the same shape,
    /// and none of the tensors the backward reads changed since (PyTorch's autograd
    /// refuses then too; the bias is not read).
    pub(crate) fn last_forward(&self, shape: &Shape) -> Result<LastForward> {
        let last = self.last.ok_or(BnError::Backward(
            "backward needs a forward on this module first",
        ))?;
        if last.shape != *shape {
            return Err(BnError::BackwardShape {
                expected: last.shape.dims().to_vec(),
                got: shape.dims().to_vec(),
            });
        }
        // In the order PyTorch's autograd checks its saved tensors (seen in 2.15).
        let (now, then) = (self.versions, last.versions);
        for (present, version, expected) in [
            (
                self.running_mean.is_some(),
                now.running_mean,
                then.running_mean,
            ),
            (
                self.running_var.is_some(),
                now.running_var,
                then.running_var,
            ),
            (self.weight.is_some(), now.weight, then.weight),
        ] {
            if present && version != expected {
                return Err(BnError::ModifiedInplace {
                    tensor: format!("{} [{}]", B::torch_type(P::DTYPE), self.num_features),
                    version,
                    expected,
                });
            }
        }
        Ok(last)
    }

    /// The backward into new buffers; parameter gradients for affine modules.
    pub fn backward(
        &mut self,
        grad_output: &B::Tensor<'_, T>,
        input: &B::Tensor<'_, T>,
        shape: &Shape,
    ) -> Result<Gradients<B, T, P>> {
        self.backward_with(grad_output, input, None, shape)
    }

    /// The backward of a fused forward into new buffers: `output` is that forward's
    /// output (the ReLU's mask); the residual's gradient is returned when the forward
    /// added one.
    pub fn backward_fused(
        &mut self,
        grad_output: &B::Tensor<'_, T>,
        input: &B::Tensor<'_, T>,
        output: &B::Tensor<'_, T>,
        shape: &Shape,
    ) -> Result<Gradients<B, T, P>> {
        self.backward_with(grad_output, input, Some(output), shape)
    }

    fn backward_with(
        &mut self,
        grad_output: &B::Tensor<'_, T>,
        input: &B::Tensor<'_, T>,
        output: Option<&B::Tensor<'_, T>>,
        shape: &Shape,
    ) -> Result<Gradients<B, T, P>> {
        // Its shape is one a forward accepted, so the buffers below are sized sanely.
        let last = self.last_forward(shape)?;
        if output.is_some() == (last.fused == Fused::None) {
            return Err(BnError::Backward(
                "the backward's epilogue must be the one the last forward fused",
            ));
        }
        if let Some(out) = output {
            validate::buffer("output", shape.numel(), out.len(), shape)?;
        }
        let zero = P::from_f64(0.0);
        let mut g_in = self.backend.alloc(shape.numel(), T::from_f64(0.0))?;
        // The parameters' gradients have the parameters' length (an empty input's C
        // need not be the module's).
        let c = self.num_features;
        let mut g_w = if self.options.affine {
            Some(self.backend.alloc(c, zero)?)
        } else {
            None
        };
        let mut g_b = if self.options.affine {
            Some(self.backend.alloc(c, zero)?)
        } else {
            None
        };
        let mut g_z = if last.fused == Fused::AddRelu {
            Some(self.backend.alloc(shape.numel(), T::from_f64(0.0))?)
        } else {
            None
        };
        let epilogue = match (output, g_z.as_mut()) {
            (None, _) => None,
            (Some(output), None) => Some(EpilogueGrad::Relu {
                output: B::reborrow(output),
            }),
            (Some(output), Some(g)) => Some(EpilogueGrad::AddRelu {
                output: B::reborrow(output),
                grad_residual: B::tensor_mut(g),
            }),
        };
        self.backward_fused_into(
            grad_output,
            input,
            epilogue,
            shape,
            B::tensor_mut(&mut g_in),
            g_w.as_mut().map(B::tensor_mut),
            g_b.as_mut().map(B::tensor_mut),
        )?;
        Ok(Gradients {
            input: g_in,
            weight: g_w,
            bias: g_b,
            residual: g_z,
        })
    }

    /// The state a synchronised forward and backward work on (crate::sync).
    pub(crate) fn parts(&mut self) -> Parts<'_, B, T, P> {
        Parts {
            weight: self.weight.as_ref(),
            bias: self.bias.as_ref(),
            running_mean: self.running_mean.as_mut(),
            running_var: self.running_var.as_mut(),
            save_mean: &mut self.save_mean,
            save_invstd: &mut self.save_invstd,
            workspace: &mut self.workspace,
        }
    }

    /// What a forward that succeeded on `shape` in batch-statistics mode leaves, as
    /// [`forward_fused_into`](Self::forward_fused_into) does: the batch counted (in
    /// training with tracked statistics) and the forward its backward differentiates.
    pub(crate) fn finish_sync_forward(&mut self, shape: &Shape) {
        if self.training && self.options.track_running_stats {
            self.num_batches_tracked = self.num_batches_tracked.wrapping_add(1);
        }
        self.last = Some(LastForward {
            shape: *shape,
            batch_stats: true,
            versions: self.versions,
            fused: Fused::None,
        });
    }

    /// The save buffers' length (C of the last batch-statistics forward, or of the
    /// module).
    pub(crate) fn save_len(&self) -> usize {
        B::buffer_len(&self.save_mean)
    }

    /// Replaces the save buffers (a module without per-channel state takes any channel
    /// count; its save buffers follow the input, as a plain forward's do).
    pub(crate) fn set_save(&mut self, mean: B::Buffer<T::Acc>, invstd: B::Buffer<T::Acc>) {
        self.save_mean = mean;
        self.save_invstd = invstd;
    }

    /// The same module taking the input ranks of `E`, its state kept.
    pub(crate) fn with_rank<const E: usize>(self) -> BatchNorm<E, B, T, P> {
        BatchNorm {
            backend: self.backend,
            num_features: self.num_features,
            options: self.options,
            training: self.training,
            num_batches_tracked: self.num_batches_tracked,
            weight: self.weight,
            bias: self.bias,
            running_mean: self.running_mean,
            running_var: self.running_var,
            save_mean: self.save_mean,
            save_invstd: self.save_invstd,
            workspace: self.workspace,
            last: None,
            versions: self.versions,
        }
    }

    /// Parameters and buffers on the host.
    pub fn state_dict(&self) -> Result<StateDict<P>> {
        let host =
            |b: &Option<B::Buffer<P>>| b.as_ref().map(|b| self.backend.to_host(b)).transpose();
        Ok(StateDict {
            weight: host(&self.weight)?,
            bias: host(&self.bias)?,
            running_mean: host(&self.running_mean)?,
            running_var: host(&self.running_var)?,
            num_batches_tracked: self
                .options
                .track_running_stats
                .then_some(self.num_batches_tracked),
        })
    }

    /// Loads parameters and buffers, as PyTorch's `load_state_dict(sd)` (strict): every
    /// key the module has must be present with C values (a missing
    /// `num_batches_tracked` keeps the current count, as PyTorch does for checkpoints
    /// without it), and no other key may be; otherwise nothing is loaded and the error
    /// lists every problem in PyTorch's words.
    pub fn load_state_dict(&mut self, sd: &StateDict<P>) -> Result<()> {
        self.load_state_dict_with(sd, true).map(|_| ())
    }

    /// `load_state_dict(sd, strict)`: without `strict`, missing and unexpected keys are
    /// returned rather than refused (a key of the wrong size is still an error), and
    /// the keys that are there are loaded.
    pub fn load_state_dict_with(
        &mut self,
        sd: &StateDict<P>,
        strict: bool,
    ) -> Result<IncompatibleKeys> {
        let shape = |v: &Option<Vec<P>>| v.as_ref().map(|v| vec![v.len()]);
        let shapes = [
            shape(&sd.weight),
            shape(&sd.bias),
            shape(&sd.running_mean),
            shape(&sd.running_var),
        ];
        self.load_checked(sd, &shapes, &|name| name.to_string(), Vec::new(), strict)
    }

    /// The one loader: `shapes` are the stored shapes of weight, bias, running_mean and
    /// running_var (as the source has them), `key` names a key in messages (a prefix
    /// for a layer of a larger model), `unexpected` lists further keys the source has
    /// under the layer's prefix. Checks everything before loading anything.
    pub(crate) fn load_checked(
        &mut self,
        sd: &StateDict<P>,
        shapes: &[Option<Vec<usize>>; 4],
        key: &dyn Fn(&str) -> String,
        unexpected: Vec<String>,
        strict: bool,
    ) -> Result<IncompatibleKeys> {
        let (affine, track) = (self.options.affine, self.options.track_running_stats);
        let layout = Layout {
            module: self.name(),
            c: self.num_features,
            expected: [affine, affine, track, track],
            counter: track,
        };
        let keys = check_state_dict(&layout, sd, shapes, key, unexpected, strict)?;
        // Staged: every value goes into a new buffer first, and the module takes them
        // only once all copies succeeded, so a failed copy changes nothing.
        let staged =
            |cur: &Option<B::Buffer<P>>, src: &Option<Vec<P>>| -> Result<Option<B::Buffer<P>>> {
                match (cur, src) {
                    (Some(_), Some(v)) => {
                        let mut b = self.backend.alloc(v.len(), P::from_f64(0.0))?;
                        self.backend.copy_from_host(&mut b, v)?;
                        Ok(Some(b))
                    }
                    _ => Ok(None),
                }
            };
        let weight = staged(&self.weight, &sd.weight)?;
        let bias = staged(&self.bias, &sd.bias)?;
        let running_mean = staged(&self.running_mean, &sd.running_mean)?;
        let running_var = staged(&self.running_var, &sd.running_var)?;
        // Like PyTorch's copy_ into each parameter and buffer: one in-place change each.
        for (dst, new, version) in [
            (&mut self.weight, weight, Some(&mut self.versions.weight)),
            (&mut self.bias, bias, None),
            (
                &mut self.running_mean,
                running_mean,
                Some(&mut self.versions.running_mean),
            ),
            (
                &mut self.running_var,
                running_var,
                Some(&mut self.versions.running_var),
            ),
        ] {
            if let Some(b) = new {
                *dst = Some(b);
                if let Some(v) = version {
                    *v += 1;
                }
            }
        }
        if let (true, Some(n)) = (track, sd.num_batches_tracked) {
            self.num_batches_tracked = n;
        }
        Ok(keys)
    }
}

/// What a module's state dict must hold: which of weight, bias, running_mean and
/// running_var (C values each), and whether `num_batches_tracked` is a key of it
/// (else it is unexpected).
pub(crate) struct Layout {
    pub module: &'static str,
    pub c: usize,
    pub expected: [bool; 4],
    pub counter: bool,
}

/// The check of a state dict against a module's [`Layout`], as PyTorch's
/// `load_state_dict(sd, strict)` makes it: the keys that do not fit, or the error in
/// PyTorch's words, before anything is loaded.
pub(crate) fn check_state_dict<P: Float>(
    layout: &Layout,
    sd: &StateDict<P>,
    shapes: &[Option<Vec<usize>>; 4],
    key: &dyn Fn(&str) -> String,
    unexpected: Vec<String>,
    strict: bool,
) -> Result<IncompatibleKeys> {
    let c = layout.c;
    let names = ["weight", "bias", "running_mean", "running_var"];
    let expected = layout.expected;
    let mut keys = IncompatibleKeys {
        missing_keys: Vec::new(),
        unexpected_keys: unexpected,
    };
    let mut sizes = Vec::new();
    for ((name, expected), got) in names.iter().zip(expected).zip(shapes) {
        match (expected, got) {
            (true, None) => keys.missing_keys.push(key(name)),
            (false, Some(_)) => keys.unexpected_keys.push(key(name)),
            (true, Some(s)) if s.as_slice() != [c] => sizes.push(format!(
                "size mismatch for {}: copying a param with shape {s:?} from checkpoint, the shape in current model is [{c}].",
                key(name)
            )),
            _ => {}
        }
    }
    if !layout.counter && sd.num_batches_tracked.is_some() {
        keys.unexpected_keys.push(key("num_batches_tracked"));
    }
    let quoted = |v: &[String]| {
        v.iter()
            .map(|k| format!("\"{k}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    // PyTorch's order: missing, unexpected (strict only), then the size mismatches.
    let mut msgs = Vec::new();
    if strict && !keys.missing_keys.is_empty() {
        msgs.push(format!(
            "Missing key(s) in state_dict: {}. ",
            quoted(&keys.missing_keys)
        ));
    }
    if strict && !keys.unexpected_keys.is_empty() {
        msgs.push(format!(
            "Unexpected key(s) in state_dict: {}. ",
            quoted(&keys.unexpected_keys)
        ));
    }
    msgs.extend(sizes);
    if !msgs.is_empty() {
        return Err(BnError::StateDict {
            module: layout.module,
            detail: msgs.join("\n\t"),
        });
    }
    Ok(keys)
}

//! Folding an eval BatchNorm into the convolution or linear layer before it, as
//! `torch.nn.utils.fusion.fuse_conv_bn_eval` / `fuse_conv_bn_weights` /
//! `fuse_linear_bn_eval` do: `weight' = weight * scale` per output channel and
//! `bias' = bias * scale + shift` (`bias' = shift` for a layer without bias), with a
//! [`FrozenBatchNorm`]'s `scale = bn_weight / sqrt(running_var + eps)` and `shift =
//! bn_bias - running_mean * scale`. The BatchNorm then disappears from the served model.
//!
//! It runs on the module's backend: on the host for [`Cpu`](crate::Cpu), and on the GPU
//! for [`Cuda`](crate::Cuda), where the frozen kernels themselves do the arithmetic
//! (the weight viewed as a tensor whose channels are the output channels, multiplied by
//! scale as the frozen backward multiplies dy; the bias through the frozen forward). The
//! arithmetic is in the accumulator type (f32, or f64 for f64 weights), rounded once to
//! the weight's type.
//!
//! ```
//! use cuda_batchnorm::fold::{Layer, LayerKind};
//! use cuda_batchnorm::prelude::*;
//! # fn main() -> cuda_batchnorm::Result<()> {
//! // A 1x1 convolution of 2 input and 3 output channels, then BatchNorm2d(3).
//! let weight = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
//! let bn = cpu::FrozenBatchNorm2d::<f32>::new(Cpu, 3, 0.0)?; // identity statistics
//! let conv = Layer { kind: LayerKind::Conv { groups: 1 }, weight: &weight[..], shape: &[3, 2, 1, 1], bias: None };
//! let folded = bn.fold(conv)?;
//! assert_eq!(folded.weight, weight.to_vec());
//! assert_eq!(folded.bias, vec![0.0; 3]);
//! # Ok(()) }
//! ```

use crate::backend::{Backend, Frozen, Len};
use crate::dtype::{Float, ParamFor};
use crate::error::{BnError, Result};
use crate::frozen::FrozenBatchNorm;
use crate::shape::{MemoryFormat, Shape};

/// The layer before the BatchNorm, and how its weight is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    /// `Conv1d/2d/3d`: weight (out, in / groups, k...). Depthwise is `groups == in`.
    Conv {
        /// groups.
        groups: usize,
    },
    /// `ConvTranspose1d/2d/3d`: weight (in, out / groups, k...).
    Transposed {
        /// groups.
        groups: usize,
    },
    /// `Linear`: weight (out, in).
    Linear,
}

/// A layer's weight and bias on a backend, in PyTorch's layout.
pub struct Layer<'a, B: Backend, W: Float> {
    /// Which layer.
    pub kind: LayerKind,
    /// The weight, `shape`'s product of elements, contiguous.
    pub weight: &'a B::Tensor<'a, W>,
    /// The weight's size, as PyTorch reports `layer.weight.shape`.
    pub shape: &'a [usize],
    /// The bias (out), if the layer has one.
    pub bias: Option<&'a B::Tensor<'a, W>>,
}

/// The folded layer's weight (same size as the layer's) and bias (out).
#[derive(Debug)]
pub struct Folded<B: Backend, W: Float> {
    /// weight * scale per output channel.
    pub weight: B::Buffer<W>,
    /// bias * scale + shift.
    pub bias: B::Buffer<W>,
}

/// How the weight is multiplied: as an NCHW tensor whose channel `c` takes the
/// module's coefficient `c` (`expand == 1`), or, for a grouped transposed convolution,
/// the channel `q = i * (out / groups) + j` of weight[i, j] takes that of output channel
/// `(i / (in / groups)) * (out / groups) + j`.
struct Plan {
    out: usize,
    weight: Shape,
    grouped_transposed: Option<(usize, usize)>,
}

fn invalid(detail: String) -> BnError {
    BnError::InvalidLayer(detail)
}

/// The one place that reads a layer's geometry; every check before anything runs.
fn plan(
    kind: LayerKind,
    shape: &[usize],
    weight: usize,
    bias: Option<usize>,
    c: usize,
) -> Result<Plan> {
    let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if numel != Some(weight) {
        return Err(invalid(format!(
            "the weight holds {weight} elements but its size {shape:?} needs {}",
            numel.map_or("more than can be addressed".to_string(), |n| n.to_string())
        )));
    }
    let (rank_ok, what) = match kind {
        LayerKind::Linear => (shape.len() == 2, "a Linear weight is (out, in)"),
        _ => (
            (3..=5).contains(&shape.len()),
            "a convolution's weight has 3 to 5 dimensions",
        ),
    };
    if !rank_ok {
        return Err(invalid(format!("{what}, got size {shape:?}")));
    }
    let rest = |from: usize| shape[from..].iter().product::<usize>();
    let (out, dim, nchw, grouped) = match kind {
        LayerKind::Linear | LayerKind::Conv { groups: 1 } => {
            (shape[0], 0, [1, shape[0], rest(1)], None)
        }
        LayerKind::Conv { groups } => {
            if groups == 0 || !shape[0].is_multiple_of(groups) {
                return Err(invalid(format!(
                    "groups = {groups} does not divide the {} output channels",
                    shape[0]
                )));
            }
            (shape[0], 0, [1, shape[0], rest(1)], None)
        }
        LayerKind::Transposed { groups } => {
            if groups == 0 || !shape[0].is_multiple_of(groups) {
                return Err(invalid(format!(
                    "groups = {groups} does not divide the {} input channels",
                    shape[0]
                )));
            }
            let out = shape[1] * groups;
            if groups == 1 {
                (out, 1, [shape[0], shape[1], rest(2)], None)
            } else {
                let (ipg, opg) = (shape[0] / groups, shape[1]);
                (out, 1, [1, shape[0] * opg, rest(2)], Some((ipg, opg)))
            }
        }
    };
    // PyTorch's broadcast of the weight against the per-channel factor.
    if out != c {
        return Err(BnError::SizeMismatch { a: out, b: c, dim });
    }
    if let Some(b) = bias {
        if b != out {
            return Err(BnError::SizeMismatch { a: b, b: c, dim: 0 });
        }
    }
    Ok(Plan {
        out,
        weight: Shape::new(&nchw, MemoryFormat::Contiguous)?,
        grouped_transposed: grouped,
    })
}

impl<const D: usize, B: Backend, T: Float, P: ParamFor<T>> FrozenBatchNorm<D, B, T, P> {
    /// The weight and bias of `layer` with this BatchNorm folded in: the layer followed
    /// by the BatchNorm in eval, as one layer. A layer whose output channel count is
    /// not this module's, or a bias of another length, is an error in PyTorch's
    /// broadcast sentence; a weight that does not hold its size, an impossible group
    /// count or rank is [`BnError::InvalidLayer`].
    pub fn fold(&self, layer: Layer<'_, B, T>) -> Result<Folded<B, T>> {
        let plan = plan(
            layer.kind,
            layer.shape,
            layer.weight.len(),
            layer.bias.map(|b| b.len()),
            self.num_features(),
        )?;
        let backend = self.backend();
        let expanded = match plan.grouped_transposed {
            Some((ipg, opg)) => {
                let host = self.host_coefficients()?;
                let (scale, shift) = host.split_at(plan.out);
                let rows = plan.weight.c();
                let mut e = crate::cpu::host_vec(2 * rows, T::Acc::default())?;
                for q in 0..rows {
                    let o = (q / opg / ipg) * opg + q % opg;
                    e[q] = scale[o];
                    e[rows + q] = shift[o];
                }
                Some(backend.upload(&e)?)
            }
            None => None,
        };
        let coeffs = expanded.as_ref().unwrap_or(self.scale_shift());
        let mut weight = backend.alloc(layer.weight.len(), T::from_f64(0.0))?;
        backend.batch_norm_frozen_backward(
            Frozen {
                input: B::reborrow(layer.weight),
                shape: plan.weight,
                scale_shift: B::tensor(coeffs),
            },
            B::tensor_mut(&mut weight),
        )?;
        let zeros;
        let bias_in = match layer.bias {
            Some(b) => B::reborrow(b),
            None => {
                zeros = backend.alloc(plan.out, T::from_f64(0.0))?;
                B::tensor(&zeros)
            }
        };
        let mut bias = backend.alloc(plan.out, T::from_f64(0.0))?;
        backend.batch_norm_frozen(
            Frozen {
                input: bias_in,
                shape: Shape::new(&[1, plan.out], MemoryFormat::Contiguous)?,
                scale_shift: B::tensor(self.scale_shift()),
            },
            B::tensor_mut(&mut bias),
        )?;
        Ok(Folded { weight, bias })
    }
}

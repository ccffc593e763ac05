//! Validation: the one place every call's arguments are checked, before anything runs.
//!
//! The order is PyTorch's (`torch.nn.functional.batch_norm` then ATen's `batch_norm`),
//! so the first error PyTorch would raise is the one returned, with its sentence:
//!
//! 1. training: more than one value per channel (a rank-0 input fails here);
//! 2. eps: positive in training, non-negative in evaluation;
//! 3. an empty input returns here, with nothing else checked (as in PyTorch), except a
//!    weight or bias of no elements, which PyTorch indexes at 0 for an empty input;
//! 4. running_mean, running_var: length C, or defined in evaluation;
//! 5. weight, bias: length C;
//! 6. running_mean and running_var both given or both absent;
//! 7. an input of rank 0 or 1 (C counts as 0 in 4 and 5) fails here.
//!
//! Then the checks PyTorch has no need for (deviations, documented in the crate docs):
//! eps and momentum finite, and every buffer at least as long as its shape needs.

use crate::error::{BnError, Result};
use crate::shape::Shape;

/// A forward call as validation sees it: its shape, mode, options and the lengths of
/// the buffers it was given (`None` for an absent optional buffer).
#[derive(Clone, Copy, Debug)]
pub struct ForwardSpec {
    /// The input's shape.
    pub shape: Shape,
    /// `training` as `F.batch_norm` takes it: normalise with batch statistics.
    pub training: bool,
    /// eps.
    pub eps: f64,
    /// The running-average factor this call would use.
    pub momentum: f64,
    /// Length of the input buffer.
    pub input: usize,
    /// Length of the output buffer.
    pub output: usize,
    /// Length of weight.
    pub weight: Option<usize>,
    /// Length of bias.
    pub bias: Option<usize>,
    /// Length of running_mean.
    pub running_mean: Option<usize>,
    /// Length of running_var.
    pub running_var: Option<usize>,
    /// Length of save_mean.
    pub save_mean: Option<usize>,
    /// Length of save_invstd.
    pub save_invstd: Option<usize>,
}

/// What a valid forward call does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardKind {
    /// Nothing: the input is empty (running statistics stay as they are).
    Empty,
    /// Launch kernels.
    Run {
        /// Normalise with this batch's statistics.
        batch_stats: bool,
        /// Fold them into the running statistics.
        update_running: bool,
    },
}

pub(crate) fn feature(name: &'static str, c: usize, len: Option<usize>) -> Result<()> {
    match len {
        Some(got) if got != c => Err(BnError::FeatureCount {
            name,
            expected: c,
            got,
        }),
        _ => Ok(()),
    }
}

/// A buffer of `got` elements where `shape` needs `needed`.
pub(crate) fn buffer(name: &'static str, needed: usize, got: usize, shape: &Shape) -> Result<()> {
    if got < needed {
        return Err(BnError::BufferTooShort {
            name,
            needed,
            got,
            size: shape.dims().to_vec(),
        });
    }
    Ok(())
}

pub(crate) fn check_eps(eps: f64, training: bool) -> Result<()> {
    if training && eps <= 0.0 {
        return Err(BnError::EpsNotPositive { eps });
    }
    if !training && eps < 0.0 {
        return Err(BnError::EpsNegative { eps });
    }
    if !eps.is_finite() {
        return Err(BnError::NonFinite {
            name: "eps",
            value: eps,
        });
    }
    Ok(())
}

/// PyTorch's error for an input without a channel dimension, once its other checks
/// have passed.
fn no_channel_dim(shape: &Shape) -> Result<()> {
    match shape.rank() {
        0 => Err(BnError::InputTooFewDims {
            rank: 0,
            message: "Dimension specified as 1 but tensor has no dimensions",
        }),
        1 => Err(BnError::InputTooFewDims {
            rank: 1,
            message: "Dimension out of range (expected to be in range of [-1, 0], but got 1)",
        }),
        _ => Ok(()),
    }
}

/// An empty input's weight or bias must have an element 0: PyTorch computes an empty
/// input's output as `input.clone() * weight[0] + bias[0]`.
fn empty_affine(weight: Option<usize>, bias: Option<usize>) -> Result<()> {
    for (name, len) in [("weight", weight), ("bias", bias)] {
        if len == Some(0) {
            return Err(BnError::EmptyParameter { name });
        }
    }
    Ok(())
}

/// The stats-stage functions' checks (`crate::sync`): an input with a channel
/// dimension whose buffer holds `input` elements, then each per-channel buffer
/// (`name`, its length, the length it must have).
pub(crate) fn stats_stage(
    shape: &Shape,
    input: Option<(&'static str, usize)>,
    per_channel: &[(&'static str, usize, usize)],
) -> Result<()> {
    no_channel_dim(shape)?;
    if let Some((name, got)) = input {
        buffer(name, shape.numel(), got, shape)?;
    }
    for &(name, got, expected) in per_channel {
        feature(name, expected, Some(got))?;
    }
    Ok(())
}

/// The merge of `ranks` ranks' statistics (`crate::sync::batch_norm_gather_stats_with_counts`):
/// at least one rank, a finite eps and momentum.
pub(crate) fn gather(ranks: usize, eps: f64, momentum: f64) -> Result<()> {
    if ranks == 0 {
        return Err(BnError::NoRanks);
    }
    check_eps(eps, true)?;
    if !momentum.is_finite() {
        return Err(BnError::NonFinite {
            name: "momentum",
            value: momentum,
        });
    }
    Ok(())
}

/// Checks a forward call; see the module docs for the order.
pub fn forward(s: &ForwardSpec) -> Result<ForwardKind> {
    forward_checks(s, false)
}

/// The checks of a synchronised training forward (crate::sync): those of [`forward`],
/// except that the values per channel are counted over every rank's batch (by the
/// caller), and that an empty local input is checked as any other, since its rank
/// still merges the statistics and updates its running ones.
pub(crate) fn forward_sync(s: &ForwardSpec) -> Result<ForwardKind> {
    forward_checks(s, true)
}

fn forward_checks(s: &ForwardSpec, sync: bool) -> Result<ForwardKind> {
    let shape = &s.shape;
    let c = shape.c();
    if s.training && shape.rank() == 0 {
        return Err(BnError::InputTooFewDims {
            rank: 0,
            message: "tuple index out of range",
        });
    }
    if s.training && shape.per_channel() == 1 && !sync {
        return Err(BnError::TooFewValues {
            size: shape.dims().to_vec(),
        });
    }
    check_eps(s.eps, s.training)?;
    if shape.numel() == 0 && !sync {
        empty_affine(s.weight, s.bias)?;
        return Ok(ForwardKind::Empty);
    }
    for (name, len) in [
        ("running_mean", s.running_mean),
        ("running_var", s.running_var),
    ] {
        match len {
            Some(_) => feature(name, c, len)?,
            None if !s.training => return Err(BnError::MissingRunningStat { name }),
            None => {}
        }
    }
    feature("weight", c, s.weight)?;
    feature("bias", c, s.bias)?;
    if s.running_mean.is_some() != s.running_var.is_some() {
        return Err(BnError::RunningStatsPairing);
    }
    no_channel_dim(shape)?;
    let update_running = s.training && s.running_mean.is_some();
    if update_running && !s.momentum.is_finite() {
        return Err(BnError::NonFinite {
            name: "momentum",
            value: s.momentum,
        });
    }
    buffer("input", shape.numel(), s.input, shape)?;
    buffer("output", shape.numel(), s.output, shape)?;
    if let Some(len) = s.save_mean {
        buffer("save_mean", c, len, shape)?;
    }
    if let Some(len) = s.save_invstd {
        buffer("save_invstd", c, len, shape)?;
    }
    Ok(ForwardKind::Run {
        batch_stats: s.training,
        update_running,
    })
}

/// A backward call as validation sees it.
#[derive(Clone, Copy, Debug)]
pub struct BackwardSpec {
    /// The forward input's shape.
    pub shape: Shape,
    /// The forward normalised with batch statistics (training); else running (eval).
    pub batch_stats: bool,
    /// eps (used in eval only).
    pub eps: f64,
    /// Length of grad_output.
    pub grad_output: usize,
    /// Length of input.
    pub input: usize,
    /// Length of grad_input.
    pub grad_input: usize,
    /// Length of weight.
    pub weight: Option<usize>,
    /// Lengths of the statistics: (save_mean, save_invstd) in training,
    /// (running_mean, running_var) in eval.
    pub stats: (Option<usize>, Option<usize>),
    /// Length of grad_weight.
    pub grad_weight: Option<usize>,
    /// Length of grad_bias.
    pub grad_bias: Option<usize>,
}

/// Checks a backward call. `Ok(false)` means the input is empty: the caller only zeroes
/// grad_weight and grad_bias, whatever their length (an empty input's parameter
/// gradients have the parameters' length, which need not be the input's C).
pub fn backward(s: &BackwardSpec) -> Result<bool> {
    let shape = &s.shape;
    let c = shape.c();
    if !s.batch_stats {
        check_eps(s.eps, false)?;
    }
    if shape.numel() == 0 {
        return Ok(false);
    }
    no_channel_dim(shape)?;
    feature("grad_weight", c, s.grad_weight)?;
    feature("grad_bias", c, s.grad_bias)?;
    let names = if s.batch_stats {
        ("save_mean", "save_invstd")
    } else {
        ("running_mean", "running_var")
    };
    for (name, len) in [(names.0, s.stats.0), (names.1, s.stats.1)] {
        match len {
            Some(_) => feature(name, c, len)?,
            None if s.batch_stats => {
                return Err(BnError::Backward(
                    "batch_norm backward in training mode needs save_mean and save_invstd from the forward",
                ))
            }
            None => return Err(BnError::MissingRunningStat { name }),
        }
    }
    feature("weight", c, s.weight)?;
    buffer("grad_output", shape.numel(), s.grad_output, shape)?;
    buffer("input", shape.numel(), s.input, shape)?;
    buffer("grad_input", shape.numel(), s.grad_input, shape)?;
    Ok(true)
}

/// A frozen BatchNorm call ([`crate::backend::Frozen`]): the input's channel count
/// must be the coefficients' (torchvision's `x * scale` broadcast, and its message),
/// and the input and output must hold the shape. `Ok(false)`: nothing to compute.
pub fn frozen(shape: &Shape, input: usize, output: usize, scale_shift: usize) -> Result<bool> {
    let features = scale_shift / 2;
    if shape.c() != features || !scale_shift.is_multiple_of(2) {
        return Err(BnError::SizeMismatch {
            a: shape.c(),
            b: features,
            dim: 1,
        });
    }
    buffer("input", shape.numel(), input, shape)?;
    buffer("output", shape.numel(), output, shape)?;
    Ok(shape.numel() != 0)
}

/// The rank a `BatchNorm{1,2,3}d` module accepts (`dims` 1, 2, 3; 0 for SyncBatchNorm's
/// any rank of at least 2), with PyTorch's sentence.
pub fn module_rank(dims: usize, shape: &Shape) -> Result<()> {
    let (ok, expected) = match dims {
        0 => (shape.rank() >= 2, "at least 2D"),
        1 => (matches!(shape.rank(), 2 | 3), "2D or 3D"),
        2 => (shape.rank() == 4, "4D"),
        _ => (shape.rank() == 5, "5D"),
    };
    if ok {
        Ok(())
    } else {
        Err(BnError::InputRank {
            expected,
            got: shape.rank(),
        })
    }
}

/// `Backend::copy_from_host`: the values must fill the buffer exactly.
pub(crate) fn copy_length(buffer: usize, values: usize) -> Result<()> {
    if buffer == values {
        Ok(())
    } else {
        Err(BnError::CopyLength { buffer, values })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shape::MemoryFormat;

    fn spec(dims: &[usize], training: bool) -> ForwardSpec {
        let shape = Shape::new(dims, MemoryFormat::Contiguous).unwrap();
        let c = shape.c();
        ForwardSpec {
            shape,
            training,
            eps: 1e-5,
            momentum: 0.1,
            input: shape.numel(),
            output: shape.numel(),
            weight: Some(c),
            bias: Some(c),
            running_mean: Some(c),
            running_var: Some(c),
            save_mean: None,
            save_invstd: None,
        }
    }

    impl ForwardSpec {
        fn with_dims(self, dims: &[usize]) -> ForwardSpec {
            let shape = Shape::new(dims, MemoryFormat::Contiguous).unwrap();
            ForwardSpec {
                shape,
                input: shape.numel(),
                output: shape.numel(),
                ..self
            }
        }
    }

    fn msg(s: &ForwardSpec) -> String {
        forward(s).unwrap_err().to_string()
    }

    #[test]
    fn messages_are_pytorchs() {
        let s = ForwardSpec {
            eps: 0.0,
            ..spec(&[2, 3], true)
        };
        assert_eq!(
            msg(&s),
            "batch_norm eps must be positive during training, but got 0.0"
        );
        let s = ForwardSpec {
            eps: -1.0,
            ..spec(&[2, 3], false)
        };
        assert_eq!(msg(&s), "batch_norm eps must be non-negative, but got -1.0");
        assert_eq!(
            msg(&spec(&[1, 10], true)),
            "Expected more than 1 value per channel when training, got input size [1, 10]"
        );
        let s = ForwardSpec {
            running_mean: Some(4),
            running_var: Some(4),
            ..spec(&[2, 3], true)
        };
        assert_eq!(msg(&s), "running_mean should contain 3 elements not 4");
        let s = ForwardSpec {
            running_mean: None,
            running_var: None,
            ..spec(&[2, 3], false)
        };
        assert_eq!(msg(&s), "running_mean must be defined in evaluation mode");
        let s = ForwardSpec {
            running_var: None,
            ..spec(&[2, 3], true)
        };
        assert_eq!(
            msg(&s),
            "running_mean and running_var must either both be None or neither be None"
        );
    }

    #[test]
    fn order_is_pytorchs() {
        // one value per channel beats eps and lengths
        let s = ForwardSpec {
            eps: 0.0,
            running_mean: Some(4),
            ..spec(&[1, 10], true)
        };
        assert!(matches!(forward(&s), Err(BnError::TooFewValues { .. })));
        // eps beats lengths and pairing
        let s = ForwardSpec {
            eps: 0.0,
            running_mean: Some(4),
            running_var: None,
            ..spec(&[2, 3], true)
        };
        assert!(matches!(forward(&s), Err(BnError::EpsNotPositive { .. })));
        // running_mean before running_var before weight before bias
        let s = ForwardSpec {
            running_var: Some(5),
            weight: Some(6),
            bias: Some(7),
            ..spec(&[2, 3], true)
        };
        assert_eq!(msg(&s), "running_var should contain 3 elements not 5");
        let s = ForwardSpec {
            weight: Some(6),
            bias: Some(7),
            ..spec(&[2, 3], true)
        };
        assert_eq!(msg(&s), "weight should contain 3 elements not 6");
        // a length error beats the pairing error
        let s = ForwardSpec {
            running_mean: Some(4),
            running_var: None,
            ..spec(&[2, 3], true)
        };
        assert_eq!(msg(&s), "running_mean should contain 3 elements not 4");
        // eval: running_var missing alone
        let s = ForwardSpec {
            running_var: None,
            ..spec(&[2, 3], false)
        };
        assert_eq!(msg(&s), "running_var must be defined in evaluation mode");
    }

    #[test]
    fn empty_inputs_skip_the_length_checks_but_not_eps() {
        let s = ForwardSpec {
            running_mean: Some(4),
            running_var: Some(4),
            ..spec(&[0, 3], true)
        };
        assert_eq!(forward(&s).unwrap(), ForwardKind::Empty);
        let s = ForwardSpec {
            running_mean: None,
            running_var: None,
            ..spec(&[0, 3], false)
        };
        assert_eq!(forward(&s).unwrap(), ForwardKind::Empty);
        let s = ForwardSpec {
            eps: 0.0,
            ..spec(&[0, 3], true)
        };
        assert!(matches!(forward(&s), Err(BnError::EpsNotPositive { .. })));
        // zero channels is empty too, without affine parameters; with them PyTorch
        // indexes weight[0] (then bias[0]) and fails
        let s = ForwardSpec {
            weight: None,
            bias: None,
            ..spec(&[2, 0], true)
        };
        assert_eq!(forward(&s).unwrap(), ForwardKind::Empty);
        assert_eq!(
            msg(&spec(&[2, 0], true)),
            "select(): index 0 out of range for tensor of size [0] at dimension 0"
        );
        let s = ForwardSpec {
            weight: None,
            ..spec(&[2, 0], false)
        };
        assert!(matches!(
            forward(&s),
            Err(BnError::EmptyParameter { name: "bias" })
        ));
        // an empty input with a C of its own keeps non-empty parameters of another
        let s = ForwardSpec {
            weight: Some(4),
            bias: Some(4),
            ..spec(&[0, 3, 2], true)
        };
        assert_eq!(forward(&s).unwrap(), ForwardKind::Empty);
    }

    #[test]
    fn ranks_below_two_fail_where_pytorch_fails() {
        let s1 = |training| ForwardSpec {
            weight: None,
            bias: None,
            running_mean: None,
            running_var: None,
            ..spec(&[5], training)
        };
        // PyTorch 2.15, F.batch_norm on a (5,) input:
        assert_eq!(
            msg(&ForwardSpec {
                running_mean: Some(5),
                running_var: Some(5),
                ..s1(true)
            }),
            "running_mean should contain 0 elements not 5"
        );
        assert_eq!(
            msg(&ForwardSpec {
                weight: Some(5),
                ..s1(true)
            }),
            "weight should contain 0 elements not 5"
        );
        assert_eq!(
            msg(&s1(true)),
            "Dimension out of range (expected to be in range of [-1, 0], but got 1)"
        );
        assert_eq!(
            msg(&s1(false)),
            "running_mean must be defined in evaluation mode"
        );
        assert_eq!(
            msg(&ForwardSpec {
                eps: 0.0,
                ..s1(true)
            }),
            "batch_norm eps must be positive during training, but got 0.0"
        );
        assert_eq!(
            msg(&spec(&[1], true)),
            "Expected more than 1 value per channel when training, got input size [1]"
        );
        assert_eq!(
            forward(&s1(true).with_dims(&[0])).unwrap(),
            ForwardKind::Empty
        );
        // a (0-d) scalar
        let s0 = |training| ForwardSpec {
            running_mean: Some(0),
            running_var: Some(0),
            weight: None,
            bias: None,
            ..spec(&[], training)
        };
        assert_eq!(msg(&s0(true)), "tuple index out of range");
        assert_eq!(
            msg(&ForwardSpec {
                running_mean: Some(1),
                running_var: Some(1),
                ..s0(false)
            }),
            "running_mean should contain 0 elements not 1"
        );
        assert_eq!(
            msg(&s0(false)),
            "Dimension specified as 1 but tensor has no dimensions"
        );
    }

    #[test]
    fn one_value_per_channel_is_about_n_times_spatial() {
        assert!(forward(&spec(&[1, 10, 2], true)).is_ok());
        assert!(matches!(
            forward(&spec(&[1, 10, 1, 1], true)),
            Err(BnError::TooFewValues { .. })
        ));
        assert!(
            forward(&spec(&[1, 10], false)).is_ok(),
            "eval takes one value"
        );
    }

    #[test]
    fn deviations() {
        let s = ForwardSpec {
            eps: f64::NAN,
            ..spec(&[2, 3], true)
        };
        assert_eq!(msg(&s), "batch_norm eps must be finite, but got NaN");
        let s = ForwardSpec {
            eps: f64::INFINITY,
            ..spec(&[2, 3], false)
        };
        assert_eq!(msg(&s), "batch_norm eps must be finite, but got inf");
        let s = ForwardSpec {
            momentum: f64::NAN,
            ..spec(&[2, 3], true)
        };
        assert_eq!(msg(&s), "batch_norm momentum must be finite, but got NaN");
        let s = ForwardSpec {
            momentum: f64::NAN,
            ..spec(&[2, 3], false)
        };
        assert!(forward(&s).is_ok(), "momentum is unused in eval");
        let s = ForwardSpec {
            input: 5,
            ..spec(&[2, 3], true)
        };
        assert_eq!(
            msg(&s),
            "input holds 5 elements but input size [2, 3] needs 6"
        );
        let s = ForwardSpec {
            save_mean: Some(2),
            ..spec(&[2, 3], true)
        };
        assert!(matches!(
            forward(&s),
            Err(BnError::BufferTooShort {
                name: "save_mean",
                ..
            })
        ));
    }

    #[test]
    fn modes() {
        assert_eq!(
            forward(&spec(&[2, 3], true)).unwrap(),
            ForwardKind::Run {
                batch_stats: true,
                update_running: true
            }
        );
        let s = ForwardSpec {
            running_mean: None,
            running_var: None,
            ..spec(&[2, 3], true)
        };
        assert_eq!(
            forward(&s).unwrap(),
            ForwardKind::Run {
                batch_stats: true,
                update_running: false
            }
        );
        assert_eq!(
            forward(&spec(&[2, 3], false)).unwrap(),
            ForwardKind::Run {
                batch_stats: false,
                update_running: false
            }
        );
    }

    #[test]
    fn module_ranks() {
        let s4 = Shape::nchw(2, 4, 3, 3).unwrap();
        assert_eq!(
            module_rank(1, &s4).unwrap_err().to_string(),
            "expected 2D or 3D input (got 4D input)"
        );
        let s3 = Shape::new(&[2, 4, 3], MemoryFormat::Contiguous).unwrap();
        assert_eq!(
            module_rank(2, &s3).unwrap_err().to_string(),
            "expected 4D input (got 3D input)"
        );
        assert_eq!(
            module_rank(3, &s4).unwrap_err().to_string(),
            "expected 5D input (got 4D input)"
        );
        assert!(module_rank(1, &s3).is_ok() && module_rank(2, &s4).is_ok());
    }

    #[test]
    fn backward_checks() {
        let shape = Shape::nchw(2, 3, 2, 2).unwrap();
        let ok = BackwardSpec {
            shape,
            batch_stats: true,
            eps: 1e-5,
            grad_output: 24,
            input: 24,
            grad_input: 24,
            weight: Some(3),
            stats: (Some(3), Some(3)),
            grad_weight: Some(3),
            grad_bias: Some(3),
        };
        assert!(backward(&ok).unwrap());
        let s = BackwardSpec {
            stats: (None, None),
            ..ok
        };
        assert!(matches!(backward(&s), Err(BnError::Backward(_))));
        let s = BackwardSpec {
            batch_stats: false,
            stats: (None, Some(3)),
            ..ok
        };
        assert_eq!(
            backward(&s).unwrap_err().to_string(),
            "running_mean must be defined in evaluation mode"
        );
        let s = BackwardSpec {
            grad_input: 23,
            ..ok
        };
        assert!(matches!(
            backward(&s),
            Err(BnError::BufferTooShort {
                name: "grad_input",
                ..
            })
        ));
        let s = BackwardSpec {
            batch_stats: false,
            eps: -1.0,
            ..ok
        };
        assert!(matches!(backward(&s), Err(BnError::EpsNegative { .. })));
        let empty = BackwardSpec {
            shape: Shape::nchw(0, 3, 2, 2).unwrap(),
            stats: (None, None),
            ..ok
        };
        assert!(!backward(&empty).unwrap());
    }
}

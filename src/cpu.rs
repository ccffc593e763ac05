//! The CPU backend: batch norm on host slices, accumulating in f64.
//!
//! It is the oracle of every test (through [`reference`](mod@reference), which returns f64 results
//! before any rounding) and the fallback where there is no GPU: [`Cpu`] is a
//! [`Backend`], so `cpu::BatchNorm2d` has the same API as `nn::BatchNorm2d`, and
//! [`batch_norm`] / [`batch_norm_backward`] take the same arguments as their CUDA
//! counterparts in [`crate::functional`]. Validation is the same code
//! ([`crate::validate`]), so errors are identical.

use crate::backend::{self, Backend};
use crate::dtype::{Float, ParamFor};
use crate::error::{BnError, Result};
use crate::validate::ForwardKind;

/// The CPU backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cpu;

/// `torch.nn.functional.batch_norm`'s arguments on host slices.
pub type Forward<'a, T, P> = backend::Forward<'a, Cpu, T, P>;
/// Where a training forward leaves its batch statistics.
pub type SaveStats<'a, A> = backend::SaveStats<'a, Cpu, A>;
/// A backward's inputs on host slices.
pub type Backward<'a, T, P> = backend::Backward<'a, Cpu, T, P>;
/// The statistics a backward differentiates through.
pub type BackwardStats<'a, A, P> = backend::BackwardStats<'a, Cpu, A, P>;
/// A backward's outputs on host slices.
pub type Grads<'a, T, P> = backend::Grads<'a, Cpu, T, P>;

/// `BatchNorm1d` on the CPU.
pub type BatchNorm1d<T, P = T> = crate::module::BatchNorm<1, Cpu, T, P>;
/// `BatchNorm2d` on the CPU.
pub type BatchNorm2d<T, P = T> = crate::module::BatchNorm<2, Cpu, T, P>;
/// `BatchNorm3d` on the CPU.
pub type BatchNorm3d<T, P = T> = crate::module::BatchNorm<3, Cpu, T, P>;

impl Backend for Cpu {
    type Tensor<'t, E: Float> = [E];
    type TensorMut<'t, E: Float> = [E];
    type Buffer<E: Float> = Vec<E>;
    type Workspace = ();

    fn alloc<E: Float>(&self, len: usize, fill: E) -> Result<Vec<E>> {
        host_vec(len, fill)
    }

    fn buffer_len<E: Float>(b: &Vec<E>) -> usize {
        b.len()
    }

    fn tensor<E: Float>(b: &Vec<E>) -> &[E] {
        b
    }

    fn tensor_mut<E: Float>(b: &mut Vec<E>) -> &mut [E] {
        b
    }

    fn reborrow<'s, 'l: 's, E: Float>(t: &'s [E]) -> &'s [E] {
        t
    }

    fn reborrow_mut<'s, 'l: 's, E: Float>(t: &'s mut [E]) -> &'s mut [E] {
        t
    }

    fn to_host<E: Float>(&self, b: &Vec<E>) -> Result<Vec<E>> {
        Ok(b.clone())
    }

    fn copy_from_host<E: Float>(&self, b: &mut Vec<E>, v: &[E]) -> Result<()> {
        crate::validate::copy_length(b.len(), v.len())?;
        b.copy_from_slice(v);
        Ok(())
    }

    fn batch_norm<T: Float, P: ParamFor<T>>(
        &self,
        args: Forward<'_, T, P>,
        output: &mut [T],
        save: Option<SaveStats<'_, T::Acc>>,
        _workspace: &mut (),
    ) -> Result<()> {
        batch_norm(args, output, save)
    }

    fn batch_norm_backward<T: Float, P: ParamFor<T>>(
        &self,
        args: Backward<'_, T, P>,
        grads: Grads<'_, T, P>,
        _workspace: &mut (),
    ) -> Result<()> {
        batch_norm_backward(args, grads)
    }
}

/// Batch-norm mathematics in f64, the reference every kernel is checked against.
///
/// Tensors are in `shape`'s memory order; per-channel slices have C values. Slices
/// shorter than that are an error, never a panic.
pub mod reference {
    use crate::dtype::Float;
    use crate::error::Result;
    use crate::shape::Shape;
    use crate::validate::buffer;

    /// Widens values to f64.
    pub fn to_f64<T: Float>(v: &[T]) -> Vec<f64> {
        v.iter().map(|x| x.to_f64()).collect()
    }

    /// Per-channel mean and biased variance, two passes.
    pub fn batch_stats(x: &[f64], shape: &Shape) -> Result<(Vec<f64>, Vec<f64>)> {
        buffer("input", shape.numel(), x.len(), shape)?;
        let (n, c, s) = (shape.n(), shape.c(), shape.spatial());
        let m = (n * s) as f64;
        let mut mean = vec![0.0; c];
        let mut var = vec![0.0; c];
        for ch in 0..c {
            let mut sum = 0.0;
            for b in 0..n {
                for i in 0..s {
                    sum += x[shape.offset(b, ch, i)];
                }
            }
            let mu = sum / m;
            let mut sq = 0.0;
            for b in 0..n {
                for i in 0..s {
                    let d = x[shape.offset(b, ch, i)] - mu;
                    sq += d * d;
                }
            }
            mean[ch] = mu;
            var[ch] = sq / m;
        }
        Ok((mean, var))
    }

    /// `1 / sqrt(var + eps)` per channel.
    pub fn invstd(var: &[f64], eps: f64) -> Vec<f64> {
        var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect()
    }

    /// `y = (x - mean) * invstd * weight + bias`.
    pub fn normalize(
        x: &[f64],
        shape: &Shape,
        mean: &[f64],
        invstd: &[f64],
        weight: Option<&[f64]>,
        bias: Option<&[f64]>,
    ) -> Result<Vec<f64>> {
        let c = shape.c();
        buffer("input", shape.numel(), x.len(), shape)?;
        buffer("mean", c, mean.len(), shape)?;
        buffer("invstd", c, invstd.len(), shape)?;
        buffer("weight", c, weight.map_or(c, <[f64]>::len), shape)?;
        buffer("bias", c, bias.map_or(c, <[f64]>::len), shape)?;
        let mut y = vec![0.0; shape.numel()];
        for b in 0..shape.n() {
            for ch in 0..c {
                let w = weight.map_or(1.0, |w| w[ch]);
                let bb = bias.map_or(0.0, |bb| bb[ch]);
                for i in 0..shape.spatial() {
                    let o = shape.offset(b, ch, i);
                    y[o] = (x[o] - mean[ch]) * invstd[ch] * w + bb;
                }
            }
        }
        Ok(y)
    }

    /// Gradients in f64.
    #[derive(Clone, Debug, PartialEq)]
    pub struct Grads {
        /// d loss / d input.
        pub input: Vec<f64>,
        /// d loss / d weight (`dotp * invstd`).
        pub weight: Vec<f64>,
        /// d loss / d bias (`sum_dy`).
        pub bias: Vec<f64>,
    }

    /// The backward given the statistics the forward normalised with. With
    /// `batch_stats`, the statistics depend on x and the training formula applies;
    /// otherwise `dx = dy * invstd * w`.
    pub fn backward(
        dy: &[f64],
        x: &[f64],
        shape: &Shape,
        mean: &[f64],
        invstd: &[f64],
        weight: Option<&[f64]>,
        batch_stats: bool,
    ) -> Result<Grads> {
        let (n, c, s) = (shape.n(), shape.c(), shape.spatial());
        buffer("grad_output", shape.numel(), dy.len(), shape)?;
        buffer("input", shape.numel(), x.len(), shape)?;
        buffer("mean", c, mean.len(), shape)?;
        buffer("invstd", c, invstd.len(), shape)?;
        buffer("weight", c, weight.map_or(c, <[f64]>::len), shape)?;
        let m = (n * s) as f64;
        let mut g = Grads {
            input: vec![0.0; shape.numel()],
            weight: vec![0.0; c],
            bias: vec![0.0; c],
        };
        for ch in 0..c {
            let (mut sum_dy, mut dotp) = (0.0, 0.0);
            for b in 0..n {
                for i in 0..s {
                    let o = shape.offset(b, ch, i);
                    sum_dy += dy[o];
                    dotp += dy[o] * (x[o] - mean[ch]);
                }
            }
            g.bias[ch] = sum_dy;
            g.weight[ch] = dotp * invstd[ch];
            let w = weight.map_or(1.0, |w| w[ch]);
            let k = invstd[ch];
            for b in 0..n {
                for i in 0..s {
                    let o = shape.offset(b, ch, i);
                    g.input[o] = if batch_stats {
                        (dy[o] - sum_dy / m - (x[o] - mean[ch]) * dotp * k * k / m) * k * w
                    } else {
                        dy[o] * k * w
                    };
                }
            }
        }
        Ok(g)
    }
}

/// `len` copies of `fill`, or an error where `vec!` would abort or panic.
pub(crate) fn host_vec<E: Float>(len: usize, fill: E) -> Result<Vec<E>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| BnError::HostAlloc {
        len,
        elem_bytes: std::mem::size_of::<E>(),
    })?;
    v.resize(len, fill);
    Ok(v)
}

fn round_into<E: Float>(dst: &mut [E], src: &[f64]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = E::from_f64(*s);
    }
}

/// The forward of `torch.nn.functional.batch_norm` on the CPU.
pub fn batch_norm<T: Float, P: ParamFor<T>>(
    args: Forward<'_, T, P>,
    output: &mut [T],
    save: Option<SaveStats<'_, T::Acc>>,
) -> Result<()> {
    let ForwardKind::Run {
        batch_stats,
        update_running,
    } = args.validate(output, save.as_ref())?
    else {
        return Ok(());
    };
    let backend::Forward {
        input,
        shape,
        running_mean,
        running_var,
        weight,
        bias,
        momentum,
        eps,
        ..
    } = args;
    let numel = shape.numel();
    let x = reference::to_f64(&input[..numel]);
    let (mean, var) = if batch_stats {
        reference::batch_stats(&x, &shape)?
    } else {
        let rm = running_mean
            .as_deref()
            .map(|v| reference::to_f64(v))
            .unwrap_or_default();
        let rv = running_var
            .as_deref()
            .map(|v| reference::to_f64(v))
            .unwrap_or_default();
        (rm, rv)
    };
    let invstd = reference::invstd(&var, eps);
    let w = weight.map(reference::to_f64);
    let b = bias.map(reference::to_f64);
    let y = reference::normalize(&x, &shape, &mean, &invstd, w.as_deref(), b.as_deref())?;
    round_into(&mut output[..numel], &y);
    if batch_stats {
        if let Some(s) = save {
            round_into(&mut s.mean[..shape.c()], &mean);
            round_into(&mut s.invstd[..shape.c()], &invstd);
        }
    }
    if update_running {
        if let (Some(rm), Some(rv)) = (running_mean, running_var) {
            let m = shape.per_channel() as f64;
            for ch in 0..shape.c() {
                let unbiased = var[ch] * m / (m - 1.0);
                rm[ch] = P::from_f64(momentum * mean[ch] + (1.0 - momentum) * rm[ch].to_f64());
                rv[ch] = P::from_f64(momentum * unbiased + (1.0 - momentum) * rv[ch].to_f64());
            }
        }
    }
    Ok(())
}

/// The backward on the CPU.
pub fn batch_norm_backward<T: Float, P: ParamFor<T>>(
    args: Backward<'_, T, P>,
    grads: Grads<'_, T, P>,
) -> Result<()> {
    let run = args.validate(&grads)?;
    let batch_stats = matches!(args.stats, backend::BackwardStats::Batch { .. });
    let backend::Backward {
        grad_output,
        input,
        shape,
        weight,
        stats: which,
    } = args;
    let backend::Grads {
        input: grad_input,
        weight: grad_weight,
        bias: grad_bias,
    } = grads;
    if !run {
        for g in [grad_weight, grad_bias].into_iter().flatten() {
            g.fill(P::from_f64(0.0));
        }
        return Ok(());
    }
    let numel = shape.numel();
    let (mean, invstd) = match which {
        backend::BackwardStats::Batch {
            save_mean,
            save_invstd,
        } => (reference::to_f64(save_mean), reference::to_f64(save_invstd)),
        backend::BackwardStats::Running { mean, var, eps } => (
            reference::to_f64(mean),
            reference::invstd(&reference::to_f64(var), eps),
        ),
    };
    let w = weight.map(reference::to_f64);
    let g = reference::backward(
        &reference::to_f64(&grad_output[..numel]),
        &reference::to_f64(&input[..numel]),
        &shape,
        &mean,
        &invstd,
        w.as_deref(),
        batch_stats,
    )?;
    round_into(&mut grad_input[..numel], &g.input);
    if let Some(gw) = grad_weight {
        round_into(gw, &g.weight);
    }
    if let Some(gb) = grad_bias {
        round_into(gb, &g.bias);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::reference::*;
    use crate::shape::{MemoryFormat, Shape};

    #[test]
    fn closed_form_two_values() {
        // channel values {1, 3}: mean 2, biased var 1
        let shape = Shape::nc(2, 1).unwrap();
        let (m, v) = batch_stats(&[1.0, 3.0], &shape).unwrap();
        assert_eq!((m[0], v[0]), (2.0, 1.0));
        let y = normalize(&[1.0, 3.0], &shape, &m, &invstd(&v, 0.0), None, None).unwrap();
        assert_eq!(y, vec![-1.0, 1.0]);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let shape = Shape::new(&[3, 2, 4], MemoryFormat::ChannelsLast).unwrap();
        let x: Vec<f64> = (0..24)
            .map(|i| ((i * 37 % 11) as f64) * 0.3 - 1.0)
            .collect();
        let dy: Vec<f64> = (0..24).map(|i| ((i * 17 % 7) as f64) * 0.2 - 0.5).collect();
        let w = [1.5, -0.7];
        let b = [0.1, 0.2];
        let eps = 1e-3;
        let loss = |x: &[f64], w: &[f64], b: &[f64]| {
            let (m, v) = batch_stats(x, &shape).unwrap();
            let y = normalize(x, &shape, &m, &invstd(&v, eps), Some(w), Some(b)).unwrap();
            y.iter().zip(&dy).map(|(a, b)| a * b).sum::<f64>()
        };
        let (m, v) = batch_stats(&x, &shape).unwrap();
        let g = backward(&dy, &x, &shape, &m, &invstd(&v, eps), Some(&w), true).unwrap();
        let h = 1e-6;
        for i in 0..x.len() {
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[i] += h;
            xm[i] -= h;
            let fd = (loss(&xp, &w, &b) - loss(&xm, &w, &b)) / (2.0 * h);
            assert!(
                (fd - g.input[i]).abs() < 1e-6,
                "dx[{i}]: {fd} vs {}",
                g.input[i]
            );
        }
        for ch in 0..2 {
            let (mut wp, mut wm) = (w, w);
            wp[ch] += h;
            wm[ch] -= h;
            let fd = (loss(&x, &wp, &b) - loss(&x, &wm, &b)) / (2.0 * h);
            assert!((fd - g.weight[ch]).abs() < 1e-6);
            let (mut bp, mut bm) = (b, b);
            bp[ch] += h;
            bm[ch] -= h;
            let fd = (loss(&x, &w, &bp) - loss(&x, &w, &bm)) / (2.0 * h);
            assert!((fd - g.bias[ch]).abs() < 1e-6);
        }
    }

    #[test]
    fn eval_backward_is_a_per_channel_scale() {
        let shape = Shape::nc(2, 2).unwrap();
        let g = backward(
            &[1.0, 2.0, 3.0, 4.0],
            &[0.0; 4],
            &shape,
            &[0.0, 0.0],
            &[0.5, 2.0],
            Some(&[2.0, 3.0]),
            false,
        )
        .unwrap();
        assert_eq!(g.input, vec![1.0, 12.0, 3.0, 24.0]);
    }
}

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
/// A frozen BatchNorm call's arguments on host slices.
pub type Frozen<'a, T> = backend::Frozen<'a, Cpu, T>;
/// torchvision's `FrozenBatchNorm2d`, 1-D and 3-D too, on the CPU.
pub type FrozenBatchNorm1d<T, P = T> = crate::frozen::FrozenBatchNorm<1, Cpu, T, P>;
/// `FrozenBatchNorm2d` on the CPU.
pub type FrozenBatchNorm2d<T, P = T> = crate::frozen::FrozenBatchNorm<2, Cpu, T, P>;
/// `FrozenBatchNorm3d` on the CPU.
pub type FrozenBatchNorm3d<T, P = T> = crate::frozen::FrozenBatchNorm<3, Cpu, T, P>;

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
        let mut v = host_vec(0, E::default())?;
        v.try_reserve_exact(b.len())
            .map_err(|_| BnError::HostAlloc {
                len: b.len(),
                elem_bytes: std::mem::size_of::<E>(),
            })?;
        v.extend_from_slice(b);
        Ok(v)
    }

    fn copy_from_host<E: Float>(&self, b: &mut Vec<E>, v: &[E]) -> Result<()> {
        crate::validate::copy_length(b.len(), v.len())?;
        b.copy_from_slice(v);
        Ok(())
    }

    fn batch_norm_fused<T: Float, P: ParamFor<T>>(
        &self,
        args: Forward<'_, T, P>,
        epilogue: Option<Epilogue<'_, T>>,
        output: &mut [T],
        save: Option<SaveStats<'_, T::Acc>>,
        _workspace: &mut (),
    ) -> Result<()> {
        batch_norm_fused(args, epilogue, output, save)
    }

    fn batch_norm_backward_fused<T: Float, P: ParamFor<T>>(
        &self,
        args: Backward<'_, T, P>,
        epilogue: Option<EpilogueGrad<'_, T>>,
        grads: Grads<'_, T, P>,
        _workspace: &mut (),
    ) -> Result<()> {
        batch_norm_backward_fused(args, epilogue, grads)
    }

    fn batch_norm_frozen_fused<T: Float>(
        &self,
        args: Frozen<'_, T>,
        epilogue: Option<Epilogue<'_, T>>,
        output: &mut [T],
    ) -> Result<()> {
        backend::validate_epilogue(&epilogue, &args.shape)?;
        if args.validate(output)? {
            frozen_apply(&args, output, Some(epilogue.as_ref()));
        }
        Ok(())
    }

    fn batch_norm_frozen_backward_fused<T: Float>(
        &self,
        args: Frozen<'_, T>,
        epilogue: Option<EpilogueGrad<'_, T>>,
        grad_input: &mut [T],
    ) -> Result<()> {
        backend::validate_epilogue_grad(&epilogue, &args.shape)?;
        if !args.validate(grad_input)? {
            return Ok(());
        }
        let numel = args.shape.numel();
        let Some(mut e) = epilogue else {
            frozen_apply(&args, grad_input, None);
            return Ok(());
        };
        let dy = masked_grad(&args.input[..numel], &mut e)?;
        let masked = Frozen {
            input: &dy,
            shape: args.shape,
            scale_shift: args.scale_shift,
        };
        frozen_apply(&masked, grad_input, None);
        Ok(())
    }
}

/// The fused epilogue's arguments on host slices.
pub type Epilogue<'a, T> = backend::Epilogue<'a, Cpu, T>;
/// Its backward's.
pub type EpilogueGrad<'a, T> = backend::EpilogueGrad<'a, Cpu, T>;

/// The epilogue applied to the normalised value `v` of element `i` (in f64, before the
/// one rounding), for a validated call.
fn epilogue_at<T: Float>(e: Option<&Epilogue<'_, T>>, i: usize, v: f64) -> f64 {
    match e {
        None => v,
        Some(backend::Epilogue::Relu) => reference::relu(v),
        Some(backend::Epilogue::AddRelu { residual }) => reference::relu(v + residual[i].to_f64()),
    }
}

/// dy masked by the forward's output (`y <= 0`: 0), in T; the residual's gradient is
/// written where asked for. For a validated call.
fn masked_grad<T: Float>(dy: &[T], e: &mut EpilogueGrad<'_, T>) -> Result<Vec<T>> {
    let numel = dy.len();
    let output = match e {
        backend::EpilogueGrad::Relu { output } | backend::EpilogueGrad::AddRelu { output, .. } => {
            &output[..numel]
        }
    };
    let mut g = host_vec(numel, T::from_f64(0.0))?;
    for ((g, d), y) in g.iter_mut().zip(dy).zip(output) {
        if !reference::relu_blocks(y.to_f64()) {
            *g = *d;
        }
    }
    if let backend::EpilogueGrad::AddRelu { grad_residual, .. } = e {
        grad_residual[..numel].copy_from_slice(&g);
    }
    Ok(g)
}

/// Batch-norm mathematics in f64, the reference every kernel is checked against.
///
/// Tensors are in `shape`'s memory order; per-channel slices have C values. Slices
/// shorter than that are an error, never a panic.
pub mod reference {
    use super::host_vec;
    use crate::dtype::Float;
    use crate::error::Result;
    use crate::shape::Shape;
    use crate::validate::buffer;

    /// Widens values to f64 (aborts if host memory runs out; see [`try_to_f64`]).
    pub fn to_f64<T: Float>(v: &[T]) -> Vec<f64> {
        v.iter().map(|x| x.to_f64()).collect()
    }

    /// Widens values to f64, or [`BnError::HostAlloc`](crate::BnError::HostAlloc) when
    /// host memory cannot be had.
    pub fn try_to_f64<T: Float>(v: &[T]) -> Result<Vec<f64>> {
        let mut out = host_vec(v.len(), 0.0)?;
        for (o, x) in out.iter_mut().zip(v) {
            *o = x.to_f64();
        }
        Ok(out)
    }

    /// A sum of f64 values with Neumaier's compensation: the result is the exact sum
    /// rounded once (to within an ulp or so), whatever the order of magnitudes.
    #[derive(Clone, Copy, Debug, Default)]
    pub struct ExactSum {
        sum: f64,
        comp: f64,
    }

    impl ExactSum {
        /// Adds one value.
        pub fn add(&mut self, v: f64) {
            let t = self.sum + v;
            // The rounding error of that addition, exactly (TwoSum's cheaper branchy form).
            self.comp += if self.sum.abs() >= v.abs() {
                (self.sum - t) + v
            } else {
                (v - t) + self.sum
            };
            self.sum = t;
        }

        /// The sum. Non-finite values propagate as in a plain sum (inf, or NaN).
        pub fn value(&self) -> f64 {
            if self.sum.is_finite() {
                self.sum + self.comp
            } else {
                self.sum
            }
        }
    }

    /// Per-channel mean and biased variance. The mean is the compensated sum divided
    /// by the count, corrected by a second pass (the mean of the residuals), so that it
    /// is the exact mean rounded to f64 in all but contrived cases (a constant channel
    /// gives exactly its value); the variance is the compensated mean of the squared
    /// residuals. A channel holding inf or NaN gets PyTorch's answer: the plain sum's
    /// inf or NaN as its mean, and a NaN variance.
    pub fn batch_stats(x: &[f64], shape: &Shape) -> Result<(Vec<f64>, Vec<f64>)> {
        buffer("input", shape.numel(), x.len(), shape)?;
        let (n, c, s) = (shape.n(), shape.c(), shape.spatial());
        let m = (n * s) as f64;
        let mut mean = host_vec(c, 0.0)?;
        let mut var = host_vec(c, 0.0)?;
        let channel =
            |ch: usize| (0..n).flat_map(move |b| (0..s).map(move |i| x[shape.offset(b, ch, i)]));
        for ch in 0..c {
            let mut sum = ExactSum::default();
            channel(ch).for_each(|v| sum.add(v));
            let mut mu = sum.value() / m;
            if mu.is_finite() {
                let mut residual = ExactSum::default();
                channel(ch).for_each(|v| {
                    // v - mu and the rounding error of that subtraction (TwoSum), so
                    // that the residuals are summed exactly.
                    let d = v - mu;
                    let back = v - d;
                    residual.add(d);
                    residual.add((v - (d + back)) + (back - mu));
                });
                mu += residual.value() / m;
            }
            let mut sq = ExactSum::default();
            channel(ch).for_each(|v| {
                let d = v - mu;
                sq.add(d * d)
            });
            mean[ch] = mu;
            var[ch] = sq.value() / m;
        }
        Ok((mean, var))
    }

    /// PyTorch's relu: negative values to 0, NaN and -0 kept.
    pub fn relu(v: f64) -> f64 {
        if v < 0.0 {
            0.0
        } else {
            v
        }
    }

    /// Whether relu's backward zeroes the gradient where its output is `y` (`y <= 0`,
    /// as `threshold_backward`; a NaN output passes its gradient).
    pub fn relu_blocks(y: f64) -> bool {
        y <= 0.0
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
        let mut y = host_vec(shape.numel(), 0.0)?;
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
            input: host_vec(shape.numel(), 0.0)?,
            weight: host_vec(c, 0.0)?,
            bias: host_vec(c, 0.0)?,
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

/// eps as the kernels add it: rounded to the accumulator type (f32, or f64 for f64
/// inputs), as PyTorch's CUDA kernels do. An eps below f32's range (1e-300, 1e-46) is
/// then 0, and a constant channel normalises to NaN there as on the GPU.
fn acc_eps<T: Float>(eps: f64) -> f64 {
    T::Acc::from_f64(eps).to_f64()
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
    batch_norm_fused(args, None, output, save)
}

/// The forward with a fused epilogue on the CPU: bn(x), plus the residual, relu, in f64
/// and rounded once.
pub fn batch_norm_fused<T: Float, P: ParamFor<T>>(
    args: Forward<'_, T, P>,
    epilogue: Option<Epilogue<'_, T>>,
    output: &mut [T],
    save: Option<SaveStats<'_, T::Acc>>,
) -> Result<()> {
    backend::validate_epilogue(&epilogue, &args.shape)?;
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
    let x = reference::try_to_f64(&input[..numel])?;
    let (mean, var) = if batch_stats {
        reference::batch_stats(&x, &shape)?
    } else {
        let rm = running_mean
            .as_deref()
            .map(|v| reference::try_to_f64(v))
            .transpose()?
            .unwrap_or_default();
        let rv = running_var
            .as_deref()
            .map(|v| reference::try_to_f64(v))
            .transpose()?
            .unwrap_or_default();
        (rm, rv)
    };
    let invstd = reference::invstd(&var, acc_eps::<T>(eps));
    let w = weight.map(reference::try_to_f64).transpose()?;
    let b = bias.map(reference::try_to_f64).transpose()?;
    let mut y = reference::normalize(&x, &shape, &mean, &invstd, w.as_deref(), b.as_deref())?;
    for (i, v) in y.iter_mut().enumerate() {
        *v = epilogue_at(epilogue.as_ref(), i, *v);
    }
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

/// A frozen BatchNorm's forward on the CPU: `y = x * scale + shift`, one multiply-add
/// per element rounded once (in f64) then to `T`.
pub fn batch_norm_frozen<T: Float>(args: Frozen<'_, T>, output: &mut [T]) -> Result<()> {
    Cpu.batch_norm_frozen_fused(args, None, output)
}

/// Its backward on the CPU: `dx = dy * scale`.
pub fn batch_norm_frozen_backward<T: Float>(
    args: Frozen<'_, T>,
    grad_input: &mut [T],
) -> Result<()> {
    Cpu.batch_norm_frozen_backward_fused(args, None, grad_input)
}

/// The forward (`forward`: the epilogue, if any): `out = epilogue(input * scale + shift)`
/// per channel; the backward (None): `out = input * scale`. On a validated call.
fn frozen_apply<T: Float>(
    args: &Frozen<'_, T>,
    out: &mut [T],
    forward: Option<Option<&Epilogue<'_, T>>>,
) {
    let shape = &args.shape;
    let (c, s, numel) = (shape.c(), shape.spatial(), shape.numel());
    let (scale, shift) = args.scale_shift.split_at(c);
    let last = shape.format() == crate::shape::MemoryFormat::ChannelsLast;
    for (i, (o, x)) in out[..numel]
        .iter_mut()
        .zip(&args.input[..numel])
        .enumerate()
    {
        let ch = if last { i % c } else { (i / s) % c };
        let b = if forward.is_some() {
            shift[ch].to_f64()
        } else {
            0.0
        };
        let v = x.to_f64().mul_add(scale[ch].to_f64(), b);
        *o = T::from_f64(epilogue_at(forward.flatten(), i, v));
    }
}

/// The backward on the CPU.
pub fn batch_norm_backward<T: Float, P: ParamFor<T>>(
    args: Backward<'_, T, P>,
    grads: Grads<'_, T, P>,
) -> Result<()> {
    batch_norm_backward_fused(args, None, grads)
}

/// The backward of a fused forward on the CPU: dy masked by the ReLU (in T, as
/// PyTorch's autograd hands it on), the residual's gradient written, then the backward.
pub fn batch_norm_backward_fused<T: Float, P: ParamFor<T>>(
    args: Backward<'_, T, P>,
    epilogue: Option<EpilogueGrad<'_, T>>,
    grads: Grads<'_, T, P>,
) -> Result<()> {
    backend::validate_epilogue_grad(&epilogue, &args.shape)?;
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
        } => (
            reference::try_to_f64(save_mean)?,
            reference::try_to_f64(save_invstd)?,
        ),
        backend::BackwardStats::Running { mean, var, eps } => (
            reference::try_to_f64(mean)?,
            reference::invstd(&reference::try_to_f64(var)?, acc_eps::<T>(eps)),
        ),
    };
    let w = weight.map(reference::try_to_f64).transpose()?;
    let masked = match epilogue {
        Some(mut e) => Some(masked_grad(&grad_output[..numel], &mut e)?),
        None => None,
    };
    let dy = masked.as_deref().unwrap_or(&grad_output[..numel]);
    let g = reference::backward(
        &reference::try_to_f64(dy)?,
        &reference::try_to_f64(&input[..numel])?,
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

    /// `v * 2^60` as an exact integer (the tests' values lie on that grid, below 2^40).
    fn scaled(v: f64) -> i128 {
        let s = v * (1u128 << 60) as f64;
        assert!(
            s.fract() == 0.0 && s.abs() < 2f64.powi(110),
            "{v} is off the grid"
        );
        s as i128
    }

    /// Whether `mean` is the exact mean of `values`, rounded to nearest: |mean - exact|
    /// at most half an ulp of `mean`, decided in exact integer arithmetic.
    fn is_rounded_mean(values: &[f64], mean: f64) -> bool {
        let m = values.len() as i128;
        let sum: i128 = values.iter().map(|&v| scaled(v)).sum();
        let err = scaled(mean) * m - sum; // (mean - exact) * m * 2^60
        let half_ulp = (mean.abs().log2().floor() as i32) - 53; // exponent of ulp / 2
        let bound = m << (60 + half_ulp);
        err.abs() <= bound
    }

    #[test]
    fn mean_is_exact_to_f64_rounding() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for case in 0..200 {
            let len = 2 + (next() % 3000) as usize;
            let centre = 1e4 + (next() % 1000) as f64 * 0.1;
            let values: Vec<f64> = match case % 3 {
                // a constant far from zero with a fractional part
                0 => vec![centre + 0.123_456_789; len],
                // a narrow spread around it
                1 => (0..len)
                    .map(|_| centre + (next() % 1_000_000) as f64 * 1e-6)
                    .collect(),
                // magnitudes from 1 to 2^39
                _ => (0..len)
                    .map(|_| (1 + next() % (1 << 39)) as f64 / (1 + next() % 7) as f64)
                    .map(|v| scaled(v.max(1.0)) as f64 / (1u128 << 60) as f64)
                    .collect(),
            };
            let shape = Shape::nc(len, 1).unwrap();
            let (mean, var) = batch_stats(&values, &shape).unwrap();
            assert!(
                is_rounded_mean(&values, mean[0]),
                "case {case}: mean {}",
                mean[0]
            );
            if case % 3 == 0 {
                assert_eq!((mean[0], var[0]), (values[0], 0.0), "constant channel");
                let y = normalize(
                    &values,
                    &shape,
                    &mean,
                    &invstd(&var, 1e-5),
                    Some(&[2.0]),
                    Some(&[0.25]),
                )
                .unwrap();
                assert!(
                    y.iter().all(|&v| v == 0.25),
                    "y of a constant channel is the bias"
                );
            }
        }
    }

    #[test]
    fn non_finite_values_give_pytorchs_statistics() {
        let shape = Shape::nc(4, 1).unwrap();
        let (m, v) = batch_stats(&[1.0, f64::INFINITY, 2.0, 3.0], &shape).unwrap();
        assert_eq!(m[0], f64::INFINITY);
        assert!(v[0].is_nan());
        let (m, _) = batch_stats(&[1.0, f64::INFINITY, f64::NEG_INFINITY, 3.0], &shape).unwrap();
        assert!(m[0].is_nan());
        let (m, _) = batch_stats(&[f64::NEG_INFINITY, 1.0, 2.0, 3.0], &shape).unwrap();
        assert_eq!(m[0], f64::NEG_INFINITY);
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

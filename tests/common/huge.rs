//! A training forward and backward on an f16 tensor of more than 2^31 elements, checked
//! without an f64 copy of it (which would need 17 GB): the values come from a formula,
//! the reference statistics and reductions are streamed over the tensor on every core,
//! and the elementwise outputs are read at sampled indices (the last elements, and the
//! first ones past 2^31). Shared by the GPU test and the emulated one, which differ only
//! in the [`Device`] that runs the two calls.

use cuda_batchnorm::half::f16;
use cuda_batchnorm::{MemoryFormat, Shape};

use super::check_close;

pub const EPS: f64 = 1e-5;
pub const MOMENTUM: f64 = 0.1;

/// Elements of the full-size test: more than 2^31, a multiple of 16.
pub const FULL: usize = (1 << 31) + (1 << 20);

/// (2, 4, numel / 8) contiguous, or (2, 8, numel / 16) channels-last (a row of 8 f16
/// channels is one 16-byte vector). `numel` must be a multiple of 16.
pub fn shape(format: MemoryFormat, numel: usize) -> Shape {
    let dims: [usize; 3] = match format {
        MemoryFormat::Contiguous => [2, 4, numel / 8],
        MemoryFormat::ChannelsLast => [2, 8, numel / 16],
    };
    Shape::new(&dims, format).expect("a valid (N, C, L) shape")
}

/// The channel of element i.
pub fn channel(shape: &Shape, i: usize) -> usize {
    match shape.format() {
        MemoryFormat::Contiguous => (i / shape.spatial()) % shape.c(),
        MemoryFormat::ChannelsLast => i % shape.c(),
    }
}

fn hash(i: usize, k: u64) -> u64 {
    (i as u64 ^ k).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32
}

/// Spread over [-2, 2) around a channel mean of 0.5 (c + 1): a mean far from zero keeps
/// the f32 statistics' relative error meaningful.
pub fn x_at(i: usize, c: usize) -> f16 {
    f16::from_f32((hash(i, 1) % 1000) as f32 * 0.004 - 2.0 + 0.5 * (c as f32 + 1.0))
}

/// Correlated with x, so that dotp is far from zero, plus noise and a channel offset.
pub fn dy_at(i: usize, c: usize, x: f16) -> f16 {
    let noise = (hash(i, 2) % 997) as f32 * 0.001 - 0.5;
    f16::from_f32(0.3 * (x.to_f32() - 0.5 * (c as f32 + 1.0)) + noise + 0.25 * c as f32)
}

/// Per-channel weight and bias of the test.
pub fn weight(c: usize) -> Vec<f32> {
    (0..c).map(|k| 1.0 + 0.125 * k as f32).collect()
}

pub fn bias(c: usize) -> Vec<f32> {
    (0..c).map(|k| 0.25 * k as f32 - 0.5).collect()
}

/// Fills a tensor from `f(i, channel)` on every core.
pub fn fill(shape: &Shape, f: impl Fn(usize, usize) -> f16 + Sync) -> Vec<f16> {
    let mut v = vec![f16::ZERO; shape.numel()];
    let parts = threads();
    let per = v.len().div_ceil(parts).max(1);
    std::thread::scope(|s| {
        for (k, chunk) in v.chunks_mut(per).enumerate() {
            let f = &f;
            s.spawn(move || {
                for (j, out) in chunk.iter_mut().enumerate() {
                    let i = k * per + j;
                    *out = f(i, channel(shape, i));
                }
            });
        }
    });
    v
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Sums `f(i, channel)` per channel in f64 over the whole tensor, on every core.
fn channel_sums(shape: &Shape, f: impl Fn(usize, usize) -> f64 + Sync) -> Vec<f64> {
    let (n, c) = (shape.numel(), shape.c());
    let parts = threads();
    let per = n.div_ceil(parts).max(1);
    let partials: Vec<Vec<f64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..parts)
            .map(|k| {
                let f = &f;
                s.spawn(move || {
                    let mut acc = vec![0.0f64; c];
                    for i in k * per..((k + 1) * per).min(n) {
                        let ch = channel(shape, i);
                        acc[ch] += f(i, ch);
                    }
                    acc
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    (0..c)
        .map(|ch| partials.iter().map(|p| p[ch]).sum())
        .collect()
}

/// Indices to read outputs at: the last 4096 elements (strided) and the 64 from 2^31 on
/// when the tensor is that large, else from its middle.
pub fn samples(n: usize) -> Vec<usize> {
    let past = if n > (1 << 31) + 64 { 1 << 31 } else { n / 2 };
    (0..4096)
        .map(|k| n - 1 - (k * 97) % n)
        .chain((0..64).map(|k| past + k))
        .collect()
}

/// The forward's outputs a device returns.
pub struct Forwarded {
    pub save_mean: Vec<f32>,
    pub save_invstd: Vec<f32>,
    pub running_mean: Vec<f32>,
    pub running_var: Vec<f32>,
    /// y at [`samples`].
    pub y: Vec<f16>,
}

/// The backward's outputs a device returns.
pub struct Backwarded {
    pub grad_weight: Vec<f32>,
    pub grad_bias: Vec<f32>,
    /// dx at [`samples`].
    pub dx: Vec<f16>,
}

/// Runs the two calls, f16 data with f32 parameters and statistics.
pub trait Device {
    /// Training forward with weight, bias, running_mean 0 and running_var 1, momentum
    /// [`MOMENTUM`], eps [`EPS`].
    fn forward(
        &self,
        shape: &Shape,
        x: &[f16],
        weight: &[f32],
        bias: &[f32],
        samples: &[usize],
    ) -> Result<Forwarded, String>;

    /// Training backward with the forward's saved statistics, all three gradients.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        shape: &Shape,
        x: &[f16],
        dy: &[f16],
        weight: &[f32],
        save_mean: &[f32],
        save_invstd: &[f32],
        samples: &[usize],
    ) -> Result<Backwarded, String>;
}

/// Runs and checks the training forward and backward on `numel` elements (use [`FULL`]
/// for the tensor of more than 2^31 elements).
pub fn check<D: Device>(dev: &D, format: MemoryFormat, numel: usize) -> Result<(), String> {
    check_each(&[("", dev as &dyn Device)], format, numel)
}

/// [`check`] for several devices (the kernel families, each forced), the reference
/// computed once; an error names the device.
pub fn check_each(
    devs: &[(&str, &dyn Device)],
    format: MemoryFormat,
    numel: usize,
) -> Result<(), String> {
    let shape = shape(format, numel);
    assert_eq!(shape.numel(), numel, "numel must be a multiple of 16");
    let (n, c) = (shape.numel(), shape.c());
    let m = shape.per_channel() as f64;
    let (w, b) = (weight(c), bias(c));
    let idx = samples(n);

    let x = fill(&shape, x_at);
    let xf = |i: usize| f64::from(x[i].to_f32());
    let sums = channel_sums(&shape, |i, _| xf(i));
    let mean: Vec<f64> = sums.iter().map(|s| s / m).collect();
    let sq = channel_sums(&shape, |i, ch| (xf(i) - mean[ch]).powi(2));
    let var: Vec<f64> = sq.iter().map(|s| s / m).collect();
    let invstd: Vec<f64> = var.iter().map(|v| 1.0 / (v + EPS).sqrt()).collect();

    let rm: Vec<f64> = mean.iter().map(|v| MOMENTUM * v).collect();
    let rv: Vec<f64> = var
        .iter()
        .map(|v| MOMENTUM * v * m / (m - 1.0) + (1.0 - MOMENTUM))
        .collect();
    let want_y: Vec<f64> = idx
        .iter()
        .map(|&i| {
            let ch = channel(&shape, i);
            (xf(i) - mean[ch]) * invstd[ch] * f64::from(w[ch]) + f64::from(b[ch])
        })
        .collect();
    let dy = fill(&shape, |i, ch| dy_at(i, ch, x[i]));
    let dyf = |i: usize| f64::from(dy[i].to_f32());
    let sum_dy = channel_sums(&shape, |i, _| dyf(i));
    let dotp = channel_sums(&shape, |i, ch| dyf(i) * (xf(i) - mean[ch]));
    let gw: Vec<f64> = (0..c).map(|ch| dotp[ch] * invstd[ch]).collect();
    let want_dx: Vec<f64> = idx
        .iter()
        .map(|&i| {
            let ch = channel(&shape, i);
            let k = invstd[ch];
            (dyf(i) - sum_dy[ch] / m - (xf(i) - mean[ch]) * dotp[ch] * k * k / m)
                * k
                * f64::from(w[ch])
        })
        .collect();

    for (name, dev) in devs {
        let named = |e: String| {
            if name.is_empty() {
                e
            } else {
                format!("{name}: {e}")
            }
        };
        let f = dev.forward(&shape, &x, &w, &b, &idx).map_err(named)?;
        let g = dev
            .backward(&shape, &x, &dy, &w, &f.save_mean, &f.save_invstd, &idx)
            .map_err(named)?;
        [
            check_close("save_mean", &f.save_mean, &mean),
            check_close("save_invstd", &f.save_invstd, &invstd),
            check_close("running_mean", &f.running_mean, &rm),
            check_close("running_var", &f.running_var, &rv),
            check_close("y at the sampled indices", &f.y, &want_y),
            check_close("grad_weight", &g.grad_weight, &gw),
            check_close("grad_bias", &g.grad_bias, &sum_dy),
            check_close("grad_input at the sampled indices", &g.dx, &want_dx),
        ]
        .into_iter()
        .collect::<Result<(), String>>()
        .map_err(named)?;
    }
    Ok(())
}

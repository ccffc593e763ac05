//! Seeded inputs and channel sampling.
//!
//! Large tensors are not generated element by element: element `i` of an input is
//! `pattern[i % PATTERN_LEN]` for a random pattern of a prime length, so the GPU path
//! uploads one pattern and replicates it with device copies, and any element can be
//! recomputed on the host for the check. Values are never zero.

use cuda_batchnorm::{Float, MemoryFormat, Shape};

/// Length of the repeated input pattern (a prime, so channels and rows never line up
/// with it).
pub const PATTERN_LEN: usize = 1_000_003;

/// Most channels a check looks at.
pub const MAX_SAMPLED_CHANNELS: usize = 8;

/// SplitMix64: a small, seedable, well-mixed generator.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` and a stream id (so x, dy and parameters differ).
    pub fn new(seed: u64, stream: u64) -> Rng {
        Rng(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [lo, hi), never within 1e-3 of zero.
    pub fn uniform_nonzero(&mut self, lo: f64, hi: f64) -> f64 {
        loop {
            let u = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            let v = lo + (hi - lo) * u;
            if v.abs() >= 1e-3 {
                return v;
            }
        }
    }
}

/// `len` values uniform in [lo, hi), rounded to `E`, none zero after rounding.
pub fn random_vec<E: Float>(seed: u64, stream: u64, len: usize, lo: f64, hi: f64) -> Vec<E> {
    let mut rng = Rng::new(seed, stream);
    (0..len)
        .map(|_| E::from_f64(rng.uniform_nonzero(lo, hi)))
        .collect()
}

/// Stream ids of the generated tensors.
pub mod streams {
    /// Input.
    pub const X: u64 = 1;
    /// Gradient of the output.
    pub const DY: u64 = 2;
    /// Weight.
    pub const WEIGHT: u64 = 3;
    /// Bias.
    pub const BIAS: u64 = 4;
    /// Running mean.
    pub const RUNNING_MEAN: u64 = 5;
    /// Running variance.
    pub const RUNNING_VAR: u64 = 6;
    /// The residual of the fused add-ReLU.
    pub const Z: u64 = 7;
}

/// The host side of one row's inputs.
pub struct Inputs<T: Float, P: Float> {
    /// x's pattern (`min(numel, PATTERN_LEN)` values).
    pub x: Vec<T>,
    /// dy's pattern.
    pub dy: Vec<T>,
    /// The residual z's pattern (the fused add-ReLU ops).
    pub z: Vec<T>,
    /// Weight (C), in [0.5, 1.5).
    pub weight: Vec<P>,
    /// Bias (C), in [-0.5, 0.5).
    pub bias: Vec<P>,
    /// Initial running mean (C), in [-0.5, 0.5).
    pub running_mean: Vec<P>,
    /// Initial running variance (C), in [0.5, 2).
    pub running_var: Vec<P>,
}

impl<T: Float, P: Float> Inputs<T, P> {
    /// Inputs for `shape`: x uniform in [-2, 3) (mean 0.5, so statistics are not
    /// near zero), dy uniform in [-1, 2), z uniform in [-1, 1) (so that relu(bn(x) + z)
    /// cuts about half of the values).
    pub fn new(seed: u64, shape: &Shape) -> Self {
        let n = shape.numel().min(PATTERN_LEN);
        let c = shape.c();
        Inputs {
            x: random_vec(seed, streams::X, n, -2.0, 3.0),
            dy: random_vec(seed, streams::DY, n, -1.0, 2.0),
            z: random_vec(seed, streams::Z, n, -1.0, 1.0),
            weight: random_vec(seed, streams::WEIGHT, c, 0.5, 1.5),
            bias: random_vec(seed, streams::BIAS, c, -0.5, 0.5),
            running_mean: random_vec(seed, streams::RUNNING_MEAN, c, -0.5, 0.5),
            running_var: random_vec(seed, streams::RUNNING_VAR, c, 0.5, 2.0),
        }
    }
}

/// The full tensor of `numel` elements repeating `pattern`.
pub fn tile<E: Copy>(pattern: &[E], numel: usize) -> Vec<E> {
    (0..numel).map(|i| pattern[i % pattern.len()]).collect()
}

/// Up to [`MAX_SAMPLED_CHANNELS`] channels spread over `0..c`, first and last included.
pub fn sample_channels(c: usize) -> Vec<usize> {
    if c <= MAX_SAMPLED_CHANNELS {
        return (0..c).collect();
    }
    let k = MAX_SAMPLED_CHANNELS;
    let mut v: Vec<usize> = (0..k).map(|j| j * (c - 1) / (k - 1)).collect();
    v.dedup();
    v
}

/// The shape of a gathered sample: (N, k, S), contiguous.
pub fn sample_shape(shape: &Shape, k: usize) -> Shape {
    Shape::new(&[shape.n(), k, shape.spatial()], MemoryFormat::Contiguous)
        .expect("a sample is no larger than its tensor")
}

/// Gathers channels `chans` of a tensor of `shape` into an (N, k, S) contiguous
/// sample. `fetch(start, len)` returns elements `start..start + len` of the tensor in
/// memory order; it is called with few large ranges (whole planes, whole batches or
/// blocks of rows).
pub fn gather<E: Copy + Default, Err>(
    shape: &Shape,
    chans: &[usize],
    mut fetch: impl FnMut(usize, usize) -> Result<Vec<E>, Err>,
) -> Result<Vec<E>, Err> {
    let (n, c, s) = (shape.n(), shape.c(), shape.spatial());
    let k = chans.len();
    let mut out = vec![E::default(); n * k * s];
    if shape.numel() == 0 || k == 0 {
        return Ok(out);
    }
    if shape.channel_innermost() {
        // Rows of C channels: fetch blocks of rows.
        let rows = n * s;
        let block = (4 << 20) / c.max(1) + 1;
        let mut r0 = 0;
        while r0 < rows {
            let nr = block.min(rows - r0);
            let data = fetch(r0 * c, nr * c)?;
            for r in 0..nr {
                let row = r0 + r;
                let (b, i) = (row / s, row % s);
                for (j, &ch) in chans.iter().enumerate() {
                    out[(b * k + j) * s + i] = data[r * c + ch];
                }
            }
            r0 += nr;
        }
    } else if s >= 256 {
        // Planes of S values: fetch the sampled planes only.
        for b in 0..n {
            for (j, &ch) in chans.iter().enumerate() {
                let plane = fetch((b * c + ch) * s, s)?;
                out[(b * k + j) * s..(b * k + j + 1) * s].copy_from_slice(&plane);
            }
        }
    } else {
        // Small planes: fetch whole batches.
        for b in 0..n {
            let batch = fetch(b * c * s, c * s)?;
            for (j, &ch) in chans.iter().enumerate() {
                out[(b * k + j) * s..(b * k + j + 1) * s]
                    .copy_from_slice(&batch[ch * s..(ch + 1) * s]);
            }
        }
    }
    Ok(out)
}

/// Like [`gather`], for a tensor given as a function of the memory index.
pub fn gather_indexed<E>(shape: &Shape, chans: &[usize], value: impl Fn(usize) -> E) -> Vec<E> {
    let (n, s) = (shape.n(), shape.spatial());
    let mut out = Vec::with_capacity(n * chans.len() * s);
    for b in 0..n {
        for &ch in chans {
            out.extend((0..s).map(|i| value(shape.offset(b, ch, i))));
        }
    }
    out
}

/// Values at `chans` of a per-channel vector.
pub fn pick<E: Copy>(v: &[E], chans: &[usize]) -> Vec<E> {
    chans.iter().map(|&c| v[c]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use cuda_batchnorm::half::f16;

    #[test]
    fn rng_is_seeded_and_never_zero() {
        let a: Vec<f32> = random_vec(7, 1, 1000, -1.0, 1.0);
        let b: Vec<f32> = random_vec(7, 1, 1000, -1.0, 1.0);
        let c: Vec<f32> = random_vec(7, 2, 1000, -1.0, 1.0);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().all(|v| v.abs() >= 1e-3 && *v < 1.0 && *v >= -1.0));
        let h: Vec<f16> = random_vec(1, 1, 10_000, -2.0, 3.0);
        assert!(h.iter().all(|v| v.to_f32() != 0.0));
    }

    #[test]
    fn sampled_channels() {
        assert_eq!(sample_channels(3), vec![0, 1, 2]);
        assert_eq!(sample_channels(8), (0..8).collect::<Vec<_>>());
        let s = sample_channels(17);
        assert_eq!(s.len(), 8);
        assert_eq!((s[0], s[7]), (0, 16));
        assert!(s.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(*sample_channels(2048).last().unwrap(), 2047);
    }

    #[test]
    fn gather_matches_offsets_in_every_path() {
        for (dims, format) in [
            (vec![3, 5, 4, 4], MemoryFormat::Contiguous), // small planes
            (vec![2, 10, 300], MemoryFormat::Contiguous), // plane fetches
            (vec![3, 5, 4, 4], MemoryFormat::ChannelsLast), // rows
            (vec![7, 11], MemoryFormat::Contiguous),      // rank 2: rows
            (vec![2, 3, 2, 2, 2], MemoryFormat::ChannelsLast),
        ] {
            let shape = Shape::new(&dims, format).unwrap();
            let full: Vec<usize> = (0..shape.numel()).collect();
            let chans = sample_channels(shape.c())
                .into_iter()
                .step_by(2)
                .collect::<Vec<_>>();
            let mut calls = 0;
            let got = gather(&shape, &chans, |a, n| {
                calls += 1;
                Ok::<_, ()>(full[a..a + n].to_vec())
            })
            .unwrap();
            let sub = sample_shape(&shape, chans.len());
            for b in 0..shape.n() {
                for (j, &ch) in chans.iter().enumerate() {
                    for i in 0..shape.spatial() {
                        assert_eq!(
                            got[sub.offset(b, j, i)],
                            shape.offset(b, ch, i),
                            "{dims:?} {format:?}"
                        );
                    }
                }
            }
            assert!(calls <= shape.n() * chans.len());
        }
    }

    #[test]
    fn gather_indexed_matches_gather() {
        for format in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
            let shape = Shape::new(&[3, 11, 5, 2], format).unwrap();
            let chans = sample_channels(11);
            let full: Vec<usize> = (0..shape.numel()).map(|i| i * 3 + 1).collect();
            let a = gather(&shape, &chans, |s, n| Ok::<_, ()>(full[s..s + n].to_vec())).unwrap();
            assert_eq!(a, gather_indexed(&shape, &chans, |i| full[i]));
        }
    }

    #[test]
    fn tiling_repeats_the_pattern() {
        assert_eq!(tile(&[1, 2, 3], 7), vec![1, 2, 3, 1, 2, 3, 1]);
    }
}

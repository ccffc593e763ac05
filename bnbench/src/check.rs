//! Correctness checks against the f64 reference (`cuda_batchnorm::cpu::reference`), on
//! a sample of channels (all of their values), with the norm-wise relative error
//! `‖out − ref‖ / ‖ref‖`. NaN or infinity never passes.
//!
//! The same checks serve the GPU rows and, without a GPU, the CPU backend
//! ([`cpu_selfcheck`]), which also runs a finite-difference check of the backward.

pub use crate::ops::{EPS, MOMENTUM};
use cuda_batchnorm::cpu::{self, reference};
use cuda_batchnorm::half::{bf16, f16};
use cuda_batchnorm::{DType, Float, MemoryFormat, ParamFor, Shape};

use crate::data::{self, Inputs};
use crate::suite::{dims_label, Op};

/// Norm-wise tolerance for an input dtype.
pub fn tolerance(d: DType) -> f64 {
    match d {
        DType::F32 => 1e-5,
        DType::F16 => 1e-3,
        DType::BF16 => 1e-2,
        DType::F64 => 1e-10,
    }
}

/// `‖got − want‖ / ‖want‖` (the absolute norm when `want` is zero); NaN when any value
/// is not finite or the lengths differ.
pub fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    if got.len() != want.len() || got.iter().chain(want).any(|v| !v.is_finite()) {
        return f64::NAN;
    }
    let diff: f64 = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w) * (g - w))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = want.iter().map(|w| w * w).sum::<f64>().sqrt();
    if norm > 0.0 {
        diff / norm
    } else {
        diff
    }
}

/// The outcome of one check.
#[derive(Clone, Debug, PartialEq)]
pub struct Check {
    /// Largest relative error over the compared outputs (NaN if any was not finite).
    pub max_rel_err: f64,
    /// The tolerance.
    pub tol: f64,
    /// Which output had the largest error.
    pub worst: &'static str,
}

impl Check {
    /// Compares named outputs against their references.
    pub fn of(parts: &[(&'static str, &[f64], &[f64])], tol: f64) -> Check {
        let mut c = Check {
            max_rel_err: 0.0,
            tol,
            worst: "",
        };
        for (name, got, want) in parts {
            if c.max_rel_err.is_nan() {
                break; // the first non-finite part decides
            }
            let e = rel_err(got, want);
            if e.is_nan() || e > c.max_rel_err || c.worst.is_empty() {
                c.max_rel_err = e;
                c.worst = name;
            }
        }
        c
    }

    /// A check that could not be made (the reference refused its inputs): it fails.
    pub fn unusable(tol: f64) -> Check {
        Check {
            max_rel_err: f64::NAN,
            tol,
            worst: "reference",
        }
    }

    /// Whether it passed (NaN never does).
    pub fn passed(&self) -> bool {
        self.max_rel_err <= self.tol
    }

    /// `ok` or `failed`.
    pub fn status(&self) -> &'static str {
        if self.passed() {
            "ok"
        } else {
            "failed"
        }
    }
}

/// A sample of channels of one row's inputs, widened to f64: (N, k, S) contiguous.
#[derive(Clone, Debug)]
pub struct Sample {
    /// (N, k, S).
    pub shape: Shape,
    /// Input values as stored (rounded to the input dtype).
    pub x: Vec<f64>,
    /// Output gradient values as stored.
    pub dy: Vec<f64>,
    /// Weight (k).
    pub weight: Vec<f64>,
    /// Bias (k).
    pub bias: Vec<f64>,
    /// Running mean before the call (k).
    pub running_mean: Vec<f64>,
    /// Running variance before the call (k).
    pub running_var: Vec<f64>,
}

impl Sample {
    /// The sample of `inputs` at `chans` for a tensor of `shape` (inputs repeat their
    /// pattern, see [`data`]).
    pub fn new<T: Float, P: Float>(
        inputs: &Inputs<T, P>,
        shape: &Shape,
        chans: &[usize],
    ) -> Sample {
        let from_pattern =
            |p: &[T]| data::gather_indexed(shape, chans, |i| p[i % p.len()].to_f64());
        let param = |v: &[P]| data::pick(&reference::to_f64(v), chans);
        Sample {
            shape: data::sample_shape(shape, chans.len()),
            x: from_pattern(&inputs.x),
            dy: from_pattern(&inputs.dy),
            weight: param(&inputs.weight),
            bias: param(&inputs.bias),
            running_mean: param(&inputs.running_mean),
            running_var: param(&inputs.running_var),
        }
    }
}

/// What a training forward produced, at the sampled channels, widened to f64.
#[derive(Clone, Debug, Default)]
pub struct TrainOut {
    /// Output (N, k, S).
    pub y: Vec<f64>,
    /// save_mean (k).
    pub save_mean: Vec<f64>,
    /// save_invstd (k).
    pub save_invstd: Vec<f64>,
    /// running_mean after the call (k).
    pub running_mean: Vec<f64>,
    /// running_var after the call (k).
    pub running_var: Vec<f64>,
}

/// What a backward produced, at the sampled channels.
#[derive(Clone, Debug, Default)]
pub struct BackwardOut {
    /// grad_input (N, k, S).
    pub dx: Vec<f64>,
    /// grad_weight (k).
    pub grad_weight: Vec<f64>,
    /// grad_bias (k).
    pub grad_bias: Vec<f64>,
}

/// Checks a training forward: output, saved statistics, updated running statistics.
pub fn check_train(s: &Sample, out: &TrainOut, tol: f64) -> Check {
    let Ok((mean, var)) = reference::batch_stats(&s.x, &s.shape) else {
        return Check::unusable(tol);
    };
    let invstd = reference::invstd(&var, EPS);
    let Ok(y) = reference::normalize(
        &s.x,
        &s.shape,
        &mean,
        &invstd,
        Some(&s.weight),
        Some(&s.bias),
    ) else {
        return Check::unusable(tol);
    };
    let m = s.shape.per_channel() as f64;
    let rm: Vec<f64> = mean
        .iter()
        .zip(&s.running_mean)
        .map(|(b, r)| MOMENTUM * b + (1.0 - MOMENTUM) * r)
        .collect();
    let rv: Vec<f64> = var
        .iter()
        .zip(&s.running_var)
        .map(|(v, r)| MOMENTUM * v * m / (m - 1.0) + (1.0 - MOMENTUM) * r)
        .collect();
    Check::of(
        &[
            ("y", &out.y, &y),
            ("save_mean", &out.save_mean, &mean),
            ("save_invstd", &out.save_invstd, &invstd),
            ("running_mean", &out.running_mean, &rm),
            ("running_var", &out.running_var, &rv),
        ],
        tol,
    )
}

/// Checks an eval forward (running statistics as in the sample).
pub fn check_eval(s: &Sample, y: &[f64], tol: f64) -> Check {
    let invstd = reference::invstd(&s.running_var, EPS);
    let Ok(want) = reference::normalize(
        &s.x,
        &s.shape,
        &s.running_mean,
        &invstd,
        Some(&s.weight),
        Some(&s.bias),
    ) else {
        return Check::unusable(tol);
    };
    Check::of(&[("y", y, &want)], tol)
}

/// Checks a backward against the reference given the statistics the forward saved.
pub fn check_backward(
    s: &Sample,
    save_mean: &[f64],
    save_invstd: &[f64],
    out: &BackwardOut,
    tol: f64,
) -> Check {
    let Ok(g) = reference::backward(
        &s.dy,
        &s.x,
        &s.shape,
        save_mean,
        save_invstd,
        Some(&s.weight),
        true,
    ) else {
        return Check::unusable(tol);
    };
    Check::of(
        &[
            ("dx", &out.dx, &g.input),
            ("grad_weight", &out.grad_weight, &g.weight),
            ("grad_bias", &out.grad_bias, &g.bias),
        ],
        tol,
    )
}

/// Widens a host vector to f64.
pub fn wide<E: Float>(v: &[E]) -> Vec<f64> {
    reference::to_f64(v)
}

/// Runs the three ops on the CPU backend for one shape and checks each.
pub fn cpu_row<T: Float, P: ParamFor<T>>(shape: &Shape, seed: u64) -> Result<[Check; 3], String> {
    let e = |e: cuda_batchnorm::BnError| e.to_string();
    let inputs = Inputs::<T, P>::new(seed, shape);
    let (numel, c) = (shape.numel(), shape.c());
    let chans = data::sample_channels(c);
    let sample = Sample::new(&inputs, shape, &chans);
    let tol = tolerance(T::DTYPE);
    let x = data::tile(&inputs.x, numel);
    let dy = data::tile(&inputs.dy, numel);
    let host = |v: &[T]| {
        data::gather(shape, &chans, |a, n| Ok::<_, ()>(wide(&v[a..a + n]))).unwrap_or_default()
    };

    // Training forward.
    let (mut rm, mut rv) = (inputs.running_mean.clone(), inputs.running_var.clone());
    let mut y = vec![T::default(); numel];
    let zero = <T::Acc as Float>::from_f64(0.0);
    let (mut sm, mut si) = (vec![zero; c], vec![zero; c]);
    cpu::batch_norm(
        cpu::Forward {
            input: &x,
            shape: *shape,
            running_mean: Some(&mut rm),
            running_var: Some(&mut rv),
            weight: Some(&inputs.weight),
            bias: Some(&inputs.bias),
            training: true,
            momentum: MOMENTUM,
            eps: EPS,
        },
        &mut y,
        Some(cpu::SaveStats {
            mean: &mut sm,
            invstd: &mut si,
        }),
    )
    .map_err(e)?;
    let train_out = TrainOut {
        y: host(&y),
        save_mean: data::pick(&wide(&sm), &chans),
        save_invstd: data::pick(&wide(&si), &chans),
        running_mean: data::pick(&wide(&rm), &chans),
        running_var: data::pick(&wide(&rv), &chans),
    };
    let train = check_train(&sample, &train_out, tol);

    // Eval forward with the initial running statistics.
    let (mut rm, mut rv) = (inputs.running_mean.clone(), inputs.running_var.clone());
    let mut y = vec![T::default(); numel];
    cpu::batch_norm(
        cpu::Forward {
            input: &x,
            shape: *shape,
            running_mean: Some(&mut rm),
            running_var: Some(&mut rv),
            weight: Some(&inputs.weight),
            bias: Some(&inputs.bias),
            training: false,
            momentum: MOMENTUM,
            eps: EPS,
        },
        &mut y,
        None,
    )
    .map_err(e)?;
    let eval = check_eval(&sample, &host(&y), tol);

    // Backward with the training forward's saved statistics.
    let mut dx = vec![T::default(); numel];
    let pzero = P::from_f64(0.0);
    let (mut gw, mut gb) = (vec![pzero; c], vec![pzero; c]);
    cpu::batch_norm_backward(
        cpu::Backward {
            grad_output: &dy,
            input: &x,
            shape: *shape,
            weight: Some(&inputs.weight),
            stats: cpu::BackwardStats::Batch {
                save_mean: &sm,
                save_invstd: &si,
            },
        },
        cpu::Grads {
            input: &mut dx,
            weight: Some(&mut gw),
            bias: Some(&mut gb),
        },
    )
    .map_err(e)?;
    let out = BackwardOut {
        dx: host(&dx),
        grad_weight: data::pick(&wide(&gw), &chans),
        grad_bias: data::pick(&wide(&gb), &chans),
    };
    let bwd = check_backward(
        &sample,
        &train_out.save_mean,
        &train_out.save_invstd,
        &out,
        tol,
    );
    Ok([train, eval, bwd])
}

/// Compares the CPU backend's backward with central finite differences of
/// `loss = Σ dy · batch_norm(x, w, b)` (training, f64) on a tiny shape; returns the
/// norm-wise relative error over (dx, dweight, dbias).
pub fn finite_difference(shape: &Shape, seed: u64) -> Result<f64, String> {
    let e = |e: cuda_batchnorm::BnError| e.to_string();
    let inputs = Inputs::<f64, f64>::new(seed, shape);
    let (numel, c) = (shape.numel(), shape.c());
    let x = data::tile(&inputs.x, numel);
    let dy = data::tile(&inputs.dy, numel);
    let forward = |x: &[f64],
                   w: &[f64],
                   b: &[f64],
                   save: Option<(&mut [f64], &mut [f64])>|
     -> Result<f64, String> {
        let mut y = vec![0.0; numel];
        cpu::batch_norm(
            cpu::Forward {
                input: x,
                shape: *shape,
                running_mean: None,
                running_var: None,
                weight: Some(w),
                bias: Some(b),
                training: true,
                momentum: MOMENTUM,
                eps: EPS,
            },
            &mut y,
            save.map(|(mean, invstd)| cpu::SaveStats { mean, invstd }),
        )
        .map_err(e)?;
        Ok(y.iter().zip(&dy).map(|(a, b)| a * b).sum())
    };
    let (w, b) = (inputs.weight.clone(), inputs.bias.clone());
    let (mut sm, mut si) = (vec![0.0; c], vec![0.0; c]);
    forward(&x, &w, &b, Some((&mut sm, &mut si)))?;
    let (mut dx, mut gw, mut gb) = (vec![0.0; numel], vec![0.0; c], vec![0.0; c]);
    cpu::batch_norm_backward(
        cpu::Backward {
            grad_output: &dy,
            input: &x,
            shape: *shape,
            weight: Some(&w),
            stats: cpu::BackwardStats::Batch {
                save_mean: &sm,
                save_invstd: &si,
            },
        },
        cpu::Grads {
            input: &mut dx,
            weight: Some(&mut gw),
            bias: Some(&mut gb),
        },
    )
    .map_err(e)?;
    let h = 1e-5;
    let mut fd = Vec::with_capacity(numel + 2 * c);
    for i in 0..numel {
        let (mut xp, mut xm) = (x.clone(), x.clone());
        xp[i] += h;
        xm[i] -= h;
        fd.push((forward(&xp, &w, &b, None)? - forward(&xm, &w, &b, None)?) / (2.0 * h));
    }
    for which in 0..2 {
        for ch in 0..c {
            let (mut p, mut m) = if which == 0 {
                (w.clone(), w.clone())
            } else {
                (b.clone(), b.clone())
            };
            p[ch] += h;
            m[ch] -= h;
            let (lp, lm) = if which == 0 {
                (forward(&x, &p, &b, None)?, forward(&x, &m, &b, None)?)
            } else {
                (forward(&x, &w, &p, None)?, forward(&x, &w, &m, None)?)
            };
            fd.push((lp - lm) / (2.0 * h));
        }
    }
    let analytic: Vec<f64> = dx.into_iter().chain(gw).chain(gb).collect();
    Ok(rel_err(&analytic, &fd))
}

/// Tolerance of the finite-difference check.
pub const FD_TOL: f64 = 1e-6;

/// The CPU backend's self-check for when there is no GPU: a few small shapes, all four
/// dtypes, both layouts, the three ops, and the finite-difference check. Returns the
/// table and whether everything passed.
pub fn cpu_selfcheck(seed: u64) -> (String, bool) {
    let shapes: [(&[usize], &[MemoryFormat]); 3] = [
        (
            &[4, 3, 5, 7],
            &[MemoryFormat::Contiguous, MemoryFormat::ChannelsLast],
        ),
        (
            &[3, 10, 2, 3, 2],
            &[MemoryFormat::Contiguous, MemoryFormat::ChannelsLast],
        ),
        (&[16, 6], &[MemoryFormat::Contiguous]),
    ];
    let mut out = String::new();
    let mut all_ok = true;
    out.push_str(&format!(
        "CPU backend vs the f64 reference (norm-wise relative error, up to {} channels sampled)\n",
        data::MAX_SAMPLED_CHANNELS
    ));
    out.push_str(&format!(
        "{:<12} {:<6} {:<5} {:>10} {:>10} {:>10} {:>8}  {}\n",
        "shape",
        "layout",
        "dtype",
        Op::TrainFwd.name(),
        Op::EvalFwd.name(),
        Op::Backward.name(),
        "tol",
        "check"
    ));
    for (dims, formats) in shapes {
        for &format in formats {
            let shape = Shape::new(dims, format).expect("fixed shapes are valid");
            for dtype in [DType::F32, DType::F16, DType::BF16, DType::F64] {
                let res = match dtype {
                    DType::F32 => cpu_row::<f32, f32>(&shape, seed),
                    DType::F64 => cpu_row::<f64, f64>(&shape, seed),
                    DType::F16 => cpu_row::<f16, f32>(&shape, seed),
                    DType::BF16 => cpu_row::<bf16, f32>(&shape, seed),
                };
                let head = format!(
                    "{:<12} {:<6} {:<5}",
                    dims_label(dims),
                    format.name(),
                    dtype.name()
                );
                match res {
                    Ok(checks) => {
                        let ok = checks.iter().all(Check::passed);
                        all_ok &= ok;
                        let e: Vec<String> = checks
                            .iter()
                            .map(|c| format!("{:.1e}", c.max_rel_err))
                            .collect();
                        out.push_str(&format!(
                            "{head} {:>10} {:>10} {:>10} {:>8.0e}  {}\n",
                            e[0],
                            e[1],
                            e[2],
                            tolerance(dtype),
                            if ok { "ok" } else { "FAILED" }
                        ));
                    }
                    Err(msg) => {
                        all_ok = false;
                        out.push_str(&format!("{head} error: {msg}\n"));
                    }
                }
            }
        }
    }
    let fd_shape = Shape::new(&[3, 2, 4], MemoryFormat::ChannelsLast).expect("valid");
    match finite_difference(&fd_shape, seed) {
        Ok(err) => {
            let ok = err <= FD_TOL;
            all_ok &= ok;
            out.push_str(&format!(
                "finite differences of the backward ({} nhwc f64, dx dweight dbias): rel err {err:.1e} (tol {FD_TOL:.0e}) {}\n",
                dims_label(fd_shape.dims()),
                if ok { "ok" } else { "FAILED" }
            ));
        }
        Err(msg) => {
            all_ok = false;
            out.push_str(&format!(
                "finite differences of the backward: error: {msg}\n"
            ));
        }
    }
    (out, all_ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_errors() {
        assert_eq!(rel_err(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!((rel_err(&[3.0, 0.0], &[0.0, 4.0]) - 5.0 / 4.0).abs() < 1e-15);
        assert!((rel_err(&[1.0], &[0.0]) - 1.0).abs() < 1e-15);
        assert!(rel_err(&[f64::NAN], &[1.0]).is_nan());
        assert!(rel_err(&[f64::INFINITY], &[1.0]).is_nan());
        assert!(rel_err(&[1.0], &[1.0, 2.0]).is_nan());
    }

    #[test]
    fn nan_never_passes_and_the_worst_part_is_named() {
        let c = Check::of(
            &[
                ("a", &[1.0], &[1.0]),
                ("b", &[f64::NAN], &[1.0]),
                ("c", &[2.0], &[1.0]),
            ],
            1e-5,
        );
        assert!(!c.passed());
        assert_eq!(c.worst, "b");
        let c = Check::of(&[("a", &[1.0], &[1.0]), ("b", &[1.1], &[1.0])], 0.2);
        assert!(c.passed());
        assert_eq!(c.worst, "b");
        assert!((c.max_rel_err - 0.1).abs() < 1e-12);
        assert_eq!(c.status(), "ok");
    }

    #[test]
    fn tolerances() {
        assert_eq!(tolerance(DType::F32), 1e-5);
        assert_eq!(tolerance(DType::F16), 1e-3);
        assert_eq!(tolerance(DType::BF16), 1e-2);
        assert_eq!(tolerance(DType::F64), 1e-10);
    }

    #[test]
    fn cpu_backend_passes_its_self_check() {
        let (table, ok) = cpu_selfcheck(42);
        assert!(ok, "{table}");
        assert_eq!(table.matches(" ok\n").count(), 2 * 4 * 2 + 4 + 1, "{table}");
    }

    #[test]
    fn checks_catch_wrong_results() {
        let shape = Shape::nchw(4, 3, 2, 2).unwrap();
        let inputs = Inputs::<f32, f32>::new(1, &shape);
        let chans = data::sample_channels(3);
        let s = Sample::new(&inputs, &shape, &chans);
        // The exact reference passes; one corrupted value or a swapped channel fails.
        let (mean, var) = reference::batch_stats(&s.x, &s.shape).unwrap();
        let invstd = reference::invstd(&var, EPS);
        let y = reference::normalize(
            &s.x,
            &s.shape,
            &mean,
            &invstd,
            Some(&s.weight),
            Some(&s.bias),
        )
        .unwrap();
        let eval_y = {
            let inv = reference::invstd(&s.running_var, EPS);
            reference::normalize(
                &s.x,
                &s.shape,
                &s.running_mean,
                &inv,
                Some(&s.weight),
                Some(&s.bias),
            )
            .unwrap()
        };
        assert!(check_eval(&s, &eval_y, 1e-12).passed());
        let mut bad = eval_y.clone();
        bad[5] += 0.01;
        assert!(!check_eval(&s, &bad, 1e-5).passed());
        bad[5] = f64::NAN;
        assert!(!check_eval(&s, &bad, 1.0).passed());
        let m = s.shape.per_channel() as f64;
        let good = TrainOut {
            y: y.clone(),
            save_mean: mean.clone(),
            save_invstd: invstd.clone(),
            running_mean: mean
                .iter()
                .zip(&s.running_mean)
                .map(|(b, r)| 0.1 * b + 0.9 * r)
                .collect(),
            running_var: var
                .iter()
                .zip(&s.running_var)
                .map(|(v, r)| 0.1 * v * m / (m - 1.0) + 0.9 * r)
                .collect(),
        };
        assert!(check_train(&s, &good, 1e-12).passed());
        let mut biased = good.clone();
        biased.running_var = var
            .iter()
            .zip(&s.running_var)
            .map(|(v, r)| 0.1 * v + 0.9 * r)
            .collect();
        let c = check_train(&s, &biased, 1e-5);
        assert!(!c.passed());
        assert_eq!(c.worst, "running_var");
        let g = reference::backward(&s.dy, &s.x, &s.shape, &mean, &invstd, Some(&s.weight), true)
            .unwrap();
        let out = BackwardOut {
            dx: g.input.clone(),
            grad_weight: g.weight.clone(),
            grad_bias: g.bias.clone(),
        };
        assert!(check_backward(&s, &mean, &invstd, &out, 1e-12).passed());
        let eval_grads = reference::backward(
            &s.dy,
            &s.x,
            &s.shape,
            &mean,
            &invstd,
            Some(&s.weight),
            false,
        )
        .unwrap();
        let wrong = BackwardOut {
            dx: eval_grads.input,
            ..out
        };
        assert!(!check_backward(&s, &mean, &invstd, &wrong, 1e-5).passed());
    }

    #[test]
    fn finite_differences_agree() {
        let shape = Shape::new(&[3, 2, 4], MemoryFormat::ChannelsLast).unwrap();
        assert!(finite_difference(&shape, 9).unwrap() < FD_TOL);
    }
}

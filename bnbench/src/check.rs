//! Correctness checks against the f64 reference (`cuda_batchnorm::cpu::reference`), on
//! a sample of channels (all of their values), with the norm-wise relative error
//! `‖out − ref‖ / ‖ref‖`. NaN or infinity never passes.
//!
//! The same checks serve the GPU rows and, without a GPU, the selected rows on the CPU
//! backend ([`cpu_check`], with a finite-difference check of the backward,
//! [`finite_difference`]) and on the kernels under the emulated driver (`crate::nogpu`),
//! each outcome kept as a [`CheckRecord`].

pub use crate::ops::{EPS, MOMENTUM};
use cuda_batchnorm::cpu::{self, reference};
use cuda_batchnorm::half::{bf16, f16};
use cuda_batchnorm::{backend, frozen, Cpu};
use cuda_batchnorm::{DType, Float, ParamFor, Shape};
use serde::{Deserialize, Serialize};

use crate::data::{self, Inputs};
use crate::suite::{Epi, Kind, Op, Row};

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
    rel_err_over(got, want, 0.0)
}

/// `‖got − want‖ / max(‖want‖, floor)`: for outputs that are a difference of larger
/// terms (the training dx), whose error is judged against the size of those terms, as
/// the arithmetic that computes them can only resolve that much.
pub fn rel_err_over(got: &[f64], want: &[f64], floor: f64) -> f64 {
    if got.len() != want.len() || got.iter().chain(want).any(|v| !v.is_finite()) {
        return f64::NAN;
    }
    let diff: f64 = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w) * (g - w))
        .sum::<f64>()
        .sqrt();
    let norm = want.iter().map(|w| w * w).sum::<f64>().sqrt().max(floor);
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
        let floored: Vec<_> = parts.iter().map(|&(n, g, w)| (n, g, w, 0.0)).collect();
        Check::of_floored(&floored, tol)
    }

    /// As [`Check::of`], each part with the floor of its error's denominator
    /// ([`rel_err_over`]).
    pub fn of_floored(parts: &[(&'static str, &[f64], &[f64], f64)], tol: f64) -> Check {
        let mut c = Check {
            max_rel_err: 0.0,
            tol,
            worst: "",
        };
        for &(name, got, want, floor) in parts {
            if c.max_rel_err.is_nan() {
                break; // the first non-finite part decides
            }
            let e = rel_err_over(got, want, floor);
            if e.is_nan() || e > c.max_rel_err || c.worst.is_empty() {
                c.max_rel_err = e;
                c.worst = name;
            }
        }
        c
    }

    /// The worse of two checks (a non-finite error is the worst).
    pub fn worse(self, other: Check) -> Check {
        if self.max_rel_err.is_nan() || self.max_rel_err >= other.max_rel_err {
            self
        } else {
            other
        }
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
    /// The residual z as stored.
    pub z: Vec<f64>,
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
            z: from_pattern(&inputs.z),
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

/// `y` through the forward epilogue `epi` (z from the sample), in f64.
pub fn with_epilogue(mut y: Vec<f64>, epi: Option<Epi>, s: &Sample) -> Vec<f64> {
    match epi {
        None => {}
        Some(Epi::Relu) => y.iter_mut().for_each(|v| *v = reference::relu(*v)),
        Some(Epi::AddRelu) => y
            .iter_mut()
            .zip(&s.z)
            .for_each(|(v, z)| *v = reference::relu(*v + z)),
    }
    y
}

/// Checks a training forward: output, saved statistics, updated running statistics.
pub fn check_train(s: &Sample, out: &TrainOut, tol: f64) -> Check {
    check_train_fused(s, out, None, tol)
}

/// [`check_train`] of a forward with the epilogue `epi`.
pub fn check_train_fused(s: &Sample, out: &TrainOut, epi: Option<Epi>, tol: f64) -> Check {
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
    let y = with_epilogue(y, epi, s);
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
    check_eval_fused(s, y, None, tol)
}

/// [`check_eval`] of a forward with the epilogue `epi` (a frozen eval: `None`).
pub fn check_eval_fused(s: &Sample, y: &[f64], epi: Option<Epi>, tol: f64) -> Check {
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
    Check::of(&[("y", y, &with_epilogue(want, epi, s))], tol)
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
    // dx = (dy - mean(dy) - xhat * mean(dy * xhat)) * invstd * w cancels almost
    // completely when a channel has few values (two values: exactly, but for eps), so its
    // error is judged against the size of its first term, ‖dy * invstd * w‖.
    let (n, k, sp) = (s.shape.n(), s.shape.c(), s.shape.spatial());
    let mut first = 0.0;
    for b in 0..n {
        for ch in 0..k {
            let scale = save_invstd.get(ch).copied().unwrap_or(0.0) * s.weight[ch];
            for i in 0..sp {
                let t = s.dy[s.shape.offset(b, ch, i)] * scale;
                first += t * t;
            }
        }
    }
    Check::of_floored(
        &[
            ("dx", &out.dx, &g.input, first.sqrt()),
            ("grad_weight", &out.grad_weight, &g.weight, 0.0),
            ("grad_bias", &out.grad_bias, &g.bias, 0.0),
        ],
        tol,
    )
}

/// Checks the backward of a forward with an epilogue, given that forward's output `y`
/// and saved statistics: dy masked where `y <= 0` (`threshold_backward`), then as
/// [`check_backward`]; `dz`, the add-ReLU's residual gradient when there is one, must be
/// that masked dy.
pub fn check_backward_fused(
    s: &Sample,
    y: &[f64],
    save_mean: &[f64],
    save_invstd: &[f64],
    out: &BackwardOut,
    dz: Option<&[f64]>,
    tol: f64,
) -> Check {
    if y.len() != s.dy.len() {
        return Check::unusable(tol);
    }
    let masked: Vec<f64> =
        s.dy.iter()
            .zip(y)
            .map(|(&g, &y)| if reference::relu_blocks(y) { 0.0 } else { g })
            .collect();
    let c = check_backward(
        &Sample {
            dy: masked.clone(),
            ..s.clone()
        },
        save_mean,
        save_invstd,
        out,
        tol,
    );
    match dz {
        Some(dz) => c.worse(Check::of(&[("dz", dz, &masked)], tol)),
        None => c,
    }
}

/// One check made without a GPU: which row, at which size, on what, and its outcome.
/// The `checks` member of a no-GPU run's JSON is a list of these.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckRecord {
    /// What was checked: `cpu` (the CPU backend), `emulated` (the kernels under the
    /// emulated CUDA driver) or `cpu-finite-differences` (the CPU backend's backward,
    /// f64, against central differences).
    pub backend: String,
    /// `train_fwd`, `eval_fwd` or `backward`.
    pub op: String,
    /// The row's sizes.
    pub shape: Vec<usize>,
    /// `nchw` or `nhwc`.
    pub layout: String,
    /// The row's input dtype (`f64` for finite differences).
    pub dtype: String,
    /// The kernel family forced (`--variant`), or `auto`; absent without `--variant`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// The sizes actually checked (the row's, or a reduced version of them).
    pub checked_shape: Vec<usize>,
    /// `ok`, `failed`, `error` (the op or the reference could not run) or `n/a` (the
    /// forced family cannot take the call; `error` then says why).
    pub check: String,
    /// Largest norm-wise relative error, when finite.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rel_err: Option<f64>,
    /// The tolerance.
    pub tol: f64,
    /// The output with the largest error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worst: Option<String>,
    /// What went wrong, for `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// [`CheckRecord::check`] of a family that cannot take a call.
pub const NOT_APPLICABLE: &str = "n/a";

impl CheckRecord {
    /// The record of `outcome` for `row`'s `op`, checked on `backend` at `checked_shape`.
    pub fn new(
        backend: &str,
        row: &Row,
        checked_shape: &[usize],
        op: Op,
        outcome: Result<&Check, &str>,
        tol: f64,
    ) -> CheckRecord {
        let (check, max_rel_err, worst, error) = match outcome {
            Ok(c) => (
                c.status().to_string(),
                Some(c.max_rel_err).filter(|e| e.is_finite()),
                Some(c.worst.to_string()).filter(|w| !w.is_empty()),
                None,
            ),
            Err(e) => ("error".to_string(), None, None, Some(e.to_string())),
        };
        CheckRecord {
            backend: backend.into(),
            op: op.name().into(),
            shape: row.dims.clone(),
            layout: row.layout.name().into(),
            dtype: row.dtype.name().into(),
            variant: None,
            checked_shape: checked_shape.to_vec(),
            check,
            max_rel_err,
            tol,
            worst,
            error,
        }
    }

    /// The record of a forced family that cannot take `row`'s `op`: `n/a`, with why.
    pub fn unavailable(
        backend: &str,
        row: &Row,
        checked_shape: &[usize],
        op: Op,
        reason: &str,
        tol: f64,
    ) -> CheckRecord {
        CheckRecord {
            check: NOT_APPLICABLE.into(),
            error: Some(reason.into()),
            ..CheckRecord::new(backend, row, checked_shape, op, Err(reason), tol)
        }
    }

    /// Whether it passed (`n/a` is no failure, and no check either).
    pub fn passed(&self) -> bool {
        self.check == "ok" || self.is_unavailable()
    }

    /// Whether the forced family could not take the call.
    pub fn is_unavailable(&self) -> bool {
        self.check == NOT_APPLICABLE
    }
}

/// `dims` made small enough for a quick check: more than `max_c` channels become
/// `max_c` (or one fewer, so that an odd count stays odd and an even one even), then the
/// largest of N and the spatial sizes is halved (rounding up) until the tensor has at
/// most `max_numel` elements, always keeping at least 2 values per channel. Sizes
/// already within both limits come back as they are.
pub fn reduced_dims(dims: &[usize], max_numel: usize, max_c: usize) -> Vec<usize> {
    let mut d = dims.to_vec();
    if d.len() < 2 {
        return d;
    }
    if d[1] > max_c {
        let c = max_c.max(2);
        d[1] = if c % 2 == d[1] % 2 { c } else { c - 1 };
    }
    let product = |d: &[usize], skip: Option<usize>| {
        d.iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != skip)
            .fold(1usize, |a, (_, &b)| a.saturating_mul(b))
    };
    while product(&d, None) > max_numel {
        let Some((i, &v)) = d
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 1)
            .max_by_key(|(_, v)| **v)
        else {
            break;
        };
        let smaller = v.div_ceil(2);
        let mut next = d.clone();
        next[i] = smaller;
        if v <= 1 || product(&next, Some(1)) < 2 {
            break;
        }
        d = next;
    }
    d
}

/// Widens a host vector to f64.
pub fn wide<E: Float>(v: &[E]) -> Vec<f64> {
    reference::to_f64(v)
}

/// Runs `ops` on the CPU backend for one shape and checks each, in `ops`' order (the
/// backward's statistics come from a training forward, run whether or not it is checked).
pub fn cpu_row<T: Float, P: ParamFor<T>>(
    shape: &Shape,
    ops: &[Op],
    seed: u64,
) -> Result<Vec<(Op, Check)>, String> {
    let e = |e: cuda_batchnorm::BnError| e.to_string();
    let mut checks = Vec::new();
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
    if ops.contains(&Op::TrainFwd) {
        checks.push((Op::TrainFwd, check_train(&sample, &train_out, tol)));
    }

    // Eval forward with the initial running statistics.
    if ops.contains(&Op::EvalFwd) {
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
        checks.push((Op::EvalFwd, check_eval(&sample, &host(&y), tol)));
    }

    // Backward with the training forward's saved statistics.
    if ops.contains(&Op::Backward) {
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
        checks.push((Op::Backward, bwd));
    }

    // The frozen and fused ops (our unfused sequences are GPU-side comparisons: the CPU
    // has no kernels to chain).
    let run = CpuRun {
        shape,
        inputs: &inputs,
        x: &x,
        dy: &dy,
        z: &data::tile(&inputs.z, numel),
        sample: &sample,
        chans: &chans,
        tol,
    };
    for &op in ops {
        if !op.is_plain() && !op.is_sequence() && !op.is_sync() {
            checks.push((op, run.fused(op).map_err(e)?));
        }
    }
    Ok(checks)
}

/// One row's inputs on the host, for [`CpuRun::fused`].
struct CpuRun<'a, T: Float, P: ParamFor<T>> {
    shape: &'a Shape,
    inputs: &'a Inputs<T, P>,
    x: &'a [T],
    dy: &'a [T],
    z: &'a [T],
    sample: &'a Sample,
    chans: &'a [usize],
    tol: f64,
}

impl<T: Float, P: ParamFor<T>> CpuRun<'_, T, P> {
    fn host(&self, v: &[T]) -> Vec<f64> {
        data::gather(self.shape, self.chans, |a, n| {
            Ok::<_, ()>(wide(&v[a..a + n]))
        })
        .unwrap_or_default()
    }

    fn epilogue(&self, epi: Epi) -> backend::Epilogue<'_, Cpu, T> {
        match epi {
            Epi::Relu => backend::Epilogue::Relu,
            Epi::AddRelu => backend::Epilogue::AddRelu { residual: self.z },
        }
    }

    /// A training forward with `epi`: y, and the saved statistics and updated running
    /// statistics.
    fn train(&self, epi: Epi) -> cuda_batchnorm::Result<(Vec<T>, Vec<T::Acc>, TrainOut)> {
        let (c, numel) = (self.shape.c(), self.shape.numel());
        let (mut rm, mut rv) = (
            self.inputs.running_mean.clone(),
            self.inputs.running_var.clone(),
        );
        let mut y = vec![T::default(); numel];
        let zero = <T::Acc as Float>::from_f64(0.0);
        let (mut sm, mut si) = (vec![zero; c], vec![zero; c]);
        cpu::batch_norm_fused(
            self.forward(true, &mut rm, &mut rv),
            Some(self.epilogue(epi)),
            &mut y,
            Some(cpu::SaveStats {
                mean: &mut sm,
                invstd: &mut si,
            }),
        )?;
        let out = TrainOut {
            y: self.host(&y),
            save_mean: data::pick(&wide(&sm), self.chans),
            save_invstd: data::pick(&wide(&si), self.chans),
            running_mean: data::pick(&wide(&rm), self.chans),
            running_var: data::pick(&wide(&rv), self.chans),
        };
        let mut ss = sm;
        ss.extend(si);
        Ok((y, ss, out))
    }

    fn forward<'b>(
        &'b self,
        training: bool,
        rm: &'b mut [P],
        rv: &'b mut [P],
    ) -> cpu::Forward<'b, T, P> {
        cpu::Forward {
            input: self.x,
            shape: *self.shape,
            running_mean: Some(rm),
            running_var: Some(rv),
            weight: Some(&self.inputs.weight),
            bias: Some(&self.inputs.bias),
            training,
            momentum: MOMENTUM,
            eps: EPS,
        }
    }

    /// Runs a frozen or fused op on the CPU backend and checks it.
    fn fused(&self, op: Op) -> cuda_batchnorm::Result<Check> {
        let (c, numel, tol) = (self.shape.c(), self.shape.numel(), self.tol);
        let mut y = vec![T::default(); numel];
        let (mut rm, mut rv) = (
            self.inputs.running_mean.clone(),
            self.inputs.running_var.clone(),
        );
        let epi = op.epilogue();
        Ok(match (op.kind(), epi) {
            (Kind::Frozen, _) => {
                let coefficients = frozen::coefficients::<P, T::Acc>(
                    Some(&self.inputs.weight),
                    Some(&self.inputs.bias),
                    &rm,
                    &rv,
                    EPS,
                )?;
                cpu::batch_norm_frozen(
                    cpu::Frozen {
                        input: self.x,
                        shape: *self.shape,
                        scale_shift: &coefficients,
                    },
                    &mut y,
                )?;
                check_eval(self.sample, &self.host(&y), tol)
            }
            (Kind::Eval, Some(epi)) => {
                cpu::batch_norm_fused(
                    self.forward(false, &mut rm, &mut rv),
                    Some(self.epilogue(epi)),
                    &mut y,
                    None,
                )?;
                check_eval_fused(self.sample, &self.host(&y), Some(epi), tol)
            }
            (Kind::Train, Some(epi)) => {
                let (_, _, out) = self.train(epi)?;
                check_train_fused(self.sample, &out, Some(epi), tol)
            }
            (Kind::Backward, Some(epi)) => {
                let (y, stats, fwd) = self.train(epi)?;
                let (sm, si) = stats.split_at(c);
                let mut dx = vec![T::default(); numel];
                let mut dz = vec![T::default(); numel];
                let pzero = P::from_f64(0.0);
                let (mut gw, mut gb) = (vec![pzero; c], vec![pzero; c]);
                let grad = match epi {
                    Epi::Relu => backend::EpilogueGrad::Relu { output: &y[..] },
                    Epi::AddRelu => backend::EpilogueGrad::AddRelu {
                        output: &y[..],
                        grad_residual: &mut dz[..],
                    },
                };
                cpu::batch_norm_backward_fused(
                    cpu::Backward {
                        grad_output: self.dy,
                        input: self.x,
                        shape: *self.shape,
                        weight: Some(&self.inputs.weight),
                        stats: cpu::BackwardStats::Batch {
                            save_mean: sm,
                            save_invstd: si,
                        },
                    },
                    Some(grad),
                    cpu::Grads {
                        input: &mut dx,
                        weight: Some(&mut gw),
                        bias: Some(&mut gb),
                    },
                )?;
                let out = BackwardOut {
                    dx: self.host(&dx),
                    grad_weight: data::pick(&wide(&gw), self.chans),
                    grad_bias: data::pick(&wide(&gb), self.chans),
                };
                let dz = (epi == Epi::AddRelu).then(|| self.host(&dz));
                check_backward_fused(
                    self.sample,
                    &fwd.y,
                    &fwd.save_mean,
                    &fwd.save_invstd,
                    &out,
                    dz.as_deref(),
                    tol,
                )
            }
            // The plain ops are checked above.
            _ => Check::unusable(tol),
        })
    }
}

/// [`cpu_row`] for a shape and input dtype (f16 and bf16 with f32 parameters).
pub fn cpu_check(
    shape: &Shape,
    dtype: DType,
    ops: &[Op],
    seed: u64,
) -> Result<Vec<(Op, Check)>, String> {
    match dtype {
        DType::F32 => cpu_row::<f32, f32>(shape, ops, seed),
        DType::F64 => cpu_row::<f64, f64>(shape, ops, seed),
        DType::F16 => cpu_row::<f16, f32>(shape, ops, seed),
        DType::BF16 => cpu_row::<bf16, f32>(shape, ops, seed),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use cuda_batchnorm::MemoryFormat;

    #[test]
    fn relative_errors() {
        assert_eq!(rel_err(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!((rel_err(&[3.0, 0.0], &[0.0, 4.0]) - 5.0 / 4.0).abs() < 1e-15);
        assert!((rel_err(&[1.0], &[0.0]) - 1.0).abs() < 1e-15);
        assert!(rel_err(&[f64::NAN], &[1.0]).is_nan());
        assert!(rel_err(&[f64::INFINITY], &[1.0]).is_nan());
        assert!(rel_err(&[1.0], &[1.0, 2.0]).is_nan());
        // a floor above the reference's norm takes its place, one below does nothing
        assert!((rel_err_over(&[1e-6], &[0.0], 1.0) - 1e-6).abs() < 1e-18);
        assert_eq!(
            rel_err_over(&[3.0, 0.0], &[0.0, 4.0], 1.0),
            rel_err(&[3.0, 0.0], &[0.0, 4.0])
        );
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
    fn the_fused_checks_catch_a_missing_epilogue_and_a_wrong_residual_gradient() {
        let shape = Shape::new(&[4, 3, 5, 7], MemoryFormat::Contiguous).unwrap();
        let inputs = Inputs::<f64, f64>::new(5, &shape);
        let chans = data::sample_channels(3);
        let s = Sample::new(&inputs, &shape, &chans);
        let tol = tolerance(DType::F64);
        let invstd = reference::invstd(&s.running_var, EPS);
        let plain = reference::normalize(
            &s.x,
            &s.shape,
            &s.running_mean,
            &invstd,
            Some(&s.weight),
            Some(&s.bias),
        )
        .unwrap();
        // y without its ReLU fails the eval_relu check, with it passes; the residual
        // matters too.
        assert!(check_eval(&s, &plain, tol).passed());
        assert!(!check_eval_fused(&s, &plain, Some(Epi::Relu), tol).passed());
        let relu = with_epilogue(plain.clone(), Some(Epi::Relu), &s);
        assert!(check_eval_fused(&s, &relu, Some(Epi::Relu), tol).passed());
        assert!(!check_eval_fused(&s, &relu, Some(Epi::AddRelu), tol).passed());
        assert!(relu.contains(&0.0) && relu.iter().any(|v| *v > 0.0));
        // The backward: dz must be dy masked by y.
        let (mean, var) = reference::batch_stats(&s.x, &s.shape).unwrap();
        let invstd = reference::invstd(&var, EPS);
        let y = with_epilogue(
            reference::normalize(&s.x, &s.shape, &mean, &invstd, Some(&s.weight), None).unwrap(),
            Some(Epi::AddRelu),
            &s,
        );
        let masked: Vec<f64> =
            s.dy.iter()
                .zip(&y)
                .map(|(g, y)| if *y <= 0.0 { 0.0 } else { *g })
                .collect();
        let g = reference::backward(
            &masked,
            &s.x,
            &s.shape,
            &mean,
            &invstd,
            Some(&s.weight),
            true,
        )
        .unwrap();
        let out = BackwardOut {
            dx: g.input.clone(),
            grad_weight: g.weight.clone(),
            grad_bias: g.bias.clone(),
        };
        let ok = check_backward_fused(&s, &y, &mean, &invstd, &out, Some(&masked), tol);
        assert!(ok.passed(), "{ok:?}");
        let bad = check_backward_fused(&s, &y, &mean, &invstd, &out, Some(&s.dy), tol);
        assert!(!bad.passed() && bad.worst == "dz", "{bad:?}");
        // The unmasked gradient fails dx.
        let unmasked = check_backward(&s, &mean, &invstd, &out, tol);
        assert!(!unmasked.passed(), "{unmasked:?}");
    }

    #[test]
    fn cpu_backend_passes_in_every_dtype_and_only_the_ops_asked_for() {
        for format in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
            let shape = Shape::new(&[4, 3, 5, 7], format).unwrap();
            for dtype in [DType::F32, DType::F16, DType::BF16, DType::F64] {
                let checks = cpu_check(&shape, dtype, &Op::ALL, 42).unwrap();
                let ops: Vec<Op> = checks.iter().map(|(o, _)| *o).collect();
                // Our unfused sequences and SyncBatchNorm are GPU-side, not CPU checks.
                let want: Vec<Op> = Op::ALL
                    .into_iter()
                    .filter(|o| !o.is_sequence() && !o.is_sync())
                    .collect();
                assert_eq!(ops, want);
                assert!(checks.iter().all(|(_, c)| c.passed()), "{checks:?}");
                assert!(checks.iter().all(|(_, c)| c.tol == tolerance(dtype)));
            }
        }
        let shape = Shape::nc(16, 6).unwrap();
        let checks = cpu_check(&shape, DType::F32, &[Op::Backward], 1).unwrap();
        assert_eq!(checks.len(), 1);
        assert_eq!(checks[0].0, Op::Backward);
        assert!(checks[0].1.passed());
    }

    #[test]
    fn reduced_sizes() {
        // Within both limits: unchanged.
        assert_eq!(reduced_dims(&[4, 3, 5, 7], 1000, 64), [4, 3, 5, 7]);
        // The largest of N and the spatial sizes halves, rounding up, until small enough.
        assert_eq!(
            reduced_dims(&[32, 256, 56, 56], 1 << 20, 1 << 16),
            [16, 256, 14, 14]
        );
        assert_eq!(reduced_dims(&[4096, 1024], 1 << 20, 1 << 16), [1024, 1024]);
        // Channels capped, odd counts staying odd and even ones even.
        assert_eq!(reduced_dims(&[32, 17, 56, 56], 4096, 32), [4, 17, 7, 7]);
        assert_eq!(reduced_dims(&[2, 2048], 4096, 32), [2, 32]);
        assert_eq!(reduced_dims(&[64, 1001, 7, 7], 4096, 32)[1], 31);
        assert_eq!(reduced_dims(&[3, 4, 5], 1000, 3)[1], 2);
        // Never fewer than 2 values per channel, even above the limit.
        assert_eq!(reduced_dims(&[2, 64, 1], 10, 64), [2, 64, 1]);
        assert_eq!(reduced_dims(&[3, 1000], 10, 1 << 16), [2, 1000]);
        for dims in [
            &[16, 2, 112, 112, 112][..],
            &[20, 6, 65536],
            &[1, 64, 512, 512],
            &[215857, 64],
            &[8, 64, 16, 56, 56],
        ] {
            let d = reduced_dims(dims, 4096, 32);
            assert_eq!(d.len(), dims.len());
            assert!(d.iter().product::<usize>() <= 4096, "{dims:?} -> {d:?}");
            let per_channel: usize = d
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != 1)
                .map(|(_, v)| v)
                .product();
            assert!(per_channel >= 2, "{dims:?} -> {d:?}");
            assert!(d.iter().zip(dims).all(|(a, b)| a <= b && *a >= 1));
        }
        assert_eq!(reduced_dims(&[7], 1, 1), [7]);
    }

    #[test]
    fn check_records() {
        let row = Row {
            set: "custom".into(),
            dims: vec![8, 4],
            layout: MemoryFormat::Contiguous,
            dtype: DType::F16,
        };
        let c = Check {
            max_rel_err: 2e-4,
            tol: 1e-3,
            worst: "y",
        };
        let r = CheckRecord::new("cpu", &row, &[4, 4], Op::EvalFwd, Ok(&c), 1e-3);
        assert!(r.passed());
        assert_eq!(
            (r.op.as_str(), r.dtype.as_str(), r.layout.as_str()),
            ("eval_fwd", "f16", "nchw")
        );
        assert_eq!((r.max_rel_err, r.worst.as_deref()), (Some(2e-4), Some("y")));
        let bad = Check {
            max_rel_err: f64::NAN,
            ..c
        };
        let r = CheckRecord::new("cpu", &row, &[4, 4], Op::EvalFwd, Ok(&bad), 1e-3);
        assert!(!r.passed());
        assert_eq!((r.check.as_str(), r.max_rel_err), ("failed", None));
        let r = CheckRecord::new("emulated", &row, &[4, 4], Op::Backward, Err("boom"), 1e-3);
        assert!(!r.passed());
        assert_eq!(
            (r.check.as_str(), r.error.as_deref()),
            ("error", Some("boom"))
        );
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

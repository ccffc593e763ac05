//! Shared by the test binaries: seeded problems, the f64 reference, the error norm and
//! tolerances, a device-independent check of every operation, and PyTorch fixtures.
//!
//! A device plugs in through [`Runner`] (the emulated kernels in tests/emulated.rs, the
//! GPU in tests/gpu.rs); [`check_problem`] runs the training forward, its backward, the
//! eval forward and the eval backward on it and compares each output with the f64
//! reference, norm-wise: ‖out − ref‖ / ‖ref‖ under the dtype's tolerance, NaN never
//! passing.
#![allow(dead_code)]

pub mod cnn;
pub mod fixtures;
pub mod huge;

use cuda_batchnorm::cpu::reference;
use cuda_batchnorm::{DType, Float, MemoryFormat, ParamFor, Shape};

/// SplitMix64: small, seedable, good enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// Norm-wise tolerance per dtype, relative to the f64 reference.
pub fn tolerance(dt: DType) -> f64 {
    match dt {
        DType::F64 => 1e-10,
        DType::F32 => 1e-5,
        DType::F16 => 1e-3,
        DType::BF16 => 1e-2,
    }
}

/// ‖out − ref‖ / ‖ref‖ (absolute when ref is all zeros); infinite if anything is NaN.
pub fn rel_err(out: &[f64], reference: &[f64]) -> f64 {
    assert_eq!(out.len(), reference.len());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (o, r) in out.iter().zip(reference) {
        if o.is_nan() || r.is_nan() {
            return f64::INFINITY;
        }
        num += (o - r) * (o - r);
        den += r * r;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// Compares `out` with the f64 reference under the tolerance of `E`.
pub fn check_close<E: Float>(what: &str, out: &[E], reference: &[f64]) -> Result<(), String> {
    if out.len() != reference.len() {
        return Err(format!(
            "{what}: {} values, expected {}",
            out.len(),
            reference.len()
        ));
    }
    let tol = tolerance(E::DTYPE);
    let err = rel_err(&reference::to_f64(out), reference);
    if err <= tol {
        Ok(())
    } else {
        Err(format!(
            "{what}: relative error {err:.3e} > {tol:.0e} ({})",
            E::DTYPE
        ))
    }
}

/// What the input values look like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Data {
    /// A different mean (-2..2) and spread (0.5..3) per channel.
    Normal,
    /// Every channel constant (a different constant per channel).
    Constant,
    /// Mean 1e4, std 1: cancellation in naive sums.
    Offset1e4,
    /// Std 1e-3 around 1: the variance (1e-6) is below eps (1e-5).
    TinyVar,
    /// Mean 100, std 30: f16 sums of squares would overflow.
    Large,
}

/// One shape of the test table.
#[derive(Clone, Copy, Debug)]
pub struct Case {
    pub dims: &'static [usize],
    pub data: Data,
    pub affine: bool,
}

const fn case(dims: &'static [usize], data: Data) -> Case {
    Case {
        dims,
        data,
        affine: true,
    }
}

/// DESIGN.md's test table at sizes the emulator runs in seconds: C = 1, S = 1, sizes
/// that are not multiples of the block or vector width, odd C, constant channels,
/// mean 1e4 with std 1, tiny variance, f16-overflowing values, every rank.
pub const CASES: &[Case] = &[
    case(&[4, 3, 5, 7], Data::Normal),
    case(&[2, 1, 33, 17], Data::Normal),
    case(&[64, 16, 1, 1], Data::Normal),
    case(&[3, 17, 9, 11], Data::Normal),
    case(&[5, 8, 13], Data::Normal),
    case(&[7, 33], Data::Normal),
    case(&[130, 8], Data::Normal),
    case(&[2, 4, 3, 5, 6], Data::Normal),
    case(&[1, 6, 300, 7], Data::Normal),
    case(&[8, 12, 16, 16], Data::Normal),
    case(&[2, 64, 14, 14], Data::Normal),
    case(&[16, 2, 12, 12, 12], Data::Normal),
    case(&[3, 5, 8, 8], Data::Constant),
    case(&[4, 6, 7, 9], Data::Offset1e4),
    case(&[4, 6, 8, 8], Data::TinyVar),
    case(&[4, 8, 30, 30], Data::Large),
    Case {
        dims: &[6, 10, 5, 5],
        data: Data::Normal,
        affine: false,
    },
];

/// The (input, parameter) type pairs with kernels.
pub const TYPE_PAIRS: &[(DType, DType)] = &cuda_batchnorm::dtype::KERNEL_PAIRS;

/// Calls `$body` with type parameters `$t`, `$p` bound to the pair `$pair`.
#[macro_export]
macro_rules! with_types {
    ($pair:expr, |$t:ident, $p:ident| $body:expr) => {{
        use cuda_batchnorm::half::{bf16, f16};
        use cuda_batchnorm::DType;
        match $pair {
            (DType::F32, DType::F32) => {
                type $t = f32;
                type $p = f32;
                $body
            }
            (DType::F64, DType::F64) => {
                type $t = f64;
                type $p = f64;
                $body
            }
            (DType::F16, DType::F16) => {
                type $t = f16;
                type $p = f16;
                $body
            }
            (DType::BF16, DType::BF16) => {
                type $t = bf16;
                type $p = bf16;
                $body
            }
            (DType::F16, DType::F32) => {
                type $t = f16;
                type $p = f32;
                $body
            }
            (DType::BF16, DType::F32) => {
                type $t = bf16;
                type $p = f32;
                $body
            }
            other => panic!("no kernels for {other:?}"),
        }
    }};
}

/// Inputs of one check: data, parameters, running statistics, options.
#[derive(Clone, Debug)]
pub struct Problem<T: Float, P: ParamFor<T>> {
    pub shape: Shape,
    pub x: Vec<T>,
    pub dy: Vec<T>,
    pub weight: Option<Vec<P>>,
    pub bias: Option<Vec<P>>,
    pub running_mean: Vec<P>,
    pub running_var: Vec<P>,
    pub eps: f64,
    pub momentum: f64,
}

impl<T: Float, P: ParamFor<T>> Problem<T, P> {
    pub fn new(case: &Case, format: MemoryFormat, seed: u64) -> Problem<T, P> {
        let shape = Shape::new(case.dims, format).expect("valid test shape");
        let mut rng = Rng::new(seed);
        let c = shape.c();
        let centre: Vec<f64> = (0..c).map(|_| rng.uniform() * 4.0 - 2.0).collect();
        let spread: Vec<f64> = (0..c).map(|_| 0.5 + rng.uniform() * 2.5).collect();
        let mut x = vec![T::default(); shape.numel()];
        for n in 0..shape.n() {
            for ch in 0..c {
                for s in 0..shape.spatial() {
                    let v = match case.data {
                        Data::Normal => centre[ch] + spread[ch] * rng.normal(),
                        Data::Constant => 1.0 + 0.5 * ch as f64,
                        Data::Offset1e4 => 1e4 + rng.normal(),
                        Data::TinyVar => 1.0 + 1e-3 * rng.normal(),
                        Data::Large => 100.0 + 30.0 * rng.normal(),
                    };
                    x[shape.offset(n, ch, s)] = T::from_f64(v);
                }
            }
        }
        let dy = (0..shape.numel())
            .map(|_| T::from_f64(rng.normal()))
            .collect();
        let param =
            |f: &mut dyn FnMut() -> f64| (0..c).map(|_| P::from_f64(f())).collect::<Vec<P>>();
        let weight = param(&mut || 0.5 + rng.uniform());
        let bias = param(&mut || rng.normal());
        // Running statistics near the data's (as after training), so that eval outputs
        // and gradients stay in range for every dtype.
        let level = match case.data {
            Data::Offset1e4 => 1e4,
            Data::Large => 100.0,
            Data::TinyVar => 1.0,
            Data::Normal | Data::Constant => 0.0,
        };
        let running_mean = param(&mut || level + 0.5 * rng.normal());
        let running_var = param(&mut || 0.5 + 1.5 * rng.uniform());
        Problem {
            shape,
            x,
            dy,
            weight: case.affine.then_some(weight),
            bias: case.affine.then_some(bias),
            running_mean,
            running_var,
            eps: 1e-5,
            momentum: 0.1,
        }
    }

    fn w64(&self) -> Option<Vec<f64>> {
        self.weight.as_deref().map(reference::to_f64)
    }

    fn b64(&self) -> Option<Vec<f64>> {
        self.bias.as_deref().map(reference::to_f64)
    }
}

/// Outputs of a training forward with the running-statistics update.
#[derive(Clone, Debug)]
pub struct TrainOut<T, P, A> {
    pub y: Vec<T>,
    pub save_mean: Vec<A>,
    pub save_invstd: Vec<A>,
    pub running_mean: Vec<P>,
    pub running_var: Vec<P>,
}

/// Outputs of a backward.
#[derive(Clone, Debug)]
pub struct GradOut<T, P> {
    pub dx: Vec<T>,
    pub dweight: Option<Vec<P>>,
    pub dbias: Option<Vec<P>>,
}

/// The statistics a training backward differentiates through: (save_mean, save_invstd)
/// from the forward; `None` asks for the eval backward.
pub type Saved<'a, A> = Option<(&'a [A], &'a [A])>;

/// A device that runs the four operations on a problem.
pub trait Runner {
    /// Training forward, updating a copy of the problem's running statistics and
    /// saving the batch statistics.
    fn train_forward<T: Float, P: ParamFor<T>>(
        &self,
        p: &Problem<T, P>,
    ) -> Result<TrainOut<T, P, T::Acc>, String>;
    /// Eval forward with the problem's running statistics.
    fn eval_forward<T: Float, P: ParamFor<T>>(&self, p: &Problem<T, P>) -> Result<Vec<T>, String>;
    /// Backward: with `saved` (save_mean, save_invstd) the training backward, else the
    /// eval backward with the problem's running statistics. Parameter gradients are
    /// asked for when the problem is affine.
    fn backward<T: Float, P: ParamFor<T>>(
        &self,
        p: &Problem<T, P>,
        saved: Saved<'_, T::Acc>,
    ) -> Result<GradOut<T, P>, String>;
}

/// Runs every operation of `p` on `r` and checks each output against the reference.
pub fn check_problem<R: Runner, T: Float, P: ParamFor<T>>(
    r: &R,
    p: &Problem<T, P>,
) -> Result<(), String> {
    let shape = &p.shape;
    let x = reference::to_f64(&p.x);
    let dy = reference::to_f64(&p.dy);
    let (w, b) = (p.w64(), p.b64());

    // training forward
    let out = r.train_forward(p)?;
    let (mean, var) = reference::batch_stats(&x, shape).unwrap();
    let invstd = reference::invstd(&var, p.eps);
    check_close(
        "train y",
        &out.y,
        &reference::normalize(&x, shape, &mean, &invstd, w.as_deref(), b.as_deref()).unwrap(),
    )?;
    check_close("save_mean", &out.save_mean, &mean)?;
    check_close("save_invstd", &out.save_invstd, &invstd)?;
    let m = p.momentum;
    let count = shape.per_channel() as f64;
    let rm: Vec<f64> = (0..shape.c())
        .map(|c| m * mean[c] + (1.0 - m) * p.running_mean[c].to_f64())
        .collect();
    let rv: Vec<f64> = (0..shape.c())
        .map(|c| m * var[c] * count / (count - 1.0) + (1.0 - m) * p.running_var[c].to_f64())
        .collect();
    check_close("running_mean", &out.running_mean, &rm)?;
    check_close("running_var", &out.running_var, &rv)?;

    // training backward, against the reference given the statistics the forward saved
    let g = r.backward(p, Some((&out.save_mean, &out.save_invstd)))?;
    let gref = reference::backward(
        &dy,
        &x,
        shape,
        &reference::to_f64(&out.save_mean),
        &reference::to_f64(&out.save_invstd),
        w.as_deref(),
        true,
    )
    .unwrap();
    check_grads("train", &g, &gref, p.weight.is_some())?;

    // eval forward and backward with the running statistics
    let rm0 = reference::to_f64(&p.running_mean);
    let inv0 = reference::invstd(&reference::to_f64(&p.running_var), p.eps);
    let y = r.eval_forward(p)?;
    check_close(
        "eval y",
        &y,
        &reference::normalize(&x, shape, &rm0, &inv0, w.as_deref(), b.as_deref()).unwrap(),
    )?;
    let g = r.backward(p, None)?;
    let gref = reference::backward(&dy, &x, shape, &rm0, &inv0, w.as_deref(), false).unwrap();
    check_grads("eval", &g, &gref, p.weight.is_some())
}

/// Checks each case in both formats for each type pair (case i with seed `seed + i`)
/// and panics listing every failure under `label`.
pub fn check_cases<R: Runner>(
    label: &str,
    runner: &R,
    cases: &[Case],
    pairs: &[(DType, DType)],
    seed: u64,
) {
    let mut failures = Vec::new();
    for &pair in pairs {
        for (i, case) in cases.iter().enumerate() {
            for format in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
                let problem_seed = seed + i as u64;
                let r = with_types!(pair, |T, P| check_problem(
                    runner,
                    &Problem::<T, P>::new(case, format, problem_seed)
                ));
                if let Err(e) = r {
                    failures.push(format!(
                        "{pair:?} {:?} {} {:?}: {e}",
                        case.dims,
                        format.name(),
                        case.data
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{label}:\n{}", failures.join("\n"));
}

/// Eval on an NCHW input and on its NHWC copy give bit-identical outputs (PyTorch tests
/// exactly this).
pub fn check_eval_bitwise_across_formats<R: Runner, T: Float, P: ParamFor<T>>(
    r: &R,
    case: &Case,
) -> Result<(), String> {
    let a = Problem::<T, P>::new(case, MemoryFormat::Contiguous, 4);
    let mut b = a.clone();
    b.shape = a.shape.with_format(MemoryFormat::ChannelsLast);
    let each = |f: &mut dyn FnMut(usize, usize, usize)| {
        for n in 0..a.shape.n() {
            for c in 0..a.shape.c() {
                for s in 0..a.shape.spatial() {
                    f(n, c, s);
                }
            }
        }
    };
    each(&mut |n, c, s| b.x[b.shape.offset(n, c, s)] = a.x[a.shape.offset(n, c, s)]);
    let (ya, yb) = (r.eval_forward(&a)?, r.eval_forward(&b)?);
    // Equal outputs must also be right ones (two untouched buffers are equal too).
    let inv0 = reference::invstd(&reference::to_f64(&a.running_var), a.eps);
    let (w, bias) = (a.w64(), a.b64());
    let expect = reference::normalize(
        &reference::to_f64(&a.x),
        &a.shape,
        &reference::to_f64(&a.running_mean),
        &inv0,
        w.as_deref(),
        bias.as_deref(),
    )
    .map_err(|e| e.to_string())?;
    check_close("eval y (contiguous)", &ya, &expect)?;
    let mut first = None;
    each(&mut |n, c, s| {
        let (u, v) = (ya[a.shape.offset(n, c, s)], yb[b.shape.offset(n, c, s)]);
        if u != v && first.is_none() {
            first = Some(format!("({n}, {c}, {s}): {u:?} != {v:?}"));
        }
    });
    first.map_or(Ok(()), Err)
}

/// f16 values whose naive f16 sum of squares overflows normalise without inf or NaN and
/// agree with the same values in f32; the backward with f32 parameters stays finite.
pub fn check_half_overflow<R: Runner>(
    r: &R,
    case: &Case,
    format: MemoryFormat,
) -> Result<(), String> {
    use cuda_batchnorm::half::f16;
    let p16 = Problem::<f16, f32>::new(case, format, 2);
    let per_channel = p16.shape.per_channel();
    let naive: f32 = p16
        .x
        .iter()
        .take(per_channel)
        .map(|v| v.to_f32() * v.to_f32())
        .sum();
    if naive <= 65504.0 {
        return Err(format!(
            "the data ({naive:e}) would not overflow an f16 sum of squares"
        ));
    }
    let p32 = Problem::<f32, f32> {
        shape: p16.shape,
        x: p16.x.iter().map(|v| v.to_f32()).collect(),
        dy: p16.dy.iter().map(|v| v.to_f32()).collect(),
        weight: p16.weight.clone(),
        bias: p16.bias.clone(),
        running_mean: p16.running_mean.clone(),
        running_var: p16.running_var.clone(),
        eps: p16.eps,
        momentum: p16.momentum,
    };
    let o16 = r.train_forward(&p16)?;
    let o32 = r.train_forward(&p32)?;
    if !o16.y.iter().all(|v| v.is_finite()) || !o16.running_var.iter().all(|v| v.is_finite()) {
        return Err("f16 forward produced inf or NaN".into());
    }
    let y32: Vec<f64> = o32.y.iter().map(|&v| f64::from(v)).collect();
    check_close("f16 y against f32 y", &o16.y, &y32)?;
    let g = r.backward(&p16, Some((&o16.save_mean, &o16.save_invstd)))?;
    let params = g.dweight.iter().chain(&g.dbias).flatten();
    if !g.dx.iter().all(|v| v.is_finite()) || !params.copied().all(f32::is_finite) {
        return Err("f16 backward produced inf or NaN".into());
    }
    Ok(())
}

fn check_grads<T: Float, P: Float>(
    mode: &str,
    g: &GradOut<T, P>,
    gref: &reference::Grads,
    affine: bool,
) -> Result<(), String> {
    check_close(&format!("{mode} dx"), &g.dx, &gref.input)?;
    if affine {
        let dw = g.dweight.as_ref().ok_or(format!("{mode}: no dweight"))?;
        let db = g.dbias.as_ref().ok_or(format!("{mode}: no dbias"))?;
        check_close(&format!("{mode} dweight"), dw, &gref.weight)?;
        check_close(&format!("{mode} dbias"), db, &gref.bias)?;
    }
    Ok(())
}

/// A value no kernel writes: outputs are surrounded by it and it must survive.
pub fn sentinel<E: Float>() -> E {
    E::from_f64(-12345.5)
}

/// A host buffer with `pad` sentinel elements on each side of `len` payload elements.
pub struct Padded<E> {
    pub data: Vec<E>,
    pub pad: usize,
    pub len: usize,
}

impl<E: Float> Padded<E> {
    pub fn new(values: &[E], pad: usize) -> Padded<E> {
        let mut data = vec![sentinel::<E>(); values.len() + 2 * pad];
        data[pad..pad + values.len()].copy_from_slice(values);
        Padded {
            data,
            pad,
            len: values.len(),
        }
    }

    /// An output buffer: payload filled with the sentinel too (every value must be
    /// written).
    pub fn output(len: usize, pad: usize) -> Padded<E> {
        Padded {
            data: vec![sentinel::<E>(); len + 2 * pad],
            pad,
            len,
        }
    }

    pub fn payload(&self) -> &[E] {
        &self.data[self.pad..self.pad + self.len]
    }

    pub fn payload_mut(&mut self) -> &mut [E] {
        let (a, b) = (self.pad, self.pad + self.len);
        &mut self.data[a..b]
    }

    /// Checks that the guard elements are intact and returns the payload.
    pub fn checked(&self, what: &str) -> Result<Vec<E>, String> {
        check_guards(what, &self.data, self.pad, self.len)?;
        Ok(self.payload().to_vec())
    }
}

/// Checks the sentinel guards around `[pad, pad + len)` of a whole buffer.
pub fn check_guards<E: Float>(what: &str, all: &[E], pad: usize, len: usize) -> Result<(), String> {
    let s = sentinel::<E>();
    if let Some(i) = all[..pad].iter().position(|v| *v != s) {
        return Err(format!(
            "{what}: guard element {} before the buffer was overwritten",
            pad - i
        ));
    }
    if let Some(i) = all[pad + len..].iter().position(|v| *v != s) {
        return Err(format!(
            "{what}: guard element {i} after the buffer was overwritten"
        ));
    }
    Ok(())
}

/// Whether `got` equals `want` to the tolerance of `E`, elementwise, where NaN must
/// meet NaN and an infinity the same infinity (the non-finite checks compare this way).
fn same_value<E: Float>(got: E, want: f64) -> bool {
    let g = got.to_f64();
    if want.is_nan() || g.is_nan() {
        return want.is_nan() && g.is_nan();
    }
    if want.is_infinite() || g.is_infinite() {
        return g == want;
    }
    (g - want).abs() <= 8.0 * tolerance(E::DTYPE) * (1.0 + want.abs())
}

fn compare_values<E: Float>(what: &str, got: &[E], want: &[f64]) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: {} values, expected {}",
            got.len(),
            want.len()
        ));
    }
    match got.iter().zip(want).position(|(g, w)| !same_value(*g, *w)) {
        None => Ok(()),
        Some(i) => Err(format!(
            "{what}[{i}]: {:?}, expected {} ({})",
            got[i],
            want[i],
            E::DTYPE
        )),
    }
}

/// Infinities and NaN in the input, as PyTorch 2.15 treats them (on the CPU; its CUDA
/// kernels were written to the same rule): a channel holding +inf (and no NaN or -inf)
/// has mean +inf, one with both infinities or a NaN has mean NaN, the variance of every
/// such channel is NaN, so its output is NaN and its running mean inf or NaN; the other
/// channels are unaffected. An inf as a channel's first value is included (the kernels
/// shift each channel by its first value). Then the eval backward with a non-finite
/// running mean, whose dx PyTorch computes as dy * invstd * w, finite.
pub fn check_non_finite<R: Runner, T: Float, P: ParamFor<T>>(
    r: &R,
    format: MemoryFormat,
) -> Result<(), String> {
    let case = Case {
        dims: &[4, 5, 5, 7],
        data: Data::Normal,
        affine: true,
    };
    let mut p = Problem::<T, P>::new(&case, format, 11);
    let s = p.shape;
    let (inf, nan) = (f64::INFINITY, f64::NAN);
    p.x[s.offset(3, 1, 34)] = T::from_f64(inf); // the channel's last value
    p.x[s.offset(0, 2, 0)] = T::from_f64(inf); // its first value, and a -inf
    p.x[s.offset(2, 2, 5)] = T::from_f64(-inf);
    p.x[s.offset(0, 3, 0)] = T::from_f64(-inf); // the first value alone
    p.x[s.offset(1, 4, 3)] = T::from_f64(nan);
    let want_mean = [None, Some(inf), Some(nan), Some(-inf), Some(nan)];

    let out = r.train_forward(&p)?;
    let x = reference::to_f64(&p.x);
    let (mean, var) = reference::batch_stats(&x, &s).map_err(|e| e.to_string())?;
    let invstd = reference::invstd(&var, p.eps);
    let (w, b) = (p.w64(), p.b64());
    let y = reference::normalize(&x, &s, &mean, &invstd, w.as_deref(), b.as_deref())
        .map_err(|e| e.to_string())?;
    for (ch, want) in want_mean.iter().enumerate() {
        if let Some(m) = want {
            let same = if m.is_nan() {
                mean[ch].is_nan()
            } else {
                mean[ch] == *m
            };
            if !same || !var[ch].is_nan() {
                return Err(format!(
                    "reference channel {ch}: mean {} var {}",
                    mean[ch], var[ch]
                ));
            }
        }
    }
    compare_values("train y", &out.y, &y)?;
    compare_values("save_mean", &out.save_mean, &mean)?;
    let m = p.momentum;
    let count = s.per_channel() as f64;
    let rm: Vec<f64> = (0..s.c())
        .map(|c| m * mean[c] + (1.0 - m) * p.running_mean[c].to_f64())
        .collect();
    let rv: Vec<f64> = (0..s.c())
        .map(|c| m * var[c] * count / (count - 1.0) + (1.0 - m) * p.running_var[c].to_f64())
        .collect();
    compare_values("running_mean", &out.running_mean, &rm)?;
    compare_values("running_var", &out.running_var, &rv)?;

    // Eval backward through non-finite running means (of a finite input).
    let mut q = Problem::<T, P>::new(&case, format, 12);
    q.running_mean[1] = P::from_f64(inf);
    q.running_mean[2] = P::from_f64(nan);
    let g = r.backward(&q, None)?;
    if let Some(i) = g.dx.iter().position(|v| !v.to_f64().is_finite()) {
        return Err(format!(
            "eval dx[{i}] is {:?}: it does not depend on the mean",
            g.dx[i]
        ));
    }
    let inv0 = reference::invstd(&reference::to_f64(&q.running_var), q.eps);
    let gref = reference::backward(
        &reference::to_f64(&q.dy),
        &reference::to_f64(&q.x),
        &s,
        &reference::to_f64(&q.running_mean),
        &inv0,
        q.w64().as_deref(),
        false,
    )
    .map_err(|e| e.to_string())?;
    check_close("eval dx", &g.dx, &gref.input)
}

/// An eps that f32 cannot hold (1e-300, 1e-46: 0 in f32) or holds only as a subnormal
/// (1e-40), on constant channels (variance 0) in training and in eval (running variance
/// 0, running mean the constant): the kernels add eps in the accumulator type, as
/// PyTorch's CUDA kernels do, so with f32 accumulators invstd is inf and y NaN for the
/// first two, and y the bias for the third; f64 inputs keep eps and give the bias. The
/// CPU backend must agree value for value.
pub fn check_tiny_eps<R: Runner, T: Float, P: ParamFor<T>>(
    r: &R,
    format: MemoryFormat,
) -> Result<(), String> {
    let case = Case {
        dims: &[3, 4, 3, 5],
        data: Data::Constant,
        affine: true,
    };
    for eps in [1e-300, 1e-46, 1e-40] {
        let mut p = Problem::<T, P>::new(&case, format, 5);
        p.eps = eps;
        for c in 0..p.shape.c() {
            p.running_mean[c] = P::from_f64(1.0 + 0.5 * c as f64);
            p.running_var[c] = P::from_f64(0.0);
        }
        let acc_zero = T::Acc::from_f64(eps) == T::Acc::from_f64(0.0);
        let cpu = cpu_outputs(&p)?;
        let out = r.train_forward(&p)?;
        compare_values(&format!("eps {eps:e}: train y"), &out.y, &cpu.0)?;
        let y = r.eval_forward(&p)?;
        compare_values(&format!("eps {eps:e}: eval y"), &y, &cpu.1)?;
        let bias = p.bias.as_ref().map(|b| b[0].to_f64()).unwrap_or(0.0);
        let first = out.y[p.shape.offset(0, 0, 0)].to_f64();
        let expected_nan = acc_zero;
        if first.is_nan() != expected_nan || (!expected_nan && !same_value(out.y[0], bias)) {
            return Err(format!(
                "eps {eps:e} ({}): y of a constant channel is {first}, expected {}",
                T::DTYPE,
                if expected_nan {
                    "NaN".to_string()
                } else {
                    bias.to_string()
                }
            ));
        }
    }
    Ok(())
}

/// The CPU backend's train and eval outputs on a problem (the same arguments as the
/// runners get).
fn cpu_outputs<T: Float, P: ParamFor<T>>(
    p: &Problem<T, P>,
) -> Result<(Vec<f64>, Vec<f64>), String> {
    use cuda_batchnorm::cpu;
    let run = |training: bool| -> Result<Vec<f64>, String> {
        let (mut rm, mut rv) = (p.running_mean.clone(), p.running_var.clone());
        let mut y = vec![T::default(); p.shape.numel()];
        let zero = T::Acc::from_f64(0.0);
        let (mut sm, mut si) = (vec![zero; p.shape.c()], vec![zero; p.shape.c()]);
        cpu::batch_norm(
            cpu::Forward::<T, P> {
                input: &p.x,
                shape: p.shape,
                running_mean: Some(&mut rm),
                running_var: Some(&mut rv),
                weight: p.weight.as_deref(),
                bias: p.bias.as_deref(),
                training,
                momentum: p.momentum,
                eps: p.eps,
            },
            &mut y,
            training.then_some(cpu::SaveStats {
                mean: &mut sm,
                invstd: &mut si,
            }),
        )
        .map_err(|e| e.to_string())?;
        Ok(reference::to_f64(&y))
    };
    Ok((run(true)?, run(false)?))
}

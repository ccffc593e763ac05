//! PyTorch golden fixtures (tests/fixtures/*.txt, made by scripts/make_fixtures.py):
//! the parser, and a replay of each case's steps through a module on any backend.

use cuda_batchnorm::backend::Epilogue;
use cuda_batchnorm::{
    Backend, BatchNorm, BatchNormOptions, DType, Float, FrozenBatchNorm, MemoryFormat, ParamFor,
    Shape, StateDict,
};

use super::check_close;

/// One training or eval step: inputs and PyTorch's outputs.
#[derive(Clone, Debug, Default)]
pub struct Step {
    pub train: bool,
    pub tensors: Vec<(String, Vec<f64>)>,
    pub num_batches_tracked: Option<i64>,
}

impl Step {
    pub fn get(&self, name: &str) -> Option<&[f64]> {
        self.tensors
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    fn need(&self, name: &str) -> Result<&[f64], String> {
        self.get(name).ok_or(format!("step lacks {name}"))
    }
}

/// One fixture case.
#[derive(Clone, Debug)]
pub struct FixtureCase {
    pub name: String,
    pub module: usize,
    pub dims: Vec<usize>,
    pub format: MemoryFormat,
    pub dtype: DType,
    pub param: DType,
    pub affine: bool,
    pub track: bool,
    pub momentum: Option<f64>,
    pub eps: f64,
    pub weight: Option<Vec<f64>>,
    pub bias: Option<Vec<f64>>,
    /// The fused epilogue PyTorch's autograd ran after the module.
    pub epilogue: Fused,
    pub steps: Vec<Step>,
}

/// A case's epilogue: `bn(x)`, `relu(bn(x))` or `relu(bn(x) + z)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fused {
    None,
    Relu,
    AddRelu,
}

fn floats(words: &[&str]) -> Result<Vec<f64>, String> {
    words
        .iter()
        .map(|w| {
            w.parse::<f64>()
                .map_err(|e| format!("bad number {w:?}: {e}"))
        })
        .collect()
}

/// Parses a fixture file.
pub fn parse(text: &str) -> Result<Vec<FixtureCase>, String> {
    let mut cases = Vec::new();
    let mut cur: Option<FixtureCase> = None;
    for (lineno, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let (key, rest) = (words[0], &words[1..]);
        let err = |m: String| format!("line {}: {m}", lineno + 1);
        if key == "case" {
            cur = Some(FixtureCase {
                name: rest
                    .first()
                    .ok_or_else(|| err("case needs a name".into()))?
                    .to_string(),
                module: 2,
                dims: Vec::new(),
                format: MemoryFormat::Contiguous,
                dtype: DType::F32,
                param: DType::F32,
                affine: true,
                track: true,
                momentum: Some(0.1),
                eps: 1e-5,
                weight: None,
                bias: None,
                epilogue: Fused::None,
                steps: Vec::new(),
            });
            continue;
        }
        let c = cur
            .as_mut()
            .ok_or_else(|| err(format!("{key} outside a case")))?;
        let one = || {
            rest.first()
                .copied()
                .ok_or_else(|| err(format!("{key} needs a value")))
        };
        match key {
            "module" => c.module = one()?.parse().map_err(|e| err(format!("{e}")))?,
            "dims" => {
                c.dims = rest
                    .iter()
                    .map(|w| w.parse().map_err(|e| err(format!("{e}"))))
                    .collect::<Result<_, _>>()?
            }
            "format" => {
                c.format = MemoryFormat::parse(one()?).ok_or_else(|| err("bad format".into()))?
            }
            "dtype" => c.dtype = DType::parse(one()?).ok_or_else(|| err("bad dtype".into()))?,
            "param" => {
                c.param = DType::parse(one()?).ok_or_else(|| err("bad param dtype".into()))?
            }
            "affine" => c.affine = one()? == "1",
            "track" => c.track = one()? == "1",
            "momentum" => {
                c.momentum = if one()? == "none" {
                    None
                } else {
                    Some(one()?.parse().map_err(|e| err(format!("{e}")))?)
                }
            }
            "eps" => c.eps = one()?.parse().map_err(|e| err(format!("{e}")))?,
            "weight" => c.weight = Some(floats(rest).map_err(err)?),
            "bias" => c.bias = Some(floats(rest).map_err(err)?),
            "epilogue" => {
                c.epilogue = match one()? {
                    "relu" => Fused::Relu,
                    "add_relu" => Fused::AddRelu,
                    e => return Err(err(format!("bad epilogue {e}"))),
                }
            }
            "step" => c.steps.push(Step {
                train: one()? == "train",
                ..Step::default()
            }),
            "num_batches_tracked" => {
                let s = c
                    .steps
                    .last_mut()
                    .ok_or_else(|| err("counter outside a step".into()))?;
                s.num_batches_tracked = Some(one()?.parse().map_err(|e| err(format!("{e}")))?);
            }
            "end" => cases.push(cur.take().expect("checked above")),
            name => {
                let s = c
                    .steps
                    .last_mut()
                    .ok_or_else(|| err(format!("{name} outside a step")))?;
                s.tensors
                    .push((name.to_string(), floats(rest).map_err(err)?));
            }
        }
    }
    if cur.is_some() {
        return Err("the last case has no `end`".into());
    }
    Ok(cases)
}

/// The frozen BatchNorm cases (tests/fixtures/frozen.txt, torchvision's formula).
pub fn frozen() -> Vec<FixtureCase> {
    parse(include_str!("../fixtures/frozen.txt")).expect("fixtures parse")
}

/// Replays a frozen case through a `FrozenBatchNorm{module}d` built from its state dict
/// on `backend`: y and dx against torchvision's.
pub fn replay_frozen<B: Backend, T: Float, P: ParamFor<T>>(
    backend: B,
    case: &FixtureCase,
) -> Result<(), String> {
    match case.module {
        1 => replay_frozen_d::<1, B, T, P>(backend, case),
        2 => replay_frozen_d::<2, B, T, P>(backend, case),
        3 => replay_frozen_d::<3, B, T, P>(backend, case),
        m => Err(format!("module {m}")),
    }
}

fn replay_frozen_d<const D: usize, B: Backend, T: Float, P: ParamFor<T>>(
    backend: B,
    case: &FixtureCase,
) -> Result<(), String> {
    assert_eq!(
        (T::DTYPE, P::DTYPE),
        (case.dtype, case.param),
        "{}",
        case.name
    );
    let ctx = |e: String| format!("{}: {e}", case.name);
    let step = case.steps.first().ok_or(ctx("no step".into()))?;
    let need = |name: &str| step.need(name).map_err(ctx);
    let sd = StateDict {
        weight: case.weight.as_deref().map(cast),
        bias: case.bias.as_deref().map(cast),
        running_mean: Some(cast(need("running_mean")?)),
        running_var: Some(cast(need("running_var")?)),
        num_batches_tracked: None,
    };
    let shape = Shape::new(&case.dims, case.format).map_err(|e| ctx(e.to_string()))?;
    let bn = FrozenBatchNorm::<D, B, T, P>::from_state_dict(backend, case.dims[1], case.eps, &sd)
        .map_err(|e| ctx(e.to_string()))?;
    let x = bn
        .backend()
        .upload(&cast::<T>(need("x")?))
        .map_err(|e| ctx(e.to_string()))?;
    let dy = bn
        .backend()
        .upload(&cast::<T>(need("dy")?))
        .map_err(|e| ctx(e.to_string()))?;
    let y = bn
        .forward(B::tensor(&x), &shape)
        .map_err(|e| ctx(e.to_string()))?;
    let dx = bn
        .backward(B::tensor(&dy), &shape)
        .map_err(|e| ctx(e.to_string()))?;
    let host = |b: &B::Buffer<T>| bn.backend().to_host(b).map_err(|e| ctx(e.to_string()));
    check_close("y", &host(&y)?, need("y")?).map_err(ctx)?;
    check_close("dx", &host(&dx)?, need("dx")?).map_err(ctx)?;
    Ok(())
}

/// Every fixture case in tests/fixtures/.
pub fn all() -> Vec<FixtureCase> {
    let mut out = Vec::new();
    for text in [
        include_str!("../fixtures/modules_f32.txt"),
        include_str!("../fixtures/dtypes_formats.txt"),
        include_str!("../fixtures/fused.txt"),
    ] {
        out.extend(parse(text).expect("fixtures parse"));
    }
    out
}

fn cast<E: Float>(v: &[f64]) -> Vec<E> {
    v.iter().map(|&x| E::from_f64(x)).collect()
}

/// Replays `case` through a `BatchNorm{module}d` on `backend`, checking every output
/// of every step against PyTorch's. The case's dtypes must be `T` and `P`.
pub fn replay<B: Backend, T: Float, P: ParamFor<T>>(
    backend: B,
    case: &FixtureCase,
) -> Result<(), String> {
    match case.module {
        1 => replay_d::<1, B, T, P>(backend, case),
        2 => replay_d::<2, B, T, P>(backend, case),
        3 => replay_d::<3, B, T, P>(backend, case),
        m => Err(format!("module {m}")),
    }
}

fn replay_d<const D: usize, B: Backend, T: Float, P: ParamFor<T>>(
    backend: B,
    case: &FixtureCase,
) -> Result<(), String> {
    assert_eq!(
        (T::DTYPE, P::DTYPE),
        (case.dtype, case.param),
        "{}",
        case.name
    );
    let opts = BatchNormOptions {
        eps: case.eps,
        momentum: case.momentum,
        affine: case.affine,
        track_running_stats: case.track,
    };
    let c = case.dims[1];
    let shape = Shape::new(&case.dims, case.format).map_err(|e| e.to_string())?;
    let mut bn = BatchNorm::<D, B, T, P>::new(backend, c, opts).map_err(|e| e.to_string())?;
    if case.affine {
        let sd = StateDict {
            weight: case.weight.as_deref().map(cast),
            bias: case.bias.as_deref().map(cast),
            running_mean: case.track.then(|| vec![P::from_f64(0.0); c]),
            running_var: case.track.then(|| vec![P::from_f64(1.0); c]),
            num_batches_tracked: case.track.then_some(0),
        };
        bn.load_state_dict(&sd).map_err(|e| e.to_string())?;
    }
    for (i, step) in case.steps.iter().enumerate() {
        let ctx = |e: String| format!("{} step {i}: {e}", case.name);
        if step.train {
            bn.train();
        } else {
            bn.eval();
        }
        let mut x = bn
            .backend()
            .alloc(shape.numel(), T::from_f64(0.0))
            .map_err(|e| e.to_string())?;
        bn.backend()
            .copy_from_host(&mut x, &cast::<T>(step.need("x").map_err(ctx)?))
            .map_err(|e| e.to_string())?;
        let mut dy = bn
            .backend()
            .alloc(shape.numel(), T::from_f64(0.0))
            .map_err(|e| e.to_string())?;
        bn.backend()
            .copy_from_host(&mut dy, &cast::<T>(step.need("dy").map_err(ctx)?))
            .map_err(|e| e.to_string())?;
        let z = match case.epilogue {
            Fused::AddRelu => {
                let mut z = bn
                    .backend()
                    .alloc(shape.numel(), T::from_f64(0.0))
                    .map_err(|e| e.to_string())?;
                bn.backend()
                    .copy_from_host(&mut z, &cast::<T>(step.need("z").map_err(ctx)?))
                    .map_err(|e| e.to_string())?;
                Some(z)
            }
            _ => None,
        };
        let epilogue = match (case.epilogue, &z) {
            (Fused::None, _) => None,
            (_, Some(z)) => Some(Epilogue::AddRelu {
                residual: B::tensor(z),
            }),
            (_, None) => Some(Epilogue::Relu),
        };
        let y = bn
            .forward_fused(B::tensor(&x), epilogue, &shape)
            .map_err(|e| ctx(e.to_string()))?;
        check_close(
            "y",
            &bn.backend().to_host(&y).map_err(|e| e.to_string())?,
            step.need("y").map_err(ctx)?,
        )
        .map_err(ctx)?;
        let g = if case.epilogue == Fused::None {
            bn.backward(B::tensor(&dy), B::tensor(&x), &shape)
        } else {
            bn.backward_fused(B::tensor(&dy), B::tensor(&x), B::tensor(&y), &shape)
        }
        .map_err(|e| ctx(e.to_string()))?;
        let host = |b: &B::Buffer<T>| bn.backend().to_host(b).map_err(|e| e.to_string());
        check_close("dx", &host(&g.input)?, step.need("dx").map_err(ctx)?).map_err(ctx)?;
        match (&g.residual, case.epilogue) {
            (Some(dz), Fused::AddRelu) => {
                check_close("dz", &host(dz)?, step.need("dz").map_err(ctx)?).map_err(ctx)?
            }
            (None, Fused::None | Fused::Relu) => {}
            (r, e) => {
                return Err(ctx(format!(
                    "residual gradient {} after epilogue {e:?}",
                    if r.is_some() { "returned" } else { "missing" }
                )))
            }
        }
        if case.affine {
            let hp = |b: &Option<B::Buffer<P>>| match b {
                Some(b) => bn.backend().to_host(b).map_err(|e| e.to_string()),
                None => Err("no parameter gradient".to_string()),
            };
            check_close(
                "dweight",
                &hp(&g.weight)?,
                step.need("dweight").map_err(ctx)?,
            )
            .map_err(ctx)?;
            check_close("dbias", &hp(&g.bias)?, step.need("dbias").map_err(ctx)?).map_err(ctx)?;
        }
        let sd = bn.state_dict().map_err(|e| e.to_string())?;
        if case.track {
            let rm = sd.running_mean.as_deref().ok_or("no running_mean")?;
            let rv = sd.running_var.as_deref().ok_or("no running_var")?;
            check_close("running_mean", rm, step.need("running_mean").map_err(ctx)?)
                .map_err(ctx)?;
            check_close("running_var", rv, step.need("running_var").map_err(ctx)?).map_err(ctx)?;
            if sd.num_batches_tracked != step.num_batches_tracked {
                return Err(ctx(format!(
                    "num_batches_tracked {:?}, PyTorch {:?}",
                    sd.num_batches_tracked, step.num_batches_tracked
                )));
            }
        }
    }
    Ok(())
}

/// One case of tests/fixtures/fold.txt: a layer, the BatchNorm after it, and PyTorch's
/// folded weight and bias.
#[derive(Clone, Debug)]
pub struct FoldCase {
    pub name: String,
    pub kind: cuda_batchnorm::fold::LayerKind,
    pub dtype: DType,
    pub param: DType,
    pub shape: Vec<usize>,
    pub eps: f64,
    pub tensors: Vec<(String, Vec<f64>)>,
    pub has_bias: bool,
}

impl FoldCase {
    pub fn get(&self, name: &str) -> Result<&[f64], String> {
        self.tensors
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
            .ok_or(format!("{}: no {name}", self.name))
    }
}

/// The folding cases.
pub fn fold_cases() -> Vec<FoldCase> {
    use cuda_batchnorm::fold::LayerKind;
    let text = include_str!("../fixtures/fold.txt");
    let mut out = Vec::new();
    let mut cur: Option<FoldCase> = None;
    let (mut kind, mut groups) = (String::new(), 1usize);
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let words: Vec<&str> = line.split_whitespace().collect();
        let (key, rest) = (words[0], &words[1..]);
        if key == "case" {
            cur = Some(FoldCase {
                name: rest[0].to_string(),
                kind: LayerKind::Linear,
                dtype: DType::F32,
                param: DType::F32,
                shape: Vec::new(),
                eps: 1e-5,
                tensors: Vec::new(),
                has_bias: false,
            });
            continue;
        }
        let c = cur.as_mut().expect("a key outside a case");
        match key {
            "kind" => kind = rest[0].to_string(),
            "groups" => groups = rest[0].parse().unwrap(),
            "dtype" => c.dtype = DType::parse(rest[0]).unwrap(),
            "param" => c.param = DType::parse(rest[0]).unwrap(),
            "wshape" => c.shape = rest.iter().map(|w| w.parse().unwrap()).collect(),
            "eps" => c.eps = rest[0].parse().unwrap(),
            "bias" if rest == ["none"] => {}
            "end" => {
                let mut c = cur.take().unwrap();
                c.kind = match kind.as_str() {
                    "conv" => LayerKind::Conv { groups },
                    "transposed" => LayerKind::Transposed { groups },
                    _ => LayerKind::Linear,
                };
                c.has_bias = c.tensors.iter().any(|(n, _)| n == "bias");
                out.push(c);
            }
            name => {
                let v = floats(rest).expect("fold fixture numbers");
                c.tensors.push((name.to_string(), v));
            }
        }
    }
    out
}

/// Folds `case`'s BatchNorm into its layer on `backend` and compares the weight and bias
/// with PyTorch's. `T` is the layer's type, `P` the BatchNorm's.
pub fn replay_fold<B: Backend, T: Float, P: ParamFor<T>>(
    backend: B,
    case: &FoldCase,
) -> Result<(), String> {
    use cuda_batchnorm::fold::Layer;
    assert_eq!(
        (T::DTYPE, P::DTYPE),
        (case.dtype, case.param),
        "{}",
        case.name
    );
    let ctx = |e: cuda_batchnorm::BnError| format!("{}: {e}", case.name);
    let sd = StateDict {
        weight: Some(cast(case.get("bn_weight")?)),
        bias: Some(cast(case.get("bn_bias")?)),
        running_mean: Some(cast(case.get("bn_running_mean")?)),
        running_var: Some(cast(case.get("bn_running_var")?)),
        num_batches_tracked: None,
    };
    let c = case.get("bn_running_mean")?.len();
    let bn =
        FrozenBatchNorm::<2, B, T, P>::from_state_dict(backend, c, case.eps, &sd).map_err(ctx)?;
    let weight = bn
        .backend()
        .upload(&cast::<T>(case.get("weight")?))
        .map_err(ctx)?;
    let bias = if case.has_bias {
        Some(
            bn.backend()
                .upload(&cast::<T>(case.get("bias")?))
                .map_err(ctx)?,
        )
    } else {
        None
    };
    let folded = bn
        .fold(Layer {
            kind: case.kind,
            weight: B::tensor(&weight),
            shape: &case.shape,
            bias: bias.as_ref().map(B::tensor),
        })
        .map_err(ctx)?;
    let host = |b: &B::Buffer<T>| bn.backend().to_host(b).map_err(ctx);
    let named = |e: String| format!("{}: {e}", case.name);
    check_close(
        "fused weight",
        &host(&folded.weight)?,
        case.get("fused_weight")?,
    )
    .map_err(named)?;
    check_close("fused bias", &host(&folded.bias)?, case.get("fused_bias")?).map_err(named)?;
    Ok(())
}

//! The PyTorch CNN fixture (tests/fixtures/cnn*.safetensors, made by
//! scripts/make_fixtures.py): every BatchNorm layer loaded from the model's
//! `.safetensors` state dict by its prefix, fed the input PyTorch's forward hook
//! recorded for it in eval mode, its output compared with PyTorch's, in either layout.

use cuda_batchnorm::cpu::reference::to_f64;
use cuda_batchnorm::weights::Weights;
use cuda_batchnorm::{
    Backend, BatchNorm, BatchNormOptions, Float, FrozenBatchNorm, MemoryFormat, ParamFor, Shape,
};

/// The fixture's path.
pub fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// The model's weights and the hooks' records.
pub fn load() -> (Weights, Weights) {
    (
        Weights::read(fixture("cnn.safetensors")).expect("cnn.safetensors"),
        Weights::read(fixture("cnn_layers.safetensors")).expect("cnn_layers.safetensors"),
    )
}

/// The BatchNorm layers' prefixes, as the model names them.
pub const LAYERS: [&str; 7] = [
    "bn1",
    "bn_head",
    "layer1.0.bn1",
    "layer1.0.bn2",
    "layer2.0.bn1",
    "layer2.0.bn2",
    "layer2.0.downsample.1",
];

/// A contiguous (N, C, ...) tensor's values in `format`'s memory order.
pub fn to_format(v: &[f64], dims: &[usize], format: MemoryFormat) -> Vec<f64> {
    let from = Shape::new(dims, MemoryFormat::Contiguous).unwrap();
    let to = from.with_format(format);
    let mut out = vec![0.0; v.len()];
    for n in 0..from.n() {
        for c in 0..from.c() {
            for s in 0..from.spatial() {
                out[to.offset(n, c, s)] = v[from.offset(n, c, s)];
            }
        }
    }
    out
}

/// Loads layer `prefix` into a new module on `backend` (parameter type `P`, input `T`),
/// runs its eval forward on the recorded input in `format`, and compares with the
/// recorded output under `T`'s tolerance (widened when `P` is coarser than f32, since
/// the stored f32 parameters were rounded).
pub fn check_layer<B: Backend, T: Float, P: ParamFor<T>>(
    backend: B,
    weights: &Weights,
    io: &Weights,
    prefix: &str,
    format: MemoryFormat,
) -> Result<(), String> {
    check_layer_as::<B, T, P>(false, backend, weights, io, prefix, format)
}

/// As [`check_layer`], the layer loaded as a `FrozenBatchNorm{1,2}d` when `frozen`.
pub fn check_layer_as<B: Backend, T: Float, P: ParamFor<T>>(
    frozen: bool,
    backend: B,
    weights: &Weights,
    io: &Weights,
    prefix: &str,
    format: MemoryFormat,
) -> Result<(), String> {
    let e = |e: cuda_batchnorm::BnError| format!("{prefix}: {e}");
    let dims = io
        .shape(&format!("{prefix}.input"))
        .ok_or(format!("{prefix}: no recorded input"))?
        .to_vec();
    let c = dims[1];
    let x: Vec<f64> = io.values(&format!("{prefix}.input")).unwrap().map_err(e)?;
    let want: Vec<f64> = io.values(&format!("{prefix}.output")).unwrap().map_err(e)?;
    let x = to_format(&x, &dims, format);
    let want = to_format(&want, &dims, format);
    let shape = Shape::new(&dims, format).map_err(e)?;
    let xt: Vec<T> = x.iter().map(|&v| T::from_f64(v)).collect();
    let input = backend.upload(&xt).map_err(e)?;
    let eps = BatchNormOptions::default().eps;
    let y = if frozen && dims.len() == 2 {
        let m = FrozenBatchNorm::<1, B, T, P>::from_safetensors(backend, weights, prefix, eps)
            .map_err(e)?;
        let out = m.forward(B::tensor(&input), &shape).map_err(e)?;
        m.backend().to_host(&out).map_err(e)?
    } else if frozen {
        let m = FrozenBatchNorm::<2, B, T, P>::from_safetensors(backend, weights, prefix, eps)
            .map_err(e)?;
        let out = m.forward(B::tensor(&input), &shape).map_err(e)?;
        m.backend().to_host(&out).map_err(e)?
    } else if dims.len() == 2 {
        let mut m =
            BatchNorm::<1, B, T, P>::new(backend, c, BatchNormOptions::default()).map_err(e)?;
        let keys = m.load_safetensors(weights, prefix, true).map_err(e)?;
        if keys != Default::default() {
            return Err(format!("{prefix}: {keys:?}"));
        }
        m.eval();
        let out = m.forward(B::tensor(&input), &shape).map_err(e)?;
        m.backend().to_host(&out).map_err(e)?
    } else {
        let mut m =
            BatchNorm::<2, B, T, P>::new(backend, c, BatchNormOptions::default()).map_err(e)?;
        m.load_safetensors(weights, prefix, true).map_err(e)?;
        m.eval();
        let out = m.forward(B::tensor(&input), &shape).map_err(e)?;
        m.backend().to_host(&out).map_err(e)?
    };
    // PyTorch's output is f32, and the input and parameters were rounded to T and P:
    // the coarsest of the three tolerances, doubled for the two roundings.
    let tol = [T::DTYPE, P::DTYPE, cuda_batchnorm::DType::F32]
        .iter()
        .map(|&d| super::tolerance(d))
        .fold(0.0, f64::max);
    let err = super::rel_err(&to_f64(&y), &want);
    if err <= 2.0 * tol {
        Ok(())
    } else {
        Err(format!(
            "{prefix} {} ({}/{}): relative error {err:.3e} > {:.0e}",
            format.name(),
            T::DTYPE,
            P::DTYPE,
            2.0 * tol
        ))
    }
}

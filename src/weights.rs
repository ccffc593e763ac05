//! PyTorch weights in `.safetensors` files: every BatchNorm layer of a model loaded by
//! its key prefix, and saved the same way.
//!
//! A PyTorch model's state dict names a BatchNorm layer's tensors `{prefix}.weight`,
//! `{prefix}.bias`, `{prefix}.running_mean`, `{prefix}.running_var` and
//! `{prefix}.num_batches_tracked` (an int64 scalar, absent in old checkpoints), e.g.
//! `layer1.0.bn1.running_var`. A checkpoint becomes a `.safetensors` file with one line
//! of PyTorch:
//!
//! ```text
//! python3 -c "import torch, safetensors.torch as st; st.save_file(torch.load('model.pt', map_location='cpu'), 'model.safetensors')"
//! ```
//!
//! (for a checkpoint that is a state dict; `model.state_dict()` otherwise).
//!
//! [`Weights`] holds such a file; [`BatchNorm::load_safetensors`] loads one layer from
//! it, converting the stored dtype (any float or integer) to the module's parameter
//! type, with PyTorch's `load_state_dict` rules and sentences (missing, unexpected and
//! wrongly sized keys; `strict`); [`WeightsWriter`] writes layers back in PyTorch's
//! layout.
//!
//! ```no_run
//! use cuda_batchnorm::weights::Weights;
//! use cuda_batchnorm::{cpu::BatchNorm2d, BatchNormOptions, Cpu};
//! # fn main() -> cuda_batchnorm::Result<()> {
//! let weights = Weights::read("resnet50.safetensors")?;
//! let mut bn1 = BatchNorm2d::<f32>::new(Cpu, 64, BatchNormOptions::default())?;
//! bn1.load_safetensors(&weights, "bn1", true)?;
//! bn1.eval();
//! # Ok(()) }
//! ```

use std::borrow::Cow;
use std::path::Path;

use safetensors::tensor::{Dtype, View};
use safetensors::SafeTensors;

use crate::backend::Backend;
use crate::dtype::{DType, Float, ParamFor};
use crate::error::{BnError, Result};
use crate::module::{BatchNorm, IncompatibleKeys, StateDict};

/// One tensor's place in the file.
#[derive(Clone, Debug)]
struct Entry {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range of its data in the file.
    start: usize,
    end: usize,
}

/// A `.safetensors` file in memory.
#[derive(Clone)]
pub struct Weights {
    bytes: Vec<u8>,
    entries: Vec<Entry>,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights")
            .field("bytes", &self.bytes.len())
            .field("tensors", &self.entries.len())
            .finish()
    }
}

fn bad(what: impl std::fmt::Display) -> BnError {
    BnError::Weights(what.to_string())
}

impl Weights {
    /// Reads and checks a file.
    pub fn read(path: impl AsRef<Path>) -> Result<Weights> {
        let path = path.as_ref();
        let bytes =
            std::fs::read(path).map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?;
        Weights::from_bytes(bytes).map_err(|e| match e {
            BnError::Weights(m) => bad(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// A file's bytes, checked.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Weights> {
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let base = bytes.as_ptr() as usize;
        let mut entries: Vec<Entry> = st
            .tensors()
            .into_iter()
            .map(|(name, view)| {
                let data = view.data();
                let start = data.as_ptr() as usize - base;
                Entry {
                    name,
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    start,
                    end: start + data.len(),
                }
            })
            .collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Weights { bytes, entries })
    }

    /// Every tensor name, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.name.as_str())
    }

    fn entry(&self, key: &str) -> Option<&Entry> {
        self.entries
            .binary_search_by(|e| e.name.as_str().cmp(key))
            .ok()
            .map(|i| &self.entries[i])
    }

    /// A tensor's shape, if it is there.
    pub fn shape(&self, key: &str) -> Option<&[usize]> {
        self.entry(key).map(|e| e.shape.as_slice())
    }

    /// The prefixes of every BatchNorm layer in the file: those of the keys ending in
    /// `.running_var` (a BatchNorm that tracks running statistics), sorted.
    pub fn batchnorm_prefixes(&self) -> Vec<&str> {
        self.keys()
            .filter_map(|k| k.strip_suffix(".running_var"))
            .filter(|p| self.entry(&format!("{p}.running_mean")).is_some())
            .collect()
    }

    /// A tensor's values, converted from its stored dtype to `E` (through f64, exact
    /// for every stored float and for integers below 2^53), or None if it is not there.
    pub fn values<E: Float>(&self, key: &str) -> Option<Result<Vec<E>>> {
        let e = self.entry(key)?;
        Some(
            decode(e, &self.bytes[e.start..e.end])
                .map(|v| v.into_iter().map(E::from_f64).collect()),
        )
    }

    /// An integer scalar (a tensor of one element, such as `num_batches_tracked`).
    pub fn scalar_i64(&self, key: &str) -> Option<Result<i64>> {
        let e = self.entry(key)?;
        let bytes = &self.bytes[e.start..e.end];
        Some(match (e.dtype, bytes.len()) {
            (Dtype::I64, 8) => Ok(i64::from_le_bytes(bytes.try_into().expect("8 bytes"))),
            _ => match decode(e, bytes) {
                Ok(v) if v.len() == 1 && v[0].fract() == 0.0 && v[0].abs() < 9.2e18 => {
                    Ok(v[0] as i64)
                }
                Ok(v) => Err(bad(format!(
                    "{key}: expected an integer scalar, found {} value(s) of {:?}",
                    v.len(),
                    e.dtype
                ))),
                Err(err) => Err(err),
            },
        })
    }
}

/// A tensor's little-endian values as f64.
fn decode(e: &Entry, b: &[u8]) -> Result<Vec<f64>> {
    fn each<const N: usize>(b: &[u8], f: impl Fn([u8; N]) -> f64) -> Vec<f64> {
        b.chunks_exact(N)
            .map(|c| f(c.try_into().expect("chunks_exact")))
            .collect()
    }
    Ok(match e.dtype {
        Dtype::F64 => each(b, f64::from_le_bytes),
        Dtype::F32 => each(b, |c| f64::from(f32::from_le_bytes(c))),
        Dtype::F16 => each(b, |c| half::f16::from_le_bytes(c).to_f64()),
        Dtype::BF16 => each(b, |c| half::bf16::from_le_bytes(c).to_f64()),
        Dtype::I64 => each(b, |c| i64::from_le_bytes(c) as f64),
        Dtype::I32 => each(b, |c| f64::from(i32::from_le_bytes(c))),
        Dtype::I16 => each(b, |c| f64::from(i16::from_le_bytes(c))),
        Dtype::I8 => each(b, |c: [u8; 1]| f64::from(c[0] as i8)),
        Dtype::U64 => each(b, |c| u64::from_le_bytes(c) as f64),
        Dtype::U32 => each(b, |c| f64::from(u32::from_le_bytes(c))),
        Dtype::U16 => each(b, |c| f64::from(u16::from_le_bytes(c))),
        Dtype::U8 | Dtype::BOOL => each(b, |c: [u8; 1]| f64::from(c[0])),
        other => {
            return Err(bad(format!(
                "{}: tensors of dtype {other:?} cannot be converted to a float",
                e.name
            )))
        }
    })
}

/// The full key of a layer's tensor: `prefix.name`, or `name` for an empty prefix.
pub(crate) fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// The names of a BatchNorm's state-dict entries, in PyTorch's order.
const KEYS: [&str; 5] = [
    "weight",
    "bias",
    "running_mean",
    "running_var",
    "num_batches_tracked",
];

impl<const D: usize, B: Backend, T: Float, P: ParamFor<T>> BatchNorm<D, B, T, P> {
    /// Loads this layer's tensors `{prefix}.weight`, ... from a `.safetensors` file, as
    /// PyTorch's `load_state_dict(state_dict, strict)` would on the layer: the stored
    /// dtype is converted to `P`; a tensor whose shape is not `[C]` is an error
    /// (`size mismatch for {key}: ...`) whatever `strict` says; with `strict`, a missing
    /// key or an unexpected one under the prefix (`{prefix}.extra`) is an error too, in
    /// PyTorch's words, and without it they are returned. A missing
    /// `num_batches_tracked` keeps the current count, as PyTorch does for checkpoints
    /// without it. On error nothing is loaded.
    pub fn load_safetensors(
        &mut self,
        weights: &Weights,
        prefix: &str,
        strict: bool,
    ) -> Result<IncompatibleKeys> {
        let (sd, shapes, unexpected) = read_layer::<P>(weights, prefix)?;
        self.load_checked(&sd, &shapes, &|name| join(prefix, name), unexpected, strict)
    }
}

/// Collects BatchNorm layers (and any other f32/f64/f16/bf16/int64 tensors) and writes
/// them as a `.safetensors` file in PyTorch's layout.
#[derive(Default)]
pub struct WeightsWriter {
    tensors: Vec<Stored>,
}

struct Stored {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Stored {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn stored_dtype(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::F64 => Dtype::F64,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
    }
}

fn le_bytes<E: Float>(v: &[E]) -> Vec<u8> {
    let mut out = Vec::with_capacity(std::mem::size_of_val(v));
    for x in v {
        match E::DTYPE {
            DType::F64 => out.extend_from_slice(&x.to_f64().to_le_bytes()),
            DType::F32 => out.extend_from_slice(&(x.to_f64() as f32).to_le_bytes()),
            DType::F16 => out.extend_from_slice(&half::f16::from_f64(x.to_f64()).to_le_bytes()),
            DType::BF16 => out.extend_from_slice(&half::bf16::from_f64(x.to_f64()).to_le_bytes()),
        }
    }
    out
}

impl WeightsWriter {
    /// An empty file.
    pub fn new() -> WeightsWriter {
        WeightsWriter::default()
    }

    /// A tensor of `shape` (row-major values, stored as `E`).
    pub fn add<E: Float>(&mut self, key: &str, shape: &[usize], values: &[E]) -> Result<()> {
        let numel: usize = shape.iter().product();
        if numel != values.len() {
            return Err(bad(format!(
                "{key}: shape {shape:?} holds {numel} values, {} given",
                values.len()
            )));
        }
        self.push(
            key,
            stored_dtype(E::DTYPE),
            shape.to_vec(),
            le_bytes(values),
        )
    }

    fn push(&mut self, key: &str, dtype: Dtype, shape: Vec<usize>, data: Vec<u8>) -> Result<()> {
        if self.tensors.iter().any(|t| t.name == key) {
            return Err(bad(format!("{key} is already in the file")));
        }
        self.tensors.push(Stored {
            name: key.to_string(),
            dtype,
            shape,
            data,
        });
        Ok(())
    }

    /// A layer's state dict under `prefix`, as PyTorch's `state_dict()` names it, its
    /// tensors in the module's parameter type and `num_batches_tracked` as an int64
    /// scalar.
    pub fn add_module<const D: usize, B: Backend, T: Float, P: ParamFor<T>>(
        &mut self,
        prefix: &str,
        module: &BatchNorm<D, B, T, P>,
    ) -> Result<()> {
        let sd = module.state_dict()?;
        for (name, v) in [
            ("weight", &sd.weight),
            ("bias", &sd.bias),
            ("running_mean", &sd.running_mean),
            ("running_var", &sd.running_var),
        ] {
            if let Some(v) = v {
                self.add(&join(prefix, name), &[v.len()], v)?;
            }
        }
        if let Some(n) = sd.num_batches_tracked {
            self.push(
                &join(prefix, "num_batches_tracked"),
                Dtype::I64,
                Vec::new(),
                n.to_le_bytes().to_vec(),
            )?;
        }
        Ok(())
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut sorted: Vec<&Stored> = self.tensors.iter().collect();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        safetensors::tensor::serialize(sorted.into_iter().map(|t| (t.name.as_str(), t)), None)
            .map_err(|e| bad(format!("cannot serialise: {e}")))
    }

    /// Writes the file.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        std::fs::write(path, self.to_bytes()?)
            .map_err(|e| bad(format!("cannot write {}: {e}", path.display())))
    }
}

/// A BatchNorm layer's tensors under `prefix` as `P`: the state dict, the stored shape
/// of weight, bias, running_mean and running_var (when present), and the other keys
/// under the prefix.
pub(crate) type Layer<P> = (StateDict<P>, [Option<Vec<usize>>; 4], Vec<String>);

pub(crate) fn read_layer<P: Float>(weights: &Weights, prefix: &str) -> Result<Layer<P>> {
    let under = join(prefix, "");
    let unexpected: Vec<String> = weights
        .keys()
        .filter(|k| {
            (prefix.is_empty() || k.starts_with(under.as_str()))
                && !KEYS.contains(&&k[under.len()..])
        })
        .map(str::to_string)
        .collect();
    let mut shapes: [Option<Vec<usize>>; 4] = Default::default();
    let mut values: [Option<Vec<P>>; 4] = Default::default();
    for (i, name) in KEYS[..4].iter().enumerate() {
        let key = join(prefix, name);
        if let Some(v) = weights.values::<P>(&key) {
            shapes[i] = weights.shape(&key).map(<[usize]>::to_vec);
            values[i] = Some(v?);
        }
    }
    let counter = weights
        .scalar_i64(&join(prefix, "num_batches_tracked"))
        .transpose()?;
    let [weight, bias, running_mean, running_var] = values;
    let sd = StateDict {
        weight,
        bias,
        running_mean,
        running_var,
        num_batches_tracked: counter,
    };
    Ok((sd, shapes, unexpected))
}

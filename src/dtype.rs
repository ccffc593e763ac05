//! Element types: what a tensor stores (`T`), what its parameters and running statistics
//! store (`P`), and what the kernels accumulate in (`T::Acc`).
//!
//! Inputs may be f32, f64, f16 or bf16. Parameters and running statistics have the
//! input's type, or f32 with an f16/bf16 input (PyTorch's mixed mode). Accumulation is
//! f32, or f64 for f64 inputs; `save_mean` / `save_invstd` are in the accumulator type.

use cudarc::driver::{DeviceRepr, ValidAsZeroBits};
use half::{bf16, f16};

/// A dtype tag, for names, messages and the benchmark's output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary64.
    F64,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
}

impl DType {
    /// The short name used in kernel names and on the command line: `f32`, `f64`, `f16`, `bf16`.
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Parses `f32`, `f64`, `f16`, `bf16`.
    pub fn parse(s: &str) -> Option<DType> {
        match s {
            "f32" => Some(DType::F32),
            "f64" => Some(DType::F64),
            "f16" => Some(DType::F16),
            "bf16" => Some(DType::BF16),
            _ => None,
        }
    }

    /// The accumulator type of an input of this type.
    pub const fn acc(self) -> DType {
        match self {
            DType::F64 => DType::F64,
            _ => DType::F32,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// A floating-point element type the kernels store: f32, f64, f16 or bf16.
pub trait Float:
    sealed::Sealed
    + DeviceRepr
    + ValidAsZeroBits
    + Copy
    + Default
    + PartialEq
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
    /// Its tag.
    const DTYPE: DType;
    /// The type kernels accumulate this type in (f32, or f64 for f64).
    type Acc: Float;
    /// This type as its own parameter type (always `Self`): names the kernels of
    /// `(T, T)` where a call has no parameters of its own (a frozen BatchNorm's).
    type Native: ParamFor<Self>;
    /// Exact widening to f64.
    fn to_f64(self) -> f64;
    /// Rounding (to nearest even) from f64.
    fn from_f64(v: f64) -> Self;
}

impl Float for f32 {
    const DTYPE: DType = DType::F32;
    type Acc = f32;
    type Native = f32;
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl Float for f64 {
    const DTYPE: DType = DType::F64;
    type Acc = f64;
    type Native = f64;
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(v: f64) -> Self {
        v
    }
}

impl Float for f16 {
    const DTYPE: DType = DType::F16;
    type Acc = f32;
    type Native = f16;
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
    fn from_f64(v: f64) -> Self {
        f16::from_f64(v)
    }
}

impl Float for bf16 {
    const DTYPE: DType = DType::BF16;
    type Acc = f32;
    type Native = bf16;
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
    fn from_f64(v: f64) -> Self {
        bf16::from_f64(v)
    }
}

/// Parameter and running-statistics types allowed with input type `T`: `T` itself, or
/// f32 when `T` is f16 or bf16.
pub trait ParamFor<T: Float>: Float {}
impl ParamFor<f32> for f32 {}
impl ParamFor<f64> for f64 {}
impl ParamFor<f16> for f16 {}
impl ParamFor<bf16> for bf16 {}
impl ParamFor<f16> for f32 {}
impl ParamFor<bf16> for f32 {}

/// PyTorch's legacy tensor type name of a dtype under a module prefix (`torch` or
/// `torch.cuda`): `torch.FloatTensor`, `torch.cuda.BFloat16Tensor`, ...
pub fn torch_tensor_type(dtype: DType, prefix: &str) -> String {
    let name = match dtype {
        DType::F32 => "FloatTensor",
        DType::F64 => "DoubleTensor",
        DType::F16 => "HalfTensor",
        DType::BF16 => "BFloat16Tensor",
    };
    format!("{prefix}.{name}")
}

/// The kernel-name suffix of an (input, parameter) pair: `f32`, `f16`, `f16_f32`, ...
pub fn kernel_tag(input: DType, param: DType) -> String {
    if input == param {
        input.name().to_string()
    } else {
        format!("{}_{}", input.name(), param.name())
    }
}

/// The (input, parameter) pairs that have kernels, the `ParamFor` impls above as
/// values: each type with itself, then f16 and bf16 with f32 parameters (PyTorch's
/// mixed mode). Their order is the kernel table's (src/kernels.rs).
pub const KERNEL_PAIRS: [(DType, DType); 6] = [
    (DType::F32, DType::F32),
    (DType::F64, DType::F64),
    (DType::F16, DType::F16),
    (DType::BF16, DType::BF16),
    (DType::F16, DType::F32),
    (DType::BF16, DType::F32),
];

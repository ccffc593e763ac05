//! Batch Normalization for NVIDIA GPUs with PyTorch's semantics, numbers and error
//! messages: handwritten CUDA kernels compiled to PTX at build time and launched
//! through [`cudarc`].
//!
//! ```
//! use cuda_batchnorm::prelude::*;
//!
//! # fn main() -> cuda_batchnorm::Result<()> {
//! // The CPU backend here; `BatchNorm2d::<f32>::new(Cuda::new(&stream), ..)` on a GPU.
//! let mut bn = cpu::BatchNorm2d::<f32>::new(Cpu, 3, BatchNormOptions::default())?;
//! let shape = Shape::nchw(2, 3, 2, 2)?;
//! let x: Vec<f32> = (0..shape.numel()).map(|i| i as f32).collect();
//! let y = bn.forward(&x, &shape)?; // training: batch statistics
//! let mean: f32 = y.iter().sum::<f32>() / y.len() as f32;
//! assert!(mean.abs() < 1e-6);
//! let grads = bn.backward(&vec![1.0; shape.numel()], &x, &shape)?;
//! assert_eq!(grads.bias, Some(vec![8.0; 3])); // grad_bias = sum(dy) per channel
//! assert_eq!(bn.num_batches_tracked(), 1);
//! bn.eval(); // running statistics from now on
//! # Ok(()) }
//! ```
//!
//! # Layers
//!
//! * [`nn`]: `BatchNorm1d`, `BatchNorm2d`, `BatchNorm3d` modules with parameters,
//!   running statistics, train/eval, forward, backward and state dicts; [`cpu`] has the
//!   same modules on host memory.
//! * [`frozen`]: `FrozenBatchNorm1d`/`2d`/`3d` (torchvision's `FrozenBatchNorm2d`:
//!   fixed statistics, one multiply-add per element); [`fold`]: a BatchNorm folded into
//!   the convolution or linear layer before it.
//! * [`functional`]: `batch_norm` (all modes), `batch_norm_eval` (shared references, for
//!   inference) and `batch_norm_backward` on cudarc buffers, validated exactly as PyTorch
//!   validates.
//! * [`raw`]: the same operations on device addresses through any [`raw::Launcher`]
//!   (unsafe; the CPU emulator in the tests launches through it).
//! * [`launch`]: launch planning, pure functions.
//!
//! # Semantics
//!
//! PyTorch's (`torch.nn.BatchNorm*d` / `torch.nn.functional.batch_norm`): biased batch
//! variance for normalisation, unbiased for the running variance, `momentum: None` as
//! the cumulative average, the four (training, track_running_stats) modes, empty
//! batches. f16/bf16 inputs accumulate in f32 and may have f32 parameters.
//!
//! # Deliberate deviations from PyTorch
//!
//! * A call that returns `Err` changes no state: PyTorch increments
//!   `num_batches_tracked` before validating; here the counter only moves when the
//!   forward succeeds.
//! * A NaN or infinite `eps` (any mode) or `momentum` (when it is used) is an error.
//! * A buffer shorter than its shape needs, a buffer of another CUDA context, a missing
//!   driver or device, missing or refused PTX, sizes whose product (zeros left out)
//!   exceeds `isize::MAX`, and host memory that cannot be had are typed errors; nothing
//!   panics. Modules validate a call before allocating its outputs.
//! * Backward computes what autograd would for the last forward but writes gradients
//!   rather than accumulating them. A module's backward after its weight or running
//!   statistics changed since that forward fails with autograd's sentence, without the
//!   hint about autograd's anomaly detection that PyTorch appends.
//! * Sizes in messages are written `[1, 10]` where PyTorch writes `torch.Size([1, 10])`.
//! * eps is added to the variance in the accumulator type (f32, or f64 for f64
//!   inputs), on every backend, as PyTorch's CUDA kernels add it; PyTorch's CPU
//!   kernels add it in f64, so an eps that f32 cannot hold (1e-46) differs there.
//!
//! # Building
//!
//! `build.rs` compiles `kernels/*.cu` with nvcc (CUDA 13.0). Without nvcc the crate
//! still builds, and every GPU entry point returns [`BnError::PtxUnavailable`] saying how
//! to get it.

#![warn(missing_docs)]

pub mod backend;
pub mod cpu;
pub mod dtype;
pub mod error;
pub mod fold;
pub mod frozen;
pub mod functional;
#[cfg(feature = "candle")]
pub mod interop;
pub mod kernels;
pub mod launch;
pub mod module;
pub mod nn;
pub mod raw;
pub mod shape;
pub mod sync;
pub mod validate;
#[cfg(feature = "safetensors")]
pub mod weights;

pub use backend::{Backend, Epilogue, EpilogueGrad};
pub use cpu::Cpu;
pub use dtype::{DType, Float, ParamFor};
pub use error::{BnError, Result};
pub use frozen::FrozenBatchNorm;
pub use functional::{Cuda, Workspace};
pub use kernels::{driver_present, driver_version, open_device, ptx_unavailable};
pub use module::{BatchNorm, BatchNormOptions, Gradients, IncompatibleKeys, StateDict};
pub use shape::{MemoryFormat, Shape};

pub use cudarc;
pub use half;

/// What most programs use: `use cuda_batchnorm::prelude::*;`. The CUDA modules are
/// `BatchNorm1d`/`2d`/`3d` here; the CPU backend's are `cpu::BatchNorm2d` and so on.
pub mod prelude {
    pub use crate::backend::{Backend, Epilogue, EpilogueGrad};
    pub use crate::cpu::{self, Cpu};
    pub use crate::dtype::{DType, Float};
    pub use crate::error::{BnError, Result};
    pub use crate::functional::{Cuda, Workspace};
    pub use crate::kernels::{open_device, ptx_unavailable};
    pub use crate::module::{BatchNormOptions, Gradients, StateDict};
    pub use crate::nn::{
        BatchNorm1d, BatchNorm2d, BatchNorm3d, FrozenBatchNorm1d, FrozenBatchNorm2d,
        FrozenBatchNorm3d,
    };
    pub use crate::shape::{MemoryFormat, Shape};
    #[cfg(feature = "safetensors")]
    pub use crate::weights::{Weights, WeightsWriter};
    pub use half::{bf16, f16};
}

// The README's Rust examples compile as written (`cargo test --doc`).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeExamples;

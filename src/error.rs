//! The crate's one error type.
//!
//! Variants in the first group carry PyTorch's own sentences, so that code and tests
//! written against `torch.nn.BatchNorm*d` see the same text. The rest cover what PyTorch
//! cannot get wrong (buffers shorter than their shape, non-finite options) or what only
//! a GPU can get wrong (no driver, no device, no PTX, a buffer of another context).

use cudarc::driver::DriverError;

/// Result alias used throughout the crate.
pub type Result<T, E = BnError> = std::result::Result<T, E>;

/// Everything that can go wrong in a cuda-batchnorm call. A call that returns `Err`
/// has changed no state: no buffer, no running statistic, no counter.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BnError {
    /// The input's rank does not fit the module (`expected 4D input (got 3D input)`).
    #[error("expected {expected} input (got {got}D input)")]
    InputRank {
        /// What the module accepts: `2D or 3D`, `4D` or `5D`.
        expected: &'static str,
        /// The rank it was given.
        got: usize,
    },

    /// Training needs at least two values per channel.
    #[error("Expected more than 1 value per channel when training, got input size {size:?}")]
    TooFewValues {
        /// The input's size.
        size: Vec<usize>,
    },

    /// Sizes that do not broadcast, in PyTorch's sentence: a frozen BatchNorm given an
    /// input of another channel count (torchvision's `x * scale`, dimension 1), a layer
    /// folded with a BatchNorm of another channel count.
    #[error(
        "The size of tensor a ({a}) must match the size of tensor b ({b}) at non-singleton dimension {dim}"
    )]
    SizeMismatch {
        /// The first operand's size there.
        a: usize,
        /// The second's.
        b: usize,
        /// The dimension.
        dim: usize,
    },

    /// A layer to fold a BatchNorm into whose weight does not make sense (its size, rank
    /// or groups).
    #[error("{0}")]
    InvalidLayer(String),

    /// A parameter or running buffer whose length is not the input's channel count.
    #[error("{name} should contain {expected} elements not {got}")]
    FeatureCount {
        /// `running_mean`, `running_var`, `weight` or `bias`.
        name: &'static str,
        /// The input's channel count.
        expected: usize,
        /// The buffer's length.
        got: usize,
    },

    /// An empty input with a weight or bias of no elements: PyTorch computes an empty
    /// input's output as `input * weight[0] + bias[0]`, and index 0 does not exist.
    #[error("select(): index 0 out of range for tensor of size [0] at dimension 0")]
    EmptyParameter {
        /// `weight` or `bias`.
        name: &'static str,
    },

    /// Evaluation with batch statistics needs running statistics to normalise with.
    #[error("{name} must be defined in evaluation mode")]
    MissingRunningStat {
        /// `running_mean` or `running_var`.
        name: &'static str,
    },

    /// Only one of running_mean and running_var was given.
    #[error("running_mean and running_var must either both be None or neither be None")]
    RunningStatsPairing,

    /// eps <= 0 in training.
    #[error("batch_norm eps must be positive during training, but got {eps:?}")]
    EpsNotPositive {
        /// The eps given.
        eps: f64,
    },

    /// eps < 0 in evaluation.
    #[error("batch_norm eps must be non-negative, but got {eps:?}")]
    EpsNegative {
        /// The eps given.
        eps: f64,
    },

    /// Deviation from PyTorch: a NaN or infinite eps or momentum is refused.
    #[error("batch_norm {name} must be finite, but got {value:?}")]
    NonFinite {
        /// `eps` or `momentum`.
        name: &'static str,
        /// The value given.
        value: f64,
    },

    /// An input of rank 0 or 1 given to the functional API, in PyTorch's words for the
    /// step that fails on it: `tuple index out of range` (rank 0 in training: the batch
    /// size check reads `size[0]`), else, once every other check has passed,
    /// `Dimension out of range (expected to be in range of [-1, 0], but got 1)` (rank 1)
    /// or `Dimension specified as 1 but tensor has no dimensions` (rank 0).
    #[error("{message}")]
    InputTooFewDims {
        /// The input's rank, 0 or 1.
        rank: usize,
        /// PyTorch's sentence.
        message: &'static str,
    },

    /// More dimensions than a [`crate::Shape`] holds.
    #[error("inputs of at most {max} dimensions are supported, got size {size:?}")]
    InputTooManyDims {
        /// The most.
        max: usize,
        /// The size given.
        size: Vec<usize>,
    },

    /// Planning or launching kernels for an input with no elements (the public entry
    /// points return before that; only the planner and raw layer can see it).
    #[error("nothing to launch for the empty input size {size:?}")]
    EmptyInput {
        /// The size given.
        size: Vec<usize>,
    },

    /// A size whose element count does not fit in memory addressing.
    #[error("input size {size:?} has more elements than can be addressed")]
    InputTooLarge {
        /// The size given.
        size: Vec<usize>,
    },

    /// A buffer is shorter than its shape requires.
    #[error("{name} holds {got} elements but input size {size:?} needs {needed}")]
    BufferTooShort {
        /// Which argument (`input`, `output`, `grad_output`, `save_mean`, ...).
        name: &'static str,
        /// Elements needed.
        needed: usize,
        /// Elements it holds.
        got: usize,
        /// The input size the need comes from.
        size: Vec<usize>,
    },

    /// Host memory for a new buffer could not be had (the CPU backend's allocations).
    #[error("could not allocate host memory for {len} elements of {elem_bytes} bytes")]
    HostAlloc {
        /// Elements asked for.
        len: usize,
        /// Bytes per element.
        elem_bytes: usize,
    },

    /// A device buffer whose size in bytes cannot be addressed (cudarc would overflow
    /// computing it).
    #[error(
        "cannot allocate a device buffer of {len} elements of {elem_bytes} bytes: \
         more bytes than can be addressed"
    )]
    DeviceAllocTooLarge {
        /// Elements asked for.
        len: usize,
        /// Bytes per element.
        elem_bytes: usize,
    },

    /// A buffer whose byte count cannot be represented (a length reported by a
    /// user's buffer type, times the element size, overflows).
    #[error("{name} of {len} elements of {elem_bytes} bytes has more bytes than can be addressed")]
    BufferTooLarge {
        /// Which argument.
        name: &'static str,
        /// Its length in elements.
        len: usize,
        /// Bytes per element.
        elem_bytes: usize,
    },

    /// [`Backend::copy_from_host`](crate::Backend::copy_from_host) given values of
    /// another length than the buffer's.
    #[error("cannot copy {values} values into a buffer of {buffer} elements")]
    CopyLength {
        /// The buffer's length.
        buffer: usize,
        /// How many values were given.
        values: usize,
    },

    /// `set_weight` / `set_bias` on a module built with `affine: false`.
    #[error("the module has no weight or bias (it was built with affine: false)")]
    NoAffineParameters,

    /// A backward call that lacks the statistics its mode needs.
    #[error("{0}")]
    Backward(&'static str),

    /// SyncBatchNorm given an input without channels.
    #[error("SyncBatchNorm number of input channels should be non-zero")]
    ZeroChannels,

    /// The ranks of a synchronised call disagree (found by the exchange that opens
    /// every checked call), or another rank's call failed its own checks: every rank
    /// gets this error instead of waiting for the others.
    #[error("SyncBatchNorm: {0}")]
    RankMismatch(String),

    /// Communication failed: a collective of [`crate::sync::Collectives`] returned an
    /// error, or NCCL is missing (the message says what to install).
    #[error("communication failed: {0}")]
    Communication(String),

    /// A stats-stage merge given no rank's statistics.
    #[error("batch_norm_gather_stats_with_counts needs the statistics of at least one rank")]
    NoRanks,

    /// A module's backward whose input does not match its last forward.
    #[error(
        "backward got input size {got:?} but the last forward in this mode had size {expected:?}"
    )]
    BackwardShape {
        /// The size of the last forward.
        expected: Vec<usize>,
        /// The size given to backward.
        got: Vec<usize>,
    },

    /// A module's backward after a tensor it reads (weight, running_mean, running_var)
    /// changed since the forward (`weight_mut`, `load_state_dict`), in autograd's
    /// words. (PyTorch adds a hint about its anomaly detection, which has no
    /// counterpart here.)
    #[error(
        "one of the variables needed for gradient computation has been modified by an inplace \
         operation: [{tensor}] is at version {version}; expected version {expected} instead."
    )]
    ModifiedInplace {
        /// The tensor as PyTorch names it, e.g. `torch.FloatTensor [64]`.
        tensor: String,
        /// Its version now.
        version: u64,
        /// Its version at the forward.
        expected: u64,
    },

    /// A kernel family asked for (`Tuning::variant`, bnbench's `--variant`) that cannot
    /// take this call.
    #[error("the {variant} kernels cannot run this call: {reason}")]
    VariantUnavailable {
        /// The family.
        variant: &'static str,
        /// Why.
        reason: String,
    },

    /// A state dict that does not fit the module, in PyTorch's words.
    #[error("Error(s) in loading state_dict for {module}:\n\t{detail}")]
    StateDict {
        /// `BatchNorm1d`, `BatchNorm2d` or `BatchNorm3d`.
        module: &'static str,
        /// What did not fit.
        detail: String,
    },

    /// A `.safetensors` file that cannot be read, parsed or converted, or a tensor the
    /// writer cannot store.
    #[error("{0}")]
    Weights(String),

    /// Another crate's tensor whose memory layout the kernels cannot take.
    #[error("{0}")]
    Layout(String),

    /// libcuda could not be loaded: no NVIDIA driver on this machine.
    #[error(
        "no CUDA driver: libcuda could not be loaded (an NVIDIA driver, 580 or newer, is needed)"
    )]
    NoDriver,

    /// The driver loaded but there is no usable device.
    #[error("no CUDA device: {0}")]
    NoDevice(String),

    /// The crate was built without PTX (no nvcc at build time, or a failed compile).
    #[error("cuda-batchnorm was built without GPU kernels: {0}")]
    PtxUnavailable(&'static str),

    /// The driver refused to load the embedded PTX.
    #[error(
        "the CUDA driver refused the embedded PTX ({}); the PTX is ISA 9.0 from CUDA 13.0 and \
         needs driver 580 or newer (this driver reports CUDA {driver_version}); rebuild with NVCC \
         pointing at an older toolkit for an older driver",
        describe(source)
    )]
    PtxRejected {
        /// The driver's error.
        source: DriverError,
        /// The driver's CUDA version, e.g. `12.8`.
        driver_version: String,
    },

    /// A buffer or stream of another CUDA context than the one the call runs in.
    #[error("{name} belongs to a different CUDA context than the stream the call runs on")]
    ContextMismatch {
        /// Which argument.
        name: &'static str,
    },

    /// The dtype combination has no kernel (for instance f64 parameters with f16 input).
    #[error("no kernel for input {input} with parameters {param}")]
    UnsupportedTypes {
        /// Input dtype name.
        input: &'static str,
        /// Parameter dtype name.
        param: &'static str,
    },

    /// A CUDA driver call failed.
    #[error("CUDA driver error in {op}: {}", describe(source))]
    Driver {
        /// What the crate was doing.
        op: &'static str,
        /// The driver's error.
        source: DriverError,
    },

    /// A kernel launch failed in an executor other than the CUDA driver (the emulator).
    #[error("kernel launch failed: {0}")]
    Launch(String),
}

/// A driver error as `CUDA_ERROR_NAME: the driver's description` (cudarc displays the
/// struct's Debug form).
pub(crate) fn describe(e: &DriverError) -> String {
    match e.error_string() {
        Ok(text) => format!("{:?}: {}", e.0, text.to_string_lossy()),
        Err(_) => format!("{:?}", e.0),
    }
}

/// A cudarc driver call's error, for `?` in code that mixes cudarc's calls
/// (`stream.clone_htod(..)?`) with the crate's.
impl From<DriverError> for BnError {
    fn from(source: DriverError) -> BnError {
        BnError::Driver {
            op: "a CUDA driver call",
            source,
        }
    }
}

impl BnError {
    /// Wraps a driver error with what the crate was doing.
    pub(crate) fn driver(op: &'static str) -> impl FnOnce(DriverError) -> BnError {
        move |source| BnError::Driver { op, source }
    }
}

//! Launch planning: from a shape, its element type and the device's properties to each
//! kernel's grid, block, variant flags and workspace layout.
//!
//! Everything here is a pure function, so the choices are tested without a GPU, and the
//! same plan drives both the CUDA launch and the CPU emulation of the kernels.
//!
//! How work is cut (see `kernels/batchnorm.cu` for the kernels' side):
//!
//! * `nchw` (contiguous, `S > 1`): each channel's `M = N * S` values are cut into
//!   `splits` slices of `chunk` values; one 256-thread block per (channel, slice), so
//!   `grid.x = C * splits`. Slices are whole planes when planes are smaller than a slice.
//!   Threads work on planes in groups of `tile_x` (a power of two from 32 to 256).
//! * `nhwc` (channels-last, or `S == 1`): `R = N * S` rows of `C` channels. A block is
//!   `tile_x` threads across channels (one vector of channels each) by `256 / tile_x`
//!   threads across rows; the grid is `tiles` channel tiles by `splits` row splits.
//!
//! `splits` is chosen so that the grid fills the device (`blocks_per_sm` blocks per
//! multiprocessor) without giving a block less than `min_values_per_block` values, and
//! so that a split never holds more than 2^24 values (the kernels count in f32).

use crate::dtype::{kernel_tag, DType};
use crate::error::{BnError, Result};
use crate::shape::Shape;

/// Threads per block of every kernel (`bn::kBlockThreads` in `kernels/common.cuh`).
pub const BLOCK_THREADS: u32 = 256;

/// Largest number of splits of one channel or channel tile.
pub const MAX_SPLITS: u32 = 1024;

/// Most values one split may hold: counts stay exact in f32.
pub const MAX_SPLIT_VALUES: usize = 1 << 24;

/// Flags of `BnParams::flags` (mirrors `BN_F_*` in `kernels/params.h`).
pub mod flags {
    /// 64-bit index arithmetic.
    pub const INDEX64: u32 = 1 << 0;
    /// 16-byte loads and stores where alignment allows.
    pub const VEC: u32 = 1 << 1;
    /// Normalise with this batch's statistics (else running).
    pub const BATCH_STATS: u32 = 1 << 2;
    /// Fold the batch statistics into running_mean / running_var.
    pub const UPDATE_RUNNING: u32 = 1 << 3;
    /// Eval with precomputed coefficients: `ws_channel` holds `Acc[2C]`, scale then
    /// shift, and `y = x * scale + shift` (`dx = dy * scale`).
    pub const FROZEN: u32 = 1 << 4;
    /// Fused ReLU (baseline family): the forward writes `max(v, 0)` (NaN kept); the
    /// backward zeroes dy where the forward's output (read from `y`) is `<= 0`.
    pub const RELU: u32 = 1 << 5;
    /// Fused residual add (baseline family): the forward adds `z` before the ReLU; the
    /// backward's dx stage writes the (masked) dy to `dz`.
    pub const ADD: u32 = 1 << 6;
}

/// The one argument of every kernel; mirrors `struct BnParams` in `kernels/params.h`
/// field for field (the `bn_selftest_params` kernel checks it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BnParams {
    /// Input `T[N*C*S]`.
    pub x: u64,
    /// Forward output `T[N*C*S]`.
    pub y: u64,
    /// Gradient of the output `T[N*C*S]`.
    pub dy: u64,
    /// Gradient of the input `T[N*C*S]`.
    pub dx: u64,
    /// `P[C]` (0: weight 1).
    pub weight: u64,
    /// `P[C]` (0: bias 0).
    pub bias: u64,
    /// `P[C]`.
    pub running_mean: u64,
    /// `P[C]`.
    pub running_var: u64,
    /// `Acc[C]` batch mean.
    pub save_mean: u64,
    /// `Acc[C]` batch invstd.
    pub save_invstd: u64,
    /// `P[C]`.
    pub grad_weight: u64,
    /// `P[C]`.
    pub grad_bias: u64,
    /// u32 counters, zero between launches.
    pub ws_counters: u64,
    /// Acc[PARTIAL_VALUES * splits * C] per-split partials.
    pub ws_partials: u64,
    /// Acc[CHANNEL_SLOTS * C] per-channel data for the next kernel.
    pub ws_channel: u64,
    /// Residual `T[N*C*S]` added before the ReLU (`flags::ADD`, forward).
    pub z: u64,
    /// Gradient of the residual `T[N*C*S]` (`flags::ADD`, backward).
    pub dz: u64,
    /// Batch size N.
    pub n: i64,
    /// Channels C.
    pub c: i64,
    /// Spatial size S.
    pub s: i64,
    /// Values (nchw) or rows (nhwc) per split.
    pub chunk: i64,
    /// eps.
    pub eps: f64,
    /// Running-average factor.
    pub momentum: f64,
    /// M / (M - 1).
    pub bessel: f64,
    /// `flags::*`.
    pub flags: u32,
    /// Blocks per channel (nchw) or channel tile (nhwc).
    pub splits: u32,
    /// nchw: threads per plane group; nhwc: threads across channels.
    pub tile_x: u32,
    /// Padding to a multiple of 8 bytes.
    pub reserved: u32,
}

impl BnParams {
    /// The struct's bytes, as a kernel parameter buffer.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: BnParams is #[repr(C)], made only of integers and floats, with no
        // padding (every field is 8 bytes, then four 4-byte fields: 24*8 + 4*4 = 208),
        // so all of its bytes are initialised.
        unsafe {
            std::slice::from_raw_parts(
                (self as *const BnParams).cast::<u8>(),
                std::mem::size_of::<BnParams>(),
            )
        }
    }
}

// SAFETY: BnParams is #[repr(C)] plain data that matches the kernels' parameter type.
unsafe impl cudarc::driver::DeviceRepr for BnParams {}

/// The device properties that planning depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Multiprocessors.
    pub sm_count: u32,
    /// Compute capability, e.g. (9, 0).
    pub compute_capability: (u32, u32),
    /// L2 cache bytes.
    pub l2_bytes: u64,
}

impl DeviceInfo {
    /// An H100 SXM's figures, for tests and for planning without a device.
    pub const H100: DeviceInfo = DeviceInfo {
        sm_count: 132,
        compute_capability: (9, 0),
        l2_bytes: 50 << 20,
    };
}

/// Knobs of the planner. The defaults are what the GPU path uses; tests lower them to
/// make small shapes take the multi-block paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// Blocks per multiprocessor the reductions aim for.
    pub blocks_per_sm: u32,
    /// Fewest values a block of a reduction is given.
    pub min_values_per_block: usize,
    /// Always use 64-bit index arithmetic.
    pub force_index64: bool,
    /// Never use 16-byte accesses.
    pub force_scalar: bool,
    /// The kernel family to run; `None` chooses (a tuning table, else the predictions).
    pub variant: Option<Variant>,
    /// Measured choices for this device (`bench/tuning/<gpu>.json`, embedded at build
    /// time and found by device name, or one bnbench just measured), consulted when no
    /// family is forced.
    pub table: Option<&'static TuningTable>,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            blocks_per_sm: 4,
            min_values_per_block: 8192,
            force_index64: false,
            force_scalar: false,
            variant: None,
            table: None,
        }
    }
}

/// What a tuning table's entry was measured on: the op as the planner sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TunedOp {
    /// The forward with batch statistics (training).
    TrainForward,
    /// The forward with running statistics.
    EvalForward,
    /// The backward through batch statistics.
    TrainBackward,
    /// The backward through running statistics.
    EvalBackward,
}

impl TunedOp {
    /// Every op.
    pub const ALL: [TunedOp; 4] = [
        TunedOp::TrainForward,
        TunedOp::EvalForward,
        TunedOp::TrainBackward,
        TunedOp::EvalBackward,
    ];

    /// `train_fwd`, `eval_fwd`, `train_bwd`, `eval_bwd` (the table's spelling).
    pub const fn name(self) -> &'static str {
        match self {
            TunedOp::TrainForward => "train_fwd",
            TunedOp::EvalForward => "eval_fwd",
            TunedOp::TrainBackward => "train_bwd",
            TunedOp::EvalBackward => "eval_bwd",
        }
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Option<TunedOp> {
        TunedOp::ALL.into_iter().find(|o| o.name() == s)
    }
}

/// The bucket of a tensor's size in a tuning table: floor(log2(bytes)).
pub fn bytes_bucket(numel: usize, input: DType) -> u32 {
    let bytes = (numel as u128 * input.size() as u128).max(1);
    127 - bytes.leading_zeros()
}

/// One measured choice: the family that won for an op on tensors of a layout, input
/// type and size bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TuningEntry {
    /// The op.
    pub op: TunedOp,
    /// The kernels' layout.
    pub layout: Layout,
    /// The input type (parameters as the suite has them: f32 for 16-bit inputs).
    pub input: DType,
    /// [`bytes_bucket`] of the tensor.
    pub bytes_log2: u32,
    /// The winner.
    pub variant: Variant,
}

/// The measured choices for one device (format: `bench/tuning/README.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TuningTable {
    /// The device's name as the driver reports it (`NVIDIA H200`).
    pub device: &'static str,
    /// Its compute capability.
    pub compute_capability: (u32, u32),
    /// The entries.
    pub entries: &'static [TuningEntry],
}

impl TuningTable {
    /// A table built at run time (bnbench's, or one a program parses), kept for the
    /// life of the process as the embedded ones are.
    pub fn leak(
        device: String,
        compute_capability: (u32, u32),
        entries: Vec<TuningEntry>,
    ) -> &'static TuningTable {
        Box::leak(Box::new(TuningTable {
            device: Box::leak(device.into_boxed_str()),
            compute_capability,
            entries: Box::leak(entries.into_boxed_slice()),
        }))
    }

    /// The family measured fastest for this op, layout and input type at the size
    /// bucket nearest `bytes_log2` (the smaller bucket on a tie), if any entry has them.
    pub fn choose(
        &self,
        op: TunedOp,
        layout: Layout,
        input: DType,
        bytes_log2: u32,
    ) -> Option<Variant> {
        self.entries
            .iter()
            .filter(|e| e.op == op && e.layout == layout && e.input == input)
            .min_by_key(|e| (e.bytes_log2.abs_diff(bytes_log2), e.bytes_log2))
            .map(|e| e.variant)
    }

    /// The embedded table for a device (by name and compute capability), if one was
    /// committed under bench/tuning/.
    pub fn embedded(device: &str, compute_capability: (u32, u32)) -> Option<&'static TuningTable> {
        EMBEDDED_TABLES
            .iter()
            .find(|t| t.device == device && t.compute_capability == compute_capability)
    }
}

// Defines EMBEDDED_TABLES: the tables of bench/tuning/*.json, read by build.rs.
include!(concat!(env!("OUT_DIR"), "/tuning.rs"));

/// A kernel family: each is a complete set of entry points for the stages it covers,
/// one PTX module per `kernels/<module>.cu`. bnbench times them side by side; the
/// planner chooses among those that can take a call ([`crate::raw::plan_op`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Variant {
    /// The foundation's kernels (batchnorm.cu): every shape, alignment and index width,
    /// variants chosen by runtime flags.
    Baseline,
    /// The streaming rewrite (ilp.cu): 64 bytes in flight per thread, no division per
    /// element, one entry point per case, occupancy-sized grids in whole waves; nchw
    /// needs S a multiple of the vector width, nhwc C one; aligned tensors.
    Ilp,
    /// What vectors cannot take (flat.cu): nchw planes of any size, nhwc with any C, any
    /// alignment; one value per lane with 64 bytes of loads in flight per thread, every
    /// lane busy, otherwise as the ilp family.
    Flat,
    /// One cooperative launch per training forward or backward (persistent.cu), for
    /// tensors whose slabs fit on chip: x (and dy) read once.
    Persistent,
}

impl Variant {
    /// Every family.
    pub const ALL: [Variant; 4] = [
        Variant::Baseline,
        Variant::Ilp,
        Variant::Flat,
        Variant::Persistent,
    ];

    /// `baseline`, `ilp`, `flat`, `persistent`.
    pub const fn name(self) -> &'static str {
        match self {
            Variant::Baseline => "baseline",
            Variant::Ilp => "ilp",
            Variant::Flat => "flat",
            Variant::Persistent => "persistent",
        }
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Option<Variant> {
        Variant::ALL.into_iter().find(|v| v.name() == s)
    }

    /// The kernels/*.cu file (and PTX module) of the family.
    pub const fn module(self) -> &'static str {
        match self {
            Variant::Baseline => "batchnorm",
            Variant::Ilp => "ilp",
            Variant::Flat => "flat",
            Variant::Persistent => "persistent",
        }
    }
}

/// Kernel layouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Layout {
    /// Channel planes of S contiguous values.
    Nchw,
    /// Rows of C contiguous channels.
    Nhwc,
}

impl Layout {
    /// The layout the kernels use for a shape: nhwc whenever the channel is innermost
    /// in memory (channels-last, or S == 1), nchw otherwise.
    pub fn of(shape: &Shape) -> Layout {
        if shape.channel_innermost() {
            Layout::Nhwc
        } else {
            Layout::Nchw
        }
    }

    /// `nchw` / `nhwc`.
    pub const fn name(self) -> &'static str {
        match self {
            Layout::Nchw => "nchw",
            Layout::Nhwc => "nhwc",
        }
    }
}

/// Kernel stages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Batch statistics, finalised in the same launch.
    FwdStats,
    /// The normalisation itself (training and eval).
    FwdNorm,
    /// sum_dy and dotp, grad_weight and grad_bias.
    BwdReduce,
    /// The input gradient (training formula; the baseline's also does eval's).
    BwdDx,
    /// The eval input gradient, `dy * invstd * w` (families other than the baseline).
    BwdDxEval,
    /// Statistics and normalisation in one cooperative launch (persistent).
    FwdFused,
    /// The backward's sums and dx in one cooperative launch (persistent).
    BwdFused,
    /// The stats stage's merge of the ranks' statistics (per channel, any family).
    StatsGather,
    /// Given statistics into the channel data fwd_norm reads (per channel).
    ElemtPrep,
    /// The all-reduced sums and the global count into the channel data bwd_dx reads
    /// (per channel).
    DxPrep,
}

impl Stage {
    /// The baseline's stages (one entry point per stage and layout).
    pub const ALL: [Stage; 4] = [
        Stage::FwdStats,
        Stage::FwdNorm,
        Stage::BwdReduce,
        Stage::BwdDx,
    ];

    /// The per-channel stages of the stats-stage functions (one entry point per type
    /// pair, no layout; in the baseline's module).
    pub const PER_CHANNEL: [Stage; 3] = [Stage::StatsGather, Stage::ElemtPrep, Stage::DxPrep];

    /// Every streaming stage of every family.
    pub const EVERY: [Stage; 7] = [
        Stage::FwdStats,
        Stage::FwdNorm,
        Stage::BwdReduce,
        Stage::BwdDx,
        Stage::BwdDxEval,
        Stage::FwdFused,
        Stage::BwdFused,
    ];

    /// The stage's part of a kernel name.
    pub const fn name(self) -> &'static str {
        match self {
            Stage::FwdStats => "fwd_stats",
            Stage::FwdNorm => "fwd_norm",
            Stage::BwdReduce => "bwd_reduce",
            Stage::BwdDx => "bwd_dx",
            Stage::BwdDxEval => "bwd_dx_eval",
            Stage::FwdFused => "fwd_train",
            Stage::BwdFused => "bwd_train",
            Stage::StatsGather => "stats_gather",
            Stage::ElemtPrep => "elemt_prep",
            Stage::DxPrep => "dx_prep",
        }
    }

    /// Whether the stage runs one thread per channel (a [`channel_launch`]).
    pub const fn per_channel(self) -> bool {
        matches!(self, Stage::StatsGather | Stage::ElemtPrep | Stage::DxPrep)
    }

    /// Whether blocks coordinate through workspace counters (or, fused, through the
    /// grid barrier and the workspace's partials).
    pub const fn reduces(self) -> bool {
        matches!(
            self,
            Stage::FwdStats | Stage::BwdReduce | Stage::FwdFused | Stage::BwdFused
        )
    }
}

/// Identifies one kernel entry point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelId {
    /// Family.
    pub variant: Variant,
    /// 64-bit index arithmetic (an entry point of its own, except in the baseline,
    /// where it is a runtime flag).
    pub index64: bool,
    /// Stage.
    pub stage: Stage,
    /// Layout.
    pub layout: Layout,
    /// Input storage type.
    pub input: DType,
    /// Parameter type.
    pub param: DType,
}

impl KernelId {
    /// The entry point's name: `bn_<stage>_<layout>_<tag>` in the baseline,
    /// `bn_<family>_<stage>_<layout>_<tag>[_i64]` otherwise, `bn_<stage>_<tag>` for a
    /// per-channel stage.
    pub fn name(&self) -> String {
        let tag = kernel_tag(self.input, self.param);
        let (stage, layout) = (self.stage.name(), self.layout.name());
        if self.stage.per_channel() {
            return format!("bn_{stage}_{tag}");
        }
        match self.variant {
            Variant::Baseline => format!("bn_{stage}_{layout}_{tag}"),
            v => format!(
                "bn_{}_{stage}_{layout}_{tag}{}",
                v.name(),
                if self.index64 { "_i64" } else { "" }
            ),
        }
    }
}

/// The per-channel stage `stage` for input and parameter types `types`: its entry point
/// (in the baseline's module) and its launch, one thread per channel in blocks of
/// [`BLOCK_THREADS`].
pub fn channel_launch(
    stage: Stage,
    c: usize,
    types: (DType, DType),
) -> Result<(KernelId, LaunchConfig)> {
    debug_assert!(stage.per_channel());
    let blocks = u32::try_from(c.div_ceil(BLOCK_THREADS as usize).max(1))
        .map_err(|_| BnError::InputTooLarge { size: vec![c] })?;
    let id = KernelId {
        variant: Variant::Baseline,
        index64: false,
        stage,
        layout: Layout::Nchw,
        input: types.0,
        param: types.1,
    };
    let config = LaunchConfig {
        grid: (blocks, 1, 1),
        block: (BLOCK_THREADS, 1, 1),
        shared_bytes: 0,
        cooperative: false,
    };
    Ok((id, config))
}

/// Grid, block and dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchConfig {
    /// Blocks.
    pub grid: (u32, u32, u32),
    /// Threads per block.
    pub block: (u32, u32, u32),
    /// Dynamic shared memory bytes.
    pub shared_bytes: u32,
    /// A cooperative launch (every block resident at once; a grid barrier inside).
    pub cooperative: bool,
}

/// How one stage's launch cuts the work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StagePlan {
    /// Kernel layout.
    pub layout: Layout,
    /// Grid and block.
    pub config: LaunchConfig,
    /// Blocks per channel (nchw) or per channel tile (nhwc).
    pub splits: u32,
    /// Values per split and channel (nchw) or rows per split (nhwc).
    pub chunk: usize,
    /// nchw: threads per plane group; nhwc: threads across channels.
    pub tile_x: u32,
    /// nhwc: channel tiles (grid.x); nchw: channels.
    pub tiles: u32,
    /// 16-byte accesses.
    pub vec: bool,
    /// 64-bit index arithmetic.
    pub index64: bool,
}

impl StagePlan {
    /// The plan's part of `BnParams::flags`.
    pub fn flags(&self) -> u32 {
        (if self.vec { flags::VEC } else { 0 }) | (if self.index64 { flags::INDEX64 } else { 0 })
    }

    /// Coordination counters the stage needs: one per channel (nchw) or tile (nhwc).
    pub fn counters(&self) -> usize {
        self.tiles as usize
    }
}

/// The workspace of one call. Counters live in a buffer of their own, zeroed once when
/// allocated, which the kernels leave zero after every launch and nothing else writes
/// (so one workspace serves calls of any shape). The scratch buffer holds the per-split
/// partials and the per-channel data one kernel leaves for the next; its contents
/// between calls do not matter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct WorkspaceLayout {
    /// u32 counters needed in the counter buffer.
    pub counters: usize,
    /// Byte offset of the partials (accumulator type) in the scratch buffer.
    pub partials: usize,
    /// Number of accumulator values there.
    pub partial_count: usize,
    /// Byte offset of the per-channel data in the scratch buffer.
    pub channel: usize,
    /// Number of accumulator values there.
    pub channel_count: usize,
    /// Scratch bytes.
    pub scratch_bytes: usize,
}

const WS_ALIGN: usize = 256;

/// Accumulator values per split and channel in the partials: a Welford state's count,
/// mean and m2 (the baseline stores two of them, the sums of the backward two).
pub const PARTIAL_VALUES: usize = 3;

/// Accumulator values per channel that one stage leaves for the next in the scratch
/// buffer (`ChannelSlot` in kernels/batchnorm.cu): the shift, the shifted mean and invstd
/// (or the backward's sums), and the staged new running mean and variance.
pub const CHANNEL_SLOTS: usize = 5;

fn align_up(v: usize, a: usize) -> usize {
    v.div_ceil(a) * a
}

/// Alignment facts about the buffers of one call, which decide the vector path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Alignment {
    /// Every tensor buffer (x, y, dy, dx) has the same address modulo 16.
    pub same_misalignment: bool,
    /// Every tensor buffer is 16-byte aligned.
    pub all_aligned: bool,
}

impl Alignment {
    /// Alignment of a set of device addresses (absent ones, 0, are skipped).
    pub fn of(addrs: &[u64]) -> Alignment {
        let mut present = addrs.iter().copied().filter(|&a| a != 0);
        let first = present.clone().next().map(|a| a % 16);
        Alignment {
            same_misalignment: present.clone().all(|a| Some(a % 16) == first),
            all_aligned: present.all(|a| a % 16 == 0),
        }
    }

    /// All 16-byte aligned.
    pub const ALIGNED: Alignment = Alignment {
        same_misalignment: true,
        all_aligned: true,
    };
}

/// Plans one stage for a non-empty shape.
pub fn plan_stage(
    stage: Stage,
    shape: &Shape,
    input: DType,
    align: Alignment,
    dev: &DeviceInfo,
    tuning: &Tuning,
) -> Result<StagePlan> {
    let c = shape.c();
    let per_channel = shape.per_channel();
    if c == 0 || per_channel == 0 {
        return Err(BnError::EmptyInput {
            size: shape.dims().to_vec(),
        });
    }
    let vec_width = 16 / input.size();
    let target_blocks = (dev.sm_count.max(1) as usize) * (tuning.blocks_per_sm.max(1) as usize);
    let too_large = || BnError::InputTooLarge {
        size: shape.dims().to_vec(),
    };
    let min_split = if stage.reduces() {
        tuning.min_values_per_block.max(1)
    } else {
        (tuning.min_values_per_block / 2).max(1)
    };

    let layout = Layout::of(shape);
    let plan = match layout {
        Layout::Nchw => {
            let s = shape.spatial();
            let vec = !tuning.force_scalar && align.same_misalignment;
            let wanted = target_blocks.div_ceil(c);
            let by_work = (per_channel / min_split).max(1);
            let by_count = per_channel.div_ceil(MAX_SPLIT_VALUES);
            let splits = wanted
                .min(by_work)
                .clamp(1, MAX_SPLITS as usize)
                .max(by_count);
            let mut chunk = per_channel.div_ceil(splits);
            chunk = if chunk >= s {
                align_up(chunk, s)
            } else {
                align_up(chunk, vec_width)
            };
            if chunk > MAX_SPLIT_VALUES {
                // whole planes overshot the count limit: cut inside planes instead
                chunk = align_up(per_channel.div_ceil(splits), vec_width).min(MAX_SPLIT_VALUES);
            }
            let splits = per_channel.div_ceil(chunk);
            // Threads per plane group: enough vectors to cover a plane's part of a split.
            let seg = s.min(chunk);
            let seg_units = if vec { seg.div_ceil(vec_width) } else { seg };
            let tile_x = seg_units
                .next_power_of_two()
                .clamp(32, BLOCK_THREADS as usize) as u32;
            let blocks = c
                .checked_mul(splits)
                .filter(|&b| b <= i32::MAX as usize)
                .ok_or_else(too_large)?;
            StagePlan {
                layout,
                config: LaunchConfig {
                    grid: (blocks as u32, 1, 1),
                    block: (BLOCK_THREADS, 1, 1),
                    shared_bytes: 0,
                    cooperative: false,
                },
                splits: u32::try_from(splits).map_err(|_| too_large())?,
                chunk,
                tile_x,
                tiles: u32::try_from(c).map_err(|_| too_large())?,
                vec,
                index64: false,
            }
        }
        Layout::Nhwc => {
            let rows = per_channel;
            let vec = !tuning.force_scalar
                && align.all_aligned
                && c.is_multiple_of(vec_width)
                && vec_width > 1;
            let width = if vec { vec_width } else { 1 };
            let (tile_x, tile_y, tiles) = nhwc_tiles(c.div_ceil(width));
            let tile_x = tile_x as u32;
            let wanted = target_blocks.div_ceil(tiles);
            // a block's rows times its channels should reach min_split values
            let values_per_row = (tile_x as usize * width).min(c);
            let rows_min = min_split.div_ceil(values_per_row).max(tile_y);
            let by_work = (rows / rows_min).max(1);
            let by_count = rows.div_ceil(MAX_SPLIT_VALUES);
            let splits = wanted
                .min(by_work)
                .clamp(1, MAX_SPLITS as usize)
                .max(by_count);
            if splits > 65535 {
                return Err(too_large());
            }
            let chunk = rows.div_ceil(splits);
            let splits = rows.div_ceil(chunk);
            StagePlan {
                layout,
                config: LaunchConfig {
                    grid: (
                        u32::try_from(tiles).map_err(|_| too_large())?,
                        splits as u32,
                        1,
                    ),
                    block: (tile_x, tile_y as u32, 1),
                    shared_bytes: 0,
                    cooperative: false,
                },
                splits: splits as u32,
                chunk,
                tile_x,
                tiles: tiles as u32,
                vec,
                index64: false,
            }
        }
    };
    Ok(StagePlan {
        index64: tuning.force_index64 || needs_index64(shape, &plan),
        ..plan
    })
}

/// The nhwc tiling every family's kernels share: a row's `units` (vectors, or single
/// values, of channels) across tile_x threads, the next power of two up to 32, by
/// tile_y = 256 / tile_x rows. Returns (tile_x, tile_y, tiles).
fn nhwc_tiles(units: usize) -> (usize, usize, usize) {
    let tile_x = units.next_power_of_two().min(32);
    (
        tile_x,
        BLOCK_THREADS as usize / tile_x,
        units.div_ceil(tile_x),
    )
}

/// The number of splits, between `lo` and `hi`, of each of `groups` units of work
/// (channels or channel tiles) of `work` items that fills whole waves of `slots`
/// resident blocks best: the most blocks per slot-wave used, fewer splits on a tie
/// (fewer partials to merge). Splits that round to the same chunk count once.
pub fn wave_splits(groups: usize, work: usize, lo: usize, hi: usize, slots: usize) -> usize {
    let (work, slots) = (work.max(1), slots.max(1));
    let lo = lo.clamp(1, work);
    let hi = hi.clamp(lo, work);
    let mut best = (0.0f64, lo);
    let mut last_chunk = 0;
    for s in lo..=hi {
        let chunk = work.div_ceil(s);
        if chunk == last_chunk {
            continue;
        }
        last_chunk = chunk;
        let blocks = groups.saturating_mul(work.div_ceil(chunk));
        let waves = blocks.div_ceil(slots);
        // share of the slot-waves the grid keeps busy
        let used = blocks as f64 / (waves.max(1) * slots) as f64;
        if used > best.0 + 1e-9 {
            best = (used, s);
        }
    }
    best.1
}

/// Why a kernel family cannot take a call.
fn unavailable(variant: Variant, reason: impl Into<String>) -> BnError {
    BnError::VariantUnavailable {
        variant: variant.name(),
        reason: reason.into(),
    }
}

/// Plans one stage of a streaming family (kernels/ilp.cuh), `resident` its blocks per
/// multiprocessor (from the driver's occupancy calculator), so that the grid fills whole
/// waves of the device: nchw as runs of units of one channel, nhwc as channel tiles. The
/// ilp family's units are 16-byte vectors (S, or C in nhwc, a multiple of the vector
/// width; every tensor 16-byte aligned); the flat family's are single values (any S, C
/// and alignment).
// The eight inputs are the baseline planner's six plus the family and its occupancy.
#[allow(clippy::too_many_arguments)]
pub fn plan_ilp_stage(
    variant: Variant,
    stage: Stage,
    shape: &Shape,
    input: DType,
    align: Alignment,
    dev: &DeviceInfo,
    tuning: &Tuning,
    resident: u32,
) -> Result<StagePlan> {
    let v = variant;
    let (c, per_channel) = (shape.c(), shape.per_channel());
    if c == 0 || per_channel == 0 {
        return Err(BnError::EmptyInput {
            size: shape.dims().to_vec(),
        });
    }
    let (vec_width, max_steps) = match v {
        Variant::Ilp => (16 / input.size(), 4),
        Variant::Flat => (1, 64 / input.size()),
        _ => return Err(unavailable(v, "not a streaming family")),
    };
    if v == Variant::Ilp && (tuning.force_scalar || !align.all_aligned) {
        return Err(unavailable(v, "needs 16-byte aligned tensors"));
    }
    let too_large = || BnError::InputTooLarge {
        size: shape.dims().to_vec(),
    };
    let slots = (dev.sm_count.max(1) as usize) * (resident.max(1) as usize);
    let min_values = if stage.reduces() {
        tuning.min_values_per_block.max(1)
    } else {
        (tuning.min_values_per_block / 2).max(1)
    };
    let layout = Layout::of(shape);
    let plan = match layout {
        Layout::Nchw => {
            let s = shape.spatial();
            if !s.is_multiple_of(vec_width) {
                return Err(unavailable(
                    v,
                    format!("nchw needs planes of a multiple of {vec_width} values, not {s}"),
                ));
            }
            let vectors = per_channel / vec_width;
            let lo = vectors.div_ceil(MAX_SPLIT_VALUES / vec_width);
            let hi = (vectors * vec_width / min_values)
                .min(MAX_SPLITS as usize)
                .max(lo);
            let splits = wave_splits(c, vectors, lo, hi, slots);
            let chunk = vectors.div_ceil(splits);
            let splits = vectors.div_ceil(chunk);
            let blocks = c
                .checked_mul(splits)
                .filter(|&b| b <= i32::MAX as usize)
                .ok_or_else(too_large)?;
            StagePlan {
                layout,
                config: LaunchConfig {
                    grid: (blocks as u32, 1, 1),
                    block: (BLOCK_THREADS, 1, 1),
                    shared_bytes: 0,
                    cooperative: false,
                },
                splits: splits as u32,
                chunk,
                tile_x: BLOCK_THREADS,
                tiles: u32::try_from(c).map_err(|_| too_large())?,
                vec: true,
                index64: false,
            }
        }
        Layout::Nhwc => {
            if !c.is_multiple_of(vec_width) {
                return Err(unavailable(
                    v,
                    format!("nhwc needs C a multiple of {vec_width}, not {c}"),
                ));
            }
            let rows = per_channel;
            let (tile_x, tile_y, tiles) = nhwc_tiles(c / vec_width);
            let rows_min = min_values.div_ceil((tile_x * vec_width).min(c)).max(tile_y);
            let lo = rows.div_ceil(MAX_SPLIT_VALUES);
            let hi = (rows / rows_min).min(MAX_SPLITS as usize).max(lo);
            let splits = wave_splits(tiles, rows, lo, hi, slots);
            let chunk = rows.div_ceil(splits);
            let splits = rows.div_ceil(chunk);
            if splits > 65535 {
                return Err(too_large());
            }
            StagePlan {
                layout,
                config: LaunchConfig {
                    grid: (
                        u32::try_from(tiles).map_err(|_| too_large())?,
                        splits as u32,
                        1,
                    ),
                    block: (tile_x as u32, tile_y as u32, 1),
                    shared_bytes: 0,
                    cooperative: false,
                },
                splits: splits as u32,
                chunk,
                tile_x: tile_x as u32,
                tiles: tiles as u32,
                vec: true,
                index64: false,
            }
        }
    };
    // An nchw walk's element index runs ahead of its last unit by up to one step of
    // max_steps * 256 units, each up to a plane apart.
    let walk_ahead =
        (max_steps as u128 * BLOCK_THREADS as u128 + 1) * (c as u128) * (shape.spatial() as u128);
    let ahead = layout == Layout::Nchw && shape.numel() as u128 + walk_ahead > i32::MAX as u128;
    Ok(StagePlan {
        index64: tuning.force_index64 || ahead || needs_index64(shape, &plan),
        ..plan
    })
}

/// Vector slots per thread and step of the persistent family's fused stages
/// (kernels/persistent.cu `R`): the forward keeps 8 16-byte vectors of x per thread a
/// step, the backward 4 of x and 4 of dy; the first step in registers, each further one
/// in [`PERSISTENT_STEP_BYTES`] of dynamic shared memory per block.
pub const fn persistent_slots(stage: Stage) -> usize {
    match stage {
        Stage::BwdFused => 4,
        _ => 8,
    }
}

/// Dynamic shared memory of one further step of a persistent block's slab (256 threads x
/// 8 vectors of 16 bytes; kernels/persistent.cu `kSlabStepBytes`).
pub const PERSISTENT_STEP_BYTES: u32 = 32 * 1024;

/// Most steps of a persistent block's slab: one in registers and up to seven in shared
/// memory (224 KB, within an H100's 227 KB per block).
pub const PERSISTENT_MAX_STEPS: u32 = 8;

/// Shared memory a block may use without CUDA's opt-in, static and dynamic together.
pub const SHARED_WITHOUT_OPT_IN: u32 = 48 * 1024;

/// At least the static shared memory of a kernel that takes dynamic shared memory (the
/// persistent family; kernels/NOTES.md's table shows each kernel's): the nhwc kernels'
/// row merge holds 256 x (V + 1) x K accumulators (K = 3 forward, 2 backward: 27 KB for
/// the 16-bit forward), the nchw ones a few hundred bytes; 1 KiB more for either.
pub fn static_shared_bound(kernel: &KernelId) -> u32 {
    let merge = if kernel.variant == Variant::Persistent && kernel.layout == Layout::Nhwc {
        let v = 16 / kernel.input.size();
        let k = if kernel.stage == Stage::BwdFused {
            2
        } else {
            3
        };
        BLOCK_THREADS as usize * (v + 1) * k * kernel.input.acc().size()
    } else {
        0
    };
    merge as u32 + 1024
}

/// Dynamic shared memory `kernel` may use where the executor cannot say more: what
/// CUDA allows a block without the opt-in, less the kernel's static shared memory.
pub fn default_dynamic_shared(kernel: &KernelId) -> u32 {
    SHARED_WITHOUT_OPT_IN.saturating_sub(static_shared_bound(kernel))
}

/// Whether the persistent family has kernels for this call at all (before its occupancy
/// is asked for): the fused training stages on aligned tensors whose vectors hold one
/// channel's values (nchw planes, or nhwc rows of channels, a multiple of the width).
pub fn persistent_takes(stage: Stage, shape: &Shape, input: DType, align: Alignment) -> Result<()> {
    let v = Variant::Persistent;
    if !matches!(stage, Stage::FwdFused | Stage::BwdFused) {
        return Err(unavailable(v, "only the fused training stages"));
    }
    let vec_width = 16 / input.size();
    let (what, count) = match Layout::of(shape) {
        Layout::Nchw => ("planes", shape.spatial()),
        Layout::Nhwc => ("channel counts", shape.c()),
    };
    if !align.all_aligned || !count.is_multiple_of(vec_width) {
        return Err(unavailable(
            v,
            format!("needs 16-byte aligned tensors and {what} of a multiple of {vec_width} values"),
        ));
    }
    Ok(())
}

/// Plans a fused stage of the persistent family (kernels/persistent.cu): aligned tensors
/// whose planes (nchw) or channel counts (nhwc) are a multiple of the vector width, each
/// block's split at most `steps` steps of 256 x [`persistent_slots`] vectors, and the whole
/// grid resident at once. A group is a channel (nchw) or a tile of channels (nhwc, as the
/// streaming families cut them); a block a split of a group. The fewest steps whose slabs
/// fit are taken (the first in registers, each further one in [`PERSISTENT_STEP_BYTES`] of
/// dynamic shared memory, within `shared_limit` bytes per block); `resident(bytes)` is the
/// blocks resident per multiprocessor with that much dynamic shared memory, from the
/// driver's occupancy calculator. Then as many splits per group as the device holds, at
/// least enough for the slabs to fit. A tensor whose slabs do not fit on chip is refused
/// (the two-pass families take it).
#[allow(clippy::too_many_arguments)]
pub fn plan_persistent_stage(
    stage: Stage,
    shape: &Shape,
    input: DType,
    align: Alignment,
    dev: &DeviceInfo,
    tuning: &Tuning,
    resident: &mut dyn FnMut(u32) -> Result<u32>,
    shared_limit: u32,
) -> Result<StagePlan> {
    let v = Variant::Persistent;
    let (c, per_channel) = (shape.c(), shape.per_channel());
    if c == 0 || per_channel == 0 {
        return Err(BnError::EmptyInput {
            size: shape.dims().to_vec(),
        });
    }
    persistent_takes(stage, shape, input, align)?;
    let vec_width = 16 / input.size();
    let slots = persistent_slots(stage);
    let layout = Layout::of(shape);
    // (groups, the work of one, units of work a block takes a step, threads across groups)
    let (groups, work, per_step, tile_x) = match layout {
        // a channel of vectors, 256 threads x slots vectors a step
        Layout::Nchw => (
            c,
            per_channel / vec_width,
            BLOCK_THREADS as usize * slots,
            BLOCK_THREADS as usize,
        ),
        // a tile of channels over all rows, 256 / tile_x rows x slots a step
        Layout::Nhwc => {
            let (tile_x, tile_y, tiles) = nhwc_tiles(c / vec_width);
            (tiles, per_channel, tile_y * slots, tile_x)
        }
    };
    let mut tried = None;
    let mut chosen = None;
    for steps in 1..=PERSISTENT_MAX_STEPS {
        let shared = (steps - 1) * PERSISTENT_STEP_BYTES;
        if shared > shared_limit {
            break;
        }
        let capacity = dev.sm_count as usize * resident(shared)? as usize;
        if capacity == 0 {
            break;
        }
        let needed = work.div_ceil(per_step * steps as usize);
        if groups.checked_mul(needed).is_some_and(|b| b <= capacity) {
            chosen = Some((capacity, needed));
            break;
        }
        if tried.is_none_or(|(_, _, most)| capacity >= most) {
            tried = Some((steps, needed, capacity));
        }
        if needed == 1 {
            // one block a group already: more steps only lower the occupancy
            break;
        }
    }
    let unit = match layout {
        Layout::Nchw => "channels",
        Layout::Nhwc => "channel tiles",
    };
    let Some((capacity, needed)) = chosen else {
        let (steps, needed, capacity) = tried.unwrap_or((1, work.div_ceil(per_step), 0));
        return Err(unavailable(
            v,
            format!(
                "the slabs do not fit on chip: {groups} {unit} x {needed} blocks of {steps} steps, {capacity} resident"
            ),
        ));
    };
    // more splits while the grid still fits, but no block with under one unit a thread
    let least = per_step / slots;
    let splits = (capacity / groups).clamp(needed, work.div_ceil(least).max(needed));
    let chunk = work.div_ceil(splits);
    let splits = work.div_ceil(chunk);
    let blocks = groups * splits;
    // the steps the chunk takes: the first in registers, the rest in shared memory
    let steps = chunk.div_ceil(per_step) as u32;
    let (grid, block) = match layout {
        Layout::Nchw => ((blocks as u32, 1, 1), (BLOCK_THREADS, 1, 1)),
        Layout::Nhwc => {
            if splits > 65535 {
                return Err(unavailable(
                    v,
                    format!("{splits} splits a tile, over a grid's 65535"),
                ));
            }
            (
                (groups as u32, splits as u32, 1),
                (tile_x as u32, (BLOCK_THREADS as usize / tile_x) as u32, 1),
            )
        }
    };
    let plan = StagePlan {
        layout,
        config: LaunchConfig {
            grid,
            block,
            shared_bytes: (steps - 1) * PERSISTENT_STEP_BYTES,
            cooperative: true,
        },
        splits: splits as u32,
        chunk,
        tile_x: tile_x as u32,
        tiles: groups as u32,
        vec: true,
        index64: false,
    };
    let ahead = match layout {
        // A thread's walk forms unit positions at most two steps past its block's range
        // (its last advance, and the step's slots chained from it): that many units, in
        // planes of s / vec_width units, past the last plane.
        Layout::Nchw => {
            let s = shape.spatial();
            let planes_ahead = 2 * (per_step / (s / vec_width).max(1)) as u128 + 3;
            planes_ahead * (c as u128) * (s as u128)
        }
        // A thread's rows run at most a step of 256 / tile_x x slots rows past its
        // split's end, its channels at most a tile past C.
        Layout::Nhwc => (per_step as u128 + 1) * (c as u128) + (tile_x * vec_width) as u128,
    };
    let ahead = shape.numel() as u128 + ahead > i32::MAX as u128;
    Ok(StagePlan {
        index64: tuning.force_index64 || ahead || needs_index64(shape, &plan),
        ..plan
    })
}

/// Whether any index the kernels form for this plan can reach 2^31 - 1. Indices stay
/// below numel plus one split plus one block stride, and the workspace indices below
/// PARTIAL_VALUES * splits * C + CHANNEL_SLOTS * C.
fn needs_index64(shape: &Shape, plan: &StagePlan) -> bool {
    let limit = i32::MAX as u128;
    let numel = shape.numel() as u128;
    let headroom = plan.chunk as u128 + 2 * BLOCK_THREADS as u128 * 16;
    let ws = PARTIAL_VALUES as u128 * plan.splits as u128 * shape.c() as u128
        + CHANNEL_SLOTS as u128 * shape.c() as u128;
    numel + headroom > limit || ws > limit
}

/// The workspace layout serving every given stage plan of an op on this shape.
pub fn workspace_layout<'a>(
    plans: impl IntoIterator<Item = &'a StagePlan>,
    c: usize,
    acc: DType,
) -> WorkspaceLayout {
    let (mut counters, mut partial_count) = (0, 0);
    for p in plans.into_iter().filter(|p| p.splits > 1) {
        counters = counters.max(p.counters());
        partial_count = partial_count.max(PARTIAL_VALUES * p.splits as usize * c);
    }
    let channel_count = CHANNEL_SLOTS * c;
    let partials = 0;
    let channel = align_up(partials + acc.size() * partial_count, WS_ALIGN);
    let scratch_bytes = align_up(channel + acc.size() * channel_count, WS_ALIGN);
    WorkspaceLayout {
        counters,
        partials,
        partial_count,
        channel,
        channel_count,
        scratch_bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shape::MemoryFormat;

    fn plan(dims: &[usize], fmt: MemoryFormat, dt: DType) -> StagePlan {
        let shape = Shape::new(dims, fmt).unwrap();
        plan_stage(
            Stage::FwdStats,
            &shape,
            dt,
            Alignment::ALIGNED,
            &DeviceInfo::H100,
            &Tuning::default(),
        )
        .unwrap()
    }

    /// Checks the invariants the kernels assume (see kernels/batchnorm.cu).
    fn check_invariants(dims: &[usize], fmt: MemoryFormat, dt: DType) {
        let shape = Shape::new(dims, fmt).unwrap();
        let p = plan(dims, fmt, dt);
        let (bx, by, bz) = p.config.block;
        assert_eq!(bx * by * bz, BLOCK_THREADS, "{dims:?}");
        let total = shape.per_channel();
        assert!(
            p.chunk * p.splits as usize >= total,
            "{dims:?}: splits cover everything"
        );
        assert!(
            p.chunk * (p.splits as usize - 1) < total,
            "{dims:?}: no split is empty"
        );
        assert!(p.chunk <= MAX_SPLIT_VALUES || p.layout == Layout::Nhwc);
        assert!(p.splits <= MAX_SPLITS.max(total.div_ceil(MAX_SPLIT_VALUES) as u32));
        match p.layout {
            Layout::Nchw => {
                assert_eq!(p.config.grid, (shape.c() as u32 * p.splits, 1, 1));
                assert!(p.tile_x.is_power_of_two() && (32..=256).contains(&p.tile_x));
            }
            Layout::Nhwc => {
                assert!(p.tile_x.is_power_of_two() && p.tile_x <= 32);
                assert_eq!(p.config.grid, (p.tiles, p.splits, 1));
                let width = if p.vec { 16 / dt.size() } else { 1 };
                assert!(p.tiles as usize * p.tile_x as usize * width >= shape.c());
                // rows per split times channels per block: the block's values
                assert!(p.chunk <= MAX_SPLIT_VALUES);
            }
        }
    }

    #[test]
    fn plans_keep_the_kernels_invariants() {
        let shapes: &[&[usize]] = &[
            &[32, 64, 112, 112],
            &[256, 2048, 7, 7],
            &[1, 64, 512, 512],
            &[16, 2, 112, 112, 112],
            &[20, 6, 65536],
            &[64, 1000, 7, 7],
            &[3, 17, 5, 7],
            &[2, 1, 1, 1],
            &[126000, 16],
            &[215857, 64],
            &[2, 2048],
            &[64, 256, 1024],
            &[8, 64, 16, 56, 56],
        ];
        for dims in shapes {
            for fmt in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
                for dt in [DType::F32, DType::F16, DType::F64] {
                    check_invariants(dims, fmt, dt);
                }
            }
        }
    }

    #[test]
    fn small_channel_count_is_split_across_the_device() {
        // 2 channels of 22.5M values each must not run as 2 blocks.
        let p = plan(
            &[16, 2, 112, 112, 112],
            MemoryFormat::Contiguous,
            DType::F32,
        );
        assert!(p.config.grid.0 >= 132, "{p:?}");
        let p = plan(&[126000, 16], MemoryFormat::Contiguous, DType::F32);
        assert_eq!(p.layout, Layout::Nhwc);
        assert!(p.config.grid.0 * p.config.grid.1 >= 132, "{p:?}");
    }

    #[test]
    fn layout_follows_the_channel_position() {
        assert_eq!(
            plan(&[4, 3, 8, 8], MemoryFormat::Contiguous, DType::F32).layout,
            Layout::Nchw
        );
        assert_eq!(
            plan(&[4, 3, 8, 8], MemoryFormat::ChannelsLast, DType::F32).layout,
            Layout::Nhwc
        );
        assert_eq!(
            plan(&[4, 3, 1, 1], MemoryFormat::Contiguous, DType::F32).layout,
            Layout::Nhwc
        );
        assert_eq!(
            plan(&[4, 3], MemoryFormat::Contiguous, DType::F32).layout,
            Layout::Nhwc
        );
    }

    #[test]
    fn vector_path_needs_alignment() {
        let shape = Shape::nhwc(4, 17, 8, 8).unwrap();
        let p = plan_stage(
            Stage::FwdNorm,
            &shape,
            DType::F32,
            Alignment::ALIGNED,
            &DeviceInfo::H100,
            &Tuning::default(),
        )
        .unwrap();
        assert!(!p.vec, "C = 17 is not a multiple of 4");
        let shape = Shape::nhwc(4, 16, 8, 8).unwrap();
        let odd = Alignment::of(&[0x1000, 0x2004]);
        assert!(!odd.same_misalignment && !odd.all_aligned);
        let p = plan_stage(
            Stage::FwdNorm,
            &shape,
            DType::F32,
            odd,
            &DeviceInfo::H100,
            &Tuning::default(),
        )
        .unwrap();
        assert!(!p.vec);
        let shifted = Alignment::of(&[0x1004, 0x2004, 0]);
        assert!(shifted.same_misalignment && !shifted.all_aligned);
        let nchw = Shape::nchw(4, 16, 8, 8).unwrap();
        let p = plan_stage(
            Stage::FwdNorm,
            &nchw,
            DType::F32,
            shifted,
            &DeviceInfo::H100,
            &Tuning::default(),
        )
        .unwrap();
        assert!(
            p.vec,
            "nchw handles a common misalignment with a scalar head"
        );
    }

    #[test]
    fn empty_shapes_are_an_error_not_a_panic() {
        for dims in [&[0usize, 3, 4][..], &[2, 0], &[2, 3, 0, 5]] {
            let shape = Shape::new(dims, MemoryFormat::Contiguous).unwrap();
            let r = plan_stage(
                Stage::FwdStats,
                &shape,
                DType::F32,
                Alignment::ALIGNED,
                &DeviceInfo::H100,
                &Tuning::default(),
            );
            assert!(matches!(r, Err(BnError::EmptyInput { .. })), "{dims:?}");
        }
    }

    #[test]
    fn index_width_follows_the_size() {
        assert!(!plan(&[32, 64, 112, 112], MemoryFormat::Contiguous, DType::F32).index64);
        assert!(plan(&[1, 3, 32768, 32768], MemoryFormat::Contiguous, DType::F16).index64);
        assert!(plan(&[65536, 32768], MemoryFormat::Contiguous, DType::F16).index64);
    }

    #[test]
    fn workspace_parts_do_not_overlap() {
        let shape = Shape::nchw(32, 64, 56, 56).unwrap();
        let plans: Vec<_> = Stage::ALL
            .iter()
            .map(|&s| {
                plan_stage(
                    s,
                    &shape,
                    DType::F32,
                    Alignment::ALIGNED,
                    &DeviceInfo::H100,
                    &Tuning::default(),
                )
                .unwrap()
            })
            .collect();
        let ws = workspace_layout(&plans, 64, DType::F32);
        assert!(ws.partials + 4 * ws.partial_count <= ws.channel);
        assert!(ws.channel + 4 * ws.channel_count <= ws.scratch_bytes);
        assert_eq!(ws.channel % WS_ALIGN, 0);
        assert_eq!(
            ws.counters,
            plans
                .iter()
                .filter(|p| p.splits > 1)
                .map(|p| p.counters())
                .max()
                .unwrap_or(0)
        );
    }

    #[test]
    fn kernel_names_follow_the_convention() {
        let id = KernelId {
            variant: Variant::Baseline,
            index64: false,
            stage: Stage::FwdStats,
            layout: Layout::Nhwc,
            input: DType::F16,
            param: DType::F32,
        };
        assert_eq!(id.name(), "bn_fwd_stats_nhwc_f16_f32");
        // the baseline's index width is a runtime flag, not a name
        let id = KernelId {
            index64: true,
            stage: Stage::BwdDx,
            layout: Layout::Nchw,
            input: DType::BF16,
            param: DType::BF16,
            ..id
        };
        assert_eq!(id.name(), "bn_bwd_dx_nchw_bf16");
        let id = KernelId {
            variant: Variant::Ilp,
            stage: Stage::BwdDxEval,
            ..id
        };
        assert_eq!(id.name(), "bn_ilp_bwd_dx_eval_nchw_bf16_i64");
        let id = KernelId {
            index64: false,
            ..id
        };
        assert_eq!(id.name(), "bn_ilp_bwd_dx_eval_nchw_bf16");
    }

    #[test]
    fn a_tuning_table_answers_with_the_nearest_bucket() {
        let e = |op, bytes_log2, variant| TuningEntry {
            op,
            layout: Layout::Nchw,
            input: DType::F32,
            bytes_log2,
            variant,
        };
        let entries = vec![
            e(TunedOp::TrainForward, 20, Variant::Persistent),
            e(TunedOp::TrainForward, 28, Variant::Ilp),
            e(TunedOp::EvalForward, 28, Variant::Baseline),
        ];
        let t = TuningTable::leak("NVIDIA Test".into(), (9, 0), entries);
        let at = |op, b| t.choose(op, Layout::Nchw, DType::F32, b);
        assert_eq!(at(TunedOp::TrainForward, 19), Some(Variant::Persistent));
        assert_eq!(at(TunedOp::TrainForward, 23), Some(Variant::Persistent));
        // a tie goes to the smaller bucket
        assert_eq!(at(TunedOp::TrainForward, 24), Some(Variant::Persistent));
        assert_eq!(at(TunedOp::TrainForward, 25), Some(Variant::Ilp));
        assert_eq!(at(TunedOp::EvalForward, 5), Some(Variant::Baseline));
        assert_eq!(at(TunedOp::TrainBackward, 28), None);
        assert_eq!(
            t.choose(TunedOp::TrainForward, Layout::Nhwc, DType::F32, 28),
            None
        );
        assert_eq!(bytes_bucket(1 << 20, DType::F32), 22);
        assert_eq!(bytes_bucket(3, DType::F16), 2);
        for op in TunedOp::ALL {
            assert_eq!(TunedOp::parse(op.name()), Some(op));
        }
    }

    #[test]
    fn variant_names_parse_back() {
        for v in Variant::ALL {
            assert_eq!(Variant::parse(v.name()), Some(v));
        }
        assert_eq!(Variant::parse("fast"), None);
    }

    #[test]
    fn wave_splits_fill_whole_waves() {
        // 64 channels on 132 SMs x 4 slots: 528 slots; 8 splits give 512 blocks (97 %),
        // where 9 would give 576 (two waves, 55 %)
        let s = wave_splits(64, 1 << 20, 1, 64, 528);
        let blocks = 64 * s;
        let used = blocks as f64 / (blocks.div_ceil(528) * 528) as f64;
        assert!(used > 0.9, "{s} splits: {used}");
        // bounds are respected
        assert_eq!(wave_splits(1, 100, 7, 7, 528), 7);
        assert!(wave_splits(1000, 10, 1, 10, 4) <= 10);
    }

    #[test]
    fn params_struct_is_208_bytes_without_padding() {
        assert_eq!(std::mem::size_of::<BnParams>(), 208);
        assert_eq!(std::mem::align_of::<BnParams>(), 8);
    }
}

//! The benchmark suite: `bench/suite.toml` read (with the toml crate) and expanded into
//! rows.
//!
//! The file and its expansion rules are documented in its comments;
//! `scripts/torch_baseline.py` reads the same file with Python's `tomllib` and expands it
//! the same way, and a test checks that both list the same rows for every set.

use cuda_batchnorm::{DType, MemoryFormat, Shape};
use serde::Deserialize;

pub use crate::ops::Epi;

/// The suite file, compiled in.
pub const SUITE_TOML: &str = include_str!("../../bench/suite.toml");

/// Set names `--set` accepts.
pub const SET_NAMES: [&str; 6] = ["quick", "resnet50", "bn1d", "hard", "full", "sync"];

/// Set names a group of the suite file may have.
pub const LINE_SETS: [&str; 3] = ["resnet50", "bn1d", "hard"];

/// The SyncBatchNorm set: the resnet50 group's shapes with this batch size (each with
/// its group's layouts and dtypes).
pub const SYNC_BATCH: usize = 32;

/// Set name of rows that come from `--shape`.
pub const CUSTOM_SET: &str = "custom";

/// A timed operation. The first three are the plain BatchNorm calls; the rest are the
/// inference path's (the frozen eval) and the fused epilogues (`relu(bn(x))`,
/// `relu(bn(x) + z)`), each beside our own unfused sequence of the same computation
/// (`*_seq`: the plain call, then a separate ReLU or add-ReLU pass, or for the backward
/// `threshold_backward` then the plain backward), so that a row shows what fusing saves;
/// last SyncBatchNorm's training forward and backward on one rank over NCCL (forced to
/// synchronise), with and without its verifying exchange, beside the plain ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Op {
    /// `functional::batch_norm` in training, running statistics updated, statistics saved.
    #[value(
        name = "train_fwd",
        help = "training forward: batch statistics, running statistics updated, statistics saved"
    )]
    TrainFwd,
    /// `functional::batch_norm_eval`.
    #[value(name = "eval_fwd", help = "eval forward with the running statistics")]
    EvalFwd,
    /// `functional::batch_norm_backward` with the batch statistics.
    #[value(
        name = "backward",
        help = "training backward through the saved statistics: dx, dweight, dbias"
    )]
    Backward,
    /// `functional::batch_norm_frozen`.
    #[value(
        name = "frozen_eval",
        help = "frozen eval: y = x * scale + shift, coefficients precomputed"
    )]
    FrozenEval,
    /// `functional::batch_norm_eval_fused` with ReLU.
    #[value(name = "eval_relu", help = "eval relu(bn(x)), fused")]
    EvalRelu,
    /// The eval forward, then a ReLU pass.
    #[value(
        name = "eval_relu_seq",
        help = "eval relu(bn(x)) as our two ops in sequence"
    )]
    EvalReluSeq,
    /// `functional::batch_norm_eval_fused` with the residual add and ReLU.
    #[value(name = "eval_add_relu", help = "eval relu(bn(x) + z), fused")]
    EvalAddRelu,
    /// The eval forward, then an add-ReLU pass.
    #[value(
        name = "eval_add_relu_seq",
        help = "eval relu(bn(x) + z) as our two ops in sequence"
    )]
    EvalAddReluSeq,
    /// `functional::batch_norm_fused` in training with ReLU.
    #[value(name = "train_fwd_relu", help = "training forward relu(bn(x)), fused")]
    TrainRelu,
    /// The training forward, then a ReLU pass.
    #[value(
        name = "train_fwd_relu_seq",
        help = "training forward relu(bn(x)) as our two ops in sequence"
    )]
    TrainReluSeq,
    /// `functional::batch_norm_fused` in training with the residual add and ReLU.
    #[value(
        name = "train_fwd_add_relu",
        help = "training forward relu(bn(x) + z), fused"
    )]
    TrainAddRelu,
    /// The training forward, then an add-ReLU pass.
    #[value(
        name = "train_fwd_add_relu_seq",
        help = "training forward relu(bn(x) + z) as our two ops in sequence"
    )]
    TrainAddReluSeq,
    /// `functional::batch_norm_backward_fused` of relu(bn(x)).
    #[value(
        name = "backward_relu",
        help = "backward of relu(bn(x)), fused: the mask from y"
    )]
    BackwardRelu,
    /// `functional::batch_norm_backward_fused` of relu(bn(x) + z).
    #[value(
        name = "backward_add_relu",
        help = "backward of relu(bn(x) + z), fused: the mask from y, dz written"
    )]
    BackwardAddRelu,
    /// `threshold_backward`, then the backward (of either epilogue: an add hands its
    /// gradient on as is).
    #[value(
        name = "backward_relu_seq",
        help = "backward of relu(bn(x)) or relu(bn(x) + z) as our two ops in sequence"
    )]
    BackwardReluSeq,
    /// `sync::SyncBatchNorm`'s training forward on one rank over `sync::Nccl`, forced to
    /// synchronise, with the default options (the verifying exchange).
    #[value(
        name = "sync_train_fwd",
        help = "SyncBatchNorm's training forward on one rank over NCCL (forced): verifying exchange, all-gather of the statistics"
    )]
    SyncTrainFwd,
    /// Its backward: the all-reduce of the channel sums.
    #[value(
        name = "sync_backward",
        help = "SyncBatchNorm's backward on one rank over NCCL (forced): verifying exchange, all-reduce of the sums"
    )]
    SyncBackward,
    /// `sync_train_fwd` with `SyncOptions::verify` off: no host synchronisation.
    #[value(
        name = "sync_train_fwd_unverified",
        help = "sync_train_fwd without the verifying exchange (no host synchronisation)"
    )]
    SyncTrainFwdUnverified,
    /// `sync_backward` with `SyncOptions::verify` off.
    #[value(
        name = "sync_backward_unverified",
        help = "sync_backward without the verifying exchange (no host synchronisation)"
    )]
    SyncBackwardUnverified,
}

/// What an op computes: its BatchNorm call and epilogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The training forward.
    Train,
    /// The eval forward.
    Eval,
    /// The frozen eval.
    Frozen,
    /// The training backward.
    Backward,
}

impl Op {
    /// Every op, in the order they run.
    pub const ALL: [Op; 19] = [
        Op::TrainFwd,
        Op::EvalFwd,
        Op::Backward,
        Op::FrozenEval,
        Op::EvalRelu,
        Op::EvalReluSeq,
        Op::EvalAddRelu,
        Op::EvalAddReluSeq,
        Op::TrainRelu,
        Op::TrainReluSeq,
        Op::TrainAddRelu,
        Op::TrainAddReluSeq,
        Op::BackwardRelu,
        Op::BackwardAddRelu,
        Op::BackwardReluSeq,
        Op::SyncTrainFwd,
        Op::SyncBackward,
        Op::SyncTrainFwdUnverified,
        Op::SyncBackwardUnverified,
    ];

    /// The plain ops: what runs without `--op`.
    pub const PLAIN: [Op; 3] = [Op::TrainFwd, Op::EvalFwd, Op::Backward];

    /// The SyncBatchNorm ops: what `--set sync` adds without `--op`.
    pub const SYNC: [Op; 4] = [
        Op::SyncTrainFwd,
        Op::SyncBackward,
        Op::SyncTrainFwdUnverified,
        Op::SyncBackwardUnverified,
    ];

    /// The name used on the command line and in JSON.
    pub const fn name(self) -> &'static str {
        match self {
            Op::TrainFwd => "train_fwd",
            Op::EvalFwd => "eval_fwd",
            Op::Backward => "backward",
            Op::FrozenEval => "frozen_eval",
            Op::EvalRelu => "eval_relu",
            Op::EvalReluSeq => "eval_relu_seq",
            Op::EvalAddRelu => "eval_add_relu",
            Op::EvalAddReluSeq => "eval_add_relu_seq",
            Op::TrainRelu => "train_fwd_relu",
            Op::TrainReluSeq => "train_fwd_relu_seq",
            Op::TrainAddRelu => "train_fwd_add_relu",
            Op::TrainAddReluSeq => "train_fwd_add_relu_seq",
            Op::BackwardRelu => "backward_relu",
            Op::BackwardAddRelu => "backward_add_relu",
            Op::BackwardReluSeq => "backward_relu_seq",
            Op::SyncTrainFwd => "sync_train_fwd",
            Op::SyncBackward => "sync_backward",
            Op::SyncTrainFwdUnverified => "sync_train_fwd_unverified",
            Op::SyncBackwardUnverified => "sync_backward_unverified",
        }
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|o| o.name() == s)
    }

    /// Its BatchNorm call.
    pub const fn kind(self) -> Kind {
        match self {
            Op::TrainFwd
            | Op::TrainRelu
            | Op::TrainReluSeq
            | Op::TrainAddRelu
            | Op::TrainAddReluSeq
            | Op::SyncTrainFwd
            | Op::SyncTrainFwdUnverified => Kind::Train,
            Op::EvalFwd | Op::EvalRelu | Op::EvalReluSeq | Op::EvalAddRelu | Op::EvalAddReluSeq => {
                Kind::Eval
            }
            Op::FrozenEval => Kind::Frozen,
            Op::Backward
            | Op::BackwardRelu
            | Op::BackwardAddRelu
            | Op::BackwardReluSeq
            | Op::SyncBackward
            | Op::SyncBackwardUnverified => Kind::Backward,
        }
    }

    /// Its epilogue, if any (the unfused backward's is ReLU's mask: the add's gradient
    /// is dy itself).
    pub const fn epilogue(self) -> Option<Epi> {
        match self {
            Op::EvalRelu
            | Op::EvalReluSeq
            | Op::TrainRelu
            | Op::TrainReluSeq
            | Op::BackwardRelu
            | Op::BackwardReluSeq => Some(Epi::Relu),
            Op::EvalAddRelu
            | Op::EvalAddReluSeq
            | Op::TrainAddRelu
            | Op::TrainAddReluSeq
            | Op::BackwardAddRelu => Some(Epi::AddRelu),
            Op::TrainFwd | Op::EvalFwd | Op::Backward | Op::FrozenEval => None,
            Op::SyncTrainFwd
            | Op::SyncBackward
            | Op::SyncTrainFwdUnverified
            | Op::SyncBackwardUnverified => None,
        }
    }

    /// Whether it is one of our unfused sequences.
    pub const fn is_sequence(self) -> bool {
        matches!(
            self,
            Op::EvalReluSeq
                | Op::EvalAddReluSeq
                | Op::TrainReluSeq
                | Op::TrainAddReluSeq
                | Op::BackwardReluSeq
        )
    }

    /// For a SyncBatchNorm op, whether it verifies (`SyncOptions::verify`); `None` for
    /// the others.
    pub const fn sync_verify(self) -> Option<bool> {
        match self {
            Op::SyncTrainFwd | Op::SyncBackward => Some(true),
            Op::SyncTrainFwdUnverified | Op::SyncBackwardUnverified => Some(false),
            _ => None,
        }
    }

    /// Whether it is a SyncBatchNorm op.
    pub const fn is_sync(self) -> bool {
        self.sync_verify().is_some()
    }

    /// The plain op a SyncBatchNorm op synchronises (its overhead is measured against
    /// it); `None` for the others.
    pub const fn unsynced(self) -> Option<Op> {
        match (self.sync_verify(), self.kind()) {
            (Some(_), Kind::Train) => Some(Op::TrainFwd),
            (Some(_), _) => Some(Op::Backward),
            (None, _) => None,
        }
    }

    /// Why a forced kernel family (`--variant`) does not run it, if it does not: the
    /// frozen and fused ops and the sequences run the planner's choice, and
    /// SyncBatchNorm plans its stages itself.
    pub const fn auto_only(self) -> Option<&'static str> {
        if self.is_sync() {
            Some(SYNC_AUTO_ONLY)
        } else if self.is_plain() {
            None
        } else {
            Some(FUSED_AUTO_ONLY)
        }
    }

    /// Whether it is one of the three plain ops.
    pub const fn is_plain(self) -> bool {
        matches!(self, Op::TrainFwd | Op::EvalFwd | Op::Backward)
    }

    /// The training forward a backward differentiates through (it makes the saved
    /// statistics and, for an epilogue, the y whose mask the backward recovers).
    pub const fn forward(self) -> Option<Op> {
        match self {
            Op::Backward => Some(Op::TrainFwd),
            Op::BackwardRelu | Op::BackwardReluSeq => Some(Op::TrainRelu),
            Op::BackwardAddRelu => Some(Op::TrainAddRelu),
            Op::SyncBackward => Some(Op::SyncTrainFwd),
            Op::SyncBackwardUnverified => Some(Op::SyncTrainFwdUnverified),
            _ => None,
        }
    }
}

/// Why a frozen or fused op (or our unfused sequence of one) is not run by a forced
/// family: the fused calls run the baseline family's epilogue whatever is asked, and the
/// sequences are timed as the planner chains them.
pub const FUSED_AUTO_ONLY: &str =
    "the frozen and fused ops and their unfused sequences run with the planner's choice only (auto)";

/// Why a SyncBatchNorm op is not run by a forced family.
pub const SYNC_AUTO_ONLY: &str =
    "SyncBatchNorm runs its stages with the planner's choice only (auto)";

/// One shape of the suite file, with its group's lists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    /// Set name.
    pub set: String,
    /// Sizes, PyTorch order.
    pub dims: Vec<usize>,
    /// Layouts, in order.
    pub layouts: Vec<MemoryFormat>,
    /// Dtypes, in order.
    pub dtypes: Vec<DType>,
    /// Rows in the quick set, as (layouts, dtypes); `None` when not quick.
    pub quick: Option<(Vec<MemoryFormat>, Vec<DType>)>,
}

/// One benchmark row: a shape, a layout and a dtype.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    /// The set it came from (`custom` for `--shape`).
    pub set: String,
    /// Sizes, PyTorch order.
    pub dims: Vec<usize>,
    /// Memory format.
    pub layout: MemoryFormat,
    /// Input dtype.
    pub dtype: DType,
}

impl Row {
    /// The row's shape.
    pub fn shape(&self) -> Result<Shape, String> {
        Shape::new(&self.dims, self.layout).map_err(|e| e.to_string())
    }

    /// `32x256x56x56 nchw f32`.
    pub fn label(&self) -> String {
        format!(
            "{} {} {}",
            dims_label(&self.dims),
            self.layout.name(),
            self.dtype.name()
        )
    }

    /// The line `--list` prints (scripts/torch_baseline.py prints the same).
    pub fn list_line(&self) -> String {
        format!(
            "{:<9} {:<20} {:<5} {}",
            self.set,
            dims_label(&self.dims),
            self.layout.name(),
            self.dtype.name()
        )
    }
}

/// `32x256x56x56`.
pub fn dims_label(dims: &[usize]) -> String {
    dims.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("x")
}

/// Parses a comma-separated list of sizes (`--shape 48,96,35,35`) and checks it as
/// [`check_dims`] does.
pub fn parse_dims(s: &str) -> Result<Vec<usize>, String> {
    let dims: Vec<usize> = s
        .split(',')
        .map(|t| {
            let t = t.trim();
            // Digits only (no sign), as scripts/torch_baseline.py accepts.
            t.bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| t.parse::<usize>().ok())
                .flatten()
                .ok_or_else(|| format!("`{s}` is not a comma-separated list of sizes"))
        })
        .collect::<Result<_, _>>()?;
    check_dims(&dims, &format!("shape `{s}`"))?;
    Ok(dims)
}

/// Checks sizes in PyTorch order: rank 2 to 8, no zero size, at least two values per
/// channel, and a tensor the library can describe. `what` names them in the message.
pub fn check_dims(dims: &[usize], what: &str) -> Result<(), String> {
    if dims.len() < 2 {
        return Err(format!(
            "{what} has {} dimension(s); batch norm needs (N, C, ...), at least 2",
            dims.len()
        ));
    }
    if dims.len() > cuda_batchnorm::shape::MAX_DIMS {
        return Err(format!(
            "{what} has more than {} dimensions",
            cuda_batchnorm::shape::MAX_DIMS
        ));
    }
    if dims.contains(&0) {
        return Err(format!(
            "{what} has a zero size; every size must be at least 1"
        ));
    }
    // Saturating: only "fewer than 2" matters here; Shape::new below rejects sizes that
    // overflow.
    let per_channel = dims[2..].iter().fold(dims[0], |m, &d| m.saturating_mul(d));
    if per_channel < 2 {
        return Err(format!(
            "{what} has one value per channel; training needs at least 2"
        ));
    }
    Shape::new(dims, MemoryFormat::Contiguous).map_err(|e| format!("{what}: {e}"))?;
    Ok(())
}

/// Parses a layout name, `nchw` or `nhwc` only.
pub fn parse_layout(s: &str) -> Option<MemoryFormat> {
    match s {
        "nchw" => Some(MemoryFormat::Contiguous),
        "nhwc" => Some(MemoryFormat::ChannelsLast),
        _ => None,
    }
}

/// `bench/suite.toml` as written (see the comments at its top).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SuiteFile {
    group: Vec<GroupFile>,
}

/// One `[[group]]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupFile {
    set: String,
    layouts: Vec<String>,
    dtypes: Vec<String>,
    shapes: Vec<Vec<u64>>,
    #[serde(default)]
    quick: Vec<QuickFile>,
}

/// One entry of a group's `quick`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QuickFile {
    shape: Vec<u64>,
    layouts: Option<Vec<String>>,
    dtypes: Option<Vec<String>>,
}

fn names<T: PartialEq>(
    list: &[String],
    key: &str,
    parse: impl Fn(&str) -> Option<T>,
    valid: &str,
) -> Result<Vec<T>, String> {
    if list.is_empty() {
        return Err(format!("`{key}` is empty"));
    }
    list.iter()
        .map(|t| parse(t).ok_or_else(|| format!("unknown {key} entry `{t}` (expected {valid})")))
        .collect()
}

fn sizes(dims: &[u64]) -> Result<Vec<usize>, String> {
    let d: Vec<usize> = dims
        .iter()
        .map(|&x| usize::try_from(x).map_err(|_| format!("shape {dims:?} has a size too large")))
        .collect::<Result<_, _>>()?;
    check_dims(&d, &format!("shape {dims:?}"))?;
    Ok(d)
}

/// Parses and checks the suite file: one [`Line`] per shape, in file order.
pub fn parse(text: &str) -> Result<Vec<Line>, String> {
    let file: SuiteFile = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut lines = Vec::new();
    for (i, g) in file.group.iter().enumerate() {
        let at = |msg: String| format!("group {} (set `{}`): {msg}", i + 1, g.set);
        if !LINE_SETS.contains(&g.set.as_str()) {
            return Err(at(format!(
                "unknown set (expected {})",
                LINE_SETS.join(", ")
            )));
        }
        let layouts = names(&g.layouts, "layouts", parse_layout, "nchw, nhwc").map_err(at)?;
        let dtypes = names(&g.dtypes, "dtypes", DType::parse, "f32, f16, bf16, f64").map_err(at)?;
        if g.shapes.is_empty() {
            return Err(at("`shapes` is empty".into()));
        }
        let shapes: Vec<Vec<usize>> = g
            .shapes
            .iter()
            .map(|d| sizes(d))
            .collect::<Result<_, _>>()
            .map_err(at)?;
        for (d, raw) in shapes.iter().zip(&g.shapes) {
            if d.len() == 2 && layouts.contains(&MemoryFormat::ChannelsLast) {
                return Err(at(format!(
                    "shape {raw:?} is rank 2, which takes nchw only"
                )));
            }
        }
        let mut quick: Vec<(Vec<usize>, Vec<MemoryFormat>, Vec<DType>)> = Vec::new();
        for q in &g.quick {
            let dims = sizes(&q.shape).map_err(at)?;
            if !shapes.contains(&dims) {
                return Err(at(format!(
                    "quick entry {:?} is not one of the group's shapes",
                    q.shape
                )));
            }
            if quick.iter().any(|(d, _, _)| *d == dims) {
                return Err(at(format!("quick entry {:?} is given twice", q.shape)));
            }
            let ql = match &q.layouts {
                None => layouts.clone(),
                Some(l) => names(l, "layouts", parse_layout, "nchw, nhwc").map_err(at)?,
            };
            let qd = match &q.dtypes {
                None => dtypes.clone(),
                Some(d) => names(d, "dtypes", DType::parse, "f32, f16, bf16, f64").map_err(at)?,
            };
            if ql.iter().any(|l| !layouts.contains(l)) || qd.iter().any(|d| !dtypes.contains(d)) {
                return Err(at(format!(
                    "quick entry {:?} names a layout or dtype the group does not have",
                    q.shape
                )));
            }
            quick.push((dims, ql, qd));
        }
        for dims in shapes {
            let q = quick
                .iter()
                .find(|(d, _, _)| *d == dims)
                .map(|(_, l, d)| (l.clone(), d.clone()));
            lines.push(Line {
                set: g.set.clone(),
                dims,
                layouts: layouts.clone(),
                dtypes: dtypes.clone(),
                quick: q,
            });
        }
    }
    Ok(lines)
}

/// The suite compiled into the binary (an `Err` only if `bench/suite.toml` is broken,
/// which the tests rule out).
pub fn builtin() -> Result<Vec<Line>, String> {
    parse(SUITE_TOML).map_err(|e| format!("bench/suite.toml: {e}"))
}

/// What to run: which sets, which extra shapes, and the command line's overrides.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// Set names (empty: none).
    pub sets: Vec<String>,
    /// `--shape` sizes.
    pub shapes: Vec<Vec<usize>>,
    /// `--layout`, replacing each line's layouts.
    pub layouts: Option<Vec<MemoryFormat>>,
    /// `--dtype`, replacing each line's dtypes.
    pub dtypes: Option<Vec<DType>>,
}

/// Expands the selected lines into rows, in file order, then the `--shape` rows.
pub fn expand(lines: &[Line], sel: &Selection) -> Vec<Row> {
    let mut rows: Vec<Row> = Vec::new();
    let mut push = |set: &str, dims: &[usize], layouts: &[MemoryFormat], dtypes: &[DType]| {
        for &layout in layouts {
            // Rank-2 shapes: channels-last is the same bytes as contiguous.
            let layout = if dims.len() == 2 {
                MemoryFormat::Contiguous
            } else {
                layout
            };
            for &dtype in dtypes {
                if !rows
                    .iter()
                    .any(|r| r.dims == dims && r.layout == layout && r.dtype == dtype)
                {
                    rows.push(Row {
                        set: set.to_string(),
                        dims: dims.to_vec(),
                        layout,
                        dtype,
                    });
                }
            }
        }
    };
    let wants = |name: &str| sel.sets.iter().any(|s| s == name);
    for line in lines {
        let sync =
            wants("sync") && line.set == "resnet50" && line.dims.first() == Some(&SYNC_BATCH);
        let (layouts, dtypes) = if wants("full") || wants(&line.set) || sync {
            (line.layouts.clone(), line.dtypes.clone())
        } else if let (true, Some(q)) = (wants("quick"), &line.quick) {
            q.clone()
        } else {
            continue;
        };
        let layouts = sel.layouts.clone().unwrap_or(layouts);
        let dtypes = sel.dtypes.clone().unwrap_or(dtypes);
        push(&line.set, &line.dims, &layouts, &dtypes);
    }
    let layouts = sel
        .layouts
        .clone()
        .unwrap_or_else(|| vec![MemoryFormat::Contiguous]);
    let dtypes = sel.dtypes.clone().unwrap_or_else(|| vec![DType::F32]);
    for dims in &sel.shapes {
        push(CUSTOM_SET, dims, &layouts, &dtypes);
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(name: &str) -> Vec<Row> {
        expand(
            &builtin().unwrap(),
            &Selection {
                sets: vec![name.into()],
                ..Selection::default()
            },
        )
    }

    fn has(rows: &[Row], dims: &[usize]) -> bool {
        rows.iter().any(|r| r.dims == dims)
    }

    #[test]
    fn row_counts_per_set() {
        assert_eq!(set("resnet50").len(), 12 * 2 * 2 * 3);
        assert_eq!(set("bn1d").len(), 8 * 3 + 2 * 3);
        assert_eq!(set("hard").len(), 6 * 2 * 3 + 3);
        assert_eq!(set("quick").len(), 10);
        assert_eq!(set("full").len(), 144 + 30 + 39);
        // The SyncBatchNorm set: resnet50's batch-32 half.
        let sync = set("sync");
        assert_eq!(sync.len(), 12 * 2 * 3);
        assert!(sync
            .iter()
            .all(|r| r.set == "resnet50" && r.dims[0] == SYNC_BATCH));
        let resnet = set("resnet50");
        assert!(sync.iter().all(|r| resnet.contains(r)));
    }

    #[test]
    fn every_design_shape_is_in_the_suite() {
        let full = set("full");
        let resnet: [(usize, usize); 12] = [
            (64, 112),
            (64, 56),
            (256, 56),
            (128, 56),
            (128, 28),
            (512, 28),
            (256, 28),
            (256, 14),
            (1024, 14),
            (512, 14),
            (512, 7),
            (2048, 7),
        ];
        for n in [32, 256] {
            for (c, hw) in resnet {
                for layout in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
                    for dtype in [DType::F32, DType::F16, DType::BF16] {
                        let dims = vec![n, c, hw, hw];
                        assert!(
                            full.iter().any(|r| r.dims == dims
                                && r.layout == layout
                                && r.dtype == dtype
                                && r.set == "resnet50"),
                            "{dims:?} {layout:?} {dtype:?}"
                        );
                    }
                }
            }
        }
        let bn1d: [&[usize]; 9] = [
            &[256, 4096],
            &[1024, 1024],
            &[4096, 1024],
            &[65536, 512],
            &[126000, 16],
            &[215857, 64],
            &[3136, 256],
            &[2, 2048],
            &[64, 256, 1024],
        ];
        for dims in bn1d {
            assert!(has(&set("bn1d"), dims), "{dims:?}");
        }
        let hard: [&[usize]; 5] = [
            &[16, 2, 112, 112, 112],
            &[20, 6, 65536],
            &[1, 64, 512, 512],
            &[32, 3, 224, 224],
            &[64, 1000, 7, 7],
        ];
        for dims in hard {
            assert!(has(&set("hard"), dims), "{dims:?}");
        }
        assert!(
            set("hard")
                .iter()
                .any(|r| r.dims.len() == 4 && r.dims[1] % 2 == 1 && r.dims[1] > 8),
            "odd C"
        );
        assert!(set("hard")
            .iter()
            .any(|r| r.dims == [8, 64, 16, 56, 56] && r.layout == MemoryFormat::ChannelsLast));
    }

    #[test]
    fn quick_rows_in_file_order() {
        let lines: Vec<String> = set("quick").iter().map(Row::list_line).collect();
        assert_eq!(
            lines,
            [
                "resnet50  32x256x56x56         nchw  f32",
                "resnet50  32x256x56x56         nchw  f16",
                "resnet50  32x256x56x56         nhwc  f32",
                "resnet50  32x256x56x56         nhwc  f16",
                "resnet50  32x2048x7x7          nhwc  f16",
                "bn1d      4096x1024            nchw  f32",
                "bn1d      2x2048               nchw  f32",
                "hard      32x17x56x56          nchw  f32",
                "hard      32x17x56x56          nhwc  f32",
                "hard      8x64x16x56x56        nhwc  f16",
            ]
        );
        // Groups in file order, shapes in order, layouts outer.
        let full = set("full");
        assert_eq!(
            full[0].list_line(),
            "resnet50  32x64x112x112        nchw  f32"
        );
        assert_eq!(
            full[3].list_line(),
            "resnet50  32x64x112x112        nhwc  f32"
        );
        assert_eq!(
            full[6].list_line(),
            "resnet50  32x64x56x56          nchw  f32"
        );
        assert_eq!(
            full[144].list_line(),
            "bn1d      256x4096             nchw  f32"
        );
        assert_eq!(
            full[212].list_line(),
            "hard      8x64x16x56x56        nhwc  bf16"
        );
    }

    #[test]
    fn quick_is_a_subset_of_full() {
        let full = set("full");
        for r in set("quick") {
            assert!(full.contains(&r), "{r:?}");
        }
    }

    #[test]
    fn overrides_replace_the_lines_lists() {
        let sel = Selection {
            sets: vec!["bn1d".into()],
            layouts: Some(vec![MemoryFormat::ChannelsLast]),
            dtypes: Some(vec![DType::F64]),
            ..Selection::default()
        };
        let rows = expand(&builtin().unwrap(), &sel);
        // Rank-2 rows fall back to nchw; the 3-D row takes nhwc.
        assert_eq!(rows.len(), 9);
        assert!(rows.iter().all(|r| r.dtype == DType::F64));
        assert_eq!(
            rows.iter()
                .filter(|r| r.layout == MemoryFormat::ChannelsLast)
                .count(),
            1
        );
    }

    #[test]
    fn custom_shapes_default_to_nchw_f32_and_dedupe() {
        let sel = Selection {
            shapes: vec![vec![48, 96, 35, 35], vec![48, 96, 35, 35], vec![7, 3]],
            ..Selection::default()
        };
        let rows = expand(&builtin().unwrap(), &sel);
        assert_eq!(rows.len(), 2);
        assert_eq!(
            rows[0].list_line(),
            "custom    48x96x35x35          nchw  f32"
        );
        let sel = Selection {
            shapes: vec![vec![7, 3]],
            layouts: Some(vec![MemoryFormat::Contiguous, MemoryFormat::ChannelsLast]),
            ..Selection::default()
        };
        assert_eq!(expand(&builtin().unwrap(), &sel).len(), 1);
    }

    /// A suite file of one group with `body` as its members.
    fn group(body: &str) -> Result<Vec<Line>, String> {
        parse(&format!("[[group]]\n{body}\n"))
    }

    #[test]
    fn bad_groups_are_rejected() {
        let ok = "set = \"hard\"\nlayouts = [\"nchw\", \"nhwc\"]\ndtypes = [\"f32\", \"f16\"]\nshapes = [[2, 3, 4]]";
        let lines = group(&format!(
            "{ok}\nquick = [{{ shape = [2, 3, 4], layouts = [\"nhwc\"], dtypes = [\"f16\"] }}]"
        ))
        .unwrap();
        assert_eq!(
            lines[0].quick,
            Some((vec![MemoryFormat::ChannelsLast], vec![DType::F16]))
        );
        // A quick entry without lists takes all of the group's.
        let lines = group(&format!("{ok}\nquick = [{{ shape = [2, 3, 4] }}]")).unwrap();
        assert_eq!(
            lines[0].quick,
            Some((
                vec![MemoryFormat::Contiguous, MemoryFormat::ChannelsLast],
                vec![DType::F32, DType::F16]
            ))
        );
        assert_eq!(group(ok).unwrap()[0].quick, None);
        assert!(group("shapes = [[2, 3]]")
            .unwrap_err()
            .contains("missing field `set`"));
        let cases: [(&str, &str); 17] = [
            ("set = \"nope\"", "unknown set"),
            ("set = \"quick\"", "unknown set"),
            ("set = \"full\"", "unknown set"),
            ("shapes = [[32]]", "at least 2"),
            ("shapes = [[32, 0]]", "zero size"),
            ("shapes = [[1, 8]]", "one value per channel"),
            ("shapes = [[-1, 8]]", "invalid value"),
            ("shapes = []", "`shapes` is empty"),
            ("shapes = [[32, 64]]", "rank 2, which takes nchw only"),
            ("dtypes = [\"f8\"]", "unknown dtypes entry `f8`"),
            ("layouts = [\"nwhc\"]", "unknown layouts entry `nwhc`"),
            ("layouts = []", "`layouts` is empty"),
            ("fast = true", "unknown field `fast`"),
            (
                "quick = [{ shape = [2, 3, 5] }]",
                "not one of the group's shapes",
            ),
            (
                "quick = [{ shape = [2, 3, 4], dtypes = [\"bf16\"] }]",
                "does not have",
            ),
            (
                "quick = [{ shape = [2, 3, 4], layouts = [] }]",
                "`layouts` is empty",
            ),
            (
                "quick = [{ shape = [2, 3, 4] }, { shape = [2, 3, 4] }]",
                "given twice",
            ),
        ];
        for (change, want) in cases {
            // The change replaces the member of its name, or is added.
            let key = change.split(' ').next().unwrap_or_default();
            let mut body: Vec<&str> = ok
                .lines()
                .filter(|l| !l.starts_with(&format!("{key} ")))
                .collect();
            body.push(change);
            let err = group(&body.join("\n")).unwrap_err();
            assert!(err.contains(want), "{change}: {err}");
        }
        assert!(parse("").unwrap_err().contains("missing field `group`"));
        assert!(parse("[[group]\n").is_err());
    }

    const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/torch_baseline.py");

    /// Whether python3 with tomllib (3.11+) runs here; prints why not when it does not.
    fn python_with_tomllib() -> bool {
        match std::process::Command::new("python3")
            .args(["-c", "import tomllib"])
            .output()
        {
            Ok(o) if o.status.success() => true,
            Ok(_) => {
                eprintln!("skipped: python3 has no tomllib (Python 3.11 or newer needed)");
                false
            }
            Err(e) => {
                eprintln!("skipped: python3 not runnable ({e})");
                false
            }
        }
    }

    /// The script's own checks of its suite reading, flags and JSON (no torch, no GPU).
    #[test]
    fn torch_baseline_self_test_passes() {
        if !python_with_tomllib() {
            return;
        }
        let out = std::process::Command::new("python3")
            .args([SCRIPT, "--self-test"])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.starts_with("self-test ok: 213 suite rows"),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// scripts/torch_baseline.py must list the same rows, in the same order, for the same
    /// flags, for every set (skipped with a note where python3 is missing or older than
    /// 3.11, which has no tomllib).
    #[test]
    fn torch_baseline_lists_the_same_rows() {
        if !python_with_tomllib() {
            return;
        }
        let script = SCRIPT;
        let cases: [&[&str]; 14] = [
            &[],
            &["--set", "quick"],
            &["--set", "sync"],
            &["--set", "sync,resnet50", "--dtype", "f16"],
            &["--set", "resnet50"],
            &["--set", "bn1d"],
            &["--set", "hard"],
            &["--set", "full"],
            &["--set", "quick,bn1d"],
            &["--set", "resnet50", "--layout", "nhwc", "--dtype", "f16"],
            &[
                "--set",
                "bn1d,hard",
                "--dtype",
                "f64,f32",
                "--layout",
                "nhwc,nchw",
            ],
            &[
                "--shape",
                "48,96,35,35",
                "--shape",
                "7,3",
                "--layout",
                "nhwc",
            ],
            &[
                "--set",
                "quick",
                "--shape",
                "32,256,56,56",
                "--dtype",
                "f16,f32",
                "--layout",
                "nchw,nhwc",
            ],
            &["--set", "hard", "--shape", "2,3,4,5,6,7"],
        ];
        for args in cases {
            let out = std::process::Command::new("python3")
                .arg(script)
                .arg("--list")
                .args(args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let o =
                crate::cli::parse(std::iter::once("bnbench").chain(args.iter().copied())).unwrap();
            let ours: String = expand(&builtin().unwrap(), &o.selection)
                .iter()
                .map(|r| r.list_line() + "\n")
                .collect();
            assert_eq!(String::from_utf8_lossy(&out.stdout), ours, "{args:?}");
        }
    }

    #[test]
    fn parse_dims_errors_are_clear() {
        assert_eq!(parse_dims("48,96,35,35").unwrap(), vec![48, 96, 35, 35]);
        assert!(parse_dims("48").unwrap_err().contains("at least 2"));
        assert!(parse_dims("48,x")
            .unwrap_err()
            .contains("not a comma-separated"));
        assert!(parse_dims("1,5,1")
            .unwrap_err()
            .contains("one value per channel"));
        assert!(parse_dims("1,2,3,4,5,6,7,8,9")
            .unwrap_err()
            .contains("more than 8"));
        assert!(parse_dims("99999999999,99999999999,99999999999").is_err());
        // Sizes whose per-channel product overflows even u128 are an error too.
        let max = usize::MAX.to_string();
        let huge = format!("2,2,{max},{max},{max}");
        assert!(parse_dims(&huge)
            .unwrap_err()
            .contains(&format!("shape `{huge}`")));
    }
}

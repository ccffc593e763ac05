//! `--list-kernels`: the PTX entry points the planner picks for the selected rows and ops,
//! on a described device instead of a real one, so it needs no GPU and times nothing
//! (scripts/kernel-report --check reads the list to know which kernels the suite uses).
//!
//! The device is an H100/H200-like `DeviceInfo` (132 SMs, compute capability 9.0)
//! behind a planning-only [`Launcher`] that answers the occupancy question with the
//! baseline's 4 resident blocks and never launches; every buffer is 16-byte aligned.

use std::collections::BTreeSet;

use cuda_batchnorm::launch::{self, Alignment, BnParams, DeviceInfo, KernelId, LaunchConfig};
use cuda_batchnorm::launch::{Stage, Tuning};
use cuda_batchnorm::launch::{TuningTable, Variant};
use cuda_batchnorm::raw::{self, Launcher, Region};
use cuda_batchnorm::{BnError, DType};

use crate::suite::{Kind, Op, Row};
use crate::tuning::choice_name;

/// The device `--list-kernels` plans for.
pub const DEVICE: DeviceInfo = DeviceInfo::H100;

/// A launcher that only plans: [`DEVICE`], 4 resident blocks (the trait's default).
pub struct Planning;

impl Launcher for Planning {
    fn device(&self) -> &DeviceInfo {
        &DEVICE
    }

    fn launch(
        &self,
        _kernel: KernelId,
        _config: &LaunchConfig,
        _params: &BnParams,
        _regions: &[Region],
    ) -> cuda_batchnorm::Result<()> {
        // Never called: planning launches nothing.
        Ok(())
    }
}

/// One planned call of a suite op: the planner's op, whether it carries an epilogue,
/// and its (input, parameter) types.
pub type Call = (raw::Op, bool, (DType, DType));

/// The calls a suite op makes on a row of `dtype`, in order: one, or two for our
/// unfused sequences (whose ReLU pass, and `threshold_backward`, is the frozen kernel
/// with an epilogue; frozen calls run with the (T, T) kernels).
pub fn calls(op: Op, dtype: DType) -> Vec<Call> {
    let train = raw::Op::Forward { batch_stats: true };
    let eval = raw::Op::Forward { batch_stats: false };
    let backward = raw::Op::Backward {
        batch: true,
        reduce: true,
    };
    let frozen_bwd = raw::Op::Backward {
        batch: false,
        reduce: false,
    };
    let (t, own) = (types(dtype), (dtype, dtype));
    let fused = op.epilogue().is_some() && !op.is_sequence();
    let main = match op.kind() {
        Kind::Train => (train, fused, t),
        Kind::Eval => (eval, fused, t),
        Kind::Frozen => (eval, false, own),
        Kind::Backward => (backward, fused, t),
    };
    match (op.is_sequence(), op.kind()) {
        (false, _) => vec![main],
        (true, Kind::Backward) => vec![(frozen_bwd, true, own), main],
        (true, _) => vec![main, (eval, true, own)],
    }
}

/// The per-channel kernels a SyncBatchNorm op runs besides its plan's launches: the
/// merge of the gathered statistics and their hand-over to the normalisation, or the
/// hand-over of the all-reduced sums to dx.
pub fn sync_stages(op: Op) -> &'static [Stage] {
    match (op.is_sync(), op.kind()) {
        (false, _) => &[],
        (true, Kind::Backward) => &[Stage::DxPrep],
        (true, _) => &[Stage::StatsGather, Stage::ElemtPrep],
    }
}

/// The (input, parameter) types a row runs with: f16 and bf16 inputs with f32
/// parameters (the suite's mixed mode), f32 and f64 with their own.
pub fn types(input: DType) -> (DType, DType) {
    match input {
        DType::F16 | DType::BF16 => (input, DType::F32),
        d => (d, d),
    }
}

/// What `--list-kernels` found.
#[derive(Debug, Default, PartialEq)]
pub struct KernelList {
    /// The distinct entry points, sorted.
    pub names: BTreeSet<String>,
    /// A forced family that cannot take a row and op: one line each, for stderr.
    pub unavailable: Vec<String>,
    /// A plan that failed otherwise (a failure): one line each.
    pub errors: Vec<String>,
}

/// Plans every row x op x choice (`None`: the planner's own choice, with `table` if one
/// is given) on [`DEVICE`] and collects the kernels.
pub fn kernels(
    rows: &[Row],
    ops: &[Op],
    choices: &[Option<Variant>],
    table: Option<&'static TuningTable>,
) -> KernelList {
    let mut out = KernelList::default();
    for row in rows {
        let shape = match row.shape() {
            Ok(s) => s,
            Err(e) => {
                out.errors.push(format!("{}: {e}", row.label()));
                continue;
            }
        };
        for &op in ops {
            for &choice in choices {
                let tuning = Tuning {
                    variant: choice,
                    table,
                    ..Tuning::default()
                };
                let what = format!("{} {} {}", op.name(), row.label(), choice_name(choice));
                if let (Some(_), Some(why)) = (choice, op.auto_only()) {
                    out.unavailable.push(format!("{what}: n/a: {why}"));
                    continue;
                }
                for (raw_op, fused, types) in calls(op, row.dtype) {
                    let align = Alignment::ALIGNED;
                    let plan = if op.is_sync() {
                        // SyncBatchNorm runs the stages of a split plan around its
                        // collectives, with the per-channel kernels between them.
                        raw::plan_op_split(raw_op, &shape, types, align, &Planning, &tuning)
                            .and_then(|plan| {
                                let prep = sync_stages(op)
                                    .iter()
                                    .map(|&st| launch::channel_launch(st, shape.c(), types))
                                    .map(|r| r.map(|(id, _)| id.name()))
                                    .collect::<cuda_batchnorm::Result<Vec<_>>>()?;
                                Ok((plan, prep))
                            })
                    } else {
                        raw::plan_op_fused(raw_op, fused, &shape, types, align, &Planning, &tuning)
                            .map(|plan| (plan, Vec::new()))
                    };
                    match plan {
                        Ok((plan, prep)) => out
                            .names
                            .extend(plan.launches.iter().map(|l| l.kernel.name()).chain(prep)),
                        Err(BnError::VariantUnavailable { reason, .. }) => {
                            out.unavailable.push(format!("{what}: n/a: {reason}"))
                        }
                        Err(e) => out.errors.push(format!("{what}: {e}")),
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suite::{builtin, expand, Selection};
    use cuda_batchnorm::MemoryFormat;

    fn rows(sets: &[&str], shapes: &[&[usize]]) -> Vec<Row> {
        expand(
            &builtin().unwrap(),
            &Selection {
                sets: sets.iter().map(|s| s.to_string()).collect(),
                shapes: shapes.iter().map(|s| s.to_vec()).collect(),
                ..Selection::default()
            },
        )
    }

    #[test]
    fn the_quick_set_uses_the_streaming_families() {
        let quick = rows(&["quick"], &[]);
        let k = kernels(&quick, &Op::PLAIN, &[None], None);
        assert!(k.errors.is_empty() && k.unavailable.is_empty(), "{k:?}");
        assert!(k.names.iter().any(|n| n.starts_with("bn_ilp_")), "{k:?}");
        // the predicted order leaves the baseline nothing: flat takes what ilp cannot
        let families = ["bn_ilp_", "bn_flat_", "bn_persistent_"];
        assert!(
            k.names
                .iter()
                .all(|n| families.iter().any(|f| n.starts_with(f))),
            "{k:?}"
        );
        // Mixed types as the suite runs them.
        assert!(k.names.iter().all(|n| !n.contains("f16_f16")), "{k:?}");
        assert!(k.names.iter().any(|n| n.contains("_f16_f32")), "{k:?}");
        // Forcing the baseline: its kernels only, every row taken.
        let base = kernels(&quick, &Op::PLAIN, &[Some(Variant::Baseline)], None);
        assert!(base.unavailable.is_empty() && base.errors.is_empty());
        assert!(
            base.names.iter().all(|n| !n.starts_with("bn_ilp_")),
            "{base:?}"
        );
        // Every baseline stage of the ops: the eval forward needs no statistics kernel,
        // but the training forward does.
        assert!(base.names.iter().any(|n| n.starts_with("bn_bwd_reduce_")));
        assert!(base.names.iter().any(|n| n.starts_with("bn_bwd_dx_")));
        assert!(base.names.iter().any(|n| n.starts_with("bn_fwd_norm_")));
        // Forcing ilp: its kernels only, with the rows it cannot take reported.
        let ilp = kernels(&quick, &Op::PLAIN, &[Some(Variant::Ilp)], None);
        assert!(
            ilp.names.iter().all(|n| n.starts_with("bn_ilp_")),
            "{ilp:?}"
        );
        assert!(!ilp.unavailable.is_empty(), "{ilp:?}");
        assert!(ilp.unavailable.iter().all(|l| l.contains(" ilp: n/a: ")));
        // Both: the union.
        let both = kernels(
            &quick,
            &Op::PLAIN,
            &[Some(Variant::Baseline), Some(Variant::Ilp)],
            None,
        );
        let union: BTreeSet<String> = base.names.union(&ilp.names).cloned().collect();
        assert_eq!(both.names, union);
    }

    #[test]
    fn ops_and_families_pick_their_stages() {
        // 4x8x6x6: planes of 36 values, which ilp takes in nchw.
        let r = rows(&[], &[&[4, 8, 6, 6]]);
        assert_eq!(r[0].layout, MemoryFormat::Contiguous);
        let names = |op, choice| {
            kernels(&r, &[op], &[choice], None)
                .names
                .into_iter()
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(Op::TrainFwd, Some(Variant::Baseline)),
            ["bn_fwd_norm_nchw_f32", "bn_fwd_stats_nchw_f32"]
        );
        assert_eq!(
            names(Op::EvalFwd, Some(Variant::Baseline)),
            ["bn_fwd_norm_nchw_f32"]
        );
        assert_eq!(
            names(Op::Backward, Some(Variant::Ilp)),
            ["bn_ilp_bwd_dx_nchw_f32", "bn_ilp_bwd_reduce_nchw_f32"]
        );
        // flat takes every call; persistent only the training ones it fuses.
        let flat = kernels(&r, &Op::PLAIN, &[Some(Variant::Flat)], None);
        assert!(flat.unavailable.is_empty(), "{flat:?}");
        assert_eq!(flat.names.len(), 4, "{flat:?}");
        let fused = kernels(&r, &Op::PLAIN, &[Some(Variant::Persistent)], None);
        assert_eq!(
            fused.names.iter().cloned().collect::<Vec<_>>(),
            [
                "bn_persistent_bwd_train_nchw_f32",
                "bn_persistent_fwd_train_nchw_f32"
            ]
        );
        assert_eq!(fused.unavailable.len(), 1, "{fused:?}");
        // 3x17x5: planes of 5 values, which ilp cannot take: n/a with the reason.
        let odd = rows(&[], &[&[3, 17, 5]]);
        let k = kernels(&odd, &[Op::TrainFwd], &[Some(Variant::Ilp)], None);
        assert!(k.names.is_empty());
        assert_eq!(
            k.unavailable,
            ["train_fwd 3x17x5 nchw f32 ilp: n/a: nchw needs planes of a multiple of 4 values, not 5"]
        );
    }

    #[test]
    fn a_table_steers_the_planners_choice() {
        use cuda_batchnorm::launch::{bytes_bucket, Layout, TunedOp, TuningEntry};
        let r = rows(&[], &[&[4, 8, 6, 6]]);
        let auto = kernels(&r, &[Op::EvalFwd], &[None], None);
        assert_eq!(
            auto.names.into_iter().collect::<Vec<_>>(),
            ["bn_ilp_fwd_norm_nchw_f32"]
        );
        let table = TuningTable::leak(
            "NVIDIA Test".into(),
            (9, 0),
            vec![TuningEntry {
                op: TunedOp::EvalForward,
                layout: Layout::Nchw,
                input: DType::F32,
                bytes_log2: bytes_bucket(4 * 8 * 36, DType::F32),
                variant: Variant::Baseline,
            }],
        );
        let tuned = kernels(&r, &[Op::EvalFwd], &[None], Some(table));
        assert_eq!(
            tuned.names.into_iter().collect::<Vec<_>>(),
            ["bn_fwd_norm_nchw_f32"]
        );
    }

    #[test]
    fn fused_ops_plan_the_baseline_and_sequences_chain_two_calls() {
        let r = rows(&[], &[&[4, 8, 6, 6]]);
        let names = |op| {
            let k = kernels(&r, &[op], &[None], None);
            assert!(k.errors.is_empty() && k.unavailable.is_empty(), "{k:?}");
            k.names.into_iter().collect::<Vec<_>>()
        };
        // The epilogue runs in the baseline family only.
        assert_eq!(names(Op::EvalRelu), ["bn_fwd_norm_nchw_f32"]);
        assert_eq!(
            names(Op::TrainAddRelu),
            ["bn_fwd_norm_nchw_f32", "bn_fwd_stats_nchw_f32"]
        );
        assert_eq!(
            names(Op::BackwardRelu),
            ["bn_bwd_dx_nchw_f32", "bn_bwd_reduce_nchw_f32"]
        );
        // A sequence: the planner's plain call and the frozen pass with the epilogue.
        let seq = names(Op::EvalAddReluSeq);
        assert!(seq.contains(&"bn_fwd_norm_nchw_f32".to_string()), "{seq:?}");
        assert!(seq.iter().any(|n| n.starts_with("bn_ilp_")), "{seq:?}");
        let bwd = names(Op::BackwardReluSeq);
        assert!(bwd.contains(&"bn_bwd_dx_nchw_f32".to_string()), "{bwd:?}");
        assert!(bwd.len() >= 2 && bwd != names(Op::BackwardRelu), "{bwd:?}");
        // The frozen eval is one streaming pass.
        assert_eq!(names(Op::FrozenEval).len(), 1);
        // SyncBatchNorm: the split plan's stages and the per-channel kernels.
        assert_eq!(
            names(Op::SyncTrainFwd),
            [
                "bn_elemt_prep_f32",
                "bn_ilp_fwd_norm_nchw_f32",
                "bn_ilp_fwd_stats_nchw_f32",
                "bn_stats_gather_f32"
            ]
        );
        assert_eq!(names(Op::SyncTrainFwdUnverified), names(Op::SyncTrainFwd));
        let bwd = names(Op::SyncBackward);
        assert!(bwd.contains(&"bn_dx_prep_f32".to_string()), "{bwd:?}");
        assert!(bwd.iter().all(|n| !n.contains("persistent")), "{bwd:?}");
        // Forcing a family: n/a for every non-plain op, as the GPU run reports it.
        let fused: Vec<Op> = Op::ALL.into_iter().filter(|o| !o.is_plain()).collect();
        let k = kernels(&r, &fused, &[Some(Variant::Baseline)], None);
        assert!(k.names.is_empty(), "{k:?}");
        assert_eq!(k.unavailable.len(), fused.len(), "{k:?}");
        assert!(k.unavailable.iter().all(|l| {
            l.ends_with(crate::suite::FUSED_AUTO_ONLY) || l.ends_with(crate::suite::SYNC_AUTO_ONLY)
        }));
    }
}

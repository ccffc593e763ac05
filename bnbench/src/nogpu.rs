//! A run without a GPU: nothing is timed on hardware, so the selected rows and ops are
//! checked instead, on the CPU backend against the f64 reference (with the backward also
//! against finite differences) and, where the emulated CUDA driver is available, on the
//! kernels themselves through it (`crate::emulated`). Rows too large for a quick check
//! are checked at a reduced size ([`check::reduced_dims`]), and the tables say which.

use cuda_batchnorm::launch::Variant;
use cuda_batchnorm::{DType, Shape};

use crate::check::{self, Check, CheckRecord};
use crate::report::Report;
use crate::suite::{dims_label, Op, Row};
use crate::table;

/// Largest tensor the CPU check takes at its own size, in elements.
pub const CPU_MAX_NUMEL: usize = 1 << 20;
/// Most channels of a CPU check.
pub const CPU_MAX_C: usize = 1 << 16;
/// Largest tensor the emulated kernels are checked on, in elements: the emulator runs
/// every CUDA thread as a fiber, so this keeps a row to a fraction of a second.
pub const EMU_MAX_NUMEL: usize = 4096;
/// Most channels of an emulated check.
pub const EMU_MAX_C: usize = 32;
/// Largest tensor of the finite-difference check (two forwards per element).
pub const FD_MAX_NUMEL: usize = 60;
/// Most channels of the finite-difference check.
pub const FD_MAX_C: usize = 3;

/// Why the CPU check has nothing to say about an unfused sequence.
pub const SEQUENCE_ON_CPU: &str = "a sequence of kernels: on the CPU it is its fused op";

/// Why the CPU check has nothing to say about a SyncBatchNorm op.
pub const SYNC_ON_CPU: &str =
    "SyncBatchNorm runs on CUDA devices (the emulated driver's check runs it over the emulated NCCL)";

/// Backend names in [`CheckRecord::backend`].
pub const CPU: &str = "cpu";
/// The finite-difference check of the CPU backend's backward.
pub const FINITE_DIFFERENCES: &str = "cpu-finite-differences";
/// The kernels under the emulated CUDA driver.
pub const EMULATED: &str = "emulated";

/// How the check of the kernels under the emulated driver went.
#[derive(Debug)]
#[cfg_attr(not(feature = "emulated"), allow(dead_code))]
pub enum EmulatedOutcome {
    /// It ran; these are its checks.
    Checked(Vec<CheckRecord>),
    /// It could not run here (a build without the `emulated` feature or without PTX, no
    /// emulated driver on this platform, a child process that could not start): why.
    Unavailable(String),
    /// It started but ended without an answer (a crash in the emulator, say): a failure.
    Failed(String),
}

/// Why the kernels cannot be checked under the emulated driver here, if they cannot.
pub fn emulated_unavailable() -> Option<String> {
    #[cfg(feature = "emulated")]
    return crate::emulated::unavailable();
    #[cfg(not(feature = "emulated"))]
    return Some("bnbench was built without its `emulated` feature".into());
}

/// Checks `rows` x `ops` on the kernels under the emulated driver, each at
/// [`emulated_dims`], by every family of `variants` (`--variant`'s list; empty: the
/// planner's choice, recorded without a variant), planned with the tuning table of
/// `tuning_in` (a `--tuning-in` file's text) when given.
pub fn emulated_records(
    rows: &[Row],
    ops: &[Op],
    variants: &[Option<Variant>],
    tuning_in: Option<&str>,
    seed: u64,
) -> EmulatedOutcome {
    #[cfg(feature = "emulated")]
    return crate::emulated::check(rows, ops, variants, tuning_in, seed);
    #[cfg(not(feature = "emulated"))]
    {
        let _ = (rows, ops, variants, tuning_in, seed);
        EmulatedOutcome::Unavailable("bnbench was built without its `emulated` feature".into())
    }
}

/// Checks `rows` x `ops` on the CPU backend, and the backward (when in `ops`) against
/// finite differences.
pub fn cpu_records(rows: &[Row], ops: &[Op], seed: u64) -> Vec<CheckRecord> {
    let mut out = Vec::new();
    for row in rows {
        let dims = check::reduced_dims(&row.dims, CPU_MAX_NUMEL, CPU_MAX_C);
        let tol = check::tolerance(row.dtype);
        // Our unfused sequences chain kernels: on the CPU they are the fused op's
        // computation, checked as that op.
        for &op in ops.iter().filter(|o| o.is_sequence() || o.is_sync()) {
            let why = if op.is_sync() {
                SYNC_ON_CPU
            } else {
                SEQUENCE_ON_CPU
            };
            out.push(CheckRecord::unavailable(CPU, row, &dims, op, why, tol));
        }
        let outcome = Shape::new(&dims, row.layout)
            .map_err(|e| e.to_string())
            .and_then(|shape| check::cpu_check(&shape, row.dtype, ops, seed));
        match outcome {
            Ok(checks) => out.extend(
                checks
                    .iter()
                    .map(|(op, c)| CheckRecord::new(CPU, row, &dims, *op, Ok(c), tol)),
            ),
            Err(e) => out.extend(
                ops.iter()
                    .map(|&op| CheckRecord::new(CPU, row, &dims, op, Err(&e), tol)),
            ),
        }
        if ops.contains(&Op::Backward) {
            let fd_dims = check::reduced_dims(&row.dims, FD_MAX_NUMEL, FD_MAX_C);
            let fd_row = Row {
                dtype: DType::F64,
                ..row.clone()
            };
            let fd = Shape::new(&fd_dims, row.layout)
                .map_err(|e| e.to_string())
                .and_then(|s| check::finite_difference(&s, seed))
                .map(|err| Check {
                    max_rel_err: err,
                    tol: check::FD_TOL,
                    worst: "dx, grad_weight, grad_bias",
                });
            out.push(CheckRecord::new(
                FINITE_DIFFERENCES,
                &fd_row,
                &fd_dims,
                Op::Backward,
                fd.as_ref().map_err(String::as_str),
                check::FD_TOL,
            ));
        }
    }
    out
}

/// The sizes the emulated kernels are checked at for `row`.
#[cfg_attr(not(feature = "emulated"), allow(dead_code))]
pub fn emulated_dims(row: &Row) -> Vec<usize> {
    check::reduced_dims(&row.dims, EMU_MAX_NUMEL, EMU_MAX_C)
}

fn cell(r: Option<&CheckRecord>) -> String {
    match r {
        None => "-".into(),
        Some(r) if r.is_unavailable() => "n/a".into(),
        Some(r) if r.error.is_some() => "error".into(),
        Some(r) => r
            .max_rel_err
            .map_or("non-finite".into(), |e| format!("{e:.1e}")),
    }
}

/// The table of one backend's records (with the finite differences beside the CPU's),
/// one line per row, then a line per error.
pub fn table(records: &[CheckRecord], backend: &str, ops: &[Op]) -> String {
    let mine: Vec<&CheckRecord> = records.iter().filter(|r| r.backend == backend).collect();
    let fd: Vec<&CheckRecord> = records
        .iter()
        .filter(|r| backend == CPU && r.backend == FINITE_DIFFERENCES)
        .collect();
    let with_variant = mine.iter().any(|r| r.variant.is_some());
    let mut header = vec!["shape", "layout", "dtype"];
    if with_variant {
        header.push("variant");
    }
    header.push("checked at");
    let first_op = header.len();
    header.extend(ops.iter().map(|o| o.name()));
    header.push("tol");
    if !fd.is_empty() {
        header.push("finite diff");
    }
    header.push("check");
    let right: Vec<usize> = (first_op..header.len() - 1).collect();
    let mut t = table::new(&header, &right);
    type Key<'a> = (&'a Vec<usize>, &'a str, &'a str, Option<&'a str>);
    let mut rows: Vec<Key> = Vec::new();
    for r in &mine {
        let key = (
            &r.shape,
            r.layout.as_str(),
            r.dtype.as_str(),
            r.variant.as_deref(),
        );
        if !rows.contains(&key) {
            rows.push(key);
        }
    }
    let mut errors = String::new();
    type NotApplicable = ((String, String, String), Vec<String>);
    let mut na: Vec<NotApplicable> = Vec::new();
    for (shape, layout, dtype, variant) in rows {
        let of_row = |r: &&&CheckRecord| &r.shape == shape && r.layout == layout;
        let ours: Vec<&CheckRecord> = mine
            .iter()
            .filter(of_row)
            .filter(|r| r.dtype == dtype && r.variant.as_deref() == variant)
            .copied()
            .collect();
        let fd_rec = fd.iter().find(of_row).copied();
        let checked = ours.first().map_or(shape, |r| &r.checked_shape);
        let at = if checked == shape {
            "same".to_string()
        } else {
            dims_label(checked)
        };
        let mut cells = vec![dims_label(shape), layout.into(), dtype.into()];
        if with_variant {
            cells.push(variant.unwrap_or("-").into());
        }
        cells.push(at);
        for op in ops {
            cells.push(cell(ours.iter().find(|r| r.op == op.name()).copied()));
        }
        cells.push(
            ours.first()
                .map_or("-".into(), |r| format!("{:.0e}", r.tol)),
        );
        if !fd.is_empty() {
            cells.push(match fd_rec {
                Some(r) => format!("{} at {}", cell(Some(r)), dims_label(&r.checked_shape)),
                None => "-".into(),
            });
        }
        let ok = ours.iter().chain(fd_rec.as_ref()).all(|r| r.passed());
        let all_na = !ours.is_empty() && ours.iter().all(|r| r.is_unavailable());
        cells.push(
            if all_na {
                "n/a"
            } else if ok {
                "ok"
            } else {
                "FAILED"
            }
            .into(),
        );
        t.add_row(cells);
        for r in ours.iter().chain(fd_rec.as_ref()) {
            if let Some(e) = &r.error {
                let v = r
                    .variant
                    .as_ref()
                    .map_or(String::new(), |v| format!(" {v}"));
                let label = format!("{} {} {}", dims_label(shape), layout, r.dtype);
                if r.is_unavailable() {
                    let what = (r.op.clone(), v, e.clone());
                    match na.iter_mut().find(|(w, _)| *w == what) {
                        Some((_, rows)) => rows.push(label),
                        None => na.push((what, vec![label])),
                    }
                } else {
                    errors.push_str(&format!("error: {} {label}{v}: {e}\n", r.op));
                }
            }
        }
    }
    // One line per op and reason of the n/a cells (a reason is often every row's).
    for ((op, v, why), rows) in na {
        errors.push_str(&match rows.as_slice() {
            [one] => format!("n/a: {op} {one}{v}: {why}\n"),
            _ => format!("n/a: {op}{v} ({} rows): {why}\n", rows.len()),
        });
    }
    table::render(&t) + &errors
}

/// `ok (30 checks)` or `FAILED (2 of 30 checks)` (with `, 4 n/a` where forced families
/// could not take calls, which are not checks), and whether every check passed.
pub fn summary(records: &[CheckRecord], backends: &[&str]) -> (String, bool) {
    let mine: Vec<&CheckRecord> = records
        .iter()
        .filter(|r| backends.contains(&r.backend.as_str()))
        .collect();
    let na = mine.iter().filter(|r| r.is_unavailable()).count();
    let checks = mine.len() - na;
    let na = if na > 0 {
        format!(", {na} n/a")
    } else {
        String::new()
    };
    let failed = mine.iter().filter(|r| !r.passed()).count();
    if failed == 0 {
        (format!("ok ({checks} checks{na})"), true)
    } else {
        (format!("FAILED ({failed} of {checks} checks{na})"), false)
    }
}

/// The JSON of a run without a GPU: the standard members (device `none`, no rows), marked
/// `timed_on_hardware: false`, with why and every check made.
pub fn report(why: &str, seed: u64, records: &[CheckRecord]) -> Result<Report, String> {
    let checks = serde_json::to_value(records).map_err(|e| e.to_string())?;
    Ok(Report {
        device: "none".into(),
        driver: cuda_batchnorm::driver_version()
            .map_or_else(|| "none".into(), |v| format!("CUDA {v}")),
        date: crate::report::today(),
        copy_gbps: 0.0,
        extra: serde_json::Map::from_iter([
            ("tool".to_string(), "bnbench".into()),
            ("timed_on_hardware".into(), false.into()),
            ("no_gpu".into(), why.into()),
            ("seed".into(), seed.into()),
            ("checks".into(), checks),
        ]),
        rows: Vec::new(),
        errors: Vec::new(),
        unavailable: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suite::{expand, Selection};
    use cuda_batchnorm::MemoryFormat;

    fn rows(shapes: &[&[usize]], layouts: &[MemoryFormat], dtypes: &[DType]) -> Vec<Row> {
        expand(
            &[],
            &Selection {
                sets: Vec::new(),
                shapes: shapes.iter().map(|s| s.to_vec()).collect(),
                layouts: Some(layouts.to_vec()),
                dtypes: Some(dtypes.to_vec()),
            },
        )
    }

    const ALL_DTYPES: [DType; 4] = [DType::F32, DType::F16, DType::BF16, DType::F64];
    const BOTH: [MemoryFormat; 2] = [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast];

    #[test]
    fn cpu_backend_passes_on_the_rows_given() {
        // The shapes of the former fixed self-check: all four dtypes, both layouts.
        let rows = rows(
            &[&[4, 3, 5, 7], &[3, 10, 2, 3, 2], &[16, 6]],
            &BOTH,
            &ALL_DTYPES,
        );
        assert_eq!(rows.len(), 2 * 4 * 2 + 4);
        let recs = cpu_records(&rows, &Op::PLAIN, 42);
        assert_eq!(recs.len(), rows.len() * 4);
        assert!(recs.iter().all(CheckRecord::passed), "{recs:#?}");
        assert!(recs
            .iter()
            .all(|r| r.checked_shape == r.shape || r.backend == FINITE_DIFFERENCES));
        let text = table(&recs, CPU, &Op::PLAIN);
        assert_eq!(text.lines().count(), 2 + rows.len(), "{text}");
        assert_eq!(text.matches(" ok\n").count(), rows.len(), "{text}");
        assert!(text.contains("finite diff"), "{text}");
        let (line, ok) = summary(&recs, &[CPU, FINITE_DIFFERENCES]);
        assert!(ok);
        assert_eq!(line, format!("ok ({} checks)", rows.len() * 4));
    }

    #[test]
    fn only_the_selected_ops_and_large_rows_reduced() {
        let rows = rows(
            &[&[32, 256, 56, 56]],
            &[MemoryFormat::ChannelsLast],
            &[DType::F16],
        );
        let recs = cpu_records(&rows, &[Op::EvalFwd], 7);
        assert_eq!(recs.len(), 1, "{recs:#?}");
        let r = &recs[0];
        assert_eq!((r.op.as_str(), r.backend.as_str()), ("eval_fwd", CPU));
        assert_eq!(r.shape, [32, 256, 56, 56]);
        assert_eq!(r.checked_shape, [16, 256, 14, 14]);
        assert!(r.passed(), "{r:?}");
        let text = table(&recs, CPU, &[Op::EvalFwd]);
        assert!(text.contains("16x256x14x14"), "{text}");
        assert!(
            !text.contains("train_fwd") && !text.contains("finite"),
            "{text}"
        );
        // The backward alone: its check and the finite differences, at a tiny size.
        let recs = cpu_records(&rows, &[Op::Backward], 7);
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[1].backend, FINITE_DIFFERENCES);
        assert_eq!(recs[1].dtype, "f64");
        assert!(recs[1].checked_shape.iter().product::<usize>() <= FD_MAX_NUMEL);
        assert!(recs.iter().all(CheckRecord::passed), "{recs:#?}");
    }

    #[test]
    fn the_frozen_and_fused_ops_are_checked_on_the_cpu_and_sequences_and_sync_are_not() {
        let rows = rows(&[&[4, 3, 5, 7], &[16, 6]], &BOTH, &ALL_DTYPES);
        let recs = cpu_records(&rows, &Op::ALL, 3);
        assert!(recs.iter().all(CheckRecord::passed), "{recs:#?}");
        let seqs = Op::ALL
            .iter()
            .filter(|o| o.is_sequence() || o.is_sync())
            .count();
        let na: Vec<&CheckRecord> = recs.iter().filter(|r| r.is_unavailable()).collect();
        assert_eq!(na.len(), rows.len() * seqs, "{na:#?}");
        assert!(na
            .iter()
            .all(|r| r.op.ends_with("_seq") || r.op.starts_with("sync_")));
        // Every other op is checked once per row, the backward also by finite differences.
        let checked = recs.iter().filter(|r| r.check == "ok").count();
        assert_eq!(checked, rows.len() * (Op::ALL.len() - seqs + 1));
    }

    #[test]
    fn failures_and_errors_are_shown() {
        let rows = rows(&[&[4, 3, 5]], &[MemoryFormat::Contiguous], &[DType::F32]);
        let mut recs = cpu_records(&rows, &Op::PLAIN, 1);
        recs[0].check = "failed".into();
        recs[0].max_rel_err = Some(0.5);
        recs[1].check = "error".into();
        recs[1].error = Some("boom".into());
        let text = table(&recs, CPU, &Op::PLAIN);
        assert!(text.contains("5.0e-1") && text.contains("FAILED"), "{text}");
        assert!(
            text.contains("error: eval_fwd 4x3x5 nchw f32: boom"),
            "{text}"
        );
        let (line, ok) = summary(&recs, &[CPU]);
        assert!(!ok);
        assert_eq!(line, "FAILED (2 of 3 checks)");
    }

    #[test]
    fn forced_families_get_a_column_and_na_is_no_failure() {
        let rows = rows(&[&[3, 17, 5]], &[MemoryFormat::Contiguous], &[DType::F32]);
        let row = &rows[0];
        let c = Check {
            max_rel_err: 1e-7,
            tol: 1e-5,
            worst: "y",
        };
        let with = |mut r: CheckRecord, v: &str| {
            r.variant = Some(v.into());
            r
        };
        let ok = CheckRecord::new(EMULATED, row, &row.dims, Op::TrainFwd, Ok(&c), 1e-5);
        let why = "nchw needs planes of a multiple of 4 values, not 5";
        let na = CheckRecord::unavailable(EMULATED, row, &row.dims, Op::TrainFwd, why, 1e-5);
        assert!(na.passed() && na.is_unavailable() && !ok.is_unavailable());
        let mut recs = vec![with(ok.clone(), "baseline"), with(na, "ilp")];
        let text = table(&recs, EMULATED, &[Op::TrainFwd]);
        let lines: Vec<&str> = text.lines().collect();
        let header: Vec<&str> = lines[0].split_whitespace().collect();
        assert_eq!(
            header,
            [
                "shape",
                "layout",
                "dtype",
                "variant",
                "checked",
                "at",
                "train_fwd",
                "tol",
                "check"
            ],
            "{text}"
        );
        assert!(
            lines[2].contains(" baseline ") && lines[2].ends_with(" ok"),
            "{text}"
        );
        assert!(
            lines[3].contains(" ilp ") && lines[3].ends_with(" n/a"),
            "{text}"
        );
        assert_eq!(
            lines[4],
            format!("n/a: train_fwd 3x17x5 nchw f32 ilp: {why}")
        );
        assert_eq!(
            summary(&recs, &[EMULATED]),
            ("ok (1 checks, 1 n/a)".into(), true)
        );
        // A failure beside them still fails.
        let bad = Check {
            max_rel_err: 1.0,
            ..c
        };
        recs.push(with(
            CheckRecord::new(EMULATED, row, &row.dims, Op::TrainFwd, Ok(&bad), 1e-5),
            "auto",
        ));
        assert_eq!(
            summary(&recs, &[EMULATED]),
            ("FAILED (1 of 2 checks, 1 n/a)".into(), false)
        );
        assert!(table(&recs, EMULATED, &[Op::TrainFwd]).contains(" auto "));
        // Without variants: no such column.
        assert!(!table(&[ok], EMULATED, &[Op::TrainFwd]).contains("variant"));
    }

    #[test]
    fn the_report_is_a_valid_result_file() {
        let rows = rows(&[&[4, 3, 5]], &[MemoryFormat::Contiguous], &[DType::F32]);
        let recs = cpu_records(&rows, &Op::PLAIN, 1);
        let rep = report("no CUDA driver", 1, &recs).unwrap();
        let text = rep.to_json().unwrap();
        let back = Report::from_json(&text).unwrap();
        assert!(back.rows.is_empty());
        assert_eq!(back.device, "none");
        assert_eq!(back.extra["timed_on_hardware"], false);
        assert_eq!(back.extra["no_gpu"], "no CUDA driver");
        let checks: Vec<CheckRecord> =
            serde_json::from_value(back.extra["checks"].clone()).unwrap();
        assert_eq!(checks, recs);
        // One line per check.
        assert_eq!(
            text.matches("\n    {\"backend\": ").count(),
            recs.len(),
            "{text}"
        );
    }
}

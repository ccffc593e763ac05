//! Kernel families side by side (`--variant`), the winner of each (row, op), and the
//! tuning tables made from them (`--tuning-out`) and read back (`--tuning-in`).
//!
//! The table's format is `bench/tuning/README.md`'s, read and written by
//! `bench/tuning/format.rs` (included here as [`mod@format`], as the crate's build script
//! includes it), so bnbench cannot drift from what the library embeds.
//!
//! Selection, on result rows (so that it works on a run's results and on a `--from`
//! file alike): per (row, op), the winner is the fastest timed family whose check did
//! not fail, and its margin the runner-up's time over the winner's (1 when it ran
//! alone); `auto` (the planner's own choice, one of the families) never wins where a
//! family was timed. Per table entry (op, kernel layout, input dtype, size bucket) the
//! row with the most bytes is kept.

use cuda_batchnorm::launch::{self, Layout, TunedOp, TuningEntry, TuningTable, Variant};
use cuda_batchnorm::{DType, Shape};

use crate::report::{Report, ResultRow, OUR_IMPL};
use crate::suite::{parse_layout, Op};

/// The one reader and writer of the table format, shared with the crate's build script.
#[allow(dead_code)]
#[path = "../../bench/tuning/format.rs"]
pub mod format;

/// What `--variant` names for the planner's own choice.
pub const AUTO: &str = "auto";

/// The name of a `--variant` choice: a family's, or `auto` for none forced.
pub fn choice_name(choice: Option<Variant>) -> &'static str {
    choice.map_or(AUTO, Variant::name)
}

/// The planner's op for a suite op (the suite's backward is the training one); `None`
/// for the frozen and fused ops, which run with the planner's choice only and are not
/// tuned.
pub fn tuned_op(op: Op) -> Option<TunedOp> {
    match op {
        Op::TrainFwd => Some(TunedOp::TrainForward),
        Op::EvalFwd => Some(TunedOp::EvalForward),
        Op::Backward => Some(TunedOp::TrainBackward),
        _ => None,
    }
}

/// The kernels' layout of a `Layout::name`.
pub fn layout_by_name(name: &str) -> Option<Layout> {
    [Layout::Nchw, Layout::Nhwc]
        .into_iter()
        .find(|l| l.name() == name)
}

/// Whether a row can win: a family's (not `auto`), timed, and not failing its check.
fn eligible(r: &ResultRow) -> bool {
    r.median_us.is_finite() && r.median_us > 0.0 && r.check.as_deref() != Some("failed")
}

fn is_family(r: &ResultRow) -> bool {
    r.variant
        .as_deref()
        .is_some_and(|v| Variant::parse(v).is_some())
}

/// The winner among rows of one (row, op): its index and margin (runner-up time over
/// winner time, 1 when alone). The fastest eligible family; where no family could win,
/// the fastest eligible `auto` row with margin 1; `None` when nothing was timed.
pub fn winner(rows: &[&ResultRow]) -> Option<(usize, f64)> {
    let fastest = |pick: &dyn Fn(&ResultRow) -> bool| {
        let mut times: Vec<(usize, f64)> = rows
            .iter()
            .enumerate()
            .filter(|(_, r)| pick(r) && eligible(r))
            .map(|(i, r)| (i, r.median_us))
            .collect();
        // Stable: the first listed wins a tie.
        times.sort_by(|a, b| a.1.total_cmp(&b.1));
        let (i, best) = *times.first()?;
        let margin = times.get(1).map_or(1.0, |&(_, t)| t / best);
        Some((i, margin))
    };
    fastest(&is_family).or_else(|| {
        fastest(&|r: &ResultRow| r.variant.as_deref() == Some(AUTO)).map(|(i, _)| (i, 1.0))
    })
}

/// Groups of our rows that carry a variant, by (op, shape, layout, dtype), in order of
/// first appearance; each group as indices into `rows`.
fn groups(rows: &[ResultRow]) -> Vec<Vec<usize>> {
    let mut keys: Vec<(String, Vec<usize>, String, String)> = Vec::new();
    let mut out: Vec<Vec<usize>> = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        if r.variant.is_none() || r.impl_name != OUR_IMPL {
            continue;
        }
        let k = r.key();
        match keys.iter().position(|x| *x == k) {
            Some(g) => out[g].push(i),
            None => {
                keys.push(k);
                out.push(vec![i]);
            }
        }
    }
    out
}

/// Sets `winner` on every row that carries a variant: true on the winner of its
/// (row, op), false on the others.
pub fn mark_winners(rows: &mut [ResultRow]) {
    for g in groups(rows) {
        let members: Vec<&ResultRow> = g.iter().map(|&i| &rows[i]).collect();
        let w = winner(&members).map(|(i, _)| g[i]);
        for &i in &g {
            rows[i].winner = Some(Some(i) == w);
        }
    }
}

/// One table entry before bucketing, with what bucketing compares.
#[derive(Clone, Debug, PartialEq)]
struct Candidate {
    entry: format::Entry,
    bytes: u128,
}

/// The table's entries from our results: per (row, op) the winning family (rows where
/// only `auto` or nothing was timed give none), then per (op, kernel layout, input
/// dtype, bytes_log2) the row with the most bytes (the first such on a tie). Sorted by
/// op, layout, dtype (format.rs's orders) and bucket.
pub fn entries(rows: &[ResultRow]) -> Result<Vec<format::Entry>, String> {
    let mut kept: Vec<Candidate> = Vec::new();
    for g in groups(rows) {
        let members: Vec<&ResultRow> = g.iter().map(|&i| &rows[i]).collect();
        let Some((w, margin)) = winner(&members) else {
            continue;
        };
        let r = members[w];
        let Some(variant) = r.variant.as_deref().and_then(Variant::parse) else {
            continue; // auto: nothing measured to choose between
        };
        let op = Op::parse(&r.op).ok_or_else(|| format!("unknown op `{}`", r.op))?;
        let Some(op) = tuned_op(op) else {
            continue; // not tuned
        };
        let fmt =
            parse_layout(&r.layout).ok_or_else(|| format!("unknown layout `{}`", r.layout))?;
        let dtype = DType::parse(&r.dtype).ok_or_else(|| format!("unknown dtype `{}`", r.dtype))?;
        let shape = Shape::new(&r.shape, fmt).map_err(|e| e.to_string())?;
        let entry = format::Entry {
            op: op.name().into(),
            layout: Layout::of(&shape).name().into(),
            dtype: dtype.name().into(),
            bytes_log2: launch::bytes_bucket(shape.numel(), dtype),
            variant: variant.name().into(),
            shape: r.shape.clone(),
            margin,
        };
        let bytes = shape.numel() as u128 * dtype.size() as u128;
        let same = |c: &Candidate| {
            (
                &c.entry.op,
                &c.entry.layout,
                &c.entry.dtype,
                c.entry.bytes_log2,
            ) == (&entry.op, &entry.layout, &entry.dtype, entry.bytes_log2)
        };
        match kept.iter_mut().find(|c| same(c)) {
            Some(c) if c.bytes < bytes => *c = Candidate { entry, bytes },
            Some(_) => {}
            None => kept.push(Candidate { entry, bytes }),
        }
    }
    let rank = |e: &format::Entry| {
        let at = |list: &[&str], s: &str| list.iter().position(|x| *x == s).unwrap_or(list.len());
        (
            at(&format::OPS, &e.op),
            at(&format::LAYOUTS, &e.layout),
            at(&format::DTYPES, &e.dtype),
            e.bytes_log2,
        )
    };
    let mut out: Vec<format::Entry> = kept.into_iter().map(|c| c.entry).collect();
    out.sort_by_key(rank);
    Ok(out)
}

/// The compute capability a result file records (`"9.0"`), if it does.
pub fn report_cc(r: &Report) -> Option<(u32, u32)> {
    let s = r.extra.get("compute_capability")?.as_str()?;
    let (a, b) = s.split_once('.')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// The table of a run's results (an `Err` when no family was timed).
pub fn table_of(
    report: &Report,
    compute_capability: (u32, u32),
    measured: &str,
) -> Result<format::Table, String> {
    let entries = entries(&report.rows)?;
    if entries.is_empty() {
        return Err("no kernel family was timed (run with --variant NAMES or all)".into());
    }
    Ok(format::Table {
        device: report.device.clone(),
        compute_capability,
        measured: measured.into(),
        entries,
    })
}

/// The library's form of a parsed table, kept for the life of the process.
pub fn to_library(t: &format::Table) -> Result<&'static TuningTable, String> {
    let entries = t
        .entries
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let bad = |what: &str, v: &str| format!("entry {i}: unknown {what} `{v}`");
            Ok(TuningEntry {
                op: TunedOp::parse(&e.op).ok_or_else(|| bad("op", &e.op))?,
                layout: layout_by_name(&e.layout).ok_or_else(|| bad("layout", &e.layout))?,
                input: DType::parse(&e.dtype).ok_or_else(|| bad("dtype", &e.dtype))?,
                bytes_log2: e.bytes_log2,
                variant: Variant::parse(&e.variant).ok_or_else(|| bad("variant", &e.variant))?,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(TuningTable::leak(
        t.device.clone(),
        t.compute_capability,
        entries,
    ))
}

/// A `--tuning-in` file: its text, the parsed table and the library's form of it.
pub struct Loaded {
    /// The file's text (sent as it is to the emulated check's child process).
    pub text: String,
    /// As parsed.
    pub table: format::Table,
    /// As the planner takes it.
    pub planner: &'static TuningTable,
}

/// Parses a table's text.
pub fn parse(text: &str) -> Result<Loaded, String> {
    let table = format::parse(text)?;
    let planner = to_library(&table)?;
    Ok(Loaded {
        text: text.to_string(),
        table,
        planner,
    })
}

/// Reads a `--tuning-in` file.
pub fn load(path: &str) -> Result<Loaded, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    parse(&text).map_err(|e| format!("{path}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::{report, row};

    fn entry(op: &str, variant: &str, margin: f64) -> format::Entry {
        format::Entry {
            op: op.into(),
            layout: "nchw".into(),
            dtype: "f32".into(),
            bytes_log2: 29,
            variant: variant.into(),
            shape: vec![256, 64, 56, 56],
            margin,
        }
    }

    fn sample_table() -> format::Table {
        format::Table {
            device: "NVIDIA H200 \"x\"".into(),
            compute_capability: (9, 0),
            measured: "bnbench 0.1.0, 2026-12-01, --set full --variant all".into(),
            entries: vec![
                entry("train_fwd", "ilp", 1.12),
                format::Entry {
                    layout: "nhwc".into(),
                    dtype: "bf16".into(),
                    bytes_log2: 0,
                    shape: vec![2, 3],
                    ..entry("eval_bwd", "persistent", 1.0)
                },
                format::Entry {
                    dtype: "f64".into(),
                    bytes_log2: 64,
                    // a margin that only round-trips with float_roundtrip
                    ..entry("train_bwd", "baseline", 13.094999999999999)
                },
            ],
        }
    }

    #[test]
    fn the_format_round_trips() {
        let t = sample_table();
        let text = format::to_json(&t);
        assert_eq!(format::parse(&text).unwrap(), t);
        assert!(
            text.ends_with("}\n") && text.contains("\"format\": 1"),
            "{text}"
        );
        // And the library's form has every entry.
        let lib = to_library(&t).unwrap();
        assert_eq!(lib.device, t.device);
        assert_eq!(lib.compute_capability, (9, 0));
        assert_eq!(lib.entries.len(), 3);
        assert_eq!(lib.entries[1].op, TunedOp::EvalBackward);
        assert_eq!(lib.entries[1].layout, Layout::Nhwc);
        assert_eq!(lib.entries[1].input, DType::BF16);
        assert_eq!(lib.entries[1].variant, Variant::Persistent);
        assert_eq!(
            lib.choose(TunedOp::TrainForward, Layout::Nchw, DType::F32, 20),
            Some(Variant::Ilp)
        );
        // An empty table is a table too.
        let empty = format::Table {
            entries: Vec::new(),
            ..t
        };
        assert_eq!(format::parse(&format::to_json(&empty)).unwrap(), empty);
    }

    #[test]
    fn the_format_refuses_what_it_does_not_know() {
        let good = format::to_json(&sample_table());
        assert!(format::parse(&good).is_ok());
        let cases: [(&str, &str, &str); 12] = [
            ("\"op\": \"train_fwd\"", "\"op\": \"fwd\"", "`op` is `fwd`"),
            (
                "\"op\": \"train_fwd\"",
                "\"op\": \"backward\"",
                "`op` is `backward`",
            ),
            (
                "\"variant\": \"ilp\"",
                "\"variant\": \"fast\"",
                "`variant` is `fast`",
            ),
            (
                "\"variant\": \"ilp\"",
                "\"variant\": \"auto\"",
                "`variant` is `auto`",
            ),
            ("\"format\": 1", "\"format\": 2", "format 2"),
            ("\"format\": 1", "\"format\": \"1\"", "`format`"),
            (
                "\"margin\": 1.12",
                "\"margin\": 0.9",
                "`margin` is not a number >= 1",
            ),
            ("\"margin\": 1.12", "\"margin\": \"big\"", "`margin`"),
            (
                "\"layout\": \"nchw\"",
                "\"layout\": \"nwhc\"",
                "`layout` is `nwhc`",
            ),
            ("\"dtype\": \"f32\"", "\"dtype\": \"f8\"", "`dtype` is `f8`"),
            ("\"bytes_log2\": 29", "\"bytes_log2\": 65", "above 64"),
            ("\"bytes_log2\": 29", "\"bytes_log2\": -1", "`bytes_log2`"),
        ];
        for (from, to, want) in cases {
            assert!(good.contains(from), "{from}\n{good}");
            let bad = good.replacen(from, to, 1);
            let e = format::parse(&bad).unwrap_err();
            assert!(e.contains(want), "{to}: {e}");
        }
        assert!(format::parse("[]").unwrap_err().contains("no `format`"));
        assert!(format::parse("{").unwrap_err().starts_with("not JSON"));
        let cc = good.replace(
            "\"compute_capability\": [\n    9,\n    0\n  ]",
            "\"compute_capability\": [9]",
        );
        assert_ne!(cc, good, "{good}");
        assert!(format::parse(&cc)
            .unwrap_err()
            .contains("compute_capability"));
        let no_device = good.replacen("\"device\"", "\"name\"", 1);
        assert!(format::parse(&no_device)
            .unwrap_err()
            .contains("no `device`"));
        // The same refusals reach --tuning-in.
        assert!(parse(&good.replacen("\"variant\": \"ilp\"", "\"variant\": \"fast\"", 1)).is_err());
    }

    #[test]
    fn the_format_names_what_the_library_names() {
        let variants: Vec<&str> = Variant::ALL.iter().map(|v| v.name()).collect();
        assert_eq!(format::VARIANTS.to_vec(), variants);
        let ops: Vec<&str> = TunedOp::ALL.iter().map(|o| o.name()).collect();
        assert_eq!(format::OPS.to_vec(), ops);
        let dtypes: Vec<&str> = [DType::F32, DType::F64, DType::F16, DType::BF16]
            .iter()
            .map(|d| d.name())
            .collect();
        assert_eq!(format::DTYPES.to_vec(), dtypes);
        for d in format::DTYPES {
            assert_eq!(DType::parse(d).map(DType::name), Some(d));
        }
        let layouts: Vec<&str> = [Layout::Nchw, Layout::Nhwc]
            .iter()
            .map(|l| l.name())
            .collect();
        assert_eq!(format::LAYOUTS.to_vec(), layouts);
        for l in format::LAYOUTS {
            assert_eq!(layout_by_name(l).map(Layout::name), Some(l));
        }
        // Every suite op has a table op, and --variant's `auto` is no family.
        let mapped: Vec<&str> = Op::ALL
            .iter()
            .filter_map(|&o| tuned_op(o).map(TunedOp::name))
            .collect();
        assert_eq!(mapped, ["train_fwd", "eval_fwd", "train_bwd"]);
        assert!(Op::PLAIN.iter().all(|&o| tuned_op(o).is_some()));
        assert!(!format::VARIANTS.contains(&AUTO));
        assert_eq!(choice_name(None), AUTO);
        assert_eq!(choice_name(Some(Variant::Flat)), "flat");
    }

    fn timed(op: &str, dims: &[usize], layout: &str, dtype: &str, v: &str, us: f64) -> ResultRow {
        ResultRow {
            variant: Some(v.into()),
            check: Some("ok".into()),
            ..row(OUR_IMPL, op, dims, layout, dtype, us)
        }
    }

    #[test]
    fn the_winner_is_the_fastest_family_that_passed() {
        let r = |v: &str, us: f64| timed("train_fwd", &[4, 8], "nchw", "f32", v, us);
        let (a, b, c) = (r("baseline", 10.0), r("ilp", 8.0), r("auto", 7.0));
        // auto is one of the families: it never wins where a family was timed
        assert_eq!(winner(&[&a, &b, &c]), Some((1, 10.0 / 8.0)));
        assert_eq!(winner(&[&a]), Some((0, 1.0)));
        assert_eq!(winner(&[&c]), Some((0, 1.0)));
        assert_eq!(winner(&[]), None);
        // a failed check cannot win; nor can a time that is not one
        let wrong = ResultRow {
            check: Some("failed".into()),
            ..r("flat", 1.0)
        };
        let nan = r("persistent", f64::NAN);
        assert_eq!(winner(&[&a, &wrong, &nan, &b]), Some((3, 1.25)));
        assert_eq!(winner(&[&wrong, &nan]), None);
        // a tie goes to the first listed, margin 1
        assert_eq!(winner(&[&a, &r("ilp", 10.0)]), Some((0, 1.0)));

        let mut rows = vec![
            a.clone(),
            b.clone(),
            c.clone(),
            timed("eval_fwd", &[4, 8], "nchw", "f32", "baseline", 3.0),
            row(OUR_IMPL, "backward", &[4, 8], "nchw", "f32", 3.0),
        ];
        mark_winners(&mut rows);
        let marks: Vec<Option<bool>> = rows.iter().map(|r| r.winner).collect();
        assert_eq!(
            marks,
            [Some(false), Some(true), Some(false), Some(true), None]
        );
    }

    #[test]
    fn entries_keep_the_winner_of_the_largest_row_per_bucket() {
        let rows = vec![
            // 2^27 bytes exactly and a little more: one bucket, the larger row kept
            timed(
                "train_fwd",
                &[32, 256, 64, 64],
                "nchw",
                "f32",
                "baseline",
                10.0,
            ),
            timed("train_fwd", &[32, 256, 64, 64], "nchw", "f32", "ilp", 5.0),
            timed(
                "train_fwd",
                &[33, 256, 64, 64],
                "nchw",
                "f32",
                "baseline",
                9.0,
            ),
            timed("train_fwd", &[33, 256, 64, 64], "nchw", "f32", "ilp", 12.0),
            // a smaller row of the same bucket after them does not replace it
            timed("train_fwd", &[32, 256, 64, 65], "nchw", "f32", "ilp", 1.0),
            // the backward is the table's train_bwd; channels-last and S == 1 are nhwc
            timed("backward", &[32, 256, 56, 56], "nhwc", "f16", "ilp", 4.0),
            timed(
                "backward",
                &[32, 256, 56, 56],
                "nhwc",
                "f16",
                "baseline",
                6.0,
            ),
            timed("eval_fwd", &[4096, 1024], "nchw", "bf16", "baseline", 2.0),
            // only auto timed: no entry
            timed("eval_fwd", &[32, 256, 64, 64], "nchw", "f32", "auto", 2.0),
            // not ours, or no variant: ignored
            ResultRow {
                impl_name: "torch".into(),
                ..timed("eval_fwd", &[2, 2048], "nchw", "f32", "ilp", 2.0)
            },
            row(OUR_IMPL, "eval_fwd", &[2, 2048], "nchw", "f32", 2.0),
        ];
        let e = entries(&rows).unwrap();
        type Brief<'a> = (&'a str, &'a str, &'a str, u32, &'a str, Vec<usize>, f64);
        let brief: Vec<Brief> = e
            .iter()
            .map(|e| {
                (
                    e.op.as_str(),
                    e.layout.as_str(),
                    e.dtype.as_str(),
                    e.bytes_log2,
                    e.variant.as_str(),
                    e.shape.clone(),
                    e.margin,
                )
            })
            .collect();
        assert_eq!(
            brief,
            [
                (
                    "train_fwd",
                    "nchw",
                    "f32",
                    27,
                    "baseline",
                    vec![33, 256, 64, 64],
                    12.0 / 9.0
                ),
                (
                    "eval_fwd",
                    "nhwc",
                    "bf16",
                    23,
                    "baseline",
                    vec![4096, 1024],
                    1.0
                ),
                (
                    "train_bwd",
                    "nhwc",
                    "f16",
                    25,
                    "ilp",
                    vec![32, 256, 56, 56],
                    1.5
                ),
            ]
        );
        assert_eq!(
            launch::bytes_bucket(32 * 256 * 64 * 64, DType::F32),
            27,
            "2^27 bytes"
        );
        // The table is written and read back as the planner takes it.
        let mut rep = report(rows);
        rep.extra.insert("compute_capability".into(), "9.0".into());
        let cc = report_cc(&rep).unwrap();
        assert_eq!(cc, (9, 0));
        let t = table_of(&rep, cc, "bnbench test").unwrap();
        assert_eq!(t.device, "Test GPU");
        let back = parse(&format::to_json(&t)).unwrap();
        assert_eq!(back.table, t);
        assert_eq!(
            back.planner
                .choose(TunedOp::TrainBackward, Layout::Nhwc, DType::F16, 25),
            Some(Variant::Ilp)
        );
        // Nothing to choose from: an error, not an empty table.
        let none = report(vec![row(
            OUR_IMPL,
            "eval_fwd",
            &[2, 2048],
            "nchw",
            "f32",
            2.0,
        )]);
        assert!(table_of(&none, cc, "x")
            .unwrap_err()
            .contains("no kernel family"));
    }
}

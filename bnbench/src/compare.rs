//! Ours against another result file (PyTorch's, or an earlier run of ours): per-row
//! speedups (their median / ours, above 1 when ours is faster) and geometric means per
//! group (op x layout x dtype) and overall.

use crate::metrics::geomean;
use crate::report::{Report, ResultRow, OUR_IMPL};
use crate::suite::{dims_label, Op};
use crate::table;

/// One of our rows with each of their implementations' times.
#[derive(Clone, Debug, PartialEq)]
pub struct Matched {
    /// Our row.
    pub ours: ResultRow,
    /// Their median per implementation (same order as [`Comparison::impls`]).
    pub theirs: Vec<Option<f64>>,
}

/// Geometric mean speedups of one group.
#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    /// `train_fwd nchw f32`, or `overall`.
    pub name: String,
    /// Our rows in the group.
    pub rows: usize,
    /// Per implementation: geometric mean speedup and how many rows it covers.
    pub speedups: Vec<(Option<f64>, usize)>,
}

/// A comparison.
#[derive(Clone, Debug, PartialEq)]
pub struct Comparison {
    /// Column names: their implementations.
    pub impls: Vec<String>,
    /// Our rows, in our order.
    pub rows: Vec<Matched>,
    /// Groups in order of first appearance, then `overall`.
    pub groups: Vec<Group>,
}

/// A column's display name: an earlier run of ours is marked as the baseline.
fn column_name(impl_name: &str) -> String {
    if impl_name == OUR_IMPL {
        format!("{OUR_IMPL} (baseline)")
    } else {
        impl_name.to_string()
    }
}

/// Speedup of ours over theirs: their median / ours.
pub fn speedup(ours_us: f64, theirs_us: f64) -> Option<f64> {
    let s = theirs_us / ours_us;
    (ours_us > 0.0 && theirs_us > 0.0 && s.is_finite()).then_some(s)
}

/// Matches `ours` against every implementation in `theirs` (of a `--variant` run, the
/// winner of each row and op only, on either side).
pub fn compare(ours: &Report, theirs: &Report) -> Comparison {
    let impls = theirs.impls();
    let rows: Vec<Matched> = ours
        .rows
        .iter()
        .filter(|r| r.is_primary())
        .map(|r| {
            let key = r.key();
            let t = impls
                .iter()
                .map(|i| {
                    theirs
                        .rows
                        .iter()
                        .find(|x| &x.impl_name == i && x.is_primary() && x.key() == key)
                        .map(|x| x.median_us)
                })
                .collect();
            Matched {
                ours: r.clone(),
                theirs: t,
            }
        })
        .collect();
    let mut names: Vec<String> = Vec::new();
    for m in &rows {
        let g = group_name(&m.ours);
        if !names.contains(&g) {
            names.push(g);
        }
    }
    let summarise = |name: String, members: Vec<&Matched>| Group {
        name,
        rows: members.len(),
        speedups: (0..impls.len())
            .map(|i| {
                let s: Vec<f64> = members
                    .iter()
                    .filter_map(|m| m.theirs[i].and_then(|t| speedup(m.ours.median_us, t)))
                    .collect();
                (geomean(&s), s.len())
            })
            .collect(),
    };
    // Groups by op (suite order), then layout, then dtype.
    let rank = |g: &String| {
        let mut parts = g.split(' ');
        let op = parts
            .next()
            .and_then(Op::parse)
            .map_or(Op::ALL.len(), |o| o as usize);
        let layout = ["nchw", "nhwc"]
            .iter()
            .position(|l| Some(*l) == parts.next())
            .unwrap_or(2);
        let dtype = ["f32", "f16", "bf16", "f64"]
            .iter()
            .position(|d| Some(*d) == parts.next())
            .unwrap_or(4);
        (op, layout, dtype)
    };
    names.sort_by_key(rank);
    let mut groups: Vec<Group> = names
        .into_iter()
        .map(|n| {
            let members = rows.iter().filter(|m| group_name(&m.ours) == n).collect();
            summarise(n, members)
        })
        .collect();
    groups.push(summarise("overall".into(), rows.iter().collect()));
    Comparison {
        impls,
        rows,
        groups,
    }
}

fn group_name(r: &ResultRow) -> String {
    format!("{} {} {}", r.op, r.layout, r.dtype)
}

fn fmt_speedup(s: Option<f64>) -> String {
    s.map_or("-".into(), |s| format!("{s:.2}x"))
}

/// The comparison as text: a header, a per-row table and the geometric means.
pub fn render(
    c: &Comparison,
    ours: &Report,
    ours_src: &str,
    theirs: &Report,
    theirs_src: &str,
) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "comparison: ours ({ours_src}: {}, {}, copy {:.1} GB/s, {}) vs {theirs_src} ({}, {}, copy {:.1} GB/s, {})\n",
        ours.device, ours.driver, ours.copy_gbps, ours.date, theirs.device, theirs.driver, theirs.copy_gbps, theirs.date
    ));
    if ours.device != theirs.device {
        out.push_str("warning: the two files come from different devices\n");
    }
    out.push_str("speedup = their median / ours (above 1: ours is faster)\n\n");
    let cols: Vec<String> = c.impls.iter().map(|i| column_name(i)).collect();

    let mut header: Vec<String> = ["op", "shape", "layout", "dtype", "ours µs"]
        .map(String::from)
        .to_vec();
    for name in &cols {
        header.push(format!("{name} µs"));
        header.push("speedup".into());
    }
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    let right: Vec<usize> = (4..header.len()).collect();
    let mut t = table::new(&header, &right);
    for m in &c.rows {
        let r = &m.ours;
        let mut cells = vec![
            r.op.clone(),
            dims_label(&r.shape),
            r.layout.clone(),
            r.dtype.clone(),
            format!("{:.2}", r.median_us),
        ];
        for theirs in &m.theirs {
            match theirs {
                Some(tu) => {
                    cells.push(format!("{tu:.2}"));
                    cells.push(fmt_speedup(speedup(r.median_us, *tu)));
                }
                None => cells.extend(["-".to_string(), "-".to_string()]),
            }
        }
        t.add_row(cells);
    }
    out.push_str(&table::render(&t));

    out.push_str("\ngeometric mean speedup per group (rows compared)\n");
    let mut header = vec!["group", "rows"];
    header.extend(cols.iter().map(String::as_str));
    let right: Vec<usize> = (1..header.len()).collect();
    let mut t = table::new(&header, &right);
    for g in &c.groups {
        let mut cells = vec![g.name.clone(), g.rows.to_string()];
        for (s, n) in &g.speedups {
            cells.push(if *n > 0 {
                format!("{} ({n})", fmt_speedup(*s))
            } else {
                "-".into()
            });
        }
        t.add_row(cells);
    }
    out.push_str(&table::render(&t));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::{report, row};

    fn sample() -> (Report, Report) {
        let ours = report(vec![
            row(
                OUR_IMPL,
                "train_fwd",
                &[32, 256, 56, 56],
                "nchw",
                "f32",
                100.0,
            ),
            row(
                OUR_IMPL,
                "train_fwd",
                &[32, 128, 56, 56],
                "nchw",
                "f32",
                50.0,
            ),
            row(
                OUR_IMPL,
                "eval_fwd",
                &[32, 256, 56, 56],
                "nhwc",
                "f16",
                10.0,
            ),
            row(OUR_IMPL, "backward", &[2, 2048], "nchw", "f32", 4.0),
        ]);
        let theirs = report(vec![
            row(
                "torch",
                "train_fwd",
                &[32, 256, 56, 56],
                "nchw",
                "f32",
                200.0,
            ),
            row(
                "torch",
                "train_fwd",
                &[32, 128, 56, 56],
                "nchw",
                "f32",
                400.0,
            ),
            row(
                "torch-native",
                "train_fwd",
                &[32, 256, 56, 56],
                "nchw",
                "f32",
                50.0,
            ),
            row("torch", "eval_fwd", &[32, 256, 56, 56], "nhwc", "f16", 5.0),
            // Same shape, other layout: must not match.
            row("torch", "backward", &[2, 2048], "nhwc", "f32", 1.0),
            row(
                "torch-native",
                "eval_fwd",
                &[32, 256, 56, 56],
                "nchw",
                "f16",
                1.0,
            ),
        ]);
        (ours, theirs)
    }

    #[test]
    fn speedups_and_geomeans() {
        let (ours, theirs) = sample();
        let c = compare(&ours, &theirs);
        assert_eq!(c.impls, vec!["torch", "torch-native"]);
        assert_eq!(c.rows[0].theirs, vec![Some(200.0), Some(50.0)]);
        assert_eq!(c.rows[1].theirs, vec![Some(400.0), None]);
        assert_eq!(c.rows[3].theirs, vec![None, None]);
        let g = |name: &str| c.groups.iter().find(|g| g.name == name).unwrap().clone();
        // train_fwd nchw f32: torch speedups 2 and 8 -> 4; torch-native 0.5 from one row.
        let t = g("train_fwd nchw f32");
        assert_eq!(t.rows, 2);
        assert!((t.speedups[0].0.unwrap() - 4.0).abs() < 1e-12);
        assert_eq!(t.speedups[0].1, 2);
        assert!((t.speedups[1].0.unwrap() - 0.5).abs() < 1e-12);
        assert_eq!(t.speedups[1].1, 1);
        // eval_fwd nhwc f16: 0.5.
        assert!((g("eval_fwd nhwc f16").speedups[0].0.unwrap() - 0.5).abs() < 1e-12);
        // backward: nothing matched.
        assert_eq!(g("backward nchw f32").speedups[0], (None, 0));
        // overall torch: geomean(2, 8, 0.5) = 2.
        let all = g("overall");
        assert_eq!(all.rows, 4);
        assert!((all.speedups[0].0.unwrap() - 2.0).abs() < 1e-12);
        assert_eq!(all.speedups[0].1, 3);
        assert_eq!(c.groups.last().unwrap().name, "overall");
    }

    #[test]
    fn rendered_table_has_every_row_and_group() {
        let (ours, theirs) = sample();
        let c = compare(&ours, &theirs);
        let text = render(&c, &ours, "ours.json", &theirs, "torch.json");
        assert!(text.contains("torch-native µs"));
        assert!(text.contains("2.00x"));
        assert!(text.contains("4.00x (2)"));
        assert!(text.contains("overall"));
        for r in &ours.rows {
            assert!(text.contains(&dims_label(&r.shape)));
        }
        // One line per row and per group, each with a cell per implementation.
        let line = |start: &str| {
            text.lines()
                .find(|l| l.starts_with(start))
                .unwrap_or_else(|| panic!("no line {start}:\n{text}"))
                .split_whitespace()
                .collect::<Vec<_>>()
        };
        assert_eq!(
            line("train_fwd  32x256x56x56"),
            [
                "train_fwd",
                "32x256x56x56",
                "nchw",
                "f32",
                "100.00",
                "200.00",
                "2.00x",
                "50.00",
                "0.50x"
            ]
        );
        assert_eq!(
            line("backward"),
            ["backward", "2x2048", "nchw", "f32", "4.00", "-", "-", "-", "-"]
        );
        assert_eq!(
            line("overall"),
            ["overall", "4", "2.00x", "(3)", "0.50x", "(1)"]
        );
        assert!(text.contains("torch µs") && text.contains("speedup"));
    }

    #[test]
    fn an_earlier_run_of_ours_is_a_baseline_column() {
        let (ours, _) = sample();
        let mut old = ours.clone();
        for r in &mut old.rows {
            r.median_us *= 2.0;
        }
        let c = compare(&ours, &old);
        assert_eq!(c.impls, vec![OUR_IMPL]);
        assert!((c.groups.last().unwrap().speedups[0].0.unwrap() - 2.0).abs() < 1e-12);
        assert!(render(&c, &ours, "a", &old, "b").contains("cuda-batchnorm (baseline) µs"));
    }

    #[test]
    fn a_variant_run_is_compared_by_its_winners() {
        let (ours, theirs) = sample();
        let mut v = ours.clone();
        // Every row twice: the baseline (slower, not the winner) and ilp (the winner).
        v.rows = ours
            .rows
            .iter()
            .flat_map(|r| {
                let slow = ResultRow {
                    variant: Some("baseline".into()),
                    winner: Some(false),
                    median_us: r.median_us * 3.0,
                    ..r.clone()
                };
                let fast = ResultRow {
                    variant: Some("ilp".into()),
                    winner: Some(true),
                    ..r.clone()
                };
                [slow, fast]
            })
            .collect();
        let (a, b) = (compare(&v, &theirs), compare(&ours, &theirs));
        assert_eq!(a.groups, b.groups);
        assert_eq!(a.rows.len(), ours.rows.len());
        // And as the other side: its winners only.
        let c = compare(&ours, &v);
        assert!((c.groups.last().unwrap().speedups[0].0.unwrap() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn degenerate_times_give_no_speedup() {
        assert_eq!(speedup(0.0, 1.0), None);
        assert_eq!(speedup(1.0, 0.0), None);
        assert_eq!(speedup(1.0, f64::NAN), None);
        assert_eq!(speedup(2.0, 3.0), Some(1.5));
    }
}

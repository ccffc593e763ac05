//! A hand-written SVG of efficiency (% of the copy bandwidth) per suite row, grouped
//! by op, one horizontal bar per implementation.

use std::fmt::Write as _;

use crate::report::Report;
use crate::suite::Op;

const WIDTH: f64 = 1100.0;
const LABEL_W: f64 = 250.0;
const RIGHT_PAD: f64 = 70.0;
const BAR_H: f64 = 9.0;
const ROW_GAP: f64 = 7.0;
const COLORS: [&str; 8] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
];

/// Escapes text for XML content and attribute values.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// Where the axis stops growing: bars beyond it (no real efficiency comes near, but a
/// `--from` file may say anything) are drawn at its end.
const MAX_AXIS_PCT: f64 = 1e9;

/// The axis: a tick step (at most 10 ticks) and the end, at least 100 %, a multiple of
/// the step that covers `max_pct` (up to `MAX_AXIS_PCT`).
pub fn axis(max_pct: f64) -> (f64, f64) {
    let top = if max_pct.is_finite() {
        max_pct.clamp(100.0, MAX_AXIS_PCT)
    } else {
        100.0
    };
    let mut scale = 1.0;
    loop {
        for m in [10.0, 20.0, 25.0, 50.0] {
            let step = m * scale;
            if top / step <= 10.0 {
                return (step, (top / step).ceil() * step);
            }
        }
        scale *= 10.0;
    }
}

struct Series<'a> {
    name: String,
    report: &'a Report,
    impl_name: String,
}

fn op_rank(op: &str) -> usize {
    Op::parse(op)
        .and_then(|o| Op::ALL.iter().position(|x| *x == o))
        .unwrap_or(Op::ALL.len())
}

/// The SVG document: `ours` (every implementation in it), then every implementation
/// of `theirs` when given, bars matched by (op, shape, layout, dtype).
pub fn svg(ours: &Report, theirs: Option<&Report>) -> String {
    let mut series: Vec<Series> = ours
        .impls()
        .into_iter()
        .map(|i| Series {
            name: i.clone(),
            report: ours,
            impl_name: i,
        })
        .collect();
    if let Some(t) = theirs {
        for i in t.impls() {
            let name = if series.iter().any(|s| s.name == i) {
                format!("{i} (compared)")
            } else {
                i.clone()
            };
            series.push(Series {
                name,
                report: t,
                impl_name: i,
            });
        }
    }
    // Rows: every distinct key of ours, grouped by op in suite order.
    let mut keys: Vec<(String, Vec<usize>, String, String)> = Vec::new();
    for r in &ours.rows {
        let k = r.key();
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let mut ops: Vec<String> = Vec::new();
    for k in &keys {
        if !ops.contains(&k.0) {
            ops.push(k.0.clone());
        }
    }
    ops.sort_by_key(|o| op_rank(o));

    let value = |s: &Series, key: &(String, Vec<usize>, String, String)| {
        s.report
            .rows
            .iter()
            .find(|r| r.impl_name == s.impl_name && &r.key() == key)
            .map(|r| r.pct_copy)
    };
    let max_pct = keys
        .iter()
        .flat_map(|k| series.iter().filter_map(move |s| value(s, k)))
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    let (step, x_max) = axis(max_pct);
    let plot_w = WIDTH - LABEL_W - RIGHT_PAD;
    let x_of = |pct: f64| LABEL_W + plot_w * (pct.clamp(0.0, x_max) / x_max);
    let band = series.len() as f64 * BAR_H + ROW_GAP;

    let title = format!(
        "Batch norm efficiency, % of device-to-device copy ({:.0} GB/s): {}",
        ours.copy_gbps, ours.device
    );
    let legend_rows = series.len().div_ceil(4) as f64;
    let top = 50.0 + legend_rows * 18.0 + 10.0;
    let mut body = String::new();
    let mut y = top;
    for op in &ops {
        let op_keys: Vec<_> = keys.iter().filter(|k| &k.0 == op).collect();
        y += 22.0;
        let _ = writeln!(
            body,
            "<text x=\"10\" y=\"{:.1}\" font-size=\"15\" font-weight=\"bold\">{}</text>",
            y - 6.0,
            xml_escape(op)
        );
        // Axis for this group: a labelled gridline every `step` %, 100 % darker.
        let group_h = op_keys.len() as f64 * band;
        let ticks = (x_max / step).round() as usize;
        for i in 0..=ticks {
            let t = i as f64 * step;
            let x = x_of(t);
            let stroke = if t == 100.0 { "#888888" } else { "#dddddd" };
            let _ = writeln!(
                body,
                "<line x1=\"{x:.1}\" y1=\"{y:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"{stroke}\"/>",
                y + group_h
            );
            let _ = writeln!(
                body,
                "<text x=\"{x:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"middle\" fill=\"#555555\">{t:.0}%</text>",
                y - 6.0
            );
        }
        for k in op_keys {
            let label = format!("{} {} {}", crate::suite::dims_label(&k.1), k.2, k.3);
            let _ = writeln!(
                body,
                "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\">{}</text>",
                LABEL_W - 8.0,
                y + band / 2.0,
                xml_escape(&label)
            );
            for (i, s) in series.iter().enumerate() {
                let by = y + i as f64 * BAR_H;
                match value(s, k) {
                    Some(v) if v.is_finite() => {
                        let w = x_of(v) - LABEL_W;
                        let _ = writeln!(
                            body,
                            "<rect x=\"{LABEL_W:.1}\" y=\"{by:.1}\" width=\"{w:.1}\" height=\"{:.1}\" fill=\"{}\"><title>{}: {} {:.1}%</title></rect>",
                            BAR_H - 1.0,
                            COLORS[i % COLORS.len()],
                            xml_escape(&s.name),
                            xml_escape(&label),
                            v
                        );
                        let _ = writeln!(
                            body,
                            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"8\" fill=\"#333333\">{v:.1}%</text>",
                            LABEL_W + w + 3.0,
                            by + BAR_H - 2.0
                        );
                    }
                    _ => {
                        let _ = writeln!(
                            body,
                            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"8\" fill=\"#999999\">n/a</text>",
                            LABEL_W + 3.0,
                            by + BAR_H - 2.0
                        );
                    }
                }
            }
            y += band;
        }
        y += 8.0;
    }
    let height = y + 20.0;

    let mut out = String::new();
    let _ = writeln!(out, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>");
    let _ = writeln!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH:.0}\" height=\"{height:.0}\" viewBox=\"0 0 {WIDTH:.0} {height:.0}\" font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\">"
    );
    let _ = writeln!(out, "<title>{}</title>", xml_escape(&title));
    let _ = writeln!(
        out,
        "<rect x=\"0\" y=\"0\" width=\"{WIDTH:.0}\" height=\"{height:.0}\" fill=\"#ffffff\"/>"
    );
    let _ = writeln!(
        out,
        "<text x=\"10\" y=\"24\" font-size=\"16\" font-weight=\"bold\">{}</text>",
        xml_escape(&title)
    );
    let _ = writeln!(
        out,
        "<text x=\"10\" y=\"42\" font-size=\"11\" fill=\"#555555\">{} {}; bars: minimal bytes / median time as % of the copy bandwidth (higher is better)</text>",
        xml_escape(&ours.driver),
        xml_escape(&ours.date)
    );
    for (i, s) in series.iter().enumerate() {
        let lx = 10.0 + (i % 4) as f64 * 260.0;
        let ly = 52.0 + (i / 4) as f64 * 18.0;
        let _ = writeln!(
            out,
            "<rect x=\"{lx:.1}\" y=\"{ly:.1}\" width=\"14\" height=\"10\" fill=\"{}\"/>",
            COLORS[i % COLORS.len()]
        );
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\">{}</text>",
            lx + 20.0,
            ly + 9.5,
            xml_escape(&s.name)
        );
    }
    out.push_str(&body);
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::{report, row};
    use crate::report::OUR_IMPL;

    /// Checks that every tag is closed in order; returns the element names seen.
    fn check_well_formed(doc: &str) -> Vec<String> {
        let mut stack: Vec<String> = Vec::new();
        let mut seen = Vec::new();
        let mut rest = doc;
        while let Some(start) = rest.find('<') {
            let text = &rest[..start];
            assert!(!text.contains('>'), "stray `>` in text: {text:?}");
            let end = rest[start..].find('>').expect("unclosed tag") + start;
            let tag = &rest[start + 1..end];
            assert!(!tag.contains('<'), "`<` inside a tag: {tag}");
            if let Some(decl) = tag.strip_prefix('?') {
                assert!(decl.ends_with('?'));
            } else if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(
                    stack.pop().as_deref(),
                    Some(name.trim()),
                    "mismatched close"
                );
            } else {
                let self_closing = tag.ends_with('/');
                let name = tag
                    .trim_end_matches('/')
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .to_string();
                // Attribute values are quoted and balanced.
                assert_eq!(
                    tag.matches('"').count() % 2,
                    0,
                    "unbalanced quotes in {tag}"
                );
                seen.push(name.clone());
                if !self_closing {
                    stack.push(name);
                }
            }
            rest = &rest[end + 1..];
        }
        assert!(stack.is_empty(), "unclosed: {stack:?}");
        // Entities are the five predefined ones.
        for (i, _) in doc.match_indices('&') {
            let ent = &doc[i..doc[i..].find(';').map_or(doc.len(), |j| i + j + 1)];
            assert!(
                ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"].contains(&ent),
                "entity {ent}"
            );
        }
        seen
    }

    #[test]
    fn svg_is_well_formed_and_labels_every_row() {
        let mut ours = report(vec![
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
                "backward",
                &[32, 256, 56, 56],
                "nchw",
                "f32",
                150.0,
            ),
            row(OUR_IMPL, "eval_fwd", &[2, 2048], "nchw", "bf16", 4.0),
            row(
                OUR_IMPL,
                "train_fwd",
                &[8, 64, 16, 56, 56],
                "nhwc",
                "f16",
                0.5,
            ),
        ]);
        ours.device = "GPU <A&B> \"x\"".into();
        let theirs = report(vec![
            row(
                "torch",
                "train_fwd",
                &[32, 256, 56, 56],
                "nchw",
                "f32",
                200.0,
            ),
            row("torch-native", "eval_fwd", &[2, 2048], "nchw", "bf16", 8.0),
        ]);
        let doc = svg(&ours, Some(&theirs));
        let names = check_well_formed(&doc);
        assert_eq!(names[0], "svg");
        assert!(doc.starts_with("<?xml"));
        assert!(doc.contains("GPU &lt;A&amp;B&gt; &quot;x&quot;"));
        for r in &ours.rows {
            let label = format!(
                "{} {} {}",
                crate::suite::dims_label(&r.shape),
                r.layout,
                r.dtype
            );
            assert!(doc.contains(&format!(">{label}</text>")), "{label}");
        }
        for name in [OUR_IMPL, "torch", "torch-native"] {
            assert!(doc.contains(&format!(">{name}</text>")), "legend {name}");
        }
        // Groups in op order; a value beyond 100 % widens the axis.
        let (t, e, b) = (
            doc.find(">train_fwd<").unwrap(),
            doc.find(">eval_fwd<").unwrap(),
            doc.find(">backward<").unwrap(),
        );
        assert!(t < e && e < b);
        assert!(doc.contains(">200%</text>"));
        assert!(doc.contains("n/a"));
    }

    #[test]
    fn svg_without_comparison_or_rows() {
        let ours = report(vec![row(
            OUR_IMPL,
            "eval_fwd",
            &[4, 3],
            "nchw",
            "f64",
            50.0,
        )]);
        check_well_formed(&svg(&ours, None));
        check_well_formed(&svg(&report(vec![]), None));
    }

    #[test]
    fn axes() {
        assert_eq!(axis(0.0), (10.0, 100.0));
        assert_eq!(axis(83.0), (10.0, 100.0));
        assert_eq!(axis(101.0), (20.0, 120.0));
        assert_eq!(axis(200.0), (20.0, 200.0));
        assert_eq!(axis(755.6), (100.0, 800.0));
        assert_eq!(axis(f64::NAN), (10.0, 100.0));
        assert_eq!(axis(1.7e308), (1e8, 1e9));
    }

    #[test]
    fn svg_of_an_absurd_percentage_is_finite() {
        let mut r = row(OUR_IMPL, "eval_fwd", &[4, 3], "nchw", "f32", 50.0);
        r.pct_copy = 1.7e308;
        let doc = svg(&report(vec![r]), None);
        check_well_formed(&doc);
        assert!(doc.contains(">1000000000%</text>"), "{doc}");
    }

    #[test]
    fn escaping() {
        assert_eq!(
            xml_escape("a<b>&\"c'\u{1}"),
            "a&lt;b&gt;&amp;&quot;c&apos; "
        );
    }
}

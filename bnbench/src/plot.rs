//! An SVG of efficiency (% of the copy bandwidth) per suite row, drawn with plotters'
//! SVG backend: one chart per op (in suite order), one horizontal bar per
//! implementation and row, the 100 % line darker.

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::report::Report;
use crate::suite::{dims_label, Op};

const WIDTH: u32 = 1100;
const LABEL_W: u32 = 250;
const RIGHT_PAD: u32 = 70;
/// Height of one bar, pixels.
const BAR_H: u32 = 9;
/// Space between rows, pixels.
const ROW_GAP: u32 = 7;
/// Above each chart (its caption) and below it (the axis labels), pixels.
const CHART_TOP: u32 = 38;
const CHART_BOTTOM: u32 = 24;
const FONT: &str = "sans-serif";
const COLORS: [RGBColor; 8] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
];

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

/// Chart x units per percent: bars are drawn to 0.1 %.
const X_UNITS: f64 = 10.0;

/// A bar's label: `12.3%`, in e-notation where that would be long.
fn pct_label(v: f64) -> String {
    if v.abs() < 1e5 {
        format!("{v:.1}%")
    } else {
        format!("{v:.2e}%")
    }
}

/// Text as it may appear in the SVG: XML 1.0 has no control characters.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

struct Series<'a> {
    name: String,
    report: &'a Report,
    impl_name: String,
}

type Key = (String, Vec<usize>, String, String);

fn op_rank(op: &str) -> usize {
    Op::parse(op)
        .and_then(|o| Op::ALL.iter().position(|x| *x == o))
        .unwrap_or(Op::ALL.len())
}

fn row_label(k: &Key) -> String {
    printable(&format!("{} {} {}", dims_label(&k.1), k.2, k.3))
}

/// The SVG document: `ours` (every implementation in it), then every implementation
/// of `theirs` when given, bars matched by (op, shape, layout, dtype).
pub fn svg(ours: &Report, theirs: Option<&Report>) -> Result<String, String> {
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
    let mut keys: Vec<Key> = Vec::new();
    for r in ours.rows.iter().filter(|r| r.is_primary()) {
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
    let value = |s: &Series, key: &Key| {
        s.report
            .rows
            .iter()
            .find(|r| r.impl_name == s.impl_name && r.is_primary() && &r.key() == key)
            .map(|r| r.pct_copy)
            .filter(|v| v.is_finite())
    };
    let max_pct = keys
        .iter()
        .flat_map(|k| series.iter().filter_map(move |s| value(s, k)))
        .fold(0.0, f64::max);
    let (step, x_max) = axis(max_pct);
    let ticks: Vec<f64> = (0..=(x_max / step).round() as usize)
        .map(|i| i as f64 * step)
        .collect();

    let band = series.len().max(1) as u32 * BAR_H + ROW_GAP;
    let legend_rows = series.len().div_ceil(4) as u32;
    let head = 56 + legend_rows * 18 + 8;
    let charts: Vec<(String, Vec<&Key>)> = ops
        .iter()
        .map(|op| (op.clone(), keys.iter().filter(|k| &k.0 == op).collect()))
        .collect();
    let chart_h = |n: usize| CHART_TOP + n as u32 * band + CHART_BOTTOM;
    let height = head + charts.iter().map(|(_, k)| chart_h(k.len())).sum::<u32>() + 10;

    let title = printable(&format!(
        "Batch norm efficiency, % of device-to-device copy ({:.0} GB/s): {}",
        ours.copy_gbps, ours.device
    ));
    let subtitle = printable(&format!(
        "{} {}; bars: minimal bytes / median time as % of the copy bandwidth (higher is better)",
        ours.driver, ours.date
    ));
    let mut out = String::new();
    draw(
        &mut out,
        height,
        Page {
            title: &title,
            subtitle: &subtitle,
            head,
            series: &series,
            charts: &charts,
            band,
            ticks: &ticks,
            x_max,
            value: &value,
        },
    )
    .map_err(|e| format!("cannot draw the plot: {e}"))?;
    Ok(out)
}

struct Page<'a> {
    title: &'a str,
    subtitle: &'a str,
    head: u32,
    series: &'a [Series<'a>],
    charts: &'a [(String, Vec<&'a Key>)],
    band: u32,
    ticks: &'a [f64],
    x_max: f64,
    value: &'a dyn Fn(&Series, &Key) -> Option<f64>,
}

fn draw(out: &mut String, height: u32, p: Page) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::with_string(out, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, mut rest) = root.split_vertically(p.head);
    top.draw(&Text::new(
        p.title.to_string(),
        (10, 10),
        (FONT, 20).into_font().style(FontStyle::Bold),
    ))?;
    top.draw(&Text::new(
        p.subtitle.to_string(),
        (10, 34),
        (FONT, 13).into_font().color(&RGBColor(0x55, 0x55, 0x55)),
    ))?;
    for (i, s) in p.series.iter().enumerate() {
        let x = 10 + (i % 4) as i32 * 260;
        let y = 56 + (i / 4) as i32 * 18;
        top.draw(&Rectangle::new(
            [(x, y), (x + 14, y + 10)],
            COLORS[i % COLORS.len()].filled(),
        ))?;
        top.draw(&Text::new(
            printable(&s.name),
            (x + 20, y - 1),
            (FONT, 14).into_font(),
        ))?;
    }
    // Chart coordinates: x in tenths of a percent; y in pixels from the chart's bottom,
    // row i (from the top) the band [(n - i - 1) * band, (n - i) * band].
    let x_end = (p.x_max * X_UNITS).round() as i64;
    let band = p.band as i32;
    let left = Pos::new(HPos::Left, VPos::Center);
    for (op, keys) in p.charts {
        let n = keys.len();
        let (area, next) = rest.split_vertically(CHART_TOP + n as u32 * p.band + CHART_BOTTOM);
        rest = next;
        let row_bottom = |i: usize| (n - i - 1) as i32 * band;
        let centres: Vec<i32> = (0..n).map(|i| row_bottom(i) + band / 2).collect();
        let label_of = |y: &i32| {
            centres
                .iter()
                .position(|c| c == y)
                .map_or_else(String::new, |i| row_label(keys[i]))
        };
        let ticks: Vec<i64> = p
            .ticks
            .iter()
            .map(|t| (t * X_UNITS).round() as i64)
            .collect();
        let mut chart = ChartBuilder::on(&area)
            .caption(printable(op), (FONT, 18).into_font().style(FontStyle::Bold))
            .margin_right(RIGHT_PAD)
            .margin_left(10)
            .x_label_area_size(CHART_BOTTOM - 4)
            .y_label_area_size(LABEL_W - 10)
            .build_cartesian_2d(
                (0..x_end).with_key_points(ticks),
                (0..n as i32 * band).with_key_points(centres.clone()),
            )?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .bold_line_style(RGBColor(0xdd, 0xdd, 0xdd))
            .x_label_formatter(&|v| format!("{:.0}%", *v as f64 / X_UNITS))
            .y_label_formatter(&label_of)
            .label_style((FONT, 13))
            .draw()?;
        let hundred = (100.0 * X_UNITS) as i64;
        if hundred <= x_end {
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(hundred, 0), (hundred, n as i32 * band)],
                RGBColor(0x88, 0x88, 0x88),
            )))?;
        }
        for (i, key) in keys.iter().enumerate() {
            let top = row_bottom(i) + band - ROW_GAP as i32 / 2;
            for (j, s) in p.series.iter().enumerate() {
                let y0 = top - j as i32 * BAR_H as i32;
                let y1 = y0 - (BAR_H as i32 - 1);
                let mid = (y0 + y1) / 2;
                match (p.value)(s, key) {
                    Some(v) => {
                        let w = (v.clamp(0.0, p.x_max) * X_UNITS).round() as i64;
                        chart.draw_series(std::iter::once(Rectangle::new(
                            [(0, y1), (w, y0)],
                            COLORS[j % COLORS.len()].filled(),
                        )))?;
                        chart.draw_series(std::iter::once(
                            EmptyElement::at((w, mid))
                                + Text::new(
                                    pct_label(v),
                                    (3, 0),
                                    (FONT, 10)
                                        .into_font()
                                        .color(&RGBColor(0x33, 0x33, 0x33))
                                        .pos(left),
                                ),
                        ))?;
                    }
                    None => {
                        chart.draw_series(std::iter::once(
                            EmptyElement::at((0, mid))
                                + Text::new(
                                    "n/a".to_string(),
                                    (3, 0),
                                    (FONT, 10)
                                        .into_font()
                                        .color(&RGBColor(0x99, 0x99, 0x99))
                                        .pos(left),
                                ),
                        ))?;
                    }
                }
            }
        }
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::{report, row};
    use crate::report::OUR_IMPL;

    /// Parses the document as XML (failing the test if it is not) and returns the
    /// trimmed text of every `<text>` element, in document order.
    fn texts(doc: &str) -> Vec<String> {
        let xml = roxmltree::Document::parse(doc).unwrap_or_else(|e| panic!("{e}\n{doc}"));
        assert_eq!(xml.root_element().tag_name().name(), "svg");
        xml.descendants()
            .filter(|n| n.has_tag_name("text"))
            .map(|n| n.text().unwrap_or_default().trim().to_string())
            .collect()
    }

    /// The widths of the `<rect>`s filled with `color`, in document order.
    fn bars(doc: &str, color: RGBColor) -> Vec<f64> {
        let fill = format!("#{:02X}{:02X}{:02X}", color.0, color.1, color.2);
        let xml = roxmltree::Document::parse(doc).unwrap();
        xml.descendants()
            .filter(|n| n.has_tag_name("rect") && n.attribute("fill") == Some(fill.as_str()))
            .map(|n| n.attribute("width").unwrap().parse().unwrap())
            .collect()
    }

    #[test]
    fn svg_is_valid_and_has_every_row_and_bar() {
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
        ours.device = "GPU <A&B> \"x\"\u{1}".into();
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
        let doc = svg(&ours, Some(&theirs)).unwrap();
        let t = texts(&doc);
        assert!(t[0].ends_with(": GPU <A&B> \"x\""), "{t:?}");
        for r in &ours.rows {
            let label = format!("{} {} {}", dims_label(&r.shape), r.layout, r.dtype);
            assert!(t.contains(&label), "{label}: {t:?}");
        }
        for name in [OUR_IMPL, "torch", "torch-native"] {
            assert!(t.iter().any(|x| x == name), "legend {name}: {t:?}");
        }
        // One chart per op, in suite order.
        let at = |s: &str| t.iter().position(|x| x == s).unwrap();
        assert!(at("train_fwd") < at("eval_fwd") && at("eval_fwd") < at("backward"));
        // pct_copy is 100 / µs here: 1 %, 0.67 %, 25 % and 200 % (which widens the axis
        // to 200 %, ticks every 20 %).
        for label in [
            "1.0%", "0.7%", "25.0%", "200.0%", "0%", "100%", "200%", "n/a",
        ] {
            assert!(t.iter().any(|x| x == label), "{label}: {t:?}");
        }
        assert!(!t.iter().any(|x| x == "220%"), "{t:?}");
        // Bars: ours 4 (after the legend's swatch), torch's and torch-native's one each.
        let b = bars(&doc, COLORS[0]);
        assert_eq!(b.len(), 1 + 4, "{doc}");
        assert_eq!(bars(&doc, COLORS[1]).len(), 1 + 1);
        assert_eq!(bars(&doc, COLORS[2]).len(), 1 + 1);
        // Widths in proportion to the values (whole pixels): train_fwd's 1 % and 200 %,
        // eval_fwd's 25 %, backward's 0.67 %.
        let px = b[2] / 200.0;
        assert!(b[2] > 700.0, "{b:?}");
        assert!((b[1] - px).abs() <= 1.0, "{b:?}");
        assert!((b[3] - 25.0 * px).abs() <= 1.0, "{b:?}");
        assert!((b[4] - 0.67 * px).abs() <= 1.0, "{b:?}");
        assert!(!doc.contains("NaN") && !doc.contains("inf"));
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
        let t = texts(&svg(&ours, None).unwrap());
        assert!(t.contains(&"4x3 nchw f64".to_string()), "{t:?}");
        let t = texts(&svg(&report(vec![]), None).unwrap());
        assert!(t[0].starts_with("Batch norm efficiency"), "{t:?}");
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
        let doc = svg(&report(vec![r]), None).unwrap();
        let t = texts(&doc);
        assert!(t.contains(&"1000000000%".to_string()), "{t:?}");
        assert!(t.contains(&"1.70e308%".to_string()), "{t:?}");
        assert!(!doc.contains("NaN") && !doc.contains("inf"));
    }

    #[test]
    fn labels_are_printable() {
        assert_eq!(printable("a\u{1}b\nc\td"), "a b c d");
        assert_eq!(pct_label(12.345), "12.3%");
        assert_eq!(pct_label(123456.0), "1.23e5%");
    }
}

//! Benchmark results, their JSON form (shared with `scripts/torch_baseline.py`) and
//! their tables.
//!
//! ```json
//! {"device": "...", "driver": "...", "date": "YYYY-MM-DD", "copy_gbps": 0.0,
//!  "rows": [{"impl": "cuda-batchnorm", "op": "train_fwd", "shape": [32, 256, 56, 56],
//!            "layout": "nchw", "dtype": "f32", "median_us": 0.0, "gbps": 0.0,
//!            "pct_copy": 0.0, ...}]}
//! ```
//!
//! Rows may carry more fields (`check`, `max_rel_err`, `min_us`, `bytes`, and for the
//! SyncBatchNorm ops `sent_bytes`); readers
//! ignore what they do not know. Further top-level members (run settings) are kept, in
//! order, between `copy_gbps` and `rows`. Operations that could not be timed are not
//! rows: they are listed under `errors`. Written and read with serde_json; the number
//! fields also accept the `NaN`, `Infinity` and `-Infinity` that Python's `json` writes
//! by default.

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::metrics;
use crate::suite::{dims_label, Op};

/// Our implementation's name in result files.
pub const OUR_IMPL: &str = "cuda-batchnorm";

/// One timed operation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResultRow {
    /// Implementation (`cuda-batchnorm`, `torch`, `torch-native`, `torch-compile`).
    #[serde(rename = "impl")]
    pub impl_name: String,
    /// `train_fwd`, `eval_fwd` or `backward`.
    pub op: String,
    /// Sizes, PyTorch order.
    pub shape: Vec<usize>,
    /// `nchw` or `nhwc`.
    pub layout: String,
    /// `f32`, `f16`, `bf16` or `f64`.
    pub dtype: String,
    /// The kernel family (`baseline`, `ilp`, ...) or `auto` (the planner's choice), in a
    /// `--variant` run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// In a `--variant` run: whether this is the (row, op)'s winner, the fastest family
    /// timed whose check did not fail (`crate::tuning::winner`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub winner: Option<bool>,
    /// Median time, microseconds.
    #[serde(deserialize_with = "number")]
    pub median_us: f64,
    /// Minimal bytes / median time, 10^9 bytes per second.
    #[serde(deserialize_with = "number")]
    pub gbps: f64,
    /// `gbps` as a percentage of the copy bandwidth.
    #[serde(deserialize_with = "number")]
    pub pct_copy: f64,
    /// Fastest repetition, microseconds, when known.
    #[serde(
        default,
        deserialize_with = "opt_number",
        skip_serializing_if = "Option::is_none"
    )]
    pub min_us: Option<f64>,
    /// Minimal bytes, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// For a SyncBatchNorm op: the bytes this rank hands its collectives per call
    /// (`crate::metrics::sent_bytes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_bytes: Option<u64>,
    /// `ok`, `failed` or `skipped`, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
    /// Largest norm-wise relative error of the check, when checked.
    #[serde(
        default,
        deserialize_with = "opt_number",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_rel_err: Option<f64>,
}

impl ResultRow {
    /// What identifies a measurement across files: op, shape, layout, dtype.
    pub fn key(&self) -> (String, Vec<usize>, String, String) {
        (
            self.op.clone(),
            self.shape.clone(),
            self.layout.clone(),
            self.dtype.clone(),
        )
    }

    /// Whether the row stands for its key in comparisons and plots: every row of a run
    /// without `--variant`, and the winner of each (row, op) in one with it.
    pub fn is_primary(&self) -> bool {
        self.winner != Some(false)
    }
}

fn unknown() -> String {
    "?".into()
}

/// An operation that could not be run or timed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RowError {
    /// Operation name.
    #[serde(default = "unknown")]
    pub op: String,
    /// Row label.
    #[serde(rename = "row", default = "unknown")]
    pub label: String,
    /// What went wrong.
    #[serde(default = "unknown")]
    pub error: String,
}

/// A kernel family that cannot take an operation (`--variant`): not a failure.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Unavailable {
    /// Operation name.
    #[serde(default = "unknown")]
    pub op: String,
    /// Row label.
    #[serde(rename = "row", default = "unknown")]
    pub label: String,
    /// The family.
    #[serde(default = "unknown")]
    pub variant: String,
    /// Why it cannot (the library's `BnError::VariantUnavailable` reason).
    #[serde(default = "unknown")]
    pub reason: String,
}

/// A result file.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    /// Device name.
    pub device: String,
    /// Driver, `CUDA 13.0`.
    pub driver: String,
    /// `YYYY-MM-DD`.
    pub date: String,
    /// Device-to-device copy bandwidth (bytes read + written), GB/s.
    pub copy_gbps: f64,
    /// Further top-level members, written after the standard ones (run settings).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
    /// Measurements.
    pub rows: Vec<ResultRow>,
    /// Operations that could not be timed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<RowError>,
    /// Families that cannot take an operation (`--variant`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unavailable: Vec<Unavailable>,
}

/// The members of [`Report`] that a reader needs; the rest go to [`Report::extra`].
#[derive(Deserialize)]
struct Known {
    device: String,
    driver: String,
    date: String,
    #[serde(deserialize_with = "number")]
    copy_gbps: f64,
    rows: Vec<ResultRow>,
    #[serde(default)]
    errors: Vec<RowError>,
    #[serde(default)]
    unavailable: Vec<Unavailable>,
}

const KNOWN: [&str; 7] = [
    "device",
    "driver",
    "date",
    "copy_gbps",
    "rows",
    "errors",
    "unavailable",
];

/// A JSON number, `null`, or one of the strings [`quote_non_finite`] makes.
struct NumberOrNull;

impl Visitor<'_> for NumberOrNull {
    type Value = Option<f64>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a number")
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Option<f64>, E> {
        Ok(Some(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Option<f64>, E> {
        Ok(Some(v as f64))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Option<f64>, E> {
        Ok(Some(v as f64))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<f64>, E> {
        match v {
            "NaN" => Ok(Some(f64::NAN)),
            "Infinity" => Ok(Some(f64::INFINITY)),
            "-Infinity" => Ok(Some(f64::NEG_INFINITY)),
            _ => Err(E::invalid_type(de::Unexpected::Str(v), &self)),
        }
    }

    fn visit_unit<E: de::Error>(self) -> Result<Option<f64>, E> {
        Ok(None)
    }

    fn visit_none<E: de::Error>(self) -> Result<Option<f64>, E> {
        Ok(None)
    }
}

fn number<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    d.deserialize_any(NumberOrNull)?
        .ok_or_else(|| de::Error::invalid_type(de::Unexpected::Unit, &NumberOrNull))
}

fn opt_number<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    d.deserialize_any(NumberOrNull)
}

/// Python's `json` writes the non-finite floats as the bare tokens `NaN`, `Infinity` and
/// `-Infinity`, which JSON does not have: outside strings they become strings, which the
/// number fields read back as those values. Everything else is left as it is.
pub fn quote_non_finite(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if !in_string {
            if let Some(tok) = ["NaN", "Infinity", "-Infinity"]
                .into_iter()
                .find(|t| rest.starts_with(t))
            {
                out.push('"');
                out.push_str(tok);
                out.push('"');
                rest = &rest[tok.len()..];
                continue;
            }
            in_string = c == '"';
        } else if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == '"' {
            in_string = false;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// serde_json's compact form with a space after each `,` and `:`, as Python's
/// `json.dumps` writes.
struct Spaced;

impl serde_json::ser::Formatter for Spaced {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.begin_array_value(w, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

fn spaced(v: &impl Serialize) -> Result<String, String> {
    let mut buf = Vec::new();
    v.serialize(&mut serde_json::Serializer::with_formatter(
        &mut buf, Spaced,
    ))
    .map_err(|e| e.to_string())?;
    String::from_utf8(buf).map_err(|e| e.to_string())
}

impl Report {
    /// The JSON document: one top-level member per line, and one line per element of
    /// an array of objects (`rows`, `errors`), as `scripts/torch_baseline.py` writes it.
    pub fn to_json(&self) -> Result<String, String> {
        let err = |e: String| format!("cannot write the results as JSON: {e}");
        let Value::Object(members) = serde_json::to_value(self).map_err(|e| err(e.to_string()))?
        else {
            return Err(err("not an object".into()));
        };
        let mut lines = Vec::with_capacity(members.len());
        for (key, value) in &members {
            let text = match value {
                Value::Array(items) if items.iter().any(|v| v.is_object() || v.is_array()) => {
                    let items: Vec<String> = items
                        .iter()
                        .map(|v| spaced(v).map(|t| format!("    {t}")))
                        .collect::<Result<_, _>>()
                        .map_err(err)?;
                    format!("[\n{}\n  ]", items.join(",\n"))
                }
                v => spaced(v).map_err(err)?,
            };
            lines.push(format!("  {}: {text}", spaced(key).map_err(err)?));
        }
        Ok(format!("{{\n{}\n}}\n", lines.join(",\n")))
    }

    /// Reads a document of the shape above. Errors name the member at fault
    /// (`rows[3].shape[1]: ...`).
    pub fn from_json(text: &str) -> Result<Report, String> {
        let value: Value =
            serde_json::from_str(&quote_non_finite(text)).map_err(|e| e.to_string())?;
        let Value::Object(members) = &value else {
            return Err("the document is not a JSON object".into());
        };
        let k: Known = serde_path_to_error::deserialize(&value).map_err(|e| {
            let path = e.path().to_string();
            if path == "." {
                e.inner().to_string()
            } else {
                format!("{path}: {}", e.inner())
            }
        })?;
        let extra = members
            .iter()
            .filter(|(key, _)| !KNOWN.contains(&key.as_str()))
            .map(|(key, v)| (key.clone(), v.clone()))
            .collect();
        Ok(Report {
            device: k.device,
            driver: k.driver,
            date: k.date,
            copy_gbps: k.copy_gbps,
            extra,
            rows: k.rows,
            errors: k.errors,
            unavailable: k.unavailable,
        })
    }

    /// Reads a file.
    pub fn load(path: &str) -> Result<Report, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
        Report::from_json(&text).map_err(|e| format!("{path}: {e}"))
    }

    /// The distinct implementations, in order of first appearance.
    pub fn impls(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        for r in &self.rows {
            if !v.contains(&r.impl_name) {
                v.push(r.impl_name.clone());
            }
        }
        v
    }

    /// The results table, then one line per error and one per family that could not
    /// take an operation. A `--variant` run's table has a variant column, the winner of
    /// each (row, op) marked `*`.
    pub fn table(&self) -> String {
        let with_impl = self.impls().len() > 1;
        let with_variant =
            self.rows.iter().any(|r| r.variant.is_some()) || !self.unavailable.is_empty();
        let with_sent = self.rows.iter().any(|r| r.sent_bytes.is_some());
        let mut header = vec!["op", "shape", "layout", "dtype"];
        if with_variant {
            header.push("variant");
        }
        header.extend(["median µs", "GB/s", "% copy", "check", "max err"]);
        if with_sent {
            header.push("sent B");
        }
        if with_impl {
            header.insert(0, "impl");
        }
        let first_number = header.iter().position(|h| *h == "median µs").unwrap_or(0);
        let mut right: Vec<usize> = [0, 1, 2, 4].iter().map(|i| first_number + i).collect();
        if with_sent {
            right.push(first_number + 5);
        }
        let mut t = crate::table::new(&header, &right);
        for r in &self.rows {
            let mut cells = vec![
                r.op.clone(),
                dims_label(&r.shape),
                r.layout.clone(),
                r.dtype.clone(),
            ];
            if with_variant {
                let v = r.variant.clone().unwrap_or_else(|| "-".into());
                cells.push(if r.winner == Some(true) {
                    format!("{v} *")
                } else {
                    v
                });
            }
            cells.extend([
                format!("{:.2}", r.median_us),
                format!("{:.1}", r.gbps),
                format!("{:.1}", r.pct_copy),
                r.check.clone().unwrap_or_else(|| "-".into()),
                r.max_rel_err.map_or("-".into(), |e| format!("{e:.1e}")),
            ]);
            if with_sent {
                cells.push(r.sent_bytes.map_or("-".into(), |b| b.to_string()));
            }
            if with_impl {
                cells.insert(0, r.impl_name.clone());
            }
            t.add_row(cells);
        }
        let mut out = crate::table::render(&t);
        if self.rows.iter().any(|r| r.winner == Some(true)) {
            out.push_str(
                "* the winner of its row and op: the fastest family timed whose check passed\n",
            );
        }
        for line in self.sync_overhead() {
            out.push_str(&line);
            out.push('\n');
        }
        for e in &self.errors {
            out.push_str(&format!("{} {}: error: {}\n", e.op, e.label, e.error));
        }
        for u in &self.unavailable {
            out.push_str(&format!(
                "{} {} {}: n/a: {}\n",
                u.op, u.label, u.variant, u.reason
            ));
        }
        out
    }
}

impl Report {
    /// One line per SyncBatchNorm op timed beside its plain op on the same rows (the
    /// primary rows of our implementation): the geometric mean, least and greatest of
    /// its median time over the plain op's, and the microseconds it adds.
    pub fn sync_overhead(&self) -> Vec<String> {
        let ours: Vec<&ResultRow> = self
            .rows
            .iter()
            .filter(|r| r.impl_name == OUR_IMPL && r.is_primary())
            .collect();
        let mut lines = Vec::new();
        for op in Op::SYNC {
            let Some(plain) = op.unsynced() else { continue };
            let pairs: Vec<(f64, f64)> = ours
                .iter()
                .filter(|r| r.op == op.name())
                .filter_map(|r| {
                    ours.iter()
                        .find(|p| {
                            // the same family (a sync op runs the planner's choice)
                            p.op == plain.name()
                                && p.variant == r.variant
                                && (&p.shape, &p.layout, &p.dtype)
                                    == (&r.shape, &r.layout, &r.dtype)
                        })
                        .map(|p| (r.median_us, p.median_us))
                })
                .filter(|(s, p)| *s > 0.0 && *p > 0.0 && s.is_finite() && p.is_finite())
                .collect();
            let ratios: Vec<f64> = pairs.iter().map(|(s, p)| s / p).collect();
            let Some(geo) = metrics::geomean(&ratios) else {
                continue;
            };
            let (lo, hi) = ratios.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &x| {
                (lo.min(x), hi.max(x))
            });
            let added: Vec<f64> = pairs.iter().map(|(s, p)| s - p).collect();
            let added = metrics::median(&added).unwrap_or(f64::NAN);
            lines.push(format!(
                "{} / {}: x{geo:.2} geomean (x{lo:.2} to x{hi:.2}) over {} rows, median {added:+.1} µs per call",
                op.name(),
                plain.name(),
                ratios.len()
            ));
        }
        lines
    }
}

/// Today's date (UTC) as `YYYY-MM-DD`.
pub fn today() -> String {
    date_of(jiff::Timestamp::now())
}

/// The UTC date of a moment as `YYYY-MM-DD`.
pub fn date_of(t: jiff::Timestamp) -> String {
    jiff::tz::TimeZone::UTC.to_datetime(t).date().to_string()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn row(
        impl_name: &str,
        op: &str,
        shape: &[usize],
        layout: &str,
        dtype: &str,
        us: f64,
    ) -> ResultRow {
        ResultRow {
            impl_name: impl_name.into(),
            op: op.into(),
            shape: shape.to_vec(),
            layout: layout.into(),
            dtype: dtype.into(),
            variant: None,
            winner: None,
            median_us: us,
            gbps: 1000.0 / us,
            pct_copy: 100.0 / us,
            min_us: None,
            bytes: None,
            sent_bytes: None,
            check: None,
            max_rel_err: None,
        }
    }

    pub fn report(rows: Vec<ResultRow>) -> Report {
        Report {
            device: "Test GPU".into(),
            driver: "CUDA 13.0".into(),
            date: "2026-01-02".into(),
            copy_gbps: 3000.0,
            rows,
            errors: Vec::new(),
            unavailable: Vec::new(),
            extra: Map::new(),
        }
    }

    #[test]
    fn json_round_trip() {
        let mut r = row(
            OUR_IMPL,
            "train_fwd",
            &[32, 256, 56, 56],
            "nhwc",
            "f16",
            123.456,
        );
        r.min_us = Some(120.0);
        r.bytes = Some(102_760_448);
        r.check = Some("ok".into());
        r.max_rel_err = Some(3.2e-7);
        let mut rep = report(vec![
            r,
            row(OUR_IMPL, "backward", &[2, 2048], "nchw", "f32", 7.0),
        ]);
        rep.errors.push(RowError {
            op: "eval_fwd".into(),
            label: "2x3 nchw f32".into(),
            error: "out \"of\" memory \u{1} ✓".into(),
        });
        rep.extra.insert("tool".into(), "bnbench".into());
        rep.extra.insert("reps".into(), 50.into());
        rep.extra.insert("seed".into(), u64::MAX.into());
        let text = rep.to_json().unwrap();
        assert_eq!(Report::from_json(&text).unwrap(), rep);
        // The standard members first, then the extra ones in order, then rows and errors.
        let at = |k: &str| text.find(&format!("\"{k}\":")).unwrap_or(usize::MAX);
        let order = [
            "device",
            "driver",
            "date",
            "copy_gbps",
            "tool",
            "reps",
            "seed",
            "rows",
            "errors",
        ];
        assert!(order.windows(2).all(|w| at(w[0]) < at(w[1])), "{text}");
        assert!(
            text.starts_with("{\n  \"device\": \"Test GPU\",\n"),
            "{text}"
        );
        assert!(text.contains("\"impl\": \"cuda-batchnorm\""), "{text}");
        assert!(text.contains("\"row\": \"2x3 nchw f32\""), "{text}");
        assert!(text.ends_with("}\n"));
        // Optional members are left out, and so is an empty `errors`.
        rep.errors.clear();
        let text = rep.to_json().unwrap();
        assert!(!text.contains("errors"), "{text}");
        assert_eq!(text.matches("\"min_us\"").count(), 1, "{text}");
        assert_eq!(Report::from_json(&text).unwrap(), rep);
    }

    #[test]
    fn numbers_round_trip_exactly() {
        for n in [
            0.1,
            1.0 / 3.0,
            123456.789,
            5e-324,
            1.7976931348623157e308,
            -0.0,
            2.0f64.powi(60),
            // serde_json's default parser read this one an ulp off (float_roundtrip fixes it).
            13.094999999999999,
            685.0969600000001,
        ] {
            let mut rep = report(vec![row(OUR_IMPL, "eval_fwd", &[4, 3], "nchw", "f32", 1.0)]);
            rep.copy_gbps = n;
            rep.rows[0].median_us = n;
            let back = Report::from_json(&rep.to_json().unwrap()).unwrap();
            assert_eq!(back.copy_gbps.to_bits(), n.to_bits(), "{n}");
            assert_eq!(back.rows[0].median_us.to_bits(), n.to_bits(), "{n}");
        }
        // Non-finite numbers are written as null (JSON has no other way).
        let mut rep = report(vec![]);
        rep.copy_gbps = f64::NAN;
        assert!(rep.to_json().unwrap().contains("\"copy_gbps\": null"));
    }

    #[test]
    fn reads_python_output() {
        // Python's json.dump writes NaN, Infinity and -Infinity by default; those tokens
        // inside strings are left alone. Unknown members, in rows and at the top, are
        // tolerated (and the top-level ones kept).
        let text = "{\"device\": \"NaN \\\" Infinity\", \"driver\": \"d\", \"date\": \"2026-01-01\", \
            \"copy_gbps\": Infinity, \"torch\": \"2.15\", \"nested\": {\"a\": [1, NaN]}, \
            \"rows\": [{\"impl\": \"torch\", \"op\": \"train_fwd\", \"shape\": [2, 3], \
            \"layout\": \"nchw\", \"dtype\": \"f32\", \"median_us\": 2.5, \"gbps\": NaN, \
            \"pct_copy\": -Infinity, \"min_us\": null, \"new_field\": [true], \"u\": \"\\u00e9\\ud83d\\ude00\"}], \
            \"errors\": [{\"impl\": \"torch\", \"op\": \"backward\", \"row\": \"2x3 nchw f32\", \"error\": \"boom\"}, {}]}";
        let rep = Report::from_json(text).unwrap();
        assert_eq!(rep.device, "NaN \" Infinity");
        assert_eq!(rep.copy_gbps, f64::INFINITY);
        let r = &rep.rows[0];
        assert_eq!(r.median_us, 2.5);
        assert!(r.gbps.is_nan());
        assert_eq!(r.pct_copy, f64::NEG_INFINITY);
        assert_eq!(r.min_us, None);
        assert_eq!(rep.extra.keys().collect::<Vec<_>>(), ["torch", "nested"]);
        assert_eq!(rep.errors[0].error, "boom");
        assert_eq!(rep.errors[1].op, "?");
    }

    #[test]
    fn reads_torch_baseline_self_test_output() {
        // Written by `python3 scripts/torch_baseline.py --self-test --json <this file>`.
        let text = include_str!("../testdata/torch_selftest.json");
        let rep = Report::from_json(text).unwrap();
        // Written back, the file is the same bytes: the same members, order, numbers and
        // layout as the Python writer's.
        assert_eq!(rep.to_json().unwrap(), text);
        assert_eq!(
            rep.extra.get("tool").and_then(|v| v.as_str()),
            Some("torch_baseline.py --self-test")
        );
        assert_eq!(rep.impls(), vec!["torch", "torch-native", "torch-compile"]);
        let quick = crate::suite::expand(
            &crate::suite::builtin().unwrap(),
            &crate::suite::Selection {
                sets: vec!["quick".into()],
                ..Default::default()
            },
        );
        assert_eq!(rep.rows.len(), quick.len() * 3 * 3);
        assert!(rep.copy_gbps > 0.0);
        assert_eq!(rep.date.len(), 10);
        for r in &rep.rows {
            assert!(quick.iter().any(|q| q.dims == r.shape
                && q.layout.name() == r.layout
                && q.dtype.name() == r.dtype));
            let op = crate::suite::Op::parse(&r.op).unwrap();
            let dtype = cuda_batchnorm::DType::parse(&r.dtype).unwrap();
            // The script's byte formulas are ours.
            assert_eq!(
                r.bytes,
                Some(crate::metrics::op_bytes(op, &r.shape, dtype)),
                "{r:?}"
            );
            let gbps = crate::metrics::gbps(r.bytes.unwrap(), r.median_us);
            assert!((r.gbps - gbps).abs() <= 1e-9 * gbps, "{r:?}");
            assert!(
                (r.pct_copy - crate::metrics::pct_of(gbps, rep.copy_gbps)).abs()
                    <= 1e-9 * r.pct_copy.max(1.0)
            );
        }
    }

    #[test]
    fn malformed_reports_are_errors() {
        let err = |text: &str| Report::from_json(text).unwrap_err();
        assert!(err("[]").contains("not a JSON object"));
        assert!(err("").contains("EOF"));
        assert!(err("{\"device\": \"x\"").contains("EOF"));
        assert!(
            err("[1, x]").contains("line 1 column 5"),
            "{}",
            err("[1, x]")
        );
        assert!(err("{\"device\": \"x\"}").contains("missing field"));
        let good = "{\"device\":\"d\",\"driver\":\"v\",\"date\":\"2026-01-01\",\"copy_gbps\":1,\"rows\":[{\"impl\":\"t\",\"op\":\"train_fwd\",\"shape\":[2,3],\"layout\":\"nchw\",\"dtype\":\"f32\",\"median_us\":1,\"gbps\":1,\"pct_copy\":1}]}";
        assert!(Report::from_json(good).is_ok());
        let e = err(&good.replace("[2,3]", "[2,-1]"));
        assert!(e.starts_with("rows[0].shape[1]: "), "{e}");
        let e = err(&good.replace("\"median_us\":1", "\"median_us\":\"fast\""));
        assert!(e.starts_with("rows[0].median_us: "), "{e}");
        let e = err(&good.replace("\"median_us\":1", "\"median_us\":null"));
        assert!(e.starts_with("rows[0].median_us: "), "{e}");
        let e = err(&good.replace("\"copy_gbps\":1", "\"copy_gbps\":\"x\""));
        assert!(e.starts_with("copy_gbps: "), "{e}");
        let e = err(&good.replace("\"date\":\"2026-01-01\"", "\"date\":7"));
        assert!(e.starts_with("date: "), "{e}");
        // Python's tokens only count outside strings and as whole tokens.
        assert!(Report::from_json(&good.replace("\"gbps\":1", "\"gbps\":NaNa")).is_err());
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert!(err(&deep).contains("recursion limit"), "{}", err(&deep));
    }

    #[test]
    fn dates() {
        let day = |d: i64| date_of(jiff::Timestamp::from_second(d * 86_400 + 3_600).unwrap());
        assert_eq!(day(0), "1970-01-01");
        assert_eq!(day(59), "1970-03-01");
        assert_eq!(day(11_016), "2000-02-29");
        assert_eq!(day(19_782), "2024-02-29");
        assert_eq!(day(20_454), "2026-01-01");
        assert_eq!(day(-1), "1969-12-31");
        let t = today();
        assert_eq!(t.len(), 10);
        assert!(t.starts_with("20") && t.as_bytes()[4] == b'-' && t.as_bytes()[7] == b'-');
    }

    #[test]
    fn a_variant_run_has_a_variant_column_winners_and_families_na() {
        let timed = |v: &str, us: f64, winner: bool| ResultRow {
            variant: Some(v.into()),
            winner: Some(winner),
            check: Some("ok".into()),
            ..row(OUR_IMPL, "train_fwd", &[4, 8], "nchw", "f32", us)
        };
        let mut rep = report(vec![
            timed("baseline", 10.0, false),
            timed("ilp", 8.0, true),
        ]);
        rep.unavailable.push(Unavailable {
            op: "train_fwd".into(),
            label: "4x8 nchw f32".into(),
            variant: "flat".into(),
            reason: "not built yet".into(),
        });
        let text = rep.to_json().unwrap();
        assert_eq!(Report::from_json(&text).unwrap(), rep);
        assert!(
            text.contains("\"dtype\": \"f32\", \"variant\": \"ilp\", \"winner\": true, "),
            "{text}"
        );
        assert!(
            text.contains("\"unavailable\": [\n    {\"op\": \"train_fwd\", \"row\": \"4x8 nchw f32\", \"variant\": \"flat\", \"reason\": \"not built yet\"}\n  ]"),
            "{text}"
        );
        let t = rep.table();
        let lines: Vec<&str> = t.lines().collect();
        let header: Vec<&str> = lines[0].split_whitespace().collect();
        assert_eq!(header[3..6], ["dtype", "variant", "median"], "{t}");
        assert!(
            lines[2].contains(" baseline ") && !lines[2].contains('*'),
            "{t}"
        );
        assert!(
            lines[3].contains(" ilp * ") && lines[3].contains("8.00"),
            "{t}"
        );
        assert!(lines[4].starts_with("* the winner"), "{t}");
        assert_eq!(lines[5], "train_fwd 4x8 nchw f32 flat: n/a: not built yet");
        // Comparisons and plots take the winner only.
        let primary: Vec<_> = rep.rows.iter().filter(|r| r.is_primary()).collect();
        assert_eq!(primary.len(), 1);
        assert_eq!(primary[0].variant.as_deref(), Some("ilp"));
        // A run without --variant: no such column, members or marks.
        let plain = report(vec![row(
            OUR_IMPL,
            "train_fwd",
            &[4, 8],
            "nchw",
            "f32",
            1.0,
        )]);
        assert!(!plain.table().contains("variant"));
        let text = plain.to_json().unwrap();
        assert!(
            !text.contains("variant") && !text.contains("winner") && !text.contains("unavailable")
        );
        assert!(plain.rows[0].is_primary());
    }

    #[test]
    fn table_lists_rows_and_errors() {
        let mut rep = report(vec![row(
            OUR_IMPL,
            "eval_fwd",
            &[4096, 1024],
            "nchw",
            "f32",
            10.0,
        )]);
        rep.errors.push(RowError {
            op: "backward".into(),
            label: "4096x1024 nchw f32".into(),
            error: "boom".into(),
        });
        let t = rep.table();
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[0].starts_with("op") && lines[0].contains("median µs"),
            "{t}"
        );
        assert!(
            lines[2].starts_with("eval_fwd") && lines[2].contains("4096x1024"),
            "{t}"
        );
        assert!(
            lines[2].contains("10.00") && lines[2].contains("100.0"),
            "{t}"
        );
        assert_eq!(lines[3], "backward 4096x1024 nchw f32: error: boom");
        // A column for the implementation when there are several.
        rep.rows
            .push(row("torch", "eval_fwd", &[4096, 1024], "nchw", "f32", 20.0));
        let t = rep.table();
        assert!(t.starts_with("impl"), "{t}");
        assert!(t.lines().nth(3).unwrap().starts_with("torch "), "{t}");
    }

    #[test]
    fn sync_rows_show_what_they_send_and_their_overhead() {
        let dims = [32, 64, 56, 56];
        let timed = |op: &str, dtype: &str, us: f64| ResultRow {
            sent_bytes: Op::parse(op)
                .and_then(|o| crate::metrics::sent_bytes(o, &dims, cuda_batchnorm::DType::F32)),
            ..row(OUR_IMPL, op, &dims, "nchw", dtype, us)
        };
        let rep = report(vec![
            timed("train_fwd", "f32", 10.0),
            timed("sync_train_fwd", "f32", 15.0),
            timed("train_fwd", "f16", 8.0),
            timed("sync_train_fwd", "f16", 16.0),
            // Its plain op was not timed: no line for it.
            timed("sync_backward", "f32", 30.0),
        ]);
        let text = rep.to_json().unwrap();
        assert_eq!(Report::from_json(&text).unwrap(), rep);
        assert!(text.contains("\"sent_bytes\": 540}"), "{text}");
        assert_eq!(
            rep.sync_overhead(),
            ["sync_train_fwd / train_fwd: x1.73 geomean (x1.50 to x2.00) over 2 rows, median +6.5 µs per call"]
        );
        let t = rep.table();
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].ends_with("sent B"), "{t}");
        assert!(lines[2].ends_with(" -"), "{t}");
        assert!(lines[3].ends_with(" 540"), "{t}");
        assert!(lines[6].ends_with(" 536"), "{t}");
        assert!(
            lines[7].starts_with("sync_train_fwd / train_fwd: x1.73"),
            "{t}"
        );
        assert_eq!(lines.len(), 8, "{t}");
    }
}

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
//! Rows may carry more fields (`check`, `max_rel_err`, `min_us`, `bytes`); readers
//! ignore what they do not know. Operations that could not be timed are not rows: they
//! are listed under `errors`.

use crate::json::{self, Value};
use crate::suite::dims_label;

/// Our implementation's name in result files.
pub const OUR_IMPL: &str = "cuda-batchnorm";

/// One timed operation.
#[derive(Clone, Debug, PartialEq)]
pub struct ResultRow {
    /// Implementation (`cuda-batchnorm`, `torch`, `torch-native`, `torch-compile`).
    pub impl_name: String,
    /// `train_fwd`, `eval_fwd` or `backward`.
    pub op: String,
    /// Sizes, PyTorch order.
    pub shape: Vec<usize>,
    /// `nchw` or `nhwc`.
    pub layout: String,
    /// `f32`, `f16`, `bf16` or `f64`.
    pub dtype: String,
    /// Median time, microseconds.
    pub median_us: f64,
    /// Minimal bytes / median time, 10^9 bytes per second.
    pub gbps: f64,
    /// `gbps` as a percentage of the copy bandwidth.
    pub pct_copy: f64,
    /// Fastest repetition, microseconds, when known.
    pub min_us: Option<f64>,
    /// Minimal bytes, when known.
    pub bytes: Option<u64>,
    /// `ok`, `failed` or `skipped`, when known.
    pub check: Option<String>,
    /// Largest norm-wise relative error of the check, when checked.
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

    fn to_value(&self) -> Value {
        let mut m: Vec<(String, Value)> = vec![
            ("impl".into(), self.impl_name.as_str().into()),
            ("op".into(), self.op.as_str().into()),
            (
                "shape".into(),
                Value::Arr(self.shape.iter().map(|&d| Value::from(d)).collect()),
            ),
            ("layout".into(), self.layout.as_str().into()),
            ("dtype".into(), self.dtype.as_str().into()),
            ("median_us".into(), self.median_us.into()),
            ("gbps".into(), self.gbps.into()),
            ("pct_copy".into(), self.pct_copy.into()),
        ];
        if let Some(v) = self.min_us {
            m.push(("min_us".into(), v.into()));
        }
        if let Some(v) = self.bytes {
            m.push(("bytes".into(), Value::Num(v as f64)));
        }
        if let Some(v) = &self.check {
            m.push(("check".into(), v.as_str().into()));
        }
        if let Some(v) = self.max_rel_err {
            m.push(("max_rel_err".into(), v.into()));
        }
        Value::Obj(m)
    }

    fn from_value(v: &Value, i: usize) -> Result<ResultRow, String> {
        let at = |what: &str| format!("rows[{i}]: {what}");
        let s = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| at(&format!("`{k}` must be a string")))
        };
        let n = |k: &str| {
            v.get(k)
                .and_then(Value::as_f64)
                .ok_or_else(|| at(&format!("`{k}` must be a number")))
        };
        let opt_n = |k: &str| v.get(k).and_then(Value::as_f64);
        let shape = v
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| at("`shape` must be an array"))?
            .iter()
            .map(|d| match d.as_f64() {
                Some(x) if x >= 0.0 && x.fract() == 0.0 && x < 1e18 => Ok(x as usize),
                _ => Err(at("`shape` must hold non-negative integers")),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ResultRow {
            impl_name: s("impl")?,
            op: s("op")?,
            shape,
            layout: s("layout")?,
            dtype: s("dtype")?,
            median_us: n("median_us")?,
            gbps: n("gbps")?,
            pct_copy: n("pct_copy")?,
            min_us: opt_n("min_us"),
            bytes: opt_n("bytes").filter(|b| *b >= 0.0).map(|b| b as u64),
            check: v.get("check").and_then(Value::as_str).map(str::to_string),
            max_rel_err: opt_n("max_rel_err"),
        })
    }
}

/// An operation that could not be run or timed.
#[derive(Clone, Debug, PartialEq)]
pub struct RowError {
    /// Operation name.
    pub op: String,
    /// Row label.
    pub label: String,
    /// What went wrong.
    pub error: String,
}

/// A result file.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// Device name.
    pub device: String,
    /// Driver, `CUDA 13.0`.
    pub driver: String,
    /// `YYYY-MM-DD`.
    pub date: String,
    /// Device-to-device copy bandwidth (bytes read + written), GB/s.
    pub copy_gbps: f64,
    /// Measurements.
    pub rows: Vec<ResultRow>,
    /// Operations that could not be timed.
    pub errors: Vec<RowError>,
    /// Further top-level members, written after the standard ones (run settings).
    pub extra: Vec<(String, Value)>,
}

impl Report {
    /// The JSON document.
    pub fn to_json(&self) -> String {
        let mut m: Vec<(String, Value)> = vec![
            ("device".into(), self.device.as_str().into()),
            ("driver".into(), self.driver.as_str().into()),
            ("date".into(), self.date.as_str().into()),
            ("copy_gbps".into(), self.copy_gbps.into()),
        ];
        m.extend(self.extra.iter().cloned());
        m.push((
            "rows".into(),
            Value::Arr(self.rows.iter().map(ResultRow::to_value).collect()),
        ));
        if !self.errors.is_empty() {
            let errs = self
                .errors
                .iter()
                .map(|e| {
                    Value::Obj(vec![
                        ("op".into(), e.op.as_str().into()),
                        ("row".into(), e.label.as_str().into()),
                        ("error".into(), e.error.as_str().into()),
                    ])
                })
                .collect();
            m.push(("errors".into(), Value::Arr(errs)));
        }
        Value::Obj(m).to_json_pretty()
    }

    /// Reads a document of the shape above.
    pub fn from_json(text: &str) -> Result<Report, String> {
        let v = json::parse(text)?;
        if !matches!(v, Value::Obj(_)) {
            return Err("the document is not a JSON object".into());
        }
        let s = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| format!("`{k}` must be a string"))
        };
        let rows = v
            .get("rows")
            .and_then(Value::as_array)
            .ok_or("`rows` must be an array")?
            .iter()
            .enumerate()
            .map(|(i, r)| ResultRow::from_value(r, i))
            .collect::<Result<Vec<_>, _>>()?;
        let errors = v
            .get("errors")
            .and_then(Value::as_array)
            .unwrap_or(&[])
            .iter()
            .map(|e| RowError {
                op: e
                    .get("op")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_string(),
                label: e
                    .get("row")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_string(),
                error: e
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_string(),
            })
            .collect();
        let known = ["device", "driver", "date", "copy_gbps", "rows", "errors"];
        let extra = match &v {
            Value::Obj(m) => m
                .iter()
                .filter(|(k, _)| !known.contains(&k.as_str()))
                .cloned()
                .collect(),
            _ => Vec::new(),
        };
        Ok(Report {
            device: s("device")?,
            driver: s("driver")?,
            date: s("date")?,
            copy_gbps: v
                .get("copy_gbps")
                .and_then(Value::as_f64)
                .ok_or("`copy_gbps` must be a number")?,
            rows,
            errors,
            extra,
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

    /// The results table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let with_impl = self.impls().len() > 1;
        let mut header = format!(
            "{:<10} {:<18} {:<6} {:<5}",
            "op", "shape", "layout", "dtype"
        );
        if with_impl {
            header = format!("{:<14} {header}", "impl");
        }
        out.push_str(&format!(
            "{header} {:>11} {:>9} {:>7}  {:<7} {:>8}\n",
            "median µs", "GB/s", "% copy", "check", "max err"
        ));
        for r in &self.rows {
            let mut line = format!(
                "{:<10} {:<18} {:<6} {:<5}",
                r.op,
                dims_label(&r.shape),
                r.layout,
                r.dtype
            );
            if with_impl {
                line = format!("{:<14} {line}", r.impl_name);
            }
            let err = r
                .max_rel_err
                .map_or("-".to_string(), |e| format!("{e:.1e}"));
            out.push_str(&format!(
                "{line} {:>11.2} {:>9.1} {:>7.1}  {:<7} {:>8}\n",
                r.median_us,
                r.gbps,
                r.pct_copy,
                r.check.as_deref().unwrap_or("-"),
                err
            ));
        }
        for e in &self.errors {
            out.push_str(&format!(
                "{:<10} {:<30} error: {}\n",
                e.op, e.label, e.error
            ));
        }
        out
    }
}

/// Today's date (UTC) as `YYYY-MM-DD`.
pub fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The proleptic Gregorian date of a day count since 1970-01-01.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    // Shift the epoch to 0000-03-01 so that leap days end each 4/100/400-year cycle.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of the 400-year era, [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of the March-based year
    let mp = (5 * doy + 2) / 153; // month, March = 0
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
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
            median_us: us,
            gbps: 1000.0 / us,
            pct_copy: 100.0 / us,
            min_us: None,
            bytes: None,
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
            extra: Vec::new(),
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
            error: "out \"of\" memory".into(),
        });
        rep.extra.push(("reps".into(), Value::Num(50.0)));
        let text = rep.to_json();
        assert_eq!(Report::from_json(&text).unwrap(), rep);
        // The standard members come first, and rows are one line each.
        assert!(text.starts_with("{\n  \"device\": \"Test GPU\",\n  \"driver\": \"CUDA 13.0\",\n  \"date\": \"2026-01-02\""));
        assert!(text
            .contains("{\"impl\": \"cuda-batchnorm\", \"op\": \"backward\", \"shape\": [2, 2048]"));
    }

    #[test]
    fn reads_torch_baseline_self_test_output() {
        // Written by `python3 scripts/torch_baseline.py --self-test --json <this file>`.
        let rep = Report::from_json(include_str!("../testdata/torch_selftest.json")).unwrap();
        assert_eq!(rep.impls(), vec!["torch", "torch-native", "torch-compile"]);
        let quick = crate::suite::expand(
            &crate::suite::builtin(),
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
        assert!(Report::from_json("[]").is_err());
        assert!(Report::from_json("{\"device\": \"x\"}").is_err());
        let bad_row = "{\"device\":\"d\",\"driver\":\"v\",\"date\":\"2026-01-01\",\"copy_gbps\":1,\"rows\":[{\"impl\":\"t\",\"op\":\"train_fwd\",\"shape\":[2,-1],\"layout\":\"nchw\",\"dtype\":\"f32\",\"median_us\":1,\"gbps\":1,\"pct_copy\":1}]}";
        assert!(Report::from_json(bad_row).unwrap_err().contains("rows[0]"));
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(59), (1970, 3, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(today().len(), 10);
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
        assert!(t.contains("eval_fwd   4096x1024"));
        assert!(t.contains("error: boom"));
    }
}

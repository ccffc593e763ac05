//! The tuning table's JSON format (bench/tuning/README.md): read and checked by the
//! crate's build script (which embeds every bench/tuning/*.json) and written and read by
//! bnbench, from this one file (`#[path]`-included by both, so neither can drift).
//! Plain strings here: the build script cannot use the crate's own types; bnbench's
//! tests check these name lists against them.

use serde_json::{json, Value};

/// The format version this file reads and writes.
pub const FORMAT: u64 = 1;
/// Ops, as `cuda_batchnorm::launch::TunedOp::name` spells them.
pub const OPS: [&str; 4] = ["train_fwd", "eval_fwd", "train_bwd", "eval_bwd"];
/// Layouts, as `Layout::name`.
pub const LAYOUTS: [&str; 2] = ["nchw", "nhwc"];
/// Input dtypes, as `DType::name`.
pub const DTYPES: [&str; 4] = ["f32", "f64", "f16", "bf16"];
/// Kernel families, as `Variant::name`.
pub const VARIANTS: [&str; 4] = ["baseline", "ilp", "flat", "persistent"];

/// One measured choice.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub op: String,
    pub layout: String,
    pub dtype: String,
    /// floor(log2(tensor bytes)).
    pub bytes_log2: u32,
    /// The winner.
    pub variant: String,
    /// The suite row it was measured on (for people; the planner uses the bucket).
    pub shape: Vec<usize>,
    /// The winner's time against the runner-up's (>= 1; 1 when it was alone).
    pub margin: f64,
}

/// A device's table.
#[derive(Clone, Debug, PartialEq)]
pub struct Table {
    /// As the driver names the device (`NVIDIA H200`).
    pub device: String,
    pub compute_capability: (u32, u32),
    /// Where and when it was measured (free text: bnbench's version, the date).
    pub measured: String,
    pub entries: Vec<Entry>,
}

fn field<'a>(v: &'a Value, key: &str, at: &str) -> Result<&'a Value, String> {
    v.get(key).ok_or_else(|| format!("{at}: no `{key}`"))
}

fn text(v: &Value, key: &str, at: &str) -> Result<String, String> {
    field(v, key, at)?
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("{at}: `{key}` is not a string"))
}

fn one_of(v: &Value, key: &str, names: &[&str], at: &str) -> Result<String, String> {
    let s = text(v, key, at)?;
    if names.contains(&s.as_str()) {
        Ok(s)
    } else {
        Err(format!(
            "{at}: `{key}` is `{s}`, not one of {}",
            names.join(", ")
        ))
    }
}

fn uint(v: &Value, at: &str, what: &str) -> Result<u64, String> {
    v.as_u64()
        .ok_or_else(|| format!("{at}: {what} is not a non-negative integer"))
}

/// Parses and checks a table.
pub fn parse(json_text: &str) -> Result<Table, String> {
    let v: Value = serde_json::from_str(json_text).map_err(|e| format!("not JSON: {e}"))?;
    let format = uint(field(&v, "format", "table")?, "table", "`format`")?;
    if format != FORMAT {
        return Err(format!("format {format}; this build reads format {FORMAT}"));
    }
    let cc = field(&v, "compute_capability", "table")?
        .as_array()
        .filter(|a| a.len() == 2)
        .ok_or("table: `compute_capability` is not [major, minor]")?;
    let cc = (
        uint(&cc[0], "table", "the major version")? as u32,
        uint(&cc[1], "table", "the minor version")? as u32,
    );
    let mut entries = Vec::new();
    let list = field(&v, "entries", "table")?
        .as_array()
        .ok_or("table: `entries` is not a list")?;
    for (i, e) in list.iter().enumerate() {
        let at = format!("entry {i}");
        let bytes_log2 = uint(field(e, "bytes_log2", &at)?, &at, "`bytes_log2`")?;
        if bytes_log2 > 64 {
            return Err(format!("{at}: `bytes_log2` {bytes_log2} is above 64"));
        }
        let shape = field(e, "shape", &at)?
            .as_array()
            .ok_or_else(|| format!("{at}: `shape` is not a list"))?
            .iter()
            .map(|d| uint(d, &at, "a size").map(|d| d as usize))
            .collect::<Result<Vec<_>, _>>()?;
        let margin = field(e, "margin", &at)?
            .as_f64()
            .filter(|m| m.is_finite() && *m >= 1.0)
            .ok_or_else(|| format!("{at}: `margin` is not a number >= 1"))?;
        entries.push(Entry {
            op: one_of(e, "op", &OPS, &at)?,
            layout: one_of(e, "layout", &LAYOUTS, &at)?,
            dtype: one_of(e, "dtype", &DTYPES, &at)?,
            bytes_log2: bytes_log2 as u32,
            variant: one_of(e, "variant", &VARIANTS, &at)?,
            shape,
            margin,
        });
    }
    Ok(Table {
        device: text(&v, "device", "table")?,
        compute_capability: cc,
        measured: text(&v, "measured", "table")?,
        entries,
    })
}

/// The table as JSON (what `parse` reads back).
pub fn to_json(t: &Table) -> String {
    let entries: Vec<Value> = t
        .entries
        .iter()
        .map(|e| {
            json!({
                "op": e.op, "layout": e.layout, "dtype": e.dtype, "bytes_log2": e.bytes_log2,
                "variant": e.variant, "shape": e.shape, "margin": e.margin,
            })
        })
        .collect();
    let v = json!({
        "format": FORMAT,
        "device": t.device,
        "compute_capability": [t.compute_capability.0, t.compute_capability.1],
        "measured": t.measured,
        "entries": entries,
    });
    serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
}

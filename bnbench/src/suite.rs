//! The benchmark suite: `bench/suite.txt` parsed and expanded into rows.
//!
//! The file format is documented at the top of `bench/suite.txt`;
//! `scripts/torch_baseline.py` implements the same parsing and expansion, and a test
//! checks that both list the same rows.

use cuda_batchnorm::{DType, MemoryFormat, Shape};

/// The suite file, compiled in.
pub const SUITE_TXT: &str = include_str!("../../bench/suite.txt");

/// Set names `--set` accepts.
pub const SET_NAMES: [&str; 5] = ["quick", "resnet50", "bn1d", "hard", "full"];

/// Set name of rows that come from `--shape`.
pub const CUSTOM_SET: &str = "custom";

/// A timed operation.
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
}

impl Op {
    /// Every op, in the order they run.
    pub const ALL: [Op; 3] = [Op::TrainFwd, Op::EvalFwd, Op::Backward];

    /// The name used on the command line and in JSON.
    pub const fn name(self) -> &'static str {
        match self {
            Op::TrainFwd => "train_fwd",
            Op::EvalFwd => "eval_fwd",
            Op::Backward => "backward",
        }
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|o| o.name() == s)
    }
}

/// One line of the suite file.
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

/// Parses a comma-separated list of sizes: `48,96,35,35`.
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
    if dims.len() < 2 {
        return Err(format!(
            "shape `{s}` has {} dimension(s); batch norm needs (N, C, ...), at least 2",
            dims.len()
        ));
    }
    if dims.len() > cuda_batchnorm::shape::MAX_DIMS {
        return Err(format!(
            "shape `{s}` has more than {} dimensions",
            cuda_batchnorm::shape::MAX_DIMS
        ));
    }
    if dims.contains(&0) {
        return Err(format!(
            "shape `{s}` has a zero size; every size must be at least 1"
        ));
    }
    // Saturating: only "fewer than 2" matters here; Shape::new below rejects sizes that
    // overflow.
    let per_channel = dims[2..].iter().fold(dims[0], |m, &d| m.saturating_mul(d));
    if per_channel < 2 {
        return Err(format!(
            "shape `{s}` has one value per channel; training needs at least 2"
        ));
    }
    Shape::new(&dims, MemoryFormat::Contiguous).map_err(|e| format!("shape `{s}`: {e}"))?;
    Ok(dims)
}

fn parse_list<T>(s: &str, what: &str, parse: impl Fn(&str) -> Option<T>) -> Result<Vec<T>, String> {
    s.split(',')
        .map(|t| parse(t).ok_or_else(|| format!("unknown {what} `{t}`")))
        .collect()
}

/// Parses a layout name, `nchw` or `nhwc` only.
pub fn parse_layout(s: &str) -> Option<MemoryFormat> {
    match s {
        "nchw" => Some(MemoryFormat::Contiguous),
        "nhwc" => Some(MemoryFormat::ChannelsLast),
        _ => None,
    }
}

/// Parses the suite file.
pub fn parse(text: &str) -> Result<Vec<Line>, String> {
    let mut lines = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let content = raw.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        let at = |msg: String| format!("suite line {}: {msg}", i + 1);
        let fields: Vec<&str> = content.split_whitespace().collect();
        if !(4..=5).contains(&fields.len()) {
            return Err(at(format!(
                "expected `<set> <shape> <layouts> <dtypes> [quick]`, got `{content}`"
            )));
        }
        let set = fields[0].to_string();
        if !SET_NAMES.contains(&set.as_str()) || set == "quick" || set == "full" {
            return Err(at(format!("unknown set `{set}`")));
        }
        let dims = parse_dims(fields[1]).map_err(at)?;
        let layouts = parse_list(fields[2], "layout", parse_layout).map_err(at)?;
        let dtypes = parse_list(fields[3], "dtype", DType::parse).map_err(at)?;
        if dims.len() == 2 && layouts.contains(&MemoryFormat::ChannelsLast) {
            return Err(at("a rank-2 shape takes nchw only".into()));
        }
        let quick = match fields.get(4) {
            None => None,
            Some(&"quick") => Some((layouts.clone(), dtypes.clone())),
            Some(q) => {
                let parts: Vec<&str> = q.split(':').collect();
                if parts.len() != 3 || parts[0] != "quick" {
                    return Err(at(format!(
                        "expected `quick` or `quick:<layouts>:<dtypes>`, got `{q}`"
                    )));
                }
                let ql = parse_list(parts[1], "layout", parse_layout).map_err(at)?;
                let qd = parse_list(parts[2], "dtype", DType::parse).map_err(at)?;
                if ql.iter().any(|l| !layouts.contains(l)) || qd.iter().any(|d| !dtypes.contains(d))
                {
                    return Err(at(format!(
                        "`{q}` names a layout or dtype the line does not have"
                    )));
                }
                Some((ql, qd))
            }
        };
        lines.push(Line {
            set,
            dims,
            layouts,
            dtypes,
            quick,
        });
    }
    Ok(lines)
}

/// The suite compiled into the binary.
pub fn builtin() -> Vec<Line> {
    parse(SUITE_TXT).expect("bench/suite.txt is checked by the tests")
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
        let (layouts, dtypes) = if wants("full") || wants(&line.set) {
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
            &builtin(),
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
        let rows = expand(&builtin(), &sel);
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
        let rows = expand(&builtin(), &sel);
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
        assert_eq!(expand(&builtin(), &sel).len(), 1);
    }

    #[test]
    fn bad_lines_are_rejected() {
        for bad in [
            "resnet50 32,64 nchw",
            "nope 32,64 nchw f32",
            "quick 32,64 nchw f32",
            "bn1d 32 nchw f32",
            "bn1d 32,0 nchw f32",
            "bn1d 1,8 nchw f32",
            "bn1d 32,64 nhwc f32",
            "hard 2,3,4 nchw f8",
            "hard 2,3,4 nchw f32 fast",
            "hard 2,3,4 nchw f32 quick:nhwc:f32",
            "hard 2,3,4 nchw f32 quick:nchw",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let ok = parse("# c\n\nhard 2,3,4 nchw,nhwc f32,f16 quick:nhwc:f16 # tail\n").unwrap();
        assert_eq!(
            ok[0].quick,
            Some((vec![MemoryFormat::ChannelsLast], vec![DType::F16]))
        );
    }

    /// scripts/torch_baseline.py must list the same rows, in the same order, for the same
    /// flags (skipped with a note where python3 is not installed).
    #[test]
    fn torch_baseline_lists_the_same_rows() {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/torch_baseline.py");
        let cases: [&[&str]; 7] = [
            &[],
            &["--set", "full"],
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
            let out = match std::process::Command::new("python3")
                .arg(script)
                .arg("--list")
                .args(args)
                .output()
            {
                Ok(o) => o,
                Err(e) => {
                    eprintln!("skipped: python3 not runnable ({e})");
                    return;
                }
            };
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let o =
                crate::cli::parse(std::iter::once("bnbench").chain(args.iter().copied())).unwrap();
            let ours: String = expand(&builtin(), &o.selection)
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

//! Command-line flags.

use cuda_batchnorm::{DType, MemoryFormat};

use crate::suite::{self, Op, Selection, SET_NAMES};

/// Fewest timed repetitions (and the default).
pub const MIN_REPS: usize = 50;
/// Default warm-up runs.
pub const DEFAULT_WARMUP: usize = 10;
/// Default seed of the random inputs.
pub const DEFAULT_SEED: u64 = 0x5EED;

/// `--help`.
pub const HELP: &str = "\
bnbench: times cuda-batchnorm's kernels on a standard shape suite, checks them against
the f64 CPU reference, and compares them with PyTorch (scripts/torch_baseline.py).

USAGE:
    bnbench [FLAGS]

Each row (shape, layout, dtype) and op is first checked against the CPU reference on up
to 8 sampled channels (norm-wise relative error; tolerances f32 1e-5, f16 1e-3, bf16 1e-2,
f64 1e-10), then timed with CUDA events: warm-up, then the repetitions, median; L2 is
flushed (a memset of max(2 x L2, 256 MiB)) before every run, outside the timed region.
GB/s counts the minimal bytes (x read and y written; x, dy read and dx written; plus
parameters and statistics); % copy compares it with a device-to-device copy of 1 GiB
timed the same way. f16/bf16 rows use f32 weight, bias and running statistics.

Without a usable GPU (no driver, no device, or a build without PTX) bnbench says why on
one line, runs the same checks on the CPU backend for a few small shapes, and exits 0
(1 if a check fails).

FLAGS:
    --set NAMES        quick, resnet50, bn1d, hard or full, comma-separated
                       [default: quick, or none when --shape is given]
    --shape DIMS       an extra shape in PyTorch order, e.g. 48,96,35,35 (repeatable, rank >= 2);
                       runs as nchw f32 unless --layout / --dtype say otherwise
    --dtype LIST       f32,f16,bf16,f64: replaces every row's dtypes
    --layout LIST      nchw,nhwc: replaces every row's layouts (rank-2 shapes are nchw only)
    --op LIST          train_fwd,eval_fwd,backward [default: all three]
    --reps N           timed repetitions, at least 50 [default: 50]
    --warmup N         untimed runs before them [default: 10]
    --seed N           seed of the random inputs [default: 24301]
    --device N         CUDA device ordinal [default: 0]
    --no-check         skip the correctness checks
    --json FILE        write the results as JSON (the format torch_baseline.py writes)
    --plot FILE.svg    write an SVG of % of copy bandwidth per row
    --compare FILE     a torch_baseline.py JSON (or an earlier bnbench JSON): print the
                       speedup per row and geometric means per op x layout x dtype
    --from FILE        load our results from a bnbench JSON instead of running (with
                       --compare / --plot / --json, works without a GPU)
    --list             print the selected rows and exit
    -h, --help         this text

EXIT STATUS:
    0 success; 1 a check failed or an op could not run; 2 bad flags or unreadable files.

EXAMPLES:
    bnbench --set resnet50 --dtype f16 --json h100.json
    python3 scripts/torch_baseline.py --set resnet50 --dtype f16 --json torch.json
    bnbench --from h100.json --compare torch.json --plot h100.svg
";

/// Parsed flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Rows to run.
    pub selection: Selection,
    /// Ops to run, in order.
    pub ops: Vec<Op>,
    /// Timed repetitions.
    pub reps: usize,
    /// Warm-up runs.
    pub warmup: usize,
    /// Seed of the inputs.
    pub seed: u64,
    /// CUDA device.
    pub device: usize,
    /// Whether to check results.
    pub check: bool,
    /// `--json`.
    pub json: Option<String>,
    /// `--plot`.
    pub plot: Option<String>,
    /// `--compare`.
    pub compare: Option<String>,
    /// `--from`.
    pub from: Option<String>,
    /// `--list`.
    pub list: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            selection: Selection {
                sets: vec!["quick".into()],
                ..Selection::default()
            },
            ops: Op::ALL.to_vec(),
            reps: MIN_REPS,
            warmup: DEFAULT_WARMUP,
            seed: DEFAULT_SEED,
            device: 0,
            check: true,
            json: None,
            plot: None,
            compare: None,
            from: None,
            list: false,
        }
    }
}

/// What the command line asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Print the help.
    Help,
    /// Run (or list, or load) with these options.
    Run(Box<Options>),
}

fn push_unique<T: PartialEq>(v: &mut Vec<T>, items: Vec<T>) {
    for i in items {
        if !v.contains(&i) {
            v.push(i);
        }
    }
}

fn list<T>(
    flag: &str,
    value: &str,
    what: &str,
    valid: &str,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<Vec<T>, String> {
    if value.is_empty() {
        return Err(format!("{flag} needs a value ({valid})"));
    }
    value
        .split(',')
        .map(|t| {
            parse(t.trim())
                .ok_or_else(|| format!("{flag}: unknown {what} `{t}` (expected {valid})"))
        })
        .collect()
}

fn number(flag: &str, value: &str) -> Result<u64, String> {
    value
        .parse::<u64>()
        .map_err(|_| format!("{flag}: `{value}` is not a non-negative integer"))
}

/// Parses the arguments after the program name.
pub fn parse(args: &[String]) -> Result<Command, String> {
    let mut o = Options::default();
    let mut sets: Vec<String> = Vec::new();
    let mut layouts: Vec<MemoryFormat> = Vec::new();
    let mut dtypes: Vec<DType> = Vec::new();
    let mut ops: Vec<Op> = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = args[i].as_str();
        i += 1;
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg, None),
        };
        let takes_value = matches!(
            flag,
            "--set"
                | "--shape"
                | "--dtype"
                | "--layout"
                | "--op"
                | "--reps"
                | "--warmup"
                | "--seed"
                | "--device"
                | "--json"
                | "--plot"
                | "--compare"
                | "--from"
        );
        let value = if takes_value {
            match inline {
                Some(v) => v,
                None => {
                    let v = args.get(i).ok_or_else(|| format!("{flag} needs a value"))?;
                    i += 1;
                    v.clone()
                }
            }
        } else {
            if inline.is_some() {
                return Err(format!("{flag} takes no value"));
            }
            String::new()
        };
        let file = |v: String| {
            if v.is_empty() {
                Err(format!("{flag} needs a file name"))
            } else {
                Ok(Some(v))
            }
        };
        match flag {
            "-h" | "--help" => return Ok(Command::Help),
            "--set" => push_unique(
                &mut sets,
                list(flag, &value, "set", &SET_NAMES.join(", "), |s| {
                    SET_NAMES.contains(&s).then(|| s.to_string())
                })?,
            ),
            "--shape" => {
                let dims = suite::parse_dims(&value).map_err(|e| format!("--shape: {e}"))?;
                push_unique(&mut o.selection.shapes, vec![dims]);
            }
            "--dtype" => push_unique(
                &mut dtypes,
                list(flag, &value, "dtype", "f32, f16, bf16, f64", DType::parse)?,
            ),
            "--layout" => push_unique(
                &mut layouts,
                list(flag, &value, "layout", "nchw, nhwc", suite::parse_layout)?,
            ),
            "--op" => push_unique(
                &mut ops,
                list(
                    flag,
                    &value,
                    "op",
                    "train_fwd, eval_fwd, backward",
                    Op::parse,
                )?,
            ),
            "--reps" => {
                let n = number(flag, &value)?;
                if n < MIN_REPS as u64 {
                    return Err(format!("--reps must be at least {MIN_REPS}, got {n}"));
                }
                o.reps = usize::try_from(n)
                    .ok()
                    .filter(|&n| n <= 1_000_000)
                    .ok_or("--reps: at most 1000000")?;
            }
            "--warmup" => {
                o.warmup = usize::try_from(number(flag, &value)?)
                    .ok()
                    .filter(|&n| n <= 1_000_000)
                    .ok_or("--warmup: at most 1000000")?;
            }
            "--seed" => o.seed = number(flag, &value)?,
            "--device" => {
                o.device = usize::try_from(number(flag, &value)?)
                    .ok()
                    .filter(|&n| n < 1024)
                    .ok_or("--device: no such ordinal")?;
            }
            "--json" => o.json = file(value)?,
            "--plot" => {
                if !value.to_ascii_lowercase().ends_with(".svg") {
                    return Err(format!(
                        "--plot writes SVG: the file name must end in .svg, got `{value}`"
                    ));
                }
                o.plot = file(value)?;
            }
            "--compare" => o.compare = file(value)?,
            "--from" => o.from = file(value)?,
            "--no-check" => o.check = false,
            "--list" => o.list = true,
            _ if flag.starts_with('-') => return Err(format!("unknown flag `{flag}`")),
            _ => return Err(format!("unexpected argument `{arg}` (flags start with --)")),
        }
    }
    if !sets.is_empty() || o.selection.shapes.is_empty() {
        o.selection.sets = if sets.is_empty() {
            vec!["quick".into()]
        } else {
            sets
        };
    } else {
        o.selection.sets.clear();
    }
    o.selection.layouts = (!layouts.is_empty()).then_some(layouts);
    o.selection.dtypes = (!dtypes.is_empty()).then_some(dtypes);
    if !ops.is_empty() {
        // Run in the suite's op order whatever the flag's order.
        o.ops = Op::ALL.into_iter().filter(|op| ops.contains(op)).collect();
    }
    if let (Some(a), Some(b)) = (&o.json, &o.from) {
        if a == b {
            return Err(format!("--json and --from name the same file `{a}`"));
        }
    }
    Ok(Command::Run(Box::new(o)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Options, String> {
        match parse(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())? {
            Command::Run(o) => Ok(*o),
            Command::Help => Err("help".into()),
        }
    }

    #[test]
    fn defaults() {
        let o = run(&[]).unwrap();
        assert_eq!(o, Options::default());
        assert_eq!(o.selection.sets, vec!["quick"]);
        assert_eq!(o.reps, 50);
        assert_eq!(o.ops, Op::ALL.to_vec());
        assert!(o.check && !o.list);
    }

    #[test]
    fn good_flags() {
        let o = run(&[
            "--set",
            "resnet50,hard",
            "--dtype=f16",
            "--dtype",
            "bf16,f16",
            "--layout",
            "nhwc",
            "--op",
            "backward,train_fwd",
            "--shape",
            "48,96,35,35",
            "--shape=7,3",
            "--reps",
            "200",
            "--warmup",
            "0",
            "--json",
            "out.json",
            "--plot",
            "out.SVG",
            "--compare",
            "torch.json",
            "--no-check",
            "--device",
            "1",
            "--seed",
            "9",
            "--list",
        ])
        .unwrap();
        assert_eq!(o.selection.sets, vec!["resnet50", "hard"]);
        assert_eq!(o.selection.dtypes, Some(vec![DType::F16, DType::BF16]));
        assert_eq!(o.selection.layouts, Some(vec![MemoryFormat::ChannelsLast]));
        assert_eq!(o.selection.shapes, vec![vec![48, 96, 35, 35], vec![7, 3]]);
        assert_eq!(o.ops, vec![Op::TrainFwd, Op::Backward]);
        assert_eq!((o.reps, o.warmup, o.device, o.seed), (200, 0, 1, 9));
        assert_eq!(o.json.as_deref(), Some("out.json"));
        assert_eq!(o.plot.as_deref(), Some("out.SVG"));
        assert_eq!(o.compare.as_deref(), Some("torch.json"));
        assert!(!o.check && o.list);
    }

    #[test]
    fn shape_alone_selects_no_set() {
        let o = run(&["--shape", "48,96,35,35"]).unwrap();
        assert!(o.selection.sets.is_empty());
        let o = run(&["--shape", "48,96,35,35", "--set", "quick"]).unwrap();
        assert_eq!(o.selection.sets, vec!["quick"]);
    }

    #[test]
    fn help() {
        assert_eq!(parse(&["--help".to_string()]).unwrap(), Command::Help);
        assert_eq!(
            parse(&["--reps".into(), "60".into(), "-h".into()]).unwrap(),
            Command::Help
        );
        for flag in [
            "--set",
            "--dtype",
            "--layout",
            "--op",
            "--shape",
            "--reps",
            "--warmup",
            "--json",
            "--plot",
            "--compare",
            "--from",
            "--no-check",
            "--list",
            "--device",
        ] {
            assert!(HELP.contains(flag), "{flag}");
        }
        assert!(HELP.contains(&DEFAULT_SEED.to_string()));
    }

    #[test]
    fn bad_flags() {
        let cases: [(&[&str], &str); 20] = [
            (&["--reps", "49"], "at least 50"),
            (&["--reps", "-3"], "not a non-negative integer"),
            (&["--reps"], "needs a value"),
            (&["--warmup", "x"], "not a non-negative integer"),
            (&["--set", "tiny"], "unknown set `tiny`"),
            (&["--dtype", "f8"], "unknown dtype `f8`"),
            (&["--dtype", ""], "needs a value"),
            (&["--layout", "nwhc"], "unknown layout"),
            (&["--op", "forward"], "unknown op"),
            (&["--shape", "48"], "at least 2"),
            (&["--shape", "4,0,2"], "zero size"),
            (&["--shape", "1,3,1"], "one value per channel"),
            (&["--shape", "a,b"], "comma-separated"),
            (&["--plot", "out.png"], "must end in .svg"),
            (&["--json"], "needs a value"),
            (&["--json="], "needs a file name"),
            (&["--frobnicate"], "unknown flag"),
            (&["resnet50"], "unexpected argument"),
            (&["--no-check=yes"], "takes no value"),
            (&["--from", "a.json", "--json", "a.json"], "same file"),
        ];
        for (args, want) in cases {
            let err = run(args).unwrap_err();
            assert!(err.contains(want), "{args:?}: {err}");
        }
        assert!(run(&["--device", "99999"]).is_err());
    }
}

//! Command-line flags, parsed by clap (derive). Usage errors exit with status 2, as clap's
//! own do; `-h` and `--help` print the same long help.

use clap::builder::{NonEmptyStringValueParser, PossibleValuesParser};
use clap::error::ErrorKind;
use clap::{value_parser, ArgAction, CommandFactory, Parser, ValueEnum};
use cuda_batchnorm::launch::Variant;
use cuda_batchnorm::{DType, MemoryFormat};

use crate::suite::{self, Op, Selection, SET_NAMES};

/// Fewest timed repetitions (and the default).
pub const MIN_REPS: u64 = 50;
/// Most repetitions or warm-up runs.
pub const MAX_RUNS: u64 = 1_000_000;
/// Default warm-up runs.
pub const DEFAULT_WARMUP: u64 = 10;
/// Default seed of the random inputs.
pub const DEFAULT_SEED: u64 = 0x5EED;
/// Device ordinals accepted by `--device` are below this.
pub const MAX_DEVICES: u64 = 1024;

const ABOUT: &str =
    "bnbench: times cuda-batchnorm's kernels on a standard shape suite, checks them \
against the f64 CPU reference, and compares them with PyTorch (scripts/torch_baseline.py).";

const LONG_ABOUT: &str = concat!(
    "bnbench: times cuda-batchnorm's kernels on a standard shape suite (bench/suite.toml), ",
    "checks them against the f64 CPU reference, and compares them with PyTorch ",
    "(scripts/torch_baseline.py).\n",
    "\n",
    "Each row (shape, layout, dtype) and op is first checked against the CPU reference on up ",
    "to 8 sampled channels (norm-wise relative error; tolerances f32 1e-5, f16 1e-3, bf16 ",
    "1e-2, f64 1e-10), then timed with CUDA events: warm-up, then the repetitions, median; L2 ",
    "is flushed (a memset of max(2 x L2, 256 MiB)) before every run, outside the timed ",
    "region. GB/s counts the minimal bytes (x read and y written; x, dy read and dx written; ",
    "plus parameters and statistics); % copy compares it with a device-to-device copy of ",
    "1 GiB timed the same way. f16/bf16 rows use f32 weight, bias and running statistics.\n",
    "\n",
    "Without a usable GPU (no driver, no device, or a build without PTX) bnbench says why on ",
    "its first line, and on the next that nothing is timed on hardware. It then checks the ",
    "selected rows and ops instead (--set, --shape, --dtype, --layout, --op; --seed): on the ",
    "CPU backend against the f64 reference, at the row's size up to 2^20 elements and above ",
    "that at a reduced size it names, with the backward also against finite differences; ",
    "and, where the emulated CUDA driver is built (cuda-batchnorm-emu, on Linux), on the ",
    "kernels themselves through it, at a size the emulator runs in seconds (at most 4096 ",
    "elements). --json then writes those checks (`checks`, with `timed_on_hardware: false` ",
    "and no timed rows). It exits 0, or 1 if a check fails or CUDA_BATCHNORM_REQUIRE_GPU=1 ",
    "is set."
);

const AFTER_HELP: &str = "\
EXIT STATUS:
    0 success; 1 a check failed or an op could not run; 2 bad flags or unreadable files.

EXAMPLES:
    bnbench --set resnet50 --dtype f16 --json h100.json
    python3 scripts/torch_baseline.py --set resnet50 --dtype f16 --json torch.json
    bnbench --from h100.json --compare torch.json --plot h100.svg";

/// An input dtype on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum DtypeArg {
    F32,
    F16,
    Bf16,
    F64,
}

impl From<DtypeArg> for DType {
    fn from(d: DtypeArg) -> DType {
        match d {
            DtypeArg::F32 => DType::F32,
            DtypeArg::F16 => DType::F16,
            DtypeArg::Bf16 => DType::BF16,
            DtypeArg::F64 => DType::F64,
        }
    }
}

/// A memory layout on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LayoutArg {
    /// Contiguous (NC, NCL, NCHW, NCDHW).
    Nchw,
    /// Channels-last (NLC, NHWC, NDHWC).
    Nhwc,
}

impl From<LayoutArg> for MemoryFormat {
    fn from(l: LayoutArg) -> MemoryFormat {
        match l {
            LayoutArg::Nchw => MemoryFormat::Contiguous,
            LayoutArg::Nhwc => MemoryFormat::ChannelsLast,
        }
    }
}

/// One name of `--variant`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum VariantArg {
    /// The planner's own choice.
    Auto,
    /// Every family.
    All,
    /// One family.
    One(Variant),
}

fn parse_variant(s: &str) -> Result<VariantArg, String> {
    match s {
        "auto" => Ok(VariantArg::Auto),
        "all" => Ok(VariantArg::All),
        _ => Variant::parse(s).map(VariantArg::One).ok_or_else(|| {
            let names: Vec<&str> = Variant::ALL.iter().map(|v| v.name()).collect();
            format!(
                "unknown kernel family `{s}` (expected {}, all or auto)",
                names.join(", ")
            )
        }),
    }
}

/// The sizes of one `--shape`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Dims(Vec<usize>);

fn parse_shape(s: &str) -> Result<Dims, String> {
    suite::parse_dims(s).map(Dims)
}

fn parse_svg_path(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("needs a file name".into());
    }
    if !s.to_ascii_lowercase().ends_with(".svg") {
        return Err(format!(
            "--plot writes SVG: the file name must end in .svg, got `{s}`"
        ));
    }
    Ok(s.to_string())
}

#[derive(Parser, Debug)]
#[command(
    name = "bnbench",
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = AFTER_HELP,
    after_long_help = AFTER_HELP,
    disable_help_flag = true,
    args_override_self = true,
    max_term_width = 100
)]
struct Args {
    /// Sets of suite rows: quick, resnet50, bn1d, hard, full or sync (the resnet50
    /// shapes with batch 32, for the SyncBatchNorm ops), comma-separated [default: quick,
    /// or none when --shape is given]
    #[arg(long = "set", value_name = "NAMES", value_delimiter = ',',
          value_parser = PossibleValuesParser::new(SET_NAMES), hide_possible_values = true)]
    sets: Vec<String>,

    /// An extra shape in PyTorch order, e.g. 48,96,35,35 (repeatable, rank >= 2); runs as
    /// nchw f32 unless --layout / --dtype say otherwise
    #[arg(long = "shape", value_name = "DIMS", value_parser = parse_shape)]
    shapes: Vec<Dims>,

    /// Input dtypes, comma-separated: replaces every row's dtypes
    #[arg(long = "dtype", value_name = "LIST", value_delimiter = ',')]
    dtypes: Vec<DtypeArg>,

    /// Layouts, comma-separated: replaces every row's layouts (rank-2 shapes are nchw only)
    #[arg(long = "layout", value_name = "LIST", value_delimiter = ',')]
    layouts: Vec<LayoutArg>,

    /// Ops, comma-separated [default: train_fwd,eval_fwd,backward, and with --set sync
    /// also sync_train_fwd,sync_backward,sync_train_fwd_unverified,sync_backward_unverified]
    #[arg(long = "op", value_name = "LIST", value_delimiter = ',')]
    ops: Vec<Op>,

    /// Timed repetitions, at least 50
    #[arg(long, value_name = "N", default_value_t = MIN_REPS,
          value_parser = value_parser!(u64).range(MIN_REPS..=MAX_RUNS))]
    reps: u64,

    /// Untimed runs before them
    #[arg(long, value_name = "N", default_value_t = DEFAULT_WARMUP,
          value_parser = value_parser!(u64).range(0..=MAX_RUNS))]
    warmup: u64,

    /// Seed of the random inputs
    #[arg(long, value_name = "N", default_value_t = DEFAULT_SEED)]
    seed: u64,

    /// CUDA device ordinal
    #[arg(long, value_name = "N", default_value_t = 0,
          value_parser = value_parser!(u64).range(0..MAX_DEVICES))]
    device: u64,

    /// Skip the correctness checks
    #[arg(long)]
    no_check: bool,

    /// Write the results as JSON (the format torch_baseline.py writes)
    #[arg(long, value_name = "FILE", value_parser = NonEmptyStringValueParser::new())]
    json: Option<String>,

    /// Write an SVG of % of copy bandwidth per row
    #[arg(long, value_name = "FILE.svg", value_parser = parse_svg_path)]
    plot: Option<String>,

    /// A torch_baseline.py JSON (or an earlier bnbench JSON): print the speedup per row and
    /// geometric means per op x layout x dtype
    #[arg(long, value_name = "FILE", value_parser = NonEmptyStringValueParser::new())]
    compare: Option<String>,

    /// Load our results from a bnbench JSON instead of running (with --compare / --plot /
    /// --json, works without a GPU)
    #[arg(long, value_name = "FILE", value_parser = NonEmptyStringValueParser::new())]
    from: Option<String>,

    /// Kernel families to run side by side, comma-separated: baseline, ilp, flat,
    /// persistent, all (the four) or auto (the planner's own choice). Each row and op runs
    /// every one (forced through functional::set_tuning), checked, then timed; a family
    /// that cannot take a call is reported as n/a with the reason, not as a failure. The
    /// table gets a variant column and marks each row and op's winner `*`, the fastest
    /// family whose check passed [default: auto, without the column]
    #[arg(long = "variant", value_name = "NAMES", value_delimiter = ',',
          value_parser = parse_variant)]
    variants: Vec<VariantArg>,

    /// After a --variant run (or --from one's JSON), write a tuning table
    /// (bench/tuning/README.md): per op, kernel layout, input dtype and size bucket, the
    /// winner of the row with the most bytes
    #[arg(long, value_name = "FILE", value_parser = NonEmptyStringValueParser::new())]
    tuning_out: Option<String>,

    /// Plan with a tuning table (bench/tuning/README.md) instead of the one embedded for
    /// the device
    #[arg(long, value_name = "FILE", value_parser = NonEmptyStringValueParser::new(),
          conflicts_with = "from")]
    tuning_in: Option<String>,

    /// Print the PTX entry points the planner picks for the selected rows and ops (and
    /// --variant), one per line, sorted, on an H100-like device (132 SMs, sm_90) with
    /// 16-byte aligned buffers; needs no GPU, times nothing
    #[arg(long, conflicts_with_all = ["list", "from", "json", "plot", "compare", "tuning_out", "deadline"])]
    list_kernels: bool,

    /// Start no row after this many seconds; the rows not run are reported as an error
    /// (so that a capped run still writes its results)
    #[arg(long, value_name = "SECONDS",
          value_parser = value_parser!(u64).range(1..=MAX_RUNS))]
    deadline: Option<u64>,

    /// Print the selected rows and exit
    #[arg(long)]
    list: bool,

    /// This text
    #[arg(short = 'h', long, action = ArgAction::HelpLong)]
    help: Option<bool>,

    /// Internal: the emulated-driver check of a run without a GPU, in a child process
    /// (request on stdin, records on stdout, both JSON; see `crate::emulated`).
    #[arg(long = "emulated-child", hide = true)]
    emulated_child: bool,
}

/// Parsed flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Rows to run.
    pub selection: Selection,
    /// Ops to run, in suite order.
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
    /// `--variant`, expanded, in order, without repeats: a family, or `None` for the
    /// planner's own choice (`auto`). Empty when not given (a run then reports no
    /// variants at all).
    pub variants: Vec<Option<Variant>>,
    /// `--tuning-out`.
    pub tuning_out: Option<String>,
    /// `--tuning-in`.
    pub tuning_in: Option<String>,
    /// `--list-kernels`.
    pub list_kernels: bool,
    /// `--deadline`, seconds.
    pub deadline: Option<u64>,
    /// The hidden `--emulated-child`.
    pub emulated_child: bool,
}

impl Options {
    /// What each row and op runs: `--variant`'s list, or the planner's choice alone.
    pub fn choices(&self) -> Vec<Option<Variant>> {
        if self.variants.is_empty() {
            vec![None]
        } else {
            self.variants.clone()
        }
    }
}

fn unique<T: PartialEq>(items: impl IntoIterator<Item = T>) -> Vec<T> {
    let mut v = Vec::new();
    for i in items {
        if !v.contains(&i) {
            v.push(i);
        }
    }
    v
}

/// The clap command (for its help text and tests).
pub fn command() -> clap::Command {
    Args::command()
}

/// Parses the command line, program name first. `Err` is clap's: a usage error (exit
/// status 2) or the help text (`kind() == DisplayHelp`, exit status 0); `exit()` prints
/// either and exits with its status.
pub fn parse<I, T>(args: I) -> Result<Options, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let a = Args::try_parse_from(args)?;
    if let (Some(j), Some(f)) = (&a.json, &a.from) {
        if j == f {
            return Err(command().error(
                ErrorKind::ArgumentConflict,
                format!("--json and --from name the same file `{j}`"),
            ));
        }
    }
    let variants: Vec<Option<Variant>> = unique(a.variants.iter().flat_map(|v| match v {
        VariantArg::Auto => vec![None],
        VariantArg::All => Variant::ALL.iter().copied().map(Some).collect(),
        VariantArg::One(v) => vec![Some(*v)],
    }));
    for (flag, path) in [
        ("--tuning-out", &a.tuning_out),
        ("--tuning-in", &a.tuning_in),
    ] {
        let Some(p) = path else { continue };
        if [&a.json, &a.from, &a.compare].contains(&&Some(p.clone())) {
            return Err(command().error(
                ErrorKind::ArgumentConflict,
                format!("{flag} names the same file `{p}` as another flag"),
            ));
        }
    }
    if a.tuning_out.is_some() && a.from.is_none() && !variants.iter().any(Option::is_some) {
        return Err(command().error(
            ErrorKind::MissingRequiredArgument,
            "--tuning-out needs --variant with at least one kernel family (or --from the JSON of such a run)",
        ));
    }
    if a.tuning_out.is_some() && a.tuning_out == a.tuning_in {
        return Err(command().error(
            ErrorKind::ArgumentConflict,
            "--tuning-out and --tuning-in name the same file",
        ));
    }
    let shapes: Vec<Vec<usize>> = unique(a.shapes.into_iter().map(|d| d.0));
    let sets = unique(a.sets);
    let sets = if !sets.is_empty() {
        sets
    } else if shapes.is_empty() {
        vec!["quick".to_string()]
    } else {
        Vec::new()
    };
    let layouts: Vec<MemoryFormat> = unique(a.layouts.into_iter().map(MemoryFormat::from));
    let dtypes: Vec<DType> = unique(a.dtypes.into_iter().map(DType::from));
    let ops = if a.ops.is_empty() {
        let mut ops = Op::PLAIN.to_vec();
        if sets.iter().any(|s| s == "sync") {
            ops.extend(Op::SYNC);
        }
        ops
    } else {
        // Run in the suite's op order whatever the flag's order.
        Op::ALL
            .into_iter()
            .filter(|op| a.ops.contains(op))
            .collect()
    };
    // The ranges above keep these within usize on every platform Rust supports.
    let small = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
    Ok(Options {
        selection: Selection {
            sets,
            shapes,
            layouts: (!layouts.is_empty()).then_some(layouts),
            dtypes: (!dtypes.is_empty()).then_some(dtypes),
        },
        ops,
        reps: small(a.reps),
        warmup: small(a.warmup),
        seed: a.seed,
        device: small(a.device),
        check: !a.no_check,
        json: a.json,
        plot: a.plot,
        compare: a.compare,
        from: a.from,
        list: a.list,
        variants,
        tuning_out: a.tuning_out,
        tuning_in: a.tuning_in,
        list_kernels: a.list_kernels,
        deadline: a.deadline,
        emulated_child: a.emulated_child,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Options, clap::Error> {
        parse(std::iter::once("bnbench").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_is_well_formed() {
        command().debug_assert();
    }

    #[test]
    fn defaults() {
        let o = run(&[]).unwrap();
        assert_eq!(o.selection.sets, vec!["quick"]);
        assert!(o.selection.shapes.is_empty());
        assert_eq!(o.selection.layouts, None);
        assert_eq!(o.selection.dtypes, None);
        assert_eq!(o.reps, 50);
        assert_eq!(o.warmup, 10);
        assert_eq!(o.seed, DEFAULT_SEED);
        assert_eq!(o.device, 0);
        assert_eq!(o.ops, Op::PLAIN.to_vec());
        assert!(o.check && !o.list && !o.emulated_child);
        assert!(o.variants.is_empty());
        assert_eq!(o.choices(), vec![None]);
        assert_eq!(
            (o.json, o.plot, o.compare, o.from),
            (None, None, None, None)
        );
        assert_eq!((o.tuning_out, o.tuning_in, o.deadline), (None, None, None));
        assert!(!o.list_kernels);
    }

    #[test]
    fn variant_lists() {
        let v = |args: &[&str]| run(args).unwrap().variants;
        let all: Vec<Option<Variant>> = Variant::ALL.iter().copied().map(Some).collect();
        assert_eq!(v(&["--variant", "all"]), all);
        // In the order given, without repeats; auto is the planner's choice.
        assert_eq!(
            v(&["--variant", "ilp,auto", "--variant=baseline,ilp"]),
            [Some(Variant::Ilp), None, Some(Variant::Baseline)]
        );
        let mut auto_first = vec![None];
        auto_first.extend(all.iter().copied());
        assert_eq!(v(&["--variant", "auto,all,flat"]), auto_first);
        let o = run(&["--variant", "persistent"]).unwrap();
        assert_eq!(o.choices(), [Some(Variant::Persistent)]);
        let o = run(&[
            "--variant",
            "all",
            "--tuning-out",
            "t.json",
            "--tuning-in",
            "old.json",
            "--deadline",
            "120",
        ])
        .unwrap();
        assert_eq!(o.tuning_out.as_deref(), Some("t.json"));
        assert_eq!(o.tuning_in.as_deref(), Some("old.json"));
        assert_eq!(o.deadline, Some(120));
        // --from a --variant run's JSON can be made into a table too.
        let o = run(&["--from", "r.json", "--tuning-out", "t.json"]).unwrap();
        assert!(o.variants.is_empty() && o.tuning_out.is_some());
        let o = run(&["--list-kernels", "--variant", "baseline", "--set", "full"]).unwrap();
        assert!(o.list_kernels);
        assert_eq!(o.variants, [Some(Variant::Baseline)]);
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
            "--shape",
            "7,3",
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
        // A repeated single-valued flag: the last one counts.
        assert_eq!(run(&["--reps", "60", "--reps", "70"]).unwrap().reps, 70);
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
        for args in [&["--help"][..], &["-h"], &["--reps", "60", "-h"]] {
            let e = run(args).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::DisplayHelp, "{args:?}");
            assert_eq!(e.exit_code(), 0);
        }
        let text = command().render_long_help().to_string();
        for flag in [
            "--set",
            "--dtype",
            "--layout",
            "--op",
            "--shape",
            "--reps",
            "--warmup",
            "--seed",
            "--json",
            "--plot",
            "--compare",
            "--from",
            "--no-check",
            "--list",
            "--device",
            "--variant",
            "--tuning-out",
            "--tuning-in",
            "--list-kernels",
            "--deadline",
            "-h, --help",
        ] {
            assert!(text.contains(flag), "{flag}\n{text}");
        }
        // Defaults, possible values, the explanation and the exit statuses.
        assert!(text.contains(&DEFAULT_SEED.to_string()), "{text}");
        assert!(text.contains("[default: 50]"), "{text}");
        for op in Op::ALL {
            assert!(text.contains(&format!("- {}: ", op.name())), "{text}");
        }
        assert!(text.contains("f32, f16, bf16, f64"), "{text}");
        assert!(text.contains("L2"), "{text}");
        assert!(text.contains("2 bad flags or unreadable files"), "{text}");
        assert!(text.contains("nothing is timed on hardware"), "{text}");
        assert!(!text.contains("emulated-child"), "{text}");
    }

    #[test]
    fn the_sync_set_adds_the_sync_ops_unless_ops_are_given() {
        let o = run(&["--set", "sync"]).unwrap();
        let mut want = Op::PLAIN.to_vec();
        want.extend(Op::SYNC);
        assert_eq!(o.ops, want);
        let o = run(&["--set", "sync", "--op", "sync_backward,train_fwd"]).unwrap();
        assert_eq!(o.ops, [Op::TrainFwd, Op::SyncBackward]);
        let o = run(&["--set", "resnet50"]).unwrap();
        assert_eq!(o.ops, Op::PLAIN.to_vec());
    }

    #[test]
    fn bad_flags() {
        let cases: [(&[&str], &str); 31] = [
            (&["--reps", "49"], "49 is not in 50..=1000000"),
            (&["--reps", "-3"], "-3"),
            (&["--reps", "x"], "invalid digit"),
            (&["--reps"], "a value is required"),
            (&["--warmup", "x"], "invalid digit"),
            (&["--warmup", "1000001"], "not in 0..=1000000"),
            (&["--set", "tiny"], "invalid value 'tiny'"),
            (&["--dtype", "f8"], "invalid value 'f8'"),
            (&["--layout", "nwhc"], "invalid value 'nwhc'"),
            (&["--op", "forward"], "invalid value 'forward'"),
            (&["--shape", "48"], "at least 2"),
            (&["--shape", "4,0,2"], "zero size"),
            (&["--shape", "1,3,1"], "one value per channel"),
            (&["--shape", "a,b"], "comma-separated"),
            (&["--plot", "out.png"], "must end in .svg"),
            (&["--json"], "a value is required"),
            (&["--json="], "a value is required"),
            (&["--frobnicate"], "unexpected argument '--frobnicate'"),
            (&["resnet50"], "unexpected argument 'resnet50'"),
            (&["--no-check=yes"], "unexpected value 'yes'"),
            (&["--from", "a.json", "--json", "a.json"], "same file"),
            (&["--variant", "fast"], "unknown kernel family `fast`"),
            (&["--variant", "ilp,"], "unknown kernel family ``"),
            (&["--tuning-out", "t.json"], "needs --variant"),
            (
                &["--variant", "auto", "--tuning-out", "t.json"],
                "needs --variant",
            ),
            (
                &[
                    "--variant",
                    "ilp",
                    "--tuning-out",
                    "t.json",
                    "--json",
                    "t.json",
                ],
                "same file",
            ),
            (
                &[
                    "--variant",
                    "ilp",
                    "--tuning-out",
                    "t.json",
                    "--tuning-in",
                    "t.json",
                ],
                "same file",
            ),
            (
                &["--tuning-in", "t.json", "--from", "r.json"],
                "cannot be used with",
            ),
            (
                &["--list-kernels", "--json", "k.json"],
                "cannot be used with",
            ),
            (&["--list-kernels", "--list"], "cannot be used with"),
            (&["--deadline", "0"], "0 is not in 1..="),
        ];
        for (args, want) in cases {
            let err = run(args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}: {err}");
            let text = err.to_string();
            assert!(text.contains(want), "{args:?}: {text}");
        }
        let err = run(&["--device", "99999"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        // The possible values are named.
        let text = run(&["--dtype", "f8"]).unwrap_err().to_string();
        assert!(text.contains("f32, f16, bf16, f64"), "{text}");
    }
}

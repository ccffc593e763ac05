//! `bnbench`: checks and times cuda-batchnorm's operations on a standard shape suite
//! (`bench/suite.toml`), reports time, GB/s and % of the device's copy bandwidth, and
//! compares with PyTorch (`scripts/torch_baseline.py`). `bnbench --help` lists the
//! flags. Without a GPU it times nothing and checks the selected rows instead, on the
//! CPU backend and on the kernels under the emulated CUDA driver (`nogpu`).

mod check;
mod cli;
mod compare;
mod data;
#[cfg(feature = "emulated")]
mod emulated;
mod gpu;
mod metrics;
mod nogpu;
mod ops;
mod plans;
mod plot;
mod report;
mod suite;
mod table;
mod timing;
mod tuning;

use std::io::Write as _;

use check::Check;
use cli::Options;
use cuda_batchnorm::DType;
use report::{Report, ResultRow, RowError, Unavailable, OUR_IMPL};
use suite::Row;

/// Writes to stdout; a closed stdout (`bnbench --list | head`) ends the program quietly
/// instead of panicking.
fn emit(text: &str) {
    let mut out = std::io::stdout().lock();
    if out
        .write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .is_err()
    {
        std::process::exit(141);
    }
}

macro_rules! out {
    ($($arg:tt)*) => { emit(&format!($($arg)*)) };
}

macro_rules! outln {
    () => { emit("\n") };
    ($($arg:tt)*) => { emit(&(format!($($arg)*) + "\n")) };
}

fn main() {
    // Usage errors exit with status 2, the help with 0 (clap's statuses).
    let opts = cli::parse(std::env::args_os()).unwrap_or_else(|e| e.exit());
    let code = run(&opts);
    let _ = std::io::stdout().flush();
    std::process::exit(code);
}

fn usage_error(msg: &str) -> i32 {
    eprintln!("bnbench: {msg}");
    eprintln!("run `bnbench --help` for the flags");
    2
}

/// Checks before any work that an output file can be written (leaving no file behind
/// where there was none).
fn writable(flag: &str, path: &str) -> Result<(), String> {
    let err = |e: std::io::Error| format!("{flag}: cannot write {path}: {e}");
    let p = std::path::Path::new(path);
    if p.is_dir() {
        return Err(format!("{flag}: {path} is a directory"));
    }
    if p.exists() {
        std::fs::OpenOptions::new()
            .append(true)
            .open(p)
            .map(|_| ())
            .map_err(err)
    } else {
        std::fs::File::create(p).map_err(err)?;
        std::fs::remove_file(p).map_err(err)
    }
}

fn run(opts: &Options) -> i32 {
    if opts.emulated_child {
        #[cfg(feature = "emulated")]
        return emulated::child_main();
        #[cfg(not(feature = "emulated"))]
        return usage_error("--emulated-child: built without the `emulated` feature");
    }
    let suite = match suite::builtin() {
        Ok(s) => s,
        Err(e) => return usage_error(&e),
    };
    let rows = suite::expand(&suite, &opts.selection);
    if opts.list {
        for r in &rows {
            outln!("{}", r.list_line());
        }
        eprintln!("{} rows", rows.len());
        return 0;
    }
    let tuning_in = match &opts.tuning_in {
        Some(p) => match tuning::load(p) {
            Ok(t) => Some(t),
            Err(e) => return usage_error(&format!("--tuning-in: {e}")),
        },
        None => None,
    };
    if opts.list_kernels {
        return list_kernels(&rows, opts, tuning_in.as_ref());
    }
    let theirs = match &opts.compare {
        Some(p) => match Report::load(p) {
            Ok(r) => Some(r),
            Err(e) => return usage_error(&format!("--compare: {e}")),
        },
        None => None,
    };
    for (flag, path) in [
        ("--json", &opts.json),
        ("--plot", &opts.plot),
        ("--tuning-out", &opts.tuning_out),
    ] {
        if let Some(p) = path {
            if let Err(e) = writable(flag, p) {
                return usage_error(&e);
            }
        }
    }
    let mut code = 0;
    let (ours, ours_src) = match &opts.from {
        Some(p) => match Report::load(p) {
            Ok(r) => {
                outln!(
                    "results from {p}: {}, {}, {}, copy {:.1} GB/s",
                    r.device,
                    r.driver,
                    r.date,
                    r.copy_gbps
                );
                out!("{}", r.table());
                (r, p.clone())
            }
            Err(e) => return usage_error(&format!("--from: {e}")),
        },
        None => {
            if rows.is_empty() {
                return usage_error("no rows selected");
            }
            match gpu::open(opts.device, true) {
                Err(why) => return no_gpu(&why, &rows, opts, tuning_in.as_ref()),
                Ok(mut g) => {
                    if let Some(t) = &tuning_in {
                        if let Err(e) = g.use_table(t.planner) {
                            return usage_error(&format!("--tuning-in: {e}"));
                        }
                    }
                    let (rep, ok) = run_gpu(&mut g, &rows, opts, tuning_in.as_ref());
                    if !ok {
                        code = 1;
                    }
                    (rep, "this run".to_string())
                }
            }
        }
    };
    if let Some(p) = &opts.json {
        if !write_json(p, &ours) {
            code = code.max(2);
        }
    }
    if let Some(p) = &opts.tuning_out {
        code = code.max(write_tuning(p, &ours));
    }
    if let Some(t) = &theirs {
        let c = compare::compare(&ours, t);
        outln!();
        out!(
            "{}",
            compare::render(
                &c,
                &ours,
                &ours_src,
                t,
                opts.compare.as_deref().unwrap_or("")
            )
        );
    }
    if let Some(p) = &opts.plot {
        match plot::svg(&ours, theirs.as_ref())
            .and_then(|svg| std::fs::write(p, svg).map_err(|e| e.to_string()))
        {
            Ok(()) => eprintln!("bnbench: wrote {p}"),
            Err(e) => {
                eprintln!("bnbench: --plot: cannot write {p}: {e}");
                code = code.max(2);
            }
        }
    }
    code
}

/// bnbench's version, the date and the flags it was run with: a table's `measured`.
fn measured(date: &str) -> String {
    let flags: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    format!(
        "bnbench {}, {date}, {}",
        env!("CARGO_PKG_VERSION"),
        flags.join(" ")
    )
}

/// Writes the tuning table of `report` (a `--variant` run's) to `--tuning-out`'s file.
/// Returns the exit status it asks for: 0, 1 when there was nothing to write, 2 when it
/// could not be written.
fn write_tuning(path: &str, report: &Report) -> i32 {
    let cc = match tuning::report_cc(report) {
        Some(cc) => cc,
        None => {
            eprintln!(
                "bnbench: --tuning-out: the results do not say the device's compute capability"
            );
            return 1;
        }
    };
    let table = match tuning::table_of(report, cc, &measured(&report.date)) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("bnbench: --tuning-out: nothing written: {e}");
            return 1;
        }
    };
    match std::fs::write(path, tuning::format::to_json(&table)) {
        Ok(()) => {
            eprintln!(
                "bnbench: wrote {path} ({} entries for {})",
                table.entries.len(),
                table.device
            );
            0
        }
        Err(e) => {
            eprintln!("bnbench: --tuning-out: cannot write {path}: {e}");
            2
        }
    }
}

/// `--list-kernels`: the entry points on stdout, one per line and nothing else; notes
/// and errors on stderr. Exit 1 when a plan failed (other than a forced family's n/a).
fn list_kernels(rows: &[Row], opts: &Options, tuning_in: Option<&tuning::Loaded>) -> i32 {
    let choices = opts.choices();
    let k = plans::kernels(rows, &opts.ops, &choices, tuning_in.map(|t| t.planner));
    for n in &k.names {
        outln!("{n}");
    }
    for line in &k.unavailable {
        eprintln!("bnbench: --list-kernels: skipped {line}");
    }
    for line in &k.errors {
        eprintln!("bnbench: --list-kernels: error: {line}");
    }
    let names: Vec<&str> = choices.iter().map(|&c| tuning::choice_name(c)).collect();
    eprintln!(
        "{} kernels for {} rows x {} ops ({}) on a described device: {} SMs, sm_{}{}, 16-byte aligned buffers{}",
        k.names.len(),
        rows.len(),
        opts.ops.len(),
        names.join(", "),
        plans::DEVICE.sm_count,
        plans::DEVICE.compute_capability.0,
        plans::DEVICE.compute_capability.1,
        if tuning_in.is_some() { ", the --tuning-in table" } else { "" }
    );
    if k.errors.is_empty() {
        0
    } else {
        1
    }
}

/// Writes `report` to `--json`'s file; false (after saying why) if it could not.
fn write_json(path: &str, report: &Report) -> bool {
    match report
        .to_json()
        .and_then(|t| std::fs::write(path, t).map_err(|e| e.to_string()))
    {
        Ok(()) => {
            eprintln!("bnbench: wrote {path}");
            true
        }
        Err(e) => {
            eprintln!("bnbench: --json: cannot write {path}: {e}");
            false
        }
    }
}

/// No usable GPU: why, that nothing is timed on hardware, then the selected rows and ops
/// checked on the CPU backend and on the kernels under the emulated driver.
fn no_gpu(why: &str, rows: &[Row], opts: &Options, tuning_in: Option<&tuning::Loaded>) -> i32 {
    outln!("bnbench: no GPU run: {why}");
    let emu_missing = nogpu::emulated_unavailable();
    if opts.check {
        outln!(
            "bnbench: nothing is timed on hardware (no GPU); instead the {} selected row(s) x {} op(s) are checked on the CPU backend against the f64 reference{}",
            rows.len(),
            opts.ops.len(),
            if emu_missing.is_none() {
                ", and on the kernels under the emulated CUDA driver"
            } else {
                ""
            }
        );
    } else {
        outln!("bnbench: nothing is timed on hardware (no GPU), and --no-check leaves nothing to check");
    }
    if opts.plot.is_some() || opts.compare.is_some() {
        eprintln!("bnbench: nothing was timed, so --plot / --compare have no results to use");
    }
    if opts.tuning_out.is_some() {
        eprintln!("bnbench: nothing was timed, so --tuning-out has nothing to write");
    }
    let mut records = Vec::new();
    let mut ok = true;
    if opts.check {
        outln!();
        outln!(
            "CPU backend vs the f64 reference (norm-wise relative error, up to {} channels sampled; more than {} elements: checked at a reduced size; backward also vs central finite differences, f64, tol {:.0e})",
            data::MAX_SAMPLED_CHANNELS,
            nogpu::CPU_MAX_NUMEL,
            check::FD_TOL
        );
        let cpu = nogpu::cpu_records(rows, &opts.ops, opts.seed);
        out!("{}", nogpu::table(&cpu, nogpu::CPU, &opts.ops));
        let (cpu_line, cpu_ok) = nogpu::summary(&cpu, &[nogpu::CPU, nogpu::FINITE_DIFFERENCES]);
        records.extend(cpu);
        let emu_line = match emu_missing {
            Some(why) => format!("not run: {why}"),
            None => match nogpu::emulated_records(
                rows,
                &opts.ops,
                &opts.variants,
                tuning_in.map(|t| t.text.as_str()),
                opts.seed,
            ) {
                nogpu::EmulatedOutcome::Checked(emu) => {
                    outln!();
                    outln!(
                        "Kernels under the emulated CUDA driver vs the f64 reference (each op run once, at most {} elements and {} channels{}{})",
                        nogpu::EMU_MAX_NUMEL,
                        nogpu::EMU_MAX_C,
                        if opts.variants.is_empty() {
                            String::new()
                        } else {
                            let names: Vec<&str> =
                                opts.variants.iter().map(|&c| tuning::choice_name(c)).collect();
                            format!("; each by {}", names.join(", "))
                        },
                        if tuning_in.is_some() {
                            "; planned with the --tuning-in table"
                        } else {
                            ""
                        }
                    );
                    out!("{}", nogpu::table(&emu, nogpu::EMULATED, &opts.ops));
                    let (line, emu_ok) = nogpu::summary(&emu, &[nogpu::EMULATED]);
                    ok &= emu_ok;
                    records.extend(emu);
                    line
                }
                nogpu::EmulatedOutcome::Unavailable(why) => format!("not run: {why}"),
                nogpu::EmulatedOutcome::Failed(why) => {
                    ok = false;
                    format!("FAILED: {why}")
                }
            },
        };
        ok &= cpu_ok;
        outln!();
        outln!("cpu reference check: {cpu_line}");
        outln!("emulated kernels check: {emu_line}");
    }
    let mut code = if ok { 0 } else { 1 };
    if let Some(p) = &opts.json {
        let written = nogpu::report(why, opts.seed, &records)
            .map_err(|e| eprintln!("bnbench: --json: {e}"))
            .is_ok_and(|r| write_json(p, &r));
        if !written {
            code = code.max(2);
        }
    }
    if std::env::var("CUDA_BATCHNORM_REQUIRE_GPU").is_ok_and(|v| v == "1") {
        // A staged GPU run (.gpu/run) must not pass without timing anything.
        outln!("bnbench: CUDA_BATCHNORM_REQUIRE_GPU=1 and there was no GPU run");
        code = code.max(1);
    }
    code
}

/// The GPU run: copy bandwidth, then every row and op (by every `--variant` family).
/// Returns the report and whether every check passed and every op ran (a family that
/// cannot take a call is no failure).
fn run_gpu(
    g: &mut gpu::Gpu,
    rows: &[Row],
    opts: &Options,
    tuning_in: Option<&tuning::Loaded>,
) -> (Report, bool) {
    let started = std::time::Instant::now();
    let cfg = gpu::RunConfig {
        warmup: opts.warmup,
        reps: opts.reps,
        seed: opts.seed,
        check: opts.check,
        timed: true,
    };
    let d = g.summary.clone();
    outln!(
        "bnbench: {} (sm_{}{}, {} SMs, {} MiB L2), driver {}",
        d.name,
        d.cc.0,
        d.cc.1,
        d.sms,
        d.l2_bytes >> 20,
        d.driver
    );
    // The emulated driver found through LD_LIBRARY_PATH (the .gpu/run dry run) runs this
    // same path; its times are the emulator's.
    #[cfg(feature = "emulated")]
    let hardware = d.name != cuda_batchnorm_emu::driver::DEVICE_NAME;
    #[cfg(not(feature = "emulated"))]
    let hardware = true;
    if !hardware {
        outln!("bnbench: this is the emulated CUDA driver: the times below are the emulator's, not hardware's");
    }
    let mut ok = true;
    let mut errors = Vec::new();
    let copy_gbps = match g.copy_bandwidth(&cfg) {
        Ok((gbps, bytes, t)) => {
            outln!(
                "copy: {gbps:.1} GB/s ({} MiB device-to-device, bytes read + written, median {:.1} µs)",
                bytes >> 20,
                t.median_us
            );
            gbps
        }
        Err(e) => {
            outln!("copy: could not be measured: {e}");
            ok = false;
            errors.push(RowError {
                op: "copy".into(),
                label: "device-to-device".into(),
                error: e,
            });
            0.0
        }
    };
    outln!(
        "timing: median of {} runs after {} warm-up, CUDA events, L2 flushed by a {} MiB memset before each run",
        opts.reps,
        opts.warmup,
        g.flush_bytes() >> 20
    );
    if opts.check {
        let tols: Vec<String> = [DType::F32, DType::F16, DType::BF16, DType::F64]
            .iter()
            .map(|&d| format!("{} {:e}", d.name(), check::tolerance(d)))
            .collect();
        outln!(
            "check: up to {} channels vs the f64 reference, norm-wise ({})",
            data::MAX_SAMPLED_CHANNELS,
            tols.join(", ")
        );
    } else {
        outln!("check: skipped (--no-check)");
    }
    let choices = opts.choices();
    let with_variant = !opts.variants.is_empty();
    if with_variant {
        let names: Vec<&str> = choices.iter().map(|&c| tuning::choice_name(c)).collect();
        outln!(
            "variants: {} (each forced through functional::set_tuning, checked, then timed; auto is the planner's own choice)",
            names.join(", ")
        );
    }
    if let Some(t) = tuning_in {
        outln!(
            "tuning: planned with the table of {} ({} entries, measured {})",
            opts.tuning_in.as_deref().unwrap_or("--tuning-in"),
            t.table.entries.len(),
            t.table.measured
        );
        if t.table.device != d.name {
            eprintln!(
                "bnbench: note: the --tuning-in table was measured on `{}`, this device is `{}`",
                t.table.device, d.name
            );
        }
    }
    outln!();
    let total = rows.len() * opts.ops.len() * choices.len();
    let mut done = 0;
    let mut out_rows = Vec::new();
    let mut unavailable = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        if let Some(limit) = opts.deadline {
            if started.elapsed().as_secs() >= limit {
                let left = rows.len() - i;
                ok = false;
                eprintln!("bnbench: --deadline {limit} s reached: {left} row(s) not run");
                errors.push(RowError {
                    op: "-".into(),
                    label: format!("{left} of {} rows", rows.len()),
                    error: format!("not run: the --deadline of {limit} s was reached"),
                });
                break;
            }
        }
        let mut progress = |op: suite::Op, choice| {
            done += 1;
            let v = if with_variant {
                format!(" {}", tuning::choice_name(choice))
            } else {
                String::new()
            };
            eprintln!("[{done}/{total}] {}{v} {}", op.name(), row.label());
        };
        let results = g.run_row(row, &opts.ops, &choices, &cfg, &mut progress);
        for r in results {
            let name = tuning::choice_name(r.variant);
            let what = if with_variant {
                format!("{} {} {}", r.op.name(), row.label(), name)
            } else {
                format!("{} {}", r.op.name(), row.label())
            };
            if let Some(why) = &r.unavailable {
                eprintln!("bnbench: {what}: n/a: {why}");
                unavailable.push(Unavailable {
                    op: r.op.name().into(),
                    label: row.label(),
                    variant: name.into(),
                    reason: why.clone(),
                });
                continue;
            }
            let check = r.check.as_ref();
            if let Some(c) = check {
                if !c.passed() {
                    ok = false;
                    eprintln!(
                        "bnbench: CHECK FAILED: {what}: {} rel err {:.3e} > {:.0e}",
                        c.worst, c.max_rel_err, c.tol
                    );
                }
            }
            if let Some(e) = &r.error {
                ok = false;
                eprintln!("bnbench: {what}: {e}");
                errors.push(RowError {
                    op: r.op.name().into(),
                    label: if with_variant {
                        format!("{} {name}", row.label())
                    } else {
                        row.label()
                    },
                    error: e.clone(),
                });
            }
            if let Some(t) = r.timing {
                let bytes = metrics::op_bytes(r.op, &row.dims, row.dtype);
                let gbps = metrics::gbps(bytes, t.median_us);
                out_rows.push(ResultRow {
                    impl_name: OUR_IMPL.into(),
                    op: r.op.name().into(),
                    shape: row.dims.clone(),
                    layout: row.layout.name().into(),
                    dtype: row.dtype.name().into(),
                    variant: with_variant.then(|| name.to_string()),
                    winner: None,
                    median_us: t.median_us,
                    gbps,
                    pct_copy: metrics::pct_of(gbps, copy_gbps),
                    min_us: Some(t.min_us),
                    bytes: Some(bytes),
                    sent_bytes: metrics::sent_bytes(r.op, &row.dims, row.dtype),
                    check: Some(check.map_or("skipped", Check::status).into()),
                    max_rel_err: check.map(|c| c.max_rel_err).filter(|e| e.is_finite()),
                });
            }
        }
    }
    tuning::mark_winners(&mut out_rows);
    let mut extra = serde_json::Map::from_iter([
        ("tool".to_string(), "bnbench".into()),
        ("timed_on_hardware".into(), hardware.into()),
        ("reps".into(), opts.reps.into()),
        ("warmup".into(), opts.warmup.into()),
        ("flush_bytes".into(), g.flush_bytes().into()),
        ("l2_bytes".into(), d.l2_bytes.into()),
        (
            "compute_capability".into(),
            format!("{}.{}", d.cc.0, d.cc.1).into(),
        ),
        ("seed".into(), opts.seed.into()),
    ]);
    if with_variant {
        let names: Vec<serde_json::Value> = choices
            .iter()
            .map(|&c| tuning::choice_name(c).into())
            .collect();
        extra.insert("variants".into(), names.into());
    }
    if let Some(p) = &opts.tuning_in {
        extra.insert("tuning_in".into(), p.as_str().into());
    }
    let report = Report {
        device: d.name.clone(),
        driver: d.driver.clone(),
        date: report::today(),
        copy_gbps,
        rows: out_rows,
        errors,
        unavailable,
        extra,
    };
    out!("{}", report.table());
    (report, ok)
}

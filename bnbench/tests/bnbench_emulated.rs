//! `bnbench`'s GPU path (device query, copy roofline, L2 flush, checks, CUDA-event
//! timing, JSON) run end to end on the emulated CUDA driver: the binary is started with
//! `LD_LIBRARY_PATH` pointing at the emulator's `libcuda.so`, so cudarc loads it as it
//! would load NVIDIA's. The timings are the emulator's and mean nothing; the test checks
//! that every row ran, was checked against the reference and passed.
//!
//! The same driver told to have no device (`BN_EMU_DRIVER_DEVICES=0`) or to be too old
//! for the PTX (`BN_EMU_DRIVER_VERSION`) gives the runs without a GPU: bnbench explains
//! why, times nothing, and checks the selected rows on the CPU backend and on the
//! kernels under the emulated driver (in a child process that does not inherit those
//! two settings).

use std::ffi::OsStr;
use std::io::Write;
use std::path::Path;
use std::process::{Command, ExitStatus};

/// Why the test cannot run here, if it cannot.
fn unavailable() -> Option<String> {
    if std::env::var("CUDA_BATCHNORM_REQUIRE_GPU").is_ok_and(|v| v == "1") {
        return Some("CUDA_BATCHNORM_REQUIRE_GPU=1 asks for real hardware".into());
    }
    if let Some(reason) = cuda_batchnorm::ptx_unavailable() {
        return Some(format!("built without PTX: {reason}"));
    }
    if cuda_batchnorm_emu::driver::library().is_none() {
        return Some("the emulated driver is built on Linux only".into());
    }
    None
}

/// The folder holding the emulated driver, or None (after printing why) to skip.
fn driver_dir(test: &str) -> Option<&'static Path> {
    if let Some(why) = unavailable() {
        let _ = writeln!(std::io::stderr(), "skipping {test}: {why}");
        return None;
    }
    Path::new(cuda_batchnorm_emu::driver::library()?).parent()
}

/// Rows for the runs without a GPU: both layouts, a float and a half type, an odd C, all
/// three ops. (Not the default quick set: its 2x2048 f32 backward does not meet the f32
/// tolerance on the kernels, whose f32 arithmetic cannot resolve a dx that is almost
/// zero with 2 values per channel; that run is the last test's.)
const SMALL_ROWS: [&str; 8] = [
    "--shape",
    "4,8,6,6",
    "--shape",
    "3,17,5",
    "--layout",
    "nchw,nhwc",
    "--dtype",
    "f32,f16",
];

const NO_ARGS: [&str; 0] = [];

/// Runs bnbench on the emulated driver in `dir` with `env` set; returns its exit status,
/// stdout and stderr.
fn bnbench<S: AsRef<OsStr>>(
    dir: &Path,
    env: &[(&str, &str)],
    args: impl IntoIterator<Item = S>,
) -> (ExitStatus, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bnbench"))
        .env("LD_LIBRARY_PATH", dir)
        .envs(env.iter().copied())
        .args(args)
        .output()
        .expect("start bnbench");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
#[cfg_attr(
    not(cuda_batchnorm_ptx),
    ignore = "built without PTX (no nvcc at build time)"
)]
fn bnbench_runs_its_gpu_path_on_the_emulated_driver() {
    let Some(dir) = driver_dir("bnbench_runs_its_gpu_path_on_the_emulated_driver") else {
        return;
    };
    let json = std::env::temp_dir().join(format!("bnbench-emulated-{}.json", std::process::id()));
    let args = [
        "--shape", "4,8,6,6", "--shape", "3,17,5", "--layout", "nhwc", "--dtype", "f16",
        "--warmup", "1", "--json",
    ];
    let args = args.iter().map(OsStr::new).chain([json.as_os_str()]);
    let (status, stdout, stderr) = bnbench(dir, &[], args);
    assert!(
        status.success(),
        "bnbench failed: {status}\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("emulated device"),
        "bnbench did not run on the emulated driver:\n{stdout}"
    );
    assert!(
        stdout.contains("the times below are the emulator's, not hardware's"),
        "{stdout}"
    );
    let text = std::fs::read_to_string(&json).expect("bnbench wrote its JSON");
    let _ = std::fs::remove_file(&json);
    // 2 shapes x 3 ops, each checked and timed.
    assert_eq!(
        text.matches("\"impl\": \"cuda-batchnorm\"").count(),
        6,
        "{text}"
    );
    assert_eq!(text.matches("\"check\": \"ok\"").count(), 6, "{text}");
    assert!(!text.contains("\"median_us\": null"), "{text}");
    assert!(text.contains("\"timed_on_hardware\": false"), "{text}");
}

/// What a run without a GPU prints after its first line: that nothing was timed on
/// hardware, then both checks passing (the CPU backend, the emulated kernels).
fn assert_checked_without_gpu(stdout: &str) {
    let second = stdout.lines().nth(1).unwrap_or_default();
    assert!(
        second.starts_with("bnbench: nothing is timed on hardware (no GPU)")
            && second.contains("on the kernels under the emulated CUDA driver"),
        "{stdout}"
    );
    assert!(stdout.contains("\ncpu reference check: ok ("), "{stdout}");
    assert!(
        stdout.contains("\nemulated kernels check: ok ("),
        "{stdout}"
    );
}

/// A driver older than the PTX (CUDA 12.8 cannot JIT PTX ISA 9.0): bnbench says why
/// there is no GPU run, naming the driver's version, and runs the CPU self-check.
#[test]
#[cfg_attr(
    not(cuda_batchnorm_ptx),
    ignore = "built without PTX (no nvcc at build time)"
)]
fn bnbench_explains_a_driver_too_old_for_the_ptx() {
    let Some(dir) = driver_dir("bnbench_explains_a_driver_too_old_for_the_ptx") else {
        return;
    };
    let (status, stdout, _) = bnbench(dir, &[("BN_EMU_DRIVER_VERSION", "12080")], SMALL_ROWS);
    assert!(status.success(), "{status}\n{stdout}");
    let first = stdout.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("bnbench: no GPU run: the CUDA driver refused the embedded PTX")
            && first.contains("CUDA_ERROR_UNSUPPORTED_PTX_VERSION")
            && first.contains("this driver reports CUDA 12.8"),
        "{stdout}"
    );
    assert_checked_without_gpu(&stdout);
}

/// A driver that is installed but sees no GPU (a container without one): bnbench names
/// the driver's error, runs the checks and exits 0; under
/// CUDA_BATCHNORM_REQUIRE_GPU=1 the same run fails. An ordinal past the last device is
/// reported the same way.
#[test]
#[cfg_attr(
    not(cuda_batchnorm_ptx),
    ignore = "built without PTX (no nvcc at build time)"
)]
fn bnbench_explains_a_driver_without_a_device() {
    let Some(dir) = driver_dir("bnbench_explains_a_driver_without_a_device") else {
        return;
    };
    let hidden = [("BN_EMU_DRIVER_DEVICES", "0")];
    let (status, stdout, _) = bnbench(dir, &hidden, SMALL_ROWS);
    assert!(status.success(), "{status}\n{stdout}");
    assert_eq!(
        stdout.lines().next().unwrap_or_default(),
        "bnbench: no GPU run: no CUDA device: the driver found none \
         (CUDA_ERROR_NO_DEVICE: no CUDA-capable device is detected)",
        "{stdout}"
    );
    assert_checked_without_gpu(&stdout);

    let required = [hidden[0], ("CUDA_BATCHNORM_REQUIRE_GPU", "1")];
    let (status, stdout, _) = bnbench(dir, &required, SMALL_ROWS);
    assert_eq!(status.code(), Some(1), "{stdout}");
    assert_checked_without_gpu(&stdout);
    assert!(
        stdout.contains("CUDA_BATCHNORM_REQUIRE_GPU=1 and there was no GPU run"),
        "{stdout}"
    );

    // The emulated driver shows four devices.
    let args = ["--device", "4"].into_iter().chain(SMALL_ROWS);
    let (status, stdout, _) = bnbench(dir, &[], args);
    assert!(status.success(), "{status}\n{stdout}");
    assert_eq!(
        stdout.lines().next().unwrap_or_default(),
        "bnbench: no GPU run: no CUDA device: device 4 asked for, 4 present",
        "{stdout}"
    );
}

/// Without a GPU, bnbench checks exactly the rows and ops it was asked for (a row too
/// large for a quick check at a reduced size, which the output names), and `--json`
/// writes what it did, marked as not timed on hardware.
#[test]
#[cfg_attr(
    not(cuda_batchnorm_ptx),
    ignore = "built without PTX (no nvcc at build time)"
)]
fn bnbench_without_a_gpu_checks_the_rows_asked_for_and_writes_them() {
    let Some(dir) = driver_dir("bnbench_without_a_gpu_checks_the_rows_asked_for_and_writes_them")
    else {
        return;
    };
    let json = std::env::temp_dir().join(format!("bnbench-nogpu-{}.json", std::process::id()));
    let args = [
        "--shape",
        "64,32,64,64",
        "--layout",
        "nhwc",
        "--dtype",
        "bf16",
        "--op",
        "eval_fwd,backward",
        "--json",
    ];
    let args = args.iter().map(OsStr::new).chain([json.as_os_str()]);
    let (status, stdout, stderr) = bnbench(dir, &[("BN_EMU_DRIVER_DEVICES", "0")], args);
    assert!(status.success(), "{status}\n{stdout}\n{stderr}");
    assert_checked_without_gpu(&stdout);
    // One row each in the CPU and the emulated table, both at a reduced size, with the
    // two ops asked for and no train_fwd column.
    let row_lines: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("64x32x64x64"))
        .collect();
    assert_eq!(row_lines.len(), 2, "{stdout}");
    assert!(row_lines
        .iter()
        .all(|l| l.contains(" nhwc ") && l.contains(" bf16 ")));
    assert!(row_lines[0].contains(" 32x32x32x32 "), "{stdout}");
    assert!(row_lines[1].contains(" 8x32x4x4 "), "{stdout}");
    assert!(!stdout.contains("train_fwd"), "{stdout}");
    assert!(stdout.contains("eval_fwd") && stdout.contains("backward"));

    let text = std::fs::read_to_string(&json).expect("bnbench wrote its JSON");
    let _ = std::fs::remove_file(&json);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["timed_on_hardware"], false, "{text}");
    assert_eq!(v["rows"], serde_json::json!([]), "{text}");
    assert_eq!(v["device"], "none");
    assert!(v["copy_gbps"].is_number() && v["date"].is_string() && v["driver"].is_string());
    assert!(v["no_gpu"]
        .as_str()
        .unwrap()
        .contains("CUDA_ERROR_NO_DEVICE"));
    let checks = v["checks"].as_array().unwrap();
    let of = |backend: &str| -> Vec<&str> {
        checks
            .iter()
            .filter(|c| c["backend"] == backend)
            .map(|c| c["op"].as_str().unwrap())
            .collect()
    };
    assert_eq!(of("cpu"), ["eval_fwd", "backward"], "{text}");
    assert_eq!(of("cpu-finite-differences"), ["backward"], "{text}");
    assert_eq!(of("emulated"), ["eval_fwd", "backward"], "{text}");
    for c in checks {
        assert_eq!(c["check"], "ok", "{c}");
        assert_eq!(c["shape"], serde_json::json!([64, 32, 64, 64]));
        assert_eq!(c["layout"], "nhwc");
        assert_ne!(c["checked_shape"], c["shape"]);
    }

    // --no-check: nothing to check, said so, and still a valid file.
    let args = ["--shape", "4,3,5", "--no-check", "--json"];
    let args = args.iter().map(OsStr::new).chain([json.as_os_str()]);
    let (status, stdout, _) = bnbench(dir, &[("BN_EMU_DRIVER_DEVICES", "0")], args);
    assert!(status.success(), "{status}\n{stdout}");
    assert!(
        stdout.contains("--no-check leaves nothing to check"),
        "{stdout}"
    );
    let text = std::fs::read_to_string(&json).expect("bnbench wrote its JSON");
    let _ = std::fs::remove_file(&json);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["checks"], serde_json::json!([]), "{text}");
    assert_eq!(v["timed_on_hardware"], false, "{text}");
}

/// The default run without a GPU is the quick set: every row in both tables, and the
/// exit status agrees with the summary lines.
#[test]
#[cfg_attr(
    not(cuda_batchnorm_ptx),
    ignore = "built without PTX (no nvcc at build time)"
)]
fn bnbench_without_a_gpu_checks_the_quick_set_by_default() {
    let Some(dir) = driver_dir("bnbench_without_a_gpu_checks_the_quick_set_by_default") else {
        return;
    };
    let (status, stdout, _) = bnbench(dir, &[("BN_EMU_DRIVER_DEVICES", "0")], NO_ARGS);
    assert!(
        stdout
            .lines()
            .nth(1)
            .unwrap_or_default()
            .contains("the 10 selected row(s) x 3 op(s) are checked"),
        "{stdout}"
    );
    assert!(
        stdout.contains("\ncpu reference check: ok (40 checks)"),
        "{stdout}"
    );
    let emulated_ok = stdout.contains("\nemulated kernels check: ok (30 checks)");
    assert!(
        emulated_ok || stdout.contains("\nemulated kernels check: FAILED ("),
        "{stdout}"
    );
    assert_eq!(status.success(), emulated_ok, "{status}\n{stdout}");
    assert_eq!(stdout.matches("\n32x256x56x56 ").count(), 2 * 4, "{stdout}");
}

/// The hidden child mode refuses a request it cannot read, with exit status 2 and no
/// panic.
#[test]
#[cfg_attr(
    not(cuda_batchnorm_ptx),
    ignore = "built without PTX (no nvcc at build time)"
)]
fn the_emulated_child_refuses_a_bad_request() {
    if !Path::new(env!("CARGO_BIN_EXE_bnbench")).exists() {
        // A test binary copied to another machine (.gpu/run) without bnbench beside it.
        let _ = writeln!(
            std::io::stderr(),
            "skipping the_emulated_child_refuses_a_bad_request: no bnbench binary here"
        );
        return;
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_bnbench"))
        .arg("--emulated-child")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start bnbench");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"{\"seed\": 1, \"ops\": [\"fwd\"]}")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("bad request"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.stdout.is_empty());
}

/// `--variant all` on the emulated driver's GPU path: every family forced in turn, each
/// checked and timed where it can take the call, n/a with the library's reason where it
/// cannot (ilp on planes of 5 values; flat and persistent not built yet), a winner per
/// row and op; `--tuning-out` writes the winners as a tuning table, which
/// `--tuning-in` then plans with.
#[test]
#[cfg_attr(
    not(cuda_batchnorm_ptx),
    ignore = "built without PTX (no nvcc at build time)"
)]
fn bnbench_times_every_family_and_writes_a_tuning_table() {
    let Some(dir) = driver_dir("bnbench_times_every_family_and_writes_a_tuning_table") else {
        return;
    };
    let tmp = std::env::temp_dir();
    let pid = std::process::id();
    let json = tmp.join(format!("bnbench-variants-{pid}.json"));
    let table = tmp.join(format!("bnbench-tuning-{pid}.json"));
    let args = [
        "--shape",
        "4,8,6,6",
        "--shape",
        "3,17,5",
        "--op",
        "train_fwd,eval_fwd",
        "--variant",
        "all",
        "--warmup",
        "0",
        "--json",
    ];
    let args = args.iter().map(OsStr::new).chain([
        json.as_os_str(),
        OsStr::new("--tuning-out"),
        table.as_os_str(),
    ]);
    let (status, stdout, stderr) = bnbench(dir, &[], args);
    assert!(status.success(), "{status}\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("variants: baseline, ilp, flat, persistent"),
        "{stdout}"
    );
    let text = std::fs::read_to_string(&json).expect("bnbench wrote its JSON");
    let _ = std::fs::remove_file(&json);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let rows = v["rows"].as_array().unwrap();
    let timed: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| {
            (
                r["op"].as_str().unwrap().into(),
                format!("{}", r["shape"]),
                r["variant"].as_str().unwrap().into(),
            )
        })
        .collect();
    // baseline and flat take both rows and ops; ilp 4x8x6x6 only; persistent its
    // training forward only (the eval forward is one pass already, planes of 5 values
    // are not vectors).
    let per = |variant: &str| timed.iter().filter(|t| t.2 == variant).count();
    assert_eq!(timed.len(), 11, "{text}");
    assert_eq!(
        (per("baseline"), per("ilp"), per("flat"), per("persistent")),
        (4, 2, 4, 1),
        "{text}"
    );
    assert!(
        timed
            .iter()
            .filter(|t| t.2 == "ilp" || t.2 == "persistent")
            .all(|t| t.1 == "[4,8,6,6]"),
        "{text}"
    );
    assert!(rows.iter().all(|r| r["check"] == "ok"), "{text}");
    // One winner per row and op.
    assert_eq!(
        rows.iter().filter(|r| r["winner"] == true).count(),
        4,
        "{text}"
    );
    assert_eq!(
        rows.iter().filter(|r| r["winner"] == false).count(),
        7,
        "{text}"
    );
    let na = v["unavailable"].as_array().unwrap();
    let count = |variant: &str, why: &str| {
        na.iter()
            .filter(|u| u["variant"] == variant && u["reason"].as_str().unwrap().contains(why))
            .count()
    };
    assert_eq!(
        count("persistent", "planes of a multiple of 4"),
        1,
        "{text}"
    );
    assert_eq!(count("persistent", "one pass already"), 2, "{text}");
    assert_eq!(
        count("ilp", "planes of a multiple of 4 values, not 5"),
        2,
        "{text}"
    );
    assert_eq!(na.len(), 5, "{text}");
    assert!(v["errors"].is_null(), "{text}");
    assert_eq!(
        v["variants"],
        serde_json::json!(["baseline", "ilp", "flat", "persistent"])
    );
    // The text table: a variant column, the winners marked, the n/a lines.
    assert!(stdout.contains(" variant "), "{stdout}");
    assert_eq!(stdout.matches(" *  ").count(), 4, "{stdout}");
    assert!(
        stdout.contains("train_fwd 3x17x5 nchw f32 ilp: n/a: nchw needs planes"),
        "{stdout}"
    );

    // The tuning table: per (op, layout, dtype, bucket) the winner; 3x17x5's is the
    // baseline or flat, the families that took it.
    let t = std::fs::read_to_string(&table).expect("bnbench wrote the tuning table");
    let tv: serde_json::Value = serde_json::from_str(&t).unwrap();
    assert_eq!(tv["format"], 1, "{t}");
    assert_eq!(tv["device"], v["device"], "{t}");
    assert!(tv["compute_capability"].is_array(), "{t}");
    assert!(
        tv["measured"]
            .as_str()
            .unwrap()
            .starts_with("bnbench 0.1.0, 20"),
        "{t}"
    );
    assert!(
        tv["measured"].as_str().unwrap().contains("--variant all"),
        "{t}"
    );
    let entries = tv["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 4, "{t}");
    for e in entries {
        assert_eq!(
            (e["layout"].as_str(), e["dtype"].as_str()),
            (Some("nchw"), Some("f32"))
        );
        if e["shape"] == serde_json::json!([3, 17, 5]) {
            assert!(e["variant"] == "baseline" || e["variant"] == "flat", "{t}");
            assert!(e["margin"].as_f64().unwrap() >= 1.0);
            assert_eq!(e["bytes_log2"], 9, "{t}");
        } else {
            assert_eq!(e["bytes_log2"], 12, "{t}");
            assert!(e["margin"].as_f64().unwrap() >= 1.0);
        }
    }

    // --tuning-in: planned with it, said so, and recorded.
    let args = [
        "--shape", "3,17,5", "--op", "eval_fwd", "--warmup", "0", "--json",
    ];
    let args = args.iter().map(OsStr::new).chain([
        json.as_os_str(),
        OsStr::new("--tuning-in"),
        table.as_os_str(),
    ]);
    let (status, stdout, stderr) = bnbench(dir, &[], args);
    let _ = std::fs::remove_file(&table);
    assert!(status.success(), "{status}\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("tuning: planned with the table of ")
            && stdout.contains("(4 entries, measured bnbench 0.1.0, "),
        "{stdout}"
    );
    let text = std::fs::read_to_string(&json).expect("bnbench wrote its JSON");
    let _ = std::fs::remove_file(&json);
    assert!(text.contains("\"tuning_in\": "), "{text}");
    // No --variant: the run's output has no variant column or members.
    assert!(
        !text.contains("\"variant\"") && !stdout.contains(" variant "),
        "{text}"
    );
}

/// Without a GPU, `--variant` applies to the kernels checked under the emulated driver
/// (they run through the functional API, so the forced family is what runs): ilp takes
/// 4x8x6x6 and not 3x17x5, whose every op it reports n/a, which fails nothing.
#[test]
#[cfg_attr(
    not(cuda_batchnorm_ptx),
    ignore = "built without PTX (no nvcc at build time)"
)]
fn bnbench_without_a_gpu_checks_each_family_asked_for() {
    let Some(dir) = driver_dir("bnbench_without_a_gpu_checks_each_family_asked_for") else {
        return;
    };
    let json = std::env::temp_dir().join(format!(
        "bnbench-nogpu-variants-{}.json",
        std::process::id()
    ));
    let args = [
        "--shape",
        "3,17,5",
        "--shape",
        "4,8,6,6",
        "--variant",
        "ilp,baseline",
        "--json",
    ];
    let args = args.iter().map(OsStr::new).chain([json.as_os_str()]);
    let (status, stdout, stderr) = bnbench(dir, &[("BN_EMU_DRIVER_DEVICES", "0")], args);
    assert!(status.success(), "{status}\n{stdout}\n{stderr}");
    assert!(stdout.contains("; each by ilp, baseline)"), "{stdout}");
    // 2 rows x 3 ops x 2 families, 3 of them n/a; the CPU check is the same as ever.
    assert!(
        stdout.contains("\nemulated kernels check: ok (9 checks, 3 n/a)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("\ncpu reference check: ok (8 checks)"),
        "{stdout}"
    );
    let ilp_rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains(" ilp ") && !l.starts_with("n/a:"))
        .collect();
    assert_eq!(ilp_rows.len(), 2, "{stdout}");
    assert!(
        ilp_rows[0].starts_with("3x17x5 ") && ilp_rows[0].ends_with(" n/a"),
        "{stdout}"
    );
    assert!(
        ilp_rows[1].starts_with("4x8x6x6 ") && ilp_rows[1].ends_with(" ok"),
        "{stdout}"
    );
    for op in ["train_fwd", "eval_fwd", "backward"] {
        assert!(
            stdout.contains(&format!(
                "n/a: {op} 3x17x5 nchw f32 ilp: nchw needs planes of a multiple of 4 values, not 5"
            )),
            "{stdout}"
        );
    }
    let text = std::fs::read_to_string(&json).expect("bnbench wrote its JSON");
    let _ = std::fs::remove_file(&json);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let emulated: Vec<&serde_json::Value> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["backend"] == "emulated")
        .collect();
    assert_eq!(emulated.len(), 12, "{text}");
    assert!(emulated
        .iter()
        .all(|c| c["variant"] == "ilp" || c["variant"] == "baseline"));
    let na: Vec<_> = emulated.iter().filter(|c| c["check"] == "n/a").collect();
    assert_eq!(na.len(), 3, "{text}");
    assert!(na
        .iter()
        .all(|c| c["variant"] == "ilp" && c["shape"] == serde_json::json!([3, 17, 5])));
    // The fused family: the training ops checked, the eval forward n/a, no failure.
    let (status, stdout, _) = bnbench(
        dir,
        &[("BN_EMU_DRIVER_DEVICES", "0")],
        ["--shape", "4,8,6,6", "--variant", "persistent"],
    );
    assert!(status.success(), "{stdout}");
    assert!(
        stdout.contains("\nemulated kernels check: ok (2 checks, 1 n/a)"),
        "{stdout}"
    );
}

/// `--deadline`: no row starts after it; the rows not run are an error (exit 1), and the
/// results are still written.
#[test]
#[cfg_attr(
    not(cuda_batchnorm_ptx),
    ignore = "built without PTX (no nvcc at build time)"
)]
fn bnbench_stops_starting_rows_at_its_deadline() {
    let Some(dir) = driver_dir("bnbench_stops_starting_rows_at_its_deadline") else {
        return;
    };
    let json = std::env::temp_dir().join(format!("bnbench-deadline-{}.json", std::process::id()));
    // The emulator's copy-bandwidth measurement alone takes longer than a second.
    let args = [
        "--shape",
        "4,8,6,6",
        "--shape",
        "3,17,5",
        "--deadline",
        "1",
        "--json",
    ];
    let args = args.iter().map(OsStr::new).chain([json.as_os_str()]);
    let (status, stdout, stderr) = bnbench(dir, &[], args);
    assert_eq!(status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("--deadline 1 s reached: 2 row(s) not run"),
        "{stderr}"
    );
    let text = std::fs::read_to_string(&json).expect("bnbench wrote its JSON");
    let _ = std::fs::remove_file(&json);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["rows"], serde_json::json!([]), "{text}");
    assert_eq!(v["errors"][0]["row"], "2 of 2 rows", "{text}");
    assert_eq!(
        v["errors"][0]["error"], "not run: the --deadline of 1 s was reached",
        "{text}"
    );
}

/// The frozen and fused ops, each beside our unfused sequence of it: on the emulated
/// driver they are checked and timed with the planner's choice, and a forced family is
/// n/a; without a device the CPU checks the fused ops and says the sequences are kernel
/// chains, and the emulated kernels check every one in both layouts. (Timing on the
/// emulator costs an L2 flush per run, so few ops are timed.)
#[test]
#[cfg_attr(
    not(cuda_batchnorm_ptx),
    ignore = "built without PTX (no nvcc at build time)"
)]
fn bnbench_checks_and_times_the_fused_ops_and_their_sequences() {
    let Some(dir) = driver_dir("bnbench_checks_and_times_the_fused_ops_and_their_sequences") else {
        return;
    };
    let json = std::env::temp_dir().join(format!("bnbench-fused-{}.json", std::process::id()));
    let timed_ops = [
        "eval_add_relu",
        "eval_add_relu_seq",
        "backward_add_relu",
        "backward_relu_seq",
    ];
    let op_list = timed_ops.join(",");
    let args = [
        "--shape",
        "2,6,3,5",
        "--layout",
        "nhwc",
        "--dtype",
        "f16",
        "--op",
        &op_list,
        "--variant",
        "auto,baseline",
        "--warmup",
        "0",
        "--json",
    ];
    let args = args.iter().map(OsStr::new).chain([json.as_os_str()]);
    let (status, stdout, stderr) = bnbench(dir, &[], args);
    assert!(status.success(), "{status}\n{stdout}\n{stderr}");
    let text = std::fs::read_to_string(&json).expect("bnbench wrote its JSON");
    let _ = std::fs::remove_file(&json);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let rows = v["rows"].as_array().unwrap();
    let ops: Vec<&str> = rows.iter().map(|r| r["op"].as_str().unwrap()).collect();
    assert_eq!(ops, timed_ops, "{text}");
    for r in rows {
        assert_eq!(r["variant"], "auto", "{r}");
        assert_eq!(r["check"], "ok", "{r}");
        assert!(r["median_us"].as_f64().unwrap() > 0.0, "{r}");
    }
    // The forced family is n/a for each of them, with why.
    let unavailable = v["unavailable"].as_array().unwrap();
    assert_eq!(unavailable.len(), timed_ops.len(), "{text}");
    assert!(unavailable.iter().all(|u| u["reason"]
        .as_str()
        .unwrap()
        .contains("planner's choice only")));

    // Without a device: the CPU checks the fused ops, the emulated kernels all of them.
    const ALL_FUSED: &str = "frozen_eval,eval_relu,eval_relu_seq,eval_add_relu,\
        eval_add_relu_seq,train_fwd_relu,train_fwd_relu_seq,train_fwd_add_relu,\
        train_fwd_add_relu_seq,backward_relu,backward_add_relu,backward_relu_seq";
    let args = [
        "--shape",
        "4,8,6,6",
        "--layout",
        "nchw,nhwc",
        "--dtype",
        "bf16",
        "--op",
        ALL_FUSED,
        "--json",
    ];
    let args = args.iter().map(OsStr::new).chain([json.as_os_str()]);
    let (status, stdout, stderr) = bnbench(dir, &[("BN_EMU_DRIVER_DEVICES", "0")], args);
    assert!(status.success(), "{status}\n{stdout}\n{stderr}");
    assert_checked_without_gpu(&stdout);
    let text = std::fs::read_to_string(&json).expect("bnbench wrote its JSON");
    let _ = std::fs::remove_file(&json);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let checks = v["checks"].as_array().unwrap();
    let of = |backend: &str, status: &str| -> Vec<&str> {
        checks
            .iter()
            .filter(|c| c["backend"] == backend && c["check"] == status)
            .map(|c| c["op"].as_str().unwrap())
            .collect()
    };
    let cpu_ok = of("cpu", "ok");
    assert_eq!(cpu_ok.len(), 2 * 7, "{text}");
    assert!(cpu_ok.iter().all(|o| !o.ends_with("_seq")), "{text}");
    let cpu_na = of("cpu", "n/a");
    assert_eq!(cpu_na.len(), 2 * 5, "{text}");
    assert!(cpu_na.iter().all(|o| o.ends_with("_seq")), "{text}");
    assert_eq!(of("emulated", "ok").len(), 2 * 12, "{text}");
    assert_eq!(checks.len(), 2 * (12 + 12), "{text}");
}

/// The SyncBatchNorm ops on the emulated driver and the emulated NCCL (the timed path,
/// with the emulator's times): checked, timed beside the plain ops, what each call sends
/// in the JSON, and the overhead lines under the table.
#[test]
#[cfg_attr(
    not(cuda_batchnorm_ptx),
    ignore = "built without PTX (no nvcc at build time)"
)]
fn bnbench_times_the_sync_ops_beside_the_plain_ones() {
    let Some(dir) = driver_dir("bnbench_times_the_sync_ops_beside_the_plain_ones") else {
        return;
    };
    let Some(nccl) = cuda_batchnorm_emu::nccl::library().and_then(|p| Path::new(p).parent()) else {
        return;
    };
    let path = format!("{}:{}", dir.display(), nccl.display());
    let json = std::env::temp_dir().join(format!("bnbench-sync-{}.json", std::process::id()));
    let args = [
        "--set", "sync", "--shape", "4,6,3,5", "--layout", "nhwc", "--dtype", "f16", "--warmup",
        "0", "--list",
    ];
    // The sync set is the resnet50 group's batch-32 shapes.
    let (status, stdout, _) = bnbench(dir, &[], args);
    assert!(status.success());
    let listed: Vec<&str> = stdout.lines().collect();
    assert_eq!(listed.len(), 12 + 1, "{stdout}");
    assert!(listed[..12].iter().all(|l| l.contains(" 32x")), "{stdout}");

    // Both kinds and both modes, each beside its plain op.
    let ops = "train_fwd,backward,sync_train_fwd,sync_backward_unverified";
    let args = [
        "--shape", "4,6,3,5", "--layout", "nhwc", "--dtype", "f16", "--op", ops, "--warmup", "0",
        "--json",
    ];
    let args = args.iter().map(OsStr::new).chain([json.as_os_str()]);
    let (status, stdout, stderr) = bnbench(dir, &[("LD_LIBRARY_PATH", &path)], args);
    assert!(status.success(), "{status}\n{stdout}\n{stderr}");
    let text = std::fs::read_to_string(&json).expect("bnbench wrote its JSON");
    let _ = std::fs::remove_file(&json);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let rows = v["rows"].as_array().unwrap();
    let sent: Vec<(&str, Option<u64>)> = rows
        .iter()
        .map(|r| (r["op"].as_str().unwrap(), r["sent_bytes"].as_u64()))
        .collect();
    // f16 accumulates in f32: (2C + 1) and 2C values of 4 bytes, plus the 24-byte header.
    assert_eq!(
        sent,
        [
            ("train_fwd", None),
            ("backward", None),
            ("sync_train_fwd", Some(13 * 4 + 24)),
            ("sync_backward_unverified", Some(12 * 4)),
        ],
        "{text}"
    );
    assert!(rows.iter().all(|r| r["check"] == "ok"), "{text}");
    for line in [
        "sync_train_fwd / train_fwd: x",
        "sync_backward_unverified / backward: x",
    ] {
        assert!(stdout.contains(line), "{line}\n{stdout}");
    }
    assert!(stdout.contains("sent B"), "{stdout}");

    // A forced family does not run them; without NCCL they are n/a, or fail where NCCL
    // is required.
    let args = [
        "--shape",
        "4,6,3,5",
        "--op",
        "sync_train_fwd",
        "--variant",
        "baseline",
        "--warmup",
        "0",
    ];
    let (status, _, stderr) = bnbench(dir, &[("LD_LIBRARY_PATH", &path)], args);
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("SyncBatchNorm runs its stages with the planner's choice only"));
    let args = [
        "--shape",
        "4,6,3,5",
        "--op",
        "train_fwd,sync_backward",
        "--warmup",
        "0",
    ];
    let (status, stdout, stderr) = bnbench(dir, &[], args);
    assert!(status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("sync_backward 4x6x3x5 nchw f32: n/a: no NCCL communicator"),
        "{stderr}"
    );
    let required = [("CUDA_BATCHNORM_REQUIRE_NCCL", "1")];
    let (status, _, stderr) = bnbench(dir, &required, args);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("CUDA_BATCHNORM_REQUIRE_NCCL=1"), "{stderr}");
}

//! `bnbench`'s GPU path (device query, copy roofline, L2 flush, checks, CUDA-event
//! timing, JSON) run end to end on the emulated CUDA driver: the binary is started with
//! `LD_LIBRARY_PATH` pointing at the emulator's `libcuda.so`, so cudarc loads it as it
//! would load NVIDIA's. The timings are the emulator's and mean nothing; the test checks
//! that every row ran, was checked against the reference and passed.

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
}

/// A driver older than the PTX (CUDA 12.8 cannot JIT PTX ISA 9.0): bnbench says why
/// there is no GPU run, naming the driver's version, and runs the CPU self-check.
#[test]
fn bnbench_explains_a_driver_too_old_for_the_ptx() {
    let Some(dir) = driver_dir("bnbench_explains_a_driver_too_old_for_the_ptx") else {
        return;
    };
    let (status, stdout, _) = bnbench(dir, &[("BN_EMU_DRIVER_VERSION", "12080")], NO_ARGS);
    assert!(status.success(), "{status}\n{stdout}");
    let first = stdout.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("bnbench: no GPU run: the CUDA driver refused the embedded PTX")
            && first.contains("CUDA_ERROR_UNSUPPORTED_PTX_VERSION")
            && first.contains("this driver reports CUDA 12.8"),
        "{stdout}"
    );
    assert!(stdout.contains("cpu self-check: ok"), "{stdout}");
}

/// A driver that is installed but sees no GPU (a container without one): bnbench names
/// the driver's error, runs the CPU self-check and exits 0; under
/// CUDA_BATCHNORM_REQUIRE_GPU=1 the same run fails. An ordinal past the last device is
/// reported the same way.
#[test]
fn bnbench_explains_a_driver_without_a_device() {
    let Some(dir) = driver_dir("bnbench_explains_a_driver_without_a_device") else {
        return;
    };
    let hidden = [("BN_EMU_DRIVER_DEVICES", "0")];
    let (status, stdout, _) = bnbench(dir, &hidden, NO_ARGS);
    assert!(status.success(), "{status}\n{stdout}");
    assert_eq!(
        stdout.lines().next().unwrap_or_default(),
        "bnbench: no GPU run: no CUDA device: the driver found none \
         (CUDA_ERROR_NO_DEVICE: no CUDA-capable device is detected)",
        "{stdout}"
    );
    assert!(stdout.contains("cpu self-check: ok"), "{stdout}");

    let required = [hidden[0], ("CUDA_BATCHNORM_REQUIRE_GPU", "1")];
    let (status, stdout, _) = bnbench(dir, &required, NO_ARGS);
    assert_eq!(status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("CUDA_BATCHNORM_REQUIRE_GPU=1 and there was no GPU run"),
        "{stdout}"
    );

    let (status, stdout, _) = bnbench(dir, &[], ["--device", "1"]);
    assert!(status.success(), "{status}\n{stdout}");
    assert_eq!(
        stdout.lines().next().unwrap_or_default(),
        "bnbench: no GPU run: no CUDA device: device 1 asked for, 1 present",
        "{stdout}"
    );
}

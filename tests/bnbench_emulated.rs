//! `bnbench`'s GPU path (device query, copy roofline, L2 flush, checks, CUDA-event
//! timing, JSON) run end to end on the emulated CUDA driver: the binary is started with
//! `LD_LIBRARY_PATH` pointing at the emulator's `libcuda.so`, so cudarc loads it as it
//! would load NVIDIA's. The timings are the emulator's and mean nothing; the test checks
//! that every row ran, was checked against the reference and passed.

use std::io::Write;
use std::path::Path;
use std::process::Command;

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

#[test]
fn bnbench_runs_its_gpu_path_on_the_emulated_driver() {
    if let Some(why) = unavailable() {
        let _ = writeln!(
            std::io::stderr(),
            "skipping bnbench on the emulated driver: {why}"
        );
        return;
    }
    let library = Path::new(cuda_batchnorm_emu::driver::library().unwrap());
    let dir = library.parent().unwrap();
    let json = std::env::temp_dir().join(format!("bnbench-emulated-{}.json", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_bnbench"))
        .env("LD_LIBRARY_PATH", dir)
        .args([
            "--shape", "4,8,6,6", "--shape", "3,17,5", "--layout", "nhwc",
        ])
        .args(["--dtype", "f16", "--warmup", "1", "--json"])
        .arg(&json)
        .output()
        .expect("start bnbench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bnbench failed: {}\n{stdout}\n{stderr}",
        out.status
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

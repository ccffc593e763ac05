//! `bnbench --list-kernels`: planning only, so it runs without a GPU, a driver or PTX.
//! scripts/kernel-report --check reads its stdout, which must hold exactly one kernel
//! name per line and nothing else.

use std::process::Command;

fn bnbench(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bnbench"))
        .args(args)
        // No driver at all, real or emulated: planning needs none.
        .env("LD_LIBRARY_PATH", "/nonexistent")
        .output()
        .expect("start bnbench");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn names(stdout: &str) -> Vec<&str> {
    stdout.lines().collect()
}

/// Every line a kernel name: `bn_` and identifier characters only.
fn assert_only_names(stdout: &str) {
    assert!(stdout.ends_with('\n'), "{stdout:?}");
    for l in stdout.lines() {
        assert!(
            l.starts_with("bn_") && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "not a kernel name: {l:?}\n{stdout}"
        );
    }
}

#[test]
fn the_quick_set_lists_sorted_distinct_kernels_of_the_families() {
    let (code, stdout, stderr) = bnbench(&["--set", "quick", "--list-kernels"]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert_only_names(&stdout);
    let n = names(&stdout);
    let mut sorted = n.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(n, sorted, "sorted and distinct");
    assert!(n.iter().any(|k| k.starts_with("bn_ilp_")), "{stdout}");
    assert!(
        n.iter().any(|k| k.starts_with("bn_persistent_")),
        "{stdout}"
    );
    // what vectors cannot take goes to flat, and the baseline gets nothing
    assert!(n.iter().any(|k| k.starts_with("bn_flat_")), "{stdout}");
    assert!(!n.iter().any(|k| k.starts_with("bn_fwd_")), "{stdout}");
    // The summary goes to stderr.
    assert!(
        stderr.contains(&format!("{} kernels for 10 rows x 3 ops (auto)", n.len())),
        "{stderr}"
    );
    assert!(stderr.contains("132 SMs, sm_90"), "{stderr}");
}

#[test]
fn a_forced_family_is_honoured_and_what_it_cannot_take_is_skipped() {
    let (code, stdout, stderr) =
        bnbench(&["--set", "quick", "--variant", "baseline", "--list-kernels"]);
    assert_eq!(code, 0, "{stderr}");
    assert_only_names(&stdout);
    assert!(!stdout.contains("bn_ilp_"), "{stdout}");
    assert!(stdout.contains("bn_fwd_stats_"), "{stdout}");
    assert!(!stderr.contains("skipped"), "{stderr}");

    // ilp cannot take 3x17x5 (planes of 5 values): a note on stderr, nothing on stdout.
    let (code, stdout, stderr) = bnbench(&[
        "--shape",
        "3,17,5",
        "--shape",
        "4,8,6,6",
        "--op",
        "train_fwd",
        "--variant",
        "ilp",
        "--list-kernels",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        names(&stdout),
        ["bn_ilp_fwd_norm_nchw_f32", "bn_ilp_fwd_stats_nchw_f32"]
    );
    assert!(
        stderr.contains("skipped train_fwd 3x17x5 nchw f32 ilp: n/a: nchw needs planes"),
        "{stderr}"
    );

    // The fused family: its two kernels, the eval forward of every row noted.
    let (code, stdout, stderr) = bnbench(&[
        "--set",
        "quick",
        "--variant",
        "persistent",
        "--list-kernels",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        names(&stdout)
            .iter()
            .all(|k| k.starts_with("bn_persistent_")),
        "{stdout}"
    );
    assert_eq!(
        stderr
            .matches("persistent: n/a: the eval forward is one pass already")
            .count(),
        10,
        "{stderr}"
    );
}

#[test]
fn the_full_set_lists_more_than_the_quick_one() {
    let (_, quick, _) = bnbench(&["--set", "quick", "--list-kernels"]);
    let (code, full, stderr) = bnbench(&["--set", "full", "--variant", "all", "--list-kernels"]);
    assert_eq!(code, 0, "{stderr}");
    assert_only_names(&full);
    let full = names(&full);
    // Every kernel the planner picks is among those of the four families forced.
    let (_, auto_full, _) = bnbench(&["--set", "full", "--list-kernels"]);
    for k in names(&auto_full) {
        assert!(full.contains(&k), "{k}");
    }
    for k in names(&quick) {
        assert!(full.contains(&k), "{k}");
    }
    // Both layouts, and ilp's 64-bit-index entry points for the largest rows.
    assert!(full.iter().any(|k| k.contains("_nhwc_")), "{full:?}");
    assert!(full.iter().any(|k| k.ends_with("_i64")), "{full:?}");
    // --dtype replaces the suite's dtypes: f64 rows plan f64 kernels (f64 parameters).
    let (code, f64s, stderr) = bnbench(&["--set", "quick", "--dtype", "f64", "--list-kernels"]);
    assert_eq!(code, 0, "{stderr}");
    assert_only_names(&f64s);
    assert!(names(&f64s).iter().all(|k| k.ends_with("_f64")), "{f64s}");
}

#[test]
fn list_kernels_refuses_flags_that_run_or_write() {
    for other in [
        &["--json", "x.json"][..],
        &["--list"],
        &["--from", "r.json"],
    ] {
        let mut args = vec!["--list-kernels"];
        args.extend_from_slice(other);
        let (code, stdout, stderr) = bnbench(&args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert_eq!(stdout, "");
    }
}

/// `--tuning-in` steers the planner's own choice: a table whose eval-forward winner for
/// 4x8x6x6's bucket is the baseline turns ilp's entry point into the baseline's; a table
/// that does not parse is a usage error.
#[test]
fn a_tuning_table_read_in_changes_the_kernels_planned() {
    let (code, stdout, stderr) =
        bnbench(&["--shape", "4,8,6,6", "--op", "eval_fwd", "--list-kernels"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(names(&stdout), ["bn_ilp_fwd_norm_nchw_f32"]);
    let table =
        std::env::temp_dir().join(format!("bnbench-list-tuning-{}.json", std::process::id()));
    // 4x8x6x6 f32: 4608 bytes, bucket 12.
    let text = r#"{"format": 1, "device": "NVIDIA Test", "compute_capability": [9, 0],
        "measured": "by hand", "entries": [
        {"op": "eval_fwd", "layout": "nchw", "dtype": "f32", "bytes_log2": 12,
         "variant": "baseline", "shape": [4, 8, 6, 6], "margin": 1.5}]}"#;
    std::fs::write(&table, text).unwrap();
    let path = table.to_str().unwrap();
    let args = ["--shape", "4,8,6,6", "--list-kernels", "--tuning-in", path];
    let (code, stdout, stderr) = bnbench(&[&args[..], &["--op", "eval_fwd"]].concat());
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(names(&stdout), ["bn_fwd_norm_nchw_f32"]);
    assert!(stderr.contains("the --tuning-in table"), "{stderr}");
    // Ops the table has no entry for keep the predictions.
    let (_, stdout, _) = bnbench(&[&args[..], &["--op", "train_fwd"]].concat());
    assert_eq!(names(&stdout), ["bn_persistent_fwd_train_nchw_f32"]);
    // A forced family wins over the table.
    let (_, stdout, _) = bnbench(&[&args[..], &["--op", "eval_fwd", "--variant", "ilp"]].concat());
    assert_eq!(names(&stdout), ["bn_ilp_fwd_norm_nchw_f32"]);

    std::fs::write(&table, text.replace("\"baseline\"", "\"fastest\"")).unwrap();
    let (code, stdout, stderr) = bnbench(&args);
    let _ = std::fs::remove_file(&table);
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(stdout, "");
    assert!(
        stderr.contains("--tuning-in: ") && stderr.contains("`variant` is `fastest`"),
        "{stderr}"
    );
}

//! Every violation the emulator checks fails the launch with a message that says what
//! and where, and the next launch on the same OS thread works.
mod common;

use common::*;
use cuda_batchnorm_emu::RegionKind::{Counters, InOut, Input, Output, Scratch};
use cuda_batchnorm_emu::{kernel_names, EmuError, Launch, Options, Region};

const N: usize = 64;

/// Runs emu_test_errors once with fresh buffers: x: f32[64] (Input), y: f32[64]
/// (Output) and a u32 counter (Counters). Returns the result and y.
fn errors_once(mode: u32, c: &Launch, dy: u64, seed: u64) -> (Result<(), EmuError>, Vec<f32>) {
    let x: Vec<f32> = (0..N).map(|i| i as f32).collect();
    let mut y = vec![0f32; N];
    let mut counters = vec![0u32; 1];
    let p = BnParams {
        x: addr(&x),
        y: addr_mut(&mut y),
        dy,
        ws_counters: addr_mut(&mut counters),
        n: N as i64,
        flags: mode,
        ..Default::default()
    };
    let regions = [
        region("x", &x, Input),
        region("y", &y, Output),
        region("ws_counters", &counters, Counters),
    ];
    let r = run("emu_test_errors", c, &p, &regions, &opts(seed));
    (r, y)
}

/// Runs emu_test_errors in `mode` under three seeds (same verdict each time), then
/// checks that a clean launch on the same OS thread still works.
fn errors_kernel(
    mode: u32,
    block: u32,
    launch_cfg: Option<Launch>,
    dy: u64,
) -> Result<(), EmuError> {
    let c = launch_cfg.unwrap_or(cfg(1, block));
    let (result, _) = errors_once(mode, &c, dy, 0);
    for seed in 1..3 {
        let (r, _) = errors_once(mode, &c, dy, seed);
        assert_eq!(
            r.is_ok(),
            result.is_ok(),
            "seed {seed}: {r:?} vs {result:?}"
        );
    }
    // The runtime is ready for the next launch on this thread.
    let (r, y) = errors_once(0, &cfg(1, 64), 0, 0);
    r.expect("clean launch after an error");
    assert_eq!(y[3], 6.0);
    result
}

#[test]
fn clean_launch() {
    errors_kernel(0, 64, None, 0).unwrap();
}

#[test]
fn read_past_end_of_input() {
    let e = errors_kernel(1, 64, None, 0).unwrap_err();
    assert_eq!(e.kernel, "emu_test_errors");
    for s in [
        "out-of-bounds read",
        "4 bytes",
        "byte offset 256",
        "region 'x'",
        "256 bytes",
        "thread (0,0,0)",
    ] {
        assert!(e.message.contains(s), "{e} lacks {s:?}");
    }
    assert!(
        e.to_string()
            .starts_with("emu_test_errors: block (0,0,0) thread (0,0,0)"),
        "{e}"
    );
}

#[test]
fn write_past_end_of_output() {
    expect_err(
        errors_kernel(2, 64, None, 0),
        &["out-of-bounds write", "byte offset 256", "region 'y'"],
    );
}

#[test]
fn misaligned_vector_load() {
    expect_err(
        errors_kernel(3, 64, None, 0),
        &[
            "misaligned read of 16 bytes",
            "byte offset 4",
            "region 'x'",
            "16-byte aligned",
        ],
    );
}

#[test]
fn write_into_input() {
    expect_err(
        errors_kernel(4, 64, None, 0),
        &["write of 4 bytes", "byte offset 0", "region 'x'", "Input"],
    );
}

#[test]
fn null_view_access() {
    expect_err(errors_kernel(5, 64, None, 0), &["null", "read of 4 bytes"]);
}

#[test]
fn access_outside_every_region() {
    let stray = vec![0f32; 4];
    expect_err(
        errors_kernel(16, 64, None, addr(&stray)),
        &["in no launch region"],
    );
}

#[test]
fn negative_index() {
    expect_err(
        errors_kernel(17, 64, None, 0),
        &["out-of-bounds read", "byte offset -4", "region 'x'"],
    );
}

#[test]
fn atomic_on_input() {
    expect_err(
        errors_kernel(18, 64, None, 0),
        &["write", "region 'x'", "Input"],
    );
}

#[test]
fn counters_left_nonzero() {
    expect_err(
        errors_kernel(6, 64, None, 0),
        &["counters not reset", "ws_counters", "after the launch"],
    );
}

#[test]
fn counters_nonzero_at_start() {
    let mut counters = [0u32, 5];
    let x = [0f32; 4];
    let p = BnParams {
        x: addr(&x),
        ws_counters: addr_mut(&mut counters),
        ..Default::default()
    };
    let regions = [
        region("x", &x, Input),
        region("ws_counters", &counters, Counters),
    ];
    expect_err(
        run("emu_test_errors", &cfg(1, 32), &p, &regions, &opts(0)),
        &[
            "counters not reset",
            "ws_counters",
            "when the launch starts",
            "byte 4",
        ],
    );
}

#[test]
fn barrier_reached_by_only_some_threads() {
    expect_err(
        errors_kernel(7, 64, None, 0),
        &["__syncthreads()", "selftest_errors.cu", "exited"],
    );
}

#[test]
fn thread_exits_while_others_wait() {
    expect_err(
        errors_kernel(20, 64, None, 0),
        &["__syncthreads()", "exited"],
    );
}

#[test]
fn divergent_barriers() {
    expect_err(
        errors_kernel(8, 64, None, 0),
        &["divergent __syncthreads()", "selftest_errors.cu:"],
    );
}

#[test]
fn shuffle_with_a_lane_missing() {
    expect_err(
        errors_kernel(9, 64, None, 0),
        &["__shfl_sync", "0xffffffff"],
    );
}

#[test]
fn deadlock_is_reported() {
    let e = expect_err(
        errors_kernel(10, 64, None, 0),
        &["deadlock", "__syncthreads()", "__shfl_sync"],
    );
    assert!(e.message.contains("not arrived"), "{e}");
}

#[test]
fn shared_index_out_of_range() {
    expect_err(
        errors_kernel(11, 64, None, 0),
        &["shared array 's'", "index 64 out of range", "64 elements"],
    );
    expect_err(
        errors_kernel(21, 64, None, 0),
        &["shared array 's'", "index -1 out of range"],
    );
}

#[test]
fn dynamic_shared_index_out_of_range() {
    let c = Launch {
        dynamic_shared_bytes: 64 * 4,
        ..cfg(1, 64)
    };
    expect_err(
        errors_kernel(15, 64, Some(c), 0),
        &["shared array 'd (dynamic)'", "index 64", "64 elements"],
    );
}

#[test]
fn too_much_shared_memory() {
    expect_err(
        errors_kernel(12, 64, None, 0),
        &["too much shared memory", "49152"],
    );
    // Static shared memory that fits alone, but not with the dynamic bytes.
    let c = Launch {
        dynamic_shared_bytes: 20_000,
        ..cfg(1, 64)
    };
    expect_err(
        errors_kernel(12, 64, Some(c), 0),
        &["too much shared memory", "'a'", "20000 dynamic"],
    );
    // With the opt-in the same 64 KiB fit, and the dynamic bytes beside them.
    let opted = Launch {
        shared_limit_bytes: cuda_batchnorm_emu::SHARED_OPTIN_BYTES,
        dynamic_shared_bytes: 100_000,
        ..cfg(1, 64)
    };
    errors_kernel(12, 64, Some(opted), 0).unwrap();
}

#[test]
fn grid_sync_outside_cooperative_launch() {
    expect_err(
        errors_kernel(13, 64, None, 0),
        &["grid_sync()", "not cooperative"],
    );
}

#[test]
fn mask_without_the_calling_lane() {
    expect_err(
        errors_kernel(14, 64, None, 0),
        &["does not include the calling lane"],
    );
}

#[test]
fn lanes_at_different_collectives() {
    expect_err(
        errors_kernel(19, 64, None, 0),
        &["__shfl_xor_sync", "same collective"],
    );
}

fn bad_config(c: Launch, params_len: usize, needle: &str) {
    let mut y = vec![0u32; 4];
    let regions = [region("y", &y, Output)];
    let p = vec![0u8; params_len];
    let r = launch("emu_test_speed", &c, &p, &regions, &opts(0));
    expect_err(r, &[needle]);
    y[0] = 1; // the buffer stays ours
}

#[test]
fn invalid_launch_configurations() {
    let ok = cfg(1, 32);
    let with = |grid: [u32; 3], block: [u32; 3]| Launch { grid, block, ..ok };
    bad_config(with([1, 1, 1], [0, 1, 1]), 208, "invalid launch: block");
    bad_config(with([1, 1, 1], [1025, 1, 1]), 208, "invalid launch: block");
    bad_config(with([1, 1, 1], [1, 1025, 1]), 208, "invalid launch: block");
    bad_config(with([1, 1, 1], [1, 1, 65]), 208, "invalid launch: block");
    bad_config(with([1, 1, 1], [32, 32, 2]), 208, "more than 1024");
    bad_config(with([0, 1, 1], [32, 1, 1]), 208, "invalid launch: grid");
    bad_config(
        with([1 << 31, 1, 1], [32, 1, 1]),
        208,
        "invalid launch: grid",
    );
    bad_config(with([1, 65536, 1], [32, 1, 1]), 208, "invalid launch: grid");
    bad_config(with([1, 1, 0], [32, 1, 1]), 208, "invalid launch: grid");
    bad_config(ok, 207, "params are 207 bytes but the kernel takes 208");
    bad_config(
        Launch {
            dynamic_shared_bytes: 49153,
            ..ok
        },
        208,
        "dynamic shared memory",
    );
    bad_config(
        Launch {
            dynamic_shared_bytes: 200_000,
            shared_limit_bytes: 100_000,
            ..ok
        },
        208,
        "over the limit of 100000 bytes",
    );
    bad_config(
        Launch {
            shared_limit_bytes: 300_000,
            ..ok
        },
        208,
        "a shared memory limit of 300000 bytes",
    );
    bad_config(
        Launch {
            cooperative: true,
            ..with([257, 1, 1], [256, 1, 1])
        },
        208,
        "invalid cooperative launch",
    );
    let r = launch("no_such_kernel", &ok, &[0u8; 208], &[], &opts(0));
    let e = expect_err(
        r,
        &["no kernel named 'no_such_kernel'", "are; nearest by name"],
    );
    // a near miss is named
    let r = launch("emu_test_sped", &ok, &[0u8; 208], &[], &opts(0));
    expect_err(r, &["no kernel named 'emu_test_sped'", "emu_test_speed"]);
    assert_eq!(e.kernel, "no_such_kernel");
}

#[test]
fn overlapping_and_degenerate_regions() {
    let buf = vec![0u8; 64];
    let a = Region {
        addr: addr(&buf),
        bytes: 32,
        name: "a",
        kind: Input,
    };
    let b = Region {
        addr: addr(&buf) + 16,
        bytes: 32,
        name: "b",
        kind: Output,
    };
    let p = BnParams::default().bytes();
    expect_err(
        launch("emu_test_speed", &cfg(1, 32), &p, &[a, b], &opts(0)),
        &["regions 'a' and 'b' overlap"],
    );
    // Zero-byte regions are ignored (even at odd addresses or inside other regions).
    let z = Region {
        addr: addr(&buf) + 3,
        bytes: 0,
        name: "z",
        kind: Scratch,
    };
    let mut y = vec![0u32; 32];
    let p = BnParams {
        y: addr_mut(&mut y),
        chunk: 1,
        ..Default::default()
    };
    let regions = [a, z, region("y", &y, InOut)];
    launch(
        "emu_test_speed",
        &cfg(1, 32),
        &p.bytes(),
        &regions,
        &opts(0),
    )
    .unwrap();
    let null = Region {
        addr: 0,
        bytes: 4,
        name: "n",
        kind: Input,
    };
    expect_err(
        launch("emu_test_speed", &cfg(1, 32), &p.bytes(), &[null], &opts(0)),
        &["address 0"],
    );
}

#[test]
fn errors_in_many_blocks_stop_the_launch() {
    // Every block of a large grid would fail; the first failure ends the launch quickly.
    let x = [0f32; 4];
    let p = BnParams {
        x: addr(&x),
        n: 0,
        flags: 1,
        ..Default::default()
    };
    let regions = [region("x", &x, Input)];
    let o = Options {
        seed: 3,
        max_resident_blocks: 8,
        preempt_one_in: 0,
    };
    expect_err(
        run("emu_test_errors", &cfg(100_000, 256), &p, &regions, &o),
        &["null (absent) argument"],
    );
    assert!(kernel_names().iter().any(|k| k == "emu_test_errors"));
}

#[test]
fn mask_names_a_lane_that_does_not_exist() {
    expect_err(
        errors_kernel(22, 40, None, 0),
        &["__shfl_sync", "do not exist", "40-thread block"],
    );
}

#[test]
fn thread_exits_before_grid_sync() {
    let c = Launch {
        cooperative: true,
        ..cfg(2, 64)
    };
    expect_err(
        errors_kernel(23, 64, Some(c), 0),
        &["grid_sync()", "exited"],
    );
}

#[test]
fn invalid_shuffle_width() {
    expect_err(
        errors_kernel(24, 64, None, 0),
        &["__shfl_xor_sync", "width 12"],
    );
}

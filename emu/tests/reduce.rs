//! Reductions: exact block reductions, the multi-block "last block finalises" protocol
//! across seeds and resident-block counts, and the classic bugs the emulator must expose.
mod common;

use common::*;
use cuda_batchnorm_emu::Options;
use cuda_batchnorm_emu::RegionKind::{InOut, Input, Output};

const SKIP_BARRIER: u32 = 1;
const WRONG_OFFSET: u32 = 2;
const FIRST_FINALISES: u32 = 4;
const SKIP_FENCE: u32 = 8;
const BLOCK_FENCE: u32 = 16;
const SKIP_READ_FENCE: u32 = 32;

fn data(n: usize, seed: u64) -> Vec<i64> {
    let mut r = Rng(seed);
    (0..n)
        .map(|_| r.below(2_000_001) as i64 - 1_000_000)
        .collect()
}

/// Per-block sums with emu_test_block_reduce.
fn block_sums(x: &[i64], grid: u32, chunk: i64, flags: u32, seed: u64) -> Vec<i64> {
    let mut y = vec![0i64; grid as usize];
    let p = BnParams {
        x: addr(x),
        y: addr_mut(&mut y),
        n: x.len() as i64,
        chunk,
        flags,
        ..Default::default()
    };
    let regions = [region("x", x, Input), region("y", &y, Output)];
    run(
        "emu_test_block_reduce",
        &cfg(grid, 256),
        &p,
        &regions,
        &opts(seed),
    )
    .unwrap();
    y
}

fn expected_block_sums(x: &[i64], grid: u32, chunk: usize) -> Vec<i64> {
    (0..grid as usize)
        .map(|b| {
            x[(b * chunk).min(x.len())..((b + 1) * chunk).min(x.len())]
                .iter()
                .sum()
        })
        .collect()
}

#[test]
fn block_reduction_is_exact() {
    let x = data(10_000, 1);
    let chunk = 1300;
    let grid = 8;
    let want = expected_block_sums(&x, grid, chunk);
    for seed in 0..8 {
        assert_eq!(
            block_sums(&x, grid, chunk as i64, 0, seed),
            want,
            "seed {seed}"
        );
    }
}

#[test]
fn missing_syncthreads_is_exposed() {
    let x = data(4096, 2);
    let want = expected_block_sums(&x, 4, 1024);
    let wrong = (0..6)
        .filter(|&seed| block_sums(&x, 4, 1024, SKIP_BARRIER, seed) != want)
        .count();
    eprintln!("missing barrier exposed by {wrong} of 6 seeds");
    assert!(
        wrong > 0,
        "a reduction without its barrier gave the right sums for every seed"
    );
}

#[test]
fn wrong_shuffle_offset_is_exposed() {
    let x = data(4096, 3);
    let want = expected_block_sums(&x, 4, 1024);
    assert_ne!(block_sums(&x, 4, 1024, WRONG_OFFSET, 0), want);
}

#[test]
fn last_block_finalises_across_seeds_and_residency() {
    let x = data(20_000, 4);
    let want: i64 = x.iter().sum();
    for grid in [1u32, 3, 7, 16] {
        for resident in [1u32, 2, 4, 16] {
            for seed in 0..4 {
                let o = Options {
                    seed: seed * 977 + u64::from(grid),
                    max_resident_blocks: resident,
                    preempt_one_in: 0,
                };
                assert_eq!(
                    last_block(&x, grid, 0, &o),
                    Ok(want),
                    "grid {grid}, resident {resident}, seed {}",
                    o.seed
                );
            }
        }
    }
}

#[test]
fn first_block_finalises_bug_is_exposed() {
    let x = data(20_000, 5);
    let want: i64 = x.iter().sum();
    let mut exposed = 0;
    for seed in 0..5 {
        let r = last_block(&x, 12, FIRST_FINALISES, &opts(seed));
        eprintln!("first-block-finalises, seed {seed}: {r:?} (want {want})");
        if r != Ok(want) {
            exposed += 1;
        }
    }
    assert!(
        exposed > 0,
        "'first block finalises' gave the right total for every seed"
    );
}

/// Each fence of the last-block protocol, removed (or block-scoped), fails every seed;
/// one block alone needs no fence.
#[test]
fn fence_bugs_in_the_last_block_protocol_are_exposed() {
    let x = data(20_000, 6);
    let want: i64 = x.iter().sum();
    for (flags, needle) in [
        (SKIP_FENCE, "without a __threadfence()"),
        (BLOCK_FENCE, "without a __threadfence()"),
        (SKIP_READ_FENCE, "acquire"),
    ] {
        for seed in 0..4 {
            let err =
                last_block(&x, 5, flags, &opts(seed)).expect_err("a fence bug went unnoticed");
            assert!(
                err.contains("scratch region 'ws_partials'") && err.contains(needle),
                "flags {flags}, seed {seed}: {err}"
            );
        }
        assert_eq!(last_block(&x, 1, flags, &opts(0)), Ok(want));
    }
}

/// emu_test_float_atomic: the f32 sum in the order the atomics happened.
fn float_atomic_sum(x: &[f32], seed: u64) -> u32 {
    let mut y = [0f32; 1];
    let p = BnParams {
        x: addr(x),
        y: addr_mut(&mut y),
        n: x.len() as i64,
        ..Default::default()
    };
    let regions = [region("x", x, Input), region("y", &y, InOut)];
    run(
        "emu_test_float_atomic",
        &cfg(6, 64),
        &p,
        &regions,
        &opts(seed),
    )
    .unwrap();
    y[0].to_bits()
}

#[test]
fn same_seed_same_bits() {
    let mut r = Rng(6);
    let x: Vec<f32> = (0..3000)
        .map(|_| (r.below(1 << 24) as f32 - 8e6) * 10f32.powi(r.below(9) as i32 - 4))
        .collect();
    let mut distinct = std::collections::BTreeSet::new();
    for seed in 0..8 {
        let a = float_atomic_sum(&x, seed);
        let b = float_atomic_sum(&x, seed);
        assert_eq!(a, b, "seed {seed} gave two different results");
        distinct.insert(a);
    }
    // The sum depends on the order, and the order on the seed.
    assert!(distinct.len() > 1, "every seed summed in the same order");
}

#[test]
fn default_options() {
    let o = Options::default();
    assert_eq!(o.max_resident_blocks, 4);
    // Same default twice: same seed.
    assert_eq!(o.seed, Options::default().seed);
    let _ = launch; // the free function is what the tests call through `run`
}

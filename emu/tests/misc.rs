//! Cooperative launches, atomics, shared-memory sites, multi-dimensional launches, the
//! params layout, vector access, poison fills, the kernel registry, concurrent
//! launches from several OS threads, and a speed smoke test.
mod common;

use std::time::Instant;

use common::*;
use cuda_batchnorm_emu::RegionKind::{InOut, Input, Output, Scratch};
use cuda_batchnorm_emu::{kernel_names, Launch, Options};

#[test]
fn cooperative_grid_sync() {
    let mut r = Rng(21);
    let x: Vec<i64> = (0..50_000)
        .map(|_| r.below(1_000_000) as i64 - 500_000)
        .collect();
    let want: i64 = x.iter().sum();
    for (grid, block) in [(8u32, 256u32), (1, 64), (37, 96)] {
        for seed in 0..3 {
            let chunk = x.len().div_ceil(grid as usize) as i64;
            let mut y = vec![0i64; grid as usize];
            let mut partials = vec![0i64; grid as usize];
            let p = BnParams {
                x: addr(&x),
                y: addr_mut(&mut y),
                ws_partials: addr_mut(&mut partials),
                n: x.len() as i64,
                chunk,
                ..Default::default()
            };
            let regions = [
                region("x", &x, Input),
                region("y", &y, Output),
                region("ws_partials", &partials, Scratch),
            ];
            let c = Launch {
                cooperative: true,
                ..cfg(grid, block)
            };
            run("emu_test_coop", &c, &p, &regions, &opts(seed)).unwrap();
            assert!(y.iter().all(|&v| v == want), "grid {grid}: {y:?} != {want}");
        }
    }
}

#[test]
fn atomics() {
    let (grid, block) = (4u32, 96u32);
    let t = u64::from(grid * block);
    for seed in 0..3 {
        let mut y = vec![0u64; 23];
        y[7] = u64::from((-5i32) as u32);
        y[10] = u64::from(u32::MAX);
        y[11] = i64::MIN as u64;
        y[14] = u64::MAX;
        let p = BnParams {
            y: addr_mut(&mut y),
            ..Default::default()
        };
        let regions = [region("y", &y, InOut)];
        run(
            "emu_test_atomics",
            &cfg(grid, block),
            &p,
            &regions,
            &opts(seed),
        )
        .unwrap();
        let lo = |k: usize| y[k] as u32;
        let sum = t * (t - 1) / 2;
        assert_eq!(u64::from(lo(0)), sum, "i32 add");
        assert_eq!(u64::from(lo(1)), t, "u32 add");
        assert_eq!(y[2], sum, "u64 add");
        assert_eq!(f32::from_bits(lo(3)), t as f32 * 0.5, "f32 add");
        assert_eq!(f64::from_bits(y[4]), t as f64 * 0.25, "f64 add");
        assert_eq!(lo(5) as i32, -(t as i32), "i32 sub");
        assert_eq!(lo(6), 0u32.wrapping_sub(2 * t as u32), "u32 sub");
        assert_eq!(lo(7) as i32, t as i32 - 1, "i32 max");
        assert_eq!(lo(8) as i32, -(t as i32 - 1), "i32 min");
        assert_eq!(lo(9), 3 * (t as u32 - 1), "u32 max");
        assert_eq!(lo(10), 7, "u32 min");
        assert_eq!(y[11] as i64, 0, "i64 max");
        assert_eq!(y[12] as i64, -(t as i64 - 1) * 100_000_000_000, "i64 min");
        assert_eq!(y[13], (t - 1) << 40, "u64 max");
        assert_eq!(y[14], 1, "u64 min");
        assert_eq!(u64::from(lo(15)), t % 10, "u32 inc");
        assert!(u64::from(lo(16)) < t, "u32 exch");
        assert_eq!(u64::from(lo(17)), 3 * t, "i32 CAS");
        assert_eq!(y[18], 5 * t, "u64 CAS");
        let f = f32::from_bits(lo(19));
        assert!(f >= 0.0 && (f as u64) < t && f.fract() == 0.0, "f32 exch");
        assert_eq!(u64::from(lo(20)), sum, "shared i32 add");
        assert!(u64::from(lo(21)) < t, "i32 exch");
        assert!(y[22] < t, "u64 exch");
    }
}

#[test]
fn shared_memory_sites() {
    let grid = 3u32;
    for seed in 0..3 {
        let mut y = vec![0i32; grid as usize * 4];
        let p = BnParams {
            y: addr_mut(&mut y),
            ..Default::default()
        };
        let regions = [region("y", &y, Output)];
        run(
            "emu_test_shared_sites",
            &cfg(grid, 64),
            &p,
            &regions,
            &opts(seed),
        )
        .unwrap();
        for b in 0..grid as i32 {
            let o = &y[b as usize * 4..b as usize * 4 + 4];
            assert_eq!(o, [100 + b, 200 + b, 10, 100 + b], "block {b}");
        }
    }
}

#[test]
fn multi_dimensional_launch() {
    let c = Launch {
        grid: [2, 3, 2],
        block: [5, 3, 4],
        dynamic_shared_bytes: 0,
        cooperative: false,
        shared_limit_bytes: 0,
    };
    let nthr = 60usize;
    let nblk = 12usize;
    let mut y = vec![0u32; nthr * nblk * 8];
    let p = BnParams {
        y: addr_mut(&mut y),
        ..Default::default()
    };
    let regions = [region("y", &y, Output)];
    run("emu_test_dims", &c, &p, &regions, &opts(1)).unwrap();
    for b in 0..nblk {
        for t in 0..nthr {
            let o = &y[(b * nthr + t) * 8..(b * nthr + t) * 8 + 8];
            let want = [
                (t % 5) as u32,
                (t / 5 % 3) as u32,
                (t / 15) as u32,
                (b % 2) as u32,
                (b / 2 % 3) as u32,
                (b / 6) as u32,
                (t / 32 * 32) as u32,
                5_003_004,
            ];
            assert_eq!(o, want, "block {b} thread {t}");
        }
    }
}

#[test]
fn params_layout_round_trips() {
    let mut y = vec![0u64; 28];
    let p = BnParams {
        x: 0x1111,
        y: addr_mut(&mut y),
        dy: 0x3333,
        dx: 0x4444,
        weight: 0x5555,
        bias: 0x6666,
        running_mean: 0x7777,
        running_var: 0x8888,
        save_mean: 0x9999,
        save_invstd: 0xaaaa,
        grad_weight: 0xbbbb,
        grad_bias: 0xcccc,
        ws_counters: 0xdddd,
        ws_partials: 0xeeee,
        ws_channel: 0xffff,
        z: 0x1_0000,
        dz: 0x1_1111,
        n: -1,
        c: 3,
        s: 1 << 40,
        chunk: 7,
        eps: 1e-5,
        momentum: 0.1,
        bessel: 1.25,
        flags: 0xf,
        splits: 9,
        tile_x: 32,
        reserved: 0xdead,
    };
    let regions = [region("y", &y, Output)];
    run("emu_test_params", &cfg(1, 32), &p, &regions, &opts(0)).unwrap();
    let want = [
        0x1111,
        p.y,
        0x3333,
        0x4444,
        0x5555,
        0x6666,
        0x7777,
        0x8888,
        0x9999,
        0xaaaa,
        0xbbbb,
        0xcccc,
        0xdddd,
        0xeeee,
        0xffff,
        0x1_0000,
        0x1_1111,
        u64::MAX,
        3,
        1 << 40,
        7,
        1e-5f64.to_bits(),
        0.1f64.to_bits(),
        1.25f64.to_bits(),
        0xf,
        9,
        32,
        0xdead,
    ];
    assert_eq!(y, want);
}

#[test]
fn vector_loads_and_stores() {
    let x: Vec<f32> = (0..103).map(|i| i as f32 + 0.5).collect();
    for offset in 0..4i64 {
        let mut y = vec![0f32; x.len()];
        let p = BnParams {
            x: addr(&x),
            y: addr_mut(&mut y),
            n: x.len() as i64,
            chunk: offset,
            ..Default::default()
        };
        let regions = [region("x", &x, Input), region("y", &y, Output)];
        run("emu_test_vec", &cfg(1, 64), &p, &regions, &opts(0)).unwrap();
        for i in 0..x.len() {
            let want = if (i as i64) < offset { 0.0 } else { 2.0 * x[i] };
            assert_eq!(y[i], want, "offset {offset}, element {i}");
        }
    }
}

#[test]
fn uninitialised_shared_and_scratch_memory_is_poisoned() {
    let mut y = vec![0u32; 4];
    let mut scratch = vec![0u32; 1];
    let p = BnParams {
        y: addr_mut(&mut y),
        ws_partials: addr_mut(&mut scratch),
        ..Default::default()
    };
    let regions = [
        region("y", &y, Output),
        region("ws_partials", &scratch, Scratch),
    ];
    let c = Launch {
        dynamic_shared_bytes: 16,
        ..cfg(2, 32)
    };
    run("emu_test_poison", &c, &p, &regions, &opts(0)).unwrap();
    assert_eq!(y, [u32::MAX; 4]);
    assert!(f32::from_bits(y[1]).is_nan());
}

#[test]
fn every_kernel_is_registered() {
    let names = kernel_names();
    for k in [
        "emu_test_shfl",
        "emu_test_vote",
        "emu_test_partial_warp",
        "emu_test_block_reduce",
        "emu_test_last_block",
        "emu_test_float_atomic",
        "emu_test_errors",
        "emu_test_poison",
        "emu_test_convert",
        "emu_test_coop",
        "emu_test_atomics",
        "emu_test_shared_sites",
        "emu_test_dims",
        "emu_test_params",
        "emu_test_speed",
        "emu_test_vec",
        "emu_test_fpregs",
        "emu_test_fpenv",
        "emu_test_order",
    ] {
        assert!(
            names.iter().any(|n| n == k),
            "{k} is not registered: {names:?}"
        );
    }
    // Project kernels named directly in ../kernels/*.cu (BN_KERNEL(name, ...)) are
    // registered too, unless the build left them out.
    let only_selftest =
        option_env!("BN_EMU_ONLY_SELFTEST").is_some_and(|v| !v.is_empty() && v != "0");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../kernels");
    let mut project = 0;
    if let (false, Ok(entries)) = (only_selftest, std::fs::read_dir(&dir)) {
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "cu") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for line in text.lines() {
                let Some(rest) = line.trim_start().strip_prefix("BN_KERNEL(") else {
                    continue;
                };
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if name.is_empty() || rest[name.len()..].starts_with("##") {
                    continue;
                }
                assert!(
                    names.contains(&name),
                    "{name} ({}) is not registered",
                    path.display()
                );
                project += 1;
            }
        }
    }
    eprintln!(
        "{} kernels registered ({project} named directly in ../kernels)",
        names.len()
    );
    assert!(names.windows(2).all(|w| w[0] < w[1]), "sorted and unique");
}

#[test]
fn concurrent_launches_from_four_threads() {
    let handles: Vec<_> = (0..4u64)
        .map(|k| {
            std::thread::spawn(move || {
                let mut r = Rng(100 + k);
                for iter in 0..20u64 {
                    let n = 5_000 + r.below(20_000) as usize;
                    let x: Vec<i64> = (0..n)
                        .map(|_| r.below(1 << 20) as i64 - (1 << 19))
                        .collect();
                    let grid = 1 + r.below(12) as u32;
                    let want: i64 = x.iter().sum();
                    assert_eq!(
                        last_block(
                            &x,
                            grid,
                            0,
                            &Options {
                                seed: iter * 31 + k,
                                max_resident_blocks: 3,
                                preempt_one_in: 0,
                            }
                        ),
                        Ok(want),
                        "thread {k}, iteration {iter}"
                    );
                    // Interleave failing launches: they must not disturb anything.
                    if iter % 5 == 0 {
                        let e = run(
                            "emu_test_errors",
                            &cfg(1, 32),
                            &BnParams {
                                flags: 13,
                                ..Default::default()
                            },
                            &[],
                            &opts(iter),
                        );
                        assert!(e.is_err());
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

/// Runs emu_test_speed (rounds of __syncthreads + __shfl_xor_sync) and checks it.
fn speed_launch(grid: u32, block: u32, rounds: i64) -> f64 {
    let threads = (grid * block) as usize;
    let mut y = vec![0u32; threads];
    let p = BnParams {
        y: addr_mut(&mut y),
        chunk: rounds,
        ..Default::default()
    };
    let regions = [region("y", &y, Output)];
    let start = Instant::now();
    run("emu_test_speed", &cfg(grid, block), &p, &regions, &opts(0)).unwrap();
    let secs = start.elapsed().as_secs_f64();
    // Reference: simulate each warp.
    for b in 0..grid as usize {
        for w in 0..(block as usize).div_ceil(32) {
            let mut v: Vec<u32> = (0..32).map(|l| (w * 32 + l) as u32).collect();
            for r in 0..rounds {
                let m = (r & 31) as usize;
                v = (0..32).map(|l| v[l].wrapping_add(v[l ^ m])).collect();
            }
            for l in 0..32 {
                assert_eq!(y[b * block as usize + w * 32 + l], v[l]);
            }
        }
    }
    secs
}

#[test]
fn speed_smoke() {
    // One 256-thread block, 40 scheduling points per thread (20 barriers, 20 shuffles).
    speed_launch(1, 256, 20);
    let mut best = f64::MAX;
    for _ in 0..5 {
        best = best.min(speed_launch(1, 256, 20));
    }
    // Every thread switches at least once per barrier and once per shuffle.
    let rounds = 2000;
    let secs = speed_launch(4, 256, rounds);
    let switches = 4.0 * 256.0 * 2.0 * rounds as f64;
    eprintln!(
        "speed: 256-thread block, 40 barriers/shuffles per thread: {:.1} us per launch; \
         {:.1} M switches/s ({} switches in {:.3} s)",
        best * 1e6,
        switches / secs / 1e6,
        switches,
        secs
    );
}

#[test]
fn floating_point_registers_survive_switches() {
    let (grid, block) = (2u32, 64u32);
    let threads = (grid * block) as usize;
    let x: Vec<f64> = (0..threads).map(|i| i as f64 * 0.37 - 5.0).collect();
    let rounds = 30;
    let mut y = vec![0f64; threads];
    let p = BnParams {
        x: addr(&x),
        y: addr_mut(&mut y),
        chunk: rounds,
        ..Default::default()
    };
    let regions = [region("x", &x, Input), region("y", &y, Output)];
    run("emu_test_fpregs", &cfg(grid, block), &p, &regions, &opts(5)).unwrap();
    for t in 0..threads {
        let v = x[t];
        let mut a = [
            v,
            v + 1.0,
            v + 2.0,
            v + 3.0,
            v + 4.0,
            v + 5.0,
            v + 6.0,
            v + 7.0,
        ];
        for _ in 0..rounds {
            for i in 0..7 {
                a[i] = a[i] * 0.5 + a[i + 1];
            }
            a[7] = a[7] * 0.5 + a[0];
        }
        let want = a.iter().fold(0.0, |s, v| s + v);
        assert_eq!(y[t].to_bits(), want.to_bits(), "thread {t}");
    }
}

#[test]
fn rounding_mode_is_per_fiber() {
    let x = [1f32, 3f32];
    let mut y = vec![0u32; 64];
    let p = BnParams {
        x: addr(&x),
        y: addr_mut(&mut y),
        ..Default::default()
    };
    let regions = [region("x", &x, Input), region("y", &y, Output)];
    run("emu_test_fpenv", &cfg(1, 64), &p, &regions, &opts(2)).unwrap();
    for (t, v) in y.iter().enumerate() {
        let want = if t % 2 == 1 { 0x3eaa_aaaa } else { 0x3eaa_aaab };
        assert_eq!(*v, want, "thread {t}");
    }
    // The launching thread's rounding mode is untouched.
    assert_eq!(
        (std::hint::black_box(1f32) / std::hint::black_box(3f32)).to_bits(),
        0x3eaa_aaab
    );
}

/// Block admission order and block 0's thread order under `seed`.
fn run_order(grid: u32, block: u32, seed: u64) -> (Vec<u32>, Vec<u32>) {
    let mut y = vec![0u32; grid as usize];
    let mut dx = vec![0u32; block as usize];
    let mut ctr = vec![0u32; 1];
    let p = BnParams {
        y: addr_mut(&mut y),
        dx: addr_mut(&mut dx),
        ws_channel: addr_mut(&mut ctr),
        ..Default::default()
    };
    let regions = [
        region("y", &y, Output),
        region("dx", &dx, Output),
        region("ws_channel", &ctr, InOut),
    ];
    let o = Options {
        seed,
        max_resident_blocks: 1,
        preempt_one_in: 0,
    };
    run("emu_test_order", &cfg(grid, block), &p, &regions, &o).unwrap();
    (y, dx)
}

#[test]
fn seeds_permute_blocks_and_threads() {
    let (grid, block) = (9u32, 64u32);
    let mut block_orders = std::collections::BTreeSet::new();
    let mut thread_orders = std::collections::BTreeSet::new();
    for seed in 0..12 {
        let (b, t) = run_order(grid, block, seed);
        assert_eq!(
            run_order(grid, block, seed),
            (b.clone(), t.clone()),
            "seed {seed} is not deterministic"
        );
        let mut sorted = b.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            (0..grid).collect::<Vec<_>>(),
            "every block runs once"
        );
        let mut sorted = t.clone();
        sorted.sort();
        assert_eq!(sorted, (0..block).collect::<Vec<_>>());
        block_orders.insert(b);
        thread_orders.insert(t);
    }
    eprintln!(
        "{} block orders, {} thread orders in 12 seeds",
        block_orders.len(),
        thread_orders.len()
    );
    assert!(
        block_orders.len() >= 3,
        "block order hardly depends on the seed"
    );
    assert!(
        thread_orders.len() >= 3,
        "thread order hardly depends on the seed"
    );
    // Thread 0 runs first under some seeds and not under others.
    let first: std::collections::BTreeSet<bool> = thread_orders.iter().map(|t| t[0] == 0).collect();
    assert_eq!(first.len(), 2);
}

//! Warp shuffles, votes, __activemask and the __syncthreads_* family against values
//! computed here from the CUDA programming guide's description.
mod common;

use common::*;
use cuda_batchnorm_emu::RegionKind::{Input, Output};

#[derive(Clone, Copy)]
enum Op {
    Idx(i32),
    Up(u32),
    Down(u32),
    Xor(i32),
}

/// The lane whose value `lane` receives (CUDA guide semantics, width segments).
fn source_lane(op: Op, lane: usize, width: usize) -> usize {
    let seg = lane / width * width;
    match op {
        // srcLane outside [0, width) wraps modulo width within the segment.
        Op::Idx(s) => seg + (s.rem_euclid(width as i32) as usize),
        // The lowest `delta` lanes of each segment keep their own value.
        Op::Up(d) => {
            if lane - seg >= d as usize {
                lane - d as usize
            } else {
                lane
            }
        }
        // The highest `delta` lanes of each segment keep their own value.
        Op::Down(d) => {
            if lane - seg + (d as usize) < width {
                lane + d as usize
            } else {
                lane
            }
        }
        // Later segments are out of reach: own value; earlier ones are readable.
        Op::Xor(m) => {
            let j = lane ^ (m as usize);
            if j < seg + width {
                j
            } else {
                lane
            }
        }
    }
}

fn ops_for(lane: usize) -> Vec<(Op, usize)> {
    let mut v = Vec::new();
    for w in [32usize, 16, 8] {
        v.push((Op::Idx((lane * 7 + 3) as i32), w));
        v.push((Op::Idx(-1), w));
        v.push((Op::Up(1), w));
        v.push((Op::Up(3), w));
        v.push((Op::Down(1), w));
        v.push((Op::Down(5), w));
        v.push((Op::Xor(1), w));
        v.push((Op::Xor(6), w));
        v.push((Op::Xor(16), w));
    }
    v
}

#[test]
fn shuffles_match_cuda_semantics() {
    let (grid, block) = (2u32, 64u32);
    let threads = (grid * block) as usize;
    let mut rng = Rng(7);
    let x: Vec<i32> = (0..threads).map(|_| rng.next_u64() as i32).collect();
    for seed in 0..6 {
        let mut y = vec![0i32; threads * 27];
        let mut dx = vec![0u64; threads * 3];
        let p = BnParams {
            x: addr(&x),
            y: addr_mut(&mut y),
            dx: addr_mut(&mut dx),
            ..Default::default()
        };
        let regions = [
            region("x", &x, Input),
            region("y", &y, Output),
            region("dx", &dx, Output),
        ];
        run(
            "emu_test_shfl",
            &cfg(grid, block),
            &p,
            &regions,
            &opts(seed),
        )
        .unwrap();
        for t in 0..threads {
            let lane = t % 32;
            let base = t - lane;
            for (k, (op, w)) in ops_for(lane).into_iter().enumerate() {
                let want = x[base + source_lane(op, lane, w)];
                assert_eq!(y[t * 27 + k], want, "thread {t} op #{k} (seed {seed})");
            }
            let f = (x[base + source_lane(Op::Xor(3), lane, 32)] as f32) * 0.5;
            assert_eq!(dx[t * 3], u64::from(f.to_bits()), "f32 xor, thread {t}");
            let d = (x[base + source_lane(Op::Down(2), lane, 16)] as f64) * 0.25;
            assert_eq!(dx[t * 3 + 1], d.to_bits(), "f64 down, thread {t}");
            let ll = i64::from(x[base + source_lane(Op::Up(1), lane, 8)]) * (1i64 << 31);
            assert_eq!(dx[t * 3 + 2], ll as u64, "i64 up, thread {t}");
        }
    }
}

#[test]
fn reference_semantics_spot_checks() {
    // Hand-checked cases of the guide's rules, so that the reference above is not just
    // a copy of the implementation.
    assert_eq!(source_lane(Op::Up(3), 10, 8), 10); // lane 2 of segment 8..16
    assert_eq!(source_lane(Op::Up(3), 11, 8), 8);
    assert_eq!(source_lane(Op::Down(5), 3, 8), 3); // 3 + 5 leaves segment 0..8
    assert_eq!(source_lane(Op::Down(5), 2, 8), 7);
    assert_eq!(source_lane(Op::Xor(16), 3, 8), 3); // later segment: own value
    assert_eq!(source_lane(Op::Xor(16), 19, 8), 3); // earlier segment: allowed
    assert_eq!(source_lane(Op::Idx(-1), 12, 8), 15);
    assert_eq!(source_lane(Op::Idx(33), 12, 32), 1);
}

#[test]
fn votes_activemask_and_barrier_reductions() {
    let (grid, block) = (3u32, 96u32);
    let threads = (grid * block) as usize;
    let mut rng = Rng(11);
    let mut x: Vec<i32> = (0..threads).map(|_| rng.below(2100) as i32 - 50).collect();
    // Make some warps all-positive and one value 7, so that every vote outcome occurs.
    for v in &mut x[32..64] {
        *v = v.abs() + 1;
    }
    for v in &mut x[96..192] {
        *v = v.abs() + 1;
    }
    x[100] = 7;
    for seed in 0..6 {
        let mut y = vec![0u32; threads * 8];
        let p = BnParams {
            x: addr(&x),
            y: addr_mut(&mut y),
            ..Default::default()
        };
        let regions = [region("x", &x, Input), region("y", &y, Output)];
        run(
            "emu_test_vote",
            &cfg(grid, block),
            &p,
            &regions,
            &opts(seed),
        )
        .unwrap();
        for t in 0..threads {
            let lane = t % 32;
            let wb = t - lane;
            let warp = &x[wb..wb + 32];
            let bb = t / block as usize * block as usize;
            let blk = &x[bb..bb + block as usize];
            let ballot = |pred: &dyn Fn(i32) -> bool, mask: u32| -> u32 {
                (0..32)
                    .filter(|&l| mask >> l & 1 == 1 && pred(warp[l]))
                    .fold(0u32, |a, l| a | 1 << l)
            };
            let o = &y[t * 8..t * 8 + 8];
            assert_eq!(o[0], ballot(&|v| v & 1 != 0, !0), "ballot, thread {t}");
            assert_eq!(
                o[1],
                u32::from(warp.iter().all(|&v| v > 0)),
                "all, thread {t}"
            );
            assert_eq!(
                o[2],
                u32::from(warp.iter().any(|&v| v > 1000)),
                "any, thread {t}"
            );
            let half = if lane < 16 { 0x0000_ffff } else { 0xffff_0000 };
            assert_eq!(
                o[3],
                ballot(&|v| v & 2 != 0, half),
                "half ballot, thread {t}"
            );
            let am = if lane % 3 == 0 {
                (0..32).filter(|l| l % 3 == 0).fold(0u32, |a, l| a | 1 << l)
            } else {
                0xdead_beef
            };
            assert_eq!(o[4], am, "activemask, thread {t}");
            assert_eq!(o[5], blk.iter().filter(|&&v| v & 1 != 0).count() as u32);
            assert_eq!(o[6], u32::from(blk.iter().all(|&v| v > 0)));
            assert_eq!(o[7], u32::from(blk.contains(&7)));
        }
    }
}

#[test]
fn partial_warp() {
    let (grid, block) = (2u32, 40u32);
    let threads = (grid * block) as usize;
    let x: Vec<i32> = (0..threads as i32).map(|i| i * 10 + 1).collect();
    for seed in 0..4 {
        let mut y = vec![0u32; threads * 3];
        let p = BnParams {
            x: addr(&x),
            y: addr_mut(&mut y),
            ..Default::default()
        };
        let regions = [region("x", &x, Input), region("y", &y, Output)];
        run(
            "emu_test_partial_warp",
            &cfg(grid, block),
            &p,
            &regions,
            &opts(seed),
        )
        .unwrap();
        for t in 0..threads {
            let tid = t % block as usize;
            let lane = tid % 32;
            let lanes = (block as usize - tid / 32 * 32).min(32);
            let mask: u32 = if lanes == 32 { !0 } else { (1 << lanes) - 1 };
            let down = if lane + 1 < lanes {
                x[t + 1] as u32
            } else if lane == 31 {
                x[t] as u32 // beyond the segment: own value
            } else {
                0xffff_ffff // source lane does not take part: undefined, poisoned
            };
            assert_eq!(y[t * 3], down, "shfl_down, thread {t}");
            assert_eq!(y[t * 3 + 1], mask, "ballot, thread {t}");
            assert_eq!(y[t * 3 + 2], mask, "activemask, thread {t}");
        }
    }
}

//! Helpers shared by the emulator's integration tests.
#![allow(dead_code)]

use cuda_batchnorm_emu::{EmuError, Launch, Options, Region, RegionKind};

/// Mirror of `struct BnParams` (kernels/params.h); the self-test kernels use its fields
/// as generic arguments.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BnParams {
    pub x: u64,
    pub y: u64,
    pub dy: u64,
    pub dx: u64,
    pub weight: u64,
    pub bias: u64,
    pub running_mean: u64,
    pub running_var: u64,
    pub save_mean: u64,
    pub save_invstd: u64,
    pub grad_weight: u64,
    pub grad_bias: u64,
    pub ws_counters: u64,
    pub ws_partials: u64,
    pub ws_channel: u64,
    pub z: u64,
    pub dz: u64,
    pub n: i64,
    pub c: i64,
    pub s: i64,
    pub chunk: i64,
    pub eps: f64,
    pub momentum: f64,
    pub bessel: f64,
    pub flags: u32,
    pub splits: u32,
    pub tile_x: u32,
    pub reserved: u32,
}

const _: () = assert!(std::mem::size_of::<BnParams>() == 208);

impl BnParams {
    pub fn bytes(&self) -> Vec<u8> {
        let p: *const BnParams = self;
        // SAFETY: BnParams is repr(C) plain data with no padding (17 u64, 4 i64, 3 f64,
        // 4 u32 = 208 bytes, asserted above); reading its bytes is fine.
        unsafe { std::slice::from_raw_parts(p.cast::<u8>(), std::mem::size_of::<BnParams>()) }
            .to_vec()
    }
}

/// Address of a slice, as the kernel sees it.
pub fn addr<T>(s: &[T]) -> u64 {
    s.as_ptr() as u64
}

pub fn addr_mut<T>(s: &mut [T]) -> u64 {
    s.as_mut_ptr() as u64
}

pub fn region<'a, T>(name: &'a str, s: &[T], kind: RegionKind) -> Region<'a> {
    Region {
        addr: s.as_ptr() as u64,
        bytes: std::mem::size_of_val(s) as u64,
        name,
        kind,
    }
}

pub fn cfg(grid: u32, block: u32) -> Launch {
    Launch {
        grid: [grid, 1, 1],
        block: [block, 1, 1],
        dynamic_shared_bytes: 0,
        cooperative: false,
        shared_limit_bytes: 0,
    }
}

pub fn opts(seed: u64) -> Options {
    Options {
        seed,
        max_resident_blocks: 4,
        preempt_one_in: 0,
    }
}

/// `cuda_batchnorm_emu::launch` for the tests, whose regions always describe vectors the
/// calling test owns and leaves alone during the launch.
pub fn launch(
    kernel: &str,
    cfg: &Launch,
    params: &[u8],
    regions: &[Region<'_>],
    o: &Options,
) -> Result<(), EmuError> {
    // SAFETY: every region a test passes covers (part of) a Vec that test owns, keeps
    // alive across the call and does not touch while the launch runs.
    unsafe { cuda_batchnorm_emu::launch(kernel, cfg, params, regions, o) }
}

pub fn run(
    kernel: &str,
    cfg: &Launch,
    p: &BnParams,
    regions: &[Region<'_>],
    o: &Options,
) -> Result<(), EmuError> {
    launch(kernel, cfg, &p.bytes(), regions, o)
}

/// Deterministic pseudo-random numbers for test data.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Asserts that `r` is an error whose message contains every one of `needles`.
#[track_caller]
pub fn expect_err(r: Result<(), EmuError>, needles: &[&str]) -> EmuError {
    let e = match r {
        Ok(()) => panic!("expected an error containing {needles:?}, got Ok"),
        Err(e) => e,
    };
    eprintln!("expected error: {e}");
    for n in needles {
        assert!(
            e.message.contains(n),
            "error message {:?} does not contain {:?}",
            e.message,
            n
        );
    }
    e
}

/// emu_test_last_block: returns the total or the launch error.
pub fn last_block(x: &[i64], grid: u32, flags: u32, o: &Options) -> Result<i64, String> {
    let chunk = x.len().div_ceil(grid as usize) as i64;
    let mut y = [0i64; 1];
    let mut partials = vec![0i64; grid as usize];
    let mut counters = [0u32; 1];
    let p = BnParams {
        x: addr(x),
        y: addr_mut(&mut y),
        ws_partials: addr_mut(&mut partials),
        ws_counters: addr_mut(&mut counters),
        n: x.len() as i64,
        chunk,
        flags,
        ..Default::default()
    };
    let regions = [
        region("x", x, RegionKind::Input),
        region("y", &y, RegionKind::Output),
        region("ws_partials", &partials, RegionKind::Scratch),
        region("ws_counters", &counters, RegionKind::Counters),
    ];
    run("emu_test_last_block", &cfg(grid, 256), &p, &regions, o).map_err(|e| e.to_string())?;
    assert_eq!(counters[0], 0);
    Ok(y[0])
}

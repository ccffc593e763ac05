//! f16 / bf16 conversions in bn_emu.h, exhaustively and against references computed
//! here with f64 arithmetic.
mod common;

use common::*;
use cuda_batchnorm_emu::RegionKind::{Input, Output};

fn convert_u16_to_f32(mode: u32, x: &[u16]) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    let p = BnParams {
        x: addr(x),
        y: addr_mut(&mut y),
        n: x.len() as i64,
        flags: mode,
        ..Default::default()
    };
    let regions = [region("x", x, Input), region("y", &y, Output)];
    run("emu_test_convert", &cfg(64, 256), &p, &regions, &opts(0)).unwrap();
    y
}

fn convert_f32_to_u16(mode: u32, x: &[f32]) -> Vec<u16> {
    let mut y = vec![0u16; x.len()];
    let p = BnParams {
        x: addr(x),
        y: addr_mut(&mut y),
        n: x.len() as i64,
        flags: mode,
        ..Default::default()
    };
    let regions = [region("x", x, Input), region("y", &y, Output)];
    run("emu_test_convert", &cfg(64, 256), &p, &regions, &opts(0)).unwrap();
    y
}

/// Value of half bits `h` computed with f64 arithmetic from the IEEE definition.
fn half_value(h: u16) -> f64 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let e = i32::from((h >> 10) & 0x1f);
    let m = f64::from(h & 0x3ff);
    match e {
        0 => sign * m * 2f64.powi(-24),
        31 if m == 0.0 => sign * f64::INFINITY,
        31 => f64::NAN,
        _ => sign * (1.0 + m / 1024.0) * 2f64.powi(e - 15),
    }
}

fn bf16_value(h: u16) -> f64 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let e = i32::from((h >> 7) & 0xff);
    let m = f64::from(h & 0x7f);
    match e {
        0 => sign * m * 2f64.powi(-133),
        255 if m == 0.0 => sign * f64::INFINITY,
        255 => f64::NAN,
        _ => sign * (1.0 + m / 128.0) * 2f64.powi(e - 127),
    }
}

/// Round-to-nearest-even of `v` onto the non-negative finite values `table` (sorted
/// bit patterns 0..=max_finite), with `inf_bits` as the value past the largest
/// finite one (2^16 for half: a value at or beyond the midpoint overflows).
fn round_to_table(v: f32, table: &[(u16, f64)], overflow_at: f64, inf_bits: u16) -> u16 {
    let sign: u16 = if v.is_sign_negative() { 0x8000 } else { 0 };
    let a = f64::from(v.abs());
    if a.is_infinite() {
        return sign | inf_bits;
    }
    // Neighbours lo <= a < hi, where the value after the largest finite is overflow_at.
    let idx = table.partition_point(|&(_, t)| t <= a);
    let (lo_bits, lo) = table[idx - 1];
    let (hi_bits, hi) = if idx < table.len() {
        table[idx]
    } else {
        (inf_bits, overflow_at)
    };
    if a == lo {
        return sign | lo_bits;
    }
    let mid = (lo + hi) / 2.0; // exact in f64
    let bits = if a < mid {
        lo_bits
    } else if a > mid {
        hi_bits
    } else if lo_bits & 1 == 0 {
        lo_bits
    } else {
        hi_bits
    };
    sign | bits
}

fn test_floats() -> Vec<f32> {
    let mut v = vec![
        0.0f32,
        -0.0,
        1.0,
        -1.0,
        65504.0,
        65519.99,
        65520.0,
        -65520.0,
        65536.0,
        1e9,
        f32::MAX,
        f32::MIN_POSITIVE,
        1e-45,
        5.960_464_5e-8, // 2^-24, smallest half subnormal
        2.980_232_2e-8, // 2^-25: tie, rounds to 0
        2.980_232_6e-8, // just above 2^-25: rounds up
        8.940_697e-8,   // 1.5 * 2^-24: tie, rounds to even (2 * 2^-24)
        6.097_555e-5,   // largest half subnormal
        6.103_515_6e-5, // 2^-14, smallest half normal
        3.389_531_4e38, // near bf16 overflow
        3.402_823_5e38,
        f32::INFINITY,
        f32::NEG_INFINITY,
    ];
    // Every half and bf16 value, its neighbours in f32, and the midpoints between
    // consecutive halves (ties) with their neighbours.
    for h in 0u32..0x7bff {
        let f = half_value(h as u16) as f32;
        let next = half_value(h as u16 + 1) as f32;
        let mid = ((f64::from(f) + f64::from(next)) / 2.0) as f32;
        for c in [
            f,
            mid,
            f32::from_bits(mid.to_bits() + 1),
            f32::from_bits(mid.to_bits().saturating_sub(1)),
        ] {
            v.push(c);
            v.push(-c);
        }
    }
    for b in (0u32..0x7f80).step_by(3) {
        let f = f32::from_bits(b << 16);
        v.push(f);
        v.push(f32::from_bits((b << 16) | 0x8000));
        v.push(f32::from_bits((b << 16) | 0x7fff));
        v.push(f32::from_bits((b << 16) | 0x8001));
    }
    let mut r = Rng(99);
    for _ in 0..200_000 {
        let bits = r.next_u64() as u32;
        let f = f32::from_bits(bits);
        if !f.is_nan() {
            v.push(f);
        }
        // Values concentrated in the half range.
        let e = r.below(45) as i32 - 30;
        v.push((r.next_u64() as u32 as f32 / u32::MAX as f32) * 2f32.powi(e));
    }
    v
}

#[test]
fn half_to_float_all_bit_patterns() {
    let all: Vec<u16> = (0..=u16::MAX).collect();
    let f = convert_u16_to_f32(0, &all);
    for (h, v) in all.iter().zip(&f) {
        let want = half_value(*h);
        if want.is_nan() {
            assert!(v.is_nan(), "half {h:#06x} -> {v}");
        } else {
            assert_eq!(f64::from(*v), want, "half {h:#06x}");
            assert_eq!(v.is_sign_negative(), h & 0x8000 != 0, "sign of {h:#06x}");
        }
    }
    // And back: every pattern round-trips (NaN stays NaN).
    let back = convert_f32_to_u16(1, &f);
    for (h, b) in all.iter().zip(&back) {
        if half_value(*h).is_nan() {
            assert!(half_value(*b).is_nan(), "NaN {h:#06x} -> {b:#06x}");
        } else {
            assert_eq!(b, h, "round trip of {h:#06x}");
        }
    }
}

#[test]
fn bf16_to_float_all_bit_patterns() {
    let all: Vec<u16> = (0..=u16::MAX).collect();
    let f = convert_u16_to_f32(2, &all);
    for (h, v) in all.iter().zip(&f) {
        let want = bf16_value(*h);
        if want.is_nan() {
            assert!(v.is_nan(), "bf16 {h:#06x} -> {v}");
        } else {
            assert_eq!(f64::from(*v), want, "bf16 {h:#06x}");
            assert_eq!(v.is_sign_negative(), h & 0x8000 != 0);
        }
    }
    let back = convert_f32_to_u16(3, &f);
    for (h, b) in all.iter().zip(&back) {
        if bf16_value(*h).is_nan() {
            assert!(bf16_value(*b).is_nan(), "NaN {h:#06x} -> {b:#06x}");
        } else {
            assert_eq!(b, h, "round trip of {h:#06x}");
        }
    }
}

#[test]
fn float_to_half_rounds_to_nearest_even() {
    let table: Vec<(u16, f64)> = (0u16..0x7c00).map(|h| (h, half_value(h))).collect();
    let x = test_floats();
    let got = convert_f32_to_u16(1, &x);
    for (v, g) in x.iter().zip(&got) {
        let want = round_to_table(*v, &table, 65536.0, 0x7c00);
        assert_eq!(*g, want, "f32 {v:e} ({:#010x})", v.to_bits());
    }
    // NaNs stay NaN (quiet or signalling, any payload, either sign).
    let nans: Vec<f32> = [
        0x7fc0_0000u32,
        0x7f80_0001,
        0xffc0_1234,
        0x7fbf_ffff,
        0xff80_2000,
    ]
    .iter()
    .map(|&b| f32::from_bits(b))
    .collect();
    for h in convert_f32_to_u16(1, &nans) {
        assert!(half_value(h).is_nan(), "NaN -> {h:#06x}");
    }
}

#[test]
fn float_to_bf16_rounds_to_nearest_even() {
    let table: Vec<(u16, f64)> = (0u16..0x7f80).map(|h| (h, bf16_value(h))).collect();
    let x = test_floats();
    let got = convert_f32_to_u16(3, &x);
    for (v, g) in x.iter().zip(&got) {
        let want = round_to_table(*v, &table, 2f64.powi(128), 0x7f80);
        assert_eq!(*g, want, "f32 {v:e} ({:#010x})", v.to_bits());
    }
    let nans: Vec<f32> = [
        0x7fc0_0000u32,
        0x7f80_0001,
        0xffc0_1234,
        0x7fbf_ffff,
        0xff80_2000,
    ]
    .iter()
    .map(|&b| f32::from_bits(b))
    .collect();
    for h in convert_f32_to_u16(3, &nans) {
        assert!(bf16_value(h).is_nan(), "NaN -> {h:#06x}");
    }
}

//! Bytes per operation, bandwidth and summary statistics.
//!
//! The byte counts are the minimum any implementation must move, each tensor once:
//!
//! * `train_fwd`: read x, write y; read weight and bias; read and write running_mean
//!   and running_var; write save_mean and save_invstd.
//! * `eval_fwd`: read x, write y; read weight, bias, running_mean, running_var.
//! * `backward`: read x and dy, write dx; read weight, save_mean, save_invstd; write
//!   grad_weight and grad_bias.
//! * `frozen_eval`: read x, write y; read the coefficients (scale and shift, C each, in
//!   the accumulator type).
//! * an epilogue adds its tensors to its op's: add-ReLU's forward reads z; a fused
//!   backward reads y (the mask) and add-ReLU's writes dz.
//! * an unfused sequence (`*_seq`) is charged the bytes of the computation it performs,
//!   the same as its fused op's (for the backward, ReLU's), so that the two GB/s figures
//!   compare as the inverse of their times.
//! * a SyncBatchNorm op (`sync_*`) is charged its plain op's bytes; what it sends
//!   through the collectives is [`sent_bytes`], reported beside them.
//!
//! Parameters and running statistics are f32 for f16/bf16 inputs (the suite's mixed
//! mode) and the input's type otherwise; saved statistics are in the accumulator type
//! (f64 for f64 inputs, f32 otherwise). `scripts/torch_baseline.py` uses the same
//! formulas.

use cuda_batchnorm::DType;

use crate::suite::{Epi, Kind, Op};

/// Bytes per element of the parameters and running statistics for an input dtype.
pub fn param_size(input: DType) -> usize {
    match input {
        DType::F16 | DType::BF16 => 4,
        d => d.size(),
    }
}

/// The minimal bytes `op` moves on a tensor of `dims`.
pub fn op_bytes(op: Op, dims: &[usize], dtype: DType) -> u64 {
    let numel: u64 = dims.iter().map(|&d| d as u64).product();
    let c = dims.get(1).copied().unwrap_or(0) as u64;
    let t = dtype.size() as u64;
    let p = param_size(dtype) as u64;
    let acc = dtype.acc().size() as u64;
    let plain = match op.kind() {
        Kind::Train => 2 * numel * t + 2 * c * p + 4 * c * p + 2 * c * acc,
        Kind::Eval => 2 * numel * t + 4 * c * p,
        Kind::Frozen => 2 * numel * t + 2 * c * acc,
        Kind::Backward => 3 * numel * t + c * p + 2 * c * acc + 2 * c * p,
    };
    let epilogue = match (op.kind(), op.epilogue()) {
        (_, None) => 0,
        (Kind::Backward, Some(Epi::Relu)) => numel * t,
        (Kind::Backward, Some(Epi::AddRelu)) => 2 * numel * t,
        (_, Some(Epi::Relu)) => 0,
        (_, Some(Epi::AddRelu)) => numel * t,
    };
    plain + epilogue
}

/// Bytes of the verifying exchange (`SyncOptions::verify`): ok, channels and count as
/// f64.
pub const SYNC_HEADER_BYTES: u64 = 24;

/// The bytes one rank hands its collectives per call of a SyncBatchNorm op (`None` for
/// the other ops): the forward all-gathers its mean, invstd (C each) and count in the
/// accumulator type, the backward all-reduces `sum_dy` and `sum_dy_xmu` (C each); with
/// verification each call first all-gathers its header. These are the send buffers, the
/// same for any number of ranks; over k ranks NCCL's ring moves (k - 1) times an
/// all-gather's and about 2 (k - 1) / k times an all-reduce's through each rank's links.
pub fn sent_bytes(op: Op, dims: &[usize], dtype: DType) -> Option<u64> {
    let verify = op.sync_verify()?;
    let c = dims.get(1).copied().unwrap_or(0) as u64;
    let acc = dtype.acc().size() as u64;
    let data = match op.kind() {
        Kind::Backward => 2 * c * acc,
        _ => (2 * c + 1) * acc,
    };
    Some(data + if verify { SYNC_HEADER_BYTES } else { 0 })
}

/// GB/s (10^9 bytes per second) of `bytes` moved in `us` microseconds.
pub fn gbps(bytes: u64, us: f64) -> f64 {
    if us > 0.0 && us.is_finite() {
        bytes as f64 / (us * 1e-6) / 1e9
    } else {
        0.0
    }
}

/// `gbps` as a percentage of `copy_gbps`.
pub fn pct_of(gbps: f64, copy_gbps: f64) -> f64 {
    if copy_gbps > 0.0 {
        100.0 * gbps / copy_gbps
    } else {
        0.0
    }
}

/// The median (mean of the two middle values for an even count); `None` when empty or
/// when a value is NaN.
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() || values.iter().any(|v| v.is_nan()) {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

/// The geometric mean of the positive finite values; `None` when there are none.
pub fn geomean(values: &[f64]) -> Option<f64> {
    let logs: Vec<f64> = values
        .iter()
        .filter(|v| v.is_finite() && **v > 0.0)
        .map(|v| v.ln())
        .collect();
    if logs.is_empty() {
        None
    } else {
        Some((logs.iter().sum::<f64>() / logs.len() as f64).exp())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_of_the_sync_ops_and_what_they_send() {
        let dims = [32, 256, 56, 56];
        for (dtype, acc) in [(DType::F16, 4), (DType::F64, 8)] {
            let b = |op| op_bytes(op, &dims, dtype);
            assert_eq!(b(Op::SyncTrainFwd), b(Op::TrainFwd));
            assert_eq!(b(Op::SyncBackwardUnverified), b(Op::Backward));
            let sent = |op| sent_bytes(op, &dims, dtype);
            assert_eq!(sent(Op::SyncTrainFwd), Some(513 * acc + 24));
            assert_eq!(sent(Op::SyncTrainFwdUnverified), Some(513 * acc));
            assert_eq!(sent(Op::SyncBackward), Some(512 * acc + 24));
            assert_eq!(sent(Op::SyncBackwardUnverified), Some(512 * acc));
            assert_eq!(sent(Op::TrainFwd), None);
        }
    }

    #[test]
    fn bytes_of_the_frozen_and_fused_ops() {
        let dims = [32, 256, 56, 56];
        let numel = 25_690_112u64;
        let f16 = |op| op_bytes(op, &dims, DType::F16);
        assert_eq!(f16(Op::FrozenEval), 2 * numel * 2 + 2 * 256 * 4);
        assert_eq!(f16(Op::EvalRelu), f16(Op::EvalFwd));
        assert_eq!(f16(Op::EvalAddRelu), 3 * numel * 2 + 4 * 256 * 4);
        assert_eq!(f16(Op::TrainAddRelu), f16(Op::TrainFwd) + numel * 2);
        assert_eq!(f16(Op::BackwardRelu), 4 * numel * 2 + 5 * 256 * 4);
        assert_eq!(f16(Op::BackwardAddRelu), 5 * numel * 2 + 5 * 256 * 4);
        // A sequence is charged its computation's bytes, as the fused op is.
        for (fused, seq) in [
            (Op::EvalRelu, Op::EvalReluSeq),
            (Op::EvalAddRelu, Op::EvalAddReluSeq),
            (Op::TrainRelu, Op::TrainReluSeq),
            (Op::TrainAddRelu, Op::TrainAddReluSeq),
            (Op::BackwardRelu, Op::BackwardReluSeq),
        ] {
            assert_eq!(f16(fused), f16(seq), "{}", seq.name());
        }
        // f64: the frozen coefficients are f64.
        assert_eq!(
            op_bytes(Op::FrozenEval, &[4, 3], DType::F64),
            2 * 12 * 8 + 2 * 3 * 8
        );
    }

    #[test]
    fn bytes_per_op() {
        // (32, 256, 56, 56) f32: numel = 25_690_112, C = 256.
        let dims = [32, 256, 56, 56];
        let numel = 25_690_112u64;
        assert_eq!(
            op_bytes(Op::TrainFwd, &dims, DType::F32),
            2 * numel * 4 + 8 * 256 * 4
        );
        assert_eq!(
            op_bytes(Op::EvalFwd, &dims, DType::F32),
            2 * numel * 4 + 4 * 256 * 4
        );
        assert_eq!(
            op_bytes(Op::Backward, &dims, DType::F32),
            3 * numel * 4 + 5 * 256 * 4
        );
        // f16 input, f32 parameters and statistics.
        assert_eq!(
            op_bytes(Op::TrainFwd, &dims, DType::F16),
            2 * numel * 2 + 8 * 256 * 4
        );
        assert_eq!(
            op_bytes(Op::Backward, &dims, DType::BF16),
            3 * numel * 2 + 5 * 256 * 4
        );
        // f64 everything.
        assert_eq!(
            op_bytes(Op::EvalFwd, &[4, 3], DType::F64),
            2 * 12 * 8 + 4 * 3 * 8
        );
        assert_eq!(
            op_bytes(Op::TrainFwd, &[4, 3], DType::F64),
            2 * 12 * 8 + 8 * 3 * 8
        );
    }

    #[test]
    fn bandwidth() {
        assert!((gbps(2_000_000_000, 1_000_000.0) - 2.0).abs() < 1e-12);
        assert!((gbps(3_000, 1.0) - 3.0).abs() < 1e-12);
        assert_eq!(gbps(1, 0.0), 0.0);
        assert_eq!(gbps(1, f64::NAN), 0.0);
        assert!((pct_of(1500.0, 3000.0) - 50.0).abs() < 1e-12);
        assert_eq!(pct_of(1.0, 0.0), 0.0);
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[1.0, f64::NAN]), None);
    }

    #[test]
    fn geomeans() {
        assert_eq!(geomean(&[]), None);
        assert!((geomean(&[2.0, 8.0]).unwrap() - 4.0).abs() < 1e-12);
        assert!((geomean(&[1.0, 10.0, 100.0]).unwrap() - 10.0).abs() < 1e-9);
        // Non-positive and non-finite values are left out.
        assert!((geomean(&[4.0, 0.0, -1.0, f64::INFINITY, f64::NAN]).unwrap() - 4.0).abs() < 1e-12);
        assert_eq!(geomean(&[0.0]), None);
    }
}

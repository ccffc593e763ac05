//! Frozen BatchNorm (torchvision's `FrozenBatchNorm2d`) on the CPU backend: torchvision's
//! numbers for every dtype pair and both layouts, the same eval as the BatchNorm it was
//! frozen from, PyTorch weights from `.safetensors`, and the errors in PyTorch's words.
//! The emulated kernels run the same fixtures in tests/emulated.rs, the GPU in
//! tests/gpu.rs.

mod common;

use common::cnn::{self, LAYERS};
use common::fixtures;
use cuda_batchnorm::cpu::{self, BatchNorm2d, FrozenBatchNorm1d, FrozenBatchNorm2d};
use cuda_batchnorm::half::{bf16, f16};
use cuda_batchnorm::{BatchNormOptions, BnError, Cpu, DType, MemoryFormat, Shape, StateDict};

#[test]
fn frozen_fixtures_cover_types_layouts_and_ranks() {
    let cases = fixtures::frozen();
    assert_eq!(cases.len(), 15);
    for (t, p) in common::TYPE_PAIRS {
        for format in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
            assert!(
                cases
                    .iter()
                    .any(|c| (c.dtype, c.param, c.format) == (*t, *p, format)),
                "{t}/{p} {format:?}"
            );
        }
    }
    for m in 1..=3 {
        assert!(cases.iter().any(|c| c.module == m), "FrozenBatchNorm{m}d");
    }
}

#[test]
fn cpu_frozen_matches_torchvision() {
    let mut failures = Vec::new();
    for case in fixtures::frozen() {
        let r = with_types!((case.dtype, case.param), |T, P| {
            fixtures::replay_frozen::<Cpu, T, P>(Cpu, &case)
        });
        if let Err(e) = r {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn a_wrong_frozen_answer_is_caught() {
    let mut case = fixtures::frozen()
        .into_iter()
        .find(|c| c.dtype == DType::F32)
        .unwrap();
    let y = case.steps[0]
        .tensors
        .iter_mut()
        .find(|(n, _)| n == "y")
        .unwrap();
    y.1[3] += 0.01;
    assert!(fixtures::replay_frozen::<Cpu, f32, f32>(Cpu, &case).is_err());
}

/// Frozen from a trained module, it computes that module's eval and eval backward.
#[test]
fn frozen_is_the_eval_of_the_module_it_was_frozen_from() {
    for format in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
        let shape = Shape::new(&[3, 4, 5, 2], format).unwrap();
        let mut rng = common::Rng::new(7);
        let x: Vec<f64> = (0..shape.numel())
            .map(|_| rng.normal() * 2.0 + 1.0)
            .collect();
        let dy: Vec<f64> = (0..shape.numel()).map(|_| rng.normal()).collect();
        let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let dy32: Vec<f32> = dy.iter().map(|&v| v as f32).collect();
        let mut bn = BatchNorm2d::<f32>::new(Cpu, 4, BatchNormOptions::default()).unwrap();
        bn.set_weight(&[0.5, 1.5, -2.0, 1.0]).unwrap();
        bn.set_bias(&[0.1, -0.2, 0.3, 0.0]).unwrap();
        for _ in 0..3 {
            bn.forward(&x32, &shape).unwrap();
        }
        let frozen = FrozenBatchNorm2d::<f32>::from_batchnorm(&bn).unwrap();
        assert_eq!(frozen.num_features(), 4);
        assert_eq!(frozen.eps(), 1e-5);
        bn.eval();
        let y = bn.forward(&x32, &shape).unwrap();
        let dx = bn.backward(&dy32, &x32, &shape).unwrap().input;
        let yf = frozen.forward(&x32, &shape).unwrap();
        let dxf = frozen.backward(&dy32, &shape).unwrap();
        let to64 = |v: &[f32]| v.iter().map(|&a| f64::from(a)).collect::<Vec<_>>();
        common::check_close("y", &yf, &to64(&y)).unwrap();
        common::check_close("dx", &dxf, &to64(&dx)).unwrap();
        // its buffers are the module's
        let sd = bn.state_dict().unwrap();
        let fsd = frozen.state_dict();
        assert_eq!(fsd.running_mean, sd.running_mean);
        assert_eq!(fsd.weight, sd.weight);
        assert_eq!(fsd.num_batches_tracked, None);
    }
}

#[test]
fn coefficients_are_computed_once_in_the_accumulator_type() {
    let scale_shift = cuda_batchnorm::frozen::coefficients::<f16, f32>(
        Some(&[f16::from_f32(2.0)]),
        Some(&[f16::from_f32(1.0)]),
        &[f16::from_f32(3.0)],
        &[f16::from_f32(4.0)],
        0.0,
    )
    .unwrap();
    assert_eq!(scale_shift, vec![1.0, -2.0]);
    let frozen = cpu::FrozenBatchNorm1d::<f16>::from_state_dict(
        Cpu,
        1,
        0.0,
        &StateDict {
            weight: Some(vec![f16::from_f32(2.0)]),
            bias: Some(vec![f16::from_f32(1.0)]),
            running_mean: Some(vec![f16::from_f32(3.0)]),
            running_var: Some(vec![f16::from_f32(4.0)]),
            num_batches_tracked: Some(5),
        },
    )
    .unwrap();
    assert_eq!(frozen.scale_shift(), &vec![1.0f32, -2.0]);
    let shape = Shape::new(&[2, 1], MemoryFormat::Contiguous).unwrap();
    let y = frozen
        .forward(&[f16::from_f32(3.0), f16::from_f32(5.0)], &shape)
        .unwrap();
    assert_eq!(y, vec![f16::from_f32(1.0), f16::from_f32(3.0)]);
}

#[test]
fn every_layer_of_the_cnn_frozen_reproduces_pytorch() {
    let (weights, io) = cnn::load();
    let mut failures = Vec::new();
    for prefix in LAYERS {
        for format in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
            for r in [
                cnn::check_layer_as::<Cpu, f32, f32>(true, Cpu, &weights, &io, prefix, format),
                cnn::check_layer_as::<Cpu, f64, f64>(true, Cpu, &weights, &io, prefix, format),
                cnn::check_layer_as::<Cpu, f16, f32>(true, Cpu, &weights, &io, prefix, format),
                cnn::check_layer_as::<Cpu, bf16, bf16>(true, Cpu, &weights, &io, prefix, format),
            ] {
                if let Err(e) = r {
                    failures.push(e);
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn frozen_errors_are_pytorchs() {
    let frozen = FrozenBatchNorm2d::<f32>::new(Cpu, 3, 1e-5).unwrap();
    let x = vec![0.0f32; 2 * 4 * 4];
    // torchvision's x * scale broadcast
    let four = Shape::nchw(2, 4, 2, 2).unwrap();
    assert_eq!(
        frozen.forward(&x, &four).unwrap_err().to_string(),
        "The size of tensor a (4) must match the size of tensor b (3) at non-singleton dimension 1"
    );
    let rank3 = Shape::new(&[2, 3, 4], MemoryFormat::Contiguous).unwrap();
    assert_eq!(
        frozen.forward(&x, &rank3).unwrap_err().to_string(),
        "expected 4D input (got 3D input)"
    );
    let three = Shape::nchw(2, 3, 2, 2).unwrap();
    let mut short = vec![0.0f32; 5];
    assert!(matches!(
        frozen.forward_into(&x[..24], &three, &mut short),
        Err(BnError::BufferTooShort { name: "output", .. })
    ));
    assert!(matches!(
        frozen.forward(&x[..10], &three),
        Err(BnError::BufferTooShort { name: "input", .. })
    ));
    // state dicts: torchvision's keys, PyTorch's sentences, this module's name
    let sd = StateDict {
        weight: Some(vec![1.0f32; 3]),
        bias: None,
        running_mean: Some(vec![0.0; 2]),
        running_var: Some(vec![1.0; 3]),
        num_batches_tracked: None,
    };
    let e = FrozenBatchNorm2d::<f32>::from_state_dict(Cpu, 3, 1e-5, &sd).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Error(s) in loading state_dict for FrozenBatchNorm2d:\n\tMissing key(s) in state_dict: \"bias\". \n\tsize mismatch for running_mean: copying a param with shape [2] from checkpoint, the shape in current model is [3]."
    );
    assert!(matches!(
        FrozenBatchNorm1d::<f32>::new(Cpu, 3, -1.0),
        Err(BnError::EpsNegative { .. })
    ));
    assert!(matches!(
        FrozenBatchNorm1d::<f32>::new(Cpu, 3, f64::NAN),
        Err(BnError::NonFinite { name: "eps", .. })
    ));
    // a module without running statistics has no eval to freeze
    let untracked = BatchNorm2d::<f32>::new(
        Cpu,
        3,
        BatchNormOptions {
            track_running_stats: false,
            ..BatchNormOptions::default()
        },
    )
    .unwrap();
    assert!(matches!(
        FrozenBatchNorm2d::from_batchnorm(&untracked),
        Err(BnError::MissingRunningStat { .. })
    ));
    // a prefix that is not a BatchNorm layer
    let (weights, _) = cnn::load();
    let e = FrozenBatchNorm2d::<f32>::from_safetensors(Cpu, &weights, "layer1.0.conv1", 1e-5)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(
            "Error(s) in loading state_dict for FrozenBatchNorm2d:\n\tMissing key(s) in state_dict: \"layer1.0.conv1.bias\""
        ),
        "{e}"
    );
}

#[test]
fn an_empty_batch_is_nothing_to_do() {
    let frozen = FrozenBatchNorm2d::<f32>::new(Cpu, 3, 1e-5).unwrap();
    let empty = Shape::nchw(0, 3, 2, 2).unwrap();
    assert_eq!(frozen.forward(&[], &empty).unwrap(), Vec::<f32>::new());
    assert_eq!(frozen.backward(&[], &empty).unwrap(), Vec::<f32>::new());
}

//! BatchNorm folded into the convolution or linear layer before it, on the CPU backend:
//! PyTorch's `torch.nn.utils.fusion` weights and biases on real layer shapes (ResNet-50's
//! stem, depthwise and grouped convolutions, 1-D and 3-D ones, transposed ones grouped
//! or not, a linear head; every weight type), and the errors. The fixture script checks
//! in PyTorch that each folded layer computes what the layer followed by the BatchNorm
//! does. tests/emulated.rs folds the same cases on the emulated kernels, tests/gpu.rs
//! on the GPU.

mod common;

use common::fixtures;
use cuda_batchnorm::cpu::FrozenBatchNorm2d;
use cuda_batchnorm::fold::{Layer, LayerKind};
use cuda_batchnorm::{BnError, Cpu, DType};

#[test]
fn fold_fixtures_cover_layers_and_types() {
    let cases = fixtures::fold_cases();
    assert_eq!(cases.len(), 13);
    let has = |f: &dyn Fn(&fixtures::FoldCase) -> bool| cases.iter().any(f);
    assert!(has(&|c| c.shape == [64, 3, 7, 7]), "ResNet-50's first conv");
    assert!(
        has(&|c| c.kind == LayerKind::Conv { groups: c.shape[0] } && c.shape[1] == 1),
        "depthwise"
    );
    assert!(has(
        &|c| matches!(c.kind, LayerKind::Transposed { groups } if groups > 1)
    ));
    assert!(has(&|c| c.kind == LayerKind::Transposed { groups: 1 }));
    assert!(has(&|c| c.kind == LayerKind::Linear));
    assert!(has(&|c| !c.has_bias) && has(&|c| c.has_bias));
    for d in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        assert!(has(&|c| c.dtype == d), "{d}");
    }
    assert!(has(&|c| (c.dtype, c.param) == (DType::F16, DType::F32)));
}

#[test]
fn folding_on_the_cpu_matches_pytorch() {
    let mut failures = Vec::new();
    for case in fixtures::fold_cases() {
        let r = with_types!((case.dtype, case.param), |T, P| {
            fixtures::replay_fold::<Cpu, T, P>(Cpu, &case)
        });
        if let Err(e) = r {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn a_wrong_fold_is_caught() {
    let mut case = fixtures::fold_cases()
        .into_iter()
        .find(|c| matches!(c.kind, LayerKind::Transposed { groups } if groups > 1))
        .unwrap();
    let w = case
        .tensors
        .iter_mut()
        .find(|(n, _)| n == "fused_weight")
        .unwrap();
    w.1[0] *= 1.01;
    assert!(fixtures::replay_fold::<Cpu, f32, f32>(Cpu, &case).is_err());
}

#[test]
fn folding_errors() {
    let bn = FrozenBatchNorm2d::<f32>::new(Cpu, 4, 1e-5).unwrap();
    let w = vec![1.0f32; 4 * 2 * 3 * 3];
    let fold = |kind, shape: &[usize], bias: Option<&[f32]>| {
        bn.fold(Layer {
            kind,
            weight: &w[..shape.iter().product::<usize>().min(w.len())],
            shape,
            bias,
        })
        .map(|_| ())
        .unwrap_err()
    };
    // PyTorch's broadcast of the weight against the BatchNorm's factor
    assert_eq!(
        fold(LayerKind::Conv { groups: 1 }, &[8, 1, 3, 3], None).to_string(),
        "The size of tensor a (8) must match the size of tensor b (4) at non-singleton dimension 0"
    );
    assert_eq!(
        fold(LayerKind::Transposed { groups: 1 }, &[4, 2, 3, 3], None).to_string(),
        "The size of tensor a (2) must match the size of tensor b (4) at non-singleton dimension 1"
    );
    assert!(matches!(
        fold(
            LayerKind::Conv { groups: 1 },
            &[4, 2, 3, 3],
            Some(&[0.0; 3])
        ),
        BnError::SizeMismatch { a: 3, b: 4, dim: 0 }
    ));
    assert!(matches!(
        fold(LayerKind::Conv { groups: 3 }, &[4, 2, 3, 3], None),
        BnError::InvalidLayer(_)
    ));
    assert!(matches!(
        fold(LayerKind::Transposed { groups: 0 }, &[4, 2, 3, 3], None),
        BnError::InvalidLayer(_)
    ));
    assert!(matches!(
        fold(LayerKind::Linear, &[4, 2, 3, 3], None),
        BnError::InvalidLayer(_)
    ));
    assert!(matches!(
        fold(LayerKind::Conv { groups: 1 }, &[4, 18], None),
        BnError::InvalidLayer(_)
    ));
    // a weight shorter than its size, and a size whose product overflows
    let short = bn.fold(Layer {
        kind: LayerKind::Conv { groups: 1 },
        weight: &w[..10],
        shape: &[4, 2, 3, 3],
        bias: None,
    });
    assert!(matches!(short, Err(BnError::InvalidLayer(_))));
    let huge = bn.fold(Layer {
        kind: LayerKind::Conv { groups: 1 },
        weight: &w[..],
        shape: &[4, usize::MAX, 3, 3],
        bias: None,
    });
    assert!(matches!(huge, Err(BnError::InvalidLayer(_))));
}

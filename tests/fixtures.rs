//! PyTorch golden fixtures against the CPU backend (every `cargo test`). The emulated
//! kernels replay the same fixtures in tests/emulated.rs, the GPU in tests/gpu.rs.

mod common;

use common::fixtures::{self, FixtureCase};
use cuda_batchnorm::{Cpu, DType, MemoryFormat};

#[test]
fn fixtures_cover_modules_modes_dtypes_and_formats() {
    let cases = fixtures::all();
    assert_eq!(cases.len(), 38);
    let has = |f: &dyn Fn(&FixtureCase) -> bool| cases.iter().any(f);
    for m in 1..=3 {
        assert!(has(&|c| c.module == m), "BatchNorm{m}d");
    }
    assert!(has(&|c| !c.affine));
    assert!(has(&|c| !c.track));
    assert!(has(&|c| c.momentum.is_none()));
    assert!(has(
        &|c| c.format == MemoryFormat::ChannelsLast && c.module == 3
    ));
    assert!(has(
        &|c| c.format == MemoryFormat::ChannelsLast && c.module == 1
    ));
    for (t, p) in common::TYPE_PAIRS {
        assert!(has(&|c| (c.dtype, c.param) == (*t, *p)), "{t}/{p}");
    }
    assert!(has(&|c| c.steps.iter().any(|s| !s.train)), "eval steps");
    // the fused epilogues: both, on every type pair, in both layouts
    for (t, p) in common::TYPE_PAIRS {
        for e in [fixtures::Fused::Relu, fixtures::Fused::AddRelu] {
            assert!(
                has(&|c| (c.dtype, c.param, c.epilogue) == (*t, *p, e)),
                "{e:?} {t}/{p}"
            );
        }
    }
    for f in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
        assert!(has(
            &|c| c.epilogue == fixtures::Fused::AddRelu && c.format == f
        ));
        assert!(has(
            &|c| c.epilogue == fixtures::Fused::Relu && c.format == f
        ));
    }
    assert!(
        has(&|c| c.steps.iter().filter(|s| s.train).count() >= 3),
        "several training steps"
    );
    for c in &cases {
        for s in &c.steps {
            let numel: usize = c.dims.iter().product();
            assert_eq!(s.get("x").map(<[f64]>::len), Some(numel), "{}", c.name);
        }
    }
}

#[test]
fn cpu_backend_matches_pytorch() {
    let mut failures = Vec::new();
    for case in fixtures::all() {
        let r = with_types!(
            (case.dtype, case.param),
            |T, P| fixtures::replay::<Cpu, T, P>(Cpu, &case)
        );
        if let Err(e) = r {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn a_wrong_answer_is_caught() {
    // The replay must be able to fail: perturb one output of one step.
    let mut case = fixtures::all()
        .into_iter()
        .find(|c| c.dtype == DType::F32)
        .unwrap();
    let y = case.steps[0]
        .tensors
        .iter_mut()
        .find(|(n, _)| n == "y")
        .unwrap();
    y.1[0] += 0.01;
    assert!(fixtures::replay::<Cpu, f32, f32>(Cpu, &case).is_err());
}

#[test]
fn a_wrong_residual_gradient_is_caught() {
    let mut case = fixtures::all()
        .into_iter()
        .find(|c| c.dtype == DType::F32 && c.epilogue == fixtures::Fused::AddRelu)
        .unwrap();
    assert!(fixtures::replay::<Cpu, f32, f32>(Cpu, &case).is_ok());
    let dz = case.steps[0]
        .tensors
        .iter_mut()
        .find(|(n, _)| n == "dz")
        .unwrap();
    for v in dz.1.iter_mut() {
        *v = -*v;
    }
    assert!(fixtures::replay::<Cpu, f32, f32>(Cpu, &case).is_err());
}

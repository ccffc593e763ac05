//! Every validation error, with PyTorch's sentence, through the public APIs
//! (the CPU backend and the modules; the CUDA functions share the same validation), and
//! the promise that a call returning `Err` changes nothing.

use cuda_batchnorm::cpu::{self, BatchNorm1d, BatchNorm2d, BatchNorm3d, Forward};
use cuda_batchnorm::{BatchNormOptions, BnError, Cpu, MemoryFormat, Shape, StateDict};

fn shape(dims: &[usize]) -> Shape {
    Shape::new(dims, MemoryFormat::Contiguous).unwrap()
}

fn data(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919) % 23) as f32 * 0.25 - 2.0)
        .collect()
}

/// F.batch_norm(x, rm, rv, w, b, training, momentum, eps) on the CPU; returns the message.
#[allow(clippy::too_many_arguments)]
fn functional_err(
    dims: &[usize],
    rm: Option<usize>,
    rv: Option<usize>,
    w: Option<usize>,
    b: Option<usize>,
    training: bool,
    eps: f64,
) -> String {
    let s = shape(dims);
    let x = data(s.numel());
    let mut y = vec![0.0f32; s.numel()];
    let mut rm_buf = vec![0.0f32; rm.unwrap_or(0)];
    let mut rv_buf = vec![1.0f32; rv.unwrap_or(0)];
    let w_buf = vec![1.0f32; w.unwrap_or(0)];
    let b_buf = vec![0.0f32; b.unwrap_or(0)];
    let args = Forward::<f32, f32> {
        input: &x,
        shape: s,
        running_mean: rm.map(|_| rm_buf.as_mut_slice()),
        running_var: rv.map(|_| rv_buf.as_mut_slice()),
        weight: w.map(|_| w_buf.as_slice()),
        bias: b.map(|_| b_buf.as_slice()),
        training,
        momentum: 0.1,
        eps,
    };
    match cpu::batch_norm(args, &mut y, None) {
        Ok(()) => "ok".into(),
        Err(e) => e.to_string(),
    }
}

#[test]
fn functional_errors_carry_pytorchs_sentences_in_pytorchs_order() {
    let c3 = Some(3);
    assert_eq!(
        functional_err(&[1, 10], None, None, None, None, true, 1e-5),
        "Expected more than 1 value per channel when training, got input size [1, 10]"
    );
    assert_eq!(
        functional_err(&[1, 10, 1, 1], None, None, None, None, true, 1e-5),
        "Expected more than 1 value per channel when training, got input size [1, 10, 1, 1]"
    );
    assert_eq!(
        functional_err(&[1, 10, 2], None, None, None, None, true, 1e-5),
        "ok"
    );
    assert_eq!(
        functional_err(&[1, 10], Some(10), Some(10), None, None, false, 1e-5),
        "ok"
    );
    assert_eq!(
        functional_err(&[2, 3], c3, c3, None, None, true, 0.0),
        "batch_norm eps must be positive during training, but got 0.0"
    );
    assert_eq!(
        functional_err(&[2, 3], c3, c3, None, None, false, -1.0),
        "batch_norm eps must be non-negative, but got -1.0"
    );
    assert_eq!(
        functional_err(&[2, 3], c3, c3, None, None, false, 0.0),
        "ok"
    );
    assert_eq!(
        functional_err(&[2, 3], Some(4), Some(4), None, None, true, 1e-5),
        "running_mean should contain 3 elements not 4"
    );
    assert_eq!(
        functional_err(&[2, 3], c3, Some(4), None, None, true, 1e-5),
        "running_var should contain 3 elements not 4"
    );
    assert_eq!(
        functional_err(&[2, 3], c3, c3, Some(5), Some(6), true, 1e-5),
        "weight should contain 3 elements not 5"
    );
    assert_eq!(
        functional_err(&[2, 3], c3, c3, c3, Some(6), true, 1e-5),
        "bias should contain 3 elements not 6"
    );
    assert_eq!(
        functional_err(&[2, 3], None, None, None, None, false, 1e-5),
        "running_mean must be defined in evaluation mode"
    );
    assert_eq!(
        functional_err(&[2, 3], c3, None, None, None, false, 1e-5),
        "running_var must be defined in evaluation mode"
    );
    assert_eq!(
        functional_err(&[2, 3], c3, None, None, None, true, 1e-5),
        "running_mean and running_var must either both be None or neither be None"
    );
    // order: batch size, then eps, then lengths, then pairing
    assert!(
        functional_err(&[1, 10], Some(4), None, None, None, true, 0.0)
            .starts_with("Expected more than 1")
    );
    assert!(
        functional_err(&[2, 3], Some(4), None, None, None, true, 0.0).starts_with("batch_norm eps")
    );
    assert_eq!(
        functional_err(&[2, 3], Some(4), None, None, None, true, 1e-5),
        "running_mean should contain 3 elements not 4"
    );
    // empty inputs skip the length checks, as in PyTorch
    assert_eq!(
        functional_err(&[0, 3], Some(4), Some(4), None, None, true, 1e-5),
        "ok"
    );
    assert_eq!(
        functional_err(&[0, 3], None, None, None, None, false, 1e-5),
        "ok"
    );
    assert_eq!(
        functional_err(&[2, 0], None, None, None, None, true, 1e-5),
        "ok"
    );
}

#[test]
fn deviations_are_typed_errors() {
    assert_eq!(
        functional_err(&[2, 3], None, None, None, None, true, f64::NAN),
        "batch_norm eps must be finite, but got NaN"
    );
    let s = shape(&[2, 3]);
    let mut y = vec![0.0f32; 6];
    let short = data(5);
    let args = Forward::<f32, f32> {
        input: &short,
        shape: s,
        running_mean: None,
        running_var: None,
        weight: None,
        bias: None,
        training: true,
        momentum: 0.1,
        eps: 1e-5,
    };
    let e = cpu::batch_norm(args, &mut y, None).unwrap_err();
    assert!(
        matches!(
            e,
            BnError::BufferTooShort {
                name: "input",
                needed: 6,
                got: 5,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "input holds 5 elements but input size [2, 3] needs 6"
    );
}

#[test]
fn ranks_zero_and_one_get_pytorchs_sentences() {
    // PyTorch 2.15 on the CPU, nn.BatchNorm{1,2,3}d(5) given a (5,) and a 0-d input.
    let x = data(5);
    let err = |r: Result<Vec<f32>, BnError>| r.unwrap_err().to_string();
    let mut m1 = BatchNorm1d::<f32>::new(Cpu, 5, BatchNormOptions::default()).unwrap();
    assert_eq!(
        err(m1.forward(&x, &shape(&[5]))),
        "expected 2D or 3D input (got 1D input)"
    );
    assert_eq!(
        err(m1.forward(&x[..1], &shape(&[]))),
        "expected 2D or 3D input (got 0D input)"
    );
    let mut m2 = BatchNorm2d::<f32>::new(Cpu, 5, BatchNormOptions::default()).unwrap();
    assert_eq!(
        err(m2.forward(&x, &shape(&[5]))),
        "expected 4D input (got 1D input)"
    );
    let mut m3 = BatchNorm3d::<f32>::new(Cpu, 5, BatchNormOptions::default()).unwrap();
    assert_eq!(
        err(m3.forward(&x[..1], &shape(&[]))),
        "expected 5D input (got 0D input)"
    );
    // F.batch_norm(torch.randn(5), torch.zeros(5), torch.ones(5), training=True)
    let (mut rm, mut rv) = (vec![0f32; 5], vec![1f32; 5]);
    let mut y = vec![0f32; 5];
    let e = cpu::batch_norm(
        Forward::<f32, f32> {
            input: &x,
            shape: shape(&[5]),
            running_mean: Some(&mut rm),
            running_var: Some(&mut rv),
            weight: None,
            bias: None,
            training: true,
            momentum: 0.1,
            eps: 1e-5,
        },
        &mut y,
        None,
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "running_mean should contain 0 elements not 5"
    );
    assert_eq!((rm, rv), (vec![0f32; 5], vec![1f32; 5]));
}

#[test]
fn module_rank_errors() {
    let x = data(2 * 4 * 9 * 3);
    let err = |r: Result<Vec<f32>, BnError>| r.unwrap_err().to_string();
    let mut m1 = BatchNorm1d::<f32>::new(Cpu, 4, BatchNormOptions::default()).unwrap();
    assert_eq!(
        err(m1.forward(&x[..72], &shape(&[2, 4, 3, 3]))),
        "expected 2D or 3D input (got 4D input)"
    );
    let mut m2 = BatchNorm2d::<f32>::new(Cpu, 4, BatchNormOptions::default()).unwrap();
    assert_eq!(
        err(m2.forward(&x[..24], &shape(&[2, 4, 3]))),
        "expected 4D input (got 3D input)"
    );
    let mut m3 = BatchNorm3d::<f32>::new(Cpu, 4, BatchNormOptions::default()).unwrap();
    assert_eq!(
        err(m3.forward(&x[..72], &shape(&[2, 4, 3, 3]))),
        "expected 5D input (got 4D input)"
    );
    // the module's own channel count against the input's
    let mut m = BatchNorm1d::<f32>::new(Cpu, 4, BatchNormOptions::default()).unwrap();
    assert_eq!(
        err(m.forward(&x[..6], &shape(&[2, 3]))),
        "running_mean should contain 3 elements not 4"
    );
    let opts = BatchNormOptions {
        track_running_stats: false,
        ..Default::default()
    };
    let mut m = BatchNorm1d::<f32>::new(Cpu, 4, opts).unwrap();
    assert_eq!(
        err(m.forward(&x[..6], &shape(&[2, 3]))),
        "weight should contain 3 elements not 4"
    );
    // no per-channel state at all: any channel count, as in PyTorch
    let opts = BatchNormOptions {
        track_running_stats: false,
        affine: false,
        ..Default::default()
    };
    let mut m = BatchNorm1d::<f32>::new(Cpu, 4, opts).unwrap();
    assert_eq!(m.forward(&x[..10], &shape(&[2, 5])).unwrap().len(), 10);
}

#[test]
fn a_failed_call_changes_nothing() {
    let s = shape(&[3, 2, 2, 2]);
    let x = data(s.numel());
    let mut m = BatchNorm2d::<f32>::new(Cpu, 2, BatchNormOptions::default()).unwrap();
    m.forward(&x, &s).unwrap();
    let before = m.state_dict().unwrap();
    assert_eq!(before.num_batches_tracked, Some(1));
    let mut y = vec![7.0f32; x.len()];

    // wrong rank, one value per channel, bad eps: nothing moves
    assert!(m.forward_into(&x, &shape(&[3, 2, 4]), &mut y).is_err());
    let one = shape(&[1, 2, 1, 1]);
    assert!(matches!(
        m.forward_into(&x[..2], &one, &mut y[..2]),
        Err(BnError::TooFewValues { .. })
    ));
    let mut bad = BatchNorm2d::<f32>::new(
        Cpu,
        2,
        BatchNormOptions {
            eps: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(matches!(
        bad.forward_into(&x, &s, &mut y),
        Err(BnError::EpsNotPositive { .. })
    ));
    assert_eq!(
        bad.num_batches_tracked(),
        0,
        "PyTorch would have counted this batch"
    );
    // an output buffer too short
    assert!(matches!(
        m.forward_into(&x, &s, &mut y[..5]),
        Err(BnError::BufferTooShort { name: "output", .. })
    ));
    assert_eq!(m.state_dict().unwrap(), before);
    assert!(y.iter().all(|&v| v == 7.0), "output untouched");

    // NaN momentum is refused when it would be used
    let mut nan = BatchNorm2d::<f32>::new(
        Cpu,
        2,
        BatchNormOptions {
            momentum: Some(f64::NAN),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(matches!(
        nan.forward_into(&x, &s, &mut y),
        Err(BnError::NonFinite {
            name: "momentum",
            ..
        })
    ));
    assert_eq!(nan.num_batches_tracked(), 0);
    nan.eval();
    assert!(
        nan.forward_into(&x, &s, &mut y).is_ok(),
        "eval does not use momentum"
    );
}

#[test]
fn backward_errors() {
    let s = shape(&[3, 2, 2, 2]);
    let x = data(s.numel());
    let mut m = BatchNorm2d::<f32>::new(Cpu, 2, BatchNormOptions::default()).unwrap();
    let e = m.backward(&x, &x, &s).err().unwrap();
    assert_eq!(
        e.to_string(),
        "backward needs a forward on this module first"
    );
    m.forward(&x, &s).unwrap();
    let other = shape(&[2, 2, 3, 2]);
    let e = m.backward(&x, &x, &other).err().unwrap();
    assert_eq!(e.to_string(), "backward got input size [2, 2, 3, 2] but the last forward in this mode had size [3, 2, 2, 2]");
    let mut dx = vec![0.0f32; 5];
    assert!(matches!(
        m.backward_into(&x, &x, &s, &mut dx, None, None),
        Err(BnError::BufferTooShort { .. })
    ));
}

#[test]
fn state_dict_errors_speak_pytorch_and_load_nothing() {
    let mut m = BatchNorm2d::<f32>::new(Cpu, 4, BatchNormOptions::default()).unwrap();
    let before = m.state_dict().unwrap();
    let sd = StateDict {
        weight: Some(vec![1.0f32; 3]),
        bias: None,
        running_mean: Some(vec![0.5; 4]),
        running_var: Some(vec![2.0; 4]),
        num_batches_tracked: Some(9),
    };
    let e = m.load_state_dict(&sd).unwrap_err().to_string();
    assert_eq!(
        e,
        "Error(s) in loading state_dict for BatchNorm2d:\n\tMissing key(s) in state_dict: \"bias\". \n\tsize mismatch \
         for weight: copying a param with shape [3] from checkpoint, the shape in current model is [4]."
    );
    assert_eq!(m.state_dict().unwrap(), before);
    let mut plain = BatchNorm2d::<f32>::new(
        Cpu,
        4,
        BatchNormOptions {
            affine: false,
            ..Default::default()
        },
    )
    .unwrap();
    let e = plain.load_state_dict(&before).unwrap_err().to_string();
    assert!(
        e.contains("Unexpected key(s) in state_dict: \"weight\", \"bias\". "),
        "{e}"
    );
}

#[test]
fn open_device_never_panics() {
    // On a machine without a driver this is NoDriver, without a device NoDevice; with a
    // GPU it opens device 0. A far-off ordinal is always an error.
    match cuda_batchnorm::open_device(0) {
        Ok(_) => assert!(matches!(
            cuda_batchnorm::open_device(4096),
            Err(BnError::NoDevice(_))
        )),
        Err(e) => assert!(matches!(e, BnError::NoDriver | BnError::NoDevice(_)), "{e}"),
    }
}

//! Module semantics over several steps in every mode of PyTorch's (training,
//! track_running_stats) table, on the CPU backend (the module code is the same for
//! every backend): which statistics normalise, which buffers move, how the counter
//! advances, momentum None, empty batches.

mod common;

use common::Rng;
use cuda_batchnorm::cpu::{reference, BatchNorm1d, BatchNorm2d};
use cuda_batchnorm::{BatchNormOptions, Cpu, MemoryFormat, Shape, StateDict};

fn batch(rng: &mut Rng, shape: &Shape, offset: f64) -> Vec<f64> {
    (0..shape.numel())
        .map(|_| offset + 2.0 * rng.normal())
        .collect()
}

fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| (x - y).abs() <= tol * (1.0 + y.abs()))
}

/// Runs `steps` forwards in the given mode and checks outputs, buffers and the counter
/// against a hand-written model of PyTorch's rules.
fn run_mode(training: bool, track: bool, momentum: Option<f64>) {
    let shape = Shape::nchw(4, 3, 2, 3).unwrap();
    let opts = BatchNormOptions {
        momentum,
        track_running_stats: track,
        ..Default::default()
    };
    let mut m = BatchNorm2d::<f64>::new(Cpu, 3, opts).unwrap();
    if !training {
        m.eval();
    }
    let mut rng = Rng::new(7);
    let (mut rm, mut rv) = (vec![0.0; 3], vec![1.0; 3]);
    let mut counter = 0i64;
    for step in 1..=4 {
        let x = batch(&mut rng, &shape, step as f64);
        let y = m.forward(&x, &shape).unwrap();
        let (mean, var) = reference::batch_stats(&x, &shape).unwrap();
        let use_batch = training || !track;
        let expect = if use_batch {
            reference::normalize(
                &x,
                &shape,
                &mean,
                &reference::invstd(&var, 1e-5),
                None,
                None,
            )
            .unwrap()
        } else {
            reference::normalize(&x, &shape, &rm, &reference::invstd(&rv, 1e-5), None, None)
                .unwrap()
        };
        assert!(
            close(&y, &expect, 1e-12),
            "mode ({training}, {track}) step {step}: output"
        );
        if training && track {
            counter += 1;
            let f = momentum.unwrap_or(1.0 / counter as f64);
            let count = shape.per_channel() as f64;
            for c in 0..3 {
                rm[c] = f * mean[c] + (1.0 - f) * rm[c];
                rv[c] = f * var[c] * count / (count - 1.0) + (1.0 - f) * rv[c];
            }
        }
        let sd = m.state_dict().unwrap();
        assert_eq!(
            sd.num_batches_tracked,
            track.then_some(counter),
            "counter at step {step}"
        );
        if track {
            assert!(
                close(sd.running_mean.as_ref().unwrap(), &rm, 1e-12),
                "running_mean at step {step}"
            );
            assert!(
                close(sd.running_var.as_ref().unwrap(), &rv, 1e-12),
                "running_var at step {step}"
            );
        } else {
            assert!(sd.running_mean.is_none() && sd.running_var.is_none());
        }
    }
}

#[test]
fn train_with_running_stats() {
    run_mode(true, true, Some(0.1));
}

#[test]
fn eval_with_running_stats() {
    run_mode(false, true, Some(0.1));
}

#[test]
fn train_without_running_stats() {
    run_mode(true, false, Some(0.1));
}

#[test]
fn eval_without_running_stats_uses_batch_stats() {
    run_mode(false, false, Some(0.1));
}

#[test]
fn momentum_none_is_the_cumulative_average() {
    run_mode(true, true, None);
    // after k steps from the default buffers, running_mean is exactly the mean of means
    let shape = Shape::nc(6, 2).unwrap();
    let opts = BatchNormOptions {
        momentum: None,
        ..Default::default()
    };
    let mut m = BatchNorm1d::<f64>::new(Cpu, 2, opts).unwrap();
    let mut rng = Rng::new(3);
    let mut means = [0.0; 2];
    for k in 1..=5 {
        let x = batch(&mut rng, &shape, k as f64 * 3.0);
        m.forward(&x, &shape).unwrap();
        let (mean, _) = reference::batch_stats(&x, &shape).unwrap();
        for c in 0..2 {
            means[c] += mean[c];
        }
    }
    let rm = m.state_dict().unwrap().running_mean.unwrap();
    for c in 0..2 {
        assert!((rm[c] - means[c] / 5.0).abs() < 1e-12);
    }
}

#[test]
fn defaults_are_pytorchs() {
    let m = BatchNorm2d::<f32>::new(Cpu, 3, BatchNormOptions::default()).unwrap();
    let o = m.options();
    assert_eq!(
        (o.eps, o.momentum, o.affine, o.track_running_stats),
        (1e-5, Some(0.1), true, true)
    );
    assert!(m.is_training());
    let sd = m.state_dict().unwrap();
    assert_eq!(
        sd,
        StateDict {
            weight: Some(vec![1.0; 3]),
            bias: Some(vec![0.0; 3]),
            running_mean: Some(vec![0.0; 3]),
            running_var: Some(vec![1.0; 3]),
            num_batches_tracked: Some(0),
        }
    );
    assert_eq!(m.name(), "BatchNorm2d");
}

#[test]
fn empty_batches() {
    let shape = Shape::nchw(0, 3, 4, 4).unwrap();
    let mut m = BatchNorm2d::<f32>::new(Cpu, 3, BatchNormOptions::default()).unwrap();
    let before = m.state_dict().unwrap();
    let y = m.forward(&[], &shape).unwrap();
    assert!(y.is_empty());
    let after = m.state_dict().unwrap();
    assert_eq!(
        after.num_batches_tracked,
        Some(1),
        "the counter still advances in training"
    );
    assert_eq!(
        (&after.running_mean, &after.running_var),
        (&before.running_mean, &before.running_var)
    );
    let g = m.backward(&[], &[], &shape).unwrap();
    assert!(g.input.is_empty());
    assert_eq!(g.weight.unwrap(), vec![0.0; 3]);
    assert_eq!(g.bias.unwrap(), vec![0.0; 3]);
    m.eval();
    assert!(m.forward(&[], &shape).unwrap().is_empty());
    assert_eq!(m.num_batches_tracked(), 1);
}

#[test]
fn one_sample_with_two_values_trains() {
    let shape = Shape::new(&[1, 4, 2], MemoryFormat::Contiguous).unwrap();
    let mut m = BatchNorm1d::<f32>::new(Cpu, 4, BatchNormOptions::default()).unwrap();
    let y = m
        .forward(&[1.0, 3.0, 0.0, 2.0, 5.0, 5.0, -1.0, 1.0], &shape)
        .unwrap();
    let expect = 1.0 / (1.0f64 + 1e-5).sqrt();
    assert!((f64::from(y[0]) + expect).abs() < 1e-6 && (f64::from(y[1]) - expect).abs() < 1e-6);
    assert_eq!(y[4], 0.0, "a constant channel normalises to the bias");
}

#[test]
fn eval_after_training_uses_the_updated_statistics_and_backward_follows_the_mode() {
    let shape = Shape::nchw(8, 2, 3, 3).unwrap();
    let mut m = BatchNorm2d::<f64>::new(Cpu, 2, BatchNormOptions::default()).unwrap();
    let mut rng = Rng::new(11);
    for _ in 0..3 {
        let x = batch(&mut rng, &shape, 4.0);
        m.forward(&x, &shape).unwrap();
    }
    m.eval();
    let x = batch(&mut rng, &shape, 4.0);
    let dy = batch(&mut rng, &shape, 0.0);
    let y = m.forward(&x, &shape).unwrap();
    let sd = m.state_dict().unwrap();
    let (rm, rv) = (sd.running_mean.unwrap(), sd.running_var.unwrap());
    let inv = reference::invstd(&rv, 1e-5);
    assert!(close(
        &y,
        &reference::normalize(&x, &shape, &rm, &inv, None, None).unwrap(),
        1e-12
    ));
    // eval backward: dx = dy * invstd * w, grads through the running statistics
    let g = m.backward(&dy, &x, &shape).unwrap();
    let r = reference::backward(&dy, &x, &shape, &rm, &inv, Some(&[1.0, 1.0]), false).unwrap();
    assert!(close(&g.input, &r.input, 1e-12));
    assert!(close(g.weight.as_ref().unwrap(), &r.weight, 1e-12));
    // back in training, the backward differentiates through the batch statistics
    m.train();
    m.forward(&x, &shape).unwrap();
    let g = m.backward(&dy, &x, &shape).unwrap();
    let (mean, var) = reference::batch_stats(&x, &shape).unwrap();
    let r = reference::backward(
        &dy,
        &x,
        &shape,
        &mean,
        &reference::invstd(&var, 1e-5),
        Some(&[1.0, 1.0]),
        true,
    )
    .unwrap();
    assert!(close(&g.input, &r.input, 1e-10));
}

#[test]
fn saved_stats_are_the_last_batch_statistics_forwards() {
    let shape = Shape::nchw(5, 3, 2, 2).unwrap();
    let mut m = BatchNorm2d::<f64>::new(Cpu, 3, BatchNormOptions::default()).unwrap();
    assert!(m.saved_mean().is_none() && m.saved_invstd().is_none());
    let mut rng = Rng::new(3);
    let x = batch(&mut rng, &shape, 2.0);
    m.forward(&x, &shape).unwrap();
    let (mean, var) = reference::batch_stats(&x, &shape).unwrap();
    let (sm, si) = (m.saved_mean().unwrap(), m.saved_invstd().unwrap());
    assert!(close(sm, &mean, 1e-12), "{sm:?} {mean:?}");
    assert!(close(si, &reference::invstd(&var, 1e-5), 1e-12));
    // A forward with the running statistics saves none.
    m.eval();
    m.forward(&x, &shape).unwrap();
    assert!(m.saved_mean().is_none() && m.saved_invstd().is_none());
    // Without running statistics, eval uses (and saves) the batch's.
    let opts = BatchNormOptions {
        track_running_stats: false,
        ..Default::default()
    };
    let mut m = BatchNorm2d::<f64>::new(Cpu, 3, opts).unwrap();
    m.eval();
    m.forward(&x, &shape).unwrap();
    assert!(close(m.saved_mean().unwrap(), &mean, 1e-12));
}

#[test]
fn state_dict_round_trips_and_missing_counter_keeps_the_count() {
    let shape = Shape::nc(5, 3).unwrap();
    let mut a = BatchNorm1d::<f32>::new(Cpu, 3, BatchNormOptions::default()).unwrap();
    let x: Vec<f32> = (0..15).map(|i| i as f32 * 0.7 - 3.0).collect();
    a.forward(&x, &shape).unwrap();
    a.forward(&x, &shape).unwrap();
    let sd = a.state_dict().unwrap();
    let mut b = BatchNorm1d::<f32>::new(Cpu, 3, BatchNormOptions::default()).unwrap();
    b.load_state_dict(&sd).unwrap();
    assert_eq!(b.state_dict().unwrap(), sd);
    let mut no_counter = sd.clone();
    no_counter.num_batches_tracked = None;
    let mut c = BatchNorm1d::<f32>::new(Cpu, 3, BatchNormOptions::default()).unwrap();
    c.forward(&x, &shape).unwrap();
    c.load_state_dict(&no_counter).unwrap();
    assert_eq!(c.num_batches_tracked(), 1);
}

/// A state dict may carry any i64 as the counter; counting past i64::MAX wraps, as
/// PyTorch's int64 tensor does, instead of overflowing.
#[test]
fn counter_at_i64_max_wraps() {
    let shape = Shape::nc(5, 3).unwrap();
    let x: Vec<f32> = (0..15).map(|i| i as f32 * 0.7 - 3.0).collect();
    for momentum in [Some(0.1), None] {
        let opts = BatchNormOptions {
            momentum,
            ..Default::default()
        };
        let mut m = BatchNorm1d::<f32>::new(Cpu, 3, opts).unwrap();
        let mut sd = m.state_dict().unwrap();
        sd.num_batches_tracked = Some(i64::MAX);
        m.load_state_dict(&sd).unwrap();
        m.forward(&x, &shape).unwrap();
        assert_eq!(m.num_batches_tracked(), i64::MIN, "momentum {momentum:?}");
    }
}

/// `Backend::copy_from_host` refuses values of another length and leaves the buffer.
#[test]
fn copy_from_host_checks_the_length() {
    use cuda_batchnorm::{Backend, BnError};
    let mut b = Cpu.alloc(4, 1.5f32).unwrap();
    let e = Cpu.copy_from_host(&mut b, &[0.0; 3]).unwrap_err();
    assert!(
        matches!(
            e,
            BnError::CopyLength {
                buffer: 4,
                values: 3
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "cannot copy 3 values into a buffer of 4 elements"
    );
    assert_eq!(b, vec![1.5; 4]);
    Cpu.copy_from_host(&mut b, &[2.0; 4]).unwrap();
    assert_eq!(b, vec![2.0; 4]);
}

/// PyTorch 2.15: BatchNorm2d(4) given a (0, 3, 2, 2) input runs, and its weight and bias
/// gradients have the parameters' 4 values (zeros).
#[test]
fn an_empty_input_of_another_channel_count() {
    let shape = Shape::nchw(0, 3, 2, 2).unwrap();
    let mut m = BatchNorm2d::<f32>::new(Cpu, 4, BatchNormOptions::default()).unwrap();
    assert!(m.forward(&[], &shape).unwrap().is_empty());
    let g = m.backward(&[], &[], &shape).unwrap();
    assert_eq!(g.weight.unwrap(), vec![0.0; 4]);
    assert_eq!(g.bias.unwrap(), vec![0.0; 4]);
}

/// What PyTorch 2.15's autograd does when a module's tensors change between a forward
/// and its backward (each case checked there): a change to the weight or a running
/// statistic (an optimiser step, load_state_dict) makes the backward fail with
/// autograd's sentence and the versions it saw; a change to the bias does not (the
/// backward does not read it); train() and eval() change nothing, the backward follows
/// the forward's mode.
#[test]
fn backward_after_an_inplace_change() {
    let shape = Shape::nchw(4, 3, 2, 2).unwrap();
    let mut rng = Rng::new(3);
    let x: Vec<f32> = (0..shape.numel()).map(|_| rng.normal() as f32).collect();
    let dy: Vec<f32> = (0..shape.numel()).map(|_| rng.normal() as f32).collect();
    let sentence = |v: u64, e: u64| {
        format!(
            "one of the variables needed for gradient computation has been modified by an \
             inplace operation: [torch.FloatTensor [3]] is at version {v}; expected version {e} instead."
        )
    };
    for training in [true, false] {
        let fresh = || {
            let mut m = BatchNorm2d::<f32>::new(Cpu, 3, BatchNormOptions::default()).unwrap();
            if !training {
                m.eval();
            }
            m
        };
        // the weight, through weight_mut (an optimiser's step)
        let mut m = fresh();
        m.forward(&x, &shape).unwrap();
        m.weight_mut().unwrap()[0] += 0.5;
        let e = m.backward(&dy, &x, &shape).err().unwrap();
        assert_eq!(e.to_string(), sentence(2, 1));
        // a new forward makes it differentiable again
        m.forward(&x, &shape).unwrap();
        m.backward(&dy, &x, &shape).unwrap();
        // load_state_dict copies into every parameter and buffer
        let sd = m.state_dict().unwrap();
        m.load_state_dict(&sd).unwrap();
        let e = m.backward(&dy, &x, &shape).err().unwrap();
        // (PyTorch reports the running mean, the first tensor it checks: 2, saw 1)
        assert_eq!(e.to_string(), sentence(2, 1), "training {training}");
        // with the weight changed four times, the running mean (changed once, by the
        // load) is still the one reported: PyTorch checks running_mean, running_var,
        // then weight
        let mut m = fresh();
        m.forward(&x, &shape).unwrap();
        for _ in 0..3 {
            m.weight_mut().unwrap()[0] += 1.0;
        }
        let mut sd = m.state_dict().unwrap();
        sd.running_var = Some(vec![2.0; 3]);
        m.load_state_dict(&sd).unwrap();
        let e = m.backward(&dy, &x, &shape).err().unwrap();
        assert_eq!(e.to_string(), sentence(2, 1));
        // the bias is not read by the backward
        let mut m = fresh();
        m.forward(&x, &shape).unwrap();
        let before = m.backward(&dy, &x, &shape).unwrap();
        m.bias_mut().unwrap()[1] = 7.0;
        assert_eq!(m.backward(&dy, &x, &shape).unwrap().input, before.input);
        // train() / eval() between them change nothing
        let mut m = fresh();
        m.forward(&x, &shape).unwrap();
        let before = m.backward(&dy, &x, &shape).unwrap();
        if training {
            m.eval();
        } else {
            m.train();
        }
        let after = m.backward(&dy, &x, &shape).unwrap();
        assert_eq!(
            (after.input, after.weight, after.bias),
            (before.input, before.weight, before.bias)
        );
    }
    // a module without affine parameters checks its running statistics only
    let opts = BatchNormOptions {
        affine: false,
        ..Default::default()
    };
    let mut m = BatchNorm2d::<f32>::new(Cpu, 3, opts).unwrap();
    m.forward(&x, &shape).unwrap();
    let sd = m.state_dict().unwrap();
    m.load_state_dict(&sd).unwrap();
    assert_eq!(
        m.backward(&dy, &x, &shape).err().unwrap().to_string(),
        sentence(2, 1)
    );
}

/// A state dict that does not fit changes nothing, versions included.
#[test]
fn a_refused_state_dict_changes_no_version() {
    let shape = Shape::nchw(4, 3, 2, 2).unwrap();
    let x: Vec<f32> = (0..shape.numel()).map(|i| i as f32 * 0.1).collect();
    let mut m = BatchNorm2d::<f32>::new(Cpu, 3, BatchNormOptions::default()).unwrap();
    m.forward(&x, &shape).unwrap();
    let mut sd = m.state_dict().unwrap();
    sd.running_var = Some(vec![1.0; 4]);
    assert!(m.load_state_dict(&sd).is_err());
    m.backward(&x, &x, &shape).unwrap();
}

/// NCCL missing (this test process never loads one; on a machine without libnccl on the
/// loader's path) is a typed error that says what to install, not cudarc's panic.
#[test]
fn nccl_without_libnccl_is_an_error() {
    match cuda_batchnorm::sync::Nccl::version() {
        Ok(v) => assert!(v > 0, "a libnccl was found: version {v}"),
        Err(e) => {
            assert!(
                matches!(e, cuda_batchnorm::BnError::Communication(_)),
                "{e:?}"
            );
            assert!(e.to_string().contains("libnccl was not found"), "{e}");
            assert!(cuda_batchnorm::sync::Nccl::unique_id().is_err());
        }
    }
}

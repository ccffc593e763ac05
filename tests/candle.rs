//! The candle adapter (feature `candle`) against candle-nn's own BatchNorm on the same
//! inputs, on candle's CPU device: the training forward, the running statistics it
//! leaves, the eval forward, and the gradients candle's autograd computes through each,
//! in both layouts; the layout helper. (`cargo test --features candle --test candle`;
//! .ci/run runs it. The CUDA path, feature `candle-cuda`, runs in tests/candle_cuda.rs.)

use candle_core::{DType, Device, ModuleT, Tensor, Var};
use cuda_batchnorm::interop::candle::{self as adapter, shape_of};
use cuda_batchnorm::MemoryFormat;

fn close(what: &str, a: &Tensor, b: &Tensor, tol: f64) {
    let a = a
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let b = b
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    assert_eq!(a.len(), b.len(), "{what}");
    let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    let err = (num / den.max(1e-300)).sqrt();
    assert!(err <= tol, "{what}: relative error {err:.3e} > {tol:.0e}");
}

/// A (N, C, H, W) input, contiguous or channels-last: the variable holding its data in
/// memory order, and the (N, C, H, W) view of it (a permuted view of NHWC data).
fn input_var(dims: [usize; 4], format: MemoryFormat, dtype: DType, dev: &Device) -> (Var, Tensor) {
    let n: usize = dims.iter().product();
    let data: Vec<f64> = (0..n)
        .map(|i| ((i * 7919 % 1009) as f64 / 1009.0 - 0.3) * (1.0 + (i % dims[1]) as f64))
        .collect();
    let stored = match format {
        MemoryFormat::Contiguous => dims.to_vec(),
        MemoryFormat::ChannelsLast => vec![dims[0], dims[2], dims[3], dims[1]],
    };
    let v = Var::from_tensor(
        &Tensor::from_vec(data, stored, dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
    )
    .unwrap();
    let x = match format {
        MemoryFormat::Contiguous => v.as_tensor().clone(),
        MemoryFormat::ChannelsLast => v.as_tensor().permute((0, 3, 1, 2)).unwrap(),
    };
    (v, x)
}

fn input(dims: [usize; 4], format: MemoryFormat, dtype: DType, dev: &Device) -> Tensor {
    input_var(dims, format, dtype, dev).1
}

#[test]
fn matches_candle_nn_in_training_and_eval() {
    let dev = Device::Cpu;
    for dtype in [DType::F32, DType::F64] {
        let tol = if dtype == DType::F32 { 1e-5 } else { 1e-10 };
        for format in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
            let c = 5;
            let mk = |v: Vec<f64>| {
                Tensor::from_vec(v, c, &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let rm = mk((0..c).map(|i| 0.1 * i as f64).collect());
            let rv = mk((0..c).map(|i| 1.0 + 0.2 * i as f64).collect());
            let w0 = mk((0..c).map(|i| 0.5 + 0.3 * i as f64).collect());
            let b0 = mk((0..c).map(|i| -0.2 * i as f64).collect());
            let (w1, b1) = (
                Var::from_tensor(&w0).unwrap(),
                Var::from_tensor(&b0).unwrap(),
            );
            let (w2, b2) = (
                Var::from_tensor(&w0).unwrap(),
                Var::from_tensor(&b0).unwrap(),
            );
            let theirs = candle_nn::BatchNorm::new_with_momentum(
                c,
                rm.clone(),
                rv.clone(),
                w1.as_tensor().clone(),
                b1.as_tensor().clone(),
                1e-5,
                0.1,
            )
            .unwrap();
            let ours = adapter::BatchNorm::new_with_momentum(
                c,
                rm.clone(),
                rv.clone(),
                w2.as_tensor().clone(),
                b2.as_tensor().clone(),
                1e-5,
                0.1,
            )
            .unwrap();
            for (step, train) in [(0, true), (1, true), (2, false)] {
                let (xv, x) = input_var([3, c, 4, 6], format, dtype, &dev);
                let dy = input([3, c, 4, 6], MemoryFormat::Contiguous, dtype, &dev)
                    .sin()
                    .unwrap();
                let label = format!("{dtype:?} {} step {step} train {train}", format.name());
                let y1 = theirs.forward_t(&x, train).unwrap();
                let y2 = ours.forward_t(&x, train).unwrap();
                close(&format!("{label}: y"), &y2, &y1, tol);
                if format == MemoryFormat::ChannelsLast {
                    let (_, l) = y2.storage_and_layout();
                    assert_eq!(
                        shape_of(l).unwrap().format(),
                        MemoryFormat::ChannelsLast,
                        "{label}"
                    );
                }
                close(
                    &format!("{label}: running_mean"),
                    ours.running_mean(),
                    theirs.running_mean(),
                    tol,
                );
                close(
                    &format!("{label}: running_var"),
                    ours.running_var(),
                    theirs.running_var(),
                    tol,
                );
                let g1 = (&y1 * &dy).unwrap().sum_all().unwrap().backward().unwrap();
                let g2 = (&y2 * &dy).unwrap().sum_all().unwrap().backward().unwrap();
                for (name, a, b) in [
                    ("dx", g2.get(xv.as_tensor()), g1.get(xv.as_tensor())),
                    ("dweight", g2.get(w2.as_tensor()), g1.get(w1.as_tensor())),
                    ("dbias", g2.get(b2.as_tensor()), g1.get(b1.as_tensor())),
                ] {
                    close(
                        &format!("{label}: {name}"),
                        a.unwrap(),
                        b.unwrap(),
                        10.0 * tol,
                    );
                }
            }
        }
    }
}

#[test]
fn without_affine_parameters_and_mixed_types() {
    let dev = Device::Cpu;
    let c = 3;
    let rm = Tensor::zeros(c, DType::F32, &dev).unwrap();
    let rv = Tensor::ones(c, DType::F32, &dev).unwrap();
    let theirs = candle_nn::BatchNorm::new_no_bias(c, rm.clone(), rv.clone(), 1e-5).unwrap();
    let ours = adapter::BatchNorm::new_no_bias(c, rm.clone(), rv.clone(), 1e-5).unwrap();
    let x = input([4, c, 3, 3], MemoryFormat::Contiguous, DType::F32, &dev);
    close(
        "no affine y",
        &ours.forward_t(&x, true).unwrap(),
        &theirs.forward_t(&x, true).unwrap(),
        1e-5,
    );
    // f16 input with f32 statistics: against our own f32 result, to f16's tolerance
    let mixed = adapter::BatchNorm::new_no_bias(c, rm.clone(), rv.clone(), 1e-5).unwrap();
    let y16 = mixed
        .forward_t(&x.to_dtype(DType::F16).unwrap(), true)
        .unwrap();
    assert_eq!(y16.dtype(), DType::F16);
    let plain = adapter::BatchNorm::new_no_bias(c, rm, rv, 1e-5).unwrap();
    close("f16 y", &y16, &plain.forward_t(&x, true).unwrap(), 2e-3);
}

#[test]
fn layouts_and_errors() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 3, 4, 5), DType::F32, &dev).unwrap();
    let (_, l) = x.storage_and_layout();
    assert_eq!(shape_of(l).unwrap().format(), MemoryFormat::Contiguous);
    let cl = Tensor::zeros((2, 4, 5, 3), DType::F32, &dev)
        .unwrap()
        .permute((0, 3, 1, 2))
        .unwrap();
    let (_, l) = cl.storage_and_layout();
    let s = shape_of(l).unwrap();
    assert_eq!(
        (s.dims(), s.format()),
        (&[2, 3, 4, 5][..], MemoryFormat::ChannelsLast)
    );
    // a narrowed batch keeps its layout, at an offset
    let part = x.narrow(0, 1, 1).unwrap();
    let (_, l) = part.storage_and_layout();
    assert!(l.start_offset() > 0);
    assert_eq!(shape_of(l).unwrap().dims(), &[1, 3, 4, 5]);
    // transposed spatial dims and broadcasts are refused, with a hint
    let t = x.transpose(2, 3).unwrap();
    let (_, l) = t.storage_and_layout();
    assert!(shape_of(l)
        .unwrap_err()
        .to_string()
        .contains("call .contiguous()"));
    let b = Tensor::zeros((1, 3, 1, 1), DType::F32, &dev)
        .unwrap()
        .broadcast_as((2, 3, 4, 5))
        .unwrap();
    let (_, l) = b.storage_and_layout();
    assert!(shape_of(l).is_err());
    // the module refuses a wrong channel count and such a layout, with typed errors
    let bn = adapter::BatchNorm::new_no_bias(
        4,
        Tensor::zeros(4, DType::F32, &dev).unwrap(),
        Tensor::ones(4, DType::F32, &dev).unwrap(),
        1e-5,
    )
    .unwrap();
    let e = bn.forward_t(&x, true).unwrap_err().to_string();
    assert!(
        e.contains("running_mean should contain 3 elements not 4"),
        "{e}"
    );
    assert!(adapter::BatchNorm::new_no_bias(
        4,
        Tensor::zeros(3, DType::F32, &dev).unwrap(),
        Tensor::ones(4, DType::F32, &dev).unwrap(),
        1e-5
    )
    .is_err());
}

#[test]
fn loads_like_candle_nn_batch_norm() {
    // the same VarBuilder calls as candle_nn::batch_norm: PyTorch's tensor names
    let dev = Device::Cpu;
    let map = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&map, DType::F32, &dev);
    let ours = adapter::batch_norm(6, 1e-5, vb.pp("bn1")).unwrap();
    let keys: Vec<String> = map.data().lock().unwrap().keys().cloned().collect();
    let mut keys = keys;
    keys.sort();
    assert_eq!(
        keys,
        [
            "bn1.bias",
            "bn1.running_mean",
            "bn1.running_var",
            "bn1.weight"
        ]
    );
    assert_eq!(ours.running_var().to_vec1::<f32>().unwrap(), vec![1.0; 6]);
}

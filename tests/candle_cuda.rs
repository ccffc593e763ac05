//! The candle adapter's CUDA path (feature `candle-cuda`): the crate's kernels on
//! candle's CUDA tensors, against candle-nn's BatchNorm on the CPU with the same inputs
//! (training forward, running statistics, eval forward, and the backward through the
//! adapter's `backward`, which candle's autograd also calls). On a GPU it runs as is;
//! in CI it runs on the emulated CUDA driver, built by ci/candle-cuda/run (candle's own
//! kernels and cuBLAS do not run there, so nothing here uses them: tensors move by
//! copies, and the reference is computed on the CPU).

use candle_core::{DType, Device, ModuleT, Tensor, Var};
use cuda_batchnorm::interop::candle::{self as adapter, shape_of};
use cuda_batchnorm::MemoryFormat;

fn cuda() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            let required = std::env::var("CUDA_BATCHNORM_REQUIRE_GPU").is_ok_and(|v| v == "1");
            assert!(!required, "no CUDA device for candle: {e}");
            eprintln!("skipping: no CUDA device for candle ({e})");
            None
        }
    }
}

fn host(t: &Tensor) -> Vec<f64> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

fn close(what: &str, a: &[f64], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len(), "{what}");
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    let err = (num / den.max(1e-300)).sqrt();
    assert!(err <= tol, "{what}: relative error {err:.3e} > {tol:.0e}");
}

/// (N, C, H, W) data on `dev` in `format` (channels-last: a permuted view of NHWC).
fn input(dims: [usize; 4], format: MemoryFormat, dev: &Device, seed: usize) -> Tensor {
    let n: usize = dims.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|i| (((i + seed) * 7919 % 1009) as f32 / 1009.0 - 0.3) * (1.0 + (i % dims[1]) as f32))
        .collect();
    match format {
        MemoryFormat::Contiguous => Tensor::from_vec(data, dims.to_vec(), dev).unwrap(),
        MemoryFormat::ChannelsLast => {
            Tensor::from_vec(data, (dims[0], dims[2], dims[3], dims[1]), dev)
                .unwrap()
                .permute((0, 3, 1, 2))
                .unwrap()
        }
    }
}

#[test]
fn the_kernels_on_candle_cuda_tensors_match_candle_nn() {
    let Some(gpu) = cuda() else { return };
    let cpu = Device::Cpu;
    let c = 6;
    let vecs = |dev: &Device| {
        let mk = |v: Vec<f32>| Tensor::from_vec(v, c, dev).unwrap();
        (
            mk((0..c).map(|i| 0.1 * i as f32).collect()),
            mk((0..c).map(|i| 1.0 + 0.2 * i as f32).collect()),
            mk((0..c).map(|i| 0.5 + 0.3 * i as f32).collect()),
            mk((0..c).map(|i| -0.2 * i as f32).collect()),
        )
    };
    for format in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
        let (rm, rv, w, b) = vecs(&cpu);
        let (wv, bv) = (Var::from_tensor(&w).unwrap(), Var::from_tensor(&b).unwrap());
        let theirs = candle_nn::BatchNorm::new_with_momentum(
            c,
            rm,
            rv,
            wv.as_tensor().clone(),
            bv.as_tensor().clone(),
            1e-5,
            0.1,
        )
        .unwrap();
        let (rm, rv, w, b) = vecs(&gpu);
        let ours = adapter::BatchNorm::new_with_momentum(c, rm, rv, w, b, 1e-5, 0.1).unwrap();
        for (step, train) in [(0, true), (1, true), (2, false)] {
            let label = format!("{} step {step} train {train}", format.name());
            let xv = Var::from_tensor(&input([3, c, 5, 4], format, &cpu, step)).unwrap();
            let x = xv.as_tensor().clone();
            let x_gpu = input([3, c, 5, 4], format, &gpu, step);
            // the output's gradient in the output's layout (a layout change is a candle
            // kernel, which the emulated driver does not run)
            let dy = input([3, c, 5, 4], format, &cpu, 77 + step);
            let dy_gpu = input([3, c, 5, 4], format, &gpu, 77 + step);
            let y_ref = theirs.forward_t(&x, train).unwrap();
            let y = ours.forward_t(&x_gpu, train).unwrap();
            assert!(y.device().is_cuda(), "{label}");
            if format == MemoryFormat::ChannelsLast {
                let (_, l) = y.storage_and_layout();
                assert_eq!(shape_of(l).unwrap().format(), MemoryFormat::ChannelsLast);
            }
            // y keeps x's layout; compare values in logical order
            let y_logical = y.to_device(&cpu).unwrap().contiguous().unwrap();
            close(
                &format!("{label}: y"),
                &host(&y_logical),
                &host(&y_ref.contiguous().unwrap()),
                1e-5,
            );
            close(
                &format!("{label}: running_mean"),
                &host(ours.running_mean()),
                &host(theirs.running_mean()),
                1e-5,
            );
            close(
                &format!("{label}: running_var"),
                &host(ours.running_var()),
                &host(theirs.running_var()),
                1e-5,
            );
            let grads = (&y_ref * &dy)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let (dx, dw, db) = ours.backward(&x_gpu, &dy_gpu).unwrap();
            let dx = dx.to_device(&cpu).unwrap().contiguous().unwrap();
            let dx_ref = grads.get(xv.as_tensor()).unwrap().contiguous().unwrap();
            close(&format!("{label}: dx"), &host(&dx), &host(&dx_ref), 1e-4);
            close(
                &format!("{label}: dweight"),
                &host(&dw.unwrap()),
                &host(grads.get(wv.as_tensor()).unwrap()),
                1e-4,
            );
            close(
                &format!("{label}: dbias"),
                &host(&db.unwrap()),
                &host(grads.get(bv.as_tensor()).unwrap()),
                1e-4,
            );
        }
    }
}

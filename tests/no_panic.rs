//! No public function panics, whatever it is given: a seeded sweep over sizes (zeros,
//! products that overflow, too many or too few dimensions), launch planning with odd
//! device figures and tuning, and the CPU functional layer and modules with wrong
//! lengths, odd eps and momentum, and shapes far larger than their buffers. Every call
//! runs under `catch_unwind`; a module call that fails must leave the module as it was,
//! and no call may try to allocate for a size it has not validated (the sweep would
//! abort on such an allocation rather than report it).

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};

use common::Rng;
use cuda_batchnorm::backend::{BackwardStats, Grads};
use cuda_batchnorm::cpu::{self, BatchNorm1d, BatchNorm2d, BatchNorm3d};
use cuda_batchnorm::launch::{
    plan_ilp_stage, plan_stage, Alignment, BnParams, DeviceInfo, KernelId, LaunchConfig, Stage,
    Tuning, Variant,
};
use cuda_batchnorm::raw::{plan_op, workspace_size, Launcher, Op, Region};
use cuda_batchnorm::{BatchNormOptions, Cpu, DType, MemoryFormat, Result, Shape, StateDict};

const CASES: u64 = 3000;

/// Sizes from the harmless to the absurd.
fn dim(r: &mut Rng) -> usize {
    const ODD: [usize; 8] = [
        1 << 20,
        1 << 31,
        (1 << 32) + 1,
        1 << 40,
        1 << 62,
        usize::MAX / 3,
        usize::MAX - 1,
        usize::MAX,
    ];
    match r.next_u64() % 10 {
        0 => 0,
        1 => ODD[(r.next_u64() % ODD.len() as u64) as usize],
        _ => 1 + (r.next_u64() % 5) as usize,
    }
}

fn dims(r: &mut Rng) -> Vec<usize> {
    let rank = match r.next_u64() % 12 {
        0 => (r.next_u64() % 2) as usize,
        1 => 6 + (r.next_u64() % 5) as usize,
        _ => 2 + (r.next_u64() % 4) as usize,
    };
    (0..rank).map(|_| dim(r)).collect()
}

fn format(r: &mut Rng) -> MemoryFormat {
    if r.next_u64().is_multiple_of(2) {
        MemoryFormat::Contiguous
    } else {
        MemoryFormat::ChannelsLast
    }
}

fn odd_f64(r: &mut Rng) -> f64 {
    const V: [f64; 9] = [
        0.0,
        -0.0,
        -1.0,
        1e-5,
        0.1,
        1.0,
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
    ];
    V[(r.next_u64() % V.len() as u64) as usize]
}

/// A length near `want` (or `want` itself), capped so that the sweep stays small.
fn len_near(r: &mut Rng, want: usize) -> usize {
    let base = want.min(64);
    match r.next_u64() % 4 {
        0 => base.saturating_sub(1),
        1 => base + 1,
        _ => base,
    }
}

/// Values for a buffer that should hold `want` elements (see [`len_near`]).
fn data(r: &mut Rng, want: usize) -> Vec<f32> {
    let len = len_near(r, want);
    (0..len).map(|_| r.normal() as f32).collect()
}

/// An optional buffer: absent one time in three.
fn maybe(r: &mut Rng, want: usize) -> Option<Vec<f32>> {
    (!r.next_u64().is_multiple_of(3)).then(|| data(r, want))
}

/// Runs `f`, turning a panic into a failure that names the case.
fn no_panic<R>(what: &str, case: u64, f: impl FnOnce() -> R) -> R {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(e) => {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("case {case}: {what} panicked: {msg}");
        }
    }
}

#[test]
fn shapes_and_planning_never_panic() {
    let mut r = Rng::new(11);
    for case in 0..CASES {
        let d = dims(&mut r);
        let fmt = format(&mut r);
        let Ok(shape) = no_panic("Shape::new", case, || Shape::new(&d, fmt)) else {
            continue;
        };
        let (a, b, c) = (
            r.next_u64() as usize,
            r.next_u64() as usize,
            r.next_u64() as usize,
        );
        no_panic("Shape accessors", case, || {
            let _ = (
                shape.dims(),
                shape.rank(),
                shape.n(),
                shape.c(),
                shape.spatial(),
                shape.per_channel(),
                shape.numel(),
                shape.channel_innermost(),
                shape.offset(a, b, c),
                shape.with_format(MemoryFormat::ChannelsLast),
            );
        });
        let dev = DeviceInfo {
            sm_count: [0, 1, 132, u32::MAX][(r.next_u64() % 4) as usize],
            compute_capability: (9, 0),
            l2_bytes: 0,
        };
        let tuning = Tuning {
            blocks_per_sm: [0, 1, 4, u32::MAX][(r.next_u64() % 4) as usize],
            min_values_per_block: [0, 1, 8192, usize::MAX][(r.next_u64() % 4) as usize],
            force_index64: r.next_u64().is_multiple_of(2),
            force_scalar: r.next_u64().is_multiple_of(2),
            variant: [
                None,
                Some(Variant::Baseline),
                Some(Variant::Ilp),
                Some(Variant::Flat),
            ][(r.next_u64() % 4) as usize],
            table: None,
        };
        let launcher = Planner {
            device: dev,
            resident: [0, 1, 4, u32::MAX][(r.next_u64() % 4) as usize],
        };
        let align = if r.next_u64().is_multiple_of(2) {
            Alignment::ALIGNED
        } else {
            Alignment::of(&[r.next_u64(), r.next_u64()])
        };
        for dt in [DType::F32, DType::F64, DType::F16, DType::BF16] {
            for stage in Stage::EVERY {
                let _ = no_panic("plan_stage", case, || {
                    plan_stage(stage, &shape, dt, align, &dev, &tuning)
                });
                for v in Variant::ALL {
                    let _ = no_panic("plan_ilp_stage", case, || {
                        plan_ilp_stage(
                            v,
                            stage,
                            &shape,
                            dt,
                            align,
                            &dev,
                            &tuning,
                            launcher.resident,
                        )
                    });
                }
            }
            for op in [
                Op::Forward { batch_stats: true },
                Op::Forward { batch_stats: false },
                Op::Backward {
                    batch: true,
                    reduce: true,
                },
                Op::Backward {
                    batch: false,
                    reduce: false,
                },
            ] {
                let _ = no_panic("plan_op", case, || {
                    plan_op(op, &shape, (dt, dt), align, &launcher, &tuning)
                });
            }
            let _ = no_panic("workspace_size", case, || {
                workspace_size(&launcher, &shape, dt, &tuning)
            });
        }
    }
}

/// Plans only: a device and an occupancy answer, no kernels.
struct Planner {
    device: DeviceInfo,
    resident: u32,
}

impl Launcher for Planner {
    fn device(&self) -> &DeviceInfo {
        &self.device
    }
    fn resident_blocks(&self, _: &KernelId, _: u32, _: u32) -> Result<u32> {
        Ok(self.resident)
    }
    fn launch(&self, _: KernelId, _: &LaunchConfig, _: &BnParams, _: &[Region]) -> Result<()> {
        Ok(())
    }
}

#[test]
fn cpu_functional_calls_never_panic() {
    let mut r = Rng::new(12);
    let mut ok = [0usize; 2];
    for case in 0..CASES {
        let d = dims(&mut r);
        let Ok(shape) = Shape::new(&d, format(&mut r)) else {
            continue;
        };
        let c = shape.c();
        let x = data(&mut r, shape.numel());
        let mut y = data(&mut r, shape.numel());
        let (w, b) = (maybe(&mut r, c), maybe(&mut r, c));
        let (mut rm, mut rv) = (maybe(&mut r, c), maybe(&mut r, c));
        let mut sm = data(&mut r, c);
        let mut si = data(&mut r, c);
        let training = r.next_u64().is_multiple_of(2);
        let (momentum, eps) = (odd_f64(&mut r), odd_f64(&mut r));
        let with_save = r.next_u64().is_multiple_of(2);
        let fwd = no_panic("cpu::batch_norm", case, || {
            let args = cpu::Forward::<f32, f32> {
                input: &x,
                shape,
                running_mean: rm.as_deref_mut(),
                running_var: rv.as_deref_mut(),
                weight: w.as_deref(),
                bias: b.as_deref(),
                training,
                momentum,
                eps,
            };
            let save = with_save.then_some(cpu::SaveStats {
                mean: &mut sm,
                invstd: &mut si,
            });
            cpu::batch_norm(args, &mut y, save)
        });
        ok[0] += usize::from(fwd.is_ok());

        let dy = data(&mut r, shape.numel());
        let mut dx = data(&mut r, shape.numel());
        let mut gw = maybe(&mut r, c);
        let mut gb = maybe(&mut r, c);
        let batch = r.next_u64().is_multiple_of(2);
        let bwd = no_panic("cpu::batch_norm_backward", case, || {
            let stats = if batch {
                BackwardStats::Batch {
                    save_mean: &sm[..],
                    save_invstd: &si[..],
                }
            } else {
                BackwardStats::Running {
                    mean: rm.as_deref().unwrap_or(&[]),
                    var: rv.as_deref().unwrap_or(&[]),
                    eps,
                }
            };
            let args = cpu::Backward::<f32, f32> {
                grad_output: &dy,
                input: &x,
                shape,
                weight: w.as_deref(),
                stats,
            };
            let grads = Grads {
                input: &mut dx[..],
                weight: gw.as_deref_mut(),
                bias: gb.as_deref_mut(),
            };
            cpu::batch_norm_backward(args, grads)
        });
        ok[1] += usize::from(bwd.is_ok());
    }
    // The sweep must reach the computing paths too, not only the early errors.
    assert!(
        ok.iter().all(|&k| k >= 20),
        "successful forward, backward calls: {ok:?}"
    );
}

type Module<const D: usize> = cuda_batchnorm::module::BatchNorm<D, Cpu, f32>;

/// What a failed call must not change.
fn snapshot<const D: usize>(m: &Module<D>) -> String {
    format!(
        "{:?} {} {}",
        m.state_dict().ok(),
        m.num_batches_tracked(),
        m.is_training()
    )
}

/// Counts successful module forwards, backwards and loads.
fn module_case<const D: usize>(r: &mut Rng, case: u64, ok: &mut [usize; 3]) {
    let features = [0, 1, 3, 5, 1 << 40, usize::MAX][(r.next_u64() % 6) as usize];
    let options = BatchNormOptions {
        eps: odd_f64(r),
        momentum: (!r.next_u64().is_multiple_of(4)).then(|| odd_f64(r)),
        affine: r.next_u64().is_multiple_of(2),
        track_running_stats: r.next_u64().is_multiple_of(2),
    };
    let Ok(mut m) = no_panic("BatchNorm::new", case, || {
        Module::<D>::new(Cpu, features, options)
    }) else {
        return;
    };
    for step in 0..3 {
        if r.next_u64().is_multiple_of(3) {
            m.eval();
        } else {
            m.train();
        }
        let d = dims(r);
        let Ok(shape) = Shape::new(&d, format(r)) else {
            continue;
        };
        if shape.numel() == 0 && shape.c() > 1 << 16 {
            // An empty batch of that many channels rightly allocates per-channel
            // statistics of that size: a resource request, not a bad input.
            continue;
        }
        let x = data(r, shape.numel());
        let dy = data(r, shape.numel());
        let sd = StateDict {
            weight: maybe(r, features),
            bias: maybe(r, features),
            running_mean: maybe(r, features),
            running_var: maybe(r, features),
            num_batches_tracked: r
                .next_u64()
                .is_multiple_of(2)
                .then_some(r.next_u64() as i64),
        };
        // Runs one module call, counts its success, and checks that a failure left the
        // module as it was.
        let mut call = |k: usize, what: &str, f: &mut dyn FnMut(&mut Module<D>) -> bool| {
            let before = snapshot(&m);
            let done = no_panic(what, case, || f(&mut m));
            ok[k] += usize::from(done);
            if !done {
                let after = snapshot(&m);
                assert_eq!(
                    after, before,
                    "case {case} step {step}: failed {what} changed the module"
                );
            }
        };
        call(0, "BatchNorm::forward", &mut |m| {
            m.forward(&x, &shape).is_ok()
        });
        call(1, "BatchNorm::backward", &mut |m| {
            m.backward(&dy, &x, &shape).is_ok()
        });
        call(2, "BatchNorm::load_state_dict", &mut |m| {
            m.load_state_dict(&sd).is_ok()
        });
    }
}

#[test]
fn cpu_modules_never_panic_and_failed_calls_change_nothing() {
    let mut r = Rng::new(13);
    let mut ok = [0usize; 3];
    for case in 0..CASES {
        match case % 3 {
            0 => module_case::<1>(&mut r, case, &mut ok),
            1 => module_case::<2>(&mut r, case, &mut ok),
            _ => module_case::<3>(&mut r, case, &mut ok),
        }
    }
    assert!(
        ok.iter().all(|&k| k >= 20),
        "successful forward, backward, load calls: {ok:?}"
    );
    // The aliases are the same types.
    let _: Option<BatchNorm1d<f32>> = None;
    let _: Option<BatchNorm2d<f32>> = None;
    let _: Option<BatchNorm3d<f32>> = None;
}

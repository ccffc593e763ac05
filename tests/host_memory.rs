//! Host memory that cannot be had is a typed error, not an abort: the CPU backend's
//! buffers (its f64 working copies, outputs, `to_host`) are allocated fallibly. The
//! test re-runs this binary as a child process under a low `ulimit -v`, where the
//! allocator really fails, and the child checks the error.

use std::process::Command;

use cuda_batchnorm::cpu::{self, BatchNorm1d, BatchNorm2d};
use cuda_batchnorm::{Backend, BatchNormOptions, BnError, Cpu, Shape};

/// Set in the child's environment.
const CHILD: &str = "CUDA_BATCHNORM_LOW_MEMORY_CHILD";
/// The child's address-space limit, KiB: enough for the test binary (about 100 MiB of
/// address space) and its 384 MiB input and output, not for a third such buffer nor
/// the f64 copies.
const LIMIT_KIB: u64 = 1000 * 1024;

#[test]
fn host_memory_exhaustion_is_a_typed_error() {
    if cfg!(not(unix)) {
        eprintln!("skipping host_memory_exhaustion_is_a_typed_error: needs a Unix shell's ulimit");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -v {LIMIT_KIB} && exec \"$0\" \"$@\""))
        .arg(&exe)
        .args([
            "--exact",
            "under_a_low_ulimit",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the child failed:\n{text}");
    assert!(
        text.contains("low-memory child: ok"),
        "the child did not run:\n{text}"
    );
}

/// The child's side (does nothing in a normal run).
#[test]
fn under_a_low_ulimit() {
    if std::env::var(CHILD).is_err() {
        return;
    }
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        if let Some(l) = status.lines().find(|l| l.starts_with("VmSize")) {
            println!("low-memory child starts at {l}");
        }
    }
    let shape = Shape::nc(1 << 22, 24).unwrap(); // 96 Mi f32 values, 384 MiB
    let x = vec![0.5f32; shape.numel()];
    let mut y = vec![0f32; shape.numel()];
    let e = cpu::batch_norm(
        cpu::Forward::<f32, f32> {
            input: &x,
            shape,
            running_mean: None,
            running_var: None,
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
    assert!(matches!(e, BnError::HostAlloc { .. }), "{e}");
    // A module's forward: same error, nothing changed.
    let mut m = BatchNorm1d::<f32>::new(Cpu, 24, BatchNormOptions::default()).unwrap();
    let before = m.state_dict().unwrap();
    let e = m.forward_into(&x, &shape, &mut y).unwrap_err();
    assert!(matches!(e, BnError::HostAlloc { .. }), "{e}");
    assert_eq!(m.state_dict().unwrap(), before);
    assert_eq!(m.num_batches_tracked(), 0);
    // A copy of a buffer larger than what is left, and a new buffer.
    let e = Cpu.to_host(&x).err();
    assert!(matches!(e, Some(BnError::HostAlloc { .. })), "{e:?}");
    let e = Cpu.alloc(1 << 27, 0.0f32).err();
    assert!(matches!(e, Some(BnError::HostAlloc { .. })), "{e:?}");
    drop(y);
    assert_eq!(Cpu.to_host(&x[..4].to_vec()).unwrap(), vec![0.5; 4]);
    println!("low-memory child: ok");
}

/// A module without per-channel state validates before it allocates its save buffers:
/// a (1, 2^40) input says what PyTorch says, not that 2^40 values cannot be had.
#[test]
fn validation_comes_before_allocation() {
    let opts = BatchNormOptions {
        affine: false,
        track_running_stats: false,
        ..Default::default()
    };
    let mut m = BatchNorm2d::<f32>::new(Cpu, 4, opts).unwrap();
    let shape = Shape::nchw(1, 1 << 40, 1, 1).unwrap();
    let e = m.forward_into(&[], &shape, &mut []).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Expected more than 1 value per channel when training, got input size [1, 1099511627776, 1, 1]"
    );
}

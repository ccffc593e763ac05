//! CPU emulator for the cuda-batchnorm CUDA kernels.
//!
//! The build script compiles every kernel in `kernels/*.cu` (and the emulator's own
//! self-test kernels) as host C++ with `BN_EMULATION` defined, against `bn_emu.h`, and
//! links them with a small runtime that executes each CUDA thread as a fiber. [`launch`]
//! runs one kernel launch to completion on the calling OS thread with CUDA semantics:
//! block barriers, warp shuffles and votes, atomics, shared memory, and a bounds,
//! alignment and permission check on every global-memory access. Any violation fails the
//! launch with an [`EmuError`] instead of corrupting memory or hanging.
//!
//! See `emu/README.md` for the supported CUDA subset, the scheduling model and what the
//! emulator cannot show.

use std::ffi::c_char;
use std::fmt;

/// How a kernel may use a launch buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RegionKind {
    /// Read-only for the kernel: any write fails the launch.
    Input,
    /// Written (and possibly read) by the kernel.
    Output,
    /// Read and written by the kernel.
    InOut,
    /// Kernel workspace: filled with 0xFF bytes before the launch, so that reading a
    /// value that no thread wrote shows up (NaN for floats).
    Scratch,
    /// Coordination counters: must be all zero when the launch starts and again when it
    /// ends, otherwise the launch fails with "counters not reset".
    Counters,
}

impl RegionKind {
    fn code(self) -> u32 {
        match self {
            RegionKind::Input => 0,
            RegionKind::Output => 1,
            RegionKind::InOut => 2,
            RegionKind::Scratch => 3,
            RegionKind::Counters => 4,
        }
    }
}

/// One launch buffer: `bytes` bytes of host memory at address `addr`, owned by the
/// caller. Kernels may touch global memory only inside the regions of their launch.
///
/// The caller must keep the memory alive, and not access it from elsewhere, for the
/// duration of [`launch`]; regions other than [`RegionKind::Input`] must be writable.
/// Zero-byte regions are ignored; regions must not overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region<'a> {
    /// Host address of the first byte (e.g. `vec.as_mut_ptr() as u64`).
    pub addr: u64,
    /// Length in bytes.
    pub bytes: u64,
    /// Name used in error messages (e.g. the BnParams field).
    pub name: &'a str,
    /// What the kernel may do with it.
    pub kind: RegionKind,
}

/// Launch configuration, as for `cudaLaunchKernel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Launch {
    /// Grid dimensions in blocks: x in 1..=2^31-1, y and z in 1..=65535.
    pub grid: [u32; 3],
    /// Block dimensions in threads: x, y <= 1024, z <= 64, at most 1024 threads.
    pub block: [u32; 3],
    /// Dynamic shared memory per block in bytes (static + dynamic within
    /// `shared_limit_bytes`).
    pub dynamic_shared_bytes: u32,
    /// Cooperative launch: every block resident at once; `bn_emu::grid_sync()` allowed.
    pub cooperative: bool,
    /// Static plus dynamic shared memory a block may use: 0 for CUDA's default 48 KiB,
    /// more where the launcher opted in (`cuFuncSetAttribute`), up to an H100's 227 KiB
    /// ([`SHARED_OPTIN_BYTES`]).
    pub shared_limit_bytes: u32,
}

/// The most shared memory per block a launch can opt into: an H100's 227 KiB.
pub const SHARED_OPTIN_BYTES: u32 = 227 * 1024;

/// Scheduling options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Options {
    /// Seeds the block admission order and each block's thread order. The same kernel,
    /// configuration, inputs and seed always give the same interleaving and results.
    pub seed: u64,
    /// Blocks resident (interleaved) at once in a non-cooperative launch; 0 counts as
    /// 1, and at most 65536 threads are kept resident.
    pub max_resident_blocks: u32,
    /// Global-access preemption: 0 (off), or n for a scheduling point before each
    /// global load and store with probability 1/n (seeded). Fibers otherwise switch only
    /// at barriers, collectives, atomics and fences, so a race between plain accesses
    /// with none of those between them could never show.
    pub preempt_one_in: u32,
}

impl Default for Options {
    /// `seed` from the environment variable `BN_EMU_SEED` (decimal, or hex with `0x`)
    /// if set and valid, else a fixed constant; four resident blocks; preemption from
    /// `BN_EMU_PREEMPT` (same syntax), off when unset.
    fn default() -> Self {
        Options {
            // SAFETY: no arguments. It calls getenv, which races only with a concurrent
            // setenv; no code in this workspace changes its own process's environment
            // (child processes get theirs through Command::env).
            seed: unsafe { bn_emu_seed_from_env() },
            max_resident_blocks: 4,
            // SAFETY: as above.
            preempt_one_in: unsafe { bn_emu_preempt_from_env() },
        }
    }
}

/// A failed launch: what went wrong, in which kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmuError {
    /// The kernel name passed to [`launch`].
    pub kernel: String,
    /// What happened: for violations inside the kernel, the block and thread indices
    /// and, for memory errors, the region name, byte offset, access size, region size
    /// and direction; for barrier errors, the source line and example threads.
    pub message: String,
}

impl fmt::Display for EmuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kernel, self.message)
    }
}

impl std::error::Error for EmuError {}

// C ABI (emu/src/ffi.h).

#[repr(C)]
struct FfiRegion {
    addr: u64,
    bytes: u64,
    name: *const c_char,
    name_len: usize,
    kind: u32,
    reserved: u32,
}

#[repr(C)]
struct FfiLaunch {
    kernel: *const c_char,
    kernel_len: usize,
    grid: [u32; 3],
    block: [u32; 3],
    dynamic_shared_bytes: u32,
    cooperative: u32,
    shared_limit_bytes: u32,
    reserved: u32,
    seed: u64,
    max_resident_blocks: u32,
    preempt_one_in: u32,
    params: *const u8,
    params_len: usize,
    regions: *const FfiRegion,
    nregions: usize,
}

extern "C" {
    fn bn_emu_launch(
        desc: *const FfiLaunch,
        message: *mut *const c_char,
        message_len: *mut usize,
    ) -> i32;
    fn bn_emu_kernel_count() -> usize;
    fn bn_emu_seed_from_env() -> u64;
    fn bn_emu_preempt_from_env() -> u32;
    #[cfg(test)]
    fn bn_emu_parse_seed(text: *const c_char, len: usize, out: *mut u64) -> i32;
    fn bn_emu_kernel_name(index: usize, len: *mut usize) -> *const c_char;
}

/// Runs one launch of the registered kernel `kernel` to completion on the calling OS
/// thread, with `params` (the bytes of the kernel's by-value argument, a `BnParams`) and
/// the launch buffers `regions`. Several OS threads may launch concurrently, as long as
/// their launches share no buffers.
///
/// Returns an error for an unknown kernel, an invalid configuration, a params size that
/// differs from the kernel's, overlapping regions, counters that are not zero at the
/// start or the end, and for the first violation inside the kernel (out-of-bounds,
/// misaligned or read-only-violating access, barrier or warp-collective misuse,
/// deadlock, shared memory overrun); the launch stops there, and the emulator is ready
/// for the next launch.
///
/// # Safety
///
/// The kernel reads and writes the regions through the given addresses, and the
/// emulator itself fills Scratch regions with 0xFF bytes and reads Counters regions. So
/// every region must describe memory the caller owns for the duration of the call:
/// valid for reads of `bytes` bytes, valid for writes too unless its kind is Input, and
/// not accessed through any other reference while the launch runs. Addresses in
/// `params` that lie outside every region are never dereferenced (such accesses fail
/// the launch).
pub unsafe fn launch(
    kernel: &str,
    cfg: &Launch,
    params: &[u8],
    regions: &[Region<'_>],
    opts: &Options,
) -> Result<(), EmuError> {
    let ffi_regions: Vec<FfiRegion> = regions
        .iter()
        .map(|r| FfiRegion {
            addr: r.addr,
            bytes: r.bytes,
            name: r.name.as_ptr().cast(),
            name_len: r.name.len(),
            kind: r.kind.code(),
            reserved: 0,
        })
        .collect();
    let desc = FfiLaunch {
        kernel: kernel.as_ptr().cast(),
        kernel_len: kernel.len(),
        grid: cfg.grid,
        block: cfg.block,
        dynamic_shared_bytes: cfg.dynamic_shared_bytes,
        cooperative: u32::from(cfg.cooperative),
        shared_limit_bytes: cfg.shared_limit_bytes,
        reserved: 0,
        seed: opts.seed,
        max_resident_blocks: opts.max_resident_blocks,
        preempt_one_in: opts.preempt_one_in,
        params: params.as_ptr(),
        params_len: params.len(),
        regions: ffi_regions.as_ptr(),
        nregions: ffi_regions.len(),
    };
    let mut msg: *const c_char = std::ptr::null();
    let mut msg_len = 0usize;
    // SAFETY: `desc` and everything it points to (kernel name, params, the region
    // array and region names) outlive the call, with the lengths given; the runtime
    // only reads them. The memory the regions describe is this function's contract with
    // its caller (see # Safety). The out-pointers are valid for writes.
    let rc = unsafe { bn_emu_launch(&desc, &mut msg, &mut msg_len) };
    if rc == 0 {
        return Ok(());
    }
    let message = if msg.is_null() || msg_len == 0 {
        String::from("launch failed")
    } else {
        // SAFETY: the runtime returned a pointer to `msg_len` initialised bytes in its
        // thread-local error buffer, which stays valid until the next launch on this OS
        // thread; we copy them out before returning.
        let bytes = unsafe { std::slice::from_raw_parts(msg.cast::<u8>(), msg_len) };
        String::from_utf8_lossy(bytes).into_owned()
    };
    Err(EmuError {
        kernel: kernel.to_owned(),
        message,
    })
}

/// Names of all registered kernels (project kernels and the emulator's self-test
/// kernels), sorted.
pub fn kernel_names() -> Vec<String> {
    // SAFETY: no arguments; reads the registry, which is complete after static
    // initialisation and never modified afterwards.
    let count = unsafe { bn_emu_kernel_count() };
    let mut names: Vec<String> = (0..count)
        .map(|i| {
            let mut len = 0usize;
            // SAFETY: `i < count`; the runtime writes the name's length to `len` and
            // returns a pointer to that many bytes of static storage.
            let p = unsafe { bn_emu_kernel_name(i, &mut len) };
            // SAFETY: as above, `p` points to `len` initialised bytes that live for
            // the whole program.
            let bytes = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len) };
            String::from_utf8_lossy(bytes).into_owned()
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The emulated CUDA driver (`emu/driver/libcuda.cpp`): a `libcuda.so` built with this
/// crate that exports the driver API calls cudarc makes and runs every kernel launch on
/// the emulator. Device memory is host memory, every call completes before it returns.
pub mod driver {
    use std::ffi::{c_char, c_int, c_void, CStr, CString};
    use std::sync::OnceLock;

    extern "C" {
        fn dlopen(filename: *const c_char, flags: c_int) -> *mut c_void;
        fn dlerror() -> *const c_char;
        fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
    }
    const RTLD_NOW: c_int = 2;
    const RTLD_NOLOAD: c_int = 4;
    const RTLD_GLOBAL: c_int = 0x100;

    /// A driver call that [`fail_call`] can make fail.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Call {
        /// `cuLaunchKernel`, failing with `CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES`.
        Launch = 0,
        /// `cuMemcpyHtoD(Async)`, failing with `CUDA_ERROR_INVALID_VALUE`.
        CopyHtoD = 1,
        /// `cuMemAlloc(Async)`, failing with `CUDA_ERROR_OUT_OF_MEMORY`.
        Alloc = 2,
    }

    /// Makes the calling thread's call of `call` after the next `skip` ones fail, as a
    /// real driver's can, before it does anything (fault injection for tests; each
    /// thread has its own). Fails where the emulated driver is not loaded.
    pub fn fail_call(call: Call, skip: u32) -> Result<(), String> {
        // SAFETY: RTLD_NOLOAD only looks up an already loaded library by its SONAME.
        let h = unsafe { dlopen(c"libcuda.so".as_ptr(), RTLD_NOW | RTLD_NOLOAD) };
        if h.is_null() {
            return Err("no libcuda.so is loaded".into());
        }
        // SAFETY: `h` is a live handle; the name is NUL-terminated.
        let f = unsafe { dlsym(h, c"bn_emu_driver_fail_call".as_ptr()) };
        if f.is_null() {
            return Err("the loaded libcuda.so is not the emulated driver".into());
        }
        // SAFETY: the emulated driver defines bn_emu_driver_fail_call(int, unsigned)
        // with C linkage (driver/libcuda.cpp).
        let f: extern "C" fn(c_int, u32) = unsafe { std::mem::transmute(f) };
        f(call as c_int, skip);
        Ok(())
    }

    /// The name the emulated driver gives its device (`cuDeviceGetName` in
    /// driver/libcuda.cpp): how a program tells it from a GPU, whether it was loaded by
    /// [`preload`] or found through `LD_LIBRARY_PATH`.
    pub const DEVICE_NAME: &str = "cuda-batchnorm emulated device (CPU)";

    /// Path of the library, or None where it is not built (only Linux builds it).
    pub fn library() -> Option<&'static str> {
        Some(env!("BN_EMU_DRIVER_LIBRARY")).filter(|p| !p.is_empty())
    }

    // The library is never unloaded: only whether loading worked is kept.
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();

    /// Loads the library into this process, once. Its SONAME is `libcuda.so`, the first
    /// name cudarc asks the dynamic loader for, and the loader answers a request for an
    /// already loaded SONAME with that library: so cudarc's driver calls made after this
    /// reach the emulator. Call it before anything in the process uses cudarc.
    pub fn preload() -> Result<(), String> {
        let loaded = LOADED.get_or_init(|| {
            let path = library().ok_or("the emulated driver is built on Linux only")?;
            // Loading it runs no code of ours but the C++ static initialisers of the
            // emulator, which only fill its kernel registry.
            load_global(path)
        });
        loaded.clone()
    }

    /// dlopens `path` with its symbols global (so that a later dlopen of its SONAME finds
    /// it), kept loaded; the loader's message on failure.
    pub(crate) fn load_global(path: &str) -> Result<(), String> {
        let c = CString::new(path).map_err(|_| format!("{path}: path has a NUL byte"))?;
        // SAFETY: `c` is a NUL-terminated path; the callers load only this crate's own
        // libraries, whose initialisers are known (see each caller).
        let h = unsafe { dlopen(c.as_ptr(), RTLD_NOW | RTLD_GLOBAL) };
        if h.is_null() {
            // SAFETY: dlerror returns NULL or a NUL-terminated message.
            let why = unsafe { dlerror() };
            let why = if why.is_null() {
                String::from("unknown error")
            } else {
                // SAFETY: non-NULL, NUL-terminated, valid until the next dl call.
                unsafe { CStr::from_ptr(why) }
                    .to_string_lossy()
                    .into_owned()
            };
            return Err(format!("cannot load {path}: {why}"));
        }
        Ok(())
    }
}

/// The emulated NCCL (driver/libnccl.cpp): ranks as threads on the emulated driver's
/// devices, so that SyncBatchNorm's NCCL path runs without GPUs.
pub mod nccl {
    use std::sync::OnceLock;

    /// Path of the library, or None where it is not built (only Linux builds it).
    pub fn library() -> Option<&'static str> {
        Some(env!("BN_EMU_NCCL_LIBRARY")).filter(|p| !p.is_empty())
    }

    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();

    /// Loads the library into this process, once, after the emulated driver (whose
    /// copies it calls). Its SONAME is `libnccl.so`, the name cudarc asks the dynamic
    /// loader for: cudarc's NCCL calls made after this reach it.
    pub fn preload() -> Result<(), String> {
        super::driver::preload()?;
        LOADED
            .get_or_init(|| {
                let path = library().ok_or("the emulated NCCL is built on Linux only")?;
                // Its initialisers only construct empty globals.
                super::driver::load_global(path)
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_seed(s: &str) -> Option<u64> {
        let mut v = 0u64;
        // SAFETY: the text is `s.len()` readable bytes; `v` is valid for writes.
        let ok = unsafe { bn_emu_parse_seed(s.as_ptr().cast(), s.len(), &mut v) };
        (ok == 1).then_some(v)
    }

    #[test]
    fn parse_seed_forms() {
        assert_eq!(parse_seed("42"), Some(42));
        assert_eq!(parse_seed("0x2a"), Some(42));
        assert_eq!(parse_seed("0X2A"), Some(42));
        assert_eq!(parse_seed("nope"), None);
        // the forms Rust's u64 parsing accepted when this lived in Rust
        assert_eq!(parse_seed(" 010 "), Some(10));
        assert_eq!(parse_seed("+7"), Some(7));
        assert_eq!(parse_seed("0x"), None);
        assert_eq!(parse_seed("18446744073709551616"), None);
        assert_eq!(parse_seed("0xffffffffffffffff"), Some(u64::MAX));
    }

    #[test]
    fn error_display() {
        let e = EmuError {
            kernel: "k".into(),
            message: "boom".into(),
        };
        assert_eq!(e.to_string(), "k: boom");
    }
}

//! The embedded PTX and its loading: one module per CUDA context, loaded on first use,
//! kernel functions looked up once each.
//!
//! Layers, from the bottom: the driver calls (`cudarc::driver::result`), the [`Kernels`]
//! of a context (module handles and function table, `Result`-returning), and
//! [`CudaLauncher`], the [`Launcher`] the safe functional layer runs through.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{result, sys, CudaContext, CudaStream};

use crate::dtype::KERNEL_PAIRS;
use crate::error::{describe, BnError, Result};
use crate::launch::{BnParams, DeviceInfo, KernelId, LaunchConfig, Tuning, TuningTable, Variant};
use crate::raw::{Launcher, Region};

/// One embedded PTX module.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PtxModule {
    /// The `.cu` file it came from (a family's [`Variant::module`]).
    pub name: &'static str,
    /// Lowest compute capability it targets, as 10 * major + minor.
    pub min_cc: u32,
    /// The PTX text.
    pub ptx: &'static str,
}

// Defines PTX_MODULES and PTX_UNAVAILABLE.
include!(concat!(env!("OUT_DIR"), "/ptx.rs"));

/// Why the GPU path cannot run at all, if it cannot: no PTX was built into the crate.
pub fn ptx_unavailable() -> Option<&'static str> {
    if PTX_MODULES.is_empty() {
        Some(PTX_UNAVAILABLE.unwrap_or("no PTX modules were embedded"))
    } else {
        None
    }
}

/// Whether the CUDA driver library can be loaded, found the way cudarc's dynamic
/// loading finds it (a subset of its candidate names) but without cudarc, so that the
/// answer does not depend on which linking mode a dependent unified into cudarc: under
/// dynamic or static linking the library is already loaded (the program could not have
/// started otherwise) and the probe finds it; under dynamic loading, cudarc would panic
/// on its first driver call without it. Once found it is remembered; an absent driver
/// is looked for again at the next call (a test may load an emulated one meanwhile).
pub fn driver_present() -> bool {
    static FOUND: OnceLock<()> = OnceLock::new();
    if FOUND.get().is_some() {
        return true;
    }
    let found = probe_driver_library();
    if found {
        let _ = FOUND.set(());
    }
    found
}

#[cfg(unix)]
fn probe_driver_library() -> bool {
    use std::ffi::{c_char, c_int};
    extern "C" {
        fn dlopen(filename: *const c_char, flags: c_int) -> *mut c_void;
    }
    const RTLD_LAZY: c_int = 1;
    // The names cudarc tries first (and the versioned name drivers install).
    [c"libcuda.so", c"libcuda.so.1"].iter().any(|name| {
        // SAFETY: dlopen with a NUL-terminated name only loads a library (running its
        // initialisers, as cudarc's own loading would); the handle is kept, as cudarc
        // keeps its own, so nothing is unloaded under a later user.
        !unsafe { dlopen(name.as_ptr(), RTLD_LAZY) }.is_null()
    })
}

#[cfg(windows)]
fn probe_driver_library() -> bool {
    extern "system" {
        fn LoadLibraryA(name: *const std::ffi::c_char) -> *mut c_void;
    }
    // SAFETY: LoadLibraryA with a NUL-terminated name only loads the library.
    !unsafe { LoadLibraryA(c"nvcuda.dll".as_ptr()) }.is_null()
}

#[cfg(not(any(unix, windows)))]
fn probe_driver_library() -> bool {
    false
}

/// Opens device `ordinal` and returns its primary context. Unlike
/// `CudaContext::new`, never panics: a machine without libcuda gives
/// [`BnError::NoDriver`], one without a device [`BnError::NoDevice`].
pub fn open_device(ordinal: usize) -> Result<Arc<CudaContext>> {
    if !driver_present() {
        return Err(BnError::NoDriver);
    }
    let count = CudaContext::device_count()
        .map_err(|e| BnError::NoDevice(format!("the driver found none ({})", describe(&e))))?;
    if count <= 0 {
        return Err(BnError::NoDevice("the driver reports 0 devices".into()));
    }
    if ordinal >= count as usize {
        return Err(BnError::NoDevice(format!(
            "device {ordinal} asked for, {count} present"
        )));
    }
    CudaContext::new(ordinal).map_err(|e| {
        BnError::NoDevice(format!(
            "device {ordinal} could not be opened ({})",
            describe(&e)
        ))
    })
}

/// The driver's CUDA version as `major.minor`.
pub fn driver_version() -> Option<String> {
    if !driver_present() {
        return None;
    }
    let mut v: std::ffi::c_int = 0;
    // SAFETY: cuDriverGetVersion writes one int through a valid pointer and needs no
    // initialised driver.
    let r = unsafe { sys::cuDriverGetVersion(&mut v) };
    (r == sys::CUresult::CUDA_SUCCESS).then(|| format!("{}.{}", v / 1000, (v % 1000) / 10))
}

/// The kernels of one CUDA context.
pub struct Kernels {
    ctx: Arc<CudaContext>,
    info: DeviceInfo,
    /// The device's compute capability as 10 * major + minor.
    cc: u32,
    /// Module handles by PTX module name (`kernels/<name>.cu`), loaded on first use (a
    /// module that fails to load is tried again at the next use).
    modules: Mutex<HashMap<&'static str, usize>>,
    functions: Mutex<HashMap<KernelId, usize>>,
    /// The driver's occupancy answers by (kernel, block threads, dynamic shared bytes):
    /// every call plans several families' stages, and the answer never changes.
    occupancy: Mutex<HashMap<(KernelId, u32, u32), u32>>,
    /// The dynamic shared memory each kernel asked about may use, its opt-in already set.
    shared_limits: Mutex<HashMap<KernelId, u32>>,
    /// What the functional layer plans with ([`crate::functional::set_tuning`]).
    tuning: Mutex<Tuning>,
}

// SAFETY: a CUmodule and the CUfunctions looked up in it are driver handles that may be
// used from any thread once the owning context is current there; every use below binds
// `ctx` first, and the maps holding them are behind mutexes.
unsafe impl Send for Kernels {}
// SAFETY: as above; shared use only reads the handles.
unsafe impl Sync for Kernels {}

// Every context's kernels, loaded once. They stay loaded for the life of the process,
// as the primary contexts they belong to do (an entry keeps its context alive), so
// `Kernels` never unloads its modules.
static LOADED: Mutex<Vec<Arc<Kernels>>> = Mutex::new(Vec::new());

/// The embedded module `name` for a device of compute capability `cc`: the newest PTX
/// target it runs (compute_90 on Hopper, compute_75 before).
pub(crate) fn module_for(name: &str, cc: u32) -> Option<&'static PtxModule> {
    PTX_MODULES
        .iter()
        .filter(|m| m.name == name && m.min_cc <= cc)
        .max_by_key(|m| m.min_cc)
}

impl Kernels {
    /// The kernels of `ctx`, reading its device's properties on first use (modules load
    /// when a kernel of theirs is first asked for).
    pub fn for_context(ctx: &Arc<CudaContext>) -> Result<Arc<Kernels>> {
        if let Some(reason) = ptx_unavailable() {
            return Err(BnError::PtxUnavailable(reason));
        }
        let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = loaded.iter().find(|k| k.ctx.cu_ctx() == ctx.cu_ctx()) {
            return Ok(k.clone());
        }
        let k = Arc::new(Kernels::open(ctx)?);
        // The baseline is what every call can fall back to: load it now, so that a
        // driver that refuses the PTX says so at the first call.
        k.module(Variant::Baseline.module())?;
        loaded.push(k.clone());
        Ok(k)
    }

    fn open(ctx: &Arc<CudaContext>) -> Result<Kernels> {
        ctx.bind_to_thread()
            .map_err(BnError::driver("binding the context"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(BnError::driver("reading the compute capability"))?;
        let attr = |a| {
            ctx.attribute(a)
                .map_err(BnError::driver("reading device attributes"))
        };
        let info = DeviceInfo {
            sm_count: attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
                as u32,
            compute_capability: (major as u32, minor as u32),
            l2_bytes: attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)? as u64,
        };
        let name = ctx
            .name()
            .map_err(BnError::driver("reading the device's name"))?;
        let table = TuningTable::embedded(&name, info.compute_capability);
        Ok(Kernels {
            ctx: ctx.clone(),
            info,
            cc: (major * 10 + minor) as u32,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            occupancy: Mutex::new(HashMap::new()),
            shared_limits: Mutex::new(HashMap::new()),
            tuning: Mutex::new(Tuning {
                table,
                ..Tuning::default()
            }),
        })
    }

    /// The handle of module `name`, loading it on first use. The context must be bound.
    fn module(&self, name: &'static str) -> Result<sys::CUmodule> {
        let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&h) = modules.get(name) {
            return Ok(h as sys::CUmodule);
        }
        let h = load_module(name, self.cc)?;
        modules.insert(name, h as usize);
        Ok(h)
    }

    /// The device's properties.
    pub fn device(&self) -> &DeviceInfo {
        &self.info
    }

    /// The knobs calls on this context plan with.
    pub fn tuning(&self) -> Tuning {
        *self.tuning.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces them.
    pub fn set_tuning(&self, tuning: Tuning) {
        *self.tuning.lock().unwrap_or_else(|e| e.into_inner()) = tuning;
    }

    /// What the driver answers `ask` about `kernel` (its function loaded, the context
    /// bound), asked once per `key`: the answers never change, and every call plans
    /// several families' stages.
    fn asked_once<K: Copy + Eq + std::hash::Hash>(
        &self,
        answers: &Mutex<HashMap<K, u32>>,
        key: K,
        kernel: &KernelId,
        ask: impl FnOnce(sys::CUfunction) -> Result<u32>,
    ) -> Result<u32> {
        let known = answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .copied();
        if let Some(n) = known {
            return Ok(n);
        }
        self.ctx
            .bind_to_thread()
            .map_err(BnError::driver("binding the context"))?;
        let n = ask(self.function(kernel)?)?;
        answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, n);
        Ok(n)
    }

    /// The entry point `id`, looked up once. The context must be bound.
    fn function(&self, id: &KernelId) -> Result<sys::CUfunction> {
        if !KERNEL_PAIRS.contains(&(id.input, id.param)) {
            return Err(BnError::UnsupportedTypes {
                input: id.input.name(),
                param: id.param.name(),
            });
        }
        if let Some(&f) = self
            .functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
        {
            return Ok(f as sys::CUfunction);
        }
        let module = self.module(id.variant.module())?;
        let name = CString::new(id.name()).expect("kernel names have no NUL");
        // SAFETY: the module is loaded in self.ctx, which the caller has bound.
        let f = unsafe { result::module::get_function(module, name) }.map_err(BnError::driver(
            "looking up a kernel (the embedded PTX lacks it)",
        ))?;
        let mut functions = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        Ok(*functions.entry(*id).or_insert(f as usize) as sys::CUfunction)
    }
}

/// Loads the newest embedded PTX of module `name` that a device of compute capability
/// `cc` runs into the bound context.
fn load_module(name: &'static str, cc: u32) -> Result<sys::CUmodule> {
    let module = module_for(name, cc).ok_or(BnError::PtxUnavailable(
        "no embedded PTX of this kernel family targets this device's compute capability",
    ))?;
    let image = CString::new(module.ptx)
        .map_err(|_| BnError::PtxUnavailable("embedded PTX contains a NUL byte"))?;
    // SAFETY: `image` is a NUL-terminated PTX string that outlives the call; the caller
    // has bound the context.
    let handle = unsafe { result::module::load_data(image.as_ptr().cast::<c_void>()) }.map_err(
        |source| {
            use sys::cudaError_enum as E;
            match source.0 {
                E::CUDA_ERROR_UNSUPPORTED_PTX_VERSION
                | E::CUDA_ERROR_INVALID_PTX
                | E::CUDA_ERROR_NO_BINARY_FOR_GPU
                | E::CUDA_ERROR_JIT_COMPILER_NOT_FOUND => BnError::PtxRejected {
                    source,
                    driver_version: driver_version().unwrap_or_else(|| "unknown".into()),
                },
                _ => BnError::Driver {
                    op: "loading the kernels' PTX",
                    source,
                },
            }
        },
    )?;
    Ok(handle)
}

/// Launches kernels on one stream through the driver.
pub struct CudaLauncher<'a> {
    stream: &'a CudaStream,
    kernels: &'a Kernels,
}

impl<'a> CudaLauncher<'a> {
    /// A launcher for `stream`, whose context `kernels` belongs to.
    pub fn new(stream: &'a CudaStream, kernels: &'a Kernels) -> CudaLauncher<'a> {
        CudaLauncher { stream, kernels }
    }
}

impl Launcher for CudaLauncher<'_> {
    fn device(&self) -> &DeviceInfo {
        &self.kernels.info
    }

    fn prepare(&self, kernels: &[KernelId]) -> Result<()> {
        self.kernels
            .ctx
            .bind_to_thread()
            .map_err(BnError::driver("binding the context"))?;
        for k in kernels {
            self.kernels.function(k)?;
        }
        Ok(())
    }

    fn resident_blocks(
        &self,
        kernel: &KernelId,
        block_threads: u32,
        shared_bytes: u32,
    ) -> Result<u32> {
        let key = (*kernel, block_threads, shared_bytes);
        self.kernels
            .asked_once(&self.kernels.occupancy, key, kernel, |f| {
                let threads = i32::try_from(block_threads).unwrap_or(i32::MAX);
                // SAFETY: `f` is a live function of the bound context's loaded module.
                let n = unsafe {
                    result::occupancy::max_active_block_per_multiprocessor(
                        f,
                        threads,
                        shared_bytes as usize,
                    )
                }
                .map_err(BnError::driver("reading a kernel's occupancy"))?;
                Ok(n.max(0) as u32)
            })
    }

    /// The device's opt-in per block (`MAX_SHARED_MEMORY_PER_BLOCK_OPTIN`) less the
    /// kernel's static shared memory, set as the kernel's `MAX_DYNAMIC_SHARED_SIZE_BYTES`
    /// (without it a launch may not pass 48 KiB); once per kernel.
    fn dynamic_shared_limit(&self, kernel: &KernelId) -> Result<u32> {
        let ctx = &self.kernels.ctx;
        self.kernels
            .asked_once(&self.kernels.shared_limits, *kernel, kernel, |f| {
                use sys::CUdevice_attribute as Dev;
                use sys::CUfunction_attribute as Attr;
                let optin = ctx
                    .attribute(Dev::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
                    .map_err(BnError::driver("reading device attributes"))?;
                // SAFETY: `f` is a live function of the bound context's loaded module; the
                // attribute is a readable one.
                let fixed = unsafe {
                    result::function::get_function_attribute(
                        f,
                        Attr::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES,
                    )
                }
                .map_err(BnError::driver("reading a kernel's shared memory"))?;
                let limit = optin.saturating_sub(fixed).max(0);
                // SAFETY: as above; the value is within what the device allows the kernel.
                unsafe {
                    result::function::set_function_attribute(
                        f,
                        Attr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        limit,
                    )
                }
                .map_err(BnError::driver("raising a kernel's shared memory limit"))?;
                Ok(limit as u32)
            })
    }

    fn launch(
        &self,
        kernel: KernelId,
        config: &LaunchConfig,
        params: &BnParams,
        _regions: &[Region],
    ) -> Result<()> {
        if config.shared_bytes > 0 {
            // The opt-in (asked once per kernel), where a plan made elsewhere did not ask
            // first: with its static shared memory a kernel can pass 48 KiB at any
            // dynamic size.
            self.dynamic_shared_limit(&kernel)?;
        }
        self.kernels
            .ctx
            .bind_to_thread()
            .map_err(BnError::driver("binding the context"))?;
        let f = self.kernels.function(&kernel)?;
        let mut p = *params;
        let mut args = [(&mut p as *mut BnParams).cast::<c_void>()];
        // SAFETY: `f` takes exactly one BnParams by value (every entry point does), `args`
        // points at one that lives until the launch call has copied it, the stream belongs
        // to the bound context, and the raw layer's contract makes every address in it
        // valid for the launch. A cooperative plan sizes its grid from the occupancy the
        // driver reported for `f`, so every block can be resident (the driver refuses the
        // launch otherwise).
        unsafe {
            let launch = if config.cooperative {
                result::launch_cooperative_kernel
            } else {
                result::launch_kernel
            };
            launch(
                f,
                config.grid,
                config.block,
                config.shared_bytes,
                self.stream.cu_stream(),
                &mut args,
            )
        }
        .map_err(BnError::driver("launching a kernel"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch::{Layout, Stage};

    #[test]
    fn embedded_ptx_has_every_entry_point() {
        let ilp_stages = [
            Stage::FwdStats,
            Stage::FwdNorm,
            Stage::BwdReduce,
            Stage::BwdDx,
            Stage::BwdDxEval,
        ];
        let fused = [Stage::FwdFused, Stage::BwdFused];
        for m in PTX_MODULES {
            let (variant, stages, widths): (_, &[Stage], &[bool]) = match m.name {
                "batchnorm" => (Variant::Baseline, &Stage::ALL, &[false]),
                "ilp" => (Variant::Ilp, &ilp_stages, &[false, true]),
                "flat" => (Variant::Flat, &ilp_stages, &[false, true]),
                "persistent" => (Variant::Persistent, &fused, &[false, true]),
                other => panic!("a PTX module no family claims: {other}"),
            };
            for &stage in stages {
                for layout in [Layout::Nchw, Layout::Nhwc] {
                    for (input, param) in KERNEL_PAIRS {
                        for &index64 in widths {
                            let id = KernelId {
                                variant,
                                index64,
                                stage,
                                layout,
                                input,
                                param,
                            };
                            let entry = format!(".entry {}(", id.name());
                            assert!(m.ptx.contains(&entry), "{} lacks {entry}", m.name);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn each_family_has_a_module_for_each_target() {
        if PTX_MODULES.is_empty() {
            return;
        }
        for v in Variant::ALL {
            assert_eq!(module_for(v.module(), 75).map(|m| m.min_cc), Some(75));
            assert_eq!(module_for(v.module(), 86).map(|m| m.min_cc), Some(75));
            assert_eq!(module_for(v.module(), 90).map(|m| m.min_cc), Some(90));
            assert_eq!(module_for(v.module(), 100).map(|m| m.min_cc), Some(90));
            assert!(module_for(v.module(), 70).is_none());
        }
    }
}

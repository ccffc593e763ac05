//! Compiles every `kernels/*.cu` to PTX with nvcc and embeds the result.
//!
//! nvcc is looked up through `NVCC`, then `CUDA_HOME` / `CUDA_PATH`, then `PATH`, then
//! `/usr/local/cuda`, then the folder `scripts/install-cuda-toolchain` installs into
//! (`CUDA_BATCHNORM_TOOLCHAIN_DIR`, default `~/.cache/cuda-batchnorm/cuda-13.0`), so that
//! a new shell after that script still builds the kernels. Without nvcc (or when a kernel fails to compile) the crate still
//! builds: one warning is printed and every GPU entry point returns
//! `BnError::PtxUnavailable` carrying the reason. `CUDA_BATCHNORM_REQUIRE_NVCC=1` turns
//! either case into a build error (CI sets it).
//!
//! Output: `$OUT_DIR/ptx.rs`, included by `src/kernels.rs`, defining
//! `PTX_MODULES: &[PtxModule]` and `PTX_UNAVAILABLE: Option<&str>`.

use std::env;
use std::fs;

// bnbench writes what this reads, from the same file.
#[allow(dead_code)]
#[path = "bench/tuning/format.rs"]
mod tuning_format;
use std::path::{Path, PathBuf};
use std::process::Command;

/// PTX targets, lowest first; the module loader picks the highest one the device runs.
/// CUDA 13 compiles for compute capability 7.5 and newer; compute_90 gives Hopper (and
/// newer) native bf16 conversions and the L2 eviction hints (kernels/stream.cuh).
const TARGETS: &[(&str, u32)] = &[("compute_75", 75), ("compute_90", 90)];

/// The toolkit the embedded PTX is pinned to: CUDA 13.0 emits PTX ISA 9.0, which drivers
/// from 580 load. A newer toolkit emits PTX that such drivers refuse.
const PINNED_NVCC: &str = "release 13.0";

const HOW_TO_GET_NVCC: &str = "install CUDA 13.0's nvcc (scripts/install-cuda-toolchain \
    installs it from NVIDIA's Python wheels and prints the path), set NVCC to it, and rebuild";

fn main() {
    let manifest =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let kernel_dir = manifest.join("kernels");

    println!("cargo:rerun-if-changed=kernels");
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "PATH",
        "CUDA_BATCHNORM_REQUIRE_NVCC",
        "CUDA_BATCHNORM_TOOLCHAIN_DIR",
        "CUDA_BATCHNORM_LINEINFO",
        "CUDA_BATCHNORM_PTX_CACHE",
        "XDG_CACHE_HOME",
        "HOME",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let require = env::var("CUDA_BATCHNORM_REQUIRE_NVCC").is_ok_and(|v| v == "1");
    let mut sources = kernel_sources(&kernel_dir);
    sources.sort();
    for entry in fs::read_dir(&kernel_dir).into_iter().flatten().flatten() {
        println!("cargo:rerun-if-changed={}", entry.path().display());
    }

    let outcome = find_nvcc()
        .ok_or_else(|| format!("nvcc was not found (looked at NVCC, CUDA_HOME, CUDA_PATH, PATH, /usr/local/cuda and the install-cuda-toolchain folder); {HOW_TO_GET_NVCC}"))
        .and_then(|nvcc| {
            check_version(&nvcc);
            compile_all(&nvcc, &sources, &kernel_dir, &out_dir)
        });

    // Lets the package's tests be ignored, as the test runner reports them, where the
    // build has no kernels to run.
    println!("cargo::rustc-check-cfg=cfg(cuda_batchnorm_ptx)");
    let built = outcome.as_ref().is_ok_and(|m| !m.is_empty());
    if built {
        println!("cargo:rustc-cfg=cuda_batchnorm_ptx");
    }
    // Read by dependents' build scripts as DEP_CUDA_BATCHNORM_PTX.
    println!("cargo:ptx={}", u8::from(built));
    let generated = match outcome {
        Ok(modules) => render(&modules, None),
        Err(reason) => {
            if require {
                panic!("CUDA_BATCHNORM_REQUIRE_NVCC=1 but the kernels were not built: {reason}");
            }
            println!("cargo:warning=cuda-batchnorm is built without GPU kernels: {reason}");
            render(&[], Some(&reason))
        }
    };
    fs::write(out_dir.join("ptx.rs"), generated).expect("write ptx.rs");
    fs::write(out_dir.join("tuning.rs"), tuning_tables(&manifest)).expect("write tuning.rs");
}

/// `EMBEDDED_TABLES`: every bench/tuning/*.json, as Rust statics. A table that does not
/// parse fails the build (it was committed from a bnbench run; it must stay readable).
fn tuning_tables(manifest: &Path) -> String {
    let dir = manifest.join("bench/tuning");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    let rust_name = |s: &str| -> String {
        s.split('_')
            .map(|w| {
                let mut c = w.chars();
                c.next()
                    .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                    .unwrap_or_default()
            })
            .collect()
    };
    let op = |s: &str| match s {
        "train_fwd" => "TrainForward",
        "eval_fwd" => "EvalForward",
        "train_bwd" => "TrainBackward",
        _ => "EvalBackward",
    };
    let mut out = String::from(
        "// @generated by build.rs from bench/tuning/*.json\n\
         pub(crate) static EMBEDDED_TABLES: &[TuningTable] = &[\n",
    );
    for f in files {
        let text = fs::read_to_string(&f).unwrap_or_default();
        let t = tuning_format::parse(&text)
            .unwrap_or_else(|e| panic!("{}: not a tuning table: {e}", f.display()));
        out.push_str(&format!(
            "    TuningTable {{ device: {:?}, compute_capability: ({}, {}), entries: &[\n",
            t.device, t.compute_capability.0, t.compute_capability.1
        ));
        for e in &t.entries {
            out.push_str(&format!(
                "        TuningEntry {{ op: TunedOp::{}, layout: Layout::{}, input: DType::{}, \
                 bytes_log2: {}, variant: Variant::{} }},\n",
                op(&e.op),
                rust_name(&e.layout),
                e.dtype.to_ascii_uppercase(),
                e.bytes_log2,
                rust_name(&e.variant)
            ));
        }
        out.push_str("    ] },\n");
    }
    out.push_str("];\n");
    out
}

struct Built {
    module: String,
    min_cc: u32,
    path: PathBuf,
}

fn kernel_sources(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect()
}

fn find_nvcc() -> Option<PathBuf> {
    let exe = if cfg!(windows) { "nvcc.exe" } else { "nvcc" };
    if let Some(p) = env::var_os("NVCC") {
        return Some(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = env::var_os(var) {
            let p = PathBuf::from(root).join("bin").join(exe);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let p = dir.join(exe);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let p = PathBuf::from("/usr/local/cuda/bin").join(exe);
    if p.is_file() {
        return Some(p);
    }
    let p = toolchain_dir()?.join("nvidia/cu13/bin").join(exe);
    p.is_file().then_some(p)
}

/// Where `scripts/install-cuda-toolchain` puts the pinned toolkit (the same rule as the
/// script's).
fn toolchain_dir() -> Option<PathBuf> {
    if let Some(d) = env::var_os("CUDA_BATCHNORM_TOOLCHAIN_DIR") {
        return Some(PathBuf::from(d));
    }
    let cache = env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(cache.join("cuda-batchnorm/cuda-13.0"))
}

fn check_version(nvcc: &Path) {
    // A failure to run nvcc at all is reported by compile_all.
    let Ok(out) = Command::new(nvcc).arg("--version").output() else {
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    if !text.contains(PINNED_NVCC) {
        let line = text
            .lines()
            .find(|l| l.contains("release"))
            .unwrap_or("unknown version");
        println!(
            "cargo:warning=nvcc at {} reports `{}`; the crate is pinned to CUDA 13.0 (PTX ISA 9.0, \
             drivers >= 580). PTX from a newer toolkit is refused by older drivers.",
            nvcc.display(),
            line.trim()
        );
    }
}

fn compile_all(
    nvcc: &Path,
    sources: &[PathBuf],
    include: &Path,
    out_dir: &Path,
) -> Result<Vec<Built>, String> {
    if sources.is_empty() {
        return Err(format!("no kernels/*.cu files in {}", include.display()));
    }
    // Source lines in the PTX (for ncu's source view) double its size, and every test
    // binary and bnbench embeds it: only on request.
    let lineinfo = env::var("CUDA_BATCHNORM_LINEINFO").is_ok_and(|v| v == "1");
    let mut flags = vec!["-std=c++17", "-O3"];
    if lineinfo {
        flags.push("-lineinfo");
    }
    let cache = env::var_os("CUDA_BATCHNORM_PTX_CACHE").map(PathBuf::from);
    // What a compile's output depends on besides its arch: every file in kernels/ (the
    // headers included), nvcc's version and the flags.
    let key = cache.as_ref().map(|_| inputs_hash(nvcc, include, &flags));
    let jobs: Vec<(PathBuf, String, &str, u32)> = sources
        .iter()
        .flat_map(|src| {
            let stem = src
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("kernels")
                .to_string();
            TARGETS
                .iter()
                .map(move |&(arch, min_cc)| (src.clone(), stem.clone(), arch, min_cc))
        })
        .collect();
    // The compiles are independent: run them side by side (nvcc is single-threaded).
    let results: Vec<Result<Built, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = jobs
            .iter()
            .map(|(src, stem, arch, min_cc)| {
                let (flags, cache, key) = (&flags, &cache, &key);
                scope.spawn(move || {
                    let path = out_dir.join(format!("{stem}.{arch}.ptx"));
                    let cached = cache
                        .as_ref()
                        .zip(key.as_ref())
                        .map(|(dir, key)| dir.join(format!("{stem}.{arch}.{key}.ptx")));
                    if let Some(c) = cached.as_ref().filter(|c| c.is_file()) {
                        fs::copy(c, &path).map_err(|e| format!("copying {}: {e}", c.display()))?;
                    } else {
                        nvcc_ptx(nvcc, src, arch, flags, include, &path)?;
                        if let Some(c) = &cached {
                            // A cache that cannot be written only costs the next build time.
                            let _ = fs::create_dir_all(c.parent().unwrap_or(Path::new(".")))
                                .and_then(|_| fs::copy(&path, c));
                        }
                    }
                    Ok(Built {
                        module: stem.clone(),
                        min_cc: *min_cc,
                        path,
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("an nvcc job panicked".into()))
            })
            .collect()
    });
    results.into_iter().collect()
}

fn nvcc_ptx(
    nvcc: &Path,
    src: &Path,
    arch: &str,
    flags: &[&str],
    include: &Path,
    path: &Path,
) -> Result<(), String> {
    let out = Command::new(nvcc)
        .arg("--ptx")
        .arg(format!("-arch={arch}"))
        .args(flags)
        .arg("-I")
        .arg(include)
        .arg("-o")
        .arg(path)
        .arg(src)
        .output()
        .map_err(|e| format!("could not run {}: {e}; {HOW_TO_GET_NVCC}", nvcc.display()))?;
    if !out.status.success() {
        return Err(format!(
            "nvcc failed on {} for {arch}:\n{}{}",
            src.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// A hash of every file in `kernels` (names and contents), nvcc's `--version` and the
/// flags, as hex: the PTX cache's key.
fn inputs_hash(nvcc: &Path, kernels: &Path, flags: &[&str]) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mut files: Vec<PathBuf> = fs::read_dir(kernels)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    for f in files {
        f.file_name().hash(&mut h);
        fs::read(&f).unwrap_or_default().hash(&mut h);
    }
    if let Ok(out) = Command::new(nvcc).arg("--version").output() {
        out.stdout.hash(&mut h);
    }
    flags.hash(&mut h);
    format!("{:016x}", h.finish())
}

fn render(modules: &[Built], unavailable: Option<&str>) -> String {
    let mut s = String::from("// @generated by build.rs\n");
    s.push_str("pub(crate) const PTX_MODULES: &[PtxModule] = &[\n");
    for m in modules {
        s.push_str(&format!(
            "    PtxModule {{ name: {:?}, min_cc: {}, ptx: include_str!({:?}) }},\n",
            m.module,
            m.min_cc,
            m.path.display().to_string()
        ));
    }
    s.push_str("];\n");
    s.push_str(&format!(
        "pub(crate) const PTX_UNAVAILABLE: Option<&str> = {unavailable:?};\n"
    ));
    s
}

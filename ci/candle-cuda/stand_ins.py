#!/usr/bin/env python3
"""Writes C stand-ins for the CUDA libraries candle links but this crate never uses
(cuBLAS, cuBLASLt, cuRAND, NVRTC, and the CUDA runtime its statically built kernels
call), for the emulated driver's test of the candle adapter:

    python3 stand_ins.py CUDARC_SRC_DIR OUT_DIR [STATIC_LIB ...]

The runtime's stand-in defines what the given static libraries (candle's `libmoe.a`)
leave undefined among cuda*/__cuda* symbols: the fat-binary registration calls that
run when the program starts do nothing, every other call fails
(cudaErrorNotSupported).

For each library, every function cudarc's bindings declare (src/<lib>/sys/mod.rs) is
defined, returning a non-zero status (each library's "not initialised"/"error" code),
so the linker and the dynamic loader (-z now) find every symbol; the calls candle makes
to create its cuBLAS handle and cuRAND generator when it opens a CUDA device succeed
with a dummy handle, so that `Device::new_cuda` works on the emulated driver. Nothing
else of cuBLAS or cuRAND works, and the adapter never calls them (candle's own CUDA
kernels do not run on the emulated driver either: the test runs only this crate's).
"""

import os
import re
import subprocess
import sys

LIBS = {
    # library: (cudarc module, name prefix, error status)
    "cublas": ("cublas", "cublas", 1),
    "cublasLt": ("cublaslt", "cublasLt", 1),
    "curand": ("curand", "curand", 100),
    "nvrtc": ("nvrtc", "nvrtc", 6),
}

# Calls that must succeed for candle's CudaDevice::new: (name, C definition).
WORKING = {
    "cublasCreate_v2": "int cublasCreate_v2(void **h) { *h = (void *)1; return 0; }",
    "cublasSetStream_v2": "int cublasSetStream_v2(void *h, void *s) { (void)h; (void)s; return 0; }",
    "cublasDestroy_v2": "int cublasDestroy_v2(void *h) { (void)h; return 0; }",
    "curandCreateGenerator": "int curandCreateGenerator(void **g, int kind) { (void)kind; *g = (void *)1; return 0; }",
    "curandSetPseudoRandomGeneratorSeed": "int curandSetPseudoRandomGeneratorSeed(void *g, unsigned long long s) { (void)g; (void)s; return 0; }",
    "curandSetGeneratorOffset": "int curandSetGeneratorOffset(void *g, unsigned long long o) { (void)g; (void)o; return 0; }",
    "curandSetStream": "int curandSetStream(void *g, void *s) { (void)g; (void)s; return 0; }",
    "curandDestroyGenerator": "int curandDestroyGenerator(void *g) { (void)g; return 0; }",
}


def main():
    src, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    for lib, (module, prefix, status) in LIBS.items():
        text = open(os.path.join(src, "src", module, "sys", "mod.rs")).read()
        names = sorted(set(re.findall(r"pub (?:unsafe )?fn (" + prefix + r"\w*)\s*\(", text)))
        if lib == "cublas":
            names = [n for n in names if not n.startswith("cublasLt")]
        lines = [f"/* stand-ins for lib{lib}.so, written by ci/candle-cuda/stand_ins.py */"]
        for n in names:
            lines.append(WORKING.get(n, f"int {n}(void) {{ return {status}; }}"))
        with open(os.path.join(out, f"{lib}.c"), "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"{lib}: {len(names)} functions", file=sys.stderr)
    runtime = set()
    for archive in sys.argv[3:]:
        nm = subprocess.run(["nm", "-u", archive], capture_output=True, text=True, check=True).stdout
        runtime.update(w for line in nm.splitlines() for w in line.split()[1:2]
                       if re.match(r"^(__)?cuda", w))
    lines = ["/* stand-ins for libcudart.so, written by ci/candle-cuda/stand_ins.py */"]
    for n in sorted(runtime):
        if n == "__cudaRegisterFatBinary":
            lines.append("static void *bn_handle; void **__cudaRegisterFatBinary(void *f) { (void)f; return &bn_handle; }")
        elif n.startswith("__cudaRegister") or n == "__cudaUnregisterFatBinary":
            lines.append(f"void {n}(void) {{}}")
        else:
            lines.append(f"int {n}(void) {{ return 801; }}")
    with open(os.path.join(out, "cudart.c"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"cudart: {len(runtime)} functions", file=sys.stderr)


if __name__ == "__main__":
    main()

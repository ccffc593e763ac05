#!/usr/bin/env python3
"""Plants known kernel and host bugs, one at a time, and shows whether `cargo test` catches them.

    python3 scripts/plant_bugs.py            # all bugs
    python3 scripts/plant_bugs.py tail sync  # some of them

For each bug: copy the repository (without target/) to a temporary folder, apply one
edit to a kernel source, run the emulated-kernel tests there (`cargo test --test
emulated`, the part of `cargo test` that executes kernels on a machine without a GPU),
and report which tests failed and with what message. Host-side bugs in the CUDA path run
the GPU tests instead (`cargo test --test gpu`, on the emulated CUDA driver here; they
need the pinned nvcc, which scripts/install-cuda-toolchain provides). Exits 1 if any bug the emulator
is expected to catch got through.

The edits must apply exactly once; a bug whose text no longer matches the kernel is
reported as stale so the list is kept in step with the kernels.
"""

import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# name: (file, original text, planted text, expected to be caught, description[, test
# target, default "emulated"[, (a second original text, its planted text)]])
BUGS = {
    "tail": (
        "kernels/batchnorm.cu",
        "for (I i = head + vecs * V + t; i < len; i += group) scalar(base + i);",
        "for (I i = head + vecs * V + t; i <= len; i += group) scalar(base + i);",
        True,
        "off-by-one in the scalar tail after the 16-byte vectors (nchw)",
    ),
    "sync": (
        "kernels/reduce.cuh",
        "        s_m2[warp] = w.m2;\n    }\n    __syncthreads();\n",
        "        s_m2[warp] = w.m2;\n    }\n",
        True,
        "removed __syncthreads() between writing and reading the warps' Welford states",
    ),
    "shuffle": (
        "kernels/reduce.cuh",
        "        o.mean = __shfl_down_sync(kFullMask, w.mean, offset);",
        "        o.mean = __shfl_down_sync(kFullMask, w.mean, offset + 1);",
        True,
        "wrong shuffle offset for the mean in the warp merge",
    ),
    "finalise": (
        "kernels/stages.cuh",
        "s_last[0] = prev == group_size - 1u ? 1 : 0;",
        "s_last[0] = prev == 0u ? 1 : 0;",
        True,
        "the first block to arrive finalises instead of the last (does not wait for the others)",
    ),
    "reset": (
        "kernels/stages.cuh",
        "        if (lead) counters.st(counter, 0u);\n",
        "",
        True,
        "the finalising block does not reset its counter",
    ),
    "rowsync": (
        "kernels/batchnorm.cu",
        "            s_n[me] = w[0].n;\n        }\n        __syncthreads();\n",
        "            s_n[me] = w[0].n;\n        }\n",
        True,
        "removed __syncthreads() in the nhwc tree merge across rows",
    ),
    "fence": (
        "kernels/stages.cuh",
        "    BN_SHARED(int, s_last, 1);\n    __threadfence();\n",
        "    BN_SHARED(int, s_last, 1);\n",
        True,
        "removed __threadfence() before counting the block in (a memory-ordering bug)",
    ),
    "blockfence": (
        "kernels/stages.cuh",
        "    BN_SHARED(int, s_last, 1);\n    __threadfence();\n",
        "    BN_SHARED(int, s_last, 1);\n    __threadfence_block();\n",
        True,
        "a block-scope fence where a device-scope __threadfence() is needed before the count",
    ),
    "readfence": (
        "kernels/stages.cuh",
        "    if (last) {\n        __threadfence();\n",
        "    if (last) {\n",
        True,
        "removed the last block's __threadfence() between seeing the count and reading partials",
    ),
    "reread": (
        "kernels/stages.cuh",
        "        const unsigned prev = atomicAdd(counters.at(counter), 1u);\n"
        "        s_last[0] = prev == group_size - 1u ? 1 : 0;",
        "        atomicAdd(counters.at(counter), 1u);\n"
        "        s_last[0] = counters.ld(counter) == group_size ? 1 : 0;",
        True,
        "the lead thread re-reads the arrival counter with a plain load after its atomicAdd "
        "(two blocks can both see the full count and finalise)",
    ),
    "nofences": (
        "kernels/stages.cuh",
        "    BN_SHARED(int, s_last, 1);\n    __threadfence();\n",
        "    BN_SHARED(int, s_last, 1);\n",
        True,
        "removed __threadfence() before counting the block in, with the counter re-read "
        "(reread) planted too",
        "emulated",
        ("        const unsigned prev = atomicAdd(counters.at(counter), 1u);\n"
         "        s_last[0] = prev == group_size - 1u ? 1 : 0;",
         "        atomicAdd(counters.at(counter), 1u);\n"
         "        s_last[0] = counters.ld(counter) == group_size ? 1 : 0;"),
    ),
    # Host-side bugs in the CUDA path: only the GPU tests, run on the emulated driver,
    # go through it (the emulated kernel tests launch through their own backend).
    "wszero": (
        "src/functional.rs",
        "                stream\n                    .alloc_zeros::<u32>(counters)",
        "                unsafe { stream.alloc::<u32>(counters) }",
        True,
        "host: the workspace's counters are allocated without zeroing them",
        "gpu",
    ),
    "grid": (
        "src/kernels.rs",
        "                f,\n                config.grid,",
        "                f,\n                (config.grid.0, 1, 1),",
        True,
        "host: the CUDA launcher drops the grid's y dimension (nhwc row splits)",
        "gpu",
    ),
}


def copy_repo(dst):
    def ignore(path, names):
        return {n for n in names if n in ("target", ".git", ".gpu", "__pycache__")}

    shutil.copytree(ROOT, dst, ignore=ignore)


def run_bug(name, target_dir):
    path, old, new, expected, what, *rest = BUGS[name]
    target = rest[0] if rest else "emulated"
    # a second edit of the same file, planted with the first
    extra = rest[1] if len(rest) > 1 else None
    with tempfile.TemporaryDirectory(prefix=f"plant-{name}-") as tmp:
        repo = os.path.join(tmp, "repo")
        copy_repo(repo)
        src = os.path.join(repo, path)
        text = open(src).read()
        if text.count(old) != 1:
            return name, what, expected, "stale", f"the text to replace occurs {text.count(old)} times in {path}"
        text = text.replace(old, new)
        if extra is not None:
            if text.count(extra[0]) != 1:
                return name, what, expected, "stale", f"the second text occurs {text.count(extra[0])} times in {path}"
            text = text.replace(extra[0], extra[1])
        open(src, "w").write(text)
        env = dict(os.environ, CARGO_TARGET_DIR=target_dir)
        if target == "emulated":
            env.pop("NVCC", None)  # the emulator needs no nvcc; skip the PTX build
        else:
            # the GPU tests need the PTX, and run on the emulated driver here
            env["NVCC"] = subprocess.run(
                [os.path.join(ROOT, "scripts", "install-cuda-toolchain")],
                capture_output=True, text=True, check=True,
            ).stdout.strip()
            env["CUDA_BATCHNORM_REQUIRE_NVCC"] = "1"
            env.pop("CUDA_BATCHNORM_REQUIRE_GPU", None)
        p = subprocess.run(
            ["cargo", "test", "--test", target, "--", "--test-threads=2"],
            cwd=repo, env=env, capture_output=True, text=True, timeout=3600,
        )
        out = p.stdout + p.stderr
        failed = [l.split()[1] for l in out.splitlines() if l.startswith("test ") and l.rstrip().endswith("FAILED")]
        if p.returncode == 0:
            return name, what, expected, "passed", "cargo test passed: NOT caught"
        if not failed:
            tail = "\n".join(out.splitlines()[-15:])
            return name, what, expected, "error", f"cargo test failed without a test failure:\n{tail}"
        msg = next((l.strip() for l in out.splitlines() if "relative error" in l or "bn_" in l and ":" in l), "")
        return name, what, expected, "caught", f"{len(failed)} tests failed ({', '.join(failed[:6])}); e.g. {msg[:200]}"


def main():
    names = sys.argv[1:] or list(BUGS)
    unknown = [n for n in names if n not in BUGS]
    if unknown:
        print(f"unknown bugs {unknown}; known: {', '.join(BUGS)}", file=sys.stderr)
        return 2
    target_dir = os.path.join(tempfile.gettempdir(), "cuda-batchnorm-plant-target")
    results = []
    for n in names:
        print(f"planting {n} ...", file=sys.stderr, flush=True)
        results.append(run_bug(n, target_dir))
    bad = 0
    print(f"{'bug':<10} {'expected':<10} {'outcome':<8} detail")
    for name, what, expected, outcome, detail in results:
        exp = "caught" if expected else "missed"
        print(f"{name:<10} {exp:<10} {outcome:<8} {what}\n{'':<30}{detail}")
        if outcome == "stale" or (expected and outcome != "caught"):
            bad += 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

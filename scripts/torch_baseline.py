#!/usr/bin/env python3
"""Times PyTorch's batch norm on bnbench's suite, the way bnbench times cuda-batchnorm.

Reads bench/suite.toml with tomllib (Python 3.11+; the format and its expansion rules are
documented in its comments) and expands it exactly as bnbench does, so `--list` prints
the same rows in the same order. For each row and op it
times, per implementation:

  torch          F.batch_norm with PyTorch's default backend (cuDNN where PyTorch picks it)
  torch-native   the same with torch.backends.cudnn.enabled = False (PyTorch's own kernels)
  torch-compile  the forward (and, through AOTAutograd, its backward) under torch.compile,
                 compiled before timing; skipped with a note if compilation fails

Ops: train_fwd = F.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5)
(running statistics updated); eval_fwd = the same with training=False; backward =
torch.autograd.grad of a training forward with respect to (x, w, b) given dy. Only the
backward is timed: each repetition runs the forward untimed, flushes L2, then times
torch.autograd.grad(y, (x, w, b), dy) -- i.e. the autograd backward node PyTorch itself
would run (cudnn_batch_norm_backward or native_batch_norm_backward), plus the autograd
engine's host work.

With --op, also the inference path's and the fused epilogues' ops (bnbench's names; not
run by default): frozen_eval = x * scale + shift with torchvision FrozenBatchNorm2d's
coefficients precomputed (scale = w * rsqrt(rv + eps), shift = b - rm * scale, in the
parameters' type, then cast to x's, as in a model converted with .half()); eval_relu and
train_fwd_relu = F.relu(F.batch_norm(...)); eval_add_relu and train_fwd_add_relu =
F.relu(F.batch_norm(...) + z) with a residual z uniform in [-1, 1); backward_relu and
backward_add_relu = torch.autograd.grad of those training forwards with respect to
(x, w, b), and z for add-ReLU. Eager PyTorch runs each as separate kernels;
torch.compile may fuse them.

Timing is bnbench's: CUDA events around the op only, `--warmup` untimed runs, then
`--reps` (>= 50) timed runs, median; before every run L2 is flushed by zeroing a buffer
of max(2 x L2, 256 MiB), and a short GPU spin (torch.cuda._sleep) keeps the GPU busy while
Python queues the op, so host overhead that the GPU can hide is not timed. A 1 GiB
device-to-device copy timed the same way gives the copy bandwidth (bytes read + written).
f16/bf16 inputs use f32 weight, bias and running statistics (the mixed mode of AMP).
Channels-last rows use memory_format=torch.channels_last / channels_last_3d; a 3-D
(N, C, L) channels-last input is an (N, L, C) tensor's transpose.

Writes bnbench's JSON format with --json FILE and prints a table. Needs only PyTorch
(and a CUDA GPU); `--self-test` and `--list` need neither.
"""

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import tempfile
import time

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    sys.exit("torch_baseline: needs Python 3.11 or newer (tomllib reads bench/suite.toml)")

HERE = os.path.dirname(os.path.abspath(__file__))
SUITE_PATH = os.path.join(HERE, "..", "bench", "suite.toml")

SET_NAMES = ["quick", "resnet50", "bn1d", "hard", "full", "sync"]
SYNC_BATCH = 32  # the sync set: the resnet50 group's shapes with this batch size
LINE_SETS = ["resnet50", "bn1d", "hard"]
CUSTOM_SET = "custom"
LAYOUTS = ["nchw", "nhwc"]
DTYPES = ["f32", "f64", "f16", "bf16"]
OPS = ["train_fwd", "eval_fwd", "backward"]
FUSED_OPS = ["frozen_eval", "eval_relu", "eval_add_relu", "train_fwd_relu", "train_fwd_add_relu",
             "backward_relu", "backward_add_relu"]
ALL_OPS = OPS + FUSED_OPS
IMPLS = ["torch", "torch-native", "torch-compile"]
MIN_REPS = 50
DEFAULT_WARMUP = 10
DEFAULT_SEED = 0x5EED
MAX_DIMS = 8
EPS = 1e-5
MOMENTUM = 0.1
COPY_BYTES = 1 << 30
MIN_FLUSH_BYTES = 256 << 20
SPIN_CYCLES = 100_000  # about 50-60 us at H100/H200 clocks

DTYPE_SIZE = {"f32": 4, "f64": 8, "f16": 2, "bf16": 2}


# --------------------------------------------------------------------------------------
# Suite: reading and expansion (mirrors bnbench/src/suite.rs)


class SuiteError(ValueError):
    pass


def check_dims(dims, what):
    """bnbench's checks of a shape (PyTorch order)."""
    if len(dims) < 2:
        raise SuiteError(f"{what} has {len(dims)} dimension(s); batch norm needs (N, C, ...), at least 2")
    if len(dims) > MAX_DIMS:
        raise SuiteError(f"{what} has more than {MAX_DIMS} dimensions")
    if 0 in dims:
        raise SuiteError(f"{what} has a zero size; every size must be at least 1")
    if dims[0] * math.prod(dims[2:]) < 2:
        raise SuiteError(f"{what} has one value per channel; training needs at least 2")
    if math.prod(dims) > (1 << 63) - 1:
        raise SuiteError(f"{what} has more elements than can be addressed")
    return dims


def parse_dims(text):
    """'48,96,35,35' -> [48, 96, 35, 35], with bnbench's checks."""
    if any(not t.strip().isdigit() for t in text.split(",")):
        raise SuiteError(f"`{text}` is not a comma-separated list of sizes")
    return check_dims([int(t) for t in text.split(",")], f"shape `{text}`")


def _names(value, key, valid):
    if not isinstance(value, list) or not value:
        raise SuiteError(f"`{key}` is empty" if value == [] else f"`{key}` must be a list")
    for t in value:
        if t not in valid:
            raise SuiteError(f"unknown {key} entry `{t}` (expected {', '.join(valid)})")
    return list(value)


def _sizes(value):
    if not isinstance(value, list) or any(type(d) is not int or d < 0 for d in value):
        raise SuiteError(f"shape {value!r} must be a list of non-negative integers")
    return check_dims(list(value), f"shape {value}")


def _keys(table, required, optional, what):
    if not isinstance(table, dict):
        raise SuiteError(f"{what} must be a table")
    for k in table:
        if k not in required + optional:
            raise SuiteError(f"{what}: unknown field `{k}`")
    for k in required:
        if k not in table:
            raise SuiteError(f"{what}: missing field `{k}`")


def parse_suite(text):
    """One dict per shape of the suite file, in file order: set, dims, layouts, dtypes,
    quick (None or (layouts, dtypes))."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SuiteError(str(e)) from None
    _keys(doc, ["group"], [], "the suite")
    if not isinstance(doc["group"], list):
        raise SuiteError("`group` must be an array of tables ([[group]])")
    lines = []
    for i, g in enumerate(doc["group"]):
        _keys(g, ["set", "layouts", "dtypes", "shapes"], ["quick"], f"group {i + 1}")
        where = f"group {i + 1} (set `{g['set']}`)"
        try:
            if g["set"] not in LINE_SETS:
                raise SuiteError(f"unknown set (expected {', '.join(LINE_SETS)})")
            layouts = _names(g["layouts"], "layouts", LAYOUTS)
            dtypes = _names(g["dtypes"], "dtypes", DTYPES)
            if not isinstance(g["shapes"], list) or not g["shapes"]:
                raise SuiteError("`shapes` is empty")
            shapes = [_sizes(d) for d in g["shapes"]]
            for d in shapes:
                if len(d) == 2 and "nhwc" in layouts:
                    raise SuiteError(f"shape {d} is rank 2, which takes nchw only")
            quick = {}
            for q in g.get("quick", []):
                _keys(q, ["shape"], ["layouts", "dtypes"], "a quick entry")
                dims = _sizes(q["shape"])
                if dims not in shapes:
                    raise SuiteError(f"quick entry {dims} is not one of the group's shapes")
                if tuple(dims) in quick:
                    raise SuiteError(f"quick entry {dims} is given twice")
                ql = _names(q["layouts"], "layouts", LAYOUTS) if "layouts" in q else list(layouts)
                qd = _names(q["dtypes"], "dtypes", DTYPES) if "dtypes" in q else list(dtypes)
                if any(x not in layouts for x in ql) or any(x not in dtypes for x in qd):
                    raise SuiteError(f"quick entry {dims} names a layout or dtype the group does not have")
                quick[tuple(dims)] = (ql, qd)
        except SuiteError as e:
            raise SuiteError(f"{where}: {e}") from None
        for d in shapes:
            lines.append({"set": g["set"], "dims": d, "layouts": layouts, "dtypes": dtypes, "quick": quick.get(tuple(d))})
    return lines


def expand(lines, sets, shapes=(), layouts=None, dtypes=None):
    """Rows (set, dims, layout, dtype) in bnbench's order; layouts/dtypes replace each line's lists."""
    rows = []

    def push(set_name, dims, lays, dts):
        for layout in lays:
            if len(dims) == 2:
                layout = "nchw"  # rank 2: channels-last is the same bytes
            for dtype in dts:
                if not any(r[1] == dims and r[2] == layout and r[3] == dtype for r in rows):
                    rows.append((set_name, list(dims), layout, dtype))

    for line in lines:
        sync = "sync" in sets and line["set"] == "resnet50" and line["dims"][0] == SYNC_BATCH
        if "full" in sets or line["set"] in sets or sync:
            lays, dts = line["layouts"], line["dtypes"]
        elif "quick" in sets and line["quick"] is not None:
            lays, dts = line["quick"]
        else:
            continue
        push(line["set"], line["dims"], layouts or lays, dtypes or dts)
    for dims in shapes:
        push(CUSTOM_SET, dims, layouts or ["nchw"], dtypes or ["f32"])
    return rows


def dims_label(dims):
    return "x".join(str(d) for d in dims)


def list_line(row):
    set_name, dims, layout, dtype = row
    return f"{set_name:<9} {dims_label(dims):<20} {layout:<5} {dtype}"


def load_suite():
    with open(SUITE_PATH, encoding="utf-8") as f:
        return parse_suite(f.read())


# --------------------------------------------------------------------------------------
# Bytes per op (mirrors bnbench/src/metrics.rs)


def param_size(dtype):
    return 4 if dtype in ("f16", "bf16") else DTYPE_SIZE[dtype]


def acc_size(dtype):
    return 8 if dtype == "f64" else 4


def op_epilogue(op):
    """None, "relu" or "add_relu"."""
    if op.endswith("_add_relu"):
        return "add_relu"
    if op.endswith("_relu"):
        return "relu"
    return None


def op_kind(op):
    """The BatchNorm call of an op: train_fwd, eval_fwd, frozen_eval or backward."""
    for kind in ("train_fwd", "eval_fwd", "frozen_eval", "backward"):
        if op == kind or op.startswith(kind + "_"):
            return kind
    if op.startswith("eval_"):
        return "eval_fwd"
    raise ValueError(op)


def op_bytes(op, dims, dtype):
    numel = math.prod(dims)
    c = dims[1]
    t, p, a = DTYPE_SIZE[dtype], param_size(dtype), acc_size(dtype)
    kind, epi = op_kind(op), op_epilogue(op)
    if kind == "train_fwd":
        plain = 2 * numel * t + 2 * c * p + 4 * c * p + 2 * c * a
    elif kind == "eval_fwd":
        plain = 2 * numel * t + 4 * c * p
    elif kind == "frozen_eval":
        plain = 2 * numel * t + 2 * c * a
    else:
        plain = 3 * numel * t + c * p + 2 * c * a + 2 * c * p
    if epi is None:
        return plain
    if kind == "backward":
        # y read for the mask; add-ReLU writes dz too.
        return plain + numel * t * (2 if epi == "add_relu" else 1)
    return plain + (numel * t if epi == "add_relu" else 0)


def gbps(nbytes, us):
    return nbytes / (us * 1e-6) / 1e9 if us > 0 and math.isfinite(us) else 0.0


def pct_of(g, copy_gbps):
    return 100.0 * g / copy_gbps if copy_gbps > 0 else 0.0


# --------------------------------------------------------------------------------------
# Results: JSON (bnbench's format) and tables


def _finite(v):
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def result_row(impl, op, dims, layout, dtype, median_us, min_us, copy_gbps):
    nbytes = op_bytes(op, dims, dtype)
    g = gbps(nbytes, median_us)
    return {
        "impl": impl,
        "op": op,
        "shape": list(dims),
        "layout": layout,
        "dtype": dtype,
        "median_us": float(median_us),
        "gbps": float(g),
        "pct_copy": float(pct_of(g, copy_gbps)),
        "min_us": float(min_us),
        "bytes": nbytes,
    }


def write_report(path, report):
    clean = dict(report)
    clean["rows"] = [{k: (_finite(v) if isinstance(v, float) else v) for k, v in r.items()} for r in report["rows"]]
    clean["copy_gbps"] = _finite(report["copy_gbps"]) or 0.0
    # Top-level members one per line, rows one per line (as bnbench writes them).
    parts = []
    for key, value in clean.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            items = ",\n".join("    " + json.dumps(v, allow_nan=False, ensure_ascii=False) for v in value)
            parts.append(f"  {json.dumps(key)}: [\n{items}\n  ]")
        else:
            parts.append(f"  {json.dumps(key)}: {json.dumps(value, allow_nan=False, ensure_ascii=False)}")
    with open(path, "w", encoding="utf-8") as f:
        f.write("{\n" + ",\n".join(parts) + "\n}\n")


def table(report):
    out = [f"{'impl':<14} {'op':<10} {'shape':<18} {'layout':<6} {'dtype':<5} {'median µs':>11} {'GB/s':>9} {'% copy':>7}"]
    for r in report["rows"]:
        out.append(
            f"{r['impl']:<14} {r['op']:<10} {dims_label(r['shape']):<18} {r['layout']:<6} {r['dtype']:<5} "
            f"{r['median_us']:>11.2f} {r['gbps']:>9.1f} {r['pct_copy']:>7.1f}"
        )
    for e in report.get("errors", []):
        out.append(f"{e['impl']:<14} {e['op']:<10} {e['row']:<30} error: {e['error']}")
    return "\n".join(out) + "\n"


def today():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")


# --------------------------------------------------------------------------------------
# Flags


def build_parser():
    p = argparse.ArgumentParser(
        description="Time PyTorch's batch norm on bnbench's suite (bench/suite.toml), the way bnbench times cuda-batchnorm.",
    )
    p.add_argument("--set", action="append", default=[], help="quick, resnet50, bn1d, hard, full or sync (the resnet50 shapes with batch 32), comma-separated [default: quick, or none with --shape]")
    p.add_argument("--shape", action="append", default=[], help="an extra shape, e.g. 48,96,35,35 (repeatable, rank >= 2); nchw f32 unless --layout/--dtype")
    p.add_argument("--dtype", action="append", default=[], help="f32,f16,bf16,f64: replaces every row's dtypes")
    p.add_argument("--layout", action="append", default=[], help="nchw,nhwc: replaces every row's layouts (rank-2 shapes are nchw only)")
    p.add_argument("--op", action="append", default=[], help=f"{','.join(ALL_OPS)} [default: {','.join(OPS)}]")
    p.add_argument("--impl", action="append", default=[], help="torch,torch-native,torch-compile [default: all]")
    p.add_argument("--reps", type=int, default=MIN_REPS, help=f"timed repetitions, at least {MIN_REPS} [default: {MIN_REPS}]")
    p.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help=f"untimed runs first [default: {DEFAULT_WARMUP}]")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"seed of the random inputs [default: {DEFAULT_SEED}]")
    p.add_argument("--device", type=int, default=0, help="CUDA device ordinal [default: 0]")
    p.add_argument("--json", metavar="FILE", help="write the results in bnbench's JSON format")
    p.add_argument("--deadline", type=int, metavar="SECONDS", help="start no row after this many seconds; the rows not run are an error (exit 1), the results still written")
    p.add_argument("--list", action="store_true", help="print the selected rows and exit")
    p.add_argument("--self-test", action="store_true", help="test suite parsing, flags and JSON without torch or a GPU (with --json FILE: write a sample report there)")
    return p


def _split(values, valid, flag, parser):
    out = []
    for v in values:
        if v == "":
            parser.error(f"{flag} needs a value")
        for t in v.split(","):
            t = t.strip()
            if t not in valid:
                parser.error(f"{flag}: unknown value `{t}` (expected {', '.join(valid)})")
            if t not in out:
                out.append(t)
    return out


def parse_args(argv):
    parser = build_parser()
    a = parser.parse_args(argv)
    sets = _split(a.set, SET_NAMES, "--set", parser)
    a.dtypes = _split(a.dtype, DTYPES, "--dtype", parser) or None
    a.layouts = _split(a.layout, LAYOUTS, "--layout", parser) or None
    ops = _split(a.op, ALL_OPS, "--op", parser)
    a.ops = [o for o in ALL_OPS if o in ops] if ops else list(OPS)
    impls = _split(a.impl, IMPLS, "--impl", parser)
    a.impls = [i for i in IMPLS if i in impls] if impls else list(IMPLS)
    shapes = []
    for s in a.shape:
        try:
            d = parse_dims(s)
        except SuiteError as e:
            parser.error(f"--shape: {e}")
        if d not in shapes:
            shapes.append(d)
    a.shapes = shapes
    a.sets = sets if (sets or not shapes) else []
    if not a.sets and not shapes:
        a.sets = ["quick"]
    if a.reps < MIN_REPS:
        parser.error(f"--reps must be at least {MIN_REPS}, got {a.reps}")
    if a.warmup < 0:
        parser.error("--warmup must be non-negative")
    if a.device < 0:
        parser.error("--device must be non-negative")
    if a.deadline is not None and a.deadline < 1:
        parser.error(f"--deadline must be at least 1 second, got {a.deadline}")
    return a


def selected_rows(a):
    return expand(load_suite(), a.sets, a.shapes, a.layouts, a.dtypes)


# --------------------------------------------------------------------------------------
# Timing with PyTorch


class Timer:
    """bnbench's method: flush L2, spin, event, op, event; median of the timed runs."""

    def __init__(self, torch, device, warmup, reps):
        self.torch = torch
        self.warmup = warmup
        self.reps = reps
        props = torch.cuda.get_device_properties(device)
        l2 = int(getattr(props, "L2_cache_size", 0) or 0)
        self.l2_bytes = l2
        self.flush_bytes = max(2 * l2, MIN_FLUSH_BYTES)
        self.flush_buf = torch.empty(self.flush_bytes, dtype=torch.uint8, device=device)
        self.can_sleep = hasattr(torch.cuda, "_sleep")

    def _pre(self):
        self.flush_buf.zero_()
        if self.can_sleep:
            self.torch.cuda._sleep(SPIN_CYCLES)

    def time(self, op, before=None):
        """Median and min in µs of `op()`; `before()` runs untimed ahead of each run (before the flush)."""
        torch = self.torch
        for _ in range(self.warmup):
            if before:
                before()
            self._pre()
            op()
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(self.reps)]
        for start, end in pairs:
            if before:
                before()
            self._pre()
            start.record()
            op()
            end.record()
        torch.cuda.synchronize()
        us = [s.elapsed_time(e) * 1e3 for s, e in pairs]
        return statistics.median(us), min(us)


def torch_dtype(torch, name):
    return {"f32": torch.float32, "f64": torch.float64, "f16": torch.float16, "bf16": torch.bfloat16}[name]


def make_input(torch, dims, layout, dtype, device, gen, lo, hi):
    """Uniform in [lo, hi) in the row's memory layout (nonzero almost surely)."""
    if layout == "nchw" or len(dims) == 2:
        t = torch.empty(dims, dtype=dtype, device=device)
    elif len(dims) == 4:
        t = torch.empty(dims, dtype=dtype, device=device, memory_format=torch.channels_last)
    elif len(dims) == 5:
        t = torch.empty(dims, dtype=dtype, device=device, memory_format=torch.channels_last_3d)
    else:
        # (N, d1, ..., C) storage seen as (N, C, d1, ...): for 3-D, an (N, L, C) tensor's transpose.
        n, c, spatial = dims[0], dims[1], dims[2:]
        t = torch.empty([n] + spatial + [c], dtype=dtype, device=device)
        t = t.permute(0, len(dims) - 1, *range(1, len(dims) - 1))
    t.uniform_(lo, hi, generator=gen)
    return t


def run_torch(a, rows):
    started = time.monotonic()
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        print("torch_baseline: no CUDA device visible to PyTorch", file=sys.stderr)
        return 1
    device = torch.device("cuda", a.device)
    torch.cuda.set_device(device)
    timer = Timer(torch, device, a.warmup, a.reps)
    props = torch.cuda.get_device_properties(device)
    try:
        v = int(torch._C._cuda_getDriverVersion())
        driver = f"CUDA {v // 1000}.{(v % 1000) // 10}"
    except Exception:  # noqa: BLE001 - best effort
        driver = "unknown"
    print(f"torch_baseline: {props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
          f"{timer.l2_bytes >> 20} MiB L2), driver {driver}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")

    # Copy bandwidth, timed the same way.
    free, _ = torch.cuda.mem_get_info(device)
    nbytes = COPY_BYTES
    if free < 3 * nbytes:
        nbytes = max((free // 4) & ~((1 << 20) - 1), 4 * timer.l2_bytes, 1 << 20)
    src = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    med, _ = timer.time(lambda: dst.copy_(src))
    copy_gbps = gbps(2 * nbytes, med)
    del src, dst
    print(f"copy: {copy_gbps:.1f} GB/s ({nbytes >> 20} MiB device-to-device, bytes read + written, median {med:.1f} µs)")
    print(f"timing: median of {a.reps} runs after {a.warmup} warm-up, CUDA events, L2 flushed by a "
          f"{timer.flush_bytes >> 20} MiB zero_() before each run{', then a GPU spin' if timer.can_sleep else ''}")

    report = {
        "device": props.name,
        "driver": driver,
        "date": today(),
        "copy_gbps": copy_gbps,
        "tool": "torch_baseline.py",
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "reps": a.reps,
        "warmup": a.warmup,
        "flush_bytes": timer.flush_bytes,
        "l2_bytes": timer.l2_bytes,
        "rows": [],
        "errors": [],
    }

    compile_failures = 0
    compile_disabled = None
    if "torch-compile" in a.impls:
        import torch._dynamo  # noqa: F401

        # Every row compiles anew; never fall back to eager because of the recompile limit.
        for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 1 << 20)

    total = len(rows) * len(a.ops) * len(a.impls)
    done = 0
    gen = torch.Generator(device=device)
    late = False
    for i, (set_name, dims, layout, dname) in enumerate(rows):
        if a.deadline is not None and time.monotonic() - started >= a.deadline:
            left = len(rows) - i
            print(f"torch_baseline: --deadline {a.deadline} s reached: {left} row(s) not run", file=sys.stderr)
            report["errors"].append({"impl": "-", "op": "-", "row": f"{left} of {len(rows)} rows",
                                     "error": f"not run: the --deadline of {a.deadline} s was reached"})
            late = True
            break
        dtype = torch_dtype(torch, dname)
        pdtype = torch.float32 if dname in ("f16", "bf16") else dtype
        c = dims[1]
        gen.manual_seed(a.seed)
        try:
            x = make_input(torch, dims, layout, dtype, device, gen, -2.0, 3.0)
            backward_ops = [o for o in a.ops if op_kind(o) == "backward"]
            dy = make_input(torch, dims, layout, dtype, device, gen, -1.0, 2.0) if backward_ops else None
            add_ops = [o for o in a.ops if op_epilogue(o) == "add_relu"]
            z = make_input(torch, dims, layout, dtype, device, gen, -1.0, 1.0) if add_ops else None
        except RuntimeError as e:  # out of memory, for instance
            for impl in a.impls:
                for op in a.ops:
                    report["errors"].append({"impl": impl, "op": op, "row": f"{dims_label(dims)} {layout} {dname}", "error": str(e)})
            continue
        w0 = torch.empty(c, dtype=pdtype, device=device).uniform_(0.5, 1.5, generator=gen)
        b0 = torch.empty(c, dtype=pdtype, device=device).uniform_(-0.5, 0.5, generator=gen)
        rm0 = torch.empty(c, dtype=pdtype, device=device).uniform_(-0.5, 0.5, generator=gen)
        rv0 = torch.empty(c, dtype=pdtype, device=device).uniform_(0.5, 2.0, generator=gen)
        # FrozenBatchNorm2d's coefficients, broadcast over (N, C, ...) in x's type.
        bshape = [1, c] + [1] * (len(dims) - 2)
        scale0 = w0 * (rv0 + EPS).rsqrt()
        shift0 = (b0 - rm0 * scale0).to(dtype).reshape(bshape)
        scale0 = scale0.to(dtype).reshape(bshape)
        for impl in a.impls:
            for op in a.ops:
                done += 1
                label = f"{dims_label(dims)} {layout} {dname}"
                print(f"[{done}/{total}] {impl} {op} {label}", file=sys.stderr)
                if impl == "torch-compile" and compile_disabled:
                    continue
                rm, rv = rm0.clone(), rv0.clone()

                kind, epi = op_kind(op), op_epilogue(op)
                training = kind in ("train_fwd", "backward")

                def fwd(x_, rm_, rv_, w_, b_, *z_, training=training, epi=epi):
                    y_ = F.batch_norm(x_, rm_, rv_, w_, b_, training=training, momentum=MOMENTUM, eps=EPS)
                    if epi == "add_relu":
                        y_ = y_ + z_[0]
                    return F.relu(y_) if epi else y_

                def frozen(x_, scale_, shift_):
                    return x_ * scale_ + shift_

                fn = frozen if kind == "frozen_eval" else fwd
                if impl == "torch-compile":
                    torch._dynamo.reset()
                    fn = torch.compile(fn, dynamic=False)
                torch.backends.cudnn.enabled = impl != "torch-native"
                try:
                    if kind == "backward":
                        xg = x.detach().requires_grad_(True)
                        wg = w0.detach().clone().requires_grad_(True)
                        bg = b0.detach().clone().requires_grad_(True)
                        zg = (z.detach().requires_grad_(True),) if epi == "add_relu" else ()
                        state = {}

                        def forward(xg=xg, wg=wg, bg=bg, zg=zg, rm=rm, rv=rv, state=state, fn=fn):
                            state["y"] = fn(xg, rm, rv, wg, bg, *zg)

                        def backward(xg=xg, wg=wg, bg=bg, zg=zg, state=state):
                            torch.autograd.grad(state["y"], (xg, wg, bg, *zg), dy)

                        if impl == "torch-compile":
                            # Compile the forward and the backward before timing.
                            forward()
                            backward()
                            torch.cuda.synchronize()
                        med, mn = timer.time(backward, before=forward)
                    else:
                        if kind == "frozen_eval":
                            args = (x, scale0, shift0)
                        else:
                            args = (x, rm, rv, w0, b0) + ((z,) if epi == "add_relu" else ())
                        with torch.no_grad():
                            if impl == "torch-compile":
                                fn(*args)
                                torch.cuda.synchronize()
                            med, mn = timer.time(lambda fn=fn, args=args: fn(*args))
                    if impl == "torch-compile":
                        compile_failures = 0
                    report["rows"].append(result_row(impl, op, dims, layout, dname, med, mn, copy_gbps))
                except Exception as e:  # noqa: BLE001 - report and go on
                    msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    if impl == "torch-compile":
                        compile_failures += 1
                        print(f"torch_baseline: note: torch.compile failed for {op} {label}, skipped ({msg})", file=sys.stderr)
                        if compile_failures >= 3:
                            compile_disabled = msg
                            print("torch_baseline: note: torch.compile failed 3 times in a row; skipping torch-compile from here on", file=sys.stderr)
                    else:
                        print(f"torch_baseline: {impl} {op} {label}: {msg}", file=sys.stderr)
                    report["errors"].append({"impl": impl, "op": op, "row": label, "error": msg})
                finally:
                    torch.backends.cudnn.enabled = True
                    torch.cuda.synchronize()
        del x, dy, z
        torch.cuda.empty_cache()

    if not report["errors"]:
        del report["errors"]
    print()
    print(table(report), end="")
    if a.json:
        write_report(a.json, report)
        print(f"torch_baseline: wrote {a.json}", file=sys.stderr)
    return 1 if late else 0


# --------------------------------------------------------------------------------------
# Self-test: no torch, no GPU


def self_test(json_path=None):
    lines = load_suite()

    def count(s):
        return len(expand(lines, [s]))

    assert count("resnet50") == 144, count("resnet50")
    assert count("bn1d") == 30, count("bn1d")
    assert count("hard") == 39, count("hard")
    assert count("quick") == 10, count("quick")
    assert count("full") == 213, count("full")
    quick = expand(lines, ["quick"])
    full = expand(lines, ["full"])
    assert all(r in full for r in quick)
    for n in (32, 256):
        for c, hw in [(64, 112), (64, 56), (256, 56), (128, 56), (128, 28), (512, 28), (256, 28), (256, 14),
                      (1024, 14), (512, 14), (512, 7), (2048, 7)]:
            for layout in LAYOUTS:
                for dt in ("f32", "f16", "bf16"):
                    assert ("resnet50", [n, c, hw, hw], layout, dt) in full, (n, c, hw, layout, dt)
    for dims in ([256, 4096], [1024, 1024], [4096, 1024], [65536, 512], [126000, 16], [215857, 64], [3136, 256],
                 [2, 2048], [64, 256, 1024], [16, 2, 112, 112, 112], [20, 6, 65536], [1, 64, 512, 512],
                 [32, 3, 224, 224], [64, 1000, 7, 7], [32, 17, 56, 56], [8, 64, 16, 56, 56]):
        assert any(r[1] == dims for r in full), dims

    # Overrides and custom shapes, as in bnbench's tests.
    rows = expand(lines, ["bn1d"], layouts=["nhwc"], dtypes=["f64"])
    assert len(rows) == 9 and all(r[3] == "f64" for r in rows)
    assert sum(r[2] == "nhwc" for r in rows) == 1
    rows = expand(lines, [], shapes=[[48, 96, 35, 35], [7, 3]])
    assert [list_line(r) for r in rows] == ["custom    48x96x35x35          nchw  f32", "custom    7x3                  nchw  f32"]

    ok = '[[group]]\nset = "hard"\nlayouts = ["nchw", "nhwc"]\ndtypes = ["f32", "f16"]\nshapes = [[2, 3, 4]]\n'
    assert parse_suite(ok + 'quick = [{ shape = [2, 3, 4], layouts = ["nhwc"] }]')[0]["quick"] == (["nhwc"], ["f32", "f16"])
    for change in ('set = "nope"', 'set = "full"', "shapes = [[32]]", "shapes = [[32, 0]]", "shapes = [[1, 8]]",
                   "shapes = [[-1, 8]]", "shapes = []", "shapes = [[32, 64]]", 'dtypes = ["f8"]', "layouts = []",
                   "fast = true", "quick = [{ shape = [2, 3, 5] }]", 'quick = [{ shape = [2, 3, 4], dtypes = ["bf16"] }]',
                   "quick = [{ shape = [2, 3, 4] }, { shape = [2, 3, 4] }]", "[[group]"):
        key = change.split(" ")[0]
        body = "".join(l + "\n" for l in ok.splitlines() if not l.startswith(key + " ")) + change + "\n"
        try:
            parse_suite(body)
        except SuiteError:
            pass
        else:
            raise AssertionError(f"accepted {change!r}")

    # Flags.
    a = parse_args(["--set", "resnet50,hard", "--dtype=f16", "--dtype", "bf16,f16", "--layout", "nhwc",
                    "--op", "backward,train_fwd", "--shape", "48,96,35,35", "--reps", "200"])
    assert a.sets == ["resnet50", "hard"] and a.dtypes == ["f16", "bf16"] and a.layouts == ["nhwc"]
    assert a.ops == ["train_fwd", "backward"] and a.shapes == [[48, 96, 35, 35]] and a.reps == 200
    assert parse_args(["--shape", "4,5"]).sets == []
    assert parse_args([]).sets == ["quick"]
    assert parse_args([]).deadline is None and parse_args(["--deadline", "90"]).deadline == 90
    for bad in (["--reps", "49"], ["--set", "tiny"], ["--dtype", "f8"], ["--shape", "48"], ["--op", "forward"],
                ["--layout", "nwhc"], ["--frobnicate"], ["--deadline", "0"], ["--deadline", "x"]):
        try:
            import contextlib
            import io

            with contextlib.redirect_stderr(io.StringIO()):
                parse_args(bad)
        except SystemExit as e:
            assert e.code == 2, bad
        else:
            raise AssertionError(f"accepted {bad}")

    # Bytes (the same numbers as bnbench's tests).
    numel = 25_690_112
    assert op_bytes("train_fwd", [32, 256, 56, 56], "f32") == 2 * numel * 4 + 8 * 256 * 4
    assert op_bytes("eval_fwd", [32, 256, 56, 56], "f32") == 2 * numel * 4 + 4 * 256 * 4
    assert op_bytes("backward", [32, 256, 56, 56], "f32") == 3 * numel * 4 + 5 * 256 * 4
    assert op_bytes("train_fwd", [32, 256, 56, 56], "f16") == 2 * numel * 2 + 8 * 256 * 4
    assert op_bytes("train_fwd", [4, 3], "f64") == 2 * 12 * 8 + 8 * 3 * 8
    d = [32, 256, 56, 56]
    assert op_bytes("frozen_eval", d, "f16") == 2 * numel * 2 + 2 * 256 * 4
    assert op_bytes("eval_relu", d, "f16") == op_bytes("eval_fwd", d, "f16")
    assert op_bytes("eval_add_relu", d, "f16") == 3 * numel * 2 + 4 * 256 * 4
    assert op_bytes("train_fwd_add_relu", d, "f16") == op_bytes("train_fwd", d, "f16") + numel * 2
    assert op_bytes("backward_relu", d, "f16") == 4 * numel * 2 + 5 * 256 * 4
    assert op_bytes("backward_add_relu", d, "f16") == 5 * numel * 2 + 5 * 256 * 4
    assert op_bytes("frozen_eval", [4, 3], "f64") == 2 * 12 * 8 + 2 * 3 * 8
    assert [op_kind(o) for o in FUSED_OPS] == ["frozen_eval"] + ["eval_fwd"] * 2 + ["train_fwd"] * 2 + ["backward"] * 2
    assert parse_args(["--op", "eval_add_relu,frozen_eval"]).ops == ["frozen_eval", "eval_add_relu"]
    assert parse_args([]).ops == OPS

    # A sample report (fake timings) over the quick set, written and read back.
    copy = 3000.0
    report = {"device": "self-test (no GPU)", "driver": "CUDA 13.0", "date": today(), "copy_gbps": copy,
              "tool": "torch_baseline.py --self-test", "rows": []}
    for impl_i, impl in enumerate(IMPLS):
        for row_i, (_, dims, layout, dt) in enumerate(quick):
            for op_i, op in enumerate(OPS):
                us = 10.0 + 7.25 * row_i + 3.5 * op_i + 1.125 * impl_i
                report["rows"].append(result_row(impl, op, dims, layout, dt, us, us * 0.97, copy))
    path = json_path or os.path.join(tempfile.mkdtemp(), "selftest.json")
    write_report(path, report)
    with open(path, encoding="utf-8") as f:
        back = json.load(f)
    assert back["rows"] == report["rows"] and back["copy_gbps"] == copy
    for key in ("device", "driver", "date", "copy_gbps", "rows"):
        assert key in back
    print(f"self-test ok: {count('full')} suite rows, {len(report['rows'])} sample results written to {path}")
    return 0


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    if a.self_test:
        return self_test(a.json)
    rows = selected_rows(a)
    if a.list:
        for r in rows:
            print(list_line(r))
        print(f"{len(rows)} rows", file=sys.stderr)
        return 0
    if not rows:
        print("torch_baseline: no rows selected", file=sys.stderr)
        return 2
    return run_torch(a, rows)


if __name__ == "__main__":
    sys.exit(main())

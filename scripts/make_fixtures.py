#!/usr/bin/env python3
"""Writes the PyTorch golden fixtures in tests/fixtures/ (one command, any machine with
PyTorch and the safetensors package; a CPU is enough):

    python3 scripts/make_fixtures.py            # writes tests/fixtures/*.txt, *.safetensors

Each case runs a torch.nn.BatchNorm{1,2,3}d through a few steps (training forwards and
backwards, then an eval forward and backward) and records every input, output,
gradient and buffer, so that tests/fixtures.rs can replay the same steps on the CPU
backend, on the emulated kernels and on a GPU and compare.

Format (line based, whitespace separated; tests/common/fixtures.rs parses it):

    case NAME
    module 1|2|3                 BatchNorm1d/2d/3d
    dims N C ...                 the input's size
    format nchw|nhwc             memory order of every tensor below (nhwc: channel last)
    dtype f32|f64|f16|bf16       input type
    param f32|f64|f16|bf16       parameter and running-statistics type
    affine 0|1
    track 0|1
    momentum FLOAT|none
    eps FLOAT
    weight V...                  initial parameters (affine)
    bias V...
    step train|eval              then the step's tensors:
      x V...  dy V...  y V...  dx V...  dweight V...  dbias V...
      running_mean V...  running_var V...  num_batches_tracked K   (track; after the step)
    end

tests/fixtures/fold.txt holds BatchNorm folded into the layer before it (tests/fold.rs
parses it): per case kind conv|transposed|linear, dtype (the layer's), param (the
BatchNorm's), groups, wshape, eps, weight, bias (or none), bn_weight, bn_bias,
bn_running_mean, bn_running_var, then PyTorch's fused_weight and fused_bias.

tests/fixtures/fused.txt holds fused epilogue cases in the same format, with
`epilogue relu|add_relu` under the case (y = relu(bn(x)), or relu(bn(x) + z)) and, for
add_relu, each step's residual z and its gradient dz.

tests/fixtures/frozen.txt holds frozen BatchNorm cases in the same format: one eval
step whose running_mean / running_var are the buffers (written first), then x, dy, y
and dx.

Values are the shortest decimals that round back to the stored value in its dtype
(bf16 values are written through float32, exactly).
"""

import copy
import os
import sys

import numpy as np
import torch
import torch.nn as nn

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")

DTYPES = {"f32": torch.float32, "f64": torch.float64, "f16": torch.float16, "bf16": torch.bfloat16}


def fmt(t):
    """Shortest round-trip decimals of a flat tensor, in its own dtype."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    a = t.numpy().ravel()
    return " ".join(np.format_float_scientific(v, unique=True, trim="-") for v in a)


def to_memory_order(t, layout):
    """The tensor's values in the memory order of `layout` (channel last for nhwc)."""
    if layout == "nchw" or t.dim() == 1:
        return t.contiguous()
    perm = [0] + list(range(2, t.dim())) + [1]
    return t.permute(*perm).contiguous()


def from_memory_order(t, layout, dims):
    """A logical (N, C, ...) tensor whose storage is channel last when layout is nhwc."""
    if layout == "nchw":
        return t.reshape(dims)
    rest = dims[2:]
    stored = t.reshape([dims[0]] + rest + [dims[1]])
    perm = [0, stored.dim() - 1] + list(range(1, stored.dim() - 1))
    return stored.permute(*perm)


def channel_data(gen, dims, dtype, constant_channel=None):
    """Random input with a different mean and spread per channel."""
    n, c = dims[0], dims[1]
    x = torch.randn(dims, generator=gen, dtype=torch.float64)
    shape = [1, c] + [1] * (len(dims) - 2)
    mean = torch.linspace(-1.5, 2.0, c, dtype=torch.float64).reshape(shape)
    std = torch.linspace(0.5, 2.5, c, dtype=torch.float64).reshape(shape)
    x = x * std + mean
    if constant_channel is not None:
        x[:, constant_channel] = 3.0
    return x.to(dtype)


def run_case(f, name, module, dims, layout="nchw", dtype="f32", param=None, affine=True, track=True,
             momentum=0.1, eps=1e-5, steps=("train", "train", "eval"), seed=0, constant_channel=None,
             epilogue=None):
    """epilogue "relu" records relu(bn(x)), "add_relu" relu(bn(x) + z) with each step's z
    and its gradient dz, through autograd (the unfused ops in the input's dtype)."""
    param = param or dtype
    gen = torch.Generator().manual_seed(seed)
    cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[module]
    bn = cls(dims[1], eps=eps, momentum=momentum, affine=affine, track_running_stats=track)
    bn = bn.to(DTYPES[param])
    w = []
    f.write(f"case {name}\nmodule {module}\ndims {' '.join(map(str, dims))}\nformat {layout}\n")
    f.write(f"dtype {dtype}\nparam {param}\naffine {int(affine)}\ntrack {int(track)}\n")
    f.write(f"momentum {'none' if momentum is None else repr(momentum)}\neps {eps!r}\n")
    if epilogue:
        f.write(f"epilogue {epilogue}\n")
    if affine:
        with torch.no_grad():
            bn.weight.copy_(torch.rand(dims[1], generator=gen, dtype=torch.float64) + 0.5)
            bn.bias.copy_(torch.randn(dims[1], generator=gen, dtype=torch.float64))
        f.write(f"weight {fmt(bn.weight)}\nbias {fmt(bn.bias)}\n")
    for mode in steps:
        bn.train(mode == "train")
        logical = channel_data(gen, dims, DTYPES[dtype], constant_channel)
        x = from_memory_order(to_memory_order(logical, layout), layout, dims).detach().requires_grad_(True)
        dy = torch.randn(dims, generator=gen, dtype=torch.float64).to(DTYPES[dtype])
        if affine:
            bn.weight.grad = None
            bn.bias.grad = None
        z = None
        if epilogue == "add_relu":
            z = torch.randn(dims, generator=gen, dtype=torch.float64).to(DTYPES[dtype])
            z = from_memory_order(to_memory_order(z, layout), layout, dims).detach().requires_grad_(True)
            y = torch.relu(bn(x) + z)
        elif epilogue == "relu":
            y = torch.relu(bn(x))
        else:
            y = bn(x)
        (y.double() * dy.double()).sum().backward()
        f.write(f"step {mode}\n")
        f.write(f"x {fmt(to_memory_order(x, layout))}\n")
        if z is not None:
            f.write(f"z {fmt(to_memory_order(z, layout))}\n")
            f.write(f"dz {fmt(to_memory_order(z.grad, layout))}\n")
        f.write(f"dy {fmt(to_memory_order(dy, layout))}\n")
        f.write(f"y {fmt(to_memory_order(y, layout))}\n")
        f.write(f"dx {fmt(to_memory_order(x.grad, layout))}\n")
        if affine:
            f.write(f"dweight {fmt(bn.weight.grad)}\ndbias {fmt(bn.bias.grad)}\n")
        if track:
            f.write(f"running_mean {fmt(bn.running_mean)}\nrunning_var {fmt(bn.running_var)}\n")
            f.write(f"num_batches_tracked {int(bn.num_batches_tracked)}\n")
    f.write("end\n")


class FrozenBatchNorm(nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d's forward, for any rank (torchvision is not
    a dependency; its forward is these four lines): scale and shift computed in the
    buffers' dtype, then x * scale + shift."""

    def __init__(self, c, eps, dtype):
        super().__init__()
        for name in ("weight", "bias", "running_mean", "running_var"):
            self.register_buffer(name, torch.zeros(c, dtype=dtype))
        self.eps = eps

    def forward(self, x):
        shape = [1, -1] + [1] * (x.dim() - 2)
        scale = self.weight.reshape(shape) * (self.running_var.reshape(shape) + self.eps).rsqrt()
        shift = self.bias.reshape(shape) - self.running_mean.reshape(shape) * scale
        return x * scale + shift


def frozen_case(f, name, module, dims, layout="nchw", dtype="f32", param=None, eps=1e-5, seed=0):
    """A frozen BatchNorm's forward and input gradient. Buffers are written under the
    case (weight, bias) and its one eval step (running_mean, running_var); y is
    torchvision's result in the promoted dtype, rounded to the input's."""
    param = param or dtype
    gen = torch.Generator().manual_seed(seed)
    c = dims[1]
    bn = FrozenBatchNorm(c, eps, DTYPES[param])
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
        bn.running_mean.copy_(torch.randn(c, generator=gen, dtype=torch.float64) * 2)
        bn.running_var.copy_(torch.rand(c, generator=gen, dtype=torch.float64) * 2 + 0.25)
    logical = channel_data(gen, dims, DTYPES[dtype])
    x = from_memory_order(to_memory_order(logical, layout), layout, dims).detach().requires_grad_(True)
    dy = torch.randn(dims, generator=gen, dtype=torch.float64).to(DTYPES[dtype])
    y = bn(x)
    (y.double() * dy.double()).sum().backward()
    y = y.to(DTYPES[dtype])
    f.write(f"case {name}\nmodule {module}\ndims {' '.join(map(str, dims))}\nformat {layout}\n")
    f.write(f"dtype {dtype}\nparam {param}\neps {eps!r}\n")
    f.write(f"weight {fmt(bn.weight)}\nbias {fmt(bn.bias)}\nstep eval\n")
    f.write(f"running_mean {fmt(bn.running_mean)}\nrunning_var {fmt(bn.running_var)}\n")
    for key, t in (("x", x), ("dy", dy), ("y", y), ("dx", x.grad)):
        f.write(f"{key} {fmt(to_memory_order(t, layout))}\n")
    f.write("end\n")


def fold_reference(kind, conv, bn):
    """The folded weight and bias of `conv` (a Conv*d, ConvTranspose*d or Linear) and the
    eval BatchNorm after it: torch.nn.utils.fusion's functions where they apply; for a
    grouped transposed convolution, which fuse_conv_bn_eval cannot take, the same
    formula with the output channel of weight[i, j] being (i // (in / groups)) *
    (out / groups) + j."""
    from torch.nn.utils import fusion
    if kind == "linear":
        fused = fusion.fuse_linear_bn_eval(conv, bn)
        return fused.weight, fused.bias
    if kind == "conv" or conv.groups == 1:
        fused = fusion.fuse_conv_bn_eval(conv, bn, transpose=(kind == "transposed"))
        return fused.weight, fused.bias
    w = conv.weight
    factor = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    ipg, opg = w.shape[0] // conv.groups, w.shape[1]
    rows = [factor[(i // ipg) * opg:(i // ipg + 1) * opg] for i in range(w.shape[0])]
    scale = torch.stack(rows).reshape([w.shape[0], opg] + [1] * (w.dim() - 2))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    return (w * scale).to(w.dtype), ((bias - bn.running_mean) * factor + bn.bias).to(w.dtype)


def fold_case(f, name, kind, layer, bn, x, dtype="f32", param=None):
    """Writes one folding case, after checking in PyTorch that the folded layer computes
    what the layer followed by the BatchNorm computes on `x`."""
    param = param or dtype
    gen = torch.Generator().manual_seed(len(name))
    c = bn.num_features
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
        bn.running_mean.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(c, generator=gen, dtype=torch.float64) + 0.25)
    layer.eval()
    bn.eval()
    with torch.no_grad():
        w, b = fold_reference(kind, layer, bn)
        # the folded layer's output against layer-then-BN, evaluated in f64
        ref_layer = copy.deepcopy(layer).double()
        want = bn.double()(ref_layer(x.double()))
        ref_layer.weight.copy_(w.double())
        if ref_layer.bias is None:
            ref_layer.bias = nn.Parameter(b.double())
        else:
            ref_layer.bias.copy_(b.double())
        got = ref_layer(x.double())
        err = ((got - want).norm() / want.norm()).item()
        assert err < 1e-5, (name, err)  # the fold was computed in f32
        layer.to(DTYPES[dtype])
        bn.to(DTYPES[param])
        w, b = fold_reference(kind, layer, bn)
    groups = getattr(layer, "groups", 1)
    f.write(f"case {name}\nkind {kind}\ndtype {dtype}\nparam {param}\ngroups {groups}\n")
    f.write(f"wshape {' '.join(map(str, layer.weight.shape))}\neps {bn.eps!r}\n")
    f.write(f"weight {fmt(layer.weight)}\n")
    f.write(f"bias {fmt(layer.bias) if layer.bias is not None else 'none'}\n")
    for key in ("weight", "bias", "running_mean", "running_var"):
        f.write(f"bn_{key} {fmt(getattr(bn, key))}\n")
    f.write(f"fused_weight {fmt(w)}\nfused_bias {fmt(b)}\nend\n")


def write_fold():
    """fold.txt: BatchNorm folded into the layer before it, on real layer shapes."""
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(4)
    x2 = lambda c, hw: torch.randn(2, c, hw, hw, generator=gen)
    with open(os.path.join(OUT, "fold.txt"), "w") as f:
        f.write(HEADER)
        # ResNet-50's stem: 7x7 stride 2, no bias
        fold_case(f, "resnet50_conv1", "conv", nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                  x2(3, 16))
        fold_case(f, "depthwise3x3", "conv", nn.Conv2d(32, 32, 3, 1, 1, groups=32, bias=False),
                  nn.BatchNorm2d(32), x2(32, 6))
        fold_case(f, "grouped_with_bias", "conv", nn.Conv2d(16, 12, 3, 1, 1, groups=4), nn.BatchNorm2d(12),
                  x2(16, 5))
        fold_case(f, "conv1d", "conv", nn.Conv1d(4, 8, 3), nn.BatchNorm1d(8), torch.randn(2, 4, 9, generator=gen))
        fold_case(f, "conv3d", "conv", nn.Conv3d(3, 6, 2, bias=False), nn.BatchNorm3d(6),
                  torch.randn(2, 3, 4, 4, 4, generator=gen))
        fold_case(f, "transposed", "transposed", nn.ConvTranspose2d(16, 8, 4, 2, 1, bias=False),
                  nn.BatchNorm2d(8), x2(16, 4))
        fold_case(f, "transposed_grouped", "transposed", nn.ConvTranspose2d(8, 6, 3, groups=2),
                  nn.BatchNorm2d(6), x2(8, 4))
        fold_case(f, "linear_head", "linear", nn.Linear(64, 10), nn.BatchNorm1d(10),
                  torch.randn(4, 64, generator=gen))
        fold_case(f, "depthwise3x3_f16", "conv", nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False),
                  nn.BatchNorm2d(16), x2(16, 6), dtype="f16")
        fold_case(f, "conv_bf16", "conv", nn.Conv2d(8, 16, 3, 1, 1), nn.BatchNorm2d(16), x2(8, 5), dtype="bf16")
        fold_case(f, "conv_f16_bn_f32", "conv", nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), x2(8, 5),
                  dtype="f16", param="f32")
        fold_case(f, "transposed_f64", "transposed", nn.ConvTranspose2d(6, 4, 3, 1, 1), nn.BatchNorm2d(4),
                  x2(6, 4), dtype="f64")
        fold_case(f, "linear_f16", "linear", nn.Linear(32, 8, bias=False), nn.BatchNorm1d(8),
                  torch.randn(4, 32, generator=gen), dtype="f16")


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock, small: conv-BN-ReLU, conv-BN, + shortcut, ReLU."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + identity)


class SmallNet(nn.Module):
    """A torchvision-style CNN: a stem, two residual stages, a BatchNorm1d head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 12, stride=2))
        self.fc = nn.Linear(12, 10)
        self.bn_head = nn.BatchNorm1d(10)
        self.out = nn.Linear(10, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.out(torch.relu(self.bn_head(self.fc(x))))


def write_cnn():
    """cnn.safetensors: SmallNet's state dict after a few training steps on the CPU (so
    the running statistics are not the defaults), as safetensors.torch.save_file writes
    it; cnn_bf16.safetensors: the same in bf16; cnn_layers.safetensors: for a fixed
    input in eval mode, every BatchNorm layer's input and output ("{prefix}.input",
    "{prefix}.output"), recorded by forward hooks."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = SmallNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for _ in range(5):
        x = torch.randn(6, 3, 12, 12) * 1.5 + 0.5
        loss = net(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, os.path.join(OUT, "cnn.safetensors"))
    save_file({k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous()
               for k, v in net.state_dict().items()}, os.path.join(OUT, "cnn_bf16.safetensors"))
    records = {}

    def hook(name):
        def record(module, inputs, output):
            records[f"{name}.input"] = inputs[0].detach().contiguous()
            records[f"{name}.output"] = output.detach().contiguous()
        return record

    for name, m in net.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.register_forward_hook(hook(name))
    with torch.no_grad():
        net(torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1)))
    save_file(records, os.path.join(OUT, "cnn_layers.safetensors"))


HEADER = f"# Generated by scripts/make_fixtures.py with torch {torch.__version__}; do not edit.\n"


def main():
    os.makedirs(OUT, exist_ok=True)
    header = HEADER
    # Modules, modes and options, f32 (the foundation's fixtures).
    with open(os.path.join(OUT, "modules_f32.txt"), "w") as f:
        f.write(header)
        run_case(f, "bn1d_nc", 1, [8, 3], seed=1)
        run_case(f, "bn1d_ncl", 1, [4, 3, 5], seed=2)
        run_case(f, "bn1d_one_sample_three_values", 1, [1, 4, 3], seed=3)
        run_case(f, "bn2d", 2, [2, 3, 4, 5], seed=4)
        run_case(f, "bn2d_no_affine", 2, [2, 3, 4, 5], affine=False, seed=5)
        run_case(f, "bn2d_momentum_none", 2, [2, 3, 3, 3], momentum=None,
                 steps=("train", "train", "train", "eval"), seed=6)
        run_case(f, "bn2d_no_running_stats", 2, [3, 2, 3, 3], track=False, seed=7)
        run_case(f, "bn2d_constant_channel_eps", 2, [2, 3, 3, 4], eps=1e-3, constant_channel=1, seed=8)
        run_case(f, "bn3d", 3, [2, 2, 3, 3, 4], seed=9)
        run_case(f, "bn3d_momentum_none_no_affine", 3, [2, 3, 2, 2, 3], momentum=None, affine=False, seed=10)
    # Dtypes and memory formats (the dtype issue's fixtures).
    with open(os.path.join(OUT, "dtypes_formats.txt"), "w") as f:
        f.write(header)
        run_case(f, "bn2d_f16", 2, [2, 3, 4, 5], dtype="f16", seed=11)
        run_case(f, "bn2d_f16_f32", 2, [2, 3, 4, 5], dtype="f16", param="f32", seed=12)
        run_case(f, "bn2d_bf16", 2, [2, 3, 4, 5], dtype="bf16", seed=13)
        run_case(f, "bn2d_bf16_f32", 2, [2, 3, 4, 5], dtype="bf16", param="f32", seed=14)
        run_case(f, "bn2d_f64", 2, [2, 3, 4, 5], dtype="f64", seed=15)
        run_case(f, "bn1d_f64_momentum_none", 1, [6, 4], dtype="f64", momentum=None, seed=16)
        run_case(f, "bn2d_nhwc", 2, [2, 3, 4, 5], layout="nhwc", seed=17)
        run_case(f, "bn3d_ndhwc", 3, [2, 3, 2, 3, 4], layout="nhwc", seed=18)
        run_case(f, "bn2d_nhwc_f16_f32", 2, [2, 5, 3, 4], layout="nhwc", dtype="f16", param="f32", seed=19)
        run_case(f, "bn2d_nhwc_bf16", 2, [3, 4, 3, 3], layout="nhwc", dtype="bf16", seed=20)
        run_case(f, "bn1d_nlc", 1, [3, 4, 6], layout="nhwc", seed=21)
        run_case(f, "bn2d_nhwc_f64_no_affine", 2, [2, 3, 3, 3], layout="nhwc", dtype="f64", affine=False, seed=22)
    # Fused epilogues through autograd: relu(bn(x)) and relu(bn(x) + z) (the inference
    # issue's fixtures).
    with open(os.path.join(OUT, "fused.txt"), "w") as f:
        f.write(header)
        for i, (t, p) in enumerate([("f32", "f32"), ("f64", "f64"), ("f16", "f16"), ("bf16", "bf16"),
                                    ("f16", "f32"), ("bf16", "f32")]):
            run_case(f, f"relu2d_{t}_{p}", 2, [2, 3, 4, 5], dtype=t, param=p, seed=70 + i,
                     epilogue="relu")
            run_case(f, f"add_relu2d_nhwc_{t}_{p}", 2, [2, 5, 3, 4], layout="nhwc", dtype=t, param=p,
                     seed=80 + i, epilogue="add_relu")
        run_case(f, "add_relu2d", 2, [3, 4, 3, 3], seed=90, epilogue="add_relu")
        run_case(f, "relu1d_nc", 1, [8, 3], seed=91, epilogue="relu")
        run_case(f, "add_relu3d_no_affine", 3, [2, 3, 2, 2, 3], affine=False, seed=92, epilogue="add_relu")
        run_case(f, "relu2d_nhwc_momentum_none", 2, [2, 4, 3, 3], layout="nhwc", momentum=None,
                 seed=93, epilogue="relu")
    # Frozen BatchNorm, torchvision's formula (the inference issue's fixtures).
    with open(os.path.join(OUT, "frozen.txt"), "w") as f:
        f.write(header)
        for i, (t, p) in enumerate([("f32", "f32"), ("f64", "f64"), ("f16", "f16"), ("bf16", "bf16"),
                                    ("f16", "f32"), ("bf16", "f32")]):
            frozen_case(f, f"frozen2d_{t}_{p}", 2, [2, 5, 3, 4], dtype=t, param=p, seed=40 + i)
            frozen_case(f, f"frozen2d_nhwc_{t}_{p}", 2, [2, 5, 3, 4], layout="nhwc", dtype=t, param=p,
                        seed=50 + i)
        frozen_case(f, "frozen1d", 1, [6, 4], seed=60)
        frozen_case(f, "frozen1d_ncl", 1, [3, 4, 5], eps=1e-3, seed=61)
        frozen_case(f, "frozen3d_ndhwc", 3, [2, 3, 2, 3, 2], layout="nhwc", seed=62)
    # BatchNorm folded into the layer before it (the inference issue's fixtures).
    write_fold()
    # PyTorch weights in .safetensors (the ecosystem issue's fixtures).
    write_cnn()
    print(f"wrote fixtures to {os.path.normpath(OUT)}", file=sys.stderr)


if __name__ == "__main__":
    main()

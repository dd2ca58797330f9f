"""Layers as they appear in models, forward + backward, in the variants of
benchmarks/variants.py.

  bn_relu      BatchNorm2d -> ReLU(inplace)                     (every conv-BN-ReLU)
  bn_add_relu  BatchNorm2d -> += identity -> ReLU(inplace)       (a residual block's end)
  basic_block  torchvision.models.resnet.BasicBlock(C, C)       (ResNet-18/34)
  bottleneck   torchvision.models.resnet.Bottleneck(C, C // 4)  (ResNet-50/101/152)

Shapes are the input's (N x C x H x W), ResNet-50's at batch 16 by default.  Gradients are
taken with respect to the inputs and every parameter; before timing, each variant's output
and gradients are compared with a float64 computation, beside native eager's.

Under torch.compile a layer measured alone is the pessimistic case: with nothing after the
ReLU that keeps its output, AOTAutograd saves ReLU's mask as a bool tensor, whose store and
load Inductor 2.13 generates as scalar loops on x86 (benchmarks/COMPILE.md); inside a
network, where a convolution keeps the ReLU's output anyway, the mask is recomputed from it.
"""
import copy
import os
import sys

import torch

import batchnorm_ext
from harness import (check_variant, fuse_missing, fused_functional_missing, interleaved, note,
                     parse_shape, progress, relative_error)
from variants import COMPILED, VARIANTS, compile_module, compile_with_backend

KINDS = ["bn_relu", "bn_add_relu", "basic_block", "bottleneck"]
# ResNet-50 at batch 16 (224x224 input): BN -> ReLU in the stem and inside the bottlenecks,
# BN -> add -> ReLU at each bottleneck's end; ResNet-18's basic blocks.
SHAPES = {
    "bn_relu": ["16x64x112x112", "16x64x56x56", "16x128x28x28", "16x256x14x14", "16x512x7x7"],
    "bn_add_relu": ["16x256x56x56", "16x512x28x28", "16x1024x14x14", "16x2048x7x7"],
    "basic_block": ["16x64x56x56", "16x128x28x28", "16x256x14x14", "16x512x7x7"],
    "bottleneck": ["16x256x56x56", "16x512x28x28", "16x1024x14x14", "16x2048x7x7"],
}


def torchvision():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "tests"))
    import zoo
    return zoo.torchvision()


class BNReLU(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(channels)
        self.relu = torch.nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(x))


class BNAddReLU(torch.nn.Module):
    """The end of torchvision's blocks: out = bn(x); out += identity; relu(out)."""

    def __init__(self, channels):
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(channels)
        self.relu = torch.nn.ReLU(inplace=True)

    def forward(self, x, identity):
        out = self.bn(x)
        out += identity
        return self.relu(out)


class FusedBNAct(torch.nn.Module):
    """The same layer through the fused functional: act(bn(x) + residual), one call."""

    def __init__(self, layer):
        super().__init__()
        self.bn = layer.bn

    def forward(self, x, identity=None):
        bn = self.bn
        return batchnorm_ext.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                        bn.training, bn.momentum, bn.eps,
                                        residual=identity, activation="relu")


def build_native(kind, channels, tv):
    if kind == "bn_relu":
        return BNReLU(channels)
    if kind == "bn_add_relu":
        return BNAddReLU(channels)
    if kind == "basic_block":
        return tv.models.resnet.BasicBlock(channels, channels)
    if kind == "bottleneck":
        return tv.models.resnet.Bottleneck(channels, channels // 4)
    raise ValueError(kind)


class LayerCase:
    """One layer kind at one input shape, layout and dtype: the variants' modules and one
    training step (forward + backward) of each."""

    def __init__(self, kind, shape, layout, dtype, tv):
        self.kind, self.shape, self.layout, self.dtype = kind, shape, layout, dtype
        fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
        # bfloat16-mixed: bfloat16 activations, float32 parameters, as under autocast
        # (blocks run under torch.autocast; lone layers take the bfloat16 input as is).
        act_dtype = torch.bfloat16 if dtype == "bfloat16-mixed" else torch.float32
        self.autocast = dtype == "bfloat16-mixed" and kind in ("basic_block", "bottleneck")
        native = build_native(kind, shape[1], tv).to(memory_format=fmt)
        with torch.no_grad():  # BN parameters away from 1 / 0, as after some training
            for m in native.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.2)
        native.train()
        self.x = (torch.randn(shape) * 2 + 0.5).to(act_dtype).contiguous(memory_format=fmt)
        self.inputs = [self.x.requires_grad_()]
        if kind == "bn_add_relu":
            self.inputs.append(torch.randn(shape).to(act_dtype).contiguous(memory_format=fmt)
                               .requires_grad_())
        self.grad = torch.randn(shape).to(act_dtype).contiguous(memory_format=fmt)
        self.names = [name for name, _ in native.named_parameters()]
        self.modules = {"native": native}  # variant -> the module that holds the parameters
        self.callables = {"native": native}
        self.notes = {}
        ours = batchnorm_ext.convert_model(copy.deepcopy(native))
        self.modules["ours"] = self.callables["ours"] = ours
        self.modules["native_compiled"] = native
        self.callables["native_compiled"] = compile_module(native)
        ours_c = batchnorm_ext.convert_model(copy.deepcopy(native))
        self.modules["ours_compiled"] = ours_c
        self.callables["ours_compiled"] = compile_module(ours_c)
        if kind in ("bn_relu", "bn_add_relu"):
            why = fused_functional_missing(batchnorm_ext)
            make = lambda: FusedBNAct(batchnorm_ext.convert_model(copy.deepcopy(native)))  # noqa: E731
        else:
            why = fuse_missing(batchnorm_ext)
            make = lambda: batchnorm_ext.fuse(batchnorm_ext.convert_model(copy.deepcopy(native)))  # noqa: E731
        native_b = copy.deepcopy(native)
        self.modules["native_backend"] = native_b
        self.callables["native_backend"] = compile_with_backend(native_b)
        if why:
            self.notes["ours_fused"] = self.notes["fused_compiled"] = why
        else:
            fused = make()
            self.modules["ours_fused"] = self.callables["ours_fused"] = fused
            fused_c = make()
            self.modules["fused_compiled"] = fused_c
            self.callables["fused_compiled"] = compile_module(fused_c)

    def step(self, variant):
        """A closure: forward + backward; returns (output, grads of inputs and parameters)."""
        if variant not in self.callables:
            return None
        fn, params = self.callables[variant], dict(self.modules[variant].named_parameters())
        wrt = self.inputs + [params[name] for name in self.names]
        grad, inputs, autocast = self.grad, self.inputs, self.autocast

        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = fn(*inputs)
            return (out,) + torch.autograd.grad(out, wrt, grad)
        return run

    def oracle(self):
        """Output and gradients of the same step in float64 (no autocast), computed once."""
        if not hasattr(self, "_oracle"):
            module = copy.deepcopy(self.modules["native"]).double()
            params = dict(module.named_parameters())
            inputs = [t.detach().double().requires_grad_() for t in self.inputs]
            out = module(*inputs)
            self._oracle = (out,) + torch.autograd.grad(
                out, inputs + [params[n] for n in self.names], self.grad.double())
        return self._oracle

    def error(self, variant):
        """The worst relative error (norms) of the output and the gradients against float64;
        running statistics restored after."""
        reference = self.oracle()
        states = [copy.deepcopy(m.state_dict()) for m in self.modules.values()]
        result = self.step(variant)()
        for m, state in zip(self.modules.values(), states):
            m.load_state_dict(state)
        return max(relative_error(r, o) for r, o in zip(reference, result))

    def check(self, variant, errors):
        """The variant's output and gradients against float64, beside native eager's
        (harness.check_variant)."""
        if "native" not in errors:
            errors["native"] = self.error("native")
        errors[variant] = self.error(variant)
        check_variant(errors, variant, 5e-2 if self.dtype == "bfloat16-mixed" else 1e-3,
                      f"{self.kind} {self.describe()}")

    def describe(self):
        return f"{'x'.join(map(str, self.shape))} {self.layout} {self.dtype}"


def run_layers(args, alloc):
    """Rows for every kind x shape x layout x dtype, the five variants each."""
    import time

    torch.set_num_threads(args.threads)
    tv = torchvision()
    cases = [(kind, shape, layout, dtype) for kind in args.layers
             for shape in (args.shapes or SHAPES[kind])
             for layout in args.layouts for dtype in args.dtypes]
    rows = []
    bar = progress(cases, f"layers, allocator={alloc}", "case")
    for kind, shape, layout, dtype in bar:
        torch._dynamo.reset()
        torch.manual_seed(0)
        case = LayerCase(kind, parse_shape(shape), layout, dtype, tv)
        compile_s, errors = {}, {}
        for variant in VARIANTS[1:]:
            if case.step(variant) is None:
                continue
            note(bar, f"{kind} {shape}: checking {variant}")
            start = time.perf_counter()
            case.check(variant, errors)  # the first call compiles the compiled variants
            if variant in COMPILED:
                compile_s[variant] = time.perf_counter() - start
        note(bar, f"{kind} {shape}: timing")
        times = interleaved([case.step(v) for v in VARIANTS], args.rounds, args.min_run_time)
        row = {"kind": "layers", "case": kind, "shape": shape, "layout": layout, "dtype": dtype,
               "mode": "train_fwd_bwd", "allocator": alloc}
        for variant, t in zip(VARIANTS, times):
            row[f"{variant}_ms"] = None if t is None else t * 1e3
        row["speedup"] = row["native_ms"] / row["ours_ms"]
        row["notes"] = case.notes
        row["compile_s"] = compile_s
        row["check_rel_error"] = errors
        rows.append(row)
        del case
    torch._dynamo.reset()
    return rows

"""Measures fused epilogues for page 10 of the tutorial: forward + backward of BN -> ReLU
and of BN -> add -> ReLU at ResNet-50's shapes, and a training step of ResNet-50, each
native, ours (convert_model) and ours fused (batch_norm(..., residual=, activation=) for a
layer, fuse() for the model); one thread, float32, NCHW, interleaved in one process, warm
allocator (run as below).  Writes fused.md (the table the page shows) next to this script
and updates the page.

    MALLOC_MMAP_THRESHOLD_=1000000000000 MALLOC_TRIM_THRESHOLD_=100000000000 \\
        python docs/tutorial/figures/measure_fused.py
"""
import copy
import os
import platform
import re
import statistics
import sys

import torch
import torch.utils.benchmark
from torch.utils._pytree import tree_leaves

import batchnorm_ext

HERE = os.path.dirname(os.path.abspath(__file__))
PAGE = os.path.join(HERE, "..", "10-fused-epilogues.md")
ROOT = os.path.join(HERE, "..", "..", "..")
# (what, input shape): the layers at the shapes of a ResNet-50 bottleneck of the first stage
# at batch 16 (bn1 and bn2 are followed by a ReLU, bn3 by the add and a ReLU); the model
# at batch 8 on 112x112 images.
CASES = [("BN → ReLU", (16, 64, 56, 56)), ("BN → add → ReLU", (16, 256, 56, 56)),
         ("ResNet-50 training step", (8, 3, 112, 112))]
VARIANTS = ["native", "ours", "ours, fused"]
# Interleaved rounds: five, not page 6's three, because a layer's time on a shared machine
# jumps between two levels and three rounds can take the median from either.
ROUNDS = 5


def median_ms(fn):
    timer = torch.utils.benchmark.Timer("fn()", globals={"fn": fn}, num_threads=1)
    return timer.blocked_autorange(min_run_time=0.2).median * 1e3


class Layer(torch.nn.Module):
    """bn(x), then + identity if given, then ReLU, as torchvision's blocks write it."""

    def __init__(self, channels):
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(channels)
        self.relu = torch.nn.ReLU(inplace=True)

    def forward(self, x, identity=None):
        out = self.bn(x)
        if identity is not None:
            out += identity
        return self.relu(out)


def fused_layer(layer):
    """The same layer on our fused operator: relu(bn(x) + identity) in one call."""
    bn = batchnorm_ext.convert_model(copy.deepcopy(layer.bn))

    def forward(x, identity=None):
        return batchnorm_ext.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                        True, bn.momentum, bn.eps, residual=identity,
                                        activation="relu")
    forward.bn = bn
    return forward


def layer_steps(what, shape):
    """Forward + backward of each variant: (output, gradients of the inputs and the batch
    norm's weight and bias)."""
    torch.manual_seed(0)
    native = Layer(shape[1])
    inputs = [torch.randn(shape).requires_grad_()]
    if "add" in what:
        inputs.append(torch.randn(shape).requires_grad_())
    grad = torch.randn(shape)
    ours = batchnorm_ext.convert_model(copy.deepcopy(native))
    fused = fused_layer(native)
    calls = {"native": (native, native.bn), "ours": (ours, ours.bn),
             "ours, fused": (fused, fused.bn)}

    def step(call, bn):
        def run():
            out = call(*inputs)
            return (out,) + torch.autograd.grad(out, inputs + [bn.weight, bn.bias], grad)
        return run
    return {v: step(*c) for v, c in calls.items()}


def model_steps(shape):
    """A training step of each variant: forward, cross-entropy, backward, SGD."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    try:
        import zoo
    finally:
        sys.path.pop(0)
    torch.manual_seed(0)
    native = zoo.torchvision().models.resnet50(num_classes=100)
    models = {"native": native,
              "ours": batchnorm_ext.convert_model(copy.deepcopy(native)),
              "ours, fused": batchnorm_ext.fuse(copy.deepcopy(native))}
    x, target = torch.randn(shape), torch.randint(0, 100, (shape[0],))

    def step(model):
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

        def run():
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x), target)
            loss.backward()
            optimizer.step()
            return loss
        return run
    return {v: step(m) for v, m in models.items()}


def check(steps, what):
    """Before timing: each variant's first step gives native's results (the models' first
    losses, from the same weights; the layers' outputs and gradients)."""
    results = {v: step() for v, step in steps.items()}
    for v in VARIANTS[1:]:
        for ours, native in zip(tree_leaves(results[v]),
                                tree_leaves(results["native"])):
            torch.testing.assert_close(ours, native, rtol=1e-3, atol=1e-3,
                                       msg=lambda m: f"{what}, {v}: {m}")


def main():
    torch.set_num_threads(1)
    lines = ["| forward + backward | shape | " + " | ".join(VARIANTS) + " |",
             "|---|---|" + "---|" * len(VARIANTS)]
    for what, shape in CASES:
        steps = model_steps(shape) if "step" in what else layer_steps(what, shape)
        check(steps, what)
        times = {v: [] for v in VARIANTS}
        for _ in range(ROUNDS):  # interleaved
            for v in VARIANTS:
                times[v].append(median_ms(steps[v]))
        t = {k: statistics.median(v) for k, v in times.items()}
        lines.append(f"| {what} | {'x'.join(map(str, shape))} | {t['native']:.2f} ms | " +
                     " | ".join(f"{t[v]:.2f} ms ({t['native'] / t[v]:.2f}x)" for v in VARIANTS[1:])
                     + " |")
    cpu = platform.processor()
    with open("/proc/cpuinfo") as f:
        cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    lines.append("")
    lines.append(f"<sub>Measured with `docs/tutorial/figures/measure_fused.py`: torch "
                 f"{torch.__version__}, {cpu}, kernels {batchnorm_ext.cpu_capability()}, "
                 f"1 thread, float32, NCHW, warm allocator, medians of interleaved runs; "
                 f"speed-up over native in brackets.</sub>")
    table = "\n".join(lines)
    with open(os.path.join(HERE, "fused.md"), "w") as f:
        f.write(table + "\n")
    page = open(PAGE).read()
    page = re.sub(r"<!-- fused -->\n.*?<!-- /fused -->",
                  lambda m: "<!-- fused -->\n" + table + "\n<!-- /fused -->", page, flags=re.S)
    with open(PAGE, "w") as f:
        f.write(page)
    print(table)


if __name__ == "__main__":
    main()

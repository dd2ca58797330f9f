"""Where a training step's time goes: torch.profiler's self CPU time of one torchvision
model's training step (forward, cross-entropy loss, backward, SGD), grouped into
convolutions, batch norms, ReLU/add and the rest, for native and for ours (converted and
fused).  The batch norms' and ReLU/adds' share of native's step bounds what any batch norm
can gain on that model.  One thread; run with the warm allocator as bench.py does:

    MALLOC_MMAP_THRESHOLD_=1000000000000 MALLOC_TRIM_THRESHOLD_=100000000000 \\
        python benchmarks/step_profile.py [resnet18|resnet50|...] [--batch 16] [--size 112]
"""
import argparse

import torch

import batchnorm_ext
from layers import torchvision

ELEMENTWISE = {"aten::relu", "aten::relu_", "aten::threshold_backward", "aten::add",
               "aten::add_", "aten::clamp_min", "aten::clamp_min_"}


def group(name):
    if "conv" in name or "mkldnn" in name:
        return "convolution"
    if "batch_norm" in name or "batchnorm" in name:
        return "batch norm"
    return "ReLU, add" if name in ELEMENTWISE else "other"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="resnet18")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tv = torchvision()
    for variant in ("native", "ours, fused"):
        torch.manual_seed(0)
        model = getattr(tv.models, args.model)(num_classes=100).train()
        if variant != "native":
            model = batchnorm_ext.fuse(batchnorm_ext.convert_model(model))
        sgd = torch.optim.SGD(model.parameters(), lr=1e-3)
        x = torch.randn(args.batch, 3, args.size, args.size)
        target = torch.randint(0, 100, (args.batch,))

        def step():
            sgd.zero_grad()
            torch.nn.functional.cross_entropy(model(x), target).backward()
            sgd.step()

        for _ in range(3):
            step()
        with torch.profiler.profile() as profile:
            for _ in range(args.steps):
                step()
        shares = {}
        for event in profile.key_averages():
            shares[group(event.key)] = shares.get(group(event.key), 0) + event.self_cpu_time_total
        total = sum(shares.values())
        print(f"{args.model} {variant}: {total / args.steps / 1e3:.1f} ms per step (profiled); "
              + ", ".join(f"{name} {100 * t / total:.0f}%" for name, t in sorted(shares.items())))


if __name__ == "__main__":
    main()

"""Where a training step's time goes: torch.profiler's self CPU time of one torchvision
model's training step (forward, cross-entropy loss, backward, SGD), grouped into
convolutions, batch norms, activations and adds, and the rest, for each variant of
benchmarks/variants.py (by default native, native compiled, ours fused, native under
backend=batchnorm_ext, ours fused compiled).  The share of batch norms, activations and
adds in native's eager step bounds what any batch norm can gain on that model.  Inductor's
generated kernels are profiled one by one (cpp.enable_kernel_profile) and grouped by their
names, which name the operators fused into them (a kernel that holds a batch norm counts
as batch norm).  One thread; run with the warm allocator as bench.py does:

    MALLOC_MMAP_THRESHOLD_=1000000000000 MALLOC_TRIM_THRESHOLD_=100000000000 \\
        python benchmarks/step_profile.py [resnet18|resnet50|...] [--batch 16] [--size 112]

--operators N adds a table of the N operators and kernels with the most self time (ms per
step), the variants side by side: where one variant loses to another (for resnet50 under
the backend against native compiled: NCHW convolutions against channels-last ones).
"""
import argparse
import copy

import torch

from layers import torchvision
from variants import VARIANTS, prepare

ELEMENTWISE = ("relu", "threshold_backward", "add", "clamp_min", "silu", "hardswish", "sigmoid",
               "mul")
DEFAULT_VARIANTS = ["native", "native_compiled", "ours_fused", "native_backend", "fused_compiled"]


def group(name):
    """The group of a profiler event: an ATen operator (aten::relu_), one of ours
    (batchnorm_ext::batch_norm_act_forward) or an Inductor kernel (cpp_fused_relu_3)."""
    name = name.lower()
    if "conv" in name or "mkldnn" in name:
        return "convolution"
    if "batch_norm" in name or "batchnorm" in name:
        return "batch norm"
    operator = name.split("::")[-1].removeprefix("cpp_fused_")
    if any(part in ELEMENTWISE for part in operator.strip("_").split("_")):
        return "activation, add"
    return "other"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="resnet18")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--layout", choices=["nchw", "nhwc"], default="nchw")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=DEFAULT_VARIANTS)
    parser.add_argument("--operators", type=int, default=0, metavar="N",
                        help="also list the N operators with the most self time, per variant")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tv = torchvision()
    fmt = torch.channels_last if args.layout == "nhwc" else torch.contiguous_format
    torch.manual_seed(0)
    native = getattr(tv.models, args.model)(num_classes=100).train().to(memory_format=fmt)
    x = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=fmt)
    target = torch.randint(0, 100, (args.batch,))
    per_operator = {}  # variant: {operator or kernel: ms per step}
    for variant in args.variants:
        model, call = prepare(variant, copy.deepcopy(native))
        sgd = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step():
            sgd.zero_grad()
            torch.nn.functional.cross_entropy(call(x), target).backward()
            sgd.step()

        with torch._inductor.config.patch({"cpp.enable_kernel_profile": True}):
            for _ in range(3):  # compiles the compiled variants
                step()
            with torch.profiler.profile() as profile:
                for _ in range(args.steps):
                    step()
        shares = {}
        for event in profile.key_averages():
            shares[group(event.key)] = shares.get(group(event.key), 0) + event.self_cpu_time_total
        per_operator[variant] = {event.key: event.self_cpu_time_total / args.steps / 1e3
                                 for event in profile.key_averages()}
        total = sum(shares.values())
        print(f"{args.model} {args.layout} {variant}: {total / args.steps / 1e3:.1f} ms per step "
              "(profiled); " + ", ".join(f"{name} {100 * t / total:.0f}%"
                                         for name, t in sorted(shares.items())), flush=True)
    if args.operators:
        print_operators(per_operator, args.operators)


def print_operators(per_operator, count):
    """The `count` operators with the most self time in any variant, ms per step."""
    names = set().union(*per_operator.values())
    top = sorted(names, key=lambda n: -max(times.get(n, 0.0) for times in per_operator.values()))
    print(f"\n{'operator (self time, ms per step)':60s}" + "".join(f"{v:>17s}" for v in per_operator))
    for name in top[:count]:
        print(f"{name[:60]:60s}" + "".join(f"{per_operator[v].get(name, 0.0):17.2f}" for v in per_operator))


if __name__ == "__main__":
    main()

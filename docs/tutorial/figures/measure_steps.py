"""Measures the effect of vectorization for page 6 of the tutorial: native BatchNorm2d
against batchnorm_ext's kernels built for each instruction set, training forward, one
thread, float32, interleaved in one process, warm allocator (run as below).  Writes
steps.md (the table the page shows) next to this script and updates the page.

    MALLOC_MMAP_THRESHOLD_=1000000000000 MALLOC_TRIM_THRESHOLD_=100000000000 \\
        python docs/tutorial/figures/measure_steps.py
"""
import os
import platform
import re
import statistics

import torch
import torch.utils.benchmark

import batchnorm_ext

HERE = os.path.dirname(os.path.abspath(__file__))
PAGE = os.path.join(HERE, "..", "06-making-it-fast.md")
CASES = [((16, 64, 56, 56), "nchw"), ((16, 64, 56, 56), "nhwc"), ((16, 3, 224, 224), "nhwc")]


def median_ms(fn):
    timer = torch.utils.benchmark.Timer("fn()", globals={"fn": fn}, num_threads=1)
    return timer.blocked_autorange(min_run_time=0.2).median * 1e3


def main():
    torch.set_num_threads(1)
    best = batchnorm_ext.cpu_capability()
    order = ["DEFAULT", "AVX2", "AVX512", "AVX512_BF16"]
    # float32 runs the same code in AVX512 and AVX512_BF16: the first three are enough.
    builds = order[:min(order.index(best), 2) + 1]
    lines = ["| shape | layout | native | " + " | ".join(f"ours, {b}" for b in builds) + " |",
             "|---|---|---|" + "---|" * len(builds)]
    for shape, layout in CASES:
        x = torch.randn(shape)
        if layout == "nhwc":
            x = x.contiguous(memory_format=torch.channels_last)
        native, ours = torch.nn.BatchNorm2d(shape[1]), batchnorm_ext.BatchNorm2d(shape[1])
        times = {"native": [], **{b: [] for b in builds}}
        for _ in range(3):  # interleaved rounds
            times["native"].append(median_ms(lambda: native(x)))
            for b in builds:
                batchnorm_ext.set_cpu_capability(b)
                times[b].append(median_ms(lambda: ours(x)))
        batchnorm_ext.set_cpu_capability(best)
        t = {k: statistics.median(v) for k, v in times.items()}
        lines.append(f"| {'x'.join(map(str, shape))} | {layout} | {t['native']:.2f} ms | " +
                     " | ".join(f"{t[b]:.2f} ms ({t['native'] / t[b]:.1f}x)" for b in builds) + " |")
    cpu = platform.processor()
    with open("/proc/cpuinfo") as f:
        cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    lines.append("")
    lines.append(f"<sub>Measured with `docs/tutorial/figures/measure_steps.py`: torch "
                 f"{torch.__version__}, {cpu}, 1 thread, warm allocator, medians of interleaved "
                 f"runs; speed-up over native in brackets.</sub>")
    table = "\n".join(lines)
    with open(os.path.join(HERE, "steps.md"), "w") as f:
        f.write(table + "\n")
    page = open(PAGE).read()
    page = re.sub(r"<!-- steps -->\n.*?<!-- /steps -->",
                  lambda m: "<!-- steps -->\n" + table + "\n<!-- /steps -->", page, flags=re.S)
    with open(PAGE, "w") as f:
        f.write(page)
    print(table)


if __name__ == "__main__":
    main()

"""Prints a results file of bench.py as the compact Markdown tables of the README.

    python benchmarks/summary.py benchmarks/results/default.json
"""
import json
import math
import sys

COLUMNS = [("nchw", "float32", "train"), ("nchw", "float32", "eval"),
           ("nchw", "float32", "train_fwd_bwd"), ("nhwc", "float32", "train"),
           ("nhwc", "float32", "eval"), ("nhwc", "float32", "train_fwd_bwd"),
           ("nchw", "bfloat16", "train"), ("nhwc", "bfloat16", "train")]
TITLES = {"train": "train fwd", "eval": "eval", "train_fwd_bwd": "train fwd+bwd"}


def geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values))


def main(path):
    results = json.load(open(path))
    rows, meta = results["rows"], results["meta"]
    print(f"`{meta['command']}` — torch {meta['torch']}, kernels {meta['kernels']}, "
          f"{meta['cpu']}, {meta['threads']} thread(s), {meta['date']}.\n")
    for alloc in dict.fromkeys(r["allocator"] for r in rows):
        cells = {(r["shape"], r["layout"], r["dtype"], r["mode"]): r for r in rows if r["allocator"] == alloc}
        columns = [c for c in COLUMNS if any(k[1:] == c for k in cells)]
        print(f"Speed-up over native (native ms / ours ms), **{alloc} allocator**:\n")
        print("| shape | " + " | ".join(f"{l} {d if d != 'float32' else ''} {TITLES[m]}".replace("  ", " ")
                                          for l, d, m in columns) + " |")
        print("|---|" + "---|" * len(columns))
        shapes = list(dict.fromkeys(k[0] for k in cells))
        for shape in shapes:
            print(f"| {shape} | " + " | ".join(
                f"{cells[(shape, *c)]['speedup']:.2f}x" if (shape, *c) in cells else "" for c in columns) + " |")
        print("| **geometric mean** | " + " | ".join(
            f"**{geomean([cells[(s, *c)]['speedup'] for s in shapes if (s, *c) in cells]):.2f}x**"
            for c in columns) + " |")
        big = [r for k, r in cells.items() if k[3] == "train" and k[2] == "float32" and r["MiB"] >= 16]
        if big:
            print("\nTraining forward of 16 MiB and more, ours / (x.sum() + y.copy_(x)) measured in the "
                  "same run: " + ", ".join(f"{r['shape']} {r['layout']} {r['ours_vs_floor']:.2f}" for r in big) + ".")
        print()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/default.json")

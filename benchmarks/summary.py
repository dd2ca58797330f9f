"""Prints a results file of bench.py as compact Markdown: the README's tables and, for the
op level, the tracked targets (geometric means over the default shapes).

    python benchmarks/summary.py                                  # benchmarks/results/default.json
    python benchmarks/summary.py benchmarks/results/run-20261126-120000/default.json
    python benchmarks/summary.py benchmarks/results/run-20261126-120000   # every .json in it
"""
import glob
import json
import math
import os
import sys

COLUMNS = [("nchw", "float32", "train"), ("nchw", "float32", "eval"),
           ("nchw", "float32", "train_fwd_bwd"), ("nhwc", "float32", "train"),
           ("nhwc", "float32", "eval"), ("nhwc", "float32", "train_fwd_bwd"),
           ("nchw", "bfloat16", "train"), ("nhwc", "bfloat16", "train"),
           ("nchw", "bfloat16-mixed", "train"), ("nhwc", "bfloat16-mixed", "train")]
TITLES = {"train": "train fwd", "eval": "eval", "train_fwd_bwd": "train fwd+bwd"}
MODES = ["train", "eval", "train_fwd_bwd"]
LAYOUTS_1D = ("nc", "ncl")
from variants import TITLES as VARIANT_TITLES, VARIANTS  # noqa: E402 (beside this file)
# The tracked geometric means are over the default shapes of at least this many values
# (the small (2, 3, 4, 4) call is tracked on its own).
TARGET_MIN_NUMEL = 100_000
TINY_SHAPE = "2x3x4x4"


def geomean(values):
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def numel(shape):
    return math.prod(int(s) for s in shape.split("x"))


def header(meta):
    kernels = f", kernels {meta['kernels']}" if "kernels" in meta else ""
    return (f"`{meta['command'].strip()}` — torch {meta['torch']}{kernels}, "
            f"{meta['cpu']}, {meta['threads']} thread(s), {meta['date']}"
            + (f", {meta['seconds']:.0f} s" if "seconds" in meta else "") + ".\n")


def fmt(x):
    return f"{x:.2f}x"


def op_tables(rows, meta, out):
    for alloc in dict.fromkeys(r["allocator"] for r in rows):
        cells = {(r["shape"], r["layout"], r["dtype"], r["mode"]): r for r in rows
                 if r["allocator"] == alloc}
        # BatchNorm2d/3d
        columns = [c for c in COLUMNS if any(k[1:] == c for k in cells)]
        shapes = list(dict.fromkeys(k[0] for k in cells if k[1] not in LAYOUTS_1D))
        if shapes and columns:
            out.append(f"Speed-up over native (native ms / ours ms), **{alloc} allocator**:\n")
            out.append("| shape | " + " | ".join(
                f"{l} {d if d != 'float32' else ''} {TITLES[m]}".replace("  ", " ")
                for l, d, m in columns) + " |")
            out.append("|---|" + "---|" * len(columns))
            for shape in shapes:
                out.append(f"| {shape} | " + " | ".join(
                    fmt(cells[(shape, *c)]["speedup"]) if (shape, *c) in cells else ""
                    for c in columns) + " |")
            out.append("| **geometric mean** | " + " | ".join(
                f"**{fmt(geomean(cells[(s, *c)]['speedup'] for s in shapes if (s, *c) in cells))}**"
                for c in columns) + " |")
            big = [r for k, r in cells.items() if k[3] == "train" and k[2] == "float32"
                   and r.get("MiB", 0) >= 16 and k[1] not in LAYOUTS_1D]
            if big:
                out.append("\nTraining forward of 16 MiB and more, ours / (x.sum() + y.copy_(x)) "
                           "measured in the same run: " + ", ".join(
                               f"{r['shape']} {r['layout']} {r['ours_vs_floor']:.2f}" for r in big) + ".")
            out.append("")
        # BatchNorm1d
        one_d = [k for k in cells if k[1] in LAYOUTS_1D]
        if one_d:
            cols = list(dict.fromkeys((k[2], k[3]) for k in one_d))
            cols.sort(key=lambda c: (c[0] != "float32", c[0], MODES.index(c[1])))
            out.append(f"BatchNorm1d, speed-up over native, **{alloc} allocator**:\n")
            out.append("| shape | " + " | ".join(
                f"{d if d != 'float32' else ''} {TITLES[m]}".strip() for d, m in cols) + " |")
            out.append("|---|" + "---|" * len(cols))
            for shape in dict.fromkeys(k[0] for k in one_d):
                layout = "nc" if shape.count("x") == 1 else "ncl"
                out.append(f"| {shape} | " + " | ".join(
                    fmt(cells[(shape, layout, d, m)]["speedup"]) if (shape, layout, d, m) in cells
                    else "" for d, m in cols) + " |")
            out.append("")
        out.extend(targets(rows, meta, alloc))


def targets(rows, meta, alloc):
    """The tracked figures: geometric means over the default BatchNorm2d shapes of
    >= 100k values, eval's worst shape, the (2, 3, 4, 4) call, each BatchNorm1d shape."""
    sel = [r for r in rows if r["allocator"] == alloc]
    default_2d = set(meta.get("default_shapes") or [r["shape"] for r in sel])
    default_1d = set(meta.get("default_shapes_1d") or [r["shape"] for r in sel])
    big = [r for r in sel if r["shape"] in default_2d and r["layout"] not in LAYOUTS_1D
           and numel(r["shape"]) >= TARGET_MIN_NUMEL]
    big_shapes = list(dict.fromkeys(r["shape"] for r in big))
    over = (f"geometric means over the {len(big_shapes)} default BatchNorm2d shapes of at least "
            f"{TARGET_MIN_NUMEL:,} values: {', '.join(big_shapes)}" if big_shapes else
            f"no default BatchNorm2d shape of at least {TARGET_MIN_NUMEL:,} values in this run")
    out = [f"**Tracked targets, {alloc} allocator** (speed-up = native ms / ours ms; {over}):\n"]

    def gm(layout, dtype, mode):
        picked = [r["speedup"] for r in big if (r["layout"], r["dtype"], r["mode"]) == (layout, dtype, mode)]
        return f"{fmt(geomean(picked))} ({len(picked)} shapes)" if picked else "not measured"
    out.append(f"- NCHW training forward + backward, float32: {gm('nchw', 'float32', 'train_fwd_bwd')}")
    out.append(f"- channels_last training forward, float32: {gm('nhwc', 'float32', 'train')}")
    out.append(f"- channels_last training forward + backward, float32: {gm('nhwc', 'float32', 'train_fwd_bwd')}")
    evals = [r for r in big if r["mode"] == "eval" and r["dtype"] == "float32"]
    if evals:
        worst = min(evals, key=lambda r: r["speedup"])
        out.append(f"- eval, float32, worst shape: {fmt(worst['speedup'])} ({worst['shape']} "
                   f"{worst['layout']}); geometric mean over both layouts "
                   f"{fmt(geomean(r['speedup'] for r in evals))}")
    else:
        out.append("- eval, float32, worst shape: not measured")
    tiny = [r for r in sel if r["shape"] == TINY_SHAPE]
    if tiny:
        tiny.sort(key=lambda r: (r["dtype"] != "float32", r["dtype"], r["layout"], MODES.index(r["mode"])))
        out.append(f"- the {TINY_SHAPE} call: " + ", ".join(
            f"{r['layout']} {r['dtype'] + ' ' if r['dtype'] != 'float32' else ''}"
            f"{TITLES[r['mode']]} {fmt(r['speedup'])}" for r in tiny))
    else:
        out.append(f"- the {TINY_SHAPE} call: not measured")
    one_d = [r for r in sel if r["layout"] in LAYOUTS_1D and r["shape"] in default_1d]
    for shape in dict.fromkeys(r["shape"] for r in one_d):
        these = sorted((r for r in one_d if r["shape"] == shape),
                       key=lambda r: (r["dtype"] != "float32", r["dtype"], MODES.index(r["mode"])))
        out.append(f"- BatchNorm1d {shape}: " + ", ".join(
            f"{r['dtype'] + ' ' if r['dtype'] != 'float32' else ''}{TITLES[r['mode']]} "
            f"{fmt(r['speedup'])}" for r in these))
    out.append("")
    return out


def variant_tables(rows, out):
    """Layers and networks: ms per step of each variant, speed-up over native eager."""
    for alloc in dict.fromkeys(r["allocator"] for r in rows):
        sel = [r for r in rows if r["allocator"] == alloc]
        what = ("ms per training step (forward, loss, backward, SGD step; eval: per forward)"
                if sel[0].get("kind") == "networks" else "ms per forward + backward")
        out.append(f"{what}, speed-up over native eager (native ms / this ms) in brackets, "
                   f"**{alloc} allocator**:\n")
        # networks: a training step, or the eval forward (then "eval" in the table)
        modes = len({r["mode"] for r in sel}) > 1
        out.append("| case | shape | layout | dtype | " + ("mode | " if modes else "")
                   + " | ".join(VARIANT_TITLES[v] for v in VARIANTS) + " |")
        out.append("|---|---|---|---|" + ("---|" if modes else "") + "---|" * len(VARIANTS))
        for r in sel:
            cells = []
            for v in VARIANTS:
                t = r.get(f"{v}_ms")
                cells.append("n/a" if t is None else f"{t:.1f}" if v == "native"
                             else f"{t:.1f} ({r['native_ms'] / t:.2f}x)")
            mode = (("eval" if r["mode"].startswith("eval") else "train") + " | ") if modes else ""
            out.append(f"| {r['case']} | {r['shape']} | {r['layout']} | {r['dtype']} | {mode}"
                       + " | ".join(cells) + " |")
        for case in dict.fromkeys(r["case"] for r in sel):
            picked = [r for r in sel if r["case"] == case and r["mode"] == sel[0]["mode"]]
            if len(picked) > 1:
                parts = []
                for v in VARIANTS[1:]:
                    ratios = [r["native_ms"] / r[f"{v}_ms"] for r in picked if r.get(f"{v}_ms")]
                    if len(ratios) == len(picked):
                        parts.append(f"{VARIANT_TITLES[v]} {fmt(geomean(ratios))}")
                if parts:
                    rows_of = "shapes" if sel[0].get("kind") != "networks" else \
                        ("training steps" if picked[0]["mode"].startswith("train") else "rows")
                    out.append(f"\n{case}, geometric mean of the speed-ups over native eager "
                               f"({len(picked)} {rows_of}): " + ", ".join(parts))
        notes = dict.fromkeys(f"{VARIANT_TITLES[v]}: {why}" for r in sel
                              for v, why in r.get("notes", {}).items())
        for text in notes:
            out.append(f"\nn/a — {text}")
        compiled = [v for v in VARIANTS if any(v in r.get("compile_s", {}) for r in sel)]
        if compiled:
            out.append("\nFirst call (compilation included; Inductor's on-disk cache may have "
                       "had some of it), s:\n")
            out.append("| case | shape | " + " | ".join(VARIANT_TITLES[v] for v in compiled) + " |")
            out.append("|---|---|" + "---|" * len(compiled))
            for r in sel:
                out.append(f"| {r['case']} | {r['shape']} | " + " | ".join(
                    f"{r['compile_s'][v]:.0f}" if v in r.get("compile_s", {}) else "n/a"
                    for v in compiled) + " |")
        errors = [r for r in sel if r.get("check_rel_error")]
        if errors:
            variants = [v for v in VARIANTS if any(v in r["check_rel_error"] for r in errors)]
            what = ("one step's loss and gradient" if sel[0].get("kind") == "networks"
                    else "the output and the gradients (the worst of them)")
            out.append(f"\nChecked before timing: {what}, relative error (norms) against "
                       f"float64:\n")
            out.append("| case | shape | " + " | ".join(VARIANT_TITLES[v] for v in variants) + " |")
            out.append("|---|---|" + "---|" * len(variants))
            for r in errors:
                out.append(f"| {r['case']} | {r['shape']} | " + " | ".join(
                    f"{r['check_rel_error'][v]:.1e}" if v in r["check_rel_error"] else "n/a"
                    for v in variants) + " |")
        out.append("")


def simple_table(rows, out):
    out.append("| shape | layout | dtype | mode | allocator | native ms | ours ms | speed-up |")
    out.append("|---|---|---|---|---|---|---|---|")
    for r in rows:
        out.append(f"| {r['shape']} | {r['layout']} | {r['dtype']} | {r['mode']} | {r['allocator']} "
                   f"| {r['native_ms']:.3f} | {r['ours_ms']:.3f} | {fmt(r['speedup'])} |")
    out.append("")


def sync_table(rows, out):
    out.append("| shape | plain batch norm ms | SyncBatchNorm ms | overhead | in collectives ms |")
    out.append("|---|---|---|---|---|")
    for r in rows:
        out.append(f"| {r['shape']} | {r['native_ms']:.1f} | {r['ours_ms']:.1f} | "
                   f"{r['ours_ms'] / r['native_ms']:.2f}x | {r['comm_ms']:.1f} "
                   f"({100 * r['comm_share']:.0f} %) |")
    out.append("")


def render(results):
    rows, meta = results["rows"], results["meta"]
    out = [header(meta)]
    if not rows:
        return "\n".join(out + ["(no rows)"]) + "\n"
    if rows[0].get("kind") in ("layers", "networks"):
        variant_tables(rows, out)
    elif rows[0].get("kind") == "zoo":
        import model_zoo
        model_zoo.render(rows, out)
    elif "ours_GBps" in rows[0]:
        op_tables(rows, meta, out)
    elif "comm_ms" in rows[0]:
        sync_table(rows, out)
    else:
        simple_table(rows, out)
    return "\n".join(out) + "\n"


def main(paths):
    if not paths:
        paths = ["benchmarks/results/default.json"]
    files = []
    for path in paths:
        files += sorted(glob.glob(os.path.join(path, "*.json"))) if os.path.isdir(path) else [path]
    for i, path in enumerate(files):
        if len(files) > 1:
            print(f"{'' if i == 0 else chr(10)}### {path}\n")
        with open(path) as f:
            print(render(json.load(f)), end="")


if __name__ == "__main__":
    main(sys.argv[1:])

"""The batch norms real models run (bench.py --zoo): the input shape of every batch-norm
layer of torchvision's and timm's models, and BatchNorm1d layers of MLPs, tabular models
and 1-D convolutional sequence models, each distinct shape timed once per layout and mode,
native against ours, and each model's layers weighted by how often it runs them.

Shapes are collected with forward pre-hooks, the forward running on the meta device (no
memory, no compute).
Every distinct shape is timed in NCHW and channels-last (channels_last_3d for 5-D; a
BatchNorm1d input has one layout), in eval, training forward and training forward +
backward, with bench.py's Case (checked against native first, interleaved, medians).
Per model and (layout, mode): the layer-time-weighted speed-up, i.e. the sum of native's
times over the model's batch-norm layers divided by the sum of ours (each shape counted as
often as the model has it), the number of its cells slower than native, and its slowest
cell.
"""
import collections
import math

import torch

from harness import interleaved, progress
from layers import torchvision

# name -> (builder(torchvision, timm), input shape without the batch).  Image models at
# 224x224, the video model on 16 frames of 112x112.
TORCHVISION = ["resnet50", "mobilenet_v3_large", "efficientnet_b0", "densenet121",
               "regnet_y_800mf", "shufflenet_v2_x1_0"]
TIMM = ["resnet50d", "efficientnet_b0", "mobilenetv3_large_100"]
IMAGE = (3, 224, 224)


def _torchvision_model(name):
    return lambda tv, timm: getattr(tv.models, name)()


def _timm_model(name):
    return lambda tv, timm: timm.create_model(name, pretrained=False)


MODELS = {name: (_torchvision_model(name), IMAGE) for name in TORCHVISION}
MODELS["r3d_18"] = (lambda tv, timm: tv.models.video.r3d_18(), (3, 16, 112, 112))
MODELS.update({f"timm {name}": (_timm_model(name), IMAGE) for name in TIMM})

# BatchNorm1d in models without a zoo here: (N, C) after the linear layers of an MLP and a
# tabular model, (N, C, L) after the convolutions of a 1-D sequence model (audio, text).
# name -> (batch, [shape without the batch, one per layer]).
ONE_D = {
    "MLP (N, C)": (256, [(1024,), (1024,), (512,), (256,)]),
    "tabular (N, C)": (4096, [(512,), (256,), (128,), (64,)]),
    "sequence (N, C, L)": (32, [(64, 400), (128, 200), (256, 100), (512, 50)]),
}
DEFAULT_BATCH = 8


def layer_shapes(name, batch, tv, timm):
    """The input shape of each batch-norm call of one forward of model `name`, in order."""
    if name in ONE_D:
        one_d_batch, shapes = ONE_D[name]
        return [(one_d_batch,) + s for s in shapes]
    build, input_shape = MODELS[name]
    # Built on the CPU (some builders compute with tensors: regnet's widths), then moved to
    # the meta device, where the forward only propagates shapes.
    model = build(tv, timm).to("meta")
    shapes = []
    hooks = [m.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
             for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        model.train()(torch.empty((batch,) + input_shape, device="meta"))
    for hook in hooks:
        hook.remove()
    return shapes


def collect(batch):
    """{model: Counter(shape -> layers)} for every model of the zoo."""
    tv = torchvision()
    import zoo  # tests/zoo.py (on the path once torchvision() is imported): timm as it imports here
    timm = zoo.timm()
    return {name: collections.Counter(layer_shapes(name, batch, tv, timm))
            for name in list(MODELS) + list(ONE_D)}


def shape_text(shape):
    return "x".join(map(str, shape))


def run_zoo(args, alloc):
    """One row per (distinct shape, layout, dtype, mode): bench.py's op-level row plus
    `models`, {model: how many of its layers have this shape}."""
    import bench
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = collect(args.zoo_batch)
    users = collections.defaultdict(dict)  # shape -> {model: count}
    for name, counter in models.items():
        for shape, count in counter.items():
            users[shape][name] = count
    cases = []
    for shape in sorted(users, key=lambda s: (len(s), math.prod(s))):
        layouts = ["nchw", "nhwc"] if len(shape) >= 4 else ["nchw"]
        for layout in layouts:
            for dtype in args.dtypes:
                for mode in args.modes:
                    cases.append((shape, layout, dtype, mode))
    rows = []
    for shape, layout, dtype, mode in progress(cases, f"zoo, allocator={alloc}", "cell"):
        case = bench.Case(shape, layout, dtype, mode)
        case.check()
        t_native, t_ours = interleaved([case.fn("native"), case.fn("ours")], args.rounds,
                                       args.min_run_time)
        rows.append({"shape": shape_text(shape), "layout": bench.layout_name(shape, layout),
                     "dtype": dtype, "mode": mode, "allocator": alloc, "kind": "zoo",
                     "module": bench.MODULES[len(shape)], "native_ms": t_native * 1e3,
                     "ours_ms": t_ours * 1e3, "speedup": t_native / t_ours,
                     "models": users[shape]})
        del case
    return rows


# ---------------------------------------------------------------------------------------
# Reporting (summary.py calls render for rows of kind "zoo").

MODE_TITLES = {"train": "train fwd", "eval": "eval", "train_fwd_bwd": "train fwd+bwd"}


def layout_group(layout):
    return "nhwc" if layout == "nhwc" else "nchw"  # nc, ncl: BatchNorm1d's only layout


def per_model(rows):
    """{(model, layout group, dtype, mode): (weighted speed-up, cells slower than native,
    cells, slowest row)}."""
    sums = collections.defaultdict(lambda: [0.0, 0.0, 0, 0, None])
    for r in rows:
        for model, count in r["models"].items():
            s = sums[(model, layout_group(r["layout"]), r["dtype"], r["mode"])]
            s[0] += count * r["native_ms"]
            s[1] += count * r["ours_ms"]
            s[2] += r["speedup"] < 1.0
            s[3] += 1
            if s[4] is None or r["speedup"] < s[4]["speedup"]:
                s[4] = r
    return {k: (n / o, slower, cells, slowest) for k, (n, o, slower, cells, slowest) in sums.items()}


def render(rows, out):
    for alloc in dict.fromkeys(r["allocator"] for r in rows):
        sel = [r for r in rows if r["allocator"] == alloc]
        summary = per_model(sel)
        models = list(dict.fromkeys(k[0] for k in summary))
        for dtype in dict.fromkeys(r["dtype"] for r in sel):
            columns = [(layout, mode) for layout in ("nchw", "nhwc") for mode in MODE_TITLES
                       if any(k[1:] == (layout, dtype, mode) for k in summary)]
            out.append(f"Layer-time-weighted speed-up per model (sum of native's times over the "
                       f"model's batch-norm layers / sum of ours), {dtype}, **{alloc} allocator**; "
                       f"in brackets the model's cells (distinct shapes) slower than native:\n")
            out.append("| model | " + " | ".join(f"{l} {MODE_TITLES[m]}" for l, m in columns) + " |")
            out.append("|---|" + "---|" * len(columns))
            for model in models:
                cells = []
                for layout, mode in columns:
                    entry = summary.get((model, layout, dtype, mode))
                    cells.append("" if entry is None else
                                 f"{entry[0]:.2f}x" + (f" ({entry[1]}/{entry[2]})" if entry[1] else ""))
                out.append(f"| {model} | " + " | ".join(cells) + " |")
            out.append("")
        slow = sorted((r for r in sel if r["speedup"] < 0.97), key=lambda r: r["speedup"])
        out.append(f"{len(slow)} of {len(sel)} cells below 0.97x native"
                   f" ({sum(r['speedup'] < 0.95 for r in sel)} below 0.95x)"
                   + (", slowest first:\n" if slow else ".\n"))
        if slow:
            out.append("| shape | layout | dtype | mode | native ms | ours ms | speed-up | models |")
            out.append("|---|---|---|---|---|---|---|---|")
            for r in slow[:40]:
                out.append(f"| {r['shape']} | {r['layout']} | {r['dtype']} | {r['mode']} | "
                           f"{r['native_ms']:.3f} | {r['ours_ms']:.3f} | {r['speedup']:.2f}x | "
                           f"{', '.join(sorted(r['models']))} |")
            if len(slow) > 40:
                out.append(f"| ... {len(slow) - 40} more in the .csv | | | | | | | |")
            out.append("")

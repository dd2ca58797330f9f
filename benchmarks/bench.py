"""batchnorm_ext against torch.nn.BatchNorm1d/2d/3d, side by side.

Both run in the same process on the same input and thread count, interleaved (native,
ours, native, ours, ...), timed with torch.utils.benchmark (blocked_autorange medians);
each result is checked against native before it is timed.  The op-level table gives
medians, the speed-up (native / ours), the effective bandwidth, and how close ours comes
to the memory-traffic floor measured in the same run (x.sum() and y.copy_(x)).

Page faults on fresh outputs above 32 MiB can cost more than the kernel, so every case is
run under two allocator settings, each in its own process:
  default  glibc's defaults;
  warm     MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ raised: freed memory is reused.

    python benchmarks/bench.py                  # the default op-level set, a few minutes
    python benchmarks/bench.py --full           # every shape, layout, dtype and mode
    python benchmarks/bench.py --layers         # BN->ReLU, BN->add->ReLU, ResNet blocks
    python benchmarks/bench.py --networks       # torchvision models' training steps
    python benchmarks/bench.py --zoo            # every batch-norm layer of real models
    python benchmarks/bench.py --model          # a small ResNet-style training step
    python benchmarks/bench.py --sync           # SyncBatchNorm on 2 processes
    python benchmarks/bench.py --shapes 16x64x112x112 --layouts nhwc --modes train --alloc warm

Results (JSON, CSV, a Markdown summary, a PNG chart for the op level) go to --out, by
default a new folder benchmarks/results/run-<date>-<time>/ (not committed); the committed
files in benchmarks/results/ are written only when asked: --out benchmarks/results.
benchmarks/summary.py prints a results file again; benchmarks/compile_profile.py is the
diagnostic behind benchmarks/COMPILE.md (where torch.compile's time goes).
"""
import argparse
import copy
import csv
import json
import os
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # the repository's batchnorm_ext first

import batchnorm_ext  # noqa: E402
from harness import interleaved, machine, parse_shape, progress  # noqa: E402

WARM_ENV = {"MALLOC_MMAP_THRESHOLD_": "1000000000000", "MALLOC_TRIM_THRESHOLD_": "100000000000"}

# ResNet-50's batch-norm shapes at batch 16, and a few more (the seed's last); channel
# counts that are not multiples of 16 (3, 100, 1023).
DEFAULT_SHAPES = ["16x64x112x112", "16x256x56x56", "16x512x28x28", "16x1024x14x14",
                  "16x2048x7x7", "8x64x56x56", "1x64x56x56", "16x3x224x224", "2x3x4x4",
                  "16x1023x14x14", "16x100x28x28"]
# BatchNorm1d: (N, C) for MLPs and tabular data (channels are innermost: channels-last by
# nature), (N, C, L) for sequences.
DEFAULT_SHAPES_1D = ["256x1000", "4096x512", "64x1023", "64x256x100", "32x768x128"]
FULL_EXTRA_SHAPES = ["32x64x56x56", "16x128x28x28", "64x32x32x32", "4x3x512x512", "128x256x1x1",
                     "16x1023x7x7", "64x3x32x32"]
MODES = ["train", "eval", "train_fwd_bwd"]
MODE_TITLES = {"train": "training forward", "eval": "eval forward",
               "train_fwd_bwd": "training forward + backward"}
# "bfloat16-mixed": bfloat16 input, float32 parameters and running statistics (what
# torch.autocast gives a batch norm after a convolution).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64, "bfloat16-mixed": torch.bfloat16}
PARAM_DTYPES = {"bfloat16-mixed": torch.float32}
MODULES = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}


def layout_name(shape, layout):
    """Rows name the memory order: nchw / nhwc for 4-D and 5-D, nc / ncl for BatchNorm1d."""
    if len(shape) == 2:
        return "nc"
    if len(shape) == 3:
        return "ncl"
    return layout


# ---------------------------------------------------------------------------------------
# One case.


class Case:
    """A batch norm of one shape, layout, dtype and mode, native and ours, same input."""

    def __init__(self, shape, layout, dtype, mode):
        self.shape, self.layout, self.dtype_name, self.mode = shape, layout, dtype, mode
        self.dtype = DTYPES[dtype]
        param_dtype = PARAM_DTYPES.get(dtype, self.dtype)
        channels = shape[1]
        x = (torch.randn(shape, dtype=torch.float32) * 2 + 0.5).to(self.dtype)
        if layout == "nhwc":
            x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4
                             else torch.channels_last_3d)
        self.x = x
        name = MODULES[len(shape)]
        self.native = getattr(torch.nn, name)(channels, dtype=param_dtype)
        self.ours = getattr(batchnorm_ext, name)(channels, dtype=param_dtype)
        with torch.no_grad():
            self.native.weight.uniform_(0.5, 1.5)
            self.native.bias.normal_()
        self.ours.load_state_dict(self.native.state_dict())
        training = mode != "eval"
        self.native.train(training)
        self.ours.train(training)
        if mode == "train_fwd_bwd":
            self.x.requires_grad_()
            self.grad = torch.randn_like(x)

    def fn(self, which):
        module = self.native if which == "native" else self.ours
        x = self.x
        if self.mode == "train_fwd_bwd":
            grad, inputs = self.grad, [x, module.weight, module.bias]
            return lambda: torch.autograd.grad(module(x), inputs, grad)
        return lambda: module(x)

    def run_once(self, module, x):
        """Outputs (and gradients) of one call, leaving the module's buffers as they were."""
        state = copy.deepcopy(module.state_dict())
        if self.mode == "train_fwd_bwd":
            x = x.detach().requires_grad_()
            result = torch.autograd.grad(module(x), [x, module.weight, module.bias],
                                         self.grad.to(x.dtype))
        else:
            result = (module(x),)
        module.load_state_dict(state)
        return result

    def check(self):
        """Ours against native before timing.  Where they differ by more than rounding, ours
        must be at least as close as native to a float64 computation of the same thing
        (native's channels-last backward, for one, sums in float32 per thread)."""
        native = self.run_once(self.native, self.x)
        ours = self.run_once(self.ours, self.x)
        if not self.mode.endswith("bwd") and native[0].stride() != ours[0].stride():
            raise AssertionError(f"output strides differ from native: {self.describe()}")
        tol = {torch.float32: 1e-4, torch.float64: 1e-8}.get(self.dtype, 5e-2)
        oracle = None
        for i, (n, o) in enumerate(zip(native, ours)):
            scale = max(1.0, n.abs().max().item())
            if torch.allclose(o.float(), n.float(), rtol=tol, atol=tol * scale):
                continue
            if oracle is None:
                oracle = self.run_once(copy.deepcopy(self.native).double(), self.x.double())
            ours_error = (o.double() - oracle[i]).abs().max().item()
            native_error = (n.double() - oracle[i]).abs().max().item()
            if ours_error > native_error:
                raise AssertionError(f"ours differs from native and is less accurate: "
                                     f"{self.describe()}, output {i}: error {ours_error:.3g} "
                                     f"against native's {native_error:.3g}")

    def bytes_moved(self):
        """The least memory traffic: read x once and write y once (forward); the backward
        also reads x and dy and writes dx."""
        n = self.x.numel() * self.x.element_size()
        return 5 * n if self.mode == "train_fwd_bwd" else 2 * n

    def describe(self):
        return f"{'x'.join(map(str, self.shape))} {self.layout} {self.dtype_name} {self.mode}"


def floor_time(x, rounds, min_run_time):
    """The memory-traffic floor measured now: x.sum() (one read) and y.copy_(x) (a read and
    a write)."""
    x = x.detach()
    y = torch.empty_like(x)
    return interleaved([lambda: x.sum(), lambda: y.copy_(x)], rounds, min_run_time)


def floor_of(mode, t_sum, t_copy):
    """Training forward = sum + copy; eval = copy; forward + backward = the forward plus
    two sums and a copy."""
    return {"train": t_sum + t_copy, "eval": t_copy, "train_fwd_bwd": 3 * t_sum + 2 * t_copy}[mode]


def op_cases(args):
    """(shape, layout, dtype, mode) of the run.  Unless --dtypes is given, dtypes other
    than float32 run the training forward only (--full: every mode).  BatchNorm1d shapes
    have no channels-last layout (an (N, C) input is channels-last by nature)."""
    cases = []
    for s in args.shapes:
        dims = len(parse_shape(s))
        for layout in args.layouts:
            if layout == "nhwc" and dims < 4:
                continue
            for d in args.dtypes:
                for m in args.modes:
                    if d != "float32" and m != "train" and not (args.full or args.dtypes_given):
                        continue
                    cases.append((s, layout, d, m))
    return cases


def run_cases(args, alloc):
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = op_cases(args)
    rows = []
    floors = {}  # (shape, layout, dtype) -> (sum, copy): the same for every mode
    for shape, layout, dtype, mode in progress(cases, f"allocator={alloc}", "case"):
        dims = parse_shape(shape)
        case = Case(dims, layout, dtype, mode)
        case.check()
        t_native, t_ours = interleaved([case.fn("native"), case.fn("ours")], args.rounds,
                                       args.min_run_time)
        key = (shape, layout, dtype)
        if key not in floors:
            floors[key] = floor_time(case.x, args.rounds, args.min_run_time)
        t_sum, t_copy = floors[key]
        t_floor = floor_of(mode, t_sum, t_copy)
        rows.append({
            "shape": shape, "layout": layout_name(dims, layout), "dtype": dtype, "mode": mode,
            "allocator": alloc, "module": MODULES[len(dims)],
            "native_ms": t_native * 1e3, "ours_ms": t_ours * 1e3, "speedup": t_native / t_ours,
            "ours_GBps": case.bytes_moved() / t_ours / 1e9, "floor_ms": t_floor * 1e3,
            "sum_ms": t_sum * 1e3, "copy_ms": t_copy * 1e3,
            "ours_vs_floor": t_ours / t_floor, "MiB": case.x.numel() * case.x.element_size() / 2**20,
        })
        del case
    return rows


# ---------------------------------------------------------------------------------------
# The model-level benchmark: a ResNet-style CNN training step, native against converted.


def resnet_style(width=64, blocks=3):
    layers = [torch.nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False),
              torch.nn.BatchNorm2d(width), torch.nn.ReLU()]
    for _ in range(blocks):
        layers += [torch.nn.Conv2d(width, width, 3, padding=1, bias=False),
                   torch.nn.BatchNorm2d(width), torch.nn.ReLU()]
    layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(width, 10)]
    return torch.nn.Sequential(*layers)


def run_model(args, alloc):
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for layout in progress(args.layouts, f"model, allocator={alloc}", "layout"):
        fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
        native = resnet_style().to(memory_format=fmt)
        ours = batchnorm_ext.convert_model(copy.deepcopy(native))
        x = torch.randn(16, 3, 112, 112).contiguous(memory_format=fmt)
        target = torch.randint(0, 10, (16,))

        def step(model, optimizer):
            def run():
                optimizer.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(x), target).backward()
                optimizer.step()
            return run
        fns = [step(m, torch.optim.SGD(m.parameters(), lr=1e-3)) for m in (native, ours)]
        t_native, t_ours = interleaved(fns, args.rounds, max(args.min_run_time, 0.5))
        rows.append({"shape": "resnet-style 16x3x112x112", "layout": layout, "dtype": "float32",
                     "mode": "training step", "allocator": alloc, "native_ms": t_native * 1e3,
                     "ours_ms": t_ours * 1e3, "speedup": t_native / t_ours})
    return rows


# ---------------------------------------------------------------------------------------
# SyncBatchNorm on 2 processes (gloo over loopback) against plain batch norm.

SYNC_SHAPES = ["8x64x112x112", "8x256x56x56", "8x512x28x28", "8x1024x14x14", "8x64x56x56"]


def _timed(fn, reps, rounds, barrier):
    """Median over rounds of the mean time of `reps` calls; every process runs the same
    number of calls (collectives pair up), starting together."""
    times = []
    for _ in range(rounds):
        barrier()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - start) / reps)
    return statistics.median(times)


def _sync_worker(rank, world, init_file, out_file, shapes, threads, rounds):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(threads)
    rows = []
    for shape in (progress(shapes, "SyncBatchNorm", "shape") if rank == 0 else shapes):
        dims = parse_shape(shape)
        x = (torch.randn(dims) * 2 + 0.5).requires_grad_()
        grad = torch.randn(dims)
        sync, plain = batchnorm_ext.SyncBatchNorm(dims[1]), batchnorm_ext.BatchNorm2d(dims[1])
        step = lambda m: torch.autograd.grad(m(x), [x, m.weight, m.bias], grad)
        gathered = [torch.empty(3, dims[1], dtype=torch.float64) for _ in range(world)]
        local, sums = torch.zeros(3, dims[1], dtype=torch.float64), torch.zeros(2, dims[1], dtype=torch.float64)

        def collectives():  # what one SyncBatchNorm forward + backward exchanges
            dist.all_gather(gathered, local)
            dist.all_reduce(sums)
        reps = max(1, int(2e7 // x.numel()))
        for fn in (lambda: step(sync), lambda: step(plain), collectives):  # warm up
            fn()
        t_sync = _timed(lambda: step(sync), reps, rounds, dist.barrier)
        t_plain = _timed(lambda: step(plain), reps, rounds, dist.barrier)
        t_comm = _timed(collectives, reps, rounds, dist.barrier)
        rows.append({"shape": f"{shape} per process", "layout": "nchw", "dtype": "float32",
                     "mode": f"SyncBatchNorm fwd+bwd, {world} processes", "allocator": "default",
                     "native_ms": t_plain * 1e3, "ours_ms": t_sync * 1e3,
                     "speedup": t_plain / t_sync, "comm_ms": t_comm * 1e3,
                     "comm_share": t_comm / t_sync})
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(rows, f)
    dist.barrier()
    dist.destroy_process_group()


def run_sync(args):
    import tempfile
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "rows.json")
        mp.start_processes(_sync_worker, args=(2, os.path.join(tmp, "rendezvous"), out_file,
                                               args.shapes, args.threads, args.rounds),
                           nprocs=2, join=True, start_method="spawn")
        with open(out_file) as f:
            return json.load(f)


def print_sync_table(rows, file=sys.stdout):
    print("| shape | plain batch norm ms | SyncBatchNorm ms | overhead | communication ms | share of SyncBatchNorm time |", file=file)
    print("|---|---|---|---|---|---|", file=file)
    for r in rows:
        print(f"| {r['shape']} | {r['native_ms']:.3f} | {r['ours_ms']:.3f} | "
              f"{r['ours_ms'] / r['native_ms']:.2f}x | {r['comm_ms']:.3f} | {100 * r['comm_share']:.0f}% |", file=file)


# ---------------------------------------------------------------------------------------
# Reporting.


def print_table(rows, file=sys.stdout):
    model = "ours_GBps" not in rows[0]
    header = ["shape", "layout", "dtype", "mode", "alloc", "native ms", "ours ms", "speed-up"]
    if not model:
        header += ["GB/s", "ours/floor"]
    lines = [header]
    for r in rows:
        line = [r["shape"], r["layout"], r["dtype"], r["mode"], r["allocator"],
                f"{r['native_ms']:.3f}", f"{r['ours_ms']:.3f}", f"{r['speedup']:.2f}x"]
        if not model:
            line += [f"{r['ours_GBps']:.1f}", f"{r['ours_vs_floor']:.2f}"]
        lines.append(line)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |", file=file)
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=file)
    print(file=file)


def chart(rows, path, meta):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    def panel(r):  # BatchNorm1d's (N, C) and (N, C, L) share a panel
        return ("BatchNorm1d" if r["layout"] in ("nc", "ncl") else r["layout"], r["dtype"], r["mode"])
    groups = list(dict.fromkeys(panel(r) for r in rows))
    allocs = list(dict.fromkeys(r["allocator"] for r in rows))
    fig, axes = plt.subplots(len(groups), 1, figsize=(12, 2.6 * len(groups)), squeeze=False)
    for ax, group in zip(axes[:, 0], groups):
        sel = [r for r in rows if panel(r) == group]
        shapes = list(dict.fromkeys(r["shape"] for r in sel))
        width = 0.8 / len(allocs)
        for i, alloc in enumerate(allocs):
            speedups = [next((r["speedup"] for r in sel if (r["shape"], r["allocator"]) == (s, alloc)), 0)
                        for s in shapes]
            bars = ax.bar([j + i * width for j in range(len(shapes))], speedups, width, label=f"{alloc} allocator")
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")  # speed-ups from below 1 to above 10 on one chart
        low, high = ax.get_ylim()
        ax.set_ylim(low, high * 1.5)  # room for the labels above the tallest bars
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks([j + width * (len(allocs) - 1) / 2 for j in range(len(shapes))], shapes, fontsize=8)
        ax.set_ylabel("native / ours")
        layout, dtype, mode = group
        ax.set_title(f"{MODE_TITLES.get(mode, mode)}, {layout}, {dtype}", fontsize=10)
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(f"batchnorm_ext speed-up over torch.nn.BatchNorm*d ({meta['threads']} thread(s), "
                 f"torch {meta['torch']}, {meta['cpu']})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=90)


def default_out_dir():
    return os.path.join(HERE, "results", time.strftime("run-%Y%m%d-%H%M%S"))


def write_results(rows, meta, out_dir, name):
    """<name>.json, .csv, .md (the summary) and, for the op level, .png under out_dir."""
    import summary
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, name)
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(base + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: json.dumps(v) if isinstance(v, (dict, list)) else v
                          for k, v in r.items()} for r in rows)
    written = [".json", ".csv"]
    text = summary.render({"meta": meta, "rows": rows})
    with open(base + ".md", "w") as f:
        f.write(text)
    written.append(".md")
    if "ours_GBps" in rows[0]:
        chart(rows, base + ".png", meta)
        written.append(".png")
    return base, written, text


# ---------------------------------------------------------------------------------------

def help_epilog():
    """The defaults that depend on the mode, wrapped for --help."""
    import textwrap
    from layers import SHAPES as LAYER_SHAPES
    from networks import DEFAULT_INPUT
    entries = [
        ("--shapes", f"op level: {' '.join(DEFAULT_SHAPES)}; BatchNorm1d: "
                     f"{' '.join(DEFAULT_SHAPES_1D)}. --full adds {' '.join(FULL_EXTRA_SHAPES)}. "
                     + " ".join(f"--layers {k}: {' '.join(v)}." for k, v in LAYER_SHAPES.items())
                     + f" --networks: {DEFAULT_INPUT}. --sync: {' '.join(SYNC_SHAPES)}."),
        ("--layouts", "nchw nhwc (op level, --model, --networks); nchw (--layers)"),
        ("--dtypes", "float32 bfloat16, bfloat16 in the training forward only (op level); "
                     "--full: every dtype in every mode; --layers, --networks: float32. Given "
                     "explicitly, every dtype runs in every mode."),
        ("--rounds", "3 (--full, --sync: 5)"),
        ("--min-run-time", "0.05 s (op level), 0.2 (--full, --layers), 0.5 (--model), "
                           "1.0 (--networks)"),
    ]
    lines = ["defaults that depend on the mode:"]
    for name, text in entries:
        wrapped = textwrap.wrap(text, 62)
        lines.append(f"  {name:<15} {wrapped[0]}")
        lines += [f"  {'':<15} {w}" for w in wrapped[1:]]
    return "\n".join(lines)


def parse_args(argv=None):
    from layers import KINDS
    from networks import NETWORKS
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=help_epilog())
    mode = parser.add_argument_group("what to run (default: the op-level set)")
    mode.add_argument("--full", action="store_true",
                      help="op level: every shape, layout, dtype and mode (default: off)")
    mode.add_argument("--layers", nargs="*", choices=KINDS, metavar="KIND",
                      help="layers as in models, forward + backward, seven variants (native, "
                           "native compiled, ours, ours fused, ours compiled, native compiled "
                           "with backend=batchnorm_ext, ours fused compiled); KIND of "
                           f"{', '.join(KINDS)} (default when given alone: all)")
    mode.add_argument("--networks", nargs="*", choices=NETWORKS, metavar="NAME",
                      help="torchvision models' training steps (SGD) and eval forward "
                           "(--modes train eval), the same seven variants; "
                           f"NAME of {', '.join(NETWORKS)} (default when given alone: all)")
    mode.add_argument("--zoo", action="store_true",
                      help="the input shape of every batch-norm layer of torchvision and timm "
                           "models (and BatchNorm1d MLP, tabular and sequence layers), each "
                           "distinct shape in both layouts and every mode; per model, the "
                           "layer-time-weighted speed-up (default: off)")
    mode.add_argument("--model", action="store_true",
                      help="a small ResNet-style training step, native against ours (default: off)")
    mode.add_argument("--sync", action="store_true",
                      help="SyncBatchNorm forward + backward on 2 processes against plain "
                           "batch norm (default: off)")
    sel = parser.add_argument_group("cases")
    sel.add_argument("--shapes", nargs="+", metavar="NxCx...",
                     help="input shapes, e.g. 16x64x112x112, 256x1000 (default: see below)")
    sel.add_argument("--layouts", nargs="+", choices=["nchw", "nhwc"],
                     help="memory formats; nhwc is channels_last (channels_last_3d for 5-D), "
                          "skipped for BatchNorm1d shapes (default: see below)")
    sel.add_argument("--dtypes", nargs="+", choices=list(DTYPES),
                     help="bfloat16-mixed = bfloat16 input, float32 parameters, as under "
                          "autocast (default: see below)")
    sel.add_argument("--modes", nargs="+", choices=MODES,
                     help="op level: train (training forward), eval, train_fwd_bwd "
                          "(default: all three); --networks: train (a training step), eval "
                          "(default: both)")
    run = parser.add_argument_group("how")
    run.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default: 1)")
    run.add_argument("--alloc", choices=["default", "warm", "both"],
                     help="allocator settings, each in its own process (default: both; --zoo: "
                          "warm)")
    run.add_argument("--zoo-batch", type=int, default=8, metavar="N",
                     help="--zoo: the batch size of the image and video models (default: 8)")
    run.add_argument("--rounds", type=int,
                     help="interleaved rounds per case, median taken (default: see below)")
    run.add_argument("--min-run-time", type=float, metavar="SECONDS",
                     help="per timing, torch.utils.benchmark blocked_autorange (default: see below)")
    run.add_argument("--lr", type=float, default=1e-3, help="--networks: SGD learning rate "
                     "(default: 0.001)")
    out = parser.add_argument_group("output")
    out.add_argument("--out", metavar="DIR",
                     help="folder for the results (default: a new benchmarks/results/run-<date>-"
                          "<time>/; the committed files are benchmarks/results/*)")
    out.add_argument("--name", help="results file name (default: the mode: default, full, layers, "
                                    "networks, model, sync)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # allocator setting of a worker
    args = parser.parse_args(argv)

    args.dtypes_given = args.dtypes is not None
    if args.layers is not None and not args.layers:
        args.layers = list(KINDS)
    if args.networks is not None and not args.networks:
        args.networks = list(NETWORKS)
    modes = [m for m, on in (("layers", args.layers is not None), ("networks", args.networks is not None),
                             ("model", args.model), ("sync", args.sync), ("full", args.full),
                             ("zoo", args.zoo)) if on]
    if len(modes) > 1:
        parser.error("choose one of --full, --layers, --networks, --model, --sync, --zoo")
    args.kind = modes[0] if modes else "default"
    args.alloc = args.alloc or ("warm" if args.kind == "zoo" else "both")
    if args.kind in ("layers", "networks"):
        args.layouts = args.layouts or (["nchw"] if args.kind == "layers" else ["nchw", "nhwc"])
        args.dtypes = args.dtypes or ["float32"]
        args.rounds = args.rounds or 3
        args.min_run_time = args.min_run_time or (0.2 if args.kind == "layers" else 1.0)
    elif args.kind == "zoo":
        args.dtypes = args.dtypes or ["float32"]
        args.modes = args.modes or MODES
        args.rounds = args.rounds or 3
        args.min_run_time = args.min_run_time or 0.05
    elif args.kind == "sync":
        args.shapes = args.shapes or SYNC_SHAPES
        args.rounds = args.rounds or 5
    else:
        args.shapes = args.shapes or (DEFAULT_SHAPES + DEFAULT_SHAPES_1D
                                      + (FULL_EXTRA_SHAPES if args.full else []))
        args.layouts = args.layouts or ["nchw", "nhwc"]
        args.dtypes = args.dtypes or (list(DTYPES) if args.full else ["float32", "bfloat16"])
        args.modes = args.modes or MODES
        args.rounds = args.rounds or (5 if args.full else 3)
        args.min_run_time = args.min_run_time or (0.2 if args.full else
                                                  (0.5 if args.model else 0.05))
    args.name = args.name or args.kind
    return args


def run_child(args):
    if args.kind == "layers":
        from layers import run_layers
        return run_layers(args, args.child)
    if args.kind == "networks":
        from networks import run_networks
        return run_networks(args, args.child)
    if args.kind == "model":
        return run_model(args, args.child)
    if args.kind == "zoo":
        from model_zoo import run_zoo
        return run_zoo(args, args.child)
    return run_cases(args, args.child)


def main():
    args = parse_args()
    if args.child:  # a worker: run everything under one allocator setting, print JSON
        rows = run_child(args)
        print("RESULTS " + json.dumps(rows))
        return

    out_dir = args.out or default_out_dir()
    meta = {"torch": torch.__version__, "batchnorm_ext": batchnorm_ext.__version__,
            "kernels": batchnorm_ext.cpu_capability(), "cpu": machine(), "threads": args.threads,
            "kind": args.kind,
            "allocators": {"default": "glibc defaults", "warm": WARM_ENV},
            "default_shapes": DEFAULT_SHAPES, "default_shapes_1d": DEFAULT_SHAPES_1D,
            "command": "python benchmarks/bench.py " + " ".join(sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.sync:
        meta["allocators"] = {"default": "glibc defaults"}
        print(f"SyncBatchNorm on 2 processes (gloo, loopback), {args.threads} thread(s) each, "
              f"{meta['cpu']}", flush=True)
        rows = run_sync(args)
        print_sync_table(rows)
        base, written, _ = write_results(rows, meta, out_dir, args.name)
        print(f"\nwrote {base}{', '.join(written)}")
        return

    allocs = ["default", "warm"] if args.alloc == "both" else [args.alloc]
    print(f"torch {meta['torch']}, kernels {meta['kernels']}, {meta['cpu']}, "
          f"{args.threads} thread(s); {args.kind} set, allocator(s): {', '.join(allocs)}; "
          f"results to {out_dir}", flush=True)
    start = time.perf_counter()
    rows = []
    for alloc in allocs:
        env = dict(os.environ, **(WARM_ENV if alloc == "warm" else {}))
        if alloc == "default":
            for key in WARM_ENV:
                env.pop(key, None)
        argv = [sys.executable, os.path.abspath(__file__), "--child", alloc] + sys.argv[1:]
        done = subprocess.run(argv, env=env, stdout=subprocess.PIPE, text=True)
        if done.returncode != 0:
            sys.exit(f"the {alloc}-allocator run failed (exit status {done.returncode}); "
                     f"its messages are above")
        line = next(l for l in done.stdout.splitlines() if l.startswith("RESULTS "))
        rows += json.loads(line[len("RESULTS "):])
    meta["seconds"] = round(time.perf_counter() - start, 1)
    if args.kind not in ("layers", "networks", "zoo"):  # those: the summary below has it all
        print_table(rows)
    base, written, text = write_results(rows, meta, out_dir, args.name)
    print("\n" + text)
    print(f"wrote {base}{', '.join(written)} ({meta['seconds']:.0f} s)")


if __name__ == "__main__":
    main()

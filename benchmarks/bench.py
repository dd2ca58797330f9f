"""batchnorm_ext against torch.nn.BatchNorm2d, side by side.

Both run in the same process on the same input and thread count, interleaved (native,
ours, native, ours, ...), timed with torch.utils.benchmark; each result is checked against
native before it is timed.  The table gives medians, the speed-up (native / ours), the
effective bandwidth, and how close ours comes to the memory-traffic floor measured in the
same run (x.sum() and y.copy_(x)).

Page faults on fresh outputs above 32 MiB can cost more than the kernel, so every case is
run under two allocator settings, each in its own process:
  default  glibc's defaults;
  warm     MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ raised: freed memory is reused.

    python benchmarks/bench.py                  # the default set, about 2 minutes
    python benchmarks/bench.py --full           # every shape, layout, dtype and mode
    python benchmarks/bench.py --model          # a ResNet-style training step
    python benchmarks/bench.py --sync           # SyncBatchNorm on 2 processes
    python benchmarks/bench.py --shapes 16x64x112x112 --layouts nhwc --modes train --alloc warm

Writes results/<name>.json, .csv and .png (speed-ups per shape) under benchmarks/.
"""
import argparse
import contextlib
import copy
import csv
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.utils.benchmark

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import batchnorm_ext  # noqa: E402

WARM_ENV = {"MALLOC_MMAP_THRESHOLD_": "1000000000000", "MALLOC_TRIM_THRESHOLD_": "100000000000"}

# ResNet-50's batch-norm shapes at batch 16, and a few more (the seed's last).
DEFAULT_SHAPES = ["16x64x112x112", "16x256x56x56", "16x512x28x28", "16x1024x14x14",
                  "16x2048x7x7", "8x64x56x56", "1x64x56x56", "16x3x224x224", "2x3x4x4"]
FULL_EXTRA_SHAPES = ["32x64x56x56", "16x128x28x28", "64x32x32x32", "4x3x512x512", "128x256x1x1"]
MODES = ["train", "eval", "train_fwd_bwd"]
MODE_TITLES = {"train": "training forward", "eval": "eval forward",
               "train_fwd_bwd": "training forward + backward"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


def parse_shape(text):
    return tuple(int(s) for s in text.lower().split("x"))


def machine():
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    return cpu


# ---------------------------------------------------------------------------------------
# One case.


class Case:
    """A batch norm of one shape, layout, dtype and mode, native and ours, same input."""

    def __init__(self, shape, layout, dtype, mode):
        self.shape, self.layout, self.dtype, self.mode = shape, layout, dtype, mode
        channels = shape[1]
        x = torch.randn(shape, dtype=dtype) * 2 + 0.5
        if layout == "nhwc":
            x = x.contiguous(memory_format=torch.channels_last)
        self.x = x
        self.native = torch.nn.BatchNorm2d(channels, dtype=dtype)
        self.ours = batchnorm_ext.BatchNorm2d(channels, dtype=dtype)
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
        if self.mode == "eval":
            return lambda: module(x)
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
        return f"{'x'.join(map(str, self.shape))} {self.layout} {str(self.dtype)[6:]} {self.mode}"


def median_time(fn, min_run_time):
    timer = torch.utils.benchmark.Timer(stmt="fn()", globals={"fn": fn},
                                        num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def interleaved(fns, rounds, min_run_time):
    """Medians over `rounds` of A B A B ... timing; each round is itself a median."""
    for fn in fns:  # warm-up: first calls allocate and fault in memory
        fn()
    times = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            times[i].append(median_time(fn, min_run_time))
    return [statistics.median(t) for t in times]


def floor_time(x, mode, rounds, min_run_time):
    """The memory-traffic floor measured now: x.sum() (one read) and y.copy_(x) (a read and
    a write).  Training forward = sum + copy; eval = copy; forward + backward = the forward
    plus two sums and a copy."""
    x = x.detach()
    y = torch.empty_like(x)
    t_sum, t_copy = interleaved([lambda: x.sum(), lambda: y.copy_(x)], rounds, min_run_time)
    return {"train": t_sum + t_copy, "eval": t_copy,
            "train_fwd_bwd": 3 * t_sum + 2 * t_copy}[mode], t_sum, t_copy


def run_cases(args, alloc):
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = [(s, l, d, m) for s in args.shapes for l in args.layouts for d in args.dtypes
             for m in args.modes if not (d != "float32" and m != "train" and not args.full)]
    rows = []
    try:
        from tqdm import tqdm
        progress = tqdm(cases, desc=f"allocator={alloc}", unit="case", file=sys.stderr)
    except ImportError:
        progress = cases
    for shape, layout, dtype, mode in progress:
        case = Case(parse_shape(shape), layout, DTYPES[dtype], mode)
        case.check()
        t_native, t_ours = interleaved([case.fn("native"), case.fn("ours")], args.rounds,
                                       args.min_run_time)
        t_floor, t_sum, t_copy = floor_time(case.x, mode, args.rounds, args.min_run_time)
        rows.append({
            "shape": shape, "layout": layout, "dtype": dtype, "mode": mode, "allocator": alloc,
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
    for layout in args.layouts:
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
    for shape in shapes:
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


def geomean(values):
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


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
    if not model:
        print(file=file)
        for alloc in dict.fromkeys(r["allocator"] for r in rows):
            for layout in dict.fromkeys(r["layout"] for r in rows):
                for dtype in dict.fromkeys(r["dtype"] for r in rows):
                    for mode in MODES:
                        sel = [r for r in rows if (r["allocator"], r["layout"], r["dtype"],
                                                   r["mode"]) == (alloc, layout, dtype, mode)]
                        if sel:
                            print(f"geometric mean speed-up, {alloc} allocator, {layout}, {dtype}, "
                                  f"{MODE_TITLES[mode]}: {geomean(r['speedup'] for r in sel):.2f}x "
                                  f"({len(sel)} shapes)", file=file)


def chart(rows, path, meta):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    groups = list(dict.fromkeys((r["layout"], r["dtype"], r["mode"]) for r in rows))
    allocs = list(dict.fromkeys(r["allocator"] for r in rows))
    fig, axes = plt.subplots(len(groups), 1, figsize=(11, 2.6 * len(groups)), squeeze=False)
    for ax, (layout, dtype, mode) in zip(axes[:, 0], groups):
        shapes = list(dict.fromkeys(r["shape"] for r in rows if (r["layout"], r["dtype"], r["mode"]) == (layout, dtype, mode)))
        width = 0.8 / len(allocs)
        for i, alloc in enumerate(allocs):
            speedups = [next((r["speedup"] for r in rows if (r["shape"], r["layout"], r["dtype"], r["mode"], r["allocator"]) == (s, layout, dtype, mode, alloc)), 0) for s in shapes]
            bars = ax.bar([j + i * width for j in range(len(shapes))], speedups, width, label=f"{alloc} allocator")
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")  # speed-ups from below 1 to above 10 on one chart
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks([j + width * (len(allocs) - 1) / 2 for j in range(len(shapes))], shapes, fontsize=8)
        ax.set_ylabel("native / ours")
        ax.set_title(f"{MODE_TITLES.get(mode, mode)}, {layout}, {dtype}", fontsize=10)
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(f"batchnorm_ext speed-up over torch.nn.BatchNorm2d ({meta['threads']} thread(s), "
                 f"torch {meta['torch']}, {meta['cpu']})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=90)


def write_results(rows, meta, name):
    out = os.path.join(HERE, "results")
    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, name)
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(base + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if "ours_GBps" in rows[0]:
        chart(rows, base + ".png", meta)
    return base


# ---------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="every shape, dtype and mode")
    parser.add_argument("--model", action="store_true", help="a ResNet-style training step instead")
    parser.add_argument("--sync", action="store_true",
                        help="SyncBatchNorm forward + backward on 2 processes against plain batch norm")
    parser.add_argument("--shapes", nargs="+", help="N x C x H x W, e.g. 16x64x112x112")
    parser.add_argument("--layouts", nargs="+", choices=["nchw", "nhwc"], default=["nchw", "nhwc"])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES))
    parser.add_argument("--modes", nargs="+", choices=MODES)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--alloc", choices=["default", "warm", "both"], default="both")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per case (median)")
    parser.add_argument("--min-run-time", type=float, help="seconds per timing (blocked_autorange)")
    parser.add_argument("--name", help="results file name (default: from the options)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # allocator setting of a worker
    args = parser.parse_args()

    if args.sync:
        args.shapes = args.shapes or SYNC_SHAPES
        args.rounds = args.rounds or 5
        meta = {"torch": torch.__version__, "cpu": machine(), "threads": args.threads,
                "command": "python benchmarks/bench.py " + " ".join(sys.argv[1:]),
                "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        print(f"SyncBatchNorm on 2 processes (gloo, loopback), {args.threads} thread(s) each, "
              f"{meta['cpu']}", flush=True)
        rows = run_sync(args)
        print_sync_table(rows)
        base = write_results(rows, meta, args.name or "sync")
        print(f"\nwrote {base}.json, .csv")
        return
    args.shapes = args.shapes or DEFAULT_SHAPES + (FULL_EXTRA_SHAPES if args.full else [])
    args.dtypes = args.dtypes or (list(DTYPES) if args.full else ["float32", "bfloat16"])
    args.modes = args.modes or MODES
    args.rounds = args.rounds or (5 if args.full else 3)
    args.min_run_time = args.min_run_time or (0.2 if args.full else 0.05)

    if args.child:  # a worker: run everything under one allocator setting, print JSON
        rows = (run_model if args.model else run_cases)(args, args.child)
        print("RESULTS " + json.dumps(rows))
        return

    allocs = ["default", "warm"] if args.alloc == "both" else [args.alloc]
    meta = {"torch": torch.__version__, "batchnorm_ext": batchnorm_ext.__version__,
            "kernels": batchnorm_ext.cpu_capability(), "cpu": machine(), "threads": args.threads,
            "allocators": {"default": "glibc defaults", "warm": WARM_ENV},
            "command": "python benchmarks/bench.py " + " ".join(sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"torch {meta['torch']}, kernels {meta['kernels']}, {meta['cpu']}, "
          f"{args.threads} thread(s)", flush=True)
    rows = []
    for alloc in allocs:
        env = dict(os.environ, **(WARM_ENV if alloc == "warm" else {}))
        if alloc == "default":
            for key in WARM_ENV:
                env.pop(key, None)
        argv = [sys.executable, os.path.abspath(__file__), "--child", alloc] + sys.argv[1:]
        done = subprocess.run(argv, env=env, stdout=subprocess.PIPE, text=True, check=True)
        line = next(l for l in done.stdout.splitlines() if l.startswith("RESULTS "))
        rows += json.loads(line[len("RESULTS "):])
    print_table(rows)
    name = args.name or ("model" if args.model else ("full" if args.full else "default"))
    base = write_results(rows, meta, name)
    print(f"\nwrote {base}.json, .csv" + ("" if args.model else ", .png"))


if __name__ == "__main__":
    main()

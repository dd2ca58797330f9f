"""Shared pieces of the benchmarks: timing, checking, the fused API's availability."""
import contextlib
import inspect
import math
import platform
import statistics
import sys

import torch
import torch.utils.benchmark


def parse_shape(text):
    return tuple(int(s) for s in text.lower().split("x"))


def machine():
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    return cpu


def geomean(values):
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


# ---------------------------------------------------------------------------------------
# Timing.


def median_time(fn, min_run_time):
    timer = torch.utils.benchmark.Timer(stmt="fn()", globals={"fn": fn},
                                        num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def interleaved(fns, rounds, min_run_time):
    """Medians over `rounds` of A B A B ... timing; each round is itself a median.  None in
    `fns` (a variant that is not available) gives None."""
    live = [fn for fn in fns if fn is not None]
    for fn in live:  # warm-up: first calls allocate and fault in memory
        fn()
    times = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            if fn is not None:
                times[i].append(median_time(fn, min_run_time))
    return [statistics.median(t) if t else None for t in times]


def progress(items, desc, unit):
    """tqdm on stderr where it is installed (it is a dependency), else the plain iterable."""
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)


def note(bar, text):
    """Show what a case is doing now (compiling, checking, timing) next to its progress bar."""
    if hasattr(bar, "set_postfix_str"):
        bar.set_postfix_str(text, refresh=True)


# ---------------------------------------------------------------------------------------
# Checking results before timing them.


def relative_error(reference, result):
    """||result - reference|| / ||reference|| (the difference's norm where reference is 0)."""
    r, o = reference.detach().double(), result.detach().double()
    if r.shape != o.shape:
        raise AssertionError(f"shape {tuple(o.shape)}, expected {tuple(r.shape)}")
    denominator = r.norm().item()
    difference = (r - o).norm().item()
    return difference / denominator if denominator > 0 else difference


def check_variant(errors, variant, tol, what, factor=4):
    """`errors`: relative error against float64 of each variant computed so far, native
    eager's included.  Ours (eager, fused, compiled) may be at most `factor` times as far
    from float64 as the worse of native eager and native compiled, or within `tol`;
    native compiled is only recorded (it is not ours).

    Norms, not element-wise differences: a ReLU after a batch norm passes or stops the
    gradient by the sign of its input, and for the few values within rounding of 0 that
    sign differs between any two correct implementations (bfloat16: many more).  And a
    margin: how far float32 lands from float64 varies with the order of every rounding."""
    if not variant.startswith("ours"):
        return
    native = max(errors[v] for v in ("native", "native_compiled") if v in errors)
    bound = max(tol, factor * native)
    if not errors[variant] <= bound:
        raise AssertionError(f"{what} {variant}: relative error {errors[variant]:.3g} against "
                             f"float64, native's {native:.3g}, allowed {bound:.3g}")


# ---------------------------------------------------------------------------------------
# The fused operators (being written): batch_norm(..., *, residual=None, activation=None)
# computing act(bn(x) + residual), and fuse(model).  Until they exist, their columns are
# "n/a" with the reason.


def fused_functional_missing(batchnorm_ext):
    """None if batchnorm_ext.batch_norm takes residual= and activation=, else why not."""
    try:
        parameters = inspect.signature(batchnorm_ext.batch_norm).parameters
    except (TypeError, ValueError):
        return "batchnorm_ext.batch_norm has no inspectable signature"
    missing = [k for k in ("residual", "activation") if k not in parameters]
    if missing:
        return ("batchnorm_ext.batch_norm takes no " + " / ".join(f"{k}=" for k in missing)
                + " (fused operators not in this build)")
    return None


def fuse_missing(batchnorm_ext):
    """None if batchnorm_ext.fuse exists, else why not."""
    if not callable(getattr(batchnorm_ext, "fuse", None)):
        return "batchnorm_ext.fuse does not exist (fused operators not in this build)"
    return None

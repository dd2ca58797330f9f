"""Reliability: adversarial numerics against a float64 oracle, bit-identical results for
any thread count, concurrent calls, no memory growth, and 64-bit indexing."""
import gc
import math
import mmap
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

import batchnorm_ext
from helpers import make_input

LAYOUTS = ["contiguous", "channels_last"]


def forward_backward(fn, x, weight, bias, running, training=True, grad=None):
    """Output, input/weight/bias gradients and running statistics of one call."""
    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    bias = bias.detach().clone().requires_grad_()
    running = [r.clone() for r in running]
    y = fn(x, running[0], running[1], weight, bias, training=training)
    y.backward(torch.ones_like(y) if grad is None else grad)
    return [y, x.grad, weight.grad, bias.grad, *running]


def errors_against_oracle(x, dtype, layout):
    """Max error of ours and of native against a float64 computation of the same input,
    for output, grad_input, grad_weight, grad_bias, running_mean, running_var."""
    channels = x.shape[1]
    weight = torch.linspace(0.5, 1.5, channels)
    bias = torch.linspace(-1, 1, channels)
    running = [torch.zeros(channels), torch.ones(channels)]
    grad = make_input(tuple(x.shape), torch.float32, layout)
    param = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    cast = lambda ts, d: [t.to(d) for t in ts]
    results = {}
    for name, fn, d, p in [("ours", batchnorm_ext.batch_norm, dtype, param),
                           ("native", F.batch_norm, dtype, param),
                           ("oracle", F.batch_norm, torch.float64, torch.float64)]:
        results[name] = forward_backward(fn, x.to(d), *cast([weight, bias], p), cast(running, p),
                                         grad=grad.to(d))
    errors = {}
    for name in ("ours", "native"):
        errors[name] = [(a.double() - o).abs().max().item()
                        for a, o in zip(results[name], results["oracle"])]
    # Both round their results to float32 at the end: a difference of an ulp or two of the
    # result is a tie, not a loss of accuracy.
    errors["ulp"] = [2 * torch.finfo(dtype).eps * o.abs().max().item() for o in results["oracle"]]
    return errors, results


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("offset", [1e4, 1e5, 1e6])
def test_large_offsets(offset, layout):
    """N(offset, 1) in float32: every result at least as accurate as native's."""
    x = make_input((8, 5, 12, 12), torch.float32, layout, offset=offset)
    errors, _ = errors_against_oracle(x, torch.float32, layout)
    names = ["output", "grad_input", "grad_weight", "grad_bias", "running_mean", "running_var"]
    for name, ours, native, ulp in zip(names, errors["ours"], errors["native"], errors["ulp"]):
        assert ours <= native + ulp, (name, ours, native)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("std", [1e-3, 1e-6])
def test_tiny_variance(std, layout):
    """Variance far below eps, around an offset of 1: still as accurate as native."""
    x = make_input((8, 5, 9, 9), torch.float32, layout, scale=std, offset=1.0)
    errors, _ = errors_against_oracle(x, torch.float32, layout)
    for ours, native, ulp in zip(errors["ours"], errors["native"], errors["ulp"]):
        assert ours <= native + ulp, (ours, native)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_denormal_inputs(layout):
    """Denormal values (~1e-39, below float32's smallest normal) normalized as any others:
    every result against a float64 computation of the same input, as accurate as native's.
    No bias (and a unit weight), so that the output is (x - mean) / sqrt(eps), ~1e-37:
    a kernel that ignored or flushed the input would give zeros, off by all of it."""
    x = make_input((6, 4, 7, 7), torch.float32, layout, scale=1e-39)
    assert (x != 0).all() and (x.abs() < torch.finfo(torch.float32).tiny).all()
    grad = make_input((6, 4, 7, 7), torch.float32, layout)
    results = {}
    for name, fn, dtype in [("ours", batchnorm_ext.batch_norm, torch.float32),
                            ("native", F.batch_norm, torch.float32),
                            ("oracle", F.batch_norm, torch.float64)]:
        results[name] = forward_backward(fn, x.to(dtype), torch.ones(4, dtype=dtype),
                                         torch.zeros(4, dtype=dtype),
                                         [torch.zeros(4, dtype=dtype), torch.ones(4, dtype=dtype)],
                                         grad=grad.to(dtype))
    names = ["output", "grad_input", "grad_weight", "grad_bias", "running_mean", "running_var"]
    # The output and grad_weight depend on the denormals only; so does running_mean.
    assert results["oracle"][0].abs().max() > 1e-37
    assert results["oracle"][2].abs().max() > 1e-36
    assert results["oracle"][4].abs().max() > 1e-42
    for name, ours, native, oracle in zip(names, results["ours"], results["native"], results["oracle"]):
        ours_error = (ours.double() - oracle).abs().max().item()
        native_error = (native.double() - oracle).abs().max().item()
        # Float32 rounding of the largest result, and no less than half the spacing of
        # float32 denormals (2**-150): a denormal result cannot be closer than that.
        rounding = max(2 * torch.finfo(torch.float32).eps * oracle.abs().max().item(), 2.0**-150)
        assert ours_error <= max(native_error, rounding), (name, ours_error, native_error)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype,big", [(torch.float16, 6e4), (torch.bfloat16, 3e38),
                                       (torch.float32, 3e38)])
def test_near_overflow(dtype, big, layout):
    """Values near the dtype's largest (float32 sums of them overflow; those blocks are
    redone in double): output and running statistics against a float64 computation of the
    same input, rounded to the dtype.  (Native is no yardstick here: its float32 and
    bfloat16 outputs are NaN or zero.)  The running variance (~1e76, or 4e9 for half)
    overflows the dtype: it must be inf, as the float64 one rounded."""
    x = (torch.randn(8, 4, 6, 6).sign() * big * torch.rand(8, 4, 6, 6).clamp(0.5, 1)).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    outputs = {}
    for name, fn, d in [("ours", batchnorm_ext.batch_norm, dtype), ("oracle", F.batch_norm, torch.float64)]:
        running = [torch.zeros(4, dtype=d), torch.ones(4, dtype=d)]
        outputs[name] = (fn(x.to(d), *running, training=True), *running)
    for name, ours, oracle in zip(["output", "running_mean", "running_var"], outputs["ours"],
                                  outputs["oracle"]):
        assert ours.dtype == dtype
        rounded = oracle.to(dtype)
        finite = rounded.isfinite()
        assert torch.equal(ours[~finite], rounded[~finite]), name  # inf where float64's is
        assert finite.any() or name == "running_var", name
        error = (ours[finite].double() - oracle[finite]).abs().max().item() if finite.any() else 0.0
        # Two ulps of the dtype at the largest finite result (the output is ~1, the running
        # mean ~1e36 for bfloat16 and float32).
        ulp = torch.finfo(dtype).eps * (oracle[finite].abs().max().item() if finite.any() else 0.0)
        assert error <= 2 * ulp, (name, error, ulp)
    assert outputs["ours"][0].isfinite().all()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "inf and -inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_and_inf_propagate_as_native(bad, dtype, layout):
    x = torch.randn(8, 3, 5, 5).to(dtype)
    if bad == "inf and -inf":
        x[0, 0, 0, 0], x[1, 0, 0, 0] = float("inf"), -float("inf")
    else:
        x[0, 0, 0, 0] = float(bad)
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    results = []
    for fn in (batchnorm_ext.batch_norm, F.batch_norm):
        running = [torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype)]
        train = fn(x, *running, training=True)
        evaluated = fn(x, torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype), training=False)
        results.append([train, *running, evaluated])
    for ours, native in zip(*results):
        assert torch.equal(ours.isnan(), native.isnan())
        assert torch.equal(ours.isinf(), native.isinf())
        finite = ours.isfinite()
        torch.testing.assert_close(ours[finite], native[finite], rtol=2e-2, atol=2e-2)


# --------------------------------------------------------------------------------------
# Determinism.

THREAD_COUNTS = [1, 2, 3, 4, 8]
DETERMINISM_CASES = [((16, 3, 40, 40), "contiguous"), ((8, 64, 10, 10), "contiguous"),
                     ((16, 3, 40, 40), "channels_last"), ((8, 100, 9, 9), "channels_last"),
                     ((512, 7), "contiguous"), ((4, 5, 6, 7, 8), "channels_last"),
                     # C = 8 and 51200 values: by channel for 1 and 2 threads (C >= 4 * threads),
                     # blocks spread over the threads for 3 and more (channels_first_reduce_apply).
                     ((16, 8, 20, 20), "contiguous")]


def run_everything(x, dtype):
    """Train forward + backward (all gradients, running statistics) and eval forward."""
    channels = x.shape[1]
    weight, bias = torch.linspace(0.5, 1.5, channels), torch.linspace(-1, 1, channels)
    grad = torch.linspace(-2, 2, x.numel()).reshape(x.shape).to(dtype)
    results = forward_backward(batchnorm_ext.batch_norm, x, weight, bias,
                               [torch.zeros(channels), torch.ones(channels)], grad=grad)
    results.append(batchnorm_ext.batch_norm(x, results[4], results[5], weight, bias, training=False))
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,layout", DETERMINISM_CASES, ids=str)
def test_same_bits_for_any_thread_count(capability, shape, layout, dtype):
    """Identical bits for 1, 2, 3, 4 and 8 threads, and from run to run (native's
    channels-last path does not give this: its reductions follow the thread split)."""
    x = make_input(shape, dtype, layout, scale=3, offset=1)
    previous = torch.get_num_threads()
    try:
        reference = None
        for threads in THREAD_COUNTS:
            torch.set_num_threads(threads)
            for _ in range(2):
                results = run_everything(x, dtype)
                if reference is None:
                    reference = results
                for a, b in zip(results, reference):
                    assert torch.equal(a, b), threads
    finally:
        torch.set_num_threads(previous)


# --------------------------------------------------------------------------------------
# Concurrency, memory.


def test_concurrent_calls_from_python_threads():
    """Several Python threads calling at once, each on its own data: all correct."""
    inputs = [make_input((4 + i, 3 + i % 4, 9, 9), torch.float32,
                         LAYOUTS[i % 2], offset=i) for i in range(8)]
    expected = [run_everything(x, torch.float32) for x in inputs]
    failures = []

    def work(i):
        try:
            for _ in range(20):
                for a, b in zip(run_everything(inputs[i], torch.float32), expected[i]):
                    assert torch.equal(a, b)
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append(repr(e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not failures, failures


def resident_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def test_no_memory_growth_over_thousands_of_calls():
    """Forward, backward and error paths, thousands of times: resident memory stays put."""
    bn = batchnorm_ext.BatchNorm2d(16)
    x = torch.randn(8, 16, 12, 12, requires_grad=True)
    bad = torch.randn(1, 16, 1, 1)

    def round_of_calls(n):
        for _ in range(n):
            bn(x).sum().backward()
            bn(x.detach().contiguous(memory_format=torch.channels_last))
            for call in (lambda: bn(bad), lambda: batchnorm_ext.batch_norm(x, torch.zeros(3), None),
                         lambda: batchnorm_ext.batch_norm(x.long(), None, None, training=True)):
                try:
                    call()
                except (ValueError, RuntimeError, NotImplementedError):
                    pass
        gc.collect()

    round_of_calls(300)  # warm up: allocator caches, lazy initialisation
    before = resident_kib()
    round_of_calls(3000)
    growth = resident_kib() - before
    assert growth < 4 * 1024, f"resident memory grew by {growth} KiB"


def zero_tensor_without_memory(shape, dtype):
    """A tensor of zeros over a private anonymous mapping: pages never written read as the
    kernel's shared zero page (a huge page where it can), so 4 GiB of it cost no memory and
    reading them takes well under a second.  (torch.zeros of 4 GiB takes ~15 s here, most
    of it faulting pages in.)"""
    nbytes = math.prod(shape) * dtype.itemsize
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        mapping.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(mapping, dtype=dtype).view(shape)


def exact_moments(markers, count):
    """Mean and biased variance, in float64, of `count` values: zeros but for `markers`."""
    m = markers.double()
    mean = m.sum().item() / count
    m2 = (m - mean).square().sum().item() + (count - m.numel()) * mean**2
    return mean, m2 / count


@pytest.mark.skipif(sys.maxsize < 2**32 or not hasattr(mmap, "MAP_PRIVATE"),
                    reason="needs a 64-bit address space and mmap with MAP_PRIVATE")
@pytest.mark.parametrize("layout", ["channels first", "rows"])
def test_more_than_2_to_the_31_values_statistics(layout):
    """64-bit indexing in the reductions, in the default suite: batch statistics
    (batch_norm_stats) and gradient sums (batch_norm_backward_reduce) of a bfloat16 tensor
    of 2**31 + 2048 values, C = 2, as (1, 2, 2**30 + 1024) and as rows (2**30 + 1024, 2).
    The values are zeros but for markers in the first and last 1024 of each channel, so the
    exact results are known, and the last markers lie past 2**31: an index that wrapped at
    2**31 would miss or misplace them.  The outputs (4 GiB more, written) are left to
    test_more_than_2_to_the_31_values (slow): faulting them in takes ~20 s here."""
    n = 2**30 + 1024
    shape = (1, 2, n) if layout == "channels first" else (n, 2)
    x = zero_tensor_without_memory(shape, torch.bfloat16)
    dy = zero_tensor_without_memory(shape, torch.bfloat16)
    channel = (lambda t, c: t[0, c]) if layout == "channels first" else (lambda t, c: t[:, c])
    positions = torch.cat([torch.arange(1024), torch.arange(n - 1024, n)])
    markers, grad_markers = [], []
    for c in range(2):
        values = (torch.arange(2048, dtype=torch.float32).remainder(97) - 40 + 13 * c).bfloat16()
        grads = (torch.arange(2048, dtype=torch.float32).remainder(7) - 2 - c).bfloat16()
        channel(x, c)[positions] = values
        channel(dy, c)[positions] = grads
        markers.append(values)
        grad_markers.append(grads)
    assert x.numel() > 2**31 and x.view(-1)[2**31:].abs().sum() > 0  # markers past 2**31

    mean, var = batchnorm_ext.ops.batch_norm_stats(x)
    # Blocks are summed in float32 (as native sums), so a few float32 ulps relative: a lost
    # or misplaced marker would be off by percents.
    for c in range(2):
        expected_mean, expected_var = exact_moments(markers[c], n)
        assert mean[c].item() == pytest.approx(expected_mean, rel=1e-6), c
        assert var[c].item() == pytest.approx(expected_var, rel=1e-6), c

    sums = batchnorm_ext.ops.batch_norm_backward_reduce(dy, x, mean, var, 1e-5)
    for c in range(2):
        g, v = grad_markers[c].double(), markers[c].double()
        assert sums[0, c].item() == pytest.approx(g.sum().item(), rel=1e-6), c
        # sum(dy * (x - mean)): dy is zero but at the markers.
        expected = (g * (v - mean[c].item())).sum().item()
        assert sums[1, c].item() == pytest.approx(expected, rel=1e-6), c


@pytest.mark.slow
def test_more_than_2_to_the_31_values():
    """64-bit indexing: a bfloat16 tensor of 2**31 + 2 * 1024 values (4 GiB; off by
    default, run with -m slow).  Its statistics against float64 sums, taken in pieces."""
    channels, n = 2, (2**30 + 1024)
    x = torch.empty(1, channels, n, dtype=torch.bfloat16)
    for c in range(channels):
        x[0, c].copy_(torch.arange(n, dtype=torch.float32).remainder_(1000).sub_(500 * c))
    _, mean, var = batchnorm_ext.ops.batch_norm_forward(x, None, None, None, None, True, 1e-5)
    for c in range(channels):
        total, total_sq = 0.0, 0.0
        for piece in x[0, c].split(2**26):
            p = piece.double()
            total += p.sum().item()
            total_sq += (p * p).sum().item()
        expected_mean = total / n
        expected_var = total_sq / n - expected_mean**2
        assert abs(mean[c].item() - expected_mean) < 1e-6 * (abs(expected_mean) + 1)
        assert abs(var[c].item() - expected_var) < 1e-6 * expected_var
    y = batchnorm_ext.batch_norm(x, None, None, training=True)
    assert torch.isfinite(y[0, 1, -4096:]).all() and y.shape == x.shape

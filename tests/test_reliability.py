"""Reliability: adversarial numerics against a float64 oracle, bit-identical results for
any thread count, concurrent calls, no memory growth, and 64-bit indexing.

Every accuracy test runs once per kernel build this CPU can run (the `capability`
fixture): the builds sum in vectors of different widths (16 float lanes with AVX-512, 8
with AVX2 and DEFAULT), so their rounding differs, and a bound that one build meets by
luck would fail on a CPU whose best build is another."""
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
def test_large_offsets(capability, offset, layout):
    """N(offset, 1) in float32: every result at least as accurate as native's."""
    x = make_input((8, 5, 12, 12), torch.float32, layout, offset=offset)
    errors, _ = errors_against_oracle(x, torch.float32, layout)
    names = ["output", "grad_input", "grad_weight", "grad_bias", "running_mean", "running_var"]
    for name, ours, native, ulp in zip(names, errors["ours"], errors["native"], errors["ulp"]):
        assert ours <= native + ulp, (name, ours, native)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("std", [1e-3, 1e-6])
def test_tiny_variance(capability, std, layout):
    """Variance far below eps, around an offset of 1: still as accurate as native."""
    x = make_input((8, 5, 9, 9), torch.float32, layout, scale=std, offset=1.0)
    errors, _ = errors_against_oracle(x, torch.float32, layout)
    for ours, native, ulp in zip(errors["ours"], errors["native"], errors["ulp"]):
        assert ours <= native + ulp, (ours, native)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_denormal_inputs(capability, layout):
    """Denormal values (~1e-39, below float32's smallest normal) normalized as any others:
    every result against a float64 computation of the same input.  No bias (and a unit
    weight), so that the output is (x - mean) / sqrt(eps), ~1e-37: a kernel that ignored
    or flushed the input would give zeros, off by all of it."""
    x = make_input((6, 4, 7, 7), torch.float32, layout, scale=1e-39)
    assert (x != 0).all() and (x.abs() < torch.finfo(torch.float32).tiny).all()
    # A gradient of small integers: then grad_bias, a plain sum of it, is exact in float32
    # in any order of summation (integers far below 2**24), so it must come out exact; with
    # a random gradient its rounding depends on the lane count of the kernel build.
    grad = torch.randint(-4, 5, (6, 4, 7, 7)).float()
    grad = grad.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else grad
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
    invstd = 1e-5 ** -0.5  # the variance (~1e-78) is nothing next to eps
    x64, grad64 = x.double(), grad.double()
    dims = [0, 2, 3]
    deviations = x64 - x64.mean(dims, keepdim=True)
    for name, ours, native, oracle in zip(names, results["ours"], results["native"], results["oracle"]):
        ours_error = (ours.double() - oracle).abs().max().item()
        native_error = (native.double() - oracle).abs().max().item()
        # Float32 rounding of the largest result, and no less than half the spacing of
        # float32 denormals (2**-150): a denormal result cannot be closer than that.
        rounding = max(2 * torch.finfo(torch.float32).eps * oracle.abs().max().item(), 2.0**-150)
        if name == "grad_bias":
            assert ours_error == 0 and native_error == 0, (ours_error, native_error)
        elif name == "grad_weight":
            # sum(dy * (x - mean)) * invstd, a sum of 294 terms per channel: float32 sums of
            # n terms, in whatever order (lanes, blocks), are within (n - 1) * eps / 2 of
            # the sum of their magnitudes (Higham, Accuracy and Stability of Numerical
            # Algorithms, 4.2), plus the mean's rounding to float's denormal spacing
            # (2**-150) times sum |dy|, then the rounding of the result.
            terms = (grad64 * deviations).abs().sum(dims)
            n = x.numel() // x.shape[1]
            summation = (n - 1) * torch.finfo(torch.float32).eps / 2 * terms
            bound = ((summation + 2.0**-150 * grad64.abs().sum(dims)) * invstd).max().item()
            assert ours_error <= bound + rounding, (name, ours_error, bound, rounding)
        elif name == "output":
            # (x - mean) * invstd: the mean, rounded to float's denormal spacing (at most
            # 2**-150 off), times invstd, then the rounding of the result.
            assert ours_error <= 2.0**-150 * invstd + rounding, (name, ours_error)
        else:
            # grad_input, running_mean and running_var: no sum of the denormals decides them
            # (grad_input ~ (dy - mean(dy)) * invstd; the running statistics are the batch
            # statistics, rounded, times momentum): as accurate as native's.
            assert ours_error <= max(native_error, rounding), (name, ours_error, native_error)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype,big", [(torch.float16, 6e4), (torch.bfloat16, 3e38),
                                       (torch.float32, 3e38)])
def test_near_overflow(capability, dtype, big, layout):
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
def test_double_input_with_a_mean_beyond_1e154(capability, layout):
    """float64 values around 1.5e154: the mean's square overflows double, so Chan's merge
    into an empty set must not multiply it by the empty count (inf * 0: an M2 of NaN, which
    channels-last data got, and native does not).  Outputs and running statistics finite
    and native's."""
    x = 1.5e154 + 1e152 * torch.randn(4, 3, 2, 2, dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    results = []
    for fn in (batchnorm_ext.batch_norm, F.batch_norm):
        running = [torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)]
        results.append([fn(x, *running, training=True), *running])
    for name, ours, native in zip(["output", "running_mean", "running_var"], *results):
        assert ours.isfinite().all(), name
        # Both subtract a mean of ~1.5e154 from values ~1e152 apart: each rounds by about
        # 150 (their ratio) times float64's eps, relative to the result.
        torch.testing.assert_close(ours, native, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "inf and -inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_and_inf_propagate_as_native(capability, bad, dtype, layout):
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


def markers_summing_to_zero(count, first):
    """`count` (a multiple of 16) small integers, exact in bfloat16, which come in pairs 8
    apart in each group of 16: value v at 16 g + i and -v at 16 g + i + 8 (i < 8)."""
    magnitude = torch.arange(count // 2) % 29 + first
    return torch.stack([magnitude.view(-1, 8), -magnitude.view(-1, 8)], 1).reshape(-1).float()


@pytest.mark.skipif(sys.maxsize < 2**32 or not hasattr(mmap, "MAP_PRIVATE"),
                    reason="needs a 64-bit address space and mmap with MAP_PRIVATE")
@pytest.mark.parametrize("layout", ["channels first", "rows"])
def test_more_than_2_to_the_31_values_statistics(capability, layout):
    """64-bit indexing in the reductions, in the default suite: batch statistics
    (batch_norm_stats) and gradient sums (batch_norm_backward_reduce) of a bfloat16 tensor
    of 2**31 + 2048 values, C = 2, as (1, 2, 2**30 + 1024) and as rows (2**30 + 1024, 2).
    The values are zeros but for markers in the first and last 1024 of each channel, and
    the last markers lie past 2**31: an index that wrapped at 2**31 would miss or misplace
    them.  The outputs (4 GiB more, written) are left to test_more_than_2_to_the_31_values
    (slow): faulting them in takes ~20 s here.

    The markers are small integers chosen so that every result is exact in any kernel
    build, and is asserted to the bit: the markers cancel in pairs 8 apart within aligned
    groups of 16, so every float32 sum the kernels take of them (a block of whole vectors in
    channels-first data; a lane, which sees every 4th or 8th row, in rows) is an integer sum
    of far less than 2**24 (exact) that comes out 0.  So each block's mean is 0, its M2 the
    exact integer sum(v**2), Chan's merges of zero means change nothing, and the only
    rounding left is var = M2 / count in double.  The backward sums are taken around a mean
    of 0: sum(dy) and sum(dy * x) are integer sums, exact.  A lost or misplaced marker
    changes them by at least 1."""
    n = 2**30 + 1024
    shape = (1, 2, n) if layout == "channels first" else (n, 2)
    x = zero_tensor_without_memory(shape, torch.bfloat16)
    dy = zero_tensor_without_memory(shape, torch.bfloat16)
    channel = (lambda t, c: t[0, c]) if layout == "channels first" else (lambda t, c: t[:, c])
    positions = torch.cat([torch.arange(1024), torch.arange(n - 1024, n)])
    markers, grad_markers = [], []
    for c in range(2):
        values = markers_summing_to_zero(2048, first=1 + 13 * c)
        grads = torch.arange(2048, dtype=torch.float32).remainder(7) - 2 - c
        assert torch.equal(values.bfloat16().float(), values) and values.abs().max() < 64
        # What the docstring claims: every aligned group of 16 sums to 0, and so do the
        # values every 4th and every 8th (a lane's share of rows, for 8 or 16 lanes and C = 2).
        assert (values.view(-1, 16).sum(1) == 0).all()
        assert (values.view(-1, 4).sum(0) == 0).all() and (values.view(-1, 8).sum(0) == 0).all()
        channel(x, c)[positions] = values.bfloat16()
        channel(dy, c)[positions] = grads.bfloat16()
        markers.append(values.long())
        grad_markers.append(grads.long())
    assert x.numel() > 2**31 and x.view(-1)[2**31:].abs().sum() > 0  # markers past 2**31

    mean, var = batchnorm_ext.ops.batch_norm_stats(x)
    for c in range(2):
        assert mean[c].item() == 0.0, (c, mean[c].item())
        assert var[c].item() == float((markers[c] ** 2).sum().item()) / n, (c, var[c].item())

    sums = batchnorm_ext.ops.batch_norm_backward_reduce(dy, x, torch.zeros(2, dtype=torch.float64),
                                                        var, 1e-5)
    for c in range(2):
        assert sums[0, c].item() == grad_markers[c].sum().item(), c
        assert sums[1, c].item() == (grad_markers[c] * markers[c]).sum().item(), c


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

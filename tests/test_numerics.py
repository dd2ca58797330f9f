"""Accuracy against a float64 oracle: large offsets, constant channels, and every kernel
build (AVX-512, AVX2, plain) on every layout.  Each test runs once per kernel build this
CPU can run (the `capability` fixture): their vector widths differ, and so does their
rounding."""
import pytest
import torch
import torch.nn.functional as F

import batchnorm_ext
from helpers import assert_close, available_capabilities, make_input


def oracle(x, weight=None, bias=None):
    """Batch norm in float64 from the (exactly representable) input: output, mean, var."""
    x = x.double()
    dims = [0] + list(range(2, x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).square().mean(dims, keepdim=True)
    y = (x - mean) / (var + 1e-5).sqrt()
    return y, mean.flatten(), var.flatten()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("offset", [1e4, 1e5])
def test_large_offset_no_worse_than_native(capability, offset, layout):
    """float32 input drawn from N(offset, 1): the output's error against the float64 oracle
    is no worse than native's (native sums in double; we subtract each block's mean)."""
    x = make_input((8, 6, 20, 20), torch.float32, layout, offset=offset)
    expected, mean, var = oracle(x)
    ours = batchnorm_ext.batch_norm(x, None, None, training=True)
    native = F.batch_norm(x, None, None, training=True)
    ours_error = (ours.double() - expected).abs().max().item()
    native_error = (native.double() - expected).abs().max().item()
    assert ours_error <= native_error, (ours_error, native_error)
    _, our_mean, our_var = batchnorm_ext.ops.batch_norm_forward(x, None, None, None, None, True, 1e-5)
    assert (our_mean.double() - mean).abs().max() <= offset * 2 ** -24  # half an ulp of the mean
    assert_close(our_var.double(), var, rtol=1e-5, atol=0)


def test_naive_one_pass_formula_fails_where_we_do_not(capability):
    """E[x^2] - E[x]^2 in float32 loses the variance of N(1e4, 1) data entirely; ours does not."""
    x = torch.randn(64, 4, 32, 32) + 1e4
    dims = [0, 2, 3]
    naive_var = (x * x).mean(dims) - x.mean(dims).square()
    _, _, true_var = oracle(x)
    _, _, our_var = batchnorm_ext.ops.batch_norm_forward(x, None, None, None, None, True, 1e-5)
    assert (naive_var.double() - true_var).abs().max() > 0.5       # off by more than half
    assert (our_var.double() - true_var).abs().max() < 1e-4


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_constant_channels(capability, layout):
    x = torch.full((4, 3, 5, 5), 7.0)
    x[:, 1] = -2.5
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    y = batchnorm_ext.batch_norm(x, None, None, training=True)
    assert torch.equal(y, torch.zeros_like(y))
    _, mean, var = batchnorm_ext.ops.batch_norm_forward(x, None, None, None, None, True, 1e-5)
    assert torch.equal(mean, torch.tensor([7.0, -2.5, 7.0], dtype=torch.float64))
    assert torch.equal(var, torch.zeros(3, dtype=torch.float64))


SHAPES = [(2, 3, 4, 4), (16, 3, 9, 9), (5, 40, 7, 7), (3, 64, 2, 2), (33, 21), (4, 19, 3, 2, 5),
          (2, 5, 100, 30)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_every_kernel_build(capability, shape, layout, dtype):
    """Each instruction-set build of the kernels, against native: forward, backward, eval."""
    x = make_input(shape, dtype, layout, scale=3, offset=2)
    w, b = torch.rand(shape[1], dtype=dtype) + 0.5, torch.randn(shape[1], dtype=dtype)
    rm, rv = torch.randn(shape[1], dtype=dtype), torch.rand(shape[1], dtype=dtype) + 0.5
    grad = make_input(shape, dtype)
    for training in (True, False):
        results = []
        for fn in (batchnorm_ext.batch_norm, F.batch_norm):
            xx, ww, bb = (t.clone().requires_grad_() for t in (x, w, b))
            y = fn(xx, rm.clone(), rv.clone(), ww, bb, training=training)
            y.backward(grad)
            results.append((y, xx.grad, ww.grad, bb.grad))
        for ours, native in zip(*results):
            assert_close(ours, native, scale=max(1.0, native.abs().max().item()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
# Channels-last with 40 and 80 channels: periods of an odd number of vectors (AVX2's 8 floats,
# the 16 of AVX-512 in bfloat16), whose last vector is streamed alone, after the whole lines
@pytest.mark.parametrize("shape,layout", [((4, 3, 1001, 1003), "contiguous"),
                                          ((4, 64, 181, 181), "channels_last"),
                                          ((4, 40, 160, 170), "channels_last"),
                                          ((2, 80, 160, 170), "channels_last"),
                                          ((8, 3, 701, 1001), "channels_last")], ids=str)
def test_outputs_beyond_the_cache(shape, layout, dtype):
    """Outputs of 16 MiB and more are written with streaming stores (past the cache), from
    the first aligned vector of each run: forward and backward.  Millions of values per
    channel: native's float32 sums drift here (its channels-last path), so both are held
    to a float64 computation, ours to within rounding of the output dtype.  Ours runs with
    every kernel build this CPU can run (a loop rather than the `capability` fixture: native's
    and the float64 results, the slow part, are computed once)."""
    x = make_input(shape, dtype, layout)
    if dtype == torch.bfloat16:
        x = torch.cat([x, x])  # 16 MiB of bfloat16 needs twice the values
    g = torch.randn_like(x)

    def run(fn, xin):
        xx = xin.clone().requires_grad_()
        y = fn(xx, None, None, training=True)
        y.backward(g.to(xin.dtype))
        stats = torch.zeros(shape[1], dtype=xin.dtype), torch.ones(shape[1], dtype=xin.dtype) * 2
        return y, xx.grad, fn(xin, *stats, training=False)

    def error(result, exact):  # in memory order: a dense walk, not a channels-last one
        assert result.stride() == exact.stride()
        order = sorted(range(result.dim()), key=lambda d: -result.stride(d))
        flat = lambda t: t.permute(order).reshape(-1)
        return (flat(result).double() - flat(exact)).abs().max().item()

    native, oracle = run(F.batch_norm, x), run(F.batch_norm, x.double())
    allowed = [max(error(nat, exact), 4 * torch.finfo(dtype).eps * exact.abs().max().item())
               for nat, exact in zip(native, oracle)]
    previous = batchnorm_ext.cpu_capability()
    try:
        for build in available_capabilities():
            batchnorm_ext.set_cpu_capability(build)
            ours = run(batchnorm_ext.batch_norm, x)
            for ours, nat, exact, bound in zip(ours, native, oracle, allowed):
                assert ours.stride() == nat.stride(), build
                assert error(ours, exact) <= bound, (build, error(ours, exact), bound)
    finally:
        batchnorm_ext.set_cpu_capability(previous)

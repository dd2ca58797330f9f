"""Ours against torch's native batch norm, across shapes, memory layouts, dtypes, train
and eval, affine and not: outputs, output strides, gradients, running statistics."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import batchnorm_ext
from helpers import LAYOUTS, assert_close, leaf, make_input, strided_leaf

SHAPES = [
    (2, 3, 4, 4),      # the seed example's shape
    (1, 5, 7, 7),      # N = 1, H * W > 1
    (9, 4, 1, 1),      # H * W = 1, N > 1: rows of C values
    (4, 1, 6, 6),      # C = 1
    (3, 300, 3, 3),    # large C, odd spatial size
    (3, 7, 5, 11),     # odd sizes everywhere
    (2, 3, 50, 50),    # planes bigger than a block (2048 values)
    (17, 3, 5),        # 3-D
    (6, 5),            # 2-D
    (3, 4, 3, 5, 2),   # 5-D
    (65, 19),          # 2-D with rows beyond several periods of lanes
]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def run(fn, x, weight, bias, running_mean, running_var, training, grad):
    """fn's output, input/weight/bias gradients and the running statistics after one call,
    on an input with x's strides (a leaf copy of a sliced x would be contiguous)."""
    _, x = strided_leaf(x)
    weight, bias = leaf(weight), leaf(bias)
    running_mean = None if running_mean is None else running_mean.clone()
    running_var = None if running_var is None else running_var.clone()
    out = fn(x, running_mean, running_var, weight, bias, training=training)
    out.backward(grad)
    return out, x.grad, weight.grad, bias.grad, running_mean, running_var


# What each layout must be, so that no case silently tests another.
IS_LAYOUT = {
    "contiguous": lambda t: t.is_contiguous(),
    "channels_last": lambda t: t.dim() not in (4, 5) or t.is_contiguous(
        memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d),
    "sliced": lambda t: t.stride(-1) == 2 and not t.is_contiguous(),  # not dense
    # (Two last dimensions of size 1 swapped are the same memory as contiguous.)
    "permuted": lambda t: (t.stride(-2) == 1 and not t.is_contiguous()) or min(t.shape[-2:]) == 1,
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_functional_matches_native(shape, layout, dtype, training):
    x = make_input(shape, dtype, layout, scale=2.0, offset=0.5)
    channels = shape[1]
    weight = torch.rand(channels, dtype=dtype) + 0.5
    bias = torch.randn(channels, dtype=dtype)
    running_mean = torch.randn(channels, dtype=dtype)
    running_var = torch.rand(channels, dtype=dtype) + 0.5
    grad = make_input(shape, dtype, "contiguous")
    assert IS_LAYOUT[layout](x) and IS_LAYOUT[layout](strided_leaf(x)[1]), x.stride()

    ours = run(batchnorm_ext.batch_norm, x, weight, bias, running_mean, running_var, training, grad)
    native = run(F.batch_norm, x, weight, bias, running_mean, running_var, training, grad)

    names = ["output", "grad_input", "grad_weight", "grad_bias", "running_mean", "running_var"]
    for name, a, b in zip(names, ours, native):
        # grad_weight and grad_bias are sums of N * H * W values: allow for their size.
        scale = max(1.0, b.abs().max().item()) if name in ("grad_weight", "grad_bias") else 1.0
        assert_close(a, b, scale=scale, msg=lambda m: f"{name}: {m}")
    assert ours[0].stride() == native[0].stride(), "output memory format differs from native"
    assert ours[1].stride() == native[1].stride(), "grad_input memory format differs from native"

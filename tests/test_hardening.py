"""Regression tests for what the hardening review (issue 10) found in the operators:
output memory formats, empty inputs of every kind, and argument checks of SyncBatchNorm's
steps."""
import pytest
import torch
import torch.nn.functional as F

import batchnorm_ext
from batchnorm_ext import ops


def _ambiguous():
    # Strides that are channels-last and not contiguous at once (size-1 dimensions):
    # native keeps channels-last, suggest_memory_format() says contiguous.
    return torch.arange(6.0).reshape(1, 3, 2, 1).permute(0, 2, 1, 3)


def _inputs():
    yield "ambiguous", _ambiguous()
    yield "ambiguous_5d", torch.arange(12.0).reshape(1, 3, 2, 1, 2).permute(0, 2, 1, 3, 4)
    yield "size1_spatial_cl", torch.randn(4, 5, 1, 1).contiguous(memory_format=torch.channels_last)
    yield "size1_batch_cl", torch.randn(1, 5, 3, 4).contiguous(memory_format=torch.channels_last)
    yield "size1_channel", torch.randn(3, 1, 4, 4).contiguous(memory_format=torch.channels_last)
    yield "channels_last", torch.randn(2, 5, 3, 4).contiguous(memory_format=torch.channels_last)
    yield "channels_last_3d", torch.randn(2, 5, 3, 2, 2).contiguous(memory_format=torch.channels_last_3d)
    yield "sliced", torch.randn(2, 5, 3, 8)[..., ::2]
    yield "permuted", torch.randn(2, 5, 4, 3).transpose(2, 3)
    yield "expanded_batch", torch.randn(1, 5, 3, 3).expand(4, 5, 3, 3)


INPUTS = dict(_inputs())


@pytest.mark.parametrize("name", list(INPUTS))
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("strided_weight", [False, True])
def test_output_strides_follow_native(name, training, strided_weight):
    x = INPUTS[name]
    channels = x.shape[1]
    weight = torch.rand(2 * channels)[::2] + 0.5 if strided_weight else torch.rand(channels) + 0.5
    bias = torch.randn(channels)
    native = F.batch_norm(x, torch.zeros(channels), torch.ones(channels), weight, bias, training)
    ours = batchnorm_ext.batch_norm(x, torch.zeros(channels), torch.ones(channels), weight, bias,
                                    training)
    assert ours.stride() == native.stride()
    torch.testing.assert_close(ours, native)


@pytest.mark.parametrize("name", list(INPUTS))
@pytest.mark.parametrize("grad_layout", ["same", "contiguous", "channels_last"])
def test_grad_input_strides_follow_native(name, grad_layout):
    x = INPUTS[name]
    channels = x.shape[1]
    grads = {}
    for which, bn in (("native", F.batch_norm), ("ours", batchnorm_ext.batch_norm)):
        leaf = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
        if x.stride() != leaf.stride():  # clone makes some strided inputs dense: keep x's
            leaf = x.detach().requires_grad_()
        y = bn(leaf, None, None, torch.ones(channels), torch.zeros(channels), True)
        dy = torch.ones_like(y) * torch.arange(y.numel()).reshape(y.shape).sin()
        if grad_layout == "contiguous":
            dy = dy.contiguous()
        elif grad_layout == "channels_last" and dy.dim() == 4:
            dy = dy.contiguous(memory_format=torch.channels_last)
        (grads[which],) = torch.autograd.grad(y, leaf, dy)
    assert grads["ours"].stride() == grads["native"].stride()
    # Values against the float64 autograd of the formula, not native: for the ambiguous
    # input with a contiguous grad_output, native's backward (torch 2.13) reads the input
    # as if it were contiguous and returns a wrong gradient.
    oracle_x = x.detach().double().requires_grad_()
    mean = oracle_x.mean([0, *range(2, x.dim())], keepdim=True)
    var = oracle_x.var([0, *range(2, x.dim())], unbiased=False, keepdim=True)
    (oracle,) = torch.autograd.grad((oracle_x - mean) / (var + 1e-5).sqrt(), oracle_x, dy.double())
    torch.testing.assert_close(grads["ours"], oracle.float(), rtol=1e-5, atol=1e-5)


def test_fake_kernels_give_the_same_strides():
    from torch._subclasses.fake_tensor import FakeTensorMode
    for name, x in INPUTS.items():
        channels = x.shape[1]
        real = ops.batch_norm_forward(x, None, None, None, None, True, 1e-5)[0]
        with FakeTensorMode() as mode:
            fake_x = mode.from_tensor(x)
            fake = ops.batch_norm_forward(fake_x, None, None, None, None, True, 1e-5)[0]
        assert fake.stride() == real.stride(), name


# Empty inputs: a dimension of size 0 anywhere.  The kernels themselves must handle them
# (no division by a zero size), in both layouts.
EMPTY_SHAPES = [(0, 3, 4, 4), (4, 3, 0, 5), (4, 3, 5, 0), (0, 3), (0, 3, 7)]


@pytest.mark.parametrize("shape", EMPTY_SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_empty_inputs_like_native(shape, channels_last, training):
    x = torch.randn(shape)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    channels = shape[1]
    results = {}
    for which, bn in (("native", F.batch_norm), ("ours", batchnorm_ext.batch_norm)):
        leaf = x.detach().clone().requires_grad_()
        weight = torch.ones(channels, requires_grad=True)
        bias = torch.zeros(channels, requires_grad=True)
        rm, rv = torch.zeros(channels), torch.ones(channels)
        y = bn(leaf, rm, rv, weight, bias, training)
        grads = torch.autograd.grad(y.sum(), (leaf, weight, bias), allow_unused=True)
        results[which] = (y, rm, rv, *grads)
    for ours, native in zip(results["ours"], results["native"]):
        assert (ours is None) == (native is None)
        if ours is not None:
            assert ours.shape == native.shape and ours.stride() == native.stride()
            torch.testing.assert_close(ours, native, equal_nan=True)


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (4, 3, 0, 5), (4, 0, 3, 3)])
def test_empty_inputs_at_the_operators(shape):
    x = torch.randn(shape)
    channels = shape[1]
    _, mean, var = ops.batch_norm_forward(x, None, None, None, None, True, 1e-5)
    assert mean.shape == (channels,) and mean.isnan().all() and var.isnan().all()
    dx, dw, db = ops.batch_norm_backward(x, x, torch.ones(channels), None, None, mean, var, True,
                                         1e-5, [True, True, True])
    assert dx.shape == x.shape and (dw == 0).all() and (db == 0).all()
    # SyncBatchNorm's steps: an empty batch contributes zero statistics and zero sums.
    mean, var = ops.batch_norm_stats(x)
    assert (mean == 0).all() and (var == 0).all()
    sums = ops.batch_norm_backward_reduce(x, x, mean, var, 1e-5)
    assert sums.shape == (2, channels) and (sums == 0).all()


def test_backward_apply_refuses_a_count_of_zero():
    x = torch.randn(4, 3, 2, 2)
    mean, var = ops.batch_norm_stats(x)
    sums = ops.batch_norm_backward_reduce(x, x, mean, var, 1e-5)
    with pytest.raises(RuntimeError, match="count must be positive"):
        ops.batch_norm_backward_apply(x, x, None, mean, var, sums, 0, 1e-5)
    # A count of the values of all processes is fine, and an empty input needs none.
    assert ops.batch_norm_backward_apply(x, x, None, mean, var, sums, 16, 1e-5).isfinite().all()
    empty = torch.randn(0, 3, 2, 2)
    assert ops.batch_norm_backward_apply(empty, empty, None, mean, var, sums, 0, 1e-5).numel() == 0

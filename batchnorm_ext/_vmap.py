"""vmap rules of the operators, with the semantics of native's batching rule
(aten/src/ATen/functorch/BatchRulesNorm.cpp): a batch norm of a vmapped input normalizes each
slice on its own.

The vmapped dimension is folded into the channel dimension, (B, N, C, *) -> (N, B*C, *), so
that one kernel call normalizes every slice, each channel of each slice with its own
statistics; arguments that are not vmapped are expanded to B.  In training, a vmapped input
whose running statistics are not vmapped is an error, with native's message (they would be
updated in place once per slice).  The composite batch_norm has no rule of its own: under
vmap it decomposes into these (csrc/autograd.cpp).

Each rule checks its arguments as one slice first (the Python copies of the kernels'
checks, _ops.py), so that an error says what it says without vmap, and not the sizes of the
folded call.
"""
import torch
from torch.library import register_vmap

from ._ops import (_check_batch_statistics, _check_like_input, check_activation, check_inputs,
                   check_sizes, ops)

# native's messages (BatchRulesNorm.cpp; and vmap's for .item(), which native's modules call
# on num_batches_tracked when momentum is None)
RUNNING_STATS_NOT_BATCHED = (
    "Batch norm got a batched tensor as input while the running_mean or running_var, which will "
    "be updated in place, were not batched.\nIf you are using a module and do not need eval mode, "
    "please set `track_running_stats` to be False.If you are using a prebuilt module and do not "
    "need eval mode, please see the functorch website for resources on how to patch your module "
    "to work with vmap")
ITEM_UNDER_VMAP = (
    "vmap: It looks like you're calling .item() on a Tensor. We don't support vmap over calling "
    ".item() on a Tensor, please try to rewrite what you're doing with other operations. If error "
    "is occurring somewhere inside PyTorch internals, please file a bug report.")


def _slice(t, bdim):
    """A stand-in for one slice of t, for the checks: its shape, dtype and device, no data."""
    if t is None or bdim is None:
        return t
    return t.new_empty(()).expand(t.shape[:bdim] + t.shape[bdim + 1:])


def _stacked(t, bdim, size):
    """t with the vmapped dimension first, expanded to `size` slices if t is not vmapped."""
    if t is None:
        return None
    return t.expand(size, *t.shape) if bdim is None else t.movedim(bdim, 0)


def _fold(x, bdim, size):
    """(N, C, *) slices as one (N, size*C, *) tensor: slice b has channels b*C to b*C + C - 1."""
    return None if x is None else _stacked(x, bdim, size).movedim(0, 1).flatten(1, 2)


def _fold_channels(t, bdim, size):
    """(C,) slices (parameters, statistics) as one (size*C,) tensor, in the same order."""
    return None if t is None else _stacked(t, bdim, size).flatten(0, 1)


def _affine(normalized, weight, w_bdim, bias, b_bdim, size):
    """normalized * weight + bias for vmapped weight or bias, (size, N, C, *), computed in
    float32 or wider as the kernels do."""
    compute = torch.promote_types(normalized.dtype, torch.float32)
    shape = (size, 1, -1) + (1,) * (normalized.dim() - 2)
    out = normalized.to(compute)
    if weight is not None:
        out = out * _stacked(weight, w_bdim, size).to(compute).reshape(shape)
    if bias is not None:
        out = out + _stacked(bias, b_bdim, size).to(compute).reshape(shape)
    return out.to(normalized.dtype)


@register_vmap("batchnorm_ext::batch_norm_forward")
def _forward_vmap(info, in_dims, input, weight, bias, running_mean, running_var, training, eps):
    x_dim, w_dim, b_dim, rm_dim, rv_dim = in_dims[:5]
    size = info.batch_size
    one = (_slice(input, x_dim), _slice(weight, w_dim), _slice(bias, b_dim),
           _slice(running_mean, rm_dim), _slice(running_var, rv_dim))
    # In native's order: sizes, the batching of the running statistics, then the rest.
    check_sizes(*one)
    if training and x_dim is not None and (
            (running_mean is not None and rm_dim is None) or (running_var is not None and rv_dim is None)):
        raise RuntimeError(RUNNING_STATS_NOT_BATCHED)
    check_inputs(*one, training)
    channels = one[0].shape[1]

    if x_dim is not None or (not training and (rm_dim is not None or rv_dim is not None)):
        # Slices differ in their input or their statistics: all through the kernel at once.
        output, mean, var = ops.batch_norm_forward.default(
            _fold(input, x_dim, size), _fold_channels(weight, w_dim, size),
            _fold_channels(bias, b_dim, size), _fold_channels(running_mean, rm_dim, size),
            _fold_channels(running_var, rv_dim, size), training, eps)
        output = output.unflatten(1, (size, channels))
        if not training:  # the statistics are empty
            return (output, mean, var), (1, None, None)
        return (output, mean.unflatten(0, (size, channels)), var.unflatten(0, (size, channels))), (1, 0, 0)

    # The same input and statistics in every slice (in training the running statistics are
    # only checked): normalize once, and give each slice its weight and bias.
    stats = (None, None) if training else (running_mean, running_var)
    if w_dim is None and b_dim is None:
        return ops.batch_norm_forward.default(input, weight, bias, *stats, training, eps), (None, None, None)
    normalized, mean, var = ops.batch_norm_forward.default(input, None, None, *stats, training, eps)
    return (_affine(normalized, weight, w_dim, bias, b_dim, size), mean, var), (0, None, None)


@register_vmap("batchnorm_ext::batch_norm_backward")
def _backward_vmap(info, in_dims, grad_output, input, weight, running_mean, running_var,
                   save_mean, save_var, training, eps, output_mask, param_dtype=None):
    go_dim, x_dim, w_dim, rm_dim, rv_dim, m_dim, v_dim = in_dims[:7]
    size = info.batch_size
    one_input = _slice(input, x_dim)
    check_inputs(one_input, _slice(weight, w_dim), None, _slice(running_mean, rm_dim),
                 _slice(running_var, rv_dim), training)
    channels = one_input.shape[1]
    grad_input, grad_weight, grad_bias = ops.batch_norm_backward.default(
        _fold(grad_output, go_dim, size), _fold(input, x_dim, size),
        _fold_channels(weight, w_dim, size), _fold_channels(running_mean, rm_dim, size),
        _fold_channels(running_var, rv_dim, size), _fold_channels(save_mean, m_dim, size),
        _fold_channels(save_var, v_dim, size), training, eps, output_mask, param_dtype)
    return ((None if grad_input is None else grad_input.unflatten(1, (size, channels)),
             None if grad_weight is None else grad_weight.unflatten(0, (size, channels)),
             None if grad_bias is None else grad_bias.unflatten(0, (size, channels))),
            (1, 0, 0))


@register_vmap("batchnorm_ext::update_running_stats_")
def _update_vmap(info, in_dims, running_mean, running_var, batch_mean, batch_var, count,
                 momentum, num_batches_tracked):
    rm_dim, rv_dim, m_dim, v_dim = in_dims[:4]
    n_dim = in_dims[6]
    size = info.batch_size
    if momentum is None and n_dim is not None:
        # native's modules take 1 / float(num_batches_tracked): .item() of a vmapped tensor
        raise RuntimeError(ITEM_UNDER_VMAP)
    if rm_dim is None and rv_dim is None and m_dim is None and v_dim is None:
        # only num_batches_tracked is vmapped, and momentum makes it unused: one update
        ops.update_running_stats_.default(running_mean, running_var, batch_mean, batch_var,
                                          count, momentum, num_batches_tracked)
        return None, None
    if rm_dim is None or rv_dim is None:  # one tensor updated in place by every slice
        raise RuntimeError(RUNNING_STATS_NOT_BATCHED)
    # The running statistics of every slice updated by one call, in place: through a flat
    # view where there is one, else through a copy written back.
    stats = [running_mean.movedim(rm_dim, 0), running_var.movedim(rv_dim, 0)]
    flat = [s.view(-1) if s.is_contiguous() else s.reshape(-1) for s in stats]
    ops.update_running_stats_.default(
        flat[0], flat[1], _fold_channels(batch_mean, m_dim, size),
        _fold_channels(batch_var, v_dim, size), count, momentum, num_batches_tracked)
    for s, f in zip(stats, flat):
        if not s.is_contiguous():
            s.copy_(f.view_as(s))
    return None, None


@register_vmap("batchnorm_ext::batch_norm_stats")
def _stats_vmap(info, in_dims, input):
    size = info.batch_size
    one_input = _slice(input, in_dims[0])
    check_inputs(one_input, None, None, None, None, True)
    mean, var = ops.batch_norm_stats.default(_fold(input, in_dims[0], size))
    channels = one_input.shape[1]
    return (mean.unflatten(0, (size, channels)), var.unflatten(0, (size, channels))), (0, 0)


def _check_statistics_slice(input, x_dim, weight, w_dim, bias, b_dim, mean, m_dim, var, v_dim):
    """The checks of the SyncBatchNorm steps that take batch statistics, on one slice."""
    one_input = _slice(input, x_dim)
    check_inputs(one_input, _slice(weight, w_dim), _slice(bias, b_dim), None, None, True)
    _check_batch_statistics(one_input, _slice(mean, m_dim), _slice(var, v_dim))
    return one_input.shape[1]


@register_vmap("batchnorm_ext::batch_norm_apply")
def _apply_vmap(info, in_dims, input, weight, bias, mean, var, eps):
    x_dim, w_dim, b_dim, m_dim, v_dim = in_dims[:5]
    size = info.batch_size
    channels = _check_statistics_slice(input, x_dim, weight, w_dim, bias, b_dim, mean, m_dim,
                                       var, v_dim)
    output = ops.batch_norm_apply.default(
        _fold(input, x_dim, size), _fold_channels(weight, w_dim, size),
        _fold_channels(bias, b_dim, size), _fold_channels(mean, m_dim, size),
        _fold_channels(var, v_dim, size), eps)
    return output.unflatten(1, (size, channels)), 1


@register_vmap("batchnorm_ext::batch_norm_backward_reduce")
def _backward_reduce_vmap(info, in_dims, grad_output, input, mean, var, eps):
    go_dim, x_dim, m_dim, v_dim = in_dims[:4]
    size = info.batch_size
    channels = _check_statistics_slice(input, x_dim, None, None, None, None, mean, m_dim, var,
                                       v_dim)
    sums = ops.batch_norm_backward_reduce.default(
        _fold(grad_output, go_dim, size), _fold(input, x_dim, size),
        _fold_channels(mean, m_dim, size), _fold_channels(var, v_dim, size), eps)
    return sums.unflatten(1, (size, channels)), 1  # (2, B*C) -> (2, B, C)


@register_vmap("batchnorm_ext::batch_norm_backward_apply")
def _backward_apply_vmap(info, in_dims, grad_output, input, weight, mean, var, sums, count, eps):
    go_dim, x_dim, w_dim, m_dim, v_dim, s_dim = in_dims[:6]
    size = info.batch_size
    channels = _check_statistics_slice(input, x_dim, weight, w_dim, None, None, mean, m_dim,
                                       var, v_dim)
    grad_input = ops.batch_norm_backward_apply.default(
        _fold(grad_output, go_dim, size), _fold(input, x_dim, size),
        _fold_channels(weight, w_dim, size), _fold_channels(mean, m_dim, size),
        _fold_channels(var, v_dim, size), _fold(sums, s_dim, size), count, eps)  # (2, B*C)
    return grad_input.unflatten(1, (size, channels)), 1


@register_vmap("batchnorm_ext::batch_norm_act_forward")
def _act_forward_vmap(info, in_dims, input, weight, bias, running_mean, running_var, training,
                      eps, residual, activation):
    x_dim, w_dim, b_dim, rm_dim, rv_dim = in_dims[:5]
    r_dim = in_dims[7]
    size = info.batch_size
    one = (_slice(input, x_dim), _slice(weight, w_dim), _slice(bias, b_dim),
           _slice(running_mean, rm_dim), _slice(running_var, rv_dim))
    check_activation(activation)
    check_sizes(*one)
    if training and x_dim is not None and (
            (running_mean is not None and rm_dim is None) or (running_var is not None and rv_dim is None)):
        raise RuntimeError(RUNNING_STATS_NOT_BATCHED)
    check_inputs(*one, training)
    if residual is not None:
        _check_like_input(one[0], _slice(residual, r_dim), "residual")
    channels = one[0].shape[1]
    # Every slice through the kernel at once (an input that is not vmapped is expanded:
    # its slices differ by their residual or parameters).
    output, mean, var = ops.batch_norm_act_forward.default(
        _fold(input, x_dim, size), _fold_channels(weight, w_dim, size),
        _fold_channels(bias, b_dim, size), _fold_channels(running_mean, rm_dim, size),
        _fold_channels(running_var, rv_dim, size), training, eps, _fold(residual, r_dim, size),
        activation)
    output = output.unflatten(1, (size, channels))
    if not training:  # the statistics are empty
        return (output, mean, var), (1, None, None)
    if x_dim is None:  # the same input in every slice: the same statistics, not vmapped
        return (output, mean[:channels], var[:channels]), (1, None, None)
    return (output, mean.unflatten(0, (size, channels)), var.unflatten(0, (size, channels))), (1, 0, 0)


@register_vmap("batchnorm_ext::batch_norm_act_backward")
def _act_backward_vmap(info, in_dims, grad_output, output, input, weight, bias, running_mean,
                       running_var, save_mean, save_var, training, eps, residual, has_residual,
                       activation, output_mask, param_dtype=None):
    go_dim, y_dim, x_dim, w_dim, b_dim, rm_dim, rv_dim, m_dim, v_dim = in_dims[:9]
    r_dim = in_dims[11]
    size = info.batch_size
    check_activation(activation)
    one_input = _slice(input, x_dim)
    check_inputs(one_input, _slice(weight, w_dim), None, _slice(running_mean, rm_dim),
                 _slice(running_var, rv_dim), training)
    channels = one_input.shape[1]
    grads = ops.batch_norm_act_backward.default(
        _fold(grad_output, go_dim, size), _fold(output, y_dim, size), _fold(input, x_dim, size),
        _fold_channels(weight, w_dim, size), _fold_channels(bias, b_dim, size),
        _fold_channels(running_mean, rm_dim, size), _fold_channels(running_var, rv_dim, size),
        _fold_channels(save_mean, m_dim, size), _fold_channels(save_var, v_dim, size), training,
        eps, _fold(residual, r_dim, size), has_residual, activation, output_mask, param_dtype)
    grad_input, grad_weight, grad_bias, grad_residual = grads
    return ((None if grad_input is None else grad_input.unflatten(1, (size, channels)),
             None if grad_weight is None else grad_weight.unflatten(0, (size, channels)),
             None if grad_bias is None else grad_bias.unflatten(0, (size, channels)),
             None if grad_residual is None else grad_residual.unflatten(1, (size, channels))),
            (1, 0, 0, 1))

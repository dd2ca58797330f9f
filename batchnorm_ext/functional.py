"""batch_norm: torch.nn.functional.batch_norm's signature and behaviour, on our kernels."""
import torch
import torch.autograd.forward_ad as _fwad

from . import _onnx
from ._ops import check_functional_args, check_inputs, ops

_batch_norm = ops.batch_norm.default
_forward = ops.batch_norm_forward.default
_backward = ops.batch_norm_backward.default


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """Batch normalization of `input` (N, C, *) over every dimension but C.

    Like torch.nn.functional.batch_norm: in training, the batch statistics normalize and
    the running statistics (if given) are updated in place with `momentum`; in eval, the
    running statistics normalize.
    """
    if momentum is None:
        raise TypeError("batch_norm(): argument 'momentum' must be float, not NoneType")
    if _onnx.exporting():  # torch.onnx.export(dynamo=True): see _onnx.py
        return _onnx.batch_norm(input, weight, bias, running_mean, running_var, training, eps)
    return _normalize(input, weight, bias, running_mean, running_var, training, momentum, eps,
                      None)


def _normalize(input, weight, bias, running_mean, running_var, training, momentum, eps,
               num_batches_tracked):
    """The one call behind batch_norm and the modules.  momentum=None: cumulative average."""
    if _fwad._current_level >= 0:  # forward-mode AD is on: take the path that has a jvp
        return _batch_norm_with_jvp(input, weight, bias, running_mean, running_var, training,
                                    momentum, eps, num_batches_tracked)
    return _batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps,
                       num_batches_tracked)


def _batch_norm_with_jvp(input, weight, bias, running_mean, running_var, training, momentum,
                         eps, num_batches_tracked):
    # The composite operator's steps (csrc/autograd.cpp, batch_norm), with the forward
    # through a Function that has a jvp.  The running statistics are checked here: in
    # training the Function does not take them.
    check_functional_args(input, training, eps)
    if input.numel() == 0:
        return _batch_norm(input, weight, bias, running_mean, running_var, training, momentum,
                           eps, num_batches_tracked)
    check_inputs(input, weight, bias, running_mean, running_var, training)
    for name, stat in (("running_mean", running_mean), ("running_var", running_var)):
        if stat is not None and stat.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(f"batch_norm is not differentiable with respect to argument "
                               f"'{name}'. This input cannot have requires_grad True.")
    output, save_mean, save_var = _BatchNormFunction.apply(
        input, weight, bias, None if training else running_mean,
        None if training else running_var, training, eps)
    if training and running_mean is not None:
        with torch.no_grad():
            ops.update_running_stats_(running_mean, running_var, save_mean, save_var,
                                      input.numel() // input.shape[1], momentum,
                                      num_batches_tracked)
    return output


def _reduce_dims(x):
    return [0] + list(range(2, x.dim()))


def _per_channel(t, x):
    return t.reshape([1, -1] + [1] * (x.dim() - 2))


class _BatchNormFunction(torch.autograd.Function):
    """batch_norm_forward with a jvp (forward-mode AD), for torch.func.jvp and dual tensors.

    The C++ autograd of the operators has reverse mode only, which is what everything else
    uses.
    """

    @staticmethod
    def forward(input, weight, bias, running_mean, running_var, training, eps):
        return _forward(input, weight, bias, running_mean, running_var, training, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, running_mean, running_var, training, eps = inputs
        _, save_mean, save_var = output
        ctx.training, ctx.eps = training, eps
        given = [p for p in (weight, bias, running_mean, running_var) if p is not None]
        ctx.param_dtype = given[0].dtype if given else input.dtype
        ctx.save_for_backward(input, weight, running_mean, running_var, save_mean, save_var)
        ctx.save_for_forward(input, weight, running_mean, running_var, save_mean, save_var)
        ctx.mark_non_differentiable(save_mean, save_var)

    @staticmethod
    def backward(ctx, grad_output, _grad_mean, _grad_var):
        input, weight, running_mean, running_var, save_mean, save_var = ctx.saved_tensors
        grads = _backward(grad_output, input, weight, running_mean, running_var, save_mean,
                          save_var, ctx.training, ctx.eps, list(ctx.needs_input_grad[:3]),
                          ctx.param_dtype)
        return (*grads, None, None, None, None)

    @staticmethod
    def jvp(ctx, input_t, weight_t, bias_t, _running_mean_t, _running_var_t, _training, _eps):
        input, weight, running_mean, running_var, save_mean, save_var = ctx.saved_tensors
        dims = _reduce_dims(input)
        compute = torch.promote_types(input.dtype, torch.float32)
        x = input.to(compute)
        if ctx.training:  # the batch statistics are float64
            mean = _per_channel(save_mean.to(compute), x)
            invstd = _per_channel((save_var + ctx.eps).rsqrt().to(compute), x)
        else:
            mean = _per_channel(running_mean.to(compute), x)
            invstd = _per_channel((running_var.to(compute) + ctx.eps).rsqrt(), x)
        x_centered = x - mean
        x_hat = x_centered * invstd
        # d(x_hat) = (dx - d(mean)) * invstd + (x - mean) * d(invstd), with d(mean) and
        # d(var) from the batch in training, zero in eval (the running statistics are fixed).
        if input_t is None:
            x_hat_t = torch.zeros_like(x_hat)
        else:
            dx = input_t.to(compute)
            if ctx.training:
                mean_t = dx.mean(dims, keepdim=True)
                var_t = 2 * (x_centered * dx).mean(dims, keepdim=True)
                x_hat_t = (dx - mean_t) * invstd - x_centered * (0.5 * invstd ** 3 * var_t)
            else:
                x_hat_t = dx * invstd
        w = 1 if weight is None else _per_channel(weight.to(compute), x)
        output_t = x_hat_t * w
        if weight_t is not None:
            output_t = output_t + x_hat * _per_channel(weight_t.to(compute), x)
        if bias_t is not None:
            output_t = output_t + _per_channel(bias_t.to(compute), x)
        return output_t.to(input.dtype), None, None

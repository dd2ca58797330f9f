"""batch_norm_forward's Autograd kernel: a Python autograd Function, with a backward and a
jvp (forward-mode AD), which functorch transforms (grad, vjp, jvp, jacrev, jacfwd, hessian)
accept.

It is a single-level Function, as ATen's own autograd kernels are: it records the operation
for the one level of autograd being dispatched (plain autograd, or the grad or jvp transform
being processed) and calls the operator below autograd, where the dispatcher takes the call
to the levels below (vmap: the rules in _vmap.py).  torch.autograd.Function.apply would not
do: under a transform it re-dispatches through functorch, which an Autograd kernel, called
while functorch processes a level, cannot do.

The eager fast path does not come here: the composite batch_norm (csrc/autograd.cpp) attaches
a C++ autograd node directly when no transform is active and no argument has a tangent,
which costs about 2 us less per forward call and 10 us less with the backward.  Calls of the
operator itself, calls under a transform or with dual tensors, and torch.compile's tracing
come here.
"""
import contextlib

import torch
import torch.autograd.forward_ad as _fwad
from torch._functorch.utils import enable_single_level_autograd_function
from torch.autograd.forward_ad import _set_fwd_grad_enabled

from ._ops import ops

_forward = ops.batch_norm_forward.default
_backward = ops.batch_norm_backward.default
_act_forward = ops.batch_norm_act_forward.default
_act_backward = ops.batch_norm_act_backward.default


def _reduce_dims(x):
    return [0] + list(range(2, x.dim()))


def _per_channel(t, x):
    return t.reshape([1, -1] + [1] * (x.dim() - 2))


def _batch_statistics(x, save_mean, save_var):
    """The batch mean and biased variance of x, (1, C, 1, ...), with the values the kernel
    computed in float64 and the derivatives of the formulas in x.  The saved statistics are
    outputs marked non-differentiable: on their own, a transform that differentiates the
    tangent again (hessian, jacfwd of jacfwd) would take them for constants."""
    dims = _reduce_dims(x)
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).square().mean(dims, keepdim=True)
    # value + (f - f.detach()): the value, exactly (f - f is 0), and the derivative of f.
    return (_per_channel(save_mean.to(x.dtype), x) + (mean - mean.detach()),
            _per_channel(save_var.to(x.dtype), x) + (var - var.detach()))


@contextlib.contextmanager
def _levels_below(grad_modes):
    """Dispatch below this level's autograd to the levels below (under a transform), which
    see the caller's grad modes (grad_modes), not the ones a Function's forward and jvp run
    under (off): functorch carries only a mode that is off to the levels below."""
    grad_mode, fwd_grad_mode = grad_modes
    with torch.set_grad_enabled(grad_mode), _set_fwd_grad_enabled(fwd_grad_mode), \
            torch._C._AutoDispatchBelowAutograd():
        yield


class _BatchNormFunction(torch.autograd.function._SingleLevelFunction):
    """batch_norm_forward with its backward (batch_norm_backward, itself differentiable, so
    that transforms nest) and its jvp (ATen operations)."""

    @staticmethod
    def forward(input, weight, bias, running_mean, running_var, training, eps, grad_modes):
        # Below autograd: this Function is the operator's Autograd kernel, which the call
        # would otherwise reach again.
        with (torch._C._AutoDispatchBelowAutograd() if grad_modes is None
              else _levels_below(grad_modes)):
            return _forward(input, weight, bias, running_mean, running_var, training, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, running_mean, running_var, training, eps, grad_modes = inputs
        _, save_mean, save_var = output
        ctx.training, ctx.eps, ctx.grad_modes = training, eps, grad_modes
        # The parameter dtype, which the backward cannot tell when only a bias was given.
        given = [p for p in (weight, bias, running_mean, running_var) if p is not None]
        ctx.param_dtype = given[0].dtype if given else input.dtype
        # Running statistics are read only in eval; in training the caller updates them.
        if training:
            running_mean = running_var = None
        saved = (input, weight, running_mean, running_var, save_mean, save_var)
        ctx.save_for_backward(*saved)
        if _fwad._current_level >= 0:  # only a jvp reads these
            ctx.save_for_forward(*saved)
        ctx.mark_non_differentiable(save_mean, save_var)
        ctx.set_materialize_grads(False)  # no zero gradients made up for save_mean, save_var

    @staticmethod
    def backward(ctx, grad_output, _grad_mean, _grad_var):
        if grad_output is None:
            return (None,) * 8
        input, weight, running_mean, running_var, save_mean, save_var = ctx.saved_tensors
        grads = _backward(grad_output, input, weight, running_mean, running_var, save_mean,
                          save_var, ctx.training, ctx.eps, list(ctx.needs_input_grad[:3]),
                          ctx.param_dtype)
        return (*grads, None, None, None, None, None)

    @staticmethod
    def jvp(ctx, input_t, weight_t, bias_t, _running_mean_t, _running_var_t, *_):
        if input_t is None and weight_t is None and bias_t is None:
            return None, None, None  # tangents of running statistics only: ignored, as by native
        _check_no_running_stat_tangents(ctx.training, _running_mean_t, _running_var_t)
        # Under a transform, the tangent is computed for this level alone, and differentiated
        # by the levels below (jacfwd of jacfwd, jacrev of jacfwd).
        with contextlib.nullcontext() if ctx.grad_modes is None else _levels_below(ctx.grad_modes):
            return _BatchNormFunction._jvp(ctx, input_t, weight_t, bias_t)

    @staticmethod
    def _jvp(ctx, input_t, weight_t, bias_t):
        input, weight, running_mean, running_var, save_mean, save_var = ctx.saved_tensors
        compute = torch.promote_types(input.dtype, torch.float32)
        x = input.to(compute)
        if ctx.training:
            mean, var = _batch_statistics(x, save_mean, save_var)
            invstd = (var + ctx.eps).rsqrt()
        else:  # the running statistics are constants
            mean = _per_channel(running_mean.to(compute), x)
            invstd = _per_channel((running_var.to(compute) + ctx.eps).rsqrt(), x)
        x_centered = x - mean
        x_hat = x_centered * invstd
        # d(x_hat) = (dx - d(mean)) * invstd + (x - mean) * d(invstd), with d(mean) and
        # d(var) from the batch in training, zero in eval.
        if input_t is None:
            x_hat_t = torch.zeros_like(x_hat)
        else:
            dims = _reduce_dims(x)
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


def _activation_jvp(activation, z_t, output, z):
    """The tangent after the activation, from the tangent z_t of its input z."""
    if activation == "relu":  # as threshold_backward: stopped where the output is <= 0
        return torch.where(output <= 0, torch.zeros((), dtype=z_t.dtype), z_t)
    if activation == "silu":
        sigmoid = z.sigmoid()
        return z_t * sigmoid * (1 + z * (1 - sigmoid))
    return z_t


class _BatchNormActFunction(torch.autograd.function._SingleLevelFunction):
    """batch_norm_act_forward (batch norm, residual add, activation) with its backward
    (batch_norm_act_backward, itself differentiable) and its jvp, as _BatchNormFunction."""

    @staticmethod
    def forward(input, weight, bias, running_mean, running_var, training, eps, residual,
                activation, grad_modes):
        with (torch._C._AutoDispatchBelowAutograd() if grad_modes is None
              else _levels_below(grad_modes)):
            return _act_forward(input, weight, bias, running_mean, running_var, training, eps,
                                residual, activation)

    @staticmethod
    def setup_context(ctx, inputs, output):
        (input, weight, bias, running_mean, running_var, training, eps, residual, activation,
         grad_modes) = inputs
        out, save_mean, save_var = output
        ctx.training, ctx.eps, ctx.grad_modes = training, eps, grad_modes
        ctx.activation, ctx.has_residual = activation, residual is not None
        given = [p for p in (weight, bias, running_mean, running_var) if p is not None]
        ctx.param_dtype = given[0].dtype if given else input.dtype
        if training:
            running_mean = running_var = None
        # What the backward needs besides the input: relu's output, silu's bias and residual.
        saved = (input, weight, bias if activation == "silu" else None, running_mean, running_var,
                 save_mean, save_var, out if activation == "relu" else None,
                 residual if activation == "silu" else None)
        ctx.save_for_backward(*saved)
        if _fwad._current_level >= 0:  # the jvp reads the bias and the output in any case
            ctx.save_for_forward(input, weight, bias, running_mean, running_var, save_mean,
                                 save_var, out, residual)
        ctx.mark_non_differentiable(save_mean, save_var)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_output, _grad_mean, _grad_var):
        if grad_output is None:
            return (None,) * 10
        input, weight, bias, running_mean, running_var, save_mean, save_var, out, residual = \
            ctx.saved_tensors
        needs = ctx.needs_input_grad
        grads = _act_backward(grad_output, out, input, weight, bias, running_mean, running_var,
                              save_mean, save_var, ctx.training, ctx.eps, residual,
                              ctx.has_residual, ctx.activation,
                              [needs[0], needs[1], needs[2], needs[7]], ctx.param_dtype)
        return (*grads[:3], None, None, None, None, grads[3], None, None)

    @staticmethod
    def jvp(ctx, input_t, weight_t, bias_t, running_mean_t, running_var_t, _training, _eps,
            residual_t, *_):
        input, weight, bias, running_mean, running_var, save_mean, save_var, out, residual = \
            ctx.saved_tensors
        if input_t is not None or weight_t is not None or bias_t is not None:
            _check_no_running_stat_tangents(ctx.training, running_mean_t, running_var_t)
        with contextlib.nullcontext() if ctx.grad_modes is None else _levels_below(ctx.grad_modes):
            if input_t is None and weight_t is None and bias_t is None:
                z_t = None
            else:
                z_t = _BatchNormFunction._jvp(_Saved(ctx, (input, weight, running_mean, running_var,
                                                           save_mean, save_var)),
                                              input_t, weight_t, bias_t)[0]
            if residual_t is not None:
                z_t = residual_t if z_t is None else z_t + residual_t
            if z_t is None:
                return None, None, None
            z = None
            if ctx.activation == "silu":  # the value before the activation, recomputed
                z = _normalized(ctx, input, weight, bias, running_mean, running_var, save_mean,
                                save_var)
                if residual is not None:
                    z = z + residual.to(z.dtype)
            compute = torch.promote_types(input.dtype, torch.float32)
            return (_activation_jvp(ctx.activation, z_t.to(compute), out, z).to(input.dtype),
                    None, None)


class _Saved:
    """What _BatchNormFunction._jvp reads from its ctx: the saved tensors, training, eps."""

    def __init__(self, ctx, saved_tensors):
        self.saved_tensors, self.training, self.eps = saved_tensors, ctx.training, ctx.eps


def _normalized(ctx, input, weight, bias, running_mean, running_var, save_mean, save_var):
    """The batch norm's output, in float32 or wider, from what the forward saved."""
    compute = torch.promote_types(input.dtype, torch.float32)
    x = input.to(compute)
    if ctx.training:
        mean, var = _batch_statistics(x, save_mean, save_var)
    else:
        mean, var = _per_channel(running_mean.to(compute), x), _per_channel(running_var.to(compute), x)
    z = (x - mean) * (var + ctx.eps).rsqrt()
    if weight is not None:
        z = z * _per_channel(weight.to(compute), x)
    if bias is not None:
        z = z + _per_channel(bias.to(compute), x)
    return z


def _check_no_running_stat_tangents(training, running_mean_t, running_var_t):
    """As native's jvp (batch_norm_jvp): in eval, running statistics with a tangent are an
    error when anything else has one (in training, and alone, they are ignored)."""
    if not training and (running_mean_t is not None or running_var_t is not None):
        raise RuntimeError("batch_norm is not differentiable wrt running_mean and running_var, "
                           "they cannot have forward grad defined")


def _check_not_requiring_grad(running_mean, running_var):
    """As native (and the C++ path): running statistics are buffers, never differentiated."""
    for name, stat in (("running_mean", running_mean), ("running_var", running_var)):
        if stat is not None and stat.requires_grad:
            raise RuntimeError(f"batch_norm is not differentiable with respect to argument "
                               f"'{name}'. This input cannot have requires_grad True.")


def _forward_autograd(keyset, input, weight, bias, running_mean, running_var, training, eps):
    grad_mode = torch.is_grad_enabled()
    if grad_mode:
        _check_not_requiring_grad(running_mean, running_var)
    # The Function when there is something to differentiate: a gradient, or forward-mode AD
    # (dual tensors, torch.func.jvp; one level is on whenever a tangent may exist).
    if (grad_mode and torch._C._any_requires_grad(input, weight, bias)) or _fwad._current_level >= 0:
        args = (input, weight, bias, running_mean, running_var, training, eps)
        if torch._C._are_functorch_transforms_active():
            # functorch refuses single-level Functions unless told that this is one level's
            # autograd, as for its own (torch/_functorch/autograd_function.py)
            with enable_single_level_autograd_function():
                return _BatchNormFunction.apply(*args, (grad_mode, torch._C._is_fwd_grad_enabled()))
        return _BatchNormFunction.apply(*args, None)
    with torch._C._AutoDispatchBelowAutograd():
        return _forward.redispatch(keyset & torch._C._after_autograd_keyset, input, weight,
                                   bias, running_mean, running_var, training, eps)


def _act_forward_autograd(keyset, input, weight, bias, running_mean, running_var, training, eps,
                         residual, activation):
    grad_mode = torch.is_grad_enabled()
    if grad_mode:
        _check_not_requiring_grad(running_mean, running_var)
    if (grad_mode and torch._C._any_requires_grad(input, weight, bias, residual)) or \
            _fwad._current_level >= 0:
        args = (input, weight, bias, running_mean, running_var, training, eps, residual, activation)
        if torch._C._are_functorch_transforms_active():
            with enable_single_level_autograd_function():
                return _BatchNormActFunction.apply(*args, (grad_mode, torch._C._is_fwd_grad_enabled()))
        return _BatchNormActFunction.apply(*args, None)
    with torch._C._AutoDispatchBelowAutograd():
        return _act_forward.redispatch(keyset & torch._C._after_autograd_keyset, input, weight,
                                       bias, running_mean, running_var, training, eps, residual,
                                       activation)


_lib = torch.library.Library("batchnorm_ext", "IMPL")
_lib.impl("batch_norm_forward", _forward_autograd, "Autograd", with_keyset=True)
_lib.impl("batch_norm_act_forward", _act_forward_autograd, "Autograd", with_keyset=True)

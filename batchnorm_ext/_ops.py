"""The operators of batchnorm_ext._C, and their fake kernels.

The fake kernels tell torch.compile and torch.export (and the meta device) the shapes,
dtypes and memory formats of the outputs without running the kernels, and raise the same
errors for bad arguments.
"""
import torch
from torch._prims_common import suggest_memory_format

from . import _C  # noqa: F401  (loading the library registers the operators)

ops = torch.ops.batchnorm_ext

_FLOATING = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_REDUCED = (torch.bfloat16, torch.float16)
_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.bfloat16: "BFloat16",
          torch.float16: "Half", torch.int64: "Long", torch.int32: "Int", torch.int16: "Short",
          torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool",
          torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble"}


def check_functional_args(input, training, eps):
    """The checks of csrc/autograd.cpp (check_functional_args): torch.nn.functional's."""
    if training:
        if input.dim() == 0:
            raise IndexError("batch_norm: expected an input of shape (N, C, *), got a 0-D tensor")
        size = list(input.shape)
        values = size[0]
        for s in size[2:]:
            values *= s
        if values == 1:
            raise ValueError("Expected more than 1 value per channel when training, got input "
                             f"size {input.shape}")
        if eps <= 0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def _given(weight, bias, running_mean, running_var):
    """(name, tensor) for each parameter given, in the order of the checks."""
    named = [("weight", weight), ("bias", bias), ("running_mean", running_mean),
             ("running_var", running_var)]
    return [(name, p) for name, p in named if p is not None]


def _check_size(input, name, p):
    channels = input.shape[1] if input.dim() > 1 else 0
    torch._check(p.numel() == channels, lambda: (
        f"{name} should contain {channels} elements not {p.numel()}"))


def check_sizes(input, weight, bias, running_mean, running_var):
    """The sizes of the parameters, which native checks before the rest
    (aten::_batch_norm_impl_index): under vmap, before its batching rule."""
    for name, p in _given(weight, bias, running_mean, running_var):
        _check_size(input, name, p)


def check_inputs(input, weight, bias, running_mean, running_var, training):
    """The checks of csrc/batch_norm_cpu.cpp (check_inputs), in the same order."""
    given = _given(weight, bias, running_mean, running_var)
    for name, p in given:
        if p.device != input.device:
            raise RuntimeError(f"Tensor on device {p.device} is not on the expected device "
                               f"{input.device}!")
        _check_size(input, name, p)
    if not training:
        if running_mean is None:
            raise RuntimeError("running_mean must be defined in evaluation mode")
        if running_var is None:
            raise RuntimeError("running_var must be defined in evaluation mode")
    elif (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if input.dtype not in _FLOATING:
        name = str(input.dtype).replace("torch.", "")
        raise NotImplementedError(f'"batch_norm" not implemented for \'{_NAMES.get(input.dtype, name)}\'')
    param_dtype = given[0][1].dtype if given else input.dtype
    result = input.dtype
    if param_dtype == input.dtype:
        for _, p in given:
            if p.dtype != input.dtype:
                raise RuntimeError(f"expected scalar type {_NAMES[input.dtype]} but found "
                                   f"{_NAMES.get(p.dtype, p.dtype)}")
    else:
        for _, p in given:
            if p.dtype != torch.float32:
                raise RuntimeError("mixed dtype (CPU): expect parameter to have scalar type of Float")
        if input.dtype not in _REDUCED:
            raise RuntimeError("mixed dtype (CPU): all inputs must share same datatype.")
        result = torch.float32
    for name, p in given:
        if name.startswith("running") and p.dim() != 1:
            raise RuntimeError(f"{name} must be one-dimensional, but got shape {list(p.shape)}")
    if input.dim() < 2:
        raise IndexError("batch_norm: expected input of shape (N, C, *) with at least 2 "
                         f"dimensions, but got a {input.dim()}-D input of size {list(input.shape)}")
    return result


def _dense(t):
    return (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)
            or t.is_contiguous(memory_format=torch.channels_last_3d))


def _format_of_dense(t):
    if t.is_contiguous():
        return torch.contiguous_format
    if t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.channels_last


def output_format(input, *params):
    """The output's memory format (csrc/batch_norm_cpu.cpp, output_format: native's rule)."""
    if _dense(input) and all(p is None or p.is_contiguous() for p in params):
        return _format_of_dense(input)
    return suggest_memory_format(input)


def grad_format(input, grad_output):
    """grad_input's memory format (csrc/batch_norm_cpu.cpp, grad_format)."""
    if _dense(input) and _dense(grad_output) and \
            suggest_memory_format(input) == suggest_memory_format(grad_output):
        return _format_of_dense(input)
    return suggest_memory_format(input)


def _sizes(t):
    """Sizes as C++ prints them: [4, 3, 2, 2]."""
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _dtype_name(dtype):
    return _NAMES.get(dtype, str(dtype).replace("torch.", ""))


ACTIVATIONS = ("identity", "relu", "silu")


def check_activation(activation):
    """csrc/batch_norm_cpu.cpp, activation_named."""
    if activation not in ACTIVATIONS:
        raise ValueError("batch_norm: activation must be 'identity', 'relu' or 'silu', got "
                         f"'{activation}'")


def _check_like_input(input, t, what):
    """csrc/batch_norm_cpu.cpp, check_like_input: a residual or output goes with the input."""
    if t.shape != input.shape:
        raise RuntimeError(f"batch_norm: {what} of size {_sizes(t)} does not match input of size "
                           f"{_sizes(input)}")
    if t.dtype != input.dtype:
        raise RuntimeError(f"batch_norm: {what} has dtype {_dtype_name(t.dtype)} but input has "
                           f"{_dtype_name(input.dtype)}")
    if t.device != input.device:
        raise RuntimeError(f"batch_norm: {what} is on {t.device} but input is on {input.device}")


def _check_parameter(input, name, p):
    """csrc/batch_norm_cpu.cpp, check_parameter."""
    if p is None:
        return
    if p.device != input.device:
        raise RuntimeError(f"Tensor on device {p.device} is not on the expected device "
                           f"{input.device}!")
    _check_size(input, name, p)


def _forward_checks(input, weight, bias, running_mean, running_var, training, residual=None):
    """csrc/batch_norm_cpu.cpp, forward_with_epilogue's checks; returns nothing."""
    check_inputs(input, weight, bias, running_mean, running_var, training)
    if residual is not None:
        _check_like_input(input, residual, "residual")


def _forward_outputs(input, weight, bias, running_mean, running_var, training):
    output = torch.empty_like(input, memory_format=output_format(input, weight, bias, running_mean,
                                                                 running_var))
    stat_size = input.shape[1] if training else 0
    save_mean = input.new_empty((stat_size,), dtype=torch.float64)
    save_var = input.new_empty((stat_size,), dtype=torch.float64)
    return output, save_mean, save_var


@torch.library.register_fake("batchnorm_ext::batch_norm_forward")
def _forward_fake(input, weight, bias, running_mean, running_var, training, eps):
    _forward_checks(input, weight, bias, running_mean, running_var, training)
    return _forward_outputs(input, weight, bias, running_mean, running_var, training)


@torch.library.register_fake("batchnorm_ext::batch_norm_act_forward")
def _act_forward_fake(input, weight, bias, running_mean, running_var, training, eps, residual,
                      activation):
    check_activation(activation)
    _forward_checks(input, weight, bias, running_mean, running_var, training, residual)
    return _forward_outputs(input, weight, bias, running_mean, running_var, training)


def _backward_checks(grad_output, input, weight, running_mean, running_var, save_mean, save_var,
                     training, param_dtype, activation="identity", output=None, bias=None,
                     residual=None, has_residual=False):
    """csrc/batch_norm_cpu.cpp, backward_with_epilogue's checks, in its order; returns the
    parameter dtype (backward_param_type)."""
    param_type = check_inputs(input, weight, None, running_mean, running_var, training)
    if param_dtype is not None and param_dtype != param_type:
        told = weight is not None or (not training and running_mean is not None)
        if told or input.dtype not in _REDUCED or param_dtype != torch.float32:
            raise RuntimeError(f"batch_norm_backward: param_dtype {_dtype_name(param_dtype)} does "
                               f"not match the parameters ({_dtype_name(param_type)})")
        param_type = param_dtype
    if grad_output.shape != input.shape:
        raise RuntimeError(f"batch_norm_backward: grad_output of size {_sizes(grad_output)} does "
                           f"not match input of size {_sizes(input)}")
    if grad_output.dtype != input.dtype:
        raise RuntimeError(f"batch_norm_backward: grad_output has dtype "
                           f"{_dtype_name(grad_output.dtype)} but input has "
                           f"{_dtype_name(input.dtype)}")
    channels = input.shape[1]
    if training and not (save_mean.numel() == channels and save_var.numel() == channels and
                         save_mean.dtype == torch.float64 and save_var.dtype == torch.float64):
        raise RuntimeError("batch_norm_backward: save_mean and save_var must be the batch "
                           "statistics returned by batch_norm_forward in training")
    if activation == "relu" and output is None:
        raise RuntimeError("batch_norm_act_backward: the relu backward needs the forward's output")
    if activation == "silu" and has_residual and residual is None:
        raise RuntimeError("batch_norm_act_backward: the silu backward needs the forward's residual")
    if output is not None:
        _check_like_input(input, output, "output")
    if residual is not None:
        _check_like_input(input, residual, "residual")
    if activation == "silu":
        _check_parameter(input, "bias", bias)
    return param_type


def _backward_outputs(grad_output, input, param_type, output_mask):
    channels = input.shape[1]
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        grad_input = torch.empty_like(input, memory_format=grad_format(input, grad_output))
    if output_mask[1]:
        grad_weight = input.new_empty((channels,), dtype=param_type)
    if output_mask[2]:
        grad_bias = input.new_empty((channels,), dtype=param_type)
    return grad_input, grad_weight, grad_bias


@torch.library.register_fake("batchnorm_ext::batch_norm_backward")
def _backward_fake(grad_output, input, weight, running_mean, running_var, save_mean, save_var,
                   training, eps, output_mask, param_dtype=None):
    param_type = _backward_checks(grad_output, input, weight, running_mean, running_var,
                                  save_mean, save_var, training, param_dtype)
    return _backward_outputs(grad_output, input, param_type, output_mask)


@torch.library.register_fake("batchnorm_ext::batch_norm_act_backward")
def _act_backward_fake(grad_output, output, input, weight, bias, running_mean, running_var,
                       save_mean, save_var, training, eps, residual, has_residual, activation,
                       output_mask, param_dtype=None):
    check_activation(activation)
    param_type = _backward_checks(grad_output, input, weight, running_mean, running_var,
                                  save_mean, save_var, training, param_dtype, activation, output,
                                  bias, residual, has_residual)
    grad_residual = None
    if output_mask[3]:
        grad_residual = torch.empty_like(input, memory_format=grad_format(input, grad_output))
    return (*_backward_outputs(grad_output, input, param_type, output_mask), grad_residual)


@torch.library.register_fake("batchnorm_ext::update_running_stats_")
def _update_fake(running_mean, running_var, batch_mean, batch_var, count, momentum,
                 num_batches_tracked):
    """csrc/batch_norm_cpu.cpp, update_running_stats_cpu's checks."""
    if not (running_mean.numel() == batch_mean.numel() and running_var.numel() == batch_var.numel()
            and running_mean.numel() == running_var.numel()):
        raise RuntimeError("update_running_stats_: running and batch statistics differ in size")
    if running_mean.dtype != running_var.dtype:
        raise RuntimeError("update_running_stats_: running_mean and running_var differ in dtype")
    if momentum is None and num_batches_tracked is None:
        raise RuntimeError("update_running_stats_: momentum=None (cumulative average) needs "
                           "num_batches_tracked")
    if batch_mean.dtype != torch.float64 or batch_var.dtype != torch.float64:
        raise RuntimeError("update_running_stats_: the batch statistics must be float64")
    if running_mean.dtype not in _FLOATING:  # AT_DISPATCH_FLOATING_TYPES_AND2's message
        raise NotImplementedError(f'"update_running_stats_" not implemented for '
                                  f"'{_dtype_name(running_mean.dtype)}'")
    return None


def _check_batch_statistics(input, mean, var):
    if (mean.dtype, var.dtype) != (torch.float64, torch.float64) or \
            mean.numel() != input.shape[1] or var.numel() != input.shape[1]:
        raise RuntimeError(f"batch statistics must be float64 tensors of {input.shape[1]} elements")


def _check_grad_output(grad_output, input, op):
    if grad_output.shape != input.shape or grad_output.dtype != input.dtype:
        raise RuntimeError(f"{op}: grad_output must match input in size and dtype")


@torch.library.register_fake("batchnorm_ext::batch_norm_stats")
def _stats_fake(input):
    check_inputs(input, None, None, None, None, True)
    return (input.new_empty((input.shape[1],), dtype=torch.float64),
            input.new_empty((input.shape[1],), dtype=torch.float64))


@torch.library.register_fake("batchnorm_ext::batch_norm_apply")
def _apply_fake(input, weight, bias, mean, var, eps):
    check_inputs(input, weight, bias, None, None, True)
    _check_batch_statistics(input, mean, var)
    return torch.empty_like(input, memory_format=output_format(input, weight, bias))


@torch.library.register_fake("batchnorm_ext::batch_norm_backward_reduce")
def _backward_reduce_fake(grad_output, input, mean, var, eps):
    check_inputs(input, None, None, None, None, True)
    _check_batch_statistics(input, mean, var)
    _check_grad_output(grad_output, input, "batch_norm_backward_reduce")
    return input.new_empty((2, input.shape[1]), dtype=torch.float64)


@torch.library.register_fake("batchnorm_ext::batch_norm_backward_apply")
def _backward_apply_fake(grad_output, input, weight, mean, var, sums, count, eps):
    check_inputs(input, weight, None, None, None, True)
    _check_batch_statistics(input, mean, var)
    _check_grad_output(grad_output, input, "batch_norm_backward_apply")
    if sums.dtype != torch.float64 or sums.numel() != 2 * input.shape[1]:
        raise RuntimeError("batch_norm_backward_apply: sums must be a (2, C) float64 tensor")
    if not (count > 0 or input.numel() == 0):
        raise RuntimeError(f"batch_norm_backward_apply: count must be positive, got {count}")
    return torch.empty_like(input, memory_format=grad_format(input, grad_output))

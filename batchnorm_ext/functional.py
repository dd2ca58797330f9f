"""batch_norm: torch.nn.functional.batch_norm's signature and behaviour, on our kernels."""
import torch
import torch.nn.functional as F

from . import _onnx
from ._ops import ACTIVATIONS, ops

_batch_norm = ops.batch_norm.default
_batch_norm_act = ops.batch_norm_act.default
_ACTIVATION_FUNCTIONS = {"identity": lambda t: t, "relu": F.relu, "silu": F.silu}


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, residual=None, activation=None):
    """Batch normalization of `input` (N, C, *) over every dimension but C.

    Like torch.nn.functional.batch_norm: in training, the batch statistics normalize and
    the running statistics (if given) are updated in place with `momentum`; in eval, the
    running statistics normalize.

    With `residual` (a tensor added to the output) and/or `activation` ('relu', 'silu' or
    'identity'): activation(batch_norm(input) + residual), fused into the pass that writes
    the output (and its backward into the batch norm's).
    """
    if momentum is None:
        raise TypeError("batch_norm(): argument 'momentum' must be float, not NoneType")
    if _onnx.exporting():  # torch.onnx.export(dynamo=True): see _onnx.py
        output = _onnx.batch_norm(input, weight, bias, running_mean, running_var, training, eps)
        return _unfused(output, residual, activation or "identity")
    if residual is None and activation in (None, "identity"):
        return _normalize(input, weight, bias, running_mean, running_var, training, momentum, eps,
                          None)
    return _normalize_act(input, weight, bias, running_mean, running_var, training, momentum, eps,
                          None, residual, activation or "identity")


def _unfused(output, residual, activation):
    """activation(output + residual) in torch's ops."""
    output = output if residual is None else output + residual
    return _ACTIVATION_FUNCTIONS[activation](output)


def _normalize(input, weight, bias, running_mean, running_var, training, momentum, eps,
               num_batches_tracked):
    """The one call behind batch_norm and the modules.  momentum=None: cumulative average.

    The composite operator takes the eager fast path in C++, and otherwise (functorch
    transforms, forward-mode AD) the operator's Python Autograd kernel (_autograd.py) and
    vmap rules (_vmap.py)."""
    return _batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps,
                       num_batches_tracked)


def _normalize_act(input, weight, bias, running_mean, running_var, training, momentum, eps,
                   num_batches_tracked, residual, activation):
    """activation(_normalize(...) + residual) in one kernel pass.  A residual the kernel does
    not take as it is (another shape, which broadcasts, another dtype or device) gets the
    unfused steps, which give what torch would."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"batch_norm: activation must be 'identity', 'relu' or 'silu', got "
                         f"'{activation}'")
    if residual is not None and not (isinstance(residual, torch.Tensor) and
                                     residual.shape == input.shape and
                                     residual.dtype == input.dtype and
                                     residual.device == input.device):
        output = _normalize(input, weight, bias, running_mean, running_var, training, momentum,
                            eps, num_batches_tracked)
        return _unfused(output, residual, activation)
    return _batch_norm_act(input, weight, bias, running_mean, running_var, training, momentum, eps,
                           num_batches_tracked, residual, activation)

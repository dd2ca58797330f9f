"""batch_norm: torch.nn.functional.batch_norm's signature and behaviour, on our kernels."""
from . import _onnx
from ._ops import ops

_batch_norm = ops.batch_norm.default


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
    """The one call behind batch_norm and the modules.  momentum=None: cumulative average.

    The composite operator takes the eager fast path in C++, and otherwise (functorch
    transforms, forward-mode AD) the operator's Python Autograd kernel (_autograd.py) and
    vmap rules (_vmap.py)."""
    return _batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps,
                       num_batches_tracked)

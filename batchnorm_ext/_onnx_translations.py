"""The ONNX translations of our operators (onnxscript, traced): see _onnx.py.  Imported
only for an ONNX export (onnxscript is slow to import)."""
from typing import Optional, TypeVar, Union

import numpy as np
import onnx_ir as ir
from onnxscript import BFLOAT16, DOUBLE, FLOAT, FLOAT16
from onnxscript import opset18 as op

from ._ops import ops

# The annotations tell the exporter which arguments are tensors (of which dtypes: the
# input's and the parameters' may differ) and which attributes.
TInput = TypeVar("TInput", bound=Union[BFLOAT16, DOUBLE, FLOAT, FLOAT16])
TParam = TypeVar("TParam", bound=Union[BFLOAT16, DOUBLE, FLOAT, FLOAT16])


def batch_norm_forward(input: TInput, weight: Optional[TParam] = None,
                       bias: Optional[TParam] = None, running_mean: Optional[TParam] = None,
                       running_var: Optional[TParam] = None, training: bool = False,
                       eps: float = 1e-5) -> tuple[TInput, DOUBLE, DOUBLE]:
    """batch_norm_forward as a BatchNormalization in inference mode, with the running
    statistics (eval) or the batch statistics computed before it (training), as torch's
    exporter translates aten's batch norms (onnxscript's torchlib, aten_native_batch_norm).
    Outputs 1 and 2, the float64 batch mean and biased variance (empty in eval), are for
    update_running_stats_, which an exported graph does not hold."""
    given = [t for t in (weight, bias, running_mean, running_var) if t is not None]
    like = given[0] if given else input  # the parameter dtype
    channels = op.Shape(input, start=1, end=2)
    if weight is None:
        weight = op.Expand(op.CastLike(op.Constant(value_float=1.0), like), channels)
    if bias is None:
        bias = op.Expand(op.CastLike(op.Constant(value_float=0.0), like), channels)
    if training:
        axes = op.Constant(value_ints=[0, *range(2, len(input.shape))])
        centred = op.Sub(input, op.ReduceMean(input, axes))
        mean = op.ReduceMean(input, axes, keepdims=False)
        var = op.ReduceMean(op.Mul(centred, centred), axes, keepdims=False)
        mean, var = op.CastLike(mean, like), op.CastLike(var, like)
        save_mean = op.Cast(mean, to=ir.DataType.DOUBLE)
        save_var = op.Cast(var, to=ir.DataType.DOUBLE)
    else:
        mean, var = running_mean, running_var
        save_mean = op.Constant(value=ir.tensor(np.zeros((0,), np.float64)))
        save_var = op.Identity(save_mean)
    # momentum: ONNX's (1 - torch's); it weighs only the running statistics' update, which
    # inference mode does not make.  0.9 as torch's default gives.
    output = op.BatchNormalization(input, weight, bias, mean, var, epsilon=eps, momentum=0.9,
                                   training_mode=0)
    return output, save_mean, save_var


TABLE = {ops.batch_norm_forward.default: batch_norm_forward}

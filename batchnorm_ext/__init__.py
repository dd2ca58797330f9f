"""batchnorm_ext: batch normalization for PyTorch on the CPU, with one-pass Welford
statistics, as custom operators with autograd.

    import batchnorm_ext
    bn = batchnorm_ext.BatchNorm2d(64)            # a drop-in for torch.nn.BatchNorm2d
    y = batchnorm_ext.batch_norm(x, running_mean, running_var, weight, bias, training=True)
    model = batchnorm_ext.convert_model(model)    # every torch.nn.BatchNorm*d swapped
    model = batchnorm_ext.revert_model(model)     # and back
    compiled = torch.compile(model, backend="batchnorm_ext")  # our kernels, unconverted
"""
import torch  # noqa: F401  (first: _C links against torch's libraries, loaded by it)

from . import _C
from ._onnx import onnx_translation_table, register_torchscript_symbolic as _register_symbolic
from ._ops import ops
from . import _autograd, _vmap  # noqa: F401  (Python kernels: Autograd of batch_norm_forward, vmap rules)
from .functional import batch_norm
from .modules import (BatchNorm1d, BatchNorm2d, BatchNorm3d, OnOurKernel, convert_model,
                      fuser_method_mapping, register_conversion, revert_model,
                      revert_sync_batchnorm)
from .fused import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, fuse
from .sync import SyncBatchNorm

_register_symbolic()

__version__ = "0.1.0"

# The torch.compile backend (batchnorm_ext._backend) imports Inductor, which takes most of
# a second: imported on first use.
_LAZY = {"compile_backend", "enable_compile_integration", "disable_compile_integration"}


def __getattr__(name):
    if name in _LAZY:
        from . import _backend
        return getattr(_backend, name)
    raise AttributeError(f"module 'batchnorm_ext' has no attribute {name!r}")


def cpu_capability():
    """The instruction set the kernels use: 'AVX512_BF16', 'AVX512', 'AVX2' or 'DEFAULT'."""
    return _C.cpu_capability()


def set_cpu_capability(name):
    """Use the kernels built for `name` ('AVX512_BF16', 'AVX512', 'AVX2' or 'DEFAULT'); the
    CPU must have it."""
    _C.set_cpu_capability(name)


__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "OnOurKernel",
    "SyncBatchNorm",
    "batch_norm",
    "convert_model",
    "fuse",
    "compile_backend",
    "cpu_capability",
    "disable_compile_integration",
    "enable_compile_integration",
    "fuser_method_mapping",
    "onnx_translation_table",
    "ops",
    "register_conversion",
    "revert_model",
    "revert_sync_batchnorm",
    "set_cpu_capability",
]

"""timm's BatchNormAct2d on our kernel.  Imported by convert_model when it meets one (so
timm is not imported otherwise).

timm's class is a torch.nn.BatchNorm2d whose forward is a copy of torch's followed by its
own dropout and activation; ours runs the batch norm on our operator and keeps the rest.
"""
import torch
from torch import Tensor
from timm.layers import BatchNormAct2d as _TimmBatchNormAct2d

from .modules import OnOurKernel, register_conversion


class BatchNormAct2d(OnOurKernel, _TimmBatchNormAct2d):
    __doc__ = _TimmBatchNormAct2d.__doc__

    def forward(self, x: Tensor) -> Tensor:
        # timm's forward, with its input check (traceable by FX), on our operator.
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        x = self._batch_norm(x)
        x = self.drop(x)
        x = self.act(x)
        return x


register_conversion(_TimmBatchNormAct2d, BatchNormAct2d)

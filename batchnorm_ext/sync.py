"""SyncBatchNorm on the CPU: batch statistics over all the processes of a torch.distributed
group (gloo), exchanged as Welford statistics (count, mean, M2) and merged with Chan's
formula, so the result is that of one batch norm over the whole batch.

    model = batchnorm_ext.SyncBatchNorm.convert_sync_batchnorm(model)
    model = torch.nn.parallel.DistributedDataParallel(model)
"""
import torch
import torch.distributed as dist

from ._ops import ops
from .modules import _fx_call_module, OnOurKernel, _traced_by_fx


def merge_statistics(counts, means, m2s):
    """Chan's formula for many sets at once: (W, C) counts, means and M2 of W processes ->
    the count, mean and M2 of their union, per channel (in float64: exact enough)."""
    total = counts.sum(0)
    mean = (counts * means).sum(0) / total.clamp(min=1)
    m2 = (m2s + counts * (means - mean) ** 2).sum(0)
    return total, mean, m2


class _SyncBatchNormFunction(torch.autograd.Function):
    """Forward: local statistics, one all_gather, Chan's merge, normalize.  Backward: local
    sums, one all_reduce, local grad_input; parameter gradients are the local ones (DDP
    averages them across processes as for any parameter)."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, eps, momentum,
                num_batches_tracked, group, world_size):
        count = input.numel() // input.shape[1]
        mean, var = ops.batch_norm_stats(input)
        local = torch.stack([torch.full_like(mean, count), mean, var * count])  # (3, C)
        gathered = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(gathered, local, group=group)
        counts, means, m2s = torch.stack(gathered).unbind(1)  # each (W, C)
        total, batch_mean, m2 = merge_statistics(counts, means, m2s)
        total_count = int(total[0].item())
        if total_count <= 1:
            raise ValueError("Expected more than 1 value per channel when training, got "
                             f"{total_count} across all processes")
        batch_var = m2 / total_count
        if running_mean is not None:  # the unbiased variance of the whole batch, as native
            ops.update_running_stats_(running_mean, running_var, batch_mean, batch_var,
                                      total_count, momentum, num_batches_tracked)
        ctx.save_for_backward(input, weight, batch_mean, batch_var)
        ctx.eps, ctx.group, ctx.total_count = eps, group, total_count
        return ops.batch_norm_apply(input, weight, bias, batch_mean, batch_var, eps)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, batch_mean, batch_var = ctx.saved_tensors
        grad_output = grad_output.contiguous(memory_format=torch._prims_common.suggest_memory_format(input))
        sums = ops.batch_norm_backward_reduce(grad_output, input, batch_mean, batch_var, ctx.eps)
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_weight = (sums[1] * (batch_var + ctx.eps).rsqrt()).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = sums[0].to(weight.dtype if weight is not None else input.dtype)
        total = sums.clone()
        dist.all_reduce(total, group=ctx.group)
        grad_input = None
        if ctx.needs_input_grad[0]:
            grad_input = ops.batch_norm_backward_apply(grad_output, input, weight, batch_mean,
                                                       batch_var, total, ctx.total_count, ctx.eps)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


class SyncBatchNorm(OnOurKernel, torch.nn.modules.batchnorm._BatchNorm):
    """torch.nn.SyncBatchNorm's constructor, parameters, buffers and state_dict, on the CPU.

    Not a subclass of torch.nn.SyncBatchNorm: DistributedDataParallel refuses those in CPU
    modules ("SyncBatchNorm layers only work with GPU modules").  On other devices the
    operators run torch's own batch norm (csrc/fallback.cpp).
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input):
        if _traced_by_fx(self, input):  # a call_module node, as FX records torch.nn.SyncBatchNorm
            return _fx_call_module(self, input)
        self._check_input_dim(input)
        if input.shape[1] == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")
        running_mean, running_var, use_batch_stats, momentum, counter = self._batch_norm_arguments()
        group, world_size = None, 1
        if use_batch_stats and self.training and dist.is_available() and dist.is_initialized():
            group = self.process_group or dist.group.WORLD
            world_size = dist.get_world_size(group)
        if world_size == 1:  # eval, no process group, or a group of one: plain batch norm
            return self._batch_norm_eager(input, running_mean, running_var, use_batch_stats,
                                          momentum, counter)
        return _SyncBatchNormFunction.apply(input, self.weight, self.bias, running_mean,
                                            running_var, self.eps, momentum, counter, group,
                                            world_size)

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Every batch norm in `module` (torch's BatchNorm1d/2d/3d and SyncBatchNorm, or
        ours) replaced by this SyncBatchNorm, with the same parameters, buffers and mode, as
        torch.nn.SyncBatchNorm.convert_sync_batchnorm does."""
        converted = module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            converted = cls(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group,
                            device=_device_of(module), dtype=_dtype_of(module))
            if module.affine:
                with torch.no_grad():
                    converted.weight = module.weight
                    converted.bias = module.bias
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
            converted.training = module.training
            if hasattr(module, "qconfig"):
                converted.qconfig = module.qconfig
        for name, child in module.named_children():
            converted.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        del module
        return converted


def _device_of(module):
    tensors = list(module.parameters()) + list(module.buffers())
    return tensors[0].device if tensors else None


def _dtype_of(module):
    floats = [t for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point()]
    return floats[0].dtype if floats else None

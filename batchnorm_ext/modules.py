"""BatchNorm1d/2d/3d on our kernels, and convert_model.

Each class is a subclass of its torch.nn counterpart that replaces only forward: the
constructor, parameters, buffers, state_dict (old checkpoints included), repr, reset
methods and input checks are torch's own, and isinstance(m, torch.nn.BatchNorm2d) holds.
"""
import torch

from .functional import _normalize


def batch_norm_arguments(module):
    """What torch's _BatchNorm.forward passes to F.batch_norm, in our operator's terms:
    (running_mean, running_var, use_batch_stats, momentum, num_batches_tracked).  Counts the
    batch in num_batches_tracked, as torch does."""
    momentum = module.momentum
    if module.training and module.track_running_stats and module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
    elif momentum is None:
        momentum = 0.0  # torch's factor when there is no counter to average with
    # Batch statistics normalize in training, and in eval when there are no buffers.
    use_batch_stats = module.training or (module.running_mean is None and module.running_var is None)
    # Buffers are passed to be updated (training and tracked) or to normalize (eval).
    use_buffers = not module.training or module.track_running_stats
    return (module.running_mean if use_buffers else None,
            module.running_var if use_buffers else None,
            use_batch_stats,
            momentum,
            # momentum=None: a cumulative average over num_batches_tracked batches, computed
            # by the operator from the counter (no host round trip: torch.compile keeps one graph).
            module.num_batches_tracked if momentum is None else None)


class _Forward:
    def forward(self, input):
        self._check_input_dim(input)
        running_mean, running_var, use_batch_stats, momentum, counter = batch_norm_arguments(self)
        return _normalize(input, self.weight, self.bias, running_mean, running_var,
                          use_batch_stats, momentum, self.eps, counter)


class BatchNorm1d(_Forward, torch.nn.BatchNorm1d):
    __doc__ = torch.nn.BatchNorm1d.__doc__


class BatchNorm2d(_Forward, torch.nn.BatchNorm2d):
    __doc__ = torch.nn.BatchNorm2d.__doc__


class BatchNorm3d(_Forward, torch.nn.BatchNorm3d):
    __doc__ = torch.nn.BatchNorm3d.__doc__


_REPLACEMENTS = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}


def _converted(module):
    """The same module as an instance of our class: same parameters and buffers (the very
    tensors, so an optimizer built before conversion keeps working), training mode, hooks
    (the very hook tables, so handles taken before still remove them) and attributes.  The
    old module shares them and is meant to be dropped."""
    new = _REPLACEMENTS[type(module)].__new__(_REPLACEMENTS[type(module)])
    new.__dict__.update(module.__dict__)
    return new


def convert_model(module):
    """Replaces every torch.nn.BatchNorm1d/2d/3d in `module` by batchnorm_ext's.

    Like torch.nn.SyncBatchNorm.convert_sync_batchnorm: the children are replaced in place
    and the module is returned (a new one if `module` itself is a batch norm).  Subclasses
    and SyncBatchNorm are left alone.
    """
    if type(module) in _REPLACEMENTS:
        return _converted(module)
    for name, child in module.named_children():
        converted = convert_model(child)
        if converted is not child:
            module.add_module(name, converted)
    return module

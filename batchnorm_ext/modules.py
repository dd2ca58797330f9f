"""BatchNorm1d/2d/3d on our kernels; convert_model and revert_model.

Each class is a subclass of its torch.nn counterpart that replaces only forward: the
constructor, parameters, buffers, state_dict (old checkpoints included), repr, reset
methods and input checks are torch's own, and isinstance(m, torch.nn.BatchNorm2d) holds.

forward has three paths: eager (our operator, batchnorm_ext::batch_norm), TorchScript
(the operator called directly: torch.jit.script compiles only that branch) and FX symbolic
tracing (one call_module node, as FX records torch.nn's modules).
"""
import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _onnx
from .functional import _batch_norm as _batch_norm_op

# What _batch_norm_op(...) runs (OpOverload.__call__ is `return self._op(*args, **kwargs)`).
# Only for eager calls: Dynamo knows OpOverloads, not this.
_batch_norm_call = _batch_norm_op._op


class OnOurKernel:
    """A mixin for batch norms of torch.nn (and their subclasses) that run on our
    operator: self._batch_norm(input) is the second half of torch's _BatchNorm.forward
    (after the input check), on our operator, in eager mode, TorchScript, FX tracing and
    ONNX export.  It comes before the torch.nn class in the bases:

        class OursScaled(batchnorm_ext.OnOurKernel, Scaled):  # Scaled: a BatchNorm2d
            def forward(self, x):                                # whose forward returns
                self._check_input_dim(x)                         # 2 * F.batch_norm(...)
                return 2 * self._batch_norm(x)

        batchnorm_ext.register_conversion(Scaled, OursScaled)
    """

    def _batch_norm_arguments(self) -> Tuple[Optional[Tensor], Optional[Tensor], bool,
                                             Optional[float], Optional[Tensor]]:
        """What torch's _BatchNorm.forward passes to F.batch_norm, in our operator's terms:
        (running_mean, running_var, use_batch_stats, momentum, num_batches_tracked).  Counts
        the batch in num_batches_tracked, as torch does.  (Written for TorchScript too, and
        with each attribute read once: a buffer read costs nn.Module.__getattr__.)"""
        momentum: Optional[float] = self.momentum
        training = self.training
        tracking = self.track_running_stats
        # momentum=None: a cumulative average over num_batches_tracked batches, computed by
        # the operator from the counter (no host round trip: torch.compile keeps one graph).
        counter: Optional[Tensor] = None
        if training and tracking:
            num_batches_tracked = self.num_batches_tracked
            if num_batches_tracked is not None:  # a separate test: TorchScript refines it
                num_batches_tracked.add_(1)
                if momentum is None:
                    counter = num_batches_tracked
        if momentum is None and counter is None:
            momentum = 0.0  # torch's factor when there is no counter to average with
        if training and not tracking:  # batch statistics, and no buffers to update
            return None, None, True, momentum, counter
        # Buffers are passed to be updated (training) or to normalize (eval); batch
        # statistics normalize in training, and in eval when there are no buffers.
        running_mean = self.running_mean
        running_var = self.running_var
        use_batch_stats = training or (running_mean is None and running_var is None)
        return running_mean, running_var, use_batch_stats, momentum, counter

    def _batch_norm(self, input: Tensor) -> Tensor:
        running_mean, running_var, use_batch_stats, momentum, counter = self._batch_norm_arguments()
        if torch.jit.is_scripting():
            return torch.ops.batchnorm_ext.batch_norm(input, self.weight, self.bias, running_mean,
                                                      running_var, use_batch_stats, momentum,
                                                      self.eps, counter)
        return self._batch_norm_eager(input, running_mean, running_var, use_batch_stats,
                                      momentum, counter)

    @torch.jit.unused
    def _batch_norm_eager(self, input: Tensor, running_mean: Optional[Tensor],
                          running_var: Optional[Tensor], use_batch_stats: bool,
                          momentum: Optional[float], counter: Optional[Tensor]) -> Tensor:
        if _onnx.exporting():  # torch.onnx.export(dynamo=True): see _onnx.py
            return _onnx.batch_norm(input, self.weight, self.bias, running_mean, running_var,
                                    use_batch_stats, self.eps)
        if not use_batch_stats and _compiling():
            return _native_eval(self, input, running_mean, running_var)
        return _batch_norm_op(input, self.weight, self.bias, running_mean, running_var,
                              use_batch_stats, momentum, self.eps, counter)


def _compiling():
    """Whether torch.compile is tracing (not torch.export, which keeps our operators)."""
    return torch.compiler.is_compiling() and not torch.compiler.is_exporting()


def _native_eval(module, input, running_mean, running_var):
    """The eval batch norm as torch's, for torch.compile: AOTAutograd decomposes it into
    pointwise ops that Inductor fuses with its neighbours, or, with freezing, folds into the
    convolution before it (our operator would be an opaque call that stops both)."""
    return torch.nn.functional.batch_norm(input, running_mean, running_var, module.weight,
                                          module.bias, False, 0.0, module.eps)


def batch_norm_arguments(module):
    """OnOurKernel._batch_norm_arguments for any batch norm of torch.nn or ours."""
    return OnOurKernel._batch_norm_arguments(module)


class _Forward(OnOurKernel):
    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            self._check_input_dim(input)
            return self._batch_norm(input)
        return self._forward_eager(input)

    @torch.jit.unused
    def _forward_eager(self, input: Tensor) -> Tensor:
        # The path of every eager call, kept short: a small batch norm's call costs more
        # in Python than in its kernel.
        if _traced_by_fx(self, input):
            return _fx_call_module(self, input)
        self._check_input_dim(input)
        arguments = self._batch_norm_arguments()
        if torch.compiler.is_compiling():  # torch.compile, torch.export, ONNX export
            return self._batch_norm_eager(input, *arguments)
        # Plain eager: the operator called as its OpOverload's __call__ calls it (torch
        # function modes, dispatch modes and subclasses as ever), one Python frame less;
        # and none of _batch_norm_eager's compile and export checks.  0.3 to 0.6 us of a
        # (2, 3, 4, 4) or 8x512x1x1 call, whose native module call takes 8 to 18 us.
        running_mean, running_var, use_batch_stats, momentum, counter = arguments
        return _batch_norm_call(input, self.weight, self.bias, running_mean, running_var,
                                use_batch_stats, momentum, self.eps, counter)


def _traced_by_fx(module, input):
    """Whether FX symbolic tracing calls `module` as a submodule of what it traces."""
    return isinstance(input, torch.fx.Proxy) and getattr(input.tracer, "root", None) is not module


def _fx_call_module(module, input):
    """One call_module node for `module`, as FX records the modules of torch.nn (its
    Tracer.is_leaf_module keeps only those defined under torch.nn and traces into the
    rest).  So the traced graph calls the module, which then runs in its own mode (train or
    eval), as a native batch norm does in a traced graph."""
    tracer = input.tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(module), (input,), {})


class BatchNorm1d(_Forward, torch.nn.BatchNorm1d):
    __doc__ = torch.nn.BatchNorm1d.__doc__


class BatchNorm2d(_Forward, torch.nn.BatchNorm2d):
    __doc__ = torch.nn.BatchNorm2d.__doc__


class BatchNorm3d(_Forward, torch.nn.BatchNorm3d):
    __doc__ = torch.nn.BatchNorm3d.__doc__


_NATIVE = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
_OURS = (BatchNorm1d, BatchNorm2d, BatchNorm3d)

# torch.nn class -> ours, and back.  Filled by register_conversion, and on first sight for
# subclasses of torch.nn.BatchNorm1d/2d/3d that keep torch's forward.
_CONVERSIONS = dict(zip(_NATIVE, _OURS))
_REVERSIONS = dict(zip(_OURS, _NATIVE))

# Conversions for classes of other libraries, imported only when such a module is met.
_KNOWN = {"timm.layers.norm_act.BatchNormAct2d": "batchnorm_ext._timm"}


def register_conversion(source, target):
    """Makes convert_model replace every module of class `source` (exactly, not its
    subclasses) by one of class `target`, and revert_model do the reverse.

    `target` must be a subclass of `source` that runs on the attributes of a `source`
    instance: the conversion moves the instance's __dict__ (parameters, buffers, submodules,
    hooks) into a `target` instance as it is, without calling a constructor.
    """
    if not (isinstance(source, type) and isinstance(target, type) and issubclass(target, source)):
        raise TypeError(f"register_conversion: {target!r} must be a subclass of {source!r}")
    _CONVERSIONS[source] = target
    _REVERSIONS[target] = source


def _target_of(cls):
    """Our class for modules of class `cls`, or None."""
    if cls in _CONVERSIONS:
        return _CONVERSIONS[cls]
    known = _KNOWN.get(f"{cls.__module__}.{cls.__qualname__}")
    if known is not None:
        __import__(known)  # registers its conversions
        return _CONVERSIONS.get(cls)
    if _keeps_torch_forward(cls):
        register_conversion(cls, _subclass_on_our_kernel(cls))
        return _CONVERSIONS[cls]
    return None


def _keeps_torch_forward(cls):
    """A subclass of torch.nn.BatchNorm1d/2d/3d that is not ours and does not override
    forward: everything but the forward is its own, so ours can take over the forward."""
    return (issubclass(cls, _NATIVE) and not issubclass(cls, OnOurKernel)
            and cls.forward is torch.nn.modules.batchnorm._BatchNorm.forward)


def _subclass_on_our_kernel(cls):
    """`cls` with our forward: a subclass of both `cls` and ours (the MRO puts our forward
    first, then the methods of `cls`, then torch's)."""
    ours = next(o for n, o in zip(_NATIVE, _OURS) if issubclass(cls, n))
    return type(cls.__name__, (ours, cls), {
        "__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__,
        "_source_class": cls, "__reduce_ex__": _reduce_subclass})


def _reduce_subclass(self, protocol):
    # The class is made at run time and cannot be pickled by name: pickle (and deepcopy)
    # rebuild it from the class it came from, which can.
    reduced = object.__reduce_ex__(self, protocol)
    return (_new_subclass_instance, (type(self)._source_class,)) + tuple(reduced[2:])


def _new_subclass_instance(source):
    cls = _target_of(source)
    return cls.__new__(cls)


def _moved(module, cls):
    """The same module as an instance of `cls`: same parameters and buffers (the very
    tensors, so an optimizer built before keeps working), training mode, hooks (the very
    hook tables, so handles taken before still remove them) and attributes.  The old
    module shares them and is meant to be dropped."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    return new


def _replace_children(module, replacement):
    """Replaces, depth first, every module m for which replacement(m) is not None; returns
    the new `module` (itself unless it was replaced)."""
    new = replacement(module)
    if new is not None:
        return new
    for name, child in module.named_children():
        converted = _replace_children(child, replacement)
        if converted is not child:
            module.add_module(name, converted)
    return module


def convert_model(module, sync=False):
    """Replaces every batch norm of `module` that torch.nn or a known library defines by
    ours, and returns `module` (or the new module if `module` itself is one).

    Converted: torch.nn.BatchNorm1d/2d/3d; their subclasses that do not override forward
    (they keep their other methods: the converted class derives from both); classes
    registered with register_conversion (timm's BatchNormAct2d is, on first sight); and
    with sync=True, torch.nn.SyncBatchNorm (to batchnorm_ext.SyncBatchNorm).  A subclass
    with its own forward is left alone, with a warning naming it.

    Like torch.nn.SyncBatchNorm.convert_sync_batchnorm, children are replaced in place,
    and each converted module keeps the very parameter and buffer tensors, its mode and
    hooks: an optimizer built before keeps working.  revert_model undoes it.
    """
    from .sync import SyncBatchNorm
    skipped = set()

    def replacement(m):
        cls = type(m)
        if sync and cls is torch.nn.SyncBatchNorm:
            return _moved(m, SyncBatchNorm)
        target = _target_of(cls)
        if target is not None:
            return _moved(m, target)
        if isinstance(m, _NATIVE) and not isinstance(m, OnOurKernel):
            skipped.add(f"{cls.__module__}.{cls.__qualname__}")
        return None

    result = _replace_children(module, replacement)
    if skipped:
        warnings.warn(f"convert_model: left {', '.join(sorted(skipped))} as they are (their "
                      "forward is their own); batchnorm_ext.register_conversion adds a "
                      "conversion for a class", stacklevel=2)
    return result


def revert_model(module, sync=False):
    """The reverse of convert_model: every module of ours becomes one of the class it was
    converted from (torch.nn.BatchNorm2d, the subclass, timm's class...), with the very
    same parameter and buffer tensors, mode and hooks; with sync=True,
    batchnorm_ext.SyncBatchNorm becomes torch.nn.SyncBatchNorm.  Returns `module` (or the
    new module if `module` itself is one of ours).

    For what recognizes only torch's classes: conv-BN fusion
    (torch.fx.experimental.optimization.fuse, torch.ao.quantization.fuse_modules without
    batchnorm_ext.fuser_method_mapping(), Inductor's folding under freezing).
    """
    from .sync import SyncBatchNorm

    def replacement(m):
        cls = type(m)
        if sync and cls is SyncBatchNorm:
            return _moved(m, torch.nn.SyncBatchNorm)
        return _moved(m, _REVERSIONS[cls]) if cls in _REVERSIONS else None

    return _replace_children(module, replacement)


def revert_sync_batchnorm(module, dim=2, native=False):
    """Replaces every SyncBatchNorm in `module` (torch.nn's or ours) by a plain batch norm
    of `dim` dimensions (BatchNorm{dim}d: 1 for (N, C) or (N, C, L) input, 2 for images, 3
    for volumes): ours, or torch.nn's with native=True.  Same parameters, buffers and mode;
    for inference on one process, where plain batch norms also fuse with convolutions and
    export to TorchScript.  (torch has convert_sync_batchnorm, not its reverse.)

    The dimension is not stored in a SyncBatchNorm: one with input of another rank raises
    at its first forward, as BatchNorm{dim}d does.  Call it on submodules for models that
    mix ranks.
    """
    from .sync import SyncBatchNorm
    if dim not in (1, 2, 3):
        raise ValueError(f"revert_sync_batchnorm: dim must be 1, 2 or 3, got {dim}")
    cls = (_NATIVE if native else _OURS)[dim - 1]

    def replacement(m):
        if type(m) not in (torch.nn.SyncBatchNorm, SyncBatchNorm):
            return None
        new = _moved(m, cls)
        del new.__dict__["process_group"]
        return new

    return _replace_children(module, replacement)


# ---------------------------------------------------------------------------------------
# Conv-BN fusion with torch.ao.quantization.fuse_modules.

def _native_fusion_keys():
    """The module sequences torch.ao.quantization.fuse_modules fuses that hold a batch norm."""
    nn = torch.nn
    keys = []
    for conv, transposed, bn in zip((nn.Conv1d, nn.Conv2d, nn.Conv3d),
                                    (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
                                    _NATIVE):
        keys += [(conv, bn), (conv, bn, nn.ReLU), (transposed, bn)]
    keys += [(nn.Linear, nn.BatchNorm1d), (nn.BatchNorm2d, nn.ReLU), (nn.BatchNorm3d, nn.ReLU)]
    return keys


def fuser_method_mapping():
    """The fuser methods for our batch norms, for torch.ao.quantization.fuse_modules:

        fuse_modules(model, [["conv", "bn", "relu"]], fuse_custom_config_dict={
            "additional_fuser_method_mapping": batchnorm_ext.fuser_method_mapping()})

    Each one reverts the batch norm to torch.nn's (revert_model: the same tensors) and
    applies torch's fuser method: in eval the batch norm is folded into the convolution
    or linear layer; for quantization-aware training (fuse_modules_qat) the fused module
    holds torch's batch norm.
    """
    from torch.ao.quantization import get_fuser_method

    def fuse(is_qat, *modules):
        native = [revert_model(m) for m in modules]
        return get_fuser_method(tuple(type(m) for m in native))(is_qat, *native)

    ours = dict(zip(_NATIVE, _OURS))
    return {tuple(ours.get(t, t) for t in key): fuse for key in _native_fusion_keys()}

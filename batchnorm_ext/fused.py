"""Fused batch norms: the batch norm, a residual add and an activation in one pass.

    model = batchnorm_ext.fuse(model)          # BN -> ReLU, BN -> add -> ReLU, ... fused
    bn = batchnorm_ext.BatchNormAct2d(64, activation="relu")
    y = bn(x, residual)                        # relu(batch_norm(x) + residual)

A ResNet block ends in `relu(bn2(conv2(x)) + identity)`: three passes over memory in
eager PyTorch (the batch norm, the add, the ReLU), each reading and writing the whole
activation, and as many in the backward.  The fused operator does the add and the
activation in the pass that writes the batch norm's output, and its backward reads the
output (ReLU's mask) instead of a stored intermediate.

`fuse(model)` finds the patterns in a model's forward code with torch.fx, one module at a
time (each module's forward is traced with its children as leaves), so that it works on
models whose top-level forward cannot be traced, and leaves every module it does not
change as it is.  What it matches, after a batch norm (torch.nn's or ours, BatchNorm1d/2d/
3d, or timm's BatchNormAct2d, whose own activation is folded in too):
  - an activation: torch.nn.ReLU / SiLU (in place or not), F.relu, F.silu, torch.relu,
    Tensor.relu;
  - an add of another tensor (`out + identity`, `out += identity`, torch.add), then
    optionally an activation;
  - nn.Identity modules in between (dropout-free timm blocks have them).
The batch norm's output must have no other use.  The state_dict keys stay the same (the
fused modules hold the batch norm's parameters and buffers; activations have none).  A
module whose forward had to change (an add or a shared activation module moved into the
batch norm) becomes a torch.fx.GraphModule of the same class name, with the same children;
one whose batch norm is simply followed by its own activation module keeps its class, the
activation module being replaced by nn.Identity.
"""
import operator
from typing import Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor

from . import _onnx, modules
from .functional import _normalize_act, _unfused

_ACTIVATION_MODULES = {torch.nn.ReLU: "relu", torch.nn.SiLU: "silu"}
_ACTIVATION_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu",
                         F.silu: "silu"}
_ACTIVATION_METHODS = {"relu": "relu", "relu_": "relu"}
_ADDS = (operator.add, operator.iadd, torch.add)
ACTIVATIONS = ("identity", "relu", "silu")


class _BatchNormAct:
    """A batch norm followed by `activation(... + residual)`: forward(input, residual=None).

    The same parameters, buffers, state_dict and constructor as the batch norm (plus
    `activation`: 'identity', 'relu' or 'silu').  Like our other modules, it runs in eager
    mode, TorchScript, FX tracing (one call_module node) and ONNX export."""

    def __init__(self, *args, activation="relu", **kwargs):
        super().__init__(*args, **kwargs)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if torch.jit.is_scripting():
            self._check_input_dim(input)
            running_mean, running_var, use_batch_stats, momentum, counter = \
                self._batch_norm_arguments()
            return torch.ops.batchnorm_ext.batch_norm_act(
                input, self.weight, self.bias, running_mean, running_var, use_batch_stats,
                momentum, self.eps, counter, residual, self.activation)
        return self._forward_act_eager(input, residual)

    @torch.jit.unused
    def _forward_act_eager(self, input: Tensor, residual: Optional[Tensor]) -> Tensor:
        if modules._traced_by_fx(self, input):
            tracer = input.tracer
            args = (input,) if residual is None else (input, residual)
            return tracer.create_proxy("call_module", tracer.path_of_module(self), args, {})
        self._check_input_dim(input)
        running_mean, running_var, use_batch_stats, momentum, counter = self._batch_norm_arguments()
        if _onnx.exporting():  # BatchNormalization, then the add and the activation
            output = _onnx.batch_norm(input, self.weight, self.bias, running_mean, running_var,
                                      use_batch_stats, self.eps)
            return _unfused(output, residual, self.activation)
        if not use_batch_stats and modules._compiling():  # see modules._native_eval
            output = modules._native_eval(self, input, running_mean, running_var)
            return _unfused(output, residual, self.activation)
        return _normalize_act(input, self.weight, self.bias, running_mean, running_var,
                              use_batch_stats, momentum, self.eps, counter, residual,
                              self.activation)

    def extra_repr(self):
        return f"{super().extra_repr()}, activation={self.activation!r}"


class BatchNormAct1d(_BatchNormAct, modules.BatchNorm1d):
    """BatchNorm1d followed by activation(... + residual), in one pass."""


class BatchNormAct2d(_BatchNormAct, modules.BatchNorm2d):
    """BatchNorm2d followed by activation(... + residual), in one pass."""


class BatchNormAct3d(_BatchNormAct, modules.BatchNorm3d):
    """BatchNorm3d followed by activation(... + residual), in one pass."""


_FUSED = {1: BatchNormAct1d, 2: BatchNormAct2d, 3: BatchNormAct3d}
_BATCH_NORMS = {torch.nn.BatchNorm1d: 1, torch.nn.BatchNorm2d: 2, torch.nn.BatchNorm3d: 3,
                modules.BatchNorm1d: 1, modules.BatchNorm2d: 2, modules.BatchNorm3d: 3}


def _timm_batch_norm_act(module):
    """timm's BatchNormAct2d (or ours of it, from convert_model) with no dropout and an
    activation we fuse: that activation's name ('identity' for none), else None."""
    timm_class = next((c for c in type(module).__mro__ if c.__name__ == "BatchNormAct2d" and
                       c.__module__.startswith("timm.")), None)
    if timm_class is None or type(module) not in (timm_class, modules._CONVERSIONS.get(timm_class)):
        return None
    if not isinstance(getattr(module, "drop", None), torch.nn.Identity):
        return None
    act = getattr(module, "act", None)
    if isinstance(act, torch.nn.Identity):
        return "identity"
    return _ACTIVATION_MODULES.get(type(act))


def _as_fused(module):
    """The batch norm `module` as one of our fused modules with the very same parameters,
    buffers and attributes (its activation 'identity', or timm's own); None if it is not a
    batch norm we fuse."""
    if isinstance(module, _BatchNormAct):
        return module
    activation = _timm_batch_norm_act(module)
    if activation is not None:
        dims = 2
    elif type(module) in _BATCH_NORMS:
        dims, activation = _BATCH_NORMS[type(module)], "identity"
    else:
        return None
    fused = _FUSED[dims].__new__(_FUSED[dims])
    fused.__dict__.update(module.__dict__)
    fused._modules = {}  # timm's drop and act (no parameters) are now the kernel's
    fused.activation = activation
    return fused


def _activation_of(node, root):
    """The activation a graph node applies to its single input ('relu', 'silu'), else None."""
    if node.op == "call_module":
        activation = _ACTIVATION_MODULES.get(type(root.get_submodule(node.target)))
    elif node.op == "call_function":
        activation = _ACTIVATION_FUNCTIONS.get(node.target)
    elif node.op == "call_method":
        activation = _ACTIVATION_METHODS.get(node.target)
    else:
        return None
    # Nothing but the input (and inplace=): F.relu(x, inplace=True), x.relu_().
    extra = [a for a in node.args[1:] if not isinstance(a, bool)]
    return activation if not extra and set(node.kwargs) <= {"inplace"} else None


def _is_identity(node, root):
    return node.op == "call_module" and isinstance(root.get_submodule(node.target), torch.nn.Identity)


def _single_user(node):
    return next(iter(node.users)) if len(node.users) == 1 else None


def _residual_of(add, value):
    """For a node adding `value` and another node (no alpha): the other node, else None."""
    is_add = (add.op == "call_function" and add.target in _ADDS) or \
        (add.op == "call_method" and add.target in ("add", "add_"))
    if not is_add or add.kwargs or len(add.args) != 2:
        return None
    a, b = add.args
    # An in-place add must write into the batch norm's side (`out += identity`): one that
    # writes into the other tensor (`identity += out`) changes it for its other readers.
    if (add.target in (operator.iadd, "add_")) and a is not value:
        return None
    other = b if a is value else a if b is value else None
    # y + y is no residual: the batch norm's output would be its own residual.
    return other if isinstance(other, torch.fx.Node) and other is not value else None


class _ShallowTracer(torch.fx.Tracer):
    """Traces one module's forward: every child module is a call_module node."""

    def is_leaf_module(self, module, qualified_name):
        return True


class _Fusion:
    """A batch norm call (node) and what follows it: nodes (identities, the add, the
    activation), the residual node or None, the activation's name and its node or None."""

    def __init__(self, node):
        self.node, self.nodes, self.residual, self.activation, self.activation_node = \
            node, [], None, None, None


def _find(node, root):
    """The fusable pattern after the batch-norm node `node`, or None.  Each value on the
    way must have no other use."""
    fusion, last = _Fusion(node), node
    while (nxt := _single_user(last)) is not None:
        if _is_identity(nxt, root):
            pass
        elif fusion.residual is None and fusion.activation is None and \
                _residual_of(nxt, last) is not None:
            fusion.residual = _residual_of(nxt, last)
        elif _activation_of(nxt, root) is not None and nxt.args[0] is last:
            fusion.activation, fusion.activation_node = _activation_of(nxt, root), nxt
            fusion.nodes.append(nxt)
            break
        else:
            break
        fusion.nodes.append(nxt)
        last = nxt
    # Identities after the last add or activation are not part of it.
    while fusion.nodes and fusion.nodes[-1] is not fusion.activation_node and \
            _is_identity(fusion.nodes[-1], root):
        fusion.nodes.pop()
    if fusion.residual is None and fusion.activation is None:
        return None
    return fusion


def _fuse_module(module, times_used):
    """Fuses the patterns of `module`'s own forward (its children are leaves).  Returns
    the module to use in its place (itself, its children changed, or a GraphModule)."""
    try:
        graph = _ShallowTracer().trace(module)
    except Exception:  # control flow on tensors, and so on: its children were fused alone
        return module
    calls = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    fusions = []
    for node in graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1 or len(node.args) != 1 or node.kwargs:
            continue
        child = module.get_submodule(node.target)
        fused = _as_fused(child)
        if fused is None or fused.activation != "identity" or times_used.get(id(child), 0) > 1:
            continue
        fusion = _find(node, module)
        if fusion is not None:
            fusion.module = fused
            fusions.append(fusion)
    if not fusions:
        return module
    for fusion in fusions:
        fusion.module.activation = fusion.activation or "identity"
        module.set_submodule(fusion.node.target, fusion.module)
    # A batch norm followed only by an activation module called nowhere else: that module
    # becomes nn.Identity and the forward stays as it is (the module keeps its class).
    if all(f.residual is None and f.activation_node.op == "call_module" and
           calls[f.activation_node.target] == 1 for f in fusions):
        for fusion in fusions:
            identity = torch.nn.Identity().train(module.get_submodule(fusion.activation_node.target).training)
            module.set_submodule(fusion.activation_node.target, identity)
        return module
    # Otherwise the forward changes: the batch norm's call takes the residual and replaces
    # the add and the activation.
    for fusion in fusions:
        last = fusion.nodes[-1]
        with graph.inserting_before(last):
            args = (fusion.node.args[0],) + ((fusion.residual,) if fusion.residual is not None else ())
            call = graph.call_module(fusion.node.target, args)
        last.replace_all_uses_with(call)
        for dead in reversed(fusion.nodes):
            graph.erase_node(dead)
        graph.erase_node(fusion.node)
    graph.lint()
    fused = torch.fx.GraphModule(module, graph, class_name=type(module).__name__)
    # The very children, parameters and buffers, in their order (also those the forward
    # does not use): the same state_dict, keys in the same order.
    fused._modules = dict(module._modules)
    fused._parameters = dict(module._parameters)
    fused._buffers = dict(module._buffers)
    fused._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    fused.train(module.training)
    return fused


def fuse(model):
    """Fuses every batch norm of `model` with the residual add and activation that follow
    it (see this module's documentation for what is matched), on batchnorm_ext's fused
    kernel; the other batch norms are converted as by convert_model.  Returns the model (a
    new object only if the model itself had to become a GraphModule); state_dict keys are
    unchanged."""
    times_used = {}
    for _, m in model.named_modules(remove_duplicate=False):
        times_used[id(m)] = times_used.get(id(m), 0) + 1
    return modules.convert_model(_fuse_tree(model, times_used))


def _fuse_tree(module, times_used):
    for name, child in list(module.named_children()):
        new = _fuse_tree(child, times_used)
        if new is not child:
            setattr(module, name, new)
    if _timm_batch_norm_act(module) is not None and times_used.get(id(module), 0) <= 1:
        return _as_fused(module)
    return _fuse_module(module, times_used)

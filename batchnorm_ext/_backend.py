"""torch.compile(model, backend="batchnorm_ext"): our kernels in models never converted.

    compiled = torch.compile(model, backend="batchnorm_ext")      # mode=, dynamic=, fullgraph=
    compiled = torch.compile(model, backend=batchnorm_ext.compile_backend(freezing=True))

The backend is Inductor with one more pass, BatchNormRewrite, which runs on the graph
Dynamo captured, before AOTAutograd (Inductor's pre-grad custom pass): there a module's
batch norm is still one `F.batch_norm` call, where AOTAutograd would decompose it into
var_mean and pointwise ops.  Each batch norm that normalizes with batch statistics (a
training-mode module) becomes our operator; a ReLU or SiLU after it, or an add of a
residual and then the activation, go into the same call (batch_norm_act), found by the
matchers of batchnorm_ext.fuse.  Batch norms that normalize with running statistics
(eval) stay native: Inductor fuses them as pointwise ops, or, with freezing, folds them
into the convolution before them.  So do batch norms followed by an activation our
kernels do not apply (Hardswish, GELU, ...), which Inductor fuses with the normalization.
Everything else is Inductor's.

Inductor cannot fuse anything into an operator it does not generate (an extern kernel), so
the fusion has to be ours, made before Inductor sees the graph.

The pass is a CustomGraphPass: its uuid() (the package's version and a hash of its Python
sources, which hold the rewrite, the autograd formulas and the fake kernels, and of its
compiled library, which holds the schemas) goes into the keys of Inductor's FX graph cache
and of the AOTAutograd cache, so that neither serves a graph compiled through another
version of the package.  (A converted model under plain torch.compile has no such salt:
clear the cache after an upgrade, or set torch.compiler.config.cache_key_tag.)

enable_compile_integration() installs the same pass for plain torch.compile(model).
"""
import functools
import operator
import os

import torch
import torch.nn.functional as F
from torch._inductor.custom_graph_pass import (CustomGraphPass, get_custom_graph_passes,
                                               get_hash_for_files)
from torch._dynamo.utils import counters
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import fused
from ._ops import ops

# The positional parameters of the batch-norm calls the pass recognizes: modules' (and
# users') F.batch_norm, and ours (a converted model).  Not torch.batch_norm: F.batch_norm's
# checks (one value per channel, eps > 0), which our operator makes, are not its own.
_PARAMETERS = {
    F.batch_norm: ("input", "running_mean", "running_var", "weight", "bias", "training",
                   "momentum", "eps"),
    ops.batch_norm.default: ("input", "weight", "bias", "running_mean", "running_var",
                             "training", "momentum", "eps", "num_batches_tracked"),
}
# Activations our kernels do not apply: a batch norm followed by one of them stays native,
# so that Inductor generates the normalization and the activation as one loop (ours would
# be an opaque call, then a pass of Inductor's for the activation).
_LEFT_TO_INDUCTOR = {F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid", F.gelu: "gelu",
                     F.relu6: "relu6", F.leaky_relu: "leaky_relu", F.elu: "elu", F.mish: "mish",
                     torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.tanh: "tanh",
                     F.tanh: "tanh"}
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.iand,
                      operator.ior, operator.ixor, operator.ilshift, operator.irshift,
                      operator.imatmul, operator.setitem}
_DEFAULTS = {"running_mean": None, "running_var": None, "weight": None, "bias": None,
             "training": False, "momentum": 0.1, "eps": 1e-5, "num_batches_tracked": None}
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _value(node):
    """The fake tensor Dynamo recorded for a graph node (None for constants)."""
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, torch.fx.Node) else None


def _batch_norm_arguments(node):
    """The arguments of a batch-norm call node, by name (None if they do not fit)."""
    parameters = _PARAMETERS.get(node.target) if node.op == "call_function" else None
    if parameters is None or len(node.args) > len(parameters) or not set(node.kwargs) <= set(parameters):
        return None
    return {**_DEFAULTS, **dict(zip(parameters, node.args)), **node.kwargs}


def _batch_norm_call(node):
    """The arguments of a batch-norm call node (by name), if it normalizes a CPU tensor
    with batch statistics and the pass may replace it; else None."""
    args = _batch_norm_arguments(node)
    if args is None:
        return None
    # Constants Dynamo specialized on: batch statistics, a known momentum (momentum=None in a
    # module is a cumulative average that Dynamo computes from the counter: left to torch).
    if args["training"] is not True or not isinstance(args["eps"], float) or \
            not isinstance(args["momentum"], (float, int)) and \
            not (node.target is ops.batch_norm.default and args["momentum"] is None):
        return None
    if (args["running_mean"] is None) != (args["running_var"] is None):
        return None  # native raises its own error
    input = _value(args["input"])
    if not isinstance(input, torch.Tensor) or input.device.type != "cpu" or \
            input.dtype not in _DTYPES or input.dim() < 2:
        return None
    for name in ("weight", "bias", "running_mean", "running_var"):
        if args[name] is not None and (not isinstance(_value(args[name]), torch.Tensor) or
                                       _value(args[name]).device.type != "cpu"):
            return None
    return args


def _same_tensor_kind(a, b):
    """Whether fake tensors a and b have the same shape (for every value of symbolic
    sizes), dtype and device: a residual the fused kernel takes as it is."""
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == b.dim() and
            a.dtype == b.dtype and a.device == b.device and
            all(statically_known_true(x == y) for x, y in zip(a.shape, b.shape)))


def _written(node):
    """The graph nodes whose tensors `node` may write into; None if it cannot tell (it
    may write anywhere)."""
    if node.op in ("placeholder", "get_attr", "output"):
        return []
    if node.op == "call_module":
        return None
    target, first = node.target, node.args[:1]
    if node.op == "call_method":
        return list(first) if target.endswith("_") and not target.endswith("__") else []
    if target in _INPLACE_OPERATORS or node.kwargs.get("inplace") is True or \
            getattr(target, "__name__", "").endswith("_"):
        return list(first)
    if target in _PARAMETERS:  # a batch norm in training updates its running statistics
        args = _batch_norm_arguments(node)
        return None if args is None else [] if args["training"] is False else \
            [args["running_mean"], args["running_var"], args["num_batches_tracked"]]
    if isinstance(target, torch._ops.OpOverload):
        return None if target._schema.is_mutable else []
    return []


def _moves_safely(node, fusion, operands):
    """Whether the batch norm `node` may run where the last node of `fusion` is (the fused
    call takes its place): no node in between writes into what it reads (its operands, the
    residual) or reads its running statistics before their update, and none writes into a
    tensor that is not a graph input (which may be a view of one of those)."""
    inputs = [n for n in operands if isinstance(n, torch.fx.Node)] + [fusion.residual]
    statistics = [operands[3], operands[4]]
    chain = set(fusion.nodes)
    between = node.next
    while between is not fusion.nodes[-1]:
        if between not in chain:
            written = _written(between)
            if written is None or any(isinstance(w, torch.fx.Node) and
                                      (w in inputs or w.op not in ("placeholder", "get_attr"))
                                      for w in written):
                return False
            if any(s in between.all_input_nodes for s in statistics if s is not None):
                return False
        between = between.next
    return True


def _left_to_inductor(node):
    """The activation after a native batch-norm call that the rewrite leaves to Inductor
    with it (see _LEFT_TO_INDUCTOR), by name; else None."""
    user = fused._single_user(node)
    if node.target is ops.batch_norm.default or user is None or user.op != "call_function":
        return None
    return _LEFT_TO_INDUCTOR.get(user.target)


def _becomes_ours(node):
    """Whether rewrite() makes the node one of our operators (or it is one already)."""
    return _batch_norm_call(node) is not None and _left_to_inductor(node) is None


def rewrite(graph):
    """Replaces, in a Dynamo graph, the batch norms that use batch statistics by our
    operators, fused with what follows them (see the module's documentation); returns
    the number of batch norms replaced.  Each one is counted by what it became in
    torch._dynamo.utils.counters["batchnorm_ext"] ("batch_norm", "batch_norm+relu",
    "batch_norm+add+silu", ...; "native+hardswish" for one left to Inductor), when the pass
    runs: a graph served from Inductor's caches is not rewritten again (nor counted)."""
    root = graph.owning_module
    replaced = 0
    for node in list(graph.nodes):
        args = _batch_norm_call(node)
        if args is None:
            continue
        fusion = fused._find(node, root)
        if fusion is not None and fusion.residual is not None and \
                not _same_tensor_kind(_value(fusion.residual), _value(args["input"])):
            fusion = None  # a residual that broadcasts or converts: the add stays torch's
        operands = (args["input"], args["weight"], args["bias"], args["running_mean"],
                    args["running_var"], True, args["momentum"], args["eps"],
                    args["num_batches_tracked"])
        if fusion is not None and not _moves_safely(node, fusion, operands):
            fusion = None  # e.g. the same module's batch norm called again in between
        if fusion is None and node.target is ops.batch_norm.default:
            continue  # ours already (a converted model), with nothing to fuse
        left = _left_to_inductor(node)
        if fusion is None and left is not None:
            counters["batchnorm_ext"]["native+" + left] += 1
            continue
        last = fusion.nodes[-1] if fusion is not None else node
        with graph.inserting_before(last):
            if fusion is None:
                call = graph.call_function(ops.batch_norm.default, operands)
            else:
                call = graph.call_function(ops.batch_norm_act.default, operands + (
                    fusion.residual, fusion.activation or "identity"))
        call.meta.update(last.meta)  # the same value as the last node it replaces
        last.replace_all_uses_with(call)
        for dead in reversed(fusion.nodes if fusion is not None else []):
            graph.erase_node(dead)
        graph.erase_node(node)
        replaced += 1
        kind = "+".join(["batch_norm"] + (["add"] if fusion and fusion.residual is not None else []) +
                        ([fusion.activation] if fusion and fusion.activation else []))
        counters["batchnorm_ext"][kind] += 1
    if replaced:
        graph.lint()
    return replaced


@functools.lru_cache(1)
def _sources_hash():
    """A hash of the package's Python sources and of its compiled library (whose schemas
    and their tags, such as flexible_layout, Inductor reads and its caches do not see)."""
    from . import _C
    package = os.path.dirname(os.path.abspath(__file__))
    paths = sorted(os.path.join(package, f) for f in os.listdir(package) if f.endswith(".py"))
    return get_hash_for_files(tuple(paths) + (os.path.abspath(_C.__file__),)).hex()


class BatchNormRewrite(CustomGraphPass):
    """rewrite() as an Inductor pre-grad custom pass, with a uuid for the caches."""

    def __call__(self, graph):
        rewrite(graph)

    def uuid(self):
        from . import __version__
        return f"batchnorm_ext-{__version__}-{_sources_hash()}"


def _with_rewrite(passes):
    """Inductor's pre_grad_custom_pass setting `passes` with ours added (once), as a list."""
    passes = list(get_custom_graph_passes(passes))
    return passes if any(isinstance(p, BatchNormRewrite) for p in passes) else passes + [BatchNormRewrite()]


class _Backend:
    """A torch.compile backend: Inductor, with BatchNormRewrite among its pre-grad passes
    and `options` among its settings."""

    def __init__(self, options):
        self.options = dict(options)

    def __call__(self, graph_module, example_inputs, mode=None, options=None):
        settings = {**self.options, **(options or {})}
        # Inductor's layout optimization makes every CPU graph with a convolution
        # channels-last, converting its input and weights at each call.  Where batch norms
        # become ours it gains nothing (our kernels take either layout, and gain most in
        # NCHW training), so the backend turns it off there unless told otherwise; a graph
        # without keeps Inductor's default.  Measured: tutorial page 11.
        # (The pass runs on subgraphs too: checkpointed regions, cond branches.)
        if "layout_optimization" not in settings and \
                settings.get("use_pre_grad_passes", torch._inductor.config.use_pre_grad_passes) and \
                any(_becomes_ours(node) for module in graph_module.modules()
                    if isinstance(module, torch.fx.GraphModule) for node in module.graph.nodes):
            settings["layout_optimization"] = False
        # Inductor's own wrapper turns mode and options into settings, and checks them.
        inductor = torch._TorchCompileInductorWrapper(mode, settings, None)
        passes = inductor.config.get("pre_grad_custom_pass", torch._inductor.config.pre_grad_custom_pass)
        return inductor(graph_module, example_inputs,
                        config_patches={"pre_grad_custom_pass": _with_rewrite(passes)})

    def __eq__(self, other):
        return isinstance(other, _Backend) and self.options == other.options

    def __hash__(self):
        return hash(tuple(sorted(self.options)))


def compile_backend(**options):
    """A torch.compile backend: Inductor with our batch norms put in.  `options` are
    Inductor's settings (what torch.compile(options=...) takes, e.g. freezing=True);
    mode=, dynamic= and fullgraph= go to torch.compile as usual.

        torch.compile(model, backend=batchnorm_ext.compile_backend(freezing=True))

    torch.compile(model, backend="batchnorm_ext") is compile_backend() by name (the
    package's torch_dynamo_backends entry point)."""
    return _Backend(options)


backend = compile_backend()
backend.__name__ = "batchnorm_ext"


def enable_compile_integration():
    """Makes plain torch.compile(model) (Inductor) put our batch norms in, as the
    batchnorm_ext backend does: adds BatchNormRewrite to Inductor's pre-grad custom
    passes (a list: torch's setting takes one), after any already there.  Never done at
    import.  Returns the pass; disable_compile_integration() takes it out again."""
    config = torch._inductor.config
    config.pre_grad_custom_pass = _with_rewrite(config.pre_grad_custom_pass)
    return next(p for p in config.pre_grad_custom_pass if isinstance(p, BatchNormRewrite))


def disable_compile_integration():
    """Takes BatchNormRewrite out of Inductor's pre-grad custom passes."""
    config = torch._inductor.config
    passes = [p for p in get_custom_graph_passes(config.pre_grad_custom_pass)
              if not isinstance(p, BatchNormRewrite)]
    config.pre_grad_custom_pass = passes or None

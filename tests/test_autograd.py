"""Gradients: gradcheck and gradgradcheck in float64, double backward and forward-mode AD
(torch.func.jvp, dual tensors) against native."""
import contextlib
import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import batchnorm_ext
from helpers import assert_close, make_input

CASES = [((3, 4, 3, 3), "contiguous"), ((4, 3, 2, 3), "channels_last"), ((6, 3), "contiguous"),
         ((2, 3, 2, 2, 2), "channels_last"), ((3, 2, 5), "sliced")]


def parameters(channels, affine):
    if affine == "none":
        return None, None
    w = torch.rand(channels, dtype=torch.float64) + 0.5
    b = torch.randn(channels, dtype=torch.float64)
    return (w, None) if affine == "weight" else ((None, b) if affine == "bias" else (w, b))


def functions(channels, training):
    running_mean = torch.randn(channels, dtype=torch.float64)
    running_var = torch.rand(channels, dtype=torch.float64) + 0.5

    def ours(x, w=None, b=None):
        return batchnorm_ext.batch_norm(x, running_mean.clone(), running_var.clone(), w, b,
                                        training=training)

    def native(x, w=None, b=None):
        return F.batch_norm(x, running_mean.clone(), running_var.clone(), w, b, training=training)

    return ours, native


@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,layout", CASES, ids=str)
def test_gradcheck_and_gradgradcheck(shape, layout, training, affine):
    x = make_input(shape, torch.float64, layout).requires_grad_()
    w, b = parameters(shape[1], affine)
    inputs = [x] + [t.requires_grad_() for t in (w, b) if t is not None]
    ours, _ = functions(shape[1], training)
    f = lambda x, *p: ours(x, *_place(p, w, b))
    assert gradcheck(f, inputs)
    assert gradgradcheck(f, inputs)


def _place(given, w, b):
    """The parameters given positionally, back in (weight, bias) order."""
    given = list(given)
    return (given.pop(0) if w is not None else None, given.pop(0) if b is not None else None)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,layout", CASES, ids=str)
def test_double_backward_matches_native(shape, layout, training):
    ours, native = functions(shape[1], training)
    x0 = make_input(shape, torch.float64, layout)
    w0, b0 = parameters(shape[1], "both")
    results = []
    for f in (ours, native):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        y = f(x, w, b)
        gx, gw = torch.autograd.grad(y, (x, w), torch.ones_like(y) + x.detach(), create_graph=True)
        (gx.square().sum() + gw.sin().sum()).backward()
        results.append((gx, gw, x.grad, w.grad, b.grad))
    for a, n in zip(*results):
        if n is None:
            assert a is None
        else:
            assert_close(a, n)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,layout", CASES, ids=str)
def test_forward_ad_matches_native(shape, layout, training):
    x = make_input(shape, torch.float64, layout)
    w, b = parameters(shape[1], "both")
    tangents = (torch.randn_like(x), torch.randn_like(w), torch.randn_like(b))
    ours, native = functions(shape[1], training)
    out, tangent = torch.func.jvp(ours, (x, w, b), tangents)
    native_out, native_tangent = torch.func.jvp(native, (x, w, b), tangents)
    assert_close(out, native_out)
    assert_close(tangent, native_tangent)

    with fwAD.dual_level():
        dual = fwAD.make_dual(x, tangents[0])
        result = fwAD.unpack_dual(ours(dual, w, b))
        native_result = fwAD.unpack_dual(native(fwAD.make_dual(x, tangents[0]), w, b))
    assert_close(result.primal, native_result.primal)
    assert_close(result.tangent, native_result.tangent)


def test_gradcheck_forward_mode():
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    w, b = (t.requires_grad_() for t in parameters(3, "both"))
    ours, _ = functions(3, True)
    assert gradcheck(ours, (x, w, b), check_forward_ad=True, check_backward_ad=False,
                     check_undefined_grad=False)


def test_forward_ad_updates_running_stats_like_native():
    running = [(torch.zeros(3), torch.ones(3)) for _ in range(2)]
    x = torch.randn(5, 3, 4)
    with fwAD.dual_level():
        batchnorm_ext.batch_norm(fwAD.make_dual(x, torch.randn_like(x)), *running[0], training=True)
        F.batch_norm(fwAD.make_dual(x, torch.randn_like(x)), *running[1], training=True)
    assert_close(running[0][0], running[1][0])
    assert_close(running[0][1], running[1][1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_reduced_precision_gradients_as_accurate_as_native(layout, dtype):
    """Against a float64 oracle, our bfloat16/half gradients are no worse than native's.
    (Native keeps its saved mean and invstd in the input dtype, we keep them in float32,
    so the two differ by more than an ulp; the oracle says which is closer.)"""
    x = make_input((3, 4, 5, 5), dtype, layout, scale=2, offset=1)
    g = make_input((3, 4, 5, 5), dtype)
    results = {}
    for name, module in [("ours", batchnorm_ext.BatchNorm2d(4, dtype=dtype)),
                         ("native", torch.nn.BatchNorm2d(4, dtype=dtype)),
                         ("oracle", torch.nn.BatchNorm2d(4, dtype=torch.float64))]:
        xx = x.detach().to(module.weight.dtype).requires_grad_()
        module(xx).backward(g.to(module.weight.dtype))
        results[name] = [t.double() for t in (xx.grad, module.weight.grad, module.bias.grad)]
    for ours, native, oracle in zip(results["ours"], results["native"], results["oracle"]):
        ours_error = (ours - oracle).abs().max().item()
        native_error = (native - oracle).abs().max().item()
        ulp = oracle.abs().max().item() * torch.finfo(dtype).eps
        assert ours_error <= max(native_error, 2 * ulp), (ours_error, native_error)


# Where autograd has nothing to record (torch.no_grad, inference mode, or no argument that
# requires grad), the composite operators skip the C++ autograd Function and run the
# forward alone.  That path must give the same bits and the same running statistics as the
# recorded one, and an output that, like native's, requires no grad.
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "nothing requires grad"])
@pytest.mark.parametrize("fused", [False, True])
def test_forward_with_nothing_to_record_matches_the_recorded_one(training, context, fused):
    x = make_input((4, 6, 5, 5), torch.float32, "channels_last" if fused else "contiguous")
    residual = torch.randn_like(x) if fused else None

    def run(requires_grad, ctx):
        torch.manual_seed(1)
        weight = (torch.rand(6) + 0.5).requires_grad_(requires_grad)
        bias = torch.randn(6).requires_grad_(requires_grad)
        mean, var = torch.randn(6), torch.rand(6) + 0.5
        with ctx:
            out = batchnorm_ext.batch_norm(x, mean, var, weight, bias, training, 0.1, 1e-5,
                                           residual=residual, activation="relu" if fused else None)
        return out, mean, var

    recorded, mean_r, var_r = run(True, torch.enable_grad())
    assert recorded.grad_fn is not None
    ctx = {"no_grad": torch.no_grad(), "inference_mode": torch.inference_mode(),
           "nothing requires grad": torch.enable_grad()}[context]
    alone, mean_a, var_a = run(context != "nothing requires grad", ctx)
    assert not alone.requires_grad and alone.grad_fn is None
    for a, b in [(alone, recorded), (mean_a, mean_r), (var_a, var_r)]:
        assert torch.equal(a, b.detach())
    assert alone.stride() == recorded.stride()


def native_fused(x, mean, var, w, b, training, activation, residual):
    """F.batch_norm + residual + activation, as the fused call computes them."""
    y = F.batch_norm(x, mean, var, w, b, training=training)
    y = y if residual is None else y + residual
    return {"relu": torch.relu, "silu": F.silu, None: lambda t: t}[activation](y)


def ours_fused(x, mean, var, w, b, training, activation, residual):
    return batchnorm_ext.batch_norm(x, mean, var, w, b, training=training, residual=residual,
                                    activation=activation)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation,residual", [(None, False), ("relu", False), ("relu", True),
                                                 ("silu", True)], ids=str)
def test_eager_nodes_behave_as_natives(activation, residual, training):
    """The C++ nodes of the eager fast path (csrc/autograd.cpp BatchNormBackward,
    BatchNormActBackward) as native's generated ones: no reference cycle (relu's node saves
    its own output), a second backward without retain_graph refused, a saved output changed
    in place refused, saved-tensor hooks applied, and the same gradients."""
    x0 = torch.randn(4, 3, 5, 5, requires_grad=True)
    w, b = torch.rand(3).add_(0.5).requires_grad_(), torch.randn(3, requires_grad=True)
    r = torch.randn(4, 3, 5, 5, requires_grad=True) if residual else None
    stats = lambda: (torch.randn(3).mul_(0.1), torch.rand(3).add_(0.5))  # noqa: E731
    for fn in (ours_fused, native_fused):
        # freed with the last reference: the output's storage and the input saved for backward
        x = x0 * 1
        y = fn(x, *stats(), w, b, training, activation, r)
        output_ref, input_ref = y.untyped_storage()._weak_ref(), x.untyped_storage()._weak_ref()
        del x, y
        assert torch.UntypedStorage._expired(output_ref) and torch.UntypedStorage._expired(input_ref)
        # a second backward through freed buffers, and one after an in-place change
        y = fn(x0, *stats(), w, b, training, activation, r)
        y.sum().backward()
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            y.sum().backward()
        if activation == "relu":  # both save the output (relu's mask)
            y = fn(x0, *stats(), w, b, training, activation, r)
            y.add_(1)
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                y.sum().backward()
        # saved-tensor hooks see every tensor saved: each unpacked from its packed form
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or len(packed) - 1,
                                                      lambda i: packed[i]):
            y = fn(x0, *stats(), w, b, training, activation, r)
        assert any(t is x0 for t in packed), fn.__name__
    # and the gradients, one fresh graph each
    grads = []
    for fn in (ours_fused, native_fused):
        torch.manual_seed(0)
        inputs = [t for t in (x0, w, b, r) if t is not None]
        out = fn(x0, *stats(), w, b, training, activation, r)
        grads.append(torch.autograd.grad(out, inputs, torch.randn_like(out)))
    for o, n in zip(*grads):
        assert_close(o, n)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("context", ["no_grad", "nothing requires grad"])
def test_dual_level_with_nothing_to_record_records_nothing(context, fused):
    """A dual level open, but no gradient to record (no_grad, or nothing requiring grad) and
    no tangent on the input or parameters: as native, the output gets no grad_fn (the eager
    fast path then runs the forward alone, not its node)."""
    x = torch.randn(4, 3, 5, 5)
    requires = context != "nothing requires grad"
    w, b = torch.rand(3).add_(0.5).requires_grad_(requires), torch.randn(3).requires_grad_(requires)
    ctx = torch.no_grad() if context == "no_grad" else torch.enable_grad()
    outputs = []
    with fwAD.dual_level(), ctx:
        mean = fwAD.make_dual(torch.zeros(3), torch.ones(3))  # a tangent on a running statistic
        for fn in (ours_fused, native_fused):
            y = fn(x, mean, torch.ones(3), w, b, False, "relu" if fused else None, None)
            assert y.grad_fn is None and not y.requires_grad, fn.__name__
            outputs.append(fwAD.unpack_dual(y).primal)
    assert_close(*outputs)


def _compiled_autograd_gradients(fn, x0, w, b, r, training, activation, backend, hooks=False,
                                 inputs=None):
    """The gradients of a small loss through `fn` (eager forward), its backward under compiled
    autograd (`backend`, or eager when None); `inputs` for autograd.grad, else .backward()."""
    from torch._dynamo import compiled_autograd
    leaves = [t for t in (x0, w, b, r) if t is not None]
    for t in leaves:
        t.grad = None
    torch.manual_seed(0)
    mean, var = torch.randn(3).mul_(0.1), torch.rand(3).add_(0.5)
    saving = (torch.autograd.graph.saved_tensors_hooks(lambda t: t * 1, lambda t: t) if hooks
              else contextlib.nullcontext())
    with saving:
        y = fn(x0 * 2, mean, var, w, b, training, activation, r)  # x0 * 2: a node upstream
        loss = (y * torch.randn_like(y)).sum()
    compiling = (compiled_autograd._enable(torch.compile(backend=backend)) if backend
                 else contextlib.nullcontext())
    with compiling:
        if inputs is not None:
            return list(torch.autograd.grad(loss, inputs))
        loss.backward()
    return [t.grad for t in leaves]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation,residual", [(None, False), ("relu", False), ("relu", True),
                                                 ("silu", True)], ids=str)
def test_compiled_autograd_of_an_eager_forward(activation, residual, training):
    """torch.compile of the backward alone (compiled autograd) after an eager forward: the C++
    nodes of the eager fast path record their backward in its graph (compiled_args,
    apply_with_saved), and the gradients are those of the eager backward, as native's are.
    Also with saved-tensor hooks, and for autograd.grad of one input."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    x0 = torch.randn(4, 3, 5, 5, requires_grad=True)
    w, b = torch.rand(3).add_(0.5).requires_grad_(), torch.randn(3, requires_grad=True)
    r = torch.randn(4, 3, 5, 5, requires_grad=True) if residual else None
    case = (x0, w, b, r, training, activation)
    eager = _compiled_autograd_gradients(ours_fused, *case, backend=None)
    native = _compiled_autograd_gradients(native_fused, *case, backend=None)
    captures = counters["compiled_autograd"]["captures"]
    # backend="eager" runs the captured graph's very operators: the same bits
    for kwargs in ({}, {"hooks": True}, {"inputs": [x0]}, {"inputs": [w]}):
        compiled = _compiled_autograd_gradients(ours_fused, *case, backend="eager", **kwargs)
        expected = eager if "inputs" not in kwargs else [eager[0 if kwargs["inputs"][0] is x0 else 1]]
        assert len(compiled) == len(expected), kwargs
        for c, e in zip(compiled, expected):
            assert torch.equal(c, e), kwargs
    assert counters["compiled_autograd"]["captures"] > captures  # it did compile
    for o, n in zip(eager, native):
        assert_close(o, n)


def test_compiled_autograd_with_inductor():
    """As above with Inductor compiling the backward: our backward operator is in its code
    (an extern kernel), and the gradients are the eager ones to rounding (Inductor may fuse
    the ops around it differently)."""
    from torch._inductor.utils import run_and_get_code
    torch._dynamo.reset()
    x0 = torch.randn(4, 3, 5, 5, requires_grad=True)
    w, b = torch.rand(3).add_(0.5).requires_grad_(), torch.randn(3, requires_grad=True)
    for activation in (None, "relu"):
        eager = _compiled_autograd_gradients(ours_fused, x0, w, b, None, True, activation, None)
        compiled, code = run_and_get_code(_compiled_autograd_gradients, ours_fused, x0, w, b, None,
                                          True, activation, "inductor")
        op = "batch_norm_backward" if activation is None else "batch_norm_act_backward"
        assert any(f"torch.ops.batchnorm_ext.{op}.default" in c for c in code), activation
        for c, e in zip(compiled, eager):
            assert_close(c, e)


def test_compiled_autograd_caches_by_what_the_backward_depends_on():
    """Compiled autograd keys its graphs on what the nodes' compiled_args collect: the same
    backward again with new data is served by the graph already captured (and computes
    with the new data: no tensor frozen into it), and each value the backward depends on
    (eps, training, the activation, the gradients wanted) changed gives a new capture.  The
    eager backward's gradients every time."""
    from torch._dynamo import compiled_autograd
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    compiler = torch.compile(backend="eager")

    def gradients(training, activation, eps, wanted, seed, compiled):
        torch.manual_seed(seed)
        x = torch.randn(4, 3, 5, 5, requires_grad=True)
        w, b = torch.rand(3).add_(0.5).requires_grad_(), torch.randn(3, requires_grad=True)
        y = batchnorm_ext.batch_norm(x * 2, torch.randn(3), torch.rand(3).add_(0.5), w, b,
                                     training=training, activation=activation, eps=eps)
        loss = (y * torch.randn_like(y)).sum()
        with compiled_autograd._enable(compiler) if compiled else contextlib.nullcontext():
            return torch.autograd.grad(loss, [(x, w, b)[i] for i in wanted])

    calls = [((True, None, 1e-5, (0, 1, 2)), True), ((True, None, 1e-5, (0, 1, 2)), False),
             ((True, None, 1e-3, (0, 1, 2)), True), ((False, None, 1e-3, (0, 1, 2)), True),
             ((False, None, 1e-3, (0, 1)), True), ((False, "relu", 1e-3, (0, 1)), True),
             ((False, "relu", 1e-3, (0, 1)), False), ((False, "silu", 1e-3, (0, 1)), True),
             ((True, "silu", 1e-3, (0, 1)), True), ((True, "silu", 1e-3, (0, 1)), False)]
    for seed, (case, captures_anew) in enumerate(calls):  # new data at every call
        before = counters["compiled_autograd"]["captures"]
        compiled = gradients(*case, seed, compiled=True)
        assert counters["compiled_autograd"]["captures"] - before == int(captures_anew), case
        eager = gradients(*case, seed, compiled=False)
        assert len(compiled) == len(eager) == len(case[3])
        for c, e in zip(compiled, eager):
            assert torch.equal(c, e), case


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compiled_autograd_double_backward(training):
    """create_graph=True under compiled autograd, then a backward of the gradient: the
    gradient's own graph (batch_norm_backward's differentiable form) is built inside the
    compiled graph; the second-order gradients are the eager ones to the bit, and native's
    to rounding."""
    from torch._dynamo import compiled_autograd
    torch._dynamo.reset()
    mean, var = torch.randn(3), torch.rand(3).add_(0.5)

    def second_order(fn, compiled):
        torch.manual_seed(0)
        x = torch.randn(4, 3, 5, 5, requires_grad=True)
        w, b = torch.rand(3).add_(0.5).requires_grad_(), torch.randn(3, requires_grad=True)
        y = fn(x, mean.clone(), var.clone(), w, b, training, None, None)
        loss = (y * torch.randn_like(y)).sum()
        with compiled_autograd._enable(torch.compile(backend="eager")) if compiled \
                else contextlib.nullcontext():
            grad_x, = torch.autograd.grad(loss, [x], create_graph=True)
        # in eval grad_x = weight * invstd * dy does not depend on x: its gradient is zeros
        return torch.autograd.grad(grad_x.pow(2).sum(), [x, w], materialize_grads=True)

    eager = second_order(ours_fused, compiled=False)
    compiled = second_order(ours_fused, compiled=True)
    native = second_order(native_fused, compiled=False)
    for c, e, n in zip(compiled, eager, native):
        assert torch.equal(c, e)
        assert_close(c, n)


@pytest.mark.parametrize("fused", [False, True], ids=["converted", "fused"])
def test_compiled_autograd_of_a_torchvision_model(fused):
    """A real model: torchvision resnet18 converted (and fused: BN -> ReLU, BN -> add ->
    ReLU), an eager training forward, its backward under compiled autograd.  Every
    parameter's gradient is the eager backward's to the bit, and as close to native's (the
    same model, native batch norms, the same compiled backward) as the eager ones are."""
    from torch._dynamo import compiled_autograd
    from test_zoo import build, train_mode
    native, shape = build("resnet18")
    ours = batchnorm_ext.convert_model(copy.deepcopy(native))
    if fused:
        ours = batchnorm_ext.fuse(ours)
    torch.manual_seed(1)
    x = torch.randn((4,) + tuple(shape[1:]))

    def gradients(model, compiled):
        model = train_mode(copy.deepcopy(model))
        loss = model(x).square().mean()
        torch._dynamo.reset()
        with compiled_autograd._enable(torch.compile(backend="eager")) if compiled \
                else contextlib.nullcontext():
            loss.backward()
        return [p.grad for p in model.parameters()]

    eager, compiled = gradients(ours, False), gradients(ours, True)
    native_eager, native_compiled = gradients(native, False), gradients(native, True)
    assert len(compiled) == len(eager) == len(native_compiled) == 62
    for c, e in zip(compiled, eager):
        assert torch.equal(c, e)
    # native under the same compiled backward keeps its own eager bits too: so ours stays
    # exactly as close to native as in eager (test_zoo measures that against float64)
    for c, e in zip(native_compiled, native_eager):
        assert torch.equal(c, e)

"""The operators' registrations: torch.library.opcheck, torch.compile (fullgraph, also with
momentum=None) and torch.export."""
import copy

import pytest
import torch
from torch.library import opcheck

import batchnorm_ext
from helpers import assert_close, make_input

ops = batchnorm_ext.ops


def forward_samples():
    for shape, layout in [((4, 3, 5, 5), "contiguous"), ((4, 3, 5, 5), "channels_last"),
                          ((6, 5), "contiguous"), ((2, 3, 2, 3, 4), "channels_last")]:
        for dtype, param_dtype in [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                   (torch.bfloat16, torch.float32), (torch.float16, torch.float16)]:
            c = shape[1]
            x = make_input(shape, dtype, layout).requires_grad_(dtype != torch.float16)
            w = torch.rand(c, dtype=param_dtype).requires_grad_()
            b = torch.randn(c, dtype=param_dtype).requires_grad_()
            rm, rv = torch.zeros(c, dtype=param_dtype), torch.ones(c, dtype=param_dtype)
            yield (x, w, b, rm, rv, True, 1e-5)
            yield (x, w, b, rm, rv, False, 1e-5)
            yield (x, None, None, None, None, True, 1e-3)


@pytest.mark.parametrize("args", list(forward_samples()), ids=lambda a: f"{tuple(a[0].shape)}-{a[0].dtype}")
def test_opcheck_forward(args):
    opcheck(ops.batch_norm_forward.default, args)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("mask", [[True, True, True], [True, False, False], [False, True, True]])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck_backward(layout, mask, training):
    x = make_input((4, 3, 5, 5), torch.float32, layout)
    w, rm, rv = torch.rand(3), torch.randn(3), torch.rand(3) + 0.5
    out, mean, var = ops.batch_norm_forward(x, w, None, rm, rv, training, 1e-5)
    grad = torch.randn_like(out)
    opcheck(ops.batch_norm_backward.default, (grad, x, w, rm, rv, mean, var, training, 1e-5, mask))
    # differentiable itself (double backward)
    opcheck(ops.batch_norm_backward.default,
            (grad.requires_grad_(), x.requires_grad_(), w.requires_grad_(), rm, rv, mean, var,
             training, 1e-5, mask))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_opcheck_update_and_composite(momentum):
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    _, mean, var = ops.batch_norm_forward(x, None, None, None, None, True, 1e-5)
    nbt = torch.tensor(3)
    opcheck(ops.update_running_stats_.default,
            (torch.zeros(3), torch.ones(3), mean, var, 100, momentum, nbt))
    opcheck(ops.batch_norm.default, (x, torch.rand(3, requires_grad=True), None, torch.zeros(3),
                                     torch.ones(3), True, momentum, 1e-5, nbt))
    opcheck(ops.batch_norm.default, (x, None, None, torch.zeros(3), torch.ones(3), False, momentum,
                                     1e-5, None))


def cnn(momentum):
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), batchnorm_ext.BatchNorm2d(8, momentum=momentum),
        torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1, groups=2),
        batchnorm_ext.BatchNorm2d(8, momentum=momentum), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(32, 8),
        batchnorm_ext.BatchNorm1d(8, momentum=momentum))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_compile_fullgraph_matches_eager(momentum, channels_last):
    """torch.compile(fullgraph=True) of a CNN: no graph break (with momentum=None too, where
    native's module breaks on 1 / num_batches_tracked) and the same results as eager."""
    torch._dynamo.reset()
    eager = cnn(momentum)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, dynamic=False)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for step in range(3):
        x = torch.randn(6, 3, 8, 8).contiguous(memory_format=fmt)
        expected, result = eager(x), compiled(x)
        assert_close(result, expected, rtol=1e-4, atol=1e-4)
        expected.square().sum().backward()
        result.square().sum().backward()
    for (name, p), (_, q) in zip(eager.named_parameters(), compiled_model.named_parameters()):
        assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-3, msg=lambda m: f"{name}: {m}")
    for (name, a), (_, b) in zip(eager.named_buffers(), compiled_model.named_buffers()):
        assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    eager.eval()
    compiled_model.eval()
    x = torch.randn(6, 3, 8, 8)
    assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-4)


def test_compiled_backward_runs_our_backward_kernel():
    """AOTAutograd traces our backward operator (not the differentiable fallback)."""
    from torch._functorch.aot_autograd import aot_module_simplified
    from functorch.compile import make_boxed_func
    graphs = []

    def backend(gm, inputs):
        def keep(g, _):
            graphs.append(g)
            return make_boxed_func(g.forward)
        return aot_module_simplified(gm, inputs, fw_compiler=keep, bw_compiler=keep)

    torch._dynamo.reset()
    model = torch.compile(cnn(0.1), backend=backend, fullgraph=True)
    model(torch.randn(4, 3, 6, 6)).sum().backward()
    targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert targets.count("batchnorm_ext.batch_norm_forward.default") == 3
    assert targets.count("batchnorm_ext.batch_norm_backward.default") == 3


@pytest.mark.parametrize("training", [False, True])
def test_export(training):
    model = cnn(0.1).train(training)
    x = torch.randn(4, 3, 6, 6)
    reference = copy.deepcopy(model)
    program = torch.export.export(model, (x,)).run_decompositions()
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert "batchnorm_ext.batch_norm_forward.default" in targets
    assert_close(program.module()(x), reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_sync_steps(layout, dtype):
    """The four steps of SyncBatchNorm (batchnorm_ext/sync.py)."""
    x = make_input((4, 3, 5, 5), dtype, layout)
    w = torch.rand(3, dtype=torch.float32 if dtype == torch.bfloat16 else dtype)
    mean, var = ops.batch_norm_stats(x)
    grad = make_input((4, 3, 5, 5), dtype, layout)
    sums = ops.batch_norm_backward_reduce(grad, x, mean, var, 1e-5)
    opcheck(ops.batch_norm_stats.default, (x,))
    opcheck(ops.batch_norm_apply.default, (x, w, None, mean, var, 1e-5))
    opcheck(ops.batch_norm_backward_reduce.default, (grad, x, mean, var, 1e-5))
    opcheck(ops.batch_norm_backward_apply.default, (grad, x, w, mean, var, sums, 100, 1e-5))


def test_sync_steps_make_up_the_training_forward_and_backward():
    """stats -> apply is the training forward; reduce -> apply (with this batch's own
    sums and count) its backward: the phases give the same bits as the whole."""
    x = make_input((6, 4, 7, 7), torch.float32, "contiguous", scale=2, offset=1)
    w, b = torch.rand(4), torch.randn(4)
    grad = torch.randn_like(x)
    out, save_mean, save_var = ops.batch_norm_forward(x, w, b, None, None, True, 1e-5)
    mean, var = ops.batch_norm_stats(x)
    assert torch.equal(mean, save_mean) and torch.equal(var, save_var)
    assert torch.equal(ops.batch_norm_apply(x, w, b, mean, var, 1e-5), out)
    grad_input, grad_weight, grad_bias = ops.batch_norm_backward(
        grad, x, w, None, None, mean, var, True, 1e-5, [True, True, True])
    sums = ops.batch_norm_backward_reduce(grad, x, mean, var, 1e-5)
    assert_close(sums[0].float(), grad_bias)
    assert_close((sums[1] * (var + 1e-5).rsqrt()).float(), grad_weight)
    assert_close(ops.batch_norm_backward_apply(grad, x, w, mean, var, sums, 6 * 49, 1e-5), grad_input)

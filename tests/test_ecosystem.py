"""Converted models where torch.nn's batch norms go: FX, conv-BN fusion, ONNX (both
exporters, onnxruntime), TorchScript, other devices (the meta device, and the fallback
kernels that serve CUDA and the rest), subclasses, registered conversions and
SyncBatchNorm conversions.  Everything is compared with the same native model.
(tests/test_inductor.py: Inductor; tests/test_zoo.py: torchvision's and timm's models.)"""
import copy
import io
import pickle
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import batchnorm_ext
from batchnorm_ext import modules as bn_modules
from helpers import assert_close

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread: on two shared CPUs, two threads that wait for each other take many
    times longer on these small models (the results do not depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


OPS = ["batch_norm_forward", "batch_norm_backward", "update_running_stats_", "batch_norm_stats",
       "batch_norm_apply", "batch_norm_backward_reduce", "batch_norm_backward_apply",
       "batch_norm_act_forward", "batch_norm_act_backward"]


class Net(torch.nn.Module):
    """Conv-BN-ReLU, conv-BN with momentum=None, linear-BN (without affine by default:
    torch cannot fold that one into the linear layer)."""

    def __init__(self, head_affine=False):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.relu = torch.nn.ReLU()
        self.conv2 = torch.nn.Conv2d(8, 8, 3)
        self.bn2 = torch.nn.BatchNorm2d(8, momentum=None)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(8, 4)
        self.bn3 = torch.nn.BatchNorm1d(4, affine=head_affine)

    def forward(self, x):
        x = self.relu(self.bn(self.conv(x)))
        x = self.bn2(self.conv2(x))
        return self.bn3(self.fc(self.pool(x).flatten(1)))


def pair(training=False, head_affine=False):
    """(native, ours): the same Net, with weights and running statistics that are not the
    defaults (so that a swap or a lost buffer shows), in the given mode."""
    torch.manual_seed(0)
    native = Net(head_affine)
    with torch.no_grad():
        for m in native.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
        for _ in range(2):
            native(torch.randn(4, 3, 8, 8) * 2 + 1)
    native.train(training)
    return native, batchnorm_ext.convert_model(copy.deepcopy(native))


def inputs(n=2):
    return [torch.randn(4, 3, 8, 8) * 1.5 + 0.5 for _ in range(n)]


def assert_same_state(ours, native, **tol):
    for (name, a), (_, b) in zip(ours.state_dict().items(), native.state_dict().items()):
        assert_close(a, b, msg=lambda m: f"{name}: {m}", **tol)


def steps_match(run_ours, run_native, ours, native, xs):
    """Training steps (forward, backward, SGD) through run_ours/run_native, compared."""
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_n = torch.optim.SGD(native.parameters(), lr=0.1)
    for x in xs:
        yo, yn = run_ours(x), run_native(x)
        assert_close(yo, yn, rtol=1e-4, atol=1e-5)
        for opt, y in [(opt_o, yo), (opt_n, yn)]:
            opt.zero_grad()
            y.square().mean().backward()
            opt.step()
    assert_same_state(ours, native, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------
# FX

def test_fx_trace_records_our_modules_as_native_ones():
    """Our batch norms are call_module nodes, as torch.nn's (FX keeps only modules defined
    under torch.nn as leaves; ours make themselves one), so the traced graph is native's
    and each module runs in its own mode when the graph runs."""
    native, ours = pair(training=True)
    traced_native, traced_ours = torch.fx.symbolic_trace(native), torch.fx.symbolic_trace(ours)
    assert [(n.op, n.target) for n in traced_ours.graph.nodes] == \
        [(n.op, n.target) for n in traced_native.graph.nodes]
    assert type(traced_ours.bn) is batchnorm_ext.BatchNorm2d
    steps_match(traced_ours, traced_native, traced_ours, traced_native, inputs())
    traced_ours.eval()  # traced in training; the modules follow the mode set afterwards
    traced_native.eval()
    x = inputs(1)[0]
    assert_close(traced_ours(x), traced_native(x))


def test_fx_trace_of_a_batch_norm_itself_fails_as_native():
    # The root is traced into, not called: torch's input check is control flow on a Proxy.
    for module in [torch.nn.BatchNorm2d(3), batchnorm_ext.BatchNorm2d(3)]:
        with pytest.raises(torch.fx.proxy.TraceError):
            torch.fx.symbolic_trace(module)


def test_fx_trace_sync_batch_norm_is_a_leaf_as_native():
    native = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.SyncBatchNorm(4)).eval()
    ours = batchnorm_ext.convert_model(copy.deepcopy(native), sync=True)
    assert type(ours[1]) is batchnorm_ext.SyncBatchNorm
    graph = torch.fx.symbolic_trace(ours)
    assert [n.op for n in graph.graph.nodes] == ["placeholder", "call_module", "call_module", "output"]
    x = inputs(1)[0]
    assert_close(graph(x), native(x))


# ---------------------------------------------------------------------------------------
# Conv-BN fusion

def test_revert_model_gives_torch_modules_with_the_same_tensors():
    _, ours = pair()
    handle_calls = []
    ours.bn.register_forward_hook(lambda *args: handle_calls.append(1))
    tensors = {name: t for name, t in list(ours.named_parameters()) + list(ours.named_buffers())}
    reverted = batchnorm_ext.revert_model(ours)
    assert reverted is ours
    assert [type(m) for m in ours.modules()] == [type(m) for m in Net().modules()]
    for name, t in list(ours.named_parameters()) + list(ours.named_buffers()):
        assert t is tensors[name]
    ours(inputs(1)[0])
    assert handle_calls == [1]  # hooks move with the module
    assert type(batchnorm_ext.revert_model(batchnorm_ext.BatchNorm1d(3))) is torch.nn.BatchNorm1d


def test_fx_optimization_fuse_after_revert_model():
    """torch.fx.experimental.optimization.fuse matches torch.nn's exact classes: it fuses
    a converted model once reverted (with the same tensors) and leaves ours alone."""
    from torch.fx.experimental.optimization import fuse
    native, ours = pair(head_affine=True)
    fused = fuse(batchnorm_ext.revert_model(copy.deepcopy(ours)))
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    x = inputs(1)[0]
    assert_close(fused(x), native(x), rtol=1e-5, atol=1e-5)


def test_fuse_modules_with_our_fuser_method_mapping():
    native, ours = pair(head_affine=True)
    groups = [["conv", "bn", "relu"], ["conv2", "bn2"], ["fc", "bn3"]]
    config = {"additional_fuser_method_mapping": batchnorm_ext.fuser_method_mapping()}
    fused_ours = torch.ao.quantization.fuse_modules(ours, groups, fuse_custom_config_dict=config)
    fused_native = torch.ao.quantization.fuse_modules(native, groups)
    assert [type(m) for m in fused_ours.modules()] == [type(m) for m in fused_native.modules()]
    assert type(fused_ours.conv) is torch.ao.nn.intrinsic.ConvReLU2d
    x = inputs(1)[0]
    assert_close(fused_ours(x), fused_native(x), rtol=1e-5, atol=1e-5)


def test_fuse_modules_qat_holds_torch_batch_norm():
    """For quantization-aware training the fused module keeps a batch norm: torch's, on
    the same tensors."""
    native, ours = pair(training=True)
    running_mean = ours.bn.running_mean
    config = {"additional_fuser_method_mapping": batchnorm_ext.fuser_method_mapping()}
    fused = torch.ao.quantization.fuse_modules_qat(ours, [["conv", "bn", "relu"]], inplace=True,
                                                   fuse_custom_config_dict=config)
    assert type(fused.conv) is torch.ao.nn.intrinsic.ConvBnReLU2d
    assert type(fused.conv[1]) is torch.nn.BatchNorm2d
    assert fused.conv[1].running_mean is running_mean
    native = torch.ao.quantization.fuse_modules_qat(native, [["conv", "bn", "relu"]])
    steps_match(fused, native, fused, native, inputs())


def test_fuse_conv_bn_eval_takes_our_batch_norm():
    native, ours = pair()
    fused_ours = torch.nn.utils.fusion.fuse_conv_bn_eval(ours.conv, ours.bn)
    fused_native = torch.nn.utils.fusion.fuse_conv_bn_eval(native.conv, native.bn)
    assert torch.equal(fused_ours.weight, fused_native.weight)
    assert torch.equal(fused_ours.bias, fused_native.bias)


# ---------------------------------------------------------------------------------------
# ONNX

ort = pytest.importorskip("onnxruntime")  # a test dependency (requirements.txt)


def onnx_run(proto, x):
    session = ort.InferenceSession(proto)
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def export_onnx(model, x, dynamo, training=False):
    """torch.onnx.export, plainly: (model bytes, op types in the graph)."""
    if dynamo:
        # optimize=False: the BatchNormalization nodes stay (the optimizer folds them into
        # convolutions, for ours as for native's).
        program = torch.onnx.export(model, (x,), dynamo=True, optimize=False, verbose=False)
        proto = program.model_proto
    else:
        import onnx
        buffer = io.BytesIO()
        mode = torch.onnx.TrainingMode.TRAINING if training else torch.onnx.TrainingMode.EVAL
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated
            torch.onnx.export(model, (x,), buffer, dynamo=False, training=mode)
        proto = onnx.load_from_string(buffer.getvalue())
    return proto.SerializeToString(), sorted(n.op_type for n in proto.graph.node)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_onnx_export_is_natives(dynamo, training):
    """The ONNX graph of a converted model has the native one's BatchNormalization nodes,
    and onnxruntime gives native's results.  In training mode, as torch's own: dynamo=True
    exports inference with the running statistics (onnxscript's torchlib), the TorchScript
    exporter a training-mode BatchNormalization."""
    native, ours = pair(training)
    if dynamo and training:  # torch's export fails on momentum=None in training (below)
        native.bn2.momentum = ours.bn2.momentum = 0.1
    x = inputs(1)[0]
    native_proto, native_ops = export_onnx(native, x, dynamo, training)
    ours_proto, ours_ops = export_onnx(ours, x, dynamo, training)
    # The TorchScript exporter folds eval batch norms into the convolutions before them.
    assert ours_ops.count("BatchNormalization") == native_ops.count("BatchNormalization") == \
        (1 if not dynamo and not training else 3)
    if not dynamo:
        assert ours_ops == native_ops
    result = onnx_run(ours_proto, x)
    assert_close(result, onnx_run(native_proto, x))
    if not training or dynamo:  # with the running statistics
        assert_close(result, copy.deepcopy(native).eval()(x), rtol=1e-5, atol=1e-5)
    else:  # the training forward, with batch statistics
        assert_close(result, copy.deepcopy(native).train()(x), rtol=1e-5, atol=1e-5)
    assert_same_state(ours, native)


def test_onnx_export_training_with_cumulative_average():
    """momentum=None in training: torch's module computes 1 / num_batches_tracked on the
    host, which torch.export cannot capture; ours computes it in the operator, and exports
    as torch's exporter exports the other training-mode batch norms."""
    native, ours = pair(training=True)
    x = inputs(1)[0]
    with pytest.raises(torch.onnx.OnnxExporterError):
        export_onnx(native, x, dynamo=True)
    proto, ops = export_onnx(ours, x, dynamo=True)
    assert ops.count("BatchNormalization") == 3
    assert_close(onnx_run(proto, x), copy.deepcopy(native).eval()(x), rtol=1e-5, atol=1e-5)


def test_onnx_export_of_functional_batch_norm():
    class Functional(torch.nn.Module):
        def __init__(self, batch_norm):
            super().__init__()
            self.batch_norm = batch_norm
            self.register_buffer("mean", torch.randn(3))
            self.register_buffer("var", torch.rand(3) + 0.5)
            self.weight = torch.nn.Parameter(torch.rand(3))

        def forward(self, x):
            return self.batch_norm(x, self.mean, self.var, self.weight, None, False, 0.1, 1e-3)

    x = torch.randn(2, 3, 4, 4)
    model = Functional(torch.nn.functional.batch_norm)
    native_proto, native_ops = export_onnx(model, x, True)
    expected = model(x)
    model.batch_norm = batchnorm_ext.batch_norm
    ours_proto, ours_ops = export_onnx(model, x, True)
    assert ours_ops.count("BatchNormalization") == native_ops.count("BatchNormalization") == 1
    assert_close(onnx_run(ours_proto, x), expected, rtol=1e-5, atol=1e-5)


def test_onnx_export_of_an_exported_program_with_our_translations():
    """An ExportedProgram holds our operators; their translation comes in the table."""
    native, ours = pair()
    x = inputs(1)[0]
    program = torch.export.export(ours, (x,))
    onnx_program = torch.onnx.export(program, dynamo=True, optimize=False, verbose=False,
                                     custom_translation_table=batchnorm_ext.onnx_translation_table())
    ops = [n.op_type for n in onnx_program.model_proto.graph.node]
    assert ops.count("BatchNormalization") == 3
    assert_close(onnx_run(onnx_program.model_proto.SerializeToString(), x), native(x),
                 rtol=1e-5, atol=1e-5)


def test_onnx_export_of_a_scripted_model():
    native, ours = pair()
    x = inputs(1)[0]
    proto, ops = export_onnx(torch.jit.script(ours), x, dynamo=False)
    assert ops == export_onnx(torch.jit.script(native), x, dynamo=False)[1]
    assert "BatchNormalization" in ops  # the head's (the others are folded into convolutions)
    assert_close(onnx_run(proto, x), native(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# TorchScript, torch.jit.trace

KWARGS = [{}, dict(momentum=None), dict(affine=False), dict(track_running_stats=False),
          dict(momentum=None, track_running_stats=False, affine=False), dict(bias=False)]


@pytest.mark.parametrize("kwargs", KWARGS, ids=str)
def test_jit_script_matches_native(kwargs):
    torch.manual_seed(0)
    native = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.BatchNorm2d(5, **kwargs))
    ours = batchnorm_ext.convert_model(copy.deepcopy(native))
    scripted_native, scripted = torch.jit.script(native), torch.jit.script(ours)
    assert "batchnorm_ext::batch_norm" in str(scripted.inlined_graph)
    steps_match(scripted, scripted_native, ours, native, inputs(3))
    for model in (scripted, scripted_native):
        model.eval()
    x = inputs(1)[0]
    assert_close(scripted(x), scripted_native(x))
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    assert_close(torch.jit.load(buffer)(x), scripted_native(x))


def test_jit_script_checks_input_dimension_as_native():
    scripted_native = torch.jit.script(torch.nn.BatchNorm2d(3))
    scripted = torch.jit.script(batchnorm_ext.BatchNorm2d(3))
    x = torch.randn(2, 3, 4)
    with pytest.raises(torch.jit.Error) as native_error:
        scripted_native(x)
    with pytest.raises(torch.jit.Error) as our_error:
        scripted(x)
    assert "expected 4D input (got 3D input)" in str(native_error.value)
    assert "expected 4D input (got 3D input)" in str(our_error.value)


def test_jit_trace_save_load():
    native, ours = pair(training=True)
    x = inputs(1)[0]
    traced = torch.jit.trace(ours, (x,), check_trace=False)  # training: each run updates buffers
    native(x)  # as the trace's run did to ours
    assert "batchnorm_ext::batch_norm" in str(traced.inlined_graph)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    assert_close(loaded(x), native(x), rtol=1e-5, atol=1e-5)
    assert_same_state(loaded, native)


# ---------------------------------------------------------------------------------------
# Other devices

def test_meta_device_model():
    """Built on the meta device (as for large models), converted, run there (the fake
    kernels), then materialized and loaded."""
    with torch.device("meta"):
        ours = batchnorm_ext.convert_model(Net())
    for training in (True, False):
        out = ours.train(training)(torch.empty(4, 3, 8, 8, device="meta"))
        assert out.is_meta and out.shape == (4, 4)
    native, _ = pair()
    ours.to_empty(device="cpu")
    ours.load_state_dict(native.state_dict())
    x = inputs(1)[0]
    assert_close(ours(x), native(x))


@pytest.mark.parametrize("name", OPS)
def test_fallback_serves_every_other_device(name):
    """Each operator has a CompositeExplicitAutograd kernel (csrc/fallback.cpp), which the
    dispatcher uses for CUDA and every other backend, and the CPU keeps its own."""
    qualname = f"batchnorm_ext::{name}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CompositeExplicitAutograd")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU")
    for device in ["CUDA", "XPU", "MPS", "PrivateUse1"]:
        assert torch._C._dispatch_has_computed_kernel_for_dispatch_key(qualname, device), device


def fallback(op):
    """The operator's fallback kernel, called directly (on CPU tensors here)."""
    return lambda *args: op.default._op_dk(torch._C.DispatchKey.CompositeExplicitAutograd, *args)


class OnFallbackKernels(TorchDispatchMode):
    """Runs our operators' fallback kernels in place of the CPU ones: the path a CUDA
    tensor takes, on the CPU."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "batchnorm_ext":
            return func._op_dk(torch._C.DispatchKey.CompositeExplicitAutograd, *args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fused", [False, True], ids=["", "fused"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_model_trains_on_the_fallback_kernels_as_native(channels_last, fused):
    native, ours = pair(training=True)
    if fused:  # the batch norm and the ReLU after it in one operator (batch_norm_act)
        ours = batchnorm_ext.fuse(ours)
        assert isinstance(ours.bn, batchnorm_ext.BatchNormAct2d)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xs = [x.contiguous(memory_format=fmt) for x in inputs(3)]

    def run_ours(x):
        with OnFallbackKernels():
            return ours(x)
    steps_match(run_ours, native, ours, native, xs)
    ours.eval()
    native.eval()
    with OnFallbackKernels():
        assert_close(ours(xs[0]), native(xs[0]))


def assert_like(result, expected, **tol):
    """Same values (to `tol`), dtype, shape and strides (the memory format)."""
    assert_close(result, expected, **tol)
    assert result.dtype == expected.dtype and result.shape == expected.shape
    assert result.stride() == expected.stride()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fallback_kernels_match_cpu_kernels(layout):
    ops = batchnorm_ext.ops
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = (torch.randn(6, 4, 5, 5) * 2 + 1).contiguous(memory_format=fmt)
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    for training in (True, False):
        expected = ops.batch_norm_forward(x, w, b, rm, rv, training, 1e-5)
        result = fallback(ops.batch_norm_forward)(x, w, b, rm, rv, training, 1e-5)
        for e, r in zip(expected, result):
            assert_like(r, e, rtol=1e-5, atol=1e-5)
    _, mean, var = ops.batch_norm_forward(x, w, b, None, None, True, 1e-5)
    grad = torch.randn_like(x)
    for training in (True, False):
        args = (grad, x, w, rm, rv, mean, var, training, 1e-5, [True, True, True])
        for e, r in zip(ops.batch_norm_backward(*args), fallback(ops.batch_norm_backward)(*args)):
            assert_like(r, e, rtol=1e-4, atol=1e-5)
    for momentum, counter in [(0.1, None), (None, torch.tensor(3))]:
        expected, result = (rm.clone(), rv.clone()), (rm.clone(), rv.clone())
        ops.update_running_stats_(*expected, mean, var, 150, momentum, counter)
        fallback(ops.update_running_stats_)(*result, mean, var, 150, momentum, counter)
        for e, r in zip(expected, result):
            assert_close(r, e)
    # The fallback's statistics are a float64 reduction; the CPU kernel's, float64 merges
    # of blocks of float32 input: they agree to float32 rounding.
    stats = fallback(ops.batch_norm_stats)(x)
    assert_close(stats[0], mean, rtol=1e-6, atol=1e-7)
    assert_close(stats[1], var, rtol=1e-6, atol=1e-7)
    assert_like(fallback(ops.batch_norm_apply)(x, w, b, mean, var, 1e-5),
                ops.batch_norm_apply(x, w, b, mean, var, 1e-5))
    sums = ops.batch_norm_backward_reduce(grad, x, mean, var, 1e-5)
    assert_close(fallback(ops.batch_norm_backward_reduce)(grad, x, mean, var, 1e-5), sums,
                 rtol=1e-5, atol=1e-6)  # float32 rounding again, in sums of 150 values
    assert_like(fallback(ops.batch_norm_backward_apply)(grad, x, w, mean, var, sums, 150, 1e-5),
                ops.batch_norm_backward_apply(grad, x, w, mean, var, sums, 150, 1e-5),
                rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation", ["identity", "relu", "silu"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_fallback_fused_kernels_match_cpu_kernels(activation, with_residual):
    """batch_norm_act: activation(batch_norm(input) + residual), forward and backward."""
    ops = batchnorm_ext.ops
    x = torch.randn(6, 4, 5, 5) * 2 + 1
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    residual = torch.randn_like(x) if with_residual else None
    grad = torch.randn_like(x)
    for training in (True, False):
        args = (x, w, b, rm, rv, training, 1e-5, residual, activation)
        expected = ops.batch_norm_act_forward(*args)
        result = fallback(ops.batch_norm_act_forward)(*args)
        for e, r in zip(expected, result):
            assert_like(r, e, rtol=1e-5, atol=1e-5)
        output, mean, var = expected
        args = (grad, output, x, w, b, rm, rv, mean, var, training, 1e-5, residual, with_residual,
                activation, [True, True, True, with_residual])
        for e, r in zip(ops.batch_norm_act_backward(*args), fallback(ops.batch_norm_act_backward)(*args)):
            assert (r is None) == (e is None)
            if e is not None:
                assert_like(r, e, rtol=1e-4, atol=1e-5)


def test_fallback_checks_arguments_as_cpu():
    x = torch.randn(4, 3, 2, 2)
    for run in (batchnorm_ext.ops.batch_norm_forward, fallback(batchnorm_ext.ops.batch_norm_forward)):
        with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
            run(x, None, None, None, None, False, 1e-5)
        with pytest.raises(RuntimeError, match="weight should contain 3 elements not 4"):
            run(x, torch.ones(4), None, None, None, True, 1e-5)


# ---------------------------------------------------------------------------------------
# Subclasses, registered conversions, SyncBatchNorm

class LoggingBatchNorm2d(torch.nn.BatchNorm2d):
    """A subclass with torch's forward, and a method and attribute of its own."""

    def __init__(self, *args, tag="x", **kwargs):
        super().__init__(*args, **kwargs)
        self.tag = tag

    def describe(self):
        return f"{self.tag}:{self.num_features}"


class AnyRankBatchNorm(torch.nn.BatchNorm2d):
    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError("at least 2-D")


class OwnForwardBatchNorm(torch.nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


def test_subclass_keeping_torch_forward_is_converted():
    torch.manual_seed(0)
    native = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), LoggingBatchNorm2d(4, tag="a"),
                                 AnyRankBatchNorm(4))
    ours = batchnorm_ext.convert_model(copy.deepcopy(native))
    bn = ours[1]
    assert isinstance(bn, LoggingBatchNorm2d) and isinstance(bn, batchnorm_ext.BatchNorm2d)
    assert type(bn).__name__ == "LoggingBatchNorm2d" and bn.describe() == "a:4"
    assert repr(ours) == repr(native)
    steps_match(ours, native, ours, native, inputs())
    flat = torch.randn(5, 4) + 1  # passes its own input check, not BatchNorm2d's
    assert_close(ours[2](flat), native[2](flat))
    reverted = batchnorm_ext.revert_model(copy.deepcopy(ours))
    assert type(reverted[1]) is LoggingBatchNorm2d and type(reverted[2]) is AnyRankBatchNorm


def test_converted_subclass_pickles_and_deepcopies():
    ours = batchnorm_ext.convert_model(torch.nn.Sequential(LoggingBatchNorm2d(3, tag="p")))
    ours(torch.randn(4, 3, 2, 2))
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    # A fresh process has not made the class yet: loading makes it.
    generated = bn_modules._CONVERSIONS.pop(LoggingBatchNorm2d)
    bn_modules._REVERSIONS.pop(generated)
    buffer.seek(0)
    for clone in [torch.load(buffer, weights_only=False), copy.deepcopy(ours),
                  pickle.loads(pickle.dumps(ours))]:
        assert isinstance(clone[0], LoggingBatchNorm2d) and isinstance(clone[0], batchnorm_ext.BatchNorm2d)
        assert clone[0].describe() == "p:3"
        assert torch.equal(clone[0].running_mean, ours[0].running_mean)


def test_subclass_with_its_own_forward_is_left_with_a_warning():
    model = torch.nn.Sequential(OwnForwardBatchNorm(3), torch.nn.BatchNorm2d(3))
    with pytest.warns(UserWarning, match="OwnForwardBatchNorm"):
        batchnorm_ext.convert_model(model)
    assert type(model[0]) is OwnForwardBatchNorm and type(model[1]) is batchnorm_ext.BatchNorm2d


def test_register_conversion():
    class Scaled(torch.nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    class OursScaled(batchnorm_ext.OnOurKernel, Scaled):
        def forward(self, x):
            self._check_input_dim(x)
            return self._batch_norm(x) * 2

    with pytest.raises(TypeError):
        batchnorm_ext.register_conversion(Scaled, batchnorm_ext.BatchNorm2d)
    batchnorm_ext.register_conversion(Scaled, OursScaled)
    native = torch.nn.Sequential(Scaled(3))
    ours = batchnorm_ext.convert_model(copy.deepcopy(native))
    assert type(ours[0]) is OursScaled
    steps_match(ours, native, ours, native, [torch.randn(4, 3, 5, 5) for _ in range(2)])
    assert type(batchnorm_ext.revert_model(ours)[0]) is Scaled


def test_sync_batch_norm_conversions():
    native = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.SyncBatchNorm(4, momentum=0.3))
    native[1](torch.randn(4, 4, 3, 3) + 1)  # SyncBatchNorm trains on the CPU without a group
    native.eval()
    tensors = list(native[1].state_dict(keep_vars=True).values())
    model = copy.deepcopy(native)
    assert type(batchnorm_ext.convert_model(model)[1]) is torch.nn.SyncBatchNorm  # left alone
    batchnorm_ext.convert_model(model, sync=True)
    assert type(model[1]) is batchnorm_ext.SyncBatchNorm and model[1].momentum == 0.3
    x = inputs(1)[0]
    assert_close(model(x), native(x))
    assert type(batchnorm_ext.revert_model(model)[1]) is batchnorm_ext.SyncBatchNorm
    assert type(batchnorm_ext.revert_model(model, sync=True)[1]) is torch.nn.SyncBatchNorm
    # SyncBatchNorm (either) -> plain BatchNorm2d, ours or torch's, with the same tensors
    for source in [native, batchnorm_ext.convert_model(copy.deepcopy(native), sync=True)]:
        for native_flag, cls in [(False, batchnorm_ext.BatchNorm2d), (True, torch.nn.BatchNorm2d)]:
            plain = batchnorm_ext.revert_sync_batchnorm(copy.deepcopy(source), native=native_flag)
            assert type(plain[1]) is cls and not hasattr(plain[1], "process_group")
            assert_close(plain(x), native(x))
    plain = batchnorm_ext.revert_sync_batchnorm(native)
    assert list(plain[1].state_dict(keep_vars=True).values())[0] is tensors[0]
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        batchnorm_ext.revert_sync_batchnorm(torch.nn.SyncBatchNorm(4), dim=1)(torch.randn(2, 4, 3, 3))

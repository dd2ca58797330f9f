"""Fused models (batchnorm_ext.fuse, BatchNormAct*d) where users take models next:
TorchScript, FX, ONNX (both exporters, run by onnxruntime), each against the unfused
native model."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F

import batchnorm_ext
from batchnorm_ext.fused import _BatchNormAct


class Block(torch.nn.Module):
    """A ResNet basic block and a Conv-BN-SiLU: every fusion fuse() makes."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.act1 = torch.nn.SiLU(inplace=True)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(8)
        self.shortcut = torch.nn.Conv2d(4, 8, 1, bias=False)

    def forward(self, x):
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


def models():
    torch.manual_seed(0)
    native = Block()
    for bn in (native.bn1, native.bn2):  # statistics and parameters that are not 0 and 1
        with torch.no_grad():
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    fused = batchnorm_ext.fuse(copy.deepcopy(native))
    assert [m.activation for m in fused.modules() if isinstance(m, _BatchNormAct)] == ["silu", "relu"]
    return native, fused


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_torchscript(training):
    native, fused = models()
    native.train(training), fused.train(training)
    scripted = torch.jit.script(fused)
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(scripted(x), native(x))
    if training:  # the running statistics were updated by both, once each
        for a, b in zip(fused.state_dict().values(), native.state_dict().values()):
            torch.testing.assert_close(a, b)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    loaded.eval(), native.eval()
    torch.testing.assert_close(loaded(x), native(x))


def test_fx_records_fused_modules_as_calls():
    _, fused = models()
    traced = torch.fx.symbolic_trace(fused)
    calls = [(n.target, len(n.args)) for n in traced.graph.nodes if n.op == "call_module"]
    assert ("bn1", 1) in calls and ("bn2", 2) in calls, calls  # bn2 takes the residual
    x = torch.randn(2, 4, 6, 6)
    fused.eval(), traced.eval()
    torch.testing.assert_close(traced(x), fused(x))


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript-exporter"])
def test_onnx_export_runs_in_onnxruntime_as_native(dynamo):
    onnxruntime = pytest.importorskip("onnxruntime")  # a test dependency (requirements.txt)
    native, fused = models()
    native.eval(), fused.eval()
    x = torch.randn(2, 4, 6, 6)
    if dynamo:
        program = torch.onnx.export(fused, (x,), dynamo=True)
        data = program.model_proto.SerializeToString()
    else:
        buffer = io.BytesIO()
        torch.onnx.export(fused, (x,), buffer, dynamo=False)
        data = buffer.getvalue()
    session = onnxruntime.InferenceSession(data)
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), native(x), rtol=1e-5, atol=1e-5)

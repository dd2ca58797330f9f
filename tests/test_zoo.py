"""Real models, converted: torchvision's and timm's, trained like native (with a float64
copy as the yardstick), and taken through FX, TorchScript, ONNX, fusion, torch.export,
the meta device, pickling, checkpointing and autocast.  Small inputs: the suite runs on
two CPUs."""
import contextlib
import copy
import io
import pickle

import pytest
import torch
import torch.utils.checkpoint
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import batchnorm_ext
import zoo
from helpers import assert_close

tv = zoo.torchvision()
timm = zoo.timm()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread: these models are small, and on two shared CPUs two threads that wait
    for each other take many times longer (the results do not depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

OURS = (batchnorm_ext.BatchNorm1d, batchnorm_ext.BatchNorm2d, batchnorm_ext.BatchNorm3d)

# name: (constructor, input shape).  The deepest batch norms see 8 values per channel
# (2 x 2 x 2, 2 x 1 x 2 x 2 for the video model): fewer make the runs chaotic.
MODELS = {
    "resnet18": (lambda: tv.models.resnet18(num_classes=10), (2, 3, 64, 64)),
    "mobilenet_v3_small": (lambda: tv.models.mobilenet_v3_small(num_classes=10), (2, 3, 64, 64)),
    "efficientnet_b0": (lambda: tv.models.efficientnet_b0(num_classes=10), (2, 3, 64, 64)),
    "densenet121": (lambda: tv.models.densenet121(num_classes=10), (2, 3, 64, 64)),
    "regnet_y_400mf": (lambda: tv.models.regnet_y_400mf(num_classes=10), (2, 3, 64, 64)),
    "shufflenet_v2_x0_5": (lambda: tv.models.shufflenet_v2_x0_5(num_classes=10), (2, 3, 64, 64)),
    "r3d_18": (lambda: tv.models.video.r3d_18(num_classes=10), (2, 3, 4, 24, 24)),
    "timm_efficientnet_b0": (lambda: timm.create_model("efficientnet_b0", num_classes=10), (2, 3, 64, 64)),
    "timm_mobilenetv3_small_100": (lambda: timm.create_model("mobilenetv3_small_100", num_classes=10),
                                   (2, 3, 64, 64)),
}


def build(name):
    torch.manual_seed(0)
    constructor, shape = MODELS[name]
    return constructor(), shape


def batch_norms(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def train_mode(model):
    """Training, with dropout and stochastic depth off: the three copies compared must
    draw no random numbers (float32 and float64 would draw different masks)."""
    model.train()
    for m in model.modules():
        if isinstance(m, (torch.nn.Dropout, tv.ops.StochasticDepth, timm.layers.DropPath)):
            m.eval()
    return model


def relative_error(t, reference):
    reference = reference.double()
    return ((t.double() - reference).norm() / reference.norm().clamp(min=1e-12)).item()


class ReluDecisions(TorchFunctionMode):
    """Which inputs of each ReLU call were positive.  Recorded in a float32 run, replayed
    in its float64 shadow, it makes the shadow take the float32 run's side of every ReLU
    kink: a ReLU input within float32's rounding of zero (one in ~1e4 in these small
    nets) lands on either side by luck, and a flip in the last stage moves every
    gradient by percents (resnet18 channels-last with the DEFAULT kernels: one value of
    4096, 1.1e-6 in ours and -1e-9 in float64, moved the gradients 2.6% from an oracle
    that took the other side).  With the decision replayed, the shadow computes exactly
    the function the float32 run computed, and the comparison measures rounding alone.
    (Other kinks — hardswish at +-3, max-pool ties — are rarer and not replayed.)"""

    RELUS = {torch.nn.functional.relu, torch.nn.functional.relu_, torch.relu, torch.relu_,
             torch.Tensor.relu, torch.Tensor.relu_}

    def __init__(self, recorded=None):
        super().__init__()
        self.masks = [] if recorded is None else recorded.masks
        self.replaying = recorded is not None
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self.RELUS:
            return func(*args, **kwargs)
        self.calls += 1
        if not self.replaying:
            result = func(*args, **kwargs)
            self.masks.append(result > 0)
            return result
        x, mask = args[0], self.masks[self.calls - 1]
        in_place = func in (torch.nn.functional.relu_, torch.relu_, torch.Tensor.relu_) or \
            kwargs.get("inplace", len(args) > 1 and args[1])
        return x.mul_(mask) if in_place else x * mask


def steps(model, shadow, xs, follow=True):
    """Two SGD steps of a float32 model and of its float64 shadow (a copy of the same
    network) on the same inputs; returns, for each, the outputs, the gradients of the
    first step and the buffers (running statistics) at the end.  follow: the shadow
    replays the model's ReLU decisions (ReluDecisions); without it (a compiled model, where
    no Python runs per ReLU) the comparison must be robust to a flip (see
    assert_as_close_as_native).  Each step starts from the shadow's parameters: a flip
    moves a step's gradients, and with them every parameter after the step, so the next
    step's outputs would compare chaos, not batch norms; the buffers stay each one's own,
    as they are under test."""
    runs = [(model.float(), torch.float32), (shadow.double(), torch.float64)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m, _ in runs]
    outputs, grads = ([], []), [None, None]
    for x in xs:
        decisions = None
        for i, ((m, dtype), optimizer) in enumerate(zip(runs, optimizers)):
            optimizer.zero_grad()
            if follow:
                decisions = ReluDecisions(decisions)
            with decisions or contextlib.nullcontext():
                y = m(x.to(dtype))
            y.square().mean().backward()
            outputs[i].append(y.detach())
            if grads[i] is None:
                grads[i] = [p.grad.clone() for p in m.parameters()]
            optimizer.step()
        if follow:  # the shadow met as many ReLUs as the model
            assert decisions.calls == len(decisions.masks)
        with torch.no_grad():
            for p, shadow_p in zip(model.parameters(), shadow.parameters(), strict=True):
                p.copy_(shadow_p)
    return [(outputs[i], grads[i], [b.detach().clone() for b in m.buffers()])
            for i, (m, _) in enumerate(runs)]


def median(values):
    return sorted(values)[len(values) // 2]


def assert_as_close_as_native(ours, native, oracle, what, robust=False, native_oracle=None):
    """Ours is as close to the float64 oracle as native: over the tensors of one kind, the
    median and the largest relative error of ours are at most 4 times native's (or 1e-6);
    integer tensors (num_batches_tracked) are equal.  The yardstick is native's error, not
    a fixed tolerance: deep nets at random initialisation amplify float32 rounding
    differently from one implementation to another.

    robust=True (gradients): the median only.  A gradient is discontinuous where a ReLU
    or max-pool input crosses zero or a tie: one value of the ~1e5 that float32 puts on
    the other side (a rounding of 1e-7 upstream: ours and native each do it now and then,
    at different places) moves the gradients of every layer before it by percents.  A
    crossing in the first layers changes the largest errors, not the median; a wrong
    gradient of the batch norms changes the median.  (Crossings are why the parameters
    after a step are not compared, and why test_batch_norms_in_the_model_match_native
    compares each batch norm on the very values it met.)"""
    errors = {"ours": [], "native": []}
    native_oracle = oracle if native_oracle is None else native_oracle
    for i, (o, n, r, nr) in enumerate(zip(ours, native, oracle, native_oracle, strict=True)):
        if not o.is_floating_point():
            assert torch.equal(o, n), f"{what}[{i}]"
            continue
        errors["ours"].append(relative_error(o, r))
        errors["native"].append(relative_error(n, nr))
    for statistic in (median,) if robust else (median, max):
        ours_error, native_error = statistic(errors["ours"]), statistic(errors["native"])
        assert ours_error <= max(4 * native_error, 1e-6), \
            f"{what}: ours {ours_error:.3g} from float64, native {native_error:.3g} ({statistic.__name__})"


KINDS = [("outputs", False), ("gradients", True), ("buffers", False)]


@pytest.mark.parametrize("name", MODELS)
def test_trains_like_native(name):
    native, shape = build(name)
    oracle = copy.deepcopy(native)
    ours = batchnorm_ext.convert_model(copy.deepcopy(native))
    converted = [m for m in ours.modules() if isinstance(m, batchnorm_ext.OnOurKernel)]
    assert len(converted) == len(batch_norms(native)) > 0
    xs = [torch.randn(shape) * 2 + 0.5 for _ in range(2)]
    ours_results, ours_oracle = steps(train_mode(ours), train_mode(copy.deepcopy(oracle)), xs)
    native_results, native_oracle = steps(train_mode(native), train_mode(oracle), xs)
    for i, (what, robust) in enumerate(KINDS):
        assert_as_close_as_native(ours_results[i], native_results[i], ours_oracle[i], what, robust,
                                  native_oracle[i])
    # and in eval, with the running statistics of the first step
    for model, dtype in [(ours, torch.float32), (native, torch.float32), (oracle, torch.float64)]:
        model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v
                               for k, v in oracle.state_dict().items()})
    x = torch.randn(shape)
    with torch.no_grad():
        outputs = [m.eval()(x.to(dtype)) for m, dtype in
                   [(ours, torch.float32), (native, torch.float32), (oracle, torch.float64)]]
    assert_as_close_as_native(*([o] for o in outputs), "eval output")


class RecordBatchNorms(TorchDispatchMode):
    """Copies of the arguments and results of every batch_norm_forward and
    batch_norm_backward call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func in (batchnorm_ext.ops.batch_norm_forward.default,
                    batchnorm_ext.ops.batch_norm_backward.default):
            copy_ = lambda v: v.clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
            self.calls.append((func, [copy_(a) for a in args], [copy_(r) for r in result]))
        return result


@pytest.mark.parametrize("name", MODELS)
def test_batch_norms_in_the_model_match_native(name):
    """Each batch norm of the model on the very input and output gradient it met in a
    training step of the converted model: ours (forward, backward) against native's
    aten.native_batch_norm and its backward, each against float64, layer by layer."""
    model, shape = build(name)
    ours = train_mode(batchnorm_ext.convert_model(model))
    recorder = RecordBatchNorms()
    with recorder:
        ours(torch.randn(shape) * 2 + 0.5).square().mean().backward()
    forward = [c for c in recorder.calls if c[0] == batchnorm_ext.ops.batch_norm_forward.default]
    backward = [c for c in recorder.calls if c[0] != batchnorm_ext.ops.batch_norm_forward.default]
    assert len(forward) == len(backward) == len(batch_norms(model))
    # (The batch statistics are checked through the running statistics, in
    # test_trains_like_native: some layers here see channels of mean ~1e-9, where a
    # relative error says nothing.)
    for i, (_, (x, w, b, _, _, _, eps), (y, _, _)) in enumerate(forward):
        native = torch.ops.aten.native_batch_norm(x, w, b, None, None, True, 0.0, eps)[0]
        oracle = torch.ops.aten.native_batch_norm(x.double(), w.double(), b.double(), None, None,
                                                  True, 0.0, eps)[0]
        assert_as_close_as_native([y], [native], [oracle], f"forward {i}")
    for i, (_, (dy, x, w, _, _, mean, var, _, eps, mask, *_), result) in enumerate(backward):
        _, native_mean, native_invstd = torch.ops.aten.native_batch_norm(x, w, None, None, None,
                                                                          True, 0.0, eps)
        native = torch.ops.aten.native_batch_norm_backward(dy, x, w, None, None, native_mean,
                                                           native_invstd, True, eps, mask)
        _, mean64, invstd64 = torch.ops.aten.native_batch_norm(x.double(), w.double(), None, None,
                                                               None, True, 0.0, eps)
        oracle = torch.ops.aten.native_batch_norm_backward(
            dy.double(), x.double(), w.double(), None, None, mean64, invstd64, True, eps, mask)
        assert_as_close_as_native(result, native, oracle, f"backward {i}")


def test_timm_batch_norm_act_keeps_its_activation():
    native, shape = build("timm_efficientnet_b0")
    ours = batchnorm_ext.convert_model(copy.deepcopy(native))
    bn = ours.bn1
    assert type(bn).__module__ == "batchnorm_ext._timm"
    assert isinstance(bn, timm.layers.BatchNormAct2d) and type(bn.act) is torch.nn.SiLU
    reverted = batchnorm_ext.revert_model(copy.deepcopy(ours))
    assert [type(m) for m in reverted.modules()] == [type(m) for m in native.modules()]
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    assert type(torch.load(buffer, weights_only=False).bn1) is type(bn)


@pytest.mark.parametrize("name", ["resnet18", "timm_mobilenetv3_small_100"])
def test_channels_last_and_autocast(name):
    native, shape = build(name)
    ours = batchnorm_ext.convert_model(copy.deepcopy(native))
    oracle = copy.deepcopy(native)
    xs = [torch.randn(shape).contiguous(memory_format=torch.channels_last) for _ in range(2)]
    for model in (native, ours):
        model.to(memory_format=torch.channels_last)
    ours_shadow = copy.deepcopy(oracle)
    ours_results, ours_oracle = steps(train_mode(ours), train_mode(ours_shadow), xs)
    native_results, native_oracle = steps(train_mode(native), train_mode(oracle), xs)
    for i, (what, robust) in enumerate(KINDS):
        assert_as_close_as_native(ours_results[i], native_results[i], ours_oracle[i], what, robust,
                                  native_oracle[i])
    # bfloat16 autocast: the convolutions in bfloat16, batch norm in float32 (as native)
    x = torch.randn(shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ours, y_native = ours.eval()(x), native.eval()(x)
    assert y_ours.dtype == y_native.dtype
    # each against its own shadow: the two have the parameters and statistics of two steps
    y_oracles = [shadow.eval()(x.double()) for shadow in (ours_shadow, oracle)]
    assert_as_close_as_native([y_ours], [y_native], y_oracles[:1], "autocast output",
                              native_oracle=y_oracles[1:])


def test_torchvision_feature_extraction():
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    native, shape = build("resnet18")
    ours = batchnorm_ext.convert_model(copy.deepcopy(native))
    assert get_graph_node_names(ours) == get_graph_node_names(native)
    nodes = {"layer1.0.bn1": "bn", "layer2": "l2", "layer4": "l4"}
    extract_ours = create_feature_extractor(ours, nodes)
    extract_native = create_feature_extractor(native, nodes)
    x = torch.randn(shape)
    for training in (True, False):  # a graph per mode, as torchvision traces them
        features_ours = extract_ours.train(training)(x)
        features_native = extract_native.train(training)(x)
        for key in nodes.values():
            assert_close(features_ours[key], features_native[key], rtol=1e-4, atol=1e-4)


def test_timm_fx_traces_through_batch_norm_act_as_native():
    """timm's BatchNormAct2d is not a torch.nn module: FX traces into it, recording
    F.batch_norm for native, our operator for ours."""
    native, shape = build("timm_mobilenetv3_small_100")
    native.eval()
    ours = batchnorm_ext.convert_model(copy.deepcopy(native))
    traced_native, traced_ours = torch.fx.symbolic_trace(native), torch.fx.symbolic_trace(ours)
    targets = [n.target for n in traced_ours.graph.nodes]
    assert torch.ops.batchnorm_ext.batch_norm.default in targets
    assert torch.nn.functional.batch_norm not in targets
    assert len(targets) == len(traced_native.graph.nodes)
    x = torch.randn(shape)
    assert_close(traced_ours(x), traced_native(x), rtol=1e-4, atol=1e-5)
    features = timm.models.create_feature_extractor(ours, return_nodes=["blocks.1", "blocks.3"])
    expected = timm.models.create_feature_extractor(native, return_nodes=["blocks.1", "blocks.3"])
    for key, value in features(x).items():
        assert_close(value, expected(x)[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet18", "timm_efficientnet_b0"])
def test_jit_script(name):
    native, shape = build(name)
    ours = batchnorm_ext.convert_model(copy.deepcopy(native))
    scripted_ours, scripted_native = torch.jit.script(ours), torch.jit.script(native)
    x = torch.randn(shape)
    for training in (True, False):
        assert_close(scripted_ours.train(training)(x), scripted_native.train(training)(x),
                     rtol=1e-4, atol=1e-4)
    for a, b in zip(ours.buffers(), native.buffers()):
        assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("name", ["resnet18", "timm_mobilenetv3_small_100"])
def test_onnx(name, dynamo):
    import onnxruntime
    native, shape = build(name)
    native.eval()
    ours = batchnorm_ext.convert_model(copy.deepcopy(native))
    x = torch.randn(shape)
    if dynamo:
        proto = torch.onnx.export(ours, (x,), dynamo=True, verbose=False).model_proto.SerializeToString()
    else:
        buffer = io.BytesIO()
        torch.onnx.export(ours, (x,), buffer, dynamo=False)
        proto = buffer.getvalue()
    session = onnxruntime.InferenceSession(proto)
    result = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert_close(torch.from_numpy(result), native(x), rtol=1e-4, atol=1e-4)


def test_fusion():
    from torch.fx.experimental.optimization import fuse
    native, shape = build("resnet18")
    native.eval()
    ours = batchnorm_ext.convert_model(copy.deepcopy(native))
    x = torch.randn(shape)
    fused = fuse(batchnorm_ext.revert_model(copy.deepcopy(ours)))
    assert not batch_norms(fused)
    assert_close(fused(x), native(x), rtol=1e-4, atol=1e-4)
    config = {"additional_fuser_method_mapping": batchnorm_ext.fuser_method_mapping()}
    fused = torch.ao.quantization.fuse_modules(ours, [["conv1", "bn1", "relu"],
                                                      ["layer1.0.conv1", "layer1.0.bn1"]],
                                               fuse_custom_config_dict=config)
    assert type(fused.conv1) is torch.ao.nn.intrinsic.ConvReLU2d
    assert_close(fused(x), native(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_export_keeps_our_operators(training):
    native, shape = build("resnet18")
    native.train(training)
    ours = batchnorm_ext.convert_model(copy.deepcopy(native))
    x = torch.randn(shape)
    program = torch.export.export(ours, (x,)).run_decompositions()
    targets = [str(n.target) for n in program.graph.nodes]
    assert targets.count("batchnorm_ext.batch_norm_forward.default") == len(batch_norms(native))
    assert "aten._native_batch_norm_legit_functional.default" not in targets
    assert_close(program.module()(x), native(x), rtol=1e-4, atol=1e-4)


def test_meta_device_pickle_checkpoint_jit_trace():
    with torch.device("meta"):
        meta_model = batchnorm_ext.convert_model(tv.models.resnet18(num_classes=10))
    assert meta_model(torch.empty(2, 3, 64, 64, device="meta")).shape == (2, 10)

    native, shape = build("resnet18")
    ours = batchnorm_ext.convert_model(copy.deepcopy(native))
    for clone in [copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))]:
        assert [type(m) for m in clone.modules()] == [type(m) for m in ours.modules()]
    x = torch.randn(shape)

    def run(model):  # layer1 recomputed in the backward: its batch norms run twice, as native's
        y = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        y = torch.utils.checkpoint.checkpoint(model.layer1, y, use_reentrant=False)
        y.square().mean().backward()
        return y
    assert_close(run(ours), run(native), rtol=1e-4, atol=1e-4)
    assert_close(ours.layer1[0].bn1.running_mean, native.layer1[0].bn1.running_mean)
    assert_close(ours.conv1.weight.grad, native.conv1.weight.grad, rtol=1e-3, atol=1e-4)

    ours.eval()
    native.eval()
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.trace(ours, (x,)), buffer)
    buffer.seek(0)
    assert_close(torch.jit.load(buffer)(x), native(x), rtol=1e-4, atol=1e-4)

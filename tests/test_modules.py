"""The modules as drop-ins for torch.nn.BatchNorm1d/2d/3d: behaviour over several steps,
construction, state_dict, repr, meta device, and convert_model."""
import copy
import io
import itertools

import pytest
import torch

import batchnorm_ext
from helpers import assert_close, make_input

PAIRS = [
    (batchnorm_ext.BatchNorm1d, torch.nn.BatchNorm1d, [(8, 6), (8, 6, 5)]),
    (batchnorm_ext.BatchNorm2d, torch.nn.BatchNorm2d, [(4, 6, 5, 3)]),
    (batchnorm_ext.BatchNorm3d, torch.nn.BatchNorm3d, [(2, 6, 3, 4, 2)]),
]
CASES = [(ours, native, shape) for ours, native, shapes in PAIRS for shape in shapes]


def pair(ours_cls, native_cls, *args, **kwargs):
    native = native_cls(*args, **kwargs)
    ours = ours_cls(*args, **kwargs)
    ours.load_state_dict(native.state_dict())
    if native.affine:  # not the defaults 1 and 0, so that a swap would show
        with torch.no_grad():
            native.weight.uniform_(0.5, 1.5)
            native.bias.normal_()
            ours.weight.copy_(native.weight)
            ours.bias.copy_(native.bias)
    return ours, native


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("affine,track", list(itertools.product([True, False], [True, False])))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("ours_cls,native_cls,shape", CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_steps_match_native(ours_cls, native_cls, shape, layout, affine, track, momentum):
    ours, native = pair(ours_cls, native_cls, shape[1], momentum=momentum, affine=affine,
                        track_running_stats=track)
    for step in range(3):  # three training steps, then eval
        x = make_input(shape, torch.float32, layout, scale=1.5, offset=step)
        xo, xn = x.clone().requires_grad_(), x.clone().requires_grad_()
        yo, yn = ours(xo), native(xn)
        g = torch.randn_like(yn)
        yo.backward(g)
        yn.backward(g)
        assert_close(yo, yn)
        assert_close(xo.grad, xn.grad)
        assert yo.stride() == yn.stride()
        if affine:
            assert_close(ours.weight.grad, native.weight.grad, scale=10)
            assert_close(ours.bias.grad, native.bias.grad, scale=10)
    for name, buffer in native.named_buffers():
        assert_close(dict(ours.named_buffers())[name], buffer, rtol=1e-5, atol=1e-6)
    ours.eval()
    native.eval()
    x = make_input(shape, torch.float32, layout)
    assert_close(ours(x), native(x))


@pytest.mark.parametrize("input_dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_module(input_dtype):
    """A float32 module on bfloat16/half input: float32 parameters and statistics."""
    ours, native = pair(batchnorm_ext.BatchNorm2d, torch.nn.BatchNorm2d, 5)
    for _ in range(2):
        x = make_input((4, 5, 6, 6), input_dtype, scale=2, offset=1)
        yo, yn = ours(x), native(x)
        assert yo.dtype == input_dtype
        assert_close(yo, yn)
    assert ours.running_mean.dtype == torch.float32
    assert_close(ours.running_mean, native.running_mean, torch.float32, rtol=1e-3, atol=1e-3)
    assert_close(ours.running_var, native.running_var, torch.float32, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_module_in_other_dtypes(dtype):
    ours, native = pair(batchnorm_ext.BatchNorm2d, torch.nn.BatchNorm2d, 5, dtype=dtype)
    for _ in range(2):
        x = make_input((4, 5, 6, 6), dtype, scale=2, offset=1)
        assert_close(ours(x), native(x))
    assert_close(ours.running_mean, native.running_mean)
    assert_close(ours.running_var, native.running_var)


def test_eval_without_running_stats_uses_batch_statistics():
    ours, native = pair(batchnorm_ext.BatchNorm2d, torch.nn.BatchNorm2d, 3,
                        track_running_stats=False)
    ours.eval()
    native.eval()
    x = torch.randn(4, 3, 5, 5)
    assert_close(ours(x), native(x))


def test_same_construction_and_repr():
    for ours_cls, native_cls, _ in PAIRS:
        for kwargs in [{}, dict(eps=1e-3, momentum=None, affine=False, track_running_stats=False),
                       dict(momentum=0.01, bias=False)]:
            ours, native = ours_cls(7, **kwargs), native_cls(7, **kwargs)
            assert repr(ours) == repr(native)
            assert isinstance(ours, native_cls)
            assert list(ours.state_dict()) == list(native.state_dict())
            assert [n for n, _ in ours.named_parameters()] == [n for n, _ in native.named_parameters()]
            for (name, a), (_, b) in zip(ours.state_dict().items(), native.state_dict().items()):
                assert torch.equal(a, b) and a.dtype == b.dtype, name


def test_state_dict_round_trip_with_torch():
    native = torch.nn.BatchNorm2d(4)
    native(torch.randn(3, 4, 2, 2) * 3 + 1)  # non-trivial running statistics
    ours = batchnorm_ext.BatchNorm2d(4)
    ours.load_state_dict(native.state_dict())
    back = torch.nn.BatchNorm2d(4)
    back.load_state_dict(ours.state_dict())
    for key, value in native.state_dict().items():
        assert torch.equal(back.state_dict()[key], value)
    # and through a file, as checkpoints travel
    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.nn.BatchNorm2d(4)
    loaded.load_state_dict(torch.load(buffer))
    assert torch.equal(loaded.running_var, native.running_var)


def test_old_checkpoint_without_num_batches_tracked():
    native = torch.nn.BatchNorm2d(3)
    state = native.state_dict()
    del state["num_batches_tracked"]
    state._metadata = {"": {"version": 1}}  # written by torch before num_batches_tracked
    ours = batchnorm_ext.BatchNorm2d(3)
    ours.num_batches_tracked.fill_(5)
    result = ours.load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys
    assert ours.num_batches_tracked.item() == 5  # as torch: the module keeps its own count


def test_reset_methods():
    ours = batchnorm_ext.BatchNorm2d(3)
    ours(torch.randn(4, 3, 2, 2) + 2)
    with torch.no_grad():
        ours.weight.fill_(3)
    ours.reset_running_stats()
    assert torch.equal(ours.running_mean, torch.zeros(3)) and torch.equal(ours.running_var, torch.ones(3))
    assert ours.num_batches_tracked.item() == 0
    ours.reset_parameters()
    assert torch.equal(ours.weight, torch.ones(3))


def test_meta_device():
    ours = batchnorm_ext.BatchNorm2d(5, device="meta")
    assert all(t.is_meta for t in ours.state_dict().values())
    out = ours(torch.randn(2, 5, 3, 3, device="meta").contiguous(memory_format=torch.channels_last))
    assert out.is_meta and out.shape == (2, 5, 3, 3)
    assert out.is_contiguous(memory_format=torch.channels_last)
    ours.to_empty(device="cpu")
    ours.reset_parameters()
    x = torch.randn(2, 5, 3, 3)
    assert_close(ours(x), torch.nn.BatchNorm2d(5)(x))


def test_input_dimension_checks():
    for ours_cls, native_cls, shapes in PAIRS:
        rank = len(shapes[0])
        for bad_rank in {1, 2, 3, 4, 5, 6} - {len(s) for s in shapes}:
            x = torch.randn([3] * bad_rank)
            with pytest.raises(ValueError) as native_error:
                native_cls(3)(x)
            with pytest.raises(ValueError) as our_error:
                ours_cls(3)(x)
            assert str(our_error.value) == str(native_error.value)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
            torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4, momentum=None))
        self.volume = torch.nn.BatchNorm3d(4)
        self.head = torch.nn.BatchNorm1d(4, affine=False)
        self.sync = torch.nn.SyncBatchNorm(4)


def test_convert_model():
    net = Net()
    net.features[1].weight.requires_grad_(False)
    net.features[1](torch.randn(2, 4, 3, 3))  # running statistics that are not the defaults
    net.eval()
    params = {n: p for n, p in net.named_parameters()}
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)

    converted = batchnorm_ext.convert_model(net)
    assert converted is net
    assert type(net.features[1]) is batchnorm_ext.BatchNorm2d
    assert type(net.features[4]) is batchnorm_ext.BatchNorm2d
    assert type(net.volume) is batchnorm_ext.BatchNorm3d
    assert type(net.head) is batchnorm_ext.BatchNorm1d
    assert type(net.sync) is torch.nn.SyncBatchNorm
    for name, p in net.named_parameters():
        assert p is params[name]  # the very tensors: optimizers keep working
    assert not net.features[1].weight.requires_grad
    for name, b in net.named_buffers():
        assert torch.equal(b, buffers[name])
    assert not any(m.training for m in net.modules())
    assert net.features[4].momentum is None and net.head.affine is False
    assert optimizer.param_groups[0]["params"][0] is net.features[0].weight

    single = torch.nn.BatchNorm2d(3)
    assert type(batchnorm_ext.convert_model(single)) is batchnorm_ext.BatchNorm2d


def test_converted_model_trains_like_native():
    torch.manual_seed(1)
    native = Net().features
    ours = batchnorm_ext.convert_model(copy.deepcopy(native))
    opt_n = torch.optim.SGD(native.parameters(), lr=0.1)
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.1)
    for _ in range(3):
        x = torch.randn(4, 3, 6, 6)
        for model, opt in [(native, opt_n), (ours, opt_o)]:
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for (name, a), (_, b) in zip(ours.state_dict().items(), native.state_dict().items()):
        assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_module_pickles_and_deepcopies():
    ours = batchnorm_ext.BatchNorm2d(3)
    ours(torch.randn(2, 3, 2, 2))
    for clone in [copy.deepcopy(ours), _pickled(ours)]:
        assert type(clone) is batchnorm_ext.BatchNorm2d
        assert torch.equal(clone.running_mean, ours.running_mean)


def _pickled(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_eager_calls_reach_torch_function_and_dispatch_modes(training):
    """The eager module call takes a short path to the operator (one Python frame less than
    its OpOverload); torch function modes and dispatch modes still see the call, as they
    see native's (a mode that changes the result shows that it ran), and the result is the
    one without a mode."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode
    op = torch.ops.batchnorm_ext.batch_norm.default

    class Doubling(TorchFunctionMode):  # doubles what our operator returns
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            return out * 2 if func is op else out

    class Recording(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    ours, native = pair(batchnorm_ext.BatchNorm2d, torch.nn.BatchNorm2d, 3)
    ours.train(training)
    native.train(training)
    x = make_input((4, 3, 5, 5), torch.float32)
    with Doubling():
        doubled = ours(x)
    assert_close(doubled, 2 * native(x))
    recording = Recording()
    with recording:
        y = ours(x)
    assert_close(y, native(x))
    # batch_norm is implicit-autograd: the mode sees the operator it calls
    assert torch.ops.batchnorm_ext.batch_norm_forward.default in recording.ops, recording.ops

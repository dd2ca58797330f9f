"""Bad input: the same exception type and message as native batch norm, never a crash.
Where our message differs from native's on purpose, the case is listed in
DIFFERENT_ON_PURPOSE with our message and the reason; differences that are bugs are
expected failures (MESSAGE_BUGS)."""
import pytest
import torch
import torch.nn.functional as F

import batchnorm_ext

C = 3


def stats(dtype=torch.float32, n=C):
    return torch.zeros(n, dtype=dtype), torch.ones(n, dtype=dtype)


def x(*shape, dtype=torch.float32):
    return torch.randn(shape or (4, C, 2, 2)).to(dtype)


# (id, arguments for batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps))
CASES = [
    ("one value per channel (N, C)", lambda: (x(1, C), *stats(), None, None, True)),
    ("one value per channel (N, C, 1, 1)", lambda: (x(1, C, 1, 1), *stats(), None, None, True)),
    ("one value per channel (N, C, 1)", lambda: (x(1, C, 1), *stats(), None, None, True)),
    ("eps zero in training", lambda: (x(), *stats(), None, None, True, 0.1, 0.0)),
    ("eps negative in training", lambda: (x(), *stats(), None, None, True, 0.1, -1e-5)),
    ("eps negative in eval", lambda: (x(), *stats(), None, None, False, 0.1, -1e-5)),
    ("running_mean wrong size", lambda: (x(), torch.zeros(4), torch.ones(C), None, None, True)),
    ("running_var wrong size", lambda: (x(), torch.zeros(C), torch.ones(4), None, None, False)),
    ("weight wrong size", lambda: (x(), *stats(), torch.ones(4), None, True)),
    ("bias wrong size", lambda: (x(), *stats(), None, torch.ones(2), False)),
    ("weight 0-d", lambda: (x(), *stats(), torch.tensor(1.0), None, True)),
    ("eval without running stats", lambda: (x(), None, None, None, None, False)),
    ("eval without running_var", lambda: (x(), torch.zeros(C), None, None, None, False)),
    ("training with only running_mean", lambda: (x(), torch.zeros(C), None, None, None, True)),
    ("int64 input", lambda: (x(dtype=torch.int64), *stats(), None, None, True)),
    ("uint8 input", lambda: (x(dtype=torch.uint8), *stats(), None, None, False)),
    ("bool input", lambda: (x(dtype=torch.bool), *stats(), None, None, True)),
    ("complex input", lambda: (x(dtype=torch.complex64), *stats(), None, None, True)),
    ("float64 input, float32 params", lambda: (x(dtype=torch.float64), *stats(), torch.ones(C), None, True)),
    ("float32 input, float64 params", lambda: (x(), *stats(torch.float64), None, None, True)),
    ("float32 input, bf16 weight", lambda: (x(), None, None, torch.ones(C, dtype=torch.bfloat16), None, True)),
    ("bf16 input, fp16 weight", lambda: (x(dtype=torch.bfloat16), None, None, torch.ones(C, dtype=torch.float16), None, True)),
    ("bf16 input, bf16 weight, float32 stats", lambda: (x(dtype=torch.bfloat16), *stats(), torch.ones(C, dtype=torch.bfloat16), None, False)),
    ("float32 input, float64 running_var", lambda: (x(), torch.zeros(C), torch.ones(C, dtype=torch.float64), None, None, False)),
    ("1-D input with stats", lambda: (torch.randn(C), *stats(), None, None, False)),
    ("running stats require grad (train)", lambda: (x(), torch.zeros(C, requires_grad=True), torch.ones(C, requires_grad=True), None, None, True)),
    ("running stats require grad (eval)", lambda: (x(), torch.zeros(C), torch.ones(C, requires_grad=True), None, None, False)),
    ("weight on meta", lambda: (x(), *stats(), torch.ones(C, device="meta"), None, True)),
    ("running stats on meta", lambda: (x(), torch.zeros(C, device="meta"), torch.ones(C, device="meta"), None, None, False)),
    ("0-D input in training", lambda: (torch.tensor(1.0), None, None, None, None, True)),
    ("1-D input in training", lambda: (torch.randn(C), None, None, None, None, True)),
    ("running stats 2-D (eval)", lambda: (x(), torch.zeros(1, C), torch.ones(1, C), None, None, False)),
    ("running stats 2-D (train)", lambda: (x(), torch.zeros(1, C), torch.ones(1, C), None, None, True)),
    ("eps -0.0 in training", lambda: (x(), *stats(), None, None, True, 0.1, -0.0)),
    ("eps of many digits in training", lambda: (x(), *stats(), None, None, True, 0.1, -1.234567891e-5)),
    ("eps of many digits in eval", lambda: (x(), *stats(), None, None, False, 0.1, -0.1234567891)),
]

# Our message where it differs from native's on purpose, and why.
DIFFERENT_ON_PURPOSE = {
    "running stats require grad (train)": (
        "batch_norm is not differentiable with respect to argument 'running_mean'. This input "
        "cannot have requires_grad True.",
        "native's names its operator, native_batch_norm; ours is batch_norm"),
    "running stats require grad (eval)": (
        "batch_norm is not differentiable with respect to argument 'running_var'. This input "
        "cannot have requires_grad True.",
        "native's names its operator, native_batch_norm; ours is batch_norm"),
    "0-D input in training": (
        "batch_norm: expected an input of shape (N, C, *), got a 0-D tensor",
        "native fails on an internal index ('tuple index out of range')"),
    "1-D input in training": (
        "batch_norm: expected input of shape (N, C, *) with at least 2 dimensions, but got a "
        "1-D input of size [3]",
        "native fails on an internal index ('Dimension out of range (expected to be in range "
        "of [-1, 0], but got 1)')"),
    "running stats 2-D (eval)": (
        "running_mean must be one-dimensional, but got shape [1, 3]",
        "native fails in an internal accessor ('TensorAccessor expected 1 dims but tensor has 2')"),
    "running stats 2-D (train)": (
        "running_mean must be one-dimensional, but got shape [1, 3]",
        "native fails in an internal accessor ('TensorAccessor expected 1 dims but tensor has 2')"),
}

# Differences that are bugs: ours formats eps in C++ (csrc/autograd.cpp,
# check_functional_args: ostream, 6 significant digits, no ".0"); native in Python (repr).
EPS_FORMAT_BUG = ("bug (csrc/autograd.cpp, check_functional_args): eps is printed by C++ "
                  "streams (0, -0, -1.23457e-05) where native's Python prints repr(eps) (0.0, "
                  "-0.0, -1.234567891e-05)")
MESSAGE_BUGS = {
    "eps zero in training": EPS_FORMAT_BUG,
    "eps -0.0 in training": EPS_FORMAT_BUG,
    "eps of many digits in training": EPS_FORMAT_BUG,
    "eps of many digits in eval": EPS_FORMAT_BUG,
}


def call(fn, args):
    args = list(args)
    kwargs = dict(zip(["weight", "bias", "training", "momentum", "eps"], args[3:]))
    return fn(args[0], args[1], args[2], **kwargs)


def outcomes(make_args):
    """(native's exception, ours) for one bad call."""
    results = []
    for fn in (F.batch_norm, batchnorm_ext.batch_norm):
        torch.manual_seed(0)
        with pytest.raises(Exception) as raised:
            call(fn, make_args())
        results.append(raised.value)
    return results


@pytest.mark.parametrize("make_args", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_same_exception_type_as_native(make_args):
    native, ours = outcomes(make_args)
    assert type(ours) is type(native), (ours, native)


@pytest.mark.parametrize("name,make_args", [
    pytest.param(name, make_args, id=name, marks=[pytest.mark.xfail(strict=True, reason=MESSAGE_BUGS[name])]
                 if name in MESSAGE_BUGS else [])
    for name, make_args in CASES])
def test_same_message_as_native(name, make_args):
    """Word for word native's message, or (listed in DIFFERENT_ON_PURPOSE) ours, which must
    then still differ from native's."""
    native, ours = outcomes(make_args)
    if name in DIFFERENT_ON_PURPOSE:
        assert str(ours) == DIFFERENT_ON_PURPOSE[name][0]
        assert str(native) != str(ours), f"{name}: native's message is ours now: drop it from the list"
    else:
        assert str(ours) == str(native)


def test_lists_name_cases():
    names = [c[0] for c in CASES]
    assert len(set(names)) == len(names)
    assert set(DIFFERENT_ON_PURPOSE) <= set(names) and set(MESSAGE_BUGS) <= set(names)
    assert not set(DIFFERENT_ON_PURPOSE) & set(MESSAGE_BUGS)


@pytest.mark.xfail(strict=True, reason=(
    "bug (csrc/autograd.cpp, check_functional_args: TORCH_CHECK_VALUE(eps > 0) and eps >= 0): "
    "eps = NaN is refused with ValueError; native's Python checks (eps <= 0, eps < 0) are "
    "false for NaN, so native accepts it (and returns NaN)"))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_nan_eps_accepted_as_native(training):
    x = torch.randn(4, C)
    native = F.batch_norm(x, *stats(), training=training, eps=float("nan"))
    ours = batchnorm_ext.batch_norm(x, *stats(), training=training, eps=float("nan"))
    assert torch.equal(ours.isnan(), native.isnan())


def test_messages_are_native_ones_where_it_matters():
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training, "
                                         r"got input size torch.Size\(\[1, 3, 1, 1\]\)"):
        batchnorm_ext.batch_norm(torch.randn(1, 3, 1, 1), None, None, training=True)
    with pytest.raises(ValueError, match="batch_norm eps must be positive during training"):
        batchnorm_ext.batch_norm(torch.randn(4, 3), None, None, training=True, eps=0.0)
    with pytest.raises(RuntimeError, match="weight should contain 3 elements not 4"):
        batchnorm_ext.batch_norm(torch.randn(4, 3), None, None, torch.ones(4), training=True)
    with pytest.raises(NotImplementedError, match="\"batch_norm\" not implemented for 'Long'"):
        batchnorm_ext.batch_norm(torch.ones(4, 3, dtype=torch.long), None, None, training=True)
    with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
        batchnorm_ext.batch_norm(torch.randn(4, 3), None, None, training=False)


def test_momentum_none_in_functional_is_a_type_error_as_native():
    with pytest.raises(TypeError):
        F.batch_norm(torch.randn(4, 3), *stats(), training=True, momentum=None)
    with pytest.raises(TypeError):
        batchnorm_ext.batch_norm(torch.randn(4, 3), *stats(), training=True, momentum=None)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(0, C), (0, C, 2, 2), (2, C, 0), (4, 0, 5)])
def test_empty_input_like_native(shape, training):
    """numel() == 0: an empty output, running statistics untouched, no crash."""
    for fn in (F.batch_norm, batchnorm_ext.batch_norm):
        running_mean = torch.full((shape[1],), 0.5)
        running_var = torch.full((shape[1],), 2.0)
        out = fn(torch.randn(shape), running_mean, running_var, training=training)
        assert out.shape == shape
        assert torch.equal(running_mean, torch.full((shape[1],), 0.5))
        assert torch.equal(running_var, torch.full((shape[1],), 2.0))


def test_empty_batch_gradients_like_native():
    grads = []
    for fn in (F.batch_norm, batchnorm_ext.batch_norm):
        xx = torch.randn(0, C, 2, 2, requires_grad=True)
        w, b = torch.ones(C, requires_grad=True), torch.zeros(C, requires_grad=True)
        fn(xx, None, None, w, b, training=True).sum().backward()
        grads.append((xx.grad.shape, w.grad, b.grad))
    assert grads[0][0] == grads[1][0]
    assert torch.equal(grads[0][1], grads[1][1]) and torch.equal(grads[0][2], grads[1][2])


def test_direct_operator_calls_check_their_arguments():
    ops = batchnorm_ext.ops
    with pytest.raises(RuntimeError, match="weight should contain"):
        ops.batch_norm_forward(torch.randn(4, 3), torch.ones(5), None, None, None, True, 1e-5)
    with pytest.raises(RuntimeError, match="must be defined in evaluation mode"):
        ops.batch_norm_forward(torch.randn(4, 3), None, None, None, None, False, 1e-5)
    out, mean, var = ops.batch_norm_forward(torch.randn(4, 3), None, None, None, None, True, 1e-5)
    with pytest.raises(RuntimeError, match="grad_output of size"):
        ops.batch_norm_backward(torch.randn(4, 2), torch.randn(4, 3), None, None, None, mean, var,
                                True, 1e-5, [True, True, True])
    with pytest.raises(RuntimeError, match="batch statistics"):
        ops.batch_norm_backward(out, torch.randn(4, 3), None, None, None, mean[:2], var, True,
                                1e-5, [True, True, True])
    with pytest.raises(RuntimeError, match="needs num_batches_tracked"):
        ops.update_running_stats_(torch.zeros(3), torch.ones(3), mean, var, 4, None, None)
    with pytest.raises(ValueError, match="CPU capability"):
        batchnorm_ext.set_cpu_capability("SSE9")

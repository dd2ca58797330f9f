"""The fake kernels (batchnorm_ext/_ops.py) re-implement the argument checks of the CPU
operators (csrc/batch_norm_cpu.cpp, csrc/autograd.cpp) for torch.compile, torch.export and
the meta device.  For every operator and every bad call below: the real operator on CPU
tensors and the fake kernel (under FakeTensorMode, and on the meta device) raise the same
exception type with the same message, or both accept the call."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_map

import batchnorm_ext

ops = batchnorm_ext.ops
C = 3
f64 = torch.float64


def x(dtype=torch.float32, shape=(4, C, 2, 2)):
    return torch.randn(shape).to(dtype)


def ones(n=C, dtype=torch.float32, **kw):
    return torch.ones(n, dtype=dtype, **kw)


def stats64(n=C):
    """Batch statistics as batch_norm_forward returns them: float64, one per channel."""
    return torch.zeros(n, dtype=f64), torch.ones(n, dtype=f64)


MASK = [True, True, True]

# (operator, case, arguments).  Bad in one way each, in every check of check_inputs and of
# each operator's own checks, plus a few good calls (which both must accept).
CASES = [
    # batch_norm_forward(input, weight, bias, running_mean, running_var, training, eps)
    ("batch_norm_forward", "ok, eval", lambda: (x(), ones(), ones(), ones(), ones(), False, 1e-5)),
    ("batch_norm_forward", "weight wrong size", lambda: (x(), ones(4), None, None, None, True, 1e-5)),
    ("batch_norm_forward", "bias wrong size", lambda: (x(), None, ones(2), None, None, True, 1e-5)),
    ("batch_norm_forward", "running_mean wrong size", lambda: (x(), None, None, ones(4), ones(), True, 1e-5)),
    ("batch_norm_forward", "running_var wrong size", lambda: (x(), None, None, ones(), ones(4), False, 1e-5)),
    ("batch_norm_forward", "weight 0-d", lambda: (x(), torch.tensor(1.0), None, None, None, True, 1e-5)),
    ("batch_norm_forward", "weight on meta", lambda: (x(), ones(device="meta"), None, None, None, True, 1e-5)),
    ("batch_norm_forward", "running_var on meta", lambda: (x(), None, None, ones(), ones(device="meta"), False, 1e-5)),
    ("batch_norm_forward", "eval without running_mean", lambda: (x(), None, None, None, ones(), False, 1e-5)),
    ("batch_norm_forward", "eval without running_var", lambda: (x(), None, None, ones(), None, False, 1e-5)),
    ("batch_norm_forward", "training with only running_mean", lambda: (x(), None, None, ones(), None, True, 1e-5)),
    ("batch_norm_forward", "int64 input", lambda: (x(torch.int64), None, None, None, None, True, 1e-5)),
    ("batch_norm_forward", "uint8 input", lambda: (x(torch.uint8), None, None, None, None, True, 1e-5)),
    ("batch_norm_forward", "bool input", lambda: (x(torch.bool), None, None, None, None, True, 1e-5)),
    ("batch_norm_forward", "complex input", lambda: (x(torch.complex64), None, None, None, None, True, 1e-5)),
    ("batch_norm_forward", "float64 input, float32 weight", lambda: (x(f64), ones(), None, None, None, True, 1e-5)),
    ("batch_norm_forward", "float32 input, float64 stats", lambda: (x(), None, None, ones(dtype=f64), ones(dtype=f64), True, 1e-5)),
    ("batch_norm_forward", "float32 input, int64 stats", lambda: (x(), None, None, ones(dtype=torch.int64), ones(dtype=torch.int64), False, 1e-5)),
    ("batch_norm_forward", "float32 input, float64 running_var", lambda: (x(), None, None, ones(), ones(dtype=f64), False, 1e-5)),
    ("batch_norm_forward", "bf16 input, fp16 weight", lambda: (x(torch.bfloat16), ones(dtype=torch.float16), None, None, None, True, 1e-5)),
    ("batch_norm_forward", "bf16 input, bf16 weight, float32 stats", lambda: (x(torch.bfloat16), ones(dtype=torch.bfloat16), None, ones(), ones(), False, 1e-5)),
    ("batch_norm_forward", "half input, float64 weight", lambda: (x(torch.float16), ones(dtype=f64), None, None, None, True, 1e-5)),
    ("batch_norm_forward", "running stats 2-D", lambda: (x(), None, None, torch.zeros(1, C), torch.ones(1, C), False, 1e-5)),
    ("batch_norm_forward", "running_var 2-D", lambda: (x(), None, None, ones(), torch.ones(1, C), True, 1e-5)),
    ("batch_norm_forward", "1-D input", lambda: (torch.randn(C), None, None, None, None, True, 1e-5)),
    ("batch_norm_forward", "0-D input", lambda: (torch.tensor(1.0), None, None, None, None, True, 1e-5)),
    ("batch_norm_forward", "1-D input with a weight", lambda: (torch.randn(C), ones(), None, None, None, True, 1e-5)),
    ("batch_norm_forward", "1-D int64 input", lambda: (torch.ones(C, dtype=torch.int64), None, None, None, None, True, 1e-5)),
    # batch_norm_backward(grad_output, input, weight, running_mean, running_var, save_mean,
    #                     save_var, training, eps, output_mask, param_dtype=None)
    ("batch_norm_backward", "ok, train", lambda: (x(), x(), ones(), None, None, *stats64(), True, 1e-5, MASK)),
    ("batch_norm_backward", "ok, bf16 input with a float32 bias only", lambda: (x(torch.bfloat16), x(torch.bfloat16), None, None, None, *stats64(), True, 1e-5, MASK, torch.float32)),
    ("batch_norm_backward", "weight wrong size", lambda: (x(), x(), ones(4), None, None, *stats64(), True, 1e-5, MASK)),
    ("batch_norm_backward", "eval without running stats", lambda: (x(), x(), None, None, None, *stats64(), False, 1e-5, MASK)),
    ("batch_norm_backward", "int64 input", lambda: (x(torch.int64), x(torch.int64), None, None, None, *stats64(), True, 1e-5, MASK)),
    ("batch_norm_backward", "float32 input, float64 weight", lambda: (x(), x(), ones(dtype=f64), None, None, *stats64(), True, 1e-5, MASK)),
    ("batch_norm_backward", "grad_output wrong size", lambda: (x(shape=(4, C)), x(), None, None, None, *stats64(), True, 1e-5, MASK)),
    ("batch_norm_backward", "grad_output wrong dtype", lambda: (x(f64), x(), None, None, None, *stats64(), True, 1e-5, MASK)),
    ("batch_norm_backward", "save_mean wrong size", lambda: (x(), x(), None, None, None, torch.zeros(2, dtype=f64), torch.ones(C, dtype=f64), True, 1e-5, MASK)),
    ("batch_norm_backward", "save_var float32", lambda: (x(), x(), None, None, None, torch.zeros(C, dtype=f64), ones(), True, 1e-5, MASK)),
    ("batch_norm_backward", "param_dtype float64 for bf16 input", lambda: (x(torch.bfloat16), x(torch.bfloat16), None, None, None, *stats64(), True, 1e-5, MASK, f64)),
    ("batch_norm_backward", "param_dtype float32 against a bf16 weight", lambda: (x(torch.bfloat16), x(torch.bfloat16), ones(dtype=torch.bfloat16), None, None, *stats64(), True, 1e-5, MASK, torch.float32)),
    ("batch_norm_backward", "param_dtype float32 for float64 input", lambda: (x(f64), x(f64), None, None, None, *stats64(), True, 1e-5, MASK, torch.float32)),
    ("batch_norm_backward", "param_dtype given, weight wrong size", lambda: (x(), x(), ones(4), None, None, *stats64(), True, 1e-5, MASK, torch.float32)),
    ("batch_norm_backward", "param_dtype given, int64 input", lambda: (x(torch.int64), x(torch.int64), None, None, None, *stats64(), True, 1e-5, MASK, torch.float32)),
    # update_running_stats_(running_mean, running_var, batch_mean, batch_var, count, momentum,
    #                       num_batches_tracked)
    ("update_running_stats_", "ok", lambda: (torch.zeros(C), ones(), *stats64(), 10, 0.1, None)),
    ("update_running_stats_", "momentum None without num_batches_tracked", lambda: (torch.zeros(C), ones(), *stats64(), 10, None, None)),
    ("update_running_stats_", "running_mean wrong size", lambda: (torch.zeros(4), ones(), *stats64(), 10, 0.1, None)),
    ("update_running_stats_", "running stats of two dtypes", lambda: (torch.zeros(C), ones(dtype=f64), *stats64(), 10, 0.1, None)),
    ("update_running_stats_", "batch statistics float32", lambda: (torch.zeros(C), ones(), torch.zeros(C), ones(), 10, 0.1, None)),
    ("update_running_stats_", "int64 running stats", lambda: (torch.zeros(C, dtype=torch.int64), ones(dtype=torch.int64), *stats64(), 10, 0.1, None)),
    # batch_norm_stats(input)
    ("batch_norm_stats", "ok", lambda: (x(),)),
    ("batch_norm_stats", "int64 input", lambda: (x(torch.int64),)),
    ("batch_norm_stats", "1-D input", lambda: (torch.randn(C),)),
    # batch_norm_apply(input, weight, bias, mean, var, eps)
    ("batch_norm_apply", "ok", lambda: (x(), ones(), ones(), *stats64(), 1e-5)),
    ("batch_norm_apply", "weight wrong size", lambda: (x(), ones(4), None, *stats64(), 1e-5)),
    ("batch_norm_apply", "bias float64", lambda: (x(), None, ones(dtype=f64), *stats64(), 1e-5)),
    ("batch_norm_apply", "mean wrong size", lambda: (x(), None, None, *stats64(4), 1e-5)),
    ("batch_norm_apply", "mean float32", lambda: (x(), None, None, torch.zeros(C), torch.ones(C, dtype=f64), 1e-5)),
    ("batch_norm_apply", "int64 input", lambda: (x(torch.int64), None, None, *stats64(), 1e-5)),
    # batch_norm_backward_reduce(grad_output, input, mean, var, eps)
    ("batch_norm_backward_reduce", "ok", lambda: (x(), x(), *stats64(), 1e-5)),
    ("batch_norm_backward_reduce", "var wrong size", lambda: (x(), x(), torch.zeros(C, dtype=f64), torch.ones(2, dtype=f64), 1e-5)),
    ("batch_norm_backward_reduce", "grad_output wrong size", lambda: (x(shape=(2, C, 2, 2)), x(), *stats64(), 1e-5)),
    ("batch_norm_backward_reduce", "grad_output wrong dtype", lambda: (x(torch.bfloat16), x(), *stats64(), 1e-5)),
    ("batch_norm_backward_reduce", "complex input", lambda: (x(torch.complex64), x(torch.complex64), *stats64(), 1e-5)),
    # batch_norm_backward_apply(grad_output, input, weight, mean, var, sums, count, eps)
    ("batch_norm_backward_apply", "ok", lambda: (x(), x(), ones(), *stats64(), torch.zeros(2, C, dtype=f64), 16, 1e-5)),
    ("batch_norm_backward_apply", "weight wrong size", lambda: (x(), x(), ones(5), *stats64(), torch.zeros(2, C, dtype=f64), 16, 1e-5)),
    ("batch_norm_backward_apply", "mean float32", lambda: (x(), x(), None, torch.zeros(C), torch.ones(C, dtype=f64), torch.zeros(2, C, dtype=f64), 16, 1e-5)),
    ("batch_norm_backward_apply", "sums wrong size", lambda: (x(), x(), None, *stats64(), torch.zeros(C, dtype=f64), 16, 1e-5)),
    ("batch_norm_backward_apply", "sums float32", lambda: (x(), x(), None, *stats64(), torch.zeros(2, C), 16, 1e-5)),
    ("batch_norm_backward_apply", "grad_output wrong dtype", lambda: (x(f64), x(), None, *stats64(), torch.zeros(2, C, dtype=f64), 16, 1e-5)),
    # batch_norm_act_forward(input, weight, bias, running_mean, running_var, training, eps,
    #                        residual, activation)
    ("batch_norm_act_forward", "ok, relu with a residual", lambda: (x(), ones(), ones(), None, None, True, 1e-5, x(), "relu")),
    ("batch_norm_act_forward", "ok, silu in eval", lambda: (x(), ones(), ones(), ones(), ones(), False, 1e-5, None, "silu")),
    ("batch_norm_act_forward", "unknown activation", lambda: (x(), None, None, None, None, True, 1e-5, None, "gelu")),
    ("batch_norm_act_forward", "unknown activation and weight wrong size", lambda: (x(), ones(4), None, None, None, True, 1e-5, None, "tanh")),
    ("batch_norm_act_forward", "weight wrong size", lambda: (x(), ones(4), None, None, None, True, 1e-5, None, "relu")),
    ("batch_norm_act_forward", "residual wrong size", lambda: (x(), None, None, None, None, True, 1e-5, x(shape=(4, C)), "relu")),
    ("batch_norm_act_forward", "residual wrong dtype", lambda: (x(), None, None, None, None, True, 1e-5, x(f64), "identity")),
    ("batch_norm_act_forward", "residual on meta", lambda: (x(), None, None, None, None, True, 1e-5, torch.ones(4, C, 2, 2, device="meta"), "relu")),
    ("batch_norm_act_forward", "int64 input and residual", lambda: (x(torch.int64), None, None, None, None, True, 1e-5, x(torch.int64), "relu")),
    # batch_norm_act_backward(grad_output, output, input, weight, bias, running_mean,
    #     running_var, save_mean, save_var, training, eps, residual, has_residual, activation,
    #     output_mask, param_dtype=None)
    ("batch_norm_act_backward", "ok, relu with a residual", lambda: (x(), x(), x(), ones(), ones(), None, None, *stats64(), True, 1e-5, None, True, "relu", MASK + [True])),
    ("batch_norm_act_backward", "ok, silu with a residual in eval", lambda: (x(), None, x(), ones(), ones(), ones(), ones(), *stats64(), False, 1e-5, x(), True, "silu", MASK + [True])),
    ("batch_norm_act_backward", "unknown activation", lambda: (x(), x(), x(), None, None, None, None, *stats64(), True, 1e-5, None, False, "gelu", MASK + [False])),
    ("batch_norm_act_backward", "relu without the output", lambda: (x(), None, x(), None, None, None, None, *stats64(), True, 1e-5, None, False, "relu", MASK + [False])),
    ("batch_norm_act_backward", "silu with a residual not given", lambda: (x(), None, x(), None, None, None, None, *stats64(), True, 1e-5, None, True, "silu", MASK + [True])),
    ("batch_norm_act_backward", "output wrong size", lambda: (x(), x(shape=(2, C, 2, 2)), x(), None, None, None, None, *stats64(), True, 1e-5, None, False, "relu", MASK + [False])),
    ("batch_norm_act_backward", "residual wrong dtype", lambda: (x(), None, x(), None, None, None, None, *stats64(), True, 1e-5, x(f64), True, "silu", MASK + [True])),
    ("batch_norm_act_backward", "silu bias wrong size", lambda: (x(), None, x(), None, ones(4), None, None, *stats64(), True, 1e-5, None, False, "silu", MASK + [False])),
    ("batch_norm_act_backward", "grad_output wrong dtype", lambda: (x(f64), x(), x(), None, None, None, None, *stats64(), True, 1e-5, None, False, "relu", MASK + [False])),
    ("batch_norm_act_backward", "save_var float32", lambda: (x(), x(), x(), None, None, None, None, torch.zeros(C, dtype=f64), ones(), True, 1e-5, None, False, "relu", MASK + [False])),
    ("batch_norm_act_backward", "param_dtype float64 for bf16 input", lambda: (x(torch.bfloat16), x(torch.bfloat16), x(torch.bfloat16), None, None, None, None, *stats64(), True, 1e-5, None, False, "relu", MASK + [False], f64)),
    # batch_norm_act(input, weight, bias, running_mean, running_var, training, momentum, eps,
    #                num_batches_tracked, residual, activation): the composite
    ("batch_norm_act", "ok, relu with a residual", lambda: (x(), None, None, torch.zeros(C), ones(), True, 0.1, 1e-5, None, x(), "relu")),
    ("batch_norm_act", "eps zero in training", lambda: (x(), None, None, None, None, True, 0.1, 0.0, None, None, "relu")),
    ("batch_norm_act", "unknown activation", lambda: (x(), None, None, None, None, True, 0.1, 1e-5, None, None, "gelu")),
    ("batch_norm_act", "residual wrong size", lambda: (x(), None, None, None, None, False, 0.1, 1e-5, None, x(shape=(4, C)), "relu")),
    # batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps,
    #            num_batches_tracked): the composite (its checks are C++ either way; the
    #            operators it calls run their fake kernels)
    ("batch_norm", "ok, momentum None", lambda: (x(), None, None, torch.zeros(C), ones(), True, None, 1e-5, torch.tensor(2))),
    ("batch_norm", "one value per channel", lambda: (x(shape=(1, C)), None, None, None, None, True, 0.1, 1e-5, None)),
    ("batch_norm", "eps zero in training", lambda: (x(), None, None, None, None, True, 0.1, 0.0, None)),
    ("batch_norm", "eps negative in eval", lambda: (x(), None, None, ones(), ones(), False, 0.1, -1.0, None)),
    ("batch_norm", "weight wrong size", lambda: (x(), ones(4), None, None, None, True, 0.1, 1e-5, None)),
    ("batch_norm", "momentum None without num_batches_tracked", lambda: (x(), None, None, torch.zeros(C), ones(), True, None, 1e-5, None)),
    ("batch_norm", "running stats require grad", lambda: (x(), None, None, torch.zeros(C, requires_grad=True), ones(), True, 0.1, 1e-5, None)),
]

# Where the fake kernel does not check what the operator checks (bugs in
# batchnorm_ext/_ops.py): the real operator raises, the fake one accepts the call.  None
# known: each of the cases above once was one, and is now checked alike.
FAKE_MISSES = {}

# Cases the meta device cannot express: every tensor there is on meta.
NOT_ON_META = {"weight on meta", "running_var on meta", "residual on meta"}


def outcome(op, args):
    try:
        op(*args)
        return None, ""
    except Exception as e:  # noqa: BLE001 - compared below
        return type(e), str(e)


def params(mode):
    for op, case, make_args in CASES:
        if mode == "meta" and case in NOT_ON_META:
            continue
        marks = []
        if (op, case) in FAKE_MISSES:
            marks.append(pytest.mark.xfail(strict=True, reason="bug (batchnorm_ext/_ops.py): "
                                                               + FAKE_MISSES[(op, case)]))
        yield pytest.param(op, make_args, id=f"{op}: {case}", marks=marks)


def check(op_name, make_args, run_fake):
    op = getattr(ops, op_name).default
    torch.manual_seed(0)
    real = outcome(op, make_args())
    torch.manual_seed(0)
    fake = run_fake(op, make_args())
    assert fake == real, f"fake: {fake}\nreal: {real}"


@pytest.mark.parametrize("op_name,make_args", list(params("fake")))
def test_fake_kernel_under_fake_tensor_mode_checks_as_the_operator(op_name, make_args):
    def run_fake(op, args):
        with FakeTensorMode() as mode:
            return outcome(op, tree_map(lambda a: mode.from_tensor(a) if isinstance(a, torch.Tensor)
                                        else a, args))
    check(op_name, make_args, run_fake)


@pytest.mark.parametrize("op_name,make_args", list(params("meta")))
def test_fake_kernel_on_meta_device_checks_as_the_operator(op_name, make_args):
    def run_fake(op, args):
        return outcome(op, tree_map(lambda a: a.detach().to("meta").requires_grad_(a.requires_grad)
                                    if isinstance(a, torch.Tensor) else a, args))
    check(op_name, make_args, run_fake)


def test_every_operator_has_cases():
    """Every operator of the library is covered, each with good and bad calls."""
    names = {n for n in dir(ops) if isinstance(getattr(ops, n), torch._ops.OpOverloadPacket)}
    covered = {op for op, _, _ in CASES}
    assert names == covered, names ^ covered
    for name in names:
        cases = [case for op, case, _ in CASES if op == name]
        assert any(c.startswith("ok") for c in cases) and len(cases) >= 3, name

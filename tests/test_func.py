"""torch.func: vmap, grad, vjp, jvp, jacrev, jacfwd, hessian and functional_call (per-sample
gradients, model ensembles), on the functional, the modules and the operators, each against
native batch norm under the same transform (values, running statistics and exceptions), or a
float64 oracle where native's own second derivatives are wrong; and the vmap rule of every
operator against a loop over the slices."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import (functional_call, grad, hessian, jacfwd, jacrev, jvp, stack_module_state,
                        vjp, vmap)
from torch.autograd import gradcheck, gradgradcheck
from torch.utils._pytree import tree_leaves

import batchnorm_ext
from batchnorm_ext._vmap import ITEM_UNDER_VMAP, RUNNING_STATS_NOT_BATCHED
from helpers import assert_close, make_input
from test_errors import CASES as ERROR_CASES, DIFFERENT_ON_PURPOSE, call as call_with

ops = batchnorm_ext.ops
D = torch.float64
B = 3  # the vmapped size


def _stack(t, dim=0):
    """B different versions of t stacked at `dim`: slices that share nothing."""
    return torch.stack([t * (1 + 0.5 * i) + i for i in range(B)], dim)


def _scalar(y):
    """A scalar of y whose gradient is not trivial (the sum of a batch norm's output is
    constant in its input in training)."""
    return (y.sin() * torch.linspace(0.5, 1.5, y.numel(), dtype=y.dtype).reshape(y.shape)).sum()


def _like(t, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t.shape, dtype=t.dtype, generator=g)


# First-order transforms of f(x, weight, bias) -> output; each returns a pytree of tensors.
FIRST_ORDER = {
    "vmap(input)": lambda f, x, w, b: vmap(f, (0, None, None))(_stack(x), w, b),
    "vmap(input at dim 2)": lambda f, x, w, b: vmap(f, (2, None, None))(_stack(x, 2), w, b),
    "vmap(weight, bias)": lambda f, x, w, b: vmap(f, (None, 0, 0))(x, _stack(w), _stack(b)),
    "vmap(all)": lambda f, x, w, b: vmap(f, (1, 0, 0))(_stack(x, 1), _stack(w), _stack(b)),
    "vmap(vmap)": lambda f, x, w, b: vmap(vmap(f, (0, None, None)), (1, None, 0))(
        _stack(_stack(x), 1), w, _stack(b)),
    "grad": lambda f, x, w, b: grad(lambda *a: _scalar(f(*a)), (0, 1, 2))(x, w, b),
    "vjp": lambda f, x, w, b: vjp(f, x, w, b)[1](_like(x, 1)),
    "jvp": lambda f, x, w, b: jvp(f, (x, w, b), (_like(x, 2), _like(w, 3), _like(b, 4))),
    "jacrev": lambda f, x, w, b: jacrev(f, (0, 1, 2))(x, w, b),
    "jacfwd": lambda f, x, w, b: jacfwd(f, (0, 1, 2))(x, w, b),
    "vmap(grad)": lambda f, x, w, b: vmap(grad(lambda *a: _scalar(f(*a)), (0, 1, 2)),
                                          (0, None, None))(_stack(x), w, b),
    "grad(vmap)": lambda f, x, w, b: grad(lambda *a: _scalar(vmap(f, (0, None, None))(*a)),
                                          (0, 1, 2))(_stack(x), w, b),
    "jvp(vmap)": lambda f, x, w, b: jvp(vmap(f, (0, None, 0)), (_stack(x), w, _stack(b)),
                                        (_like(_stack(x), 2), _like(w, 3), _like(_stack(b), 4))),
}

# (training, running statistics given)
MODES = {"train": (True, False), "train+stats": (True, True), "eval": (False, True)}

SHAPES = [((4, 3), "contiguous"), ((4, 3, 5), "contiguous"), ((3, 3, 2, 2), "channels_last"),
          ((2, 3, 2, 1, 2), "contiguous")]


def _outcome(thunk):
    """('ok', result) or ('raised', exception)."""
    try:
        return "ok", thunk()
    except Exception as e:  # compared with native's below
        return "raised", e


def _assert_same_outcome(ours, native, dtype=D):
    if native[0] == "raised":
        assert ours[0] == "raised", f"native raised {native[1]!r}, ours did not"
        assert type(ours[1]) is type(native[1]) and str(ours[1]) == str(native[1]), (ours[1], native[1])
        return
    assert ours[0] == "ok", f"ours raised {ours[1]!r}, native did not"
    ours_leaves, native_leaves = tree_leaves(ours[1]), tree_leaves(native[1])
    assert len(ours_leaves) == len(native_leaves)
    for a, n in zip(ours_leaves, native_leaves):
        assert a.shape == n.shape
        assert_close(a, n, dtype)


# BatchNorm class for an input rank: ours and native's
MODULES = {2: (batchnorm_ext.BatchNorm1d, torch.nn.BatchNorm1d),
           3: (batchnorm_ext.BatchNorm1d, torch.nn.BatchNorm1d),
           4: (batchnorm_ext.BatchNorm2d, torch.nn.BatchNorm2d),
           5: (batchnorm_ext.BatchNorm3d, torch.nn.BatchNorm3d)}


def _pair(shape, layout, mode, surface="functional", dtype=D):
    """(x, weight, bias); ours and native's f(x, weight, bias), each with its own running
    statistics (returned too, to compare their updates): the functional, or a module through
    functional_call (its buffers captured); and the running statistics they started from."""
    training, with_stats = MODES[mode]
    c = shape[1]
    x = make_input(shape, dtype, layout, scale=2, offset=1)
    w, b = torch.rand(c, dtype=dtype) + 0.5, torch.randn(c, dtype=dtype)
    stats = (torch.randn(c, dtype=dtype), torch.rand(c, dtype=dtype) + 0.5) if with_stats else None

    def functional(impl):
        running = tuple(s.clone() for s in stats) if stats else (None, None)
        return (lambda x, w, b: impl(x, *running, w, b, training=training)), running

    def module(cls):
        m = cls(c, track_running_stats=with_stats, dtype=dtype).train(training)
        if with_stats:
            with torch.no_grad():
                m.running_mean.copy_(stats[0])
                m.running_var.copy_(stats[1])
        return (lambda x, w, b: functional_call(m, {"weight": w, "bias": b}, (x,))), tuple(m.buffers())

    make = functional if surface == "functional" else module
    impls = (batchnorm_ext.batch_norm, F.batch_norm) if surface == "functional" else MODULES[len(shape)]
    return (x, w, b), make(impls[0]), make(impls[1]), stats


@pytest.mark.parametrize("surface", ["functional", "module"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("shape,layout", SHAPES, ids=str)
@pytest.mark.parametrize("transform", list(FIRST_ORDER))
def test_matches_native(transform, shape, layout, mode, surface):
    """Values, running statistics (and num_batches_tracked), and the exception when native
    raises one: a vmapped input in training with running statistics that are not vmapped;
    for a module whose buffers the function captures, num_batches_tracked.add_(1) under a
    grad transform (an in-place change of a captured tensor)."""
    args, (ours, ours_running), (native, native_running), _ = _pair(shape, layout, mode, surface)
    t = FIRST_ORDER[transform]
    _assert_same_outcome(_outcome(lambda: t(ours, *args)), _outcome(lambda: t(native, *args)))
    assert len(ours_running) == len(native_running)
    for a, n in zip(ours_running, native_running):
        if n is not None:
            assert_close(a, n)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype,transform", [
    (torch.float32, "vmap(input)"), (torch.float32, "vmap(all)"), (torch.float32, "vmap(grad)"),
    (torch.float32, "jacrev"), (torch.float32, "jacfwd"),
    # bfloat16 values only: native keeps its statistics in bfloat16 and ours in float32, which
    # gradients amplify far beyond an ulp (test_autograd compares those with a float64 oracle)
    (torch.bfloat16, "vmap(input)"), (torch.bfloat16, "vmap(all)")], ids=str)
def test_functional_reduced_precision_matches_native(dtype, transform, mode):
    args, (ours, _), (native, _), _ = _pair((4, 3, 3, 2), "channels_last", mode, dtype=dtype)
    t = FIRST_ORDER[transform]
    _assert_same_outcome(_outcome(lambda: t(ours, *args)), _outcome(lambda: t(native, *args)),
                         dtype)


# Second order: transforms of a scalar function of (x, weight, bias).
SECOND_ORDER = {
    "hessian": lambda s, *a: hessian(s, (0, 1, 2))(*a),
    "jacrev(jacrev)": lambda s, *a: jacrev(jacrev(s, (0, 1, 2)), (0, 1, 2))(*a),
    "jacfwd(jacfwd)": lambda s, *a: jacfwd(jacfwd(s, (0, 1, 2)), (0, 1, 2))(*a),
    "jacrev(jacfwd)": lambda s, *a: jacrev(jacfwd(s, (0, 1, 2)), (0, 1, 2))(*a),
    "grad(grad)": lambda s, *a: grad(lambda *a: grad(s, (0, 1, 2))(*a)[1].square().sum(),
                                     (0, 1, 2))(*a),
    "vmap(hessian)": lambda s, x, w, b: vmap(hessian(s, (0, 1, 2)), (0, None, None))(_stack(x), w, b),
}


def _oracle(running, training, eps=1e-5):
    """Batch norm written with ATen operations in float64, for autograd to differentiate."""
    def f(x, w, b, *_):
        shape = [1, -1] + [1] * (x.dim() - 2)
        dims = [0] + list(range(2, x.dim()))
        if training:
            mean = x.mean(dims, keepdim=True)
            var = (x - mean).square().mean(dims, keepdim=True)
        else:
            mean, var = running[0].reshape(shape), running[1].reshape(shape)
        return (x - mean) / (var + eps).sqrt() * w.reshape(shape) + b.reshape(shape)
    return f


@pytest.mark.parametrize("surface", ["functional", "module"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("shape,layout", [((4, 3), "contiguous"), ((3, 2, 2, 2), "channels_last")], ids=str)
@pytest.mark.parametrize("transform", list(SECOND_ORDER))
def test_second_order_matches_oracle(transform, shape, layout, mode, surface):
    """Against the float64 oracle.  Native's own, under these transforms, are wrong in
    training (the (weight, input) block; the (input, input) one too with forward mode) while
    plain torch.autograd gets them right, so native is the reference in eval only."""
    (x, w, b), (ours, _), (native, _), running = _pair(shape, layout, mode, surface)
    t = SECOND_ORDER[transform]
    result = t(lambda *a: _scalar(ours(*a)), x, w, b)
    oracle = t(lambda *a: _scalar(_oracle(running, mode == "train")(*a)), x, w, b)
    for a, o in zip(tree_leaves(result), tree_leaves(oracle)):
        assert_close(a, o)
    if mode == "eval":
        for a, n in zip(tree_leaves(result), tree_leaves(t(lambda *a: _scalar(native(*a)), x, w, b))):
            assert_close(a, n)


# ----------------------------------------------------------------------------------------
# Modules: functional_call, per-sample gradients, model ensembles.

def _cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 6), torch.nn.BatchNorm1d(6),
        torch.nn.Linear(6, 2))


def _converted(native):
    return batchnorm_ext.convert_model(copy.deepcopy(native))


def _per_sample_grads(model, x, target):
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(params, buffers, sample, t):  # each sample as a batch of two (training needs two values)
        batch = sample.unsqueeze(0).expand(2, *sample.shape) * torch.tensor([1.0, -0.5]).reshape(2, 1, 1, 1)
        return F.cross_entropy(functional_call(model, (params, buffers), (batch,)), t.expand(2))

    return vmap(grad(loss), (None, None, 0, 0))(params, buffers, x, target)


@pytest.mark.parametrize("mode", ["eval", "train", "train, no running stats"])
def test_per_sample_gradients_match_native(mode):
    torch.manual_seed(0)
    native = _cnn()
    if mode == "train, no running stats":
        for m in native.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.track_running_stats = False
                m.running_mean = m.running_var = m.num_batches_tracked = None
    native.train(mode != "eval")
    ours = _converted(native)
    x, target = torch.randn(5, 3, 4, 4), torch.randint(0, 2, (5,))
    ours_outcome = _outcome(lambda: _per_sample_grads(ours, x, target))
    native_outcome = _outcome(lambda: _per_sample_grads(native, x, target))
    _assert_same_outcome(ours_outcome, native_outcome, torch.float32)
    # In training with running statistics, native refuses: they would be updated per sample.
    assert (native_outcome[0] == "raised") == (mode == "train")
    if mode == "train":
        assert str(native_outcome[1]) == RUNNING_STATS_NOT_BATCHED
    for (name, a), (_, n) in zip(ours.named_buffers(), native.named_buffers()):
        assert torch.equal(a, n), name


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_model_ensemble_matches_native(training):
    """stack_module_state and vmap over parameters and buffers, one input for all: the
    outputs, the gradients, and each model's running statistics."""
    torch.manual_seed(0)
    natives = [_cnn().train(training) for _ in range(3)]
    x = torch.randn(6, 3, 4, 4)
    results = []
    for models in (natives, [_converted(m) for m in natives]):
        params, buffers = stack_module_state(models)
        base = copy.deepcopy(models[0]).to("meta")

        def loss(p, b, x):
            return _scalar(functional_call(base, (p, b), (x,)))

        out = vmap(lambda p, b, x: functional_call(base, (p, b), (x,)), (0, 0, None))(params, buffers, x)
        grads = vmap(grad(loss), (0, 0, None))(params, buffers, x)
        results.append((out, grads, buffers))
    ours, native = results[1], results[0]
    assert_close(ours[0], native[0], torch.float32)
    for name in native[1]:
        assert_close(ours[1][name], native[1][name], torch.float32, msg=name)
    for name in native[2]:
        assert_close(ours[2][name], native[2][name], torch.float32, msg=name)


@pytest.mark.parametrize("buffers_as", ["arguments", "captured"])
def test_module_jacobians_match_native(buffers_as):
    """jacrev and jacfwd of a module's output in its parameters, in training: the Jacobians,
    and the running statistics updated once per call as native does.  Buffers captured by
    the function: the module's num_batches_tracked.add_(1) is an in-place change of a captured
    tensor, which the transforms refuse, for native as for ours."""
    torch.manual_seed(0)
    native = _cnn()
    ours = _converted(native)
    x = torch.randn(4, 3, 4, 4)
    for jac in (jacrev, jacfwd):
        outcomes = []
        for model in (ours, native):
            params = {k: v.detach() for k, v in model.named_parameters()}
            buffers = dict(model.named_buffers())
            if buffers_as == "arguments":
                f = jac(lambda p, b: functional_call(model, (p, b), (x,)))
                outcomes.append(_outcome(lambda: f(params, buffers)))
            else:
                f = jac(lambda p: functional_call(model, (p, buffers), (x,)))
                outcomes.append(_outcome(lambda: f(params)))
        _assert_same_outcome(*outcomes, torch.float32)
    for (name, a), (_, n) in zip(ours.named_buffers(), native.named_buffers()):
        assert_close(a, n, msg=name)


@pytest.mark.parametrize("counter", ["vmapped", "shared"])
def test_momentum_none_under_vmap_as_native(counter):
    """momentum=None (cumulative average over num_batches_tracked): native reads the counter
    with float(), which vmap refuses for a vmapped counter; a shared counter works."""
    results = []
    for cls in (batchnorm_ext.BatchNorm2d, torch.nn.BatchNorm2d):
        torch.manual_seed(0)
        module = cls(3, momentum=None)
        params = {k: v.detach() for k, v in module.named_parameters()}
        buffers = {k: v.expand(B, *v.shape).clone() for k, v in module.named_buffers()}
        counter_in_dim = 0
        if counter == "shared":
            buffers["num_batches_tracked"] = torch.tensor(4)
            counter_in_dim = None
        in_dims = ({"running_mean": 0, "running_var": 0, "num_batches_tracked": counter_in_dim}, 0)
        x = _stack(torch.randn(4, 3, 2, 2))
        outcome = _outcome(lambda: vmap(lambda b, x: functional_call(module, (params, b), (x,)),
                                        in_dims)(buffers, x))
        results.append((outcome, buffers))
    (ours, ours_buffers), (native, native_buffers) = results
    _assert_same_outcome(ours, native, torch.float32)
    if counter == "vmapped":
        assert str(native[1]) == ITEM_UNDER_VMAP
    for name in native_buffers:
        assert_close(ours_buffers[name], native_buffers[name], msg=name)


def test_sync_batch_norm_single_process_under_transforms():
    """SyncBatchNorm with no process group is a plain batch norm: per-sample gradients in
    eval match native's BatchNorm2d."""
    torch.manual_seed(0)
    native = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        native[1].running_mean.normal_()
        native[1].running_var.uniform_(0.5, 1.5)
    ours = batchnorm_ext.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(native)).eval()
    x = torch.randn(5, 3, 4, 4)
    results = []
    for model in (ours, native):
        params = {k: v.detach() for k, v in model.named_parameters()}
        results.append(vmap(grad(lambda p, x: _scalar(functional_call(model, p, (x.unsqueeze(0),)))),
                            (None, 0))(params, x))
    for name in results[1]:
        assert_close(results[0][name], results[1][name], torch.float32, msg=name)


# ----------------------------------------------------------------------------------------
# Errors under vmap.

# Native's batching rule calls its kernel with dummy weight and bias of the input's dtype and
# applies the user's weight and bias after, so under vmap it takes parameters of a dtype it
# refuses without vmap.  Ours refuses them as native does without vmap.
NATIVE_ACCEPTS_UNDER_VMAP_ONLY = {"float32 input, bf16 weight", "bf16 input, fp16 weight"}


@pytest.mark.parametrize("vmapped_stats", [False, True], ids=["shared stats", "vmapped stats"])
@pytest.mark.parametrize("case", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_errors_under_vmap_as_native(case, vmapped_stats):
    """test_errors' bad calls, with a vmapped input: the same exception type as native under
    vmap, in native's order (its batching error comes after the sizes, before the rest)."""
    name, make_args = case

    def under_vmap(fn):
        torch.manual_seed(0)
        args = list(make_args())
        stacked = torch.stack([args[0], args[0]]) if args[0].dim() else args[0].expand(2)
        stats, in_dims = args[1:3], (0, None, None)
        if vmapped_stats:
            stats = [s if s is None else s.expand(2, *s.shape).clone() for s in stats]
            in_dims = (0,) + tuple(None if s is None else 0 for s in stats)
        return vmap(lambda x, m, v: call_with(fn, (x, m, v, *args[3:])), in_dims)(stacked, *stats)

    native = _outcome(lambda: under_vmap(F.batch_norm))
    ours = _outcome(lambda: under_vmap(batchnorm_ext.batch_norm))
    assert ours[0] == "raised", name
    if name in NATIVE_ACCEPTS_UNDER_VMAP_ONLY:
        assert native[0] == "ok"
        return
    assert native[0] == "raised"
    assert type(ours[1]) is type(native[1]), (ours[1], native[1])
    if str(native[1]) == RUNNING_STATS_NOT_BATCHED:
        assert str(ours[1]) == RUNNING_STATS_NOT_BATCHED
        return
    # as in test_errors: the same message, but for RuntimeErrors worded otherwise and the
    # cases test_errors lists as different on purpose (with our message)
    if name in DIFFERENT_ON_PURPOSE:
        assert str(ours[1]) == DIFFERENT_ON_PURPOSE[name][0]
        return
    assert str(ours[1]).split()[0] == str(native[1]).split()[0] or \
        type(native[1]) is RuntimeError, (str(ours[1]), str(native[1]))


def test_one_vmapped_running_stat_refused():
    """running_mean vmapped, running_var not, the input not: native updates each slice of
    running_mean and drops running_var's update (its batching rule writes it into a copy);
    ours refuses, with native's message for running statistics that cannot be updated."""
    x = torch.randn(4, 3, 2)
    running_mean, running_var = torch.zeros(B, 3), torch.ones(3)
    vmap(lambda m: F.batch_norm(x, m, running_var, training=True))(running_mean)
    assert torch.equal(running_var, torch.ones(3)) and not torch.equal(running_mean, torch.zeros(B, 3))
    with pytest.raises(RuntimeError) as e:
        vmap(lambda m: batchnorm_ext.batch_norm(x, m, running_var, training=True))(torch.zeros(B, 3))
    assert str(e.value) == RUNNING_STATS_NOT_BATCHED


# ----------------------------------------------------------------------------------------
# The operators' vmap rules: vmap(op) is op applied to each slice.

def _slices(args, in_dims, i):
    return [a.select(d, i) if d is not None else a for a, d in zip(args, in_dims)]


def _tensors(out):
    """An operator's result as a tuple, None (an output not asked for) as an empty tensor:
    a vmapped function returns tensors only."""
    out = out if isinstance(out, tuple) else (out,)
    return tuple(torch.empty(0) if t is None else t for t in out)


def _assert_vmap_is_loop(op, args, in_dims, mutated=(), dtype=D):
    """vmap(op, in_dims)(*args) against op on each slice, on copies of the arguments; and
    the arguments at `mutated` positions, updated in place, against the loop's."""
    loop_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    expected = [_tensors(op(*_slices(loop_args, in_dims, i))) for i in range(B)]
    result = vmap(lambda *a: _tensors(op(*a)), in_dims)(*args)
    for j, r in enumerate(result):
        assert_close(r, torch.stack([e[j] for e in expected]), dtype)
    for i in mutated:
        assert_close(args[i], loop_args[i], dtype)


def _forward_args(layout="contiguous", dtype=D, param_dtype=None):
    param_dtype = param_dtype or dtype
    x = make_input((4, 3, 2, 3), dtype, layout, scale=2, offset=1)
    w, b = torch.rand(3, dtype=param_dtype) + 0.5, torch.randn(3, dtype=param_dtype)
    rm, rv = torch.randn(3, dtype=param_dtype), torch.rand(3, dtype=param_dtype) + 0.5
    return x, w, b, rm, rv


def _batched(args, in_dims):
    """Each argument with a vmapped dimension where in_dims says: B versions stacked there."""
    return [a if d is None or a is None else _stack(a, d) for a, d in zip(args, in_dims)]


FORWARD_DIMS = [(0, None, None, None, None), (1, 0, 0, None, None), (None, 0, 0, None, None),
                (None, None, 0, None, None), (0, 0, 0, 0, 0), (2, None, None, 0, 0),
                (None, None, None, 0, 0)]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("in_dims", FORWARD_DIMS, ids=str)
def test_forward_vmap_rule(in_dims, training):
    args = _forward_args()
    if training and in_dims[0] is not None and in_dims[3] is None:
        # running statistics not vmapped with a vmapped input: native's error (they are only
        # checked in training, but the composite would update them), tested below
        in_dims = in_dims[:3] + (0, 0)
    dims = in_dims + (None, None)
    _assert_vmap_is_loop(ops.batch_norm_forward.default,
                         _batched(args, in_dims) + [training, 1e-5], dims)


@pytest.mark.parametrize("layout", ["channels_last", "permuted"])
@pytest.mark.parametrize("dtype,param_dtype", [(torch.float32, torch.float32),
                                               (torch.bfloat16, torch.float32),
                                               (torch.float16, torch.float16)])
def test_forward_vmap_rule_dtypes_and_layouts(dtype, param_dtype, layout):
    args = _forward_args(layout, dtype, param_dtype)
    for training in (True, False):
        for in_dims in [(0, None, None, 0, 0), (None, 0, 0, None, None)]:
            _assert_vmap_is_loop(ops.batch_norm_forward.default,
                                 _batched(args, in_dims) + [training, 1e-5], in_dims + (None, None),
                                 dtype=dtype)


def test_forward_vmap_rule_refuses_shared_running_stats_in_training():
    x, w, b, rm, rv = _forward_args()
    with pytest.raises(RuntimeError) as e:
        vmap(ops.batch_norm_forward.default, (0, None, None, None, None, None, None))(
            _stack(x), w, b, rm, rv, True, 1e-5)
    assert str(e.value) == RUNNING_STATS_NOT_BATCHED
    # in eval, or without running statistics, anything goes
    vmap(ops.batch_norm_forward.default, (0, None, None, None, None, None, None))(
        _stack(x), w, b, rm, rv, False, 1e-5)
    vmap(ops.batch_norm_forward.default, (0, None, None, None, None, None, None))(
        _stack(x), w, b, None, None, True, 1e-5)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("in_dims", [(0, 0, None, 0, 0, 0, 0), (0, None, None, None, None, None, None),
                                     (None, None, 0, None, None, None, None), (1, 2, 0, None, None, 0, 0)],
                         ids=str)
def test_backward_vmap_rule(in_dims, training):
    """Including the Jacobian's case, a vmapped grad_output only (jacrev)."""
    x, w, _, rm, rv = _forward_args()
    _, mean, var = ops.batch_norm_forward(x, w, None, rm, rv, training, 1e-5)
    if not training:  # the statistics are empty, and so never vmapped
        in_dims = in_dims[:5] + (None, None)
    args = _batched([_like(x, 5), x, w, rm, rv, mean, var], in_dims)
    for mask in ([True, True, True], [True, False, False], [False, True, True]):
        _assert_vmap_is_loop(ops.batch_norm_backward.default,
                             args + [training, 1e-5, mask, None], in_dims + (None,) * 4)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("in_dims", [(0, 0, 0, 0), (1, 1, 0, 0), (0, 0, None, None)], ids=str)
def test_update_running_stats_vmap_rule(in_dims, momentum):
    """In place, through the vmapped dimension wherever it is (a strided view for dim 1)."""
    running = [torch.randn(3, dtype=D), torch.rand(3, dtype=D)]
    batch = [torch.randn(3, dtype=D), torch.rand(3, dtype=D)]
    args = _batched(running + batch, in_dims) + [20, momentum, torch.tensor(4)]
    _assert_vmap_is_loop(ops.update_running_stats_.default, args, in_dims + (None, None, None),
                         mutated=(0, 1))


def test_update_running_stats_vmap_rule_errors_as_native():
    running, batch = [torch.zeros(3), torch.ones(3)], [torch.randn(B, 3, dtype=D), torch.rand(B, 3, dtype=D)]
    with pytest.raises(RuntimeError) as e:  # one tensor updated in place by every slice
        vmap(ops.update_running_stats_.default, (None, None, 0, 0, None, None, None))(
            *running, *batch, 20, 0.1, None)
    assert str(e.value) == RUNNING_STATS_NOT_BATCHED
    with pytest.raises(RuntimeError) as e:  # 1 / float(num_batches_tracked) for each slice
        vmap(ops.update_running_stats_.default, (0, 0, 0, 0, None, None, 0))(
            torch.zeros(B, 3), torch.ones(B, 3), *batch, 20, None, torch.arange(1, B + 1))
    assert str(e.value) == ITEM_UNDER_VMAP


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("in_dims", [(0, None, None, 0, 0), (1, 0, 0, 0, 0), (None, None, None, 0, 0),
                                     (None, 0, None, None, None)], ids=str)
def test_composite_vmap_rule(in_dims, training):
    """batch_norm under vmap is batch_norm on each slice, running statistics updated per
    slice, momentum=None counted on a shared counter."""
    x, w, b, rm, rv = _forward_args()
    if training and in_dims[0] is None and in_dims[3] is None:
        rm = rv = None
    args = _batched([x, w, b, rm, rv], in_dims) + [training, None, 1e-5, torch.tensor(3)]
    _assert_vmap_is_loop(ops.batch_norm.default, args, in_dims + (None,) * 4,
                         mutated=(3, 4) if rm is not None else ())


def test_sync_steps_vmap_rules():
    x, w, b, _, _ = _forward_args(dtype=torch.float32)
    dy = _like(x, 6).float()
    mean, var = ops.batch_norm_stats(x)
    sums = ops.batch_norm_backward_reduce(dy, x, mean, var, 1e-5)
    xs, dys = _stack(x), _stack(dy)
    means, vars_ = (torch.stack(t) for t in zip(*[ops.batch_norm_stats(s) for s in xs]))
    sums_b = torch.stack([ops.batch_norm_backward_reduce(d, s, m, v, 1e-5)
                          for d, s, m, v in zip(dys, xs, means, vars_)])
    f32 = torch.float32
    _assert_vmap_is_loop(ops.batch_norm_stats.default, [xs], (0,), dtype=f32)
    _assert_vmap_is_loop(ops.batch_norm_stats.default, [xs.movedim(0, 2)], (2,), dtype=f32)
    for dims, args in [((0, None, None, 0, 0), [xs, w, b, means, vars_]),
                       ((None, 0, 0, None, None), [x, _stack(w), _stack(b), mean, var])]:
        _assert_vmap_is_loop(ops.batch_norm_apply.default, args + [1e-5], dims + (None,), dtype=f32)
    _assert_vmap_is_loop(ops.batch_norm_backward_reduce.default, [dys, xs, means, vars_, 1e-5],
                         (0, 0, 0, 0, None), dtype=f32)
    _assert_vmap_is_loop(ops.batch_norm_backward_reduce.default, [dys, x, mean, var, 1e-5],
                         (0, None, None, None, None), dtype=f32)
    for dims, args in [((0, 0, None, 0, 0, 0), [dys, xs, w, means, vars_, sums_b]),
                       ((0, None, 0, None, None, None), [dys, x, _stack(w), mean, var, sums])]:
        _assert_vmap_is_loop(ops.batch_norm_backward_apply.default, args + [96, 1e-5],
                             dims + (None, None), dtype=f32)


# ----------------------------------------------------------------------------------------
# The operator's own autograd, and which path a call takes.

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_operator_under_transforms_matches_native(training):
    """batch_norm_forward itself (no composite): grad, jvp, jacrev, jacfwd and vmap of its
    output against F.batch_norm (which, without running statistics in training, updates
    nothing either)."""
    x, w, b, rm, rv = _forward_args()
    stats = (None, None) if training else (rm, rv)

    def ours(x, w, b):
        return ops.batch_norm_forward(x, w, b, *stats, training, 1e-5)[0]

    def native(x, w, b):
        return F.batch_norm(x, *stats, w, b, training=training)

    for name in ["vmap(all)", "grad", "vjp", "jvp", "jacrev", "jacfwd", "vmap(grad)", "grad(vmap)",
                 "jvp(vmap)"]:
        t = FIRST_ORDER[name]
        _assert_same_outcome(_outcome(lambda: t(ours, x, w, b)), _outcome(lambda: t(native, x, w, b)))


def test_eager_calls_take_the_cpp_node_and_transforms_the_python_one():
    """The eager fast path (no transform, no tangent) attaches a C++ autograd node, about
    10 us per call cheaper; the operator itself, transforms and dual tensors, the Python
    autograd Function."""
    import torch.autograd.forward_ad as fwAD
    x = torch.randn(4, 3, requires_grad=True)
    cpp = "BatchNormBackward (batchnorm_ext)"
    assert batchnorm_ext.batch_norm(x, None, None, training=True).grad_fn.name() == cpp
    assert batchnorm_ext.BatchNorm1d(3)(x).grad_fn.name() == cpp
    python = "_BatchNormFunctionBackward"
    assert ops.batch_norm_forward(x, None, None, None, None, True, 1e-5)[0].grad_fn.name() == python
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        assert batchnorm_ext.batch_norm(dual, None, None, training=True).grad_fn.name() == python
    # what the C++ composite tests to leave the fast path: set exactly while a transform runs
    def transform_active():
        return torch._C._dispatch_tls_is_dispatch_key_included(
            torch._C.DispatchKey.FuncTorchDynamicLayerFrontMode)

    seen = []

    def f(x):
        seen.append(transform_active())
        return batchnorm_ext.batch_norm(x, None, None, training=True).sin().sum()

    grad(f)(x.detach())
    vmap(f)(torch.randn(2, 4, 3))
    assert seen == [True, True] and not transform_active()


def test_tangent_of_running_stats_ignored_as_by_native():
    import torch.autograd.forward_ad as fwAD
    x = torch.randn(4, 3, 2, dtype=D)
    for impl in (batchnorm_ext.batch_norm, F.batch_norm):
        with fwAD.dual_level():
            y = impl(x, fwAD.make_dual(torch.zeros(3, dtype=D), torch.ones(3, dtype=D)),
                     torch.ones(3, dtype=D), training=False)
            assert fwAD.unpack_dual(y).tangent is None, impl


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("surface", ["operator", "functional"])
def test_gradcheck_batched(surface, training):
    """gradcheck and gradgradcheck with their vmap checks: the backward vmapped over
    grad_outputs (check_batched_grad) and the jvp over tangents (check_batched_forward_grad)."""
    x, w, b, rm, rv = (t.detach().requires_grad_(i < 3) for i, t in enumerate(_forward_args()))
    stats = (None, None) if training else (rm, rv)
    if surface == "operator":
        def f(x, w, b):
            return ops.batch_norm_forward(x, w, b, *stats, training, 1e-5)[0]
    else:
        def f(x, w, b):
            return batchnorm_ext.batch_norm(x, *stats, w, b, training=training)
    assert gradcheck(f, (x, w, b), check_batched_grad=True, check_forward_ad=True,
                     check_batched_forward_grad=True)
    assert gradgradcheck(f, (x, w, b), check_batched_grad=True, check_fwd_over_rev=True,
                         check_rev_over_rev=True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compiled_transforms_match_native(training):
    """torch.compile(fullgraph=True) of vmap and of per-sample gradients (vmap of grad)."""
    x = _stack(make_input((4, 3, 2, 2), torch.float32, "channels_last"))
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    running = (torch.randn(3), torch.rand(3) + 0.5)
    stats = (None, None) if training else running
    results = []
    for impl in (batchnorm_ext.batch_norm, F.batch_norm):
        def f(x, w, b):
            return impl(x, *stats, w, b, training=training)

        torch._dynamo.reset()
        results.append([torch.compile(t, fullgraph=True)(x, w, b) for t in (
            vmap(f, (0, None, None)),
            vmap(grad(lambda *a: _scalar(f(*a)), (0, 1, 2)), (0, None, None)))])
    for a, n in zip(tree_leaves(results[0]), tree_leaves(results[1])):
        assert_close(a, n, torch.float32)

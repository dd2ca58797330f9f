"""Differential fuzzing against native batch norm with hypothesis: random shapes, strides,
dtypes, affine, running statistics, momentum, eps and mode.  Outputs, gradients, running
statistics, num_batches_tracked, output memory format and the exception type raised must
all agree.  Profiles: BATCHNORM_EXT_FUZZ=ci (default) or long.  The comparisons against
native and the float64 oracle run once per kernel build this CPU can run (the `capability`
fixture): each build rounds its vector sums in its own way."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st

import batchnorm_ext
from helpers import TOLERANCE

SIZES = st.sampled_from([1, 1, 2, 3, 4, 5, 7, 11, 13])
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
REDUCED = (torch.bfloat16, torch.float16)
MODULES = {2: (batchnorm_ext.BatchNorm1d, torch.nn.BatchNorm1d),
           3: (batchnorm_ext.BatchNorm1d, torch.nn.BatchNorm1d),
           4: (batchnorm_ext.BatchNorm2d, torch.nn.BatchNorm2d),
           5: (batchnorm_ext.BatchNorm3d, torch.nn.BatchNorm3d)}


@st.composite
def inputs(draw):
    """A leaf tensor and a view of it with some memory layout."""
    rank = draw(st.integers(2, 5))
    shape = [draw(SIZES) for _ in range(rank)]
    assume(math.prod(shape) <= 6000)
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(["contiguous", "channels_last", "transposed", "sliced",
                                   "expanded"]))
    scale = draw(st.sampled_from([1.0, 1e-3, 50.0]))
    offset = draw(st.sampled_from([0.0, 3.0, -1e3]))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    make = lambda s: (torch.randn(s, generator=generator, dtype=torch.float64) * scale + offset).to(dtype)
    if layout == "channels_last" and rank in (4, 5):
        fmt = torch.channels_last if rank == 4 else torch.channels_last_3d
        base = make(shape).contiguous(memory_format=fmt)
        return base, lambda t: t, dtype
    if layout == "transposed":
        a, b = (0, 1) if rank == 2 else (rank - 2, rank - 1)
        swapped = list(shape)
        swapped[a], swapped[b] = swapped[b], swapped[a]
        return make(swapped), lambda t: t.transpose(a, b), dtype
    if layout == "sliced":
        wide = list(shape)
        wide[-1] = 2 * shape[-1]
        return make(wide), lambda t: t[..., ::2], dtype
    if layout == "expanded":  # the batch repeated: stride 0
        one = [1] + shape[1:]
        return make(one), lambda t: t.expand(shape), dtype
    return make(shape), lambda t: t, dtype


def call(fn, base, view, weight, bias, running_mean, running_var, training, momentum, eps, grad_seed,
         grad_dtype=None):
    """Runs one batch norm; returns (results, exception type)."""
    leaf = base.detach().clone().requires_grad_()
    params = [None if p is None else p.detach().clone().requires_grad_() for p in (weight, bias)]
    stats = [None if s is None else s.clone() for s in (running_mean, running_var)]
    try:
        x = view(leaf)
        x.retain_grad()  # the gradient the batch norm returns, before autograd sums it into leaf
        y = fn(x, *stats, *params, training=training, momentum=momentum, eps=eps)
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        return None, type(e)
    # The same upstream gradient for every call: rounded to the input dtype, then widened.
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed))
    g = g.to(grad_dtype or y.dtype).to(y.dtype)
    y.backward(g)
    grads = [x.grad if x.grad is not None else leaf.grad] + [None if p is None else p.grad for p in params]
    return (y, grads, stats, x), None


def oracle_error(result, oracle):
    return (result.double() - oracle.double()).abs().max().item() if result.numel() else 0.0


def assert_agrees(ours, native, oracle, dtype, what, conditioning=1.0, data_scale=0.0,
                  sum_bound=0.0):
    """Ours against the float64 oracle (the same batch norm in float64, from the same input
    and parameters), with native's own error as the yardstick: within twice native's error
    (where both are far from the oracle, e.g. a constant channel's invstd = 1/sqrt(eps)
    amplifying the rounding of every gradient, two equally valid roundings differ by a
    small factor), or within 4 ulps of the result dtype at the largest result.
    float64 input has no better oracle than native itself: there ours must be within 8
    float64 ulps times `conditioning` (|x| / sqrt(var + eps), at least 1: normalizing data
    far from its spread amplifies the rounding of the input by that much; see
    input_conditioning).
    The running statistics come from batch statistics that we sum in float32 blocks
    (native, in double): their error scale is that of the data, an ulp of max |x|
    (`data_scale`) for the mean and of max |x|**2 for the variance (twice: the unbiased
    factor), which is more than an ulp of a mean near zero (seen: a float32 running_mean
    of 7 values of +-100, 1.7 times the 4-ulp bound).
    grad_weight and grad_bias are float32 sums, whose rounding depends on the order of
    summation, which differs between native and ours and between our kernel builds (the
    vector width): `sum_bound` is the worst case of that rounding (sum_rounding_bounds),
    and an error within it is no loss of accuracy (seen: grad_weight of bfloat16 data
    around -1000 in eval, terms of ~1000 cancelling to ~8000, ours 2.1 times native's
    error with the AVX2 kernels and AVX2 native, 0.07 of the worst case)."""
    if ours is None or native is None:
        assert ours is None and native is None, what
        return
    if ours.numel() == 0:
        assert ours.shape == native.shape, what
        return
    assert ours.dtype == native.dtype, (what, ours.dtype, native.dtype)
    assert torch.equal(ours.isnan(), native.isnan()) or oracle is not None, what
    data_floor = {"running_mean": data_scale, "running_var": 2 * data_scale**2,
                  "grad_input": data_scale}.get(what, 0.0)
    if dtype == torch.float64 or oracle is None:
        assert dtype == torch.float64, what
        magnitude = max(1.0, native.double().nan_to_num().abs().max().item())
        # 16 ulps, not 8: ours and native each round on their own, each within 8 ulps (times
        # the conditioning) of the exact result, so they may differ by the sum.  (Seen:
        # after a torch.compile test in the same process, native's float64 result moved
        # by a few ulps, and ours was 1.02 times the 8-ulp bound from it.)
        bound = max(16 * torch.finfo(torch.float64).eps * max(conditioning * magnitude, data_floor),
                    sum_bound)
        error = (ours.double() - native.double()).nan_to_num().abs().max().item()
        assert error <= bound, (what, error, bound)
        return
    finite = oracle.isfinite()
    assert torch.equal(ours.isfinite(), finite), what
    ours, native, oracle = ours[finite], native[finite], oracle[finite]
    if ours.numel() == 0:
        return
    ulp = torch.finfo(ours.dtype).eps * max(oracle.double().abs().max().item(), data_floor / 4)
    ours_error, native_error = oracle_error(ours, oracle), oracle_error(native, oracle)
    assert ours_error <= max(2 * native_error, 4 * ulp, sum_bound), \
        (what, ours_error, native_error, ulp, sum_bound)


def check_functional(data, training, affine, with_stats, mixed, momentum, eps, seed):
    """One batch norm call, ours and native, on an input (base, view, dtype): the same
    exception or results that agree (assert_agrees) and the same output strides."""
    base, view, dtype = data
    channels = view(base).shape[1]
    param_dtype = torch.float32 if (mixed and dtype in REDUCED) else dtype
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.rand(channels, generator=gen) + 0.5).to(param_dtype) if affine else None
    bias = torch.randn(channels, generator=gen).to(param_dtype) if affine else None
    running_mean = torch.randn(channels, generator=gen).to(param_dtype) if with_stats else None
    running_var = (torch.rand(channels, generator=gen) + 0.5).to(param_dtype) if with_stats else None
    args = (weight, bias, running_mean, running_var, training, momentum, eps, seed)

    def functional(fn):
        return lambda x, rm, rv, w, b, **kw: fn(x, rm, rv, w, b, **kw)
    ours, ours_error = call(functional(batchnorm_ext.batch_norm), base, view, *args)
    native, native_error = call(functional(F.batch_norm), base, view, *args)
    assert ours_error == native_error, (ours_error, native_error)
    if native is None:
        return
    oracle = None
    if dtype != torch.float64:
        to64 = lambda t: None if t is None else t.double()
        oracle, _ = call(functional(F.batch_norm), base.double(), view, to64(weight), to64(bias),
                         to64(running_mean), to64(running_var), training, momentum, eps, seed,
                         grad_dtype=dtype)
    (y, grads, stats, x), (ny, ngrads, nstats, _) = ours, native
    conditioning, data_scale = input_conditioning(x, eps), input_scale(x)
    oy, ograds, ostats = (oracle[0], oracle[1], oracle[2]) if oracle else (None, [None] * 3, [None] * 2)
    assert_agrees(y, ny, oy, dtype, "output", conditioning)
    assert y.stride() == ny.stride(), "output memory format"
    # grad_input is a difference of terms of size |dy| * |weight| / sqrt(var + eps), which
    # cancel exactly for some inputs (two values per channel in training: the gradient is
    # 0): its rounding scale is that of the terms, not of the result.
    grad_scale = grad_input_scale(x, ngrads[0], weight, eps, training, running_var)
    sum_bounds = sum_rounding_bounds(x, seed, training, running_mean, running_var, eps)
    for name, a, b, o in zip(["grad_input", "grad_weight", "grad_bias"], grads, ngrads, ograds):
        assert_agrees(a, b, o, dtype, name, conditioning, grad_scale if name == "grad_input" else 0.0,
                      sum_bounds.get(name, 0.0))
    for name, a, b, o in zip(["running_mean", "running_var"], stats, nstats, ostats):
        assert_agrees(a, b, o, dtype, name, conditioning, data_scale)


def grad_input_scale(x, grad_input, weight, eps, training, running_var):
    """The size of the terms grad_input is made of: max |grad_output| (regenerated as call
    makes it) times max |weight| / sqrt(var + eps)."""
    if grad_input is None or x.numel() == 0:
        return 0.0
    x64 = x.detach().double()
    if not x64.isfinite().all():
        return 0.0
    dims = [0] + list(range(2, x64.dim()))
    if training or running_var is None:
        var = x64.var(dims, unbiased=False) if x64.numel() > x64.shape[1] else torch.zeros(x64.shape[1])
    else:
        var = running_var.double()
    scale = (var + eps).rsqrt()
    if weight is not None:
        scale = scale * weight.double().abs()
    return 4.0 * scale.max().item()  # |grad_output| < 4: N(0, 1) draws of these sizes


def sum_rounding_bounds(x, grad_seed, training, running_mean, running_var, eps):
    """The worst-case rounding of grad_bias = sum(dy) and grad_weight = sum(dy * (x - mean))
    * invstd, per channel, whatever the order of summation: a sum of n terms in a floating
    type of unit roundoff u (2**-24 for float32, in which bfloat16, half and float32 are
    summed; 2**-53 for float64) is within (n - 1) * u of the sum of their magnitudes
    (Higham, Accuracy and Stability of Numerical Algorithms, 4.2), and x - mean adds a
    rounding of u * |x - mean| to each term, and u * |mean| from the mean rounded to the
    type.  dy is regenerated as `call` makes it.  {} when there are no finite values."""
    x64 = x.detach().double()
    if x64.numel() == 0 or not x64.isfinite().all():
        return {}
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(grad_seed)).to(x.dtype).double()
    dims = [0] + list(range(2, x64.dim()))
    if training or running_var is None:
        mean, var = x64.mean(dims), x64.var(dims, unbiased=False)
    else:
        mean, var = running_mean.double(), running_var.double()
    shape = [1, -1] + [1] * (x64.dim() - 2)
    n = x64.numel() // x64.shape[1]
    u = 2.0**-53 if x.dtype == torch.float64 else 2.0**-24
    dy_sum = dy.abs().sum(dims)
    terms = (dy * (x64 - mean.view(shape))).abs().sum(dims)
    invstd = (var + eps).rsqrt()
    return {"grad_bias": ((n - 1) * u * dy_sum).max().item(),
            "grad_weight": (((n + 1) * u * terms + u * mean.abs() * dy_sum) * invstd).max().item()}


def input_scale(x):
    """max |x| over the finite values of the input (0 for an empty one)."""
    x64 = x.detach().double()
    x64 = x64[x64.isfinite()]
    return x64.abs().max().item() if x64.numel() else 0.0


def input_conditioning(x, eps):
    """How much normalizing amplifies the rounding of the input: the largest, over the
    channels, of max |x| / sqrt(var + eps) (biased batch variance), at least 1."""
    x64 = x.detach().double()
    if x64.numel() == 0 or not x64.isfinite().all():
        return 1.0
    dims = [0] + list(range(2, x64.dim()))
    var = x64.var(dims, unbiased=False) if x64.numel() > x64.shape[1] else torch.zeros(x64.shape[1])
    return max(1.0, (x64.abs().amax(dims) / (var + eps).sqrt()).max().item())


@given(inputs(), st.booleans(), st.booleans(), st.booleans(), st.booleans(),
       st.sampled_from([0.1, 0.5, 0.0, 1.0]), st.sampled_from([1e-5, 1e-3, 0.5]),
       st.integers(0, 1000))
def test_functional_against_native(capability, data, training, affine, with_stats, mixed, momentum,
                                   eps, seed):
    check_functional(data, training, affine, with_stats, mixed, momentum, eps, seed)


def large_input(shape, dtype, layout, seed, scale=2.0, offset=0.5):
    generator = torch.Generator().manual_seed(seed)
    make = lambda s: (torch.randn(s, generator=generator) * scale + offset).to(dtype)
    if layout == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        return make(shape).contiguous(memory_format=fmt), lambda t: t, dtype
    if layout == "sliced":
        return make(shape[:-1] + (2 * shape[-1],)), lambda t: t[..., ::2], dtype
    return make(shape), lambda t: t, dtype


# Inputs beyond the random ones' 6000 values, one per path they never reach (with the
# kernel's constants, csrc/cpu/batch_norm_kernel.h: kGrain = 32768, kBlockValues = 2048,
# 16 float lanes with AVX-512, 8 with AVX2).
LARGE_CASES = [
    # Channels-first, C = 2 < 4 * threads and more than 32768 values: blocks of all
    # channels spread over the threads (channels_first_reduce_apply), planes of 4096 in
    # pieces; training forward and backward.
    ("spread, float32", (4, 2, 64, 64 + 3), "contiguous", torch.float32, True, True),
    ("spread, bfloat16 sliced", (6, 3, 50, 60), "sliced", torch.bfloat16, True, False),
    # Channels-last, C = 3: a period of 48 values, blocks of 64 periods, chunks of 10
    # blocks (30720 values): 98304 values make 4 chunks, merged across chunks.
    ("channels-last chunks, C = 3", (8, 3, 64, 64), "channels_last", torch.float32, True, True),
    # C = 64, half: blocks of 64 periods of 64, chunks of 8 blocks: 4.5 chunks.
    ("channels-last chunks, C = 64", (16, 64, 12, 12), "channels_last", torch.float16, True, False),
    # Outputs of 16 MiB and more: streaming stores (forward and grad_input), 5-D.
    ("streaming stores, float32", (2, 4, 8, 256, 256), "contiguous", torch.float32, True, True),
    ("streaming stores, channels-last", (2, 5, 640, 660), "channels_last", torch.float32, False, True),
]


@pytest.mark.parametrize("shape,layout,dtype,training,mixed",
                         [c[1:] for c in LARGE_CASES], ids=[c[0] for c in LARGE_CASES])
def test_large_inputs_against_native(capability, shape, layout, dtype, training, mixed):
    data = large_input(shape, dtype, layout, seed=sum(shape))
    check_functional(data, training, affine=True, with_stats=True, mixed=mixed, momentum=0.1,
                     eps=1e-5, seed=7)


def test_large_cases_are_large():
    """What the comments above claim of each case's size."""
    sizes = {name: math.prod(shape) for name, shape, *_ in LARGE_CASES}
    for name, shape, *_ in LARGE_CASES:
        if name.startswith("spread"):
            assert shape[1] < 4 and sizes[name] > 32768, name
        if name.startswith("streaming"):
            assert sizes[name] * 4 >= 16 << 20, name  # float32 output bytes
    assert sizes["channels-last chunks, C = 3"] > 3 * 30720


@given(inputs(), st.booleans(), st.booleans(), st.booleans(), st.sampled_from([0.1, None]),
       st.integers(0, 1000), st.integers(1, 3))
def test_module_against_native(capability, data, training, affine, track, momentum, seed, steps):
    base, view, dtype = data
    x = view(base)
    ours_cls, native_cls = MODULES[x.dim()]
    channels = x.shape[1]
    param_dtype = torch.float32 if dtype in REDUCED else dtype
    kwargs = dict(momentum=momentum, affine=affine, track_running_stats=track)
    native = native_cls(channels, dtype=param_dtype, **kwargs)
    ours = ours_cls(channels, dtype=param_dtype, **kwargs)
    oracle = native_cls(channels, dtype=torch.float64, **kwargs)
    ours.load_state_dict(native.state_dict())
    oracle.load_state_dict(native.state_dict())
    x64 = x.double()
    conditioning = input_conditioning(x, 1e-5)
    for module in (ours, native, oracle):
        module.train(training)
    for step in range(steps):
        results = []
        for module, inp in ((ours, x), (native, x), (oracle, x64)):
            try:
                results.append((module(inp), None))
            except Exception as e:  # noqa: BLE001
                results.append((None, type(e)))
        assert results[0][1] == results[1][1]
        if results[1][1] is not None:
            return
        assert_agrees(results[0][0], results[1][0], results[2][0], dtype, "output", conditioning)
        assert results[0][0].stride() == results[1][0].stride()
    for name, a in ours.state_dict().items():
        b, o = native.state_dict()[name], oracle.state_dict()[name]
        if a.dtype == torch.int64:
            assert torch.equal(a, b), name
        else:
            assert_agrees(a, b, o, dtype, name, conditioning, input_scale(x))


BAD_PARAMETERS = st.sampled_from(["ok", "wrong_size", "wrong_dtype", "meta", "float64", "strided",
                                  "scalar", "requires_grad", "none"])


def parameter(kind, channels, dtype, generator, requires_grad_ok):
    base = torch.rand(channels, generator=generator) + 0.5
    if kind == "none":
        return None
    if kind == "wrong_size":
        return torch.rand(channels + 1, generator=generator).to(dtype)
    if kind == "wrong_dtype":
        return base.to(torch.int64)
    if kind == "meta":
        return base.to(dtype).to("meta")
    if kind == "float64":
        return base.double()
    if kind == "strided":
        return torch.stack([base, base], 1).to(dtype)[:, 0]
    if kind == "scalar":
        return torch.tensor(1.0, dtype=dtype)
    if kind == "requires_grad" and requires_grad_ok:
        return base.to(dtype).requires_grad_()
    return base.to(dtype)


@given(st.lists(st.sampled_from([0, 1, 2, 3, 5]), min_size=0, max_size=6),
       st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.uint8,
                        torch.bool, torch.complex64]),
       BAD_PARAMETERS, BAD_PARAMETERS, BAD_PARAMETERS, BAD_PARAMETERS, st.booleans(),
       st.sampled_from([1e-5, 0.0, -1.0]), st.integers(0, 100))
def test_malformed_calls_raise_what_native_raises(shape, dtype, w_kind, b_kind, rm_kind, rv_kind,
                                                  training, eps, seed):
    """Any mix of bad arguments: the same exception type as native (or no exception when
    native has none), never a crash."""
    generator = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        x = torch.randn(shape, generator=generator).to(dtype)
    elif dtype.is_complex:
        x = torch.randn(shape, generator=generator, dtype=dtype)
    else:
        x = torch.randint(0, 3, shape, generator=generator).to(dtype)
    channels = shape[1] if len(shape) > 1 else (shape[0] if shape else 1)
    pdtype = dtype if dtype.is_floating_point else torch.float32
    args = [parameter(k, channels, pdtype, torch.Generator().manual_seed(seed), i >= 2)
            for i, k in enumerate([w_kind, b_kind, rm_kind, rv_kind])]
    outcomes = []
    for fn in (F.batch_norm, batchnorm_ext.batch_norm):
        stats = [None if a is None else a.clone() for a in args[2:]]
        try:
            out = fn(x, stats[0], stats[1], args[0], args[1], training=training, eps=eps)
            outcomes.append((None, out.shape, ""))
        except Exception as e:  # noqa: BLE001 - the type is what is compared
            outcomes.append((type(e), None, str(e)))
    native, ours = outcomes
    # The one deviation allowed: some native paths (eval with a strided parameter, say)
    # read a parameter of another dtype by converting it, where its other paths refuse
    # it.  We refuse it always, with native's message.
    if native[0] is None and ours[0] is RuntimeError and ours[2].startswith(
            ("expected scalar type", "mixed dtype")):
        return
    assert native[:2] == ours[:2], outcomes

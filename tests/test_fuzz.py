"""Differential fuzzing against native batch norm with hypothesis: random shapes, strides,
dtypes, affine, running statistics, momentum, eps and mode.  Outputs, gradients, running
statistics, num_batches_tracked, output memory format and the exception type raised must
all agree.  Profiles: BATCHNORM_EXT_FUZZ=ci (default) or long."""
import math

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


def oracle_error(result, reference, oracle):
    return (result.double() - oracle.double()).abs().max().item() if result.numel() else 0.0


def assert_agrees(ours, native, oracle, dtype, what, conditioning=1.0):
    """Ours within the dtype's tolerance of native; or, where native itself is off (reduced
    precision keeps its saved statistics in the input dtype), at least as close to the
    float64 oracle as native.  `conditioning` (|mean| / std of the input, at least 1)
    scales the tolerance: normalizing data far from zero amplifies every rounding."""
    if ours is None or native is None:
        assert ours is None and native is None, what
        return
    if ours.numel() == 0:
        assert ours.shape == native.shape, what
        return
    scale = max(1.0, native.double().abs().max().item()) if what.startswith("grad") else 1.0
    scale *= conditioning
    tol = TOLERANCE[ours.dtype if ours.dtype in TOLERANCE else dtype]
    close = torch.allclose(ours.double(), native.double(), rtol=tol["rtol"], atol=tol["atol"] * scale,
                           equal_nan=True)
    if close:
        return
    assert oracle is not None, what
    ulp = torch.finfo(ours.dtype).eps * max(1.0, oracle.double().abs().max().item())
    ours_error, native_error = oracle_error(ours, native, oracle), oracle_error(native, ours, oracle)
    # Within twice native's error: where both are far from the oracle (a constant channel's
    # invstd = 1/sqrt(eps) amplifies the rounding of every gradient), two roundings that are
    # equally valid still differ by a small factor.
    assert ours_error <= max(2 * native_error, 4 * ulp), (what, ours_error, native_error)


@given(inputs(), st.booleans(), st.booleans(), st.booleans(), st.booleans(),
       st.sampled_from([0.1, 0.5, 0.0, 1.0]), st.sampled_from([1e-5, 1e-3, 0.5]),
       st.integers(0, 1000))
def test_functional_against_native(data, training, affine, with_stats, mixed, momentum, eps, seed):
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
    x64 = x.detach().double()
    conditioning = max(1.0, (x64.abs().max() / x64.std()).item()) if x64.numel() > 1 and x64.std() > 0 else 1.0
    oy, ograds, ostats = (oracle[0], oracle[1], oracle[2]) if oracle else (None, [None] * 3, [None] * 2)
    assert_agrees(y, ny, oy, dtype, "output", conditioning)
    assert y.stride() == ny.stride(), "output memory format"
    for name, a, b, o in zip(["grad_input", "grad_weight", "grad_bias"], grads, ngrads, ograds):
        assert_agrees(a, b, o, dtype, name, conditioning)
    for name, a, b, o in zip(["running_mean", "running_var"], stats, nstats, ostats):
        assert_agrees(a, b, o, dtype, name)


@given(inputs(), st.booleans(), st.booleans(), st.booleans(), st.sampled_from([0.1, None]),
       st.integers(0, 1000), st.integers(1, 3))
def test_module_against_native(data, training, affine, track, momentum, seed, steps):
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
    conditioning = max(1.0, (x64.abs().max() / x64.std()).item()) if x.numel() > 1 and x64.std() > 0 else 1.0
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
            assert_agrees(a, b, o, dtype, name, conditioning)


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

"""Shared by the tests: input layouts, tolerances, and running a step natively and ours."""
import torch

import batchnorm_ext

# The kernel builds of batchnorm_ext, best first (csrc/cpu/dispatch.cpp, kChoices).
ALL_BUILDS = ["AVX512_BF16", "AVX512", "AVX2", "DEFAULT"]
# The build chosen at start-up, before any test switches builds.
BEST_BUILD = batchnorm_ext.cpu_capability()


# The builds compiled into this extension, best first: all of them, unless setup.py was
# told fewer (BATCHNORM_EXT_KERNELS; the sanitized build takes DEFAULT and AVX512).
BUILT = batchnorm_ext._C.built_capabilities().split(",")


def available_capabilities():
    """The kernel builds this CPU can run and this extension has, best first."""
    return [b for b in ALL_BUILDS[ALL_BUILDS.index(BEST_BUILD):] if b in BUILT]

# How close ours must be to native, per dtype.  Both round to the dtype at the end, so
# they may differ by about one unit in the last place of the output dtype: ~1e-7 relative
# for float32, 2**-8 for bfloat16, 2**-11 for float16 (the tolerances below are a few ulp).
TOLERANCE = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
    torch.float16: dict(rtol=4e-3, atol=4e-3),
}

LAYOUTS = ["contiguous", "channels_last", "sliced", "permuted"]


def make_input(shape, dtype, layout="contiguous", scale=1.0, offset=0.0):
    """A random tensor of `shape` in a memory layout:
    contiguous; channels_last (channels_last_3d for 5-D; other ranks stay contiguous);
    sliced (every other element of the last dimension: not dense); permuted (the last two
    dimensions swapped in memory, or the transpose of a (C, N) matrix for 2-D: dense, but
    neither contiguous nor channels-last)."""
    x = (torch.randn(shape, dtype=torch.float64) * scale + offset).to(dtype)
    if layout == "channels_last":
        fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
        return x.contiguous(memory_format=fmt) if fmt else x
    if layout == "sliced":
        wide = x.new_zeros(shape[:-1] + (2 * shape[-1],))
        wide[..., ::2] = x
        return wide[..., ::2]
    if layout == "permuted":
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    return x


def assert_close(ours, native, dtype=None, scale=1.0, **kwargs):
    """assert_close with TOLERANCE for the dtype; `scale` multiplies atol, for values (sums)
    whose magnitude is larger than one."""
    tol = dict(TOLERANCE.get(dtype or native.dtype, dict(rtol=0, atol=0)))  # integers: exact
    tol["atol"] *= scale
    tol.update(kwargs)
    torch.testing.assert_close(ours, native, equal_nan=True, **tol)


def leaf(t, requires_grad=True):
    """A leaf copy of t.  clone() keeps the strides of a dense tensor only: a copy of a
    "sliced" input is contiguous.  Use strided_leaf to keep them."""
    return None if t is None else t.detach().clone().requires_grad_(requires_grad)


def strided_leaf(t):
    """(leaf, view): a leaf that requires grad, holding a copy of all of t's storage, and
    the view of it with t's shape, strides and offset, to pass on; view.grad (retained)
    is the gradient with respect to the view."""
    storage = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage())
    base = storage.detach().clone().requires_grad_()
    view = base.as_strided(t.shape, t.stride(), t.storage_offset())
    view.retain_grad()
    return base, view


def generated_code(code):
    """Inductor's generated code (run_and_get_code's list) as what it computes: without
    comments (the graph's number in the process, source node names, the addresses of
    frozen parameters) and without the checks of sizes and strides (whose messages name
    the pattern that made a node)."""
    import re
    lines = [re.sub(r"\s*#(?!include|pragma|define|if|endif|else).*$", "", line)
             for c in code for line in c.splitlines()]
    return [line for line in lines if line.strip() and "assert_size_stride(" not in line
            and "assert_alignment(" not in line]

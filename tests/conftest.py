import os
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, settings

# Property-based tests: a CI profile of a few hundred examples in all, and a long one of
# thousands, chosen with BATCHNORM_EXT_FUZZ=long (see README, "Reliability").
# The fuzz tests take the function-scoped `capability` fixture (below), which is meant to
# hold for all the examples of a test: one kernel build per test run, not per example.
QUIET = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
settings.register_profile("ci", max_examples=300, deadline=None, derandomize=True,
                          suppress_health_check=QUIET)
settings.register_profile("long", max_examples=5000, deadline=None, suppress_health_check=QUIET)
settings.load_profile(os.environ.get("BATCHNORM_EXT_FUZZ", "ci"))

# Hypothesis draws some values from the constants of the "local" modules loaded so far,
# which include the modules torch.compile generates: the examples of a derandomized run
# would then depend on which tests ran before.  A fixed (empty) pool keeps them the same.
try:
    from hypothesis.internal.conjecture import providers as _providers
    _no_local_constants = _providers.Constants(
        integers=_providers.SortedSet(), floats=_providers.SortedSet(key=_providers.float_to_int),
        bytes=_providers.SortedSet(), strings=_providers.SortedSet())
    _providers._get_local_constants = lambda: _no_local_constants
except (ImportError, AttributeError):  # another hypothesis: its draws may vary with order
    pass

# Inductor's caches do not key on ATEN_CPU_CAPABILITY: a run as on an AVX2 CPU could be
# served code compiled for AVX-512 by an earlier run.  Each setting gets a cache directory
# of its own, unless one is given.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _cpu = os.environ.get("ATEN_CPU_CAPABILITY", "best").lower()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{os.getuid()}_batchnorm_ext_{_cpu}")

import batchnorm_ext
from helpers import ALL_BUILDS, BUILT, available_capabilities


def pytest_report_header(config):
    """Says which kernel builds the `capability` tests run: on a CPU without AVX-512 (or
    without its bfloat16 instructions) fewer than all of them."""
    return report_header_lines()


def report_header_lines():
    tested = available_capabilities()
    untested = [b for b in ALL_BUILDS if b not in tested]
    why = "this CPU cannot run them"
    if any(b not in BUILT for b in ALL_BUILDS):
        why += f", or the extension was built without them (built: {', '.join(BUILT)})"
    if os.environ.get("ATEN_CPU_CAPABILITY"):
        why += f", or ATEN_CPU_CAPABILITY={os.environ['ATEN_CPU_CAPABILITY']} rules them out"
    return [f"batchnorm_ext kernel builds tested: {', '.join(tested)}",
            f"batchnorm_ext kernel builds NOT tested ({why}): " + (", ".join(untested) or "none")]


@pytest.fixture(params=available_capabilities())
def capability(request):
    """Runs a test once with each kernel build this CPU can run: AVX512_BF16 (AVX-512 with
    the bfloat16 conversion instructions), AVX512, AVX2 and DEFAULT (plain x86-64).  On a
    CPU without some of them, fewer builds are tested: the report header says which, and
    tests/test_kernel_builds.py checks the list against the CPU's flags."""
    previous = batchnorm_ext.cpu_capability()
    batchnorm_ext.set_cpu_capability(request.param)
    yield request.param
    batchnorm_ext.set_cpu_capability(previous)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Property-based tests: a CI profile of a few hundred examples in all, and a long one of
# thousands, chosen with BATCHNORM_EXT_FUZZ=long (see README, "Reliability").
settings.register_profile("ci", max_examples=300, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=5000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("BATCHNORM_EXT_FUZZ", "ci"))

import batchnorm_ext


def available_capabilities():
    """The kernel builds this CPU can run, best first."""
    order = ["AVX512_BF16", "AVX512", "AVX2", "DEFAULT"]
    best = batchnorm_ext.cpu_capability()
    return order[order.index(best):]


@pytest.fixture(params=available_capabilities())
def capability(request):
    """Runs a test once with each kernel build (AVX-512, AVX2, plain)."""
    previous = batchnorm_ext.cpu_capability()
    batchnorm_ext.set_cpu_capability(request.param)
    yield request.param
    batchnorm_ext.set_cpu_capability(previous)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

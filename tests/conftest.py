import pytest
import torch

import batchnorm_ext


def available_capabilities():
    """The kernel builds this CPU can run, best first."""
    order = ["AVX512", "AVX2", "DEFAULT"]
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

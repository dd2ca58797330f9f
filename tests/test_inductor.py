"""Converted models under Inductor: torch.compile(dynamic=True), conv-BN folding under
freezing, an AOTInductor package; against the same native model."""
import copy

import pytest
import torch

import batchnorm_ext
from helpers import assert_close


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread: on two shared CPUs, two threads that wait for each other take many
    times longer on these small models (the results do not depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def inputs(n=2):
    return [torch.randn(4, 3, 8, 8) * 1.5 + 0.5 for _ in range(n)]


def steps_match(compiled, native, ours, xs):
    """Training steps (forward, backward, SGD) of the compiled model and native, compared;
    `ours` is the model `compiled` compiles (the same parameters)."""
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_n = torch.optim.SGD(native.parameters(), lr=0.1)
    for x in xs:
        yo, yn = compiled(x), native(x)
        assert_close(yo, yn, rtol=1e-4, atol=1e-5)
        for opt, y in [(opt_o, yo), (opt_n, yn)]:
            opt.zero_grad()
            y.square().mean().backward()
            opt.step()
    for (name, a), (_, b) in zip(ours.state_dict().items(), native.state_dict().items()):
        assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def small_pair(momentum=0.1):
    """A convolution and a batch norm, native and ours (compiling takes less)."""
    torch.manual_seed(0)
    native = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, momentum=momentum))
    native(torch.randn(4, 3, 8, 8) + 1)
    return native, batchnorm_ext.convert_model(copy.deepcopy(native))


def test_inductor_freezing_compiles_converted_model():
    """Under Inductor's freezing (CPU inference), native batch norms are folded into the
    convolutions before them; ours are not (the pass recognizes only torch's): they run
    our operator in the compiled code, with the same results."""
    from torch._inductor.utils import run_and_get_code
    native, ours = small_pair()
    native.eval()
    ours.eval()
    torch._dynamo.reset()
    x = inputs(1)[0]
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):
        result, code = run_and_get_code(torch.compile(ours), x)
    assert "batchnorm_ext.batch_norm_forward" in "".join(code)
    assert_close(result, native(x), rtol=1e-5, atol=1e-5)


def test_compile_dynamic_matches_native():
    native, ours = small_pair(momentum=None)
    torch._dynamo.reset()
    compiled = torch.compile(ours, dynamic=True)
    xs = [torch.randn(s) * 2 + 1 for s in [(4, 3, 8, 8), (6, 3, 10, 9)]]
    steps_match(compiled, native, ours, xs)


def test_aot_inductor_package(tmp_path):
    native, ours = small_pair()
    native.eval()
    ours.eval()
    x = inputs(1)[0]
    program = torch.export.export(ours, (x,))
    targets = {str(n.target) for n in program.run_decompositions().graph.nodes}
    assert "batchnorm_ext.batch_norm_forward.default" in targets
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "net.pt2"))
    loaded = torch._inductor.aoti_load_package(path)
    assert_close(loaded(x), native(x), rtol=1e-5, atol=1e-5)

"""Converted models under Inductor: torch.compile(dynamic=True), conv-BN folding under
freezing, no copies around our operators in any layout Inductor chooses, an AOTInductor
package; against the same native model."""
import copy
import re

import pytest
import torch

import batchnorm_ext
from helpers import assert_close, generated_code


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


def test_inductor_freezing_folds_converted_model_as_native():
    """Under torch.compile our modules in eval show Inductor a native batch norm (same
    results): under freezing (CPU inference) it is folded into the convolution before it,
    and the compiled code is native's."""
    from torch._inductor.utils import run_and_get_code
    native, ours = small_pair()
    native.eval()
    ours.eval()
    native_relu = copy.deepcopy(native).append(torch.nn.ReLU())
    fused = batchnorm_ext.fuse(copy.deepcopy(native_relu))
    x = inputs(1)[0]
    codes = {}
    with torch.no_grad(), torch._inductor.config.patch(freezing=True), \
            torch._inductor.utils.fresh_cache():
        for name, model in [("native", native), ("ours", ours), ("native+relu", native_relu),
                            ("fused", fused)]:
            torch._dynamo.reset()
            result, code = run_and_get_code(torch.compile(model), x)
            codes[name] = generated_code(code)
            assert_close(result, model(x), rtol=1e-5, atol=1e-5)
    assert "batchnorm_ext" not in "".join(codes["ours"] + codes["fused"])
    assert codes["ours"] == codes["native"]
    assert codes["fused"] == codes["native+relu"]
    assert codes["native"] != codes["native+relu"]  # (the comparison sees a ReLU)


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


# Kernels Inductor generates for a node of ours: copies of its inputs or outputs into
# other strides (named after the node they serve, e.g. cpp_fused_batch_norm_act_forward_1).
COPY_FOR_OURS = re.compile(r"def (cpp_fused_\w*batch_norm_(?:act_)?(?:forward|backward)\w*)|"
                           r"^(cpp_fused_\w*batch_norm_(?:act_)?(?:forward|backward)\w*) = ", re.M)


@pytest.mark.parametrize("layout_optimization", [True, False])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_no_copies_around_our_operators(layout_optimization, memory_format):
    """Our operators take tensors in whatever layout Inductor chose (flexible_layout on
    their schemas): with its layout optimization (which makes convolutions channels-last)
    on or off, and either input layout, the training step's generated code copies nothing
    into or out of them."""
    from torch._inductor.utils import run_and_get_code
    torch.manual_seed(0)
    # (a convolution last: a graph's outputs are copied into the strides eager mode would
    # give them, whatever computed them)
    native = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                 torch.nn.Conv2d(8, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Conv2d(8, 4, 1))
    model = batchnorm_ext.fuse(native)
    x = torch.randn(4, 3, 16, 16).to(memory_format=memory_format)

    def step():
        y = compiled(x)
        y.sum().backward()
        return y

    torch._dynamo.reset()
    with torch._inductor.config.patch(layout_optimization=layout_optimization,
                                      force_layout_optimization=layout_optimization), \
            torch._inductor.utils.fresh_cache():
        compiled = torch.compile(model)
        _, code = run_and_get_code(step)
    code = "".join(code)
    assert code.count("torch.ops.batchnorm_ext.batch_norm_act_forward.default(") == 1
    assert code.count("torch.ops.batchnorm_ext.batch_norm_forward.default(") == 1
    assert COPY_FOR_OURS.findall(code) == []

"""The hand-checked example the project started from (tests/data, a copy of
shared/seeds/batchnorm-by-hand.zh.txt): torch.nn.BatchNorm2d(3, affine=False) on a
(2, 3, 4, 4) input, with NumPy's per-channel mean and variance."""
import ast
import pathlib
import re

import torch

import batchnorm_ext

SEED = (pathlib.Path(__file__).parent / "data" / "batchnorm-by-hand.zh.txt").read_text("utf-8")


def _tensors(kind):
    """Every `tensor(...)` or `array(...)` printed in the file, in order, as nested lists."""
    found = []
    for match in re.finditer(kind + r"\((\[.*?\])(?:,\s*dtype=\w+)?\)", SEED, re.S):
        found.append(ast.literal_eval(match.group(1)))
    return found


def test_seed_example_is_reproduced():
    printed_input, printed_output = (torch.tensor(t) for t in _tensors("tensor"))
    numpy_mean, numpy_var, numpy_output = (torch.tensor(a) for a in _tensors("array"))
    assert printed_input.shape == (2, 3, 4, 4) and numpy_output.shape == (2, 3, 4, 4)

    bn = batchnorm_ext.BatchNorm2d(3, affine=False)
    output = bn(printed_input)
    # The input was printed with 4 decimals, so the recomputed output matches the printed
    # one to about 1e-3, and the statistics match NumPy's to about 1e-5.
    torch.testing.assert_close(output, printed_output, atol=1e-3, rtol=0)
    torch.testing.assert_close(output, numpy_output, atol=1e-3, rtol=0)

    _, mean, var = batchnorm_ext.ops.batch_norm_forward(printed_input, None, None, None, None,
                                                        True, 1e-5)
    assert mean.dtype == var.dtype == torch.float64  # the operator keeps batch statistics in double
    torch.testing.assert_close(mean.float(), numpy_mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(var.float(), numpy_var, atol=1e-5, rtol=0)

    # One training step moves the running statistics by momentum 0.1, with the unbiased
    # variance (32 values per channel).
    torch.testing.assert_close(bn.running_mean, 0.1 * numpy_mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * numpy_var * 32 / 31, atol=1e-6, rtol=0)
    assert bn.num_batches_tracked.item() == 1

"""Makes the tutorial's figures (PNG, next to this script).

    python docs/tutorial/figures/make_figures.py

variance_error.png (page 2): the relative error of four ways to compute a variance in
float32, on 100 000 values drawn from N(offset, 1), as the offset grows.
"""
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import batchnorm_ext  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def naive(x):
    """E[x^2] - E[x]^2: one pass, cancels catastrophically."""
    return np.float32(np.mean(x * x, dtype=np.float32) - np.mean(x, dtype=np.float32) ** 2)


def two_pass(x):
    """The mean first, then the mean of squared deviations: two passes over memory."""
    mean = np.mean(x, dtype=np.float32)
    d = x - mean
    return np.mean(d * d, dtype=np.float32)


def welford(x):
    """Welford's update, one value at a time (a division per value)."""
    count, mean, m2 = 0, np.float32(0), np.float32(0)
    for value in x:
        count += 1
        delta = value - mean
        mean += delta / np.float32(count)
        m2 += delta * (value - mean)
    return m2 / np.float32(count)


def ours(x):
    """batchnorm_ext's kernel: blocks in cache, merged with Chan's formula."""
    _, _, var = batchnorm_ext.ops.batch_norm_forward(torch.from_numpy(x).view(1, 1, -1), None,
                                                     None, None, None, True, 1e-5)
    return var.item()


def variance_error(path):
    rng = np.random.default_rng(0)
    offsets = [10.0 ** k for k in range(0, 7)]
    methods = {"naive E[x²] − E[x]²": naive, "two-pass": two_pass,
               "Welford (one value at a time)": welford, "batchnorm_ext (blocks + Chan)": ours}
    errors = {name: [] for name in methods}
    for offset in offsets:
        x = (rng.standard_normal(100_000) + offset).astype(np.float32)
        exact = np.var(x.astype(np.float64))
        for name, method in methods.items():
            n = 20_000 if method is welford else len(x)  # Welford in Python is slow
            sample = x[:n]
            exact_n = np.var(sample.astype(np.float64))
            errors[name].append(max(abs(float(method(sample)) - exact_n) / exact_n, 1e-9))
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in errors.items():
        ax.loglog(offsets, values, marker="o", label=name)
    ax.set_xlabel("offset (mean of the data; standard deviation 1)")
    ax.set_ylabel("relative error of the variance (float32)")
    ax.set_title("Variance of N(offset, 1) in float32")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", linewidth=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return errors


if __name__ == "__main__":
    for name, values in variance_error(os.path.join(HERE, "variance_error.png")).items():
        print(f"{name:32s}", " ".join(f"{v:.1e}" for v in values))

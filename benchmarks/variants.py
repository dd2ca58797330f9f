"""The variants compared at the level users decide on (layers and whole models):

  native           torch.nn.BatchNorm*d, eager
  native_compiled  the same module under torch.compile (Inductor, dynamic=False)
  ours             batchnorm_ext.convert_model: our operators, eager
  ours_fused       our fused operators: batchnorm_ext.batch_norm(..., residual=, activation=)
                   for single layers, batchnorm_ext.fuse(model) for blocks and models
  ours_compiled    convert_model, then torch.compile
  native_backend   the native module under torch.compile(backend="batchnorm_ext"): our
                   fused operators put in by the backend's rewrite
  fused_compiled   batchnorm_ext.fuse(model), then torch.compile

In eval (--networks --modes eval), every compiled variant compiles with Inductor's freezing.
(benchmarks/summary.py reports them.)
"""
import torch

VARIANTS = ["native", "native_compiled", "ours", "ours_fused", "ours_compiled", "native_backend",
            "fused_compiled"]
TITLES = {"native": "native", "native_compiled": "native, torch.compile", "ours": "ours",
          "ours_fused": "ours fused", "ours_compiled": "ours, torch.compile",
          "native_backend": "native, backend=batchnorm_ext",
          "fused_compiled": "ours fused, torch.compile"}
COMPILED = ("native_compiled", "ours_compiled", "native_backend", "fused_compiled")


def compile_module(module, freezing=False):
    return torch.compile(module, dynamic=False, options={"freezing": True} if freezing else None)


def compile_with_backend(module, freezing=False):
    import batchnorm_ext
    backend = batchnorm_ext.compile_backend(**({"freezing": True} if freezing else {}))
    return torch.compile(module, dynamic=False, backend=backend)


def prepare(variant, model, freezing=False):
    """(module, callable) of `variant` for a whole model (its own copy of `model`'s state is
    the caller's business): converted, fused and/or compiled as the variant says.  Single
    layers' "ours_fused" is the fused functional instead (layers.py)."""
    import batchnorm_ext
    if variant in ("ours", "ours_compiled"):
        model = batchnorm_ext.convert_model(model)
    elif variant in ("ours_fused", "fused_compiled"):
        model = batchnorm_ext.fuse(batchnorm_ext.convert_model(model))
    if variant in ("native_compiled", "ours_compiled", "fused_compiled"):
        return model, compile_module(model, freezing)
    if variant == "native_backend":
        return model, compile_with_backend(model, freezing)
    return model, model

"""The five variants compared at the level users decide on (layers and whole models):

  native           torch.nn.BatchNorm*d, eager
  native_compiled  the same module under torch.compile (Inductor, dynamic=False)
  ours             batchnorm_ext.convert_model: our operators, eager
  ours_fused       our fused operators: batchnorm_ext.batch_norm(..., residual=, activation=)
                   for single layers, batchnorm_ext.fuse(model) for blocks and models
  ours_compiled    convert_model, then torch.compile

(benchmarks/summary.py reports them.)
"""
import torch

VARIANTS = ["native", "native_compiled", "ours", "ours_fused", "ours_compiled"]
TITLES = {"native": "native", "native_compiled": "native, torch.compile", "ours": "ours",
          "ours_fused": "ours fused", "ours_compiled": "ours, torch.compile"}


def compile_module(module):
    return torch.compile(module, dynamic=False)

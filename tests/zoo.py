"""Real models for the tests and the benchmark: torchvision and timm.

The registry's torchvision 0.28.0 (the release made for torch 2.13) is a CUDA build: its
C++ library cannot load next to the CPU torch, and `import torchvision` then fails while
registering fake kernels for two of its operators (torchvision::nms and qnms) that were
never defined.  Its model definitions are pure Python and need none of its operators, so
the two schemas are defined here (as torchvision's C++ library would) before the import;
every other torchvision operator stays unavailable, as torchvision itself reports
(torchvision.extension._has_ops() is False).  timm imports torchvision, so it comes
through here too.
"""
import warnings

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None


def _define_missing_schemas():
    global _library
    missing = [name for name in _SCHEMAS if not _has_schema(name)]
    if missing and _library is None:
        _library = torch.library.Library("torchvision", "FRAGMENT")  # noqa: TOR901
        for name in missing:
            _library.define(_SCHEMAS[name])


def _has_schema(name):
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False


def torchvision():
    """The torchvision package, importable beside the CPU torch."""
    _define_missing_schemas()
    with warnings.catch_warnings():
        # "Failed to load '_C' extension": expected with this build, see above.
        warnings.simplefilter("ignore")
        import torchvision as module
    return module


def timm():
    torchvision()
    import timm as module
    return module

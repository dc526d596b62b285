"""Make torchvision importable on a CPU-only torch whose torchvision wheel is a CUDA build.

The PyPI torchvision that pairs with a local CPU torch ships C++ ops built against CUDA torch; they
cannot load, and torchvision's import then dies registering fake kernels for ``torchvision::nms``
("operator torchvision::nms does not exist"). Defining the missing schemas first lets it import;
the detection ops stay unusable (facedist never calls them). Nothing is done when the ops load.
"""

from __future__ import annotations

import importlib.util
import os

import torch

_SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None  # keeps the defined schemas alive for the life of the process


def _torchvision_ops_load() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # nothing to fix
    folder = spec.submodule_search_locations[0]
    libs = [f for f in os.listdir(folder) if f.startswith("_C") and f.endswith((".so", ".pyd"))]
    if not libs:
        return False
    try:
        torch.ops.load_library(os.path.join(folder, libs[0]))
    except (OSError, RuntimeError):
        return False
    return hasattr(torch.ops.torchvision, "nms")


def ensure_torchvision_importable() -> None:
    """Define torchvision's op schemas when its compiled ops cannot load (idempotent)."""
    global _library
    if _library is not None or _torchvision_ops_load():
        return
    _library = torch.library.Library("torchvision", "DEF")
    for name, schema in _SCHEMAS.items():
        _library.define(name + schema)


ensure_torchvision_importable()

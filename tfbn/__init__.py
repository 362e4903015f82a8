"""tfbn: batch normalization for Keras 3 on TensorFlow.

The layer and its math are imported eagerly; the workflow functions (data, training, population
statistics, export, tuning) load their modules on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

from tfbn.config import CLASS_NAMES, RECIPE, Recipe  # noqa: E402
from tfbn.layers import BatchNorm  # noqa: E402
from tfbn.ops import batch_norm, moments  # noqa: E402

# Public name -> "module:attribute", imported on first access.
_LAZY = {
    "convert": "tfbn.conversion:convert",
    "lenet": "tfbn.models:lenet",
    "load_fashion_mnist": "tfbn.data:load_fashion_mnist",
    "train": "tfbn.training:train",
    "recalibrate": "tfbn.recalibration:recalibrate",
    "export_saved_model": "tfbn.export:export_saved_model",
    "fold_batch_norm": "tfbn.export:fold_batch_norm",
    "predict": "tfbn.serving:predict",
    "tune": "tfbn.tuning:tune",
}

__all__ = [
    "BatchNorm",
    "CLASS_NAMES",
    "RECIPE",
    "Recipe",
    "__version__",
    "batch_norm",
    "moments",
    *_LAZY,
]


def __getattr__(name: str):
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'tfbn' has no attribute {name!r}")
    module, attribute = target.split(":")
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

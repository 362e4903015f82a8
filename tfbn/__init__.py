"""tfbn: batch normalization for Keras 3 on TensorFlow.

Every public name loads its module on first use, so `import tfbn` (and the `tfbn` command's
`--help` and `--version`) does not import TensorFlow. Using `tfbn.BatchNorm` (or importing
`tfbn.layers`) registers the layer with Keras, so that `.keras` files holding it reload.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

from tfbn.config import CLASS_NAMES, RECIPE, Recipe  # noqa: E402

# Public name -> "module:attribute", imported on first access.
_LAZY = {
    "BatchNorm": "tfbn.layers:BatchNorm",
    "batch_normalization": "tfbn.ops:batch_normalization",
    "moments": "tfbn.ops:moments",
    "convert": "tfbn.conversion:convert",
    "lenet": "tfbn.models:lenet",
    "load_fashion_mnist": "tfbn.data:load_fashion_mnist",
    "train": "tfbn.training:train",
    "recalibrate": "tfbn.recalibration:recalibrate",
    "export_saved_model": "tfbn.export:export_saved_model",
    "fold_batch_norm": "tfbn.folding:fold_batch_norm",
    "predict": "tfbn.serving:predict",
    "tune": "tfbn.tuning:tune",
}

__all__ = ["CLASS_NAMES", "RECIPE", "Recipe", "__version__", *_LAZY]


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

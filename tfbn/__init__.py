"""tfbn: batch normalization for Keras 3.

The library is what a Keras user imports: the layer (`BatchNorm`), the ops (`moments`,
`batch_normalization`) and the model tools (`convert`, `recalibrate`, `fold_batch_norm`,
`export_saved_model`). `import tfbn` registers every class tfbn can put in a `.keras` file
(`BatchNorm`, and the `ChannelAffine` and `FoldedAway` layers `fold_batch_norm` leaves), so that
`keras.saving.load_model` loads such a file with no `custom_objects`, in safe mode.

The library comes with Keras: if Keras is already imported, `import tfbn` imports the library at
once; otherwise it does so the moment Keras is imported, so that `import tfbn` alone costs no
TensorFlow import (the `tfbn` command answers `--help` at once) and a `.keras` file still loads
with nothing but `import tfbn`. Using any library name imports it too.

The application (the chapter's LeNet on Fashion-MNIST: `train`, `tune`, `lenet`,
`load_fashion_mnist`, `predict`, `RECIPE`, ...) lives in `tfbn.workflow`, needs the workflow extra,
and is imported on first use. `tfbn.legacy` (the layer for tf-keras) is never imported by
`import tfbn`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

# Modules of the library: imported with Keras (they register tfbn's classes with it).
LIBRARY_MODULES = (
    "tfbn.layers.batch_norm",
    "tfbn.ops.nn",
    "tfbn.tools.conversion",
    "tfbn.tools.folding",
    "tfbn.tools.recalibration",
    "tfbn.tools.export",
    "tfbn.tools.inspect",
)

# Public name -> "module:attribute". Library names are bound once the library is imported;
# application names on first access.
_LIBRARY = {
    "BatchNorm": "tfbn.layers.batch_norm:BatchNorm",
    "batch_normalization": "tfbn.ops.nn:batch_normalization",
    "moments": "tfbn.ops.nn:moments",
    "convert": "tfbn.tools.conversion:convert",
    "recalibrate": "tfbn.tools.recalibration:recalibrate",
    "fold_batch_norm": "tfbn.tools.folding:fold_batch_norm",
    "export_saved_model": "tfbn.tools.export:export_saved_model",
    "inspect": "tfbn.tools.inspect:inspect",
}
_APPLICATION = {
    "CLASS_NAMES": "tfbn.workflow.config:CLASS_NAMES",
    "RECIPE": "tfbn.workflow.config:RECIPE",
    "Recipe": "tfbn.workflow.config:Recipe",
    "lenet": "tfbn.workflow.models:lenet",
    "load_fashion_mnist": "tfbn.workflow.data:load_fashion_mnist",
    "train": "tfbn.workflow.training:train",
    "predict": "tfbn.workflow.serving:predict",
    "tune": "tfbn.workflow.tuning:tune",
}

__all__ = ["__version__", *_LIBRARY, *_APPLICATION]


def _resolve(target: str):
    module, attribute = target.split(":")
    return getattr(importlib.import_module(module), attribute)


def _import_library() -> None:
    """Imports the library's modules (registering its classes with Keras) and binds its names."""
    for module in LIBRARY_MODULES:
        importlib.import_module(module)
    for name, target in _LIBRARY.items():
        globals()[name] = _resolve(target)


class _AfterKeras(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `keras` as usual and imports tfbn's library right after Keras's own import ends.

    It stays in `sys.meta_path` until Keras is imported: a mere look-up of Keras's spec (as
    TensorFlow makes at its import) does not use it up.
    """

    def __init__(self) -> None:
        self._finding = False
        self._keras_loader = None

    def find_spec(self, fullname, path, target=None):
        if fullname != "keras" or self._finding:
            return None
        self._finding = True
        try:
            spec = importlib.util.find_spec("keras")
        finally:
            self._finding = False
        if spec is None or spec.loader is None:
            return spec
        self._keras_loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._keras_loader.create_module(spec)

    def exec_module(self, module) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        self._keras_loader.exec_module(module)
        _import_library()


def __getattr__(name: str):
    if name in _LIBRARY:
        # Keras first: its import imports the whole library (above), which binds the name.
        import keras  # noqa: F401

        if name not in globals():
            _import_library()
        return globals()[name]
    target = _APPLICATION.get(name)
    if target is None:
        raise AttributeError(f"module 'tfbn' has no attribute {name!r}")
    value = _resolve(target)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LIBRARY) | set(_APPLICATION))


if "keras" in sys.modules:
    _import_library()
elif not any(isinstance(finder, _AfterKeras) for finder in sys.meta_path):
    sys.meta_path.insert(0, _AfterKeras())

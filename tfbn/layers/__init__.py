"""tfbn's Keras 3 layers: `BatchNorm`, a drop-in for `keras.layers.BatchNormalization`."""

# Keras first: its import imports tfbn's library (`tfbn.LIBRARY_MODULES`), modules of this package
# among them, which must not find a module here half-imported.
import keras  # noqa: F401

from tfbn.layers.batch_norm import BatchNorm

__all__ = ["BatchNorm"]

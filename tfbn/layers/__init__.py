"""tfbn's Keras 3 layers: `BatchNorm`, a drop-in for `keras.layers.BatchNormalization`."""

from tfbn.layers.batch_norm import BatchNorm

__all__ = ["BatchNorm"]

"""The one place that chooses how tfbn computes on the Keras backend in use.

On TensorFlow: `tfbn.ops.kernels` and `tfbn.ops.nn` (fused kernels, XLA layouts, `tf.distribute`
replica logic). On any other backend (JAX, PyTorch): `tfbn.ops.core`, written in `keras.ops`.
The layer and the public ops (`tfbn.moments`, `tfbn.batch_normalization`) ask `engine()` and
never name a backend; TensorFlow is imported only when the backend is TensorFlow.
"""

from __future__ import annotations

import functools
import importlib
import sys
import types
from collections.abc import Callable
from typing import NamedTuple

import keras

__all__ = ["SUPPORTED_BACKENDS", "Engine", "engine", "tensorflow_module"]

#: The Keras backends tfbn runs on.
SUPPORTED_BACKENDS = ("tensorflow", "jax", "torch")


class Engine(NamedTuple):
    """The functions that compute batch normalization on one backend.

    Attributes:
        training: `(inputs, axis, *, gamma, beta, epsilon, fused, synchronized,
            virtual_batch_size, adjustment, mask, renorm_mean, renorm_stddev, renorm_clipping)
            -> (outputs, Moments)`, as `tfbn.ops.kernels.training_batch_norm`.
        normalize: `keras.ops.batch_normalization`'s signature and result.
        moments: `keras.ops.moments`'s signature and result (plus exactness).
        update: The new moving statistics, as `tfbn.ops.core.moving_statistics_update`.
        shape: The input's shape as a 1-D int tensor (what an `adjustment` callable receives).
    """

    training: Callable
    normalize: Callable
    moments: Callable
    update: Callable
    shape: Callable


def engine() -> Engine:
    """The `Engine` of the Keras backend in use (`keras.backend.backend()`)."""
    return _engine(keras.backend.backend())


@functools.cache
def _engine(backend: str) -> Engine:
    if backend == "tensorflow":
        import tensorflow as tf

        from tfbn.ops import kernels, nn

        return Engine(
            kernels.training_batch_norm,
            nn.tf_batch_normalization,
            nn.tf_moments,
            nn.moving_statistics_update,
            tf.shape,
        )
    from tfbn.ops import core

    return Engine(
        core.training_batch_norm,
        core.batch_normalization,
        core.moments,
        core.moving_statistics_update,
        core.dynamic_shape,
    )


def tensorflow_module(importer: str):
    """TensorFlow, for a module of tfbn's TensorFlow path (`tfbn.ops.nn`, `kernels`, `reduction`).

    The module itself when the Keras backend is TensorFlow or TensorFlow is imported already;
    otherwise a stand-in that imports TensorFlow on first use and then takes its place in the
    module named `importer`, so that tfbn runs on another backend without importing TensorFlow,
    and `tfbn.legacy` (tf-keras) still finds it.
    """
    if keras.backend.backend() == "tensorflow" or sys.modules.get("tensorflow") is not None:
        return importlib.import_module("tensorflow")
    return _LazyTensorFlow(importer)


class _LazyTensorFlow(types.ModuleType):
    """Imports TensorFlow on the first attribute read and replaces itself in its importer."""

    def __init__(self, importer: str):
        super().__init__("tensorflow")
        self._importer = importer

    def __getattr__(self, name: str):
        tf = importlib.import_module("tensorflow")
        sys.modules[self._importer].tf = tf
        return getattr(tf, name)

"""Stateless batch-normalization ops and the kernels below them.

`tfbn.ops.engine` chooses how tfbn computes on the Keras backend in use: on TensorFlow,
`tfbn.ops.nn` (the math: `moments`, `batch_normalization` and the helpers the layers share),
`tfbn.ops.kernels` (the kernels the layer chooses among: fused, composed, ghost batches) and
`tfbn.ops.reduction` (the exact per-channel sums they are built on); on any other backend,
`tfbn.ops.core`, the same math in `keras.ops`. Importing this package imports no TensorFlow
unless the backend is TensorFlow.
"""

# Keras first: its import imports tfbn's library (`tfbn.LIBRARY_MODULES`), modules of this package
# among them, which must not find a module here half-imported.
import keras  # noqa: F401

from tfbn.ops.core import Moments, canonical_axis
from tfbn.ops.nn import batch_normalization, moments, replica_mean_moments, statistics_dtype

__all__ = [
    "Moments",
    "batch_normalization",
    "canonical_axis",
    "moments",
    "replica_mean_moments",
    "statistics_dtype",
]

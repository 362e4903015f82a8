"""Stateless batch-normalization ops and the kernels below them.

`tfbn.ops.nn` holds the math (`moments`, `batch_normalization` and the helpers the layers share);
`tfbn.ops.kernels` the TensorFlow kernels the layer chooses among (fused, composed, ghost
batches); `tfbn.ops.reduction` the exact per-channel sums they are built on.
"""

from tfbn.ops.nn import (
    Moments,
    batch_normalization,
    canonical_axis,
    moments,
    replica_mean_moments,
    statistics_dtype,
)

__all__ = [
    "Moments",
    "batch_normalization",
    "canonical_axis",
    "moments",
    "replica_mean_moments",
    "statistics_dtype",
]

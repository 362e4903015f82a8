"""Stateless batch-normalization math: moments and normalization with given statistics.

The layer in `tfbn.layers` only keeps the variables and decides the mode; everything it computes
comes from here. All statistics are computed in float32 (or float64 for float64 inputs), whatever
the input dtype, so that float16/bfloat16 activations neither overflow nor lose the variance.

The cross-replica helpers work in a `tf.distribute` replica context (inside `strategy.run`, which
is where `Model.fit` and custom training loops call the model). Outside a strategy they reduce to
the single-device computation.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

__all__ = [
    "Moments",
    "batch_norm",
    "canonical_axis",
    "moments",
    "reduction_axes",
    "replica_mean_moments",
    "statistics_dtype",
]


class Moments(NamedTuple):
    """Per-channel batch statistics.

    Attributes:
        mean: Mean over every axis but the channel axis, shape `(channels,)`.
        variance: Biased variance (divided by the count, as the chapter defines it).
        count: Number of values each channel's statistics were computed from (scalar, float).
    """

    mean: tf.Tensor
    variance: tf.Tensor
    count: tf.Tensor


def canonical_axis(axis: int, rank: int) -> int:
    """Validates a channel axis for an input of rank `rank` and returns it as a non-negative int.

    Raises:
        ValueError: if `rank < 2` or `axis` is not an integer in `[-rank, rank)`.
    """
    if rank is None or rank < 2:
        raise ValueError(
            f"Batch normalization needs inputs of rank 2 or more (a batch axis and a channel axis); "
            f"received an input of rank {rank}."
        )
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise ValueError(f"Argument `axis` must be an integer; received axis={axis!r}.")
    if not -rank <= axis < rank:
        raise ValueError(
            f"Argument `axis` is out of range for an input of rank {rank}: expected an integer in "
            f"[{-rank}, {rank}); received axis={axis}."
        )
    if axis % rank == 0:
        raise ValueError(
            f"Argument `axis` must not be the batch axis 0; received axis={axis} for rank {rank}."
        )
    return axis % rank


def reduction_axes(rank: int, axis: int) -> list[int]:
    """Every axis of a rank-`rank` input but the channel axis: what the statistics average over."""
    axis = canonical_axis(axis, rank)
    return [i for i in range(rank) if i != axis]


def statistics_dtype(dtype: tf.DType) -> tf.DType:
    """The dtype statistics are computed and kept in: float64 for float64 inputs, else float32."""
    dtype = tf.as_dtype(dtype)
    if not dtype.is_floating:
        raise ValueError(
            f"Batch normalization needs a floating-point input; received dtype={dtype.name}."
        )
    return tf.float64 if dtype == tf.float64 else tf.float32


def _broadcast_shape(rank: int, axis: int, channels: tf.Tensor | int) -> list:
    shape = [1] * rank
    shape[axis] = channels
    return shape


def _count(x: tf.Tensor, axes: list[int], dtype: tf.DType) -> tf.Tensor:
    shape = tf.shape(x)
    return tf.cast(tf.reduce_prod(tf.gather(shape, axes)), dtype)


def moments(
    x: tf.Tensor,
    axis: int = -1,
    *,
    mask: tf.Tensor | None = None,
    synchronized: bool = False,
) -> Moments:
    """Batch mean and biased variance per channel.

    Args:
        x: Input tensor of rank >= 2, any floating dtype.
        axis: The channel axis; statistics are taken over every other axis.
        mask: Optional boolean tensor of rank `rank(x) - 1` (every axis but the channel axis, in
            order) or of the same shape as `x`; `False` positions do not count.
        synchronized: If `True` and called in a `tf.distribute` replica context with several
            replicas, the statistics are those of the global batch of all replicas: counts and sums
            are all-reduced first, then the sums of squared deviations from the global mean (two
            passes, so no `E[x^2] - E[x]^2` cancellation). Gradients flow through the all-reduce.

    Returns:
        `Moments(mean, variance, count)`, float32 (float64 for float64 inputs), shape `(channels,)`.
        A channel with no values gets mean 0 and variance 0 and count 0.
    """
    rank = x.shape.rank
    axis = canonical_axis(axis, rank)
    axes = [i for i in range(rank) if i != axis]
    dtype = statistics_dtype(x.dtype)
    x = tf.cast(x, dtype)

    weights = None
    if mask is not None:
        weights = _mask_weights(mask, x, axis, dtype)

    ctx = tf.distribute.get_replica_context()
    sync = synchronized and ctx is not None and ctx.num_replicas_in_sync > 1

    # First pass: sums and counts (all-reduced in one call when synchronized).
    if weights is None:
        total = tf.reduce_sum(x, axes)
        count = _count(x, axes, dtype)
    else:
        total = tf.reduce_sum(x * weights, axes)
        count = tf.reduce_sum(tf.broadcast_to(weights, tf.shape(x)), axes)
        count = count[0] if count.shape.rank else count
    if sync:
        packed = ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.concat([total, count[None]], 0))
        total, count = packed[:-1], packed[-1]
    mean = tf.math.divide_no_nan(total, count)

    # Second pass: centred sum of squares about the (global) mean. Its derivative through the mean
    # is -2 * sum(x - mean) = 0, so the mean's gradient path can be cut here.
    centred = x - tf.reshape(tf.stop_gradient(mean), _broadcast_shape(rank, axis, -1))
    squares = tf.square(centred) if weights is None else tf.square(centred) * weights
    m2 = tf.reduce_sum(squares, axes)
    if sync:
        m2 = ctx.all_reduce(tf.distribute.ReduceOp.SUM, m2)
    variance = tf.math.divide_no_nan(m2, count)
    return Moments(mean, variance, count)


def _mask_weights(mask: tf.Tensor, x: tf.Tensor, axis: int, dtype: tf.DType) -> tf.Tensor:
    """A 0/1 weight tensor broadcastable to `x` from a mask over the non-channel axes."""
    mask = tf.convert_to_tensor(mask)
    rank = x.shape.rank
    if mask.shape.rank == rank - 1:
        mask = tf.expand_dims(mask, axis)
    elif mask.shape.rank != rank:
        raise ValueError(
            f"Argument `mask` must have rank {rank - 1} (the input's axes without the channel "
            f"axis) or {rank}; received a mask of shape {mask.shape} for an input of shape "
            f"{x.shape}."
        )
    return tf.cast(tf.cast(mask, tf.bool), dtype)


def replica_mean_moments(stats: Moments) -> Moments:
    """The count-weighted mean over replicas of per-replica moments.

    This is what the moving statistics of an unsynchronized BatchNorm track under a
    `tf.distribute` strategy: each replica normalizes with its own batch statistics, and every
    replica updates its moving statistics with the same average (one all-reduce of
    `2 * channels + 1` floats), so the copies never drift apart. A replica that received no
    examples (a short last batch) has count 0 and does not contribute. Outside a strategy, or with
    one replica, `stats` is returned unchanged.
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync <= 1:
        return stats
    count = stats.count
    packed = tf.concat([stats.mean * count, stats.variance * count, count[None]], 0)
    packed = ctx.all_reduce(tf.distribute.ReduceOp.SUM, packed)
    channels = tf.shape(stats.mean)[0]
    total = packed[-1]
    mean = tf.math.divide_no_nan(packed[:channels], total)
    variance = tf.math.divide_no_nan(packed[channels : 2 * channels], total)
    return Moments(mean, variance, total)


def batch_norm(
    x: tf.Tensor,
    mean: tf.Tensor,
    variance: tf.Tensor,
    beta: tf.Tensor | None = None,
    gamma: tf.Tensor | None = None,
    epsilon: float = 1e-3,
    axis: int = -1,
) -> tf.Tensor:
    """Normalizes `x` with the given per-channel statistics.

    `gamma * (x - mean) / sqrt(variance + epsilon) + beta`, evaluated as one multiply-add per
    element (`x * scale + shift`), in the dtype of `x`.

    Args:
        x: Input tensor of rank >= 2.
        mean: Per-channel mean, shape `(channels,)`.
        variance: Per-channel variance, shape `(channels,)`.
        beta: Optional per-channel offset; `None` means 0.
        gamma: Optional per-channel scale; `None` means 1.
        epsilon: Small positive float added to the variance.
        axis: The channel axis of `x`.

    Returns:
        A tensor of the shape and dtype of `x`.
    """
    rank = x.shape.rank
    axis = canonical_axis(axis, rank)
    if epsilon <= 0:
        raise ValueError(f"Argument `epsilon` must be positive; received epsilon={epsilon}.")
    dtype = x.dtype
    scale = tf.math.rsqrt(tf.cast(variance, dtype) + tf.cast(epsilon, dtype))
    if gamma is not None:
        scale = scale * tf.cast(gamma, dtype)
    shift = -tf.cast(mean, dtype) * scale
    if beta is not None:
        shift = shift + tf.cast(beta, dtype)
    if axis != rank - 1:
        shape = _broadcast_shape(rank, axis, -1)
        scale = tf.reshape(scale, shape)
        shift = tf.reshape(shift, shape)
    return x * scale + shift

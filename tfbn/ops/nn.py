"""Stateless batch-normalization math: moments and normalization with given statistics.

The layer in `tfbn.layers.batch_norm` only keeps the variables and decides the mode; everything it
computes comes from here. All statistics are computed in float32 (or float64 for float64 inputs),
whatever the input dtype, so that float16/bfloat16 activations neither overflow nor lose the
variance.

The cross-replica helpers work in a `tf.distribute` replica context (inside `strategy.run`, which
is where `Model.fit` and custom training loops call the model). Outside a strategy they reduce to
the single-device computation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from tfbn.ops import reduction

# The checks and `Moments` live in `tfbn.ops.core` (backend-neutral); here for the callers of nn.
from tfbn.ops.core import (  # noqa: F401
    RENORM_CLIPPING_KEYS,
    Moments,
    canonical_axis,
    check_adjustment,
    check_axes,
    check_epsilon,
    check_renorm_clipping,
    check_virtual_batch_size,
)
from tfbn.ops.core import plus as _plus
from tfbn.ops.core import times as _times
from tfbn.ops.engine import engine, tensorflow_module

tf = tensorflow_module(__name__)

__all__ = [
    "Moments",
    "batch_normalization",
    "canonical_axis",
    "moments",
    "replica_mean_moments",
    "statistics_dtype",
]


def statistics_dtype(dtype: tf.DType) -> tf.DType:
    """The dtype statistics are computed and kept in: float64 for float64 inputs, else float32."""
    dtype = tf.as_dtype(dtype)
    if not dtype.is_floating:
        raise ValueError(
            f"Batch normalization needs a floating-point input; received dtype={dtype.name}."
        )
    return tf.float64 if dtype == tf.float64 else tf.float32


def constant(value, dtype: tf.DType) -> tf.Tensor:
    """`value` in `dtype`; a Python float goes straight to `dtype` (`tf.cast` of a Python float
    first rounds it to float32, which puts an error of 1e-9 into every float64 result)."""
    return tf.cast(value, dtype) if tf.is_tensor(value) else tf.constant(value, dtype)


def _broadcast_shape(rank: int, axis: int, channels: tf.Tensor | int) -> list:
    shape = [1] * rank
    shape[axis] = channels
    return shape


class Centred(NamedTuple):
    """The statistics of a `reduction.ChannelLayout` view, and the view shifted by its pivot.

    Attributes:
        mean: Per-channel mean, `(channels,)`.
        variance: Per-channel biased variance.
        count: Per-channel number of values (the sum of the weights).
        shifted: The view minus the per-channel pivot (broadcast); `shifted - offset` is the view
            centred on its mean, without the rounding error of subtracting a large mean.
        offset: `mean - pivot`, per channel.
    """

    mean: tf.Tensor
    variance: tf.Tensor
    count: tf.Tensor
    shifted: tf.Tensor
    offset: tf.Tensor

    @property
    def moments(self) -> Moments:
        """The per-channel `mean`, `variance` and `count` alone, as `Moments`."""
        return Moments(self.mean, self.variance, self.count)


def centred_moments(
    layout: reduction.ChannelLayout,
    count: tf.Tensor,
    pivot: tf.Tensor,
    *,
    weights: tf.Tensor | None = None,
    replica_context=None,
) -> Centred:
    """The batch moments: the one routine every kernel, ghost batches and `recalibrate` use.

    Two passes over the view, both shifted by a per-channel `pivot` (a value of the channel, such
    as its first): the mean is `pivot + sum(w * (x - pivot)) / count`, then the variance is
    `sum(w * ((x - pivot) - (mean - pivot))**2) / count`. The shifted values are of the order of
    the spread of the data, not of its mean, so neither pass loses the variance to rounding (a
    plain float32 mean of values near 1e4 is off by about 1e-4 of the mean, and its error enters
    the variance squared); the layout's sums bound the rounding of long sums
    (`tfbn.ops.reduction`). Gradients flow through both passes (the pivot is a constant).

    Args:
        layout: The view of the input and its per-channel sums.
        count: Per-channel number of values of this replica, `(channels,)` (with `weights`,
            the sums of the weights).
        pivot: Per-channel shift, `(channels,)`, in the view's dtype.
        weights: Optional tensor of `layout.view`'s shape (or broadcastable to it), 1 where a value
            counts and 0 where it does not (any non-negative weights work).
        replica_context: A `tf.distribute` replica context to take the statistics of the global
            batch of all its replicas (two all-reduces: sums and counts, then squared
            deviations), or `None` for this replica's.

    Returns:
        `Centred`, with statistics of zero-count channels 0.
    """
    view, sums, spread = layout.view, layout.sums, layout.spread
    pivot = tf.stop_gradient(pivot)
    shifted = view - spread(pivot)
    total = sums(shifted if weights is None else shifted * weights)
    if replica_context is not None:
        mean, count = _global_mean(replica_context, total, pivot, count)
        offset = mean - pivot
    else:
        offset = tf.math.divide_no_nan(total, count)
        mean = pivot + offset
    # The derivative of the sum of squares through the mean is -2 * sum(x - mean) = 0: the
    # mean's gradient path can be cut here.
    squares = tf.math.squared_difference(shifted, spread(tf.stop_gradient(offset)))
    m2 = sums(squares if weights is None else squares * weights)
    if replica_context is not None:
        m2 = replica_context.all_reduce(tf.distribute.ReduceOp.SUM, m2)
    variance = tf.math.divide_no_nan(m2, count)
    return Centred(mean, variance, count, shifted, offset)


def _global_mean(replica_context, total, pivot, count) -> tuple[tf.Tensor, tf.Tensor]:
    """The mean and count of the global batch, identical on every replica.

    Pivots differ between replicas, so each contributes its sum of values `total + pivot * count`;
    that sum is formed and all-reduced in float64 (at a mean of 1e4 and 2^20 values a float32 sum
    of about 1e10 would keep only a few digits), and the mean comes from the all-reduced sums
    alone, so that every replica holds the same value.
    """
    dtype, wide = total.dtype, tf.float64
    channels = tf.shape(total)[0]
    local = tf.cast(total, wide) + tf.cast(pivot, wide) * tf.cast(count, wide)
    packed = replica_context.all_reduce(
        tf.distribute.ReduceOp.SUM, tf.concat([local, tf.cast(count, wide)], 0)
    )
    mean = tf.math.divide_no_nan(packed[:channels], packed[channels:])
    return tf.cast(mean, dtype), tf.cast(packed[channels:], dtype)


def synchronizing_context(synchronized: bool):
    """The replica context to all-reduce over, or `None` (not synchronized, or one replica)."""
    ctx = tf.distribute.get_replica_context()
    if synchronized and ctx is not None and ctx.num_replicas_in_sync > 1:
        return ctx
    return None


def centred(
    x: tf.Tensor,
    axis: int,
    *,
    weights: tf.Tensor | None = None,
    synchronized: bool = False,
) -> Centred:
    """`centred_moments` of `x` (channel `axis`, any floating dtype, computed in
    `statistics_dtype`) in its `reduction.channel_layout`, pivoted on each channel's first value
    (with weights, on the weighted mean, since the first value may not count); `shifted` comes
    back in the shape of `x`. `.moments` holds the per-channel mean, biased variance and count.

    Args:
        x: Input of rank >= 2, computed in `statistics_dtype(x.dtype)`.
        axis: The channel axis.
        weights: Optional non-negative weights broadcastable to `x` (0: the value does not count).
        synchronized: Statistics of the global batch across `tf.distribute` replicas.
    """
    x = tf.convert_to_tensor(x)
    axis = canonical_axis(axis, x.shape.rank)
    dtype = statistics_dtype(x.dtype)
    x = tf.cast(x, dtype)
    layout = reduction.channel_layout(x, axis)
    if weights is None:
        pivot = reduction.first_values(x, axis)
        count = reduction.element_count(x, axis, dtype)
        w = None
    else:
        w = layout.to_view(tf.broadcast_to(tf.cast(weights, dtype), tf.shape(x)))
        count = layout.sums(w)
        pivot = tf.math.divide_no_nan(layout.sums(layout.view * w), count)
    stats = centred_moments(
        layout, count, pivot, weights=w, replica_context=synchronizing_context(synchronized)
    )
    shifted = tf.ensure_shape(tf.reshape(stats.shifted, tf.shape(x)), x.shape)
    return stats._replace(shifted=shifted)


def _mask_weights(mask: tf.Tensor, x: tf.Tensor, axis: int, dtype: tf.DType) -> tf.Tensor:
    """A 0/1 weight tensor broadcastable to `x` from a mask of rank `rank(x) - 1`.

    Keras's meaning (`keras.layers.BatchNormalization`, tf-keras's too): the mask covers the
    input's axes `0 .. rank - 2` and is broadcast along the last axis, whatever the channel
    `axis`; its size-1 axes broadcast too, and count as the values they cover.
    """
    mask = tf.convert_to_tensor(mask)
    rank = x.shape.rank
    if mask.shape.rank != rank - 1:
        raise ValueError(
            f"Argument `mask` must have rank {rank - 1} (the input's axes but the last); "
            f"received a mask of shape {mask.shape} for an input of shape {x.shape}."
        )
    mask = tf.expand_dims(mask, -1)
    return tf.cast(tf.cast(mask, tf.bool), dtype)


def replica_mean_moments(stats: Moments) -> Moments:
    """The count-weighted mean over replicas of per-replica moments.

    This is what the moving statistics of an unsynchronized BatchNorm track under a
    `tf.distribute` strategy: each replica normalizes with its own batch statistics, and every
    replica updates its moving statistics with the same average (one all-reduce of
    `3 * channels` floats), so the copies never drift apart. A replica that received no
    examples (a short last batch) has count 0 and does not contribute. Outside a strategy, or with
    one replica, `stats` is returned unchanged.
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync <= 1:
        return stats
    count = stats.count
    packed = tf.concat([stats.mean * count, stats.variance * count, count], 0)
    packed = ctx.all_reduce(tf.distribute.ReduceOp.SUM, packed)
    mean, variance, total = tf.split(packed, 3)
    return Moments(
        tf.math.divide_no_nan(mean, total), tf.math.divide_no_nan(variance, total), total
    )


def affine(
    mean: tf.Tensor,
    variance: tf.Tensor,
    scale: tf.Tensor | None,
    offset: tf.Tensor | None,
    epsilon: float,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Batch normalization as one multiply-add: `(a, b)` with `normalized = x * a + b`.

    `a = scale * rsqrt(variance + epsilon)` and `b = offset - mean * a`; `scale=None` means 1
    and `offset=None` means 0. Every normalization in tfbn (training and inference kernels,
    renorm, the folded adjustment) goes through this fold.
    """
    dtype = mean.dtype
    a = tf.math.rsqrt(tf.cast(variance, dtype) + constant(epsilon, dtype))
    if scale is not None:
        a = a * tf.cast(scale, dtype)
    b = -mean * a
    if offset is not None:
        b = b + tf.cast(offset, dtype)
    return a, b


def _floating(name: str, value) -> tf.Tensor:
    """`value` as a tensor of a floating dtype, else a `ValueError` naming the argument."""
    tensor = tf.convert_to_tensor(value)
    if not tensor.dtype.is_floating:
        raise ValueError(
            f"Argument `{name}` must have a floating dtype; received {name} of dtype "
            f"{tensor.dtype.name}."
        )
    return tensor


def moments(x, axes, keepdims=False, synchronized=False):
    """Calculates the mean and variance of `x` over `axes`: `keras.ops.moments`, exactly.

    Same arguments, defaults and return values as `keras.ops.moments`, so either can replace
    the other, on the TensorFlow and JAX backends (`tfbn.ops.engine`). The statistics are computed
    by `centred_moments` (`tfbn.ops.core.centred` off TensorFlow: two passes shifted by a value of
    the data, with bounded float32 sums), so they do not lose the variance of data with a large
    mean: at `|mean| / std = 1e4` the float32 variance of up to 2^20 values per statistic is
    within 1e-4 of the float64 one (tests/test_statistics.py). float16/bfloat16 inputs are
    computed in float32 and the results cast back (clipped to the float16 range), as Keras does.

    Args:
        x: Input tensor of a floating dtype.
        axes: A list of axes (or one axis) over which to compute mean and variance.
        keepdims: If `True`, the reduced axes are kept with size one.
        synchronized: If `True`, in a `tf.distribute` replica context with several replicas,
            the statistics are those of the global batch of all replicas (gradients flow through
            the all-reduce). If `False`, each replica uses its own batch. Under
            `keras.distribution` on JAX the statistics are those of the global batch either way.

    Returns:
        A tuple `(mean, variance)` (the biased variance), of the input's dtype.

    Examples:
        >>> x = tf.constant([0, 1, 2, 3, 100], dtype="float32")
        >>> [round(float(t), 2) for t in tfbn.moments(x, axes=[0])]
        [21.2, 1553.36]
    """
    return engine().moments(x, axes, keepdims=keepdims, synchronized=synchronized)


def tf_moments(x, axes, keepdims=False, synchronized=False):
    """`moments` on TensorFlow: statistics by `centred_moments`, across `tf.distribute` replicas
    with `synchronized`."""
    x = _floating("x", x)
    rank = x.shape.rank
    axes = check_axes(axes, rank)
    kept = [i for i in range(rank) if i not in axes]
    shape = tf.shape(x)
    # The result's shape: the kept axes, or every axis with the reduced ones of size 1.
    picks = [i if i in kept else rank for i in range(rank)] if keepdims else kept
    out_shape = tf.gather(tf.concat([shape, [1]], 0), tf.constant(picks, tf.int32))
    if kept and kept != list(range(kept[0], kept[-1] + 1)):
        x = tf.transpose(x, axes + kept)  # the kept axes together, last
        kept = list(range(len(axes), rank))
    # An (outer, kept, inner) view, (outer, kept) when nothing follows the kept axes.
    start, stop = (kept[0], kept[-1] + 1) if kept else (rank, rank)
    static = x.shape[start:stop]
    channels = static.num_elements() if static.is_fully_defined() else None
    if channels is None:
        channels = tf.reduce_prod(tf.shape(x)[start:stop])
    view_shape = (
        [-1, channels] if stop == rank else [-1, channels, tf.reduce_prod(tf.shape(x)[stop:])]
    )
    stats = centred(tf.reshape(x, view_shape), 1, synchronized=synchronized)
    mean, variance = (tf.reshape(t, out_shape) for t in (stats.mean, stats.variance))
    if x.dtype in (tf.float16, tf.bfloat16):
        mean, variance = (
            tf.cast(tf.clip_by_value(t, tf.float16.min, tf.float16.max), x.dtype)
            for t in (mean, variance)
        )
    return mean, variance


def batch_normalization(x, mean, variance, axis, offset=None, scale=None, epsilon=1e-3):
    """Normalizes `x` by `mean` and `variance`: `keras.ops.batch_normalization`, exactly.

    Same arguments, defaults and result as `keras.ops.batch_normalization`:
    `scale * (x - mean) / sqrt(variance + epsilon) + offset`, in the dtype of `x`: on TensorFlow
    as one multiply-add per element (`affine`), on other backends as `(x - mean) * (scale *
    rsqrt(variance + epsilon)) + offset` (`tfbn.ops.core.batch_normalization`).

    Args:
        x: Input tensor of a floating dtype.
        mean: A mean vector of the length of the `axis` dimension of `x`.
        variance: A variance vector of the length of the `axis` dimension of `x`.
        axis: Integer, the axis that is normalized.
        offset: An offset vector of that length, added to the normalized tensor, or `None`.
        scale: A scale vector of that length, multiplied with the normalized tensor, or `None`.
        epsilon: A finite float > 0 added to the variance.

    Returns:
        The normalized tensor, of the shape and dtype of `x`.

    Raises:
        ValueError: before any work, for a non-floating `x` or vector, an `axis` out of range,
            a vector not of shape `(x.shape[axis],)`, or an `epsilon` not finite and > 0.

    Example:

    >>> x = tf.constant([[0.0, 10.0], [2.0, 30.0]])
    >>> tfbn.batch_normalization(x, [1.0, 20.0], [1.0, 100.0], axis=-1, epsilon=1e-9).numpy()
    array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
    """
    return engine().normalize(x, mean, variance, axis, offset=offset, scale=scale, epsilon=epsilon)


def tf_batch_normalization(x, mean, variance, axis, offset=None, scale=None, epsilon=1e-3):
    """`batch_normalization` on TensorFlow, as one multiply-add per element (`affine`)."""
    x = _floating("x", x)
    rank = x.shape.rank
    if isinstance(axis, bool) or not isinstance(axis, int) or not -rank <= axis < rank:
        raise ValueError(
            f"Argument `axis` must be an integer in [{-rank}, {rank}) for an input of rank "
            f"{rank}; received axis={axis!r}."
        )
    axis %= rank
    epsilon = check_epsilon(epsilon)
    vectors = {"mean": mean, "variance": variance, "offset": offset, "scale": scale}
    for name, value in vectors.items():
        if value is None:
            continue
        value = _floating(name, value)
        channels = x.shape[axis]
        if value.shape.rank != 1 or (
            channels is not None and value.shape[0] not in (None, channels)
        ):
            raise ValueError(
                f"Argument `{name}` must be a vector of length {channels} (the size of axis "
                f"{axis} of `x`, of shape {x.shape}); received {name} of shape {value.shape}."
            )
        vectors[name] = tf.cast(value, x.dtype)
    a, b = affine(
        vectors["mean"], vectors["variance"], vectors["scale"], vectors["offset"], epsilon
    )
    if axis != rank - 1:
        a, b = (tf.reshape(t, _broadcast_shape(rank, axis, -1)) for t in (a, b))
    return x * a + b


# ---------------------------------------------------------------------------------------------
# Options: ghost batches, batch renormalization, adjustment, moving-statistics updates.
#
# The two layers (`tfbn.BatchNorm` on Keras 3 and `tfbn.legacy.BatchNorm` on tf-keras) share
# everything below: they only read their variables, call `batch_norm_training` or `batch_norm`,
# and assign what `moving_statistics_update` returns.
# ---------------------------------------------------------------------------------------------


def fold_adjustment(adj_scale, adj_bias, gamma, beta, shape, axis: int):
    """`(gamma * scale, gamma * bias + beta)` when the adjustment is per channel, else `None`.

    Per channel means both values have shape `()`, `(1,)` or `(channels,)` for the last axis, or
    any shape broadcastable to the input with size 1 on every axis but the channel axis.
    `gamma`/`beta` of `None` mean 1/0; the result is in their dtype (float32 if both are `None`).
    """
    shape = tf.TensorShape(shape)
    rank, channels = shape.rank, shape[axis]
    dtype = next((v.dtype for v in (gamma, beta) if v is not None), tf.float32)
    per_channel = []
    for value in (adj_scale, adj_bias):
        value = tf.cast(tf.convert_to_tensor(value), dtype)
        if value.shape.rank is None or value.shape.rank > rank or channels is None:
            return None
        dims = [1] * (rank - value.shape.rank) + list(value.shape)
        others = [d for i, d in enumerate(dims) if i != axis]
        if any(d != 1 for d in others) or dims[axis] not in (1, channels):
            return None
        per_channel.append(tf.broadcast_to(tf.reshape(value, [-1]), [channels]))
    scale, bias = per_channel
    return _times(gamma, scale), _plus(_times(gamma, bias), beta)


def virtual_batch_view(x: tf.Tensor, virtual_batch_size: int) -> tf.Tensor:
    """Reshapes `(n, ...)` to `(virtual_batch_size, n // virtual_batch_size, ...)`.

    Raises a `ValueError` (a known batch size) or an `InvalidArgumentError` at run time (an
    unknown one) when `virtual_batch_size` does not divide `n`.

    Virtual batch `j` (index `j` on the new axis 1) holds examples `j, j + g, j + 2g, ...` with
    `g = n // virtual_batch_size`: the grouping tf-keras uses, so that the two agree.
    """
    batch = x.shape[0]
    if batch is not None and batch % virtual_batch_size:
        raise ValueError(
            f"Argument `virtual_batch_size` must divide the batch size: received a batch of "
            f"{batch} with virtual_batch_size={virtual_batch_size}."
        )
    shape = tf.shape(x)
    if batch is None:
        check = tf.debugging.assert_equal(
            shape[0] % virtual_batch_size,
            0,
            message=f"virtual_batch_size={virtual_batch_size} must divide the batch size",
        )
        # Before the reshape, whose own error would not name the argument.
        with tf.control_dependencies([check]):
            x = tf.identity(x)
    return tf.reshape(x, tf.concat([[virtual_batch_size, -1], shape[1:]], 0))


class GhostView(NamedTuple):
    """An input with its virtual batches merged into the channel axis (see `ghost_view`)."""

    merged: tf.Tensor
    groups: tf.Tensor
    to_merged: Callable
    from_merged: Callable


def ghost_view(x: tf.Tensor, axis: int, virtual_batch_size: int) -> GhostView:
    """`x` with each virtual batch's channels as channels of their own.

    The `(virtual_batch_size, g, ...)` view (`virtual_batch_view`) gets its group axis moved just
    before the channel axis and merged with it: channel `j * C + c` of `merged` is channel `c` of
    virtual batch `j`, so per-channel statistics of `merged` are per-virtual-batch statistics of
    `x`. With the channel axis 1 this is a reshape; otherwise it costs a transpose.
    `to_merged` applies the same to any tensor of `x`'s shape; `from_merged` undoes it.
    """
    rank = x.shape.rank
    axis = canonical_axis(axis, rank)
    # (vbs, g, d1, .., C, ..) -> (vbs, d1, .., g, C, ..): the group axis just before the channel.
    perm = [0, *range(2, axis + 1), 1, *range(axis + 1, rank + 1)]
    inverse = [perm.index(i) for i in range(rank + 1)]
    grouped_shape = tf.shape(virtual_batch_view(x, virtual_batch_size))
    moved_shape = tf.gather(grouped_shape, perm)
    merged_shape = tf.concat([moved_shape[:axis], [-1], moved_shape[axis + 2 :]], 0)

    def to_merged(t):
        t = tf.reshape(t, grouped_shape)
        return tf.reshape(t if axis == 1 else tf.transpose(t, perm), merged_shape)

    def from_merged(t):
        t = tf.reshape(t, moved_shape)
        t = t if axis == 1 else tf.transpose(t, inverse)
        return tf.ensure_shape(tf.reshape(t, tf.shape(x)), x.shape)

    return GhostView(to_merged(x), grouped_shape[1], to_merged, from_merged)


def _weighted_input(x: tf.Tensor, axis: int, mask, weights):
    """`(x, axis, dtype, weights)`: `x` cast to its `statistics_dtype` (`dtype`), `axis` as
    `canonical_axis` gives it, and the weights: those of `mask` (`_mask_weights`) when a mask is
    given, else `weights` as given (`None` or broadcastable to `x`).

    Raises:
        ValueError: for an axis out of range or a mask whose rank is not `rank(x) - 1`.
    """
    axis = canonical_axis(axis, x.shape.rank)
    dtype = statistics_dtype(x.dtype)
    x = tf.cast(x, dtype)
    if mask is not None:
        weights = _mask_weights(mask, x, axis, dtype)
    return x, axis, dtype, weights


def ghost_moments(
    x: tf.Tensor,
    axis: int,
    virtual_batch_size: int,
    *,
    mask: tf.Tensor | None = None,
    weights: tf.Tensor | None = None,
) -> Moments:
    """Per-channel moments of each virtual ("ghost") batch (Hoffer et al., 2017).

    Args:
        x: Input of rank >= 2 whose batch size `n` is a multiple of `virtual_batch_size`.
        axis: The channel axis (not 0).
        virtual_batch_size: Examples per virtual batch; there are `g = n // virtual_batch_size`
            of them, grouped as described in `virtual_batch_view`.
        mask: Optional boolean tensor of rank `rank(x) - 1`, Keras's meaning (`_mask_weights`).
        weights: Optional non-negative weights broadcastable to `x` (0: the value does not
            count).

    Returns:
        `Moments` with `mean`, biased `variance` and `count` of shape `(g, channels)`, float32
        (float64 for float64 inputs), by `centred` on the merged view (`ghost_view`).

    Raises:
        ValueError: if the batch size is known and not a multiple of `virtual_batch_size`, or the
            mask does not have rank `rank(x) - 1`.
    """
    x, axis, dtype, weights = _weighted_input(x, axis, mask, weights)
    view = ghost_view(x, axis, virtual_batch_size)
    if weights is not None:
        weights = view.to_merged(tf.broadcast_to(tf.cast(weights, dtype), tf.shape(x)))
    stats = centred(view.merged, axis, weights=weights).moments
    channels = x.shape[axis] if x.shape[axis] is not None else tf.shape(x)[axis]
    return Moments(*(tf.reshape(t, [-1, channels]) for t in stats))


def pool_moments(stats: Moments) -> Moments:
    """Pools per-virtual-batch moments `(g, channels)` into per-channel moments.

    Mean and variance are the count-weighted means over virtual batches (the mean of the virtual
    batches' variances, which is what the moving variance of ghost batch normalization tracks, as
    in tf-keras); the count is their sum.
    """
    count = stats.count
    total = tf.reduce_sum(count, 0)
    weights = tf.math.divide_no_nan(count, total)
    mean = tf.reduce_sum(stats.mean * weights, 0)
    variance = tf.reduce_sum(stats.variance * weights, 0)
    return Moments(mean, variance, total)


def renorm_correction(
    mean: tf.Tensor,
    variance: tf.Tensor,
    renorm_mean: tf.Tensor,
    renorm_stddev: tf.Tensor,
    epsilon: float,
    clipping: dict | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """The batch-renormalization correction `(r, d)` (Ioffe, 2017), without gradient.

    `r = sigma_B / sigma`, `d = (mu_B - mu) / sigma`, where `sigma_B = sqrt(variance + epsilon)`
    and `(mu, sigma)` are the renorm moving averages (`sigma` at least `sqrt(epsilon)`, so the
    first steps do not divide by 0); then `r` is clipped to `[rmin, rmax]` and `d` to
    `[-dmax, dmax]`. The training output is `gamma * (x_hat * r + d) + beta`.

    Args:
        mean: Batch mean, shape `(channels,)`.
        variance: Batch (biased) variance.
        renorm_mean: Moving mean used for the correction.
        renorm_stddev: Moving standard deviation used for the correction.
        epsilon: The layer's variance epsilon.
        clipping: A dict validated by `check_renorm_clipping` (missing keys: no clipping).

    Returns:
        `(r, d)` in the dtype of `mean`, with stopped gradients.
    """
    clipping = check_renorm_clipping(clipping)
    dtype = mean.dtype
    eps = constant(epsilon, dtype)
    stddev = tf.sqrt(variance + eps)
    sigma = tf.maximum(tf.cast(renorm_stddev, dtype), tf.sqrt(eps))
    r = stddev / sigma
    d = (mean - tf.cast(renorm_mean, dtype)) / sigma
    if "rmin" in clipping:
        r = tf.maximum(r, constant(clipping["rmin"], dtype))
    if "rmax" in clipping:
        r = tf.minimum(r, constant(clipping["rmax"], dtype))
    if "dmax" in clipping:
        dmax = constant(clipping["dmax"], dtype)
        d = tf.clip_by_value(d, -dmax, dmax)
    return tf.stop_gradient(r), tf.stop_gradient(d)


def batch_norm_training(
    x: tf.Tensor,
    axis: int = -1,
    *,
    beta: tf.Tensor | None = None,
    gamma: tf.Tensor | None = None,
    epsilon: float = 1e-3,
    mask: tf.Tensor | None = None,
    weights: tf.Tensor | None = None,
    synchronized: bool = False,
    virtual_batch_size: int | None = None,
    renorm_mean: tf.Tensor | None = None,
    renorm_stddev: tf.Tensor | None = None,
    renorm_clipping: dict | None = None,
    adjustment=None,
) -> tuple[tf.Tensor, Moments]:
    """Training-mode batch normalization with every option, by the reference path.

    The output is `gamma * ((x_hat * r + d) * a + b) + beta`, where `x_hat` is `x` normalized with
    the statistics of its batch (or of its virtual batch), `(r, d)` the batch-renormalization
    correction (`(1, 0)` without renorm) and `(a, b) = adjustment(tf.shape(x))` (`(1, 0)`
    without). Gradients flow through the batch statistics (and `a`, `b`, as in tf-keras), not
    through `r` and `d`.

    Args:
        x: Input of rank >= 2.
        axis: The channel axis.
        beta: Optional per-channel offset.
        gamma: Optional per-channel scale.
        epsilon: Variance epsilon.
        mask: Optional boolean tensor of rank `rank(x) - 1`, Keras's meaning (`_mask_weights`);
            masked positions do not count.
        weights: Optional weights broadcastable to `x` (instead of `mask`; 0: does not count).
        synchronized: Global-batch statistics across `tf.distribute` replicas (see `moments`).
        virtual_batch_size: If set, ghost batch normalization: each virtual batch is normalized
            with its own statistics (`ghost_moments`).
        renorm_mean: With `renorm_stddev`, turns on batch renormalization (see
            `renorm_correction`).
        renorm_stddev: The renorm moving standard deviation.
        renorm_clipping: Clipping of `(r, d)`.
        adjustment: Optional callable `shape -> (scale, bias)`, both broadcastable to `x`.

    Returns:
        `(y, moments)`: `y` in the statistics dtype (float32, or float64 for float64 inputs);
        `moments` the per-channel batch statistics the moving averages track (pooled over
        virtual batches), from this replica or, if synchronized, from the global batch.
    """
    rank = x.shape.rank
    x, axis, dtype, weights = _weighted_input(x, axis, mask, weights)
    if weights is not None:
        weights = tf.broadcast_to(tf.cast(weights, dtype), tf.shape(x))
    ghost = None
    if virtual_batch_size is not None:
        check_virtual_batch_size(virtual_batch_size, synchronized)
        ghost = ghost_view(x, axis, virtual_batch_size)
        weights = None if weights is None else ghost.to_merged(weights)
    merged = x if ghost is None else ghost.merged
    stats = centred(merged, axis, weights=weights, synchronized=synchronized)
    moments_ = stats.moments
    if ghost is not None:
        channels = x.shape[axis] if x.shape[axis] is not None else tf.shape(x)[axis]
        moments_ = pool_moments(Moments(*(tf.reshape(t, [-1, channels]) for t in moments_)))

    def merged_channels(value):
        """A per-channel vector for the merged channels (tiled over the virtual batches)."""
        if value is None:
            return None
        value = tf.reshape(tf.cast(value, dtype), [-1])
        return value if ghost is None else tf.tile(value, [ghost.groups])

    def broadcast(value):
        return tf.reshape(value, _broadcast_shape(rank, axis, -1))

    r = d = None
    if renorm_mean is not None or renorm_stddev is not None:
        if renorm_mean is None or renorm_stddev is None:
            raise ValueError("Batch renormalization needs both `renorm_mean` and `renorm_stddev`.")
        r, d = renorm_correction(
            moments_.mean, moments_.variance, renorm_mean, renorm_stddev, epsilon, renorm_clipping
        )
    r, d, gamma_m, beta_m = map(merged_channels, (r, d, gamma, beta))
    if adjustment is None:
        # gamma * (x_hat * r + d) + beta as one multiply-add on the shifted values.
        scale = _times(r, gamma_m)
        offset = _plus(None if d is None else _times(d, gamma_m), beta_m)
        a, b = affine(stats.offset, stats.variance, scale, offset, epsilon)
        y = stats.shifted * broadcast(a) + broadcast(b)
        return (y if ghost is None else ghost.from_merged(y)), moments_
    a, b = affine(stats.offset, stats.variance, r, d, epsilon)
    z = stats.shifted * broadcast(a) + broadcast(b)
    z = z if ghost is None else ghost.from_merged(z)
    adj_scale, adj_bias = adjustment(tf.shape(x))
    z = z * tf.cast(adj_scale, dtype) + tf.cast(adj_bias, dtype)
    if gamma is not None:
        z = z * broadcast(tf.cast(gamma, dtype))
    if beta is not None:
        z = z + broadcast(tf.cast(beta, dtype))
    return z, moments_


def bessel_corrected(stats: Moments) -> Moments:
    """The same moments with the unbiased variance `variance * n / (n - 1)` (0 when n <= 1).

    tf-keras's fused kernel moves its moving variance towards this value; the legacy layer does the
    same with `fused` so that its moving statistics match.
    """
    count = tf.cast(stats.count, stats.variance.dtype)
    factor = tf.math.divide_no_nan(count, tf.maximum(count - 1.0, 0.0))
    return Moments(stats.mean, stats.variance * factor, stats.count)


def moving_statistics_update(
    stats: Moments,
    moving: dict,
    *,
    momentum: float,
    epsilon: float,
    synchronized: bool = False,
    renorm_momentum: float | None = None,
) -> dict:
    """New values of a layer's moving statistics after one training batch.

    `value <- momentum * value + (1 - momentum) * batch_value` for `moving_mean` and
    `moving_variance`. With batch renormalization (`moving` holds `moving_stddev`, `renorm_mean`
    and `renorm_stddev`): `renorm_mean`/`renorm_stddev` move with `renorm_momentum` towards the
    batch mean and `sqrt(variance + epsilon)`, `moving_stddev` moves with `momentum` towards the
    latter, and `moving_variance = max(moving_stddev ** 2 - epsilon, 0)` (as in Keras).

    Without `synchronized`, under a `tf.distribute` strategy the batch statistics are first
    averaged over replicas (`replica_mean_moments`), so every replica's copy gets the same value.
    A batch without examples leaves every value unchanged.

    Args:
        stats: Per-channel batch statistics, as returned by `batch_norm_training` or `moments`.
        moving: Dict of the current values, keyed by variable name.
        momentum: Momentum of the inference moving averages.
        epsilon: Variance epsilon.
        synchronized: Whether `stats` are already global-batch statistics.
        renorm_momentum: Momentum of the renorm moving averages (needed with renorm).

    Returns:
        Dict with a new value for every key of `moving`, each in its dtype.
    """
    if not synchronized:
        stats = replica_mean_moments(stats)
    dtype = stats.mean.dtype
    seen = stats.count > 0
    targets = {"moving_mean": (stats.mean, momentum)}
    renorm = "renorm_mean" in moving
    stddev = tf.sqrt(stats.variance + constant(epsilon, dtype))
    if renorm:
        if renorm_momentum is None:
            raise ValueError("Batch renormalization needs `renorm_momentum`.")
        targets["moving_stddev"] = (stddev, momentum)
        targets["renorm_mean"] = (stats.mean, renorm_momentum)
        targets["renorm_stddev"] = (stddev, renorm_momentum)
    else:
        targets["moving_variance"] = (stats.variance, momentum)
    new = {}
    for name, (value, decay) in targets.items():
        old = tf.cast(moving[name], dtype)
        new[name] = tf.where(seen, old * decay + value * (1.0 - decay), old)
    if renorm:
        variance = tf.nn.relu(tf.square(new["moving_stddev"]) - constant(epsilon, dtype))
        new["moving_variance"] = variance
    return {name: tf.cast(value, tf.as_dtype(moving[name].dtype)) for name, value in new.items()}

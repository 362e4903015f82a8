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
            "Batch normalization needs inputs of rank 2 or more (a batch axis and a channel "
            f"axis); received an input of rank {rank}."
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
            order); `False` positions do not count.
        synchronized: If `True` and called in a `tf.distribute` replica context with several
            replicas, the statistics are those of the global batch of all replicas: counts and sums
            are all-reduced first, then the sums of squared deviations from the global mean (two
            passes, so no `E[x^2] - E[x]^2` cancellation). Gradients flow through the all-reduce.

    Returns:
        `Moments(mean, variance, count)`, float32 (float64 for float64 inputs), shape `(channels,)`.
        A channel with no values gets mean 0 and variance 0 and count 0.
    """
    x = tf.convert_to_tensor(x)
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
        # The weights have size 1 on the channel axis: one count serves every channel.
        count = tf.reduce_sum(weights)
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
    """A 0/1 weight tensor broadcastable to `x` from a mask over the non-channel axes.

    Only masks without the channel axis are accepted: every channel of a position is then counted
    alike, so one count serves all channels.
    """
    mask = tf.convert_to_tensor(mask)
    rank = x.shape.rank
    if mask.shape.rank != rank - 1:
        raise ValueError(
            f"Argument `mask` must have rank {rank - 1} (the input's axes without the channel "
            f"axis); received a mask of shape {mask.shape} for an input of shape {x.shape}."
        )
    mask = tf.expand_dims(mask, axis)
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
    x = tf.convert_to_tensor(x)
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


# ---------------------------------------------------------------------------------------------
# Options: ghost batches, batch renormalization, adjustment, moving-statistics updates.
#
# The two layers (`tfbn.BatchNorm` on Keras 3 and `tfbn.legacy.BatchNorm` on tf-keras) share
# everything below: they only read their variables, call `batch_norm_training` or `batch_norm`,
# and assign what `moving_statistics_update` returns.
# ---------------------------------------------------------------------------------------------

RENORM_CLIPPING_KEYS = ("rmax", "rmin", "dmax")


def check_renorm_clipping(renorm_clipping) -> dict:
    """Validates a batch-renormalization clipping dictionary and returns it with float values.

    Args:
        renorm_clipping: `None` or a dict with optional keys `"rmax"`, `"rmin"`, `"dmax"`.
            A missing key (or `None`) means no clipping on that side (`inf`, `0`, `inf`).

    Returns:
        A new dict holding only the keys given, as Python floats.

    Raises:
        ValueError: if it is not a dict, has other keys or non-numeric values, `rmax < rmin`,
            or `dmax < 0`.
    """
    if renorm_clipping is None:
        return {}
    if not isinstance(renorm_clipping, dict):
        raise ValueError(
            "Argument `renorm_clipping` must be a dict with optional keys 'rmax', 'rmin', "
            f"'dmax'; received renorm_clipping={renorm_clipping!r}."
        )
    unknown = sorted(set(renorm_clipping) - set(RENORM_CLIPPING_KEYS), key=str)
    if unknown:
        raise ValueError(
            f"Argument `renorm_clipping` has unknown keys {unknown}: expected a subset of "
            f"{list(RENORM_CLIPPING_KEYS)}; received renorm_clipping={renorm_clipping!r}."
        )
    clipping = {}
    for key, value in renorm_clipping.items():
        if value is None:
            continue
        try:
            clipping[key] = float(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"Argument `renorm_clipping` needs numbers; received {key}={value!r}."
            ) from None
    rmax, rmin, dmax = (clipping.get(k) for k in RENORM_CLIPPING_KEYS)
    if rmax is not None and rmin is not None and rmax < rmin:
        raise ValueError(
            f"Argument `renorm_clipping` needs rmax >= rmin; received rmax={rmax}, rmin={rmin}."
        )
    if dmax is not None and dmax < 0:
        raise ValueError(f"Argument `renorm_clipping` needs dmax >= 0; received dmax={dmax}.")
    return clipping


def check_virtual_batch_size(virtual_batch_size, synchronized: bool = False) -> int | None:
    """Validates a ghost-batch size: `None` or a positive int, not combined with `synchronized`.

    Raises:
        ValueError: if it is not a positive integer, or `synchronized` is also set (a virtual
            batch is a slice of one replica's batch; synchronizing it has no meaning).
    """
    if virtual_batch_size is None:
        return None
    if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int):
        raise ValueError(
            "Argument `virtual_batch_size` must be a positive integer or None; received "
            f"virtual_batch_size={virtual_batch_size!r}."
        )
    if virtual_batch_size <= 0:
        raise ValueError(
            "Argument `virtual_batch_size` must be a positive integer; received "
            f"virtual_batch_size={virtual_batch_size}."
        )
    if synchronized:
        raise ValueError(
            "Argument `virtual_batch_size` cannot be combined with synchronized=True: ghost "
            "batches are sub-batches of one replica's batch; received "
            f"virtual_batch_size={virtual_batch_size}, synchronized=True."
        )
    return virtual_batch_size


def check_adjustment(adjustment):
    """Validates an `adjustment` argument: `None` or a callable `shape -> (scale, bias)`.

    Raises:
        ValueError: if it is neither `None` nor callable.
    """
    if adjustment is not None and not callable(adjustment):
        raise ValueError(
            "Argument `adjustment` must be None or a callable taking the input's shape and "
            f"returning (scale, bias); received adjustment={adjustment!r}."
        )
    return adjustment


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


def ghost_moments(
    x: tf.Tensor,
    axis: int,
    virtual_batch_size: int,
    *,
    mask: tf.Tensor | None = None,
) -> Moments:
    """Per-channel moments of each virtual ("ghost") batch (Hoffer et al., 2017).

    Args:
        x: Input of rank >= 2 whose batch size `n` is a multiple of `virtual_batch_size`.
        axis: The channel axis (not 0).
        virtual_batch_size: Examples per virtual batch; there are `g = n // virtual_batch_size`
            of them, grouped as described in `virtual_batch_view`.
        mask: Optional boolean tensor of rank `rank(x) - 1` (as in `moments`).

    Returns:
        `Moments` with `mean` and biased `variance` of shape `(g, channels)` and `count` of shape
        `(g,)`, float32 (float64 for float64 inputs).

    Raises:
        ValueError: if the batch size is known and not a multiple of `virtual_batch_size`, or the
            mask does not have rank `rank(x) - 1`.
    """
    rank = x.shape.rank
    axis = canonical_axis(axis, rank)
    dtype = statistics_dtype(x.dtype)
    xg = virtual_batch_view(tf.cast(x, dtype), virtual_batch_size)
    axes = [i for i in range(rank + 1) if i not in (1, axis + 1)]
    if mask is None:
        weights = None
        count = _count(xg, axes, dtype) * tf.ones(tf.shape(xg)[1:2], dtype)
        total = tf.reduce_sum(xg, axes, keepdims=True)
    else:
        mask = tf.convert_to_tensor(mask)
        if mask.shape.rank != rank - 1:
            raise ValueError(
                f"Argument `mask` must have rank {rank - 1} (the input's axes without the channel "
                f"axis) with virtual batches; received a mask of shape {mask.shape} for an input "
                f"of shape {x.shape}."
            )
        weights = virtual_batch_view(tf.cast(tf.cast(mask, tf.bool), dtype), virtual_batch_size)
        weights = tf.expand_dims(weights, axis + 1)
        per_group = [i for i in range(rank + 1) if i != 1]
        count = tf.reduce_sum(weights, per_group)
        total = tf.reduce_sum(xg * weights, axes, keepdims=True)
    count_b = tf.reshape(count, [1, -1] + [1] * (rank - 1))
    mean = tf.math.divide_no_nan(total, count_b)
    centred = xg - tf.stop_gradient(mean)
    squares = tf.square(centred) if weights is None else tf.square(centred) * weights
    variance = tf.math.divide_no_nan(tf.reduce_sum(squares, axes, keepdims=True), count_b)
    # Drop the reduced singleton axes of (1, g, 1, .., channels, 1, ..).
    keep = [i for i in range(rank + 1) if i not in axes]
    mean = tf.reshape(mean, tf.gather(tf.shape(mean), keep))
    variance = tf.reshape(variance, tf.gather(tf.shape(variance), keep))
    return Moments(mean, variance, count)


def pool_moments(stats: Moments) -> Moments:
    """Pools per-virtual-batch moments `(g, channels)` into per-channel moments.

    Mean and variance are the count-weighted means over virtual batches (the mean of the virtual
    batches' variances, which is what the moving variance of ghost batch normalization tracks, as
    in tf-keras); the count is their sum.
    """
    count = stats.count
    total = tf.reduce_sum(count)
    weights = tf.math.divide_no_nan(count, total)[:, None]
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
    eps = tf.cast(epsilon, dtype)
    stddev = tf.sqrt(variance + eps)
    sigma = tf.maximum(tf.cast(renorm_stddev, dtype), tf.sqrt(eps))
    r = stddev / sigma
    d = (mean - tf.cast(renorm_mean, dtype)) / sigma
    if "rmin" in clipping:
        r = tf.maximum(r, tf.cast(clipping["rmin"], dtype))
    if "rmax" in clipping:
        r = tf.minimum(r, tf.cast(clipping["rmax"], dtype))
    if "dmax" in clipping:
        dmax = tf.cast(clipping["dmax"], dtype)
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
        mask: Optional boolean tensor over the non-channel axes; masked positions do not count.
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
    axis = canonical_axis(axis, rank)
    dtype = statistics_dtype(x.dtype)
    x = tf.cast(x, dtype)
    if virtual_batch_size is not None:
        check_virtual_batch_size(virtual_batch_size, synchronized)
        groups = ghost_moments(x, axis, virtual_batch_size, mask=mask)
        stats = pool_moments(groups)
        # Statistics broadcast against the (virtual_batch_size, g, ...) view of x.
        shape = [1] * (rank + 1)
        shape[1] = -1
        shape[axis + 1] = tf.shape(x)[axis]
        mean_b = tf.reshape(groups.mean, shape)
        inv_b = tf.reshape(tf.math.rsqrt(groups.variance + tf.cast(epsilon, dtype)), shape)
        xv = virtual_batch_view(x, virtual_batch_size)
    else:
        stats = moments(x, axis, mask=mask, synchronized=synchronized)
        shape = _broadcast_shape(rank, axis, -1)
        mean_b = tf.reshape(stats.mean, shape)
        inv_b = tf.reshape(tf.math.rsqrt(stats.variance + tf.cast(epsilon, dtype)), shape)
        xv = x
    channel_shape = [1] * xv.shape.rank
    channel_shape[(axis + 1) if virtual_batch_size is not None else axis] = -1

    def per_channel(value):
        return None if value is None else tf.reshape(tf.cast(value, dtype), channel_shape)

    r = d = None
    if renorm_mean is not None or renorm_stddev is not None:
        if renorm_mean is None or renorm_stddev is None:
            raise ValueError("Batch renormalization needs both `renorm_mean` and `renorm_stddev`.")
        r, d = renorm_correction(
            stats.mean, stats.variance, renorm_mean, renorm_stddev, epsilon, renorm_clipping
        )
    gamma_b, beta_b, r_b, d_b = map(per_channel, (gamma, beta, r, d))

    if adjustment is None:
        # Fold everything into one multiply-add per element: y = x * scale + shift.
        scale = inv_b if r_b is None else inv_b * r_b
        shift = None if d_b is None else d_b
        if gamma_b is not None:
            scale = scale * gamma_b
            shift = None if shift is None else shift * gamma_b
        shift = -mean_b * scale if shift is None else shift - mean_b * scale
        if beta_b is not None:
            shift = shift + beta_b
        y = xv * scale + shift
        if virtual_batch_size is not None:
            y = tf.ensure_shape(tf.reshape(y, tf.shape(x)), x.shape)
        return y, stats

    z = (xv - mean_b) * (inv_b if r_b is None else inv_b * r_b)
    if d_b is not None:
        z = z + d_b
    if virtual_batch_size is not None:
        z = tf.ensure_shape(tf.reshape(z, tf.shape(x)), x.shape)
        gamma_b, beta_b = (
            None if v is None else tf.reshape(tf.cast(v, dtype), _broadcast_shape(rank, axis, -1))
            for v in (gamma, beta)
        )
    adj_scale, adj_bias = adjustment(tf.shape(x))
    z = z * tf.cast(adj_scale, dtype) + tf.cast(adj_bias, dtype)
    if gamma_b is not None:
        z = z * gamma_b
    if beta_b is not None:
        z = z + beta_b
    return z, stats


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
    stddev = tf.sqrt(stats.variance + tf.cast(epsilon, dtype))
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
        variance = tf.nn.relu(tf.square(new["moving_stddev"]) - tf.cast(epsilon, dtype))
        new["moving_variance"] = variance
    return {name: tf.cast(value, tf.as_dtype(moving[name].dtype)) for name, value in new.items()}

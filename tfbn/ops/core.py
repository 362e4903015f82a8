"""Batch normalization in `keras.ops`: the math on every Keras backend but TensorFlow.

On TensorFlow the layer runs `tfbn.ops.kernels` (fused kernels, XLA layouts, `tf.distribute`
replicas); on any other backend (JAX, PyTorch) it runs the functions here, which name no backend
(`tfbn.ops.engine` chooses) but one: on JAX the common training case (no mask, renorm or
adjustment) has a closed-form gradient (`_jax_normalize`, a `jax.custom_vjp`). The argument
checks and `Moments` are shared by both.

The statistics are exact at large means: two passes, the first shifted by the first value of
each channel (a value of the data, so the shift itself rounds nothing), the second centred on
the rounded mean with the rounding error kept apart (`shifted_moments`); the output is formed
from the centred values as `(x - mean) * (gamma * rsqrt(variance + epsilon)) + beta`, never as
`x * a + (beta - mean * a)`, which loses the spread of data with a large mean. All statistics
are computed in float32 (float64 for float64 inputs), whatever the input dtype.

Under `keras.distribution` on JAX the arrays are global (sharded) arrays, so every reduction
here, and so every batch statistic, is over the global batch: `synchronized` changes nothing.
On PyTorch each process computes the statistics of its own batch.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, NamedTuple

import keras
from keras import ops

__all__ = [
    "Moments",
    "batch_normalization",
    "canonical_axis",
    "moments",
    "moving_statistics_update",
    "statistics_dtype",
    "training_batch_norm",
]

RENORM_CLIPPING_KEYS = ("rmax", "rmin", "dmax")
# The fused kernel's data formats by (rank, channel axis), the last axis written -1.
FUSED_FORMATS = {(4, -1): "NHWC", (4, 1): "NCHW", (5, -1): "NDHWC", (5, 1): "NCDHW"}


class Moments(NamedTuple):
    """Per-channel batch statistics.

    Attributes:
        mean: Mean over every axis but the channel axis, shape `(channels,)`.
        variance: Biased variance (divided by the count, as the chapter defines it).
        count: Number of values (the sum of the weights) each channel's statistics were computed
            from, shape `(channels,)`.
    """

    mean: Any
    variance: Any
    count: Any


# ---------------------------------------------------------------------------------------------
# Argument checks (pure Python: shared by every backend and by both layers).
# ---------------------------------------------------------------------------------------------


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


def fused_format(rank: int, axis: int) -> str | None:
    """The fused kernel's data format for a rank and (non-negative) channel axis, else `None`."""
    return FUSED_FORMATS.get((rank, -1 if axis == rank - 1 else axis))


def check_axes(axes, rank: int) -> list[int]:
    """`axes` (an int or a sequence of ints in `[-rank, rank)`, no repeats) as sorted
    non-negative ints.

    Raises:
        ValueError: naming `axes` otherwise.
    """
    values = [axes] if isinstance(axes, int) else axes
    if (
        isinstance(axes, bool)
        or not isinstance(values, (list, tuple))
        or any(isinstance(a, bool) or not isinstance(a, int) for a in values)
    ):
        raise ValueError(f"Argument `axes` must be a list of integers; received axes={axes!r}.")
    if any(not -rank <= a < rank for a in values):
        raise ValueError(
            f"Argument `axes` is out of range for an input of rank {rank}: expected integers in "
            f"[{-rank}, {rank}); received axes={axes!r}."
        )
    canonical = sorted(a % rank for a in values)
    if len(set(canonical)) != len(canonical):
        raise ValueError(f"Argument `axes` repeats an axis; received axes={axes!r}.")
    return canonical


def check_epsilon(epsilon) -> float:
    """`epsilon` as a float if it is a finite real number > 0, else a `ValueError` naming it."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real):
        raise ValueError(f"Argument `epsilon` must be a number > 0; received epsilon={epsilon!r}.")
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(
            f"Argument `epsilon` must be finite and > 0; received epsilon={epsilon!r}."
        )
    return float(epsilon)


def check_renorm_clipping(renorm_clipping) -> dict:
    """Validates a batch-renormalization clipping dictionary and returns it with float values.

    Args:
        renorm_clipping: `None` or a dict with optional keys `"rmax"`, `"rmin"`, `"dmax"`.
            A missing key (or `None`) means no clipping on that side (`inf`, `0`, `inf`).

    Returns:
        A new dict holding only the keys given, as Python floats.

    Raises:
        ValueError: if it is not a dict, has other keys (Keras's wording: "Received invalid
            keys"), a value that is not a finite number, `rmax <= 0`, `rmin < 0`,
            `rmax < rmin` ("rmax should be greater than rmin") or `dmax < 0` ("dmax should be
            non-negative").
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
            f"Received invalid keys for `renorm_clipping` argument: {unknown}. Supported "
            f"values: {list(RENORM_CLIPPING_KEYS)}; received renorm_clipping={renorm_clipping!r}."
        )
    clipping = {}
    for key, value in renorm_clipping.items():
        if value is None:
            continue
        try:
            number = None if isinstance(value, (bool, str, bytes)) else float(value)
        except (TypeError, ValueError):
            number = None
        if number is None or not -float("inf") < number < float("inf"):  # NaN fails both
            raise ValueError(
                f"Argument `renorm_clipping` needs finite numbers (leave a key out for no bound); "
                f"received {key}={value!r} in renorm_clipping={renorm_clipping!r}."
            )
        clipping[key] = number
    rmax, rmin, dmax = (clipping.get(k) for k in RENORM_CLIPPING_KEYS)
    problem = None
    if rmax is not None and rmin is not None and rmax < rmin:
        problem = "rmax should be greater than rmin"
    elif rmax is not None and rmax <= 0:
        problem = "rmax should be positive"
    elif rmin is not None and rmin < 0:
        problem = "rmin should be non-negative"
    elif dmax is not None and dmax < 0:
        problem = "dmax should be non-negative"
    if problem:
        raise ValueError(
            f"{problem} in the `renorm_clipping` argument; received "
            f"renorm_clipping={renorm_clipping!r}."
        )
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


def statistics_dtype(dtype) -> str:
    """The dtype statistics are computed and kept in: float64 for float64 inputs, else float32.

    Raises:
        ValueError: for a dtype that is not floating point.
    """
    dtype = keras.backend.standardize_dtype(dtype)
    if not keras.backend.is_float_dtype(dtype):
        raise ValueError(
            f"Batch normalization needs a floating-point input; received dtype={dtype}."
        )
    return "float64" if dtype == "float64" else "float32"


def times(a, b):
    """`a * b` where `None` means 1."""
    return b if a is None else a if b is None else a * b


def plus(a, b):
    """`a + b` where `None` means 0."""
    return b if a is None else a if b is None else a + b


# ---------------------------------------------------------------------------------------------
# The math, in keras.ops.
# ---------------------------------------------------------------------------------------------


def _floating(name: str, value):
    """`value` as a tensor of a floating dtype, else a `ValueError` naming the argument."""
    tensor = ops.convert_to_tensor(value)
    dtype = keras.backend.standardize_dtype(tensor.dtype)
    if not keras.backend.is_float_dtype(dtype):
        raise ValueError(
            f"Argument `{name}` must have a floating dtype; received {name} of dtype {dtype}."
        )
    return tensor


def _divide(a, b):
    """`a / b`, 0 where `b` is 0 (a channel, batch or group without values)."""
    return ops.divide_no_nan(a, b)


def channel_shape(rank: int, axis: int) -> list[int]:
    """The shape that broadcasts a per-channel vector along `axis` of a rank-`rank` tensor."""
    shape = [1] * rank
    shape[axis] = -1
    return shape


def mask_weights(mask, rank: int, dtype: str):
    """0/1 weights broadcastable to the input from a mask of rank `rank - 1`.

    Keras's meaning (`keras.layers.BatchNormalization`'s, tf-keras's too): the mask covers the
    input's axes `0 .. rank - 2` and is broadcast along the last axis, whatever the channel axis;
    its size-1 axes broadcast too, and count as the values they cover.

    Raises:
        ValueError: for a mask of another rank.
    """
    mask = ops.convert_to_tensor(mask)
    if len(mask.shape) != rank - 1:
        raise ValueError(
            f"Argument `mask` must have rank {rank - 1} (the input's axes but the last); "
            f"received a mask of shape {tuple(mask.shape)}."
        )
    return ops.cast(ops.cast(ops.expand_dims(mask, -1), "bool"), dtype)


class Centred(NamedTuple):
    """Statistics over some axes of `x` (kept with size 1) and `x` centred on its mean.

    Attributes:
        mean: Mean over the reduced axes.
        variance: Biased variance.
        count: Number of values (sum of the weights).
        centred: `x - mean`, formed as `(x - pivot) - (mean - pivot)`, so that a large mean is
            never subtracted after rounding.
    """

    mean: Any
    variance: Any
    count: Any
    centred: Any


def pivot(x, axes: list[int]):
    """A value of the data for each channel: the first along `axes`, without gradient.

    A value of the data (not a mean of several), so that it is the same number wherever a
    compiler recomputes it: `shifted_moments` relies on that. 0 for an empty batch.

    Args:
        x: A tensor with a static shape.
        axes: Non-negative axes to reduce.

    Returns:
        A tensor of the shape of `x` with `axes` of size 1.
    """
    head = x[tuple(slice(0, 1) if i in axes else slice(None) for i in range(len(x.shape)))]
    # A sum over size-1 axes: the first value, or 0 for an empty batch.
    return ops.stop_gradient(ops.sum(head, axes, keepdims=True))


def shifted_moments(x, axes: list[int]):
    """Exact mean and biased variance of `x` over `axes`, in two passes over `x`.

    The first pass sums `x - pivot` (`pivot`: a value of the data, so the difference is exact at
    any mean and the sum is of the order of the spread); the mean rounded to the dtype of `x`
    becomes the centre `c` of the second pass, which sums `(c - x)**2`. The mean is `c + e`,
    with `e = mean - c` (below half a unit in the last place of the mean) kept apart, and the
    variance `sum((c - x)**2) / n - e**2`: both sums are of values of the order of the spread,
    never of the mean. The two passes read `x` through different expressions (`x - pivot`,
    `c - x`), so that XLA fuses each into its reduction instead of writing a shared temporary
    the size of `x`. Gradients flow through both passes (the pivot and the centre are
    constants).

    Args:
        x: A tensor in its statistics dtype, with a static shape.
        axes: Non-negative axes to reduce, sorted.

    Returns:
        `(centre, error, variance, count)`, each of the shape of `x` with `axes` of size 1: the
        mean is `centre + error` and `x - mean` is best formed as `(x - centre) - error`;
        `count` is the number of values per channel (a float tensor).
    """
    base = pivot(x, axes)
    count = math.prod(x.shape[i] for i in axes)
    per = 1.0 / max(count, 1)
    offset = ops.sum(x - base, axes, keepdims=True) * per
    centre = ops.stop_gradient(base + offset)
    error = (base - centre) + offset
    squares = ops.sum(ops.square(centre - x), axes, keepdims=True) * per
    variance = ops.relu(squares - ops.square(error))
    return centre, error, variance, ops.full(ops.shape(base), count, dtype=x.dtype)


def centred(x, axes: list[int], weights=None) -> Centred:
    """Two-pass statistics of `x` over `axes`, shifted by values of the data.

    Without weights, `shifted_moments`. With weights, each kept position is shifted by its
    weighted mean (the first value may not count): then the mean is `pivot + sum(w * (x -
    pivot)) / count` and the variance `sum(w * ((x - pivot) - (mean - pivot))**2) / count`, both
    sums of values of the order of the spread of the data, not of its mean. Gradients flow
    through both passes (the pivot is a constant).

    Args:
        x: A tensor in its statistics dtype.
        axes: Non-negative axes to reduce.
        weights: Optional non-negative weights broadcastable to `x` (0: the value does not
            count).

    Returns:
        `Centred`, statistics of shape `x.shape` with `axes` of size 1; 0 where the count is 0.
    """
    axes = sorted(axes)
    if weights is None:
        centre, error, variance, count = shifted_moments(x, axes)
        return Centred(centre + error, variance, count, (x - centre) - error)
    weights = ops.broadcast_to(ops.cast(weights, x.dtype), ops.shape(x))
    count = ops.sum(weights, axes, keepdims=True)
    base = ops.stop_gradient(_divide(ops.sum(x * weights, axes, keepdims=True), count))
    shifted = x - base

    def total(t):
        return ops.sum(t * weights, axes, keepdims=True)

    offset = _divide(total(shifted), count)
    # The derivative of the sum of squares through the mean is -2 * sum(x - mean) = 0.
    variance = _divide(total(ops.square(shifted - ops.stop_gradient(offset))), count)
    return Centred(base + offset, variance, count, shifted - offset)


def moments(x, axes, keepdims=False, synchronized=False):
    """`keras.ops.moments` with exact statistics (see `centred`), on any Keras backend.

    Args:
        x: Input tensor of a floating dtype.
        axes: A list of axes (or one axis) over which to compute mean and variance.
        keepdims: If `True`, the reduced axes are kept with size one.
        synchronized: Accepted for `keras.ops.moments`'s signature; under `keras.distribution`
            on JAX the statistics of a sharded array are those of the global array already.

    Returns:
        A tuple `(mean, variance)` (the biased variance), of the input's dtype (float16 and
        bfloat16 computed in float32, clipped to the float16 range and cast back, as Keras does).

    Raises:
        ValueError: for a non-floating `x` or bad `axes`.
    """
    del synchronized
    x = _floating("x", x)
    dtype = keras.backend.standardize_dtype(x.dtype)
    axes = check_axes(axes, len(x.shape))
    stats = centred(ops.cast(x, statistics_dtype(dtype)), axes)
    mean, variance = stats.mean, stats.variance
    if not keepdims:
        mean, variance = (ops.squeeze(t, axes) if axes else t for t in (mean, variance))
    if dtype in ("float16", "bfloat16"):
        limit = 65504.0
        mean, variance = (ops.cast(ops.clip(t, -limit, limit), dtype) for t in (mean, variance))
    return mean, variance


def batch_normalization(x, mean, variance, axis, offset=None, scale=None, epsilon=1e-3):
    """`keras.ops.batch_normalization`, as `(x - mean) * (scale * rsqrt(variance + epsilon)) +
    offset` in the dtype of `x`, on any Keras backend.

    Args:
        x: Input tensor of a floating dtype.
        mean: A mean vector of the length of the `axis` dimension of `x`.
        variance: A variance vector of that length.
        axis: Integer, the axis that is normalized.
        offset: An offset vector of that length, or `None`.
        scale: A scale vector of that length, or `None`.
        epsilon: A finite float > 0 added to the variance.

    Returns:
        The normalized tensor, of the shape and dtype of `x`.

    Raises:
        ValueError: before any work, for a non-floating `x` or vector, an `axis` out of range,
            a vector not of shape `(x.shape[axis],)`, or an `epsilon` not finite and > 0.
    """
    x = _floating("x", x)
    rank = len(x.shape)
    if isinstance(axis, bool) or not isinstance(axis, int) or not -rank <= axis < rank:
        raise ValueError(
            f"Argument `axis` must be an integer in [{-rank}, {rank}) for an input of rank "
            f"{rank}; received axis={axis!r}."
        )
    axis %= rank
    epsilon = check_epsilon(epsilon)
    dtype = x.dtype
    vectors = {"mean": mean, "variance": variance, "offset": offset, "scale": scale}
    for name, value in vectors.items():
        if value is None:
            continue
        value = _floating(name, value)
        channels = x.shape[axis]
        length = value.shape[0] if len(value.shape) == 1 else -1
        if length not in (None, channels) and channels is not None:
            raise ValueError(
                f"Argument `{name}` must be a vector of length {channels} (the size of axis "
                f"{axis} of `x`, of shape {tuple(x.shape)}); received {name} of shape "
                f"{tuple(value.shape)}."
            )
        vectors[name] = ops.reshape(ops.cast(value, dtype), channel_shape(rank, axis))
    a = times(ops.rsqrt(vectors["variance"] + ops.cast(epsilon, dtype)), vectors["scale"])
    return plus((x - vectors["mean"]) * a, vectors["offset"])


def renorm_correction(mean, variance, renorm_mean, renorm_stddev, epsilon, clipping=None):
    """The batch-renormalization correction `(r, d)` (Ioffe, 2017), without gradient.

    `r = sigma_B / sigma`, `d = (mu_B - mu) / sigma`, where `sigma_B = sqrt(variance + epsilon)`
    and `(mu, sigma)` are the renorm moving averages (`sigma` at least `sqrt(epsilon)`); then `r`
    is clipped to `[rmin, rmax]` and `d` to `[-dmax, dmax]` (`check_renorm_clipping`).

    Returns:
        `(r, d)` in the dtype of `mean`, with stopped gradients.
    """
    clipping = check_renorm_clipping(clipping)
    dtype = mean.dtype
    stddev = ops.sqrt(variance + ops.cast(epsilon, dtype))
    sigma = ops.maximum(ops.cast(renorm_stddev, dtype), ops.sqrt(ops.cast(epsilon, dtype)))
    r = stddev / sigma
    d = (mean - ops.cast(renorm_mean, dtype)) / sigma
    if "rmin" in clipping:
        r = ops.maximum(r, clipping["rmin"])
    if "rmax" in clipping:
        r = ops.minimum(r, clipping["rmax"])
    if "dmax" in clipping:
        d = ops.clip(d, -clipping["dmax"], clipping["dmax"])
    return ops.stop_gradient(r), ops.stop_gradient(d)


def _ghost_view(x, weights, virtual_batch_size: int):
    """`(n, ...)` viewed as `(virtual_batch_size, n // virtual_batch_size, ...)`: virtual batch
    `j` (index `j` on axis 1) holds examples `j, j + g, j + 2g, ...` (tf-keras's grouping)."""
    batch = x.shape[0]
    if batch % virtual_batch_size:
        raise ValueError(
            f"Argument `virtual_batch_size` must divide the batch size: received a batch of "
            f"{batch} with virtual_batch_size={virtual_batch_size}."
        )
    shape = (virtual_batch_size, batch // virtual_batch_size, *x.shape[1:])
    if weights is not None:
        weights = ops.reshape(ops.broadcast_to(weights, ops.shape(x)), shape)
    return ops.reshape(x, shape), weights


def training_batch_norm(
    inputs,
    axis: int,
    *,
    gamma=None,
    beta=None,
    epsilon: float = 1e-3,
    fused: bool | None = None,
    synchronized: bool = False,
    virtual_batch_size: int | None = None,
    adjustment: tuple | None = None,
    mask=None,
    weights=None,
    renorm_mean=None,
    renorm_stddev=None,
    renorm_clipping: dict | None = None,
):
    """Training-mode batch normalization with every option, in `keras.ops`.

    The output is `gamma * ((x_hat * r + d) * a + b) + beta`, where `x_hat` is `x` normalized with
    the statistics of its batch (or virtual batch), `(r, d)` the batch-renormalization correction
    (`(1, 0)` without renorm) and `(a, b) = adjustment` (`(1, 0)` without). Gradients flow
    through the batch statistics and `(a, b)`, not through `r` and `d`.

    Args:
        inputs: Input of rank >= 2 with static shape, any floating dtype.
        axis: The channel axis, a non-negative int (`canonical_axis`).
        gamma: Per-channel scale or `None`.
        beta: Per-channel offset or `None`.
        epsilon: Variance epsilon.
        fused: Accepted for the TensorFlow kernels' signature; there is one kernel here.
        synchronized: Accepted likewise: the statistics of a global (sharded) array are global.
        virtual_batch_size: Ghost batches: each virtual batch is normalized with its own
            statistics (`_ghost_view`); the moments returned are pooled over them.
        adjustment: Optional `(scale, bias)` broadcastable to `inputs`.
        mask: Optional boolean tensor of rank `rank(inputs) - 1`, Keras's meaning
            (`mask_weights`); masked positions do not count in the statistics.
        weights: Optional non-negative weights broadcastable to `inputs` (instead of `mask`).
        renorm_mean: With `renorm_stddev`, turns on batch renormalization (`renorm_correction`).
        renorm_stddev: The renorm moving standard deviation.
        renorm_clipping: Clipping of `(r, d)`.

    Returns:
        `(outputs, moments)`: outputs in the statistics dtype; `moments` the per-channel batch
        statistics the moving averages track (`Moments`, pooled over virtual batches).

    Raises:
        ValueError: for a mask of the wrong rank, or a batch size `virtual_batch_size` does not
            divide.
    """
    del fused, synchronized
    rank = len(inputs.shape)
    dtype = statistics_dtype(inputs.dtype)
    x = ops.cast(inputs, dtype)
    channels = x.shape[axis]
    if mask is not None:
        weights = mask_weights(mask, rank, dtype)
    view_axis, view = axis, x
    if virtual_batch_size is not None:
        view, weights = _ghost_view(x, weights, virtual_batch_size)
        view_axis = axis + 1
    keep = (view_axis, 1) if virtual_batch_size is not None else (view_axis,)
    axes = [i for i in range(len(view.shape)) if i not in keep]
    renorm = renorm_mean is not None or renorm_stddev is not None

    def per_channel(value):
        """A per-channel vector broadcast against the view, or `None`."""
        if value is None:
            return None
        return ops.reshape(ops.cast(value, dtype), channel_shape(len(view.shape), view_axis))

    if weights is None and adjustment is None and not renorm and keras.backend.backend() == "jax":
        ones = ops.ones((channels,), dtype)
        scale = per_channel(ones if gamma is None else gamma)
        shift = per_channel(ops.zeros_like(ones) if beta is None else beta)
        y, mean, variance = _jax_normalize(tuple(axes), float(epsilon))(view, scale, shift)
        count = ops.full(ops.shape(mean), math.prod(view.shape[i] for i in axes), dtype=dtype)
        per_group = Moments(*(ops.reshape(t, (-1, channels)) for t in (mean, variance, count)))
        return ops.reshape(y, ops.shape(x)), _pool(per_group)
    stats = centred(view, axes, weights)
    per_group = Moments(*(ops.reshape(t, (-1, channels)) for t in stats[:3]))
    batch = _pool(per_group)
    r = d = None
    if renorm:
        if renorm_mean is None or renorm_stddev is None:
            raise ValueError("Batch renormalization needs both `renorm_mean` and `renorm_stddev`.")
        r, d = renorm_correction(
            batch.mean, batch.variance, renorm_mean, renorm_stddev, epsilon, renorm_clipping
        )

    inv = ops.rsqrt(stats.variance + ops.cast(epsilon, dtype))
    r, d = per_channel(r), per_channel(d)
    if adjustment is None:
        g = per_channel(gamma)
        shift = plus(None if d is None else times(d, g), per_channel(beta))
        y = plus(stats.centred * times(inv, times(r, g)), shift)
        return ops.reshape(y, ops.shape(x)), batch
    z = ops.reshape(plus(stats.centred * times(inv, r), d), ops.shape(x))
    adj_scale, adj_bias = adjustment
    z = z * ops.cast(adj_scale, dtype) + ops.cast(adj_bias, dtype)
    if gamma is not None:
        z = z * ops.reshape(ops.cast(gamma, dtype), channel_shape(rank, axis))
    if beta is not None:
        z = z + ops.reshape(ops.cast(beta, dtype), channel_shape(rank, axis))
    return z, batch


@functools.cache
def _jax_normalize(axes: tuple[int, ...], epsilon: float):
    """`(x, scale, shift) -> (y, mean, variance)` on JAX with a closed-form gradient.

    `y = (x - mean) * rsqrt(variance + epsilon) * scale + shift`, the statistics over `axes` by
    `shifted_moments` (kept as size-1 axes); `scale` and `shift` broadcast against `x`. The
    gradient is that of batch normalization (Ioffe and Szegedy, 2015), with `x_hat` the
    normalized value and `n` the count: `dx = scale * inv * (dy - mean(dy) - x_hat * mean(dy *
    x_hat)) + (dmean + 2 * dvariance * (x - mean)) / n`, `dscale = sum(dy * x_hat)`, `dshift =
    sum(dy)`, so that XLA reads `x` and `dy` twice each in the backward pass, and nothing of the
    forward pass but `x` and the per-channel statistics is kept for it.
    """
    import jax

    def forward(x, scale, shift):
        centre, error, variance, _ = shifted_moments(x, list(axes))
        inv = ops.rsqrt(variance + epsilon)
        y = ((x - centre) - error) * (inv * scale) + shift
        return (y, centre + error, variance), (x, centre, error, inv, scale, shift)

    @jax.custom_vjp
    def normalize(x, scale, shift):
        return forward(x, scale, shift)[0]

    def backward(saved, cotangents):
        x, centre, error, inv, scale, shift = saved
        dy, dmean, dvariance = cotangents
        per = 1.0 / max(math.prod(x.shape[i] for i in axes), 1)
        sum_dy = ops.sum(dy, axes, keepdims=True)
        # sum(dy * x_hat) = -(sum(dy * (centre - x)) + error * sum(dy)) * inv: a sum of values
        # of the order of the spread, reading x as the variance does (`shifted_moments`).
        below = ops.sum(dy * (centre - x), axes, keepdims=True)
        sum_dy_x_hat = -(below + error * sum_dy) * inv
        x_hat = ((x - centre) - error) * inv
        dx = (scale * inv) * (dy - (sum_dy + x_hat * sum_dy_x_hat) * per) + (
            dmean + (2.0 * dvariance / inv) * x_hat
        ) * per
        return dx, _unbroadcast(sum_dy_x_hat, scale.shape), _unbroadcast(sum_dy, shift.shape)

    normalize.defvjp(forward, backward)
    return normalize


def _unbroadcast(t, shape):
    """`t` summed over the axes where `shape` has size 1 and `t` does not."""
    axes = [i for i, (a, b) in enumerate(zip(t.shape, shape, strict=True)) if b == 1 and a != 1]
    return ops.sum(t, axes, keepdims=True) if axes else t


def _pool(stats: Moments) -> Moments:
    """Per-group moments `(g, channels)` pooled into per-channel moments: count-weighted means
    of the means and of the variances (what ghost batch normalization's moving variance tracks,
    as in tf-keras); the count is their sum. One group is returned as is."""
    if stats.count.shape[0] == 1:
        return Moments(*(t[0] for t in stats))
    total = ops.sum(stats.count, 0)
    share = _divide(stats.count, total)
    return Moments(ops.sum(stats.mean * share, 0), ops.sum(stats.variance * share, 0), total)


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
    latter, and `moving_variance = max(moving_stddev ** 2 - epsilon, 0)` (as in Keras). A channel
    without values leaves every value unchanged.

    Args:
        stats: Per-channel batch statistics, as `training_batch_norm` returns them.
        moving: Dict of the current values (variables or tensors), keyed by variable name.
        momentum: Momentum of the inference moving averages.
        epsilon: Variance epsilon.
        synchronized: Accepted for the TensorFlow version's signature (statistics are global).
        renorm_momentum: Momentum of the renorm moving averages (needed with renorm).

    Returns:
        Dict with a new value for every key of `moving`, each in its dtype.
    """
    del synchronized
    dtype = keras.backend.standardize_dtype(stats.mean.dtype)
    seen = stats.count > 0
    targets: dict[str, tuple[Any, float]] = {"moving_mean": (stats.mean, momentum)}
    renorm = "renorm_mean" in moving
    stddev = ops.sqrt(stats.variance + ops.cast(epsilon, dtype))
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
        old = ops.cast(moving[name], dtype)
        new[name] = ops.where(seen, old * decay + value * (1.0 - decay), old)
    if renorm:
        variance = ops.relu(ops.square(new["moving_stddev"]) - ops.cast(epsilon, dtype))
        new["moving_variance"] = variance
    return {name: ops.cast(value, moving[name].dtype) for name, value in new.items()}


def dynamic_shape(x):
    """The shape of `x` as a 1-D int32 tensor (what an `adjustment` callable receives)."""
    return ops.convert_to_tensor(tuple(x.shape), "int32")

"""Fast paths for training-mode batch normalization.

Two kernels, both giving the same results as the reference path in `tfbn.ops` (moments, then
normalize, differentiated by autodiff):

- `fused_batch_norm`: TensorFlow's fused batch-norm kernel (oneDNN on CPU, cuDNN on GPU, XLA's
  BatchNormTraining under `jit_compile`) for rank-4/5 inputs with the channel axis second or last.
  It reads float16/bfloat16 inputs directly, computes the statistics in float32, and returns the
  biased variance (the kernel itself reports the Bessel-corrected one, which is converted here).
- `composed_batch_norm`: any rank and axis, optionally with the statistics of the global batch
  across `tf.distribute` replicas. Forward as in `tfbn.ops`; backward by the closed-form gradient
  of batch normalization (`tf.custom_gradient`) instead of autodiff through the moments, so the
  backward pass is two reductions and one elementwise pass. Channels-last inputs are computed on
  a 2-D `(rows, lanes * C)` view (`channel_lanes`), which is what makes it fast for few channels;
  under XLA on a `(rows, lanes, C)` view with reductions in blocks of rows (`_xla_channel_sums`),
  the forms XLA's CPU compiler fuses and vectorizes.
"""

from __future__ import annotations

import tensorflow as tf

from tfbn import ops

__all__ = [
    "FUSED_DTYPES",
    "channel_lanes",
    "composed_batch_norm",
    "fused_batch_norm",
    "fused_data_format",
    "fused_batch_norm_planned",
    "fused_plan",
    "in_xla_context",
    "ghost_composed_batch_norm",
]

FUSED_DTYPES = (tf.float16, tf.bfloat16, tf.float32)
_FORMATS = {(4, -1): "NHWC", (4, 1): "NCHW", (5, -1): "NDHWC", (5, 1): "NCDHW"}


def fused_data_format(rank: int, axis: int, dtype: tf.DType) -> str | None:
    """The fused kernel's data format for this input, or `None` when the kernel cannot take it."""
    if tf.as_dtype(dtype) not in FUSED_DTYPES or rank not in (4, 5):
        return None
    axis = ops.canonical_axis(axis, rank)
    return _FORMATS.get((rank, -1 if axis == rank - 1 else axis))


def in_xla_context() -> bool:
    """Whether the graph being traced is compiled by XLA (`tf.function(jit_compile=True)`)."""
    if tf.executing_eagerly():
        return False
    try:
        from tensorflow.python.framework import ops as tf_ops
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover - TensorFlow moved its internals
        return False
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf_ops.get_default_graph()))


def fused_plan(
    rank: int, axis: int, channels: int, dtype: tf.DType, *, xla: bool = False
) -> str | None:
    """How tfbn feeds an input to the fused kernel when it chooses (`fused=None`).

    Returns:
        `"direct"` (the input as it is), `"nchw"` (a channels-last rank-4 input transposed to
        channels-first and back), `"reshape"` (a rank-2/3 channels-last input viewed as
        `(-1, 1, 1, C)`), or `None` when the composed kernel is expected to be faster.

    Under XLA (`xla=True`) the composed kernel is taken on every device: XLA expands the fused
    kernel into `E[x^2] - E[x]^2`, which loses the variance of inputs with large means (at mean
    1e4 and variance 1 it returned variances from -135 to 35 on a CPU), and on a 2-core x86 CPU
    that expansion also ran 7x slower than the composed kernel on (128, 32, 32, 64)
    (docs/benchmarks/cpu-2core.md). Otherwise, on
    GPUs (cuDNN), the fused kernel is taken wherever it applies; on CPUs the choice follows
    forward+backward timings on that CPU (oneDNN): channels-last rank-4 inputs ran the fused
    kernel at 0.4-0.55x Keras's time for C divisible by 4 ((256, 24, 24, C), C in
    {4, 8, 12, 16, 20, 32}) but at 1.1-6x for C in {3, 6, 7, 9, 10}, where the composed kernel's
    packed 2-D view (`channel_lanes`) took about 0.45x, and the fused kernel on the transposed
    (channels-first) input 0.6x; a (4096, 1024) dense input took 0.3x through the rank-4 view,
    but small dense inputs such as (256, 120) were faster composed.
    """
    dtype = tf.as_dtype(dtype)
    if dtype not in FUSED_DTYPES:
        return None
    axis = ops.canonical_axis(axis, rank)
    if xla:
        return None
    on_gpu = bool(tf.config.list_logical_devices("GPU"))
    if fused_data_format(rank, axis, dtype) is not None:
        if on_gpu or axis == 1 or channels % 4 == 0:
            return "direct"
        return None
    if rank in (2, 3) and axis == rank - 1 and channels % 4 == 0 and (on_gpu or channels >= 256):
        return "reshape"
    return None


def fused_batch_norm_planned(
    x: tf.Tensor,
    gamma: tf.Tensor | None,
    beta: tf.Tensor | None,
    epsilon: float,
    axis: int,
    plan: str,
) -> tuple[tf.Tensor, ops.Moments]:
    """`fused_batch_norm` on the view of `x` that `plan` names (see `fused_plan`)."""
    if plan == "direct":
        return fused_batch_norm(x, gamma, beta, epsilon, axis)
    if plan == "nchw":
        y, stats = fused_batch_norm(tf.transpose(x, [0, 3, 1, 2]), gamma, beta, epsilon, 1)
        return tf.transpose(y, [0, 2, 3, 1]), stats
    if plan == "reshape":
        channels = x.shape[-1]
        y, stats = fused_batch_norm(tf.reshape(x, [-1, 1, 1, channels]), gamma, beta, epsilon, -1)
        return tf.ensure_shape(tf.reshape(y, tf.shape(x)), x.shape), stats
    raise ValueError(f"Unknown fused plan {plan!r}: expected 'direct', 'nchw' or 'reshape'.")


def _count(x: tf.Tensor, axis: int) -> tf.Tensor:
    shape = tf.shape(x)
    return tf.cast(tf.reduce_prod(shape) // shape[axis], tf.float32)


def fused_batch_norm(
    x: tf.Tensor,
    gamma: tf.Tensor | None,
    beta: tf.Tensor | None,
    epsilon: float,
    axis: int,
) -> tuple[tf.Tensor, ops.Moments]:
    """Training-mode batch normalization with TensorFlow's fused kernel.

    Args:
        x: Rank-4 or rank-5 tensor, float16, bfloat16 or float32.
        gamma: Per-channel scale (float32) or `None` for 1.
        beta: Per-channel offset (float32) or `None` for 0.
        epsilon: Variance epsilon.
        axis: Channel axis: 1 or the last.

    Returns:
        `(y, moments)`: `y` in the dtype of `x`; `moments` in float32 with the biased variance.
    """
    rank = x.shape.rank
    axis = ops.canonical_axis(axis, rank)
    data_format = fused_data_format(rank, axis, x.dtype)
    if data_format is None:
        raise ValueError(
            f"The fused kernel takes rank-4/5 float16, bfloat16 or float32 inputs with the channel "
            f"axis 1 or last; received shape {x.shape}, axis={axis}, dtype={x.dtype.name}."
        )
    channels = tf.shape(x)[axis]
    if gamma is None:
        gamma = tf.ones([channels], tf.float32)
    if beta is None:
        beta = tf.zeros([channels], tf.float32)
    y, mean, corrected_variance = tf.compat.v1.nn.fused_batch_norm(
        x,
        tf.cast(gamma, tf.float32),
        tf.cast(beta, tf.float32),
        epsilon=epsilon,
        data_format=data_format,
        is_training=True,
    )
    count = _count(x, axis)
    # The kernel reports var * n / (n - 1); batch normalization tracks the biased variance.
    variance = corrected_variance * tf.math.divide_no_nan(tf.maximum(count - 1.0, 0.0), count)
    return y, ops.Moments(tf.stop_gradient(mean), tf.stop_gradient(variance), count)


# Channels-last inputs are normalized as a 2-D `(rows, lanes * C)` view: reductions over the rows
# of a wide matrix are several times faster than over the leading axes of a rank-4 tensor, both in
# TensorFlow's CPU kernels and under XLA (whose CPU reductions over three leading axes ran ~7x
# slower than over the rows of the same data viewed as 2-D, on a 2-core x86 CPU). With few channels
# the view packs `lanes` consecutive positions per row so that a row holds at least this many
# values. Forward+backward of (256, 24, 24, 6) took 5.0 ms with one position per row, 3.25 ms with
# rows of at least 64 values and 2.9 ms with at least 256 (2-core x86 CPU).
_LANE_WIDTH = 256


def channel_lanes(shape, channels: int) -> int:
    """How many positions per row the 2-D view of a channels-last input packs.

    The smallest divisor `k` of the product of the static inner dimensions (all but the batch and
    the channel axis) with `k * channels >= 256`, else that product itself; 1 for rank-2 inputs,
    for 256 or more channels, or when an inner dimension is unknown.
    """
    shape = tf.TensorShape(shape)
    inner_dims = shape[1:-1].as_list() if shape.rank is not None else [None]
    if not channels or channels >= _LANE_WIDTH or any(d is None for d in inner_dims):
        return 1
    inner = 1
    for d in inner_dims:
        inner *= d
    for k in range(1, inner + 1):
        if inner % k == 0 and k * channels >= _LANE_WIDTH:
            return k
    return max(inner, 1)


def _column_sums(x: tf.Tensor) -> tf.Tensor:
    """Sums over the rows of a 2-D tensor, outside XLA.

    TensorFlow's CPU reduction over the rows of a tall matrix ran at about a third of the memory
    bandwidth; the same sums as `ones @ x` (a matrix-vector product) ran near it and halved the
    composed kernel's time on (128, 32, 32, 64) (2-core x86 CPU).
    """
    return tf.matmul(tf.ones([1, tf.shape(x)[0]], x.dtype), x)[0]


# Rows summed per block by `_xla_channel_sums`.
_XLA_BLOCK_ROWS = 32


def _optimization_barrier():
    """XLA's `OptimizationBarrier` as a TensorFlow op, or `None` where this TensorFlow lacks it."""
    try:
        from tensorflow.compiler.tf2xla.python import xla
    except ImportError:  # pragma: no cover - TensorFlow moved its internals
        return None
    return getattr(xla, "optimization_barrier", None)


def _xla_channel_sums(x: tf.Tensor) -> tf.Tensor:
    """Sums over every axis but the last, in two stages that XLA compiles well.

    XLA's CPU compiler does not fuse an elementwise producer (`dy * centred`, `(x - mean)**2`) into
    a reduction over the leading axis of a tall tensor: it writes the product to memory and reads
    it back. It does fuse the producer into a reduction over the second axis of
    `(rows / 32, 32, ...)`. So the rows are summed in blocks of `_XLA_BLOCK_ROWS` (those that do
    not fill a block are summed apart) and the block sums are summed after an optimization
    barrier, without which XLA merges the two stages back into one reduction.
    """
    rank = x.shape.rank
    rest = list(range(rank - 1))
    barrier = _optimization_barrier()
    inner = x.shape[1:].as_list()
    rows = x.shape[0]
    block = _XLA_BLOCK_ROWS
    if barrier is None or None in inner or (rows is not None and rows < 2 * block):
        return tf.reduce_sum(x, rest)
    # Under XLA the row count is known when compiling, so these slices are static.
    n_rows = tf.shape(x)[0]
    main = n_rows - tf.math.floormod(n_rows, block)
    blocks = tf.reduce_sum(tf.reshape(x[:main], [-1, block, *inner]), 1)
    total = tf.reduce_sum(barrier(blocks)[0], rest)
    if rows is not None and rows % block == 0:
        return total
    return total + tf.reduce_sum(x[main:], rest)


def _middle_sums(x: tf.Tensor, xla: bool) -> tf.Tensor:
    """Sums of an `(outer, C, inner)` tensor over its first and last axes. Under XLA over the rows
    first, then, after an optimization barrier, over the outer axis: XLA compiles that faster than
    one reduction over both axes."""
    barrier = _optimization_barrier() if xla else None
    if barrier is None:
        return tf.reduce_sum(x, [0, 2])
    return tf.reduce_sum(barrier(tf.reduce_sum(x, 2))[0], 0)


def _fold(v: tf.Tensor, lanes: int) -> tf.Tensor:
    """`(lanes * C,)` per-column values -> `(C,)` per-channel sums."""
    return v if lanes == 1 else tf.reduce_sum(tf.reshape(v, [lanes, -1]), 0)


def _spread(v: tf.Tensor, lanes: int) -> tf.Tensor:
    """`(C,)` per-channel values -> `(lanes * C,)` per-column values."""
    return v if lanes == 1 else tf.tile(v, [lanes])


def composed_batch_norm(
    x: tf.Tensor,
    gamma: tf.Tensor | None,
    beta: tf.Tensor | None,
    epsilon: float,
    axis: int,
    *,
    synchronized: bool = False,
) -> tuple[tf.Tensor, ops.Moments]:
    """Training-mode batch normalization with a closed-form gradient.

    Statistics in two passes (mean, then the centred sum of squares), so large means do not cancel.
    The backward pass is two per-channel reductions and one elementwise pass instead of autodiff
    through the moments. Channels-last inputs are computed on a 2-D view (see `channel_lanes`), or
    under XLA on a 3-D one with blocked reductions.

    With `synchronized=True` in a `tf.distribute` replica context the statistics are those of the
    global batch (see `tfbn.ops.moments`), and the backward pass all-reduces its two per-channel
    reductions, so the gradients equal a single-device run on the concatenated batch.

    Args:
        x: Floating-point tensor of rank >= 2. float16/bfloat16 are computed in float32.
        gamma: Per-channel scale or `None`.
        beta: Per-channel offset or `None`.
        epsilon: Variance epsilon.
        axis: Channel axis.
        synchronized: Whether to use the global batch's statistics across replicas.

    Returns:
        `(y, moments)`: `y` in the statistics dtype (float32, or float64 for float64 inputs).
    """
    rank = x.shape.rank
    axis = ops.canonical_axis(axis, rank)
    dtype = ops.statistics_dtype(x.dtype)
    x = tf.cast(x, dtype)
    ctx = tf.distribute.get_replica_context()
    if not (synchronized and ctx is not None and ctx.num_replicas_in_sync > 1):
        ctx = None
    xla = in_xla_context()
    channels = x.shape[axis] or tf.shape(x)[axis]
    lanes = channel_lanes(x.shape, x.shape[-1]) if axis == rank - 1 else 1
    if axis != rank - 1:
        # An `(outer, C, inner)` view: per-channel values broadcast along its first and last
        # axes, and each example's channel is a contiguous row (see `_middle_sums`).
        view = tf.reshape(x, [-1, channels, tf.reduce_prod(tf.shape(x)[axis + 1 :])])

        def sums(t):
            return _middle_sums(t, xla)

        def spread(v):
            return tf.reshape(v, [1, -1, 1])

    elif xla:
        # A `(rows, lanes, C)` view (`(rows, C)` for one lane): per-channel values broadcast
        # along its last axis. Tiled to `lanes * C` columns instead, they cost XLA an index
        # computation per element that halved the speed of each pass (2-core x86 CPU).
        view = tf.reshape(x, [-1, channels] if lanes == 1 else [-1, lanes, channels])
        sums = _xla_channel_sums

        def spread(v):
            return v

    else:
        view = tf.reshape(x, [-1, lanes * channels])

        def sums(t):
            return _fold(_column_sums(t), lanes)

        def spread(v):
            return _spread(v, lanes)

    count = tf.cast(tf.size(x, out_type=tf.int64) // tf.cast(channels, tf.int64), dtype)
    y, stats = _composed(view, gamma, beta, epsilon, count, sums=sums, spread=spread, ctx=ctx)
    return tf.ensure_shape(tf.reshape(y, tf.shape(x)), x.shape), stats


def _composed(x, gamma, beta, epsilon, count, *, sums, spread, ctx):
    """`composed_batch_norm` given how to take per-channel sums of an `x`-shaped tensor (`sums`)
    and broadcast per-channel values to it (`spread`); `ctx` is the replica context when the
    statistics are synchronized, else `None`."""
    dtype = x.dtype
    total = sums(x)
    channels = tf.shape(total)[0]
    if ctx is not None:
        packed = ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.concat([total, count[None]], 0))
        total, count = packed[:-1], packed[-1]
    mean = tf.math.divide_no_nan(total, count)
    centred = x - spread(mean)
    m2 = sums(tf.square(centred))
    if ctx is not None:
        m2 = ctx.all_reduce(tf.distribute.ReduceOp.SUM, m2)
    variance = tf.math.divide_no_nan(m2, count)
    mean, variance, count = (tf.stop_gradient(t) for t in (mean, variance, count))
    inv = tf.math.rsqrt(variance + tf.cast(epsilon, dtype))
    gamma_t = tf.ones([channels], dtype) if gamma is None else tf.cast(gamma, dtype)
    beta_t = tf.zeros([channels], dtype) if beta is None else tf.cast(beta, dtype)

    @tf.custom_gradient
    def normalize(x, gamma_t, beta_t):
        scale = inv * gamma_t
        y = centred * spread(scale) + spread(beta_t)

        def grad(dy):
            dy = tf.cast(dy, dtype)
            sum_dy = sums(dy)
            sum_dy_xhat = sums(dy * centred) * inv
            if ctx is not None:
                # The statistics came from the global batch, so must their derivatives.
                packed = ctx.all_reduce(
                    tf.distribute.ReduceOp.SUM, tf.concat([sum_dy, sum_dy_xhat], 0)
                )
                global_dy, global_dy_xhat = packed[:channels], packed[channels:]
            else:
                global_dy, global_dy_xhat = sum_dy, sum_dy_xhat
            # dx = scale * (dy - mean(dy) - x_hat * mean(dy * x_hat)), as one multiply-add per
            # operand: dy * scale + centred * slope + offset.
            slope = -scale * inv * tf.math.divide_no_nan(global_dy_xhat, count)
            offset = -scale * tf.math.divide_no_nan(global_dy, count)
            dx = dy * spread(scale) + (centred * spread(slope) + spread(offset))
            # The parameters' gradients are per replica: the optimizer all-reduces them.
            return dx, sum_dy_xhat, sum_dy

        return y, grad

    return normalize(x, gamma_t, beta_t), ops.Moments(mean, variance, count)


def ghost_composed_batch_norm(
    inputs: tf.Tensor,
    gamma: tf.Tensor | None,
    beta: tf.Tensor | None,
    epsilon: float,
    axis: int,
    virtual_batch_size: int,
) -> tuple[tf.Tensor, ops.Moments]:
    """Ghost batch normalization on the composed kernel (`tfbn.fast.composed_batch_norm`).

    The `(virtual_batch_size, g, ...)` view of the input (`ops.virtual_batch_view`) gets its
    virtual-batch axis moved next to the channel axis and merged with it: channel `j * C + c` of
    the merged tensor is channel `c` of virtual batch `j`, and one composed batch norm over it, with
    `gamma` and `beta` tiled `g` times, normalizes every virtual batch with its own statistics.
    With the channel axis 1 the move is a plain reshape; otherwise it costs two transposes, still
    about twice as fast as autodiff through `ops.batch_norm_training` (measured on a 2-core CPU).

    Args:
        inputs: Input of rank >= 2, batch size a multiple of `virtual_batch_size`.
        gamma: Per-channel scale or `None`.
        beta: Per-channel offset or `None`.
        epsilon: Variance epsilon.
        axis: Channel axis (non-negative).
        virtual_batch_size: Examples per virtual batch.

    Returns:
        `(outputs, moments)`: outputs in the statistics dtype, and the per-channel moments pooled
        over virtual batches (`ops.pool_moments`).
    """
    rank = inputs.shape.rank
    axis = ops.canonical_axis(axis, rank)
    channels = inputs.shape[axis]
    grouped = ops.virtual_batch_view(inputs, virtual_batch_size)
    groups = tf.shape(grouped)[1]
    # (vbs, g, d1, .., C, ..) -> (vbs, d1, .., g, C, ..): the group axis just before the channel.
    perm = [0, *range(2, axis + 1), 1, *range(axis + 1, rank + 1)]
    moved = grouped if axis == 1 else tf.transpose(grouped, perm)
    moved_shape = tf.shape(moved)
    merged = tf.reshape(moved, tf.concat([moved_shape[:axis], [-1], moved_shape[axis + 2 :]], 0))
    gamma = None if gamma is None else tf.tile(gamma, [groups])
    beta = None if beta is None else tf.tile(beta, [groups])
    outputs, stats = composed_batch_norm(merged, gamma, beta, epsilon, axis)
    outputs = tf.reshape(outputs, moved_shape)
    if axis != 1:
        outputs = tf.transpose(outputs, [perm.index(i) for i in range(rank + 1)])
    outputs = tf.ensure_shape(tf.reshape(outputs, tf.shape(inputs)), inputs.shape)
    per_group = ops.Moments(
        tf.reshape(stats.mean, [-1, channels]),
        tf.reshape(stats.variance, [-1, channels]),
        stats.count * tf.ones([groups], stats.count.dtype),
    )
    return outputs, ops.pool_moments(per_group)

"""The training-mode kernels and the one function that chooses among them.

`training_batch_norm` is what the layers call: it picks a kernel (`kernel_for`) and returns the
output and the batch statistics. Every kernel takes its statistics from
`tfbn.ops.nn.centred_moments` (or, for the fused kernel, from TensorFlow's kernel on a shifted
input):

- `fused_batch_norm`: TensorFlow's fused batch-norm kernel (oneDNN on CPU, cuDNN on GPU, XLA's
  BatchNormTraining under `jit_compile`) for rank-4/5 inputs with the channel axis second or last.
  It reads float16/bfloat16 inputs directly and computes the statistics in float32.
- `composed_batch_norm`: any rank and axis, optionally with the statistics of the global batch
  across `tf.distribute` replicas, with the closed-form gradient of batch normalization
  (`tf.custom_gradient`) instead of autodiff through the moments: the backward pass is two
  reductions and one elementwise pass.
- `ghost_composed_batch_norm`: ghost batches on the composed kernel.
- `tfbn.ops.nn.batch_norm_training`: the reference path (autodiff), for masks, renorm and
  adjustments that are not per channel.
"""

from __future__ import annotations

from tfbn.ops import core, reduction
from tfbn.ops import nn as ops
from tfbn.ops.engine import tensorflow_module

tf = tensorflow_module(__name__)

__all__ = [
    "FUSED_DTYPES",
    "FUSED_MAX_COUNT",
    "KERNELS",
    "composed_batch_norm",
    "fused_batch_norm",
    "fused_data_format",
    "ghost_composed_batch_norm",
    "kernel_for",
    "training_batch_norm",
]

# By name (a `tf.DType` equals its name), so that importing this module needs no TensorFlow.
FUSED_DTYPES = ("float16", "bfloat16", "float32")
# The most values per channel the default choice gives the fused kernel: its sums are long
# float32 running sums, whose rounding grows with the count (docs/benchmarks/statistics.md).
FUSED_MAX_COUNT = 2**17
KERNELS = ("reference", "ghost", "fused", "fused_rank4", "fused_or_composed", "composed")


def fused_data_format(rank: int, axis: int, dtype: tf.DType) -> str | None:
    """The fused kernel's data format for this input, or `None` when the kernel cannot take it."""
    if tf.as_dtype(dtype).name not in FUSED_DTYPES or rank not in (4, 5):
        return None
    return core.fused_format(rank, ops.canonical_axis(axis, rank))


def kernel_for(
    shape,
    axis: int,
    dtype,
    *,
    fused: bool | None = None,
    synchronized: bool = False,
    virtual_batch_size: int | None = None,
    reference: bool = False,
    xla: bool | None = None,
) -> str:
    """The kernel `training_batch_norm` runs for an input of this static shape, one of `KERNELS`.

    - `"reference"` when `reference` (a mask, renorm, or an adjustment that is not per channel);
    - `"ghost"` with `virtual_batch_size`;
    - `"fused"` with `fused=True`; with `fused=None` where the fused kernel is expected to be
      faster and is exact: not under XLA (XLA expands it into `E[x^2] - E[x]^2`), not
      synchronized, at most `FUSED_MAX_COUNT` values per channel (the count known from the static
      shape), on a GPU wherever it applies, on a CPU for channels-last rank-4/5 inputs with a
      multiple of 4 channels (oneDNN's kernel is slower than the composed one for other channel
      counts and for channels first);
    - `"fused_rank4"` (a rank-2/3 channels-last input viewed as `(-1, 1, 1, C)`) with
      `fused=None` on a GPU, or on a CPU for 256 or more channels (a multiple of 4);
    - `"fused_or_composed"` where the fused kernel would be taken but the count is not known
      when tracing (an unknown batch size, as in `Model.fit`): a `tf.cond` on the count at run
      time between the fused kernel (or its rank-4 view) and the composed one;
    - `"composed"` otherwise (`fused=False` included).

    The CPU rules follow `tfbn bench` timings on a 2-core x86 CPU (docs/benchmarks).
    """
    shape = tf.TensorShape(shape)
    rank = shape.rank
    axis = ops.canonical_axis(axis, rank)
    if reference:
        return "reference"
    if virtual_batch_size is not None:
        return "ghost"
    if fused:
        return "fused"
    dtype = tf.as_dtype(dtype)
    if fused is False or synchronized or dtype.name not in FUSED_DTYPES:
        return "composed"
    xla = reduction.in_xla_context() if xla is None else xla
    channels = shape[axis]
    count = shape.num_elements() // channels if shape.is_fully_defined() and channels else None
    if xla or (count is not None and count > FUSED_MAX_COUNT):
        return "composed"
    on_gpu = bool(tf.config.list_logical_devices("GPU"))
    kernel = "composed"
    if fused_data_format(rank, axis, dtype) is not None:
        channels_last = axis == rank - 1
        kernel = "fused" if on_gpu or (channels_last and channels % 4 == 0) else "composed"
    elif rank in (2, 3) and axis == rank - 1 and channels % 4 == 0:
        kernel = "fused_rank4" if on_gpu or channels >= 256 else "composed"
    if kernel != "composed" and count is None:
        return "fused_or_composed"
    return kernel


# The options only the reference path (`tfbn.ops.nn.batch_norm_training`) implements.
_REFERENCE_ONLY = ("mask", "weights", "renorm_mean")


def training_batch_norm(
    inputs: tf.Tensor,
    axis: int,
    *,
    gamma: tf.Tensor | None = None,
    beta: tf.Tensor | None = None,
    epsilon: float = 1e-3,
    fused: bool | None = None,
    synchronized: bool = False,
    virtual_batch_size: int | None = None,
    adjustment: tuple | None = None,
    **reference_options,
) -> tuple[tf.Tensor, ops.Moments]:
    """Training-mode batch normalization by the kernel `kernel_for` picks.

    Args:
        inputs: Input of rank >= 2, any floating dtype.
        axis: The channel axis.
        gamma: Per-channel scale or `None`, in the statistics dtype.
        beta: Per-channel offset or `None`.
        epsilon: Variance epsilon.
        fused: `True`, `False` or `None` (choose), as the layer's argument.
        synchronized: Global-batch statistics across `tf.distribute` replicas.
        virtual_batch_size: Ghost batches (`tfbn.ops.nn.ghost_view`).
        adjustment: Optional `(scale, bias)` broadcastable to `inputs`, applied to the normalized
            value before `gamma` and `beta`; folded into them when both are per channel.
        **reference_options: `mask`, `weights`, `renorm_mean`, `renorm_stddev` and
            `renorm_clipping`, as `tfbn.ops.nn.batch_norm_training` takes them; a mask, weights or
            renorm statistics (not None) run that reference path.

    Returns:
        `(outputs, moments)`: `outputs` in the statistics dtype, or in the input's with the fused
        kernel; `moments` the per-channel statistics the moving averages track.
    """
    rank = inputs.shape.rank
    axis = ops.canonical_axis(axis, rank)
    if adjustment is not None:
        folded = ops.fold_adjustment(*adjustment, gamma, beta, inputs.shape, axis)
        if folded is not None:
            gamma, beta = folded
            adjustment = None
    kernel = kernel_for(
        inputs.shape,
        axis,
        inputs.dtype,
        fused=fused,
        synchronized=synchronized,
        virtual_batch_size=virtual_batch_size,
        reference=adjustment is not None
        or any(reference_options.get(name) is not None for name in _REFERENCE_ONLY),
    )
    if kernel == "reference":
        return ops.batch_norm_training(
            inputs,
            axis,
            beta=beta,
            gamma=gamma,
            epsilon=epsilon,
            synchronized=synchronized,
            virtual_batch_size=virtual_batch_size,
            adjustment=None if adjustment is None else (lambda shape: adjustment),
            **reference_options,
        )
    if kernel == "ghost":
        return ghost_composed_batch_norm(inputs, gamma, beta, epsilon, axis, virtual_batch_size)
    if kernel == "composed":
        return composed_batch_norm(inputs, gamma, beta, epsilon, axis, synchronized=synchronized)
    if kernel == "fused_or_composed":
        count = tf.size(inputs, out_type=tf.int64) // inputs.shape[axis]

        def composed():
            y, stats = composed_batch_norm(inputs, gamma, beta, epsilon, axis)
            return tf.cast(y, inputs.dtype), stats

        return tf.cond(
            count <= FUSED_MAX_COUNT,
            lambda: _fused_view(inputs, gamma, beta, epsilon, axis),
            composed,
        )
    return _fused_view(inputs, gamma, beta, epsilon, axis)


def _fused_view(inputs, gamma, beta, epsilon, axis):
    """`fused_batch_norm` on `inputs`, or on its `(-1, 1, 1, C)` view for ranks 2 and 3."""
    if inputs.shape.rank in (4, 5):
        return fused_batch_norm(inputs, gamma, beta, epsilon, axis)
    channels = inputs.shape[-1]
    y, stats = fused_batch_norm(tf.reshape(inputs, [-1, 1, 1, channels]), gamma, beta, epsilon, -1)
    return tf.ensure_shape(tf.reshape(y, tf.shape(inputs)), inputs.shape), stats


def fused_batch_norm(
    x: tf.Tensor,
    gamma: tf.Tensor | None,
    beta: tf.Tensor | None,
    epsilon: float,
    axis: int,
) -> tuple[tf.Tensor, ops.Moments]:
    """Training-mode batch normalization with TensorFlow's fused kernel, on a shifted input.

    The kernel sees `x - pivot` (each channel's first value, without gradient): normalization
    does not change under a shift, and the kernel's own float32 mean, whose rounding error grows
    with the mean, is then that of values of the order of the spread
    (docs/benchmarks/statistics.md). Its sums are not bounded
    like `tfbn.ops.reduction`'s: the default kernel choice (`kernel_for`) takes it only for inputs
    of at most `FUSED_MAX_COUNT` values per channel.

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
    pivot = tf.stop_gradient(reduction.first_values(x, axis))
    shape = [1] * rank
    shape[axis] = -1
    y, mean, corrected_variance = tf.compat.v1.nn.fused_batch_norm(
        x - tf.reshape(pivot, shape),
        tf.cast(gamma, tf.float32),
        tf.cast(beta, tf.float32),
        epsilon=epsilon,
        data_format=data_format,
        is_training=True,
    )
    count = reduction.element_count(x, axis, tf.float32)
    # The kernel reports var * n / (n - 1); batch normalization tracks the biased variance.
    variance = corrected_variance * tf.math.divide_no_nan(tf.maximum(count - 1.0, 0.0), count)
    mean = tf.cast(pivot, tf.float32) + mean
    return y, ops.Moments(tf.stop_gradient(mean), tf.stop_gradient(variance), count)


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

    Statistics by `tfbn.ops.nn.centred_moments` in the input's `tfbn.ops.reduction.channel_layout`;
    the output is `shifted * a + b` (`ops.affine` of the offset of the mean from the pivot), so a
    large mean is never subtracted in float32 after the fact. The backward pass is two per-channel
    reductions and one elementwise pass instead of autodiff through the moments.

    With `synchronized=True` in a `tf.distribute` replica context the statistics are those of the
    global batch, and the backward pass all-reduces its two per-channel reductions, so the
    gradients equal a single-device run on the concatenated batch.

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
    ctx = ops.synchronizing_context(synchronized)
    layout = reduction.channel_layout(x, axis)
    count = reduction.element_count(x, axis, dtype)
    stats = ops.centred_moments(layout, count, reduction.first_values(x, axis), replica_context=ctx)
    y = _normalize(layout, stats, gamma, beta, epsilon, ctx)
    moments = ops.Moments(*(tf.stop_gradient(t) for t in stats[:3]))
    return tf.ensure_shape(tf.reshape(y, tf.shape(x)), x.shape), moments


def _normalize(layout, stats: ops.Centred, gamma, beta, epsilon, ctx):
    """The output of `composed_batch_norm` on its layout's view, with its closed-form gradient;
    `ctx` is the replica context when the statistics are synchronized, else `None`."""
    sums, spread = layout.sums, layout.spread
    dtype = stats.shifted.dtype
    offset, variance, count = (tf.stop_gradient(t) for t in stats[4:5] + stats[1:3])
    shifted = stats.shifted
    channels = tf.shape(offset)[0]
    inv = tf.math.rsqrt(variance + ops.constant(epsilon, dtype))
    gamma_t = tf.ones([channels], dtype) if gamma is None else tf.cast(gamma, dtype)
    beta_t = tf.zeros([channels], dtype) if beta is None else tf.cast(beta, dtype)

    @tf.custom_gradient
    def normalize(x, gamma_t, beta_t):
        scale, bias = ops.affine(offset, variance, gamma_t, beta_t, epsilon)
        y = shifted * spread(scale) + spread(bias)

        def grad(dy):
            dy = tf.cast(dy, dtype)
            sum_dy = sums(dy)
            # sum(dy * (x - mean)) from the shifted values: shifted - offset is never formed.
            sum_dy_xhat = (sums(dy * shifted) - offset * sum_dy) * inv
            if ctx is not None:
                # The statistics came from the global batch, so must their derivatives.
                packed = ctx.all_reduce(
                    tf.distribute.ReduceOp.SUM, tf.concat([sum_dy, sum_dy_xhat], 0)
                )
                global_dy, global_dy_xhat = packed[:channels], packed[channels:]
            else:
                global_dy, global_dy_xhat = sum_dy, sum_dy_xhat
            # dx = scale * (dy - mean(dy) - x_hat * mean(dy * x_hat)), as one multiply-add per
            # operand: dy * scale + shifted * slope + constant.
            slope = -scale * inv * tf.math.divide_no_nan(global_dy_xhat, count)
            constant = -scale * tf.math.divide_no_nan(global_dy, count) - offset * slope
            dx = dy * spread(scale) + (shifted * spread(slope) + spread(constant))
            # The parameters' gradients are per replica: the optimizer all-reduces them.
            return dx, sum_dy_xhat, sum_dy

        return y, grad

    return normalize(layout.view, gamma_t, beta_t)


def ghost_composed_batch_norm(
    inputs: tf.Tensor,
    gamma: tf.Tensor | None,
    beta: tf.Tensor | None,
    epsilon: float,
    axis: int,
    virtual_batch_size: int,
) -> tuple[tf.Tensor, ops.Moments]:
    """Ghost batch normalization on the composed kernel (`composed_batch_norm`).

    One composed batch norm over the merged view (`tfbn.ops.nn.ghost_view`: channel `j * C + c` is
    channel `c` of virtual batch `j`), with `gamma` and `beta` tiled `g` times, normalizes every
    virtual batch with its own statistics.

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
    axis = ops.canonical_axis(axis, inputs.shape.rank)
    channels = inputs.shape[axis]
    view = ops.ghost_view(inputs, axis, virtual_batch_size)
    gamma = None if gamma is None else tf.tile(gamma, [view.groups])
    beta = None if beta is None else tf.tile(beta, [view.groups])
    outputs, stats = composed_batch_norm(view.merged, gamma, beta, epsilon, axis)
    per_group = ops.Moments(*(tf.reshape(t, [-1, channels]) for t in stats))
    return view.from_merged(outputs), ops.pool_moments(per_group)

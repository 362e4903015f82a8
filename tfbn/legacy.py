"""`tfbn.legacy.BatchNorm`: tfbn's batch normalization as a tf-keras (Keras 2) layer.

For code that still builds models with `tf_keras` (`pip install tfbn[legacy]`). The layer is a
subclass of `tf_keras.layers.BatchNormalization`: tf-keras creates its variables, validates its
arguments and chooses `fused`; tfbn computes the batch statistics and the normalization with the
same functions as `tfbn.BatchNorm` on TensorFlow (`tfbn.ops.nn`'s `tf_*` functions and
`tfbn.ops.kernels`), whatever `KERAS_BACKEND` says: tf-keras runs on TensorFlow, so the layer never
goes through `tfbn.ops.engine`, which serves Keras 3's backend.

This module imports `tf_keras` and registers the layer with tf-keras: files holding it load in
tf-keras after `import tfbn.legacy`; `import tfbn` does not import tf-keras (nor this module), so
tfbn works without tf-keras installed.
"""

from __future__ import annotations

import math

import tensorflow as tf

try:
    import tf_keras
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "tfbn.legacy needs tf-keras (Keras 2): install it with `pip install tfbn[legacy]`."
    ) from error

from tfbn.ops import kernels as fast
from tfbn.ops import nn as ops
from tfbn.utils import arguments

__all__ = ["BatchNorm"]

_RENORM_VARIABLES = ("moving_stddev", "renorm_mean", "renorm_stddev")


@tf_keras.utils.register_keras_serializable(package="tfbn.legacy")
class BatchNorm(tf_keras.layers.BatchNormalization):
    """Batch normalization for tf-keras: a `tf_keras.layers.BatchNormalization` computed by tfbn.

    A subclass of tf-keras's layer (`isinstance` holds) with its arguments, variables (names,
    shapes, order, ON_READ synchronization with MEAN aggregation), `fused` attribute, config and
    results. Training mode normalizes with the batch statistics and updates the moving statistics
    through `add_update` (so a frozen layer does not update them); inference mode normalizes with
    the moving statistics. It builds and trains in TF1 graph mode (`tf.Graph().as_default()`,
    `tf.compat.v1.disable_eager_execution()`) as tf-keras's layer does, and follows tf-keras's
    learning phase when `training` is not given.

    After `build`, `fused` holds tf-keras's choice (`True` for rank-4/5 inputs with one channel
    axis, 1 or last, in float16/bfloat16/float32, without renorm, `virtual_batch_size`,
    `adjustment` or `synchronized`; else `False`). Where it is `True`, training runs TensorFlow's
    fused kernel and, as tf-keras's fused layer does, moves the moving variance towards the
    Bessel-corrected (unbiased) batch variance; otherwise towards the biased one.

    Differences from tf-keras's layer, in its favour:

    - Under a `tf.distribute` strategy (MirroredStrategy, TPUStrategy, ...), every replica updates
      its copy of the moving statistics with the replica mean of the batch statistics: the copies
      stay identical (tf-keras lets each copy follow its own replica's data and averages them only
      when read). With renorm, the correction `(r, d)` uses these shared averages on every replica.
    - With `synchronized=True` the global-batch variance is computed in two passes, not as
      `E[x^2] - E[x]^2`.
    - A mask is honoured on every path: where `fused` is `True`, tf-keras ignores the mask (with
      a warning) and normalizes with the statistics of every position; this layer computes them
      over the kept positions only. Ghost batches may be combined with masks and with
      `adjustment` (tf-keras refuses the latter).
    - A batch without examples leaves the moving statistics unchanged.
    - The config of a built layer with `virtual_batch_size` rebuilds it (tf-keras's reports its
      axis shifted by the virtual-batch axis, which no input accepts); the config also keeps
      `synchronized` and `fused` as given.
    - Bad arguments (`momentum`, `epsilon`, `renorm_clipping`, `virtual_batch_size`, a
      non-floating `dtype`, ...) raise a `ValueError` naming the argument at construction
      (`tfbn.utils.arguments`, the checks of `tfbn.BatchNorm`).

    Args:
        axis: Integer or list of integers: the axes that keep their own statistics (not 0).
        momentum: Momentum of the moving averages, a number in `[0, 1)`.
        epsilon: Small positive, finite float added to the variance.
        center: If `True`, add the offset `beta` (as in `tfbn.BatchNorm` and tf-keras's layer).
        scale: If `True`, multiply by the scale `gamma`.
        beta_initializer: Initializer for `beta`.
        gamma_initializer: Initializer for `gamma`.
        moving_mean_initializer: Initializer for `moving_mean`.
        moving_variance_initializer: Initializer for `moving_variance`.
        beta_regularizer: Optional regularizer for `beta`.
        gamma_regularizer: Optional regularizer for `gamma`.
        beta_constraint: Optional constraint for `beta`.
        gamma_constraint: Optional constraint for `gamma`.
        synchronized: If `True`, under a `tf.distribute` strategy the statistics are those of the
            global batch across replicas.
        renorm: Batch renormalization (see `tfbn.BatchNorm`); adds `moving_stddev`,
            `renorm_mean`, `renorm_stddev`. Reference path.
        renorm_clipping: Dict with optional keys `"rmax"`, `"rmin"`, `"dmax"`.
        renorm_momentum: Momentum of the renorm moving averages, in `[0, 1)`.
        fused: tf-keras's meaning: `None` fuses where tf-keras would (see above), `True` the same
            or a `ValueError` (tf-keras's), `False` never.
        virtual_batch_size: Ghost batch normalization (see `tfbn.BatchNorm`): must divide every
            training batch size, a short last batch included. Variables then have tf-keras's
            shape `(1, 1, ..., channels)`. Composed kernel
            (`tfbn.ops.kernels.ghost_composed_batch_norm`); reference path with renorm, `adjustment`
            or a mask.
        adjustment: Optional callable `shape -> (scale, bias)`, both broadcastable to the input,
            applied to the normalized values before `gamma`/`beta`, in training only. Reference
            path. Not serialized.
        trainable: If `False`, the layer is frozen and always runs in inference mode.
        name: Layer name.
        **kwargs: Other base-layer arguments (`dtype`, ...).

    Call arguments:
        inputs: Floating-point tensor.
        training: Python boolean or boolean tensor; `None` follows the tf-keras learning phase.
        mask: Optional boolean tensor of rank `rank(inputs) - 1` with tf-keras's meaning: it
            covers the input's axes `0 .. rank - 2` and is broadcast along the last axis,
            whatever `axis` is; size-1 axes broadcast and count as the values they cover.
            Masked positions do not count in the batch statistics (training).

    Reference:
        - [Ioffe and Szegedy, 2015](https://arxiv.org/abs/1502.03167).
        - [Ioffe, 2017](https://arxiv.org/abs/1702.03275) (batch renormalization).
        - [Hoffer et al., 2017](https://arxiv.org/abs/1705.08741) (ghost batch normalization).
    """

    def __init__(
        self,
        axis=-1,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        synchronized: bool = False,
        *,
        renorm: bool = False,
        renorm_clipping: dict | None = None,
        renorm_momentum: float = 0.99,
        fused: bool | None = None,
        trainable: bool = True,
        virtual_batch_size: int | None = None,
        adjustment=None,
        name: str | None = None,
        **kwargs,
    ):
        _check_axis(axis)
        base = arguments.keras_arguments(locals())
        fused = arguments.check_fused(fused)
        clipping = base["renorm_clipping"]
        virtual_batch_size = ops.check_virtual_batch_size(virtual_batch_size, bool(synchronized))
        super().__init__(
            **base,
            fused=fused,
            trainable=trainable,
            virtual_batch_size=virtual_batch_size,
            adjustment=ops.check_adjustment(adjustment),
            name=name,
            **kwargs,
        )
        policy = self._dtype_policy
        arguments.check_floating_dtype(self.name, policy.variable_dtype, policy.compute_dtype)
        # tf-keras keeps these two only with renorm; the update function reads them always.
        self.renorm_clipping, self.renorm_momentum = clipping, base["renorm_momentum"]
        self._fused_argument = fused

    # ----------------------------------------------------------------------------- state
    def build(self, input_shape):
        """tf-keras's build (variables, `fused`, input spec), after tfbn's checks of the axes."""
        input_shape = tf.TensorShape(input_shape)
        rank = input_shape.rank
        if rank is None or rank < 2:
            raise ValueError(
                f"Layer '{self.name}' needs inputs of rank 2 or more; received shape {input_shape}."
            )
        given = [self.axis] if isinstance(self.axis, int) else list(self.axis)
        if any(not -rank <= a < rank or a % rank == 0 for a in given):
            raise ValueError(
                f"Argument `axis` must hold axes in [{-rank + 1}, {rank}) other than 0 for inputs "
                f"of rank {rank}; received axis={self.axis}."
            )
        axes = sorted({a % rank for a in given})
        if len(axes) != len(given):
            raise ValueError(f"Argument `axis` has duplicates; received axis={self.axis}.")
        # tf-keras refuses `adjustment` with ghost batches at build; tfbn supports the two together.
        adjustment, self.adjustment = self.adjustment, None
        try:
            super().build(input_shape)
        finally:
            self.adjustment = adjustment
        self._axes, self._rank = axes, rank
        self._others = [i for i in range(rank) if i not in axes]
        dims = input_shape.as_list()
        self._channels = math.prod(dims[a] for a in axes)

    # ----------------------------------------------------------------------------- views
    # The math works on one channel axis; several `axis` entries are merged into one by moving
    # them last and flattening them (in increasing order, the order of the flattened variables).
    def _channel_axis(self) -> int:
        return self._axes[0] if len(self._axes) == 1 else len(self._others)

    def _to_view(self, x):
        if len(self._axes) == 1:
            return x
        shape = tf.shape(x)
        x = tf.transpose(x, self._others + self._axes)
        return tf.reshape(x, tf.concat([tf.gather(shape, self._others), [-1]], 0))

    def _from_view(self, y, shape):
        if len(self._axes) == 1:
            return y
        perm = self._others + self._axes
        y = tf.reshape(y, tf.gather(shape, perm))
        return tf.transpose(y, [perm.index(i) for i in range(self._rank)])

    def _flat(self, variable, dtype):
        return None if variable is None else tf.reshape(tf.cast(variable, dtype), [-1])

    # ----------------------------------------------------------------------------- compute
    # Python control flow here only reads static values, and `training` tensors go through
    # `tf.cond`: AutoGraph, which tf-keras applies to the `call` of layers outside tf_keras
    # (in TF1 graphs and tf.functions), would only re-transpile tfbn's code at every trace.
    @tf.autograph.experimental.do_not_convert
    def call(self, inputs, training=None, mask=None):
        inputs = tf.cast(inputs, self.compute_dtype)
        if not inputs.dtype.is_floating:
            raise ValueError(
                f"Layer '{self.name}' needs a floating-point input; received {inputs.dtype.name}."
            )
        # tf-keras's rule: None follows the learning phase, and a frozen layer runs inference.
        training = self._get_training_value(training)
        static = tf.get_static_value(training)
        if static is not None and not bool(static):
            return self._infer(inputs)
        if static is not None:
            outputs, stats = self._train(inputs, mask)
        else:
            # Both branches give statistics; inference's count 0 leaves the moving values as they
            # are, so the update is registered outside the cond (as TF1 graphs need).
            outputs, stats = tf.cond(
                tf.cast(training, tf.bool),
                lambda: self._train(inputs, mask),
                lambda: (self._infer(inputs), self._no_moments(inputs.dtype)),
            )
        if self.fused:
            # tf-keras's fused kernel moves the moving variance towards the unbiased variance.
            stats = ops.bessel_corrected(stats)
        self.add_update(lambda: self._update_moving_statistics(stats, outputs))
        return outputs

    def _no_moments(self, dtype) -> ops.Moments:
        dtype = ops.statistics_dtype(dtype)
        zeros = tf.zeros([self._channels], dtype)
        return ops.Moments(zeros, zeros, zeros)

    def _infer(self, inputs):
        dtype = ops.statistics_dtype(inputs.dtype)
        x = self._to_view(tf.cast(inputs, dtype))
        outputs = ops.tf_batch_normalization(
            x,
            self._flat(self.moving_mean, dtype),
            self._flat(self.moving_variance, dtype),
            self._channel_axis(),
            offset=self._flat(self.beta, dtype),
            scale=self._flat(self.gamma, dtype),
            epsilon=self.epsilon,
        )
        outputs = self._from_view(outputs, tf.shape(inputs))
        outputs.set_shape(inputs.shape)
        return tf.cast(outputs, self.compute_dtype)

    def _train(self, inputs, mask):
        dtype = ops.statistics_dtype(inputs.dtype)
        gamma, beta = self._flat(self.gamma, dtype), self._flat(self.beta, dtype)
        axis = self._channel_axis()
        weights = None
        if mask is not None and len(self._axes) > 1:
            # The mask covers the input's axes but the last (`ops._mask_weights`, tf-keras's
            # meaning); the merged-axes view moves them, so it becomes weights on the view.
            full = ops._mask_weights(mask, inputs, axis, dtype)
            weights, mask = self._to_view(tf.broadcast_to(full, tf.shape(inputs))), None
        direct = self.fused and mask is None and weights is None
        outputs, stats = fast.training_batch_norm(
            inputs if direct else self._to_view(inputs),
            axis,
            gamma=gamma,
            beta=beta,
            epsilon=self.epsilon,
            fused=bool(self.fused),
            mask=mask,
            weights=weights,
            synchronized=self.synchronized,
            virtual_batch_size=self.virtual_batch_size,
            renorm_mean=self._flat(self.renorm_mean, dtype) if self.renorm else None,
            renorm_stddev=self._flat(self.renorm_stddev, dtype) if self.renorm else None,
            renorm_clipping=self.renorm_clipping,
            adjustment=self._adjustment_on_view(inputs, dtype),
        )
        outputs = self._from_view(outputs, tf.shape(inputs))
        # The merged-axes view and ghost batches reshape dynamically: keep the static shape.
        outputs.set_shape(inputs.shape)
        return tf.cast(outputs, self.compute_dtype), stats

    def _adjustment_on_view(self, inputs, dtype):
        """The adjustment `(scale, bias)` for the merged-axes view (called on the input's shape)."""
        if self.adjustment is None:
            return None
        adj_scale, adj_bias = self.adjustment(tf.shape(inputs))
        if len(self._axes) > 1:
            adj_scale, adj_bias = (
                self._to_view(tf.broadcast_to(tf.cast(v, dtype), tf.shape(inputs)))
                for v in (adj_scale, adj_bias)
            )
        return adj_scale, adj_bias

    def _update_moving_statistics(self, stats: ops.Moments, outputs):
        """The assignments of the moving statistics, after `outputs` (in a TF1 graph nothing else
        orders them: the renorm correction in `outputs` must read the values before the update)."""
        names = ["moving_mean", "moving_variance"]
        if self.renorm:
            names += list(_RENORM_VARIABLES)
        variables = {name: getattr(self, name) for name in names}
        with tf.control_dependencies([outputs]):
            current = {name: tf.reshape(v, [-1]) for name, v in variables.items()}
            new = ops.moving_statistics_update(
                stats,
                current,
                momentum=self.momentum,
                epsilon=self.epsilon,
                synchronized=self.synchronized,
                renorm_momentum=self.renorm_momentum,
            )
        return [
            variables[name].assign(tf.reshape(value, self._param_shape))
            for name, value in new.items()
        ]

    # ----------------------------------------------------------------------------- config
    def get_config(self):
        """tf-keras's config, with `synchronized` and `fused` as given and the input's axes."""
        config = super().get_config()
        if self.built and self.virtual_batch_size is not None:
            config["axis"] = list(self._axes)
        config["synchronized"] = self.synchronized
        config["fused"] = self._fused_argument
        return config


def _check_axis(axis) -> None:
    """An int or a non-empty list or tuple of ints; anything else is a ValueError."""
    values = [axis] if isinstance(axis, int) and not isinstance(axis, bool) else axis
    if (
        not isinstance(values, (list, tuple))
        or not values
        or any(isinstance(a, bool) or not isinstance(a, int) for a in values)
    ):
        raise ValueError(
            f"Argument `axis` must be an integer or a non-empty list of integers; received "
            f"axis={axis!r}."
        )

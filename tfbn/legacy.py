"""`tfbn.legacy.BatchNorm`: tfbn's batch normalization as a tf-keras (Keras 2) layer.

For code that still builds models with `tf_keras` (`pip install tfbn[legacy]`). The layer takes
`tf_keras.layers.BatchNormalization`'s constructor arguments and gives its results, computed by the
same functions as `tfbn.BatchNorm` (`tfbn.ops` and `tfbn.fast`); only the bookkeeping differs:
tf-keras variables, moving-average updates registered with `add_update`.

This module imports `tf_keras`; `import tfbn` does not import this module, so tfbn works without
tf-keras installed.
"""

from __future__ import annotations

import warnings

import tensorflow as tf

try:
    import tf_keras
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "tfbn.legacy needs tf-keras (Keras 2): install it with `pip install tfbn[legacy]`."
    ) from error

from tfbn import fast, ops
from tfbn.fast import ghost_composed_batch_norm

__all__ = ["BatchNorm"]

_RENORM_VARIABLES = ("moving_stddev", "renorm_mean", "renorm_stddev")


@tf_keras.utils.register_keras_serializable(package="tfbn.legacy")
class BatchNorm(tf_keras.layers.Layer):
    """Batch normalization for tf-keras, a drop-in for `tf_keras.layers.BatchNormalization`.

    Same arguments, variables (names, shapes, order) and results as tf-keras's layer, so weights
    transfer both ways with `get_weights`/`set_weights`. Training mode normalizes with the batch
    statistics and updates the moving statistics (registered with `add_update`, so a frozen layer
    does not update them); inference mode normalizes with the moving statistics.

    Differences from tf-keras's layer, in its favour:

    - Under a `tf.distribute` strategy (MirroredStrategy, TPUStrategy, ...), the moving statistics
      are ON_READ variables averaged over replicas, as in tf-keras, and every replica updates its
      copy with the replica mean of the batch statistics: the copies stay identical (tf-keras lets
      each copy follow its own replica's data and averages them only when read). With renorm,
      the correction `(r, d)` uses these shared averages on every replica.
    - With `synchronized=True` the global-batch variance is computed in two passes, not as
      `E[x^2] - E[x]^2`.
    - A mask is honoured on every path (tf-keras ignores it with a warning when fused); ghost
      batches may be combined with `adjustment` and with masks.
    - Bad arguments raise a `ValueError` at construction.

    Args:
        axis: Integer or list of integers: the axes that keep their own statistics (not 0).
        momentum: Momentum of the moving averages, in `[0, 1)`.
        epsilon: Small positive float added to the variance.
        center: If `True`, add the learned offset `beta`.
        scale: If `True`, multiply by the learned scale `gamma`.
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
        fused: tf-keras's meaning. `None`: fused where tf-keras would fuse (rank-4/5 input, one
            channel axis 1 or last, float16/bfloat16/float32, none of renorm,
            `virtual_batch_size`, `adjustment`, `synchronized`); `True`: the same conditions,
            else a `ValueError`; `False`: never. Fused training runs TensorFlow's fused kernel and,
            as tf-keras's fused layer does, moves the moving variance towards the Bessel-corrected
            (unbiased) batch variance; otherwise towards the biased one.
        virtual_batch_size: Ghost batch normalization (see `tfbn.BatchNorm`): must divide every
            training batch size, a short last batch included. Variables then have tf-keras's
            shape `(1, 1, ..., channels)`. Composed kernel
            (`tfbn.fast.ghost_composed_batch_norm`); reference path with renorm, `adjustment`
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
        mask: Optional boolean tensor over the input's axes other than the channel axes (in
            order); masked positions do not count in the batch statistics.

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
        super().__init__(name=name, trainable=trainable, **kwargs)
        self.axis = _check_axis(axis)
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(
                f"Argument `momentum` must be in [0, 1); received momentum={momentum}."
            )
        if not float(epsilon) > 0.0:
            raise ValueError(f"Argument `epsilon` must be positive; received epsilon={epsilon}.")
        if not 0.0 <= float(renorm_momentum) < 1.0:
            raise ValueError(
                "Argument `renorm_momentum` must be in [0, 1); received "
                f"renorm_momentum={renorm_momentum}."
            )
        if fused not in (None, True, False):
            raise ValueError(f"Argument `fused` must be None, True or False; received {fused!r}.")
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.center = bool(center)
        self.scale = bool(scale)
        self.beta_initializer = tf_keras.initializers.get(beta_initializer)
        self.gamma_initializer = tf_keras.initializers.get(gamma_initializer)
        self.moving_mean_initializer = tf_keras.initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = tf_keras.initializers.get(moving_variance_initializer)
        self.beta_regularizer = tf_keras.regularizers.get(beta_regularizer)
        self.gamma_regularizer = tf_keras.regularizers.get(gamma_regularizer)
        self.beta_constraint = tf_keras.constraints.get(beta_constraint)
        self.gamma_constraint = tf_keras.constraints.get(gamma_constraint)
        self.synchronized = bool(synchronized)
        self.renorm = bool(renorm)
        self.renorm_clipping = ops.check_renorm_clipping(renorm_clipping)
        self.renorm_momentum = float(renorm_momentum)
        self.virtual_batch_size = ops.check_virtual_batch_size(
            virtual_batch_size, self.synchronized
        )
        self.adjustment = ops.check_adjustment(adjustment)
        if fused:
            reason = self._unfusable_reason()
            if reason:
                raise ValueError(f"Argument `fused=True` cannot be used: {reason}.")
        self.fused = fused
        self.supports_masking = True
        self.gamma = self.beta = self.moving_mean = self.moving_variance = None
        self.moving_stddev = self.renorm_mean = self.renorm_stddev = None

    def _unfusable_reason(self, rank: int | None = None) -> str | None:
        """Why tf-keras would not fuse this layer (None: it would)."""
        for option in ("renorm", "virtual_batch_size", "adjustment", "synchronized"):
            if getattr(self, option):
                return f"it cannot be combined with `{option}`"
        if self._compute_dtype not in ("float16", "bfloat16", "float32", None):
            return (
                f"the compute dtype must be float16, bfloat16 or float32, not {self._compute_dtype}"
            )
        axes = [self.axis] if isinstance(self.axis, int) else self.axis
        if rank is None:
            if len(axes) != 1 or axes[0] not in (-4, -3, -1, 1, 3, 4):
                return f"it needs a single channel axis, 1 or last; received axis={self.axis}"
            return None
        if rank not in (4, 5):
            return f"it needs a rank-4 or rank-5 input; received rank {rank}"
        if len(axes) != 1 or axes[0] % rank not in (1, rank - 1):
            return f"it needs the channel axis 1 or last; received axis={self.axis}, rank {rank}"
        return None

    @property
    def _param_dtype(self):
        # 16-bit layers keep float32 parameters and statistics.
        dtype = tf.as_dtype(self.dtype or tf.float32)
        return tf.float32 if dtype in (tf.float16, tf.bfloat16) else dtype

    # ----------------------------------------------------------------------------- state
    def build(self, input_shape):
        input_shape = tf.TensorShape(input_shape)
        rank = input_shape.rank
        if rank is None or rank < 2:
            raise ValueError(
                f"Layer '{self.name}' needs inputs of rank 2 or more; received shape {input_shape}."
            )
        axes = sorted({a % rank if -rank <= a < rank else a for a in _as_list(self.axis)})
        if any(not 0 < a < rank for a in axes):
            raise ValueError(
                f"Argument `axis` must hold axes in [{-rank + 1}, {rank}) other than 0 for inputs "
                f"of rank {rank}; received axis={self.axis}."
            )
        if len(axes) != len(_as_list(self.axis)):
            raise ValueError(f"Argument `axis` has duplicates; received axis={self.axis}.")
        dims = {a: input_shape[a] for a in axes}
        if any(d is None for d in dims.values()):
            raise ValueError(
                f"The axes {axes} of the input to layer '{self.name}' must have known sizes; "
                f"received input_shape={input_shape}."
            )
        self._axes, self._rank = axes, rank
        self._channels = int(tf.reduce_prod([dims[a] for a in axes]))
        self._others = [i for i in range(rank) if i not in axes]
        reason = self._unfusable_reason(rank)
        if self.fused and reason:
            raise ValueError(f"Argument `fused=True` cannot be used: {reason}.")
        self._fused = self.fused is not False and reason is None
        if len(axes) == 1 and self.virtual_batch_size is None:
            param_shape = [dims[axes[0]]]
        else:
            param_shape = [dims.get(i, 1) for i in range(rank)]
            if self.virtual_batch_size is not None:
                param_shape.insert(1, 1)
        self._param_shape = param_shape
        self.input_spec = tf_keras.layers.InputSpec(ndim=rank, axes=dims)

        def weight(name, initializer, trainable, **kw):
            return self.add_weight(
                name=name,
                shape=param_shape,
                dtype=self._param_dtype,
                initializer=initializer,
                trainable=trainable,
                experimental_autocast=False,
                **kw,
            )

        if self.scale:
            self.gamma = weight(
                "gamma",
                self.gamma_initializer,
                True,
                regularizer=self.gamma_regularizer,
                constraint=self.gamma_constraint,
            )
        if self.center:
            self.beta = weight(
                "beta",
                self.beta_initializer,
                True,
                regularizer=self.beta_regularizer,
                constraint=self.beta_constraint,
            )
        # tf-keras's kind of moving variables: one copy per replica, averaged when read. Every
        # replica assigns the same value here, so the copies never differ.
        on_read = dict(
            synchronization=tf.VariableSynchronization.ON_READ,
            aggregation=tf.VariableAggregation.MEAN,
        )
        self.moving_mean = weight("moving_mean", self.moving_mean_initializer, False, **on_read)
        self.moving_variance = weight(
            "moving_variance", self.moving_variance_initializer, False, **on_read
        )
        if self.renorm:

            def stddev_initializer(*args, **kwargs):
                return tf.sqrt(self.moving_variance_initializer(*args, **kwargs))

            for name, initializer in zip(
                _RENORM_VARIABLES,
                (stddev_initializer, self.moving_mean_initializer, stddev_initializer),
                strict=True,
            ):
                setattr(self, name, weight(name, initializer, False, **on_read))
        super().build(input_shape)

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
    def call(self, inputs, training=None, mask=None):
        inputs = tf.cast(inputs, self.compute_dtype)
        if not inputs.dtype.is_floating:
            raise ValueError(
                f"Layer '{self.name}' needs a floating-point input; received {inputs.dtype.name}."
            )
        if training is None:
            training = tf_keras.backend.learning_phase()
        if not self.trainable:
            training = False
        if isinstance(training, int):
            training = bool(training)
        static = tf.get_static_value(training)
        if static is not None:
            if bool(static):
                return self._train(inputs, mask)
            return self._infer(inputs)
        return tf.cond(
            tf.cast(training, tf.bool),
            lambda: self._train(inputs, mask),
            lambda: self._infer(inputs),
        )

    def _infer(self, inputs):
        dtype = ops.statistics_dtype(inputs.dtype)
        x = self._to_view(tf.cast(inputs, dtype))
        outputs = ops.batch_norm(
            x,
            self._flat(self.moving_mean, dtype),
            self._flat(self.moving_variance, dtype),
            self._flat(self.beta, dtype),
            self._flat(self.gamma, dtype),
            self.epsilon,
            self._channel_axis(),
        )
        outputs = self._from_view(outputs, tf.shape(inputs))
        outputs.set_shape(inputs.shape)
        return tf.cast(outputs, self.compute_dtype)

    def _train(self, inputs, mask):
        dtype = ops.statistics_dtype(inputs.dtype)
        gamma, beta = self._flat(self.gamma, dtype), self._flat(self.beta, dtype)
        axis = self._channel_axis()
        if self._fused and mask is None:
            outputs, stats = fast.fused_batch_norm(inputs, gamma, beta, self.epsilon, axis)
        elif self.renorm or self.adjustment or mask is not None:
            adjustment = None
            if self.adjustment is not None:
                adj_scale, adj_bias = self.adjustment(tf.shape(inputs))
                if len(self._axes) > 1:
                    adj_scale, adj_bias = (
                        self._to_view(tf.broadcast_to(tf.cast(v, dtype), tf.shape(inputs)))
                        for v in (adj_scale, adj_bias)
                    )
                adjustment = lambda shape: (adj_scale, adj_bias)  # noqa: E731
            outputs, stats = ops.batch_norm_training(
                self._to_view(inputs),
                axis,
                beta=beta,
                gamma=gamma,
                epsilon=self.epsilon,
                mask=mask,
                synchronized=self.synchronized,
                virtual_batch_size=self.virtual_batch_size,
                renorm_mean=self._flat(self.renorm_mean, dtype),
                renorm_stddev=self._flat(self.renorm_stddev, dtype),
                renorm_clipping=self.renorm_clipping,
                adjustment=adjustment,
            )
        elif self.virtual_batch_size is not None:
            outputs, stats = ghost_composed_batch_norm(
                self._to_view(inputs), gamma, beta, self.epsilon, axis, self.virtual_batch_size
            )
        else:
            outputs, stats = fast.composed_batch_norm(
                self._to_view(inputs),
                gamma,
                beta,
                self.epsilon,
                axis,
                synchronized=self.synchronized,
            )
        if self._fused:
            # tf-keras's fused kernel moves the moving variance towards the unbiased variance.
            stats = ops.bessel_corrected(stats)
        self.add_update(lambda: self._update_moving_statistics(stats))
        outputs = self._from_view(outputs, tf.shape(inputs))
        # The merged-axes view and ghost batches reshape dynamically: keep the static shape.
        outputs.set_shape(inputs.shape)
        return tf.cast(outputs, self.compute_dtype)

    def _update_moving_statistics(self, stats: ops.Moments):
        names = ["moving_mean", "moving_variance"]
        if self.renorm:
            names += list(_RENORM_VARIABLES)
        variables = {name: getattr(self, name) for name in names}
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

    def compute_output_shape(self, input_shape):
        return input_shape

    # ----------------------------------------------------------------------------- config
    def get_config(self):
        config = {
            "axis": self.axis,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": tf_keras.initializers.serialize(self.beta_initializer),
            "gamma_initializer": tf_keras.initializers.serialize(self.gamma_initializer),
            "moving_mean_initializer": tf_keras.initializers.serialize(
                self.moving_mean_initializer
            ),
            "moving_variance_initializer": tf_keras.initializers.serialize(
                self.moving_variance_initializer
            ),
            "beta_regularizer": tf_keras.regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": tf_keras.regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": tf_keras.constraints.serialize(self.beta_constraint),
            "gamma_constraint": tf_keras.constraints.serialize(self.gamma_constraint),
            "synchronized": self.synchronized,
            "renorm": self.renorm,
            "renorm_clipping": self.renorm_clipping or None,
            "renorm_momentum": self.renorm_momentum,
            "fused": self.fused,
            "virtual_batch_size": self.virtual_batch_size,
        }
        if self.adjustment is not None:
            warnings.warn(
                f"Layer '{self.name}': its `adjustment` callable cannot be serialized and is left "
                "out of the config; a layer rebuilt from it has no adjustment.",
                stacklevel=2,
            )
        return {**super().get_config(), **config}


def _as_list(axis) -> list:
    return [axis] if isinstance(axis, int) else list(axis)


def _check_axis(axis):
    """An int or a non-empty list of ints (kept as given); anything else is a ValueError."""
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
    return axis if isinstance(axis, int) else list(axis)

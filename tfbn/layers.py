"""`tfbn.BatchNorm`: a Keras 3 batch-normalization layer that keeps moving statistics."""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import constraints, initializers, regularizers

from tfbn import fast, ops

__all__ = ["BatchNorm"]


@keras.saving.register_keras_serializable(package="tfbn")
class BatchNorm(keras.layers.Layer):
    """Batch normalization (Ioffe and Szegedy, 2015), a drop-in for `keras.layers.BatchNormalization`.

    In training mode (`fit`, or a call with `training=True`) the layer normalizes each channel with
    the mean and (biased) variance of the current batch and updates its moving statistics:

        moving_mean = momentum * moving_mean + (1 - momentum) * batch_mean
        moving_variance = momentum * moving_variance + (1 - momentum) * batch_variance

    In inference mode (`predict`, `evaluate`, a bare call) it normalizes with the moving statistics.
    The output is `gamma * (x - mean) / sqrt(variance + epsilon) + beta`.

    Differences from `keras.layers.BatchNormalization`, all in its favour:

    - Under a `tf.distribute` strategy with `synchronized=False`, every replica updates its moving
      statistics with the mean over replicas of the per-replica batch statistics, so all copies
      stay identical and a saved model carries that estimate (Keras's layer lets each replica's
      copy drift and saves the first replica's).
    - With `synchronized=True` the global-batch variance is computed in two passes (no
      `E[x^2] - E[x]^2` cancellation) and equals a single-device run on the concatenated batch.
    - A replica or batch with no examples contributes nothing instead of NaN.

    Args:
        axis: Integer, the channel axis (the one that keeps its own statistics). `-1` for channels
            last; `1` after a `Conv2D` with `data_format="channels_first"`.
        momentum: Momentum of the moving averages, in `[0, 1)`.
        epsilon: Small positive float added to the variance.
        center: If `True`, add the learned offset `beta`.
        scale: If `True`, multiply by the learned scale `gamma`. Can be `False` when the next layer
            is linear (it can absorb the scale).
        beta_initializer: Initializer for `beta`.
        gamma_initializer: Initializer for `gamma`.
        moving_mean_initializer: Initializer for `moving_mean`.
        moving_variance_initializer: Initializer for `moving_variance`.
        beta_regularizer: Optional regularizer for `beta`.
        gamma_regularizer: Optional regularizer for `gamma`.
        beta_constraint: Optional constraint for `beta`.
        gamma_constraint: Optional constraint for `gamma`.
        synchronized: If `True`, under a `tf.distribute` strategy the batch statistics are those
            of the global batch across all replicas (all-reduced at every training step). If
            `False`, each replica normalizes with its own batch statistics.
        fused: Which training-mode kernel to use. `True`: TensorFlow's fused batch-norm kernel
            (cuDNN on GPU, oneDNN on CPU, XLA's own under `jit_compile`); it takes rank-4/5 inputs
            with the channel axis 1 or last, in float16, bfloat16 or float32, and not
            `synchronized`. `False`: the composed kernel, any rank, with a closed-form gradient.
            `None` (default): the fused kernel where it applies and is faster (on a CPU, oneDNN's
            kernel is fast only for channel counts divisible by 4), else the composed one. Masked
            calls always use the composed statistics. All paths give the same results.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, `trainable`, ...).

    Call arguments:
        inputs: Floating-point tensor of rank 2 to 5.
        training: Python boolean. `True` normalizes with the batch statistics and updates the
            moving statistics; `False` (the default outside `fit`) uses the moving statistics.
            A layer with `trainable=False` always runs in inference mode (fine-tuning).
        mask: Optional boolean tensor over the input's non-channel axes; masked positions do not
            count in the batch statistics.

    Notes:
        Training on a rank-2 batch of size 1 normalizes every value to 0 (nothing can be learned):
        in eager mode that raises a `ValueError`; inside a compiled function, where the batch size
        may be unknown, the layer outputs `beta` and updates the moving variance towards 0.

    Reference:
        - [Ioffe and Szegedy, 2015](https://arxiv.org/abs/1502.03167).
    """

    def __init__(
        self,
        axis: int = -1,
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
        fused: bool | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise ValueError(f"Argument `axis` must be an integer; received axis={axis!r}.")
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(
                f"Argument `momentum` must be in [0, 1); received momentum={momentum}."
            )
        if not float(epsilon) > 0.0:
            raise ValueError(f"Argument `epsilon` must be positive; received epsilon={epsilon}.")
        self.axis = axis
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.center = bool(center)
        self.scale = bool(scale)
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(moving_variance_initializer)
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        self.synchronized = bool(synchronized)
        if fused not in (None, True, False):
            raise ValueError(f"Argument `fused` must be None, True or False; received fused={fused!r}.")
        if fused and synchronized:
            raise ValueError(
                "Argument `fused=True` cannot be combined with `synchronized=True`: the fused kernel "
                "computes per-replica statistics. Use fused=None or fused=False."
            )
        self.fused = fused
        self.supports_masking = True

        self.gamma = None
        self.beta = None
        self.moving_mean = None
        self.moving_variance = None
        self._channel_axis = None

    # ----------------------------------------------------------------------------- state
    def build(self, input_shape):
        input_shape = tuple(input_shape)
        rank = len(input_shape)
        axis = ops.canonical_axis(self.axis, rank)
        channels = input_shape[axis]
        if channels is None:
            raise ValueError(
                f"The channel axis {self.axis} of the input to layer '{self.name}' must have a "
                f"known size when the layer is built; received input_shape={input_shape}."
            )
        self._channel_axis = axis
        self._rank = rank
        if self.fused and fast.fused_data_format(rank, axis, "float32") is None:
            raise ValueError(
                f"Argument `fused=True` needs a rank-4 or rank-5 input with the channel axis 1 or "
                f"last; layer '{self.name}' received input_shape={input_shape} with axis={self.axis}."
            )
        shape = (int(channels),)
        if self.scale:
            self.gamma = self.add_weight(
                shape=shape,
                name="gamma",
                initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer,
                constraint=self.gamma_constraint,
                trainable=True,
                autocast=False,
            )
        if self.center:
            self.beta = self.add_weight(
                shape=shape,
                name="beta",
                initializer=self.beta_initializer,
                regularizer=self.beta_regularizer,
                constraint=self.beta_constraint,
                trainable=True,
                autocast=False,
            )
        self.moving_mean = self.add_weight(
            shape=shape,
            name="moving_mean",
            initializer=self.moving_mean_initializer,
            trainable=False,
            autocast=False,
        )
        self.moving_variance = self.add_weight(
            shape=shape,
            name="moving_variance",
            initializer=self.moving_variance_initializer,
            trainable=False,
            autocast=False,
        )

    @property
    def channels(self) -> int | None:
        """Number of channels (known once built)."""
        return None if self.moving_mean is None else int(self.moving_mean.shape[0])

    def compute_output_shape(self, input_shape):
        ops.canonical_axis(self.axis, len(input_shape))
        return input_shape

    # ----------------------------------------------------------------------------- compute
    def _check_input(self, inputs) -> None:
        shape = inputs.shape
        if shape.rank != self._rank:
            raise ValueError(
                f"Layer '{self.name}' was built for inputs of rank {self._rank}; received an "
                f"input of shape {tuple(shape)}."
            )
        channels = shape[self._channel_axis]
        if channels is not None and channels != self.channels:
            raise ValueError(
                f"Layer '{self.name}' was built for {self.channels} channels on axis {self.axis}; "
                f"received an input of shape {tuple(shape)} with {channels} channels."
            )
        if not inputs.dtype.is_floating:
            raise ValueError(
                f"Layer '{self.name}' needs a floating-point input; received dtype="
                f"{inputs.dtype.name}. Cast the input, e.g. to float32."
            )

    def call(self, inputs, training=None, mask=None):
        inputs = tf.convert_to_tensor(inputs)
        self._check_input(inputs)
        stat_dtype = ops.statistics_dtype(inputs.dtype)
        gamma = None if self.gamma is None else tf.cast(self.gamma, stat_dtype)
        beta = None if self.beta is None else tf.cast(self.beta, stat_dtype)
        axis = self._channel_axis

        if not (training and self.trainable):
            # float16/bfloat16 inputs are normalized in float32: their squares overflow float16.
            x = tf.cast(inputs, stat_dtype)
            mean = tf.cast(self.moving_mean, stat_dtype)
            variance = tf.cast(self.moving_variance, stat_dtype)
            outputs = ops.batch_norm(x, mean, variance, beta, gamma, self.epsilon, axis)
            return tf.cast(outputs, self.compute_dtype)

        if self._rank == 2 and tf.executing_eagerly() and inputs.shape[0] == 1:
            raise ValueError(
                f"Layer '{self.name}' cannot train on a batch of size 1 with rank-2 input: every "
                "normalized value would be 0. Use a batch of 2 or more, or call with training=False."
            )
        if mask is not None:
            x = tf.cast(inputs, stat_dtype)
            stats = ops.moments(x, axis, mask=mask, synchronized=self.synchronized)
            outputs = ops.batch_norm(x, stats.mean, stats.variance, beta, gamma, self.epsilon, axis)
        elif self._use_fused(inputs.dtype):
            # The fused kernel reads float16/bfloat16 directly and reduces in float32.
            outputs, stats = fast.fused_batch_norm(inputs, gamma, beta, self.epsilon, axis)
        else:
            outputs, stats = fast.composed_batch_norm(
                inputs, gamma, beta, self.epsilon, axis, synchronized=self.synchronized
            )
        self._update_moving_statistics(stats)
        return tf.cast(outputs, self.compute_dtype)

    def _use_fused(self, dtype) -> bool:
        if self.fused is False or self.synchronized:
            return False
        if fast.fused_data_format(self._rank, self._channel_axis, dtype) is None:
            return False
        return self.fused or fast.fused_is_faster(self.channels)

    def _update_moving_statistics(self, stats: ops.Moments) -> None:
        # Synchronized statistics are already global; otherwise average the replicas' statistics
        # so that every copy of the moving variables receives the same update.
        if not self.synchronized:
            stats = ops.replica_mean_moments(stats)
        seen = stats.count > 0
        for variable, value in (
            (self.moving_mean, stats.mean),
            (self.moving_variance, stats.variance),
        ):
            old = tf.cast(variable, value.dtype)
            new = old * self.momentum + value * (1.0 - self.momentum)
            variable.assign(tf.cast(tf.where(seen, new, old), variable.dtype))

    # ----------------------------------------------------------------------------- config
    def get_config(self):
        config = {
            "axis": self.axis,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": initializers.serialize(self.beta_initializer),
            "gamma_initializer": initializers.serialize(self.gamma_initializer),
            "moving_mean_initializer": initializers.serialize(self.moving_mean_initializer),
            "moving_variance_initializer": initializers.serialize(
                self.moving_variance_initializer
            ),
            "beta_regularizer": regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": constraints.serialize(self.beta_constraint),
            "gamma_constraint": constraints.serialize(self.gamma_constraint),
            "synchronized": self.synchronized,
            "fused": self.fused,
        }
        return {**super().get_config(), **config}

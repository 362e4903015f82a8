"""`tfbn.BatchNorm`: a Keras 3 batch-normalization layer that keeps moving statistics."""

from __future__ import annotations

import warnings

import keras
from keras import ops

from tfbn.ops import core
from tfbn.ops.engine import engine
from tfbn.utils import arguments

__all__ = ["BatchNorm"]


@keras.saving.register_keras_serializable(package="tfbn")
class BatchNorm(keras.layers.BatchNormalization):
    """Batch normalization (Ioffe and Szegedy, 2015): a drop-in for Keras's BatchNormalization.

    A subclass of `keras.layers.BatchNormalization` (`isinstance` holds) with its arguments, its
    variables (names, shapes, order, dtypes) and its config keys, plus `fused` and
    `virtual_batch_size`; tools that find batch-norm layers by Keras's class find this one.

    In training mode (`fit`, or a call with `training=True`) the layer normalizes each channel with
    the mean and (biased) variance of the current batch and updates its moving statistics:

        moving_mean = momentum * moving_mean + (1 - momentum) * batch_mean
        moving_variance = momentum * moving_variance + (1 - momentum) * batch_variance

    In inference mode (`predict`, `evaluate`, a bare call) it normalizes with the moving statistics.
    The output is `gamma * (x - mean) / sqrt(variance + epsilon) + beta`.

    It runs on Keras's TensorFlow, JAX and PyTorch backends (`tfbn.ops.engine` picks the kernels:
    TensorFlow's fused and composed kernels, or `tfbn.ops.core` in `keras.ops`), with the same
    variables and config, so a `.keras` file saved on one loads on the others. `fused` only
    chooses among TensorFlow's kernels.

    Differences from `keras.layers.BatchNormalization`, all in its favour:

    - Under a `tf.distribute` strategy with `synchronized=False`, every replica updates its moving
      statistics with the mean over replicas of the per-replica batch statistics, so all copies
      stay identical and a saved model carries that estimate (Keras's layer lets each replica's
      copy drift and saves the first replica's).
    - The batch statistics (every kernel, `synchronized=True` included) come from two passes
      shifted by a value of each channel, with bounded float32 sums
      (`tfbn.ops.nn.centred_moments`): at `|mean| / std = 1e4` with up to 2^20 values per channel
      the variance is within 1e-4 relative of float64, where Keras's `E[x^2] - E[x]^2` loses it.
      With `synchronized=True` they equal a single-device run on the concatenated batch.
    - A replica or batch with no examples contributes nothing instead of NaN.
    - tf-keras's options are here too: ghost batch normalization (`virtual_batch_size`) and
      `adjustment`, besides Keras's batch renormalization and masks.

    Args:
        axis: Integer, the channel axis (the one that keeps its own statistics). `-1` for channels
            last; `1` after a `Conv2D` with `data_format="channels_first"`.
        momentum: Momentum of the moving averages, a real number in `[0, 1)`.
        epsilon: Finite float > 0 added to the variance.
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
        renorm: Whether to use batch renormalization (Ioffe, 2017): in training the normalized
            value `x_hat` becomes `x_hat * r + d`, where `r = sigma_B / sigma` and
            `d = (mu_B - mu) / sigma` (no gradient) compare the batch statistics with moving
            averages `renorm_mean` and `renorm_stddev` kept with `renorm_momentum`. Adds the
            non-trainable variables `moving_stddev`, `renorm_mean` and `renorm_stddev` (Keras's
            names, so weights transfer); `moving_variance` is then `moving_stddev ** 2 -
            epsilon`. Inference is unchanged. Uses the reference path (no fused kernel).
        renorm_clipping: Dict with optional keys `"rmax"`, `"rmin"`, `"dmax"`: `r` is clipped to
            `[rmin, rmax]` and `d` to `[-dmax, dmax]`; missing keys mean no bound. Values are
            finite, with `rmax > 0`, `rmin >= 0`, `rmax >= rmin`, `dmax >= 0`. Only used with
            `renorm=True` (checked always).
        renorm_momentum: Momentum of `renorm_mean` and `renorm_stddev`, a real in `[0, 1)`. Unlike
            `momentum` it changes training: too small adds noise, too large gives stale values.
        synchronized: If `True`, under a `tf.distribute` strategy the batch statistics are those
            of the global batch across all replicas (all-reduced at every training step). If
            `False`, each replica normalizes with its own batch statistics. On JAX (where Keras's
            layer refuses `True`) it is accepted and changes nothing: under `keras.distribution`
            the arrays are global, so the statistics are those of the global batch either way.
            On PyTorch it is accepted with a warning (once per process): each process
            normalizes with the statistics of its own batch (no `torch.distributed` reduction).
        fused: Which training-mode kernel to use. `True`: TensorFlow's fused batch-norm kernel
            (cuDNN on GPU, oneDNN on CPU, XLA's own under `jit_compile`); it takes rank-4/5 inputs
            with the channel axis 1 or last, in float16, bfloat16 or float32, and not
            `synchronized`. `False`: the composed kernel, any rank, with a closed-form gradient.
            `None` (default): the fused kernel where it is expected to be faster, on the input as
            it is or viewed as rank 4, else the composed one, which also serves every input under
            XLA (`tfbn.ops.kernels.kernel_for`). Masked calls always use the reference statistics.
            All paths give the same results, except that under XLA the fused kernel (`fused=True`)
            is expanded into `E[x^2] - E[x]^2`, which cancels for inputs with large means.
            `fused=True` cannot be combined with `renorm`, `virtual_batch_size` or `adjustment` (as
            in tf-keras); with `fused=None` those options choose their own path (below).
        virtual_batch_size: Ghost batch normalization (Hoffer et al., 2017; tf-keras's argument):
            if set, a training batch of `n` examples is split into `n // virtual_batch_size`
            virtual batches, each normalized with its own statistics; virtual batch `j` holds
            examples `j, j + g, j + 2g, ...` with `g = n // virtual_batch_size` (tf-keras's
            grouping). The moving statistics move towards the mean over virtual batches of
            their means and variances. Must divide every training batch size, a short last
            batch included (batch the data with `drop_remainder=True`, or pick a divisor);
            otherwise a `ValueError`, or an `InvalidArgumentError` in a graph where the batch
            size is unknown. Under a strategy it applies to each replica's batch. Not with
            `synchronized=True`. Runs on the composed kernel
            (`tfbn.ops.kernels.ghost_composed_batch_norm`); on the reference path with renorm, a
            mask or a non-per-channel adjustment.
        adjustment: Optional callable taking the input's dynamic shape (a 1-D int tensor) and
            returning `(scale, bias)`, both broadcastable to the input, applied to the normalized
            value before `gamma` and `beta` in training only:
            `gamma * (x_hat * scale + bias) + beta` (tf-keras's argument, e.g. random scales for
            augmentation). When both are per-channel (shape `()`, `(1,)` or `(channels,)` for
            the last axis, or the channel axis kept in a broadcastable shape) they are folded into
            `gamma` and `beta` and the fast kernels run; otherwise the reference path does. It is
            not serialized by `get_config` (a callable), so a reloaded layer has none.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, `trainable`, ...); `dtype`
            must be a floating-point dtype or policy.

    Raises:
        ValueError: at construction, naming the argument and the value, for an argument outside
            the ranges above, and when the Keras backend is not one of
            `tfbn.ops.engine.SUPPORTED_BACKENDS` (TensorFlow, JAX, PyTorch).

    Call arguments:
        inputs: Floating-point tensor of rank 2 to 5.
        training: Python boolean. `True` normalizes with the batch statistics and updates the
            moving statistics; `False` (the default outside `fit`) uses the moving statistics.
            A layer with `trainable=False` always runs in inference mode (fine-tuning).
        mask: Optional boolean tensor of rank `rank(inputs) - 1`, with Keras's meaning: it covers
            the input's axes `0 .. rank - 2` and is broadcast along the last axis, whatever
            `axis` is (a `Masking()` mask of shape `(N, C)` before `BatchNorm(axis=1)` on
            `(N, C, T)` masks whole channels of some examples); its size-1 axes broadcast and
            count as the values they cover. Masked positions do not count in the batch
            statistics (training); inference ignores the mask. Another rank is a `ValueError`.

    Notes:
        Training on a rank-2 batch of size 1 normalizes every value to 0 (nothing can be learned):
        where the batch size is known (eager mode, a traced shape, any call on JAX) that raises a
        `ValueError`; inside a compiled function where it is unknown, the layer outputs `beta`
        and updates the moving variance towards 0.

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
        renorm: bool = False,
        renorm_clipping: dict | None = None,
        renorm_momentum: float = 0.99,
        synchronized: bool = False,
        fused: bool | None = None,
        virtual_batch_size: int | None = None,
        adjustment=None,
        **kwargs,
    ):
        arguments.check_backend(keras.backend.backend())
        if synchronized and keras.backend.backend() == "torch":
            _warn_per_process_statistics()
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise ValueError(f"Argument `axis` must be an integer; received axis={axis!r}.")
        base = arguments.keras_arguments(locals())
        fused = arguments.check_fused(fused)
        if fused and synchronized:
            raise ValueError(
                "Argument `fused=True` cannot be combined with `synchronized=True`: the fused "
                "kernel computes per-replica statistics. Use fused=None or fused=False."
            )
        clipping = base["renorm_clipping"]
        virtual_batch_size = core.check_virtual_batch_size(virtual_batch_size, bool(synchronized))
        adjustment = core.check_adjustment(adjustment)
        if fused:
            for name, value in (
                ("renorm", renorm),
                ("virtual_batch_size", virtual_batch_size),
                ("adjustment", adjustment),
            ):
                if value:
                    raise ValueError(
                        f"Argument `fused=True` cannot be combined with `{name}`: the fused kernel "
                        f"has no such option; received fused=True, {name}={value!r}. "
                        "Use fused=None (the default) or fused=False."
                    )
        # Keras's layer refuses synchronized=True off TensorFlow; tfbn takes it everywhere.
        super().__init__(**{**base, "synchronized": False}, **kwargs)
        self.synchronized = base["synchronized"]
        arguments.check_floating_dtype(
            self.name, self.dtype_policy.variable_dtype, self.dtype_policy.compute_dtype
        )
        self.renorm_clipping = clipping
        self.fused = fused
        self.virtual_batch_size = virtual_batch_size
        self.adjustment = adjustment
        # Keras creates these three only with renorm; `_update_moving_statistics` reads them.
        self.moving_stddev = None
        self.renorm_mean = None
        self.renorm_stddev = None
        self._channel_axis = None

    # ----------------------------------------------------------------------------- state
    def build(self, input_shape):
        """Keras's build (the same variables, in the same order), after tfbn's checks."""
        input_shape = tuple(input_shape)
        rank = len(input_shape)
        axis = core.canonical_axis(self.axis, rank)
        if input_shape[axis] is None:
            raise ValueError(
                f"The channel axis {self.axis} of the input to layer '{self.name}' must have a "
                f"known size when the layer is built; received input_shape={input_shape}."
            )
        if self.fused and core.fused_format(rank, axis) is None:
            raise ValueError(
                f"Argument `fused=True` needs a rank-4 or rank-5 input with the channel axis 1 or "
                f"last; layer '{self.name}' received input_shape={input_shape} with "
                f"axis={self.axis}."
            )
        # The channel axis as a non-negative int, settled here once for every call.
        self._channel_axis = axis
        self._rank = rank
        super().build(input_shape)
        # `_check_input` reports a wrong rank or channel count in tfbn's words.
        self.input_spec = None

    @property
    def channels(self) -> int | None:
        """Number of channels (known once built)."""
        return None if self.moving_mean is None else int(self.moving_mean.shape[0])

    def compute_output_shape(self, input_shape):
        core.canonical_axis(self.axis, len(input_shape))
        return input_shape

    # ----------------------------------------------------------------------------- compute
    def _check_input(self, inputs, mask) -> None:
        shape = tuple(inputs.shape)
        rank = len(shape)
        if mask is not None and len(mask.shape) != rank - 1:
            raise ValueError(
                f"Layer '{self.name}' takes a mask of rank {rank - 1} (the input's axes but "
                f"the last); received mask.shape={tuple(mask.shape)} for an input of shape "
                f"{shape}."
            )
        if rank != self._rank:
            raise ValueError(
                f"Layer '{self.name}' was built for inputs of rank {self._rank}; received an "
                f"input of shape {shape}."
            )
        channels = shape[self._channel_axis]
        if channels is not None and channels != self.channels:
            raise ValueError(
                f"Layer '{self.name}' was built for {self.channels} channels on axis {self.axis}; "
                f"received an input of shape {shape} with {channels} channels."
            )
        dtype = keras.backend.standardize_dtype(inputs.dtype)
        if not keras.backend.is_float_dtype(dtype):
            raise ValueError(
                f"Layer '{self.name}' needs a floating-point input; received dtype={dtype}. "
                "Cast the input, e.g. to float32."
            )

    def call(self, inputs, training=None, mask=None):
        inputs = ops.convert_to_tensor(inputs)
        self._check_input(inputs, mask)
        compute = engine()
        stat_dtype = core.statistics_dtype(inputs.dtype)
        gamma = None if self.gamma is None else ops.cast(self.gamma, stat_dtype)
        beta = None if self.beta is None else ops.cast(self.beta, stat_dtype)
        axis = self._channel_axis

        if not (training and self.trainable):
            # float16/bfloat16 inputs are normalized in float32: their squares overflow float16.
            x = ops.cast(inputs, stat_dtype)
            mean = ops.cast(self.moving_mean, stat_dtype)
            variance = ops.cast(self.moving_variance, stat_dtype)
            outputs = compute.normalize(
                x, mean, variance, axis, offset=beta, scale=gamma, epsilon=self.epsilon
            )
            return ops.cast(outputs, self.compute_dtype)

        if self._rank == 2 and inputs.shape[0] == 1:
            raise ValueError(
                f"Layer '{self.name}' cannot train on a batch of size 1 with rank-2 input: every "
                "normalized value would be 0. Use a batch of 2 or more, or call with "
                "training=False."
            )
        # Called once per step (it may draw random numbers).
        adjustment = None if self.adjustment is None else self.adjustment(compute.shape(inputs))
        outputs, stats = compute.training(
            inputs,
            axis,
            gamma=gamma,
            beta=beta,
            epsilon=self.epsilon,
            fused=self.fused,
            mask=mask,
            synchronized=self.synchronized,
            virtual_batch_size=self.virtual_batch_size,
            renorm_mean=self.renorm_mean if self.renorm else None,
            renorm_stddev=self.renorm_stddev if self.renorm else None,
            renorm_clipping=self.renorm_clipping,
            adjustment=adjustment,
        )
        self._update_moving_statistics(compute, stats)
        return ops.cast(outputs, self.compute_dtype)

    def _update_moving_statistics(self, compute, stats: core.Moments) -> None:
        # On TensorFlow, unsynchronized statistics are averaged over replicas first, so that every
        # copy of the moving variables receives the same update (tfbn.ops.nn).
        names = ["moving_mean", "moving_variance"]
        if self.renorm:
            names += ["moving_stddev", "renorm_mean", "renorm_stddev"]
        variables = {name: getattr(self, name) for name in names}
        new = compute.update(
            stats,
            variables,
            momentum=self.momentum,
            epsilon=self.epsilon,
            synchronized=self.synchronized,
            renorm_momentum=self.renorm_momentum,
        )
        for name, value in new.items():
            variables[name].assign(value)

    # ----------------------------------------------------------------------------- config
    def get_config(self):
        """Keras's config, plus `fused` and `virtual_batch_size` (`adjustment` is a callable)."""
        config = super().get_config()
        # As Keras's: `{}` with renorm and no clipping, `None` without either.
        if not (self.renorm or self.renorm_clipping):
            config["renorm_clipping"] = None
        config["fused"] = self.fused
        config["virtual_batch_size"] = self.virtual_batch_size
        if self.adjustment is not None:
            warnings.warn(
                f"Layer '{self.name}': its `adjustment` callable cannot be serialized and is left "
                "out of the config; a layer rebuilt from it has no adjustment.",
                stacklevel=2,
            )
        return config


_WARNED: set[str] = set()


def _warn_per_process_statistics() -> None:
    """Warns, once per process, that `synchronized=True` is per-process on PyTorch."""
    if "torch" in _WARNED:
        return
    _WARNED.add("torch")
    warnings.warn(
        "tfbn.BatchNorm(synchronized=True) on the PyTorch backend normalizes with the "
        "statistics of each process's own batch: tfbn does not reduce them across "
        "torch.distributed processes.",
        stacklevel=3,
    )

"""Population statistics: recompute every batch-norm layer's moving statistics over a dataset.

During training a batch-norm layer tracks its inference statistics with an exponential moving
average of batch statistics taken while the weights were still changing. Once training is over,
the weights are fixed, and one pass over the training data gives the statistics the network will
actually see: the chapter's "population statistics". `recalibrate` computes them exactly:

- layer by layer, in network order, so that layer k is measured on the activations the network
  produces once layers 0..k-1 already use their new statistics;
- with the rest of the network in inference mode;
- as the mean and biased variance over all examples and all non-channel positions, merged batch by
  batch in float64 (Chan et al.'s pairwise update), never as `E[x^2] - E[x]^2` in float32;
- under a `tf.distribute` strategy, per-replica sums are all-reduced at every batch, and the result
  is assigned to every replica's copy of the variables.

It works for `tfbn.BatchNorm` and `keras.layers.BatchNormalization` alike, in Sequential and
functional models.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from tfbn import ops
from tfbn.files import save_model_atomically
from tfbn.layers import BatchNorm

__all__ = ["batch_norm_layers", "recalibrate", "recalibrate_file"]

_BN_TYPES = (BatchNorm, keras.layers.BatchNormalization)


def batch_norm_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The batch-norm layers of a model, in network order.

    Args:
        model: A Sequential or functional Keras model.

    Returns:
        The `tfbn.BatchNorm` and `keras.layers.BatchNormalization` layers that are direct layers
        of `model`, in the order the model applies them.

    Raises:
        ValueError: if a batch-norm layer sits inside a nested model or layer, where its input
            cannot be reached from the model's inputs.
    """
    direct = [layer for layer in model.layers if isinstance(layer, _BN_TYPES)]
    every = [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, _BN_TYPES)
    ]
    nested = [layer.name for layer in every if not any(layer is d for d in direct)]
    if nested:
        raise ValueError(
            f"Batch-norm layers {nested} are inside a nested model or layer of '{model.name}'; "
            "recalibrate needs them as direct layers of a Sequential or functional model. "
            "Flatten the model, or recalibrate the nested model on its own inputs."
        )
    return direct


def _input_extractor(model: keras.Model, layer: keras.layers.Layer) -> keras.Model:
    """A model from `model`'s inputs to `layer`'s input (sharing `model`'s weights)."""
    try:
        # A Sequential has one input; a functional model keeps its inputs' structure (dicts).
        inputs = model.inputs[0] if isinstance(model, keras.Sequential) else model.input
    except (AttributeError, ValueError, TypeError, IndexError) as error:
        raise ValueError(
            f"Model '{model.name}' has no defined inputs ({error}); build it on a `keras.Input` "
            "(or call it once) before recalibrating."
        ) from None
    try:
        target = layer.input
    except (AttributeError, ValueError) as error:
        raise ValueError(
            f"Layer '{layer.name}' is applied more than once or is not connected in model "
            f"'{model.name}' ({error}); each batch-norm layer must be applied exactly once."
        ) from None
    return keras.Model(inputs, target, name=f"{layer.name}_input")


def _features(batch):
    """The model input of a batch that is `x`, `(x,)`, `(x, y)` or `(x, y, sample_weight)`."""
    if isinstance(batch, (tuple, list)):
        x, _, _ = keras.utils.unpack_x_y_sample_weight(tuple(batch))
        return x
    return batch


def _replica_moments(activations: tf.Tensor, axis: int):
    """Count, mean and sum of squared deviations of one batch, over all replicas (float64).

    Two all-reduces: the sums and counts first, then the squared deviations from the global mean,
    so the result is the same as on one device holding the whole global batch.
    """
    x = tf.cast(activations, tf.float64)
    rank = x.shape.rank
    axes = [i for i in range(rank) if i != axis]
    count = tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), axes)), tf.float64)
    total = tf.reduce_sum(x, axes)
    ctx = tf.distribute.get_replica_context()
    packed = ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.concat([total, count[None]], 0))
    total, count = packed[:-1], packed[-1]
    mean = tf.math.divide_no_nan(total, count)
    shape = [1] * rank
    shape[axis] = -1
    m2 = tf.reduce_sum(tf.square(x - tf.reshape(mean, shape)), axes)
    m2 = ctx.all_reduce(tf.distribute.ReduceOp.SUM, m2)
    return count, mean, m2


class _Accumulator:
    """Running count, mean and sum of squared deviations, merged batch by batch in float64."""

    def __init__(self, channels: int):
        self.count = 0.0
        self.mean = np.zeros(channels, np.float64)
        self.m2 = np.zeros(channels, np.float64)

    def add(self, count: float, mean: np.ndarray, m2: np.ndarray) -> None:
        if count <= 0:
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + np.square(delta) * (self.count * count / total)
        self.count = total

    @property
    def variance(self) -> np.ndarray:
        return self.m2 / self.count


def _batches(dataset, steps: int | None, strategy: tf.distribute.Strategy):
    """An iterable of (possibly distributed) batches, and its length if known."""
    default = not tf.distribute.has_strategy() and strategy is tf.distribute.get_strategy()
    if isinstance(dataset, tf.data.Dataset):
        if steps is not None:
            dataset = dataset.take(steps)
        length = int(dataset.cardinality())
        length = length if length >= 0 else None
        if default:
            return dataset, length
        return strategy.experimental_distribute_dataset(dataset), length
    if not default:
        raise ValueError(
            "Argument `dataset` must be a `tf.data.Dataset` when a tf.distribute strategy is "
            f"used; received an object of type {type(dataset).__name__}."
        )
    length = None
    if steps is not None:
        dataset = itertools.islice(dataset, steps)
        length = steps
    elif hasattr(dataset, "__len__"):
        length = len(dataset)
    return dataset, length


def _progress(total: int | None, description: str, enabled: bool):
    # Keras's own progress bar: the core install needs nothing beyond TensorFlow and Keras.
    if enabled:
        print(description)
    bar = keras.utils.Progbar(total, verbose=int(enabled), unit_name="batch")
    return contextlib.nullcontext(bar)


def recalibrate(
    model: keras.Model,
    dataset,
    *,
    steps: int | None = None,
    strategy: tf.distribute.Strategy | None = None,
    verbose: int = 1,
) -> dict[str, dict[str, np.ndarray | float]]:
    """Sets every batch-norm layer's moving statistics to the population statistics of `dataset`.

    For each batch-norm layer, in network order, the layer's input is computed for every example
    of `dataset` (the network in inference mode, earlier batch-norm layers already recalibrated),
    and `moving_mean` / `moving_variance` are set to the exact mean and biased variance of that
    input over all examples and all positions but the channel axis (`axis` of the layer).
    Statistics are accumulated in float64.

    Args:
        model: A Sequential or functional model with `tfbn.BatchNorm` and/or
            `keras.layers.BatchNormalization` layers, built on its inputs.
        dataset: Batches of `x`, `(x, y)` or `(x, y, sample_weight)`: a `tf.data.Dataset`, or
            (without a distribution strategy) any iterable of batches. Labels are ignored. It is
            read once per batch-norm layer, so it must be re-iterable and give the same examples
            each time (shuffling only changes the order, which does not matter).
        steps: Number of batches to use per pass; `None` means the whole dataset.
        strategy: The `tf.distribute` strategy whose replicas hold the model's variables;
            `None` means the current strategy (`tf.distribute.get_strategy()`). Under several
            replicas, per-replica sums are all-reduced at every batch and every replica's copy of
            the variables receives the same statistics.
        verbose: 1 (default) shows a progress bar per layer; 0 shows nothing.

    Returns:
        Per layer name, a dict with `count` (values per channel the statistics were taken over),
        `old_mean`, `old_variance`, `new_mean` and `new_variance` (float64 NumPy arrays).

    Raises:
        ValueError: if the model has no batch-norm layer, a batch-norm layer is nested or shared,
            `steps` is not a positive integer, or the dataset is empty.
    """
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"Argument `model` must be a keras.Model; received an object of type "
            f"{type(model).__name__}."
        )
    if steps is not None and (
        isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps <= 0
    ):
        raise ValueError(
            f"Argument `steps` must be a positive integer or None; received steps={steps!r}."
        )
    layers = batch_norm_layers(model)
    if not layers:
        raise ValueError(
            f"Model '{model.name}' has no batch-norm layer (tfbn.BatchNorm or "
            "keras.layers.BatchNormalization): there are no statistics to recalibrate."
        )
    extractors = [_input_extractor(model, layer) for layer in layers]
    strategy = strategy if strategy is not None else tf.distribute.get_strategy()

    report: dict[str, dict[str, np.ndarray | float]] = {}
    for index, (layer, extractor) in enumerate(zip(layers, extractors, strict=True)):
        rank = len(extractor.output.shape)
        axis = ops.canonical_axis(int(layer.axis), rank)

        @tf.function
        def step(x, extractor=extractor, axis=axis):
            def replica_fn(inputs):
                return _replica_moments(extractor(inputs, training=False), axis)

            results = strategy.run(replica_fn, args=(x,))
            # All replicas hold the same all-reduced values; the first local one is enough.
            return tf.nest.map_structure(
                lambda value: strategy.experimental_local_results(value)[0], results
            )

        accumulator = _Accumulator(int(layer.moving_mean.shape[0]))
        batches, length = _batches(dataset, steps, strategy)
        description = f"{layer.name} ({index + 1}/{len(layers)})"
        with _progress(length, description, verbose == 1) as bar:
            for batch in batches:
                count, mean, m2 = step(_features(batch))
                accumulator.add(float(count), mean.numpy(), m2.numpy())
                bar.add(1)
        if accumulator.count == 0:
            raise ValueError(
                "Argument `dataset` gave no examples: the statistics cannot be computed."
            )

        old_mean = np.asarray(layer.moving_mean.numpy(), np.float64)
        old_variance = np.asarray(layer.moving_variance.numpy(), np.float64)
        new_mean, new_variance = accumulator.mean, accumulator.variance
        # In cross-replica context, assigning a distributed variable writes every replica's copy.
        layer.moving_mean.assign(new_mean.astype(layer.moving_mean.dtype))
        layer.moving_variance.assign(new_variance.astype(layer.moving_variance.dtype))
        if getattr(layer, "renorm", False) and hasattr(layer, "moving_stddev"):
            # With batch renormalization the next training step rebuilds the moving variance
            # from moving_stddev (variance = stddev^2 - epsilon): keep the two consistent.
            stddev = np.sqrt(new_variance + layer.epsilon)
            layer.moving_stddev.assign(stddev.astype(layer.moving_stddev.dtype))
        report[layer.name] = {
            "count": accumulator.count,
            "old_mean": old_mean,
            "old_variance": old_variance,
            "new_mean": new_mean,
            "new_variance": new_variance,
        }
    return report


# ------------------------------------------------------------------------------ a saved model
def _default_output(model_path: Path) -> Path:
    return model_path.with_name(f"{model_path.stem}.recalibrated.keras")


def _accuracy(model: keras.Model, dataset: tf.data.Dataset) -> float:
    @tf.function
    def correct(x, y):
        predictions = tf.argmax(model(x, training=False), axis=-1, output_type=tf.int32)
        return tf.reduce_sum(tf.cast(predictions == tf.cast(y, tf.int32), tf.int64))

    right = total = 0
    for x, y in dataset:
        right += int(correct(x, y))
        total += int(y.shape[0])
    return right / total


def recalibrate_file(
    model_path: str | Path,
    output: str | Path | None = None,
    *,
    data_dir: str | Path | None = None,
    tfds_dir: str | Path | None = None,
    batch_size: int = 512,
    steps: int | None = None,
    strategy: str = "auto",
    verbose: int = 1,
) -> Path:
    """Recalibrates a saved `.keras` model on Fashion-MNIST's training split and saves it.

    Prints the test accuracy before and after and, per batch-norm layer, how much its statistics
    moved; the recalibrated model is saved atomically (`tfbn recalibrate`).

    Args:
        model_path: The trained model, a `.keras` file.
        output: Where to save the recalibrated model (`.keras`); default: `model_path` with
            `.recalibrated` before the extension.
        data_dir: Folder with the four Fashion-MNIST IDX files (see `tfbn.load_fashion_mnist`).
        tfds_dir: TFDS data directory (default: TFDS's default).
        batch_size: Batch size of the statistics passes.
        steps: Batches per pass; `None` means the whole training split.
        strategy: tf.distribute strategy name (see `tfbn.distribute`).
        verbose: 0 prints nothing, 1 (default) also shows progress bars, 2 only the lines.

    Returns:
        The path of the saved model.
    """
    from tfbn import data
    from tfbn.distribute import get_strategy, resolve_strategy_name

    model_path = Path(model_path)
    if model_path.suffix != ".keras":
        raise ValueError(f"MODEL must be a .keras file; received '{model_path}'.")
    if not model_path.is_file():
        raise ValueError(f"MODEL '{model_path}' does not exist.")
    output = Path(output) if output else _default_output(model_path)
    if output.suffix != ".keras":
        raise ValueError(f"--output must end in '.keras'; received '{output}'.")
    if batch_size <= 0:
        raise ValueError(f"--batch-size must be a positive integer; received {batch_size}.")
    if steps is not None and steps <= 0:
        raise ValueError(f"--steps must be a positive integer; received {steps}.")
    resolve_strategy_name(strategy)
    if not data.is_prepared(tfds_dir):
        data.check_data_dir(data_dir)

    fashion = data.load_fashion_mnist(
        batch_size, data_dir=data_dir, tfds_dir=tfds_dir, shuffle=False
    )
    distribution = get_strategy(strategy)
    with distribution.scope():
        model = keras.saving.load_model(model_path, compile=False)
    before = _accuracy(model, fashion.test)
    report = recalibrate(
        model, fashion.train, steps=steps, strategy=distribution, verbose=int(verbose == 1)
    )
    after = _accuracy(model, fashion.test)

    log = print if verbose else (lambda *args: None)
    log(f"Recalibrated {len(report)} batch-norm layers on {fashion.num_train} training images:")
    for name, stats in report.items():
        shift = np.abs(stats["new_mean"] - stats["old_mean"]) / np.sqrt(
            stats["new_variance"] + 1e-12
        )
        ratio = stats["new_variance"] / np.maximum(stats["old_variance"], 1e-12)
        log(
            f"  {name:<24} mean shift {shift.mean():.3f} std (max {shift.max():.3f}), "
            f"variance ratio {ratio.mean():.3f} (range {ratio.min():.3f}-{ratio.max():.3f})"
        )
    log(f"Test accuracy: {before:.4f} before, {after:.4f} after ({after - before:+.4f}).")
    save_model_atomically(model, output)
    log(f"Saved {output}")
    sys.stdout.flush()
    return output

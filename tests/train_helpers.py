"""Small synthetic Fashion-MNIST stand-ins for the training tests, and a subprocess entry point.

`python tests/train_helpers.py train RUN_DIR [--epochs N] [--pause-marker FILE]` trains LeNet on
the synthetic data with `tfbn.train` and writes the final weights to `RUN_DIR/final_weights.npz`.
With `--pause-marker`, the pipeline of epoch 2 stops in its middle the first time (it creates the
marker file and sleeps), so that a test can kill the process mid-epoch at a known point.

`python tests/train_helpers.py cli [--pause-marker FILE] [--slow S] -- ARGS...` runs the command
line `tfbn ARGS...` (its parser, errors, exit codes and signal handling) with Fashion-MNIST
replaced by the synthetic data of `synthetic_data()`. With `--slow S` (and `--loop fit`), epoch 2
does not stop but takes S seconds per batch from its middle on, in Keras's per-batch callback
(the marker made at the first of them): the main thread, which handles signals, stays in Python.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
import time

if __name__ == "__main__" and sys.argv[1:2] == ["cli"]:
    # As the command line itself does: TensorFlow imported without its C++ log lines.
    from tfbn.cli import import_tensorflow

    import_tensorflow(verbose=0)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


@dataclasses.dataclass
class SyntheticData:
    """A `tfbn.workflow.training.TrainData`: 28x28x1 images whose mean pattern depends on the
    label."""

    images: np.ndarray
    labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    batch_size: int
    seed: int = 0
    pause_marker: str | None = None
    pause_epoch: int = 1
    pause_batch: int = 2
    validation_images: np.ndarray | None = None
    validation_labels: np.ndarray | None = None

    @property
    def num_train(self) -> int:
        return len(self.labels)

    @property
    def num_test(self) -> int:
        return len(self.test_labels)

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.num_train // self.batch_size)

    @property
    def examples_per_epoch(self) -> int:
        return self.num_train

    def order(self, epoch: int) -> np.ndarray:
        """The example order of an epoch: a function of (seed, epoch) only."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_train)

    def train_for_epoch(self, epoch: int) -> tf.data.Dataset:
        order = self.order(epoch)
        dataset = tf.data.Dataset.from_tensor_slices(
            (self.images[order], self.labels[order])
        ).batch(self.batch_size)
        if self.pause_marker is not None and epoch == self.pause_epoch:
            marker, at = self.pause_marker, self.pause_batch

            def pause(i, batch):
                x, y = batch

                def wait(index):
                    if int(index) == at and not os.path.exists(marker):
                        pathlib.Path(marker).write_text(str(os.getpid()))
                        time.sleep(120)
                    return index

                done = tf.py_function(wait, [i], tf.int64)
                with tf.control_dependencies([done]):
                    return tf.identity(x), tf.identity(y)

            dataset = dataset.enumerate().map(pause)
        return dataset

    @property
    def train_examples(self) -> tf.data.Dataset:
        return tf.data.Dataset.from_tensor_slices((self.images, self.labels)).batch(self.batch_size)

    @property
    def test(self) -> tf.data.Dataset:
        return tf.data.Dataset.from_tensor_slices((self.test_images, self.test_labels)).batch(
            self.batch_size
        )

    @property
    def train(self) -> tf.data.Dataset:
        """The training batches in a fixed order (the `train` split of a search's data)."""
        return self.train_examples

    @property
    def validation(self) -> tf.data.Dataset | None:
        """The validation batches, if the data were made with `num_validation`."""
        if self.validation_labels is None:
            return None
        return tf.data.Dataset.from_tensor_slices(
            (self.validation_images, self.validation_labels)
        ).batch(self.batch_size)


def synthetic_data(
    num_train: int = 485,
    num_test: int = 128,
    batch_size: int = 64,
    seed: int = 0,
    num_validation: int = 0,
    **kwargs,
) -> SyntheticData:
    """Learnable synthetic data; 485 examples at batch 64 leave an odd last batch of 37.

    With `num_validation`, a validation split too (drawn after the others, which stay the same).
    """
    rng = np.random.default_rng(1000 + seed)
    patterns = rng.uniform(0.0, 1.0, size=(10, 28, 28, 1)).astype(np.float32)

    def make(n):
        labels = rng.integers(0, 10, size=n).astype(np.int32)
        noise = rng.uniform(-0.4, 0.4, size=(n, 28, 28, 1)).astype(np.float32)
        images = np.clip(patterns[labels] + noise, 0.0, 1.0).astype(np.float32)
        return images, labels

    images, labels = make(num_train)
    test_images, test_labels = make(num_test)
    if num_validation:
        kwargs["validation_images"], kwargs["validation_labels"] = make(num_validation)
    return SyntheticData(
        images, labels, test_images, test_labels, batch_size=batch_size, seed=seed, **kwargs
    )


class NoTestSplit:
    """The `train` and `validation` splits of `data` alone: touching `test` fails the test."""

    def __init__(self, data):
        self.train, self.validation = data.train, data.validation

    @property
    def test(self):
        raise AssertionError("the tuner touched the test split")


def search_data(num_train: int = 256, num_validation: int = 128, batch_size: int = 64):
    """Synthetic training and validation splits for a learning-rate search, without a test split."""
    return NoTestSplit(
        synthetic_data(num_train, batch_size=batch_size, num_validation=num_validation)
    )


REFERENCE = dict(
    epochs=2, batch_size=64, seed=3, strategy="default", loop="fit", recalibrate=False, export=False
)
"""The settings of the runs that `main` and `reference_run` make (with `synthetic_data()`)."""


def reference_run(run_dir) -> tuple[list[np.ndarray], list[dict]]:
    """An uninterrupted run with the `REFERENCE` settings: its final weights and history."""
    import tfbn

    result = tfbn.train("tfbn", run_dir=run_dir, verbose=0, dataset=synthetic_data(), **REFERENCE)
    return [np.array(w) for w in result.model.get_weights()], result.history


def bn_moving_statistics(model) -> dict[str, list[np.ndarray]]:
    """Every replica's copy of every BatchNorm moving statistic, by variable path."""
    strategy = tf.distribute.get_strategy()
    found = {}
    for layer in model.layers:
        for name in ("moving_mean", "moving_variance"):
            variable = getattr(layer, name, None)
            if variable is None:
                continue
            value = getattr(variable, "value", variable)
            copies = strategy.experimental_local_results(value)
            if len(copies) == 1 and hasattr(value, "values"):
                copies = value.values
            found[f"{layer.name}/{name}"] = [np.array(c) for c in copies]
    return found


def _slow_epoch_2(marker: str, seconds: float, at: int = 2) -> None:
    """Makes `fit`'s epoch 2 take `seconds` per batch from batch `at` on (see the docstring)."""
    import keras

    progbar = keras.callbacks.ProgbarLogger
    begin, batch_end = progbar.on_epoch_begin, progbar.on_train_batch_end

    def on_epoch_begin(self, epoch, logs=None):
        self._slow_epoch = epoch
        return begin(self, epoch, logs)

    def on_train_batch_end(self, batch, logs=None):
        if getattr(self, "_slow_epoch", None) == 1 and batch >= at:
            pathlib.Path(marker).touch()
            time.sleep(seconds)
        return batch_end(self, batch, logs)

    progbar.on_epoch_begin, progbar.on_train_batch_end = on_epoch_begin, on_train_batch_end


def run_cli(argv: list[str]) -> int:
    """`tfbn ARGS...` on the synthetic data (see the module docstring)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--pause-marker", default=None)
    parser.add_argument("--slow", type=float, default=None)
    parser.add_argument("args", nargs=argparse.REMAINDER)
    options = parser.parse_args(argv)
    args = options.args[1:] if options.args[:1] == ["--"] else options.args

    import tfbn.workflow.data
    from tfbn import cli

    def load(batch_size, **kwargs):
        if options.slow is not None:
            return synthetic_data(batch_size=batch_size)
        return synthetic_data(batch_size=batch_size, pause_marker=options.pause_marker)

    if options.slow is not None:
        _slow_epoch_2(options.pause_marker, options.slow)

    tfbn.workflow.data.check_data_dir = lambda data_dir=None: pathlib.Path(".")
    tfbn.workflow.data.load_fashion_mnist = load
    return cli.main(args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["cli"]:
        return run_cli(argv[1:])
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["train"])
    parser.add_argument("run_dir")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--loop", default="fit")
    parser.add_argument("--norm", default="tfbn")
    parser.add_argument("--pause-marker", default=None)
    args = parser.parse_args(argv)

    import tfbn

    data = synthetic_data(pause_marker=args.pause_marker)
    result = tfbn.train(
        args.norm,
        epochs=args.epochs,
        batch_size=data.batch_size,
        seed=3,
        strategy="default",
        loop=args.loop,
        run_dir=args.run_dir,
        recalibrate=False,
        export=False,
        verbose=2,
        dataset=data,
    )
    np.savez(
        pathlib.Path(args.run_dir) / "final_weights.npz",
        *[np.asarray(w) for w in result.model.get_weights()],
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())

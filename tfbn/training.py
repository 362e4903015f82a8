"""Training LeNet on Fashion-MNIST: `tfbn.train(...)` and the `tfbn train` command.

One call runs the chapter's experiment end to end: build the model under a `tf.distribute`
strategy, train it with Keras's `fit` or a custom loop, evaluate on the test set every epoch,
recompute the BatchNorm population statistics, save everything in a run folder and export a
SavedModel.

A run folder is resumable: every finished epoch is saved atomically (weights with the BatchNorm
moving statistics, optimizer state, history, the data seed), and the same call with the same
`run_dir` continues after the last finished epoch, with the data order an uninterrupted run would
have used. Layout of a run folder:

    checkpoints/epoch-0003/   weights.npz, optimizer.npz, state.json (one folder per epoch)
    logs/                     TensorBoard event files
    history.json              per-epoch loss, train accuracy, test accuracy, speed
    history.png               the three curves per epoch
    model.keras               the trained model (after recalibration)
    result.json               final metrics, seed, strategy, wall time, examples/sec
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfbn import distribute
from tfbn.config import CLASS_NAMES, LOOPS, NORMS, RECIPE
from tfbn.files import atomic_write, fsync_dir, save_model_atomically

__all__ = ["LOOPS", "TrainResult", "train", "format_summary"]

_CHECKPOINTS = "checkpoints"
_KEEP_CHECKPOINTS = 2


@dataclasses.dataclass
class TrainResult:
    """What `train` returns.

    Attributes:
        model: The trained `keras.Model` (after recalibration when it ran).
        history: One dict per epoch: `epoch`, `loss`, `train_acc`, `test_acc`, `examples`,
            `seconds` (training time of the epoch), `examples_per_sec`.
        run_dir: The run folder.
        loss: Training loss of the last epoch (mean over its examples).
        train_acc: Training accuracy of the last epoch.
        test_acc: Test accuracy at the end (after recalibration when it ran).
        test_acc_before_recalibration: Test accuracy with the moving statistics, or `None`
            when recalibration did not run.
        examples_per_sec: Training examples per second of training time, over all epochs.
        wall_time: Seconds this call took, from start to end.
        device: Where the model was trained, e.g. `/GPU:0`.
        strategy: The strategy name (`default`, `one_device`, `mirrored`, `multi_worker`, or the
            class name of a strategy passed in).
        loop: `"fit"` or `"custom"`.
        seed: The seed of the run (drawn at random and recorded when none was given).
        initial_epoch: Epochs already finished in `run_dir` when this call started.
        export_path: The SavedModel version folder, or `None` without export.
    """

    model: keras.Model
    history: list[dict[str, float]]
    run_dir: pathlib.Path
    loss: float
    train_acc: float
    test_acc: float
    test_acc_before_recalibration: float | None
    examples_per_sec: float
    wall_time: float
    device: str
    strategy: str
    loop: str
    seed: int
    initial_epoch: int = 0
    export_path: pathlib.Path | None = None

    def summary(self) -> str:
        """The chapter's one-line summary, e.g. `loss 0.266, train acc 0.901, test acc 0.874,
        34491.1 examples/sec on /GPU:0`."""
        return format_summary(
            self.loss, self.train_acc, self.test_acc, self.examples_per_sec, self.device
        )


def format_summary(
    loss: float, train_acc: float, test_acc: float, examples_per_sec: float, device: str
) -> str:
    """Formats the final line of a training run in the chapter's format.

    Args:
        loss: Training loss of the last epoch.
        train_acc: Training accuracy of the last epoch.
        test_acc: Test accuracy.
        examples_per_sec: Training throughput.
        device: Device description, e.g. `/GPU:0`.

    Returns:
        `"loss 0.266, train acc 0.901, test acc 0.874, 34491.1 examples/sec on /GPU:0"`.
    """
    return (
        f"loss {loss:.3f}, train acc {train_acc:.3f}, test acc {test_acc:.3f}, "
        f"{examples_per_sec:.1f} examples/sec on {device}"
    )


# ------------------------------------------------------------------------------------ checks
def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(
            f"Argument `{name}` must be a positive integer; received {name}={value!r}."
        )
    return int(value)


def _check_writable(name: str, path: pathlib.Path) -> None:
    """Creates `path` if needed and proves a file can be written there (cheap, before training)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ValueError(
            f"Argument `{name}` must be a writable folder; received {name}='{path}' ({error})."
        ) from None


def _check_data_dir(data_dir) -> None:
    from tfbn import data as data_module

    try:
        data_module.check_data_dir(data_dir)
    except ValueError:
        raise
    except getattr(data_module, "DataError", ValueError) as error:
        raise ValueError(f"Argument `data_dir`: {error}") from None


def _strategy_name(strategy) -> str:
    if isinstance(strategy, tf.distribute.Strategy):
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return "multi_worker"
        if isinstance(strategy, tf.distribute.MirroredStrategy):
            return "mirrored"
        if isinstance(strategy, tf.distribute.OneDeviceStrategy):
            return "one_device"
        if strategy is tf.distribute.get_strategy():
            return "default"
        return type(strategy).__name__
    return distribute.resolve_strategy_name(strategy)


# ------------------------------------------------------------------------------- atomic files
class _RunProgbar(keras.callbacks.ProgbarLogger):
    """Keras's progress bar, headed with the epoch of the whole run (`fit` sees one epoch)."""

    def __init__(self, epochs: int):
        super().__init__()
        self._run_epochs = epochs

    def set_params(self, params):
        super().set_params(params)
        self.epochs = self._run_epochs


def _write_json(path: pathlib.Path, data: Any) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def _save_npz(file, arrays: list[np.ndarray]) -> None:
    np.savez(file, **{f"a{i:04d}": a for i, a in enumerate(arrays)})


def _load_npz(path: pathlib.Path) -> list[np.ndarray]:
    with np.load(path) as data:
        return [data[f"a{i:04d}"] for i in range(len(data.files))]


def _plot_history(history: list[dict[str, float]], path: pathlib.Path, title: str) -> None:
    # A Figure without pyplot: no global backend switch (a notebook keeps showing its plots).
    from matplotlib.figure import Figure

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(4.5, 3.2), dpi=120)
    ax = fig.subplots()
    ax.plot(epochs, [h["loss"] for h in history], "-", label="train loss")
    ax.plot(epochs, [h["train_acc"] for h in history], "m--", label="train acc")
    ax.plot(epochs, [h["test_acc"] for h in history], "g-.", label="test acc")
    ax.set_xlabel("epoch")
    ax.set_xlim(1, max(epochs[-1], 2))
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()

    def write(file):
        fig.savefig(file, format="png")

    atomic_write(path, write)


# -------------------------------------------------------------------------------- checkpoints
class _Checkpoints:
    """One folder per finished epoch, made visible by a single rename (nothing half-written)."""

    def __init__(self, run_dir: pathlib.Path, write: bool):
        self.root = run_dir / _CHECKPOINTS
        self.write = write
        if write:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)

    def finished(self) -> list[tuple[int, pathlib.Path]]:
        found = []
        if self.root.is_dir():
            for path in self.root.glob("epoch-*"):
                try:
                    epoch = int(path.name.split("-", 1)[1])
                except ValueError:
                    continue
                if (path / "state.json").is_file():
                    found.append((epoch, path))
        return sorted(found)

    def latest_state(self) -> tuple[pathlib.Path, dict] | None:
        finished = self.finished()
        if not finished:
            return None
        path = finished[-1][1]
        return path, json.loads((path / "state.json").read_text())

    def save(self, epoch: int, model, optimizer, state: dict) -> None:
        if not self.write:
            return
        final = self.root / f"epoch-{epoch:04d}"
        tmp = pathlib.Path(tempfile.mkdtemp(dir=self.root, prefix=f".tmp-epoch-{epoch:04d}-"))
        weights = model.get_weights()
        opt_vars = [np.asarray(v.numpy()) for v in optimizer.variables]
        atomic_write(tmp / "weights.npz", lambda f: _save_npz(f, weights))
        atomic_write(tmp / "optimizer.npz", lambda f: _save_npz(f, opt_vars))
        # state.json last: a folder without it is never read back.
        _write_json(tmp / "state.json", state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(self.root)
        for _, old in self.finished()[:-_KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def restore(path: pathlib.Path, model, optimizer) -> None:
        model.set_weights(_load_npz(path / "weights.npz"))
        values = _load_npz(path / "optimizer.npz")
        if len(values) != len(optimizer.variables):
            raise ValueError(
                f"The checkpoint '{path}' holds {len(values)} optimizer variables; the optimizer "
                f"has {len(optimizer.variables)}."
            )
        for variable, value in zip(optimizer.variables, values, strict=True):
            variable.assign(value)


# ---------------------------------------------------------------------------------- the loops
def _steps(dataset) -> int | None:
    try:
        n = int(dataset.cardinality())
    except (AttributeError, TypeError):
        return None
    return n if n >= 0 else None


class _FitLoop:
    """Keras `Model.fit`, one call per epoch so each epoch can get its own data order."""

    name = "fit"

    def __init__(self, model, optimizer, strategy, jit_compile: bool):
        self.model = model
        self._examples = None

    def train_epoch(self, dataset, epoch: int, epochs: int, progress: bool, num_train=None):
        start = time.perf_counter()
        history = self.model.fit(
            dataset,
            initial_epoch=epoch,
            epochs=epoch + 1,
            steps_per_epoch=_steps(dataset),
            shuffle=False,
            verbose=1 if progress else 0,
            callbacks=[_RunProgbar(epochs)],
        )
        seconds = time.perf_counter() - start
        # Keras reports the epoch's mean over examples; the count is only needed for the speed.
        if num_train is None and self._examples is None:
            self._examples = int(
                dataset.map(lambda x, y: tf.shape(y)[0]).reduce(0, lambda a, b: a + b)
            )
        examples = int(num_train) if num_train is not None else self._examples
        return history.history["loss"][-1], history.history["accuracy"][-1], examples, seconds

    def evaluate(self, dataset) -> float:
        return float(self.model.evaluate(dataset, verbose=0, return_dict=True)["accuracy"])


class _CustomLoop:
    """A `tf.distribute` custom loop: `strategy.run` per step, loss scaled by the global batch."""

    name = "custom"

    def __init__(self, model, optimizer, strategy, jit_compile: bool):
        self.model = model
        self.optimizer = optimizer
        self.strategy = strategy
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
        sum_ = tf.distribute.ReduceOp.SUM

        def replica_train_step(x, y):
            context = tf.distribute.get_replica_context()
            y = tf.cast(y, tf.int32)
            local_count = tf.cast(tf.shape(y)[0], tf.float32)
            # Dividing by the global batch (not the replica's) makes the summed gradients equal
            # those of the mean loss on one device, for uneven last batches too.
            global_count = context.all_reduce(sum_, local_count)
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                per_example = loss_fn(y, logits)
                loss = tf.reduce_sum(per_example) / global_count
                if model.losses:
                    loss += tf.add_n(model.losses) / context.num_replicas_in_sync
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
            correct = tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), y)
            return (
                tf.reduce_sum(per_example),
                tf.reduce_sum(tf.cast(correct, tf.float32)),
                local_count,
            )

        def replica_eval_step(x, y):
            y = tf.cast(y, tf.int32)
            logits = model(x, training=False)
            correct = tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), y)
            return tf.reduce_sum(tf.cast(correct, tf.float32)), tf.cast(tf.shape(y)[0], tf.float32)

        if jit_compile:
            replica_train_step = tf.function(replica_train_step, jit_compile=True)
            replica_eval_step = tf.function(replica_eval_step, jit_compile=True)

        def reduce(values):
            return tuple(strategy.reduce(sum_, v, axis=None) for v in values)

        @tf.function(reduce_retracing=True)
        def train_step(x, y):
            return reduce(strategy.run(replica_train_step, args=(x, y)))

        @tf.function(reduce_retracing=True)
        def eval_step(x, y):
            return reduce(strategy.run(replica_eval_step, args=(x, y)))

        self._train_step = train_step
        self._eval_step = eval_step

    def _distribute(self, dataset):
        options = tf.data.Options()
        # In-memory data: shard by element, never by file.
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA
        )
        return self.strategy.experimental_distribute_dataset(dataset.with_options(options))

    def train_epoch(self, dataset, epoch: int, epochs: int, progress: bool, num_train=None):
        steps = _steps(dataset)
        bar = None
        if progress:
            print(f"Epoch {epoch + 1}/{epochs}")
            bar = keras.utils.Progbar(steps, stateful_metrics=["loss", "accuracy"])
        loss_sum = correct = count = 0.0
        start = time.perf_counter()
        for step, (x, y) in enumerate(self._distribute(dataset)):
            step_loss, step_correct, step_count = self._train_step(x, y)
            loss_sum += float(step_loss)
            correct += float(step_correct)
            count += float(step_count)
            if bar is not None:
                bar.update(step + 1, [("loss", loss_sum / count), ("accuracy", correct / count)])
        seconds = time.perf_counter() - start
        if bar is not None and steps is None:
            bar.update(step + 1, finalize=True)
        return loss_sum / count, correct / count, int(count), seconds

    def evaluate(self, dataset) -> float:
        correct = count = 0.0
        for x, y in self._distribute(dataset):
            step_correct, step_count = self._eval_step(x, y)
            correct += float(step_correct)
            count += float(step_count)
        return correct / count


# ------------------------------------------------------------------------------------- train
def _silent(*args, **kwargs) -> None:
    pass


def _default_run_dir(norm: str) -> pathlib.Path:
    # A fixed name, so that the same command after a crash finds and resumes the run.
    return pathlib.Path("runs") / f"lenet_{norm}"


def _epoch_dataset(data, epoch: int):
    per_epoch = getattr(data, "train_for_epoch", None)
    dataset = per_epoch(epoch) if per_epoch is not None else data.train
    steps = getattr(data, "steps_per_epoch", None)
    if steps is not None and int(dataset.cardinality()) < 0:
        # A known length gives Keras a bounded progress bar and an epoch that ends on time.
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(int(steps)))
    return dataset


def train(
    norm: str = "tfbn",
    *,
    epochs: int = RECIPE.epochs,
    batch_size: int = RECIPE.batch_size,
    learning_rate: float | None = None,
    seed: int | None = None,
    strategy: str | tf.distribute.Strategy = "auto",
    loop: str = "auto",
    run_dir: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    train_fraction: float = 1.0,
    recalibrate: bool = True,
    export: bool = True,
    export_dir: str | os.PathLike = "saved_models",
    export_name: str = "lenet",
    jit_compile: bool = False,
    verbose: int = 1,
    dataset=None,
    model_fn: Callable[[], keras.Model] | None = None,
    drop_remainder: bool = RECIPE.drop_remainder,
) -> TrainResult:
    """Trains the chapter's LeNet on Fashion-MNIST, resumably, and saves the run.

    The model is `tfbn.models.lenet(norm)` built inside the strategy's scope, trained with SGD on
    the sparse categorical cross-entropy of its logits. Each epoch prints the training loss, the
    training accuracy and the test accuracy; the last line is the chapter's summary
    (`loss 0.266, train acc 0.901, test acc 0.874, 34491.1 examples/sec on /GPU:0`).

    Calling `train` again with the same `run_dir` continues a run that was interrupted (even by
    `kill -9`) after its last finished epoch, with the weights, BatchNorm moving statistics,
    optimizer state, history and data order it had; `epochs` may be raised to train further.

    Args:
        norm: `"tfbn"` (`tfbn.BatchNorm`), `"keras"` (`keras.layers.BatchNormalization`) or
            `"none"` (plain LeNet).
        epochs: Total number of epochs of the run (finished epochs in `run_dir` count).
        batch_size: Global batch size, split across the replicas.
        learning_rate: SGD learning rate; default `RECIPE.lr_for(norm)` (1.0 with BatchNorm,
            0.9 without).
        seed: Seed for the weights and the data order. `None` draws one and records it in the
            run folder (so that a resumed run keeps it).
        strategy: `"auto"`, `"default"`, `"one_device"`, `"mirrored"`, `"multi_worker"` (see
            `tfbn.distribute.get_strategy`) or a `tf.distribute.Strategy` instance.
        loop: `"fit"` (Keras `Model.fit`), `"custom"` (a `strategy.run` loop) or `"auto"`
            (`"custom"` under `MultiWorkerMirroredStrategy`, where Keras 3's `fit` fails,
            `"fit"` otherwise). Both give the same results.
        run_dir: The run folder (created). Default `runs/lenet_<norm>`.
        data_dir: Folder with the four Fashion-MNIST IDX files (see `tfbn.load_fashion_mnist`).
        train_fraction: Fraction of the training set to use, in `(0, 1]`.
        recalibrate: If `True`, recompute the BatchNorm population statistics on the training
            set after training (`tfbn.recalibrate`) and report the test accuracy before and after.
        export: If `True`, export an inference SavedModel with `tfbn.export_saved_model`.
        export_dir: Parent folder of the exported SavedModel.
        export_name: Model name of the export (`<export_dir>/<export_name>/<version>`).
        jit_compile: If `True`, compile the training step with XLA.
        verbose: 0 prints nothing; 1 (default) a progress bar per epoch, a line per epoch and
            the summary; 2 the same without progress bars (for logs).
        dataset: Optional prebuilt data with `train`, `test` (batched `tf.data` datasets of
            `(images, labels)`) and optionally `train_for_epoch(epoch)`; replaces loading
            Fashion-MNIST (`data_dir`, `train_fraction` are then unused).
        model_fn: Optional function building the model to train instead of
            `tfbn.models.lenet(norm)` (called inside the strategy's scope, so its variables are
            distributed); it must return an uncompiled `keras.Model` that outputs logits. `norm`
            then only names the run and picks the default learning rate.
        drop_remainder: If `True` (the recipe's default), every training epoch has full batches
            only: the short last batch of each epoch's permutation is left out, other examples
            every epoch (see `tfbn.config.Recipe`). Unused with `dataset`.

    Returns:
        A `TrainResult`.

    Raises:
        ValueError: for an unknown `norm`, `strategy` or `loop`; `epochs`, `batch_size` or
            `learning_rate` not positive; `train_fraction` outside `(0, 1]`; an output folder
            that cannot be written; a data folder without the Fashion-MNIST files; a `run_dir`
            holding a run with other settings. All raised before any data is loaded.
    """
    wall_start = time.perf_counter()
    if verbose not in (0, 1, 2):
        raise ValueError(f"Argument `verbose` must be 0, 1 or 2; received verbose={verbose!r}.")
    progress = verbose == 1
    say = print if verbose else _silent
    # ---- arguments, before anything expensive
    if norm not in NORMS:
        raise ValueError(f"Argument `norm` must be one of {NORMS}; received norm={norm!r}.")
    epochs = _positive_int("epochs", epochs)
    batch_size = _positive_int("batch_size", batch_size)
    if learning_rate is None:
        learning_rate = RECIPE.lr_for(norm)
    if (
        isinstance(learning_rate, bool)
        or not isinstance(learning_rate, (int, float, np.floating, np.integer))
        or not math.isfinite(learning_rate)
        or learning_rate <= 0
    ):
        raise ValueError(
            "Argument `learning_rate` must be a positive finite number; received "
            f"learning_rate={learning_rate!r}."
        )
    learning_rate = float(learning_rate)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise ValueError(f"Argument `seed` must be an integer or None; received seed={seed!r}.")
    if loop not in LOOPS:
        raise ValueError(f"Argument `loop` must be one of {LOOPS}; received loop={loop!r}.")
    if not isinstance(strategy, tf.distribute.Strategy) and strategy not in distribute.STRATEGIES:
        raise ValueError(
            f"Argument `strategy` must be one of {distribute.STRATEGIES} or a "
            f"tf.distribute.Strategy; received strategy={strategy!r}."
        )
    if isinstance(train_fraction, bool) or not (
        isinstance(train_fraction, (int, float)) and 0.0 < train_fraction <= 1.0
    ):
        raise ValueError(
            "Argument `train_fraction` must be in (0, 1]; received "
            f"train_fraction={train_fraction!r}."
        )
    strategy_name = _strategy_name(strategy)
    if loop == "auto":
        loop = "custom" if strategy_name == "multi_worker" else "fit"
    elif loop == "fit" and strategy_name == "multi_worker":
        # Keras 3's fit fails under MultiWorkerMirroredStrategy (keras-team/keras#20585).
        raise ValueError(
            "Argument `loop`: loop='fit' does not work with strategy='multi_worker' in Keras 3; "
            "use loop='custom' or 'auto'."
        )
    if dataset is None:
        _check_data_dir(data_dir)
    run_dir = pathlib.Path(run_dir) if run_dir is not None else _default_run_dir(norm)
    _check_writable("run_dir", run_dir)
    if export:
        _check_writable("export_dir", pathlib.Path(export_dir))

    # ---- the run's identity: new, or the one recorded in run_dir
    def identity(seed) -> dict:
        """The settings that define a run: resuming a folder with other values would mix two
        experiments."""
        own_data = dataset is None
        return {
            "norm": norm,
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "seed": seed,
            "train_fraction": float(train_fraction) if own_data else None,
            "drop_remainder": bool(drop_remainder) if own_data else None,
        }

    found = _Checkpoints(run_dir, write=False).latest_state()
    initial_epoch = 0
    if found is not None:
        recorded = found[1]["config"]
        if seed is None:
            seed = recorded["seed"]
        wanted = identity(seed)
        for key in wanted:
            if recorded.get(key) != wanted[key]:
                raise ValueError(
                    f"Argument `run_dir`: '{run_dir}' holds a run with {key}="
                    f"{recorded.get(key)!r}; received {key}={wanted[key]!r}. Use another "
                    "run_dir to start a new run, or the same settings to resume it."
                )
        initial_epoch = int(found[1]["epoch"])
        if initial_epoch > epochs:
            raise ValueError(
                f"Argument `epochs`: '{run_dir}' already holds {initial_epoch} finished epochs; "
                f"received epochs={epochs}. Use epochs >= {initial_epoch} or another run_dir."
            )
    if seed is None:
        seed = secrets.randbelow(2**31)
    seed = int(seed)
    config = identity(seed)

    # ---- strategy, data, model
    if isinstance(strategy, str):
        # First: MultiWorkerMirroredStrategy must exist before the runtime runs any op.
        strategy = distribute.get_strategy(strategy)
    if dataset is None:
        from tfbn.data import load_fashion_mnist

        dataset = load_fashion_mnist(
            batch_size,
            data_dir=data_dir,
            train_fraction=train_fraction,
            seed=seed,
            shuffle=True,
            drop_remainder=drop_remainder,
        )
    load_start = time.perf_counter()
    # The first batch of each split fills the in-memory caches: done here, so that the training
    # speed counts training, as the chapter's timer does.
    for split in (_epoch_dataset(dataset, initial_epoch), dataset.test):
        next(iter(split))
    say(f"data ready in {time.perf_counter() - load_start:.1f} s")
    device = distribute.device_description(strategy)
    chief = distribute.is_chief(strategy)
    checkpoints = _Checkpoints(run_dir, write=chief)
    if chief:
        # Temporary files of a process killed while writing: never read, safe to drop.
        for stale in [*run_dir.glob(".*.tmp"), *run_dir.glob(".model.*.keras")]:
            stale.unlink(missing_ok=True)

    keras.utils.set_random_seed(seed)
    with strategy.scope():
        from tfbn.models import lenet

        model = lenet(norm) if model_fn is None else model_fn()
        if not isinstance(model, keras.Model):
            raise ValueError(
                f"Argument `model_fn` must return a keras.Model; it returned {type(model)!r}."
            )
        optimizer = keras.optimizers.SGD(learning_rate=learning_rate)
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            jit_compile=jit_compile,
        )
        optimizer.build(model.trainable_variables)
    runner = (_FitLoop if loop == "fit" else _CustomLoop)(model, optimizer, strategy, jit_compile)

    history: list[dict[str, float]] = []
    if found is not None:
        with strategy.scope():
            _Checkpoints.restore(found[0], model, optimizer)
        history = list(found[1]["history"])
        say(f"Resuming {run_dir} after epoch {initial_epoch} of {epochs}.")

    writer = tf.summary.create_file_writer(str(run_dir / "logs")) if chief else None
    say(
        f"Training LeNet (norm={norm}) for {epochs} epochs, batch {batch_size}, "
        f"lr {learning_rate:g}, seed {seed}, {strategy_name} strategy on {device}, {loop} loop."
    )

    # ---- epochs
    for epoch in range(initial_epoch, epochs):
        loss, train_acc, examples, seconds = runner.train_epoch(
            _epoch_dataset(dataset, epoch),
            epoch,
            epochs,
            progress,
            num_train=getattr(dataset, "examples_per_epoch", getattr(dataset, "num_train", None)),
        )
        test_acc = runner.evaluate(dataset.test)
        record = {
            "epoch": epoch + 1,
            "loss": float(loss),
            "train_acc": float(train_acc),
            "test_acc": float(test_acc),
            "examples": int(examples),
            "seconds": float(seconds),
            "examples_per_sec": float(examples / seconds) if seconds > 0 else 0.0,
        }
        history.append(record)
        say(
            f"epoch {epoch + 1}/{epochs}: loss {loss:.3f}, train acc {train_acc:.3f}, "
            f"test acc {test_acc:.3f} ({record['examples_per_sec']:.1f} examples/sec)"
        )
        checkpoints.save(
            epoch + 1,
            model,
            optimizer,
            {"epoch": epoch + 1, "config": config, "history": history, "loop": loop},
        )
        if chief:
            _write_json(run_dir / "history.json", history)
            with writer.as_default(step=epoch + 1):
                tf.summary.scalar("train/loss", record["loss"])
                tf.summary.scalar("train/accuracy", record["train_acc"])
                tf.summary.scalar("test/accuracy", record["test_acc"])
                tf.summary.scalar("train/examples_per_sec", record["examples_per_sec"])
            writer.flush()

    last = history[-1]
    train_seconds = sum(h["seconds"] for h in history)
    examples_per_sec = sum(h["examples"] for h in history) / train_seconds if train_seconds else 0.0

    # ---- population statistics
    test_acc = last["test_acc"]
    test_acc_before = None
    from tfbn.recalibration import batch_norm_layers

    if recalibrate and batch_norm_layers(model):
        from tfbn.recalibration import recalibrate as recalibrate_fn

        test_acc_before = test_acc
        # Every training example once (the epochs may have left some out).
        examples = getattr(dataset, "train_examples", None)
        examples = dataset.train if examples is None else examples
        recalibrate_fn(model, examples, strategy=strategy, verbose=int(progress))
        test_acc = runner.evaluate(dataset.test)
        say(f"test acc {test_acc_before:.3f} before recalibration, {test_acc:.3f} after")
        if writer is not None:
            with writer.as_default(step=epochs):
                tf.summary.scalar("test/accuracy_recalibrated", test_acc)
            writer.flush()

    # ---- outputs
    export_path = None
    if chief:
        _write_json(run_dir / "history.json", history)
        _plot_history(
            history,
            run_dir / "history.png",
            f"LeNet, norm={norm}, lr {learning_rate:g}, batch {batch_size}",
        )
        save_model_atomically(model, run_dir / "model.keras")
        if export:
            from tfbn.export import export_saved_model

            # Real test images for the export's check that folding kept the predictions.
            check_images = next(iter(dataset.test))[0]
            export_path = pathlib.Path(
                export_saved_model(
                    model,
                    export_dir,
                    name=export_name,
                    check_data=np.asarray(check_images),
                    class_names=CLASS_NAMES,
                )
            )
            say(f"exported SavedModel to {export_path}")
    wall_time = time.perf_counter() - wall_start
    result = TrainResult(
        model=model,
        history=history,
        run_dir=run_dir,
        loss=last["loss"],
        train_acc=last["train_acc"],
        test_acc=float(test_acc),
        test_acc_before_recalibration=test_acc_before,
        examples_per_sec=float(examples_per_sec),
        wall_time=wall_time,
        device=device,
        strategy=strategy_name,
        loop=loop,
        seed=seed,
        initial_epoch=initial_epoch,
        export_path=export_path,
    )
    if chief:
        _write_json(
            run_dir / "result.json",
            {
                **config,
                "epochs": epochs,
                "loop": loop,
                "strategy": strategy_name,
                "device": device,
                "replicas": int(strategy.num_replicas_in_sync),
                "loss": result.loss,
                "train_acc": result.train_acc,
                "test_acc": result.test_acc,
                "test_acc_before_recalibration": test_acc_before,
                "examples_per_sec": result.examples_per_sec,
                "wall_time": wall_time,
                "initial_epoch": initial_epoch,
                "export_path": None if export_path is None else str(export_path),
                "summary": result.summary(),
            },
        )
    if writer is not None:
        writer.close()
    say(f"wall time {wall_time:.1f} s, run folder {run_dir}")
    say(result.summary())
    sys.stdout.flush()
    return result

"""Training LeNet on Fashion-MNIST: `tfbn.train(...)` and the `tfbn train` command.

One call runs the chapter's experiment end to end: build the model under a `tf.distribute`
strategy, train it with Keras's `fit` or a custom loop, evaluate on the test set every epoch,
recompute the BatchNorm population statistics, save everything in a run folder and export a
SavedModel. The steps, in the order `train` takes them:

1. `TrainConfig` (tfbn/workflow/config.py) checks every setting; `_check_locations` checks that
   the data can be read and the output folders written. Nothing is created on disk before both pass.
2. `RunDir` is the run folder: the run's identity (the settings it was started with), where it
   resumes, and the files only the chief process writes.
3. `_set_up` makes the strategy, loads the data (a `TrainData`) and builds the model.
4. `_train_epochs` is the loop: one epoch, one evaluation, one checkpoint at a time.
5. `_finish` recalibrates, writes the output files and exports.

A run folder is resumable: every finished epoch is saved atomically (weights with the BatchNorm
moving statistics, optimizer state, history, the data seed), and the same call with the same
`run_dir` continues after the last finished epoch, with the data order an uninterrupted run would
have used. Layout of a run folder:

    .tfbn.lock                who runs in the folder (tfbn.workflow.locks.FolderLock), while a
                              run does
    checkpoints/epoch-0003/   weights.npz, optimizer.npz, state.json and manifest.json (their
                              sizes and SHA-256), one folder per epoch, the newest two kept
    logs/                     TensorBoard event files
    history.json              per-epoch loss, train accuracy, test accuracy, speed
    history.png               the curves per epoch (tfbn.workflow.plots.training_curves)
    model.keras               the trained model (after recalibration)
    result.json               final metrics, seed, strategy, wall time, examples/sec
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import inspect
import json
import os
import pathlib
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import keras
import numpy as np
import tensorflow as tf

from tfbn.utils.errors import UsageError
from tfbn.utils.files import atomic_write, fsync_dir, save_model_atomically
from tfbn.workflow import distribute
from tfbn.workflow.config import CLASS_NAMES, LOOPS, RECIPE, TrainConfig
from tfbn.workflow.locks import FolderLock

__all__ = ["LOOPS", "RunDir", "TrainConfig", "TrainData", "TrainResult", "format_summary", "train"]

_CHECKPOINTS = "checkpoints"
_KEEP_CHECKPOINTS = 2


@runtime_checkable
class TrainData(Protocol):
    """The data a run trains on; `tfbn.workflow.data.FashionMNIST` is one.

    Every dataset yields batches of `(images, labels)`: float32 images, integer labels.
    """

    @property
    def steps_per_epoch(self) -> int:
        """Training batches per epoch."""

    @property
    def examples_per_epoch(self) -> int:
        """Training examples per epoch (for the speed)."""

    @property
    def train_examples(self) -> tf.data.Dataset:
        """Every training example once (for the population statistics)."""

    @property
    def test(self) -> tf.data.Dataset:
        """The test batches, evaluated after every epoch."""

    def train_for_epoch(self, epoch: int) -> tf.data.Dataset:
        """The training batches of epoch `epoch` (0-based), a function of the run's seed and
        `epoch` only, so that a resumed run sees the data an uninterrupted one would."""


_DATA_MEMBERS = (
    "steps_per_epoch",
    "examples_per_epoch",
    "train_examples",
    "test",
    "train_for_epoch",
)


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
def _check_data_dir(data_dir) -> None:
    from tfbn.workflow import data as data_module

    try:
        data_module.check_data_dir(data_dir)
    except data_module.DataError as error:
        raise UsageError(f"Argument `data_dir`: {error}") from None


def _check_dataset(dataset) -> None:
    # Looked up without evaluating properties: building a tf.data pipeline here would start
    # TensorFlow's runtime before a MultiWorkerMirroredStrategy exists.
    absent = object()
    missing = [n for n in _DATA_MEMBERS if inspect.getattr_static(dataset, n, absent) is absent]
    if missing:
        raise UsageError(
            f"Argument `dataset` must provide {', '.join(_DATA_MEMBERS)} "
            "(tfbn.workflow.training.TrainData);"
            f" received a {type(dataset).__name__} without {', '.join(missing)}."
        )


def _check_locations(config: TrainConfig, dataset) -> None:
    """The data can be read and the outputs written: checked before any work, creating nothing."""
    if dataset is None:
        _check_data_dir(config.data_dir)
    else:
        _check_dataset(dataset)
    config.check_outputs()


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


def _resolve_loop(loop: str, strategy_name: str) -> str:
    if loop == "auto":
        return "custom" if strategy_name == "multi_worker" else "fit"
    if loop == "fit" and strategy_name == "multi_worker":
        # Keras 3's fit fails under MultiWorkerMirroredStrategy (keras-team/keras#20585).
        raise UsageError(
            "Argument `loop`: loop='fit' does not work with strategy='multi_worker' in Keras 3; "
            "use loop='custom' or 'auto'."
        )
    return loop


# ------------------------------------------------------------------------------ small files
def _write_json(path: pathlib.Path, data: Any) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def _save_npz(file, arrays: list[np.ndarray]) -> None:
    np.savez(file, **{f"a{i:04d}": a for i, a in enumerate(arrays)})


def _load_npz(path: pathlib.Path) -> list[np.ndarray]:
    with np.load(path) as data:
        return [data[f"a{i:04d}"] for i in range(len(data.files))]


# -------------------------------------------------------------------------------- checkpoints
_FILES = ("weights.npz", "optimizer.npz", "state.json")
_MANIFEST = "manifest.json"
# The problem of a folder written before checkpoints had a manifest (state.json, no manifest.json).
_FROM_OLDER_TFBN = f"written by an older tfbn (no {_MANIFEST})"


def _file_record(path: pathlib.Path) -> dict:
    with open(path, "rb") as file:
        digest = hashlib.file_digest(file, "sha256").hexdigest()
    return {"bytes": path.stat().st_size, "sha256": digest}


def _checkpoint_problem(path: pathlib.Path) -> str | None:
    """What is wrong with checkpoint folder `path` (checked against its manifest), or None."""
    manifest = path / _MANIFEST
    try:
        listed = json.loads(manifest.read_text())["files"]
        wanted = {
            name: (int(listed[name]["bytes"]), str(listed[name]["sha256"])) for name in _FILES
        }
    except FileNotFoundError:
        return _FROM_OLDER_TFBN if (path / "state.json").is_file() else f"{manifest} is missing"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{manifest} cannot be read ({type(error).__name__})"
    for name, (size, digest) in wanted.items():
        try:
            found = _file_record(path / name)
        except OSError as error:
            return f"{path / name}: {error.strerror or error}"
        if found["bytes"] != size:
            return f"{path / name} has {found['bytes']} bytes, the manifest {size}"
        if found["sha256"] != digest:
            return f"{path / name} does not match the SHA-256 in the manifest"
    return None


class _Checkpoints:
    """One folder per finished epoch, verified when read.

    A folder is written under a temporary name, then its `manifest.json` (the size and SHA-256 of
    every other file, written last), then made visible by a single rename. Reading checks the
    manifest: a folder that does not match it (a truncated copy, a damaged disk) is reported in
    one line on stderr and the newest intact one is used.
    """

    def __init__(self, root: pathlib.Path):
        self.root = root

    def folders(self) -> list[tuple[int, pathlib.Path]]:
        """Every checkpoint folder, intact or not, oldest first."""
        found = []
        if self.root.is_dir():
            for path in self.root.glob("epoch-*"):
                try:
                    found.append((int(path.name.split("-", 1)[1]), path))
                except ValueError:
                    continue
        return sorted(found)

    def latest(self) -> tuple[pathlib.Path, dict] | None:
        """The newest intact checkpoint and its state, or `None` when there is none at all.

        Raises:
            UsageError: if there are checkpoints but none is intact (naming the newest and
                what is wrong with it).
        """
        damaged = []
        for _, path in reversed(self.folders()):
            problem = _checkpoint_problem(path)
            if problem is None:
                return path, json.loads((path / "state.json").read_text())
            kind = "" if problem == _FROM_OLDER_TFBN else "damaged "
            print(f"tfbn: skipping the {kind}checkpoint {path}: {problem}", file=sys.stderr)
            damaged.append((path, problem))
        if damaged:
            path, problem = damaged[0]
            if problem == _FROM_OLDER_TFBN:
                raise UsageError(
                    f"Argument `run_dir`: the checkpoint {path} was {problem}, which this version "
                    "cannot check: start afresh with another run_dir, or delete "
                    f"{self.root.parent}."
                )
            raise UsageError(
                f"Argument `run_dir`: no intact checkpoint in {self.root} ({path}: {problem}). "
                f"Delete {self.root.parent} to start the run over, or use another run_dir."
            )
        return None

    def remove_temporaries(self) -> None:
        # Folders of a process killed while writing: never read, safe to drop.
        for stale in self.root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def save(self, epoch: int, model, optimizer, state: dict) -> None:
        final = self.root / f"epoch-{epoch:04d}"
        tmp = pathlib.Path(tempfile.mkdtemp(dir=self.root, prefix=f".tmp-epoch-{epoch:04d}-"))
        try:
            weights = model.get_weights()
            opt_vars = [np.asarray(v.numpy()) for v in optimizer.variables]
            atomic_write(tmp / "weights.npz", lambda f: _save_npz(f, weights))
            atomic_write(tmp / "optimizer.npz", lambda f: _save_npz(f, opt_vars))
            _write_json(tmp / "state.json", state)
            # The manifest last: a folder that does not match it is never read back.
            _write_json(tmp / _MANIFEST, {"files": {n: _file_record(tmp / n) for n in _FILES}})
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(self.root)
        for _, old in self.folders()[:-_KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def restore(path: pathlib.Path, model, optimizer) -> None:
        model.set_weights(_load_npz(path / "weights.npz"))
        values = _load_npz(path / "optimizer.npz")
        if len(values) != len(optimizer.variables):
            raise UsageError(
                f"The checkpoint '{path}' holds {len(values)} optimizer variables; the optimizer "
                f"has {len(optimizer.variables)}."
            )
        for variable, value in zip(optimizer.variables, values, strict=True):
            variable.assign(value)


# ------------------------------------------------------------------------------- the run dir
@dataclasses.dataclass(frozen=True)
class _Start:
    """Where a run starts: epoch 0, or after the checkpoint `checkpoint`."""

    epoch: int
    seed: int
    identity: dict
    history: list[dict[str, float]]
    checkpoint: pathlib.Path | None = None


def _identity(config: TrainConfig, seed: int | None, own_data: bool) -> dict:
    """The settings that define a run: resuming a folder with other values would mix two
    experiments. Data given by the caller is theirs to keep the same."""
    return {
        "norm": config.norm,
        "batch_size": config.batch_size,
        "learning_rate": config.learning_rate,
        "seed": seed,
        "train_fraction": config.train_fraction if own_data else None,
        "drop_remainder": config.drop_remainder if own_data else None,
    }


class RunDir:
    """A run folder: the run's identity and checkpoints, and the files of its outputs.

    Every process of a run reads it (to resume); only the chief
    (`tfbn.workflow.distribute.is_chief`) creates, writes or removes anything in it, so the methods
    that write do nothing elsewhere.

    Args:
        path: The folder.
        chief: Whether this process writes.
    """

    def __init__(self, path: pathlib.Path, chief: bool):
        self.path = pathlib.Path(path)
        self.chief = chief
        self.checkpoints = _Checkpoints(self.path / _CHECKPOINTS)
        self.saved_epoch = 0  # the newest epoch a checkpoint holds
        self._writer = None

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """The chief's lock on the folder for the whole run (`tfbn.workflow.locks.FolderLock`): a
        second run on it is refused at once, naming the holder; other workers take none."""
        if not self.chief:
            yield
            return
        lock = FolderLock(self.path)
        try:
            lock.acquire()
        except OSError as error:
            if error.filename is not None:
                raise
            # A failed write of the lock record (a full disk) names no file: name it.
            raise type(error)(error.errno, error.strerror, str(lock.path)) from None
        try:
            yield
        finally:
            lock.release()

    def open(self) -> None:
        """Creates the folder (chief) and drops the temporary files of killed processes."""
        if not self.chief:
            return
        self.checkpoints.root.mkdir(parents=True, exist_ok=True)
        self.checkpoints.remove_temporaries()
        for stale in [*self.path.glob(".*.tmp"), *self.path.glob(".model.*.keras")]:
            stale.unlink(missing_ok=True)

    def start(self, config: TrainConfig, own_data: bool) -> _Start:
        """Where the run starts: after the newest checkpoint, or at epoch 0 with a seed.

        Raises:
            UsageError: if the folder holds a run with other settings, or more epochs than
                `config.epochs`.
        """
        found = self.checkpoints.latest()
        if found is None:
            seed = secrets.randbelow(2**31) if config.seed is None else config.seed
            return _Start(0, seed, _identity(config, seed, own_data), [])
        path, state = found
        recorded = state["config"]
        seed = recorded["seed"] if config.seed is None else config.seed
        wanted = _identity(config, seed, own_data)
        for key, value in wanted.items():
            if recorded.get(key) != value:
                raise UsageError(
                    f"Argument `run_dir`: '{self.path}' holds a run with {key}="
                    f"{recorded.get(key)!r}; received {key}={value!r}. Use another run_dir to "
                    "start a new run, or the same settings to resume it."
                )
        epoch = self.saved_epoch = int(state["epoch"])
        if epoch > config.epochs:
            raise UsageError(
                f"Argument `epochs`: '{self.path}' already holds {epoch} finished epochs; "
                f"received epochs={config.epochs}. Use epochs >= {epoch} or another run_dir."
            )
        return _Start(epoch, int(seed), wanted, list(state["history"]), path)

    def save_epoch(self, epoch: int, model, optimizer, state: dict) -> None:
        """Saves the checkpoint after `epoch` (1-based) and the history so far."""
        if self.chief:
            self.checkpoints.save(epoch, model, optimizer, state)
            self.write_json("history.json", state["history"])
        self.saved_epoch = epoch

    def interrupted(self, epochs: int) -> str:
        """The line that ends an interrupted run: where it was and how to go on."""
        done = self.saved_epoch
        if done >= epochs:
            return (
                f"interrupted after epoch {done}, before the run finished; run the same command "
                f"to finish it after epoch {done}"
            )
        if done == 0:
            return "interrupted during epoch 1; run the same command to start again"
        return (
            f"interrupted during epoch {done + 1}; run the same command to resume after "
            f"epoch {done}"
        )

    def write_json(self, name: str, data: Any) -> None:
        if self.chief:
            _write_json(self.path / name, data)

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        """Writes TensorBoard scalars to `logs/` (chief)."""
        if not self.chief:
            return
        logs = self.path / "logs"
        try:
            if self._writer is None:
                self._writer = tf.summary.create_file_writer(str(logs))
            with self._writer.as_default(step=step):
                for tag, value in values.items():
                    tf.summary.scalar(tag, value)
            self._writer.flush()
        except tf.errors.OpError as error:
            # TensorFlow's file errors are not OSErrors: made one, with the path, for the user.
            no_space = "No space left" in error.message
            reason = "No space left on device" if no_space else " ".join(error.message.split())
            raise OSError(errno.ENOSPC if no_space else errno.EIO, reason, str(logs)) from None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# ---------------------------------------------------------------------------------- the loops
def _steps(dataset) -> int | None:
    try:
        n = int(dataset.cardinality())
    except (AttributeError, TypeError):
        return None
    return n if n >= 0 else None


class _RunProgbar(keras.callbacks.ProgbarLogger):
    """Keras's progress bar, headed with the epoch of the whole run (`fit` sees one epoch)."""

    def __init__(self, epochs: int):
        super().__init__()
        self._run_epochs = epochs

    def set_params(self, params):
        super().set_params(params)
        self.epochs = self._run_epochs


class _FitLoop:
    """Keras `Model.fit` on the compiled `model`, one call per epoch so each epoch can get its
    own data order."""

    name = "fit"

    def __init__(self, model: keras.Model):
        self.model = model

    def train_epoch(self, dataset, epoch: int, epochs: int, verbose: int, examples: int):
        """Trains one epoch; returns its mean loss, accuracy, examples and seconds."""
        start = time.perf_counter()
        history = self.model.fit(
            dataset,
            initial_epoch=epoch,
            epochs=epoch + 1,
            steps_per_epoch=_steps(dataset),
            shuffle=False,
            verbose=1 if verbose == 1 else 0,
            callbacks=[_RunProgbar(epochs)],
        )
        seconds = time.perf_counter() - start
        # Keras reports the epoch's means over examples.
        return history.history["loss"][-1], history.history["accuracy"][-1], examples, seconds

    def evaluate(self, dataset) -> float:
        return float(self.model.evaluate(dataset, verbose=0, return_dict=True)["accuracy"])


_SUM = tf.distribute.ReduceOp.SUM


def _replica_steps(model, optimizer):
    """The per-replica train and eval steps of the custom loop (for `strategy.run`)."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)

    def replica_train_step(x, y):
        context = tf.distribute.get_replica_context()
        y = tf.cast(y, tf.int32)
        local_count = tf.cast(tf.shape(y)[0], tf.float32)
        # Dividing by the global batch (not the replica's) makes the summed gradients equal
        # those of the mean loss on one device, for uneven last batches too.
        global_count = context.all_reduce(_SUM, local_count)
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

    return replica_train_step, replica_eval_step


class _CustomLoop:
    """A `tf.distribute` custom loop: `strategy.run` per step, loss scaled by the global batch."""

    name = "custom"

    def __init__(self, model, optimizer, strategy, jit_compile: bool):
        self.model = model
        self.strategy = strategy
        replica_train_step, replica_eval_step = _replica_steps(model, optimizer)
        if jit_compile:
            replica_train_step = tf.function(replica_train_step, jit_compile=True)
            replica_eval_step = tf.function(replica_eval_step, jit_compile=True)

        def reduce(values):
            return tuple(strategy.reduce(_SUM, v, axis=None) for v in values)

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

    def train_epoch(self, dataset, epoch: int, epochs: int, verbose: int, examples: int):
        """Trains one epoch; returns its mean loss, accuracy, examples and seconds."""
        del examples  # counted here, over the replicas
        steps = _steps(dataset)
        bar = None
        if verbose == 1:
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


# ---------------------------------------------------------------------------------- set-up
@dataclasses.dataclass
class _Trainer:
    """What set-up made: the strategy, the data, the model and the loop that trains it."""

    strategy: tf.distribute.Strategy
    strategy_name: str
    device: str
    data: TrainData
    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    loop: _FitLoop | _CustomLoop


def _make_strategy(config: TrainConfig) -> tuple[tf.distribute.Strategy, str, str]:
    """The strategy, its name and the loop's name (checked against the strategy)."""
    name = _strategy_name(config.strategy)
    loop = _resolve_loop(config.loop, name)
    strategy = config.strategy
    if isinstance(strategy, str):
        # First: MultiWorkerMirroredStrategy must exist before the runtime runs any op.
        strategy = distribute.get_strategy(strategy)
    return strategy, name, loop


def _load_data(config: TrainConfig, seed: int, dataset, initial_epoch: int, say) -> TrainData:
    if dataset is None:
        from tfbn.workflow.data import load_fashion_mnist

        dataset = load_fashion_mnist(
            config.batch_size,
            data_dir=config.data_dir,
            train_fraction=config.train_fraction,
            seed=seed,
            shuffle=True,
            drop_remainder=config.drop_remainder,
        )
    start = time.perf_counter()
    # The first batch of each split fills the in-memory caches: done here, so that the training
    # speed counts training, as the chapter's timer does.
    for split in (_epoch_dataset(dataset, initial_epoch), dataset.test):
        next(iter(split))
    say(f"data ready in {time.perf_counter() - start:.1f} s")
    return dataset


def _build_model(config: TrainConfig, strategy, seed: int, model_fn):
    """The model and its SGD optimizer, made in the strategy's scope and compiled."""
    keras.utils.set_random_seed(seed)
    with strategy.scope():
        from tfbn.workflow.models import lenet

        model = lenet(config.norm) if model_fn is None else model_fn()
        if not isinstance(model, keras.Model):
            raise UsageError(
                f"Argument `model_fn` must return a keras.Model; it returned {type(model)!r}."
            )
        optimizer = keras.optimizers.SGD(learning_rate=config.learning_rate)
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            jit_compile=config.jit_compile,
        )
        optimizer.build(model.trainable_variables)
    return model, optimizer


def _set_up(
    config: TrainConfig, start: _Start, strategy, names, dataset, model_fn, say
) -> _Trainer:
    """Loads the data, builds the model and restores the checkpoint `start` names."""
    strategy_name, loop_name = names
    data = _load_data(config, start.seed, dataset, start.epoch, say)
    model, optimizer = _build_model(config, strategy, start.seed, model_fn)
    if loop_name == "fit":
        loop = _FitLoop(model)
    else:
        loop = _CustomLoop(model, optimizer, strategy, config.jit_compile)
    if start.checkpoint is not None:
        with strategy.scope():
            _Checkpoints.restore(start.checkpoint, model, optimizer)
    device = distribute.device_description(strategy)
    return _Trainer(strategy, strategy_name, device, data, model, optimizer, loop)


# ---------------------------------------------------------------------------------- the loop
def _silent(*args, **kwargs) -> None:
    pass


def _epoch_dataset(data: TrainData, epoch: int) -> tf.data.Dataset:
    dataset = data.train_for_epoch(epoch)
    if int(dataset.cardinality()) < 0:
        # A known length gives Keras a bounded progress bar and an epoch that ends on time.
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(int(data.steps_per_epoch)))
    return dataset


def _epoch_record(epoch: int, loss, train_acc, test_acc, examples, seconds) -> dict[str, float]:
    return {
        "epoch": epoch,
        "loss": float(loss),
        "train_acc": float(train_acc),
        "test_acc": float(test_acc),
        "examples": int(examples),
        "seconds": float(seconds),
        "examples_per_sec": float(examples / seconds) if seconds > 0 else 0.0,
    }


def _train_epochs(
    config: TrainConfig, trainer: _Trainer, run_dir: RunDir, start: _Start, say
) -> list:
    """Trains epochs `start.epoch + 1 .. config.epochs`, a checkpoint after each; returns the
    history of the whole run."""
    history = list(start.history)
    for epoch in range(start.epoch, config.epochs):
        loss, train_acc, examples, seconds = trainer.loop.train_epoch(
            _epoch_dataset(trainer.data, epoch),
            epoch,
            config.epochs,
            config.verbose,
            int(trainer.data.examples_per_epoch),
        )
        test_acc = trainer.loop.evaluate(trainer.data.test)
        record = _epoch_record(epoch + 1, loss, train_acc, test_acc, examples, seconds)
        history.append(record)
        say(
            f"epoch {epoch + 1}/{config.epochs}: loss {loss:.3f}, train acc {train_acc:.3f}, "
            f"test acc {test_acc:.3f} ({record['examples_per_sec']:.1f} examples/sec)"
        )
        state = {
            "epoch": epoch + 1,
            "config": start.identity,
            "history": history,
            "loop": trainer.loop.name,
        }
        run_dir.save_epoch(epoch + 1, trainer.model, trainer.optimizer, state)
        run_dir.log_scalars(
            epoch + 1,
            {
                "train/loss": record["loss"],
                "train/accuracy": record["train_acc"],
                "test/accuracy": record["test_acc"],
                "train/examples_per_sec": record["examples_per_sec"],
            },
        )
    return history


# -------------------------------------------------------------------------------- the finish
def _recalibrate(config: TrainConfig, trainer: _Trainer, run_dir: RunDir, test_acc: float, say):
    """Population statistics over every training example; returns the test accuracy after and
    before (`None` when there is nothing to recalibrate)."""
    from tfbn.tools.recalibration import batch_norm_layers
    from tfbn.tools.recalibration import recalibrate as recalibrate_fn

    if not config.recalibrate or not batch_norm_layers(trainer.model):
        return test_acc, None
    # Every training example once (the epochs may have left some out).
    recalibrate_fn(
        trainer.model,
        trainer.data.train_examples,
        strategy=trainer.strategy,
        verbose=1 if config.verbose == 1 else 0,
    )
    after = trainer.loop.evaluate(trainer.data.test)
    say(f"test acc {test_acc:.3f} before recalibration, {after:.3f} after")
    run_dir.log_scalars(config.epochs, {"test/accuracy_recalibrated": after})
    return after, test_acc


def _write_outputs(config: TrainConfig, trainer: _Trainer, run_dir: RunDir, history, recalibrated):
    """history.json, history.png and model.keras (chief)."""
    if not run_dir.chief:
        return
    from tfbn.workflow.plots import training_curves

    run_dir.write_json("history.json", history)
    training_curves(
        history,
        run_dir.path / "history.png",
        title=f"LeNet, norm={config.norm}, lr {config.learning_rate:g}, batch {config.batch_size}",
        recalibrated_test_acc=recalibrated,
    )
    save_model_atomically(trainer.model, run_dir.path / "model.keras")


def _export(config: TrainConfig, trainer: _Trainer, run_dir: RunDir, say) -> pathlib.Path | None:
    if not (config.export and run_dir.chief):
        return None
    from tfbn.tools.export import export_saved_model

    # Real test images for the export's check that folding kept the predictions.
    check_images = next(iter(trainer.data.test))[0]
    path = export_saved_model(
        trainer.model,
        config.export_dir,
        name=config.export_name,
        check_data=np.asarray(check_images),
        class_names=CLASS_NAMES,
    )
    say(f"exported SavedModel to {path}")
    return pathlib.Path(path)


def _finish(config, trainer: _Trainer, run_dir: RunDir, start: _Start, history, wall_start, say):
    """Recalibration, the output files and the export; returns the `TrainResult`."""
    test_acc, before = _recalibrate(config, trainer, run_dir, history[-1]["test_acc"], say)
    _write_outputs(config, trainer, run_dir, history, test_acc if before is not None else None)
    export_path = _export(config, trainer, run_dir, say)
    seconds = sum(h["seconds"] for h in history)
    result = TrainResult(
        model=trainer.model,
        history=history,
        run_dir=run_dir.path,
        loss=history[-1]["loss"],
        train_acc=history[-1]["train_acc"],
        test_acc=float(test_acc),
        test_acc_before_recalibration=before,
        examples_per_sec=sum(h["examples"] for h in history) / seconds if seconds else 0.0,
        wall_time=time.perf_counter() - wall_start,
        device=trainer.device,
        strategy=trainer.strategy_name,
        loop=trainer.loop.name,
        seed=start.seed,
        initial_epoch=start.epoch,
        export_path=export_path,
    )
    run_dir.write_json("result.json", _result_record(config, trainer, start, result))
    say(f"wall time {result.wall_time:.1f} s, run folder {run_dir.path}")
    say(result.summary())
    return result


def _result_record(
    config: TrainConfig, trainer: _Trainer, start: _Start, result: TrainResult
) -> dict:
    return {
        **start.identity,
        "epochs": config.epochs,
        "loop": result.loop,
        "strategy": result.strategy,
        "device": result.device,
        "replicas": int(trainer.strategy.num_replicas_in_sync),
        "loss": result.loss,
        "train_acc": result.train_acc,
        "test_acc": result.test_acc,
        "test_acc_before_recalibration": result.test_acc_before_recalibration,
        "examples_per_sec": result.examples_per_sec,
        "wall_time": result.wall_time,
        "initial_epoch": result.initial_epoch,
        "export_path": None if result.export_path is None else str(result.export_path),
        "summary": result.summary(),
    }


# ------------------------------------------------------------------------------------- train
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
    dataset: TrainData | None = None,
    model_fn: Callable[[], keras.Model] | None = None,
    drop_remainder: bool = RECIPE.drop_remainder,
) -> TrainResult:
    """Trains the chapter's LeNet on Fashion-MNIST, resumably, and saves the run.

    The model is `tfbn.workflow.models.lenet(norm)` built inside the strategy's scope, trained with
    SGD on the sparse categorical cross-entropy of its logits. Each epoch prints the training loss,
    the training accuracy and the test accuracy; the last line is the chapter's summary (`loss
    0.266, train acc 0.901, test acc 0.874, 34491.1 examples/sec on /GPU:0`).

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
        seed: Seed for the weights and the data order, in `[0, 2**32 - 1]`. `None` draws one and
            records it in the run folder (so that a resumed run keeps it).
        strategy: `"auto"`, `"default"`, `"one_device"`, `"mirrored"`, `"multi_worker"` (see
            `tfbn.workflow.distribute.get_strategy`) or a `tf.distribute.Strategy` instance.
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
        dataset: Optional data to train on instead of Fashion-MNIST, a `TrainData` (`data_dir`,
            `train_fraction` and `drop_remainder` are then unused).
        model_fn: Optional function building the model to train instead of
            `tfbn.workflow.models.lenet(norm)` (called inside the strategy's scope, so its variables
            are distributed); it must return an uncompiled `keras.Model` that outputs logits. `norm`
            then only names the run and picks the default learning rate.
        drop_remainder: If `True` (the recipe's default), every training epoch has full batches
            only: the short last batch of each epoch's permutation is left out, other examples
            every epoch (see `tfbn.workflow.config.Recipe`). Unused with `dataset`.

    Returns:
        A `TrainResult`.

    Raises:
        ValueError: (`tfbn.utils.errors.UsageError`) for a setting `TrainConfig` refuses; a data
            folder without the Fashion-MNIST files; a `dataset` that is not a `TrainData`; a
            `run_dir` holding a run with other settings.
        OSError: if an output folder cannot be written (read-only, not a folder, no
            permission), naming the folder that refused; or a data file cannot be read.
            All raised before anything is created on disk or any data is loaded.
    """
    wall_start = time.perf_counter()
    config = TrainConfig(
        norm=norm,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        strategy=strategy,
        loop=loop,
        run_dir=run_dir,
        data_dir=data_dir,
        train_fraction=train_fraction,
        drop_remainder=drop_remainder,
        recalibrate=recalibrate,
        export=export,
        export_dir=export_dir,
        export_name=export_name,
        jit_compile=jit_compile,
        verbose=verbose,
    )
    return _run(config, dataset=dataset, model_fn=model_fn, wall_start=wall_start)


def _run(
    config: TrainConfig,
    *,
    dataset: TrainData | None = None,
    model_fn: Callable[[], keras.Model] | None = None,
    wall_start: float | None = None,
) -> TrainResult:
    """Runs training with a checked `TrainConfig` (what `train` does after building it).

    Args:
        config: The settings.
        dataset: As in `train`.
        model_fn: As in `train`.
        wall_start: `time.perf_counter()` when the call began (default: now).

    Returns:
        A `TrainResult`.
    """
    wall_start = time.perf_counter() if wall_start is None else wall_start
    _check_locations(config, dataset)
    strategy, *names = _make_strategy(config)
    run_dir = RunDir(config.run_dir, chief=distribute.is_chief(strategy))
    with run_dir.lock():
        return _run_locked(config, run_dir, strategy, names, dataset, model_fn, wall_start)


def _run_locked(config, run_dir: RunDir, strategy, names, dataset, model_fn, wall_start):
    """`_run` once the run folder is held: set-up, the loop and the finish."""
    say = print if config.verbose else _silent
    strategy_name, loop_name = names
    start = run_dir.start(config, own_data=dataset is None)
    run_dir.open()
    try:
        trainer = _set_up(config, start, strategy, names, dataset, model_fn, say)
        if start.checkpoint is not None:
            say(f"Resuming {run_dir.path} after epoch {start.epoch} of {config.epochs}.")
        say(
            f"Training LeNet (norm={config.norm}) for {config.epochs} epochs, batch "
            f"{config.batch_size}, lr {config.learning_rate:g}, seed {start.seed}, "
            f"{strategy_name} strategy on {trainer.device}, {loop_name} loop."
        )
        history = _train_epochs(config, trainer, run_dir, start, say)
        result = _finish(config, trainer, run_dir, start, history, wall_start, say)
    except KeyboardInterrupt as error:
        # Ctrl-C or SIGTERM (`tfbn.utils.errors.Terminated`, same type kept): one line for the user.
        sys.stdout.flush()
        raise type(error)(run_dir.interrupted(config.epochs)) from None
    finally:
        run_dir.close()
    sys.stdout.flush()
    return result

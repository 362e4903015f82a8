"""Learning-rate search for LeNet with and without batch normalization, on Keras Tuner.

The chapter asks how large the learning rate can go with batch normalization, and without it.
`tune` answers with a search per LeNet variant (`"tfbn"`, `"keras"`, `"none"`, see
`tfbn.workflow.models.lenet`): the SGD learning rate is drawn log-uniformly from
`[learning_rate_min, learning_rate_max]` (optionally with the SGD momentum), every trial trains for
a few epochs, and is scored by its accuracy on a validation split held out of the training set (the
test set is never touched).

A trial whose loss becomes NaN or infinite stops at once (`keras.callbacks.TerminateOnNaN`) and
is recorded as diverged (objective 0, metric `diverged`); the search goes on. For each variant the
result gives the best learning rate and the largest learning rate at which training still
converged: validation accuracy of at least `converged_accuracy` (0.8) after the last epoch, no
NaN loss.

The search in steps: `TuneConfig` checks the settings (nothing touched yet), `tuner_role` reads
the distributed role, the output folder is checked and locked, the data are loaded, each variant
is searched by a Keras Tuner tuner (`LeNetHyperModel` builds and fits; the tuner classes below
only record what this process ran, through Keras Tuner's public `run_trial` and `on_trial_end`),
and the reports are written.

Files, under `directory`:
- `<project_name>_<variant>/`: the Keras Tuner project of one variant (oracle, trials,
  checkpoints). Running the same command again continues it (Keras Tuner's reload);
  `overwrite=True` starts afresh.
- `<project_name>_results.json` and `<project_name>_results.md`: the table per variant and every
  trial.
- `<project_name>_val_accuracy.png`: validation accuracy against learning rate (log axis), one
  series per variant, diverged trials marked with crosses.
- `<project_name>_logs/<variant>/<trial>/execution<k>/`: TensorBoard scalars and HParams
  (`tensorboard --logdir <directory>/<project_name>_logs`, tab HPARAMS).
- `.tfbn.lock` while a search runs (`tfbn.workflow.locks.FolderLock`): a second search on the same
  directory is refused at once, naming the process that holds it.

Distributed tuning uses Keras Tuner's own mechanism: one chief process holds the oracle and
hands out trials over gRPC; workers run them. Every process runs the same command, with
environment variables (10.0.0.1 standing for the chief's address on a private network):

    # machine A (chief; runs no trials, writes the tables and the plot at the end)
    KERASTUNER_TUNER_ID=chief KERASTUNER_ORACLE_IP=10.0.0.1 KERASTUNER_ORACLE_PORT=8000 \\
        tfbn tune --trials 30
    # machines B, C, ... (workers; each needs the data and a unique id)
    KERASTUNER_TUNER_ID=tuner0 KERASTUNER_ORACLE_IP=10.0.0.1 KERASTUNER_ORACLE_PORT=8000 \\
        tfbn tune --trials 30
    KERASTUNER_TUNER_ID=tuner1 KERASTUNER_ORACLE_IP=10.0.0.1 KERASTUNER_ORACLE_PORT=8000 \\
        tfbn tune --trials 30

The chief listens on `KERASTUNER_ORACLE_IP:KERASTUNER_ORACLE_PORT`. That port speaks
unauthenticated, unencrypted gRPC: whoever reaches it can read the search and report trials. Give
the chief's address on a private network that only the tuning machines reach (127.0.0.1 when all
processes run on one machine), never 0.0.0.0 or a public interface.

The variants are searched one after the other on that one port: the chief serves one variant's
oracle until its budget is spent, then the next. A worker asks the oracle it reaches which
variant it serves (the fixed hyperparameter `variant`) and runs trials only for its own, so it
never reports to another variant's oracle. Start the workers together with the chief; every
worker must pass the same variants, range and budget as the chief. The chief holds the lock on
its `directory`; workers take none. The Hyperband tuner resumes trials from earlier checkpoints,
so with `tuner="hyperband"` all processes need a shared `directory`. Each worker trains under its
own tf.distribute strategy (`strategy`), e.g. mirrored over its GPUs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import keras
import keras_tuner
import numpy as np

from tfbn.utils.files import atomic_write, atomic_write_text
from tfbn.workflow import data as tfbn_data
from tfbn.workflow import models
from tfbn.workflow.config import CONVERGED_ACCURACY, NORMS, TuneConfig
from tfbn.workflow.locks import FolderLock

VARIANTS: tuple[str, ...] = NORMS
MOMENTUM_CHOICES: tuple[float, ...] = (0.0, 0.5, 0.9)
OBJECTIVE = "val_accuracy"
# How often a worker asks the chief which variant it serves, while it waits for its own.
_ORACLE_POLL_S = 0.5


@runtime_checkable
class TrialData(Protocol):
    """The data a search trains on: `tf.data` splits of `(images, labels)` batches.

    `tfbn.workflow.data.load_fashion_mnist` returns one; the search never touches a `test` split.
    """

    train: Any
    validation: Any


@dataclasses.dataclass(frozen=True)
class TrialRecord:
    """One trial of a learning-rate search, as the tuner's oracle recorded it.

    Attributes:
        trial_id: Keras Tuner's trial id within the variant's project.
        variant: LeNet variant (`"tfbn"`, `"keras"` or `"none"`).
        learning_rate: SGD learning rate of the trial.
        momentum: SGD momentum of the trial.
        val_accuracy: Validation accuracy after the last epoch (mean over executions; 0 for an
            execution that diverged); `None` if the trial failed.
        val_loss: Validation loss after the last epoch, `None` if any execution diverged.
        loss: Training loss of the last epoch, `None` if any execution diverged.
        diverged: Whether the training loss became NaN or infinite in any execution.
        epochs: Number of epochs the trial was asked to train.
        status: Keras Tuner's trial status (`"COMPLETED"`, `"FAILED"`, ...).
        converged: Not diverged and `val_accuracy >= converged_accuracy`.
    """

    trial_id: str
    variant: str
    learning_rate: float
    momentum: float
    val_accuracy: float | None
    val_loss: float | None
    loss: float | None
    diverged: bool
    epochs: int
    status: str
    converged: bool


@dataclasses.dataclass
class VariantResult:
    """The search results of one LeNet variant.

    Attributes:
        variant: LeNet variant.
        project_dir: The Keras Tuner project folder.
        trials: All recorded trials, sorted by learning rate.
        best_trial_id: The trial the oracle ranks best (`None` without a completed trial).
        best_learning_rate: Its learning rate.
        best_momentum: Its SGD momentum.
        best_val_accuracy: Its validation accuracy.
        largest_converged_lr: The largest learning rate whose trial converged, `None` if none did.
        smallest_diverged_lr: The smallest learning rate whose trial diverged, `None` if none did.
    """

    variant: str
    project_dir: str
    trials: list[TrialRecord]
    best_trial_id: str | None
    best_learning_rate: float | None
    best_momentum: float | None
    best_val_accuracy: float | None
    largest_converged_lr: float | None
    smallest_diverged_lr: float | None

    @property
    def num_diverged(self) -> int:
        """Number of diverged trials."""
        return sum(t.diverged for t in self.trials)


@dataclasses.dataclass
class TuneResult:
    """What `tune` found.

    Attributes:
        variants: Results per variant, in the order searched.
        settings: The search settings (range, budget, data, machine).
        role: `"single"`, or `"chief"` / `"worker"` in distributed tuning. A worker only knows
            the trials it ran itself (its `best_*` fields are the best of those) and writes no
            tables.
        trials_run: Per variant, the ids of the trials this process ran in this call (empty for
            trials reloaded from an earlier call, and on the chief).
        json_path: The JSON table (`None` on a worker).
        markdown_path: The Markdown table (`None` on a worker).
        plot_path: The PNG plot (`None` on a worker).
        log_dir: Root of the TensorBoard logs (`None` on the chief).
    """

    variants: dict[str, VariantResult]
    settings: dict[str, Any]
    role: str = "single"
    trials_run: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    json_path: str | None = None
    markdown_path: str | None = None
    plot_path: str | None = None
    log_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready nested dicts (the content of the JSON file)."""
        variants = {}
        for name, result in self.variants.items():
            entry = dataclasses.asdict(result)
            entry["num_trials"] = len(result.trials)
            entry["num_diverged"] = result.num_diverged
            variants[name] = entry
        return {"settings": self.settings, "role": self.role, "variants": variants}

    def table(self) -> str:
        """The summary table per variant, in Markdown."""
        threshold = self.settings.get("converged_accuracy", CONVERGED_ACCURACY)
        lines = [
            f"| variant | trials | diverged | best lr | best val acc | largest lr with val acc "
            f">= {threshold:g} | smallest diverged lr |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in self.variants.items():
            best_lr = _fmt_lr(r.best_learning_rate)
            if self.settings.get("tune_momentum") and r.best_momentum is not None:
                best_lr += f" (momentum {r.best_momentum:g})"
            lines.append(
                f"| {name} | {len(r.trials)} | {r.num_diverged} | {best_lr} | "
                f"{_fmt_acc(r.best_val_accuracy)} | {_fmt_lr(r.largest_converged_lr)} | "
                f"{_fmt_lr(r.smallest_diverged_lr)} |"
            )
        return "\n".join(lines)

    def trials_table(self) -> str:
        """Every trial, sorted by variant and learning rate, in Markdown."""
        lines = [
            "| variant | trial | learning rate | momentum | val acc | val loss | diverged |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in self.variants.items():
            for t in r.trials:
                lines.append(
                    f"| {name} | {t.trial_id} | {_fmt_lr(t.learning_rate)} | {t.momentum:g} | "
                    f"{_fmt_acc(t.val_accuracy)} | "
                    f"{'-' if t.val_loss is None else f'{t.val_loss:.4f}'} | "
                    f"{'yes' if t.diverged else ('failed' if t.status == 'FAILED' else 'no')} |"
                )
        return "\n".join(lines)


def _fmt_lr(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _fmt_acc(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


# ---------------------------------------------------------------------------------------------
# Distributed role.


def tuner_role() -> str:
    """`"single"`, or `"chief"` or `"worker"` in distributed tuning (KERASTUNER_* variables).

    The same test Keras Tuner uses (`keras_tuner/src/distribute/utils.py`), with the missing or
    malformed variable named.

    Raises:
        ValueError: if `KERASTUNER_ORACLE_IP` is set without the other two variables, or the port
            is not a number.
    """
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return "single"
    for name in ("KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID"):
        if name not in os.environ:
            raise ValueError(
                f"Environment variable KERASTUNER_ORACLE_IP is set but {name} is not; distributed "
                "tuning needs KERASTUNER_TUNER_ID, KERASTUNER_ORACLE_IP and KERASTUNER_ORACLE_PORT."
            )
    if not os.environ["KERASTUNER_ORACLE_PORT"].isdigit():
        raise ValueError(
            "Environment variable KERASTUNER_ORACLE_PORT must be a port number; received "
            f"{os.environ['KERASTUNER_ORACLE_PORT']!r}."
        )
    return "chief" if "chief" in os.environ["KERASTUNER_TUNER_ID"] else "worker"


# ---------------------------------------------------------------------------------------------
# The hypermodel and the tuners.


class DivergenceMonitor(keras.callbacks.TerminateOnNaN):
    """Stops training at the first NaN/inf loss, and remembers the epoch it happened in."""

    def __init__(self):
        super().__init__()
        self.diverged_epoch: int | None = None
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_batch_end(self, batch, logs=None):
        super().on_batch_end(batch, logs)
        if self.model.stop_training and self.diverged_epoch is None:
            self.diverged_epoch = self._epoch + 1


class LeNetHyperModel(keras_tuner.HyperModel):
    """LeNet of one variant, SGD with a tuned learning rate (and optionally momentum).

    Executions of a trial differ in their initialization (seed `seed + 1000 * execution`);
    trials share it, so that within one execution index only the learning rate differs between
    trials. `execution` counts the fits since the tuner last set it to 0 (at each trial).

    Args:
        variant: LeNet variant, one of `VARIANTS`.
        config: The search settings (range, momentum, seed).
    """

    def __init__(self, variant: str, config: TuneConfig):
        super().__init__(name=f"lenet_{variant}")
        self.variant = variant
        self.config = config
        self.execution = 0

    def build(self, hp):
        # The variant is a fixed hyperparameter so that the trial itself says which model it is
        # for, and a worker can tell which variant the chief's oracle serves.
        name = hp.Fixed("variant", self.variant)
        learning_rate = hp.Float(
            "learning_rate",
            self.config.learning_rate_min,
            self.config.learning_rate_max,
            sampling="log",
        )
        momentum = 0.0
        if self.config.tune_momentum:
            momentum = hp.Choice("sgd_momentum", list(MOMENTUM_CHOICES))
        keras.utils.set_random_seed(self.config.seed + 1000 * self.execution)
        model = models.lenet(name)
        model.compile(
            optimizer=keras.optimizers.SGD(learning_rate=learning_rate, momentum=momentum),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        return model

    def fit(self, hp, model, *args, callbacks=None, **kwargs):
        """Trains `model`; returns the last epoch's metrics, a diverged run scoring 0."""
        monitor = DivergenceMonitor()
        # The data are tf.data pipelines that shuffle themselves.
        kwargs.setdefault("shuffle", False)
        try:
            history = model.fit(*args, callbacks=[*(callbacks or []), monitor], **kwargs)
        finally:
            self.execution += 1
        return _fit_metrics(history, monitor, kwargs.get("epochs", 1))


def _fit_metrics(history, monitor: DivergenceMonitor, epochs: int) -> dict[str, float]:
    logs = {k: v[-1] for k, v in history.history.items() if v}
    losses = [logs.get("loss"), logs.get("val_loss")]
    diverged = monitor.diverged_epoch is not None or not all(
        v is not None and np.isfinite(v) for v in losses
    )
    results = {"diverged": float(diverged), "epochs": float(epochs)}
    if diverged:
        # A diverged network predicts nothing useful: it scores 0, whatever argmax of NaN
        # logits happens to match.
        results[OBJECTIVE] = 0.0
        results["diverged_epoch"] = float(monitor.diverged_epoch or len(history.epoch))
        return results
    for name in (OBJECTIVE, "val_loss", "loss", "accuracy"):
        results[name] = float(logs[name])
    return results


class _RecordingTuner:
    """Mixin for a Keras Tuner tuner: resets the hypermodel's execution count at each trial,
    keeps the mean metrics of the trials this process ran (`local_results`: a worker's only
    view of its trials) and their ids in order (`trials_run`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trials_run: list[str] = []
        self.local_results: dict[str, tuple[dict, dict[str, float]]] = {}

    def run_trial(self, trial, *args, **kwargs):
        self.hypermodel.execution = 0
        results = super().run_trial(trial, *args, **kwargs)
        executions = results if isinstance(results, list) else [results]
        if all(isinstance(r, dict) for r in executions):
            metrics = {
                name: float(np.mean([r[name] for r in executions if name in r]))
                for name in set().union(*executions)
            }
            self.local_results[trial.trial_id] = (dict(trial.hyperparameters.values), metrics)
        return results

    def on_trial_end(self, trial):
        self.trials_run.append(trial.trial_id)
        super().on_trial_end(trial)


class RandomSearch(_RecordingTuner, keras_tuner.RandomSearch):
    """`keras_tuner.RandomSearch` that records the trials this process ran."""


class BayesianOptimization(_RecordingTuner, keras_tuner.BayesianOptimization):
    """`keras_tuner.BayesianOptimization` that records the trials this process ran."""


class Hyperband(_RecordingTuner, keras_tuner.Hyperband):
    """`keras_tuner.Hyperband` that records the trials this process ran."""


TUNER_CLASSES = {"random": RandomSearch, "bayesian": BayesianOptimization, "hyperband": Hyperband}


def _make_tuner(config: TuneConfig, hypermodel: LeNetHyperModel, strategy, *, overwrite: bool):
    """The tuner of one variant's project, `<directory>/<project_name>_<variant>`."""
    cls = TUNER_CLASSES[config.tuner]
    # Keras Tuner treats seed 0 as "no seed"; shift by one so every seed is reproducible.
    common = dict(
        objective=OBJECTIVE,
        seed=config.seed + 1,
        executions_per_trial=config.executions_per_trial,
        distribution_strategy=strategy,
        directory=str(config.directory),
        project_name=f"{config.project_name}_{hypermodel.variant}",
        overwrite=overwrite,
    )
    if config.tuner == "hyperband":
        tuner = cls(
            hypermodel, max_epochs=config.epochs, factor=3, hyperband_iterations=1, **common
        )
        # Hyperband sizes its own brackets; `trials` caps the total.
        tuner.oracle.max_trials = config.trials
        return tuner
    return cls(hypermodel, max_trials=config.trials, **common)


def _await_own_oracle(tuner, variant: str, variants: Sequence[str]) -> bool:
    """On a worker: waits until the chief serves `variant`'s oracle.

    Returns False if the chief already serves a later variant (this one's search is over).
    """
    while True:
        served = tuner.oracle.get_space().values.get("variant")
        if served == variant:
            return True
        if served in variants and variants.index(served) > variants.index(variant):
            return False
        time.sleep(_ORACLE_POLL_S)


# ---------------------------------------------------------------------------------------------
# Results.


def _record(
    trial_id: str,
    variant: str,
    hp: dict,
    metrics: dict[str, float | None],
    status: str,
    converged_accuracy: float,
    epochs: int,
) -> TrialRecord:
    def value(name):
        v = metrics.get(name)
        return None if v is None or not math.isfinite(v) else float(v)

    diverged = (value("diverged") or 0.0) > 0.0
    val_accuracy = value(OBJECTIVE)
    return TrialRecord(
        trial_id=str(trial_id),
        variant=str(hp.get("variant", variant)),
        learning_rate=float(hp["learning_rate"]),
        momentum=float(hp.get("sgd_momentum", 0.0)),
        val_accuracy=val_accuracy,
        val_loss=None if diverged else value("val_loss"),
        loss=None if diverged else value("loss"),
        diverged=diverged,
        epochs=int(value("epochs") or hp.get("tuner/epochs", epochs)),
        status=status,
        converged=bool(
            status == "COMPLETED"
            and not diverged
            and val_accuracy is not None
            and val_accuracy >= converged_accuracy
        ),
    )


def _record_from_trial(trial, variant: str, converged_accuracy: float, epochs: int) -> TrialRecord:
    """A record from the oracle's `Trial` (its last reported metrics)."""
    names = ("diverged", OBJECTIVE, "val_loss", "loss", "epochs")
    metrics = {
        n: trial.metrics.get_last_value(n) if trial.metrics.exists(n) else None for n in names
    }
    return _record(
        trial.trial_id,
        variant,
        trial.hyperparameters.values,
        metrics,
        str(trial.status),
        converged_accuracy,
        epochs,
    )


def _variant_result(
    variant: str, project_dir: str, records: list[TrialRecord], best_trial_id: str | None
) -> VariantResult:
    records = sorted(records, key=lambda t: (t.learning_rate, t.trial_id))
    best = next((t for t in records if t.trial_id == best_trial_id), None)
    converged = [t.learning_rate for t in records if t.converged]
    diverged = [t.learning_rate for t in records if t.diverged]
    return VariantResult(
        variant=variant,
        project_dir=project_dir,
        trials=records,
        best_trial_id=best.trial_id if best else None,
        best_learning_rate=best.learning_rate if best else None,
        best_momentum=best.momentum if best else None,
        best_val_accuracy=best.val_accuracy if best else None,
        largest_converged_lr=max(converged) if converged else None,
        smallest_diverged_lr=min(diverged) if diverged else None,
    )


def _oracle_result(tuner, variant: str, converged_accuracy: float, epochs: int) -> VariantResult:
    oracle = tuner.oracle
    records = [
        _record_from_trial(t, variant, converged_accuracy, epochs) for t in oracle.trials.values()
    ]
    best = [t for t in oracle.get_best_trials(1) if str(t.status) == "COMPLETED"]
    return _variant_result(variant, tuner.project_dir, records, best[0].trial_id if best else None)


def _json_ready(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


def _markdown(result: TuneResult) -> str:
    s = result.settings
    parts = [
        "# Learning-rate search: LeNet with and without batch normalization",
        "",
        f"Keras Tuner `{s['tuner']}`, learning rate log-uniform in "
        f"[{s['learning_rate_min']:g}, {s['learning_rate_max']:g}]"
        f"{', SGD momentum tuned' if s['tune_momentum'] else ', plain SGD'}; "
        f"{s['trials']} trials per variant, {s['epochs']} epoch(s) each, "
        f"{s['executions_per_trial']} execution(s) per trial, batch {s['batch_size']}. "
        f"Data: {s['data']}. Objective: validation accuracy after the last epoch (a diverged "
        "trial scores 0). Converged: validation accuracy >= "
        f"{s['converged_accuracy']:g} and no NaN loss. Strategy: {s['strategy']}. "
        f"Machine: {s['machine']}.",
        "",
        result.table(),
        "",
        "## All trials",
        "",
        result.trials_table(),
        "",
    ]
    return "\n".join(parts)


def _plot(result: TuneResult, path: str) -> None:
    # A Figure without pyplot: no global backend switch (a notebook keeps showing its plots).
    import matplotlib
    from matplotlib.figure import Figure

    threshold = result.settings["converged_accuracy"]
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, r) in enumerate(result.variants.items()):
        color = colors[i % len(colors)]
        ok = [t for t in r.trials if not t.diverged and t.val_accuracy is not None]
        bad = [t for t in r.trials if t.diverged]
        ax.plot(
            [t.learning_rate for t in ok],
            [t.val_accuracy for t in ok],
            marker="o",
            color=color,
            label=f"{name}",
        )
        if bad:
            ax.scatter(
                [t.learning_rate for t in bad],
                [0.0] * len(bad),
                marker="x",
                s=60,
                color=color,
                label=f"{name}: diverged (NaN loss)",
            )
    ax.set_xscale("log")
    ax.set_xlim(
        result.settings["learning_rate_min"] / 1.5, result.settings["learning_rate_max"] * 1.5
    )
    ax.axhline(threshold, color="gray", linestyle="--", linewidth=1)
    ax.text(
        0.01,
        threshold,
        f"converged: val acc >= {threshold:g}",
        transform=ax.get_yaxis_transform(),
        va="bottom",
        fontsize=8,
        color="gray",
    )
    ax.set_ylim(-0.03, 1.0)
    ax.set_xlabel("learning rate (SGD)")
    ax.set_ylabel("validation accuracy")
    s = result.settings
    ax.set_title(
        f"LeNet, SGD: {s['epochs']} epoch(s) per trial, {s['tuner']} search\n"
        f"training fraction {s['train_fraction']:g}, validation fraction "
        f"{s['validation_fraction']:g}, batch {s['batch_size']}",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    atomic_write(path, lambda file: fig.savefig(file, format="png", dpi=120))


def _describe_data(dataset, train_fraction: float, validation_fraction: float) -> str:
    sizes = ""
    if dataset is not None and hasattr(dataset, "num_train"):
        sizes = f" ({dataset.num_train} training, {dataset.num_validation} validation examples)"
    return (
        f"Fashion-MNIST training split: {validation_fraction:g} held out for validation, "
        f"{train_fraction:g} of the rest for training{sizes}; the test split is not used"
    )


def _machine() -> str:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    device = f"{len(gpus)} GPU(s)" if gpus else "no GPU"
    return f"{os.cpu_count()}-core CPU ({platform.machine()}), {device}"


# ---------------------------------------------------------------------------------------------
# The search.


def tune(
    variants: Sequence[str] | str = TuneConfig.variants,
    *,
    tuner: str = TuneConfig.tuner,
    learning_rate_min: float = TuneConfig.learning_rate_min,
    learning_rate_max: float = TuneConfig.learning_rate_max,
    trials: int = TuneConfig.trials,
    epochs: int = TuneConfig.epochs,
    executions_per_trial: int = TuneConfig.executions_per_trial,
    train_fraction: float = TuneConfig.train_fraction,
    validation_fraction: float = TuneConfig.validation_fraction,
    tune_momentum: bool = TuneConfig.tune_momentum,
    batch_size: int = TuneConfig.batch_size,
    directory: str | os.PathLike = TuneConfig.directory,
    project_name: str = TuneConfig.project_name,
    overwrite: bool = TuneConfig.overwrite,
    strategy: str = TuneConfig.strategy,
    seed: int = TuneConfig.seed,
    data_dir: str | os.PathLike | None = None,
    dataset: TrialData | None = None,
    verbose: int = TuneConfig.verbose,
    converged_accuracy: float = CONVERGED_ACCURACY,
) -> TuneResult:
    """Searches the SGD learning rate of LeNet per batch-norm variant with Keras Tuner.

    Args:
        variants: LeNet variants to search, each one of `"tfbn"` (this package's BatchNorm),
            `"keras"` (keras.layers.BatchNormalization) and `"none"` (no normalization); a
            comma-separated string is accepted. One tuner project per variant.
        tuner: `"random"` (keras_tuner.RandomSearch), `"bayesian"` (BayesianOptimization) or
            `"hyperband"` (Hyperband with `max_epochs=epochs`, capped at `trials` trials).
        learning_rate_min: Lower end of the learning-rate range (searched on a log scale), > 0.
        learning_rate_max: Upper end of the learning-rate range, > `learning_rate_min`.
        trials: Trials per variant (the whole budget, counting trials of earlier runs of the same
            project).
        epochs: Epochs per trial.
        executions_per_trial: Trainings per trial from different initializations; the trial's
            metrics are their means.
        train_fraction: Fraction of the training set to use, in (0, 1].
        validation_fraction: Fraction of the training set held out for the objective, in (0, 1).
        tune_momentum: Also search the SGD momentum among (0, 0.5, 0.9); otherwise plain SGD.
        batch_size: Global batch size.
        directory: Folder of the tuner projects, tables, plot and logs; locked while the search
            runs (on the chief in distributed tuning).
        project_name: Prefix of the project names (`<project_name>_<variant>`) and output files.
        overwrite: Start every project afresh instead of continuing it (on the chief; workers
            never delete anything).
        strategy: tf.distribute strategy name for the trials (see `tfbn.workflow.distribute`):
            `"auto"`, `"default"`, `"one_device"` or `"mirrored"`.
        seed: Seed of the oracles and of the model initialization.
        data_dir: Folder of the Fashion-MNIST IDX files (default: the data module's search).
        dataset: A prebuilt `TrialData` (`.train` and `.validation` tf.data splits of (images,
            labels) batches), used instead of loading Fashion-MNIST (its `.test` is never
            touched); the fractions and `batch_size` then only get checked.
        verbose: 0 prints nothing; 1 (default) Keras Tuner's trial reports, Keras's progress
            bars (one line per epoch when not on a terminal) and the table; 2 the same with one
            line per epoch.
        converged_accuracy: Validation accuracy from which a trial counts as converged.

    Returns:
        A `TuneResult`; on the chief and in a single process its tables are also written to
        `<directory>/<project_name>_results.{json,md}` and the plot to
        `<directory>/<project_name>_val_accuracy.png`.

    Raises:
        ValueError: for an empty, inverted or non-positive learning-rate range, non-positive
            `trials`, `epochs`, `executions_per_trial` or `batch_size`, an unknown variant, tuner
            or strategy, or fractions out of range; before any data is loaded or folder created.
        tfbn.utils.errors.UsageError: (a `ValueError`) if another live process holds `directory`.
        OSError: if `directory` or an output file cannot be written (read-only, not a folder,
            no space), naming the path; before any data is loaded.
        ImportError: for `tuner="bayesian"` without SciPy and scikit-learn installed.
    """
    # Every argument but `dataset` is a setting of the search.
    settings = dict(locals())
    dataset = settings.pop("dataset")
    return search(TuneConfig(**settings), dataset)


def search(config: TuneConfig, dataset: TrialData | None = None) -> TuneResult:
    """Runs the search that `config` describes (see `tune`, which checks its arguments so)."""
    if dataset is not None and (not isinstance(dataset, TrialData) or dataset.validation is None):
        raise ValueError(
            "Argument `dataset` must have a `validation` split (and a `train` split); received "
            f"{type(dataset).__name__} without one."
        )
    _check_tuner_installed(config.tuner)
    role = tuner_role()
    strategy_name = _strategy_name(config.strategy)
    paths = _check_outputs(config, role)
    lock = contextlib.nullcontext() if role == "worker" else FolderLock(config.directory)
    with lock:
        data, description = _trial_data(config, role, dataset)
        distribution = None
        if role != "chief" and strategy_name != "default":
            from tfbn.workflow.distribute import get_strategy

            distribution = get_strategy(strategy_name)
        started = time.perf_counter()
        searched = {
            variant: _search_variant(config, variant, role, data, distribution)
            for variant in config.variants
        }
        settings = _settings(config, strategy_name, description)
        # Time of this call only: a resumed search does not count the trials of earlier calls.
        settings["elapsed_seconds_this_call"] = round(time.perf_counter() - started, 1)
        result = TuneResult(
            variants={variant: found for variant, (found, _) in searched.items()},
            settings=settings,
            role=role,
            trials_run={variant: ran for variant, (_, ran) in searched.items()},
            log_dir=None if role == "chief" else str(paths["logs"]),
        )
        if role != "worker":
            _write_reports(result, paths, config.verbose)
    return result


def _check_tuner_installed(kind: str) -> None:
    if kind == "bayesian" and not all(importlib.util.find_spec(m) for m in ("scipy", "sklearn")):
        raise ImportError(
            "tuner='bayesian' needs SciPy and scikit-learn (Keras Tuner's BayesianOptimization): "
            "pip install 'keras-tuner[bayesian]'."
        )


def _strategy_name(strategy: str) -> str:
    from tfbn.workflow.distribute import resolve_strategy_name

    name = resolve_strategy_name(strategy)
    if name == "multi_worker":
        raise ValueError(
            "Argument `strategy='auto'` resolves to 'multi_worker' here (TF_CONFIG names several "
            "workers), which tuning does not support; pass another strategy."
        )
    return name


def _output_paths(config: TuneConfig) -> dict[str, Path]:
    stem = config.directory / config.project_name
    return {
        "json": Path(f"{stem}_results.json"),
        "markdown": Path(f"{stem}_results.md"),
        "plot": Path(f"{stem}_val_accuracy.png"),
        "logs": Path(f"{stem}_logs"),
    }


def _check_outputs(config: TuneConfig, role: str) -> dict[str, Path]:
    """The output paths, once `directory` can be written and no report path is a folder.

    Raises the `OSError` (naming the path) that writing there would raise; creates nothing.
    """
    config.check_outputs()
    paths = _output_paths(config)
    if role != "worker":
        for key in ("json", "markdown", "plot"):
            if paths[key].is_dir():
                raise IsADirectoryError(21, "Is a directory", str(paths[key]))
    return paths


def _trial_data(
    config: TuneConfig, role: str, dataset: TrialData | None
) -> tuple[TrialData | None, str]:
    """The data the trials train on (None on the chief, which runs none) and their description."""
    if dataset is not None:
        return (None if role == "chief" else dataset), "prebuilt dataset"
    if role == "chief":
        return None, _describe_data(None, config.train_fraction, config.validation_fraction)
    loaded = tfbn_data.load_fashion_mnist(
        config.batch_size,
        data_dir=config.data_dir,
        validation_fraction=config.validation_fraction,
        train_fraction=config.train_fraction,
        seed=config.seed,
    )
    if loaded.validation is None:
        raise ValueError("The dataset has no validation split; set `validation_fraction`.")
    return loaded, _describe_data(loaded, config.train_fraction, config.validation_fraction)


def _settings(config: TuneConfig, strategy_name: str, description: str) -> dict[str, Any]:
    """The settings recorded with the results (the JSON table's `settings`)."""
    settings = {
        name: getattr(config, name)
        for name in (
            "tuner", "learning_rate_min", "learning_rate_max", "trials", "epochs",
            "executions_per_trial", "train_fraction", "validation_fraction", "tune_momentum",
            "batch_size", "seed", "converged_accuracy",
        )
    }  # fmt: skip
    settings["variants"] = list(config.variants)
    settings["strategy"] = strategy_name
    settings["data"] = description
    settings["machine"] = _machine()
    settings["objective"] = f"{OBJECTIVE} (last epoch; validation split of the training set)"
    return settings


def _search_variant(
    config: TuneConfig, variant: str, role: str, data: TrialData | None, distribution
) -> tuple[VariantResult, list[str]]:
    """Searches one variant's project; returns its result and the trials this process ran."""
    logs = _output_paths(config)["logs"] / variant
    # The chief owns the projects: a worker never deletes anything, since with a shared
    # directory it would delete the chief's records or another worker's logs.
    if config.overwrite and role == "single" and logs.is_dir():
        shutil.rmtree(logs)
    hypermodel = LeNetHyperModel(variant, config)
    kt_tuner = _make_tuner(
        config, hypermodel, distribution, overwrite=config.overwrite and role != "worker"
    )
    verbose = config.verbose
    fit_verbose = 0 if verbose == 0 else (1 if verbose == 1 and _isatty() else 2)
    if role == "chief":
        # Serves trials to the workers until the budget is spent.
        kt_tuner.search(verbose=fit_verbose)
    elif role == "single" or _await_own_oracle(kt_tuner, variant, config.variants):
        kt_tuner.search(
            data.train,
            validation_data=data.validation,
            epochs=config.epochs,
            callbacks=[
                keras.callbacks.TensorBoard(
                    log_dir=str(logs), write_graph=False, update_freq="epoch"
                )
            ],
            verbose=fit_verbose,
        )
    if role == "worker":
        found = _local_result(kt_tuner, variant, config)
    else:
        found = _oracle_result(kt_tuner, variant, config.converged_accuracy, config.epochs)
    return found, list(kt_tuner.trials_run)


def _local_result(kt_tuner, variant: str, config: TuneConfig) -> VariantResult:
    """A worker's view: only its own trials (the chief's oracle holds the others)."""
    records = [
        _record(tid, variant, hp, metrics, "COMPLETED", config.converged_accuracy, config.epochs)
        for tid, (hp, metrics) in kt_tuner.local_results.items()
    ]
    best = max(records, key=lambda t: t.val_accuracy or 0.0, default=None)
    return _variant_result(variant, kt_tuner.project_dir, records, best.trial_id if best else None)


def _write_reports(result: TuneResult, paths: dict[str, Path], verbose: int) -> None:
    """Writes the JSON and Markdown tables and the plot; prints the table if `verbose`."""
    result.json_path = str(paths["json"])
    result.markdown_path = str(paths["markdown"])
    result.plot_path = str(paths["plot"])
    text = json.dumps(_json_ready(result.to_dict()), indent=2) + "\n"
    atomic_write_text(result.json_path, text)
    atomic_write_text(result.markdown_path, _markdown(result))
    _plot(result, result.plot_path)
    if verbose:
        print()
        print(result.table())
        print(f"\nTables: {result.markdown_path}, {result.json_path}; plot: {result.plot_path}")


def _isatty() -> bool:
    return bool(getattr(sys.stdout, "isatty", lambda: False)())

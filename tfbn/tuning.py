"""Learning-rate search for LeNet with and without batch normalization, on Keras Tuner.

The chapter asks how large the learning rate can go with batch normalization, and without it.
`tune` answers with a search per LeNet variant (`"tfbn"`, `"keras"`, `"none"`, see
`tfbn.models.lenet`): the SGD learning rate is drawn log-uniformly from `[lr_min, lr_max]`
(optionally with the SGD momentum), every trial trains for a few epochs, and is scored by its
accuracy on a validation split held out of the training set (the test set is never touched).

A trial whose loss becomes NaN or infinite stops at once (`keras.callbacks.TerminateOnNaN`) and
is recorded as diverged (objective 0, metric `diverged`); the search goes on. For each variant the
result gives the best learning rate and the largest learning rate at which training still
converged: validation accuracy of at least `converged_accuracy` (0.8) after the last epoch, no
NaN loss.

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

Distributed tuning uses Keras Tuner's own mechanism: one chief process holds the oracles and
hands out trials over gRPC; workers run them. Every process runs the same command, with
environment variables:

    # machine A (chief; runs no trials, writes the tables and the plot at the end)
    KERASTUNER_TUNER_ID=chief KERASTUNER_ORACLE_IP=10.0.0.1 KERASTUNER_ORACLE_PORT=8000 \\
        tfbn tune --trials 30
    # machines B, C, ... (workers; each needs the data and a unique id)
    KERASTUNER_TUNER_ID=tuner0 KERASTUNER_ORACLE_IP=10.0.0.1 KERASTUNER_ORACLE_PORT=8000 \\
        tfbn tune --trials 30
    KERASTUNER_TUNER_ID=tuner1 KERASTUNER_ORACLE_IP=10.0.0.1 KERASTUNER_ORACLE_PORT=8000 \\
        tfbn tune --trials 30

The chief listens on `KERASTUNER_ORACLE_IP` (use an address the workers can reach, or 0.0.0.0)
and the variants are searched one after the other, variant number `i` on port
`KERASTUNER_ORACLE_PORT + i` (open that many ports), so a worker can never report to another
variant's oracle. Start the workers together with the chief: a worker that connects after a
variant's search has ended waits for a server that is gone. Every worker must pass the same
variants, range and budget as the chief. The Hyperband tuner resumes trials from earlier
checkpoints, so with `tuner="hyperband"` all processes need a shared `directory`. Each worker
trains under its own tf.distribute strategy (`strategy`), e.g. mirrored over its GPUs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import platform
import shutil
import time
from collections.abc import Sequence
from typing import Any

from tfbn.config import NORMS, STRATEGIES, TUNERS
from tfbn.files import atomic_write, atomic_write_text

VARIANTS: tuple[str, ...] = NORMS
CONVERGED_ACCURACY = 0.8
MOMENTUM_CHOICES: tuple[float, ...] = (0.0, 0.5, 0.9)
OBJECTIVE = "val_accuracy"


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
# Argument checks: everything here runs before any data is loaded or any folder is created.


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(
            f"Argument `{name}` must be a positive integer; received {name}={value!r}."
        )


def _check_variants(variants: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(variants, str):
        variants = [v for v in variants.split(",") if v]
    variants = tuple(variants)
    if not variants:
        raise ValueError(
            f"Argument `variants` must name at least one of {VARIANTS}; received variants=()."
        )
    for variant in variants:
        if variant not in VARIANTS:
            raise ValueError(
                f"Argument `variants` must contain only {VARIANTS}; received {variant!r} in "
                f"variants={variants!r}."
            )
    if len(set(variants)) != len(variants):
        raise ValueError(f"Argument `variants` has duplicates; received variants={variants!r}.")
    return variants


def _check_arguments(
    *,
    variants,
    tuner,
    lr_min,
    lr_max,
    trials,
    epochs,
    executions_per_trial,
    train_fraction,
    validation_fraction,
    batch_size,
    project_name,
    strategy,
    converged_accuracy,
    dataset,
) -> tuple[str, ...]:
    variants = _check_variants(variants)
    if tuner not in TUNERS:
        raise ValueError(f"Argument `tuner` must be one of {TUNERS}; received tuner={tuner!r}.")
    for name, value in (("lr_min", lr_min), ("lr_max", lr_max)):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise ValueError(
                f"Argument `{name}` must be a finite number; received {name}={value!r}."
            )
    if lr_min <= 0:
        raise ValueError(
            f"Argument `lr_min` must be positive (the learning rate is searched on a log scale); "
            f"received lr_min={lr_min}."
        )
    if lr_max <= lr_min:
        raise ValueError(
            f"Arguments `lr_min` < `lr_max` must give a non-empty range; received lr_min={lr_min}, "
            f"lr_max={lr_max}."
        )
    _check_positive_int("trials", trials)
    _check_positive_int("epochs", epochs)
    _check_positive_int("executions_per_trial", executions_per_trial)
    _check_positive_int("batch_size", batch_size)
    if not (isinstance(train_fraction, (int, float)) and 0.0 < train_fraction <= 1.0):
        raise ValueError(
            "Argument `train_fraction` must be in (0, 1]; received "
            f"train_fraction={train_fraction!r}."
        )
    if not (isinstance(validation_fraction, (int, float)) and 0.0 < validation_fraction < 1.0):
        raise ValueError(
            "Argument `validation_fraction` must be in (0, 1): the objective is the accuracy on "
            f"a validation split of the training set; received validation_fraction="
            f"{validation_fraction!r}."
        )
    if not (isinstance(converged_accuracy, (int, float)) and 0.0 <= converged_accuracy <= 1.0):
        raise ValueError(
            "Argument `converged_accuracy` must be in [0, 1]; received "
            f"converged_accuracy={converged_accuracy!r}."
        )
    if not project_name or not isinstance(project_name, str) or os.sep in project_name:
        raise ValueError(
            f"Argument `project_name` must be a non-empty name without {os.sep!r}; received "
            f"project_name={project_name!r}."
        )
    if strategy not in STRATEGIES:
        raise ValueError(f"Argument `strategy` must be one of {STRATEGIES}; received {strategy!r}.")
    if strategy == "multi_worker":
        raise ValueError(
            "Argument `strategy='multi_worker'` is not supported for tuning (Keras's fit fails "
            "under MultiWorkerMirroredStrategy); spread trials over machines with distributed "
            "tuning instead (KERASTUNER_* variables, see tfbn.tuning)."
        )
    if dataset is not None and getattr(dataset, "validation", None) is None:
        raise ValueError(
            "Argument `dataset` must have a `validation` split (and a `train` split); received "
            f"{type(dataset).__name__} without one."
        )
    return variants


def _tuner_role() -> str:
    # The same test Keras Tuner uses (keras_tuner/src/distribute/utils.py).
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


def _make_hypermodel(variant: str, lr_min: float, lr_max: float, tune_momentum: bool, seed: int):
    import keras
    import keras_tuner
    import numpy as np

    from tfbn.models import lenet

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

    class LeNetLearningRate(keras_tuner.HyperModel):
        """LeNet of one variant, SGD with a tuned learning rate (and optionally momentum)."""

        def __init__(self):
            super().__init__(name=f"lenet_{variant}")
            self.build_seed = seed

        def build(self, hp):
            # The variant is a fixed hyperparameter so that the trial itself says which model
            # it is for: a worker builds whatever the chief's oracle hands out.
            name = hp.Fixed("variant", variant)
            learning_rate = hp.Float("learning_rate", lr_min, lr_max, sampling="log")
            momentum = hp.Choice("sgd_momentum", list(MOMENTUM_CHOICES)) if tune_momentum else 0.0
            keras.utils.set_random_seed(self.build_seed)
            model = lenet(name)
            model.compile(
                optimizer=keras.optimizers.SGD(learning_rate=learning_rate, momentum=momentum),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"],
            )
            return model

        def fit(self, hp, model, *args, callbacks=None, **kwargs):
            monitor = DivergenceMonitor()
            # The data are tf.data pipelines that shuffle themselves.
            kwargs.setdefault("shuffle", False)
            history = model.fit(*args, callbacks=[*(callbacks or []), monitor], **kwargs)
            logs = {k: v[-1] for k, v in history.history.items() if v}
            losses = [logs.get("loss"), logs.get("val_loss")]
            diverged = monitor.diverged_epoch is not None or not all(
                v is not None and np.isfinite(v) for v in losses
            )
            results = {"diverged": float(diverged), "epochs": float(kwargs.get("epochs", 1))}
            if diverged:
                # A diverged network predicts nothing useful: it scores 0, whatever argmax of
                # NaN logits happens to match.
                results[OBJECTIVE] = 0.0
                results["diverged_epoch"] = float(monitor.diverged_epoch or len(history.epoch))
            else:
                results[OBJECTIVE] = float(logs[OBJECTIVE])
                results["val_loss"] = float(logs["val_loss"])
                results["loss"] = float(logs["loss"])
                results["accuracy"] = float(logs["accuracy"])
            return results

    return LeNetLearningRate()


def _tuner_classes():
    import keras_tuner
    import numpy as np

    class _Hooks:
        """Per-execution seeds, and the list of trials this process ran."""

        def run_trial(self, trial, *args, **kwargs):
            self._execution = 0
            results = super().run_trial(trial, *args, **kwargs)
            executions = results if isinstance(results, list) else [results]
            if all(isinstance(r, dict) for r in executions):
                metrics = {
                    name: float(np.mean([r[name] for r in executions if name in r]))
                    for name in set().union(*executions)
                }
                self.local_results[trial.trial_id] = (dict(trial.hyperparameters.values), metrics)
            return results

        def _build_and_fit_model(self, trial, *args, **kwargs):
            # Executions of a trial differ in their initialization; trials share it, so that
            # within one execution index only the learning rate differs between trials.
            self.hypermodel.build_seed = self._base_seed + 1000 * self._execution
            self._execution += 1
            return super()._build_and_fit_model(trial, *args, **kwargs)

        def on_trial_end(self, trial):
            self.trials_run.append(trial.trial_id)
            super().on_trial_end(trial)

    class RandomSearch(_Hooks, keras_tuner.RandomSearch):
        pass

    class BayesianOptimization(_Hooks, keras_tuner.BayesianOptimization):
        pass

    class Hyperband(_Hooks, keras_tuner.Hyperband):
        pass

    return {"random": RandomSearch, "bayesian": BayesianOptimization, "hyperband": Hyperband}


def _make_tuner(
    kind,
    hypermodel,
    *,
    trials,
    epochs,
    executions_per_trial,
    seed,
    strategy,
    directory,
    project,
    overwrite,
):
    cls = _tuner_classes()[kind]
    # Keras Tuner treats seed 0 as "no seed"; shift by one so every seed is reproducible.
    common = dict(
        objective=OBJECTIVE,
        seed=seed + 1,
        executions_per_trial=executions_per_trial,
        distribution_strategy=strategy,
        directory=directory,
        project_name=project,
        overwrite=overwrite,
    )
    if kind == "hyperband":
        tuner = cls(hypermodel, max_epochs=epochs, factor=3, hyperband_iterations=1, **common)
        # Hyperband sizes its own brackets; `trials` caps the total.
        tuner.oracle.max_trials = trials
    else:
        tuner = cls(hypermodel, max_trials=trials, **common)
    tuner._base_seed = seed
    tuner.trials_run = []
    tuner.local_results = {}
    return tuner


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
        f"Keras Tuner `{s['tuner']}`, learning rate log-uniform in [{s['lr_min']:g}, "
        f"{s['lr_max']:g}]{', SGD momentum tuned' if s['tune_momentum'] else ', plain SGD'}; "
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
    ax.set_xlim(result.settings["lr_min"] / 1.5, result.settings["lr_max"] * 1.5)
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
    variants: Sequence[str] | str = VARIANTS,
    *,
    tuner: str = "random",
    lr_min: float = 0.01,
    lr_max: float = 10.0,
    trials: int = 10,
    epochs: int = 2,
    executions_per_trial: int = 1,
    train_fraction: float = 1.0,
    validation_fraction: float = 0.1,
    tune_momentum: bool = False,
    batch_size: int = 256,
    directory: str = "runs/tune",
    project_name: str = "lenet_lr",
    overwrite: bool = False,
    strategy: str = "auto",
    seed: int = 0,
    data_dir: str | None = None,
    dataset: Any = None,
    verbose: int = 1,
    converged_accuracy: float = CONVERGED_ACCURACY,
) -> TuneResult:
    """Searches the SGD learning rate of LeNet per batch-norm variant with Keras Tuner.

    Args:
        variants: LeNet variants to search, each one of `"tfbn"` (this package's BatchNorm),
            `"keras"` (keras.layers.BatchNormalization) and `"none"` (no normalization); a
            comma-separated string is accepted. One tuner project per variant.
        tuner: `"random"` (keras_tuner.RandomSearch), `"bayesian"` (BayesianOptimization) or
            `"hyperband"` (Hyperband with `max_epochs=epochs`, capped at `trials` trials).
        lr_min: Lower end of the learning-rate range (searched on a log scale), > 0.
        lr_max: Upper end of the learning-rate range, > `lr_min`.
        trials: Trials per variant (the whole budget, counting trials of earlier runs of the same
            project).
        epochs: Epochs per trial.
        executions_per_trial: Trainings per trial from different initializations; the trial's
            metrics are their means.
        train_fraction: Fraction of the training set to use, in (0, 1].
        validation_fraction: Fraction of the training set held out for the objective, in (0, 1).
        tune_momentum: Also search the SGD momentum among (0, 0.5, 0.9); otherwise plain SGD.
        batch_size: Global batch size.
        directory: Folder of the tuner projects, tables, plot and logs.
        project_name: Prefix of the project names (`<project_name>_<variant>`) and output files.
        overwrite: Start every project afresh instead of continuing it (on the chief; workers
            never delete anything).
        strategy: tf.distribute strategy name for the trials (see `tfbn.distribute`): `"auto"`,
            `"default"`, `"one_device"` or `"mirrored"`.
        seed: Seed of the oracles and of the model initialization.
        data_dir: Folder of the Fashion-MNIST IDX files (default: the data module's search).
        dataset: A prebuilt dataset with `.train` and `.validation` tf.data splits of (images,
            labels) batches, used instead of loading Fashion-MNIST (its `.test` is never
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
        ImportError: for `tuner="bayesian"` without SciPy and scikit-learn installed.
    """
    variants = _check_arguments(
        variants=variants,
        tuner=tuner,
        lr_min=lr_min,
        lr_max=lr_max,
        trials=trials,
        epochs=epochs,
        executions_per_trial=executions_per_trial,
        train_fraction=train_fraction,
        validation_fraction=validation_fraction,
        batch_size=batch_size,
        project_name=project_name,
        strategy=strategy,
        converged_accuracy=converged_accuracy,
        dataset=dataset,
    )
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"Argument `seed` must be a non-negative integer; received seed={seed!r}.")
    if verbose not in (0, 1, 2):
        raise ValueError(f"Argument `verbose` must be 0, 1 or 2; received verbose={verbose!r}.")
    if tuner == "bayesian" and not all(importlib.util.find_spec(m) for m in ("scipy", "sklearn")):
        raise ImportError(
            "tuner='bayesian' needs SciPy and scikit-learn (Keras Tuner's BayesianOptimization): "
            "pip install 'keras-tuner[bayesian]'."
        )
    role = _tuner_role()

    from tfbn.distribute import get_strategy, resolve_strategy_name

    strategy_name = resolve_strategy_name(strategy)
    if strategy_name == "multi_worker":
        raise ValueError(
            "Argument `strategy='auto'` resolves to 'multi_worker' here (TF_CONFIG names several "
            "workers), which tuning does not support; pass another strategy."
        )

    train_data = validation_data = None
    if role != "chief":
        if dataset is None:
            from tfbn.data import load_fashion_mnist

            dataset = load_fashion_mnist(
                batch_size,
                data_dir=data_dir,
                validation_fraction=validation_fraction,
                train_fraction=train_fraction,
                seed=seed,
            )
            data = _describe_data(dataset, train_fraction, validation_fraction)
        else:
            data = "prebuilt dataset"
        train_data, validation_data = dataset.train, dataset.validation
        if validation_data is None:
            raise ValueError("The dataset has no validation split; set `validation_fraction`.")
    else:
        data = (
            _describe_data(None, train_fraction, validation_fraction)
            if dataset is None
            else "prebuilt dataset"
        )

    distribution = None
    if role != "chief" and strategy_name != "default":
        distribution = get_strategy(strategy_name)

    settings = {
        "variants": list(variants),
        "tuner": tuner,
        "lr_min": float(lr_min),
        "lr_max": float(lr_max),
        "trials": trials,
        "epochs": epochs,
        "executions_per_trial": executions_per_trial,
        "train_fraction": float(train_fraction),
        "validation_fraction": float(validation_fraction),
        "tune_momentum": bool(tune_momentum),
        "batch_size": batch_size,
        "strategy": strategy_name,
        "seed": seed,
        "converged_accuracy": float(converged_accuracy),
        "data": data,
        "machine": _machine(),
        "objective": f"{OBJECTIVE} (last epoch; validation split of the training set)",
    }

    log_root = os.path.join(directory, f"{project_name}_logs")
    base_port = int(os.environ.get("KERASTUNER_ORACLE_PORT", "0") or 0)
    fit_verbose = 0 if verbose == 0 else (1 if verbose == 1 and _isatty() else 2)
    results: dict[str, VariantResult] = {}
    trials_run: dict[str, list[str]] = {}
    started = time.perf_counter()
    import keras

    for index, variant in enumerate(variants):
        if role != "single":
            # One oracle server per variant, each on its own port, so a worker can never report
            # to another variant's oracle.
            os.environ["KERASTUNER_ORACLE_PORT"] = str(base_port + index)
        try:
            hypermodel = _make_hypermodel(variant, lr_min, lr_max, tune_momentum, seed)
            variant_logs = os.path.join(log_root, variant)
            # The chief owns the projects: a worker never deletes anything, since with a shared
            # directory it would delete the chief's records or another worker's logs.
            if overwrite and role == "single" and os.path.isdir(variant_logs):
                shutil.rmtree(variant_logs)
            kt_tuner = _make_tuner(
                tuner,
                hypermodel,
                trials=trials,
                epochs=epochs,
                executions_per_trial=executions_per_trial,
                seed=seed,
                strategy=distribution,
                directory=directory,
                project=f"{project_name}_{variant}",
                overwrite=overwrite and role != "worker",
            )
            if role == "chief":
                # Serves trials to the workers until the budget is spent.
                kt_tuner.search(verbose=fit_verbose)
            else:
                callbacks = [
                    keras.callbacks.TensorBoard(
                        log_dir=variant_logs, write_graph=False, update_freq="epoch"
                    )
                ]
                kt_tuner.search(
                    train_data,
                    validation_data=validation_data,
                    epochs=epochs,
                    callbacks=callbacks,
                    verbose=fit_verbose,
                )
        finally:
            if role != "single":
                os.environ["KERASTUNER_ORACLE_PORT"] = str(base_port)
        trials_run[variant] = list(kt_tuner.trials_run)
        if role == "worker":
            # A worker sees only its own trials: the chief's oracle holds the others.
            records = [
                _record(tid, variant, hp, metrics, "COMPLETED", converged_accuracy, epochs)
                for tid, (hp, metrics) in kt_tuner.local_results.items()
            ]
            best = max(records, key=lambda t: t.val_accuracy or 0.0, default=None)
            results[variant] = _variant_result(
                variant, kt_tuner.project_dir, records, best.trial_id if best else None
            )
        else:
            results[variant] = _oracle_result(kt_tuner, variant, converged_accuracy, epochs)
    # Time of this call only: a resumed search does not count the trials of earlier calls.
    settings["elapsed_seconds_this_call"] = round(time.perf_counter() - started, 1)

    result = TuneResult(
        variants=results,
        settings=settings,
        role=role,
        trials_run=trials_run,
        log_dir=None if role == "chief" else log_root,
    )
    if role != "worker":
        stem = os.path.join(directory, project_name)
        result.json_path = f"{stem}_results.json"
        result.markdown_path = f"{stem}_results.md"
        result.plot_path = f"{stem}_val_accuracy.png"
        text = json.dumps(_json_ready(result.to_dict()), indent=2) + "\n"
        atomic_write_text(result.json_path, text)
        atomic_write_text(result.markdown_path, _markdown(result))
        _plot(result, result.plot_path)
        if verbose:
            print()
            print(result.table())
            print(f"\nTables: {result.markdown_path}, {result.json_path}; plot: {result.plot_path}")
    return result


def _isatty() -> bool:
    import sys

    return bool(getattr(sys.stdout, "isatty", lambda: False)())

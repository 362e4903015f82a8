"""The chapter's training recipe and the workflow's names, in one place for the CLI, the notebook
and the tests.

This module imports nothing heavy (no TensorFlow): the command line reads its defaults and choices
from here before it decides whether TensorFlow is needed at all.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from pathlib import Path
from typing import Any

from tfbn.utils.files import check_writable_dir

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NORMS: tuple[str, ...] = ("tfbn", "keras", "none")
STRATEGIES: tuple[str, ...] = ("auto", "default", "one_device", "mirrored", "multi_worker")
LOOPS: tuple[str, ...] = ("auto", "fit", "custom")
TUNERS: tuple[str, ...] = ("random", "bayesian", "hyperband")
DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
DATA_DIR_ENV = "TFBN_DATA_DIR"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Hyperparameters of the chapter's LeNet experiment.

    Attributes:
        learning_rate: SGD learning rate for LeNet with batch normalization.
        plain_learning_rate: SGD learning rate for LeNet without normalization.
        epochs: Number of passes over the training set.
        batch_size: Global batch size (split across replicas).
        momentum: Momentum of the BatchNorm moving averages.
        epsilon: Variance epsilon of BatchNorm.
        drop_remainder: Whether each training epoch leaves out the short last batch of its
            permutation (96 examples at batch 256), so that every step normalizes a full batch.
            The examples left out differ from epoch to epoch. With the short batch kept, it is
            always an epoch's last step, right before the evaluation: over six seeds its
            normalization from 96 examples made the test accuracy at lr 1.0 swing more.
    """

    learning_rate: float = 1.0
    plain_learning_rate: float = 0.9
    epochs: int = 10
    batch_size: int = 256
    momentum: float = 0.9
    epsilon: float = 1e-5
    drop_remainder: bool = True

    def lr_for(self, norm: str) -> float:
        """The default learning rate for a LeNet variant (`"tfbn"`, `"keras"` or `"none"`)."""
        return self.plain_learning_rate if norm == "none" else self.learning_rate


RECIPE = Recipe()


def _is_int(value) -> bool:
    # NumPy integers count (a seed read from an array); bools do not.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _refuse(name: str, value, expected: str) -> None:
    """Raises the ValueError of argument `name`."""
    raise ValueError(f"Argument `{name}` must be {expected}; received {name}={value!r}.")


def _check_verbose(value) -> None:
    """`verbose` must be 0, 1 or 2 (Keras's meaning; a bool is refused), else a ValueError."""
    if value not in (0, 1, 2) or isinstance(value, bool):
        _refuse("verbose", value, "0, 1 or 2")


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    """Argument `name` must be one of `choices`, else a ValueError naming them."""
    if value not in choices:
        _refuse(name, value, f"one of {choices}")


def _check_flags(config, names: tuple[str, ...]) -> None:
    """Each attribute of `config` named in `names` must be a bool, else a ValueError naming it."""
    for name in names:
        if not isinstance(getattr(config, name), bool):
            _refuse(name, getattr(config, name), "True or False")


def _set_positive_ints(config, names: tuple[str, ...]) -> None:
    """Each attribute of the frozen dataclass `config` named in `names` must be a positive
    integer (NumPy's count, bools do not) and is stored as a Python int; else a ValueError
    naming the first that is not."""
    for name in names:
        value = getattr(config, name)
        if not _is_int(value) or value <= 0:
            _refuse(name, value, "a positive integer")
        object.__setattr__(config, name, int(value))


def defaults(config_class) -> dict[str, Any]:
    """The defaults of a config dataclass (`TrainConfig`, `TuneConfig`) by field name, e.g. for
    the command line's defaults."""
    return {field.name: field.default for field in dataclasses.fields(config_class)}


MAX_SEED = 2**32 - 1  # NumPy's legacy seeding, which `keras.utils.set_random_seed` uses


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The settings of one `tfbn.train` run, each checked when the object is made.

    Creating it touches nothing on disk and imports nothing heavy (a `tf.distribute.Strategy`
    passed as `strategy` is the exception: it implies TensorFlow). The folders are only named
    here; `tfbn.train` checks they can be written before any work. See `tfbn.train` for what
    each setting does.

    Attributes:
        norm: One of `NORMS`.
        epochs: Total epochs of the run, a positive integer.
        batch_size: Global batch size, a positive integer.
        learning_rate: SGD learning rate, positive and finite; `None` becomes
            `RECIPE.lr_for(norm)`.
        seed: An integer in `[0, 2**32 - 1]`, or `None` (drawn once and recorded in the run dir).
        strategy: One of `STRATEGIES`, or a `tf.distribute.Strategy`.
        loop: One of `LOOPS`.
        run_dir: The run folder, a `pathlib.Path`; `None` becomes `runs/lenet_<norm>`.
        data_dir: Folder of the Fashion-MNIST IDX files, or `None` (see `tfbn.workflow.data`).
        train_fraction: Fraction of the training set, in `(0, 1]`.
        drop_remainder: Whether each training epoch has full batches only.
        recalibrate: Whether to recompute the population statistics after training.
        export: Whether to export a SavedModel.
        export_dir: Parent folder of the export, a `pathlib.Path`.
        export_name: Model name of the export.
        jit_compile: Whether to compile the training step with XLA.
        verbose: 0, 1 or 2, as in Keras.

    Raises:
        ValueError: naming the first argument that is out of range or of the wrong type.
    """

    norm: str = "tfbn"
    epochs: int = RECIPE.epochs
    batch_size: int = RECIPE.batch_size
    learning_rate: float | None = None
    seed: int | None = None
    strategy: Any = "auto"
    loop: str = "auto"
    run_dir: Path | None = None
    data_dir: Path | None = None
    train_fraction: float = 1.0
    drop_remainder: bool = RECIPE.drop_remainder
    recalibrate: bool = True
    export: bool = True
    export_dir: Path = Path("saved_models")
    export_name: str = "lenet"
    jit_compile: bool = False
    verbose: int = 1

    def __post_init__(self) -> None:
        self._check_choices()
        self._check_numbers()
        _check_flags(self, ("drop_remainder", "recalibrate", "export", "jit_compile"))
        if not isinstance(self.export_name, str) or not self.export_name:
            _refuse("export_name", self.export_name, "a non-empty string")
        run_dir = Path("runs") / f"lenet_{self.norm}" if self.run_dir is None else self.run_dir
        # Frozen: the normalized values are set once, here.
        object.__setattr__(self, "run_dir", Path(run_dir))
        object.__setattr__(self, "export_dir", Path(self.export_dir))
        if self.data_dir is not None:
            object.__setattr__(self, "data_dir", Path(self.data_dir))

    def check_outputs(self) -> None:
        """The run folder (and the export folder, with `export`) can be written; creates nothing.

        Raises:
            OSError: the error writing there would raise (read-only, not a folder, no
                permission), naming the folder that refused.
        """
        check_writable_dir(self.run_dir)
        if self.export:
            check_writable_dir(self.export_dir)

    def _check_choices(self) -> None:
        _check_verbose(self.verbose)
        _check_choice("norm", self.norm, NORMS)
        _check_choice("loop", self.loop, LOOPS)
        expected = f"one of {STRATEGIES} or a tf.distribute.Strategy"
        if isinstance(self.strategy, str):
            if self.strategy not in STRATEGIES:
                _refuse("strategy", self.strategy, expected)
        else:
            import tensorflow as tf

            if not isinstance(self.strategy, tf.distribute.Strategy):
                _refuse("strategy", self.strategy, expected)
        if self.loop == "fit" and self.strategy == "multi_worker":
            raise ValueError(
                "Argument `loop`: loop='fit' does not work with strategy='multi_worker' in Keras 3 "
                "(keras-team/keras#20585); use loop='custom' or 'auto'."
            )

    def _check_numbers(self) -> None:
        _set_positive_ints(self, ("epochs", "batch_size"))
        rate = RECIPE.lr_for(self.norm) if self.learning_rate is None else self.learning_rate
        if not _is_real(rate) or not math.isfinite(rate) or rate <= 0:
            _refuse("learning_rate", self.learning_rate, "a positive finite number")
        object.__setattr__(self, "learning_rate", float(rate))
        if self.seed is not None:
            if not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
                _refuse("seed", self.seed, f"an integer in [0, {MAX_SEED}] or None")
            object.__setattr__(self, "seed", int(self.seed))
        fraction = self.train_fraction
        if not _is_real(fraction) or not 0.0 < fraction <= 1.0:
            _refuse("train_fraction", fraction, "in (0, 1]")
        object.__setattr__(self, "train_fraction", float(fraction))


CONVERGED_ACCURACY = 0.8


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    """The settings of one `tfbn.tune` search, each checked when the object is made.

    Creating it touches nothing on disk and imports nothing heavy; `tfbn.tune` checks that
    `directory` can be written before any work. See `tfbn.tune` for what each setting does.

    Attributes:
        variants: LeNet variants to search, a tuple of distinct `NORMS` (a comma-separated
            string is split).
        tuner: One of `TUNERS`.
        learning_rate_min: Lower end of the learning-rate range, positive and finite.
        learning_rate_max: Upper end of the learning-rate range, finite and above
            `learning_rate_min`.
        trials: Trials per variant, a positive integer.
        epochs: Epochs per trial, a positive integer.
        executions_per_trial: Trainings per trial, a positive integer.
        train_fraction: Fraction of the training set to use, in `(0, 1]`.
        validation_fraction: Fraction of the training set held out for the objective, in `(0, 1)`.
        tune_momentum: Whether the SGD momentum is searched too.
        batch_size: Global batch size, a positive integer.
        directory: Folder of the tuner projects, tables, plot and logs, a `pathlib.Path`.
        project_name: Prefix of the project and file names, a non-empty name without `/`.
        overwrite: Whether every project starts afresh.
        strategy: One of `STRATEGIES` except `"multi_worker"`.
        seed: Seed of the oracles and weights, an integer in `[0, 2**32 - 1]`.
        data_dir: Folder of the Fashion-MNIST IDX files, or `None` (see `tfbn.workflow.data`).
        verbose: 0, 1 or 2, as in Keras.
        converged_accuracy: Validation accuracy from which a trial counts as converged, in
            `[0, 1]`.

    Raises:
        ValueError: naming the first argument that is out of range or of the wrong type.
    """

    variants: tuple[str, ...] = NORMS
    tuner: str = "random"
    learning_rate_min: float = 0.01
    learning_rate_max: float = 10.0
    trials: int = 10
    epochs: int = 2
    executions_per_trial: int = 1
    train_fraction: float = 1.0
    validation_fraction: float = 0.1
    tune_momentum: bool = False
    batch_size: int = 256
    directory: Path = Path("runs/tune")
    project_name: str = "lenet_lr"
    overwrite: bool = False
    strategy: str = "auto"
    seed: int = 0
    data_dir: Path | None = None
    verbose: int = 1
    converged_accuracy: float = CONVERGED_ACCURACY

    def __post_init__(self) -> None:
        object.__setattr__(self, "variants", _tune_variants(self.variants))
        self._check_choices()
        self._check_learning_rates()
        _set_positive_ints(self, ("trials", "epochs", "executions_per_trial", "batch_size"))
        self._check_fractions()
        if not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            _refuse("seed", self.seed, f"an integer in [0, {MAX_SEED}]")
        name = self.project_name
        if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
            _refuse("project_name", name, "a non-empty name without '/'")
        _check_flags(self, ("tune_momentum", "overwrite"))
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "directory", Path(self.directory))
        if self.data_dir is not None:
            object.__setattr__(self, "data_dir", Path(self.data_dir))

    def check_outputs(self) -> None:
        """The search folder `directory` can be written; creates nothing.

        Raises:
            OSError: the error writing there would raise, naming the folder that refused.
        """
        check_writable_dir(self.directory)

    def _check_choices(self) -> None:
        _check_verbose(self.verbose)
        _check_choice("tuner", self.tuner, TUNERS)
        _check_choice("strategy", self.strategy, STRATEGIES)
        if self.strategy == "multi_worker":
            raise ValueError(
                "Argument `strategy='multi_worker'` is not supported for tuning (Keras's fit fails "
                "under MultiWorkerMirroredStrategy); spread trials over machines with distributed "
                "tuning instead (KERASTUNER_* variables, see tfbn.workflow.tuning)."
            )

    def _check_learning_rates(self) -> None:
        for name in ("learning_rate_min", "learning_rate_max"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value):
                _refuse(name, value, "a finite number")
            object.__setattr__(self, name, float(value))
        low, high = self.learning_rate_min, self.learning_rate_max
        if low <= 0:
            _refuse("learning_rate_min", low, "positive (the range is searched on a log scale)")
        if high <= low:
            raise ValueError(
                "Arguments `learning_rate_min` < `learning_rate_max` must give a non-empty range; "
                f"received learning_rate_min={low}, learning_rate_max={high}."
            )

    def _check_fractions(self) -> None:
        ranges = (
            ("train_fraction", "in (0, 1]", lambda v: 0.0 < v <= 1.0),
            ("validation_fraction", "in (0, 1) (a validation split of the training set is the "
             "objective)", lambda v: 0.0 < v < 1.0),
            ("converged_accuracy", "in [0, 1]", lambda v: 0.0 <= v <= 1.0),
        )  # fmt: skip
        for name, expected, inside in ranges:
            value = getattr(self, name)
            if not _is_real(value) or not inside(value):
                _refuse(name, value, expected)
            object.__setattr__(self, name, float(value))


def _tune_variants(variants) -> tuple[str, ...]:
    """`variants` as a tuple of distinct `NORMS` (a comma-separated string is split)."""
    if isinstance(variants, str):
        variants = [v for v in variants.split(",") if v]
    variants = tuple(variants)
    if not variants:
        _refuse("variants", variants, f"one or more of {NORMS}")
    for variant in variants:
        if variant not in NORMS:
            raise ValueError(
                f"Argument `variants` must contain only {NORMS}; received {variant!r} in "
                f"variants={variants!r}."
            )
    if len(set(variants)) != len(variants):
        _refuse("variants", variants, "without duplicates")
    return variants

"""`tfbn tune`: `tfbn.tune` from the command line."""

from __future__ import annotations

import argparse

from tfbn.cli.options import (
    add_batch_size,
    add_data_dir,
    add_run_dir,
    add_seed,
    add_strategy,
    add_switch,
    add_train_fraction,
)
from tfbn.workflow.config import (
    NORMS,
    STRATEGIES,
    TUNERS,
    TuneConfig,
    defaults,
)

# The defaults of `tfbn.tune`, from the one place that holds them.
_DEFAULTS = defaults(TuneConfig)

HELP = "search learning rates with Keras Tuner, with and without BatchNorm"
DESCRIPTION = (
    "Search the SGD learning rate of LeNet per batch-norm variant with Keras Tuner, scored by "
    "the accuracy on a validation split of the training set. Running the same command again "
    "continues the search; a second search on the same --run-dir is refused while one runs. "
    "Distributed tuning: see `tfbn.workflow.tuning` (KERASTUNER_* variables; bind the chief to "
    "a private "
    "address, its gRPC port is unauthenticated)."
)


def configure(parser: argparse.ArgumentParser) -> None:
    """Adds the `tfbn tune` arguments."""
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(_DEFAULTS["variants"]),
        metavar="VARIANT",
        help=f"LeNet variants to search (space- or comma-separated), from {', '.join(NORMS)} "
        "(default: all)",
    )
    parser.add_argument(
        "--tuner", choices=TUNERS, default=_DEFAULTS["tuner"], help="search algorithm"
    )
    for name, extreme in (("learning_rate_min", "smallest"), ("learning_rate_max", "largest")):
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=float,
            default=_DEFAULTS[name],
            help=f"{extreme} learning rate",
        )
    parser.add_argument(
        "--trials", type=int, default=_DEFAULTS["trials"], help="trials per variant"
    )
    parser.add_argument("--epochs", type=int, default=_DEFAULTS["epochs"], help="epochs per trial")
    parser.add_argument(
        "--executions-per-trial",
        type=int,
        default=_DEFAULTS["executions_per_trial"],
        help="trainings per trial",
    )
    add_train_fraction(parser, _DEFAULTS["train_fraction"])
    parser.add_argument(
        "--validation-fraction",
        type=float,
        default=_DEFAULTS["validation_fraction"],
        help="fraction of the training set held out for the objective",
    )
    add_switch(
        parser, "--tune-momentum", _DEFAULTS["tune_momentum"], "also search the SGD momentum"
    )
    add_batch_size(parser, _DEFAULTS["batch_size"], "global batch size")
    add_run_dir(parser, _DEFAULTS["directory"], "folder of the tuner projects, tables and plot")
    parser.add_argument(
        "--project-name", default=_DEFAULTS["project_name"], help="project name prefix"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="start afresh instead of continuing the search"
    )
    add_strategy(parser, _DEFAULTS["strategy"], [s for s in STRATEGIES if s != "multi_worker"])
    add_seed(parser, _DEFAULTS["seed"], "seed of the oracles and weights")
    add_data_dir(parser)


def _settings(args: argparse.Namespace) -> dict:
    """The `tfbn.tune` keywords of the parsed options (those of `TuneConfig` by the same names)."""
    return dict(
        variants=[variant for item in args.variants for variant in item.split(",") if variant],
        tuner=args.tuner,
        learning_rate_min=args.learning_rate_min,
        learning_rate_max=args.learning_rate_max,
        trials=args.trials,
        epochs=args.epochs,
        executions_per_trial=args.executions_per_trial,
        train_fraction=args.train_fraction,
        validation_fraction=args.validation_fraction,
        tune_momentum=args.tune_momentum,
        batch_size=args.batch_size,
        directory=args.run_dir,
        project_name=args.project_name,
        overwrite=args.overwrite,
        strategy=args.strategy,
        seed=args.seed,
        data_dir=args.data_dir,
        verbose=args.verbose,
    )


def check(args: argparse.Namespace) -> None:
    """The settings and the search folder, checked as `tfbn.tune` will (TensorFlow-free)."""
    TuneConfig(**_settings(args)).check_outputs()


def run(args: argparse.Namespace) -> int:
    """Runs `tfbn.tune` with the parsed arguments."""
    from tfbn.workflow.tuning import tune

    settings = _settings(args)
    result = tune(settings.pop("variants"), **settings)
    if args.verbose == 0 and result.role != "worker":
        print(result.table())
    return 0

"""`tfbn tune`: `tfbn.tune` from the command line."""

from __future__ import annotations

import argparse

from tfbn.config import DATA_DIR_ENV, DEFAULT_DATA_DIR, NORMS, STRATEGIES, TUNERS

HELP = "search learning rates with Keras Tuner, with and without BatchNorm"
DESCRIPTION = (
    "Search the SGD learning rate of LeNet per batch-norm variant with Keras Tuner, scored by "
    "the accuracy on a validation split of the training set. Running the same command again "
    "continues the search. Distributed tuning: see `tfbn.tuning` (KERASTUNER_* variables)."
)


def configure(parser: argparse.ArgumentParser) -> None:
    """Adds the `tfbn tune` arguments."""
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(NORMS),
        metavar="VARIANT",
        help=f"LeNet variants to search (space- or comma-separated), from {', '.join(NORMS)} "
        "(default: all)",
    )
    parser.add_argument("--tuner", choices=TUNERS, default="random", help="search algorithm")
    parser.add_argument(
        "--learning-rate-min", type=float, default=0.01, help="smallest learning rate"
    )
    parser.add_argument(
        "--learning-rate-max", type=float, default=10.0, help="largest learning rate"
    )
    parser.add_argument("--trials", type=int, default=10, help="trials per variant")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per trial")
    parser.add_argument("--executions-per-trial", type=int, default=1, help="trainings per trial")
    parser.add_argument(
        "--train-fraction", type=float, default=1.0, help="fraction of the training set to use"
    )
    parser.add_argument(
        "--validation-fraction",
        type=float,
        default=0.1,
        help="fraction of the training set held out for the objective",
    )
    parser.add_argument(
        "--tune-momentum",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also search the SGD momentum",
    )
    parser.add_argument("--batch-size", type=int, default=256, help="global batch size")
    parser.add_argument(
        "--run-dir", default="runs/tune", help="folder of the tuner projects, tables and plot"
    )
    parser.add_argument("--project-name", default="lenet_lr", help="project name prefix")
    parser.add_argument(
        "--overwrite", action="store_true", help="start afresh instead of continuing the search"
    )
    parser.add_argument(
        "--strategy", default="auto", choices=STRATEGIES, help="tf.distribute strategy"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the oracles and weights")
    parser.add_argument(
        "--data-dir",
        default=None,
        help=f"folder with the four Fashion-MNIST IDX files (default: ${DATA_DIR_ENV}, else "
        f"{DEFAULT_DATA_DIR})",
    )


def run(args: argparse.Namespace) -> int:
    """Runs `tfbn.tune` with the parsed arguments."""
    from tfbn.tuning import tune

    result = tune(
        [variant for item in args.variants for variant in item.split(",") if variant],
        tuner=args.tuner,
        lr_min=args.learning_rate_min,
        lr_max=args.learning_rate_max,
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
    if args.verbose == 0 and result.role != "worker":
        print(result.table())
    return 0

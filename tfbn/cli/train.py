"""`tfbn train`: `tfbn.train` from the command line."""

from __future__ import annotations

import argparse

from tfbn.cli import PARSER_NAMES
from tfbn.cli.options import (
    add_batch_size,
    add_data_dir,
    add_export_dir,
    add_jit_compile,
    add_run_dir,
    add_seed,
    add_strategy,
    add_switch,
    add_train_fraction,
    keywords,
)
from tfbn.workflow.config import LOOPS, NORMS, RECIPE, TrainConfig, defaults

# The defaults of `tfbn.train`, from the one place that holds them.
_DEFAULTS = defaults(TrainConfig)

HELP = "train LeNet with BatchNorm on Fashion-MNIST and export it"
DESCRIPTION = (
    "Train the chapter's LeNet on Fashion-MNIST (SGD, the chapter's recipe by default), "
    "recompute the BatchNorm population statistics, and export an inference SavedModel. "
    "The run folder resumes: the same command after an interruption continues after the last "
    "finished epoch."
)


def configure(parser: argparse.ArgumentParser) -> None:
    """Adds the `tfbn train` arguments."""
    parser.add_argument(
        "--norm", default=_DEFAULTS["norm"], choices=NORMS, help="batch normalization"
    )
    parser.add_argument("--epochs", type=int, default=_DEFAULTS["epochs"], help="number of epochs")
    add_batch_size(parser, _DEFAULTS["batch_size"], "global batch size")
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help=f"SGD learning rate (default: {RECIPE.learning_rate:g} with BatchNorm, "
        f"{RECIPE.plain_learning_rate:g} without)",
    )
    add_seed(
        parser,
        None,
        "seed of the weights and the data order (default: drawn at random and recorded in the "
        "run folder)",
    )
    add_strategy(parser, _DEFAULTS["strategy"])
    parser.add_argument(
        "--loop",
        default=_DEFAULTS["loop"],
        choices=LOOPS,
        help="Keras fit or a custom strategy.run loop; auto: custom under multi_worker, else fit",
    )
    add_run_dir(parser, None, "run folder, reused to resume (default: runs/lenet_<norm>)")
    add_data_dir(parser)
    add_train_fraction(parser, _DEFAULTS["train_fraction"])
    add_switch(
        parser,
        "--drop-remainder",
        _DEFAULTS["drop_remainder"],
        "leave the short last batch out of every training epoch",
    )
    add_switch(
        parser,
        "--recalibrate",
        _DEFAULTS["recalibrate"],
        "recompute the BatchNorm population statistics after training",
    )
    add_switch(parser, "--export", _DEFAULTS["export"], "export an inference SavedModel")
    add_export_dir(parser, _DEFAULTS["export_dir"], "parent folder of the SavedModel export")
    add_jit_compile(parser, _DEFAULTS["jit_compile"], "compile the training step with XLA")


def _keywords(args: argparse.Namespace) -> dict:
    """Every option but --norm (passed by position): a `tfbn.train` keyword of the same name."""
    passed = [name for name in vars(args) if name not in (*PARSER_NAMES, "norm")]
    return keywords(args, *passed)


def check(args: argparse.Namespace) -> None:
    """The settings and the output folders, checked as `tfbn.train` will (TensorFlow-free)."""
    TrainConfig(args.norm, **_keywords(args)).check_outputs()


def run(args: argparse.Namespace) -> int:
    """Runs `tfbn.train` with the parsed arguments."""
    from tfbn.workflow.training import train

    result = train(args.norm, **_keywords(args))
    if args.verbose == 0:
        print(result.summary())
    return 0

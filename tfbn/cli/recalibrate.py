"""`tfbn recalibrate`: `tfbn.workflow.model_files.recalibrate_file` from the command line."""

from __future__ import annotations

import argparse

from tfbn.cli.options import (
    add_batch_size,
    add_data_arguments,
    add_data_dir,
    add_keras_model,
    add_strategy,
    check_data_arguments,
    keywords,
)

HELP = "recompute the BatchNorm population statistics of a model"


def configure(parser: argparse.ArgumentParser) -> None:
    """Adds the `tfbn recalibrate` arguments."""
    add_keras_model(parser)
    parser.add_argument(
        "--output",
        default=None,
        help="where to save the recalibrated model (.keras) (default: MODEL with "
        "'.recalibrated' before the extension)",
    )
    add_data_arguments(
        parser,
        required=False,
        help="the inputs to take the statistics over, labels not needed (default: "
        "Fashion-MNIST's training split)",
    )
    add_data_dir(parser)
    add_batch_size(parser, 512, "batch size of the statistics passes")
    parser.add_argument(
        "--steps", type=int, default=None, help="batches per pass (default: all the data)"
    )
    add_strategy(parser, "auto")
    parser.add_argument(
        "--mode",
        default="exact",
        choices=("exact", "fast"),
        help="exact: layer by layer, a pass per level of batch-norm layers; fast: one pass for all",
    )


def check(args: argparse.Namespace) -> None:
    """The input model, a given output and the data, checked as `recalibrate_file` will
    (TensorFlow-free)."""
    from tfbn.utils.saving import check_keras_file, check_keras_output

    check_keras_file(args.model)
    if args.output:
        check_keras_output(args.output)
    check_data_arguments(args)


def run(args: argparse.Namespace) -> int:
    """Runs `recalibrate_file` with the parsed arguments."""
    from tfbn.workflow.model_files import recalibrate_file

    passed = ("data", "rescale", "data_dir", "tfds_dir", "batch_size", "steps", "strategy")
    passed = (*passed, "mode", "verbose")
    output = recalibrate_file(args.model, args.output, **keywords(args, *passed))
    if args.verbose == 0:
        print(output)
    return 0

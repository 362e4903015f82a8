"""`tfbn convert`: `tfbn.tools.conversion.convert_file` from the command line."""

from __future__ import annotations

import argparse

from tfbn.cli.options import add_keras_model

HELP = "replace every keras.layers.BatchNormalization of a saved model by tfbn.BatchNorm"
EPILOG = (
    "The model must be Sequential or functional (a subclassed model's layers live in its code). "
    "Everything else is kept: names, weights, moving statistics, trainable flags. The output "
    "is saved uncompiled and loads without custom_objects once tfbn is installed."
)


def configure(parser: argparse.ArgumentParser) -> None:
    """Adds the `tfbn convert` arguments."""
    add_keras_model(parser, "the model to convert, a .keras file")
    parser.add_argument("output", help="where to save the converted model (.keras)")


def check(args: argparse.Namespace) -> None:
    """The input model and the output's folder, checked as `convert_file` will (TensorFlow-free)."""
    from tfbn.utils.saving import check_keras_file, check_keras_output

    check_keras_file(args.model)
    check_keras_output(args.output)


def run(args: argparse.Namespace) -> int:
    """Runs `convert_file` with the parsed arguments."""
    from tfbn.tools.conversion import convert_file

    output = convert_file(args.model, args.output, verbose=int(args.verbose > 0))
    if args.verbose == 0:
        print(output)
    return 0

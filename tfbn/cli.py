"""The `tfbn` command line: a thin shell over the Python API.

Each subcommand lives in the module that implements it; that module provides
`configure_parser(parser)` (adds its arguments) and `run_cli(args) -> int` (one call into the API).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# (subcommand, module, one-line help)
COMMANDS: list[tuple[str, str, str]] = [
    (
        "train",
        "tfbn.training",
        "train LeNet with BatchNorm on Fashion-MNIST and export it",
    ),
    (
        "recalibrate",
        "tfbn.recalibration",
        "recompute the BatchNorm population statistics of a model",
    ),
    ("export", "tfbn.export", "export a trained .keras model as an inference-only SavedModel"),
    ("predict", "tfbn.serving", "classify images with an exported SavedModel"),
    ("tune", "tfbn.tuning", "search learning rates with Keras Tuner, with and without BatchNorm"),
    ("bench", "tfbn.bench", "benchmark tfbn.BatchNorm against keras.layers.BatchNormalization"),
    ("demo", "tfbn.demo", "show the batch-norm op and layer on a small tensor"),
]


def build_parser() -> argparse.ArgumentParser:
    from tfbn import __version__

    parser = argparse.ArgumentParser(
        prog="tfbn",
        description="Batch normalization for Keras 3 / TensorFlow: train, recalibrate, export, "
        "serve and tune LeNet with BatchNorm on Fashion-MNIST.",
    )
    parser.add_argument("--version", action="version", version=f"tfbn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name, help_text in COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.configure_parser(sub_parser)
        sub_parser.set_defaults(_run=module.run_cli)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except ValueError as error:
        # Bad input is reported as one line, before any expensive work starts.
        print(f"tfbn {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""`tfbn inspect`: `tfbn.inspect` on a saved model and the user's data, from the command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tfbn.cli.options import (
    add_batch_size,
    add_data_arguments,
    add_keras_model,
    check_data_arguments,
)

HELP = "check a model's BatchNorm statistics against data (exit 1 if a layer is off)"
EPILOG = (
    "Each batch-norm layer's moving mean and variance are compared, channel by channel, with the "
    "population statistics of the input it receives on --data, the batch norms before it "
    "normalizing with batch statistics as in training. The table and a one-line verdict are "
    "printed. Exit code: 0 when no layer is flagged, 1 when one is, 2 on an error."
)

EXIT_FLAGGED = 1


def configure(parser: argparse.ArgumentParser) -> None:
    """Adds the `tfbn inspect` arguments."""
    add_keras_model(parser, "the model to inspect, a .keras file")
    add_data_arguments(
        parser,
        required=False,  # required: `check` says so in the command's own words
        help="the data to compare the statistics with, required (no default); with labels, the "
        "accuracy is reported too",
    )
    add_batch_size(parser, 32, "batch size of the pass (the batch statistics' size)")
    parser.add_argument(
        "--mean-threshold",
        type=float,
        default=1.0,
        help="flag a layer whose moving mean is this many population stds off on a channel",
    )
    parser.add_argument(
        "--variance-threshold",
        type=float,
        default=4.0,
        help="flag a layer whose moving variance is off by this factor (either way) on a channel",
    )
    parser.add_argument(
        "--output", default=None, help="write the report as JSON to this file (default: none)"
    )
    parser.add_argument(
        "--plot", default=None, help="draw the report as a PNG to this file (default: none)"
    )


def _check_output(path: str | None, suffix: str, name: str) -> None:
    from tfbn.utils.files import check_writable_dir

    if path is None:
        return
    if Path(path).suffix.lower() != suffix:
        raise ValueError(f"Argument `{name}` must end in '{suffix}'; received {name}='{path}'.")
    if Path(path).is_dir():
        raise IsADirectoryError(21, "Is a directory", path)
    check_writable_dir(Path(path).parent)


def check(args: argparse.Namespace) -> None:
    """The model file, the data, the thresholds and the outputs' folders (TensorFlow-free)."""
    from tfbn.utils.arguments import check_count
    from tfbn.utils.saving import check_keras_file

    check_keras_file(args.model)
    if args.data is None:
        raise ValueError("Argument `data` is required: give --data PATH, the data to inspect on.")
    check_data_arguments(args)
    check_count("batch_size", args.batch_size)
    if not args.mean_threshold > 0:
        raise ValueError(
            f"Argument `mean_threshold` must be > 0; received mean_threshold={args.mean_threshold}."
        )
    if not args.variance_threshold > 1:
        raise ValueError(
            "Argument `variance_threshold` must be > 1; received "
            f"variance_threshold={args.variance_threshold}."
        )
    _check_output(args.output, ".json", "output")
    _check_output(args.plot, ".png", "plot")


def run(args: argparse.Namespace) -> int:
    """Loads the model and the data, inspects, prints the report and writes the outputs."""
    from tfbn.tools.inspect import inspect
    from tfbn.utils.files import atomic_write_text
    from tfbn.utils.saving import load_model
    from tfbn.workflow.user_data import load_user_data

    model = load_model(args.model)
    if len(model.inputs) != 1:
        raise ValueError(
            f"Model '{model.name}' takes {len(model.inputs)} inputs; `tfbn inspect` reads --data "
            "for a model with one input (use tfbn.inspect from Python)."
        )
    x, y = load_user_data(
        args.data,
        input_shape=model.inputs[0].shape[1:],
        rescale=args.rescale,
        tfds_dir=args.tfds_dir,
    )
    report = inspect(
        model,
        x if y is None else (x, y),
        batch_size=args.batch_size,
        mean_threshold=args.mean_threshold,
        variance_threshold=args.variance_threshold,
        verbose=args.verbose,
    )
    print(repr(report), flush=True)
    result = report.to_dict()
    if args.output:
        atomic_write_text(args.output, json.dumps(result, indent=2, allow_nan=False) + "\n")
    if args.plot:
        from tfbn.workflow.plots import inspect_report

        inspect_report(result, args.plot)
    return EXIT_FLAGGED if report.flagged else 0

"""The arguments several `tfbn` commands share, each defined once (TensorFlow-free).

A command's `configure(parser)` calls these with its own default and, where the meaning differs
by command, its own help; the flag's spelling, type and choices live here alone.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from tfbn.workflow.config import DATA_DIR_ENV, DEFAULT_DATA_DIR, STRATEGIES


def keywords(args: argparse.Namespace, *names: str) -> dict:
    """`{name: args.name}` for `names`: the parsed options a command passes on as they are."""
    return {name: getattr(args, name) for name in names}


def add_switch(parser: argparse.ArgumentParser, flag: str, default: bool, help: str) -> None:
    """`flag` and its `--no-` form: a boolean (argparse's `BooleanOptionalAction`)."""
    parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help)


def add_keras_model(parser: argparse.ArgumentParser, help: str = "trained model file (.keras)"):
    """The positional `model`: a `.keras` file to read."""
    parser.add_argument("model", help=help)


def add_data_dir(parser: argparse.ArgumentParser) -> None:
    """`--data-dir`: the folder of the four Fashion-MNIST IDX files."""
    parser.add_argument(
        "--data-dir",
        default=None,
        help=f"folder with the four Fashion-MNIST IDX files (default: ${DATA_DIR_ENV}, else "
        f"{DEFAULT_DATA_DIR})",
    )


def add_export_dir(
    parser: argparse.ArgumentParser, default: str, help: str = "parent folder of the exports"
) -> None:
    """`--export-dir`: the folder that holds one folder per exported model name."""
    parser.add_argument("--export-dir", default=str(default), help=help)


def add_strategy(
    parser: argparse.ArgumentParser,
    default: str,
    choices: Sequence[str] = STRATEGIES,
    help: str = "tf.distribute strategy",
) -> None:
    """`--strategy`: a `tfbn.workflow.distribute` strategy name."""
    parser.add_argument("--strategy", default=default, choices=list(choices), help=help)


def add_batch_size(parser: argparse.ArgumentParser, default: int, help: str) -> None:
    """`--batch-size`: a (global) batch size."""
    parser.add_argument("--batch-size", type=int, default=default, help=help)


def add_seed(parser: argparse.ArgumentParser, default: int | None, help: str) -> None:
    """`--seed`: a random seed."""
    parser.add_argument("--seed", type=int, default=default, help=help)


def add_jit_compile(parser: argparse.ArgumentParser, default: bool, help: str) -> None:
    """`--jit-compile` / `--no-jit-compile`: XLA compilation."""
    add_switch(parser, "--jit-compile", default, help)


def add_run_dir(parser: argparse.ArgumentParser, default: str | None, help: str) -> None:
    """`--run-dir`: the folder a command keeps its state in (and resumes from)."""
    parser.add_argument("--run-dir", default=None if default is None else str(default), help=help)


def add_train_fraction(parser: argparse.ArgumentParser, default: float) -> None:
    """`--train-fraction`: the fraction of Fashion-MNIST's training set to use."""
    parser.add_argument(
        "--train-fraction", type=float, default=default, help="fraction of the training set to use"
    )


def _number(text: str) -> float:
    """A float, or a fraction `a/b` (e.g. `1/255`)."""
    try:
        top, _, bottom = text.partition("/")
        return float(top) / float(bottom) if bottom else float(top)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(
            f"expected a number or a fraction such as 1/255; received {text!r}"
        ) from None


def add_data_arguments(parser: argparse.ArgumentParser, *, required: bool, help: str) -> None:
    """`--data PATH` (the user's data, `tfbn.workflow.user_data`), `--rescale` and `--tfds-dir`.

    Args:
        parser: The command's parser.
        required: Whether `--data` must be given.
        help: What the command does with the data, with its default in words if it has one
            (else `(default: none)` is appended); the kinds of `PATH` are appended.
    """
    parser.add_argument(
        "--data",
        metavar="PATH",
        required=required,
        default=None,
        help=f"{help}: a .npy file of inputs, a .npz file with x (and integer labels y), a folder "
        "of images (one subfolder per class; resized to the model's input size, pixel values "
        "0-255), or tfds:NAME:SPLIT (a prepared TensorFlow Datasets split)"
        + ("" if required or "default" in help else " (default: none)"),
    )
    parser.add_argument(
        "--rescale",
        metavar="FLOAT",
        type=_number,
        default=None,
        help="multiply the --data inputs by this, e.g. 1/255 for images a model takes in [0, 1] "
        "(default: as they are)",
    )
    parser.add_argument(
        "--tfds-dir", default=None, help="TFDS data directory (default: TFDS's default)"
    )


def check_data_arguments(args: argparse.Namespace) -> None:
    """The `add_data_arguments` options, checked without reading the data nor importing
    TensorFlow (for a command's `check(args)`).

    Raises:
        FileNotFoundError: if `--data` does not exist.
        ValueError: if `--data` is not a data path (`tfbn.workflow.user_data.check_data_path`)
            or `--rescale` is not a finite non-zero number or given without `--data`.
    """
    from tfbn.workflow.user_data import check_data_path, check_rescale

    if args.data is not None:
        check_data_path(args.data)
    check_rescale(args.rescale)
    if args.rescale is not None and args.data is None:
        raise ValueError(
            f"Argument `rescale` applies to the inputs of --data, which was not given; received "
            f"rescale={args.rescale!r}."
        )

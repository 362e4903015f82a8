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

"""`tfbn demo`: `tfbn.demo.demo` from the command line."""

from __future__ import annotations

import argparse

HELP = "show the batch-norm op and layer on a small tensor"


def configure(parser: argparse.ArgumentParser) -> None:
    """Adds the `tfbn demo` arguments."""
    parser.add_argument("--seed", type=int, default=0, help="random seed")


def run(args: argparse.Namespace) -> int:
    """Prints what `demo` returns."""
    import numpy as np

    from tfbn.demo import demo

    np.set_printoptions(precision=4, suppress=True)
    for key, value in demo(args.seed).items():
        print(f"{key}:\n{value}\n")
    return 0

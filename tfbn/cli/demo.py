"""`tfbn demo`: `tfbn.demo.demo` from the command line."""

from __future__ import annotations

import argparse

HELP = "show the batch-norm layer on a small tensor, in training and inference mode, explained"


def configure(parser: argparse.ArgumentParser) -> None:
    """Adds the `tfbn demo` arguments."""
    parser.add_argument("--seed", type=int, default=0, help="random seed")


def run(args: argparse.Namespace) -> int:
    """Prints what `demo` shows, each array after a sentence saying what it is."""
    import numpy as np

    from tfbn.demo import demo, describe

    np.set_printoptions(precision=4, suppress=True)
    print(describe(demo(args.seed)))
    return 0

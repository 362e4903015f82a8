"""`tfbn demo`: `tfbn.workflow.demo.demo` from the command line."""

from __future__ import annotations

import argparse

from tfbn.cli.options import add_seed

HELP = "show the batch-norm layer on a small tensor, in training and inference mode, explained"


def configure(parser: argparse.ArgumentParser) -> None:
    """Adds the `tfbn demo` arguments."""
    add_seed(parser, 0, "random seed")


def run(args: argparse.Namespace) -> int:
    """Prints what `demo` shows, each array after a sentence saying what it is."""
    import numpy as np

    from tfbn.workflow.demo import demo, describe

    np.set_printoptions(precision=4, suppress=True)
    print(describe(demo(args.seed)))
    return 0

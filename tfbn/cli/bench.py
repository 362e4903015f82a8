"""`tfbn bench`: `tfbn.workflow.bench.run_benchmarks` from the command line."""

from __future__ import annotations

import argparse

from tfbn.cli.options import add_switch

HELP = "benchmark tfbn.BatchNorm against keras.layers.BatchNormalization"


def configure(parser: argparse.ArgumentParser) -> None:
    """Adds the `tfbn bench` arguments."""
    parser.add_argument(
        "--quick", action="store_true", help="tiny shapes and few repeats (a smoke test)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="interleaved repeats (default: 15, quick 3)"
    )
    parser.add_argument(
        "--cases",
        default=None,
        help="comma-separated cases to run, from layer, lenet, pipeline, export, models (a "
        "training step of ResNet50, MobileNetV2, EfficientNetB0, keras against converted), "
        "models_export (their folded, unfolded and no-BN exports), recalibrate (tfbn.recalibrate "
        "and tfbn.inspect on those models, in model.predict passes), jax (the layer and "
        "MobileNetV2's training step on Keras's JAX backend under jax.jit, in a process of its "
        "own; needs JAX); 'all' for every case (default: all but models, models_export, "
        "recalibrate and jax)",
    )
    parser.add_argument(
        "--output-dir",
        default="docs/benchmarks",
        help="folder for the JSON and Markdown results",
    )
    parser.add_argument("--name", default="results", help="file stem of the results")
    parser.add_argument("--note", default="", help="free text kept with the results")
    add_switch(parser, "--xla", True, "also time the layer under XLA")


def run(args: argparse.Namespace) -> int:
    """Runs the benchmarks and prints their Markdown report."""
    from tfbn.workflow.bench import render_markdown, run_benchmarks

    results = run_benchmarks(
        cases=args.cases,
        quick=args.quick,
        repeats=args.repeats,
        xla=args.xla,
        output_dir=args.output_dir,
        name=args.name,
        note=args.note,
        verbose=args.verbose,
    )
    print(render_markdown(results))
    for path in results.get("files", {}).values():
        print(f"wrote {path}")
    return 0

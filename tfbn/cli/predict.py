"""`tfbn predict`: `tfbn.workflow.serving.predict_files` from the command line.

`check(args)` runs the request's TensorFlow-free checks (`tfbn.workflow.requests`) before
TensorFlow's import, so that a bad request is told at once.
"""

from __future__ import annotations

import argparse

from tfbn.workflow.requests import check_inputs, check_top_k, resolve_model_dir

HELP = "classify images with an exported SavedModel"
EPILOG = (
    "Images are not resized: they must have the model's size (28x28), drawn as Fashion-MNIST "
    "is (light object on a black background). Colour images are converted to grayscale "
    "(ITU-R BT.601 weights); an alpha channel is dropped. Prints the model served "
    "('model FOLDER, version N'), then one line per image: 'INPUT: class probability, ...', "
    "most probable first; an IDX file's images are 'FILE[i]'."
)


def configure(parser: argparse.ArgumentParser) -> None:
    """Adds the `tfbn predict` arguments."""
    parser.add_argument(
        "model_dir", help="SavedModel folder, or model folder of numbered versions (latest used)"
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="PNG/JPEG/GIF/BMP images (28x28, grayscale or colour) or IDX image files (.gz "
        "allowed)",
    )
    parser.add_argument("--top-k", type=int, default=3, help="how many classes to print per image")


def check(args: argparse.Namespace) -> None:
    """`--top-k`, the model folder and the inputs, checked as `predict_files` will (TF-free)."""
    check_top_k(args.top_k)
    resolve_model_dir(args.model_dir)
    check_inputs(args.inputs)


def run(args: argparse.Namespace) -> int:
    """Prints the top classes and probabilities of every image."""
    from tfbn.workflow.serving import predict_files

    found = predict_files(args.model_dir, args.inputs, k=args.top_k)
    print(found.model.describe())
    for label, ranked in zip(found.labels, found.top, strict=True):
        print(f"{label}: " + ", ".join(f"{name} {p:.4f}" for name, p in ranked))
    return 0

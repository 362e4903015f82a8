"""`tfbn predict`: `tfbn.workflow.serving.predict_files` from the command line.

The checks of a request that need no TensorFlow (the model folder, the input files, `k`) live
here, so that `check(args)` tells a bad request at once; `tfbn.workflow.serving` runs the same
functions for Python callers.
"""

from __future__ import annotations

import argparse
import os
import pathlib

from tfbn.utils.errors import UsageError

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


def resolve_model_dir(model_dir: str | os.PathLike) -> pathlib.Path:
    """The SavedModel folder for `model_dir`: itself, or its highest numbered version folder.

    Args:
        model_dir: A SavedModel folder (`.../lenet/3`) or a model base folder (`.../lenet`)
            holding numbered versions, as TensorFlow Serving lays them out.

    Returns:
        The folder that holds `saved_model.pb`.

    Raises:
        UsageError: (a `ValueError`) if neither `model_dir` nor a numbered folder under it holds
            a SavedModel.
        OSError: if a folder cannot be read (its `filename` says which).
    """
    path = pathlib.Path(model_dir)
    if (path / "saved_model.pb").is_file():
        return path
    if path.is_dir():
        versions = sorted(
            (int(p.name), p)
            for p in path.iterdir()
            if p.name.isdigit() and (p / "saved_model.pb").is_file()
        )
        if versions:
            return versions[-1][1]
    raise UsageError(
        f"Argument `model_dir` must be a SavedModel folder or a folder of numbered versions; no "
        f"saved_model.pb found in {str(path)!r} or its numbered subfolders."
    )


def check_inputs(paths) -> list[pathlib.Path]:
    """The input files as paths, once each is checked to be an existing file.

    Raises:
        UsageError: (a `ValueError`) if there is none, or one is a folder or does not exist.
    """
    paths = [pathlib.Path(p) for p in paths]
    if not paths:
        raise UsageError("Argument `paths` must name at least one file; received none.")
    for path in paths:
        if path.is_dir():
            raise UsageError(f"Input {str(path)!r} is a folder; name the image files in it.")
        if not path.is_file():
            raise UsageError(f"Input file {str(path)!r} does not exist.")
    return paths


def check_top_k(k) -> int:
    """`k` once checked to be a positive integer (its upper bound is the model's class count).

    Raises:
        UsageError: (a `ValueError`) otherwise.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UsageError(f"Argument `k` (--top-k) must be a positive integer; received k={k!r}.")
    return k


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

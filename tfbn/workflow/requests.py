"""The checks of a serving request that need no TensorFlow: the model folder, the inputs, `k`.

`tfbn.workflow.serving` runs them for Python callers and `tfbn predict` before TensorFlow's
import, so that a bad request is told at once.
"""

from __future__ import annotations

import os
import pathlib

from tfbn.utils.errors import UsageError

__all__ = ["check_inputs", "check_top_k", "resolve_model_dir"]


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

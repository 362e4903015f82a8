"""The user's own data, read into arrays for a model: what a command's `--data PATH` names.

`PATH` is one of:

- a `.npy` file: the inputs, `(n, *input_shape)`;
- a `.npz` file: the inputs under `x`, optionally integer labels under `y`, `(n,)`;
- a folder of images, one subfolder per class (the subfolders' names in sorted order are the
  labels 0, 1, ...), or images directly in it (no labels), read with
  `keras.utils.image_dataset_from_directory`: resized to the model's `(height, width)`, in
  grayscale, RGB or RGBA after the model's channel count, pixel values 0-255;
- `tfds:NAME:SPLIT`: a TensorFlow Datasets split already prepared (nothing is downloaded), its
  `image` feature as inputs and its `label` feature, if any, as labels, e.g.
  `tfds:mnist:test[:1000]`.

Everything is read into memory, as float32 inputs (multiplied by `rescale` if given) and int64
labels. Bad data is told in one line, with the path, before the model runs: `check_data_path`
checks the path alone, without TensorFlow (for a command's `check(args)`); `load_user_data`
checks the values against the model's input shape.
"""

from __future__ import annotations

import errno
import math
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["ARRAY_SUFFIXES", "TFDS_PREFIX", "check_data_path", "check_rescale", "load_user_data"]

ARRAY_SUFFIXES = (".npy", ".npz")
TFDS_PREFIX = "tfds:"
KINDS = "a .npy file, a .npz file with `x` (and `y`), a folder of images or tfds:NAME:SPLIT"

_COLOR_MODES = {1: "grayscale", 3: "rgb", 4: "rgba"}
_IMAGE_BATCH = 256


# ------------------------------------------------------------------------------ the path alone
def _tfds_name_split(path: str) -> tuple[str, str]:
    """`(NAME, SPLIT)` of `tfds:NAME:SPLIT` (the split may hold colons: `train[:100]`)."""
    parts = path[len(TFDS_PREFIX) :].split(":", 1)
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise ValueError(
            f"Argument `data` must be {TFDS_PREFIX}NAME:SPLIT for a TensorFlow Datasets split "
            f"(e.g. tfds:mnist:test); received data={path!r}."
        )
    return parts[0], parts[1]


def check_data_path(path: str | os.PathLike) -> None:
    """Cheaply checks a data path, without reading the data nor importing TensorFlow.

    Args:
        path: A `.npy` or `.npz` file, a folder of images, or `tfds:NAME:SPLIT`.

    Raises:
        FileNotFoundError: if the file or folder does not exist.
        ValueError: if the folder is empty, the file does not end in `.npy` or `.npz`, or a
            `tfds:` path is not `tfds:NAME:SPLIT`.
    """
    text = os.fspath(path)
    if text.startswith(TFDS_PREFIX):
        _tfds_name_split(text)
        return
    location = Path(text)
    if not location.exists():
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), text)
    if location.is_dir():
        if not any(location.iterdir()):
            raise ValueError(f"Argument `data`: the folder {text!r} is empty; expected images.")
    elif location.suffix.lower() not in ARRAY_SUFFIXES:
        raise ValueError(f"Argument `data` must be {KINDS}; received the file {text!r}.")


def check_rescale(rescale) -> float | None:
    """`rescale` as a float: a finite non-zero number, or None.

    Raises:
        ValueError: if it is not.
    """
    if rescale is None:
        return None
    try:
        value = float(rescale)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value == 0.0 or isinstance(rescale, bool):
        raise ValueError(
            f"Argument `rescale` must be a finite non-zero number (e.g. 1/255); received "
            f"rescale={rescale!r}."
        )
    return value


# ------------------------------------------------------------------------------------ the kinds
def _reason(error: BaseException) -> str:
    """The first line of an error's message, without its final full stop."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__).rstrip(".")


def _not_an_array(path, error: BaseException) -> ValueError:
    reason = _reason(error)
    if "pickle" in reason:  # NumPy's words for any file that is not .npy/.npz, too
        reason = "it is not in NumPy's .npy/.npz format, or holds pickled objects (refused)"
    return ValueError(f"Argument `data`: {str(path)!r} is not a NumPy array file: {reason}.")


def _load_arrays(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """The inputs and labels of a `.npy` or `.npz` file (pickled objects refused)."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            return np.asarray(loaded), None
        with loaded:
            if "x" not in loaded.files:
                raise ValueError(
                    f"Argument `data`: {str(path)!r} holds the arrays {sorted(loaded.files)}; "
                    "expected the inputs under `x` (and optionally the labels under `y`)."
                )
            return loaded["x"], loaded["y"] if "y" in loaded.files else None
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        if isinstance(error, FileNotFoundError | IsADirectoryError | PermissionError):
            raise
        raise _not_an_array(path, error) from None
    except ValueError as error:
        if str(error).startswith("Argument `data`"):
            raise
        raise _not_an_array(path, error) from None


def _image_shape(input_shape: tuple) -> tuple[int, int, int]:
    """`(height, width, channels)` of a model taking channels-last images of 1, 3 or 4 channels."""
    if (
        len(input_shape) != 3
        or input_shape[-1] not in _COLOR_MODES
        or not all(isinstance(d, int) and d > 0 for d in input_shape[:2])
    ):
        raise ValueError(
            "Argument `data`: a folder of images needs a model that takes images of shape "
            "(height, width, channels) with 1, 3 or 4 channels; the model takes inputs of shape "
            f"{_shown(input_shape)}."
        )
    return input_shape


def _load_folder(path: Path, input_shape: tuple) -> tuple[np.ndarray, np.ndarray | None]:
    """The images of a folder, resized to the model's size; labels from its subfolders."""
    import keras

    height, width, channels = _image_shape(input_shape)
    labeled = any(entry.is_dir() for entry in path.iterdir())
    try:
        dataset = keras.utils.image_dataset_from_directory(
            path,
            labels="inferred" if labeled else None,
            color_mode=_COLOR_MODES[channels],
            batch_size=_IMAGE_BATCH,
            image_size=(height, width),
            shuffle=False,
            verbose=False,
        )
    except ValueError as error:
        raise ValueError(
            f"Argument `data`: no images could be read from the folder {str(path)!r} "
            f"({_reason(error)})."
        ) from None
    batches = list(dataset.as_numpy_iterator())
    if not labeled:
        return np.concatenate(batches), None
    return np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches])


def _load_tfds(path: str, tfds_dir) -> tuple[np.ndarray, np.ndarray | None]:
    """The `image` and `label` features of a prepared TFDS split (nothing downloaded)."""
    import tensorflow_datasets as tfds

    name, split = _tfds_name_split(path)
    try:
        whole = tfds.as_numpy(
            tfds.load(
                name,
                split=split,
                data_dir=None if tfds_dir is None else os.fspath(tfds_dir),
                download=False,
                batch_size=-1,
            )
        )
    except Exception as error:  # TFDS raises assertion, value, not-found and TensorFlow errors
        where = "TFDS's default data directory" if tfds_dir is None else repr(os.fspath(tfds_dir))
        raise ValueError(
            f"Argument `data`: {path!r} could not be read from {where} (TFDS datasets are not "
            f"downloaded here: prepare it first): {_reason(error)}."
        ) from None
    if not isinstance(whole, dict) or "image" not in whole:
        features = sorted(whole) if isinstance(whole, dict) else type(whole).__name__
        raise ValueError(
            f"Argument `data`: {path!r} has the features {features}; expected `image` (and "
            "optionally `label`)."
        )
    return whole["image"], whole.get("label")


# ------------------------------------------------------------------------------------ the values
def _shown(shape) -> str:
    return str(tuple(int(d) if d is not None else None for d in shape))


def _fits(shape: tuple, input_shape: tuple) -> bool:
    return len(shape) == len(input_shape) and all(
        want is None or have == want for have, want in zip(shape, input_shape, strict=True)
    )


def _as_inputs(x, input_shape: tuple, rescale: float | None, path: str) -> np.ndarray:
    """`x` as float32 model inputs, after checking its type, shape and values."""
    x = np.asarray(x)
    if x.dtype == bool or not (
        np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)
    ):
        raise ValueError(f"Argument `data`: {path!r} holds {x.dtype} values; expected numbers.")
    if x.ndim < 1 or len(x) == 0:
        raise ValueError(f"Argument `data`: {path!r} holds no examples (shape {x.shape}).")
    if not _fits(x.shape[1:], input_shape):
        raise ValueError(
            f"Argument `data`: {path!r} holds inputs of shape {_shown(x.shape[1:])} (n={len(x)}), "
            f"but the model takes inputs of shape {_shown(input_shape)}."
        )
    with np.errstate(over="ignore", invalid="ignore"):  # told below, as non-finite values
        x = x.astype(np.float32)
        if rescale is not None:
            x *= np.float32(rescale)
    if not np.all(np.isfinite(x)):
        bad = int(np.count_nonzero(~np.isfinite(x)))
        raise ValueError(
            f"Argument `data`: {path!r} holds {bad} non-finite values (NaN or infinity)"
            f"{' after rescaling' if rescale is not None else ''}; expected finite inputs."
        )
    return x


def _as_labels(y, count: int, path: str) -> np.ndarray | None:
    """`y` as int64 labels, one per input."""
    if y is None:
        return None
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
        raise ValueError(
            f"Argument `data`: the labels `y` of {path!r} must be integers of shape (n,); "
            f"received {y.dtype} labels of shape {y.shape}."
        )
    if len(y) != count:
        raise ValueError(
            f"Argument `data`: {path!r} holds {count} inputs but {len(y)} labels; expected one "
            "label per input."
        )
    return y.astype(np.int64)


def load_user_data(
    path: str | os.PathLike,
    *,
    input_shape: Sequence[int | None],
    rescale: float | None = None,
    tfds_dir: str | os.PathLike | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Reads the data at `path` (see the module docstring) as inputs for a model.

    Args:
        path: A `.npy` file, a `.npz` file with `x` (and `y`), a folder of images, or
            `tfds:NAME:SPLIT`.
        input_shape: The shape of one input the model takes, without the batch axis (`None`
            for a size it accepts any of); images are resized to its `(height, width)`.
        rescale: A number every input value is multiplied by (e.g. `1 / 255`); `None` keeps
            the values as they are.
        tfds_dir: TFDS data directory of a `tfds:` path (default: TFDS's default).

    Returns:
        `(x, y)`: float32 inputs of shape `(n, *input_shape)`, and int64 labels of shape `(n,)`,
        or `None` when the data have none.

    Raises:
        FileNotFoundError: if `path` does not exist.
        ValueError: if the data cannot be read as arrays (pickled objects included), are empty,
            do not have the model's input shape, hold non-finite values, or have another number
            of labels than inputs, with the path; or if `rescale` is not a finite non-zero number.
    """
    rescale = check_rescale(rescale)
    input_shape = tuple(input_shape)
    check_data_path(path)
    text = os.fspath(path)
    if text.startswith(TFDS_PREFIX):
        x, y = _load_tfds(text, tfds_dir)
    elif Path(text).is_dir():
        x, y = _load_folder(Path(text), input_shape)
    else:
        x, y = _load_arrays(Path(text))
    x = _as_inputs(x, input_shape, rescale, text)
    return x, _as_labels(y, len(x), text)

"""Loading `.keras` files that may come from anywhere: checked first, then loaded in safe mode.

A `.keras` file is a zip archive of `config.json` (the architecture), `metadata.json` and
`model.weights.h5`. Keras's own loader reports a missing, truncated or corrupt archive alike as
"File not found", and rebuilding a model can run code: a `Lambda` layer stores Python bytecode.
`load_model` tells the cases apart and never runs stored code (Keras's `safe_mode=True`): models
are programs, and tfbn loads only the layers that Keras and tfbn define or that the caller has
registered.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import zipfile

from tfbn.utils.errors import UsageError
from tfbn.utils.files import check_writable_dir

__all__ = ["check_keras_file", "load_model"]

_CONFIG = "config.json"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _innermost_reason(error: BaseException) -> str:
    """The first sentence of the innermost cause Keras quotes ("Exception encountered: ...")."""
    text = str(error).rsplit("Exception encountered: ", 1)[-1].strip()
    sentence = text.split(". ", 1)[0].splitlines()[0] if text else type(error).__name__
    return sentence.rstrip(".")


def check_keras_file(path: str | os.PathLike) -> pathlib.Path:
    """Checks that `path` is a complete `.keras` archive, without building the model.

    Every member of the archive is read and its CRC checked, and `config.json` must be a JSON
    object naming a class: a truncated copy or a file of another kind is found here, before any
    expensive work.

    Args:
        path: The `.keras` file.

    Returns:
        `path` as a `pathlib.Path`.

    Raises:
        UsageError: if the name does not end in `.keras`, or the file is not a valid archive.
        OSError: if the file does not exist or cannot be read (with the path as its filename).
    """
    path = pathlib.Path(path)
    if path.suffix != ".keras":
        raise UsageError(f"{path}: a model must be a .keras file (the name ends in '.keras').")
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    with open(path, "rb"):  # PermissionError with the path, before zipfile hides it
        pass
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
            if damaged is not None:
                raise zipfile.BadZipFile(f"member {damaged} fails its CRC check")
            config = json.loads(archive.read(_CONFIG))
    except KeyError:
        reason = f"it has no {_CONFIG}"
    except (zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError, EOFError) as error:
        reason = _first_line(error)
    else:
        if isinstance(config, dict) and "class_name" in config:
            return path
        reason = f"its {_CONFIG} describes no model"
    raise UsageError(
        f"{path}: corrupt or truncated .keras file ({reason}); save the model again or copy "
        "the complete file."
    )


def check_keras_output(path: str | os.PathLike) -> pathlib.Path:
    """Checks that a model can be saved at `path`, creating nothing.

    Returns:
        `path` as a `pathlib.Path`.

    Raises:
        UsageError: if the name does not end in `.keras`.
        IsADirectoryError: if `path` is a folder.
        OSError: if its folder cannot be written (`tfbn.utils.files.check_writable_dir`), naming it.
    """
    path = pathlib.Path(path)
    if path.suffix != ".keras":
        raise UsageError(f"Argument `output` must end in '.keras'; received output='{path}'.")
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    check_writable_dir(path.parent)
    return path


def load_model(path: str | os.PathLike, *, compile: bool = False):
    """Loads a `.keras` file with Keras's safe mode on, after `check_keras_file`.

    `tfbn.BatchNorm` and `tfbn.legacy.BatchNorm` are registered Keras serializables, so models
    holding them load without `custom_objects`. A model that needs code to rebuild (a `Lambda`
    layer with Python code, an unregistered custom class) is refused with one line saying so.
    If you trust the file, load it yourself with `keras.saving.load_model(path, safe_mode=False)`
    and pass the model to the Python API.

    Args:
        path: The `.keras` file.
        compile: Whether to compile the model with its saved training configuration.

    Returns:
        The `keras.Model`.

    Raises:
        UsageError: if the file is not a valid `.keras` archive, or the model cannot be rebuilt
            in safe mode.
        OSError: if the file does not exist or cannot be read.
    """
    import keras

    import tfbn.layers.batch_norm  # noqa: F401  (registers tfbn.BatchNorm)

    path = check_keras_file(path)
    try:
        return keras.saving.load_model(path, compile=compile, safe_mode=True)
    except (ValueError, TypeError) as error:
        message = str(error)
        if "safe_mode" in message:
            raise UsageError(
                f"{path}: refusing to load: the model holds a Lambda layer with Python code, "
                "which safe mode does not run. If you trust the file, load it with "
                "keras.saving.load_model(path, safe_mode=False) and use the Python API."
            ) from None
        raise UsageError(
            f"{path}: cannot rebuild the model: {_innermost_reason(error)}; register custom "
            "classes with @keras.saving.register_keras_serializable and import them first."
        ) from None

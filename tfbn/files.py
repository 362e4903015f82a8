"""Atomic writes: a file or model appears complete at its path, or not at all.

Everything tfbn writes (histories, plots, result tables, checkpoints, models) goes through here:
the content is written to a temporary file beside the target, flushed to disk, then renamed over
it, so a process killed mid-write never leaves a truncated file where a reader would look.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["atomic_write", "atomic_write_text", "fsync_dir", "save_model_atomically"]


def fsync_dir(path: str | os.PathLike) -> None:
    """Flushes a folder's entries (a rename inside it) to disk, where the platform allows."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _replace_from_temporary(path: Path, suffix: str, write: Callable[[str], None]) -> Path:
    """Calls `write` on a temporary file beside `path`, then renames it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file private (0600); give it the usual permissions.
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Writes a file atomically.

    Args:
        path: The target file; its folder is created if missing.
        write: Called with a binary file object open on the temporary file.

    Returns:
        The target path.
    """

    def write_synced(tmp: str) -> None:
        with open(tmp, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())

    return _replace_from_temporary(Path(path), ".tmp", write_synced)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes a UTF-8 text file atomically (see `atomic_write`)."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda file: file.write(data))


def save_model_atomically(model, path: str | os.PathLike) -> Path:
    """Saves a Keras model to a `.keras` file atomically.

    Args:
        model: A `keras.Model`.
        path: Target file, ending in `.keras`; its folder is created if missing.

    Returns:
        The target path.

    Raises:
        ValueError: if `path` does not end in `.keras`.
    """
    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"Argument `path` must end in '.keras'; received path='{path}'.")
    # Keras needs the .keras suffix on the file it writes, so the temporary name keeps it.
    return _replace_from_temporary(path, ".keras", model.save)

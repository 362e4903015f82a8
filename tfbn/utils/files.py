"""Atomic writes: a file or model appears complete at its path, or not at all.

Everything tfbn writes (histories, plots, result tables, checkpoints, models) goes through here:
the content is written to a temporary file beside the target, flushed to disk, then renamed over
it, so a process killed mid-write never leaves a truncated file where a reader would look.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = [
    "atomic_write",
    "atomic_write_text",
    "check_writable_dir",
    "fsync_dir",
    "save_model_atomically",
]


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


def check_writable_dir(path: str | os.PathLike) -> Path:
    """Checks, without leaving anything behind, that files can be created in a folder.

    A folder that does not exist yet is checked where it would be created: its nearest existing
    ancestor must be a folder in which a file can be created. Call it before expensive work whose
    results go to `path`.

    Args:
        path: The folder.

    Returns:
        `path`, as a `Path`.

    Raises:
        NotADirectoryError: if `path`, or the nearest of its ancestors that exists, is not a folder.
        FileNotFoundError: if the way to `path` goes through a dangling symbolic link.
        OSError: (e.g. `PermissionError`, or errno `EROFS` on a read-only file system) if no file
            can be created there; `filename` is the folder that refused.
    """
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # a dangling link: creating through it fails
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(existing))
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(existing))
    try:
        # An unnamed file that disappears when closed: a real write check, nothing left behind.
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise type(error)(error.errno, error.strerror, str(existing)) from None
    return path


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
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        if error.filename is None:
            # A failed write (a full disk, a quota) names no file: name the one being written.
            raise type(error)(error.errno, error.strerror or str(error), str(path)) from error
        raise
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

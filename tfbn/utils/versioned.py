"""Version folders `<root>/<version>/` written atomically, by any number of processes at once.

This is the layout TensorFlow Serving watches: a model folder holding one all-digit folder per
version, of which it serves the highest. A version is written into a hidden temporary folder
beside the others (`.tmp-<random>`, which TensorFlow Serving ignores), checked, then renamed into
place, so a reader never sees a partial version. The rules:

- The choice of a version number and the rename happen under an exclusive lock on the model
  folder (`flock` on the folder itself: nothing is left behind), so concurrent writers without a
  version each get the next free one, and two writers of the same version cannot both succeed.
- Each writer holds a lock on its temporary folder while it works. A temporary folder that nobody
  holds belongs to a writer that died (killed, power lost) and is removed by the next writer.
- Replacing a version swaps the two folders in one atomic exchange where the system has one
  (Linux `renameat2`), else by two renames; the old one is removed once the new one is in place.

Locks are advisory and local to one machine (and to file systems where `flock` works across
machines); where `fcntl` is missing (Windows) writers are not coordinated.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pathlib
import shutil
import uuid
from collections.abc import Callable, Iterator

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

__all__ = ["existing_versions", "write_version"]

_TEMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"


def existing_versions(root: pathlib.Path) -> list[int]:
    """The version numbers under `root` (all-digit folder names), ascending."""
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir())


@contextlib.contextmanager
def _flocked(path: pathlib.Path, blocking: bool = True) -> Iterator[bool]:
    """Holds an exclusive `flock` on folder `path`; yields False if not blocking and it is held."""
    if fcntl is None:
        yield True
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the lock


def _remove_stale(root: pathlib.Path) -> None:
    """Removes the temporary folders of writers that died (called under the model-folder lock)."""
    for entry in root.iterdir():
        if entry.name.startswith(_OLD_PREFIX):
            # Only ever present during a commit, which holds the model-folder lock: stale now.
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.startswith(_TEMP_PREFIX) and entry.is_dir() and fcntl is not None:
            with _flocked(entry, blocking=False) as free:
                if free:
                    shutil.rmtree(entry, ignore_errors=True)


def _exchange(first: pathlib.Path, second: pathlib.Path) -> bool:
    """Swaps two folders in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`), if available."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(
        at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), ctypes.c_uint(rename_exchange)
    )
    return result == 0


def _replace(temp: pathlib.Path, target: pathlib.Path) -> None:
    """Puts `temp` at `target`, which exists: `temp` then holds (or is) the replaced folder."""
    if _exchange(temp, target):
        return
    old = target.parent / f"{_OLD_PREFIX}{uuid.uuid4().hex[:12]}"
    os.rename(target, old)
    try:
        os.rename(temp, target)
    except BaseException:
        os.rename(old, target)
        raise
    os.rename(old, temp)


class VersionExistsError(ValueError):
    """The version folder exists and replacing it was not asked for."""


def _commit(temp: pathlib.Path, root: pathlib.Path, version: int | None, overwrite: bool) -> int:
    """Renames `temp` to its version folder (under the model-folder lock); returns the version."""
    if version is None:
        versions = existing_versions(root)
        version = versions[-1] + 1 if versions else 1
    target = root / str(version)
    if target.exists():
        if not overwrite:  # written meanwhile by another writer
            raise VersionExistsError(
                f"Argument `version`: {str(target)!r} already exists; pass overwrite=True to "
                "replace it, or another version."
            )
        _replace(temp, target)
    else:
        os.rename(temp, target)
    return version


def write_version(
    root: str | os.PathLike,
    write: Callable[[pathlib.Path], None],
    *,
    version: int | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes one version folder under `root` atomically (see the module docstring).

    Args:
        root: The model folder; created with its parents if missing.
        write: Called with an empty temporary folder to fill (and check); an exception from it
            leaves nothing behind.
        version: The version number; `None` takes the next free one at the moment of the rename.
        overwrite: Whether an existing `version` is replaced.

    Returns:
        The version folder written.

    Raises:
        VersionExistsError: if `version` exists (or appeared meanwhile) and `overwrite` is False.
        OSError: from the file system, with the path concerned.
    """
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    temp = root / f"{_TEMP_PREFIX}{uuid.uuid4().hex[:12]}"
    try:
        with contextlib.ExitStack() as alive:
            with _flocked(root):
                _remove_stale(root)
                temp.mkdir()
                # Locked before the model folder is unlocked: no cleanup can take it for stale.
                alive.enter_context(_flocked(temp))
            write(temp)
            with _flocked(root):
                version = _commit(temp, root, version, overwrite)
    finally:
        shutil.rmtree(temp, ignore_errors=True)  # an unfinished or a replaced version
    return root / str(version)

"""A lock on a folder, so that one process at a time works in it (a run folder, a tuning folder).

`FolderLock(folder)` keeps a lock file, `<folder>/.tfbn.lock`, that says who holds the folder:
process id, host name and since when (JSON). The lock itself is the operating system's: an
exclusive `flock` on that file, which the kernel drops when the holder ends in any way (exit,
exception, kill -9), so a crash never leaves the folder locked. The rules:

- A folder held by a live process is refused at once with a `tfbn.utils.errors.UsageError`
  naming the holder (pid, host, since when); the command line prints it in one line and exits
  with code 2.
- A lock file left by a process that is gone (its `flock` is free) is taken over, with a one-line
  notice on stderr naming the process that left it.
- A lock file written on another host is never taken over silently: `flock` does not reach across
  every network file system, so this host cannot tell whether that process still runs. It is
  refused with the path to delete once that process is known to be gone.
- Releasing removes the lock file (under the lock; a process that opened the file just before
  notices that it locked a removed file and tries again).

Where `fcntl` is missing (Windows) the folder is not locked.

Example:

    with FolderLock("runs/tune"):
        ...  # nobody else works in runs/tune until this block ends
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import pathlib
import socket
import sys
import time
from typing import Any

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from tfbn.utils.errors import UsageError

__all__ = ["LOCK_NAME", "FolderLock", "Holder", "read_holder"]

LOCK_NAME = ".tfbn.lock"
# A holder writes its record right after it takes the lock; a reader that finds the file still
# empty or half written tries again for this long.
_READ_RETRY_S = 1.0


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds (or last held) a folder lock.

    Attributes:
        pid: Process id of the holder.
        host: Host name of the holder's machine (`socket.gethostname()`).
        since: When the lock was taken, in seconds since the epoch.
        command: The holder's command line, for people reading the message.
    """

    pid: int
    host: str
    since: float
    command: str = ""

    def describe(self) -> str:
        """E.g. `process 4242 (tfbn tune) on host a1 since 2026-12-02 05:20:01 UTC`."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        command = f" ({self.command})" if self.command else ""
        return f"process {self.pid}{command} on host {self.host} since {stamp}"

    @classmethod
    def of_this_process(cls) -> Holder:
        """This process, now."""
        argv = [os.path.basename(sys.argv[0]), *sys.argv[1:]] if sys.argv and sys.argv[0] else []
        return cls(os.getpid(), socket.gethostname(), time.time(), " ".join(argv)[:200])


def _parse(text: str) -> Holder | None:
    try:
        record: dict[str, Any] = json.loads(text)
        return Holder(
            int(record["pid"]),
            str(record["host"]),
            float(record["since"]),
            str(record.get("command", "")),
        )
    except (ValueError, KeyError, TypeError):
        return None


def _read_fd(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


def read_holder(folder: str | os.PathLike) -> Holder | None:
    """The holder recorded in `folder`'s lock file (live or not), or None if there is none."""
    try:
        text = (pathlib.Path(folder) / LOCK_NAME).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    return _parse(text)


def _make_folder(folder: pathlib.Path) -> bool:
    """Creates `folder` and its parents; False if a holder's release removed it meanwhile.

    `mkdir(exist_ok=True)` raises FileExistsError when it finds the folder and then, checking,
    no longer does: that race is retried; a file in the folder's place is raised.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        if folder.exists() and not folder.is_dir():
            raise
        return False
    return True


def _remove_empty(folders: list[pathlib.Path]) -> None:
    """Removes `folders` (innermost first) where they are empty; leaves the others alone."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


class FolderLock:
    """An exclusive lock on a folder, held by this process; a context manager.

    Args:
        folder: The folder to lock; created (with its parents) if missing.

    Raises (from `acquire` and `with`):
        tfbn.utils.errors.UsageError: the folder is held by a live process, or its lock file was
            written on another host.
        OSError: the lock file cannot be created or written (read-only folder, not a folder,
            no space, ...); the error names the path, and the folders this call created are
            removed again.

    `release` (leaving the `with` block) also removes the folders that `acquire` created, if
    nothing was put in them: a command that fails under the lock (e.g. on missing data) leaves
    no empty folder behind.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = pathlib.Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None
        self._created: list[pathlib.Path] = []

    @property
    def locked(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> FolderLock:
        """Takes the lock (at once or not at all); returns self."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this FolderLock.")
        if fcntl is None:
            return self
        created = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
        try:
            while self._fd is None:
                if not _make_folder(self.folder):
                    continue
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                except FileNotFoundError:  # removed by a holder's release meanwhile: again
                    continue
                try:
                    if self._lock_or_refuse(fd):
                        self._fd, fd = fd, None
                finally:
                    if fd is not None:
                        os.close(fd)
        except OSError:
            _remove_empty(created)
            raise
        self._created = created
        return self

    def _lock_or_refuse(self, fd: int) -> bool:
        """Locks file `fd` and records this process; False if the file was removed meanwhile."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(
                f"{self.folder} is in use by {self._live_holder(fd)} (lock file {self.path})."
            ) from None
        try:
            if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                return False  # released (and removed) between our open and our flock
        except FileNotFoundError:
            return False
        left = _parse(_read_fd(fd))
        here = Holder.of_this_process()
        if left is not None and left.host != here.host:
            raise UsageError(
                f"{self.folder} was locked by {left.describe()}; this host cannot tell whether "
                f"that process still runs. If it does not, delete {self.path} and start again."
            )
        if left is not None:
            print(
                f"tfbn: taking over {self.path}, left by {left.describe()}, which is gone.",
                file=sys.stderr,
                flush=True,
            )
        record = json.dumps(dataclasses.asdict(here)).encode()
        try:
            os.ftruncate(fd, 0)
            if os.pwrite(fd, record, 0) != len(record):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as error:  # a full disk: the write names no file
            os.unlink(self.path)
            raise OSError(error.errno, error.strerror, str(self.path)) from None
        return True

    def _live_holder(self, fd: int) -> str:
        deadline = time.monotonic() + _READ_RETRY_S
        while (holder := _parse(_read_fd(fd))) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return "another process" if holder is None else holder.describe()

    def release(self) -> None:
        """Removes the lock file and drops the lock (nothing if not held)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            _remove_empty(self._created)
        finally:
            os.close(fd)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"FolderLock({str(self.folder)!r}, locked={self.locked})"

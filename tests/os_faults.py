"""Real file-system faults for the tests: a read-only or a full file system, in its own process.

`run_on_tmpfs` runs a command in a private mount namespace (`unshare --mount`) in which a small
tmpfs is mounted at a given folder, read-only or filled up so that the next write fails with
ENOSPC. The mount exists only inside that process and disappears with it: nothing to clean up,
even after a crash. Mounting needs root (CAP_SYS_ADMIN); where it is not possible the tests that
use it are skipped, saying why.
"""

import functools
import os
import shutil
import subprocess
import sys

import pytest

FAULTS = ("read-only", "full")


@functools.cache
def _mount_problem() -> str | None:
    """Why a tmpfs cannot be mounted in a private namespace here, or None if it can."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         "mount -t tmpfs -o size=64k tfbn-probe /mnt"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    if probe.returncode != 0:
        return f"cannot mount a tmpfs in a private mount namespace: {probe.stderr.strip()}"
    return None


def needs_mounts():
    """Skips the calling test where tmpfs mounts are not possible."""
    problem = _mount_problem()
    if problem is not None:
        pytest.skip(problem)


def run_on_tmpfs(
    args, mountpoint, *, fault: str, prepare: str = "", timeout: float = 300, **kwargs
) -> subprocess.CompletedProcess:
    """Runs `args` with a 64 KiB tmpfs at `mountpoint` that is read-only or full.

    Args:
        args: The command.
        mountpoint: An existing empty folder (created if missing).
        fault: `"read-only"` (mounted read-only) or `"full"` (every block taken by a filler
            file, so a write fails with ENOSPC while creating an empty file still works).
        prepare: Shell commands run on the writable tmpfs before the fault is set (e.g. files
            whose survival the test checks); `$M` is the mount point.
        timeout: Seconds before the command is killed.
        **kwargs: Passed to `subprocess.run` (`env`, `cwd`, ...).

    Returns:
        The completed process, with text `stdout` and `stderr`.
    """
    assert fault in FAULTS, fault
    needs_mounts()
    os.makedirs(mountpoint, exist_ok=True)
    steps = ['mount -t tmpfs -o size=64k tfbn-test "$M"']
    if prepare:
        steps.append(prepare)
    if fault == "read-only":
        steps.append('mount -o remount,ro "$M"')
    else:
        steps.append('(cat /dev/zero > "$M/.filler") 2>/dev/null; true')
    script = " && ".join(steps) + ' && exec "$@"'
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "env", f"M={mountpoint}", "sh", "-c",
         script, "sh", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, **kwargs,
    )  # fmt: skip


def python_code(code: str) -> list[str]:
    """The command that runs `code` with this interpreter."""
    return [sys.executable, "-c", code]

"""tfbn.workflow.locks.FolderLock with real processes: a live holder refuses, a killed holder's lock
is taken over with a notice, another host's lock is refused, and racing processes never overlap.

Every holder is a separate interpreter (tests/holders.py), killed when its test ends.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest
from holders import kill, lock_held

from tfbn.utils.errors import UsageError
from tfbn.workflow.locks import LOCK_NAME, FolderLock, read_holder

HOLD = """
import sys, time
from tfbn.workflow.locks import FolderLock
lock = FolderLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_a_live_holder_is_refused_at_once_with_pid_host_and_time(tmp_path):
    folder = tmp_path / "run"
    with lock_held(HOLD, folder, 60) as holder:
        start = time.monotonic()
        with pytest.raises(UsageError) as caught:
            FolderLock(folder).acquire()
        elapsed = time.monotonic() - start
        recorded = read_holder(folder)
    message = str(caught.value)
    assert elapsed < 5
    assert "\n" not in message
    assert f"process {holder.pid} " in message
    assert f"on host {socket.gethostname()} since " in message
    assert recorded.pid == holder.pid and recorded.host == socket.gethostname()
    assert abs(recorded.since - time.time()) < 120
    assert time.strftime("%Y-%m-%d", time.gmtime(recorded.since)) in message


def test_a_killed_holder_is_taken_over_with_a_one_line_notice(tmp_path, capfd):
    folder = tmp_path / "run"
    with lock_held(HOLD, folder, 60) as holder:
        kill(holder)
    assert read_holder(folder).pid == holder.pid  # the dead process's record is still there
    with FolderLock(folder) as lock:
        assert lock.locked
        assert read_holder(folder).pid == os.getpid()
    notice = capfd.readouterr().err.strip().splitlines()
    assert len(notice) == 1, notice
    assert f"process {holder.pid} " in notice[0] and "gone" in notice[0]
    assert not (folder / LOCK_NAME).exists()


def test_release_removes_the_lock_file_and_frees_the_folder(tmp_path, capfd):
    folder = tmp_path / "a" / "run"
    with FolderLock(folder):
        assert (folder / LOCK_NAME).exists()
        result = subprocess.run(
            [sys.executable, "-c", HOLD, str(folder), "0"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 1
        assert f"UsageError: {folder} is in use by process {os.getpid()} " in result.stderr
    assert not (folder / LOCK_NAME).exists()
    with pytest.raises(RuntimeError, match="boom"), FolderLock(folder):
        raise RuntimeError("boom")
    result = subprocess.run(
        [sys.executable, "-c", HOLD, str(folder), "0"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout == "locked\n", result.stderr
    assert capfd.readouterr().err == ""  # nothing taken over: every release cleaned up


def test_a_lock_file_from_another_host_is_not_taken_over(tmp_path):
    folder = tmp_path / "shared"
    folder.mkdir()
    since = time.time() - 3600
    record = {"pid": 4242, "host": "elsewhere.invalid", "since": since, "command": "tfbn tune"}
    (folder / LOCK_NAME).write_text(json.dumps(record))
    with pytest.raises(UsageError) as caught:
        FolderLock(folder).acquire()
    message = str(caught.value)
    assert "process 4242 (tfbn tune) on host elsewhere.invalid since" in message
    assert f"delete {folder / LOCK_NAME}" in message
    assert json.loads((folder / LOCK_NAME).read_text()) == record  # left as it was


def test_an_unwritable_folder_raises_the_os_error_with_the_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError) as caught:
        FolderLock(blocker / "run").acquire()
    assert caught.value.filename is not None and str(blocker) in str(caught.value.filename)


RACE = """
import os, sys, time
from tfbn.utils.errors import UsageError
from tfbn.workflow.locks import FolderLock
folder, log, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
done = 0
deadline = time.monotonic() + 60
while done < rounds and time.monotonic() < deadline:
    try:
        with FolderLock(folder):
            with open(log, "a") as f:
                f.write(f"in {os.getpid()}\\n")
            time.sleep(0.002)
            with open(log, "a") as f:
                f.write(f"out {os.getpid()}\\n")
        done += 1
    except UsageError:
        pass
sys.exit(0 if done == rounds else 1)
"""


def test_racing_processes_never_hold_the_folder_together(tmp_path):
    folder, log = tmp_path / "run", tmp_path / "log"
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, str(folder), str(log), "40"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(3)
    ]
    try:
        codes = [racer.wait(timeout=120) for racer in racers]
        errors = [r.stderr.read() if c else "" for r, c in zip(racers, codes, strict=True)]
    finally:
        for racer in racers:
            kill(racer)
            racer.stdout.close()
            racer.stderr.close()
    assert codes == [0, 0, 0], errors
    lines = log.read_text().splitlines()
    assert len(lines) == 3 * 40 * 2
    # Each "in" is followed by the same process's "out": no two holders at once.
    for enter, leave in zip(lines[::2], lines[1::2], strict=True):
        assert enter.startswith("in ") and leave == "out " + enter[3:]


def test_a_folder_removed_while_mkdir_checks_it_is_created_again(tmp_path, monkeypatch):
    # Another holder's release removes the folder between mkdir finding it (EEXIST) and
    # checking that it is a folder: pathlib then raises FileExistsError for a missing folder.
    folder = tmp_path / "run"
    real_mkdir, raced = pathlib.Path.mkdir, []

    def mkdir_losing_one_race(self, *args, **kwargs):
        if self == folder and not raced:
            raced.append(True)
            raise FileExistsError(17, "File exists", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir_losing_one_race)
    with FolderLock(folder) as lock:
        assert lock.locked and raced
        assert read_holder(folder).pid == os.getpid()


def test_a_file_in_the_folders_place_raises_at_once(tmp_path):
    blocker = tmp_path / "run"
    blocker.write_text("not a folder")
    with pytest.raises(FileExistsError):
        FolderLock(blocker).acquire()
    assert blocker.read_text() == "not a folder"

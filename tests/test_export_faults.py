"""Exports under faults, with real processes and file systems: concurrent exports, a killed export,
an export folder that is read-only, full, under a file, or a link out of the export folder.

Read-only and full file systems are small tmpfs mounts in a private mount namespace
(`unshare -m`); those tests are skipped where the namespace cannot be created.
"""

import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from model_helpers import lenet

import tfbn
from tfbn.utils.saving import load_model

WORKTREE = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "lenet.keras"
    lenet("tfbn", np.random.default_rng(0)).save(path)
    return path


def _tfbn(*args, timeout=240, prefix=()):
    """Runs the `tfbn` command line in a new process."""
    return subprocess.run(
        [*prefix, sys.executable, "-m", "tfbn", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=WORKTREE,
    )


def _listing(path):
    return sorted(p.name for p in pathlib.Path(path).iterdir())


@pytest.mark.slow
def test_concurrent_exports_without_version_each_get_the_next_one(model_file, tmp_path):
    command = [sys.executable, "-m", "tfbn", "export", str(model_file), "--export-dir",
               str(tmp_path), "--name", "m"]  # fmt: skip
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    results = [process.communicate(timeout=300) for process in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], [err[-2000:] for _, err in results]
    written = sorted(out.strip().rsplit(" ", 1)[-1] for out, _ in results)
    assert written == [str(tmp_path / "m" / v) for v in ("1", "2", "3")]
    assert _listing(tmp_path / "m") == ["1", "2", "3"]  # no temporary folder left
    for version in ("1", "2", "3"):
        assert (tmp_path / "m" / version / "saved_model.pb").is_file()


_INTERRUPTED = """
import os, pathlib, signal, sys, time
import tensorflow as tf
import tfbn
from tfbn.utils.saving import load_model
from tfbn.utils.saving import load_model

model_path, export_dir, mode, ready = sys.argv[1:]

def save(module, path, signatures=None):
    pathlib.Path(path, "variables").mkdir(parents=True, exist_ok=True)
    pathlib.Path(path, "saved_model.pb").write_bytes(b"partial")
    pathlib.Path(ready).write_text("saving")
    if mode == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(300)

tf.saved_model.save = save
tfbn.export_saved_model(load_model(model_path), export_dir, name="m")
"""


def _start_interrupted(model_file, tmp_path, mode):
    script = tmp_path / "interrupted.py"
    script.write_text(_INTERRUPTED)
    ready = tmp_path / f"ready-{mode}"
    process = subprocess.Popen(
        [sys.executable, str(script), str(model_file), str(tmp_path / "exports"), mode, str(ready)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    while not ready.exists():
        assert process.poll() is None or mode == "die", process.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "the export never started saving"
        time.sleep(0.2)
    return process


def _temporaries(root):
    return [name for name in _listing(root) if name.startswith(".tmp-")]


@pytest.mark.slow
def test_a_killed_export_leaves_a_folder_the_next_export_removes(model_file, tmp_path):
    root = tmp_path / "exports" / "m"
    killed = _start_interrupted(model_file, tmp_path, "die")
    assert killed.wait(timeout=60) == -signal.SIGKILL
    assert len(_temporaries(root)) == 1  # what kill -9 leaves

    alive = _start_interrupted(model_file, tmp_path, "sleep")
    try:
        (live,) = set(_temporaries(root))  # the dead one was removed by the second export
        model = load_model(model_file)
        path = tfbn.export_saved_model(model, tmp_path / "exports", name="m")
        assert path == root / "1"
        assert _temporaries(root) == [live]  # a live export's folder is left alone
    finally:
        alive.kill()
        alive.wait(timeout=60)
    assert tfbn.export_saved_model(model, tmp_path / "exports", name="m") == root / "2"
    assert _listing(root) == ["1", "2"]


def test_an_export_folder_under_a_file_is_an_os_error_before_any_work(model_file, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    model = load_model(model_file)
    with pytest.raises(NotADirectoryError) as error:
        tfbn.export_saved_model(model, blocker / "exports", name="m")
    assert error.value.filename == str(blocker)
    (tmp_path / "exports").mkdir()
    (tmp_path / "exports" / "m").write_text("a file where the model folder goes")
    with pytest.raises(NotADirectoryError):
        tfbn.export_saved_model(model, tmp_path / "exports", name="m")


def test_a_name_cannot_lead_outside_the_export_folder(model_file, tmp_path):
    (tmp_path / "exports").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "exports" / "link").symlink_to(tmp_path / "elsewhere")
    model = load_model(model_file)
    with pytest.raises(ValueError, match="leads outside"):
        tfbn.export_saved_model(model, tmp_path / "exports", name="link")
    assert _listing(tmp_path / "elsewhere") == []


def test_the_command_line_reports_an_export_folder_under_a_file_in_one_line(model_file, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = _tfbn("export", model_file, "--export-dir", blocker / "exports")
    assert result.returncode == 2
    assert result.stderr.strip() == f"tfbn export: {blocker}: Not a directory"


def _in_a_tmpfs(options: str, mount: pathlib.Path, afterwards: str = ""):
    """A command prefix running the rest in a new mount namespace with a tmpfs at `mount`, then
    the shell commands `afterwards` (inside the namespace, before it goes)."""
    mount.mkdir()
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o {options} none {mount}"],
        capture_output=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private namespace: {probe.stderr.decode()[:200]}")
    script = f'mount -t tmpfs -o {options} none "{mount}" || exit 99; "$@"; code=$?; '
    return ("unshare", "-m", "sh", "-c", f"{script}{afterwards or ':'}; exit $code", "sh")


@pytest.mark.slow
def test_a_read_only_export_folder_is_one_line_before_any_work(model_file, tmp_path):
    mount = tmp_path / "ro"
    prefix = _in_a_tmpfs("ro,size=1m", mount)
    result = _tfbn("export", model_file, "--export-dir", mount / "exports", prefix=prefix)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == f"tfbn export: {mount}: Read-only file system"


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_leaves_nothing(model_file, tmp_path):
    mount = tmp_path / "full"
    left = tmp_path / "left.txt"
    # 48 KiB: LeNet's SavedModel needs more.
    prefix = _in_a_tmpfs("size=48k", mount, afterwards=f'ls -A "{mount}/exports/m" > "{left}"')
    args = ("export", model_file, "--export-dir", mount / "exports", "--name", "m")
    result = _tfbn(*args, prefix=prefix)
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip()
    assert line.startswith(f"tfbn export: {mount}/exports/m/.tmp-") and "\n" not in line
    assert line.endswith(": No space left on device")
    assert left.read_text().split() == []  # the temporary folder is gone


def test_invalid_arguments_create_nothing(model_file, tmp_path):
    result = _tfbn("export", model_file, "--export-dir", tmp_path / "exports", "--version", "0")
    assert result.returncode == 2 and "`version`" in result.stderr
    assert _listing(tmp_path) == []

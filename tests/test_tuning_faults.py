"""`tfbn tune` under faults, with real processes and file systems: a directory held by a live
search is refused at once (exit 2, the holder named), a killed search's lock is taken over, and
an unwritable directory or results file ends in one line naming the path before any data is read.
"""

import os
import socket
import subprocess
import sys
import time

import pytest
from holders import kill, lock_held
from os_faults import run_on_tmpfs
from train_helpers import search_data

import tfbn
import tfbn.workflow.data
from tfbn.cli import main as cli_main
from tfbn.workflow.locks import LOCK_NAME, read_holder

TIMEOUT_S = 180

# A real `tfbn.tune` that holds its directory and stops where it would load the data.
_HOLDING_SEARCH = """
import sys, time
import tfbn.workflow.tuning

def hold(*args, **kwargs):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))

tfbn.workflow.tuning._trial_data = hold
tfbn.workflow.tuning.tune(["none"], trials=1, epochs=1, directory=sys.argv[1], verbose=0)
"""


def _tune_cli(run_dir, *extra, data_dir=None, timeout=TIMEOUT_S):
    """`python -m tfbn tune` on `run_dir` in a new process (a data folder without data)."""
    argv = [sys.executable, "-m", "tfbn", "tune", "--run-dir", str(run_dir), "--verbose", "0"]
    argv += ["--variants", "none", "--trials", "1", "--epochs", "1", *extra]
    if data_dir is not None:
        argv += ["--data-dir", str(data_dir)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def _no_data_loading(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("data loaded")

    monkeypatch.setattr(tfbn.workflow.data, "load_fashion_mnist", fail)


def test_a_second_search_on_a_held_directory_exits_2_naming_the_holder(tmp_path):
    run_dir = tmp_path / "tune"
    empty = tmp_path / "no-data"
    empty.mkdir()
    with lock_held(_HOLDING_SEARCH, run_dir, 120) as holder:
        result = _tune_cli(run_dir, data_dir=empty)
        assert holder.poll() is None  # the holder still runs, its lock untouched
        assert read_holder(run_dir).pid == holder.pid
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"tfbn tune: error: {run_dir} is in use by process {holder.pid} ")
    assert f"on host {socket.gethostname()} since " in lines[0]
    # Refused before the data: with the lock passed, the empty data folder would be the error.
    assert "no-data" not in lines[0]
    assert sorted(os.listdir(run_dir)) == [LOCK_NAME]


def test_a_killed_search_leaves_a_lock_the_next_search_takes_over(tmp_path, capfd):
    run_dir = tmp_path / "tune"
    with lock_held(_HOLDING_SEARCH, run_dir, 120) as holder:
        kill(holder)
    assert read_holder(run_dir).pid == holder.pid
    result = tfbn.tune(
        ["none"],
        trials=1,
        epochs=1,
        directory=str(run_dir),
        dataset=search_data(num_train=128, num_validation=64),
        verbose=0,
    )
    notices = [line for line in capfd.readouterr().err.splitlines() if "taking over" in line]
    assert len(notices) == 1 and f"process {holder.pid} " in notices[0]
    assert result.trials_run["none"] == ["0"]
    assert not (run_dir / LOCK_NAME).exists()  # released after the search


def test_a_directory_under_a_file_is_named_in_one_line_and_nothing_is_created(
    tmp_path, monkeypatch, capsys
):
    _no_data_loading(monkeypatch)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli_main(["tune", "--run-dir", str(blocker / "tune"), "--verbose", "0"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"tfbn tune: {blocker}: Not a directory"]
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_a_results_path_that_is_a_folder_is_named_before_the_search(tmp_path, monkeypatch, capsys):
    _no_data_loading(monkeypatch)
    run_dir = tmp_path / "tune"
    (run_dir / "lenet_lr_results.json").mkdir(parents=True)
    assert cli_main(["tune", "--run-dir", str(run_dir), "--verbose", "0"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"tfbn tune: {run_dir / 'lenet_lr_results.json'}: Is a directory"]
    assert sorted(os.listdir(run_dir)) == ["lenet_lr_results.json"]


def test_invalid_arguments_create_nothing(tmp_path, monkeypatch, capsys):
    _no_data_loading(monkeypatch)
    run_dir = tmp_path / "tune"
    assert cli_main(["tune", "--run-dir", str(run_dir), "--seed", "-1", "--verbose", "0"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("tfbn tune: error: Argument `seed`") and "seed=-1" in line
    assert not run_dir.exists()


@pytest.mark.parametrize(
    "fault,path,reason",
    [("read-only", "", "Read-only file system"), ("full", f"/tune/{LOCK_NAME}", "No space left")],
)
def test_a_read_only_or_full_file_system_ends_in_one_line_before_the_data(
    tmp_path, fault, path, reason
):
    mount = tmp_path / "mnt"
    empty = tmp_path / "no-data"
    empty.mkdir()
    args = [sys.executable, "-m", "tfbn", "tune", "--run-dir", f"{mount}/tune", "--verbose", "0"]
    args += ["--variants", "none", "--trials", "1", "--data-dir", str(empty)]
    start = time.monotonic()
    result = run_on_tmpfs(args, mount, fault=fault, timeout=TIMEOUT_S)
    assert time.monotonic() - start < TIMEOUT_S
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"tfbn tune: {mount}{path}: {reason}")

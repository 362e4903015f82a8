"""`tfbn train` under faults, with real processes and files: a second run on a held run folder,
a lock left by a killed run, Ctrl-C and SIGTERM, damaged checkpoints, OS errors.

The processes run the real command line (`tests/train_helpers.py cli -- train ...`) on the
synthetic data of tests/train_helpers.py, with the settings of its reference run, so that a
resumed run can be compared with an uninterrupted one.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import os_faults
import pytest
from train_helpers import REFERENCE, reference_run, synthetic_data

import tfbn
from tfbn import cli

HELPER = pathlib.Path(__file__).with_name("train_helpers.py")
TIMEOUT_S = 240
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}


def _train_args(run_dir, **changes) -> list[str]:
    settings = {**REFERENCE, "run_dir": run_dir, "verbose": 2, **changes}
    args = ["train"]
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{flag[2:]}")
        else:
            args += [flag, str(value)]
    return args


def _cli(args, *, pause_marker=None, slow=None) -> list[str]:
    command = [sys.executable, str(HELPER), "cli"]
    if pause_marker is not None:
        command += ["--pause-marker", str(pause_marker)]
    if slow is not None:
        command += ["--slow", str(slow)]
    return [*command, "--", *map(str, args)]


def _run(command, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, env=ENV, capture_output=True, text=True, timeout=TIMEOUT_S, **kwargs
    )


def _started_until(command, marker) -> subprocess.Popen:
    """Starts `command` and waits until it has made `marker` (the middle of epoch 2)."""
    process = subprocess.Popen(
        command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not marker.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            out, err = process.communicate(timeout=30)
            pytest.fail(f"the run never reached the middle of epoch 2:\n{out[-2000:]}{err[-2000:]}")
        time.sleep(0.1)
    return process


@pytest.fixture
def stopped(request):
    """Kills the processes a test registers, should it fail before they end."""
    processes: list[subprocess.Popen] = []
    yield processes.append
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's final weights, history and run folder."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    return (*reference_run(run_dir), run_dir)


def _assert_model_equals_reference(run_dir, reference):
    weights = reference[0]
    saved = keras.saving.load_model(run_dir / "model.keras").get_weights()
    assert len(saved) == len(weights)
    for got, want in zip(saved, weights, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def _epochs_saved(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("epoch-*"))


def _hidden_files(run_dir) -> list[pathlib.Path]:
    """Temporary files and folders (tfbn's all start with a dot), the lock file included."""
    return [p for p in run_dir.rglob("*") if p.name.startswith(".")]


# ------------------------------------------------------------------------------------ the lock
def test_only_the_chief_locks_the_run_dir(tmp_path):
    # Every worker of a multi-worker run opens the same folder; the chief alone takes its lock
    # (two processes of one run on one machine would otherwise refuse each other).
    from tfbn.utils.errors import UsageError
    from tfbn.workflow.locks import LOCK_NAME, FolderLock
    from tfbn.workflow.training import RunDir

    folder = tmp_path / "run"
    with RunDir(folder, chief=False).lock():
        assert not folder.exists()  # a worker creates no lock file
    held = FolderLock(folder).acquire()  # another run's chief holds the folder
    try:
        with RunDir(folder, chief=False).lock():
            pass  # a worker is not refused
        with pytest.raises(UsageError, match="in use"), RunDir(folder, chief=True).lock():
            pass  # a second chief is
    finally:
        held.release()
    with RunDir(folder, chief=True).lock():
        assert (folder / LOCK_NAME).is_file()


def test_held_run_dir_refused_at_once_and_a_killed_runs_lock_taken_over(
    tmp_path, reference, stopped
):
    run_dir, marker = tmp_path / "run", tmp_path / "paused"
    args = _train_args(run_dir)
    holder = _started_until(_cli(args, pause_marker=marker), marker)
    stopped(holder)

    begun = time.monotonic()
    second = _run(_cli(args))
    elapsed = time.monotonic() - begun
    assert second.returncode == 2, second.stderr[-3000:]
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr
    assert lines[0].startswith("tfbn train: error: ")
    assert f"process {holder.pid}" in lines[0] and "in use" in lines[0], lines[0]
    # Refused before any training: no epoch line, nothing saved beyond the holder's epoch 1.
    assert "epoch 1/2" not in second.stdout
    assert _epochs_saved(run_dir) == ["epoch-0001"]
    print(f"second run refused in {elapsed:.1f} s (process start and imports included)")
    assert elapsed < 60

    holder.send_signal(signal.SIGKILL)
    assert holder.wait(timeout=30) == -signal.SIGKILL
    third = _run(_cli(args))
    assert third.returncode == 0, third.stderr[-3000:]
    notices = [line for line in third.stderr.splitlines() if "taking over" in line]
    assert len(notices) == 1 and f"process {holder.pid}" in notices[0], third.stderr
    assert "Resuming" in third.stdout and "after epoch 1 of 2" in third.stdout
    _assert_model_equals_reference(run_dir, reference)
    assert _hidden_files(run_dir) == []


# ---------------------------------------------------------------------------------- interrupts
@pytest.mark.parametrize(
    "signum, code, resume", [(signal.SIGINT, 130, True), (signal.SIGTERM, 143, False)]
)
def test_signal_ends_in_one_line_and_the_same_command_resumes(
    tmp_path, reference, stopped, signum, code, resume
):
    run_dir, marker = tmp_path / "run", tmp_path / "slow"
    args = _train_args(run_dir)
    process = _started_until(_cli(args, pause_marker=marker, slow=0.3), marker)
    stopped(process)
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines() == [
        "tfbn train: interrupted during epoch 2; run the same command to resume after epoch 1"
    ], err[-3000:]
    assert _epochs_saved(run_dir) == ["epoch-0001"]
    assert _hidden_files(run_dir) == []
    if resume:
        again = _run(_cli(args))
        assert again.returncode == 0, again.stderr[-3000:]
        assert "after epoch 1 of 2" in again.stdout
        _assert_model_equals_reference(run_dir, reference)


# --------------------------------------------------------------------------------- checkpoints
def _copy_of_reference_run(reference, tmp_path) -> pathlib.Path:
    copy = tmp_path / "run"
    shutil.copytree(reference[2], copy)
    assert _epochs_saved(copy) == ["epoch-0001", "epoch-0002"]
    return copy


def _truncate(path: pathlib.Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_json(path: pathlib.Path) -> None:
    path.write_text('{"epoch": 2, "config\x01": ')


def _resume(run_dir):
    keras.backend.clear_session()
    return tfbn.train("tfbn", run_dir=run_dir, verbose=0, dataset=synthetic_data(), **REFERENCE)


@pytest.mark.parametrize(
    "damage, name", [(_truncate, "weights.npz"), (_corrupt_json, "state.json")]
)
def test_damaged_newest_checkpoint_is_named_and_the_intact_one_resumed(
    tmp_path, reference, capsys, damage, name
):
    run_dir = _copy_of_reference_run(reference, tmp_path)
    damaged = run_dir / "checkpoints" / "epoch-0002" / name
    damage(damaged)
    result = _resume(run_dir)
    notices = capsys.readouterr().err.strip().splitlines()
    assert len(notices) == 1 and str(damaged) in notices[0], notices
    assert notices[0].startswith("tfbn: skipping the damaged checkpoint ")
    # Resumed after epoch 1 and trained epoch 2 again: the uninterrupted run's weights.
    assert result.initial_epoch == 1
    for got, want in zip(result.model.get_weights(), reference[0], strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert result.history[1]["loss"] == pytest.approx(reference[1][1]["loss"], abs=1e-5)
    # The damaged folder was replaced by an intact one.
    assert _resume(run_dir).initial_epoch == 2
    assert "damaged" not in capsys.readouterr().err


def test_no_intact_checkpoint_fails_in_one_line_naming_the_file_and_what_to_do(
    tmp_path, reference, capsys
):
    run_dir = _copy_of_reference_run(reference, tmp_path)
    weights = run_dir / "checkpoints" / "epoch-0002" / "weights.npz"
    _truncate(weights)
    state = run_dir / "checkpoints" / "epoch-0001" / "state.json"
    _corrupt_json(state)
    code = cli.main(["train", "--run-dir", str(run_dir), "--no-export", "--seed", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 3, err  # one line per damaged checkpoint, then the error
    assert err[-1].startswith("tfbn train: error: Argument `run_dir`: no intact checkpoint")
    assert str(weights) in err[0] and str(state) in err[1]
    assert str(weights) in err[-1] and f"Delete {run_dir} " in err[-1]


def test_checkpoints_from_before_the_manifest_are_named_as_such_with_what_to_do(
    tmp_path, reference, capsys
):
    run_dir = _copy_of_reference_run(reference, tmp_path)
    for folder in (run_dir / "checkpoints").glob("epoch-*"):
        (folder / "manifest.json").unlink()  # the layout older tfbn versions wrote
    code = cli.main(["train", "--run-dir", str(run_dir), "--no-export", "--seed", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 3, err
    assert not any("damaged" in line for line in err), err
    newest = run_dir / "checkpoints" / "epoch-0002"
    assert err[-1].startswith(f"tfbn train: error: Argument `run_dir`: the checkpoint {newest} ")
    assert "older tfbn (no manifest.json)" in err[-1]
    assert "another run_dir" in err[-1] and f"delete {run_dir}." in err[-1]


# ---------------------------------------------------------------------------------- OS errors
def test_invalid_arguments_create_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert cli.main(["train", "--seed", "-1", "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "`seed`" in err[0] and "-1" in err[0]
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert cli.main(["train", "--run-dir", str(run_dir), "--export-dir", str(blocker / "e")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"tfbn train: {blocker}: Not a directory"]
    assert list(tmp_path.iterdir()) == [blocker]


@pytest.mark.parametrize("where", ["run_dir", "export_dir"])
def test_read_only_output_folder_is_one_line_and_nothing_created(tmp_path, where):
    mount = tmp_path / "ro"
    run_dir = mount / "run" if where == "run_dir" else tmp_path / "run"
    args = _train_args(run_dir, export=True, export_dir=mount / "exports")
    done = os_faults.run_on_tmpfs(_cli(args), mount, fault="read-only", env=ENV)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0] == f"tfbn train: {mount}: Read-only file system", lines[0]
    assert "epoch 1/2" not in done.stdout
    assert not (tmp_path / "run").exists()


def test_full_disk_is_one_line_with_the_path_and_no_temporary_file_left(tmp_path):
    mount = tmp_path / "full"
    command = ["sh", "-c", '"$@"; code=$?; find "$M" -name ".*" ! -name .filler; exit $code', "sh"]
    args = _train_args(mount / "run")
    done = os_faults.run_on_tmpfs([*command, *_cli(args)], mount, fault="full", env=ENV)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"tfbn train: {mount}/run/"), lines[0]
    assert lines[0].endswith(": No space left on device"), lines[0]
    assert "Traceback" not in done.stderr
    left = [line for line in done.stdout.splitlines() if line.startswith(str(mount))]
    assert left == [], left


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_folder_without_write_permission_is_one_line(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert cli.main(["train", "--run-dir", str(locked / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{locked}: Permission denied" in err[0]
    assert list(locked.iterdir()) == []


def test_disk_full_during_the_run_is_one_line_with_the_path_and_no_temporary_file_left(tmp_path):
    # The run folder's lock file already holds a block (a killed run's record), so the lock is
    # taken on the full disk; the first checkpoint then finds no space.
    mount = tmp_path / "full"
    record = '{"pid": 999999, "host": "%s", "since": 0, "pad": "%04096d"}'
    prepare = f'mkdir "$M/run" && printf \'{record}\' "$(hostname)" 0 > "$M/run/.tfbn.lock"'
    command = ["sh", "-c", '"$@"; code=$?; find "$M" -name ".*" ! -name .filler; exit $code', "sh"]
    args = _train_args(mount / "run")
    done = os_faults.run_on_tmpfs(
        [*command, *_cli(args)], mount, fault="full", prepare=prepare, env=ENV
    )
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2 and "taking over" in lines[0], done.stderr
    assert lines[1].startswith(f"tfbn train: {mount}/run/checkpoints/"), lines[1]
    assert lines[1].endswith(": No space left on device"), lines[1]
    assert "epoch 1/2" in done.stdout  # the fault came during the run, not before it
    left = [line for line in done.stdout.splitlines() if line.startswith(str(mount))]
    assert left == [], left

"""run.sh, the README's two commands: it waits for another package manager (bounded, with a
message), shows pip's progress, lints before testing, names each test as it runs, and fails when
pytest collects nothing.

Each test runs the real script with bash, in a temporary copy of the tree where that matters, with a
stand-in virtual environment whose `python` and `ruff` forward to this environment's (or record
their arguments), so nothing is installed.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from holders import lock_held

ROOT = Path(__file__).resolve().parents[1]
RUN_SH = ROOT / "run.sh"
TIMEOUT_S = 120

# Holds an fcntl write lock on a file (as apt-get and dpkg do) for the given seconds.
_HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.lockf(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _wait_for_lock(lock, wait_s):
    env = dict(
        os.environ,
        TFBN_APT_LOCKS=f"{lock.parent / 'absent'} {lock}",
        TFBN_APT_LOCK_WAIT=str(wait_s),
    )
    start = time.monotonic()
    result = subprocess.run(
        ["bash", "-c", f'source "{RUN_SH}" && wait_for_apt_lock'],
        capture_output=True, text=True, timeout=TIMEOUT_S, env=env,
    )  # fmt: skip
    return result, time.monotonic() - start


def test_waits_for_the_package_manager_lock_then_gives_up_with_what_to_do(tmp_path):
    lock = tmp_path / "lock-frontend"
    with lock_held(_HOLD_LOCK, lock, 60) as holder:
        result, elapsed = _wait_for_lock(lock, 3)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith(f"[run.sh] waiting for {lock}, held by process {holder.pid} (")
    assert f"{lock} is still held by process {holder.pid}" in lines[-1]
    assert "run this command again" in lines[-1]
    assert 3 <= elapsed < 30


def test_waits_for_the_package_manager_lock_until_it_is_free(tmp_path):
    lock = tmp_path / "lock"
    with lock_held(_HOLD_LOCK, lock, 2):
        result, elapsed = _wait_for_lock(lock, 60)
    assert result.returncode == 0, result.stderr
    assert "waiting for" in result.stderr and "lock is free after" in result.stderr
    assert elapsed < 30
    # No lock held: no message, no wait.
    result, elapsed = _wait_for_lock(lock, 60)
    assert result.returncode == 0 and result.stderr == ""


def _forwarding_venv(folder: Path) -> Path:
    """A stand-in for .venv: its python and ruff run this environment's, nothing gets installed."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True)
    for name, target in (
        ("python", sys.executable),
        ("ruff", Path(sys.executable).with_name("ruff")),
    ):
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\nexec "{target}" "$@"\n')
        script.chmod(0o755)
    (folder / ".tfbn-installed").touch()
    return folder


@pytest.fixture
def tree(tmp_path):
    """A small project copy: run.sh, pyproject.toml, one passing test; a stand-in venv."""
    project = tmp_path / "project"
    (project / "tests").mkdir(parents=True)
    shutil.copy2(RUN_SH, project / "run.sh")
    shutil.copy2(ROOT / "pyproject.toml", project / "pyproject.toml")
    (project / "tests" / "test_one.py").write_text("def test_one():\n    assert 1 + 1 == 2\n")
    venv = _forwarding_venv(tmp_path / "venv")
    env = dict(os.environ, TFBN_VENV=str(venv), TFBN_DATA_DIR=str(tmp_path))
    return project, env


def _run_sh(project, env, *args):
    return subprocess.run(
        ["bash", str(project / "run.sh"), *args],
        capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=project,
    )  # fmt: skip


def test_test_command_names_each_test(tree):
    project, env = tree
    result = _run_sh(project, env, "test")
    assert result.returncode == 0, result.stdout + result.stderr
    # pytest-xdist's worker line: "[gw0] [100%] PASSED tests/test_one.py::test_one".
    assert "PASSED tests/test_one.py::test_one" in result.stdout


def test_no_test_collected_fails_the_run(tree):
    project, env = tree
    result = _run_sh(project, env, "test", "-k", "no_such_test")
    assert result.returncode == 1
    assert "[run.sh] pytest collected no tests: failing" in result.stderr


@pytest.mark.parametrize(
    "source", ["import os\n", "x = [1,2]\n"], ids=["lint-error", "not-formatted"]
)
def test_ruff_finding_fails_the_run_before_any_test(tree, source):
    project, env = tree
    (project / "bad.py").write_text(source)
    result = _run_sh(project, env, "test")
    assert result.returncode == 1
    assert "bad.py" in result.stdout + result.stderr
    assert "ruff found problems" in result.stderr
    assert "test_one" not in result.stdout  # pytest never started


def test_install_shows_pip_progress(tmp_path):
    # A venv whose python records its arguments: the install commands run.sh gives it.
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "calls"
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\n')
    python.chmod(0o755)
    env = dict(os.environ, TFBN_VENV=str(venv), TFBN_DATA_DIR=str(tmp_path))
    result = subprocess.run(
        ["bash", str(RUN_SH), "setup"], capture_output=True, text=True, timeout=TIMEOUT_S, env=env
    )
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    assert calls == [
        "-m pip install --upgrade pip",
        "-m pip install -e .[workflow,notebook,test,legacy,docs,jax]",
    ]
    assert (venv / ".tfbn-installed").exists()
    assert "installing tfbn[workflow,notebook,test,legacy,docs,jax]" in result.stderr

"""Every `tfbn` command under real file-system faults: a read-only or full file system, an output
path under a regular file, a file or folder this user may not read or write.

Each fault runs in one child process (a tmpfs of `os_faults.run_on_tmpfs`; or, for permissions,
as the unprivileged user `nobody`, since root may write anywhere): the child runs every
`command x fault` case of that fault with `tfbn.cli.main`, records each exit code and stderr,
and whether the work the command guards (loading the model or the data, running the benchmarks)
started. It then runs its last case once more as its own exit, so that the process's real exit
code and stderr are checked too. Contract (`tfbn.cli`): one line `tfbn <command>: <path>:
<reason>`, exit code 2, no traceback, and the work not started when the fault is on an output
location.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from model_helpers import write_idx
from os_faults import needs_mounts, run_on_tmpfs

from tfbn.workflow.data import IDX_FILES

TIMEOUT_S = 300
_SRC = str(pathlib.Path(__file__).resolve().parent.parent)
NOBODY = 65534
# Quick benchmark settings: the output folder is checked before these run.
BENCH = ["--quick", "--cases", "layer", "--repeats", "1", "--no-xla"]


@pytest.fixture(scope="module")
def inputs():
    """A world-readable folder (nobody runs the permission cases) with the commands' inputs:
    a tiny tfbn model, a Keras model to convert, an export folder, an image file, and IDX files
    with Fashion-MNIST's headers (enough for the checks made before any data are read)."""
    import keras

    import tfbn

    folder = pathlib.Path(tempfile.mkdtemp(prefix="tfbn-cli-faults-"))
    folder.chmod(0o755)
    tfbn.lenet("tfbn").save(folder / "lenet.keras")
    keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3), keras.layers.BatchNormalization()]
    ).save(folder / "keras.keras")
    export = folder / "export"
    export.mkdir()
    (export / "saved_model.pb").write_bytes(b"")  # never loaded: the cases fail before
    write_idx(folder / "images.idx", np.zeros((2, 28, 28), np.uint8))
    data = folder / "data"
    data.mkdir()
    for spec in IDX_FILES.values():
        header = bytes([0, 0, 0x08, len(spec.shape)])
        header += b"".join(int(d).to_bytes(4, "big") for d in spec.shape)
        (data / f"{spec.name}.gz").write_bytes(gzip.compress(header))
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield folder
    shutil.rmtree(folder)


# command -> its arguments, with {out} the faulty location, {in} the inputs; and the work that
# must not start when {out} fails ("model": keras.saving.load_model, "data": the data loading,
# "bench": the benchmark cases).
WRITES = {
    "convert": (["{in}/keras.keras", "{out}/sub/c.keras"], "model"),
    "recalibrate": (["{in}/lenet.keras", "--output", "{out}/sub/o.keras"], "model"),
    "export": (["{in}/lenet.keras", "--export-dir", "{out}/exports"], "model"),
    "train": (["--run-dir", "{out}/run", "--data-dir", "{in}/data", "--no-export"], "data"),
    "train --export-dir": (
        ["--run-dir", "{tmp}/run", "--export-dir", "{out}/exports", "--data-dir", "{in}/data"],
        "data",
    ),
    "tune": (["--run-dir", "{out}/tune", "--data-dir", "{in}/data", "--variants", "none"], "data"),
    "bench": (["--output-dir", "{out}/bench", *BENCH], "bench"),
}
# Cases of unreadable inputs (mode 0600, owned by root; the case runs as nobody): the path that
# must be named.
READS = {
    "convert": (["{secret}/keras.keras", "{tmp}/c.keras"], "{secret}/keras.keras"),
    "recalibrate": (["{secret}/lenet.keras", "--output", "{tmp}/o.keras"], "{secret}/lenet.keras"),
    "export": (["{secret}/lenet.keras", "--export-dir", "{tmp}/e"], "{secret}/lenet.keras"),
    "predict model": (["{secret}/export", "{in}/images.idx"], "{secret}/export/saved_model.pb"),
    "predict input": (["{in}/export", "{secret}/images.idx"], "{secret}/images.idx"),
    "train": (
        ["--run-dir", "{tmp}/run", "--data-dir", "{secret}/data"],
        "{secret}/data/train-images-idx3-ubyte.gz",
    ),
    "tune": (
        ["--run-dir", "{tmp}/tune", "--data-dir", "{secret}/data"],
        "{secret}/data/train-images-idx3-ubyte.gz",
    ),
    "recalibrate data": (
        ["{in}/lenet.keras", "--output", "{tmp}/o.keras", "--data-dir", "{secret}/data"],
        "{secret}/data/train-images-idx3-ubyte.gz",
    ),
}

# Run in the child: every case with tfbn.cli.main, the guarded work replaced by a recorder.
_MARK = "-- the last case as its own process --\n"
_CHILD = (
    f"MARK = {_MARK!r}\n"
    + """
import contextlib, io, json, os, sys, traceback
ENV = dict(os.environ)  # as this process was started
import keras, tfbn.workflow.bench, tfbn.workflow.data
from tfbn import cli

started = []
def recorder(kind, real):
    def record(*args, **kwargs):
        started.append(kind)
        return real(*args, **kwargs)
    return record

keras.saving.load_model = recorder("model", keras.saving.load_model)
tfbn.workflow.data.load_fashion_mnist = recorder("data", tfbn.workflow.data.load_fashion_mnist)
tfbn.workflow.bench._run_cases = recorder("bench", tfbn.workflow.bench._run_cases)

cases, results_path = json.loads(sys.argv[1]), sys.argv[2]
results = {}
for key, argv in cases.items():
    started.clear()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv + ["--verbose", "0"])
        except BaseException:
            code = "raised: " + traceback.format_exc()
    results[key] = {"code": code, "stderr": err.getvalue(), "started": sorted(set(started))}
with open(results_path, "w") as f:
    json.dump(results, f)
sys.stdout.flush()
sys.stderr.write(MARK)
sys.stderr.flush()
if os.geteuid() != 0:
    sys.exit(0)
os.execve(sys.executable, [sys.executable, "-m", "tfbn", *argv, "--verbose", "0"], ENV)
"""
)


def _fill(args, **places):
    return [arg.format(**{"in": places["inputs"], **places}) for arg in args]


def _command(key):
    return key.split()[0]


def _run_child(cases, results_path, run):
    """Runs the cases in one child through `run(command)`; returns (results, process)."""
    command = [sys.executable, "-c", _CHILD, json.dumps(cases), str(results_path)]
    env = dict(os.environ, TFDS_DATA_DIR=str(results_path.parent / "no-tfds"), PYTHONPATH=_SRC)
    process = run(command, env)
    assert results_path.exists(), process.stderr[-3000:]
    return json.loads(results_path.read_text()), process


@functools.cache
def _fault_results(fault, inputs):
    """Runs every write case of `fault` ("notdir", "read-only", "full", "permission")."""
    root = pathlib.Path(tempfile.mkdtemp(prefix=f"tfbn-{fault}-"))
    root.chmod(0o755)
    out = root / "mnt"
    blocker = root / "blocker"
    blocker.write_text("a regular file")
    out_of = {"notdir": blocker, "read-only": out, "full": out, "permission": out}[fault]
    out.mkdir()
    tmp = root / "tmp"
    tmp.mkdir()
    tmp.chmod(0o777)
    cases = {
        key: [_command(key), *_fill(args, out=out_of, tmp=tmp, inputs=inputs)]
        for key, (args, _) in WRITES.items()
        if (key, fault) not in _NOT_APPLICABLE
    }
    results_file = root / "results.json"
    root.chmod(0o777)
    try:
        if fault in ("read-only", "full"):
            results, process = _run_child(
                cases,
                results_file,
                lambda command, env: run_on_tmpfs(
                    command, out, fault=fault, timeout=TIMEOUT_S, env=env, cwd=tmp
                ),
            )
        elif fault == "permission":
            results, process = _run_child(cases, results_file, _as_nobody(tmp))
        else:
            results, process = _run_child(cases, results_file, _plain(tmp))
        return results, process, list(cases)[-1], out_of, sorted(os.listdir(tmp))
    finally:
        shutil.rmtree(root)


# Writes where a fault cannot be told before the work: a full disk is found by the first write
# (train's first checkpoint, recalibrate's model after its passes, bench's results after the
# benchmarks; tests/test_bench.py covers the latter).
_NOT_APPLICABLE = {
    ("train", "full"),
    ("train --export-dir", "full"),
    ("recalibrate", "full"),
    ("bench", "full"),
}
# Full disks: an empty file can still be created, so the work starts and the first write fails.
_WORK_EXPECTED = {("convert", "full"), ("export", "full")}


def _plain(cwd):
    def run(command, env):
        return subprocess.run(
            command, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=cwd
        )

    return run


_AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


@functools.cache
def _why_nobody_cannot_run_this_checkout() -> str | None:
    """Why the user nobody cannot import tfbn and Keras from this checkout, or None if it can.

    A checkout (or its virtual environment) under a folder nobody may not enter, such as root's
    home of mode 700, cannot run as nobody: the permission cases are skipped there, with the
    reason, instead of failing for where the project was cloned.
    """
    probe = (
        "import importlib.util as u, sys, tfbn.cli; assert u.find_spec('keras'), 'no keras'; "
        "assert tfbn.cli.__file__.startswith(sys.argv[1]), f'tfbn read from {tfbn.cli.__file__}'"
    )
    done = subprocess.run(
        [*_AS_NOBODY, sys.executable, "-c", probe, _SRC],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=_SRC),
        cwd="/",
    )
    if done.returncode == 0:
        return None
    lines = (done.stderr or done.stdout).strip().splitlines() or [f"exit {done.returncode}"]
    return lines[-1]


def _as_nobody(cwd):
    if os.geteuid() != 0:
        pytest.skip("needs root, to run the command as the unprivileged user nobody")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    reason = _why_nobody_cannot_run_this_checkout()
    if reason is not None:
        pytest.skip(
            f"the user nobody cannot run {sys.executable} with this checkout ({reason}): clone "
            "where every user may read (not under a home folder of mode 700) to run these cases"
        )

    def run(command, env):
        prefix = _AS_NOBODY
        home = cwd.parent / "home"
        home.mkdir(exist_ok=True)
        home.chmod(0o777)
        env = dict(env, HOME=str(home))
        return subprocess.run(
            prefix + command, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=cwd
        )

    return run


REASONS = {
    "notdir": "Not a directory",
    "read-only": "Read-only file system",
    "full": "No space left on device",
    "permission": "Permission denied",
}
WRITE_CASES = [
    (key, fault) for fault in REASONS for key in WRITES if (key, fault) not in _NOT_APPLICABLE
]


@pytest.mark.parametrize(("key", "fault"), WRITE_CASES, ids=[f"{k}-{f}" for k, f in WRITE_CASES])
def test_an_unwritable_output_is_one_line_before_the_work(key, fault, inputs):
    if fault in ("read-only", "full"):
        needs_mounts()
    results, _, _, out_of, left = _fault_results(fault, inputs)
    result = results[key]
    command = _command(key)
    assert result["code"] == 2, result
    (line,) = result["stderr"].splitlines()
    reason = REASONS[fault]
    if fault == "full":
        # The file being written when the disk filled up, below the mount.
        assert line.startswith(f"tfbn {command}: {out_of}/") and line.endswith(f": {reason}")
    else:
        assert line == f"tfbn {command}: {out_of}: {reason}"
    if (key, fault) in _WORK_EXPECTED:
        assert result["started"] == ["model"]
    else:
        assert result["started"] == [], f"{key} started {result['started']} before failing"
    # Nothing left where the command was pointed, nor in the scratch folder.
    assert left == [], f"left behind: {left}"


# Not "permission": nobody cannot start this interpreter anew (it lives under root's home here);
# tests/test_serving.py runs a whole process as nobody.
@pytest.mark.parametrize("fault", ["notdir", "read-only", "full"])
def test_the_process_itself_exits_2_with_one_line(fault, inputs):
    if fault in ("read-only", "full"):
        needs_mounts()
    results, process, last, _, _ = _fault_results(fault, inputs)
    assert process.returncode == 2, process.stderr[-3000:]
    assert _MARK in process.stderr, process.stderr[-3000:]
    own = process.stderr.split(_MARK, 1)[1]
    assert "Traceback" not in own
    assert own.splitlines() == results[last]["stderr"].splitlines()


@functools.cache
def _read_results(inputs):
    root = pathlib.Path(tempfile.mkdtemp(prefix="tfbn-unreadable-"))
    root.chmod(0o755)
    secret = root / "secret"
    shutil.copytree(inputs, secret)
    for path in secret.rglob("*"):
        if path.is_file():
            path.chmod(0o600)
    tmp = root / "tmp"
    tmp.mkdir()
    tmp.chmod(0o777)
    root.chmod(0o777)  # for the results file
    places = dict(secret=secret, tmp=tmp, inputs=inputs)
    cases = {key: [_command(key), *_fill(args, **places)] for key, (args, _) in READS.items()}
    paths = {key: path.format(**places) for key, (_, path) in READS.items()}
    try:
        results, process = _run_child(cases, root / "results.json", _as_nobody(tmp))
        return results, paths, sorted(os.listdir(tmp))
    finally:
        shutil.rmtree(root)


@pytest.mark.parametrize("key", list(READS))
def test_an_unreadable_input_is_one_line_naming_it(key, inputs):
    results, paths, left = _read_results(inputs)
    result = results[key]
    assert result["code"] == 2, result
    assert result["stderr"].splitlines() == [
        f"tfbn {_command(key)}: {paths[key]}: Permission denied"
    ]
    # tune reads its data files in `load_fashion_mnist`, under the run folder's lock (which
    # removes the folder it made); the others check them before any work.
    assert result["started"] == (["data"] if key == "tune" else []), key
    assert left == [], f"left behind: {left}"


def test_an_existing_folder_the_system_refuses_to_create_in_is_named_as_such(tmp_path, capsys):
    from tfbn import cli

    # ENOENT for a path that exists: the OS refused to create something in it.
    refused = OSError(2, "No such file or directory", str(tmp_path))
    line = cli._os_error_line(refused)
    assert line == f"{tmp_path}: cannot create files in this folder (No such file or directory)"
    missing = OSError(2, "No such file or directory", str(tmp_path / "absent"))
    assert cli._os_error_line(missing) == f"{tmp_path / 'absent'}: No such file or directory"
    if not os.path.isdir("/proc/self"):
        pytest.skip("needs Linux's /proc")
    assert cli.main(["train", "--run-dir", "/proc/nope/x"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert (
        line == "tfbn train: /proc: cannot create files in this folder (No such file or directory)"
    )

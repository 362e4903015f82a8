"""`tfbn train`, `tune`, `convert`, `recalibrate` and `export` refuse bad settings, bad input
models and unwritable outputs before TensorFlow is imported: the one line comes at once, not after
the import (seconds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest

# Runs the command line in a fresh interpreter and reports its exit code, its stderr and whether
# TensorFlow was imported by the time it returned.
_CHILD = """
import contextlib, io, json, sys
from tfbn import cli
err = io.StringIO()
with contextlib.redirect_stderr(err):
    code = cli.main(sys.argv[1:])
print(json.dumps({"code": code, "stderr": err.getvalue(), "tf": "tensorflow" in sys.modules}))
"""


def _run(tmp_path, *argv):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture
def not_a_folder(tmp_path):
    path = tmp_path / "file"
    path.write_text("not a folder")
    return path


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["train", "--epochs", "0"], "error: Argument `epochs` must be a positive integer"),
        (["train", "--learning-rate", "-1"], "error: Argument `learning_rate`"),
        (["train", "--run-dir", "{file}/run"], "{file}: Not a directory"),
        (["train", "--export-dir", "{file}/out"], "{file}: Not a directory"),
        (["tune", "--trials", "0"], "error: Argument `trials`"),
        (["tune", "--run-dir", "{file}/tune"], "{file}: Not a directory"),
        (["convert", "absent.keras", "out.keras"], "absent.keras: No such file or directory"),
        (["convert", "{file}", "out.keras"], "a model must be a .keras file"),
        (["convert", "{model}", "out.h5"], "Argument `output` must end in '.keras'"),
        (["convert", "{model}", "{file}/out.keras"], "{file}: Not a directory"),
        (["recalibrate", "{model}", "--output", "{file}/r.keras"], "{file}: Not a directory"),
        (["recalibrate", "absent.keras"], "absent.keras: No such file or directory"),
        (["export", "{model}", "--export-dir", "{file}/e"], "{file}: Not a directory"),
        (["export", "{broken}"], "corrupt or truncated .keras file"),
    ],
)
def test_the_error_comes_before_tensorflow_is_imported(tmp_path, not_a_folder, argv, words):
    # A valid .keras archive (the check reads it, no model is built) and a truncated one.
    model, broken = tmp_path / "m.keras", tmp_path / "broken.keras"
    with zipfile.ZipFile(model, "w") as archive:
        archive.writestr("config.json", json.dumps({"class_name": "Sequential"}))
    broken.write_bytes(model.read_bytes()[:-10])
    places = {"file": not_a_folder, "model": model, "broken": broken}
    argv = [a.format(**places) for a in argv]
    before = sorted(p.name for p in tmp_path.iterdir())
    result = _run(tmp_path, *argv)
    assert result["code"] == 2
    (line,) = result["stderr"].splitlines()
    assert line.startswith(f"tfbn {argv[0]}: ")
    assert words.format(**places) in line
    assert not result["tf"]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created


def test_good_settings_go_on_to_import_tensorflow(tmp_path, not_a_folder):
    # The same check passes good settings through: the command then fails later, on the
    # missing data folder, after TensorFlow is imported.
    result = _run(tmp_path, "train", "--epochs", "1", "--data-dir", str(not_a_folder / "no"))
    assert result["code"] == 2 and result["tf"]
    assert "data_dir" in result["stderr"]

"""tfbn on Keras's PyTorch backend: tests/torch_cases.py in the Python named by TFBN_TORCH_PYTHON.

torch is several gigabytes with its CUDA libraries, more than CI installs, so this test is marked
`torch` and the default run deselects it (pyproject.toml's `addopts`). To run it, make a virtual
environment of its own (torch, keras, numpy, h5py, pytest, and tfbn installed with `--no-deps`, so
without TensorFlow), then:

    TFBN_TORCH_PYTHON=/path/to/venv/bin/python pytest -m torch tests/test_torch_backend.py

The cases run under KERAS_BACKEND=torch without the suite's conftest.py; the JUnit report must list
every case passed, so that a module that collects nothing or fails to import does not pass.
"""

import os
import pathlib
import subprocess
import xml.etree.ElementTree as ET

import pytest

CASES = pathlib.Path(__file__).with_name("torch_cases.py")
ROOT = CASES.parents[1]


@pytest.mark.torch
def test_torch_backend_cases_pass(tmp_path):
    python = os.environ.get("TFBN_TORCH_PYTHON")
    if not python:
        pytest.skip("TFBN_TORCH_PYTHON is not set (a Python with torch, keras and tfbn)")
    if not pathlib.Path(python).exists():
        pytest.fail(f"TFBN_TORCH_PYTHON={python!r} does not exist.")
    report = tmp_path / "torch_report.xml"
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest"]
        + [f"--junitxml={report}", f"--rootdir={ROOT}", str(CASES)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    output = result.stdout[-6000:] + result.stderr[-3000:]
    print(output)
    assert report.exists(), output
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        outcomes[case.get("name")] = next(
            (k for k in ("failure", "error", "skipped") if k in kinds), "passed"
        )
    not_passed = {name: kind for name, kind in outcomes.items() if kind != "passed"}
    assert outcomes and not not_passed and result.returncode == 0, output

"""Keras's own test module for BatchNormalization, run against tfbn.BatchNorm.

The module ships inside the installed keras package
(`keras/src/layers/normalization/batch_normalization_test.py`). It is read from there, every
`layers.BatchNormalization` in it becomes `tfbn.BatchNorm`, and the result runs under pytest in
a subprocess, once with the TensorFlow backend and once with JAX. Nothing of it is copied into
this repository.
"""

import importlib.util
import os
import pathlib
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

KERAS_MODULE = "keras.src.layers.normalization.batch_normalization_test"

# Keras's pytest.ini and conftest.py (in the keras repository, not in the wheel): its markers,
# and warnings as errors but for the categories Keras lets through.
PYTEST_INI = """[pytest]
markers =
    requires_trainable_backend: a test that needs a backend with training support
    multi_device: a test that needs several devices
filterwarnings =
    error
    ignore::DeprecationWarning
    ignore::ImportWarning
    ignore::RuntimeWarning
    ignore::PendingDeprecationWarning
    ignore::FutureWarning
    ignore::UserWarning
"""


def _keras_test_source() -> str:
    spec = importlib.util.find_spec(KERAS_MODULE)
    if spec is None or spec.origin is None:
        pytest.fail(f"The installed keras package has no {KERAS_MODULE}.")
    return pathlib.Path(spec.origin).read_text()


def _with_tfbn(source: str) -> str:
    assert source.count("layers.BatchNormalization") >= 10, "Keras's test module changed shape"
    return "import tfbn\n" + source.replace("layers.BatchNormalization", "tfbn.BatchNorm")


def _outcomes(report: pathlib.Path) -> dict[str, str]:
    """Test name -> "passed", "failed", "error" or "skipped", from a JUnit XML report."""
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        outcome = next((k for k in ("failure", "error", "skipped") if k in kinds), "passed")
        outcomes[case.get("name")] = {"failure": "failed"}.get(outcome, outcome)
    return outcomes


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_keras_batch_normalization_suite_passes_with_tfbn(tmp_path, backend):
    (tmp_path / "pytest.ini").write_text(PYTEST_INI)
    module = tmp_path / "test_tfbn_in_keras_suite.py"
    module.write_text(_with_tfbn(_keras_test_source()))
    report = tmp_path / "report.xml"
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    root = pathlib.Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(module)]
        + [f"--junitxml={report}", f"--rootdir={tmp_path}", "-c", str(tmp_path / "pytest.ini")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert report.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    outcomes = _outcomes(report)
    failed = sorted(name for name, outcome in outcomes.items() if outcome in ("failed", "error"))
    passed = [name for name, outcome in outcomes.items() if outcome == "passed"]
    print(
        f"Keras's suite with tfbn.BatchNorm on {backend}: {len(passed)} passed, "
        f"{len(failed)} failed"
    )
    for name in failed:
        print("FAILED", name)
    assert not failed, f"{len(failed)} of {len(outcomes)} failed: {failed}\n{result.stdout[-4000:]}"
    assert passed, f"no test ran:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    assert result.returncode == 0, result.stdout[-3000:]

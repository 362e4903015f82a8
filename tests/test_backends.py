"""tfbn on Keras's JAX backend: tests/jax_cases.py in a process of its own (the backend is fixed
when Keras is imported), and `.keras` files crossing between TensorFlow and JAX both ways.

The JAX process runs without the suite's conftest.py (TensorFlow's logical devices) and with four
XLA host devices (for `keras.distribution.DataParallel`); its JUnit report must list every case
passed, so that a module that collects nothing or fails to import does not pass.
"""

import importlib.util
import os
import pathlib
import subprocess
import sys
import xml.etree.ElementTree as ET

import keras
import numpy as np

import tfbn

CASES = pathlib.Path(__file__).with_name("jax_cases.py")


def _model_with_options() -> keras.Model:
    inputs = keras.Input((6, 5, 4))
    x = tfbn.BatchNorm(renorm=True, renorm_clipping={"rmax": 3.0}, momentum=0.5)(inputs)
    x = tfbn.BatchNorm(axis=1, virtual_batch_size=4, center=False, momentum=0.5)(x)
    x = keras.layers.Reshape((6, 20))(x)
    x = tfbn.BatchNorm(epsilon=1e-2, scale=False, momentum=0.5)(x)
    return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(x)))


def _run_jax_cases(folder: pathlib.Path) -> dict[str, str]:
    """Runs tests/jax_cases.py under KERAS_BACKEND=jax; test name -> outcome."""
    report = folder / "jax_report.xml"
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "TFBN_CROSS_DIR": str(folder),
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    root = CASES.parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist"]
        + ["--noconftest", f"--junitxml={report}", f"--rootdir={root}", str(CASES)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = result.stdout[-6000:] + result.stderr[-3000:]
    assert report.exists(), output
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        outcomes[case.get("name")] = next(
            (k for k in ("failure", "error", "skipped") if k in kinds), "passed"
        )
    assert outcomes and result.returncode == 0, output
    return outcomes


def test_jax_backend_cases_pass_and_keras_files_cross_between_backends(tmp_path):
    assert importlib.util.find_spec("jax") is not None, "install tfbn[jax] (jax on the CPU)"
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((8, 6, 5, 4)) * 2 + 50).astype("float32")
    model = _model_with_options()
    model.compile("sgd", "mse")
    model.fit(x, rng.standard_normal((8, 3)).astype("float32"), batch_size=8, verbose=0)
    model.save(tmp_path / "from_tensorflow.keras")
    np.savez(tmp_path / "from_tensorflow.npz", x=x, y=model.predict(x, verbose=0))

    outcomes = _run_jax_cases(tmp_path)
    not_passed = {name: kind for name, kind in outcomes.items() if kind != "passed"}
    assert not not_passed, not_passed
    assert "test_keras_files_cross_between_tensorflow_and_jax" in outcomes

    data = np.load(tmp_path / "from_jax.npz")
    loaded = keras.saving.load_model(tmp_path / "from_jax.keras")
    assert sum(isinstance(layer, tfbn.BatchNorm) for layer in loaded.layers) == 3
    np.testing.assert_allclose(loaded.predict(data["x"], verbose=0), data["y"], atol=1e-5)

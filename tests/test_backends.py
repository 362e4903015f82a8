"""tfbn on Keras's JAX backend: every `tests/jax_*cases.py` file in one process of its own (the
backend is fixed when Keras is imported), and `.keras` files crossing between TensorFlow and JAX
both ways.

The JAX process runs without the suite's conftest.py (TensorFlow's logical devices) and with four
XLA host devices (for `keras.distribution.DataParallel`); its JUnit report must list every case
passed and at least one case per file, so that a file that collects nothing or fails to import
does not pass.

Files the JAX cases load are prepared here, on TensorFlow, in the folder `TFBN_CROSS_DIR` names:
`from_tensorflow.*` (a model with tfbn's options) and `synchronized_*` (a model with Keras's
`BatchNormalization(synchronized=True)`, as Keras saved it and as `tfbn.convert` made it).
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

CASE_FILES = sorted(pathlib.Path(__file__).parent.glob("jax_*cases.py"))


def _model_with_options() -> keras.Model:
    inputs = keras.Input((6, 5, 4))
    x = tfbn.BatchNorm(renorm=True, renorm_clipping={"rmax": 3.0}, momentum=0.5)(inputs)
    x = tfbn.BatchNorm(axis=1, virtual_batch_size=4, center=False, momentum=0.5)(x)
    x = keras.layers.Reshape((6, 20))(x)
    x = tfbn.BatchNorm(epsilon=1e-2, scale=False, momentum=0.5)(x)
    return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(x)))


def _save_model_with_options(folder: pathlib.Path, rng) -> None:
    x = (rng.standard_normal((8, 6, 5, 4)) * 2 + 50).astype("float32")
    model = _model_with_options()
    model.compile("sgd", "mse")
    model.fit(x, rng.standard_normal((8, 3)).astype("float32"), batch_size=8, verbose=0)
    model.save(folder / "from_tensorflow.keras")
    np.savez(folder / "from_tensorflow.npz", x=x, y=model.predict(x, verbose=0))


def _save_synchronized_model(folder: pathlib.Path, rng) -> None:
    """Keras's synchronized batch norm (which Keras loads on TensorFlow only), and its tfbn copy."""
    x = (rng.standard_normal((16, 6, 6, 3)) * 3 + 2).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((6, 6, 3)),
            keras.layers.Conv2D(4, 3),
            keras.layers.BatchNormalization(synchronized=True, momentum=0.5),
            keras.layers.ReLU(),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )
    model.compile("sgd", "mse")
    model.fit(x, rng.standard_normal((16, 3)).astype("float32"), batch_size=8, verbose=0)
    model.save(folder / "synchronized_keras.keras")
    converted = tfbn.convert(model)
    converted.save(folder / "synchronized_converted.keras")
    np.savez(folder / "synchronized.npz", x=x, y=model.predict(x, verbose=0))


def _run_jax_cases(folder: pathlib.Path) -> dict[tuple[str, str], str]:
    """Runs every tests/jax_*cases.py under KERAS_BACKEND=jax; (file stem, test) -> outcome."""
    report = folder / "jax_report.xml"
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "TFBN_CROSS_DIR": str(folder),
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    root = pathlib.Path(__file__).parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist"]
        + ["--noconftest", f"--junitxml={report}", "-o", "junit_family=xunit1"]
        + [f"--rootdir={root}"]
        + [str(path) for path in CASE_FILES],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    output = result.stdout[-6000:] + result.stderr[-3000:]
    assert report.exists(), output
    stems = {path.stem for path in CASE_FILES}
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        # xunit1 reports name each case's file ("" for a collection error).
        stem = pathlib.Path(case.get("file") or "").stem
        outcomes[stem, case.get("name")] = next(
            (k for k in ("failure", "error", "skipped") if k in kinds), "passed"
        )
    assert result.returncode == 0, output
    empty = stems - {stem for stem, _ in outcomes}
    assert not empty, f"no case ran from {sorted(empty)}:\n{output}"
    return outcomes


def test_jax_backend_cases_pass_and_keras_files_cross_between_backends(tmp_path):
    assert importlib.util.find_spec("jax") is not None, "install tfbn[jax] (jax on the CPU)"
    assert pathlib.Path(__file__).with_name("jax_cases.py") in CASE_FILES
    rng = np.random.default_rng(0)
    _save_model_with_options(tmp_path, rng)
    _save_synchronized_model(tmp_path, rng)

    outcomes = _run_jax_cases(tmp_path)
    not_passed = {name: kind for name, kind in outcomes.items() if kind != "passed"}
    assert not not_passed, not_passed
    assert ("jax_cases", "test_keras_files_cross_between_tensorflow_and_jax") in outcomes
    assert (
        "jax_tools_cases",
        "test_synchronized_batch_norm_converted_on_tensorflow_loads_on_jax",
    ) in outcomes

    data = np.load(tmp_path / "from_jax.npz")
    loaded = keras.saving.load_model(tmp_path / "from_jax.keras")
    assert sum(isinstance(layer, tfbn.BatchNorm) for layer in loaded.layers) == 3
    np.testing.assert_allclose(loaded.predict(data["x"], verbose=0), data["y"], atol=1e-5)

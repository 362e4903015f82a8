"""tfbn.legacy.BatchNorm in TF1 graph mode, side by side with tf-keras's layer.

In this process: graphs built under `tf.Graph().as_default()` and run in a `tf.compat.v1.Session`.
With eager execution disabled (`tf.compat.v1.disable_eager_execution()`, which a process cannot
undo): tests/legacy_graph_cases.py, run once in a process of its own, each of its tests reported
here as a case of `test_with_eager_execution_disabled`.
"""

import ast
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tf_keras
from legacy_helpers import LAYERS, _tf_keras_state  # noqa: F401 - autouse fixture

ROOT = Path(__file__).resolve().parents[1]
CASES = ROOT / "tests" / "legacy_graph_cases.py"

GRAPH_CASES = {
    "rank4_fused": ({}, (8, 3, 4, 5)),
    "rank4_channels_first": ({"axis": 1}, (8, 3, 4, 5)),
    "rank2": ({}, (8, 5)),
    "unfused": ({"fused": False}, (8, 3, 4, 5)),
    "renorm": ({"renorm": True, "renorm_clipping": {"rmax": 1.5, "dmax": 0.5}}, (8, 6)),
    "ghost": ({"virtual_batch_size": 2}, (8, 3, 4)),
    "axis_list": ({"axis": [1, 3]}, (8, 2, 3, 4)),
    "mask_rank3": ({"mask": True}, (6, 7, 4)),
    "training_tensor": ({"training_tensor": True}, (8, 3, 4, 5)),
}


def _run_in_graph(cls, kwargs, x, mask):
    """Builds the layer on placeholders in a new graph; runs two training steps (outputs, then
    the ops of `layer.updates`) and one inference call in a session."""
    kwargs = dict(kwargs)
    kwargs.pop("mask", None)
    training_tensor = kwargs.pop("training_tensor", False)
    with tf.Graph().as_default() as graph:
        assert not tf.compat.v1.executing_eagerly_outside_functions()
        layer = cls(momentum=0.5, **kwargs)
        inputs = tf.compat.v1.placeholder(tf.float32, (None, *x.shape[1:]))
        feed = {inputs: x}
        mask_t = None
        if mask is not None:
            mask_t = tf.compat.v1.placeholder(tf.bool, (None, *mask.shape[1:]))
            feed[mask_t] = mask
        training = tf.compat.v1.placeholder(tf.bool, ()) if training_tensor else True
        train = layer(inputs, training=training, mask=mask_t)
        updates = layer.updates
        infer = layer(inputs, training=False)
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            if training_tensor:
                feed[training] = True
            outputs = [session.run([train, updates], feed)[0] for _ in range(2)]
            if training_tensor:
                # Fed False, the same graph runs inference and its updates change nothing.
                feed[training] = False
                outputs.append(session.run([train, updates], feed)[0])
            outputs.append(session.run(infer, feed))
            weights = session.run(layer.weights)
    return layer.fused, outputs, weights


@pytest.mark.parametrize("case", sorted(GRAPH_CASES))
def test_graph_training_steps_match_tf_keras(rng, case):
    """A layer built on placeholders in a `tf.Graph` (no `int()` of a symbolic value anywhere):
    its training outputs, updates, inference output and `fused` equal tf-keras's."""
    kwargs, shape = GRAPH_CASES[case]
    x = rng.normal(size=shape) * 2 + 1
    mask = rng.random(shape[:-1]) > 0.4 if kwargs.get("mask") else None
    ours, theirs = (_run_in_graph(cls, kwargs, x, mask) for cls in LAYERS)
    assert ours[0] is theirs[0]
    for got, want in zip(ours[1] + ours[2], theirs[1] + theirs[2], strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_learning_phase_one_in_a_graph_uses_batch_statistics():
    """test_batchnorm_trainable: in a graph, inside `learning_phase_scope(1)`, `predict` of a
    model normalizes with the batch statistics (float64 NumPy), not the moving ones."""
    val_a = np.expand_dims(np.arange(10.0), axis=1)
    want = (val_a - val_a.mean()) / np.sqrt(val_a.var() + 1e-3)
    for cls in LAYERS:
        with tf.Graph().as_default(), tf.compat.v1.Session().as_default():
            with tf_keras.backend.learning_phase_scope(1):
                inputs = tf_keras.Input(shape=(1,))
                model = tf_keras.Model(inputs, cls()(inputs))
                model.set_weights([np.array([v]) for v in (1.0, 0.0, 0.5, 100.0)])
                model.compile(loss="mse", optimizer="rmsprop")
                out = model.predict(val_a, verbose=0)
        np.testing.assert_allclose(out, want, atol=1e-3)


# ----------------------------------------------------------------- eager execution disabled
def _case_names() -> list[str]:
    tree = ast.parse(CASES.read_text())
    return [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name[:5] == "test_"]


@pytest.fixture(scope="module")
def graph_mode_results(tmp_path_factory):
    """Runs tests/legacy_graph_cases.py once; per test function, its junit outcomes."""
    report = tmp_path_factory.mktemp("legacy_graph") / "junit.xml"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [
        sys.executable,
        "-m",
        "pytest",
        str(CASES),
        "--noconftest",
        "-p",
        "no:cacheprovider",
        "-q",
        f"--junitxml={report}",
    ]
    proc = subprocess.run(
        command, cwd=ROOT / "tests", env=env, capture_output=True, text=True, timeout=900
    )
    if not report.exists():
        pytest.fail(
            f"legacy_graph_cases.py did not run:\n{proc.stdout[-4000:]}{proc.stderr[-4000:]}"
        )
    results = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        function = case.get("name").split("[")[0]
        problems = [child for child in case if child.tag in ("failure", "error", "skipped")]
        detail = "\n".join(f"{p.tag}: {p.get('message')}\n{p.text or ''}" for p in problems)
        results.setdefault(function, []).append((case.get("name"), detail))
    return results


@pytest.mark.parametrize("name", _case_names())
def test_with_eager_execution_disabled(graph_mode_results, name):
    """One test function of tests/legacy_graph_cases.py (every parametrization of it) passed in
    a process with eager execution disabled."""
    runs = graph_mode_results.get(name)
    assert runs, f"{name} was not run"
    failed = [f"{case}\n{detail}" for case, detail in runs if detail]
    assert not failed, "\n\n".join(failed)[-6000:]

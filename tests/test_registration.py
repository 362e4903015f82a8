"""`import tfbn` is all a fresh process needs to load a `.keras` file holding tfbn's layers.

One process builds, trains a few steps and saves models holding `tfbn.BatchNorm` with each of its
options, a model converted by `tfbn.convert` and one folded by `tfbn.fold_batch_norm`, with their
inference outputs. Fresh processes then load every file with nothing but `import tfbn` and
`keras.saving.load_model` (safe mode, no `custom_objects`), with `tfbn` imported before Keras
and after it, and compute the outputs again; the test compares them with the saved ones. The same
processes report which modules `import tfbn` brought in. A tf-keras model holding
`tfbn.legacy.BatchNorm` loads in tf-keras after `import tfbn.legacy`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
ORDERS = ("tfbn-first", "keras-first")
TIMEOUT_S = 300

# Saves the models in argv[1]: NAME.keras, NAME.npz (input x, inference output y) and
# manifest.json ({name: {layer name: class}}), and legacy.keras / legacy.npz for tf-keras.
_SAVE = r"""
import json, sys
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
import tf_keras

import tfbn
import tfbn.legacy
from tfbn.tools.folding import ChannelAffine, FoldedAway

out = Path(sys.argv[1])
rng = np.random.default_rng(0)


def adjustment(shape):
    # Per-channel (scale, bias) for the normalized values in training; not serialized.
    return tf.constant([1.5]), tf.constant([0.25])


BATCH_NORMS = {
    "defaults": ((4, 4, 3), lambda: [tfbn.BatchNorm()]),
    "keras_arguments": ((5,), lambda: [tfbn.BatchNorm(
        momentum=0.5, epsilon=0.01, beta_initializer="ones", gamma_initializer="random_uniform",
        moving_variance_initializer="ones", gamma_regularizer="l2", beta_constraint="non_neg",
    )]),
    "renorm": ((4, 4, 3), lambda: [tfbn.BatchNorm(
        momentum=0.5, renorm=True, renorm_clipping={"rmax": 2.0, "rmin": 0.5, "dmax": 1.0},
        renorm_momentum=0.5,
    )]),
    "ghost_batches": ((6,), lambda: [tfbn.BatchNorm(momentum=0.5, virtual_batch_size=4)]),
    "adjustment": ((4, 4, 3), lambda: [tfbn.BatchNorm(momentum=0.5, adjustment=adjustment)]),
    "no_center_no_scale": ((5,), lambda: [tfbn.BatchNorm(momentum=0.5, center=False, scale=False)]),
    "channels_first": ((3, 5, 5), lambda: [
        keras.layers.Conv2D(4, 3, data_format="channels_first"),
        tfbn.BatchNorm(axis=1, momentum=0.5),
    ]),
    "synchronized": ((4, 4, 3), lambda: [tfbn.BatchNorm(momentum=0.5, synchronized=True)]),
    "fused": ((4, 4, 3), lambda: [tfbn.BatchNorm(momentum=0.5, fused=True)]),
    "composed": ((4, 4, 3), lambda: [tfbn.BatchNorm(momentum=0.5, fused=False)]),
    "mixed_float16": ((5,), lambda: [tfbn.BatchNorm(momentum=0.5, dtype="mixed_float16")]),
}


def data(shape):
    return (3.0 + 2.0 * rng.normal(size=(8, *shape))).astype("float32")


def trained(model, x):
    for _ in range(3):
        model(x, training=True)
    return model


def convert_source():
    inputs = keras.Input((6, 6, 3))
    h = keras.layers.Conv2D(4, 3)(inputs)
    h = keras.layers.BatchNormalization(momentum=0.5)(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(3)(h)
    return keras.Model(inputs, keras.layers.BatchNormalization(momentum=0.5)(h))


def fold_source():
    inputs = keras.Input((6, 6, 3))
    h = keras.layers.Conv2D(4, 3)(inputs)
    h = tfbn.BatchNorm(momentum=0.5, name="folds")(h)  # into the Conv2D: FoldedAway
    h = keras.layers.ReLU()(h)
    return keras.Model(inputs, tfbn.BatchNorm(momentum=0.5, name="kept")(h))  # ChannelAffine


models = {}
for name, (shape, layers) in BATCH_NORMS.items():
    x = data(shape)
    models[name] = (trained(keras.Sequential([keras.Input(shape), *layers()]), x), x)
x = data((6, 6, 3))
converted = tfbn.convert(trained(convert_source(), x))
assert sum(isinstance(layer, tfbn.BatchNorm) for layer in converted.layers) == 2
models["converted"] = (converted, x)
folded = tfbn.fold_batch_norm(trained(fold_source(), x))
kinds = {type(layer) for layer in folded.layers}
assert {ChannelAffine, FoldedAway} <= kinds and not any(
    isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers
)
models["folded"] = (folded, x)

manifest = {}
for name, (model, x) in models.items():
    model.save(out / f"{name}.keras")
    y = keras.ops.convert_to_numpy(model(x, training=False))
    np.savez(out / f"{name}.npz", x=x, y=y)
    manifest[name] = {layer.name: type(layer).__qualname__ for layer in model.layers}
(out / "manifest.json").write_text(json.dumps(manifest))

x = data((4, 4, 2))
legacy = tf_keras.Sequential([
    tf_keras.Input((4, 4, 2)),
    tfbn.legacy.BatchNorm(momentum=0.5, renorm=True, renorm_clipping={"rmax": 3.0}),
    tfbn.legacy.BatchNorm(momentum=0.5, virtual_batch_size=4),
])
trained(legacy, x).save(out / "legacy.keras")
np.savez(out / "legacy.npz", x=x, y=legacy(x, training=False).numpy())
"""

# Loads every model of argv[1] in a fresh process with `import tfbn` before (argv[2] ==
# "tfbn-first") or after ("keras-first") `import keras`; writes the outputs to
# outputs-ORDER.npz and what it saw to report-ORDER.json. "keras-first" then loads legacy.keras
# in tf-keras, without and with `import tfbn.legacy`.
_LOAD = r"""
import json, sys
from pathlib import Path

folder, order = Path(sys.argv[1]), sys.argv[2]
report = {}
if order == "tfbn-first":
    import tfbn
    heavy = ("tensorflow", "keras", "tf_keras")
    report["imported_by_tfbn"] = sorted(name for name in heavy if name in sys.modules)
    import keras
else:
    import keras
    import tfbn
report["library_not_imported"] = [m for m in tfbn.LIBRARY_MODULES if m not in sys.modules]
report["legacy_imported"] = sorted({"tfbn.legacy", "tf_keras"} & set(sys.modules))

import numpy as np

outputs, report["classes"] = {}, {}
for name in json.loads((folder / "manifest.json").read_text()):
    model = keras.saving.load_model(folder / f"{name}.keras")
    x = np.load(folder / f"{name}.npz")["x"]
    outputs[name] = keras.ops.convert_to_numpy(model(x, training=False))
    report["classes"][name] = {layer.name: type(layer).__qualname__ for layer in model.layers}

if order == "keras-first":
    import tf_keras

    try:
        tf_keras.models.load_model(folder / "legacy.keras")
        report["legacy_without_import"] = "loaded"
    except Exception as error:
        report["legacy_without_import"] = f"{type(error).__name__}: {error}"
    import tfbn.legacy

    legacy = tf_keras.models.load_model(folder / "legacy.keras")
    report["legacy_classes"] = [type(layer).__module__ for layer in legacy.layers]
    outputs["legacy"] = legacy(np.load(folder / "legacy.npz")["x"], training=False).numpy()

np.savez(folder / f"outputs-{order}.npz", **outputs)
(folder / f"report-{order}.json").write_text(json.dumps(report))
"""


def _python(code: str, *argv: str) -> None:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code, *argv],
        cwd=argv[0],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("registration")
    _python(_SAVE, str(folder))
    return folder


@pytest.fixture(scope="module")
def load(saved):
    """`load(order)`: the report and the outputs of the fresh process loading with that order."""
    done = {}

    def run(order: str):
        if order not in done:
            _python(_LOAD, str(saved), order)
            report = json.loads((saved / f"report-{order}.json").read_text())
            done[order] = report, dict(np.load(saved / f"outputs-{order}.npz"))
        return done[order]

    return run


def test_import_tfbn_alone_imports_neither_tensorflow_nor_keras(load):
    report, _ = load("tfbn-first")
    assert report["imported_by_tfbn"] == []


@pytest.mark.parametrize("order", ORDERS)
def test_the_library_comes_with_keras_and_the_legacy_layer_does_not(load, order):
    report, _ = load(order)
    assert report["library_not_imported"] == []
    assert report["legacy_imported"] == []


@pytest.mark.parametrize("order", ORDERS)
def test_saved_models_load_with_nothing_but_import_tfbn(saved, load, order):
    report, outputs = load(order)
    manifest = json.loads((saved / "manifest.json").read_text())
    assert set(outputs) >= set(manifest)
    for name, classes in manifest.items():
        assert report["classes"][name] == classes, name
        expected = np.load(saved / f"{name}.npz")["y"]
        assert outputs[name].dtype == expected.dtype, name
        assert np.allclose(outputs[name], expected, rtol=1e-6, atol=1e-6), name
    kinds = {kind for classes in manifest.values() for kind in classes.values()}
    assert {"BatchNorm", "ChannelAffine", "FoldedAway"} <= kinds


def test_a_legacy_model_loads_in_tf_keras_after_import_tfbn_legacy(saved, load):
    report, outputs = load("keras-first")
    # Without `import tfbn.legacy`, tf-keras does not know the class: the import is what counts.
    assert "BatchNorm" in report["legacy_without_import"]
    assert report["legacy_classes"] == ["tfbn.legacy", "tfbn.legacy"]
    expected = np.load(saved / "legacy.npz")["y"]
    assert np.allclose(outputs["legacy"], expected, rtol=1e-6, atol=1e-6)


def test_a_library_name_used_before_keras_is_imported_imports_the_library(tmp_path):
    """`import tfbn; tfbn.BatchNorm` with Keras not yet imported (the hook and the name at once)."""
    _python(
        "import sys, tfbn\n"
        "assert 'keras' not in sys.modules\n"
        "layer = tfbn.BatchNorm()\n"
        "import keras\n"
        "assert keras.saving.get_registered_object('tfbn>BatchNorm') is tfbn.BatchNorm\n"
        "assert keras.saving.get_registered_object('tfbn>ChannelAffine') is not None\n"
        "assert tfbn.moments is sys.modules['tfbn.ops.nn'].moments\n",
        str(tmp_path),
    )


@pytest.mark.parametrize("module", ["tfbn.layers.batch_norm", "tfbn.legacy"])
def test_importing_one_library_module_first_registers_every_class(tmp_path, module):
    """A library module imported before Keras (Keras then loads inside it; `tfbn.legacy` also has
    TensorFlow look Keras up first) still leaves every tfbn class registered."""
    _python(
        f"import sys, {module}, keras\n"
        "for name in ('BatchNorm', 'ChannelAffine', 'FoldedAway'):\n"
        "    assert keras.saving.get_registered_object(f'tfbn>{name}') is not None, name\n",
        str(tmp_path),
    )

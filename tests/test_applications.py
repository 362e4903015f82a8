"""tfbn on the models people train: ResNet50, MobileNetV2, EfficientNetB0 (keras.applications).

The architectures ship with keras (`weights=None`: nothing is downloaded), built at 32x32 with 10
classes so that the suite stays fast; the full sizes are in `tfbn bench`. References: the original
Keras model (conversion, folding, export) and float64 NumPy (statistics).
"""

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from replica_helpers import replica_values

import tfbn
from tfbn.tools.folding import fold_plan

HERE = Path(__file__).parent
ARCHITECTURES = ("ResNet50", "MobileNetV2", "EfficientNetB0")
SIZE = 32


def build(name: str, seed: int = 0, dtype: str = "float32"):
    """The architecture with random weights and batch-norm variables far from their initial ones.

    Fresh initial moving statistics (0 and 1) would make inference trivial for several of these
    networks (MobileNetV2's logits are then ~1e-12), hiding any error in the statistics.
    """
    keras.config.set_dtype_policy(dtype)
    try:
        model = getattr(keras.applications, name)(
            weights=None, input_shape=(SIZE, SIZE, 3), classes=10, classifier_activation=None
        )
    finally:
        keras.config.set_dtype_policy("float32")
    rng = np.random.default_rng(seed)
    for variable in model.trainable_variables:
        # The initializers' own draws vary with the dtype: draw again, the same for both.
        variable.assign(rng.normal(0.0, 1.0, variable.shape) * np.std(variable.numpy()))
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            channels = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0.0, 0.5, channels))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, channels))
            layer.gamma.assign(rng.uniform(0.5, 1.5, channels))
            layer.beta.assign(rng.normal(0.0, 0.5, channels))
    return model


def without_dropout(*models) -> None:
    """Dropout layers (EfficientNetB0's) pass their inputs through in training mode too, so that
    training-mode outputs can be compared across dtypes (their random draws depend on it)."""
    for model in models:
        for layer in model.layers:
            if isinstance(layer, keras.layers.Dropout):
                layer.rate = 0.0


def images(n: int, seed: int = 1, dtype="float32") -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 1.0, (n, SIZE, SIZE, 3)).astype(dtype)


def _relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _batch_norms(model):
    return [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]


# ---------------------------------------------------------------------------------- conversion
@pytest.mark.slow
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_converted_model_computes_what_the_original_computes(name, tmp_path):
    model = build(name)
    converted = tfbn.convert(model)
    originals = _batch_norms(model)
    assert len(originals) >= 49
    assert all(type(converted.get_layer(bn.name)) is tfbn.BatchNorm for bn in originals)
    assert [layer.name for layer in converted.layers] == [layer.name for layer in model.layers]
    x = images(8)
    assert _relative(converted(x, training=False), model(x, training=False)) <= 1e-5
    # Training mode in float32: batch statistics over 8 examples of 1x1 feature maps in the last
    # stage amplify rounding differences through ~50 layers (float64 below shows the formulas
    # agree to 1e-5).
    assert _relative(converted(x, training=True), model(x, training=True)) <= 1e-4
    for bn in originals:
        twin = converted.get_layer(bn.name)
        np.testing.assert_allclose(twin.moving_mean, bn.moving_mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(twin.moving_variance, bn.moving_variance, rtol=1e-4, atol=1e-5)

    # The converted model saves and reloads without custom_objects.
    path = tmp_path / f"{name}.keras"
    converted.save(path)
    reloaded = keras.saving.load_model(path)
    assert all(type(reloaded.get_layer(bn.name)) is tfbn.BatchNorm for bn in originals)
    np.testing.assert_array_equal(reloaded(x, training=False), converted(x, training=False))


@pytest.mark.slow
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_converted_model_in_training_mode_is_as_exact_as_the_original(name):
    """Float64 copies agree to 1e-5; in float32 each is as far from float64 as the other.

    In training mode the last stage normalizes 8 values per channel (1x1 maps at 32x32), and
    float32 rounding grows through ~50 layers: Keras's own layer is ~1e-4 from its float64
    result there, so two float32 implementations cannot agree to 1e-5 unless bit-identical.
    """
    model = build(name)
    truth = build(name, dtype="float64")
    converted, converted64 = tfbn.convert(model), tfbn.convert(truth)
    without_dropout(model, truth, converted, converted64)
    assert converted64.get_layer(_batch_norms(truth)[0].name).compute_dtype == "float64"
    x = images(8)
    for training in (False, True):
        reference = truth(x.astype("float64"), training=training)
        assert _relative(converted64(x.astype("float64"), training=training), reference) <= 1e-5
        keras_error = _relative(model(x, training=training), reference)
        tfbn_error = _relative(converted(x, training=training), reference)
        assert tfbn_error <= max(2.0 * keras_error, 1e-5), (training, tfbn_error, keras_error)


# ------------------------------------------------------------------------- MirroredStrategy
def _fit_on_replicas(model, x, y) -> None:
    """A training step of `fit`, the global batch split across the replicas.

    One step: the two models then compute the same forward pass from the same weights, so the
    comparison below holds to float32 rounding (after more steps rounding differences in the
    weights grow through the last stage, which normalizes 4 values per channel and replica).
    """
    model.compile(keras.optimizers.SGD(0.01), keras.losses.SparseCategoricalCrossentropy(True))
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)


@pytest.mark.slow
def test_mirrored_training_keeps_every_replica_identical_where_keras_drifts(cpu_devices):
    """MobileNetV2 on 3 replicas, each fed a different brightness: Keras's layer leaves each
    replica its own moving statistics; the converted model gives every replica the same, their
    mean (the update is linear in the batch statistics, and both models compute the same
    forward and backward passes, each replica normalizing with its own batch)."""
    strategy = tf.distribute.MirroredStrategy(cpu_devices[:3])
    replicas = strategy.num_replicas_in_sync
    assert replicas == 3
    with strategy.scope():
        original = build("MobileNetV2")
        converted = tfbn.convert(original)
    per_replica = 4
    rng = np.random.default_rng(3)
    x = np.concatenate(
        [rng.uniform(0.0, 1.0, (per_replica, SIZE, SIZE, 3)) + 2.0 * r for r in range(replicas)]
    ).astype("float32")
    y = rng.integers(0, 10, len(x))
    _fit_on_replicas(original, x, y)
    _fit_on_replicas(converted, x, y)

    batch_norms = _batch_norms(original)
    drift, spread = [], []
    for bn in batch_norms:
        twin = converted.get_layer(bn.name)
        for name in ("moving_mean", "moving_variance"):
            keras_copies = replica_values(getattr(bn, name))
            tfbn_copies = replica_values(getattr(twin, name))
            assert len(keras_copies) == len(tfbn_copies) == replicas
            drift.append(max(np.max(np.abs(c - keras_copies[0])) for c in keras_copies))
            spread.append(max(np.max(np.abs(c - tfbn_copies[0])) for c in tfbn_copies))
            np.testing.assert_allclose(
                tfbn_copies[0], np.mean(keras_copies, axis=0), rtol=2e-3, atol=2e-4,
                err_msg=f"{bn.name}.{name}",
            )  # fmt: skip
    # The first layer's replicas saw means 2 apart: with momentum 0.999, one step moves their
    # moving means 0.001 x that apart (deeper, some moves are below float32's resolution).
    assert drift[0] > 1e-3 and np.mean(np.array(drift) > 0.0) > 0.5
    assert max(spread) == 0.0


# -------------------------------------------------------------------------------- export
@pytest.mark.slow
def test_folded_saved_models_equal_the_unfolded_models_and_serve_without_tfbn(tmp_path):
    """Each architecture, converted, exported folded; served in a process where tfbn cannot be
    imported, on real-valued inputs, it equals the Keras model (unfolded) within 1e-4."""
    x = images(8, seed=5)
    exports, expected = [], []
    for name in ARCHITECTURES:
        model = tfbn.convert(build(name))
        plan = fold_plan(model)
        assert len(plan) == len(_batch_norms(model))
        assert all(step.into is not None for step in plan.values()), name  # every one folds
        exports.append(tfbn.export_saved_model(model, tmp_path / "exports", name=name))
        expected.append(np.asarray(model(x, training=False), np.float64))
        keras.backend.clear_session()
    np.save(tmp_path / "inputs.npy", x)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, str(HERE / "serve_without_tfbn.py"), str(tmp_path / "inputs.npy"),
         str(tmp_path / "out.npz"), *map(str, exports)],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    served = np.load(tmp_path / "out.npz")
    for i, name in enumerate(ARCHITECTURES):
        assert "serving_default" in served[f"{i}/signatures"]
        logits = served[f"{i}/serving_float/logits"]
        assert logits.shape == (8, 10)
        assert _relative(logits, expected[i]) <= 1e-4, name


# ------------------------------------------------------------------------------ the README
def _readme_block(heading: str) -> str:
    text = (HERE.parent / "README.md").read_text(encoding="utf-8")
    section = text.split(f"\n{heading}\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow
def test_the_readme_own_model_code_runs(tmp_path, monkeypatch):
    """The README's "Use tfbn in your own model" code, at 32x32 on 48 synthetic images.

    In this suite `MirroredStrategy()` takes the 3 logical CPUs: batches of 12 split evenly.
    """
    code = _readme_block("## Use tfbn in your own model")
    assert "(64, 64, 3)" in code
    code = code.replace("(64, 64, 3)", f"({SIZE}, {SIZE}, 3)")
    rng = np.random.default_rng(0)
    train = tf.data.Dataset.from_tensor_slices(
        (images(48), rng.integers(0, 10, 48).astype("int32"))
    ).batch(12)
    monkeypatch.chdir(tmp_path)
    namespace = {"train": train}
    exec(compile(code, "README.md", "exec"), namespace)
    model, resnet = namespace["model"], namespace["resnet"]
    assert all(type(model.get_layer(bn.name)) is tfbn.BatchNorm for bn in _batch_norms(resnet))
    reloaded = keras.saving.load_model(tmp_path / "resnet.keras")
    x = images(12)
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), model.predict(x, verbose=0))
    assert (namespace["path"] / "saved_model.pb").is_file()

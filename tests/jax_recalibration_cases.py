"""`tfbn.recalibrate` on Keras's JAX backend, against float64 NumPy population statistics: run in
a JAX process of its own (KERAS_BACKEND=jax) by tests/test_backends.py, without TensorFlow."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import tfbn
from tfbn.tools.recalibration import batch_norm_layers

BN_KINDS = {
    "tfbn": lambda **kw: tfbn.BatchNorm(**kw),
    "keras": lambda **kw: keras.layers.BatchNormalization(**kw),
}


def test_the_backend_is_jax():
    assert keras.backend.backend() == "jax"


# ------------------------------------------------------------------------------------ the models
def _sequential(kind):
    bn = BN_KINDS[kind]
    return keras.Sequential(
        [
            keras.Input((8, 8, 2)),
            keras.layers.Conv2D(3, 3, name="conv"),
            bn(name="bn_conv"),
            keras.layers.Activation("sigmoid"),
            keras.layers.AveragePooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(5, name="dense"),
            bn(name="bn_dense"),
            keras.layers.Activation("sigmoid"),
            keras.layers.Dense(4, name="logits"),
        ]
    )


def _functional():
    """Two branches with both layer kinds, a channels-first batch norm, one after the merge."""
    inputs = keras.Input((5, 4, 3))
    a = keras.layers.Dense(4, name="a")(inputs)
    a = tfbn.BatchNorm(name="bn_a")(a)
    b = keras.layers.Dense(3, name="b")(inputs)
    b = keras.layers.Permute((3, 1, 2))(b)
    b = keras.layers.BatchNormalization(axis=1, name="bn_first")(b)
    b = keras.layers.Permute((2, 3, 1))(b)
    merged = keras.layers.Concatenate()([keras.layers.Activation("tanh")(a), b])
    merged = keras.layers.Dense(5, name="c")(merged)
    return keras.Model(inputs, tfbn.BatchNorm(name="bn_c")(merged))


def _nested(flat: bool):
    """Batch norms inside a nested Sequential and a nested functional block (with an Add), after
    a pooling; with `flat=True` the same layers without the nesting (the reference's model)."""
    stem = [keras.layers.Conv2D(3, 3, padding="same", name="stem"), tfbn.BatchNorm(name="stem_bn")]
    inputs = keras.Input((6, 6, 3))
    inner_in = keras.Input((6, 6, 3))
    x = inputs if flat else inner_in
    if flat:
        for layer in stem:
            x = layer(x)
    y = keras.layers.Conv2D(3, 3, padding="same", name="inner_conv")(x)
    y = keras.layers.BatchNormalization(name="inner_bn")(y)
    y = keras.layers.Add(name="inner_add")([y, x])
    y = tfbn.BatchNorm(name="bn_after_add")(y)
    if not flat:
        block = keras.Sequential([keras.Input((6, 6, 3)), *stem], name="stem_block")
        y = keras.Model(inner_in, y, name="residual")(block(inputs))
    y = keras.layers.AveragePooling2D(2, name="pool")(y)
    y = keras.layers.BatchNormalization(name="bn_after_pool")(y)
    return keras.Model(inputs, keras.layers.Dense(4)(keras.layers.Flatten()(y)))


def _chain(depth: int):
    inputs = keras.Input((4,))
    x = inputs
    for i in range(depth):
        x = keras.layers.Dense(4, name=f"dense{i}")(x)
        x = tfbn.BatchNorm(name=f"bn{i}")(x)
        x = keras.layers.Activation("tanh")(x)
    return keras.Model(inputs, x)


def _randomized(model, rng, n, loc=2.0, scale=3.0):
    """Random weights (moving statistics far from the truth) and `n` random inputs."""
    model.set_weights(
        [rng.normal(0.5, 0.7, w.shape).astype("float32") for w in model.get_weights()]
    )
    for layer in batch_norm_layers(model):
        layer.moving_variance.assign(rng.uniform(0.5, 3.0, layer.moving_variance.shape))
    return rng.normal(loc, scale, (n, *model.inputs[0].shape[1:])).astype("float32")


# ---------------------------------------------------------------------------------- references
def _numpy_moments(activations, axis):
    activations = np.asarray(activations, np.float64)
    axis %= activations.ndim
    axes = tuple(i for i in range(activations.ndim) if i != axis)
    count = activations.size // activations.shape[axis]
    return activations.mean(axis=axes), activations.var(axis=axes), count


def _exact_reference(model, x) -> dict:
    """Per layer name: float64 NumPy mean, biased variance and count of its input over `x`, the
    batch norms before it set to their reference statistics first (on a copy of `model`, whose
    batch norms are not nested)."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    reference = {}
    for layer in batch_norm_layers(copy):
        probe = keras.Model(copy.inputs, layer.input)
        mean, variance, count = _numpy_moments(probe.predict(x, verbose=0), layer.axis)
        layer.moving_mean.assign(mean)
        layer.moving_variance.assign(variance)
        reference[layer.name] = (mean, variance, count)
    return reference


def _training_reference(model, x) -> dict:
    """Per layer name: float64 NumPy moments of its input when the whole network runs in
    training mode on `x` as one batch (Keras's own training-mode computation, on a copy)."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    layers = batch_norm_layers(copy)
    probes = keras.Model(copy.inputs[0], [layer.input for layer in layers])
    activations = probes(x, training=True)
    return {
        layer.name: _numpy_moments(keras.ops.convert_to_numpy(a), layer.axis)
        for layer, a in zip(layers, activations, strict=True)
    }


def _assert_matches(model, report, reference, rtol=1e-5) -> None:
    """The moving statistics and the report of every layer against `reference` (by name)."""
    for path, layer in zip(report, batch_norm_layers(model), strict=True):
        mean, variance, count = reference[path.rsplit("/", 1)[-1]]
        assert report[path]["count"] == count
        np.testing.assert_allclose(np.asarray(layer.moving_variance), variance, rtol=rtol)
        np.testing.assert_allclose(report[path]["new_variance"], variance, rtol=rtol)
        # The mean is compared on the scale of the spread (a mean near 0 has no relative size).
        error = np.abs(np.asarray(layer.moving_mean) - mean)
        assert np.all(error <= rtol * (np.abs(mean) + np.sqrt(variance))), (path, error)


# ---------------------------------------------------------------------------------------- cases
MODELS = {
    "sequential_tfbn": lambda flat=True: _sequential("tfbn"),
    "sequential_keras": lambda flat=True: _sequential("keras"),
    "functional": lambda flat=True: _functional(),
    "nested": _nested,
}


def _twins(name, rng, n):
    """The model `name`, its flat twin with the same weights (the reference's model), inputs."""
    model, flat = MODELS[name](flat=False), MODELS[name](flat=True)
    x = _randomized(model, rng, n)
    flat.set_weights(model.get_weights())  # the same layers in the same order
    return model, flat, x


@pytest.mark.parametrize("name", list(MODELS))
def test_exact_mode_on_arrays_equals_float64_population_statistics(name):
    model, flat, x = _twins(name, np.random.default_rng(1), 300)
    reference = _exact_reference(flat, x)
    # NumPy arrays in batches of 64, the last one short.
    report = tfbn.recalibrate(model, x, batch_size=64, verbose=0)
    _assert_matches(model, report, reference)


@pytest.mark.parametrize("name", list(MODELS))
def test_exact_mode_on_tuples_and_batches_equals_float64_population_statistics(name):
    model, flat, x = _twins(name, np.random.default_rng(2), 150)
    reference = _exact_reference(flat, x)
    labels = np.arange(150)
    for data in ((x, labels), (x,), (x, labels, np.ones(150))):  # batches of 32 (model.fit's)
        report = tfbn.recalibrate(model, data, verbose=0)
        _assert_matches(model, report, reference)
    batches = [(x[i : i + 40], labels[i : i + 40]) for i in range(0, 150, 40)]
    _assert_matches(model, tfbn.recalibrate(model, batches, verbose=0), reference)


@pytest.mark.parametrize("name", list(MODELS))
def test_one_fast_pass_measures_inputs_normalized_with_batch_statistics(name):
    model, flat, x = _twins(name, np.random.default_rng(3), 128)
    reference = _training_reference(flat, x)
    # One batch: the batch statistics are the population's.
    report = tfbn.recalibrate(model, (x, np.zeros(128)), mode="fast", batch_size=128, verbose=0)
    _assert_matches(model, report, reference, rtol=1e-4)


def test_fast_passes_reach_the_exact_statistics_after_one_pass_per_level():
    model = _chain(3)
    x = _randomized(model, np.random.default_rng(4), 200)
    reference = _exact_reference(model, x)
    report = tfbn.recalibrate(model, x, mode="fast", passes=3, batch_size=50, verbose=0)
    _assert_matches(model, report, reference)


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_a_large_mean_with_a_small_spread_is_exact(mode):
    """|mean| / std = 1e4 and 2^18 values per channel, against float64 NumPy."""
    inputs = keras.Input((8, 8, 2))
    model = keras.Model(inputs, tfbn.BatchNorm(name="bn")(inputs))
    rng = np.random.default_rng(5)
    x = (rng.normal(0.0, 1.0, (2**12, 8, 8, 2)) + np.array([1e4, -3e4])).astype("float32")
    tfbn.recalibrate(model, x, mode=mode, batch_size=1024, verbose=0)
    values = x.astype(np.float64).reshape(-1, 2)
    layer = model.get_layer("bn")
    np.testing.assert_allclose(np.asarray(layer.moving_variance), values.var(0), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(layer.moving_mean), values.mean(0), rtol=1e-7)


def test_bad_data_is_refused_before_any_pass_with_every_statistic_unchanged():
    model = _sequential("tfbn")
    x = _randomized(model, np.random.default_rng(6), 16)
    before = [np.asarray(v).copy() for v in model.non_trainable_variables]
    with pytest.raises(ValueError, match=r"shape \(None, 9, 8, 2\).*takes inputs of shape"):
        tfbn.recalibrate(model, np.zeros((4, 9, 8, 2), "float32"), verbose=0)
    with pytest.raises(ValueError, match=r"shape \(8, 8, 2\), but .* \(None, 8, 8, 2\)\.$"):
        tfbn.recalibrate(model, [x[0]], verbose=0)  # a batch without its batch axis
    with pytest.raises(ValueError, match="holds no examples"):
        tfbn.recalibrate(model, x[:0], verbose=0)
    with pytest.raises(ValueError, match="same number of examples"):
        tfbn.recalibrate(model, (x, np.zeros(15)), verbose=0)
    x[3, 1, 1, 0] = np.inf
    with pytest.raises(ValueError, match="non-finite values"):
        tfbn.recalibrate(model, (x, np.zeros(16)), mode="fast", verbose=0)
    for old, new in zip(before, model.non_trainable_variables, strict=True):
        np.testing.assert_array_equal(old, np.asarray(new))


_WITHOUT_TENSORFLOW = """
import sys
import keras
import numpy as np
import tfbn

model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), tfbn.BatchNorm()])
x = np.random.default_rng(0).normal(size=(40, 3)).astype("float32")
for mode in ("exact", "fast"):
    tfbn.recalibrate(model, x, mode=mode, verbose=0)
assert keras.backend.backend() == "jax"
assert "tensorflow" not in sys.modules, "TensorFlow was imported"
"""


def test_recalibration_on_jax_imports_no_tensorflow():
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TENSORFLOW], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]

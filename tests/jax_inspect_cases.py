"""`tfbn.inspect` under the JAX backend, against float64 NumPy: run in a process of its own with
KERAS_BACKEND=jax (the backend is fixed when Keras is imported), without the suite's conftest.py.
"""

import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

import tfbn
from tfbn.tools.inspect import inspect

BATCH = 32
LAYERS = ["bn1", "bn2", "bn3"]


def test_the_backend_is_jax():
    assert keras.backend.backend() == "jax"


def _model():
    """Conv -> tfbn BN -> ReLU -> Conv -> Keras BN -> tanh -> Dense -> tfbn BN -> Dense."""
    return keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(4, 3, name="conv1"),
            tfbn.BatchNorm(name="bn1"),
            keras.layers.Activation("relu"),
            keras.layers.Conv2D(3, 3, name="conv2"),
            keras.layers.BatchNormalization(name="bn2"),
            keras.layers.Activation("tanh"),
            keras.layers.Flatten(),
            keras.layers.Dense(5, name="dense"),
            tfbn.BatchNorm(name="bn3"),
            keras.layers.Dense(3, activation="softmax", name="out"),
        ],
        name="seq",
    )


def _data(seed=0, n=100):
    return np.random.default_rng(seed).normal(0.5, 2.0, (n, 6, 6, 2)).astype("float32")


def _batches(x):
    return [x[i : i + BATCH] for i in range(0, len(x), BATCH)]


def _copy(model):
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def _randomize(model, seed=1):
    rng = np.random.default_rng(seed)
    for name in LAYERS:
        layer = model.get_layer(name)
        channels = layer.moving_mean.shape[0]
        layer.moving_mean.assign(rng.normal(0.0, 3.0, channels).astype("float32"))
        layer.moving_variance.assign(rng.uniform(0.05, 20.0, channels).astype("float32"))


def _reference_statistics(model, name, x):
    """Float64 mean and biased variance of layer `name`'s input over `x`, with the batch norms
    before it normalizing with batch statistics (on a copy: training mode updates it)."""
    copy = _copy(model)
    sub = keras.Model(copy.inputs[0], copy.get_layer(name).input)
    values = np.concatenate(
        [np.asarray(sub(b, training=True), np.float64) for b in _batches(x)], axis=0
    )
    values = values.reshape(-1, values.shape[-1])
    return values.mean(axis=0), values.var(axis=0)


def _healthy(seed=5):
    """A model recalibrated on its data (tfbn.recalibrate, fast mode: the statistics of each
    layer's input with batch statistics upstream), the data and labels it predicts."""
    keras.utils.set_random_seed(seed)
    model = _model()
    x = _data(seed)
    tfbn.recalibrate(model, [(b,) for b in _batches(x)], mode="fast", verbose=0)
    y = np.argmax(np.asarray(model.predict(x, verbose=0)), axis=-1)
    return model, x, y


def test_statistics_match_float64_numpy():
    keras.utils.set_random_seed(0)
    model = _model()
    _randomize(model)
    x = _data()
    report = inspect(model, x, batch_size=BATCH, verbose=0)
    assert [layer.name for layer in report.layers] == LAYERS
    assert report.examples == len(x)
    for report_layer in report.layers:
        layer = model.get_layer(report_layer.name)
        mean, variance = _reference_statistics(model, report_layer.name, x)
        np.testing.assert_allclose(report_layer.population_mean, mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(report_layer.population_variance, variance, rtol=1e-4)
        shifts = np.abs(np.asarray(layer.moving_mean, np.float64) - mean) / np.sqrt(variance)
        ratios = np.asarray(layer.moving_variance, np.float64) / variance
        assert report_layer.mean_shift == pytest.approx(shifts.max(), rel=1e-4)
        assert report_layer.mean_shift_channel == int(np.argmax(shifts))
        furthest = int(np.argmax(np.abs(np.log(ratios))))
        assert report_layer.variance_ratio == pytest.approx(ratios[furthest], rel=1e-4)


def test_statistics_at_a_large_mean():
    """|mean| / std = 1e4 on bn1's input: its statistics and those downstream still exact."""
    keras.utils.set_random_seed(2)
    inputs = keras.Input((4,))
    dense = keras.layers.Dense(3, name="dense")
    h = tfbn.BatchNorm(name="bn1")(dense(inputs))
    h = keras.layers.BatchNormalization(name="bn2")(keras.layers.Dense(2, name="mid")(h))
    model = keras.Model(inputs, keras.layers.Dense(2, name="out")(h))
    kernel = np.random.default_rng(3).normal(0.0, 0.5, (4, 3)).astype("float32")
    dense.set_weights([kernel, np.full(3, 1e4, "float32")])
    x = np.random.default_rng(4).normal(0.0, 1.0, (200, 4)).astype("float32")
    h1 = np.asarray(dense(x), np.float64)
    mean, variance = h1.mean(axis=0), h1.var(axis=0)
    bn1 = model.get_layer("bn1")
    bn1.moving_mean.assign((mean + np.array([0.0, 0.5, 3.0]) * np.sqrt(variance)).astype("float32"))
    bn1.moving_variance.assign(variance.astype("float32"))
    report = inspect(model, x, batch_size=BATCH, verbose=0)
    layer = report.layers[0]
    std = np.sqrt(variance)
    np.testing.assert_allclose((layer.population_mean - mean) / std, 0.0, atol=1e-5)
    np.testing.assert_allclose(layer.population_variance, variance, rtol=1e-5)
    shifts = np.abs(np.asarray(bn1.moving_mean, np.float64) - mean) / np.sqrt(variance)
    assert layer.mean_shift == pytest.approx(shifts.max(), rel=1e-4)
    assert layer.mean_shift_channel == 2
    assert layer.flagged and report.layers[1].name == "bn2"
    downstream = _reference_statistics(model, "bn2", x)
    np.testing.assert_allclose(report.layers[1].population_mean, downstream[0], atol=1e-4)
    np.testing.assert_allclose(report.layers[1].population_variance, downstream[1], rtol=1e-3)


def _damage_mean(layer, report_layer, channel):
    mean = np.array(layer.moving_mean)
    mean[channel] += 3.0 * np.sqrt(report_layer.population_variance[channel])
    layer.moving_mean.assign(mean)


def _damage_variance(layer, report_layer, channel):
    variance = np.array(layer.moving_variance)
    variance[channel] *= 10.0
    layer.moving_variance.assign(variance)


def _damage_nan(layer, report_layer, channel):
    mean = np.array(layer.moving_mean)
    mean[channel] = np.nan
    layer.moving_mean.assign(mean)


DAMAGES = {"mean": _damage_mean, "variance": _damage_variance, "nan": _damage_nan}
REASONS = {"mean": "moving mean", "variance": "moving variance", "nan": "non-finite"}


@pytest.mark.parametrize(
    ("damage", "target"), [("mean", "bn1"), ("variance", "bn2"), ("nan", "bn3")]
)
def test_damaged_layer_and_only_it_is_flagged(damage, target):
    model, x, y = _healthy()
    healthy = inspect(model, (x, y), batch_size=BATCH, verbose=0)
    assert healthy.flagged == []
    index = LAYERS.index(target)
    DAMAGES[damage](model.get_layer(target), healthy.layers[index], 1)
    report = inspect(model, (x, y), batch_size=BATCH, verbose=0)  # the same compiled functions
    assert report.flagged == [target]
    (reason,) = report.layers[index].reasons
    assert REASONS[damage] in reason
    assert not report.output_gap <= healthy.output_gap  # larger, or NaN
    assert repr(report).splitlines()[-1].startswith("FLAGGED")


def test_recalibrated_model_flags_nothing():
    keras.utils.set_random_seed(6)
    model = _model()
    _randomize(model)
    x = _data(6)
    assert inspect(model, x, verbose=0).flagged == LAYERS
    tfbn.recalibrate(model, [(b,) for b in _batches(x)], mode="fast", verbose=0)
    report = inspect(model, x, batch_size=BATCH, verbose=0)
    assert report.flagged == []
    assert all(layer.mean_shift < 0.5 for layer in report.layers)


def test_accuracy_as_is_and_with_the_measured_statistics():
    source, x, y = _healthy()
    model = _copy(source)
    _damage_variance(model.get_layer("bn1"), None, 0)
    report = inspect(model, x, batch_size=BATCH, verbose=0)
    _damage_mean(model.get_layer("bn3"), report.layers[2], 2)
    report = inspect(model, (x, y), batch_size=BATCH, verbose=0)
    as_is = np.mean(np.argmax(np.asarray(model.predict(x, verbose=0)), axis=-1) == y)
    recalibrated = _copy(model)
    tfbn.recalibrate(recalibrated, [(b,) for b in _batches(x)], mode="fast", verbose=0)
    after = np.mean(np.argmax(np.asarray(recalibrated.predict(x, verbose=0)), axis=-1) == y)
    assert report.accuracy == pytest.approx(as_is)
    assert report.accuracy_recalibrated == pytest.approx(after)
    assert report.accuracy < report.accuracy_recalibrated


def test_model_variables_are_unchanged():
    model, x, y = _healthy()
    _damage_mean(model.get_layer("bn2"), inspect(model, x, verbose=0).layers[1], 0)
    before = [np.array(v) for v in model.variables]
    inspect(model, (x, y), batch_size=BATCH, verbose=0)
    for value, variable in zip(before, model.variables, strict=True):
        np.testing.assert_array_equal(np.array(variable), value, err_msg=variable.path)


_WITHOUT_TENSORFLOW = """
import importlib.abc, sys

class NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ModuleNotFoundError("No module named 'tensorflow'", name=name)
        return None

sys.meta_path.insert(0, NoTensorFlow())
import numpy as np, keras, tfbn
model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), tfbn.BatchNorm(),
                          keras.layers.Dense(2)])
x = np.random.default_rng(0).normal(size=(40, 3)).astype("float32")
report = tfbn.inspect(model, (x, np.zeros(40, "int64")), batch_size=16, verbose=0)
assert report.examples == 40 and report.accuracy_recalibrated is not None
assert "tensorflow" not in sys.modules
print("ran without tensorflow")
"""


def test_inspect_runs_where_tensorflow_is_not_installed():
    root = pathlib.Path(__file__).parents[1]
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TENSORFLOW],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "ran without tensorflow" in result.stdout, result.stderr

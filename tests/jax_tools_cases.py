"""The model tools under the JAX backend, against float64 NumPy: run by tests/test_backends.py in
the JAX process (KERAS_BACKEND=jax, no conftest.py).

`tfbn.convert` and `tfbn.fold_batch_norm` on Sequential, functional and nested models, with
Keras's `BatchNormalization` and with `tfbn.BatchNorm`: every model here has a float64 NumPy
forward pass written from its layers' weights. `import tfbn`, the layer and the tools with
TensorFlow impossible to import. `TFBN_CROSS_DIR` holds `synchronized_*` files saved on TensorFlow
(see tests/test_backends.py).
"""

import os
import pathlib
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import tfbn
from tfbn.tools.folding import fold_plan

BATCH_NORMS = {"keras": keras.layers.BatchNormalization, "tfbn": tfbn.BatchNorm}


# ------------------------------------------------------------------ float64 NumPy forward passes
def _value(variable) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(variable), np.float64)


def _patches(x, size):
    """(n, h', w', c, kh, kw) windows of a channels-last batch (valid padding, stride 1)."""
    return np.lib.stride_tricks.sliding_window_view(x, size, axis=(1, 2))


def _np_layer(layer, x: np.ndarray, training: bool) -> np.ndarray:
    """`layer`'s output in float64 (the layer classes the models below use)."""
    if isinstance(layer, keras.layers.BatchNormalization):
        axis = layer.axis % x.ndim
        axes = tuple(i for i in range(x.ndim) if i != axis)
        shape = [1] * x.ndim
        shape[axis] = -1
        if training:
            mean, var = x.mean(axes), x.var(axes)
        else:
            mean, var = _value(layer.moving_mean), _value(layer.moving_variance)
        y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + layer.epsilon)
        if layer.scale:
            y = y * _value(layer.gamma).reshape(shape)
        return y + _value(layer.beta).reshape(shape) if layer.center else y
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        kernel = _value(layer.kernel)
        y = np.einsum("nhwckl,klcm->nhwcm", _patches(x, kernel.shape[:2]), kernel)
        y = y.reshape(*y.shape[:3], -1)
    elif isinstance(layer, keras.layers.Conv2D):
        kernel = _value(layer.kernel)
        y = np.einsum("nhwckl,klco->nhwo", _patches(x, kernel.shape[:2]), kernel)
    elif isinstance(layer, keras.layers.Dense):
        y = x @ _value(layer.kernel)
    elif isinstance(layer, keras.layers.ReLU):
        return np.maximum(x, 0.0)
    elif isinstance(layer, keras.layers.Flatten):
        return x.reshape(len(x), -1)
    elif isinstance(layer, keras.layers.GlobalAveragePooling2D):
        return x.mean((1, 2))
    elif isinstance(layer, keras.Model):
        return _np_chain(layer.layers, x, training)
    else:
        raise AssertionError(f"no NumPy forward pass for {type(layer).__name__}")
    return y + _value(layer.bias) if layer.use_bias else y


def _np_chain(layers, x, training: bool) -> np.ndarray:
    for layer in layers:
        if not isinstance(layer, keras.layers.InputLayer):
            x = _np_layer(layer, x, training)
    return x


# ---------------------------------------------------------------------------------- the models
def _sequential(bn):
    """Conv2D, DepthwiseConv2D and Dense, each followed by a batch norm: all three fold."""
    model = keras.Sequential(
        [
            keras.Input((7, 7, 3)),
            keras.layers.Conv2D(4, 3, name="conv"),
            bn(name="bn_conv"),
            keras.layers.ReLU(),
            keras.layers.DepthwiseConv2D(3, depth_multiplier=2, use_bias=False, name="depthwise"),
            bn(name="bn_depthwise", epsilon=1e-2),
            keras.layers.Flatten(),
            keras.layers.Dense(5, name="dense"),
            bn(name="bn_dense", center=False),
        ]
    )
    return model, lambda x, training: _np_chain(model.layers, x, training)


def _functional(bn):
    """A skip connection: the batch norm after the Add cannot fold, nor can the conv's, whose
    output the Add uses too."""
    inputs = keras.Input((7, 7, 3))
    conv = keras.layers.Conv2D(4, 3, name="conv")
    first, add, second = bn(name="bn_conv"), keras.layers.Add(), bn(name="bn_add", scale=False)
    pool, dense = keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3, name="dense")
    t = conv(inputs)
    outputs = dense(pool(second(add([first(t), t]))))
    model = keras.Model(inputs, outputs)

    def forward(x, training):
        t = _np_layer(conv, x, training)
        y = _np_layer(second, _np_layer(first, t, training) + t, training)
        return _np_chain([pool, dense], y, training)

    return model, forward


def _nested(bn):
    """A Sequential block and a functional head inside a functional model."""
    block = keras.Sequential(
        [
            keras.Input((7, 7, 3)),
            keras.layers.Conv2D(4, 3, name="block_conv"),
            bn(name="block_bn"),
            keras.layers.ReLU(),
        ],
        name="block",
    )
    head_inputs = keras.Input((5, 5, 4))
    head_dense = keras.layers.Dense(6, name="head_dense")
    head_bn = bn(name="head_bn")
    head = keras.Model(
        head_inputs, head_bn(head_dense(keras.layers.Flatten()(head_inputs))), name="head"
    )
    inputs = keras.Input((7, 7, 3))
    final = keras.layers.Dense(2, name="final")
    model = keras.Model(inputs, final(head(block(inputs))))

    def forward(x, training):
        y = _np_chain(block.layers, x, training)
        y = _np_chain([keras.layers.Flatten(), head_dense, head_bn], y, training)
        return _np_layer(final, y, training)

    return model, forward


MODELS = {"sequential": _sequential, "functional": _functional, "nested": _nested}
# Batch norm -> the layer it folds into (None: a per-channel multiply-add), per model.
FOLDS = {
    "sequential": {"bn_conv": "conv", "bn_depthwise": "depthwise", "bn_dense": "dense"},
    "functional": {"bn_conv": None, "bn_add": None},
    "nested": {"block/block_bn": "block_conv", "head/head_bn": "head_dense"},
}


def _batch_norms(model) -> list:
    return [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def _build(kind: str, bn_name: str, seed: int = 0):
    """The model with random weights and moving statistics far from 0 and 1, its forward pass
    and inputs."""
    keras.utils.set_random_seed(seed)
    model, forward = MODELS[kind](BATCH_NORMS[bn_name])
    rng = np.random.default_rng(seed)
    for layer in _batch_norms(model):
        channels = layer.moving_mean.shape
        layer.moving_mean.assign(rng.normal(2.0, 1.0, channels).astype("float32"))
        layer.moving_variance.assign(rng.uniform(0.2, 4.0, channels).astype("float32"))
        if layer.scale:
            layer.gamma.assign(rng.uniform(0.5, 2.0, channels).astype("float32"))
        if layer.center:
            layer.beta.assign(rng.normal(0.0, 1.0, channels).astype("float32"))
    x = (rng.standard_normal((16, 7, 7, 3)) * 2 + 1).astype("float32")
    return model, forward, x


def _close(actual, expected) -> None:
    """Equal within float32 rounding, relative to the largest value."""
    expected = np.asarray(expected, np.float64)
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=0, atol=2e-5 * scale)


# --------------------------------------------------------------------------------- the tests
def test_the_backend_is_jax():
    assert keras.backend.backend() == "jax"


@pytest.mark.parametrize("bn_name", sorted(BATCH_NORMS))
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_the_models_match_their_float64_forward_pass(kind, bn_name):
    # The reference itself: the Keras model computes what the NumPy forward pass says.
    model, forward, x = _build(kind, bn_name)
    _close(model(x, training=False), forward(x, False))
    _close(model(x, training=True), forward(x, True))


@pytest.mark.parametrize("bn_name", sorted(BATCH_NORMS))
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_convert_transfers_the_weights_and_computes_the_same_outputs(kind, bn_name):
    model, forward, x = _build(kind, bn_name)
    converted = tfbn.convert(model)
    assert type(converted) is type(model)
    pairs = list(zip(_batch_norms(model), _batch_norms(converted), strict=True))
    assert pairs
    for source, target in pairs:
        assert type(target) is tfbn.BatchNorm
        assert target.name == source.name
        values = {v.name: _value(v) for v in source.variables}
        assert {v.name for v in target.variables} == set(values)
        for variable in target.variables:
            np.testing.assert_array_equal(_value(variable), values[variable.name])
    _close(converted.predict(x, verbose=0), forward(x, False))
    _close(converted(x, training=True), forward(x, True))


@pytest.mark.parametrize("bn_name", sorted(BATCH_NORMS))
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_fold_batch_norm_output_equals_the_inference_output(kind, bn_name):
    model, forward, x = _build(kind, bn_name)
    assert {name: step.into for name, step in fold_plan(model).items()} == FOLDS[kind]
    folded = tfbn.fold_batch_norm(model)
    assert not _batch_norms(folded)
    reference = forward(x, False)
    _close(folded.predict(x, verbose=0), reference)
    _close(model.predict(x, verbose=0), reference)


def test_export_saved_model_refuses_the_jax_backend_before_any_work(tmp_path):
    model, _, _ = _build("sequential", "tfbn")
    with pytest.raises(ValueError, match=r"needs the TensorFlow backend") as raised:
        tfbn.export_saved_model(model, tmp_path / "exports")
    message = str(raised.value)
    assert "\n" not in message and "model.export(path, format=" in message
    assert not (tmp_path / "exports").exists()


def test_synchronized_batch_norm_converted_on_tensorflow_loads_on_jax():
    folder = os.environ.get("TFBN_CROSS_DIR")
    if not folder:
        pytest.fail("TFBN_CROSS_DIR is not set: run this module through tests/test_backends.py")
    folder = pathlib.Path(folder)
    data = np.load(folder / "synchronized.npz")
    # Keras's own layer refuses synchronized=True off TensorFlow, so its file does not load.
    with pytest.raises(Exception, match="synchronized"):
        keras.saving.load_model(folder / "synchronized_keras.keras")
    model = keras.saving.load_model(folder / "synchronized_converted.keras")
    (layer,) = _batch_norms(model)
    assert type(layer) is tfbn.BatchNorm and layer.synchronized
    np.testing.assert_allclose(model.predict(data["x"], verbose=0), data["y"], atol=1e-5)


# What the process without TensorFlow runs: `python -c PRELUDE + this`. It prints "ok".
_WITHOUT_TENSORFLOW = """
import numpy as np

import tfbn  # before Keras: its import imports the library
import keras

def affine(model, x):
    return np.asarray(model.predict(x, verbose=0), np.float64)

rng = np.random.default_rng(0)
x = (rng.standard_normal((64, 6, 6, 2)) * 2 + 3).astype("float32")
y = rng.standard_normal((64, 3)).astype("float32")
model = keras.Sequential([
    keras.Input((6, 6, 2)),
    keras.layers.Conv2D(4, 3),
    tfbn.BatchNorm(momentum=0.5),
    keras.layers.ReLU(),
    keras.layers.Flatten(),
    keras.layers.Dense(8),
    keras.layers.BatchNormalization(momentum=0.5),
    keras.layers.Dense(3),
])
model.compile("adam", "mse")
model.fit(x, y, batch_size=16, epochs=2, verbose=0)
expected = affine(model, x)
converted = tfbn.convert(model)
assert sum(type(layer) is tfbn.BatchNorm for layer in converted.layers) == 2
np.testing.assert_allclose(affine(converted, x), expected, atol=1e-5)
np.testing.assert_allclose(affine(tfbn.fold_batch_norm(converted), x), expected, atol=1e-4)
statistics = tfbn.recalibrate(converted, x, batch_size=16, verbose=0)
assert len(statistics) == 2, statistics
report = tfbn.inspect(converted, x, batch_size=16, verbose=0)
assert len(report.layers) == 2 and report.examples == 64, report
try:
    tfbn.export_saved_model(converted, "unused")
except ValueError as error:
    assert "needs the TensorFlow backend" in str(error), error
else:
    raise AssertionError("export_saved_model ran on JAX")
"""


def test_tfbn_and_its_tools_run_without_tensorflow():
    prelude = textwrap.dedent(
        """
        import sys
        sys.modules["tensorflow"] = None  # `import tensorflow` raises ImportError
        """
    )
    check = textwrap.dedent(
        """
        assert keras.backend.backend() == "jax"
        assert sys.modules["tensorflow"] is None
        loaded = [name for name in sys.modules if name.startswith("tensorflow.")]
        assert not loaded, loaded
        print("ok")
        """
    )
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, "-c", prelude + _WITHOUT_TENSORFLOW + check],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-4000:]


# On a backend tfbn's layer does not run on (Keras's NumPy backend), folding a model with Keras's
# batch norm needs only keras.ops; converting refuses in one line.
_OTHER_BACKEND = """
import sys
sys.modules["tensorflow"] = None
import numpy as np
import tfbn
import keras

assert keras.backend.backend() == "numpy"
rng = np.random.default_rng(0)
model = keras.Sequential([
    keras.Input((6, 6, 2)),
    keras.layers.Conv2D(3, 3),
    keras.layers.BatchNormalization(),
    keras.layers.Flatten(),
    keras.layers.Dense(4),
    keras.layers.BatchNormalization(epsilon=0.1),
])
for layer in model.layers[1::3]:
    layer.moving_mean.assign(rng.normal(2.0, 1.0, layer.moving_mean.shape).astype("float32"))
    layer.moving_variance.assign(rng.uniform(0.5, 3.0, layer.moving_mean.shape).astype("float32"))
x = rng.standard_normal((8, 6, 6, 2)).astype("float32")
folded = tfbn.fold_batch_norm(model)
assert not any(isinstance(l, keras.layers.BatchNormalization) for l in folded.layers)
np.testing.assert_allclose(folded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)
try:
    tfbn.convert(model)
except ValueError as error:
    assert "the Keras backend is 'numpy'" in str(error) and "\\n" not in str(error), error
else:
    raise AssertionError("convert made tfbn.BatchNorm layers on the NumPy backend")
print("ok")
"""


def test_fold_runs_and_convert_refuses_in_one_line_on_another_backend():
    env = {**os.environ, "KERAS_BACKEND": "numpy"}
    result = subprocess.run(
        [sys.executable, "-c", _OTHER_BACKEND], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-4000:]

"""tfbn under Keras's PyTorch backend, against float64 NumPy and Keras's own layer: run by
tests/test_torch_backend.py with KERAS_BACKEND=torch in a virtual environment of its own that holds
torch, keras, numpy, h5py and pytest, and tfbn without its dependencies (no TensorFlow), with
`--noconftest` (the suite's conftest.py sets up TensorFlow's devices).
"""

import os
import pathlib
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import torch
from backend_reference import EPS, reference

import tfbn
from tfbn.ops import core


def test_the_backend_is_torch_and_tensorflow_is_not_imported():
    assert keras.backend.backend() == "torch"
    tfbn.BatchNorm()(np.ones((4, 3), "float32"), training=True)
    assert "tensorflow" not in sys.modules


def _numpy(t) -> np.ndarray:
    return keras.ops.convert_to_numpy(t)


@pytest.mark.parametrize(
    "shape,axis",
    [((256, 5), -1), ((32, 10, 6), 1), ((16, 6, 6, 8), -1), ((16, 8, 6, 6), 1)],
)
def test_training_output_and_moving_statistics_match_float64_at_a_large_mean(shape, axis):
    rng = np.random.default_rng(0)
    x = (1e4 + rng.standard_normal(shape)).astype("float32")
    layer = tfbn.BatchNorm(axis=axis, momentum=0.5, epsilon=EPS)
    y = _numpy(layer(x, training=True))
    axis %= len(shape)
    mean, var, ref = reference(x, axis)
    np.testing.assert_allclose(y, ref, atol=1e-4)
    np.testing.assert_allclose(_numpy(layer.moving_variance), 0.5 + 0.5 * var.ravel(), rtol=1e-4)
    np.testing.assert_allclose(_numpy(layer.moving_mean), 0.5 * mean.ravel(), rtol=1e-6)
    # Inference with the moving statistics.
    moving_mean = _numpy(layer.moving_mean).astype(np.float64)
    moving_var = _numpy(layer.moving_variance).astype(np.float64)
    shape_c = [1] * len(shape)
    shape_c[axis] = -1
    expected = (x - moving_mean.reshape(shape_c)) / np.sqrt(moving_var.reshape(shape_c) + EPS)
    np.testing.assert_allclose(_numpy(layer(x, training=False)), expected, rtol=1e-5, atol=1e-3)


def test_moments_and_batch_normalization_match_float64_at_a_large_mean():
    rng = np.random.default_rng(1)
    x = (-1e4 + rng.standard_normal((64, 8, 8, 4))).astype("float32")
    mean, var, _ = reference(x, 3)
    m, v = tfbn.moments(x, axes=[0, 1, 2])
    assert isinstance(m, torch.Tensor)
    np.testing.assert_allclose(_numpy(v), var.ravel(), rtol=1e-4)
    np.testing.assert_allclose(_numpy(m), mean.ravel(), rtol=1e-7)
    y = tfbn.batch_normalization(x, m, v, axis=-1, epsilon=EPS)
    m64 = _numpy(m).astype(np.float64)
    np.testing.assert_allclose(_numpy(y), (x - m64) / np.sqrt(var.ravel() + EPS), atol=1e-4)
    m_keep, _ = tfbn.moments(x, axes=[0, 2], keepdims=True)
    assert tuple(m_keep.shape) == (1, 8, 1, 4)


def test_statistics_stay_exact_when_the_first_examples_are_far_from_the_mean():
    rng = np.random.default_rng(2)
    x = np.sort(1e4 + 50 * rng.standard_normal((512, 3)), axis=0).astype("float32")
    _, var, _ = reference(x, 1)
    _, v = tfbn.moments(x, axes=[0])
    np.testing.assert_allclose(_numpy(v), var.ravel(), rtol=1e-4)


def test_mask_keeps_masked_positions_out_of_the_statistics():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 7, 3)).astype("float32") * 3 + 2
    mask = rng.random((6, 7)) > 0.4
    layer = tfbn.BatchNorm(momentum=0.0)
    layer(x, training=True, mask=mask)
    mean, var, _ = reference(x, 2, mask)
    np.testing.assert_allclose(_numpy(layer.moving_mean), mean.ravel(), rtol=1e-5)
    np.testing.assert_allclose(_numpy(layer.moving_variance), var.ravel(), rtol=1e-5)


def test_ghost_batches_normalize_each_virtual_batch_with_its_own_statistics():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((12, 5, 4)).astype("float32") * 2 + 1
    layer = tfbn.BatchNorm(virtual_batch_size=4, momentum=0.0)
    y = _numpy(layer(x, training=True))
    groups = x.shape[0] // 4
    means, variances = [], []
    for j in range(groups):
        part = x[j::groups]  # tf-keras's grouping: examples j, j + g, ...
        mean, var, ref = reference(part, 2)
        np.testing.assert_allclose(y[j::groups], ref, atol=1e-5)
        means.append(mean.ravel())
        variances.append(var.ravel())
    np.testing.assert_allclose(_numpy(layer.moving_mean), np.mean(means, 0), rtol=1e-5)
    np.testing.assert_allclose(_numpy(layer.moving_variance), np.mean(variances, 0), rtol=1e-5)


def test_renorm_output_follows_the_paper_with_clipping():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((32, 3)).astype("float32") * 4 + 3
    layer = tfbn.BatchNorm(renorm=True, renorm_clipping={"rmax": 1.5, "dmax": 0.5})
    layer.build(x.shape)
    layer.renorm_mean.assign([0.0, 1.0, 2.0])
    layer.renorm_stddev.assign([1.0, 2.0, 8.0])
    y = _numpy(layer(x, training=True))
    mean, var, xhat = reference(x, 1)
    sigma = np.array([1.0, 2.0, 8.0])
    r = np.clip(np.sqrt(var.ravel() + EPS) / sigma, None, 1.5)
    d = np.clip((mean.ravel() - [0.0, 1.0, 2.0]) / sigma, -0.5, 0.5)
    np.testing.assert_allclose(y, xhat * r + d, atol=1e-5)


def test_gradients_match_the_closed_form_at_a_large_mean():
    rng = np.random.default_rng(6)
    x_np = (1e4 + rng.standard_normal((16, 5, 4))).astype("float32")
    dy = rng.standard_normal(x_np.shape).astype("float32")
    gamma_np = rng.uniform(0.5, 2.0, 4).astype("float32")
    x = torch.tensor(x_np, requires_grad=True)
    gamma = torch.tensor(gamma_np, requires_grad=True)
    beta = torch.zeros(4, requires_grad=True)
    y, _ = core.training_batch_norm(x, 2, gamma=gamma, beta=beta, epsilon=EPS)
    (y * torch.tensor(dy)).sum().backward()
    _, var, xhat = reference(x_np, 2)
    d = dy.astype(np.float64)
    axes = (0, 1)
    dx = (gamma_np / np.sqrt(var + EPS)) * (
        d - d.mean(axes, keepdims=True) - xhat * (d * xhat).mean(axes, keepdims=True)
    )
    np.testing.assert_allclose(x.grad.numpy(), dx, atol=1e-4)
    np.testing.assert_allclose(gamma.grad.numpy(), (d * xhat).sum(axes), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(beta.grad.numpy(), d.sum(axes), rtol=1e-5, atol=1e-5)


def test_fit_updates_weights_and_moving_statistics_like_keras():
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((64, 6)) * 3 + 5).astype("float32")
    y = rng.standard_normal((64, 1)).astype("float32")
    models = []
    for layer in (tfbn.BatchNorm(), keras.layers.BatchNormalization()):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6,)), layer, keras.layers.Dense(1)])
        model.compile("sgd", "mse")
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        models.append(model)
    for a, b in zip(models[0].weights, models[1].weights, strict=True):
        np.testing.assert_allclose(_numpy(a), _numpy(b), rtol=1e-4, atol=1e-5)


def test_synchronized_warns_once_and_uses_the_batch_of_the_process():
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((32, 4)) * 2 + 1).astype("float32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layers = [tfbn.BatchNorm(synchronized=True, momentum=0.0) for _ in range(2)]
    messages = [str(w.message) for w in caught if "synchronized=True" in str(w.message)]
    assert len(messages) <= 1  # once per process: an earlier case may have warned already
    layers[0](x, training=True)
    mean, var, _ = reference(x, 1)
    np.testing.assert_allclose(_numpy(layers[0].moving_mean), mean.ravel(), rtol=1e-5)
    np.testing.assert_allclose(_numpy(layers[0].moving_variance), var.ravel(), rtol=1e-5)


def test_a_saved_model_reloads_with_the_same_outputs(tmp_path):
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((8, 5, 4)) * 2 + 50).astype("float32")
    inputs = keras.Input((5, 4))
    h = tfbn.BatchNorm(renorm=True, momentum=0.5)(inputs)
    h = tfbn.BatchNorm(axis=1, virtual_batch_size=4, momentum=0.5)(h)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(h)))
    model.compile("sgd", "mse")
    model.fit(x, rng.standard_normal((8, 2)).astype("float32"), batch_size=8, verbose=0)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(
        _numpy(loaded.predict(x, verbose=0)), _numpy(model.predict(x, verbose=0)), atol=1e-6
    )


def test_keras_batch_normalization_suite_passes_with_tfbn(tmp_path):
    """Keras's own BatchNormalization test module, every layer replaced by tfbn.BatchNorm."""
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from test_keras_suite import PYTEST_INI, _keras_test_source, _outcomes, _with_tfbn

    (tmp_path / "pytest.ini").write_text(PYTEST_INI)
    module = tmp_path / "test_tfbn_in_keras_suite.py"
    module.write_text(_with_tfbn(_keras_test_source()))
    report = tmp_path / "report.xml"
    env = {**os.environ, "KERAS_BACKEND": "torch"}
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
    failed = sorted(name for name, kind in outcomes.items() if kind in ("failed", "error"))
    assert outcomes and not failed, result.stdout[-6000:]
    print(
        f"Keras's suite with tfbn on torch: {sum(k == 'passed' for k in outcomes.values())} "
        f"passed, {sum(k == 'skipped' for k in outcomes.values())} skipped"
    )


def _tools_model(norm):
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, use_bias=False, name="conv")(inputs)
    h = norm(name="bn1")(h)
    h = keras.layers.Activation("relu")(h)
    h = keras.layers.Flatten()(keras.layers.AveragePooling2D(2)(h))
    h = keras.layers.Dense(5, name="dense")(h)
    return keras.Model(inputs, norm(name="bn2")(h))


def test_the_model_tools_run_on_torch_against_float64(tmp_path):
    """convert, fold_batch_norm, recalibrate (both modes) and inspect under the torch backend."""
    rng = np.random.default_rng(7)
    x = (3.0 + 2.0 * rng.standard_normal((96, 8, 8, 3))).astype("float32")
    model = _tools_model(keras.layers.BatchNormalization)
    expected = model.predict(x, verbose=0)
    converted = tfbn.convert(model)
    assert isinstance(converted.get_layer("bn1"), tfbn.BatchNorm)
    np.testing.assert_allclose(converted.predict(x, verbose=0), expected, atol=1e-5)
    folded = tfbn.fold_batch_norm(model)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)
    np.testing.assert_allclose(folded.predict(x, verbose=0), expected, atol=1e-4)
    conv_out = keras.Model(model.input, model.get_layer("conv").output)
    h = conv_out.predict(x, verbose=0).astype(np.float64)
    for mode in ("exact", "fast"):
        copy = _tools_model(keras.layers.BatchNormalization)
        copy.set_weights(model.get_weights())
        tfbn.recalibrate(copy, x, mode=mode, verbose=0)
        layer = copy.get_layer("bn1")
        np.testing.assert_allclose(layer.moving_mean.numpy(), h.mean((0, 1, 2)), atol=1e-5)
        np.testing.assert_allclose(layer.moving_variance.numpy(), h.var((0, 1, 2)), rtol=2e-5)
    copy = _tools_model(keras.layers.BatchNormalization)
    copy.set_weights(model.get_weights())
    tfbn.recalibrate(copy, x, verbose=0)
    assert tfbn.inspect(copy, x, batch_size=96, verbose=0).flagged == []
    damaged = copy.get_layer("bn1")
    mean = damaged.moving_mean.numpy()
    mean[2] += 3.0 * np.sqrt(h.var((0, 1, 2))[2])
    damaged.moving_mean.assign(mean)
    assert tfbn.inspect(copy, x, batch_size=96, verbose=0).flagged == ["bn1"]
    assert "tensorflow" not in sys.modules

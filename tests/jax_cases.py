"""tfbn under the JAX backend, against float64 NumPy: run by tests/test_backends.py in a process of
its own with KERAS_BACKEND=jax (the backend is fixed when Keras is imported), without the suite's
conftest.py (which sets up TensorFlow's devices).

`TFBN_CROSS_DIR` names a folder holding a `.keras` file saved on TensorFlow, its inputs and
outputs (`from_tensorflow.*`); the cross-backend test loads it and saves its own
(`from_jax.*`) for the TensorFlow side to load.
"""

import os
import pathlib

import keras
import numpy as np
import pytest
from backend_reference import EPS, reference

import tfbn


def test_the_backend_is_jax():
    assert keras.backend.backend() == "jax"


@pytest.mark.parametrize(
    "shape,axis",
    [
        ((256, 5), -1),
        ((32, 10, 6), 1),
        ((16, 6, 6, 8), -1),
        ((16, 8, 6, 6), 1),
        ((4, 4, 5, 5, 3), 2),
    ],
)
def test_training_output_and_moving_statistics_match_float64_at_a_large_mean(shape, axis):
    rng = np.random.default_rng(0)
    x = (1e4 + rng.standard_normal(shape)).astype("float32")
    layer = tfbn.BatchNorm(axis=axis, momentum=0.5, epsilon=EPS)
    y = np.asarray(layer(x, training=True))
    axis %= len(shape)
    mean, var, ref = reference(x, axis)
    np.testing.assert_allclose(y, ref, atol=1e-4)
    np.testing.assert_allclose(
        np.asarray(layer.moving_variance), 0.5 + 0.5 * var.ravel(), rtol=1e-4
    )
    np.testing.assert_allclose(np.asarray(layer.moving_mean), 0.5 * mean.ravel(), rtol=1e-6)


def test_moments_and_batch_normalization_match_float64_at_a_large_mean():
    rng = np.random.default_rng(1)
    x = (-1e4 + rng.standard_normal((64, 8, 8, 4))).astype("float32")
    mean, var, ref = reference(x, 3)
    m, v = tfbn.moments(x, axes=[0, 1, 2])
    np.testing.assert_allclose(np.asarray(v), var.ravel(), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(m), mean.ravel(), rtol=1e-7)
    y = tfbn.batch_normalization(x, m, v, axis=-1, epsilon=EPS)
    # The float32 mean itself is off by up to half an ulp of 1e4 (5e-4): the reference uses it.
    m64 = np.asarray(m, np.float64)
    np.testing.assert_allclose(np.asarray(y), (x - m64) / np.sqrt(var.ravel() + EPS), atol=1e-4)
    m_keep, _ = tfbn.moments(x, axes=[0, 2], keepdims=True)
    assert tuple(m_keep.shape) == (1, 8, 1, 4)


def test_mask_keeps_masked_positions_out_of_the_statistics():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 7, 3)).astype("float32") * 3 + 2
    mask = rng.random((6, 7)) > 0.4
    layer = tfbn.BatchNorm(momentum=0.0)
    layer(x, training=True, mask=mask)
    mean, var, _ = reference(x, 2, mask)
    np.testing.assert_allclose(np.asarray(layer.moving_mean), mean.ravel(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(layer.moving_variance), var.ravel(), rtol=1e-5)


def test_ghost_batches_normalize_each_virtual_batch_with_its_own_statistics():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((12, 5, 4)).astype("float32") * 2 + 1
    layer = tfbn.BatchNorm(virtual_batch_size=4, momentum=0.0)
    y = np.asarray(layer(x, training=True))
    groups = x.shape[0] // 4
    means, variances = [], []
    for j in range(groups):
        part = x[j::groups]  # tf-keras's grouping: examples j, j + g, ...
        mean, var, ref = reference(part, 2)
        np.testing.assert_allclose(y[j::groups], ref, atol=1e-5)
        means.append(mean.ravel())
        variances.append(var.ravel())
    np.testing.assert_allclose(np.asarray(layer.moving_mean), np.mean(means, 0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(layer.moving_variance), np.mean(variances, 0), rtol=1e-5)


def test_renorm_output_follows_the_paper_with_clipping():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((32, 3)).astype("float32") * 4 + 3
    layer = tfbn.BatchNorm(renorm=True, renorm_clipping={"rmax": 1.5, "dmax": 0.5})
    layer.build(x.shape)
    layer.renorm_mean.assign([0.0, 1.0, 2.0])
    layer.renorm_stddev.assign([1.0, 2.0, 8.0])
    y = np.asarray(layer(x, training=True))
    mean, var, xhat = reference(x, 1)
    sigma = np.array([1.0, 2.0, 8.0])
    r = np.clip(np.sqrt(var.ravel() + EPS) / sigma, None, 1.5)
    d = np.clip((mean.ravel() - [0.0, 1.0, 2.0]) / sigma, -0.5, 0.5)
    np.testing.assert_allclose(y, xhat * r + d, atol=1e-5)


def test_adjustment_scales_and_shifts_the_normalized_value():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((16, 4, 3)).astype("float32")
    scale = rng.uniform(0.5, 2.0, (16, 1, 1)).astype("float32")
    bias = rng.uniform(-1.0, 1.0, (16, 1, 3)).astype("float32")
    seen = []

    def adjustment(shape):
        seen.append(tuple(np.asarray(shape)))
        return scale, bias

    layer = tfbn.BatchNorm(adjustment=adjustment, beta_initializer="ones")
    y = np.asarray(layer(x, training=True))
    _, _, xhat = reference(x, 2)
    np.testing.assert_allclose(y, xhat * scale + bias + 1.0, atol=1e-5)
    assert seen == [(16, 4, 3)]


def test_gradient_matches_the_closed_form_of_batch_normalization():
    import jax

    rng = np.random.default_rng(6)
    x = (100 + rng.standard_normal((8, 5, 4))).astype("float32")
    dy = rng.standard_normal(x.shape).astype("float32")
    gamma = rng.uniform(0.5, 2.0, 4).astype("float32")

    def loss(x):
        y, _ = tfbn.ops.core.training_batch_norm(x, 2, gamma=gamma, epsilon=EPS)
        return (y * dy).sum()

    dx = np.asarray(jax.grad(loss)(x))
    _, var, xhat = reference(x, 2)
    d = dy.astype(np.float64)
    axes = (0, 1)
    ref = (gamma / np.sqrt(var + EPS)) * (
        d - d.mean(axes, keepdims=True) - xhat * (d * xhat).mean(axes, keepdims=True)
    )
    np.testing.assert_allclose(dx, ref, atol=1e-4)


def _closed_form_gradients(x, dy, gamma, axes):
    """float64 (dx, dgamma, dbeta) of sum(dy * (gamma * x_hat + beta)) over the channel axis."""
    _, var, xhat = reference(x, len(x.shape) - 1)
    d = dy.astype(np.float64)
    dx = (gamma / np.sqrt(var + EPS)) * (
        d - d.mean(axes, keepdims=True) - xhat * (d * xhat).mean(axes, keepdims=True)
    )
    return dx, (d * xhat).sum(axes), d.sum(axes)


@pytest.mark.parametrize("shape", [(16, 6, 6, 8), (300, 5)])
def test_gradients_match_float64_at_a_large_mean(shape):
    import jax

    rng = np.random.default_rng(10)
    x = (1e4 + rng.standard_normal(shape)).astype("float32")
    dy = rng.standard_normal(shape).astype("float32")
    channels = shape[-1]
    gamma = rng.uniform(0.5, 2.0, channels).astype("float32")
    beta = rng.standard_normal(channels).astype("float32")

    def loss(x, gamma, beta):
        y, _ = tfbn.ops.core.training_batch_norm(x, len(shape) - 1, gamma=gamma, beta=beta)
        return (y * dy).sum()

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, gamma, beta)
    axes = tuple(range(len(shape) - 1))
    for got, want in zip(grads, _closed_form_gradients(x, dy, gamma, axes), strict=True):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_statistics_stay_exact_when_the_first_examples_are_far_from_the_mean():
    rng = np.random.default_rng(11)
    # Sorted: the first examples (where the shift is taken) lie far below the batch mean.
    x = np.sort(1e4 + 50 * rng.standard_normal((512, 3)), axis=0).astype("float32")
    layer = tfbn.BatchNorm(momentum=0.0)
    y = np.asarray(jax_jit_call(layer, x))
    mean, var, ref = reference(x, 1)
    np.testing.assert_allclose(np.asarray(layer.moving_variance), var.ravel(), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(layer.moving_mean), mean.ravel(), rtol=1e-7)
    np.testing.assert_allclose(y, ref, atol=1e-4)
    m, v = tfbn.moments(x, axes=[0])
    np.testing.assert_allclose(np.asarray(v), var.ravel(), rtol=1e-4)


def jax_jit_call(layer, x):
    """`layer(x, training=True)` compiled with `jax.jit`, the moving statistics assigned back."""
    import jax

    layer.build(x.shape)
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]
    step = jax.jit(lambda t, n, x: layer.stateless_call(t, n, x, training=True))
    y, non_trainable = step(trainable, non_trainable, x)
    for variable, value in zip(layer.non_trainable_variables, non_trainable, strict=True):
        variable.assign(value)
    return y


def test_the_tf_keras_layer_computes_with_tensorflow_under_the_jax_backend():
    tf = pytest.importorskip("tensorflow")
    pytest.importorskip("tf_keras")
    import tfbn.legacy

    rng = np.random.default_rng(12)
    x = (100 + rng.standard_normal((64, 5))).astype("float32")
    layer = tfbn.legacy.BatchNorm(momentum=0.0)
    trained = layer(tf.constant(x), training=True)
    inferred = layer(tf.constant(x), training=False)
    assert isinstance(trained, tf.Tensor) and isinstance(inferred, tf.Tensor)
    _, var, ref = reference(x, 1)
    np.testing.assert_allclose(trained.numpy(), ref, atol=1e-4)
    np.testing.assert_allclose(layer.moving_variance.numpy(), var.ravel(), rtol=1e-4)
    np.testing.assert_allclose(inferred.numpy(), ref, atol=1e-4)


def test_mixed_precision_trains_in_float32_and_returns_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        layer = tfbn.BatchNorm(momentum=0.0)
        x = np.random.default_rng(7).standard_normal((32, 6)).astype("float16") * 300
        y = layer(x, training=True)
        assert keras.backend.standardize_dtype(y.dtype) == "float16"
        assert keras.backend.standardize_dtype(layer.moving_variance.dtype) == "float32"
        _, var, ref = reference(x, 1)
        np.testing.assert_allclose(np.asarray(layer.moving_variance), var.ravel(), rtol=1e-4)
        np.testing.assert_allclose(np.asarray(y, np.float64), ref, atol=1e-2)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_fit_under_jit_updates_moving_statistics_like_keras():
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((64, 6)) * 3 + 5).astype("float32")
    y = rng.standard_normal((64, 1)).astype("float32")
    models = []
    for layer in (tfbn.BatchNorm(synchronized=True), keras.layers.BatchNormalization()):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6,)), layer, keras.layers.Dense(1)])
        model.compile("sgd", "mse", jit_compile=True)
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        models.append(model)
    for a, b in zip(models[0].weights, models[1].weights, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_data_parallel_statistics_are_those_of_the_global_batch():
    import jax

    devices = jax.devices("cpu")
    if len(devices) < 4:
        pytest.fail("XLA_FLAGS=--xla_force_host_platform_device_count=4 was not set")
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((32, 4)) * np.arange(1, 33)[:, None]).astype("float32")
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices[:4]))
    try:
        layer = tfbn.BatchNorm(synchronized=True, momentum=0.0)
        model = keras.Sequential([keras.Input((4,)), layer])
        model.compile("sgd", lambda t, p: keras.ops.mean(p**2), jit_compile=True)
        model.fit(x, x, batch_size=32, epochs=1, shuffle=False, verbose=0)
    finally:
        keras.distribution.set_distribution(None)
    mean, var, _ = reference(x, 1)
    np.testing.assert_allclose(np.asarray(layer.moving_mean), mean.ravel(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(layer.moving_variance), var.ravel(), rtol=1e-4)


def test_keras_files_cross_between_tensorflow_and_jax():
    folder = os.environ.get("TFBN_CROSS_DIR")
    if not folder:
        pytest.fail("TFBN_CROSS_DIR is not set: run this module through tests/test_backends.py")
    folder = pathlib.Path(folder)
    data = np.load(folder / "from_tensorflow.npz")
    model = keras.saving.load_model(folder / "from_tensorflow.keras")
    assert any(isinstance(layer, tfbn.BatchNorm) for layer in model.layers)
    np.testing.assert_allclose(np.asarray(model(data["x"])), data["y"], atol=1e-5)
    # The same model trained one step on JAX, saved for the TensorFlow side.
    model.compile("sgd", "mse")
    model.fit(data["x"], data["y"] * 0.5, epochs=1, verbose=0)
    model.save(folder / "from_jax.keras")
    np.savez(folder / "from_jax.npz", x=data["x"], y=np.asarray(model(data["x"])))

"""Helpers of the tfbn.legacy tests: tfbn.legacy.BatchNorm run side by side with tf-keras's layer.

Shared by tests/test_legacy*.py (in this suite's process) and tests/legacy_graph_cases.py (a
process with eager execution disabled), so nothing here may run TensorFlow at import.
"""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from tfbn import legacy

ATOL = 1e-5
Anchor = tf_keras.layers.BatchNormalization
LAYERS = (legacy.BatchNorm, Anchor)


@pytest.fixture(autouse=True)
def _tf_keras_state():
    """tf-keras's global state (names, learning phase, dtype policy) back to its default."""
    yield
    tf_keras.mixed_precision.set_global_policy("float32")
    tf_keras.backend.clear_session()


def step(layer, x, probe, optimizer, mask=None):
    """One training step with SGD (regularization losses included), then an inference call."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True, mask=mask)
        loss = tf.reduce_sum(y * probe) + tf.add_n([tf.constant(0.0)] + layer.losses)
    variables = layer.trainable_weights
    grads = tape.gradient(loss, [x] + variables)
    if variables:
        optimizer.apply_gradients(zip(grads[1:], variables, strict=True))
    return {
        "y": y.numpy(),
        "loss": float(loss),
        "dx": grads[0].numpy(),
        "weights": weights_by_name(layer),
        "inference": layer(x, training=False).numpy(),
    }


def weights_by_name(layer) -> dict:
    return {w.name.split("/")[-1].split(":")[0]: np.asarray(w.numpy()) for w in layer.weights}


def assert_same(ours, theirs, atol=ATOL, keys=("y", "dx", "inference", "loss")):
    """Every value of `theirs` (a dict of arrays or of such dicts) is close to ours."""
    assert sorted(ours["weights"]) == sorted(theirs["weights"])
    for key in keys:
        np.testing.assert_allclose(ours[key], theirs[key], atol=atol, rtol=1e-5, err_msg=key)
    for name, value in theirs["weights"].items():
        assert ours["weights"][name].shape == value.shape, name
        np.testing.assert_allclose(ours["weights"][name], value, atol=atol, rtol=1e-5, err_msg=name)


def compare(rng, kwargs, shape=(8, 3, 4, 5), steps=3):
    """Both layers, same arguments, `steps` SGD steps on the same data: every result agrees."""
    x = tf.constant(rng.normal(size=shape) * 2 + 1, tf.float32)
    probe = tf.constant(rng.normal(size=shape), tf.float32)
    results = {}
    for cls in LAYERS:
        layer = cls(**kwargs)
        optimizer = tf_keras.optimizers.SGD(0.1)
        results[cls] = [step(layer, x * (i + 1) - i, probe, optimizer) for i in range(steps)]
    for ours, theirs in zip(results[legacy.BatchNorm], results[Anchor], strict=True):
        assert_same(ours, theirs)


def train_shared_layer(cls, x, sgd):
    """One layer called on two inputs, a model around the second trained one batch, that model
    reused inside another trained again (tf-keras's shared-layer case); the layer's weights."""
    bn = cls()
    bn(tf_keras.Input(shape=x.shape[1:]))
    x2 = tf_keras.Input(shape=x.shape[1:])
    model = tf_keras.Model(x2, bn(x2))
    model.compile(sgd(0.01), "mse")
    model.train_on_batch(x, x)
    x3 = tf_keras.Input(shape=x.shape[1:])
    new_model = tf_keras.Model(x3, model(x3))
    new_model.compile(sgd(0.01), "mse")
    new_model.train_on_batch(x, x)
    return bn.get_weights()


def numpy_batch_norm(x, axes, epsilon, mask=None, ddof=0):
    """float64 reference: (normalized x, mean, variance with `ddof`) over the kept positions.

    `axes` are the axes that keep their own statistics; `mask` (broadcastable to `x`) selects the
    positions that count.
    """
    x = np.asarray(x, np.float64)
    reduce = tuple(i for i in range(x.ndim) if i not in axes)
    weights = np.ones_like(x) if mask is None else np.broadcast_to(mask, x.shape).astype(np.float64)
    count = weights.sum(reduce, keepdims=True)
    mean = (x * weights).sum(reduce, keepdims=True) / count
    biased = ((x - mean) ** 2 * weights).sum(reduce, keepdims=True) / count
    y = (x - mean) / np.sqrt(biased + epsilon)
    return y, mean.squeeze(reduce), (biased * count / (count - ddof)).squeeze(reduce)

"""tfbn.legacy.BatchNorm in TF1 graph mode (`tf.compat.v1.disable_eager_execution()`), side by
side with tf-keras's layer: builds on symbolic tensors, trains with tf-keras's TF1 training loop.

Eager execution cannot be turned back on in a process, so tests/test_legacy_graph.py runs this
module in a process of its own (`pytest --junitxml`) and reports each case; it is not collected
by the main suite (its name does not start with `test_`).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.compat.v1.disable_eager_execution()

import tf_keras  # noqa: E402
from legacy_helpers import (  # noqa: E402, F401 - _tf_keras_state is an autouse fixture
    LAYERS,
    _tf_keras_state,
    numpy_batch_norm,
    train_shared_layer,
)

from tfbn import legacy  # noqa: E402

K = tf_keras.backend


def test_eager_execution_is_off():
    assert not tf.executing_eagerly()
    assert not tf.compat.v1.executing_eagerly_outside_functions()


FIT_CASES = {
    "fused_default": {},
    "renorm": {"renorm": True, "renorm_clipping": {"rmax": 1.5}},
    "axis_list": {"axis": [2, 3]},
    "synchronized": {"synchronized": True},
}


def _fit(cls, kwargs, x, y):
    K.clear_session()
    tf_keras.utils.set_random_seed(1)
    bn = cls(momentum=0.5, **kwargs)
    model = tf_keras.Sequential([tf_keras.Input(x.shape[1:]), tf_keras.layers.Conv2D(3, 1), bn])
    model.compile(optimizer=tf_keras.optimizers.legacy.SGD(0.1), loss="mse")
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    return bn, model.get_weights(), model.predict(x, verbose=0)


@pytest.mark.parametrize("case", sorted(FIT_CASES))
def test_fit_matches_tf_keras(case):
    """`fit` runs tf-keras's TF1 loop (symbolic learning phase, updates collected from
    `layer.updates`): same `fused` choice, weights, moving statistics and predictions."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4, 4, 3)).astype("float32") * 2 + 1
    y = rng.normal(size=(64, 4, 4, 3)).astype("float32")
    (ours, weights, predictions), (theirs, weights_k, predictions_k) = (
        _fit(cls, FIT_CASES[case], x, y) for cls in LAYERS
    )
    assert ours.fused is theirs.fused
    for got, want in zip(weights, weights_k, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(predictions, predictions_k, atol=1e-5, rtol=1e-5)


def test_masking_layer_padding_does_not_count():
    padded = np.array([[[1, 5], [2, 5], [0, 0], [0, 0]] for _ in range(10)], dtype="float32")
    inputs = tf_keras.Input((None, 2))
    bn = legacy.BatchNorm(momentum=0.0)
    model = tf_keras.Model(inputs, bn(tf_keras.layers.Masking()(inputs)))
    model.compile("rmsprop", "mse")
    model.fit(padded, padded, batch_size=10, epochs=2, verbose=0)
    np.testing.assert_array_equal(K.get_value(bn.moving_mean), [1.5, 5.0])
    np.testing.assert_array_equal(K.get_value(bn.moving_variance), [0.25, 0.0])


def test_symbolic_learning_phase_selects_the_mode_and_keeps_ghost_batches():
    """Called without `training`, the layer follows the symbolic learning phase: fed 1, it
    normalizes each virtual batch with its own statistics and updates (float64 NumPy); fed 0, it
    uses the moving statistics."""
    x = np.random.default_rng(1).normal(size=(8, 3)) * 2 + 1
    inputs = tf_keras.Input((3,))
    bn = legacy.BatchNorm(virtual_batch_size=2, momentum=0.0, center=False, scale=False)
    outputs = bn(inputs)
    run = K.function([inputs, K.learning_phase()], [outputs] + bn.updates)
    y = run([x, True])[0]
    want, means, variances = numpy_batch_norm(x.reshape(2, 4, 3), [1, 2], 1e-3)
    np.testing.assert_allclose(y, want.reshape(8, 3), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.ravel(K.get_value(bn.moving_mean)), means.mean(0), atol=1e-6)
    np.testing.assert_allclose(np.ravel(K.get_value(bn.moving_variance)), variances.mean(0))
    y = run([x, False])[0]
    moving = np.sqrt(variances.mean(0) + 1e-3)
    np.testing.assert_allclose(y, (x - means.mean(0)) / moving, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape, fused", [((4, 4, 4), True), ((4, 4), False)])
def test_fused_attribute_after_build(shape, fused):
    for cls in LAYERS:
        norm = cls()
        norm(tf_keras.Input(shape=shape))
        assert norm.fused is fused


def test_shared_layer_across_inputs_and_models():
    x = np.random.default_rng(2).normal(loc=5.0, scale=10.0, size=(2, 10))
    trained = [train_shared_layer(cls, x, tf_keras.optimizers.legacy.SGD) for cls in LAYERS]
    for ours, theirs in zip(*trained, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_h5_round_trip(tmp_path):
    x = np.random.default_rng(3).normal(size=(8, 4, 4, 2)).astype("float32")
    model = tf_keras.Sequential(
        [tf_keras.Input((4, 4, 2)), legacy.BatchNorm(momentum=0.5), legacy.BatchNorm(renorm=True)]
    )
    model.compile("sgd", "mse")
    model.fit(x, x, batch_size=4, verbose=0)
    path = str(tmp_path / "model.h5")
    model.save(path)
    reloaded = tf_keras.models.load_model(path)
    assert all(isinstance(layer, legacy.BatchNorm) for layer in reloaded.layers)
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), model.predict(x, verbose=0))

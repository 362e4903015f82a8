"""tfbn.legacy.BatchNorm against tf_keras.layers.BatchNormalization (tf-keras 2.x).

Run in a process of its own by tests/test_legacy.py (`pytest tests/legacy_cases.py --noconftest`):
tf-keras keeps global state (sessions, learning phase) that should not meet Keras 3's test set-up.
"""

import inspect
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(2)]
)

import tf_keras  # noqa: E402
from tf_keras.src.layers.normalization import batch_normalization as tfk_bn  # noqa: E402

import tfbn  # noqa: E402
from tfbn import legacy  # noqa: E402

ATOL = 1e-5
Anchor = tf_keras.layers.BatchNormalization


@pytest.fixture
def rng():
    return np.random.default_rng(4321)


@pytest.fixture(scope="module")
def strategy():
    # One strategy for the module: collective-op keys of two MirroredStrategy objects in one
    # process can collide.
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


@pytest.fixture(autouse=True)
def _clear_session():
    yield
    tf_keras.backend.clear_session()


def _named_parameters(*functions):
    names = []
    for function in functions:
        for name, p in inspect.signature(function).parameters.items():
            if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                names.append(name)
    return list(dict.fromkeys(names))


def _adjustment(shape):
    channels = shape[-1:]
    return tf.fill(channels, 1.3), tf.fill(channels, 0.2)


# One non-default value per argument of tf_keras.layers.BatchNormalization and of the base class
# that receives the rest of its keyword arguments (tf-keras 2.21).
TF_KERAS_ARGUMENTS = {
    "axis": 1,
    "momentum": 0.5,
    "epsilon": 0.1,
    "center": False,
    "scale": False,
    "beta_initializer": tf_keras.initializers.Constant(0.3),
    "gamma_initializer": tf_keras.initializers.Constant(1.7),
    "moving_mean_initializer": tf_keras.initializers.Constant(0.2),
    "moving_variance_initializer": tf_keras.initializers.Constant(2.0),
    "beta_regularizer": tf_keras.regularizers.L2(0.1),
    "gamma_regularizer": tf_keras.regularizers.L1(0.2),
    "beta_constraint": tf_keras.constraints.MaxNorm(0.01, axis=0),
    "gamma_constraint": tf_keras.constraints.NonNeg(),
    "renorm": True,
    "renorm_clipping": {"rmax": 1.2, "rmin": 0.9, "dmax": 0.1},
    "renorm_momentum": 0.6,
    "fused": False,
    "trainable": False,
    "virtual_batch_size": 2,
    "adjustment": _adjustment,
    "name": "bn_named",
    "synchronized": True,
}
# Further values worth their own comparison.
EXTRA_CASES = {
    "axis_list": {"axis": [1, 3]},
    "axis_list_renorm": {"axis": [2, 3], "renorm": True, "momentum": 0.5},
    "fused_true": {"fused": True},
    "fused_channels_first": {"axis": 1, "fused": True},
    "ghost_renorm": {"virtual_batch_size": 4, "renorm": True},
    "rank2_default": {"shape": (8, 5)},
    "rank5_default": {"shape": (4, 2, 3, 2, 4)},
}


def test_argument_table_covers_tf_keras_signature():
    anchor = _named_parameters(Anchor.__init__, tfk_bn.BatchNormalizationBase.__init__)
    assert set(anchor) == set(TF_KERAS_ARGUMENTS)


def test_both_layers_accept_every_anchor_argument():
    import keras

    keras_args = _named_parameters(keras.layers.BatchNormalization.__init__)
    tf_keras_args = _named_parameters(Anchor.__init__, tfk_bn.BatchNormalizationBase.__init__)
    legacy_params = inspect.signature(legacy.BatchNorm.__init__).parameters
    assert set(keras_args) | set(tf_keras_args) <= set(legacy_params)
    # tfbn.BatchNorm takes every argument of both by name (trainable/name through Keras's base).
    layer_params = _named_parameters(tfbn.BatchNorm.__init__, keras.layers.Layer.__init__)
    assert set(keras_args) | set(tf_keras_args) <= set(layer_params)
    # tf-keras's positional order is kept.
    positional = [n for n in legacy_params if n != "self"][
        : len(_named_parameters(Anchor.__init__))
    ]
    assert positional == _named_parameters(Anchor.__init__)


def _step(layer, x, probe, optimizer, mask=None):
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
        "weights": {w.name.split("/")[-1]: w.numpy() for w in layer.weights},
        "inference": layer(x, training=False).numpy(),
    }


def _assert_same(ours, theirs, atol=ATOL):
    assert sorted(ours["weights"]) == sorted(theirs["weights"])
    for key in ("y", "dx", "inference"):
        np.testing.assert_allclose(ours[key], theirs[key], atol=atol, rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(ours["loss"], theirs["loss"], rtol=1e-5, atol=atol)
    for name, value in theirs["weights"].items():
        assert ours["weights"][name].shape == value.shape, name
        np.testing.assert_allclose(ours["weights"][name], value, atol=atol, rtol=1e-5, err_msg=name)


def _compare(rng, kwargs, shape=(8, 3, 4, 5), steps=3):
    x = tf.constant(rng.normal(size=shape) * 2 + 1, tf.float32)
    probe = tf.constant(rng.normal(size=shape), tf.float32)
    results = {}
    for cls in (legacy.BatchNorm, Anchor):
        layer = cls(**kwargs)
        optimizer = tf_keras.optimizers.SGD(0.1)
        results[cls] = [_step(layer, x * (i + 1) - i, probe, optimizer) for i in range(steps)]
    for ours, theirs in zip(results[legacy.BatchNorm], results[Anchor], strict=True):
        _assert_same(ours, theirs)


@pytest.mark.parametrize("name", sorted(TF_KERAS_ARGUMENTS))
def test_each_tf_keras_argument_matches_tf_keras_layer(rng, name):
    """Same one non-default argument for both layers, rank-4 input (tf-keras fuses by default):
    three training steps (outputs, input gradient, loss, weights after SGD with constraints,
    moving statistics) and inference calls agree."""
    kwargs = {name: TF_KERAS_ARGUMENTS[name]}
    if name in ("renorm_clipping", "renorm_momentum"):
        kwargs["renorm"] = True
    _compare(rng, kwargs)


@pytest.mark.parametrize("case", sorted(EXTRA_CASES))
def test_more_configurations_match_tf_keras_layer(rng, case):
    kwargs = dict(EXTRA_CASES[case])
    shape = kwargs.pop("shape", (8, 3, 4, 5))
    _compare(rng, kwargs, shape=shape)


def test_fused_moving_variance_is_bessel_corrected_like_tf_keras(rng):
    """tf-keras's fused path moves the moving variance towards the unbiased batch variance; the
    legacy layer does too (float64 NumPy), and tfbn.BatchNorm (Keras semantics) does not."""
    x = rng.normal(size=(4, 3, 3, 2)) * 3
    layer = legacy.BatchNorm(momentum=0.0)
    layer(tf.constant(x, tf.float32), training=True)
    np.testing.assert_allclose(
        layer.moving_variance.numpy(), x.reshape(-1, 2).var(0, ddof=1), rtol=1e-5
    )
    unfused = legacy.BatchNorm(momentum=0.0, fused=False)
    unfused(tf.constant(x, tf.float32), training=True)
    np.testing.assert_allclose(unfused.moving_variance.numpy(), x.reshape(-1, 2).var(0), rtol=1e-5)


def test_masked_statistics_match_tf_keras_layer(rng):
    x = tf.constant(rng.normal(size=(6, 7, 4)) * 2 + 1, tf.float32)
    mask = tf.constant(rng.random((6, 7)) > 0.4)
    probe = tf.constant(rng.normal(size=(6, 7, 4)), tf.float32)
    ours = _step(legacy.BatchNorm(momentum=0.5), x, probe, tf_keras.optimizers.SGD(0.1), mask)
    theirs = _step(Anchor(momentum=0.5), x, probe, tf_keras.optimizers.SGD(0.1), mask)
    _assert_same(ours, theirs)


def _lenet_like(bn, seed):
    tf_keras.utils.set_random_seed(seed)
    return tf_keras.Sequential(
        [
            tf_keras.Input((8, 8, 1)),
            tf_keras.layers.Conv2D(4, 3, use_bias=False),
            bn(momentum=0.9, epsilon=1e-5),
            tf_keras.layers.Activation("sigmoid"),
            tf_keras.layers.Flatten(),
            tf_keras.layers.Dense(6, use_bias=False),
            bn(momentum=0.9, epsilon=1e-5, virtual_batch_size=4),
            tf_keras.layers.Activation("sigmoid"),
            tf_keras.layers.Dense(3),
        ]
    )


@pytest.mark.parametrize("jit_compile", [False, True])
def test_fit_matches_tf_keras_model(rng, jit_compile):
    """A small conv net trained by `fit` (updates through add_update, one with ghost batches)
    ends with the same weights and predictions as the same net with tf-keras's layer."""
    x = rng.normal(size=(64, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 3, size=64)
    models = []
    for bn in (legacy.BatchNorm, Anchor):
        model = _lenet_like(bn, seed=7)
        model.compile(
            optimizer=tf_keras.optimizers.SGD(0.5),
            loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=jit_compile,
        )
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        models.append(model)
    ours, theirs = models
    for a, b in zip(ours.weights, theirs.weights, strict=True):
        assert a.name.split("/")[-1] == b.name.split("/")[-1]
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4, rtol=1e-4, err_msg=a.name)
    np.testing.assert_allclose(
        ours.predict(x, verbose=0), theirs.predict(x, verbose=0), atol=1e-4, rtol=1e-4
    )


def test_frozen_layer_runs_inference_and_does_not_update(rng):
    x = rng.normal(size=(16, 4)).astype("float32") + 3
    model = tf_keras.Sequential([tf_keras.Input((4,)), legacy.BatchNorm(trainable=False)])
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, x, epochs=1, verbose=0)
    layer = model.layers[0]
    np.testing.assert_array_equal(layer.moving_mean.numpy(), np.zeros(4))
    np.testing.assert_allclose(model(x, training=True).numpy(), x / np.sqrt(1 + 1e-3), rtol=1e-6)


def test_moving_statistics_identical_on_replicas_under_mirrored_strategy(rng, strategy):
    """Replica 0 sees mean-0 data, replica 1 mean-10 data. Every replica's copy of the moving
    statistics ends equal to the EMA of the replica-mean statistics (float64 NumPy); tf-keras's
    copies drift apart (their average, which tf-keras reads, is the same value)."""
    data = [rng.normal(size=(3, 8, 4)) * s + m for s, m in ((1.0, 0.0), (2.0, 10.0))]
    results = {}
    for cls in (legacy.BatchNorm, Anchor):
        with strategy.scope():
            layer = cls(momentum=0.8)
            layer.build((8, 4))

        @tf.function
        def train(batch, layer=layer):
            return strategy.run(lambda b: layer(b, training=True), args=(batch,))

        for step in range(3):
            batch = strategy.experimental_distribute_values_from_function(
                lambda ctx, step=step: tf.constant(
                    data[ctx.replica_id_in_sync_group][step], tf.float32
                )
            )
            train(batch)
        results[cls] = [
            np.stack([v.numpy() for v in strategy.experimental_local_results(var)])
            for var in (layer.moving_mean, layer.moving_variance)
        ] + [layer.moving_mean.numpy(), layer.moving_variance.numpy()]
    mean, var = np.zeros(4), np.ones(4)
    for step in range(3):
        batch_mean = np.mean([d[step].mean(0) for d in data], 0)
        batch_var = np.mean([d[step].var(0) for d in data], 0)
        mean, var = 0.8 * mean + 0.2 * batch_mean, 0.8 * var + 0.2 * batch_var
    copies_mean, copies_var, read_mean, read_var = results[legacy.BatchNorm]
    for copy in copies_mean:
        np.testing.assert_allclose(copy, mean, atol=1e-4)
    for copy in copies_var:
        np.testing.assert_allclose(copy, var, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(read_mean, mean, atol=1e-4)
    tk_copies_mean, _, tk_read_mean, tk_read_var = results[Anchor]
    assert np.abs(tk_copies_mean[0] - tk_copies_mean[1]).max() > 1.0
    np.testing.assert_allclose(read_mean, tk_read_mean, atol=1e-4)
    np.testing.assert_allclose(read_var, tk_read_var, atol=1e-4, rtol=1e-5)


def test_fit_under_mirrored_strategy_keeps_replicas_identical(rng, strategy):
    x = rng.normal(size=(64, 6)).astype("float32") * 2 + 1
    with strategy.scope():
        model = tf_keras.Sequential(
            [tf_keras.Input((6,)), tf_keras.layers.Dense(5), legacy.BatchNorm(renorm=True)]
        )
        model.compile(optimizer="sgd", loss="mse")
    model.fit(x, np.zeros((64, 5), "float32"), batch_size=16, epochs=2, verbose=0)
    layer = model.layers[-1]
    for variable in layer.non_trainable_weights:
        copies = [v.numpy() for v in strategy.experimental_local_results(variable)]
        assert len(copies) == 2
        np.testing.assert_allclose(copies[0], copies[1], atol=1e-6, err_msg=variable.name)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"renorm": True, "renorm_clipping": {"rmax": 2.0, "foo": 1.0}}, "unknown keys"),
        ({"renorm": True, "renorm_clipping": {"rmax": 1.0, "rmin": 2.0}}, "rmax >= rmin"),
        ({"renorm": True, "renorm_clipping": {"dmax": -1.0}}, "dmax >= 0"),
        ({"virtual_batch_size": 0}, "virtual_batch_size"),
        ({"virtual_batch_size": 2, "synchronized": True}, "synchronized=True"),
        ({"adjustment": 3.0}, "adjustment"),
        ({"fused": True, "renorm": True}, "renorm"),
        ({"fused": True, "axis": 2}, "axis"),
        ({"fused": "yes"}, "fused"),
        ({"axis": "last"}, "axis"),
        ({"momentum": 1.0}, "momentum"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        legacy.BatchNorm(**kwargs)


def test_fused_true_on_rank_2_input_is_a_value_error():
    with pytest.raises(ValueError, match="rank-4 or rank-5"):
        legacy.BatchNorm(fused=True).build((4, 3))


def test_ghost_batch_that_does_not_divide_is_a_value_error():
    with pytest.raises(ValueError, match="virtual_batch_size=4"):
        legacy.BatchNorm(virtual_batch_size=4)(tf.zeros((6, 3)), training=True)


def test_saved_and_reloaded_model_is_the_same(tmp_path, rng):
    x = rng.normal(size=(8, 4, 4, 2)).astype("float32")
    model = tf_keras.Sequential(
        [
            tf_keras.Input((4, 4, 2)),
            legacy.BatchNorm(axis=[2, 3], renorm=True, renorm_clipping={"rmax": 3.0}),
            legacy.BatchNorm(virtual_batch_size=2, momentum=0.5),
        ]
    )
    model(x, training=True)
    path = str(tmp_path / "model.keras")
    model.save(path)
    reloaded = tf_keras.models.load_model(path)
    assert reloaded.layers[0].get_config() == model.layers[0].get_config()
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), model.predict(x, verbose=0))
    with pytest.warns(UserWarning, match="adjustment"):
        legacy.BatchNorm(adjustment=_adjustment).get_config()


def test_training_as_a_tensor_matches_tf_keras(rng):
    """`training` given as a boolean tensor inside a tf.function (tf-keras allows it)."""
    x = tf.constant(rng.normal(size=(8, 5)) * 2 + 3, tf.float32)
    results = []
    for cls in (legacy.BatchNorm, Anchor):
        layer = cls(momentum=0.5, renorm=True)
        layer.build(x.shape)
        call = tf.function(lambda x, t, layer=layer: layer(x, training=t))
        outputs = [call(x, tf.constant(t)).numpy() for t in (True, False, True)]
        results.append((outputs, [w.numpy() for w in layer.weights]))
    (ours, ours_w), (theirs, theirs_w) = results
    for got, want in zip(ours + ours_w, theirs + theirs_w, strict=True):
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("kwargs", [{}, {"renorm": True}, {"virtual_batch_size": 2}])
def test_mixed_precision_matches_tf_keras(rng, kwargs):
    tf_keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        x = tf.constant(rng.normal(size=(8, 3, 3, 4)) * 3 + 2, tf.float16)
        ours, theirs = legacy.BatchNorm(**kwargs), Anchor(**kwargs)
        for _ in range(2):
            y, y_k = ours(x, training=True), theirs(x, training=True)
        assert y.dtype == tf.float16
        np.testing.assert_allclose(y.numpy(), y_k.numpy(), atol=2e-3)
        for got, want in zip(ours.weights, theirs.weights, strict=True):
            assert got.dtype == want.dtype == tf.float32
            np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4, rtol=1e-4)
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")

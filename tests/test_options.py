"""Batch-norm options (masks, ghost batches, batch renormalization, adjustment): the stateless
math in `tfbn.ops.nn` against float64 NumPy and against Keras 3's own BatchNormalization layer."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf
from model_helpers import batch_norm_arguments
from replica_helpers import replica_values

from tfbn.ops import nn as ops

ATOL = 1e-5


def numpy_ghost_moments(x, axis, virtual_batch_size, mask=None):
    """float64 reference: virtual batch j holds examples j, j + g, j + 2g, ... (tf-keras order)."""
    x = np.asarray(x, np.float64)
    axis = axis % x.ndim
    groups = x.shape[0] // virtual_batch_size
    means, variances, counts = [], [], []
    for j in range(groups):
        xj = np.moveaxis(x[j::groups], axis, -1).reshape(-1, x.shape[axis])
        if mask is None:
            w = np.ones(xj.shape[0])
        else:
            w = np.asarray(mask[j::groups], np.float64).reshape(-1)
        mean = (w[:, None] * xj).sum(0) / w.sum()
        means.append(mean)
        variances.append((w[:, None] * (xj - mean) ** 2).sum(0) / w.sum())
        counts.append(w.sum())
    return np.array(means), np.array(variances), np.array(counts)


# ------------------------------------------------------------------------------ argument checks
@pytest.mark.parametrize(
    "clipping, words",
    [
        ({"rmax": 2.0, "bogus": 1.0}, "Received invalid keys"),
        ({"rmax": 1.0, "rmin": 2.0}, "rmax should be greater than rmin"),
        ({"dmax": -0.5}, "dmax should be non-negative"),
        ({"rmax": "big"}, "needs finite numbers"),
        ({"rmax": float("nan")}, "rmax=nan"),
        ({"dmax": float("inf")}, "dmax=inf"),
        ({"rmax": 0, "rmin": 0}, "rmax should be positive"),
        ({"rmin": -1.0}, "rmin should be non-negative"),
        ([("rmax", 2.0)], "must be a dict"),
    ],
)
def test_bad_renorm_clipping_is_a_value_error(clipping, words):
    with pytest.raises(ValueError, match="renorm_clipping") as info:
        ops.check_renorm_clipping(clipping)
    assert words in str(info.value)


def test_renorm_clipping_keeps_given_keys_as_floats():
    assert ops.check_renorm_clipping(None) == {}
    assert ops.check_renorm_clipping({"rmax": 3, "dmax": None}) == {"rmax": 3.0}


@pytest.mark.parametrize("size", [0, -2, 2.5, True, "4"])
def test_bad_virtual_batch_size_is_a_value_error(size):
    with pytest.raises(ValueError, match="virtual_batch_size"):
        ops.check_virtual_batch_size(size)


def test_virtual_batch_size_with_synchronized_is_a_value_error():
    with pytest.raises(ValueError, match="synchronized=True"):
        ops.check_virtual_batch_size(4, synchronized=True)


def test_non_callable_adjustment_is_a_value_error():
    with pytest.raises(ValueError, match="adjustment"):
        ops.check_adjustment((1.0, 0.0))
    assert ops.check_adjustment(None) is None


# ------------------------------------------------------------------------------ ghost batches
@pytest.mark.parametrize(
    "shape, axis, vbs", [((12, 3), -1, 4), ((8, 3, 4, 5), 1, 2), ((6, 2, 3, 4), -1, 3)]
)
def test_ghost_moments_match_numpy(rng, shape, axis, vbs):
    x = rng.normal(size=shape) * 3 + rng.normal(size=(shape[0],) + (1,) * (len(shape) - 1)) * 5
    stats = ops.ghost_moments(tf.constant(x, tf.float32), axis, vbs)
    mean, variance, count = numpy_ghost_moments(x, axis, vbs)
    np.testing.assert_allclose(stats.mean.numpy(), mean, atol=ATOL, rtol=1e-5)
    np.testing.assert_allclose(stats.variance.numpy(), variance, atol=ATOL, rtol=1e-5)
    np.testing.assert_allclose(stats.count.numpy(), np.broadcast_to(count[:, None], mean.shape))


def test_ghost_moments_ignore_masked_positions(rng):
    x = rng.normal(size=(8, 5, 3))
    mask = rng.random((8, 5)) > 0.3
    stats = ops.ghost_moments(tf.constant(x, tf.float32), -1, 4, mask=tf.constant(mask))
    mean, variance, count = numpy_ghost_moments(x, -1, 4, mask=mask)
    np.testing.assert_allclose(stats.mean.numpy(), mean, atol=ATOL, rtol=1e-5)
    np.testing.assert_allclose(stats.variance.numpy(), variance, atol=ATOL, rtol=1e-5)
    np.testing.assert_allclose(stats.count.numpy(), np.broadcast_to(count[:, None], mean.shape))


def test_ghost_batch_size_must_divide_the_batch():
    with pytest.raises(ValueError, match="must divide the batch size"):
        ops.ghost_moments(tf.zeros((10, 3)), -1, 4)


def test_ghost_batch_size_must_divide_the_batch_in_a_graph():
    fn = tf.function(
        lambda x: ops.ghost_moments(x, -1, 4).mean,
        input_signature=[tf.TensorSpec([None, 3], tf.float32)],
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="must divide the batch size"):
        fn(tf.zeros((10, 3)))


def test_ghost_batch_norm_normalizes_each_virtual_batch(rng):
    x = rng.normal(size=(12, 4, 3)) * 2 + np.arange(12)[:, None, None]
    gamma, beta = rng.normal(size=3), rng.normal(size=3)
    y, stats = ops.batch_norm_training(
        tf.constant(x, tf.float32), -1, gamma=gamma, beta=beta, epsilon=1e-3, virtual_batch_size=3
    )
    groups = 4
    expected = np.empty_like(x)
    for j in range(groups):
        xj = x[j::groups]
        mean, var = xj.mean((0, 1)), xj.var((0, 1))
        expected[j::groups] = gamma * (xj - mean) / np.sqrt(var + 1e-3) + beta
    np.testing.assert_allclose(y.numpy(), expected, atol=ATOL, rtol=1e-5)
    # The moving statistics follow the mean over virtual batches of their means and variances.
    mean, variance, _ = numpy_ghost_moments(x, -1, 3)
    np.testing.assert_allclose(stats.mean.numpy(), mean.mean(0), atol=ATOL, rtol=1e-5)
    np.testing.assert_allclose(stats.variance.numpy(), variance.mean(0), atol=ATOL, rtol=1e-5)
    np.testing.assert_array_equal(stats.count.numpy(), x.shape[0] * x.shape[1])


# ------------------------------------------------------------------------------ renorm
def test_renorm_correction_matches_numpy(rng):
    mean, variance = rng.normal(size=6), rng.random(6) * 4
    renorm_mean, renorm_stddev = rng.normal(size=6), rng.random(6) * 2
    renorm_stddev[0] = 0.0  # a first step: the divisor is floored at sqrt(epsilon)
    eps = 1e-3
    clipping = {"rmax": 1.5, "rmin": 0.5, "dmax": 0.4}
    r, d = ops.renorm_correction(
        tf.constant(mean, tf.float32),
        tf.constant(variance, tf.float32),
        renorm_mean,
        renorm_stddev,
        eps,
        clipping,
    )
    sigma = np.maximum(renorm_stddev, np.sqrt(eps))
    expected_r = np.clip(np.sqrt(variance + eps) / sigma, 0.5, 1.5)
    expected_d = np.clip((mean - renorm_mean) / sigma, -0.4, 0.4)
    np.testing.assert_allclose(r.numpy(), expected_r, rtol=1e-5)
    np.testing.assert_allclose(d.numpy(), expected_d, rtol=1e-5, atol=1e-6)


def _probed(function, x, probe, variables):
    """`(out, gradients)`: `out = function(x)` and the gradients of `sum(y * probe)` with respect
    to `x`, then each of `variables`, where `y` is `out`, or `out[0]` if `out` is a tuple."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = function(x)
        y = out[0] if isinstance(out, tuple) else out
        loss = tf.reduce_sum(y * probe)
    return out, tape.gradient(loss, [x, *variables])


def _keras_renorm_variables(layer):
    names = ["moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev"]
    return {name: tf.Variable(getattr(layer, name).numpy(), name=name) for name in names}


@pytest.mark.parametrize("clipping", [None, {"rmax": 1.3, "rmin": 0.8, "dmax": 0.3}])
def test_renorm_training_steps_match_keras_layer(rng, clipping):
    """Four training steps of the ops (outputs, gradients, every moving variable) against Keras 3's
    BatchNormalization(renorm=True) fed the same batches."""
    layer = keras.layers.BatchNormalization(
        renorm=True, renorm_clipping=clipping, renorm_momentum=0.7, momentum=0.8
    )
    layer.build((16, 4))
    layer.gamma.assign(rng.normal(size=4) + 1)
    layer.beta.assign(rng.normal(size=4))
    moving = _keras_renorm_variables(layer)
    for step in range(4):
        x = tf.constant(rng.normal(size=(16, 4)) * (step + 1) + step, tf.float32)
        probe = tf.constant(rng.normal(size=(16, 4)), tf.float32)
        variables = [layer.gamma, layer.beta]
        y_keras, grads_keras = _probed(functools.partial(layer, training=True), x, probe, variables)
        reference = functools.partial(
            ops.batch_norm_training,
            axis=-1,
            beta=layer.beta,
            gamma=layer.gamma,
            epsilon=layer.epsilon,
            renorm_mean=moving["renorm_mean"],
            renorm_stddev=moving["renorm_stddev"],
            renorm_clipping=clipping,
        )
        (y, stats), grads = _probed(reference, x, probe, variables)
        update = ops.moving_statistics_update(
            stats, moving, momentum=0.8, epsilon=layer.epsilon, renorm_momentum=0.7
        )
        for name, value in update.items():
            moving[name].assign(value)
        np.testing.assert_allclose(y.numpy(), y_keras.numpy(), atol=ATOL)
        for got, want in zip(grads, grads_keras, strict=True):
            np.testing.assert_allclose(got.numpy(), want.numpy(), atol=ATOL)
        for name, variable in moving.items():
            np.testing.assert_allclose(
                variable.numpy(), getattr(layer, name).numpy(), atol=ATOL, err_msg=name
            )


# ------------------------------------------------------------------------------ adjustment
def test_adjustment_applies_between_normalization_and_gamma(rng):
    x = rng.normal(size=(10, 3)) * 2 + 1
    gamma, beta = rng.normal(size=3), rng.normal(size=3)
    a, b = rng.random(3) + 0.5, rng.normal(size=3)
    seen = []

    def adjustment(shape):
        seen.append(shape)
        return tf.constant(a, tf.float32), tf.constant(b, tf.float32)

    xt = tf.constant(x, tf.float32)
    y, _ = ops.batch_norm_training(
        xt, -1, gamma=gamma, beta=beta, epsilon=1e-3, adjustment=adjustment
    )
    x_hat = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-3)
    np.testing.assert_allclose(y.numpy(), (x_hat * a + b) * gamma + beta, atol=ATOL, rtol=1e-5)
    assert list(seen[0].numpy()) == [10, 3]


# ------------------------------------------------------------------------------ Bessel, updates
def test_bessel_corrected_is_numpy_ddof_1(rng):
    x = rng.normal(size=(5, 2, 3))
    stats = ops.bessel_corrected(ops.centred(tf.constant(x, tf.float32), -1).moments)
    np.testing.assert_allclose(stats.variance.numpy(), x.reshape(-1, 3).var(0, ddof=1), rtol=1e-5)


def test_moving_update_skips_a_batch_without_examples():
    empty = ops.centred(tf.zeros((0, 3)), -1).moments
    moving = {"moving_mean": tf.fill([3], 2.0), "moving_variance": tf.fill([3], 3.0)}
    new = ops.moving_statistics_update(empty, moving, momentum=0.9, epsilon=1e-3)
    np.testing.assert_array_equal(new["moving_mean"].numpy(), [2.0] * 3)
    np.testing.assert_array_equal(new["moving_variance"].numpy(), [3.0] * 3)


# ------------------------------------------------------------------------------ masks
def test_masked_batch_norm_matches_keras_layer(rng):
    """tfbn.BatchNorm with a mask against Keras 3's layer with the same mask: masked positions do
    not count in the batch statistics (outputs, gradients, moving statistics)."""
    import tfbn

    x = tf.constant(rng.normal(size=(6, 7, 4)) * 2 + 1, tf.float32)
    mask = tf.constant(rng.random((6, 7)) > 0.4)
    probe = tf.constant(rng.normal(size=(6, 7, 4)), tf.float32)
    ours, theirs = tfbn.BatchNorm(momentum=0.8), keras.layers.BatchNormalization(momentum=0.8)
    results = []
    for layer in (ours, theirs):
        layer.build(x.shape)
        call = functools.partial(layer, training=True, mask=mask)
        y, grads = _probed(call, x, probe, [layer.gamma, layer.beta])
        results.append((y, grads, layer.moving_mean.numpy(), layer.moving_variance.numpy()))
    (y, grads, mean, var), (y_k, grads_k, mean_k, var_k) = results
    np.testing.assert_allclose(y.numpy(), y_k.numpy(), atol=ATOL)
    for got, want in zip(grads, grads_k, strict=True):
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=ATOL)
    np.testing.assert_allclose(mean, mean_k, atol=ATOL)
    np.testing.assert_allclose(var, var_k, atol=ATOL)
    # And against float64 NumPy over the unmasked positions only.
    kept = x.numpy()[mask.numpy()]
    np.testing.assert_allclose(mean, 0.2 * kept.mean(0), atol=ATOL)
    np.testing.assert_allclose(var, 0.8 + 0.2 * kept.var(0), atol=ATOL)


@pytest.mark.parametrize("mask_shape", [(6,), (6, 7, 4, 1)])
def test_mask_of_wrong_rank_is_a_value_error(mask_shape):
    import tfbn

    layer = tfbn.BatchNorm()
    with pytest.raises(ValueError, match="mask"):
        layer(tf.zeros((6, 7, 4)), training=True, mask=tf.ones(mask_shape, tf.bool))


# ------------------------------------------------------------------------------ the layer
def _step(layer, x, probe, optimizer, mask=None):
    """One training step (SGD, regularization losses included), then an inference call."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True, mask=mask)
        loss = tf.reduce_sum(y * probe) + sum(layer.losses)
    variables = layer.trainable_weights
    grads = tape.gradient(loss, [x] + variables)
    if variables:
        optimizer.apply(grads[1:], variables)
    return {
        "y": y.numpy(),
        "loss": float(loss),
        "dx": grads[0].numpy(),
        "weights": {w.path.split("/")[-1]: w.numpy() for w in layer.weights},
        "inference": layer(x, training=False).numpy(),
    }


def _assert_same(ours, theirs, atol=ATOL):
    assert sorted(ours["weights"]) == sorted(theirs["weights"])
    for key in ("y", "dx", "inference"):
        np.testing.assert_allclose(ours[key], theirs[key], atol=atol, err_msg=key)
    np.testing.assert_allclose(ours["loss"], theirs["loss"], rtol=1e-5, atol=atol)
    for name, value in theirs["weights"].items():
        np.testing.assert_allclose(ours["weights"][name], value, atol=atol, err_msg=name)


# One non-default value per argument of keras.layers.BatchNormalization (Keras 3.15).
KERAS_ARGUMENTS = batch_norm_arguments(keras)


def test_argument_table_covers_keras_signature():
    import inspect

    import tfbn

    anchor = inspect.signature(keras.layers.BatchNormalization.__init__).parameters
    names = {n for n, p in anchor.items() if n != "self" and p.kind != p.VAR_KEYWORD}
    assert names == set(KERAS_ARGUMENTS)
    ours = inspect.signature(tfbn.BatchNorm.__init__).parameters
    assert names <= set(ours)
    # Keras's positional order is kept, so positional calls mean the same thing.
    assert [n for n in ours if n in names] == [n for n in anchor if n in names]


@pytest.mark.parametrize("name", sorted(KERAS_ARGUMENTS))
def test_each_keras_argument_matches_keras_layer(rng, name):
    """tfbn.BatchNorm and keras.layers.BatchNormalization built with the same one non-default
    argument: a training step (outputs, input gradient, loss with regularizers, weights after an
    SGD step with constraints, moving statistics) and an inference call agree."""
    import tfbn

    kwargs = {name: KERAS_ARGUMENTS[name]}
    if name == "renorm_clipping" or name == "renorm_momentum":
        kwargs["renorm"] = True
    x = tf.constant(rng.normal(size=(8, 3, 5)) * 2 + 1, tf.float32)
    probe = tf.constant(rng.normal(size=(8, 3, 5)), tf.float32)
    results = []
    for cls in (tfbn.BatchNorm, keras.layers.BatchNormalization):
        layer = cls(**kwargs)
        results.append(_step(layer, x, probe, keras.optimizers.SGD(0.1)))
        results.append(_step(layer, x * 1.5 - 0.5, probe, keras.optimizers.SGD(0.1)))
    _assert_same(results[0], results[2])
    _assert_same(results[1], results[3])


@pytest.mark.parametrize("jit", [False, True])
def test_renorm_layer_matches_keras_over_steps_in_a_compiled_function(rng, jit):
    import tfbn

    kwargs = dict(renorm=True, renorm_clipping={"rmax": 2.0, "dmax": 1.0}, momentum=0.7)
    ours, theirs = tfbn.BatchNorm(**kwargs), keras.layers.BatchNormalization(**kwargs)
    for layer in (ours, theirs):
        layer.build((16, 4, 4, 3))

    def make_step(layer):
        @tf.function(jit_compile=jit)
        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
                loss = tf.reduce_sum(tf.sin(y))
            return y, tape.gradient(loss, [x, layer.gamma, layer.beta])

        return step

    steps = make_step(ours), make_step(theirs)
    for i in range(5):
        x = tf.constant(rng.normal(size=(16, 4, 4, 3)) * (1 + i) + i, tf.float32)
        (y, grads), (y_k, grads_k) = steps[0](x), steps[1](x)
        np.testing.assert_allclose(y.numpy(), y_k.numpy(), atol=ATOL)
        for got, want in zip(grads, grads_k, strict=True):
            np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4, rtol=1e-5)
    for got, want in zip(ours.weights, theirs.weights, strict=True):
        assert got.path.split("/")[-1] == want.path.split("/")[-1]
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=ATOL, err_msg=got.path)


def test_renorm_weights_transfer_from_keras_layer(rng):
    import tfbn

    theirs = keras.layers.BatchNormalization(renorm=True)
    x = tf.constant(rng.normal(size=(8, 3)) + 2, tf.float32)
    theirs(x, training=True)
    ours = tfbn.BatchNorm(renorm=True)
    ours.build(x.shape)
    ours.set_weights(theirs.get_weights())
    for training in (True, False):
        np.testing.assert_allclose(
            ours(x, training=training).numpy(), theirs(x, training=training).numpy(), atol=ATOL
        )


@pytest.mark.parametrize("shape, axis", [((12, 5), -1), ((12, 3, 4, 4), 1), ((12, 4, 4, 3), -1)])
def test_ghost_layer_matches_numpy_and_reference_path(rng, shape, axis):
    """Each virtual batch normalized alone (float64 NumPy) by the layer's composed-kernel path
    (a reshape for axis 1, transposes otherwise); gradients equal autodiff through the reference
    ops.batch_norm_training."""
    import tfbn

    x = rng.normal(size=shape) * 2 + rng.normal(size=(shape[0],) + (1,) * (len(shape) - 1)) * 3
    layer = tfbn.BatchNorm(axis=axis, virtual_batch_size=4, momentum=0.5)
    layer.build(shape)
    layer.gamma.assign(rng.normal(size=layer.channels) + 1)
    xt = tf.constant(x, tf.float32)
    probe = tf.constant(rng.normal(size=shape), tf.float32)
    variables = [layer.gamma, layer.beta]
    y, grads = _probed(functools.partial(layer, training=True), xt, probe, variables)
    reference = functools.partial(
        ops.batch_norm_training,
        axis=axis,
        gamma=layer.gamma,
        beta=layer.beta,
        epsilon=1e-3,
        virtual_batch_size=4,
    )
    (y_ref, _), grads_ref = _probed(reference, xt, probe, variables)
    groups = shape[0] // 4
    channel_axis = axis % len(shape)
    gamma = layer.gamma.numpy().reshape([-1 if i == channel_axis else 1 for i in range(len(shape))])
    expected = np.empty_like(x)
    red = tuple(i for i in range(len(shape)) if i != axis % len(shape))
    for j in range(groups):
        xj = x[j::groups]
        m, v = xj.mean(red, keepdims=True), xj.var(red, keepdims=True)
        expected[j::groups] = gamma * (xj - m) / np.sqrt(v + 1e-3)
    np.testing.assert_allclose(y.numpy(), expected, atol=ATOL, rtol=1e-5)
    np.testing.assert_allclose(y.numpy(), y_ref.numpy(), atol=ATOL)
    for got, want in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4, rtol=1e-4)
    mean, variance, _ = numpy_ghost_moments(x, axis, 4)
    np.testing.assert_allclose(layer.moving_mean.numpy(), 0.5 * mean.mean(0), atol=ATOL)
    np.testing.assert_allclose(
        layer.moving_variance.numpy(), 0.5 + 0.5 * variance.mean(0), atol=ATOL, rtol=1e-5
    )


def test_ghost_layer_rejects_a_batch_it_does_not_divide():
    import tfbn

    layer = tfbn.BatchNorm(virtual_batch_size=4)
    with pytest.raises(ValueError, match="virtual_batch_size=4"):
        layer(tf.zeros((6, 3)), training=True)
    # Inference does not split the batch.
    assert layer(tf.zeros((6, 3)), training=False).shape == (6, 3)


@pytest.mark.parametrize("per_channel", [True, False])
def test_adjustment_in_training_only_and_same_on_both_paths(rng, per_channel):
    """A per-channel adjustment is folded into gamma/beta (fast kernels); a per-example one runs
    on the reference path; both equal the NumPy formula, and inference ignores it."""
    import tfbn

    x = rng.normal(size=(8, 4, 4, 4)) * 2 + 1
    a = rng.random(4) + 0.5 if per_channel else rng.random((8, 1, 1, 4)) + 0.5
    b = rng.normal(size=4) if per_channel else rng.normal(size=(8, 1, 1, 4))
    layer = tfbn.BatchNorm(
        adjustment=lambda shape: (tf.constant(a, tf.float32), tf.constant(b, tf.float32)),
        gamma_initializer=keras.initializers.Constant(1.5),
        beta_initializer=keras.initializers.Constant(0.25),
    )
    y = layer(tf.constant(x, tf.float32), training=True).numpy()
    x_hat = (x - x.mean((0, 1, 2))) / np.sqrt(x.var((0, 1, 2)) + 1e-3)
    np.testing.assert_allclose(y, 1.5 * (x_hat * a + b) + 0.25, atol=ATOL, rtol=1e-5)
    plain = tfbn.BatchNorm(
        gamma_initializer=keras.initializers.Constant(1.5),
        beta_initializer=keras.initializers.Constant(0.25),
    )
    plain.build(x.shape)
    plain.set_weights(layer.get_weights())
    np.testing.assert_allclose(
        layer(tf.constant(x, tf.float32)).numpy(), plain(tf.constant(x, tf.float32)).numpy()
    )


def test_adjustment_is_called_once_per_step():
    import tfbn

    calls = []

    def adjustment(shape):
        calls.append(1)
        return tf.random.uniform(shape[-1:], 0.9, 1.1), tf.zeros(shape[-1:])

    tfbn.BatchNorm(adjustment=adjustment)(tf.ones((4, 3)), training=True)
    assert len(calls) == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"renorm": True, "renorm_clipping": {"rmax": 2.0, "foo": 1.0}}, "invalid keys"),
        ({"renorm": True, "renorm_clipping": {"rmax": 1.0, "rmin": 2.0}}, "rmax should be"),
        ({"renorm": True, "renorm_clipping": {"dmax": -1.0}}, "dmax should be non-negative"),
        ({"renorm": True, "renorm_momentum": 1.0}, "renorm_momentum"),
        ({"virtual_batch_size": 0}, "virtual_batch_size"),
        ({"virtual_batch_size": -4}, "virtual_batch_size"),
        ({"virtual_batch_size": 4, "synchronized": True}, "synchronized=True"),
        ({"adjustment": "random"}, "adjustment"),
        ({"fused": True, "renorm": True}, "renorm"),
        ({"fused": True, "virtual_batch_size": 4}, "virtual_batch_size"),
        ({"fused": True, "adjustment": lambda s: (1.0, 0.0)}, "adjustment"),
    ],
)
def test_bad_option_arguments_raise_value_error(kwargs, match):
    import tfbn

    with pytest.raises(ValueError, match=match):
        tfbn.BatchNorm(**kwargs)


def test_option_config_round_trip(tmp_path, rng):
    import tfbn

    layer = tfbn.BatchNorm(
        renorm=True, renorm_clipping={"rmax": 3.0}, renorm_momentum=0.9, virtual_batch_size=2
    )
    model = keras.Sequential([keras.Input((3,)), layer])
    model(tf.constant(rng.normal(size=(4, 3)), tf.float32), training=True)
    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.models.load_model(path)
    config = reloaded.layers[0].get_config()
    for key in ("renorm", "renorm_clipping", "renorm_momentum", "virtual_batch_size"):
        assert config[key] == layer.get_config()[key]
    for got, want in zip(reloaded.weights, model.weights, strict=True):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    with pytest.warns(UserWarning, match="adjustment"):
        tfbn.BatchNorm(adjustment=lambda s: (1.0, 0.0)).get_config()


# ------------------------------------------------------------------------------ tf.distribute
def _train_replicas(strategy, layer, batches):
    """One training step per batch list; replica i gets batches[step][i]. Returns per-step lists
    of per-replica outputs."""

    @tf.function
    def step(x):
        return strategy.run(lambda x: layer(x, training=True), args=(x,))

    outputs = []
    for per_replica in batches:
        x = strategy.experimental_distribute_values_from_function(
            lambda ctx, b=per_replica: tf.constant(b[ctx.replica_id_in_sync_group], tf.float32)
        )
        outputs.append([np.asarray(t) for t in strategy.experimental_local_results(step(x))])
    return outputs


def test_synchronized_renorm_equals_keras_on_the_concatenated_batch(cpu_devices, rng):
    """Two replicas with synchronized=True and renorm: each replica's output is its slice of Keras's
    layer on the concatenated batch (one device), and every copy of every moving variable equals
    Keras's."""
    import tfbn

    kwargs = dict(renorm=True, renorm_clipping={"rmax": 1.5, "dmax": 0.5}, momentum=0.8)
    strategy = tf.distribute.MirroredStrategy(cpu_devices[:2])
    with strategy.scope():
        layer = tfbn.BatchNorm(synchronized=True, renorm_momentum=0.7, **kwargs)
        layer.build((6, 4))
    reference = keras.layers.BatchNormalization(renorm_momentum=0.7, **kwargs)
    batches = [[rng.normal(size=(6, 4)) * (1 + r) + 5 * r + s for r in range(2)] for s in range(3)]
    outputs = _train_replicas(strategy, layer, batches)
    for per_replica, ys in zip(batches, outputs, strict=True):
        expected = reference(tf.constant(np.concatenate(per_replica), tf.float32), training=True)
        np.testing.assert_allclose(np.concatenate(ys), expected.numpy(), atol=ATOL)
    for variable, want in zip(
        layer.non_trainable_weights, reference.non_trainable_weights, strict=True
    ):
        for copy in replica_values(variable):
            np.testing.assert_allclose(copy, want.numpy(), atol=ATOL, err_msg=variable.path)


@pytest.mark.parametrize(
    "kwargs", [{"renorm": True}, {"virtual_batch_size": 3}, {"virtual_batch_size": 3, "axis": 1}]
)
def test_unsynchronized_options_keep_replica_copies_identical(cpu_devices, rng, kwargs):
    """Replicas fed 3, 6 and 9 examples with different means: every copy of every moving variable
    is the same, and the moving mean follows the count-weighted mean over replicas of the batch
    means (float64 NumPy)."""
    import tfbn

    strategy = tf.distribute.MirroredStrategy(cpu_devices[:3])
    with strategy.scope():
        layer = tfbn.BatchNorm(momentum=0.5, **kwargs)
        layer.build((6, 4, 4))
    sizes = np.array([3, 6, 9])
    batches = [[rng.normal(size=(n, 4, 4)) + 10 * r for r, n in enumerate(sizes)] for _ in range(3)]
    _train_replicas(strategy, layer, batches)
    for variable in layer.non_trainable_weights:
        copies = replica_values(variable)
        assert len(copies) == 3
        for copy in copies[1:]:
            np.testing.assert_array_equal(copy, copies[0], err_msg=variable.path)
    axes = (0, 1) if kwargs.get("axis", -1) == -1 else (0, 2)
    expected = np.zeros(4)
    for per_replica in batches:
        means = np.stack([b.mean(axes) for b in per_replica])
        expected = 0.5 * expected + 0.5 * (sizes[:, None] * means).sum(0) / sizes.sum()
    np.testing.assert_allclose(replica_values(layer.moving_mean)[0], expected, atol=ATOL)


def test_renorm_under_mixed_precision_matches_keras(rng):
    import tfbn

    keras.mixed_precision.set_global_policy("mixed_float16")
    x = tf.constant(rng.normal(size=(16, 5)) * 3 + 2, tf.float16)
    ours, theirs = tfbn.BatchNorm(renorm=True), keras.layers.BatchNormalization(renorm=True)
    for _ in range(3):
        y, y_k = ours(x, training=True), theirs(x, training=True)
    assert y.dtype == tf.float16
    np.testing.assert_allclose(y.numpy(), y_k.numpy(), atol=2e-3)
    for got, want in zip(ours.non_trainable_weights, theirs.non_trainable_weights, strict=True):
        assert got.dtype == "float32"
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=ATOL, rtol=1e-5)

"""tfbn.legacy.BatchNorm against tf_keras.layers.BatchNormalization (tf-keras 2.x), run side by side
in this suite's process: arguments, variables, training steps, masks, fit, replicas, saving.

tf-keras and Keras 3 live in one process here without meeting: tf-keras keeps its own backend
state (reset after every test by `legacy_helpers._tf_keras_state`), and `tf.keras` stays Keras 3.
"""

import inspect
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tf_keras
from legacy_helpers import (  # noqa: F401 - _tf_keras_state is an autouse fixture
    ATOL,
    LAYERS,
    Anchor,
    _tf_keras_state,
    assert_same,
    compare,
    numpy_batch_norm,
    step,
    weights_by_name,
)
from model_helpers import batch_norm_arguments, init_parameters
from tf_keras.src.layers.normalization import batch_normalization as tfk_bn

import tfbn
from tfbn import legacy

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def strategy():
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


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
    **batch_norm_arguments(tf_keras),
    "fused": False,
    "trainable": False,
    "virtual_batch_size": 2,
    "adjustment": _adjustment,
    "name": "bn_named",
}
# Further values worth their own comparison.
EXTRA_CASES = {
    "axis_list": {"axis": [1, 3]},
    "axis_list_renorm": {"axis": [2, 3], "renorm": True, "momentum": 0.5},
    "fused_true": {"fused": True},
    "fused_channels_first": {"axis": 1, "fused": True},
    "ghost_renorm": {"virtual_batch_size": 4, "renorm": True},
    "ghost_channels_first": {"virtual_batch_size": 2, "axis": 1},
    "rank2_default": {"shape": (8, 5)},
    "rank3_axis1": {"shape": (8, 3, 5), "axis": 1},
    "rank5_default": {"shape": (4, 2, 3, 2, 4)},
    "rank5_channels_first": {"shape": (4, 3, 2, 2, 2), "axis": 1},
}


def test_is_a_tf_keras_batch_normalization():
    layer = legacy.BatchNorm()
    assert isinstance(layer, tf_keras.layers.BatchNormalization)
    assert isinstance(layer, tf_keras.layers.Layer)


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


VARIABLE_CASES = {
    "default_rank4": ({}, (None, 3, 4, 5)),
    "no_scale_no_center": ({"scale": False, "center": False}, (None, 3, 4)),
    "renorm": ({"renorm": True}, (None, 6)),
    "ghost": ({"virtual_batch_size": 2}, (None, 4, 3)),
    "ghost_renorm_axis1": ({"virtual_batch_size": 2, "renorm": True, "axis": 1}, (None, 4, 3)),
    "axis_list": ({"axis": [1, 3]}, (None, 2, 4, 3)),
    "mixed_float16": ({"dtype": "mixed_float16"}, (None, 4, 4, 3)),
    "float64": ({"dtype": "float64"}, (None, 5)),
}


@pytest.mark.parametrize("case", sorted(VARIABLE_CASES))
def test_variables_match_tf_keras(case):
    """Names, shapes, dtypes, order, trainability, synchronization and aggregation of every
    variable, and the `fused` choice, equal tf-keras's after build."""
    kwargs, shape = VARIABLE_CASES[case]
    built = []
    for cls in LAYERS:
        layer = cls(**kwargs)
        layer.build(shape)
        built.append(layer)
    ours, theirs = built

    def describe(layer):
        return [
            (
                v.name.split("/")[-1],
                tuple(v.shape),
                v.dtype.base_dtype.name,
                v.trainable,
                v.synchronization,
                v.aggregation,
            )
            for v in layer.weights
        ]

    assert describe(ours) == describe(theirs)
    assert len(ours.trainable_weights) == len(theirs.trainable_weights)
    assert ours.fused is theirs.fused


@pytest.mark.parametrize("name", sorted(TF_KERAS_ARGUMENTS))
def test_each_tf_keras_argument_matches_tf_keras_layer(rng, name):
    """Same one non-default argument for both layers, rank-4 input (tf-keras fuses by default):
    three training steps (outputs, input gradient, loss, weights after SGD with constraints,
    moving statistics) and inference calls agree."""
    kwargs = {name: TF_KERAS_ARGUMENTS[name]}
    if name in ("renorm_clipping", "renorm_momentum"):
        kwargs["renorm"] = True
    compare(rng, kwargs)


@pytest.mark.parametrize("case", sorted(EXTRA_CASES))
def test_more_configurations_match_tf_keras_layer(rng, case):
    kwargs = dict(EXTRA_CASES[case])
    shape = kwargs.pop("shape", (8, 3, 4, 5))
    compare(rng, kwargs, shape=shape)


def test_epsilon_inside_the_square_root_float64(rng):
    """float64, epsilon 0.1 and variances of order 1e-3: the output is (x - mean) /
    sqrt(var + epsilon), which differs by far more than the tolerance from any other placement of
    epsilon (float64 NumPy)."""
    x = rng.normal(size=(16, 3)) * 0.03 + 2.0
    layer = legacy.BatchNorm(epsilon=0.1, dtype="float64", momentum=0.0)
    y = layer(tf.constant(x), training=True).numpy()
    want, mean, var = numpy_batch_norm(x, [1], 0.1)
    np.testing.assert_allclose(y, want, rtol=1e-7, atol=1e-9)
    assert np.abs((x - mean) / (np.sqrt(var) + 0.1) - want).max() > 1e-3
    np.testing.assert_allclose(layer.moving_variance.numpy(), var, rtol=1e-9)


def test_fused_moving_variance_is_bessel_corrected_like_tf_keras(rng):
    """tf-keras's fused path moves the moving variance towards the unbiased batch variance; the
    legacy layer does too (float64 NumPy), and tfbn.BatchNorm (Keras semantics) does not."""
    x = rng.normal(size=(4, 3, 3, 2)) * 3
    layer = legacy.BatchNorm(momentum=0.0)
    layer(tf.constant(x, tf.float32), training=True)
    assert layer.fused is True
    np.testing.assert_allclose(
        layer.moving_variance.numpy(), x.reshape(-1, 2).var(0, ddof=1), rtol=1e-5
    )
    unfused = legacy.BatchNorm(momentum=0.0, fused=False)
    unfused(tf.constant(x, tf.float32), training=True)
    np.testing.assert_allclose(unfused.moving_variance.numpy(), x.reshape(-1, 2).var(0), rtol=1e-5)
    keras3 = tfbn.BatchNorm(momentum=0.0)
    keras3(tf.constant(x, tf.float32), training=True)
    np.testing.assert_allclose(keras3.moving_variance.numpy(), x.reshape(-1, 2).var(0), rtol=1e-5)


# ------------------------------------------------------------------------------------ masks
@pytest.mark.parametrize(
    "shape, axis, mask_shape",
    [
        ((6, 7, 4), -1, (6, 7)),
        ((6, 4, 7), 1, (6, 4)),  # the mask covers axes 0 and 1, the channel axis included
        ((6, 7, 4), -1, (6, 1)),  # a size-1 axis broadcasts and counts every value it covers
        ((6, 3, 4, 5), [1, 3], (6, 3, 4)),
    ],
)
def test_masked_statistics_match_tf_keras_layer(rng, shape, axis, mask_shape):
    """Where tf-keras honours the mask (not fused): a rank `rank - 1` mask covers the input's axes
    but the last, whatever `axis` is. Identical training step and moving statistics."""
    x = tf.constant(rng.normal(size=shape) * 2 + 1, tf.float32)
    mask = rng.random(mask_shape) > 0.4
    mask[:2] = True  # every channel keeps values
    probe = tf.constant(rng.normal(size=shape), tf.float32)
    results = [
        step(cls(axis=axis, momentum=0.5), x, probe, tf_keras.optimizers.SGD(0.1), mask)
        for cls in LAYERS
    ]
    assert_same(*results)


@pytest.mark.parametrize(
    "shape, kwargs",
    [
        ((6, 5, 4, 3), {}),
        ((4, 3, 4, 2, 3), {}),
        ((6, 5, 4, 3), {"fused": False}),
        ((8, 5, 4, 3), {"virtual_batch_size": 2}),
    ],
    ids=["rank4_fused", "rank5_fused", "rank4_unfused", "rank4_ghost"],
)
def test_masked_statistics_count_only_kept_positions(rng, shape, kwargs):
    """Channels-last input of rank 4/5 with a mask over the other axes: outputs and moving
    statistics are those of the kept positions only (float64 NumPy), also where tf-keras's layer
    is fused and ignores the mask. The moving variance is Bessel-corrected where `fused`."""
    x = rng.normal(size=shape) * 2 + 1
    mask = rng.random(shape[:-1]) > 0.5
    layer = legacy.BatchNorm(momentum=0.0, epsilon=1e-3, **kwargs)
    y = layer(tf.constant(x, tf.float32), training=True, mask=tf.constant(mask)).numpy()
    keep = mask[..., None]
    vbs = kwargs.get("virtual_batch_size")
    if vbs is None:
        want, mean, var = numpy_batch_norm(x, [x.ndim - 1], 1e-3, keep, ddof=int(layer.fused))
    else:
        # Virtual batch j holds examples j, j + g, ...: a (vbs, g, ...) view, statistics per g.
        g = shape[0] // vbs
        xv, kv = x.reshape(vbs, g, *shape[1:]), keep.reshape(vbs, g, *shape[1:-1], 1)
        want, means, variances = numpy_batch_norm(xv, [1, x.ndim], 1e-3, kv)
        want = want.reshape(shape)
        counts = np.broadcast_to(kv, xv.shape).sum(tuple(i for i in range(xv.ndim) if i != 1))
        weights = (counts / counts.sum())[:, None]
        mean, var = (weights * means).sum(0), (weights * variances).sum(0)
    assert layer.fused is (not kwargs)
    np.testing.assert_allclose(y, want, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.ravel(layer.moving_mean.numpy()), mean, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.ravel(layer.moving_variance.numpy()), var, rtol=1e-5)
    if layer.fused:
        # tf-keras's fused layer ignores the mask: the statistics of every position.
        anchor = Anchor(momentum=0.0)
        with pytest.warns(UserWarning, match="Masking is not supported"):
            anchor(tf.constant(x, tf.float32), training=True, mask=tf.constant(mask))
        all_mean = x.reshape(-1, shape[-1]).mean(0)
        np.testing.assert_allclose(anchor.moving_mean.numpy(), all_mean, atol=1e-5)


# ------------------------------------------------------------------------------------ fit
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
    for bn in LAYERS:
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


def test_training_as_a_tensor_matches_tf_keras(rng):
    """`training` given as a boolean tensor inside a tf.function (tf-keras allows it)."""
    x = tf.constant(rng.normal(size=(8, 5)) * 2 + 3, tf.float32)
    results = []
    for cls in LAYERS:
        layer = cls(momentum=0.5, renorm=True)
        layer.build(x.shape)
        call = tf.function(lambda x, t, layer=layer: layer(x, training=t))
        outputs = [call(x, tf.constant(t)).numpy() for t in (True, False, True)]
        results.append((outputs, [w.numpy() for w in layer.weights]))
    (ours, ours_w), (theirs, theirs_w) = results
    for got, want in zip(ours + ours_w, theirs + theirs_w, strict=True):
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=1e-5)


def test_ghost_batches_with_training_as_a_tensor(rng):
    """With `training` a tensor, tf-keras's layer drops the virtual batches (it normalizes with
    the whole batch's statistics); tfbn keeps them: outputs equal those of a Python `True` and
    float64 NumPy per virtual batch."""
    x = rng.normal(size=(8, 3)) * 2 + 1
    layer = legacy.BatchNorm(virtual_batch_size=2, center=False, scale=False)
    call = tf.function(lambda x, t: layer(x, training=t))
    y = call(tf.constant(x, tf.float32), tf.constant(True)).numpy()
    want, _, _ = numpy_batch_norm(x.reshape(2, 4, 3), [1, 2], 1e-3)
    np.testing.assert_allclose(y, want.reshape(8, 3), atol=1e-5, rtol=1e-5)
    anchor = Anchor(virtual_batch_size=2, center=False, scale=False)
    call = tf.function(lambda x, t: anchor(x, training=t))
    whole_batch, _, _ = numpy_batch_norm(x, [1], 1e-3)
    y_k = call(tf.constant(x, tf.float32), tf.constant(True)).numpy()
    np.testing.assert_allclose(y_k, whole_batch, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs", [{}, {"renorm": True}, {"virtual_batch_size": 2}])
def test_mixed_precision_matches_tf_keras(rng, kwargs):
    tf_keras.mixed_precision.set_global_policy("mixed_float16")
    x = tf.constant(rng.normal(size=(8, 3, 3, 4)) * 3 + 2, tf.float16)
    ours, theirs = legacy.BatchNorm(**kwargs), Anchor(**kwargs)
    for _ in range(2):
        y, y_k = ours(x, training=True), theirs(x, training=True)
    assert y.dtype == tf.float16
    np.testing.assert_allclose(y.numpy(), y_k.numpy(), atol=2e-3)
    for got, want in zip(ours.weights, theirs.weights, strict=True):
        assert got.dtype == want.dtype == tf.float32
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------ replicas
def test_moving_statistics_identical_on_replicas_under_mirrored_strategy(rng, strategy):
    """Replica 0 sees 3 examples of mean 0, replica 1 5 examples of mean 10. Every replica's copy
    of the moving statistics ends equal to the EMA of the count-weighted replica mean of the batch
    statistics (float64 NumPy); tf-keras's copies drift apart."""
    sizes = (3, 5)
    spreads = zip(sizes, (1.0, 2.0), (0.0, 10.0), strict=True)
    data = [rng.normal(size=(3, n, 4)) * s + m for n, s, m in spreads]
    results = {}
    for cls in LAYERS:
        with strategy.scope():
            layer = cls(momentum=0.8)
            layer.build((None, 4))

        @tf.function
        def train(batch, layer=layer):
            return strategy.run(lambda b: layer(b, training=True), args=(batch,))

        for i in range(3):
            batch = strategy.experimental_distribute_values_from_function(
                lambda ctx, i=i: tf.constant(data[ctx.replica_id_in_sync_group][i], tf.float32)
            )
            train(batch)
        results[cls] = [
            np.stack([v.numpy() for v in strategy.experimental_local_results(var)])
            for var in (layer.moving_mean, layer.moving_variance)
        ]
    mean, var = np.zeros(4), np.ones(4)
    weights = np.array(sizes, float)[:, None] / sum(sizes)
    for i in range(3):
        batch_mean = (weights * [d[i].mean(0) for d in data]).sum(0)
        batch_var = (weights * [d[i].var(0) for d in data]).sum(0)
        mean, var = 0.8 * mean + 0.2 * batch_mean, 0.8 * var + 0.2 * batch_var
    copies_mean, copies_var = results[legacy.BatchNorm]
    for copy in copies_mean:
        np.testing.assert_allclose(copy, mean, atol=1e-4)
    for copy in copies_var:
        np.testing.assert_allclose(copy, var, atol=1e-4, rtol=1e-5)
    tk_copies_mean, _ = results[Anchor]
    assert np.abs(tk_copies_mean[0] - tk_copies_mean[1]).max() > 1.0


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


# ------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"renorm": True, "renorm_clipping": {"rmax": 2.0, "foo": 1.0}}, "renorm_clipping"),
        ({"renorm": True, "renorm_clipping": {"rmax": 1.0, "rmin": 2.0}}, "rmax"),
        ({"renorm": True, "renorm_clipping": {"dmax": -1.0}}, "dmax"),
        ({"virtual_batch_size": 0}, "virtual_batch_size"),
        ({"virtual_batch_size": 2, "synchronized": True}, "synchronized=True"),
        ({"adjustment": 3.0}, "adjustment"),
        ({"fused": True, "renorm": True}, "renorm"),
        ({"fused": True, "axis": 2}, "axis"),
        ({"fused": "yes"}, "fused"),
        ({"fused": 1}, "`fused`.*fused=1"),
        ({"axis": "last"}, "axis"),
        ({"momentum": 1.0}, "momentum=1.0"),
        ({"momentum": None}, "momentum=None"),
        ({"renorm_momentum": -0.1}, "renorm_momentum"),
        ({"epsilon": 0.0}, "epsilon=0.0"),
        ({"epsilon": float("inf")}, "epsilon=inf"),
        ({"epsilon": float("nan")}, "epsilon=nan"),
        ({"renorm_clipping": {"rmax": float("nan")}}, "rmax=nan"),
        ({"renorm_clipping": {"rmax": 0, "rmin": 0}}, "rmax should be positive"),
        ({"dtype": "int32"}, "`dtype`.*dtype='int32'"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        legacy.BatchNorm(**kwargs)


@pytest.mark.parametrize("axis", [0, [1, 1], 3, -3])
def test_bad_axis_for_the_input_is_a_value_error_at_build(axis):
    with pytest.raises(ValueError, match="axis"):
        legacy.BatchNorm(axis=axis).build((None, 4, 3))


def test_ghost_batch_that_does_not_divide_is_a_value_error():
    with pytest.raises(ValueError, match="virtual_batch_size=4"):
        legacy.BatchNorm(virtual_batch_size=4)(tf.zeros((6, 3)), training=True)


# ------------------------------------------------------------------------------------ saving
def _saved_model(rng):
    x = rng.normal(size=(8, 4, 4, 2)).astype("float32")
    model = tf_keras.Sequential(
        [
            tf_keras.Input((4, 4, 2)),
            legacy.BatchNorm(axis=[2, 3], renorm=True, renorm_clipping={"rmax": 3.0}),
            legacy.BatchNorm(virtual_batch_size=2, momentum=0.5),
            legacy.BatchNorm(axis=1, fused=False, synchronized=True, epsilon=0.01),
            legacy.BatchNorm(gamma_regularizer="l2", beta_constraint="non_neg"),
        ]
    )
    model(x, training=True)
    return model, x


@pytest.mark.parametrize("fmt", ["keras", "h5", "savedmodel"])
def test_saved_and_reloaded_model_is_the_same(tmp_path, rng, fmt):
    """`.keras`, `.h5` and SavedModel round trips: same class, config, weights and predictions,
    also for a built layer with `virtual_batch_size` (whose tf-keras config cannot rebuild it)."""
    model, x = _saved_model(rng)
    path = str(tmp_path / {"keras": "model.keras", "h5": "model.h5", "savedmodel": "model"}[fmt])
    if fmt == "savedmodel":
        model.save(path, save_format="tf")
    else:
        model.save(path)
    reloaded = tf_keras.models.load_model(path)
    for old, new in zip(model.layers, reloaded.layers, strict=True):
        assert type(new) is legacy.BatchNorm
        assert new.get_config() == old.get_config()
        for a, b in zip(old.weights, new.weights, strict=True):
            assert a.name.split("/")[-1] == b.name.split("/")[-1]
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), model.predict(x, verbose=0))
    fresh = tf_keras.Sequential.from_config(model.get_config())
    fresh(x, training=True)


def test_config_of_a_built_ghost_batch_layer_rebuilds_it():
    """tf-keras's config of a built layer with `virtual_batch_size` holds its axis shifted by the
    virtual-batch axis, which no layer can be built from; tfbn's holds the input's axis."""
    built = []
    for cls in LAYERS:
        layer = cls(virtual_batch_size=2)
        layer(tf.zeros((4, 3)))
        built.append(layer.get_config())
    ours, theirs = built
    legacy.BatchNorm.from_config(ours)(tf.zeros((4, 3)))
    with pytest.raises(ValueError, match="axis"):
        Anchor.from_config(theirs)(tf.zeros((4, 3)))


def test_config_round_trip_keeps_every_argument():
    layer = legacy.BatchNorm(
        axis=[1, 2],
        momentum=0.5,
        synchronized=True,
        renorm=True,
        renorm_clipping={"rmax": 2},
        renorm_momentum=0.7,
        fused=False,
        name="bn_cfg",
    )
    rebuilt = legacy.BatchNorm.from_config(layer.get_config())
    assert rebuilt.get_config() == layer.get_config()
    for attr in ("synchronized", "renorm_clipping", "renorm_momentum", "fused", "momentum"):
        assert getattr(rebuilt, attr) == getattr(layer, attr), attr
    # tf-keras's own layer reads the config too (it has the same keys, plus tfbn's two).
    assert Anchor.from_config(layer.get_config()).synchronized is True


def test_adjustment_is_left_out_of_the_config():
    config = legacy.BatchNorm(adjustment=_adjustment).get_config()
    assert "adjustment" not in config
    assert legacy.BatchNorm.from_config(config).adjustment is None


# ------------------------------------------------------------------------------------ install
def test_tfbn_imports_without_tf_keras():
    """With tf_keras unimportable, `import tfbn` and tfbn.BatchNorm work, and `import
    tfbn.legacy` fails with an ImportError that says how to install it."""
    script = (
        "import sys\n"
        "sys.modules['tf_keras'] = None\n"
        "import tensorflow as tf, tfbn\n"
        "y = tfbn.BatchNorm()(tf.ones((4, 3)), training=True)\n"
        "assert y.shape == (4, 3)\n"
        "try:\n"
        "    import tfbn.legacy\n"
        "except ImportError as error:\n"
        "    assert 'pip install tfbn[legacy]' in str(error), error\n"
        "    print('LEGACY-IMPORT-ERROR-OK')\n"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "LEGACY-IMPORT-ERROR-OK" in proc.stdout


def test_the_signature_is_tf_keras_own_then_its_keyword_options():
    # tf-keras's arguments in its order, the rest (renorm, fused, ...) by keyword as tf-keras's.
    tf_keras_own = init_parameters(tf_keras.layers.BatchNormalization.__init__)
    ours = init_parameters(legacy.BatchNorm.__init__)
    assert ours[: len(tf_keras_own)] == tf_keras_own
    assert all(kind is inspect.Parameter.KEYWORD_ONLY for _, kind, _ in ours[len(tf_keras_own) :])

"""tfbn.moments and tfbn.batch_normalization against keras.ops on the same inputs."""

import inspect

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfbn


@pytest.mark.parametrize("name", ["moments", "batch_normalization"])
def test_signature_is_keras_ops(name):
    ours = inspect.signature(getattr(tfbn, name)).parameters
    theirs = inspect.signature(getattr(keras.ops, name)).parameters
    assert [(p.name, p.default, p.kind) for p in ours.values()] == [
        (p.name, p.default, p.kind) for p in theirs.values()
    ]


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize(
    "shape,axes",
    [
        ((5,), [0]),
        ((6, 3), [0]),
        ((4, 3, 5), [0, 2]),
        ((4, 3, 5), [0, 1]),
        ((4, 3, 5), [1]),
        ((2, 3, 4, 5), [0, 2]),  # kept axes 1 and 3 are not adjacent
        ((2, 3, 4, 5), [0, 1, 2, 3]),
        ((2, 3, 4, 5), -1),
    ],
)
def test_moments_equal_keras_ops(rng, shape, axes, keepdims):
    x = (rng.normal(size=shape) * 3 + 2).astype("float32")
    ours = tfbn.moments(x, axes, keepdims=keepdims)
    theirs = keras.ops.moments(x, axes, keepdims=keepdims)
    axes64 = tuple(np.atleast_1d(axes) % len(shape))
    reference = (
        x.astype(np.float64).mean(axes64, keepdims=keepdims),
        x.astype(np.float64).var(axes64, keepdims=keepdims),
    )
    assert isinstance(ours, tuple) and len(ours) == 2
    for a, b, c in zip(ours, theirs, reference, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_moments_dtypes_follow_keras_ops(rng, dtype):
    x = tf.cast(rng.normal(size=(8, 3)) * 2 + 1, dtype)
    for a, b in zip(tfbn.moments(x, [0]), keras.ops.moments(x, [0]), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(tf.cast(a, "float64"), tf.cast(b, "float64"), rtol=1e-2)


def test_synchronized_moments_equal_the_concatenated_batch_with_unequal_replicas(cpu_devices, rng):
    strategy = tf.distribute.MirroredStrategy(cpu_devices[:2])
    batches = [(rng.normal(size=(n, 3)) * (1 + n) + n).astype("float32") for n in (7, 2)]
    xs = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(batches[ctx.replica_id_in_sync_group])
    )
    results = strategy.run(tf.function(lambda x: tfbn.moments(x, [0], synchronized=True)), (xs,))
    everything = np.concatenate(batches).astype(np.float64)
    for value, expected in zip(results, (everything.mean(0), everything.var(0)), strict=True):
        for copy in strategy.experimental_local_results(value):
            np.testing.assert_allclose(copy, expected, rtol=1e-5)


@pytest.mark.parametrize(
    "shape,axis,parameters",
    [((6, 3), -1, True), ((5, 3, 4), 1, True), ((2, 3, 4, 5), 3, False), ((2, 5, 4, 3), 1, True)],
)
def test_batch_normalization_equals_keras_ops(rng, shape, axis, parameters):
    x = (rng.normal(size=shape) * 2 + 1).astype("float32")
    c = shape[axis]
    mean, variance = rng.normal(size=c).astype("float32"), rng.uniform(0.1, 3, c).astype("float32")
    kwargs = {}
    if parameters:
        kwargs = {"offset": rng.normal(size=c).astype("float32"), "scale": rng.normal(size=c)}
        kwargs["scale"] = kwargs["scale"].astype("float32")
    ours = tfbn.batch_normalization(x, mean, variance, axis, epsilon=1e-2, **kwargs)
    theirs = keras.ops.batch_normalization(x, mean, variance, axis, epsilon=1e-2, **kwargs)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_batch_normalization_equals_the_formula_in_float64(rng):
    # Small variances and epsilon 0.1: epsilon must be inside the square root.
    x = rng.normal(size=(5, 3, 4)) * 0.1
    mean, variance = rng.normal(size=3) * 0.1, rng.uniform(1e-4, 1e-2, size=3)
    offset, scale = rng.normal(size=3), rng.normal(size=3)
    got = tfbn.batch_normalization(x, mean, variance, 1, offset=offset, scale=scale, epsilon=0.1)
    c = (1, 3, 1)
    expected = scale.reshape(c) * (x - mean.reshape(c)) / np.sqrt(
        variance.reshape(c) + 0.1
    ) + offset.reshape(c)
    assert got.dtype == tf.float64
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"epsilon": float("inf")}, "epsilon=inf"),
        ({"epsilon": float("nan")}, "epsilon=nan"),
        ({"epsilon": 0.0}, "epsilon=0.0"),
        ({"epsilon": -1e-3}, "epsilon=-0.001"),
        ({"epsilon": "small"}, "epsilon='small'"),
        ({"mean": np.zeros(4, "float32")}, "`mean`.*length 3.*shape \\(4,\\)"),
        ({"variance": np.ones((1, 3), "float32")}, "`variance`.*shape \\(1, 3\\)"),
        ({"offset": np.zeros(2, "float32")}, "`offset`.*length 3"),
        ({"scale": np.ones(3, "int32")}, "`scale`.*int32"),
        ({"x": np.ones((4, 3), "int32")}, "`x`.*int32"),
        ({"axis": 2}, "`axis`.*axis=2"),
    ],
)
def test_batch_normalization_rejects_bad_arguments(kwargs, match):
    arguments = {
        "x": np.ones((4, 3), "float32"),
        "mean": np.zeros(3, "float32"),
        "variance": np.ones(3, "float32"),
        "axis": -1,
        **kwargs,
    }
    with pytest.raises(ValueError, match=match):
        tfbn.batch_normalization(**arguments)


@pytest.mark.parametrize(
    "x,axes,match",
    [
        (np.ones((4, 3), "int32"), [0], "`x`.*int32"),
        (np.ones((4, 3), "float32"), [2], "`axes`.*out of range"),
        (np.ones((4, 3), "float32"), [0, -2], "`axes` repeats"),
        (np.ones((4, 3), "float32"), "0", "`axes`"),
    ],
)
def test_moments_rejects_bad_arguments(x, axes, match):
    with pytest.raises(ValueError, match=match):
        tfbn.moments(x, axes)

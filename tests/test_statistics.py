"""Exact batch statistics: every path against float64 NumPy at |mean| / std = 1e4.

The reference is the float64 variance of the float32 input. A plain float32 two-pass variance of
such data with 2^16 values per channel is 9 times too large; the bound here is 1e-4 relative.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfbn
from tfbn.ops import kernels as fast
from tfbn.ops import nn as ops

MEAN, RTOL = 1e4, 1e-4
N = 2**20  # values per channel


def _large_mean(rng, shape):
    return (MEAN + rng.standard_normal(shape)).astype("float32")


def _axes(shape, axis):
    return tuple(i for i in range(len(shape)) if i != axis % len(shape))


def _variance64(x, axis):
    return x.astype(np.float64).var(_axes(x.shape, axis))


def _assert_exact(variance, expected):
    np.testing.assert_allclose(np.asarray(variance), expected, rtol=RTOL, atol=0)


# rank 2, rank 4 channels last, rank 4 channels first: 2^20 values per channel, 2 channels.
SHAPES = [((N, 2), -1), ((256, 64, 64, 2), -1), ((256, 2, 64, 64), 1)]


@pytest.mark.parametrize("shape,axis", SHAPES)
def test_moments_op_is_exact(rng, shape, axis):
    x = _large_mean(rng, shape)
    mean, variance = tfbn.moments(tf.constant(x), _axes(shape, axis))
    _assert_exact(variance, _variance64(x, axis))
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(_axes(shape, axis)), rtol=1e-7)


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("shape,axis", SHAPES)
def test_layer_training_statistics_are_exact(rng, shape, axis, jit_compile):
    x = _large_mean(rng, shape)
    layer = tfbn.BatchNorm(axis=axis, momentum=0.0)
    layer.build(shape)
    y = tf.function(lambda t: layer(t, training=True), jit_compile=jit_compile)(x)
    _assert_exact(layer.moving_variance.numpy(), _variance64(x, axis))
    # The output is normalized: mean 0 and variance 1 / (1 + epsilon / var) per channel.
    np.testing.assert_allclose(np.mean(y.numpy(), _axes(shape, axis)), 0.0, atol=1e-4)


@pytest.mark.parametrize("shape,axis", [((2048, 8, 8, 4), -1), ((512, 4, 8, 8, 4), -1)])
def test_fused_default_kernel_statistics_are_exact(rng, shape, axis):
    # The largest inputs the default choice gives TensorFlow's fused kernel.
    assert np.prod(shape) // shape[axis] == fast.FUSED_MAX_COUNT
    assert fast.kernel_for(shape, axis, tf.float32) == "fused"
    x = _large_mean(rng, shape)
    layer = tfbn.BatchNorm(axis=axis, momentum=0.0)
    layer(x, training=True)
    _assert_exact(layer.moving_variance.numpy(), _variance64(x, axis))


def test_more_values_than_the_fused_kernel_takes_are_composed():
    assert fast.kernel_for((4096, 8, 8, 4), -1, tf.float32) == "composed"
    assert fast.kernel_for((None, 8, 8, 4), -1, tf.float32) == "fused_or_composed"
    assert fast.kernel_for((4096, 8, 8, 4), -1, tf.float32, fused=True) == "fused"
    # Channels first, on a CPU: the composed kernel is faster than oneDNN's.
    assert fast.kernel_for((8, 4, 8, 8), 1, tf.float32) == "composed"


@pytest.mark.parametrize("batch", [2048, 4096])
def test_unknown_batch_size_chooses_at_run_time_and_stays_exact(rng, batch):
    # 2^17 values per channel run the fused kernel, 2^18 the composed one, in one traced graph.
    layer = tfbn.BatchNorm(momentum=0.0)
    layer.build((None, 8, 8, 4))
    spec = tf.TensorSpec((None, 8, 8, 4), tf.float32)
    step = tf.function(lambda t: layer(t, training=True), input_signature=[spec])
    x = _large_mean(rng, (batch, 8, 8, 4))
    step(x)
    _assert_exact(layer.moving_variance.numpy(), _variance64(x, -1))


def _replica_steps(strategy, layer, batches):
    xs = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(batches[ctx.replica_id_in_sync_group])
    )
    strategy.run(tf.function(lambda x: layer(x, training=True)), args=(xs,))


def test_synchronized_statistics_are_exact_with_unequal_replicas(cpu_devices, rng):
    strategy = tf.distribute.MirroredStrategy(cpu_devices[:2])
    with strategy.scope():
        layer = tfbn.BatchNorm(momentum=0.0, synchronized=True)
        layer.build((None, 2))
    # 3/4 and 1/4 of 2^20 values, the second replica's data shifted by one standard deviation.
    batches = [_large_mean(rng, (3 * N // 4, 2)), _large_mean(rng, (N // 4, 2)) + 1]
    _replica_steps(strategy, layer, batches)
    _assert_exact(layer.moving_variance.numpy(), _variance64(np.concatenate(batches), -1))


def test_ghost_batch_statistics_are_exact(rng):
    x = _large_mean(rng, (N, 2))
    groups = 4
    layer = tfbn.BatchNorm(momentum=0.0, virtual_batch_size=N // groups)
    layer(x, training=True)
    # Virtual batch j holds examples j, j + g, ...; the moving variance tracks their mean.
    expected = np.mean([_variance64(x[j::groups], -1) for j in range(groups)], 0)
    _assert_exact(layer.moving_variance.numpy(), expected)


def test_masked_statistics_are_exact(rng):
    x = _large_mean(rng, (1024, 1024, 2))
    mask = rng.uniform(size=x.shape[:2]) < 0.75
    x[~mask] = 0.0  # padding far from the data
    weights = tf.constant(mask[..., None], tf.float32)
    stats = ops.centred(tf.constant(x), -1, weights=weights).moments
    _assert_exact(stats.variance, x[mask].astype(np.float64).var(0))


def test_recalibrated_statistics_are_exact(rng):
    x = _large_mean(rng, (N, 2))
    inputs = keras.Input((2,))
    model = keras.Model(inputs, tfbn.BatchNorm(name="bn")(inputs))
    dataset = tf.data.Dataset.from_tensor_slices(x).batch(2**16)
    tfbn.recalibrate(model, dataset)
    _assert_exact(model.get_layer("bn").moving_variance.numpy(), _variance64(x, -1))


@pytest.mark.parametrize("training", [True, False])
def test_float64_epsilon_inside_the_square_root(rng, training):
    # Variances of order epsilon: (x - mean) / (sqrt(var) + eps) or / sqrt(var) + eps would be
    # far from (x - mean) / sqrt(var + eps).
    epsilon = 0.1
    x = rng.normal(size=(64, 3)) * np.array([0.05, 0.2, 0.5])
    layer = tfbn.BatchNorm(epsilon=epsilon, momentum=0.0, dtype="float64")
    layer.build(x.shape)
    if not training:
        layer(x, training=True)  # moving statistics := these batch statistics
    y = layer(x, training=training).numpy()
    expected = (x - x.mean(0)) / np.sqrt(x.var(0) + epsilon)
    np.testing.assert_allclose(y, expected, rtol=1e-10, atol=1e-12)
    got = tfbn.batch_normalization(x, x.mean(0), x.var(0), -1, epsilon=epsilon).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)

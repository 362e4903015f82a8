"""tfbn.BatchNorm under tf.distribute: replicas on logical CPU devices (see conftest.py)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from replica_helpers import replica_values

import tfbn


def _run_replicas(strategy, layer, batches, dys, steps=1):
    """One training step per call with replica i fed batches[i]; returns per-replica y, dx, and the
    per-replica gradients of gamma and beta."""
    xs = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(batches[ctx.replica_id_in_sync_group])
    )
    gs = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(dys[ctx.replica_id_in_sync_group])
    )

    @tf.function
    def step(x, dy):
        def replica_fn(x, dy):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
            dx, d_gamma, d_beta = tape.gradient(
                y, [x, layer.gamma, layer.beta], output_gradients=dy
            )
            return y, dx, d_gamma, d_beta

        return strategy.run(replica_fn, args=(x, dy))

    for _ in range(steps):
        out = step(xs, gs)
    return [[np.asarray(t) for t in strategy.experimental_local_results(o)] for o in out]


def _make_layer(strategy, shape, **kwargs):
    with strategy.scope():
        layer = tfbn.BatchNorm(**kwargs)
        layer.build(shape)
    return layer


def _data(rng, n_replicas, shape, offsets=None):
    """Replica i gets `shape[0] + i` examples (unequal counts) of mean `offsets[i]`, std 1 + i."""
    offsets = offsets if offsets is not None else [10.0 * i for i in range(n_replicas)]
    shapes = [(shape[0] + i, *shape[1:]) for i in range(n_replicas)]
    batches = [
        (rng.normal(size=s) * (1 + i) + offsets[i]).astype("float32") for i, s in enumerate(shapes)
    ]
    dys = [rng.normal(size=s).astype("float32") for s in shapes]
    return batches, dys


@pytest.mark.parametrize("n_replicas", [2, 3])
@pytest.mark.parametrize("shape,axis", [((8, 5), -1), ((4, 3, 3, 8), -1), ((4, 6, 3, 3), 1)])
def test_moving_stats_identical_on_all_replicas(cpu_devices, rng, n_replicas, shape, axis):
    strategy = tf.distribute.MirroredStrategy(cpu_devices[:n_replicas])
    momentum = 0.6
    layer = _make_layer(strategy, (None, *shape[1:]), axis=axis, momentum=momentum)
    batches, dys = _data(rng, n_replicas, shape)
    ys, *_ = _run_replicas(strategy, layer, batches, dys, steps=3)

    axes = tuple(i for i in range(len(shape)) if i != axis % len(shape))
    # The count-weighted mean over replicas of their batch statistics.
    counts = np.array([len(b) for b in batches], np.float64)[:, None] / sum(map(len, batches))
    mean_of_means = (np.stack([b.astype(np.float64).mean(axes) for b in batches]) * counts).sum(0)
    mean_of_vars = (np.stack([b.astype(np.float64).var(axes) for b in batches]) * counts).sum(0)
    # Three identical steps from (0, 1): moving = m^3 * init + (1 - m^3) * stat.
    keep = momentum**3
    expected_mean = (1 - keep) * mean_of_means
    expected_var = keep * 1.0 + (1 - keep) * mean_of_vars
    for variable, expected in (
        (layer.moving_mean, expected_mean),
        (layer.moving_variance, expected_var),
    ):
        copies = replica_values(variable)
        assert len(copies) == n_replicas
        for copy in copies[1:]:
            np.testing.assert_array_equal(copy, copies[0])
        np.testing.assert_allclose(copies[0], expected, rtol=1e-5, atol=1e-5)
        # What is read (and saved) is that same estimate.
        np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-5, atol=1e-5)

    # Unsynchronized: each replica normalizes with its own batch statistics.
    shape_c = [1] * len(shape)
    shape_c[axis] = -1
    for y, b in zip(ys, batches, strict=True):
        b = b.astype(np.float64)
        ref = (b - b.mean(axes).reshape(shape_c)) / np.sqrt(b.var(axes).reshape(shape_c) + 1e-3)
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n_replicas", [2, 3])
@pytest.mark.parametrize(
    "shape,axis", [((6, 5), -1), ((4, 3, 3, 8), -1), ((4, 3, 3, 6), -1), ((4, 6, 3, 3), 1)]
)
def test_synchronized_equals_single_device_on_concatenated_batch(
    cpu_devices, rng, n_replicas, shape, axis
):
    strategy = tf.distribute.MirroredStrategy(cpu_devices[:n_replicas])
    kwargs = {"axis": axis, "momentum": 0.5, "epsilon": 1e-5, "synchronized": True}
    layer = _make_layer(strategy, (None, *shape[1:]), **kwargs)
    gamma = rng.uniform(0.5, 2, size=shape[axis]).astype("float32")
    beta = rng.normal(size=shape[axis]).astype("float32")
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    batches, dys = _data(rng, n_replicas, shape)
    ys, dxs, d_gammas, d_betas = _run_replicas(strategy, layer, batches, dys, steps=2)

    single = tfbn.BatchNorm(**{**kwargs, "synchronized": False})
    single.build((None, *shape[1:]))
    single.gamma.assign(gamma)
    single.beta.assign(beta)
    x_all, dy_all = tf.constant(np.concatenate(batches)), tf.constant(np.concatenate(dys))
    for _ in range(2):
        with tf.GradientTape() as tape:
            tape.watch(x_all)
            y_all = single(x_all, training=True)
        dx_all, dg_all, db_all = tape.gradient(
            y_all, [x_all, single.gamma, single.beta], output_gradients=dy_all
        )
    n_values = np.prod(shape) * n_replicas / shape[axis]
    np.testing.assert_allclose(np.concatenate(ys), y_all.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.concatenate(dxs), dx_all.numpy(), rtol=1e-5, atol=1e-5)
    # Parameter gradients are per replica; the optimizer sums them over replicas.
    np.testing.assert_allclose(np.sum(d_gammas, 0), dg_all.numpy(), rtol=1e-5, atol=1e-6 * n_values)
    np.testing.assert_allclose(np.sum(d_betas, 0), db_all.numpy(), rtol=1e-5, atol=1e-6 * n_values)
    for variable, reference in (
        (layer.moving_mean, single.moving_mean),
        (layer.moving_variance, single.moving_variance),
    ):
        for copy in replica_values(variable):
            np.testing.assert_allclose(copy, reference.numpy(), rtol=1e-5, atol=1e-5)


def test_synchronized_variance_is_stable_for_large_means(cpu_devices, rng):
    # Mean 1e4, std 1: E[x^2] - E[x]^2 in float32 loses the variance entirely.
    strategy = tf.distribute.MirroredStrategy(cpu_devices[:2])
    layer = _make_layer(strategy, (64, 4), momentum=0.0, synchronized=True)
    batches = [(rng.normal(size=(64, 4)) + 1e4).astype("float32") for _ in range(2)]
    _run_replicas(strategy, layer, batches, [np.ones((64, 4), "float32")] * 2)
    expected = np.concatenate(batches).astype(np.float64).var(0)
    np.testing.assert_allclose(layer.moving_variance.numpy(), expected, rtol=1e-3)


@pytest.mark.parametrize("synchronized", [False, True])
def test_replica_without_examples_contributes_nothing(cpu_devices, rng, synchronized):
    strategy = tf.distribute.MirroredStrategy(cpu_devices[:3])
    layer = _make_layer(strategy, (None, 4), momentum=0.0, synchronized=synchronized)
    # A short last batch: replicas get 5, 3 and 0 examples.
    batches = [
        (rng.normal(size=(5, 4)) + 2).astype("float32"),
        (rng.normal(size=(3, 4)) * 3 - 1).astype("float32"),
        np.zeros((0, 4), "float32"),
    ]
    dys = [np.ones_like(b) for b in batches]
    ys, *_ = _run_replicas(strategy, layer, batches, dys)
    assert ys[2].shape == (0, 4)
    assert all(np.isfinite(y).all() for y in ys)
    live = [b.astype(np.float64) for b in batches[:2]]
    if synchronized:
        everything = np.concatenate(live)
        expected_mean, expected_var = everything.mean(0), everything.var(0)
    else:
        counts = np.array([len(b) for b in live], np.float64)[:, None]
        expected_mean = (np.stack([b.mean(0) for b in live]) * counts).sum(0) / counts.sum()
        expected_var = (np.stack([b.var(0) for b in live]) * counts).sum(0) / counts.sum()
    for copy in replica_values(layer.moving_mean):
        np.testing.assert_allclose(copy, expected_mean, rtol=1e-5, atol=1e-5)
    for copy in replica_values(layer.moving_variance):
        np.testing.assert_allclose(copy, expected_var, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("synchronized", [False, True])
def test_masked_statistics_over_replicas_of_unequal_sizes(cpu_devices, rng, synchronized):
    """Masks of Keras's meaning (here covering the channel axis 1) on 2 replicas fed 6 and 3
    examples: float64 statistics of the kept positions, of the concatenated batch (synchronized)
    or the count-weighted mean of the replicas' (not synchronized)."""
    strategy = tf.distribute.MirroredStrategy(cpu_devices[:2])
    layer = _make_layer(strategy, (None, 3, 5), axis=1, momentum=0.0, synchronized=synchronized)
    batches = [(rng.normal(size=(n, 3, 5)) * 2 + k).astype("float32") for k, n in ((1, 6), (-2, 3))]
    masks = [rng.uniform(size=(len(b), 3)) > 0.3 for b in batches]
    for mask in masks:
        mask[0] = True  # every channel keeps values on every replica

    @tf.function
    def step(x, mask):
        return strategy.run(lambda x, m: layer(x, training=True, mask=m), args=(x, mask))

    def per_replica(values):
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(values[ctx.replica_id_in_sync_group])
        )

    step(per_replica(batches), per_replica(masks))

    def kept_moments(xs, ms):
        x = np.concatenate(xs).astype(np.float64)
        w = np.broadcast_to(np.concatenate(ms)[..., None], x.shape).astype(np.float64)
        count = w.sum((0, 2))
        mean = (w * x).sum((0, 2)) / count
        variance = (w * (x - mean[:, None]) ** 2).sum((0, 2)) / count
        return mean, variance, count

    if synchronized:
        mean, variance, _ = kept_moments(batches, masks)
    else:
        parts = [kept_moments([b], [m]) for b, m in zip(batches, masks, strict=True)]
        counts = np.stack([c for *_, c in parts])
        mean = (np.stack([p[0] for p in parts]) * counts).sum(0) / counts.sum(0)
        variance = (np.stack([p[1] for p in parts]) * counts).sum(0) / counts.sum(0)
    for copy in replica_values(layer.moving_mean):
        np.testing.assert_allclose(copy, mean, rtol=1e-5, atol=1e-5)
    for copy in replica_values(layer.moving_variance):
        np.testing.assert_allclose(copy, variance, rtol=1e-5, atol=1e-5)


def _compile(model, jit_compile=False):
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )


@pytest.mark.parametrize("strategy_name", ["mirrored", "one_device", "default"])
def test_fit_under_strategies_then_reload_on_one_device(cpu_devices, rng, tmp_path, strategy_name):
    if strategy_name == "mirrored":
        strategy = tf.distribute.MirroredStrategy(cpu_devices[:2])
    elif strategy_name == "one_device":
        strategy = tf.distribute.OneDeviceStrategy(cpu_devices[0])
    else:
        strategy = tf.distribute.get_strategy()
    x = rng.uniform(size=(128, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, size=128)
    with strategy.scope():
        model = tfbn.lenet("tfbn")
        _compile(model)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    for layer in model.layers:
        if isinstance(layer, tfbn.BatchNorm):
            copies = replica_values(layer.moving_variance)
            for copy in copies[1:]:
                np.testing.assert_array_equal(copy, copies[0])
            assert not np.allclose(copies[0], 1.0)
    before = model.predict(x[:16], verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)  # outside the strategy: one device
    np.testing.assert_allclose(reloaded.predict(x[:16], verbose=0), before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy_name", ["one_device", "default"])
def test_jit_compiled_fit_matches_uncompiled_fit(cpu_devices, rng, strategy_name):
    # XLA cannot place one program across several logical CPU devices (TensorFlow's own limit,
    # plain LeNet included), so jit_compile is checked on one device per replica here; on GPUs
    # each replica's step compiles on its own GPU.
    strategy = (
        tf.distribute.OneDeviceStrategy(cpu_devices[0])
        if strategy_name == "one_device"
        else tf.distribute.get_strategy()
    )
    x = rng.uniform(size=(64, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, size=64)
    results = []
    for jit in (False, True):
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = tfbn.lenet("tfbn")
            _compile(model, jit_compile=jit)
        model.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False)
        results.append(model.get_weights())
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_mixed_precision_under_mirrored_strategy(cpu_devices, rng):
    keras.mixed_precision.set_global_policy("mixed_float16")
    strategy = tf.distribute.MirroredStrategy(cpu_devices[:2])
    layer = _make_layer(strategy, (8, 3, 3, 8), momentum=0.0, synchronized=True)
    batches = [(rng.normal(size=(8, 3, 3, 8)) * 20 + 1e4).astype("float16") for _ in range(2)]
    ys, *_ = _run_replicas(strategy, layer, batches, [np.ones_like(b) for b in batches])
    assert ys[0].dtype == np.float16
    assert all(np.isfinite(y).all() for y in ys)
    expected = np.concatenate(batches).astype(np.float64)
    np.testing.assert_allclose(layer.moving_mean.numpy(), expected.mean((0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), expected.var((0, 1, 2)), rtol=1e-3)

"""Population statistics: recalibrated moving statistics against float64 NumPy references."""

import logging
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from model_helpers import mixed_norms_mlp
from workers import run_workers

import tfbn
from tfbn.tools.recalibration import batch_norm_layers, recalibrate
from tfbn.workflow import data

TESTS = pathlib.Path(__file__).parent
BN_KINDS = {
    "tfbn": lambda **kw: tfbn.BatchNorm(**kw),
    "keras": lambda **kw: keras.layers.BatchNormalization(**kw),
}


def _sequential(kind):
    """Conv -> BN -> sigmoid -> pool -> flatten -> Dense -> BN -> sigmoid -> Dense."""
    bn = BN_KINDS[kind]
    return keras.Sequential(
        [
            keras.Input((8, 8, 2)),
            keras.layers.Conv2D(3, 3, name="conv"),
            bn(name="bn_conv"),
            keras.layers.Activation("sigmoid"),
            keras.layers.AveragePooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(5, name="dense"),
            bn(name="bn_dense"),
            keras.layers.Activation("sigmoid"),
            keras.layers.Dense(4, name="logits"),
        ]
    )


def _functional_mixed():
    """Two branches with different BN kinds, then a BN after the merge (depends on both)."""
    inputs = keras.Input((6,))
    a = keras.layers.Dense(4, name="a")(inputs)
    a = tfbn.BatchNorm(name="bn_a")(a)
    b = keras.layers.Dense(3, name="b")(inputs)
    b = keras.layers.BatchNormalization(name="bn_b")(b)
    merged = keras.layers.Concatenate()([keras.layers.Activation("tanh")(a), b])
    merged = keras.layers.Dense(5, name="c")(merged)
    out = tfbn.BatchNorm(name="bn_c")(merged)
    return keras.Model(inputs, out)


def _channels_first(kind):
    """BN over axis 1 of (batch, channels, height, width) activations."""
    bn = BN_KINDS[kind]
    inputs = keras.Input((5, 4, 3))
    x = keras.layers.Dense(3, name="mix")(inputs)  # channels last: (5, 4, 3)
    x = keras.layers.Permute((3, 1, 2))(x)  # channels first: (3, 5, 4)
    x = bn(axis=1, name="bn_first")(x)
    x = keras.layers.Activation("sigmoid")(x)
    x = keras.layers.Permute((2, 3, 1))(x)
    x = keras.layers.Dense(2, name="mix2")(x)
    x = bn(axis=-1, name="bn_last")(x)
    return keras.Model(inputs, x)


def _randomize(model, rng):
    """Random weights, including gamma/beta and moving statistics far from the truth."""
    model.set_weights(
        [rng.normal(0.5, 0.7, w.shape).astype(np.float32) for w in model.get_weights()]
    )
    for layer in batch_norm_layers(model):
        layer.moving_variance.assign(rng.uniform(0.5, 3.0, layer.moving_variance.shape))


def _inputs(model, rng, n):
    shape = (n, *model.inputs[0].shape[1:])
    return rng.normal(2.0, 3.0, shape).astype(np.float32)


def _randomized_inputs(model, rng, n):
    """`n` random inputs for `model`, whose weights are randomized first (`_randomize`)."""
    _randomize(model, rng)
    return _inputs(model, rng, n)


def _reference(model, x):
    """Population statistics computed independently: NumPy float64 on each BN input, layer by
    layer, earlier BN layers set to their reference values first. Works on a copy of the model."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    reference = {}
    for layer in batch_norm_layers(copy):
        probe = keras.Model(copy.inputs, layer.input)
        activations = np.asarray(probe.predict(x, batch_size=len(x), verbose=0), np.float64)
        axis = layer.axis % activations.ndim
        axes = tuple(i for i in range(activations.ndim) if i != axis)
        mean = activations.mean(axis=axes)
        variance = activations.var(axis=axes)  # biased, as in the chapter
        layer.moving_mean.assign(mean)
        layer.moving_variance.assign(variance)
        reference[layer.name] = (mean, variance, activations.size // activations.shape[axis])
    return reference


def _assert_matches_reference(model, reference, report=None):
    for layer in batch_norm_layers(model):
        mean, variance, count = reference[layer.name]
        # The mean is compared on the scale of the spread (a mean near 0 has no relative size).
        error = np.abs(layer.moving_mean.numpy() - mean)
        assert np.all(error <= 1e-5 * (np.abs(mean) + np.sqrt(variance))), (error, mean)
        np.testing.assert_allclose(layer.moving_variance.numpy(), variance, rtol=1e-5)
        if report is not None:
            assert report[layer.name]["count"] == count


@pytest.mark.parametrize("kind", ["tfbn", "keras"])
def test_sequential_moving_stats_equal_float64_population_stats(kind, rng):
    model = _sequential(kind)
    x = _randomized_inputs(model, rng, 300)
    reference = _reference(model, x)
    old = {layer.name: layer.moving_mean.numpy().copy() for layer in batch_norm_layers(model)}
    # Batches of 64 with a short last batch; (x, y) pairs, labels ignored.
    dataset = tf.data.Dataset.from_tensor_slices((x, np.zeros(len(x), np.int32))).batch(64)
    report = recalibrate(model, dataset, verbose=0)
    _assert_matches_reference(model, reference, report)
    assert list(report) == ["bn_conv", "bn_dense"]  # network order
    for name, stats in report.items():
        np.testing.assert_array_equal(stats["old_mean"], old[name])
        np.testing.assert_allclose(stats["new_mean"], reference[name][0], rtol=1e-5, atol=1e-6)
    # Conv input: every position counts, 300 examples x 6 x 6.
    assert report["bn_conv"]["count"] == 300 * 36


def test_functional_model_with_both_layer_kinds(rng):
    model = _functional_mixed()
    x = _randomized_inputs(model, rng, 257)
    reference = _reference(model, x)
    # A dataset of bare inputs (no labels).
    recalibrate(model, tf.data.Dataset.from_tensor_slices(x).batch(50), verbose=0)
    _assert_matches_reference(model, reference)


@pytest.mark.parametrize("kind", ["tfbn", "keras"])
def test_channels_first_axis(kind, rng):
    model = _channels_first(kind)
    x = _randomized_inputs(model, rng, 120)
    reference = _reference(model, x)
    report = recalibrate(model, tf.data.Dataset.from_tensor_slices(x).batch(32), verbose=0)
    _assert_matches_reference(model, reference, report)
    assert report["bn_first"]["new_mean"].shape == (3,)
    assert report["bn_first"]["count"] == 120 * 5 * 4


def test_large_mean_small_spread_is_accurate(rng):
    """Values around 1e4 with spread 1e-2: E[x^2] - E[x]^2 in float32 would give garbage."""
    inputs = keras.Input((3,))
    outputs = tfbn.BatchNorm(name="bn")(inputs)
    model = keras.Model(inputs, outputs)
    x = (1e4 + rng.normal(0.0, 1e-2, (4000, 3))).astype(np.float32)
    recalibrate(model, [x[i : i + 128] for i in range(0, 4000, 128)], verbose=0)
    np.testing.assert_allclose(
        model.layers[1].moving_variance.numpy(), x.astype(np.float64).var(0), rtol=1e-4
    )
    np.testing.assert_allclose(
        model.layers[1].moving_mean.numpy(), x.astype(np.float64).mean(0), rtol=1e-7
    )


def test_steps_limits_the_batches(rng):
    model = _sequential("tfbn")
    x = _randomized_inputs(model, rng, 200)
    reference = _reference(model, x[:100])
    recalibrate(model, tf.data.Dataset.from_tensor_slices(x).batch(25), steps=4, verbose=0)
    _assert_matches_reference(model, reference)


@pytest.mark.parametrize("kind", ["tfbn", "keras"])
def test_mirrored_strategy_equals_single_device(kind, rng, cpu_devices):
    single = _sequential(kind)
    _randomize(single, rng)
    weights = single.get_weights()
    x = _inputs(single, rng, 203)  # batches of 40: the last one (3) leaves a replica empty-handed
    dataset = tf.data.Dataset.from_tensor_slices((x, np.zeros(203))).batch(40)
    expected = recalibrate(single, dataset, verbose=0)

    strategy = tf.distribute.MirroredStrategy(cpu_devices[:2])
    with strategy.scope():
        mirrored = _sequential(kind)
    mirrored.set_weights(weights)
    report = recalibrate(mirrored, dataset, strategy=strategy, verbose=0)
    for layer in batch_norm_layers(mirrored):
        want = expected[layer.name]
        assert report[layer.name]["count"] == want["count"]
        for variable, key in (
            (layer.moving_mean, "new_mean"),
            (layer.moving_variance, "new_variance"),
        ):
            copies = strategy.experimental_local_results(variable.value)
            assert len(copies) == 2
            np.testing.assert_array_equal(copies[0].numpy(), copies[1].numpy())
            np.testing.assert_allclose(copies[0].numpy(), want[key], rtol=1e-6, atol=1e-7)


def test_errors(rng):
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="no batch-norm layer"):
        recalibrate(plain, [np.zeros((2, 3), np.float32)], verbose=0)
    model = _sequential("tfbn")
    with pytest.raises(ValueError, match="`steps`"):
        recalibrate(model, [np.zeros((2, 8, 8, 2), np.float32)], steps=0, verbose=0)
    with pytest.raises(ValueError, match="no examples"):
        recalibrate(model, [], verbose=0)
    with pytest.raises(ValueError, match="`mode`"):
        recalibrate(model, [], mode="approximate", verbose=0)
    with pytest.raises(ValueError, match="`passes` applies to mode='fast'"):
        recalibrate(model, [], passes=2, verbose=0)
    with pytest.raises(ValueError, match="`passes`"):
        recalibrate(model, [], mode="fast", passes=0, verbose=0)


def test_a_batch_norm_hidden_in_a_layer_or_applied_twice_is_refused():
    @keras.saving.register_keras_serializable(package="test_recalibration")
    class Block(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.norm = keras.layers.BatchNormalization(name="hidden_bn")

        def call(self, x):
            return self.norm(x)

    inputs = keras.Input((3,))
    hidden = keras.Model(inputs, Block()(inputs))
    with pytest.raises(ValueError, match="hidden_bn.*graph cannot be read"):
        recalibrate(hidden, [np.zeros((2, 3), np.float32)], verbose=0)
    shared = tfbn.BatchNorm(name="shared_bn")
    twice = keras.Model(inputs, shared(shared(inputs)))
    with pytest.raises(ValueError, match="shared_bn.*more than once"):
        recalibrate(twice, [np.zeros((2, 3), np.float32)], verbose=0)


# ----------------------------------------------------------------- nested models, any placement
def _nested(flat: bool):
    """BN inside nested Sequential and functional blocks, after an Add and after a pooling; with
    `flat=True` the same layers without the nesting (the reference)."""
    inner_in = keras.Input((6, 6, 3))
    y = keras.layers.Conv2D(3, 3, padding="same", name="inner_conv")(inner_in)
    y = keras.layers.BatchNormalization(name="inner_bn")(y)
    y = keras.layers.Add(name="inner_add")([y, inner_in])
    y = tfbn.BatchNorm(name="bn_after_add")(y)
    stem = [keras.layers.Conv2D(3, 3, padding="same", name="stem"), tfbn.BatchNorm(name="stem_bn")]
    head = [
        keras.layers.AveragePooling2D(2, name="pool"),
        keras.layers.BatchNormalization(name="bn_after_pool"),
        keras.layers.Flatten(),
        keras.layers.Dense(4, name="dense"),
    ]
    inputs = keras.Input((6, 6, 3))
    if flat:
        x = inputs
        for layer in stem:
            x = layer(x)
        a = keras.layers.Conv2D(3, 3, padding="same", name="inner_conv")(x)
        a = keras.layers.BatchNormalization(name="inner_bn")(a)
        a = keras.layers.Add(name="inner_add")([a, x])
        x = tfbn.BatchNorm(name="bn_after_add")(a)
    else:
        x = keras.Sequential([keras.Input((6, 6, 3)), *stem], name="stem_block")(inputs)
        x = keras.Model(inner_in, y, name="residual")(x)
    for layer in head:
        x = layer(x)
    return keras.Model(inputs, x)


def test_batch_norms_inside_nested_blocks_and_after_any_layer(rng):
    nested, flat = _nested(flat=False), _nested(flat=True)
    _randomize(nested, rng)
    flat.set_weights(nested.get_weights())  # the same layers in the same order
    x = _inputs(flat, rng, 90)
    reference = _reference(flat, x)
    report = recalibrate(nested, tf.data.Dataset.from_tensor_slices(x).batch(32), verbose=0)
    assert list(report) == [
        "stem_block/stem_bn", "residual/inner_bn", "residual/bn_after_add", "bn_after_pool"
    ]  # fmt: skip
    layers = {name: layer for name, layer in zip(report, batch_norm_layers(nested), strict=True)}
    for name, layer in layers.items():
        mean, variance, count = reference[name.rsplit("/", 1)[-1]]
        assert report[name]["count"] == count
        np.testing.assert_allclose(layer.moving_variance.numpy(), variance, rtol=1e-5)
        error = np.abs(layer.moving_mean.numpy() - mean)
        assert np.all(error <= 1e-5 * (np.abs(mean) + np.sqrt(variance)))


# ----------------------------------------------------------------------------- the exact passes
@keras.saving.register_keras_serializable(package="test_recalibration")
class _CountingIdentity(keras.layers.Layer):
    """Passes its input through and counts the examples it saw (in a variable: traced too)."""

    def build(self, input_shape):
        self.seen = self.add_weight(shape=(), initializer="zeros", trainable=False, name="seen")

    def call(self, x):
        self.seen.assign_add(keras.ops.cast(keras.ops.shape(x)[0], "float32"))
        return x


def _chain(depth: int):
    """`depth` levels of Dense -> BN, with a counting layer before the first Dense."""
    inputs = keras.Input((4,))
    x = _CountingIdentity(name="counter")(inputs)
    for i in range(depth):
        x = keras.layers.Dense(4, name=f"dense{i}")(x)
        x = tfbn.BatchNorm(name=f"bn{i}")(x)
        x = keras.layers.Activation("tanh")(x)
    return keras.Model(inputs, x)


def test_one_pass_per_level_and_each_layer_computed_once_when_the_activations_fit(rng):
    model = _chain(4)
    x = _randomized_inputs(model, rng, 100)
    reference = _reference(model, x)
    dataset = tf.data.Dataset.from_tensor_slices(x).batch(30)
    counter = model.get_layer("counter").seen
    counter.assign(0.0)
    recalibrate(model, dataset, verbose=0)
    _assert_matches_reference(model, reference)
    assert counter.numpy() == 100  # kept in memory after the first pass: computed once
    counter.assign(0.0)
    again = recalibrate(model, dataset, max_cache_bytes=0, verbose=0)
    assert counter.numpy() == 4 * 100  # nothing kept: every pass starts from the inputs
    _assert_matches_reference(model, reference, {n: {"count": 100} for n in again})


def test_independent_layers_share_a_pass(rng, capsys):
    model = _functional_mixed()  # bn_a and bn_b are independent; bn_c depends on both
    recalibrate(model, [_inputs(model, rng, 20)], verbose=2)
    lines = [line for line in capsys.readouterr().out.splitlines() if "pass" in line]
    assert lines[0].startswith("Recalibration pass 1/2: 2 layers (bn_a, bn_b)")
    assert lines[1].startswith("Recalibration pass 2/2: 1 layer (bn_c)")


# ------------------------------------------------------------------------------- tracing, reuse
class _TraceCounter(keras.layers.Layer):
    """The identity, counting the times its Python `call` runs: once per trace of a function
    that calls it (a compiled function runs without calling it again), or per eager call."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = 0

    def call(self, x):
        self.calls += 1
        return x


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _deep_chain(depth: int):
    """`depth` levels of Dense -> BN -> tanh, the input through a `_TraceCounter` first."""
    inputs = keras.Input((4,))
    x = _TraceCounter(name="tracer")(inputs)
    for i in range(depth):
        x = keras.layers.Dense(4, name=f"dense{i}")(x)
        x = tfbn.BatchNorm(name=f"bn{i}")(x)
        x = keras.layers.Activation("tanh")(x)
    return keras.Model(inputs, x)


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_a_second_call_traces_nothing_again_and_no_retracing_is_reported(mode, rng):
    model = _deep_chain(8)  # 8 levels: 8 exact passes
    x = _randomized_inputs(model, rng, 70)
    reference = _reference(model, x)
    tracer = model.get_layer("tracer")
    records = _Records()
    tf.get_logger().addHandler(records)
    try:
        passes = 8 if mode == "fast" else None
        first = tf.data.Dataset.from_tensor_slices(x).batch(32)  # 32, 32, 6
        recalibrate(model, first, mode=mode, passes=passes, verbose=0)
        traced = tracer.calls
        # Another dataset, other batch sizes, the same signature: nothing is traced again.
        recalibrate(model, [x[:25], x[25:50], x[50:]], mode=mode, passes=passes, verbose=0)
    finally:
        tf.get_logger().removeHandler(records)
    assert tracer.calls == traced
    assert not [m for m in records.messages if "retracing" in m], records.messages
    # 8 fast passes reach the exact statistics of this 8-level chain, as the exact mode does.
    _assert_matches_reference(model, reference)


def test_a_model_whose_graph_changed_gets_new_functions(rng):
    model = _sequential("tfbn")
    x = _randomized_inputs(model, rng, 40)
    recalibrate(model, [x], verbose=0)
    model.add(keras.layers.Dense(3, name="extra"))
    model.add(tfbn.BatchNorm(name="bn_extra"))
    model.get_layer("extra").kernel.assign(rng.normal(size=(4, 3)).astype(np.float32))
    reference = _reference(model, x)
    report = recalibrate(model, tf.data.Dataset.from_tensor_slices(x).batch(16), verbose=0)
    assert list(report) == ["bn_conv", "bn_dense", "bn_extra"]
    _assert_matches_reference(model, reference, report)


def test_exact_at_a_large_mean_with_a_million_values_per_channel(rng):
    """|mean| / std = 1e4 and 2^20 values per channel, against float64 NumPy (within 1e-4)."""
    inputs = keras.Input((8, 8, 2))
    model = keras.Model(inputs, tfbn.BatchNorm(name="bn")(inputs))
    x = (rng.normal(0.0, 1.0, (2**14, 8, 8, 2)) + np.array([1e4, -3e4])).astype(np.float32)
    recalibrate(model, tf.data.Dataset.from_tensor_slices(x).batch(2048), verbose=0)
    values = x.astype(np.float64).reshape(-1, 2)
    assert values.shape[0] == 2**20
    layer = model.get_layer("bn")
    np.testing.assert_allclose(layer.moving_variance.numpy(), values.var(0), rtol=1e-4)
    np.testing.assert_allclose(layer.moving_mean.numpy(), values.mean(0), rtol=1e-7)


# --------------------------------------------------------------------- data as model.fit takes it
class _Reiterable:
    """Batches `(x, y)` made afresh at every iteration (no `len`, not a list)."""

    def __init__(self, x, size):
        self.x, self.size = x, size

    def __iter__(self):
        for start in range(0, len(self.x), self.size):
            yield (
                self.x[start : start + self.size],
                np.zeros(len(self.x[start : start + self.size])),
            )


_DATA_KINDS = {
    "array": lambda x: {"data": x},
    "array_batch_size": lambda x: {"data": x, "batch_size": 64},
    "tuple_x": lambda x: {"data": (x,)},
    "tuple_x_y": lambda x: {"data": (x, np.arange(len(x)))},
    "tuple_x_y_weights": lambda x: {"data": (x, np.arange(len(x)), np.ones(len(x)))},
    "dataset": lambda x: {"data": tf.data.Dataset.from_tensor_slices(x).batch(50)},
    "list_of_batches": lambda x: {"data": [x[i : i + 70] for i in range(0, len(x), 70)]},
    "iterable_of_x_y": lambda x: {"data": _Reiterable(x, 45)},
}


@pytest.mark.parametrize("kind", list(_DATA_KINDS))
@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_every_kind_of_data_gives_the_float64_population_statistics(kind, mode, rng):
    model = _chain(2)
    x = _randomized_inputs(model, rng, 205)
    reference = _reference(model, x)
    counter = model.get_layer("counter").seen
    counter.assign(0.0)
    arguments = _DATA_KINDS[kind](x)
    passes = 2 if mode == "fast" else None  # two levels: two fast passes are exact too
    report = recalibrate(model, **arguments, mode=mode, passes=passes, verbose=0)
    _assert_matches_reference(model, reference, {n: {"count": 205} for n in report})
    assert counter.numpy() == 205 * (2 if mode == "fast" else 1)  # every example, every pass


def test_arrays_under_a_mirrored_strategy(rng, cpu_devices):
    strategy = tf.distribute.MirroredStrategy(cpu_devices[:2])
    with strategy.scope():
        model = _sequential("keras")
    x = _randomized_inputs(model, rng, 102)  # the last batch of 2: one example per replica
    reference = _reference(model, x)
    report = recalibrate(model, (x, np.zeros(102)), batch_size=20, strategy=strategy, verbose=0)
    _assert_matches_reference(model, reference, report)


def test_bad_data_is_refused_before_any_pass(rng):
    model = _sequential("tfbn")
    x = _randomized_inputs(model, rng, 16)
    before = [v.numpy().copy() for v in model.non_trainable_variables]

    def refused(data, message, **kwargs):
        with pytest.raises(ValueError, match=message) as error:
            recalibrate(model, data, verbose=0, **kwargs)
        assert "\n" not in str(error.value)

    refused(x[:0], "Argument `data` holds no examples")
    refused(tf.data.Dataset.from_tensor_slices(x).take(0).batch(4), "holds no examples")
    refused([], "holds no examples")
    # A batch without its batch axis: both shapes named.
    refused([x[0]], r"shape \(8, 8, 2\), but model 'sequential\w*' takes inputs of shape "
            r"\(None, 8, 8, 2\)\.$")  # fmt: skip
    refused(iter([x[0]]), r"shape \(8, 8, 2\), but")  # a one-shot iterator: at its first batch
    refused((x, np.zeros(15)), r"same number of examples; received lengths \[15, 16\]")
    refused(tf.data.Dataset.from_tensor_slices(x).batch(4), "`batch_size` applies to arrays",
            batch_size=4)  # fmt: skip
    refused(x[None], r"shape \(None, 16, 8, 8, 2\)")
    refused("images/", "must be NumPy arrays")
    nan = x.copy()
    nan[9, 3, 2, 1] = np.nan
    refused((nan, np.zeros(16)), "Argument `data` holds non-finite values", mode="fast")
    for old, new in zip(before, model.non_trainable_variables, strict=True):
        np.testing.assert_array_equal(old, new.numpy())


# ----------------------------------------------------------------------------------- bad data
def test_a_dataset_of_the_wrong_shape_is_refused_before_any_pass(rng):
    model = _sequential("tfbn")
    before = [v.numpy().copy() for v in model.non_trainable_variables]
    wrong = np.zeros((4, 9, 8, 2), np.float32)
    with pytest.raises(ValueError, match=r"shape \(None, 9, 8, 2\).*takes inputs of shape"):
        recalibrate(model, tf.data.Dataset.from_tensor_slices(wrong).batch(2), verbose=0)
    with pytest.raises(ValueError, match=r"shape \(4, 9, 8, 2\)"):
        recalibrate(model, [wrong], verbose=0)
    for old, new in zip(before, model.non_trainable_variables, strict=True):
        np.testing.assert_array_equal(old, new.numpy())


def test_non_finite_inputs_are_named_and_leave_every_statistic_as_it_was(rng):
    model = _chain(3)
    _randomize(model, rng)
    before = {layer.name: (layer.moving_mean.numpy(), layer.moving_variance.numpy())
              for layer in batch_norm_layers(model)}  # fmt: skip
    x = _inputs(model, rng, 64)
    x[37, 2] = np.nan  # one value of one example
    with pytest.raises(ValueError, match="Layer 'bn0' received non-finite inputs"):
        recalibrate(model, tf.data.Dataset.from_tensor_slices(x).batch(16), verbose=0)
    # A NaN that only appears deeper: the first layers were already recalibrated, then restored.
    model.get_layer("dense1").kernel.assign(np.full((4, 4), np.inf, np.float32))
    with pytest.raises(ValueError, match="Layer 'bn1' received non-finite inputs"):
        recalibrate(model, [_inputs(model, rng, 16)], verbose=0)
    for layer in batch_norm_layers(model):
        np.testing.assert_array_equal(layer.moving_mean.numpy(), before[layer.name][0])
        np.testing.assert_array_equal(layer.moving_variance.numpy(), before[layer.name][1])


# ------------------------------------------------------------------------------------ fast mode
def _training_mode_inputs(model, x):
    """Each BN input when the whole network runs in training mode on `x` as one batch: every BN
    normalizes with the batch statistics (Keras's own training-mode computation)."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    probes = keras.Model(copy.inputs[0], [layer.input for layer in batch_norm_layers(copy)])
    return [np.asarray(a, np.float64) for a in probes(x, training=True)]


@pytest.mark.parametrize("kind", ["tfbn", "keras"])
def test_one_fast_pass_measures_inputs_normalized_with_batch_statistics(kind, rng):
    model = _sequential(kind)
    x = _randomized_inputs(model, rng, 128)
    expected = _training_mode_inputs(model, x)
    report = recalibrate(model, [x], mode="fast", verbose=0)  # one batch: batch = population
    for layer, activations in zip(batch_norm_layers(model), expected, strict=True):
        axes = tuple(i for i in range(activations.ndim) if i != activations.ndim - 1)
        np.testing.assert_allclose(layer.moving_variance.numpy(), activations.var(axes), rtol=1e-4)
        np.testing.assert_allclose(
            report[layer.name]["new_mean"], activations.mean(axes), rtol=1e-4, atol=1e-5
        )


def test_fast_passes_reach_the_exact_statistics_after_one_pass_per_level(rng):
    model = _chain(3)
    x = _randomized_inputs(model, rng, 200)
    dataset = tf.data.Dataset.from_tensor_slices(x).batch(50)
    weights = model.get_weights()
    exact = recalibrate(model, dataset, verbose=0)
    model.set_weights(weights)
    one = recalibrate(model, dataset, mode="fast", verbose=0)
    model.set_weights(weights)
    three = recalibrate(model, dataset, mode="fast", passes=3, verbose=0)
    for name in exact:
        np.testing.assert_allclose(three[name]["new_variance"], exact[name]["new_variance"],
                                   rtol=1e-5)  # fmt: skip
    # The first level is exact at once; deeper ones are not after one pass (batches of 50).
    np.testing.assert_allclose(one["bn0"]["new_variance"], exact["bn0"]["new_variance"], rtol=1e-6)
    assert not np.allclose(one["bn2"]["new_variance"], exact["bn2"]["new_variance"], rtol=1e-3)


# ------------------------------------------------------------------------------------------ CLI
def test_cli_recalibrates_a_saved_lenet(tmp_path, tfds_dir, capsys):
    from tfbn.cli import main

    model = tfbn.lenet("tfbn")
    model.set_weights([w + 0.1 for w in model.get_weights()])  # moving stats 0.1 / 1.1: stale
    source = tmp_path / "lenet.keras"
    model.save(source)
    argv = ["recalibrate", str(source), "--tfds-dir", str(tfds_dir), "--batch-size", "500"]
    assert main([*argv, "--steps", "4", "--strategy", "default", "--verbose", "2"]) == 0
    printed = capsys.readouterr().out
    assert "Test accuracy:" in printed and "conv1_bn" in printed
    output = tmp_path / "lenet.recalibrated.keras"
    assert output.is_file() and not list(tmp_path.glob(".lenet*"))  # no temporary left

    # The same through the API, on the same 2000 training images in file order.
    fashion = data.load_fashion_mnist(500, tfds_dir=tfds_dir, shuffle=False)
    recalibrate(model, fashion.train, steps=4, verbose=0)
    saved = keras.saving.load_model(output)
    for layer in batch_norm_layers(model):
        twin = saved.get_layer(layer.name)
        np.testing.assert_allclose(twin.moving_mean.numpy(), layer.moving_mean.numpy(), rtol=1e-6)
        np.testing.assert_allclose(
            twin.moving_variance.numpy(), layer.moving_variance.numpy(), rtol=1e-6
        )


def test_cli_rejects_bad_arguments_before_work(tmp_path, capsys):
    from tfbn.cli import main

    def error(*argv):
        assert main(["recalibrate", *map(str, argv)]) == 2
        return capsys.readouterr().err.strip()

    assert error(tmp_path / "missing.keras").endswith("missing.keras: No such file or directory")
    corrupt = tmp_path / "corrupt.keras"
    corrupt.write_bytes(b"")
    assert "corrupt.keras: corrupt or truncated .keras file" in error(corrupt)
    model_path = tmp_path / "m.keras"
    _sequential("tfbn").save(model_path)
    assert "Argument `output` must end in '.keras'" in error(
        model_path, "--output", tmp_path / "out.h5"
    )
    assert "Argument `batch_size` must be a positive integer" in error(
        model_path, "--batch-size", "0"
    )
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    line = error(model_path, "--output", blocker / "o.keras")
    assert line == f"tfbn recalibrate: {blocker}: Not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.keras", "file", "m.keras"]


@pytest.mark.slow
def test_cli_read_only_output_fails_before_the_recalibration(tmp_path, tfds_dir):
    model_path = tmp_path / "lenet.keras"
    tfbn.lenet("tfbn").save(model_path)
    mount = tmp_path / "ro"
    mount.mkdir()
    script = f'mount -t tmpfs -o ro,size=1m none "{mount}" || exit 99; exec "$@"'
    command = ["unshare", "-m", "sh", "-c", script, "sh", sys.executable, "-m", "tfbn",
               "recalibrate", str(model_path), "--output", str(mount / "o.keras"),
               "--tfds-dir", str(tfds_dir)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    if result.returncode == 99 or "unshare" in result.stderr:
        pytest.skip(f"cannot mount a tmpfs in a private namespace: {result.stderr[:200]}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == f"tfbn recalibrate: {mount}: Read-only file system"
    assert "Recalibration pass" not in result.stdout


# -------------------------------------------------------------------------------- multi-worker
_WORKER = """
import sys
import numpy as np
import tensorflow as tf

strategy = tf.distribute.MultiWorkerMirroredStrategy()  # from TF_CONFIG, before any op runs
sys.path.insert(0, sys.argv[2])  # the tests folder
from model_helpers import mixed_norms_mlp  # noqa: E402

from tfbn.tools.recalibration import batch_norm_layers, recalibrate  # noqa: E402

rng = np.random.default_rng(11)
with strategy.scope():
    model = mixed_norms_mlp()
model.set_weights([rng.normal(0.5, 0.7, w.shape).astype("float32") for w in model.get_weights()])
x = rng.normal(2.0, 3.0, (263, 6)).astype("float32")
dataset = tf.data.Dataset.from_tensor_slices((x, np.zeros(263))).batch(40)
report = recalibrate(model, dataset, strategy=strategy, verbose=0)
out = {"x": x, **{f"w{i}": w for i, w in enumerate(model.get_weights())}}
for layer in batch_norm_layers(model):
    out[layer.name + "/mean"] = layer.moving_mean.numpy()
    out[layer.name + "/variance"] = layer.moving_variance.numpy()
    out[layer.name + "/count"] = np.float64(report[layer.name]["count"])
np.savez(sys.argv[1], **out)
"""


@pytest.mark.slow
def test_multi_worker_statistics_equal_single_device(tmp_path):

    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    run_workers(
        [[str(script), str(tmp_path / f"worker{index}.npz"), str(TESTS)] for index in range(2)],
        tmp_path,
        240,
    )

    first, second = (dict(np.load(tmp_path / f"worker{i}.npz")) for i in range(2))
    # The single-device reference: the same model and data, recalibrated in this process.
    model = mixed_norms_mlp()
    model.set_weights([first[f"w{i}"] for i in range(len(model.get_weights()))])
    x = first["x"]
    reference = _reference(model, x)
    for name in ("bn_tfbn", "bn_keras"):
        for key in ("mean", "variance"):
            np.testing.assert_array_equal(first[f"{name}/{key}"], second[f"{name}/{key}"])
        assert float(first[f"{name}/count"]) == len(x)
        mean, variance, _ = reference[name]
        np.testing.assert_allclose(first[f"{name}/variance"], variance, rtol=1e-5)
        error = np.abs(first[f"{name}/mean"] - mean)
        assert np.all(error <= 1e-5 * (np.abs(mean) + np.sqrt(variance)))


def test_recalibration_keeps_renorm_moving_stddev_consistent():
    rng = np.random.default_rng(7)
    x = (rng.normal(size=(64, 5)) * 3 + 2).astype("float32")
    model = keras.Sequential([keras.Input((5,)), tfbn.BatchNorm(renorm=True, name="bn")])
    model(x[:8], training=True)
    tfbn.recalibrate(model, tf.data.Dataset.from_tensor_slices(x).batch(16), verbose=0)
    layer = model.get_layer("bn")
    expected_var = x.astype(np.float64).var(0)
    np.testing.assert_allclose(layer.moving_variance.numpy(), expected_var, rtol=1e-5)
    np.testing.assert_allclose(
        layer.moving_stddev.numpy(), np.sqrt(expected_var + layer.epsilon), rtol=1e-5
    )

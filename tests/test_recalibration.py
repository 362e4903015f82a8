"""Population statistics: recalibrated moving statistics against float64 NumPy references."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from workers import run_workers

import tfbn
from tfbn import data
from tfbn.recalibration import batch_norm_layers, recalibrate

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
    _randomize(model, rng)
    x = _inputs(model, rng, 300)
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
    _randomize(model, rng)
    x = _inputs(model, rng, 257)
    reference = _reference(model, x)
    # A dataset of bare inputs (no labels).
    recalibrate(model, tf.data.Dataset.from_tensor_slices(x).batch(50), verbose=0)
    _assert_matches_reference(model, reference)


@pytest.mark.parametrize("kind", ["tfbn", "keras"])
def test_channels_first_axis(kind, rng):
    model = _channels_first(kind)
    _randomize(model, rng)
    x = _inputs(model, rng, 120)
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
    _randomize(model, rng)
    x = _inputs(model, rng, 200)
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
    inner = keras.Sequential([keras.Input((3,)), tfbn.BatchNorm(name="inner_bn")])
    outer_in = keras.Input((3,))
    nested = keras.Model(outer_in, inner(outer_in))
    with pytest.raises(ValueError, match="inner_bn.*nested"):
        recalibrate(nested, [np.zeros((2, 3), np.float32)], verbose=0)


# ------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    data.prepare(data.DEFAULT_DATA_DIR, path)
    return path


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

    assert main(["recalibrate", str(tmp_path / "missing.keras")]) == 2
    assert "does not exist" in capsys.readouterr().err
    model_path = tmp_path / "m.keras"
    model_path.write_bytes(b"")
    assert main(["recalibrate", str(model_path), "--output", str(tmp_path / "out.h5")]) == 2
    assert "--output" in capsys.readouterr().err
    assert main(["recalibrate", str(model_path), "--batch-size", "0"]) == 2
    assert "--batch-size" in capsys.readouterr().err


# -------------------------------------------------------------------------------- multi-worker
_WORKER = """
import sys
import numpy as np
import tensorflow as tf

strategy = tf.distribute.MultiWorkerMirroredStrategy()  # from TF_CONFIG, before any op runs
import keras  # noqa: E402

import tfbn  # noqa: E402
from tfbn.recalibration import batch_norm_layers, recalibrate  # noqa: E402

rng = np.random.default_rng(11)
with strategy.scope():
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(4),
            tfbn.BatchNorm(name="bn_tfbn"),
            keras.layers.Activation("sigmoid"),
            keras.layers.Dense(3),
            keras.layers.BatchNormalization(name="bn_keras"),
        ]
    )
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
        [[str(script), str(tmp_path / f"worker{index}.npz")] for index in range(2)], tmp_path, 240
    )

    first, second = (dict(np.load(tmp_path / f"worker{i}.npz")) for i in range(2))
    # The single-device reference: the same model and data, recalibrated in this process.
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(4),
            tfbn.BatchNorm(name="bn_tfbn"),
            keras.layers.Activation("sigmoid"),
            keras.layers.Dense(3),
            keras.layers.BatchNormalization(name="bn_keras"),
        ]
    )
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

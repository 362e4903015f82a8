"""`tfbn.inspect`: batch-norm statistics against float64 NumPy references on the same data."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfbn
from tfbn.tools import inspect as inspect_module
from tfbn.tools.inspect import inspect

BATCH = 32
BN_KINDS = {
    "keras": keras.layers.BatchNormalization,
    "tfbn": tfbn.BatchNorm,
}


# ------------------------------------------------------------------------------------ the models
def _sequential(bn):
    """Conv -> BN -> ReLU -> Conv -> BN -> tanh -> Flatten -> Dense -> BN -> Dense (softmax)."""
    return keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(4, 3, name="conv1"),
            bn(name="bn1"),
            keras.layers.Activation("relu"),
            keras.layers.Conv2D(3, 3, name="conv2"),
            bn(name="bn2"),
            keras.layers.Activation("tanh"),
            keras.layers.Flatten(),
            keras.layers.Dense(5, name="dense"),
            bn(name="bn3"),
            keras.layers.Dense(3, activation="softmax", name="out"),
        ],
        name="seq",
    )


def _functional():
    """Two branches with different BN kinds, then a BN after the merge (depends on both)."""
    inputs = keras.Input((6,))
    a = tfbn.BatchNorm(name="bn_a")(keras.layers.Dense(4, name="a")(inputs))
    b = keras.layers.BatchNormalization(name="bn_b")(keras.layers.Dense(3, name="b")(inputs))
    merged = keras.layers.Concatenate()([keras.layers.Activation("tanh")(a), b])
    merged = keras.layers.BatchNormalization(name="bn_c")(keras.layers.Dense(5, name="c")(merged))
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(merged), name="func")


def _nested():
    """A Sequential block (Conv -> BN -> ReLU) inside a functional model, a BN after it."""
    block = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(3, 3, name="conv"),
            tfbn.BatchNorm(name="inner_bn"),
            keras.layers.Activation("relu"),
        ],
        name="block",
    )
    inputs = keras.Input((6, 6, 2))
    h = keras.layers.Flatten()(block(inputs))
    h = keras.layers.BatchNormalization(name="outer_bn")(keras.layers.Dense(4, name="d")(h))
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(h), name="nested")


def _data(rng, shape, n=100):
    return (rng.normal(0.5, 2.0, (n, *shape))).astype("float32")


def _randomize(model, rng):
    """Moving statistics far from anything the data gives."""
    for layer in tfbn.tools.recalibration.batch_norm_layers(model):
        channels = layer.moving_mean.shape[0]
        layer.moving_mean.assign(rng.normal(0.0, 3.0, channels).astype("float32"))
        layer.moving_variance.assign(rng.uniform(0.05, 20.0, channels).astype("float32"))


def _copy(model):
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def _batches(x):
    return [x[i : i + BATCH] for i in range(0, len(x), BATCH)]


def _healthy(model, x):
    """`model` with statistics recalibrated as the moving averages track them: each layer's
    input with the batch norms before it normalizing with batch statistics (fast mode, 1 pass)."""
    tfbn.recalibrate(model, [(b,) for b in _batches(x)], mode="fast", verbose=0)
    return model


# ---------------------------------------------------------------------------- the references
def _reference_statistics(model, layer, x, inputs_of=None):
    """Float64 mean and biased variance of `layer`'s input over `x`, with the batch norms before
    it in training mode (on a copy of the model: training mode updates moving statistics)."""
    copy = _copy(model)
    if inputs_of is None:
        sub = keras.Model(copy.inputs[0], copy.get_layer(layer.name).input)
    else:
        sub = inputs_of(copy)
    values = np.concatenate(
        [np.asarray(sub(b, training=True), np.float64) for b in _batches(x)], axis=0
    )
    values = np.moveaxis(values, layer.axis, -1).reshape(-1, values.shape[layer.axis])
    return values.mean(axis=0), values.var(axis=0)


def _check_against_reference(report_layer, layer, mean, variance):
    np.testing.assert_allclose(report_layer.population_mean, mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(report_layer.population_variance, variance, rtol=1e-4)
    moving_mean = np.asarray(layer.moving_mean, np.float64)
    moving_variance = np.asarray(layer.moving_variance, np.float64)
    shifts = np.abs(moving_mean - mean) / np.sqrt(variance)
    ratios = moving_variance / variance
    assert report_layer.mean_shift == pytest.approx(shifts.max(), rel=1e-4)
    assert report_layer.mean_shift_channel == int(np.argmax(shifts))
    furthest = int(np.argmax(np.abs(np.log(ratios))))
    assert report_layer.variance_ratio == pytest.approx(ratios[furthest], rel=1e-4)
    assert report_layer.variance_ratio_channel == furthest


@pytest.mark.parametrize("kind", sorted(BN_KINDS))
def test_population_statistics_match_per_layer_submodels(kind, rng):
    model = _sequential(BN_KINDS[kind])
    _randomize(model, rng)
    x = _data(rng, (6, 6, 2))
    report = inspect(model, x, verbose=0)
    assert [layer.name for layer in report.layers] == ["bn1", "bn2", "bn3"]
    assert report.examples == len(x)
    for report_layer, name in zip(report.layers, ["bn1", "bn2", "bn3"], strict=True):
        layer = model.get_layer(name)
        _check_against_reference(report_layer, layer, *_reference_statistics(model, layer, x))
        assert report_layer.channels == layer.moving_mean.shape[0]


def test_functional_model_with_both_kinds(rng):
    model = _functional()
    _randomize(model, rng)
    x = _data(rng, (6,))
    report = inspect(model, x, verbose=0)
    assert [layer.name for layer in report.layers] == ["bn_a", "bn_b", "bn_c"]
    for report_layer in report.layers:
        layer = model.get_layer(report_layer.name)
        _check_against_reference(report_layer, layer, *_reference_statistics(model, layer, x))


def test_nested_model(rng):
    model = _nested()
    _randomize(model, rng)
    x = _data(rng, (6, 6, 2))
    report = inspect(model, x, verbose=0)
    assert [layer.name for layer in report.layers] == ["block/inner_bn", "outer_bn"]
    block = model.get_layer("block")
    inner = block.get_layer("inner_bn")
    inner_input = _reference_statistics(
        model,
        inner,
        x,
        lambda copy: keras.Model(
            copy.get_layer("block").inputs[0], copy.get_layer("block").get_layer("inner_bn").input
        ),
    )
    _check_against_reference(report.layers[0], inner, *inner_input)
    outer = model.get_layer("outer_bn")
    _check_against_reference(report.layers[1], outer, *_reference_statistics(model, outer, x))


def test_statistics_at_a_large_mean():
    """|mean| / std = 1e4 on bn1's input: its statistics and those downstream still exact."""
    inputs = keras.Input((4,))
    dense = keras.layers.Dense(3, name="dense")
    h = tfbn.BatchNorm(name="bn1")(dense(inputs))
    h = keras.layers.BatchNormalization(name="bn2")(keras.layers.Dense(2, name="mid")(h))
    model = keras.Model(inputs, keras.layers.Dense(2, name="out")(h))
    kernel = np.random.default_rng(3).normal(0.0, 0.5, (4, 3)).astype("float32")
    dense.set_weights([kernel, np.full(3, 1e4, "float32")])
    x = np.random.default_rng(4).normal(0.0, 1.0, (200, 4)).astype("float32")
    h1 = np.asarray(dense(x), np.float64)
    mean, variance = h1.mean(axis=0), h1.var(axis=0)
    std = np.sqrt(variance)
    bn1 = model.get_layer("bn1")
    bn1.moving_mean.assign((mean + np.array([0.0, 0.5, 3.0]) * std).astype("float32"))
    bn1.moving_variance.assign(variance.astype("float32"))
    report = inspect(model, x, verbose=0)
    layer = report.layers[0]
    np.testing.assert_allclose((layer.population_mean - mean) / std, 0.0, atol=1e-5)
    np.testing.assert_allclose(layer.population_variance, variance, rtol=1e-5)
    shifts = np.abs(np.asarray(bn1.moving_mean, np.float64) - mean) / std
    assert layer.mean_shift == pytest.approx(shifts.max(), rel=1e-4)
    assert layer.mean_shift_channel == 2 and layer.flagged
    bn2 = model.get_layer("bn2")
    downstream_mean, downstream_variance = _reference_statistics(model, bn2, x)
    np.testing.assert_allclose(report.layers[1].population_mean, downstream_mean, atol=1e-5)
    np.testing.assert_allclose(report.layers[1].population_variance, downstream_variance, 1e-4)


# ------------------------------------------------------------------------------- the verdicts
def _damage_mean(layer, report_layer, channel):
    mean = np.array(layer.moving_mean)
    mean[channel] += 3.0 * np.sqrt(report_layer.population_variance[channel])
    layer.moving_mean.assign(mean)


def _damage_variance(layer, report_layer, channel):
    variance = np.array(layer.moving_variance)
    variance[channel] *= 10.0
    layer.moving_variance.assign(variance)


def _damage_nan(layer, report_layer, channel):
    mean = np.array(layer.moving_mean)
    mean[channel] = np.nan
    layer.moving_mean.assign(mean)


DAMAGES = {"mean": _damage_mean, "variance": _damage_variance, "nan": _damage_nan}


@pytest.fixture(scope="module")
def healthy_model():
    """A recalibrated `_sequential` model, its data and labels it predicts right."""
    rng = np.random.default_rng(5)
    model = _sequential(tfbn.BatchNorm)
    x = _data(rng, (6, 6, 2))
    _healthy(model, x)
    y = np.argmax(model.predict(x, verbose=0), axis=-1)
    return model, x, y


@pytest.mark.parametrize(
    ("damage", "target"), [("mean", "bn1"), ("variance", "bn2"), ("nan", "bn3"), ("mean", "bn3")]
)
def test_damaged_layer_and_only_it_is_flagged(healthy_model, damage, target):
    source, x, y = healthy_model
    model = _copy(source)
    healthy = inspect(model, (x, y), verbose=0)
    assert healthy.flagged == []
    DAMAGES[damage](model.get_layer(target), healthy.layers[["bn1", "bn2", "bn3"].index(target)], 1)
    report = inspect(model, (x, y), verbose=0)
    assert report.flagged == [target]
    (reason,) = report.layers[["bn1", "bn2", "bn3"].index(target)].reasons
    assert {"mean": "moving mean", "variance": "moving variance", "nan": "non-finite"}[
        damage
    ] in reason
    assert not report.output_gap <= healthy.output_gap  # larger, or NaN
    assert "FLAGGED" in repr(report) and target in repr(report).splitlines()[-1]


def test_recalibrated_model_flags_nothing(rng):
    model = _sequential(keras.layers.BatchNormalization)
    _randomize(model, rng)
    x = _data(rng, (6, 6, 2))
    assert inspect(model, x, verbose=0).flagged == ["bn1", "bn2", "bn3"]
    tfbn.recalibrate(model, tf.data.Dataset.from_tensor_slices(x).batch(BATCH), verbose=0)
    report = inspect(model, x, verbose=0)
    assert report.flagged == []
    assert all(layer.mean_shift < 0.5 for layer in report.layers)
    # In one batch of all the data, batch statistics are the population's: no output gap.
    assert repr(inspect(model, x, batch_size=len(x), verbose=0)).splitlines()[-1].startswith("OK")


def test_verdict_checks_a_large_output_gap_with_no_layer_flagged(healthy_model):
    source, x, y = healthy_model
    # One batch of all the data: its statistics are the population's, the model's own.
    whole = inspect(source, x, batch_size=len(x), verbose=0)
    assert whole.output_gap <= inspect_module.OUTPUT_GAP_WARNING
    assert whole.verdict().startswith("OK: all 3 batch-norm layers match the data")
    healthy = inspect(source, (x, y), verbose=0)
    model = _copy(source)
    # Every channel of every layer shifted by 0.9 std, every variance 3.5x: under the
    # thresholds one by one, far off together.
    for report_layer in healthy.layers:
        layer = model.get_layer(report_layer.name)
        std = np.sqrt(report_layer.population_variance)
        layer.moving_mean.assign((report_layer.population_mean + 0.9 * std).astype("float32"))
        layer.moving_variance.assign((report_layer.population_variance * 3.5).astype("float32"))
    report = inspect(model, (x, y), verbose=0)
    assert report.flagged == []
    inference = np.asarray(model.predict(x, batch_size=BATCH, verbose=0), np.float64)
    training = np.concatenate(
        [np.asarray(_copy(model)(b, training=True), np.float64) for b in _batches(x)]
    )
    gap = np.abs(inference - training).mean() / np.abs(training).mean()
    assert gap > inspect_module.OUTPUT_GAP_WARNING
    verdict = report.verdict()
    assert verdict.startswith("CHECK: no batch-norm layer's statistics are off by the thresholds")
    assert report.output_gap == pytest.approx(gap, rel=1e-4)
    assert f"{report.output_gap:.2%} of its scale" in verdict and "lower the thresholds" in verdict
    assert repr(report).splitlines()[-1] == verdict and "\n" not in verdict
    # Thresholds that flag the layers give the FLAGGED verdict instead.
    strict = inspect(model, x, mean_threshold=0.5, verbose=0)
    assert strict.flagged == ["bn1", "bn2", "bn3"] and strict.verdict().startswith("FLAGGED")


def test_dead_channel_is_counted_not_flagged(rng):
    model = _sequential(keras.layers.BatchNormalization)
    conv2 = model.get_layer("conv2")
    kernel, bias = (np.array(v) for v in conv2.weights)
    kernel[..., 0], bias[0] = 0.0, 0.25  # channel 0 of bn2's input is constant
    conv2.set_weights([kernel, bias])
    x = _data(rng, (6, 6, 2))
    _healthy(model, x)
    report = inspect(model, x, verbose=0)
    assert [layer.dead_channels for layer in report.layers] == [0, 1, 0]
    assert report.flagged == []


def test_model_variables_are_unchanged(healthy_model):
    source, x, y = healthy_model
    model = _copy(source)
    _damage_mean(model.get_layer("bn2"), inspect(model, x, verbose=0).layers[1], 0)
    before = [np.array(v) for v in model.variables]
    inspect(model, (x, y), verbose=0)
    for value, variable in zip(before, model.variables, strict=True):
        np.testing.assert_array_equal(np.array(variable), value, err_msg=variable.path)


def test_accuracy_as_is_and_recalibrated_match_evaluating_copies(healthy_model):
    source, x, y = healthy_model
    model = _copy(source)
    _damage_variance(model.get_layer("bn1"), None, 0)
    _damage_mean(model.get_layer("bn3"), inspect(model, x, verbose=0).layers[2], 2)
    report = inspect(model, (x, y), verbose=0)
    as_is = np.mean(np.argmax(model.predict(x, verbose=0), axis=-1) == y)
    recalibrated = _healthy(_copy(model), x)
    after = np.mean(np.argmax(recalibrated.predict(x, verbose=0), axis=-1) == y)
    assert report.accuracy == pytest.approx(as_is)
    assert report.accuracy_recalibrated == pytest.approx(after)
    assert report.accuracy < report.accuracy_recalibrated


def test_output_gap_against_numpy(healthy_model):
    source, x, _ = healthy_model
    model = _copy(source)
    _damage_mean(model.get_layer("bn2"), inspect(model, x, verbose=0).layers[1], 0)
    report = inspect(model, x, verbose=0)
    inference = np.asarray(model.predict(x, batch_size=BATCH, verbose=0), np.float64)
    copy = _copy(model)  # training mode updates the copy's moving statistics
    training = np.concatenate([np.asarray(copy(b, training=True), np.float64) for b in _batches(x)])
    scale = np.abs(training).mean()
    assert report.output_scale == pytest.approx(scale, rel=1e-5)
    assert report.output_gap == pytest.approx(np.abs(inference - training).mean() / scale, 1e-4)
    assert report.output_gap_max == pytest.approx(np.abs(inference - training).max() / scale, 1e-4)


# ------------------------------------------------------------------------------------- the data
def test_every_form_of_data_gives_the_same_statistics(healthy_model):
    model, x, y = healthy_model
    reference = inspect(model, (x, y), verbose=0)
    forms = {
        "dataset": tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH),
        "list": [(b, y[i * BATCH : (i + 1) * BATCH]) for i, b in enumerate(_batches(x))],
        "generator": ((b, y[i * BATCH : (i + 1) * BATCH]) for i, b in enumerate(_batches(x))),
    }
    for name, data in forms.items():
        report = inspect(model, data, verbose=0)
        assert report.examples == len(x), name
        assert report.accuracy == reference.accuracy, name
        for a, b in zip(report.layers, reference.layers, strict=True):
            np.testing.assert_allclose(a.population_mean, b.population_mean, rtol=1e-6)
            np.testing.assert_allclose(a.population_variance, b.population_variance, rtol=1e-6)
    # A one-shot iterator gives one pass: no recalibrated accuracy.
    assert report.accuracy_recalibrated is None
    assert reference.accuracy_recalibrated is not None
    assert inspect(model, x, steps=2, verbose=0).examples == 2 * BATCH


def test_one_trace_for_all_batch_sizes_and_calls(healthy_model, monkeypatch):
    source, x, y = healthy_model
    model = _copy(source)
    compiled = []
    original = inspect_module._compile

    def recording(function, flat, variables):
        compiled.append(original(function, flat, variables))
        return compiled[-1]

    monkeypatch.setattr(inspect_module, "_compile", recording)
    first = inspect(model, x[:70], batch_size=BATCH, verbose=0)  # batches of 32, 32 and 6
    _damage_mean(model.get_layer("bn2"), first.layers[1], 0)  # new values, same functions
    second = inspect(model, (x[:70], y[:70]), batch_size=BATCH, verbose=0)
    inspect(model, (x, y), batch_size=BATCH, verbose=0)
    assert second.flagged == ["bn2"]
    measure, labelled, forward = compiled  # a measure function with and without labels
    assert all(f.experimental_get_tracing_count() == 1 for f in (measure, labelled, forward))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(data=np.zeros((0, 6, 6, 2), "float32")), "no examples"),
        (dict(data=np.zeros((4, 6, 6), "float32")), "(4, 6, 6)"),
        (dict(data=np.full((4, 6, 6, 2), np.nan, "float32")), "non-finite"),
        (dict(data=(np.zeros((4, 6, 6, 2), "float32"), np.zeros(3))), "same number"),
        (
            dict(
                data=tf.data.Dataset.from_tensor_slices(np.zeros((4, 6, 6, 2))).batch(2),
                batch_size=2,
            ),
            "batch_size",
        ),
        (dict(data=[]), "no batches"),
        (
            dict(data=np.zeros((4, 6, 6, 2), "float32"), variance_threshold=1.0),
            "variance_threshold",
        ),
        (dict(data=np.zeros((4, 6, 6, 2), "float32"), mean_threshold=-1), "mean_threshold"),
        (dict(data="x.npy"), "NumPy arrays"),
    ],
)
def test_bad_input_is_one_line_before_any_pass(healthy_model, arguments, message, monkeypatch):
    model, _, _ = healthy_model

    def no_pass(*args):
        raise AssertionError("a pass started")

    monkeypatch.setattr(inspect_module, "_runner", no_pass)
    with pytest.raises(ValueError) as error:
        inspect(model, verbose=0, **arguments)
    assert message in str(error.value) and "\n" not in str(error.value)
    if message == "(4, 6, 6)":
        assert "(None, 6, 6, 2)" in str(error.value)


def test_model_without_batch_norm_is_refused():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="no batch-norm layer"):
        inspect(model, np.zeros((4, 3), "float32"), verbose=0)


def test_non_finite_batch_of_a_dataset_is_refused(healthy_model):
    model, x, _ = healthy_model
    x = x.copy()
    x[40] = np.inf
    with pytest.raises(ValueError, match="batch 2 holds non-finite"):
        inspect(model, tf.data.Dataset.from_tensor_slices(x).batch(BATCH), verbose=0)


# ----------------------------------------------------------------------------------- the report
def test_to_dict_is_json_with_the_documented_shape(healthy_model):
    source, x, y = healthy_model
    model = _copy(source)
    _damage_nan(model.get_layer("bn1"), None, 0)
    report = inspect(model, (x, y), verbose=0)
    result = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert result["model"] == "seq" and result["examples"] == len(x)
    assert result["flagged"] == ["bn1"]
    assert set(result) >= {"output_gap", "output_gap_max", "accuracy", "accuracy_recalibrated"}
    assert [layer["name"] for layer in result["layers"]] == ["bn1", "bn2", "bn3"]
    for layer, full in zip(result["layers"], report.layers, strict=True):
        assert set(layer) >= {
            "name",
            "flagged",
            "mean_shift",
            "variance_ratio",
            "dead_channels",
            "non_finite",
            "foldable",
            "fold_reason",
            "reasons",
            "channels",
        }
        assert layer["flagged"] == full.flagged and layer["non_finite"] == full.non_finite
    assert result["layers"][0]["non_finite"] == 1
    assert result["output_gap"] is None  # the NaN reaches the output
    assert 0.0 <= result["accuracy"] <= 1.0


def test_foldable_follows_fold_plan(rng):
    model = _nested()
    report = inspect(model, _data(rng, (6, 6, 2)), verbose=0)
    plan = tfbn.tools.folding.fold_plan(model)
    for layer in report.layers:
        assert layer.foldable == (plan[layer.name].into is not None)
    assert report.layers[1].foldable and report.layers[1].fold_reason == "folds into 'd'"


# ------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def saved(healthy_model, tmp_path_factory):
    """A healthy and a damaged `.keras` file and a `.npz` with x and y."""
    model, x, y = healthy_model
    folder = tmp_path_factory.mktemp("inspect")
    model.save(folder / "healthy.keras")
    damaged = _copy(model)
    _damage_variance(damaged.get_layer("bn2"), None, 1)
    damaged.save(folder / "damaged.keras")
    np.savez(folder / "data.npz", x=x, y=y)
    return folder


def test_cli_healthy_model_exits_0_and_writes_json_and_png(saved, capsys):
    from tfbn import cli

    argv = ["inspect", str(saved / "healthy.keras"), "--data", str(saved / "data.npz")]
    argv += ["--batch-size", "100"]  # the data in one batch: no batch-statistics noise
    argv += ["--output", str(saved / "out/report.json"), "--plot", str(saved / "out/report.png")]
    assert cli.main([*argv, "--verbose", "0"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert (
        printed[-1].startswith("OK: all 3 batch-norm layers") and "accuracy 1.0000" in printed[-1]
    )
    result = json.loads((saved / "out/report.json").read_text())
    assert result["flagged"] == [] and result["examples"] == 100
    assert [layer["name"] for layer in result["layers"]] == ["bn1", "bn2", "bn3"]
    assert (saved / "out/report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_damaged_model_exits_1(saved, capsys):
    from tfbn import cli

    argv = ["inspect", str(saved / "damaged.keras"), "--data", str(saved / "data.npz")]
    assert cli.main([*argv, "--verbose", "0", "--variance-threshold", "12"]) == 0
    capsys.readouterr()
    assert cli.main([*argv, "--verbose", "0"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("FLAGGED: 1 of 3 batch-norm layers (bn2)")
    assert any(line.startswith("! bn2") for line in lines)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data", "missing.npz"], "missing.npz"),
        ([], "`data` is required"),
        (["--data", "DATA", "--output", "report.txt"], "'.json'"),
        (["--data", "DATA", "--variance-threshold", "0.5"], "variance_threshold"),
    ],
)
def test_cli_errors_exit_2_in_one_line(saved, extra, message, capsys, tmp_path, monkeypatch):
    from tfbn import cli

    monkeypatch.chdir(tmp_path)
    extra = [str(saved / "data.npz") if item == "DATA" else item for item in extra]
    assert cli.main(["inspect", str(saved / "healthy.keras"), *extra]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("tfbn inspect:") and message in line

"""tfbn.convert on small models: what is replaced, what is kept, what is refused.

The reference is always the original Keras model: the converted copy must compute its outputs
and moving statistics, keep its names, flags and variables, and leave it untouched. The three
`keras.applications` models are in test_applications.py. `tfbn convert in.keras out.keras` is
run on real files, once in a subprocess.
"""

import subprocess
import sys

import keras
import numpy as np
import pytest

import tfbn
from tfbn import cli
from tfbn.tools.conversion import convert


def _randomize(model, rng):
    for variable in model.variables:
        if "seed_generator" in variable.path:
            continue
        values = rng.normal(0.0, 0.5, variable.shape)
        if "variance" in variable.path or "stddev" in variable.path:
            values = rng.uniform(0.5, 2.0, variable.shape)
        variable.assign(values.astype(variable.dtype))


def _block(name):
    return keras.Sequential(
        [
            keras.Input((6, 6, 4)),
            keras.layers.Conv2D(4, 3, padding="same", name=f"{name}_conv"),
            keras.layers.BatchNormalization(name=f"{name}_bn", momentum=0.9, epsilon=1e-2),
            keras.layers.ReLU(),
        ],
        name=name,
    )


def _model():
    """Keras batch norms of every flavour, a nested block, a frozen part and a dropout."""
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="stem")(inputs)
    x = keras.layers.BatchNormalization(name="bn_frozen", trainable=False)(x)
    x = _block("block")(x)
    x = keras.layers.BatchNormalization(axis=1, center=False, name="bn_axis1")(x)
    x = keras.layers.BatchNormalization(renorm=True, renorm_momentum=0.9, name="bn_renorm")(x)
    x = tfbn.BatchNorm(name="bn_tfbn")(x)
    x = keras.layers.Dropout(0.5, name="drop")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(5, name="head")(x)
    return keras.Model(inputs, outputs, name="small")


def _all_layers(model):
    return model._flatten_layers(include_self=False, recursive=True)


def test_every_keras_batch_norm_is_replaced_and_the_rest_kept(rng):
    model = _model()
    _randomize(model, rng)
    before = [keras.ops.convert_to_numpy(v).copy() for v in model.variables]
    converted = convert(model)

    originals = {layer.name: layer for layer in _all_layers(model)}
    copies = {layer.name: layer for layer in _all_layers(converted)}
    assert list(copies) == list(originals)
    for name, layer in originals.items():
        twin = copies[name]
        assert twin is not layer and twin.trainable == layer.trainable, name
        if type(layer) is keras.layers.BatchNormalization:
            assert type(twin) is tfbn.BatchNorm, name
            config = twin.get_config()
            for key, value in layer.get_config().items():
                assert config[key] == value, (name, key)
        else:
            assert type(twin) is type(layer), name
        twin_values = {v.path.split("/", 1)[-1]: v for v in twin.variables}
        for variable in layer.variables:
            copied = twin_values[variable.path.split("/", 1)[-1]]
            np.testing.assert_array_equal(copied.numpy(), variable.numpy())
    assert converted.get_layer("bn_frozen").trainable is False
    # The original is untouched.
    after = [keras.ops.convert_to_numpy(v) for v in model.variables]
    for old, new in zip(before, after, strict=True):
        np.testing.assert_array_equal(old, new)
    assert type(originals["bn_renorm"]) is keras.layers.BatchNormalization


def test_outputs_and_moving_statistics_equal_the_original(rng):
    model = _model()
    _randomize(model, rng)
    converted = convert(model)
    x = rng.normal(1.0, 2.0, (16, 6, 6, 3)).astype("float32")
    np.testing.assert_allclose(converted(x), model(x), rtol=1e-5, atol=1e-6)
    # Training mode: batch statistics, the same dropout draws (the seed state is copied), and
    # the moving statistics updated the same way.
    for _ in range(2):
        np.testing.assert_allclose(
            converted(x, training=True), model(x, training=True), rtol=1e-4, atol=1e-5
        )
    for layer in _all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            twin = converted.get_layer(layer.name) if layer.name != "block_bn" else None
            twin = twin or converted.get_layer("block").get_layer("block_bn")
            for name in ("moving_mean", "moving_variance"):
                np.testing.assert_allclose(
                    getattr(twin, name).numpy(), getattr(layer, name).numpy(), rtol=1e-5,
                    atol=1e-6, err_msg=f"{layer.name}.{name}",
                )  # fmt: skip


def test_a_sequential_model_stays_sequential_and_a_frozen_model_frozen(rng):
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4), keras.layers.BatchNormalization(name="bn")]
    )
    model.trainable = False
    converted = convert(model)
    assert isinstance(converted, keras.Sequential)
    assert isinstance(converted.get_layer("bn"), tfbn.BatchNorm)
    assert converted.trainable is False and not converted.trainable_weights


def test_tfbn_batch_norms_and_user_subclasses_are_copied_as_they_are(rng):
    class MyNorm(keras.layers.BatchNormalization):
        pass

    inputs = keras.Input((4, 3))
    x = tfbn.BatchNorm(virtual_batch_size=2, fused=False, renorm=True, name="bn_tfbn")(inputs)
    x = MyNorm(name="bn_user")(x)
    model = keras.Model(inputs, x)
    _randomize(model, rng)
    converted = convert(model)
    for name in ("bn_tfbn", "bn_user"):
        layer, twin = model.get_layer(name), converted.get_layer(name)
        assert type(twin) is type(layer) and twin is not layer, name
        assert twin.get_config() == layer.get_config(), name
        for a, b in zip(twin.weights, layer.weights, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    x = rng.normal(size=(4, 4, 3)).astype("float32")
    np.testing.assert_array_equal(converted(x, training=True), model(x, training=True))


def test_the_converted_model_reloads_without_custom_objects(rng, tmp_path):
    model = _model()
    _randomize(model, rng)
    converted = convert(model)
    path = tmp_path / "converted.keras"
    converted.save(path)
    reloaded = keras.saving.load_model(path)  # no custom_objects
    assert type(reloaded.get_layer("bn_renorm")) is tfbn.BatchNorm
    x = rng.normal(size=(4, 6, 6, 3)).astype("float32")
    np.testing.assert_array_equal(reloaded(x), converted(x))


def test_a_subclassed_model_is_refused_naming_its_batch_norms():
    class Net(keras.Model):
        def __init__(self):
            super().__init__(name="net")
            self.dense = keras.layers.Dense(3)
            self.norm = keras.layers.BatchNormalization(name="inner_bn")

        def call(self, x):
            return self.norm(self.dense(x))

    net = Net()
    net(np.zeros((2, 3), "float32"))
    with pytest.raises(ValueError, match=r"'net' of type Net.*inner_bn.*subclassed"):
        convert(net)


@keras.saving.register_keras_serializable(package="test_convert")
class Block(keras.layers.Layer):
    """A custom layer holding a batch norm that convert cannot reach."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.norm = keras.layers.BatchNormalization()

    def call(self, x):
        return self.norm(x)


def _hidden_batch_norm_model() -> keras.Model:
    inputs = keras.Input((3,))
    return keras.Model(inputs, Block(name="hidden_block")(inputs))


def test_a_layer_hiding_a_batch_norm_is_refused_by_name():
    with pytest.raises(ValueError, match=r"layer 'hidden_block' \(Block\).*batch-norm"):
        convert(_hidden_batch_norm_model())


def test_a_layer_that_cannot_be_rebuilt_is_named():
    class Scale(keras.layers.Layer):
        def __init__(self, factor, **kwargs):
            super().__init__(**kwargs)
            self.factor = factor

        def call(self, x):
            return x * self.factor

        def get_config(self):  # a key __init__ does not take (a renamed argument)
            config = {**super().get_config(), "scale_factor": self.factor}
            return config

    inputs = keras.Input((3,))
    bn = keras.layers.BatchNormalization()(inputs)
    model = keras.Model(inputs, Scale(2.0, name="scale")(bn))
    with pytest.raises(ValueError, match=r"layer 'scale' \(Scale\): rebuilding it"):
        convert(model)


def test_not_a_model_is_refused():
    with pytest.raises(ValueError, match="`model`"):
        convert(keras.layers.Dense(3))


# ------------------------------------------------------------------------------ tfbn convert
def _saved(model, path):
    model.save(path)
    return path


def test_tfbn_convert_writes_a_model_that_reloads_and_computes_the_original(rng, tmp_path):
    model = _model()
    _randomize(model, rng)
    source = _saved(model, tmp_path / "in.keras")
    target = tmp_path / "out" / "converted.keras"
    done = subprocess.run(
        [sys.executable, "-m", "tfbn", "convert", str(source), str(target)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert str(target) in done.stdout and "Replaced 4 " in done.stdout
    reloaded = keras.saving.load_model(target)  # no custom_objects
    for name in ("bn_frozen", "bn_axis1", "bn_renorm", "bn_tfbn"):
        assert type(reloaded.get_layer(name)) is tfbn.BatchNorm, name
    assert type(reloaded.get_layer("block").get_layer("block_bn")) is tfbn.BatchNorm
    assert reloaded.get_layer("bn_frozen").trainable is False
    x = rng.normal(1.0, 2.0, (8, 6, 6, 3)).astype("float32")
    np.testing.assert_allclose(reloaded(x), model(x), rtol=1e-5, atol=1e-6)
    assert [p.name for p in target.parent.iterdir()] == ["converted.keras"]  # no temporary left


def _convert_cli(*argv, capsys):
    code = cli.main(["convert", "--verbose", "0", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.splitlines()


def test_tfbn_convert_may_replace_its_input(rng, tmp_path, capsys):
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4), keras.layers.BatchNormalization(name="bn")]
    )
    _randomize(model, rng)
    path = _saved(model, tmp_path / "model.keras")
    code, out, err = _convert_cli(path, path, capsys=capsys)
    assert (code, out.strip(), err) == (0, str(path), [])
    reloaded = keras.saving.load_model(path)
    assert type(reloaded.get_layer("bn")) is tfbn.BatchNorm
    x = rng.normal(size=(5, 3)).astype("float32")
    np.testing.assert_allclose(reloaded(x), model(x), rtol=1e-5, atol=1e-6)


def test_tfbn_convert_bad_output_is_one_line_before_loading(rng, tmp_path, capsys):
    source = _saved(_model(), tmp_path / "in.keras")
    code, out, err = _convert_cli(source, tmp_path / "out.h5", capsys=capsys)
    assert code == 2 and err == [
        f"tfbn convert: error: Argument `output` must end in '.keras'; received "
        f"output='{tmp_path / 'out.h5'}'."
    ]
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, out, err = _convert_cli(source, blocker / "out.keras", capsys=capsys)
    assert (code, err) == (2, [f"tfbn convert: {blocker}: Not a directory"])
    missing = tmp_path / "missing.keras"
    code, out, err = _convert_cli(missing, tmp_path / "o.keras", capsys=capsys)
    assert (code, err) == (2, [f"tfbn convert: {missing}: No such file or directory"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "in.keras"]


def test_tfbn_convert_refusal_names_the_layer_and_keeps_the_old_output(tmp_path, capsys):
    source = _saved(_hidden_batch_norm_model(), tmp_path / "in.keras")
    target = tmp_path / "out.keras"
    target.write_bytes(b"previous")
    code, out, err = _convert_cli(source, target, capsys=capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith("tfbn convert: error: Cannot convert layer 'hidden_block' (Block)")
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.keras", "out.keras"]

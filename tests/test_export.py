"""SavedModel export: folded and unfolded exports against the Keras model's predict.

The reference is always the Keras model itself (`model.predict`, float32 inputs scaled by 1/255),
and for the folding arithmetic a float64 NumPy computation of the fold. Exports are loaded in a
subprocess that cannot import tfbn, and in-process for the rest.
"""

import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from model_helpers import (
    keras_reference,
    lenets,
    randomize_batch_norms,
    train_briefly,
    write_idx,
)

import tfbn
from tfbn import cli
from tfbn.tools import export, folding
from tfbn.workflow import serving
from tfbn.workflow.config import CLASS_NAMES

HERE = pathlib.Path(__file__).resolve().parent
FOLD_TOL = 1e-4
UNFOLDED_TOL = 1e-5


# --------------------------------------------------------------------------------- models


def _functional_model(rng):
    """Every folding case: bias-free conv, center/scale off, channels-first conv, dense on a rank-3
    input, BN with nothing to fold into, a conv output used twice, an activation inside the conv,
    and a BN on a non-channel axis."""
    inputs = keras.Input((28, 28, 1))
    x = keras.layers.Conv2D(4, 3, use_bias=False, name="conv_nobias")(inputs)
    x = tfbn.BatchNorm(epsilon=1e-3, name="bn_nobias")(x)  # folded, bias created
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.BatchNormalization(name="bn_after_pool")(x)  # affine
    y = keras.layers.Conv2D(6, 3, name="conv_shared")(x)
    a = keras.layers.BatchNormalization(center=False, name="bn_shared")(y)  # affine: y used twice
    b = keras.layers.Activation("tanh")(y)
    x = keras.layers.Add()([a, b])
    x = keras.layers.Conv2D(5, 3, activation="sigmoid", name="conv_act")(x)
    x = tfbn.BatchNorm(name="bn_after_act")(x)  # affine: activation in between
    x = keras.layers.Conv2D(8, 3, name="conv_plain")(x)
    x = keras.layers.BatchNormalization(scale=False, name="bn_noscale")(x)  # folded
    x = keras.layers.Permute((3, 1, 2))(x)
    x = keras.layers.Conv2D(4, 3, data_format="channels_first", name="conv_cf")(x)
    x = tfbn.BatchNorm(axis=1, name="bn_channels_first")(x)  # folded: axis 1 is the channel
    x = keras.layers.Reshape((4, 25))(x)
    x = keras.layers.Dense(6, name="dense_rank3")(x)
    x = keras.layers.BatchNormalization(renorm=True, name="bn_dense_rank3")(x)  # folded
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.Dense(6, name="dense_seq")(x)
    x = tfbn.BatchNorm(axis=1, name="bn_wrong_axis")(x)  # affine: axis 1 is not Dense's
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(12, use_bias=False, name="dense_nobias")(x)
    x = tfbn.BatchNorm(center=False, scale=False, name="bn_plain")(x)  # folded
    outputs = keras.layers.Dense(10, name="logits")(keras.layers.Activation("sigmoid")(x))
    model = keras.Model(inputs, outputs, name="functional")
    train_briefly(model, rng)
    randomize_batch_norms(model, rng)
    return model


FOLDED_IN_FUNCTIONAL = {
    "bn_nobias", "bn_noscale", "bn_channels_first", "bn_dense_rank3", "bn_plain"
}  # fmt: skip
AFFINE_IN_FUNCTIONAL = {"bn_after_pool", "bn_shared", "bn_after_act", "bn_wrong_axis"}


@pytest.fixture(scope="module")
def models():
    rng = np.random.default_rng(0)
    return {**lenets(rng), "functional": _functional_model(rng)}


@pytest.fixture(scope="module")
def exports(models, images, tmp_path_factory):
    """(kind, fold) -> version folder, all written by export_saved_model."""
    base = tmp_path_factory.mktemp("exports")
    out = {}
    for kind, model in models.items():
        for fold in (True, False):
            out[kind, fold] = tfbn.export_saved_model(
                model,
                base,
                name=f"{kind}_{'folded' if fold else 'unfolded'}",
                fold=fold,
                class_names=None if kind == "keras" else CLASS_NAMES,
            )
    return out


@pytest.fixture(scope="module")
def served_without_tfbn(exports, images, tmp_path_factory):
    """Outputs of every export's signatures, computed in a process that cannot import tfbn."""
    work = tmp_path_factory.mktemp("served")
    np.save(work / "images.npy", images)
    keys = list(exports)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, str(HERE / "serve_without_tfbn.py"), str(work / "images.npy"),
         str(work / "out.npz"), *(str(exports[k]) for k in keys)],
        capture_output=True, text=True, timeout=180, env=env, cwd=work,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    data = np.load(work / "out.npz")
    return {key: {name.split("/", 1)[1]: data[name] for name in data.files
                  if name.startswith(f"{i}/")} for i, key in enumerate(keys)}  # fmt: skip


# --------------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("kind", ["tfbn", "keras", "functional"])
@pytest.mark.parametrize("fold", [True, False], ids=["folded", "unfolded"])
def test_saved_model_without_tfbn_matches_predict(models, images, served_without_tfbn, kind, fold):
    served = served_without_tfbn[kind, fold]
    expected = keras_reference(models[kind], images)
    tolerance = FOLD_TOL if fold else UNFOLDED_TOL
    for signature in ("serving_default", "serving_uint8_2d", "serving_float"):
        logits = served[f"{signature}/logits"]
        assert logits.shape == expected.shape
        np.testing.assert_allclose(logits, expected, rtol=0, atol=tolerance)
        np.testing.assert_allclose(
            served[f"{signature}/probabilities"],
            tf.nn.softmax(expected.astype(np.float64)).numpy(),
            rtol=0,
            atol=tolerance,
        )


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "unfolded"])
def test_signatures_present_and_outputs_consistent(served_without_tfbn, fold):
    served = served_without_tfbn["tfbn", fold]
    assert set(served["signatures"]) == {"serving_default", "serving_uint8_2d", "serving_float"}
    assert list(served["class_names"]) == list(CLASS_NAMES)
    for signature in ("serving_default", "serving_uint8_2d", "serving_float"):
        logits = served[f"{signature}/logits"]
        class_id = served[f"{signature}/class_id"]
        np.testing.assert_array_equal(class_id, np.argmax(logits, axis=-1))
        names = list(served[f"{signature}/class_name"])
        assert names == [CLASS_NAMES[i] for i in class_id]
    # The uint8 signatures and the float one see the same pixels.
    np.testing.assert_array_equal(
        served["serving_default/logits"], served["serving_uint8_2d/logits"]
    )
    np.testing.assert_allclose(
        served["serving_default/logits"], served["serving_float/logits"], rtol=0, atol=1e-6
    )


def test_folding_folds_exactly_the_foldable_batch_norms(models, images):
    model = models["functional"]
    folded = folding.fold_batch_norm(model)
    kinds = {layer.name: type(layer).__name__ for layer in folded.layers}
    for name in FOLDED_IN_FUNCTIONAL:
        assert kinds[name] == "FoldedAway", name
    for name in AFFINE_IN_FUNCTIONAL:
        assert kinds[name] == "ChannelAffine", name
    assert not any(
        isinstance(layer, (tfbn.BatchNorm, keras.layers.BatchNormalization))
        for layer in folded.layers
    )
    # The fold's arithmetic, recomputed in float64 from the batch-norm variables.
    conv, bn = model.get_layer("conv_nobias"), model.get_layer("bn_nobias")
    mean, var = (np.float64(v.numpy()) for v in (bn.moving_mean, bn.moving_variance))
    s = bn.gamma.numpy().astype(np.float64) / np.sqrt(var + bn.epsilon)
    kernel, bias = folded.get_layer("conv_nobias").get_weights()
    np.testing.assert_allclose(kernel, conv.kernel.numpy() * s, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(bias, bn.beta.numpy() - mean * s, rtol=1e-6, atol=1e-6)
    x = images[..., None].astype(np.float32) / 255.0
    np.testing.assert_allclose(
        folded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=0, atol=FOLD_TOL
    )


def test_graph_is_inference_only(exports):
    def ops_of(path):
        function = tf.saved_model.load(str(path)).signatures["serving_default"]
        graph_def = function.graph.as_graph_def()
        ops = {node.op for node in graph_def.node}
        for library_function in graph_def.library.function:
            ops.update(node.op for node in library_function.node_def)
        return ops

    for kind in ("tfbn", "keras"):
        folded, unfolded = ops_of(exports[kind, True]), ops_of(exports[kind, False])
        for ops in (folded, unfolded):
            assert not {op for op in ops if "Assign" in op}, ops
        # Batch-norm arithmetic (1/sqrt(var + eps)) is in the unfolded graph only.
        assert "Rsqrt" in unfolded or any("BatchNorm" in op for op in unfolded)
        assert "Rsqrt" not in folded and not any("BatchNorm" in op for op in folded)


def test_prediction_does_not_depend_on_the_batch(exports, images):
    for fold in (True, False):
        serve = tf.saved_model.load(str(exports["tfbn", fold])).signatures["serving_default"]
        whole = serve(images=tf.constant(images[..., None]))["logits"].numpy()
        alone = np.concatenate(
            [serve(images=tf.constant(images[i : i + 1, ..., None]))["logits"] for i in range(8)]
        )
        # The same images again, among 250 others.
        mixed = np.concatenate([np.repeat(images[8:], 7, axis=0)[:250], images[:8]])
        among = serve(images=tf.constant(mixed[..., None]))["logits"].numpy()[-8:]
        np.testing.assert_allclose(alone, whole[:8], rtol=0, atol=1e-6)
        np.testing.assert_allclose(among, whole[:8], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(alone.argmax(-1), whole[:8].argmax(-1))


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 28, 28, 3), np.uint8),
        np.zeros((2, 32, 32, 1), np.uint8),
        np.zeros((28, 28, 1), np.uint8),
        np.zeros((2, 28, 28, 1), np.float64),
        np.zeros((2, 28, 28, 1), np.int32),
    ],
    ids=["3-channels", "32x32", "no-batch", "float64", "int32"],
)
def test_wrong_input_fails_on_the_signature(exports, bad):
    serve = tf.saved_model.load(str(exports["tfbn", True])).signatures["serving_default"]
    with pytest.raises((TypeError, ValueError, tf.errors.InvalidArgumentError)):
        serve(images=tf.constant(bad))


def test_saved_model_cli_lists_the_signatures(exports):
    cli_path = pathlib.Path(sys.executable).parent / "saved_model_cli"
    assert cli_path.exists(), "tensorflow installs saved_model_cli next to the interpreter"
    result = subprocess.run(
        [str(cli_path), "show", "--dir", str(exports["tfbn", True]), "--all"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout
    for name in ("serving_default", "serving_uint8_2d", "serving_float"):
        assert f"signature_def['{name}']" in text
    for output in ("logits", "probabilities", "class_id", "class_name"):
        assert f"outputs['{output}']" in text
    assert "dtype: DT_UINT8" in text and "(-1, 28, 28, 1)" in text and "(-1, 28, 28)" in text


# ------------------------------------------------------------------------- writing the folder


def _listing(path):
    return sorted(p.name for p in pathlib.Path(path).iterdir())


def test_interrupted_export_leaves_nothing(models, tmp_path, monkeypatch):
    def failing_save(obj, export_dir, *args, **kwargs):
        pathlib.Path(export_dir, "variables").mkdir(parents=True)
        pathlib.Path(export_dir, "saved_model.pb").write_bytes(b"partial")
        raise OSError("disk full")

    kept = tfbn.export_saved_model(models["keras"], tmp_path, name="m", version=1)
    before = sorted((p.relative_to(kept), p.read_bytes()) for p in kept.rglob("*") if p.is_file())
    monkeypatch.setattr(tf.saved_model, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        tfbn.export_saved_model(models["tfbn"], tmp_path, name="m", version=2)
    with pytest.raises(OSError, match="disk full"):
        tfbn.export_saved_model(models["tfbn"], tmp_path, name="m", version=1, overwrite=True)
    # No partial version 2, no temp folder, and version 1 untouched by the failed overwrite.
    assert _listing(tmp_path / "m") == ["1"]
    after = sorted((p.relative_to(kept), p.read_bytes()) for p in kept.rglob("*") if p.is_file())
    assert after == before


def test_existing_version_refused_then_replaced_with_overwrite(models, images, tmp_path):
    first = tfbn.export_saved_model(models["tfbn"], tmp_path, name="m", version=2)
    assert first == tmp_path / "m" / "2"
    with pytest.raises(ValueError, match="already exists"):
        tfbn.export_saved_model(models["keras"], tmp_path, name="m", version=2)
    # The refused export left the first one as it was.
    np.testing.assert_allclose(
        serving.predict(first, images)["probabilities"],
        tf.nn.softmax(keras_reference(models["tfbn"], images)).numpy(),
        atol=FOLD_TOL,
    )
    again = tfbn.export_saved_model(models["keras"], tmp_path, name="m", version=2, overwrite=True)
    assert again == first and _listing(tmp_path / "m") == ["2"]
    np.testing.assert_allclose(
        serving.predict(again, images)["probabilities"],
        tf.nn.softmax(keras_reference(models["keras"], images)).numpy(),
        atol=FOLD_TOL,
    )


def test_next_free_version(models, tmp_path):
    root = tmp_path / "m"
    assert tfbn.export_saved_model(models["tfbn"], tmp_path, name="m") == root / "1"
    (root / "7").mkdir()
    (root / "notes").mkdir()
    (root / "12.txt").write_text("not a version")
    assert tfbn.export_saved_model(models["tfbn"], tmp_path, name="m") == root / "8"
    assert _listing(root) == ["1", "12.txt", "7", "8", "notes"]


def test_folding_refuses_when_outputs_differ(models, tmp_path, monkeypatch):
    real = folding.folded_weights

    def corrupt(producer, bn):
        weights = real(producer, bn)
        weights["kernel"] = weights["kernel"].copy()
        weights["kernel"].flat[0] += 0.5
        return weights

    monkeypatch.setattr(folding, "folded_weights", corrupt)
    with pytest.raises(ValueError, match="Folded model: outputs differ"):
        tfbn.export_saved_model(models["tfbn"], tmp_path, name="m")
    assert not (tmp_path / "m").exists() or _listing(tmp_path / "m") == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"version": 0}, "`version`"),
        ({"version": 1.5}, "`version`"),
        ({"version": True}, "`version`"),
        ({"version": "1"}, "`version`"),
        ({"name": "a/b"}, "`name`"),
        ({"name": ""}, "`name`"),
        ({"name": ".."}, "`name`"),
        ({"name": "../escaped"}, "`name`"),
        ({"name": "/tmp/escaped"}, "`name`"),
        ({"name": ".hidden"}, "`name`"),
        ({"name": "nul\0byte"}, "`name`"),
        ({"pixel_range": (1.0, 0.0)}, "`pixel_range`"),
        ({"pixel_range": (0.0, float("nan"))}, "`pixel_range`"),
        ({"check_data": np.zeros((3, 27, 28), np.uint8)}, "`check_data`"),
        ({"check_data": np.zeros((3, 28, 28), np.int64)}, "`check_data`"),
        ({"class_names": ("a", "b")}, "`class_names` must be 10 strings"),
    ],
)
def test_bad_arguments_are_refused_before_writing(models, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tfbn.export_saved_model(models["tfbn"], tmp_path / "exports", **kwargs)
    assert _listing(tmp_path) == []  # nothing created, not even the export folder


def test_check_data_is_used(models, images, tmp_path, monkeypatch):
    seen = []
    real = export._check_close

    def spy(reference, candidate, what, hint=""):
        seen.append((what, reference.shape))
        return real(reference, candidate, what, hint)

    monkeypatch.setattr(export, "_check_close", spy)
    tfbn.export_saved_model(models["tfbn"], tmp_path, check_data=images[:5])
    assert seen == [("Folded model", (5, 10)), ("Exported SavedModel", (5, 10))]


# ------------------------------------------------------------------------------- the CLIs


def test_export_cli_writes_a_version(models, images, tmp_path, capsys):
    path = tmp_path / "model.keras"
    models["tfbn"].save(path)
    code = cli.main(
        ["export", str(path), "--export-dir", str(tmp_path / "out"), "--name", "cli",
         "--version", "5", "--no-fold"]
    )  # fmt: skip
    assert code == 0
    target = tmp_path / "out" / "cli" / "5"
    assert str(target) in capsys.readouterr().out
    logits = tf.saved_model.load(str(target)).signatures["serving_uint8_2d"](
        images=tf.constant(images)
    )["logits"]
    np.testing.assert_allclose(logits, keras_reference(models["tfbn"], images), atol=UNFOLDED_TOL)
    assert cli.main(["export", str(path), "--export-dir", str(tmp_path / "out"), "--name", "cli",
                     "--version", "5"]) == 2  # fmt: skip
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path / "missing.keras")]) == 2
    idx = tmp_path / "check-idx3-ubyte"
    write_idx(idx, images[:9])
    code = cli.main(["export", str(path), "--export-dir", str(tmp_path / "out"), "--name", "cli",
                     "--check-data", str(idx)])  # fmt: skip
    assert code == 0 and (tmp_path / "out" / "cli" / "6" / "saved_model.pb").is_file()


def test_xla_compiled_export_matches_predict(models, images, tmp_path):
    path = tfbn.export_saved_model(models["keras"], tmp_path, jit_compile=True)
    logits = tf.saved_model.load(str(path)).signatures["serving_default"](
        images=tf.constant(images[..., None])
    )["logits"]
    np.testing.assert_allclose(
        logits, keras_reference(models["keras"], images), rtol=0, atol=FOLD_TOL
    )


def test_mixed_precision_model_exports_unfolded_and_explains_folding(images, tmp_path):
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = tfbn.lenet("tfbn")
    randomize_batch_norms(model, np.random.default_rng(3))
    with pytest.raises(ValueError, match=r"computes in float16.*--no-fold"):
        tfbn.export_saved_model(model, tmp_path, name="mp")
    path = tfbn.export_saved_model(model, tmp_path, name="mp", fold=False)
    logits = tf.saved_model.load(str(path)).signatures["serving_uint8_2d"](
        images=tf.constant(images)
    )["logits"]
    assert logits.dtype == tf.float32
    np.testing.assert_allclose(logits, keras_reference(model, images), rtol=0, atol=UNFOLDED_TOL)


def test_nested_models_are_folded_inside(models, images):
    inner = models["tfbn"]
    inputs = keras.Input((28, 28, 1))
    outer = keras.Model(inputs, keras.layers.Activation("linear")(inner(inputs)))
    folded = folding.fold_batch_norm(outer)
    folded_inner = folded.get_layer(inner.name)
    assert isinstance(folded_inner, keras.Sequential)
    assert [type(layer).__name__ for layer in folded_inner.layers].count("FoldedAway") == 4
    np.testing.assert_allclose(
        folded.predict(images[..., None] / 255.0, verbose=0),
        keras_reference(inner, images),
        rtol=0,
        atol=FOLD_TOL,
    )


def test_a_subclassed_model_exports_unfolded(images, tmp_path):
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(10)

        def call(self, x):
            return self.dense(keras.ops.reshape(x, (-1, 784)))

    net = Net()
    net(np.zeros((1, 28, 28, 1), np.float32))  # built on its input shape
    with pytest.raises(ValueError, match="Sequential or functional"):
        folding.fold_batch_norm(net)
    with pytest.raises(ValueError, match="Sequential or functional"):
        tfbn.export_saved_model(net, tmp_path, fold=True)
    path = tfbn.export_saved_model(net, tmp_path, fold=False)
    served = tf.saved_model.load(str(path)).signatures["serving_default"]
    logits = served(images=tf.constant(images[..., None]))["logits"]
    np.testing.assert_allclose(logits, keras_reference(net, images), rtol=0, atol=UNFOLDED_TOL)


def test_export_refused_when_the_written_model_differs(models, tmp_path, monkeypatch):
    real = export._serving_module

    def wrong_model(model, *args):
        return real(models["keras"], *args)  # serves another model's weights

    monkeypatch.setattr(export, "_serving_module", wrong_model)
    with pytest.raises(ValueError, match="Exported SavedModel: outputs differ"):
        tfbn.export_saved_model(models["tfbn"], tmp_path, name="m", fold=False)
    assert _listing(tmp_path / "m") == []


# ----------------------------------------------------------------------- any classifier's input


def _classifier(input_shape, head=None, rng=None):
    """A small classifier of any input shape: BN, flatten, dense; `head` adds a final softmax."""
    rng = rng or np.random.default_rng(5)
    inputs = keras.Input(input_shape)
    x = keras.layers.BatchNormalization(name="bn_in")(inputs)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(8, name="dense")(x)
    x = tfbn.BatchNorm(name="bn")(x)
    if head == "dense":
        outputs = keras.layers.Dense(4, activation="softmax", name="head")(x)
    else:
        outputs = keras.layers.Dense(4, name="head")(x)
        if head == "activation":
            outputs = keras.layers.Activation("softmax")(outputs)
        elif head == "softmax_layer":
            outputs = keras.layers.Softmax()(outputs)
    model = keras.Model(inputs, outputs)
    randomize_batch_norms(model, rng)
    for variable in model.get_layer("head").variables:
        variable.assign(rng.normal(0.0, 2.0, variable.shape))  # confident: softmax twice shows
    return model


def _signature_specs(path):
    loaded = tf.saved_model.load(str(path))
    specs = {}
    for name, function in loaded.signatures.items():
        (spec,) = function.structured_input_signature[1].values()
        specs[name] = (spec.dtype.name, tuple(spec.shape))
    return loaded, specs


@pytest.mark.parametrize(
    "input_shape, expected",
    [
        ((12, 12, 3), {"serving_default": ("uint8", (None, 12, 12, 3)),
                       "serving_float": ("float32", (None, 12, 12, 3))}),
        ((1, 12, 10), {"serving_default": ("uint8", (None, 1, 12, 10)),
                       "serving_uint8_2d": ("uint8", (None, 12, 10)),
                       "serving_float": ("float32", (None, 1, 12, 10))}),
        ((10, 12), {"serving_default": ("uint8", (None, 10, 12)),
                    "serving_float": ("float32", (None, 10, 12))}),
        ((20,), {"serving_default": ("float32", (None, 20)),
                 "serving_float": ("float32", (None, 20))}),
        ((5, 6, 7), {"serving_default": ("float32", (None, 5, 6, 7)),
                     "serving_float": ("float32", (None, 5, 6, 7))}),
    ],
    ids=["rgb", "channels-first-gray", "gray-2d", "features", "not-an-image"],
)  # fmt: skip
def test_signatures_follow_the_model_input(input_shape, expected, tmp_path):
    model = _classifier(input_shape)
    path = tfbn.export_saved_model(model, tmp_path)
    loaded, specs = _signature_specs(path)
    assert specs == expected
    x = np.random.default_rng(0).uniform(0.0, 1.0, (6, *input_shape)).astype(np.float32)
    logits = loaded.signatures["serving_float"](images=tf.constant(x))["logits"]
    np.testing.assert_allclose(logits, model.predict(x, verbose=0), rtol=0, atol=FOLD_TOL)
    if "serving_uint8_2d" in expected:
        pixels = (x * 255).astype(np.uint8)
        flat = loaded.signatures["serving_uint8_2d"](images=tf.constant(pixels[:, 0]))["logits"]
        full = loaded.signatures["serving_default"](images=tf.constant(pixels))["logits"]
        np.testing.assert_allclose(flat, full, rtol=0, atol=1e-5)


def test_pixel_range_maps_uint8_pixels_for_the_model(tmp_path):
    model = _classifier((12, 12, 3))
    path = tfbn.export_saved_model(model, tmp_path, pixel_range=(-1.0, 1.0))
    pixels = np.random.default_rng(1).integers(0, 256, (5, 12, 12, 3)).astype(np.uint8)
    served = tf.saved_model.load(str(path)).signatures["serving_default"]
    logits = served(images=tf.constant(pixels))["logits"]
    expected = model.predict(pixels.astype(np.float32) / 127.5 - 1.0, verbose=0)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=FOLD_TOL)


@pytest.mark.parametrize("head", ["activation", "dense", "softmax_layer"])
@pytest.mark.parametrize("fold", [True, False], ids=["folded", "unfolded"])
def test_a_final_softmax_is_not_applied_twice(head, fold, tmp_path):
    model = _classifier((6, 6, 1), head=head)
    x = np.random.default_rng(2).uniform(0.0, 1.0, (16, 6, 6, 1)).astype(np.float32)
    expected = model.predict(x, verbose=0)
    assert expected.max() > 0.5  # confident enough that a second softmax would flatten it
    path = tfbn.export_saved_model(model, tmp_path, fold=fold)
    out = tf.saved_model.load(str(path)).signatures["serving_float"](images=tf.constant(x))
    np.testing.assert_allclose(out["probabilities"], expected, rtol=0, atol=1e-5)
    # The logits are the values the softmax took: the model without its last step.
    np.testing.assert_allclose(tf.nn.softmax(out["logits"]), expected, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(out["class_id"], expected.argmax(-1))


def test_a_subclassed_model_ending_in_softmax_is_detected(tmp_path):
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(4)

        def call(self, x):
            return keras.ops.softmax(self.dense(keras.ops.reshape(x, (-1, 20))) * 3.0)

    net = Net()
    net(np.zeros((1, 20), np.float32))
    x = np.random.default_rng(3).normal(size=(8, 20)).astype(np.float32)
    path = tfbn.export_saved_model(net, tmp_path, fold=False)
    out = tf.saved_model.load(str(path)).signatures["serving_default"](images=tf.constant(x))
    expected = net.predict(x, verbose=0)
    assert expected.max() > 0.5
    np.testing.assert_allclose(out["probabilities"], expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out["logits"], np.log(expected), rtol=1e-5, atol=1e-5)


def test_class_names_only_when_given(exports, served_without_tfbn):
    named, unnamed = served_without_tfbn["tfbn", True], served_without_tfbn["keras", True]
    assert "serving_default/class_name" in named and "class_names" in named
    assert not any(key.endswith("class_name") or key == "class_names" for key in unnamed)
    assert not hasattr(tf.saved_model.load(str(exports["keras", True])), "class_names")

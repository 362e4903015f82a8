"""The user's own data (`tfbn.workflow.user_data`, `--data`): each kind read as NumPy or PIL read
it, bad data told in one line with the path before any model pass, and `tfbn recalibrate --data`
on a model that is not LeNet."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap
import zipfile

import keras
import numpy as np
import pytest
from PIL import Image

from tfbn import cli
from tfbn.workflow.config import DEFAULT_DATA_DIR
from tfbn.workflow.user_data import check_data_path, load_user_data

SHAPE = (6, 5, 3)


def _one_line_error(kind, call, *words) -> str:
    with pytest.raises(kind) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message, message
    for word in words:
        assert str(word) in message, (word, message)
    return message


# ----------------------------------------------------------------------------------- the kinds
def test_npy_inputs_as_float32_and_rescaled(tmp_path, rng):
    x = rng.integers(0, 256, (7, *SHAPE)).astype(np.uint8)
    np.save(tmp_path / "x.npy", x)
    loaded, labels = load_user_data(tmp_path / "x.npy", input_shape=SHAPE)
    assert loaded.dtype == np.float32 and labels is None
    np.testing.assert_array_equal(loaded, x.astype(np.float64))
    scaled, _ = load_user_data(tmp_path / "x.npy", input_shape=SHAPE, rescale=1 / 255)
    np.testing.assert_allclose(scaled, x / 255.0, rtol=1e-6)


def test_npz_inputs_and_labels_and_unknown_sizes(tmp_path, rng):
    x, y = rng.normal(size=(9, *SHAPE)), rng.integers(0, 4, 9).astype(np.int32)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    loaded, labels = load_user_data(tmp_path / "d.npz", input_shape=(None, None, 3))
    np.testing.assert_allclose(loaded, x.astype(np.float32), rtol=0)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, y)
    np.savez(tmp_path / "x_only.npz", x=x)
    assert load_user_data(tmp_path / "x_only.npz", input_shape=SHAPE)[1] is None


def _write_png(path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.mark.parametrize("channels", [1, 3])
def test_a_folder_of_class_folders(tmp_path, rng, channels):
    # Two classes (sorted names: labels 0 and 1), two images each, at the model's size.
    shape = (SHAPE[0], SHAPE[1], channels)
    written = {}
    for label, folder in enumerate(["ants", "bees"]):
        for name in ("a.png", "b.png"):
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            _write_png(tmp_path / folder / name, pixels[..., 0] if channels == 1 else pixels)
            written[(label, name)] = pixels
    x, y = load_user_data(tmp_path, input_shape=shape)
    assert x.shape == (4, *shape) and x.dtype == np.float32
    np.testing.assert_array_equal(y, [0, 0, 1, 1])
    # The pixels PIL reads back from each file, in the same order (class, then file name).
    for i, key in enumerate(sorted(written)):
        reference = np.asarray(Image.open(tmp_path / ["ants", "bees"][key[0]] / key[1]))
        reference = reference.reshape(shape).astype(np.float32)
        np.testing.assert_array_equal(x[i], reference)
    np.testing.assert_array_equal(x, np.stack([written[k] for k in sorted(written)]))


def test_a_folder_of_images_is_resized_and_may_have_no_classes(tmp_path):
    # A uniform image keeps its colour when resized (any interpolation), whatever its size.
    colours = {"one.png": (10, 200, 30), "two.png": (250, 0, 128)}
    for name, colour in colours.items():
        _write_png(tmp_path / name, np.full((17, 23, 3), colour, np.uint8))
    x, y = load_user_data(tmp_path, input_shape=SHAPE, rescale=0.5)
    assert y is None and x.shape == (2, *SHAPE)
    for image, colour in zip(x, colours.values(), strict=True):
        np.testing.assert_allclose(image, np.broadcast_to(np.multiply(colour, 0.5), SHAPE))


def _idx_images(path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    return np.frombuffer(data, np.uint8, offset=16).reshape(-1, 28, 28)


def _idx_labels(path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        return np.frombuffer(handle.read(), np.uint8, offset=8)


def test_a_tfds_split_read_offline(tfds_dir):
    x, y = load_user_data(
        "tfds:fashion_mnist_local:test[:40]", input_shape=(28, 28, 1), tfds_dir=tfds_dir
    )
    images = _idx_images(os.path.join(DEFAULT_DATA_DIR, "t10k-images-idx3-ubyte.gz"))[:40]
    labels = _idx_labels(os.path.join(DEFAULT_DATA_DIR, "t10k-labels-idx1-ubyte.gz"))[:40]
    np.testing.assert_array_equal(x[..., 0], images.astype(np.float32))
    np.testing.assert_array_equal(y, labels)


# ------------------------------------------------------------------------------------ bad data
def test_bad_data_is_one_line_with_the_path(tmp_path, rng):
    def error(kind, path, *words, shape=SHAPE, **kwargs):
        return _one_line_error(
            kind, lambda: load_user_data(path, input_shape=shape, **kwargs), *words
        )

    error(FileNotFoundError, tmp_path / "absent.npy", "absent.npy")
    (tmp_path / "empty").mkdir()
    error(ValueError, tmp_path / "empty", "empty", "is empty")
    (tmp_path / "text.npy").write_text("not an array")
    error(ValueError, tmp_path / "text.npy", "text.npy", "not a NumPy array file")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    error(ValueError, tmp_path / "objects.npy", "objects.npy", "not a NumPy array file")
    (tmp_path / "table.csv").write_text("1,2\n")
    error(ValueError, tmp_path / "table.csv", "table.csv", ".npy")
    np.save(tmp_path / "gray.npy", np.zeros((3, 6, 5, 1)))
    error(ValueError, tmp_path / "gray.npy", "gray.npy", "(6, 5, 1)", "(6, 5, 3)")
    np.save(tmp_path / "none.npy", np.zeros((0, *SHAPE)))
    error(ValueError, tmp_path / "none.npy", "none.npy", "no examples")
    nan = np.zeros((3, *SHAPE))
    nan[1, 2, 3, 0] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    error(ValueError, tmp_path / "nan.npy", "nan.npy", "non-finite")
    np.save(tmp_path / "big.npy", np.full((2, *SHAPE), 1e30))
    error(ValueError, tmp_path / "big.npy", "big.npy", "non-finite", rescale=1e10)
    np.savez(tmp_path / "short.npz", x=np.zeros((4, *SHAPE)), y=np.arange(3))
    error(ValueError, tmp_path / "short.npz", "short.npz", "4 inputs but 3 labels")
    np.savez(tmp_path / "float_y.npz", x=np.zeros((2, *SHAPE)), y=np.array([0.5, 1.0]))
    error(ValueError, tmp_path / "float_y.npz", "float_y.npz", "integers")
    np.savez(tmp_path / "no_x.npz", inputs=np.zeros((2, *SHAPE)))
    error(ValueError, tmp_path / "no_x.npz", "no_x.npz", "['inputs']", "`x`")
    error(ValueError, "tfds:mnist", "tfds:NAME:SPLIT", "'tfds:mnist'")
    error(ValueError, tmp_path / "objects.npy", "rescale", rescale=0)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no images")
    error(ValueError, tmp_path / "notes", "notes", "no images")
    _write_png(tmp_path / "pngs" / "a.png", np.zeros((4, 4, 3), np.uint8))
    error(ValueError, tmp_path / "pngs", "(5, 3)", shape=(5, 3))


def test_a_missing_tfds_dataset_is_one_line(tmp_path):
    _one_line_error(
        ValueError,
        lambda: load_user_data("tfds:no_such_set:test", input_shape=SHAPE, tfds_dir=tmp_path),
        "tfds:no_such_set:test",
        str(tmp_path),
    )


def test_the_path_check_imports_no_tensorflow(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((1, 2)))
    code = """
        import json, sys
        from tfbn.workflow.user_data import check_data_path
        errors = []
        for path in sys.argv[1:]:
            try:
                check_data_path(path)
                errors.append(None)
            except (OSError, ValueError) as error:
                errors.append(type(error).__name__)
        print(json.dumps({"errors": errors, "tf": "tensorflow" in sys.modules}))
    """
    argv = [str(tmp_path / "x.npy"), str(tmp_path / "absent.npz"), "tfds:a:b", "tfds:a"]
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(done.stdout)
    assert result == {"errors": [None, "FileNotFoundError", None, "ValueError"], "tf": False}
    check_data_path(tmp_path)  # a folder that is not empty


# ------------------------------------------------------------------------------------- the CLI
def _one_batch_norm_model(path) -> keras.Model:
    inputs = keras.Input((32, 32, 3))
    model = keras.Model(inputs, keras.layers.BatchNormalization(name="bn")(inputs))
    model.save(path)
    return model


@pytest.mark.parametrize("kind", ["npy", "npz"])
def test_recalibrate_a_model_that_is_not_lenet_on_the_users_data(tmp_path, rng, capsys, kind):
    _one_batch_norm_model(tmp_path / "model.keras")
    x = rng.normal(3.0, 2.0, (70, 32, 32, 3)) * np.array([1.0, 0.1, 10.0])
    if kind == "npy":
        np.save(tmp_path / "x.npy", x.astype(np.float32))
    else:  # labels are not needed, but accepted
        np.savez(tmp_path / "x.npz", x=x.astype(np.float32), y=np.arange(70))
    argv = ["recalibrate", str(tmp_path / "model.keras"), "--data", str(tmp_path / f"x.{kind}")]
    argv += ["--output", str(tmp_path / "out.keras"), "--batch-size", "32", "--verbose", "0"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out.keras")
    layer = keras.saving.load_model(tmp_path / "out.keras").get_layer("bn")
    reference = x.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(layer.moving_mean.numpy(), reference.mean((0, 1, 2)), rtol=1e-6)
    # Per-batch sums in float32 (tfbn.tools.recalibration), merged in float64.
    np.testing.assert_allclose(layer.moving_variance.numpy(), reference.var((0, 1, 2)), rtol=2e-5)


def test_recalibrate_refuses_data_that_do_not_fit_before_any_pass(tmp_path, capsys):
    _one_batch_norm_model(tmp_path / "model.keras")
    np.save(tmp_path / "x.npy", np.zeros((4, 28, 28, 1), np.float32))
    argv = ["recalibrate", str(tmp_path / "model.keras"), "--data", str(tmp_path / "x.npy")]
    assert cli.main(argv) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("tfbn recalibrate: error: Argument `data`")
    assert "(28, 28, 1)" in line and "(32, 32, 3)" in line
    assert not (tmp_path / "model.recalibrated.keras").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["recalibrate", "m.keras", "--dat", "x.npy"],
        ["recalibrate", "m.keras", "--resc", "2"],
        ["train", "--data", "folder"],  # not --data-dir
        ["--vers"],
    ],
)
def test_abbreviated_options_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    assert exit.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_rescale_takes_a_fraction():
    args = cli.build_parser().parse_args(["recalibrate", "m.keras", "--rescale", "1/255"])
    assert args.rescale == pytest.approx(1 / 255, rel=1e-15)


_CHILD = """
import contextlib, io, json, sys
from tfbn import cli
err = io.StringIO()
with contextlib.redirect_stderr(err):
    code = cli.main(sys.argv[1:])
print(json.dumps({"code": code, "stderr": err.getvalue(), "tf": "tensorflow" in sys.modules}))
"""


@pytest.mark.parametrize(
    ("command", "extra", "words"),
    [
        ("recalibrate", ["--data", "{tmp}/absent.npy"], "{tmp}/absent.npy: No such file"),
        ("recalibrate", ["--data", "{tmp}/empty"], "the folder '{tmp}/empty' is empty"),
        ("recalibrate", ["--rescale", "2"], "Argument `rescale` applies to the inputs of --data"),
        ("export", ["--data", "tfds:mnist"], "tfds:NAME:SPLIT"),
        ("export", ["--data", "{tmp}/x.csv"], "{tmp}/x.csv"),
    ],
)
def test_bad_data_arguments_exit_2_before_tensorflow_is_imported(tmp_path, command, extra, words):
    model = tmp_path / "m.keras"
    _zip_keras_file(model)
    (tmp_path / "empty").mkdir()
    (tmp_path / "x.csv").write_text("1,2\n")
    argv = [command, str(model), *(a.format(tmp=tmp_path) for a in extra)]
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, *argv],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["code"] == 2
    (line,) = result["stderr"].splitlines()
    assert line.startswith(f"tfbn {command}: ") and words.format(tmp=tmp_path) in line
    assert not result["tf"]


def _zip_keras_file(path) -> None:
    """A `.keras` archive that passes the TensorFlow-free file check (no model is built)."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", json.dumps({"class_name": "Functional"}))


def test_export_checks_on_the_users_data(tmp_path, rng, monkeypatch, capsys):
    from tfbn.workflow import model_files

    _one_batch_norm_model(tmp_path / "model.keras")
    x = rng.uniform(0, 255, (5, 32, 32, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    given = []
    monkeypatch.setattr(
        model_files,
        "export_saved_model",
        lambda model, directory, **kwargs: given.append(kwargs["check_data"]) or directory,
    )
    argv = ["export", str(tmp_path / "model.keras"), "--export-dir", str(tmp_path / "out")]
    assert cli.main([*argv, "--data", str(tmp_path / "x.npy"), "--rescale", "1/255"]) == 0
    np.testing.assert_allclose(given[0], x / 255.0, rtol=1e-6)
    np.save(tmp_path / "small.npy", x[:, :16])
    assert cli.main([*argv, "--data", str(tmp_path / "small.npy")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "(16, 32, 3)" in line and "(32, 32, 3)" in line and len(given) == 1

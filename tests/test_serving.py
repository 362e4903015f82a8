"""Serving an exported SavedModel: `tfbn.predict`, `tfbn predict` and the throughput measurement.

The reference is the Keras model that was exported (`model.predict` on float32 inputs scaled by
1/255); the model is a briefly trained LeNet with randomized batch-norm variables, exported folded
and unfolded.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import tensorflow as tf
from model_helpers import keras_reference, lenets, structured_images, write_idx

import tfbn
from tfbn import cli
from tfbn.workflow import serving
from tfbn.workflow.config import CLASS_NAMES


@pytest.fixture(scope="module")
def models():
    return lenets(np.random.default_rng(0))


@pytest.fixture(scope="module")
def exports(models, tmp_path_factory):
    """(kind, fold) -> version folder written by export_saved_model."""
    base = tmp_path_factory.mktemp("exports")
    return {
        (kind, fold): tfbn.export_saved_model(
            models[kind],
            base,
            name=f"{kind}_{'folded' if fold else 'unfolded'}",
            fold=fold,
            class_names=CLASS_NAMES,
        )
        for kind, fold in (("tfbn", True), ("keras", False), ("keras", True))
    }


def _printed_classes(stdout):
    """label -> [(name, probability), ...] from `tfbn predict`'s lines `label: name p, ...`."""
    out = {}
    for line in stdout.strip().splitlines()[1:]:  # the first names the model
        label, ranked = line.rsplit(": ", 1)
        pairs = [item.rsplit(" ", 1) for item in ranked.split(", ")]
        out[label] = [(name, float(p)) for name, p in pairs]
    return out


def test_predict_cli_on_png_and_idx_matches_keras(models, images, exports, tmp_path, capsys):
    expected = [CLASS_NAMES[i] for i in keras_reference(models["tfbn"], images).argmax(-1)]
    gray = tmp_path / "gray.png"
    gray.write_bytes(tf.io.encode_png(images[0][..., None]).numpy())
    rgb = tmp_path / "rgb.png"  # equal channels: grayscale conversion gives the same pixels
    rgb.write_bytes(tf.io.encode_png(np.repeat(images[1][..., None], 3, -1)).numpy())
    idx = tmp_path / "few-images-idx3-ubyte.gz"
    write_idx(idx, images[2:12])
    jpeg = tmp_path / "lossy.jpg"
    jpeg.write_bytes(tf.io.encode_jpeg(images[12][..., None], quality=90).numpy())
    # JPEG changes pixels: the reference is the Keras model on the decoded JPEG.
    decoded = tf.io.decode_jpeg(jpeg.read_bytes(), channels=1).numpy()[None, ..., 0]
    expected.append(CLASS_NAMES[keras_reference(models["tfbn"], decoded).argmax()])
    model_root = exports["tfbn", True].parent  # the model folder: its latest version is served
    code = cli.main(
        ["predict", str(model_root), str(gray), str(rgb), str(idx), str(jpeg), "--top-k", "3"]
    )
    assert code == 0
    stdout = capsys.readouterr().out
    # The version served is named: the highest of the model folder.
    version = exports["tfbn", True]
    assert stdout.splitlines()[0] == f"model {version}, version {int(version.name)}"
    printed = _printed_classes(stdout)
    assert list(printed) == [str(gray), str(rgb)] + [f"{idx}[{i}]" for i in range(10)] + [str(jpeg)]
    assert [ranked[0][0] for ranked in printed.values()] == expected[:12] + expected[-1:]
    # The top 3 of each image, with the Keras model's probabilities (printed to 4 decimals).
    probabilities = tf.nn.softmax(keras_reference(models["tfbn"], images[:12])).numpy()
    for ranked, p in zip(list(printed.values())[:12], probabilities, strict=True):
        top = np.argsort(-p)[:3]
        assert [name for name, _ in ranked] == [CLASS_NAMES[i] for i in top]
        np.testing.assert_allclose([q for _, q in ranked], p[top], atol=1e-4)


def test_predict_api_returns_the_signature_outputs_as_arrays(models, images, exports):
    logits = keras_reference(models["keras"], images)
    expected = tf.nn.softmax(logits.astype(np.float64)).numpy()
    for batch in (images, images[..., None], images.astype(np.float32) / 255.0):
        out = serving.predict(exports["keras", False], batch)
        assert set(out) == {"logits", "probabilities", "class_id", "class_name"}
        assert all(isinstance(v, np.ndarray) and len(v) == len(images) for v in out.values())
        np.testing.assert_allclose(out["logits"], logits, atol=1e-5)
        np.testing.assert_allclose(out["probabilities"], expected, atol=1e-5)
        np.testing.assert_array_equal(out["class_id"], expected.argmax(-1))
        assert out["class_name"].tolist() == [CLASS_NAMES[i] for i in expected.argmax(-1)]


def test_predict_in_batches_concatenates_every_output(models, exports):
    many = np.repeat(structured_images(), 7, axis=0)[:300]  # more than one batch of 256
    out = serving.predict(exports["keras", False], many)
    alone = serving.predict(exports["keras", False], many[-10:])
    assert {key: len(value) for key, value in out.items()} == dict.fromkeys(out, 300)
    np.testing.assert_allclose(out["logits"][-10:], alone["logits"], atol=1e-6)


def test_export_without_class_names_is_served_with_class_ids(models, images, tmp_path, capsys):
    path = tfbn.export_saved_model(models["tfbn"], tmp_path, name="anonymous")
    out = serving.predict(path, images)
    assert "class_name" not in out
    png = tmp_path / "one.png"
    png.write_bytes(tf.io.encode_png(images[0][..., None]).numpy())
    assert cli.main(["predict", str(path), str(png), "--top-k", "2"]) == 0
    (ranked,) = _printed_classes(capsys.readouterr().out).values()
    top = np.argsort(-out["probabilities"][0])[:2]
    assert [name for name, _ in ranked] == [str(i) for i in top]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_bytes(tf.io.encode_png(np.zeros((32, 32, 1), np.uint8)).numpy()),
         "32x32 pixels"),
        (lambda p: write_idx(p, np.zeros((2, 28, 27))), "28x27 pixels"),
        (lambda p: p.write_bytes(bytes([0, 0, 0x0D, 3]) + bytes(12)), "holds float32"),
        (lambda p: write_idx(p, np.zeros(5)), "1 dimensions"),
        (lambda p: p.write_bytes(b"not an image at all"), "neither a PNG"),
        (lambda p: p.write_text("a text file named like an image\n"), "neither a PNG"),
        (lambda p: p.write_bytes(tf.io.encode_png(np.zeros((28, 28, 1), np.uint8)).numpy()[:40]),
         "cannot be decoded"),
        (lambda p: p.write_bytes(b"\x1f\x8b\x08\x00broken"), "is corrupt"),
        (lambda p: write_idx(p, np.zeros((3, 28, 28)))
         or p.write_bytes(p.read_bytes()[:-5]), "is corrupt"),
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "is a folder"),
    ],
    ids=["png-32x32", "idx-28x27", "idx-float", "idx-labels", "garbage", "text-as-png",
         "truncated-png", "bad-gzip", "truncated-idx", "missing", "folder"],
)  # fmt: skip
def test_predict_cli_bad_input_is_one_line_naming_it(exports, tmp_path, capsys, make, message):
    path = tmp_path / "input.png"
    make(path)
    code = cli.main(["predict", str(exports["tfbn", True]), str(path)])
    captured = capsys.readouterr()
    assert code == 2
    (line,) = captured.err.splitlines()
    assert line.startswith("tfbn predict: error:") and message in line and str(path) in line
    # Nothing of TensorFlow's op text, nothing printed as a result.
    assert "{{" not in line and "function_node" not in line and "Traceback" not in captured.err
    assert captured.out == ""


# Runs `tfbn predict` for every case of argv[1] (JSON argv lists) in one fresh interpreter; reports
# each exit code and stderr, and whether TensorFlow was imported by the end.
_EARLY = """
import contextlib, io, json, sys
from tfbn import cli
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        results.append((cli.main(["predict", *argv]), err.getvalue()))
print(json.dumps({"results": results, "tf": "tensorflow" in sys.modules}))
"""


def test_predict_cli_refuses_a_bad_request_before_importing_tensorflow(tmp_path):
    versions = tmp_path / "lenet"
    (versions / "3").mkdir(parents=True)
    (versions / "3" / "saved_model.pb").write_bytes(b"")  # only its presence is checked
    (versions / "notes").mkdir()
    image = tmp_path / "image.png"
    image.write_bytes(b"")
    folder = tmp_path / "images"
    folder.mkdir()
    cases = {
        "model folder missing": ([f"{tmp_path}/absent", str(image)], f"{tmp_path}/absent"),
        "model folder a file": ([str(image), str(image)], str(image)),
        "no SavedModel": ([str(versions / "notes"), str(image)], "no saved_model.pb"),
        "input missing": ([str(versions), f"{tmp_path}/absent.png"], "does not exist"),
        "input a folder": ([str(versions / "3"), str(folder)], "is a folder"),
        "top-k 0": ([str(versions), str(image), "--top-k", "0"], "--top-k"),
    }
    done = subprocess.run(
        [sys.executable, "-c", _EARLY, json.dumps([argv for argv, _ in cases.values()])],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["tf"] is False
    for (name, (_, words)), (code, err) in zip(cases.items(), report["results"], strict=True):
        assert code == 2, name
        (line,) = err.splitlines()
        assert line.startswith("tfbn predict: error:") and words in line, (name, line)


_UNREADABLE_INPUT = """
import gettext, locale, os, sys
import tensorflow
import tfbn.cli.predict, tfbn.workflow.serving
from tfbn import cli
# Everything imported first, every command's module too (the interpreter's and the checkout's
# files may be readable by root only); then the process becomes nobody, for whom the root-owned
# input of mode 0600 cannot be read.
cli.build_parser()
os.setgid(65534)
os.setuid(65534)
sys.exit(cli.main(["predict", sys.argv[1], sys.argv[2]]))
"""


def test_unreadable_input_is_one_line_with_its_path_before_the_model_loads(images, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root, to run the command as another user")
    folder = pathlib.Path(tempfile.mkdtemp(prefix="tfbn-unreadable-"))
    try:
        folder.chmod(0o755)
        model = folder / "model"
        model.mkdir()
        # Not a loadable model: the input must be read (and refused) before the model is loaded.
        (model / "saved_model.pb").write_bytes(b"")
        secret = folder / "image.png"
        secret.write_bytes(tf.io.encode_png(images[0][..., None]).numpy())
        secret.chmod(0o600)
        env = dict(os.environ, HOME=str(folder))
        result = subprocess.run(
            [sys.executable, "-c", _UNREADABLE_INPUT, str(model), str(secret)],
            capture_output=True, text=True, timeout=300, env=env, cwd=folder,
        )  # fmt: skip
    finally:
        shutil.rmtree(folder)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.splitlines()[-1] == f"tfbn predict: {secret}: Permission denied"


def test_predict_api_refuses_wrong_shape_and_dtype(exports):
    with pytest.raises(ValueError, match=r"shape \(n, 28, 28, 1\)"):
        serving.predict(exports["tfbn", True], np.zeros((2, 28, 28, 3), np.uint8))
    with pytest.raises(ValueError, match="dtype=int32"):
        serving.predict(exports["tfbn", True], np.zeros((2, 28, 28), np.int32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        serving.predict(exports["tfbn", True], np.full((2, 28, 28), 3.0, np.float32))
    with pytest.raises(ValueError, match="model_dir"):
        serving.predict(exports["tfbn", True].parent.parent, np.zeros((2, 28, 28), np.uint8))


def test_inference_throughput(exports):
    rate = serving.inference_throughput(exports["tfbn", True], 4, seconds=0.2, repeats=2)
    assert rate > 0
    rate = serving.inference_throughput(
        exports["tfbn", True], 1, signature="serving_float", seconds=0.1, repeats=1
    )
    assert rate > 0
    with pytest.raises(ValueError, match="`signature`"):
        serving.inference_throughput(exports["tfbn", True], 4, signature="nope")
    with pytest.raises(ValueError, match="`batch_size`"):
        serving.inference_throughput(exports["tfbn", True], 0)


def test_removed_folder_tree_is_not_needed(exports, images, tmp_path):
    # A copied version folder serves on its own: nothing refers back to where it was written.
    copy = tmp_path / "copy" / "1"
    shutil.copytree(exports["keras", True], copy)
    np.testing.assert_array_equal(
        serving.predict(copy, images)["logits"],
        serving.predict(exports["keras", True], images)["logits"],
    )
    assert serving.load_model(copy).version == 1

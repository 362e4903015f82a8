"""Serving an exported SavedModel: `tfbn.predict`, `tfbn predict` and the throughput measurement.

The reference is the Keras model that was exported (`model.predict` on float32 inputs scaled by
1/255); the model is a briefly trained LeNet with randomized batch-norm variables, exported folded
and unfolded.
"""

import shutil

import numpy as np
import pytest
import tensorflow as tf
from model_helpers import keras_reference, lenet, structured_images, write_idx

import tfbn
from tfbn import cli, serving
from tfbn.config import CLASS_NAMES


@pytest.fixture(scope="module")
def images():
    return structured_images()


@pytest.fixture(scope="module")
def models():
    rng = np.random.default_rng(0)
    return {"tfbn": lenet("tfbn", rng), "keras": lenet("keras", rng, use_bias=False)}


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
    for line in stdout.strip().splitlines():
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
    printed = _printed_classes(capsys.readouterr().out)
    assert list(printed) == [str(gray), str(rgb)] + [f"{idx}[{i}]" for i in range(10)] + [str(jpeg)]
    assert [ranked[0][0] for ranked in printed.values()] == expected[:12] + expected[-1:]
    # The top 3 of each image, with the Keras model's probabilities (printed to 4 decimals).
    probabilities = tf.nn.softmax(keras_reference(models["tfbn"], images[:12])).numpy()
    for ranked, p in zip(list(printed.values())[:12], probabilities, strict=True):
        top = np.argsort(-p)[:3]
        assert [name for name, _ in ranked] == [CLASS_NAMES[i] for i in top]
        np.testing.assert_allclose([q for _, q in ranked], p[top], atol=1e-4)


def test_predict_api_matches_keras(models, images, exports):
    expected = tf.nn.softmax(keras_reference(models["keras"], images)).numpy()
    for batch in (images, images[..., None], images.astype(np.float32) / 255.0):
        results = serving.predict(exports["keras", False], batch)
        assert [name for name, _ in results] == [CLASS_NAMES[i] for i in expected.argmax(-1)]
        np.testing.assert_allclose(np.array([p for _, p in results]), expected, atol=1e-5)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_bytes(tf.io.encode_png(np.zeros((32, 32, 1), np.uint8)).numpy()),
         "32x32 pixels"),
        (lambda p: write_idx(p, np.zeros((2, 28, 27))), "28x27 pixels"),
        (lambda p: p.write_bytes(bytes([0, 0, 0x0D, 3]) + bytes(12)), "float32 values"),
        (lambda p: write_idx(p, np.zeros(5)), "1 dimensions"),
        (lambda p: p.write_bytes(b"not an image at all"), "neither a PNG"),
        (lambda p: p.write_bytes(b"\x1f\x8b\x08\x00broken"), "corrupt gzip"),
        (lambda p: None, "does not exist"),
    ],
    ids=["png-32x32", "idx-28x27", "idx-float", "idx-labels", "garbage", "bad-gzip", "missing"],
)  # fmt: skip
def test_predict_cli_bad_input_is_a_clear_error(exports, tmp_path, capsys, make, message):
    path = tmp_path / "input.bin"
    make(path)
    code = cli.main(["predict", str(exports["tfbn", True]), str(path)])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("tfbn predict: error:") and message in captured.err
    assert captured.out == ""


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
        [n for n, _ in serving.predict(copy, images)],
        [n for n, _ in serving.predict(exports["keras", True], images)],
    )

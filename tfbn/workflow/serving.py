"""Classify images with an exported SavedModel (`tfbn predict`), and measure its throughput.

Everything here uses TensorFlow and the SavedModel's signatures only (see `tfbn.tools.export`): it
serves any export of `tfbn.export_saved_model`, without the Keras model.

Input files for `tfbn predict`:

- PNG, JPEG, GIF or BMP images, decoded with `tf.io.decode_image` to 8 bits per channel. A colour
  image is converted to grayscale (`tf.image.rgb_to_grayscale`, ITU-R BT.601 weights); an alpha
  channel is dropped, not composited. Images are not resized: they must already have the model's
  size (28x28 for LeNet), drawn as Fashion-MNIST is (light object on a black background).
- IDX image files (`idx3-ubyte`, the Fashion-MNIST format), optionally gzipped: unsigned bytes,
  shape `(n, height, width)`, read by `tfbn.workflow.data.read_idx`. Each image is reported as
  `FILE[i]`.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import statistics
import time

import numpy as np
import tensorflow as tf

from tfbn.utils.arguments import check_count
from tfbn.utils.errors import UsageError
from tfbn.workflow.config import CLASS_NAMES
from tfbn.workflow.requests import check_inputs, check_top_k, resolve_model_dir

__all__ = [
    "FilePredictions",
    "ServedModel",
    "inference_throughput",
    "load_images",
    "load_model",
    "predict",
    "predict_files",
    "resolve_model_dir",
    "top_k",
]

_BATCH_SIZE = 256
# The first bytes of the image formats `tf.io.decode_image` reads.
_IMAGE_MAGIC = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
}
_GZIP_MAGIC = b"\x1f\x8b"
_IDX_MAGIC = b"\x00\x00"


# ------------------------------------------------------------------------------------ the model
@dataclasses.dataclass(frozen=True)
class ServedModel:
    """An exported SavedModel, loaded.

    Attributes:
        path: The SavedModel folder (a version folder, e.g. `saved_models/lenet/3`).
        version: The version number (the folder's name) when it is a number, else `None`.
        loaded: What `tf.saved_model.load` returned: its `signatures` serve.
        class_names: The class names stored in the export; an export without names names its
            classes by their ids (`"0"`, `"1"`, ...).
        image_shape: The shape of one input of `serving_default` (without the batch axis), e.g.
            `(28, 28, 1)`.
    """

    path: pathlib.Path
    version: int | None
    loaded: object
    class_names: tuple[str, ...]
    image_shape: tuple[int, ...]

    def describe(self) -> str:
        """One line naming what is served: `model saved_models/lenet/3, version 3`."""
        version = f", version {self.version}" if self.version is not None else ""
        return f"model {self.path}{version}"


_LOADED: dict[str, tuple[int, ServedModel]] = {}


def load_model(model_dir: str | os.PathLike) -> ServedModel:
    """Loads an exported SavedModel (its highest version for a model base folder).

    A model is loaded once per process; a re-export to the same folder is loaded again.

    Args:
        model_dir: A SavedModel folder, or a model base folder of numbered versions.

    Returns:
        The `ServedModel`.

    Raises:
        UsageError: if `model_dir` holds no SavedModel.
        OSError: if its files cannot be read (e.g. `PermissionError`), naming the file.
    """
    path = resolve_model_dir(model_dir)
    key = str(path.resolve())
    stamp = (path / "saved_model.pb").stat().st_mtime_ns
    cached = _LOADED.get(key)
    if cached is None or cached[0] != stamp:
        for name in ("saved_model.pb", "variables/variables.index"):
            if (path / name).exists():
                with open(path / name, "rb"):  # an OSError naming the file, not TensorFlow's
                    pass
        loaded = tf.saved_model.load(str(path))
        default = loaded.signatures["serving_default"]
        served = ServedModel(
            path=path,
            version=int(path.name) if path.name.isdigit() else None,
            loaded=loaded,
            class_names=_class_names(loaded, default),
            image_shape=tuple(_input_spec(default).shape[1:]),
        )
        cached = _LOADED[key] = (stamp, served)
    return cached[1]


def _signature(loaded, name: str):
    if name not in loaded.signatures:
        raise UsageError(
            f"Argument `signature` must be one of {sorted(loaded.signatures)}; received "
            f"signature={name!r}."
        )
    return loaded.signatures[name]


def _input_spec(function) -> tf.TensorSpec:
    _, kwargs = function.structured_input_signature
    return next(iter(kwargs.values()))


def _class_names(loaded, function) -> tuple[str, ...]:
    variable = getattr(loaded, "class_names", None)
    if variable is None:
        return tuple(str(i) for i in range(function.structured_outputs["logits"].shape[-1]))
    return tuple(name.decode("utf-8") for name in variable.numpy())


# ----------------------------------------------------------------------------------- prediction
def _check_float_range(images: np.ndarray) -> None:
    if not np.all(np.isfinite(images)) or images.min() < 0.0 or images.max() > 1.0:
        raise UsageError(
            "Argument `images`: float images must be finite and scaled to [0, 1]; received "
            f"values in [{images.min()}, {images.max()}]."
        )


def _pick_signature(loaded, images: np.ndarray) -> tuple[str, np.ndarray]:
    """The signature that takes `images` as they are, and the images in its dtype."""
    default = _input_spec(loaded.signatures["serving_default"])
    full = tuple(default.shape[1:])
    shape = tuple(images.shape[1:])
    takes_pixels = default.dtype == tf.uint8  # an image model: floats are scaled pixels
    if images.dtype == np.uint8 and takes_pixels:
        if shape == full:
            return "serving_default", images
        flat = loaded.signatures.get("serving_uint8_2d")
        if flat is not None and shape == tuple(_input_spec(flat).shape[1:]):
            return "serving_uint8_2d", images
    elif np.issubdtype(images.dtype, np.floating):
        if takes_pixels:
            _check_float_range(images)
        images = images.astype(np.float32)
        if shape == full:
            return "serving_float", images
        if full[-1] == 1 and shape == full[:-1]:
            return "serving_float", images[..., None]
    else:
        kinds = "uint8 (0-255) or floating point in [0, 1]" if takes_pixels else "floating point"
        raise UsageError(f"Argument `images` must be {kinds}; received dtype={images.dtype}.")
    expected = f"(n, {', '.join(map(str, full))})"
    raise UsageError(
        f"Argument `images` must have shape {expected}; received shape {images.shape}."
    )


def _as_numpy(value: tf.Tensor) -> np.ndarray:
    array = value.numpy()
    if array.dtype == object:  # tf.string: the class names, as str
        return np.array([item.decode("utf-8") for item in array.ravel()]).reshape(array.shape)
    return array


def predict(model_dir: str | os.PathLike, images) -> dict[str, np.ndarray]:
    """Classifies images with an exported SavedModel.

    Args:
        model_dir: A SavedModel folder, or a model base folder (its highest version is used).
        images: A batch of images: uint8 `(n, 28, 28)` or `(n, 28, 28, 1)` in 0-255, or floats
            in `[0, 1]` of either shape (sizes as the exported model takes them).

    Returns:
        The signature's outputs as NumPy arrays, one row per image: `logits` and `probabilities`
        (float32, `(n, classes)`, in the order of the model's classes), `class_id` (int64, `(n,)`)
        and, for an export with class names, `class_name` (str, `(n,)`).

    Raises:
        UsageError: (a `ValueError`) if `model_dir` holds no SavedModel or `images` has the wrong
            shape or dtype.
    """
    images = np.asarray(images)
    if images.ndim < 3 or images.shape[0] == 0:
        raise UsageError(
            "Argument `images` must be a non-empty batch of images, shape (n, height, width) or "
            f"(n, height, width, channels); received shape {images.shape}."
        )
    loaded = load_model(model_dir).loaded
    name, images = _pick_signature(loaded, images)
    function = loaded.signatures[name]
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(images), _BATCH_SIZE):
        outputs = function(images=tf.constant(images[start : start + _BATCH_SIZE]))
        for key, value in outputs.items():
            parts.setdefault(key, []).append(_as_numpy(value))
    return {key: np.concatenate(values) for key, values in parts.items()}


def top_k(
    probabilities: np.ndarray, k: int, class_names: tuple[str, ...] = CLASS_NAMES
) -> list[tuple[str, float]]:
    """The `k` most probable classes as `(name, probability)`, most probable first."""
    order = np.argsort(-np.asarray(probabilities), kind="stable")[:k]
    return [(class_names[i], float(probabilities[i])) for i in order]


# ---------------------------------------------------------------------------------------- files
def _decode_image(path: pathlib.Path, data: bytes) -> np.ndarray:
    """A PNG/JPEG/GIF/BMP file as a uint8 grayscale `(height, width)` array."""
    kind = next((name for magic, name in _IMAGE_MAGIC.items() if data.startswith(magic)), None)
    if kind is None:
        raise UsageError(
            f"Input {str(path)!r} is neither a PNG, JPEG, GIF or BMP image nor an IDX image file "
            "(its first bytes are none of theirs)."
        )
    try:
        image = tf.io.decode_image(data, dtype=tf.uint8, expand_animations=False)
    except (tf.errors.InvalidArgumentError, ValueError):
        raise UsageError(
            f"Input {str(path)!r} starts as a {kind} image but cannot be decoded: it is truncated "
            "or corrupt."
        ) from None
    channels = image.shape[-1]
    if channels in (2, 4):
        image = image[..., : channels - 1]
    if image.shape[-1] == 3:
        image = tf.image.rgb_to_grayscale(image)
    return image.numpy()[..., 0]


def _read_file(path: pathlib.Path) -> tuple[np.ndarray, list[str]]:
    """The images of one input file and their labels."""
    with open(path, "rb") as file:  # an unreadable file raises OSError naming it
        head = file.read(16)
    if head.startswith((_GZIP_MAGIC, _IDX_MAGIC)):
        from tfbn.workflow.data import read_idx

        batch = read_idx(path)
        if batch.ndim != 3:
            raise UsageError(
                f"IDX file {str(path)!r} has {batch.ndim} dimensions; image files have 3 "
                "(n, height, width) (is it a labels file?)."
            )
        return batch, [f"{path}[{i}]" for i in range(len(batch))]
    return _decode_image(path, path.read_bytes())[None], [str(path)]


def _check_size(path: pathlib.Path, batch: np.ndarray, image_size: tuple[int, int]) -> None:
    height, width = image_size
    if batch.shape[1:] != (height, width):
        raise UsageError(
            f"Input {str(path)!r} has images of {batch.shape[1]}x{batch.shape[2]} pixels "
            f"(height x width); the model takes {height}x{width} grayscale images. Images "
            "are not resized: crop or scale them to that size first."
        )


def load_images(paths, image_size: tuple[int, int] = (28, 28)) -> tuple[np.ndarray, list[str]]:
    """Reads image files and IDX files into one uint8 batch.

    Args:
        paths: Files: PNG/JPEG/GIF/BMP images, or IDX image files (optionally gzipped).
        image_size: `(height, width)` every image must have (no resizing is done).

    Returns:
        `(images, labels)`: uint8 array `(n, height, width)`, and one label per image (the file
        name, with `[i]` for the images of an IDX file).

    Raises:
        UsageError: (a `ValueError`) if a file is missing or a folder, cannot be decoded, or an
            image has another size.
        OSError: if a file cannot be read (its `filename` says which).
    """
    images: list[np.ndarray] = []
    labels: list[str] = []
    for path in check_inputs(paths):
        batch, names = _read_file(path)
        _check_size(path, batch, image_size)
        images.append(batch)
        labels.extend(names)
    return np.concatenate(images), labels


@dataclasses.dataclass(frozen=True)
class FilePredictions:
    """What `predict_files` found.

    Attributes:
        model: The model that classified the images (its folder and version).
        labels: One label per image: the file name, `FILE[i]` for an IDX file's images.
        top: Per image, the `k` most probable `(class name, probability)`, most probable first.
    """

    model: ServedModel
    labels: list[str]
    top: list[list[tuple[str, float]]]


def predict_files(model_dir: str | os.PathLike, inputs, *, k: int = 3) -> FilePredictions:
    """Classifies image files with an exported SavedModel (`tfbn predict`).

    The arguments are checked and the files read before the model is loaded.

    Args:
        model_dir: A SavedModel folder, or a model folder of numbered versions (latest used).
        inputs: PNG/JPEG/GIF/BMP images of the model's size, or IDX image files (`.gz` allowed).
        k: How many classes to return per image.

    Returns:
        A `FilePredictions`: the model served, and each image's label and top `k` classes.

    Raises:
        UsageError: (a `ValueError`) for a bad `k`, a missing or undecodable input, an image of
            another size, or a `model_dir` without a SavedModel.
        OSError: if an input cannot be read (its `filename` says which).
    """
    check_top_k(k)
    resolve_model_dir(model_dir)
    files = [(path, *_read_file(path)) for path in check_inputs(inputs)]
    model = load_model(model_dir)
    if k > len(model.class_names):
        raise UsageError(
            f"Argument `k` (--top-k) must be between 1 and {len(model.class_names)}; received "
            f"k={k}."
        )
    for path, batch, _ in files:
        _check_size(path, batch, model.image_shape[:2])
    labels = [label for _, _, names in files for label in names]
    images = np.concatenate([batch for _, batch, _ in files])
    probabilities = predict(model.path, images)["probabilities"]
    top = [top_k(p, k, model.class_names) for p in probabilities]
    return FilePredictions(model=model, labels=labels, top=top)


# ----------------------------------------------------------------------------------- throughput
def _fixed_batch(spec: tf.TensorSpec, batch_size: int) -> tf.Tensor:
    rng = np.random.default_rng(0)
    shape = (batch_size, *spec.shape[1:])
    if spec.dtype == tf.uint8:
        return tf.constant(rng.integers(0, 256, size=shape, dtype=np.uint8))
    return tf.constant(rng.uniform(0.0, 1.0, size=shape).astype(spec.dtype.as_numpy_dtype))


def inference_throughput(
    model_dir: str | os.PathLike,
    batch_size: int,
    *,
    signature: str = "serving_default",
    seconds: float = 2.0,
    repeats: int = 5,
) -> float:
    """Examples per second of a SavedModel signature at a given batch size.

    The signature is called on a fixed batch (after a warm-up) for `seconds` in all, split into
    `repeats` timed runs; the result is the median of the runs' rates. Each call includes the
    outputs' transfer to NumPy, as a client would see them.

    Args:
        model_dir: A SavedModel folder, or a model base folder (its highest version is used).
        batch_size: Images per call.
        signature: The signature to time.
        seconds: Total timed duration.
        repeats: Number of timed runs the median is taken over.

    Returns:
        The median examples per second.

    Raises:
        UsageError: (a `ValueError`) if an argument is invalid or `signature` is not in the
            SavedModel.
    """
    check_count("batch_size", batch_size, error=UsageError)
    if not seconds > 0:
        raise UsageError(f"Argument `seconds` must be positive; received seconds={seconds!r}.")
    check_count("repeats", repeats, error=UsageError)
    function = _signature(load_model(model_dir).loaded, signature)
    batch = _fixed_batch(_input_spec(function), batch_size)

    def call():
        return function(images=batch)["logits"].numpy()

    for _ in range(3):
        call()
    budget = seconds / repeats
    rates = []
    for _ in range(repeats):
        calls = 0
        start = time.perf_counter()
        while True:
            call()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= budget and calls >= 2:
                break
        rates.append(calls * batch_size / elapsed)
    return float(statistics.median(rates))

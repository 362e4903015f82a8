"""Classify images with an exported SavedModel (`tfbn predict`), and measure its throughput.

Everything here uses TensorFlow and the SavedModel's signatures only (see `tfbn.export`): it serves
any export of `tfbn.export_saved_model`, without the Keras model.

Input files for `tfbn predict`:

- PNG, JPEG, GIF or BMP images, decoded with `tf.io.decode_image` to 8 bits per channel. A colour
  image is converted to grayscale (`tf.image.rgb_to_grayscale`, ITU-R BT.601 weights); an alpha
  channel is dropped, not composited. Images are not resized: they must already have the model's
  size (28x28 for LeNet), drawn as Fashion-MNIST is (light object on a black background).
- IDX image files (`idx3-ubyte`, the Fashion-MNIST format), optionally gzipped: unsigned bytes,
  shape `(n, 28, 28)`. Each image is reported as `FILE[i]`.
"""

from __future__ import annotations

import gzip
import os
import pathlib
import statistics
import time

import numpy as np
import tensorflow as tf

from tfbn.config import CLASS_NAMES

__all__ = [
    "inference_throughput",
    "load_images",
    "predict",
    "predict_files",
    "resolve_model_dir",
    "top_k",
]

_BATCH_SIZE = 256
_IDX_UBYTE = 0x08
_IDX_DTYPES = {0x08: "uint8", 0x09: "int8", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32",
               0x0E: "float64"}  # fmt: skip


# ------------------------------------------------------------------------------------ the model
def resolve_model_dir(model_dir: str | os.PathLike) -> pathlib.Path:
    """The SavedModel folder for `model_dir`: itself, or its highest numbered version folder.

    Args:
        model_dir: A SavedModel folder (`.../lenet/3`) or a model base folder (`.../lenet`)
            holding numbered versions, as TensorFlow Serving lays them out.

    Returns:
        The folder that holds `saved_model.pb`.

    Raises:
        ValueError: if neither `model_dir` nor a numbered folder under it holds a SavedModel.
    """
    path = pathlib.Path(model_dir)
    if (path / "saved_model.pb").is_file():
        return path
    if path.is_dir():
        versions = sorted(
            (int(p.name), p)
            for p in path.iterdir()
            if p.name.isdigit() and (p / "saved_model.pb").is_file()
        )
        if versions:
            return versions[-1][1]
    raise ValueError(
        f"Argument `model_dir` must be a SavedModel folder or a folder of numbered versions; no "
        f"saved_model.pb found in {str(path)!r} or its numbered subfolders."
    )


_LOADED: dict[str, object] = {}


def _load(model_dir) -> tuple[pathlib.Path, object]:
    path = resolve_model_dir(model_dir)
    key = str(path.resolve())
    stamp = (path / "saved_model.pb").stat().st_mtime_ns
    cached = _LOADED.get(key)
    if cached is None or cached[0] != stamp:
        cached = (stamp, tf.saved_model.load(str(path)))
        _LOADED[key] = cached
    return path, cached[1]


def _signature(loaded, name: str):
    if name not in loaded.signatures:
        raise ValueError(
            f"Argument `signature` must be one of {sorted(loaded.signatures)}; received "
            f"signature={name!r}."
        )
    return loaded.signatures[name]


def _input_spec(function) -> tf.TensorSpec:
    _, kwargs = function.structured_input_signature
    return next(iter(kwargs.values()))


def _class_names(loaded) -> tuple[str, ...]:
    variable = getattr(loaded, "class_names", None)
    if variable is None:
        return CLASS_NAMES
    return tuple(name.decode("utf-8") for name in variable.numpy())


# ----------------------------------------------------------------------------------- prediction
def _pick_signature(loaded, images: np.ndarray) -> tuple[str, np.ndarray]:
    """The signature that takes `images` as they are, and the images in its dtype."""
    full = _input_spec(loaded.signatures["serving_default"]).shape[1:]
    if images.dtype == np.uint8:
        if tuple(images.shape[1:]) == tuple(full):
            return "serving_default", images
        if "serving_uint8_2d" in loaded.signatures:
            flat = _input_spec(loaded.signatures["serving_uint8_2d"]).shape[1:]
            if tuple(images.shape[1:]) == tuple(flat):
                return "serving_uint8_2d", images
        expected = f"(n, {', '.join(map(str, full))})"
    elif np.issubdtype(images.dtype, np.floating):
        if not np.all(np.isfinite(images)) or images.min() < 0.0 or images.max() > 1.0:
            raise ValueError(
                "Argument `images`: float images must be finite and scaled to [0, 1]; received "
                f"values in [{images.min()}, {images.max()}]."
            )
        images = images.astype(np.float32)
        if tuple(images.shape[1:]) == tuple(full):
            return "serving_float", images
        if full[-1] == 1 and tuple(images.shape[1:]) == tuple(full[:-1]):
            return "serving_float", images[..., None]
        expected = f"(n, {', '.join(map(str, full))})"
    else:
        raise ValueError(
            "Argument `images` must be uint8 (0-255) or floating point in [0, 1]; received "
            f"dtype={images.dtype}."
        )
    raise ValueError(
        f"Argument `images` must have shape {expected}; received shape {images.shape}."
    )


def predict(model_dir: str | os.PathLike, images) -> list[tuple[str, np.ndarray]]:
    """Classifies images with an exported SavedModel.

    Args:
        model_dir: A SavedModel folder, or a model base folder (its highest version is used).
        images: A batch of images: uint8 `(n, 28, 28)` or `(n, 28, 28, 1)` in 0-255, or floats
            in `[0, 1]` of either shape (sizes as the exported model takes them).

    Returns:
        One `(class_name, probabilities)` per image, `probabilities` a float32 array with one
        entry per class, in the order of the model's classes.

    Raises:
        ValueError: if `model_dir` holds no SavedModel or `images` has the wrong shape or dtype.
    """
    images = np.asarray(images)
    if images.ndim < 3 or images.shape[0] == 0:
        raise ValueError(
            "Argument `images` must be a non-empty batch of images, shape (n, height, width) or "
            f"(n, height, width, channels); received shape {images.shape}."
        )
    _, loaded = _load(model_dir)
    name, images = _pick_signature(loaded, images)
    function = loaded.signatures[name]
    results: list[tuple[str, np.ndarray]] = []
    for start in range(0, len(images), _BATCH_SIZE):
        out = function(images=tf.constant(images[start : start + _BATCH_SIZE]))
        # An export without class names names each class by its id.
        names = out["class_name"].numpy() if "class_name" in out else out["class_id"].numpy()
        probabilities = out["probabilities"].numpy()
        results.extend((_text(n), p) for n, p in zip(names, probabilities, strict=True))
    return results


def _text(name) -> str:
    return name.decode("utf-8") if isinstance(name, bytes) else str(name)


def top_k(
    probabilities: np.ndarray, k: int, class_names: tuple[str, ...] = CLASS_NAMES
) -> list[tuple[str, float]]:
    """The `k` most probable classes as `(name, probability)`, most probable first."""
    order = np.argsort(-np.asarray(probabilities), kind="stable")[:k]
    return [(class_names[i], float(probabilities[i])) for i in order]


# ---------------------------------------------------------------------------------------- files
def _read_bytes(path: pathlib.Path) -> bytes:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as error:
            raise ValueError(f"Input {str(path)!r} is a corrupt gzip file: {error}") from None
    return data


def _read_idx_images(path: pathlib.Path, data: bytes) -> np.ndarray:
    dtype_code, ndim = data[2], data[3]
    if dtype_code != _IDX_UBYTE:
        kind = _IDX_DTYPES.get(dtype_code, f"unknown type 0x{dtype_code:02X}")
        raise ValueError(
            f"IDX file {str(path)!r} holds {kind} values; image files must hold unsigned bytes "
            "(idx3-ubyte)."
        )
    if ndim != 3:
        raise ValueError(
            f"IDX file {str(path)!r} has {ndim} dimensions; image files have 3 (n, height, width) "
            "(is it a labels file?)."
        )
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    header = 4 + 4 * ndim
    if len(data) - header != int(np.prod(dims)):
        raise ValueError(
            f"IDX file {str(path)!r} is truncated or corrupt: its header says shape {dims} "
            f"({int(np.prod(dims))} bytes), it holds {len(data) - header} bytes."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _decode_image(path: pathlib.Path, data: bytes) -> np.ndarray:
    try:
        image = tf.io.decode_image(data, dtype=tf.uint8, expand_animations=False)
    except (tf.errors.InvalidArgumentError, ValueError) as error:
        raise ValueError(
            f"Input {str(path)!r} is neither a PNG/JPEG/GIF/BMP image nor an IDX image file: "
            f"{str(error).splitlines()[0]}"
        ) from None
    channels = image.shape[-1]
    if channels in (2, 4):
        image = image[..., : channels - 1]
    if image.shape[-1] == 3:
        image = tf.image.rgb_to_grayscale(image)
    return image.numpy()[..., 0]


def load_images(paths, image_size: tuple[int, int] = (28, 28)) -> tuple[np.ndarray, list[str]]:
    """Reads image files and IDX files into one uint8 batch.

    Args:
        paths: Files: PNG/JPEG/GIF/BMP images, or IDX image files (optionally gzipped).
        image_size: `(height, width)` every image must have (no resizing is done).

    Returns:
        `(images, labels)`: uint8 array `(n, height, width)`, and one label per image (the file
        name, with `[i]` for the images of an IDX file).

    Raises:
        ValueError: if a file is missing, cannot be decoded, or an image has another size.
    """
    paths = [pathlib.Path(p) for p in paths]
    if not paths:
        raise ValueError("Argument `paths` must name at least one file; received none.")
    for path in paths:
        if not path.is_file():
            raise ValueError(f"Input file {str(path)!r} does not exist.")
    height, width = image_size
    images: list[np.ndarray] = []
    labels: list[str] = []
    for path in paths:
        data = _read_bytes(path)
        if len(data) >= 4 and data[:2] == b"\x00\x00":
            batch = _read_idx_images(path, data)
            names = [f"{path}[{i}]" for i in range(len(batch))]
        else:
            batch = _decode_image(path, data)[None]
            names = [str(path)]
        if batch.shape[1:] != (height, width):
            raise ValueError(
                f"Input {str(path)!r} has images of {batch.shape[1]}x{batch.shape[2]} pixels "
                f"(height x width); the model takes {height}x{width} grayscale images. Images "
                "are not resized: crop or scale them to that size first."
            )
        images.append(batch)
        labels.extend(names)
    return np.concatenate(images), labels


# ----------------------------------------------------------------------------------- throughput
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
        ValueError: if an argument is invalid or `signature` is not in the SavedModel.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            f"Argument `batch_size` must be a positive integer; received batch_size={batch_size!r}."
        )
    if not seconds > 0:
        raise ValueError(f"Argument `seconds` must be positive; received seconds={seconds!r}.")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(
            f"Argument `repeats` must be a positive integer; received repeats={repeats!r}."
        )
    _, loaded = _load(model_dir)
    function = _signature(loaded, signature)
    spec = _input_spec(function)
    rng = np.random.default_rng(0)
    shape = (batch_size, *spec.shape[1:])
    if spec.dtype == tf.uint8:
        batch = tf.constant(rng.integers(0, 256, size=shape, dtype=np.uint8))
    else:
        batch = tf.constant(rng.uniform(0.0, 1.0, size=shape).astype(spec.dtype.as_numpy_dtype))

    def call():
        out = function(images=batch)
        return out["logits"].numpy()

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


# ------------------------------------------------------------------------------------- files
def predict_files(
    model_dir: str | os.PathLike, inputs: list[str | os.PathLike], *, k: int = 3
) -> list[tuple[str, list[tuple[str, float]]]]:
    """Classifies image files with an exported SavedModel (`tfbn predict`).

    Args:
        model_dir: A SavedModel folder, or a model folder of numbered versions (latest used).
        inputs: PNG/JPEG images of the model's size, or IDX image files (`.gz` allowed).
        k: How many classes to return per image.

    Returns:
        Per image, its label (the file name; `FILE[i]` for an IDX file's images) and its `k`
        (class name, probability) pairs, most probable first.
    """
    if k < 1:
        raise ValueError(f"Argument `--top-k` must be at least 1; received {k}.")
    for path in inputs:
        if not pathlib.Path(path).is_file():
            raise ValueError(f"Input file {str(path)!r} does not exist.")
    _, loaded = _load(model_dir)
    names = _class_names(loaded)
    if k > len(names):
        raise ValueError(f"Argument `--top-k` must be between 1 and {len(names)}; received {k}.")
    spec = _input_spec(loaded.signatures["serving_default"])
    images, labels = load_images(inputs, image_size=tuple(spec.shape[1:3]))
    return [
        (label, top_k(probabilities, k, names))
        for label, (_, probabilities) in zip(labels, predict(model_dir, images), strict=True)
    ]

"""Inference-only SavedModel export, with batch normalization folded into the preceding layer.

`export_saved_model` writes `<directory>/<name>/<version>/`, the layout TensorFlow Serving watches.
The SavedModel holds plain TensorFlow variables and traced functions only: it loads and serves
with TensorFlow alone (`tf.saved_model.load`, `saved_model_cli`, TensorFlow Serving), in a process
where neither `tfbn` nor a Keras custom object is importable.

Signatures (shown for a model whose input is `(28, 28, 1)`; the sizes follow the model):

- `serving_default`: `images`, uint8 `[batch, 28, 28, 1]`, pixel values 0-255 (divided by 255 in
  the graph, as training does).
- `serving_uint8_2d`: `images`, uint8 `[batch, 28, 28]` (a channel axis of size 1 is added).
- `serving_float`: `images`, float32 `[batch, 28, 28, 1]`, values already scaled to `[0, 1]`.

Every signature returns `logits` (float32 `[batch, classes]`), `probabilities` (their softmax),
`class_id` (int64 argmax) and `class_name` (string, from `tfbn.config.CLASS_NAMES`). An input of any
other shape or dtype is refused by the signature itself.

BatchNorm is in inference mode in the graph: it uses the moving statistics, there is no training
branch and nothing is assigned. With folding (the default), batch norms are merged into the layer
before them where `tfbn.folding` can, and become one per-channel multiply-add elsewhere.

`jit_compile=True` compiles the model part of the signatures with XLA. On a CPU it helped at batch
size 1 and hurt at batch 256 (XLA's CPU convolutions are slower than oneDNN's); measure on your
hardware with `tfbn.serving.inference_throughput`.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import shutil
import uuid
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from tfbn.config import CLASS_NAMES
from tfbn.folding import fold_batch_norm

__all__ = [
    "FOLD_TOLERANCE",
    "SIGNATURES",
    "export_keras_file",
    "export_saved_model",
    "fold_batch_norm",
]

# Largest max-abs logit difference accepted between the exported model and `model.predict`.
FOLD_TOLERANCE = 1e-4

# The signatures every export has (`serving_uint8_2d` only for single-channel images).
SIGNATURES = ("serving_default", "serving_uint8_2d", "serving_float")

_CHECK_SAMPLE_SIZE = 64
_CHECK_BATCH_SIZE = 256


# ------------------------------------------------------------------------------------- checking
def _image_shape(model: keras.Model) -> tuple[int, ...]:
    try:
        input_shape = model.input_shape
    except (AttributeError, ValueError):
        input_shape = None  # a subclassed model: no graph, no known input
    shape = tuple(input_shape) if isinstance(input_shape, tuple) else None
    if shape is None or len(shape) not in (3, 4) or any(d is None for d in shape[1:]):
        raise ValueError(
            "Argument `model` must take one batch of images of known size, shape (batch, height, "
            f"width) or (batch, height, width, channels); received input_shape={input_shape}."
        )
    return tuple(int(d) for d in shape[1:])


def _as_model_input(images, image_shape: tuple[int, ...], argument: str) -> np.ndarray:
    """uint8 images (0-255) or float images in [0, 1] as the float32 batch the model takes."""
    array = np.asarray(images)
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / np.float32(255.0)
    elif np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
    else:
        raise ValueError(
            f"Argument `{argument}` must hold uint8 images (0-255) or floats in [0, 1]; received "
            f"dtype={array.dtype}."
        )
    if array.shape[1:] != image_shape:
        if image_shape[-1] == 1 and array.shape[1:] == image_shape[:-1]:
            array = array[..., None]
        else:
            raise ValueError(
                f"Argument `{argument}` must have shape (n, {', '.join(map(str, image_shape))}); "
                f"received shape {array.shape}."
            )
    if array.shape[0] == 0:
        raise ValueError(f"Argument `{argument}` must hold at least one image; received none.")
    return array


def _sample_images(image_shape: tuple[int, ...]) -> np.ndarray:
    """A deterministic batch of images in [0, 1] with image-like structure (smooth blobs)."""
    rng = np.random.default_rng(20150211)
    coarse = rng.uniform(0.0, 1.0, size=(_CHECK_SAMPLE_SIZE, 7, 7, 1)).astype(np.float32)
    height, width = image_shape[0], image_shape[1]
    smooth = tf.image.resize(coarse, (height, width), method="bilinear").numpy()
    noise = rng.uniform(-0.1, 0.1, size=smooth.shape).astype(np.float32)
    images = np.clip(smooth + noise, 0.0, 1.0)
    if len(image_shape) == 2:
        return images[..., 0]
    return np.repeat(images, image_shape[-1], axis=-1)


def _logits(model: keras.Model, images: np.ndarray) -> np.ndarray:
    outputs = [
        keras.ops.convert_to_numpy(model(images[i : i + _CHECK_BATCH_SIZE], training=False))
        for i in range(0, len(images), _CHECK_BATCH_SIZE)
    ]
    return np.concatenate(outputs).astype(np.float64)


def _check_close(reference, candidate, tolerance: float, what: str, hint: str = "") -> None:
    if not np.all(np.isfinite(candidate)):
        raise ValueError(f"{what}: the logits are not all finite; not writing the export.{hint}")
    diff = float(np.max(np.abs(reference - candidate)))
    if not diff <= tolerance:
        raise ValueError(
            f"{what}: logits differ from the Keras model by up to {diff:.3g} (tolerance "
            f"{tolerance:g}); not writing the export.{hint}"
        )


# ----------------------------------------------------------------------------------- the module
def _serving_module(
    model: keras.Model, image_shape: tuple[int, ...], class_names: Sequence[str], jit_compile: bool
) -> tuple[tf.Module, dict]:
    """A tf.Module holding one tf.function per signature and the tf.Variables they read."""
    names = tf.constant(list(class_names), dtype=tf.string)
    has_channels = len(image_shape) == 3

    @tf.function(jit_compile=jit_compile, autograph=False)
    def core(x):
        return model(x, training=False)

    def outputs(x):
        logits = tf.cast(core(x), tf.float32)
        class_id = tf.argmax(logits, axis=-1, output_type=tf.int64)
        return {
            "logits": logits,
            "probabilities": tf.nn.softmax(logits, axis=-1),
            "class_id": class_id,
            "class_name": tf.gather(names, class_id),
        }

    def checked(images, shape):
        # A loaded signature does not check the shape of what it is fed, and a wrong one can run:
        # 3 channels into a 1-channel conv is a valid grouped convolution (garbage out), and a
        # missing batch axis can crash the process. Refuse both in the graph.
        return tf.ensure_shape(images, shape)

    def to_float(images):
        return tf.cast(images, tf.float32) / 255.0

    if has_channels:
        full = [None, *image_shape]
        squeezed = [None, *image_shape[:-1]] if image_shape[-1] == 1 else None
    else:
        full, squeezed = [None, *image_shape, 1], [None, *image_shape]

    def model_layout(x):
        # The signatures' full form has a channel axis; a 2-D model takes the images without it.
        return x if has_channels else tf.squeeze(x, axis=-1)

    @tf.function(input_signature=[tf.TensorSpec(full, tf.uint8, name="images")])
    def serving_default(images):
        return outputs(model_layout(to_float(checked(images, full))))

    @tf.function(input_signature=[tf.TensorSpec(full, tf.float32, name="images")])
    def serving_float(images):
        return outputs(model_layout(checked(images, full)))

    signatures = {"serving_default": serving_default, "serving_float": serving_float}
    if squeezed is not None:

        @tf.function(input_signature=[tf.TensorSpec(squeezed, tf.uint8, name="images")])
        def serving_uint8_2d(images):
            x = to_float(checked(images, squeezed))
            return outputs(x[..., None] if has_channels else x)

        signatures["serving_uint8_2d"] = serving_uint8_2d

    module = tf.Module(name="serving")
    variables: dict[int, tf.Variable] = {}
    for name, function in signatures.items():
        setattr(module, name, function)
        for variable in function.get_concrete_function().variables:
            variables.setdefault(id(variable), variable)
    # Only the tf.Variables the traced graphs read are saved, never the Keras objects.
    module.model_variables = list(variables.values())
    # Readable after loading (`loaded.class_names`), for clients that print the top-k classes.
    module.class_names = tf.Variable(list(class_names), trainable=False, dtype=tf.string)
    return module, signatures


# ---------------------------------------------------------------------------------- the export
def _validate_name(name) -> str:
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or name.startswith(".")
        or any(sep in name for sep in ("/", "\\", os.sep))
    ):
        raise ValueError(
            "Argument `name` must be a non-empty folder name without path separators or a leading "
            f"dot; received name={name!r}."
        )
    return name


def _versions(model_root: pathlib.Path) -> list[int]:
    if not model_root.is_dir():
        return []
    return sorted(int(p.name) for p in model_root.iterdir() if p.is_dir() and p.name.isdigit())


def _exchange(first: pathlib.Path, second: pathlib.Path) -> bool:
    """Swaps two folders in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`), if available."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(
        at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), ctypes.c_uint(rename_exchange)
    )
    return result == 0


def _write_atomically(
    module: tf.Module, signatures: dict, target: pathlib.Path, overwrite: bool, check
) -> None:
    """Saves into a hidden folder beside `target`, checks it, then renames it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # TensorFlow Serving only picks up all-digit folder names, so the temp folders stay unseen.
    temp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:12]}"
    old = None
    try:
        tf.saved_model.save(module, str(temp), signatures=signatures)
        check(temp)
        if target.exists():
            if not overwrite:  # written meanwhile by another export
                raise ValueError(f"Argument `version`: {str(target)!r} already exists.")
            if _exchange(temp, target):
                return  # `temp` now holds the replaced version; removed below.
            old = target.parent / f".old-{target.name}-{uuid.uuid4().hex[:12]}"
            os.rename(target, old)
        try:
            os.rename(temp, target)
        except BaseException:
            if old is not None:
                os.rename(old, target)
                old = None
            raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def export_saved_model(
    model: keras.Model,
    directory: str | os.PathLike = "saved_models",
    *,
    name: str = "lenet",
    version: int | None = None,
    fold: bool = True,
    overwrite: bool = False,
    check_data=None,
    class_names: Sequence[str] = CLASS_NAMES,
    jit_compile: bool = False,
) -> pathlib.Path:
    """Exports `model` as an inference-only SavedModel that TensorFlow Serving can load.

    The SavedModel is written to `<directory>/<name>/<version>/` atomically: it is saved into a
    hidden folder beside the target, reloaded and checked, then renamed into place, so an
    interrupted export leaves no partial version behind. Batch normalization runs with its moving
    statistics and, with `fold=True`, is folded into the preceding Conv/Dense layers (see the
    module docstring). The model's input must be images scaled to `[0, 1]`, shape
    `(height, width)` or `(height, width, channels)`, and its output the class logits.

    Before anything is written, the folded model's logits are compared with the original model's
    on `check_data` (or on a fixed deterministic sample of images), and the reloaded SavedModel's
    logits with the original model's again; the export is refused if the largest absolute
    difference exceeds `FOLD_TOLERANCE` (1e-4). (An unfolded export differs by float32 rounding
    only, about 1e-6 for LeNet.)

    Args:
        model: A built Keras model (Sequential or functional when `fold=True`) that maps a batch
            of images in `[0, 1]` to `len(class_names)` logits.
        directory: Base folder of the exports.
        name: Model name, the folder under `directory` (TensorFlow Serving's model base path).
        version: Positive integer version; `None` takes the next free one (1 for the first).
        fold: Whether to fold batch normalization into the preceding layers.
        overwrite: Whether to replace an existing version folder. The new folder is swapped
            in with one atomic exchange where the system has one (Linux), else by two renames;
            the old one is removed only once the new one is in place.
        check_data: Images to compare the exported and the original model on: uint8 `(n, h, w)`
            or `(n, h, w, c)` in 0-255, or floats in `[0, 1]`. `None` uses a deterministic sample.
        class_names: Names of the classes, in logit order (the `class_name` output).
        jit_compile: Whether to compile the model's part of the serving functions with XLA.

    Returns:
        The path of the version folder written.

    Raises:
        ValueError: if an argument is invalid, the version exists and `overwrite` is False, or
            the folded or exported model's logits differ from `model`'s beyond the tolerance.
    """
    if not isinstance(model, keras.Model) or not model.built:
        raise ValueError(f"Argument `model` must be a built keras.Model; received model={model!r}.")
    image_shape = _image_shape(model)
    output_shape = model.output_shape
    class_names = tuple(class_names)
    if (
        isinstance(output_shape, list)
        or len(output_shape) != 2
        or output_shape[-1] != len(class_names)
    ):
        raise ValueError(
            f"Argument `model` must output one logit per class, shape (batch, {len(class_names)}) "
            f"for class_names of length {len(class_names)}; received output_shape={output_shape}."
        )
    if not all(isinstance(c, str) for c in class_names):
        raise ValueError(
            f"Argument `class_names` must be strings; received class_names={class_names!r}."
        )
    name = _validate_name(name)
    if version is not None and (
        isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 1
    ):
        raise ValueError(
            f"Argument `version` must be a positive integer or None; received version={version!r}."
        )
    root = pathlib.Path(directory) / name
    if root.exists() and not root.is_dir():
        raise ValueError(
            f"Argument `directory` must lead to a folder; {str(root)!r} exists and is a file."
        )
    if version is None:
        existing = _versions(root)
        version = existing[-1] + 1 if existing else 1
    target = root / str(int(version))
    if target.exists() and not overwrite:
        raise ValueError(
            f"Argument `version`: {str(target)!r} already exists; pass overwrite=True "
            "(--overwrite) to replace it, or another version."
        )
    if check_data is None:
        images = _sample_images(image_shape)
    else:
        images = _as_model_input(check_data, image_shape, "check_data")

    reference = _logits(model, images)
    serving_model = model
    # One tolerance for both checks: an unfolded export matches to float32 rounding (about 1e-6
    # here), but large logits of a well-trained model must not make a correct export fail.
    tolerance = FOLD_TOLERANCE
    if fold:
        serving_model = fold_batch_norm(model)
        hint = ""
        if model.compute_dtype != "float32":
            # Folding moves the scaling into the conv/dense kernels, which then round in the
            # low-precision dtype: differences of its precision, not a wrong fold.
            hint = (
                f" The model computes in {model.compute_dtype}, whose rounding alone exceeds the "
                "tolerance: export it with fold=False (--no-fold)."
            )
        _check_close(reference, _logits(serving_model, images), tolerance, "Folded model", hint)

    module, signatures = _serving_module(serving_model, image_shape, class_names, jit_compile)

    def check_saved(path: pathlib.Path) -> None:
        loaded = tf.saved_model.load(str(path))
        serve = loaded.signatures["serving_float"]
        batch = images if len(image_shape) == 3 else images[..., None]
        logits = np.concatenate(
            [
                serve(images=tf.constant(batch[i : i + _CHECK_BATCH_SIZE]))["logits"].numpy()
                for i in range(0, len(batch), _CHECK_BATCH_SIZE)
            ]
        )
        _check_close(reference, logits.astype(np.float64), tolerance, "Exported SavedModel")

    _write_atomically(module, signatures, target, overwrite, check_saved)
    return target


# -------------------------------------------------------------------------------------- the CLI
def export_keras_file(
    model_path: str | os.PathLike,
    export_dir: str | os.PathLike = "saved_models",
    *,
    name: str = "lenet",
    version: int | None = None,
    fold: bool = True,
    overwrite: bool = False,
    jit_compile: bool = False,
    check_files: Sequence[str | os.PathLike] | None = None,
) -> pathlib.Path:
    """Loads a trained `.keras` model and exports it with `export_saved_model` (`tfbn export`).

    Args:
        model_path: The trained model, a `.keras` file.
        export_dir: Base folder of the exports.
        name: Model name folder.
        version: Version number; `None` takes the next free one.
        fold: Fold batch normalization into the layers before it.
        overwrite: Replace the version folder if it exists.
        jit_compile: Compile the serving functions with XLA.
        check_files: Images to check the export on: IDX image files or PNG/JPEG files
            (default: a fixed synthetic sample).

    Returns:
        The version folder written.
    """
    path = pathlib.Path(model_path)
    if path.suffix != ".keras" or not path.is_file():
        raise ValueError(
            f"Argument `model` must be an existing .keras file; received {str(path)!r}."
        )
    model = keras.saving.load_model(path, compile=False)
    check_data = None
    if check_files:
        from tfbn.serving import load_images

        image_shape = _image_shape(model)
        check_data, _ = load_images(check_files, image_size=image_shape[:2])
    return pathlib.Path(
        export_saved_model(
            model,
            export_dir,
            name=name,
            version=version,
            fold=fold,
            overwrite=overwrite,
            jit_compile=jit_compile,
            check_data=check_data,
        )
    )

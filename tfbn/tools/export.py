"""Inference-only SavedModel export of a classifier, with batch normalization folded away.

`export_saved_model` writes `<directory>/<name>/<version>/`, the layout TensorFlow Serving watches
(`tfbn.utils.versioned` writes it atomically, also with concurrent exports). The SavedModel holds
plain TensorFlow variables and traced functions only: it loads and serves with TensorFlow alone
(`tf.saved_model.load`, `saved_model_cli`, TensorFlow Serving), in a process where neither `tfbn`
nor a Keras custom object is importable.

The signatures follow the model's own input shape (`shape` below, without the batch axis):

- `serving_float`: `images`, float32 `[batch, *shape]`, exactly what the model takes. Always there.
- For an image model (input `(height, width)`, or `(height, width, channels)` / `(channels,
  height, width)` with 1, 3 or 4 channels), `serving_default` takes uint8 `[batch, *shape]` pixel
  values 0-255, mapped linearly onto `pixel_range` in the graph (`(0, 1)` by default: divided by
  255); with one channel, `serving_uint8_2d` takes uint8 `[batch, height, width]`. For any other
  model `serving_default` is `serving_float`.

Every signature returns `logits` (float32 `[batch, classes]`), `probabilities` (their softmax),
`class_id` (int64 argmax) and, when class names are given, `class_name` (string); the names are
then also readable as `loaded.class_names`. A model whose last step is a softmax (a `Softmax` or
softmax `Activation` layer, a layer with `activation="softmax"`, or, for a subclassed model,
outputs that are non-negative rows summing to 1) is not softmaxed twice: its probabilities are
`probabilities`, and `logits` are the values before its softmax (log-probabilities for a
subclassed model). An input of any other shape or dtype is refused by the signature itself.

BatchNorm is in inference mode in the graph: it uses the moving statistics, there is no training
branch and nothing is assigned. With folding (the default), batch norms are merged into the layer
before them where `tfbn.tools.folding` can, and become one per-channel multiply-add elsewhere.

The export needs Keras's TensorFlow backend (the module itself imports on any backend, and
TensorFlow only when an export runs); on another backend use Keras's own `model.export`.

`jit_compile=True` compiles the model part of the signatures with XLA. On a CPU it helped at batch
size 1 and hurt at batch 256 (XLA's CPU convolutions are slower than oneDNN's); measure on your
hardware with `tfbn.workflow.serving.inference_throughput`.
"""

from __future__ import annotations

import errno
import math
import os
import pathlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import keras
import numpy as np

from tfbn.tools.folding import fold_batch_norm
from tfbn.utils.arguments import check_count
from tfbn.utils.files import check_writable_dir
from tfbn.utils.versioned import write_version

if TYPE_CHECKING:
    import tensorflow as tf

__all__ = [
    "DEFAULT_NAME",
    "FOLD_TOLERANCE",
    "SIGNATURES",
    "export_saved_model",
]

# Largest difference accepted between the exported model's outputs (logits, or probabilities for
# a model that outputs them) and the Keras model's, relative to the largest of them (at least 1).
FOLD_TOLERANCE = 1e-4

# Every signature an export can have (`serving_uint8_2d` only for single-channel images).
SIGNATURES = ("serving_default", "serving_uint8_2d", "serving_float")

# The model folder's name when none is given.
DEFAULT_NAME = "model"

_CHECK_SAMPLE_SIZE = 64
_CHECK_BATCH_SIZE = 256
_IMAGE_CHANNELS = (1, 3, 4)


# ------------------------------------------------------------------------------------- the input
class _Input(NamedTuple):
    """What the signatures take: the model's per-example shape and, for images, the layout."""

    shape: tuple[int, ...]
    image: bool
    channel_axis: int | None  # index in `shape` of a channel axis of size 1, 3 or 4

    def without_channel(self) -> tuple[int, ...] | None:
        """The shape of uint8 images fed without their single channel axis, if there is one."""
        if self.channel_axis is None or self.shape[self.channel_axis] != 1:
            return None
        return tuple(d for i, d in enumerate(self.shape) if i != self.channel_axis)


def _model_input(model: keras.Model, input_shape) -> _Input:
    """The input description of `model` (its graph's input, its build shape, or `input_shape`)."""
    if input_shape is not None:
        shape = (None, *tuple(input_shape))
    else:
        try:
            shape = model.input_shape
        except (AttributeError, ValueError):  # a subclassed model: the shape it was built with
            shape = (model.get_build_config() or {}).get("input_shape")
    shape = tuple(shape) if isinstance(shape, (tuple, list)) else None
    if shape is None or len(shape) < 2 or any(not isinstance(d, int) or d < 1 for d in shape[1:]):
        raise ValueError(
            "Argument `model` must take one input of known size: received input shape "
            f"{shape}; pass input_shape=(height, width, channels) (without the batch axis)."
        )
    shape = tuple(int(d) for d in shape[1:])
    if len(shape) == 2:
        return _Input(shape, True, None)
    if len(shape) == 3 and shape[-1] in _IMAGE_CHANNELS:
        return _Input(shape, True, 2)
    if len(shape) == 3 and shape[0] in _IMAGE_CHANNELS:
        return _Input(shape, True, 0)
    return _Input(shape, False, None)


def _check_pixel_range(pixel_range) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in pixel_range)
    except (TypeError, ValueError):
        low = high = math.nan
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(
            "Argument `pixel_range` must be two finite numbers (low, high) with low < high, the "
            f"values the model takes for pixels 0 and 255; received pixel_range={pixel_range!r}."
        )
    return low, high


def _as_model_input(data, spec: _Input, pixel_range, argument: str) -> np.ndarray:
    """uint8 images (mapped onto `pixel_range`) or float inputs, as the float32 batch the model
    takes; uint8 images of one channel may come without their channel axis."""
    array = np.asarray(data)
    if array.dtype == np.uint8 and spec.image:
        low, high = pixel_range
        array = (low + array.astype(np.float64) * ((high - low) / 255.0)).astype(np.float32)
        flat = spec.without_channel()
        if flat is not None and array.shape[1:] == flat:
            array = np.expand_dims(array, 1 + spec.channel_axis)
    elif np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
    else:
        kinds = "uint8 images (0-255) or floats" if spec.image else "floats"
        raise ValueError(f"Argument `{argument}` must hold {kinds}; received dtype={array.dtype}.")
    if array.ndim < 1 or array.shape[1:] != spec.shape or array.shape[0] == 0:
        raise ValueError(
            f"Argument `{argument}` must have shape (n, {', '.join(map(str, spec.shape))}) with "
            f"n >= 1; received shape {array.shape}."
        )
    return array


def _sample_inputs(spec: _Input, pixel_range) -> np.ndarray:
    """A deterministic batch: smooth images for an image model, normal values otherwise."""
    import tensorflow as tf

    rng = np.random.default_rng(20150211)
    if not spec.image:
        return rng.normal(0.0, 1.0, (_CHECK_SAMPLE_SIZE, *spec.shape)).astype(np.float32)
    spatial = [d for i, d in enumerate(spec.shape) if i != spec.channel_axis]
    coarse = rng.uniform(0.0, 1.0, size=(_CHECK_SAMPLE_SIZE, 7, 7, 1)).astype(np.float32)
    smooth = tf.image.resize(coarse, spatial, method="bilinear").numpy()
    noise = rng.uniform(-0.1, 0.1, size=smooth.shape).astype(np.float32)
    pixels = np.round(255.0 * np.clip(smooth + noise, 0.0, 1.0)).astype(np.uint8)[..., 0]
    if spec.channel_axis is not None:
        channels = spec.shape[spec.channel_axis]
        axis = 1 + spec.channel_axis
        pixels = np.repeat(np.expand_dims(pixels, axis), channels, axis)
    return _as_model_input(pixels, spec, pixel_range, "check_data")


# ------------------------------------------------------------------------------------ the output
def _is_softmax(activation) -> bool:
    return activation is not None and keras.activations.serialize(activation) == "softmax"


def _without_final_softmax(model: keras.Model) -> keras.Model | None:
    """A model sharing `model`'s layers that outputs the values its final softmax takes, or None
    when the last step is not a softmax this can see (or `model` is not a graph of layers)."""
    try:
        outputs = model.outputs
    except (AttributeError, ValueError):
        return None
    if not outputs or len(outputs) != 1:
        return None
    layer = outputs[0]._keras_history.operation
    if isinstance(layer, keras.layers.Softmax) and layer.axis in (-1, len(outputs[0].shape) - 1):
        return keras.Model(model.input, layer.input)
    activation = getattr(layer, "activation", None)
    if isinstance(layer, keras.layers.Activation) and _is_softmax(activation):
        return keras.Model(model.input, layer.input)
    if _is_softmax(activation) and not isinstance(layer, keras.Model):
        linear = type(layer).from_config({**layer.get_config(), "activation": "linear"})
        logits = linear(layer.input)
        for target, source in zip(linear.variables, layer.variables, strict=True):
            target.assign(source)
        return keras.Model(model.input, logits)
    return None


def _is_graph(model: keras.Model) -> bool:
    try:
        return bool(model.inputs)
    except (AttributeError, ValueError):
        return False


def _outputs(model: keras.Model, inputs: np.ndarray) -> np.ndarray:
    outputs = [
        keras.ops.convert_to_numpy(model(inputs[i : i + _CHECK_BATCH_SIZE], training=False))
        for i in range(0, len(inputs), _CHECK_BATCH_SIZE)
    ]
    return np.concatenate(outputs).astype(np.float64)


def _softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - np.max(logits, axis=-1, keepdims=True))
    return exp / np.sum(exp, axis=-1, keepdims=True)


def _are_probabilities(outputs: np.ndarray) -> bool:
    return bool(
        np.all(np.isfinite(outputs))
        and np.all(outputs >= 0.0)
        and np.allclose(outputs.sum(axis=-1), 1.0, rtol=0.0, atol=1e-4)
    )


def _check_close(reference, candidate, what: str, hint: str = "") -> None:
    if not np.all(np.isfinite(candidate)):
        raise ValueError(f"{what}: the outputs are not all finite; not writing the export.{hint}")
    diff = float(np.max(np.abs(reference - candidate)))
    scale = max(1.0, float(np.max(np.abs(reference))))
    if not diff <= FOLD_TOLERANCE * scale:
        raise ValueError(
            f"{what}: outputs differ from the Keras model's by up to {diff:.3g} (tolerance "
            f"{FOLD_TOLERANCE:g} x {scale:.3g}); not writing the export.{hint}"
        )


def _check_classes(outputs: np.ndarray, class_names) -> tuple[str, ...] | None:
    if outputs.ndim != 2:
        raise ValueError(
            "Argument `model` must output one value per class, shape (batch, classes); received "
            f"outputs of shape {outputs.shape}."
        )
    if class_names is None:
        return None
    class_names = tuple(class_names)
    if len(class_names) != outputs.shape[-1] or not all(isinstance(c, str) for c in class_names):
        raise ValueError(
            f"Argument `class_names` must be {outputs.shape[-1]} strings, one per model output; "
            f"received class_names={class_names!r}."
        )
    return class_names


# ------------------------------------------------------------------------------------ the module
def _signature_functions(core, spec: _Input, pixel_range, class_names, probabilities: bool):
    """One tf.function per signature around `core` (the model's forward pass)."""
    import tensorflow as tf

    names = None if class_names is None else tf.constant(list(class_names), dtype=tf.string)
    low, high = pixel_range

    def outputs(x):
        values = tf.cast(core(x), tf.float32)
        if probabilities:  # the model's own softmax: not applied again
            logits = tf.math.log(tf.maximum(values, np.finfo(np.float32).tiny))
        else:
            logits, values = values, tf.nn.softmax(values, axis=-1)
        class_id = tf.argmax(logits, axis=-1, output_type=tf.int64)
        result = {"logits": logits, "probabilities": values, "class_id": class_id}
        if names is not None:
            result["class_name"] = tf.gather(names, class_id)
        return result

    def from_pixels(images):
        return low + tf.cast(images, tf.float32) * ((high - low) / 255.0)

    # A loaded signature does not check the shape of what it is fed, and a wrong one can run
    # (3 channels into a 1-channel conv is a valid grouped convolution): refuse it in the graph.
    full = [None, *spec.shape]

    @tf.function(input_signature=[tf.TensorSpec(full, tf.float32, name="images")])
    def serving_float(images):
        return outputs(tf.ensure_shape(images, full))

    signatures = {"serving_float": serving_float, "serving_default": serving_float}
    if spec.image:

        @tf.function(input_signature=[tf.TensorSpec(full, tf.uint8, name="images")])
        def serving_default(images):
            return outputs(from_pixels(tf.ensure_shape(images, full)))

        signatures["serving_default"] = serving_default
    flat = spec.without_channel()
    if flat is not None:
        flat_spec = [None, *flat]

        @tf.function(input_signature=[tf.TensorSpec(flat_spec, tf.uint8, name="images")])
        def serving_uint8_2d(images):
            x = from_pixels(tf.ensure_shape(images, flat_spec))
            return outputs(tf.expand_dims(x, 1 + spec.channel_axis))

        signatures["serving_uint8_2d"] = serving_uint8_2d
    return signatures


def _serving_module(model, spec, pixel_range, class_names, probabilities, jit_compile):
    """A tf.Module holding the signature functions and the tf.Variables they read."""
    import tensorflow as tf

    @tf.function(jit_compile=jit_compile, autograph=False)
    def core(x):
        return model(x, training=False)

    signatures = _signature_functions(core, spec, pixel_range, class_names, probabilities)
    module = tf.Module(name="serving")
    variables: dict[int, tf.Variable] = {}
    for name, function in signatures.items():
        setattr(module, name, function)
        for variable in function.get_concrete_function().variables:
            variables.setdefault(id(variable), variable)
    # Only the tf.Variables the traced graphs read are saved, never the Keras objects.
    module.model_variables = list(variables.values())
    if class_names is not None:
        # Readable after loading (`loaded.class_names`), for clients that print the top-k classes.
        module.class_names = tf.Variable(list(class_names), trainable=False, dtype=tf.string)
    return module, signatures


def _save(module: tf.Module, signatures: dict, path: pathlib.Path) -> None:
    """`tf.saved_model.save`, with a file-system failure raised as the `OSError` it is."""
    import tensorflow as tf

    try:
        tf.saved_model.save(module, str(path), signatures=signatures)
    except tf.errors.OpError as error:
        for code in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT):
            if os.strerror(code) in str(error):
                raise OSError(code, os.strerror(code), str(path)) from None
        raise


# ------------------------------------------------------------------------------------ the target
def _check_name(name) -> str:
    if (
        not isinstance(name, str)
        or not name
        or name.startswith(".")
        or any(c in name for c in ("/", "\\", "\0", os.sep))
    ):
        raise ValueError(
            "Argument `name` must be a non-empty folder name without path separators or a leading "
            f"dot; received name={name!r}."
        )
    return name


def _model_root(directory, name) -> pathlib.Path:
    """`<directory>/<name>`, refused if it would lead outside `directory` (e.g. a symlink)."""
    directory = pathlib.Path(directory)
    root = directory / _check_name(name)
    if root.resolve().parent != directory.resolve():
        raise ValueError(
            f"Argument `name`: {str(root)!r} leads outside {str(directory)!r} (a symbolic link?); "
            "exports stay inside the export folder."
        )
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(root))
    check_writable_dir(root)
    return root


def _check_version(root: pathlib.Path, version, overwrite: bool) -> None:
    version = check_count("version", version, none=True)
    if version is None:
        return
    target = root / str(version)
    if target.exists() and not overwrite:
        raise ValueError(
            f"Argument `version`: {str(target)!r} already exists; pass overwrite=True "
            "(--overwrite) to replace it, or another version."
        )


# ------------------------------------------------------------------------------------ the export
def _check_backend() -> None:
    """The SavedModel is TensorFlow's: refused on any other Keras backend, before any work."""
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise ValueError(
            "export_saved_model writes a TensorFlow SavedModel and needs the TensorFlow backend "
            f"(KERAS_BACKEND=tensorflow); the Keras backend is {backend!r}: there, use "
            "model.export(path, format=...) from Keras."
        )


def _prepare(model, inputs: np.ndarray, fold: bool, verbose: int):
    """The model the signatures run (its final softmax split off, folded), the outputs it must
    reproduce on `inputs`, and whether those are the model's own probabilities."""
    outputs = _outputs(model, inputs)
    logits_model = _without_final_softmax(model)
    if logits_model is None:
        serving, reference, probabilities = model, outputs, _are_probabilities(outputs)
    else:
        serving, reference, probabilities = logits_model, _outputs(logits_model, inputs), False
        _check_close(outputs, _softmax(reference), "Model without its softmax")
    hint = ""
    if fold:
        serving = fold_batch_norm(serving, verbose=verbose)
        if model.compute_dtype != "float32":
            # Folding moves the scaling into the kernels, which then round in the low-precision
            # dtype: differences of its precision, not a wrong fold.
            hint = (
                f" The model computes in {model.compute_dtype}, whose rounding alone exceeds "
                "the tolerance: export it with fold=False (--no-fold)."
            )
        _check_close(reference, _outputs(serving, inputs), "Folded model", hint)
    return serving, reference, probabilities


def export_saved_model(
    model: keras.Model,
    directory: str | os.PathLike = "saved_models",
    *,
    name: str = DEFAULT_NAME,
    version: int | None = None,
    fold: bool = True,
    overwrite: bool = False,
    check_data=None,
    class_names: Sequence[str] | None = None,
    pixel_range: tuple[float, float] = (0.0, 1.0),
    input_shape: Sequence[int] | None = None,
    jit_compile: bool = False,
    verbose: int = 0,
) -> pathlib.Path:
    """Exports a classifier as an inference-only SavedModel that TensorFlow Serving can load.

    The SavedModel is written to `<directory>/<name>/<version>/` atomically
    (`tfbn.utils.versioned`): saved into a hidden folder beside the target, reloaded and checked,
    then renamed into place, so an interrupted export leaves no partial version, and concurrent
    exports without a `version` each get the next free one. The signatures are described in the
    module docstring.

    Before anything is written, the served model (folded, its final softmax split off) is
    compared with `model` on `check_data` (or a fixed deterministic sample), and the reloaded
    SavedModel again; the export is refused if an output differs by more than `FOLD_TOLERANCE`
    times the largest output (at least 1). The output folder is checked before any work.

    Args:
        model: A built Keras model from one batch of inputs to one value per class (logits, or
            probabilities after a softmax). Sequential or functional when `fold=True`.
        directory: Base folder of the exports.
        name: Model name, the folder under `directory` (TensorFlow Serving's model base path).
        version: Positive integer version; `None` takes the next free one (1 for the first).
        fold: Whether to fold batch normalization into the layers before it.
        overwrite: Whether to replace an existing version folder (in one atomic exchange where
            the system has one; the old one is removed once the new one is in place).
        check_data: Inputs to compare the export with the model on: floats as the model takes
            them, or for an image model uint8 pixels (0-255). `None` uses a deterministic sample.
        class_names: Names of the classes, in output order (the `class_name` output); `None`
            exports class ids only.
        pixel_range: The values the model takes for pixels 0 and 255; the uint8 signatures map
            pixels linearly onto it (`(0, 255)` for a model that rescales its input itself).
        input_shape: The input shape without the batch axis, for a model that does not know it
            (a subclassed model not built on a shape); default: the model's.
        jit_compile: Whether to compile the model's part of the serving functions with XLA.
        verbose: `1` prints what folding did; `0` prints nothing.

    Returns:
        The path of the version folder written.

    Raises:
        ValueError: if the Keras backend is not TensorFlow, an argument is invalid, the version
            exists and `overwrite` is False, or the served or exported model's outputs differ
            from `model`'s beyond the tolerance.
        OSError: if the export folder cannot be written (with the path concerned).
    """
    _check_backend()
    if not isinstance(model, keras.Model) or not model.built:
        raise ValueError(f"Argument `model` must be a built keras.Model; received model={model!r}.")
    spec = _model_input(model, input_shape)
    if fold and not _is_graph(model):
        raise ValueError(
            "Argument `fold=True` needs a Sequential or functional model (a graph of layers); "
            f"received a subclassed model of type {type(model).__name__}: pass fold=False."
        )
    pixel_range = _check_pixel_range(pixel_range)
    root = _model_root(directory, name)
    _check_version(root, version, overwrite)
    inputs = (
        _sample_inputs(spec, pixel_range)
        if check_data is None
        else _as_model_input(check_data, spec, pixel_range, "check_data")
    )
    class_names = _check_classes(_outputs(model, inputs[:1]), class_names)
    serving, reference, probabilities = _prepare(model, inputs, fold, verbose)
    module, signatures = _serving_module(
        serving, spec, pixel_range, class_names, probabilities, jit_compile
    )
    output = "probabilities" if probabilities else "logits"

    def write(path: pathlib.Path) -> None:
        import tensorflow as tf

        _save(module, signatures, path)
        serve = tf.saved_model.load(str(path)).signatures["serving_float"]
        exported = np.concatenate(
            [
                serve(images=tf.constant(inputs[i : i + _CHECK_BATCH_SIZE]))[output].numpy()
                for i in range(0, len(inputs), _CHECK_BATCH_SIZE)
            ]
        )
        _check_close(reference, exported.astype(np.float64), "Exported SavedModel")

    return write_version(root, write, version=version, overwrite=overwrite)

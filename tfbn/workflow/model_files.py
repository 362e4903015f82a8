"""Saved `.keras` models in, saved models out: what `tfbn recalibrate` and `tfbn export` run.

The library's functions take a model and data (`tfbn.recalibrate`, `tfbn.export_saved_model`);
these read the model file, the data the command names (Fashion-MNIST by default), check both
before any pass over the data, and write the result.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from tfbn.tools.export import DEFAULT_NAME, _model_input, _model_root, export_saved_model
from tfbn.tools.recalibration import MODES, recalibrate
from tfbn.utils.arguments import check_count
from tfbn.utils.files import save_model_atomically
from tfbn.utils.saving import check_keras_file, check_keras_output, load_model
from tfbn.workflow.user_data import check_data_path, check_rescale, load_user_data

__all__ = ["export_keras_file", "recalibrate_file"]


# ---------------------------------------------------------------------------------- recalibrate
def _default_output(model_path: Path) -> Path:
    return model_path.with_name(f"{model_path.stem}.recalibrated.keras")


def _accuracy(model: keras.Model, dataset: tf.data.Dataset) -> float:
    @tf.function
    def correct(x, y):
        predictions = tf.argmax(model(x, training=False), axis=-1, output_type=tf.int32)
        return tf.reduce_sum(tf.cast(predictions == tf.cast(y, tf.int32), tf.int64))

    right = total = 0
    for x, y in dataset:
        right += int(correct(x, y))
        total += int(y.shape[0])
    return right / total


def _check_mode(mode) -> None:
    if mode not in MODES:
        raise ValueError(f"Argument `mode` must be one of {MODES}; received mode={mode!r}.")


def _log_report(report: dict, log) -> None:
    """Per batch-norm layer, how far its statistics moved."""
    for name, stats in report.items():
        shift = np.abs(stats["new_mean"] - stats["old_mean"]) / np.sqrt(
            stats["new_variance"] + 1e-12
        )
        ratio = stats["new_variance"] / np.maximum(stats["old_variance"], 1e-12)
        log(
            f"  {name:<24} mean shift {shift.mean():.3f} std (max {shift.max():.3f}), "
            f"variance ratio {ratio.mean():.3f} (range {ratio.min():.3f}-{ratio.max():.3f})"
        )


def _input_shape(model: keras.Model) -> tuple:
    """The shape of one input of a single-input model, without the batch axis."""
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):  # a subclassed model
        inputs = None
    if not inputs or len(inputs) != 1:
        count = "an unknown number of" if not inputs else str(len(inputs))
        raise ValueError(
            f"Argument `data`: model '{model.name}' takes {count} inputs; --data feeds models "
            "with one input."
        )
    return tuple(inputs[0].shape[1:])


def _user_batches(model, data, rescale, tfds_dir, batch_size) -> tuple[tf.data.Dataset, int]:
    """The inputs of `data` (see `tfbn.workflow.user_data`) in batches, and their number."""
    x, _ = load_user_data(data, input_shape=_input_shape(model), rescale=rescale, tfds_dir=tfds_dir)
    return tf.data.Dataset.from_tensor_slices(x).batch(batch_size), len(x)


def _recalibrate_on_fashion_mnist(model, fashion, distribution, log, **kwargs) -> dict:
    """`recalibrate` on the training split, with the test accuracy before and after."""
    before = _accuracy(model, fashion.test)
    report = recalibrate(model, fashion.train, strategy=distribution, **kwargs)
    after = _accuracy(model, fashion.test)
    log(f"Recalibrated {len(report)} batch-norm layers on {fashion.num_train} training images:")
    _log_report(report, log)
    log(f"Test accuracy: {before:.4f} before, {after:.4f} after ({after - before:+.4f}).")
    return report


def recalibrate_file(
    model_path: str | Path,
    output: str | Path | None = None,
    *,
    data: str | os.PathLike | None = None,
    rescale: float | None = None,
    data_dir: str | Path | None = None,
    tfds_dir: str | Path | None = None,
    batch_size: int = 512,
    steps: int | None = None,
    strategy: str = "auto",
    mode: str = "exact",
    verbose: int = 1,
) -> Path:
    """Recalibrates a saved `.keras` model on the user's data (or Fashion-MNIST) and saves it.

    Prints, per batch-norm layer, how much its statistics moved, and on Fashion-MNIST the test
    accuracy before and after; the recalibrated model is saved atomically (`tfbn recalibrate`).
    The arguments, the model file, the output's folder and the data are checked before any pass.

    Args:
        model_path: The trained model, a `.keras` file.
        output: Where to save the recalibrated model (`.keras`); default: `model_path` with
            `.recalibrated` before the extension.
        data: The inputs to take the statistics over (`tfbn.workflow.user_data`: a `.npy` or
            `.npz` file, a folder of images or `tfds:NAME:SPLIT`; labels are not needed);
            `None` uses Fashion-MNIST's training split.
        rescale: A number the inputs of `data` are multiplied by (e.g. `1 / 255`).
        data_dir: Folder with the four Fashion-MNIST IDX files (see `tfbn.load_fashion_mnist`);
            used without `data`.
        tfds_dir: TFDS data directory (default: TFDS's default).
        batch_size: Batch size of the statistics passes.
        steps: Batches per pass; `None` means all the data.
        strategy: tf.distribute strategy name (see `tfbn.workflow.distribute`).
        mode: `"exact"` or `"fast"` (see `tfbn.recalibrate`).
        verbose: 0 prints nothing, 1 (default) also shows progress bars, 2 only the lines.

    Returns:
        The path of the saved model.

    Raises:
        UsageError: if an argument is invalid or the model file is not a valid `.keras` file.
        ValueError: if `data` cannot be read or does not fit the model (see `load_user_data`).
        OSError: if the model or the data cannot be read or the output cannot be written, with
            the path concerned.
    """
    from tfbn.workflow import data as fashion_mnist
    from tfbn.workflow.distribute import get_strategy, resolve_strategy_name

    model_path = check_keras_file(model_path)
    output = check_keras_output(output or _default_output(model_path))
    _check_mode(mode)
    check_count("batch_size", batch_size)
    check_count("steps", steps, none=True)
    resolve_strategy_name(strategy)
    check_rescale(rescale)
    if data is not None:
        check_data_path(data)
    elif not fashion_mnist.is_prepared(tfds_dir):
        fashion_mnist.check_data_dir(data_dir)

    log = print if verbose else (lambda *args: None)
    distribution = get_strategy(strategy)
    with distribution.scope():
        model = load_model(model_path)
    settings = {"mode": mode, "steps": steps, "verbose": verbose}
    if data is None:
        fashion = fashion_mnist.load_fashion_mnist(
            batch_size, data_dir=data_dir, tfds_dir=tfds_dir, shuffle=False
        )
        _recalibrate_on_fashion_mnist(model, fashion, distribution, log, **settings)
    else:
        batches, count = _user_batches(model, data, rescale, tfds_dir, batch_size)
        report = recalibrate(model, batches, strategy=distribution, **settings)
        log(f"Recalibrated {len(report)} batch-norm layers on {count} inputs of {data}:")
        _log_report(report, log)
    save_model_atomically(model, output)
    log(f"Saved {output}")
    sys.stdout.flush()
    return output


# --------------------------------------------------------------------------------------- export
def _check_images(model, check_files, input_shape) -> np.ndarray:
    """IDX, PNG or JPEG files (`tfbn.workflow.serving.load_images`) at the model's image size."""
    from tfbn.workflow.serving import load_images

    spec = _model_input(model, input_shape)
    spatial = [d for i, d in enumerate(spec.shape) if i != spec.channel_axis]
    images, _ = load_images(check_files, image_size=tuple(spatial))
    return images


def export_keras_file(
    model_path: str | os.PathLike,
    export_dir: str | os.PathLike = "saved_models",
    *,
    name: str = DEFAULT_NAME,
    check_files: Sequence[str | os.PathLike] | None = None,
    data: str | os.PathLike | None = None,
    rescale: float | None = None,
    tfds_dir: str | os.PathLike | None = None,
    **kwargs,
) -> Path:
    """Loads a trained `.keras` model (`tfbn.utils.saving.load_model`) and exports it (`tfbn
    export`), checking the export on the given inputs.

    Args:
        model_path: The trained model, a `.keras` file.
        export_dir: Base folder of the exports.
        name: Model name, the folder under `export_dir`.
        check_files: Images to check the export on: IDX image files or PNG/JPEG files, of the
            model's image size (uint8 pixels, mapped onto `pixel_range`).
        data: Inputs to check the export on (`tfbn.workflow.user_data`: a `.npy` or `.npz` file,
            a folder of images or `tfds:NAME:SPLIT`), float inputs as the model takes them
            after `rescale`. Without `check_files` and `data`: a fixed synthetic sample.
        rescale: A number the inputs of `data` are multiplied by (e.g. `1 / 255`).
        tfds_dir: TFDS data directory of a `tfds:` `data` path (default: TFDS's default).
        **kwargs: Passed to `tfbn.export_saved_model` (`version`, `fold`, `class_names`, ...).

    Returns:
        The version folder written.

    Raises:
        ValueError: if both `check_files` and `data` are given, `data` cannot be read or does
            not fit the model, or as `tfbn.export_saved_model`.
        OSError: if a file cannot be read or the export folder cannot be written.
    """
    if check_files and data is not None:
        raise ValueError(
            "Arguments `check_files` and `data` name the inputs to check the export on: give "
            f"one of them; received check_files={list(map(str, check_files))!r} and "
            f"data={str(data)!r}."
        )
    # The quick checks before loading the model:
    _model_root(export_dir, name)
    check_rescale(rescale)
    if data is not None:
        check_data_path(data)
    model = load_model(model_path)
    check_data = None
    if check_files:
        check_data = _check_images(model, check_files, kwargs.get("input_shape"))
    elif data is not None:
        shape = kwargs.get("input_shape") or _input_shape(model)
        check_data, _ = load_user_data(data, input_shape=shape, rescale=rescale, tfds_dir=tfds_dir)
    return export_saved_model(model, export_dir, name=name, check_data=check_data, **kwargs)

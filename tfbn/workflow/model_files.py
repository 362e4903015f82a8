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


def recalibrate_file(
    model_path: str | Path,
    output: str | Path | None = None,
    *,
    data_dir: str | Path | None = None,
    tfds_dir: str | Path | None = None,
    batch_size: int = 512,
    steps: int | None = None,
    strategy: str = "auto",
    mode: str = "exact",
    verbose: int = 1,
) -> Path:
    """Recalibrates a saved `.keras` model on Fashion-MNIST's training split and saves it.

    Prints the test accuracy before and after and, per batch-norm layer, how much its statistics
    moved; the recalibrated model is saved atomically (`tfbn recalibrate`).

    Args:
        model_path: The trained model, a `.keras` file.
        output: Where to save the recalibrated model (`.keras`); default: `model_path` with
            `.recalibrated` before the extension.
        data_dir: Folder with the four Fashion-MNIST IDX files (see `tfbn.load_fashion_mnist`).
        tfds_dir: TFDS data directory (default: TFDS's default).
        batch_size: Batch size of the statistics passes.
        steps: Batches per pass; `None` means the whole training split.
        strategy: tf.distribute strategy name (see `tfbn.workflow.distribute`).
        mode: `"exact"` or `"fast"` (see `tfbn.recalibrate`).
        verbose: 0 prints nothing, 1 (default) also shows progress bars, 2 only the lines.

    Returns:
        The path of the saved model.

    Raises:
        UsageError: if an argument is invalid or the model file is not a valid `.keras` file.
        OSError: if the model cannot be read or the output cannot be written, found before the
            data are loaded (with the path concerned).
    """
    from tfbn.workflow import data
    from tfbn.workflow.distribute import get_strategy, resolve_strategy_name

    model_path = check_keras_file(model_path)
    # Before the data and the passes:
    output = check_keras_output(output or _default_output(model_path))
    _check_mode(mode)
    check_count("batch_size", batch_size)
    check_count("steps", steps, none=True)
    resolve_strategy_name(strategy)
    if not data.is_prepared(tfds_dir):
        data.check_data_dir(data_dir)

    fashion = data.load_fashion_mnist(
        batch_size, data_dir=data_dir, tfds_dir=tfds_dir, shuffle=False
    )
    distribution = get_strategy(strategy)
    with distribution.scope():
        model = load_model(model_path)
    before = _accuracy(model, fashion.test)
    report = recalibrate(
        model, fashion.train, mode=mode, steps=steps, strategy=distribution, verbose=verbose
    )
    after = _accuracy(model, fashion.test)

    log = print if verbose else (lambda *args: None)
    log(f"Recalibrated {len(report)} batch-norm layers on {fashion.num_train} training images:")
    _log_report(report, log)
    log(f"Test accuracy: {before:.4f} before, {after:.4f} after ({after - before:+.4f}).")
    save_model_atomically(model, output)
    log(f"Saved {output}")
    sys.stdout.flush()
    return output


# --------------------------------------------------------------------------------------- export
def export_keras_file(
    model_path: str | os.PathLike,
    export_dir: str | os.PathLike = "saved_models",
    *,
    name: str = DEFAULT_NAME,
    check_files: Sequence[str | os.PathLike] | None = None,
    **kwargs,
) -> Path:
    """Loads a trained `.keras` model (`tfbn.utils.saving.load_model`) and exports it (`tfbn
    export`).

    Args:
        model_path: The trained model, a `.keras` file.
        export_dir: Base folder of the exports.
        name: Model name, the folder under `export_dir`.
        check_files: Images to check the export on: IDX image files or PNG/JPEG files
            (default: a fixed synthetic sample).
        **kwargs: Passed to `tfbn.export_saved_model` (`version`, `fold`, `class_names`, ...).

    Returns:
        The version folder written.
    """
    _model_root(export_dir, name)  # before loading the model: the quick checks first
    model = load_model(model_path)
    check_data = None
    if check_files:
        from tfbn.workflow.serving import load_images

        spec = _model_input(model, kwargs.get("input_shape"))
        spatial = [d for i, d in enumerate(spec.shape) if i != spec.channel_axis]
        check_data, _ = load_images(check_files, image_size=tuple(spatial))
    return export_saved_model(model, export_dir, name=name, check_data=check_data, **kwargs)

"""Convert a Keras model to tfbn: every `keras.layers.BatchNormalization` becomes `tfbn.BatchNorm`.

`convert(model)` returns a copy of a Sequential or functional model (nested ones included) in
which each batch-norm layer of Keras's class is a `tfbn.BatchNorm` with the same configuration
and the same variables (`gamma`, `beta`, the moving statistics and, with batch renormalization,
`moving_stddev`, `renorm_mean`, `renorm_stddev`). Every other layer is rebuilt from its config
with its variables copied: names, `trainable` flags (frozen parts for fine-tuning stay frozen),
dtype policies and random-generator states are those of the original, so the copy computes
what the original computes, in inference and in training mode.

`convert_file(in.keras, out.keras)` does the same for a saved model (`tfbn convert`).
"""

from __future__ import annotations

import os
from pathlib import Path

import keras
import numpy as np

from tfbn.layers.batch_norm import BatchNorm
from tfbn.utils.arguments import check_backend

__all__ = ["convert", "convert_file"]


def _is_keras_batch_norm(layer) -> bool:
    """Keras's own batch-norm class (not tfbn's, nor a user's subclass with its own behaviour)."""
    return type(layer) is keras.layers.BatchNormalization


def _is_graph_model(model) -> bool:
    if isinstance(model, keras.Sequential):
        return True
    try:
        return isinstance(model, keras.Model) and bool(model.inputs)
    except (AttributeError, ValueError):
        return False


def _nested_batch_norms(layer) -> list[str]:
    """Paths of the Keras batch-norm layers anywhere inside `layer` (itself excluded)."""
    return [
        inner.path if hasattr(inner, "path") else inner.name
        for inner in layer._flatten_layers(include_self=False, recursive=True)
        if _is_keras_batch_norm(inner)
    ]


def _clone_layer(layer, pairs: list) -> keras.layers.Layer:
    """A new layer built from `layer`'s config (a tfbn.BatchNorm for Keras's batch norm)."""
    if _is_graph_model(layer):
        return convert(layer)  # a nested Sequential or functional model, variables included
    if _is_keras_batch_norm(layer):
        clone = BatchNorm.from_config(layer.get_config())
    else:
        inside = _nested_batch_norms(layer)
        if inside:
            raise ValueError(
                f"Cannot convert layer '{layer.name}' ({type(layer).__name__}): it holds "
                f"batch-norm layers {inside} outside a Sequential or functional graph, so they "
                "cannot be replaced. Build that block as a keras.Sequential or functional model, "
                "or replace its keras.layers.BatchNormalization by tfbn.BatchNorm in its code."
            )
        try:
            clone = layer.__class__.from_config(layer.get_config())
        except Exception as error:  # any failure of a user's from_config
            raise ValueError(
                f"Cannot convert layer '{layer.name}' ({type(layer).__name__}): rebuilding it from "
                f"its config failed ({type(error).__name__}: {error})."
            ) from error
    pairs.append((layer, clone))
    return clone


def _named_inputs(model: keras.Model):
    """New inputs with the names of `model`'s input layers (clone_model would rename them)."""
    if isinstance(model, keras.Sequential):
        return None  # a Sequential clone keeps its input layer's name

    def like(tensor):
        layer = tensor._keras_history.operation
        return keras.Input(batch_shape=tensor.shape, dtype=tensor.dtype, name=layer.name)

    return keras.tree.map_structure(like, model.input)


def _copy_variables(source, target) -> None:
    """Assigns `source`'s variables to `target` (matched by name for batch norms, else by order)."""
    if isinstance(target, BatchNorm) and not isinstance(source, BatchNorm):
        by_name = {v.name: v for v in source.variables}
        targets = target.variables
        sources = [by_name.get(v.name) for v in targets]
    else:
        targets, sources = target.variables, source.variables
    if len(sources) != len(targets) or any(
        s is None or tuple(s.shape) != tuple(t.shape) for s, t in zip(sources, targets, strict=True)
    ):
        raise ValueError(
            f"Cannot convert layer '{source.name}' ({type(source).__name__}): its rebuilt copy has "
            f"variables {[(v.name, tuple(v.shape)) for v in targets]}, the original "
            f"{[(v.name, tuple(v.shape)) for v in source.variables]}."
        )
    for s, t in zip(sources, targets, strict=True):
        t.assign(np.asarray(keras.ops.convert_to_numpy(s)))


def convert(model: keras.Model) -> keras.Model:
    """Returns a copy of `model` with every `keras.layers.BatchNormalization` as `tfbn.BatchNorm`.

    The copy has the same layers, names, configuration and variables as `model`, and computes
    the same outputs in inference and in training mode (up to float32 rounding); only the
    batch-norm layers of Keras's class are now `tfbn.BatchNorm` (the same arguments, their
    variables copied). Layers that are already `tfbn.BatchNorm`, and user subclasses of
    `BatchNormalization`, are copied as they are. Nested Sequential and functional models are
    converted inside. `model` is not modified. The copy is not compiled: compile it before `fit`.

    Args:
        model: A built `keras.Sequential` or functional `keras.Model`.

    Returns:
        The converted `keras.Model` (of the same class for Sequential and functional models).

    Raises:
        ValueError: if the Keras backend is not one `tfbn.BatchNorm` runs on, or `model` is not
            a built Sequential or functional model (a subclassed model's batch-norm layers live
            in its Python code, which cannot be rewritten), or a layer holds batch-norm layers
            outside a graph, or a layer cannot be rebuilt from its config; the message names the
            layer.
    """
    check_backend(keras.backend.backend())
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"Argument `model` must be a keras.Model; received an object of type "
            f"{type(model).__name__}."
        )
    if not _is_graph_model(model) or not model.built:
        inside = _nested_batch_norms(model)
        raise ValueError(
            f"Argument `model` must be a built Sequential or functional model; received "
            f"'{model.name}' of type {type(model).__name__}"
            + (f" (its batch-norm layers: {inside})" if inside else "")
            + ". A subclassed model creates its layers in Python code: use tfbn.BatchNorm there."
        )
    pairs: list = []
    converted = keras.models.clone_model(
        model,
        input_tensors=_named_inputs(model),
        clone_function=lambda layer: _clone_layer(layer, pairs),
    )
    for source, target in pairs:
        _copy_variables(source, target)
    if not model.trainable:
        converted.trainable = False
    return converted


def convert_file(
    model_path: str | os.PathLike, output: str | os.PathLike, *, verbose: int = 1
) -> Path:
    """Converts a saved `.keras` model with `convert` and saves the copy atomically.

    The model is loaded in Keras's safe mode (`tfbn.utils.saving.load_model`) without its compile
    configuration; the converted copy is saved uncompiled and reloads without `custom_objects`.
    `output` may be `model_path` itself: the file is replaced only once the copy is complete.

    Args:
        model_path: The model to convert, a `.keras` file.
        output: Where to save the converted model, a path ending in `.keras`.
        verbose: 1 (default) prints how many batch-norm layers were replaced and where the
            model went; 0 prints nothing.

    Returns:
        The path of the saved model.

    Raises:
        UsageError: (a `ValueError`) if `output` does not end in `.keras`, or the input is not a
            valid `.keras` file or cannot be rebuilt in safe mode.
        ValueError: if the model cannot be converted (see `convert`; the message names the layer).
        OSError: if the input cannot be read or the output folder cannot be written (checked
            before the model is loaded), or writing fails; with the path concerned.
    """
    from tfbn.utils.files import save_model_atomically
    from tfbn.utils.saving import check_keras_file, check_keras_output, load_model

    model_path = check_keras_file(model_path)
    output = check_keras_output(output)  # before the model is loaded
    model = load_model(model_path)
    converted = convert(model)
    replaced = [
        layer.name
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if _is_keras_batch_norm(layer)
    ]
    save_model_atomically(converted, output)
    if verbose:
        print(
            f"Replaced {len(replaced)} keras.layers.BatchNormalization layers by tfbn.BatchNorm; "
            f"saved {output}"
        )
    return output

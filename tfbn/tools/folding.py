"""Batch normalization folded into the layer before it, for inference.

In inference mode a batch-norm layer is one per-channel affine map with its moving statistics,

    s = gamma / sqrt(moving_variance + epsilon)
    y = x * s + (beta - moving_mean * s),

so after a linear layer `x = W u + b` it can be merged into that layer's weights:

    W' = W * s       (on W's output-channel axis)
    b' = (b - moving_mean) * s + beta

`fold_batch_norm` does this for every batch-norm layer (the class `keras.layers.BatchNormalization`,
which `tfbn.BatchNorm` subclasses) that directly follows a Conv1D/2D/3D, Conv1D/2D/3DTranspose,
DepthwiseConv1D/2D, SeparableConv1D/2D (into the pointwise kernel) or Dense layer, when

- that layer has no activation (it would sit between the two maps),
- the batch norm is the only consumer of that layer's output, which is not a model output either
  (another consumer still needs the unnormalized values),
- that layer is applied once (a shared layer serves other inputs with the same weights),
- the batch norm's axis is that layer's channel axis.

Any other batch-norm layer becomes the per-channel multiply-add above (`ChannelAffine`). `fold_plan`
says, per batch-norm layer, which layer it folds into or why it cannot.
"""

from __future__ import annotations

from typing import NamedTuple

import keras
import numpy as np

__all__ = ["ChannelAffine", "FoldStep", "fold_batch_norm", "fold_plan"]


class FoldStep(NamedTuple):
    """What folding does with one batch-norm layer."""

    into: str | None  # the layer it folds into, or None: kept as a per-channel multiply-add
    reason: str  # why it could not fold ("" when it folds)


# Layer class -> (attribute of the kernel the output channels scale, its output-channel axes).
# A depthwise kernel (..., in, multiplier) has output channel i * multiplier + m on its last two.
_KERNELS = {
    keras.layers.Conv1D: ("kernel", "last"),
    keras.layers.Conv2D: ("kernel", "last"),
    keras.layers.Conv3D: ("kernel", "last"),
    keras.layers.Dense: ("kernel", "last"),
    keras.layers.Conv1DTranspose: ("kernel", "second_last"),
    keras.layers.Conv2DTranspose: ("kernel", "second_last"),
    keras.layers.Conv3DTranspose: ("kernel", "second_last"),
    keras.layers.DepthwiseConv1D: ("kernel", "last_two"),
    keras.layers.DepthwiseConv2D: ("kernel", "last_two"),
    keras.layers.SeparableConv1D: ("pointwise_kernel", "last"),
    keras.layers.SeparableConv2D: ("pointwise_kernel", "last"),
}


def batch_norm_affine(layer) -> tuple[np.ndarray, np.ndarray]:
    """A batch-norm layer's inference map as `x * scale + offset`, in float64."""

    def value(variable, default):
        if variable is None:
            return default
        return np.asarray(keras.ops.convert_to_numpy(variable), np.float64)

    mean = value(layer.moving_mean, None)
    variance = value(layer.moving_variance, None)
    gamma = value(layer.gamma if layer.scale else None, np.ones_like(mean))
    beta = value(layer.beta if layer.center else None, np.zeros_like(mean))
    scale = gamma / np.sqrt(variance + float(layer.epsilon))
    return scale, beta - mean * scale


def _is_graph_model(model) -> bool:
    """Whether `model` is a graph of layers (Sequential or functional), not a subclassed model."""
    try:
        return isinstance(model, keras.Model) and bool(model.inputs)
    except (AttributeError, ValueError):
        return False


def _nodes_in(model) -> list:
    """The call nodes of `model`'s own graph."""
    graph = getattr(model, "_functional", None) or model  # a Sequential keeps one inside
    return [node for nodes in graph._nodes_by_depth.values() for node in nodes]


def _consumer_counts(model) -> dict[int, int]:
    """Tensor id -> how many calls in `model`'s graph (and its outputs) use that tensor."""
    counts: dict[int, int] = {}
    for node in _nodes_in(model):
        if node.is_input:
            continue
        for tensor in node.input_tensors:
            counts[id(tensor)] = counts.get(id(tensor), 0) + 1
    for tensor in keras.tree.flatten(model.outputs):
        counts[id(tensor)] = counts.get(id(tensor), 0) + 1
    return counts


def _channel_axis(layer, rank: int) -> int:
    if isinstance(layer, keras.layers.Dense):
        return rank - 1
    return 1 if layer.data_format == "channels_first" else rank - 1


def _producer_of(bn, model, counts) -> tuple[object | None, str]:
    """The layer `bn` folds into and "", or None and the reason it cannot."""
    if len(bn._inbound_nodes) != 1:
        return None, "it is applied more than once"
    node = bn._inbound_nodes[0]
    if len(node.input_tensors) != 1:
        return None, "it has several inputs"
    tensor = node.input_tensors[0]
    history = getattr(tensor, "_keras_history", None)
    producer = None if history is None else history.operation
    kind = type(producer).__name__
    if producer is None or producer not in model.layers or isinstance(producer, keras.Model):
        return None, "its input is a model input or comes from a nested model"
    if type(producer) not in _KERNELS:
        return None, f"its input comes from {kind} '{producer.name}'"
    if getattr(producer, "lora_enabled", False) or getattr(producer, "quantization_mode", None):
        return None, f"{kind} '{producer.name}' is quantized or has LoRA weights"
    if len(producer._inbound_nodes) != 1:
        return None, f"{kind} '{producer.name}' is applied more than once"
    # Compared, not serialized: Keras's serialize imports TensorFlow on any backend.
    if producer.activation not in (None, keras.activations.linear):
        return None, f"{kind} '{producer.name}' applies an activation"
    if counts.get(id(tensor), 0) != 1:
        return None, f"the output of {kind} '{producer.name}' is used elsewhere too"
    rank = len(tensor.shape)
    axis = bn.axis if isinstance(bn.axis, int) else None
    if axis is None or axis % rank != _channel_axis(producer, rank):
        return None, f"its axis is not the channel axis of {kind} '{producer.name}'"
    return producer, ""


def fold_plan(model: keras.Model) -> dict[str, FoldStep]:
    """What `fold_batch_norm` does with each batch-norm layer of `model`, in network order.

    Args:
        model: A built `keras.Sequential` or functional `keras.Model`.

    Returns:
        Per batch-norm layer (`"outer/inner"` for one inside a nested Sequential or functional
        model), a `FoldStep`: the name of the layer it folds into, or `None` and the reason it
        stays a per-channel multiply-add.
    """
    _check_model(model)
    counts = _consumer_counts(model)
    plan: dict[str, FoldStep] = {}
    for layer in model.layers:
        if _is_graph_model(layer):
            for name, step in fold_plan(layer).items():
                plan[f"{layer.name}/{name}"] = step
        elif isinstance(layer, keras.layers.BatchNormalization):
            producer, reason = _producer_of(layer, model, counts)
            plan[layer.name] = FoldStep(None if producer is None else producer.name, reason)
    return plan


def folded_weights(producer, bn) -> dict[str, np.ndarray]:
    """The scaled kernel and the bias of `producer` with `bn` folded in, by variable attribute."""
    attribute, axes = _KERNELS[type(producer)]
    kernel_variable = getattr(producer, attribute)
    kernel = np.asarray(keras.ops.convert_to_numpy(kernel_variable), np.float64)
    scale, offset = batch_norm_affine(bn)
    if axes == "last":
        factor = scale
    elif axes == "second_last":
        factor = scale[:, None]
    else:  # "last_two": a depthwise kernel (..., in, multiplier)
        factor = scale.reshape(kernel.shape[-2:])
    bias = 0.0
    if producer.use_bias:
        bias = np.asarray(keras.ops.convert_to_numpy(producer.bias), np.float64)
    dtype = keras.backend.standardize_dtype(kernel_variable.dtype)
    # (bias - mean) * s + beta, with offset = beta - mean * s.
    return {
        attribute: (kernel * factor).astype(dtype),
        "bias": (bias * scale + offset).astype(dtype),
    }


@keras.saving.register_keras_serializable(package="tfbn")
class ChannelAffine(keras.layers.Layer):
    """`x * scale + offset` per channel: an inference-mode batch norm that could not be folded."""

    def __init__(self, axis: int = -1, **kwargs):
        super().__init__(**kwargs)
        self.axis = int(axis)

    def build(self, input_shape):
        self._rank = len(input_shape)
        # float32 at least: a float16 scale and offset would round the statistics.
        self._math_dtype = "float64" if self.compute_dtype == "float64" else "float32"
        shape = (int(input_shape[self.axis]),)
        for name, initializer in (("scale", "ones"), ("offset", "zeros")):
            variable = self.add_weight(
                shape=shape,
                name=name,
                initializer=initializer,
                trainable=False,
                autocast=False,
                dtype=self._math_dtype,
            )
            setattr(self, name, variable)

    def call(self, inputs, mask=None, training=None):
        # `mask` and `training` may come from the batch-norm layer's recorded call: ignored.
        del mask, training
        shape = [1] * self._rank
        shape[self.axis % self._rank] = -1
        x = keras.ops.cast(inputs, self._math_dtype)
        x = x * keras.ops.reshape(self.scale, shape) + keras.ops.reshape(self.offset, shape)
        return keras.ops.cast(x, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "axis": self.axis}


@keras.saving.register_keras_serializable(package="tfbn")
class FoldedAway(keras.layers.Layer):
    """Passes its input through: the place of a batch-norm layer folded into the one before."""

    def call(self, inputs, mask=None, training=None):
        del mask, training
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape


def _check_model(model) -> None:
    if not isinstance(model, keras.Model) or not model.built:
        raise ValueError(
            "Argument `model` must be a built keras.Sequential or functional keras.Model; "
            f"received model={model!r}."
        )
    if not _is_graph_model(model):
        raise ValueError(
            "Argument `model` must be a Sequential or functional model (a graph of layers) to "
            f"fold its batch norms; received a subclassed model of type {type(model).__name__}."
        )


def _summary(plan: dict[str, FoldStep]) -> str:
    folded = sum(step.into is not None for step in plan.values())
    kept = {name: step.reason for name, step in plan.items() if step.into is None}
    line = f"Folded {folded} of {len(plan)} batch-norm layers into the layer before them"
    if kept:
        line += f"; {len(kept)} kept as per-channel multiply-adds: " + "; ".join(
            f"{name} ({reason})" for name, reason in kept.items()
        )
    return line + "."


def fold_batch_norm(model: keras.Model, *, verbose: int = 0) -> keras.Model:
    """Returns an inference-only copy of `model` with its batch-norm layers folded away.

    Each batch-norm layer that `fold_plan` can fold is merged into the layer before it (which gets
    a bias if it had none) and replaced by a pass-through; every other one becomes one
    per-channel multiply-add with its moving statistics. Nested Sequential and functional models
    are folded inside; other layers are copied with their variables.

    Args:
        model: A built `keras.Sequential` or functional `keras.Model`.
        verbose: `1` prints one line saying how many batch norms were folded, and why any were
            not; `0` prints nothing.

    Returns:
        A new model with the same inputs and outputs, for inference. `model` is not modified.

    Raises:
        ValueError: if `model` is not a built Sequential or functional model.
    """
    plan = fold_plan(model)
    if verbose:
        print(_summary(plan))
    return _fold(model, plan, prefix="")


def _fold(model: keras.Model, plan: dict[str, FoldStep], prefix: str) -> keras.Model:
    """Folds `model`, whose batch norms are in `plan` under `prefix` + their name."""
    own = {
        name[len(prefix) :]: step
        for name, step in plan.items()
        if name.startswith(prefix) and "/" not in name[len(prefix) :]
    }
    folded_into = {step.into: name for name, step in own.items() if step.into}
    sources: list = []

    def clone_layer(layer):
        if _is_graph_model(layer):
            return _fold(layer, plan, prefix=f"{prefix}{layer.name}/")
        step = own.get(layer.name)
        if step is not None and isinstance(layer, keras.layers.BatchNormalization):
            clone = (
                FoldedAway(name=layer.name)
                if step.into
                else ChannelAffine(layer.axis, name=layer.name, dtype=layer.dtype_policy)
            )
        else:
            config = layer.get_config()
            if layer.name in folded_into:
                config.update(use_bias=True, bias_initializer="zeros")
            clone = layer.__class__.from_config(config)
        sources.append((layer, clone))
        return clone

    folded = keras.models.clone_model(model, clone_function=clone_layer)
    by_name = {layer.name: layer for layer in model.layers}
    for source, clone in sources:
        if isinstance(clone, FoldedAway):
            continue
        if isinstance(clone, ChannelAffine):
            scale, offset = batch_norm_affine(source)
            clone.scale.assign(scale.astype(clone.scale.dtype))
            clone.offset.assign(offset.astype(clone.offset.dtype))
        elif source.name in folded_into:
            bn = by_name[folded_into[source.name]]
            weights = folded_weights(source, bn)
            kept = {v.name: v for v in source.variables}
            for variable in clone.variables:
                value = weights[variable.name] if variable.name in weights else kept[variable.name]
                variable.assign(keras.ops.convert_to_numpy(value))
        else:
            for target, value in zip(clone.variables, source.variables, strict=True):
                target.assign(keras.ops.convert_to_numpy(value))
    return folded

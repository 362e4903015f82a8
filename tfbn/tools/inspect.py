"""Batch-norm health: each layer's moving statistics against the data it receives.

`inspect(model, data)` makes one pass over `data` and, for every batch-norm layer of the model
(`keras.layers.BatchNormalization`, `tfbn.BatchNorm` included, nested Sequential and functional
models included), compares its moving mean and variance with the population statistics of the
input it receives, channel by channel.

The reference: each layer's input when the batch-norm layers before it normalize with the
statistics of the current batch, as during training (the other layers run in inference mode, so
dropout is off and the reference is deterministic). That is the distribution the moving averages
were meant to track, and it does not depend on the moving statistics upstream: a damaged layer is
flagged and the healthy layers after it, which in inference mode merely receive its shifted
output, are not.

Per channel, the population mean and biased variance are exact over all values seen: per batch,
one read of each layer's input gives the sums of its values and squares shifted by a value of the
data (of the order of its spread, however large its mean), from which the layer is normalized;
the batches' statistics are merged in float64 on the host (Chan et al.'s pairwise update).
Keras 3 tracks the biased batch variance; tools that track the Bessel-corrected one are off by a
factor `n / (n - 1)`, far inside the default thresholds.

The effect on the model is measured in the same pass and compiled function: how far its output
in inference mode is from its output with every batch norm normalizing with batch statistics, on
the same batches (the inference part starts from the first tensor a batch norm changes). With
labels, the report also has the accuracy as is and with the measured statistics (a second pass,
in which they replace the moving statistics without changing the model). The compiled functions
are traced once per model graph and backend (`jax.jit` on JAX, `tf.function` on TensorFlow) and
kept with the model: a later call traces nothing again. TensorFlow is imported only on its
backend.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
import time
from collections.abc import Iterable, Iterator

import keras
import numpy as np

from tfbn.ops import core
from tfbn.tools import graph
from tfbn.tools.folding import fold_plan
from tfbn.tools.recalibration import batch_norm_layers
from tfbn.utils.arguments import check_count

__all__ = ["InspectReport", "LayerReport", "inspect"]

#: A channel whose population variance is at most this fraction of the layer's `epsilon` is dead:
#: its normalized output is constant.
DEAD_VARIANCE = 1e-4

#: With no layer flagged, an output gap (`InspectReport.output_gap`) above this fraction of the
#: output's scale makes the verdict "CHECK" instead of "OK".
OUTPUT_GAP_WARNING = 0.1


# ------------------------------------------------------------------------------------ the report
def _number(value) -> float | None:
    """A JSON-safe float: `None` for NaN and infinities."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@dataclasses.dataclass(frozen=True, repr=False)
class LayerReport:
    """One batch-norm layer's moving statistics against the population statistics of its input.

    Attributes:
        name: The layer's path (`"outer/inner"` inside a nested model).
        channels: Number of channels.
        mean_shift: Max over channels of `|moving_mean - population_mean| / population_std`.
        mean_shift_channel: The channel of `mean_shift`.
        variance_ratio: `moving_variance / population_variance` of the channel furthest from 1
            in log terms.
        variance_ratio_channel: The channel of `variance_ratio`.
        dead_channels: Channels whose population variance is ~0 (at most `DEAD_VARIANCE` times
            `epsilon`); left out of `mean_shift` and `variance_ratio`, not a fault.
        non_finite: Channels whose moving mean or variance is NaN or infinite; left out of
            `mean_shift` and `variance_ratio`, and a fault.
        foldable: Whether `tfbn.fold_batch_norm` folds the layer into the one before it.
        fold_reason: What it folds into, or why it cannot.
        flagged: Whether the layer's statistics are off (see `reasons`).
        reasons: One line per fault found.
        population_mean: Per channel, float64.
        population_variance: Per channel (biased), float64.
        moving_mean: Per channel, float64.
        moving_variance: Per channel, float64.
    """

    name: str
    channels: int
    mean_shift: float
    mean_shift_channel: int | None
    variance_ratio: float
    variance_ratio_channel: int | None
    dead_channels: int
    non_finite: int
    foldable: bool
    fold_reason: str
    flagged: bool
    reasons: tuple[str, ...]
    population_mean: np.ndarray
    population_variance: np.ndarray
    moving_mean: np.ndarray
    moving_variance: np.ndarray

    def to_dict(self) -> dict:
        """The scalars, JSON-safe (NaN and infinities as `None`); no per-channel arrays."""
        return {
            "name": self.name,
            "flagged": self.flagged,
            "reasons": list(self.reasons),
            "channels": self.channels,
            "mean_shift": _number(self.mean_shift),
            "mean_shift_channel": self.mean_shift_channel,
            "variance_ratio": _number(self.variance_ratio),
            "variance_ratio_channel": self.variance_ratio_channel,
            "dead_channels": self.dead_channels,
            "non_finite": self.non_finite,
            "foldable": self.foldable,
            "fold_reason": self.fold_reason,
        }

    def __repr__(self) -> str:
        state = "flagged" if self.flagged else "ok"
        return (
            f"<LayerReport {self.name!r} {state}: mean shift {self.mean_shift:.3g} std, "
            f"variance ratio {self.variance_ratio:.3g}>"
        )


@dataclasses.dataclass(frozen=True, repr=False)
class InspectReport:
    """What `inspect` found: one `LayerReport` per batch-norm layer and the effect on the output.

    Attributes:
        model: The model's name.
        examples: Number of examples the statistics were taken over.
        layers: One `LayerReport` per batch-norm layer, in network order.
        mean_threshold: A layer is flagged at a mean shift of this many population stds.
        variance_threshold: A layer is flagged at a variance ratio of this or its inverse.
        output_gap: Mean over all output values of `|inference - training|`, relative to
            `output_scale`: how far the model's inference-mode output is from its output with
            every batch norm normalizing with batch statistics.
        output_gap_max: The largest `|inference - training|`, relative to `output_scale`.
        output_scale: Mean of `|training-mode output|` over all output values.
        accuracy: Accuracy in inference mode as is, when `data` has labels, else `None`.
        accuracy_recalibrated: Accuracy with the population statistics `inspect` measured in
            place of the moving statistics, when `data` has labels and can be iterated twice
            (not a one-shot iterator), else `None`.
    """

    model: str
    examples: int
    layers: tuple[LayerReport, ...]
    mean_threshold: float
    variance_threshold: float
    output_gap: float
    output_gap_max: float
    output_scale: float
    accuracy: float | None = None
    accuracy_recalibrated: float | None = None

    @property
    def flagged(self) -> list[str]:
        """The names of the flagged layers, in network order."""
        return [layer.name for layer in self.layers if layer.flagged]

    def verdict(self) -> str:
        """One line: which layers are flagged, the output gap and, with labels, the accuracies.

        With no layer flagged, it reads "OK" only if the output gap is at most
        `OUTPUT_GAP_WARNING`; otherwise "CHECK": the layers pass the thresholds one by one, but
        together they move the output.
        """
        if math.isfinite(self.output_gap):
            gap = f"inference output off by {self.output_gap:.2%} of its scale"
        else:
            gap = "inference output not finite"
        accuracy = ""
        if self.accuracy is not None:
            accuracy += f"; accuracy {self.accuracy:.4f} as is"
        if self.accuracy_recalibrated is not None:
            accuracy += f", {self.accuracy_recalibrated:.4f} with the measured statistics"
        flagged, count = self.flagged, len(self.layers)
        if flagged:
            return (
                f"FLAGGED: {len(flagged)} of {count} batch-norm layers ({', '.join(flagged)}) do "
                f"not match the data ({gap}{accuracy}); recalibrate the model on it "
                "(tfbn.recalibrate)."
            )
        if self.output_gap <= OUTPUT_GAP_WARNING:
            return f"OK: all {count} batch-norm layers match the data ({gap}{accuracy})."
        if math.isfinite(self.output_gap):
            gap = (
                f"the inference output is {self.output_gap:.2%} of its scale away from the output "
                "with batch statistics"
            )
        else:
            gap = "the inference output is not finite"
        return (
            f"CHECK: no batch-norm layer's statistics are off by the thresholds, but {gap}"
            f"{accuracy} (a shift spread thinly over many channels or layers, or batch "
            "statistics that vary much at this batch size); lower the thresholds, or use larger "
            "batches, or recalibrate the model on the data (tfbn.recalibrate)."
        )

    def to_dict(self) -> dict:
        """The report as JSON-safe Python values (NaN and infinities as `None`)."""
        return {
            "model": self.model,
            "examples": self.examples,
            "flagged": self.flagged,
            "mean_threshold": self.mean_threshold,
            "variance_threshold": self.variance_threshold,
            "layers": [layer.to_dict() for layer in self.layers],
            "output_gap": _number(self.output_gap),
            "output_gap_max": _number(self.output_gap_max),
            "output_scale": _number(self.output_scale),
            "accuracy": _number(self.accuracy),
            "accuracy_recalibrated": _number(self.accuracy_recalibrated),
            "verdict": self.verdict(),
        }

    def __repr__(self) -> str:
        width = max(len("layer"), *(len(layer.name) for layer in self.layers))
        header = (
            f"  {'layer':<{width}}  channels  mean shift (std)  variance ratio  dead  "
            "non-finite  foldable"
        )
        lines = [
            f"Batch-norm statistics of model '{self.model}' on {self.examples} examples "
            f"(flagged: mean shift >= {self.mean_threshold:g} std or variance off by >= "
            f"{self.variance_threshold:g}x):",
            header,
        ]
        for layer in self.layers:
            mark = "!" if layer.flagged else " "
            lines.append(
                f"{mark} {layer.name:<{width}}  {layer.channels:>8}  {layer.mean_shift:>16.3f}  "
                f"{layer.variance_ratio:>14.3f}  {layer.dead_channels:>4}  {layer.non_finite:>10}  "
                f"{'yes' if layer.foldable else 'no':>8}"
            )
            lines.extend(f"      {reason}" for reason in layer.reasons)
        lines.append(self.verdict())
        return "\n".join(lines)


# -------------------------------------------------------------------------------------- the data
def _is_dataset(data) -> bool:
    tf = sys.modules.get("tensorflow")  # not imported: `data` is no dataset
    return tf is not None and isinstance(data, tf.data.Dataset)


def _split(batch):
    """`(x, y)` of a batch that is `x`, `(x,)`, `(x, y)` or `(x, y, sample_weight)`."""
    if isinstance(batch, tuple):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(batch)
        return x, y
    return batch, None


def _is_arrays(data) -> bool:
    """NumPy arrays `x` (a dict of them for several inputs) or a tuple `(x, y[, weights])`; a
    list is an iterable of batches."""
    if isinstance(data, list):
        return False
    x = _split(data)[0]
    leaves = keras.tree.flatten(x)
    return bool(leaves) and all(isinstance(leaf, np.ndarray) for leaf in leaves)


def _check_finite(x) -> None:
    for leaf in keras.tree.flatten(x):
        if np.issubdtype(leaf.dtype, np.floating):
            for start in range(0, len(leaf), 4096):
                if not np.all(np.isfinite(leaf[start : start + 4096])):
                    raise ValueError(
                        "Argument `data` holds non-finite values (NaN or infinity); the statistics "
                        "need finite inputs."
                    )


def _array_batches(x, y, batch_size: int) -> Iterator:
    length = len(keras.tree.flatten(x)[0])
    for start in range(0, length, batch_size):
        rows = slice(start, start + batch_size)
        yield (
            keras.tree.map_structure(lambda a, rows=rows: a[rows], x),
            None if y is None else y[rows],
        )


def _batches(data, batch_size: int | None, steps: int | None) -> tuple[Iterator, int | None]:
    """`data` as an iterator of `(x, y)` batches, and its number of batches where known.

    Arrays (`x` or a tuple `(x, y[, sample_weight])`) are cut into batches of `batch_size`
    (default 32); a `tf.data.Dataset` or another iterable gives batches as they are.
    """
    if _is_arrays(data):
        batch_size = 32 if batch_size is None else batch_size
        x, y = _split(data)
        lengths = {len(leaf) for leaf in keras.tree.flatten(x)}
        if y is not None:
            lengths |= {len(leaf) for leaf in keras.tree.flatten(y)}
        if len(lengths) > 1:
            raise ValueError(
                "Argument `data`: its arrays must have the same number of examples; received "
                f"lengths {sorted(lengths)}."
            )
        if lengths == {0}:
            raise ValueError("Argument `data` holds no examples.")
        _check_finite(x)
        length = math.ceil(lengths.pop() / batch_size)
        batches = _array_batches(x, y, batch_size)
    else:
        if batch_size is not None:
            raise ValueError(
                "Argument `batch_size` applies to NumPy arrays only: a dataset or an iterable "
                f"gives its own batches; received batch_size={batch_size!r}."
            )
        if isinstance(data, (str, bytes, dict)) or not isinstance(data, Iterable):
            raise ValueError(
                "Argument `data` must be NumPy arrays (x or a tuple (x, y)), a tf.data.Dataset or "
                f"an iterable of batches; received an object of type {type(data).__name__}."
            )
        length = len(data) if hasattr(data, "__len__") else None
        if _is_dataset(data):
            cardinality = int(data.cardinality())
            length = cardinality if cardinality >= 0 else None
        batches = (_split(batch if not isinstance(batch, list) else tuple(batch)) for batch in data)
    if steps is not None:
        batches = itertools.islice(batches, steps)
        length = steps if length is None else min(length, steps)
    return batches, length


def _check_first_batch(model, flat: graph.Graph, batch) -> None:
    """The batch's inputs have the model's input shapes (where both are known)."""
    x, _ = batch
    graph.check_input_shapes(model, flat, [tuple(np.shape(leaf)) for leaf in keras.tree.flatten(x)])


# ------------------------------------------------------------------------------ the computations
def _channel_axis(layer, rank: int) -> int:
    return int(layer.axis) % rank


def _batch_normalized(layer, x):
    """`x` normalized by `layer` with the statistics of the batch itself, and those statistics.

    One read of `x` gives both: per channel, the sums of `d = x - pivot` and of `d^2`, `pivot`
    being the channel's mean over the batch's first example (a value of the order of the data, so
    that the sums are of the order of its spread however large its mean: then the variance
    `E[d^2] - E[d]^2` keeps its precision in float32).

    Returns:
        `(y, (pivot, offset, variance, count))`: `y` in the dtype of `x`; per channel the pivot,
        the batch mean minus the pivot, the biased batch variance (all in the statistics dtype)
        and the int32 number of values per channel.
    """
    rank = len(x.shape)
    axis = _channel_axis(layer, rank)
    axes = tuple(i for i in range(rank) if i != axis)
    dtype = core.statistics_dtype(x.dtype)
    xf = keras.ops.cast(x, dtype)
    pivot = keras.ops.mean(xf[:1], axis=axes, keepdims=True)
    d = xf - pivot
    count = keras.ops.cast(keras.ops.size(x), "int32") // int(x.shape[axis])
    n = keras.ops.cast(count, dtype)
    offset = keras.ops.sum(d, axis=axes, keepdims=True) / n
    squares = keras.ops.sum(keras.ops.square(d), axis=axes, keepdims=True) / n
    variance = keras.ops.maximum(squares - keras.ops.square(offset), 0.0)
    inv = keras.ops.rsqrt(variance + keras.ops.cast(layer.epsilon, dtype))
    shape = [1] * rank
    shape[axis] = -1
    if layer.scale:
        inv = inv * keras.ops.reshape(keras.ops.cast(layer.gamma, dtype), shape)
    shift = -offset * inv
    if layer.center:
        shift = shift + keras.ops.reshape(keras.ops.cast(layer.beta, dtype), shape)
    y = d * inv + shift
    stats = tuple(keras.ops.reshape(t, (-1,)) for t in (pivot, offset, variance))
    return keras.ops.cast(y, x.dtype), (*stats, count)


def _outputs(flat: graph.Graph, values: dict):
    return [keras.ops.cast(values[key], "float32") for key in flat.outputs]


def _feed(flat: graph.Graph, inputs) -> dict:
    """The model's input tensors by key, for `graph.run`."""
    return dict(zip(flat.inputs, inputs, strict=True))


def _downstream_of_batch_norms(flat: graph.Graph, steps) -> set[int]:
    """The keys of the tensors that depend on the output of a batch norm of `steps`."""
    bn_ids = {id(step.layer) for step in steps}
    downstream: set[int] = set()
    for step in flat.steps:
        if id(step.layer) in bn_ids or any(key in downstream for key in step.inputs):
            downstream.update(step.outputs)
    return downstream


def _output_summary(inference, training, inputs):
    """`[sum |inference - training|, max |inference - training|, sum |training|, number of
    output values, 1 if every floating input value is finite else 0]`, float32."""
    gap = [keras.ops.abs(i - t) for i, t in zip(inference, training, strict=True)]
    finite = [
        keras.ops.all(keras.ops.isfinite(x))
        for x in inputs
        if keras.backend.is_float_dtype(keras.backend.standardize_dtype(x.dtype))
    ]
    all_finite = keras.ops.all(keras.ops.stack(finite)) if finite else True
    return keras.ops.stack(
        [
            sum(keras.ops.sum(g) for g in gap),
            keras.ops.max(keras.ops.stack([keras.ops.max(g) for g in gap])),
            sum(keras.ops.sum(keras.ops.abs(t)) for t in training),
            sum(keras.ops.cast(keras.ops.size(t), "float32") for t in training),
            keras.ops.cast(all_finite, "float32"),
        ]
    )


def _measure_function(flat: graph.Graph, steps, labelled: bool):
    """Per batch, in one function: the model with every batch norm of `steps` normalizing with
    batch statistics, and in inference mode from the first tensor a batch norm changes.

    It returns `"moments"`, `(3, channels of all layers)`: each layer's pivot, batch mean minus
    pivot and biased batch variance per channel (`_batch_normalized`), the layers one after the
    other; `"counts"`, `(layers,)` int32: values per channel; `"summary"`, as `_output_summary`;
    and with `labelled` the inference outputs, `"outputs"`. One array of statistics per batch:
    one transfer to the host.
    """
    bn_ids = {id(step.layer) for step in steps}
    downstream = _downstream_of_batch_norms(flat, steps)
    rerun = [step for step in flat.steps if any(key in downstream for key in step.outputs)]

    def measure(*inputs):
        stats = {}

        def call(step, args, kwargs):
            if id(step.layer) not in bn_ids:
                return step.layer(*args, **kwargs)
            y, stats[id(step.layer)] = _batch_normalized(step.layer, args[0])
            return y

        computed = graph.run(flat.steps, _feed(flat, inputs), call=call)
        training = _outputs(flat, computed)
        # The inference pass starts from the tensors no batch norm is upstream of: the same.
        shared = {key: value for key, value in computed.items() if key not in downstream}
        inference = _outputs(flat, graph.run(rerun, shared))
        ordered = [stats[id(step.layer)] for step in steps]
        dtypes = {keras.backend.standardize_dtype(s[0].dtype) for s in ordered}
        dtype = "float64" if "float64" in dtypes else "float32"
        result = {
            "moments": keras.ops.stack(
                [
                    keras.ops.concatenate([keras.ops.cast(s[i], dtype) for s in ordered])
                    for i in (0, 1, 2)
                ]
            ),
            "counts": keras.ops.stack([s[3] for s in ordered]),
            "summary": _output_summary(inference, training, inputs),
        }
        if labelled:
            result["outputs"] = tuple(inference)
        return result

    return measure


def _forward_function(flat: graph.Graph):
    """Per batch: the model's outputs in inference mode."""

    def forward(*inputs):
        return tuple(_outputs(flat, graph.run(flat.steps, _feed(flat, inputs))))

    return forward


def _compile(function, flat: graph.Graph, variables):
    """`function(values, inputs)` compiled once for batches of any size of the model's inputs,
    `values` holding one tensor per variable of `variables`."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        inputs = [
            tf.TensorSpec((None, *flat.tensors[key].shape[1:]), flat.tensors[key].dtype)
            for key in flat.inputs
        ]
        values = [tf.TensorSpec(v.shape, v.dtype) for v in variables]
        return tf.function(function, input_signature=[values, inputs])
    if backend == "jax":
        import jax

        return jax.jit(function)
    return function


class _Runner:
    """A per-batch function of the model, compiled once, with some variables read from the
    call's arguments (`overridden`) instead of the model.

    On JAX every variable of the model is an argument: `jax.jit` would otherwise bake the values
    of the first call into the compiled function.
    """

    def __init__(self, model, flat: graph.Graph, function, overridden=()):
        self.overridden = list(overridden)
        if keras.backend.backend() == "jax":
            unique = {id(v): v for v in model.variables}
            self.variables = list(unique.values())
        else:
            self.variables = self.overridden
        variables = self.variables

        def run(values, inputs):
            if not variables:
                return function(*inputs)
            with keras.StatelessScope(state_mapping=list(zip(variables, values, strict=True))):
                return function(*inputs)

        self.compiled = _compile(run, flat, variables)

    def state(self, overrides=()) -> list:
        """The values to call with: `overrides` for the overridden variables (in their order),
        the variables' own values for the others."""
        given = {
            id(v): np.asarray(value, keras.backend.standardize_dtype(v.dtype))
            for v, value in zip(self.overridden, overrides, strict=True)
        }
        return [given[id(v)] if id(v) in given else v.value for v in self.variables]

    def __call__(self, state: list, inputs: list):
        result = self.compiled(state, inputs)
        return keras.tree.map_structure(lambda t: np.asarray(keras.ops.convert_to_numpy(t)), result)


_FUNCTIONS = "_tfbn_inspect_functions"


def _runner(model, flat: graph.Graph, kind, make) -> _Runner:
    """The `_Runner` `kind` kept with `model` (made by `make()` when missing), so that a later
    call on the same graph and backend traces nothing again."""
    key = (keras.backend.backend(), tuple(id(step.node) for step in flat.steps))
    kept = model.__dict__.get(_FUNCTIONS)
    if kept is None or kept[0] != key:
        # Set past Keras's attribute tracking: the functions are no state of the model.
        kept = (key, {})
        object.__setattr__(model, _FUNCTIONS, kept)
    if kind not in kept[1]:
        kept[1][kind] = make()
    return kept[1][kind]


class _Moments:
    """Per channel: count, mean and sum of squared deviations, merged batch by batch in float64
    (Chan et al.'s pairwise update)."""

    def __init__(self, channels: int):
        self.count = np.zeros(channels)
        self.mean = np.zeros(channels)
        self.m2 = np.zeros(channels)

    def add(self, count, pivot, offset, variance) -> None:
        """Merges a batch's per-channel count, pivot, mean minus pivot and biased variance."""
        count = np.asarray(count, np.float64)
        mean = np.asarray(pivot, np.float64) + np.asarray(offset, np.float64)
        total = self.count + count
        weight = count / total
        delta = mean - self.mean
        self.m2 = (
            self.m2 + np.asarray(variance, np.float64) * count + delta**2 * self.count * weight
        )
        self.mean = self.mean + delta * weight
        self.count = total

    def variance(self) -> np.ndarray:
        return self.m2 / self.count


def _model_inputs(flat: graph.Graph, x) -> list:
    return [
        keras.ops.cast(keras.ops.convert_to_tensor(leaf), flat.tensors[key].dtype)
        for key, leaf in zip(flat.inputs, keras.tree.flatten(x), strict=True)
    ]


def _correct(y_true, y_pred: np.ndarray) -> int:
    """Correct predictions in a batch, read as Keras's accuracy metrics read them: integer or
    one-hot labels against the arg-max of several outputs; one output unit as a probability."""
    y_true = np.asarray(keras.ops.convert_to_numpy(y_true))
    y_pred = y_pred.reshape(len(y_pred), -1)
    if y_pred.shape[1] == 1:
        return int(np.sum((y_pred[:, 0] > 0.5) == (y_true.reshape(-1) > 0.5)))
    if y_true.ndim == 2 and y_true.shape == y_pred.shape:
        y_true = np.argmax(y_true, axis=-1)
    return int(np.sum(np.argmax(y_pred, axis=-1) == y_true.reshape(-1).astype(np.int64)))


class _Progress:
    """A progress bar over the batches (`verbose=1`), a line at the end (`verbose=2`)."""

    def __init__(self, verbose: int, length: int | None, what: str):
        self.verbose, self.what, self.started = verbose, what, time.perf_counter()
        self.bar = keras.utils.Progbar(length, unit_name="batch") if verbose == 1 else None

    def update(self, count: int) -> None:
        if self.bar is not None:
            self.bar.update(count)

    def end(self, count: int) -> None:
        if self.bar is not None and self.bar.target is None:
            self.bar.update(count, finalize=True)
        if self.verbose == 2:
            elapsed = time.perf_counter() - self.started
            print(f"{self.what}: {count} batches in {elapsed:.1f} s", flush=True)


# ------------------------------------------------------------------------------------ the verdict
def _layer_report(
    step, population_mean, population_variance, fold, mean_threshold, variance_threshold
):
    layer = step.layer
    channels = len(population_mean)
    moving_mean = np.asarray(keras.ops.convert_to_numpy(layer.moving_mean), np.float64)
    moving_variance = np.asarray(keras.ops.convert_to_numpy(layer.moving_variance), np.float64)

    non_finite = ~(np.isfinite(moving_mean) & np.isfinite(moving_variance))
    dead = population_variance <= DEAD_VARIANCE * layer.epsilon
    valid = ~non_finite & ~dead
    with np.errstate(divide="ignore", invalid="ignore"):
        shifts = np.abs(moving_mean - population_mean) / np.sqrt(population_variance)
        ratios = moving_variance / population_variance
        distance = np.abs(np.log(np.maximum(ratios, 1e-300)))
    mean_shift, mean_channel = math.nan, None
    variance_ratio, variance_channel = math.nan, None
    if valid.any():
        channel_ids = np.flatnonzero(valid)
        mean_channel = int(channel_ids[np.argmax(shifts[valid])])
        variance_channel = int(channel_ids[np.argmax(distance[valid])])
        mean_shift, variance_ratio = float(shifts[mean_channel]), float(ratios[variance_channel])

    reasons = []
    if non_finite.any():
        reasons.append(
            f"non-finite moving statistics (NaN or infinity) on {int(non_finite.sum())} channels"
        )
    if mean_channel is not None and mean_shift >= mean_threshold:
        reasons.append(f"moving mean off by {mean_shift:.3g} std on channel {mean_channel}")
    if variance_channel is not None and not (
        1.0 / variance_threshold < variance_ratio < variance_threshold
    ):
        reasons.append(
            f"moving variance {variance_ratio:.3g}x the population's on channel {variance_channel}"
        )
    return LayerReport(
        name=step.path,
        channels=channels,
        mean_shift=mean_shift,
        mean_shift_channel=mean_channel,
        variance_ratio=variance_ratio,
        variance_ratio_channel=variance_channel,
        dead_channels=int(dead.sum()),
        non_finite=int(non_finite.sum()),
        foldable=fold.into is not None,
        fold_reason=f"folds into '{fold.into}'" if fold.into else fold.reason,
        flagged=bool(reasons),
        reasons=tuple(reasons),
        population_mean=population_mean,
        population_variance=population_variance,
        moving_mean=moving_mean,
        moving_variance=moving_variance,
    )


# ---------------------------------------------------------------------------------------- the API
def _check_arguments(model, batch_size, steps, mean_threshold, variance_threshold) -> None:
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"Argument `model` must be a keras.Model; received an object of type "
            f"{type(model).__name__}."
        )
    check_count("batch_size", batch_size, none=True)
    check_count("steps", steps, none=True)
    for name, value, low in (
        ("mean_threshold", mean_threshold, 0.0),
        ("variance_threshold", variance_threshold, 1.0),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
            value_ok = False
        else:
            value_ok = math.isfinite(value) and value > low
        if not value_ok:
            raise ValueError(
                f"Argument `{name}` must be a finite number > {low:g}; received {name}={value!r}."
            )


def _bn_steps(model) -> tuple[graph.Graph, list]:
    layers = batch_norm_layers(model)
    if not layers:
        raise ValueError(
            f"Model '{model.name}' has no batch-norm layer (keras.layers.BatchNormalization or "
            "tfbn.BatchNorm): there are no statistics to inspect."
        )
    flat = graph.flatten(model)
    ids = {id(layer) for layer in layers}
    return flat, [step for step in flat.steps if id(step.layer) in ids]


def inspect(
    model: keras.Model,
    data,
    *,
    batch_size: int | None = None,
    steps: int | None = None,
    mean_threshold: float = 1.0,
    variance_threshold: float = 4.0,
    verbose: int = 1,
) -> InspectReport:
    """Compares every batch-norm layer's moving statistics with those of its input on `data`.

    One pass over `data` (two with labels) measures, per batch-norm layer and channel, the
    population mean and biased variance of the layer's input when the batch norms before it
    normalize with batch statistics (see the module docstring), and the gap between the model's
    output in inference mode and with batch statistics. A layer is flagged when, on any channel,
    its moving mean is `mean_threshold` population stds or more away, its moving variance is off
    by a factor `variance_threshold` or more (either way), or a moving statistic is NaN or
    infinite. Neither the model nor its variables are changed.

    Args:
        model: A Sequential or functional model with batch-norm layers
            (`keras.layers.BatchNormalization`, `tfbn.BatchNorm` included) anywhere in its graph,
            nested Sequential and functional models included.
        data: As `model.fit` takes it: NumPy arrays `x` or a tuple `(x, y)` or
            `(x, y, sample_weight)` (cut into batches of `batch_size`), a `tf.data.Dataset` or
            another iterable of batches (`x`, `(x,)`, `(x, y)` or `(x, y, sample_weight)`). With
            labels `y`, the report has the accuracy (integer or one-hot labels against the
            arg-max of the output; one output unit read as a probability).
        batch_size: Batch size for NumPy arrays (default 32); must be `None` otherwise. The
            reference normalizes with batch statistics, so it is that of training at this size.
        steps: Number of batches to use; `None` means all of `data`.
        mean_threshold: Flag a mean shift of this many population stds or more (> 0).
        variance_threshold: Flag a variance ratio of this or more, or its inverse or less (> 1).
        verbose: 0 prints nothing; 1 a progress bar per pass; 2 a line per pass.

    Returns:
        An `InspectReport`: a table when printed, `to_dict()` for JSON.

    Raises:
        ValueError: before any pass, if an argument is invalid, the model has no batch-norm layer
            (or one applied twice or hidden in a layer whose graph cannot be read), `data` is
            empty, holds non-finite values (NumPy arrays) or inputs of another shape than the
            model's; during the pass, if a batch of a dataset holds non-finite values.
    """
    _check_arguments(model, batch_size, steps, mean_threshold, variance_threshold)
    flat, bn_steps = _bn_steps(model)
    folds = fold_plan(model)
    batches, length = _batches(data, batch_size, steps)
    first = next(batches, None)
    if first is None:
        raise ValueError("Argument `data` holds no batches.")
    _check_first_batch(model, flat, first)
    labelled = first[1] is not None and len(flat.outputs) == 1

    measure = _runner(
        model,
        flat,
        ("measure", labelled),
        lambda: _Runner(model, flat, _measure_function(flat, bn_steps, labelled)),
    )
    state = measure.state()
    channels = [int(step.layer.moving_mean.shape[0]) for step in bn_steps]
    moments = _Moments(sum(channels))
    gap_sum = gap_max = scale_sum = values = 0.0
    examples = correct = count = 0
    progress = _Progress(verbose, length, "Statistics pass")
    for count, (x, y) in enumerate(itertools.chain([first], batches), start=1):
        inputs = _model_inputs(flat, x)
        result = measure(state, inputs)
        batch_gap, batch_gap_max, batch_scale, batch_values, finite = result["summary"].tolist()
        if not finite:
            raise ValueError(
                f"Argument `data`: batch {count} holds non-finite values (NaN or infinity); the "
                "statistics need finite inputs."
            )
        moments.add(np.repeat(result["counts"], channels), *result["moments"])
        gap_sum += batch_gap
        gap_max = float(np.maximum(gap_max, batch_gap_max))  # NaN stays NaN
        scale_sum += batch_scale
        values += batch_values
        examples += int(keras.ops.shape(inputs[0])[0])
        if labelled:
            correct += _correct(y, result["outputs"][0])
        progress.update(count)
    progress.end(count)

    bounds = np.cumsum([0, *channels])
    variance = moments.variance()
    layers = tuple(
        _layer_report(
            step,
            moments.mean[start:end],
            variance[start:end],
            folds[step.path],
            mean_threshold,
            variance_threshold,
        )
        for step, start, end in zip(bn_steps, bounds[:-1], bounds[1:], strict=True)
    )
    scale = scale_sum / values
    report = InspectReport(
        model=model.name,
        examples=examples,
        layers=layers,
        mean_threshold=float(mean_threshold),
        variance_threshold=float(variance_threshold),
        output_gap=gap_sum / values / scale if scale > 0 else math.nan,
        output_gap_max=gap_max / scale if scale > 0 else math.nan,
        output_scale=scale,
    )
    if labelled:
        recalibrated = None
        if not isinstance(data, Iterator):  # a one-shot iterator cannot give a second pass
            recalibrated = _recalibrated_accuracy(
                model, flat, bn_steps, layers, data, batch_size, steps, verbose
            )
        report = dataclasses.replace(
            report, accuracy=correct / examples, accuracy_recalibrated=recalibrated
        )
    return report


def _recalibrated_accuracy(model, flat, bn_steps, layers, data, batch_size, steps, verbose):
    """The accuracy on `data` with the measured population statistics as moving statistics."""
    moving = [v for step in bn_steps for v in (step.layer.moving_mean, step.layer.moving_variance)]
    forward = _runner(
        model, flat, "forward", lambda: _Runner(model, flat, _forward_function(flat), moving)
    )
    state = forward.state(
        [s for layer in layers for s in (layer.population_mean, layer.population_variance)]
    )
    batches, length = _batches(data, batch_size, steps)
    progress = _Progress(verbose, length, "Accuracy pass")
    correct = examples = count = 0
    for count, (x, y) in enumerate(batches, start=1):
        outputs = forward(state, _model_inputs(flat, x))
        correct += _correct(y, outputs[0])
        examples += len(outputs[0])
        progress.update(count)
    progress.end(count)
    return correct / examples

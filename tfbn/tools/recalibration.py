"""Population statistics: recompute every batch-norm layer's moving statistics over a dataset.

During training a batch-norm layer tracks its inference statistics with an exponential moving
average of batch statistics taken while the weights were still changing. Once training is over,
the weights are fixed, and a pass over the training data gives the statistics the network will
actually see: the chapter's "population statistics". `recalibrate` computes them in one of two
modes.

`mode="exact"` (the default) gives every layer the exact mean and biased variance of the inputs it
receives once every batch-norm layer before it uses its new statistics, the network otherwise in
inference mode. A layer's input depends only on the batch-norm layers upstream of it, so the
layers are measured level by level: level 1 holds the layers with no batch norm upstream, level
k those whose upstream batch norms are all in levels below k. Layers of one level share a pass
over the data, and each pass computes only the part of the network between the last level and
its own: the activations a pass hands on are kept in memory for the next one when they fit in
`max_cache_bytes` (for all examples); otherwise a pass starts from the latest that did fit, or
from the inputs.

`mode="fast"` makes `passes` passes (1 by default) over the whole network, as PyTorch's
`swa_utils.update_bn` does: in the first, every batch-norm layer normalizes with the statistics of
the current batch (all replicas together) while its input is measured; later passes run in
inference mode with the statistics of the pass before. Each layer then sees inputs normalized as
in training rather than with the final population statistics upstream: an approximation (see
docs/results for how close it is).

The passes run compiled functions (one per level in exact mode, one per kind of sweep in fast
mode), traced once per input signature whatever the batch size and kept with the model: a later
call on the same model, graph and strategy traces nothing again.

In both modes the statistics are exact for the inputs seen: per batch the mean and the sum of
squared deviations from it are taken in float64 (never `E[x^2] - E[x]^2`), merged across batches
with Chan et al.'s pairwise update; under a `tf.distribute` strategy they are all-reduced at every
batch and assigned to every replica's copy of the variables. Batch-norm layers are found by their
class, `keras.layers.BatchNormalization` (which `tfbn.BatchNorm` subclasses), anywhere in a
Sequential or functional model, nested Sequential and functional models included.
"""

from __future__ import annotations

import functools
import itertools
import time
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from tfbn.ops import nn as ops
from tfbn.tools import graph
from tfbn.utils.arguments import check_count

__all__ = ["batch_norm_layers", "recalibrate"]

MODES = ("exact", "fast")


def _is_batch_norm(layer) -> bool:
    return isinstance(layer, keras.layers.BatchNormalization)


# ------------------------------------------------------------------------------------ the plan
class _Plan(NamedTuple):
    """The model cut into segments between the levels of its batch-norm layers.

    Pass p (1-based) runs segment p - 1, which turns frontier p - 2 into frontier p - 1 (frontier
    -1 being the model's inputs), then measures the batch norms of level p, whose inputs are in
    frontier p - 1. A frontier holds every tensor computed so far that a later step still reads.
    """

    graph: graph.Graph
    steps: tuple  # the batch-norm steps, in network order
    levels: tuple[tuple, ...]  # levels[p - 1]: the batch-norm steps of level p
    segments: tuple[tuple, ...]  # segments[q]: the steps computed in pass q + 1
    frontiers: tuple[tuple[int, ...], ...]  # frontiers[q]: the keys after segment q


def _levels(steps) -> tuple[list[int], int]:
    """Per step, the segment it belongs to; and the number of batch-norm levels."""
    level_of: dict[int, int] = {}
    segment_of = []
    for step in steps:
        upstream = max((level_of.get(key, 0) for key in step.inputs), default=0)
        level = upstream + 1 if _is_batch_norm(step.layer) else upstream
        for key in step.outputs:
            level_of[key] = level
        segment_of.append(level)
    depth = max(
        (s for s, step in zip(segment_of, steps, strict=True) if _is_batch_norm(step.layer)),
        default=0,
    )
    return segment_of, depth


def _frontiers(flat, segment_of, depth) -> tuple[tuple[int, ...], ...]:
    """The keys each segment must hand on: made so far, read by a step of a later segment."""
    made_in = {key: -1 for key in flat.inputs}
    for step, segment in zip(flat.steps, segment_of, strict=True):
        made_in.update(dict.fromkeys(step.outputs, segment))
    last_use: dict[int, int] = {}
    for step, segment in zip(flat.steps, segment_of, strict=True):
        if segment < depth or _is_batch_norm(step.layer):  # run or measured in some pass
            for key in step.inputs:
                last_use[key] = max(last_use.get(key, -1), segment)
    return tuple(
        tuple(k for k, made in made_in.items() if made <= q < last_use.get(k, -1))
        for q in range(depth)
    )


def _plan(model: keras.Model) -> _Plan:
    flat = graph.flatten(model)
    bn_steps = [step for step in flat.steps if _is_batch_norm(step.layer)]
    _check_reachable(model, bn_steps)
    segment_of, depth = _levels(flat.steps)
    return _Plan(
        graph=flat,
        steps=tuple(bn_steps),
        levels=tuple(
            tuple(
                s for s, g in zip(flat.steps, segment_of, strict=True) if g == p and s in bn_steps
            )
            for p in range(1, depth + 1)
        ),
        segments=tuple(
            tuple(s for s, g in zip(flat.steps, segment_of, strict=True) if g == q)
            for q in range(depth)
        ),
        frontiers=_frontiers(flat, segment_of, depth),
    )


def _check_reachable(model: keras.Model, bn_steps) -> None:
    """Every batch-norm layer of `model` is called exactly once in its graph."""
    called = [step.layer for step in bn_steps]
    twice = sorted({layer.name for layer in called if sum(c is layer for c in called) > 1})
    if twice:
        raise ValueError(
            f"Batch-norm layers {twice} are applied more than once in model '{model.name}': "
            "each needs one input to take its statistics from."
        )
    hidden = [
        layer.name
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if _is_batch_norm(layer) and not any(layer is c for c in called)
    ]
    if hidden:
        raise ValueError(
            f"Batch-norm layers {hidden} of model '{model.name}' are inside a layer or subclassed "
            "model whose graph cannot be read, so their inputs cannot be computed. Build that "
            "block as a keras.Sequential or functional model, or recalibrate it on its own inputs."
        )


def batch_norm_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The batch-norm layers of a Sequential or functional model, in network order.

    Args:
        model: A Sequential or functional Keras model.

    Returns:
        Its `keras.layers.BatchNormalization` layers (`tfbn.BatchNorm` included), nested
        Sequential and functional models included, in the order the model applies them.

    Raises:
        ValueError: if `model` is not a graph of layers, or a batch-norm layer is applied more
            than once or hidden inside a layer whose graph cannot be read.
    """
    flat = graph.flatten(model)
    steps = [step for step in flat.steps if _is_batch_norm(step.layer)]
    _check_reachable(model, steps)
    return [step.layer for step in steps]


# ------------------------------------------------------------------------------ the statistics
def _moments(tensors, steps) -> list[tf.Tensor]:
    """Per batch-norm input, `[count, mean..., m2...]` over all replicas, in float64.

    `m2` is the sum of squared deviations from the mean, per channel, by `tfbn.ops.nn.centred`
    synchronized over the replicas: the result is that of one device holding the whole global
    batch.
    """
    packed = []
    for tensor, step in zip(tensors, steps, strict=True):
        x = tf.cast(tensor, tf.float64)
        stats = ops.centred(x, int(step.layer.axis), synchronized=True)
        packed.append(tf.concat([stats.count[:1], stats.mean, stats.variance * stats.count], 0))
    return packed


class _Accumulator:
    """Running count, mean and sum of squared deviations, merged batch by batch in float64."""

    def __init__(self):
        self.count = 0.0
        self.mean = 0.0
        self.m2 = 0.0

    def add(self, packed: np.ndarray) -> None:
        """Adds one batch's `[count, mean..., m2...]`."""
        count = float(packed[0])
        if count <= 0:
            return
        channels = (len(packed) - 1) // 2
        mean, m2 = packed[1 : 1 + channels], packed[1 + channels :]
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + np.square(delta) * (self.count * count / total)
        self.count = total

    @property
    def variance(self) -> np.ndarray:
        return self.m2 / self.count


def _local(strategy, results):
    """All replicas hold the same all-reduced values: the first local copy of each."""
    return tf.nest.map_structure(lambda v: strategy.experimental_local_results(v)[0], results)


# ------------------------------------------------------------------------------- the variables
def _statistics_variables(layer) -> list:
    names = ("moving_mean", "moving_variance", "moving_stddev")
    return [getattr(layer, n) for n in names if getattr(layer, n, None) is not None]


def _assign(layer, mean: np.ndarray, variance: np.ndarray) -> None:
    # In cross-replica context, assigning a distributed variable writes every replica's copy.
    layer.moving_mean.assign(mean.astype(layer.moving_mean.dtype))
    layer.moving_variance.assign(variance.astype(layer.moving_variance.dtype))
    if getattr(layer, "renorm", False) and getattr(layer, "moving_stddev", None) is not None:
        # With batch renormalization the next training step rebuilds the moving variance
        # from moving_stddev (variance = stddev^2 - epsilon): keep the two consistent.
        stddev = np.sqrt(variance + layer.epsilon)
        layer.moving_stddev.assign(stddev.astype(layer.moving_stddev.dtype))


def _finish_pass(steps, accumulators, number: int) -> None:
    """Assigns a pass's statistics, after checking every one is finite."""
    for step, accumulator in zip(steps, accumulators, strict=True):
        if accumulator.count == 0:
            raise ValueError(
                "Argument `dataset` gave no examples: the statistics cannot be computed."
            )
        if not (
            np.all(np.isfinite(accumulator.mean)) and np.all(np.isfinite(accumulator.variance))
        ):
            raise ValueError(
                f"Layer '{step.path}' received non-finite inputs (NaN or infinity) in pass "
                f"{number} of recalibration; no statistics were changed. Check the dataset for "
                "NaN or infinite values."
            )
    for step, accumulator in zip(steps, accumulators, strict=True):
        _assign(step.layer, accumulator.mean, accumulator.variance)


# ------------------------------------------------------------------------------------ the data
def _features(batch):
    """The model input of a batch that is `x`, `(x,)`, `(x, y)` or `(x, y, sample_weight)`."""
    if isinstance(batch, (tuple, list)):
        x, _, _ = keras.utils.unpack_x_y_sample_weight(tuple(batch))
        return x
    return batch


class _Batches:
    """The dataset's model inputs, batch by batch, as flat tuples (distributed under a strategy);
    iterable once per pass."""

    def __init__(self, dataset, steps: int | None, strategy: tf.distribute.Strategy):
        default = not tf.distribute.has_strategy() and strategy is tf.distribute.get_strategy()
        self.length = steps
        if isinstance(dataset, tf.data.Dataset):
            if steps is not None:
                dataset = dataset.take(steps)
            cardinality = int(dataset.cardinality())
            self.length = cardinality if cardinality >= 0 else None
            if not default:
                dataset = strategy.experimental_distribute_dataset(dataset)
        elif not default:
            raise ValueError(
                "Argument `dataset` must be a `tf.data.Dataset` when a tf.distribute strategy is "
                f"used; received an object of type {type(dataset).__name__}."
            )
        elif steps is None and hasattr(dataset, "__len__"):
            self.length = len(dataset)
        self.dataset, self.steps, self.strategy = dataset, steps, strategy

    def __iter__(self):
        batches = self.dataset
        if self.steps is not None and not isinstance(batches, tf.data.Dataset):
            batches = itertools.islice(batches, self.steps)
        for batch in batches:
            yield tuple(keras.tree.flatten(_features(batch)))

    def examples(self, values) -> int:
        """The number of examples in a batch of model inputs (over all replicas)."""
        return sum(int(tf.shape(v)[0]) for v in self.strategy.experimental_local_results(values[0]))


def _check_shapes(model: keras.Model, flat: graph.Graph, dataset) -> None:
    """The dataset's inputs have the model's input shapes (where both are known)."""
    if isinstance(dataset, tf.data.Dataset):
        shapes = [tuple(s.shape) for s in keras.tree.flatten(_features(dataset.element_spec))]
    elif isinstance(dataset, (list, tuple)) and dataset:
        shapes = [tuple(np.shape(x)) for x in keras.tree.flatten(_features(dataset[0]))]
    else:
        return  # a one-shot iterable: its first batch meets the model's own checks
    expected = [tuple(flat.tensors[key].shape) for key in flat.inputs]

    def fits(shape, want) -> bool:
        return len(shape) == len(want) and all(
            a is None or b is None or a == b for a, b in zip(shape[1:], want[1:], strict=True)
        )

    if len(shapes) != len(expected) or not all(map(fits, shapes, expected)):

        def show(found):
            return found[0] if len(found) == 1 else found

        raise ValueError(
            f"Argument `dataset`: its batches hold inputs of shape {show(shapes)}, but model "
            f"'{model.name}' takes inputs of shape {show(expected)}."
        )


def _bytes_per_example(flat: graph.Graph, keys) -> float:
    """The memory one example's tensors `keys` take (infinite if a size is unknown)."""
    total = 0.0
    for key in keys:
        tensor = flat.tensors[key]
        if any(d is None for d in tensor.shape[1:]):
            return float("inf")
        itemsize = np.dtype(keras.backend.standardize_dtype(tensor.dtype)).itemsize
        total += float(np.prod(tensor.shape[1:])) * itemsize
    return total


class _Progress:
    """A line per pass (`verbose` 1 or 2), and a progress bar over its batches (`verbose=1`)."""

    def __init__(self, verbose: int, passes: int, length: int | None):
        self.verbose, self.passes, self.length = verbose, passes, length
        self.bar, self.started = None, 0.0

    def start(self, number: int, steps) -> None:
        self.started = time.perf_counter()
        if self.verbose:
            names = ", ".join(step.path for step in steps[:3]) + (", ..." if len(steps) > 3 else "")
            layers = f"{len(steps)} layer{'s' if len(steps) > 1 else ''}"
            print(f"Recalibration pass {number}/{self.passes}: {layers} ({names})", flush=True)
        if self.verbose == 1:
            self.bar = keras.utils.Progbar(self.length, unit_name="batch")

    def update(self, batches: int) -> None:
        if self.bar is not None:
            self.bar.update(batches)

    def end(self, batches: int) -> None:
        if self.bar is not None and self.length is None:
            self.bar.update(batches, finalize=True)
        if self.verbose == 2:
            print(f"  {batches} batches in {time.perf_counter() - self.started:.1f} s", flush=True)


# ------------------------------------------------------------------------ compiled functions
def _on_replicas(strategy, replica_function, values):
    return strategy.run(replica_function, args=(values,))


class _Compiled:
    """`replica_function(values)` run on every replica of `strategy` in a `tf.function`.

    Plain tensors are traced once per signature (the shapes but the batch axis, the dtypes),
    whatever the batch size; distributed values once, then once more with relaxed shapes if
    the batch size changes. Each `_Compiled` traces a `functools.partial` of its own, which
    TensorFlow counts apart from every other function's: tracing one function per level is not
    "retracing".
    """

    def __init__(self, strategy, replica_function):
        self.run = functools.partial(_on_replicas, strategy, replica_function)
        self.traced: dict = {}

    def __call__(self, values: tuple):
        if any(isinstance(v, tf.distribute.DistributedValues) for v in values):
            if "relaxed" not in self.traced:
                self.traced["relaxed"] = tf.function(self.run, reduce_retracing=True)
            return self.traced["relaxed"](values)
        values = tuple(tf.convert_to_tensor(v) for v in values)
        key = tuple((tuple(v.shape[1:]), v.dtype) for v in values)
        if key not in self.traced:
            spec = tuple(tf.TensorSpec((None, *v.shape[1:]), v.dtype) for v in values)
            self.traced[key] = tf.function(self.run, input_signature=(spec,))
        return self.traced[key](values)


_FUNCTIONS = "_tfbn_recalibration_functions"


class _Functions:
    """The compiled functions of a model's recalibration passes, made when first needed.

    They are kept with the model (`_functions_for`) so that a later call on the same graph and
    strategy traces nothing again.
    """

    def __init__(self, plan: _Plan, strategy: tf.distribute.Strategy):
        self.plan, self.strategy = plan, strategy
        self.made: dict = {}

    def _get(self, key, make) -> _Compiled:
        if key not in self.made:
            self.made[key] = _Compiled(self.strategy, make())
        return self.made[key]

    def segment(self, q: int, measure: bool) -> _Compiled:
        """Segment `q` from frontier `q - 1` (or the inputs) to frontier `q`; returns that
        frontier and, with `measure`, the moments of level `q + 1`'s inputs."""
        plan = self.plan
        keys_in = plan.frontiers[q - 1] if q else plan.graph.inputs
        level = plan.levels[q] if measure else ()
        return self._get(
            ("segment", q, measure),
            lambda: _segment(plan.segments[q], keys_in, plan.frontiers[q], level),
        )

    def sweep(self, normalize: bool) -> _Compiled:
        return self._get(("sweep", normalize), lambda: _sweep(self.plan, normalize))


def _functions_for(model: keras.Model, plan: _Plan, strategy) -> _Functions:
    """The `_Functions` kept with `model` for `plan`'s graph and `strategy` (new ones if the
    graph or the strategy changed: only the latest are kept)."""
    key = (tuple(id(step.node) for step in plan.graph.steps), id(strategy))
    kept = model.__dict__.get(_FUNCTIONS)
    if kept is None or kept[0] != key:
        # Set past Keras's attribute tracking: the functions are no state of the model.
        kept = (key, _Functions(plan, strategy))
        object.__setattr__(model, _FUNCTIONS, kept)
    return kept[1]


# ---------------------------------------------------------------------------------- the passes
def _segment(steps, keys_in, keys_out, level):
    """A replica function: the tensors `keys_in` through `steps` to the tensors `keys_out`, and
    the moments of the inputs of the batch norms `level` (found among `keys_out`)."""

    def replica(values):
        computed = graph.run(steps, dict(zip(keys_in, values, strict=True)))
        moments = _moments([computed[step.inputs[0]] for step in level], level)
        return tuple(computed[key] for key in keys_out), tuple(moments)

    return replica


def _exact_passes(
    plan: _Plan, batches: _Batches, max_cache_bytes: int, progress, functions: _Functions
) -> dict:
    """Level-by-level passes; returns the accumulator of each batch-norm step.

    The latest frontier whose tensors for all examples fit in `max_cache_bytes` is kept in
    memory (with the one being built, up to twice that), and each pass starts from it, or from
    the inputs if none fits. Pass p makes one call per batch for segment p - 1 and the
    measurement of level p together (plus one per segment it recomputes).
    """
    strategy = batches.strategy
    sizes = [_bytes_per_example(plan.graph, keys) for keys in plan.frontiers]
    examples, checkpoint, kept, results = None, -1, None, {}
    for number, level in enumerate(plan.levels, start=1):
        q = number - 1
        if kept is None:  # from the inputs, through every segment up to q
            sources, first = ((v, batches.examples(v)) for v in batches), 0
        else:  # from the frontier kept in memory
            sources, first = ((v, 0) for v in kept), checkpoint + 1
        fits = examples is None or examples * sizes[q] <= max_cache_bytes
        keep = number < len(plan.levels) and fits
        new, seen, accumulators = [], 0, [_Accumulator() for _ in level]
        progress.start(number, level)
        count = 0
        for count, (values, size) in enumerate(sources, start=1):
            for p in range(first, q):
                values, _ = functions.segment(p, measure=False)(values)
            values, packed = functions.segment(q, measure=True)(values)
            for accumulator, moments in zip(accumulators, _local(strategy, packed), strict=True):
                accumulator.add(moments.numpy())
            seen += size
            if keep:
                new.append(values)
                if seen * sizes[q] > max_cache_bytes:
                    keep, new = False, []  # too large to keep: start from the one before
            progress.update(count)
        progress.end(count)
        examples = seen if examples is None else examples
        _finish_pass(level, accumulators, number)
        results.update(zip(level, accumulators, strict=True))
        if keep:
            kept, checkpoint = new, q
    return results


def _normalized(layer, x, packed):
    """`x` normalized with the batch statistics in `packed` (`[count, mean..., m2...]`)."""
    dtype = (
        "float32"
        if keras.backend.standardize_dtype(x.dtype) in ("float16", "bfloat16")
        else x.dtype
    )
    channels = (int(packed.shape[0]) - 1) // 2
    mean = tf.cast(packed[1 : 1 + channels], dtype)
    variance = tf.cast(tf.math.divide_no_nan(packed[1 + channels :], packed[0]), dtype)
    gamma = tf.cast(layer.gamma, dtype) if layer.scale else None
    beta = tf.cast(layer.beta, dtype) if layer.center else None
    axis = ops.canonical_axis(int(layer.axis), len(x.shape))
    y = keras.ops.batch_normalization(
        tf.cast(x, dtype), mean, variance, axis, offset=beta, scale=gamma, epsilon=layer.epsilon
    )
    return tf.cast(y, x.dtype)


def _sweep(plan: _Plan, normalize: bool):
    """A replica function: one pass over the network measuring every batch norm's input, each
    normalizing with those batch statistics (`normalize`) or in inference mode."""
    steps = [step for segment in plan.segments for step in segment]

    def replica(values):
        measured = {}

        def call(step, args, kwargs):
            if not _is_batch_norm(step.layer):
                return step.layer(*args, **kwargs)
            (measured[step],) = _moments([args[0]], [step])
            if normalize:
                return _normalized(step.layer, args[0], measured[step])
            return step.layer(*args, **kwargs)

        computed = graph.run(steps, dict(zip(plan.graph.inputs, values, strict=True)), call=call)
        last = plan.levels[-1]
        measured.update(
            zip(last, _moments([computed[s.inputs[0]] for s in last], last), strict=True)
        )
        return tuple(measured[step] for step in plan.steps)

    return replica


def _fast_passes(
    plan: _Plan, batches: _Batches, passes: int, progress, functions: _Functions
) -> dict:
    """`passes` sweeps over the whole network; returns the accumulator of each batch-norm step."""
    strategy = batches.strategy
    for number in range(1, passes + 1):
        sweep = functions.sweep(normalize=number == 1)
        accumulators = [_Accumulator() for _ in plan.steps]
        progress.start(number, plan.steps)
        count = 0
        for count, values in enumerate(batches, start=1):
            for accumulator, packed in zip(
                accumulators, _local(strategy, sweep(values)), strict=True
            ):
                accumulator.add(packed.numpy())
            progress.update(count)
        progress.end(count)
        _finish_pass(plan.steps, accumulators, number)
    return dict(zip(plan.steps, accumulators, strict=True))


# ------------------------------------------------------------------------------------- the API
def _check_mode(mode) -> None:
    if mode not in MODES:
        raise ValueError(f"Argument `mode` must be one of {MODES}; received mode={mode!r}.")


def _check_arguments(model, mode, passes, steps, max_cache_bytes) -> int:
    """Validates the arguments of `recalibrate`; returns the number of fast passes."""
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"Argument `model` must be a keras.Model; received an object of type "
            f"{type(model).__name__}."
        )
    _check_mode(mode)
    check_count("steps", steps, none=True)
    check_count("passes", passes, none=True)
    check_count("max_cache_bytes", max_cache_bytes, 0, none=True)
    if passes is not None and mode == "exact":
        raise ValueError(
            "Argument `passes` applies to mode='fast' only: the exact mode makes one pass per "
            f"level of batch-norm layers; received passes={passes!r} with mode='exact'."
        )
    return 1 if passes is None else int(passes)


def recalibrate(
    model: keras.Model,
    dataset,
    *,
    mode: str = "exact",
    passes: int | None = None,
    steps: int | None = None,
    strategy: tf.distribute.Strategy | None = None,
    max_cache_bytes: int = 2**30,
    verbose: int = 1,
) -> dict[str, dict[str, np.ndarray | float]]:
    """Sets every batch-norm layer's moving statistics to the population statistics of `dataset`.

    `moving_mean` and `moving_variance` become the mean and biased variance of the layer's input
    over all examples and all positions but the channel axis (see the module docstring for the
    two modes). If a pass fails (non-finite inputs, an interrupt), every layer keeps the
    statistics it had before the call.

    Args:
        model: A Sequential or functional model, built on its inputs, with batch-norm layers
            (`keras.layers.BatchNormalization`, `tfbn.BatchNorm` included) anywhere in its graph.
        dataset: Batches of `x`, `(x, y)` or `(x, y, sample_weight)`: a `tf.data.Dataset`, or
            (without a distribution strategy) any re-iterable of batches. Labels are ignored. It
            must give the same examples at each pass (shuffling only changes the order).
        mode: `"exact"` (level by level) or `"fast"` (`passes` sweeps of the whole network).
        passes: Number of sweeps in fast mode (default 1); not used in exact mode.
        steps: Number of batches to use per pass; `None` means the whole dataset.
        strategy: The `tf.distribute` strategy whose replicas hold the model's variables;
            `None` means the current strategy. Per-replica sums are all-reduced at every batch
            and every replica's copy of the variables receives the same statistics.
        max_cache_bytes: Exact mode keeps the activations a pass hands to the next one in memory
            when all examples' take at most this many bytes; otherwise each pass recomputes them.
        verbose: 0 prints nothing; 1 a line and a progress bar per pass; 2 a line per pass.

    Returns:
        Per layer (`"outer/inner"` for one inside a nested model), a dict with `count` (values per
        channel the statistics were taken over), `old_mean`, `old_variance`, `new_mean` and
        `new_variance` (float64 NumPy arrays).

    Raises:
        ValueError: if an argument is invalid, the model has no batch-norm layer or one that
            cannot be reached (applied twice, hidden in a layer whose graph cannot be read), the
            dataset's inputs do not have the model's shape, the dataset is empty, or a layer
            receives non-finite inputs.
    """
    passes = _check_arguments(model, mode, passes, steps, max_cache_bytes)
    plan = _plan(model)
    if not plan.steps:
        raise ValueError(
            f"Model '{model.name}' has no batch-norm layer (keras.layers.BatchNormalization or "
            "tfbn.BatchNorm): there are no statistics to recalibrate."
        )
    _check_shapes(model, plan.graph, dataset)
    batches = _Batches(dataset, steps, strategy or tf.distribute.get_strategy())
    functions = _functions_for(model, plan, batches.strategy)
    plan = functions.plan  # the same graph: the steps the kept functions were made from
    before = {step: [v.numpy() for v in _statistics_variables(step.layer)] for step in plan.steps}
    try:
        if mode == "exact":
            progress = _Progress(verbose, len(plan.levels), batches.length)
            results = _exact_passes(plan, batches, max_cache_bytes, progress, functions)
        else:
            progress = _Progress(verbose, passes, batches.length)
            results = _fast_passes(plan, batches, passes, progress, functions)
    except BaseException:
        for step, values in before.items():
            for variable, value in zip(_statistics_variables(step.layer), values, strict=True):
                variable.assign(value)
        raise
    return {
        step.path: {
            "count": results[step].count,
            "old_mean": np.asarray(before[step][0], np.float64),
            "old_variance": np.asarray(before[step][1], np.float64),
            "new_mean": results[step].mean,
            "new_variance": results[step].variance,
        }
        for step in plan.steps
    }

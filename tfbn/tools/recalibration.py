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

The data come as `model.fit` takes them: NumPy arrays (cut into batches), a `tf.data.Dataset` or
any iterable of batches. The passes run compiled functions (one per level in exact mode, one per
kind of sweep in fast mode), kept with the model: a later call on the same model, graph and
strategy compiles nothing again. On TensorFlow they are `tf.function`s run on every replica of a
`tf.distribute` strategy, traced once per input signature whatever the batch size; on JAX they
are `jax.jit` functions of the model's variables (compiled once per batch shape); other backends
run them eagerly. Only the TensorFlow backend imports TensorFlow.

In both modes the statistics are those of the inputs seen, to the float32 rounding of one
batch's sums (about 1e-5 relative): per batch and replica, the sums of
`x - p` and `(x - p)^2` are taken on the device in the input's precision (float32 for float16,
bfloat16 and float32), `p` a per-channel pivot inside the data (the channel's mean over the
batch's first example), so that the sums are of the order of the spread of the data, not of its
mean; they are merged across replicas and batches in float64 on the host with Chan et al.'s
pairwise update (never `E[x^2] - E[x]^2` of raw values). Under a `tf.distribute` strategy every
replica's sums are gathered at every batch, and every replica's copy of the variables receives
the same statistics. Batch-norm layers are found by their class,
`keras.layers.BatchNormalization` (which `tfbn.BatchNorm` subclasses), anywhere in a Sequential
or functional model, nested Sequential and functional models included.
"""

from __future__ import annotations

import functools
import itertools
import math
import sys
import time
from collections.abc import Iterable
from typing import NamedTuple

import keras
import numpy as np

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


# ------------------------------------------------------------------------------ the backends
def _on_tensorflow() -> bool:
    return keras.backend.backend() == "tensorflow"


def _tf():
    """TensorFlow, imported on the TensorFlow backend only."""
    import tensorflow as tf

    return tf


# ------------------------------------------------------------------------------ the statistics
def _statistics_dtype(x) -> str:
    return "float64" if keras.backend.standardize_dtype(x.dtype) == "float64" else "float32"


def _batch_sums(x, axis: int):
    """One replica's batch, per channel: `(count, [pivot, sum(x - pivot), sum((x - pivot)^2)])`.

    `count` (int32) is the number of values per channel; the sums (3, channels) are in
    `_statistics_dtype`. The pivot is the channel's mean over the batch's first example (0 for an
    empty batch): a value inside the data, so that the shifted values are of the order of its
    spread.
    """
    rank = len(x.shape)
    axis %= rank
    axes = tuple(i for i in range(rank) if i != axis)
    channels = int(x.shape[axis])
    x = keras.ops.cast(x, _statistics_dtype(x))
    first = x[:1]
    per_example = keras.ops.cast(keras.ops.size(first) // channels, x.dtype)
    pivot = keras.ops.sum(first, axis=axes, keepdims=True) / keras.ops.maximum(per_example, 1)
    shifted = x - pivot
    sums = keras.ops.stack(
        [
            keras.ops.reshape(pivot, (channels,)),
            keras.ops.sum(shifted, axis=axes),
            keras.ops.sum(keras.ops.square(shifted), axis=axes),
        ]
    )
    count = keras.ops.cast(keras.ops.size(x) // channels, "int32")
    return _gathered(count, sums)


def _gathered(count, sums):
    """`(counts (replicas,), sums (replicas, 3, channels))` of every replica in sync."""
    if _on_tensorflow():
        context = _tf().distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            return context.all_gather(count[None], 0), context.all_gather(sums[None], 0)
    return keras.ops.reshape(count, (1,)), sums[None]


def _batch_moments(counts, sums):
    """The mean and biased variance of the global batch from `_gathered` sums, on the device.

    The replicas' sums are moved to the first replica's pivot before they are merged, so that
    the merge works on values of the order of the spread, as the sums do.
    """
    dtype = sums.dtype
    n = keras.ops.cast(counts, dtype)[:, None]
    safe = keras.ops.maximum(n, 1)
    pivot = sums[:1, 0]
    offsets = (sums[:, 0] - pivot) + sums[:, 1] / safe  # each replica's mean - pivot
    m2 = sums[:, 2] - sums[:, 1] * (sums[:, 1] / safe)
    total = keras.ops.maximum(keras.ops.sum(n), 1)
    offset = keras.ops.sum(n * offsets, axis=0) / total
    m2 = keras.ops.sum(m2, axis=0) + keras.ops.sum(n * keras.ops.square(offsets - offset), axis=0)
    return pivot[0] + offset, keras.ops.maximum(m2, 0) / total


class _Accumulator:
    """Running count, mean and sum of squared deviations, merged batch by batch in float64."""

    def __init__(self):
        self.count = 0.0
        self.mean = 0.0
        self.m2 = 0.0

    def add(self, counts: np.ndarray, sums: np.ndarray) -> None:
        """Adds one batch's `_gathered` sums (as NumPy arrays), replica by replica."""
        for count, (pivot, s1, s2) in zip(counts, np.asarray(sums, np.float64), strict=True):
            count = float(count)
            if count <= 0:
                continue
            mean = pivot + s1 / count
            m2 = np.maximum(s2 - s1 * (s1 / count), 0.0)
            total = self.count + count
            delta = mean - self.mean
            self.mean = self.mean + delta * (count / total)
            self.m2 = self.m2 + m2 + np.square(delta) * (self.count * count / total)
            self.count = total

    @property
    def variance(self) -> np.ndarray:
        return self.m2 / self.count


def _to_numpy(strategy, results):
    """The results of a compiled function as NumPy arrays (under a strategy every replica holds
    the same gathered values: the first local copy of each)."""
    if strategy is not None:
        results = _tf().nest.map_structure(
            lambda v: strategy.experimental_local_results(v)[0], results
        )
    return keras.tree.map_structure(keras.ops.convert_to_numpy, results)


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
            raise ValueError("Argument `data` gave no examples: the statistics cannot be computed.")
        if not (
            np.all(np.isfinite(accumulator.mean)) and np.all(np.isfinite(accumulator.variance))
        ):
            raise ValueError(
                f"Layer '{step.path}' received non-finite inputs (NaN or infinity) in pass "
                f"{number} of recalibration; no statistics were changed. Check the data for "
                "NaN or infinite values."
            )
    for step, accumulator in zip(steps, accumulators, strict=True):
        _assign(step.layer, accumulator.mean, accumulator.variance)


# ------------------------------------------------------------------------------------ the data
def _is_dataset(data) -> bool:
    tf = sys.modules.get("tensorflow")  # no Dataset exists before TensorFlow is imported
    return tf is not None and isinstance(data, tf.data.Dataset)


def _features(batch):
    """The model input of a batch that is `x`, `(x,)`, `(x, y)` or `(x, y, sample_weight)`."""
    if isinstance(batch, (tuple, list)):
        x, _, _ = keras.utils.unpack_x_y_sample_weight(tuple(batch))
        return x
    return batch


def _is_array(value) -> bool:
    """A NumPy array or a tensor (anything with a shape, a dtype and `__array__`)."""
    return isinstance(value, np.ndarray) or all(
        hasattr(value, name) for name in ("shape", "dtype", "__array__")
    )


def _arrays(data):
    """`data` split into `(x, labels)` if it is arrays as `model.fit` takes them (`x`, a dict of
    arrays, or a tuple `(x,)`, `(x, y)`, `(x, y, sample_weight)` of them), else `None`. A list is
    an iterable of batches."""
    if isinstance(data, list) or _is_dataset(data):
        return None
    if isinstance(data, tuple):
        if not data or len(data) > 3:
            return None
        x, labels = data[0], tuple(a for a in data[1:] if a is not None)
    else:
        x, labels = data, ()
    leaves = keras.tree.flatten(x)
    if not leaves or not all(_is_array(leaf) and np.ndim(leaf) >= 1 for leaf in leaves):
        return None
    return x, labels


def _check_arrays(x, labels) -> int:
    """The number of examples of arrays `x` (with their `labels`), checked: the same number in
    every array, at least one, every value finite."""
    lengths = {len(leaf) for leaf in keras.tree.flatten((x, labels))}
    if len(lengths) > 1:
        raise ValueError(
            "Argument `data`: its arrays must have the same number of examples; received "
            f"lengths {sorted(lengths)}."
        )
    (examples,) = lengths
    if examples == 0:
        raise ValueError("Argument `data` holds no examples: the statistics cannot be computed.")
    for leaf in keras.tree.flatten(x):
        if np.issubdtype(np.asarray(leaf[:0]).dtype, np.floating):
            for start in range(0, examples, 4096):
                if not np.all(np.isfinite(np.asarray(leaf[start : start + 4096]))):
                    raise ValueError(
                        "Argument `data` holds non-finite values (NaN or infinity); population "
                        "statistics need finite inputs."
                    )
    return examples


def _array_batches(x, examples: int, batch_size: int):
    for start in range(0, examples, batch_size):
        yield keras.tree.map_structure(lambda a, s=start: a[s : s + batch_size], x)


class _Batches:
    """The data's model inputs, batch by batch, as flat tuples (distributed under a strategy);
    iterable once per pass.

    Attributes:
        strategy: The `tf.distribute` strategy (TensorFlow; `None` on other backends).
        length: The number of batches per pass, or `None` if unknown.
    """

    def __init__(self, data, batch_size: int | None, steps: int | None, strategy):
        self.strategy, self.steps = strategy, steps
        distributed = strategy is not None and not _is_default(strategy)
        arrays = _arrays(data)
        self.shapes = None  # the shapes of the first batch's inputs, where known before a pass
        if arrays is not None:
            batch_size = 32 if batch_size is None else batch_size
            x, labels = arrays
            examples = _check_arrays(x, labels)
            self.shapes = [(None, *np.shape(leaf)[1:]) for leaf in keras.tree.flatten(x)]
            self.length = math.ceil(examples / batch_size)
            if distributed:
                dataset = _tf().data.Dataset.from_tensor_slices(x).batch(batch_size)
                data = strategy.experimental_distribute_dataset(dataset)
            else:
                data = _Rebatched(x, examples, batch_size)
        elif batch_size is not None:
            raise ValueError(
                "Argument `batch_size` applies to arrays only: a dataset or an iterable gives "
                f"its own batches; received batch_size={batch_size!r}."
            )
        elif isinstance(data, (str, bytes, dict)) or not isinstance(data, Iterable):
            raise ValueError(
                "Argument `data` must be NumPy arrays (x or a tuple (x, y)), a tf.data.Dataset or "
                f"an iterable of batches; received an object of type {type(data).__name__}."
            )
        elif _is_dataset(data):
            self.length = self._dataset_length(data)
            spec = keras.tree.flatten(_features(data.element_spec))
            self.shapes = [tuple(s.shape) for s in spec]
            if distributed:
                data = strategy.experimental_distribute_dataset(data)
            elif not _on_tensorflow():
                data = _NumpyDataset(data)
        elif distributed:
            raise ValueError(
                "Argument `data` must be arrays or a `tf.data.Dataset` when a tf.distribute "
                f"strategy is used; received an object of type {type(data).__name__}."
            )
        else:
            self.length = len(data) if hasattr(data, "__len__") else None
            if self.length == 0:
                raise ValueError("Argument `data` holds no examples: it is empty.")
            if isinstance(data, (list, tuple)):
                self.shapes = _shapes(data[0])
        if steps is not None:
            self.length = steps if self.length is None else min(self.length, steps)
        self.data = data

    @staticmethod
    def _dataset_length(dataset) -> int | None:
        cardinality = int(dataset.cardinality())
        if cardinality == 0:
            raise ValueError("Argument `data` holds no examples: it is an empty dataset.")
        return cardinality if cardinality >= 0 else None

    def __iter__(self):
        for batch in itertools.islice(self.data, self.steps):
            yield tuple(keras.tree.flatten(_features(batch)))

    def examples(self, values) -> int:
        """The number of examples in a batch of model inputs (over all replicas)."""
        if self.strategy is None or _is_default(self.strategy):
            return int(values[0].shape[0])
        local = self.strategy.experimental_local_results(values[0])
        return sum(int(_tf().shape(v)[0]) for v in local)


class _Rebatched:
    """Arrays `x` in batches of `batch_size`, iterable again and again."""

    def __init__(self, x, examples: int, batch_size: int):
        self.x, self.examples, self.batch_size = x, examples, batch_size

    def __iter__(self):
        return _array_batches(self.x, self.examples, self.batch_size)


class _NumpyDataset:
    """A `tf.data.Dataset` as NumPy batches (for backends other than TensorFlow)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __iter__(self):
        return self.dataset.as_numpy_iterator()


def _is_default(strategy) -> bool:
    tf = _tf()
    return not tf.distribute.has_strategy() and strategy is tf.distribute.get_strategy()


def _shapes(batch) -> list[tuple]:
    return [tuple(np.shape(x)) for x in keras.tree.flatten(_features(batch))]


class _Checked:
    """`batches` whose first batch of each pass is checked against the model's input shapes
    (the data whose shapes are not known before a pass: one-shot iterables, generators)."""

    def __init__(self, model: keras.Model, flat: graph.Graph, batches: _Batches):
        self.model, self.flat, self.batches = model, flat, batches
        self.strategy, self.length = batches.strategy, batches.length

    def __iter__(self):
        for index, values in enumerate(self.batches):
            if index == 0 and (self.strategy is None or _is_default(self.strategy)):
                graph.check_input_shapes(self.model, self.flat, [tuple(v.shape) for v in values])
            yield values

    def examples(self, values) -> int:
        return self.batches.examples(values)


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
        tf = _tf()
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


class _Jitted:
    """`function(values)` compiled with `jax.jit` as a pure function of the model's variables,
    whose current values it receives at every call (Keras's stateless scope): new statistics
    upstream are seen without compiling again."""

    def __init__(self, variables: list, function):
        import jax

        def stateless(state, values):
            with keras.StatelessScope(state_mapping=list(zip(variables, state, strict=True))):
                return function(values)

        self.variables = variables
        self.jitted = jax.jit(stateless)

    def __call__(self, values: tuple):
        return self.jitted([v.value for v in self.variables], tuple(values))


_FUNCTIONS = "_tfbn_recalibration_functions"


class _Functions:
    """The compiled functions of a model's recalibration passes, made when first needed.

    They are kept with the model (`_functions_for`) so that a later call on the same graph and
    strategy compiles nothing again.
    """

    def __init__(self, plan: _Plan, strategy, variables: list):
        self.plan, self.strategy, self.variables = plan, strategy, variables
        self.made: dict = {}

    def _get(self, key, make):
        if key not in self.made:
            if self.strategy is not None:
                self.made[key] = _Compiled(self.strategy, make())
            elif keras.backend.backend() == "jax":
                self.made[key] = _Jitted(self.variables, make())
            else:  # another backend: Keras's eager calls
                self.made[key] = make()
        return self.made[key]

    def segment(self, q: int, measure: bool):
        """Segment `q` from frontier `q - 1` (or the inputs) to frontier `q`; returns that
        frontier and, with `measure`, the sums of level `q + 1`'s inputs."""
        plan = self.plan
        keys_in = plan.frontiers[q - 1] if q else plan.graph.inputs
        level = plan.levels[q] if measure else ()
        return self._get(
            ("segment", q, measure),
            lambda: _segment(plan, plan.segments[q], keys_in, plan.frontiers[q], level),
        )

    def sweep(self, normalize: bool):
        return self._get(("sweep", normalize), lambda: _sweep(self.plan, normalize))


def _functions_for(model: keras.Model, plan: _Plan, strategy) -> _Functions:
    """The `_Functions` kept with `model` for `plan`'s graph and `strategy` (new ones if the
    graph or the strategy changed: only the latest are kept)."""
    variables = list({id(v): v for v in model.variables}.values())
    key = (
        tuple(id(step.node) for step in plan.graph.steps),
        id(strategy),
        tuple(id(v) for v in variables),
    )
    kept = model.__dict__.get(_FUNCTIONS)
    if kept is None or kept[0] != key:
        # Set past Keras's attribute tracking: the functions are no state of the model.
        kept = (key, _Functions(plan, strategy, variables))
        object.__setattr__(model, _FUNCTIONS, kept)
    return kept[1]


# ---------------------------------------------------------------------------------- the passes
def _inputs(plan: _Plan, keys_in, values) -> dict:
    """The tensors `keys_in` by key; the model's inputs cast to the dtypes it takes."""
    tensors = plan.graph.tensors
    return {
        key: keras.ops.cast(value, tensors[key].dtype) if key in plan.graph.inputs else value
        for key, value in zip(keys_in, values, strict=True)
    }


def _segment(plan: _Plan, steps, keys_in, keys_out, level):
    """A replica function: the tensors `keys_in` through `steps` to the tensors `keys_out`, and
    the sums of the inputs of the batch norms `level` (found among `keys_out`)."""

    def replica(values):
        computed = graph.run(steps, _inputs(plan, keys_in, values))
        sums = [_batch_sums(computed[step.inputs[0]], int(step.layer.axis)) for step in level]
        return tuple(computed[key] for key in keys_out), tuple(sums)

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
            values, sums = functions.segment(q, measure=True)(values)
            for accumulator, layer_sums in zip(
                accumulators, _to_numpy(batches.strategy, sums), strict=True
            ):
                accumulator.add(*layer_sums)
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


def _normalized(layer, x, mean, variance):
    """`x` normalized by `layer` with the batch's `mean` and `variance`."""
    dtype = mean.dtype
    gamma = keras.ops.cast(layer.gamma, dtype) if layer.scale else None
    beta = keras.ops.cast(layer.beta, dtype) if layer.center else None
    axis = int(layer.axis) % len(x.shape)
    y = keras.ops.batch_normalization(
        keras.ops.cast(x, dtype), mean, variance, axis, offset=beta, scale=gamma,
        epsilon=layer.epsilon,
    )  # fmt: skip
    return keras.ops.cast(y, x.dtype)


def _sweep(plan: _Plan, normalize: bool):
    """A replica function: one pass over the network measuring every batch norm's input, each
    normalizing with the statistics of the batch (`normalize`) or in inference mode."""
    steps = [step for segment in plan.segments for step in segment]

    def replica(values):
        measured = {}

        def call(step, args, kwargs):
            if not _is_batch_norm(step.layer):
                return step.layer(*args, **kwargs)
            measured[step] = _batch_sums(args[0], int(step.layer.axis))
            if normalize:
                return _normalized(step.layer, args[0], *_batch_moments(*measured[step]))
            return step.layer(*args, **kwargs)

        computed = graph.run(steps, _inputs(plan, plan.graph.inputs, values), call=call)
        for step in plan.levels[-1]:
            measured[step] = _batch_sums(computed[step.inputs[0]], int(step.layer.axis))
        return tuple(measured[step] for step in plan.steps)

    return replica


def _fast_passes(
    plan: _Plan, batches: _Batches, passes: int, progress, functions: _Functions
) -> dict:
    """`passes` sweeps over the whole network; returns the accumulator of each batch-norm step."""
    for number in range(1, passes + 1):
        sweep = functions.sweep(normalize=number == 1)
        accumulators = [_Accumulator() for _ in plan.steps]
        progress.start(number, plan.steps)
        count = 0
        for count, values in enumerate(batches, start=1):
            sums = _to_numpy(batches.strategy, sweep(values))
            for accumulator, layer_sums in zip(accumulators, sums, strict=True):
                accumulator.add(*layer_sums)
            progress.update(count)
        progress.end(count)
        _finish_pass(plan.steps, accumulators, number)
    return dict(zip(plan.steps, accumulators, strict=True))


# ------------------------------------------------------------------------------------- the API
def _check_mode(mode) -> None:
    if mode not in MODES:
        raise ValueError(f"Argument `mode` must be one of {MODES}; received mode={mode!r}.")


def _check_arguments(model, mode, passes, batch_size, steps, max_cache_bytes, strategy) -> int:
    """Validates the arguments of `recalibrate`; returns the number of fast passes."""
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"Argument `model` must be a keras.Model; received an object of type "
            f"{type(model).__name__}."
        )
    _check_mode(mode)
    check_count("batch_size", batch_size, none=True)
    check_count("steps", steps, none=True)
    check_count("passes", passes, none=True)
    check_count("max_cache_bytes", max_cache_bytes, 0, none=True)
    if passes is not None and mode == "exact":
        raise ValueError(
            "Argument `passes` applies to mode='fast' only: the exact mode makes one pass per "
            f"level of batch-norm layers; received passes={passes!r} with mode='exact'."
        )
    if strategy is not None and not _on_tensorflow():
        raise ValueError(
            "Argument `strategy` is a tf.distribute strategy, for the TensorFlow backend only; "
            f"received a {type(strategy).__name__} on Keras's {keras.backend.backend()} backend."
        )
    return 1 if passes is None else int(passes)


def recalibrate(
    model: keras.Model,
    data,
    *,
    mode: str = "exact",
    passes: int | None = None,
    batch_size: int | None = None,
    steps: int | None = None,
    strategy=None,
    max_cache_bytes: int = 2**30,
    verbose: int = 1,
) -> dict[str, dict[str, np.ndarray | float]]:
    """Sets every batch-norm layer's moving statistics to the population statistics of `data`.

    `moving_mean` and `moving_variance` become the mean and biased variance of the layer's input
    over all examples and all positions but the channel axis (see the module docstring for the
    two modes). If a pass fails (non-finite inputs, an interrupt), every layer keeps the
    statistics it had before the call.

    Args:
        model: A Sequential or functional model, built on its inputs, with batch-norm layers
            (`keras.layers.BatchNormalization`, `tfbn.BatchNorm` included) anywhere in its graph.
        data: As `model.fit` takes it: NumPy arrays `x` (a dict or tuple of them for several
            inputs), a tuple `(x,)`, `(x, y)` or `(x, y, sample_weight)` of arrays (cut into
            batches of `batch_size`), a `tf.data.Dataset` (on TensorFlow), or any re-iterable of
            batches `x`, `(x, y)` or `(x, y, sample_weight)` (a list is one). Labels and weights
            are ignored. It must give the same examples at each pass (shuffling only changes
            the order).
        mode: `"exact"` (level by level) or `"fast"` (`passes` sweeps of the whole network).
        passes: Number of sweeps in fast mode (default 1); not used in exact mode.
        batch_size: The batch size for arrays (default 32); not used with batches.
        steps: Number of batches to use per pass; `None` means all the data.
        strategy: On TensorFlow, the `tf.distribute` strategy whose replicas hold the model's
            variables; `None` means the current strategy. Every replica's sums are gathered at
            every batch and every replica's copy of the variables receives the same statistics.
            Not used on other backends.
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
            data's inputs do not have the model's shapes, the data is empty, arrays hold
            non-finite values, or a layer receives non-finite inputs.
    """
    passes = _check_arguments(model, mode, passes, batch_size, steps, max_cache_bytes, strategy)
    plan = _plan(model)
    if not plan.steps:
        raise ValueError(
            f"Model '{model.name}' has no batch-norm layer (keras.layers.BatchNormalization or "
            "tfbn.BatchNorm): there are no statistics to recalibrate."
        )
    if _on_tensorflow():
        strategy = strategy or _tf().distribute.get_strategy()
    batches = _Batches(data, batch_size, steps, strategy)
    if batches.shapes is not None:
        graph.check_input_shapes(model, plan.graph, batches.shapes)
    batches = _Checked(model, plan.graph, batches)
    functions = _functions_for(model, plan, strategy)
    plan = functions.plan  # the same graph: the steps the kept functions were made from
    before = {
        step: [keras.ops.convert_to_numpy(v) for v in _statistics_variables(step.layer)]
        for step in plan.steps
    }
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

"""`tfbn bench`: tfbn.BatchNorm against keras.layers.BatchNormalization, in one process.

Every comparison runs its implementations interleaved (A, B, A, B, ... with the order rotated
at each repeat) after a warm-up, so that a change in the machine's load hits all of them alike,
and reports medians and ratios (ours / keras). Absolute times only mean something with the
machine they were taken on, so the results carry a description of it.

Cases (`BENCH_CASES`, one `Case` each: a function that measures, one that renders its Markdown):

- `layer`: one BatchNorm layer, training forward+backward (gradients with respect to the input,
  gamma and beta, and the moving-statistics update) and inference forward, on float32 inputs: 4D
  channels-last `(128, 32, 32, 64)`, 4D channels-first `(128, 64, 32, 32)` (`4d-nchw`, channel
  axis 1) and 2D `(4096, 1024)`, without and with XLA. Each timing is also given in *passes over
  the tensor*: its time divided by the time one pass takes, a pass being one read or one write of
  the whole tensor at the copy bandwidth measured in the same run (a copy
  `x * c` reads the tensor once and writes it once: two passes). The memory bound of an
  implementation is the traffic no implementation can avoid: training forward+backward reads `x`,
  writes `y`, reads `dy`, reads `x` again and writes `dx` (5 passes); inference reads `x` and writes
  `y` (2 passes).
- `lenet`: the chapter's LeNet training step (SGD, `tfbn.workflow.config.RECIPE`) on synthetic
  data with tfbn, Keras and no batch normalization; epoch time = median step time x steps per epoch
  (60000 / batch size).
- `pipeline`: the Fashion-MNIST training input pipeline (`tfbn.workflow.data.pipeline_rate`)
  in examples per second, against the LeNet (tfbn) training rate.
- `export`: inference throughput of an exported SavedModel with BatchNorm folded into the previous
  layer against one without folding, at batch 1 and 256 (`tfbn.tools.export`,
  `tfbn.workflow.serving`).
- `models` (not run by default): a training step (SGD, batch 32, synthetic data) of ResNet50 at
  64x64, MobileNetV2 and EfficientNetB0 at 96x96 (`keras.applications`, `weights=None`, 10
  classes) with Keras's layer against the same model converted by `tfbn.convert`.
- `models_export` (not run by default): the converted models exported folded and unfolded, and
  a copy of each whose batch norms pass their input through (`no_bn`: no batch norm at all, the
  most any folding can gain), exported unfolded; their `serving_float` throughput at batch 64,
  timed interleaved: folded / unfolded, no_bn / unfolded (the bound) and folded / no_bn.
- `recalibrate` (not run by default): `tfbn.recalibrate` in exact and fast mode and `tfbn.inspect`
  on the same models (Keras's layer, 256 random examples, batch 64), each in *inference passes*:
  its median time over that of one `model.predict` over the same dataset, timed interleaved
  after a call that traces (its time is kept as `first_call_s`).
- `jax` (not run by default): the same comparisons on Keras's JAX backend, in a process of its own
  (`KERAS_BACKEND=jax`; the backend is fixed when Keras is imported) under `jax.jit`: the layer
  forward+backward on the `layer` case's shapes, and a training step (SGD, batch 32, synthetic
  data) of MobileNetV2 at 96x96 with Keras's layer against its `tfbn.convert` copy.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from tfbn.utils.errors import UsageError
from tfbn.utils.files import atomic_write_text, check_writable_dir

__all__ = ["BENCH_CASES", "CASES", "TARGETS", "Case", "render_markdown", "run_benchmarks"]

SCHEMA_VERSION = 1
TRAIN_EXAMPLES = 60000

# Compulsory traffic, in passes over the tensor (one read or one write of it).
MIN_PASSES = {"train": 5, "inference": 2}

# (key, description, comparison, threshold); see `_target_values` for what each value is.
TARGETS: tuple[tuple[str, str, str, float], ...] = (
    ("layer_4d_train_ratio", "layer 4D fwd+bwd, no XLA: tfbn / keras time", "<=", 0.5),
    ("layer_4d_train_xla_ratio", "layer 4D fwd+bwd, XLA: tfbn / keras time", "<=", 1.0),
    ("layer_4d_train_passes", "layer 4D fwd+bwd, no XLA: tfbn passes over the tensor", "<=", 12),
    ("layer_4d_train_xla_passes", "layer 4D fwd+bwd, XLA: tfbn passes over the tensor", "<=", 12),
    ("lenet_epoch_ratio", "LeNet epoch: tfbn / keras time", "<=", 0.9),
    ("lenet_overhead_ratio", "LeNet BN overhead: (tfbn - none) / (keras - none)", "<=", 0.5),
    ("pipeline_ratio", "input pipeline / LeNet training examples per second", ">=", 5.0),
    ("export_folded_ratio", "export, batch 256: folded / unfolded throughput", ">=", 1.2),
)

# keras.applications architectures of the `models` cases and their input sizes (full runs).
MODEL_SIZES = {"ResNet50": 64, "MobileNetV2": 96, "EfficientNetB0": 96}
TARGETS += tuple(
    target
    for name in MODEL_SIZES
    for target in (
        (f"{name.lower()}_train_ratio", f"{name} train step: converted / keras time", "<=", 0.9),
        (f"{name.lower()}_export_ratio", f"{name} export: folded / unfolded throughput", ">=", 1.2),
        (
            f"{name.lower()}_export_of_bound",
            f"{name} export: folded / no-BN throughput",
            ">=",
            0.95,
        ),
    )
)

# Recalibration and inspection cost, in inference passes (`model.predict` over the same data).
RECALIBRATE_PASSES = {"exact": 3.0, "fast": 1.5}
TARGETS += tuple(
    (
        f"{name.lower()}_recalibrate_{mode}_passes",
        f"{name} {mode} recalibration: time / model.predict time",
        "<=",
        bound,
    )
    for name in MODEL_SIZES
    for mode, bound in RECALIBRATE_PASSES.items()
)
INSPECT_PASSES = 1.5
TARGETS += tuple(
    (
        f"{name.lower()}_inspect_passes",
        f"{name} tfbn.inspect: time / model.predict time",
        "<=",
        INSPECT_PASSES,
    )
    for name in MODEL_SIZES
)

# The `jax` case: the layer's shapes under jax.jit and a model's training step.
JAX_MODEL = "MobileNetV2"
TARGETS += (
    ("jax_layer_4d_train_ratio", "JAX, jit: layer 4D fwd+bwd tfbn / keras time", "<=", 1.0),
    ("jax_layer_2d_train_ratio", "JAX, jit: layer 2D fwd+bwd tfbn / keras time", "<=", 1.0),
    (
        "jax_model_train_ratio",
        f"JAX, jit: {JAX_MODEL} train step converted / keras time",
        "<=",
        1.0,
    ),
)

# Each setting of a run: (full, --quick).
_SIZES = {
    "shapes": (
        {"4d": (128, 32, 32, 64), "4d-nchw": (128, 64, 32, 32), "2d": (4096, 1024)},
        {"4d": (8, 4, 4, 8), "4d-nchw": (8, 8, 4, 4), "2d": (16, 32)},
    ),
    "repeats": (15, 3),
    "min_sample_s": (0.05, 0.0),
    "lenet_batch": (256, 32),
    "pipeline_batches": (200, 5),
    "export_batches": ((1, 256), (1, 256)),
    # Many short samples: on a shared machine throughput jumps between levels, which moves the
    # median of a few long samples.
    "export_seconds": (0.5, 0.05),
    "export_repeats": (15, 2),
    "models": (MODEL_SIZES, dict.fromkeys(MODEL_SIZES, 32)),
    "models_batch": (32, 2),
    "models_export_batch": (64, 2),
    "recalibrate_examples": (256, 4),
    "recalibrate_batch": (64, 2),
    "recalibrate_repeats": (5, 2),
}
# The channel axis of each layer shape (default: last): "4d-nchw" is channels-first, the layout
# cuDNN prefers.
_CHANNEL_AXIS = {"4d-nchw": 1}
# Implementation name -> BatchNorm keyword arguments (`None`: Keras's layer).
_LAYER_VARIANTS: dict[str, dict | None] = {
    "keras": None,
    "tfbn": {},
    "tfbn_fused": {"fused": True},
    "tfbn_unfused": {"fused": False},
}
_MAX_NUMBER = 100
_WARMUP_CALLS = 3


# ----------------------------------------------------------------------------- timing
def _sync(outputs) -> None:
    """Waits for a call's results by fetching its last (small) output to the host."""
    if isinstance(outputs, (tuple, list)):
        outputs = outputs[-1]
    if hasattr(outputs, "numpy"):
        outputs.numpy()


def _interleaved(
    functions: dict[str, Callable[[], object]],
    repeats: int,
    min_sample_s: float,
    warmup: int = _WARMUP_CALLS,
) -> dict[str, dict]:
    """Times each function, interleaved, and returns per-call samples and their median.

    Each function is warmed up first (`warmup >= 1` calls: tracing, XLA compilation, first-touch
    allocation), then called
    `number` times per sample, `number` chosen so a sample lasts at least `min_sample_s`. The order
    of the functions is rotated at every repeat so that none always runs right after another.
    """
    numbers = {}
    for name, fn in functions.items():
        for _ in range(warmup):
            start = time.perf_counter()
            _sync(fn())
            elapsed = time.perf_counter() - start
        numbers[name] = max(1, min(_MAX_NUMBER, math.ceil(min_sample_s / max(elapsed, 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in functions}
    names = list(functions)
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            fn, number = functions[name], numbers[name]
            start = time.perf_counter()
            for _ in range(number):
                _sync(fn())
            samples[name].append((time.perf_counter() - start) / number)
    return {
        name: {
            "median_s": statistics.median(values),
            "samples_s": values,
            "calls_per_sample": numbers[name],
        }
        for name, values in samples.items()
    }


# ----------------------------------------------------------------------------- layer case
def _make_layer(name: str, kwargs: dict | None, axis: int = -1):
    import keras

    from tfbn.layers.batch_norm import BatchNorm
    from tfbn.workflow.config import RECIPE

    settings = {"axis": axis, "momentum": RECIPE.momentum, "epsilon": RECIPE.epsilon}
    if kwargs is None:
        return keras.layers.BatchNormalization(**settings, name=name)
    return BatchNorm(**settings, **kwargs, name=name)


def _layer_function(layer, mode: str, xla: bool, x, dy):
    import tensorflow as tf

    layer.build(tuple(x.shape))
    if mode == "train":
        variables = [layer.gamma, layer.beta]

        @tf.function(jit_compile=xla)
        def step(x, dy):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
            dx, dgamma, dbeta = tape.gradient(y, [x, *variables], output_gradients=dy)
            return dx, dgamma, dbeta

        return lambda: step(x, dy)

    @tf.function(jit_compile=xla)
    def infer(x):
        y = layer(x, training=False)
        return y, y[(0,) * (len(x.shape) - 1)]

    return lambda: infer(x)


def _copy_function(x, jit_compile: bool = False):
    import tensorflow as tf

    # A runtime scalar, so that no graph optimizer can turn the multiply into a no-op alias.
    c = tf.constant(1.0, dtype=x.dtype)

    @tf.function(jit_compile=jit_compile)
    def copy(x, c):
        y = x * c
        return y, y[(0,) * (len(x.shape) - 1)]

    return lambda: copy(x, c)


def _layer_case(shape_name, shape, mode, xla, settings) -> dict:
    import numpy as np
    import tensorflow as tf

    axis = _CHANNEL_AXIS.get(shape_name, -1)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(2.0, 3.0, size=shape).astype("float32"))
    dy = tf.constant(rng.normal(size=shape).astype("float32"))
    functions: dict[str, Callable[[], object]] = {"copy": _copy_function(x)}
    if xla:
        # The same copy compiled by XLA: what XLA's code reaches on this machine.
        functions["xla_copy"] = _copy_function(x, jit_compile=True)
    unavailable: dict[str, str] = {}
    # The first output (dx in training, y in inference) of each implementation, to check that
    # they all compute the same thing before timing them.
    first_outputs = {}
    for name, kwargs in _LAYER_VARIANTS.items():
        try:
            layer = _make_layer(f"{name}_{shape_name}_{mode}", kwargs, axis)
            fn = _layer_function(layer, mode, xla, x, dy)
            first_outputs[name] = fn()[0].numpy()
        except (ValueError, NotImplementedError, tf.errors.OpError) as error:
            unavailable[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            continue
        functions[name] = fn
    timings = _interleaved(functions, settings["repeats"], settings["min_sample_s"])

    nbytes = int(np.prod(shape)) * 4
    copy = timings.pop("copy")
    case_pass_time = copy["median_s"] / 2.0  # the copy reads the tensor once and writes it once
    xla_copy = timings.pop("xla_copy", None)
    keras_median = timings["keras"]["median_s"] if "keras" in timings else None
    variants = {}
    for name in _LAYER_VARIANTS:
        if name in unavailable:
            variants[name] = {"available": False, "reason": unavailable[name]}
            continue
        row = dict(timings[name], available=True)
        row["passes_vs_case_copy"] = row["median_s"] / case_pass_time
        if xla_copy is not None:
            row["passes_vs_xla_copy"] = row["median_s"] / (xla_copy["median_s"] / 2.0)
        row["ratio"] = row["median_s"] / keras_median if keras_median else None
        if "keras" in first_outputs:
            diff = np.abs(first_outputs[name] - first_outputs["keras"])
            row["max_abs_diff_vs_keras"] = float(diff.max())
        variants[name] = row
    return {
        "id": f"layer/{shape_name}/{mode}/{'xla' if xla else 'no-xla'}",
        "shape_name": shape_name,
        "shape": list(shape),
        "axis": axis,
        "dtype": "float32",
        "mode": mode,
        "xla": xla,
        "bytes_per_pass": nbytes,
        "copy": copy,
        "case_bandwidth_gb_s": 2.0 * nbytes / copy["median_s"] / 1e9,
        "xla_copy": xla_copy,
        "xla_copy_bandwidth_gb_s": (
            2.0 * nbytes / xla_copy["median_s"] / 1e9 if xla_copy is not None else None
        ),
        "min_passes": MIN_PASSES[mode],
        "variants": variants,
    }


def _add_passes(rows: list[dict]) -> None:
    """Adds pass counts at the best copy bandwidth measured for each shape in this run.

    The copy's speed depends on what runs around it (allocation, page faults, caches): the same
    copy measured in different cases differs by up to 2x on a shared machine. A pass is priced at
    the fastest copy of the tensor seen in the run, so that a pass count never flatters an
    implementation; `passes_vs_case_copy` keeps the count against the copy interleaved with it.
    """
    best: dict[str, float] = {}
    for row in rows:
        best[row["shape_name"]] = min(
            best.get(row["shape_name"], math.inf), row["copy"]["median_s"]
        )
    for row in rows:
        pass_time = best[row["shape_name"]] / 2.0
        row["pass_time_s"] = pass_time
        row["bandwidth_gb_s"] = row["bytes_per_pass"] / pass_time / 1e9
        row["bound_s"] = row["min_passes"] * pass_time
        for v in row["variants"].values():
            if v["available"]:
                v["passes"] = v["median_s"] / pass_time


# ----------------------------------------------------------------------------- LeNet case
def _train_step(model, optimizer, batch_size: int):
    """A `tf.function` SGD step of `model` on one fixed synthetic batch; returns a call of it."""
    import keras
    import numpy as np
    import tensorflow as tf

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    variables = model.trainable_variables
    optimizer.build(variables)
    rng = np.random.default_rng(0)
    shape = (batch_size, *model.input_shape[1:])
    images = tf.constant(rng.uniform(size=shape).astype("float32"))
    labels = tf.constant(rng.integers(0, 10, size=(batch_size,)).astype("int32"))

    @tf.function
    def step(images, labels):
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, model(images, training=True))
        grads = tape.gradient(loss, variables)
        optimizer.apply(grads, variables)
        return loss

    return lambda: step(images, labels)


def _lenet_step(norm: str, batch_size: int):
    import keras

    from tfbn.workflow.config import RECIPE
    from tfbn.workflow.models import lenet

    keras.utils.set_random_seed(0)
    return _train_step(lenet(norm), keras.optimizers.SGD(RECIPE.lr_for(norm)), batch_size)


def _lenet_case(settings, norms: Sequence[str] = ("tfbn", "keras", "none")) -> dict:
    batch = settings["lenet_batch"]
    steps = math.ceil(TRAIN_EXAMPLES / batch)
    functions = {norm: _lenet_step(norm, batch) for norm in norms}
    timings = _interleaved(functions, settings["repeats"], settings["min_sample_s"])
    variants = {}
    for norm in norms:
        row = dict(timings[norm])
        row["epoch_s"] = row["median_s"] * steps
        row["examples_per_s"] = batch / row["median_s"]
        variants[norm] = row
    result = {
        "id": "lenet",
        "batch_size": batch,
        "steps_per_epoch": steps,
        "xla": False,
        "variants": variants,
    }
    if {"tfbn", "keras", "none"} <= set(norms):
        tfbn, keras_, none = (variants[n]["epoch_s"] for n in ("tfbn", "keras", "none"))
        result["ratio"] = tfbn / keras_
        result["overhead_ratio"] = (tfbn - none) / (keras_ - none) if keras_ != none else None
    return result


# ----------------------------------------------------------------------------- pipeline case
def _pipeline_case(settings: dict, cases: dict, tick: Callable[[str], None]) -> dict:
    from tfbn.workflow.data import load_fashion_mnist, pipeline_rate

    tick("pipeline")
    batch = settings["lenet_batch"]
    data = load_fashion_mnist(batch_size=batch)
    # The full warm-up pass fills the in-memory cache, as the first epoch of training does; a
    # quick run skips it.
    rate = pipeline_rate(
        data.train, batches=settings["pipeline_batches"], warmup=not settings["quick"]
    )
    lenet_result = cases.get("lenet")
    if lenet_result is None:
        lenet_result = _lenet_case(settings, norms=("tfbn",))
    training = lenet_result["variants"]["tfbn"]["examples_per_s"]
    return {
        "id": "pipeline",
        "batch_size": batch,
        "batches": settings["pipeline_batches"],
        "examples_per_s": rate,
        "training_examples_per_s": training,
        "ratio": rate / training,
    }


# ----------------------------------------------------------------------------- export case
def _export_pair(work_dir: Path) -> dict[str, Path]:
    """A LeNet (tfbn) with trained-looking statistics, exported folded and unfolded."""
    import keras
    import numpy as np

    from tfbn.tools.export import export_saved_model
    from tfbn.workflow.models import lenet

    keras.utils.set_random_seed(0)
    model = lenet("tfbn")
    # A few training-mode calls so the moving statistics are not the initial ones.
    images = np.random.default_rng(0).uniform(size=(64, 28, 28, 1)).astype("float32")
    for _ in range(3):
        model(images, training=True)
    return {
        "folded": Path(export_saved_model(model, work_dir, name="lenet_folded", fold=True)),
        "unfolded": Path(export_saved_model(model, work_dir, name="lenet_unfolded", fold=False)),
    }


def _throughput_samples(
    paths: dict[str, Path], batch: int, settings: dict, signature: str = "serving_default"
) -> dict[str, dict]:
    """The throughput of each SavedModel in `paths` at one batch size, timed interleaved.

    Each model runs once as a warm-up (loading, tracing), then once per repeat
    (`settings["export_repeats"]`, `settings["export_seconds"]` each), the order rotated at every
    repeat. Returns, for each key of `paths`, `median_examples_per_s` and
    `samples_examples_per_s` (one sample per repeat).
    """
    from tfbn.workflow.serving import inference_throughput

    def rate(name):
        # One timed run per call: the repeats and their median are taken here, interleaved.
        seconds = settings["export_seconds"]
        return float(
            inference_throughput(
                paths[name], batch, signature=signature, seconds=seconds, repeats=1
            )
        )

    names = list(paths)
    for name in names:  # warm-up: loading, tracing
        rate(name)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(settings["export_repeats"]):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(rate(name))
    return {
        name: {"median_examples_per_s": statistics.median(v), "samples_examples_per_s": v}
        for name, v in samples.items()
    }


def _median_ratio(rows: dict[str, dict], over: str, under: str) -> float:
    """The median throughput of `rows[over]` divided by that of `rows[under]`."""
    return rows[over]["median_examples_per_s"] / rows[under]["median_examples_per_s"]


def _export_case(settings: dict, cases: dict, tick: Callable[[str], None]) -> dict:
    tick("export")
    with tempfile.TemporaryDirectory(prefix="tfbn-bench-export-") as work_dir:
        paths = _export_pair(Path(work_dir))
        batches = {}
        for batch in settings["export_batches"]:
            rows = _throughput_samples(paths, batch, settings)
            batches[str(batch)] = {**rows, "ratio": _median_ratio(rows, "folded", "unfolded")}
    return {
        "id": "export",
        "seconds_per_sample": settings["export_seconds"],
        "repeats": settings["export_repeats"],
        "batches": batches,
    }


# ----------------------------------------------------------------------------- real models
def _application(name: str, size: int):
    """A `keras.applications` architecture with Keras's batch norm, random weights, 10 classes."""
    import keras

    keras.utils.set_random_seed(0)
    return getattr(keras.applications, name)(
        weights=None, input_shape=(size, size, 3), classes=10, classifier_activation=None
    )


def _model_train_row(name: str, size: int, settings: dict) -> dict:
    """Keras's model and its `tfbn.convert` copy: one training step each, interleaved."""
    import keras

    from tfbn.tools.conversion import convert

    original = _application(name, size)
    converted = convert(original)
    batch = settings["models_batch"]
    functions = {
        variant: _train_step(model, keras.optimizers.SGD(0.01), batch)
        for variant, model in (("keras", original), ("tfbn", converted))
    }
    # The two start from the same weights on the same batch: their first losses agree.
    first = {variant: float(fn()) for variant, fn in functions.items()}
    timings = _interleaved(functions, settings["repeats"], settings["min_sample_s"])
    return {
        "input_size": size,
        "batch_size": batch,
        "batch_norm_layers": sum(
            type(layer) is keras.layers.BatchNormalization for layer in original.layers
        ),
        "variants": timings,
        "ratio": timings["tfbn"]["median_s"] / timings["keras"]["median_s"],
        "first_loss": first,
    }


def _models_case(settings: dict, cases: dict, tick: Callable[[str], None]) -> dict:
    rows = {}
    for name, size in settings["models"].items():
        tick(f"{name} train")
        rows[name] = _model_train_row(name, size, settings)
    return {"id": "models", "repeats": settings["repeats"], "models": rows}


def _without_batch_norm(model):
    """A copy of `model` whose batch norms pass their input through: no batch norm at all.

    Each batch-norm layer (Keras's, tfbn's or a subclass) becomes a `tfbn.tools.folding.FoldedAway`
    of the same name, the pass-through folding leaves in a batch norm's place; every other layer is
    rebuilt from its config with its weights copied, inside nested Sequential and functional models
    too. The copy has the same layers and names as `model`, which is not modified, and computes what
    `model` would if each batch norm were the identity.
    """
    import keras

    from tfbn.tools.folding import FoldedAway

    pairs = []

    def clone_layer(layer):
        if isinstance(layer, keras.layers.BatchNormalization):
            return FoldedAway(name=layer.name)
        clone = layer.__class__.from_config(layer.get_config())
        pairs.append((layer, clone))
        return clone

    bare = keras.models.clone_model(model, clone_function=clone_layer, recursive=True)
    for source, clone in pairs:
        clone.set_weights(source.get_weights())
    return bare


def _model_export_row(name: str, size: int, settings: dict, work_dir: Path) -> dict:
    """A converted model exported folded, unfolded and without batch norm, timed interleaved.

    Returns the `serving_float` throughput at batch `settings["models_export_batch"]` of each
    SavedModel (`folded`, `unfolded`, `no_bn`: `_throughput_samples`'s rows), the ratios of their
    medians `ratio` (folded / unfolded), `bound_ratio` (no_bn / unfolded: the most any folding
    can gain) and `of_bound` (folded / no_bn), the input size, the batch size and how many batch
    norms `fold_plan` folds into the layer before them (`folded_layers`).
    """
    from tfbn.tools.conversion import convert
    from tfbn.tools.export import export_saved_model
    from tfbn.tools.folding import fold_plan

    model = convert(_application(name, size))
    folds = sum(step.into is not None for step in fold_plan(model).values())
    variants = (
        ("folded", model, True),
        ("unfolded", model, False),
        ("no_bn", _without_batch_norm(model), False),
    )
    paths = {
        kind: Path(export_saved_model(m, work_dir, name=f"{name}_{kind}", fold=fold))
        for kind, m, fold in variants
    }
    batch = settings["models_export_batch"]
    rows = _throughput_samples(paths, batch, settings, signature="serving_float")
    return {
        **rows,
        "ratio": _median_ratio(rows, "folded", "unfolded"),
        "bound_ratio": _median_ratio(rows, "no_bn", "unfolded"),
        "of_bound": _median_ratio(rows, "folded", "no_bn"),
        "input_size": size,
        "batch_size": batch,
        "folded_layers": folds,
    }


def _models_export_case(settings: dict, cases: dict, tick: Callable[[str], None]) -> dict:
    rows = {}
    with tempfile.TemporaryDirectory(prefix="tfbn-bench-models-") as work_dir:
        for name, size in settings["models"].items():
            tick(f"{name} export")
            rows[name] = _model_export_row(name, size, settings, Path(work_dir))
    return {
        "id": "models_export",
        "seconds_per_sample": settings["export_seconds"],
        "repeats": settings["export_repeats"],
        "models": rows,
    }


def _recalibrate_row(name: str, size: int, settings: dict) -> dict:
    """`model.predict`, exact and fast `tfbn.recalibrate` and `tfbn.inspect` on one dataset.

    Each is called once (tracing included: `first_call_s`), then timed interleaved
    (`settings["recalibrate_repeats"]` repeats after one more warm-up call); `passes` holds each
    one's median time over `predict`'s.
    """
    import numpy as np
    import tensorflow as tf

    from tfbn.tools.inspect import inspect
    from tfbn.tools.recalibration import batch_norm_layers, recalibrate

    model = _application(name, size)
    examples, batch = settings["recalibrate_examples"], settings["recalibrate_batch"]
    x = np.random.default_rng(0).normal(size=(examples, size, size, 3)).astype("float32")
    dataset = tf.data.Dataset.from_tensor_slices(x).batch(batch)
    functions = {
        "predict": lambda: model.predict(dataset, verbose=0),
        "exact": lambda: recalibrate(model, dataset, mode="exact", verbose=0),
        "fast": lambda: recalibrate(model, dataset, mode="fast", verbose=0),
        "inspect": lambda: inspect(model, dataset, verbose=0),
    }
    first = {}
    for variant, function in functions.items():
        start = time.perf_counter()
        function()
        first[variant] = time.perf_counter() - start
    repeats = min(settings["repeats"], settings["recalibrate_repeats"])
    timings = _interleaved(functions, repeats, settings["min_sample_s"], warmup=1)
    predict = timings["predict"]["median_s"]
    return {
        "input_size": size,
        "examples": examples,
        "batch_size": batch,
        "batch_norm_layers": len(batch_norm_layers(model)),
        "variants": timings,
        "first_call_s": first,
        "passes": {v: timings[v]["median_s"] / predict for v in functions if v != "predict"},
    }


def _recalibrate_case(settings: dict, cases: dict, tick: Callable[[str], None]) -> dict:
    rows = {}
    for name, size in settings["models"].items():
        tick(f"{name} recalibrate")
        rows[name] = _recalibrate_row(name, size, settings)
    return {
        "id": "recalibrate",
        "repeats": min(settings["repeats"], settings["recalibrate_repeats"]),
        "models": rows,
    }


# ----------------------------------------------------------------------------- JAX case
_JAX_TIMEOUT_S = 3600


def jax_layer_step(layer, shape: tuple):
    """A jitted forward+backward of `layer` on JAX, its variables held fixed.

    Returns `step(x, dy) -> ((trainable gradients, dx), new non-trainable values)`: what
    `_layer_function`'s train step computes (gradients, moving-statistics update).
    """
    import jax
    import jax.numpy as jnp

    layer.build(shape)
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def loss(trainable, x, dy):
        y, updated = layer.stateless_call(trainable, non_trainable, x, training=True)
        return jnp.sum(y * dy), updated

    grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
    return lambda x, dy: grad(trainable, x, dy)


def _blocking(fn: Callable[[], object]) -> Callable[[], None]:
    """`fn`, waiting for its JAX results (so that `_interleaved` times the computation)."""
    import jax

    def call() -> None:
        jax.block_until_ready(fn())

    return call


def _jax_layer_row(shape_name: str, shape: tuple, settings: dict) -> dict:
    """tfbn's layer and Keras's under jax.jit, forward+backward on one shape, interleaved."""
    import jax
    import numpy as np

    axis = _CHANNEL_AXIS.get(shape_name, -1)
    rng = np.random.default_rng(0)
    # On the device once, so that no call copies them there.
    x = jax.device_put(rng.normal(2.0, 3.0, size=shape).astype("float32"))
    dy = jax.device_put(rng.normal(size=shape).astype("float32"))
    steps = {
        name: jax_layer_step(_make_layer(f"jax_{name}_{shape_name}", kwargs, axis), tuple(shape))
        for name, kwargs in (("keras", None), ("tfbn", {}))
    }
    dx = {name: np.asarray(step(x, dy)[0][1]) for name, step in steps.items()}
    timings = _interleaved(
        {name: _blocking(lambda step=step: step(x, dy)) for name, step in steps.items()},
        settings["repeats"],
        settings["min_sample_s"],
    )
    return {
        "shape": list(shape),
        "axis": axis,
        "variants": timings,
        "ratio": timings["tfbn"]["median_s"] / timings["keras"]["median_s"],
        "max_abs_diff_vs_keras": float(np.abs(dx["tfbn"] - dx["keras"]).max()),
    }


def _jax_train_step(model, batch_size: int) -> Callable[[], object]:
    """A jitted SGD step of `model` on one fixed synthetic batch (JAX); returns a call of it.

    The model's and optimizer's state goes through the step as values (`stateless_call`,
    `stateless_apply`, donated buffers), as Keras's JAX trainer does; each call returns the loss.
    """
    import jax
    import keras
    import numpy as np

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = keras.optimizers.SGD(0.01)
    optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    images = jax.device_put(
        rng.uniform(size=(batch_size, *model.input_shape[1:])).astype("float32")
    )
    labels = jax.device_put(rng.integers(0, 10, size=(batch_size,)).astype("int32"))

    def loss(trainable, non_trainable, images, labels):
        logits, non_trainable = model.stateless_call(
            trainable, non_trainable, images, training=True
        )
        return loss_fn(labels, logits), non_trainable

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(trainable, non_trainable, optimizer_state, images, labels):
        (value, non_trainable), grads = jax.value_and_grad(loss, has_aux=True)(
            trainable, non_trainable, images, labels
        )
        trainable, optimizer_state = optimizer.stateless_apply(optimizer_state, grads, trainable)
        return value, trainable, non_trainable, optimizer_state

    state = [
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in optimizer.variables],
    ]

    def call():
        value, *new_state = step(*state, images, labels)
        state[:] = new_state
        return value

    return call


def _jax_model_row(settings: dict) -> dict:
    """`JAX_MODEL` with Keras's layer and its `tfbn.convert` copy: one jitted training step each."""
    import keras

    from tfbn.tools.conversion import convert

    size, batch = settings["models"][JAX_MODEL], settings["models_batch"]
    original = _application(JAX_MODEL, size)
    converted = convert(original)
    steps = {
        variant: _jax_train_step(model, batch)
        for variant, model in (("keras", original), ("tfbn", converted))
    }
    # The two start from the same weights on the same batch: their first losses agree.
    first = {variant: float(step()) for variant, step in steps.items()}
    timings = _interleaved(
        {variant: _blocking(step) for variant, step in steps.items()},
        settings["repeats"],
        settings["min_sample_s"],
    )
    return {
        "name": JAX_MODEL,
        "input_size": size,
        "batch_size": batch,
        "batch_norm_layers": sum(
            type(layer) is keras.layers.BatchNormalization for layer in original.layers
        ),
        "variants": timings,
        "ratio": timings["tfbn"]["median_s"] / timings["keras"]["median_s"],
        "first_loss": first,
    }


def _jax_worker() -> None:
    """The `jax` case's process, run with `KERAS_BACKEND=jax`.

    Reads the run's settings (JSON) from stdin and writes the case's results (JSON) to the file
    its first argument names.
    """
    import keras

    if keras.backend.backend() != "jax":
        raise RuntimeError(f"Expected Keras's JAX backend; received {keras.backend.backend()!r}.")
    import jax

    settings = json.loads(sys.stdin.read())
    device = jax.devices()[0]
    result = {
        "jax": jax.__version__,
        "device": f"{device.platform}: {device.device_kind}",
        "layer": {
            shape_name: _jax_layer_row(shape_name, tuple(shape), settings)
            for shape_name, shape in settings["shapes"].items()
        },
        "model": _jax_model_row(settings),
    }
    atomic_write_text(sys.argv[1], json.dumps(result))


def _jax_case(settings: dict, cases: dict, tick: Callable[[str], None]) -> dict:
    tick("jax")
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"}
    code = "from tfbn.workflow.bench import _jax_worker; _jax_worker()"
    with tempfile.TemporaryDirectory(prefix="tfbn-bench-jax-") as work_dir:
        out = Path(work_dir) / "jax.json"
        process = subprocess.run(
            [sys.executable, "-c", code, str(out)],
            input=json.dumps(settings),
            env=env,
            capture_output=True,
            text=True,
            timeout=_JAX_TIMEOUT_S,
        )
        if process.returncode != 0 or not out.exists():
            lines = process.stderr.strip().splitlines() or ["no output"]
            raise RuntimeError(
                f"The JAX benchmark process failed (exit {process.returncode}): {lines[-1]}"
            )
        result = json.loads(out.read_text(encoding="utf-8"))
    return {"id": "jax", "repeats": settings["repeats"], **result}


# ----------------------------------------------------------------------------- machine, targets
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine_description() -> dict:
    """The machine and software the benchmarks ran on.

    Returns:
        A dict: CPU model (from `/proc/cpuinfo`), logical core count, memory, GPUs, OS, Python,
        TensorFlow, Keras, NumPy and tfbn versions, the UTC date and the load average.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    import tfbn

    gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "gpus": gpus,
        "os": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "tfbn": tfbn.__version__,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "load_average_start": _load_average(),
    }


def _find_layer(cases: dict, shape: str, mode: str, xla: bool) -> dict | None:
    for row in cases.get("layer", {}).get("rows", []):
        if row["id"] == f"layer/{shape}/{mode}/{'xla' if xla else 'no-xla'}":
            return row
    return None


def _target_values(cases: dict) -> dict[str, float | None]:
    """The value of each target in `TARGETS` found in `cases` (a case's results); absent: None."""
    values: dict[str, float | None] = {}
    for xla, suffix in ((False, ""), (True, "_xla")):
        row = _find_layer(cases, "4d", "train", xla)
        ours = row["variants"].get("tfbn", {}) if row else {}
        values[f"layer_4d_train{suffix}_ratio"] = ours.get("ratio")
        values[f"layer_4d_train{suffix}_passes"] = ours.get("passes")
    lenet = cases.get("lenet", {})
    values["lenet_epoch_ratio"] = lenet.get("ratio")
    values["lenet_overhead_ratio"] = lenet.get("overhead_ratio")
    values["pipeline_ratio"] = cases.get("pipeline", {}).get("ratio")
    export = cases.get("export", {}).get("batches", {})
    values["export_folded_ratio"] = export.get("256", {}).get("ratio")
    fields = (
        ("models", "train_ratio", "ratio"),
        ("models_export", "export_ratio", "ratio"),
        ("models_export", "export_of_bound", "of_bound"),
    )
    for name in MODEL_SIZES:
        for case, suffix, field in fields:
            row = cases.get(case, {}).get("models", {}).get(name, {})
            values[f"{name.lower()}_{suffix}"] = row.get(field)
        passes = cases.get("recalibrate", {}).get("models", {}).get(name, {}).get("passes", {})
        for mode in RECALIBRATE_PASSES:
            values[f"{name.lower()}_recalibrate_{mode}_passes"] = passes.get(mode)
        values[f"{name.lower()}_inspect_passes"] = passes.get("inspect")
    jax = cases.get("jax", {})
    for shape in ("4d", "2d"):
        values[f"jax_layer_{shape}_train_ratio"] = jax.get("layer", {}).get(shape, {}).get("ratio")
    values["jax_model_train_ratio"] = jax.get("model", {}).get("ratio")
    return values


def _targets(cases: dict) -> list[dict]:
    """Each target of `TARGETS`: key, description, comparison, threshold, value and `pass`.

    `pass` is whether the value meets the threshold, `None` where the run did not measure it.
    """
    values = _target_values(cases)
    targets = []
    for key, description, op, threshold in TARGETS:
        value = values.get(key)
        if value is None:
            passed = None
        else:
            passed = value <= threshold if op == "<=" else value >= threshold
        targets.append(
            {
                "key": key,
                "description": description,
                "comparison": op,
                "threshold": threshold,
                "value": value,
                "pass": passed,
            }
        )
    return targets


# ----------------------------------------------------------------------------- Markdown
def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}"


def _ms(seconds) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.3f}"


def _sci(value) -> str:
    return "n/a" if value is None else f"{value:.1e}"


def _verdict(passed) -> str:
    return {True: "pass", False: "FAIL", None: "not measured"}[passed]


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """A Markdown table: the header, its rule, one line per row (cells as given)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def _preamble_markdown(results: dict) -> list[str]:
    m, s = results["machine"], results["settings"]
    gpus = ", ".join(m["gpus"]) if m["gpus"] else "no GPU"
    return [
        "# tfbn benchmarks",
        "",
        f"Machine: {m['cpu']}, {m['cores']} logical cores, {m['memory_gib']} GiB, {gpus}; "
        f"{m['os']}.",
        f"Software: Python {m['python']}, TensorFlow {m['tensorflow']}, Keras {m['keras']}, "
        f"NumPy {m['numpy']}, tfbn {m['tfbn']}.",
        f"Date: {m['date']}; load average (1, 5, 15 min) at start {m.get('load_average_start')}, "
        f"at end {m.get('load_average_end')}.",
        "",
        f"Settings: quick={s['quick']}, repeats={s['repeats']}, XLA rows={s['xla']}, "
        f"cases={', '.join(s['cases'])}. All timings in one process, implementations interleaved "
        "(order rotated every repeat) after a warm-up; medians of the repeats; ratios are "
        "tfbn / keras medians.",
        "",
        *([f"Note: {s['note']}", ""] if s.get("note") else []),
        "## Targets",
        "",
        *_table(
            ("target", "value", "threshold", "result"),
            (
                (
                    t["description"],
                    _fmt(t["value"]),
                    f"{t['comparison']} {t['threshold']}",
                    _verdict(t["pass"]),
                )
                for t in results["targets"]
            ),
        ),  # fmt: skip
    ]


_LAYER_INTRO = (
    "`train` = forward + backward (gradients for x, gamma, beta) + moving-statistics update; "
    "`inference` = forward with the moving statistics. A pass is one read or one write of the "
    "tensor at the best copy bandwidth measured for that shape in this run (`copy GB/s`; a copy "
    "`x * c` = 2 passes); `case passes` counts against the copy interleaved with that case instead "
    "(`case copy GB/s`), which runs slower next to heavy steps. `min passes` is the compulsory "
    "traffic (train: read x, write y, read dy, read x, write dx = 5; inference: read x, write y = "
    "2), `bound ms` = min passes x pass time. The last column compares each output (dx or y) with "
    "Keras's."
)
_LAYER_HEADER = (
    "case", "impl", "median ms", "ratio vs keras", "passes", "case passes", "min passes",
    "bound ms", "copy GB/s", "case copy GB/s", "max abs diff vs keras",
)  # fmt: skip


def _layer_row(row: dict, name: str, v: dict) -> list[str]:
    if not v["available"]:
        return [row["id"], name, f"not available: {v['reason']}"] + [""] * 8
    return [
        row["id"],
        name,
        _ms(v["median_s"]),
        _fmt(v["ratio"]),
        _fmt(v["passes"], 1),
        _fmt(v["passes_vs_case_copy"], 1),
        str(row["min_passes"]),
        _ms(row["bound_s"]),
        _fmt(row["bandwidth_gb_s"], 1),
        _fmt(row["case_bandwidth_gb_s"], 1),
        _sci(v.get("max_abs_diff_vs_keras")),
    ]


def _xla_copy_markdown(rows: list[dict]) -> list[str]:
    xla_rows = [r for r in rows if r.get("xla_copy_bandwidth_gb_s")]
    if not xla_rows:
        return []
    names = list(_LAYER_VARIANTS)
    return [
        "",
        "Under XLA the passes above are priced at TensorFlow's copy (the targets use them). The "
        "same copy compiled by XLA runs at the bandwidth below; priced at that, each "
        "implementation costs:",
        "",
        *_table(
            ("case", "XLA copy GB/s", *(f"{name} passes" for name in names)),
            (
                (
                    row["id"],
                    _fmt(row["xla_copy_bandwidth_gb_s"], 1),
                    *(
                        _fmt(row["variants"][n].get("passes_vs_xla_copy"), 1)
                        if row["variants"][n]["available"]
                        else "n/a"
                        for n in names
                    ),
                )
                for row in xla_rows
            ),
        ),  # fmt: skip
    ]


def _layer_markdown(case: dict) -> list[str]:
    rows = case["rows"]
    return [
        "## Layer: one BatchNorm, float32",
        "",
        _LAYER_INTRO,
        "",
        *_table(
            _LAYER_HEADER,
            (_layer_row(row, name, v) for row in rows for name, v in row["variants"].items()),
        ),
        *_xla_copy_markdown(rows),
    ]


def _lenet_markdown(lenet: dict) -> list[str]:
    return [
        f"## LeNet training (batch {lenet['batch_size']}, SGD, chapter recipe, synthetic data, "
        "no XLA)",
        "",
        f"Epoch time = median step time x {lenet['steps_per_epoch']} steps.",
        "",
        *_table(
            ("model", "step ms", "epoch s", "examples/s"),
            (
                (norm, _ms(v["median_s"]), _fmt(v["epoch_s"]), _fmt(v["examples_per_s"], 0))
                for norm, v in lenet["variants"].items()
            ),
        ),
        "",
        f"tfbn / keras epoch time: {_fmt(lenet.get('ratio'))}; BN overhead ratio "
        f"(tfbn - none) / (keras - none): {_fmt(lenet.get('overhead_ratio'))}.",
    ]


def _pipeline_markdown(p: dict) -> list[str]:
    return [
        "## Input pipeline (Fashion-MNIST training set)",
        "",
        *_table(
            ("pipeline examples/s", "LeNet tfbn training examples/s", "ratio"),
            [
                (
                    _fmt(p["examples_per_s"], 0),
                    _fmt(p["training_examples_per_s"], 0),
                    _fmt(p["ratio"]),
                )
            ],
        ),  # fmt: skip
    ]


def _export_markdown(e: dict) -> list[str]:
    return [
        "## Exported SavedModel inference (LeNet tfbn)",
        "",
        *_table(
            ("batch", "folded examples/s", "unfolded examples/s", "folded / unfolded"),
            (
                (
                    batch,
                    _fmt(v["folded"]["median_examples_per_s"], 0),
                    _fmt(v["unfolded"]["median_examples_per_s"], 0),
                    _fmt(v["ratio"]),
                )
                for batch, v in e["batches"].items()
            ),
        ),  # fmt: skip
    ]


def _models_markdown(result: dict) -> list[str]:
    return [
        "## Real models: a training step (keras.applications, weights=None, SGD, synthetic data)",
        "",
        "The same model with Keras's layer and converted by `tfbn.convert`; both start from the "
        "same weights on the same batch (their first losses are shown).",
        "",
        *_table(
            ("model", "input", "batch", "BN layers", "keras ms", "tfbn ms", "tfbn / keras",
             "first loss keras", "first loss tfbn"),
            (
                (name, f"{r['input_size']}x{r['input_size']}", r["batch_size"],
                 r["batch_norm_layers"], _ms(r["variants"]["keras"]["median_s"]),
                 _ms(r["variants"]["tfbn"]["median_s"]), _fmt(r["ratio"]),
                 _fmt(r["first_loss"]["keras"], 5), _fmt(r["first_loss"]["tfbn"], 5))
                for name, r in result["models"].items()
            ),
        ),
    ]  # fmt: skip


def _models_export_markdown(result: dict) -> list[str]:
    return [
        "## Real models: exported SavedModel inference (`serving_float`), folded vs unfolded",
        "",
        "The no-BN model is a copy of the converted one whose batch norms pass their input "
        "through, exported unfolded: the most any folding can gain.",
        "",
        *_table(
            ("model", "input", "batch", "folded BN", "folded examples/s", "unfolded examples/s",
             "no-BN examples/s", "folded / unfolded", "no BN / unfolded", "folded / no BN"),
            (
                (name, f"{r['input_size']}x{r['input_size']}", r["batch_size"], r["folded_layers"],
                 *(_fmt(r[kind]["median_examples_per_s"], 0)
                   for kind in ("folded", "unfolded", "no_bn")),
                 _fmt(r["ratio"]), _fmt(r["bound_ratio"]), _fmt(r["of_bound"]))
                for name, r in result["models"].items()
            ),
        ),
    ]  # fmt: skip


def _recalibrate_markdown(result: dict) -> list[str]:
    return [
        "## Real models: recalibration and inspection in inference passes (keras.applications, "
        "weights=None, random data)",
        "",
        "Each time is over that of one `model.predict` over the same dataset (medians of "
        "interleaved repeats, after a call that traces; the first call's seconds are shown "
        "apart). Targets: exact <= 3, fast <= 1.5 passes.",
        "",
        *_table(
            ("model", "input", "examples", "batch", "BN layers", "predict ms", "exact passes",
             "fast passes", "inspect passes", "first call s (predict, exact, fast, inspect)"),
            (
                (name, f"{r['input_size']}x{r['input_size']}", r["examples"], r["batch_size"],
                 r["batch_norm_layers"], _ms(r["variants"]["predict"]["median_s"]),
                 *(_fmt(r["passes"][v]) for v in ("exact", "fast", "inspect")),
                 ", ".join(_fmt(r["first_call_s"][v], 1)
                           for v in ("predict", "exact", "fast", "inspect")))
                for name, r in result["models"].items()
            ),
        ),
    ]  # fmt: skip


def _jax_markdown(result: dict) -> list[str]:
    m = result["model"]
    return [
        f"## Keras's JAX backend under jax.jit (JAX {result['jax']}, {result['device']})",
        "",
        "Run in a process of its own with `KERAS_BACKEND=jax`. The layer: forward + backward "
        "(gradients for x, gamma, beta, and the moving-statistics update), float32; the last "
        "column compares dx with Keras's.",
        "",
        *_table(
            ("shape", "axis", "keras ms", "tfbn ms", "tfbn / keras", "max abs diff vs keras"),
            (
                (f"{name} {tuple(r['shape'])}", r["axis"], _ms(r["variants"]["keras"]["median_s"]),
                 _ms(r["variants"]["tfbn"]["median_s"]), _fmt(r["ratio"]),
                 _sci(r["max_abs_diff_vs_keras"]))
                for name, r in result["layer"].items()
            ),
        ),
        "",
        f"A training step (SGD, synthetic data, `weights=None`, one jitted stateless step) of "
        f"{m['name']} with Keras's layer and converted by `tfbn.convert`:",
        "",
        *_table(
            ("model", "input", "batch", "BN layers", "keras ms", "tfbn ms", "tfbn / keras",
             "first loss keras", "first loss tfbn"),
            [
                (m["name"], f"{m['input_size']}x{m['input_size']}", m["batch_size"],
                 m["batch_norm_layers"], _ms(m["variants"]["keras"]["median_s"]),
                 _ms(m["variants"]["tfbn"]["median_s"]), _fmt(m["ratio"]),
                 _fmt(m["first_loss"]["keras"], 5), _fmt(m["first_loss"]["tfbn"], 5))
            ],
        ),
    ]  # fmt: skip


def render_markdown(results: dict) -> str:
    """Renders benchmark results (the dict `run_benchmarks` returns) as a Markdown report.

    Args:
        results: The results dict, as returned by `run_benchmarks` or read back from its JSON.

    Returns:
        The Markdown text: machine, settings, targets and one section per case.
    """
    lines = _preamble_markdown(results)
    for case in BENCH_CASES:
        if case.name in results["cases"]:
            lines += ["", *case.render(results["cases"][case.name])]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the cases
@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark case.

    Attributes:
        name: The case's name, as `--cases` takes it and as its results are keyed.
        run: `run(settings, cases, tick) -> dict` measures the case. `settings` are the run's
            (`repeats`, shapes, `quick`, ...), `cases` the results of the cases run before it,
            `tick(label)` is called once per step, before the step.
        render: `render(result) -> list[str]`: the case's Markdown section.
        steps: `steps(settings) -> int`: how many times `run` calls `tick` (for the progress bar).
        default: Whether the case runs when no cases are named (slow cases only on request).
    """

    name: str
    run: Callable[[dict, dict, Callable[[str], None]], dict]
    render: Callable[[dict], list[str]]
    steps: Callable[[dict], int] = lambda settings: 1
    default: bool = True


def _layer_steps(settings: dict) -> list[tuple[str, tuple, str, bool]]:
    return [
        (shape_name, shape, mode, use_xla)
        for shape_name, shape in settings["shapes"].items()
        for mode in ("train", "inference")
        for use_xla in ((False, True) if settings["xla"] else (False,))
    ]


def _layer_cases(settings: dict, cases: dict, tick: Callable[[str], None]) -> dict:
    rows = []
    for shape_name, shape, mode, use_xla in _layer_steps(settings):
        tick(f"layer {shape_name} {mode}{' xla' if use_xla else ''}")
        rows.append(_layer_case(shape_name, shape, mode, use_xla, settings))
    _add_passes(rows)
    return {"rows": rows}


def _lenet_cases(settings: dict, cases: dict, tick: Callable[[str], None]) -> dict:
    tick("lenet")
    return _lenet_case(settings)


# In the order they run (the pipeline case reuses the LeNet case's training rate).
BENCH_CASES: tuple[Case, ...] = (
    Case("layer", _layer_cases, _layer_markdown, lambda settings: len(_layer_steps(settings))),
    Case("lenet", _lenet_cases, _lenet_markdown),
    Case("pipeline", _pipeline_case, _pipeline_markdown),
    Case("export", _export_case, _export_markdown),
    Case("models", _models_case, _models_markdown, lambda s: len(s["models"]), default=False),
    Case(
        "models_export",
        _models_export_case,
        _models_export_markdown,
        lambda s: len(s["models"]),
        default=False,
    ),
    Case(
        "recalibrate",
        _recalibrate_case,
        _recalibrate_markdown,
        lambda s: len(s["models"]),
        default=False,
    ),
    Case("jax", _jax_case, _jax_markdown, default=False),
)
CASES: tuple[str, ...] = tuple(case.name for case in BENCH_CASES)


# ----------------------------------------------------------------------------- entry points
def _check_cases(cases) -> tuple[str, ...]:
    names = tuple(case.name for case in BENCH_CASES)
    if cases is None:
        cases = tuple(case.name for case in BENCH_CASES if case.default)
    elif isinstance(cases, str):
        cases = tuple(c.strip() for c in cases.split(",") if c.strip())
    else:
        cases = tuple(cases)
    if cases == ("all",):
        cases = names
    unknown = [c for c in cases if c not in names]
    if not cases or unknown:
        raise UsageError(
            f"Argument `cases` must be 'all' or a non-empty selection of {names}; received "
            f"cases={cases!r}."
        )
    # Keep the registry's order whatever order they were given in.
    return tuple(c for c in names if c in cases)


def _check_arguments(cases, repeats, output_dir, name, note) -> tuple[str, ...]:
    from tfbn.utils.arguments import check_count

    selected = _check_cases(cases)
    check_count("repeats", repeats, none=True, error=UsageError)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise UsageError(
            f"Argument `name` must be a file stem of letters, digits, '.', '_' or '-'; received "
            f"name={name!r}."
        )
    if not isinstance(note, str):
        raise UsageError(f"Argument `note` must be a string; received note={note!r}.")
    if output_dir is not None:
        check_writable_dir(output_dir)
    if "pipeline" in selected:
        from tfbn.workflow.data import check_data_dir

        check_data_dir()
    if "jax" in selected and importlib.util.find_spec("jax") is None:
        raise UsageError(
            "The `jax` case needs JAX, which is not installed: pip install tfbn[jax] (or "
            "leave out `jax` from `cases`)."
        )
    return selected


def _settings(quick: bool, repeats: int | None, xla: bool) -> dict:
    settings = {name: sizes[bool(quick)] for name, sizes in _SIZES.items()}
    settings.update(quick=bool(quick), xla=bool(xla))
    if repeats is not None:
        settings["repeats"] = repeats
        settings["export_repeats"] = min(repeats, settings["export_repeats"])
    return settings


def _run_cases(selected: Sequence[str], settings: dict, verbose: int) -> dict:
    from tqdm.auto import tqdm

    cases = [case for case in BENCH_CASES if case.name in selected]
    results: dict = {}
    total = sum(case.steps(settings) for case in cases)
    with tqdm(total=total, desc="tfbn bench", unit="case", disable=verbose != 1) as bar:
        steps = 0

        def tick(label: str) -> None:
            nonlocal steps
            if steps:
                bar.update()
            steps += 1
            bar.set_postfix_str(label)

        for case in cases:
            results[case.name] = case.run(settings, results, tick)
        bar.update(total - bar.n)
    return results


def _write_results(results: dict, output_dir, name: str) -> dict[str, str]:
    out = Path(output_dir)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    atomic_write_text(json_path, json.dumps(results, indent=2) + "\n")
    atomic_write_text(md_path, render_markdown(results))
    return {"json": str(json_path), "markdown": str(md_path)}


def run_benchmarks(
    *,
    cases: Iterable[str] | str | None = None,
    quick: bool = False,
    repeats: int | None = None,
    xla: bool = True,
    output_dir: str | os.PathLike | None = "docs/benchmarks",
    name: str = "results",
    note: str = "",
    verbose: int = 1,
) -> dict:
    """Benchmarks tfbn.BatchNorm against keras.layers.BatchNormalization and writes a report.

    Everything runs in this process; the implementations compared in a case are timed
    interleaved, after a warm-up, and the medians of the repeats are reported with their ratios.

    Args:
        cases: The cases to run, names from `BENCH_CASES` (`"layer"`, `"lenet"`, `"pipeline"`,
            `"export"`, `"models"`, `"models_export"`, `"recalibrate"`, `"jax"`), as an iterable
            or a comma-separated string; `"all"` runs every case; `None` runs the default ones
            (all but the three real-model cases and `jax`, which take minutes).
        quick: Tiny shapes and few repeats: checks that the suite runs, measures nothing useful.
        repeats: Interleaved repeats per comparison (default 15, or 3 with `quick`).
        xla: Also time the layer cases under `tf.function(jit_compile=True)`.
        output_dir: Folder for `<name>.json` and `<name>.md` (created if missing, files written
            atomically); `None` writes nothing.
        name: File stem of the outputs.
        note: Free text kept with the results (e.g. what else ran on the machine).
        verbose: 1 (default) shows a progress bar over the cases; 0 shows nothing.

    Returns:
        The results dict (also the content of the JSON file): `machine`, `settings`, `cases`
        (one entry per case, keyed by name), `targets` (value, threshold and pass/fail for each
        target in `TARGETS`), plus `files` (paths written) when `output_dir` is given.

    Raises:
        UsageError: (a `ValueError`) if `cases`, `repeats`, `name` or `note` is invalid, the
            `pipeline` case is selected and the Fashion-MNIST files are missing, or the `jax`
            case is selected and JAX is not installed (before any work).
        RuntimeError: if the `jax` case's process fails (its last line of error output).
        OSError: if no file can be written in `output_dir` (checked before any work, with the
            folder as `filename`), or writing the results fails.
    """
    selected = _check_arguments(cases, repeats, output_dir, name, note)
    settings = _settings(quick, repeats, xla)
    results: dict = {
        "schema": SCHEMA_VERSION,
        "machine": machine_description(),
        "settings": {
            "quick": bool(quick),
            "repeats": settings["repeats"],
            "xla": bool(xla),
            "cases": list(selected),
            "min_sample_s": settings["min_sample_s"],
            "note": note,
        },
    }
    results["cases"] = _run_cases(selected, settings, verbose)
    results["machine"]["load_average_end"] = _load_average()
    results["targets"] = _targets(results["cases"])
    if output_dir is not None:
        results["files"] = _write_results(results, output_dir, name)
    return results

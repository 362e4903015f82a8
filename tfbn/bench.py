"""`tfbn bench`: tfbn.BatchNorm against keras.layers.BatchNormalization, in one process.

Every comparison runs its implementations interleaved (A, B, A, B, ... with the order rotated
at each repeat) after a warm-up, so that a change in the machine's load hits all of them alike,
and reports medians and ratios (ours / keras). Absolute times only mean something with the
machine they were taken on, so the results carry a description of it.

Cases:

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
- `lenet`: the chapter's LeNet training step (SGD, `tfbn.config.RECIPE`) on synthetic data with
  tfbn, Keras and no batch normalization; epoch time = median step time x steps per epoch
  (60000 / batch size).
- `pipeline`: the Fashion-MNIST training input pipeline (`tfbn.data`) in examples per second,
  against the LeNet (tfbn) training rate.
- `export`: inference throughput of an exported SavedModel with BatchNorm folded into the previous
  layer against one without folding, at batch 1 and 256 (`tfbn.export`).

A case whose module is not installed is reported as "not available" instead of failing.
"""

from __future__ import annotations

import datetime
import importlib
import inspect
import json
import math
import os
import platform
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

__all__ = ["CASES", "TARGETS", "run_benchmarks", "render_markdown"]

CASES: tuple[str, ...] = ("layer", "lenet", "pipeline", "export")
SCHEMA_VERSION = 1
TRAIN_EXAMPLES = 60000

# Compulsory traffic, in passes over the tensor (one read or one write of it).
MIN_PASSES = {"train": 5, "inference": 2}

# (key, description, comparison, threshold); see `_targets` for what each value is.
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

_FULL = {
    "shapes": {"4d": (128, 32, 32, 64), "4d-nchw": (128, 64, 32, 32), "2d": (4096, 1024)},
    "repeats": 15,
    "min_sample_s": 0.05,
    "lenet_batch": 256,
    "pipeline_batches": 200,
    "export_batches": (1, 256),
    "export_seconds": 1.0,
    "export_repeats": 5,
}
_QUICK = {
    "shapes": {"4d": (8, 4, 4, 8), "4d-nchw": (8, 8, 4, 4), "2d": (16, 32)},
    "repeats": 3,
    "min_sample_s": 0.0,
    "lenet_batch": 32,
    "pipeline_batches": 5,
    "export_batches": (1, 256),
    "export_seconds": 0.05,
    "export_repeats": 2,
}
# The channel axis of each layer shape (default: last): "4d-nchw" is channels-first, the layout
# cuDNN prefers.
_CHANNEL_AXIS = {"4d-nchw": 1}
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
) -> dict[str, dict]:
    """Times each function, interleaved, and returns per-call samples and their median.

    Each function is warmed up first (tracing, XLA compilation, first-touch allocation), then called
    `number` times per sample, `number` chosen so a sample lasts at least `min_sample_s`. The order
    of the functions is rotated at every repeat so that none always runs right after another.
    """
    numbers = {}
    for name, fn in functions.items():
        for _ in range(_WARMUP_CALLS):
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
def _fused_supported() -> bool:
    from tfbn.layers import BatchNorm

    return "fused" in inspect.signature(BatchNorm.__init__).parameters


def _layer_variants() -> dict[str, dict]:
    """Implementation name -> constructor keyword arguments (`None` for Keras's layer)."""
    variants: dict[str, dict] = {"keras": None, "tfbn": {}}
    if _fused_supported():
        variants["tfbn_fused"] = {"fused": True}
        variants["tfbn_unfused"] = {"fused": False}
    return variants


def _make_layer(name: str, kwargs: dict | None, axis: int = -1):
    import keras

    from tfbn.config import RECIPE
    from tfbn.layers import BatchNorm

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
    for name, kwargs in _layer_variants().items():
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
    for name in _layer_variants():
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
def _lenet_step(norm: str, batch_size: int):
    import keras
    import numpy as np
    import tensorflow as tf

    from tfbn.config import RECIPE
    from tfbn.models import lenet

    keras.utils.set_random_seed(0)
    model = lenet(norm)
    optimizer = keras.optimizers.SGD(RECIPE.lr_for(norm))
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    variables = model.trainable_variables
    optimizer.build(variables)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(size=(batch_size, 28, 28, 1)).astype("float32"))
    labels = tf.constant(rng.integers(0, 10, size=(batch_size,)).astype("int32"))

    @tf.function
    def step(images, labels):
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, model(images, training=True))
        grads = tape.gradient(loss, variables)
        optimizer.apply(grads, variables)
        return loss

    return lambda: step(images, labels)


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
def _optional(module_name: str, *names: str):
    """The named attributes of an optional module, or a reason string when it is missing."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        return f"module {module_name} is not available"
    missing = [n for n in names if not hasattr(module, n)]
    if missing:
        return f"{module_name} has no {', '.join(missing)}"
    return tuple(getattr(module, n) for n in names)


def _train_dataset(load_fashion_mnist, batch_size: int):
    params = inspect.signature(load_fashion_mnist).parameters
    kwargs = {"batch_size": batch_size} if "batch_size" in params else {}
    data = load_fashion_mnist(**kwargs)
    if isinstance(data, dict):
        return data["train"]
    if hasattr(data, "train"):
        return data.train
    if isinstance(data, (tuple, list)):
        return data[0]
    return data


def _count_rate(dataset, batches: int) -> float:
    """Examples per second over `batches` batches, after one warm-up batch."""
    import tensorflow as tf

    iterator = iter(dataset.repeat())
    next(iterator)
    examples = 0
    start = time.perf_counter()
    for _ in range(batches):
        element = next(iterator)
        first = element[0] if isinstance(element, (tuple, list)) else element
        examples += int(tf.shape(first)[0])
    return examples / (time.perf_counter() - start)


def _pipeline_case(settings, lenet_result: dict | None) -> dict:
    found = _optional("tfbn.data", "load_fashion_mnist")
    if isinstance(found, str):
        return {"id": "pipeline", "available": False, "reason": found}
    (load_fashion_mnist,) = found
    batch = settings["lenet_batch"]
    dataset = _train_dataset(load_fashion_mnist, batch)
    rate_fn = _optional("tfbn.data", "pipeline_rate")
    if isinstance(rate_fn, str):
        method = "tfbn.bench counting loop"
        rate = _count_rate(dataset, settings["pipeline_batches"])
    else:
        method = "tfbn.data.pipeline_rate"
        kwargs = {}
        if "warmup" in inspect.signature(rate_fn[0]).parameters:
            # The full warm-up pass fills the in-memory cache, as the first epoch of training
            # does; a quick run skips it.
            kwargs["warmup"] = not settings["quick"]
        rate = float(rate_fn[0](dataset, batches=settings["pipeline_batches"], **kwargs))
    if lenet_result is None or "tfbn" not in lenet_result["variants"]:
        lenet_result = _lenet_case(settings, norms=("tfbn",))
    training = lenet_result["variants"]["tfbn"]["examples_per_s"]
    return {
        "id": "pipeline",
        "available": True,
        "method": method,
        "batch_size": batch,
        "batches": settings["pipeline_batches"],
        "examples_per_s": rate,
        "training_examples_per_s": training,
        "ratio": rate / training,
    }


# ----------------------------------------------------------------------------- export case
def _export_case(settings, work_dir: Path) -> dict:
    found = _optional("tfbn.export", "export_saved_model")
    if isinstance(found, str):
        return {"id": "export", "available": False, "reason": found}
    (export_saved_model,) = found
    throughput = _optional("tfbn.serving", "inference_throughput")
    if isinstance(throughput, str):
        return {"id": "export", "available": False, "reason": throughput}
    (throughput_fn,) = throughput
    throughput_kwargs = {"seconds": settings["export_seconds"]}
    if "repeats" in inspect.signature(throughput_fn).parameters:
        # One timed run per call: the repeats and their median are taken here, interleaved.
        throughput_kwargs["repeats"] = 1

    def inference_throughput(path, batch):
        return float(throughput_fn(path, batch, **throughput_kwargs))

    import keras
    import numpy as np

    from tfbn.models import lenet

    keras.utils.set_random_seed(0)
    model = lenet("tfbn")
    # A few training-mode calls so the moving statistics are not the initial ones.
    images = np.random.default_rng(0).uniform(size=(64, 28, 28, 1)).astype("float32")
    for _ in range(3):
        model(images, training=True)
    paths = {
        "folded": Path(export_saved_model(model, work_dir, name="lenet_folded", fold=True)),
        "unfolded": Path(export_saved_model(model, work_dir, name="lenet_unfolded", fold=False)),
    }
    batches = {}
    for batch in settings["export_batches"]:
        samples: dict[str, list[float]] = {"folded": [], "unfolded": []}
        names = list(samples)
        for name in names:  # warm-up: loading, tracing
            inference_throughput(paths[name], batch)
        for r in range(settings["export_repeats"]):
            for name in names[r % 2 :] + names[: r % 2]:
                samples[name].append(inference_throughput(paths[name], batch))
        rows = {
            name: {"median_examples_per_s": statistics.median(v), "samples_examples_per_s": v}
            for name, v in samples.items()
        }
        rows["ratio"] = (
            rows["folded"]["median_examples_per_s"] / rows["unfolded"]["median_examples_per_s"]
        )
        batches[str(batch)] = rows
    return {
        "id": "export",
        "available": True,
        "seconds_per_sample": settings["export_seconds"],
        "repeats": settings["export_repeats"],
        "batches": batches,
    }


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


def _targets(cases: dict) -> list[dict]:
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


# ----------------------------------------------------------------------------- output
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


def render_markdown(results: dict) -> str:
    """Renders benchmark results (the dict `run_benchmarks` returns) as a Markdown report.

    Args:
        results: The results dict, as returned by `run_benchmarks` or read back from its JSON.

    Returns:
        The Markdown text: machine, settings, targets and one table per case.
    """
    m = results["machine"]
    s = results["settings"]
    gpus = ", ".join(m["gpus"]) if m["gpus"] else "no GPU"
    load = m.get("load_average_start")
    load_end = m.get("load_average_end")
    lines = [
        "# tfbn benchmarks",
        "",
        f"Machine: {m['cpu']}, {m['cores']} logical cores, {m['memory_gib']} GiB, {gpus}; "
        f"{m['os']}.",
        f"Software: Python {m['python']}, TensorFlow {m['tensorflow']}, Keras {m['keras']}, "
        f"NumPy {m['numpy']}, tfbn {m['tfbn']}.",
        f"Date: {m['date']}; load average (1, 5, 15 min) at start {load}, at end {load_end}.",
        "",
        f"Settings: quick={s['quick']}, repeats={s['repeats']}, XLA rows={s['xla']}, "
        f"cases={', '.join(s['cases'])}. All timings in one process, implementations interleaved "
        "(order rotated every repeat) after a warm-up; medians of the repeats; ratios are "
        "tfbn / keras medians.",
        "",
        *([f"Note: {s['note']}", ""] if s.get("note") else []),
        "## Targets",
        "",
        "| target | value | threshold | result |",
        "|---|---|---|---|",
    ]
    for t in results["targets"]:
        lines.append(
            f"| {t['description']} | {_fmt(t['value'])} | {t['comparison']} {t['threshold']} | "
            f"{_verdict(t['pass'])} |"
        )
    cases = results["cases"]

    if "layer" in cases:
        lines += [
            "",
            "## Layer: one BatchNorm, float32",
            "",
            "`train` = forward + backward (gradients for x, gamma, beta) + moving-statistics "
            "update; `inference` = forward with the moving statistics. A pass is one read or one "
            "write of the tensor at the best copy bandwidth measured for that shape in this run "
            "(`copy GB/s`; a copy `x * c` = 2 passes); `case passes` counts against the copy "
            "interleaved with that case instead (`case copy GB/s`), which runs slower next to "
            "heavy steps. `min passes` is the compulsory traffic (train: read x, write y, read "
            "dy, read x, write dx = 5; inference: read x, write y = 2), `bound ms` = min passes "
            "x pass time. The last column compares each output (dx or y) with Keras's.",
            "",
            "| case | impl | median ms | ratio vs keras | passes | case passes | min passes "
            "| bound ms | copy GB/s | case copy GB/s | max abs diff vs keras |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in cases["layer"]["rows"]:
            for name, v in row["variants"].items():
                if not v["available"]:
                    lines.append(
                        f"| {row['id']} | {name} | not available: {v['reason']} | | | | | | | | |"
                    )
                    continue
                lines.append(
                    f"| {row['id']} | {name} | {_ms(v['median_s'])} | {_fmt(v['ratio'])} | "
                    f"{_fmt(v['passes'], 1)} | {_fmt(v['passes_vs_case_copy'], 1)} | "
                    f"{row['min_passes']} | {_ms(row['bound_s'])} | "
                    f"{_fmt(row['bandwidth_gb_s'], 1)} | {_fmt(row['case_bandwidth_gb_s'], 1)} | "
                    f"{_sci(v.get('max_abs_diff_vs_keras'))} |"
                )
        xla_rows = [r for r in cases["layer"]["rows"] if r.get("xla_copy_bandwidth_gb_s")]
        if xla_rows:
            lines += [
                "",
                "Under XLA the passes above are priced at TensorFlow's copy (the targets use "
                "them). The same copy compiled by XLA runs at the bandwidth below; priced at "
                "that, each implementation costs:",
                "",
                "| case | XLA copy GB/s | "
                + " | ".join(f"{name} passes" for name in _layer_variants())
                + " |",
                "|---|---|" + "---|" * len(_layer_variants()),
            ]
            for row in xla_rows:
                cells = [
                    _fmt(row["variants"][name].get("passes_vs_xla_copy"), 1)
                    if row["variants"][name]["available"]
                    else "n/a"
                    for name in _layer_variants()
                ]
                lines.append(
                    f"| {row['id']} | {_fmt(row['xla_copy_bandwidth_gb_s'], 1)} | "
                    + " | ".join(cells)
                    + " |"
                )

    if "lenet" in cases:
        lenet = cases["lenet"]
        lines += [
            "",
            f"## LeNet training (batch {lenet['batch_size']}, SGD, chapter recipe, synthetic "
            f"data, no XLA)",
            "",
            f"Epoch time = median step time x {lenet['steps_per_epoch']} steps.",
            "",
            "| model | step ms | epoch s | examples/s |",
            "|---|---|---|---|",
        ]
        for norm, v in lenet["variants"].items():
            lines.append(
                f"| {norm} | {_ms(v['median_s'])} | {_fmt(v['epoch_s'])} | "
                f"{_fmt(v['examples_per_s'], 0)} |"
            )
        lines += [
            "",
            f"tfbn / keras epoch time: {_fmt(lenet.get('ratio'))}; BN overhead ratio "
            f"(tfbn - none) / (keras - none): {_fmt(lenet.get('overhead_ratio'))}.",
        ]

    if "pipeline" in cases:
        p = cases["pipeline"]
        lines += ["", "## Input pipeline (Fashion-MNIST training set)", ""]
        if not p["available"]:
            lines.append(f"not available: {p['reason']}")
        else:
            lines += [
                "| pipeline examples/s | LeNet tfbn training examples/s | ratio | measured by |",
                "|---|---|---|---|",
                f"| {_fmt(p['examples_per_s'], 0)} | {_fmt(p['training_examples_per_s'], 0)} | "
                f"{_fmt(p['ratio'])} | {p['method']} |",
            ]

    if "export" in cases:
        e = cases["export"]
        lines += ["", "## Exported SavedModel inference (LeNet tfbn)", ""]
        if not e["available"]:
            lines.append(f"not available: {e['reason']}")
        else:
            lines += [
                "| batch | folded examples/s | unfolded examples/s | folded / unfolded |",
                "|---|---|---|---|",
            ]
            for batch, v in e["batches"].items():
                lines.append(
                    f"| {batch} | {_fmt(v['folded']['median_examples_per_s'], 0)} | "
                    f"{_fmt(v['unfolded']['median_examples_per_s'], 0)} | {_fmt(v['ratio'])} |"
                )
    return "\n".join(lines) + "\n"


def _guarded(case_id: str, run: Callable[[], dict]) -> dict:
    """Runs a case that depends on another module; a failure there becomes a reported row."""
    try:
        return run()
    except Exception as error:  # noqa: BLE001 - reported in the results, not swallowed
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        return {
            "id": case_id,
            "available": False,
            "reason": f"failed with {type(error).__name__}: {first_line}",
        }


def _atomic_write(path: Path, text: str) -> None:
    """Writes `text` to a temporary file beside `path`, then renames it over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------- entry points
def _check_arguments(cases, repeats, output_dir, name) -> tuple[str, ...]:
    if cases is None:
        cases = CASES
    elif isinstance(cases, str):
        cases = tuple(c.strip() for c in cases.split(",") if c.strip())
    else:
        cases = tuple(cases)
    unknown = [c for c in cases if c not in CASES]
    if not cases or unknown:
        raise ValueError(
            f"Argument `cases` must be a non-empty selection of {CASES}; received cases={cases!r}."
        )
    if repeats is not None and (
        isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1
    ):
        raise ValueError(
            f"Argument `repeats` must be a positive integer; received repeats={repeats!r}."
        )
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ValueError(
            f"Argument `name` must be a file stem of letters, digits, '.', '_' or '-'; received "
            f"name={name!r}."
        )
    if output_dir is not None and Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise ValueError(
            f"Argument `output_dir` must be a directory; received output_dir={str(output_dir)!r}, "
            "which is a file."
        )
    # Keep the canonical order whatever order they were given in.
    return tuple(c for c in CASES if c in cases)


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
        cases: The cases to run, a subset of `CASES` (`"layer"`, `"lenet"`, `"pipeline"`,
            `"export"`), as an iterable or a comma-separated string; `None` runs all.
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
        ValueError: if `cases`, `repeats`, `name` or `output_dir` is invalid (before any work).
    """
    selected = _check_arguments(cases, repeats, output_dir, name)
    if not isinstance(note, str):
        raise ValueError(f"Argument `note` must be a string; received note={note!r}.")
    from tqdm.auto import tqdm

    settings = dict(_QUICK if quick else _FULL, quick=bool(quick))
    if repeats is not None:
        settings["repeats"] = repeats
        settings["export_repeats"] = min(repeats, settings["export_repeats"])

    layer_jobs = [
        (shape_name, shape, mode, use_xla)
        for shape_name, shape in settings["shapes"].items()
        for mode in ("train", "inference")
        for use_xla in ((False, True) if xla else (False,))
    ]
    total = sum(len(layer_jobs) if c == "layer" else 1 for c in selected)
    results: dict = {
        "schema": SCHEMA_VERSION,
        "machine": machine_description(),
        "settings": {
            "quick": bool(quick),
            "repeats": settings["repeats"],
            "xla": bool(xla),
            "cases": list(selected),
            "fused_argument": _fused_supported(),
            "min_sample_s": settings["min_sample_s"],
            "note": note,
        },
        "cases": {},
    }
    with tqdm(total=total, desc="tfbn bench", unit="case", disable=verbose != 1) as bar:
        if "layer" in selected:
            rows = []
            for shape_name, shape, mode, use_xla in layer_jobs:
                bar.set_postfix_str(f"layer {shape_name} {mode}{' xla' if use_xla else ''}")
                rows.append(_layer_case(shape_name, shape, mode, use_xla, settings))
                bar.update()
            _add_passes(rows)
            results["cases"]["layer"] = {"rows": rows}
        if "lenet" in selected:
            bar.set_postfix_str("lenet")
            results["cases"]["lenet"] = _lenet_case(settings)
            bar.update()
        if "pipeline" in selected:
            bar.set_postfix_str("pipeline")
            lenet_result = results["cases"].get("lenet")
            results["cases"]["pipeline"] = _guarded(
                "pipeline", lambda: _pipeline_case(settings, lenet_result)
            )
            bar.update()
        if "export" in selected:
            bar.set_postfix_str("export")
            with tempfile.TemporaryDirectory(prefix="tfbn-bench-export-") as work_dir:
                results["cases"]["export"] = _guarded(
                    "export", lambda: _export_case(settings, Path(work_dir))
                )
            bar.update()
    results["machine"]["load_average_end"] = _load_average()
    results["targets"] = _targets(results["cases"])

    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        json_path, md_path = out / f"{name}.json", out / f"{name}.md"
        _atomic_write(json_path, json.dumps(results, indent=2) + "\n")
        _atomic_write(md_path, render_markdown(results))
        results["files"] = {"json": str(json_path), "markdown": str(md_path)}
    return results

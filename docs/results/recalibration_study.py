"""Measures what `tfbn.recalibrate` costs and how close its fast mode comes (recalibration.md).

1. ResNet50 (`weights=None`, 48x48, 10 classes, 53 batch-norm layers), 256 examples: the time of
   one inference pass, of the exact mode, of the fast mode and of the former code that made one
   pass over the data per batch-norm layer (`git show dfa8e7d:tfbn/tools/recalibration.py`, imported
   from a temporary file). Interleaved, `--repeats` times; the exact and the former code must
   give the same statistics.
2. LeNet (the chapter's recipe) trained for `--epochs` on Fashion-MNIST (tfbn's loader), seeds
   `--seeds`: the statistics of fast mode (1 and 2 passes) against the exact ones, and the test
   accuracy with the moving averages, the exact and the fast statistics.

    python docs/results/recalibration_study.py [--repeats 2] [--epochs 2] [--seeds 0 1]

Prints one JSON object per measurement and writes docs/results/recalibration.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfbn  # noqa: E402
from tfbn.tools.recalibration import batch_norm_layers  # noqa: E402
from tfbn.utils.files import atomic_write_text  # noqa: E402
from tfbn.workflow.config import RECIPE  # noqa: E402

HERE = Path(__file__).resolve().parent
FORMER = "dfa8e7d"  # the last commit with one pass over the data per batch-norm layer


def former_recalibrate():
    """`recalibrate` of commit FORMER, loaded from a temporary copy of its module."""
    source = subprocess.run(
        ["git", "show", f"{FORMER}:tfbn/tools/recalibration.py"],
        cwd=HERE, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "former_recalibration.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("former_recalibration", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.recalibrate


def _statistics(model) -> list[np.ndarray]:
    return [
        np.concatenate([np.asarray(layer.moving_mean), np.asarray(layer.moving_variance)])
        for layer in batch_norm_layers(model)
    ]


def resnet_costs(repeats: int, examples: int = 256, size: int = 48, batch: int = 64) -> dict:
    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(
        weights=None, input_shape=(size, size, 3), classes=10, classifier_activation=None
    )
    x = np.random.default_rng(0).uniform(0.0, 1.0, (examples, size, size, 3)).astype("float32")
    dataset = tf.data.Dataset.from_tensor_slices(x).batch(batch)
    infer = tf.function(lambda images: model(images, training=False))
    former = former_recalibrate()

    def inference():
        for images in dataset:
            infer(images).numpy()

    runs = {
        "inference pass": inference,
        "exact": lambda: tfbn.recalibrate(model, dataset, mode="exact", verbose=0),
        "fast": lambda: tfbn.recalibrate(model, dataset, mode="fast", verbose=0),
        "former (a pass per layer)": lambda: former(model, dataset, progress=False),
    }
    inference()  # traces the inference function
    samples: dict[str, list[float]] = {name: [] for name in runs}
    results: dict[str, list[np.ndarray]] = {}
    names = list(runs)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            runs[name]()
            samples[name].append(time.perf_counter() - start)
            results[name] = _statistics(model)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    agreement = max(
        float(np.max(np.abs(a - b) / (np.abs(b) + 1e-6)))
        for a, b in zip(results["exact"], results["former (a pass per layer)"], strict=True)
    )
    return {
        "model": f"ResNet50 {size}x{size}, {len(results['exact'])} batch-norm layers",
        "examples": examples,
        "batch_size": batch,
        "seconds": samples,
        "median_s": medians,
        "exact_over_inference": medians["exact"] / medians["inference pass"],
        "former_over_inference": medians["former (a pass per layer)"] / medians["inference pass"],
        "exact_over_former": medians["exact"] / medians["former (a pass per layer)"],
        "fast_over_inference": medians["fast"] / medians["inference pass"],
        "exact_vs_former_max_relative_difference": agreement,
    }


def _deviation(fast: dict, exact: dict) -> dict:
    """Fast-mode statistics against exact ones, over every layer and channel."""
    shifts, ratios = [], []
    for name, ref in exact.items():
        std = np.sqrt(ref["new_variance"])
        shifts.append(np.abs(fast[name]["new_mean"] - ref["new_mean"]) / std)
        ratios.append(fast[name]["new_variance"] / ref["new_variance"])
    shifts, ratios = np.concatenate(shifts), np.concatenate(ratios)
    return {
        "mean_shift_in_std_median": float(np.median(shifts)),
        "mean_shift_in_std_max": float(shifts.max()),
        "variance_ratio_min": float(ratios.min()),
        "variance_ratio_max": float(ratios.max()),
    }


def _accuracy(model, dataset) -> float:
    model.compile(metrics=["accuracy"], loss=keras.losses.SparseCategoricalCrossentropy(True))
    return float(model.evaluate(dataset, verbose=0, return_dict=True)["accuracy"])


def lenet_fast_against_exact(seed: int, epochs: int) -> dict:
    data = tfbn.load_fashion_mnist(RECIPE.batch_size, seed=seed)
    keras.utils.set_random_seed(seed)
    model = tfbn.lenet("tfbn")
    model.compile(
        keras.optimizers.SGD(RECIPE.lr_for("tfbn")),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(data.train, epochs=epochs, verbose=0)
    trained = model.get_weights()
    row = {"seed": seed, "epochs": epochs, "test_accuracy": {}}
    row["test_accuracy"]["moving averages"] = _accuracy(model, data.test)
    reports = {}
    for label, kwargs in (
        ("exact", {"mode": "exact"}),
        ("fast, 1 pass", {"mode": "fast", "passes": 1}),
        ("fast, 2 passes", {"mode": "fast", "passes": 2}),
    ):
        model.set_weights(trained)
        start = time.perf_counter()
        reports[label] = tfbn.recalibrate(model, data.train_examples, verbose=0, **kwargs)
        row[f"{label} seconds"] = time.perf_counter() - start
        row["test_accuracy"][label] = _accuracy(model, data.test)
    for label in ("fast, 1 pass", "fast, 2 passes"):
        row[f"{label} vs exact"] = _deviation(reports[label], reports["exact"])
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--skip-resnet", action="store_true")
    parser.add_argument("--output", default=str(HERE / "recalibration.json"))
    args = parser.parse_args(argv)
    out = {"load_average_start": os.getloadavg()}
    if not args.skip_resnet:
        out["resnet50"] = resnet_costs(args.repeats)
        print(json.dumps(out["resnet50"]), flush=True)
    out["lenet"] = []
    for seed in args.seeds:
        out["lenet"].append(lenet_fast_against_exact(seed, args.epochs))
        print(json.dumps(out["lenet"][-1]), flush=True)
    out["load_average_end"] = os.getloadavg()
    atomic_write_text(args.output, json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

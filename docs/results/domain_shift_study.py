"""Batch-norm statistics on a shifted domain: what `tfbn inspect` flags, what recalibration fixes.

Reruns the figures of docs/guide/inspect.md (about 5 minutes on a 2-core CPU):

    .venv/bin/python docs/results/domain_shift_study.py [--run-dir DIR] [--output-dir docs/results]

1. Trains the chapter's LeNet with BatchNorm on Fashion-MNIST (`tfbn.train`, the chapter's recipe,
   seed 0), or reuses the model of an earlier run in `--run-dir`.
2. For each shift of the test images (lower contrast, inverted, dimmer, noisy) it runs the command
   line a user would: `tfbn inspect model.keras --data shifted_test.npz` (labelled: flags and
   accuracy), then `tfbn recalibrate model.keras --data shifted_train.npy` on 10,000 unlabeled
   training images with the same shift, and measures the test accuracy of the model as is and
   recalibrated, on the source and on the shifted domain.
3. Damages two batch-norm layers of a keras.applications MobileNetV2 (weights=None, statistics first
   recalibrated on its data) and checks that `tfbn.inspect` flags exactly those two.

Writes domain_shift.json, domain_shift.md (the tables) and domain_shift_inspect.png (the inspect
figure of the inverted domain) into `--output-dir`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# name -> (description, function of images in [0, 1])
SHIFTS = {
    "low-contrast": ("contrast halved, brightness +0.4", lambda x: 0.5 * x + 0.4),
    "inverted": ("1 - x (dark object on a light background)", lambda x: 1.0 - x),
    "dim": ("brightness x 0.3", lambda x: 0.3 * x),
    "noisy": (
        "Gaussian noise, std 0.3, clipped to [0, 1]",
        lambda x: np.clip(x + np.random.default_rng(0).normal(0.0, 0.3, x.shape), 0.0, 1.0),
    ),
}
UNLABELED_EXAMPLES = 10_000
TFBN = [sys.executable, "-m", "tfbn"]


def _images(split: str) -> tuple[np.ndarray, np.ndarray]:
    from tfbn.workflow.data import read_split

    images, labels = read_split(None, split)
    return (images[..., None] / 255.0).astype(np.float32), labels.astype(np.int64)


def _trained_model(run_dir: pathlib.Path) -> pathlib.Path:
    path = run_dir / "model.keras"
    if not path.exists():
        import tfbn

        tfbn.train(seed=0, run_dir=run_dir, export=False, verbose=2)
    return path


def _accuracy(model_path: pathlib.Path, x: np.ndarray, y: np.ndarray) -> float:
    from tfbn.utils.saving import load_model

    model = load_model(model_path, compile=False)
    predicted = np.argmax(model.predict(x, batch_size=512, verbose=0), axis=-1)
    return float(np.mean(predicted == y))


def _tfbn(*args: str) -> int:
    """Runs the `tfbn` command as a user would; returns its exit code."""
    print("$ tfbn " + " ".join(args), flush=True)
    return subprocess.run([*TFBN, *args, "--verbose", "0"], check=False).returncode


def _shift_row(name, shift, model_path, train_x, test_x, test_y, work, output_dir) -> dict:
    shifted_test, shifted_train = shift(test_x), shift(train_x[:UNLABELED_EXAMPLES])
    np.savez(work / f"{name}_test.npz", x=shifted_test.astype(np.float32), y=test_y)
    np.save(work / f"{name}_train.npy", shifted_train.astype(np.float32))
    report = work / f"{name}_inspect.json"
    plot = output_dir / "domain_shift_inspect.png" if name == "inverted" else None
    inspect_args = ["inspect", str(model_path), "--data", str(work / f"{name}_test.npz")]
    inspect_args += ["--output", str(report)] + (["--plot", str(plot)] if plot else [])
    inspect_exit = _tfbn(*inspect_args)
    recalibrated = work / f"{name}_recalibrated.keras"
    recal_args = ["recalibrate", str(model_path), "--data", str(work / f"{name}_train.npy")]
    if _tfbn(*recal_args, "--output", str(recalibrated)) != 0:
        raise SystemExit(f"tfbn recalibrate failed on the {name} domain")
    found = json.loads(report.read_text())
    return {
        "shift": name,
        "description": SHIFTS[name][0],
        "inspect_exit_code": inspect_exit,
        "flagged_layers": [layer["name"] for layer in found["layers"] if layer["flagged"]],
        "layers": len(found["layers"]),
        "largest_mean_shift": max(layer["mean_shift"] or 0.0 for layer in found["layers"]),
        "shifted_accuracy": _accuracy(model_path, shifted_test, test_y),
        "shifted_recalibrated_accuracy": _accuracy(recalibrated, shifted_test, test_y),
    }


def _damaged_layers_case() -> dict:
    """MobileNetV2 with healthy statistics, then two layers damaged: inspect flags those two."""
    import keras

    import tfbn

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), weights=None, classes=10, alpha=0.35
    )
    x = np.random.default_rng(0).uniform(-1.0, 1.0, (256, 32, 32, 3)).astype(np.float32)
    tfbn.recalibrate(model, x, verbose=0)
    healthy = tfbn.inspect(model, x, verbose=0)
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    shifted, scaled = norms[5], norms[20]
    mean = shifted.moving_mean.numpy()
    mean[3] += 3.0 * np.sqrt(shifted.moving_variance.numpy()[3])
    shifted.moving_mean.assign(mean)
    variance = scaled.moving_variance.numpy()
    variance[0] *= 10.0
    scaled.moving_variance.assign(variance)
    damaged = tfbn.inspect(model, x, verbose=0)
    return {
        "model": "MobileNetV2 (alpha 0.35, 32x32x3, weights=None), 256 uniform examples",
        "batch_norm_layers": len(norms),
        "flagged_when_healthy": healthy.flagged,
        "damaged": {shifted.name: "moving mean of channel 3 + 3 std", scaled.name: "variance x 10"},
        "flagged_when_damaged": damaged.flagged,
    }


def _markdown(result: dict) -> str:
    lines = [
        "Domain shift, inspect and recalibrate (generated by `domain_shift_study.py`):",
        "",
        "LeNet with BatchNorm, trained with `tfbn.train(seed=0)` (the chapter's recipe). Source "
        f"test accuracy: {result['source_accuracy']:.4f}. Recalibration used "
        f"{UNLABELED_EXAMPLES:,} "
        "unlabeled training images with the same shift; accuracies are on the 10,000 test images.",
        "",
        "| shift | what | inspect exit | layers flagged | largest mean shift (std) | "
        "accuracy shifted, as is | shifted, recalibrated |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["shifts"]:
        lines.append(
            f"| {row['shift']} | {row['description']} | {row['inspect_exit_code']} | "
            f"{', '.join(row['flagged_layers']) or 'none'} (of {row['layers']}) | "
            f"{row['largest_mean_shift']:.1f} | "
            f"{row['shifted_accuracy']:.4f} | {row['shifted_recalibrated_accuracy']:.4f} |"
        )
    case = result["damaged_layers"]
    lines += [
        "",
        f"{case['model']}: {case['batch_norm_layers']} batch-norm layers; flagged when healthy: "
        f"{case['flagged_when_healthy'] or 'none'}; damaged: "
        + ", ".join(f"{name} ({what})" for name, what in case["damaged"].items())
        + f"; flagged after the damage: {', '.join(case['flagged_when_damaged'])}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/domain_shift", help="LeNet's run folder")
    parser.add_argument("--output-dir", default="docs/results", help="where the results go")
    args = parser.parse_args()
    output_dir = pathlib.Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model_path = _trained_model(pathlib.Path(args.run_dir))
    train_x, _ = _images("train")
    test_x, test_y = _images("test")
    with tempfile.TemporaryDirectory() as work:
        rows = [
            _shift_row(
                name, shift, model_path, train_x, test_x, test_y, pathlib.Path(work), output_dir
            )
            for name, (_, shift) in SHIFTS.items()
        ]
    result = {
        "source_accuracy": _accuracy(model_path, test_x, test_y),
        "shifts": rows,
        "damaged_layers": _damaged_layers_case(),
    }
    (output_dir / "domain_shift.json").write_text(json.dumps(result, indent=2) + "\n")
    (output_dir / "domain_shift.md").write_text(_markdown(result))
    print(_markdown(result))


if __name__ == "__main__":
    main()

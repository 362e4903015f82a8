"""The figures tfbn writes: training curves of a run, the learning-rate search and the batch-norm
statistics `tfbn.inspect` measured.

Each function draws on a `matplotlib.figure.Figure` of its own (never pyplot, so no global backend
is switched and a notebook keeps showing its plots), writes it as a PNG atomically
(`tfbn.utils.files.atomic_write`) and returns the path. matplotlib comes with `tfbn[workflow]`; it
is imported when a figure is drawn, not when this module is.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from tfbn.utils.files import atomic_write

__all__ = ["inspect_report", "learning_rate_search", "training_curves"]

_DPI = 120
# Curves of a training history: (key, label, style); a key missing from every record is skipped.
_LOSS_CURVES = (
    ("loss", "training loss", dict(marker="o", linestyle="-")),
    ("val_loss", "validation loss", dict(marker="s", linestyle="--")),
    ("test_loss", "test loss", dict(marker="^", linestyle="-.")),
)
_ACCURACY_CURVES = (
    ("train_acc", "training accuracy", dict(marker="o", linestyle="-")),
    ("val_acc", "validation accuracy", dict(marker="s", linestyle="--")),
    ("test_acc", "test accuracy", dict(marker="^", linestyle="-.")),
)


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ModuleNotFoundError as error:
        raise ImportError(
            "tfbn's plots need matplotlib, which comes with the workflow extra: "
            "pip install 'tfbn[workflow]'"
        ) from error
    return Figure


def _save(fig, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda file: fig.savefig(file, format="png", dpi=_DPI))


def _plot_curves(ax, epochs: Sequence[int], history, curves) -> None:
    for key, label, style in curves:
        values = [record.get(key) for record in history]
        if all(v is None for v in values):
            continue
        ys = [math.nan if v is None else float(v) for v in values]
        ax.plot(epochs, ys, label=label, markersize=5, **style)


def _epoch_axis(ax, epochs: Sequence[int]) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    # Whole epochs only; a single epoch still gets a visible range around its point.
    if len(epochs) <= 15:
        ax.set_xticks(epochs)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    ax.grid(True, alpha=0.3)


def training_curves(
    history: Sequence[Mapping[str, float]],
    path: str | os.PathLike,
    *,
    title: str,
    recalibrated_test_acc: float | None = None,
) -> Path:
    """Draws a run's loss and accuracy per epoch, in two labelled panels, and writes a PNG.

    Args:
        history: One record per finished epoch, in order, each with `"epoch"` (1-based) and any of
            `"loss"`, `"val_loss"`, `"test_loss"` (left panel) and `"train_acc"`, `"val_acc"`,
            `"test_acc"` (right panel). Every point has a marker, so one epoch shows.
        path: The PNG file to write (atomically; its folder is created if missing).
        title: The figure's title, e.g. the run's settings (model, norm, learning rate, batch).
        recalibrated_test_acc: The test accuracy after recalibrating the population statistics
            (`tfbn.recalibrate`), marked after the last epoch in the accuracy panel.

    Returns:
        `path`, as a `Path`.

    Raises:
        ValueError: if `history` is empty or a record has no `"epoch"`.
        ImportError: if matplotlib is not installed.
    """
    history = list(history)
    if not history or any("epoch" not in record for record in history):
        raise ValueError(
            "Argument `history` must be a non-empty sequence of per-epoch records, each with an "
            f"'epoch' key; received {history!r:.200}."
        )
    epochs = [int(record["epoch"]) for record in history]
    fig = _figure_class()(figsize=(9, 3.6))
    loss_ax, acc_ax = fig.subplots(1, 2)
    _plot_curves(loss_ax, epochs, history, _LOSS_CURVES)
    loss_ax.set_ylabel("loss (cross-entropy)")
    loss_ax.set_title("loss")
    _plot_curves(acc_ax, epochs, history, _ACCURACY_CURVES)
    if recalibrated_test_acc is not None:
        acc_ax.plot(
            [epochs[-1]],
            [float(recalibrated_test_acc)],
            marker="*",
            markersize=13,
            linestyle="none",
            color="black",
            label=f"test accuracy, population statistics ({recalibrated_test_acc:.3f})",
        )
    acc_ax.set_ylabel("accuracy")
    acc_ax.set_title("accuracy")
    for ax in (loss_ax, acc_ax):
        _epoch_axis(ax, epochs)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _trial_points(trials: Iterable) -> tuple[list[tuple[float, float]], list[float]]:
    """Sorted (learning rate, accuracy) of the finished trials, and the rates that diverged."""
    finished, diverged = [], []
    for learning_rate, accuracy in trials:
        if accuracy is None or not math.isfinite(accuracy):
            diverged.append(float(learning_rate))
        else:
            finished.append((float(learning_rate), float(accuracy)))
    return sorted(finished), sorted(diverged)


def learning_rate_search(
    trials: Mapping[str, Iterable[tuple[float, float | None]]],
    path: str | os.PathLike,
    *,
    title: str,
    lr_range: tuple[float, float] | None = None,
    converged_accuracy: float | None = None,
) -> Path:
    """Draws validation accuracy against learning rate (log axis), one curve per variant.

    Args:
        trials: Variant name -> its trials as `(learning_rate, val_accuracy)`; an accuracy of
            `None` or NaN is a diverged trial (NaN loss), drawn as a cross at accuracy 0.
        path: The PNG file to write (atomically; its folder is created if missing).
        title: The figure's title, e.g. the search's settings (epochs per trial, data, batch).
        lr_range: The searched interval `(min, max)`, used as the x range.
        converged_accuracy: The accuracy a trial must reach to count as converged, drawn as a
            dashed horizontal line.

    Returns:
        `path`, as a `Path`.

    Raises:
        ValueError: if `trials` is empty.
        ImportError: if matplotlib is not installed.
    """
    if not trials:
        raise ValueError("Argument `trials` must name at least one variant; received none.")
    fig = _figure_class()(figsize=(7, 4.5))
    ax = fig.subplots()
    for name, variant_trials in trials.items():
        finished, diverged = _trial_points(variant_trials)
        (line,) = ax.plot(
            [lr for lr, _ in finished], [acc for _, acc in finished], marker="o", label=name
        )
        if diverged:
            ax.scatter(
                diverged,
                [0.0] * len(diverged),
                marker="x",
                s=60,
                color=line.get_color(),
                label=f"{name}: diverged (NaN loss)",
            )
    ax.set_xscale("log")
    if lr_range is not None:
        ax.set_xlim(lr_range[0] / 1.5, lr_range[1] * 1.5)
    if converged_accuracy is not None:
        ax.axhline(
            converged_accuracy,
            color="gray",
            linestyle="--",
            linewidth=1,
            label=f"converged: validation accuracy >= {converged_accuracy:g}",
        )
    ax.set_ylim(-0.03, 1.0)
    ax.set_xlabel("learning rate (SGD, log scale)")
    ax.set_ylabel("validation accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _save(fig, path)


def _layer_panel(ax, layers, key: str, thresholds: Sequence[float], label: str) -> None:
    """One quantity per layer, flagged layers in red with a cross, the thresholds as lines."""
    xs = range(len(layers))
    for x, layer in zip(xs, layers, strict=True):
        value = layer.get(key)
        flagged = bool(layer.get("flagged"))
        if value is None:  # not measurable (e.g. non-finite statistics): a cross on the axis
            ax.plot([x], [thresholds[0]], marker="x", markersize=9, color="red", linestyle="none")
            continue
        ax.plot(
            [x],
            [value],
            marker="X" if flagged else "o",
            markersize=9 if flagged else 6,
            color="red" if flagged else "tab:blue",
            linestyle="none",
        )
    for threshold in thresholds:
        ax.axhline(threshold, color="gray", linestyle="--", linewidth=1)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([layer["name"] for layer in layers], rotation=60, ha="right", fontsize=7)
    ax.set_xlabel("batch-norm layer (network order)")
    ax.set_ylabel(label)
    ax.grid(True, axis="y", which="both", alpha=0.3)


def inspect_report(report: Mapping, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Draws each batch-norm layer's mean shift and variance ratio in two panels; writes a PNG.

    Args:
        report: `tfbn.inspect(...).to_dict()`: `"layers"` (each with `"name"`, `"flagged"`,
            `"mean_shift"` and `"variance_ratio"`, `None` where not measurable),
            `"mean_threshold"` and `"variance_threshold"`. Flagged layers are red crosses;
            a layer without a value is a red cross on the threshold line.
        path: The PNG file to write (atomically; its folder is created if missing).
        title: The figure's title (default: the model's name and the number of examples).

    Returns:
        `path`, as a `Path`.

    Raises:
        ValueError: if `report` has no layers.
        ImportError: if matplotlib is not installed.
    """
    layers = list(report.get("layers") or [])
    if not layers:
        raise ValueError(
            "Argument `report` must hold at least one layer (tfbn.inspect(...).to_dict()); "
            f"received {report!r:.200}."
        )
    mean_threshold = float(report["mean_threshold"])
    variance_threshold = float(report["variance_threshold"])
    fig = _figure_class()(figsize=(max(7.0, 2.0 + 0.45 * len(layers)), 7.0))
    mean_ax, variance_ax = fig.subplots(2, 1, sharex=True)
    _layer_panel(
        mean_ax,
        layers,
        "mean_shift",
        [mean_threshold],
        "max |moving mean - population mean|\n(population std)",
    )
    mean_ax.set_title(f"mean shift (flagged at >= {mean_threshold:g} std)", fontsize=9)
    _layer_panel(
        variance_ax,
        layers,
        "variance_ratio",
        [variance_threshold, 1.0 / variance_threshold],
        "moving / population variance\n(channel furthest from 1, log scale)",
    )
    variance_ax.set_yscale("log")
    variance_ax.axhline(1.0, color="black", linewidth=0.8)
    variance_ax.set_title(
        f"variance ratio (flagged at >= {variance_threshold:g}x or <= 1/{variance_threshold:g})",
        fontsize=9,
    )
    mean_ax.tick_params(labelbottom=False)
    mean_ax.set_xlabel("")
    name = report.get("model", "model")
    fig.suptitle(title or f"batch-norm statistics of '{name}' on {report.get('examples')} examples")
    fig.tight_layout()
    return _save(fig, path)

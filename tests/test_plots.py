"""The figures: one quantity per labelled panel, markers on every point, the data as given.

Each test draws a figure from a made-up history or search, captures the matplotlib figure as it is
saved, and reads back what a reader would see: panels, axis labels, legend entries, the plotted
points (compared with the input), and the PNG on disk.
"""

import math

import matplotlib.image
import pytest

from tfbn.workflow import plots

HISTORY = [
    {"epoch": 1, "loss": 0.75, "train_acc": 0.73, "test_acc": 0.80},
    {"epoch": 2, "loss": 0.47, "train_acc": 0.83, "test_acc": 0.83},
    {"epoch": 3, "loss": 0.40, "train_acc": 0.85, "test_acc": 0.84},
]


@pytest.fixture
def saved(monkeypatch):
    """The figures as they are written: a list of (figure, path)."""
    figures = []
    real_save = plots._save

    def capture(fig, path):
        figures.append((fig, path))
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", capture)
    return figures


def _lines(ax):
    """Legend label -> (xs, ys, marker) of every line and marker set drawn on `ax`."""
    out = {}
    for line in ax.get_lines():
        if not line.get_label().startswith("_"):
            out[line.get_label()] = (
                list(line.get_xdata()),
                list(line.get_ydata()),
                line.get_marker(),
            )
    return out


def _legend(ax):
    return [text.get_text() for text in ax.get_legend().get_texts()]


def _png_shape(path):
    return matplotlib.image.imread(path).shape


def test_training_curves_loss_and_accuracy_in_separate_labelled_panels(tmp_path, saved):
    path = plots.training_curves(
        HISTORY, tmp_path / "sub" / "history.png", title="LeNet, norm=tfbn, lr 1, batch 256"
    )
    assert path == tmp_path / "sub" / "history.png"
    height, width, _ = _png_shape(path)
    assert width > height > 200
    ((fig, _),) = saved
    loss_ax, acc_ax = fig.get_axes()
    assert fig._suptitle.get_text() == "LeNet, norm=tfbn, lr 1, batch 256"
    assert (loss_ax.get_xlabel(), acc_ax.get_xlabel()) == ("epoch", "epoch")
    assert "loss" in loss_ax.get_ylabel() and "accuracy" in acc_ax.get_ylabel()
    epochs = [1, 2, 3]
    assert _lines(loss_ax) == {"training loss": (epochs, [0.75, 0.47, 0.40], "o")}
    accuracy = _lines(acc_ax)
    assert accuracy["training accuracy"][:2] == (epochs, [0.73, 0.83, 0.85])
    assert accuracy["test accuracy"][:2] == (epochs, [0.80, 0.83, 0.84])
    assert all(marker not in ("None", "", None) for _, _, marker in accuracy.values())
    assert _legend(loss_ax) == ["training loss"]
    assert _legend(acc_ax) == ["training accuracy", "test accuracy"]
    # The x axis shows whole epochs only.
    assert [t for t in loss_ax.get_xticks()] == epochs


def test_one_epoch_shows_points_and_the_recalibrated_accuracy(tmp_path, saved):
    plots.training_curves(
        HISTORY[:1], tmp_path / "one.png", title="one epoch", recalibrated_test_acc=0.862
    )
    ((fig, _),) = saved
    loss_ax, acc_ax = fig.get_axes()
    # A single point is drawn with a marker, inside the visible x range.
    xs, ys, marker = _lines(loss_ax)["training loss"]
    assert (xs, ys) == ([1], [0.75]) and marker == "o"
    low, high = loss_ax.get_xlim()
    assert low < 1 < high
    star = [v for label, v in _lines(acc_ax).items() if "population statistics" in label]
    assert star == [([1], [0.862], "*")]
    assert any("0.862" in text for text in _legend(acc_ax))


def test_validation_curves_appear_when_recorded(tmp_path, saved):
    history = [dict(h, val_loss=h["loss"] + 0.1, val_acc=h["test_acc"] - 0.01) for h in HISTORY]
    plots.training_curves(history, tmp_path / "h.png", title="t")
    ((fig, _),) = saved
    loss_ax, acc_ax = fig.get_axes()
    assert _lines(loss_ax)["validation loss"][1] == [h["loss"] + 0.1 for h in HISTORY]
    assert _lines(acc_ax)["validation accuracy"][1] == [h["test_acc"] - 0.01 for h in HISTORY]


def test_learning_rate_search_log_axis_labelled_and_diverged_marked(tmp_path, saved):
    trials = {
        "tfbn": [(3.0, 0.85), (0.1, 0.80), (30.0, None)],
        "none": [(0.5, 0.62), (0.05, float("nan"))],
    }
    path = plots.learning_rate_search(
        trials, tmp_path / "lr.png", title="search", lr_range=(0.01, 30.0), converged_accuracy=0.8
    )
    assert _png_shape(path)[0] > 200
    ((fig, _),) = saved
    (ax,) = fig.get_axes()
    assert ax.get_xscale() == "log"
    assert "learning rate" in ax.get_xlabel() and ax.get_ylabel() == "validation accuracy"
    assert ax.get_title() == "search"
    lines = _lines(ax)
    # Finished trials in order of learning rate, with markers.
    assert lines["tfbn"] == ([0.1, 3.0], [0.80, 0.85], "o")
    assert lines["none"] == ([0.5], [0.62], "o")
    legend = _legend(ax)
    assert "tfbn: diverged (NaN loss)" in legend and "none: diverged (NaN loss)" in legend
    crosses = {c.get_label(): c.get_offsets().tolist() for c in ax.collections}
    assert crosses["tfbn: diverged (NaN loss)"] == [[30.0, 0.0]]
    assert crosses["none: diverged (NaN loss)"] == [[0.05, 0.0]]
    assert any("0.8" in text for text in legend)
    low, high = ax.get_xlim()
    assert low < 0.01 and high > 30.0 and not math.isnan(low)


def test_bad_input_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="history"):
        plots.training_curves([], tmp_path / "x.png", title="t")
    with pytest.raises(ValueError, match="history"):
        plots.training_curves([{"loss": 1.0}], tmp_path / "x.png", title="t")
    with pytest.raises(ValueError, match="trials"):
        plots.learning_rate_search({}, tmp_path / "x.png", title="t")
    assert list(tmp_path.iterdir()) == []

"""The chapter notebook: kept as a jupytext script, paired with the committed .ipynb, running end to
end with clean outputs.

notebooks/batch_norm.py (jupytext's percent format) is the source; notebooks/batch_norm.ipynb is
its rendering, committed without outputs for `jupyter lab`. The execution test runs the notebook in
quick mode (TFBN_NOTEBOOK_QUICK=1) in a fresh Jupyter kernel, reads the results dictionary that its
last cell prints and checks the figures it computed against the references the notebook itself
compares with (float64 NumPy, Keras's layer, a float64 network, an exported SavedModel), and checks
that no cell shows TensorFlow's C++ log lines or progress-bar warnings.
"""

import json
import pathlib
import re

import jupytext
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "notebooks" / "batch_norm.py"
NOTEBOOK = ROOT / "notebooks" / "batch_norm.ipynb"
PAIRING = "ipynb,py:percent"
CELL_TIMEOUT_S = 300
# What must not reach a cell's output: TensorFlow's C++ log lines (absl's prefix `I0000 00:00:...`,
# the lines before absl is initialized, the CUDA probe) and tqdm's warning without ipywidgets.
NOISE = re.compile(
    r"^[IWEF]\d{4} \d\d:\d\d:\d\d|absl::InitializeLog|cuInit|cuda drivers|oneDNN custom operations"
    r"|TqdmWarning|IProgress not found",
    re.MULTILINE,
)


def _code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_committed_notebook_has_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    cells = _code_cells(notebook)
    assert len(cells) > 10
    for cell in cells:
        assert cell.outputs == [], f"cell {cell.id} has outputs"
        assert cell.execution_count is None, f"cell {cell.id} has an execution count"
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    assert set(notebook.metadata) <= {"kernelspec", "language_info", "jupytext"}


def test_notebook_is_the_jupytext_rendering_of_the_script():
    script = jupytext.read(SCRIPT)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert [(c.cell_type, c.source) for c in notebook.cells] == [
        (c.cell_type, c.source) for c in script.cells
    ], "notebooks/batch_norm.ipynb differs from batch_norm.py: run jupytext --sync on it"
    # Paired both ways: JupyterLab (with jupytext) saves both files, `jupytext --sync` too.
    assert notebook.metadata["jupytext"]["formats"] == PAIRING
    assert script.metadata["jupytext"]["formats"] == PAIRING


def _printed_results(notebook) -> dict:
    last = _code_cells(notebook)[-1]
    text = "".join(out.get("text", "") for out in last.outputs if out.output_type == "stream")
    return json.loads(text)


def _noise(notebook) -> list[str]:
    """The lines of every cell's output that are log or warning noise."""
    found = []
    for index, cell in enumerate(_code_cells(notebook)):
        for out in cell.outputs:
            text = out.get("text", "") + str(out.get("data", {}).get("text/plain", ""))
            found += [f"cell {index}: {m.group(0)}" for m in NOISE.finditer(text)]
    return found


@pytest.mark.slow
def test_notebook_runs_in_quick_mode(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("TFBN_NOTEBOOK_QUICK", "1")
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)  # the notebook quiets TensorFlow
    # The quick run's folders (tempfile.mkdtemp) and a freshly prepared dataset stay in tmp_path.
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    assert _noise(notebook) == []

    results = _printed_results(notebook)
    assert results["quick"] is True and results["epochs"] == 1

    # Section 1-2: the op against float64 NumPy, batch size 1, the moving-average update rule.
    assert results["op_max_error"] < 1e-5
    assert results["batch1_max_abs_output"] == 0.0
    assert results["batch1_max_abs_grad"] == 0.0
    assert results["moving_stats_max_error"] < 1e-6
    assert results["keras_layer_max_diff"] < 1e-5

    # Sections 3-6: trained runs; tfbn's and Keras's layers train alike from the same start.
    accuracies = [
        results["tfbn_test_acc"],
        results["tfbn_train_acc"],
        results["keras_test_acc"],
        results["plain_test_acc"],
        results["test_acc_before_recalibration"],
        results["test_acc_after_recalibration"],
        results["acc_with_bias"],
        results["acc_without_bias"],
        *results["placement_test_acc"].values(),
        *results["fixed_gamma_beta_test_acc"].values(),
    ]
    assert all(0.0 <= acc <= 1.0 for acc in accuracies), accuracies
    assert abs(results["tfbn_test_acc"] - results["keras_test_acc"]) < 0.02
    assert len(results["conv1_bn_gamma"]) == len(results["conv1_bn_beta"]) == 6
    assert results["population_stats_max_error"] < 1e-4
    assert results["export_max_diff"] < 1e-4

    # Section 7: the bias before BN changes nothing and never moves; the other exercises ran.
    assert results["bias_layer_max_diff"] < 1e-4
    assert results["bias_model_max_diff_float64"] < 1e-9
    assert results["bias_drift_after_training"] < 1e-4
    assert set(results["tune_best_lr"]) == {"tfbn", "none"}
    for lr in results["tune_best_lr"].values():
        assert lr is None or 0.01 <= lr <= 30.0
    assert set(results["placement_test_acc"]) == {
        "every layer",
        "convolutions only",
        "dense layers only",
        "nowhere",
    }
    assert len(results["fixed_gamma_beta_test_acc"]) == 5

    # The figures: training curves, gamma/beta, accuracy curves, statistics, tuning, placement.
    images = [
        out
        for cell in _code_cells(notebook)
        for out in cell.outputs
        if "image/png" in out.get("data", {})
    ]
    assert len(images) >= 6

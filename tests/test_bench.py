"""The benchmark suite's output: structure and internal consistency, not timings.

The suite runs once in `--quick` mode (tiny shapes, three repeats) through the command line; every
test then checks what it wrote: each case present, every ratio and pass count recomputed from the
raw samples of the same JSON, the Markdown table agreeing with the JSON, files replaced atomically.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import re
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
from os_faults import python_code, run_on_tmpfs

from tfbn import cli
from tfbn.workflow import bench

# The quick shapes and their channel axes, stated independently.
LAYER_SHAPES = {"4d": (8, 4, 4, 8), "4d-nchw": (8, 8, 4, 4), "2d": (16, 32)}
LAYER_AXES = {"4d": -1, "4d-nchw": 1, "2d": -1}
QUICK_REPEATS = 3
# The real-model cases' architectures (not in the default cases, so not in `quick_run`).
MODELS = ("ResNet50", "MobileNetV2", "EfficientNetB0")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """Runs `tfbn bench --quick` once: its JSON, Markdown, stdout and `os.replace` calls."""
    out = tmp_path_factory.mktemp("bench")
    replaced = []
    real_replace = os.replace

    def recording_replace(src, dst):
        replaced.append((Path(src), Path(dst), Path(src).read_text(encoding="utf-8")))
        real_replace(src, dst)

    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setattr(bench.os, "replace", recording_replace)
        code = cli.main(
            [
                "bench",
                "--quick",
                "--output-dir",
                str(out),
                "--verbose",
                "0",
                "--note",
                "a quick run",
            ]
        )
    assert code == 0
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    markdown = (out / "results.md").read_text(encoding="utf-8")
    return {
        "dir": out,
        "results": results,
        "markdown": markdown,
        "stdout": stdout.getvalue(),
        "replaced": replaced,
    }


def _close(a, b):
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15)


def _table(markdown: str, header_start: str) -> list[list[str]]:
    """The body rows (cells stripped) of the Markdown table whose header starts as given."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


# ----------------------------------------------------------------------------- structure
def test_every_case_and_target_present(quick_run):
    results = quick_run["results"]
    assert list(results["cases"]) == ["layer", "lenet", "pipeline", "export"]
    expected_ids = {
        f"layer/{shape}/{mode}/{xla}"
        for shape in LAYER_SHAPES
        for mode in ("train", "inference")
        for xla in ("no-xla", "xla")
    }
    rows = results["cases"]["layer"]["rows"]
    assert {row["id"] for row in rows} == expected_ids
    expected_variants = ["keras", "tfbn", "tfbn_fused", "tfbn_unfused"]
    for row in rows:
        assert list(row["variants"]) == expected_variants
        assert row["variants"]["keras"]["available"] and row["variants"]["tfbn"]["available"]
        for v in row["variants"].values():
            # Every timed implementation computed the same output (dx or y) as Keras's layer.
            if v["available"]:
                assert v["max_abs_diff_vs_keras"] < 1e-3
        assert tuple(row["shape"]) == LAYER_SHAPES[row["id"].split("/")[1]]
        assert row["axis"] == LAYER_AXES[row["id"].split("/")[1]]
    assert set(results["cases"]["lenet"]["variants"]) == {"tfbn", "keras", "none"}
    # The fused kernel takes rank-4 and rank-5 inputs only: on 2D it is reported, not timed.
    for row in rows:
        fused = row["variants"]["tfbn_fused"]
        assert fused["available"] is (len(row["shape"]) == 4), row["id"]
        if not fused["available"]:
            assert "fused" in fused["reason"]
    assert [t["key"] for t in results["targets"]] == [key for key, *_ in bench.TARGETS]


def test_machine_described(quick_run):
    import keras
    import tensorflow as tf

    machine = quick_run["results"]["machine"]
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    assert machine["cpu"] == models[0]
    assert machine["cores"] == os.cpu_count()
    assert machine["tensorflow"] == tf.__version__
    assert machine["keras"] == keras.__version__
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", machine["date"])


# ----------------------------------------------------------------------------- consistency
def test_layer_medians_and_ratios_recomputed_from_samples(quick_run):
    for row in quick_run["results"]["cases"]["layer"]["rows"]:
        keras_median = statistics.median(row["variants"]["keras"]["samples_s"])
        for name, v in row["variants"].items():
            if not v["available"]:
                assert v["reason"]
                continue
            assert len(v["samples_s"]) == QUICK_REPEATS
            assert all(s > 0 for s in v["samples_s"])
            assert _close(v["median_s"], float(np.median(v["samples_s"])))
            assert _close(v["ratio"], v["median_s"] / keras_median), (row["id"], name)
        assert row["variants"]["keras"]["ratio"] == 1.0


def test_passes_are_time_over_single_pass_time(quick_run):
    rows = quick_run["results"]["cases"]["layer"]["rows"]
    # A pass is priced at the fastest copy of the same tensor measured anywhere in the run.
    fastest_copy = {}
    for row in rows:
        copy_median = float(np.median(row["copy"]["samples_s"]))
        fastest_copy[tuple(row["shape"])] = min(
            fastest_copy.get(tuple(row["shape"]), 1e9), copy_median
        )
    for row in rows:
        nbytes = int(np.prod(row["shape"])) * 4
        case_copy = float(np.median(row["copy"]["samples_s"]))
        assert row["bytes_per_pass"] == nbytes
        # The copy reads the tensor once and writes it once: two passes.
        pass_time = fastest_copy[tuple(row["shape"])] / 2
        assert _close(row["pass_time_s"], pass_time)
        assert _close(row["bandwidth_gb_s"], 2 * nbytes / fastest_copy[tuple(row["shape"])] / 1e9)
        assert _close(row["case_bandwidth_gb_s"], 2 * nbytes / case_copy / 1e9)
        assert row["min_passes"] == {"train": 5, "inference": 2}[row["mode"]]
        assert _close(row["bound_s"], row["min_passes"] * pass_time)
        for v in row["variants"].values():
            if v["available"]:
                assert _close(v["passes"], v["median_s"] / pass_time)
                assert _close(v["passes_vs_case_copy"], v["median_s"] / (case_copy / 2))
                assert v["passes"] >= v["passes_vs_case_copy"] * (1 - 1e-12)
        # XLA rows also price a pass at the XLA-compiled copy timed beside them.
        if row["xla"]:
            xla_copy = float(np.median(row["xla_copy"]["samples_s"]))
            assert _close(row["xla_copy_bandwidth_gb_s"], 2 * nbytes / xla_copy / 1e9)
            for v in row["variants"].values():
                if v["available"]:
                    assert _close(v["passes_vs_xla_copy"], v["median_s"] / (xla_copy / 2))
        else:
            assert row["xla_copy"] is None and "passes_vs_xla_copy" not in str(row["variants"])


def test_lenet_epoch_times_and_ratios(quick_run):
    lenet = quick_run["results"]["cases"]["lenet"]
    steps = math.ceil(60000 / lenet["batch_size"])
    assert lenet["steps_per_epoch"] == steps
    epochs = {}
    for norm, v in lenet["variants"].items():
        assert len(v["samples_s"]) == QUICK_REPEATS
        assert _close(v["median_s"], float(np.median(v["samples_s"])))
        assert _close(v["epoch_s"], v["median_s"] * steps)
        assert _close(v["examples_per_s"], lenet["batch_size"] / v["median_s"])
        epochs[norm] = v["epoch_s"]
    assert _close(lenet["ratio"], epochs["tfbn"] / epochs["keras"])
    assert _close(
        lenet["overhead_ratio"],
        (epochs["tfbn"] - epochs["none"]) / (epochs["keras"] - epochs["none"]),
    )


def test_pipeline_and_export_ratios(quick_run):
    cases = quick_run["results"]["cases"]
    pipeline = cases["pipeline"]
    assert pipeline["examples_per_s"] > 0
    assert _close(
        pipeline["ratio"], pipeline["examples_per_s"] / pipeline["training_examples_per_s"]
    )
    # The pipeline is compared with the training rate the LeNet case measured in the same run.
    assert (
        pipeline["training_examples_per_s"] == cases["lenet"]["variants"]["tfbn"]["examples_per_s"]
    )
    export = cases["export"]
    assert set(export["batches"]) == {"1", "256"}
    for v in export["batches"].values():
        folded = float(np.median(v["folded"]["samples_examples_per_s"]))
        unfolded = float(np.median(v["unfolded"]["samples_examples_per_s"]))
        assert len(v["folded"]["samples_examples_per_s"]) == 2  # the quick export repeats
        assert _close(v["ratio"], folded / unfolded)


def test_targets_pass_fail_follow_values(quick_run):
    results = quick_run["results"]
    cases = results["cases"]
    by_id = {row["id"]: row for row in cases["layer"]["rows"]}
    sources = {
        "layer_4d_train_ratio": by_id["layer/4d/train/no-xla"]["variants"]["tfbn"]["ratio"],
        "layer_4d_train_xla_ratio": by_id["layer/4d/train/xla"]["variants"]["tfbn"]["ratio"],
        "layer_4d_train_passes": by_id["layer/4d/train/no-xla"]["variants"]["tfbn"]["passes"],
        "layer_4d_train_xla_passes": by_id["layer/4d/train/xla"]["variants"]["tfbn"]["passes"],
        "lenet_epoch_ratio": cases["lenet"]["ratio"],
        "lenet_overhead_ratio": cases["lenet"]["overhead_ratio"],
        "pipeline_ratio": cases["pipeline"].get("ratio"),
        "export_folded_ratio": cases["export"].get("batches", {}).get("256", {}).get("ratio"),
        **{f"{name.lower()}_{kind}_ratio": None for name in MODELS for kind in ("train", "export")},
        **{f"{name.lower()}_export_of_bound": None for name in MODELS},
        **{
            f"{name.lower()}_recalibrate_{mode}_passes": None
            for name in MODELS
            for mode in ("exact", "fast")
        },
        **{f"{name.lower()}_inspect_passes": None for name in MODELS},
        # The jax case runs on request only.
        "jax_layer_4d_train_ratio": None,
        "jax_layer_2d_train_ratio": None,
        "jax_model_train_ratio": None,
    }
    thresholds = {
        "layer_4d_train_ratio": ("<=", 0.5),
        "layer_4d_train_xla_ratio": ("<=", 1.0),
        "layer_4d_train_passes": ("<=", 12),
        "layer_4d_train_xla_passes": ("<=", 12),
        "lenet_epoch_ratio": ("<=", 0.9),
        "lenet_overhead_ratio": ("<=", 0.5),
        "pipeline_ratio": (">=", 5),
        "export_folded_ratio": (">=", 1.2),
        **{f"{name.lower()}_train_ratio": ("<=", 0.9) for name in MODELS},
        **{f"{name.lower()}_export_ratio": (">=", 1.2) for name in MODELS},
        **{f"{name.lower()}_export_of_bound": (">=", 0.95) for name in MODELS},
        **{f"{name.lower()}_recalibrate_exact_passes": ("<=", 3.0) for name in MODELS},
        **{f"{name.lower()}_recalibrate_fast_passes": ("<=", 1.5) for name in MODELS},
        **{f"{name.lower()}_inspect_passes": ("<=", 1.5) for name in MODELS},
        "jax_layer_4d_train_ratio": ("<=", 1.0),
        "jax_layer_2d_train_ratio": ("<=", 1.0),
        "jax_model_train_ratio": ("<=", 1.0),
    }
    for target in results["targets"]:
        value = sources[target["key"]]
        assert target["value"] == value
        op, threshold = thresholds[target["key"]]
        assert (target["comparison"], target["threshold"]) == (op, threshold)
        if value is None:
            assert target["pass"] is None
        else:
            assert target["pass"] == (value <= threshold if op == "<=" else value >= threshold)


# ----------------------------------------------------------------------------- outputs
def test_markdown_matches_json(quick_run):
    results, markdown = quick_run["results"], quick_run["markdown"]
    assert markdown in quick_run["stdout"]  # the printed table is the file's
    assert results["settings"]["note"] == "a quick run"
    assert "\nNote: a quick run\n" in markdown

    layer_rows = _table(markdown, "| case | impl |")
    expected = []
    for row in results["cases"]["layer"]["rows"]:
        for name, v in row["variants"].items():
            if not v["available"]:
                expected.append([row["id"], name, f"not available: {v['reason']}"])
                continue
            expected.append(
                [
                    row["id"],
                    name,
                    f"{v['median_s'] * 1e3:.3f}",
                    f"{v['ratio']:.2f}",
                    f"{v['passes']:.1f}",
                    f"{v['passes_vs_case_copy']:.1f}",
                    str(row["min_passes"]),
                    f"{row['bound_s'] * 1e3:.3f}",
                    f"{row['bandwidth_gb_s']:.1f}",
                    f"{row['case_bandwidth_gb_s']:.1f}",
                    f"{v['max_abs_diff_vs_keras']:.1e}",
                ]
            )
    assert [r[: len(e)] for r, e in zip(layer_rows, expected, strict=False)] == expected
    assert len(layer_rows) == len(expected)

    lenet = results["cases"]["lenet"]
    assert _table(markdown, "| model | step ms |") == [
        [norm, f"{v['median_s'] * 1e3:.3f}", f"{v['epoch_s']:.2f}", f"{v['examples_per_s']:.0f}"]
        for norm, v in lenet["variants"].items()
    ]
    assert f"tfbn / keras epoch time: {lenet['ratio']:.2f}" in markdown

    target_rows = _table(markdown, "| target | value |")
    assert [r[0] for r in target_rows] == [t["description"] for t in results["targets"]]
    for cells, t in zip(target_rows, results["targets"], strict=True):
        assert cells[1] == ("n/a" if t["value"] is None else f"{t['value']:.2f}")
        assert cells[3] == {True: "pass", False: "FAIL", None: "not measured"}[t["pass"]]

    pipeline = results["cases"]["pipeline"]
    assert _table(markdown, "| pipeline examples/s |") == [
        [
            f"{pipeline['examples_per_s']:.0f}",
            f"{pipeline['training_examples_per_s']:.0f}",
            f"{pipeline['ratio']:.2f}",
        ]
    ]
    export = results["cases"]["export"]
    assert _table(markdown, "| batch | folded examples/s |") == [
        [
            batch,
            f"{v['folded']['median_examples_per_s']:.0f}",
            f"{v['unfolded']['median_examples_per_s']:.0f}",
            f"{v['ratio']:.2f}",
        ]
        for batch, v in export["batches"].items()
    ]


def test_files_written_atomically(quick_run):
    out = quick_run["dir"]
    replaced = quick_run["replaced"]
    assert {dst for _, dst, _ in replaced} == {out / "results.json", out / "results.md"}
    for src, dst, content in replaced:
        assert src.parent == dst.parent and src != dst  # a temporary file beside the target
        assert not src.exists()
        assert dst.read_text(encoding="utf-8") == content
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md"]


def test_failed_write_keeps_previous_results(tmp_path, monkeypatch):
    previous = tmp_path / "results.json"
    previous.write_text('{"old": true}\n', encoding="utf-8")

    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(bench.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        bench.run_benchmarks(cases="lenet", quick=True, repeats=1, output_dir=tmp_path, verbose=0)
    assert previous.read_text(encoding="utf-8") == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_interleaves_and_rotates_order():
    calls = []
    functions = {name: (lambda name=name: calls.append(name)) for name in "ABC"}
    timings = bench._interleaved(functions, repeats=4, min_sample_s=0.0)
    timed = calls[3 * bench._WARMUP_CALLS :]
    assert timed == list("ABC") + list("BCA") + list("CAB") + list("ABC")
    for t in timings.values():
        assert len(t["samples_s"]) == 4
        assert t["median_s"] == statistics.median(t["samples_s"])


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"cases": ["layer", "nope"]}, "cases"),
        ({"cases": ""}, "cases"),
        ({"repeats": 0}, "repeats"),
        ({"repeats": True}, "repeats"),
        ({"repeats": 2.5}, "repeats"),
        ({"name": "../escape"}, "name"),
        ({"note": 3}, "note"),
    ],
)
def test_bad_option_raises_value_error(tmp_path, kwargs, word):
    with pytest.raises(ValueError, match=word):
        bench.run_benchmarks(output_dir=tmp_path / "out", verbose=0, **kwargs)
    assert not (tmp_path / "out").exists()  # raised before any work


@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_output_dir_that_cannot_be_a_folder_is_refused_before_any_work(
    tmp_path, where, monkeypatch
):
    path = tmp_path / "a_file"
    path.write_text("x", encoding="utf-8")
    target = path if where == "file" else path / "results"
    monkeypatch.setattr(bench, "machine_description", _must_not_run)
    with pytest.raises(NotADirectoryError) as raised:
        bench.run_benchmarks(output_dir=target, verbose=0)
    assert raised.value.filename == str(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


_READ_ONLY_RUN = """
import os
from tfbn.workflow import bench

def must_not_run(*args, **kwargs):
    raise AssertionError("started before the output folder was checked")

bench.machine_description = must_not_run
try:
    bench.run_benchmarks(cases="lenet", quick=True, output_dir=os.environ["M"] + "/out")
except OSError as error:
    print(error.errno, error.filename)
"""


def test_read_only_output_dir_is_refused_before_any_work(tmp_path):
    mount = tmp_path / "ro"
    result = run_on_tmpfs(python_code(_READ_ONLY_RUN), mount, fault="read-only")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [str(errno.EROFS), str(mount)]


def test_full_disk_at_the_end_is_one_line_and_keeps_the_old_results(tmp_path):
    mount = tmp_path / "full"
    out = mount / "out"
    command = [sys.executable, "-m", "tfbn", "bench", "--quick", "--cases", "lenet", "--repeats",
               "1", "--verbose", "0", "--output-dir", str(out)]  # fmt: skip
    prepare = 'mkdir "$M/out" && echo old > "$M/out/results.json"'
    # After the run, still inside the mount's process: what the folder holds.
    then_list = '"$@"; rc=$?; ls -A "$M/out"; cat "$M/out/results.json"; exit $rc'
    result = run_on_tmpfs(
        ["sh", "-c", then_list, "sh", *command], mount, fault="full", prepare=prepare
    )
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert line == f"tfbn bench: {out / 'results.json'}: No space left on device"
    # The old results intact, no temporary file left beside them.
    assert result.stdout.split() == ["results.json", "old"]


def test_missing_fashion_mnist_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("TFBN_DATA_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setattr(bench, "machine_description", _must_not_run)
    with pytest.raises(ValueError, match="dataset-fashion-mnist"):
        bench.run_benchmarks(cases="pipeline", output_dir=tmp_path / "out", verbose=0)
    assert not (tmp_path / "out").exists()
    # The cases that do not read the data do not need it.
    monkeypatch.undo()
    monkeypatch.setenv("TFBN_DATA_DIR", str(tmp_path / "nowhere"))
    results = bench.run_benchmarks(cases="lenet", quick=True, repeats=1, output_dir=None, verbose=0)
    assert list(results["cases"]) == ["lenet"]


def _must_not_run(*args, **kwargs):
    raise AssertionError("the benchmarks started before their arguments were checked")


def test_a_case_added_to_the_registry_runs_and_renders(monkeypatch):
    def run(settings, cases, tick):
        tick("toy")
        return {"id": "toy", "repeats": settings["repeats"], "after": list(cases)}

    toy = bench.Case("toy", run, lambda result: ["## Toy", "", f"repeats {result['repeats']}"])
    monkeypatch.setattr(bench, "BENCH_CASES", (*bench.BENCH_CASES, toy))
    results = bench.run_benchmarks(
        cases="lenet,toy", quick=True, repeats=1, output_dir=None, verbose=0
    )
    assert results["cases"]["toy"] == {"id": "toy", "repeats": 1, "after": ["lenet"]}
    assert bench.render_markdown(results).endswith("## Toy\n\nrepeats 1\n")


def test_cli_bad_option_is_one_error_line(tmp_path, capsys):
    code = cli.main(["bench", "--cases", "layer,bogus", "--output-dir", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cases" in err[0] and "bogus" in err[0]


# ----------------------------------------------------------------------------- real models
@pytest.fixture(scope="module")
def models_run(tmp_path_factory):
    """The two real-model cases, quick, on MobileNetV2 alone at 32x32 (batch 2).

    The export case times three SavedModels of it: folded, unfolded and without batch norm.
    """
    out = tmp_path_factory.mktemp("bench_models")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(bench._SIZES, "models", (bench.MODEL_SIZES, {"MobileNetV2": 32}))
        results = bench.run_benchmarks(
            cases="models,models_export", quick=True, repeats=2, output_dir=out, verbose=0
        )
    return results, (out / "results.md").read_text(encoding="utf-8")


@pytest.mark.slow
def test_real_model_cases_run_on_request_only(models_run):
    results, _ = models_run
    assert list(results["cases"]) == ["models", "models_export"]
    assert [c.name for c in bench.BENCH_CASES if not c.default] == [
        "models",
        "models_export",
        "recalibrate",
        "jax",
    ]
    assert bench._check_cases(None) == ("layer", "lenet", "pipeline", "export")
    assert bench._check_cases("all") == tuple(c.name for c in bench.BENCH_CASES)
    assert bench.MODEL_SIZES == {"ResNet50": 64, "MobileNetV2": 96, "EfficientNetB0": 96}


@pytest.mark.slow
def test_real_model_train_step_ratio_and_same_first_loss(models_run):
    import keras

    row = models_run[0]["cases"]["models"]["models"]["MobileNetV2"]
    assert (row["input_size"], row["batch_size"]) == (32, 2)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=10)
    expected_bns = sum(type(layer) is keras.layers.BatchNormalization for layer in model.layers)
    assert row["batch_norm_layers"] == expected_bns == 52
    medians = {}
    for variant in ("keras", "tfbn"):
        samples = row["variants"][variant]["samples_s"]
        assert len(samples) == 2
        medians[variant] = statistics.median(samples)
        assert _close(row["variants"][variant]["median_s"], medians[variant])
    assert _close(row["ratio"], medians["tfbn"] / medians["keras"])
    # The converted model computes the original's loss on the first step, up to float32
    # rounding, which grows through ~50 layers normalizing 2 examples per channel in the last
    # stage: against a float64 copy of the model, both models' last batch-norm outputs are off by
    # about 4e-2 and their first losses by 5e-5 (Keras) and 2.3e-3 (tfbn) relative.
    loss = row["first_loss"]
    assert math.isfinite(loss["keras"])
    assert abs(loss["tfbn"] - loss["keras"]) <= 1e-2 * abs(loss["keras"])


@pytest.mark.slow
def test_real_model_export_ratio_and_targets(models_run):
    results, markdown = models_run
    row = results["cases"]["models_export"]["models"]["MobileNetV2"]
    assert (row["batch_size"], row["folded_layers"]) == (2, 52)
    medians = {}
    for kind in ("folded", "unfolded", "no_bn"):
        samples = row[kind]["samples_examples_per_s"]
        assert len(samples) == 2 and all(s > 0 for s in samples)  # the quick export repeats
        medians[kind] = statistics.median(samples)
        assert _close(row[kind]["median_examples_per_s"], medians[kind])
    assert _close(row["ratio"], medians["folded"] / medians["unfolded"])
    assert _close(row["bound_ratio"], medians["no_bn"] / medians["unfolded"])
    assert _close(row["of_bound"], medians["folded"] / medians["no_bn"])
    targets = {t["key"]: t for t in results["targets"]}
    train_ratio = results["cases"]["models"]["models"]["MobileNetV2"]["ratio"]
    assert targets["mobilenetv2_train_ratio"]["value"] == train_ratio
    assert targets["mobilenetv2_train_ratio"]["pass"] == (train_ratio <= 0.9)
    assert targets["mobilenetv2_export_ratio"]["pass"] == (row["ratio"] >= 1.2)
    of_bound = targets["mobilenetv2_export_of_bound"]
    assert (of_bound["value"], of_bound["comparison"], of_bound["threshold"]) == (
        row["of_bound"],
        ">=",
        0.95,
    )
    assert of_bound["pass"] == (row["of_bound"] >= 0.95)
    assert of_bound["description"] == "MobileNetV2 export: folded / no-BN throughput"
    assert targets["resnet50_train_ratio"]["pass"] is None  # not measured in this run
    (train_line,) = _table(markdown, "| model | input | batch | BN layers")
    assert train_line[:4] == ["MobileNetV2", "32x32", "2", "52"]
    assert train_line[6] == f"{train_ratio:.2f}"
    export_header = (
        "| model | input | batch | folded BN | folded examples/s | unfolded examples/s "
        "| no-BN examples/s | folded / unfolded | no BN / unfolded | folded / no BN |"
    )
    (export_line,) = _table(markdown, export_header)
    assert export_line == [
        "MobileNetV2",
        "32x32",
        "2",
        "52",
        *(f"{row[kind]['median_examples_per_s']:.0f}" for kind in ("folded", "unfolded", "no_bn")),
        *(f"{row[key]:.2f}" for key in ("ratio", "bound_ratio", "of_bound")),
    ]
    assert "copy of the converted one whose batch norms pass their input through" in markdown


def _residual_model():
    """Conv2D, batch norm, ReLU, a nested Sequential block (Conv2D, batch norm), residual Add."""
    import keras

    keras.utils.set_random_seed(1)
    inputs = keras.Input((8, 8, 3), name="images")
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(name="relu1")(x)
    block = keras.Sequential(
        [
            keras.Input((8, 8, 4)),
            keras.layers.Conv2D(4, 3, padding="same", name="conv2"),
            keras.layers.BatchNormalization(name="bn2"),
        ],
        name="block",
    )
    x = keras.layers.Add(name="add")([x, block(x)])
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="logits")(x))
    # Statistics far from the identity's, so that a batch norm left in place shows.
    rng = np.random.default_rng(1)
    for bn in (model.get_layer("bn1"), block.get_layer("bn2")):
        gamma, beta, mean, variance = (w.shape for w in bn.get_weights())
        bn.set_weights(
            [
                rng.uniform(2.0, 3.0, gamma),
                rng.uniform(1.0, 2.0, beta),
                rng.uniform(0.5, 1.0, mean),
                rng.uniform(0.1, 0.2, variance),
            ]
        )
    return model


def _batch_norms(model) -> list[str]:
    """The names of the batch-norm layers in `model`, nested models included."""
    import keras

    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found += _batch_norms(layer)
        elif isinstance(layer, keras.layers.BatchNormalization):
            found.append(layer.name)
    return found


def test_no_batch_norm_copy_is_the_model_with_identity_batch_norms():
    from tfbn.tools.conversion import convert
    from tfbn.tools.folding import FoldedAway

    model = convert(_residual_model())
    x = np.random.default_rng(2).normal(size=(4, 8, 8, 3)).astype("float32")
    before = np.asarray(model(x, training=False))
    bare = bench._without_batch_norm(model)

    assert _batch_norms(model) == ["bn1", "bn2"] and _batch_norms(bare) == []
    assert [layer.name for layer in bare.layers] == [layer.name for layer in model.layers]
    block = bare.get_layer("block")
    assert [layer.name for layer in block.layers] == ["conv2", "bn2"]
    assert isinstance(bare.get_layer("bn1"), FoldedAway)
    assert isinstance(block.get_layer("bn2"), FoldedAway)

    # The converted model's own layers called in order, each batch norm skipped.
    def layer(name):
        return model.get_layer(name)

    h = layer("relu1")(layer("conv1")(x))
    inner = layer("block").get_layer("conv2")(h)
    reference = np.asarray(layer("logits")(layer("pool")(layer("add")([h, inner]))))
    got = np.asarray(bare(x, training=False))
    np.testing.assert_allclose(got, reference, rtol=1e-6, atol=1e-6)
    # The batch norms do change the output, and the model itself is left as it was.
    assert np.abs(before - reference).max() > 0.1
    np.testing.assert_array_equal(np.asarray(model(x, training=False)), before)


# ----------------------------------------------------------------------------- recalibration
@pytest.fixture(scope="module")
def recalibrate_run(tmp_path_factory):
    """The `recalibrate` case, quick, on MobileNetV2 alone at 32x32 (4 examples, batch 2)."""
    out = tmp_path_factory.mktemp("bench_recalibrate")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(bench._SIZES, "models", (bench.MODEL_SIZES, {"MobileNetV2": 32}))
        results = bench.run_benchmarks(
            cases="recalibrate", quick=True, repeats=2, output_dir=out, verbose=0
        )
    return results, (out / "results.md").read_text(encoding="utf-8")


@pytest.mark.slow
def test_recalibrate_case_passes_are_medians_over_predict(recalibrate_run):
    results, markdown = recalibrate_run
    assert list(results["cases"]) == ["recalibrate"]
    assert not next(c for c in bench.BENCH_CASES if c.name == "recalibrate").default
    row = results["cases"]["recalibrate"]["models"]["MobileNetV2"]
    assert (row["input_size"], row["examples"], row["batch_size"]) == (32, 4, 2)
    assert row["batch_norm_layers"] == 52
    variants = ("predict", "exact", "fast", "inspect")
    assert list(row["variants"]) == list(row["first_call_s"]) == list(variants)
    medians = {}
    for variant in variants:
        samples = row["variants"][variant]["samples_s"]
        assert len(samples) == 2 and all(s > 0 for s in samples)  # the quick repeats
        medians[variant] = statistics.median(samples)
        assert _close(row["variants"][variant]["median_s"], medians[variant])
        assert row["first_call_s"][variant] > 0
    for variant in ("exact", "fast", "inspect"):
        assert _close(row["passes"][variant], medians[variant] / medians["predict"])
    targets = {t["key"]: t for t in results["targets"]}
    inspect_target = targets["mobilenetv2_inspect_passes"]
    assert (inspect_target["value"], inspect_target["threshold"]) == (row["passes"]["inspect"], 1.5)
    assert inspect_target["pass"] == (row["passes"]["inspect"] <= 1.5)
    for mode, bound in (("exact", 3.0), ("fast", 1.5)):
        target = targets[f"mobilenetv2_recalibrate_{mode}_passes"]
        assert (target["value"], target["comparison"], target["threshold"]) == (
            row["passes"][mode],
            "<=",
            bound,
        )
        assert target["pass"] == (row["passes"][mode] <= bound)
        assert targets[f"resnet50_recalibrate_{mode}_passes"]["pass"] is None  # not measured
    (line,) = _table(markdown, "| model | input | examples | batch | BN layers")
    assert line[:5] == ["MobileNetV2", "32x32", "4", "2", "52"]
    assert line[6:9] == [f"{row['passes'][v]:.2f}" for v in ("exact", "fast", "inspect")]


# ----------------------------------------------------------------------------- JAX
@pytest.fixture(scope="module")
def jax_run(tmp_path_factory):
    """The `jax` case, quick: the layer's quick shapes and MobileNetV2 at 32x32 (batch 2)."""
    out = tmp_path_factory.mktemp("bench_jax")
    results = bench.run_benchmarks(cases="jax", quick=True, repeats=2, output_dir=out, verbose=0)
    return results, (out / "results.md").read_text(encoding="utf-8")


def _medians_recomputed(variants: dict, names=("keras", "tfbn")) -> dict[str, float]:
    """Each variant's median from its raw samples (two: the repeats), checked against its row."""
    medians = {}
    for name in names:
        samples = variants[name]["samples_s"]
        assert len(samples) == 2 and all(s > 0 for s in samples)
        medians[name] = statistics.median(samples)
        assert _close(variants[name]["median_s"], medians[name])
    return medians


@pytest.mark.slow
def test_jax_case_layer_ratios_from_samples_in_a_jax_process(jax_run):
    import importlib.metadata

    results, markdown = jax_run
    assert list(results["cases"]) == ["jax"]
    assert not next(c for c in bench.BENCH_CASES if c.name == "jax").default
    case = results["cases"]["jax"]
    # The numbers come from a JAX process: its JAX version is the one installed here.
    assert case["jax"] == importlib.metadata.version("jax")
    assert case["device"].startswith("cpu")
    assert list(case["layer"]) == list(LAYER_SHAPES)
    lines = _table(markdown, "| shape | axis | keras ms")
    for (name, row), line in zip(case["layer"].items(), lines, strict=True):
        assert tuple(row["shape"]) == LAYER_SHAPES[name] and row["axis"] == LAYER_AXES[name]
        medians = _medians_recomputed(row["variants"])
        assert _close(row["ratio"], medians["tfbn"] / medians["keras"])
        # Both layers computed the same dx before they were timed.
        assert row["max_abs_diff_vs_keras"] < 1e-4
        assert line[0] == f"{name} {LAYER_SHAPES[name]}" and line[4] == f"{row['ratio']:.2f}"
    targets = {t["key"]: t for t in results["targets"]}
    for shape in ("4d", "2d"):
        target = targets[f"jax_layer_{shape}_train_ratio"]
        ratio = case["layer"][shape]["ratio"]
        assert (target["value"], target["comparison"], target["threshold"]) == (ratio, "<=", 1.0)
        assert target["pass"] == (ratio <= 1.0)
    assert targets["layer_4d_train_ratio"]["pass"] is None  # TensorFlow's layer case: not run


@pytest.mark.slow
def test_jax_case_model_train_step_ratio_and_same_first_loss(jax_run):
    import keras

    results, markdown = jax_run
    row = results["cases"]["jax"]["model"]
    assert (row["name"], row["input_size"], row["batch_size"]) == ("MobileNetV2", 32, 2)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=10)
    assert row["batch_norm_layers"] == sum(
        type(layer) is keras.layers.BatchNormalization for layer in model.layers
    )
    medians = _medians_recomputed(row["variants"])
    assert _close(row["ratio"], medians["tfbn"] / medians["keras"])
    # Same weights, same batch: the first losses agree up to float32 rounding (see the models
    # case's test for how far apart two normalizations of 2 examples per channel can drift).
    loss = row["first_loss"]
    assert math.isfinite(loss["keras"])
    assert abs(loss["tfbn"] - loss["keras"]) <= 1e-2 * abs(loss["keras"])
    target = next(t for t in results["targets"] if t["key"] == "jax_model_train_ratio")
    assert (target["value"], target["pass"]) == (row["ratio"], row["ratio"] <= 1.0)
    (line,) = _table(markdown, "| model | input | batch | BN layers")
    assert line[:4] == ["MobileNetV2", "32x32", "2", str(row["batch_norm_layers"])]
    assert line[6] == f"{row['ratio']:.2f}"


def test_jax_worker_refuses_another_backend():
    import keras

    assert keras.backend.backend() == "tensorflow"
    with pytest.raises(RuntimeError, match="JAX backend; received 'tensorflow'"):
        bench._jax_worker()


def test_jax_case_without_jax_is_refused_before_any_work(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "jax" else find_spec(name, *a)
    )
    monkeypatch.setattr(bench, "machine_description", _must_not_run)
    with pytest.raises(ValueError, match=r"`jax` case needs JAX.*tfbn\[jax\]"):
        bench.run_benchmarks(cases="layer,jax", output_dir=tmp_path / "out", verbose=0)
    assert not (tmp_path / "out").exists()

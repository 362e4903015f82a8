"""Learning-rate search (tfbn.workflow.tuning): outputs checked against Keras Tuner's own records.

The reference for "best", "converged" and "diverged" is what Keras Tuner's oracle wrote to disk
(trial_*/trial.json), read here independently of tfbn's result objects; the objective is checked
by re-evaluating a trial's saved weights on the validation split.
"""

import dataclasses
import glob
import json
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from train_helpers import NoTestSplit, search_data
from tuner_process import oracle_records

import tfbn
import tfbn.workflow.data
import tfbn.workflow.tuning
from tfbn.cli import main as cli_main
from tfbn.workflow.models import lenet

LR_MIN, LR_MAX = 0.05, 5.0


def _last(trial, name):
    metric = trial["metrics"]["metrics"].get(name)
    return None if metric is None else metric["observations"][-1]["value"][0]


def _no_data_loading(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("data loaded")

    monkeypatch.setattr(tfbn.workflow.data, "load_fashion_mnist", fail)


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    """One small search over the three variants on synthetic data (6 trials of 1 epoch)."""
    directory = str(tmp_path_factory.mktemp("tune"))
    data = search_data()
    result = tfbn.tune(
        ("tfbn", "keras", "none"),
        learning_rate_min=LR_MIN,
        learning_rate_max=LR_MAX,
        trials=2,
        epochs=1,
        directory=directory,
        dataset=data,
        converged_accuracy=0.3,
        verbose=0,
    )
    return result, directory, data


def test_tables_agree_with_theoracle_records(search):
    result, directory, _ = search
    with open(os.path.join(directory, "lenet_lr_results.json")) as f:
        table = json.load(f)
    assert list(table["variants"]) == ["tfbn", "keras", "none"]
    assert table["settings"]["converged_accuracy"] == 0.3
    markdown = open(os.path.join(directory, "lenet_lr_results.md")).read()

    for variant, entry in table["variants"].items():
        records = oracle_records(os.path.join(directory, f"lenet_lr_{variant}"))
        assert len(records) == entry["num_trials"] == 2
        completed = {i: t for i, t in records.items() if t["status"] == "COMPLETED"}
        assert len(completed) == 2
        for trial in entry["trials"]:
            assert LR_MIN <= trial["learning_rate"] <= LR_MAX
            ref = records[trial["trial_id"]]
            assert ref["hyperparameters"]["values"]["variant"] == variant
            assert trial["learning_rate"] == ref["hyperparameters"]["values"]["learning_rate"]
            assert trial["val_accuracy"] == pytest.approx(_last(ref, "val_accuracy"))
            assert trial["diverged"] == (_last(ref, "diverged") > 0)

        best_id = max(completed, key=lambda i: completed[i]["score"])
        best_lr = completed[best_id]["hyperparameters"]["values"]["learning_rate"]
        assert entry["best_trial_id"] == best_id
        assert entry["best_learning_rate"] == best_lr
        assert entry["best_val_accuracy"] == pytest.approx(completed[best_id]["score"])

        converged = [
            t["hyperparameters"]["values"]["learning_rate"]
            for t in completed.values()
            if _last(t, "diverged") == 0 and _last(t, "val_accuracy") >= 0.3
        ]
        assert entry["largest_converged_lr"] == (max(converged) if converged else None)

        row = next(line for line in markdown.splitlines() if line.startswith(f"| {variant} | 2 |"))
        assert f"{best_lr:.4g}" in row
        assert result.variants[variant].best_learning_rate == best_lr

    # The random search draws the same learning rates for every variant (same seed), so the
    # variants are compared at equal learning rates.
    lrs = {v: sorted(t["learning_rate"] for t in e["trials"]) for v, e in table["variants"].items()}
    assert lrs["tfbn"] == lrs["keras"] == lrs["none"]


def test_objective_is_the_validation_accuracy_of_the_trained_model(search):
    # The dataset's `test` property raises if touched, so the search ran without the test split;
    # here the recorded objective is recomputed from the trial's saved weights on validation data.
    result, directory, data = search
    for variant in ("tfbn", "none"):
        trial = result.variants[variant].trials[0]
        model = lenet(variant)
        weights = os.path.join(
            directory, f"lenet_lr_{variant}", f"trial_{trial.trial_id}", "checkpoint.weights.h5"
        )
        model.load_weights(weights)
        model.compile(
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"]
        )
        _, val_acc = model.evaluate(data.validation, verbose=0)
        _, train_acc = model.evaluate(data.train, verbose=0)
        assert trial.val_accuracy == pytest.approx(val_acc, abs=1e-6)
        if not math.isclose(train_acc, val_acc, abs_tol=1e-6):
            assert trial.val_accuracy != pytest.approx(train_acc, abs=1e-6)


def test_plot_and_hparams_logs_are_written(search):
    result, directory, _ = search
    png = os.path.join(directory, "lenet_lr_val_accuracy.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.shape[0] > 100 and image.shape[1] > 100

    from tensorboard.plugins.hparams import plugin_data_pb2

    for variant, vr in result.variants.items():
        for trial in vr.trials:
            folder = os.path.join(result.log_dir, variant, trial.trial_id, "execution0")
            hparams = {}
            for path in glob.glob(os.path.join(folder, "events.out.tfevents.*")):
                for event in tf.compat.v1.train.summary_iterator(path):
                    for value in event.summary.value:
                        if value.metadata.plugin_data.plugin_name != "hparams":
                            continue
                        data = plugin_data_pb2.HParamsPluginData.FromString(
                            value.metadata.plugin_data.content
                        )
                        if data.HasField("session_start_info"):
                            hparams = dict(data.session_start_info.hparams)
            assert hparams, f"no HParams session in {folder}"
            assert hparams["learning_rate"].number_value == pytest.approx(trial.learning_rate)
            assert hparams["variant"].string_value == variant
            assert os.path.isdir(os.path.join(folder, "validation"))


def test_nan_trials_are_recorded_as_diverged_and_the_search_goes_on(tmp_path):
    # Learning rates near float32's limit drive the weights of plain LeNet to inf, the loss to
    # NaN. Four trials in a row diverge; Keras Tuner stops a search after three failed ones, so
    # diverged trials must be completed trials with a "diverged" record.
    data = search_data(num_train=128, num_validation=64)
    result = tfbn.tune(
        ["none"],
        learning_rate_min=1e36,
        learning_rate_max=3e37,
        trials=4,
        epochs=2,
        directory=str(tmp_path),
        dataset=data,
        verbose=0,
    )
    records = oracle_records(str(tmp_path / "lenet_lr_none"))
    assert len(records) == 4
    vr = result.variants["none"]
    assert vr.num_diverged == 4
    for trial in vr.trials:
        ref = records[trial.trial_id]
        assert ref["status"] == "COMPLETED"
        assert _last(ref, "diverged") == 1.0
        assert _last(ref, "val_accuracy") == 0.0
        assert trial.diverged and not trial.converged and trial.val_loss is None
    assert vr.smallest_diverged_lr == min(
        t["hyperparameters"]["values"]["learning_rate"] for t in records.values()
    )
    assert vr.largest_converged_lr is None
    with open(tmp_path / "lenet_lr_results.json") as f:
        assert json.load(f)["variants"]["none"]["num_diverged"] == 4


def _trial_files(project_dir):
    files = {}
    for path in sorted(glob.glob(os.path.join(project_dir, "trial_*", "trial.json"))):
        with open(path, "rb") as f:
            files[path] = (os.stat(path).st_mtime_ns, f.read())
    return files


def test_resume_continues_and_overwrite_starts_afresh(tmp_path):
    data = search_data(num_train=128, num_validation=64)
    project = str(tmp_path / "lenet_lr_none")

    def run(trials, overwrite=False):
        return tfbn.tune(
            ["none"],
            trials=trials,
            epochs=1,
            directory=str(tmp_path),
            dataset=data,
            overwrite=overwrite,
            verbose=0,
        )

    first = run(2)
    assert first.trials_run["none"] == ["0", "1"]
    before = _trial_files(project)
    assert len(before) == 2

    again = run(2)
    assert again.trials_run["none"] == []
    assert _trial_files(project) == before
    assert len(again.variants["none"].trials) == 2

    more = run(3)
    assert more.trials_run["none"] == ["2"]
    after = _trial_files(project)
    assert len(after) == 3
    assert {p: after[p] for p in before} == before
    with open(tmp_path / "lenet_lr_results.json") as f:
        assert json.load(f)["variants"]["none"]["num_trials"] == 3

    fresh = run(1, overwrite=True)
    assert fresh.trials_run["none"] == ["0"]
    assert len(_trial_files(project)) == 1
    assert len(fresh.variants["none"].trials) == 1
    assert os.listdir(tmp_path / "lenet_lr_logs" / "none") == ["0"]


@pytest.mark.parametrize("tuner,state_key", [("bayesian", "alpha"), ("hyperband", "brackets")])
def test_bayesian_and_hyperband_tuners(tmp_path, tuner, state_key):
    result = tfbn.tune(
        ["none"],
        tuner=tuner,
        learning_rate_min=LR_MIN,
        learning_rate_max=LR_MAX,
        trials=2,
        epochs=2,
        directory=str(tmp_path),
        dataset=search_data(num_train=128, num_validation=64),
        verbose=0,
    )
    project = tmp_path / "lenet_lr_none"
    with open(project / "oracle.json") as f:
        assert state_key in json.load(f)  # the oracle of the requested algorithm
    records = oracle_records(str(project))
    assert len(records) == 2 == len(result.variants["none"].trials)
    for trial in records.values():
        values = trial["hyperparameters"]["values"]
        assert LR_MIN <= values["learning_rate"] <= LR_MAX
        if tuner == "hyperband":
            # Hyperband sets each trial's epochs; the record keeps what the trial trained.
            assert values["tuner/epochs"] in (1, 2)
            assert _last(trial, "epochs") == values["tuner/epochs"]
    best = max(records.values(), key=lambda t: t["score"])
    assert result.variants["none"].best_trial_id == best["trial_id"]


def test_sampled_learning_rate_and_momentum_reach_the_optimizer(tmp_path, monkeypatch):
    built = []

    class RecordingSGD(keras.optimizers.SGD):
        def __init__(self, learning_rate=0.01, momentum=0.0, **kwargs):
            built.append((float(learning_rate), float(momentum)))
            super().__init__(learning_rate=learning_rate, momentum=momentum, **kwargs)

    monkeypatch.setattr(keras.optimizers, "SGD", RecordingSGD)
    result = tfbn.tune(
        ["none"],
        learning_rate_min=LR_MIN,
        learning_rate_max=LR_MAX,
        trials=2,
        epochs=1,
        executions_per_trial=2,
        tune_momentum=True,
        directory=str(tmp_path),
        dataset=search_data(num_train=128, num_validation=64),
        verbose=0,
    )
    records = oracle_records(str(tmp_path / "lenet_lr_none"))
    assert len(records) == 2
    for trial in records.values():
        values = trial["hyperparameters"]["values"]
        assert values["sgd_momentum"] in (0.0, 0.5, 0.9)
        # Two executions, each a fresh model and optimizer with the trial's values.
        assert built.count((values["learning_rate"], values["sgd_momentum"])) == 2
    for t in result.variants["none"].trials:
        ref = records[t.trial_id]["hyperparameters"]["values"]
        assert (t.learning_rate, t.momentum) == (ref["learning_rate"], ref["sgd_momentum"])


def test_trials_run_under_the_selected_strategy(tmp_path, monkeypatch):
    import tfbn.workflow.models

    seen = []
    real_lenet = tfbn.workflow.models.lenet

    def spy(*args, **kwargs):
        seen.append(tf.distribute.get_strategy())
        return real_lenet(*args, **kwargs)

    monkeypatch.setattr(tfbn.workflow.models, "lenet", spy)
    result = tfbn.tune(
        ["keras"],
        trials=1,
        epochs=1,
        directory=str(tmp_path),
        # Batches divisible by the replica count: the three logical CPUs of conftest.py.
        dataset=search_data(num_train=120, num_validation=60, batch_size=60),
        strategy="mirrored",
        verbose=0,
    )
    assert result.settings["strategy"] == "mirrored"
    # The first build only declares the search space; the trial's model is built in scope.
    assert len(seen) >= 2 and isinstance(seen[-1], tf.distribute.MirroredStrategy)
    assert seen[-1].num_replicas_in_sync == len(tf.config.list_logical_devices("CPU"))
    assert result.variants["keras"].trials[0].status == "COMPLETED"


BAD = [
    ({"learning_rate_min": 0.0}, "learning_rate_min"),
    ({"learning_rate_min": -1.0}, "learning_rate_min"),
    ({"learning_rate_min": 1.0, "learning_rate_max": 1.0}, "learning_rate_max"),
    ({"learning_rate_min": 2.0, "learning_rate_max": 1.0}, "learning_rate_max"),
    ({"learning_rate_max": float("inf")}, "learning_rate_max"),
    ({"trials": 0}, "trials"),
    ({"epochs": -1}, "epochs"),
    ({"executions_per_trial": 0}, "executions_per_trial"),
    ({"batch_size": 0}, "batch_size"),
    ({"variants": ["tfbn", "batchnorm"]}, "variants"),
    ({"variants": []}, "variants"),
    ({"tuner": "grid"}, "tuner"),
    ({"train_fraction": 0.0}, "train_fraction"),
    ({"train_fraction": 1.5}, "train_fraction"),
    ({"validation_fraction": 0.0}, "validation_fraction"),
    ({"validation_fraction": 1.0}, "validation_fraction"),
    ({"strategy": "tpu"}, "strategy"),
    ({"strategy": "multi_worker"}, "strategy"),
    ({"seed": -1}, "seed"),
    ({"project_name": "a/b"}, "project_name"),
]


@pytest.mark.parametrize("kwargs,name", BAD, ids=[f"{k}" for k, _ in BAD])
def test_bad_input_raises_before_any_work(tmp_path, monkeypatch, kwargs, name):
    _no_data_loading(monkeypatch)
    directory = tmp_path / "out"
    kwargs = dict(kwargs)
    variants = kwargs.pop("variants", ("tfbn", "keras", "none"))
    with pytest.raises(ValueError, match=name):
        tfbn.tune(variants, directory=str(directory), verbose=0, **kwargs)
    assert not directory.exists()


# TuneConfig fields whose command-line flag is not the field's name with dashes (None: no flag).
_OTHER_FLAGS = {"directory": "--run-dir", "converged_accuracy": None}


def test_every_tune_setting_has_the_flag_of_its_name():
    from tfbn.cli import build_parser
    from tfbn.workflow.config import TuneConfig

    (commands,) = [a for a in build_parser()._actions if a.dest == "command"]
    flags = {flag for action in commands.choices["tune"]._actions for flag in action.option_strings}
    for field in dataclasses.fields(TuneConfig):
        flag = _OTHER_FLAGS.get(field.name, "--" + field.name.replace("_", "-"))
        assert flag is None or flag in flags, field.name
    assert {"--learning-rate-min", "--learning-rate-max"} <= flags


def test_cli_reports_bad_input_in_one_line(tmp_path, monkeypatch, capsys):
    _no_data_loading(monkeypatch)
    rc = cli_main(
        [
            "tune",
            "--learning-rate-min",
            "1",
            "--learning-rate-max",
            "0.5",
            "--run-dir",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "`learning_rate_max`" in err[0]
    assert not (tmp_path / "out").exists()


def test_cli_tunes_on_a_fraction_of_fashion_mnist(tmp_path, monkeypatch):
    calls = []
    real_load = tfbn.workflow.data.load_fashion_mnist

    def load(*args, **kwargs):
        calls.append((args, kwargs))
        return NoTestSplit(real_load(*args, **kwargs))

    monkeypatch.setattr(tfbn.workflow.data, "load_fashion_mnist", load)
    out = tmp_path / "out"
    argv = ["tune", "--variants", "none", "--trials", "1", "--epochs", "1"]
    argv += ["--train-fraction", "0.02", "--validation-fraction", "0.02", "--batch-size", "128"]
    argv += [
        "--learning-rate-min",
        "0.5",
        "--learning-rate-max",
        "2",
        "--seed",
        "3",
        "--run-dir",
        str(out),
        "--verbose",
        "0",
    ]
    assert cli_main(argv) == 0
    ((args, kwargs),) = calls
    assert args == (128,)
    assert kwargs["validation_fraction"] == 0.02 and kwargs["train_fraction"] == 0.02
    assert kwargs["seed"] == 3
    with open(out / "lenet_lr_results.json") as f:
        table = json.load(f)
    assert table["settings"]["seed"] == 3
    (trial,) = table["variants"]["none"]["trials"]
    assert 0.5 <= trial["learning_rate"] <= 2.0
    assert 0.0 <= trial["val_accuracy"] <= 1.0
    assert np.isfinite(trial["loss"])


class _ChiefOracle:
    """Stands for the chief's oracle as a worker reaches it: the variants it serves, in turn."""

    def __init__(self, *served):
        self.served = list(served)
        self.asked = 0

    def get_space(self):
        import keras_tuner

        hp = keras_tuner.HyperParameters()
        hp.Fixed("variant", self.served[min(self.asked, len(self.served) - 1)])
        self.asked += 1
        return hp


def test_a_worker_waits_for_its_variants_oracle_and_skips_one_already_searched(monkeypatch):
    # All variants share one port: the previous variant's oracle may still answer for a moment,
    # and a worker that comes late may find the chief already at a later variant.
    from types import SimpleNamespace

    monkeypatch.setattr(tfbn.workflow.tuning, "_ORACLE_POLL_S", 0.0)
    order = ("tfbn", "keras", "none")
    late = SimpleNamespace(oracle=_ChiefOracle("tfbn", "tfbn", "keras"))
    assert tfbn.workflow.tuning._await_own_oracle(late, "keras", order) is True
    assert late.oracle.asked == 3  # waited through the two answers of the previous oracle
    over = SimpleNamespace(oracle=_ChiefOracle("none"))
    assert tfbn.workflow.tuning._await_own_oracle(over, "keras", order) is False
    assert over.oracle.asked == 1

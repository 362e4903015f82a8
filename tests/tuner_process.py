"""One process of a distributed learning-rate search, for tests/test_tuning_distributed.py.

Usage: python tests/tuner_process.py DIRECTORY RESULT_JSON TRIALS VARIANTS (comma-separated)

With TFBN_TEST_BARRIER=FOLDER:N, a worker waits (at most 120 s) until N workers have loaded
TensorFlow and built their data before it starts searching, so the workers begin together.

The role comes from the KERASTUNER_* environment variables. The chief gets no dataset and its data
loader is replaced by one that fails, so the run shows that the chief never loads data. Workers
train on a small synthetic dataset (`train_helpers.search_data`).
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from train_helpers import search_data  # noqa: E402


def oracle_records(project_dir: str) -> dict:
    """trial_id -> the trial.json Keras Tuner's oracle wrote in a project folder."""
    import glob

    records = {}
    for path in glob.glob(os.path.join(project_dir, "trial_*", "trial.json")):
        with open(path) as f:
            trial = json.load(f)
        records[trial["trial_id"]] = trial
    return records


def _barrier(spec: str, timeout_s: float = 120.0) -> None:
    if not spec:
        return
    folder, count = spec.rsplit(":", 1)
    os.makedirs(folder, exist_ok=True)
    open(os.path.join(folder, os.environ.get("KERASTUNER_TUNER_ID", "worker")), "w").close()
    deadline = time.monotonic() + timeout_s
    while len(os.listdir(folder)) < int(count) and time.monotonic() < deadline:
        time.sleep(0.1)


def main(argv: list[str]) -> int:
    directory, result_path, trials, variants = argv[0], argv[1], int(argv[2]), argv[3]
    import tfbn.workflow.data
    import tfbn.workflow.tuning

    chief = "chief" in os.environ.get("KERASTUNER_TUNER_ID", "")
    if chief:

        def no_data(*args, **kwargs):
            raise AssertionError("the chief loaded data")

        tfbn.workflow.data.load_fashion_mnist = no_data
    else:
        dataset = search_data()
        _barrier(os.environ.get("TFBN_TEST_BARRIER", ""))
    result = tfbn.workflow.tuning.tune(
        variants.split(","),
        learning_rate_min=0.01,
        learning_rate_max=10.0,
        trials=trials,
        epochs=1,
        directory=directory,
        dataset=None if chief else dataset,
        strategy="default",
        verbose=0,
    )
    summary = {
        "role": result.role,
        "trials_run": result.trials_run,
        "json_path": result.json_path,
        "learning_rates": {
            name: {t.trial_id: t.learning_rate for t in v.trials}
            for name, v in result.variants.items()
        },
    }
    tmp = result_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f)
    os.replace(tmp, result_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

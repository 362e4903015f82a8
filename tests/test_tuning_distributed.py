"""Distributed learning-rate search on Keras Tuner's own mechanism: a chief and two workers.

Three processes on 127.0.0.1 (tests/tuner_process.py) share one trial budget per variant through
the chief's oracles, served one variant after the other on one port; the chief's records on disk are
the reference for "every trial ran once" and "no trial reached another variant's oracle".
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from tuner_process import oracle_records

HERE = os.path.dirname(os.path.abspath(__file__))
TRIALS = 3
VARIANTS = ("none", "keras")
TIMEOUT_S = 300


def _free_port() -> int:
    """A free port on 127.0.0.1 (the chief serves every variant's oracle on it, one after the
    other)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_chief_and_two_workers_share_the_trial_budget(tmp_path):
    port = _free_port()
    procs: dict[str, subprocess.Popen] = {}
    logs = {}
    try:
        for tuner_id in ("chief", "tuner0", "tuner1"):
            env = dict(
                os.environ,
                KERASTUNER_TUNER_ID=tuner_id,
                KERASTUNER_ORACLE_IP="127.0.0.1",
                KERASTUNER_ORACLE_PORT=str(port),
                TF_CPP_MIN_LOG_LEVEL="2",
                CUDA_VISIBLE_DEVICES="",
                TFBN_TEST_BARRIER=f"{tmp_path / 'barrier'}:2",
            )
            logs[tuner_id] = open(tmp_path / f"{tuner_id}.log", "w")
            procs[tuner_id] = subprocess.Popen(
                [
                    sys.executable,
                    os.path.join(HERE, "tuner_process.py"),
                    str(tmp_path / tuner_id),
                    str(tmp_path / f"{tuner_id}.json"),
                    str(TRIALS),
                    ",".join(VARIANTS),
                ],
                env=env,
                stdout=logs[tuner_id],
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + TIMEOUT_S
        for tuner_id, proc in procs.items():
            remaining = max(1.0, deadline - time.monotonic())
            try:
                rc = proc.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{tuner_id} did not finish within {TIMEOUT_S} s")
            log = (tmp_path / f"{tuner_id}.log").read_text()[-3000:]
            assert rc == 0, f"{tuner_id} exited with {rc}:\n{log}"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        for f in logs.values():
            f.close()

    results = {t: json.loads((tmp_path / f"{t}.json").read_text()) for t in procs}
    assert results["chief"]["role"] == "chief"
    assert results["tuner0"]["role"] == results["tuner1"]["role"] == "worker"
    with open(results["chief"]["json_path"]) as f:
        table = json.load(f)
    assert results["tuner0"]["json_path"] is None  # only the chief writes tables

    ran_by = {"tuner0": [], "tuner1": []}
    for variant in VARIANTS:
        records = oracle_records(str(tmp_path / "chief" / f"lenet_lr_{variant}"))
        assert len(records) == TRIALS
        assert all(t["status"] == "COMPLETED" and t["score"] is not None for t in records.values())
        # Every trial trained the variant of its project: no worker reported to another
        # variant's oracle.
        assert all(t["hyperparameters"]["values"]["variant"] == variant for t in records.values())
        lrs = [t["hyperparameters"]["values"]["learning_rate"] for t in records.values()]
        assert len(set(lrs)) == TRIALS, "two trials got the same hyperparameters"
        assert all(0.01 <= lr <= 10.0 for lr in lrs)

        ran0 = results["tuner0"]["trials_run"][variant]
        ran1 = results["tuner1"]["trials_run"][variant]
        assert results["chief"]["trials_run"][variant] == []
        # Every trial of the chief's records ran exactly once, on one of the workers.
        assert sorted(ran0 + ran1) == sorted(records)
        assert not set(ran0) & set(ran1)
        ran_by["tuner0"] += ran0
        ran_by["tuner1"] += ran1
        # What each worker ran is what the chief recorded for that trial.
        for worker in ("tuner0", "tuner1"):
            for trial_id, lr in results[worker]["learning_rates"][variant].items():
                assert records[trial_id]["hyperparameters"]["values"]["learning_rate"] == lr
        assert table["variants"][variant]["num_trials"] == TRIALS

    # The workers start together (a file barrier in tuner_process.py), and a trial takes far
    # longer than asking the chief for one: each worker runs trials.
    assert ran_by["tuner0"] and ran_by["tuner1"], ran_by

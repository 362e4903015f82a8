"""MultiWorkerMirroredStrategy: two worker processes on 127.0.0.1 train LeNet with `tfbn.train`."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from train_helpers import synthetic_data
from workers import run_workers

import tfbn

WORKER = pathlib.Path(__file__).with_name("mw_worker.py")
TIMEOUT_S = 300


def _run_two_workers(tmp_path: pathlib.Path, *extra: str) -> list[dict[str, np.ndarray]]:
    run_dir = tmp_path / "run"
    outputs = [tmp_path / f"worker{index}.npz" for index in range(2)]
    run_workers(
        [[str(WORKER), str(out), str(run_dir), *extra] for out in outputs], tmp_path, TIMEOUT_S
    )
    results = []
    for out in outputs:
        with np.load(out) as data:
            results.append({key: data[key] for key in data.files})
    return results


def _weights(result: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [result[k] for k in sorted(result) if k.startswith("weight_")]


def _stats(result: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in result.items() if k.startswith("stat/")}


def _single_device_reference(tmp_path) -> list[np.ndarray]:
    data = synthetic_data(num_train=256, batch_size=64)
    result = tfbn.train(
        "tfbn",
        epochs=1,
        batch_size=64,
        seed=5,
        strategy="default",
        loop="custom",
        run_dir=tmp_path / "single",
        recalibrate=False,
        export=False,
        verbose=0,
        dataset=data,
    )
    return [np.asarray(w) for w in result.model.get_weights()]


@pytest.mark.slow
def test_two_workers_end_with_identical_weights_and_moving_statistics(tmp_path):
    first, second = _run_two_workers(tmp_path)
    assert str(first["loop"]) == "custom" and str(first["strategy"]) == "multi_worker"
    assert int(first["examples"]) == 256
    w1, w2 = _weights(first), _weights(second)
    assert len(w1) == len(w2) > 0
    for a, b in zip(w1, w2, strict=True):
        np.testing.assert_array_equal(a, b)
    s1, s2 = _stats(first), _stats(second)
    assert len(s1) == 8  # four BatchNorm layers, two statistics, one replica per worker
    assert s1.keys() == s2.keys()
    for key in s1:
        np.testing.assert_array_equal(s1[key], s2[key], err_msg=key)
    # The moving statistics moved, and they are the ones in the weights.
    means = [v for k, v in s1.items() if "moving_mean" in k]
    assert all(np.abs(m).max() > 1e-3 for m in means)
    # Only the chief (worker 0) wrote the run folder.
    run_dir = tmp_path / "run"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["epoch-0001"]
    assert (run_dir / "model.keras").is_file()


@pytest.mark.slow
def test_two_workers_synchronized_batchnorm_equals_one_device(tmp_path):
    # Synchronized statistics over the two workers' halves of each global batch are those of the
    # whole batch: the run must follow a one-device run on the same global batches.
    first, second = _run_two_workers(tmp_path, "--synchronized")
    # Each example counted once over the cluster: the workers shared the global batches.
    assert int(first["examples"]) == int(second["examples"]) == 256
    reference = _single_device_reference(tmp_path)
    for a, b, ref in zip(_weights(first), _weights(second), reference, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, ref, rtol=0, atol=2e-5)

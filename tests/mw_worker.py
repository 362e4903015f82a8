"""One worker of a MultiWorkerMirroredStrategy training run, for tests/test_multiworker.py.

`TF_CONFIG` (set by the test) names the cluster and this worker. The worker trains LeNet with
`tfbn.train(strategy="multi_worker")` on the synthetic data of tests/train_helpers.py and writes
its final weights and every replica's BatchNorm moving statistics to an .npz file.

    python tests/mw_worker.py OUT.npz RUN_DIR [--synchronized] [--epochs N]
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(pathlib.Path(__file__).parent))

import numpy as np  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("run_dir")
    parser.add_argument("--synchronized", action="store_true")
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args(argv)

    from train_helpers import bn_moving_statistics, synthetic_data

    import tfbn
    import tfbn.workflow.models

    if args.synchronized:
        # LeNet with cross-worker batch statistics in every BatchNorm layer.
        tfbn.workflow.models.BatchNorm = functools.partial(tfbn.BatchNorm, synchronized=True)

    data = synthetic_data(num_train=256, batch_size=64)
    result = tfbn.train(
        "tfbn",
        epochs=args.epochs,
        batch_size=data.batch_size,
        seed=5,
        strategy="multi_worker",
        loop="auto",
        run_dir=args.run_dir,
        recalibrate=False,
        export=False,
        verbose=0,
        dataset=data,
    )
    with result.model.distribute_strategy.scope():
        stats = bn_moving_statistics(result.model)
    arrays = {f"weight_{i:03d}": np.asarray(w) for i, w in enumerate(result.model.get_weights())}
    for path, copies in stats.items():
        for replica, value in enumerate(copies):
            arrays[f"stat/{path}/{replica}"] = value
    np.savez(
        args.out,
        loop=result.loop,
        strategy=result.strategy,
        examples=result.history[-1]["examples"],
        **arrays,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

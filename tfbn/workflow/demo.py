"""`tfbn demo`: the batch-norm layer on a small batch, in training and inference mode, explained."""

from __future__ import annotations

MOMENTUM = 0.9
EPSILON = 1e-5
# The input's features: (mean, spread), scales that have nothing in common.
_FEATURES = ((0.0, 1.0), (10.0, 5.0), (-3.0, 0.1))


def demo(seed: int = 0) -> dict:
    """Runs one training step and one inference call of `tfbn.BatchNorm` on a small random batch.

    Args:
        seed: Seed of the input.

    Returns:
        A dict of NumPy arrays: the `input` (8 examples, 3 features), its `batch_mean` and
        (biased) `batch_variance`, the `train_output` with its per-feature `train_output_mean` and
        `train_output_std`, the `moving_mean` and `moving_variance` after the step, and the
        `inference_output`.
    """
    import numpy as np

    from tfbn.layers.batch_norm import BatchNorm

    rng = np.random.default_rng(seed)
    means, spreads = np.array(_FEATURES).T
    x = (rng.normal(size=(8, len(_FEATURES))) * spreads + means).astype("float32")
    layer = BatchNorm(momentum=MOMENTUM, epsilon=EPSILON)
    train_out = layer(x, training=True).numpy()
    infer_out = layer(x, training=False).numpy()
    return {
        "input": x,
        "batch_mean": x.mean(axis=0),
        "batch_variance": x.var(axis=0),
        "train_output": train_out,
        "train_output_mean": train_out.mean(axis=0),
        "train_output_std": train_out.std(axis=0),
        "moving_mean": layer.moving_mean.numpy(),
        "moving_variance": layer.moving_variance.numpy(),
        "inference_output": infer_out,
    }


def describe(result: dict) -> str:
    """What `demo` showed, as text for a reader: each array after a sentence saying what it is."""
    import numpy as np

    def block(text: str, *names: str) -> str:
        arrays = "\n".join(f"{name}:\n{np.array2string(result[name])}" for name in names)
        return f"{text}\n{arrays}\n"

    features = ", ".join(f"around {m:g} (spread {s:g})" for m, s in _FEATURES)
    return "\n".join(
        [
            block(
                f"A batch of {len(result['input'])} examples with {len(_FEATURES)} features on "
                f"unrelated scales: {features}.",
                "input",
                "batch_mean",
                "batch_variance",
            ),
            block(
                "Training mode (fit, training=True) normalizes each feature with the batch's own "
                "mean and biased variance, then scales by gamma (1) and shifts by beta (0): every "
                f"feature comes out with mean 0 and standard deviation 1 (a little less where the "
                f"variance is not large next to epsilon, {EPSILON:g}).",
                "train_output",
                "train_output_mean",
                "train_output_std",
            ),
            block(
                f"That step also moved the moving statistics from 0 and 1 towards the batch's: "
                f"moving = {MOMENTUM:g} * moving + {1 - MOMENTUM:.1f} * batch statistic.",
                "moving_mean",
                "moving_variance",
            ),
            block(
                "Inference mode (predict, training=False) normalizes with the moving statistics "
                "instead; after one step they are still far from the batch's, so this output is "
                "not normalized yet. After training, tfbn.recalibrate sets them to the whole "
                "dataset's.",
                "inference_output",
            ),
        ]
    )

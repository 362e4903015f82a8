"""`tfbn demo`: the batch-norm op and layer on a small tensor, in training and inference mode."""

from __future__ import annotations


def demo(seed: int = 0) -> dict:
    """Runs `tfbn.BatchNorm` on a small random batch and returns what it shows.

    Returns:
        A dict with the input, the training-mode output and its per-feature mean and std, the
        moving statistics after one step, and the inference-mode output.
    """
    import numpy as np

    from tfbn.layers import BatchNorm

    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(8, 3)) * [1.0, 5.0, 0.1] + [0.0, 10.0, -3.0]).astype("float32")
    layer = BatchNorm(momentum=0.9, epsilon=1e-5)
    train_out = layer(x, training=True).numpy()
    infer_out = layer(x, training=False).numpy()
    return {
        "input": x,
        "train_output": train_out,
        "train_output_mean": train_out.mean(axis=0),
        "train_output_std": train_out.std(axis=0),
        "moving_mean": layer.moving_mean.numpy(),
        "moving_variance": layer.moving_variance.numpy(),
        "inference_output": infer_out,
    }

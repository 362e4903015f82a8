"""The float64 reference of the backend case files (tests/jax_cases.py, tests/torch_cases.py)."""

import numpy as np

EPS = 1e-3


def reference(x, axis, mask=None, epsilon=EPS):
    """float64 mean, biased variance and normalized x over every axis but `axis`."""
    x = np.asarray(x, np.float64)
    axes = tuple(i for i in range(x.ndim) if i != axis)
    w = np.ones_like(x) if mask is None else np.broadcast_to(mask[..., None], x.shape) * 1.0
    count = w.sum(axes, keepdims=True)
    mean = (w * x).sum(axes, keepdims=True) / count
    var = (w * (x - mean) ** 2).sum(axes, keepdims=True) / count
    return mean, var, (x - mean) / np.sqrt(var + epsilon)

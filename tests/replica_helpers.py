"""What the tests of `tf.distribute` replicas share: each replica's copy of a variable."""

from __future__ import annotations

import numpy as np


def replica_values(variable) -> list[np.ndarray]:
    """Each replica's copy of a (Keras 3 or tf.Variable) variable, as NumPy arrays; one array
    outside a strategy."""
    value = getattr(variable, "value", variable)
    return [np.asarray(v) for v in getattr(value, "values", (value,))]

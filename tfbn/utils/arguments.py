"""Checks of arguments: the batch-norm layers' constructor arguments, shared by `tfbn.BatchNorm`
and `tfbn.legacy.BatchNorm`, and the counts the workflow's functions take.

Each check raises a `ValueError` that names the argument and the value received, before any
work is done, and returns the value in the form the caller keeps.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping

import numpy as np

__all__ = [
    "KERAS_ARGUMENTS",
    "check_backend",
    "check_count",
    "check_floating_dtype",
    "check_fused",
    "check_momentum",
    "keras_arguments",
]

#: The constructor arguments that both layers hand on to their base class: Keras 3's and
#: tf-keras's `BatchNormalization` take them with the same names and meanings.
KERAS_ARGUMENTS = (
    "axis",
    "momentum",
    "epsilon",
    "center",
    "scale",
    "beta_initializer",
    "gamma_initializer",
    "moving_mean_initializer",
    "moving_variance_initializer",
    "beta_regularizer",
    "gamma_regularizer",
    "beta_constraint",
    "gamma_constraint",
    "renorm",
    "renorm_clipping",
    "renorm_momentum",
    "synchronized",
)
_FLAGS = ("center", "scale", "renorm", "synchronized")


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_count(name: str, value, minimum: int = 1, *, none: bool = False, error=ValueError):
    """An integer `>= minimum` (a size, a number of steps, a seed, ...), as an `int`.

    Args:
        name: The argument's name, for the message.
        value: What the caller received; a Python or NumPy integer, not a bool.
        minimum: The smallest value allowed.
        none: If `True`, `None` is allowed and returned as is.
        error: The exception class raised (a `ValueError` subclass, e.g. `UsageError`).

    Raises:
        error: for anything else, naming the argument and the value received.
    """
    if value is None and none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        kind = {0: "a non-negative integer", 1: "a positive integer"}.get(
            minimum, f"an integer >= {minimum}"
        )
        raise error(
            f"Argument `{name}` must be {kind}{' or None' if none else ''}; "
            f"received {name}={value!r}."
        )
    return int(value)


def check_momentum(name: str, value) -> float:
    """A real number in `[0, 1)` (`momentum`, `renorm_momentum`), as a float.

    Raises:
        ValueError: for anything else (`None`, a string, a bool, NaN, 1, ...).
    """
    if not _is_real(value) or not 0.0 <= float(value) < 1.0:
        raise ValueError(
            f"Argument `{name}` must be a real number in [0, 1); received {name}={value!r}."
        )
    return float(value)


def check_fused(value) -> bool | None:
    """`fused`: `None` (tfbn picks the kernel), `True` or `False`.

    Raises:
        ValueError: for anything else (`1`, `0`, `"yes"`, ...).
    """
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"Argument `fused` must be None, True or False; received fused={value!r}.")
    return value


def check_floating_dtype(layer_name: str, variable_dtype: str, compute_dtype: str) -> None:
    """The layer's variables and computations must be floating point (`dtype` argument).

    Raises:
        ValueError: if either dtype is not a floating-point dtype (e.g. `dtype="int32"`).
    """
    for dtype in (variable_dtype, compute_dtype):
        if not str(dtype).startswith(("float", "bfloat")):
            raise ValueError(
                f"Argument `dtype` of layer '{layer_name}' must be a floating-point dtype or "
                f"policy (e.g. 'float32', 'mixed_float16'); received dtype={dtype!r}."
            )


def check_backend(backend: str) -> None:
    """tfbn computes on the Keras backends of `tfbn.ops.engine.SUPPORTED_BACKENDS`.

    Raises:
        ValueError: naming the backend in use and those supported otherwise.
    """
    # Imported here: tfbn.ops imports Keras, whose import imports tfbn's library, which needs
    # this module whole (`check_count`).
    from tfbn.ops.engine import SUPPORTED_BACKENDS

    if backend not in SUPPORTED_BACKENDS:
        raise ValueError(
            f"tfbn.BatchNorm runs on the Keras backends {', '.join(SUPPORTED_BACKENDS)}; the Keras "
            f"backend is {backend!r}. Set KERAS_BACKEND to one of them before importing keras."
        )


def keras_arguments(given: Mapping) -> dict:
    """The keyword arguments of the Keras base class, from a layer's constructor arguments.

    Args:
        given: The layer's constructor arguments by name (its `locals()`), holding every name of
            `KERAS_ARGUMENTS`, with `axis` already checked.

    Returns:
        A new dict of the names of `KERAS_ARGUMENTS`: `momentum` and `renorm_momentum` checked
        (`check_momentum`) and `epsilon` (`tfbn.ops.core.check_epsilon`), as floats; `center`,
        `scale`, `renorm` and `synchronized` as bools; `renorm_clipping` checked
        (`tfbn.ops.core.check_renorm_clipping`: a dict of floats, `{}` for `None`); the others as
        given.

    Raises:
        ValueError: for a bad `momentum`, `renorm_momentum`, `epsilon` or `renorm_clipping`,
            naming it.
    """
    from tfbn.ops import core as ops  # here, as in `check_backend`

    forwarded = {name: given[name] for name in KERAS_ARGUMENTS}
    for name in ("momentum", "renorm_momentum"):
        forwarded[name] = check_momentum(name, forwarded[name])
    forwarded["epsilon"] = ops.check_epsilon(forwarded["epsilon"])
    for name in _FLAGS:
        forwarded[name] = bool(forwarded[name])
    forwarded["renorm_clipping"] = ops.check_renorm_clipping(forwarded["renorm_clipping"])
    return forwarded

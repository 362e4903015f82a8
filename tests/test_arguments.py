"""`tfbn.utils.arguments.check_count`, the one check of the counts the workflow's functions take."""

import numpy as np
import pytest

from tfbn.utils.arguments import check_count
from tfbn.utils.errors import UsageError


@pytest.mark.parametrize("value", [1, 7, np.int64(3), np.int32(1)])
def test_a_count_at_or_above_the_minimum_comes_back_as_a_python_int(value):
    result = check_count("steps", value)
    assert result == int(value) and type(result) is int


@pytest.mark.parametrize(
    ("value", "minimum", "kind"),
    [
        (0, 1, "a positive integer"),
        (-1, 0, "a non-negative integer"),
        (2, 3, "an integer >= 3"),
        (True, 1, "a positive integer"),
        (1.0, 1, "a positive integer"),
        ("2", 1, "a positive integer"),
        (None, 1, "a positive integer"),
    ],
)
def test_anything_else_names_the_argument_the_rule_and_the_value(value, minimum, kind):
    with pytest.raises(ValueError) as info:
        check_count("batch_size", value, minimum)
    assert str(info.value) == (
        f"Argument `batch_size` must be {kind}; received batch_size={value!r}."
    )


def test_none_passes_only_when_allowed_and_the_message_says_so():
    assert check_count("seed", None, 0, none=True) is None
    assert check_count("seed", 0, 0, none=True) == 0
    with pytest.raises(ValueError, match=r"non-negative integer or None; received seed=-2\."):
        check_count("seed", -2, 0, none=True)


def test_the_error_class_is_the_callers():
    with pytest.raises(UsageError):
        check_count("repeats", 0, error=UsageError)

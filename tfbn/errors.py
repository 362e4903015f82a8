"""Errors that tfbn reports to a user as one line.

This module imports nothing heavy (no TensorFlow), so the command line can use it before it decides
whether TensorFlow is needed at all.
"""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(ValueError):
    """Bad arguments, inputs or files, found before (or instead of) any expensive work.

    The message is one line that says what is wrong and, where it helps, what to do. The command
    line prints it as `tfbn <command>: error: <message>` and exits with code 2; Python callers get an
    ordinary `ValueError`.
    """

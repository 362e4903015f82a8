"""Errors that tfbn reports to a user as one line.

This module imports nothing heavy (no TensorFlow), so the command line can use it before it decides
whether TensorFlow is needed at all.
"""

from __future__ import annotations

__all__ = ["Terminated", "UsageError"]


class UsageError(ValueError):
    """Bad arguments, inputs or files, found before (or instead of) any expensive work.

    The message is one line that says what is wrong and, where it helps, what to do. The command
    line prints it as `tfbn <command>: error: <message>` and exits with code 2; Python callers get
    an ordinary `ValueError`.
    """


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread by the command line's signal handler.

    A subclass of `KeyboardInterrupt`, so that code which ends cleanly on Ctrl-C (removes its
    temporary files, says where to resume) does the same on SIGTERM. The command line exits with
    code 143 for it and 130 for a plain `KeyboardInterrupt`; the message, if any, is printed as one
    line.
    """

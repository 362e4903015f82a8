"""The `tfbn` command line: a thin shell over the Python API.

Building the parser imports no TensorFlow, so `tfbn --help`, `tfbn <command> --help` and
`tfbn --version` answer at once. Each command is a module of this package with `HELP` (one line),
`configure(parser)` (its arguments, every default shown in `--help`) and `run(args) -> int`, which
imports the module it drives and makes one call into the Python API. A command may have
`check(args)` too, TensorFlow-free: `train`, `tune`, `convert`, `recalibrate` and `export` check
their settings, input model and output folders there, so that a bad one is told at once rather
than after TensorFlow's import. Every command has
`--verbose` (0, 1 or 2, as Keras's `verbose`); TensorFlow's own log lines show only at 2.

Errors are handled here, alike for every command: bad arguments or inputs (`ValueError`, of which
`tfbn.utils.errors.UsageError` is one) print `tfbn <command>: error: <message>` and exit with code
2; an `OSError` prints `tfbn <command>: <path>: <reason>` and exits with code 2; a missing library
of the workflow extra says what to install (exit 2); Ctrl-C exits with 130 and SIGTERM with 143,
without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Iterator

from tfbn.utils.errors import Terminated

# Command name -> module of this package (in the order `tfbn --help` lists them).
COMMANDS: dict[str, str] = {
    "convert": "tfbn.cli.convert",
    "train": "tfbn.cli.train",
    "recalibrate": "tfbn.cli.recalibrate",
    "inspect": "tfbn.cli.inspect",
    "export": "tfbn.cli.export",
    "predict": "tfbn.cli.predict",
    "tune": "tfbn.cli.tune",
    "bench": "tfbn.cli.bench",
    "demo": "tfbn.cli.demo",
}

# Top-level modules that come with `pip install "tfbn[workflow]"`.
WORKFLOW_MODULES = frozenset(
    {"tensorflow_datasets", "keras_tuner", "tensorboard", "matplotlib", "tqdm", "scipy", "sklearn"}
)
WORKFLOW_INSTALL = 'pip install "tfbn[workflow]"'

# What the parser adds to every command's arguments beside its options.
PARSER_NAMES = ("command", "_run", "_check")

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, with every option's default appended to its help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or not action.option_strings:
            return text
        if isinstance(action, argparse.BooleanOptionalAction):
            on, off = action.option_strings[:2]
            return f"{text} (default: {on if action.default else off})"
        if action.nargs == 0 or action.default in (None, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    """Adds `--verbose`, in Keras's sense, to a command's parser (every command has it)."""
    parser.add_argument(
        "--verbose",
        type=int,
        choices=(0, 1, 2),
        default=1,
        help="0: results only; 1: progress bars; 2: one line per epoch or step, and "
        "TensorFlow's own log lines (default: 1)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The `tfbn` parser with every command (TensorFlow-free)."""
    from tfbn import __version__

    parser = argparse.ArgumentParser(
        prog="tfbn",
        description="Batch normalization for Keras 3 / TensorFlow: train, recalibrate, export, "
        "serve and tune LeNet with BatchNorm on Fashion-MNIST.",
        formatter_class=HelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"tfbn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(
            name,
            help=module.HELP,
            description=getattr(module, "DESCRIPTION", module.HELP),
            epilog=getattr(module, "EPILOG", None),
            formatter_class=HelpFormatter,
            allow_abbrev=False,
        )
        module.configure(command)
        _add_verbose(command)
        command.set_defaults(_run=module.run, _check=getattr(module, "check", None))
    return parser


@contextlib.contextmanager
def _stderr_to_file() -> Iterator[tempfile.TemporaryFile]:
    """Points file descriptor 2 at a temporary file for the duration (C++ writes included)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield capture
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def import_tensorflow(verbose: int) -> None:
    """Imports TensorFlow, without its C++ log lines unless `verbose` is 2.

    `TF_CPP_MIN_LOG_LEVEL=3` silences TensorFlow's logging once absl's is initialized
    (e.g. `failed call to cuInit` on a machine without a GPU); the lines written while TensorFlow's
    shared libraries load come before that and go straight to file descriptor 2, so that is pointed
    at a temporary file during the import. If the import fails, what it wrote is shown.
    TensorFlow's Python log lines (`WARNING:tensorflow:... triggered tf.function retracing`)
    and those of the libraries it logs through absl (`WARNING:absl:...`, e.g. TensorFlow
    Datasets) are kept to errors too.
    """
    if verbose >= 2:
        return
    if "tensorflow" not in sys.modules:
        _import_quietly()
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


def _import_quietly() -> None:
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    written = b""
    try:
        with _stderr_to_file() as capture:
            try:
                import tensorflow  # noqa: F401
            except BaseException:
                capture.seek(0)
                written = capture.read()
                raise
    finally:
        if written:
            sys.stderr.buffer.write(written)
            sys.stderr.flush()


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises `Terminated` in the main thread, so clean-up code runs as on Ctrl-C."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _missing_extra(error: ModuleNotFoundError) -> str | None:
    name = (error.name or "").split(".")[0]
    if name not in WORKFLOW_MODULES:
        return None
    return f"{name} is not installed; install it with: {WORKFLOW_INSTALL}"


def _os_error_line(error: OSError) -> str:
    reason = error.strerror or _one_line(error)
    if error.filename is None:
        return reason
    path = os.fsdecode(error.filename)
    if error.errno == errno.ENOENT and error.filename2 is None and os.path.exists(path):
        # The path is there: the OS refused to create something in it (e.g. under /proc).
        reason = f"cannot create files in this folder ({reason})"
    if error.filename2 is not None:
        path = f"{path} -> {os.fsdecode(error.filename2)}"
    return f"{path}: {reason}"


def run_command(command: str, run, args: argparse.Namespace, check=None) -> int:
    """Runs one command's `run(args)` and turns its errors into one line and an exit code.

    `check(args)`, where the command has one, runs first, before TensorFlow is imported: bad
    settings and unwritable outputs are told at once rather than after the import.
    """
    prefix = f"tfbn {command}:"
    try:
        with _sigterm_raises():
            if check is not None:
                check(args)
            import_tensorflow(getattr(args, "verbose", 1))
            return int(run(args) or 0)
    except KeyboardInterrupt as error:
        message = _one_line(error) or (
            "terminated" if isinstance(error, Terminated) else "interrupted"
        )
        print(f"{prefix} {message}", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(error, Terminated) else EXIT_INTERRUPTED
    except ValueError as error:
        print(f"{prefix} error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:
        print(f"{prefix} {_os_error_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as error:
        message = _missing_extra(error)
        if message is None:
            raise
        print(f"{prefix} error: {message}", file=sys.stderr)
        return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    """Runs the `tfbn` command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0
    return run_command(args.command, args._run, args, args._check)


if __name__ == "__main__":
    sys.exit(main())

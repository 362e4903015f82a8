"""The `tfbn` command line: a TensorFlow-free parser, defaults in `--help`, quiet TensorFlow, and
one line and an exit code per error, alike for every command."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest

from tfbn import cli
from tfbn.utils.errors import Terminated, UsageError

TIMEOUT_S = 240
# TensorFlow's C++ log lines: "I0000 00:00:1796160659.613185    7403 port.cc:153] ...".
_CPP_LOG = re.compile(r"^[IWEF]\d{4} [\d:.]+\s+\d+ (\S+:\d+)\]", re.MULTILINE)


def _python(code: str, *args: str, env=None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=env,
        **kwargs,
    )


def _env_without_tf_logging() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return env


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


# ---------------------------------------------------------------------------------- forwarding
# Each command, what it needs on the command line, the function it runs, the options it passes
# by position, and those that reach the function under another keyword (or changed: None).
FORWARDED = {
    "train": (["train", "--norm", "keras"], "tfbn.workflow.training.train", ("norm",), {}),
    "recalibrate": (
        ["recalibrate", "m.keras"],
        "tfbn.workflow.model_files.recalibrate_file",
        ("model", "output"),
        {},
    ),
    "export": (
        ["export", "m.keras", "--class-names", "a,b"],
        "tfbn.workflow.model_files.export_keras_file",
        ("model", "export_dir"),
        {"check_data": "check_files", "class_names": None, "pixel_range": None, "verbose": None},
    ),
    "tune": (
        ["tune", "--variants", "keras,tfbn"],
        "tfbn.workflow.tuning.tune",
        ("variants",),
        {"run_dir": "directory"},
    ),
}


@pytest.mark.parametrize("command", sorted(FORWARDED))
def test_every_option_reaches_the_function_the_command_runs(command, monkeypatch, capsys):
    argv, target, positional, renamed = FORWARDED[command]
    args = cli.build_parser().parse_args(argv)
    calls = []

    def record(*given, **keywords):
        calls.append((given, keywords))
        return argparse.Namespace(summary=str, table=str, role="chief")

    module, function = target.rsplit(".", 1)
    monkeypatch.setattr(importlib.import_module(module), function, record)
    assert args._run(args) == 0
    ((given, keywords),) = calls
    capsys.readouterr()
    options = {name: value for name, value in vars(args).items() if name not in cli.PARSER_NAMES}
    assert len(given) == len(positional)
    expected = {renamed.get(name) or name for name in options if name not in positional}
    assert set(keywords) == expected
    for name, value in options.items():
        if name not in positional and renamed.get(name, name) is not None:
            assert keywords[renamed.get(name, name)] == value, name


# ------------------------------------------------------------------------------------- parsing
def test_help_and_version_do_not_import_tensorflow():
    code = """
        import contextlib, io, json, sys, time
        start = time.perf_counter()
        from tfbn import cli
        for argv in [["--help"], ["--version"], *[[c, "--help"] for c in cli.COMMANDS]]:
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    cli.main(argv)
            except SystemExit as exit:
                assert exit.code == 0, (argv, exit.code)
            # Each answer within 1 s of the start, the import of tfbn included.
            assert time.perf_counter() - start < 1.0, (argv, time.perf_counter() - start)
            start = time.perf_counter()
        heavy = ("tensorflow", "keras", "tensorflow_datasets", "keras_tuner", "matplotlib")
        print(json.dumps(sorted(m for m in heavy if m in sys.modules)))
    """
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
    version = subprocess.run(
        [sys.executable, "-m", "tfbn", "--version"], capture_output=True, text=True, timeout=60
    )
    import tfbn

    assert version.returncode == 0 and version.stdout.strip() == f"tfbn {tfbn.__version__}"


def test_every_option_of_every_command_shows_its_default():
    formatter = cli.HelpFormatter("tfbn")
    for name, parser in _subcommands(cli.build_parser()).items():
        for action in parser._actions:
            plain_flag = action.nargs == 0 and not isinstance(
                action, argparse.BooleanOptionalAction
            )
            if not action.option_strings or plain_flag:
                continue
            text = formatter._get_help_string(action) % {"default": action.default}
            assert "default" in text, f"tfbn {name} {action.option_strings[0]}: {text!r}"


def test_one_spelling_per_option_across_commands():
    spellings: dict[str, set[tuple[str, ...]]] = {}
    for parser in _subcommands(cli.build_parser()).values():
        for action in parser._actions:
            if action.option_strings:
                spellings.setdefault(action.dest, set()).add(tuple(action.option_strings))
    assert {dest: s for dest, s in spellings.items() if len(s) > 1} == {}
    # A flag shared by commands takes the same kind of value in each (tfbn/cli/options.py).
    kinds: dict[str, set] = {}
    for parser in _subcommands(cli.build_parser()).values():
        for action in parser._actions:
            if action.option_strings:
                kinds.setdefault(action.dest, set()).add((type(action).__name__, action.type))
    assert {dest: k for dest, k in kinds.items() if len(k) > 1} == {}
    flags = {flag for s in spellings.values() for names in s for flag in names}
    assert "--verbose" in flags and "--run-dir" in flags and "--learning-rate" in flags
    assert not flags & {"--lr", "--dir", "--quiet", "--no-progress", "--progress"}
    for parser in _subcommands(cli.build_parser()).values():
        assert parser.parse_args(["--verbose", "0"] + _required(parser)).verbose == 0


def _required(parser: argparse.ArgumentParser) -> list[str]:
    positionals = [a for a in parser._actions if not a.option_strings]
    return ["x"] * sum(1 if a.nargs in (None, "+") else 0 for a in positionals)


# ------------------------------------------------------------------------- TensorFlow's logging
def test_no_tensorflow_log_line_unless_verbose_2():
    env = _env_without_tf_logging()
    quiet = subprocess.run(
        [sys.executable, "-m", "tfbn", "demo"], capture_output=True, text=True, env=env
    )
    assert quiet.returncode == 0 and "moving_mean" in quiet.stdout
    assert quiet.stderr == ""
    # What TensorFlow itself prints on this machine, without tfbn: --verbose 2 lets it through.
    reference = _python("import tensorflow as tf; tf.constant(1.0) + 1", env=env)
    loud = subprocess.run(
        [sys.executable, "-m", "tfbn", "demo", "--verbose", "2"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert loud.returncode == 0
    assert set(_CPP_LOG.findall(reference.stderr)) <= set(_CPP_LOG.findall(loud.stderr))


# TensorFlow's Python log lines and those of the libraries logging through absl (TFDS).
_PY_LOG = re.compile(r"^(WARNING|INFO|ERROR):(tensorflow|absl):", re.MULTILINE)


def test_no_tensorflow_log_line_in_any_command(tmp_path):
    """convert, export, predict and bench (whose repeated tracing makes TensorFlow warn), in one
    process that imports TensorFlow through the first command, as `tfbn` does, on tiny inputs."""
    import keras
    import tensorflow as tf
    from model_helpers import structured_images

    keras.Sequential(
        [keras.Input((28, 28, 1)), keras.layers.Conv2D(2, 3), keras.layers.BatchNormalization(),
         keras.layers.Flatten(), keras.layers.Dense(10)]
    ).save(tmp_path / "k.keras")  # fmt: skip
    image = tmp_path / "image.png"
    image.write_bytes(tf.io.encode_png(structured_images(1)[0][..., None]).numpy())
    code = """
        import sys
        from tfbn import cli
        d = sys.argv[1]
        runs = [
            ["convert", f"{d}/k.keras", f"{d}/t.keras"],
            ["export", f"{d}/t.keras", "--export-dir", f"{d}/e"],
            ["predict", f"{d}/e/lenet", f"{d}/image.png"],
            ["bench", "--quick", "--cases", "layer", "--repeats", "1", "--no-xla",
             "--output-dir", f"{d}/b"],
        ]
        print("codes", [cli.main(argv + ["--verbose", "1"]) for argv in runs])
    """
    done = _python(code, str(tmp_path), env=_env_without_tf_logging())
    assert "codes [0, 0, 0, 0]" in done.stdout, done.stderr[-3000:]
    assert _CPP_LOG.findall(done.stderr) == [], done.stderr[-3000:]
    assert _PY_LOG.findall(done.stderr) == [], done.stderr[-3000:]


# ------------------------------------------------------------------------------------ errors
def _args() -> argparse.Namespace:
    return argparse.Namespace(verbose=1)


def _raising(error: BaseException):
    def run(args):
        raise error

    return run


@pytest.mark.parametrize(
    "error",
    [
        UsageError("Argument `seed` must be non-negative;\n received seed=-1."),
        ValueError("Argument `epochs` must be a positive integer; received epochs=0."),
    ],
)
def test_bad_input_is_one_line_and_exit_2(error, capsys):
    assert cli.run_command("train", _raising(error), _args()) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("tfbn train: error: Argument `")
    assert " ".join(str(error).split()) in line


def test_os_error_names_the_path_and_the_reason(tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "file"

    def run(args):
        missing.read_text()

    assert cli.run_command("export", run, _args()) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == f"tfbn export: {missing}: {os.strerror(2)}"


def test_missing_workflow_library_says_what_to_install(capsys):
    def run(args):
        raise ModuleNotFoundError("No module named 'keras_tuner'", name="keras_tuner")

    assert cli.run_command("tune", run, _args()) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "keras_tuner" in line and 'install it with: pip install "tfbn[workflow]"' in line
    # Any other missing module is a bug, not a missing extra: its traceback stays.
    with pytest.raises(ModuleNotFoundError):
        cli.run_command("tune", _raising(ModuleNotFoundError("x", name="nothere")), _args())


def test_missing_extra_in_a_real_run_creates_nothing(tmp_path):
    run_dir = tmp_path / "run"
    code = """
        import sys
        sys.modules["tensorflow_datasets"] = None  # as if the workflow extra were not installed
        from tfbn.cli import main
        sys.exit(main(sys.argv[1:]))
    """
    done = _python(code, "train", "--epochs", "1", "--run-dir", str(run_dir), "--no-export")
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("tfbn train: error: tensorflow_datasets is not installed")
    assert line.endswith('pip install "tfbn[workflow]"')
    assert not run_dir.exists()


def test_interrupt_messages_and_exit_codes(capsys):
    assert cli.run_command("train", _raising(KeyboardInterrupt()), _args()) == 130
    assert capsys.readouterr().err == "tfbn train: interrupted\n"
    message = "interrupted during epoch 3; run the same command to resume after epoch 2"
    assert cli.run_command("train", _raising(Terminated(message)), _args()) == 143
    assert capsys.readouterr().err == f"tfbn train: {message}\n"


@pytest.mark.parametrize(
    ("signum", "code", "word"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
)
def test_real_signals_end_with_one_line(signum, code, word):
    script = """
        import argparse, sys, time
        from tfbn.cli import run_command

        def run(args):
            print("ready", flush=True)
            time.sleep(120)

        sys.exit(run_command("wait", run, argparse.Namespace(verbose=2)))
    """
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline() == "ready\n"
        process.send_signal(signum)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == code
    assert err == f"tfbn wait: {word}\n"

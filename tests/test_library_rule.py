"""The library (`tfbn.layers`, `tfbn.ops`, `tfbn.tools`, `tfbn.utils`, `tfbn.legacy`) never
imports the application (`tfbn.workflow`), the command line (`tfbn.cli`) or a library of the
workflow extra: not at the top of a module, not inside a function, not through `importlib`.

Read from the source files with `ast`: nothing is imported, so an import that only runs on some
path is found too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tfbn"
LIBRARY_FILES = sorted(
    [
        *(
            p
            for folder in ("layers", "ops", "tools", "utils")
            for p in (PACKAGE / folder).rglob("*.py")
        ),
        PACKAGE / "legacy.py",
    ]
)
# A library file's path (never written): relative imports in the examples resolve from it.
PROBE = PACKAGE / "tools" / "probe.py"
FORBIDDEN = (
    "tfbn.workflow",
    "tfbn.cli",
    "tensorflow_datasets",
    "keras_tuner",
    "matplotlib",
    "tqdm",
    "tensorboard",
)


def _is_forbidden(module: str) -> bool:
    return any(module == name or module.startswith(f"{name}.") for name in FORBIDDEN)


def _absolute(node: ast.ImportFrom, path: Path) -> str:
    """The module an `ImportFrom` names, relative imports resolved against `path`."""
    if not node.level:
        return node.module or ""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    base = parts[: len(parts) - node.level]
    return ".".join([*base, *([node.module] if node.module else [])])


def _is_import_call(node: ast.Call) -> bool:
    """`importlib.import_module(...)`, `import_module(...)` or `__import__(...)`."""
    function = node.func
    name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "")
    return name in ("import_module", "__import__")


def imported_modules(source: str, path: Path) -> list[tuple[int, str]]:
    """Every module `source` (the text of the file at `path`) imports, anywhere in it, with the
    line: `import a.b` gives `a.b`; `from a import b` gives `a` and `a.b`;
    `importlib.import_module("a.b")` and `__import__("a.b")` give `a.b`."""
    found = []
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(node, path)
            found.append((node.lineno, module))
            found.extend((node.lineno, f"{module}.{alias.name}") for alias in node.names)
        elif isinstance(node, ast.Call) and _is_import_call(node) and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                found.append((node.lineno, first.value))
    return found


def violations(source: str, path: Path) -> list[str]:
    """`"<file>:<line>: imports <module>"` for each forbidden import in `source`."""
    return [
        f"{path.relative_to(PACKAGE.parent)}:{line}: imports {module}"
        for line, module in imported_modules(source, path)
        if _is_forbidden(module)
    ]


def test_the_library_files_are_found():
    names = {p.relative_to(PACKAGE).as_posix() for p in LIBRARY_FILES}
    assert {"layers/batch_norm.py", "ops/nn.py", "tools/recalibration.py", "legacy.py"} <= names


@pytest.mark.parametrize("path", LIBRARY_FILES, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_no_library_module_imports_the_application(path):
    assert violations(path.read_text(), path) == []


@pytest.mark.parametrize(
    "source",
    [
        "import tfbn.workflow.data",
        "from tfbn.workflow import data",
        "from tfbn import workflow",
        "from tfbn import cli",
        "from ..workflow import data",
        "def f():\n    import tensorflow_datasets as tfds\n",
        "def f():\n    from matplotlib import pyplot\n",
        "import tqdm.auto",
        "from tensorboard.plugins import projector",
        "import keras_tuner",
        "import importlib\nimportlib.import_module('tfbn.workflow.serving')",
        "from importlib import import_module\nimport_module('tfbn.cli')",
        "class A:\n    def f(self):\n        return __import__('tensorflow_datasets')\n",
    ],
)
def test_each_way_of_importing_is_caught(source):
    assert violations(source, PROBE), source


@pytest.mark.parametrize(
    "source",
    [
        "import tensorflow as tf\nimport keras\nimport numpy as np",
        "from tfbn.utils.files import atomic_write",
        "from . import graph",
        "import tfbn.workflowlike",  # a prefix of the name is not the name
        "x = 'tfbn.workflow'  # a string that is not an import",
    ],
)
def test_allowed_imports_pass(source):
    assert violations(source, PROBE) == []

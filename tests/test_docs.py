"""The documentation site: it builds with `mkdocs build --strict`, and every public name has a page.

mkdocstrings reads the sources statically (griffe), so nothing here imports TensorFlow. The docs
extra (mkdocs, mkdocs-material, mkdocstrings) is installed by run.sh with every other extra: a
missing mkdocs fails these tests rather than skipping them.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import tfbn

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
REFERENCE = DOCS / "reference"
TIMEOUT_S = 300

# `::: dotted.path` at the start of a line: a mkdocstrings directive.
_DIRECTIVE = re.compile(r"^:::\s+(\S+)\s*$", re.MULTILINE)


def _build(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    return subprocess.run(
        [*args], capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=cwd
    )  # fmt: skip


def _nav_files(node) -> list[str]:
    """Every page file named in a mkdocs `nav` tree."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [f for value in node.values() for f in _nav_files(value)]
    return [f for item in node for f in _nav_files(item)]


def _config() -> dict:
    import yaml  # comes with mkdocs

    # mkdocs.yml holds no YAML tags that need mkdocs's own loader.
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))


def _directives() -> dict[str, Path]:
    """Each `::: target` of the reference pages -> its page."""
    found = {}
    for page in sorted(REFERENCE.glob("*.md")):
        for target in _DIRECTIVE.findall(page.read_text(encoding="utf-8")):
            found[target] = page
    return found


def _public_targets() -> dict[str, str]:
    """Each public name of `tfbn` -> the dotted path of the object it stands for."""
    targets = {**tfbn._LIBRARY, **tfbn._APPLICATION}
    names = [name for name in tfbn.__all__ if name != "__version__"]
    assert set(names) == set(targets), "tfbn.__all__ and tfbn's name tables disagree"
    return {name: targets[name].replace(":", ".") for name in names}


def test_mkdocs_is_installed():
    result = _build(sys.executable, "-m", "mkdocs", "--version")
    assert result.returncode == 0, (
        "mkdocs is missing: install the docs extra (pip install -e '.[docs]', or bash run.sh "
        "setup)\n" + result.stderr
    )


def test_site_builds_strictly(tmp_path):
    """A broken link, a missing page or a docstring mkdocstrings cannot read fails the build."""
    result = _build(
        sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")
    )
    assert result.returncode == 0, result.stdout + result.stderr
    site = tmp_path / "site"
    # The home page is the README; the CLI page holds each command's --help.
    home = (site / "index.html").read_text(encoding="utf-8")
    assert "Use tfbn in your own model" in home
    cli = (site / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    from tfbn.cli import COMMANDS

    for command in COMMANDS:
        assert f'id="tfbn-{command}"' in cli, command
        assert f"usage: tfbn {command}" in cli, command


def test_every_public_name_has_a_reference_page():
    directives = _directives()
    missing = {
        name: target for name, target in _public_targets().items() if target not in directives
    }
    assert not missing, (
        f"public names without a reference page (a `::: <target>` line in docs/reference/): "
        f"{missing}"
    )


def test_legacy_layer_has_a_reference_page():
    # tfbn.legacy is public but not imported by `import tfbn`, so it is not in tfbn.__all__.
    assert "tfbn.legacy.BatchNorm" in _directives()


def test_every_reference_page_is_in_the_nav():
    nav = set(_nav_files(_config()["nav"]))
    pages = {f"reference/{page.name}" for page in REFERENCE.glob("*.md")}
    assert pages - nav == set(), "reference pages missing from mkdocs.yml's nav"


def test_run_sh_docs_builds_the_site(tmp_path):
    """`bash run.sh docs` (with an installed environment) builds the site and says where it is."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    (venv / ".tfbn-installed").touch()  # newer than setup.cfg: nothing is installed
    site = tmp_path / "out"
    env = dict(os.environ, TFBN_VENV=str(venv), NO_MKDOCS_2_WARNING="1")
    result = subprocess.run(
        ["bash", str(ROOT / "run.sh"), "docs", "--site-dir", str(site)],
        capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert (site / "index.html").is_file()
    assert str(site / "index.html") in result.stderr


def test_the_domain_shift_page_is_the_studys_own_output():
    """docs/results/domain_shift.md is what domain_shift_study.py renders from its JSON, and the
    study's damaged MobileNetV2 had exactly its two damaged layers flagged."""
    import importlib.util
    import json

    path = ROOT / "docs" / "results" / "domain_shift_study.py"
    spec = importlib.util.spec_from_file_location("domain_shift_study", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    result = json.loads((ROOT / "docs" / "results" / "domain_shift.json").read_text())
    assert (ROOT / "docs" / "results" / "domain_shift.md").read_text() == study._markdown(result)
    case = result["damaged_layers"]
    assert case["flagged_when_healthy"] == []
    assert sorted(case["flagged_when_damaged"]) == sorted(case["damaged"])
    assert {row["shift"] for row in result["shifts"]} == set(study.SHIFTS)

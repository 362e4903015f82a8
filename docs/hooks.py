"""Build hooks of the documentation site (mkdocs.yml `hooks`).

- The home page is README.md itself: its links into docs/ are made relative to the site.
- The command-line reference shows `tfbn --help` and each `tfbn <command> --help`, produced by
  the same parser as the command (`tfbn.cli.build_parser`, which imports no TensorFlow).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

HOME = "index.md"
CLI_PAGE = "reference/cli.md"
CLI_MARKER = "<!-- tfbn-cli-help -->"
HELP_COLUMNS = "100"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri == HOME:
        readme = Path(config["config_file_path"]).parent / "README.md"
        return readme.read_text(encoding="utf-8").replace("](docs/", "](")
    if page.file.src_uri == CLI_PAGE:
        return markdown.replace(CLI_MARKER, cli_help())
    return markdown


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def cli_help() -> str:
    """Markdown: the help of `tfbn` and of each command, as the terminal shows it at 100 columns."""
    from tfbn.cli import build_parser

    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_COLUMNS
    try:
        parser = build_parser()
        parts = ["## tfbn", "", "```text", parser.format_help().rstrip(), "```", ""]
        for name, command in _commands(parser).items():
            parts += [f"## tfbn {name}", "", "```text", command.format_help().rstrip(), "```", ""]
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved
    return "\n".join(parts)

"""docs/cli.md is every command's --help as the parsers print it today."""

from pathlib import Path

import pytest

from fusechat.cli_reference import PYTHON_LINE, REGENERATE, cli_markdown, commands, python_version

CLI_MD = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def test_cli_reference_is_current():
    text = CLI_MD.read_text(encoding="utf-8")
    line = next(x for x in text.splitlines() if x.startswith(PYTHON_LINE))
    if line != f"{PYTHON_LINE}{python_version()}.":
        pytest.skip(f"docs/cli.md says '{line}': argparse's layout differs on this Python")
    assert CLI_MD.read_text(encoding="utf-8") == cli_markdown(), (
        f"docs/cli.md is stale: regenerate it with `{REGENERATE}` (or `make docs`)"
    )


def test_cli_reference_has_every_command_and_ignores_the_terminal(monkeypatch):
    """Nested subcommands get their own section; the width and the program name of the
    process that renders the page change nothing."""
    from fusechat.cli import build_parser

    text = cli_markdown()
    for path, _ in commands(build_parser()):
        assert f"\n## {' '.join(('fusechat', *path))}\n" in text, path
    for path in (("toy", "build"), ("toy", "real"), ("recipe", "check"), ("eval", "mt-bench")):
        assert f"usage: fusechat {' '.join(path)} " in text, path
    monkeypatch.setenv("COLUMNS", "37")
    monkeypatch.setattr("sys.argv", ["elsewhere/__main__.py"])
    assert cli_markdown() == text

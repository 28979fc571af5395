"""Every ``fusechat`` command shown in the README and docs/ parses with today's CLI: a renamed
or removed option fails here, not in a reader's shell. (Commands that run offline on the toy
world are run for real elsewhere: the recipes' dry runs in test_run and test_run_implicit.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from fusechat.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
# docs/cli.md is generated from the parsers themselves (test_cli_reference)
PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "cli.md")]


def shown_commands(text: str) -> list[str]:
    """The ``fusechat ...`` lines of the fenced and the indented code blocks, continuation
    lines joined; synopsis lines (``[--opt]``, ``a|b``, ``...``) left out: not commands."""
    out = []
    fenced = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    rest = re.sub(r"```[a-z]*\n(.*?)```", "", text, flags=re.S)
    indented = re.findall(r"^(?: {4,}.*\n?)+", rest, flags=re.M)
    for block in fenced + indented:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line.startswith("fusechat "):
                continue
            args = shlex.split(line, comments=True)
            if any(a.startswith("[") or "|" in a or a == "..." for a in args):
                continue
            out.append(line)
    return out


COMMANDS = [(p.name, c) for p in PAGES for c in shown_commands(p.read_text())]


def test_the_pages_show_commands():
    assert len(COMMANDS) > 30
    assert any("fusechat sample" in c for _, c in COMMANDS)


@pytest.mark.parametrize(("page", "command"), COMMANDS)
def test_a_shown_command_parses(page, command, capsys):
    argv = shlex.split(command, comments=True)[1:]
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:  # --help and --version exit 0; a bad option exits 2
        assert e.code == 0, f"{page}: {command}\n{capsys.readouterr().err}"

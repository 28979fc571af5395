"""The command-line reference, ``docs/cli.md``: every command's ``--help``, rendered from the
parsers ``fusechat.cli.build_parser`` builds, so the page cannot drift from the code.

``python -m fusechat.cli_reference > docs/cli.md`` (or ``make docs``) regenerates it;
``tests/test_cli_reference.py`` fails while the file differs from :func:`cli_markdown`. The
text depends neither on the terminal's width (a fixed formatter width) nor on how the program
was started (each parser's ``prog`` is set from its command path)."""

from __future__ import annotations

import argparse
import functools
from collections.abc import Iterator

WIDTH = 100
PROG = "fusechat"
REGENERATE = "python -m fusechat.cli_reference > docs/cli.md"
# argparse lays help out differently from one Python to the next: the page names its own
PYTHON_LINE = "Rendered by Python "


def python_version() -> str:
    import sys

    return f"{sys.version_info.major}.{sys.version_info.minor}"


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (command path, parser) under ``parser``, depth first in the order they were
    added, nested subcommands included (``toy build``, ``recipe check``, ``eval mt-bench``)."""
    yield path, parser
    seen: set[int] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if id(sub) not in seen:  # an alias names the same parser again
                    seen.add(id(sub))
                    yield from commands(sub, (*path, name))


def _fixed(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> argparse.ArgumentParser:
    """The parser made independent of its environment: prog from the command path, the
    formatter at a fixed width, no colour (Python 3.14 colours help on a terminal)."""
    parser.prog = " ".join((PROG, *path))
    parser.formatter_class = functools.partial(parser.formatter_class, width=WIDTH)
    if hasattr(parser, "color"):
        parser.color = False
    return parser


def help_text(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> str:
    """One command's ``--help``, as printed at a terminal ``WIDTH`` columns wide."""
    return _fixed(parser, path).format_help().rstrip() + "\n"


def cli_markdown() -> str:
    """The whole reference: a contents line, then one ``## fusechat COMMAND`` section per
    command with its help in a fenced block."""
    from fusechat.cli import build_parser

    found = list(commands(build_parser()))
    names = [" ".join((PROG, *path)) for path, _ in found]
    contents = ", ".join(f"[`{n}`](#{n.replace(' ', '-')})" for n in names)
    parts = [
        "# Command-line reference\n",
        "Every command's `--help`, generated from the argparse parsers of `fusechat/cli.py` "
        f"(`{REGENERATE}`, or `make docs`); `tests/test_cli_reference.py` fails when this page "
        "is stale. Back to the [README](../README.md); the [docs index](README.md).\n",
        f"{PYTHON_LINE}{python_version()}.\n",
        f"Commands: {contents}.\n",
    ]
    for name, (path, parser) in zip(names, found, strict=True):
        parts.append(f"## {name}\n\n```text\n{help_text(parser, path)}```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    print(cli_markdown(), end="")

import pytest

from fusechat import __version__
from fusechat.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and __version__ in capsys.readouterr().out


def _commands(parser, path=()):
    """Every (command path, parser) under ``parser``, subcommands included."""
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


def test_help_names_every_command_and_explains_every_option(capsys):
    """Each command's --help lists its subcommands and every option with a help text: an
    option added without one, or hidden, fails here."""
    from fusechat.cli import build_parser

    commands = list(_commands(build_parser()))
    assert len(commands) > 12
    for path, parser in commands:
        with pytest.raises(SystemExit):
            main([*path, "--help"])
        out = capsys.readouterr().out
        assert out.startswith("usage: fusechat") and (not path or path[-1] in out.split("\n")[0])
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and action.help != "==SUPPRESS==", (path, action.dest)
                assert action.option_strings[-1] in out, (path, action.option_strings)
            if hasattr(action, "choices") and isinstance(action.choices, dict):
                for name in action.choices:  # subcommands
                    assert name in out, (path, name)


def test_toy_build_prints_skill_table(toy_world, capsys):
    assert main(["toy", "build", "--out", str(toy_world)]) == 0  # cached: returns at once
    out = capsys.readouterr().out
    assert "openchat-mini" in out and "glossary" in out and "*" in out

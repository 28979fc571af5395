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


def test_no_help_shows_an_undefined_or_misleading_default(capsys):
    from fusechat.cli import build_parser

    for path, _ in _commands(build_parser()):
        with pytest.raises(SystemExit):
            main([*path, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "PydanticUndefined" not in out, path
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "(default 16 once lora is on)" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    "argv,expect",
    [
        (["capture", "--model", "x", "--data", "y", "--out", "z", "--k", "abc"],
         "argument --k: invalid int value: 'abc'"),
        (["train", "--extra", "not json"], "argument --extra: invalid JSON value: 'not json'"),
        (["bogus"], "invalid choice: 'bogus'"),
    ],
)  # fmt: skip
def test_argument_mistakes_are_one_line(argv, expect, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and expect in err, err
    assert "usage:" not in err


def test_the_dry_run_names_the_dtype_auto_means_here(toy_world, capsys):
    from fusechat.data import resolve_dtype

    assert main(["run", "recipes/mini.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"in {resolve_dtype('auto')} (auto on this machine)" in out
    assert "on GPU" not in out


def test_toy_build_prints_skill_table(toy_world, capsys):
    assert main(["toy", "build", "--out", str(toy_world)]) == 0  # cached: returns at once
    out = capsys.readouterr().out
    assert "openchat-mini" in out and "glossary" in out and "*" in out


def test_an_install_adds_only_the_fusechat_namespace(tmp_path):
    """`pip install .` puts merge/ and eval/ under fusechat (fusechat.merge, fusechat.eval),
    never as top-level packages that would collide with others of those names."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--target", str(target), str(root)],
                   check=True, capture_output=True, cwd=tmp_path)  # fmt: skip
    top = {p.name for p in target.iterdir() if not p.name.endswith((".dist-info", ".egg-info"))}
    assert top == {"fusechat", "bin"} or top == {"fusechat"}, top
    assert (target / "fusechat" / "merge" / "varm.py").is_file()
    assert (target / "fusechat" / "eval" / "server.py").is_file()
    # the installed copy resolves its own modules, not the checkout's
    code = ("import importlib.util as u; "
            "print(u.find_spec('fusechat.merge.varm').origin, u.find_spec('fusechat.eval.toy').origin)")  # fmt: skip
    out = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {code}"],
                         check=True, capture_output=True, text=True, cwd=tmp_path).stdout  # fmt: skip
    assert out.split() == [str(target / "fusechat" / "merge" / "varm.py"),
                           str(target / "fusechat" / "eval" / "toy.py")]  # fmt: skip


def test_logging_follows_stderr_across_calls(monkeypatch, tmp_path):
    """``main`` run twice in one process (a notebook, a test harness) with stderr replaced and
    the first stream closed in between: records go to the stream of the moment, never to
    the closed one ("--- Logging error ---" on stderr)."""
    import io
    import logging
    import sys

    from fusechat.cli import main

    monkeypatch.setattr(logging.root, "handlers", [])  # as in a fresh process
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    assert main(["recipe", "check", str(tmp_path / "missing.yaml")]) == 2
    first.close()
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("fusechat.test").warning("after the first stream closed")
    assert "after the first stream closed" in second.getvalue()
    assert "Logging error" not in second.getvalue()

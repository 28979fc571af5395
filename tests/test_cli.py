import pytest

from fusechat import __version__
from fusechat.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and __version__ in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv", [["--help"], ["toy", "build", "--help"], ["recipe", "check", "--help"]]
)
def test_help_is_complete(argv, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    out = capsys.readouterr().out
    assert "usage: fusechat" in out


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("toy", "recipe"):
        assert cmd in out


def test_toy_build_prints_skill_table(toy_world, capsys):
    assert main(["toy", "build", "--out", str(toy_world)]) == 0  # cached: returns at once
    out = capsys.readouterr().out
    assert "openchat-mini" in out and "glossary" in out and "*" in out

import subprocess
import sys

import pytest
import yaml

from fusechat.cli import main

VALID = {
    "name": "mini",
    "models": {
        "pivot": {"path": "toy/openchat-mini", "template": "openchat", "dtype": "float32"},
        "sources": [
            {"path": "toy/nh2-mixtral-mini"},
            {"path": "NousResearch/Nous-Hermes-2-SOLAR-10.7B", "name": "solar"},
        ],
    },
    "data": {"path": "toy/corpus/train.jsonl"},
}


def _write(tmp_path, obj, text=None):
    p = tmp_path / "recipe.yaml"
    p.write_text(text if text is not None else yaml.safe_dump(obj))
    return p


def _edit(path_keys, value):
    import copy

    r = copy.deepcopy(VALID)
    node = r
    for k in path_keys[:-1]:
        node = node[k] if isinstance(node, list) else node.setdefault(k, {})
    if value is _DELETE:
        del node[path_keys[-1]]
    else:
        node[path_keys[-1]] = value
    return r


_DELETE = object()


def test_valid_recipe_prints_plan(tmp_path, capsys):
    p = _write(tmp_path, VALID)
    assert main(["recipe", "check", str(p)]) == 0
    out = capsys.readouterr().out
    assert "ok" in out and "nh2-mixtral-mini" in out and "hub id" in out
    assert "rendered with 'openchat' for every model" in out


BROKEN = [
    ("missing section", _edit(["data"], _DELETE), "recipe.yaml: data: field required"),
    (
        "missing nested field",
        _edit(["models", "sources", 1, "path"], _DELETE),
        "recipe.yaml: models.sources[1].path: field required",
    ),
    ("unknown key (typo)", {**VALID, "modles": {}}, "recipe.yaml: modles: unknown field"),
    (
        "unknown nested key",
        _edit(["models", "pivot", "dtpye"], "float32"),
        "recipe.yaml: models.pivot.dtpye: unknown field",
    ),
    (
        "bad dtype",
        _edit(["models", "pivot", "dtype"], "float8"),
        "recipe.yaml: models.pivot.dtype: Input should be",
    ),
    (
        "unknown template",
        _edit(["models", "pivot", "template"], "vicuna"),
        "recipe.yaml: models.pivot.template: Input should be",
    ),
    (
        "a source's own template (every input is rendered in the pivot's format)",
        _edit(["models", "sources", 0, "template"], "chatml"),
        "recipe.yaml: models: sources[0].template: every model's input is rendered",
    ),
    (
        "no sources",
        _edit(["models", "sources"], []),
        "recipe.yaml: models.sources: List should have at least 1",
    ),
    (
        "duplicate names",
        _edit(["models", "sources", 1, "name"], "nh2-mixtral-mini"),
        "recipe.yaml: models: duplicate model name 'nh2-mixtral-mini'",
    ),
    (
        "wrong type",
        _edit(["data", "max_rows"], "ten"),
        "recipe.yaml: data.max_rows: Input should be a valid integer",
    ),
    (
        "negative count",
        _edit(["data", "max_rows"], -5),
        "recipe.yaml: data.max_rows: Input should be greater than 0",
    ),
    (
        "bad data format",
        _edit(["data", "format"], "csv"),
        "recipe.yaml: data.format: Input should be",
    ),
    (
        "empty path",
        _edit(["models", "pivot", "path"], ""),
        "recipe.yaml: models.pivot.path: String should have at least 1",
    ),
    ("bad name", _edit(["name"], "my recipe!"), "recipe.yaml: name: String should match pattern"),
    (
        "sources not a list",
        _edit(["models", "sources"], {"path": "x"}),
        "recipe.yaml: models.sources: Input should be a valid list",
    ),
    ("zero top-K", _edit(["capture", "k"], 0), "recipe.yaml: capture.k: Input should be greater"),
    (
        "unknown alignment",
        _edit(["align", "sequence"], "nw"),
        "recipe.yaml: align.sequence: Input should be 'offsets' or 'dtw'",
    ),
    (
        "unknown fusion method",
        _edit(["fuse", "method"], "maxCE"),
        "recipe.yaml: fuse.method: Input should be 'minCE' or 'avgCE'",
    ),
]


@pytest.mark.parametrize("label,recipe,expected", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_recipes_give_one_clear_line(tmp_path, capsys, label, recipe, expected):
    p = _write(tmp_path, recipe)
    assert main(["recipe", "check", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("fusechat: error: ") and expected in err.replace(
        str(tmp_path) + "/", ""
    ), err


@pytest.mark.parametrize(
    "text,expected",
    [
        ("name: [unclosed\n", "YAML syntax error at line"),
        ("- just\n- a list\n", "a recipe must be a mapping"),
        ("", "a recipe must be a mapping"),
    ],
)
def test_unparseable_recipes(tmp_path, capsys, text, expected):
    p = _write(tmp_path, None, text)
    assert main(["recipe", "check", str(p)]) == 2
    assert expected in capsys.readouterr().err


def test_missing_recipe_file_via_subprocess_has_no_traceback(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "fusechat.cli", "recipe", "check", str(tmp_path / "none.yaml")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.strip() == f"fusechat: error: {tmp_path / 'none.yaml'}: recipe not found"
    assert "Traceback" not in r.stderr

"""`fusechat run` with an ``implicit`` section (FuseChat-3.0): the plan, its keys, explicit and
implicit side by side or implicit alone, end to end on the toy world, then cached."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import edit_recipe

from fusechat.cli import main
from fusechat.recipe import Recipe
from fusechat.run import plan

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _recipe(tmp_path: Path, **edits) -> dict:
    raw = yaml.safe_load((RECIPES / "implicit-mini.yaml").read_text())
    raw["run_dir"] = str(tmp_path / "runs")
    raw["data"]["max_rows"] = 24
    raw["implicit"]["sample"].update(n=2, max_new_tokens=8, shard_rows=16)
    raw["implicit"]["sft"].update(max_steps=2, batch_size=8, micro_batch_size=8)
    raw["implicit"]["dpo"].update(max_steps=2, batch_size=4, micro_batch_size=4)
    raw["eval"]["max_questions"] = 12
    return edit_recipe(raw, edits)


def _steps(raw: dict, root: Path) -> dict:
    return {f"{s.stage}/{s.name}": s for s in plan(Recipe.model_validate(raw), root)}


def test_plan_runs_explicit_and_implicit_side_by_side(toy_world, tmp_path):
    steps = _steps(_recipe(tmp_path), tmp_path)
    sources = ["nh2-mixtral-mini", "nh2-solar-mini"]
    assert [k for k in steps if k.split("/")[0] in ("sample", "score", "pairs", "sft", "dpo")] == [
        *(f"sample/{s}" for s in sources), "score/openchat-mini", "pairs/openchat-mini",
        "sft/openchat-mini-sft", "dpo/openchat-mini-sft-dpo"]  # fmt: skip
    score = steps["score/openchat-mini"]
    assert [i.name for i in score.inputs] == sources  # their order breaks reward ties
    dpo = steps["dpo/openchat-mini-sft-dpo"]
    assert dpo.inputs == (steps["pairs/openchat-mini"], steps["sft/openchat-mini-sft"])
    assert dpo.settings.model is None  # it starts from the SFT model, by that step's key
    assert steps["eval/openchat-mini-sft-dpo"].role == "implicit"
    assert steps["eval/openchat-mini-sft"].role == "implicit"
    # the explicit steps are mini's own: the same keys, so one run folder shares them
    mini = yaml.safe_load((RECIPES / "mini.yaml").read_text())
    mini.update(run_dir=str(tmp_path / "runs"), data={**mini["data"], "max_rows": 24})
    mini["eval"]["max_questions"] = 12
    for k, s in _steps(mini, tmp_path).items():
        assert steps[k].fp == s.fp, k


def test_implicit_keys_follow_their_settings(toy_world, tmp_path):
    fp = lambda raw: {k: s.fp for k, s in _steps(raw, tmp_path).items()}  # noqa: E731
    base = fp(_recipe(tmp_path))
    changed = lambda raw: {k for k, v in fp(raw).items() if base.get(k) != v}  # noqa: E731
    # DPO's beta: the DPO model and its evaluation, nothing upstream
    assert changed(_recipe(tmp_path, **{"implicit.dpo.beta": 0.5})) == {
        "dpo/openchat-mini-sft-dpo", "eval/openchat-mini-sft-dpo"}  # fmt: skip
    # the recipe's seed trains every model again but shares the samples (as the captures)
    diff = changed(_recipe(tmp_path, seed=3))
    assert {"sft/openchat-mini-sft", "dpo/openchat-mini-sft-dpo"} <= diff
    assert not any(k.startswith(("sample/", "score/", "pairs/", "capture/")) for k in diff)
    # the sampling seed: every implicit step, no explicit one
    diff = changed(_recipe(tmp_path, **{"implicit.sample.seed": 1}))
    assert "sample/nh2-solar-mini" in diff and "pairs/openchat-mini" in diff
    assert not any(k.startswith(("capture/", "train/", "merge/")) for k in diff)
    # the split: pairs onwards
    diff = changed(_recipe(tmp_path, **{"implicit.pairs.sft_share": 0.5}))
    assert "pairs/openchat-mini" in diff and not any(k.startswith("sample/") for k in diff)


def test_implicit_alone_and_its_options(toy_world, tmp_path):
    alone = _steps(_recipe(tmp_path, explicit=False), tmp_path)
    # the CLM baseline still trains on the pivot's capture; no source is captured or merged
    assert {k.split("/")[0] for k in alone} == {"capture", "train", "sample", "score", "pairs",
                                                "sft", "dpo", "eval"}  # fmt: skip
    assert [k for k in alone if k.startswith(("capture/", "train/"))] == [
        "capture/openchat-mini", "train/openchat-mini-clm"]  # fmt: skip
    raw = _recipe(tmp_path, explicit=False, **{"train.clm_baseline": False,
                                               "implicit.include_pivot": True,
                                               "implicit.sft": None})  # fmt: skip
    steps = _steps(raw, tmp_path)
    assert not any(k.startswith(("capture/", "train/")) for k in steps)
    assert "sample/openchat-mini" in steps  # the pivot samples too (on-policy)
    dpo = steps["dpo/openchat-mini-dpo"]  # DPO from the pivot itself
    assert dpo.inputs == (steps["pairs/openchat-mini"],) and dpo.settings.model_id


def test_dpo_starts_from_each_model_asked_explicit_then_dpo_included(toy_world, tmp_path):
    steps = _steps(_recipe(tmp_path, **{"implicit.dpo_from": ["sft", "varm", "pivot"]}), tmp_path)
    pairs = steps["pairs/openchat-mini"]
    assert steps["dpo/openchat-mini-sft-dpo"].inputs == (pairs, steps["sft/openchat-mini-sft"])
    # explicit fusion, then DPO: the VaRM merge is the starting model (and the reference)
    assert steps["dpo/openchat-mini-varm-dpo"].inputs == (pairs, steps["merge/openchat-mini-varm"])
    assert steps["dpo/openchat-mini-dpo"].inputs == (pairs,)
    fps = {steps[f"dpo/{n}"].fp for n in ("openchat-mini-sft-dpo", "openchat-mini-varm-dpo",
                                          "openchat-mini-dpo")}  # fmt: skip
    assert len(fps) == 3
    assert all(steps[f"eval/{n}"].role == "implicit" for n in ("openchat-mini-varm-dpo",
                                                               "openchat-mini-dpo"))  # fmt: skip


def test_implicit_section_errors_are_one_line(toy_world, tmp_path, capsys):
    for edits, needle in [
        ({"implicit.sft": None, "implicit.dpo": None}, "implicit: sft and dpo are both null"),
        ({"implicit.score": {"reward": "hf"}}, "implicit.score: reward hf needs a reward model"),
        ({"implicit.sample.seed": -1}, "implicit.sample.seed"),
        ({"implicit.dpo_from": ["slerp"]}, "implicit.dpo_from: 'slerp' is not sft, pivot or a merge"),
        ({"implicit.dpo_from": ["sft"], "implicit.sft": None}, "dpo_from: sft, but sft is null"),
        ({"explicit": False, "implicit.dpo_from": ["varm"]}, "(none: explicit is off)"),
        ({"implicit.prompts": str(tmp_path / "none.jsonl")}, "implicit.prompts: "),
        ({"implicit.score": {"reward": "hf", "reward_model": str(tmp_path / "rm")}},
         "implicit.score.reward_model: "),
    ]:  # fmt: skip
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump(_recipe(tmp_path, **edits)))
        assert main(["run", str(path), "--dry-run"]) == 2, edits
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, (edits, err)


def test_paper_implicit_recipe_dry_run_needs_no_network(capsys):
    path = str(RECIPES / "fusechat3-8b.yaml")
    assert main(["recipe", "check", path]) == 0
    assert main(["run", path, "--dry-run"]) == 0
    out = capsys.readouterr().out
    for stage in ("sample", "score", "pairs", "sft", "dpo"):
        assert any(line.split()[1:2] == [stage] for line in out.splitlines()), stage
    assert "capture" not in out.split("estimate:")[0]  # implicit fusion alone
    assert "20,000 responses" in out and "length" not in out.split("estimate:")[1].split("\n")[0]


@pytest.mark.slow
def test_implicit_recipe_end_to_end_then_cached(toy_world, tmp_path):
    raw = _recipe(tmp_path, explicit=False, **{"train.clm_baseline": False})
    path = tmp_path / "implicit.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path)]) == 0
    summary = json.loads((tmp_path / "runs" / "mini" / "summary.json").read_text())
    roles = {n: m["role"] for n, m in summary["models"].items()}
    assert roles["openchat-mini-sft"] == roles["openchat-mini-sft-dpo"] == "implicit"
    for name in ("openchat-mini-sft", "openchat-mini-sft-dpo"):
        assert summary["scores"][name]["nll/char"] > 0
    b = summary["budget"]
    assert b["sample/nh2-mixtral-mini"]["responses"] == 24 * 2
    assert b["sample/nh2-mixtral-mini"]["tokens_generated"] > 0
    assert b["sft/openchat-mini-sft"]["steps"] == 2 == b["dpo/openchat-mini-sft-dpo"]["steps"]
    assert main(["run", str(path)]) == 0  # a rerun reuses every finished step
    again = json.loads((tmp_path / "runs" / "mini" / "summary.json").read_text())
    assert all(v == 0 for v in again["seconds"].values()) and again["scores"] == summary["scores"]

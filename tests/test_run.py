"""`fusechat run`: plans, cache keys, the mini recipe end to end, and one-line errors."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import edit_recipe

from fusechat.cli import main
from fusechat.recipe import Recipe
from fusechat.run import plan

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_paper_recipe_dry_run_needs_no_network(capsys):
    assert main(["recipe", "check", str(RECIPES / "fusechat-7b.yaml")]) == 0
    assert main(["run", str(RECIPES / "fusechat-7b.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for stage, name in [
        ("capture", "nh2-mixtral-8x7b"),
        ("align", "nh2-solar-10.7b"),
        ("train", "openchat-3.5--nh2-mixtral-8x7b"),
        ("train", "openchat-3.5-clm"),
        ("merge", "openchat-3.5-varm"),
        ("eval", "openchat-3.5-sce"),
    ]:
        assert any(stage in line and name in line for line in out.splitlines()), (stage, name)


def _mini(tmp_path: Path, **edits) -> dict:
    raw = yaml.safe_load((RECIPES / "mini.yaml").read_text())
    raw["run_dir"] = str(tmp_path / "runs")
    raw["data"]["max_rows"] = 160
    raw["train"].update(max_steps=6, batch_size=16, micro_batch_size=16, save_steps=3)
    raw["eval"]["max_questions"] = 24
    return edit_recipe(raw, edits)


def _fps(raw: dict, root: Path) -> dict[str, str]:
    return {f"{s.stage}/{s.name}": s.fp for s in plan(Recipe.model_validate(raw), root)}


def test_cache_keys_change_when_and_only_when_inputs_change(toy_world, tmp_path):
    base = _fps(_mini(tmp_path), tmp_path)
    assert base == _fps(_mini(tmp_path), tmp_path)  # stable
    changed = lambda raw: {k for k, v in _fps(raw, tmp_path).items() if base[k] != v}  # noqa: E731
    # an eval setting touches only eval steps
    assert changed(_mini(tmp_path, **{"eval.max_new_tokens": 16})) == {
        k for k in base if k.startswith("eval/")
    }
    # the vocabulary mapping: every align step and everything downstream, never a capture
    diff = changed(_mini(tmp_path, **{"align.method": "mined"}))
    assert not any(k.startswith("capture/") for k in diff)
    assert {k for k in base if k.startswith(("align/", "fuse/", "merge/"))} <= diff
    assert "train/openchat-mini-clm" not in diff  # the CLM baseline reads the capture only
    assert "eval/openchat-mini" not in diff  # nor do the input models change
    # lambda: the fused targets, not the CLM baseline
    diff = changed(_mini(tmp_path, **{"train.lambda": 0.5}))
    assert "train/openchat-mini--nh2-mixtral-mini" in diff
    assert "train/openchat-mini-clm" not in diff
    # the seed: every training, merge and their evaluations; never a capture, an alignment,
    # a fusion or an input model's evaluation (the study shares those across seeds)
    diff = changed(_mini(tmp_path, seed=1))
    assert {k for k in base if k.startswith(("train/", "merge/"))} <= diff
    assert not any(k.startswith(("capture/", "align/", "fuse/")) for k in diff)
    assert "eval/openchat-mini" not in diff and "eval/openchat-mini-clm" in diff


@pytest.mark.slow
def test_mini_recipe_end_to_end_then_cached_then_partial(toy_world, tmp_path, capsys):
    raw = _mini(tmp_path)
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path)]) == 0
    root = tmp_path / "runs" / "mini"
    summary = json.loads((root / "summary.json").read_text())
    assert set(summary["scores"]) == {
        "openchat-mini", "nh2-mixtral-mini", "nh2-solar-mini", "openchat-mini--nh2-mixtral-mini",
        "openchat-mini--nh2-solar-mini", "openchat-mini-clm", "openchat-mini-varm",
        "openchat-mini-linear", "openchat-mini-ties",
    }  # fmt: skip
    for sc in summary["scores"].values():
        assert 1 <= sc["average"] <= 10 and sc["nll/char"] > 0
    assert "openchat-mini-varm" in capsys.readouterr().out
    # everything cached the second time
    assert main(["run", str(path)]) == 0
    again = json.loads((root / "summary.json").read_text())
    assert all(v == 0 for v in again["seconds"].values()) and again["scores"] == summary["scores"]
    # one stage's output removed: that step and what follows it rerun, nothing else
    varm = next((root / "merge").glob("openchat-mini-varm-*[!l]"))
    shutil.rmtree(varm)
    assert main(["run", str(path)]) == 0
    third = json.loads((root / "summary.json").read_text())
    reran = {k for k, v in third["seconds"].items() if v > 0}
    assert reran == {"merge/openchat-mini-varm"}  # its eval key is unchanged: same model
    assert third["scores"] == summary["scores"]


def test_errors_are_one_line(toy_world, tmp_path, capsys):
    raw = _mini(tmp_path)
    bad = copy.deepcopy(raw)
    bad["models"]["sources"][0]["path"] = str(tmp_path / "nowhere")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    capsys.readouterr()
    assert main(["run", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nowhere: no such folder" in err and "\n" not in err
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(raw))
    assert main(["run", str(tmp_path / "ok.yaml"), "--only", "train"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not done" in err and "\n" not in err
    assert not (tmp_path / "runs" / "mini" / "train").exists()


@pytest.mark.slow
def test_kill_during_training_then_rerun_gives_the_same_merged_model(toy_world, tmp_path):
    import subprocess
    import sys
    import time

    import torch
    from safetensors.torch import load_file

    merged = {}
    for label in ("clean", "killed"):
        raw = _mini(tmp_path / label, **{"eval.kind": "none", "train.clm_baseline": False})
        raw["train"].update(save_steps=2, max_steps=6)
        raw["merge"]["methods"] = [{"name": "varm", "method": "varm"}]
        path = tmp_path / f"{label}.yaml"
        path.write_text(yaml.safe_dump(raw))
        root = tmp_path / label / "runs" / "mini"
        if label == "killed":
            proc = subprocess.Popen([sys.executable, "-m", "fusechat.cli", "run", str(path)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            deadline = time.time() + 300
            while not list(root.glob("train/*.ckpt/checkpoint-2/trainer_state.json")):
                assert time.time() < deadline and proc.poll() is None, "no checkpoint to kill at"
                time.sleep(0.05)
            proc.kill()
            proc.wait()
            assert not list(root.glob("merge/*/manifest.json"))
        assert main(["run", str(path)]) == 0
        (out,) = [p for p in root.glob("merge/*-varm-*") if p.is_dir()]
        merged[label] = load_file(out / "model.safetensors")
    for k, v in merged["clean"].items():
        torch.testing.assert_close(v, merged["killed"][k], rtol=1e-5, atol=1e-6)


def test_pivot_chat_template_is_handed_to_the_sources(toy_world, tmp_path):
    """data.template 'tokenizer': every model renders with the pivot tokenizer's chat template,
    so their captures align (the same text per row)."""
    raw = _mini(tmp_path, **{"data.template": "tokenizer", "data.max_rows": 32})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path), "--only", "capture"]) == 0
    assert main(["run", str(path), "--only", "align"]) == 0
    root = tmp_path / "runs" / "mini"
    for m in root.glob("align/*/manifest.json"):
        assert json.loads(m.read_text())["stats"]["coverage"] > 0.5

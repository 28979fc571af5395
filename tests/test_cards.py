"""Model cards (``fusechat.cards``): built from hand-made manifests and read back by
``huggingface_hub.ModelCard.load``; written by ``fusechat train`` and ``fusechat merge`` on the
toy world, byte-identical when made again from the same inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

from fusechat.cards import (
    lineage,
    merge_card,
    study_card,
    training_card,
    weight_summary,
    write_card,
)
from fusechat.errors import FusechatError
from fusechat.io import write_json

CFG = {"lam": 0.5, "lr": 2e-3, "scheduler": "cosine", "seed": 0, "fusion_loss": "ce",
       "temperature": 1.0, "lora": None}  # fmt: skip
STATS = {"steps": 24, "effective_batch": 8, "train_loss": 1.25, "seconds": 3.1,
         "resumed_from": None}  # fmt: skip


def _load(folder: Path, text: str) -> ModelCard:
    folder.mkdir(parents=True, exist_ok=True)
    return ModelCard.load(write_card(folder, text))


def _train_info(**kw) -> dict:
    lin = {"sources": ["/m/nh2-mixtral-mini"], "method": "minCE", "corpus": "/c/train.jsonl"}
    log = {"last": {"step": 24, "loss": 1.1, "clm_loss": 1.3, "fusion_loss": 0.9},
           "heldout": {"step": 24, "tokens": 9000, "heldout_nll_per_char": 0.42}}  # fmt: skip
    return {"base_model": "/m/openchat-mini", "data": "runs/fuse/x", "config": CFG,
            "stats": STATS, "lineage": lin, "log": log, **kw}  # fmt: skip


def test_training_card_metadata_and_body(tmp_path):
    text = training_card("t", "train", _train_info())
    card = _load(tmp_path / "t", text)
    assert card.data.base_model == "/m/openchat-mini"
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert {"fusechat", "knowledge-fusion", "fusion-target"} <= set(card.data.tags)
    assert card.data.datasets is None  # a local corpus is named in the text only
    assert "0.5 x CLM + 0.5 x fusion" in text and "minCE" in text and "/c/train.jsonl" in text
    assert "| 0.4200 |" in text and "eval/<model>-<key>.json" in text
    # the run's time and resumption never reach the card: same inputs, same bytes
    again = training_card("t", "train", _train_info(stats={**STATS, "seconds": 99.0,
                                                           "resumed_from": "ckpt/checkpoint-6"}))  # fmt: skip
    assert again == text and "3.1" not in text


def test_clm_baseline_hub_corpus_and_hub_cache_base(tmp_path):
    snap = "/h/hub/models--openchat--openchat-3.5-0106/snapshots/abc123"
    lin = {"corpus": "org/chats", "datasets": ["org/chats"]}
    info = _train_info(base_model=snap, config={**CFG, "lam": 1.0}, lineage=lin, log={})
    text = training_card("clm", "train", info)
    card = _load(tmp_path / "clm", text)
    assert card.data.base_model == "openchat/openchat-3.5-0106"
    assert card.data.datasets == ["org/chats"]
    assert "clm-baseline" in card.data.tags and "CLM baseline" in text
    assert "Scores at the end" not in text  # no log, no scores


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_implicit_fusion_cards(stage, tmp_path):
    cfg = {"lr": 1e-6, "seed": 0, "scheduler": "cosine", "beta": 0.01, "loss": "sigmoid",
           "lora": {"r": 4, "alpha": None}}  # fmt: skip
    log = {"last": {"step": 3, "loss": 0.69, "rewards/accuracies": 0.75}}
    info = {"base_model": "org/start", "data": "pairs/dpo.jsonl", "config": cfg, "stats": STATS,
            "lineage": {"sources": ["org/a", "org/b"]}, "log": log}  # fmt: skip
    text = training_card(f"m-{stage}", stage, info)
    card = _load(tmp_path / stage, text)
    assert card.data.base_model == "org/start"
    assert {stage, "implicit-fusion", "lora", "trl"} <= set(card.data.tags)
    assert "`org/a`, `org/b`" in text and "r 4, alpha 8" in text
    assert ("beta 0.01" in text) == (stage == "dpo")


def test_merge_card_lists_every_model_and_the_varm_weights(tmp_path):
    weights = {"a.weight": {"t1": 0.25, "t2": 0.75}, "b.weight": {"t1": 0.75, "t2": 0.25}}
    report = {"merge_method": "varm", "base_model": "/m/pivot", "models": ["t1", "t2"],
              "seconds": 1.23, "warnings": ["w!"], "weights": weights,
              "mean_weights": {"t1": 0.5, "t2": 0.5}, "heatmap": "varm_weights.png",
              "varm": {"granularity": "matrix", "statistic": "square", "temperature": 0.0},
              "weight_space": {"relative_delta": {"t1": 0.1, "t2": 0.2},
                               "delta_cosine": {"t1 ~ t2": 0.9}}}  # fmt: skip
    config = {"merge_method": "varm", "base_model": "/m/pivot", "models": [{"model": "t1"}]}
    text = merge_card("m", report, config)
    card = _load(tmp_path / "m", text)
    assert card.data.base_model == ["/m/pivot", "t1", "t2"]
    assert {"merge", "mergekit", "varm", "fusechat"} <= set(card.data.tags)
    assert "| `t1` | 0.5000 | 0.2500 | 0.7500 |" in text and "1.23" not in text
    assert "- w!" in text and "merge_method: varm" in text and "0.9000" in text
    assert weight_summary(weights)["t2"] == (0.5, 0.25, 0.75)
    assert merge_card("m", {**report, "seconds": 9.0}, config) == text


def test_study_card_is_read_as_a_card(tmp_path):
    result = {"pairs": ["0", "1"], "worlds": [], "overrides": ["train.lr=1e-3"],
              "models": {"pivot": {"role": "pivot"}, "clm": {"role": "clm"}}}  # fmt: skip
    text = study_card("study-abc", "recipes/mini.yaml", result, "model role\npivot pivot\n")
    card = _load(tmp_path / "study-abc", text)
    assert "study" in card.data.tags and card.data.library_name is None
    assert "```text\nmodel role\npivot pivot\n```" in text and "`train.lr=1e-3`" in text


def test_bad_inputs_are_one_line(tmp_path):
    with pytest.raises(FusechatError, match="unknown training stage 'capture'"):
        training_card("x", "capture", _train_info())
    with pytest.raises(FusechatError, match="not a folder"):
        write_card(tmp_path / "missing", "text")


def test_lineage_of_a_pairs_set(tmp_path):
    (tmp_path / "pairs").mkdir()
    (tmp_path / "score").mkdir()
    write_json(tmp_path / "score" / "manifest.json", {"key": {"stage": "score"},
               "stats": {"models": [{"model": "org/a"}, {"model": "org/b"}]}})  # fmt: skip
    write_json(tmp_path / "pairs" / "manifest.json", {"key": {"stage": "pairs"},
               "stats": {"data": {"path": "org/prompts"}, "score": str(tmp_path / "score")}})  # fmt: skip
    got = lineage(tmp_path / "pairs" / "dpo.jsonl")
    assert got == {"corpus": "org/prompts", "sources": ["org/a", "org/b"],
                   "datasets": ["org/prompts"]}  # fmt: skip
    assert lineage(tmp_path / "nothing") == {}


# --------------------------------------------------------------------------- end to end


def _cfg(**kw):
    from fusechat.configs import TrainConfig

    base = dict(lam=0.5, lr=2e-3, max_steps=2, batch_size=8, micro_batch_size=8,
                warmup_ratio=0.0, gradient_checkpointing=False, precision="fp32",
                save_steps=1000, logging_steps=1)  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(toy_world, stages, tmp_path_factory) -> dict:
    """A fusion target (2 steps on the fused folder) and a CLM baseline (2 steps on the
    pivot's capture), each from the pivot."""
    from fusechat.train import train

    d = tmp_path_factory.mktemp("cards")
    pivot = str(toy_world / "openchat-mini")
    train(pivot, stages / "fused", d / "target", _cfg())
    train(pivot, stages / "cap-pivot", d / "clm", _cfg(lam=1.0))
    return {"pivot": pivot, "target": d / "target", "clm": d / "clm"}


def test_train_writes_a_card_the_hub_reads(trained, toy_world):
    card = ModelCard.load(trained["target"] / "README.md")
    assert card.data.base_model == trained["pivot"]
    assert {"fusechat", "fusion-target"} <= set(card.data.tags)
    assert card.data.library_name == "transformers"
    text = (trained["target"] / "README.md").read_text()
    assert "# target\n" in text and ".tmp" not in text
    assert str(toy_world / "nh2-mixtral-mini") in text and "minCE" in text  # its source
    assert "loss (training, last logged, step 2)" in text
    clm = ModelCard.load(trained["clm"] / "README.md")
    assert clm.data.base_model == trained["pivot"] and "clm-baseline" in clm.data.tags


def test_merge_writes_a_card_the_hub_reads_and_again_the_same(trained, tmp_path):
    from fusechat.cli import main

    cfg = {"merge_method": "varm", "base_model": trained["pivot"], "dtype": "float32",
           "models": [{"model": str(trained["target"])}, {"model": str(trained["clm"])}]}  # fmt: skip
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "merged"
    assert main(["merge", str(tmp_path / "merge.yaml"), str(out), "--no-plot"]) == 0
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == [trained["pivot"], str(trained["target"]), str(trained["clm"])]
    assert {"fusechat", "merge", "varm"} <= set(card.data.tags)
    text = (out / "README.md").read_text()
    assert "# merged\n" in text and ".tmp" not in text and "mean weight" in text
    assert json.loads((out / "manifest.json").read_text())["mean_weights"]
    first = (out / "README.md").read_bytes()
    assert main(["merge", str(tmp_path / "merge.yaml"), str(out), "--overwrite", "--no-plot"]) == 0
    assert (out / "README.md").read_bytes() == first


def test_study_folder_gets_a_card(monkeypatch, tmp_path):
    """``run_study`` (its recipe runs replaced by hand-made summaries) leaves a README.md beside
    study.json and table.txt, the same bytes when run again."""
    from fusechat import run
    from fusechat.study.run import run_study

    def fake_run(recipe, overrides=(), quiet=False):
        seed = int(overrides[-1].split("=")[1])
        scores = {"pivot": {"nll/char": 1.0, "average": 2.0},
                  "clm": {"nll/char": 0.30 + seed / 100, "average": 5.0},
                  "t1": {"nll/char": 0.20 + seed / 50, "average": 5.5}}  # fmt: skip
        roles = {"pivot": "pivot", "clm": "clm", "t1": "target"}
        return {
            "scores": scores,
            "seconds": {},
            "models": {n: {"role": r, "path": str(tmp_path / n)} for n, r in roles.items()},
        }

    monkeypatch.setattr(run, "run_recipe", fake_run)
    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "mini.yaml")
    sets = [f"run_dir={tmp_path}", "train.heldout=null"]
    result = run_study(recipe, [0, 1], sets)
    readme = Path(result["folder"]) / "README.md"
    card = ModelCard.load(readme)
    assert "study" in card.data.tags and card.data.base_model is None
    text = readme.read_text()
    assert (Path(result["folder"]) / "table.txt").read_text().strip() in text
    assert f"# {Path(result['folder']).name}\n" in text and "| `t1` | target |" in text
    run_study(recipe, [0, 1], sets)
    assert readme.read_text() == text

"""The study's statistics on hand-made run summaries, and --set overrides."""

from pathlib import Path

import pytest

from fusechat.errors import FusechatError
from fusechat.recipe import apply_override
from fusechat.study import (
    analyse,
    format_table,
    mean_std,
    same_tokens,
    token_efficiency,
    tokens_to_reach,
)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_tokens_to_reach_interpolates_and_reports_never():
    assert tokens_to_reach([0, 100, 200], [2.0, 1.0, 0.5], 1.0) == 100
    assert tokens_to_reach([0, 100, 200], [2.0, 1.0, 0.5], 0.75) == pytest.approx(150)
    assert tokens_to_reach([0, 100], [2.0, 1.0], 0.9) is None


def test_token_efficiency_is_the_ratio_of_tokens_to_the_clm_final_loss():
    clm = {"tokens": [0, 100, 200, 300, 400], "loss": [2.0, 1.5, 1.2, 1.1, 1.0]}
    fused = {"tokens": [0, 100, 200, 300, 400], "loss": [2.0, 1.2, 1.0, 0.9, 0.8]}
    assert token_efficiency(clm, fused) == pytest.approx(400 / 200)
    assert token_efficiency(fused, clm) is None  # CLM never reaches the fused final loss


def _run(clm, t1, t2, merge, curves=True):
    scores = {"pivot": {"nll/char": 1.0, "average": 2.0},
              "clm": {"nll/char": clm, "average": 5.0},
              "t1": {"nll/char": t1, "average": 5.5}, "t2": {"nll/char": t2, "average": 5.2},
              "varm": {"nll/char": merge, "average": 5.6}}  # fmt: skip
    roles = {"pivot": "pivot", "clm": "clm", "t1": "target", "t2": "target", "varm": "merge"}
    c = {"tokens": [0, 10, 20], "loss": [1.0, 0.5, clm]}
    run = {"scores": scores, "models": {n: {"role": r, "path": ""} for n, r in roles.items()}}
    if curves:
        run["curves"] = {"clm": c, "t1": {"tokens": [0, 10, 20], "loss": [1.0, 0.4, t1]},
                         "t2": {"tokens": [0, 10, 20], "loss": [1.0, 0.6, t2]}}  # fmt: skip
    return run


T_975_DF2 = 4.302652729911275  # Student's t, 97.5% quantile, 2 degrees of freedom (tables)


def test_analyse_pairs_each_model_with_its_own_clm():
    """Three (world, seed) pairs with unequal spreads: the gains are paired per pair, and
    the interval is the t interval of the per-pair differences (hand-computed)."""
    runs = {"w0/s0": _run(0.30, 0.20, 0.29, 0.25), "w0/s1": _run(0.32, 0.22, 0.31, 0.24),
            "w1/s0": _run(0.31, 0.25, 0.32, 0.26)}  # fmt: skip
    r = analyse(runs)
    assert r["pairs"] == ["w0/s0", "w0/s1", "w1/s0"]
    assert r["models"]["clm"]["nll/char"] == pytest.approx(mean_std([0.30, 0.32, 0.31]))
    t1, t2 = r["targets"]["t1"], r["targets"]["t2"]
    # t1 gains 0.10, 0.10, 0.06: mean 0.08667, sd 0.023094
    half = T_975_DF2 * 0.0230940 / 3**0.5
    assert t1["vs_clm"]["mean"] == pytest.approx(0.26 / 3)
    assert t1["vs_clm"]["ci"] == pytest.approx([0.0866667 - half, 0.0866667 + half], abs=1e-6)
    assert t1["vs_clm"]["won"] == 3 and t1["beats_clm"]
    # t2 gains 0.01, 0.01, -0.01: won 2 of 3, the interval holds 0
    assert t2["vs_clm"]["won"] == 2 and t2["vs_clm"]["ci"][0] < 0 and t2["beats_clm"] is False
    # unpaired means would hide it: CLM's spread across pairs is as large as the gain
    assert r["best_target"] == "t1"
    varm = r["merges"]["varm"]
    # best target minus merge: -0.05, -0.02, -0.01 (the merge is worse in every pair)
    assert varm["vs_best_target"]["mean"] == pytest.approx(-0.08 / 3)
    assert varm["vs_best_target"]["won"] == 0
    assert varm["vs_clm"]["per_pair"] == pytest.approx([0.05, 0.08, 0.05])
    assert varm["beats_clm"]
    # -0.0267 +- 4.30 * 0.0208 / sqrt 3 reaches 0: as good as the best target, as far as 3 pairs tell
    assert varm["vs_best_target"]["ci"][1] > 0 and varm["at_least_as_good"]
    assert t1["token_efficiency"]["n"] == 3 and t1["token_efficiency"]["mean"] > 1
    assert same_tokens(runs, "clm")
    runs["w0/s1"]["curves"]["t1"]["tokens"] = [0, 11, 20]
    assert not same_tokens(runs, "clm")


def test_one_pair_gives_no_verdict():
    r = analyse({0: _run(0.30, 0.20, 0.29, 0.25)})
    t1 = r["targets"]["t1"]
    assert t1["vs_clm"]["ci"] is None and t1["beats_clm"] is None
    assert r["merges"]["varm"]["at_least_as_good"] is None

    assert "no verdict from one pair" in format_table(r) and "beats CLM" not in format_table(r)


def test_paired_interval_against_a_plain_loop():
    import math
    import random

    from fusechat.study import paired

    rng = random.Random(0)
    d = [rng.gauss(0.01, 0.02) for _ in range(15)]
    m = sum(d) / 15
    s = math.sqrt(sum((x - m) ** 2 for x in d) / 14)
    t_975_df14 = 2.1447866879169273
    p = paired(d)
    assert p["ci"] == pytest.approx(
        [m - t_975_df14 * s / math.sqrt(15), m + t_975_df14 * s / math.sqrt(15)]
    )
    assert p["won"] == sum(x > 0 for x in d) and p["n"] == 15


def test_world_overrides_move_every_toy_path(monkeypatch, tmp_path):
    from fusechat.study import world_folder, world_overrides

    monkeypatch.setenv("FUSECHAT_CACHE", str(tmp_path))
    raw = {"models": {"pivot": {"path": "${FUSECHAT_CACHE}/toy/openchat-mini"},
                      "sources": [{"path": "${FUSECHAT_CACHE}/toy/nh2-mixtral-mini"},
                                  {"path": "/elsewhere/model"}]},
           "data": {"path": f"{tmp_path}/toy/corpus/train.jsonl"},
           "train": {"heldout": "${FUSECHAT_CACHE}/toy/corpus/heldout.jsonl", "lr": 0.1},
           "eval": {"questions": "${FUSECHAT_CACHE}/toyish/q.jsonl"}}  # fmt: skip
    new = world_folder(3)
    assert new == tmp_path / "toy-world-3" and world_folder(0) == tmp_path / "toy"
    assert world_overrides(raw, 3) == [
        f"models.pivot.path={new}/openchat-mini",
        f"models.sources[0].path={new}/nh2-mixtral-mini",
        f"data.path={new}/corpus/train.jsonl",
        f"train.heldout={new}/corpus/heldout.jsonl",
    ]
    assert world_overrides({"models": {"pivot": {"path": "/x"}}}, 3) == []


def test_set_overrides():
    raw = {"train": {"lr": 1.0}, "models": {"sources": [{"path": "a"}]}}
    apply_override(raw, "train.lambda=0.5")
    apply_override(raw, "models.sources[0].dtype=float32")
    apply_override(raw, "merge.methods=[{name: v, method: varm}]")
    assert raw["train"]["lambda"] == 0.5 and raw["models"]["sources"][0]["dtype"] == "float32"
    assert raw["merge"]["methods"] == [{"name": "v", "method": "varm"}]
    for bad, msg in [("nokey", "KEY=VALUE"), ("models.sources[3].x=1", "no item 3"),
                     ("train.lr.x=1", "not a section"), ("seed=[1", "not valid YAML")]:  # fmt: skip
        with pytest.raises(FusechatError, match=msg):
            apply_override(raw, bad)


def test_the_table_shows_every_model_by_skill():
    from fusechat.study import format_table

    runs = {0: _run(0.30, 0.20, 0.29, 0.25), 1: _run(0.32, 0.22, 0.31, 0.24)}
    for seed, r in runs.items():
        for sc in r["scores"].values():
            sc["nll/char facts"] = sc["nll/char"] / 2 + seed / 100
            sc["nll/char glossary"] = sc["nll/char"] * 2
    table = format_table(analyse(runs))
    assert "nats/char by skill: facts, glossary" in table
    block = table.split("nats/char by skill")[1].splitlines()[1:6]
    assert [x.split()[0] for x in block] == ["pivot", "clm", "t1", "t2", "varm"]
    # t1: facts 0.10 and 0.12 over the seeds, glossary 0.40 and 0.44
    assert "0.1100 ± 0.0141" in block[2] and "0.4200 ± 0.0283" in block[2]
    # t1's gain over CLM by skill: facts 0.05 in both pairs, glossary 0.20 in both
    r = analyse(runs)["targets"]["t1"]["by_skill"]
    assert r == pytest.approx({"facts": 0.05, "glossary": 0.20})
    assert "largest gain on glossary" in table


def test_the_self_distillation_control_is_paired_like_the_targets(tmp_path):
    """The control run's one target joins its pair as ``self-distillation``; each target and
    merge is compared with it pair by pair, and the table says so."""
    from fusechat.study import CONTROL, add_control, format_table

    runs = {}
    for i, (clm, t1, t2, merge, selfd) in enumerate(
        [
            (0.30, 0.20, 0.29, 0.25, 0.28),
            (0.32, 0.22, 0.31, 0.24, 0.30),
            (0.31, 0.25, 0.32, 0.26, 0.30),
        ]
    ):
        run = _run(clm, t1, t2, merge)
        control = {"models": {"pivot": {"role": "pivot", "path": ""}, "clm": {"role": "clm", "path": ""},
                              "pivot--pivot-self": {"role": "target", "path": str(tmp_path)}},
                   "scores": {"pivot--pivot-self": {"nll/char": selfd, "average": 5.1}}}  # fmt: skip
        add_control(run, control)
        runs[i] = run
    assert runs[0]["models"][CONTROL]["role"] == "control" and runs[0]["curves"][CONTROL] is None
    c = analyse(runs)["control"]
    assert c["name"] == CONTROL
    assert c["vs_clm"]["per_pair"] == pytest.approx([0.02, 0.02, 0.01])
    # t2 is worse than the control in every pair, though it beats CLM in two
    assert c["targets"]["t2"]["vs_control"]["per_pair"] == pytest.approx([-0.01, -0.01, -0.02])
    assert c["merges"]["varm"]["per_pair"] == pytest.approx([0.03, 0.06, 0.04])
    table = format_table(analyse(runs))
    assert f"{CONTROL} (the pivot its own source) over CLM: +0.0167" in table
    assert f"varm over {CONTROL}: +0.0433" in table
    assert CONTROL not in analyse(runs)["targets"]  # a control is not a pairwise target


def test_self_source_makes_the_pivot_the_only_source():
    from fusechat.recipe import load_recipe
    from fusechat.study import self_source

    recipe = str(RECIPES / "mini.yaml")
    r = load_recipe(recipe, self_source(recipe, []))
    assert [s.resolved for s in r.models.sources] == [r.models.pivot.resolved]
    assert r.models.sources[0].label == f"{r.models.pivot.label}-self"
    assert r.implicit is None
    # with implicit fusion in the recipe, the control leaves it out (the pair's own run has it)
    recipe = str(RECIPES / "implicit-mini.yaml")
    assert load_recipe(recipe).implicit is not None
    assert load_recipe(recipe, self_source(recipe, [])).implicit is None


def test_implicit_models_are_paired_with_clm_the_best_target_and_each_merge():
    runs = {}
    for label, (clm, t1, t2, merge, sft) in {
        "w0/s0": (0.30, 0.20, 0.29, 0.25, 0.33), "w0/s1": (0.32, 0.22, 0.31, 0.24, 0.31),
        "w1/s0": (0.31, 0.25, 0.32, 0.26, 0.36)}.items():  # fmt: skip
        run = _run(clm, t1, t2, merge)
        run["scores"]["sft"] = {"nll/char": sft, "average": 4.0}
        run["models"]["sft"] = {"role": "implicit", "path": ""}
        run["budget"] = {"sample/src": {"tokens_generated": 100 + len(runs), "seconds": 2.0},
                         "sft/sft": {"rows": 10, "steps": 3}}  # fmt: skip
        runs[label] = run
    r = analyse(runs)
    im = r["implicit"]["sft"]
    # CLM minus implicit: -0.03, +0.01, -0.05; t1 (the best target) minus it: -0.13, -0.09, -0.11
    assert im["vs_clm"]["mean"] == pytest.approx(-0.07 / 3) and im["vs_clm"]["won"] == 1
    assert im["vs_best_target"]["mean"] == pytest.approx(-0.11) and im["vs_best_target"]["won"] == 0
    assert im["vs_merges"]["varm"]["mean"] == pytest.approx((-0.08 - 0.07 - 0.10) / 3)
    assert r["budget"] == {"sample/src": {"tokens_generated": 101.0, "seconds": 2.0},
                           "sft/sft": {"rows": 10.0, "steps": 3.0}}  # fmt: skip
    table = format_table(r)
    assert (
        "sft (implicit) over CLM: -0.0233 nats/char" in table
        and "sft (implicit) over varm" in table
    )
    assert "budget (mean per pair): sample/src tokens_generated 101" in table

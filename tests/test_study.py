"""The study's statistics on hand-made run summaries, and --set overrides."""

from pathlib import Path

import numpy as np
import pytest

from fusechat.errors import FusechatError
from fusechat.recipe import apply_override
from fusechat.study.report import format_table
from fusechat.study.stats import analyse, mean_std, same_tokens, token_efficiency, tokens_to_reach

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

    from fusechat.study.stats import paired

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
    from fusechat.study.run import world_folder, world_overrides

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
    from fusechat.study.report import format_table

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
    from fusechat.study.report import format_table
    from fusechat.study.run import CONTROL, add_control

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
    from fusechat.study.run import self_source

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


# --------------------------------------------------------------------------- every role at once


def _full_run(p: int) -> dict:
    """A pair's summary with every role: the pivot, CLM, two targets (``tb`` the better, listed
    second), a merge, the control, an implicit model, and ``extra`` (scored, not in the plan),
    two skills that move differently, curves, weight figures (not in the third pair) and a
    budget."""
    base = {"pivot": 1.20, "clm": 1.00, "ta": 0.98, "tb": 0.95, "varm": 0.94, "ctl": 0.99,
            "imp": 1.03, "extra": 1.50}  # fmt: skip
    shift = [0.0, 0.1, -0.05][p]
    scores = {}
    for m, v in base.items():
        facts = {"ta": 0.5, "tb": 0.9, "imp": 1.1}.get(m, 1.0)  # ta gains on facts, tb not
        arith = {"tb": 1.8, "ctl": 1.95, "imp": 2.05}.get(m, 2.0)  # tb gains on arithmetic
        scores[m] = {"nll/char": v + shift + (0.01 * p if m == "ta" else 0.0),
                     "nll/char arith": arith + shift, "nll/char facts": facts + shift,
                     "average": 5.0 + p}  # fmt: skip
    roles = {"pivot": "pivot", "clm": "clm", "ta": "target", "tb": "target", "varm": "merge",
             "ctl": "control", "imp": "implicit"}  # fmt: skip
    clm_curve = {"tokens": [100, 200, 300], "loss": [2.0, 1.5, 1.2]}
    # ta reaches CLM's final 1.2 at 200 tokens (CLM at 300: 1.5x), except in pair 2: never
    ta_loss = [2.0, 1.9, 1.3] if p == 2 else [1.8, 1.2, 1.1]
    out = {"models": {m: {"role": r} for m, r in roles.items()}, "scores": scores,
           "curves": {"clm": clm_curve, "ta": {"tokens": [100, 200, 300], "loss": ta_loss}},
           "budget": {"imp sft": {"rows": 400 + p, "steps": 40}}}  # fmt: skip
    if p < 2:
        out["weights"] = {"alphas": [0.0, 0.5, 1.0],
                          "relative_delta": {"ta": 0.1 + p / 10, "tb": 0.2},
                          "delta_cosine": {"ta-tb": 0.9 - p / 10},
                          "barrier": {"ta-tb": 0.01 * (p + 1)},
                          "lines": {"ta-tb": [1.0, 0.9 + p / 10, 1.0]}}  # fmt: skip
    return out


def test_every_role_of_a_study_by_hand():
    from scipy.stats import t as student

    runs = {f"w{p}/s0": _full_run(p) for p in range(3)}
    r = analyse(runs)

    def ci(d):
        d = np.asarray(d, float)
        h = student.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
        return pytest.approx([d.mean() - h, d.mean() + h], abs=1e-9)

    assert r["clm"] == "clm" and r["models"]["extra"]["role"] == ""
    assert r["models"]["ta"]["role"] == "target"
    # ta over CLM per pair: 0.02, 0.01, 0.00 (its score drifts by 0.01 a pair)
    ta = r["targets"]["ta"]
    assert ta["vs_clm"]["per_pair"] == pytest.approx([0.02, 0.01, 0.0])
    assert ta["vs_clm"]["ci"] == ci([0.02, 0.01, 0.0])
    assert ta["by_skill"] == pytest.approx({"arith": 0.0, "facts": 0.5})
    assert r["targets"]["tb"]["by_skill"] == pytest.approx({"arith": 0.2, "facts": 0.1})
    assert ta["token_efficiency_per_pair"] == pytest.approx([1.5, 1.5, None])
    assert ta["token_efficiency"] == {"mean": 1.5, "std": 0.0, "n": 2}
    assert r["targets"]["tb"]["token_efficiency"] is None  # no curve: nothing to read
    assert r["best_target"] == "tb"  # the lower mean, though listed after ta
    varm = r["merges"]["varm"]
    assert varm["vs_best_target"]["per_pair"] == pytest.approx([0.01] * 3)
    assert varm["vs_clm"]["per_pair"] == pytest.approx([0.06] * 3) and varm["beats_clm"]
    c = r["control"]
    assert c["name"] == "ctl" and c["vs_clm"]["per_pair"] == pytest.approx([0.01] * 3)
    assert c["targets"]["ta"]["vs_control"]["per_pair"] == pytest.approx([0.01, 0.0, -0.01])
    assert c["targets"]["tb"]["by_skill"] == pytest.approx({"arith": 0.15, "facts": 0.1})
    assert c["merges"]["varm"]["per_pair"] == pytest.approx([0.05] * 3)
    imp = r["implicit"]["imp"]
    assert imp["vs_clm"]["per_pair"] == pytest.approx([-0.03] * 3)
    assert imp["vs_best_target"]["per_pair"] == pytest.approx([-0.08] * 3)
    assert imp["vs_merges"]["varm"]["per_pair"] == pytest.approx([-0.09] * 3)
    assert imp["by_skill"] == pytest.approx({"arith": -0.05, "facts": -0.1})
    assert r["budget"] == {"imp sft": {"rows": 401.0, "steps": 40.0}}
    w = r["weights"]  # pooled over the two pairs that measured them
    assert w["alphas"] == [0.0, 0.5, 1.0]
    assert w["relative_delta"]["ta"] == pytest.approx(mean_std([0.1, 0.2]))
    assert w["delta_cosine"]["ta-tb"] == pytest.approx(mean_std([0.9, 0.8]))
    assert w["barrier"]["ta-tb"] == pytest.approx(mean_std([0.01, 0.02]))
    assert w["lines"]["ta-tb"] == pytest.approx([1.0, 0.95, 1.0])


def test_the_table_of_every_role_reads_as_written():
    """The whole table a study prints, checked line by line against the figures above."""
    table = format_table(analyse({f"w{p}/s0": _full_run(p) for p in range(3)}))
    assert table.splitlines() == EXPECTED_TABLE.splitlines()


EXPECTED_TABLE = """\
3 (world, seed) pairs: w0/s0, w1/s0, w2/s0
model      role             nats/char       judge average
pivot     pivot       1.2167 ± 0.0764        6.00 ± 1.00
clm         clm       1.0167 ± 0.0764        6.00 ± 1.00
ta       target       1.0067 ± 0.0737        6.00 ± 1.00
tb       target       0.9667 ± 0.0764        6.00 ± 1.00
varm      merge       0.9567 ± 0.0764        6.00 ± 1.00
ctl     control       1.0067 ± 0.0764        6.00 ± 1.00
imp    implicit       1.0467 ± 0.0764        6.00 ± 1.00
extra                 1.5167 ± 0.0764        6.00 ± 1.00
nats/char by skill: arith, facts
  pivot  2.0167 ± 0.0764   1.0167 ± 0.0764
  clm    2.0167 ± 0.0764   1.0167 ± 0.0764
  ta     2.0167 ± 0.0764   0.5167 ± 0.0764
  tb     1.8167 ± 0.0764   0.9167 ± 0.0764
  varm   2.0167 ± 0.0764   1.0167 ± 0.0764
  ctl    1.9667 ± 0.0764   1.0167 ± 0.0764
  imp    2.0667 ± 0.0764   1.1167 ± 0.0764
  extra  2.0167 ± 0.0764   1.0167 ± 0.0764
paired gains (positive: better than the reference, in the same pair):
  ta over CLM: +0.0100 nats/char, 95% CI [-0.0148, +0.0348], won 2 of 3: does not beat CLM; token efficiency 1.50x ± 0.00; largest gain on facts
  tb over CLM: +0.0500 nats/char, 95% CI [+0.0500, +0.0500], won 3 of 3: beats CLM; token efficiency not reached; largest gain on arith
  varm over CLM: +0.0600 nats/char, 95% CI [+0.0600, +0.0600], won 3 of 3: beats CLM
  varm over the best target (tb): +0.0100 nats/char, 95% CI [+0.0100, +0.0100], won 3 of 3: at least as good
  imp (implicit) over CLM: -0.0300 nats/char, 95% CI [-0.0300, -0.0300], won 0 of 3; by skill arith -0.0500, facts -0.1000
  imp (implicit) over the best target (tb): -0.0800 nats/char, 95% CI [-0.0800, -0.0800], won 0 of 3
  imp (implicit) over varm: -0.0900 nats/char, 95% CI [-0.0900, -0.0900], won 0 of 3
budget (mean per pair): imp sft rows 401, steps 40
  ctl (the pivot its own source) over CLM: +0.0100 nats/char, 95% CI [+0.0100, +0.0100], won 3 of 3
  ta over ctl: +0.0000 nats/char, 95% CI [-0.0248, +0.0248], won 1 of 3; largest gain on facts
  tb over ctl: +0.0400 nats/char, 95% CI [+0.0400, +0.0400], won 3 of 3; largest gain on arith
  varm over ctl: +0.0500 nats/char, 95% CI [+0.0500, +0.0500], won 3 of 3
weight space: relative delta from the pivot ta 0.150, tb 0.200; delta cosine ta-tb 0.850
  held-out loss along ta-tb (alpha [0.0, 0.5, 1.0]): 1.0000 0.9500 1.0000; barrier 0.0150
"""

"""The study's statistics on hand-made run summaries, and --set overrides."""

import pytest

from fusechat.errors import FusechatError
from fusechat.recipe import apply_override
from fusechat.study import analyse, mean_std, same_tokens, token_efficiency, tokens_to_reach


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


def test_analyse_means_stds_gains_and_merges():
    runs = {0: _run(0.30, 0.20, 0.29, 0.25), 1: _run(0.32, 0.22, 0.31, 0.24)}
    r = analyse(runs)
    assert r["models"]["clm"]["nll/char"] == pytest.approx(mean_std([0.30, 0.32]))
    t1, t2 = r["targets"]["t1"], r["targets"]["t2"]
    assert t1["gain"] == pytest.approx(0.10) and t1["beats_clm"]
    # a gain of 0.01 against a std of 0.0141: not twice the larger deviation
    assert t2["gain"] == pytest.approx(0.01) and not t2["beats_clm"]
    assert t2["threshold"] == pytest.approx(2 * mean_std([0.30, 0.32])["std"])
    assert r["best_target"] == "t1"
    assert r["merges"]["varm"]["vs_best_target"] == pytest.approx(0.21 - 0.245)
    assert not r["merges"]["varm"]["at_least_as_good"]
    assert t1["token_efficiency"]["n"] == 2 and t1["token_efficiency"]["mean"] > 1
    assert same_tokens(runs, "clm")
    runs[1]["curves"]["t1"]["tokens"] = [0, 11, 20]
    assert not same_tokens(runs, "clm")


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


def test_the_table_shows_each_target_against_clm_by_skill():
    from fusechat.study import format_table

    runs = {0: _run(0.30, 0.20, 0.29, 0.25), 1: _run(0.32, 0.22, 0.31, 0.24)}
    for seed, r in runs.items():
        for sc in r["scores"].values():
            sc["nll/char facts"] = sc["nll/char"] / 2 + seed / 100
            sc["nll/char glossary"] = sc["nll/char"] * 2
    table = format_table(analyse(runs))
    assert "nats/char by skill: facts, glossary" in table
    block = table.split("nats/char by skill")[1].splitlines()[1:4]
    assert [x.split()[0] for x in block] == ["clm", "t1", "t2"]  # CLM, then each target
    # t1: facts 0.10 and 0.12 over the seeds, glossary 0.40 and 0.44
    assert "0.1100 ± 0.0141" in block[1] and "0.4200 ± 0.0283" in block[1]

"""The align stage on captured rows: identity on itself, agreement across tokenizers, and
workers that write the same bytes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import sparse_dict, stage_rows

from fusechat.align import align
from fusechat.configs import AlignConfig, FuseConfig
from fusechat.fuse import fuse_stage
from fusechat.shards import unpack_ids


def test_self_alignment_is_the_identity(stages, tmp_path):
    m = align(
        stages / "cap-pivot", stages / "cap-pivot", tmp_path / "self", AlignConfig(method="exact")
    )
    assert m["stats"]["coverage"] == 1.0 and m["stats"]["mapped_mass"] == pytest.approx(1.0)
    m = align(stages / "cap-pivot", stages / "cap-pivot", tmp_path / "self-text")
    assert m["stats"]["coverage"] == 1.0 and m["stats"]["agreement"] == 1.0
    piv = stage_rows(stages / "cap-pivot", "capture")
    for method in ("self", "self-text"):
        for p, a in zip(piv, stage_rows(tmp_path / method, "align"), strict=True):
            learned = np.append(p["pos.labels_mask"][1:], False)
            assert a["pos.valid"][learned].all()
            ids, top = unpack_ids(a["pos.ids"]), unpack_ids(p["pos.topk_ids"])
            q = np.exp(p["pos.topk_logprobs"].astype(np.float64))
            for t in np.flatnonzero(learned):  # the pivot's own distribution, id by id
                want = sparse_dict(top[t], q[t])
                if method == "self-text":  # the gold token's exact probability is added, the
                    # K most probable kept
                    want[int(p["pos.input_ids"][t + 1])] = float(np.exp(p["pos.gold_logprob"][t]))
                    want = dict(sorted(want.items(), key=lambda kv: -kv[1])[: ids.shape[1]])
                total = sum(want.values())
                got = sparse_dict(ids[t], a["pos.probs"][t].astype(np.float64))
                assert got.keys() == want.keys()
                np.testing.assert_allclose(
                    [got[k] for k in want], [v / total for v in want.values()], atol=2e-3
                )


def test_alignment_across_tokenizers(stages):
    m = json.loads((stages / "al-mixtral-exact" / "manifest.json").read_text())
    assert 0.5 < m["stats"]["coverage"] <= m["stats"]["aligned"] <= 1.0
    assert 0.0 < m["stats"]["mapped_mass"] <= 1.0
    text = json.loads((stages / "al-mixtral" / "manifest.json").read_text())["stats"]
    # the text method: a distribution at (almost) every learned position, agreeing with gold
    assert text["coverage"] >= 0.98 > m["stats"]["coverage"]
    assert text["agreement"] >= 0.98
    piv = stage_rows(stages / "cap-pivot", "capture")
    src = stage_rows(stages / "cap-mixtral", "capture")
    for p, s, a in zip(piv, src, stage_rows(stages / "al-mixtral-exact", "align"), strict=True):
        # a valid pivot position has a source token ending at the same byte
        ends = set(s["pos.byte_end"].tolist())
        assert all(int(e) in ends for e in p["pos.byte_end"][a["pos.valid"]])
        probs = a["pos.probs"].astype(np.float64)
        np.testing.assert_allclose(probs[a["pos.valid"]].sum(1), 1, atol=5e-3)
        assert np.all(probs[~a["pos.valid"]] == 0)


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_align_and_fuse_with_two_workers_write_the_same_bytes(stages, tmp_path, start, monkeypatch):
    """Shards spread over two processes, forked (the state inherited) or spawned (each worker
    builds its own; platforms without fork): every shard and the statistics equal one
    process's (the stats method's map is built once and shipped to the workers)."""
    import multiprocessing

    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: [start])
    for method in ("text", "stats") if start == "fork" else ("stats",):
        one, two = tmp_path / f"one-{method}", tmp_path / f"two-{method}"
        a = align(stages / "cap-pivot", stages / "cap-mixtral", one, AlignConfig(method=method))
        b = align(
            stages / "cap-pivot", stages / "cap-mixtral", two, AlignConfig(method=method, workers=2)
        )
        assert a["stats"] == b["stats"] and a["shards"] > 1
        for s in sorted(one.glob("shard-*")):
            assert s.read_bytes() == (two / s.name).read_bytes(), (method, s.name)
    f1 = fuse_stage(stages / "cap-pivot", [stages / "al-mixtral"], tmp_path / "f1")
    f2 = fuse_stage(
        stages / "cap-pivot", [stages / "al-mixtral"], tmp_path / "f2", FuseConfig(workers=2)
    )
    assert f1["stats"] == f2["stats"] and f1["checksums"] == f2["checksums"]


def test_the_registry_is_the_methods_a_recipe_can_name():
    """``align.method`` takes its choices from ``fusechat.aligners.ALIGNERS``; each entry is an
    ``Aligner`` whose declared sequences are what the config accepts."""
    from typing import get_args

    from fusechat.aligners import ALIGNERS, aligner_class
    from fusechat.aligners.base import Aligner
    from fusechat.configs import AlignConfig

    assert get_args(AlignConfig.model_fields["method"].annotation) == tuple(ALIGNERS)
    for method in ALIGNERS:
        cls = aligner_class(method)
        assert issubclass(cls, Aligner)
        for seq in ("offsets", "dtw"):
            ok = seq in cls.sequences
            try:
                AlignConfig(method=method, sequence=seq)
                assert ok, (method, seq)
            except ValueError as e:
                assert not ok and f"method {method!r} pairs positions by" in str(e)
    assert aligner_class("text").sequences == ("offsets",)
    assert aligner_class("stats").needs_corpus and not aligner_class("exact").needs_corpus

"""The fuse stage on small hand-made stage folders: its key and stats, which rows it drops,
which sources a row may choose, the target where nothing is aligned, the per-turn path, the
state a spawned worker rebuilds, branch keeping, and avgCE weights position by position.

Stage folders are written by hand with ``tests/test_behaviours.py``'s helpers (no toy world,
no model); every expectation is computed here from the inputs."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
from test_behaviours import _al_row, _cap_row, _rows, _world

import fusechat.sharding as sharding_mod
from fusechat.configs import FuseConfig
from fusechat.fuse import VERSION, _branches, fuse_stage, sequence_weights
from fusechat.io import fingerprint
from fusechat.shards import StageReader, pack_ids, unpack_ids

U16 = np.dtype(np.uint16)
PIVOT_TOP = {1: 0.7, 2: 0.3}  # what _cap_row gives the pivot at every position
SOURCE_TOP = {30: 0.6, 31: 0.4}


def _dense(row: dict, t: int) -> dict[int, float]:
    """The fused target at position ``t`` as {id: probability}, padding left out."""
    ids, p = unpack_ids(row["pos.target_ids"][t]), row["pos.target_probs"][t]
    return {int(i): float(q) for i, q in zip(ids, p, strict=True) if i >= 0 and q > 0}


def _two_sources(d):
    """One pivot row (2 shards of one row each) and two sources of different CEs."""
    mask, gold = [0, 1, 1, 1], [-1.5, -1.5, -1.5, -9]  # pivot CE 1.5
    pivot = [[_cap_row(i, mask, gold)] for i in range(2)]
    sources = []
    for ce in (1.0, 2.0):
        cap = [[_cap_row(i, mask, [-ce] * 3 + [-9])] for i in range(2)]
        al = [[_al_row(i, 4, ce, 3, SOURCE_TOP)] for i in range(2)]
        sources.append((cap, al))
    return _world(d, pivot, sources)


# --------------------------------------------------------------------------- the key


def test_the_fuse_key_names_every_input_and_setting(tmp_path):
    """The manifest's key: the pivot capture's and each aligned source's fingerprints (in the
    order given), every fusion setting, and what training checks (tokenizer, corpus, model)."""
    piv, srcs = _two_sources(tmp_path)
    pkey = StageReader(piv, "capture").key
    akeys = [StageReader(s, "align").key for s in srcs]
    m = fuse_stage(piv, srcs, tmp_path / "fused")
    want = {
        "stage": "fuse",
        "version": VERSION,
        "pivot_capture": fingerprint(pkey),
        "aligned": [fingerprint(akeys[0]), fingerprint(akeys[1])],
        "method": "minCE",
        "ce_norm": "token",
        "unit": "sequence",
        "unaligned": "gold",
        "shard_rows": 1,
        "pivot_tokenizer_fingerprint": "tp",
        "corpus_fingerprint": "corpus",
        "pivot_model": "pivot",
    }
    assert m["key"] == want
    assert StageReader(tmp_path / "fused", "fuse").key == want  # as written in manifest.json
    assert fingerprint(pkey) != fingerprint(akeys[0]) != fingerprint(akeys[1])
    # the sources the other way round: the same fusion, another key
    back = fuse_stage(piv, srcs[::-1], tmp_path / "back")
    assert back["key"]["aligned"] == want["aligned"][::-1]


def test_each_fusion_setting_changes_the_key(tmp_path):
    """method, ce_norm, unit and unaligned each change the key in their own entry only."""
    piv, srcs = _two_sources(tmp_path)
    base = fuse_stage(piv, srcs, tmp_path / "base")["key"]
    for name, value in [("method", "avgCE"), ("ce_norm", "char"), ("unit", "turn"),
                        ("unaligned", "pivot")]:  # fmt: skip
        key = fuse_stage(piv, srcs, tmp_path / name, FuseConfig(**{name: value}))["key"]
        assert key[name] == value
        assert {k for k in {**base, **key} if base.get(k) != key.get(k)} == {name}


# --------------------------------------------------------------------------- rows and stats


def _counting_world(d):
    """Shard 0: a pivot row with no learned token; one with a single learned token, where a
    source with one learned token reads better; one whose source learned nothing; one a
    source wins. Shard 1: one row a source wins. Pivot CE 2.0 on every kept row."""
    n = 4
    one, two = [0, 1, 0, 0], [0, 1, 1, 0]  # one and two learned tokens
    pivot = [
        [
            _cap_row(0, [0, 0, 0, 0], [-9] * n),
            _cap_row(1, one, [-2, -9, -9, -9]),
            _cap_row(2, two, [-2, -2, -9, -9]),
            _cap_row(3, two, [-2, -2, -9, -9]),
        ],
        [_cap_row(4, two, [-2, -2, -9, -9])],
    ]
    al = [
        [
            _al_row(0, n, 1.0, 0, SOURCE_TOP),
            _al_row(1, n, 1.0, 1, SOURCE_TOP),  # CE 1.0 over its one token: chosen
            _al_row(2, n, 0.5, 0, SOURCE_TOP),  # nothing learned: never chosen
            _al_row(3, n, 1.5, 2, SOURCE_TOP),
        ],
        [_al_row(4, n, 1.0, 2, SOURCE_TOP)],
    ]
    return _world(d, pivot, [(pivot, al)])


def test_rows_without_learned_tokens_are_dropped_and_counted(tmp_path):
    """A pivot row with no learned token is dropped (one with a single one kept); a source row
    with none is never chosen, one with a single one is; the stats count exactly."""
    piv, srcs = _counting_world(tmp_path)
    m = fuse_stage(piv, srcs, tmp_path / "fused")
    rows = _rows(tmp_path / "fused")
    assert [int(r["row.index"]) for r in rows] == [1, 2, 3, 4]
    assert [r["row.weights"].tolist() for r in rows] == [[0, 1], [1, 0], [0, 1], [0, 1]]
    assert _dense(rows[0], 0) == pytest.approx(SOURCE_TOP, abs=1e-3)
    assert _dense(rows[1], 0) == pytest.approx(PIVOT_TOP, abs=1e-3)
    assert m["stats"] == {
        "rows": 4,
        "dropped_empty": 1,
        "mean_weights": [0.25, 0.75],  # (1 + 0 + 0 + 0) / 4, (0 + 1 + 1 + 1) / 4
        "pivot_capture": str(piv),
        "aligned": [str(srcs[0])],
        "pivot_model": "pivot",
    }
    # ids keep the pivot's compact dtype on disk
    assert {r["pos.target_ids"].dtype for r in rows} == {U16}


def test_a_shard_with_every_row_kept_drops_none(tmp_path):
    """dropped_empty is 0 when every row learns something; mean weights over those rows."""
    piv, srcs = _two_sources(tmp_path)
    stats = fuse_stage(piv, srcs, tmp_path / "fused")["stats"]
    assert stats["rows"] == 2 and stats["dropped_empty"] == 0
    assert stats["mean_weights"] == [0.0, 1.0, 0.0]  # source 0 (CE 1.0) wins both rows


# --------------------------------------------------------------------------- unaligned positions


def _unaligned_world(d):
    """One row of 5 positions whose gold next tokens are 6, 0, 7, 8, (none); the pivot's top-2
    (0.4, 0.2) sums to 0.6; the source (CE 1.0 < the pivot's 2.0) is aligned at 0 and 3 only."""
    mask = [0, 1, 1, 1, 1]
    row = _cap_row(0, mask, [-2, -2, -2, -2, -9])
    row["pos.input_ids"] = pack_ids(np.array([5, 6, 0, 7, 8]), U16)
    row["pos.topk_logprobs"] = np.log(np.tile([0.4, 0.2], (5, 1))).astype(np.float16)
    al = _al_row(0, 5, 1.0, 4, SOURCE_TOP, valid=[1, 0, 0, 1, 0])
    return _world(d, [[row]], [([[_cap_row(0, mask, [-1] * 4 + [-9])]], [[al]])])


def test_unaligned_positions_learn_the_gold_token_or_the_renormalised_pivot(tmp_path):
    """Where the chosen source has no distribution: one-hot on the gold next token (id 0
    included) with unaligned 'gold', the pivot's top-K renormalised to 1 with 'pivot'; at
    the last position (no next token) the renormalised pivot either way."""
    piv, srcs = _unaligned_world(tmp_path)
    renorm = {1: 2 / 3, 2: 1 / 3}  # 0.4 and 0.2 over 0.6
    got = {}
    for mode in ("gold", "pivot"):
        fuse_stage(piv, srcs, tmp_path / mode, FuseConfig(unaligned=mode))
        (row,) = _rows(tmp_path / mode)
        assert row["row.weights"].tolist() == [0, 1]
        got[mode] = [_dense(row, t) for t in range(5)]
    want = {
        "gold": [SOURCE_TOP, {0: 1.0}, {7: 1.0}, SOURCE_TOP, renorm],
        "pivot": [SOURCE_TOP, renorm, renorm, SOURCE_TOP, renorm],
    }
    for mode in want:
        for t in range(5):
            assert got[mode][t] == pytest.approx(want[mode][t], abs=2e-3), (mode, t)


# --------------------------------------------------------------------------- per turn


def test_per_turn_choice_normalises_turns_as_ce_norm_says(tmp_path):
    """unit 'turn' compares turns per token or per byte as ce_norm says: the pivot reads its
    turn at 1.0/token (0.5/byte), the source, in 2 tokens of 3 bytes, at 1.2/token (0.4/byte)."""
    pivot_row = _cap_row(0, [0, 1, 1, 1], [-1, -1, -1, -9])  # 3 tokens, bytes 2..8
    src_cap = _cap_row(0, [0, 1, 1], [-1.2, -1.2, -9])
    src_cap["pos.byte_end"] = np.array([2, 5, 8], np.int32)  # the same 6 bytes in 2 tokens
    al = _al_row(0, 4, 1.2, 2, SOURCE_TOP)
    piv, srcs = _world(tmp_path, [[pivot_row]], [([[src_cap]], [[al]])])
    for norm, weights, top in (("token", [1, 0], PIVOT_TOP), ("char", [0, 1], SOURCE_TOP)):
        fuse_stage(piv, srcs, tmp_path / norm, FuseConfig(unit="turn", ce_norm=norm))
        (row,) = _rows(tmp_path / norm)
        assert row["row.weights"].tolist() == weights, norm
        for t in (0, 1, 2):
            assert _dense(row, t) == pytest.approx(top, abs=1e-3), (norm, t)


def test_per_turn_falls_back_to_the_sequence_when_turns_do_not_pair(tmp_path):
    """unit 'turn': a source capture with more turns than the (untruncated) pivot's row is
    chosen per sequence instead (source CE 1.0 < pivot 2.0: the source)."""
    pivot_row = _cap_row(0, [0, 1, 1, 0, 0], [-2, -2, -9, -9, -9])  # one turn
    src_cap = _cap_row(0, [0, 1, 0, 1, 0], [-1, -9, -1, -9, -9])  # two turns
    al = _al_row(0, 5, 1.0, 2, SOURCE_TOP)
    piv, srcs = _world(tmp_path, [[pivot_row]], [([[src_cap]], [[al]])])
    m = fuse_stage(piv, srcs, tmp_path / "fused", FuseConfig(unit="turn"))
    (row,) = _rows(tmp_path / "fused")
    assert row["row.weights"].tolist() == [0, 1]
    assert m["stats"]["mean_weights"] == [0.0, 1.0]


def test_a_spawned_worker_rebuilds_the_same_state_from_its_job(tmp_path, monkeypatch):
    """The picklable job a spawned worker gets (pivot, sources, per-turn captures) rebuilds
    the state it fuses with: the shards it writes equal those of the in-process run."""
    mask = [0, 0, 1, 1, 1, 0, 0, 1, 1]  # two turns
    pivot = [[_cap_row(i, mask, [-9, -0.5, -0.5, -0.5, -9, -9, -3, -3, -9])] for i in range(2)]
    cap = [[_cap_row(i, mask, [-9, -1, -1, -1, -9, -9, -1, -1, -9])] for i in range(2)]
    al = [[_al_row(i, 9, 1.0, 5, SOURCE_TOP)] for i in range(2)]
    piv, srcs = _world(tmp_path, pivot, [(cap, al)])
    cfg = FuseConfig(unit="turn")
    fuse_stage(piv, srcs, tmp_path / "here", cfg)

    def as_spawned(shards, task, state, workers=1, rebuild=None, desc=""):
        setup, job = rebuild
        fresh = setup(pickle.loads(pickle.dumps(job)))  # what _init_worker does
        return [task(fresh, i) for i in shards]

    monkeypatch.setattr(sharding_mod, "map_shards", as_spawned)
    fuse_stage(piv, srcs, tmp_path / "spawned", cfg)
    here, spawned = _rows(tmp_path / "here"), _rows(tmp_path / "spawned")
    for r in spawned:  # the pivot wins turn 1 (3 tokens), the source turn 2 (2)
        np.testing.assert_allclose(r["row.weights"], [3 / 5, 2 / 5], rtol=1e-6)
    for a, b in zip(here, spawned, strict=True):
        assert sorted(a) == sorted(b)
        for k in a:
            assert np.array_equal(a[k], b[k]), k


# --------------------------------------------------------------------------- branches


def _with_branches(t: int) -> dict:
    b = np.full((3, 2, 2), -1)
    b[t, 0] = [40, 41]
    return {"pos.branch_ids": pack_ids(b, U16)}


def test_branches_follow_a_source_of_weight_one_half_or_more():
    """A source of weight exactly 0.5 (avgCE tie) keeps its branches; a pivot win, or a
    winning source without branches, gives all -1 (int64) shaped like another source's."""
    first, second = _with_branches(0), _with_branches(1)
    kept = _branches([first, second], np.array([0.5, 0.5, 0.0]))
    assert kept.tolist() == unpack_ids(first["pos.branch_ids"]).tolist()
    for srows, w in (([first, second], [1.0, 0.0, 0.0]), ([{}, second], [0.0, 1.0, 0.0])):
        none = _branches(srows, np.array(w))
        assert none.shape == (3, 2, 2) and none.dtype == np.int64
        assert (none == -1).all()


def test_fused_branches_keep_the_pivots_ids_dtype(tmp_path):
    """The fused shard stores target and branch ids in the pivot's ids dtype (uint16 here)."""
    mask, gold = [0, 1, 1], [-2, -2, -9]
    b = np.full((3, 2, 2), -1)
    b[1, 0] = [40, 41]
    al = _al_row(0, 3, 1.0, 2, SOURCE_TOP, branches=b)
    piv, srcs = _world(
        tmp_path, [[_cap_row(0, mask, gold)]], [([[_cap_row(0, mask, gold)]], [[al]])]
    )
    fuse_stage(piv, srcs, tmp_path / "fused")
    (row,) = _rows(tmp_path / "fused")
    assert row["pos.target_ids"].dtype == U16 and row["pos.branch_ids"].dtype == U16
    assert unpack_ids(row["pos.branch_ids"]).tolist() == b.tolist()


# --------------------------------------------------------------------------- weights


def test_avg_ce_weights_each_position_on_its_own():
    """Per-position avgCE: each column is softmax(-ce) of that column alone, summing to 1,
    also where a column's CEs are large (no underflow to 0/0)."""
    ces = np.array([[0.0, 900.0], [1.0, 901.0], [2.0, 900.0]])
    w = sequence_weights(ces, "avgCE")
    e1, e2 = math.exp(-1), math.exp(-2)
    want = [[1 / (1 + e1 + e2), 1 / (2 + e1)],
            [e1 / (1 + e1 + e2), e1 / (2 + e1)],
            [e2 / (1 + e1 + e2), 1 / (2 + e1)]]  # fmt: skip
    np.testing.assert_allclose(w, want, rtol=1e-12)
    seq = sequence_weights([800.0, 801.0], "avgCE")  # one sequence, large CEs
    np.testing.assert_allclose(seq, [1 / (1 + e1), e1 / (1 + e1)], rtol=1e-12)


def test_an_unknown_fusion_method_is_named():
    """An unknown method is refused with a message naming it and the two known ones."""
    with pytest.raises(ValueError, match=r"unknown fusion method 'maxCE' \(minCE or avgCE\)"):
        sequence_weights([1.0, 2.0], "maxCE")

"""MinCE/AvgCE fusion and sparse distributions against hand-computed values."""

import numpy as np
import pytest
from conftest import STAGE_ROWS, sparse_dict, stage_rows

from fusechat.fuse import fuse, sequence_ce, sequence_weights
from fusechat.shards import unpack_ids
from fusechat.sparse import combine_duplicates, map_topk, top_k


def test_sequence_weights_hand_computed():
    assert sequence_weights([2.0, 1.0, 3.0], "minCE").tolist() == [0, 1, 0]
    w = sequence_weights([1.0, 2.0], "avgCE")
    e = np.exp([-1.0, -2.0])
    np.testing.assert_allclose(w, e / e.sum())
    with pytest.raises(ValueError):
        sequence_weights([1.0], "maxCE")


def test_turn_ce_pairs_each_models_turns_and_weights_each_turn():
    """Two assistant turns; per turn each model's cross-entropy, per token or per byte; MinCE
    then chooses per turn, and a model whose truncated row lacks the second turn cannot win it."""
    from fusechat.fuse import turn_ce, turn_ces

    # 8 tokens: prompt, turn 1 (tokens 2, 3), prompt, turn 2 (tokens 6, 7)
    mask = np.array([0, 0, 1, 1, 0, 0, 1, 1], bool)
    gold = -np.array([9, 1.0, 2.0, 9, 9, 3.0, 5.0, 9], np.float32)  # position t predicts t + 1
    piv = {"pos.labels_mask": mask, "pos.gold_logprob": gold, "row.truncated": False,
           "pos.byte_end": np.array([0, 4, 6, 10, 12, 20, 21, 25])}  # fmt: skip
    bounds, ce = turn_ce(piv, "token")
    assert bounds.tolist() == [[1, 3], [5, 7]]
    assert ce.tolist() == [1.5, 4.0]
    assert turn_ce(piv, "char")[1].tolist() == [3.0 / 6, 8.0 / 5]  # bytes 4..10, 20..25
    # the source reads turn 1 worse and turn 2 better (its own tokenization: 3 + 1 tokens)
    src = {"pos.labels_mask": np.array([0, 1, 1, 1, 0, 1, 0], bool),
           "pos.gold_logprob": -np.array([2.0, 2.0, 2.0, 9, 1.0, 9, 9], np.float32),
           "pos.byte_end": np.array([4, 6, 8, 10, 20, 25, 26]), "row.truncated": False}  # fmt: skip
    per = turn_ces(piv, [src], "token", [2.5, 1.9])
    assert per[:, 1].tolist() == [1.5, 2.0] and per[:, 5].tolist() == [4.0, 1.0]
    assert per[:, 0].tolist() == [2.5, 1.9]  # nothing learned there: the sequence's
    w = sequence_weights(per, "minCE")
    assert w[:, [1, 2, 5, 6]].tolist() == [[1, 1, 0, 0], [0, 0, 1, 1]]
    cut = {**src, "pos.labels_mask": np.array([0, 1, 1, 1, 0, 0, 0], bool)}
    assert np.isinf(turn_ces(piv, [cut], "token", [2.5, 1.9])[1, 5:7]).all()
    three = {**src, "pos.labels_mask": np.array([1, 1, 0, 1, 0, 1, 0], bool)}
    assert (
        turn_ces(piv, [three], "token", [2.5, 1.9]) is None
    )  # turns that do not pair up: per sequence


def test_map_topk_drops_unmapped_and_reports_mass():
    ids = np.array([[0, 1, 2]])
    logp = np.log(np.array([[0.5, 0.3, 0.2]]))
    vmap = np.array([7, -1, 9])
    pid, p, mass = map_topk(ids, logp, vmap)
    assert pid.tolist() == [[7, -1, 9]]
    np.testing.assert_allclose(mass, [0.7])
    np.testing.assert_allclose(p, [[0.5 / 0.7, 0, 0.2 / 0.7]], rtol=1e-6)


def test_fuse_min_and_avg_ce_hand_computed():
    pivot = (np.array([[1, 2], [3, 4]]), np.array([[0.6, 0.4], [0.9, 0.1]], np.float32))
    source = (np.array([[1, 5], [6, -1]]), np.array([[0.8, 0.2], [1.0, 0.0]], np.float32))
    valid = [np.array([True, True]), np.array([True, False])]
    # minCE: the source has the lower CE, so it wins where it is aligned; the pivot elsewhere
    ids, p = fuse([pivot, source], valid, [1.5, 1.0], "minCE")
    assert _dense(ids, p) == [{1: 0.8, 5: 0.2}, {3: 0.9, 4: 0.1}]
    # avgCE: weights softmax(-ce) = (w0, w1) at t=0; at t=1 the source is missing: pivot alone
    ids, p = fuse([pivot, source], valid, [1.5, 1.0], "avgCE")
    w1 = np.exp(-1.0) / (np.exp(-1.0) + np.exp(-1.5))
    d = _dense(ids, p)
    want = {1: 0.6 * (1 - w1) + 0.8 * w1, 2: 0.4 * (1 - w1), 5: 0.2 * w1}
    assert d[0].keys() == want.keys() and d[1] == {3: 0.9, 4: 0.1}
    np.testing.assert_allclose([d[0][k] for k in want], list(want.values()), rtol=1e-5)
    np.testing.assert_allclose(p.sum(1), 1, rtol=1e-6)
    assert all(len(set(r[r >= 0])) == len(r[r >= 0]) for r in ids)  # one entry per id


def test_min_ce_keeps_the_pivot_where_it_wins():
    # the pivot's cross-entropy is the lowest: its own distribution is the target everywhere,
    # also where the source is aligned (a MinCE over the sources alone would pick the source)
    pivot = (np.array([[1, 2]]), np.array([[0.7, 0.3]], np.float32))
    source = (np.array([[5, 6]]), np.array([[0.9, 0.1]], np.float32))
    ids, p = fuse([pivot, source], [np.array([True]), np.array([True])], [0.5, 2.0], "minCE")
    assert _dense(ids, p) == [{1: 0.7, 2: 0.3}]
    w = sequence_weights([0.5, 2.0], "avgCE")
    assert w[0] > w[1]  # avgCE leans to the pivot too


def test_unaligned_positions_learn_the_gold_token_or_the_pivot():
    pivot = (np.array([[1, 2], [3, 4]]), np.array([[0.6, 0.4], [0.5, 0.5]], np.float32))
    source = (np.array([[7, -1], [8, -1]]), np.array([[1.0, 0], [1.0, 0]], np.float32))
    valid = [np.array([True, True]), np.array([True, False])]
    gold = (np.array([[9], [4]]), np.array([[1.0], [1.0]], np.float32))
    ids, p = fuse([pivot, source], valid, [2.0, 1.0], "minCE", fallback=gold)
    assert _dense(ids, p) == [{7: 1.0}, {4: 1.0}]  # t=1: the source has nothing: gold 4
    ids, p = fuse([pivot, source], valid, [2.0, 1.0], "minCE")
    assert _dense(ids, p) == [{7: 1.0}, {3: 0.5, 4: 0.5}]  # without fallback: the pivot's


def test_top_k_combines_keeps_the_largest_and_renormalises():
    ids = np.array([[4, 2, 4, 9, -1]])
    p = np.array([[0.1, 0.3, 0.2, 0.05, 0.0]])
    out_ids, out_p = top_k(ids, p, 2)
    assert out_ids.tolist() == [[4, 2]] or out_ids.tolist() == [[2, 4]]
    d = dict(zip(out_ids[0].tolist(), out_p[0].tolist(), strict=True))
    np.testing.assert_allclose([d[4], d[2]], [0.3 / 0.6, 0.3 / 0.6], rtol=1e-6)
    assert top_k(ids, p, 6)[0].shape == (1, 6)  # padded to width k


def _dense(ids, p) -> list[dict]:
    return [
        {int(i): round(float(x), 6) for i, x in zip(ri, rp, strict=True) if i >= 0 and x > 0}
        for ri, rp in zip(ids, p, strict=True)
    ]


def test_sequence_ce_per_token_and_per_character():
    row = {"row.nll_sum": 6.0, "row.n_tokens": 4, "row.n_chars": 12}
    assert sequence_ce(row, "token") == 1.5 and sequence_ce(row, "char") == 0.5
    assert np.isnan(sequence_ce({**row, "row.n_tokens": 0}, "token"))
    assert np.isnan(sequence_ce({**row, "row.n_chars": 0}, "char"))


def test_sparse_edge_cases_exactly():
    """Token id 0 is a token, not padding; padding is -1 with probability 0 wherever it appears;
    a row without mass stays all padding; outputs are float32 and exactly k (or K) wide."""
    ids = np.array([[0, 3, 0, -1], [2, 2, -1, -1], [-1, -1, -1, -1], [5, 0, 1, 4]])
    p = np.array([[0.2, 0.3, 0.1, 0.0], [0.25, 0.25, 0.0, 0.0], [0.0] * 4, [0.0, 0.5, 0.0, 0.0]])
    ci, cp = combine_duplicates(ids, p)
    assert ci.tolist() == [[-1, 0, 3, -1], [-1, 2, -1, -1], [-1, -1, -1, -1], [0, 1, 4, 5]]
    np.testing.assert_allclose(cp, [[0, 0.3, 0.3, 0], [0, 0.5, 0, 0], [0] * 4, [0.5, 0, 0, 0]])
    assert cp.dtype == np.float32
    ti, tp = top_k(ids, p, 6)  # wider than K: padded
    assert ti.tolist() == [[0, 3, -1, -1, -1, -1], [2, -1, -1, -1, -1, -1], [-1] * 6,
                           [0, -1, -1, -1, -1, -1]]  # fmt: skip
    np.testing.assert_allclose(tp[0], [0.5, 0.5, 0, 0, 0, 0])
    np.testing.assert_allclose(tp[1], [1, 0, 0, 0, 0, 0])
    assert (tp[2] == 0).all() and tp.dtype == np.float32 and tp.shape == (4, 6)
    ti, tp = top_k(ids, p, 1)
    assert ti.tolist() == [[0], [2], [-1], [0]] and tp[:, 0].tolist() == [1, 1, 0, 1]
    vmap = np.array([7, -1, 0, -1, 2, 1])  # source id -> pivot id (0 is a pivot token)
    lp = np.log(np.array([[0.5, 0.25, 0.25, 1e-9], [0.6, 0.4, 1e-9, 1e-9]]))
    pid, mp, mass = map_topk(np.array([[0, 2, 1, -1], [4, 5, -1, 3]]), lp, vmap)
    assert pid.tolist() == [[7, 0, -1, -1], [2, 1, -1, -1]] and mp.dtype == np.float32
    np.testing.assert_allclose(mass, [0.75, 1.0], rtol=1e-6)
    np.testing.assert_allclose(mp, [[2 / 3, 1 / 3, 0, 0], [0.6, 0.4, 0, 0]], rtol=1e-5)
    _, raw, _ = map_topk(np.array([[0, 2, 1, -1]]), lp[:1], vmap, renormalize=False)
    np.testing.assert_allclose(raw, [[0.5, 0.25, 0, 0]], rtol=1e-5)
    _, none, zero = map_topk(np.array([[1, 3, -1, -1]]), lp[:1], vmap)
    assert zero.tolist() == [0.0] and not none.any()  # nothing mapped: no NaN


def test_fuse_keeps_token_zero_and_the_pivot_where_the_fallback_is_empty():
    pivot = (np.array([[0, 2], [0, 4]]), np.array([[0.6, 0.4], [0.5, 0.5]], np.float32))
    source = (np.array([[0, -1], [8, -1]]), np.array([[1.0, 0], [1.0, 0]], np.float32))
    valid = [np.array([True, True]), np.array([True, False])]
    empty_last = (np.array([[5], [-1]]), np.array([[1.0], [0.0]], np.float32))
    ids, p = fuse([pivot, source], valid, [1.0, 2.0], "minCE", fallback=empty_last)
    # MinCE picks the pivot; id 0 is a token; where the gold fallback is empty (the last
    # position), the source has nothing and the pivot's own distribution stays
    assert _dense(ids, p) == [{0: 0.6, 2: 0.4}, {0: 0.5, 4: 0.5}]
    ids, p = fuse([pivot, source], valid, [2.0, 1.0], "minCE", fallback=empty_last)
    assert _dense(ids, p) == [{0: 1.0}, {0: 0.5, 4: 0.5}]
    assert sequence_ce({"row.nll_sum": 3.0, "row.n_tokens": 1, "row.n_chars": 3}, "token") == 3.0


def test_fused_targets(stages):
    piv = stage_rows(stages / "cap-pivot", "capture")
    al = stage_rows(stages / "al-mixtral", "align")
    fused = stage_rows(stages / "fused", "fuse")
    assert len(fused) == STAGE_ROWS
    for p, a, f in zip(piv, al, fused, strict=True):
        assert np.array_equal(f["pos.input_ids"], p["pos.input_ids"])
        probs = f["pos.target_probs"].astype(np.float64)
        np.testing.assert_allclose(probs.sum(1), 1, atol=5e-3)
        # sparse: K per model and the gold token, never the vocabulary
        assert f["pos.target_ids"].shape[1] == 21
        src_wins = sequence_ce(a, "token") < sequence_ce(p, "token")
        assert f["row.weights"].tolist() == ([0.0, 1.0] if src_wins else [1.0, 0.0])
        ids = unpack_ids(f["pos.target_ids"])
        assert all(len(set(r[r >= 0])) == len(r[r >= 0]) for r in ids)  # one entry per id
        # where the source won and is aligned, its distribution is the target; where it won
        # and has none, the gold token (unaligned: gold); where the pivot won, the pivot's
        a_ids, p_ids = unpack_ids(a["pos.ids"]), unpack_ids(p["pos.topk_ids"])
        gold = np.append(unpack_ids(p["pos.input_ids"])[1:], -1)
        for t in range(0, len(ids) - 1, 3):
            got = sparse_dict(ids[t], probs[t])
            if src_wins and a["pos.valid"][t]:
                want = sparse_dict(a_ids[t], a["pos.probs"][t].astype(np.float64))
            elif src_wins:
                want = {int(gold[t]): 1.0}
            else:
                q = np.exp(p["pos.topk_logprobs"][t].astype(np.float64))
                want = sparse_dict(p_ids[t], q / q.sum())
            assert got.keys() == want.keys()
            np.testing.assert_allclose([got[k] for k in want], list(want.values()), atol=2e-3)


def test_per_turn_choice_equals_per_sequence_on_single_turn_rows(stages, tmp_path):
    """unit 'turn' reads each source's capture; on single-turn rows (the held-out set) a turn is
    the sequence, so the fused targets and weights are those of unit 'sequence'."""
    from fusechat.configs import FuseConfig
    from fusechat.fuse import fuse_stage

    fuse_stage(stages / "cap-pivot", [stages / "al-mixtral"], tmp_path / "turn",
               FuseConfig(unit="turn"))  # fmt: skip
    got, want = stage_rows(tmp_path / "turn", "fuse"), stage_rows(stages / "fused", "fuse")
    assert len(got) == len(want) == STAGE_ROWS
    for g, w in zip(got, want, strict=True):
        assert g["row.weights"].tolist() == w["row.weights"].tolist()
        assert np.array_equal(g["pos.target_ids"], w["pos.target_ids"])
        assert np.array_equal(g["pos.target_probs"], w["pos.target_probs"])


def test_per_turn_choice_refuses_a_replaced_source_capture(stages, tmp_path):
    """unit 'turn' reads the source capture an alignment names; a folder since replaced by
    another capture is one clear error, not a silent mismatch."""
    import shutil

    from fusechat.align import align
    from fusechat.configs import FuseConfig
    from fusechat.errors import FusechatError
    from fusechat.fuse import fuse_stage

    cap = tmp_path / "cap"
    shutil.copytree(stages / "cap-mixtral", cap)
    align(stages / "cap-pivot", cap, tmp_path / "al")
    shutil.rmtree(cap)
    shutil.copytree(stages / "cap-mixtral-la", cap)  # another capture under the same name
    with pytest.raises(FusechatError, match="not the capture"):
        fuse_stage(stages / "cap-pivot", [tmp_path / "al"], tmp_path / "f", FuseConfig(unit="turn"))


def test_branches_travel_from_alignment_to_training_rows(stages, tmp_path):
    """align.branches: a row whose target follows the source carries the source's
    continuations of its alternatives; a training row appends them as a token tree whose
    branches start with a token the fused target at their anchor gives probability to."""
    from fusechat.align import align
    from fusechat.configs import AlignConfig
    from fusechat.fuse import fuse_stage
    from fusechat.rows import ShardRows

    al, fused = tmp_path / "al", tmp_path / "fused"
    align(stages / "cap-pivot", stages / "cap-mixtral-la", al, AlignConfig(branches=6))
    fuse_stage(stages / "cap-pivot", [al], fused)
    rows = stage_rows(fused, "fuse")
    source_won = [r for r in rows if r["row.weights"][1] >= 0.5]
    assert source_won and any((unpack_ids(r["pos.branch_ids"]) >= 0).any() for r in source_won)
    assert all((unpack_ids(r["pos.branch_ids"]) < 0).all() for r in rows
               if r["row.weights"][1] < 0.5)  # fmt: skip
    data = ShardRows(fused, 256, with_targets=True)
    trees = [data[i] for i in range(len(data)) if "segment" in data[i]]
    assert trees
    for r in trees[:5]:
        starts = np.flatnonzero(np.diff(r["segment"], prepend=-1) != 0)  # where branches start
        assert len(starts) and (r["segment"][starts] >= 0).all()
        for s in starts:
            t = r["anchor"][s]
            assert r["position_ids"][s] == t + 1
            assert r["input_ids"][s] in r["target_ids"][t][r["target_probs"][t] > 0]
            assert r["position_weight"][s] > 0

"""MinCE/AvgCE fusion against hand-computed values."""

import numpy as np
import pytest

from fusechat.fuse import finite_rows, fuse, map_topk, sequence_weights


def test_sequence_weights_hand_computed():
    assert sequence_weights([2.0, 1.0, 3.0], "minCE").tolist() == [0, 1, 0]
    w = sequence_weights([1.0, 2.0], "avgCE")
    e = np.exp([-1.0, -2.0])
    np.testing.assert_allclose(w, e / e.sum())
    with pytest.raises(ValueError):
        sequence_weights([1.0], "maxCE")


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


def _dense(ids, p) -> list[dict]:
    return [
        {int(i): round(float(x), 6) for i, x in zip(ri, rp, strict=True) if i >= 0 and x > 0}
        for ri, rp in zip(ids, p, strict=True)
    ]


def test_finite_rows():
    # (the fusion cross-entropy itself lives in fusechat.losses, tested in test_train.py)
    assert finite_rows(np.ones(3), np.arange(3)) and not finite_rows(np.array([1.0, np.nan]))

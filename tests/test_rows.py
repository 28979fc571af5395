"""The training rows: the sources' continuations appended to a row as a token tree."""

from __future__ import annotations

import numpy as np
import torch

from fusechat.rows import collate_rows, tree_mask, with_branches


def _row(n: int) -> dict:
    """A row whose fused target at 1 gives 20 probability 0.25, at 2 gives 30 0.5."""
    ids, probs = np.full((n, 2), -1), np.zeros((n, 2), np.float32)
    ids[1], probs[1] = [12, 20], [0.75, 0.25]
    ids[2], probs[2] = [30, 13], [0.5, 0.5]
    return {"input_ids": np.arange(10, 10 + n), "labels_mask": np.ones(n, bool),
            "target_ids": ids, "target_probs": probs}  # fmt: skip


def test_branches_continue_their_prefix_and_teach_their_own_tokens():
    branches = np.full((4, 3, 3), -1)
    branches[1, 2] = [20, 21, 22]  # an alternative after position 1, and its continuation
    branches[2, 0, :2] = [30, 31]
    r = with_branches(_row(4), branches, 64)
    assert r["input_ids"].tolist() == [10, 11, 12, 13, 20, 21, 22, 30, 31]
    assert r["position_ids"].tolist() == [0, 1, 2, 3, 2, 3, 4, 3, 4]
    assert r["anchor"].tolist()[4:] == [1, 1, 1, 2, 2]
    # a branch's first token is the fused target's to teach; the rest are learned, one-hot
    assert r["labels_mask"].tolist()[4:] == [False, True, True, False, True]
    assert r["target_ids"][4:, 0].tolist() == [21, 22, -1, 31, -1]
    assert r["target_probs"][4:, 0].tolist() == [1, 1, 0, 1, 0]
    # each weighs by its alternative's probability in the fused target where it branches off
    assert r["position_weight"].tolist() == [1, 1, 1, 1, 0.25, 0.25, 0.25, 0.5, 0.5]
    # scaled as the fusion term (1 - lambda): the row's own tokens keep their weight
    scaled = with_branches(_row(4), branches, 64, scale=0.1)["position_weight"]
    np.testing.assert_allclose(scaled, [1, 1, 1, 1, 0.025, 0.025, 0.025, 0.05, 0.05])
    # too long for max_length: left out, the row unchanged
    assert with_branches(_row(4), branches, 5)["input_ids"].tolist() == [10, 11, 12, 13]


def test_tree_mask_sees_the_prefix_and_the_own_branch_only():
    r = with_branches(_row(4), _branches_at(1, [20, 21]), 64)
    mask = collate_rows([r, _row(3)])["attention_mask"]
    assert mask.shape == (2, 1, 6, 6)
    weights = collate_rows([r, _row(3)])["position_weight"]
    assert weights[0].tolist() == [1, 1, 1, 1, 0.25, 0.25] and weights[1].tolist() == [1] * 6
    m = mask[0, 0].int().tolist()
    assert m[3] == [1, 1, 1, 1, 0, 0]  # a row token: the row up to itself
    assert m[5] == [1, 1, 0, 0, 1, 1]  # a branch token: the prefix up to 1, its branch
    p = mask[1, 0]
    assert p[2, :3].all() and not p[2, 3:].any() and p[4, 4] and not p[4, 3]  # padding: itself
    # plain rows alone keep the 2-D mask (the same batches as before branches existed)
    assert collate_rows([_row(3)])["attention_mask"].dim() == 2


def _branches_at(t: int, ids: list[int]) -> np.ndarray:
    b = np.full((4, 2, len(ids)), -1)
    b[t, 0] = ids
    return b


def test_tree_mask_of_a_plain_row_is_causal():
    seg = torch.full((1, 4), -1)
    m = tree_mask(seg, seg, torch.tensor([4]))[0, 0]
    assert torch.equal(m, torch.tril(torch.ones(4, 4, dtype=torch.bool)))

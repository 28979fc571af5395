"""The training rows: the sources' continuations appended to a row as a token tree."""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fusechat.errors import FusechatError
from fusechat.io import tokenizer_fingerprint
from fusechat.rows import ShardRows, check_targets, collate_rows, tree_mask, with_branches
from fusechat.shards import begin_stage, finish_stage, save_shard


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


# --------------------------------------------------------------------------- tree rows by hand


def test_a_tree_row_spelled_out_by_hand():
    """A tree row's every array, by hand: the row's tokens have segment and anchor -1, each
    branch its number and the position it branches off; a one-token branch is a branch."""
    branches = np.full((4, 2, 3), -1)
    branches[1, 1, :2] = [20, 21]  # after position 1, slot 1
    branches[2, 0, :1] = [30]  # after position 2: one token, nothing of it learned
    r = with_branches(_row(4), branches, 64)
    assert r["input_ids"].tolist() == [10, 11, 12, 13, 20, 21, 30]
    assert r["position_ids"].tolist() == [0, 1, 2, 3, 2, 3, 3]
    assert r["segment"].tolist() == [-1, -1, -1, -1, 0, 0, 1]
    assert r["anchor"].tolist() == [-1, -1, -1, -1, 1, 1, 2]
    assert r["labels_mask"].tolist() == [True] * 4 + [False, True, False]
    assert r["target_ids"].tolist() == [[-1, -1], [12, 20], [30, 13], [-1, -1],
                                        [21, -1], [-1, -1], [-1, -1]]  # fmt: skip
    assert r["target_probs"].tolist() == [[0, 0], [0.75, 0.25], [0.5, 0.5], [0, 0],
                                          [1, 0], [0, 0], [0, 0]]  # fmt: skip
    assert r["position_weight"].tolist() == [1, 1, 1, 1, 0.25, 0.25, 0.5]


def test_only_a_slots_first_token_makes_it_a_branch():
    """A slot is a branch when its first token is set: a slot padded at its first column is
    none, whatever follows; a one-token slot is one."""
    branches = np.full((4, 2, 3), -1)
    branches[1, 0] = [-1, 98, 99]  # no first token: not a branch
    branches[1, 1, :1] = [20]
    r = with_branches(_row(4), branches, 64)
    assert r["input_ids"].tolist() == [10, 11, 12, 13, 20]
    assert r["anchor"].tolist()[4:] == [1] and r["position_weight"].tolist()[4:] == [0.25]


def test_token_id_zero_is_a_branch_token_not_padding():
    """Id 0 is a token (padding is -1): a branch starting with 0, or holding 0, is kept whole."""
    row = _row(3)
    row["target_ids"][1], row["target_probs"][1] = [0, 12], [0.6, 0.4]
    branches = np.full((3, 1, 4), -1)
    branches[1, 0, :3] = [0, 5, 0]
    r = with_branches(row, branches, 64)
    assert r["input_ids"].tolist() == [10, 11, 12, 0, 5, 0]
    assert r["position_ids"].tolist()[3:] == [2, 3, 4]
    assert r["target_ids"][3:, 0].tolist() == [5, 0, -1]
    assert r["labels_mask"].tolist()[3:] == [False, True, True]
    np.testing.assert_allclose(r["position_weight"][3:], [0.6] * 3)


def test_branches_fill_the_row_up_to_exactly_max_length():
    """Branches are appended while the whole tree fits max_length: one ending exactly at
    max_length is kept, the next one, passing it, is left out (the lengths add up)."""
    branches = np.full((4, 2, 3), -1)
    branches[1, 0] = [12, 40, 41]  # 4 + 3 = 7
    branches[1, 1, :2] = [20, 21]  # 7 + 2 = 9
    branches[2, 0, :2] = [30, 31]  # 9 + 2 = 11
    r = with_branches(_row(4), branches, 9)
    assert r["input_ids"].tolist() == [10, 11, 12, 13, 12, 40, 41, 20, 21]
    assert r["segment"].tolist()[4:] == [0, 0, 0, 1, 1]
    np.testing.assert_allclose(r["position_weight"][4:], [0.75] * 3 + [0.25] * 2)
    assert with_branches(_row(4), branches, 8)["input_ids"].tolist() == [10, 11, 12, 13, 12, 40, 41]
    assert len(with_branches(_row(4), branches, 11)["input_ids"]) == 11


def test_no_branch_after_the_rows_last_token():
    """A branch at the row's last position (no next token there to teach its first) is
    left out: the row stays plain."""
    row = _row(4)
    row["target_ids"][3], row["target_probs"][3] = [50, 13], [0.5, 0.5]
    branches = np.full((4, 1, 2), -1)
    branches[3, 0] = [50, 51]
    r = with_branches(row, branches, 64)
    assert "segment" not in r and r["input_ids"].tolist() == [10, 11, 12, 13]


def test_a_tree_row_keeps_a_plain_rows_dtypes():
    """A tree row's arrays keep a plain row's dtypes (int64 ids, float32 probabilities and
    weights, bool labels), so no float64 reaches a batch or a loss."""
    branches = np.full((4, 2, 3), -1)
    branches[1, 1] = [20, 21, 22]
    branches[2, 0, :2] = [30, 31]
    r = with_branches(_row(4), branches, 64)
    want = {"input_ids": np.int64, "labels_mask": np.bool_, "target_ids": np.int64,
            "target_probs": np.float32, "position_ids": np.int64, "segment": np.int64,
            "anchor": np.int64, "position_weight": np.float32}  # fmt: skip
    assert {k: v.dtype for k, v in r.items()} == {k: np.dtype(v) for k, v in want.items()}


# --------------------------------------------------------------------------- masks and batches


def test_tree_mask_by_hand_with_a_branch_numbered_0():
    """The mask of a row (3 tokens), branch 0 off position 0, branch 1 off 1, then padding:
    segment 0 is a branch, not the row; padding sees itself and no branch or padding token."""
    seg = torch.tensor([[-1, -1, -1, 0, 0, 1, -1, -1]])
    anchor = torch.tensor([[-1, -1, -1, 0, 0, 1, -1, -1]])
    m = tree_mask(seg, anchor, torch.tensor([6]))[0, 0].int().tolist()
    assert m[:6] == [
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 0, 0, 1, 0, 0, 0, 0],  # branch 0: the row up to 0, then itself
        [1, 0, 0, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0, 1, 0, 0],  # branch 1: the row up to 1, not branch 0
    ]
    assert m[6][3:] == [0, 0, 0, 1, 0] and m[7][3:] == [0, 0, 0, 0, 1]


def test_a_batch_pads_by_hand_with_the_dtypes_the_model_and_loss_take():
    """A plain row before a tree row: ids pad with 0, labels with False, target ids with -1,
    probabilities with 0; a plain row's positions count on and weigh 1; ids are int64,
    probabilities and weights float32, the mask boolean."""
    tree = with_branches(_row(4), _branches_at(1, [20, 21]), 64)
    b = collate_rows([_row(3), tree])
    assert b["input_ids"].tolist() == [[10, 11, 12, 0, 0, 0], [10, 11, 12, 13, 20, 21]]
    assert b["labels_mask"].tolist() == [[True] * 3 + [False] * 3, [True] * 4 + [False, True]]
    assert b["target_ids"][0, 3:].tolist() == [[-1, -1]] * 3
    assert b["target_ids"][1, 4:].tolist() == [[21, -1], [-1, -1]]
    assert b["target_probs"][0, 3:].tolist() == [[0, 0]] * 3
    assert b["target_probs"][1, 4:].tolist() == [[1, 0], [0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 2, 3]]
    assert b["position_weight"].tolist() == [[1] * 6, [1, 1, 1, 1, 0.25, 0.25]]
    assert (b["input_ids"].dtype, b["target_ids"].dtype) == (torch.int64, torch.int64)
    assert (b["target_probs"].dtype, b["position_weight"].dtype) == (torch.float32,) * 2
    assert (b["labels_mask"].dtype, b["attention_mask"].dtype) == (torch.bool, torch.bool)


def test_a_padded_tree_rows_padding_sees_no_branch():
    """A tree row padded beside a longer row: its padding positions attend to themselves and
    to no branch token or other padding."""
    tree = with_branches(_row(4), _branches_at(1, [20, 21]), 64)  # 6 tokens, branch at 4, 5
    m = collate_rows([tree, _row(8)])["attention_mask"][0, 0].int().tolist()
    assert m[6][4:] == [0, 0, 1, 0] and m[7][4:] == [0, 0, 0, 1]


def test_a_plain_batch_pads_with_a_0_1_mask_and_needs_no_targets():
    """Plain rows: a (B, T) 0/1 int64 attention mask; rows without targets (the CLM
    baseline) give a batch without them."""
    rows = [{"input_ids": np.array([5, 6]), "labels_mask": np.array([False, True])},
            {"input_ids": np.array([7, 8, 9]), "labels_mask": np.array([True, True, True])}]  # fmt: skip
    b = collate_rows(rows)
    assert set(b) == {"input_ids", "attention_mask", "labels_mask"}
    assert b["input_ids"].tolist() == [[5, 6, 0], [7, 8, 9]]
    assert b["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert b["attention_mask"].dtype == torch.int64
    assert b["labels_mask"].tolist() == [[False, True, False], [True, True, True]]


# --------------------------------------------------------------------------- reading a stage

_PAD16 = 65535  # a uint16 shard's padding id


def _stage_folder(folder: Path, kind: str, shards: list[list[dict]], **key) -> Path:
    """A finished ``kind`` stage output holding ``shards``, written as the stages write it."""
    key = {"stage": kind, **key}
    begin_stage(folder, key)
    sums = {i: save_shard(folder, i, rows, kind) for i, rows in enumerate(shards)}
    finish_stage(folder, key, len(shards), {}, sums)
    return folder


def _fused(ids: list[int], branch: tuple[int, list[int]] | None = None) -> dict:
    """A fused row (uint16 ids): the target at 1 gives 20 probability 0.25; ``branch``: the
    source's continuation (t, tokens) in a (T, 1, 2) ``pos.branch_ids``."""
    n = len(ids)
    tids, probs = np.full((n, 2), _PAD16, np.uint16), np.zeros((n, 2), np.float16)
    tids[:, 0], probs[:, 0] = np.array(ids) + 1, 1.0
    tids[1], probs[1] = [ids[1] + 1, 20], [0.75, 0.25]
    row = {"pos.input_ids": np.array(ids, np.uint16), "pos.labels_mask": np.arange(n) > 0,
           "pos.target_ids": tids, "pos.target_probs": probs, "row.index": np.int64(ids[0]),
           "row.weights": np.array([0.5, 0.5], np.float32)}  # fmt: skip
    if branch is not None:
        b = np.full((n, 1, 2), _PAD16, np.uint16)
        b[branch[0], 0, : len(branch[1])] = branch[1]
        row["pos.branch_ids"] = b
    return row


def test_shard_rows_reads_each_row_of_each_shard_cut_at_max_length(tmp_path):
    """Rows across shards read back whole, cut at max_length, with int64 ids (uint16
    padding -1) and float32 probabilities."""
    folder = _stage_folder(tmp_path / "f", "fuse", [[_fused([10, 11, 12]), _fused([20, 21, 22, 23, 24])],
                                                    [_fused([30, 31, 32, 33])]])  # fmt: skip
    data = ShardRows(folder, 4, with_targets=True)
    assert len(data) == 3
    assert [data[i]["input_ids"].tolist() for i in range(3)] == [
        [10, 11, 12], [20, 21, 22, 23], [30, 31, 32, 33]]  # fmt: skip
    r = data[0]
    assert r["labels_mask"].tolist() == [False, True, True]
    assert r["target_ids"].tolist() == [[11, -1], [12, 20], [13, -1]]
    assert r["target_probs"].tolist() == [[1, 0], [0.75, 0.25], [1, 0]]
    assert (r["input_ids"].dtype, r["target_ids"].dtype) == (np.int64, np.int64)
    assert r["target_probs"].dtype == np.float32
    assert "segment" not in r


def test_shard_rows_grows_trees_only_for_fusion_training(tmp_path):
    """Fused rows with branches give trees weighted by branch_weight, also when the last
    shard is empty (every row dropped); without targets (CLM) the rows stay plain."""
    rows = [_fused([10, 11, 12, 13], branch=(1, [20, 21]))]
    folder = _stage_folder(tmp_path / "f", "fuse", [rows, []])
    r = ShardRows(folder, 64, with_targets=True, branch_weight=0.5)[0]
    assert r["input_ids"].tolist() == [10, 11, 12, 13, 20, 21]
    assert r["anchor"].tolist() == [-1] * 4 + [1, 1]
    assert r["position_weight"].tolist() == [1, 1, 1, 1, 0.125, 0.125]
    plain = ShardRows(folder, 64, with_targets=False)[0]
    assert set(plain) == {"input_ids", "labels_mask"}
    assert plain["input_ids"].tolist() == [10, 11, 12, 13]


def test_shard_rows_refuses_an_output_without_rows_or_with_a_damaged_shard(tmp_path):
    """No rows at all, or a shard whose bytes changed since the manifest: an error first."""
    with pytest.raises(FusechatError, match="holds no rows"):
        ShardRows(_stage_folder(tmp_path / "empty", "fuse", [[]]), 64, with_targets=True)
    folder = _stage_folder(tmp_path / "f", "fuse", [[_fused([10, 11, 12])]])
    shard = folder / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(FusechatError, match="damaged"):
        ShardRows(folder, 64, with_targets=True)


def test_a_capture_output_feeds_only_the_clm_baseline(tmp_path):
    """A pivot capture reads as plain rows without targets; fusion training refuses it."""
    row = {"pos.input_ids": np.array([5, 6, 7], np.uint16), "pos.labels_mask": np.array([0, 1, 1], bool),
           "pos.byte_end": np.arange(3, dtype=np.int32), "pos.topk_ids": np.zeros((3, 2), np.uint16),
           "pos.topk_logprobs": np.zeros((3, 2), np.float16), "pos.gold_logprob": np.zeros(3, np.float16),
           "row.index": np.int64(0), "row.nll_sum": np.float64(0), "row.n_tokens": np.int64(2),
           "row.n_chars": np.int64(3), "row.text_hash": np.uint64(0), "row.truncated": np.bool_(False)}  # fmt: skip
    folder = _stage_folder(tmp_path / "cap", "capture", [[row]])
    r = ShardRows(folder, 64, with_targets=False)[0]
    assert r["input_ids"].tolist() == [5, 6, 7] and r["labels_mask"].tolist() == [False, True, True]
    with pytest.raises(FusechatError, match="capture output; fusion training needs fused targets"):
        ShardRows(folder, 64, with_targets=True)


def test_shard_rows_travel_to_dataloader_workers(tmp_path):
    """A reader that has opened its shards pickles (as DataLoader workers receive it) without
    its handles and reads the same rows on the other side."""
    folder = _stage_folder(tmp_path / "f", "fuse", [[_fused([10, 11, 12])], [_fused([30, 31])]])
    data = ShardRows(folder, 64, with_targets=True)
    assert data[1]["input_ids"].tolist() == [30, 31]  # opens shard 1
    clone = pickle.loads(pickle.dumps(data))
    assert [clone[i]["input_ids"].tolist() for i in range(2)] == [[10, 11, 12], [30, 31]]


# --------------------------------------------------------------------------- the data's key


def _tokenizer(vocab: dict[str, int]) -> SimpleNamespace:
    return SimpleNamespace(get_vocab=lambda: vocab, name_or_path="tok")


def test_targets_must_come_from_the_models_tokenizer_and_the_corpus():
    """A fused output's pivot vocabulary (or a capture's own) must be the model's: same
    tokens under other ids is another tokenizer; the corpus is checked only when given."""
    tok = _tokenizer({"a": 0, "b": 1})
    fp, other = tokenizer_fingerprint(tok), tokenizer_fingerprint(_tokenizer({"b": 0, "a": 1}))
    fused = {"stage": "fuse", "pivot_tokenizer_fingerprint": fp, "corpus_fingerprint": "c1"}
    check_targets(fused, tok, "c1")
    check_targets(fused, tok, None)
    check_targets({"stage": "capture", "tokenizer_fingerprint": fp}, tok, None)
    for key in ({**fused, "pivot_tokenizer_fingerprint": other},
                {"stage": "capture", "tokenizer_fingerprint": other}):  # fmt: skip
        with pytest.raises(FusechatError, match="another tokenizer"):
            check_targets(key, tok, None)
    with pytest.raises(FusechatError, match="another corpus"):
        check_targets(fused, tok, "c2")

"""The training data: rows of a ``fuse`` output (or a pivot capture), read lazily and batched."""

from __future__ import annotations

import os

import numpy as np
import torch
from safetensors import safe_open

from fusechat.errors import FusechatError
from fusechat.io import read_manifest, tokenizer_fingerprint
from fusechat.shards import StageReader, shard_name, unpack_ids


class ShardRows(torch.utils.data.Dataset):
    """Rows of a ``fuse`` output (or, for the CLM baseline, of a pivot ``capture``), read
    lazily by memory-mapped slices: nothing holds the whole corpus in memory."""

    def __init__(self, folder: str | os.PathLike, max_length: int, with_targets: bool,
                 branch_weight: float = 1.0):  # fmt: skip
        """``branch_weight``: the weight of the sources' continuations (``align.branches``),
        the fusion term's ``1 - lambda`` in training: they are the teachers' text, not the
        corpus's."""
        stage = read_manifest(folder)
        kind = (stage or {}).get("key", {}).get("stage", "fuse")
        self.reader = StageReader(folder, kind)
        self.reader.verify()
        if with_targets and kind != "fuse":
            raise FusechatError(
                f"{folder}: is a {kind} output; fusion training needs fused targets"
            )
        self.with_targets = with_targets
        self.max_length = max_length
        self.branch_weight = branch_weight
        self.index: list[tuple[int, int, int]] = []  # (shard, start, end)
        self.branches = False  # fused rows carry the sources' continuations (align.branches)
        for s in range(self.reader.n_shards):
            with safe_open(self.reader.folder / shard_name(s), framework="np") as f:
                splits = f.get_tensor("row.splits")
                self.branches |= with_targets and "pos.branch_ids" in f.keys()
            self.index += [
                (s, int(a), int(b)) for a, b in zip(splits[:-1], splits[1:], strict=True)
            ]
        self._handles: dict[int, object] = {}
        if not self.index:
            raise FusechatError(f"{folder}: holds no rows")

    def __len__(self) -> int:
        return len(self.index)

    def _slice(self, s: int, key: str, a: int, b: int) -> np.ndarray:
        f = self._handles.get(s)
        if f is None:
            f = self._handles[s] = safe_open(self.reader.folder / shard_name(s), framework="np")
        return f.get_slice(key)[a:b]

    def __getitem__(self, i: int) -> dict:
        s, a, b = self.index[i]
        b = min(b, a + self.max_length)
        row = {
            "input_ids": unpack_ids(self._slice(s, "pos.input_ids", a, b)),
            "labels_mask": self._slice(s, "pos.labels_mask", a, b).astype(bool),
        }
        if self.with_targets:
            row["target_ids"] = unpack_ids(self._slice(s, "pos.target_ids", a, b))
            row["target_probs"] = self._slice(s, "pos.target_probs", a, b).astype(np.float32)
        if self.branches:
            row = with_branches(row, unpack_ids(self._slice(s, "pos.branch_ids", a, b)),
                                self.max_length, self.branch_weight)  # fmt: skip
        return row

    def __getstate__(self):  # DataLoader workers open their own handles
        return {**self.__dict__, "_handles": {}}


def with_branches(row: dict, branch_ids: np.ndarray, max_length: int, scale: float = 1.0) -> dict:
    """The row followed by the source's own continuations of its alternatives (``branch_ids``
    (T, K, L), -1 padding), as one token tree: a branch at position t continues the row's
    prefix up to t, at positions t + 1, t + 2, ... (``position_ids``), and sees only that
    prefix and itself (``anchor``: t; ``segment``: its number, -1 for the row). Learned are a
    branch's tokens after its first, whose probability the fused target at t already teaches;
    their target is the token itself, their ``position_weight`` that probability times
    ``scale``. Branches are added in position order until the next would pass ``max_length``:
    it and every later one are left out."""
    n = len(row["input_ids"])
    ids, pos, seg, anchor = [row["input_ids"]], [np.arange(n)], [np.full(n, -1)], [np.full(n, -1)]
    weight = [np.ones(n, dtype=np.float32)]
    labels, tgt, prob = [row["labels_mask"]], [row["target_ids"]], [row["target_probs"]]
    k, total = row["target_ids"].shape[1], n
    for b, (t, slot) in enumerate(zip(*np.nonzero(branch_ids[: n - 1, :, 0] >= 0), strict=True)):
        br = branch_ids[t, slot][branch_ids[t, slot] >= 0]
        if total + len(br) > max_length:
            break
        total += len(br)
        ids.append(br)
        pos.append(t + 1 + np.arange(len(br)))
        seg.append(np.full(len(br), b))
        anchor.append(np.full(len(br), t))
        labels.append(np.arange(len(br)) > 0)
        target = np.full((len(br), k), -1, dtype=np.int64)
        target[:-1, 0] = br[1:]  # each branch token predicts the next one of its branch
        p = np.zeros((len(br), k), dtype=np.float32)
        p[:-1, 0] = 1.0
        # each branch position weighs by its alternative's probability in the fused target at
        # t: the expected loss over the source's continuations, not one full row per branch
        weight.append(np.full(len(br), scale * row["target_probs"][t][row["target_ids"][t] == br[0]].sum(),
                              dtype=np.float32))  # fmt: skip
        tgt.append(target)
        prob.append(p)
    if len(ids) == 1:
        return row
    cat = np.concatenate
    return {"input_ids": cat(ids), "labels_mask": cat(labels), "target_ids": cat(tgt),
            "target_probs": cat(prob), "position_ids": cat(pos), "segment": cat(seg),
            "anchor": cat(anchor), "position_weight": cat(weight)}  # fmt: skip


def tree_mask(segment: torch.Tensor, anchor: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) boolean attention of a batch of token trees: a row token sees the row's
    tokens up to itself, a branch token the row's up to its anchor and its branch's up to
    itself; a padding position (at and after ``length``) sees itself and the row's tokens
    before it, never another padding position or a branch (its outputs are never read)."""
    L = segment.shape[1]
    q, kk = torch.arange(L)[:, None], torch.arange(L)[None, :]
    seg_q, seg_k = segment[:, :, None], segment[:, None, :]
    upto = torch.where(seg_q < 0, q, anchor[:, :, None])  # the last row token a query sees
    see = ((seg_k < 0) & (kk <= upto)) | ((seg_k == seg_q) & (seg_q >= 0) & (kk <= q))
    pad = torch.arange(L)[None, :] >= length[:, None]
    see &= ~pad[:, None, :]
    see |= pad[:, :, None] & (q == kk)[None]
    return see[:, None]


def collate_rows(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Right-pad a batch; target ids pad with -1 and probabilities with 0."""
    n = max(len(r["input_ids"]) for r in rows)
    out = {
        "input_ids": torch.zeros((len(rows), n), dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), n), dtype=torch.long),
        "labels_mask": torch.zeros((len(rows), n), dtype=torch.bool),
    }
    if "target_ids" in rows[0]:
        k = rows[0]["target_ids"].shape[1]
        out["target_ids"] = torch.full((len(rows), n, k), -1, dtype=torch.long)
        out["target_probs"] = torch.zeros((len(rows), n, k), dtype=torch.float32)
    for i, r in enumerate(rows):
        t = len(r["input_ids"])
        out["input_ids"][i, :t] = torch.from_numpy(r["input_ids"])
        out["attention_mask"][i, :t] = 1
        out["labels_mask"][i, :t] = torch.from_numpy(r["labels_mask"])
        if "target_ids" in out:
            out["target_ids"][i, :t] = torch.from_numpy(r["target_ids"])
            out["target_probs"][i, :t] = torch.from_numpy(r["target_probs"])
    if any("segment" in r for r in rows):  # token trees: positions, weights and a 4D mask
        pos = torch.arange(n).repeat(len(rows), 1)
        seg = torch.full((len(rows), n), -1, dtype=torch.long)
        anchor = torch.full((len(rows), n), -1, dtype=torch.long)
        weight = torch.ones((len(rows), n))
        for i, r in enumerate(rows):
            if "segment" in r:
                t = len(r["input_ids"])
                pos[i, :t] = torch.from_numpy(r["position_ids"])
                seg[i, :t] = torch.from_numpy(r["segment"])
                anchor[i, :t] = torch.from_numpy(r["anchor"])
                weight[i, :t] = torch.from_numpy(r["position_weight"])
        out["position_ids"], out["position_weight"] = pos, weight
        out["attention_mask"] = tree_mask(seg, anchor, out["attention_mask"].sum(1))
    return out


def check_targets(data_key: dict, tokenizer, corpus_fp: str | None) -> None:
    """Reject targets made for another tokenizer or corpus before any training."""
    want = data_key.get("pivot_tokenizer_fingerprint") or data_key.get("tokenizer_fingerprint")
    got = tokenizer_fingerprint(tokenizer)
    if want != got:
        raise FusechatError(
            f"the training data was made with another tokenizer than {tokenizer.name_or_path} "
            f"(vocabulary fingerprint {want} vs {got})"
        )
    if corpus_fp is not None and data_key.get("corpus_fingerprint") != corpus_fp:
        raise FusechatError(
            f"the training data was made from another corpus "
            f"(fingerprint {data_key.get('corpus_fingerprint')} vs {corpus_fp})"
        )

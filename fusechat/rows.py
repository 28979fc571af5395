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

    def __init__(self, folder: str | os.PathLike, max_length: int, with_targets: bool):
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
        self.index: list[tuple[int, int, int]] = []  # (shard, start, end)
        for s in range(self.reader.n_shards):
            with safe_open(self.reader.folder / shard_name(s), framework="np") as f:
                splits = f.get_tensor("row.splits")
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
        return row

    def __getstate__(self):  # DataLoader workers open their own handles
        return {**self.__dict__, "_handles": {}}


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

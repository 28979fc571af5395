"""Sparse next-token distributions: rows of ``(ids, probs)`` of shape (T, K).

``probs[t, k]`` is the probability of token ``ids[t, k]``; padding has id -1 and probability 0;
before ``combine_duplicates`` an id may repeat (its probabilities add). Nothing here is ever
vocabulary-sized: a top-10 distribution over a 262k vocabulary stays 10 wide.
"""

from __future__ import annotations

import numpy as np

Sparse = tuple[np.ndarray, np.ndarray]


def map_topk(
    ids: np.ndarray, logprobs: np.ndarray, vocab_map: np.ndarray, renormalize: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Send a source's top-K ``(ids, logprobs)`` through ``vocab_map`` (source id -> pivot id
    or -1). Returns pivot ids, probabilities (renormalised over the mapped entries unless told
    otherwise) and the mapped mass per position, ``sum_k p_k [map(id_k) >= 0]``."""
    pid = np.where(ids >= 0, vocab_map[np.clip(ids, 0, None)], -1)
    p = np.where(pid >= 0, np.exp(logprobs.astype(np.float64)), 0.0)
    mass = p.sum(-1)
    if renormalize:
        p = p / np.where(mass > 0, mass, 1.0)[:, None]
    return pid, p.astype(np.float32), mass


def combine_duplicates(ids: np.ndarray, probs: np.ndarray) -> Sparse:
    """One entry per id and position: probabilities of repeated ids added, ids sorted
    ascending with padding (-1, probability 0) first. Keeps the width K, so rows stay
    rectangular; an entropy (for a KL loss) is then exact."""
    order = np.argsort(ids, axis=1, kind="stable")
    ids_s = np.take_along_axis(ids, order, 1)
    p_s = np.take_along_axis(probs, order, 1)
    start = np.ones_like(ids_s, dtype=bool)
    start[:, 1:] = ids_s[:, 1:] != ids_s[:, :-1]
    slot = np.cumsum(start, axis=1) - 1
    rows = np.broadcast_to(np.arange(len(ids))[:, None], ids.shape)
    out_ids = np.full_like(ids, -1)
    out_ids[rows, slot] = ids_s
    # the sums by (row, slot): bincount over flat indices, far faster than np.add.at
    flat = (rows * ids.shape[1] + slot).ravel()
    out_p = np.bincount(flat, p_s.ravel().astype(np.float64), ids.size).reshape(ids.shape)
    out_p[out_ids < 0] = 0.0
    return out_ids, out_p.astype(np.float32)


def top_k(ids: np.ndarray, probs: np.ndarray, k: int) -> Sparse:
    """Per row: repeated ids combined, the ``k`` most probable kept (width exactly ``k``) and
    renormalised to sum to 1 (rows with no mass stay all padding)."""
    ids, probs = combine_duplicates(ids, probs.astype(np.float64))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    ids = np.take_along_axis(ids, order, 1)
    probs = np.take_along_axis(probs, order, 1).astype(np.float64)
    ids = np.where(probs > 0, ids, -1)
    total = probs.sum(1, keepdims=True)
    probs = np.where(total > 0, probs / np.where(total > 0, total, 1.0), 0.0)
    if ids.shape[1] < k:
        pad = k - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        probs = np.pad(probs, ((0, 0), (0, pad)))
    return ids, probs.astype(np.float32)

"""Fuse sparse next-token distributions over the pivot's vocabulary (MinCE, AvgCE).

A sparse distribution over T positions is a pair ``(ids, probs)`` of arrays of shape (T, K):
``probs[t, k]`` is the probability of pivot token ``ids[t, k]``; padding has id -1 and
probability 0; an id may repeat (its probabilities add). Nothing is ever vocabulary-sized.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def sequence_weights(ces: Sequence[float], method: str) -> np.ndarray:
    """Per-model weights of one sequence from its cross-entropies ``ce_m`` against the gold text.

    ``minCE``: ``w_m = 1`` for the lowest ``ce_m`` (the first on ties), else 0.
    ``avgCE``: ``w_m = softmax(-ce)_m = exp(-ce_m) / sum_n exp(-ce_n)``.
    """
    ce = np.asarray(ces, dtype=np.float64)
    if method == "minCE":
        w = np.zeros_like(ce)
        w[int(np.argmin(ce))] = 1.0
        return w
    if method == "avgCE":
        z = np.exp(-(ce - ce.min()))
        return z / z.sum()
    raise ValueError(f"unknown fusion method {method!r} (minCE or avgCE)")


def fuse(
    dists: Sequence[Sparse], valid: Sequence[np.ndarray], ces: Sequence[float], method: str
) -> Sparse:
    """Fuse M sparse distributions of one sequence; model 0 must be the pivot (always valid).

    Per position t, ``fused_t = sum_m w_m [valid_m,t] p_m,t / sum_m w_m [valid_m,t]``: a model
    without an aligned distribution at t gives its weight to the others, and where none of the
    chosen models is valid the pivot's own distribution is kept. The result concatenates the
    models' entries (K_fused = sum of K_m), so it stays sparse.
    """
    w = sequence_weights(ces, method)
    wt = np.stack([w[m] * np.asarray(v, dtype=np.float64) for m, v in enumerate(valid)])  # (M, T)
    total = wt.sum(0)
    wt[0] = np.where(total > 0, wt[0], 1.0)  # nobody chosen is valid here: the pivot's own
    wt /= wt.sum(0, keepdims=True)
    ids = np.concatenate([d[0] for d in dists], axis=1)
    probs = np.concatenate([d[1] * wt[m][:, None] for m, d in enumerate(dists)], axis=1)
    probs = np.where(ids >= 0, probs, 0.0)
    return ids, probs.astype(np.float32)


def sparse_ce(target: Sparse, logprobs_at: np.ndarray) -> np.ndarray:
    """Cross-entropy per position of a sparse target against a student:
    ``CE_t = -sum_k p_t,k * log q_t(ids_t,k)`` where ``logprobs_at[t, k] = log q_t(ids_t,k)``."""
    ids, probs = target
    return -(np.where(ids >= 0, probs * logprobs_at, 0.0)).sum(-1)


def finite_rows(*arrays: np.ndarray) -> bool:
    """False when any array holds NaN or inf (such a sequence is dropped and counted)."""
    return all(np.isfinite(a).all() for a in arrays if a.dtype.kind == "f")

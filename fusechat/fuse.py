"""Fuse sparse next-token distributions over the pivot's vocabulary (MinCE, AvgCE).

Distributions are sparse, ``(ids, probs)`` rows over the pivot's vocabulary (``fusechat.sparse``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fusechat.configs import FuseConfig
from fusechat.sparse import Sparse, combine_duplicates

log = logging.getLogger(__name__)


def sequence_weights(ces: Sequence[float] | np.ndarray, method: str) -> np.ndarray:
    """Per-model weights from cross-entropies ``ce_m`` against the gold text: of one sequence
    (M,), or of every position (M, T), each column on its own.

    ``minCE``: ``w_m = 1`` for the lowest ``ce_m`` (the first on ties), else 0.
    ``avgCE``: ``w_m = softmax(-ce)_m = exp(-ce_m) / sum_n exp(-ce_n)``.
    """
    ce = np.asarray(ces, dtype=np.float64)
    if method == "minCE":
        w = np.zeros_like(ce)
        np.put_along_axis(w, np.expand_dims(np.argmin(ce, axis=0), 0), 1.0, axis=0)
        return w
    if method == "avgCE":
        z = np.exp(-(ce - ce.min(axis=0)))
        return z / z.sum(axis=0)
    raise ValueError(f"unknown fusion method {method!r} (minCE or avgCE)")


def turn_ce(row: dict, norm: str) -> tuple[np.ndarray, np.ndarray]:
    """A captured row's assistant turns, in order: the maximal runs ``[a, b)`` of positions
    predicting a learned token (as (n, 2) bounds), and each turn's cross-entropy
    against the gold text, ``-sum_t log p(gold_t+1) / n`` with ``n`` its learned tokens
    (``norm='token'``) or the bytes they cover (``'char'``: the same text for every model)."""
    from fusechat.losses import learned_next

    learned = learned_next(row["pos.labels_mask"]).astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], learned, [0]])))
    bounds = edges.reshape(-1, 2)  # [a, b): positions a..b-1 predict tokens a+1..b
    nll = np.concatenate([[0.0], np.cumsum(-row["pos.gold_logprob"].astype(np.float64) * learned)])
    a, b = bounds[:, 0], bounds[:, 1]
    ends = row["pos.byte_end"].astype(np.int64)
    n = (b - a) if norm == "token" else (ends[b] - ends[a])
    return bounds, (nll[b] - nll[a]) / np.maximum(n, 1)


def turn_ces(
    pivot_row: dict, source_rows: Sequence[dict], norm: str, sequence: Sequence[float]
) -> np.ndarray | None:
    """(M, T) cross-entropies for per-turn MinCE/AvgCE, pivot first: at each position of the
    pivot's k-th assistant turn, each model's cross-entropy on its own k-th turn (the same
    text), ``inf`` for a model whose (truncated) row does not reach it; elsewhere (positions
    nothing is learned at) the models' ``sequence`` cross-entropies. None when the turns do
    not pair up (a model with more turns than an untruncated pivot)."""
    bounds, piv = turn_ce(pivot_row, norm)
    out = np.repeat(np.asarray(sequence, np.float64)[:, None], len(pivot_row["pos.labels_mask"]), 1)
    for m, row in enumerate([pivot_row, *source_rows]):
        ce = piv if m == 0 else turn_ce(row, norm)[1]
        if len(ce) > len(piv) and not pivot_row["row.truncated"]:
            return None
        for k, (a, b) in enumerate(bounds):
            out[m, a:b] = ce[k] if k < len(ce) else np.inf
    return out


def fuse(
    dists: Sequence[Sparse],
    valid: Sequence[np.ndarray],
    ces: Sequence[float],
    method: str,
    fallback: Sparse | None = None,
) -> Sparse:
    """Fuse M sparse distributions of one sequence; model 0 must be the pivot (always valid).
    ``ces``: the models' cross-entropies on the sequence (M,) or at each position (M, T).

    Per position t, ``fused_t = sum_m w_m [valid_m,t] p_m,t / sum_m w_m [valid_m,t]``: a model
    without an aligned distribution at t gives its weight to the others. Where none of the
    chosen models is valid, ``fallback`` is the target (FuseChat-2.0: one-hot on the gold next
    token) or, without one (or where it is empty), the pivot's own (FuseLLM). The result concatenates
    the models' entries (K_fused = sum of K_m), so it stays sparse.
    """
    w = sequence_weights(ces, method)  # (M,), or (M, T) per turn
    wt = np.stack([w[m] * np.asarray(v, dtype=np.float64) for m, v in enumerate(valid)])  # (M, T)
    nobody = wt.sum(0) <= 0
    use_fb = nobody & (fallback[1].sum(1) > 0) if fallback is not None else np.zeros_like(nobody)
    wt[0] = np.where(nobody & ~use_fb, 1.0, wt[0])  # no fallback there (the last position)
    if fallback is not None:
        dists, wt = [*dists, fallback], np.vstack([wt, use_fb.astype(np.float64)])
    wt /= wt.sum(0, keepdims=True)
    ids = np.concatenate([d[0] for d in dists], axis=1)
    probs = np.concatenate([d[1] * wt[m][:, None] for m, d in enumerate(dists)], axis=1)
    return combine_duplicates(ids, np.where(ids >= 0, probs, 0.0))


# --------------------------------------------------------------------------- the stage

VERSION = 3  # 2: the unaligned setting; 3: shard checksums in the manifest


def sequence_ce(row: dict, norm: str) -> float:
    """A row's cross-entropy against the gold text: NLL of its learned tokens per token
    (``norm='token'``, the reference's) or per character (``'char'``, comparable across
    tokenizers that cut the same text into different numbers of tokens)."""
    n = row["row.n_tokens"] if norm == "token" else row["row.n_chars"]
    return float(row["row.nll_sum"]) / float(n) if n > 0 else float("nan")


def fuse_stage(
    pivot_dir: str | os.PathLike,
    aligned_dirs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    cfg: FuseConfig | None = None,
    overwrite: bool = False,
) -> dict:
    """Fuse the pivot's captured distributions with aligned sources' (``fusechat fuse``).

    Output rows carry the pivot's ``pos.input_ids`` and ``pos.labels_mask``, the sparse fused
    target (``pos.target_ids``, ``pos.target_probs``) and ``row.weights`` (per model, pivot
    first). Where no chosen model has a distribution, the target is one-hot on the gold next
    token (``unaligned='gold'``) or the pivot's own distribution (``'pivot'``). Rows with no
    learned token are dropped and counted. Shards are spread over ``cfg.workers`` processes
    (the same output as one).
    """
    from fusechat.errors import FusechatError
    from fusechat.io import fingerprint
    from fusechat.sharding import run_sharded
    from fusechat.shards import StageReader

    cfg = cfg or FuseConfig()
    if not aligned_dirs:
        raise FusechatError("fuse needs at least one aligned source")
    piv = StageReader(pivot_dir, "capture")
    srcs = [StageReader(d, "align") for d in aligned_dirs]
    for s in srcs:
        if s.key["pivot_capture"] != fingerprint(piv.key):
            raise FusechatError(f"{s.folder}: aligned to another pivot capture than {pivot_dir}")
    for r in (piv, *srcs):
        r.check_complete()
    key = fuse_key(piv, srcs, cfg)

    captures, caps = _source_captures(srcs) if cfg.unit == "turn" else ((), [])

    def start(done: frozenset[int]) -> tuple:
        job = _FuseJob(str(pivot_dir), tuple(map(str, aligned_dirs)), str(out), cfg, done,
                       captures)  # fmt: skip
        return (piv, srcs, caps, job), job

    def summarize(parts: list) -> dict:
        kept = sum(p[0] for p in parts)
        weight_sum = sum((p[2] for p in parts), np.zeros(1 + len(srcs)))
        stats = {
            "rows": kept,
            "dropped_empty": sum(p[1] for p in parts),
            "mean_weights": (weight_sum / max(kept, 1)).round(4).tolist(),
            "pivot_capture": str(pivot_dir),
            "aligned": [str(d) for d in aligned_dirs],
            "pivot_model": piv.key["model"],
        }
        log.info("fused %d rows (%d dropped: nothing learned); mean weights %s",
                 kept, stats["dropped_empty"], stats["mean_weights"])  # fmt: skip
        return stats

    return run_sharded(out, key, piv.n_shards, start, _fuse_shard, summarize, overwrite,
                       cfg.workers, _fuse_setup, f"fuse {Path(out).name}",
                       inputs=(pivot_dir, *aligned_dirs, *captures))  # fmt: skip


def fuse_key(piv, srcs: list, cfg: FuseConfig) -> dict:
    """What names a fuse folder: the pivot capture, the alignments in order, the settings."""
    from fusechat.io import fingerprint

    return {"stage": "fuse", "version": VERSION, "pivot_capture": fingerprint(piv.key),
            "aligned": [fingerprint(s.key) for s in srcs], "method": cfg.method,
            "ce_norm": cfg.ce_norm, "unit": cfg.unit, "unaligned": cfg.unaligned,
            "shard_rows": piv.key["shard_rows"],
            # what training checks its model and corpus against
            "pivot_tokenizer_fingerprint": piv.key["tokenizer_fingerprint"],
            "corpus_fingerprint": piv.key["corpus_fingerprint"], "pivot_model": piv.key["model"]}  # fmt: skip


def _source_captures(srcs: list) -> tuple[tuple[str, ...], list]:
    """Per-turn choice reads each source's own gold log-probabilities: the captures the
    alignments were made from, checked to be those."""
    from fusechat.errors import FusechatError
    from fusechat.io import fingerprint
    from fusechat.shards import StageReader

    captures = tuple(s.manifest["stats"]["source_capture"] for s in srcs)
    caps = [StageReader(c, "capture") for c in captures]
    for c, s in zip(caps, srcs, strict=True):
        if fingerprint(c.key) != s.key["source_capture"]:
            raise FusechatError(f"{c.folder}: not the capture {s.folder} was aligned from")
    return captures, caps


@dataclass(frozen=True)
class _FuseJob:
    """What a process needs to fuse shards (picklable, for spawned workers)."""

    pivot_dir: str
    aligned_dirs: tuple[str, ...]
    out: str
    cfg: FuseConfig
    done: frozenset[int]
    source_captures: tuple[str, ...] = ()  # unit 'turn' only


def _branches(srows: list[dict], weights: np.ndarray) -> np.ndarray:
    """The continuations of the source the row's target follows (weight at least one half;
    MinCE: the chosen one), none otherwise: what that source would write after each of its
    alternatives."""
    from fusechat.shards import unpack_ids

    best = int(np.argmax(weights[1:]))
    if weights[1 + best] >= 0.5 and "pos.branch_ids" in srows[best]:
        return unpack_ids(srows[best]["pos.branch_ids"])
    shape = next(r["pos.branch_ids"].shape for r in srows if "pos.branch_ids" in r)
    return np.full(shape, -1, dtype=np.int64)


def _fuse_setup(job: _FuseJob) -> tuple:
    from fusechat.shards import StageReader

    srcs = [StageReader(d, "align") for d in job.aligned_dirs]
    caps = [StageReader(d, "capture") for d in job.source_captures]
    return StageReader(job.pivot_dir, "capture"), srcs, caps, job


def _fuse_shard(state: tuple, i: int) -> tuple[tuple[int, int, np.ndarray], str | None]:
    """Fuse shard ``i``, write it unless a previous run did; (rows kept, rows dropped, sum of
    the rows' model weights) and the checksum of what was written."""
    from fusechat.losses import learned_next, next_ids
    from fusechat.shards import pack_ids, save_shard, unpack_ids

    piv, srcs, caps, job = state
    sshards = [s.shard(i) for s in srcs]
    cshards = [c.shard(i) for c in caps]
    rows, dropped, weight_sum = [], 0, np.zeros(1 + len(srcs))
    for r, prow in enumerate(piv.shard(i)):
        srows = [sh[r] for sh in sshards]
        if prow["row.n_tokens"] == 0:
            dropped += 1
            continue
        lp = prow["pos.topk_logprobs"].astype(np.float32)
        ces = [sequence_ce(prow, job.cfg.ce_norm)]
        # a source whose (truncated) row holds no learned token cannot be chosen
        ces += [sequence_ce(s, job.cfg.ce_norm) if s["row.n_tokens"] > 0 else np.inf for s in srows]
        p = np.exp(lp.astype(np.float64))
        pivot = (unpack_ids(prow["pos.topk_ids"]), p / p.sum(-1, keepdims=True))
        dists = [pivot] + [(unpack_ids(s["pos.ids"]), s["pos.probs"]) for s in srows]
        valid = [np.ones(len(lp), bool)] + [s["pos.valid"] for s in srows]
        gold = None
        if job.cfg.unaligned == "gold":
            nxt = next_ids(unpack_ids(prow["pos.input_ids"]))
            gold = (nxt[:, None], (nxt >= 0).astype(np.float32)[:, None])
        if cshards:
            per_turn = turn_ces(prow, [c[r] for c in cshards], job.cfg.ce_norm, ces)
            ces = ces if per_turn is None else per_turn
        ids, probs = fuse(dists, valid, ces, job.cfg.method, gold)
        w = sequence_weights(ces, job.cfg.method)
        if w.ndim == 2:  # per turn: the row's weights are their mean over learned positions
            w = w[:, learned_next(prow["pos.labels_mask"])].mean(1)
        weight_sum += w
        extra = {}
        if any("pos.branch_ids" in r for r in srows):
            extra["pos.branch_ids"] = pack_ids(_branches(srows, w), prow["pos.topk_ids"].dtype)
        rows.append(
            {
                **extra,
                "pos.input_ids": prow["pos.input_ids"],
                "pos.labels_mask": prow["pos.labels_mask"],
                "pos.target_ids": pack_ids(ids, prow["pos.topk_ids"].dtype),
                "pos.target_probs": probs.astype(np.float16),
                "row.index": prow["row.index"],
                "row.weights": w.astype(np.float32),
            }
        )
    written = None if i in job.done else save_shard(Path(job.out), i, rows, "fuse")
    return (len(rows), dropped, weight_sum), written

"""Align a source model's captured distributions to the pivot's positions and vocabulary.

A next-token distribution at position t is conditioned on the text up to the end of token t and
predicts what follows. The methods are registered in ``fusechat.aligners`` (``text``, the
default, maps by continuation text; ``exact``, ``mined``, ``stats`` are the baselines); this
module is the stage that runs one over two captures, shard by shard.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fusechat.aligners import ALIGNERS, aligner_class, sequence_error
from fusechat.aligners.base import Aligner
from fusechat.configs import AlignConfig
from fusechat.errors import FusechatError
from fusechat.io import fingerprint, tokenizer_fingerprint
from fusechat.losses import learned_next, next_ids

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- the stage

VERSION = 4  # 2: the text method; 3: shard checksums in the manifest; 4: vectorised walks
# (the same distributions; a 10th entry of probability ~0 may differ, and training follows it)
CONFIDENT = 0.9  # agreement is measured where the source gives the gold text at least this


def _load_capture_tokenizer(reader, override: str | None, role: str):
    """The tokenizer a capture was made with (or ``override``), checked against its shards."""
    from fusechat.data import load_tokenizer

    path = override or reader.key["model"]
    tok = load_tokenizer(path, f"the {role} tokenizer")
    fp = tokenizer_fingerprint(tok)
    if fp != reader.key["tokenizer_fingerprint"]:
        raise FusechatError(
            f"{reader.folder}: captured with another tokenizer than {path} "
            f"(vocabulary fingerprint {reader.key['tokenizer_fingerprint']} vs {fp})"
        )
    return tok


def check_same_corpus(pivot, source) -> None:
    """Two captures can be aligned only if they scored the same rows rendered the same way."""
    from fusechat.capture import VERSION as CAPTURE_VERSION

    for reader in (pivot, source):
        if reader.key.get("version") != CAPTURE_VERSION:
            raise FusechatError(
                f"{reader.folder}: a capture of format version {reader.key.get('version')}; "
                f"this fusechat reads version {CAPTURE_VERSION}: capture it again"
            )
    pk, sk = pivot.key, source.key
    for field, what in (
        ("corpus_fingerprint", "different corpora"),
        ("rows", "different numbers of rows"),
        ("shard_rows", "different shard sizes"),
        ("max_length", "different max lengths (the rows are cut at other places)"),
        ("overflow", "different overflow rules"),
        ("template", "different conversation templates"),
        ("rendering", "different chat templates (use the pivot's for every model)"),
    ):
        if pk.get(field) != sk.get(field):
            raise FusechatError(
                f"{source.folder}: {what} from the pivot capture {pivot.folder} "
                f"({field}: {sk.get(field)} vs {pk.get(field)})"
            )


def transfer_counts(prow, r: dict, gold_prob: np.ndarray | None = None) -> Counter:
    """The counts behind the transfer statistics of one row aligned by one method (``r``, a
    ``Aligner`` result): learned pivot positions and those with a distribution; with
    ``gold_prob`` (the source's probability of the pivot's gold next-token text, the text
    method's measure, used for every method) the confident positions (``>= CONFIDENT``), those
    with a distribution, and those whose most probable token is the gold one; the gold-only
    positions (text) or the exactly aligned ones and their mapped mass (baselines)."""
    from fusechat.shards import unpack_ids

    learned = learned_next(prow["pos.labels_mask"])
    c = Counter({"learned": int(learned.sum()), "valid": int((learned & r["valid"]).sum())})
    if gold_prob is not None:
        gold = next_ids(unpack_ids(prow["pos.input_ids"]))
        top1 = np.take_along_axis(r["ids"], np.argmax(r["probs"], 1)[:, None], 1)[:, 0]
        conf = learned & (np.nan_to_num(gold_prob) >= CONFIDENT)
        c["confident"] = int(conf.sum())
        c["confident_valid"] = int((conf & r["valid"]).sum())
        c["hit"] = int((conf & r["valid"] & (top1 == gold)).sum())
    if "gold_only" in r:
        c["gold_only"] = int((learned & r["gold_only"]).sum())
    if "exact" in r:
        c["exact"] = int((learned & r["exact"]).sum())
        c["mass"] = float(r["mass"][learned & r["exact"]].sum())
    return c


def transfer_stats(c: Counter) -> dict[str, float]:
    """Shares from summed ``transfer_counts`` (``Counter.update`` keeps the zero entries):
    ``coverage``; ``agreement`` (hits among confident positions with a distribution) and
    ``confident_hit`` (among all confident positions); ``gold_only``; ``aligned`` and
    ``mapped_mass``."""
    n = max(c["learned"], 1)
    out = {"coverage": c["valid"] / n}
    if "confident" in c:
        out["agreement"] = c["hit"] / max(c["confident_valid"], 1)
        out["confident_hit"] = c["hit"] / max(c["confident"], 1)
    if "gold_only" in c:
        out["gold_only"] = c["gold_only"] / n
    if "exact" in c:
        out["aligned"] = c["exact"] / n
        out["mapped_mass"] = c["mass"] / max(c["exact"], 1)
    return out


def check_same_text(prow: dict, srow: dict) -> None:
    """A pivot row and a source row can be aligned only if they rendered the same text."""
    if int(prow["row.text_hash"]) != int(srow["row.text_hash"]):
        raise FusechatError(
            f"row {int(prow['row.index'])}: the captures rendered different texts "
            "(same corpus, different templates?)"
        )


def make_aligner(method: str, sequence: str, piv_tok, src_tok, k: int,
                 inside: str = "conditional", branches: int = 0) -> Aligner:  # fmt: skip
    """The registered aligner for ``method`` (``fusechat.aligners``), its settings checked."""
    if method not in ALIGNERS:
        raise FusechatError(f"unknown alignment method {method!r} ({', '.join(ALIGNERS)})")
    if error := sequence_error(method, sequence):
        raise FusechatError(error)
    cls = aligner_class(method)
    return cls(method, sequence, piv_tok, src_tok, k, inside, branches)


@dataclass(frozen=True)
class _AlignJob:
    """What a process needs to align shards (picklable, for spawned workers)."""

    pivot_dir: str
    source_dir: str
    out: str
    cfg: AlignConfig
    done: frozenset[int]
    fitted: Any = None  # what a corpus-wide method learned, by the caller, once


def _align_setup(job: _AlignJob) -> tuple:
    """(pivot reader, source reader, aligner, stored id dtype, job)."""
    from fusechat.shards import StageReader, ids_dtype

    piv, src = StageReader(job.pivot_dir, "capture"), StageReader(job.source_dir, "capture")
    piv_tok = _load_capture_tokenizer(piv, job.cfg.pivot_tokenizer, "pivot")
    src_tok = _load_capture_tokenizer(src, job.cfg.source_tokenizer, "source")
    aligner = make_aligner(job.cfg.method, job.cfg.sequence, piv_tok, src_tok, src.key["k"],
                           job.cfg.inside, job.cfg.branches)  # fmt: skip
    aligner.fitted = job.fitted
    return piv, src, aligner, ids_dtype(max(piv_tok.get_vocab().values()) + 1), job


def _align_shard(state: tuple, i: int) -> tuple[Counter, str | None]:
    """Align shard ``i``, write it unless a previous run did; its transfer tally and the
    checksum of what was written."""
    from pathlib import Path

    from fusechat.shards import pack_ids, save_shard

    piv, src, aligner, dtype, job = state
    tally: Counter = Counter()
    rows = []
    for prow, srow in zip(piv.shard(i), src.shard(i), strict=True):
        check_same_text(prow, srow)
        r = aligner(prow, srow)
        tally.update(transfer_counts(prow, r, r.get("gold_prob")))
        rows.append(
            {
                **(
                    {"pos.branch_ids": pack_ids(r["branch_ids"], dtype)}
                    if "branch_ids" in r
                    else {}
                ),  # fmt: skip
                "pos.ids": pack_ids(r["ids"], dtype),
                "pos.probs": r["probs"].astype(np.float16),
                "pos.valid": r["valid"],
                "row.index": prow["row.index"],
                "row.nll_sum": srow["row.nll_sum"],
                "row.n_tokens": srow["row.n_tokens"],
                "row.n_chars": srow["row.n_chars"],
            }
        )
    return tally, None if i in job.done else save_shard(Path(job.out), i, rows, "align")


def align(
    pivot_dir: str | os.PathLike,
    source_dir: str | os.PathLike,
    out: str | os.PathLike,
    cfg: AlignConfig | None = None,
    overwrite: bool = False,
) -> dict:
    """Map a source capture onto the pivot's positions and vocabulary (``fusechat align``),
    shards spread over ``cfg.workers`` processes (the same output as one).

    Each output row has, per pivot position, the source's distribution over pivot tokens
    (``pos.ids``, ``pos.probs``, k wide) and ``pos.valid`` (a distribution exists there), plus
    the source's sequence NLL for MinCE/AvgCE. Statistics over learned pivot positions:
    ``coverage`` (share with a distribution); for ``text`` also ``gold_only`` (share whose
    distribution is the gold token alone: nothing else the source proposed fits the text
    read) and ``agreement`` (share whose most probable token is the pivot's gold one, where
    the source gives the gold text probability >= 0.9); for the baselines ``aligned`` (share
    with an exactly aligned source position) and ``mapped_mass``.
    """
    from fusechat.sharding import run_sharded
    from fusechat.shards import StageReader

    cfg = cfg or AlignConfig()
    piv, src = StageReader(pivot_dir, "capture"), StageReader(source_dir, "capture")
    check_same_corpus(piv, src)
    piv.check_complete()
    src.check_complete()
    key = {"stage": "align", "version": VERSION, "pivot_capture": fingerprint(piv.key),
           "source_capture": fingerprint(src.key), "method": cfg.method,
           "sequence": cfg.sequence, "inside": cfg.inside, "branches": cfg.branches, "k": src.key["k"], "shard_rows": piv.key["shard_rows"],
           "rows": piv.key["rows"]}  # fmt: skip

    def start(done: frozenset[int]) -> tuple:
        job = _AlignJob(str(pivot_dir), str(source_dir), str(out), cfg, done)
        state = _align_setup(job)
        from tqdm import tqdm

        aligner = state[2]
        if aligner.needs_corpus:  # one pass over the corpus (stats: its map), then the shards
            piv, src = state[:2]
            aligner.fit(
                (prow, srow)
                for i, prows in tqdm(piv.shards(), total=piv.n_shards, desc=f"{cfg.method} fit")
                for prow, srow in zip(prows, src.shard(i), strict=True)
            )
            job = replace(job, fitted=aligner.fitted)  # spawned workers get what it learned
        return state, job

    def summarize(tallies: list[Counter]) -> dict:
        return align_stats(tallies, cfg.method, pivot_dir, source_dir, out)

    return run_sharded(out, key, piv.n_shards, start, _align_shard, summarize, overwrite,
                       cfg.workers, _align_setup, f"align {Path(out).name}",
                       inputs=(pivot_dir, source_dir))  # fmt: skip


def align_stats(tallies: list[Counter], method: str, pivot_dir, source_dir, out) -> dict:
    """The manifest's statistics from each shard's transfer tally (``transfer_stats``)."""
    tally = sum(tallies, Counter())
    stats = {"method": method, **transfer_stats(tally),
             "learned_positions": tally["learned"], "pivot_capture": str(pivot_dir),
             "source_capture": str(source_dir)}  # fmt: skip
    if not stats.get("coverage"):
        log.warning("%s: no pivot position got a distribution from %s (coverage 0): the "
                    "captures do not overlap", out, source_dir)  # fmt: skip
    log.info("aligned %s (%s): %s", source_dir, method,
             ", ".join(f"{k} {v:.4f}" for k, v in stats.items() if isinstance(v, float)))  # fmt: skip
    return stats

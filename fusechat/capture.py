"""Capture a model's top-K next-token distributions over a chat corpus (``fusechat capture``).

Every conversation is rendered with one template (FuseChat renders every model's input with the
pivot's) and tokenized by the model's own tokenizer. Per row the stage stores, in shards (see
``fusechat.shards``): ``pos.input_ids``, ``pos.labels_mask`` (learned tokens), ``pos.byte_end``
(the UTF-8 byte at which each token ends in the text, for alignment: ``fusechat.tokens``),
``pos.topk_ids`` and ``pos.topk_logprobs`` (fp16) of the distribution at each position
(predicting the next token), ``pos.gold_logprob`` (fp16, the log-probability of the token
that really follows, in the top-K or not), and the gold negative log-likelihood of the learned
tokens (``row.nll_sum`` over ``row.n_tokens`` tokens covering ``row.n_chars`` characters): the
sequence cross-entropy that MinCE/AvgCE compare.

With ``lookahead = L > 0`` it also stores ``pos.topk_next`` (T, K, L): for each candidate of
the top-K other than the token that really follows, with probability at least
``lookahead_min_prob`` at a position predicting a learned token, the model's own greedy
continuation of L tokens after it (-1 elsewhere). A candidate is often a fragment of a word
(``Ġp`` of `` pane``); which pivot token it stands for depends on the text it goes on with, and
only the source knows that text (``fusechat.textalign``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fusechat.configs import CaptureConfig, CaptureJob, DataSpec
from fusechat.conversations import LoadReport, load_conversations
from fusechat.data import TemplateRefused, encode, load_tokenizer, model_context
from fusechat.errors import FusechatError
from fusechat.io import (
    corpus_fingerprint,
    fingerprint,
    model_fingerprint,
    tokenizer_fingerprint,
)
from fusechat.losses import learned_next, next_ids
from fusechat.options import job_command
from fusechat.ranks import Ranks, join
from fusechat.scorers import HFScorer, VLLMScorer, plan_batches
from fusechat.sharding import run_sharded
from fusechat.shards import ids_dtype, pack_ids, save_shard

log = logging.getLogger(__name__)
VERSION = 4  # 2: byte ends and the gold log-probability; 3: shard checksums in the manifest;
# 4: candidates' continuations (lookahead)


def text_hash(text: str) -> np.uint64:
    """64-bit hash of a rendered text: captures of the same row must render the same text."""
    return np.frombuffer(hashlib.blake2b(text.encode(), digest_size=8).digest(), np.uint64)[0]


# --------------------------------------------------------------------------- pure parts


def segments(n_tokens: int, max_length: int, overflow: str) -> list[tuple[int, int]]:
    """Forward-pass windows ``[start, end)`` of a row: one window of at most ``max_length``
    tokens (truncate), or consecutive windows covering all tokens (split)."""
    if overflow == "truncate" or n_tokens <= max_length:
        return [(0, min(n_tokens, max_length))]
    return [(s, min(s + max_length, n_tokens)) for s in range(0, n_tokens, max_length)]


def context_warning(max_length: int, context: int | None, lengths: Sequence[int]) -> str | None:
    """What to say when ``max_length`` exceeds the model's context (its position embeddings):
    positions past it are scored where the model was never trained (or fail, with learned
    absolute positions). None when it fits or the context is unknown."""
    if context is None or max_length <= context:
        return None
    longer = sum(n > context for n in lengths)
    return (f"max_length {max_length} is beyond the model's context (max_position_embeddings "
            f"{context}): {longer} of {len(lengths)} rows reach past it")  # fmt: skip


def lookahead_requests(
    top_ids: np.ndarray,
    top_logprobs: np.ndarray,
    input_ids: Sequence[int],
    learned: np.ndarray,
    min_prob: float,
) -> list[tuple[int, int]]:
    """The (position, slot) pairs whose candidate gets a stored continuation: at positions
    predicting a learned token, every top-K candidate other than the token that really
    follows (whose continuation is the row itself) with ``p >= min_prob``."""
    t, i = np.nonzero(learned[:, None] & (np.exp(top_logprobs.astype(np.float64)) >= min_prob))
    keep = top_ids[t, i] != next_ids(input_ids)[t]
    return list(zip(t[keep].tolist(), i[keep].tolist(), strict=True))


# --------------------------------------------------------------------------- the stage


@dataclass
class _Row:
    index: int
    input_ids: list[int]
    labels_mask: list[bool]
    byte_end: np.ndarray
    n_chars: int  # characters of the learned tokens (the 'char' cross-entropy normalisation)
    text_hash: np.uint64
    truncated: bool


def _prepare(
    convs, tokenizer, cfg: CaptureConfig, render_tokenizer=None
) -> tuple[list[_Row], list[tuple[int, str]]]:
    """The rows to score, and the conversations the chat template refused (index, why)."""
    from fusechat.tokens import byte_ends, token_bytes

    widths = np.array([len(b) for b in token_bytes(tokenizer)], dtype=np.int64)
    rows, refused = [], []
    for i, msgs in enumerate(convs):
        try:
            e = encode(msgs, tokenizer, cfg.template, render_tokenizer=render_tokenizer)
        except TemplateRefused as err:
            refused.append((i, str(err)))
            continue
        n = len(e.input_ids) if cfg.overflow == "split" else min(len(e.input_ids), cfg.max_length)
        ids = e.input_ids[:n]
        char_end = np.maximum.accumulate([o[1] for o in e.offsets[:n]]) if n else np.zeros(0)
        prev = np.concatenate([[0], char_end[:-1]])
        rows.append(
            _Row(
                index=i,
                input_ids=ids,
                labels_mask=e.labels_mask[:n],
                byte_end=byte_ends(e.text, e.offsets[:n], widths[ids]),
                n_chars=int((char_end - prev)[np.array(e.labels_mask[:n], dtype=bool)].sum()),
                text_hash=text_hash(e.text),
                truncated=n < len(e.input_ids),
            )
        )
    return rows, refused


def _check_refused(refused: Sequence[tuple[int, str]], report: LoadReport, data: DataSpec,
                   template_of: str) -> None:  # fmt: skip
    """Conversations the chat template refused, named by their row in the corpus as malformed
    rows are: the first fails a ``strict`` load, else they are skipped with a warning; when
    the template refuses every row, one line names the corpus."""
    if not refused:
        return
    numbered = [(report.numbers[i], why) for i, why in refused]
    n, why = numbered[0]
    if data.strict:
        raise FusechatError(f"{data.path}: row {n}: the chat template refused it ({why})")
    if len(refused) == report.kept:
        raise FusechatError(f"{data.path}: the chat template of {template_of} refused every "
                            f"conversation (row {n}: {why})")  # fmt: skip
    rows = ", ".join(str(m) for m, _ in numbered[:10]) + (", ..." if len(numbered) > 10 else "")
    log.warning("%s: skipped %d rows the chat template of %s refused: rows %s (row %d: %s)",
                data.path, len(refused), template_of, rows, n, why)  # fmt: skip


def _score_shard(scorer, rows: Sequence[_Row], cfg: CaptureConfig, bar: tqdm) -> list[dict]:
    segs = []  # (row, start, end)
    for r, row in enumerate(rows):
        segs += [(r, a, b) for a, b in segments(len(row.input_ids), cfg.max_length, cfg.overflow)]
    results: dict[int, tuple] = {}
    for batch in plan_batches([b - a for _, a, b in segs], cfg.batch_tokens):
        toks = [rows[segs[j][0]].input_ids[segs[j][1] : segs[j][2]] for j in batch]
        nexts = []
        for j in batch:
            r, _, b = segs[j]
            nexts.append(rows[r].input_ids[b] if b < len(rows[r].input_ids) else -1)
        for j, res in zip(batch, scorer.score(toks, nexts, cfg.k), strict=True):
            results[j] = res
        bar.update(sum(len(t) for t in toks))
    dtype = ids_dtype(scorer.vocab_size)
    by_row: dict[int, list] = {}  # each row's windows, in order (segs is row- then start-sorted)
    for j, (r, _, _) in enumerate(segs):
        by_row.setdefault(r, []).append(results[j])
    out = []
    for r, row in enumerate(rows):
        parts = by_row.get(r, [])
        ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, cfg.k), np.int64)
        lps = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, cfg.k), np.float32)
        gold = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.float32)
        learned = learned_next(row.labels_mask)
        # fp16 turns below -65504 into -inf: clamp, a vanishing probability stays finite
        # (a NaN from the model itself is refused when the shard is written)
        lps16 = np.maximum(lps, -60000.0).astype(np.float16)
        extra = {}
        if cfg.lookahead:
            nxt = _continuations(scorer, row.input_ids, ids, lps16, learned, cfg)
            extra["pos.topk_next"] = pack_ids(nxt, dtype)
        out.append(
            {
                **extra,
                "pos.input_ids": pack_ids(np.array(row.input_ids, np.int64), dtype),
                "pos.labels_mask": np.array(row.labels_mask, dtype=bool),
                "pos.byte_end": row.byte_end.astype(np.int32),
                "pos.topk_ids": pack_ids(ids, dtype),
                "pos.topk_logprobs": lps16,
                "pos.gold_logprob": np.maximum(gold, -60000.0).astype(np.float16),
                "row.index": np.int64(row.index),
                "row.nll_sum": np.float64(-gold[learned].astype(np.float64).sum()),
                "row.n_tokens": np.int64(learned.sum()),
                "row.n_chars": np.int64(row.n_chars),
                "row.text_hash": row.text_hash,
                "row.truncated": np.bool_(row.truncated),
            }
        )
    return out


def _continuations(
    scorer, input_ids: Sequence[int], top: np.ndarray, lps16: np.ndarray, learned: np.ndarray,
    cfg: CaptureConfig,
) -> np.ndarray:  # fmt: skip
    """One row's ``pos.topk_next`` (T, K, L; -1 where none): its candidates' greedy
    continuations, window by window, each continuing the scored window up to its position (the
    context its probability was computed in). The threshold reads the stored fp16 log-probs."""
    got = np.full((len(top), cfg.k, cfg.lookahead), -1, np.int64)
    reqs = lookahead_requests(top, lps16, input_ids, learned, cfg.lookahead_min_prob)
    for a, b in segments(len(input_ids), cfg.max_length, cfg.overflow):
        mine = [(t, i) for t, i in reqs if a <= t < b]
        if mine:
            cands = [(t - a, int(top[t, i])) for t, i in mine]
            conts = scorer.continue_candidates(input_ids[a:b], cands, cfg.lookahead)
            for (t, i), cont in zip(mine, conts, strict=True):
                got[t, i] = cont
    return got


def torchrun_command(job: CaptureJob, processes: int, job_file: Path) -> list[str]:
    """``torchrun`` on this node with ``processes`` ranks running ``job`` (written to
    ``job_file``)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={processes}"]  # fmt: skip
    return job_command(torchrun, "capture", job, job_file)


def run_job(job: CaptureJob, overwrite: bool = False) -> dict:
    """A capture job as ``fusechat run`` hands it to ``torchrun`` (``fusechat capture --config``)."""
    return capture(job.config, job.data, job.out, overwrite)


def capture(
    cfg: CaptureConfig,
    data: DataSpec | str | os.PathLike,
    out: str | os.PathLike,
    overwrite: bool = False,
    max_rows: int | None = None,
) -> dict:
    """Run the capture stage into ``out``; resumes shard by shard. ``data``: the corpus and how
    to read it (a path: every row, skipping malformed ones; ``max_rows`` then limits it).
    Returns the manifest.

    Under a launcher (``torchrun --nproc_per_node N``, also across nodes on a shared
    filesystem) each rank scores every N-th missing shard on its own device and rank 0 writes
    the manifest once all exist: the same bytes as one process, since a shard's batches depend
    on its rows alone. A killed run resumes at the missing shards, with any number of ranks."""
    if not isinstance(data, DataSpec):
        data = DataSpec(path=str(data), max_rows=max_rows)
    convs, report = load_conversations(data.path, data.format, data.strict, data.max_rows)
    tokenizer = load_tokenizer(cfg.model)
    render_tok, rendering = None, None
    if cfg.template == "tokenizer":
        render_tok = load_tokenizer(cfg.render_with) if cfg.render_with else tokenizer
        # what decides the text: the chat template and the special-token strings it writes
        rendering = fingerprint([render_tok.chat_template, render_tok.all_special_tokens])
    rows, refused = _prepare(convs, tokenizer, cfg, render_tok)
    _check_refused(refused, report, data, cfg.render_with or cfg.model)
    warning = context_warning(cfg.max_length, model_context(cfg.model),
                              [len(r.input_ids) for r in rows])  # fmt: skip
    if warning:
        log.warning("%s: %s", cfg.model, warning)
    key = {
        "stage": "capture",
        "version": VERSION,
        **{k: v for k, v in cfg.key().items() if k != "render_with"},  # rendering stands for it
        "rendering": rendering,
        "model_fingerprint": model_fingerprint(cfg.model),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "corpus_fingerprint": corpus_fingerprint(convs),
        "rows": len(rows),
    }
    if cfg.k > len(tokenizer):
        raise FusechatError(
            f"k = {cfg.k} is larger than the vocabulary of {cfg.model} ({len(tokenizer)} tokens)"
        )
    out = Path(out)
    ranks = Ranks.from_env()
    if ranks.world > 1 and cfg.backend == "vllm":
        raise FusechatError(
            "capture: backend vllm runs one process (set tensor_parallel_size for a model "
            "larger than one GPU); data-parallel processes are for backend hf"
        )
    created = join(ranks)
    try:
        return _capture_ranks(cfg, rows, len(report.skipped) + len(refused), key, out,
                              overwrite, ranks, data.path, len(tokenizer))  # fmt: skip
    finally:
        if created:
            torch.distributed.destroy_process_group()


def _capture_ranks(cfg, rows, skipped: int, key, out: Path, overwrite, ranks: Ranks, data,
                   n_tokens: int) -> dict:  # fmt: skip
    """``capture`` once the rows and the key are known: this rank's shards, then the manifest."""
    n_shards = -(-len(rows) // cfg.shard_rows)

    def part(s: int) -> list[_Row]:
        return rows[s * cfg.shard_rows : (s + 1) * cfg.shard_rows]

    def tokens(shards: Sequence[int]) -> int:
        return sum(len(r.input_ids) for s in shards for r in part(s))

    run: dict = {}

    def start(done: frozenset[int]) -> tuple:
        todo = [s for s in range(n_shards) if s not in done]
        mine = ranks.shards(todo)
        run.update(done=done, total=tokens(todo), t0=time.perf_counter())
        if mine:  # the model loads only where there is work
            run["scorer"] = (
                VLLMScorer(cfg.model, cfg.dtype, cfg.max_length, cfg.k, cfg.tensor_parallel_size)
                if cfg.backend == "vllm"
                else HFScorer(
                    cfg.model,
                    cfg.dtype,
                    ranks.local if ranks.world > 1 else None,
                    n_tokens=n_tokens,
                )
            )
            desc = f"capture {out.name}" + (f" rank {ranks.rank}" if ranks.world > 1 else "")
            run["bar"] = tqdm(total=tokens(mine), unit="tok", unit_scale=True, desc=desc)
        return run, None

    def score(run: dict, s: int) -> tuple[None, str | None]:
        if s in run["done"]:
            return None, None
        return None, save_shard(
            out, s, _score_shard(run["scorer"], part(s), cfg, run["bar"]), "capture"
        )

    def summarize(_: list) -> dict:
        seconds = time.perf_counter() - run["t0"] if run["total"] else 0.0
        return _stats(rows, skipped, cfg, run["total"], seconds, data, ranks.world)

    try:
        return run_sharded(out, key, n_shards, start, score, summarize, overwrite, desc=None,
                           ranks=ranks, inputs=(cfg.model, data, cfg.render_with))  # fmt: skip
    finally:
        if "bar" in run:
            run["bar"].close()


def _stats(rows, skipped: int, cfg: CaptureConfig, total: int, seconds: float, data: str,
           processes: int) -> dict:  # fmt: skip
    stats = {
        "rows": len(rows),
        "skipped_rows": skipped,
        "positions": sum(len(r.input_ids) for r in rows),
        "truncated": sum(r.truncated for r in rows),
        "split": sum(len(r.input_ids) > cfg.max_length for r in rows)
        if cfg.overflow == "split"
        else 0,
        "tokens_scored": total,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(total / seconds, 1) if seconds > 0 and total else None,
        "model_path": cfg.model,
        "data_path": str(data),
        "processes": processes,
    }
    log.info("captured %d rows (%d positions, %d truncated, %d split) at %s tokens/s",
             stats["rows"], stats["positions"], stats["truncated"], stats["split"],
             stats["tokens_per_s"])  # fmt: skip
    return stats

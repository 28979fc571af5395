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
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from fusechat.data import Message, encode, get_template, load_conversations, load_tokenizer
from fusechat.errors import FusechatError
from fusechat.io import fingerprint, read_manifest
from fusechat.shards import begin_stage, finish_stage, ids_dtype, pack_ids, save_shard

log = logging.getLogger(__name__)
VERSION = 3  # 2: byte ends and the gold log-probability; 3: shard checksums in the manifest


@dataclass(frozen=True)
class CaptureConfig:
    model: str  # local folder or hub id
    template: str = "tokenizer"  # a named template, or 'tokenizer' (the chat template)
    render_with: str | None = None  # with template 'tokenizer': whose chat template renders
    # the text (the pivot's, in FuseChat); default the model's own
    k: int = 10
    max_length: int = 2048
    overflow: Literal["truncate", "split"] = "truncate"
    backend: Literal["hf", "vllm"] = "hf"
    dtype: str = "auto"
    batch_tokens: int = 8192  # padded tokens per forward pass
    shard_rows: int = 256


# --------------------------------------------------------------------------- fingerprints


def model_fingerprint(path: str) -> str:
    """Identity of a checkpoint: small files hashed whole, weight files by name, size and their
    first and last MiB (hashing a 90 GB Mixtral whole would take minutes); hub ids by name."""
    folder = Path(path)
    if not folder.is_dir():
        return fingerprint({"hub": path})
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file() and not q.name.startswith(".")):
        size = p.stat().st_size
        h.update(f"{p.relative_to(folder)}:{size}".encode())
        with open(p, "rb") as f:
            if size <= 64 << 20:
                h.update(f.read())
            else:
                h.update(f.read(1 << 20))
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """Identity of a vocabulary: every (token, id) pair; two tokenizers that tokenize alike
    but number tokens differently must not share captured ids."""
    return fingerprint(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]))


def corpus_fingerprint(convs: Sequence[Sequence[Message]]) -> str:
    h = hashlib.sha256()
    for c in convs:
        for m in c:
            h.update(f"{m['role']}\x00{m['content']}\x01".encode())
        h.update(b"\x02")
    return h.hexdigest()[:16]


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


def plan_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Group items into batches of similar length: longest first, each batch's padded size
    ``len(batch) * max_length`` within ``batch_tokens`` (an item longer than that runs alone)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def topk_and_gold(
    logits: torch.Tensor, targets: torch.Tensor, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From logits (T, V) and the gold next tokens (T; -1 where none): top-K ids and
    log-probabilities ``log softmax(logits)`` (T, K), and the gold log-probability
    ``log p_t(targets[t])`` (T; 0 where there is no target)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = logp.topk(k, dim=-1)
    gold = logp.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1)
    gold = torch.where(targets >= 0, gold, torch.zeros_like(gold))
    return top.indices.cpu().numpy(), top.values.cpu().numpy(), gold.cpu().numpy()


# --------------------------------------------------------------------------- backends


class HFScorer:
    """transformers forward passes; ``device_map="auto"`` spreads large models over GPUs."""

    def __init__(self, path: str, dtype: str):
        from fusechat.data import load_model

        cuda = torch.cuda.is_available()
        if dtype == "auto":
            dtype = "bfloat16" if cuda and torch.cuda.is_bf16_supported() else "float32"
        self.model = load_model(
            path, dtype=getattr(torch, dtype), device_map="auto" if cuda else None
        )
        self.model.eval()
        self.vocab_size = self.model.config.vocab_size

    @torch.inference_mode()
    def score(
        self, segs: Sequence[Sequence[int]], nexts: Sequence[int], k: int
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """For each segment: top-K ids and log-probs per position, and the gold log-prob of
        the token that follows each position (``nexts[i]`` after the segment's last one)."""
        n = max(len(s) for s in segs)
        ids = torch.zeros((len(segs), n), dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, s in enumerate(segs):
            ids[i, : len(s)] = torch.tensor(s)
            attn[i, : len(s)] = 1
        device = self.model.get_input_embeddings().weight.device
        logits = self.model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits
        out = []
        for i, s in enumerate(segs):
            targets = torch.tensor([*s[1:], nexts[i]], device=logits.device)
            out.append(topk_and_gold(logits[i, : len(s)], targets, k))
        return out


class VLLMScorer:
    """vLLM's ``prompt_logprobs``: the top-K at every prompt position in one prefill."""

    def __init__(self, path: str, dtype: str, max_length: int, k: int):
        try:
            from vllm import LLM
        except ImportError:
            raise FusechatError(
                "backend vllm: vllm is not installed (pip install 'fusechat[vllm]')"
            ) from None
        if dtype == "auto" and not torch.cuda.is_available():
            dtype = "float32"  # CPU vLLM defaults to bf16, which moves log-probs by ~3e-3
        self.llm = LLM(
            model=path,
            dtype=dtype,
            max_model_len=max_length + 1,
            max_logprobs=k + 1,
            enable_prefix_caching=False,
            seed=0,
        )
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()

    def score(
        self, segs: Sequence[Sequence[int]], nexts: Sequence[int], k: int
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # The following token is appended so its gold log-prob comes back as a prompt logprob.
        prompts = [
            TokensPrompt(prompt_token_ids=[*s, n] if n >= 0 else list(s))
            for s, n in zip(segs, nexts, strict=True)
        ]
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, logprobs=k)
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for s, n, o in zip(segs, nexts, outs, strict=True):
            full = [*s, n] if n >= 0 else list(s)
            # prompt_logprobs[t] holds the distribution predicting token t (None at t = 0)
            dists = list(o.prompt_logprobs[1 : len(s) + 1])
            if n < 0:
                dists.append(o.outputs[0].logprobs[0])
            ids = np.zeros((len(s), k), np.int64)
            lps = np.zeros((len(s), k), np.float32)
            gold = np.zeros(len(s), np.float32)
            for t, d in enumerate(dists):
                top = sorted((v.rank, tid, v.logprob) for tid, v in d.items())[:k]
                ids[t] = [tid for _, tid, _ in top]
                lps[t] = [lp for _, _, lp in top]
                if t + 1 < len(full):
                    gold[t] = d[full[t + 1]].logprob
            results.append((ids, lps, gold))
        return results


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


def _prepare(convs, tokenizer, cfg: CaptureConfig, render_tokenizer=None) -> list[_Row]:
    from fusechat.tokens import byte_ends, token_bytes

    widths = np.array([len(b) for b in token_bytes(tokenizer)], dtype=np.int64)
    rows = []
    for i, msgs in enumerate(convs):
        e = encode(msgs, tokenizer, cfg.template, render_tokenizer=render_tokenizer)
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
    return rows


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
        mask = np.array(row.labels_mask, dtype=bool)
        learned = np.append(mask[1:], False)  # position t predicts a learned token t+1
        out.append(
            {
                "pos.input_ids": pack_ids(np.array(row.input_ids, np.int64), dtype),
                "pos.labels_mask": mask,
                "pos.byte_end": row.byte_end.astype(np.int32),
                "pos.topk_ids": pack_ids(ids, dtype),
                # fp16 turns below -65504 into -inf: clamp, a vanishing probability stays finite
                # (a NaN from the model itself is refused when the shard is written)
                "pos.topk_logprobs": np.maximum(lps, -60000.0).astype(np.float16),
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


def capture(
    cfg: CaptureConfig,
    data: str,
    out: str | os.PathLike,
    data_format: str = "auto",
    max_rows: int | None = None,
    overwrite: bool = False,
    strict: bool = False,
) -> dict:
    """Run the capture stage into ``out``; resumes shard by shard (``strict``: a malformed
    corpus row fails the stage instead of being skipped). Returns the manifest."""
    if cfg.k < 1:
        raise FusechatError(f"k must be at least 1, got {cfg.k}")
    get_template(cfg.template)
    convs, report = load_conversations(data, data_format, strict=strict, max_rows=max_rows)
    tokenizer = load_tokenizer(cfg.model)
    render_tok, rendering = None, None
    if cfg.template == "tokenizer":
        render_tok = load_tokenizer(cfg.render_with) if cfg.render_with else tokenizer
        # what decides the text: the chat template and the special-token strings it writes
        rendering = fingerprint([render_tok.chat_template, render_tok.all_special_tokens])
    rows = _prepare(convs, tokenizer, cfg, render_tok)
    key = {
        "stage": "capture",
        "version": VERSION,
        **{k: v for k, v in asdict(cfg).items() if k not in ("batch_tokens", "render_with")},
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
    done = begin_stage(out, key, overwrite)
    if done is None:
        log.info("%s: capture already complete", out)
        return read_manifest(out)
    n_shards = -(-len(rows) // cfg.shard_rows)
    todo = [s for s in range(n_shards) if s not in done]
    total = sum(
        len(r.input_ids) for s in todo for r in rows[s * cfg.shard_rows :][: cfg.shard_rows]
    )
    seconds, written = 0.0, {}
    if todo:
        scorer = (
            VLLMScorer(cfg.model, cfg.dtype, cfg.max_length, cfg.k)
            if cfg.backend == "vllm"
            else HFScorer(cfg.model, cfg.dtype)
        )
        t0 = time.perf_counter()
        with tqdm(total=total, unit="tok", unit_scale=True, desc=f"capture {out.name}") as bar:
            for s in todo:
                shard_rows = rows[s * cfg.shard_rows : (s + 1) * cfg.shard_rows]
                written[s] = save_shard(out, s, _score_shard(scorer, shard_rows, cfg, bar))
        seconds = time.perf_counter() - t0
    stats = {
        "rows": len(rows),
        "skipped_rows": len(report.skipped),
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
    }
    log.info(
        "captured %d rows (%d positions, %d truncated, %d split) at %s tokens/s",
        stats["rows"],
        stats["positions"],
        stats["truncated"],
        stats["split"],
        stats["tokens_per_s"],
    )
    return finish_stage(out, key, n_shards, stats, written)

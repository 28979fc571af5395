"""``fusechat sample``: responses from one model to every prompt (see the package docstring)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np

from fusechat.configs import DataSpec
from fusechat.data import Message, TemplateRefused, render_text
from fusechat.implicit.common import (
    data_record,
    prompt_of,
    read_shard,
    response_ids,
    shard_seed,
    text_array,
)
from fusechat.implicit.settings import SampleConfig

log = logging.getLogger(__name__)

VERSION = 1


def sample_stage(
    cfg: SampleConfig,
    data: DataSpec | str | os.PathLike,
    out: str | os.PathLike,
    overwrite: bool = False,
    max_rows: int | None = None,
) -> dict:
    """Sample ``cfg.n`` responses per prompt from ``cfg.model`` into ``out`` (``fusechat
    sample``); resumes shard by shard. ``data``: the prompt set (a path: every row, skipping
    malformed ones; ``max_rows`` then limits it). Returns the manifest."""
    from tqdm import tqdm

    from fusechat.capture import _check_refused
    from fusechat.conversations import load_conversations
    from fusechat.data import load_tokenizer
    from fusechat.sharding import run_sharded
    from fusechat.shards import save_shard, shard_name

    if not isinstance(data, DataSpec):
        data = DataSpec(path=str(data), max_rows=max_rows)
    convs, report = load_conversations(data.path, data.format, data.strict, data.max_rows,
                                       prompts=True)  # fmt: skip
    tokenizer = load_tokenizer(cfg.model)
    texts, refused = render_prompts([prompt_of(c) for c in convs], tokenizer, cfg.template)
    _check_refused(refused, report, data, cfg.model)
    key = sample_key(cfg, tokenizer, convs)
    out = Path(out)
    n_shards = -(-len(convs) // cfg.shard_rows)
    run: dict = {"new_tokens": 0}

    mine = partial(shard_prompts, shard_rows=cfg.shard_rows, texts=texts)

    def start(done: frozenset[int]) -> tuple:
        todo = [s for s in range(n_shards) if s not in done]
        run.update(done=done, t0=time.perf_counter())
        if todo:  # the model loads only where there is work
            run.update(zip(("model", "tok", "stops"), load_sampler(cfg), strict=True))
            total = sum(len(mine(s)) for s in todo) * cfg.n
            run["bar"] = tqdm(total=total, unit="resp", desc=f"sample {out.name}")
        return run, None

    def task(run: dict, s: int) -> tuple[dict, str | None]:
        if s in run["done"]:
            return _sample_counts(read_shard(out / shard_name(s))), None
        rows = sample_shard(run, s, mine(s), texts, cfg)
        counts = _sample_counts(rows)
        run["new_tokens"] += counts["tokens"]
        return counts, save_shard(out, s, rows, "sample")

    def summarize(parts: list[dict]) -> dict:
        seconds = time.perf_counter() - run["t0"] if run["new_tokens"] else 0.0
        return sample_stats(parts, seconds, run["new_tokens"], len(refused), len(report.skipped),
                            cfg.model, data_record(data))  # fmt: skip

    try:
        return run_sharded(out, key, n_shards, start, task, summarize, overwrite, desc=None,
                           inputs=(cfg.model, data.path))  # fmt: skip
    finally:
        if "bar" in run:
            run["bar"].close()


def sample_key(cfg: SampleConfig, tokenizer, convs: Sequence) -> dict:
    """What names a sample folder: the settings, the model, its tokenizer and (rendering with
    the tokenizer's own template) that template and its special tokens, the corpus."""
    from fusechat.io import corpus_fingerprint, fingerprint, model_fingerprint
    from fusechat.io import tokenizer_fingerprint as tok_fp

    rendering = None
    if cfg.template == "tokenizer":  # what decides the text: the template and its specials
        rendering = fingerprint([tokenizer.chat_template, tokenizer.all_special_tokens])
    return {"stage": "sample", "version": VERSION, **cfg.key(), "rendering": rendering,
            "model_fingerprint": model_fingerprint(cfg.model),
            "tokenizer_fingerprint": tok_fp(tokenizer),
            "corpus_fingerprint": corpus_fingerprint(convs), "rows": len(convs)}  # fmt: skip


def load_sampler(cfg: SampleConfig) -> tuple:
    """(model, tokenizer, stop ids), the model's own generation settings set aside: the
    stage's are the only ones that apply."""
    from transformers import GenerationConfig

    from fusechat.eval.chat import load_chat_model

    model, tok, stops = load_chat_model(cfg.model, cfg.dtype)
    model.generation_config = GenerationConfig()
    return model, tok, stops


def sample_shard(run: dict, s: int, idx: Sequence[int], texts: dict, cfg: SampleConfig) -> list:
    """Shard ``s``'s rows: ``cfg.n`` responses to each prompt of ``idx``, in batches, drawn
    from the shard's own seed (a resumed run writes what an uninterrupted one writes)."""
    import torch

    torch.manual_seed(shard_seed(cfg.seed, s))
    rows: list[dict] = []
    for b in range(0, len(idx), cfg.batch_size):
        chunk = idx[b : b + cfg.batch_size]
        rows += _generate(run, chunk, [texts[i] for i in chunk], cfg)
        run["bar"].update(len(chunk) * cfg.n)
    return rows


def _generate(run: dict, index: list[int], texts: list[str], cfg: SampleConfig) -> list[dict]:
    """``cfg.n`` responses to each of a batch of rendered prompts, as shard rows."""
    import torch

    model, tok, stops = run["model"], run["tok"], run["stops"]
    device = model.get_input_embeddings().weight.device
    enc = tok(texts, return_tensors="pt", padding=True,
              add_special_tokens=cfg.template != "tokenizer").to(device)  # fmt: skip
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
                             top_k=0, max_new_tokens=cfg.max_new_tokens,
                             num_return_sequences=cfg.n, eos_token_id=list(stops),
                             pad_token_id=tok.pad_token_id)  # fmt: skip
    prompt_tokens = enc["attention_mask"].sum(1).tolist()
    rows = []
    for r, seq in enumerate(out[:, enc["input_ids"].shape[1] :].tolist()):
        p, j = divmod(r, cfg.n)  # num_return_sequences repeats each prompt n times in a row
        ids, finished = response_ids(seq, stops)
        rows.append({
            "pos.text": text_array(tok.decode(ids, skip_special_tokens=True).strip()),
            "row.index": np.int64(index[p]),
            "row.sample": np.int64(j),
            "row.n_tokens": np.int64(len(ids) + finished),
            "row.prompt_tokens": np.int64(prompt_tokens[p]),
            "row.finished": np.bool_(finished),
        })  # fmt: skip
    return rows


def _sample_counts(rows: Sequence[dict]) -> dict:
    return {"prompts": len({int(r["row.index"]) for r in rows}), "responses": len(rows),
            "tokens": sum(int(r["row.n_tokens"]) for r in rows),
            "finished": sum(bool(r["row.finished"]) for r in rows)}  # fmt: skip


def shard_prompts(s: int, shard_rows: int, texts: dict) -> list[int]:
    """The prompts of shard ``s`` that rendered: the same range of the corpus for every
    model, whatever its template refused."""
    return [i for i in range(s * shard_rows, (s + 1) * shard_rows) if i in texts]


def render_prompts(prompts: Sequence[list[Message]], tokenizer, template: str) -> tuple[dict, list]:
    """Each prompt rendered for generation (index -> text), and those the template refused
    (index, why)."""
    texts, refused = {}, []
    for i, p in enumerate(prompts):
        try:
            texts[i] = render_text(p, tokenizer, template, generation=True)[0]
        except TemplateRefused as e:
            refused.append((i, str(e)))
    return texts, refused


def sample_stats(parts: Sequence[dict], seconds: float, new_tokens: int, refused: int,
                 skipped: int, model: str, data: dict) -> dict:  # fmt: skip
    """The manifest's statistics from each shard's ``_sample_counts``; speed from this run's
    own generation (``new_tokens`` in ``seconds``: 0 when every shard was already written)."""
    n_resp = sum(p["responses"] for p in parts)
    tokens = sum(p["tokens"] for p in parts)
    stats = {
        "prompts": sum(p["prompts"] for p in parts),
        "responses": n_resp,
        "tokens_generated": tokens,
        "mean_tokens": round(tokens / max(n_resp, 1), 2),
        "finished": round(sum(p["finished"] for p in parts) / max(n_resp, 1), 4),
        "refused_rows": refused,
        "skipped_rows": skipped,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(new_tokens / seconds, 1) if seconds > 0 else None,
        "model_path": model,
        "data": data,
    }
    log.info("sampled %d responses to %d prompts (%d tokens, %.0f%% ended by a stop token)",
             n_resp, stats["prompts"], tokens, 100 * stats["finished"])  # fmt: skip
    return stats

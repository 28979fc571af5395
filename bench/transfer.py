"""Does a source's knowledge reach the pivot's positions? Every alignment method, same rows, same run.

For each toy source against the toy pivot (captures of the fusion corpus), and for real pairs
(SmolLM2-135M-Instruct as the pivot, Gemma-3-270M as the source, both captured on MT-Bench's
reference answers), per method (``text``, ``exact``, ``mined``, ``stats``; offsets pairing):

- coverage: share of learned pivot positions that get a source distribution;
- agreement: where the source gives the pivot's gold next-token text probability >= 0.9 (the
  chunk likelihood along its own gold path, the same measure for every method) and the method
  gives a distribution, the share whose most probable token is the pivot's gold token;
  ``confident_hit`` counts the confident positions without a distribution as misses;
- mapped mass (baselines) and gold-only share (text: positions whose distribution is the gold
  token alone because nothing else the source proposed fits the text read);
- alignment throughput, pivot tokens per second;
- toy pairs only, where the language's true distributions are known: ``value_kl``, at the
  value of every answer with several right values (colours, moons, glossary renderings), the
  KL divergence from the true distribution over the pivot tokens the values begin with to the
  aligned source distribution (missing tokens floored at 1e-4). It measures the alternatives,
  which coverage and agreement (the gold path) do not see; ``text+lookahead`` is ``text`` on
  captures that hold each candidate's continuation (``capture.lookahead: 4``).

Speed on long rows: MT-Bench conversations of 1,000-2,000 Mistral tokens against tekken, a
source with a K=10 distribution at every position (its gold token and nine others); ``text`` and
``exact`` (offsets) against FuseLLM's DTW on a subset. Last line: one JSON object.

    python bench/transfer.py [--mt-bench ../shared/data/mt_bench] [--toy-rows 600] [--real-rows 6]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from fusechat.align import make_aligner, transfer_counts, transfer_stats
from fusechat.aligners import ALIGNERS
from fusechat.shards import StageReader


def method_figures(
    piv: StageReader, src: StageReader, piv_tok, src_tok, skills=None, methods=tuple(ALIGNERS),
    targets=None,
) -> dict:  # fmt: skip
    """Each of ``methods`` on the same captured rows; per skill too when ``skills``; with the
    toy language's ``targets`` (``value_targets``), each method's ``value_kl`` too."""
    rows = [(p, s) for i in range(piv.n_shards) for p, s in zip(piv.shard(i), src.shard(i),
                                                                strict=True)]  # fmt: skip
    k = src.key["k"]
    text = make_aligner("text", "offsets", piv_tok, src_tok, k)
    gold_prob = [text(p, s)["gold_prob"] for p, s in rows]  # the method-free confidence
    out = {}
    for method in methods:
        t0 = time.perf_counter()  # building the maps (cached per tokenizer pair) is timed apart
        al = text if method == "text" else make_aligner(method, "offsets", piv_tok, src_tok, k)
        if al.needs_corpus:
            al.fit(rows)
        setup = time.perf_counter() - t0
        t0 = time.perf_counter()
        tally: dict[str, Counter] = defaultdict(Counter)
        n_tokens, aligned = 0, {}
        for (p, s), gp in zip(rows, gold_prob, strict=True):
            aligned[int(p["row.index"])] = r = al(p, s)
            c = transfer_counts(p, r, gp)
            n_tokens += len(p["pos.input_ids"])
            tally["all"].update(c)
            if skills:
                tally[skills[int(p["row.index"])]].update(c)
        seconds = time.perf_counter() - t0
        figs = {key: {n: round(v, 4) for n, v in transfer_stats(c).items()}
                for key, c in tally.items()}  # fmt: skip
        figs["all"]["tokens_per_s"] = round(n_tokens / seconds)
        figs["all"]["setup_s"] = round(setup, 2)
        if targets is not None:
            figs["all"]["value_kl"] = value_kl(targets, aligned)
        out[method] = figs
    return out


def value_targets(piv: StageReader, rows: list[dict], world, piv_tok) -> dict:
    """row index -> [(pivot position, kind, true distribution over the pivot tokens that the
    right values begin with)] at each answer value of an item with several right values."""
    from fusechat.data import encode
    from fusechat.tokens import FirstToken
    from fusechat.toy.corpus import value_probs

    first = FirstToken(piv_tok)
    options = {("glossary", w): v for w, v in world.glossary.items()}
    for p, attrs in world.facts.items():
        options |= {(a, p): attrs[a] for a in ("color", "moon")}
    out: dict[int, list] = {}
    for _, prows in piv.shards():
        for prow in prows:
            i = int(prow["row.index"])
            text = encode(rows[i]["messages"], piv_tok, "openchat").text
            ends = prow["pos.byte_end"].tolist()
            for m in rows[i]["messages"]:
                if m["role"] != "assistant":
                    continue
                at = text.find(m["content"])  # toy text is ASCII: characters are bytes
                for (kind, item), vals in options.items():
                    hit = [v for v in vals if f" {v}" in m["content"]]
                    if f"{item} " not in m["content"] or len(hit) != 1:
                        continue
                    where = at + m["content"].rindex(f" {hit[0]}")
                    if where in ends:
                        truth: dict[int, float] = {}
                        for v, q in zip(vals, value_probs(len(vals)), strict=True):
                            tid = first(f" {v}".encode())
                            truth[tid] = truth.get(tid, 0.0) + q
                        out.setdefault(i, []).append((ends.index(where), kind, truth))
    return out


def value_kl(targets: dict, aligned: dict[int, dict]) -> dict[str, float]:
    """Mean ``KL(true || aligned)`` per kind of value (``value_targets``), 1e-4 floor."""
    kl: dict[str, list[float]] = defaultdict(list)
    for i, spots in targets.items():
        r = aligned[i]
        for t, kind, truth in spots:
            q = {int(a): float(b) for a, b in zip(r["ids"][t], r["probs"][t], strict=True)
                 if a >= 0} if r["valid"][t] else {}  # fmt: skip
            kl[kind].append(sum(p * np.log(p / max(q.get(tok, 0.0), 1e-4))
                                for tok, p in truth.items()))  # fmt: skip
    return {k: round(float(np.mean(v)), 3) for k, v in sorted(kl.items())}


def toy_figures(n_rows: int) -> dict:
    """Captures of the toy world's fusion corpus (first ``n_rows``): each source to the pivot."""
    from transformers import AutoTokenizer

    from fusechat.capture import capture
    from fusechat.configs import CaptureConfig
    from fusechat.io import cache_dir
    from fusechat.toy.build import ToyConfig, build_toy_world
    from fusechat.toy.corpus import make_world

    world = cache_dir() / "toy"
    build_toy_world(world)
    corpus = world / "corpus" / "train.jsonl"
    rows = [json.loads(x) for x in corpus.read_text().splitlines()]
    skills = [r["skill"] for r in rows]
    out = {}
    with tempfile.TemporaryDirectory() as d:
        caps = {}
        for name, look in (("openchat-mini", 0), ("nh2-mixtral-mini", 0), ("nh2-solar-mini", 0),
                           ("nh2-mixtral-mini", 4), ("nh2-solar-mini", 4)):  # fmt: skip
            cfg = CaptureConfig(model=str(world / name), template="openchat", max_length=256,
                                lookahead=look)  # fmt: skip
            capture(cfg, str(corpus), Path(d) / f"{name}-{look}", max_rows=n_rows)
            caps[name, look] = StageReader(Path(d) / f"{name}-{look}", "capture")
        piv = caps["openchat-mini", 0]
        piv_tok = AutoTokenizer.from_pretrained(world / "openchat-mini")
        targets = value_targets(piv, rows, make_world(ToyConfig().seed), piv_tok)
        for name in ("nh2-mixtral-mini", "nh2-solar-mini"):
            src_tok = AutoTokenizer.from_pretrained(world / name)
            out[name] = method_figures(piv, caps[name, 0], piv_tok, src_tok, skills,
                                       targets=targets)  # fmt: skip
            look = method_figures(piv, caps[name, 4], piv_tok, src_tok, skills, ("text",),
                                  targets)  # fmt: skip
            out[name]["text+lookahead"] = look["text"]
    return out


def real_figures(mt_bench: Path, n_rows: int) -> dict:
    """SmolLM2-135M-Instruct (pivot) and Gemma-3-270M (source) capture the same MT-Bench
    conversations, rendered with SmolLM2's chat template; every method aligns them."""
    from transformers import AutoTokenizer

    from fusechat.capture import capture
    from fusechat.configs import CaptureConfig
    from fusechat.errors import FusechatError
    from fusechat.io import cache_dir
    from fusechat.toy.real import gemma3, smollm2

    try:
        piv_path, src_path = smollm2(cache_dir() / "smollm2"), gemma3(cache_dir() / "gemma3")
    except FusechatError as e:
        return {"skipped": str(e)}
    convs = mt_bench_conversations(mt_bench, n_rows)
    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "rows.jsonl"
        data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in convs))
        caps, speed = {}, {}
        for name, path in (("smollm2", piv_path), ("gemma3", src_path)):
            cfg = CaptureConfig(model=str(path), template="tokenizer", render_with=str(piv_path),
                                max_length=1024, batch_tokens=2048)  # fmt: skip
            m = capture(cfg, str(data), Path(d) / name)
            speed[f"{name}_capture_tokens_per_s"] = m["stats"]["tokens_per_s"]
            caps[name] = StageReader(Path(d) / name, "capture")
        figs = method_figures(caps["smollm2"], caps["gemma3"], AutoTokenizer.from_pretrained(
            piv_path), AutoTokenizer.from_pretrained(src_path))  # fmt: skip
    return {"pair": "smollm2-135m-instruct <- gemma-3-270m", "rows": len(convs), **speed,
            **figs}  # fmt: skip


def mt_bench_conversations(mt_bench: Path, n: int) -> list[list[dict]]:
    """Single-turn conversations: an MT-Bench question and GPT-4's reference answer."""
    qs = {
        q["question_id"]: q["turns"][0]
        for q in map(json.loads, (mt_bench / "question.jsonl").read_text().splitlines())
    }
    refs = [json.loads(x) for x in (mt_bench / "reference_answer" / "gpt-4.jsonl")
            .read_text().splitlines()]  # fmt: skip
    return [[{"role": "user", "content": qs[r["question_id"]]},
             {"role": "assistant", "content": r["choices"][0]["turns"][0]}]
            for r in refs if r["question_id"] in qs][:n]  # fmt: skip


def speed_figures(mt_bench: Path, n_rows: int, dtw_rows: int, k: int = 10) -> dict:
    """Long rows, Mistral SentencePiece (pivot) against tekken (source), a synthetic source
    distribution at every position: text and exact (offsets) against DTW."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from align import chat_rows  # bench/align.py: the same long MT-Bench rows

    from fusechat.data import TEMPLATES, render
    from fusechat.tokens import byte_ends, token_bytes
    from fusechat.toy.real import mistral_sentencepiece, tekken

    pivot, source = mistral_sentencepiece(), tekken()
    texts = [render(m, TEMPLATES["openchat"]).text for m in chat_rows(mt_bench, pivot, n_rows)]
    pb, sb = token_bytes(pivot), token_bytes(source)
    rng = np.random.default_rng(0)

    def row(tok, tb, text, with_dist):
        e = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.array(e["input_ids"])
        r = {"pos.input_ids": ids, "pos.byte_end": byte_ends(text, e["offset_mapping"],
             [len(tb[i]) for i in ids]), "pos.labels_mask": np.ones(len(ids), bool),
             "row.text_hash": np.uint64(hash(text) % 2**63), "row.index": 0}  # fmt: skip
        if with_dist:
            nxt = np.append(ids[1:], 0)
            alt = rng.integers(0, len(tb), (len(ids), k - 1))
            r["pos.topk_ids"] = np.concatenate([nxt[:, None], alt], 1)
            lp = np.log(np.concatenate([np.full((len(ids), 1), 0.8),
                                        np.full((len(ids), k - 1), 0.2 / (k - 1))], 1))  # fmt: skip
            r["pos.topk_logprobs"] = lp.astype(np.float16)
            r["pos.gold_logprob"] = np.full(len(ids), np.log(0.8), np.float16)
        return r

    pairs = [(row(pivot, pb, t, False), row(source, sb, t, True)) for t in texts]
    n_tok = sum(len(p["pos.input_ids"]) for p, _ in pairs)
    out = {"rows": len(pairs), "pivot_tokens_per_row": round(n_tok / len(pairs))}
    for name, method, seq, sub in (("text", "text", "offsets", pairs),
                                   ("exact", "exact", "offsets", pairs),
                                   ("dtw_exact", "exact", "dtw", pairs[:dtw_rows])):  # fmt: skip
        al = make_aligner(method, seq, pivot, source, k)
        n_sub = sum(len(p["pos.input_ids"]) for p, _ in sub)
        for rep in ("cold", "warm"):  # text: the first pass fills the continuation memo
            t0 = time.perf_counter()
            for p, s in sub:
                al(p, s)
            out[f"{name}_{rep}_tokens_per_s"] = round(n_sub / (time.perf_counter() - t0), 1)
    dtw = out["dtw_exact_warm_tokens_per_s"]
    out["text_speedup_over_dtw_cold"] = round(out["text_cold_tokens_per_s"] / dtw)
    out["text_speedup_over_dtw_warm"] = round(out["text_warm_tokens_per_s"] / dtw)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mt-bench", type=Path,
                    default=Path(__file__).resolve().parents[2] / "shared/data/mt_bench")  # fmt: skip
    ap.add_argument("--toy-rows", type=int, default=600)
    ap.add_argument("--real-rows", type=int, default=6)
    ap.add_argument("--speed-rows", type=int, default=20)
    ap.add_argument("--dtw-rows", type=int, default=3)
    args = ap.parse_args()
    result = {"bench": "transfer", "toy": toy_figures(args.toy_rows),
              "speed": speed_figures(args.mt_bench, args.speed_rows, args.dtw_rows),
              "real": real_figures(args.mt_bench, args.real_rows)}  # fmt: skip
    for pair, figs in [*result["toy"].items(), ("real", result["real"])]:
        for method in [*ALIGNERS, "text+lookahead"]:
            if method in figs:
                a = figs[method]["all"]
                print(f"{pair:18s} {method:14s} coverage {a['coverage']:.4f} agreement "
                      f"{a['agreement']:.4f} confident-hit {a['confident_hit']:.4f} "
                      f"{a['tokens_per_s']:>9} tok/s {a.get('value_kl', '')}")  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()

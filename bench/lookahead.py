"""The capture's lookahead on long rows: tree attention against a prefill per candidate.

Rows are toy conversations joined into one long chat (``--tokens`` pivot-format tokens each,
default 1,000), scored by the toy Mixtral source (K=10). For the same candidates (every top-K
token other than the gold one with probability >= 0.02 at a learned position, as the capture
asks), their 4-token greedy continuations are computed twice: by ``HFScorer.continue_candidates``
(one pass over the row fills its KV cache, then 4 passes decode all candidates at once under a
4D mask) and by the baseline, one prompt per candidate (the row up to the position, then the
candidate) left-padded into batches, prefilled, then 3 cached steps. Both must give the same
tokens. ``capture_forward_s`` is the capture's own pass over the same rows, for scale. The last
line is one JSON object.

    python bench/lookahead.py [--rows 4] [--tokens 1000]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=1000)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from fusechat.capture import lookahead_requests
    from fusechat.data import encode
    from fusechat.io import cache_dir
    from fusechat.scorers import HFScorer, prefill_per_candidate
    from fusechat.toy.corpus import make_corpus

    path = cache_dir() / "toy" / "nh2-mixtral-mini"
    tok = AutoTokenizer.from_pretrained(path)
    scorer = HFScorer(str(path), "float32")
    convs = make_corpus(4242, 40 * args.rows * args.tokens // 100, 0)["train"]
    rows, msgs = [], []
    for c in convs:  # one long chat per row: turns appended until --tokens
        msgs += [m for m in c["messages"] if m["role"] != "system"]
        e = encode(msgs, tok, "openchat")
        if len(e.input_ids) >= args.tokens:
            rows.append(e)
            msgs = []
            if len(rows) == args.rows:
                break
    res = {"bench": "lookahead", "rows": len(rows), "tokens_per_row": args.tokens}
    tree_s = base_s = score_s = 0.0
    n_cands = same = 0
    for e in rows:
        ids = e.input_ids[: args.tokens]
        t0 = time.perf_counter()
        [(top, lps, _)] = scorer.score([ids], [-1], 10)
        score_s += time.perf_counter() - t0
        learned = np.append(np.array(e.labels_mask[1 : args.tokens], bool), False)
        reqs = lookahead_requests(top, lps.astype(np.float16), ids, learned, 0.02)
        cands = [(t, int(top[t, i])) for t, i in reqs]
        t0 = time.perf_counter()
        tree = scorer.continue_candidates(ids, cands, 4)
        tree_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        base = prefill_per_candidate(scorer.model, ids, cands, 4)
        base_s += time.perf_counter() - t0
        n_cands += len(cands)
        same += int((tree == base).all(1).sum())
    res.update({"candidates": n_cands, "candidates_per_token": round(n_cands / (len(rows) * args.tokens), 3),
                "capture_forward_s": round(score_s, 2), "tree_s": round(tree_s, 2), "prefill_per_candidate_s": round(base_s, 2),
                "speedup": round(base_s / tree_s, 1), "same_tokens": round(same / n_cands, 4)})  # fmt: skip
    print(json.dumps(res))


if __name__ == "__main__":
    main()

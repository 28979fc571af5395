"""Benchmark one training step: the sparse fusion loss against a plain CLM step and against a
dense-target implementation of the same loss, on the same model and batch, in the same run.

A Mistral-architecture model (hidden 256, 2 layers) at two vocabulary sizes (32k like Mistral,
128k like Llama-3); a batch of 2 x 256 tokens, all learned; fused targets with K = 20 entries per
position. Each (vocabulary, variant) runs in its own process: step time is the mean of timed
AdamW steps after warm-up, memory the process's peak RSS. The last line is one JSON object.

    python bench/train_step.py [--steps 5] [--vocab 32000 128000]
"""

from __future__ import annotations

import argparse
import json
import sys

from _child import run_child

_CHILD = r"""
import json, resource, sys, time
import torch
from transformers import MistralConfig, MistralForCausalLM
from fusechat.losses import fusion_losses
from _losses import clm_loss, dense_fusion_loss

variant, vocab, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
model = MistralForCausalLM(MistralConfig(
    vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
b, t, k = 2, 256, 20
ids = torch.randint(0, vocab, (b, t))
mask = torch.ones(b, t, dtype=torch.bool)
tid = torch.randint(0, vocab, (b, t, k))
p = torch.softmax(torch.randn(b, t, k), -1)


def step():
    logits = model(input_ids=ids).logits
    if variant == "clm":
        loss = clm_loss(logits, ids, mask)
    elif variant == "sparse":
        loss = fusion_losses(logits, ids, mask, tid, p, lam=0.9)[0]
    else:  # the reference's way: a (B, T, V) target tensor built every step
        loss = dense_fusion_loss(logits, ids, mask, tid, p, lam=0.9)[0]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)


for _ in range(2):
    step()
times = []
for _ in range(steps):
    t0 = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - t0)
print(json.dumps({"step_s": sum(times) / len(times), "loss": loss,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(variant: str, vocab: int, steps: int) -> dict:
    return run_child(_CHILD, variant, str(vocab), str(steps))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 128000])
    args = ap.parse_args()
    result = {"bench": "train_step", "batch": "2x256", "k": 20}
    for v in args.vocab:
        r = {name: run(name, v, args.steps) for name in ("clm", "sparse", "dense")}
        base = r["clm"]
        result[f"v{v}"] = {
            "clm_step_s": round(base["step_s"], 3),
            "fusion_step_s": round(r["sparse"]["step_s"], 3),
            "dense_step_s": round(r["dense"]["step_s"], 3),
            "fusion_over_clm": round(r["sparse"]["step_s"] / base["step_s"], 3),
            "dense_over_clm": round(r["dense"]["step_s"] / base["step_s"], 3),
            "clm_peak_rss_mb": round(base["peak_rss_mb"]),
            "fusion_extra_rss_mb": round(r["sparse"]["peak_rss_mb"] - base["peak_rss_mb"]),
            "dense_extra_rss_mb": round(r["dense"]["peak_rss_mb"] - base["peak_rss_mb"]),
        }
        print(f"vocab {v}: {result[f'v{v}']}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

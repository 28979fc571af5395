"""Benchmark the CPU server: requests/s and tokens/s under 1, 8 and 32 concurrent clients, against
a plain loop of ``model.generate`` calls on the same model and prompts, in the same run.

The toy world's pivot (Mistral architecture), 64 chat questions from its held-out set, greedy,
32 new tokens at most per answer. The server runs in this process (uvicorn in a thread); clients
are the official ``openai`` async client. The last line is one JSON object.

    python bench/serve.py [--requests 64] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time

import openai
import torch
import uvicorn

from fusechat.eval.chat import load_chat_model
from fusechat.eval.server import create_app
from fusechat.eval.toy import load_questions
from fusechat.io import cache_dir, free_port
from fusechat.toy.build import build_toy_world


def plain_loop(model_path: str, prompts: list[list[dict]], max_tokens: int) -> tuple[float, int]:
    """One ``generate`` per request, one after another: what a script without a server does."""
    model, tok, eos = load_chat_model(model_path)  # the server's loading and stop ids
    t0, n_tokens = time.perf_counter(), 0
    with torch.inference_mode():
        for msgs in prompts:
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)  # fmt: skip
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False,
                                 eos_token_id=eos, pad_token_id=tok.pad_token_id)  # fmt: skip
            n_tokens += out.shape[1] - ids["input_ids"].shape[1]
    return time.perf_counter() - t0, n_tokens


async def load(url: str, prompts: list[list[dict]], clients: int, max_tokens: int):
    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0)
    sem = asyncio.Semaphore(clients)
    tokens = 0

    async def one(msgs):
        nonlocal tokens
        async with sem:
            r = await client.chat.completions.create(model="m", messages=msgs, temperature=0,
                                                     max_tokens=max_tokens)  # fmt: skip
            tokens += r.usage.completion_tokens

    t0 = time.perf_counter()
    await asyncio.gather(*(one(m) for m in prompts))
    return time.perf_counter() - t0, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    cache = cache_dir()
    build_toy_world(cache / "toy")
    model = str(cache / "toy" / "openchat-mini")
    qs = load_questions(cache / "toy" / "corpus" / "heldout.jsonl", args.requests)
    prompts = [q["messages"] for q in qs]

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(model, "m", max_batch=32), host="127.0.0.1",
                                           port=port, log_level="warning"))  # fmt: skip
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}/v1"
    asyncio.run(load(url, prompts[:4], 4, args.max_tokens))  # warm-up

    base_s, base_tok = plain_loop(model, prompts, args.max_tokens)
    result = {
        "bench": "serve",
        "requests": len(prompts),
        "max_tokens": args.max_tokens,
        "generate_loop": {
            "req_per_s": round(len(prompts) / base_s, 2),
            "tok_per_s": round(base_tok / base_s, 1),
        },  # fmt: skip
    }
    for clients in (1, 8, 32):
        sec, tok = asyncio.run(load(url, prompts, clients, args.max_tokens))
        result[f"server_{clients}_clients"] = {
            "req_per_s": round(len(prompts) / sec, 2),
            "tok_per_s": round(tok / sec, 1),
            "speedup_vs_loop": round((len(prompts) / sec) / (len(prompts) / base_s), 2),
        }
    server.should_exit = True
    print(json.dumps(result))


if __name__ == "__main__":
    main()

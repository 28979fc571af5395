"""MT-Bench, FastChat's llm_judge protocol, against any OpenAI-compatible endpoints.

Answers: both turns of every question from the model's endpoint, with FastChat's per-category
temperatures, written as ``model_answer/<model>.jsonl``. Judgments: single-answer grading by a
judge endpoint with FastChat's prompts (``single-v1``, ``single-math-v1`` with reference answers
for math, reasoning and coding, and their multi-turn variants), the ``[[rating]]`` parsed (-1 with
the raw text kept when there is none), written as ``model_judgment/<judge>_single.jsonl``: the
files FastChat's ``show_result.py`` reads. Finished questions are skipped on a rerun. No MT-Bench
text ships with fusechat: questions, prompts and references are read from the paths given.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from fusechat.errors import FusechatError

log = logging.getLogger(__name__)

# FastChat fastchat/llm_judge/common.py
TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
               "reasoning": 0.0, "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0}  # fmt: skip
NEED_REF = ("math", "reasoning", "coding", "arena-hard-200")
API_ERROR = "$ERROR$"  # FastChat's answer text when the model endpoint refused the request
_RATING = (re.compile(r"\[\[(\d+\.?\d*)\]\]"), re.compile(r"\[(\d+\.?\d*)\]"))


def read_jsonl(path: Path, what: str) -> list[dict]:
    if not path.exists():
        raise FusechatError(f"{path}: {what} not found")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise FusechatError(f"{path}: line {n}: invalid JSON ({e.msg})") from None
    return rows


def parse_rating(text: str) -> float:
    """FastChat's rule: ``[[x]]``, else ``[x]``; -1 when the judge gave no rating."""
    for pat in _RATING:
        m = pat.search(text)
        if m:
            return float(m.group(1))
    return -1.0


def judge_prompt(prompts: dict[str, dict], q: dict, turns: list[str], turn: int,
                 ref: list[str] | None) -> tuple[str, str, str]:  # fmt: skip
    """(prompt name, system prompt, user prompt) for one turn, FastChat's single-answer mode."""
    math = q["category"] in NEED_REF and ref is not None
    name = ("single-math-v1" if math else "single-v1") + ("-multi-turn" if turn == 2 else "")
    p = prompts[name]
    kw: dict[str, str] = {}
    if turn == 1:
        kw = {"question": q["turns"][0], "answer": turns[0]}
    else:
        kw = {"question_1": q["turns"][0], "answer_1": turns[0],
              "question_2": q["turns"][1], "answer_2": turns[1]}  # fmt: skip
    if math:
        kw.update({"ref_answer_1": ref[0], "ref_answer_2": ref[1] if len(ref) > 1 else ""})
    return name, p["system_prompt"], p["prompt_template"].format(**kw)


def _append(path: Path, row: dict) -> None:
    # one line per finished item: a killed run loses at most the items in flight
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


async def chat_with_retries(client, retries: int = 3, **request):
    """``client.chat.completions.create(**request)``, retried with backoff on connection
    errors, timeouts, 5xx and 429; then one line naming the endpoint (its base URL)."""
    import openai

    for attempt in range(retries + 1):
        try:
            return await client.chat.completions.create(**request)
        except (openai.APIConnectionError, openai.APITimeoutError, openai.InternalServerError,
                openai.RateLimitError) as e:  # fmt: skip
            if attempt == retries:
                url = str(client.base_url).rstrip("/")
                raise FusechatError(
                    f"endpoint {url}: failed after {retries + 1} tries: {e}"
                ) from None
            await asyncio.sleep(2**attempt)


async def generate_answers(client, model: str, questions: list[dict], out: Path,
                           concurrency: int, max_tokens: int) -> None:  # fmt: skip
    import openai

    done = {r["question_id"] for r in read_jsonl(out, "answers")} if out.exists() else set()
    todo = [q for q in questions if q["question_id"] not in done]
    sem = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(todo), desc=f"answers {model}")

    async def one(q):
        async with sem:
            temp = TEMPERATURE.get(q["category"], 0.7)
            msgs, turns = [], []
            for text in q["turns"]:
                msgs.append({"role": "user", "content": text})
                try:
                    r = await chat_with_retries(client, model=model, messages=list(msgs),
                                                temperature=temp, max_tokens=max_tokens)  # fmt: skip
                    ans = (r.choices[0].message.content or "").strip()
                except openai.BadRequestError as e:  # e.g. longer than the context: FastChat's
                    log.warning("question %s: %s", q["question_id"], e.message)
                    ans = API_ERROR

                turns.append(ans)
                msgs.append({"role": "assistant", "content": ans})
            _append(out, {"question_id": q["question_id"], "answer_id": uuid.uuid4().hex,
                          "model_id": model, "choices": [{"index": 0, "turns": turns}],
                          "tstamp": time.time()})  # fmt: skip
            bar.update()

    await asyncio.gather(*(one(q) for q in todo))
    bar.close()


async def judge_answers(client, judge: str, model: str, questions: list[dict],
                        answers: dict[int, list[str]], prompts: dict, refs: dict[int, list[str]],
                        out: Path, concurrency: int) -> None:  # fmt: skip
    done = set()
    if out.exists():
        done = {(r["question_id"], r["model"], r["turn"]) for r in read_jsonl(out, "judgments")}
    jobs = [(q, t) for q in questions for t in (1, 2)
            if q["question_id"] in answers and (q["question_id"], model, t) not in done]  # fmt: skip
    sem = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(jobs), desc=f"judge {model}")

    async def one(q, turn):
        async with sem:
            name, system, prompt = judge_prompt(
                prompts, q, answers[q["question_id"]], turn, refs.get(q["question_id"])
            )
            r = await chat_with_retries(client, model=judge, temperature=0, max_tokens=2048,
                                        messages=[{"role": "system", "content": system},
                                                  {"role": "user", "content": prompt}])  # fmt: skip
            text = r.choices[0].message.content or ""
            _append(out, {"question_id": q["question_id"], "model": model,
                          "judge": [judge, name], "user_prompt": prompt, "judgment": text,
                          "score": parse_rating(text), "turn": turn, "tstamp": time.time()})  # fmt: skip
            bar.update()

    await asyncio.gather(*(one(q, t) for q, t in jobs))
    bar.close()


def score_table(judgments: list[dict], questions: list[dict]) -> dict[str, dict]:
    """Per model: mean score per category, per turn, and overall (ratings of -1 left out)."""
    cat = {q["question_id"]: q["category"] for q in questions}
    acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for j in judgments:
        if j["score"] < 0:
            continue
        a = acc[j["model"]]
        a[f"turn {j['turn']}"].append(j["score"])
        a[cat.get(j["question_id"], "?")].append(j["score"])
        a["average"].append(j["score"])
    return {m: {k: sum(v) / len(v) for k, v in sorted(a.items())} for m, a in acc.items()}


def radar_chart(table: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cats = sorted(
        {k for v in table.values() for k in v if k != "average" and not k.startswith("turn")}
    )
    if len(cats) < 3:
        return
    angles = np.linspace(0, 2 * np.pi, len(cats), endpoint=False).tolist()
    fig = plt.figure(figsize=(5, 5))
    ax = fig.add_subplot(polar=True)
    for model, sc in table.items():
        vals = [sc.get(c, 0) for c in cats]
        ax.plot(angles + angles[:1], vals + vals[:1], label=model)
    ax.set_xticks(angles, cats, fontsize=8)
    ax.set_ylim(0, 10)
    ax.legend(fontsize=6, loc="lower right", bbox_to_anchor=(1.3, -0.1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_mt_bench(bench_dir: str, models: list[tuple[str, str]], judge_url: str, judge_model: str,
                 out: str, api_key: str = "EMPTY", judge_api_key: str | None = None,
                 concurrency: int = 8, max_tokens: int = 1024,
                 max_questions: int | None = None) -> dict:  # fmt: skip
    """``models``: (name, base URL) pairs. ``bench_dir`` holds question.jsonl,
    judge_prompts.jsonl and reference_answer/gpt-4.jsonl (FastChat's layout)."""
    import openai

    bench, out_dir = Path(bench_dir), Path(out)
    questions = read_jsonl(bench / "question.jsonl", "questions")[:max_questions]
    prompts = {p["name"]: p for p in read_jsonl(bench / "judge_prompts.jsonl", "judge prompts")}
    missing = {"single-v1", "single-math-v1", "single-v1-multi-turn",
               "single-math-v1-multi-turn"} - set(prompts)  # fmt: skip
    if missing:
        raise FusechatError(f"{bench / 'judge_prompts.jsonl'}: no prompt {sorted(missing)[0]}")
    ref_path = bench / "reference_answer" / "gpt-4.jsonl"
    refs = {r["question_id"]: r["choices"][0]["turns"] for r in read_jsonl(ref_path, "references")}
    (out_dir / "model_answer").mkdir(parents=True, exist_ok=True)
    (out_dir / "model_judgment").mkdir(parents=True, exist_ok=True)
    judge_file = out_dir / "model_judgment" / f"{judge_model.replace('/', '_')}_single.jsonl"
    judge_client = openai.AsyncOpenAI(base_url=judge_url, api_key=judge_api_key or api_key)

    async def main():
        for name, url in models:
            client = openai.AsyncOpenAI(base_url=url, api_key=api_key)
            ans_file = out_dir / "model_answer" / f"{name}.jsonl"
            await generate_answers(client, name, questions, ans_file, concurrency, max_tokens)
            answers = {r["question_id"]: r["choices"][0]["turns"]
                       for r in read_jsonl(ans_file, "answers")}  # fmt: skip
            await judge_answers(judge_client, judge_model, name, questions, answers, prompts,
                                refs, judge_file, concurrency)  # fmt: skip

    asyncio.run(main())
    table = score_table(read_jsonl(judge_file, "judgments"), questions)
    (out_dir / "scores.json").write_text(json.dumps(table, indent=2) + "\n")
    radar_chart(table, out_dir / "radar.png")
    return table


def format_table(table: dict[str, dict]) -> str:
    cols = sorted({k for v in table.values() for k in v if k != "average"}) + ["average"]
    width = max([len(m) for m in table] + [5]) + 2
    lines = ["model".ljust(width) + "".join(c[:10].rjust(11) for c in cols)]
    for m, sc in table.items():
        lines.append(m.ljust(width) + "".join(f"{sc.get(c, float('nan')):11.2f}" for c in cols))
    return "\n".join(lines)

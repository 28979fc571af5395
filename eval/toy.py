"""The toy question set: generate answers locally and score them with a rule-based judge.

Questions are the toy world's held-out rows (``fusechat/toy/corpus.py``: one user question, a
``reference`` answer, a ``skill`` and optionally ``answers``, every right value). The judge has
the interface an LLM judge has, ``judge(question, answer, reference) -> (score 1..10, raw
text)``, scored by rule, so a CPU run can score models without an LLM: where a row lists
``answers`` the best of them is judged (any right moon of a planet is right). Generation uses
each model's own chat template, as serving would.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch

from fusechat.errors import FusechatError, first_line

_WORD = re.compile(r"[\w']+")


def load_questions(path: str | Path, max_questions: int | None = None) -> list[dict]:
    """Rows with ``messages`` (the question is every turn before the last answer),
    ``reference`` and ``skill``."""
    path = Path(path)
    if not path.exists():
        raise FusechatError(f"{path}: question file not found")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            msgs = row["messages"]
            out.append(
                {
                    "id": n,
                    "skill": row.get("skill", "all"),
                    "messages": msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs,
                    "reference": row.get("reference") or msgs[-1]["content"],
                    "answers": [str(a) for a in row.get("answers") or []],
                }
            )
        except (json.JSONDecodeError, KeyError, TypeError, IndexError) as e:
            raise FusechatError(f"{path}: line {n}: not a toy question ({e})") from None
        if max_questions and len(out) >= max_questions:
            break
    if not out:
        raise FusechatError(f"{path}: no questions")
    return out


def rule_judge(question: str, answer: str, reference: str) -> tuple[int, str]:
    """Score 1..10 from the reference's *answer words* (its words that the question does not
    contain: the capital's name, the sum) found in the answer: ``1 + round(9 * hits / n)``.
    Echoing the question earns nothing; an answer equal to the reference scores 10. A
    reference that is one right value (``Kelo``, ``82``) is thus judged by that value."""
    norm = lambda s: " ".join(_WORD.findall(s.lower()))  # noqa: E731
    if norm(answer) == norm(reference):
        return 10, "[[10]] exact match"
    asked = set(_WORD.findall(question.lower()))
    key = [w for w in _WORD.findall(reference.lower()) if w not in asked] or _WORD.findall(
        reference.lower()
    )
    got = set(_WORD.findall(answer.lower()))
    hits = sum(w in got for w in key)
    score = 1 + round(9 * hits / max(len(key), 1))
    return score, f"[[{score}]] {hits}/{len(key)} answer words"


def _prompt(tok, question: dict, n: int) -> str:
    """A question in the model's own chat template; a template that refuses it (Jinja
    ``raise_exception``) is one line naming the question."""
    from jinja2 import TemplateError

    try:
        return tok.apply_chat_template(question["messages"], tokenize=False,
                                       add_generation_prompt=True)  # fmt: skip
    except TemplateError as e:
        raise FusechatError(f"question {n} ({question.get('id', '?')}): "
                            f"{tok.name_or_path}: the chat template refused it ({first_line(e)})"
                            ) from None  # fmt: skip


@torch.no_grad()
def generate_answers(
    model, tok, stops: Sequence[int], questions: Sequence[dict], max_new_tokens: int = 32,
    batch_size: int = 32,
) -> list[str]:  # fmt: skip
    """Greedy answers with the model's own chat template, batched with left padding
    (``model, tok, stops`` from ``eval.chat.load_chat_model``)."""
    device = model.get_input_embeddings().weight.device
    answers = []
    for i in range(0, len(questions), batch_size):
        chunk = questions[i : i + batch_size]
        texts = [_prompt(tok, q, i + j) for j, q in enumerate(chunk)]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=list(stops),
            pad_token_id=tok.pad_token_id,
        )
        for row in out[:, enc["input_ids"].shape[1] :]:
            answers.append(tok.decode(row, skip_special_tokens=True).strip())
    return answers


def nll_by_skill(model, tok, questions: Sequence[dict]) -> dict[str, float]:
    """Held-out loss of the reference answers in nats per character (comparable across
    tokenizers; each conversation in the model's own chat template), per skill (``nll/char
    SKILL``: where a model's loss is) and pooled over all questions (``nll/char``), from one
    pass over them."""
    from fusechat.heldout import nll_and_chars

    sums = {}
    for skill in sorted({q["skill"] for q in questions}):
        rows = [{"messages": [*q["messages"], {"role": "assistant", "content": q["reference"]}]}
                for q in questions if q["skill"] == skill]  # fmt: skip
        sums[skill] = nll_and_chars(model, tok, rows, "tokenizer")
    out = {"nll/char": sum(n for n, _ in sums.values()) / max(sum(c for _, c in sums.values()), 1)}
    out |= {f"nll/char {s}": n / max(c, 1) for s, (n, c) in sums.items()}
    return out


def score(questions: Sequence[dict], answers: Sequence[str], judge=rule_judge) -> dict:
    """Per-skill and average judge scores; a question with several right ``answers`` takes
    the best score over them."""
    by_skill: dict[str, list[int]] = defaultdict(list)
    for q, a in zip(questions, answers, strict=True):
        asked = q["messages"][-1]["content"]
        refs = q.get("answers") or [q["reference"]]
        by_skill[q["skill"]].append(max(judge(asked, a, r)[0] for r in refs))
    table = {k: sum(v) / len(v) for k, v in sorted(by_skill.items())}
    table["average"] = sum(sum(v) for v in by_skill.values()) / sum(map(len, by_skill.values()))
    return table

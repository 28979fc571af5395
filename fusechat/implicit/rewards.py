"""Implicit fusion's rewards (``fusechat score``): each a small class in ``REWARDS``, named in
``configs.REWARD_NAMES``. A reward says which corpus fields it reads (``fields``), whether it is
a correctness check (``pass_mark``), what identifies it in the output's key (``identity``),
checks its inputs before anything is written (``check``), loads once (``load``) and scores a
batch of ``Candidate`` responses (``score``). Adding one: a class here, its name in the config,
its test.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from fusechat.data import Message, TemplateRefused, render_text
from fusechat.errors import FusechatError, first_line
from fusechat.implicit.settings import ScoreConfig


def toy_reward(question: str, response: str, answers: Sequence[str]) -> float:
    """1.0 when the toy rule judge (``fusechat.eval.toy.rule_judge``) gives the response its
    full mark for one of the right values (every answer word of the value in it) and the
    response names no number that is neither in the question nor that value, else 0.0 (the
    judge alone passes ``93 plus 89 is 179.`` for ``Compute 26 plus 63.``: it holds 89)."""
    import re

    from fusechat.eval.toy import rule_judge

    def numbers(text: str) -> set[str]:
        return set(re.findall(r"\d+", text))

    asked = numbers(question)
    return float(any(rule_judge(question, response, str(a))[0] == 10
                     and numbers(response) <= asked | numbers(str(a)) for a in answers))  # fmt: skip


@dataclass(frozen=True)
class Candidate:
    """A response to score: its prompt, its text, the corpus row's fields the reward asked for."""

    prompt: list[Message]
    response: str
    fields: dict


class ToyReward:
    """The toy world's correctness check: ``toy_reward`` against the row's ``answers``."""

    fields: ClassVar[tuple[str, ...]] = ("answers",)
    pass_mark: ClassVar[float | None] = 1.0  # a correctness check: 1 is right
    version: ClassVar[int] = 2  # 2: a response naming another number fails

    def __init__(self, cfg: ScoreConfig):
        self.cfg = cfg

    def identity(self) -> dict:
        return {"toy_reward": self.version}

    def check(self, fields: Sequence[dict], numbers: Sequence[int], data: str) -> None:
        for f, n in zip(fields, numbers, strict=True):
            answers = f.get("answers")
            if not isinstance(answers, list) or not answers:
                raise FusechatError(
                    f"{data}: row {n}: no 'answers' (reward toy checks a response against the "
                    "row's right values, as the toy's held-out and question rows list them)"
                )

    def load(self) -> None:
        pass

    def score(self, cands: Sequence[Candidate]) -> list[float]:
        return [toy_reward(c.prompt[-1]["content"], c.response, c.fields["answers"])
                for c in cands]  # fmt: skip


class HFReward:
    """A Hugging Face reward model (``AutoModelForSequenceClassification``, one label): the
    conversation, prompt and response, rendered with its template; the reward is the label's
    logit at the last token. Batches are left-padded with position ids counted from each
    row's first real token, so a response gets the score it gets alone."""

    fields: ClassVar[tuple[str, ...]] = ()
    pass_mark: ClassVar[float | None] = None

    def __init__(self, cfg: ScoreConfig):
        self.cfg = cfg
        self.path = str(cfg.reward_model)
        self.model = self.tokenizer = None
        self.truncated = 0

    def identity(self) -> dict:
        from fusechat.io import model_fingerprint

        return {"reward_model_fingerprint": model_fingerprint(self.path)}

    def check(self, fields: Sequence[dict], numbers: Sequence[int], data: str) -> None:
        """Before the output folder is made and any weights load: a one-label classifier, and
        a chat template where it is to render with its own."""
        from fusechat.data import load_tokenizer

        check_reward_config(self.path)
        tok = load_tokenizer(self.path, "the reward model's tokenizer")
        if self.cfg.template == "tokenizer" and not getattr(tok, "chat_template", None):
            raise FusechatError(f"{self.path}: the reward model's tokenizer has no chat_template; "
                                "name a template (--template)")  # fmt: skip

    def load(self) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification

        from fusechat.data import check_finite_weights, load_model, load_tokenizer, resolve_dtype

        self.tokenizer = load_tokenizer(self.path, "the reward model's tokenizer")
        cuda = torch.cuda.is_available()
        model = load_model(self.path, AutoModelForSequenceClassification,
                           dtype=getattr(torch, resolve_dtype(self.cfg.dtype)),
                           device_map="auto" if cuda else None).eval()  # fmt: skip
        check_finite_weights(model, self.path)
        # left padding puts every row's last token in the last column: no pad id can be taken
        # for it (a pad id equal to the EOS that ends a conversation would pick the one before)
        model.config.get_text_config().pad_token_id = -1
        self.model = model

    def encode(self, cand: Candidate) -> list[int]:
        conv = [*cand.prompt, {"role": "assistant", "content": cand.response}]
        try:
            text, special = render_text(conv, self.tokenizer, self.cfg.template, generation=False)
        except TemplateRefused as e:
            raise FusechatError(f"{self.path}: the chat template refused a conversation ({e})"
                                ) from None  # fmt: skip
        ids = self.tokenizer(text, add_special_tokens=special)["input_ids"]
        if len(ids) > self.cfg.max_length:
            self.truncated += 1
            ids = ids[-self.cfg.max_length :]
        return ids

    def score(self, cands: Sequence[Candidate]) -> list[float]:
        import torch

        encoded = [self.encode(c) for c in cands]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        device = self.model.get_input_embeddings().weight.device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out = [0.0] * len(encoded)
        for b in range(0, len(order), self.cfg.batch_size):
            chunk = order[b : b + self.cfg.batch_size]
            width = max(len(encoded[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, i in enumerate(chunk):
                ids[r, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                mask[r, width - len(encoded[i]) :] = 1
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            with torch.no_grad():
                logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                    position_ids=positions.to(device)).logits  # fmt: skip
            for r, i in enumerate(chunk):
                out[i] = float(logits[r, 0].float())
        return out


def check_reward_config(path: str) -> None:
    """A reward model's config: a sequence classifier (its architecture says so, where it
    names one) with one label; else one line, before any weights load."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise FusechatError(f"{path}: cannot read the reward model's config ({first_line(e)})"
                            ) from None  # fmt: skip
    arch = list(getattr(config, "architectures", None) or [])
    if arch and not any(a.endswith("ForSequenceClassification") for a in arch):
        raise FusechatError(f"{path}: not a sequence classifier (architecture {arch[0]}); "
                            "reward hf reads a reward model with one label")  # fmt: skip
    if config.num_labels != 1:
        raise FusechatError(f"{path}: a reward model has one label; this one has "
                            f"{config.num_labels}")  # fmt: skip


JUDGE_SYSTEM = "You are an impartial judge of an AI assistant's answers."
JUDGE_PROMPT = (
    "Rate the assistant's last answer to the conversation below for helpfulness, relevance, "
    "accuracy, depth and detail. Be as objective as possible. After a short explanation, give "
    "the rating, an integer from 1 to 10, in this format: [[rating]], e.g. [[5]].\n\n"
    "[The conversation]\n{conversation}\n\n[The assistant's answer]\n{response}"
)


def judge_request(cand: Candidate) -> str:
    """The judge's user message for one response: the conversation as ``ROLE: text`` lines
    and the response (FastChat's single-answer grading, one prompt for every turn count)."""
    conv = "\n".join(f"{m['role'].upper()}: {m['content']}" for m in cand.prompt)
    return JUDGE_PROMPT.format(conversation=conv, response=cand.response)


class JudgeReward:
    """An OpenAI-compatible chat endpoint (a served model, or GPT-4 as in MT-Bench) rates each
    response 1-10 at temperature 0, read as FastChat reads a rating (``[[x]]``, else ``[x]``).
    A response the judge gives no rating gets 0, below every rating, and is counted
    (``unrated`` in the manifest): it is never chosen, and a pair holds it only as the
    rejected side. Requests are retried on connection errors, timeouts, 5xx and 429."""

    fields: ClassVar[tuple[str, ...]] = ()
    pass_mark: ClassVar[float | None] = None

    def __init__(self, cfg: ScoreConfig):
        self.cfg = cfg
        self.unrated = 0

    def identity(self) -> dict:
        return {}  # a served judge is named by its URL and model (in the key); no fingerprint

    def check(self, fields: Sequence[dict], numbers: Sequence[int], data: str) -> None:
        pass

    def load(self) -> None:
        pass

    def score(self, cands: Sequence[Candidate]) -> list[float]:
        import asyncio

        return asyncio.run(self._score(cands))

    async def _score(self, cands: Sequence[Candidate]) -> list[float]:
        import asyncio
        import os

        import openai

        from fusechat.eval.mtbench import chat_with_retries, parse_rating

        key = os.environ.get(self.cfg.judge_api_key_env) or "EMPTY"  # a local server needs none
        client = openai.AsyncOpenAI(base_url=self.cfg.judge_url, api_key=key, max_retries=0)
        sem = asyncio.Semaphore(self.cfg.concurrency)

        async def one(c: Candidate) -> float:
            async with sem:
                r = await chat_with_retries(
                    client, model=self.cfg.judge_model, temperature=0, max_tokens=1024,
                    messages=[{"role": "system", "content": JUDGE_SYSTEM},
                              {"role": "user", "content": judge_request(c)}])  # fmt: skip
            rating = parse_rating(r.choices[0].message.content or "")
            if rating < 0:
                self.unrated += 1
                return 0.0
            return rating

        try:
            return list(await asyncio.gather(*(one(c) for c in cands)))
        except openai.APIStatusError as e:  # 4xx but 429: a wrong model name, a bad key
            raise FusechatError(f"judge {self.cfg.judge_url}: {e.status_code} "
                                f"({first_line(e.message)})") from None  # fmt: skip
        finally:
            await client.close()


REWARDS: dict[str, type] = {"toy": ToyReward, "hf": HFReward, "judge": JudgeReward}

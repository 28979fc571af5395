"""What the implicit stages share: the pure choices (which response is best, which prompts go
to SFT) and reading the prompts and responses back."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fusechat.configs import DataSpec
from fusechat.data import Message
from fusechat.errors import FusechatError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- pure parts


def prompt_of(messages: Sequence[Message]) -> list[Message]:
    """A conversation's prompt: its messages up to and including its last user turn (earlier
    turns, system message and answers, stay as context)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last is None:
        raise ValueError("no user turn")
    return [dict(m) for m in messages[: last + 1]]


def shard_seed(seed: int, shard: int) -> int:
    """The seed shard ``shard`` samples from: a hash of both, so shards draw independent
    streams and a shard's responses do not depend on which shards ran before it."""
    h = hashlib.blake2b(f"fusechat-sample:{seed}:{shard}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)


def response_ids(ids: Sequence[int], stops: Sequence[int]) -> tuple[list[int], bool]:
    """A generated sequence's response: its tokens before the first stop token, and whether a
    stop token ended it (else ``max_new_tokens`` did; the padding after a stop is dropped)."""
    stop = set(stops)
    for k, t in enumerate(ids):
        if t in stop:
            return list(ids[:k]), True
    return list(ids), False


def best_index(rewards: Sequence[float]) -> int:
    """The highest reward's index; ties go to the first (candidates come in model order, then
    sample order)."""
    if not len(rewards):
        raise ValueError("no candidates")
    return max(range(len(rewards)), key=lambda i: (rewards[i], -i))


def sft_choice(rewards: Sequence[float], pass_mark: float | None = None) -> int | None:
    """The SFT response of one prompt, over every model's responses in (model, sample) order:
    the highest reward, the first on ties (``best_index``); None where the reward is a
    correctness check (``pass_mark``: toy 1) and no response reaches it: a wrong answer is no
    example to learn from."""
    i = best_index(rewards)
    return None if pass_mark is not None and rewards[i] < pass_mark else i


def preference_pair(
    rewards: Sequence[float], min_gap: float, max_gap: float | None = None
) -> tuple[int, int] | None:
    """One model's preference pair on one prompt, over its responses in sample order:
    (chosen, rejected) = (the first with the highest reward, the last with the lowest), kept
    when ``min_gap <= best - worst <= max_gap`` (None: no upper bound). None otherwise, and for
    fewer than two responses (WRPO: pairs come from one source, its best against its worst)."""
    if len(rewards) < 2:
        return None
    hi = best_index(rewards)
    lo = min(range(len(rewards)), key=lambda i: (rewards[i], -i))
    gap = float(rewards[hi]) - float(rewards[lo])
    if gap < min_gap or (max_gap is not None and gap > max_gap):
        return None
    return hi, lo


def sft_side(prompt: Sequence[Message], sft_share: float) -> bool:
    """Whether a prompt goes to SFT (else to the preference pairs): a hash of its messages,
    read as a number in [0, 1), below ``sft_share``. The same prompt always lands on the same
    side, whatever else the set holds (a repeated prompt is never on both)."""
    blob = json.dumps([[m["role"], m["content"]] for m in prompt], ensure_ascii=False)
    h = hashlib.blake2b(blob.encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64 < sft_share


# --------------------------------------------------------------------------- shared


def data_record(data: DataSpec) -> dict:
    """How the corpus was read, its path made absolute: what score and pairs read it again by."""
    p = Path(data.path)
    return {**data.model_dump(), "path": str(p.resolve()) if p.exists() else data.path}


def load_prompts(data: dict, fingerprint: str, where: Path, fields: tuple[str, ...] = ()):
    """The corpus a sample was made from, read again as it was (``data_record``) and checked
    against its fingerprint: (prompts, load report)."""
    from fusechat.conversations import load_conversations
    from fusechat.io import corpus_fingerprint

    spec = DataSpec(**data)
    convs, report = load_conversations(spec.path, spec.format, spec.strict, spec.max_rows,
                                       prompts=True, fields=fields)  # fmt: skip
    if corpus_fingerprint(convs) != fingerprint:
        raise FusechatError(f"{spec.path}: changed since {where} was sampled from it")
    return [prompt_of(c) for c in convs], report


def read_shard(path: Path) -> list[dict]:
    """A shard this stage wrote (its checksum verified when the stage began)."""
    from safetensors.numpy import load

    from fusechat.shards import unpack_rows

    return unpack_rows(load(path.read_bytes()))


def text_of(row: dict) -> str:
    """A response row's text (``pos.text``: its UTF-8 bytes)."""
    return row["pos.text"].tobytes().decode("utf-8")


def text_array(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()


def reward_stats(rewards: Sequence[float], pass_mark: float | None = None) -> dict:
    """Count, mean, standard deviation, min and max of rewards (rounded to 6 digits), and the
    share at the pass mark where the reward has one."""
    x = np.asarray(rewards, dtype=np.float64)
    r6 = lambda v: round(float(v), 6) if len(x) else None  # noqa: E731
    out = {"responses": len(x), "mean": r6(x.mean() if len(x) else 0),
           "std": r6(x.std() if len(x) else 0), "min": r6(x.min() if len(x) else 0),
           "max": r6(x.max() if len(x) else 0)}  # fmt: skip
    if pass_mark is not None:
        out["passed"] = r6((x >= pass_mark).mean() if len(x) else 0)
    return out

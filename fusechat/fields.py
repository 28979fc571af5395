"""The fields of each shard kind, declared once: their names, dtypes and ranks.

A shard (``fusechat.shards``) packs rows flat: ``pos.*`` arrays have one entry per position
(shape ``(positions, *trailing)``), ``row.*`` arrays one per row (``(rows, *trailing)``), and
``row.splits`` cuts positions back into rows. Every writer and reader goes through
``check_fields``: a field a kind does not declare, a required one missing, or one with another
dtype or rank is an error naming the shard, so a misspelled name fails where it is written or
read, never silently. ``tests/test_fields.py`` also checks that every ``pos.*``/``row.*``
literal in the package is declared here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fusechat.errors import FusechatError

IDS = ("uint16", "int32")  # token ids: uint16 when the vocabulary fits (shards.ids_dtype)
SPLITS = "row.splits"


@dataclass(frozen=True)
class Field:
    dtypes: tuple[str, ...]
    trailing: int = 0  # dimensions after the position (or row) axis
    optional: bool = False
    doc: str = ""


def _f(dtype: str | tuple[str, ...], trailing: int = 0, optional: bool = False, doc: str = ""):
    return Field((dtype,) if isinstance(dtype, str) else dtype, trailing, optional, doc)


_ROW_NLL = {
    "row.index": _f("int64", doc="the row's index in the corpus"),
    "row.nll_sum": _f("float64", doc="NLL of the gold text summed over learned tokens"),
    "row.n_tokens": _f("int64", doc="learned tokens"),
    "row.n_chars": _f("int64", doc="characters of the learned text"),
}
_RESPONSE = {
    "pos.text": _f("uint8", doc="the response's UTF-8 bytes"),
    "row.index": _f("int64", doc="the prompt's index in the prompt set"),
    "row.sample": _f("int64", doc="which of the n samples"),
    "row.n_tokens": _f("int64", doc="response tokens (+1 when it ended by itself)"),
    "row.prompt_tokens": _f("int64"),
    "row.finished": _f("bool", doc="ended with the end-of-sequence token"),
}

KINDS: dict[str, dict[str, Field]] = {
    "capture": {
        "pos.input_ids": _f(IDS),
        "pos.labels_mask": _f("bool", doc="the token is learned (assistant text)"),
        "pos.byte_end": _f("int32", doc="byte offset where the token's text ends"),
        "pos.topk_ids": _f(IDS, 1, doc="top-K next-token ids"),
        "pos.topk_logprobs": _f("float16", 1),
        "pos.gold_logprob": _f("float16", doc="log-probability of the gold next token"),
        "pos.topk_next": _f(IDS, 2, optional=True, doc="each candidate's greedy lookahead"),
        **_ROW_NLL,
        "row.text_hash": _f("uint64", doc="hash of the rendered text (same corpus check)"),
        "row.truncated": _f("bool", doc="cut at max_length"),
    },
    "align": {
        "pos.ids": _f(IDS, 1, doc="the source's distribution over pivot ids, k wide"),
        "pos.probs": _f("float16", 1),
        "pos.valid": _f("bool", doc="a distribution exists at this pivot position"),
        "pos.branch_ids": _f(IDS, 2, optional=True, doc="branch tokens (alignment branches)"),
        **_ROW_NLL,
    },
    "fuse": {
        "pos.input_ids": _f(IDS),
        "pos.labels_mask": _f("bool"),
        "pos.target_ids": _f(IDS, 1, doc="the sparse fused target"),
        "pos.target_probs": _f("float16", 1),
        "pos.branch_ids": _f(IDS, 2, optional=True),
        "row.index": _f("int64"),
        "row.weights": _f("float32", 1, doc="per model (pivot first): its weight in the fusion"),
    },
    "sample": dict(_RESPONSE),
    "score": {
        **_RESPONSE,
        "row.model": _f("int64", doc="which sampled model (index into the score's inputs)"),
        "row.reward": _f("float64"),
    },
}


def names() -> set[str]:
    """Every declared field name, of any kind."""
    return {SPLITS, *(n for fields in KINDS.values() for n in fields)}


def check_fields(kind: str, arrays: dict[str, np.ndarray], where: str) -> None:
    """Refuse a packed shard whose arrays are not ``kind``'s fields: an undeclared name, a
    required field missing (an empty shard holds only ``row.splits``), a dtype or rank that
    differs from the declaration."""
    if kind not in KINDS:
        raise FusechatError(f"{where}: unknown shard kind {kind!r} ({', '.join(KINDS)})")
    fields = KINDS[kind]
    unknown = sorted(set(arrays) - set(fields) - {SPLITS})
    if unknown:
        raise FusechatError(
            f"{where}: {', '.join(unknown)} not a field of {kind} shards ({', '.join(fields)})"
        )
    if SPLITS not in arrays:
        raise FusechatError(f"{where}: no {SPLITS}")
    if len(arrays[SPLITS]) <= 1:
        return
    missing = sorted(n for n, f in fields.items() if not f.optional and n not in arrays)
    if missing:
        raise FusechatError(f"{where}: {kind} shard without {', '.join(missing)}")
    for name, a in arrays.items():
        if name == SPLITS:
            continue
        f = fields[name]
        if str(a.dtype) not in f.dtypes or a.ndim != 1 + f.trailing:
            raise FusechatError(
                f"{where}: {name} is {a.dtype} with {a.ndim} dimensions, "
                f"declared {' or '.join(f.dtypes)} with {1 + f.trailing}"
            )

"""What a token stands for: its raw bytes, where it ends in a text, and the pivot token that a
continuation text starts with.

Two tokenizers of the same text agree on its bytes, not on their pieces: ``▁`` (SentencePiece's
space), ``Ġ`` (byte-level BPE's space) and ``<0xNN>`` (byte fallback) all stand for bytes. Every
token is reduced to the bytes it stands for (``token_bytes``); a captured row records where each
token ends, in UTF-8 bytes (``byte_ends``), so positions of two tokenizations can be compared
exactly, byte-fallback pieces of one character included.

``FirstToken`` answers "which pivot token would the pivot's own tokenizer emit first for this
continuation text?", the question the ``text`` alignment asks for every source candidate.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

_SP_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted: the printable stand-in character -> byte."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and "ByteLevel" in repr(backend.pre_tokenizer)


def vocab_list(tokenizer) -> list[str]:
    """Token strings by id, over the whole id range (holes are empty strings)."""
    vocab = tokenizer.get_vocab()
    tokens = [""] * (max(vocab.values()) + 1)
    for t, i in vocab.items():
        tokens[i] = t
    return tokens


def token_bytes(tokenizer, tokens: Sequence[str] | None = None) -> list[bytes]:
    """The bytes each token stands for (the whole vocabulary, by id, when ``tokens`` is None).

    ``▁`` and ``Ġ`` are spaces, ``<0xNN>`` and byte-level characters are raw bytes (so a token
    may hold part of a UTF-8 character); added and special tokens stand for their text as
    written (``<|im_end|>``).
    """
    tokens = vocab_list(tokenizer) if tokens is None else tokens
    literal = {t.content for t in tokenizer.added_tokens_decoder.values()}
    literal |= set(tokenizer.all_special_tokens)
    decoder = _byte_decoder() if is_byte_level(tokenizer) else None
    out = []
    for t in tokens:
        if t in literal:
            out.append(t.encode())
        elif decoder is not None:
            out.append(bytes(decoder[c] for c in t) if all(c in decoder for c in t) else t.encode())
        elif m := _SP_BYTE.fullmatch(t):
            out.append(bytes([int(m.group(1), 16)]))
        else:
            out.append(t.replace("▁", " ").encode())
    return out


def token_texts(tokenizer, tokens: Sequence[str] | None = None) -> list[str]:
    """``token_bytes`` as text, lone bytes kept as surrogates (``surrogateescape``), so a
    partial character is the same string under either kind of tokenizer."""
    return [b.decode("utf-8", errors="surrogateescape") for b in token_bytes(tokenizer, tokens)]


def byte_fallback_ids(tokenizer) -> set[int]:
    """Ids of SentencePiece byte-fallback tokens (``<0xNN>``)."""
    if is_byte_level(tokenizer):
        return set()
    return {i for t, i in tokenizer.get_vocab().items() if _SP_BYTE.fullmatch(t)}


def byte_ends(text: str, offsets: Sequence[tuple[int, int]], widths: Sequence[int]) -> np.ndarray:
    """UTF-8 byte offset at which each token ends in ``text``.

    With ``B(i)`` the byte offset of character i and ``w`` the token's byte width
    (``len(token_bytes)``): ``end_t = min(B(char_end_t), max(end_{t-1}, B(char_start_t)) + w_t)``.
    Whole tokens end where their characters end; the pieces of one character that byte
    fallback or byte-level BPE emit (all with that character's span) end one byte apart; a
    zero-width token (an added BOS) ends where the text so far ends. Non-decreasing.
    """
    cum = np.zeros(len(text) + 1, dtype=np.int64)
    if text:
        cum[1:] = np.cumsum([len(ch.encode("utf-8", "surrogatepass")) for ch in text])
    out = np.zeros(len(offsets), dtype=np.int64)
    prev = 0
    for t, ((s, e), w) in enumerate(zip(offsets, widths, strict=True)):
        end = min(int(cum[e]), max(prev, int(cum[s])) + int(w)) if e > s else prev
        prev = max(prev, end)
        out[t] = prev
    return out


# --------------------------------------------------------------------------- continuation


def continuation_backend(tokenizer):
    """A copy of ``tokenizer``'s backend that tokenizes a text as the continuation of a longer
    one: no prefix space is added (Metaspace ``prepend_scheme='never'``, no ``Prepend``
    normalizer, ByteLevel ``add_prefix_space=False``) and no special tokens are inserted."""
    from tokenizers import Tokenizer

    spec = json.loads(tokenizer.backend_tokenizer.to_str())

    def fix(node):
        if isinstance(node, dict):
            if node.get("type") == "Metaspace":
                node["prepend_scheme"] = "never"
                node.pop("add_prefix_space", None)
            if node.get("type") == "ByteLevel":
                node["add_prefix_space"] = False
            for key in ("normalizers", "pretokenizers"):
                if isinstance(node.get(key), list):
                    node[key] = [fix(n) for n in node[key] if n.get("type") != "Prepend"]
            for key in ("normalizer", "pre_tokenizer"):
                if isinstance(node.get(key), dict):
                    node[key] = None if node[key].get("type") == "Prepend" else fix(node[key])
        return node

    spec = fix(spec)
    spec["post_processor"] = None
    return Tokenizer.from_str(json.dumps(spec))


class FirstToken:
    """``pi(w)``: the pivot token that the pivot's own tokenizer emits first for a continuation
    text ``w`` (bytes), or -1 when none does.

    ``w`` is tokenized as a continuation (``continuation_backend``); where the tokenizer cannot
    take it (a partial UTF-8 character) or its first token is not a prefix of ``w`` (a
    normaliser rewrote the text), the longest pivot token that is a byte prefix of ``w`` is
    used. Results are memoised: the same continuations recur across a corpus.
    """

    def __init__(self, pivot_tokenizer, pivot_bytes: Sequence[bytes] | None = None):
        """``pivot_tokenizer`` None: a vocabulary of ``pivot_bytes`` alone, segmented by longest
        prefix (hand-made vocabularies in tests)."""
        self.bytes = list(pivot_bytes) if pivot_bytes is not None else token_bytes(pivot_tokenizer)
        self.backend = continuation_backend(pivot_tokenizer) if pivot_tokenizer else None
        fallback = byte_fallback_ids(pivot_tokenizer) if pivot_tokenizer else set()
        self.prefix: dict[bytes, int] = {}
        for i, b in enumerate(self.bytes):
            # a piece beats a byte token: the tokenizer emits <0x65> only where no 'e' exists
            if b and (b not in self.prefix or (self.prefix[b] in fallback and i not in fallback)):
                self.prefix[b] = i
        self.longest = max((len(b) for b in self.prefix), default=0)
        unk = getattr(pivot_tokenizer, "unk_token_id", None) if pivot_tokenizer else None
        self.unk = -1 if unk is None else int(unk)
        self.memo: dict[bytes, int] = {}

    def longest_prefix(self, w: bytes) -> int:
        for n in range(min(self.longest, len(w)), 0, -1):
            i = self.prefix.get(w[:n])
            if i is not None:
                return i
        return -1

    def __call__(self, w: bytes) -> int:
        got = self.memo.get(w)
        if got is None:
            got = self.memo[w] = self._compute(w)
        return got

    def _compute(self, w: bytes) -> int:
        if not w:
            return -1
        if self.backend is None:
            return self.longest_prefix(w)
        try:
            text = w.decode("utf-8")
        except UnicodeDecodeError:
            return self.longest_prefix(w)
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if ids and ids[0] != self.unk and ids[0] < len(self.bytes):
            first = self.bytes[ids[0]]
            if first and w.startswith(first):
                return ids[0]
        return self.longest_prefix(w)

    def tokens(self, w: bytes) -> list[int]:
        """The pivot's whole tokenization of the continuation ``w``: its tokens as long as they
        spell a prefix of ``w`` (a partial UTF-8 character at the end is left out)."""
        if self.backend is None:
            out, at = [], 0
            while at < len(w) and (i := self.longest_prefix(w[at:])) >= 0:
                out.append(i)
                at += len(self.bytes[i])
            return out
        text = w.decode("utf-8", errors="ignore")
        out, at = [], 0
        for i in self.backend.encode(text, add_special_tokens=False).ids:
            b = self.bytes[i] if 0 <= i < len(self.bytes) and i != self.unk else b""
            if not b or not w.startswith(b, at):
                break
            out.append(i)
            at += len(b)
        return out

    def table(self, source_bytes: Sequence[bytes]) -> np.ndarray:
        """``pi`` of every source token's whole text, by source id."""
        return np.array([self(b) for b in source_bytes], dtype=np.int64)

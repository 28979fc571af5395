"""Align a source model's tokenization to the pivot's: positions (sequence) and ids (vocabulary).

A next-token distribution at position t is conditioned on the text up to the end of token t and
predicts what follows. A pivot position and a source position therefore predict the same next
text exactly when their tokens end at the same character; ``align_offsets`` finds these pairs in
linear time from the fast tokenizers' offset mappings. ``align_dtw`` is the reference's
(FuseLLM's) dynamic time warping over token-string edit distances, kept for parity.

Vocabulary mappings send each source id to a pivot id (or -1): ``exact`` (same text after
normalising ``▁``, ``Ġ`` and byte tokens), ``mined`` (minimum edit distance), ``stats`` (FuseChat:
the pivot token most often aligned with it over the corpus, ties by edit distance).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import lru_cache

import numpy as np
from rapidfuzz.distance import Levenshtein
from rapidfuzz.process import cdist, extractOne

from fusechat.errors import FusechatError

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- token text


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted: the printable stand-in character -> byte."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


_SP_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and "ByteLevel" in repr(backend.pre_tokenizer)


def token_texts(tokenizer, tokens: Sequence[str] | None = None) -> list[str]:
    """Canonical text of each token (the whole vocabulary, by id, when ``tokens`` is None).

    Tokens become the bytes they stand for (``▁`` and ``Ġ`` are spaces, ``<0xNN>`` and byte-level
    characters are raw bytes), decoded as UTF-8 with lone bytes kept as surrogates, so a partial
    character is the same string under either kind of tokenizer. Special tokens stay as written.
    """
    if tokens is None:
        vocab = tokenizer.get_vocab()
        tokens = [""] * (max(vocab.values()) + 1)
        for t, i in vocab.items():
            tokens[i] = t
    specials = set(tokenizer.all_special_tokens)
    decoder = _byte_decoder() if is_byte_level(tokenizer) else None
    out = []
    for t in tokens:
        if t in specials:
            out.append(t)
            continue
        if decoder is not None:
            raw = bytes(decoder[c] for c in t) if all(c in decoder for c in t) else t.encode()
        elif m := _SP_BYTE.fullmatch(t):
            raw = bytes([int(m.group(1), 16)])
        else:
            raw = t.replace("▁", " ").encode()
        out.append(raw.decode("utf-8", errors="surrogateescape"))
    return out


# --------------------------------------------------------------------------- sequence alignment


def token_ends(offsets: Sequence[tuple[int, int]] | np.ndarray) -> np.ndarray:
    """End character of every token, made non-decreasing (zero-width tokens such as BOS end
    where the text so far ends)."""
    ends = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)[:, 1]
    return np.maximum.accumulate(ends) if len(ends) else ends


def align_offsets(
    pivot_offsets: Sequence[tuple[int, int]], source_offsets: Sequence[tuple[int, int]]
) -> tuple[np.ndarray, np.ndarray]:
    """Linear-time alignment by character offsets.

    ``idx[t] = max{j : end_s(j) <= end_p(t)}`` (-1 if none): the source position that has read
    the most text without reading past the pivot's position t; monotone and defined for every
    position after the first source token. ``exact[t]`` is True where the two predict the same
    next text: ``end_s(idx[t]) == end_p(t)`` and no later pivot token ends at the same character
    (byte-fallback pieces of one character share its end; only the last completes it).
    """
    ep, es = token_ends(pivot_offsets), token_ends(source_offsets)
    idx = np.searchsorted(es, ep, side="right") - 1
    exact = (idx >= 0) & (es[np.clip(idx, 0, None)] == ep) if len(es) else np.zeros(len(ep), bool)
    exact &= np.append(ep[1:] != ep[:-1], True)
    return idx, exact


def align_dtw(
    pivot_texts: Sequence[str], source_texts: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """FuseLLM's alignment: dynamic time warping with edit distance between token strings.

    ``D[i, j] = lev(p_i, s_j) + min(D[i-1, j-1], D[i-1, j], D[i, j-1])``; the optimal path
    pairs positions. ``idx[t]`` is the last source position paired with pivot position t and
    ``one_to_one[t]`` marks pairs where neither position is paired with anything else.
    Quadratic in time and memory: the reference, not the default.
    """
    n, m = len(pivot_texts), len(source_texts)
    cost = cdist(pivot_texts, source_texts, scorer=Levenshtein.distance, dtype=np.int32)
    big = np.iinfo(np.int64).max // 4
    d = np.full((n + 1, m + 1), big, dtype=np.int64)
    d[0, 0] = 0
    for i in range(1, n + 1):
        # the diagonal and vertical moves vectorise; the horizontal one is a running minimum
        row = cost[i - 1] + np.minimum(d[i - 1, :-1], d[i - 1, 1:])
        cur = d[i]
        left = big
        for j in range(m):
            left = min(int(row[j]), left + int(cost[i - 1, j]))
            cur[j + 1] = left
    i, j, path = n, m, []
    while i > 0 and j > 0:
        path.append((i - 1, j - 1))
        step = np.argmin([d[i - 1, j - 1], d[i - 1, j], d[i, j - 1]])
        i, j = (i - 1, j - 1) if step == 0 else (i - 1, j) if step == 1 else (i, j - 1)
    path.reverse()
    idx = np.full(n, -1, dtype=np.int64)
    per_p, per_s = Counter(p for p, _ in path), Counter(s for _, s in path)
    one = np.zeros(n, dtype=bool)
    for p, s in path:
        idx[p] = s
        one[p] = per_p[p] == 1 and per_s[s] == 1
    return idx, one


# --------------------------------------------------------------------------- vocabulary mapping


def byte_fallback_ids(tokenizer) -> set[int]:
    """Ids of SentencePiece byte-fallback tokens (``<0xNN>``)."""
    if is_byte_level(tokenizer):
        return set()
    return {i for t, i in tokenizer.get_vocab().items() if _SP_BYTE.fullmatch(t)}


def map_exact(
    source_texts: Sequence[str],
    pivot_texts: Sequence[str],
    pivot_byte_ids: set[int] = frozenset(),
) -> np.ndarray:
    """``map[s] = p`` where the canonical texts are equal, else -1.

    Where several pivot ids share a text, the lowest id wins, except that a piece beats a byte
    token (``pivot_byte_ids``): the pivot's tokenizer emits ``<0x65>`` only where no ``e`` exists.
    """
    lookup: dict[str, int] = {}
    for i, t in enumerate(pivot_texts):
        if t and (t not in lookup or (lookup[t] in pivot_byte_ids and i not in pivot_byte_ids)):
            lookup[t] = i
    return np.array([lookup.get(t, -1) if t else -1 for t in source_texts], dtype=np.int64)


def map_mined(
    source_texts: Sequence[str],
    pivot_texts: Sequence[str],
    ids: Iterable[int] | None = None,
    base: np.ndarray | None = None,
) -> np.ndarray:
    """Minimum edit distance: ``map[s] = argmin_p lev(text_s, text_p)`` for the source ids in
    ``ids`` (all by default) that ``base`` (default: the exact map) leaves unmapped."""
    out = (map_exact(source_texts, pivot_texts) if base is None else base).copy()
    choices = {i: t for i, t in enumerate(pivot_texts) if t}
    for s in range(len(source_texts)) if ids is None else ids:
        if out[s] < 0 and source_texts[s]:
            out[s] = extractOne(source_texts[s], choices, scorer=Levenshtein.distance)[2]
    return out


def cooccurrence(
    pivot_ids: Sequence[int],
    source_ids: Sequence[int],
    idx: np.ndarray,
    exact: np.ndarray,
) -> Counter:
    """Counts of (source token, pivot token) pairs that begin at the same character: the next
    tokens after exactly aligned positions, ``(source_ids[idx[t] + 1], pivot_ids[t + 1])``."""
    pairs: Counter = Counter()
    n_s = len(source_ids)
    for t in np.flatnonzero(exact[:-1]):
        j = idx[t] + 1
        if j < n_s:
            pairs[(int(source_ids[j]), int(pivot_ids[t + 1]))] += 1
    return pairs


def map_stats(
    counts: Counter,
    source_texts: Sequence[str],
    pivot_texts: Sequence[str],
    fallback: np.ndarray,
) -> np.ndarray:
    """FuseChat's statistics-based mapping: ``map[s] = argmax_p count(s, p)``, ties broken by
    the smaller edit distance between texts; source ids never seen keep ``fallback[s]``."""
    out = fallback.copy()
    best: dict[int, tuple[int, int, int]] = {}  # s -> (count, -distance, p)
    for (s, p), c in counts.items():
        key = (c, -Levenshtein.distance(source_texts[s], pivot_texts[p]), p)
        if s not in best or key[:2] > best[s][:2]:
            best[s] = key
    for s, (_, _, p) in best.items():
        out[s] = p
    return out


def coverage(exact: np.ndarray, positions: np.ndarray | None = None) -> float:
    """Share of (selected) pivot positions that received a source distribution."""
    sel = exact if positions is None else exact[positions]
    return float(sel.mean()) if len(sel) else 0.0


# --------------------------------------------------------------------------- the stage

VERSION = 1
SEQUENCE_METHODS = ("offsets", "dtw")
VOCAB_METHODS = ("exact", "mined", "stats")


def _load_capture_tokenizer(reader, override: str | None, role: str):
    """The tokenizer a capture was made with (or ``override``), checked against its shards."""
    from fusechat.capture import tokenizer_fingerprint
    from fusechat.data import load_tokenizer

    path = override or reader.key["model"]
    tok = load_tokenizer(path, f"the {role} tokenizer")
    fp = tokenizer_fingerprint(tok)
    if fp != reader.key["tokenizer_fingerprint"]:
        raise FusechatError(
            f"{reader.folder}: captured with another tokenizer than {path} "
            f"(vocabulary fingerprint {reader.key['tokenizer_fingerprint']} vs {fp})"
        )
    return tok


def check_same_corpus(pivot, source) -> None:
    """Two captures can be aligned only if they scored the same rows rendered the same way."""
    pk, sk = pivot.key, source.key
    for field, what in (
        ("corpus_fingerprint", "different corpora"),
        ("rows", "different numbers of rows"),
        ("shard_rows", "different shard sizes"),
        ("template", "different conversation templates"),
        ("rendering", "different chat templates (use the pivot's for every model)"),
    ):
        if pk.get(field) != sk.get(field):
            raise FusechatError(
                f"{source.folder}: {what} from the pivot capture {pivot.folder} "
                f"({field}: {sk.get(field)} vs {pk.get(field)})"
            )


def _vocab_map_cached(method: str, src_tok, piv_tok, src_texts, piv_texts) -> np.ndarray:
    """``exact`` and ``mined`` maps depend only on the tokenizer pair: computed once, cached."""
    import os
    from pathlib import Path

    from fusechat.capture import tokenizer_fingerprint

    cache = Path(os.environ.get("FUSECHAT_CACHE", Path.home() / ".cache" / "fusechat"))
    path = (
        cache
        / "vocab_maps"
        / (f"{tokenizer_fingerprint(src_tok)}-{tokenizer_fingerprint(piv_tok)}-{method}.npy")
    )
    if path.exists():
        return np.load(path)
    vmap = map_exact(src_texts, piv_texts, byte_fallback_ids(piv_tok))
    if method == "mined":
        vmap = map_mined(src_texts, piv_texts, base=vmap)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npy")
    np.save(tmp, vmap)
    os.replace(tmp, path)
    return vmap


def _align_row(prow, srow, sequence: str, piv_tok, src_tok) -> tuple[np.ndarray, np.ndarray]:
    """Source position for every pivot position of one row, and where it is exact."""
    from fusechat.shards import unpack_ids

    if int(prow["row.text_hash"]) != int(srow["row.text_hash"]):
        raise FusechatError(
            f"row {int(prow['row.index'])}: the captures rendered different texts "
            "(same corpus, different templates?)"
        )
    if sequence == "offsets":
        return align_offsets(
            np.stack([prow["pos.char_end"], prow["pos.char_end"]], 1),
            np.stack([srow["pos.char_end"], srow["pos.char_end"]], 1),
        )
    p_ids, s_ids = unpack_ids(prow["pos.input_ids"]), unpack_ids(srow["pos.input_ids"])
    return align_dtw(
        token_texts(piv_tok, piv_tok.convert_ids_to_tokens(p_ids.tolist())),
        token_texts(src_tok, src_tok.convert_ids_to_tokens(s_ids.tolist())),
    )


def align(
    pivot_dir: str,
    source_dir: str,
    out: str,
    sequence: str = "offsets",
    vocab: str = "exact",
    pivot_tokenizer: str | None = None,
    source_tokenizer: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Map a source capture onto the pivot's positions and vocabulary (``fusechat align``).

    Each output row has, per pivot position, the source's top-K sent through the vocabulary
    map (``pos.ids``, ``pos.probs`` renormalised over mapped entries) and ``pos.valid`` (an
    exactly aligned position with some mapped mass), plus the source's sequence NLL.
    """
    from pathlib import Path

    from tqdm import tqdm

    from fusechat.fuse import map_topk
    from fusechat.io import fingerprint, read_manifest
    from fusechat.shards import (
        StageReader,
        begin_stage,
        finish_stage,
        ids_dtype,
        pack_ids,
        save_shard,
        unpack_ids,
    )

    if sequence not in SEQUENCE_METHODS:
        raise FusechatError(f"unknown sequence alignment {sequence!r} (offsets or dtw)")
    if vocab not in VOCAB_METHODS:
        raise FusechatError(f"unknown vocabulary mapping {vocab!r} (exact, mined or stats)")
    piv, src = StageReader(pivot_dir, "capture"), StageReader(source_dir, "capture")
    check_same_corpus(piv, src)
    piv.check_complete()
    src.check_complete()
    key = {
        "stage": "align",
        "version": VERSION,
        "pivot_capture": fingerprint(piv.key),
        "source_capture": fingerprint(src.key),
        "sequence": sequence,
        "vocab": vocab,
        "k": src.key["k"],
        "shard_rows": piv.key["shard_rows"],
        "rows": piv.key["rows"],
    }
    done = begin_stage(out, key, overwrite)
    if done is None:
        log.info("%s: alignment already complete", out)
        return read_manifest(out)
    piv_tok = _load_capture_tokenizer(piv, pivot_tokenizer, "pivot")
    src_tok = _load_capture_tokenizer(src, source_tokenizer, "source")
    piv_texts, src_texts = token_texts(piv_tok), token_texts(src_tok)
    if piv.key["tokenizer_fingerprint"] == src.key["tokenizer_fingerprint"]:
        vmap = np.arange(len(src_texts))  # one vocabulary: the identity, byte tokens included
    elif vocab == "stats":
        counts: Counter = Counter()
        for i, prows in tqdm(piv.shards(), total=piv.n_shards, desc="co-occurrence"):
            for prow, srow in zip(prows, src.shard(i), strict=True):
                idx, exact = _align_row(prow, srow, sequence, piv_tok, src_tok)
                counts += cooccurrence(
                    unpack_ids(prow["pos.input_ids"]), unpack_ids(srow["pos.input_ids"]), idx, exact
                )
        base = _vocab_map_cached("exact", src_tok, piv_tok, src_texts, piv_texts)
        vmap = map_stats(counts, src_texts, piv_texts, base)
    else:
        vmap = _vocab_map_cached(vocab, src_tok, piv_tok, src_texts, piv_texts)
    np.save(Path(out) / "vocab_map.npy", vmap)
    dtype = ids_dtype(len(piv_texts))
    learned_total = learned_valid = learned_exact = 0
    mass_sum = 0.0
    for i in tqdm(range(piv.n_shards), desc=f"align {Path(out).name}"):
        prows, srows = piv.shard(i), src.shard(i)
        rows = []
        for prow, srow in zip(prows, srows, strict=True):
            idx, exact = _align_row(prow, srow, sequence, piv_tok, src_tok)
            j = np.clip(idx, 0, None)
            s_ids = unpack_ids(srow["pos.topk_ids"])[j]
            s_lp = srow["pos.topk_logprobs"][j]
            pid, probs, mass = map_topk(s_ids, s_lp, vmap)
            valid = exact & (idx >= 0) & (mass > 0)
            learned = np.append(prow["pos.labels_mask"][1:], False)
            learned_total += int(learned.sum())
            learned_valid += int((learned & valid).sum())
            learned_exact += int((learned & exact).sum())
            top_mass = np.exp(s_lp.astype(np.float64)).sum(-1)
            mass_sum += float((mass / top_mass)[learned & exact].sum())
            rows.append(
                {
                    "pos.ids": pack_ids(np.where(valid[:, None], pid, -1), dtype),
                    "pos.probs": np.where(valid[:, None], probs, 0).astype(np.float16),
                    "pos.valid": valid,
                    "row.index": prow["row.index"],
                    "row.nll_sum": srow["row.nll_sum"],
                    "row.n_tokens": srow["row.n_tokens"],
                    "row.n_chars": srow["row.n_chars"],
                }
            )
        if i not in done:
            save_shard(Path(out), i, rows)
    src_vocab = len(src_texts)
    stats = {
        "coverage": learned_valid / max(learned_total, 1),
        "aligned": learned_exact / max(learned_total, 1),
        "mapped_mass": mass_sum / max(learned_exact, 1),
        "vocab_mapped": float((vmap >= 0).sum() / max(src_vocab, 1)),
        "learned_positions": learned_total,
        "pivot_capture": str(pivot_dir),
        "source_capture": str(source_dir),
    }
    log.info(
        "aligned %s: %.4f of learned pivot positions aligned, coverage %.4f, mapped mass %.4f "
        "of the source top-K, %.4f of the source vocabulary mapped",
        source_dir,
        stats["aligned"],
        stats["coverage"],
        stats["mapped_mass"],
        stats["vocab_mapped"],
    )
    return finish_stage(out, key, piv.n_shards, stats)

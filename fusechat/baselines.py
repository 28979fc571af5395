"""The baselines' alignment (FuseLLM, FuseChat-2.0): a pivot position takes the source position
whose token ends at the same byte (``align_offsets``; or FuseLLM's edit-distance DTW,
``align_dtw``), and each source id is sent to one pivot id: ``exact`` (same bytes), ``mined``
(minimum edit distance), ``stats`` (the pivot token most often aligned with it over the corpus,
ties by edit distance)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
from rapidfuzz.distance import Levenshtein
from rapidfuzz.process import cdist, extractOne

from fusechat.tokens import byte_fallback_ids, token_texts

MAP_VERSION = 3  # the cached vocabulary maps' format

# --------------------------------------------------------------------------- sequence alignment


def token_ends(offsets: Sequence[tuple[int, int]] | np.ndarray) -> np.ndarray:
    """End of every token (the second column of ``offsets``), made non-decreasing (zero-width
    tokens such as BOS end where the text so far ends)."""
    ends = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)[:, 1]
    return np.maximum.accumulate(ends) if len(ends) else ends


def align_offsets(
    pivot_offsets: Sequence[tuple[int, int]], source_offsets: Sequence[tuple[int, int]]
) -> tuple[np.ndarray, np.ndarray]:
    """Linear-time alignment by offsets (byte ends, ``fusechat.tokens.byte_ends``, or
    character offsets).

    ``idx[t] = max{j : end_s(j) <= end_p(t)}`` (-1 if none): the source position that has read
    the most text without reading past the pivot's position t; monotone and defined for every
    position after the first source token. ``exact[t]`` is True where the two predict the same
    next text: ``end_s(idx[t]) == end_p(t)`` and no later pivot token ends at the same place
    (zero-width tokens, and byte pieces given character offsets, share an end; only the last
    completes it).
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


def vocab_map(method: str, src_tok, piv_tok) -> np.ndarray:
    """The ``exact`` or ``mined`` map of a tokenizer pair (source id -> pivot id or -1),
    computed once and cached under ``$FUSECHAT_CACHE/vocab_maps``; one vocabulary maps by
    identity, byte tokens included."""
    import os

    from fusechat.io import cache_dir, tokenizer_fingerprint

    sfp, pfp = tokenizer_fingerprint(src_tok), tokenizer_fingerprint(piv_tok)
    src_texts = token_texts(src_tok)
    if sfp == pfp:
        return np.arange(len(src_texts))
    path = cache_dir() / "vocab_maps" / f"{sfp}-{pfp}-{method}-v{MAP_VERSION}.npy"
    if path.exists():
        return np.load(path)
    piv_texts = token_texts(piv_tok)
    vmap = map_exact(src_texts, piv_texts, byte_fallback_ids(piv_tok))
    if method == "mined":
        vmap = map_mined(src_texts, piv_texts, base=vmap)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npy")
    np.save(tmp, vmap)
    os.replace(tmp, path)
    return vmap

"""The ``text`` alignment: a source distribution over pivot tokens at every pivot position,
built from the text each source candidate continues with.

Notation for one row: the pivot's tokens end at bytes ``c_0 <= c_1 <= ...``, the source's at
``a_0 <= a_1 <= ...``; the source's captured top-K at position j predicts its token j+1. Pivot
position t has read the text up to ``c = c_t``; its gold next token ``g`` spans ``[c, c')``.

1. Condition on the context. ``j`` is the last source position with ``a_j <= c``. When
   ``a_j < c`` the source is inside a token: its next token must start with the text already
   read, ``R = text[a_j:c]``. Candidates that do not are impossible here and are dropped;
   those that do continue with the rest of their text, ``w = T_v[len(R):]``.
2. Map every candidate by its continuation text, into the pivot's own segmentation. The gold
   source token (the one the row really continues with) is followed along the gold path:
   if it reaches the end of ``g`` (``a_{j+1} >= c'``) its mass goes to ``g``; if it ends
   inside ``g`` (the source cuts the text finer: ``Ġv`` + ``iolet`` against ``▁viole``), its
   mass is carried to the source's next position, whose candidates continue
   ``w = text[c:a_{j+1}] + T_v``. Every other candidate's mass goes to ``pi(w)``, the first
   token of the pivot's tokenization of ``w`` (``fusechat.tokens.FirstToken``). Where the
   capture stored the source's own continuation of a candidate (``lookahead``), ``T_v`` is
   the candidate's text followed by it: a fragment (``Ġp``, of `` pane``) then maps to the
   pivot token the word begins with (``▁pane``), not to the fragment's own (``▁p``), and a
   candidate no longer than the text read (``ĠK`` after ``▁K``, of `` Kaiba``) is no longer
   dropped.

   So ``q(g) = prod_i p_i(gold)`` over the source tokens that cover ``g``: the chunk
   likelihood of the gold text that ALM (arXiv 2503.20083) matches, and every alternative
   keeps the mass the source gave it, on the pivot token it would begin with.
3. Renormalise over the mass that was placed (top-K truncation and dropped candidates lose
   some), keep the ``k`` largest entries. A position is valid when any mass was placed.

Positions where both tokenizations share the next token's boundaries (most of them) need no
walk: their candidates map through a per-vocabulary table of ``pi`` (vectorised). The rest
walk the source's gold path in Python, a few steps each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fusechat.sparse import top_k
from fusechat.tokens import FirstToken


@dataclass
class SourceVocab:
    """A source vocabulary seen from the pivot: each token's bytes, byte length and first byte
    (-1 if empty), ``pi`` of each whole token (``table``, and as a list for the scalar walk)
    and ``pi`` itself (``first``, for partial continuations)."""

    bytes: list[bytes]
    lengths: np.ndarray
    first_byte: np.ndarray
    table: np.ndarray
    table_list: list[int]
    first: FirstToken

    @classmethod
    def build(
        cls, source_bytes: Sequence[bytes], first: FirstToken, identity: bool = False
    ) -> SourceVocab:
        """``identity``: the source's vocabulary is the pivot's, so each token maps to itself."""
        sb = list(source_bytes)
        table = np.arange(len(sb)) if identity else first.table(sb)
        return cls(
            sb,
            np.array([len(b) for b in sb], dtype=np.int64),
            np.array([b[0] if b else -1 for b in sb], dtype=np.int64),
            table,
            table.tolist(),
            first,
        )


def continuations(top_next: np.ndarray | None, vocab: SourceVocab) -> dict[tuple[int, int], bytes]:
    """(source position, top-K slot) -> the text of the candidate's captured continuation."""
    if top_next is None:
        return {}
    jj, ii = np.nonzero(top_next[:, :, 0] >= 0)
    sb = vocab.bytes
    return {
        (j, i): b"".join(sb[x] for x in top_next[j, i].tolist() if x >= 0)
        for j, i in zip(jj.tolist(), ii.tolist(), strict=True)
    }


def _read_inside(j: int, c: int, s_ids: list, s_ends: list, sb: list) -> bytes | None:
    """The part of source token j+1 read before byte ``c`` (empty at a token boundary); None
    where it cannot be known (no next token, or a token whose text and span disagree, as a
    zero-width special's)."""
    a = s_ends[j]
    if a >= c:
        return b""
    if j + 1 >= len(s_ids) or s_ends[j + 1] - a != len(sb[s_ids[j + 1]]):
        return None
    return sb[s_ids[j + 1]][: c - a]


def _walk(
    j: int,
    c: int,
    c_next: int,
    g: int,
    row: tuple[list, list, list, list, list],
    vocab: SourceVocab,
    first_ids: list[int],
    conts: dict[tuple[int, int], bytes],
) -> tuple[dict[int, float], float, float]:
    """Steps 1-2 at one position, scalar code over the source ``row`` as lists (``conts``: a
    candidate's continuation by (position, slot); ``first_ids``: after ``_prefilter``). Returns
    pivot id -> mass, ``P(text[c:c'] | text[:c])`` on the gold path, the consistent mass."""
    s_ids, s_ends, top_ids, top_p, gold_p = row
    masses: dict[int, float] = {}
    sb, table, first, memo = vocab.bytes, vocab.table_list, vocab.first, vocab.first.memo
    r = _read_inside(j, c, s_ids, s_ends, sb)
    if r is None:
        return masses, 0.0, 0.0
    emitted = b""  # text[c:a_j] once the walk has passed c
    carry, consistent, first_step = 1.0, 0.0, True
    conditioned = bool(r)  # P(text[c:c'] | text[:c]) divides by P(R) when R is not empty
    while True:
        nxt = s_ids[j + 1] if j + 1 < len(s_ids) else -1
        gold_mass = gold_p[j] if nxt >= 0 else 0.0
        if first_step:
            consistent += gold_mass
        cands = first_ids if first_step else top_ids[j]
        for i, (v, p) in enumerate(zip(cands, top_p[j], strict=True)):
            if v < 0 or p <= 0.0 or v == nxt:
                continue  # padding, or the gold token (its probability is gold_p)
            ext = conts.get((j, i)) if conts else None
            tv = sb[v] if ext is None else sb[v] + ext
            if r:
                if len(tv) <= len(r) or not tv.startswith(r):
                    continue  # impossible after the text read, or its continuation unknown
                w = tv[len(r) :]
            elif emitted:
                w = emitted + tv
            else:
                w = None if ext is None else tv
            pid = table[v] if w is None else memo.get(w)
            if pid is None:
                pid = first(w)
            if first_step:
                consistent += p
            if pid >= 0:
                masses[pid] = masses.get(pid, 0.0) + carry * p
        if nxt < 0 or gold_mass <= 0.0:
            return masses, 0.0, consistent
        end = s_ends[j + 1]
        carry *= gold_mass
        if end >= c_next:
            masses[g] = masses.get(g, 0.0) + carry
            return masses, carry / (consistent if conditioned else 1.0), consistent
        if end - s_ends[j] != len(sb[nxt]):
            return masses, 0.0, consistent
        emitted = (emitted + sb[nxt])[len(r) :] if r else emitted + sb[nxt]
        r, first_step = b"", False
        j += 1


def _candidate_tables(top_ids: np.ndarray, conts: dict, vocab: SourceVocab) -> tuple:
    """Each candidate's text length and pi of its whole text, with its continuation where
    one was captured."""
    full_len = vocab.lengths[np.clip(top_ids, 0, None)]
    cand_pid = vocab.table[np.clip(top_ids, 0, None)]
    for (jj, i), ext in conts.items():
        full_len[jj, i] += len(ext)
        if top_ids[jj, i] >= 0:
            cand_pid[jj, i] = vocab.first(vocab.bytes[top_ids[jj, i]] + ext)
    return full_len, cand_pid


BRANCH_MIN_PROB = 0.1  # alternatives below this get no branch: a training row each costs


def _fill_branches(branch_ids: np.ndarray, pos, f_j, top_ids, top_p, conts: dict, vocab) -> None:
    """Each alternative's own text as the pivot writes it: its bytes and its captured
    continuation, tokenized by the pivot, the last (possibly cut) token left out."""
    at = {int(jj): int(t) for t, jj in zip(pos.tolist(), f_j.tolist(), strict=True)}
    width = branch_ids.shape[2]
    for (jj, i), ext in conts.items():
        t = at.get(jj)
        if t is None or top_ids[jj, i] < 0 or top_p[jj, i] < BRANCH_MIN_PROB:
            continue
        toks = vocab.first.tokens(vocab.bytes[top_ids[jj, i]] + ext)[:-1][:width]
        if len(toks) > 1:  # a first token alone: the distribution already teaches it
            branch_ids[t, i, : len(toks)] = toks


def _fill_fast(out: dict, pos, g, gold, ids, top_p, gold_p, cand_pid, k: int) -> None:
    """Positions where the source stands at the same boundary and its gold token covers the
    pivot's: its top-K, each candidate mapped whole, the gold by its own probability."""
    p = np.where(ids == gold[:, None], 0.0, top_p)  # the gold comes from gold_p
    mapped = np.concatenate([g[:, None], np.where(ids >= 0, cand_pid, -1)], axis=1)
    p = np.concatenate([gold_p[:, None], p], axis=1)
    placed_p = np.where(mapped >= 0, p, 0.0)
    out["gold_prob"][pos] = gold_p
    out["placed"][pos] = placed_p.sum(1) / np.maximum(p.sum(1), 1e-30)
    c_ids, c_p = top_k(mapped, placed_p, k)
    out["ids"][pos], out["probs"][pos] = c_ids, c_p
    out["valid"][pos] = c_p.sum(1) > 0


def _prefilter(out: dict, positions, walk, at: tuple, s_ids, s_ends, top_ids, top_p, gold_p,
               full_len, width_ok, vocab: SourceVocab, alternatives_inside: bool) -> tuple:  # fmt: skip
    """Before the scalar walk: inside a source token, only candidates longer than the text
    read and starting with its first byte can continue it (filtered in numpy); positions left
    with no alternative whose gold token covers the pivot's get their answer here (all mass on
    g, P(gold text | context) = 1). Returns the positions still to walk and their first-step
    candidates."""
    j, c, c_next, g = at
    wj = j[walk]
    cand = top_ids[wj]
    inside = (s_ends[wj] < c[walk])[:, None]
    lead = vocab.first_byte[np.clip(cand, 0, None)] == vocab.first_byte[s_ids[wj + 1]][:, None]
    long = full_len[wj] > (c[walk] - s_ends[wj])[:, None]
    first = np.where(~inside | (lead & long & alternatives_inside), cand, -1)
    nxt = s_ids[wj + 1]
    alone = ((first < 0) | (first == nxt[:, None]) | (top_p[wj] <= 0)).all(1)
    covers = width_ok[walk] & (s_ends[wj + 1] >= c_next[walk]) & (gold_p[wj] > 0)
    trivial = inside[:, 0] & alone & covers
    t = positions[walk[trivial]]
    out["ids"][t, 0], out["probs"][t, 0] = g[walk[trivial]], 1.0
    out["gold_prob"][t], out["placed"][t] = 1.0, 1.0
    out["valid"][t], out["gold_only"][t] = True, True
    return walk[~trivial], first[~trivial]


def _fill_walked(out: dict, pos, where: tuple, row: tuple, vocab: SourceVocab,
                 first_ids: list, conts: dict, k: int) -> None:  # fmt: skip
    """The other positions, each by a walk along the source's gold path (``_walk``);
    ``where``: their source positions, pivot byte offsets and gold pivot tokens."""
    n_w = len(pos)
    ids_w = np.full((n_w, k), -1, dtype=np.int64)
    p_w = np.zeros((n_w, k))
    gp_w, placed_w, only_w = np.zeros(n_w), np.zeros(n_w), np.zeros(n_w, bool)
    for n, (jj, cc, cn, gg) in enumerate(zip(*(a.tolist() for a in where), strict=True)):
        masses, gp_w[n], cons = _walk(jj, cc, cn, gg, row, vocab, first_ids[n], conts)
        if masses:
            total = sum(masses.values())
            placed_w[n] = total / cons if cons > 0 else 0.0
            items = sorted(masses.items(), key=lambda kv: -kv[1])[:k]
            ids_w[n, : len(items)] = [i for i, _ in items]
            kept = sum(x for _, x in items)
            p_w[n, : len(items)] = [x / kept for _, x in items]
            only_w[n] = len(masses) == 1 and gg in masses
    out["ids"][pos], out["probs"][pos] = ids_w, p_w.astype(np.float32)
    out["gold_prob"][pos], out["placed"][pos] = gp_w, placed_w
    out["valid"][pos], out["gold_only"][pos] = p_w.sum(1) > 0, only_w


def _no_distributions(n: int, k: int) -> dict[str, np.ndarray]:
    return {
        "ids": np.full((n, k), -1, dtype=np.int64),
        "probs": np.zeros((n, k), dtype=np.float32),
        "valid": np.zeros(n, dtype=bool),
        "gold_prob": np.full(n, np.nan),
        "placed": np.zeros(n),
        "gold_only": np.zeros(n, dtype=bool),
    }


def align_text(
    p_ids: np.ndarray,
    p_ends: np.ndarray,
    s_ids: np.ndarray,
    s_ends: np.ndarray,
    top_ids: np.ndarray,
    top_logprobs: np.ndarray,
    gold_logprobs: np.ndarray,
    positions: np.ndarray,
    vocab: SourceVocab,
    k: int,
    top_next: np.ndarray | None = None,
    inside: str = "conditional",
    branch_len: int = 0,
) -> dict[str, np.ndarray]:
    """The source's distribution over pivot tokens at each learned pivot position (module
    docstring), from the pivot's ids and byte ends, the source's ids, byte ends, top-K (-1 =
    padding), gold log-probabilities and captured continuations (``top_next`` (T, K, L)).
    ``inside`` (a pivot position inside a source token): candidates that extend the text
    read (``conditional``) or the gold path alone (``gold``). Returns ``ids``, ``probs``
    (T, k), ``valid``, ``gold_prob`` (NaN where not computed), ``placed`` (mass placed over
    the consistent mass), ``gold_only`` (one-hot by construction) and, with ``branch_len``,
    ``branch_ids`` (T, K, branch_len; ``_fill_branches``)."""
    n = len(p_ids)
    out = _no_distributions(n, k)
    if branch_len:
        out["branch_ids"] = np.full((n, top_ids.shape[1], branch_len), -1, dtype=np.int64)
    positions = np.asarray(positions, dtype=np.int64)
    positions = positions[positions + 1 < n]
    m = len(s_ids)
    if not len(positions) or not m:
        return out
    top_p = np.where(top_ids >= 0, np.exp(top_logprobs.astype(np.float64)), 0.0)
    gold_p = np.exp(gold_logprobs.astype(np.float64))
    conts = continuations(top_next, vocab)
    full_len, cand_pid = _candidate_tables(top_ids, conts, vocab)
    c, c_next, g = p_ends[positions], p_ends[positions + 1], p_ids[positions + 1]
    j = np.searchsorted(s_ends, c, side="right") - 1
    jc, jn = np.clip(j, 0, None), np.clip(j + 1, 0, m - 1)
    has_next = (j >= 0) & (j + 1 < m)
    width_ok = s_ends[jn] - s_ends[jc] == vocab.lengths[s_ids[jn]]
    # the fast path: the source is at the same boundary and its gold token covers g
    fast = has_next & (s_ends[jc] == c) & width_ok & (s_ends[jn] >= c_next)
    f_j = j[fast]
    if branch_len:
        _fill_branches(out["branch_ids"], positions[fast], f_j, top_ids, top_p, conts, vocab)
    _fill_fast(out, positions[fast], g[fast], s_ids[jn[fast]], top_ids[f_j], top_p[f_j],
               gold_p[f_j], cand_pid[f_j], k)  # fmt: skip
    # the rest walk the gold path, in scalar code over Python lists
    walk = np.flatnonzero(has_next & ~fast)
    if not len(walk):
        return out
    walk, first = _prefilter(out, positions, walk, (j, c, c_next, g), s_ids, s_ends, top_ids,
                             top_p, gold_p, full_len, width_ok, vocab, inside == "conditional")  # fmt: skip
    if len(walk):
        row = (s_ids.tolist(), s_ends.tolist(), top_ids.tolist(), top_p.tolist(), gold_p.tolist())
        _fill_walked(out, positions[walk], (j[walk], c[walk], c_next[walk], g[walk]), row,
                     vocab, first.tolist(), conts, k)  # fmt: skip
    return out

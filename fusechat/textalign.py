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
walk: their candidates map through a per-vocabulary table of ``pi``. The rest walk the
source's gold path, all walks and steps at once in numpy, ``pi`` after a context memoised by
(context, candidate) across rows (``PairMemo``). Tests hold a plain scalar reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from fusechat.sparse import top_k
from fusechat.tokens import FirstToken

INCONSISTENT = -2  # a candidate that cannot continue the text read (inside a source token)


class PairMemo:
    """``pi`` of a candidate read after a context, memoised across rows: a context is the text
    read inside a source token (``R``) or the text emitted past ``c``; a candidate is a source
    token, or (id ``vocab_size`` + n) a token followed by its captured continuation. Both are
    interned to ints, so a row's lookups are one array of int64 keys."""

    def __init__(self) -> None:
        self.contexts: dict[tuple[bool, bytes], int] = {}
        self.context_list: list[tuple[bool, bytes]] = []
        self.texts: dict[bytes, int] = {}
        self.text_list: list[bytes] = []
        self.pid: dict[int, int] = {}

    def context(self, inside: bool, text: bytes) -> int:
        return _intern(self.contexts, self.context_list, (inside, text))

    def text(self, t: bytes) -> int:
        return _intern(self.texts, self.text_list, t)

    def lookup(self, ctx: np.ndarray, cand: np.ndarray, vocab: SourceVocab) -> np.ndarray:
        """``pi`` of each (context, candidate): after ``R``, of the candidate's text past
        ``R`` (``INCONSISTENT`` unless it extends ``R``); after emitted text, of the emitted
        text followed by the candidate's."""
        keys = ((ctx.astype(np.int64) << 32) | cand).tolist()
        got = list(map(self.pid.get, keys))
        for n, key in enumerate(keys):
            if got[n] is None:
                inside, r = self.context_list[key >> 32]
                c = key & 0xFFFFFFFF
                tv = (
                    vocab.bytes[c] if c < len(vocab.bytes) else self.text_list[c - len(vocab.bytes)]
                )
                if not inside:
                    got[n] = vocab.first(r + tv)
                elif len(tv) <= len(r) or not tv.startswith(r):
                    got[n] = INCONSISTENT
                else:
                    got[n] = vocab.first(tv[len(r) :])
                self.pid[key] = got[n]
        return np.array(got, dtype=np.int64)


def _intern(index: dict, items: list, key) -> int:
    """``key``'s number in ``items``, appended the first time it is seen."""
    got = index.get(key)
    if got is None:
        got = index[key] = len(items)
        items.append(key)
    return got


@dataclass
class SourceVocab:
    """A source vocabulary seen from the pivot: each token's bytes and byte length, ``pi`` of
    each whole token (``table``), ``pi`` itself (``first``, for
    partial continuations) and ``pi`` of candidates read after a context (``pairs``)."""

    bytes: list[bytes]
    lengths: np.ndarray
    table: np.ndarray
    first: FirstToken
    pairs: PairMemo = field(default_factory=PairMemo)

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
            table,
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


def _candidate_tables(top_ids: np.ndarray, conts: dict, vocab: SourceVocab) -> tuple:
    """Each candidate's pi of its whole text and its ``PairMemo`` key, with its continuation
    where one was captured."""
    cand_pid = vocab.table[np.clip(top_ids, 0, None)]
    key = top_ids.copy()
    for (jj, i), ext in conts.items():
        if top_ids[jj, i] >= 0:
            text = vocab.bytes[top_ids[jj, i]] + ext
            cand_pid[jj, i] = vocab.first(text)
            key[jj, i] = len(vocab.bytes) + vocab.pairs.text(text)
    return cand_pid, key


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


class _Paths(NamedTuple):
    """The gold paths of a row's walks, arrays of (walks, steps); step s reads source position
    ``j + s``."""

    at: np.ndarray  # the source position each step reads
    nxt: np.ndarray  # its gold next token (-1: none)
    kept: np.ndarray  # the steps taken: up to the first stop
    n_steps: np.ndarray  # (walks,) the last step taken
    carry_in: np.ndarray  # the mass carried into each step: the product of the golds before
    done: np.ndarray  # (walks,) the walk ends on the pivot's next boundary
    carry_end: np.ndarray  # (walks,) the mass it carries there
    gold_p0: np.ndarray  # (walks,) the gold's probability at the first step
    first_ok: np.ndarray  # (walks,) the first step's gold token exists and spans its text


def _paths(j, c_next, s_ids, s_ends, gold_p, lengths) -> _Paths:
    """Each walk's steps along the source's gold path, to the first stop: no next token, a
    gold of probability 0, the pivot's next boundary reached, or a token whose span is not its
    text."""
    m = len(s_ids)
    last = np.minimum(np.searchsorted(s_ends, c_next, side="left"), m) - 1
    step = np.arange(int((last - j).max()) + 1)
    at = j[:, None] + step
    has_next = at + 1 < m
    jj, jn = np.minimum(at, m - 1), np.minimum(at + 1, m - 1)
    nxt = np.where(has_next, s_ids[jn], -1)
    gm = np.where(has_next, gold_p[jj], 0.0)
    reached = s_ends[jn] >= c_next[:, None]
    width_bad = s_ends[jn] - s_ends[jj] != lengths[np.clip(nxt, 0, None)]
    stop = ~has_next | (gm <= 0) | reached | width_bad  # the last step of the path stops
    n_steps = stop.argmax(1)
    kept = step <= n_steps[:, None]
    carry = np.cumprod(np.where(kept, gm, 1.0), axis=1)
    carry_in = np.concatenate([np.ones((len(j), 1)), carry[:, :-1]], axis=1)
    rows = np.arange(len(j))
    end_gm = gm[rows, n_steps]
    done = has_next[rows, n_steps] & (end_gm > 0) & reached[rows, n_steps]
    return _Paths(jj, nxt, kept, n_steps, carry_in, done, carry_in[rows, n_steps] * end_gm,
                  gm[:, 0], has_next[:, 0] & ~width_bad[:, 0])  # fmt: skip


def _contexts(j, c, n_steps, inside, s_ids, s_ends, vocab: SourceVocab, width: int) -> np.ndarray:
    """The ``PairMemo`` context of each step: ``R`` at a first step inside a source token, the
    text emitted past c at later steps (-1: a first step at a boundary, or past the stop)."""
    sb, pairs = vocab.bytes, vocab.pairs
    ctx = np.full((len(j), width), -1, dtype=np.int64)
    for w, (jw, cw, nw, iw) in enumerate(zip(j.tolist(), c.tolist(), n_steps.tolist(),
                                             inside.tolist(), strict=True)):  # fmt: skip
        gold = sb[s_ids[jw + 1]]
        cut = cw - int(s_ends[jw]) if iw else 0
        if iw:
            ctx[w, 0] = pairs.context(True, gold[:cut])
        emitted = gold[cut:]  # text[c:a_{j+s}] at step s
        for s in range(1, nw + 1):
            if s > 1:
                emitted += sb[s_ids[jw + s]]
            ctx[w, s] = pairs.context(False, emitted)
    return ctx


def _fill_walked(out: dict, pos, where: tuple, arrays: tuple, vocab: SourceVocab,
                 alternatives_inside: bool, k: int) -> None:  # fmt: skip
    """The other positions, each by a walk along the source's gold path (steps 1-2 of the
    module docstring), all walks and steps at once. ``where``: their source positions, pivot
    byte offsets and gold pivot tokens; ``arrays``: the source's ids, ends, top-K ids and
    probabilities, gold probabilities, each candidate's pi and ``PairMemo`` key;
    ``alternatives_inside``: False keeps the gold path alone inside a source token."""
    j, c, c_next, g = where
    s_ids, s_ends, top_ids, top_p, gold_p, cand_pid, cand_key = arrays
    inside = s_ends[j] < c
    path = _paths(j, c_next, s_ids, s_ends, gold_p, vocab.lengths)
    unread = inside & ~path.first_ok  # R unknown: a special's span inside a source token
    kept = path.kept & ~unread[:, None]
    cands, keys, p = top_ids[path.at], cand_key[path.at], top_p[path.at]
    if not alternatives_inside:
        cands[inside, 0] = -1
    ok = (cands >= 0) & (p > 0) & (cands != path.nxt[..., None]) & kept[..., None]
    pid = np.broadcast_to(cand_pid[j][:, None], cands.shape).copy()
    memo = ok.copy()
    memo[:, 0] &= inside[:, None]  # a first step at a boundary maps each candidate whole
    ctx = _contexts(j, c, np.where(unread, 0, path.n_steps), inside, s_ids, s_ends, vocab,
                    kept.shape[1])  # fmt: skip
    pid[memo] = vocab.pairs.lookup(np.broadcast_to(ctx[..., None], cands.shape)[memo],
                                   keys[memo], vocab)  # fmt: skip
    ok &= pid != INCONSISTENT
    consistent = np.where(unread, 0.0, path.gold_p0 + np.where(ok[:, 0], p[:, 0], 0).sum(1))
    done = path.done & ~unread
    # P(text[c:c'] | text[:c]): divided by P(R) (the consistent mass) inside a source token
    gp = np.where(done, path.carry_end / np.where(inside & done, consistent, 1.0), 0.0)
    put = ok & (pid >= 0)
    walk_of = np.broadcast_to(np.arange(len(j))[:, None, None], cands.shape)[put]
    walk_of = np.concatenate([walk_of, np.flatnonzero(done)])
    ids = np.concatenate([pid[put], g[done]])
    mass = np.concatenate([(path.carry_in[..., None] * p)[put], path.carry_end[done]])
    _put_masses(out, pos, walk_of, ids, mass, g, consistent, k)
    out["gold_prob"][pos] = gp


def _put_masses(out: dict, pos, walk_of, ids, mass, g, consistent, k: int) -> None:
    """Each walk's masses (entries ``(walk, pivot id, mass)``, ids repeating) as its ``k``
    largest, renormalised (ties by id), with the mass placed over the consistent mass and
    whether the gold took it all."""
    n = len(pos)
    order = np.lexsort((ids, walk_of))
    walk_of, ids, mass = walk_of[order], ids[order], mass[order]
    start = np.ones(len(ids), dtype=bool)
    start[1:] = (walk_of[1:] != walk_of[:-1]) | (ids[1:] != ids[:-1])
    mass = np.bincount(np.cumsum(start) - 1, mass)
    walk_of, ids = walk_of[start], ids[start]
    total = np.bincount(walk_of, mass, n)
    only = (np.bincount(walk_of, minlength=n) == 1) & (
        np.bincount(walk_of[ids == g[walk_of]], minlength=n) > 0
    )
    order = np.lexsort((ids, -mass, walk_of))
    walk_of, ids, mass = walk_of[order], ids[order], mass[order]
    rank = np.arange(len(ids)) - np.searchsorted(walk_of, walk_of, side="left")
    top = rank < k
    ids_w = np.full((n, k), -1, dtype=np.int64)
    p_w = np.zeros((n, k))
    ids_w[walk_of[top], rank[top]] = ids[top]
    p_w[walk_of[top], rank[top]] = mass[top]
    kept = p_w.sum(1, keepdims=True)
    p_w = np.where(kept > 0, p_w / np.where(kept > 0, kept, 1.0), 0.0)
    out["ids"][pos], out["probs"][pos] = ids_w, p_w.astype(np.float32)
    out["placed"][pos] = np.where(
        consistent > 0, total / np.where(consistent > 0, consistent, 1.0), 0.0
    )
    out["valid"][pos], out["gold_only"][pos] = p_w.sum(1) > 0, only


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
    cand_pid, cand_key = _candidate_tables(top_ids, conts, vocab)
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
    # the rest walk the gold path
    walk = np.flatnonzero(has_next & ~fast)
    if not len(walk):
        return out
    _fill_walked(out, positions[walk], (j[walk], c[walk], c_next[walk], g[walk]),
                 (s_ids, s_ends, top_ids, top_p, gold_p, cand_pid, cand_key), vocab,
                 inside == "conditional", k)  # fmt: skip
    return out

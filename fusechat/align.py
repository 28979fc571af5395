"""Align a source model's captured distributions to the pivot's positions and vocabulary.

A next-token distribution at position t is conditioned on the text up to the end of token t and
predicts what follows. Methods (``METHODS``):

- ``text`` (the default; ``fusechat.textalign``): every learned pivot position gets the
  source's distribution over the pivot tokens that the pivot's own tokenizer would emit there,
  each candidate mapped by the text it continues with, inside source tokens too;
- ``exact``, ``mined``, ``stats``: the baselines. A pivot position takes the source position
  whose token ends at the same byte (``align_offsets``, linear time; or FuseLLM's edit-distance
  DTW, ``align_dtw``), and each source id is sent to one pivot id: ``exact`` (same bytes),
  ``mined`` (FuseLLM's minimum edit distance), ``stats`` (FuseChat-2.0: the pivot token most
  often aligned with it over the corpus, ties by edit distance). Positions without such a
  partner, or whose candidates all map to nothing, get no distribution.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from rapidfuzz.distance import Levenshtein
from rapidfuzz.process import cdist, extractOne

from fusechat.errors import FusechatError
from fusechat.sparse import map_topk
from fusechat.tokens import byte_fallback_ids, token_bytes, token_texts

log = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------- the stage

VERSION = 3  # 2: the text method; 3: shard checksums in the manifest
METHODS = ("text", "exact", "mined", "stats")
SEQUENCE_METHODS = ("offsets", "dtw")
CONFIDENT = 0.9  # agreement is measured where the source gives the gold text at least this


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
    from fusechat.capture import VERSION as CAPTURE_VERSION

    for reader in (pivot, source):
        if reader.key.get("version") != CAPTURE_VERSION:
            raise FusechatError(
                f"{reader.folder}: a capture of format version {reader.key.get('version')}; "
                f"this fusechat reads version {CAPTURE_VERSION}: capture it again"
            )
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


def vocab_map(method: str, src_tok, piv_tok) -> np.ndarray:
    """The ``exact`` or ``mined`` map of a tokenizer pair (source id -> pivot id or -1),
    computed once and cached under ``$FUSECHAT_CACHE/vocab_maps``; one vocabulary maps by
    identity, byte tokens included."""
    import os

    from fusechat.capture import tokenizer_fingerprint
    from fusechat.io import cache_dir

    sfp, pfp = tokenizer_fingerprint(src_tok), tokenizer_fingerprint(piv_tok)
    src_texts = token_texts(src_tok)
    if sfp == pfp:
        return np.arange(len(src_texts))
    path = cache_dir() / "vocab_maps" / f"{sfp}-{pfp}-{method}-v{VERSION}.npy"
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


def learned_positions(prow) -> np.ndarray:
    """Pivot positions whose next token is learned (the positions a target is needed at)."""
    return np.append(prow["pos.labels_mask"][1:], False)


def transfer_counts(prow, r: dict, gold_prob: np.ndarray | None = None) -> Counter:
    """The counts behind the transfer statistics of one row aligned by one method (``r``, a
    ``RowAligner`` result): learned pivot positions and those with a distribution; with
    ``gold_prob`` (the source's probability of the pivot's gold next-token text, the text
    method's measure, used for every method) the confident positions (``>= CONFIDENT``), those
    with a distribution, and those whose most probable token is the gold one; the gold-only
    positions (text) or the exactly aligned ones and their mapped mass (baselines)."""
    from fusechat.shards import unpack_ids

    learned = learned_positions(prow)
    c = Counter({"learned": int(learned.sum()), "valid": int((learned & r["valid"]).sum())})
    if gold_prob is not None:
        gold = np.append(unpack_ids(prow["pos.input_ids"])[1:], -1)
        top1 = np.take_along_axis(r["ids"], np.argmax(r["probs"], 1)[:, None], 1)[:, 0]
        conf = learned & (np.nan_to_num(gold_prob) >= CONFIDENT)
        c["confident"] = int(conf.sum())
        c["confident_valid"] = int((conf & r["valid"]).sum())
        c["hit"] = int((conf & r["valid"] & (top1 == gold)).sum())
    if "gold_only" in r:
        c["gold_only"] = int((learned & r["gold_only"]).sum())
    if "exact" in r:
        c["exact"] = int((learned & r["exact"]).sum())
        c["mass"] = float(r["mass"][learned & r["exact"]].sum())
    return c


def transfer_stats(c: Counter) -> dict[str, float]:
    """Shares from summed ``transfer_counts`` (``Counter.update`` keeps the zero entries):
    ``coverage``; ``agreement`` (hits among confident positions with a distribution) and
    ``confident_hit`` (among all confident positions); ``gold_only``; ``aligned`` and
    ``mapped_mass``."""
    n = max(c["learned"], 1)
    out = {"coverage": c["valid"] / n}
    if "confident" in c:
        out["agreement"] = c["hit"] / max(c["confident_valid"], 1)
        out["confident_hit"] = c["hit"] / max(c["confident"], 1)
    if "gold_only" in c:
        out["gold_only"] = c["gold_only"] / n
    if "exact" in c:
        out["aligned"] = c["exact"] / n
        out["mapped_mass"] = c["mass"] / max(c["exact"], 1)
    return out


class RowAligner:
    """One source's captured rows onto the pivot's, by one method: what the ``align`` stage
    and ``bench/transfer.py`` share. ``stats`` needs its map (``set_stats``) before use."""

    def __init__(self, method: str, sequence: str, piv_tok, src_tok, k: int):
        if method not in METHODS:
            raise FusechatError(f"unknown alignment method {method!r} ({', '.join(METHODS)})")
        if sequence not in SEQUENCE_METHODS:
            raise FusechatError(f"unknown sequence alignment {sequence!r} (offsets or dtw)")
        if method == "text" and sequence != "offsets":
            raise FusechatError("the text method aligns by byte offsets (sequence: offsets)")
        self.method, self.sequence, self.k = method, sequence, k
        self.piv_tok, self.src_tok = piv_tok, src_tok
        self.vmap: np.ndarray | None = None
        if method == "text":
            from fusechat.capture import tokenizer_fingerprint
            from fusechat.textalign import SourceVocab
            from fusechat.tokens import FirstToken

            same = tokenizer_fingerprint(src_tok) == tokenizer_fingerprint(piv_tok)
            self.vocab = SourceVocab.build(token_bytes(src_tok), FirstToken(piv_tok), same)
        elif method in ("exact", "mined"):
            self.vmap = vocab_map(method, src_tok, piv_tok)

    def pairs(self, prow, srow) -> tuple[np.ndarray, np.ndarray]:
        """The baselines' sequence alignment: source position per pivot position, and where
        the two end at the same place (``align_offsets``) or pair one to one (``align_dtw``)."""
        from fusechat.shards import unpack_ids

        if self.sequence == "offsets":
            pe, se = prow["pos.byte_end"], srow["pos.byte_end"]
            return align_offsets(np.stack([pe, pe], 1), np.stack([se, se], 1))
        p_ids, s_ids = unpack_ids(prow["pos.input_ids"]), unpack_ids(srow["pos.input_ids"])
        return align_dtw(
            token_texts(self.piv_tok, self.piv_tok.convert_ids_to_tokens(p_ids.tolist())),
            token_texts(self.src_tok, self.src_tok.convert_ids_to_tokens(s_ids.tolist())),
        )

    def cooccurrence(self, prow, srow) -> Counter:
        from fusechat.shards import unpack_ids

        idx, exact = self.pairs(prow, srow)
        return cooccurrence(
            unpack_ids(prow["pos.input_ids"]), unpack_ids(srow["pos.input_ids"]), idx, exact
        )

    def set_stats(self, counts: Counter) -> None:
        src_texts, piv_texts = token_texts(self.src_tok), token_texts(self.piv_tok)
        base = vocab_map("exact", self.src_tok, self.piv_tok)
        self.vmap = map_stats(counts, src_texts, piv_texts, base)

    def __call__(self, prow, srow) -> dict[str, np.ndarray]:
        """``ids`` (T, k), ``probs`` (T, k) and ``valid`` (T,) at every pivot position (only
        learned positions for ``text``), plus ``mass`` (the mapped share of the source's
        top-K) for the baselines and ``gold_prob``, ``gold_only`` for ``text``."""
        from fusechat.shards import unpack_ids

        if int(prow["row.text_hash"]) != int(srow["row.text_hash"]):
            raise FusechatError(
                f"row {int(prow['row.index'])}: the captures rendered different texts "
                "(same corpus, different templates?)"
            )
        s_top = unpack_ids(srow["pos.topk_ids"])
        if self.method == "text":
            from fusechat.textalign import align_text

            return align_text(
                unpack_ids(prow["pos.input_ids"]), prow["pos.byte_end"].astype(np.int64),
                unpack_ids(srow["pos.input_ids"]), srow["pos.byte_end"].astype(np.int64),
                s_top, srow["pos.topk_logprobs"], srow["pos.gold_logprob"],
                np.flatnonzero(learned_positions(prow)), self.vocab, self.k,
                unpack_ids(srow["pos.topk_next"]) if "pos.topk_next" in srow else None,
            )  # fmt: skip
        idx, exact = self.pairs(prow, srow)
        j = np.clip(idx, 0, None)
        lp = srow["pos.topk_logprobs"][j]
        ids, probs, mass = map_topk(s_top[j], lp, self.vmap)
        valid = exact & (idx >= 0) & (mass > 0)
        top_mass = np.exp(lp.astype(np.float64)).sum(-1)
        return {
            "ids": np.where(valid[:, None], ids, -1),
            "probs": np.where(valid[:, None], probs, 0).astype(np.float32),
            "valid": valid,
            "exact": exact & (idx >= 0),
            "mass": np.where(exact, mass / np.maximum(top_mass, 1e-30), 0.0),
        }


@dataclass(frozen=True)
class _AlignJob:
    """What a process needs to align shards (picklable, for spawned workers)."""

    pivot_dir: str
    source_dir: str
    out: str
    method: str
    sequence: str
    pivot_tokenizer: str | None
    source_tokenizer: str | None
    done: frozenset[int]
    vmap: np.ndarray | None = None  # the stats method's map, built once by the caller


def _align_setup(job: _AlignJob) -> tuple:
    """(pivot reader, source reader, aligner, stored id dtype, job)."""
    from fusechat.shards import StageReader, ids_dtype

    piv, src = StageReader(job.pivot_dir, "capture"), StageReader(job.source_dir, "capture")
    piv_tok = _load_capture_tokenizer(piv, job.pivot_tokenizer, "pivot")
    src_tok = _load_capture_tokenizer(src, job.source_tokenizer, "source")
    aligner = RowAligner(job.method, job.sequence, piv_tok, src_tok, src.key["k"])
    if job.vmap is not None:
        aligner.vmap = job.vmap
    return piv, src, aligner, ids_dtype(max(piv_tok.get_vocab().values()) + 1), job


def _align_shard(state: tuple, i: int) -> tuple[Counter, str | None]:
    """Align shard ``i``, write it unless a previous run did; its transfer tally and the
    checksum of what was written."""
    from pathlib import Path

    from fusechat.shards import pack_ids, save_shard

    piv, src, aligner, dtype, job = state
    tally: Counter = Counter()
    rows = []
    for prow, srow in zip(piv.shard(i), src.shard(i), strict=True):
        r = aligner(prow, srow)
        tally.update(transfer_counts(prow, r, r.get("gold_prob")))
        rows.append(
            {
                "pos.ids": pack_ids(r["ids"], dtype),
                "pos.probs": r["probs"].astype(np.float16),
                "pos.valid": r["valid"],
                "row.index": prow["row.index"],
                "row.nll_sum": srow["row.nll_sum"],
                "row.n_tokens": srow["row.n_tokens"],
                "row.n_chars": srow["row.n_chars"],
            }
        )
    return tally, None if i in job.done else save_shard(Path(job.out), i, rows)


def align(
    pivot_dir: str,
    source_dir: str,
    out: str,
    method: str = "text",
    sequence: str = "offsets",
    pivot_tokenizer: str | None = None,
    source_tokenizer: str | None = None,
    overwrite: bool = False,
    workers: int = 1,
) -> dict:
    """Map a source capture onto the pivot's positions and vocabulary (``fusechat align``),
    shards spread over ``workers`` processes (the same output as one).

    Each output row has, per pivot position, the source's distribution over pivot tokens
    (``pos.ids``, ``pos.probs``, k wide) and ``pos.valid`` (a distribution exists there), plus
    the source's sequence NLL for MinCE/AvgCE. Statistics over learned pivot positions:
    ``coverage`` (share with a distribution); for ``text`` also ``gold_only`` (share whose
    distribution is the gold token alone: nothing else the source proposed fits the text
    read) and ``agreement`` (share whose most probable token is the pivot's gold one, where
    the source gives the gold text probability >= 0.9); for the baselines ``aligned`` (share
    with an exactly aligned source position) and ``mapped_mass``.
    """
    from pathlib import Path

    from tqdm import tqdm

    from fusechat.io import fingerprint, read_manifest
    from fusechat.shards import StageReader, begin_stage, finish_stage, map_shards

    piv, src = StageReader(pivot_dir, "capture"), StageReader(source_dir, "capture")
    check_same_corpus(piv, src)
    piv.check_complete()
    src.check_complete()
    key = {
        "stage": "align",
        "version": VERSION,
        "pivot_capture": fingerprint(piv.key),
        "source_capture": fingerprint(src.key),
        "method": method,
        "sequence": sequence,
        "k": src.key["k"],
        "shard_rows": piv.key["shard_rows"],
        "rows": piv.key["rows"],
    }
    if method not in METHODS or sequence not in SEQUENCE_METHODS:
        RowAligner(method, sequence, None, None, 0)  # raises the one-line error
    done = begin_stage(out, key, overwrite)
    if done is None:
        log.info("%s: alignment already complete", out)
        return read_manifest(out)
    job = _AlignJob(str(pivot_dir), str(source_dir), str(out), method, sequence,
                    pivot_tokenizer, source_tokenizer, frozenset(done))  # fmt: skip
    piv, src, aligner, dtype, job = _align_setup(job)
    if method == "stats":
        counts: Counter = Counter()
        for i, prows in tqdm(piv.shards(), total=piv.n_shards, desc="co-occurrence"):
            for prow, srow in zip(prows, src.shard(i), strict=True):
                counts += aligner.cooccurrence(prow, srow)
        aligner.set_stats(counts)
        job = replace(job, vmap=aligner.vmap)  # spawned workers get the map, not the counts
    parts = map_shards(piv.n_shards, _align_shard, (piv, src, aligner, dtype, job), workers,
                       (_align_setup, job), f"align {Path(out).name}")  # fmt: skip
    tally = sum((t for t, _ in parts), Counter())
    stats = {"method": method, **transfer_stats(tally), "learned_positions": tally["learned"],
             "pivot_capture": str(pivot_dir), "source_capture": str(source_dir)}  # fmt: skip
    log.info("aligned %s (%s): %s", source_dir, method,
             ", ".join(f"{k} {v:.4f}" for k, v in stats.items() if isinstance(v, float)))  # fmt: skip
    return finish_stage(out, key, piv.n_shards, stats, {i: d for i, (_, d) in enumerate(parts)})

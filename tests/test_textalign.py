"""The text alignment: hand-made tokenizations of both mismatch cases, and real tokenizers."""

import numpy as np
import pytest

from fusechat.textalign import SourceVocab, align_text
from fusechat.tokens import FirstToken, byte_ends, token_bytes


def _vocab(pivot: list[str], source: list[str]) -> SourceVocab:
    first = FirstToken(None, [t.encode() for t in pivot])
    return SourceVocab.build([t.encode() for t in source], first)


def _top(rows: list[dict[int, float]], k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(rows), k), -1)
    lp = np.full((len(rows), k), -np.inf)
    for t, d in enumerate(rows):
        for j, (i, p) in enumerate(d.items()):
            ids[t, j], lp[t, j] = i, np.log(p)
    return ids, lp.astype(np.float16)


def _dense(out: dict, t: int) -> dict[int, float]:
    return {int(i): round(float(p), 4) for i, p in zip(out["ids"][t], out["probs"][t], strict=True)
            if i >= 0 and p > 0}  # fmt: skip


def test_pivot_position_inside_a_source_token():
    # "The Gugi is": pivot The | ▁Gug | i | ▁is ; source The | ĠGugi | Ġis
    pivot = ["The", " Gug", "i", " is", "o", " Bo"]
    source = ["The", " Gugi", " is", " Gugo", " Bob", " Gob"]
    v = _vocab(pivot, source)
    p_ids, p_ends = np.array([0, 1, 2, 3]), np.array([3, 7, 8, 11])
    s_ids, s_ends = np.array([0, 1, 2]), np.array([3, 8, 11])
    # after "The" the source expects Gugi 0.6, Gugo 0.3, Bob 0.1; after " Gugi": " is"
    ids, lp = _top([{1: 0.6, 3: 0.3, 4: 0.1}, {2: 1.0}, {}])
    gold = np.log(np.array([0.6, 1.0, 1.0]))
    out = align_text(p_ids, p_ends, s_ids, s_ends, ids, lp, gold, np.arange(4), v, 4)
    # at "The": both Gugi and Gugo begin with the pivot's ▁Gug; Bob with ▁Bo
    assert _dense(out, 0) == {1: 0.9, 5: 0.1}
    # inside "ĠGugi" after "▁Gug": only candidates that extend " Gug" remain (Bob is
    # impossible), renormalised: i 0.6, o 0.3 -> 2/3, 1/3; the gold text's probability 2/3
    assert _dense(out, 1) == {2: 0.6667, 4: 0.3333}
    assert out["gold_prob"][1] == pytest.approx(2 / 3, abs=1e-3)
    assert out["valid"][:3].all() and not out["valid"][3]  # the last position predicts nothing
    # inside: gold keeps the gold path alone there, and changes nothing at the boundary
    gold_only = align_text(p_ids, p_ends, s_ids, s_ends, ids, lp, gold, np.arange(4), v, 4,
                           inside="gold")  # fmt: skip
    assert _dense(gold_only, 1) == {2: 1.0} and gold_only["gold_only"][1]
    assert _dense(gold_only, 0) == _dense(out, 0) and _dense(gold_only, 2) == _dense(out, 2)


def test_branches_spell_each_alternative_as_the_pivot_would():
    # "The Gugi is": at "The" the source's alternative Gugo (0.3) goes on with " is"
    pivot = ["The", " Gug", "i", " is", "o", " Bo", " i", "s"]
    source = ["The", " Gugi", " is", " Gugo", " Bob", " Gob"]
    v = _vocab(pivot, source)
    p_ids, p_ends = np.array([0, 1, 2, 3]), np.array([3, 7, 8, 11])
    s_ids, s_ends = np.array([0, 1, 2]), np.array([3, 8, 11])
    ids, lp = _top([{1: 0.6, 3: 0.3, 4: 0.05}, {2: 1.0}, {}])
    nxt = np.full((3, 3, 2), -1)
    nxt[0, 1] = [2, 2]  # Gugo, then " is is": the pivot writes ▁Gug o ▁is ▁is, the last
    # (possibly cut) token dropped
    nxt[0, 2] = [2, 2]  # Bob is below 0.1: no branch
    gold = np.log(np.array([0.6, 1.0, 1.0]))
    out = align_text(p_ids, p_ends, s_ids, s_ends, ids, lp, gold, np.arange(4), v, 4, nxt,
                     branch_len=6)  # fmt: skip
    assert out["branch_ids"][0, 1].tolist() == [1, 4, 3, -1, -1, -1]
    assert (out["branch_ids"][0, [0, 2]] == -1).all() and (out["branch_ids"][1:] == -1).all()
    assert v.first.tokens(b" Gugo is") == [1, 4, 3]


def test_source_token_shorter_than_the_pivot_token():
    # "is violet.": pivot is | ▁viole | t | . ; source is | Ġv | iolet | .
    pivot = ["is", " viole", "t", ".", " b", " very"]
    source = ["is", " v", "iolet", ".", " b", "ery"]
    v = _vocab(pivot, source)
    p_ids, p_ends = np.array([0, 1, 2, 3]), np.array([2, 8, 9, 10])
    s_ids, s_ends = np.array([0, 1, 2, 3]), np.array([2, 4, 9, 10])
    ids, lp = _top([{1: 0.8, 4: 0.2}, {2: 0.9, 5: 0.1}, {3: 1.0}, {}])
    gold = np.log(np.array([0.8, 0.9, 1.0, 1.0]))
    out = align_text(p_ids, p_ends, s_ids, s_ends, ids, lp, gold, np.arange(4), v, 4)
    # the chunk likelihood of ▁viole along the source's gold path: 0.8 * 0.9; " v" + "ery"
    # continues as ▁very; " b" stays ▁b
    assert _dense(out, 0) == {1: 0.72, 4: 0.2, 5: 0.08}
    assert out["gold_prob"][0] == pytest.approx(0.72, abs=1e-3)
    # inside "iolet" after "▁viole": "ery" no longer fits the text read; t is certain
    assert _dense(out, 1) == {2: 1.0}
    assert _dense(out, 2) == {3: 1.0}


def test_fragments_map_by_the_continuation_the_source_captured():
    # "means bread": pivot means | ▁bread ; source means | Ġbread. The source's alternatives
    # are fragments: Ġp (of " pane", continuing "ane") and ĠK (of " Kaiba", continuing "aiba")
    pivot = ["means", " bread", " pane", " p", " K", "a", "ai", "iba", "for"]
    source = ["means", " bread", " p", "ane", " K", "aiba", " Ka", "for"]
    v = _vocab(pivot, source)
    p_ids, p_ends = np.array([0, 1]), np.array([5, 11])
    s_ids, s_ends = np.array([0, 1]), np.array([5, 11])
    ids, lp = _top([{1: 0.5, 2: 0.3, 4: 0.2}, {}])
    gold = np.log(np.array([0.5, 1.0]))
    nxt = np.full((2, 3, 2), -1)
    nxt[0, 1] = [3, -1]  # Ġp -> "ane"
    nxt[0, 2] = [5, -1]  # ĠK -> "aiba"
    without = align_text(p_ids, p_ends, s_ids, s_ends, ids, lp, gold, np.arange(2), v, 4)
    with_next = align_text(p_ids, p_ends, s_ids, s_ends, ids, lp, gold, np.arange(2), v, 4, nxt)
    # without the continuation Ġp lands on the pivot's ▁p, a token it never emits for " pane"
    assert _dense(without, 0) == {1: 0.5, 3: 0.3, 4: 0.2}
    assert _dense(with_next, 0) == {1: 0.5, 2: 0.3, 4: 0.2}
    # inside a source token: "Kafor", pivot ▁K | a | for, source ĠKa | for; the alternative
    # ĠK (Kaiba) is no longer than the text read (" K"): dropped without its continuation,
    # kept as "ai" with it
    p_ids, p_ends = np.array([0, 4, 5, 8]), np.array([5, 7, 8, 11])
    s_ids, s_ends = np.array([0, 6, 7]), np.array([5, 8, 11])
    ids, lp = _top([{6: 0.75, 4: 0.25}, {7: 1.0}, {}])
    gold = np.log(np.array([0.75, 1.0, 1.0]))
    nxt = np.full((3, 3, 2), -1)
    nxt[0, 1] = [5, -1]
    without = align_text(p_ids, p_ends, s_ids, s_ends, ids, lp, gold, np.arange(4), v, 4)
    with_next = align_text(p_ids, p_ends, s_ids, s_ends, ids, lp, gold, np.arange(4), v, 4, nxt)
    assert _dense(without, 0) == _dense(with_next, 0) == {4: 1.0}
    assert _dense(without, 1) == {5: 1.0}
    assert _dense(with_next, 1) == pytest.approx({5: 0.75, 6: 0.25}, abs=1e-3)
    # a candidate longer than the text read but with a short continuation: "is Kafor" against
    # "is Kai" + "ba"; after the pivot's ▁Ka the alternative continues "iba"
    v = _vocab(["is", " Ka", "for", "iba", "i"], ["is", " Kafor", " Kai", "ba"])
    p_ids, p_ends = np.array([0, 1, 2]), np.array([2, 5, 8])
    s_ids, s_ends = np.array([0, 1]), np.array([2, 8])
    ids, lp = _top([{1: 0.75, 2: 0.25}, {}])
    nxt = np.full((2, 3, 1), -1)
    nxt[0, 1] = [3]
    out = align_text(p_ids, p_ends, s_ids, s_ends, ids, lp, np.log(np.array([0.75, 1.0])),
                     np.arange(3), v, 4, nxt)  # fmt: skip
    assert _dense(out, 1) == pytest.approx({2: 0.75, 3: 0.25}, abs=1e-3)


def test_gold_outside_the_top_k_still_gives_the_gold_path():
    pivot = ["a", "b", "c", "x"]
    source = ["a", "bc", "x"]
    v = _vocab(pivot, source)
    # the source's gold "bc" is not in its top-K (only "x" is); its probability is known
    ids, lp = _top([{2: 0.9}, {}])
    out = align_text(np.array([0, 1, 2]), np.array([1, 2, 3]), np.array([0, 1]),
                     np.array([1, 3]), ids, lp, np.log(np.array([0.05, 1.0])), np.arange(3),
                     v, 3)  # fmt: skip
    assert _dense(out, 0) == {1: round(0.05 / 0.95, 4), 3: round(0.9 / 0.95, 4)}
    # inside "bc": "x" does not start with "b", so only the gold path is left
    assert _dense(out, 1) == {2: 1.0} and out["gold_only"][1]


def test_byte_ends_split_the_pieces_of_one_character():
    text = "né x"
    # a byte-fallback tokenizer: n | <0xC3> | <0xA9> | ▁x, the two bytes share é's span
    ends = byte_ends(text, [(0, 1), (1, 2), (1, 2), (2, 4)], [1, 1, 1, 2])
    assert ends.tolist() == [1, 2, 3, 5]
    # a zero-width BOS, a token with an added prefix space
    assert byte_ends("ab", [(0, 0), (0, 2)], [3, 3]).tolist() == [0, 2]


@pytest.fixture(scope="module")
def real_pair(mistral_tokenizer):
    from fusechat.toy.real import tekken

    return mistral_tokenizer, tekken()


def test_continuation_text_gets_no_prefix_space(mistral_tokenizer):
    first = FirstToken(mistral_tokenizer)
    pb = first.bytes
    assert pb[first(b"iolet")] == b"i" or not pb[first(b"iolet")].startswith(b" ")
    assert pb[first(b" violet")].startswith(b" v")
    assert first(b"\xa9abc") >= 0  # a partial character: longest byte prefix (<0xA9>)


TEXT = (
    "FuseChat fuses chat models with different tokenizers, e.g. naïve café owners' 1,234 "
    "recipes — and résumé-writing tips! Zorblax's capital is Quenmor; 47 + 35 = 82."
)


def test_a_certain_source_gives_every_pivot_position_its_own_gold_token(real_pair):
    """A source that is sure of the text (one-hot on its own gold tokens) must give every
    pivot position a distribution whose top token is the pivot's gold one, whatever the two
    tokenizers do with names, digits, accents and dashes."""
    piv, src = real_pair
    pe = piv(TEXT, add_special_tokens=False, return_offsets_mapping=True)
    se = src(TEXT, add_special_tokens=False, return_offsets_mapping=True)
    p_ids, s_ids = np.array(pe["input_ids"]), np.array(se["input_ids"])
    pb, sb = token_bytes(piv), token_bytes(src)
    p_ends = byte_ends(TEXT, pe["offset_mapping"], [len(pb[i]) for i in p_ids])
    s_ends = byte_ends(TEXT, se["offset_mapping"], [len(sb[i]) for i in s_ids])
    assert p_ends[-1] == s_ends[-1] == len(TEXT.encode())
    nxt = np.append(s_ids[1:], -1)
    ids, lp = nxt[:, None], np.where(nxt >= 0, 0.0, -np.inf)[:, None].astype(np.float16)
    v = SourceVocab.build(sb, FirstToken(piv))
    out = align_text(p_ids, p_ends, s_ids, s_ends, ids, lp, np.zeros(len(s_ids)),
                     np.arange(len(p_ids)), v, 4)  # fmt: skip
    gold = np.append(p_ids[1:], -1)
    # the first pivot position precedes every source boundary only if tokenizations start alike
    t = np.arange(1, len(p_ids) - 1)
    assert out["valid"][t].all()
    assert (out["ids"][t, 0] == gold[t]).all()
    np.testing.assert_allclose(out["probs"][t, 0], 1.0, atol=1e-3)
    assert np.nanmin(out["gold_prob"][t]) == pytest.approx(1.0, abs=1e-3)


# --------------------------------------------------------------------------- an independent oracle


def _reference(text, p_ids, p_ends, s_ids, s_ends, top_ids, top_p, gold_p, positions, pb, sb,
               top_next, inside="conditional"):  # fmt: skip
    """align_text written plainly from its docstring, position by position with dicts: no
    vectorised paths, no prefilter, ``pi`` as the longest pivot token that prefixes ``w``,
    a candidate's text followed by its continuation where ``top_next`` holds one; ``inside:
    gold`` takes no alternative inside a source token.
    Returns {t: (masses, gold_prob, placed, gold_only)} for every position it defines."""

    def cand_text(j: int, slot: int) -> bytes:
        cont = [x for x in top_next[j, slot] if x >= 0] if top_next is not None else []
        return sb[top_ids[j, slot]] + b"".join(sb[x] for x in cont)

    def pi(w: bytes) -> int:
        best = max((i for i, b in enumerate(pb) if b and w.startswith(b)),
                   key=lambda i: len(pb[i]), default=-1)  # fmt: skip
        return best

    m, out = len(s_ids), {}
    for t in positions:
        if t + 1 >= len(p_ids):
            continue
        c, c_next, g = p_ends[t], p_ends[t + 1], p_ids[t + 1]
        j = max((i for i in range(m) if s_ends[i] <= c), default=-1)
        if j < 0 or j + 1 >= m:
            continue
        fast = (s_ends[j] == c and s_ends[j + 1] - s_ends[j] == len(sb[s_ids[j + 1]])
                and s_ends[j + 1] >= c_next)  # fmt: skip
        masses: dict[int, float] = {}
        read = b""
        if s_ends[j] < c:
            gold = s_ids[j + 1]
            if s_ends[j + 1] - s_ends[j] != len(sb[gold]):
                out[t] = (masses, 0.0, 0.0, False)
                continue
            read = sb[gold][: c - s_ends[j]]
        conditioned, emitted, carry, consistent, first, result = (
            bool(read),
            b"",
            1.0,
            0.0,
            True,
            None,
        )
        while result is None:
            nxt = s_ids[j + 1] if j + 1 < m else -1
            gm = gold_p[j] if nxt >= 0 else 0.0
            if first:
                consistent += gm
            for slot, (v, p) in enumerate(zip(top_ids[j], top_p[j], strict=True)):
                if v < 0 or p <= 0 or v == nxt:
                    continue
                tv = cand_text(j, slot)
                if read and (inside == "gold" or not (len(tv) > len(read) and tv.startswith(read))):
                    continue
                w = tv[len(read) :] if read else emitted + tv
                if first:
                    consistent += p
                if pi(w) >= 0:
                    masses[pi(w)] = masses.get(pi(w), 0.0) + carry * p
            if nxt < 0 or gm <= 0:
                result = (0.0, consistent)
                break
            carry *= gm
            if s_ends[j + 1] >= c_next:
                masses[g] = masses.get(g, 0.0) + carry
                result = (carry / consistent if conditioned else carry, consistent)
                break
            if s_ends[j + 1] - s_ends[j] != len(sb[nxt]):
                result = (0.0, consistent)
                break
            emitted = (emitted + sb[nxt])[len(read) :] if read else emitted + sb[nxt]
            read, first = b"", False
            j += 1
        gold_prob, cons = result
        placed = sum(masses.values()) / cons if masses and cons > 0 else 0.0
        out[t] = (masses, gold_prob, placed, not fast and set(masses) == {g})
    return out


def _random_case(rng: np.random.Generator):
    """A random text over {a, b, ' '}, two random segmentations into vocabularies of different
    pieces (the source's with a few spans whose id disagrees with their text, as specials and
    byte fallback do), a random top-K with padding, zero mass and golds outside it."""
    alphabet = "ab "
    pivot = sorted({"".join(rng.choice(list(alphabet), n)) for n in (1, 1, 1, 2, 2, 2, 3, 3)}
                   | set(alphabet))  # fmt: skip
    source = sorted({"".join(rng.choice(list(alphabet), n)) for n in (1, 2, 2, 3, 3, 4, 4, 4)}
                    | set(alphabet))  # fmt: skip
    text = "".join(rng.choice(list(alphabet), 30))

    def segment(vocab):
        ids, ends, i = [], [], 0
        while i < len(text):
            fits = [v for v in range(len(vocab)) if text.startswith(vocab[v], i)]
            v = int(rng.choice(fits))
            i += len(vocab[v])
            ids.append(v)
            ends.append(i)
        return np.array(ids), np.array(ends)

    p_ids, p_ends = segment(pivot)
    s_ids, s_ends = segment(source)
    if rng.random() < 0.2:  # a source capture truncated before the pivot's (max_length)
        cut = int(rng.integers(1, len(s_ids) + 1))
        s_ids, s_ends = s_ids[:cut], s_ends[:cut]
    for i in np.flatnonzero(rng.random(len(s_ids)) < 0.05):
        s_ids[i] = rng.integers(len(source))  # its span's text is no longer its token's
    m, k = len(s_ids), 4
    top_ids = np.full((m, k), -1)
    top_p = np.zeros((m, k))
    gold_p = rng.uniform(0.05, 1.0, m)
    gold_p[rng.random(m) < 0.05] = 0.0
    for j in range(m):
        n = rng.integers(0, k + 1)
        cands = rng.choice(len(source), n, replace=False)
        top_ids[j, :n] = cands
        top_p[j, :n] = rng.dirichlet(np.ones(n)) * rng.uniform(0.2, 1.0) if n else []
        top_p[j, :n][rng.random(n) < 0.1] = 0.0
        if j + 1 < m and s_ids[j + 1] in cands:
            top_p[j, list(cands).index(s_ids[j + 1])] = gold_p[j]
    positions = np.flatnonzero(rng.random(len(p_ids)) < 0.8)
    pb, sb = [x.encode() for x in pivot], [x.encode() for x in source]
    top_next = None
    if rng.random() < 0.5:  # continuations for some candidates, as a capture's lookahead
        top_next = np.where(
            rng.random((m, k, 3)) < 0.8, rng.integers(0, len(source), (m, k, 3)), -1
        )
        top_next[rng.random((m, k)) < 0.5, 0] = -1  # no continuation for these candidates
        top_next[top_next[:, :, 0] < 0] = -1
    return text, p_ids, p_ends, s_ids, s_ends, top_ids, top_p, gold_p, positions, pb, sb, top_next


@pytest.mark.parametrize("seed", range(150))
def test_align_text_equals_the_plain_reference(seed):
    """Every third case with ``inside: gold``; every other case cut to k = 2 entries (the
    reference's two largest, ties by id, renormalised)."""
    case = _random_case(np.random.default_rng(seed))
    text, p_ids, p_ends, s_ids, s_ends, top_ids, top_p, gold_p, positions, pb, sb, nxt = case
    inside = "gold" if seed % 3 == 0 else "conditional"
    vocab = SourceVocab.build(sb, FirstToken(None, pb))
    with np.errstate(divide="ignore"):
        lp, glp = np.log(top_p), np.log(gold_p)
    k = 2 if seed % 2 else len(pb) + 1  # else room for every pivot token
    args = (p_ids, p_ends, s_ids, s_ends, top_ids, lp, glp, positions, vocab, k, nxt, inside)
    out = align_text(*args)
    memo = (len(vocab.pairs.context_list), len(vocab.pairs.text_list), dict(vocab.pairs.pid))
    assert None not in memo[2].values()
    # a second pass reads every (context, candidate) from the memo the first one filled
    again = align_text(*args)
    for key, value in out.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)
    assert (len(vocab.pairs.context_list), len(vocab.pairs.text_list), vocab.pairs.pid) == memo
    want = _reference(*case, inside=inside)
    for t in range(len(p_ids)):
        if t not in want:
            assert not out["valid"][t] and np.isnan(out["gold_prob"][t]), t
            assert (out["ids"][t] == -1).all() and out["placed"][t] == 0, t
            continue
        masses, gold_prob, placed, gold_only = want[t]
        kept = sorted(((-x, i) for i, x in masses.items() if x > 0))[:k]
        total = sum(-x for x, _ in kept)
        got = {
            int(i): float(p) for i, p in zip(out["ids"][t], out["probs"][t], strict=True) if i >= 0
        }
        assert got.keys() == {i for _, i in kept}, (seed, t)
        for i, p in got.items():
            assert p == pytest.approx(masses[i] / total, rel=1e-4, abs=1e-6), (seed, t, i)
        assert list(out["probs"][t]) == sorted(out["probs"][t], reverse=True)
        assert bool(out["valid"][t]) == (total > 0), (seed, t)
        assert out["gold_prob"][t] == pytest.approx(gold_prob, rel=1e-6, abs=1e-9), (seed, t)
        assert out["placed"][t] == pytest.approx(placed, rel=1e-6, abs=1e-9), (seed, t)
        assert bool(out["gold_only"][t]) == gold_only, (seed, t)


def test_source_vocab_fields_and_the_identity_case():
    first = FirstToken(None, [b"a", b"ab", b"b"])
    v = SourceVocab.build([b"ab", b"", b"ba"], first)
    assert v.lengths.tolist() == [2, 0, 2]
    assert v.table.tolist() == [1, -1, 2]
    same = SourceVocab.build([b"a", b"ab", b"b"], first, identity=True)
    assert same.table.tolist() == [0, 1, 2]

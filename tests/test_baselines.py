"""The baselines' alignment and vocabulary mapping, on hand-made offsets and real tokenizers."""

import numpy as np
import pytest

from fusechat.baselines import (
    align_dtw,
    align_offsets,
    cooccurrence,
    map_exact,
    map_mined,
    map_stats,
)
from fusechat.tokens import byte_fallback_ids, token_texts

TEXT = (
    "FuseChat fuses chat models with different tokenizers, e.g. naïve café owners' 1,234 "
    "recipes — and résumé-writing tips!\n\nGPT4 Correct User: What is 47 + 35?"
)


@pytest.fixture(scope="module")
def real_pair(mistral_tokenizer):
    from fusechat.toy.real import tekken

    return mistral_tokenizer, tekken()


def _enc(tok, text):
    e = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    return e["input_ids"], [tuple(o) for o in e["offset_mapping"]]


def test_align_offsets_hand_made():
    # pivot: "ab|c|de" ; source: "a|bc|de"  (ends 2,3,5 vs 1,3,5)
    idx, exact = align_offsets([(0, 2), (2, 3), (3, 5)], [(0, 1), (1, 3), (3, 5)])
    assert idx.tolist() == [0, 1, 2] and exact.tolist() == [False, True, True]
    # byte-fallback: three pivot pieces share one character's span; only the last is exact
    idx, exact = align_offsets([(0, 1), (0, 1), (0, 1), (1, 2)], [(0, 1), (1, 2)])
    assert exact.tolist() == [False, False, True, True]
    # a pivot BOS (zero width) aligns with nothing when the source has no BOS
    idx, exact = align_offsets([(0, 0), (0, 2)], [(0, 2)])
    assert idx.tolist() == [-1, 0] and exact.tolist() == [False, True]


def test_identical_tokenizers_align_one_to_one_with_identity_map(mistral_tokenizer):
    ids, offs = _enc(mistral_tokenizer, TEXT)
    idx, exact = align_offsets(offs, offs)
    assert idx.tolist() == list(range(len(ids))) and exact.all()
    texts = token_texts(mistral_tokenizer)
    byte_ids = byte_fallback_ids(mistral_tokenizer)
    m = map_exact(texts, texts, byte_ids)
    assert (m[ids] == np.array(ids)).all()
    native = [i for i in range(len(texts)) if i not in byte_ids]
    assert (m[native] == np.array(native)).all()
    didx, one = align_dtw(
        token_texts(mistral_tokenizer, mistral_tokenizer.convert_ids_to_tokens(ids)),
        token_texts(mistral_tokenizer, mistral_tokenizer.convert_ids_to_tokens(ids)),
    )
    assert didx.tolist() == list(range(len(ids))) and one.all()


def test_real_pair_alignment_is_monotone_covering_and_agrees_with_dtw(real_pair):
    piv, src = real_pair
    p_ids, p_offs = _enc(piv, TEXT)
    s_ids, s_offs = _enc(src, TEXT)
    assert p_ids != s_ids
    idx, exact = align_offsets(p_offs, s_offs)
    assert (np.diff(idx) >= 0).all()  # monotone
    assert (idx >= 0).all() and idx.max() == len(s_ids) - 1  # every position covered
    assert 0.6 < exact.mean() < 1.0  # real tokenizers differ, but mostly share boundaries
    # aligned pairs predict the same next text: both tokens end at the same character
    assert all(p_offs[t][1] == s_offs[idx[t]][1] for t in np.flatnonzero(exact))
    p_txt = token_texts(piv, piv.convert_ids_to_tokens(p_ids))
    s_txt = token_texts(src, src.convert_ids_to_tokens(s_ids))
    didx, one = align_dtw(p_txt, s_txt)
    both = exact & one
    assert both.sum() > 0.5 * len(p_ids)
    assert (didx[both] == idx[both]).all()


def test_token_texts_normalise_metaspace_bytelevel_and_byte_tokens(real_pair):
    piv, src = real_pair
    pt, st = token_texts(piv), token_texts(src)
    assert pt[piv.convert_tokens_to_ids("▁world")] == " world"
    assert st[src.convert_tokens_to_ids("Ġworld")] == " world"
    # SentencePiece <0xC3> and byte-level 'Ã' both stand for the raw byte 0xC3
    assert pt[piv.convert_tokens_to_ids("<0xC3>")] == st[src.convert_tokens_to_ids("Ã")]


def test_vocab_maps_exact_mined_stats(real_pair):
    piv, src = real_pair
    pt, st = token_texts(piv), token_texts(src)
    exact = map_exact(st, pt, byte_fallback_ids(piv))
    assert exact[src.convert_tokens_to_ids("Ġworld")] == piv.convert_tokens_to_ids("▁world")
    p_ids, p_offs = _enc(piv, TEXT)
    s_ids, s_offs = _enc(src, TEXT)
    unmapped = sorted({i for i in s_ids if exact[i] < 0})
    assert unmapped  # tekken has tokens Mistral lacks
    mined = map_mined(st, pt, ids=unmapped, base=exact)
    from rapidfuzz.distance import Levenshtein

    for s in unmapped:  # the nearest pivot token by edit distance, no nearer one exists
        d = Levenshtein.distance(st[s], pt[mined[s]])
        assert d == min(Levenshtein.distance(st[s], t) for t in pt if t)
    # stats: aligned next tokens over a text
    idx, ex = align_offsets(p_offs, s_offs)
    counts = cooccurrence(p_ids, s_ids, idx, ex)
    stats = map_stats(counts, st, pt, fallback=exact)
    w = src.convert_tokens_to_ids("Ġchat")
    assert stats[w] == piv.convert_tokens_to_ids("▁chat")


def test_map_stats_hand_made_counts_and_ties():
    from collections import Counter

    st, pt = ["ab", "x"], ["a", "ab", "abc", "zz"]
    counts = Counter({(0, 0): 2, (0, 2): 2, (0, 3): 1})  # tie between 'a' and 'abc' (lev 1 each)
    out = map_stats(counts, st, pt, fallback=np.array([-1, 3]))
    assert out.tolist() == [
        0,
        3,
    ]  # tie -> first by count/distance order kept; unseen keeps fallback
    counts[(0, 1)] = 5
    assert map_stats(counts, st, pt, fallback=np.array([-1, 3])).tolist() == [1, 3]

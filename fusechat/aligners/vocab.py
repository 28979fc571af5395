"""The baselines: a pivot position takes the source position whose token ends at the same byte
(``align_offsets``, linear time; or FuseLLM's edit-distance DTW, ``align_dtw``), and each source
id is sent to one pivot id: ``exact`` (same bytes), ``mined`` (FuseLLM's minimum edit distance),
``stats`` (FuseChat-2.0: the pivot token most often aligned with it over the corpus, ties by edit
distance). Positions without such a partner, or whose candidates all map to nothing, get no
distribution."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np

from fusechat.aligners.base import Aligner
from fusechat.baselines import align_dtw, align_offsets, cooccurrence, map_stats, vocab_map
from fusechat.shards import unpack_ids
from fusechat.sparse import map_topk
from fusechat.tokens import token_texts


class VocabAligner(Aligner):
    """A sequence pairing, then one pivot id per source id (``vmap``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.vmap: np.ndarray | None = self._vocab_map()

    def _vocab_map(self) -> np.ndarray | None:
        return vocab_map(self.method, self.src_tok, self.piv_tok)

    @property
    def fitted(self) -> np.ndarray | None:
        return self.vmap

    @fitted.setter
    def fitted(self, vmap: np.ndarray | None) -> None:
        if vmap is not None:
            self.vmap = vmap

    def pairs(self, prow: dict, srow: dict) -> tuple[np.ndarray, np.ndarray]:
        """Source position per pivot position, and where the two end at the same place
        (``align_offsets``) or pair one to one (``align_dtw``)."""
        if self.sequence == "offsets":
            pe, se = prow["pos.byte_end"], srow["pos.byte_end"]
            return align_offsets(np.stack([pe, pe], 1), np.stack([se, se], 1))
        p_ids, s_ids = unpack_ids(prow["pos.input_ids"]), unpack_ids(srow["pos.input_ids"])
        return align_dtw(
            token_texts(self.piv_tok, self.piv_tok.convert_ids_to_tokens(p_ids.tolist())),
            token_texts(self.src_tok, self.src_tok.convert_ids_to_tokens(s_ids.tolist())),
        )

    def __call__(self, prow: dict, srow: dict) -> dict[str, np.ndarray]:
        """Every pivot position; plus ``exact`` (an exactly paired source position) and
        ``mass`` (the mapped share of the source's top-K there)."""
        idx, exact = self.pairs(prow, srow)
        j = np.clip(idx, 0, None)
        lp = srow["pos.topk_logprobs"][j]
        ids, probs, mass = map_topk(unpack_ids(srow["pos.topk_ids"])[j], lp, self.vmap)
        valid = exact & (idx >= 0) & (mass > 0)
        top_mass = np.exp(lp.astype(np.float64)).sum(-1)
        return {
            "ids": np.where(valid[:, None], ids, -1),
            "probs": np.where(valid[:, None], probs, 0).astype(np.float32),
            "valid": valid,
            "exact": exact & (idx >= 0),
            "mass": np.where(exact, mass / np.maximum(top_mass, 1e-30), 0.0),
        }


class StatsAligner(VocabAligner):
    """``stats``: the map is learned from the corpus's co-occurrences (``fit``) first."""

    needs_corpus = True

    def _vocab_map(self) -> None:
        return None

    def fit(self, pairs: Iterable[tuple[dict, dict]]) -> None:
        counts: Counter = Counter()
        for prow, srow in pairs:
            idx, exact = self.pairs(prow, srow)
            counts += cooccurrence(
                unpack_ids(prow["pos.input_ids"]), unpack_ids(srow["pos.input_ids"]), idx, exact
            )
        src_texts, piv_texts = token_texts(self.src_tok), token_texts(self.piv_tok)
        base = vocab_map("exact", self.src_tok, self.piv_tok)
        self.vmap = map_stats(counts, src_texts, piv_texts, base)

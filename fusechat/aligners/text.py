"""The ``text`` method (the default; the walk itself is ``fusechat.textalign``): every learned
pivot position gets the source's distribution over the pivot tokens that the pivot's own
tokenizer would emit there, each candidate mapped by the text it continues with, inside source
tokens too."""

from __future__ import annotations

import numpy as np

from fusechat.aligners.base import Aligner
from fusechat.io import tokenizer_fingerprint
from fusechat.losses import learned_next
from fusechat.shards import unpack_ids
from fusechat.textalign import SourceVocab, align_text
from fusechat.tokens import FirstToken, token_bytes


class TextAligner(Aligner):
    sequences = ("offsets",)  # the walk reads byte offsets

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        same = tokenizer_fingerprint(self.src_tok) == tokenizer_fingerprint(self.piv_tok)
        self.vocab = SourceVocab.build(token_bytes(self.src_tok), FirstToken(self.piv_tok), same)

    def __call__(self, prow: dict, srow: dict) -> dict[str, np.ndarray]:
        """Only learned positions get a distribution; plus ``gold_prob`` and ``gold_only``."""
        return align_text(
            unpack_ids(prow["pos.input_ids"]), prow["pos.byte_end"].astype(np.int64),
            unpack_ids(srow["pos.input_ids"]), srow["pos.byte_end"].astype(np.int64),
            unpack_ids(srow["pos.topk_ids"]), srow["pos.topk_logprobs"], srow["pos.gold_logprob"],
            np.flatnonzero(learned_next(prow["pos.labels_mask"])), self.vocab, self.k,
            unpack_ids(srow["pos.topk_next"]) if "pos.topk_next" in srow else None,
            self.inside, self.branches,
        )  # fmt: skip

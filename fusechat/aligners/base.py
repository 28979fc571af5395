"""What an alignment method is: the interface the ``align`` stage and ``bench/transfer.py``
call, whatever the method."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np


class Aligner:
    """One source's captured rows onto the pivot's, by one method.

    ``aligner(prow, srow)`` returns, at every pivot position, ``ids`` (T, k) and ``probs``
    (T, k) (the source's distribution over pivot ids, -1/0 padded), ``valid`` (T,) (a
    distribution exists there), and what the method measures for the transfer statistics
    (``align.transfer_counts``: ``gold_prob``, ``gold_only``, or ``exact`` and ``mass``), and
    ``branch_ids`` where it trains branches. Methods that learn from the whole corpus first
    (``needs_corpus``) get every row pair through ``fit``; what they learned (``fitted``) is
    what spawned workers receive.
    """

    sequences: ClassVar[tuple[str, ...]] = ("offsets", "dtw")  # position pairings it supports
    needs_corpus: ClassVar[bool] = False

    def __init__(self, method: str, sequence: str, piv_tok, src_tok, k: int,
                 inside: str = "conditional", branches: int = 0):  # fmt: skip
        self.method, self.sequence, self.k = method, sequence, k
        self.inside, self.branches = inside, branches
        self.piv_tok, self.src_tok = piv_tok, src_tok

    def fit(self, pairs: Iterable[tuple[dict, dict]]) -> None:
        """Learn from every (pivot row, source row) pair of the corpus (``needs_corpus``)."""

    @property
    def fitted(self) -> Any:
        return None

    @fitted.setter
    def fitted(self, state: Any) -> None:
        pass

    def __call__(self, prow: dict, srow: dict) -> dict[str, np.ndarray]:
        raise NotImplementedError

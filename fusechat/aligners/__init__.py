"""Alignment methods, one class per file, registered here by name (one line each).

A method maps one source's captured rows onto the pivot's positions and vocabulary: an
``Aligner`` (``base.py``) called on a (pivot row, source row) pair. ``AlignConfig.method``
takes its choices from this registry, so a new method is its file, its test and one line
below. Entries are import paths: a method's dependencies load only when it is used.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fusechat.aligners.base import Aligner

ALIGNERS: dict[str, str] = {
    "text": "fusechat.aligners.text:TextAligner",  # the default: by continuation text
    "exact": "fusechat.aligners.vocab:VocabAligner",  # same bytes
    "mined": "fusechat.aligners.vocab:VocabAligner",  # FuseLLM's minimum edit distance
    "stats": "fusechat.aligners.vocab:StatsAligner",  # FuseChat-2.0's co-occurrence counts
}


def aligner_class(method: str) -> type[Aligner]:
    """The class registered for ``method``."""
    module, _, name = ALIGNERS[method].partition(":")
    return getattr(import_module(module), name)


def sequence_error(method: str, sequence: str) -> str | None:
    """Why ``method`` cannot pair positions by ``sequence`` (None when it can)."""
    allowed = aligner_class(method).sequences
    if sequence in allowed:
        return None
    return f"method {method!r} pairs positions by {' or '.join(allowed)} (sequence: {allowed[0]})"

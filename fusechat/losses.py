"""Losses over assistant tokens, as pure tensor functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token negative log-likelihood per position.

    ``nll[b, t] = -log p(input_ids[b, t+1] | input_ids[b, :t+1])`` for t < T-1, and 0 at t = T-1
    (no next token), so the result has the shape of ``input_ids`` and position t scores the
    prediction made there.
    """
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return F.pad(nll, (0, 1))


def predicts_label(labels_mask: torch.Tensor) -> torch.Tensor:
    """Positions whose *next* token is learned: ``pred[b, t] = labels_mask[b, t+1]``."""
    return F.pad(labels_mask[:, 1:], (0, 1), value=False)

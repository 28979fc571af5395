"""Losses over assistant tokens, as pure tensor functions."""

from __future__ import annotations

import numpy as np
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


def next_ids(ids: np.ndarray) -> np.ndarray:
    """The token each position predicts, for stored rows: ``nxt[t] = ids[t+1]``, -1 at the
    end (int64)."""
    return np.append(np.asarray(ids, dtype=np.int64)[1:], -1)


def learned_next(labels_mask: np.ndarray) -> np.ndarray:
    """``predicts_label`` for one stored row: positions whose next token is learned (the
    positions a fused target is needed at)."""
    return np.append(np.asarray(labels_mask, dtype=bool)[1:], False)


class _SparseSoftCE(torch.autograd.Function):
    """``L = sum_t w_t (sum_j q_tj logz_t - sum_j q_tj x_t[idx_tj])``: cross-entropy of logits
    x against a sparse soft label (ids ``idx``, masses ``q``), with ``logz = logsumexp(x)``.

    The backward writes ``dL/dx = w_t (sum_j q_tj softmax(x_t) - sum_j q_tj onehot(idx_tj))``
    into one (B, T, V) buffer, like ``F.cross_entropy`` does for a hard label; autograd through
    ``gather`` would allocate a vocabulary-sized gradient per gather.
    """

    @staticmethod
    def forward(ctx, logits, idx, q, w):
        x = logits.float()
        logz = torch.logsumexp(x, dim=-1)
        g = x.gather(-1, idx)
        per = q.sum(-1) * logz - (q * g).sum(-1)
        ctx.save_for_backward(logits, idx, q, w, logz)
        logz, g = logz.detach(), g.detach()
        ctx.mark_non_differentiable(logz, g)
        return (per * w).sum(), logz, g

    @staticmethod
    def backward(ctx, grad_out, _glogz, _gg):
        logits, idx, q, w, logz = ctx.saved_tensors
        grad = torch.sub(logits.float(), logz[..., None]).exp_()  # softmax, one buffer
        grad.mul_(q.sum(-1, keepdim=True))
        grad.scatter_add_(-1, idx, -q)
        grad.mul_((w * grad_out)[..., None])
        return grad.to(logits.dtype), None, None, None


def fusion_losses(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    labels_mask: torch.Tensor,
    target_ids: torch.Tensor | None = None,
    target_probs: torch.Tensor | None = None,
    lam: float = 1.0,
    temperature: float = 1.0,
    kind: str = "ce",
    n_items: torch.Tensor | int | None = None,
    position_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``loss = lam * CLM + (1 - lam) * fusion`` over the positions that predict a learned token.

    With ``log q_t = logits_t - logsumexp(logits_t)`` the student's log-probabilities at t:
    ``CLM = mean_t -log q_t(x_{t+1})`` and, for a sparse target ``(ids_t, p_t)`` (K entries,
    id -1 = padding; ``p`` sharpened or flattened as ``p^(1/T)``, renormalised),
    ``CE = mean_t -sum_k p_t,k log q_t(ids_t,k)`` or ``KL = CE - H(p_t)`` (same gradient).
    Both terms are one cross-entropy against the soft label ``lam * onehot(x_{t+1}) +
    (1 - lam) * p_t`` over 1 + K ids, so no (positions, vocabulary) target exists and the
    extra memory does not grow with the vocabulary. The loss divides the sum over this batch's
    learned positions by ``n_items``, the learned positions of the whole effective batch
    (every micro-batch of a gradient accumulation, every process), so accumulated micro-batches
    add up to one big batch's mean, as transformers' ``num_items_in_batch``; by default this
    batch's own count. Returns ``(loss, clm, fusion)``; the last two are detached means over
    this batch, for logging (fusion is 0 without targets). ``position_weight`` (B, T) scales
    each position's terms (a continuation of a source's alternative by that alternative's
    probability: the expected loss over the source's continuations); the counts stay counts.
    """
    if kind not in ("ce", "kl"):  # the config allows no other; a caller's typo is not CE
        raise ValueError(f"fusion loss kind {kind!r}: ce or kl")
    pred = predicts_label(labels_mask)
    local = pred.sum().clamp(min=1)
    scaled = pred.float() if position_weight is None else pred.float() * position_weight
    w = scaled / local  # this batch's mean: the logged parts
    # the loss's weights: this batch's share of the effective batch's learned tokens
    w_loss = w if n_items is None else scaled / torch.as_tensor(n_items).clamp(min=1)
    nxt = F.pad(input_ids[:, 1:], (0, 1))[..., None]
    if target_ids is None or lam >= 1.0:
        idx, q = nxt, torch.ones(nxt.shape, device=logits.device)
        loss, logz, g = _SparseSoftCE.apply(logits, idx, q, w_loss)
        clm = ((logz - g[..., 0]) * w).sum()
        return loss, clm.detach(), torch.zeros((), device=logits.device)
    valid = target_ids >= 0
    p = torch.where(valid, target_probs.float(), 0.0)
    if temperature != 1.0:
        p = torch.where(valid & (p > 0), p.clamp(min=1e-30) ** (1.0 / temperature), 0.0)
    p = p / p.sum(-1, keepdim=True).clamp(min=1e-12)
    idx = torch.cat([nxt, target_ids.clamp(min=0)], dim=-1)
    q = torch.cat([torch.full(nxt.shape, lam, device=p.device), (1.0 - lam) * p], dim=-1)
    loss, logz, g = _SparseSoftCE.apply(logits, idx, q, w_loss)
    clm = ((logz - g[..., 0]) * w).sum()
    fus_t = p.sum(-1) * logz - (p * g[..., 1:]).sum(-1)
    if kind == "kl":
        ent = torch.where(p > 0, p * p.clamp(min=1e-30).log(), 0.0).sum(-1)
        fus_t = fus_t + ent
        loss = loss + (1.0 - lam) * (ent * w_loss).sum()  # a constant: the gradient is CE's
    return loss, clm.detach(), (fus_t * w).sum().detach()

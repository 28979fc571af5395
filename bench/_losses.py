"""The losses the benches time fusechat's sparse fusion loss against, written as the usual
implementations write them (``bench/train_step.py``, ``bench/gpu.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusechat.losses import predicts_label


def clm_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Plain causal-LM cross-entropy as the HF models compute it: position t predicts token
    t+1, unlearned tokens labelled -100."""
    labels = torch.where(mask, ids, -100)[:, 1:]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten())


def dense_fusion_loss(
    logits: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    tid: torch.Tensor,
    p: torch.Tensor,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fusion_losses``' value through a dense (B, T, V) target built every step, as a
    reference implementation does: ``lam * CLM + (1 - lam) * CE(target, q)``, each the mean
    over learned positions. Returns (loss, CLM, CE)."""
    w = predicts_label(mask).float()
    w = w / w.sum()
    logq = F.log_softmax(logits.float(), -1)
    clm = -(logq.gather(-1, F.pad(ids[:, 1:], (0, 1))[..., None]).squeeze(-1) * w).sum()
    target = torch.zeros_like(logq).scatter_add_(-1, tid, p)
    ce = (-(target * logq).sum(-1) * w).sum()
    return lam * clm + (1 - lam) * ce, clm, ce

"""The training losses (pure tensor functions) against references written here: a dense
(B, T, V) target with autograd, and the label shift spelled out position by position."""

from __future__ import annotations

import pytest
import torch

from fusechat.losses import fusion_losses, predicts_label, token_nll


def _dense_reference(logits, ids, mask, tid, p, lam, temperature=1.0):
    """The loss written densely: a (B, T, V) target tensor, autograd through log_softmax."""
    v = logits.shape[-1]
    dense = torch.zeros(logits.shape).scatter_add_(
        -1, tid.clamp(min=0), torch.where(tid >= 0, p, 0)
    )
    dense = dense ** (1 / temperature)
    dense = dense / dense.sum(-1, keepdim=True)
    logq = torch.log_softmax(logits, -1)
    # position t predicts token t+1: it is learned when the mask holds at t+1 (written here,
    # not taken from fusechat.losses, so a wrong shift there cannot pass)
    pred = torch.zeros_like(mask)
    pred[:, :-1] = mask[:, 1:]
    gold = torch.nn.functional.one_hot(torch.nn.functional.pad(ids[:, 1:], (0, 1)), v).float()
    clm = -(gold * logq).sum(-1)[pred].mean()
    ce = -(dense * logq).sum(-1)[pred].mean()
    ent = torch.where(dense > 0, dense * dense.clamp(min=1e-30).log(), 0).sum(-1)[pred].mean()
    return lam * clm + (1 - lam) * ce, clm, ce, ent


def _case(seed=0, b=2, t=7, v=50, k=6, repeat=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g)
    ids = torch.randint(0, v, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) > 0.3
    tid = torch.rand(b, t, v, generator=g).argsort(-1)[..., :k]  # distinct ids per position
    tid[..., -1] = -1  # padding
    if repeat:
        tid[..., 1] = tid[..., 0]  # a repeated id: its probabilities add
    p = torch.rand(b, t, k, generator=g)
    p[..., -1] = 0
    return logits, ids, mask, tid, p / p.sum(-1, keepdim=True)


@pytest.mark.parametrize("lam", [0.0, 0.9, 1.0])
def test_sparse_loss_and_gradient_equal_dense_reference(lam):
    logits, ids, mask, tid, p = _case(repeat=True)
    a = logits.clone().requires_grad_()
    loss, clm, ce = fusion_losses(a, ids, mask, tid, p, lam=lam)
    loss.backward()
    b = logits.clone().requires_grad_()
    want, want_clm, want_ce, _ = _dense_reference(b, ids, mask, tid, p, lam)
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(clm, want_clm)
    if lam < 1:
        torch.testing.assert_close(ce, want_ce)
    torch.testing.assert_close(a.grad, b.grad)
    # lambda = 1 is exactly the plain causal-LM loss on the masked tokens
    if lam == 1.0:
        logp = torch.log_softmax(logits, -1)
        nll = [-logp[i, t, ids[i, t + 1]] for i in range(ids.shape[0])
               for t in range(ids.shape[1] - 1) if mask[i, t + 1]]  # fmt: skip
        torch.testing.assert_close(loss, torch.stack(nll).mean())


def test_temperature_and_kl():
    logits, ids, mask, tid, p = _case(seed=1)
    a = logits.clone().requires_grad_()
    loss, _, ce = fusion_losses(a, ids, mask, tid, p, lam=0.5, temperature=2.0)
    loss.backward()
    b = logits.clone().requires_grad_()
    want, _, want_ce, ent = _dense_reference(b, ids, mask, tid, p, 0.5, temperature=2.0)
    want.backward()
    torch.testing.assert_close(ce, want_ce)
    torch.testing.assert_close(a.grad, b.grad)
    kl_loss, _, kl = fusion_losses(logits, ids, mask, tid, p, lam=0.5, temperature=2.0, kind="kl")
    torch.testing.assert_close(kl, want_ce + ent)
    torch.testing.assert_close(kl_loss, want + 0.5 * ent)
    assert kl >= 0


def test_token_nll_and_the_label_shift_by_hand():
    logits, ids, mask, _, _ = _case(seed=2)
    logp = torch.log_softmax(logits, -1)
    nll = token_nll(logits, ids)
    for i in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            torch.testing.assert_close(nll[i, t], -logp[i, t, ids[i, t + 1]])
        assert nll[i, -1] == 0  # the last position has no next token
    pred = predicts_label(mask)
    assert pred[:, :-1].tolist() == mask[:, 1:].tolist() and not pred[:, -1].any()


def test_no_learned_position_gives_zero_loss_not_nan():
    logits, ids, mask, tid, p = _case(seed=3)
    loss, clm, ce = fusion_losses(logits, ids, torch.zeros_like(mask), tid, p, lam=0.5)
    assert loss.item() == 0.0 and clm.item() == 0.0 and ce.item() == 0.0


def test_defaults_normalisation_and_reported_terms():
    logits, ids, mask, tid, p = _case(seed=4)
    clm_only = token_nll(logits, ids)[predicts_label(mask)].mean()
    # no targets, whatever lambda: plain CLM, fusion reported as 0
    for kw in ({}, {"lam": 0.5}):
        loss, clm, fus = fusion_losses(logits, ids, mask, **kw)
        torch.testing.assert_close(loss, clm_only)
        assert fus.item() == 0.0
    # lambda 1 with targets: the CLM loss, the fusion term not computed
    loss, _, fus = fusion_losses(logits, ids, mask, tid, p, lam=1.0)
    torch.testing.assert_close(loss, clm_only)
    assert fus.item() == 0.0
    # targets are renormalised: half the mass teaches the same
    a = fusion_losses(logits, ids, mask, tid, p, lam=0.3)
    b = fusion_losses(logits, ids, mask, tid, 0.5 * p, lam=0.3, kind="ce")
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[2], b[2])
    # one learned position: the mean over one, not half of it
    one = torch.zeros_like(mask)
    one[0, 3] = True
    logp = torch.log_softmax(logits, -1)
    loss, _, _ = fusion_losses(logits, ids, one)
    torch.testing.assert_close(loss, -logp[0, 2, ids[0, 3]])


def test_gradient_scales_with_the_upstream_gradient():
    logits, ids, mask, tid, p = _case(seed=5)
    a = logits.clone().requires_grad_()
    fusion_losses(a, ids, mask, tid, p, lam=0.4)[0].backward()
    b = logits.clone().requires_grad_()
    (3.0 * fusion_losses(b, ids, mask, tid, p, lam=0.4)[0]).backward()
    torch.testing.assert_close(b.grad, 3.0 * a.grad)


def test_next_token_shift_of_stored_rows():
    """Position t predicts token t+1: the stored-row shift matches the tensor one."""
    import numpy as np

    from fusechat.losses import learned_next, next_ids

    assert next_ids(np.array([5, 6, 7])).tolist() == [6, 7, -1]
    assert next_ids(np.array([5])).tolist() == [-1]
    mask = np.array([False, True, True, False, True])
    assert learned_next(mask).tolist() == [True, True, False, True, False]
    assert learned_next(mask).tolist() == predicts_label(torch.tensor(mask)[None])[0].tolist()


def test_position_weight_scales_each_positions_terms():
    """A position weighed w contributes w times its terms; the count of positions stays."""
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 7)
    ids = torch.tensor([[1, 2, 3, 4]])
    mask = torch.tensor([[False, True, True, True]])
    tid = torch.tensor([[[2, 5], [3, 6], [4, 0], [-1, -1]]])
    tp = torch.tensor([[[0.7, 0.3], [0.5, 0.5], [1.0, 0.0], [0.0, 0.0]]])
    weight = torch.tensor([[1.0, 0.25, 1.0, 1.0]])
    loss, clm, fus = fusion_losses(logits, ids, mask, tid, tp, lam=0.5, position_weight=weight)
    per = [fusion_losses(logits, ids, torch.tensor([[t == p for t in range(4)]]), tid, tp,
                         lam=0.5)[0] for p in (1, 2, 3)]  # fmt: skip
    want = (per[0] * 1.0 + per[1] * 0.25 + per[2] * 1.0) / 3  # positions 0, 1, 2 predict them
    torch.testing.assert_close(loss, want)


def test_an_unknown_fusion_kind_is_refused_not_taken_for_ce():
    logits, ids = torch.zeros(1, 3, 5), torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="'kl2'"):
        fusion_losses(logits, ids, torch.ones(1, 3, dtype=torch.bool), kind="kl2")

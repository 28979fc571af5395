"""VaRM: merging by the variation ratio of each target's parameters (FuseChat, arXiv 2402.16107).

For targets i = 1..N fine-tuned from a common base and one parameter matrix m::

    d_i = theta_i - theta_base
    v_i = mean(d_i ** 2)                      (statistic 'square'; 'abs' uses mean |d_i|)
    w_i = v_i / sum_j v_j                     (equal weights 1/N where every v_j is 0)
    theta = sum_i w_i * theta_i

A target that moved a matrix more during fusion training gets more say over that matrix.
Granularity: ``matrix`` (the paper's: one v per tensor), ``element`` (one per entry),
``layer`` and ``model`` (v summed over every tensor of a decoder layer or of the model, from a
statistics pass; see ``merge.run``). With ``temperature > 0`` the ratios r_i = w_i pass through
``softmax(r / temperature)``, which flattens (large T) or sharpens (small T) the choice.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from mergekit.merge_methods.base import BasePolicy, InputContract, TensorGroup
from mergekit.merge_methods.easy_define import merge_method

Granularity = Literal["matrix", "element", "layer", "model"]
Statistic = Literal["square", "abs"]


def variation(
    targets: Sequence[torch.Tensor],
    base: torch.Tensor,
    statistic: str = "square",
    elementwise: bool = False,
) -> torch.Tensor:
    """Per-target variation of ``d_i = theta_i - theta_base``: ``mean(d_i ** 2)`` or
    ``mean(|d_i|)`` (shape (N,), float64), or the entries themselves when ``elementwise``.

    One delta is alive at a time and reductions run in float32 with float64 results: merging
    is memory-bound, and a float64 stack of N embedding matrices would dominate both time and
    peak memory.
    """
    out = []
    b = base.float()
    buf = None if elementwise else torch.empty_like(b)  # one scratch delta, reused
    for t in targets:
        if elementwise:
            d = t.float() - b
            out.append(d.square() if statistic == "square" else d.abs())
            continue
        flat = torch.sub(t.float(), b, out=buf).reshape(-1)
        s = torch.dot(flat, flat) if statistic == "square" else flat.abs_().sum()
        out.append(s.double() / max(flat.numel(), 1))
    return torch.stack(out).double()


def ratio_weights(v: torch.Tensor, temperature: float = 0.0) -> torch.Tensor:
    """``w_i = v_i / sum_j v_j`` along dim 0 (1/N where the sum is 0), then optionally
    ``softmax(w / temperature)``."""
    total = v.sum(dim=0, keepdim=True)
    w = torch.where(total > 0, v / torch.where(total > 0, total, 1), 1.0 / len(v))
    if temperature > 0:
        w = torch.softmax(w / temperature, dim=0)
    return w


def varm_weights(
    targets: Sequence[torch.Tensor],
    base: torch.Tensor,
    statistic: str = "square",
    temperature: float = 0.0,
    elementwise: bool = False,
) -> torch.Tensor:
    """VaRM weights of N targets for one tensor: shape (N,), or (N, *shape) when elementwise."""
    return ratio_weights(variation(targets, base, statistic, elementwise), temperature)


def weighted_sum(targets: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i theta_i`` in float32 (float64 for float64 inputs), cast back."""
    dtype = torch.float64 if targets[0].dtype == torch.float64 else torch.float32
    out = torch.zeros_like(targets[0], dtype=dtype)
    for t, w in zip(targets, weights, strict=True):
        out.add_(t.to(dtype), alpha=float(w))
    return out.to(targets[0].dtype)


# --------------------------------------------------------------------------- mergekit method


class Session:
    """What one merge's VaRM kernels share, in and out: the group statistics of layer and model
    granularity (computed before the merge: a kernel sees one tensor) and, filled as tensors
    merge (mergekit may run them in threads), each tensor's weight per target. mergekit 0.1.5
    hands a kernel its tensors and config parameters only, so the open session is the one
    channel; ``session()`` scopes it to one merge, and nothing outlives it."""

    def __init__(self, group_stats: dict[tuple[str, str], float] | None = None):
        self.group_stats = dict(group_stats or {})
        self.weights: dict[str, dict[str, float]] = {}  # tensor name -> {model: weight}
        self._lock = threading.Lock()

    def record(self, name: str, weights: dict[str, float]) -> None:
        with self._lock:
            self.weights[name] = weights


_OPEN: Session | None = None


@contextmanager
def session(group_stats: dict[tuple[str, str], float] | None = None) -> Iterator[Session]:
    """Open the VaRM session of one merge (``fusechat merge``); one at a time per process."""
    global _OPEN
    if _OPEN is not None:
        raise RuntimeError("a VaRM merge is already running in this process")
    _OPEN = Session(group_stats)
    try:
        yield _OPEN
    finally:
        _OPEN = None


def layer_of(name: str) -> tuple[str, int, str] | None:
    """A tensor of a decoder layer as (the layer's name, its index, the module within it):
    ``model.layers.3.self_attn.q_proj.weight`` -> (``model.layers.3``, 3,
    ``self_attn.q_proj``); None outside the layers (embeddings, final norm)."""
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p in ("layers", "h", "blocks") and parts[i + 1].isdigit():
            module = ".".join(q for q in parts[i + 2 :] if q not in ("weight", "bias"))
            return ".".join(parts[: i + 2]), int(parts[i + 1]), module
    return None


def group_key(name: str, granularity: str) -> str:
    """The tensors that share one weight: a decoder layer (``model.layers.3``; tensors outside
    layers, such as embeddings, form their own group each) or the whole model."""
    if granularity == "model":
        return "model"
    layer = layer_of(name)
    return layer[0] if layer else name


@merge_method(
    name="varm",
    pretty_name="VaRM",
    reference_url="https://arxiv.org/abs/2402.16107",
    contract=InputContract(base=BasePolicy.REQUIRED),
)
def varm_merge(
    group: TensorGroup,
    granularity: Granularity = "matrix",
    statistic: Statistic = "square",
    temperature: float = 0.0,
) -> torch.Tensor:
    """mergekit kernel: VaRM over one tensor's targets (the non-base inputs)."""
    base = group.base.tensor
    entries = group.non_base
    if not entries:
        return base
    targets = [e.tensor for e in entries]
    name = group.metadata.name or ""
    run = _OPEN  # None when mergekit runs VaRM outside `fusechat merge`
    if granularity in ("layer", "model"):
        key = group_key(name, granularity)
        stats = run.group_stats if run else {}
        missing = [str(e.id) for e in entries if (str(e.id), key) not in stats]
        if missing:
            raise RuntimeError(
                f"varm granularity {granularity}: no statistics for {key} of {missing[0]}; "
                "run it through `fusechat merge`, which computes them first"
            )
        v = torch.tensor([stats[(str(e.id), key)] for e in entries], dtype=torch.float64)
        weights = ratio_weights(v, temperature)
    else:
        weights = varm_weights(targets, base, statistic, temperature, granularity == "element")
    per_model = weights if weights.ndim == 1 else weights.reshape(len(weights), -1).mean(1)
    if run:
        run.record(name, {str(e.id): float(w) for e, w in zip(entries, per_model, strict=True)})
    if weights.ndim > 1:  # elementwise: sum_i w_i * theta_i entry by entry
        out = torch.zeros_like(base, dtype=torch.float32)
        for t, w in zip(targets, weights, strict=True):
            out.addcmul_(t.float(), w.float())
        return out.to(base.dtype)
    return weighted_sum(targets, weights)


def register() -> None:
    """Make ``merge_method: varm`` available to mergekit in this process (idempotent)."""
    from mergekit.merge_methods import registry

    if "varm" not in {m.spec.name for m in registry.registered_methods()}:
        registry.register(varm_merge)

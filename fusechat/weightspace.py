"""Weight-space figures: can averaging two fine-tunes of one pivot work? Measured before any
merge is tuned.

Merging works while the fine-tunes stay in one basin of the loss around their common base
(model soups, Wortsman et al. 2022; task arithmetic, Ilharco et al. 2023): small deltas from
the base, pointing the same way, and a held-out loss that stays low along the straight line
between them. Three figures say whether that holds:

- relative delta ``||theta_t - theta_p|| / ||theta_p||`` of each target from the pivot;
- the cosine between two targets' deltas, ``<theta_a - theta_p, theta_b - theta_p> / (|.| |.|)``;
- the held-out loss along ``(1 - alpha) theta_a + alpha theta_b`` (target to target, and pivot
  to each target): a bump in the middle of target to target means their average is off both.

The maths are pure functions of state dicts (every floating tensor, flattened together);
``weight_figures`` reads the model folders and evaluates the lines.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence

import torch

log = logging.getLogger(__name__)
State = Mapping[str, torch.Tensor]
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _floats(state: State) -> list[str]:
    return sorted(k for k, v in state.items() if v.is_floating_point())


def delta_sums(base: State, models: Mapping[str, State]) -> dict:
    """The sums the figures are made of, in float64 over ``base``'s floating tensors:
    ``base``: ``|theta_p|^2``; ``delta``: per model ``|theta_i - theta_p|^2``; ``dot``: per pair
    of models ``<theta_a - theta_p, theta_b - theta_p>``. Sums over parts of a model (tensor by
    tensor, as a merge streams them) add up to the whole model's (``add_sums``)."""
    names = list(models)
    out = {"base": 0.0, "delta": dict.fromkeys(names, 0.0),
           "dot": {(a, b): 0.0 for i, a in enumerate(names) for b in names[i + 1 :]}}  # fmt: skip
    for k in _floats(base):
        p = base[k].double()
        out["base"] += float(p.square().sum())
        d = {n: m[k].double() - p for n, m in models.items()}
        for n in names:
            out["delta"][n] += float(d[n].square().sum())
        for a, b in out["dot"]:
            out["dot"][a, b] += float((d[a] * d[b]).sum())
    return out


def add_sums(total: dict, part: dict) -> dict:
    """Two ``delta_sums`` of disjoint tensors of the same models, added."""
    return {"base": total["base"] + part["base"],
            "delta": {n: v + part["delta"][n] for n, v in total["delta"].items()},
            "dot": {k: v + part["dot"][k] for k, v in total["dot"].items()}}  # fmt: skip


def figures(sums: dict) -> dict:
    """From ``delta_sums``: each model's relative delta ``sqrt(delta / base)`` and each pair's
    delta cosine ``dot / sqrt(delta_a * delta_b)`` (keyed ``"a ~ b"``; None where a delta is
    zero, or the base is)."""
    b2, d2 = sums["base"], sums["delta"]
    rel = {n: math.sqrt(v / b2) if b2 > 0 else None for n, v in d2.items()}
    cos = {f"{a} ~ {b}": v / math.sqrt(d2[a] * d2[b]) if d2[a] > 0 and d2[b] > 0 else None
           for (a, b), v in sums["dot"].items()}  # fmt: skip
    return {"relative_delta": rel, "delta_cosine": cos}


def relative_delta(base: State, model: State) -> float:
    """``||theta - theta_base|| / ||theta_base||`` over every floating parameter together."""
    r = figures(delta_sums(base, {"m": model}))["relative_delta"]["m"]
    return float("nan") if r is None else r


def delta_cosine(base: State, a: State, b: State) -> float:
    """Cosine between the deltas ``a - base`` and ``b - base`` (nan where one is zero)."""
    c = figures(delta_sums(base, {"a": a, "b": b}))["delta_cosine"]["a ~ b"]
    return float("nan") if c is None else c


def lerp(a: State, b: State, alpha: float) -> dict[str, torch.Tensor]:
    """``(1 - alpha) a + alpha b`` for floating tensors (others, such as integer buffers, from
    ``a``), computed in float32 and cast back to each tensor's dtype."""
    out = {}
    for k, v in a.items():
        if v.is_floating_point():
            out[k] = torch.lerp(v.float(), b[k].float(), alpha).to(v.dtype)
        else:
            out[k] = v
    return out


def line_losses(
    loss: Callable[[State], float], a: State, b: State, alphas: Sequence[float] = ALPHAS
) -> list[float]:
    """``loss`` at each point ``lerp(a, b, alpha)`` of the straight line from a to b."""
    return [loss(lerp(a, b, x)) for x in alphas]


def barrier(alphas: Sequence[float], losses: Sequence[float]) -> float:
    """How far a line's loss rises above the chord between its ends (0 when it never does):
    ``max_i loss_i - ((1 - alpha_i) loss_0 + alpha_i loss_1)``, alphas from 0 to 1."""
    y0, y1 = losses[0], losses[-1]
    return max(0.0, *(y - ((1 - x) * y0 + x * y1) for x, y in zip(alphas, losses, strict=True)))


def weight_figures(
    pivot: str,
    targets: Mapping[str, str],
    rows: Sequence[dict],
    alphas: Sequence[float] = ALPHAS,
) -> dict:
    """The figures for a pivot and its targets (name -> model folder), with the held-out loss
    (nats/char, ``fusechat.heldout``) of ``rows`` along pivot -> each target and along each
    pair of targets. Every model must have the pivot's shapes (pairwise fusion's targets do)."""
    from fusechat.data import load_model, load_tokenizer
    from fusechat.heldout import nll_per_char

    tokenizer = load_tokenizer(pivot)
    model = load_model(pivot, dtype=torch.float32)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    states = {n: load_model(p, dtype=torch.float32).state_dict() for n, p in targets.items()}
    memo: dict[tuple, float] = {}

    def loss_at(key: tuple, state: State) -> float:
        if key not in memo:  # the ends of the lines are shared
            model.load_state_dict(state)
            memo[key] = nll_per_char(model, tokenizer, rows, "tokenizer")
        return memo[key]

    def line(a_name: str, b_name: str) -> list[float]:
        a = base if a_name == "pivot" else states[a_name]
        b = states[b_name]
        ends = {0.0: a_name, 1.0: b_name}
        return [loss_at((ends.get(x, f"{a_name}->{b_name}@{x}"),), lerp(a, b, x)) for x in alphas]

    names = list(states)
    out: dict = {**figures(delta_sums(base, states)), "alphas": list(alphas), "lines": {}}
    for n in names:
        out["lines"][f"pivot->{n}"] = line("pivot", n)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            out["lines"][f"{a}->{b}"] = line(a, b)
    out["barrier"] = {k: barrier(alphas, v) for k, v in out["lines"].items()}
    model.load_state_dict(base)
    log.info("weight space: relative deltas %s; delta cosines %s",
             out["relative_delta"], out["delta_cosine"])  # fmt: skip
    return out

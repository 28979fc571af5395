"""The study's statistics, pure: paired gains over (world, seed) pairs with t intervals,
means and deviations, token efficiency, pooled weight-space figures, budgets. Tested on
hand-made run summaries."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)

NLL = "nll/char"


def mean_std(values: Sequence[float]) -> dict:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "n": len(v)}  # fmt: skip


def tokens_to_reach(tokens: Sequence[float], losses: Sequence[float], level: float) -> float | None:
    """The first number of training tokens at which a held-out curve reaches ``level``
    (linear between measured points), or None if it never does."""
    t, y = np.asarray(tokens, float), np.asarray(losses, float)
    for i in range(len(y)):
        if y[i] <= level:
            if i == 0:
                return float(t[0])
            frac = (y[i - 1] - level) / (y[i - 1] - y[i])
            return float(t[i - 1] + frac * (t[i] - t[i - 1]))
    return None


def token_efficiency(clm: dict, fused: dict) -> float | None:
    """``T_clm / T_fused``: tokens the CLM curve takes to reach its final held-out loss over the
    tokens the fused curve takes to reach that loss (None where it never does)."""
    level = clm["loss"][-1]
    t_fused = tokens_to_reach(fused["tokens"], fused["loss"], level)
    t_clm = tokens_to_reach(clm["tokens"], clm["loss"], level)
    if t_fused is None or not t_fused or t_clm is None:
        return None
    return t_clm / t_fused


def paired(diffs: Sequence[float], confidence: float = 0.95) -> dict:
    """Paired differences over (world, seed) pairs: their mean, the t interval
    ``mean ± t_{(1 + c) / 2, n - 1} * s / sqrt(n)`` (s: sample deviation, ddof 1), the pairs
    won (difference > 0) and n. One pair has no interval (None): no verdict from one run."""
    from scipy.stats import t as student

    d = np.asarray(diffs, dtype=np.float64)
    n = len(d)
    out = {"mean": float(d.mean()), "ci": None, "won": int((d > 0).sum()), "n": n,
           "per_pair": d.tolist()}  # fmt: skip
    if n > 1:
        half = float(student.ppf((1 + confidence) / 2, n - 1) * d.std(ddof=1) / np.sqrt(n))
        out["ci"] = [out["mean"] - half, out["mean"] + half]
    return out


def above_zero(p: dict) -> bool | None:
    """The interval lies above 0 (None without an interval)."""
    return None if p["ci"] is None else p["ci"][0] > 0


def _gains(runs: dict, better: str, worse: str, key: str = NLL) -> list[float]:
    """Per pair, ``worse - better`` in nats/char (positive: ``better`` is better)."""
    return [r["scores"][worse][key] - r["scores"][better][key] for r in runs.values()]


def _weights(runs: dict) -> dict:
    """The weight-space figures of every pair (``weightspace.weight_figures``), pooled: mean
    and deviation of each relative delta, delta cosine and barrier, and each line's mean."""
    figs = [r["weights"] for r in runs.values() if r.get("weights")]
    if not figs:
        return {}
    out: dict = {"alphas": figs[0]["alphas"]}
    for kind in ("relative_delta", "delta_cosine", "barrier"):
        out[kind] = {k: mean_std([f[kind][k] for f in figs]) for k in figs[0][kind]}
    out["lines"] = {k: np.mean([f["lines"][k] for f in figs], 0).tolist() for k in figs[0]["lines"]}
    return out


def analyse(runs: dict) -> dict:
    """The study's figures from one ``fusechat run`` summary per (world, seed) pair (with
    curves as ``summary["curves"][model]`` and weight-space figures as
    ``summary["weights"]``). Every comparison is paired: the same pair's CLM baseline,
    targets and merges saw the same world, rows, order, steps and seed. Pure: tested on
    hand-made summaries."""
    first = next(iter(runs.values()))
    roles = {n: m["role"] for n, m in first["models"].items()}
    models = {}
    for name in first["scores"]:
        per = [r["scores"][name] for r in runs.values() if name in r["scores"]]
        models[name] = {"role": roles.get(name, ""),
                        **{k: mean_std([p[k] for p in per]) for k in per[0]}}  # fmt: skip
    clm = next((n for n, r in roles.items() if r == "clm"), None)
    targets = [n for n, r in roles.items() if r == "target"]
    merges = [n for n, r in roles.items() if r == "merge"]
    out: dict = {"pairs": list(map(str, runs)), "models": models, "clm": clm, "targets": {},
                 "weights": _weights(runs)}  # fmt: skip
    if clm is None:
        return out
    skills = sorted(k for k in first["scores"][clm] if k.startswith(f"{NLL} "))
    for t in targets:
        ratios = [token_efficiency(r["curves"][clm], r["curves"][t]) for r in runs.values()
                  if r.get("curves", {}).get(clm) and r["curves"].get(t)]  # fmt: skip
        reached = [x for x in ratios if x is not None]
        gain = paired(_gains(runs, t, clm))
        out["targets"][t] = {
            "vs_clm": gain,
            "beats_clm": above_zero(gain),
            # where the target's gain lies: its source's skill, if fusion carried it over
            "by_skill": _by_skill(runs, t, clm, skills),
            "token_efficiency": mean_std(reached) if reached else None,
            "token_efficiency_per_pair": ratios,
        }
    control = next((n for n, r in roles.items() if r == "control"), None)
    if control:  # what the sources add over the pivot's own distributions
        out["control"] = _control(runs, control, clm, targets, merges, skills)
    best = min(targets, key=lambda t: models[t][NLL]["mean"]) if targets else None
    implicit = [n for n, r in roles.items() if r == "implicit"]
    out["implicit"] = {m: _implicit(runs, m, clm, best, merges, skills) for m in implicit}
    out["budget"] = budget(runs)
    if targets:
        out["best_target"] = best
        out["merges"] = {}
        for m in merges:
            vs_clm, vs_best = paired(_gains(runs, m, clm)), paired(_gains(runs, m, best))
            out["merges"][m] = {
                "vs_clm": vs_clm,
                "beats_clm": above_zero(vs_clm),
                "vs_best_target": vs_best,
                # as good as the best target: the interval of its gain over it reaches 0
                "at_least_as_good": None if vs_best["ci"] is None else vs_best["ci"][1] >= 0,
            }
    return out


def _by_skill(runs: dict, better: str, worse: str, skills: Sequence[str]) -> dict:
    """Mean paired gain of ``better`` over ``worse`` per skill (``nll/char SKILL`` keys)."""
    return {k[len(NLL) + 1 :]: paired(_gains(runs, better, worse, k))["mean"] for k in skills}


def _control(runs: dict, control: str, clm: str, targets: list, merges: list, skills: list) -> dict:
    """The self-distillation control against CLM; each target and merge against it."""
    return {
        "name": control,
        "vs_clm": paired(_gains(runs, control, clm)),
        "targets": {t: {"vs_control": paired(_gains(runs, t, control)),
                        "by_skill": _by_skill(runs, t, control, skills)} for t in targets},
        "merges": {m: paired(_gains(runs, m, control)) for m in merges},
    }  # fmt: skip


def _implicit(runs: dict, m: str, clm: str, best: str | None, merges: list, skills: list) -> dict:
    """Implicit fusion (FuseChat-3.0) on the same pairs: against CLM, the best explicit target
    and each merge."""
    return {"vs_clm": paired(_gains(runs, m, clm)),
            "vs_best_target": best and paired(_gains(runs, m, best)),
            "vs_merges": {g: paired(_gains(runs, m, g)) for g in merges},
            "by_skill": _by_skill(runs, m, clm, skills)}  # fmt: skip


def same_tokens(runs: dict[int, dict], clm: str | None) -> bool:
    """Fairness check: in every seed, each fused target's curve was measured at the same
    numbers of training tokens as the CLM baseline's (same rows, same order)."""
    for r in runs.values():
        curves = r.get("curves", {})
        base = curves.get(clm)
        for name, cur in curves.items():
            if base and cur and name != clm and cur["tokens"] != base["tokens"]:
                return False
    return True


def budget(runs: dict) -> dict:
    """What each produced model cost, mean over pairs, from its steps' records
    (``summary["budget"]``): tokens generated by sampling, rows, pairs and optimizer steps
    trained, seconds of each stage (as first run: a cached step keeps its time)."""
    per: dict[str, dict[str, list]] = {}
    for r in runs.values():
        for label, stats in r.get("budget", {}).items():
            for k, v in stats.items():
                per.setdefault(label, {}).setdefault(k, []).append(v)
    return {label: {k: round(float(np.mean(v)), 1) for k, v in d.items()}
            for label, d in per.items()}  # fmt: skip

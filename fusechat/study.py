"""``fusechat study RECIPE --seeds 0 1 2``: does fusion beat plain fine-tuning, over seeds?

The recipe runs once per seed (``--set seed=N``; captures, alignments and fused targets do not
depend on the seed and are shared). Every run is fair by construction: the CLM baseline and the
fused targets train on the same rows in the same order, for the same steps, learning rate and
seed; the held-out questions are never trained on. The study reports, per model, the mean and
standard deviation over seeds of held-out nats/char and the judge average; per pairwise target
its gain over the CLM baseline against twice the larger of the two standard deviations; the
VaRM merge against the best pairwise target; and the token-efficiency ratio (FuseLLM's: the
training tokens the CLM baseline needs to reach its final held-out loss, over the tokens the
fused target needs to reach the same), read from the held-out curves that training logs
(``train.heldout``, ``train.eval_steps``). ``study.png`` plots those curves with seed bands.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fusechat.errors import FusechatError
from fusechat.io import write_atomic, write_json

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


def read_curve(model_dir: str | Path) -> dict | None:
    """The held-out curve a training run logged: ``{"tokens": [...], "loss": [...]}``."""
    path = Path(model_dir) / "train_log.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    pts = sorted(
        {
            r["step"]: (r["tokens"], r["heldout_nll_per_char"])
            for r in rows
            if "heldout_nll_per_char" in r
        }.items()  # fmt: skip
    )
    if not pts:
        return None
    return {"steps": [s for s, _ in pts], "tokens": [t for _, (t, _) in pts],
            "loss": [v for _, (_, v) in pts]}  # fmt: skip


def analyse(runs: dict[int, dict]) -> dict:
    """The study's figures from one ``fusechat run`` summary per seed (with curves added as
    ``summary["curves"][model]``). Pure: tested on hand-made summaries."""
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
    out: dict = {"seeds": sorted(runs), "models": models, "clm": clm, "targets": {}}
    if clm is None:
        return out
    c = models[clm][NLL]
    for t in targets:
        m = models[t][NLL]
        threshold = 2 * max(c["std"], m["std"])
        ratios = [token_efficiency(r["curves"][clm], r["curves"][t]) for r in runs.values()
                  if r.get("curves", {}).get(clm) and r["curves"].get(t)]  # fmt: skip
        reached = [x for x in ratios if x is not None]
        out["targets"][t] = {
            "gain": c["mean"] - m["mean"],
            "threshold": threshold,
            "beats_clm": c["mean"] - m["mean"] > threshold,
            "token_efficiency": mean_std(reached) if reached else None,
            "token_efficiency_per_seed": ratios,
        }
    if targets:
        best = min(targets, key=lambda t: models[t][NLL]["mean"])
        out["best_target"] = best
        out["merges"] = {
            mname: {"vs_best_target": models[best][NLL]["mean"] - models[mname][NLL]["mean"],
                    "at_least_as_good": models[mname][NLL]["mean"] <= models[best][NLL]["mean"]}
            for mname in merges
        }  # fmt: skip
    return out


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


def format_table(result: dict) -> str:
    ms = result["models"]
    width = max(len(n) for n in ms) + 2
    lines = [f"{'model'.ljust(width)}{'role':>8}{'nats/char':>22}{'judge average':>20}"]
    for name, m in ms.items():
        n, a = m[NLL], m.get("average", {"mean": float("nan"), "std": 0.0})
        lines.append(f"{name.ljust(width)}{m['role']:>8}{n['mean']:>13.4f} ± {n['std']:.4f}"
                     f"{a['mean']:>12.2f} ± {a['std']:.2f}")  # fmt: skip
    skills = sorted(k for k in next(iter(ms.values()), {}) if k.startswith(f"{NLL} "))
    if skills and result.get("clm"):  # where the gains are: each target against CLM, by skill
        lines.append("nats/char by skill: " + ", ".join(k[len(NLL) + 1 :] for k in skills))
        for name in [result["clm"], *result["targets"]]:
            cells = [f"{ms[name][k]['mean']:.4f} ± {ms[name][k]['std']:.4f}" for k in skills]
            lines.append(f"  {name.ljust(width)}" + "   ".join(cells))
    for t, r in result["targets"].items():
        te = r["token_efficiency"]
        eff = f"{te['mean']:.2f}x ± {te['std']:.2f}" if te else "not reached"
        lines.append(f"{t}: gain over CLM {r['gain']:+.4f} nats/char (2 x max std "
                     f"{r['threshold']:.4f}: {'beats' if r['beats_clm'] else 'does not beat'} "
                     f"CLM); token efficiency {eff}")  # fmt: skip
    for mname, r in result.get("merges", {}).items():
        lines.append(f"{mname}: {r['vs_best_target']:+.4f} nats/char vs the best pairwise target "
                     f"({result['best_target']})")  # fmt: skip
    return "\n".join(lines)


def plot(runs: dict[int, dict], result: dict, png: Path) -> None:
    """Held-out loss against training tokens: mean over seeds with a one-std band, the CLM
    baseline and every pairwise target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in [result["clm"], *result["targets"]]:
        curves = [r["curves"][name] for r in runs.values() if r.get("curves", {}).get(name)]
        if not curves:
            continue
        n = min(len(c["loss"]) for c in curves)
        tok = np.mean([c["tokens"][:n] for c in curves], 0)
        y = np.array([c["loss"][:n] for c in curves])
        label = "CLM baseline" if name == result["clm"] else name
        ax.plot(tok, y.mean(0), label=label, lw=2 if name == result["clm"] else 1.5)
        ax.fill_between(tok, y.mean(0) - y.std(0), y.mean(0) + y.std(0), alpha=0.2)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out loss (nats/char)")
    ax.set_title(f"held-out loss over {len(runs)} seeds (band: ±1 std)")
    ax.legend()
    lo = min(min(c["loss"]) for r in runs.values() for c in r.get("curves", {}).values() if c)
    ax.set_ylim(bottom=lo * 0.95, top=lo * 2.0)
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")  # written whole, then renamed
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(png)


def run_study(recipe: str, seeds: Sequence[int], overrides: Sequence[str] = ()) -> dict:
    """Run the recipe once per seed and analyse (writes ``study.json`` and ``study.png`` under
    the recipe's run folder, in a folder named after the overrides)."""
    from fusechat.io import fingerprint
    from fusechat.recipe import expand, load_recipe
    from fusechat.run import format_summary, run_recipe

    if not seeds:
        raise FusechatError("study: give at least one seed (--seeds 0 1 2)")
    if any(o.split("=", 1)[0].strip() == "seed" for o in overrides):
        raise FusechatError("study: the seeds come from --seeds, not --set seed=...")
    r = load_recipe(recipe, overrides)
    if r.train.heldout is None or r.train.eval_steps <= 0:
        log.warning("train.heldout/eval_steps unset: no held-out curves, no token efficiency")
    runs = {}
    for seed in seeds:
        log.info("study: seed %d", seed)
        summary = run_recipe(recipe, overrides=[*overrides, f"seed={seed}"], quiet=True)
        summary["curves"] = {n: read_curve(m["path"]) for n, m in summary["models"].items()
                             if m["role"] in ("clm", "target")}  # fmt: skip
        print(f"seed {seed}:\n{format_summary(summary)}")
        runs[seed] = summary
    result = analyse(runs)
    result["same_tokens_per_step"] = same_tokens(runs, result["clm"])
    result["overrides"] = list(overrides)
    paths = sorted(m["path"] for r in runs.values() for m in r["models"].values())
    folder = (
        Path(expand(r.run_dir))
        / r.name
        / "study"
        # named by what was run (the models' folders carry their step keys): a study of a
        # changed recipe never overwrites the report of another
        / f"study-{fingerprint([list(overrides), sorted(seeds), paths])[:10]}"
    )
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "study.json", {**result, "runs": {str(k): v for k, v in runs.items()}})
    if any(r.get("curves") for r in runs.values()) and result["clm"]:
        plot(runs, result, folder / "study.png")
        result["plot"] = str(folder / "study.png")
    write_atomic(folder / "table.txt", format_table(result) + "\n")
    result["folder"] = str(folder)
    return result

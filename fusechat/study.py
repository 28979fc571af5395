"""``fusechat study RECIPE --worlds 3 --seeds 0 1 2 3 4``: does fusion beat plain fine-tuning,
and merging beat fusion, over toy worlds and seeds?

The recipe runs once per (world, seed) pair (``--set seed=N``; captures, alignments and fused
targets do not depend on the seed and are shared). Every run is fair by construction: the CLM
baseline and the fused targets train on the same rows in the same order, for the same steps,
learning rate and seed; the held-out questions are never trained on. Every comparison is
paired by (world, seed): per pairwise target its gain over the CLM baseline, per merge its gain
over CLM and over the best pairwise target, each as the mean of the pairs' differences with a
95% paired t interval and the pairs won; per model the mean and deviation of held-out nats/char
(by skill) and the judge average; the token-efficiency ratio (FuseLLM's: the training tokens the
CLM baseline needs to reach its final held-out loss, over the tokens the fused target needs to
reach the same), read from the held-out curves that training logs (``train.heldout``,
``train.eval_steps``); and the weight-space figures (``fusechat.weightspace``). ``study.png``
plots the curves with bands and the interpolation lines.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fusechat.cards import study_card, write_card
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
            "by_skill": {
                k[len(NLL) + 1 :]: paired(_gains(runs, t, clm, k))["mean"] for k in skills
            },  # fmt: skip
            "token_efficiency": mean_std(reached) if reached else None,
            "token_efficiency_per_pair": ratios,
        }
    control = next((n for n, r in roles.items() if r == "control"), None)
    if control:  # what the sources add over the pivot's own distributions
        out["control"] = {
            "name": control,
            "vs_clm": paired(_gains(runs, control, clm)),
            "targets": {t: {"vs_control": paired(_gains(runs, t, control)),
                            "by_skill": {k[len(NLL) + 1 :]: paired(_gains(runs, t, control, k))["mean"]
                                         for k in skills}}
                        for t in targets},
            "merges": {m: paired(_gains(runs, m, control)) for m in merges},
        }  # fmt: skip
    best = min(targets, key=lambda t: models[t][NLL]["mean"]) if targets else None
    # implicit fusion (FuseChat-3.0) on the same pairs: against CLM, the best explicit target
    # and each merge
    out["implicit"] = {
        m: {"vs_clm": paired(_gains(runs, m, clm)),
            "vs_best_target": best and paired(_gains(runs, m, best)),
            "vs_merges": {g: paired(_gains(runs, m, g)) for g in merges},
            "by_skill": {k[len(NLL) + 1 :]: paired(_gains(runs, m, clm, k))["mean"]
                         for k in skills}}
        for m in (n for n, r in roles.items() if r == "implicit")
    }  # fmt: skip
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


def _paired_text(p: dict) -> str:
    ci = (
        "no interval (one pair)"
        if p["ci"] is None
        else f"95% CI [{p['ci'][0]:+.4f}, {p['ci'][1]:+.4f}]"
    )
    return f"{p['mean']:+.4f} nats/char, {ci}, won {p['won']} of {p['n']}"


def _verdict(v: bool | None, yes: str, no: str) -> str:
    return "no verdict from one pair" if v is None else (yes if v else no)


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


def format_table(result: dict) -> str:
    ms = result["models"]
    width = max(len(n) for n in ms) + 2
    lines = [f"{len(result['pairs'])} (world, seed) pairs: {', '.join(result['pairs'])}",
             f"{'model'.ljust(width)}{'role':>8}{'nats/char':>22}{'judge average':>20}"]  # fmt: skip
    for name, m in ms.items():
        n, a = m[NLL], m.get("average", {"mean": float("nan"), "std": 0.0})
        lines.append(f"{name.ljust(width)}{m['role']:>8}{n['mean']:>13.4f} ± {n['std']:.4f}"
                     f"{a['mean']:>12.2f} ± {a['std']:.2f}")  # fmt: skip
    skills = sorted(k for k in next(iter(ms.values()), {}) if k.startswith(f"{NLL} "))
    if skills:  # where the gains are: every model by skill
        lines.append("nats/char by skill: " + ", ".join(k[len(NLL) + 1 :] for k in skills))
        for name in ms:
            cells = [f"{ms[name][k]['mean']:.4f} ± {ms[name][k]['std']:.4f}" for k in skills]
            lines.append(f"  {name.ljust(width)}" + "   ".join(cells))
    lines.append("paired gains (positive: better than the reference, in the same pair):")
    for t, r in result["targets"].items():
        te = r["token_efficiency"]
        eff = f"{te['mean']:.2f}x ± {te['std']:.2f}" if te else "not reached"
        skill = max(r["by_skill"], key=r["by_skill"].get) if r["by_skill"] else None
        lines.append(f"  {t} over CLM: {_paired_text(r['vs_clm'])}: "
                     f"{_verdict(r['beats_clm'], 'beats CLM', 'does not beat CLM')}; "
                     f"token efficiency {eff}" + (f"; largest gain on {skill}" if skill else ""))  # fmt: skip
    for m, r in result.get("merges", {}).items():
        lines.append(f"  {m} over CLM: {_paired_text(r['vs_clm'])}: "
                     f"{_verdict(r['beats_clm'], 'beats CLM', 'does not beat CLM')}")  # fmt: skip
        lines.append(f"  {m} over the best target ({result['best_target']}): "
                     f"{_paired_text(r['vs_best_target'])}: "
                     f"{_verdict(r['at_least_as_good'], 'at least as good', 'worse')}")  # fmt: skip
    for m, r in result.get("implicit", {}).items():
        skills = ", ".join(f"{k} {v:+.4f}" for k, v in r["by_skill"].items())
        lines.append(f"  {m} (implicit) over CLM: {_paired_text(r['vs_clm'])}"
                     + (f"; by skill {skills}" if skills else ""))  # fmt: skip
        if r["vs_best_target"]:
            lines.append(f"  {m} (implicit) over the best target ({result['best_target']}): "
                         f"{_paired_text(r['vs_best_target'])}")  # fmt: skip
        for g, v in r["vs_merges"].items():
            lines.append(f"  {m} (implicit) over {g}: {_paired_text(v)}")
    if result.get("implicit") and result.get("budget"):
        lines.append("budget (mean per pair): " + "; ".join(
            f"{k} " + ", ".join(f"{n} {v:g}" for n, v in d.items())
            for k, d in result["budget"].items()))  # fmt: skip
    c = result.get("control")
    if c:
        lines.append(
            f"  {c['name']} (the pivot its own source) over CLM: {_paired_text(c['vs_clm'])}"
        )
        for t, r in c["targets"].items():
            skill = max(r["by_skill"], key=r["by_skill"].get) if r["by_skill"] else None
            lines.append(f"  {t} over {c['name']}: {_paired_text(r['vs_control'])}"
                         + (f"; largest gain on {skill}" if skill else ""))  # fmt: skip
        for m, r in c["merges"].items():
            lines.append(f"  {m} over {c['name']}: {_paired_text(r)}")
    w = result.get("weights")
    if w:
        rel = ", ".join(f"{k} {v['mean']:.3f}" for k, v in w["relative_delta"].items())
        cos = ", ".join(f"{k} {v['mean']:.3f}" for k, v in w["delta_cosine"].items())
        lines.append(f"weight space: relative delta from the pivot {rel}; delta cosine {cos}")
        for k, ys in w["lines"].items():
            pts = " ".join(f"{y:.4f}" for y in ys)
            lines.append(f"  held-out loss along {k} (alpha {w['alphas']}): {pts}; "
                         f"barrier {w['barrier'][k]['mean']:.4f}")  # fmt: skip
    return "\n".join(lines)


def plot(runs: dict, result: dict, png: Path) -> None:
    """Left: held-out loss against training tokens, mean over pairs with a one-std band, the
    CLM baseline and every pairwise target. Right (with weight-space figures): the held-out
    loss along the straight lines pivot -> target and target -> target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = result.get("weights")
    fig, axes = plt.subplots(1, 2 if w else 1, figsize=(12 if w else 7, 4), squeeze=False)
    ax = axes[0][0]
    lo = None
    for name in [
        result["clm"],
        *result["targets"],
        *[c["name"] for c in [result.get("control")] if c],
    ]:
        curves = [r["curves"][name] for r in runs.values() if r.get("curves", {}).get(name)]
        if not curves:
            continue
        n = min(len(c["loss"]) for c in curves)
        tok = np.mean([c["tokens"][:n] for c in curves], 0)
        y = np.array([c["loss"][:n] for c in curves])
        label = "CLM baseline" if name == result["clm"] else name
        ax.plot(tok, y.mean(0), label=label, lw=2 if name == result["clm"] else 1.5)
        ax.fill_between(tok, y.mean(0) - y.std(0), y.mean(0) + y.std(0), alpha=0.2)
        lo = min(float(y.min()), lo if lo is not None else np.inf)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out loss (nats/char)")
    ax.set_title(f"held-out loss over {len(runs)} pairs (band: ±1 std)")
    if lo is not None:
        ax.legend()
        ax.set_ylim(bottom=lo * 0.95, top=lo * 2.0)
    if w:
        ax = axes[0][1]
        for k, ys in w["lines"].items():
            ax.plot(w["alphas"], ys, marker="o", label=k)
        ax.set_xlabel("alpha along the line (0: its start, 1: its end)")
        ax.set_ylabel("held-out loss (nats/char)")
        ax.set_title("between the models, mean over pairs")
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")  # written whole, then renamed
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(png)


def world_folder(world: int) -> Path:
    """Where toy world ``world`` is built: the default ``toy`` for 0 (what ``make demo`` and
    the tests build), ``toy-world-N`` for the others."""
    from fusechat.io import cache_dir

    return cache_dir() / ("toy" if world == 0 else f"toy-world-{world}")


def world_overrides(raw: dict, world: int) -> list[str]:
    """``--set`` overrides that move every path of a recipe under the default toy world to
    toy world ``world`` (its models, corpus, held-out and question sets)."""
    from fusechat.recipe import expand

    root, new = str(world_folder(0)), str(world_folder(world))
    out: list[str] = []

    def walk(node: object, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")
        elif isinstance(node, str) and expand(node).startswith(root + "/"):
            out.append(f"{path}={new}{expand(node)[len(root) :]}")

    walk(raw, "")
    return out


CONTROL = "self-distillation"


def self_source(recipe: str, overrides: Sequence[str]) -> list[str]:
    """The overrides that make the pivot its only source: MinCE of two equal distributions is
    the pivot's own, so its target is plain self-distillation at the recipe's lambda, trained
    on the same rows, order, steps and seed as the pair's targets (and no merge: one target)."""
    from fusechat.recipe import load_recipe

    r = load_recipe(recipe, overrides)
    pivot = r.models.pivot
    # implicit fusion from the pivot alone is not this control: the pair's own run has it
    return [f"models.sources=[{{path: {json.dumps(pivot.resolved)}, name: {pivot.label}-self}}]",
            *(["implicit=null"] if r.implicit else [])]  # fmt: skip


def add_control(summary: dict, control: dict) -> None:
    """Put the control run's one target into the pair's summary as ``CONTROL`` (role
    ``control``), with its curve; its CLM baseline and pivot are the pair's own (the same
    steps, so the same cached folders)."""
    name = next(n for n, m in control["models"].items() if m["role"] == "target")
    summary["models"][CONTROL] = {**control["models"][name], "role": "control"}
    summary["scores"][CONTROL] = control["scores"][name]
    summary.setdefault("curves", {})[CONTROL] = read_curve(control["models"][name]["path"])


def _weight_figures(summary: dict, heldout: str, cache: Path) -> dict:
    """``weightspace.weight_figures`` for one run's pivot and pairwise targets, on the
    held-out set; cached by the models' and the set's identities."""
    from fusechat.conversations import load_conversations
    from fusechat.io import file_fingerprint, fingerprint, read_json
    from fusechat.weightspace import weight_figures

    models = summary["models"]
    pivot = next(m["path"] for m in models.values() if m["role"] == "pivot")
    targets = {n: m["path"] for n, m in models.items() if m["role"] == "target"}
    key = fingerprint([pivot, targets, file_fingerprint(heldout), "weights v1"])
    path = cache / f"weights-{key}.json"
    if path.exists():
        return read_json(path)
    convs, _ = load_conversations(heldout)
    figs = weight_figures(pivot, targets, [{"messages": c} for c in convs])
    write_json(path, figs)
    return figs


def run_study(
    recipe: str,
    seeds: Sequence[int],
    overrides: Sequence[str] = (),
    worlds: Sequence[int] = (),
    self_distillation: bool = False,
) -> dict:
    """Run the recipe once per (world, seed) pair and analyse (writes ``study.json``,
    ``table.txt`` and ``study.png`` under the recipe's run folder, in a folder named after
    what was run). ``worlds``: toy world seeds, each built here (cached) and the recipe's toy
    paths moved to it; none: the recipe as it is, one world. ``self_distillation``: also run
    each pair with the pivot as its only source (``self_source``), the control that tells
    what the sources add over the pivot's own distributions."""
    from fusechat.io import fingerprint
    from fusechat.recipe import expand, load_recipe, read_yaml
    from fusechat.run import format_summary, run_recipe

    if not seeds:
        raise FusechatError("study: give at least one seed (--seeds 0 1 2)")
    if len(set(seeds)) != len(seeds) or len(set(worlds)) != len(worlds):
        raise FusechatError("study: seeds and worlds must be distinct (a repeat is the same run)")
    if any(o.split("=", 1)[0].strip() == "seed" for o in overrides):
        raise FusechatError("study: the seeds come from --seeds, not --set seed=...")
    r = load_recipe(recipe, overrides)
    per_world = {None: []} if not worlds else {}
    for w in worlds:
        per_world[w] = world_overrides(read_yaml(recipe, "recipe"), w)
        if not per_world[w]:
            raise FusechatError(f"{recipe}: --worlds needs a recipe on the toy world (paths "
                                f"under {world_folder(0)})")  # fmt: skip
    if r.train.heldout is None or r.train.eval_steps <= 0:
        log.warning("train.heldout/eval_steps unset: no held-out curves, no token efficiency")
    root = Path(expand(r.run_dir)) / r.name / "study"
    runs = {}
    for w, moved in per_world.items():
        if w is not None:
            from fusechat.toy.build import ToyConfig, build_toy_world

            log.info("study: toy world %d in %s", w, world_folder(w))
            build_toy_world(world_folder(w), ToyConfig(seed=w))
        heldout = load_recipe(recipe, [*overrides, *moved]).train.heldout  # this world's
        for seed in seeds:
            label = f"w{w}/s{seed}" if w is not None else str(seed)
            log.info("study: %s", label)
            ov = [*overrides, *moved, f"seed={seed}"]
            summary = run_recipe(recipe, overrides=ov, quiet=True)
            summary["curves"] = {n: read_curve(m["path"]) for n, m in summary["models"].items()
                                 if m["role"] in ("clm", "target")}  # fmt: skip
            if heldout:
                summary["weights"] = _weight_figures(summary, expand(heldout), root)
            if self_distillation:
                add_control(summary, run_recipe(recipe, overrides=[*ov, *self_source(recipe, ov)],
                                                quiet=True))  # fmt: skip
            print(f"{label}:\n{format_summary(summary)}")
            runs[label] = summary
    result = analyse(runs)
    result["same_tokens_per_step"] = same_tokens(runs, result["clm"])
    result["overrides"] = list(overrides)
    result["worlds"] = list(worlds)
    paths = sorted(m["path"] for r in runs.values() for m in r["models"].values())
    # named by what was run (the models' folders carry their step keys): a study of a
    # changed recipe never overwrites the report of another
    folder = (
        root / f"study-{fingerprint([list(overrides), list(runs), paths, self_distillation])[:10]}"
    )
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "study.json", {**result, "runs": runs})
    if result["clm"] and (result["weights"] or any(
            c for r in runs.values() for c in r.get("curves", {}).values())):  # fmt: skip
        plot(runs, result, folder / "study.png")
        result["plot"] = str(folder / "study.png")
    write_atomic(folder / "table.txt", format_table(result) + "\n")
    write_card(folder, study_card(folder.name, recipe, result, format_table(result)))
    result["folder"] = str(folder)
    return result

"""What a study shows: its table (``format_table``) and its plot (``study.png``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fusechat.study.stats import NLL


def _paired_text(p: dict) -> str:
    ci = (
        "no interval (one pair)"
        if p["ci"] is None
        else f"95% CI [{p['ci'][0]:+.4f}, {p['ci'][1]:+.4f}]"
    )
    return f"{p['mean']:+.4f} nats/char, {ci}, won {p['won']} of {p['n']}"


def _verdict(v: bool | None, yes: str, no: str) -> str:
    return "no verdict from one pair" if v is None else (yes if v else no)


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
    lines += _control_lines(result.get("control")) + _weight_lines(result.get("weights"))
    return "\n".join(lines)


def _control_lines(c: dict | None) -> list[str]:
    """The control's lines of the table: it against CLM, each target and merge against it."""
    lines: list[str] = []
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
    return lines


def _weight_lines(w: dict | None) -> list[str]:
    """The weight-space lines of the table: relative deltas, delta cosines, the loss along
    each line between two models."""
    lines: list[str] = []
    if w:
        rel = ", ".join(f"{k} {v['mean']:.3f}" for k, v in w["relative_delta"].items())
        cos = ", ".join(f"{k} {v['mean']:.3f}" for k, v in w["delta_cosine"].items())
        lines.append(f"weight space: relative delta from the pivot {rel}; delta cosine {cos}")
        for k, ys in w["lines"].items():
            pts = " ".join(f"{y:.4f}" for y in ys)
            lines.append(f"  held-out loss along {k} (alpha {w['alphas']}): {pts}; "
                         f"barrier {w['barrier'][k]['mean']:.4f}")  # fmt: skip
    return lines


# pragma: no mutate start (a picture: tests check it is written, not its pixels)
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


# pragma: no mutate end

"""``fusechat study``: the recipe over toy worlds and seeds, each pair's summary gathered
(curves, weight-space figures, the self-distillation control), then analysed and reported
in a folder named after what was run."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from fusechat.cards import study_card, write_card
from fusechat.errors import FusechatError
from fusechat.io import write_atomic, write_json
from fusechat.study.report import format_table, plot
from fusechat.study.stats import analyse, same_tokens

log = logging.getLogger(__name__)


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
    from fusechat.recipe import expand, load_recipe
    from fusechat.run import format_summary, run_recipe
    from fusechat.yamlfile import read_yaml

    _check_pairs(seeds, worlds, overrides)
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
    folder = _write_report(root, recipe, runs, result, overrides, self_distillation)
    result["folder"] = str(folder)
    return result


def _check_pairs(seeds: Sequence[int], worlds: Sequence[int], overrides: Sequence[str]) -> None:
    if not seeds:
        raise FusechatError("study: give at least one seed (--seeds 0 1 2)")
    if len(set(seeds)) != len(seeds) or len(set(worlds)) != len(worlds):
        raise FusechatError("study: seeds and worlds must be distinct (a repeat is the same run)")
    if any(o.split("=", 1)[0].strip() == "seed" for o in overrides):
        raise FusechatError("study: the seeds come from --seeds, not --set seed=...")


def _write_report(root: Path, recipe: str, runs: dict, result: dict, overrides: Sequence[str],
                  self_distillation: bool) -> Path:  # fmt: skip
    """``study.json`` (the figures and every pair's summary), ``study.png``, ``table.txt`` and
    the model card, in a folder named after what was run; the folder."""
    from fusechat.io import fingerprint

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
    return folder

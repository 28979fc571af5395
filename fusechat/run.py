"""``fusechat run RECIPE.yaml``: the whole method, stage by stage, each stage cached by its key.

capture (pivot and every source) -> align (each source to the pivot) -> fuse (pairwise) ->
train (one target per source; optionally the CLM-only baseline) -> merge (each method) ->
eval (every model). A step's key is its own settings plus the keys of its inputs, and its output
folder is named after the key: a rerun finds finished steps (skipped), interrupted ones (the
stage resumes) and, when a setting changes, new keys for that step and everything downstream.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from fusechat.configs import (
    CaptureConfig,
    CaptureSettings,
    DataSpec,
    ModelSettings,
    TrainConfig,
    TrainSettings,
)
from fusechat.errors import FusechatError, first_line
from fusechat.implicit.settings import DpoConfig, SampleConfig, SftConfig
from fusechat.io import (
    file_fingerprint,
    fingerprint,
    is_hub_id,
    model_fingerprint,
    read_json,
    read_manifest,
    write_json,
)
from fusechat.recipe import Recipe, expand, load_recipe
from fusechat.steps import STAGES as STAGE_KINDS
from fusechat.steps import (
    CaptureStep,
    DpoStep,
    EvalStep,
    MergeStep,
    PairsStep,
    SampleStep,
    ScoreStep,
    SftStep,
    Step,
    TrainStep,
    run_step,
)

log = logging.getLogger(__name__)
STAGES = tuple(STAGE_KINDS)  # pipeline order


def check_merge(recipe: Recipe, source: str) -> None:
    """Every merge method of the recipe and its parameters, through mergekit's declarations."""
    from fusechat.merge.checks import check_method

    for i, m in enumerate(recipe.merge.methods if recipe.merge else []):
        check_method(m.method, m.parameters, m.model_parameters, f"{source}: merge.methods[{i}]")


def check_models(recipe: Recipe, network: bool = True) -> None:
    """Every model must be a local folder or a hub id that resolves (checked online unless
    ``network`` is False, as in a dry run): one line otherwise."""
    from transformers import AutoConfig

    named = [(f"models: {m.label}", m.path) for m in recipe.models.all]
    if recipe.implicit and recipe.implicit.score.reward_model:
        named.append(("implicit.score.reward_model", recipe.implicit.score.reward_model))
    for where, path in named:
        if Path(expand(path)).is_dir():
            continue
        if not is_hub_id(path):
            raise FusechatError(f"{where}: {expand(path)}: no such folder")
        if not network:
            continue
        try:
            AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise FusechatError(f"{where}: {path}: unreachable ({first_line(e)})") from None


def _rendering(recipe: Recipe) -> tuple[str, str | None]:
    """FuseChat renders every model's input in the pivot's format: a named template, or the
    pivot tokenizer's chat template (and special tokens) rendering the text for every model."""
    tpl = recipe.render_template
    return tpl, (recipe.models.pivot.resolved if tpl == "tokenizer" else None)


def _data_id(path: str, field: str = "data.path") -> str:
    data_path = expand(path)
    if Path(data_path).exists():
        return file_fingerprint(data_path)
    if is_hub_id(path):
        return fingerprint({"hub": path})  # a hub dataset, loaded by datasets
    raise FusechatError(f"{field}: {data_path}: corpus not found")


def _corpus(recipe: Recipe, path: str) -> DataSpec:
    """The recipe's corpus settings (format, rows, strictness) read at ``path``, expanded."""
    data = DataSpec(**recipe.data.model_dump(include=set(DataSpec.model_fields)))
    return data.model_copy(update={"path": expand(path)})


def _captures(recipe: Recipe, root: Path, ids: dict[str, str]) -> dict[str, Step]:
    """One capture per model, every input rendered in the pivot's format."""
    template, render_with = _rendering(recipe)
    pivot = recipe.models.pivot.label
    data, data_id, c = _corpus(recipe, recipe.data.path), _data_id(recipe.data.path), recipe.capture
    shared = c.model_dump(include=set(CaptureSettings.model_fields))
    caps = {}
    # without explicit fusion only the pivot's capture is needed (the CLM baseline's data)
    for m in recipe.models.all if recipe.explicit else [recipe.models.pivot]:
        # the pivot's candidates are its own tokens: nothing to map, no lookahead
        cfg = CaptureConfig(**shared, **m.model_dump(include=set(ModelSettings.model_fields)),
                            model=m.resolved, template=template, render_with=render_with)  # fmt: skip
        if m.label == pivot:
            cfg = cfg.model_copy(update={"lookahead": 0})
        settings = CaptureStep(config=cfg, data=data, processes=c.processes,
                               model_id=ids[m.label], data_id=data_id,
                               render_id=ids[pivot] if render_with else None)  # fmt: skip
        caps[m.label] = Step("capture", m.label, settings, root=root)
    return caps


def _trains(recipe: Recipe, root: Path, ids: dict, pcap: Step, fused: dict) -> dict[str, Step]:
    """One target per source, plus the CLM-only baseline (lambda 1 on the pivot's capture)."""
    t, pivot = recipe.train, recipe.models.pivot
    heldout = expand(t.heldout) if t.heldout else None
    if heldout and not Path(heldout).exists():
        raise FusechatError(f"train.heldout: {heldout}: not found")
    jobs = [(f"{pivot.label}--{s}", fused[s], t.lam) for s in fused]
    if t.clm_baseline:
        jobs.append((f"{pivot.label}-clm", pcap, 1.0))
    steps = {}
    for name, data, lam in jobs:
        # the seed orders the data and initialises LoRA, so each seed is another run
        cfg = TrainConfig(**{**t.model_dump(include=set(TrainSettings.model_fields)),
                             "lam": lam, "heldout": heldout, "seed": recipe.seed})  # fmt: skip
        settings = TrainStep(config=cfg, pivot=pivot.resolved, pivot_id=ids[pivot.label],
                             heldout_id=file_fingerprint(heldout) if heldout else None,
                             launcher=t.launcher)  # fmt: skip
        steps[name] = Step("train", name, settings, (data,), root)
    return steps


def _evals(recipe: Recipe, root: Path, ids: dict, produced: list[tuple[Step, str]]) -> list[Step]:
    """Every model: the inputs by their fingerprints, the trained and merged ones by their
    steps."""
    e = recipe.eval
    qpath = expand(e.questions)
    qid = file_fingerprint(qpath) if Path(qpath).exists() else qpath
    pivot = recipe.models.pivot
    models = [(m.label, m.resolved, None, "pivot" if m is pivot else "source")
              for m in recipe.models.all]  # fmt: skip
    models += [(st.name, str(st.out), st, role) for st, role in produced]
    return [
        Step("eval", name, EvalStep(eval=e, model=path, model_id=ids.get(name), questions_id=qid),
             (producer,) if producer else (), root, role)
        for name, path, producer, role in models
    ]  # fmt: skip


def _implicit(recipe: Recipe, root: Path, ids: dict, merges: dict[str, Step]) -> list[Step]:
    """Implicit fusion (FuseChat-3.0): each sampling model's responses to the prompts, their
    rewards, the SFT set and pairs, then SFT of the pivot and one DPO run per starting model
    in ``implicit.dpo_from`` (the SFT model, the pivot, or a merge by its method's name:
    explicit, then DPO)."""
    im, pivot = recipe.implicit, recipe.models.pivot
    data = _corpus(recipe, im.prompts or recipe.data.path)
    data_id = _data_id(im.prompts or recipe.data.path, "implicit.prompts")
    samplers = [*([pivot] if im.include_pivot else []), *recipe.models.sources]
    samples = [
        Step("sample", m.label,
             SampleStep(config=SampleConfig(**im.sample.model_dump(), model=m.resolved,
                                            dtype=m.dtype),
                        data=data, model_id=ids[m.label], data_id=data_id), root=root)
        for m in samplers
    ]  # fmt: skip
    reward = im.score.reward_model and expand(im.score.reward_model)
    score = ScoreStep(config=im.score.model_copy(update={"reward_model": reward}),
                      reward_model_id=model_fingerprint(reward) if reward else None)  # fmt: skip
    scores = Step("score", pivot.label, score, tuple(samples), root)
    pairs = Step("pairs", pivot.label, PairsStep(config=im.pairs), (scores,), root)
    steps = [*samples, scores, pairs]
    start = {"model": pivot.resolved, "model_id": ids[pivot.label]}
    if im.sft is not None:
        sft = SftConfig(**im.sft.model_dump(), seed=recipe.seed)
        steps.append(Step("sft", f"{pivot.label}-sft", SftStep(config=sft, **start), (pairs,),
                          root))  # fmt: skip
    sft_step = steps[-1] if im.sft is not None else None
    dpo = DpoConfig(**im.dpo.model_dump(), seed=recipe.seed) if im.dpo is not None else None
    for origin in im.starts if dpo is not None else []:
        if origin == "pivot":
            steps.append(Step("dpo", f"{pivot.label}-dpo", DpoStep(config=dpo, **start),
                              (pairs,), root))  # fmt: skip
            continue
        first = sft_step if origin == "sft" else merges[origin]  # checked by the recipe
        steps.append(Step("dpo", f"{first.name}-dpo", DpoStep(config=dpo), (pairs, first),
                          root))  # fmt: skip
    return steps


def plan(recipe: Recipe, root: Path) -> list[Step]:
    """Every step of the recipe, in order, with keys and output folders; nothing runs."""
    ids = {m.label: model_fingerprint(m.resolved) for m in recipe.models.all}
    pivot = recipe.models.pivot
    # the pivot's capture is read by explicit fusion and by the CLM baseline, nothing else
    caps = _captures(recipe, root, ids) if recipe.explicit or recipe.train.clm_baseline else {}
    pcap = caps.get(pivot.label)
    sources = recipe.models.sources if recipe.explicit else []
    aligned = {s.label: Step("align", s.label, recipe.align, (pcap, caps[s.label]), root)
               for s in sources}  # fmt: skip
    fused = {n: Step("fuse", n, recipe.fuse, (pcap, al), root) for n, al in aligned.items()}
    targets = _trains(recipe, root, ids, pcap, fused) if pcap else {}
    # merge: each method over the fused targets (not the baseline), base = the pivot
    fusion = tuple(targets[f"{pivot.label}--{s.label}"] for s in sources)
    merges = {
        spec.name: Step("merge", f"{pivot.label}-{spec.name}",
                        MergeStep(spec=spec, dtype=recipe.merge.dtype, pivot=pivot.resolved,
                                  pivot_id=ids[pivot.label], seed=recipe.seed), fusion, root)
        for spec in (recipe.merge.methods if len(fusion) > 1 else [])
    }  # fmt: skip
    implicit = _implicit(recipe, root, ids, merges) if recipe.implicit else []
    steps = [*caps.values(), *aligned.values(), *fused.values(), *targets.values(),
             *merges.values(), *implicit]  # fmt: skip
    if recipe.eval.kind != "none":
        produced = [(st, "clm" if n == f"{pivot.label}-clm" else "target")
                    for n, st in targets.items()]  # fmt: skip
        produced += [(m, "merge") for m in merges.values()]
        produced += [(st, "implicit") for st in implicit if st.stage in ("sft", "dpo")]
        steps += _evals(recipe, root, ids, produced)
    return steps


# --------------------------------------------------------------------------- running


def run_root(recipe: Recipe) -> Path:
    """The run's folder: every step's output lies below it."""
    return Path(expand(recipe.run_dir)) / recipe.name


def _select(steps: list[Step], only: str | None, start: str | None) -> list[Step]:
    if only:
        return [s for s in steps if s.stage == only]
    if start:
        return [s for s in steps if STAGES.index(s.stage) >= STAGES.index(start)]
    return steps


def run_recipe(
    path: str | os.PathLike,
    dry_run: bool = False,
    only: str | None = None,
    start: str | None = None,
    overrides: Sequence[str] = (),
    quiet: bool = False,
) -> dict:
    """Plan, then run each step not yet done (``overrides``: ``--set KEY=VALUE``, applied to
    the recipe before validation). Returns the run summary (printed unless ``quiet``)."""
    recipe = load_recipe(path, overrides)
    recipe_fp = file_fingerprint(path)
    check_merge(recipe, str(path))
    check_models(recipe, network=not dry_run)
    root = run_root(recipe)
    steps = plan(recipe, root)
    chosen = _select(steps, only, start)
    if dry_run:
        from fusechat.estimate import estimate_lines

        for s in steps:
            state = "cached" if s.done() else ("run" if s in chosen else "skip")
            print(f"{state:6} {s.stage:7} {s.name:40} {s.out}")
        print("\n".join(estimate_lines(recipe)))
        return {"steps": [{"stage": s.stage, "name": s.name, "done": s.done()} for s in steps]}
    questions = expand(recipe.eval.questions or "")
    if any(s.stage == "eval" and not s.done() for s in chosen) and not Path(questions).exists():
        # found before any stage runs, not after all training and merging
        raise FusechatError(f"eval.questions: {questions}: not found")
    times: dict[str, float] = {}
    for s in chosen:
        label = f"{s.stage}/{s.name}"
        if s.done():
            log.info("%s: cached (%s)", label, s.out)
            times[label] = 0.0
            continue
        missing = [i for i in s.inputs if i not in chosen and not i.done()]
        if missing:
            raise FusechatError(
                f"{label}: input {missing[0].stage}/{missing[0].name} is not done; "
                f"run without --only/--from or with --from {missing[0].stage}"
            )
        if file_fingerprint(path) != recipe_fp:
            raise FusechatError(f"{path}: changed while running; rerun to use the new recipe")
        log.info("%s: running -> %s", label, s.out)
        t0 = time.perf_counter()
        run_step(s)
        times[label] = round(time.perf_counter() - t0, 1)
    summary = summarize(steps, times)
    write_json(root / "summary.json", summary)
    if not quiet:
        print(format_summary(summary))
    return summary


# what a step's record says it cost (a study's budget): tokens sampled, what was trained on
BUDGET = ("tokens_generated", "responses", "rows", "pairs", "steps", "seconds")


def summarize(steps: list[Step], times: dict[str, float]) -> dict:
    """Scores per evaluated model, each model's role and folder, seconds per step, and each
    training and sampling step's cost (``BUDGET``, from its record)."""
    scores, models, budget = {}, {}, {}
    for s in steps:
        record = read_manifest(s.out) if s.stage in ("train", "sample", "sft", "dpo") else None
        if isinstance(record, dict):  # done: its completion record, read once
            stats = record.get("stats") or {}
            budget[f"{s.stage}/{s.name}"] = {k: stats[k] for k in BUDGET
                                             if isinstance(stats.get(k), int | float)}  # fmt: skip
        if s.stage == "eval" and s.done():
            scores[s.name] = read_json(s.out)["scores"]
            models[s.name] = {"role": s.role,
                              "path": str(s.inputs[0].out) if s.inputs else read_json(s.out)["model"]}  # fmt: skip
    return {"scores": scores, "models": models, "seconds": times, "budget": budget}


def format_summary(summary: dict) -> str:
    lines = []
    scores = summary["scores"]
    if scores:
        last = ["average", "nll/char"]  # per-skill losses stay in summary.json and the study
        cols = sorted({k for v in scores.values() for k in v
                       if k not in last and not k.startswith("nll/char ")}) + last  # fmt: skip
        width = max(len(n) for n in scores) + 2
        lines.append("model".ljust(width) + "".join(c[:10].rjust(11) for c in cols))
        for name, sc in scores.items():
            lines.append(
                name.ljust(width)
                + "".join(
                    f"{sc.get(c, float('nan')):11.{4 if c == 'nll/char' else 2}f}" for c in cols
                )
            )
    ran = {k: v for k, v in summary["seconds"].items() if v > 0}
    if ran:
        lines.append("")
        lines.append("stage times (s): " + ", ".join(f"{k} {v}" for k, v in ran.items()))
    return "\n".join(lines)

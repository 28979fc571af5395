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
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fusechat.errors import FusechatError, first_line
from fusechat.io import file_fingerprint, fingerprint, read_json, read_manifest, write_json
from fusechat.recipe import HUB_ID, Recipe, expand, load_recipe

log = logging.getLogger(__name__)
STAGES = ("capture", "align", "fuse", "train", "merge", "eval")


@dataclass
class Step:
    stage: str
    name: str  # e.g. "nh2-mixtral-mini"
    key: dict
    out: Path
    action: Callable[[], None] = field(repr=False)
    inputs: list[Step] = field(default_factory=list, repr=False)
    role: str = ""  # eval steps: pivot, source, target, clm (the baseline) or merge

    @property
    def fp(self) -> str:
        return fingerprint(self.key)

    def done(self) -> bool:
        if self.stage == "eval":
            return self.out.exists() and read_json(self.out).get("key") == self.fp
        if self.stage == "merge":
            return (self.out / "merge_report.json").exists()
        return read_manifest(self.out) is not None


def _model_identity(path: str) -> str:
    from fusechat.capture import model_fingerprint

    return model_fingerprint(path)


def check_merge(recipe: Recipe, source: str) -> None:
    """Every merge method of the recipe and its parameters, through mergekit's declarations."""
    from fusechat.merge.run import check_method

    for i, m in enumerate(recipe.merge.methods if recipe.merge else []):
        check_method(m.method, m.parameters, m.model_parameters, f"{source}: merge.methods[{i}]")


def check_models(recipe: Recipe, network: bool = True) -> None:
    """Every model must be a local folder or a hub id that resolves (checked online unless
    ``network`` is False, as in a dry run): one line otherwise."""
    from transformers import AutoConfig

    for m in recipe.models.all:
        if Path(m.resolved).is_dir():
            continue
        if not HUB_ID.match(m.path):
            raise FusechatError(f"models: {m.label}: {m.resolved}: no such folder")
        if not network:
            continue
        try:
            AutoConfig.from_pretrained(m.path)
        except (OSError, ValueError) as e:
            raise FusechatError(
                f"models: {m.label}: {m.path}: unreachable ({first_line(e)})"
            ) from None


def _rendering(recipe: Recipe) -> tuple[str, str | None]:
    """FuseChat renders every model's input in the pivot's format: a named template, or the
    pivot tokenizer's chat template (and special tokens) rendering the text for every model."""
    tpl = recipe.render_template
    return tpl, (recipe.models.pivot.resolved if tpl == "tokenizer" else None)


def _stage_versions() -> dict[str, int]:
    from fusechat import align, capture, fuse, train

    return {"capture": capture.VERSION, "align": align.VERSION, "fuse": fuse.VERSION,
            "train": train.VERSION, "merge": 1, "eval": 2}  # fmt: skip


def plan(recipe: Recipe, root: Path) -> list[Step]:
    """Every step of the recipe, in order, with keys and output folders; nothing runs."""
    from fusechat.capture import CaptureConfig

    steps: list[Step] = []
    data_path = expand(recipe.data.path)
    if Path(data_path).exists():
        data_fp = file_fingerprint(data_path)
    elif HUB_ID.match(recipe.data.path):
        data_fp = fingerprint({"hub": recipe.data.path})  # a hub dataset, loaded by datasets
    else:
        raise FusechatError(f"data.path: {data_path}: corpus not found")
    template, render_with = _rendering(recipe)
    ids = {m.label: _model_identity(m.resolved) for m in recipe.models.all}

    versions = _stage_versions()

    def add(stage, name, key, action_factory, inputs=(), suffix="") -> Step:
        # the stage's format version: outputs of older code are never taken for current ones
        key = {"stage": stage, "version": versions[stage], **key, "inputs": [s.fp for s in inputs]}
        out = root / stage / f"{name}-{fingerprint(key)[:10]}{suffix}"
        step = Step(stage, name, key, out, lambda: None, list(inputs))
        step.action = action_factory(step)
        steps.append(step)
        return step

    # capture
    pivot_label = recipe.models.pivot.label
    caps: dict[str, Step] = {}
    c = recipe.capture
    for m in recipe.models.all:
        # the pivot's candidates are its own tokens: nothing to map, no lookahead
        lookahead = 0 if m.label == pivot_label else c.lookahead
        cfg = CaptureConfig(
            model=m.resolved,
            template=template,
            render_with=render_with,
            k=c.k,
            max_length=c.max_length,
            overflow=c.overflow,
            backend=c.backend,
            dtype=m.dtype,
            batch_tokens=c.batch_tokens,
            shard_rows=c.shard_rows,
            lookahead=lookahead,
            lookahead_min_prob=c.lookahead_min_prob,
            tensor_parallel_size=m.tensor_parallel_size,
        )

        def run_capture(step, cfg=cfg):
            from fusechat.capture import CaptureJob

            d = recipe.data
            job = CaptureJob(cfg, data_path, str(step.out), d.format, d.max_rows, d.strict)
            return lambda: _capture(job, c.processes)

        # the model's dtype shapes its distributions; strict decides which rows are kept
        # batch_tokens (the padding budget of a forward pass) and processes (data-parallel
        # ranks) are speed, not results (the capture stage's own key leaves them out too)
        capture_key = {**c.model_dump(exclude={"batch_tokens", "processes"}),
                       "lookahead": lookahead,
                       "lookahead_min_prob": c.lookahead_min_prob if lookahead else None}  # fmt: skip
        key = {"model": ids[m.label], "capture": capture_key,
               "template": template,
               "render_with": ids[pivot_label] if render_with else None, "data": data_fp,
               "max_rows": recipe.data.max_rows, "format": recipe.data.format,
               "dtype": m.dtype, "strict": recipe.data.strict,
               # parallel reductions round differently: a conservative key
               "tensor_parallel_size": m.tensor_parallel_size}  # fmt: skip
        caps[m.label] = add("capture", m.label, key, run_capture)
    pivot = recipe.models.pivot
    pcap = caps[pivot.label]

    # align + fuse, pairwise per source
    fused: dict[str, Step] = {}
    for s in recipe.models.sources:

        def run_align(step, s=s):
            from fusechat.align import align

            return lambda: align(
                pcap.out,
                caps[s.label].out,
                step.out,
                method=recipe.align.method,
                sequence=recipe.align.sequence,
                workers=recipe.align.workers,
            )

        # workers change the speed, never the output (byte-identical, tested): not in the key
        al = add("align", s.label, {"align": recipe.align.model_dump(exclude={"workers"})}, run_align,
                 [pcap, caps[s.label]])  # fmt: skip

        def run_fuse(step, al=al):
            from fusechat.fuse import fuse_stage

            f = recipe.fuse
            return lambda: fuse_stage(
                pcap.out, [al.out], step.out, f.method, f.ce_norm, f.unaligned, workers=f.workers
            )

        fused[s.label] = add("fuse", s.label, {"fuse": recipe.fuse.model_dump(exclude={"workers"})}, run_fuse,
                             [pcap, al])  # fmt: skip

    # train: one target per source, plus the CLM-only baseline
    t = recipe.train
    targets: dict[str, Step] = {}
    heldout_fp = None
    if t.heldout:
        if not Path(expand(t.heldout)).exists():
            raise FusechatError(f"train.heldout: {expand(t.heldout)}: not found")
        heldout_fp = file_fingerprint(expand(t.heldout))
    jobs = [(f"{pivot.label}--{s.label}", fused[s.label], t.lam) for s in recipe.models.sources]
    if t.clm_baseline:
        jobs.append((f"{pivot.label}-clm", pcap, 1.0))
    for name, data_step, lam in jobs:

        def run_train(step, data_step=data_step, lam=lam):
            return lambda: _train(recipe, pivot.resolved, data_step.out, step.out, lam)

        # lambda is the job's own (the baseline's is 1 whatever train.lambda says); the seed
        # orders the data and initialises LoRA, so each seed is another run
        key = {"train": t.model_dump(exclude={"lam"}), "lambda": lam, "pivot": ids[pivot.label],
               "seed": recipe.seed, "heldout": heldout_fp}  # fmt: skip
        targets[name] = add("train", name, key, run_train, [data_step])

    # merge: each method over the fused targets (not the baseline), base = the pivot
    fusion_targets = [targets[f"{pivot.label}--{s.label}"] for s in recipe.models.sources]
    merges: dict[str, Step] = {}
    for spec in recipe.merge.methods if len(fusion_targets) > 1 else []:

        def run_merge(step, spec=spec):
            return lambda: _merge(recipe, spec, pivot.resolved, fusion_targets, step.out)

        key = {"merge": spec.model_dump(), "dtype": recipe.merge.dtype, "pivot": ids[pivot.label],
               "seed": recipe.seed}  # fmt: skip
        merges[spec.name] = add("merge", f"{pivot.label}-{spec.name}", key, run_merge,
                                fusion_targets)  # fmt: skip

    # eval: every model
    if recipe.eval.kind != "none":
        models: list[tuple[str, str, Step | None, str]] = [
            (m.label, m.resolved, None, "pivot" if m is pivot else "source")
            for m in recipe.models.all
        ]
        models += [(n, str(st.out), st, "clm" if n == f"{pivot.label}-clm" else "target")
                   for n, st in targets.items()]  # fmt: skip
        models += [(st.name, str(st.out), st, "merge") for st in merges.values()]
        for name, path, producer, role in models:

            def run_eval(step, path=path):
                return lambda: _evaluate(recipe, path, step)

            qpath = expand(recipe.eval.questions)
            qfp = file_fingerprint(qpath) if Path(qpath).exists() else qpath
            # an input model by its fingerprint; a trained or merged one by its producer's key
            key = {"eval": recipe.eval.model_dump(), "model": ids.get(name),
                   "questions": qfp}  # fmt: skip
            ev = add("eval", name, key, run_eval, [producer] if producer else [], suffix=".json")
            ev.role = role
    return steps


def train_config(recipe: Recipe, lam: float):
    """The recipe's ``train`` section (and seed) as the training's one config object."""
    from fusechat.train import LoraSpec, TrainConfig

    t = recipe.train
    lora = None
    if t.lora is not None:
        tm = t.lora.target_modules
        lora = LoraSpec(
            t.lora.r, t.lora.alpha, t.lora.dropout, tm if isinstance(tm, str) else tuple(tm)
        )
    return TrainConfig(
        lam=lam, temperature=t.temperature, fusion_loss=t.fusion_loss, lr=t.lr, epochs=t.epochs,
        max_steps=t.max_steps, batch_size=t.batch_size, micro_batch_size=t.micro_batch_size,
        warmup_ratio=t.warmup_ratio, weight_decay=t.weight_decay, max_length=t.max_length,
        gradient_checkpointing=t.gradient_checkpointing, precision=t.precision,
        save_steps=t.save_steps, logging_steps=t.logging_steps, seed=recipe.seed, lora=lora,
        heldout=expand(t.heldout) if t.heldout else None, eval_steps=t.eval_steps,
    )  # fmt: skip


def _capture(job, processes: int) -> None:
    """In this process, or data-parallel under torchrun with ``processes`` ranks (the same
    bytes)."""
    if processes == 1:
        job.run()
        return
    out = Path(job.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = job.launch_command(processes, out.with_name(f"{out.name}.capture.json"))
    if subprocess.run(cmd).returncode != 0:
        raise FusechatError(f"capture {out.name}: torchrun failed (see its log above)")


def _train(recipe: Recipe, pivot: str, data: Path, out: Path, lam: float) -> None:
    from fusechat.train import train

    t, cfg = recipe.train, train_config(recipe, lam)
    if t.launcher is None:
        train(pivot, data, out, cfg)
        return
    if subprocess.run(launch_command(expand(t.launcher), pivot, data, out, cfg)).returncode != 0:
        raise FusechatError(f"train {out.name}: accelerate launch failed (see its log above)")


def launch_command(launcher: str, pivot: str, data: Path, out: Path, cfg) -> list[str]:
    """The same training under ``accelerate launch`` (DeepSpeed / FSDP from its config file):
    the configuration travels whole as a JSON file beside the output, so no setting can be
    dropped on the way to the child processes."""
    from fusechat.io import write_atomic

    cfg_file = out.with_name(f"{out.name}.train.json")
    write_atomic(cfg_file, cfg.to_json())
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", launcher]
    return cmd + ["-m", "fusechat.cli", "train", "--model", pivot, "--data", str(data),
                  "--out", str(out), "--config", str(cfg_file)]  # fmt: skip


def _merge(recipe: Recipe, spec, pivot: str, targets: list[Step], out: Path) -> None:
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import BasePolicy

    from fusechat.merge import varm
    from fusechat.merge.run import run

    varm.register()
    base_policy = registry.get(spec.method).spec.contract.base  # known: check_merge ran first
    config = {
        "merge_method": spec.method,
        # the pivot is the base of every target; methods that ignore a base (linear) get none,
        # or mergekit would count it as one more input
        **({"base_model": pivot} if base_policy != BasePolicy.IGNORED else {}),
        "models": [
            {
                "model": str(t.out),
                **({"parameters": spec.model_parameters} if spec.model_parameters else {}),
            }
            for t in targets
        ],
        "dtype": recipe.merge.dtype,
    }
    if spec.parameters:
        config["parameters"] = spec.parameters
    cfg_path = out.with_name(out.name + ".yaml")
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    run(cfg_path, out, overwrite=True, random_seed=recipe.seed)


def _evaluate(recipe: Recipe, model_path: str, step: Step) -> None:
    e = recipe.eval
    if e.kind == "mt-bench":
        from fusechat.eval.mtbench import run_mt_bench
        from fusechat.eval.server import serving

        questions = Path(expand(e.questions))
        with serving(model_path, step.name, e.serve_backend) as url:
            table = run_mt_bench(
                str(questions.parent), [(step.name, url)], e.judge.base_url, e.judge.model,
                str(step.out.parent / "mt-bench"), judge_api_key=os.environ.get(e.judge.api_key_env),
                concurrency=e.concurrency, max_tokens=e.max_new_tokens,
                max_questions=e.max_questions,
            )  # fmt: skip
        write_json(step.out, {"key": step.fp, "model": model_path, "scores": table[step.name]})
        return
    from fusechat.eval.chat import load_chat_model
    from fusechat.eval.toy import generate_answers, load_questions, nll_by_skill, score

    qs = load_questions(expand(e.questions), e.max_questions)
    model, tok, stops = load_chat_model(model_path)  # once, for both measures
    answers = generate_answers(model, tok, stops, qs, e.max_new_tokens)
    scores = {**score(qs, answers), **nll_by_skill(model, tok, qs)}
    result = {"key": step.fp, "model": model_path, "scores": scores,
              "answers": [{"id": q["id"], "answer": a} for q, a in zip(qs, answers, strict=True)]}  # fmt: skip
    write_json(step.out, result)


# --------------------------------------------------------------------------- running


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
    root = Path(expand(recipe.run_dir)) / recipe.name
    steps = plan(recipe, root)
    chosen = _select(steps, only, start)
    if dry_run:
        from fusechat.estimate import estimate_lines

        for s in steps:
            state = "cached" if s.done() else ("run" if s in chosen else "skip")
            print(f"{state:6} {s.stage:7} {s.name:40} {s.out}")
        print("\n".join(estimate_lines(recipe)))
        return {"steps": [{"stage": s.stage, "name": s.name, "done": s.done()} for s in steps]}
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
        s.action()
        times[label] = round(time.perf_counter() - t0, 1)
    summary = summarize(steps, times)
    write_json(root / "summary.json", summary)
    if not quiet:
        print(format_summary(summary))
    return summary


def summarize(steps: list[Step], times: dict[str, float]) -> dict:
    """Scores per evaluated model, each model's role and folder, seconds per step."""
    scores, models = {}, {}
    for s in steps:
        if s.stage == "eval" and s.done():
            scores[s.name] = read_json(s.out)["scores"]
            models[s.name] = {"role": s.role,
                              "path": str(s.inputs[0].out) if s.inputs else read_json(s.out)["model"]}  # fmt: skip
    return {"scores": scores, "models": models, "seconds": times}


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

"""The steps of a recipe: each a frozen value (stage, name, settings, inputs).

A step's settings are everything its stage needs besides its inputs' outputs, including the
identities of what it reads from outside the run (a model's fingerprint, the corpus file's).
Its key is its stage, the stage's format version, the settings that shape the output and its
inputs' keys; the key names its folder. A step is done when its output holds its completion
record (``read_manifest``), the one rule for every stage. ``run_step`` runs it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import yaml

from fusechat.configs import (
    CaptureConfig,
    CaptureJob,
    CaptureSettings,
    Config,
    DataSpec,
    TrainConfig,
    TrainJob,
)
from fusechat.errors import FusechatError
from fusechat.implicit.settings import DpoConfig, PairsConfig, SampleConfig, ScoreConfig, SftConfig
from fusechat.io import fingerprint, read_manifest, write_json
from fusechat.options import job_command
from fusechat.recipe import EvalSection, MergeMethodSpec, expand


class CaptureStep(Config):
    SPEED = frozenset({"processes"})
    config: CaptureConfig
    data: DataSpec
    processes: int = 1
    model_id: str
    data_id: str
    render_id: str | None = None

    def key(self) -> dict:
        c = self.config
        shared = c.model_dump(include=set(CaptureSettings.model_fields) - c.SPEED)
        if not c.lookahead:
            shared["lookahead_min_prob"] = None  # it has no effect then
        return {"model": self.model_id, "capture": shared, "template": c.template,
                "render_with": self.render_id, "data": self.data_id,
                "max_rows": self.data.max_rows, "format": self.data.format, "dtype": c.dtype,
                "strict": self.data.strict,
                # parallel reductions round differently: a conservative key
                "tensor_parallel_size": c.tensor_parallel_size}  # fmt: skip


class TrainStep(Config):
    SPEED = frozenset({"launcher", "pivot"})
    config: TrainConfig
    pivot: str  # the pivot's path (by ``pivot_id`` in the key)
    pivot_id: str
    heldout_id: str | None = None
    launcher: str | None = None  # an accelerate config file

    def key(self) -> dict:
        return {"train": self.config.model_dump(exclude={"heldout"}), "pivot": self.pivot_id,
                "heldout": self.heldout_id}  # fmt: skip


class MergeStep(Config):
    SPEED = frozenset({"pivot"})
    spec: MergeMethodSpec
    dtype: str
    pivot: str
    pivot_id: str
    seed: int

    def key(self) -> dict:
        return {"merge": self.spec.model_dump(), "dtype": self.dtype, "pivot": self.pivot_id,
                "seed": self.seed}  # fmt: skip


class EvalStep(Config):
    SPEED = frozenset({"model"})
    eval: EvalSection
    model: str  # the model's path: an input model by ``model_id``, a produced one by its step
    model_id: str | None = None
    questions_id: str

    def key(self) -> dict:
        return {"eval": self.eval.model_dump(), "model": self.model_id,
                "questions": self.questions_id}  # fmt: skip


class SampleStep(Config):
    config: SampleConfig  # every field shapes the responses (batch_size: the random draws)
    data: DataSpec
    model_id: str
    data_id: str

    def key(self) -> dict:
        return {"sample": self.config.model_dump(exclude={"model"}), "model": self.model_id,
                "data": self.data_id, "max_rows": self.data.max_rows,
                "format": self.data.format, "strict": self.data.strict}  # fmt: skip


class ScoreStep(Config):
    config: ScoreConfig
    reward_model_id: str | None = None  # the reward model by its fingerprint, not its path

    def key(self) -> dict:
        from fusechat.implicit.rewards import REWARDS

        k = self.config.key()
        del k["reward_model"]  # by its fingerprint
        # a reward's own version (its rule changed): absent where it has none yet
        version = getattr(REWARDS[self.config.reward], "version", None)
        return {"score": k, "reward_model": self.reward_model_id,
                **({"reward_version": version} if version else {})}  # fmt: skip


class PairsStep(Config):
    config: PairsConfig

    def key(self) -> dict:
        return {"pairs": self.config.key()}


class SftStep(Config):
    SPEED = frozenset({"model"})
    config: SftConfig
    model: str | None = None  # the starting model: an input model (by ``model_id``), or None:
    model_id: str | None = None  # the output of this step's second input (SFT before DPO)

    def key(self) -> dict:
        return {"config": self.config.key(), "model": self.model_id}


class DpoStep(SftStep):
    config: DpoConfig


def stage_version(stage: str) -> int:
    """The format version of a stage's output: the runner's own, or the ``VERSION`` of the
    module that writes it (``STAGES``)."""
    kind = STAGES[stage]
    if isinstance(kind.version, int):
        return kind.version
    import importlib

    return importlib.import_module(f"fusechat.{kind.version}").VERSION


@dataclass(frozen=True, eq=False)
class Step:
    stage: str
    name: str  # e.g. "nh2-mixtral-mini"
    settings: Config
    inputs: tuple[Step, ...] = ()
    root: Path = field(default=Path("."), repr=False)
    role: str = ""  # eval steps: pivot, source, target, clm (the baseline), merge or implicit

    @cached_property
    def key(self) -> dict:
        # the stage's format version: outputs of older code are never taken for current ones
        return {"stage": self.stage, "version": stage_version(self.stage),
                **self.settings.key(), "inputs": [s.fp for s in self.inputs]}  # fmt: skip

    @cached_property
    def fp(self) -> str:
        return fingerprint(self.key)

    @property
    def out(self) -> Path:
        suffix = ".json" if self.stage == "eval" else ""
        return self.root / self.stage / f"{self.name}-{self.fp[:10]}{suffix}"

    def done(self) -> bool:
        return read_manifest(self.out) is not None


# --------------------------------------------------------------------------- actions


def _capture(step: Step) -> None:
    """In this process, or data-parallel under torchrun (the same bytes)."""
    from fusechat.capture import run_job, torchrun_command

    s = step.settings
    job = CaptureJob(config=s.config, data=s.data, out=str(step.out))
    if s.processes == 1:
        run_job(job)
        return
    _launch(step, torchrun_command(job, s.processes, _job_file(step)), "torchrun")


def _job_file(step: Step) -> Path:
    step.out.parent.mkdir(parents=True, exist_ok=True)
    return step.out.with_name(f"{step.out.name}.{step.stage}.json")


def _launch(step: Step, cmd: list[str], what: str) -> None:
    if subprocess.run(cmd).returncode != 0:
        raise FusechatError(f"{step.stage} {step.out.name}: {what} failed (see its log above)")


def _align(step: Step) -> None:
    from fusechat.align import align

    pivot, source = step.inputs
    align(pivot.out, source.out, step.out, step.settings)


def _fuse(step: Step) -> None:
    from fusechat.fuse import fuse_stage

    pivot, aligned = step.inputs
    fuse_stage(pivot.out, [aligned.out], step.out, step.settings)


def _train(step: Step) -> None:
    from fusechat.train import train

    s = step.settings
    (data,) = step.inputs
    if s.launcher is None:
        train(s.pivot, data.out, step.out, s.config)
        return
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  expand(s.launcher)]  # fmt: skip
    job = TrainJob(config=s.config, model=s.pivot, data=str(data.out), out=str(step.out))
    _launch(step, job_command(accelerate, "train", job, _job_file(step)), "accelerate launch")


def _merge(step: Step) -> None:
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import BasePolicy

    from fusechat.merge import varm
    from fusechat.merge.run import run

    s = step.settings
    varm.register()
    base_policy = registry.get(s.spec.method).spec.contract.base  # known: check_merge ran first
    params = {"parameters": s.spec.model_parameters} if s.spec.model_parameters else {}
    config = {
        "merge_method": s.spec.method,
        # the pivot is the base of every target; methods that ignore a base (linear) get none,
        # or mergekit would count it as one more input
        **({"base_model": s.pivot} if base_policy != BasePolicy.IGNORED else {}),
        "models": [{"model": str(t.out), **params} for t in step.inputs],
        "dtype": s.dtype,
        **({"parameters": s.spec.parameters} if s.spec.parameters else {}),
    }
    cfg_path = step.out.with_name(step.out.name + ".yaml")
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    run(cfg_path, step.out, overwrite=True, random_seed=s.seed)


def _evaluate(step: Step) -> None:
    e, model_path = step.settings.eval, step.settings.model
    if e.kind == "mt-bench":
        from fusechat.eval.mtbench import run_mt_bench
        from fusechat.eval.serving import serving

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
    answers = generate_answers(model, tok, stops, qs, e.max_new_tokens, e.batch_size)
    scores = {**score(qs, answers), **nll_by_skill(model, tok, qs)}
    result = {"key": step.fp, "model": model_path, "scores": scores,
              "answers": [{"id": q["id"], "answer": a} for q, a in zip(qs, answers, strict=True)]}  # fmt: skip
    write_json(step.out, result)


def _sample(step: Step) -> None:
    from fusechat.implicit.sample import sample_stage

    sample_stage(step.settings.config, step.settings.data, step.out)


def _score(step: Step) -> None:
    from fusechat.implicit.score import score_stage

    score_stage([s.out for s in step.inputs], step.out, step.settings.config)


def _pairs(step: Step) -> None:
    from fusechat.implicit.pairs import pairs_stage

    (scores,) = step.inputs
    pairs_stage(scores.out, step.out, step.settings.config)


def _prefer(step: Step) -> None:
    """SFT or DPO on the pairs folder (the first input), from the given model or the second
    input's output."""
    from fusechat.implicit.prefer import dpo_stage, sft_stage

    s = step.settings
    pairs, *start = step.inputs
    model = s.model if s.model is not None else str(start[0].out)
    (sft_stage if step.stage == "sft" else dpo_stage)(model, pairs.out, step.out, s.config)


@dataclass(frozen=True)
class Stage:
    """One stage of a recipe: what runs a step of it, and its output format's version (an
    int: the runner writes the output; a name: the module whose ``VERSION`` it is)."""

    run: Callable[[Step], None]
    version: int | str


# every stage, in pipeline order: the runner, the CLI's --only/--from and the keys read it
STAGES: dict[str, Stage] = {
    "capture": Stage(_capture, "capture"), "align": Stage(_align, "align"),
    "fuse": Stage(_fuse, "fuse"), "train": Stage(_train, "train"), "merge": Stage(_merge, 1),
    "sample": Stage(_sample, "implicit.sample"), "score": Stage(_score, "implicit.score"),
    "pairs": Stage(_pairs, "implicit.pairs"), "sft": Stage(_prefer, "implicit.prefer"),
    "dpo": Stage(_prefer, "implicit.prefer"), "eval": Stage(_evaluate, 2),
}  # fmt: skip


def run_step(step: Step) -> None:
    STAGES[step.stage].run(step)

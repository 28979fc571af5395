"""The recipe schema: one YAML file describes models, data and every stage of a fusion run.

Sections are owned by their stages; unknown keys are rejected so a typo never passes silently.
Errors are one line naming the file and field path, e.g.
``recipe.yaml: models.sources[1].path: field required``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, model_validator

from fusechat.configs import (
    AlignConfig,
    CaptureSection,
    Config,
    DataSpec,
    FuseConfig,
    ModelSettings,
    PositiveInt,
    Seed,
    Template,
    TrainSettings,
)
from fusechat.errors import FusechatError
from fusechat.implicit.settings import (
    DpoSettings,
    PairsConfig,
    PreferSettings,
    SampleSettings,
    ScoreConfig,
)
from fusechat.io import is_hub_id
from fusechat.yamlfile import parse_yaml, read_yaml


def expand(path: str) -> str:
    """Expand ``~`` and environment variables in a recipe path; ``${FUSECHAT_CACHE}`` defaults to
    ``~/.cache/fusechat`` (where ``fusechat toy build`` and the tests keep the toy world)."""
    from fusechat.io import cache_dir

    cache = str(cache_dir())
    return os.path.expanduser(os.path.expandvars(path.replace("${FUSECHAT_CACHE}", cache)))


class _Section(Config):
    pass


class ModelSpec(ModelSettings):
    """A chat model: a local folder or a hub id (loaded by transformers' Auto classes)."""

    path: Annotated[str, Field(min_length=1)]
    # defaults to the last component of ``path``; it names step folders: no '/', not '..'
    name: Annotated[str, Field(pattern=r"^[\w.-]*[\w-][\w.-]*$")] | None = None

    @property
    def label(self) -> str:
        return self.name or Path(self.path.rstrip("/")).name

    @property
    def resolved(self) -> str:
        return expand(self.path)

    def where(self) -> str:
        if Path(self.resolved).is_dir():
            return "local folder"
        return "hub id" if is_hub_id(self.path) else "missing local folder"


class PivotSpec(ModelSpec):
    """The pivot, whose conversation format renders every model's input (FuseChat): a named
    template, or 'tokenizer' (its chat template). Sources have none of their own."""

    template: Template = "tokenizer"


class Models(_Section):
    pivot: PivotSpec
    sources: Annotated[list[ModelSpec], Field(min_length=1)]

    @model_validator(mode="before")
    @classmethod
    def _no_source_template(cls, raw: object) -> object:
        for i, s in enumerate(raw.get("sources") or [] if isinstance(raw, dict) else []):
            if isinstance(s, dict) and "template" in s:
                raise ValueError(f"sources[{i}].template: every model's input is rendered in the "
                                 "pivot's format (FuseChat); set it on the pivot or in data")  # fmt: skip
        return raw

    @model_validator(mode="after")
    def _unique_names(self) -> Models:
        seen: set[str] = set()
        for m in [self.pivot, *self.sources]:
            if m.label in seen:
                raise ValueError(f"duplicate model name {m.label!r}; set 'name' to tell them apart")
            seen.add(m.label)
        return self

    @property
    def all(self) -> list[ModelSpec]:
        return [self.pivot, *self.sources]


class Data(DataSpec):
    """The chat corpus every model scores; FuseChat renders all inputs with the pivot's template."""

    template: Template | None = None  # None: the pivot's template


class TrainSection(TrainSettings):
    """``fusechat train`` of one target per source; the recipe's ``seed`` seeds each run."""

    clm_baseline: bool = False  # also train lambda = 1 on the pivot's capture (the CLM baseline)
    launcher: str | None = None  # an accelerate config file: run training under accelerate launch


class MergeMethodSpec(_Section):
    name: Annotated[str, Field(min_length=1, pattern=r"^[\w.-]+$")]
    method: Annotated[str, Field(min_length=1)]
    parameters: dict = {}  # mergekit global parameters (e.g. density for ties)
    model_parameters: dict = {}  # given to every target (e.g. weight, density)


class MergeSection(_Section):
    """Stage two: merge the targets (base: the pivot) with each method listed."""

    methods: Annotated[list[MergeMethodSpec], Field(min_length=1)] = [
        MergeMethodSpec(name="varm", method="varm")
    ]
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"


class JudgeSection(_Section):
    """An OpenAI-compatible judge endpoint (GPT-4 in the paper; any served model works)."""

    base_url: Annotated[str, Field(min_length=1)]
    model: Annotated[str, Field(min_length=1)]
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable, never the recipe


class EvalSection(_Section):
    """Score every model: the toy question set with the rule judge, or MT-Bench."""

    kind: Literal["toy", "mt-bench", "none"] = "none"
    questions: str | None = None  # toy: held-out rows; mt-bench: FastChat's question.jsonl,
    # beside judge_prompts.jsonl and reference_answer/ as in FastChat's data folder
    max_questions: PositiveInt | None = None
    max_new_tokens: PositiveInt = 32
    # toy: questions answered per generate call (tiny models are bound by the calls: 128
    # answers the 6,000 questions in 6.9 s against 11.2 s at 32, the same answers)
    batch_size: PositiveInt = 128
    judge: JudgeSection | None = None  # mt-bench
    serve_backend: Literal["auto", "hf", "vllm"] = "auto"  # how mt-bench serves each model
    concurrency: PositiveInt = 8

    @model_validator(mode="after")
    def _questions_given(self) -> EvalSection:
        if self.kind != "none" and not self.questions:
            raise ValueError(f"eval kind {self.kind!r} needs 'questions' (a path)")
        if self.kind == "mt-bench" and self.judge is None:
            raise ValueError("eval kind 'mt-bench' needs a 'judge' (base_url, model)")
        return self


class ImplicitSection(_Section):
    """Implicit fusion (FuseChat-3.0): every source samples responses to the prompts, a reward
    scores them, the pivot is fine-tuned on the best (``sft``) and then preference-trained on
    each source's best against its worst (``dpo``). The recipe's ``seed`` seeds both
    trainings; the sampling has its own (``sample.seed``), so a study's seeds share the samples
    as they share the captures. A training set to null is skipped (``sft: null``: DPO from the
    pivot)."""

    prompts: str | None = None  # the prompt set (default: data.path), read like data
    include_pivot: bool = False  # the pivot samples too (on-policy responses, as WRPO's)
    sample: SampleSettings = SampleSettings()
    score: ScoreConfig
    pairs: PairsConfig = PairsConfig()
    sft: PreferSettings | None = PreferSettings()
    dpo: DpoSettings | None = DpoSettings()
    # what DPO starts from, one run each: sft (the SFT model), pivot, or a merge method's
    # name (explicit fusion, then DPO); default: sft, or the pivot without SFT
    dpo_from: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] | None = (
        None
    )

    @model_validator(mode="after")
    def _trains_something(self) -> ImplicitSection:
        if self.sft is None and self.dpo is None:
            raise ValueError("sft and dpo are both null: implicit fusion would train nothing")
        if self.dpo_from and len(set(self.dpo_from)) != len(self.dpo_from):
            raise ValueError(f"dpo_from: {self.dpo_from}: a start given twice")
        if self.sft is None and "sft" in (self.dpo_from or []):
            raise ValueError("dpo_from: sft, but sft is null")
        return self

    @property
    def starts(self) -> list[str]:
        return self.dpo_from or ["sft" if self.sft is not None else "pivot"]


class Recipe(_Section):
    name: Annotated[str, Field(min_length=1, pattern=r"^[\w.-]+$")]
    run_dir: str = "runs"
    seed: Seed = 0
    models: Models
    data: Data
    # explicit fusion (FuseChat): capture, align, fuse, one target per source, merges; false
    # leaves the pivot's capture alone, for the CLM baseline (implicit fusion only)
    explicit: bool = True
    capture: CaptureSection = CaptureSection()
    align: AlignConfig = AlignConfig()
    fuse: FuseConfig = FuseConfig()
    train: TrainSection = TrainSection()
    merge: MergeSection = MergeSection()
    implicit: ImplicitSection | None = None
    eval: EvalSection = EvalSection()

    @model_validator(mode="after")
    def _dpo_starts_exist(self) -> Recipe:
        names = [m.name for m in self.merge.methods] if self.explicit else []
        for origin in self.implicit.starts if self.implicit else []:
            if origin not in ("sft", "pivot", *names):
                raise ValueError(f"implicit.dpo_from: {origin!r} is not sft, pivot or a merge "
                                 f"of this recipe ({', '.join(names) or 'none: explicit is off'})")  # fmt: skip
        return self

    @property
    def render_template(self) -> str:
        return self.data.template or self.models.pivot.template

    def plan(self) -> list[str]:
        """Human-readable lines describing what this recipe will do."""
        lines = [f"recipe {self.name}: run directory {Path(self.run_dir) / self.name}"]
        for role, m in [("pivot", self.models.pivot)] + [
            ("source", s) for s in self.models.sources
        ]:
            lines.append(f"  {role:6} {m.label:24} {m.path} ({m.where()}, dtype {m.dtype})")
        lines.append(
            f"  data   {self.data.path} (format {self.data.format}, rendered with "
            f"'{self.render_template}' for every model)"
        )
        c, a, f, t = self.capture, self.align, self.fuse, self.train
        if self.explicit:
            how = f"inside source tokens: {a.inside}" if a.method == "text" else a.sequence
            lines += [
                f"  capture top-{c.k}, max length {c.max_length} ({c.overflow}), backend "
                f"{c.backend}",
                f"  align  {a.method} ({how})",
                f"  fuse   {f.method} (cross-entropy per {f.ce_norm}), pairwise per source",
                f"  train  lambda {t.lam}, lr {t.lr}, "
                f"{t.epochs if t.max_steps < 0 else t.max_steps} "
                f"{'epochs' if t.max_steps < 0 else 'steps'}, batch {t.batch_size}"
                + (f", LoRA r={t.lora.r}" if t.lora else "")
                + (", plus the CLM-only baseline" if t.clm_baseline else ""),
                f"  merge  {', '.join(m.name for m in self.merge.methods)}",
            ]  # fmt: skip
        elif t.clm_baseline:
            lines.append(f"  train  the CLM-only baseline on the pivot's capture, lr {t.lr}")
        if i := self.implicit:
            lines.append(
                f"  implicit {i.sample.n} samples per prompt per "
                f"{'model' if i.include_pivot else 'source'}, reward {i.score.reward}, "
                f"SFT share {i.pairs.sft_share}"
                + ("" if i.sft is None else f", SFT lr {i.sft.lr}")
                + (
                    ""
                    if i.dpo is None
                    else f", DPO {i.dpo.loss} beta {i.dpo.beta} lr {i.dpo.lr} "
                    f"from {', '.join(i.starts)}"
                )
            )
        if self.eval.kind != "none":
            lines.append(f"  eval   {self.eval.kind} on {self.eval.questions}")
        return lines


def _field_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validation_error(source: str | Path, e: ValidationError) -> FusechatError:
    """pydantic's first error as ``source: field.path: message (+N more)``."""
    err = e.errors()[0]
    field = _field_path(err["loc"])
    msg = err["msg"]
    if not field and re.match(r"Value error, [\w.\[\]]+: ", msg):
        field, msg = msg.removeprefix("Value error, ").split(": ", 1)  # a whole-recipe check
    field = field or "(top level)"
    msg = {
        "Field required": "field required",
        "Extra inputs are not permitted": "unknown field",
    }.get(msg, msg)
    msg = msg.removeprefix("Value error, ")
    more = f" (+{len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return FusechatError(f"{source}: {field}: {msg}{more}")


_KEY_PART = re.compile(r"(\w[\w-]*)|\[(\d+)\]")


def apply_override(raw: dict, spec: str) -> None:
    """Apply one ``--set`` override, ``a.b.c=VALUE`` (list items as ``a[0].b`` or ``a.0.b``),
    VALUE read as YAML (``0.5``, ``true``, ``[q_proj, v_proj]``, ``null``); torchtune's
    ``key=value`` overrides. The result is validated with the rest of the recipe."""
    path, sep, value = spec.partition("=")
    if not sep or not path:
        raise FusechatError(f"--set {spec!r}: expected KEY=VALUE, e.g. train.lambda=0.5")
    parts: list[str | int] = []
    for seg in path.strip().split("."):
        found = [int(i) if i else (int(n) if n.isdigit() else n) for n, i in _KEY_PART.findall(seg)]
        if not found or "".join(_KEY_PART.sub("", seg)):
            raise FusechatError(f"--set {spec!r}: bad key segment {seg!r}")
        parts += found
    val = parse_yaml(value, f"--set {spec!r}", "the value is not valid YAML")
    node: object = raw
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, dict | list):
            raise FusechatError(f"--set {spec!r}: {_field_path(tuple(parts[:i]))} is not a section")
        nxt = node[part] if _has(node, part) else None
        if nxt is None:
            if isinstance(part, int):
                raise FusechatError(
                    f"--set {spec!r}: no item {part} at {_field_path(tuple(parts[:i]))}"
                )
            nxt = node[part] = {} if isinstance(parts[i + 1], str) else []
        node = nxt
    last = parts[-1]
    if isinstance(last, int) and not _has(node, last):
        raise FusechatError(f"--set {spec!r}: no item {last} at {_field_path(tuple(parts[:-1]))}")
    if not isinstance(node, dict | list):
        raise FusechatError(f"--set {spec!r}: {_field_path(tuple(parts[:-1]))} is not a section")
    node[last] = val


def _has(node: object, part: str | int) -> bool:
    if isinstance(part, int):
        return isinstance(node, list) and 0 <= part < len(node)
    return isinstance(node, dict) and part in node


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Parse and validate a recipe, with ``--set`` overrides applied first (validated like the
    file); any problem raises one-line ``FusechatError``."""
    raw = read_yaml(path, "recipe")
    for spec in overrides:
        apply_override(raw, spec)
    source = f"{path} (with --set {' '.join(overrides)})" if overrides else path
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise validation_error(source, e) from None

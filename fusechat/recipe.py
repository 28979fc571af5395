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

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fusechat.data import TEMPLATE_NAMES
from fusechat.errors import FusechatError

Dtype = Literal["auto", "float32", "bfloat16", "float16"]


def expand(path: str) -> str:
    """Expand ``~`` and environment variables in a recipe path; ``${FUSECHAT_CACHE}`` defaults to
    ``~/.cache/fusechat`` (where ``fusechat toy build`` and the tests keep the toy world)."""
    from fusechat.io import cache_dir

    cache = str(cache_dir())
    return os.path.expanduser(os.path.expandvars(path.replace("${FUSECHAT_CACHE}", cache)))


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Section):
    """A chat model: a local folder or a hub id (loaded by transformers' Auto classes)."""

    path: Annotated[str, Field(min_length=1)]
    name: str | None = None  # defaults to the last component of ``path``
    dtype: Dtype = "auto"
    template: str = "tokenizer"  # its own conversation format: a named template or 'tokenizer'
    # capture with backend vllm: GPUs one copy spans (NH2-Mixtral-8x7B in bf16: 2 x 80 GB)
    tensor_parallel_size: PositiveInt = 1

    @field_validator("template")
    @classmethod
    def _known_template(cls, v: str) -> str:
        if v not in TEMPLATE_NAMES:
            raise ValueError(f"unknown template {v!r} (known: {', '.join(TEMPLATE_NAMES)})")
        return v

    @property
    def label(self) -> str:
        return self.name or Path(self.path.rstrip("/")).name

    @property
    def resolved(self) -> str:
        return expand(self.path)

    def where(self) -> str:
        if Path(self.resolved).is_dir():
            return "local folder"
        return "hub id" if HUB_ID.match(self.path) else "missing local folder"


class Models(_Section):
    pivot: ModelSpec
    sources: Annotated[list[ModelSpec], Field(min_length=1)]

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


class Data(_Section):
    """The chat corpus every model scores; FuseChat renders all inputs with the pivot's template."""

    path: Annotated[str, Field(min_length=1)]
    format: Literal["auto", "messages", "sharegpt"] = "auto"
    max_rows: Annotated[int, Field(gt=0)] | None = None
    template: str | None = None  # None: the pivot's template
    strict: bool = False  # fail on the first malformed row instead of skipping it

    @field_validator("template")
    @classmethod
    def _known_template(cls, v: str | None) -> str | None:
        return ModelSpec._known_template(v) if v is not None else v


PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]


class CaptureSection(_Section):
    """``fusechat capture`` for the pivot and every source (FuseChat: K = 10, 2048 tokens)."""

    k: PositiveInt = 10
    max_length: PositiveInt = 2048
    overflow: Literal["truncate", "split"] = "truncate"
    backend: Literal["hf", "vllm"] = "hf"
    batch_tokens: PositiveInt = 8192
    shard_rows: PositiveInt = 256
    # sources only: greedy tokens stored after each alternative candidate, so the text
    # alignment maps a word fragment (`Ġp` of ` pane`) to the pivot token the word begins
    # with; costs one short generation per candidate above lookahead_min_prob
    lookahead: NonNegativeInt = 0
    lookahead_min_prob: Annotated[float, Field(ge=0.0, le=1.0)] = 0.02
    # data-parallel ranks on this node (torchrun; backend hf): each scores its share of the
    # shards on its own GPU, the same bytes as one process. Several nodes: README
    processes: PositiveInt = 1


class AlignSection(_Section):
    """``fusechat align`` of each source to the pivot (``fusechat.align``: ``text`` maps by
    continuation text; ``exact``, ``mined``, ``stats`` are the baselines)."""

    method: Literal["text", "exact", "mined", "stats"] = "text"
    sequence: Literal["offsets", "dtw"] = "offsets"  # the baselines' position pairing
    workers: PositiveInt = 1  # processes sharing the shards (the output is the same)

    @model_validator(mode="after")
    def _text_by_offsets(self) -> AlignSection:
        if self.method == "text" and self.sequence != "offsets":
            raise ValueError("method 'text' aligns by byte offsets (sequence: offsets)")
        return self


class FuseSection(_Section):
    """``fusechat fuse``: pairwise (pivot + one source) per target, as FuseChat does."""

    method: Literal["minCE", "avgCE"] = "minCE"
    ce_norm: Literal["token", "char"] = "token"
    unaligned: Literal["gold", "pivot"] = "gold"  # target where no chosen model has one
    workers: PositiveInt = 1  # processes sharing the shards (the output is the same)


class LoraSection(_Section):
    r: PositiveInt = 16
    alpha: PositiveInt = 32
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.05
    target_modules: list[str] | str = "all-linear"


class TrainSection(_Section):
    """``fusechat train`` of one target per source (FuseChat's defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    lam: Annotated[float, Field(ge=0, le=1, alias="lambda")] = 0.9
    temperature: Annotated[float, Field(gt=0)] = 1.0
    fusion_loss: Literal["ce", "kl"] = "ce"
    lr: Annotated[float, Field(gt=0)] = 5e-6
    epochs: Annotated[float, Field(gt=0)] = 3.0
    max_steps: int = -1  # optimizer steps; -1: as many as ``epochs`` make
    batch_size: PositiveInt = 128
    micro_batch_size: PositiveInt = 4
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.03
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    max_length: PositiveInt = 2048
    gradient_checkpointing: bool = True
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    save_steps: PositiveInt = 200
    logging_steps: PositiveInt = 10
    heldout: str | None = None  # held-out conversations whose loss is logged while training
    eval_steps: Annotated[int, Field(ge=0)] = 0  # that curve's interval (0: never)
    lora: LoraSection | None = None
    clm_baseline: bool = False  # also train lambda = 1 on the pivot's capture (the CLM baseline)
    launcher: str | None = None  # an accelerate config file: run training under accelerate launch

    @field_validator("max_steps")
    @classmethod
    def _steps(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError("must be -1 (train for epochs) or at least 1")
        return v


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


class Recipe(_Section):
    name: Annotated[str, Field(min_length=1, pattern=r"^[\w.-]+$")]
    run_dir: str = "runs"
    seed: int = 0
    models: Models
    data: Data
    capture: CaptureSection = CaptureSection()
    align: AlignSection = AlignSection()
    fuse: FuseSection = FuseSection()
    train: TrainSection = TrainSection()
    merge: MergeSection = MergeSection()
    eval: EvalSection = EvalSection()

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
        c, a, f = self.capture, self.align, self.fuse
        lines.append(
            f"  capture top-{c.k}, max length {c.max_length} ({c.overflow}), backend {c.backend}"
        )
        lines.append(f"  align  {a.method}" + (f" ({a.sequence})" if a.method != "text" else ""))
        lines.append(f"  fuse   {f.method} (cross-entropy per {f.ce_norm}), pairwise per source")
        t = self.train
        lines.append(
            f"  train  lambda {t.lam}, lr {t.lr}, {t.epochs if t.max_steps < 0 else t.max_steps} "
            f"{'epochs' if t.max_steps < 0 else 'steps'}, batch {t.batch_size}"
            + (f", LoRA r={t.lora.r}" if t.lora else "")
            + (", plus the CLM-only baseline" if t.clm_baseline else "")
        )
        lines.append(f"  merge  {', '.join(m.name for m in self.merge.methods)}")
        if self.eval.kind != "none":
            lines.append(f"  eval   {self.eval.kind} on {self.eval.questions}")
        return lines


def _field_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def read_yaml(path: str | Path, what: str) -> dict:
    """A YAML file that must hold a mapping; any problem raises a one-line ``FusechatError``
    naming ``what`` the file was meant to be."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FusechatError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FusechatError(f"{path}: cannot read {what} ({e})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise FusechatError(f"{path}: YAML syntax error{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise FusechatError(f"{path}: a {what} must be a mapping, got {type(raw).__name__}")
    return raw


def validation_error(source: str | Path, e: ValidationError) -> FusechatError:
    """pydantic's first error as ``source: field.path: message (+N more)``."""
    err = e.errors()[0]
    field = _field_path(err["loc"]) or "(top level)"
    msg = err["msg"]
    msg = {
        "Field required": "field required",
        "Extra inputs are not permitted": "unknown field",
    }.get(msg, msg)
    msg = msg.removeprefix("Value error, ")
    more = f" (+{len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return FusechatError(f"{source}: {field}: {msg}{more}")


def check_options(section: type[BaseModel], values: dict, prefix: str = "") -> None:
    """Command-line options checked by the recipe section that declares them (one rule for
    both): the first error as ``--option: message``."""
    try:
        section.model_validate(values)
    except ValidationError as e:
        err = e.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else ""
        flag = "--" + prefix + {"lam": "lambda"}.get(name, name).replace("_", "-")
        raise FusechatError(f"{flag}: {err['msg'].removeprefix('Value error, ')}") from None


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
    try:
        val = yaml.safe_load(value)
    except yaml.YAMLError:
        raise FusechatError(f"--set {spec!r}: the value is not valid YAML") from None
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

"""Every stage's settings, declared once.

A stage takes one config object. The recipe's section for the stage is that object (or its
base, with the recipe's own extras), the stage's command-line options are derived from its
fields (``add_options`` / ``from_options``: names, types, choices, defaults and help), and a
launcher hands the same object to its processes as JSON. Each field's ``description`` is its
help text; ``SPEED`` names the fields that change how fast a stage runs, never what it writes,
and so stay out of the keys that name outputs.
"""

from __future__ import annotations

import argparse
import json
import types
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fusechat.aligners import ALIGNERS
from fusechat.data import TEMPLATE_NAMES
from fusechat.errors import FusechatError, first_line

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Template = Literal[TEMPLATE_NAMES]  # type: ignore[valid-type]


class Config(BaseModel):
    """Frozen, closed settings: an unknown field is an error, so a typo never passes; every
    float is finite (``inf`` passes any bound check and trains a model of NaNs)."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False
    )
    SPEED: ClassVar[frozenset[str]] = frozenset()

    def key(self) -> dict:
        """The settings that shape the output (``SPEED`` left out)."""
        return self.model_dump(exclude=set(self.SPEED))


# --------------------------------------------------------------------------- capture


class DataSpec(Config):
    """A chat corpus and how to read it."""

    path: Annotated[str, Field(min_length=1, description="chat corpus (.json, .jsonl, "
                                                         ".parquet, dataset folder or hub id)")]  # fmt: skip
    format: Literal["auto", "messages", "sharegpt"] = Field(
        "auto", description="corpus row format (auto: detected per row)"
    )
    max_rows: PositiveInt | None = Field(None, description="use only the first N rows")
    strict: bool = Field(
        False, description="fail on the first malformed row (default: skip it and report it)"
    )


class ModelSettings(Config):
    """How one model is loaded for capture."""

    dtype: Dtype = Field("auto", description="auto: bf16 on GPUs that support it, else float32")
    tensor_parallel_size: PositiveInt = Field(
        1, description="backend vllm: GPUs one copy of the model spans"
    )


class CaptureSettings(Config):
    """What every model's capture shares (FuseChat: K = 10, 2048 tokens)."""

    k: PositiveInt = Field(10, description="top-K kept per position")
    max_length: PositiveInt = Field(2048, description="tokens per sequence")
    overflow: Literal["truncate", "split"] = Field(
        "truncate",
        description="longer sequences: keep the first max-length tokens, or score them in "
        "consecutive windows; both are counted",
    )
    backend: Literal["hf", "vllm"] = Field("hf", description="inference engine")
    batch_tokens: PositiveInt = Field(8192, description="padded tokens per forward pass")
    shard_rows: PositiveInt = Field(256, description="conversations per shard")
    lookahead: NonNegativeInt = Field(
        0,
        description="for a source: greedy tokens stored after each alternative candidate, so "
        "the text alignment maps a word fragment (`Ġp` of ` pane`) by the word it begins; "
        "one short generation per candidate above lookahead-min-prob (0: none)",
    )
    lookahead_min_prob: Probability = Field(
        0.02, description="candidates below this probability get no continuation"
    )


class CaptureSection(CaptureSettings):
    """The recipe's ``capture`` section: the shared settings and how many processes run it."""

    SPEED = frozenset({"batch_tokens", "processes"})
    processes: PositiveInt = Field(
        1,
        description="data-parallel ranks on this node (torchrun; backend hf): each scores its "
        "share of the shards on its own GPU, the same bytes as one process",
    )


class CaptureConfig(CaptureSettings, ModelSettings):
    """One model's capture."""

    SPEED = frozenset({"batch_tokens"})
    model: Annotated[str, Field(min_length=1, description="model folder or hub id")]
    template: Template = Field(
        "tokenizer",
        description="conversation template; FuseChat renders every model's input with the "
        "pivot's (tokenizer: the tokenizer's chat_template)",
    )
    render_with: str | None = Field(
        None,
        description="with template tokenizer: render with this model's chat template and "
        "special tokens (the pivot's, as FuseChat does), so every capture sees the same text",
    )

    @model_validator(mode="after")
    def _tp_is_vllm(self) -> CaptureConfig:
        if self.tensor_parallel_size > 1 and self.backend != "vllm":
            raise ValueError("tensor_parallel_size is a vllm setting (backend hf spreads a large "
                             "model over the GPUs with device_map auto)")  # fmt: skip
        return self


class CaptureJob(Config):
    """A whole capture: what ``fusechat run`` hands ``torchrun`` as one JSON file."""

    config: CaptureConfig
    data: DataSpec
    out: str


# --------------------------------------------------------------------------- align, fuse


AlignMethod = Literal[tuple(ALIGNERS)]  # the registry of fusechat.aligners


class AlignConfig(Config):
    """``fusechat align`` of a source to the pivot (``text`` maps by continuation text;
    ``exact``, ``mined``, ``stats`` are the baselines)."""

    SPEED = frozenset({"workers"})
    method: AlignMethod = Field("text", description="how source candidates become pivot tokens")
    sequence: Literal["offsets", "dtw"] = Field(
        "offsets", description="the baselines' position pairing; text needs offsets"
    )
    inside: Literal["conditional", "gold"] = Field(
        "conditional",
        description="text: where the pivot position is inside a source token, the source's "
        "candidates that extend the text read, or the gold path alone",
    )
    branches: NonNegativeInt = Field(0, description="text, lookahead captures: pivot tokens "
                                     "kept of each alternative's continuation, trained on (0: none)")  # fmt: skip
    pivot_tokenizer: str | None = Field(
        None, description="tokenizer path (default: the captured model's)"
    )
    source_tokenizer: str | None = Field(
        None, description="tokenizer path (default: the captured model's)"
    )
    workers: PositiveInt = Field(
        1, description="processes sharing the shards; the output is the same for any number"
    )

    @model_validator(mode="after")
    def _sequence_the_method_supports(self) -> AlignConfig:
        from fusechat.aligners import aligner_class

        allowed = aligner_class(self.method).sequences
        if self.sequence not in allowed:
            raise ValueError(
                f"method {self.method!r} pairs positions by {' or '.join(allowed)} "
                f"(sequence: {allowed[0]})"
            )
        return self


class FuseConfig(Config):
    """``fusechat fuse``: pairwise (pivot + one source) per target, as FuseChat does."""

    SPEED = frozenset({"workers"})
    method: Literal["minCE", "avgCE"] = Field(
        "minCE",
        description="minCE keeps the distribution with the lowest cross-entropy on the gold "
        "text, avgCE weights them by softmax(-CE)",
    )
    ce_norm: Literal["token", "char"] = Field(
        "token", description="cross-entropy per learned token (the reference) or per character"
    )
    unit: Literal["sequence", "turn"] = Field(
        "sequence",
        description="what minCE/avgCE choose for: each conversation (FuseLLM, FuseChat) or "
        "each assistant turn (a multi-turn conversation can mix skills: each turn gets the model "
        "that reads that turn best)",
    )
    unaligned: Literal["gold", "pivot"] = Field(
        "gold",
        description="target where no chosen model has a distribution: one-hot on the gold "
        "next token (FuseChat-2.0) or the pivot's own distribution (FuseLLM)",
    )
    workers: PositiveInt = Field(
        1, description="processes sharing the shards; the output is the same for any number"
    )


# --------------------------------------------------------------------------- implicit fusion


class SampleSettings(Config):
    """How every model samples (FuseChat-3.0: 5 responses per prompt, temperature 0.8, top-p
    0.95); nothing else of the model's generation_config.json applies but its stop tokens."""

    n: PositiveInt = Field(5, description="responses per prompt")
    temperature: Annotated[float, Field(gt=0)] = Field(0.8, description="sampling temperature")
    top_p: Annotated[float, Field(gt=0, le=1)] = Field(
        0.95, description="nucleus sampling: the smallest set of tokens holding this mass"
    )
    max_new_tokens: PositiveInt = Field(2048, description="tokens per response at most")
    template: Template = Field(
        "tokenizer",
        description="conversation template the prompts are rendered with (tokenizer: the "
        "tokenizer's chat_template, the model's own format)",
    )
    batch_size: PositiveInt = Field(
        16,
        description="prompts per generate call (each with n sequences); part of the output's "
        "key: the random numbers a response draws depend on the batch it is in",
    )
    shard_rows: PositiveInt = Field(256, description="prompts per shard")
    seed: Annotated[int, Field(ge=0, lt=2**32)] = Field(
        0, description="sampling seed; each shard draws from its own seed derived from it"
    )


class SampleConfig(SampleSettings):
    """``fusechat sample``: one model's responses to a prompt set."""

    model: Annotated[str, Field(min_length=1, description="model folder or hub id")]
    dtype: Dtype = Field("auto", description="auto: bf16 on GPUs that support it, else float32")


REWARD_NAMES = ("toy", "hf", "judge")  # fusechat.rewards.REWARDS holds each one's class


class ScoreConfig(Config):
    """``fusechat score``: one reward for every response."""

    SPEED = frozenset({"batch_size", "concurrency"})
    reward: Literal[REWARD_NAMES] = Field(  # type: ignore[valid-type]
        description="toy: 1 where the toy rule judge accepts the response for one of the row's "
        "answers, else 0 (a correctness check); hf: a Hugging Face reward model's score; "
        "judge: an OpenAI-compatible chat endpoint's 1-10 rating"
    )
    reward_model: str | None = Field(
        None,
        description="hf: the reward model (a sequence classifier with one label), folder or hub id",
    )
    template: Template = Field(
        "tokenizer",
        description="hf: how the reward model reads a conversation (tokenizer: its own "
        "chat_template)",
    )
    max_length: PositiveInt = Field(
        4096, description="hf: tokens per conversation; a longer one keeps its end (the response)"
    )
    dtype: Dtype = Field("auto", description="hf: auto: bf16 on GPUs that support it, else float32")
    batch_size: PositiveInt = Field(8, description="hf: conversations per forward pass")
    judge_url: str | None = Field(
        None, description="judge: the endpoint's base URL (e.g. http://127.0.0.1:8000/v1)"
    )
    judge_model: str | None = Field(None, description="judge: the model name it serves")
    judge_api_key_env: str = Field(
        "OPENAI_API_KEY",
        description="judge: the environment variable holding its API key (unset: no key)",
    )
    concurrency: PositiveInt = Field(8, description="judge: requests in flight")

    def key(self) -> dict:
        """Without the key's location (a secret's address, not a setting) and, for the other
        rewards, without the judge's fields (their keys as before the judge existed)."""
        k = self.model_dump(exclude=set(self.SPEED) | {"judge_api_key_env"})
        if self.reward != "judge":
            del k["judge_url"], k["judge_model"]
        return k

    @model_validator(mode="after")
    def _model_for_hf(self) -> ScoreConfig:
        if self.reward == "hf" and not self.reward_model:
            raise ValueError("reward hf needs a reward model (--reward-model)")
        if self.reward != "hf" and self.reward_model:
            raise ValueError(f"reward {self.reward} reads no reward model (--reward-model is "
                             "for reward hf)")  # fmt: skip
        if self.reward == "judge" and not (self.judge_url and self.judge_model):
            raise ValueError("reward judge needs judge_url and judge_model (--judge-url, "
                             "--judge-model)")  # fmt: skip
        if self.reward != "judge" and (self.judge_url or self.judge_model):
            raise ValueError(f"reward {self.reward} asks no judge (--judge-url and "
                             "--judge-model are for reward judge)")  # fmt: skip
        return self


class PairsConfig(Config):
    """``fusechat pairs``: the SFT set and the preference pairs (FuseChat-3.0, WRPO)."""

    min_gap: Annotated[float, Field(ge=0)] = Field(
        0.01, description="a pair's reward gap (best - worst of one model) at least this"
    )
    max_gap: Annotated[float, Field(gt=0)] | None = Field(
        None, description="and at most this (default: no bound; the paper's 0.1 for ArmoRM)"
    )
    sft_share: Probability = Field(
        0.4,
        description="share of the prompts for SFT, the rest for preference pairs (the "
        "paper's 4:6), chosen by a hash of each prompt",
    )

    @model_validator(mode="after")
    def _window(self) -> PairsConfig:
        if self.max_gap is not None and self.max_gap < self.min_gap:
            raise ValueError(f"max_gap {self.max_gap} is below min_gap {self.min_gap}")
        return self


# --------------------------------------------------------------------------- train


class LoraConfig(Config):
    r: PositiveInt = Field(16, description="train a LoRA of this rank (merged at the end)")
    alpha: PositiveInt | None = Field(None, description="LoRA alpha (default 2r)")
    dropout: Annotated[float, Field(ge=0, lt=1)] = Field(0.05, description="LoRA dropout")
    target_modules: tuple[str, ...] | str = Field(
        "all-linear", description="module names, or all-linear"
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _one_name(cls, v: Any) -> Any:
        if isinstance(v, list | tuple) and list(v) == ["all-linear"]:
            return "all-linear"
        return tuple(v) if isinstance(v, list) else v

    @property
    def scale(self) -> int:
        return self.alpha or 2 * self.r


# TrainingArguments that fusechat's own settings decide (train._trainer): not for ``extra``
TRAINER_OWNED = frozenset({
    "output_dir", "per_device_train_batch_size", "gradient_accumulation_steps",
    "learning_rate", "num_train_epochs", "max_steps", "lr_scheduler_type", "warmup_steps",
    "warmup_ratio", "weight_decay", "logging_steps", "save_strategy", "save_steps", "seed",
    "data_seed", "gradient_checkpointing", "activation_checkpointing", "remove_unused_columns",
    "bf16", "fp16", "include_num_input_tokens_seen", "use_cpu",
})  # fmt: skip
Seed = Annotated[int, Field(ge=0, lt=2**32, description="data order and initialisation "
                                                        "(numpy's range, 0 to 2**32 - 1)")]  # fmt: skip


def _steps_rule(v: int) -> int:
    if v == 0 or v < -1:
        raise ValueError("must be -1 (train for epochs) or at least 1")
    return v


class OptimSettings(Config):
    """What every training shares, fusion (``fusechat train``) and TRL's (``sft``, ``dpo``):
    the optimizer, its schedule, the batch, checkpoints and logging (defaults: the FuseChat
    paper's, 7B on 8 GPUs)."""

    lr: Annotated[float, Field(gt=0)] = Field(5e-6, description="learning rate")
    epochs: Annotated[float, Field(gt=0)] = Field(3.0, description="passes over the data")
    max_steps: int = Field(-1, description="optimizer steps; -1: as many as epochs make")
    batch_size: PositiveInt = Field(
        128, description="effective batch: micro batch x accumulation x processes"
    )
    micro_batch_size: PositiveInt = Field(4, description="rows per device and forward pass")
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = Field(0.03, description="warm-up share")
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="learning-rate schedule"
    )
    weight_decay: Annotated[float, Field(ge=0)] = Field(0.0, description="AdamW weight decay")
    max_length: PositiveInt = Field(2048, description="tokens per row")
    gradient_checkpointing: bool = Field(
        True, description="recompute activations (less memory, slower)"
    )
    save_steps: PositiveInt = Field(200, description="checkpoint interval")
    logging_steps: PositiveInt = Field(10, description="log interval")
    lora: LoraConfig | None = Field(None, description="a LoRA instead of full fine-tuning")

    @field_validator("max_steps")
    @classmethod
    def _steps(cls, v: int) -> int:
        return _steps_rule(v)


class TrainSettings(OptimSettings):
    """Training shared by the recipe and ``fusechat train`` (defaults: the FuseChat paper's,
    7B on 8 GPUs)."""

    lam: Annotated[float, Field(ge=0, le=1, alias="lambda")] = Field(
        0.9, description="weight of the causal-LM loss; 1 is plain SFT, the CLM baseline"
    )
    temperature: Annotated[float, Field(gt=0)] = Field(
        1.0, description="teacher temperature on the fused target"
    )
    fusion_loss: Literal["ce", "kl"] = Field("ce", description="the fusion term")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 where supported, else fp32"
    )
    heldout: str | None = Field(
        None,
        description="held-out conversations: their loss (nats/char) is logged with the "
        "tokens trained on, at the start and every eval-steps",
    )
    eval_steps: NonNegativeInt = Field(0, description="held-out curve interval (0: off)")
    extra: dict = Field(
        {}, description='more TrainingArguments as JSON, e.g. {"deepspeed": "ds.json"}'
    )

    @field_validator("extra")
    @classmethod
    def _training_arguments(cls, v: dict) -> dict:
        if not v:
            return v
        import dataclasses

        from transformers import TrainingArguments

        known = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
        for k in v:
            if k in TRAINER_OWNED:
                raise ValueError(f"{k!r} is set by fusechat from its own settings")
            if k not in known:
                raise ValueError(f"{k!r} is not a TrainingArguments field")
        return v


class TrainConfig(TrainSettings):
    """One training run (``fusechat train``)."""

    seed: Seed = 0


class TrainJob(Config):
    """A whole training run: what ``fusechat run`` hands ``accelerate launch`` as one file."""

    config: TrainConfig
    model: str
    data: str
    out: str


# --------------------------------------------------------------------------- sft, dpo


class PreferSettings(OptimSettings):
    """What ``fusechat sft`` and ``fusechat dpo`` (TRL's trainers, implicit fusion) share;
    defaults are FuseChat-3.0's for Llama-3.1-8B-Instruct where the paper gives them."""

    template: Template = Field(
        "tokenizer",
        description="conversation template (tokenizer: the model's own chat_template); a named "
        "one becomes the trained model's chat_template",
    )
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = Field(0.1, description="warm-up share")
    max_length: PositiveInt = Field(
        2048, description="tokens per sequence (prompt and response); longer ones keep their start"
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="the weights' dtype in training (bfloat16 also computes in bf16); auto: "
        "bfloat16 on GPUs that support it, else float32",
    )


class SftConfig(PreferSettings):
    """``fusechat sft``: supervised fine-tuning on the assistant turns (TRL SFTTrainer)."""

    seed: Seed = 0


# DPO loss names: fusechat's -> TRL's DPOConfig.loss_type (the rest pass through unchanged)
DPO_LOSSES = ("sigmoid", "length_normalized", "hinge", "ipo", "nca_pair", "bco_pair",
              "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop")  # fmt: skip


class DpoSettings(PreferSettings):
    """Preference optimisation against the starting model (TRL DPOTrainer)."""

    lr: Annotated[float, Field(gt=0)] = Field(8e-7, description="learning rate")
    epochs: Annotated[float, Field(gt=0)] = Field(1.0, description="passes over the pairs")
    beta: Annotated[float, Field(gt=0)] = Field(
        0.01,
        description="how far the model may move from the reference (FuseChat-3.0: 0.01 with "
        "sigmoid; 10 with length_normalized for Llama-3.1-8B)",
    )
    loss: Literal[DPO_LOSSES] = Field(  # type: ignore[valid-type]
        "sigmoid",
        description="sigmoid: DPO, -log sigmoid(beta * (chosen - rejected log-ratio to the "
        "reference, summed over tokens)); length_normalized: the same over each response's "
        "per-token mean (TRL's sigmoid_norm); the others: TRL's loss_type of that name",
    )


class DpoConfig(DpoSettings):
    """``fusechat dpo``: one preference-optimisation run."""

    seed: Seed = 0


def job_command(launcher: list[str], stage: str, job: Config, job_file: Path) -> list[str]:
    """``launcher`` (torchrun, accelerate launch) running ``fusechat STAGE --config
    JOB_FILE``, with the job written there whole: no setting is dropped on the way to the
    processes."""
    from fusechat.io import write_atomic

    write_atomic(job_file, job.model_dump_json(indent=1))
    return [*launcher, "-m", "fusechat.cli", stage, "--config", str(job_file)]


def read_job(cls: type[Config], path: str) -> Config:
    """A job file written by ``job_command``; one line if it is not one."""
    try:
        return cls.model_validate_json(Path(path).read_text())
    except OSError as e:
        raise FusechatError(f"{path}: cannot read ({e.strerror})") from None
    except ValidationError as e:
        what = cls.__name__.removesuffix("Job").lower()
        raise FusechatError(f"{path}: not a {what} job ({first_line(e)})") from None


# --------------------------------------------------------------------------- options


def _json(text: str) -> Any:
    return json.loads(text)


_json.__name__ = "JSON"  # argparse names it: "invalid JSON value: 'not json'"


def _flag(name: str, field, prefix: str, flags: dict[str, str]) -> str:
    return "--" + (prefix + flags.get(name, field.alias or name)).replace("_", "-")


def _unwrap(annotation: Any) -> Any:
    """``X | None`` -> X (the first non-None member of a union)."""
    if get_origin(annotation) in (Union, types.UnionType):
        return next(a for a in get_args(annotation) if a is not type(None))
    return annotation


def add_options(
    parser: argparse.ArgumentParser,
    cls: type[Config],
    skip: tuple[str, ...] = (),
    flags: dict[str, str] | None = None,
    prefix: str = "",
) -> None:
    """One option per field of ``cls``: ``--max-length`` for ``max_length``, choices from a
    Literal, a switch for a bool (``--no-X`` when it defaults to true), help and default from
    the field. Options left out stay None, and the config's own defaults apply."""
    flags = flags or {}
    for name, f in cls.model_fields.items():
        if name in skip:
            continue
        kind = _unwrap(f.annotation)
        if isinstance(kind, type) and issubclass(kind, Config):
            continue  # nested settings are added with their own prefix
        default = None if f.is_required() else f.get_default(call_default_factory=True)
        shown = "" if default in (None, {}, "") else f" (default {default})"
        if default not in (None, {}, "") and prefix and kind is not bool:
            shown = f" (default {default} once {prefix.rstrip('_')} is on)"
        kw: dict[str, Any] = {"dest": prefix + name, "help": f"{f.description}{shown}"}
        flag = _flag(name, f, prefix, flags)
        if kind is bool:
            if default:
                flag = "--no-" + flag[2:]
                kw.update(action="store_const", const=False,
                          help=f"turn off: {f.description} (on by default)")  # fmt: skip
            else:
                kw.update(action="store_const", const=True)
        elif get_origin(kind) is Literal:
            kw.update(choices=list(get_args(kind)), type=type(get_args(kind)[0]))
        elif get_origin(kind) in (tuple, list):
            kw.update(nargs="+")
        elif kind is dict:
            kw.update(type=_json, metavar="JSON")
        else:
            kw.update(type=kind)
        if kind is not bool and "metavar" not in kw and "choices" not in kw:
            kw["metavar"] = flag[2:].upper().replace("-", "_")
        parser.add_argument(flag, **kw)


def option_values(args: argparse.Namespace, cls: type[Config], prefix: str = "") -> dict:
    """The options of ``cls`` that were given, by field name."""
    out = {}
    for name in cls.model_fields:
        v = getattr(args, prefix + name, None)
        if v is not None:
            out[name] = v
    return out


def from_options(
    cls: type[Config],
    values: dict,
    flags: dict[str, str] | None = None,
    prefix: str = "",
) -> Config:
    """``cls`` from option values, checked by its own rules: the first error as one line
    naming the option, ``--max-length: Input should be greater than 0``."""
    try:
        return cls.model_validate(values)
    except ValidationError as e:
        raise options_error(cls, e, flags, prefix) from None


def options_error(
    cls: type[Config], e: ValidationError, flags: dict[str, str] | None = None, prefix: str = ""
) -> FusechatError:
    err = e.errors()[0]
    msg = err["msg"].removeprefix("Value error, ")
    model, name = cls, ""
    for part in (str(p) for p in err["loc"] if not isinstance(p, int)):
        if name:  # nested settings: lora.r -> --lora-r
            inner = _unwrap(model.model_fields[name].annotation)
            model, prefix = inner, f"{prefix}{name}_"
        name = next((n for n, f in model.model_fields.items() if part in (n, f.alias)), part)
    field = model.model_fields.get(name)
    if field is None:  # a rule over several fields: its message names them
        return FusechatError(msg)
    return FusechatError(f"{_flag(name, field, prefix, flags or {})}: {msg}")

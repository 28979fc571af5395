"""Every stage's settings, declared once.

A stage takes one config object. The recipe's section for the stage is that object (or its
base, with the recipe's own extras), the stage's command-line options are derived from its
fields (``fusechat.options``: names, types, choices, defaults and help), and a launcher hands
the same object to its processes as JSON. Implicit fusion's settings are in
``fusechat.implicit.settings``. Each field's ``description`` is its
help text; ``SPEED`` names the fields that change how fast a stage runs, never what it writes,
and so stay out of the keys that name outputs.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fusechat.aligners import ALIGNERS
from fusechat.data import TEMPLATE_NAMES

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
        from fusechat.aligners import sequence_error

        if error := sequence_error(self.method, self.sequence):
            raise ValueError(error)
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
        "auto",
        description="the compute (autocast); full fine-tuning keeps float32 master weights, "
        "saved in the model's own dtype; auto: bf16 where supported, else fp32",
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

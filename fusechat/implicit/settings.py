"""Implicit fusion's settings (FuseChat-3.0): sampling, scoring, pairing, SFT and DPO. Each is
a ``fusechat.configs.Config``, so it gives a recipe section, CLI options and a job file, as
the explicit stages' settings do."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from fusechat.configs import (
    Config,
    Dtype,
    OptimSettings,
    PositiveInt,
    Probability,
    Seed,
    Template,
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


REWARD_NAMES = ("toy", "hf", "judge")  # fusechat.implicit.rewards.REWARDS holds each one's class


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
        description="the compute in training (bfloat16: autocast; full fine-tuning keeps "
        "float32 master weights, saved in the model's own dtype) and DPO's reference weights; "
        "auto: bfloat16 on GPUs that support it, else float32",
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

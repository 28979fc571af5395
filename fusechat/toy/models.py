"""Tiny chat models of the real architectures, trained briefly so each has its own strength.

The pivot is a ``MistralForCausalLM`` (OpenChat-3.5 is a Mistral), one source a
``MixtralForCausalLM`` with 4 experts (NH2-Mixtral-8x7B), the other a deeper, wider
``LlamaForCausalLM`` (NH2-SOLAR-10.7B is a Llama). Heads are 64 wide so vLLM serves them too.
Each model sees the same corpus with its own skill mixture, so each is best at a different skill.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm
from transformers import LlamaConfig, MistralConfig, MixtralConfig, PreTrainedModel

from fusechat.data import Encoded, collate, encode
from fusechat.losses import predicts_label, token_nll

_CONFIGS = {"mistral": MistralConfig, "mixtral": MixtralConfig, "llama": LlamaConfig}


@dataclass(frozen=True)
class ToyModelSpec:
    name: str
    arch: str  # mistral | mixtral | llama
    tokenizer: str  # a kind of fusechat.toy.tokenizers.train_tokenizer
    vocab_size: int
    templates: tuple[str, ...]  # conversation templates it is trained on; the first is its own
    mix: dict[str, float]  # skill weights of its training data
    config: dict = field(default_factory=dict)


SPECS = (
    ToyModelSpec(
        name="openchat-mini",
        arch="mistral",
        tokenizer="sp-bpe",
        vocab_size=700,
        templates=("openchat",),
        mix={"arithmetic": 4.0, "facts": 1.0, "glossary": 1.0},
        config=dict(
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            sliding_window=None,
        ),
    ),
    ToyModelSpec(
        name="nh2-mixtral-mini",
        arch="mixtral",
        tokenizer="byte-bpe",
        vocab_size=900,
        # NH2 models speak ChatML, but FuseChat feeds every model the pivot's template.
        templates=("chatml", "openchat"),
        mix={"facts": 6.0, "glossary": 1.0, "arithmetic": 1.0},
        config=dict(
            hidden_size=128,
            intermediate_size=192,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=None,
        ),
    ),
    ToyModelSpec(
        name="nh2-solar-mini",
        arch="llama",
        tokenizer="sp-bpe",
        vocab_size=1400,  # the pivot's algorithm with twice its merges: other segmentations
        templates=("chatml", "openchat"),
        mix={"glossary": 6.0, "facts": 1.0, "arithmetic": 1.0},
        # deeper and wider, with full multi-head attention
        config=dict(
            hidden_size=192,
            intermediate_size=512,
            num_hidden_layers=3,
            num_attention_heads=3,
            num_key_value_heads=3,
        ),
    ),
)


def build_model(spec: ToyModelSpec, tokenizer, seed: int) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _CONFIGS[spec.arch](
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **spec.config,
    )
    return AutoModelForCausalLM.from_config(config)


def _learned_nll(model: PreTrainedModel, batch: dict) -> torch.Tensor:
    """NLL of every learned (assistant) next token in a collated batch, as a flat tensor."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return token_nll(logits, batch["input_ids"])[predicts_label(batch["labels_mask"])]


def train_model(
    model: PreTrainedModel,
    tokenizer,
    rows: Sequence[dict],
    spec: ToyModelSpec,
    steps: int,
    seed: int,
    batch_size: int = 32,
    lr: float = 3e-3,
) -> list[float]:
    """AdamW with warmup and cosine decay on assistant tokens; rows drawn by ``spec.mix``."""
    rng = random.Random(seed)
    encoded = [
        encode(r["messages"], tokenizer, rng.choice(spec.templates), max_length=256) for r in rows
    ]
    weights = torch.tensor([spec.mix.get(r["skill"], 1.0) for r in rows])
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / steps))),
    )
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc=f"train {spec.name}", leave=False):
        idx = torch.multinomial(weights, batch_size, replacement=True, generator=gen)
        loss = _learned_nll(
            model, collate([encoded[i] for i in idx], tokenizer.pad_token_id)
        ).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def loss_per_char(
    model: PreTrainedModel, tokenizer, rows: Sequence[dict], template: str, batch_size: int = 64
) -> float:
    """Held-out loss in nats per character of assistant text: sum of token NLLs over the
    learned tokens divided by their characters, comparable across tokenizers."""
    model.eval()
    total_nll, total_chars = 0.0, 0
    for i in range(0, len(rows), batch_size):
        encs: list[Encoded] = [
            encode(r["messages"], tokenizer, template) for r in rows[i : i + batch_size]
        ]
        total_nll += _learned_nll(model, collate(encs, tokenizer.pad_token_id)).sum().item()
        total_chars += sum(end - start for e in encs for start, end in e.assistant_spans)
    return total_nll / max(total_chars, 1)

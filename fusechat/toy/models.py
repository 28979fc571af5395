"""Tiny chat models of the real architectures, each pretrained on its own data of the language.

The pivot is a ``MistralForCausalLM`` (OpenChat-3.5 is a Mistral), one source a
``MixtralForCausalLM`` with 4 experts (NH2-Mixtral-8x7B), the other a deeper, wider
``LlamaForCausalLM`` (NH2-SOLAR-10.7B is a Llama). Heads are 64 wide so vLLM serves them too.

As in the papers, the sources are larger models pretrained on far more data than the fusion
corpus holds: every step draws fresh conversations from the language (``fusechat.toy.corpus``)
with the model's own skill mix (its specialty six times as often as the rest), about the items
it knows (``knows``: the share of this world's planets and words; it never sees the others).
The sources are complementary, as FuseChat's premise has them: each knows every item of its
specialty and only the common third of the other's (Mixtral: every planet, a third of the
words; Llama: every word, a third of the planets), so each pairwise target has something of
its own to inherit and a merge has two things to combine. The pivot is a broad chat model, as
a pretrained one is: best at arithmetic, it knows every planet and word, but learned how often
each value is said the wrong way round (every planet's, 40% of the words'), as from another
usage. What a source can teach it is that calibration: the right mass on every value, also on
values the corpus's few samples of an item never show, which no amount of fine-tuning on the
corpus alone recovers. Fine-tuning then moves the pivot a little (it learns frequencies, not
new items), as fine-tuning a pretrained chat model does. None of them sees the fusion corpus.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field

import torch
from tqdm import tqdm
from transformers import LlamaConfig, MistralConfig, MixtralConfig, PreTrainedModel

from fusechat.data import collate, encode
from fusechat.heldout import learned_nll

log = logging.getLogger(__name__)

_CONFIGS = {"mistral": MistralConfig, "mixtral": MixtralConfig, "llama": LlamaConfig}


@dataclass(frozen=True)
class ToyModelSpec:
    name: str
    arch: str  # mistral | mixtral | llama
    tokenizer: str  # a kind of fusechat.toy.tokenizers.train_tokenizer
    vocab_size: int
    templates: tuple[str, ...]  # conversation templates it is trained on; the first is its own
    mix: dict[str, float]  # skill weights of its pretraining data
    knows: dict[str, float]  # share of the planets (facts) and words (glossary) it learns
    steps: int  # pretraining steps of fresh conversations
    # share of the known planets / words (the last ones, sorted) whose values it learned in
    # reverse order of likelihood: it knows those items, not how often each value is said
    reversed: dict[str, float] = field(default_factory=dict)
    lr: float = 3e-3  # peak learning rate (the deeper Llama learns best at 1e-3)
    config: dict = field(default_factory=dict)


SPECS = (
    ToyModelSpec(
        name="openchat-mini",
        arch="mistral",
        tokenizer="sp-bpe",
        vocab_size=700,
        templates=("openchat",),
        mix={"arithmetic": 3.0, "facts": 1.0, "glossary": 1.0},
        knows={"facts": 1.0, "glossary": 1.0},
        # every planet's values the wrong way round, 40% of the words': the room each
        # source has to teach comes out about equal per character (facts answers hold
        # single-valued attributes too)
        reversed={"facts": 1.0, "glossary": 0.4},
        steps=1500,
        config=dict(
            hidden_size=192,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=3,
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
        mix={"facts": 4.0, "glossary": 2.0, "arithmetic": 1.0},
        knows={"facts": 1.0, "glossary": 1 / 3},  # complementary to the Llama's
        steps=900,
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
        mix={"glossary": 4.0, "facts": 2.0, "arithmetic": 1.0},
        knows={"glossary": 1.0, "facts": 1 / 3},  # complementary to the Mixtral's
        steps=1800,  # at 900 (768 questions): glossary 0.094, facts 0.078 nats/char; now 0.077, 0.046
        lr=1e-3,
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


def known_world(world, spec: ToyModelSpec):
    """What a model learns about: the first share (``spec.knows``) of the sorted planets and
    words (every model knows the same common third), the last share (``spec.reversed``) of
    those with their values in reverse order of likelihood, and with ``generic`` another
    world."""
    from fusechat.toy.corpus import GENERIC_SEED, make_world

    def share(items: list[str], skill: str, table: dict[str, float]) -> list[str]:
        return items[: round(len(items) * table.get(skill, 1.0))]

    known = world.subset(share(world.planets, "facts", spec.knows),
                         share(world.words, "glossary", spec.knows))  # fmt: skip
    flip_p = set(share(known.planets[::-1], "facts", {"facts": 0.0, **spec.reversed}))
    flip_w = set(share(known.words[::-1], "glossary", {"glossary": 0.0, **spec.reversed}))
    known.facts = {p: {a: v[::-1] for a, v in attrs.items()} if p in flip_p else attrs
                   for p, attrs in known.facts.items()}  # fmt: skip
    known.glossary = {w: v[::-1] if w in flip_w else v for w, v in known.glossary.items()}
    return known.union(make_world(GENERIC_SEED)) if spec.knows.get("generic") else known


def pretraining_rows(known, spec: ToyModelSpec, rng: random.Random, n: int) -> list[dict]:
    """``n`` fresh conversations of the model's own pretraining data, about ``known`` (its
    ``known_world``, built once: it holds a whole generic world for the pivot)."""
    from fusechat.toy.corpus import conversation

    return [conversation(known, rng, spec.mix) for _ in range(n)]


def train_model(
    model: PreTrainedModel,
    tokenizer,
    world,
    spec: ToyModelSpec,
    seed: int,
    batch_size: int = 16,
    progress: bool = True,
) -> list[float]:
    """AdamW with warmup and cosine decay to ``spec.lr`` on assistant tokens, ``spec.steps``
    steps, each on a batch of fresh pretraining conversations in one of the model's templates."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0, betas=(0.9, 0.98))
    steps = spec.steps
    known = known_world(world, spec)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / steps))),
    )
    model.train()
    losses = []
    for step in tqdm(range(steps), desc=f"train {spec.name}", leave=False, disable=not progress):
        if not progress and (step + 1) % max(1, steps // 4) == 0:  # side by side: log lines
            log.info("%s: step %d of %d", spec.name, step + 1, steps)
        rows = pretraining_rows(known, spec, rng, batch_size)
        encoded = [
            encode(r["messages"], tokenizer, rng.choice(spec.templates), max_length=256)
            for r in rows
        ]
        loss = learned_nll(model, collate(encoded, tokenizer.pad_token_id)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses

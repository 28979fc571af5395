"""Three genuinely different tokenizers trained with `tokenizers` on the toy corpus.

- ``sp-bpe``: SentencePiece-style BPE with the ``▁`` metaspace, split digits, byte fallback and
  BOS ``<s>`` (Mistral's and Llama's; OpenChat-3.5 uses Mistral's);
- ``byte-bpe``: GPT-2-style byte-level BPE (``Ġ``), no BOS.

The third model reuses ``sp-bpe`` with a larger vocabulary: other merges, so other segmentations.
(A `tokenizers` Unigram model was tried for it; tiny models could not learn addition through its
segmentation of numbers, so the skill the toy world needs could not be shown.)

Each is wrapped as an ordinary HF fast tokenizer whose special tokens and chat template are
those of the model's conversation template (OpenChat's ``<|end_of_turn|>`` or ChatML's).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from fusechat.data import TEMPLATES


def _metaspace() -> tuple[pre_tokenizers.PreTokenizer, decoders.Metaspace]:
    """Metaspace pre-tokenizer that also splits digits one by one and isolates punctuation and
    newlines, as Llama's and Mistral's SentencePiece models do (digits; a change of Unicode
    script ends a piece; a newline is a byte token). GPT-2's byte-level BPE does neither."""
    kw = dict(replacement="▁", prepend_scheme="first", split=True)
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(**kw),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Split("\n", behavior="isolated"),  # a byte token of its own
        ]
    )
    return pre, decoders.Metaspace(**kw)


def _with_byte_fallback(tok: Tokenizer, n_special: int) -> Tokenizer:
    """Insert the 256 ``<0xNN>`` byte tokens after the specials, as SentencePiece does."""
    spec = json.loads(tok.to_str())
    old = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    vocab = {t: i for t, i in old[:n_special]}
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    for t, _ in old[n_special:]:
        vocab.setdefault(t, len(vocab))
    spec["model"]["vocab"] = vocab
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [spec["decoder"], {"type": "ByteFallback"}, {"type": "Fuse"}],
    }
    return Tokenizer.from_str(json.dumps(spec))


# conversation template -> (its marker tokens, end-of-turn token)
_TEMPLATE_SPECIALS = {
    "openchat": (["<|end_of_turn|>"], "<|end_of_turn|>"),
    "chatml": (["<|im_start|>", "<|im_end|>"], "<|im_end|>"),
}


def train_tokenizer(
    kind: str, texts: Iterable[str], vocab_size: int, template: str
) -> PreTrainedTokenizerFast:
    """Train a tokenizer of ``kind`` (``sp-bpe`` or ``byte-bpe``) on ``texts``, with the special
    tokens and chat template of the conversation ``template`` (``openchat`` or ``chatml``)."""
    texts = list(texts)
    markers, eot = _TEMPLATE_SPECIALS[template]
    if kind == "sp-bpe":
        specials = ["<unk>", "<s>", "</s>", *markers]
        tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
        tok.pre_tokenizer, tok.decoder = _metaspace()
        tok.train_from_iterator(
            texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials)
        )
        tok = _with_byte_fallback(tok, len(specials))
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
        names = dict(bos_token="<s>", eos_token=eot, unk_token="<unk>", pad_token="</s>")
    elif kind == "byte-bpe":
        specials = ["<|endoftext|>", *markers]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(
            trim_offsets=False
        )  # as GPT-2: spans include the space
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(texts, trainer)
        names = dict(bos_token="<|endoftext|>", eos_token=eot, pad_token="<|endoftext|>")
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **names)
    fast.chat_template = TEMPLATES[template].jinja
    return fast

"""Held-out loss of chat text in nats per character: the one measure of how well a model knows
a language, comparable across tokenizers (a model that cuts the same text into fewer tokens is
not rewarded for it). Used by the toy world's skill table, the toy evaluation and the held-out
curve that training logs."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fusechat.data import Encoded, TemplateRefused, collate, encode
from fusechat.errors import FusechatError
from fusechat.losses import predicts_label, token_nll


def learned_nll(model, batch: dict) -> torch.Tensor:
    """NLL of every learned (assistant) next token in a collated batch, as a flat tensor."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return token_nll(logits, batch["input_ids"])[predicts_label(batch["labels_mask"])]


def nll_per_char(
    model, tokenizer, rows: Sequence[dict], template: str = "tokenizer", batch_size: int = 64
) -> float:
    """``sum_t -log p(x_t+1 | x_<=t) / n_chars`` over the assistant tokens of ``rows``
    (conversations in ``messages`` form, rendered with ``template``: a named template or the
    tokenizer's own chat template), divided by the characters of the assistant turns."""
    total_nll, total_chars = nll_and_chars(model, tokenizer, rows, template, batch_size)
    return total_nll / max(total_chars, 1)


def _encoded(row: dict, tokenizer, template: str, n: int) -> Encoded:
    """A measured row must render: a set the template refuses in part would not measure every
    model on the same text, so a refusal is one line naming the row, not a skip."""
    try:
        return encode(row["messages"], tokenizer, template)
    except TemplateRefused as e:
        name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise FusechatError(f"held-out row {n}: {name}: the chat template refused it ({e})"
                            ) from None  # fmt: skip


@torch.no_grad()
def nll_and_chars(
    model, tokenizer, rows: Sequence[dict], template: str = "tokenizer", batch_size: int = 64
) -> tuple[float, int]:
    """The two sums of ``nll_per_char``, so that groups of rows can be pooled."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nll, total_chars = 0.0, 0
    for i in range(0, len(rows), batch_size):
        encs: list[Encoded] = [_encoded(r, tokenizer, template, i + j)
                               for j, r in enumerate(rows[i : i + batch_size])]  # fmt: skip
        batch = {k: v.to(device) for k, v in collate(encs, tokenizer.pad_token_id).items()}
        total_nll += learned_nll(model, batch).sum().item()
        total_chars += sum(end - start for e in encs for start, end in e.assistant_spans)
    model.train(was_training)
    return total_nll, total_chars

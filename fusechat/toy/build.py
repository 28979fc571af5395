"""Build the toy world: corpus, three tokenizers, three pretrained chat models, a skill table.

Layout of ``OUT``::

    corpus/train.jsonl        the fusion corpus (1,500 conversations, sampled answers)
    corpus/prompts.jsonl      the same conversations with each last question's right values
                              ('answers': implicit fusion's correctness check)
    corpus/heldout.jsonl      the held-out set of training's curve (fresh samples)
    corpus/questions.jsonl    the toy question set of evaluation (fresh samples, other draws;
                              every right answer listed)
    openchat-mini/  nh2-mixtral-mini/  nh2-solar-mini/   (ordinary HF model folders)
    skills.json                                          (held-out loss per skill and model)
    manifest.json

Every part is written atomically with the key of its configuration; a rerun skips the parts
whose key matches and rebuilds the rest, so an interrupted build resumes.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from fusechat.data import TEMPLATES, render
from fusechat.heldout import nll_per_char
from fusechat.io import atomic_dir, fingerprint, read_manifest, write_json
from fusechat.toy.corpus import SKILLS, make_corpus, make_world
from fusechat.toy.models import (
    SPECS,
    ToyModelSpec,
    build_model,
    known_world,
    pretraining_rows,
    train_model,
)
from fusechat.toy.tokenizers import train_tokenizer

log = logging.getLogger(__name__)

BUILD_VERSION = 9  # bump when the builder's output changes for the same configuration
# the corpus's own format (2: prompts.jsonl): a bump rewrites the corpus, not the models
CORPUS_VERSION = 2
EVAL_TEMPLATE = "openchat"  # the capture setting: every model reads the pivot's format


@dataclass(frozen=True)
class ToyConfig:
    seed: int = 0
    n_train: int = 1500  # the fusion corpus
    n_heldout_per_skill: int = 256  # the training curve's set, read every eval_steps
    # 6,000 questions: on 768 the eval set's own sampling was as large as the effect measured
    n_questions_per_skill: int = 2000
    steps_scale: float = 1.0  # times each model's pretraining steps (tests build small worlds)
    batch_size: int = 16


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def world_fingerprint(seed: int) -> str:
    """The language's content (every item, value and phrasing): part of every key, so a change
    to the generator never reuses a corpus or model of another world."""
    from fusechat.toy import corpus

    worlds = [asdict(make_world(s)) for s in (seed, corpus.GENERIC_SEED)]
    return fingerprint({"worlds": worlds, "answers": corpus._A, "questions": corpus._Q,
                        "values": corpus.N_VALUES})  # fmt: skip


def _build_corpus(out: Path, cfg: ToyConfig) -> dict[str, list[dict]]:
    key = fingerprint(
        {
            "v": BUILD_VERSION,
            "corpus": CORPUS_VERSION,
            "seed": cfg.seed,
            "n": cfg.n_train,
            "h": cfg.n_heldout_per_skill,
            "q": cfg.n_questions_per_skill,
            "world": world_fingerprint(cfg.seed),
        }  # fmt: skip
    )
    folder = out / "corpus"
    if (read_manifest(folder) or {}).get("key") != key:
        splits = make_corpus(cfg.seed, cfg.n_train, cfg.n_heldout_per_skill,
                             cfg.n_questions_per_skill)  # fmt: skip
        with atomic_dir(folder) as tmp:
            for name, rows in splits.items():
                _write_jsonl(tmp / f"{name}.jsonl", rows)
            write_json(tmp / "manifest.json", {"key": key, "kind": "toy-corpus"})
    return {s: _read_jsonl(folder / f"{s}.jsonl") for s in ("train", "heldout", "questions")}


def _model_key(spec: ToyModelSpec, cfg: ToyConfig) -> str:
    # the models learn from fresh pretraining samples: the corpus sizes never shape them
    sizes = ("n_train", "n_heldout_per_skill", "n_questions_per_skill")
    shaping = {k: v for k, v in asdict(cfg).items() if k not in sizes}
    described = asdict(spec)
    if not spec.reversed:  # at its default, a model built before the setting existed is current
        del described["reversed"]
    return fingerprint({"v": BUILD_VERSION, "spec": described, "cfg": shaping,
                        "world": world_fingerprint(cfg.seed)})  # fmt: skip


def _model_current(out: Path, spec: ToyModelSpec, cfg: ToyConfig) -> bool:
    return (read_manifest(out / spec.name) or {}).get("key") == _model_key(spec, cfg)


def _build_model(out: Path, spec: ToyModelSpec, cfg: ToyConfig, progress: bool = True) -> Path:
    key = _model_key(spec, cfg)
    folder = out / spec.name
    if (read_manifest(folder) or {}).get("key") == key:
        return folder
    log.info("building %s (%s, %s tokenizer)", spec.name, spec.arch, spec.tokenizer)
    seed = cfg.seed + sum(map(ord, spec.name))
    world = make_world(cfg.seed)
    # a tokenizer is trained on general text: every item of the language, whatever the model
    # goes on to learn (a real 32k vocabulary covers the names a model has no facts about)
    rng = random.Random(seed - 1)
    everything = replace(spec, knows={"facts": 1.0, "glossary": 1.0, "generic": 1.0})
    sample = pretraining_rows(known_world(world, everything), everything, rng, 3000)
    texts = [render(r["messages"], TEMPLATES[t]).text for r in sample for t in spec.templates]
    tokenizer = train_tokenizer(spec.tokenizer, texts, spec.vocab_size, spec.templates[0])
    model = build_model(spec, tokenizer, seed)
    spec = replace(spec, steps=max(1, round(spec.steps * cfg.steps_scale)))
    losses = train_model(model, tokenizer, world, spec, seed, cfg.batch_size, progress)
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


def _build_in_worker(out: Path, spec: ToyModelSpec, cfg: ToyConfig, threads: int) -> Path:
    torch.set_num_threads(threads)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return _build_model(out, spec, cfg, progress=False)


def _build_models(out: Path, cfg: ToyConfig) -> dict[str, Path]:
    """Every model, the missing ones built side by side in worker processes: tiny models are
    bound by Python overhead, not arithmetic, so one thread each on separate cores nearly
    divides the build time by the number of cores."""
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor

    # the longest first (steps stand in for cost), so the pool is not left waiting on it alone
    todo = sorted((s for s in SPECS if not _model_current(out, s, cfg)), key=lambda s: -s.steps)
    workers = min(len(todo), os.cpu_count() or 1)
    if workers > 1:
        log.info("building %d models in %d processes", len(todo), workers)
        threads = max(1, (os.cpu_count() or 1) // workers)
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            for f in [pool.submit(_build_in_worker, out, s, cfg, threads) for s in todo]:
                f.result()
    return {s.name: _build_model(out, s, cfg) for s in SPECS}


def skill_table(models: dict[str, Path], heldout: list[dict]) -> dict[str, dict[str, float]]:
    """Held-out loss (nats per character of assistant text) per model and skill."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    table = {}
    for name, path in models.items():
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        table[name] = {
            s: round(
                nll_per_char(model, tok, [r for r in heldout if r["skill"] == s], EVAL_TEMPLATE), 4
            )
            for s in SKILLS
        }
    return table


def build_toy_world(out: str | Path, cfg: ToyConfig = ToyConfig()) -> dict[str, dict[str, float]]:
    """Build (or reuse) the toy world under ``out`` and return its skill table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    key = fingerprint({"v": BUILD_VERSION, "corpus": CORPUS_VERSION, "cfg": asdict(cfg),
                       "specs": [asdict(s) for s in SPECS],
                       "world": world_fingerprint(cfg.seed)})  # fmt: skip
    manifest = read_manifest(out)
    if manifest and manifest.get("key") == key and all((out / s.name).is_dir() for s in SPECS):
        return manifest["skills"]
    corpus = _build_corpus(out, cfg)
    models = _build_models(out, cfg)
    table = skill_table(models, corpus["questions"])
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

"""``fusechat score``: a reward for every sampled response (see the package docstring)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fusechat.errors import FusechatError
from fusechat.implicit.common import (
    load_prompts,
    read_shard,
    reward_stats,
    text_of,
)
from fusechat.implicit.rewards import REWARDS, Candidate
from fusechat.implicit.settings import ScoreConfig

log = logging.getLogger(__name__)

VERSION = 1


def score_stage(
    sample_dirs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    cfg: ScoreConfig,
    overwrite: bool = False,
) -> dict:
    """Score every response of the sample folders (one per source model, in the order that
    breaks ties later) with ``cfg.reward`` into ``out`` (``fusechat score``); resumes shard by
    shard. Returns the manifest, with each model's reward statistics."""
    from tqdm import tqdm

    from fusechat.io import fingerprint
    from fusechat.sharding import run_sharded
    from fusechat.shards import StageReader, save_shard, shard_name

    if not sample_dirs:
        raise FusechatError("score needs at least one sample folder")
    readers = [StageReader(d, "sample") for d in sample_dirs]
    check_same_prompts(readers)
    first = readers[0]
    reward = REWARDS[cfg.reward](cfg)
    data = first.manifest["stats"]["data"]
    prompts, report = load_prompts(data, first.key["corpus_fingerprint"], first.folder,
                                    reward.fields)  # fmt: skip
    reward.check(report.fields, report.numbers, data["path"])
    fields = report.fields or [{}] * len(prompts)
    key = {"stage": "score", "version": VERSION, **cfg.key(), **reward.identity(),
           "pass_mark": reward.pass_mark, "samples": [fingerprint(r.key) for r in readers],
           "corpus_fingerprint": first.key["corpus_fingerprint"],
           "shard_rows": first.key["shard_rows"]}  # fmt: skip
    out = Path(out)
    run: dict = {"new": 0}

    def start(done: frozenset[int]) -> tuple:
        run.update(done=done, t0=time.perf_counter())
        todo = [i for i in range(first.n_shards) if i not in done]
        if todo:
            reward.load()
            run["bar"] = tqdm(total=len(todo), unit="shard", desc=f"score {out.name}")
        return run, None

    def task(run: dict, i: int) -> tuple[list[list[float]], str | None]:
        if i in run["done"]:
            return _rewards_by_model(read_shard(out / shard_name(i)), len(readers)), None
        rows = score_shard([r.shard(i) for r in readers], prompts, fields, reward)
        run["new"] += len(rows)
        run["bar"].update()
        return _rewards_by_model(rows, len(readers)), save_shard(out, i, rows, "score")

    def summarize(parts: list[list[list[float]]]) -> dict:
        seconds = round(time.perf_counter() - run["t0"], 2) if run["new"] else 0.0
        return score_stats(parts, readers, reward, cfg.reward, seconds, data)

    try:
        return run_sharded(out, key, first.n_shards, start, task, summarize, overwrite,
                           desc=None, inputs=(*sample_dirs, cfg.reward_model, data["path"]))  # fmt: skip
    finally:
        if "bar" in run:
            run["bar"].close()


def score_shard(shards: Sequence[list[dict]], prompts: Sequence, fields: Sequence[dict],
                reward) -> list[dict]:  # fmt: skip
    """One shard of every model's responses (``shards``, in the models' order), each with its
    reward, ordered by prompt, then model, then sample: the sample rows plus ``row.model`` and
    ``row.reward``."""
    meta, cands = [], []
    for m, rows in enumerate(shards):
        for row in rows:
            idx = int(row["row.index"])
            meta.append((idx, m, row))
            cands.append(Candidate(prompts[idx], text_of(row), fields[idx]))
    rewards = reward.score(cands) if cands else []
    order = sorted(range(len(meta)), key=lambda k: meta[k][:2])  # stable: samples in order
    return [{**meta[k][2], "row.model": np.int64(meta[k][1]), "row.reward": np.float64(rewards[k])}
            for k in order]  # fmt: skip


def check_same_prompts(readers: Sequence) -> None:
    """Sample folders can be scored together only if they sampled the same prompts, shard for
    shard; each must be complete."""
    first = readers[0]
    for r in readers:
        r.check_complete()
        for k, what in (("corpus_fingerprint", "another corpus"), ("rows", "another corpus"),
                        ("shard_rows", "other shard rows")):  # fmt: skip
            if r.key[k] != first.key[k]:
                raise FusechatError(f"{r.folder}: sampled from {what} than {first.folder} "
                                    f"({k.replace('_', ' ')} differ)")  # fmt: skip


def score_stats(parts: Sequence, readers: Sequence, reward, name: str, seconds: float,
                data: dict) -> dict:  # fmt: skip
    """The manifest's statistics from each shard's ``_rewards_by_model``: per model its
    reward statistics, the prompts and responses, what the reward could not rate."""
    per_model = [[x for p in parts for x in p[m]] for m in range(len(readers))]
    models = []
    for r, xs in zip(readers, per_model, strict=True):
        models.append({"samples": str(r.folder), "model": r.key["model"],
                       **reward_stats(xs, reward.pass_mark)})  # fmt: skip
    for m in models:
        log.info("%s: %d responses, reward mean %s (min %s, max %s)", m["model"],
                 m["responses"], m["mean"], m["min"], m["max"])  # fmt: skip
    return {
        "reward": name,
        "pass_mark": reward.pass_mark,
        "prompts": len(set().union(*(p[-1] for p in parts))) if parts else 0,
        "responses": sum(len(xs) for xs in per_model),
        "models": models,
        "truncated": getattr(reward, "truncated", 0),
        "unrated": getattr(reward, "unrated", 0),
        "seconds": seconds,
        "data": data,
    }


def _rewards_by_model(rows: Sequence[dict], n_models: int) -> list:
    """A score shard's rewards per model, then the set of its prompts (last)."""
    out: list = [[] for _ in range(n_models)]
    for r in rows:
        out[int(r["row.model"])].append(float(r["row.reward"]))
    return [*out, {int(r["row.index"]) for r in rows}]

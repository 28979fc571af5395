"""``fusechat pairs``: the SFT set and the preference pairs, as TRL reads them (see the package
docstring)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fusechat.data import Message
from fusechat.errors import FusechatError
from fusechat.implicit.common import (
    load_prompts,
    preference_pair,
    reward_stats,
    sft_choice,
    sft_side,
    text_of,
)
from fusechat.implicit.settings import PairsConfig

log = logging.getLogger(__name__)

VERSION = 1
SFT_FILE, DPO_FILE = "sft.jsonl", "dpo.jsonl"


def pairs_stage(
    score_dir: str | os.PathLike,
    out: str | os.PathLike,
    cfg: PairsConfig | None = None,
    overwrite: bool = False,
) -> dict:
    """The SFT set and the preference pairs of a score folder, as TRL reads them, in ``out``
    (``fusechat pairs``): ``sft.jsonl``, ``dpo.jsonl`` and a manifest with their checksums,
    counts and reward statistics. The folder appears whole or not at all; one with the same
    settings is reused. Returns the manifest."""
    from fusechat.io import atomic_dir, check_apart, fingerprint, read_manifest, stage_of
    from fusechat.shards import StageReader, _manifest_digest, digest

    cfg = cfg or PairsConfig()
    reader = StageReader(score_dir, "score")
    reader.check_complete()
    data = reader.manifest["stats"]["data"]
    key = {"stage": "pairs", "version": VERSION, **cfg.key(), "score": fingerprint(reader.key),
           "corpus_fingerprint": reader.key["corpus_fingerprint"]}  # fmt: skip
    out = Path(out)
    old = read_manifest(out)
    if isinstance(old, dict) and old.get("key") == key:
        log.info("%s: pairs already complete", out)
        return old
    check_apart(out, (score_dir, data["path"]))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if stage_of(out) != "pairs":
            raise FusechatError(f"{out}: exists and is not a pairs output; choose another folder")
        if not overwrite:
            diff = sorted(k for k in {**old["key"], **key} if old["key"].get(k) != key.get(k))
            raise FusechatError(f"{out}: holds pairs made with other settings "
                                f"({', '.join(diff)}); use --overwrite or another folder")  # fmt: skip
    prompts, _ = load_prompts(data, reader.key["corpus_fingerprint"], reader.folder)
    names = [m["model"] for m in reader.manifest["stats"]["models"]]
    sft, dpo, stats = build_sets(reader, prompts, cfg, reader.key["pass_mark"], names)
    files = {SFT_FILE: _jsonl(sft), DPO_FILE: _jsonl(dpo)}
    manifest = {"key": key, "stats": {**stats, "score": str(score_dir), "data": data},
                "checksums": {n: digest(b) for n, b in files.items()}}  # fmt: skip
    manifest["digest"] = _manifest_digest(manifest)
    from fusechat.io import write_json

    with atomic_dir(out) as tmp:
        for name, blob in files.items():
            (tmp / name).write_bytes(blob)
        write_json(tmp / "manifest.json", manifest)
    log.info("%s: %d SFT rows, %d preference pairs", out, stats["sft_rows"], stats["pairs"])
    return manifest


def _jsonl(rows: Sequence[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def build_sets(reader, prompts: Sequence[list[Message]], cfg: PairsConfig,
               pass_mark: float | None, names: Sequence[str]) -> tuple[list, list, dict]:  # fmt: skip
    """The SFT rows, the DPO rows and their statistics from a score folder's shards."""
    sft, dpo = [], []
    n = {"prompts": 0, "sft_prompts": 0, "dpo_prompts": 0, "sft_without_pass": 0,
         "pairs_outside_gap": 0, "pairs_single": 0}  # fmt: skip
    sft_rewards, chosen, rejected = [], [], []
    sft_by, pairs_by = [0] * len(names), [0] * len(names)
    for _, rows in reader.shards():
        for idx, group in _by_prompt(rows):
            n["prompts"] += 1
            prompt = prompts[idx]
            if sft_side(prompt, cfg.sft_share):
                n["sft_prompts"] += 1
                k = sft_choice([float(r["row.reward"]) for r in group], pass_mark)
                if k is None:
                    n["sft_without_pass"] += 1
                    continue
                best = group[k]
                sft.append({"messages": [*prompt, _assistant(best)]})
                sft_rewards.append(float(best["row.reward"]))
                sft_by[int(best["row.model"])] += 1
                continue
            n["dpo_prompts"] += 1
            for m in range(len(names)):
                mine = [r for r in group if int(r["row.model"]) == m]
                rewards = [float(r["row.reward"]) for r in mine]
                pair = preference_pair(rewards, cfg.min_gap, cfg.max_gap)
                if pair is None:
                    if mine:  # none: this model's template refused the prompt
                        n["pairs_single" if len(mine) < 2 else "pairs_outside_gap"] += 1
                    continue
                hi, lo = mine[pair[0]], mine[pair[1]]
                dpo.append({"prompt": prompt, "chosen": [_assistant(hi)],
                            "rejected": [_assistant(lo)]})  # fmt: skip
                chosen.append(float(hi["row.reward"]))
                rejected.append(float(lo["row.reward"]))
                pairs_by[m] += 1
    gaps = np.subtract(chosen, rejected)
    stats = {
        **n,
        "sft_rows": len(sft),
        "pairs": len(dpo),
        "sft_reward": reward_stats(sft_rewards),
        "chosen_reward": reward_stats(chosen),
        "rejected_reward": reward_stats(rejected),
        "gap": reward_stats(gaps),
        "by_model": [
            {"model": name, "sft_rows": a, "pairs": b}
            for name, a, b in zip(names, sft_by, pairs_by, strict=True)
        ],  # fmt: skip
    }
    for k in ("sft_reward", "chosen_reward", "rejected_reward", "gap"):
        stats[k].pop("responses")
    return sft, dpo, stats


def _by_prompt(rows: Sequence[dict]):
    """A score shard's rows grouped by prompt (they come ordered by prompt, model, sample)."""
    group: list[dict] = []
    for r in rows:
        if group and int(r["row.index"]) != int(group[0]["row.index"]):
            yield int(group[0]["row.index"]), group
            group = []
        group.append(r)
    if group:
        yield int(group[0]["row.index"]), group


def _assistant(row: dict) -> Message:
    return {"role": "assistant", "content": text_of(row)}


def read_pairs(folder: str | os.PathLike) -> dict:
    """A finished pairs folder's manifest, its files checked against their checksums (what
    the sft and dpo stages read): one line naming what is missing, edited or damaged."""
    from fusechat.io import read_manifest
    from fusechat.shards import _manifest_digest, digest

    folder = Path(folder)
    m = read_manifest(folder)
    if not isinstance(m, dict) or not isinstance(m.get("key"), dict) \
            or m["key"].get("stage") != "pairs":  # fmt: skip
        raise FusechatError(f"{folder}: not a finished pairs output; run fusechat pairs")
    if m.get("digest") != _manifest_digest(m):
        raise FusechatError(f"{folder / 'manifest.json'}: edited or damaged (its digest does not "
                            "match)")  # fmt: skip
    for name, want in m["checksums"].items():
        path = folder / name
        if not path.exists():
            raise FusechatError(f"{path}: missing")
        if digest(path.read_bytes()) != want:
            raise FusechatError(f"{path}: damaged (its checksum does not match the manifest)")
    return m

"""Implicit fusion's data (FuseChat-3.0, arXiv 2503.04222; WRPO, arXiv 2412.03187): sample
responses to a prompt set from every source, score them with a reward, and build the SFT set and
the preference pairs (``fusechat sample``, ``score``, ``pairs``).

``sample`` (one folder per model) renders each prompt (a conversation's messages up to its last
user turn) with the model's template, as capture does (a template named, or the tokenizer's own),
and samples ``n`` responses with transformers ``generate`` (left padding,
``num_return_sequences=n``), the model's ``generation_config.json`` set aside but for its stop
tokens. Shard ``s`` covers prompts ``[s * shard_rows, (s + 1) * shard_rows)`` of the corpus
whatever its model's template refuses, so every model's shard ``s`` holds the same prompts, and it
draws from its own seed (``shard_seed``): a resumed run writes the bytes an uninterrupted one
writes. One row per response: ``pos.text`` (its UTF-8 bytes: the shards' variable-length axis
holds one position per byte), ``row.index`` (the prompt: the conversation's index in the loaded
corpus), ``row.sample`` (0..n-1), ``row.n_tokens`` (tokens generated, the stop token included),
``row.prompt_tokens`` and ``row.finished`` (a stop token ended it, not ``max_new_tokens``). Text,
not token ids: what comes next (rewards, the TRL sets, the target's training) reads text, and
reads it without the sampling model's tokenizer.

``score`` reads one sample folder per source (the same corpus and shards), gives every response a
reward (``fusechat.rewards.REWARDS``: ``toy``, the toy rule judge's verdict on the row's right
values; ``hf``, a sequence-classification reward model's logit; ``judge``, an endpoint's rating)
and writes shard ``s`` with every model's responses to its prompts, ordered by prompt, model
(the order the folders were given) and sample: the sample rows plus ``row.model`` and
``row.reward`` (float64).

``pairs`` turns a score folder into ``sft.jsonl`` (``{"messages": [...]}``) and ``dpo.jsonl``
(``{"prompt": [...], "chosen": [{"role": "assistant", ...}], "rejected": [...]}``), TRL's
conversational formats, with a manifest holding their checksums (``read_pairs``). The prompts
are split between the two by a hash of each prompt (``sft_side``); the choices are
``sft_choice`` and ``preference_pair``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fusechat.configs import DataSpec
from fusechat.data import Message, TemplateRefused, render_text
from fusechat.errors import FusechatError
from fusechat.implicit_settings import PairsConfig, SampleConfig, ScoreConfig
from fusechat.rewards import REWARDS, Candidate

log = logging.getLogger(__name__)

VERSION = 1
SFT_FILE, DPO_FILE = "sft.jsonl", "dpo.jsonl"


# --------------------------------------------------------------------------- pure parts


def prompt_of(messages: Sequence[Message]) -> list[Message]:
    """A conversation's prompt: its messages up to and including its last user turn (earlier
    turns, system message and answers, stay as context)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last is None:
        raise ValueError("no user turn")
    return [dict(m) for m in messages[: last + 1]]


def shard_seed(seed: int, shard: int) -> int:
    """The seed shard ``shard`` samples from: a hash of both, so shards draw independent
    streams and a shard's responses do not depend on which shards ran before it."""
    h = hashlib.blake2b(f"fusechat-sample:{seed}:{shard}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)


def response_ids(ids: Sequence[int], stops: Sequence[int]) -> tuple[list[int], bool]:
    """A generated sequence's response: its tokens before the first stop token, and whether a
    stop token ended it (else ``max_new_tokens`` did; the padding after a stop is dropped)."""
    stop = set(stops)
    for k, t in enumerate(ids):
        if t in stop:
            return list(ids[:k]), True
    return list(ids), False


def best_index(rewards: Sequence[float]) -> int:
    """The highest reward's index; ties go to the first (candidates come in model order, then
    sample order)."""
    if not len(rewards):
        raise ValueError("no candidates")
    return max(range(len(rewards)), key=lambda i: (rewards[i], -i))


def sft_choice(rewards: Sequence[float], pass_mark: float | None = None) -> int | None:
    """The SFT response of one prompt, over every model's responses in (model, sample) order:
    the highest reward, the first on ties (``best_index``); None where the reward is a
    correctness check (``pass_mark``: toy 1) and no response reaches it: a wrong answer is no
    example to learn from."""
    i = best_index(rewards)
    return None if pass_mark is not None and rewards[i] < pass_mark else i


def preference_pair(
    rewards: Sequence[float], min_gap: float, max_gap: float | None = None
) -> tuple[int, int] | None:
    """One model's preference pair on one prompt, over its responses in sample order:
    (chosen, rejected) = (the first with the highest reward, the last with the lowest), kept
    when ``min_gap <= best - worst <= max_gap`` (None: no upper bound). None otherwise, and for
    fewer than two responses (WRPO: pairs come from one source, its best against its worst)."""
    if len(rewards) < 2:
        return None
    hi = best_index(rewards)
    lo = min(range(len(rewards)), key=lambda i: (rewards[i], -i))
    gap = float(rewards[hi]) - float(rewards[lo])
    if gap < min_gap or (max_gap is not None and gap > max_gap):
        return None
    return hi, lo


def sft_side(prompt: Sequence[Message], sft_share: float) -> bool:
    """Whether a prompt goes to SFT (else to the preference pairs): a hash of its messages,
    read as a number in [0, 1), below ``sft_share``. The same prompt always lands on the same
    side, whatever else the set holds (a repeated prompt is never on both)."""
    blob = json.dumps([[m["role"], m["content"]] for m in prompt], ensure_ascii=False)
    h = hashlib.blake2b(blob.encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64 < sft_share


# --------------------------------------------------------------------------- shared


def _data_record(data: DataSpec) -> dict:
    """How the corpus was read, its path made absolute: what score and pairs read it again by."""
    p = Path(data.path)
    return {**data.model_dump(), "path": str(p.resolve()) if p.exists() else data.path}


def _load_prompts(data: dict, fingerprint: str, where: Path, fields: tuple[str, ...] = ()):
    """The corpus a sample was made from, read again as it was (``_data_record``) and checked
    against its fingerprint: (prompts, load report)."""
    from fusechat.conversations import load_conversations
    from fusechat.io import corpus_fingerprint

    spec = DataSpec(**data)
    convs, report = load_conversations(spec.path, spec.format, spec.strict, spec.max_rows,
                                       prompts=True, fields=fields)  # fmt: skip
    if corpus_fingerprint(convs) != fingerprint:
        raise FusechatError(f"{spec.path}: changed since {where} was sampled from it")
    return [prompt_of(c) for c in convs], report


def _read_shard(path: Path) -> list[dict]:
    """A shard this stage wrote (its checksum verified when the stage began)."""
    from safetensors.numpy import load

    from fusechat.shards import unpack_rows

    return unpack_rows(load(path.read_bytes()))


def text_of(row: dict) -> str:
    """A response row's text (``pos.text``: its UTF-8 bytes)."""
    return row["pos.text"].tobytes().decode("utf-8")


def _text_array(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()


# --------------------------------------------------------------------------- sample


def sample_stage(
    cfg: SampleConfig,
    data: DataSpec | str | os.PathLike,
    out: str | os.PathLike,
    overwrite: bool = False,
    max_rows: int | None = None,
) -> dict:
    """Sample ``cfg.n`` responses per prompt from ``cfg.model`` into ``out`` (``fusechat
    sample``); resumes shard by shard. ``data``: the prompt set (a path: every row, skipping
    malformed ones; ``max_rows`` then limits it). Returns the manifest."""
    import torch
    from tqdm import tqdm

    from fusechat.capture import _check_refused
    from fusechat.conversations import load_conversations
    from fusechat.data import load_tokenizer
    from fusechat.io import corpus_fingerprint, fingerprint, model_fingerprint
    from fusechat.io import tokenizer_fingerprint as tok_fp
    from fusechat.shards import run_sharded, save_shard, shard_name

    if not isinstance(data, DataSpec):
        data = DataSpec(path=str(data), max_rows=max_rows)
    convs, report = load_conversations(data.path, data.format, data.strict, data.max_rows,
                                       prompts=True)  # fmt: skip
    prompts = [prompt_of(c) for c in convs]
    tokenizer = load_tokenizer(cfg.model)
    texts, refused = {}, []
    for i, p in enumerate(prompts):
        try:
            texts[i] = render_text(p, tokenizer, cfg.template, generation=True)[0]
        except TemplateRefused as e:
            refused.append((i, str(e)))
    _check_refused(refused, report, data, cfg.model)
    rendering = None
    if cfg.template == "tokenizer":  # what decides the text: the template and its specials
        rendering = fingerprint([tokenizer.chat_template, tokenizer.all_special_tokens])
    key = {"stage": "sample", "version": VERSION, **cfg.key(), "rendering": rendering,
           "model_fingerprint": model_fingerprint(cfg.model),
           "tokenizer_fingerprint": tok_fp(tokenizer),
           "corpus_fingerprint": corpus_fingerprint(convs), "rows": len(convs)}  # fmt: skip
    out = Path(out)
    n_shards = -(-len(convs) // cfg.shard_rows)
    run: dict = {"new_tokens": 0}

    def mine(s: int) -> list[int]:
        return [i for i in range(s * cfg.shard_rows, (s + 1) * cfg.shard_rows) if i in texts]

    def start(done: frozenset[int]) -> tuple:
        todo = [s for s in range(n_shards) if s not in done]
        run.update(done=done, t0=time.perf_counter())
        if todo:  # the model loads only where there is work
            from transformers import GenerationConfig

            from fusechat.eval.chat import load_chat_model

            model, tok, stops = load_chat_model(cfg.model, cfg.dtype)
            model.generation_config = GenerationConfig()  # the stage's settings alone
            run.update(model=model, tok=tok, stops=stops)
            total = sum(len(mine(s)) for s in todo) * cfg.n
            run["bar"] = tqdm(total=total, unit="resp", desc=f"sample {out.name}")
        return run, None

    def task(run: dict, s: int) -> tuple[dict, str | None]:
        if s in run["done"]:
            return _sample_counts(_read_shard(out / shard_name(s))), None
        torch.manual_seed(shard_seed(cfg.seed, s))
        rows: list[dict] = []
        idx = mine(s)
        for b in range(0, len(idx), cfg.batch_size):
            chunk = idx[b : b + cfg.batch_size]
            rows += _generate(run, chunk, [texts[i] for i in chunk], cfg)
            run["bar"].update(len(chunk) * cfg.n)
        counts = _sample_counts(rows)
        run["new_tokens"] += counts["tokens"]
        return counts, save_shard(out, s, rows, "sample")

    def summarize(parts: list[dict]) -> dict:
        seconds = time.perf_counter() - run["t0"] if run["new_tokens"] else 0.0
        n_resp = sum(p["responses"] for p in parts)
        tokens = sum(p["tokens"] for p in parts)
        stats = {
            "prompts": sum(p["prompts"] for p in parts),
            "responses": n_resp,
            "tokens_generated": tokens,
            "mean_tokens": round(tokens / max(n_resp, 1), 2),
            "finished": round(sum(p["finished"] for p in parts) / max(n_resp, 1), 4),
            "refused_rows": len(refused),
            "skipped_rows": len(report.skipped),
            "seconds": round(seconds, 2),
            "tokens_per_s": round(run["new_tokens"] / seconds, 1) if seconds > 0 else None,
            "model_path": cfg.model,
            "data": _data_record(data),
        }
        log.info("sampled %d responses to %d prompts (%d tokens, %.0f%% ended by a stop token)",
                 n_resp, stats["prompts"], tokens, 100 * stats["finished"])  # fmt: skip
        return stats

    try:
        return run_sharded(out, key, n_shards, start, task, summarize, overwrite, desc=None,
                           inputs=(cfg.model, data.path))  # fmt: skip
    finally:
        if "bar" in run:
            run["bar"].close()


def _generate(run: dict, index: list[int], texts: list[str], cfg: SampleConfig) -> list[dict]:
    """``cfg.n`` responses to each of a batch of rendered prompts, as shard rows."""
    import torch

    model, tok, stops = run["model"], run["tok"], run["stops"]
    device = model.get_input_embeddings().weight.device
    enc = tok(texts, return_tensors="pt", padding=True,
              add_special_tokens=cfg.template != "tokenizer").to(device)  # fmt: skip
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
                             top_k=0, max_new_tokens=cfg.max_new_tokens,
                             num_return_sequences=cfg.n, eos_token_id=list(stops),
                             pad_token_id=tok.pad_token_id)  # fmt: skip
    prompt_tokens = enc["attention_mask"].sum(1).tolist()
    rows = []
    for r, seq in enumerate(out[:, enc["input_ids"].shape[1] :].tolist()):
        p, j = divmod(r, cfg.n)  # num_return_sequences repeats each prompt n times in a row
        ids, finished = response_ids(seq, stops)
        rows.append({
            "pos.text": _text_array(tok.decode(ids, skip_special_tokens=True).strip()),
            "row.index": np.int64(index[p]),
            "row.sample": np.int64(j),
            "row.n_tokens": np.int64(len(ids) + finished),
            "row.prompt_tokens": np.int64(prompt_tokens[p]),
            "row.finished": np.bool_(finished),
        })  # fmt: skip
    return rows


def _sample_counts(rows: Sequence[dict]) -> dict:
    return {"prompts": len({int(r["row.index"]) for r in rows}), "responses": len(rows),
            "tokens": sum(int(r["row.n_tokens"]) for r in rows),
            "finished": sum(bool(r["row.finished"]) for r in rows)}  # fmt: skip


# --------------------------------------------------------------------------- score


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
    from fusechat.shards import StageReader, run_sharded, save_shard, shard_name

    if not sample_dirs:
        raise FusechatError("score needs at least one sample folder")
    readers = [StageReader(d, "sample") for d in sample_dirs]
    first = readers[0]
    for r in readers:
        r.check_complete()
        for k, what in (("corpus_fingerprint", "another corpus"), ("rows", "another corpus"),
                        ("shard_rows", "other shard rows")):  # fmt: skip
            if r.key[k] != first.key[k]:
                raise FusechatError(f"{r.folder}: sampled from {what} than {first.folder} "
                                    f"({k.replace('_', ' ')} differ)")  # fmt: skip
    reward = REWARDS[cfg.reward](cfg)
    data = first.manifest["stats"]["data"]
    prompts, report = _load_prompts(data, first.key["corpus_fingerprint"], first.folder,
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
            return _rewards_by_model(_read_shard(out / shard_name(i)), len(readers)), None
        meta, cands = [], []
        for m, r in enumerate(readers):
            for row in r.shard(i):
                idx = int(row["row.index"])
                meta.append((idx, m, row))
                cands.append(Candidate(prompts[idx], text_of(row), fields[idx]))
        rewards = reward.score(cands) if cands else []
        order = sorted(range(len(meta)), key=lambda k: meta[k][:2])  # stable: samples in order
        rows = []
        for k in order:
            idx, m, row = meta[k]
            rows.append({**row, "row.model": np.int64(m), "row.reward": np.float64(rewards[k])})
        run["new"] += len(rows)
        run["bar"].update()
        return _rewards_by_model(rows, len(readers)), save_shard(out, i, rows, "score")

    def summarize(parts: list[list[list[float]]]) -> dict:
        per_model = [[x for p in parts for x in p[m]] for m in range(len(readers))]
        models = []
        for r, xs in zip(readers, per_model, strict=True):
            models.append({"samples": str(r.folder), "model": r.key["model"],
                           **reward_stats(xs, reward.pass_mark)})  # fmt: skip
        stats = {
            "reward": cfg.reward,
            "pass_mark": reward.pass_mark,
            "prompts": len(set().union(*(p[-1] for p in parts))) if parts else 0,
            "responses": sum(len(xs) for xs in per_model),
            "models": models,
            "truncated": getattr(reward, "truncated", 0),
            "unrated": getattr(reward, "unrated", 0),
            "seconds": round(time.perf_counter() - run["t0"], 2) if run["new"] else 0.0,
            "data": data,
        }
        for m in models:
            log.info("%s: %d responses, reward mean %s (min %s, max %s)", m["model"],
                     m["responses"], m["mean"], m["min"], m["max"])  # fmt: skip
        return stats

    try:
        return run_sharded(out, key, first.n_shards, start, task, summarize, overwrite,
                           desc=None, inputs=(*sample_dirs, cfg.reward_model, data["path"]))  # fmt: skip
    finally:
        if "bar" in run:
            run["bar"].close()


def _rewards_by_model(rows: Sequence[dict], n_models: int) -> list:
    """A score shard's rewards per model, then the set of its prompts (last)."""
    out: list = [[] for _ in range(n_models)]
    for r in rows:
        out[int(r["row.model"])].append(float(r["row.reward"]))
    return [*out, {int(r["row.index"]) for r in rows}]


def reward_stats(rewards: Sequence[float], pass_mark: float | None = None) -> dict:
    """Count, mean, standard deviation, min and max of rewards (rounded to 6 digits), and the
    share at the pass mark where the reward has one."""
    x = np.asarray(rewards, dtype=np.float64)
    r6 = lambda v: round(float(v), 6) if len(x) else None  # noqa: E731
    out = {"responses": len(x), "mean": r6(x.mean() if len(x) else 0),
           "std": r6(x.std() if len(x) else 0), "min": r6(x.min() if len(x) else 0),
           "max": r6(x.max() if len(x) else 0)}  # fmt: skip
    if pass_mark is not None:
        out["passed"] = r6((x >= pass_mark).mean() if len(x) else 0)
    return out


# --------------------------------------------------------------------------- pairs


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
    prompts, _ = _load_prompts(data, reader.key["corpus_fingerprint"], reader.folder)
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

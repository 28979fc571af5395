"""Implicit fusion's training (FuseChat-3.0, arXiv 2503.04222): supervised fine-tuning on the SFT
set, then preference optimisation on the pairs (``fusechat sft``, ``fusechat dpo``), with TRL's
``SFTTrainer`` and ``DPOTrainer``; their sets are what ``fusechat pairs`` writes.

``sft`` learns every assistant turn and nothing else: each conversation is rendered and masked
by ``fusechat.data.encode`` (the label mask from the assistant spans of the chat template's
rendering, as ``fusechat train`` does), so any template that renders turns as prefixes works,
not only those TRL knows ``{% generation %}`` markers for; TRL gets the tokens and the mask.
``dpo`` hands TRL the conversational pairs; the reference model is the starting model (with a
LoRA, the model with its adapter turned off). A named template (``--template``) is set as the
tokenizer's ``chat_template`` and so travels with the trained model.

Both run like ``fusechat train``: checkpoints in ``OUT.ckpt`` (a rerun resumes from the last
whole one), the model (LoRA merged in) renamed into ``OUT`` only when complete, with a manifest
whose key (the data file's bytes, the model's fingerprint, every setting) lets a rerun reuse it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from fusechat.configs import LoraConfig
from fusechat.data import TEMPLATES, TOKENIZER_TEMPLATE, Message, TemplateRefused
from fusechat.errors import FusechatError, first_line
from fusechat.implicit.settings import DpoConfig, PreferSettings, SftConfig

log = logging.getLogger(__name__)

VERSION = 2  # 2: float32 master weights in full fine-tuning (fusechat.precision)


# --------------------------------------------------------------------------- losses


def trl_loss_type(loss: str) -> str:
    """TRL's ``DPOConfig.loss_type`` for a fusechat DPO loss name. With the log-ratios
    ``x_c = log pi(c|p) - log ref(c|p)`` and ``x_r`` (sums over the response tokens):

    - ``sigmoid``: ``-log sigmoid(beta * (x_c - x_r))`` (DPO);
    - ``length_normalized``: ``-log sigmoid(beta * (x_c / |c| - x_r / |r|))``, the mean
      per-token log-ratio of each response (FuseChat-3.0 for Llama-3.1-8B, beta 10; TRL 1.16's
      ``sigmoid_norm``, with ``|c|`` and ``|r|`` the response tokens after truncation);
    - the others are TRL's losses of the same name."""
    return {"length_normalized": "sigmoid_norm"}.get(loss, loss)


# --------------------------------------------------------------------------- data


def data_file(data: str | os.PathLike, name: str) -> Path:
    """The JSONL a stage reads: ``name`` inside a pairs folder (its files checked against the
    manifest's checksums, ``fusechat.implicit.read_pairs``), or the file itself."""
    from fusechat.implicit.pairs import read_pairs

    path = Path(data)
    if path.is_dir():
        read_pairs(path)
        return path / name
    if not path.is_file():
        raise FusechatError(f"{path}: not found")
    return path


def read_jsonl(path: Path) -> list[tuple[int, object]]:
    """Every non-blank line of a JSONL file, parsed, with its line number (1-based)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise FusechatError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise FusechatError(f"{path}: row {n}: invalid JSON ({e.msg})") from None
    if not rows:
        raise FusechatError(f"{path}: empty: no rows to train on")
    return rows


def _turns(value: object, name: str, roles: Sequence[str]) -> list[Message]:
    """A non-empty list of ``{"role", "content"}`` messages whose roles are among ``roles``."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"'{name}' is not a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in roles \
                or not isinstance(m.get("content"), str):  # fmt: skip
            raise ValueError(f"{name}[{i}] is not a message with role {' or '.join(roles)} "
                             "and text content")  # fmt: skip
        out.append({"role": m["role"], "content": m["content"]})
    return out


def sft_row(row: object) -> list[Message]:
    """One SFT row (``{"messages": [...]}``, TRL's conversational format) as messages: roles
    alternate and there is an assistant turn to learn (``normalize_row``)."""
    from fusechat.conversations import normalize_row

    if not isinstance(row, dict) or "messages" not in row:
        raise ValueError("no 'messages'")
    return normalize_row(row, "messages")


def preference_row(row: object) -> dict:
    """One preference row, TRL's conversational format: ``prompt`` (messages ending with a
    user turn), ``chosen`` and ``rejected`` (assistant messages)."""
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    for k in ("prompt", "chosen", "rejected"):
        if k not in row:
            raise ValueError(f"no '{k}'")
    prompt = _turns(row["prompt"], "prompt", ("system", "user", "assistant"))
    if prompt[-1]["role"] != "user":
        raise ValueError("'prompt' does not end with a user turn")
    return {"prompt": prompt, "chosen": _turns(row["chosen"], "chosen", ("assistant",)),
            "rejected": _turns(row["rejected"], "rejected", ("assistant",))}  # fmt: skip


def read_rows(path: Path, parse) -> list[tuple[int, object]]:
    """A set's rows through ``parse`` (``sft_row``, ``preference_row``); the first bad one is
    one line naming the file and its row."""
    out = []
    for n, row in read_jsonl(path):
        try:
            out.append((n, parse(row)))
        except ValueError as e:
            raise FusechatError(f"{path}: row {n}: {e}") from None
    return out


# --------------------------------------------------------------------------- template


def chat_tokenizer(model: str, template: str):
    """The model's tokenizer with the chat template the set is rendered with: a named one
    (``fusechat.data.TEMPLATES``) set as its ``chat_template``, or its own."""
    from fusechat.data import load_tokenizer

    tok = load_tokenizer(model)
    if template != TOKENIZER_TEMPLATE:
        tok.chat_template = TEMPLATES[template].jinja
    elif not getattr(tok, "chat_template", None):
        raise FusechatError(f"{model}: the tokenizer has no chat_template; name a template "
                            f"(--template {'|'.join(TEMPLATES)})")  # fmt: skip
    return tok


def sft_dataset(rows: Sequence[tuple[int, list[Message]]], tokenizer, max_length: int,
                path: Path) -> tuple[object, dict]:  # fmt: skip
    """TRL's tokenized language-modeling set: ``input_ids`` and ``assistant_masks`` (1 on the
    tokens learned: each assistant turn's content and end of turn), cut to ``max_length``;
    a row left without a learned token is dropped and counted."""
    from datasets import Dataset

    from fusechat.data import encode

    ids, masks, dropped = [], [], 0
    for n, messages in rows:
        try:
            enc = encode(messages, tokenizer, TOKENIZER_TEMPLATE, max_length)
        except TemplateRefused as e:
            raise FusechatError(f"{path}: row {n}: the chat template refused it ({e})") from None
        if not any(enc.labels_mask):
            dropped += 1
            continue
        ids.append(enc.input_ids)
        masks.append([int(m) for m in enc.labels_mask])
    if not ids:
        raise FusechatError(f"{path}: no row keeps an assistant token within --max-length "
                            f"{max_length}")  # fmt: skip
    counts = {"rows": len(ids), "dropped_by_max_length": dropped,
              "tokens": sum(map(len, ids)), "learned_tokens": sum(map(sum, masks))}  # fmt: skip
    return Dataset.from_dict({"input_ids": ids, "assistant_masks": masks}), counts


def check_renders(rows: Sequence[tuple[int, dict]], tokenizer, path: Path) -> None:
    """Every pair's prompt and chosen response render with the chat template (before any
    weights load): one line naming the row it refuses."""
    from jinja2 import TemplateError

    for n, r in rows:
        try:
            tokenizer.apply_chat_template(r["prompt"] + r["chosen"], tokenize=False)
        except TemplateError as e:
            raise FusechatError(f"{path}: row {n}: the chat template refused it "
                                f"({first_line(e)})") from None  # fmt: skip


# --------------------------------------------------------------------------- stages


def stage_key(stage: str, model: str, path: Path, cfg: PreferSettings) -> dict:
    """What names a run's output: the data file's bytes, the model folder's fingerprint and
    every setting, as read back from disk."""
    from fusechat.io import model_fingerprint
    from fusechat.shards import file_digest

    key = {"stage": stage, "version": VERSION, "model": model_fingerprint(model),
           "data": file_digest(path), "config": cfg.key()}  # fmt: skip
    return json.loads(json.dumps(key))


def _changed(old: dict, new: dict) -> list[str]:
    """The key's entries that differ, settings by name (``lr``, ``data``)."""
    a, b = dict(old), dict(new)
    a.update(old.get("config") or {})
    b.update(new.get("config") or {})
    return sorted(k for k in {*a, *b} if k != "config" and a.get(k) != b.get(k))


def reuse(stage: str, key: dict, out: Path, inputs: Sequence, overwrite: bool) -> dict | None:
    """The manifest of a finished run with this key (nothing to do), else None once ``out`` may
    be written: a folder of another stage is refused, one of another run needs ``overwrite``."""
    from fusechat.io import check_apart, read_manifest, stage_of

    done = read_manifest(out)
    if isinstance(done, dict) and done.get("key") == key:
        log.info("%s: %s already complete", out, stage)
        return done
    check_apart(out, inputs)
    check_apart(out.with_name(out.name + ".ckpt"), inputs)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if stage_of(out) != stage:  # --overwrite deletes only what this stage wrote
            raise FusechatError(f"{out}: exists and is not a {stage} output; choose another folder")
        if not overwrite:
            raise FusechatError(f"{out}: holds a {stage} run with other inputs or settings "
                                f"({', '.join(_changed(done['key'], key))}); use --overwrite "
                                "or another folder")  # fmt: skip
    return None


def _model(path: str, cfg: PreferSettings):
    """The policy, or DPO's frozen reference loaded the same way (the same weights under the
    same autocast, so the two agree before the first step): ``load_trainable``, float32 master
    weights in full fine-tuning; a LoRA's base in ``cfg.dtype``."""
    import torch

    from fusechat.data import resolve_dtype
    from fusechat.precision import deepspeed_in_use, load_trainable

    return load_trainable(path, cfg.lora is not None, deepspeed_in_use(),
                          lora_dtype=getattr(torch, resolve_dtype(cfg.dtype)))  # fmt: skip


def peft_config(lora: LoraConfig | None):
    """PEFT's LoRA settings for TRL's ``peft_config`` (None: full fine-tuning)."""
    if lora is None:
        return None
    import peft

    tm = lora.target_modules
    return peft.LoraConfig(r=lora.r, lora_alpha=lora.scale, lora_dropout=lora.dropout,
                           target_modules=tm if isinstance(tm, str) else list(tm),
                           task_type="CAUSAL_LM")  # fmt: skip


def trl_args(cls, cfg: SftConfig | DpoConfig, ckpt: Path, world: int, **extra):
    """TRL's ``SFTConfig`` / ``DPOConfig`` (TrainingArguments) from ``cfg``."""
    import torch

    from fusechat.data import resolve_dtype

    accum = max(1, math.ceil(cfg.batch_size / (cfg.micro_batch_size * world)))
    if accum * cfg.micro_batch_size * world != cfg.batch_size:
        log.warning("batch size %d is not micro batch %d x %d processes x accumulation; using %d",
                    cfg.batch_size, cfg.micro_batch_size, world, accum * cfg.micro_batch_size * world)  # fmt: skip
    return cls(
        output_dir=str(ckpt), per_device_train_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=accum, learning_rate=cfg.lr, num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps, lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=cfg.weight_decay, logging_steps=cfg.logging_steps, save_strategy="steps",
        save_steps=cfg.save_steps, save_total_limit=2, seed=cfg.seed, data_seed=cfg.seed,
        activation_checkpointing=cfg.gradient_checkpointing, max_length=cfg.max_length,
        bf16=resolve_dtype(cfg.dtype) == "bfloat16", fp16=False,
        use_cpu=not torch.cuda.is_available(), report_to=[], dataloader_num_workers=0,
        disable_tqdm=False, **extra,
    )  # fmt: skip


def _fit(trainer, tokenizer, out: Path, ckpt: Path, key: dict, stats: dict, cfg,
         model: str) -> dict:  # fmt: skip
    """Train (resuming from the last whole checkpoint in ``ckpt``) and save the model whole,
    with its card (``model`` its base)."""
    from fusechat.precision import stored_dtype
    from fusechat.ranks import Ranks
    from fusechat.train import _save, resume_point

    world = Ranks.from_env().world
    t0 = time.perf_counter()
    last = resume_point(trainer, ckpt)
    with warnings.catch_warnings():  # TRL 1.16 calls transformers 5's deprecated names for
        # activation checkpointing around the reference's forward: nothing a user can change
        warnings.filterwarnings("ignore", r"`(is_)?gradient_checkpointing\w*` is deprecated",
                                FutureWarning)  # fmt: skip
        result = trainer.train(resume_from_checkpoint=last)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    stats = {**stats, "steps": result.global_step, "train_loss": result.training_loss,
             "seconds": round(time.perf_counter() - t0, 1),
             "effective_batch": trainer.args.gradient_accumulation_steps
             * cfg.micro_batch_size * world, "processes": world, "resumed_from": last,
             "last_log": logged[-1] if logged else None}  # fmt: skip
    card = {"base_model": model, "data": stats["data"]}
    return _save(trainer, tokenizer, out, ckpt, {"key": key, "stats": stats}, cfg.lora is not None,
                 card, stored_dtype(model))  # fmt: skip


def _callbacks(ckpt: Path) -> list:
    from fusechat.trainer import jsonl_callback

    return [jsonl_callback(ckpt / "train_log.jsonl")]


def sft_stage(model: str, data: str | os.PathLike, out: str | os.PathLike,
              cfg: SftConfig | None = None, overwrite: bool = False) -> dict:  # fmt: skip
    """Fine-tune ``model`` on the assistant turns of an SFT set (a pairs folder's
    ``sft.jsonl``, or such a file) into ``out`` (``fusechat sft``). Returns the manifest."""
    from trl import SFTConfig, SFTTrainer

    from fusechat.implicit.pairs import SFT_FILE
    from fusechat.ranks import Ranks
    from fusechat.train import _checkpoint_folder

    cfg, out = cfg or SftConfig(), Path(out)
    path = data_file(data, SFT_FILE)
    key = stage_key("sft", model, path, cfg)
    if (done := reuse("sft", key, out, (model, data), overwrite)) is not None:
        return done
    rows = read_rows(path, sft_row)
    tokenizer = chat_tokenizer(model, cfg.template)
    dataset, counts = sft_dataset(rows, tokenizer, cfg.max_length, path)
    log.info("sft: %d conversations, %d tokens learned", counts["rows"], counts["learned_tokens"])
    ranks = Ranks.from_env()
    ckpt = _checkpoint_folder(out, key, overwrite, ranks.rank)
    # the mask comes with the tokens (assistant_masks), so TRL's assistant_only_loss, which
    # needs a template with {% generation %} markers, stays off
    args = trl_args(SFTConfig, cfg, ckpt, ranks.world, assistant_only_loss=False)
    trainer = SFTTrainer(model=_model(model, cfg), args=args, train_dataset=dataset,
                         processing_class=tokenizer, peft_config=peft_config(cfg.lora),
                         callbacks=_callbacks(ckpt))  # fmt: skip
    return _fit(trainer, tokenizer, out, ckpt, key, {**counts, "data": str(path)}, cfg, model)


def dpo_trainer(model: str, tokenizer, rows: Sequence[dict], cfg: DpoConfig, ckpt: Path,
                world: int = 1):  # fmt: skip
    """TRL's ``DPOTrainer`` on ``rows`` (conversational pairs): the policy and, for full
    fine-tuning, the reference are both ``model`` as loaded (a LoRA's reference is the model
    with its adapter off); the loss is ``trl_loss_type(cfg.loss)``."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = trl_args(DPOConfig, cfg, ckpt, world, beta=cfg.beta,
                    loss_type=[trl_loss_type(cfg.loss)])  # fmt: skip
    ref = None if cfg.lora is not None else _model(model, cfg)
    return DPOTrainer(model=_model(model, cfg), ref_model=ref, args=args,
                      train_dataset=Dataset.from_list(list(rows)), processing_class=tokenizer,
                      peft_config=peft_config(cfg.lora), callbacks=_callbacks(ckpt))  # fmt: skip


def dpo_stage(model: str, data: str | os.PathLike, out: str | os.PathLike,
              cfg: DpoConfig | None = None, overwrite: bool = False) -> dict:  # fmt: skip
    """Optimise ``model`` on preference pairs (a pairs folder's ``dpo.jsonl``, or such a file)
    against itself as the reference, into ``out`` (``fusechat dpo``). Returns the manifest."""
    from fusechat.implicit.pairs import DPO_FILE
    from fusechat.ranks import Ranks
    from fusechat.train import _checkpoint_folder

    cfg, out = cfg or DpoConfig(), Path(out)
    path = data_file(data, DPO_FILE)
    key = stage_key("dpo", model, path, cfg)
    if (done := reuse("dpo", key, out, (model, data), overwrite)) is not None:
        return done
    rows = read_rows(path, preference_row)
    tokenizer = chat_tokenizer(model, cfg.template)
    check_renders(rows, tokenizer, path)
    log.info("dpo: %d pairs, loss %s, beta %g", len(rows), cfg.loss, cfg.beta)
    ranks = Ranks.from_env()
    ckpt = _checkpoint_folder(out, key, overwrite, ranks.rank)
    trainer = dpo_trainer(model, tokenizer, [r for _, r in rows], cfg, ckpt, ranks.world)
    stats = {"pairs": len(rows), "data": str(path)}
    return _fit(trainer, tokenizer, out, ckpt, key, stats, cfg, model)

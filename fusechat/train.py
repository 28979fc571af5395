"""``fusechat train``: distil fused targets into a copy of the pivot (FuseChat's first stage).

``loss = lambda * CLM + (1 - lambda) * fusion`` over assistant tokens (``fusechat.losses``),
with the fused targets read sparse from the ``fuse`` stage's shards. Built on the HF Trainer, so
``accelerate launch`` / ``torchrun`` with DeepSpeed ZeRO or FSDP run it unchanged; checkpoints go
to ``OUT.ckpt/`` and a rerun resumes from the last one. The final model (LoRA merged in, if
used) appears in ``OUT`` only when training is complete.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path

import torch

from fusechat.cards import write_training_card
from fusechat.configs import LoraConfig, TrainConfig
from fusechat.errors import FusechatError
from fusechat.io import (
    check_apart,
    fingerprint,
    model_fingerprint,
    read_json,
    read_manifest,
    stage_of,
    write_json,
)
from fusechat.losses import fusion_losses
from fusechat.precision import cast_checkpoint, deepspeed_in_use, load_trainable, stored_dtype
from fusechat.ranks import Ranks
from fusechat.rows import ShardRows, check_targets, collate_rows
from fusechat.shards import STAGE
from fusechat.trainer import heldout_callback, jsonl_callback, plot_losses, trainer_class

log = logging.getLogger(__name__)
VERSION = 6  # 2: the loss normalised over the whole effective batch (num_items_in_batch);
# 3: fused rows with align.branches train as token trees; 4: their tokens weighed; 5: by 1 - lambda;
# 6: float32 master weights in full fine-tuning, saved in the checkpoint's dtype


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model, rows: ShardRows, batch_size: int = 16, temperature: float = 1.0) -> dict:
    """Held-out CLM loss, fusion CE and KL to the fused target, averaged over learned tokens."""
    model.eval()
    device = next(model.parameters()).device
    sums: dict[str, float] = defaultdict(float)
    n_total = 0
    for i in range(0, len(rows), batch_size):
        batch = collate_rows([rows[j] for j in range(i, min(i + batch_size, len(rows)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        n = int(batch["labels_mask"][:, 1:].sum())
        args = (logits, batch["input_ids"], batch["labels_mask"])
        tgt = (batch.get("target_ids"), batch.get("target_probs"))
        _, clm, ce = fusion_losses(*args, *tgt, lam=0.0, temperature=temperature, kind="ce")
        _, _, kl = fusion_losses(*args, *tgt, lam=0.0, temperature=temperature, kind="kl")
        sums["clm"] += clm.item() * n
        sums["fusion_ce"] += ce.item() * n
        sums["kl"] += kl.item() * n
        n_total += n
    return {k: v / max(n_total, 1) for k, v in sums.items()}


def _precision(name: str) -> dict:
    """TrainingArguments' mixed-precision flags; ``auto`` follows ``resolve_dtype``."""
    from fusechat.data import resolve_dtype

    if name == "auto":
        name = {"bfloat16": "bf16", "float32": "fp32"}[resolve_dtype("auto")]
    return {"bf16": name == "bf16", "fp16": name == "fp16"}


def _readable_weights(folder: Path) -> bool:
    """Every safetensors file of a checkpoint opens whole (a file cut short, by a full disk
    or a copy, fails its header's coverage check)."""
    from safetensors import SafetensorError, safe_open

    try:
        for f in folder.glob("*.safetensors"):
            with safe_open(str(f), framework="pt"):
                pass
    except (SafetensorError, OSError):
        return False
    return True


def last_complete_checkpoint(folder: Path) -> str | None:
    """The newest ``checkpoint-N`` that was written whole. The Trainer writes a checkpoint's
    ``trainer_state.json`` after its weights, optimizer and RNG states, so a folder without it
    was cut off by a kill; one whose weights do not open was damaged since. Such folders are
    removed (resuming from one fails) and the one before is used."""
    found = sorted(
        (p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
        reverse=True,
    )
    for p in found:
        if (p / "trainer_state.json").exists() and _readable_weights(p):
            return str(p)
        log.warning("%s: incomplete or damaged checkpoint, removed", p)
        shutil.rmtree(p, ignore_errors=True)
    return None


def resume_point(trainer, ckpt: Path) -> str | None:
    """The checkpoint every rank resumes from: rank 0 first removes a cut-off one
    (``last_complete_checkpoint``), then all read the same folder."""
    if trainer.is_world_process_zero():
        last_complete_checkpoint(ckpt)
    trainer.accelerator.wait_for_everyone()
    last = last_complete_checkpoint(ckpt)
    if last:
        log.info("resuming from %s", last)
    return last


def train(
    model_path: str,
    data: str | os.PathLike,
    out: str | os.PathLike,
    cfg: TrainConfig | None = None,
    corpus_fingerprint: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Fine-tune ``model_path`` on a ``fuse`` output (or, with ``lam == 1``, a pivot capture)."""
    cfg = cfg or TrainConfig()
    rows = ShardRows(data, cfg.max_length, with_targets=cfg.lam < 1.0, branch_weight=1.0 - cfg.lam)
    out = Path(out)
    key = {
        "stage": "train",
        "version": VERSION,
        "model": model_fingerprint(model_path),
        "data": fingerprint(rows.reader.key),
        "config": cfg.model_dump(),
    }
    key = json.loads(json.dumps(key))  # as read back from disk (tuples become lists)
    done = read_manifest(out)
    if done is not None and done.get("key") == key:
        log.info("%s: training already complete", out)
        return done
    check_apart(out, (model_path, data, cfg.heldout))
    check_apart(out.with_name(out.name + ".ckpt"), (model_path, data, cfg.heldout))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if stage_of(out) != "train":  # --overwrite deletes only what training wrote
            raise FusechatError(f"{out}: exists and is not a train output; choose another folder")
        if not overwrite:
            raise FusechatError(f"{out}: exists with another training run; use --overwrite")
    tokenizer, model = _load(model_path, rows, corpus_fingerprint, cfg.lora,
                             deepspeed_in_use(cfg.extra))  # fmt: skip
    ranks = Ranks.from_env()
    ckpt = _checkpoint_folder(out, key, overwrite, ranks.rank)
    trainer = _trainer(cfg, model, tokenizer, rows, ckpt, ranks.world)
    t0 = time.perf_counter()
    last = resume_point(trainer, ckpt)
    try:
        result = trainer.train(resume_from_checkpoint=last)
    except FusechatError:  # closes the progress bar before the one line prints
        trainer.callback_handler.on_train_end(trainer.args, trainer.state, trainer.control)
        raise
    stats = {
        "steps": result.global_step,
        "train_loss": result.training_loss,
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": len(rows),
        "effective_batch": trainer.args.gradient_accumulation_steps * cfg.micro_batch_size
        * ranks.world,
        "processes": ranks.world,
        "resumed_from": last,
    }  # fmt: skip
    card = {"base_model": model_path, "data": str(data)}
    return _save(trainer, tokenizer, out, ckpt, {"key": key, "stats": stats}, cfg.lora is not None,
                 card, stored_dtype(model_path))  # fmt: skip


def _load(model_path: str, rows: ShardRows, corpus_fp: str | None, lora: LoraConfig | None,
          deepspeed: bool = False):  # fmt: skip
    """The pivot's tokenizer (checked against the targets) and model (``load_trainable``:
    float32 master weights in full fine-tuning; wrapped in a LoRA)."""
    from fusechat.data import load_tokenizer

    tokenizer = load_tokenizer(model_path)
    check_targets(rows.reader.key, tokenizer, corpus_fp)
    model = load_trainable(model_path, lora is not None, deepspeed)
    if len(tokenizer) > model.config.vocab_size:
        raise FusechatError(
            f"{model_path}: tokenizer has {len(tokenizer)} tokens, the model {model.config.vocab_size}"
        )
    if lora is not None:
        import peft

        tm = lora.target_modules
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=lora.r, lora_alpha=lora.scale, lora_dropout=lora.dropout,
            target_modules=tm if isinstance(tm, str) else list(tm), task_type="CAUSAL_LM",
        ))  # fmt: skip
    return tokenizer, model


def _checkpoint_folder(out: Path, key: dict, overwrite: bool, rank: int) -> Path:
    """``OUT.ckpt``, holding checkpoints of this configuration only."""
    ckpt = out.with_name(out.name + ".ckpt")
    try:
        old = read_json(ckpt / STAGE) if (ckpt / STAGE).exists() else None
    except (OSError, ValueError):
        old = "damaged"  # a record cut off by a kill: not this configuration's
    if old is None and ckpt.is_dir() and any(ckpt.iterdir()):
        raise FusechatError(
            f"{ckpt}: exists and holds no fusechat checkpoints; choose another --out"
        )
    if old is not None and old != key:
        if not overwrite:
            raise FusechatError(f"{ckpt}: checkpoints of another configuration; use --overwrite")
        shutil.rmtree(ckpt)
    ckpt.mkdir(parents=True, exist_ok=True)
    if rank == 0:  # one writer under a launcher
        write_json(ckpt / STAGE, key)
    return ckpt


def _trainer(cfg: TrainConfig, model, tokenizer, rows: ShardRows, ckpt: Path, world: int):
    """The HF Trainer with the fusion loss, its arguments from ``cfg``."""
    from transformers import TrainingArguments

    accum = max(1, math.ceil(cfg.batch_size / (cfg.micro_batch_size * world)))
    if accum * cfg.micro_batch_size * world != cfg.batch_size:
        log.warning("batch size %d is not micro batch %d x %d processes x accumulation; using %d",
                    cfg.batch_size, cfg.micro_batch_size, world, accum * cfg.micro_batch_size * world)  # fmt: skip
    args = TrainingArguments(
        output_dir=str(ckpt),
        per_device_train_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=accum,
        learning_rate=cfg.lr,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        seed=cfg.seed,
        data_seed=cfg.seed,
        activation_checkpointing=cfg.gradient_checkpointing,
        remove_unused_columns=False,
        # without CUDA, processes under a launcher form a gloo group only when told so
        use_cpu=not torch.cuda.is_available(),
        include_num_input_tokens_seen=True,
        **_precision(cfg.precision),
        # defaults that extra may change (the rest is configs.TRAINER_OWNED)
        **{"save_total_limit": 2, "report_to": [], "dataloader_num_workers": 0,
           "disable_tqdm": False, **cfg.extra},
    )  # fmt: skip
    callbacks = [jsonl_callback(ckpt / "train_log.jsonl")]
    if cfg.heldout and cfg.eval_steps > 0:
        from fusechat.conversations import load_conversations

        convs, _ = load_conversations(cfg.heldout)
        held = [{"messages": c} for c in convs]
        callbacks.append(
            heldout_callback(held, tokenizer, cfg.eval_steps, ckpt / "train_log.jsonl")
        )
    return trainer_class()(
        model=model, args=args, train_dataset=rows, data_collator=collate_rows,
        callbacks=callbacks, lam=cfg.lam, temperature=cfg.temperature,
        fusion_loss=cfg.fusion_loss,
    )  # fmt: skip


def _save(trainer, tokenizer, out: Path, ckpt: Path, manifest: dict, lora: bool,
          card: dict | None = None, dtype: torch.dtype | None = None) -> dict:  # fmt: skip
    """The trained model in ``out``, renamed into place whole, with its manifest and, given
    ``card`` (``base_model``, ``data``), its model card (``fusechat.cards``); its floating
    tensors stored as ``dtype``, the checkpoint's it trained from (``cast_checkpoint``).

    Every process takes part in saving (ZeRO-3 and FSDP gather the weights); rank 0 then adds
    tokenizer, logs and manifest and renames the folder into place."""
    bad = next((n for n, p in trainer.model.named_parameters() if not p.isfinite().all()), None)
    if bad is not None:  # the last update can break the weights after the last loss
        raise FusechatError(f"{out}: not saved: training made {bad} non-finite")
    staging = out.with_name(f".{out.name}.tmp")
    if trainer.is_world_process_zero() and staging.exists():
        shutil.rmtree(staging)
    trainer.accelerator.wait_for_everyone()
    if lora:
        if trainer.is_world_process_zero():  # a plain checkpoint that merging can use
            trainer.model.merge_and_unload().save_pretrained(staging, max_shard_size="5GB")
    else:
        trainer.save_model(str(staging))
    if not trainer.is_world_process_zero():
        return {}
    cast_checkpoint(staging, dtype)
    tokenizer.save_pretrained(staging)
    (staging / "training_args.bin").unlink(missing_ok=True)
    log_path = ckpt / "train_log.jsonl"
    if log_path.exists():
        shutil.copy(log_path, staging / "train_log.jsonl")
        plot_losses(log_path, staging / "loss.png")
    if card is not None:  # named as the folder will be, not as the temporary one
        write_training_card(staging, out.name, manifest, card, log_path)
    write_json(staging / "manifest.json", manifest)
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    shutil.rmtree(ckpt, ignore_errors=True)
    log.info("trained %s in %.1f s (%d steps)", out, manifest["stats"]["seconds"],
             manifest["stats"]["steps"])  # fmt: skip
    return manifest

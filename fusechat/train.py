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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from fusechat.errors import FusechatError
from fusechat.io import fingerprint, read_json, read_manifest, write_json
from fusechat.losses import fusion_losses, predicts_label
from fusechat.shards import STAGE, StageReader, shard_name, unpack_ids

log = logging.getLogger(__name__)
VERSION = 2  # 2: the loss normalised over the whole effective batch (num_items_in_batch)


@dataclass(frozen=True)
class LoraSpec:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] | str = "all-linear"


@dataclass(frozen=True)
class TrainConfig:
    """Defaults are the FuseChat paper's (7B, 8 GPUs)."""

    lam: float = 0.9  # weight of the causal-LM loss; 1.0 = plain SFT, the CLM baseline
    temperature: float = 1.0  # teacher temperature on the fused target
    fusion_loss: str = "ce"  # ce | kl
    lr: float = 5e-6
    epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 128  # effective: micro_batch_size x accumulation x processes
    micro_batch_size: int = 4
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"
    weight_decay: float = 0.0
    max_length: int = 2048
    gradient_checkpointing: bool = True
    precision: str = "auto"  # auto (bf16 where supported) | bf16 | fp16 | fp32
    save_steps: int = 200
    logging_steps: int = 10
    heldout: str | None = None  # held-out conversations: their loss is logged during training
    eval_steps: int = 0  # every this many steps (and at the start); 0 = never
    seed: int = 0
    lora: LoraSpec | None = None
    extra: dict = field(default_factory=dict)  # more TrainingArguments, e.g. deepspeed, fsdp

    def to_json(self) -> str:
        """Every setting, for a launcher's child processes (nothing re-listed, nothing lost)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        raw = json.loads(text)
        lora = raw.pop("lora", None)
        if lora is not None:
            tm = lora["target_modules"]
            lora = LoraSpec(**{**lora, "target_modules": tm if isinstance(tm, str) else tuple(tm)})
        return cls(**raw, lora=lora)


# --------------------------------------------------------------------------- data


class ShardRows(torch.utils.data.Dataset):
    """Rows of a ``fuse`` output (or, for the CLM baseline, of a pivot ``capture``), read
    lazily by memory-mapped slices: nothing holds the whole corpus in memory."""

    def __init__(self, folder: str | os.PathLike, max_length: int, with_targets: bool):
        stage = read_manifest(folder)
        kind = (stage or {}).get("key", {}).get("stage", "fuse")
        self.reader = StageReader(folder, kind)
        self.reader.verify()
        if with_targets and kind != "fuse":
            raise FusechatError(
                f"{folder}: is a {kind} output; fusion training needs fused targets"
            )
        self.with_targets = with_targets
        self.max_length = max_length
        self.index: list[tuple[int, int, int]] = []  # (shard, start, end)
        for s in range(self.reader.n_shards):
            with safe_open(self.reader.folder / shard_name(s), framework="np") as f:
                splits = f.get_tensor("row.splits")
            self.index += [
                (s, int(a), int(b)) for a, b in zip(splits[:-1], splits[1:], strict=True)
            ]
        self._handles: dict[int, object] = {}
        if not self.index:
            raise FusechatError(f"{folder}: holds no rows")

    def __len__(self) -> int:
        return len(self.index)

    def _slice(self, s: int, key: str, a: int, b: int) -> np.ndarray:
        f = self._handles.get(s)
        if f is None:
            f = self._handles[s] = safe_open(self.reader.folder / shard_name(s), framework="np")
        return f.get_slice(key)[a:b]

    def __getitem__(self, i: int) -> dict:
        s, a, b = self.index[i]
        b = min(b, a + self.max_length)
        row = {
            "input_ids": unpack_ids(self._slice(s, "pos.input_ids", a, b)),
            "labels_mask": self._slice(s, "pos.labels_mask", a, b).astype(bool),
        }
        if self.with_targets:
            row["target_ids"] = unpack_ids(self._slice(s, "pos.target_ids", a, b))
            row["target_probs"] = self._slice(s, "pos.target_probs", a, b).astype(np.float32)
        return row

    def __getstate__(self):  # DataLoader workers open their own handles
        return {**self.__dict__, "_handles": {}}


def collate_rows(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Right-pad a batch; target ids pad with -1 and probabilities with 0."""
    n = max(len(r["input_ids"]) for r in rows)
    out = {
        "input_ids": torch.zeros((len(rows), n), dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), n), dtype=torch.long),
        "labels_mask": torch.zeros((len(rows), n), dtype=torch.bool),
    }
    if "target_ids" in rows[0]:
        k = rows[0]["target_ids"].shape[1]
        out["target_ids"] = torch.full((len(rows), n, k), -1, dtype=torch.long)
        out["target_probs"] = torch.zeros((len(rows), n, k), dtype=torch.float32)
    for i, r in enumerate(rows):
        t = len(r["input_ids"])
        out["input_ids"][i, :t] = torch.from_numpy(r["input_ids"])
        out["attention_mask"][i, :t] = 1
        out["labels_mask"][i, :t] = torch.from_numpy(r["labels_mask"])
        if "target_ids" in out:
            out["target_ids"][i, :t] = torch.from_numpy(r["target_ids"])
            out["target_probs"][i, :t] = torch.from_numpy(r["target_probs"])
    return out


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


# --------------------------------------------------------------------------- trainer


def _trainer_class():
    from transformers import Trainer

    class FusionTrainer(Trainer):
        """The HF Trainer with the fusion loss; logs its CLM and fusion parts separately."""

        def __init__(self, *args, lam: float, temperature: float, fusion_loss: str, **kw):
            super().__init__(*args, **kw)
            self.lam, self.temperature, self.fusion_loss = lam, temperature, fusion_loss
            self._parts: dict[str, list[float]] = defaultdict(list)
            # the loss is a sum over learned tokens divided by their count in the whole
            # effective batch (num_items_in_batch): transformers then neither divides it by
            # the accumulation steps nor averages micro-batch means
            self.model_accepts_loss_kwargs = True
            self.loss_is_scaled_for_ga = True

        def _get_num_items_in_batch(self, batch_samples, device):
            """Learned next-token positions over every micro-batch of this optimizer step and,
            on several processes, over all of them (transformers counts ``labels``)."""
            n = sum(predicts_label(b["labels_mask"]).sum() for b in batch_samples)
            n = torch.as_tensor(n, device=device)
            if self.args.world_size > 1:
                n = self.accelerator.gather(n).sum()
            return n

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            with_targets = self.lam < 1.0 and "target_ids" in inputs
            loss, clm, fus = fusion_losses(
                out.logits,
                inputs["input_ids"],
                inputs["labels_mask"],
                inputs.get("target_ids") if with_targets else None,
                inputs.get("target_probs") if with_targets else None,
                lam=self.lam,
                temperature=self.temperature,
                kind=self.fusion_loss,
                n_items=num_items_in_batch,
            )
            if num_items_in_batch is not None and self.args.world_size > 1:
                loss = loss * self.accelerator.num_processes  # DDP averages the ranks' gradients
            self._parts["clm_loss"].append(clm.item())
            if with_targets:
                self._parts["fusion_loss"].append(fus.item())
            return (loss, out) if return_outputs else loss

        def log(self, logs, start_time=None):
            if "loss" in logs:
                for k, v in self._parts.items():
                    if v:
                        logs[k] = float(np.mean(v))
                self._parts.clear()
            super().log(logs, start_time)

    return FusionTrainer


def _jsonl_callback(path: Path):
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if state.is_world_process_zero and logs:
                with open(path, "a") as f:
                    f.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    return JsonlLog()


def _heldout_callback(rows: list, tokenizer, every: int, path: Path):
    """Logs ``heldout_nll_per_char`` (``fusechat.heldout``) with the tokens trained on so far,
    at the start and every ``every`` steps: the curve a token-efficiency study reads."""
    from transformers import TrainerCallback

    from fusechat.heldout import nll_per_char

    class HeldoutCurve(TrainerCallback):
        def _measure(self, state, model):
            value = nll_per_char(
                model, tokenizer, rows, "tokenizer"
            )  # every rank: ZeRO-3 needs all
            if state.is_world_process_zero:
                entry = {"step": state.global_step, "tokens": int(state.num_input_tokens_seen),
                         "heldout_nll_per_char": value}  # fmt: skip
                with open(path, "a") as f:
                    f.write(json.dumps(entry) + "\n")

        def on_train_begin(self, args, state, control, model=None, **kw):
            if state.global_step == 0:
                self._measure(state, model)

        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step % every == 0 or state.global_step == state.max_steps:
                self._measure(state, model)

    return HeldoutCurve()


def plot_losses(log_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("clm_loss", "fusion_loss", "loss"):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if ax.lines:
        ax.legend()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def _precision(name: str) -> dict:
    cuda = torch.cuda.is_available()
    if name == "auto":
        name = "bf16" if cuda and torch.cuda.is_bf16_supported() else ("fp16" if cuda else "fp32")
    return {"bf16": name == "bf16", "fp16": name == "fp16"}


def last_complete_checkpoint(folder: Path) -> str | None:
    """The newest ``checkpoint-N`` that was written whole. The Trainer writes a checkpoint's
    ``trainer_state.json`` after its weights, optimizer and RNG states, so a folder without it
    was cut off by a kill; such folders are removed (resuming from one fails)."""
    found = sorted(
        (p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
        reverse=True,
    )
    for p in found:
        if (p / "trainer_state.json").exists():
            return str(p)
        log.warning("%s: incomplete checkpoint (killed while saving), removed", p)
        shutil.rmtree(p, ignore_errors=True)
    return None


def check_targets(data_key: dict, tokenizer, corpus_fp: str | None) -> None:
    """Reject targets made for another tokenizer or corpus before any training."""
    from fusechat.capture import tokenizer_fingerprint

    want = data_key.get("pivot_tokenizer_fingerprint") or data_key.get("tokenizer_fingerprint")
    got = tokenizer_fingerprint(tokenizer)
    if want != got:
        raise FusechatError(
            f"the training data was made with another tokenizer than {tokenizer.name_or_path} "
            f"(vocabulary fingerprint {want} vs {got})"
        )
    if corpus_fp is not None and data_key.get("corpus_fingerprint") != corpus_fp:
        raise FusechatError(
            f"the training data was made from another corpus "
            f"(fingerprint {data_key.get('corpus_fingerprint')} vs {corpus_fp})"
        )


def train(
    model_path: str,
    data: str | os.PathLike,
    out: str | os.PathLike,
    cfg: TrainConfig = TrainConfig(),
    corpus_fingerprint: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Fine-tune ``model_path`` on a ``fuse`` output (or, with ``lam == 1``, a pivot capture)."""
    from transformers import TrainingArguments

    from fusechat.capture import model_fingerprint
    from fusechat.data import load_model, load_tokenizer

    if not 0.0 <= cfg.lam <= 1.0:
        raise FusechatError(f"lambda must be in [0, 1], got {cfg.lam}")
    if cfg.fusion_loss not in ("ce", "kl"):
        raise FusechatError(f"unknown fusion loss {cfg.fusion_loss!r} (ce or kl)")
    rows = ShardRows(data, cfg.max_length, with_targets=cfg.lam < 1.0)
    out = Path(out)
    key = {
        "stage": "train",
        "version": VERSION,
        "model": model_fingerprint(model_path),
        "data": fingerprint(rows.reader.key),
        "config": asdict(cfg),
    }
    key = json.loads(json.dumps(key))  # as read back from disk (tuples become lists)
    done = read_manifest(out)
    if done is not None and done.get("key") == key:
        log.info("%s: training already complete", out)
        return done
    if out.exists() and not overwrite:
        raise FusechatError(f"{out}: exists with another training run; use --overwrite")
    tokenizer = load_tokenizer(model_path)
    check_targets(rows.reader.key, tokenizer, corpus_fingerprint)
    model = load_model(model_path, dtype="auto")
    if len(tokenizer) > model.config.vocab_size:
        raise FusechatError(
            f"{model_path}: tokenizer has {len(tokenizer)} tokens, the model {model.config.vocab_size}"
        )
    ckpt = out.with_name(out.name + ".ckpt")
    if (ckpt / STAGE).exists() and read_json(ckpt / STAGE) != key:
        if not overwrite:
            raise FusechatError(f"{ckpt}: checkpoints of another configuration; use --overwrite")
        shutil.rmtree(ckpt)
    ckpt.mkdir(parents=True, exist_ok=True)
    if int(os.environ.get("RANK", "0")) == 0:  # one writer under a launcher
        write_json(ckpt / STAGE, key)
    if cfg.lora is not None:
        from peft import LoraConfig, get_peft_model

        tm = cfg.lora.target_modules
        model = get_peft_model(
            model,
            LoraConfig(
                r=cfg.lora.r,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout,
                target_modules=list(tm) if not isinstance(tm, str) else tm,
                task_type="CAUSAL_LM",
            ),
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    accum = max(1, math.ceil(cfg.batch_size / (cfg.micro_batch_size * world)))
    if accum * cfg.micro_batch_size * world != cfg.batch_size:
        log.warning(
            "batch size %d is not micro batch %d x %d processes x accumulation; using %d",
            cfg.batch_size,
            cfg.micro_batch_size,
            world,
            accum * cfg.micro_batch_size * world,
        )
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
        save_total_limit=2,
        seed=cfg.seed,
        data_seed=cfg.seed,
        activation_checkpointing=cfg.gradient_checkpointing,
        remove_unused_columns=False,
        report_to=[],
        # without CUDA, processes under a launcher form a gloo group only when told so
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=False,
        include_num_input_tokens_seen=True,
        **_precision(cfg.precision),
        **cfg.extra,
    )
    log_path = ckpt / "train_log.jsonl"
    callbacks = [_jsonl_callback(log_path)]
    if cfg.heldout and cfg.eval_steps > 0:
        from fusechat.data import load_conversations

        convs, _ = load_conversations(cfg.heldout)
        held = [{"messages": c} for c in convs]
        callbacks.append(_heldout_callback(held, tokenizer, cfg.eval_steps, log_path))
    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=collate_rows,
        callbacks=callbacks,
        lam=cfg.lam,
        temperature=cfg.temperature,
        fusion_loss=cfg.fusion_loss,
    )
    last = last_complete_checkpoint(ckpt) if trainer.is_world_process_zero() else None
    trainer.accelerator.wait_for_everyone()
    last = last_complete_checkpoint(ckpt)
    if last:
        log.info("resuming from %s", last)
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=last)
    seconds = time.perf_counter() - t0
    # Every process takes part in saving (ZeRO-3 and FSDP gather the weights); rank 0 then
    # adds tokenizer, logs and manifest and renames the folder into place.
    staging = out.with_name(f".{out.name}.tmp")
    if trainer.is_world_process_zero() and staging.exists():
        shutil.rmtree(staging)
    trainer.accelerator.wait_for_everyone()
    if cfg.lora is not None:
        if trainer.is_world_process_zero():  # a plain checkpoint that merging can use
            trainer.model.merge_and_unload().save_pretrained(staging, max_shard_size="5GB")
    else:
        trainer.save_model(str(staging))
    if not trainer.is_world_process_zero():
        return {}
    tokenizer.save_pretrained(staging)
    for junk in ("training_args.bin",):
        (staging / junk).unlink(missing_ok=True)
    if log_path.exists():
        shutil.copy(log_path, staging / "train_log.jsonl")
        plot_losses(log_path, staging / "loss.png")
    manifest = {
        "key": key,
        "stats": {
            "steps": result.global_step,
            "train_loss": result.training_loss,
            "seconds": round(seconds, 1),
            "rows": len(rows),
            "effective_batch": accum * cfg.micro_batch_size * world,
            "processes": world,
            "resumed_from": last,
        },
    }
    write_json(staging / "manifest.json", manifest)
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    shutil.rmtree(ckpt, ignore_errors=True)
    log.info("trained %s in %.1f s (%d steps)", out, seconds, result.global_step)
    return manifest

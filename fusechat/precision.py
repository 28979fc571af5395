"""The weights a fine-tuning holds and the dtype its output is stored in.

Full fine-tuning holds float32 master weights whatever the checkpoint stores, and the precision
setting only sets the compute, by autocast (Micikevicius et al., 2018): bf16 values near 0.02
lie 1.2e-4 apart, so in bf16 weights an Adam update of lr 5e-6 rounds away at every step. The
trained model is stored in the checkpoint's own dtype again (``cast_checkpoint``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fusechat.errors import FusechatError
from fusechat.io import read_json, write_json

_HEADER_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
                  "F64": torch.float64}  # fmt: skip


def deepspeed_in_use(extra: dict | None = None) -> bool:
    """A DeepSpeed engine will hold the weights: under ``accelerate launch`` with a DeepSpeed
    config, or given TrainingArguments' ``deepspeed``. Its bf16 and fp16 optimizers keep their
    own float32 master copy of whatever the model holds."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" or bool(
        (extra or {}).get("deepspeed")
    )


def load_trainable(path: str, lora: bool, deepspeed: bool = False, lora_dtype="auto"):
    """The model to fine-tune: float32 master weights in full fine-tuning; as stored where
    DeepSpeed keeps the master copy itself (the host then holds 2 bytes a weight per process,
    not 4); a LoRA's frozen base in ``lora_dtype`` (PEFT keeps the adapters in float32)."""
    from fusechat.data import load_model

    if lora:
        return load_model(path, dtype=lora_dtype)
    return load_model(path, dtype="auto" if deepspeed else torch.float32)


def _header_dtypes(f: Path) -> list[str]:
    """The dtype names a safetensors file's header gives its tensors ("BF16", "I64", ...), in
    order, nothing read but the header."""
    from safetensors import safe_open

    with safe_open(str(f), framework="pt") as h:
        return [h.get_slice(k).get_dtype() for k in h.keys()]


def stored_dtype(path: str) -> torch.dtype | None:
    """The dtype a checkpoint stores: config.json's (transformers reads it as a torch.dtype),
    else (a config without one, or one per sub-model) its first safetensors file's first
    floating tensor's; None where neither says."""
    from transformers import AutoConfig

    try:
        dtype = AutoConfig.from_pretrained(path).dtype
    except (OSError, ValueError):
        return None  # load_model has said what is wrong with the folder
    if isinstance(dtype, torch.dtype):
        return dtype
    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    kinds = _header_dtypes(files[0]) if files else []
    return next((_HEADER_DTYPES[k] for k in kinds if k in _HEADER_DTYPES), None)


def _data_bytes(f: Path) -> int:
    """A safetensors file's tensor bytes: all but its 8-byte length and JSON header."""
    with open(f, "rb") as h:
        return f.stat().st_size - 8 - int.from_bytes(h.read(8), "little")


def cast_checkpoint(folder: Path, dtype: torch.dtype | None) -> None:
    """Store every floating tensor of the safetensors checkpoint in ``folder`` as ``dtype``
    (the checkpoint's it trained from), with config.json's ``dtype`` and the shard index's size
    to match; other tensors, and files already in ``dtype``, as they are. A value the dtype
    cannot hold (fp16 above 65,504) is refused, naming the tensor. Read tensor by tensor: the
    host holds one output file, not an input file and its copy."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if dtype is None or not dtype.is_floating_point:
        return
    want = {v: k for k, v in _HEADER_DTYPES.items()}[dtype]
    files = sorted(folder.glob("*.safetensors"))
    todo = [f for f in files
            if any(k.startswith(("F", "BF")) and k != want for k in _header_dtypes(f))]  # fmt: skip
    if not todo:
        return
    for f in todo:
        tensors = {}
        with safe_open(str(f), framework="pt") as h:
            meta = h.metadata()
            for k in h.keys():
                t = h.get_tensor(k)
                if t.is_floating_point() and t.dtype != dtype:
                    t = t.to(dtype)
                    if not t.isfinite().all():
                        raise FusechatError(f"{folder}: not saved: {k} overflows {dtype}")
                tensors[k] = t
        save_file(tensors, str(f.with_name(f.name + ".tmp")), metadata=meta)
        del tensors
        os.replace(f.with_name(f.name + ".tmp"), f)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        idx = read_json(index)
        total = sum(_data_bytes(f) for f in files)
        write_json(index, {**idx, "metadata": {**idx.get("metadata", {}), "total_size": total}})
    config = read_json(folder / "config.json")
    config["dtype"] = str(dtype).removeprefix("torch.")
    write_json(folder / "config.json", config)

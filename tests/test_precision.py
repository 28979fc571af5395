"""fusechat.precision: the weights a fine-tuning holds and the dtype its output is stored in."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fusechat.errors import FusechatError
from fusechat.precision import cast_checkpoint, deepspeed_in_use, load_trainable, stored_dtype


def test_a_sharded_float32_checkpoint_is_stored_in_bf16_once(toy_world, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(toy_world / "openchat-mini", dtype=torch.float32)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    cast_checkpoint(tmp_path, torch.bfloat16)
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) > 1 and not list(tmp_path.glob("*.tmp"))
    tensors = {k: v for f in shards for k, v in load_file(f).items()}
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in tensors.values())
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert back.dtype == torch.bfloat16
    ref = model.state_dict()
    assert all(torch.equal(p, ref[n].to(torch.bfloat16)) for n, p in back.state_dict().items())
    stamps = [f.stat().st_mtime_ns for f in shards]
    cast_checkpoint(tmp_path, torch.bfloat16)  # already so: no file is rewritten
    cast_checkpoint(tmp_path, None)  # a checkpoint that declares no dtype: nothing to do
    assert [f.stat().st_mtime_ns for f in shards] == stamps


def test_nothing_but_the_dtype_changes(tmp_path):
    """A file of bf16 tensors alone is cast too (a 16-bit save of an fp16 checkpoint); the
    files' metadata and the index's other entries are kept."""
    from safetensors import safe_open

    save_file({"w": torch.ones(4, dtype=torch.bfloat16)}, str(tmp_path / "a.safetensors"),
              metadata={"format": "pt", "note": "kept"})  # fmt: skip
    (tmp_path / "config.json").write_text("{}")
    index = {"metadata": {"total_parameters": 4, "total_size": 8}, "weight_map": {"w": "a"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    cast_checkpoint(tmp_path, torch.float16)
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as h:
        assert h.metadata() == {"format": "pt", "note": "kept"}
        assert h.get_tensor("w").dtype == torch.float16
    got = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert got == {**index, "metadata": {"total_parameters": 4, "total_size": 8}}


def test_every_floating_tensor_is_cast_and_the_rest_kept(tmp_path):
    save_file({"a": torch.full((3,), 1.5), "b": torch.ones(2, dtype=torch.bfloat16),
               "c": torch.arange(4)}, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "float32", "x": 1}))
    cast_checkpoint(tmp_path, torch.float16)
    got = load_file(tmp_path / "model.safetensors")
    assert {k: t.dtype for k, t in got.items()} == {
        "a": torch.float16, "b": torch.float16, "c": torch.int64}  # fmt: skip
    assert torch.equal(got["c"], torch.arange(4)) and got["a"][0] == 1.5
    assert json.loads((tmp_path / "config.json").read_text()) == {"dtype": "float16", "x": 1}


def test_a_value_the_dtype_cannot_hold_is_refused_and_the_file_kept(tmp_path):
    f = tmp_path / "model.safetensors"
    save_file({"w": torch.tensor([1.0, 1e6])}, str(f), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text("{}")
    before = f.read_bytes()
    with pytest.raises(FusechatError, match=r"w overflows torch.float16"):
        cast_checkpoint(tmp_path, torch.float16)
    assert f.read_bytes() == before and not list(tmp_path.glob("*.tmp"))


def test_the_stored_dtype_is_the_config_s_else_the_weights(tmp_path):
    save_file({"n": torch.ones(2, dtype=torch.int64), "w": torch.ones(2, dtype=torch.bfloat16)},
              str(tmp_path / "model.safetensors"))  # fmt: skip
    cfg = {"model_type": "mistral", "vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert stored_dtype(str(tmp_path)) == torch.bfloat16  # the first floating tensor's
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "dtype": "float16"}))
    assert stored_dtype(str(tmp_path)) == torch.float16
    assert stored_dtype(str(tmp_path / "missing")) is None
    save_file({"n": torch.ones(2, dtype=torch.int64)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert stored_dtype(str(tmp_path)) is None  # no floating tensor says


def test_deepspeed_is_seen_from_the_launcher_or_the_arguments(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert not deepspeed_in_use() and not deepspeed_in_use({"deepspeed": None})
    assert deepspeed_in_use({"deepspeed": "ds.json"})
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert deepspeed_in_use()


def test_full_fine_tuning_holds_float32_master_weights(toy_world, tmp_path):
    """A bf16 checkpoint: float32 weights to train; as stored where DeepSpeed keeps the master
    copy; a LoRA base in the dtype asked for."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(toy_world / "openchat-mini", dtype=torch.bfloat16)
    m.save_pretrained(tmp_path)
    dtypes = lambda model: {p.dtype for p in model.parameters()}  # noqa: E731
    assert dtypes(load_trainable(str(tmp_path), lora=False)) == {torch.float32}
    assert dtypes(load_trainable(str(tmp_path), lora=False, deepspeed=True)) == {torch.bfloat16}
    assert dtypes(load_trainable(str(tmp_path), lora=True)) == {torch.bfloat16}
    lora32 = load_trainable(str(tmp_path), lora=True, lora_dtype=torch.float32)
    assert dtypes(lora32) == {torch.float32}

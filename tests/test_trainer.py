"""The fusion Trainer's parts on real batches: the loss it hands the optimizer, what it logs,
the divergence stop, what the model reads of a batch, and the training log."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from fusechat.configs import TrainConfig
from fusechat.losses import fusion_losses, predicts_label
from fusechat.rows import ShardRows, collate_rows
from fusechat.trainer import jsonl_callback, model_inputs


@pytest.fixture(scope="module")
def parts(toy_world, fused):
    """The toy pivot, its tokenizer and the fused training rows (with targets)."""
    from fusechat.data import load_model, load_tokenizer

    path = str(toy_world / "openchat-mini")
    rows = ShardRows(fused["train"], 128, with_targets=True)
    return load_model(path, dtype="float32"), load_tokenizer(path), rows


def _trainer(parts, tmp_path, **kw):
    from fusechat.train import _trainer

    model, tok, rows = parts
    base = dict(lam=0.5, max_steps=1, batch_size=4, micro_batch_size=4, precision="fp32",
                gradient_checkpointing=False, warmup_ratio=0.0)  # fmt: skip
    return _trainer(TrainConfig(**{**base, **kw}), model, tok, rows, tmp_path / "ck", 1)


def test_the_loss_is_the_fusion_loss_with_the_trainers_settings(parts, tmp_path):
    """compute_loss = fusion_losses on the batch with the config's lambda, temperature and
    kind, normalised by the effective batch's count; with return_outputs, the logits too."""
    model, _, rows = parts
    t = _trainer(parts, tmp_path, lam=0.3, temperature=2.0, fusion_loss="kl")
    batch = collate_rows([rows[i] for i in range(4)])
    n = predicts_label(batch["labels_mask"]).sum() * 3  # as if two more micro-batches follow
    with torch.no_grad():
        loss, out = t.compute_loss(model, batch, return_outputs=True, num_items_in_batch=n)
        want, _, _ = fusion_losses(out.logits, batch["input_ids"], batch["labels_mask"],
                                   batch["target_ids"], batch["target_probs"], lam=0.3,
                                   temperature=2.0, kind="kl", n_items=n)  # fmt: skip
        plain, _, _ = fusion_losses(out.logits, batch["input_ids"], batch["labels_mask"],
                                    batch["target_ids"], batch["target_probs"], lam=0.3, n_items=n)  # fmt: skip
        assert loss.item() == pytest.approx(want.item(), rel=1e-6)
        assert loss.item() != pytest.approx(plain.item(), rel=1e-3)  # the settings matter here
        assert t.compute_loss(model, batch, num_items_in_batch=n).item() == pytest.approx(
            loss.item(), rel=1e-6)  # fmt: skip


def test_the_logged_parts_are_the_means_since_the_last_log(parts, tmp_path):
    """Each log carries the mean CLM and fusion parts of the micro-batches since the last one;
    with lambda = 1 no fusion part is logged even when the batch holds targets."""
    model, _, rows = parts
    t = _trainer(parts, tmp_path, lam=0.5)
    batches = [collate_rows([rows[i] for i in range(j, j + 2)]) for j in (0, 2)]
    clm, fus = [], []
    with torch.no_grad():
        for b in batches:
            t.compute_loss(model, b)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            _, c, f = fusion_losses(logits, b["input_ids"], b["labels_mask"],
                                    b["target_ids"], b["target_probs"], lam=0.5)  # fmt: skip
            clm.append(c.item())
            fus.append(f.item())
    t.log({"loss": 1.0})
    last = t.state.log_history[-1]
    assert last["clm_loss"] == pytest.approx(sum(clm) / 2, rel=1e-5)
    assert last["fusion_loss"] == pytest.approx(sum(fus) / 2, rel=1e-5)
    assert fus[0] != pytest.approx(clm[0], rel=1e-3)
    t.log({"learning_rate": 0.1})  # not a loss log: the parts are not attached
    assert "clm_loss" not in t.state.log_history[-1]
    clm_only = _trainer(parts, tmp_path, lam=1.0)
    with torch.no_grad():
        clm_only.compute_loss(model, batches[0])
    clm_only.log({"loss": 1.0})
    assert "clm_loss" in clm_only.state.log_history[-1]
    assert "fusion_loss" not in clm_only.state.log_history[-1]


def test_a_non_finite_loss_stops_training_naming_the_step(parts, tmp_path, toy_world):
    from fusechat.data import load_model
    from fusechat.errors import FusechatError

    _, _, rows = parts
    t = _trainer(parts, tmp_path)
    broken = load_model(str(toy_world / "openchat-mini"), dtype="float32")
    with torch.no_grad():
        broken.model.norm.weight.fill_(float("nan"))
    t.state.global_step = 4  # the fifth step is running
    with pytest.raises(FusechatError, match=r"^training diverged at step 5: the loss is nan"):
        t.compute_loss(broken, collate_rows([rows[0]]))


def test_the_items_of_an_optimizer_step_are_its_learned_positions(parts, tmp_path):
    model, _, rows = parts
    t = _trainer(parts, tmp_path)
    samples = [collate_rows([rows[0], rows[1]]), collate_rows([rows[2]])]
    n = t._get_num_items_in_batch(samples, torch.device("cpu"))
    want = sum(int(predicts_label(s["labels_mask"]).sum()) for s in samples)
    assert int(n) == want and want > sum(int(s["labels_mask"].sum()) for s in samples) - 4


def test_what_the_model_reads_of_a_batch(toy_world):
    """A plain batch: ids and its 0/1 mask as given. A token tree: its boolean 4D mask as an
    additive one in the model's dtype (0 where allowed, the dtype's minimum elsewhere) and
    its position ids."""
    from fusechat.data import load_model

    model = load_model(str(toy_world / "openchat-mini"), dtype="bfloat16")
    ids = torch.tensor([[5, 6, 7]])
    flat = {"input_ids": ids, "attention_mask": torch.ones(1, 3, dtype=torch.long),
            "labels_mask": torch.ones(1, 3, dtype=torch.bool)}  # fmt: skip
    got = model_inputs(model, flat)
    assert set(got) == {"input_ids", "attention_mask"}
    assert got["input_ids"] is ids and got["attention_mask"] is flat["attention_mask"]
    tree = torch.tensor([[True, False, False], [True, True, False], [True, False, True]])
    pos = torch.tensor([[0, 1, 1]])
    got = model_inputs(model, {"input_ids": ids, "attention_mask": tree[None, None],
                               "position_ids": pos})  # fmt: skip
    assert set(got) == {"input_ids", "attention_mask", "position_ids"}
    mask = got["attention_mask"]
    assert mask.dtype == torch.bfloat16 and mask.shape == (1, 1, 3, 3)
    lo = torch.finfo(torch.bfloat16).min
    assert torch.equal(mask[0, 0], torch.where(tree, 0.0, lo).to(torch.bfloat16))
    assert got["position_ids"] is pos
    model(**got)  # the model takes it
    # float32 master weights under bf16 autocast: the mask in the dtype attention computes in
    model = model.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model_inputs(model, {"input_ids": ids, "attention_mask": tree[None, None],
                                   "position_ids": pos})  # fmt: skip
        assert torch.equal(got["attention_mask"], mask)
        assert model(**got).logits.isfinite().all()
    assert model_inputs(model, {"input_ids": ids, "attention_mask": tree[None, None],
                                "position_ids": pos})["attention_mask"].dtype == torch.float32  # fmt: skip


def test_the_training_log_is_written_by_the_first_process_only(tmp_path):
    from transformers import TrainerState

    path = tmp_path / "log.jsonl"
    cb = jsonl_callback(path)
    args = SimpleNamespace()
    cb.on_log(args, TrainerState(global_step=3, is_world_process_zero=False), None, {"loss": 1.0})
    assert not path.exists()
    state = TrainerState(global_step=3, is_world_process_zero=True)
    cb.on_log(args, state, None, {})
    cb.on_log(args, state, None, None)
    assert not path.exists()
    cb.on_log(args, state, None, {"loss": 1.5})
    cb.on_log(args, TrainerState(global_step=4, is_world_process_zero=True), None, {"lr": 0.1})
    assert [json.loads(x) for x in path.read_text().splitlines()] == [
        {"step": 3, "loss": 1.5}, {"step": 4, "lr": 0.1}]  # fmt: skip

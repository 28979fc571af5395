"""The HF Trainer with the fusion loss (``FusionTrainer``, built by ``trainer_class``), what the
model reads of a batch (token trees included), the callbacks that log the losses and the
held-out curve, and the loss plot: what ``fusechat train`` runs."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from fusechat.errors import FusechatError
from fusechat.losses import fusion_losses, predicts_label


def trainer_class():
    from transformers import Trainer

    class FusionTrainer(Trainer):
        """The HF Trainer with the fusion loss; logs its CLM and fusion parts separately."""

        def __init__(self, *args, lam: float, temperature: float, fusion_loss: str, **kw):
            super().__init__(*args, **kw)
            self.lam, self.temperature, self.fusion_loss = lam, temperature, fusion_loss
            self._parts: dict[str, list[float]] = defaultdict(list)
            # the loss is a sum over learned tokens divided by their count in the whole
            # effective batch (num_items_in_batch, which compute_loss always receives): so
            # transformers must not divide it by the accumulation steps
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
            out = model(**model_inputs(model, inputs))
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
                position_weight=inputs.get("position_weight"),
            )
            check_finite_loss(loss, self.state.global_step + 1)
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


def check_finite_loss(loss: torch.Tensor, step: int) -> None:
    """A model of NaNs must never be saved as a result: a non-finite loss stops training."""
    if not torch.isfinite(loss):
        raise FusechatError(
            f"training diverged at step {step}: the loss is {loss.item()} (a lower learning rate?)"
        )


def model_inputs(model, inputs: dict) -> dict:
    """What the model reads of a batch; token trees (``align.branches``) bring a 4D boolean
    mask, given as an additive one in the dtype attention computes in (autocast's, over float32
    master weights: float32's lowest value would become -inf in bf16), and their positions."""
    mask = inputs["attention_mask"]
    if mask.dim() != 4:
        return {"input_ids": inputs["input_ids"], "attention_mask": mask}
    kind = mask.device.type
    dtype = (torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind)
             else next(model.parameters()).dtype)  # fmt: skip
    additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    additive = additive.masked_fill(~mask, torch.finfo(dtype).min)
    return {"input_ids": inputs["input_ids"], "attention_mask": additive,
            "position_ids": inputs["position_ids"]}  # fmt: skip


def jsonl_callback(path: Path):
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if state.is_world_process_zero and logs:
                with open(path, "a") as f:
                    f.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    return JsonlLog()


def heldout_callback(rows: list, tokenizer, every: int, path: Path):
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


# pragma: no mutate start (a picture: tests check it is written, not its pixels)
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


# pragma: no mutate end

"""`fusechat train` on the toy world: fusion targets, CLM, LoRA, resume, launchers."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fusechat.cli import main
from fusechat.configs import LoraConfig, TrainConfig, TrainJob
from fusechat.rows import ShardRows
from fusechat.train import evaluate, train


def _cfg(**kw) -> TrainConfig:
    base = dict(
        lam=0.5, lr=2e-3, max_steps=24, batch_size=8, micro_batch_size=8, warmup_ratio=0.0,
        gradient_checkpointing=False, precision="fp32", save_steps=1000, logging_steps=4,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_fusion_training_pulls_toward_the_fused_targets(toy_world, fused, tmp_path):
    from transformers import AutoModelForCausalLM

    held = ShardRows(fused["heldout"], 128, with_targets=True)
    m = train(str(toy_world / "openchat-mini"), fused["train"], tmp_path / "t", _cfg())
    after = evaluate(AutoModelForCausalLM.from_pretrained(tmp_path / "t"), held)
    # the same steps on the gold tokens alone: the fusion term is what pulls toward the targets
    # (the pivot wins many turns with its own distributions, so any step can raise the KL)
    train(str(toy_world / "openchat-mini"), fused["train"], tmp_path / "c", _cfg(lam=1.0))
    clm = evaluate(AutoModelForCausalLM.from_pretrained(tmp_path / "c"), held)
    assert after["kl"] < clm["kl"] - 0.01 and after["fusion_ce"] < clm["fusion_ce"]
    assert m["stats"]["steps"] == 24
    log = [json.loads(x) for x in (tmp_path / "t" / "train_log.jsonl").read_text().splitlines()]
    assert any("fusion_loss" in r and "clm_loss" in r for r in log)
    assert (tmp_path / "t" / "loss.png").exists()
    assert (tmp_path / "t" / "chat_template.jinja").exists()
    assert not (tmp_path / "t.ckpt").exists()
    # rerun: complete, nothing redone
    assert train(str(toy_world / "openchat-mini"), fused["train"], tmp_path / "t", _cfg()) == m


def test_lambda_one_is_plain_clm_on_a_capture(toy_world, fused, tmp_path, caplog):
    """lambda = 1 trains on the gold tokens only and needs no fused targets; the folder holds
    the model, its card (named as the folder, not its temporary name), the log and plot, no
    pickled training arguments, and the checkpoints are gone."""
    out = tmp_path / "clm-run"
    with caplog.at_level(logging.INFO, logger="fusechat.train"):
        m = train(
            str(toy_world / "openchat-mini"), fused["capture"], out, _cfg(lam=1.0, max_steps=4)
        )
    assert m["stats"]["steps"] == 4
    assert {"README.md", "manifest.json", "train_log.jsonl", "loss.png"} <= {
        p.name for p in out.iterdir()
    }
    assert not (out / "training_args.bin").exists()
    assert not out.with_name("clm-run.ckpt").exists() and not out.with_name(".clm-run.tmp").exists()
    card = (out / "README.md").read_text()
    assert "clm-run" in card and ".clm-run.tmp" not in card
    assert any(re.fullmatch(rf"trained {re.escape(str(out))} in \d+\.\d s \(4 steps\)", m)
               for m in caplog.messages)  # fmt: skip
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [r for r in log if "loss" in r]
    assert losses and all("fusion_loss" not in r for r in losses)
    assert all(r["loss"] == pytest.approx(r["clm_loss"], rel=1e-4) for r in losses)


def test_lora_trains_and_merges(toy_world, fused, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = _cfg(max_steps=3, lora=LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj")))
    train(str(toy_world / "openchat-mini"), fused["train"], tmp_path / "lora", cfg)
    assert not (tmp_path / "lora" / "adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(tmp_path / "lora")
    a = load_file(toy_world / "openchat-mini" / "model.safetensors")
    b = load_file(tmp_path / "lora" / "model.safetensors")
    assert a.keys() == b.keys()
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"],
                           b["model.layers.0.self_attn.q_proj.weight"])  # fmt: skip
    assert torch.equal(
        a["model.layers.0.mlp.up_proj.weight"], b["model.layers.0.mlp.up_proj.weight"]
    )


def test_a_bf16_checkpoint_trains_in_float32_master_weights(toy_world, fused, tmp_path):
    """Full fine-tuning of a bf16 checkpoint keeps float32 master weights and stores the
    result in bf16: the same tensors as training the same values stored in float32, rounded
    once at the end. (In bf16 weights an update of lr 5e-6 rounds away at every step.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pivot = toy_world / "openchat-mini"
    model = AutoModelForCausalLM.from_pretrained(pivot, dtype=torch.bfloat16)
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        model.to(dtype).save_pretrained(tmp_path / name)  # the same values, exactly
        AutoTokenizer.from_pretrained(pivot).save_pretrained(tmp_path / name)
        train(str(tmp_path / name), fused["train"], tmp_path / f"{name}-t", _cfg(lr=5e-6))
    start = load_file(tmp_path / "bf16" / "model.safetensors")
    got = load_file(tmp_path / "bf16-t" / "model.safetensors")
    want = load_file(tmp_path / "fp32-t" / "model.safetensors")
    assert json.loads((tmp_path / "bf16-t" / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    assert {t.dtype for t in want.values()} == {torch.float32}  # a float32 one stays so
    assert all(torch.equal(got[k], want[k].to(torch.bfloat16)) for k in want)
    moved = sum(int((got[k] != start[k]).sum()) for k in got) / sum(t.numel() for t in got.values())
    assert moved > 0.05


@pytest.mark.slow  # out of make mutation: seconds per mutant
def test_killed_training_resumes_to_the_same_model(toy_world, fused, tmp_path):
    args = ["train", "--model", str(toy_world / "openchat-mini"), "--data", str(fused["train"])]
    args += ["--lambda", "0.5", "--lr", "2e-3", "--max-steps", "12", "--batch-size", "8"]
    args += ["--micro-batch-size", "8", "--warmup-ratio", "0", "--precision", "fp32"]
    args += ["--no-gradient-checkpointing", "--save-steps", "3", "--logging-steps", "3"]
    ref = tmp_path / "ref"
    assert main([*args, "--out", str(ref)]) == 0
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "fusechat.cli", *args, "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = Path(f"{out}.ckpt")
    deadline = time.time() + 180
    while not (ckpt / "checkpoint-6").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert not out.exists(), "training finished before it could be killed"
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    stats = json.loads((out / "manifest.json").read_text())["stats"]
    assert stats["resumed_from"] and stats["steps"] == 12
    a, b = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_targets_from_another_tokenizer_are_rejected(toy_world, fused, tmp_path, capsys):
    argv = ["train", "--model", str(toy_world / "nh2-solar-mini"), "--data", str(fused["train"])]
    assert main([*argv, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "another tokenizer" in err and "\n" not in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name,kind", [("deepspeed_zero3", "DEEPSPEED"), ("fsdp", "FSDP")])
def test_shipped_accelerate_configs_load(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    path = Path(__file__).resolve().parents[1] / "recipes" / "accelerate" / f"{name}.yaml"
    cfg = load_config_from_file(str(path))
    assert cfg.distributed_type.name == kind and cfg.num_processes == 8
    assert cfg.mixed_precision == "bf16"


def test_launcher_receives_every_setting(toy_world, tmp_path, monkeypatch):
    """Under train.launcher the child reads the very TrainConfig the in-process path uses (a
    JSON job file, no hand-built argv): every train-section setting, LoRA dropout and target
    modules included, arrives unchanged."""
    import yaml

    from fusechat import steps
    from fusechat.configs import TrainSettings
    from fusechat.recipe import Recipe
    from fusechat.run import plan

    raw = yaml.safe_load((Path(__file__).parents[1] / "recipes" / "mini.yaml").read_text())
    raw["seed"] = 7
    raw["train"].update({"temperature": 2.0, "fusion_loss": "kl", "lr": 1e-4, "epochs": 2.0,
                         "max_steps": 9, "batch_size": 16, "micro_batch_size": 4,
                         "warmup_ratio": 0.1, "scheduler": "linear", "weight_decay": 0.01,
                         "max_length": 128, "gradient_checkpointing": False,
                         "precision": "bf16", "save_steps": 3, "logging_steps": 2,
                         "eval_steps": 5, "launcher": "acc.yaml", "extra": {"optim": "sgd"},
                         "lora": {"r": 4, "alpha": 8, "dropout": 0.2,
                                  "target_modules": ["q_proj", "v_proj"]}})  # fmt: skip
    recipe = Recipe.model_validate(raw)
    step = next(s for s in plan(recipe, tmp_path) if s.stage == "train")
    sent: list[list[str]] = []
    monkeypatch.setattr(steps.subprocess, "run", lambda cmd: sent.append(cmd) or
                        subprocess.CompletedProcess(cmd, 0))  # fmt: skip
    steps.run_step(step)
    (cmd,) = sent
    assert cmd[cmd.index("--config_file") + 1] == "acc.yaml"
    job = TrainJob.model_validate_json(Path(cmd[cmd.index("--config") + 1]).read_text())
    assert job.config == step.settings.config and job.out == str(step.out)
    t = recipe.train
    for name in set(TrainSettings.model_fields) - {"lam", "heldout"}:
        assert getattr(job.config, name) == getattr(t, name), name
    assert job.config.lam == 0.9 and job.config.seed == 7
    assert job.config.heldout.endswith("heldout.jsonl")
    assert job.config.lora == LoraConfig(r=4, alpha=8, dropout=0.2,
                                         target_modules=("q_proj", "v_proj"))  # fmt: skip
    assert not any(a.startswith("--lr") or a.startswith("--lora") for a in cmd)


def test_train_job_file_on_the_command_line(toy_world, fused, tmp_path):
    out = tmp_path / "out"
    job = TrainJob(config=_cfg(lam=1.0, max_steps=2), model=str(toy_world / "openchat-mini"),
                   data=str(fused["capture"]), out=str(out))  # fmt: skip
    f = tmp_path / "job.json"
    f.write_text(job.model_dump_json())
    assert main(["train", "--config", str(f)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["key"]["config"]["max_steps"] == 2 and manifest["stats"]["steps"] == 2
    f.write_text("{")
    assert main(["train", "--config", str(f), "--overwrite"]) == 2


def test_accumulated_micro_batches_equal_one_batch(toy_world, fused, tmp_path):
    """The loss is normalised by the learned tokens of the whole effective batch: one SGD step
    over 2 micro-batches of 4 rows (of different lengths) moves the weights as one batch of 8
    does; a mean of the two micro-batch means would weigh their tokens unequally."""
    outs = {}
    for micro in (8, 4):
        cfg = _cfg(lam=0.5, max_steps=1, batch_size=8, micro_batch_size=micro, lr=0.5,
                   extra={"optim": "sgd"})  # fmt: skip
        outs[micro] = tmp_path / f"m{micro}"
        train(str(toy_world / "openchat-mini"), fused["train"], outs[micro], cfg)
    a = load_file(outs[8] / "model.safetensors")
    b = load_file(outs[4] / "model.safetensors")
    base = load_file(toy_world / "openchat-mini" / "model.safetensors")
    moved = [k for k in a if not torch.equal(a[k], base[k])]
    assert moved  # the step did something
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)


def test_lora_run_is_reused_not_retrained(toy_world, fused, tmp_path):
    """A finished LoRA training (target modules a tuple in memory, a list on disk) is found
    complete on the next call instead of being trained again or refused."""
    cfg = _cfg(
        lam=1.0,
        max_steps=1,
        lora=LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj")),
    )
    out = tmp_path / "out"
    first = train(str(toy_world / "openchat-mini"), fused["capture"], out, cfg)
    mtime = (out / "manifest.json").stat().st_mtime_ns
    again = train(str(toy_world / "openchat-mini"), fused["capture"], out, cfg)
    assert again == first and (out / "manifest.json").stat().st_mtime_ns == mtime


@pytest.mark.slow  # out of make mutation: seconds per mutant
def test_two_cpu_processes_under_accelerate_match_one(toy_world, fused, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo; `--cpu` alone starts one
    process in this accelerate) with the config file `fusechat run` hands a launcher: two
    processes train, every setting arrives (LoRA included), and the first step's loss,
    normalised by the learned tokens of the whole batch across both, equals one process's."""
    cfg = _cfg(lam=0.5, lr=1e-3, max_steps=2, batch_size=8, micro_batch_size=4, logging_steps=1,
               lora=LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj")))  # fmt: skip
    f = tmp_path / "job.json"

    def job(cfg: TrainConfig, out: Path) -> list[str]:
        f.write_text(TrainJob(config=cfg, model=str(toy_world / "openchat-mini"),
                              data=str(fused["train"]), out=str(out)).model_dump_json())  # fmt: skip
        return ["-m", "fusechat.cli", "train", "--config", str(f)]

    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
              "--num_processes", "2", "--num_machines", "1"]  # fmt: skip
    step1 = {}
    for n, cmd in ((1, [sys.executable]), (2, launch)):
        out = tmp_path / f"p{n}"
        subprocess.run([*cmd, *job(cfg, out)], check=True, capture_output=True, timeout=300)
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["stats"]["processes"] == n and manifest["stats"]["effective_batch"] == 8
        assert manifest["key"]["config"]["lora"] == {"r": 4, "alpha": 8, "dropout": 0.0,
                                                     "target_modules": ["q_proj", "v_proj"]}  # fmt: skip
        log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
        step1[n] = next(r["loss"] for r in log if r.get("step") == 1 and "loss" in r)
    assert step1[2] == pytest.approx(step1[1], rel=1e-5)
    # full fine-tuning, one SGD step: the two processes' weights are one process's, exactly
    # (with LoRA the adapters' random init differs between the runs, not the maths)
    sgd = _cfg(lam=0.5, lr=0.5, max_steps=1, batch_size=8, micro_batch_size=4,
               extra={"optim": "sgd"})  # fmt: skip
    for n, cmd in ((1, [sys.executable]), (2, launch)):
        out = tmp_path / f"sgd{n}"
        subprocess.run([*cmd, *job(sgd, out)], check=True, capture_output=True, timeout=300)
    a, b = (load_file(tmp_path / f"sgd{n}" / "model.safetensors") for n in (1, 2))
    base = load_file(toy_world / "openchat-mini" / "model.safetensors")
    assert any(not torch.equal(a[k], base[k]) for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7)


def test_weights_made_non_finite_are_never_saved(tmp_path):
    """The last update can break the weights after the last finite loss: nothing is saved."""
    from fusechat.errors import FusechatError
    from fusechat.train import _save

    class Broken:
        model = torch.nn.Linear(2, 2)

    with torch.no_grad():
        Broken.model.weight[1, 0] = float("inf")
    with pytest.raises(FusechatError, match=r"out: not saved: training made weight non-finite"):
        _save(Broken(), None, tmp_path / "out", tmp_path / "out.ckpt", {}, lora=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.tmp").exists()


@pytest.mark.parametrize(
    ("name", "flags"),
    [("bf16", {"bf16": True, "fp16": False}), ("fp16", {"bf16": False, "fp16": True}),
     ("fp32", {"bf16": False, "fp16": False})],
)  # fmt: skip
def test_precision_flags_follow_the_setting(name, flags, monkeypatch):
    """TrainingArguments' flags: one of bf16/fp16 on as asked; auto follows the dtype rule."""
    import fusechat.data as data
    from fusechat.train import _precision

    assert _precision(name) == flags
    monkeypatch.setattr(data, "resolve_dtype", {"auto": "bfloat16"}.__getitem__)
    assert _precision("auto") == {"bf16": True, "fp16": False}
    monkeypatch.setattr(data, "resolve_dtype", {"auto": "float32"}.__getitem__)
    assert _precision("auto") == {"bf16": False, "fp16": False}


def test_the_checkpoint_folder_holds_one_configuration(tmp_path):
    """``OUT.ckpt`` (parents made) records its key; the same key keeps its checkpoints, another
    is refused unless overwrite clears it; a folder fusechat did not make is refused."""
    from fusechat.errors import FusechatError
    from fusechat.train import _checkpoint_folder

    out = tmp_path / "deep" / "er" / "target"
    ckpt = _checkpoint_folder(out, {"k": 1}, False, rank=0)
    assert ckpt == tmp_path / "deep" / "er" / "target.ckpt" and ckpt.is_dir()
    assert json.loads((ckpt / "stage.json").read_text()) == {"k": 1}
    (ckpt / "checkpoint-2").mkdir()
    assert _checkpoint_folder(out, {"k": 1}, False, rank=0) == ckpt
    assert (ckpt / "checkpoint-2").is_dir()  # resumable: kept
    with pytest.raises(FusechatError, match=r"target.ckpt: checkpoints of another configuration"):
        _checkpoint_folder(out, {"k": 2}, False, rank=0)
    assert (ckpt / "checkpoint-2").is_dir()
    _checkpoint_folder(out, {"k": 2}, True, rank=0)
    assert not (ckpt / "checkpoint-2").exists()
    assert json.loads((ckpt / "stage.json").read_text()) == {"k": 2}
    r1 = _checkpoint_folder(tmp_path / "r1", {"k": 1}, False, rank=1)
    assert r1.is_dir() and not (r1 / "stage.json").exists()  # one writer under a launcher
    other = tmp_path / "mine.ckpt"
    other.mkdir()
    (other / "notes.txt").write_text("a user's file")
    with pytest.raises(FusechatError, match=r"mine.ckpt: exists and holds no fusechat checkpoints"):
        _checkpoint_folder(tmp_path / "mine", {"k": 1}, True, rank=0)
    assert (other / "notes.txt").exists()


def test_resume_point_is_the_last_whole_checkpoint(tmp_path, caplog):
    """Every rank resumes from the newest checkpoint written whole; a cut-off one is removed."""
    from fusechat.train import resume_point

    class Rank0:
        class accelerator:
            @staticmethod
            def wait_for_everyone():
                pass

        @staticmethod
        def is_world_process_zero():
            return True

    assert resume_point(Rank0(), tmp_path) is None
    good = tmp_path / "checkpoint-4"
    good.mkdir()
    (good / "trainer_state.json").write_text("{}")
    torch.save({}, good / "pytorch_model.bin")
    (tmp_path / "checkpoint-6").mkdir()  # cut off: no trainer_state.json
    with caplog.at_level(logging.INFO, logger="fusechat.train"):
        assert resume_point(Rank0(), tmp_path) == str(good)
    assert f"resuming from {good}" in caplog.messages
    assert not (tmp_path / "checkpoint-6").exists()


def test_the_trainer_gets_every_setting_and_fusechats_defaults(toy_world, fused, tmp_path, caplog):
    """TrainingArguments from the config: the effective batch split into micro-batches x
    processes x accumulation (a remainder warned about), seeds, checkpointing, precision,
    the defaults fusechat owns, extra on top; the held-out curve only with a set and steps."""
    import logging

    from fusechat.data import load_model, load_tokenizer
    from fusechat.train import _trainer

    rows = ShardRows(fused["train"], 64, with_targets=True)
    model = load_model(str(toy_world / "openchat-mini"), dtype="float32")
    tok = load_tokenizer(str(toy_world / "openchat-mini"))
    cfg = _cfg(batch_size=32, micro_batch_size=4, seed=7, precision="fp32", lr=3e-4, epochs=2.0,
               max_steps=5, scheduler="constant", warmup_ratio=0.1, weight_decay=0.01,
               save_steps=7, logging_steps=3, gradient_checkpointing=True,
               extra={"save_total_limit": 5})  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="fusechat.train"):
        t = _trainer(cfg, model, tok, rows, tmp_path / "ck", world=2)
    assert caplog.messages == []  # 4 x 2 x 4 is the batch asked for
    a = t.args
    assert (a.learning_rate, a.num_train_epochs, a.max_steps, a.lr_scheduler_type.value) == (
        3e-4, 2.0, 5, "constant")  # fmt: skip
    assert (a.warmup_steps, a.weight_decay, a.save_strategy.value, a.save_steps) == (
        0.1, 0.01, "steps", 7)  # fmt: skip
    assert (a.logging_steps, a.activation_checkpointing) == (3, True)
    assert (a.output_dir, a.per_device_train_batch_size, a.gradient_accumulation_steps) == (
        str(tmp_path / "ck"), 4, 4)  # fmt: skip
    assert (a.seed, a.data_seed, a.remove_unused_columns, a.include_num_input_tokens_seen) == (
        7, 7, False, "all")  # transformers 5 spells True as "all"  # fmt: skip
    assert (a.bf16, a.fp16, a.save_total_limit, a.report_to, a.dataloader_num_workers) == (
        False, False, 5, [], 0)  # fmt: skip
    assert a.disable_tqdm is False and a.use_cpu is (not torch.cuda.is_available())
    assert (t.lam, t.fusion_loss) == (cfg.lam, cfg.fusion_loss)
    names = lambda tr: [type(c).__name__ for c in tr.callback_handler.callbacks]  # noqa: E731
    assert "HeldoutCurve" not in names(t)
    with caplog.at_level(logging.WARNING, logger="fusechat.train"):
        t = _trainer(_cfg(batch_size=30, micro_batch_size=4, heldout=str(toy_world / "corpus" / "heldout.jsonl"),
                          eval_steps=2), model, tok, rows, tmp_path / "ck2", world=2)  # fmt: skip
    assert t.args.gradient_accumulation_steps == 4 and t.args.save_total_limit == 2
    assert caplog.messages == [
        "batch size 30 is not micro batch 4 x 2 processes x accumulation; using 32"
    ]
    assert (t.args.activation_checkpointing, t.args.bf16) == (False, False)
    assert "HeldoutCurve" in names(t)
    t = _trainer(
        _cfg(heldout=str(toy_world / "corpus" / "heldout.jsonl"), eval_steps=0),
        model,
        tok,
        rows,
        tmp_path / "ck3",
        1,
    )
    assert "HeldoutCurve" not in names(t)


def _key(model: str, rows: ShardRows, cfg: TrainConfig) -> dict:
    """The key a training run records, spelled out: stage, version, the model's and the data's
    fingerprints and the whole config as read back from JSON."""
    from fusechat.io import fingerprint, model_fingerprint
    from fusechat.train import VERSION

    return {"stage": "train", "version": VERSION, "model": model_fingerprint(model),
            "data": fingerprint(rows.reader.key),
            "config": json.loads(json.dumps(cfg.model_dump()))}  # fmt: skip


def test_the_manifest_records_the_run(toy_world, fused, tmp_path, caplog):
    """The manifest (returned and on disk): the key that decides reuse (stage, version, the
    model's and the data's fingerprints, the whole config as read back) and the run's figures;
    the held-out curve at the start, every eval-steps and the end; the card names the sources
    the data came from; a rerun with the same key returns the manifest and says so."""
    model = str(toy_world / "openchat-mini")
    held = str(toy_world / "corpus" / "heldout.jsonl")
    cfg = _cfg(max_steps=3, batch_size=8, micro_batch_size=4, logging_steps=1, heldout=held,
               eval_steps=2, lora=LoraConfig(r=2, target_modules=("q_proj",)))  # fmt: skip
    out = tmp_path / "run"
    t0 = time.perf_counter()
    m = train(model, fused["train"], out, cfg)
    elapsed = time.perf_counter() - t0
    assert json.loads((out / "manifest.json").read_text()) == m
    rows = ShardRows(fused["train"], cfg.max_length, with_targets=True)
    assert m["key"] == _key(model, rows, cfg)
    assert m["key"]["config"]["lora"]["target_modules"] == ["q_proj"]
    s = m["stats"]
    assert set(s) == {"steps", "train_loss", "seconds", "rows", "effective_batch", "processes",
                      "resumed_from"}  # fmt: skip
    assert (s["steps"], s["rows"], s["effective_batch"], s["processes"], s["resumed_from"]) == (
        3, len(rows), 8, 1, None)  # fmt: skip
    assert len(rows) > 0
    assert isinstance(s["seconds"], float) and 0 < s["seconds"] <= elapsed
    assert round(s["seconds"], 1) == s["seconds"]
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 3 and s["train_loss"] == pytest.approx(sum(losses) / 3, rel=1e-3)
    curve = [r for r in log if "heldout_nll_per_char" in r]  # at the start, every 2, the end
    assert [r["step"] for r in curve] == [0, 2, 3]
    assert all(r["heldout_nll_per_char"] > 0 for r in curve)
    assert curve[0]["tokens"] == 0 < curve[1]["tokens"] < curve[2]["tokens"]
    assert "nh2-mixtral-mini" in (out / "README.md").read_text()
    with caplog.at_level(logging.INFO, logger="fusechat.train"):
        assert train(model, fused["train"], out, cfg) == m
    assert f"{out}: training already complete" in caplog.messages


def test_a_second_run_into_an_existing_folder(toy_world, fused, tmp_path):
    """An empty folder is trained into; a file, or a folder of anything else, is refused; a
    finished run with other settings is refused unless overwrite, which trains anew; neither
    the output nor its checkpoint folder may be the data."""
    import shutil

    from fusechat.errors import FusechatError

    model = str(toy_world / "openchat-mini")
    out = tmp_path / "run"
    out.mkdir()
    first = train(model, fused["capture"], out, _cfg(lam=1.0, max_steps=1))
    assert first["stats"]["steps"] == 1
    with pytest.raises(FusechatError, match=r"run: exists with another training run; use --overw"):
        train(model, fused["capture"], out, _cfg(lam=1.0, max_steps=2))
    assert json.loads((out / "manifest.json").read_text()) == first
    again = train(model, fused["capture"], out, _cfg(lam=1.0, max_steps=2), overwrite=True)
    assert again["stats"]["steps"] == 2
    assert json.loads((out / "manifest.json").read_text()) == again
    (tmp_path / "notes.txt").write_text("a user's file")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's file")
    for taken in (tmp_path / "notes.txt", tmp_path / "mine"):
        with pytest.raises(FusechatError, match=r"exists and is not a train output"):
            train(model, fused["capture"], taken, _cfg(lam=1.0, max_steps=1), overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "a user's file"
    assert (tmp_path / "mine" / "notes.txt").read_text() == "a user's file"
    data = tmp_path / "x.ckpt"
    shutil.copytree(fused["capture"], data)
    with pytest.raises(FusechatError, match=r"x.ckpt: the output is the input"):
        train(model, data, tmp_path / "x", _cfg(lam=1.0, max_steps=1))


def test_targets_of_another_corpus_are_rejected(toy_world, fused, tmp_path):
    from fusechat.errors import FusechatError

    with pytest.raises(FusechatError, match=r"the training data was made from another corpus"):
        train(str(toy_world / "openchat-mini"), fused["train"], tmp_path / "t", _cfg(),
              corpus_fingerprint="0" * 16)  # fmt: skip
    assert not (tmp_path / "t").exists()


def test_a_diverged_run_keeps_its_checkpoint_folder(toy_world, tmp_path, fused):
    """A model whose loss is NaN from the first step: training stops with one line naming the
    step, nothing is saved, and ``OUT.ckpt`` records this run's key (a rerun resumes there);
    another configuration is refused there unless overwrite."""
    from fusechat.data import load_model, load_tokenizer
    from fusechat.errors import FusechatError

    nan_model = tmp_path / "nan-model"
    m = load_model(str(toy_world / "openchat-mini"), dtype="float32")
    with torch.no_grad():
        m.model.norm.weight.fill_(float("nan"))
    m.save_pretrained(nan_model)
    load_tokenizer(str(toy_world / "openchat-mini")).save_pretrained(nan_model)
    out = tmp_path / "run"
    cfg = _cfg(lam=1.0, max_steps=2)
    with pytest.raises(FusechatError, match=r"training diverged at step 1: the loss is nan"):
        train(str(nan_model), fused["capture"], out, cfg)
    assert not out.exists()
    rows = ShardRows(fused["capture"], cfg.max_length, with_targets=False)
    key = _key(str(nan_model), rows, cfg)
    assert json.loads((tmp_path / "run.ckpt" / "stage.json").read_text()) == key
    with pytest.raises(FusechatError, match=r"run.ckpt: checkpoints of another configuration"):
        train(str(nan_model), fused["capture"], out, _cfg(lam=1.0, max_steps=3))
    with pytest.raises(FusechatError, match=r"diverged at step 1"):
        train(str(nan_model), fused["capture"], out, _cfg(lam=1.0, max_steps=3), overwrite=True)
    assert (
        json.loads((tmp_path / "run.ckpt" / "stage.json").read_text())["config"]["max_steps"] == 3
    )


def test_lora_settings_reach_peft(toy_world, fused):
    """Rank, alpha, dropout and the module names (a list, or one name such as all-linear)
    arrive in the PEFT config, a causal-LM task."""
    from fusechat.train import _load

    rows = ShardRows(fused["train"], 128, with_targets=True)
    model_path = str(toy_world / "openchat-mini")
    lora = LoraConfig(r=2, alpha=16, dropout=0.1, target_modules=("k_proj", "o_proj"))
    _, model = _load(model_path, rows, None, lora)
    c = model.peft_config["default"]
    assert (c.r, c.lora_alpha, c.lora_dropout, set(c.target_modules), c.task_type) == (
        2, 16, 0.1, {"k_proj", "o_proj"}, "CAUSAL_LM")  # fmt: skip
    _, model = _load(model_path, rows, None, LoraConfig(r=3, target_modules="all-linear"))
    c = model.peft_config["default"]
    assert (c.r, c.lora_alpha) == (3, 6)
    names = {
        n.split(".lora_A")[0].split(".")[-1] for n, _ in model.named_parameters() if "lora_A" in n
    }
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"} <= names


def test_checkpoints_are_ordered_by_step_and_cut_off_ones_reported(tmp_path, caplog):
    """checkpoint-10 is newer than checkpoint-9 (numbers, not names); a cut-off one is removed
    with a warning that names it."""
    from fusechat.train import last_complete_checkpoint

    for n in (9, 10):
        (tmp_path / f"checkpoint-{n}").mkdir()
        (tmp_path / f"checkpoint-{n}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-11").mkdir()
    with caplog.at_level(logging.WARNING, logger="fusechat.train"):
        assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert caplog.messages == [
        f"{tmp_path / 'checkpoint-11'}: incomplete or damaged checkpoint, removed"
    ]
    assert not (tmp_path / "checkpoint-11").exists()

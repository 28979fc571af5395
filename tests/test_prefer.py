"""Implicit fusion's training stages (``fusechat sft``, ``fusechat dpo`` on TRL): the length-
normalised DPO loss against a hand computation, both commands end to end on a tiny random model
(trained weights, reuse, overwrite, LoRA merged, resume), and bad inputs as one line."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import cli_error
from huggingface_hub import ModelCard

from fusechat.cli import main
from fusechat.data import TEMPLATES
from fusechat.implicit.prefer import chat_tokenizer, dpo_trainer, sft_dataset, sft_row
from fusechat.implicit.settings import DpoConfig, SftConfig

U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731
S = {"role": "system", "content": "You are a helpful assistant."}

QA = [("What is 41 + 27?", "68"), ("Name a moon of Zorvan.", "Kelo"),
      ("What is the capital of Merin?", "Vaska"), ("What color is the sky of Teru?", "blue"),
      ("What does dralo mean?", "river"), ("What is 3 + 4?", "7"),
      ("Who rules Zorvan?", "Queen Ila"), ("How many moons has Teru?", "two")]  # fmt: skip
SFT = [{"messages": [U(q), A(f"The answer is {a}.")]} for q, a in QA]
SFT[2] = {"messages": [S, U("Hello."), A("Hello! Ask away."), U(QA[2][0]), A("It is Vaska.")]}
DPO = [{"prompt": [U(q)], "chosen": [A(f"The answer is {a}.")],
        "rejected": [A(f"I do not know, sorry ({i}).")]} for i, (q, a) in enumerate(QA)]  # fmt: skip


def _jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _pairs_folder(folder, sft, dpo) -> None:
    """A pairs folder as ``fusechat pairs`` writes one: the two sets and a manifest with their
    checksums (what ``read_pairs`` checks)."""
    from fusechat.io import write_json
    from fusechat.shards import _manifest_digest, digest

    folder.mkdir()
    files = {"sft.jsonl": _jsonl(sft).encode(), "dpo.jsonl": _jsonl(dpo).encode()}
    for name, blob in files.items():
        (folder / name).write_bytes(blob)
    m = {"key": {"stage": "pairs", "version": 1}, "stats": {},
         "checksums": {n: digest(b) for n, b in files.items()}}  # fmt: skip
    m["digest"] = _manifest_digest(m)
    write_json(folder / "manifest.json", m)


@pytest.fixture(scope="module")
def tiny(mistral_tokenizer, tmp_path_factory) -> dict:
    """A tiny random Llama with Mistral's tokenizer (no chat_template of its own) and a pairs
    folder of 8 SFT rows and 8 pairs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = copy.deepcopy(mistral_tokenizer)  # the session's tokenizer: others may change it
    tok.chat_template = None
    d = tmp_path_factory.mktemp("prefer")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, max_position_embeddings=256)
                     ).save_pretrained(d / "chat")  # fmt: skip
    tok.save_pretrained(d / "chat")
    _pairs_folder(d / "pairs", SFT, DPO)
    return {"dir": d, "chat": str(d / "chat"), "pairs": d / "pairs"}


def _weights(folder) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _differ(a: dict, b: dict) -> bool:
    assert a.keys() == b.keys()
    return any(not torch.equal(a[k], b[k]) for k in a)


def _logp(model, tok, prompt, response) -> float:
    """log p(response | prompt): the response's tokens after the prompt rendered with the
    generation prompt, as TRL cuts them."""
    p = tok(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False),
            add_special_tokens=False)["input_ids"]  # fmt: skip
    full = tok(tok.apply_chat_template(prompt + response, tokenize=False),
               add_special_tokens=False)["input_ids"]  # fmt: skip
    assert full[: len(p)] == p
    with torch.no_grad():
        lp = model(input_ids=torch.tensor([full])).logits[0].float().log_softmax(-1)
    return float(lp[len(p) - 1 : -1].gather(1, torch.tensor(full[len(p) :])[:, None]).sum())


def _margins(folder, tok, rows) -> list[float]:
    """log p(chosen) - log p(rejected) of each pair under the model in ``folder``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return [_logp(model, tok, r["prompt"], r["chosen"]) - _logp(model, tok, r["prompt"],
                                                               r["rejected"]) for r in rows]  # fmt: skip


def _stats(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the loss


def _hand_logp(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """sum_t log p(response_t | prompt, response_<t), from the model's logits."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        lp = model(input_ids=ids).logits[0].log_softmax(-1)
    return sum(lp[len(prompt) - 1 + t, r] for t, r in enumerate(response))


def test_length_normalized_dpo_is_the_sigmoid_loss_on_mean_log_ratios(tiny, tmp_path):
    """TRL's loss for --loss length_normalized on a hand-made batch (responses of 3 and 2, 1
    and 4 tokens) is -log sigmoid(beta (x_c/|c| - x_r/|r|)) with x = log pi - log ref summed
    over the response; with equal lengths L it is plain DPO with beta / L."""
    import torch.nn.functional as F

    tok = chat_tokenizer(tiny["chat"], "openchat")
    beta = 2.0
    base = dict(template="openchat", dtype="float32", gradient_checkpointing=False)
    norm = dpo_trainer(tiny["chat"], tok, DPO[:1], DpoConfig(loss="length_normalized",
                       beta=beta, **base), tmp_path / "a")  # fmt: skip
    torch.manual_seed(1)
    with torch.no_grad():  # the policy moves away from the reference
        for p in norm.model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    batch = [{"prompt_ids": [1, 300, 301], "chosen_ids": [400, 401, 402], "rejected_ids": [500, 501]},
             {"prompt_ids": [1, 302], "chosen_ids": [403], "rejected_ids": [502, 503, 504, 505]}]  # fmt: skip
    got = norm.compute_loss(norm.model, norm.data_collator(batch))
    want = []
    for row in batch:
        p, c, r = row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]
        x_c = _hand_logp(norm.model, p, c) - _hand_logp(norm.ref_model, p, c)
        x_r = _hand_logp(norm.model, p, r) - _hand_logp(norm.ref_model, p, r)
        assert abs(x_c) > 1e-3 and abs(x_r) > 1e-3  # policy and reference differ
        want.append(-F.logsigmoid(beta * (x_c / len(c) - x_r / len(r))))
    assert got.item() == pytest.approx(torch.stack(want).mean().item(), rel=1e-4)

    # equal lengths L = 3: plain DPO (sigmoid) with beta / 3
    plain = dpo_trainer(tiny["chat"], tok, DPO[:1], DpoConfig(loss="sigmoid", beta=beta / 3,
                        **base), tmp_path / "b")  # fmt: skip
    plain.model.load_state_dict(norm.model.state_dict())
    same = [{"prompt_ids": [1, 300], "chosen_ids": [400, 401, 402], "rejected_ids": [500, 501, 502]},
            {"prompt_ids": [1, 302, 303], "chosen_ids": [403, 404, 405], "rejected_ids": [503, 504, 505]}]  # fmt: skip
    a = norm.compute_loss(norm.model, norm.data_collator(same))
    b = plain.compute_loss(plain.model, plain.data_collator(same))
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    assert a.item() != pytest.approx(0.6931, abs=1e-3)  # not log 2: the ratios count


def test_sft_learns_the_assistant_turns_only(tiny):
    """Every assistant turn's content and end of turn is learned; the prompt, the system
    message and the role headers are not."""
    tok = chat_tokenizer(tiny["chat"], "openchat")
    rows = [(n, sft_row(r)) for n, r in enumerate(SFT, 1)]
    ds, counts = sft_dataset(rows, tok, 2048, tiny["pairs"] / "sft.jsonl")
    ids, mask = ds[2]["input_ids"], ds[2]["assistant_masks"]
    learned = tok.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert learned.replace(" ", "") == "Hello!Askaway.<|end_of_turn|>ItisVaska.<|end_of_turn|>"
    assert counts["rows"] == 8 and counts["dropped_by_max_length"] == 0
    # cut before its answer: nothing left to learn, the row is dropped and counted
    long = (9, [U("Say it. " * 40), A("Done.")])
    ds, counts = sft_dataset([*rows, long], tok, 40, tiny["pairs"] / "sft.jsonl")
    assert counts["dropped_by_max_length"] == 1 and counts["rows"] == 8
    assert max(len(x) for x in ds["input_ids"]) <= 40


# --------------------------------------------------------------------------- end to end

RUN = ["--template", "openchat", "--dtype", "float32", "--no-gradient-checkpointing",
       "--batch-size", "4", "--micro-batch-size", "2", "--warmup-ratio", "0",
       "--logging-steps", "1"]  # fmt: skip


def test_sft_trains_reuses_and_retrains_with_other_settings(tiny, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "sft"
    argv = ["sft", "--model", tiny["chat"], "--data", str(tiny["pairs"]), "--out", str(out),
            *RUN, "--max-steps", "4", "--lr", "1e-2", "--save-steps", "100"]  # fmt: skip
    assert main(argv) == 0
    stats = _stats(capsys)
    assert (stats["steps"], stats["rows"], stats["effective_batch"]) == (4, 8, 4)
    start, first = _weights(tiny["chat"]), _weights(out)
    assert _differ(start, first)
    assert AutoTokenizer.from_pretrained(out).chat_template == TEMPLATES["openchat"].jinja
    assert not (tmp_path / "sft.ckpt").exists() and (out / "train_log.jsonl").exists()
    card = ModelCard.load(out / "README.md")  # its model card, the start model its base
    assert card.data.base_model == tiny["chat"] and "sft" in card.data.tags
    # the answers became likelier (the loss is on them)
    tok = chat_tokenizer(tiny["chat"], "openchat")
    before, after = (AutoModelForCausalLM.from_pretrained(f) for f in (tiny["chat"], out))
    gain = [_logp(after, tok, r["messages"][:-1], r["messages"][-1:])
            - _logp(before, tok, r["messages"][:-1], r["messages"][-1:]) for r in SFT]  # fmt: skip
    assert min(gain) > 0
    # the same run: reused as it is; another learning rate: refused, then retrained (a LoRA)
    manifest = (out / "manifest.json").read_text()
    assert main(argv) == 0 and (out / "manifest.json").read_text() == manifest
    other = [*argv[:-4], "--lr", "2e-2", "--save-steps", "100", "--lora-r", "4"]
    err = cli_error(capsys, other)
    assert err.endswith("holds a sft run with other inputs or settings (lora, lr); use "
                        "--overwrite or another folder")  # fmt: skip
    assert main([*other, "--overwrite"]) == 0
    key = json.loads((out / "manifest.json").read_text())["key"]["config"]
    assert key["lr"] == 2e-2 and key["lora"]["r"] == 4
    assert not (out / "adapter_config.json").exists()  # merged into ordinary weights
    lora = _weights(out)
    assert _differ(start, lora) and _differ(first, lora)


def test_an_interrupted_sft_resumes_from_its_last_checkpoint(tiny, tmp_path, monkeypatch):
    from transformers import TrainerCallback

    import fusechat.implicit.prefer as prefer

    class Killed(Exception):
        pass

    class KillAtStep3(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                raise Killed

    cfg = SftConfig(template="openchat", dtype="float32", gradient_checkpointing=False,
                    batch_size=2, micro_batch_size=2, max_steps=4, save_steps=2, lr=1e-3)  # fmt: skip
    callbacks = prefer._callbacks
    monkeypatch.setattr(prefer, "_callbacks", lambda ckpt: [*callbacks(ckpt), KillAtStep3()])
    out = tmp_path / "sft"
    with pytest.raises(Killed):
        prefer.sft_stage(tiny["chat"], tiny["pairs"], out, cfg)
    assert not out.exists() and (tmp_path / "sft.ckpt" / "checkpoint-2").is_dir()
    monkeypatch.setattr(prefer, "_callbacks", callbacks)
    m = prefer.sft_stage(tiny["chat"], tiny["pairs"], out, cfg)
    assert m["stats"]["resumed_from"].endswith("checkpoint-2") and m["stats"]["steps"] == 4


def test_dpo_raises_the_chosen_margin_and_reuses(tiny, tmp_path, capsys):
    tok = chat_tokenizer(tiny["chat"], "openchat")
    before = _margins(tiny["chat"], tok, DPO)
    out = tmp_path / "dpo"
    argv = ["dpo", "--model", tiny["chat"], "--data", str(tiny["pairs"] / "dpo.jsonl"),
            "--out", str(out), *RUN, "--max-steps", "6", "--lr", "5e-3", "--beta", "0.5"]  # fmt: skip
    assert main(argv) == 0
    stats = _stats(capsys)
    assert (stats["steps"], stats["pairs"]) == (6, 8) and "rewards/margins" in stats["last_log"]
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == tiny["chat"] and "dpo" in card.data.tags
    assert "beta 0.5" in (out / "README.md").read_text()
    after = _margins(out, tok, DPO)
    assert sum(after) > sum(before) + 1
    assert sum(a > b for a, b in zip(after, before, strict=True)) >= 6
    manifest = (out / "manifest.json").read_text()
    assert main(argv) == 0 and (out / "manifest.json").read_text() == manifest
    # FuseChat-3.0's Llama setting, with a LoRA (the reference: the adapter turned off)
    # (and activation checkpointing on, the default)
    norm = [*[a for a in argv if a != "--no-gradient-checkpointing"], "--loss",
            "length_normalized", "--beta", "10", "--lora-r", "4", "--lr", "2e-2", "--overwrite"]  # fmt: skip
    assert main(norm) == 0
    assert json.loads((out / "manifest.json").read_text())["key"]["config"]["loss"] == \
        "length_normalized"  # fmt: skip
    after = _margins(out, tok, DPO)
    assert sum(after) > sum(before)


def test_dpo_of_a_bf16_model_starts_level_with_its_reference_and_stays_bf16(tiny, tmp_path):
    """bf16 compute over float32 master weights; the reference loaded the same way, so the
    first step's rewards (policy against reference, before any update) are exactly 0; the
    model is saved in the checkpoint's bf16."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny["chat"], dtype=torch.bfloat16).save_pretrained(src)
    AutoTokenizer.from_pretrained(tiny["chat"]).save_pretrained(src)
    out = tmp_path / "dpo"
    run = [a if a != "float32" else "bfloat16" for a in RUN]
    argv = ["dpo", "--model", str(src), "--data", str(tiny["pairs"] / "dpo.jsonl"),
            "--out", str(out), *run, "--max-steps", "2", "--lr", "5e-3"]  # fmt: skip
    assert main(argv) == 0
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    first = next(r for r in log if "rewards/chosen" in r)
    assert first["rewards/chosen"] == 0 and first["rewards/rejected"] == 0
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


# --------------------------------------------------------------------------- bad inputs


def test_bad_inputs_are_one_line_and_write_nothing(tiny, tmp_path, capsys):
    d = tmp_path
    sft = ["sft", "--model", tiny["chat"], "--out", str(d / "o"), *RUN, "--max-steps", "1"]
    dpo = ["dpo", "--model", tiny["chat"], "--out", str(d / "o"), *RUN, "--max-steps", "1"]

    def err(cmd: list[str], name: str, rows=None, text: str = "") -> str:
        if rows is not None or text:
            (d / name).write_text(_jsonl(rows or []) + text)
        return cli_error(capsys, [*cmd, "--data", str(d / name)])

    assert err(sft, "missing.jsonl").endswith(f"--data: {d / 'missing.jsonl'}: not found")
    assert err(sft, "empty.jsonl", text="\n").endswith("empty.jsonl: empty: no rows to train on")
    assert err(sft, "a.jsonl", [SFT[0], {"conversation": []}]).endswith("a.jsonl: row 2: no "
                                                                        "'messages'")  # fmt: skip
    assert err(sft, "b.jsonl", [{"messages": [U("q")]}]).endswith("row 1: no assistant turn")
    assert "c.jsonl: row 3: invalid JSON" in err(dpo, "c.jsonl", DPO[:2], "{not json\n")
    no_rejected = {k: v for k, v in DPO[0].items() if k != "rejected"}
    assert err(dpo, "e.jsonl", [no_rejected]).endswith("e.jsonl: row 1: no 'rejected'")
    assert err(dpo, "f.jsonl", [{**DPO[0], "prompt": [U("q"), A("a")]}]).endswith(
        "row 1: 'prompt' does not end with a user turn")  # fmt: skip
    assert "row 1: 'chosen' is not a non-empty list of messages" in err(
        dpo, "g.jsonl", [{**DPO[0], "chosen": "The answer."}])  # fmt: skip
    # the model's tokenizer has no chat template and none is named
    no_template = [a for a in dpo if a not in ("--template", "openchat")]
    assert cli_error(capsys, [*no_template, "--data", str(tiny["pairs"])]).endswith(
        "chat: the tokenizer has no chat_template; name a template "
        "(--template openchat|chatml|mistral)")  # fmt: skip
    # a folder that is no pairs output; settings out of range
    (d / "notpairs").mkdir()
    assert "not a finished pairs output" in err(sft, "notpairs")
    pairs = ["--data", str(tiny["pairs"])]
    assert "--beta: Input should be greater than 0" in cli_error(
        capsys, [*dpo, *pairs, "--beta", "0"]
    )
    assert "--max-steps: must be -1" in cli_error(capsys, [*sft, *pairs, "--max-steps", "0"])
    assert not (d / "o").exists() and not (d / "o.ckpt").exists()
    # an output folder that some other step wrote
    (d / "o").mkdir()
    (d / "o" / "x.txt").write_text("x")
    assert cli_error(capsys, [*sft, *pairs]).endswith("o: exists and is not a sft output; choose "
                                                 "another folder")  # fmt: skip

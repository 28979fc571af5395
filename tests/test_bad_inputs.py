"""Bad input, as a new user gives it: every case exits 2 with one line naming what is wrong (no
traceback) and leaves no output that looks complete. HTTP cases live in test_serve_eval.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from fusechat.capture import capture
from fusechat.cli import main
from fusechat.configs import CaptureConfig


@pytest.fixture(scope="module")
def world(toy_world, tmp_path_factory) -> dict[str, Path]:
    """Small finished stage folders and damaged copies of inputs, built once."""
    d = tmp_path_factory.mktemp("bad")
    data = toy_world / "corpus" / "heldout.jsonl"
    caps = {}
    for m in ("openchat-mini", "nh2-mixtral-mini"):
        cfg = CaptureConfig(model=str(toy_world / m), template="openchat", max_length=64,
                            shard_rows=4)  # fmt: skip
        caps[m] = d / f"cap-{m}"
        capture(cfg, data, caps[m], max_rows=8)
    short = CaptureConfig(model=str(toy_world / "nh2-mixtral-mini"), template="openchat",
                          max_length=32, shard_rows=4)  # fmt: skip
    capture(short, data, d / "cap-short", max_rows=8)
    assert main(["align", "--pivot", str(caps["openchat-mini"]), "--source",
                 str(caps["nh2-mixtral-mini"]), "--out", str(d / "al")]) == 0  # fmt: skip
    (d / "latin1.jsonl").write_bytes('{"messages": "caf\xe9"}\n'.encode("latin-1"))
    (d / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    (d / "empty.jsonl").write_text("")
    (d / "dict.json").write_text('{"messages": []}')
    (d / "rows.csv").write_text("a,b\n")
    model = shutil.copytree(toy_world / "openchat-mini", d / "truncated-model")
    w = model / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    listy_cfg = shutil.copytree(toy_world / "openchat-mini", d / "list-config")
    (listy_cfg / "config.json").write_text("[1, 2]")
    listy = shutil.copytree(caps["openchat-mini"], d / "list-manifest")
    (listy / "manifest.json").write_text("[1, 2]")
    edited = shutil.copytree(caps["openchat-mini"], d / "edited")
    m = json.loads((edited / "manifest.json").read_text())
    m["stats"]["rows"] = 99
    (edited / "manifest.json").write_text(json.dumps(m))
    damaged = shutil.copytree(caps["openchat-mini"], d / "damaged")
    shard = damaged / "shard-00001.safetensors"
    b = bytearray(shard.read_bytes())
    b[-5] ^= 0xFF
    shard.write_bytes(bytes(b))
    recipe = yaml.safe_load((Path(__file__).parents[1] / "recipes" / "mini.yaml").read_text())
    for name, edit in RECIPE_EDITS.items():
        r = json.loads(json.dumps(recipe))
        edit(r)
        (d / f"recipe-{name}.yaml").write_text(yaml.safe_dump(r))
    # Mistral-v0.1's chat template: a system turn breaks "roles must alternate" (audit F14)
    strict_tpl = shutil.copytree(toy_world / "openchat-mini", d / "mistral-template")
    (strict_tpl / "chat_template.jinja").write_text(MISTRAL_V01_TEMPLATE)
    lines = (toy_world / "corpus" / "train.jsonl").read_text().splitlines()
    (d / "c20.jsonl").write_text("\n".join(lines[:20]) + "\n")  # rows 4, 17, 19: a system turn
    with_system = [x for x in lines[:20] if json.loads(x)["messages"][0]["role"] == "system"]
    (d / "system-only.jsonl").write_text("\n".join(with_system) + "\n")
    (d / "not-yaml.yaml").write_text("name: [unclosed\n")
    (d / "merge-unknown.yaml").write_text(yaml.safe_dump({
        "merge_method": "no_such_method", "base_model": str(toy_world / "openchat-mini"),
        "models": [{"model": str(toy_world / "openchat-mini")}]}))  # fmt: skip
    (d / "merge-relative.yaml").write_text(yaml.safe_dump({
        "merge_method": "linear", "dtype": "float32",
        "models": [{"model": "tests/typo", "parameters": {"weight": 1.0}},
                   {"model": str(toy_world / "openchat-mini"), "parameters": {"weight": 1.0}}]}))  # fmt: skip
    (d / "merge-zero.yaml").write_text(yaml.safe_dump({
        "merge_method": "linear", "dtype": "float32",
        "models": [{"model": str(toy_world / "openchat-mini"), "parameters": {"weight": 1.0}},
                   {"model": str(toy_world / "openchat-mini"), "parameters": {"weight": -1.0}}]}))  # fmt: skip
    return {"d": d, "toy": toy_world, "data": data, **caps}


MISTRAL_V01_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
REFUSED = [4, 17, 19]  # the rows of c20.jsonl with a system turn


def _set(path: str, value):
    def edit(r: dict) -> None:
        node = r
        *parents, last = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value

    return edit


RECIPE_EDITS = {
    "unknown-field": _set("train.lamda", 0.5),
    "lambda": _set("train.lambda", 2),
    "max-steps": _set("train.max_steps", 0),
    "align-method": _set("align.method", "magic"),
    "capture-k": _set("capture.k", 0),
    "capture-lookahead": _set("capture.lookahead", -1),
    "lora-r": _set("train.lora", {"r": 0}),
    "no-sources": _set("models.sources", []),
    "seed": _set("seed", -1),
    "seed-too-large": _set("seed", 2**32),
    "extra-unknown": _set("train.extra", {"bogus_key": 1}),
    "extra-owned": _set("train.extra", {"output_dir": "x"}),
    "model-name-escapes": _set("models.pivot.name", ".."),
    "merge-method": _set("merge.methods", [{"name": "x", "method": "no_such_method"}]),
    "varm-parameter": _set(
        "merge.methods", [{"name": "v", "method": "varm", "parameters": {"granularity": "bogus"}}]
    ),  # fmt: skip
    "merge-parameter-name": _set(
        "merge.methods", [{"name": "t", "method": "ties", "model_parameters": {"densty": 0.5}}]
    ),  # fmt: skip
}

PIVOT = "{openchat-mini}"


def capture_cmd(model: str) -> list[str]:
    return ["capture", "--model", model, "--template", "openchat", "--data", "{data}",
            "--out", "{d}/out"]  # fmt: skip


def align_cmd(pivot: str) -> list[str]:
    return ["align", "--pivot", pivot, "--source", "{nh2-mixtral-mini}", "--out", "{d}/out"]


CAPTURE = capture_cmd("{toy}/openchat-mini")
TRAIN = ["train", "--model", "{toy}/openchat-mini", "--data", PIVOT, "--lambda", "1",
         "--out", "{d}/out"]  # fmt: skip

CASES = {
    # numbers out of range, CLI (the recipe sections' rule)
    "capture --k 0": (CAPTURE + ["--k", "0"], "--k"),
    "capture --k > vocabulary": (CAPTURE + ["--k", "100000"], "larger than the vocabulary"),
    "capture --max-length 0": (CAPTURE + ["--max-length", "0"], "--max-length"),
    "capture --shard-rows 0": (CAPTURE + ["--shard-rows", "0"], "--shard-rows"),
    "capture --batch-tokens 0": (CAPTURE + ["--batch-tokens", "0"], "--batch-tokens"),
    "capture --max-rows 0": (CAPTURE + ["--max-rows", "0"], "--max-rows"),
    "capture --lookahead -1": (CAPTURE + ["--lookahead", "-1"], "--lookahead"),
    "capture --tensor-parallel-size 2 with hf": (
        CAPTURE + ["--tensor-parallel-size", "2"],
        "vllm setting",
    ),
    "capture --tensor-parallel-size 0": (
        CAPTURE + ["--tensor-parallel-size", "0"],
        "--tensor-parallel-size",
    ),
    "capture --config not a job": (["capture", "--config", "{d}/merge-zero.yaml"], "capture job"),
    "capture without --model": (["capture", "--data", "{data}"], "--model, --out required"),
    "capture --lookahead-min-prob 2": (
        CAPTURE + ["--lookahead-min-prob", "2"],
        "--lookahead-min-prob",
    ),
    "train --lr -1": (TRAIN + ["--lr", "-1"], "--lr"),
    "train --lr 0": (TRAIN + ["--lr", "0"], "--lr"),
    "train --micro-batch-size 0": (TRAIN + ["--micro-batch-size", "0"], "--micro-batch-size"),
    "train --batch-size 0": (TRAIN + ["--batch-size", "0"], "--batch-size"),
    "train --temperature 0": (TRAIN + ["--temperature", "0"], "--temperature"),
    "train --lambda 1.5": (TRAIN + ["--lambda", "1.5"], "--lambda"),
    "train --lambda -0.1": (TRAIN + ["--lambda", "-0.1"], "--lambda"),
    "train --lora-r 0": (TRAIN + ["--lora-r", "0"], "--lora-r"),
    "train --max-steps 0": (TRAIN + ["--max-steps", "0"], "--max-steps"),
    "train --epochs 0": (TRAIN + ["--epochs", "0"], "--epochs"),
    "train --warmup-ratio 1": (TRAIN + ["--warmup-ratio", "1"], "--warmup-ratio"),
    "train --max-length 0": (TRAIN + ["--max-length", "0"], "--max-length"),
    "train --weight-decay -1": (TRAIN + ["--weight-decay", "-1"], "--weight-decay"),
    "train --save-steps 0": (TRAIN + ["--save-steps", "0"], "--save-steps"),
    "train --seed -1": (TRAIN + ["--seed", "-1"], "--seed"),
    "train --extra unknown key": (TRAIN + ["--extra", '{{"bogus_key": 1}}'], "bogus_key"),
    "train --extra a key fusechat sets": (
        TRAIN + ["--extra", '{{"output_dir": "x"}}'],
        "output_dir",
    ),
    "align captures cut at other lengths": (
        ["align", "--pivot", PIVOT, "--source", "{d}/cap-short", "--out", "{d}/out"],
        "different max lengths",
    ),
    "serve --port 70000": (
        ["serve", "{toy}/openchat-mini", "--backend", "hf", "--port", "70000"],
        "--port 70000",
    ),  # fmt: skip
    **(
        {
            "merge --device cuda without CUDA": (
                ["merge", "{d}/merge-zero.yaml", "{d}/out", "--device", "cuda"],
                "CUDA is not available",
            )
        }
        if not __import__("torch").cuda.is_available()
        else {}
    ),  # fmt: skip
    "merge --shard-size 5Q": (
        ["merge", "{d}/merge-zero.yaml", "{d}/out", "--shard-size", "5Q"],
        "--shard-size",
    ),  # fmt: skip
    # unreadable or unusable data
    **{
        f"corpus: {name}": (CAPTURE[:-4] + ["--data", f"{{d}}/{file}", "--out", "{d}/out"], want)
        for name, file, want in [
            ("Latin-1 text", "latin1.jsonl", "not UTF-8"),
            ("corrupt parquet", "corrupt.parquet", "corrupt.parquet"),
            ("empty", "empty.jsonl", "no usable conversations"),
            ("missing", "nope.jsonl", "not found"),
            ("a JSON object, not a list", "dict.json", "expected a JSON list"),
            ("unsupported format", "rows.csv", "unsupported corpus format"),
        ]
    },
    # chat templates that refuse a conversation (Mistral-v0.1, Llama-2: a system turn)
    "capture --strict: a row the chat template refuses": (
        capture_cmd("{d}/mistral-template")[:4]
        + ["tokenizer", "--data", "{d}/c20.jsonl", "--strict", "--out", "{d}/out"],
        f"c20.jsonl: row {REFUSED[0]}: the chat template refused it (Conversation roles must",
    ),  # fmt: skip
    "capture: the chat template refuses every row": (
        capture_cmd("{d}/mistral-template")[:4]
        + ["tokenizer", "--data", "{d}/system-only.jsonl", "--out", "{d}/out"],
        "system-only.jsonl: the chat template of",
    ),  # fmt: skip
    # missing local paths: 'not found' at once, never a hub look-up ('tests' exists here)
    "capture --data: a missing relative corpus": (
        CAPTURE[:-4] + ["--data", "data/missing.jsonl", "--out", "{d}/out"],
        "--data: data/missing.jsonl: not found",
    ),
    "capture --model: a missing relative folder": (
        capture_cmd("tests/typo"),
        "--model: tests/typo: not found",
    ),
    "train --model: a missing relative folder": (
        TRAIN[:2] + ["tests/typo"] + TRAIN[3:],
        "--model: tests/typo: not found",
    ),
    "serve: a missing relative model folder": (
        ["serve", "tests/typo", "--backend", "hf"],
        "model: tests/typo: not found",
    ),
    "serve --max-connections 0": (
        ["serve", "{toy}/openchat-mini", "--backend", "hf", "--max-connections", "0"],
        "--max-connections 0",
    ),
    "merge: a missing relative model folder": (
        ["merge", "{d}/merge-relative.yaml", "{d}/out"],
        "tests/typo: no such model folder",
    ),
    # models
    "truncated model weights": (capture_cmd("{d}/truncated-model"), "truncated-model"),
    "missing model folder": (capture_cmd("{d}/no-model"), "no-model"),
    "config.json a JSON list": (
        capture_cmd("{d}/list-config"),
        "list-config/config.json: not a JSON object",
    ),
    "serve: config.json a JSON list": (
        ["serve", "{d}/list-config", "--backend", "hf"],
        "list-config/config.json: not a JSON object",
    ),
    # stage folders
    "align --pivot is a model folder": (align_cmd("{toy}/openchat-mini"), "not a capture output"),
    "manifest of the wrong shape": (align_cmd("{d}/list-manifest"), "manifest"),
    "hand-edited manifest": (align_cmd("{d}/edited"), "edited or damaged"),
    "damaged shard": (align_cmd("{d}/damaged"), "damaged shard"),
    "fuse --pivot is an align output": (
        ["fuse", "--pivot", "{d}/al", "--aligned", "{d}/al", "--out", "{d}/out"],
        "expected capture",
    ),
    "train on a damaged capture": (TRAIN[:4] + ["{d}/damaged"] + TRAIN[5:], "damaged shard"),
    "fusion training on a capture": (TRAIN + ["--lambda", "0.5"], "fused targets"),
    # recipes
    **{
        f"recipe: {n}": (["recipe", "check", f"{{d}}/recipe-{n}.yaml"], f"recipe-{n}.yaml")
        for n in RECIPE_EDITS
    },  # fmt: skip
    "recipe: not YAML": (["recipe", "check", "{d}/not-yaml.yaml"], "not-yaml.yaml"),
    "recipe: missing file": (["recipe", "check", "{d}/none.yaml"], "none.yaml"),
    **{
        f"run --dry-run --set {name}": (
            ["run", "recipes/mini.yaml", "--dry-run", "--set", spec],
            want,
        )  # fmt: skip
        for name, spec, want in [
            ("unknown key", "train.lamda=1", "lamda"),
            ("bad value", "train.lr=-1", "train.lr"),
            ("without =", "train.lr", "KEY=VALUE"),
            ("unknown merge method", "merge.methods[0].method=nope", "unknown merge method"),
            ("a model name that escapes", "models.sources[0].name=a/../../b", "name"),
            ("a seed out of range", "seed=-1", "seed"),
            ("an infinite learning rate", "train.lr=.inf", "train.lr"),
            (
                "a missing relative corpus",
                "data.path=data/missing.jsonl",
                "data.path: data/missing.jsonl: corpus not found",
            ),
            (
                "a missing relative model folder",
                "models.sources[0].path=tests/typo",
                "tests/typo: no such folder",
            ),
        ]
    },
    # merge configurations
    "merge: missing config": (["merge", "{d}/none.yaml", "{d}/out"], "none.yaml"),
    "merge: unknown method": (
        ["merge", "{d}/merge-unknown.yaml", "{d}/out"],
        "no_such_method",
    ),  # fmt: skip
    "merge: weights that sum to zero": (
        ["merge", "{d}/merge-zero.yaml", "{d}/out"],
        "sum to zero",
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_leaves_nothing_complete(case, world, capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).parents[1])
    argv, expect = CASES[case]
    fields = {k: str(v) for k, v in world.items()}
    argv = [a.format(**fields) if "{" in a else a for a in argv]
    out = world["d"] / "out"
    shutil.rmtree(out, ignore_errors=True)
    capsys.readouterr()
    assert main(argv) == 2, case
    # progress bars drawn before the failure are not messages
    raw = capsys.readouterr().err
    err = "\n".join(x for x in raw.strip().splitlines() if "%|" not in x)
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("fusechat: error: ") and expect in err, repr(raw)
    assert not (out / "manifest.json").exists() and not (out / "merge_report.json").exists()
    assert not (out / "config.json").exists()


def test_enough_cases():
    assert len(CASES) >= 40


def test_rows_the_chat_template_refuses_are_skipped_and_named(world, caplog):
    """Mistral-v0.1's template raises on a system turn: those rows are skipped and named by
    their row in the corpus, as malformed rows are, and the other rows are captured."""
    from fusechat.conversations import load_conversations
    from fusechat.shards import StageReader

    cfg = CaptureConfig(model=str(world["d"] / "mistral-template"), template="tokenizer",
                        max_length=64, shard_rows=8)  # fmt: skip
    out = world["d"] / "cap-refused"
    stats = capture(cfg, world["d"] / "c20.jsonl", out)["stats"]
    assert (stats["rows"], stats["skipped_rows"]) == (20 - len(REFUSED), len(REFUSED))
    warning = next(m for m in (r.getMessage() for r in caplog.records) if "chat template" in m)
    assert warning.startswith(f"{world['d'] / 'c20.jsonl'}: skipped 3 rows the chat template")
    assert "refused: rows 4, 17, 19 (row 4: Conversation roles must alternate" in warning
    kept = [int(r["row.index"]) for _, rows in StageReader(out, "capture").shards() for r in rows]
    convs, _ = load_conversations(world["d"] / "c20.jsonl")
    assert kept == [i for i in range(20) if i + 1 not in REFUSED]  # row n is conversation n - 1
    assert all(convs[i][0]["role"] == "user" for i in kept)


@pytest.mark.parametrize(
    "path,local",
    [
        ("data/missing.jsonl", True),  # a corpus file's suffix
        ("FuseAI/FuseChat-Mixture.parquet", True),
        ("tests/typo", True),  # 'tests' exists here
        ("./typo", True),
        ("~/typo", True),
        ("/abs/typo", True),
        ("a/b/c", True),  # more parts than owner/name
        ("FuseAI/FuseChat-Mixture", False),
        ("openchat/openchat_3.5", False),
        ("gpt2", False),
    ],
)
def test_which_paths_are_local(path, local, monkeypatch):
    from fusechat.io import is_hub_id, looks_local

    monkeypatch.chdir(Path(__file__).parents[1])
    assert looks_local(path) is local
    assert is_hub_id(path) is (not local and "/" in path)


def test_a_refusing_template_is_one_line_naming_the_row_in_evaluation(toy_world):
    """Held-out loss and the toy answers measure every model on the same text: a row the
    model's template refuses is one line naming it, not a skip and not a traceback."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusechat.errors import FusechatError
    from fusechat.eval.toy import generate_answers
    from fusechat.heldout import nll_and_chars

    tok = AutoTokenizer.from_pretrained(toy_world / "openchat-mini")
    tok.chat_template = MISTRAL_V01_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(toy_world / "openchat-mini")
    ok = {"messages": [{"role": "user", "content": "Compute 2 plus 3."},
                       {"role": "assistant", "content": "5"}]}  # fmt: skip
    refused = {
        "id": "q-sys",
        "messages": [{"role": "system", "content": "Be brief."}, *ok["messages"]],
    }
    with pytest.raises(
        FusechatError,
        match=r"^held-out row 1: .*openchat-mini: the chat template refused it \(Conversation roles",
    ):
        nll_and_chars(model, tok, [ok, refused], "tokenizer")
    question = {"id": "q-sys", "messages": refused["messages"][:2]}
    with pytest.raises(
        FusechatError, match=r"^question 1 \(q-sys\): .*openchat-mini: the chat template refused it"
    ):
        generate_answers(
            model,
            tok,
            [tok.eos_token_id],
            [{"id": "q0", "messages": ok["messages"][:1]}, question],
            4,
        )

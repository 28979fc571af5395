"""What no input may do to a user's data (the audit's high-severity classes): an output that
overlaps an input is refused and the input kept; a resume redoes a damaged shard; non-finite
numbers never reach a model; weights that do not match their config are refused; a YAML key
given twice is an error. Each class with the audit's cases as parameters."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from fusechat.capture import capture
from fusechat.cli import main
from fusechat.configs import CaptureConfig
from fusechat.io import file_fingerprint
from fusechat.shards import StageReader, shard_name

ROWS = 8


@pytest.fixture(scope="module")
def w(toy_world, tmp_path_factory) -> dict[str, Path]:
    """Captures of 8 rows in shards of 3 rows, aligned and fused; a 2-step target of each
    source (trained on fused rows) for the merge cases."""
    d = tmp_path_factory.mktemp("guarantees")
    data = toy_world / "corpus" / "heldout.jsonl"
    for m in ("openchat-mini", "nh2-mixtral-mini"):
        cfg = CaptureConfig(model=str(toy_world / m), template="openchat", max_length=64,
                            shard_rows=3)  # fmt: skip
        capture(cfg, data, d / f"cap-{m}", max_rows=ROWS)
    assert main(["align", "--pivot", str(d / "cap-openchat-mini"), "--source",
                 str(d / "cap-nh2-mixtral-mini"), "--out", str(d / "al")]) == 0  # fmt: skip
    assert main(["fuse", "--pivot", str(d / "cap-openchat-mini"), "--aligned", str(d / "al"),
                 "--out", str(d / "fused")]) == 0  # fmt: skip
    assert main(train_argv(toy_world, d / "fused", d / "target")) == 0
    return {"d": d, "toy": toy_world, "data": data}


def train_argv(toy: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(toy / "openchat-mini"), "--data", str(data),
            "--out", str(out), "--max-steps", "2", "--batch-size", "4", "--micro-batch-size",
            "4", "--max-length", "64", "--precision", "fp32", "--no-gradient-checkpointing",
            "--lr", "1e-3", *extra]  # fmt: skip


def one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2, argv
    # progress bars drawn (and closed) before the failure are not messages
    lines = capsys.readouterr().err.splitlines()
    err = "\n".join(x for x in lines if x.strip() and "%|" not in x)
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("fusechat: error: "), err
    return err


def merge_yaml(path: Path, *models: Path, weights=(1.0, 1.0), **extra) -> Path:
    cfg = {"merge_method": "linear", "dtype": "float32",
           "models": [{"model": str(m), "parameters": {"weight": wt}}
                      for m, wt in zip(models, weights, strict=True)], **extra}  # fmt: skip
    path.write_text(yaml.safe_dump(cfg))
    return path


# --------------------------------------------------------------------------- outputs over inputs

OVERLAP = {
    # stage: (argv with {out} the output, the input it overlaps, what the line says)
    "align --out is the pivot capture": (
        ["align", "--pivot", "{out}", "--source", "{d}/cap-nh2-mixtral-mini", "--out", "{out}"],
        "cap-openchat-mini",
        "is the input",
    ),
    "fuse --out is the pivot capture": (
        ["fuse", "--pivot", "{out}", "--aligned", "{d}/al", "--out", "{out}"],
        "cap-openchat-mini",
        "is the input",
    ),
    "fuse --out is the aligned folder": (
        ["fuse", "--pivot", "{d}/cap-openchat-mini", "--aligned", "{out}", "--out", "{out}"],
        "al",
        "is the input",
    ),
    "capture --out is the model folder": (
        [
            "capture",
            "--model",
            "{out}",
            "--template",
            "openchat",
            "--data",
            "{data}",
            "--max-rows",
            "2",
            "--out",
            "{out}",
        ],  # fmt: skip
        "model",
        "is the input",
    ),
    "capture --out inside the model folder": (
        [
            "capture",
            "--model",
            "{inp}",
            "--template",
            "openchat",
            "--data",
            "{data}",
            "--max-rows",
            "2",
            "--out",
            "{inp}/cap",
        ],  # fmt: skip
        "model",
        "lies inside",
    ),
    "train --out is the data": (
        ["train", "--model", "{toy}/openchat-mini", "--data", "{out}", "--out", "{out}"],
        "fused",
        "is the input",
    ),
    "train --out is the model": (
        ["train", "--model", "{out}", "--data", "{d}/fused", "--out", "{out}"],
        "model",
        "is the input",
    ),
    "merge out is an input": (["merge", "{d}/overlap.yaml", "{out}"], "target", "is the input"),
}


@pytest.mark.parametrize("with_overwrite", [False, True])
@pytest.mark.parametrize("case", list(OVERLAP))
def test_an_output_over_an_input_is_refused_and_the_input_kept(case, with_overwrite, w, capsys):
    argv, source, expect = OVERLAP[case]
    d = w["d"]
    inp = d / f"copy-{abs(hash(case)) % 10**6}"
    shutil.rmtree(inp, ignore_errors=True)
    shutil.copytree(w["toy"] / "openchat-mini" if source == "model" else d / source, inp)
    merge_yaml(d / "overlap.yaml", inp, d / "target")
    before = file_fingerprint(inp)
    fields = {"out": str(inp), "inp": str(inp), "d": str(d), "toy": str(w["toy"]),
              "data": str(w["data"])}  # fmt: skip
    argv = [a.format(**fields) for a in argv] + (["--overwrite"] if with_overwrite else [])
    err = one_line_error(capsys, argv)
    assert expect in err and str(inp) in err, err
    assert file_fingerprint(inp) == before  # nothing added, removed or changed


def test_overwrite_never_clears_another_stage_or_a_model(w, capsys):
    """--overwrite replaces an output of the same stage only: an align output given as a
    capture's --out, or a model folder as an align's --out, stays as it is."""
    d = w["d"]
    al = shutil.copytree(d / "al", d / "al-copy", dirs_exist_ok=True)
    model = shutil.copytree(w["toy"] / "openchat-mini", d / "model-copy", dirs_exist_ok=True)
    before = file_fingerprint(al), file_fingerprint(model)
    err = one_line_error(capsys, ["capture", "--model", str(w["toy"] / "openchat-mini"),
                                  "--template", "openchat", "--data", str(w["data"]),
                                  "--max-rows", "2", "--out", str(al), "--overwrite"])  # fmt: skip
    assert "holds a align output, not a capture output" in err
    err = one_line_error(capsys, ["align", "--pivot", str(d / "cap-openchat-mini"), "--source",
                                  str(d / "cap-nh2-mixtral-mini"), "--out", str(model),
                                  "--overwrite"])  # fmt: skip
    assert "is not a align output" in err
    err = one_line_error(capsys, train_argv(w["toy"], d / "fused", model, "--overwrite"))
    assert "is not a train output" in err
    err = one_line_error(capsys, ["merge", str(merge_yaml(d / "m.yaml", d / "target", d / "target")),
                                  str(model), "--overwrite"])  # fmt: skip
    assert "is not a merge output" in err
    assert (file_fingerprint(al), file_fingerprint(model)) == before


# --------------------------------------------------------------------------- resuming


def _partial(w, name: str, damage) -> Path:
    """A copy of the pivot capture as a kill would leave it (no manifest, the last shard
    gone), with ``damage`` done to shard 1."""
    part = shutil.copytree(w["d"] / "cap-openchat-mini", w["d"] / name, dirs_exist_ok=True)
    (part / "manifest.json").unlink()
    (part / shard_name(2)).unlink()
    damage(part / shard_name(1))
    return part


DAMAGE = {
    "emptied": lambda p: p.write_bytes(b""),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "a byte flipped": lambda p: p.write_bytes(p.read_bytes()[:-3] + b"\x00\x00\x00"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_resume_redoes_a_damaged_shard(damage, w, caplog):
    """A kept shard must match the checksum recorded when it was written; a damaged one is
    written again, and the finished folder equals an uninterrupted capture byte for byte."""
    ref = w["d"] / "cap-openchat-mini"
    part = _partial(w, f"part-{damage.replace(' ', '-')}", DAMAGE[damage])
    cfg = CaptureConfig(model=str(w["toy"] / "openchat-mini"), template="openchat",
                        max_length=64, shard_rows=3)  # fmt: skip
    capture(cfg, w["data"], part, max_rows=ROWS)
    assert "shard-00001.safetensors: damaged or unverified shard" in caplog.text
    got = StageReader(part, "capture")
    got.verify()
    for i in range(got.n_shards):
        assert (part / shard_name(i)).read_bytes() == (ref / shard_name(i)).read_bytes()
    assert not list(part.glob(".*.b2"))  # the manifest holds the checksums now


def test_a_damaged_stage_record_is_one_line_then_overwrite_restarts(w, capsys):
    part = _partial(w, "part-record", lambda p: None)
    (part / "stage.json").write_text('{"broken')
    argv = ["capture", "--model", str(w["toy"] / "openchat-mini"), "--template", "openchat",
            "--data", str(w["data"]), "--max-rows", str(ROWS), "--max-length", "64",
            "--shard-rows", "3", "--out", str(part)]  # fmt: skip
    assert "stage.json" in one_line_error(capsys, argv)
    assert main([*argv, "--overwrite"]) == 0
    StageReader(part, "capture").verify()


# --------------------------------------------------------------------------- non-finite numbers

TRAIN_INF = {"--lr inf": ["--lr", "inf"], "--temperature inf": ["--temperature", "inf"],
             "--lambda nan": ["--lambda", "nan"], "--weight-decay inf": ["--weight-decay", "inf"]}  # fmt: skip


@pytest.mark.parametrize("case", list(TRAIN_INF))
def test_non_finite_settings_are_refused(case, w, capsys):
    out = w["d"] / "t-inf"
    err = one_line_error(capsys, train_argv(w["toy"], w["d"] / "fused", out, *TRAIN_INF[case]))
    assert case.split()[0] in err and "finite" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "spec", ["train.lr=.inf", "train.temperature=.nan", "capture.lookahead_min_prob=.nan"]
)
def test_non_finite_recipe_values_are_refused(spec, capsys):
    err = one_line_error(capsys, ["run", "recipes/mini.yaml", "--dry-run", "--set", spec])
    assert spec.split("=")[0] in err


def test_training_that_diverges_saves_no_model(w, capsys):
    """A finite learning rate can still blow the weights up: the run stops with one line and
    no model folder appears."""
    out = w["d"] / "t-diverged"
    err = one_line_error(capsys, train_argv(w["toy"], w["d"] / "fused", out, "--lr", "1e30",
                                            "--max-steps", "3", "--warmup-ratio", "0"))  # fmt: skip
    assert "diverged" in err or "non-finite" in err
    assert not out.exists()


@pytest.fixture(scope="module")
def nan_model(w) -> Path:
    """The 2-step target with one tensor all NaN (a diverged checkpoint)."""
    m = shutil.copytree(w["d"] / "target", w["d"] / "nan-model", dirs_exist_ok=True)
    sd = load_file(m / "model.safetensors")
    name = sorted(sd)[3]
    sd[name] = torch.full_like(sd[name], math.nan)
    save_file(sd, m / "model.safetensors", metadata={"format": "pt"})
    return m


@pytest.mark.parametrize("weights", [(math.nan, 1.0), (1.0, math.inf)])
def test_a_non_finite_merge_weight_is_refused(weights, w, capsys):
    cfg = merge_yaml(w["d"] / "wnan.yaml", w["d"] / "target", w["toy"] / "openchat-mini",
                     weights=weights)  # fmt: skip
    out = w["d"] / "m-nan"
    err = one_line_error(capsys, ["merge", str(cfg), str(out), "--no-plot"])
    assert "weight" in err and "finite" in err
    assert not out.exists()


@pytest.mark.parametrize("density", [2.0, -0.5])
def test_a_density_outside_0_1_is_refused(density, w, capsys):
    cfg = {"merge_method": "ties", "base_model": str(w["toy"] / "openchat-mini"), "dtype": "float32",
           "models": [{"model": str(w["d"] / "target"), "parameters": {"weight": 1.0, "density": density}}]}  # fmt: skip
    (w["d"] / "ties.yaml").write_text(yaml.safe_dump(cfg))
    err = one_line_error(
        capsys, ["merge", str(w["d"] / "ties.yaml"), str(w["d"] / "m-t"), "--no-plot"]
    )
    assert "density" in err


def test_a_nan_model_is_neither_merged_nor_served(nan_model, w, capsys):
    out = w["d"] / "m-nanin"
    cfg = merge_yaml(w["d"] / "nanin.yaml", nan_model, w["toy"] / "openchat-mini")
    err = one_line_error(capsys, ["merge", str(cfg), str(out), "--no-plot"])
    assert str(nan_model) in err and "non-finite" in err
    assert not out.exists()
    from fusechat.errors import FusechatError
    from fusechat.eval.chat import load_chat_model

    with pytest.raises(FusechatError, match="non-finite"):
        load_chat_model(str(nan_model))


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("layers", [1, 3])
def test_a_config_that_does_not_match_the_weights_is_refused(layers, w, capsys):
    m = shutil.copytree(w["toy"] / "openchat-mini", w["d"] / f"layers-{layers}", dirs_exist_ok=True)
    c = json.loads((m / "config.json").read_text())
    assert c["num_hidden_layers"] == 2
    c["num_hidden_layers"] = layers
    (m / "config.json").write_text(json.dumps(c))
    out = w["d"] / f"c-layers-{layers}"
    err = one_line_error(capsys, ["capture", "--model", str(m), "--template", "openchat",
                                  "--data", str(w["data"]), "--max-rows", "2", "--out", str(out)])  # fmt: skip
    assert "do not match config.json" in err and ("missing" in err or "unexpected" in err)
    assert not (out / "manifest.json").exists()


# --------------------------------------------------------------------------- YAML


def test_a_key_given_twice_is_refused(capsys, tmp_path):
    recipe = (Path(__file__).parents[1] / "recipes" / "mini.yaml").read_text()
    (tmp_path / "dup.yaml").write_text(recipe + "train:\n  lr: 0.5\n")
    err = one_line_error(capsys, ["recipe", "check", str(tmp_path / "dup.yaml")])
    assert "duplicate key 'train'" in err and "dup.yaml: line" in err
    (tmp_path / "dup2.yaml").write_text("merge_method: linear\ndtype: float32\ndtype: float16\n")
    err = one_line_error(capsys, ["merge", str(tmp_path / "dup2.yaml"), str(tmp_path / "o")])
    assert "duplicate key 'dtype'" in err


def test_an_alias_bomb_is_refused_at_once(capsys, tmp_path):
    lines = ["b0: &b0 [" + ", ".join(['"lol"'] * 10) + "]"]
    lines += [f"b{i}: &b{i} [" + ", ".join([f"*b{i - 1}"] * 10) + "]" for i in range(1, 9)]
    recipe = (Path(__file__).parents[1] / "recipes" / "mini.yaml").read_text()
    (tmp_path / "bomb.yaml").write_text(recipe + "\n".join(lines) + "\n")
    err = one_line_error(capsys, ["recipe", "check", str(tmp_path / "bomb.yaml")])
    assert "expands to more than" in err


def test_a_damaged_checkpoint_is_passed_over_on_resume(tmp_path):
    from fusechat.train import last_complete_checkpoint

    for step in (1, 2, 3):
        c = tmp_path / f"checkpoint-{step}"
        c.mkdir()
        save_file({"w": torch.ones(64, 64)}, c / "model.safetensors")
        (c / "trainer_state.json").write_text("{}")
    w = tmp_path / "checkpoint-3" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])  # cut short
    (tmp_path / "checkpoint-2" / "trainer_state.json").unlink()  # killed while saving
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]


@pytest.fixture(scope="module")
def padded(w) -> Path:
    """The Mixtral source with its embedding and head padded 40 rows past its tokenizer (as
    Qwen pads 151,665 tokens to 152,064), the padded head rows made the most likely logits:
    without the mask they would fill every top-K."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = w["toy"] / "nh2-mixtral-mini"
    out = w["d"] / "padded-model"
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    n = len(tok)
    model.resize_token_embeddings(n + 40, mean_resizing=False)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[n:] = 5 * head[:n].abs().max(0).values  # the largest dot product with any state
    model.save_pretrained(out)
    tok.save_pretrained(out)
    assert model.config.vocab_size == n + 40
    return out


def test_padded_embedding_rows_are_never_captured(padded, w):
    from fusechat.align import align
    from fusechat.fuse import fuse_stage
    from fusechat.shards import unpack_ids

    n = len(__import__("transformers").AutoTokenizer.from_pretrained(padded))
    cfg = CaptureConfig(model=str(padded), template="openchat", max_length=64, shard_rows=3,
                        lookahead=2, lookahead_min_prob=0.0)  # fmt: skip
    cap = w["d"] / "cap-padded"
    capture(cfg, w["data"], cap, max_rows=ROWS)
    rows = [r for _, rs in StageReader(cap, "capture").shards() for r in rs]
    for key in ("pos.topk_ids", "pos.topk_next"):
        ids = np.concatenate([unpack_ids(r[key]).ravel() for r in rows])
        assert ids.max() < n and (ids >= 0).any(), key
    align(w["d"] / "cap-openchat-mini", cap, w["d"] / "al-padded")
    fuse_stage(w["d"] / "cap-openchat-mini", [w["d"] / "al-padded"], w["d"] / "fused-padded")
    pivot_n = len(
        __import__("transformers").AutoTokenizer.from_pretrained(w["toy"] / "openchat-mini")
    )
    fused = [r for _, rs in StageReader(w["d"] / "fused-padded", "fuse").shards() for r in rs]
    assert max(int(unpack_ids(r["pos.target_ids"]).max()) for r in fused) < pivot_n


def test_a_missing_tokenizer_source_folder_names_the_field(w, capsys):
    cfg = merge_yaml(w["d"] / "toksrc.yaml", w["d"] / "target", w["toy"] / "openchat-mini",
                     tokenizer_source=str(w["d"] / "no-such-tok"))  # fmt: skip
    err = one_line_error(capsys, ["merge", str(cfg), str(w["d"] / "m-tok"), "--no-plot"])
    assert "tokenizer_source" in err and "no-such-tok: no such folder" in err


def test_a_missing_local_model_folder_is_not_looked_up_on_the_hub(w, capsys):
    cfg = merge_yaml(w["d"] / "missing.yaml", w["d"] / "no-such-model", w["toy"] / "openchat-mini")
    err = one_line_error(capsys, ["merge", str(cfg), str(w["d"] / "m-missing"), "--no-plot"])
    assert err.endswith("no-such-model: no such model folder") and "Repo id" not in err


# --------------------------------------------------------------------------- a full disk

_FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then write() fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
from fusechat.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_full_disk_names_the_shard_it_could_not_write(w, tmp_path):
    """``ulimit -f`` below a shard's size: one line naming that shard (not a bare 'File too
    large'), and no half-written file left behind."""
    import subprocess
    import sys

    shard = w["d"] / "cap-openchat-mini" / shard_name(0)
    limit = shard.stat().st_size // 2  # the stage record fits; the first shard does not
    out = tmp_path / "c-full"
    argv = ["capture", "--model", str(w["toy"] / "openchat-mini"), "--template", "openchat",
            "--data", str(w["data"]), "--max-rows", str(ROWS), "--max-length", "64",
            "--shard-rows", "3", "--out", str(out)]  # fmt: skip
    r = subprocess.run([sys.executable, "-c", _FULL_DISK, str(limit), *argv],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = [x for x in r.stderr.splitlines() if x.strip() and "%|" not in x and " INFO " not in x]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"fusechat: error: {out / shard_name(0)}: File too large"), lines
    assert not list(out.glob(".*.tmp")) and not (out / shard_name(0)).exists()


def test_a_full_disk_while_merging_names_the_output(w, tmp_path):
    """safetensors' own error names no file: the line names the output folder it was writing."""
    import subprocess
    import sys

    cfg = merge_yaml(tmp_path / "lin.yaml", w["d"] / "target", w["toy"] / "openchat-mini")
    out = tmp_path / "m-full"
    r = subprocess.run([sys.executable, "-c", _FULL_DISK, str(1 << 20), "merge", str(cfg),
                        str(out), "--no-plot"], capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = [x for x in r.stderr.splitlines() if x.strip() and "%|" not in x and " INFO " not in x]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"fusechat: error: {out}: cannot write weights ("), lines
    assert not out.exists()

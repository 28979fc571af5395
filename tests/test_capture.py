"""Capture, align and fuse stages on the toy world: contents, resume, and one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import STAGE_ROWS, capture_config, stage_rows

from fusechat.align import align
from fusechat.capture import capture, lookahead_requests, segments, torchrun_command
from fusechat.cli import main
from fusechat.configs import CaptureJob, DataSpec
from fusechat.fuse import fuse_stage
from fusechat.io import read_manifest
from fusechat.scorers import plan_batches
from fusechat.shards import StageReader, save_shard, unpack_ids


def test_plan_batches_and_segments():
    batches = plan_batches([5, 50, 10, 48, 9], batch_tokens=100)
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3, 4]
    assert batches[0] == [1, 3]  # longest together, 2 * 50 <= 100
    assert all(len(b) * max([5, 50, 10, 48, 9][i] for i in b) <= 100 for b in batches)
    assert segments(10, 4, "split") == [(0, 4), (4, 8), (8, 10)]
    assert segments(10, 4, "truncate") == [(0, 4)]
    assert segments(3, 4, "split") == [(0, 3)]


def test_capture_matches_a_direct_forward_pass(stages, toy_world):
    from transformers import AutoModelForCausalLM

    from fusechat.losses import predicts_label, token_nll

    rows = stage_rows(stages / "cap-pivot", "capture")
    assert len(rows) == STAGE_ROWS and [int(r["row.index"]) for r in rows] == list(
        range(STAGE_ROWS)
    )
    model = AutoModelForCausalLM.from_pretrained(toy_world / "openchat-mini").eval()
    for r in rows[:3]:
        ids = torch.tensor(unpack_ids(r["pos.input_ids"]))[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        top = logp.topk(10, -1)
        got_ids = unpack_ids(r["pos.topk_ids"])
        lp = r["pos.topk_logprobs"].astype(np.float32)
        assert r["pos.topk_logprobs"].dtype == np.float16
        np.testing.assert_allclose(lp, top.values.numpy(), atol=2e-2, rtol=1e-3)
        agree = (got_ids == top.indices.numpy()).mean()
        assert agree > 0.97  # near-ties may swap under batching
        assert np.all(np.diff(lp, axis=1) <= 0)  # sorted by probability
        mask = torch.tensor(r["pos.labels_mask"])[None]
        nll = token_nll(model(input_ids=ids).logits, ids)[predicts_label(mask)]
        assert int(r["row.n_tokens"]) == nll.numel() > 0
        assert float(r["row.nll_sum"]) == pytest.approx(nll.sum().item(), rel=1e-4)


def test_lookahead_stores_each_alternatives_greedy_continuation(stages, toy_world):
    from transformers import AutoModelForCausalLM

    plain, la = (
        stage_rows(stages / "cap-mixtral", "capture"),
        stage_rows(stages / "cap-mixtral-la", "capture"),
    )
    model = AutoModelForCausalLM.from_pretrained(toy_world / "nh2-mixtral-mini").eval()
    checked, same = 0, 0
    for a, b in zip(plain, la, strict=True):
        assert "pos.topk_next" not in a
        for k in a:  # the distributions themselves are untouched
            np.testing.assert_array_equal(a[k], b[k])
        ids, top = unpack_ids(b["pos.input_ids"]), unpack_ids(b["pos.topk_ids"])
        nxt = unpack_ids(b["pos.topk_next"])
        learned = np.append(b["pos.labels_mask"][1:], False)
        reqs = lookahead_requests(top, b["pos.topk_logprobs"], ids.tolist(), learned, 0.02)
        # exactly the requested candidates have a continuation, of 3 tokens each
        assert set(zip(*np.nonzero(nxt[:, :, 0] >= 0), strict=True)) == set(reqs)
        assert (nxt[nxt[:, :, 0] >= 0] >= 0).all() and (nxt[nxt[:, :, 0] < 0] < 0).all()
        assert all(top[t, i] != ids[t + 1] for t, i in reqs)  # never the gold token
        for t, i in reqs[:: max(1, len(reqs) // 4)]:  # a few per row, decoded one by one
            prompt = [*ids[: t + 1], top[t, i]]
            want = []
            with torch.no_grad():
                for _ in range(3):  # plain greedy, the whole prompt each step, past any EOS
                    want.append(int(model(input_ids=torch.tensor([prompt])).logits[0, -1].argmax()))
                    prompt.append(want[-1])
            checked += 1
            same += want == nxt[t, i].tolist()
    assert checked > 40 and same / checked > 0.98, (same, checked)


@pytest.mark.parametrize("sliding_window", [None, 8])
def test_candidate_continuations_equal_plain_greedy_decoding(tmp_path, sliding_window):
    """Tree attention (no sliding window) and the per-prompt fallback (a window shorter than
    the row: Gemma 3's local layers) both give what decoding each prompt alone gives."""
    from transformers import MistralConfig, MistralForCausalLM

    from fusechat.scorers import HFScorer

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1,
                        sliding_window=sliding_window)  # fmt: skip
    MistralForCausalLM(cfg).save_pretrained(tmp_path / "m")
    scorer = HFScorer(str(tmp_path / "m"), "float32")
    window = torch.randint(0, 97, (30,), generator=torch.Generator().manual_seed(1)).tolist()
    cands = [(t, (7 * t + 3) % 97) for t in range(2, 29, 3)] + [(20, 5), (20, 6)]
    got = scorer.continue_candidates(window, cands, 3, chunk=4)  # chunks of 4: three passes
    with torch.no_grad():
        for (t, c), row in zip(cands, got, strict=True):
            prompt, want = [*window[: t + 1], c], []
            for _ in range(3):
                want.append(
                    int(scorer.model(input_ids=torch.tensor([prompt])).logits[0, -1].argmax())
                )
                prompt.append(want[-1])
            assert row.tolist() == want, (t, c)


def test_overflow_split_scores_every_token_and_truncate_counts(toy_world, tmp_path):
    data = toy_world / "corpus" / "heldout.jsonl"
    full = capture(
        capture_config(toy_world, "openchat-mini", shard_rows=8), data, tmp_path / "f", max_rows=8
    )
    split = capture(
        capture_config(toy_world, "openchat-mini", max_length=12, overflow="split", shard_rows=8),
        data,
        tmp_path / "s",
        max_rows=8,
    )
    trunc = capture(
        capture_config(toy_world, "openchat-mini", max_length=12, shard_rows=8),
        data,
        tmp_path / "t",
        max_rows=8,
    )
    assert split["stats"]["split"] == 8 and split["stats"]["truncated"] == 0
    assert trunc["stats"]["truncated"] == 8 and trunc["stats"]["positions"] == 8 * 12
    assert split["stats"]["positions"] == full["stats"]["positions"]
    f, s = stage_rows(tmp_path / "f", "capture"), stage_rows(tmp_path / "s", "capture")
    for a, b in zip(f, s, strict=True):
        assert np.array_equal(a["pos.input_ids"], b["pos.input_ids"])
        # the first window sees the same context as the full pass
        np.testing.assert_allclose(
            a["pos.topk_logprobs"][:12].astype(float),
            b["pos.topk_logprobs"][:12].astype(float),
            atol=2e-2,
        )
        assert int(a["row.n_tokens"]) == int(b["row.n_tokens"])


def test_a_max_length_beyond_the_models_context_is_warned(toy_world, tmp_path, caplog):
    """The toy pivot has 512 positions: a max length of 1024 says so with both numbers and
    the rows that reach past them; one within the context says nothing."""
    from fusechat.capture import context_warning

    long = {"messages": [{"role": "user", "content": "Say a lot."},
                         {"role": "assistant", "content": "alpha beta " * 300}]}  # fmt: skip
    held = (toy_world / "corpus" / "heldout.jsonl").read_text().splitlines()[0]
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps(long) + "\n" + held + "\n")
    capture(capture_config(toy_world, "openchat-mini", max_length=1024), data, tmp_path / "c")
    assert (f"{toy_world / 'openchat-mini'}: max_length 1024 is beyond the model's context "
            "(max_position_embeddings 512): 1 of 2 rows reach past it") in caplog.text  # fmt: skip
    caplog.clear()
    capture(capture_config(toy_world, "openchat-mini", max_length=512), data, tmp_path / "c2")
    assert "max_position_embeddings" not in caplog.text
    assert context_warning(4096, None, [5000]) is None  # a config that does not say: silence


def _finished(out: Path) -> dict[str, int]:
    """Shards written whole with their checksum beside them, name -> mtime: a resume keeps
    these. A kill between a shard and its checksum leaves one that is written again."""
    return {
        p.name: p.stat().st_mtime_ns
        for p in out.glob("shard-*.safetensors")
        if (out / f".{p.name}.b2").exists()
    }


def test_killed_capture_resumes_byte_identical(toy_world, tmp_path):
    """Kill a capture after its first shard, rerun it, compare with an uninterrupted one."""
    data = toy_world / "corpus" / "heldout.jsonl"
    opts = dict(max_length=128, shard_rows=8, batch_tokens=256)
    ref = tmp_path / "ref"
    capture(capture_config(toy_world, "nh2-mixtral-mini", **opts), data, ref, max_rows=96)
    out = tmp_path / "cap"
    cmd = [sys.executable, "-m", "fusechat.cli", "capture", "--template", "openchat"]
    cmd += ["--model", str(toy_world / "nh2-mixtral-mini"), "--data", str(data)]
    cmd += ["--out", str(out), "--max-rows", "96", "--max-length", "128"]
    cmd += ["--shard-rows", "8", "--batch-tokens", "256"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not _finished(out) and time.time() < deadline:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert not (out / "manifest.json").exists(), "capture finished before it could be killed"
    before = _finished(out)
    assert 0 < len(before) < 12
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    # it resumed: the finished shards were kept as they were, and only the rest was scored
    assert {n: (out / n).stat().st_mtime_ns for n in before} == before
    stats = json.loads((out / "manifest.json").read_text())["stats"]
    assert stats["tokens_scored"] < stats["positions"]
    names = sorted(p.name for p in ref.glob("shard-*"))
    assert names == sorted(p.name for p in out.glob("shard-*")) and len(names) == 12
    for n in names:
        assert (out / n).read_bytes() == (ref / n).read_bytes(), n


def test_torchrun_capture_is_byte_identical_also_after_a_kill(toy_world, tmp_path):
    """Two data-parallel ranks (torchrun, gloo on CPU) write the bytes one process writes;
    killed after their first shards, the rerun resumes and ends the same."""
    import os
    import signal

    data = toy_world / "corpus" / "heldout.jsonl"
    cfg = capture_config(toy_world, "nh2-mixtral-mini", shard_rows=8, batch_tokens=512, lookahead=2)
    ref = tmp_path / "ref"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs: CPU float reductions follow the thread count
    try:
        capture(cfg, data, ref, max_rows=96)
    finally:
        torch.set_num_threads(threads)
    job = CaptureJob(config=cfg, data=DataSpec(path=str(data), max_rows=96),
                     out=str(tmp_path / "dp"))  # fmt: skip
    cmd = torchrun_command(job, 2, tmp_path / "job.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out, deadline = Path(job.out), time.time() + 180
    while len(_finished(out)) < 2 and time.time() < deadline:
        time.sleep(0.01)
    # kill one rank mid-run; torchrun then stops the other and fails
    ranks = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    os.kill(int(ranks[0]), signal.SIGKILL)
    assert proc.wait() != 0
    assert not (out / "manifest.json").exists(), "capture finished before it could be killed"
    before = _finished(out)
    assert 2 <= len(before) < 12
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert {n: (out / n).stat().st_mtime_ns for n in before} == before  # kept, not redone
    got, want = json.loads((out / "manifest.json").read_text()), read_manifest(ref)
    assert got["checksums"] == want["checksums"] and len(got["checksums"]) == 12
    assert (
        got["stats"]["processes"] == 2 and got["stats"]["tokens_scored"] < got["stats"]["positions"]
    )
    for n in want["checksums"]:
        assert (out / n).read_bytes() == (ref / n).read_bytes(), n
    StageReader(out, "capture").verify()


def test_nan_is_refused_when_written_and_damage_is_caught_when_read(stages, tmp_path):
    """A NaN in a distribution is refused at write time naming the row; bytes overwritten
    inside a shard (same size) and a hand-edited manifest fail the next stage that reads them,
    for capture, align and fuse outputs alike."""
    from fusechat.errors import FusechatError

    cap = stages / "cap-pivot"
    rows = StageReader(cap, "capture").shard(1)
    rows[3]["pos.topk_logprobs"][5, 0] = np.nan
    with pytest.raises(FusechatError, match=r"shard-00001.safetensors: row 3: non-finite"):
        save_shard(tmp_path, 1, rows, "capture")
    assert not (tmp_path / "shard-00001.safetensors").exists()
    align(stages / "cap-pivot", stages / "cap-mixtral", tmp_path / "al")
    fuse_stage(stages / "cap-pivot", [tmp_path / "al"], tmp_path / "fused")
    for folder, stage in ((cap, "capture"), (tmp_path / "al", "align"),
                          (tmp_path / "fused", "fuse")):  # fmt: skip
        bad = tmp_path / f"bad-{stage}"
        shutil.copytree(folder, bad)
        shard = bad / "shard-00001.safetensors"
        data = bytearray(shard.read_bytes())
        data[-9] ^= 0xFF  # one byte of the last array, same size
        shard.write_bytes(bytes(data))
        with pytest.raises(FusechatError, match="damaged shard"):
            StageReader(bad, stage).shard(1)
        edited = tmp_path / f"edited-{stage}"
        shutil.copytree(folder, edited)
        m = json.loads((edited / "manifest.json").read_text())
        m["stats"]["rows"] = 1
        (edited / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(FusechatError, match="edited or damaged"):
            StageReader(edited, stage)
    # and the stages themselves stop on a damaged input with one line
    with pytest.raises(FusechatError, match="damaged shard"):
        align(tmp_path / "bad-capture", stages / "cap-mixtral", tmp_path / "al2")
    with pytest.raises(FusechatError, match="damaged shard"):
        fuse_stage(cap, [tmp_path / "bad-align"], tmp_path / "fused2")


def _err(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_bad_inputs_give_one_line(stages, toy_world, tmp_path, capsys):
    data = toy_world / "corpus" / "heldout.jsonl"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    base = ["capture", "--model", str(toy_world / "openchat-mini"), "--template", "openchat"]
    err = _err(capsys, [*base, "--data", str(empty), "--out", str(tmp_path / "c")])
    assert "no usable conversations" in err
    # wrong tokenizer for the shards
    err = _err(
        capsys,
        [
            "align",
            "--pivot",
            str(stages / "cap-pivot"),
            "--source",
            str(stages / "cap-mixtral"),
            "--out",
            str(tmp_path / "a"),
            "--source-tokenizer",
            str(toy_world / "nh2-solar-mini"),
        ],
    )
    assert "captured with another tokenizer" in err
    # missing shard
    broken = tmp_path / "broken"
    shutil.copytree(stages / "cap-mixtral", broken)
    (broken / "shard-00001.safetensors").unlink()
    argv = ["align", "--pivot", str(stages / "cap-pivot"), "--source", str(broken)]
    err = _err(capsys, [*argv, "--out", str(tmp_path / "a2")])
    assert "shard-00001.safetensors: shard missing" in err
    # captures of different corpora
    other = tmp_path / "other"
    capture(capture_config(toy_world, "nh2-mixtral-mini"), data, other, max_rows=STAGE_ROWS - 1)
    argv = ["align", "--pivot", str(stages / "cap-pivot"), "--source", str(other)]
    assert "different corpora" in _err(capsys, [*argv, "--out", str(tmp_path / "a3")])
    # an unfinished stage is not taken for a finished one
    (broken / "manifest.json").unlink()
    argv = ["align", "--pivot", str(stages / "cap-pivot"), "--source", str(broken)]
    assert "incomplete" in _err(capsys, [*argv, "--out", str(tmp_path / "a4")])
    # rerunning into a folder made with other settings
    argv = ["--data", str(data), "--out", str(stages / "cap-pivot"), "--max-rows", str(STAGE_ROWS)]
    err = _err(capsys, [*base, *argv, "--k", "5", "--max-length", "128", "--shard-rows", "16"])
    assert "other settings (k)" in err


def test_dry_run_bytes_per_position_match_the_shards(stages):
    """The estimate's bytes per position (fusechat.estimate) against the written shards: within
    the per-row arrays and headers (5%)."""
    from fusechat.estimate import stage_bytes_per_position

    positions = StageReader(stages / "cap-pivot", "capture").manifest["stats"]["positions"]
    per = stage_bytes_per_position(10, 2)  # K = 10, uint16 ids (the toy vocabularies)
    for stage, folder in (("capture", "cap-pivot"), ("align", "al-mixtral"), ("fuse", "fused")):
        size = sum(p.stat().st_size for p in (stages / folder).glob("shard-*.safetensors"))
        assert per[stage] <= size / positions <= 1.05 * per[stage] + 8, (stage, size / positions)
    # a source's capture with lookahead 3, per source position
    positions = StageReader(stages / "cap-mixtral-la", "capture").manifest["stats"]["positions"]
    per = stage_bytes_per_position(10, 2, 3)["capture_source"]
    size = sum(p.stat().st_size for p in (stages / "cap-mixtral-la").glob("shard-*.safetensors"))
    assert per <= size / positions <= 1.05 * per + 8, size / positions


def test_paper_recipe_dry_run_estimates_offline(capsys):
    from fusechat.cli import main as cli

    assert cli(["run", str(Path(__file__).parents[1] / "recipes" / "fusechat-7b.yaml"),
                "--dry-run"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "estimate:" in out and "per 1,000 conversations" in out and "fuse     2 x" in out

"""Every command the README shows runs in CI: here, as written (the quick ones, and the implicit
walkthrough block on a toy world cut to a few prompts), or in the test named beside it in
``ELSEWHERE`` (the same command on a smaller setting, or the function it calls), or it is
marked ``# GPU`` in the README. A new README command with none of these fails here."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from test_docs_commands import shown_commands

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent  # the venv's `fusechat`

# README command -> the test that runs it, and how
ELSEWHERE = {
    "fusechat run recipes/mini.yaml ": "test_run::test_mini_recipe_end_to_end_then_cached_then_partial",
    "fusechat run recipes/mini.yaml --set ": "test_run::test_cache_keys_change_when_and_only_when_inputs_change",
    "fusechat run recipes/mini.yaml --only ": "test_run::test_pivot_chat_template_is_handed_to_the_sources",
    "fusechat run recipes/fusechat-7b.yaml --dry-run": "test_run::test_paper_recipe_dry_run_needs_no_network",
    "fusechat merge varm.yaml ": "test_merge::test_varm_merge_loads_and_generates",
    "fusechat eval mt-bench ": "test_serve_eval::test_mt_bench_all_80_questions_then_resume",
    "fusechat run recipes/implicit-mini.yaml ": "test_run_implicit::test_implicit_recipe_end_to_end_then_cached",
    "fusechat run recipes/fusechat3-8b.yaml --dry-run": "test_run_implicit::test_paper_implicit_recipe_dry_run_needs_no_network",
    # a study of 15 pairs takes over an hour on 2 cores (docs/studies.md): CI runs the same
    # command on two seeds of a cut-down recipe, and the world overrides by hand
    "fusechat study recipes/mini.yaml --seeds ": "test_readme::test_a_study_runs_from_the_command_line",
    "fusechat study recipes/mini.yaml --worlds ": "test_study::test_world_overrides_move_every_toy_path",
    "fusechat study recipes/mini.yaml --world-seeds ": "test_study::test_world_overrides_move_every_toy_path",
    "fusechat study recipes/implicit-mini.yaml --worlds ": "test_study::test_implicit_models_are_paired_with_clm_the_best_target_and_each_merge",
}  # fmt: skip
RUN_HERE = {
    "fusechat recipe check recipes/mini.yaml": "test_the_quick_commands_run_as_written",
    "fusechat run recipes/mini.yaml --dry-run": "test_the_quick_commands_run_as_written",
    "fusechat serve ": "test_serve_as_written_answers_the_openai_api",
}


def _walkthrough() -> str:
    """The README's stage-by-stage block of implicit fusion."""
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    return next(b for b in blocks if "fusechat sample" in b)


def _covered(command: str) -> str | None:
    if command in shown_commands("```bash\n" + _walkthrough() + "```"):
        return "test_readme::test_the_implicit_walkthrough_runs_as_written"
    line = command.split("#")[0].strip() + " "
    hits = [(len(p), t) for p, t in (*RUN_HERE.items(), *ELSEWHERE.items()) if line.startswith(p)]
    if not hits:
        return None
    test = max(hits)[1]  # the longest prefix: the most specific entry
    return test if "::" in test else f"test_readme::{test}"


def test_every_readme_command_runs_in_ci():
    commands = shown_commands(README)
    assert len(commands) >= 15
    missing = [c for c in commands if _covered(c) is None]
    assert missing == [], "README commands no test runs"
    for c in commands:
        module, name = _covered(c).split("::")
        assert hasattr(importlib.import_module(module), name), (c, module, name)
    # the launcher lines are the GPU ones; their CPU forms run in test_capture and test_train
    joined = README.replace("\\\n", " ")
    for line in ("torchrun --standalone --nproc_per_node 8", "accelerate launch --config_file"):
        assert re.search(re.escape(line) + r"[^\n]*# GPU", joined), line


def _run(cmd: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> str:
    p = subprocess.run(["bash", "-euo", "pipefail", "-c", cmd], cwd=cwd, capture_output=True,
                       text=True, timeout=timeout,
                       env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", **(env or {})})  # fmt: skip
    assert p.returncode == 0, f"{cmd}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    return p.stdout


def test_the_quick_commands_run_as_written(toy_world, tmp_path):
    """``recipe check`` and the mini recipe's dry run, from the repository, as shown."""
    for c in shown_commands(README):
        if _covered(c) == "test_readme::test_the_quick_commands_run_as_written":
            out = _run(c.split("#")[0], ROOT)
            assert "capture" in out and "openchat-mini" in out, c


def test_the_implicit_walkthrough_runs_as_written(toy_world, tmp_path):
    """The stage-by-stage block, unchanged, on the toy world with its prompt set cut to 6."""
    toy = tmp_path / "cache" / "toy"
    (toy / "corpus").mkdir(parents=True)
    for m in ("nh2-mixtral-mini", "nh2-solar-mini", "openchat-mini"):
        (toy / m).symlink_to(toy_world / m)
    rows = (toy_world / "corpus" / "prompts.jsonl").read_text().splitlines()[:6]
    (toy / "corpus" / "prompts.jsonl").write_text("\n".join(rows) + "\n")
    _run(_walkthrough(), tmp_path, {"FUSECHAT_CACHE": str(tmp_path / "cache")})
    pairs = json.loads((tmp_path / "pairs" / "manifest.json").read_text())
    assert pairs["stats"]["sft_rows"] + pairs["stats"]["pairs"] > 0
    for out in ("t-sft", "t-dpo"):
        assert (tmp_path / out / "model.safetensors").exists(), out


def test_serve_as_written_answers_the_openai_api(toy_world, tmp_path):
    """``fusechat serve MODEL --name varm --port P``: the model list and a chat completion."""
    from fusechat.io import free_port

    c = next(c for c in shown_commands(README) if c.startswith("fusechat serve "))
    port = free_port()
    cmd = c.split("#")[0].replace("runs/merge-varm", str(toy_world / "openchat-mini"))
    cmd = cmd.replace("--port 8000", f"--port {port}")
    proc = subprocess.Popen(cmd.split(), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"})  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/v1"
        for _ in range(240):
            try:
                models = json.load(urllib.request.urlopen(f"{url}/models", timeout=2))
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.5)
        assert [m["id"] for m in models["data"]] == ["varm"]
        body = json.dumps({"model": "varm", "max_tokens": 4,
                           "messages": [{"role": "user", "content": "Hello"}]}).encode()  # fmt: skip
        req = urllib.request.Request(f"{url}/chat/completions", body,
                                     {"Content-Type": "application/json"})  # fmt: skip
        reply = json.load(urllib.request.urlopen(req, timeout=60))
        assert reply["choices"][0]["message"]["role"] == "assistant"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_a_study_runs_from_the_command_line(toy_world, tmp_path):
    """``fusechat study RECIPE --seeds ...`` end to end on two seeds of the mini recipe cut to
    160 rows and 6 steps: the table, study.json with both pairs, the card."""
    import yaml
    from conftest import edit_recipe

    raw = yaml.safe_load((ROOT / "recipes" / "mini.yaml").read_text())
    raw["run_dir"] = str(tmp_path / "runs")
    raw["data"]["max_rows"] = 160
    raw["train"].update(max_steps=6, batch_size=16, micro_batch_size=16, save_steps=3)
    raw["eval"]["max_questions"] = 24
    raw["merge"]["methods"] = [m for m in raw["merge"]["methods"] if m["method"] == "varm"]
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(edit_recipe(raw, {})))
    out = _run(f"fusechat study {path} --seeds 0 1", tmp_path, timeout=900)
    assert "2 (world, seed) pairs: 0, 1" in out
    folder = next((tmp_path / "runs" / "mini" / "study").glob("study-*"))
    study = json.loads((folder / "study.json").read_text())
    assert study["pairs"] == ["0", "1"] and set(study["runs"]) == {"0", "1"}
    assert {"table.txt", "README.md", "study.json"} <= {p.name for p in folder.iterdir()}

"""bench/gpu.py (the device check of issue 27) at its tiny size on CPU: every section runs on
the code a device run uses, so the prepared script cannot rot between device sessions."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "gpu.py"


def _bench_module(name: str):
    """A script of bench/ imported as a module (registered: a dataclass reads its module)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH.with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_device_check_runs_every_section_at_its_tiny_size(toy_world, tmp_path):
    cmd = [sys.executable, str(BENCH), "--size", "tiny", "--toy", str(toy_world),
           "--out", str(tmp_path / "out")]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert json.loads((tmp_path / "out" / "gpu.json").read_text()) == result
    assert (tmp_path / "out" / "mini.log").stat().st_size > 0
    parts = [result["ceilings"], *result["capture"].values(), *result["train"].values(),
             result["merge"], result["mini"]]  # fmt: skip
    assert len(parts) == 8 and [p.get("error") for p in parts] == [None] * 8
    assert result["ceilings"]["matmul_flops"] > 0 and result["ceilings"]["copy_gbps"] > 0
    for kind in ("dense", "moe"):
        cap = result["capture"][kind]
        fractions = [cap[f"budget_{b}"]["roofline_fraction"] for b in (128, 256)]
        assert all(0 < f < math.inf for f in fractions)
        assert cap["best_roofline_fraction"] == max(fractions)
    moe = result["capture"]["moe"]  # two of four experts per token
    assert moe["active_params"] < moe["params"]
    train = result["train"]
    for part, variants in (("full", ("clm", "fusion")), ("lora", ("clm", "fusion")),
                           ("wide_vocab", ("clm", "fusion", "dense"))):  # fmt: skip
        for v in variants:
            assert train[part][v]["step_s"] > 0 and train[part][v]["mfu"] > 0
        assert train[part]["layer_forwards_per_step"] == 2  # activations recomputed
    assert train["full"]["layers"] == 2 and train["wide_vocab"]["vocab"] == 4096
    assert 0 < train["lora"]["lora_params"] < train["full"]["params"]
    merge = result["merge"]
    assert merge["load_topk_ids_agree"] == 1.0 and merge["load_max_logprob_diff"] == 0.0
    assert merge["load_weights_equal"] is True
    assert merge["linear"]["seconds"] > 0 and merge["varm"]["seconds"] > 0
    mini = result["mini"]  # two training steps: every model scored, no quality asked
    assert mini["all_scored"] is True and mini["models"] == mini["models_scored"] == 9
    # the report against the bars reads every figure it names
    r = subprocess.run([sys.executable, str(BENCH), "--report", str(tmp_path / "out" / "gpu.json")],
                       capture_output=True, text=True, check=True)  # fmt: skip
    rows = [x for x in r.stdout.splitlines() if x.startswith("| ") and "---" not in x][1:]
    assert len(rows) == 6 and all(x.endswith(("| yes |", "| no |")) for x in rows)
    assert "Error" not in r.stdout
    assert "| not measured | no |" in rows[3]  # a CPU has no peak device memory to compare
    assert f"| {train['full']['fusion']['mfu']} (2 layers; None of the spec rate) |" in rows[1]


def test_the_device_wheels_are_fusechat_s_dependencies_the_image_lacks():
    """bench/gpu_prep.py's list: the installed closure of fusechat's requirements (so a
    package the code imports is not forgotten), less what the device image holds, plus the
    transformers stack at this environment's versions."""
    import importlib.metadata as md

    prep = _bench_module("gpu_prep")
    found = prep.closure()
    assert "fusechat" not in found
    for name in ("trl", "mergekit", "pydantic", "pydantic-core", "rapidfuzz", "transformers"):
        assert found[name] == md.version(name)  # direct and indirect requirements
    need = prep.device_wheels(found)
    assert {"trl", "mergekit", "pydantic-core", "transformers", "tokenizers"} <= set(need)
    assert not {"torch", "numpy", "scipy", "pyyaml"} & set(need)  # the image's own


def test_a_toy_world_that_is_not_there_stops_the_run_before_it_starts(tmp_path):
    r = subprocess.run([sys.executable, str(BENCH), "--size", "tiny", "--toy", str(tmp_path / "toy"),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and "the mini section needs the toy world's folder" in r.stderr
    assert not (tmp_path / "out").exists()
    (tmp_path / "gpu.json").write_text("{")
    r = subprocess.run([sys.executable, str(BENCH), "--report", str(tmp_path / "gpu.json")],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and "not a bench/gpu.py result" in r.stderr
    assert "Traceback" not in r.stderr


def test_the_mini_recipe_past_its_time_is_stopped_whole(toy_world, tmp_path):
    gpu = _bench_module("gpu")
    got = gpu.mini(gpu.SIZES["tiny"], toy_world, tmp_path, timeout=2)
    assert got["timed_out"] is True and got["passed"] is False and got["seconds"] < 15
    size = (tmp_path / "mini.log").stat().st_size
    time.sleep(2)  # nothing of the killed run writes on
    assert (tmp_path / "mini.log").stat().st_size == size

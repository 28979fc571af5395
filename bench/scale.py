"""Benchmark the stages over processes: ``capture`` with 1 process and under ``torchrun`` with
2 data-parallel ranks, ``align`` and ``fuse`` with 1 and 2 workers, on the same toy rows in the
same run, outputs compared byte for byte.

The rows are a fresh sample of the toy world's language (``--rows`` conversations, default
12,000, eight times the fusion corpus), captured by the toy pivot and the Mixtral source
(K=10). The data-parallel capture is timed on the Mixtral source, launcher start-up included;
on 2 cores its two ranks share the cores torch's threads used in one process, so its figure is
reported, not targeted. Its shards are compared with a one-process capture run with one thread,
as each rank runs (a CPU matmul's float reductions depend on the thread count). Needs the toy world (``fusechat toy build``). The last line is one JSON
object.

    python bench/scale.py [--rows 12000] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch


def _timed(fn) -> tuple[float, dict]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _same_bytes(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("shard-*.safetensors"))
    return bool(names) and all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=12000)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    from fusechat.align import align
    from fusechat.capture import capture, torchrun_command
    from fusechat.configs import AlignConfig, CaptureConfig, CaptureJob, DataSpec, FuseConfig
    from fusechat.fuse import fuse_stage
    from fusechat.io import cache_dir
    from fusechat.toy.corpus import make_corpus

    toy = cache_dir() / "toy"
    result: dict = {"bench": "scale", "rows": args.rows, "workers": args.workers}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        rows = make_corpus(12345, args.rows, 0)["train"]
        (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        for name in ("openchat-mini", "nh2-mixtral-mini"):
            cfg = CaptureConfig(model=str(toy / name), template="openchat", max_length=256)
            secs, m = _timed(lambda cfg=cfg, name=name: capture(cfg, d / "rows.jsonl", d / name))
            result[f"capture_{name}_tokens_per_s"] = round(m["stats"]["positions"] / secs)
        positions = m["stats"]["positions"]
        # the same Mixtral capture with 2 torchrun ranks (one thread each: the cores are shared)
        job = CaptureJob(config=cfg, data=DataSpec(path=str(d / "rows.jsonl")),
                         out=str(d / "capture-dp"))  # fmt: skip
        cmd = torchrun_command(job, args.workers, d / "job.json")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        secs, _ = _timed(lambda: subprocess.run(cmd, env=env, check=True, capture_output=True))
        result[f"capture_{args.workers}_ranks_tokens_per_s"] = round(m["stats"]["positions"] / secs)
        result["capture_speedup"] = round(
            result[f"capture_{args.workers}_ranks_tokens_per_s"]
            / result["capture_nh2-mixtral-mini_tokens_per_s"],
            2,
        )
        # float reductions depend on the thread count: the ranks ran one thread each, so the
        # byte-for-byte check is against one process with one thread
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        capture(cfg, d / "rows.jsonl", d / "capture-1-thread")
        torch.set_num_threads(threads)
        result["capture_identical"] = _same_bytes(d / "capture-1-thread", d / "capture-dp")
        piv, src = d / "openchat-mini", d / "nh2-mixtral-mini"
        for stage in ("align", "fuse"):
            secs = {}
            for w in (1, args.workers):
                out = d / f"{stage}-{w}"
                if stage == "align":
                    secs[w], _ = _timed(
                        lambda out=out, w=w: align(piv, src, out, AlignConfig(workers=w))
                    )
                else:
                    secs[w], _ = _timed(
                        lambda out=out, w=w: fuse_stage(
                            piv, [d / "align-1"], out, FuseConfig(workers=w)
                        )
                    )
            result[f"{stage}_1_worker_s"] = round(secs[1], 2)
            result[f"{stage}_{args.workers}_workers_s"] = round(secs[args.workers], 2)
            result[f"{stage}_speedup"] = round(secs[1] / secs[args.workers], 2)
            result[f"{stage}_identical"] = _same_bytes(
                d / f"{stage}-1", d / f"{stage}-{args.workers}"
            )
        result["pivot_positions"] = positions
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Benchmark ``fusechat merge``: VaRM against mergekit's ``linear`` on the same inputs, same run.

Inputs are generated locally: a Mistral-architecture base of about 100M parameters (about 400 MB
in float32, saved in 200 MB shards) and three "fine-tunes" whose tensors moved by different small
amounts. Each merge runs in its own process so its peak RSS is its own; imports are done before
the clock starts. VaRM reads one more model than linear (the base, for the deltas) and checks
the inputs: that is in its time. Its heat map PNG (optional, ``--no-plot``) is timed apart,
matplotlib's import included. The last line is JSON.

    python bench/merge.py [--workdir DIR] [--targets 3] [--hidden 768] [--layers 8]
    python bench/merge.py --base SMOLLM2 --inputs T1 T2 T3   # real fine-tunes instead, e.g. the
                                                           # targets of recipes/smollm2-fuse.yaml
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _child import run_child

_CHILD = """
import json, resource, shutil, sys, time
import mergekit.merge, peft, transformers  # imports are not merging: both pay them, untimed
from fusechat.merge.run import run
shutil.rmtree(sys.argv[2], ignore_errors=True)  # deleting the last output is not merging either
t = time.perf_counter()
report = run(sys.argv[1], sys.argv[2], plot=False)
seconds = time.perf_counter() - t
plot = None
if "weights" in report:  # the heat map, timed on its own (matplotlib import included)
    from pathlib import Path
    from fusechat.merge.plot import heatmap
    t = time.perf_counter()
    heatmap(report["weights"], Path(sys.argv[2]) / "varm_weights.png")
    plot = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "plot_seconds": plot,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_inputs(work: Path, n_targets: int, hidden: int, layers: int) -> tuple[Path, list[Path]]:
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        tie_word_embeddings=False,
    )
    model = MistralForCausalLM(cfg)
    base = work / "base"
    model.save_pretrained(base, max_shard_size="200MB")
    from fusechat.toy.real import mistral_sentencepiece  # 32k vocabulary, as the embeddings

    mistral_sentencepiece().save_pretrained(base)  # merges copy the base's tokenizer
    targets = []
    for i in range(n_targets):
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for j, p in enumerate(model.parameters()):
                p.add_(1e-3 * (1 + (i + j) % 4) * torch.randn(p.shape, generator=g))
        out = work / f"target{i}"
        model.save_pretrained(out, max_shard_size="200MB")
        targets.append(out)
    return base, targets


def timed_merge(config: dict, work: Path, name: str) -> dict:
    import yaml

    cfg_path = work / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    return run_child(_CHILD, str(cfg_path), str(work / f"out-{name}"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, help="keep inputs here (default: a temporary folder)")
    ap.add_argument("--targets", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each (best kept)")
    ap.add_argument("--base", type=Path, help="an existing base checkpoint (with --inputs)")
    ap.add_argument("--inputs", type=Path, nargs="+", help="existing fine-tunes of --base")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        if args.base:
            base, targets = args.base, list(args.inputs)
        else:
            base, targets = make_inputs(work, args.targets, args.hidden, args.layers)
        t_make = time.perf_counter() - t0
        size_mb = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 2**20
        models = [{"model": str(t)} for t in targets]
        common = {"models": models, "dtype": "float32"}
        linear = {
            "merge_method": "linear",
            **common,
            "models": [{**m, "parameters": {"weight": 1.0}} for m in models],
        }
        varm = {"merge_method": "varm", "base_model": str(base), **common}
        # untimed first runs put every input in the page cache; then alternate, keep the best
        timed_merge(linear, work, "linear")
        timed_merge(varm, work, "varm")
        runs = {"linear": [], "varm": []}
        for _ in range(args.repeat):
            runs["linear"].append(timed_merge(linear, work, "linear"))
            runs["varm"].append(timed_merge(varm, work, "varm"))
        lin = min(runs["linear"], key=lambda r: r["seconds"])
        var = min(runs["varm"], key=lambda r: r["seconds"])
    print(
        json.dumps(
            {
                "bench": "merge",
                "inputs": "given" if args.base else "generated",
                "targets": len(targets),
                "checkpoint_mb": round(size_mb),
                "make_inputs_s": round(t_make, 1),
                "linear_s": round(lin["seconds"], 2),
                "varm_s": round(var["seconds"], 2),
                "time_ratio": round(var["seconds"] / lin["seconds"], 3),
                "varm_heatmap_s": round(var["plot_seconds"], 2),
                "linear_peak_rss_mb": round(lin["peak_rss_mb"]),
                "varm_peak_rss_mb": round(var["peak_rss_mb"]),
                "rss_ratio": round(var["peak_rss_mb"] / lin["peak_rss_mb"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()

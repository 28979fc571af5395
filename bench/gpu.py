"""One device check at the paper's scale: the chip's ceilings, then capture, training and
merging at 7B shapes against them, and the mini recipe end to end, in one run (issue 27).

    python bench/gpu.py --size 7b --toy .gpu/toy --out "$OUT"   # one H100 / H200
    python bench/gpu.py --size tiny                               # any machine, about a minute

``7b`` builds literal configs (Mistral-7B as OpenChat-3.5, Mixtral-8x7B as NH2-Mixtral, and a
152,064-token vocabulary as Qwen's) with random weights made on the device: nothing is
downloaded. ``tiny`` runs the same code at toy sizes (tests/test_bench_gpu.py runs it in CI, so
it cannot rot). Sections, each timed after warm-up with the device synchronised:

- ``ceilings``: a bf16 n x n x n matmul (TFLOP/s) and a device-to-device copy (GB/s, bytes read
  plus written): the limits every figure below is read against.
- ``capture``: ``HFScorer.score`` (the capture's model work: one forward, top-K 10 and the gold
  log-probability per position; tokenising and writing shards are not in it) over packed rows
  of ``seq`` tokens at each batch-token budget: tokens/s and the fraction of the forward
  roofline, ``tokens/s x 2 x N_active / matmul FLOP/s`` (N: the parameters that multiply, the
  input embedding being a lookup; an MoE counts its routed experts' share). Dense and MoE.
- ``train``: optimizer steps (AdamW, activation checkpointing, bf16 autocast) of full
  fine-tuning over float32 master weights, as ``fusechat train`` holds them, and of a LoRA
  (rank 16 on every linear layer, base in bf16), each with the fusion loss (``fusion_losses``,
  K = 10 sparse targets) and with plain CLM (cross-entropy on the logits): tokens/s, MFU
  (full: 6N FLOPs per token; LoRA: 4N for the frozen weights' forward and input gradients
  plus 6 x its own parameters, not 6N) against the measured matmul rate (``mfu``) and the
  chip's published dense bf16 rate (``mfu_spec``), peak memory and the step's own share of it
  above the weights and optimizer state (``step_gb``; ``layer_forwards_per_step`` 2: the
  activations were recomputed, checkpointing on). Then at a 152,064-token vocabulary
  (fewer layers): CLM, the sparse fusion loss and a dense (positions x vocabulary) target,
  to show the sparse loss's memory stays flat where a dense one would not. Full fine-tuning
  needs 16 bytes per parameter; a model that does not fit is trained with fewer layers
  (``layers``) and ``needs_gb`` says what all of them would take.
- ``merge``: a base and three fine-tunes of ``merge_layers`` 7B-shaped layers written to disk;
  the base read back through ``HFScorer`` (``load_model`` with ``device_map``) scores as in
  memory; VaRM against mergekit's ``linear`` (``fusechat.merge.run``, inputs in the page cache):
  seconds and input GB/s against the page-cache read rate.
- ``mini``: ``fusechat run recipes/mini.yaml`` on the toy world (``--toy``) with bf16 training:
  every model scored, and every trained or merged model's held-out loss below the pivot's.

Each part (capture dense and MoE; training full, LoRA and wide) that fails records its error
and the rest go on; the mini recipe runs in its own process group, killed whole at the
deadline (``timed_out``). The last line is one JSON object; with ``--out``, the same object is
written to ``gpu.json`` there after each part, so a run stopped at its time limit keeps what it
measured. ``--report gpu.json`` prints it against issue 27's bars.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fusechat.io import write_atomic, write_json

log = logging.getLogger("bench.gpu")

# OpenChat-3.5 (and NH2-Solar's layers) are Mistral-7B-v0.1; NH2-Mixtral is Mixtral-8x7B.
MISTRAL_7B = dict(
    model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    max_position_embeddings=32768, rope_theta=10000.0, sliding_window=4096, rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)  # fmt: skip
MIXTRAL_8X7B = {**MISTRAL_7B, "model_type": "mixtral", "num_local_experts": 8,
                "num_experts_per_tok": 2, "rope_theta": 1e6, "sliding_window": None}  # fmt: skip
TINY = dict(
    model_type="mistral", vocab_size=512, hidden_size=64, intermediate_size=160,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
)  # fmt: skip
TINY_MOE = {**TINY, "model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2}


# published dense bf16 tensor-core rates (SXM parts), for MFU as usually quoted
SPEC_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


def spec_flops_of(name: str) -> float | None:
    return next((v for k, v in SPEC_BF16_FLOPS.items() if k in name), None)


@dataclass(frozen=True)
class Size:
    dense: dict
    moe: dict
    seq: int  # tokens per packed row (the paper's max length at 7b)
    budgets: tuple[int, ...]  # capture batch-token budgets
    micro: int  # rows per training step
    wide_vocab: int  # the Qwen-size vocabulary of the memory comparison
    wide_layers: int
    merge_layers: int
    matmul_n: int
    copy_bytes: int
    steps: int = 3  # timed steps per training variant, after one warm-up
    lora_r: int = 16
    k: int = 10
    mini: list[str] = field(default_factory=list)  # fusechat run --set overrides


SIZES = {
    "7b": Size(MISTRAL_7B, MIXTRAL_8X7B, seq=2048, budgets=(8192, 32768, 65536), micro=4,
               wide_vocab=152064, wide_layers=4, merge_layers=8, matmul_n=8192,
               copy_bytes=2 << 30, mini=["eval.max_questions=500"]),
    "tiny": Size(TINY, TINY_MOE, seq=64, budgets=(128, 256), micro=2, wide_vocab=4096,
                 wide_layers=1, merge_layers=2, matmul_n=256, copy_bytes=16 << 20, steps=2,
                 lora_r=4, mini=["data.max_rows=24", "train.max_steps=2", "train.eval_steps=0",
                                 "eval.max_questions=16", "capture.lookahead=0"]),
}  # fmt: skip


# --------------------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeat: int, warmup: int = 1) -> float:
    """Mean seconds of ``fn()`` over ``repeat`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeat


def peak_gb(device: torch.device) -> float | None:
    """Peak allocated device memory since the last reset (None on a CPU)."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 1e9, 2)


def allocated_gb(device: torch.device) -> float | None:
    return round(torch.cuda.memory_allocated(device) / 1e9, 2) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def free_gb(device: torch.device) -> float:
    if device.type != "cuda":
        import psutil

        return psutil.virtual_memory().available / 1e9
    return torch.cuda.mem_get_info(device)[0] / 1e9


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- models


def config(spec: dict, **over):
    from transformers import AutoConfig

    spec = {**spec, **over}
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def build(spec: dict, dtype: torch.dtype, device: torch.device, seed: int = 0, **over):
    """A causal LM of ``spec`` with random weights made where it runs (no host copy)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config(spec, **over), dtype=dtype)
    model.config.use_cache = False
    return model


def matmul_params(model) -> tuple[int, int]:
    """(N, N_active): the parameters that multiply (all but an untied input embedding), and
    those one token multiplies (routed experts by ``experts_per_tok / experts``)."""
    cfg = model.config
    share = getattr(cfg, "num_experts_per_tok", 1) / getattr(cfg, "num_local_experts", 1)
    emb = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is emb
    n = active = 0
    for name, p in model.named_parameters():
        if p is emb and not tied:
            continue
        n += p.numel()
        active += p.numel() * (share if ".experts." in name else 1.0)
    return n, int(active)


def layer_bytes(spec: dict, bytes_per_param: int) -> tuple[float, float]:
    """(bytes of everything but the layers, bytes per layer) of ``spec`` at
    ``bytes_per_param``, counted on the meta device."""
    from transformers import AutoModelForCausalLM

    counts = []
    for layers in (1, 2):
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(config(spec, num_hidden_layers=layers))
        counts.append(sum(p.numel() for p in m.parameters()))
    per = counts[1] - counts[0]
    return (counts[0] - per) * bytes_per_param, per * bytes_per_param


def fit_layers(spec: dict, bytes_per_param: int, device: torch.device, reserve_gb: float) -> int:
    """The most layers (up to ``spec``'s) whose weights, at ``bytes_per_param``, leave
    ``reserve_gb`` of the device's free memory for activations."""
    fixed, per = layer_bytes(spec, bytes_per_param)
    room = free_gb(device) * 1e9 - reserve_gb * 1e9 - fixed
    return max(1, min(spec["num_hidden_layers"], int(room // per)))


# --------------------------------------------------------------------------- sections


def ceilings(size: Size, device: torch.device) -> dict:
    n = size.matmul_n
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    mm = timed(lambda: a @ b, device, repeat=10, warmup=3)
    x = torch.empty(size.copy_bytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    cp = timed(lambda: y.copy_(x), device, repeat=10, warmup=3)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"matmul_n": n, "matmul_flops": float(f"{2 * n**3 / mm:.4g}"),
            "spec_flops": spec_flops_of(name),
            "copy_gbps": round(2 * size.copy_bytes / cp / 1e9, 1)}  # fmt: skip


def capture(size: Size, device: torch.device, spec: dict, peak_flops: float) -> dict:
    """The capture's forward at each budget (see the module's docstring)."""
    from fusechat.scorers import HFScorer, plan_batches

    layers = spec["num_hidden_layers"]
    if device.type == "cuda":  # an MoE that does not fit runs fewer layers; the rate is per token
        layers = fit_layers(spec, 2, device, reserve_gb=16)
    model = build(spec, torch.bfloat16, device, num_hidden_layers=layers)
    scorer = HFScorer.from_model(model)
    n, active = matmul_params(model)
    out: dict = {"layers": layers, "params": n, "active_params": active}
    g = torch.Generator().manual_seed(0)
    for budget in size.budgets:
        rows = 3 * max(1, budget // size.seq)
        segs = torch.randint(0, spec["vocab_size"], (rows, size.seq), generator=g).tolist()
        batches = plan_batches([size.seq] * rows, budget)
        scorer.score([segs[i] for i in batches[0]], [-1] * len(batches[0]), size.k)  # warm-up
        reset_peak(device)
        sync(device)
        t0 = time.perf_counter()
        for b in batches:
            scorer.score([segs[i] for i in b], [-1] * len(b), size.k)
        sync(device)
        tps = rows * size.seq / (time.perf_counter() - t0)
        out[f"budget_{budget}"] = {"tokens_per_s": round(tps),
                                   "roofline_fraction": round(tps * 2 * active / peak_flops, 3),
                                   "peak_gb": peak_gb(device)}  # fmt: skip
    out["best_roofline_fraction"] = max(
        v["roofline_fraction"] for k, v in out.items() if k.startswith("budget_")
    )
    del model, scorer
    release()
    return out


def _batch(size: Size, vocab: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(1)
    shape = (size.micro, size.seq)
    ids = torch.randint(0, vocab, shape, generator=g)
    return {"ids": ids.to(device), "mask": torch.ones(shape, dtype=torch.bool, device=device),
            "tid": torch.randint(0, vocab, (*shape, size.k), generator=g).to(device),
            "p": torch.softmax(torch.randn(*shape, size.k, generator=g), -1).to(device)}  # fmt: skip


def _loss(variant: str, logits: torch.Tensor, b: dict) -> torch.Tensor:
    """``clm``: cross-entropy as the HF models compute it; ``fusion``: fusechat's sparse loss
    (lambda 0.9); ``dense``: the same loss through a (positions x vocabulary) target."""
    from _losses import clm_loss, dense_fusion_loss

    from fusechat.losses import fusion_losses

    args = (logits, b["ids"], b["mask"])
    if variant == "clm":
        return clm_loss(*args)
    if variant == "fusion":
        return fusion_losses(*args, b["tid"], b["p"], lam=0.9)[0]
    return dense_fusion_loss(*args, b["tid"], b["p"], lam=0.9)[0]


def _steps(model, size: Size, device: torch.device, variants: tuple[str, ...],
           flops_per_token: float, peak_flops: float, spec_flops: float | None) -> dict:  # fmt: skip
    """Optimizer steps of ``model`` with each loss: step seconds, tokens/s, MFU against the
    measured matmul rate and against the chip's published dense bf16 rate, peak memory and the
    step's own share of it (``step_gb``: above the weights and optimizer state it starts with)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    b = _batch(size, model.config.vocab_size, device)
    tokens = size.micro * size.seq
    # a decoder layer's parts run twice a step when its activations are recomputed (checkpointing
    # on); the layer's own hooks stay outside the checkpoint, so one of its children is counted
    layer = next(m for m in model.modules() if type(m).__name__.endswith("DecoderLayer"))
    calls = []
    hook = next(layer.children()).register_forward_hook(lambda *_: calls.append(1))
    out = {}
    for variant in variants:

        def step(variant=variant):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logits = model(input_ids=b["ids"]).logits
            _loss(variant, logits, b).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # warm-up: the optimizer's state and the kernels' choice
        out.setdefault("layer_forwards_per_step", len(calls))
        hook.remove()
        reset_peak(device)
        held = allocated_gb(device)  # weights and optimizer state: the same for every loss
        secs = timed(step, device, repeat=size.steps, warmup=0)
        flops = flops_per_token * tokens / secs
        peak = peak_gb(device)
        out[variant] = {"step_s": round(secs, 3), "tokens_per_s": round(tokens / secs),
                        "mfu": round(flops / peak_flops, 3),
                        "mfu_spec": round(flops / spec_flops, 3) if spec_flops else None,
                        "peak_gb": peak,
                        "step_gb": None if peak is None else round(peak - held, 2)}  # fmt: skip
    return out  # the optimizer's state goes with this frame


def _full(size: Size, device: torch.device, spec: dict, variants, flops: tuple,
          **over) -> dict:  # fmt: skip
    """Full fine-tuning over float32 master weights; fewer layers where 16 bytes a parameter
    (weights, gradients, Adam's two moments) do not fit (``needs_gb``: all of them)."""
    want = {**spec, **over}
    fixed, per = layer_bytes(want, 16)
    needs = (fixed + per * want["num_hidden_layers"]) / 1e9
    layers = want["num_hidden_layers"]
    while True:
        try:
            model = build(want, torch.float32, device, num_hidden_layers=layers)
            model.activation_checkpointing_enable()
            n, _ = matmul_params(model)
            res = _steps(model, size, device, variants, 6 * n, *flops)
            break
        except torch.OutOfMemoryError:
            if layers == 1:
                raise
        model = None  # out of the except block: its traceback no longer holds the tensors
        release()
        layers = min(layers - 1, fit_layers(want, 16, device, reserve_gb=12))
        log.warning("full fine-tuning: out of memory, again with %d layers", layers)
    del model
    release()
    out = {"layers": layers, "needs_gb": round(needs, 1), "params": n,
           "tokens_per_step": size.micro * size.seq, **res}  # fmt: skip
    out["fusion_over_clm_time"] = round(res["fusion"]["step_s"] / res["clm"]["step_s"], 3)
    for v in ("fusion", "dense"):
        if v in res and res["clm"]["peak_gb"]:
            out[f"{v}_over_clm_memory"] = round(res[v]["peak_gb"] / res["clm"]["peak_gb"], 3)
            out[f"{v}_over_clm_step_memory"] = round(res[v]["step_gb"] / res["clm"]["step_gb"], 3)
    return out


def train_full(size: Size, device: torch.device, spec: dict, flops: tuple) -> dict:
    return _full(size, device, spec, ("clm", "fusion"), flops)


def train_lora(size: Size, device: torch.device, spec: dict, flops: tuple) -> dict:
    """A LoRA over the bf16 base: 4N FLOPs a token for the frozen weights (forward and input
    gradients), 6 for each of its own."""
    import peft

    base = build(spec, torch.bfloat16, device)
    n, _ = matmul_params(base)
    model = peft.get_peft_model(base, peft.LoraConfig(
        r=size.lora_r, lora_alpha=2 * size.lora_r, target_modules="all-linear",
        task_type="CAUSAL_LM"))  # fmt: skip
    model.activation_checkpointing_enable()
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out = {"r": size.lora_r, "lora_params": n_lora,
           **_steps(model, size, device, ("clm", "fusion"), 4 * n + 6 * n_lora, *flops)}  # fmt: skip
    del model, base
    release()
    return out


def train_wide(size: Size, device: torch.device, spec: dict, flops: tuple) -> dict:
    """CLM, the sparse fusion loss and a dense target at the wide vocabulary."""
    out = _full(size, device, spec, ("clm", "fusion", "dense"), flops,
                vocab_size=size.wide_vocab, num_hidden_layers=size.wide_layers)  # fmt: skip
    return {"vocab": size.wide_vocab, **out}


def _write_models(size: Size, device: torch.device, spec: dict, work: Path) -> list[Path]:
    """A base and three fine-tunes (every tensor moved by a small, different amount)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = build(spec, torch.bfloat16, device, num_hidden_layers=size.merge_layers)
    # a word-level tokenizer of the vocabulary's size: merges copy a tokenizer over
    words = models.WordLevel({f"w{i}": i for i in range(spec["vocab_size"])}, unk_token="w0")
    tok = Tokenizer(words)
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")
    paths = [work / "base"]
    model.save_pretrained(paths[0])
    tokenizer.save_pretrained(paths[0])
    for i in range(3):
        g = torch.Generator(device=device).manual_seed(i + 1)
        with torch.no_grad():
            for j, p in enumerate(model.parameters()):
                noise = torch.randn(p.shape, generator=g, device=device, dtype=p.dtype)
                p.add_(noise, alpha=1e-3 * (1 + (i + j) % 4))
        paths.append(work / f"target{i}")
        model.save_pretrained(paths[-1])
        tokenizer.save_pretrained(paths[-1])
    del model
    release()
    return paths


def merge(size: Size, device: torch.device, spec: dict, work: Path) -> dict:
    import yaml

    from fusechat.merge.run import run
    from fusechat.scorers import HFScorer

    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = _write_models(size, device, spec, work)
    out: dict = {"layers": size.merge_layers, "write_s": round(time.perf_counter() - t0, 1)}
    files = [f for p in paths for f in p.glob("*.safetensors")]
    nbytes = sum(f.stat().st_size for f in files)
    out["checkpoint_gb"] = round(nbytes / len(paths) / 1e9, 2)
    t0 = time.perf_counter()
    for f in files:  # the page-cache read rate: the limit of a merge whose inputs are cached
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass
    out["read_gbps"] = round(nbytes / (time.perf_counter() - t0) / 1e9, 2)
    # the base read back as capture reads a model (load_model, device_map on a GPU) scores
    # as the same weights built in memory
    t0 = time.perf_counter()
    disk = HFScorer(str(paths[0]), "bfloat16", device=0 if device.type == "cuda" else None)
    out["load_s"] = round(time.perf_counter() - t0, 1)
    mem = HFScorer.from_model(
        build(spec, torch.bfloat16, device, num_hidden_layers=size.merge_layers)
    )
    seg = torch.randint(0, spec["vocab_size"], (size.seq,)).tolist()
    a, b = disk.score([seg], [-1], size.k)[0], mem.score([seg], [-1], size.k)[0]
    out["load_topk_ids_agree"] = float((a[0] == b[0]).mean())
    out["load_max_logprob_diff"] = float(abs(a[1] - b[1]).max())
    # the weights themselves (a score may move by a rounding of buffers computed on another
    # device, such as rope's inverse frequencies)
    ref = mem.model.state_dict()
    out["load_weights_equal"] = all(
        torch.equal(t, ref[k]) for k, t in disk.model.state_dict().items()
    )
    del disk, mem
    release()
    models = [{"model": str(p)} for p in paths[1:]]
    configs = {
        "linear": {"merge_method": "linear", "dtype": "bfloat16",
                   "models": [{**m, "parameters": {"weight": 1.0}} for m in models]},
        "varm": {"merge_method": "varm", "base_model": str(paths[0]), "dtype": "bfloat16",
                 "models": models},
    }  # fmt: skip
    for name, cfg in configs.items():
        (work / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        t0 = time.perf_counter()
        run(work / f"{name}.yaml", work / f"out-{name}", plot=False)
        secs = time.perf_counter() - t0
        read = nbytes if name == "varm" else nbytes * 3 / 4  # linear does not read the base
        out[name] = {"seconds": round(secs, 1), "input_gbps": round(read / secs / 1e9, 2)}
        shutil.rmtree(work / f"out-{name}")
    out["varm_over_linear_time"] = round(out["varm"]["seconds"] / out["linear"]["seconds"], 3)
    for p in paths:
        shutil.rmtree(p)
    return out


def mini(size: Size, toy: Path, work: Path, timeout: float) -> dict:
    """The mini recipe on the toy world, bf16 training; its summary's sanity (every model
    scored, finite; every trained or merged model's held-out nll/char below the pivot's: a
    ``tiny`` run's two steps need not get there)."""
    env = {**os.environ, "FUSECHAT_CACHE": str(toy.resolve().parent)}
    work.mkdir(parents=True, exist_ok=True)
    sets = [f"run_dir={work / 'runs'}", "train.precision=bf16", *size.mini]
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "mini.yaml"
    cmd = [sys.executable, "-m", "fusechat.cli", "run", str(recipe)]
    cmd += [a for s in sets for a in ("--set", s)]
    t0 = time.perf_counter()
    with open(work / "mini.log", "w") as logf:  # its own session: a timeout stops all of it
        proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"seconds": round(time.perf_counter() - t0, 1), "timed_out": True,
                    "passed": False}  # fmt: skip
    secs = round(time.perf_counter() - t0, 1)
    if rc:
        tail = (work / "mini.log").read_text().strip().splitlines()[-1:]
        return {"seconds": secs, "passed": False, "error": tail[0] if tail else "no output"}
    summary = json.loads((work / "runs" / "mini" / "summary.json").read_text())
    scores, models = summary["scores"], summary["models"]
    pivot = next(n for n, m in models.items() if m["role"] == "pivot")
    trained = [n for n, m in models.items() if m["role"] not in ("pivot", "source")]
    nll = {n: scores[n]["nll/char"] for n in models if n in scores}
    scored = len(nll) == len(models) and all(map(math.isfinite, nll.values()))
    below = all(nll.get(n, math.inf) < nll[pivot] for n in trained)
    return {"seconds": secs, "models": len(models), "models_scored": len(nll),
            "pivot_nll_per_char": round(nll[pivot], 4),
            "trained_nll_per_char": {n: round(nll[n], 4) for n in trained if n in nll},
            "all_scored": scored, "trained_below_pivot": below, "passed": scored and below}  # fmt: skip


# --------------------------------------------------------------------------- report

# issue 27's bars: (figure, path in the result, bar, is the bar a floor)
BARS = [
    ("capture, best budget: fraction of the forward roofline (7B)",
     ("capture", "dense", "best_roofline_fraction"), 0.40, True),
    ("full fine-tuning, fusion loss: MFU", ("train", "full", "fusion", "mfu"), 0.35, True),
    ("152k vocabulary: fusion step time / CLM's", ("train", "wide_vocab", "fusion_over_clm_time"),
     1.10, False),
    ("152k vocabulary: fusion peak memory / CLM's",
     ("train", "wide_vocab", "fusion_over_clm_memory"), 1.05, False),
    ("VaRM time / mergekit linear's", ("merge", "varm_over_linear_time"), 1.30, False),
    ("the mini recipe passes (bf16 training)", ("mini", "passed"), True, True),
]  # fmt: skip


def report(result: dict) -> str:
    """A markdown table of ``result`` against issue 27's bars (a missing figure: its
    section's error, or absent)."""
    lines = [f"`bench/gpu.py --size {result['size']}` on {result['device']}, {result['date']} "
             f"(torch {result['torch']}, transformers {result['transformers']}):", "",
             "| figure | bar | measured | met |", "|---|---|---|---|"]  # fmt: skip
    for name, path, bar, floor in BARS:
        node = result
        for key in path:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if node == {}:  # its part's error, or not measured (a CPU has no peak device memory)
            part = result.get(path[0], {})
            err = part.get("error") or part.get(path[1], {}).get("error") or "not measured"
            lines.append(f"| {name} | {bar} | {err} | no |")
            continue
        met = node == bar if isinstance(bar, bool) else node >= bar if floor else node <= bar
        sign = "" if isinstance(bar, bool) else (">= " if floor else "<= ")
        shown = str(node)
        if path[-1] == "mfu":  # the layers it ran with, and MFU against the published rate
            part = result[path[0]][path[1]]
            shown += f" ({part['layers']} layers; {part[path[2]]['mfu_spec']} of the spec rate)"
        lines.append(f"| {name} | {sign}{bar} | {shown} | {'yes' if met else 'no'} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- run


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="7b")
    ap.add_argument(
        "--only",
        nargs="+",
        default=["ceilings", "capture", "train", "merge", "mini"],
        choices=["ceilings", "capture", "train", "merge", "mini"],
        help="sections to run (ceilings always runs: the others read it)",
    )
    ap.add_argument("--toy", type=Path, help="the toy world's folder, named toy (mini)")
    ap.add_argument("--out", type=Path, help="write gpu.json (and the mini recipe's log) here")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    ap.add_argument(
        "--deadline",
        type=float,
        default=540,
        help="seconds for the whole run; the mini recipe gets what is left",
    )
    ap.add_argument(
        "--report",
        type=Path,
        metavar="GPU_JSON",
        help="print a run's figures against issue 27's bars (markdown) and stop",
    )
    args = ap.parse_args(argv)
    if args.report:
        try:
            print(report(json.loads(args.report.read_text())))
        except (OSError, ValueError, KeyError) as e:
            ap.error(f"--report {args.report}: not a bench/gpu.py result ({type(e).__name__}: {e})")
        return {}
    if "mini" in args.only and (args.toy is None or args.toy.name != "toy"
                                or not (args.toy / "manifest.json").exists()):  # fmt: skip
        ap.error(f"--toy {args.toy}: the mini section needs the toy world's folder, named toy")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    size = SIZES[args.size]
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result: dict = {"bench": "gpu", "size": args.size, "device": (
        torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    import transformers

    result["transformers"] = transformers.__version__
    work_tmp = None if args.work else tempfile.TemporaryDirectory(prefix="bench-gpu-")
    work = args.work or Path(work_tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)

    def section(path: tuple[str, ...], fn) -> None:
        node = result
        for key in path[:-1]:
            node = node.setdefault(key, {})
        name = "/".join(path)
        t0 = time.perf_counter()
        log.info("%s ...", name)
        try:
            node[path[-1]] = fn()
        except Exception as e:  # one part's failure is a finding; the others still run
            traceback.print_exc()
            first = (str(e).strip().splitlines() or [""])[0]
            node[path[-1]] = {"error": f"{type(e).__name__}: {first}"}
        release()
        node[path[-1]]["section_s"] = round(time.perf_counter() - t0, 1)
        log.info("%s: %s", name, json.dumps(node[path[-1]]))
        if args.out:  # renamed into place whole: a run killed mid-write keeps the last one
            write_json(args.out / "gpu.json", result)

    section(("ceilings",), lambda: ceilings(size, device))
    peak = result["ceilings"].get("matmul_flops") or math.inf  # no ceiling: no fractions
    flops = (peak, result["ceilings"].get("spec_flops"))
    if "capture" in args.only:
        section(("capture", "dense"), lambda: capture(size, device, size.dense, peak))
        section(("capture", "moe"), lambda: capture(size, device, size.moe, peak))
    if "train" in args.only:
        section(("train", "full"), lambda: train_full(size, device, size.dense, flops))
        section(("train", "lora"), lambda: train_lora(size, device, size.dense, flops))
        section(("train", "wide_vocab"), lambda: train_wide(size, device, size.dense, flops))
    if "merge" in args.only:
        section(("merge",), lambda: merge(size, device, size.dense, work / "merge"))
    if "mini" in args.only:
        left = args.deadline - (time.perf_counter() - start)
        section(("mini",), lambda: mini(size, args.toy, work / "mini", timeout=max(left, 30)))
        if args.out and (work / "mini" / "mini.log").exists():
            write_atomic(args.out / "mini.log", (work / "mini" / "mini.log").read_bytes())
    result["seconds"] = round(time.perf_counter() - start, 1)
    if args.out:
        write_json(args.out / "gpu.json", result)
    if work_tmp:
        work_tmp.cleanup()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

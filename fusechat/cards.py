"""Model cards: the ``README.md`` of every trained model (``fusechat train``, ``sft``, ``dpo``),
merged model (``fusechat merge``) and study folder (``fusechat study``).

A card is Hugging Face metadata (``huggingface_hub.ModelCardData``: ``base_model``,
``library_name``, ``tags``, ``datasets`` when the corpus is a hub id, ``pipeline_tag``) and a
body saying how the output was made, with the scores known when it is written. The text comes
from pure functions of what the stage already knows (its manifest, its settings, its inputs'
manifests), never a time or a temporary folder's name: the same inputs give the same bytes.
That matters because a model folder is fingerprinted whole by the steps that read it
(``fusechat.io.model_fingerprint``, ``file_fingerprint``), README.md included; so evaluation
scores, measured after the folder is complete, are never written into it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from fusechat.errors import FusechatError

CARD = "README.md"
TAGS = ["fusechat", "knowledge-fusion"]
TRAINED = {"train": "fusechat train", "sft": "fusechat sft", "dpo": "fusechat dpo"}
HF_CACHE = re.compile(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots[/\\]")
EVAL_NOTE = (
    "Evaluation scores are not in this card: the folder is complete, and fingerprinted by the "
    "steps that read it, before anything evaluates it. `fusechat run` writes them to the run "
    "folder's eval outputs (`eval/<model>-<key>.json`) and its `summary.json`; `fusechat eval` "
    "to the output it is given."
)


# --------------------------------------------------------------------------- pieces


def hub_ref(path: str) -> str:
    """A model as the hub knows it: ``owner/name`` for a folder of the Hugging Face cache
    (``.../models--owner--name/snapshots/...``), else ``path`` as given (a hub id or a local
    folder)."""
    m = HF_CACHE.search(str(path))
    return f"{m.group(1)}/{m.group(2)}" if m else str(path)


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def front_matter(
    base_model: Sequence[str] | None,
    tags: Sequence[str],
    datasets: Sequence[str] = (),
    model: bool = True,
) -> str:
    """The YAML block between ``---`` lines (``ModelCardData``): a model gets
    ``library_name: transformers`` and ``pipeline_tag: text-generation``."""
    from huggingface_hub import ModelCardData

    bases = _unique(hub_ref(b) for b in base_model or [])
    data = ModelCardData(
        base_model=(bases[0] if len(bases) == 1 else bases) or None,
        library_name="transformers" if model else None,
        pipeline_tag="text-generation" if model else None,
        tags=_unique(tags),
        datasets=list(datasets) or None,
    )
    return f"---\n{data.to_yaml()}\n---\n"


def _num(x: object) -> str:
    """A measured number, 4 decimals (or as given, for what is not a finite float)."""
    if isinstance(x, float) and math.isfinite(x):
        return f"{x:.4f}"
    return "n/a" if x is None else str(x)


def table(rows: Sequence[tuple[str, str]], head: tuple[str, str] = ("", "")) -> str:
    """A two-column markdown table (``|`` in a cell escaped)."""
    lines = [f"| {head[0]} | {head[1]} |", "| --- | --- |"]
    lines += [f"| {a.replace('|', '/')} | {b.replace('|', '/')} |" for a, b in rows]
    return "\n".join(lines)


def _names(paths: Sequence[str]) -> str:
    return ", ".join(f"`{p}`" for p in paths) if paths else "not recorded"


# --------------------------------------------------------------------------- trained models


def _made_train(name: str, base: str, cfg: dict, lin: dict) -> str:
    """How ``fusechat train`` made the model: a fusion target, or (lambda 1) the baseline."""
    lam = float(cfg.get("lam", 1.0))
    if lam >= 1.0:
        text = (f"`{name}` is the CLM baseline: the pivot `{base}` fine-tuned by "
                "`fusechat train` on the gold assistant tokens alone (lambda = 1, plain "
                "causal-LM loss), what fusion is measured against.")  # fmt: skip
    else:
        text = (f"`{name}` is a FuseChat fusion target: the pivot `{base}` fine-tuned by "
                f"`fusechat train` toward the distributions fused from its sources "
                f"({_names(lin.get('sources', []))}) by {lin.get('method') or 'an unrecorded method'}, "
                f"with loss = {lam:g} x CLM + {1 - lam:g} x fusion (fusion loss "
                f"{cfg.get('fusion_loss')}, temperature {cfg.get('temperature')}).")  # fmt: skip
    return text


def _made_prefer(stage: str, name: str, base: str, cfg: dict, lin: dict) -> str:
    """How ``fusechat sft`` / ``dpo`` (implicit fusion, TRL) made the model."""
    src = lin.get("sources")
    origin = f" built from the responses of {_names(src)}" if src else ""
    if stage == "sft":
        return (f"`{name}` was fine-tuned from `{base}` by `fusechat sft` (implicit fusion's "
                f"supervised step, TRL's SFTTrainer) on the assistant turns of the SFT set"
                f"{origin}.")  # fmt: skip
    return (f"`{name}` was optimised from `{base}` by `fusechat dpo` (implicit fusion's "
            f"preference step, TRL's DPOTrainer, `{base}` as the reference) on preference "
            f"pairs{origin}; loss {cfg.get('loss')}, beta {cfg.get('beta')}.")  # fmt: skip


def _run_text(cfg: dict, stats: dict) -> str:
    lora = cfg.get("lora")
    how = (f"a LoRA (r {lora.get('r')}, alpha {lora.get('alpha') or 2 * lora.get('r', 0)}) "
           "merged into the weights" if lora else "full fine-tuning")  # fmt: skip
    return (f"{stats.get('steps')} optimizer steps at learning rate {cfg.get('lr')} "
            f"({cfg.get('scheduler')} schedule), effective batch {stats.get('effective_batch')}, "
            f"seed {cfg.get('seed')}, {how}.")  # fmt: skip


def training_scores(log: dict) -> list[tuple[str, str]]:
    """The scores a training knows when it saves: the last logged training loss (and its
    parts, DPO's reward figures) and the last held-out loss of the curve."""
    rows = []
    last = log.get("last") or {}
    for k in ("loss", "clm_loss", "fusion_loss", "rewards/accuracies", "rewards/margins"):
        if k in last:
            rows.append((f"{k} (training, last logged, step {last.get('step')})", _num(last[k])))
    held = log.get("heldout")
    if held:
        rows.append((f"held-out nats/char (step {held.get('step')}, {held.get('tokens')} "
                     "tokens trained on)", _num(held.get("heldout_nll_per_char"))))  # fmt: skip
    return rows


def training_card(name: str, stage: str, info: dict) -> str:
    """The card of a trained model. ``info``: ``base_model`` (the starting model), ``data``
    (what it trained on), ``config`` and ``stats`` (its manifest's), ``lineage``
    (``lineage()``) and ``log`` (``log_tail()``)."""
    if stage not in TRAINED:
        raise FusechatError(f"model card: unknown training stage {stage!r} ({', '.join(TRAINED)})")
    base, cfg, stats = str(info["base_model"]), info.get("config") or {}, info.get("stats") or {}
    lin = info.get("lineage") or {}
    if stage == "train":
        kind = "clm-baseline" if float(cfg.get("lam", 1.0)) >= 1.0 else "fusion-target"
        tags, made = [*TAGS, kind], _made_train(name, base, cfg, lin)
    else:
        tags, made = (
            [*TAGS, "implicit-fusion", stage, "trl"],
            _made_prefer(stage, name, base, cfg, lin),
        )
    tags += ["lora"] if cfg.get("lora") else []
    data = [("stage", f"`{TRAINED[stage]}`"), ("base model", f"`{base}`"),
            ("trained on", f"`{info.get('data')}`")]  # fmt: skip
    if lin.get("corpus"):
        data.append(("corpus", f"`{lin['corpus']}`"))
    data += [("lambda" if k == "lam" else k, f"`{json.dumps(cfg[k], sort_keys=True)}`")
             for k in sorted(cfg)]  # fmt: skip
    scores = training_scores(info.get("log") or {})
    parts = [front_matter([base], tags, lin.get("datasets", ())), f"# {name}\n",
             f"{made} {_run_text(cfg, stats)}\n", "## Settings\n", table(data, ("setting", "value")) + "\n"]  # fmt: skip
    if scores:
        parts += ["## Scores at the end of training\n", table(scores, ("measure", "value")) + "\n"]
    return "\n".join([*parts, "## Evaluation\n", EVAL_NOTE + "\n"])


# --------------------------------------------------------------------------- merges


def weight_summary(weights: dict[str, dict[str, float]]) -> dict[str, tuple[float, float, float]]:
    """Per model: the mean, lowest and highest of the weight it got over every tensor."""
    per: dict[str, list[float]] = {}
    for w in weights.values():
        for m, x in w.items():
            per.setdefault(m, []).append(float(x))
    return {m: (sum(xs) / len(xs), min(xs), max(xs)) for m, xs in per.items()}


def _merge_models(report: dict) -> str:
    models = report.get("models") or []
    weights = report.get("weights") or {}
    if not weights:
        return "\n".join(f"- `{m}`" for m in models) + "\n"
    s, means = weight_summary(weights), report.get("mean_weights") or {}
    v = report.get("varm") or {}
    lines = [f"VaRM gave each model, per tensor, its share of the variation from the base "
             f"(granularity {v.get('granularity')}, statistic {v.get('statistic')}, temperature "
             f"{v.get('temperature')}); over the {len(weights)} tensors:\n",
             "| model | mean weight | lowest | highest |", "| --- | --- | --- | --- |"]  # fmt: skip
    lines += [f"| `{m}` | {_num(means.get(m, a))} | {_num(lo)} | {_num(hi)} |"
              for m, (a, lo, hi) in s.items()]  # fmt: skip
    extra = f" and `{report['heatmap']}`" if report.get("heatmap") else ""
    lines.append(f"\nEvery tensor's weights are in `manifest.json` (`weights`){extra}.")
    return "\n".join(lines) + "\n"


def _weight_space(figures: dict | None) -> list[str]:
    if not figures:
        return []
    rows = [
        (f"relative delta `{m}`", _num(x)) for m, x in figures.get("relative_delta", {}).items()
    ]
    rows += [(f"delta cosine `{p}`", _num(x)) for p, x in figures.get("delta_cosine", {}).items()]
    return ["## Weight space\n", "Each input's distance from the base, "
            "||theta - theta_base|| / ||theta_base||, and the cosine between two inputs' "
            "deltas (`fusechat.weightspace`):\n", table(rows, ("figure", "value")) + "\n"]  # fmt: skip


def merge_card(name: str, report: dict, config: dict) -> str:
    """The card of a merged model, from the merge's report (``manifest.json``, its run time
    left out) and its configuration (mergekit's YAML, as read)."""
    import yaml

    config_yaml = yaml.safe_dump(json.loads(json.dumps(config, default=str)), sort_keys=False)
    method, base = report.get("merge_method"), report.get("base_model")
    models = [str(m) for m in report.get("models") or []]
    with_base = f", with `{base}` as the base" if base else ""
    parts = [front_matter([*([base] if base else []), *models],
                          [*TAGS, "merge", "mergekit", str(method)]),
             f"# {name}\n",
             f"`{name}` is a merge of {len(models)} models by `fusechat merge` (mergekit, with "
             f"fusechat's VaRM registered), method **{method}**{with_base}.\n",
             "## Merged models\n", _merge_models(report), *_weight_space(report.get("weight_space"))]  # fmt: skip
    if report.get("warnings"):
        parts += ["## Warnings\n", "\n".join(f"- {w}" for w in report["warnings"]) + "\n"]
    parts += ["## Configuration\n", f"```yaml\n{config_yaml.rstrip()}\n```\n",
              "## Evaluation\n", EVAL_NOTE + "\n"]  # fmt: skip
    return "\n".join(parts)


# --------------------------------------------------------------------------- studies


def study_card(name: str, recipe: str, result: dict, table_text: str) -> str:
    """The card of a study folder (not a model: tags, no library): what was run and its table
    (``fusechat.study.report.format_table``)."""
    models = result.get("models") or {}
    pairs = result.get("pairs") or []
    roles = [(f"`{n}`", str(m.get("role", ""))) for n, m in models.items()]
    overrides = ", ".join(f"`{o}`" for o in result.get("overrides") or []) or "none"
    text = (f"`{name}` is a `fusechat study` of the recipe `{recipe}`: {len(pairs)} (world, seed) "
            f"pairs ({', '.join(pairs)}), toy worlds {result.get('worlds') or 'as in the recipe'}, "
            f"overrides {overrides}. Every comparison is paired by (world, seed); the scores are "
            "held-out nats/char (lower is better) and the judge average.")  # fmt: skip
    files = "`study.json` (every figure and run), `table.txt`" + (
        ", `study.png`" if result.get("plot") else "")  # fmt: skip
    return "\n".join([front_matter(None, [*TAGS, "study"], model=False), f"# {name}\n",
                      text + "\n", "## Models\n", table(roles, ("model", "role")) + "\n",
                      "## Results\n", f"```text\n{table_text.rstrip()}\n```\n",
                      f"Files: {files}.\n"])  # fmt: skip


# --------------------------------------------------------------------------- reading inputs


def _manifest(folder: object) -> dict:
    """A folder's manifest; {} for anything else (not a path, no folder, no manifest)."""
    from fusechat.io import read_manifest

    ok = isinstance(folder, str | os.PathLike) and str(folder) and Path(folder).is_dir()
    m = read_manifest(folder) if ok else None
    return m if isinstance(m, dict) else {}


def _dig(m: object, *keys: str) -> object:
    """``m[k1][k2]...``, None where a level is missing or not a mapping."""
    for k in keys:
        m = m.get(k) if isinstance(m, dict) else None
    return m


def _stage(m: dict) -> object:
    return _dig(m, "key", "stage")


def lineage(data: str | os.PathLike) -> dict:
    """What a training's data came from, read from its inputs' manifests: ``sources`` (the
    source models), ``method`` (the fusion's), ``corpus`` and ``datasets`` (the corpus when it
    is a hub id). What is not recorded, or no longer there, is left out."""
    from fusechat.io import is_hub_id

    path = Path(data)
    m = _manifest(path)
    out: dict = {}
    if _stage(m) == "fuse":
        out["method"] = _dig(m, "key", "method")
        aligned = _dig(m, "stats", "aligned")
        caps = [_dig(_manifest(a), "stats", "source_capture") for a in aligned or []]
        out["sources"] = [_dig(_manifest(c), "key", "model") for c in caps]
        out["corpus"] = _dig(_manifest(_dig(m, "stats", "pivot_capture")), "stats", "data_path")
    elif _stage(m) == "capture":
        out["corpus"] = _dig(m, "stats", "data_path")
    elif _stage(pairs := _manifest(path if path.is_dir() else path.parent)) == "pairs":
        out["corpus"] = _dig(pairs, "stats", "data", "path")
        scored = _dig(_manifest(_dig(pairs, "stats", "score")), "stats", "models")
        out["sources"] = [_dig(s, "model") for s in scored or []]
    out["sources"] = [s for s in out.get("sources", []) if isinstance(s, str) and s]
    corpus = out.get("corpus")
    if isinstance(corpus, str) and is_hub_id(corpus):
        out["datasets"] = [corpus]
    return {k: v for k, v in out.items() if v}


def log_tail(path: str | os.PathLike) -> dict:
    """The last training-loss entry (``last``) and the last held-out point (``heldout``) of a
    ``train_log.jsonl``; empty when there is none."""
    p = Path(path)
    if not p.is_file():
        return {}
    out: dict = {}
    for line in p.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and "loss" in entry:
            out["last"] = entry
        if isinstance(entry, dict) and "heldout_nll_per_char" in entry:
            out["heldout"] = entry
    return out


# --------------------------------------------------------------------------- writing


def write_card(folder: str | os.PathLike, text: str) -> Path:
    """``folder/README.md``, written whole (replacing mergekit's card in a merge)."""
    from fusechat.io import write_atomic

    folder = Path(folder)
    if not folder.is_dir():
        raise FusechatError(f"{folder}: not a folder; cannot write its model card")
    write_atomic(folder / CARD, text)
    return folder / CARD


def write_training_card(folder: Path, name: str, manifest: dict, source: dict, log: Path) -> Path:
    """The card of a trained model in ``folder`` (its temporary folder, named ``name`` once in
    place): ``source`` holds ``base_model`` and ``data``; the rest comes from the manifest,
    the data's lineage and the training log."""
    key = manifest.get("key") or {}
    info = {**source, "config": key.get("config"), "stats": manifest.get("stats"),
            "lineage": lineage(source["data"]), "log": log_tail(log)}  # fmt: skip
    return write_card(folder, training_card(name, str(key.get("stage")), info))

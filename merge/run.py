"""``fusechat merge``: run a mergekit-style YAML through mergekit, with VaRM registered.

Planning and loading stay mergekit's (lazy, shard by shard). Around it fusechat adds what a
user needs before and after: inputs checked before any output is written (architectures,
tensor names and shapes, a base that is not an ancestor), PEFT adapter folders accepted as
inputs, an atomic output folder, and its report ``manifest.json`` with the weight each target got
for each tensor (plus a heat map for VaRM).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from fusechat.cards import merge_card, write_card
from fusechat.errors import FusechatError, first_line
from fusechat.io import (
    MANIFEST,
    atomic_dir,
    check_apart,
    file_fingerprint,
    fingerprint,
    looks_local,
    read_json,
    stage_of,
    write_json,
)
from fusechat.merge import varm
from fusechat.merge.checks import check_inputs, load_config, local_ref, parse_config
from fusechat.merge.plot import heatmap

log = logging.getLogger(__name__)
REPORT = MANIFEST  # the merge report is the output's completion record, as for every stage


# --------------------------------------------------------------------------- VaRM statistics


def varm_parameters(cfg) -> dict[str, Any]:
    p = {k: v for k, v in (cfg.parameters or {}).items()}
    return {
        "granularity": p.get("granularity", "matrix"),
        "statistic": p.get("statistic", "square"),
        "temperature": p.get("temperature", 0.0),
    }


def group_statistics(cfg, options, granularity: str, statistic: str) -> dict:
    """For ``layer``/``model`` granularity: per (target, group) the variation of the group,
    ``sum over its tensors of sum(stat(d))`` / its number of entries, read tensor by tensor."""
    import torch
    from mergekit.io.lazy_tensor_loader import LazyTensorLoader, ShardedTensorIndex

    base_dir = local_ref(cfg.base_model, options)[1]
    base = LazyTensorLoader(ShardedTensorIndex.from_disk(base_dir), lazy_unpickle=True)
    stats: dict[tuple[str, str], float] = {}
    for m in cfg.models:
        if m.model == cfg.base_model:
            continue
        loader = LazyTensorLoader(
            ShardedTensorIndex.from_disk(local_ref(m.model, options)[1]), lazy_unpickle=True
        )
        sums: dict[str, list[float]] = {}
        for name in base.index.tensor_paths:
            d = loader.get_tensor(name).double() - base.get_tensor(name).double()
            s = d.square() if statistic == "square" else d.abs()
            acc = sums.setdefault(varm.group_key(name, granularity), [0.0, 0])
            acc[0] += float(s.sum())
            acc[1] += d.numel()
            del d, s
        for key, (total, count) in sums.items():
            stats[(str(m.model), key)] = total / max(count, 1)
        del loader
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return stats


# --------------------------------------------------------------------------- report


def delta_figures(cfg, options, chunk: int = 1 << 26) -> dict:
    """``fusechat.weightspace``'s figures for a merge with a base, read tensor by tensor: each
    input's relative delta ``||theta_i - theta_base|| / ||theta_base||`` and the cosine between
    every two inputs' deltas. Small deltas pointing the same way are what averaging needs
    (model soups); 40% apart at cosine 0.6, a merge lands off every input. Computed on the
    merge's device (float64 sums over every weight of every input: on a GPU, not the CPU)."""
    import torch
    from mergekit.io.lazy_tensor_loader import LazyTensorLoader, ShardedTensorIndex

    from fusechat.weightspace import add_sums, delta_sums, figures

    def loader(ref):
        index = ShardedTensorIndex.from_disk(local_ref(ref, options)[1])
        return LazyTensorLoader(index, lazy_unpickle=True)

    base = loader(cfg.base_model)
    refs = [m.model for m in cfg.models or [] if m.model != cfg.base_model]
    loaders = {str(r): loader(r) for r in refs}
    total, dev = None, options.device
    for t in sorted(base.index.tensor_paths):  # one tensor of every model in memory at a time
        b = torch.atleast_1d(base.get_tensor(t, device=dev))
        xs = {n: torch.atleast_1d(ld.get_tensor(t, device=dev)) for n, ld in loaders.items()}
        # float64 copies of ``chunk`` values (whole rows) at a time: a 152k x 8192 embedding
        # is 10 GB a copy
        rows = max(1, chunk * len(b) // max(1, b.numel()))
        for bp, *xp in zip(b.split(rows), *(x.split(rows) for x in xs.values()), strict=True):
            part = delta_sums({t: bp}, {n: {t: x} for n, x in zip(xs, xp, strict=True)})
            total = part if total is None else add_sums(total, part)
    return figures(total)


def _first_nonfinite(folder: str | Path, names: list[str] | None = None) -> str | None:
    """The first tensor of a checkpoint (or of ``names``) holding a NaN or an infinity."""
    from mergekit.io.lazy_tensor_loader import LazyTensorLoader, ShardedTensorIndex

    loader = LazyTensorLoader(ShardedTensorIndex.from_disk(str(folder)), lazy_unpickle=True)
    for name in names or sorted(loader.index.tensor_paths):
        if name in loader.index.tensor_paths and not loader.get_tensor(name).isfinite().all():
            return name
    return None


def _check_finite_output(folder: Path, refs: list, options) -> None:
    """A merge that wrote a NaN or an infinity fails, naming the tensor and the input that
    holds one there (a diverged target) before anything is renamed into place."""
    bad = _first_nonfinite(folder)
    if bad is None:
        return
    for ref in refs:
        if _first_nonfinite(local_ref(ref, options)[1], [bad]):
            raise FusechatError(f"{ref}: tensor {bad} holds non-finite values; not merged")
    raise FusechatError(f"the merge made tensor {bad} non-finite (check its parameters)")


# --------------------------------------------------------------------------- entry point


def _inputs(cfg) -> list[str]:
    """Every model and adapter path the merge reads."""
    refs = [m.model for m in cfg.models or []] + ([cfg.base_model] if cfg.base_model else [])
    return [str(p.path) for r in refs for p in (r.model, r.lora) if p is not None]


def _merge_key(raw: dict, cfg, random_seed: int) -> tuple[str, str]:
    """(the merge's settings, those and the inputs' content): a target retrained at the same
    path merges anew, even when it kept its size and modification time."""
    inputs = _inputs(cfg)
    same_merge = fingerprint({"config": raw, "version": 1, "random_seed": random_seed})
    # the inputs' bytes (a hub id, no local path, is its own identity): cp -p or rsync -a can
    # keep a rewritten file's name, size and mtime
    digests = {p: file_fingerprint(p) if Path(p).exists() else None for p in inputs}
    key = fingerprint({"merge": same_merge, "inputs": digests})
    return same_merge, key


def _done(out: Path, key: str, same_merge: str, overwrite: bool) -> dict | None:
    """The report of a finished merge with this key (reused), None when the merge must run;
    an output of another merge is refused unless ``overwrite``."""
    if stage_of(out) == "merge":
        old = read_json(out / REPORT)
        if old.get("key") == key and not overwrite:
            log.info("%s: already merged with this configuration and these inputs", out)
            return old
        if old.get("merge") == same_merge:
            log.info("%s: an input changed since it was merged: merging again", out)
        elif not overwrite:
            raise FusechatError(f"{out}: exists with another merge; use --overwrite")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        # --overwrite replaces a merge's output only, never a model or a user's folder
        raise FusechatError(f"{out}: exists and is not a merge output; choose another folder")
    return None


def _varm_report(report: dict, weights: dict, params: dict, png: Path | None) -> None:
    """The VaRM weights: every tensor's, each target's mean, and the heat map's file."""
    targets = list(next(iter(weights.values())))
    report["varm"] = params
    report["mean_weights"] = {
        m: sum(w.get(m, 0.0) for w in weights.values()) / len(weights) for m in targets
    }
    report["weights"] = weights
    report["heatmap"] = png.name if png is not None and heatmap(weights, png) else None


def _mergekit_dtype_noise(record: logging.LogRecord) -> bool:
    """mergekit 0.1.5 sets ``torch_dtype`` on the merged config, which transformers 5 warns
    about: a dependency's internals, nothing a user can act on, and a second stderr line
    beside a one-line error."""
    return "`torch_dtype` is deprecated" not in record.getMessage()


def _varm_settings(cfg, options) -> tuple[dict, dict]:
    """VaRM's parameters ({} for other methods) and, for layer or model granularity, its group
    statistics, computed before the merge (the kernel sees one tensor at a time)."""
    params = varm_parameters(cfg) if cfg.merge_method == "varm" else {}
    stats = {}
    if params and params["granularity"] in ("layer", "model"):
        stats = group_statistics(cfg, options, params["granularity"], params["statistic"])
    return params, stats


def _tokenizer_source(cfg, config) -> str | None:
    """The tokenizer_source's folder, when the config names a model's; a local one must exist."""
    tok = cfg.tokenizer_source
    path = str(tok.model.path) if hasattr(tok, "model") else None
    if path and looks_local(path) and not Path(path).is_dir():
        raise FusechatError(f"{config}: tokenizer_source: {path}: no such folder")
    return path


def _parameters(raw: dict) -> dict:
    """The config's global parameters as JSON (mergekit may hold non-JSON values)."""
    return json.loads(json.dumps(raw.get("parameters") or {}, default=str))


def shard_bytes(shard_size: str, device: str | None) -> int:
    """The command line's output shard size in bytes, and its device checked (before anything
    is read)."""
    import torch
    from mergekit.common import parse_kmb

    try:
        size = parse_kmb(shard_size)
    except ValueError:
        raise FusechatError(f"--shard-size {shard_size}: a number with K, M or B (5B)") from None
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        raise FusechatError(f"--device {device}: CUDA is not available on this machine")
    return size


def merge_options(size: int, device: str | None, lora_cache: str,
                  lora_merge_dtype: str | None, random_seed: int):  # fmt: skip
    """mergekit's options for one merge."""
    import torch
    from mergekit.options import MergeOptions

    return MergeOptions(
        out_shard_size=size, lora_merge_cache=lora_cache,
        lora_merge_dtype=lora_merge_dtype, lazy_unpickle=True, quiet=False,
        device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
        random_seed=random_seed,  # DARE's random drops; the other methods ignore it
    )  # fmt: skip


def run(
    config: str | os.PathLike,
    out: str | os.PathLike,
    overwrite: bool = False,
    shard_size: str = "5B",
    device: str | None = None,
    lora_merge_dtype: str | None = None,
    plot: bool = True,
    random_seed: int = 0,
) -> dict:
    """Check the inputs, merge with mergekit into ``out`` atomically, write the report (and,
    with ``plot``, the VaRM heat map; matplotlib costs about half a second)."""
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import run_merge

    size = shard_bytes(shard_size, device)
    cfg = parse_config(raw := load_config(config), str(config))
    same_merge, key = _merge_key(raw, cfg, random_seed)
    out = Path(out)
    check_apart(out, [*_inputs(cfg), _tokenizer_source(cfg, config)])
    if (old := _done(out, key, same_merge, overwrite)) is not None:
        return old
    # mergekit caches merged adapters by path, not content: a retrained adapter at the same path
    # would be served stale, so adapters are applied into a scratch folder per merge.
    scratch = tempfile.TemporaryDirectory(
        prefix=".lora-", dir=out.parent if out.parent.exists() else None
    )
    options = merge_options(size, device, scratch.name, lora_merge_dtype, random_seed)
    warnings = check_inputs(cfg, options)
    figures = delta_figures(cfg, options) if cfg.base_model else None
    models = [str(m.model) for m in cfg.models or []]  # before mergekit plans (it rewrites cfg)
    refs = cfg.referenced_models()
    params, group_stats = _varm_settings(cfg, options)
    t0 = time.perf_counter()
    # mergekit keeps one open loader per model for the whole process: a model rewritten since
    # an earlier merge in this process would be read from the replaced file
    LoaderCache().loaders.clear()
    logging.getLogger("transformers.configuration_utils").addFilter(_mergekit_dtype_noise)
    with atomic_dir(out) as tmp:
        with varm.session(group_stats) as session:
            try:
                run_merge(cfg, str(tmp), options)
            except (RuntimeError, ValueError, TypeError) as e:
                raise FusechatError(f"{config}: mergekit failed: {first_line(e)}") from None
        _check_finite_output(tmp, refs, options)
        weights = session.weights
        report = {"key": key, "merge": same_merge, "merge_method": cfg.merge_method,
                  "base_model": str(cfg.base_model) if cfg.base_model else None,
                  "models": models, "parameters": _parameters(raw),
                  "seconds": round(time.perf_counter() - t0, 2), "warnings": warnings,
                  "weight_space": figures}  # fmt: skip
        if weights:
            _varm_report(report, weights, params, tmp / "varm_weights.png" if plot else None)
        write_json(tmp / REPORT, report)
        # fusechat's card replaces mergekit's (which names the temporary folder)
        write_card(tmp, merge_card(out.name, report, raw))
    scratch.cleanup()
    log.info("merged %s into %s in %.1f s", cfg.merge_method, out, report["seconds"])
    return report

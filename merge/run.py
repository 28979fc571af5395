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
import math
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
from fusechat.merge.plot import heatmap
from fusechat.recipe import read_yaml, validation_error

log = logging.getLogger(__name__)
REPORT = MANIFEST  # the merge report is the output's completion record, as for every stage
# Relative delta ||theta_i - theta_base|| / ||theta_base|| above which the base is unlikely to be
# the model the target was fine-tuned from (fine-tunes move weights by a few percent).
ANCESTOR_LIMIT = 0.5


# --------------------------------------------------------------------------- configuration


def _adapter_ref(value: str) -> str:
    """A PEFT adapter folder given alone becomes mergekit's ``base+adapter`` reference."""
    path = Path(value)
    cfg = path / "adapter_config.json"
    if "+" not in value and cfg.is_file():
        base = read_json(cfg).get("base_model_name_or_path")
        if not base:
            raise FusechatError(f"{cfg}: no base_model_name_or_path; give 'BASE+{value}'")
        return f"{base}+{value}"
    return value


def load_config(path: str | os.PathLike) -> dict:
    """A mergekit YAML, or a recipe whose ``merge`` section is one; adapters resolved."""
    raw = read_yaml(path, "merge configuration")
    if isinstance(raw.get("merge"), dict):
        raw = raw["merge"]
    for m in raw.get("models") or []:
        if isinstance(m, dict) and isinstance(m.get("model"), str):
            m["model"] = _adapter_ref(m["model"])
    if isinstance(raw.get("base_model"), str):
        raw["base_model"] = _adapter_ref(raw["base_model"])
    return raw


def _value_ok(spec, value) -> bool:
    from typing import Literal, get_args, get_origin

    t = spec.value_type
    if get_origin(t) is Literal:
        return value in get_args(t)
    if t is bool:
        return isinstance(value, bool)
    if t in (float, int):  # a number, or mergekit's gradients (lists) and filters (dicts)
        return isinstance(value, (int, float, list, dict)) and not isinstance(value, bool)
    return True


def known_methods() -> list[str]:
    """Every merge method mergekit knows in this process, VaRM registered first."""
    from mergekit.merge_methods import registry

    varm.register()
    return sorted(m.spec.name for m in registry.registered_methods())


def check_method(method: str, parameters: dict, model_parameters: dict, where: str) -> None:
    """A merge method and its parameters against mergekit's own declarations (the method's
    parameter specs: names, choices, types), so a recipe fails before its first step, not
    after nine: ``parameters`` may set any of the method's parameters (mergekit applies
    per-model ones to every model), ``model_parameters`` only the per-model ones."""
    from mergekit.merge_methods import registry

    known = known_methods()
    if method not in known:
        raise FusechatError(f"{where}: unknown merge method {method!r} (known: {', '.join(known)})")
    spec = registry.get(method).spec
    allowed = {"parameters": {p.name: p for p in spec.parameters},
               "model_parameters": {p.name: p for p in spec.input_parameters}}  # fmt: skip
    for kind, given in (("parameters", parameters), ("model_parameters", model_parameters)):
        check_numbers(given or {}, f"{where}.{kind}")
        for name, value in (given or {}).items():
            ps = allowed[kind].get(name)
            if ps is None:
                names = ", ".join(allowed[kind]) or "none"
                raise FusechatError(
                    f"{where}.{kind}.{name}: not a parameter of {method} ({kind}: {names})"
                )
            if not _value_ok(ps, value):
                raise FusechatError(
                    f"{where}.{kind}.{name}: {value!r} is not a valid {ps.value_type}"
                )


def check_numbers(obj: Any, where: str, density: bool = False) -> None:
    """Every number in a merge configuration finite, and every density in [0, 1]: NaN passes
    mergekit's own checks and merges into a model of NaNs."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            check_numbers(v, f"{where}.{k}", density or k == "density")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            check_numbers(v, f"{where}[{i}]", density)
    elif isinstance(obj, float | int) and not isinstance(obj, bool):
        if not math.isfinite(obj):
            raise FusechatError(f"{where}: {obj} is not a finite number")
        if density and not 0 <= obj <= 1:
            raise FusechatError(f"{where}: a density is a share of the entries, in [0, 1]")


def parse_config(raw: dict, source: str):
    """Validate with mergekit's own schema; unknown methods are named with the known ones."""
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    check_numbers(raw, source)
    known = known_methods()
    method = raw.get("merge_method")
    if method not in known:
        raise FusechatError(
            f"{source}: merge_method: unknown method {method!r} (known: {', '.join(known)})"
        )
    try:
        return MergeConfiguration.model_validate(raw)
    except ValidationError as e:
        raise validation_error(source, e) from None
    except RuntimeError as e:  # mergekit raises these for malformed model strings
        raise FusechatError(f"{source}: {e}") from None


# --------------------------------------------------------------------------- checking inputs


def _local(ref, options):
    """A reference with its LoRA merged (cached) and its local folder. A path that looks
    local (``looks_local``) and is missing is said so, never looked up on the hub."""
    for p in (ref.model, ref.lora):
        if p is not None and looks_local(p.path) and not Path(p.path).exists():
            raise FusechatError(f"{p.path}: no such model folder")
    try:
        merged = ref.merged(
            cache_dir=options.lora_merge_cache, lora_merge_dtype=options.lora_merge_dtype
        )
        return merged, merged.local_path(cache_dir=options.transformers_cache)
    except Exception as e:  # hub errors, missing folders, broken adapters: one line each
        raise FusechatError(f"{ref}: cannot load ({first_line(e)})") from None


def _shapes(folder: str) -> dict[str, tuple[int, ...]]:
    from mergekit.io.lazy_tensor_loader import ShardedTensorIndex
    from safetensors import safe_open

    try:
        index = ShardedTensorIndex.from_disk(folder)
    except (RuntimeError, OSError) as e:
        raise FusechatError(f"{folder}: no model weights ({e})") from None
    if not index.is_safetensors:
        return {}  # .bin checkpoints: left to mergekit
    shapes = {}
    for shard in index.shards:
        with safe_open(os.path.join(folder, shard.filename), framework="pt") as f:
            for k in shard.contained_keys:
                shapes[k] = tuple(f.get_slice(k).get_shape())
    return shapes


def check_inputs(cfg, options) -> list[str]:
    """Fail with one line on inputs mergekit would choke on (or merge into nonsense) before
    any output exists; return warnings. Compares every input with the base (or the first)."""
    from transformers import AutoConfig

    if cfg.merge_method in ("linear", "task_arithmetic"):
        # normalised weights that sum to zero divide by zero: a model of NaNs
        weights = [float((m.parameters or {}).get("weight", 1.0)) for m in cfg.models or []
                   if not isinstance((m.parameters or {}).get("weight", 1.0), (dict, list))]  # fmt: skip
        normalize = (cfg.parameters or {}).get("normalize", cfg.merge_method == "linear")
        if weights and normalize is not False and abs(sum(weights)) < 1e-12:
            raise FusechatError(
                f"{cfg.merge_method}: the models' weights sum to zero ({weights}); normalising "
                "them would divide by zero"
            )
    refs = cfg.referenced_models()
    first = cfg.base_model or refs[0]
    ordered = [first] + [r for r in refs if r != first]
    local = {r: _local(r, options)[1] for r in ordered}
    archs = {}
    for r in ordered:
        try:
            archs[r] = (AutoConfig.from_pretrained(local[r]).architectures or ["?"])[0]
        except (OSError, ValueError) as e:
            raise FusechatError(f"{r}: cannot read config ({first_line(e)})") from None
    for r in ordered[1:]:
        if archs[r] != archs[first]:
            raise FusechatError(
                f"{r}: architecture {archs[r]} differs from {first} ({archs[first]}); "
                "merging needs one architecture"
            )
    shapes = {r: _shapes(local[r]) for r in ordered}
    ref_shapes = shapes[first]
    for r in ordered[1:]:
        if not shapes[r] or not ref_shapes:
            continue
        missing = sorted(set(ref_shapes) - set(shapes[r]))
        if missing:
            raise FusechatError(f"{r}: missing tensor {missing[0]} (present in {first})")
        for k, s in shapes[r].items():
            if k in ref_shapes and s != ref_shapes[k]:
                raise FusechatError(
                    f"{r}: tensor {k} has shape {list(s)}, {first} has {list(ref_shapes[k])}"
                )
    warnings = []
    if cfg.base_model is not None:
        for r in ordered[1:]:
            rel = relative_delta(local[first], local[r], ref_shapes)
            if rel is not None and rel > ANCESTOR_LIMIT:
                warnings.append(
                    f"{first} does not look like the base of {r} (relative delta {rel:.2f} > "
                    f"{ANCESTOR_LIMIT}); task vectors from it may be meaningless"
                )
    for w in warnings:
        log.warning(w)
    return warnings


def relative_delta(base: str, other: str, shapes: dict, n: int = 4) -> float | None:
    """Median of ``||x - b|| / ||b||`` over the n smallest 2-D tensors (cheap to read)."""
    import torch
    from mergekit.io.lazy_tensor_loader import LazyTensorLoader, ShardedTensorIndex

    names = sorted((k for k, s in shapes.items() if len(s) == 2), key=lambda k: (shapes[k], k))[:n]
    if not names:
        return None
    lb = LazyTensorLoader(ShardedTensorIndex.from_disk(base), lazy_unpickle=True)
    lo = LazyTensorLoader(ShardedTensorIndex.from_disk(other), lazy_unpickle=True)
    rel = []
    for k in names:
        b, x = lb.get_tensor(k).float(), lo.get_tensor(k).float()
        rel.append(((x - b).norm() / b.norm().clamp(min=1e-12)).item())
    return float(torch.tensor(rel).median())


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

    base_dir = _local(cfg.base_model, options)[1]
    base = LazyTensorLoader(ShardedTensorIndex.from_disk(base_dir), lazy_unpickle=True)
    stats: dict[tuple[str, str], float] = {}
    for m in cfg.models:
        if m.model == cfg.base_model:
            continue
        loader = LazyTensorLoader(
            ShardedTensorIndex.from_disk(_local(m.model, options)[1]), lazy_unpickle=True
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


def delta_figures(cfg, options) -> dict:
    """``fusechat.weightspace``'s figures for a merge with a base, read tensor by tensor: each
    input's relative delta ``||theta_i - theta_base|| / ||theta_base||`` and the cosine between
    every two inputs' deltas. Small deltas pointing the same way are what averaging needs
    (model soups); 40% apart at cosine 0.6, a merge lands off every input."""
    from mergekit.io.lazy_tensor_loader import LazyTensorLoader, ShardedTensorIndex

    from fusechat.weightspace import add_sums, delta_sums, figures

    def loader(ref):
        index = ShardedTensorIndex.from_disk(_local(ref, options)[1])
        return LazyTensorLoader(index, lazy_unpickle=True)

    base = loader(cfg.base_model)
    refs = [m.model for m in cfg.models or [] if m.model != cfg.base_model]
    loaders = {str(r): loader(r) for r in refs}
    total = None
    for t in sorted(base.index.tensor_paths):  # one tensor of every model in memory at a time
        part = delta_sums({t: base.get_tensor(t)},
                          {n: {t: ld.get_tensor(t)} for n, ld in loaders.items()})  # fmt: skip
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
        if _first_nonfinite(_local(ref, options)[1], [bad]):
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
    import torch
    from mergekit.common import parse_kmb
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    try:
        size = parse_kmb(shard_size)
    except ValueError:
        raise FusechatError(f"--shard-size {shard_size}: a number with K, M or B (5B)") from None
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        raise FusechatError(f"--device {device}: CUDA is not available on this machine")
    cfg = parse_config(raw := load_config(config), str(config))
    same_merge, key = _merge_key(raw, cfg, random_seed)
    out = Path(out)
    tok = cfg.tokenizer_source
    tok_path = str(tok.model.path) if hasattr(tok, "model") else None
    if tok_path and looks_local(tok_path) and not Path(tok_path).is_dir():
        raise FusechatError(f"{config}: tokenizer_source: {tok_path}: no such folder")
    check_apart(out, [*_inputs(cfg), tok_path])
    if (old := _done(out, key, same_merge, overwrite)) is not None:
        return old
    # mergekit caches merged adapters by path, not content: a retrained adapter at the same path
    # would be served stale, so adapters are applied into a scratch folder per merge.
    scratch = tempfile.TemporaryDirectory(
        prefix=".lora-", dir=out.parent if out.parent.exists() else None
    )
    options = MergeOptions(
        out_shard_size=size, lora_merge_cache=scratch.name,
        lora_merge_dtype=lora_merge_dtype, lazy_unpickle=True, quiet=False,
        device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
        random_seed=random_seed,  # DARE's random drops; the other methods ignore it
    )  # fmt: skip
    warnings = check_inputs(cfg, options)
    figures = delta_figures(cfg, options) if cfg.base_model else None
    models = [str(m.model) for m in cfg.models or []]  # before mergekit plans (it rewrites cfg)
    refs = cfg.referenced_models()
    params = varm_parameters(cfg) if cfg.merge_method == "varm" else {}
    if params and params["granularity"] in ("layer", "model"):
        varm.set_group_stats(
            group_statistics(cfg, options, params["granularity"], params["statistic"])
        )
    varm.reset_report()
    t0 = time.perf_counter()
    # mergekit keeps one open loader per model for the whole process: a model rewritten since
    # an earlier merge in this process would be read from the replaced file
    LoaderCache().loaders.clear()
    logging.getLogger("transformers.configuration_utils").addFilter(_mergekit_dtype_noise)
    with atomic_dir(out) as tmp:
        try:
            run_merge(cfg, str(tmp), options)
        except (RuntimeError, ValueError, TypeError) as e:
            raise FusechatError(f"{config}: mergekit failed: {first_line(e)}") from None
        _check_finite_output(tmp, refs, options)
        weights = varm.reset_report()
        report = {
            "key": key, "merge": same_merge, "merge_method": cfg.merge_method,
            "base_model": str(cfg.base_model) if cfg.base_model else None, "models": models,
            "parameters": json.loads(json.dumps(raw.get("parameters") or {}, default=str)),
            "seconds": round(time.perf_counter() - t0, 2), "warnings": warnings,
            "weight_space": figures,
        }  # fmt: skip
        if weights:
            _varm_report(report, weights, params, tmp / "varm_weights.png" if plot else None)
        write_json(tmp / REPORT, report)
        # fusechat's card replaces mergekit's (which names the temporary folder)
        write_card(tmp, merge_card(out.name, report, raw))
    scratch.cleanup()
    log.info("merged %s into %s in %.1f s", cfg.merge_method, out, report["seconds"])
    return report

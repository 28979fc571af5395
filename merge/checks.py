"""A merge's configuration read and checked before any output is written: the YAML (mergekit's
schema, PEFT adapter folders as inputs), the method and its parameters against mergekit's
declarations, finite numbers, and the inputs themselves (architectures, tensor names and
shapes, a base that is not an ancestor: ``relative_delta``)."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

from fusechat.errors import FusechatError, first_line
from fusechat.io import (
    looks_local,
    read_json,
)
from fusechat.merge import varm
from fusechat.recipe import validation_error
from fusechat.yamlfile import read_yaml

log = logging.getLogger(__name__)
# Relative delta ||theta_i - theta_base|| / ||theta_base|| above which the base is unlikely to be
# the model the target was fine-tuned from (fine-tunes move weights by a few percent).

# Relative delta ||theta_i - theta_base|| / ||theta_base|| above which the base is unlikely to be
# the model the target was fine-tuned from (fine-tunes move weights by a few percent).
ANCESTOR_LIMIT = 0.5


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


def local_ref(ref, options):
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
    local = {r: local_ref(r, options)[1] for r in ordered}
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

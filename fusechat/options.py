"""Settings objects at the process edges: a stage's command-line options derived from its config
class (names, types, choices, defaults, help: ``add_options`` / ``from_options``), and the job
file a launcher hands each process (``job_command`` / ``read_job``)."""

from __future__ import annotations

import argparse
import json
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import ValidationError

from fusechat.configs import Config
from fusechat.errors import FusechatError, first_line


def job_command(launcher: list[str], stage: str, job: Config, job_file: Path) -> list[str]:
    """``launcher`` (torchrun, accelerate launch) running ``fusechat STAGE --config
    JOB_FILE``, with the job written there whole: no setting is dropped on the way to the
    processes."""
    from fusechat.io import write_atomic

    write_atomic(job_file, job.model_dump_json(indent=1))
    return [*launcher, "-m", "fusechat.cli", stage, "--config", str(job_file)]


def read_job(cls: type[Config], path: str) -> Config:
    """A job file written by ``job_command``; one line if it is not one."""
    try:
        return cls.model_validate_json(Path(path).read_text())
    except OSError as e:
        raise FusechatError(f"{path}: cannot read ({e.strerror})") from None
    except ValidationError as e:
        what = cls.__name__.removesuffix("Job").lower()
        raise FusechatError(f"{path}: not a {what} job ({first_line(e)})") from None


# --------------------------------------------------------------------------- options


def _json(text: str) -> Any:
    return json.loads(text)


_json.__name__ = "JSON"  # argparse names it: "invalid JSON value: 'not json'"


def _flag(name: str, field, prefix: str, flags: dict[str, str]) -> str:
    return "--" + (prefix + flags.get(name, field.alias or name)).replace("_", "-")


def _unwrap(annotation: Any) -> Any:
    """``X | None`` -> X (the first non-None member of a union)."""
    if get_origin(annotation) in (Union, types.UnionType):
        return next(a for a in get_args(annotation) if a is not type(None))
    return annotation


def add_options(
    parser: argparse.ArgumentParser,
    cls: type[Config],
    skip: tuple[str, ...] = (),
    flags: dict[str, str] | None = None,
    prefix: str = "",
) -> None:
    """One option per field of ``cls``: ``--max-length`` for ``max_length``, choices from a
    Literal, a switch for a bool (``--no-X`` when it defaults to true), help and default from
    the field. Options left out stay None, and the config's own defaults apply."""
    flags = flags or {}
    for name, f in cls.model_fields.items():
        if name in skip:
            continue
        kind = _unwrap(f.annotation)
        if isinstance(kind, type) and issubclass(kind, Config):
            continue  # nested settings are added with their own prefix
        default = None if f.is_required() else f.get_default(call_default_factory=True)
        shown = "" if default in (None, {}, "") else f" (default {default})"
        if default not in (None, {}, "") and prefix and kind is not bool:
            shown = f" (default {default} once {prefix.rstrip('_')} is on)"
        kw: dict[str, Any] = {"dest": prefix + name, "help": f"{f.description}{shown}"}
        flag = _flag(name, f, prefix, flags)
        if kind is bool:
            if default:
                flag = "--no-" + flag[2:]
                kw.update(action="store_const", const=False,
                          help=f"turn off: {f.description} (on by default)")  # fmt: skip
            else:
                kw.update(action="store_const", const=True)
        elif get_origin(kind) is Literal:
            kw.update(choices=list(get_args(kind)), type=type(get_args(kind)[0]))
        elif get_origin(kind) in (tuple, list):
            kw.update(nargs="+")
        elif kind is dict:
            kw.update(type=_json, metavar="JSON")
        else:
            kw.update(type=kind)
        if kind is not bool and "metavar" not in kw and "choices" not in kw:
            kw["metavar"] = flag[2:].upper().replace("-", "_")
        parser.add_argument(flag, **kw)


def option_values(args: argparse.Namespace, cls: type[Config], prefix: str = "") -> dict:
    """The options of ``cls`` that were given, by field name."""
    out = {}
    for name in cls.model_fields:
        v = getattr(args, prefix + name, None)
        if v is not None:
            out[name] = v
    return out


def from_options(
    cls: type[Config],
    values: dict,
    flags: dict[str, str] | None = None,
    prefix: str = "",
) -> Config:
    """``cls`` from option values, checked by its own rules: the first error as one line
    naming the option, ``--max-length: Input should be greater than 0``."""
    try:
        return cls.model_validate(values)
    except ValidationError as e:
        raise options_error(cls, e, flags, prefix) from None


def options_error(
    cls: type[Config], e: ValidationError, flags: dict[str, str] | None = None, prefix: str = ""
) -> FusechatError:
    err = e.errors()[0]
    msg = err["msg"].removeprefix("Value error, ")
    model, name = cls, ""
    for part in (str(p) for p in err["loc"] if not isinstance(p, int)):
        if name:  # nested settings: lora.r -> --lora-r
            inner = _unwrap(model.model_fields[name].annotation)
            model, prefix = inner, f"{prefix}{name}_"
        name = next((n for n, f in model.model_fields.items() if part in (n, f.alias)), part)
    field = model.model_fields.get(name)
    if field is None:  # a rule over several fields: its message names them
        return FusechatError(msg)
    return FusechatError(f"{_flag(name, field, prefix, flags or {})}: {msg}")

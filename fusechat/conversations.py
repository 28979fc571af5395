"""Chat corpora: a file (.json, .jsonl, .parquet), a saved dataset folder or a hub dataset id,
read as lists of OpenAI-style messages. ShareGPT rows (``{"conversations": [{"from": "human",
"value": ...}, ...]}``, the FuseChat-Mixture format) are converted; malformed rows are skipped
and reported, or fail the load with ``strict``."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from fusechat.data import ROLES, Message
from fusechat.errors import FusechatError, first_line
from fusechat.io import is_hub_id

log = logging.getLogger(__name__)

_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
}


@dataclass
class LoadReport:
    rows: int = 0
    kept: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (row number, reason)
    numbers: list[int] = field(default_factory=list)  # each kept conversation's row number
    fields: list[dict] = field(default_factory=list)  # each kept row's asked-for extra fields


def normalize_row(row: dict, fmt: str = "auto", prompts: bool = False) -> list[Message]:
    """Convert one row (OpenAI ``messages`` or ShareGPT ``conversations``) to messages.

    Raises ValueError with the reason when the row is malformed: unknown role, non-text
    content, no assistant turn, or turns that do not alternate user/assistant. With
    ``prompts`` (a prompt set, what sampling reads) a row needs a user turn, not an answer.
    """
    if not isinstance(row, dict):
        raise ValueError("row is not an object")
    if fmt == "auto":
        fmt = "messages" if "messages" in row else "sharegpt" if "conversations" in row else ""
        if not fmt:
            raise ValueError("row has neither 'messages' nor 'conversations'")
    key = "messages" if fmt == "messages" else "conversations"
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"'{key}' is missing or empty")
    msgs: list[Message] = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise ValueError(f"{key}[{i}] is not an object")
        if fmt == "messages":
            role, content = t.get("role"), t.get("content")
        else:
            role, content = _SHAREGPT_ROLES.get(str(t.get("from")).lower()), t.get("value")
            if role is None:
                raise ValueError(f"{key}[{i}].from: unknown speaker {t.get('from')!r}")
        if role not in ROLES:
            raise ValueError(f"{key}[{i}].role: unknown role {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"{key}[{i}]: content is not text")
        msgs.append({"role": role, "content": content})
    body = msgs[1:] if msgs[0]["role"] == "system" else msgs
    for i, m in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ValueError(f"turn {i} is {m['role']!r}, expected {want!r} (turns must alternate)")
    if prompts and not body:
        raise ValueError("no user turn")
    if not prompts and not any(m["role"] == "assistant" for m in body):
        raise ValueError("no assistant turn")
    return msgs


def _read_rows(path: Path) -> list:
    """The file's rows; any failure to read it is one line naming the file."""
    try:
        return _read_rows_unchecked(path)
    except UnicodeDecodeError as e:
        raise FusechatError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise FusechatError(f"{path}: cannot read ({e.strerror or e})") from None
    except FusechatError:
        raise
    except Exception as e:  # pyarrow and datasets raise their own kinds for damaged files
        raise FusechatError(f"{path}: unreadable corpus ({first_line(e)})") from None


def _read_rows_unchecked(path: Path) -> list:
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError as e:
            raise FusechatError(f"{path}: not a saved dataset folder ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        return list(ds)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    # utf-8-sig: a byte-order mark some editors write must not cost the first row
    text = path.read_text(encoding="utf-8-sig")
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                rows.append(_BadJson(f"line {n}: invalid JSON ({e.msg})"))
        return rows
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise FusechatError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
        if not isinstance(data, list):
            raise FusechatError(f"{path}: expected a JSON list of conversations")
        return data
    raise FusechatError(
        f"{path}: unsupported corpus format (use .json, .jsonl, .parquet or a saved dataset)"
    )


def _read_hub(name: str):
    import datasets

    try:
        return datasets.load_dataset(name, split="train")
    except Exception as e:  # offline, unknown id, no train split: one line
        raise FusechatError(f"{name}: cannot load hub dataset ({first_line(e)})") from None


@dataclass
class _BadJson:
    reason: str


def load_conversations(
    path: str | Path,
    fmt: str = "auto",
    strict: bool = False,
    max_rows: int | None = None,
    prompts: bool = False,
    fields: tuple[str, ...] = (),
) -> tuple[list[list[Message]], LoadReport]:
    """Load a chat corpus: a file, a saved dataset folder, or a hub dataset id such as
    ``FuseAI/FuseChat-Mixture`` (its train split). Malformed rows are skipped and reported by
    row number (1-based), or, with ``strict``, the first one raises. ``prompts``: rows need
    a user turn, not an answer (``normalize_row``); ``fields``: each kept row's values of these
    other columns (those it has) go to ``report.fields``, in the conversations' order."""
    hub = is_hub_id(path)
    path = Path(path)
    if not path.exists() and not hub:
        raise FusechatError(f"{path}: corpus not found")
    report = LoadReport()
    convs: list[list[Message]] = []
    rows = _read_hub(str(path)) if hub else _read_rows(path)
    for n, row in enumerate(rows, 1):
        if max_rows is not None and report.rows >= max_rows:
            break
        report.rows += 1
        try:
            if isinstance(row, _BadJson):
                raise ValueError(row.reason)
            convs.append(normalize_row(row, fmt, prompts))
            report.numbers.append(n)
            if fields:
                report.fields.append({k: row[k] for k in fields if k in row})
        except ValueError as e:
            if strict:
                raise FusechatError(f"{path}: row {n}: {e}") from None
            report.skipped.append((n, str(e)))
    report.kept = len(convs)
    if report.skipped:
        first = "; ".join(f"row {n}: {r}" for n, r in report.skipped[:3])
        log.warning("%s: skipped %d malformed rows (%s)", path, len(report.skipped), first)
    if not convs:
        raise FusechatError(f"{path}: no usable conversations ({report.rows} rows read)")
    return convs, report

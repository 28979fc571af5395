"""Chat data: load corpora, render conversations with a template, and mask assistant tokens.

A conversation is a list of OpenAI-style messages ``{"role": ..., "content": ...}``. ShareGPT rows
(``{"conversations": [{"from": "human", "value": ...}, ...]}``, the FuseChat-Mixture format) are
converted on load. Rendering yields the text plus the character spans of assistant turns; the label
mask of any fast tokenizer then follows from its offset mapping, so one code path serves every
tokenizer, including the sources' tokenizers fed the pivot's template (as FuseChat does).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fusechat.errors import FusechatError, first_line

log = logging.getLogger(__name__)

Message = dict[str, str]
ROLES = ("system", "user", "assistant")
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


# --------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class Template:
    """A conversation format. ``{content}`` is replaced by a message's text.

    ``assistant`` is the part of an assistant turn the model must learn (content plus end of
    turn); ``assistant_prefix`` (the role header) is not learned and doubles as the generation
    prompt. ``sep`` follows every turn and is not learned.
    """

    name: str
    system: str
    user: str
    assistant_prefix: str
    assistant: str
    sep: str = ""
    jinja: str = ""  # the same format as a tokenizer ``chat_template``, written into checkpoints


TEMPLATES: dict[str, Template] = {
    # openchat/openchat_3.5: the pivot's format, used for every model's input in FuseChat.
    "openchat": Template(
        name="openchat",
        system="{content}<|end_of_turn|>",
        user="GPT4 Correct User: {content}<|end_of_turn|>",
        assistant_prefix="GPT4 Correct Assistant:",
        assistant=" {content}<|end_of_turn|>",
        jinja=(
            "{{ bos_token }}{% for message in messages %}"
            "{% if message['role'] == 'system' %}{{ message['content'] + '<|end_of_turn|>' }}"
            "{% else %}{{ 'GPT4 Correct ' + message['role'] | title + ': ' + message['content']"
            " + '<|end_of_turn|>' }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'GPT4 Correct Assistant:' }}{% endif %}"
        ),
    ),
    # ChatML: Nous-Hermes-2 (Mixtral and SOLAR), Qwen, SmolLM2.
    "chatml": Template(
        name="chatml",
        system="<|im_start|>system\n{content}<|im_end|>",
        user="<|im_start|>user\n{content}<|im_end|>",
        assistant_prefix="<|im_start|>assistant\n",
        assistant="{content}<|im_end|>",
        sep="\n",
        jinja=(
            "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n'"
            " + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
        ),
    ),
    # Mistral-Instruct v0.1/v0.2 (no system role: a system message is prepended to the user's).
    "mistral": Template(
        name="mistral",
        system="{content}\n\n",
        user="[INST] {content} [/INST]",
        assistant_prefix="",
        assistant=" {content}</s>",
        jinja=(
            "{{ bos_token }}{% for message in messages %}"
            "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
            "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
            "{% else %}{{ ' ' + message['content'] + '</s>' }}{% endif %}{% endfor %}"
        ),
    ),
}
TOKENIZER_TEMPLATE = "tokenizer"  # use the tokenizer's own ``chat_template`` (Jinja)
TEMPLATE_NAMES = (*TEMPLATES, TOKENIZER_TEMPLATE)


@dataclass
class Rendered:
    """Rendered text and the half-open character spans the model must learn."""

    text: str
    assistant_spans: list[tuple[int, int]] = field(default_factory=list)


def render(messages: Sequence[Message], template: Template) -> Rendered:
    """Render ``messages`` with ``template``; assistant spans cover content and end of turn."""
    out = Rendered(text="")
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "assistant":
            out.text += template.assistant_prefix
            start = len(out.text)
            out.text += template.assistant.format(content=content)
            out.assistant_spans.append((start, len(out.text)))
        else:
            out.text += getattr(template, role).format(content=content)
        out.text += template.sep
    return out


def render_with_tokenizer(messages: Sequence[Message], tokenizer) -> Rendered:
    """Render with the tokenizer's Jinja ``chat_template`` (and its special-token strings).

    The span of assistant turn i is the difference between the rendering of messages[:i] with
    the generation prompt and the rendering of messages[:i+1]; templates for which one is not a
    prefix of the other cannot be masked this way and are rejected.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise FusechatError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat_template; name a template "
            f"({', '.join(TEMPLATES)})"
        )

    def apply(msgs, gen):
        return tokenizer.apply_chat_template(list(msgs), tokenize=False, add_generation_prompt=gen)

    text = apply(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, through = apply(messages[:i], True), apply(messages[: i + 1], False)
        if not (through.startswith(before) and text.startswith(through)):
            raise FusechatError(
                f"chat_template of {tokenizer.name_or_path!r} does not render turns as prefixes "
                "of the whole conversation; name a template instead"
            )
        # A trailing newline separates turns (ChatML); it is not learned.
        spans.append((len(before), len(through.rstrip("\n"))))
    return Rendered(text=text, assistant_spans=spans)


def get_template(name: str) -> Template | None:
    """The named template, or None for ``tokenizer`` (the tokenizer's own chat_template)."""
    if name == TOKENIZER_TEMPLATE:
        return None
    try:
        return TEMPLATES[name]
    except KeyError:
        raise FusechatError(
            f"unknown conversation template {name!r} (known: {', '.join(TEMPLATE_NAMES)})"
        ) from None


# --------------------------------------------------------------------------- tokenization


def load_tokenizer(path: str, what: str = "tokenizer"):
    """``AutoTokenizer.from_pretrained(path)``, failing with one line that names ``what``."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise FusechatError(f"{path}: cannot load {what} ({first_line(e)})") from None


def load_model(path: str, **kwargs):
    """``AutoModelForCausalLM.from_pretrained(path, **kwargs)``, failing with one line: a
    missing folder, a truncated or damaged weights file, a config transformers cannot read."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        raise FusechatError(f"{path}: cannot load the model ({first_line(e)})") from None


@dataclass
class Encoded:
    """One tokenized conversation. ``labels_mask[t]`` is True where token t is learned."""

    input_ids: list[int]
    labels_mask: list[bool]
    offsets: list[tuple[int, int]]
    text: str
    assistant_spans: list[tuple[int, int]] = field(default_factory=list)


def mask_from_offsets(
    offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> list[bool]:
    """A token is learned iff its last character lies in an assistant span.

    Using the last character assigns a token such as ``▁Hello`` (which also covers the space
    before it) to the turn whose text it completes; zero-width tokens (BOS) are never learned.
    """
    mask = []
    j = 0
    for s, e in offsets:
        if e <= s:
            mask.append(False)
            continue
        last = e - 1
        while j < len(spans) and spans[j][1] <= last:
            j += 1
        mask.append(j < len(spans) and spans[j][0] <= last)
    return mask


def encode(
    messages: Sequence[Message],
    tokenizer,
    template: str,
    max_length: int | None = None,
    render_tokenizer=None,
) -> Encoded:
    """Render and tokenize one conversation; truncate to ``max_length`` tokens when given.

    With ``template='tokenizer'`` the text comes from ``render_tokenizer``'s chat template
    (default: ``tokenizer``'s). FuseChat feeds every model the pivot's rendering: the same text,
    BOS and role markers included, which each model then tokenizes its own way, so that
    captures of different models align character by character.
    """
    tpl = get_template(template)
    if tpl is None:
        rendered = render_with_tokenizer(messages, render_tokenizer or tokenizer)
        add_special = False
    else:
        # Named templates leave BOS to the tokenizer's post-processor (each model's own).
        rendered, add_special = render(messages, tpl), True
    enc = tokenizer(
        rendered.text,
        add_special_tokens=add_special,
        return_offsets_mapping=True,
        truncation=max_length is not None,
        max_length=max_length,
    )
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    return Encoded(
        input_ids=list(enc["input_ids"]),
        labels_mask=mask_from_offsets(offsets, rendered.assistant_spans),
        offsets=offsets,
        text=rendered.text,
        assistant_spans=rendered.assistant_spans,
    )


def collate(batch: Sequence[Encoded], pad_id: int) -> dict:
    """Right-pad a batch: ``input_ids``, ``attention_mask`` and ``labels_mask`` tensors."""
    import torch

    n = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    attn = torch.zeros((len(batch), n), dtype=torch.long)
    lab = torch.zeros((len(batch), n), dtype=torch.bool)
    for i, e in enumerate(batch):
        k = len(e.input_ids)
        ids[i, :k] = torch.tensor(e.input_ids)
        attn[i, :k] = 1
        lab[i, :k] = torch.tensor(e.labels_mask)
    return {"input_ids": ids, "attention_mask": attn, "labels_mask": lab}


# --------------------------------------------------------------------------- loading


@dataclass
class LoadReport:
    rows: int = 0
    kept: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (row number, reason)


def normalize_row(row: dict, fmt: str = "auto") -> list[Message]:
    """Convert one row (OpenAI ``messages`` or ShareGPT ``conversations``) to messages.

    Raises ValueError with the reason when the row is malformed: unknown role, non-text
    content, no assistant turn, or turns that do not alternate user/assistant.
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
    if not any(m["role"] == "assistant" for m in body):
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
    text = path.read_text(encoding="utf-8")
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
    path: str | Path, fmt: str = "auto", strict: bool = False, max_rows: int | None = None
) -> tuple[list[list[Message]], LoadReport]:
    """Load a chat corpus: a file, a saved dataset folder, or a hub dataset id such as
    ``FuseAI/FuseChat-Mixture`` (its train split). Malformed rows are skipped and reported by
    row number (1-based), or, with ``strict``, the first one raises."""
    hub = not Path(path).exists() and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", str(path))
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
            convs.append(normalize_row(row, fmt))
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

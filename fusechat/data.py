"""Chat data: render conversations with a template, and mask assistant tokens (corpora are read
by ``fusechat.conversations``).

A conversation is a list of OpenAI-style messages ``{"role": ..., "content": ...}``. ShareGPT rows
(``{"conversations": [{"from": "human", "value": ...}, ...]}``, the FuseChat-Mixture format) are
converted on load. Rendering yields the text plus the character spans of assistant turns; the label
mask of any fast tokenizer then follows from its offset mapping, so one code path serves every
tokenizer, including the sources' tokenizers fed the pivot's template (as FuseChat does).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from fusechat.errors import FusechatError, first_line
from fusechat.io import check_found

log = logging.getLogger(__name__)

Message = dict[str, str]
ROLES = ("system", "user", "assistant")


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


class TemplateRefused(ValueError):
    """A chat template refused a conversation (Jinja ``raise_exception``: Mistral-v0.1's and
    Llama-2's "roles must alternate" for a system turn): the row is skipped and reported like a
    malformed one, not a traceback."""


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

    from jinja2 import TemplateError

    def apply(msgs, gen):
        try:
            return tokenizer.apply_chat_template(
                list(msgs), tokenize=False, add_generation_prompt=gen
            )
        except TemplateError as e:
            raise TemplateRefused(first_line(e)) from None

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


def check_config_json(path: str) -> None:
    """A local model's ``config.json``, when there is one, must be a JSON object: transformers
    reports a list or broken JSON as a ``**`` type error that names no file."""
    import json
    from pathlib import Path

    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return
    try:
        value = json.loads(cfg.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise FusechatError(f"{cfg}: not valid JSON ({first_line(e)})") from None
    if not isinstance(value, dict):
        raise FusechatError(f"{cfg}: not a JSON object (a {type(value).__name__})")


def load_tokenizer(path: str, what: str = "tokenizer"):
    """``AutoTokenizer.from_pretrained(path)``, failing with one line that names ``what``; a
    missing local-looking path is never looked up on the hub."""
    from transformers import AutoTokenizer

    check_found(path, what)
    check_config_json(path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        raise FusechatError(f"{path}: cannot load {what} ({first_line(e)})") from None


def model_context(path: str) -> int | None:
    """The positions the model was built for (``max_position_embeddings`` of its config, or of
    its text model's); None when its config does not say or cannot be read."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path).get_text_config()
    except (OSError, ValueError, KeyError):
        return None  # the model's own loading reports what is wrong with it
    n = getattr(config, "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def resolve_dtype(name: str) -> str:
    """The one ``auto`` rule (capture, training, serving): bfloat16 on a GPU that supports it,
    else float32 (CPUs; older GPUs, where float16 would risk overflow in 7B activations)."""
    if name != "auto":
        return name
    import torch

    return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"


def load_model(path: str, auto_class=None, **kwargs):
    """``AutoModelForCausalLM.from_pretrained(path, **kwargs)`` (or ``auto_class``'s, e.g.
    ``AutoModelForSequenceClassification`` for a reward model), failing with one line: a
    missing folder, a truncated or damaged weights file, a config transformers cannot read,
    and weights that do not match the config (a tensor missing, left over or of another shape:
    transformers would initialise the missing ones at random and go on: a causal LM read as a
    reward model would get a random score head)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    check_found(path, "model")
    auto_class = auto_class or AutoModelForCausalLM
    try:
        model, info = auto_class.from_pretrained(path, output_loading_info=True, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, SafetensorError) as e:
        raise FusechatError(f"{path}: cannot load the model ({first_line(e)})") from None
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if info.get(kind):
            first = sorted(map(str, info[kind]))[0]
            raise FusechatError(f"{path}: the weights do not match config.json "
                                f"({len(info[kind])} {kind.replace('_', ' ')}, e.g. {first})")  # fmt: skip
    return model


def check_finite_weights(model, where: str) -> None:
    """Every parameter finite, else one line naming the first bad tensor (a diverged
    checkpoint serves NaN probabilities, or empty answers at temperature 0)."""
    for name, p in model.named_parameters():
        if not p.isfinite().all():
            raise FusechatError(f"{where}: tensor {name} holds non-finite values")


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


def render_text(messages: Sequence[Message], tokenizer, template: str, generation: bool
                ) -> tuple[str, bool]:  # fmt: skip
    """The text a model reads and whether its tokenizer is to add its special tokens: a named
    template's rendering (plus the assistant prefix when ``generation``), BOS left to the
    tokenizer as ``fusechat.data.encode`` does; or the tokenizer's chat_template, which writes
    its special tokens itself. A template that refuses the conversation raises
    ``TemplateRefused``."""
    tpl = get_template(template)
    if tpl is not None:
        text = render(messages, tpl).text
        return (text + tpl.assistant_prefix if generation else text), True
    if not getattr(tokenizer, "chat_template", None):
        raise FusechatError(f"tokenizer {tokenizer.name_or_path!r} has no chat_template; name a "
                            "template (--template)")  # fmt: skip
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=generation)  # fmt: skip
    except TemplateError as e:
        raise TemplateRefused(first_line(e)) from None
    return text, False

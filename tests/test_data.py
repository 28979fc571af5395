import json

import pytest

from fusechat.conversations import load_conversations, normalize_row
from fusechat.data import TEMPLATES, encode, mask_from_offsets, render
from fusechat.errors import FusechatError

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5."},
    {"role": "user", "content": "And the capital of France?"},
    {"role": "assistant", "content": "Paris."},
]


def test_openchat_render_matches_openchat_format():
    r = render(CONV, TEMPLATES["openchat"])
    assert r.text == (
        "Be brief.<|end_of_turn|>GPT4 Correct User: What is 2 + 3?<|end_of_turn|>"
        "GPT4 Correct Assistant: 2 + 3 = 5.<|end_of_turn|>"
        "GPT4 Correct User: And the capital of France?<|end_of_turn|>"
        "GPT4 Correct Assistant: Paris.<|end_of_turn|>"
    )
    assert [r.text[s:e] for s, e in r.assistant_spans] == [
        " 2 + 3 = 5.<|end_of_turn|>",
        " Paris.<|end_of_turn|>",
    ]


def test_chatml_render_spans_exclude_role_headers_and_separators():
    r = render(CONV[1:3], TEMPLATES["chatml"])
    assert (
        r.text
        == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n2 + 3 = 5.<|im_end|>\n"
    )
    assert [r.text[s:e] for s, e in r.assistant_spans] == ["2 + 3 = 5.<|im_end|>"]


@pytest.mark.parametrize("name", ["openchat", "chatml", "mistral"])
def test_jinja_template_renders_like_the_named_template(name, mistral_tokenizer):
    """Each named template's Jinja twin (written into checkpoints) renders the same text."""
    tok = mistral_tokenizer
    tok.chat_template = TEMPLATES[name].jinja
    text = tok.apply_chat_template(CONV[1:], tokenize=False)
    bos = tok.bos_token if "bos_token" in TEMPLATES[name].jinja else ""
    assert text == bos + render(CONV[1:], TEMPLATES[name]).text


def _covered_chars(enc):
    return {
        c for (s, e), m in zip(enc.offsets, enc.labels_mask, strict=True) if m for c in range(s, e)
    }


def _span_chars(enc):
    return {c for s, e in enc.assistant_spans for c in range(s, e)}


@pytest.mark.parametrize("template", ["openchat", "chatml"])
def test_label_mask_covers_exactly_the_assistant_text_real_tokenizer(template, mistral_tokenizer):
    enc = encode(CONV, mistral_tokenizer, template)
    assert len(enc.labels_mask) == len(enc.input_ids)
    # Tokens like '▁Paris' also cover the space before them, which the openchat span includes.
    assert _covered_chars(enc) == _span_chars(enc)
    learned = mistral_tokenizer.decode(
        [i for i, m in zip(enc.input_ids, enc.labels_mask, strict=True) if m]
    )
    assert "5." in learned and "Paris." in learned and "France" not in learned


def test_label_mask_multi_turn_on_toy_tokenizers(toy_world):
    """Exact for a model's own template. With a foreign template (FuseChat feeds every model the
    pivot's), a tokenizer without its marker tokens may merge across a turn boundary; such a
    token goes to the turn of its last character, and only those tokens may differ."""
    from transformers import AutoTokenizer

    own = {"openchat-mini": "openchat", "nh2-mixtral-mini": "chatml", "nh2-solar-mini": "chatml"}
    for name, own_template in own.items():
        tok = AutoTokenizer.from_pretrained(toy_world / name)
        for template in ("openchat", "chatml", "tokenizer"):
            enc = encode(CONV, tok, template)
            assert len(enc.assistant_spans) == 2
            diff = _covered_chars(enc) ^ _span_chars(enc)
            if template in (own_template, "tokenizer"):
                assert not diff, (name, template)
            bounds = {b for span in enc.assistant_spans for b in span}
            straddling = [(s, e) for s, e in enc.offsets if any(s < b < e for b in bounds)]
            assert all(any(s <= c < e for s, e in straddling) for c in diff), (name, template)


def test_tokenizer_chat_template_spans_match_named_template(toy_world):
    """The Jinja route finds the same learned text as the named template it mirrors."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy_world / "nh2-mixtral-mini")  # ChatML model
    a, b = encode(CONV, tok, "tokenizer"), encode(CONV, tok, "chatml")
    learned = lambda e: [e.text[s:t] for s, t in e.assistant_spans]  # noqa: E731
    assert learned(a) == learned(b)


def test_mask_from_offsets_rules():
    # zero-width (BOS) never learned; a token counts where its last character falls
    offsets = [(0, 0), (0, 3), (3, 6), (6, 9)]
    assert mask_from_offsets(offsets, [(4, 9)]) == [False, False, True, True]
    assert mask_from_offsets(offsets, []) == [False] * 4


def test_sharegpt_rows_convert_to_messages():
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    assert normalize_row(row) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]


@pytest.mark.parametrize(
    "row,reason",
    [
        ({"text": "x"}, "neither"),
        ({"messages": []}, "missing or empty"),
        ({"messages": [{"role": "user", "content": "a"}]}, "no assistant"),
        ({"messages": [{"role": "robot", "content": "a"}]}, "unknown role"),
        ({"messages": [{"role": "user", "content": 3}]}, "not text"),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "alternate"),
        ({"conversations": [{"from": "alien", "value": "a"}]}, "unknown speaker"),
    ],
)
def test_malformed_rows_are_rejected_with_reason(row, reason):
    with pytest.raises(ValueError, match=reason):
        normalize_row(row)


def test_load_jsonl_skips_and_reports_bad_rows_by_number(tmp_path, caplog):
    good = {"messages": CONV[1:3]}
    lines = [json.dumps(good), "{not json", json.dumps({"messages": []}), json.dumps(good)]
    p = tmp_path / "c.jsonl"
    p.write_text("\n".join(lines) + "\n")
    convs, report = load_conversations(p)
    assert len(convs) == 2 and report.rows == 4
    assert [n for n, _ in report.skipped] == [2, 3]
    assert "skipped 2 malformed rows" in caplog.text
    with pytest.raises(FusechatError, match=r"c.jsonl: row 2: line 2: invalid JSON"):
        load_conversations(p, strict=True)


def test_a_byte_order_mark_keeps_the_first_row(tmp_path):
    good = json.dumps({"messages": CONV[1:3]})
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + f"{good}\n{good}\n".encode())
    convs, report = load_conversations(p, strict=True)
    assert len(convs) == 2 and not report.skipped


def test_load_parquet_and_saved_dataset(tmp_path):
    import datasets

    rows = [
        {"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
        for i in range(3)
    ]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "c.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for path in (tmp_path / "c.parquet", tmp_path / "saved"):
        convs, _ = load_conversations(path)
        assert convs[2] == [
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2"},
        ]


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(FusechatError, match="corpus not found"):
        load_conversations(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(FusechatError, match="no usable conversations"):
        load_conversations(tmp_path / "empty.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(FusechatError, match="unsupported corpus format"):
        load_conversations(tmp_path / "x.csv")

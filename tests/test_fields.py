"""Shard fields are declared once (``fusechat.fields``): a name the package spells but does not
declare fails here; a writer or reader meeting an undeclared, missing or mistyped field stops
with one line naming the shard."""

import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

from fusechat.errors import FusechatError
from fusechat.fields import KINDS, check_fields, names
from fusechat.io import write_atomic
from fusechat.shards import (
    StageReader,
    begin_stage,
    digest,
    finish_stage,
    pack_rows,
    save_shard,
    shard_name,
)

ROOT = Path(__file__).resolve().parents[1]


def _align_row(n: int = 3, k: int = 2) -> dict:
    return {
        "pos.ids": np.zeros((n, k), np.uint16),
        "pos.probs": np.full((n, k), 0.5, np.float16),
        "pos.valid": np.ones(n, bool),
        "row.index": np.int64(0),
        "row.nll_sum": np.float64(1.0),
        "row.n_tokens": np.int64(n),
        "row.n_chars": np.int64(2 * n),
    }


def test_every_field_the_package_spells_is_declared():
    literal = re.compile(r"""["']((?:pos|row)\.[A-Za-z_]+)["']""")
    spelled = {
        (m.group(1), str(p.relative_to(ROOT)))
        for folder in ("fusechat", "merge", "eval")
        for p in (ROOT / folder).rglob("*.py")
        for m in literal.finditer(p.read_text())
    }
    assert len({n for n, _ in spelled}) >= 20  # the scan sees the stages' fields
    assert sorted((n, p) for n, p in spelled if n not in names()) == []


def test_a_misspelled_field_is_refused_when_written(tmp_path):
    row = _align_row()
    row["pos.prob"] = row.pop("pos.probs")
    with pytest.raises(FusechatError, match=r"shard-00000.safetensors: pos.prob not a field of"):
        save_shard(tmp_path, 0, [row], "align")
    assert not (tmp_path / shard_name(0)).exists()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r.pop("pos.valid"), r"align shard without pos.valid"),
        (
            lambda r: r.update({"pos.probs": r["pos.probs"].astype(np.float32)}),
            r"pos.probs is float32",
        ),
        (lambda r: r.update({"pos.valid": np.ones((3, 1), bool)}), r"pos.valid is bool with 2 dim"),
        (
            lambda r: r.update({"pos.topk_ids": np.zeros((3, 2), np.uint16)}),
            r"pos.topk_ids not a field",
        ),
    ],
    ids=["missing", "dtype", "rank", "another kind's"],
)
def test_a_shard_that_breaks_its_declaration_is_refused(tmp_path, edit, message):
    row = _align_row()
    edit(row)
    with pytest.raises(FusechatError, match=message):
        save_shard(tmp_path, 0, [row], "align")


def test_optional_fields_and_empty_shards_pass():
    row = _align_row()
    check_fields("align", pack_rows([row]), "x")
    check_fields(
        "align", pack_rows([{**row, "pos.branch_ids": np.zeros((3, 2, 2), np.int32)}]), "x"
    )
    check_fields("fuse", pack_rows([]), "x")  # every row of its range dropped
    with pytest.raises(FusechatError, match="unknown shard kind 'alignn'"):
        check_fields("alignn", pack_rows([row]), "x")


def test_a_reader_refuses_a_field_its_kind_does_not_declare(tmp_path):
    """Bytes written past the writer's check (another tool, an older fusechat) are refused when
    read, with their checksums intact: the declaration, not the checksum, catches them."""
    key = {"stage": "align", "version": 0}
    begin_stage(tmp_path, key)
    arrays = pack_rows([_align_row()])
    arrays["pos.extra"] = np.zeros(3, np.float32)
    data = save(arrays)
    write_atomic(tmp_path / shard_name(0), data)
    finish_stage(tmp_path, key, 1, {}, {0: digest(data)})
    with pytest.raises(
        FusechatError, match=r"shard-00000.safetensors: pos.extra not a field of align"
    ):
        StageReader(tmp_path, "align").shard(0)


def test_every_kind_declares_a_per_position_field():
    """pack_rows cuts rows by their first ``pos.*`` array: a kind without one could not be read."""
    for kind, fields in KINDS.items():
        assert any(n.startswith("pos.") and not f.optional for n, f in fields.items()), kind

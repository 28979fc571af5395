"""The sharded on-disk format (``fusechat.shards``) and its runner (``fusechat.sharding``) on
small hand-made rows: id packing at the uint16 boundary, rows packed flat and back, non-finite
numbers refused naming the row, checksums that decide what a resume keeps, the manifest, and
shards spread over processes and launcher ranks. No models, no toy world."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import operator
import os

import numpy as np
import pytest
from safetensors.numpy import save

from fusechat import sharding, shards
from fusechat.errors import FusechatError
from fusechat.estimate import id_bytes
from fusechat.io import write_atomic
from fusechat.ranks import Ranks
from fusechat.sharding import map_shards, run_sharded
from fusechat.shards import (
    StageReader,
    _kept_digest,
    begin_stage,
    check_finite,
    finish_stage,
    ids_dtype,
    pack_ids,
    pack_rows,
    save_shard,
    unpack_ids,
    unpack_rows,
)

KEY = {"stage": "align", "version": 1}


def _b2(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _row(index: int, n: int, k: int = 2) -> dict:
    """An align row of ``n`` positions, k wide, whose values tell it apart from the others."""
    return {
        "pos.ids": (np.arange(n * k).reshape(n, k) + 10 * index).astype(np.uint16),
        "pos.probs": np.full((n, k), 0.25 * (index + 1), np.float16),
        "pos.valid": np.arange(n) % 2 == 0,
        "row.index": np.int64(index),
        "row.nll_sum": np.float64(index + 0.5),
        "row.n_tokens": np.int64(n),
        "row.n_chars": np.int64(3 * n),
    }


def _same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), k


# --------------------------------------------------------------------------- ids


@pytest.mark.parametrize(
    "vocab, dtype",
    [(2, np.uint16), (65534, np.uint16), (65535, np.int32), (65536, np.int32), (10**6, np.int32)],
)
def test_ids_dtype_keeps_the_uint16_padding_value_free(vocab, dtype):
    """uint16 only below 65535 ids (65535 is padding), as the dry run's byte estimate says."""
    assert ids_dtype(vocab) == np.dtype(dtype)
    assert ids_dtype(vocab).itemsize == id_bytes(vocab)


@pytest.mark.parametrize(
    "dtype, big", [(np.uint16, 65534), (np.int32, 65535), (np.int32, 2**31 - 1)]
)
def test_ids_round_trip_with_padding(dtype, big):
    """Ids 0..big and -1 padding round-trip; 65535 is padding in uint16 only, an id in int32."""
    ids = np.array([[0, -1, big], [-1, 7, 0]], np.int64)
    packed = pack_ids(ids, np.dtype(dtype))
    assert packed.dtype == dtype
    on_disk = [[0, 65535, 65534], [65535, 7, 0]] if dtype == np.uint16 else ids.tolist()
    assert packed.tolist() == on_disk
    back = unpack_ids(packed)
    assert back.dtype == np.int64 and back.tolist() == ids.tolist()


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_a_negative_id_never_comes_back_as_a_real_id(dtype):
    """Any negative id stays out of the vocabulary after packing (never wraps to 65534)."""
    back = unpack_ids(pack_ids(np.array([-2, -1, 3], np.int64), np.dtype(dtype)))
    assert (back[:2] < 0).all() and back[2] == 3


# --------------------------------------------------------------------------- rows


def test_rows_of_different_lengths_pack_flat_and_back():
    """pos.* arrays concatenate, row.* stack (trailing dims kept), row.splits are int64 offsets."""
    rows = [
        {
            "pos.ids": np.array([[1, 2], [3, 4]], np.int32),
            "pos.valid": np.array([True, False]),
            "row.index": np.int64(7),
            "row.weights": np.array([0.5, 0.5], np.float32),
        },
        {
            "pos.ids": np.zeros((0, 2), np.int32),
            "pos.valid": np.zeros(0, bool),
            "row.index": np.int64(8),
            "row.weights": np.array([1.0, 0.0], np.float32),
        },
        {
            "pos.ids": np.array([[5, 6], [7, 8], [9, 10]], np.int32),
            "pos.valid": np.array([True, True, False]),
            "row.index": np.int64(9),
            "row.weights": np.array([0.25, 0.75], np.float32),
        },
    ]
    packed = pack_rows(rows)
    _same(
        packed,
        {
            "row.splits": np.array([0, 2, 2, 5], np.int64),
            "pos.ids": np.array([[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]], np.int32),
            "pos.valid": np.array([True, False, True, True, False]),
            "row.index": np.array([7, 8, 9], np.int64),
            "row.weights": np.array([[0.5, 0.5], [1.0, 0.0], [0.25, 0.75]], np.float32),
        },
    )
    back = unpack_rows(packed)
    assert len(back) == 3
    for got, want in zip(back, rows, strict=True):
        _same(got, {k: np.asarray(v) for k, v in want.items()})


def test_an_empty_shard_holds_only_its_splits_and_reads_back_empty(tmp_path):
    """A shard whose rows were all dropped is written, read and counted as zero rows."""
    packed = pack_rows([])
    _same(packed, {"row.splits": np.zeros(1, np.int64)})
    assert unpack_rows(packed) == []
    begin_stage(tmp_path, KEY)
    save_shard(tmp_path, 0, [], "align")
    save_shard(tmp_path, 1, [_row(0, 2)], "align")
    finish_stage(tmp_path, KEY, 2, {})
    reader = StageReader(tmp_path, "align")
    assert reader.shard(0) == []
    _same(reader.shard(1)[0], _row(0, 2))


# --------------------------------------------------------------------------- non-finite


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_finite_names_the_row_of_a_bad_position(dtype, bad):
    """A NaN/inf at the first position of row 2 (row 1 empty) is reported as row 2."""
    probs = np.ones((5, 2), dtype)
    probs[2, 1] = bad  # rows of 2, 0 and 3 positions: position 2 opens row 2
    arrays = {"row.splits": np.array([0, 2, 2, 5], np.int64), "pos.probs": probs}
    with pytest.raises(FusechatError, match=r"^here: row 2: non-finite values in pos.probs$"):
        check_finite(arrays, "here")


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_check_finite_names_the_row_of_a_bad_row_field(dtype):
    """The first row with a non-finite row.* entry (trailing dims) is the one reported."""
    weights = np.ones((3, 2), dtype)
    weights[1, 0] = weights[2, 1] = np.nan
    arrays = {"row.splits": np.array([0, 1, 2, 3], np.int64), "row.weights": weights}
    with pytest.raises(FusechatError, match=r"^here: row 1: non-finite values in row.weights$"):
        check_finite(arrays, "here")


def test_check_finite_accepts_integer_bool_and_finite_float_arrays():
    """Ids (with their padding), flags, counts and finite floats pass."""
    check_finite(
        {
            "row.splits": np.array([0, 2], np.int64),
            "pos.ids": np.array([[65535, 0], [3, 65535]], np.uint16),
            "pos.target_ids": np.array([[-1, 2], [3, -1]], np.int32),
            "pos.valid": np.array([True, False]),
            "pos.probs": np.array([[0.0, 1.0], [65504.0, -65504.0]], np.float16),
            "row.index": np.array([2**62], np.int64),
        },
        "x",
    )


def test_a_non_finite_row_is_refused_when_written_naming_the_shard(tmp_path):
    """save_shard refuses a NaN probability with the shard's path and the row, writing nothing."""
    bad = _row(1, 3)
    bad["pos.probs"][1, 0] = np.nan
    with pytest.raises(
        FusechatError,
        match=r"^/.*/shard-00004\.safetensors: row 1: non-finite values in pos\.probs$",
    ):
        save_shard(tmp_path, 4, [_row(0, 2), bad], "align")
    assert list(tmp_path.iterdir()) == []


def test_a_non_finite_row_is_refused_when_read_naming_the_shard(tmp_path):
    """Bytes with an inf written past the writer (checksums intact) are refused when read."""
    arrays = pack_rows([_row(0, 2), _row(1, 1)])
    arrays["row.nll_sum"][1] = np.inf
    data = save(arrays)
    begin_stage(tmp_path, KEY)
    write_atomic(tmp_path / "shard-00000.safetensors", data)
    finish_stage(tmp_path, KEY, 1, {}, {0: _b2(data)})
    with pytest.raises(
        FusechatError,
        match=r"^/.*/shard-00000\.safetensors: row 1: non-finite values in row\.nll_sum$",
    ):
        StageReader(tmp_path, "align").shard(0)


# --------------------------------------------------------------------------- checksums, resume


def test_a_shard_is_kept_only_while_its_bytes_match_its_checksum(tmp_path):
    """save_shard's checksum is the file's BLAKE2b; a changed byte or a lost checksum is None."""
    path = tmp_path / "shard-00000.safetensors"
    sums = save_shard(tmp_path, 0, [_row(0, 3)], "align")
    assert sums == _b2(path.read_bytes())
    assert _kept_digest(path) == sums
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same length, last byte changed
    assert _kept_digest(path) is None
    path.write_bytes(data)
    assert _kept_digest(path) == sums
    (tmp_path / ".shard-00000.safetensors.b2").unlink()
    assert _kept_digest(path) is None
    assert _kept_digest(tmp_path / "shard-00001.safetensors") is None


def test_a_resume_keeps_matching_shards_and_redoes_a_changed_one(tmp_path):
    """begin_stage on a partial folder returns the intact shards' checksums, deletes the other."""
    assert begin_stage(tmp_path, KEY) == {}
    sums = [save_shard(tmp_path, i, [_row(i, i + 1)], "align") for i in range(3)]
    changed = tmp_path / "shard-00001.safetensors"
    data = changed.read_bytes()
    changed.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert begin_stage(tmp_path, KEY) == {0: sums[0], 2: sums[2]}
    assert not changed.exists()


def test_finish_stage_writes_the_manifest_and_drops_the_checksum_files(tmp_path):
    """The manifest holds the key, shard count, stats, each shard's checksum and its own digest."""
    begin_stage(tmp_path, KEY)
    save_shard(tmp_path, 0, [_row(0, 2), _row(1, 3)], "align")
    save_shard(tmp_path, 1, [], "align")
    stats = {"rows": 2, "mean": 0.5}
    manifest = finish_stage(tmp_path, KEY, 2, stats)
    checksums = {
        f"shard-0000{i}.safetensors": _b2((tmp_path / f"shard-0000{i}.safetensors").read_bytes())
        for i in range(2)
    }
    body = {"key": KEY, "shards": 2, "stats": stats, "checksums": checksums}
    want = {**body, "digest": _b2(json.dumps(body, sort_keys=True).encode())}
    assert manifest == want
    assert json.loads((tmp_path / "manifest.json").read_text()) == want
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "manifest.json",
        "shard-00000.safetensors",
        "shard-00001.safetensors",
        "stage.json",
    ]
    assert StageReader(tmp_path, "align").n_shards == 2


def test_finish_stage_trusts_known_checksums_and_refuses_an_unverified_shard(tmp_path):
    """A shard without a checksum file is taken from ``known``; without it, it is an error."""
    begin_stage(tmp_path, KEY)
    data = save(pack_rows([_row(0, 2)]))
    write_atomic(tmp_path / "shard-00000.safetensors", data)  # no checksum file beside it
    sums1 = save_shard(tmp_path, 1, [_row(1, 1)], "align")
    with pytest.raises(FusechatError, match=r"shard-00000.safetensors: missing or changed"):
        finish_stage(tmp_path, KEY, 2, {})
    with pytest.raises(FusechatError, match=r"shard-00002.safetensors: missing or changed"):
        finish_stage(tmp_path, KEY, 3, {}, {0: _b2(data)})
    manifest = finish_stage(tmp_path, KEY, 2, {}, {0: _b2(data)})
    assert manifest["checksums"] == {
        "shard-00000.safetensors": _b2(data),
        "shard-00001.safetensors": sums1,
    }


# --------------------------------------------------------------------------- map_shards


def _task(state: dict, i: int) -> tuple:
    return state["base"] + i, os.getpid()


def test_map_shards_runs_in_this_process_by_default_in_the_given_order():
    """One worker by default: task(state, i) here, results in the order of ``shards``."""
    got = map_shards([2, 0, 1], lambda s, i: (s, i, os.getpid()), "st")
    assert got == [("st", 2, os.getpid()), ("st", 0, os.getpid()), ("st", 1, os.getpid())]


def test_a_single_shard_runs_in_this_process_even_with_workers():
    """No pool for one shard: an unpicklable task works and runs here."""
    assert map_shards([5], lambda s, i: (s + i, os.getpid()), 1, workers=2) == [(6, os.getpid())]


@pytest.mark.parametrize("order", [[1, 0], [3, 0, 2, 1]])
def test_forked_workers_see_the_state_and_return_in_shard_order(order, monkeypatch):
    """workers=2 (fork) gives workers=1's results in shard order, computed in other processes."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    state = {"base": 100}
    one = map_shards(order, _task, state, workers=1)
    two = map_shards(order, _task, state, workers=2)
    assert [r for r, _ in one] == [r for r, _ in two] == [100 + i for i in order]
    assert all(pid != os.getpid() for _, pid in two)
    assert sharding._WORKER_STATE is None  # not kept once the shards are done
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"


def test_spawned_workers_need_and_use_rebuild(monkeypatch):
    """Where the platform cannot fork, rebuild=(setup, job) is required; setup(job) is the state."""
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    with pytest.raises(ValueError, match="rebuild"):
        map_shards([0, 1], operator.getitem, ["a", "b"], workers=2)
    got = map_shards([2, 0], operator.getitem, None, workers=2, rebuild=(sorted, ("b", "c", "a")))
    assert got == ["c", "a"]  # from the state sorted(job) = [a, b, c], not from job


def test_map_shards_progress_bar(capsys):
    """A bar counting shards n/n, labelled with ``desc``, unlabelled by default, none for None."""
    map_shards([0, 1, 2], lambda s, i: i, None, desc="aligning")
    err = capsys.readouterr().err
    assert "aligning: 100%" in err and "3/3" in err
    map_shards([0, 1, 2], lambda s, i: i, None)
    err = capsys.readouterr().err
    assert err.split("\r")[-1].lstrip().startswith("100%|") and "3/3" in err
    map_shards([0, 1, 2], lambda s, i: i, None, desc=None)
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- run_sharded


class _Stage:
    """A tiny align stage: shard i holds one row of i + 1 positions; records what ran."""

    def __init__(self, folder, fail_at: int | None = None):
        self.folder, self.fail_at = folder, fail_at
        self.started: list[frozenset] = []
        self.ran: list[int] = []

    def start(self, done):
        self.started.append(done)
        return done, None

    def task(self, done, i):
        self.ran.append(i)
        if i == self.fail_at:
            raise RuntimeError("killed")
        if i in done:
            return i, None
        return i, save_shard(self.folder, i, [_row(i, i + 1)], "align")

    def run(self, n: int = 3, ranks: Ranks | None = None):
        return run_sharded(
            self.folder, KEY, n, self.start, self.task, lambda rs: {"results": rs}, ranks=ranks
        )


def _checksums(folder, n):
    return {
        f"shard-{i:05d}.safetensors": _b2((folder / f"shard-{i:05d}.safetensors").read_bytes())
        for i in range(n)
    }


def test_run_sharded_reuses_a_finished_folder_without_running_the_task(tmp_path):
    """A second run with the same key returns the manifest; neither start nor task is called."""
    first = _Stage(tmp_path)
    manifest = first.run()
    assert first.started == [frozenset()] and first.ran == [0, 1, 2]
    assert manifest["stats"] == {"results": [0, 1, 2]}
    assert manifest["shards"] == 3 and manifest["checksums"] == _checksums(tmp_path, 3)
    again = _Stage(tmp_path, fail_at=0)
    assert again.run() == manifest
    assert again.started == [] and again.ran == []


def test_run_sharded_resumes_only_the_missing_and_changed_shards(tmp_path, monkeypatch):
    """After a kill, start gets the intact shards (each hashed once); a changed one is redone."""
    hashed = []
    monkeypatch.setattr(
        shards, "file_digest", lambda p: hashed.append(p.name) or _b2(p.read_bytes())
    )
    killed = _Stage(tmp_path, fail_at=3)
    with pytest.raises(RuntimeError, match="killed"):
        killed.run(n=4)
    kept = (tmp_path / "shard-00002.safetensors").read_bytes()
    changed = tmp_path / "shard-00001.safetensors"
    data = changed.read_bytes()
    changed.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    resumed = _Stage(tmp_path)
    manifest = resumed.run(n=4)
    assert resumed.started == [frozenset({0, 2})]
    assert sorted(hashed) == [f"shard-0000{i}.safetensors" for i in range(3)]  # by begin_stage
    assert (tmp_path / "shard-00002.safetensors").read_bytes() == kept
    assert changed.read_bytes() == data  # written again, whole
    assert manifest["checksums"] == _checksums(tmp_path, 4)
    assert manifest["stats"] == {"results": [0, 1, 2, 3]}
    assert StageReader(tmp_path, "align").n_shards == 4


def test_launcher_ranks_share_out_the_missing_shards(tmp_path):
    """Each of 2 ranks writes every 2nd missing shard; rank 0's manifest covers all of them."""
    begin_stage(tmp_path, KEY)
    save_shard(tmp_path, 0, [_row(0, 1)], "align")  # from a killed run
    other = _Stage(tmp_path)
    outcome = []

    class _Ranks(Ranks):
        def barrier(self):  # rank 0 has prepared the folder: rank 1 runs now, up to the manifest
            if self.rank == 0 and not outcome:
                outcome.append(other.run(n=4, ranks=_Ranks(1, 2)))

    mine = _Stage(tmp_path)
    manifest = mine.run(n=4, ranks=_Ranks(0, 2))
    assert other.started == [frozenset({0})] and other.ran == [2]
    assert mine.started == [frozenset({0})] and mine.ran == [1, 3]
    assert outcome == [None]  # rank 1 returned before rank 0 wrote the manifest
    assert manifest["checksums"] == _checksums(tmp_path, 4)
    assert manifest["stats"] == {"results": [1, 3]}


def test_run_sharded_labels_its_progress_and_logs_a_reused_stage(tmp_path, capsys, caplog):
    """The stage's progress bar carries its label; a reused stage says so, naming the folder
    and the stage, in one log line."""
    import logging

    stage = _Stage(tmp_path)
    run_sharded(tmp_path, KEY, 2, stage.start, stage.task, lambda rs: {}, desc="align toy-src")
    err = capsys.readouterr().err
    assert "align toy-src" in err and "2/2" in err
    with caplog.at_level(logging.INFO, logger="fusechat.sharding"):
        run_sharded(tmp_path, KEY, 2, stage.start, stage.task, lambda rs: {})
    assert f"{tmp_path}: {KEY['stage']} already complete" in caplog.messages


def test_run_sharded_refuses_other_settings_unless_overwrite(tmp_path, capsys):
    """A folder of the same stage made with other settings is refused by default (nothing
    runs, nothing is cleared) and redone with overwrite; the default bar carries no label."""
    from fusechat.errors import FusechatError

    _Stage(tmp_path).run(n=2)
    capsys.readouterr()
    other = {**KEY, "k": 1}
    stage = _Stage(tmp_path)
    with pytest.raises(FusechatError, match=r"made with other settings \(k\)"):
        run_sharded(tmp_path, other, 2, stage.start, stage.task, lambda rs: {})
    assert stage.ran == [] and (tmp_path / "shard-00001.safetensors").exists()
    m = run_sharded(tmp_path, other, 2, stage.start, stage.task, lambda rs: {}, overwrite=True)
    assert stage.started == [frozenset()] and stage.ran == [0, 1] and m["key"] == other
    last = capsys.readouterr().err.strip().split("\r")[-1]
    assert last.startswith("100%|") and "2/2" in last


def test_other_ranks_read_the_prepared_folder_without_verifying_it(tmp_path, monkeypatch):
    """Rank 0 verifies the kept shards' checksums once; the other ranks only list them."""
    begin_stage(tmp_path, KEY)
    save_shard(tmp_path, 0, [_row(0, 1)], "align")  # from a killed run
    hashed: list[str] = []
    monkeypatch.setattr(
        shards, "file_digest", lambda p: hashed.append(p.name) or _b2(p.read_bytes())
    )
    rank1 = _Stage(tmp_path)
    assert rank1.run(n=3, ranks=_NoBarrier(1, 2)) is None  # no manifest yet: rank 0 writes it
    assert rank1.started == [frozenset({0})] and rank1.ran == [2] and hashed == []


class _NoBarrier(Ranks):
    def barrier(self):  # the other rank is elsewhere: nothing to wait for in this test
        pass

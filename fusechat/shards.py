"""Sharded row stores: the on-disk format of every fusion stage (capture, align, fuse).

A stage folder holds ``shard-00000.safetensors``, ... and, once complete, ``manifest.json``.
Each shard packs a run of rows flat: arrays named ``pos.*`` concatenate the rows' per-position
arrays along the first axis, ``row.*`` hold one entry per row, and ``row.splits`` (n_rows + 1
offsets) cuts the positions back into rows. Shards are written whole (temporary name, rename),
so a killed stage resumes at the first missing shard, and ``stage.json`` records the settings a
partial folder was made with, so a resume never mixes two configurations.

Token ids are stored as ``uint16`` when the vocabulary fits (65535 marks padding, -1 in memory)
and ``int32`` otherwise: a top-10 distribution then costs 4 bytes per (position, k) on disk.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from fusechat.errors import FusechatError
from fusechat.io import MANIFEST, read_json, read_manifest, write_json

log = logging.getLogger(__name__)

STAGE = "stage.json"
_U16_PAD = np.iinfo(np.uint16).max
Row = dict[str, Any]


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def ids_dtype(vocab_size: int) -> np.dtype:
    """The smallest dtype that holds every id of the vocabulary plus a padding value."""
    return np.dtype(np.uint16) if vocab_size < _U16_PAD else np.dtype(np.int32)


def pack_ids(ids: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """In-memory ids (-1 = padding) to their on-disk dtype."""
    if dtype == np.uint16:
        return np.where(ids < 0, _U16_PAD, ids).astype(np.uint16)
    return ids.astype(np.int32)


def unpack_ids(ids: np.ndarray) -> np.ndarray:
    """On-disk ids back to int64 with -1 for padding."""
    out = ids.astype(np.int64)
    if ids.dtype == np.uint16:
        out[ids == _U16_PAD] = -1
    return out


def pack_rows(rows: Sequence[Row]) -> dict[str, np.ndarray]:
    """Rows (dicts of ``pos.*`` arrays and ``row.*`` scalars or arrays) -> one flat shard.
    A shard may be empty (every row of its range dropped): it keeps the numbering aligned."""
    if not rows:
        return {"row.splits": np.zeros(1, np.int64)}
    keys = sorted(rows[0])
    lengths = [len(r[next(k for k in keys if k.startswith("pos."))]) for r in rows]
    out = {"row.splits": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)}
    for k in keys:
        parts = [np.asarray(r[k]) for r in rows]
        out[k] = np.concatenate(parts) if k.startswith("pos.") else np.stack(parts)
    return out


def unpack_rows(arrays: dict[str, np.ndarray]) -> list[Row]:
    """The inverse of ``pack_rows``."""
    splits = arrays["row.splits"]
    rows = []
    for i in range(len(splits) - 1):
        a, b = int(splits[i]), int(splits[i + 1])
        rows.append(
            {
                k: (v[a:b] if k.startswith("pos.") else v[i])
                for k, v in arrays.items()
                if k != "row.splits"
            }
        )
    return rows


def save_shard(folder: Path, i: int, rows: Sequence[Row]) -> None:
    path = folder / shard_name(i)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(pack_rows(rows), str(tmp))
    os.replace(tmp, path)


# --------------------------------------------------------------------------- writing a stage


def begin_stage(folder: str | os.PathLike, key: dict, overwrite: bool = False) -> set[int] | None:
    """Prepare ``folder`` for a stage with settings ``key``.

    Returns None when the stage is already complete with these settings, else the indices of
    shards already written (resume). A folder made with other settings is an error unless
    ``overwrite``, in which case its shards are removed.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is not None and manifest.get("key") == key:
        return None
    stage = folder / STAGE
    if stage.exists() or manifest is not None:
        old = read_json(stage) if stage.exists() else manifest.get("key")
        if old != key:
            if not overwrite:
                diff = sorted(k for k in {**old, **key} if old.get(k) != key.get(k))
                raise FusechatError(
                    f"{folder}: holds a {old.get('stage', 'stage')} output made with other "
                    f"settings ({', '.join(diff)}); use --overwrite or another folder"
                )
            for p in folder.glob("shard-*.safetensors"):
                p.unlink()
            (folder / MANIFEST).unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(stage, key)
    done = {int(p.name[6:11]) for p in folder.glob("shard-*.safetensors")}
    if done:
        log.info("%s: resuming, %d shards already written", folder, len(done))
    return done


def finish_stage(folder: str | os.PathLike, key: dict, n_shards: int, stats: dict) -> dict:
    """Write the manifest that marks the stage complete."""
    manifest = {"key": key, "shards": n_shards, "stats": stats}
    write_json(Path(folder) / MANIFEST, manifest)
    return manifest


# --------------------------------------------------------------------------- reading a stage


class StageReader:
    """A complete stage folder: its manifest and its rows, shard by shard."""

    def __init__(self, folder: str | os.PathLike, stage: str):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FusechatError(f"{self.folder}: no such {stage} folder")
        manifest = read_manifest(self.folder)
        if manifest is None:
            what = "incomplete" if (self.folder / STAGE).exists() else "not"
            raise FusechatError(
                f"{self.folder}: {what} a finished {stage} output (no {MANIFEST}); "
                f"run fusechat {stage} to complete it"
            )
        if manifest.get("key", {}).get("stage") != stage:
            got = manifest.get("key", {}).get("stage", "unknown")
            raise FusechatError(f"{self.folder}: is a {got} output, expected {stage}")
        self.manifest: dict = manifest
        self.key: dict = manifest["key"]
        self.n_shards: int = manifest["shards"]

    def shard(self, i: int) -> list[Row]:
        path = self.folder / shard_name(i)
        if not path.exists():
            raise FusechatError(f"{path}: shard missing ({self.n_shards} expected)")
        try:
            return unpack_rows(load_file(str(path)))
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            raise FusechatError(f"{path}: corrupt shard ({e})") from None

    def shards(self) -> Iterator[tuple[int, list[Row]]]:
        for i in range(self.n_shards):
            yield i, self.shard(i)

    def check_complete(self) -> None:
        """Fail before any work when a shard is missing."""
        for i in range(self.n_shards):
            if not (self.folder / shard_name(i)).exists():
                raise FusechatError(
                    f"{self.folder / shard_name(i)}: shard missing ({self.n_shards} expected)"
                )

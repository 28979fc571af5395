"""Sharded row stores: the on-disk format of every fusion stage (capture, align, fuse).

A stage folder holds ``shard-00000.safetensors``, ... and, once complete, ``manifest.json``.
Each shard packs a run of rows flat: arrays named ``pos.*`` concatenate the rows' per-position
arrays along the first axis, ``row.*`` hold one entry per row, and ``row.splits`` (n_rows + 1
offsets) cuts the positions back into rows. Shards are written whole (temporary name, rename),
so a killed stage resumes at the first missing shard, and ``stage.json`` records the settings a
partial folder was made with, so a resume never mixes two configurations. The manifest holds
each shard's BLAKE2b digest and one of its own content: overwritten bytes inside a shard, or a
hand-edited manifest, are an error when the next stage reads them, never a silent change. A
non-finite number in a distribution is refused when written (naming the row) and when read.

Token ids are stored as ``uint16`` when the vocabulary fits (65535 marks padding, -1 in memory)
and ``int32`` otherwise: a top-10 distribution then costs 4 bytes per (position, k) on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

from fusechat.errors import FusechatError
from fusechat.fields import check_fields
from fusechat.io import MANIFEST, check_apart, read_json, read_manifest, write_atomic, write_json

log = logging.getLogger(__name__)

STAGE = "stage.json"
_U16_PAD = np.iinfo(np.uint16).max
Row = dict[str, Any]


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def ids_dtype(vocab_size: int) -> np.dtype:
    """uint16 for a vocabulary below 65,535 ids (65535 stays free for padding; what
    ``estimate.id_bytes`` counts), else int32."""
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


def digest(data: bytes) -> str:
    """A fast content checksum (BLAKE2b, 16 bytes: about 1 GB/s on one core)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def file_digest(path: Path) -> str:
    """``digest`` of a file's bytes, read in chunks (a shard need not fit in memory)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def check_finite(arrays: dict[str, np.ndarray], where: str) -> None:
    """Every float array finite, else an error naming ``where`` and the first bad row."""
    for k, v in arrays.items():
        if v.dtype.kind == "f" and not np.isfinite(v).all():
            bad = int(np.flatnonzero(~np.isfinite(v.reshape(len(v), -1)).all(1))[0])
            if k.startswith("pos."):
                bad = int(np.searchsorted(arrays["row.splits"], bad, side="right")) - 1
            raise FusechatError(f"{where}: row {bad}: non-finite values in {k}")


def _sum_path(path: Path) -> Path:
    """Where a shard's checksum is kept from its writing until the manifest takes it over."""
    return path.with_name(f".{path.name}.b2")


def save_shard(folder: Path, i: int, rows: Sequence[Row], kind: str) -> str:
    """Write shard ``i`` of a ``kind`` stage (its fields: ``fusechat.fields``) whole
    (temporary name, rename), then its checksum beside it: a resume keeps a shard only when
    the two agree. Returns the checksum."""
    path = folder / shard_name(i)
    arrays = pack_rows(rows)
    check_fields(kind, arrays, str(path))
    check_finite(arrays, str(path))
    data = save(arrays)
    write_atomic(path, data)  # a full disk's error names the shard
    sums = digest(data)
    write_atomic(_sum_path(path), sums)
    return sums


def _kept_digest(path: Path) -> str | None:
    """A written shard's checksum when the shard still matches it, else None (damaged,
    truncated, or written without one: a kill between the shard and its checksum)."""
    try:
        want = _sum_path(path).read_text().strip()
        return want if file_digest(path) == want else None
    except OSError:
        return None


# --------------------------------------------------------------------------- writing a stage

# what a stage folder may hold: anything else means the folder is not (only) a stage output
_STAGE_FILE = re.compile(
    r"^(\.?shard-\d{5}\.safetensors(\.b2|\.tmp)?|\.?(stage|manifest)\.json(\.tmp)?)$"
)


def _previous(folder: Path) -> tuple[str, Any]:
    """What ``folder`` holds: ("new", None) empty or absent; ("stage", key) a finished or
    partial stage output; ("damaged", why) a stage folder whose record cannot be read;
    ("foreign", name) anything else (a model, a user's files)."""
    if not folder.exists():
        return "new", None
    if not folder.is_dir():
        return "foreign", folder.name
    names = [p.name for p in folder.iterdir()]
    if not names:
        return "new", None
    stray = next((n for n in sorted(names) if not _STAGE_FILE.match(n)), None)
    manifest = read_manifest(folder)
    if (folder / STAGE).exists():
        try:
            old = read_json(folder / STAGE)
        except (OSError, ValueError) as e:
            return ("foreign", stray) if stray else ("damaged", f"{STAGE}: {e}")
    elif isinstance(manifest, dict) and isinstance(manifest.get("key"), dict):
        old = manifest["key"]
    else:
        return "foreign", stray or MANIFEST
    if not isinstance(old, dict) or not isinstance(old.get("stage"), str):
        return ("foreign", stray) if stray else ("damaged", f"{STAGE}: not a stage record")
    return ("foreign", stray) if stray else ("stage", old)


def _clear(folder: Path) -> None:
    for p in folder.iterdir():
        if _STAGE_FILE.match(p.name):
            p.unlink()


def begin_stage(
    folder: str | os.PathLike,
    key: dict,
    overwrite: bool = False,
    prepared: bool = False,
    inputs: Sequence[str | os.PathLike | None] = (),
) -> dict[int, str | None] | None:
    """Prepare ``folder`` for a stage with settings ``key``.

    Returns None when the stage is already complete with these settings, else the shards
    already written and still matching their checksums, index -> checksum (resume; the others
    are redone; ``prepared`` gives indices only, checksum None). ``folder`` may not be, contain or lie inside one of ``inputs``. A folder made by
    the same stage with other settings is an error unless ``overwrite``, which clears it; a
    folder holding anything else (a model, another stage's output) is never written into.
    ``prepared``: another process of the same run has prepared it; only read what is there.
    """
    folder = Path(folder)
    stage = key["stage"]
    manifest = read_manifest(folder)
    if isinstance(manifest, dict) and manifest.get("key") == key:
        return None
    if prepared:
        return dict.fromkeys(int(p.name[6:11]) for p in folder.glob("shard-*.safetensors"))
    check_apart(folder, inputs)
    kind, old = _previous(folder)
    if kind == "foreign":
        raise FusechatError(f"{folder}: exists and is not a {stage} output (it holds {old}); "
                            "choose another folder")  # fmt: skip
    if kind == "damaged" and not overwrite:
        raise FusechatError(f"{folder}/{old}; use --overwrite to start this {stage} anew")
    if kind == "stage" and old.get("stage") != stage:
        raise FusechatError(f"{folder}: holds a {old['stage']} output, not a {stage} output; "
                            "choose another folder")  # fmt: skip
    if kind == "stage" and old != key and not overwrite:
        diff = sorted(k for k in {**old, **key} if old.get(k) != key.get(k))
        raise FusechatError(
            f"{folder}: holds a {stage} output made with other settings ({', '.join(diff)}); "
            "use --overwrite or another folder"
        )
    if kind == "damaged" or (kind == "stage" and old != key):
        _clear(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / STAGE, key)
    done = {}
    for p in sorted(folder.glob("shard-*.safetensors")):
        if (sums := _kept_digest(p)) is None:
            log.warning("%s: damaged or unverified shard, written again", p)
            p.unlink()
        else:
            done[int(p.name[6:11])] = sums
    if done:
        log.info("%s: resuming, %d shards already written", folder, len(done))
    return done


def _manifest_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return digest(json.dumps(body, sort_keys=True, default=str).encode())


def finish_stage(
    folder: str | os.PathLike,
    key: dict,
    n_shards: int,
    stats: dict,
    known: dict[int, str] | None = None,
) -> dict:
    """Write the manifest that marks the stage complete, with every shard's checksum: those
    this run wrote or verified on resume (``known``), the rest (other processes' shards) as
    recorded when written, checked against the bytes on disk."""
    folder = Path(folder)
    known = known or {}
    sums = {}
    for i in range(n_shards):
        path = folder / shard_name(i)
        sums[path.name] = known.get(i) or _kept_digest(path)
        if sums[path.name] is None:
            raise FusechatError(f"{path}: missing or changed since it was written; run the "
                                f"{key['stage']} again to redo it")  # fmt: skip
    manifest = {"key": key, "shards": n_shards, "stats": stats, "checksums": sums}
    manifest["digest"] = _manifest_digest(manifest)
    write_json(folder / MANIFEST, manifest)
    for i in range(n_shards):  # the manifest holds them now
        _sum_path(folder / shard_name(i)).unlink(missing_ok=True)
    return manifest


# --------------------------------------------------------------------------- reading a stage


class StageReader:
    """A complete stage folder: its manifest and its rows, shard by shard."""

    def __init__(self, folder: str | os.PathLike, stage: str):
        self.folder, self.stage = Path(folder), stage
        if not self.folder.is_dir():
            raise FusechatError(f"{self.folder}: no such {stage} folder")
        manifest = read_manifest(self.folder)
        if manifest is None:
            what = "incomplete" if (self.folder / STAGE).exists() else "not"
            raise FusechatError(
                f"{self.folder}: {what} a finished {stage} output (no {MANIFEST}); "
                f"run fusechat {stage} to complete it"
            )
        where = self.folder / MANIFEST
        if not isinstance(manifest, dict) or not isinstance(manifest.get("key"), dict):
            raise FusechatError(
                f"{self.folder}: not a {stage} output (its {MANIFEST} is not a stage's)"
            )
        if manifest.get("key", {}).get("stage") != stage:
            got = manifest.get("key", {}).get("stage", "unknown")
            raise FusechatError(f"{self.folder}: is a {got} output, expected {stage}")
        if "digest" not in manifest:
            raise FusechatError(
                f"{where}: written by an older fusechat (no checksums); run the {stage} again"
            )
        if manifest.get("digest") != _manifest_digest(manifest):
            raise FusechatError(f"{where}: edited or damaged (its digest does not match)")
        if not isinstance(manifest.get("shards"), int) or manifest["shards"] < 0:
            raise FusechatError(f"{where}: 'shards' must be a count")
        self.manifest: dict = manifest
        self.key: dict = manifest["key"]
        self.n_shards: int = manifest["shards"]
        self.checksums: dict = manifest.get("checksums") or {}

    def shard(self, i: int) -> list[Row]:
        path = self.folder / shard_name(i)
        if not path.exists():
            raise FusechatError(f"{path}: shard missing ({self.n_shards} expected)")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise FusechatError(f"{path}: unreadable shard ({e.strerror})") from None
        self._check_digest(path, digest(data))
        try:
            arrays = load(data)
        except (SafetensorError, ValueError) as e:
            raise FusechatError(f"{path}: corrupt shard ({e})") from None
        check_fields(self.stage, arrays, str(path))
        check_finite(arrays, str(path))
        try:
            return unpack_rows(arrays)
        except (KeyError, ValueError, IndexError) as e:
            raise FusechatError(f"{path}: corrupt shard ({e})") from None

    def shards(self) -> Iterator[tuple[int, list[Row]]]:
        for i in range(self.n_shards):
            yield i, self.shard(i)

    def verify(self) -> None:
        """Every shard present and matching its checksum, read in chunks (for readers that
        memory-map slices instead of loading shards whole)."""
        self.check_complete()
        for i in range(self.n_shards):
            path = self.folder / shard_name(i)
            self._check_digest(path, file_digest(path))

    def _check_digest(self, path: Path, got: str) -> None:
        if got != self.checksums.get(path.name):
            raise FusechatError(f"{path}: damaged shard (its checksum does not match the manifest)")

    def check_complete(self) -> None:
        """Fail before any work when a shard is missing."""
        for i in range(self.n_shards):
            if not (self.folder / shard_name(i)).exists():
                raise FusechatError(
                    f"{self.folder / shard_name(i)}: shard missing ({self.n_shards} expected)"
                )

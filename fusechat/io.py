"""Atomic writes, fingerprints and manifests: every artifact appears whole or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # a hub id, owner/name
CORPUS_SUFFIXES = (".jsonl", ".json", ".parquet")  # corpus files; never a hub id's ending


def cache_dir() -> Path:
    """Where slow artifacts are kept (the toy world, vocabulary maps, real checkpoints):
    ``$FUSECHAT_CACHE``, default ``~/.cache/fusechat``."""
    return Path(os.environ.get("FUSECHAT_CACHE", Path.home() / ".cache" / "fusechat"))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the OS picks it; a server binds it right after)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def looks_local(path: str | os.PathLike) -> bool:
    """Whether ``path`` can only mean a local file or folder, not a hub id: it starts at ``/``,
    ``.`` or ``~``, ends in a corpus file's suffix, has more parts than a hub id's owner/name,
    or its first part exists here (``data/missing.jsonl`` beside a ``data/`` folder)."""
    text = str(path)
    parts = Path(text).parts
    return (
        text.startswith(("/", ".", "~"))
        or text.lower().endswith(CORPUS_SUFFIXES)
        or len(parts) > 2
        or (len(parts) == 2 and Path(parts[0]).exists())
    )


def is_hub_id(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a hub repository (owner/name) rather than a local path
    (``looks_local``): what recipes and corpora may be looked up as."""
    return not Path(path).exists() and not looks_local(path) and bool(HUB_ID.match(str(path)))


def check_found(path: str | os.PathLike, what: str) -> None:
    """A missing local-looking ``path`` (``looks_local``) given as ``what`` (a flag or a field)
    is one line at once: sent to the hub it costs 25-50 s of retries, then blames the network."""
    from fusechat.errors import FusechatError

    if looks_local(path) and not Path(path).exists():
        raise FusechatError(f"{what}: {path}: not found")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder that is renamed to ``path`` only if the block succeeds.

    A leftover temporary folder from a killed run is discarded, never mistaken for output.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    except OSError as e:  # a full disk's error comes from write(), which names no file
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, e.filename or str(path)) from None
    os.replace(tmp, path)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-serialisable object (configs, keys)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def model_fingerprint(path: str) -> str:
    """Identity of a checkpoint: small files hashed whole, weight files by name, size and their
    first and last MiB (hashing a 90 GB Mixtral whole would take minutes); hub ids by name."""
    folder = Path(path)
    if not folder.is_dir():
        return fingerprint({"hub": path})
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file() and not q.name.startswith(".")):
        size = p.stat().st_size
        h.update(f"{p.relative_to(folder)}:{size}".encode())
        with open(p, "rb") as f:
            if size <= 64 << 20:
                h.update(f.read())
            else:
                h.update(f.read(1 << 20))
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """Identity of a vocabulary: every (token, id) pair; two tokenizers that tokenize alike
    but number tokens differently must not share captured ids."""
    return fingerprint(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]))


def corpus_fingerprint(convs: Sequence[Sequence[dict]]) -> str:
    """Identity of a parsed corpus: every message's role and content, in order."""
    h = hashlib.sha256()
    for c in convs:
        for m in c:
            h.update(f"{m['role']}\x00{m['content']}\x01".encode())
        h.update(b"\x02")
    return h.hexdigest()[:16]


def _files(path: Path) -> list[tuple[str, Path]]:
    """A file, or every file under a folder in path order, each with the name it is keyed by
    (its name, or its path relative to the folder)."""
    if not path.is_dir():
        return [(path.name, path)]
    return [(str(p.relative_to(path)), p) for p in sorted(path.rglob("*")) if p.is_file()]


def file_fingerprint(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (or of every file under a folder, in path order), 16 hex digits."""
    h = hashlib.sha256()
    for name, p in _files(Path(path)):
        h.update(name.encode())
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()[:16]


def check_apart(out: str | os.PathLike, inputs: Sequence[str | os.PathLike | None]) -> None:
    """An output that is, contains or lies inside one of its step's inputs is refused: writing
    or clearing it (``--overwrite``) would destroy what the step is about to read. Inputs that
    are not local paths (hub ids) cannot collide and are skipped."""
    from fusechat.errors import FusechatError

    o = Path(out).resolve()
    for given in inputs:
        if given is None or not Path(given).exists():
            continue
        p = Path(given).resolve()
        if o == p or o in p.parents or p in o.parents:
            how = "is" if o == p else ("contains" if o in p.parents else "lies inside")
            raise FusechatError(f"{out}: the output {how} the input {given}; choose another folder")


def stage_of(folder: str | os.PathLike) -> str | None:
    """The stage a finished output folder was made by (its manifest's ``key.stage``, or
    ``merge`` for a merge report); None when it has no such record."""
    m = read_manifest(folder)
    if not isinstance(m, dict):
        return None
    key = m.get("key")
    if isinstance(key, dict) and isinstance(key.get("stage"), str):
        return key["stage"]
    return "merge" if "merge" in m and "merge_method" in m else None


def read_manifest(out: str | os.PathLike) -> dict | None:
    """The record that marks an output complete: a folder's ``manifest.json``, or a JSON file
    output itself; None when it is missing or unreadable."""
    p = Path(out)
    p = p if p.suffix == ".json" else p / MANIFEST
    try:
        return read_json(p)
    except (OSError, json.JSONDecodeError):
        return None

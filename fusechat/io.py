"""Atomic writes, fingerprints and manifests: every artifact appears whole or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


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
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
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


def stat_fingerprint(path: str | os.PathLike) -> str | None:
    """A cheap content fingerprint of a local file or folder: every file's relative name, size
    and modification time (a rewritten checkpoint changes it without hashing gigabytes); None
    for what is not a local path (a hub id, whose name is its identity)."""
    path = Path(path)
    if not path.exists():
        return None
    return fingerprint([(n, p.stat().st_size, p.stat().st_mtime_ns) for n, p in _files(path)])


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The folder's manifest, or None when the folder or manifest is missing or unreadable."""
    p = Path(folder) / MANIFEST
    try:
        return read_json(p)
    except (OSError, json.JSONDecodeError):
        return None

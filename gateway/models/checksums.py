"""The sha256 of model files: computing it, checking it against the models file, and remembering it.

Hashing a model file of several GB takes seconds to minutes, so the result is kept in a ``<file>.sha256`` record
keyed by the file's size and mtime: a restart does not read big files again, and a present file that matches its
record is accepted without the network. Everything here is blocking file I/O or pure; the downloader runs the
hashing of whole files in a thread.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Protocol

from .errors import DownloadError
from .files import sidecar, write_atomic

_HASH_BLOCK = 4 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


class Hasher(Protocol):
    """What the downloader needs of a running hash (``hashlib.sha256()``): bytes in, hex digest out."""

    def update(self, data: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


def sha256_of(path: Path, limit: int | None = None) -> Hasher:
    """A sha256 object fed with the first ``limit`` bytes of ``path`` (all of it when None). Blocking."""
    digest = hashlib.sha256()
    remaining = limit
    with path.open("rb") as f:
        while remaining is None or remaining > 0:
            block = f.read(_HASH_BLOCK if remaining is None else min(_HASH_BLOCK, remaining))
            if not block:
                break
            digest.update(block)
            if remaining is not None:
                remaining -= len(block)
    return digest


def normalise_sha256(value: str | None, file: str) -> str | None:
    """The expected hash in lower-case hex; accepts a ``sha256:`` prefix. Raises for anything else."""
    if value is None:
        return None
    text = value.strip().lower().removeprefix("sha256:")
    if not _SHA256.fullmatch(text):
        raise DownloadError(
            f"Model file {file!r}: sha256 = {value!r} in the models file is not 64 hexadecimal digits. "
            "Fix it (sha256sum prints the right value), or remove it to skip the check.",
            file=file,
        )
    return text


def check_sha256(file: str, origin: str, expected: str | None, found: str) -> None:
    """Raise unless ``found`` is the hash the models file expects (nothing to check when it expects none)."""
    if expected is None or expected == found:
        return
    raise DownloadError(
        f"Model file {file!r} {origin} is not the expected file: its sha256 is {found}, "
        f"the models file expects {expected}. Check the url and the sha256 in the models file.",
        file=file,
    )


def read_sha256_cache(path: Path) -> str | None:
    """The cached hash of ``path`` if its ``.sha256`` sidecar still matches its size and mtime."""
    try:
        stat = path.stat()
        cached = json.loads(sidecar(path, ".sha256").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(cached, dict):
        return None
    if cached.get("size") != stat.st_size or cached.get("mtime_ns") != stat.st_mtime_ns:
        return None
    value = cached.get("sha256")
    return value if isinstance(value, str) and _SHA256.fullmatch(value) else None


def write_sha256_cache(path: Path, sha256: str) -> None:
    """Record ``sha256`` as the hash of ``path`` at its current size and mtime."""
    stat = path.stat()
    record = {"sha256": sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    write_atomic(sidecar(path, ".sha256"), json.dumps(record) + "\n")

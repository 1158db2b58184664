"""Writing into the model dir so that a crash or a power cut never leaves a file that looks finished but is not.

A model file, its ``.part.json`` and its ``.sha256`` record are all written the same way: next to the final name,
then renamed over it, then synced. The downloader and the checksum cache share these few helpers, which know
nothing about HTTP or hashes. Nothing is written outside the model dir: the models file's names are relative (checked
at start, gateway/catalog.py), and a place to write to is checked once symlinks are followed (:func:`outside`),
since a link in the model dir could otherwise send a download anywhere the gateway may write.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
from pathlib import Path


def outside(root: Path, *paths: Path) -> Path | None:
    """The first of ``paths`` that is not inside ``root`` once symlinks are followed (where a write to it would
    land, for a path that does not exist yet), as resolved; None when all are inside."""
    base = root.resolve()
    for path in paths:
        real = path.resolve()
        if real != base and not real.is_relative_to(base):
            return real
    return None


def sidecar(path: Path, suffix: str) -> Path:
    """The file that travels with ``path``: ``<name><suffix>`` in the same folder (``.part``, ``.lock`` ...)."""
    return path.with_name(path.name + suffix)


def size_of(path: Path) -> int:
    """The size of ``path`` in bytes; 0 when it does not exist."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def free_bytes(path: Path) -> int:
    """Free space on the file system that holds ``path``."""
    return shutil.disk_usage(path).free


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename: a reader sees the old content or the new, never half of it."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_all(out: io.RawIOBase, data: bytes) -> None:
    """Write every byte of ``data`` to an unbuffered file, which may take fewer per call."""
    view = memoryview(data)
    while view:
        written = out.write(view)
        if not written:
            raise OSError(errno.EIO, "the file accepted no bytes", out.name if hasattr(out, "name") else None)
        view = view[written:]


def fsync_file(path: Path) -> None:
    """Flush ``path``'s bytes to the disk (blocking: run it in a thread for big files)."""
    with path.open("rb") as f:
        os.fsync(f.fileno())


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable: a power cut must not bring back the .part name."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory; the rename is still atomic
    finally:
        os.close(fd)

"""Cache keys for embedding vectors.

A key covers everything that changes a vector: the model's identity (its id and where it comes from,
including the size and modification time of a local file, so replacing the file invalidates), the exact
input item, and ``dimensions``. It does not cover ``encoding_format``: floats are stored once and encoded
as base64 by the gateway on the way out.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Union

from ..catalog import Model

Item = Union[str, list[int]]  # noqa: UP007 - a runtime alias


def model_identity(model: Model) -> str:
    """A string that changes whenever the model's weights may have changed."""
    src = model.source
    parts = [
        model.id,
        model.kind,
        src.model_id,
        src.filename or "",
        model.entry.revision or "",
        model.entry.sha256 or "",
        model.entry.url or "",
    ]
    if src.local:
        path = Path(src.model_id) / src.filename if src.filename else Path(src.model_id)
        for candidate in [path, *(sorted(path.glob("*.safetensors")) if path.is_dir() else [])]:
            try:
                stat = os.stat(candidate)
            except OSError:
                continue
            parts.append(f"{candidate.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return "\x1f".join(parts)


def item_key(identity: str, item: Item, dimensions: int | None) -> str:
    """The key of one input item. A string and a one-item list holding it are the same item."""
    encoded = json.dumps(item, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(f"{identity}\x1e{dimensions or 0}\x1e{encoded}".encode()).hexdigest()
    return digest

"""Image generation, translated between OpenAI's shape and the engine's.

The engine is always asked for ``B64Json``: its ``Url`` answer is a path in the engine's working
directory, which an adopted engine may not share with us. When a client wants a URL, the gateway
stores the PNG itself and serves it under ``/images/<name>``; names are random and matched against a
strict pattern, so no request can reach another file.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...errors import EngineError, InvalidRequest

_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
NAME = re.compile(r"^image-[0-9a-f]{32}\.png$")
RESPONSE_FORMATS = {"url": "Url", "b64_json": "B64Json"}


def to_engine_request(body: dict[str, Any]) -> str:
    """Rewrite an OpenAI image request in place for the engine; returns the format the client wants."""
    wanted = body.pop("response_format", None)
    if wanted is None:  # left out, or null: OpenAI's default
        wanted = "url"
    elif not isinstance(wanted, str):
        raise InvalidRequest(
            "Invalid type for 'response_format': expected 'url' or 'b64_json'.",
            param="response_format",
            code="invalid_type",
        )
    elif wanted not in RESPONSE_FORMATS:  # "" and "URL" too: a slip must not quietly become "url"
        raise InvalidRequest(f"Invalid response_format {wanted!r}: use 'url' or 'b64_json'.", param="response_format")
    body["response_format"] = "B64Json"
    size = body.pop("size", None)
    if size is not None and size != "auto":
        match = _SIZE.match(size) if isinstance(size, str) else None
        if match is None:
            raise InvalidRequest(f"Invalid size {size!r}: use WIDTHxHEIGHT, e.g. '1024x1024'.", param="size")
        width, height = int(match.group(1)), int(match.group(2))
        if not (0 < width <= 8192 and 0 < height <= 8192):
            raise InvalidRequest(f"Invalid size {size!r}: each side must be 1 to 8192 pixels.", param="size")
        body["width"], body["height"] = width, height
    return wanted


class ImageStore:
    """PNG files produced for ``response_format=url``, kept for ``ttl`` seconds."""

    def __init__(self, folder: Path, *, ttl: float, clock: Callable[[], float] = time.time) -> None:
        self.folder = folder
        self._ttl = ttl
        self._clock = clock

    def save(self, png: bytes) -> str:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._expire()
        name = f"image-{uuid.uuid4().hex}.png"
        (self.folder / name).write_bytes(png)
        return name

    def path_of(self, name: str) -> Path | None:
        if not NAME.match(name):
            return None
        path = self.folder / name
        return path if path.is_file() else None

    def _expire(self) -> None:
        cutoff = self._clock() - self._ttl
        for path in self.folder.glob("image-*.png"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
            except OSError:
                continue


def from_engine_reply(reply: dict[str, Any], wanted: str, store: ImageStore, base_url: str) -> dict[str, Any]:
    """Rewrite the engine's answer in place into OpenAI's shape."""
    items = reply.get("data")
    if not isinstance(items, list):
        raise EngineError("The engine's image answer has no 'data' list.", status=502)
    for item in items:
        raw = item.get("b64_json") if isinstance(item, dict) else None
        if not isinstance(raw, str):
            raise EngineError("The engine's image answer has no image data.", status=502)
        if raw.startswith("data:"):
            raw = raw.split(",", 1)[1] if "," in raw else ""
        if wanted == "b64_json":
            item["b64_json"] = raw
            item.pop("url", None)
            continue
        try:
            png = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise EngineError("The engine's image data is not valid base64.", status=502) from exc
        item["url"] = f"{base_url.rstrip('/')}/images/{store.save(png)}"
        item.pop("b64_json", None)
    return reply


__all__ = ["NAME", "ImageStore", "from_engine_reply", "to_engine_request"]

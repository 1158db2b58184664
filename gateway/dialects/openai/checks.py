"""Checks on OpenAI's embeddings, images and speech requests, done before any engine is started (the chat family's
are the chat core's: gateway/chat/checks.py)."""

from __future__ import annotations

from typing import Any

from ...chat.fields import integer, require
from ...errors import InvalidRequest


def _token(value: Any) -> bool:
    # Token ids are u32 in the engine; anything else is not a token (and may not even fit 64 bits).
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 32


def embedding(body: dict[str, Any]) -> None:
    value = require(body, "input")
    ok = (isinstance(value, str) and bool(value)) or (
        isinstance(value, list)
        and bool(value)
        and (
            all(isinstance(v, str) and v for v in value)
            or all(_token(v) for v in value)
            or all(isinstance(v, list) and v and all(_token(t) for t in v) for v in value)
        )
    )
    if not ok:
        raise InvalidRequest(
            "Invalid 'input': expected a non-empty string, an array of them, an array of token ids, or an array "
            "of token-id arrays, none of them empty.",
            param="input",
            code="invalid_value",
        )
    fmt = body.get("encoding_format")
    if fmt is not None and fmt not in ("float", "base64"):
        raise InvalidRequest(
            f"Invalid encoding_format {fmt!r}: use 'float' or 'base64'.",
            param="encoding_format",
            code="invalid_value",
        )


def image(body: dict[str, Any]) -> None:
    prompt = require(body, "prompt")
    if not isinstance(prompt, str) or not prompt:
        raise InvalidRequest("'prompt' must be a non-empty string.", param="prompt", code="invalid_value")
    integer(body, "n", 1, 10)


def speech(body: dict[str, Any]) -> None:
    value = require(body, "input")
    if not isinstance(value, str) or not value:
        raise InvalidRequest("'input' must be a non-empty string.", param="input", code="invalid_value")

"""Checks on request bodies, done before the engine is started so that a bad request never costs a
cold start, and so that its error names the field the way OpenAI's API does."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from .errors import InvalidRequest, UnsupportedMediaType

Validator = Callable[[dict[str, Any]], None]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_json_body(raw: bytes, content_type: str | None) -> dict[str, Any]:
    if content_type:
        media = content_type.split(";", 1)[0].strip().lower()
        # curl -d sends form-urlencoded and some clients text/plain; the body decides. Multipart never is JSON.
        if media.startswith("multipart/"):
            raise UnsupportedMediaType(
                f"Content-Type {media!r} is not supported here: send a JSON body with Content-Type: application/json."
            )
    if not raw.strip():
        raise InvalidRequest("The request body is empty: send a JSON object.")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(
            f"We could not parse the JSON body of your request ({exc}). Send a valid JSON object with "
            "Content-Type: application/json."
        ) from exc
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return body


def parse_keep_alive(value: Any, param: str) -> float:
    """Seconds from a number or an Ollama-style duration ("30s", "5m", "1h")."""
    if isinstance(value, bool):
        raise InvalidRequest(f"Invalid {param}: use seconds or a duration like '5m'.", param=param)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    else:
        raise InvalidRequest(f"Invalid {param} {value!r}: use seconds or a duration like '5m'.", param=param)
    if seconds < 0 or seconds != seconds or seconds > 7 * 86400:
        raise InvalidRequest(f"Invalid {param} {value!r}: use 0 to 604800 seconds.", param=param)
    return seconds


def _require(body: dict[str, Any], name: str) -> Any:
    if name not in body or body[name] is None:
        raise InvalidRequest(f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter")
    return body[name]


def _positive_int(body: dict[str, Any], name: str, limit: int) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"Invalid type for '{name}': expected an integer.", param=name, code="invalid_type")
    if not 0 < value <= limit:
        raise InvalidRequest(
            f"Invalid '{name}': {value} is not between 1 and {limit}.", param=name, code="invalid_value"
        )


def _common(body: dict[str, Any]) -> None:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("Invalid type for 'stream': expected a boolean.", param="stream", code="invalid_type")
    _positive_int(body, "n", 128)
    _positive_int(body, "max_tokens", 1 << 24)
    _positive_int(body, "max_completion_tokens", 1 << 24)


def chat(body: dict[str, Any]) -> None:
    messages = _require(body, "messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array.", param="messages", code="invalid_value")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(
                f"Invalid 'messages[{i}]': each message needs a 'role'.",
                param=f"messages[{i}]",
                code="invalid_value",
            )
    _common(body)


def completion(body: dict[str, Any]) -> None:
    prompt = _require(body, "prompt")
    if not isinstance(prompt, str | list):
        raise InvalidRequest(
            "Invalid type for 'prompt': expected a string or an array.", param="prompt", code="invalid_type"
        )
    _common(body)


def responses(body: dict[str, Any]) -> None:
    value = _require(body, "input")
    if not isinstance(value, str | list):
        raise InvalidRequest(
            "Invalid type for 'input': expected a string or an array.", param="input", code="invalid_type"
        )
    _common(body)


def _token(value: Any) -> bool:
    # Token ids are u32 in the engine; anything else is not a token (and may not even fit 64 bits).
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 32


def embedding(body: dict[str, Any]) -> None:
    value = _require(body, "input")
    ok = isinstance(value, str) or (
        isinstance(value, list)
        and bool(value)
        and (
            all(isinstance(v, str) for v in value)
            or all(_token(v) for v in value)
            or all(isinstance(v, list) and v and all(_token(t) for t in v) for v in value)
        )
    )
    if not ok:
        raise InvalidRequest(
            "Invalid 'input': expected a string, an array of strings, an array of token ids, or an array "
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
    prompt = _require(body, "prompt")
    if not isinstance(prompt, str) or not prompt:
        raise InvalidRequest("'prompt' must be a non-empty string.", param="prompt", code="invalid_value")
    _positive_int(body, "n", 10)


def speech(body: dict[str, Any]) -> None:
    value = _require(body, "input")
    if not isinstance(value, str) or not value:
        raise InvalidRequest("'input' must be a non-empty string.", param="input", code="invalid_value")

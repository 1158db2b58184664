"""Checks on request bodies, done before the engine is started so that a bad request never costs a
cold start, and so that its error names the field the way OpenAI's API does."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

from ..errors import InvalidRequest, UnsupportedMediaType

Validator = Callable[[dict[str, Any]], None]

# Go's duration syntax, as Ollama takes it: "-1", "300", "30s", "5m", "1h30m", "1.5h", "500ms".
_DURATION = re.compile(r"^\s*(-?)((?:\d+(?:\.\d+)?(?:ns|us|µs|ms|s|m|h))+|\d+(?:\.\d+)?)\s*$")
_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


MAX_DEPTH = 64  # nesting of JSON objects and arrays; OpenAI's bodies need a handful (a tool schema a few more)
_INT_RANGE = (-(1 << 63), 1 << 64)  # what the engine's integer fields (i64, u64) can hold


class _Refused(ValueError):
    """A JSON value the gateway does not accept even though Python's parser would."""


def _constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON number")


def _integer(text: str) -> int:
    value = int(text)  # Python refuses more than 4300 digits with ValueError
    if not _INT_RANGE[0] <= value < _INT_RANGE[1]:
        raise _Refused(f"the number {text[:30]}{'...' if len(text) > 30 else ''} is out of range")
    return value


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"the number {text[:30]} is out of range")
    return value


def _too_deep(value: Any) -> bool:
    """Whether ``value`` nests deeper than MAX_DEPTH (without recursion, so no depth can overflow the stack)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def parse_json_body(raw: bytes, content_type: str | None) -> dict[str, Any]:
    """A request body as a JSON object; anything else, or anything an engine could not take, is a 400.

    ``NaN``, ``Infinity`` and numbers beyond 64 bits are refused here rather than forwarded (the engine's parser
    refuses them, or worse, takes them), and so is nesting deeper than MAX_DEPTH (Python's parser would recurse
    until it fails, and every later encoder has a lower limit).
    """
    if content_type:
        media = content_type.split(";", 1)[0].strip().lower()
        # curl -d sends form-urlencoded and some clients text/plain; the body decides. Multipart never is JSON.
        if media.startswith("multipart/"):
            raise UnsupportedMediaType(
                f"Content-Type {media!r} is not supported here: send a JSON body with Content-Type: application/json."
            )
    if not raw.strip():
        raise InvalidRequest("The request body is empty: send a JSON object.", code="invalid_json")
    try:
        body = json.loads(raw, parse_constant=_constant, parse_int=_integer, parse_float=_float)
    except _Refused as exc:
        raise InvalidRequest(f"The JSON body has a value no engine can take: {exc}.", code="invalid_value") from exc
    except RecursionError as exc:
        raise InvalidRequest(f"The JSON body nests deeper than {MAX_DEPTH} levels.", code="invalid_json") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(
            f"We could not parse the JSON body of your request ({exc}). Send a valid JSON object with "
            "Content-Type: application/json.",
            code="invalid_json",
        ) from exc
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _too_deep(body):
        raise InvalidRequest(f"The JSON body nests deeper than {MAX_DEPTH} levels.", code="invalid_json")
    return body


# ------------------------------------------------------------------------------------------ fields


def invalid(param: str, message: str, code: str = "invalid_value") -> InvalidRequest:
    return InvalidRequest(message, param=param, code=code)


def wrong_type(param: str, expected: str) -> InvalidRequest:
    return invalid(param, f"Invalid type for '{param}': expected {expected}.", "invalid_type")


def unsupported(param: str, why: str) -> InvalidRequest:
    return invalid(param, f"'{param}' is not supported here: {why}", "unsupported_parameter")


def require(body: dict[str, Any], name: str) -> Any:
    if body.get(name) is None:
        raise invalid(name, f"Missing required parameter: '{name}'.", "missing_required_parameter")
    return body[name]


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)) and math.isfinite(value)


def integer(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not is_int(value):
        raise wrong_type(name, "an integer")
    if not low <= value <= high:
        raise invalid(name, f"Invalid '{name}': {value} is not between {low} and {high}.")
    return int(value)


def number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not is_number(value):
        raise wrong_type(name, "a number")
    if not low <= value <= high:
        raise invalid(name, f"Invalid '{name}': {value} is not between {low:g} and {high:g}.")
    return float(value)


def boolean(body: dict[str, Any], name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise wrong_type(name, "a boolean")
    return value


def string(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise wrong_type(name, "a string")
    return value


def parse_keep_alive(value: Any, param: str) -> float:
    """Seconds from a number or an Ollama-style (Go) duration ("30s", "5m", "1h30m"); negative (Ollama's -1): until
    further notice, returned as -1."""
    if isinstance(value, bool):
        raise InvalidRequest(f"Invalid {param}: use seconds or a duration like '5m'.", param=param)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        sign, body = -1.0 if match.group(1) else 1.0, match.group(2)
        parts = _PART.findall(body)
        seconds = sign * (sum(float(n) * _UNITS[unit] for n, unit in parts) if parts else float(body))
    else:
        raise InvalidRequest(f"Invalid {param} {value!r}: use seconds or a duration like '5m'.", param=param)
    if not math.isfinite(seconds):
        raise InvalidRequest(f"Invalid {param} {value!r}: use seconds, a duration like '5m', or -1.", param=param)
    return -1.0 if seconds < 0 else seconds


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

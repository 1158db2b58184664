"""Checking the fields of a request the way OpenAI's API names them (``messages[1].content``, ``temperature``), for
the chat core and every dialect: each check raises :class:`InvalidRequest` with the field as its ``param``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ..errors import InvalidRequest

Validator = Callable[[dict[str, Any]], None]


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

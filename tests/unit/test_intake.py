"""Taking a request in: the JSON body, and keep-alive durations."""

from __future__ import annotations

import pytest

from gateway.errors import InvalidRequest, UnsupportedMediaType
from gateway.serving import intake as validation


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (30, 30.0),
        (1.5, 1.5),
        ("45s", 45.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("250ms", 0.25),
        (0, 0.0),
        (-1, -1.0),
        ("-1", -1.0),
        ("-5m", -1.0),
        (10**9, 1e9),
        ("1h30m", 5400.0),
        ("1m30s", 90.0),
        ("1.5h", 5400.0),
    ],
)
def test_keep_alive_accepts_seconds_durations_and_ollamas_minus_one(value: object, seconds: float) -> None:
    assert validation.parse_keep_alive(value, "keep_alive") == seconds


@pytest.mark.parametrize("value", ["soon", True, None, [], "5d", float("inf"), float("nan")])
def test_keep_alive_rejects_nonsense(value: object) -> None:
    with pytest.raises(InvalidRequest) as info:
        validation.parse_keep_alive(value, "keep_alive")
    assert info.value.param == "keep_alive"


def test_body_parsing() -> None:
    assert validation.parse_json_body(b'{"a": 1}', "application/json") == {"a": 1}
    assert validation.parse_json_body(b'{"a": 1}', "application/x-www-form-urlencoded") == {"a": 1}
    for raw in (b"", b"{", b"[1]", b"\xff"):
        with pytest.raises(InvalidRequest):
            validation.parse_json_body(raw, "application/json")
    with pytest.raises(UnsupportedMediaType):
        validation.parse_json_body(b"{}", "multipart/form-data; boundary=x")


@pytest.mark.parametrize(
    "raw",
    [
        b'{"temperature": NaN}',
        b'{"temperature": Infinity}',
        b'{"x": -Infinity}',
        b'{"seed": 18446744073709551616}',
        b'{"seed": -9223372036854775809}',
        b'{"top_p": 1e999}',
        b'{"n": ' + b"9" * 5000 + b"}",
        b'{"a": ' + b"[" * 65 + b"]" * 65 + b"}",
        b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ],
)
def test_bodies_no_engine_can_take_are_a_400(raw: bytes) -> None:
    with pytest.raises(InvalidRequest) as info:
        validation.parse_json_body(raw, "application/json")
    assert info.value.status == 400 and info.value.code in ("invalid_value", "invalid_json")


def test_what_engines_take_passes() -> None:
    raw = b'{"a": ' + b"[" * 63 + b"]" * 63 + b', "seed": 18446744073709551615, "x": -9223372036854775808}'
    assert validation.parse_json_body(raw, "application/json")["seed"] == (1 << 64) - 1


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'{"model": "a\\ud800b"}', "model"),
        (b'{"messages": [{"role": "user", "content": "x\\udc00"}]}', "messages[0].content"),
        (b'{"tools": [{"\\ud83d": 1}]}', "tools[0]"),
    ],
)
def test_a_lone_surrogate_is_a_400_naming_where_it_is(raw: bytes, param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        validation.parse_json_body(raw, "application/json")
    assert info.value.param == param and "surrogate" in info.value.message


def test_a_surrogate_pair_is_one_character_and_fine() -> None:
    assert validation.parse_json_body(b'{"x": "\\ud83d\\ude00"}', "application/json") == {"x": "\U0001f600"}


@pytest.mark.parametrize("raw", [b'{"x": "\xed\xa0\x80"}', b'{"x": "\xff"}', b'{"x": "\xc3\x28"}'])
def test_bytes_that_are_not_utf_8_are_a_400(raw: bytes) -> None:
    with pytest.raises(InvalidRequest, match="not valid UTF-8"):
        validation.parse_json_body(raw, "application/json")


def test_a_byte_order_mark_is_tolerated() -> None:
    assert validation.parse_json_body(b'\xef\xbb\xbf{"a": 1}', "application/json") == {"a": 1}

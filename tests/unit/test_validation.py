from __future__ import annotations

import pytest

from gateway import validation
from gateway.errors import InvalidRequest, UnsupportedMediaType


@pytest.mark.parametrize(
    ("value", "seconds"), [(30, 30.0), (1.5, 1.5), ("45s", 45.0), ("5m", 300.0), ("1h", 3600.0), ("250ms", 0.25)]
)
def test_keep_alive_accepts_seconds_and_durations(value: object, seconds: float) -> None:
    assert validation.parse_keep_alive(value, "keep_alive") == seconds


@pytest.mark.parametrize("value", [-1, "soon", True, None, [], "5d", 10**9])
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
    ("check", "body", "param"),
    [
        (validation.chat, {}, "messages"),
        (validation.chat, {"messages": []}, "messages"),
        (validation.chat, {"messages": [{"content": "x"}]}, "messages[0]"),
        (validation.chat, {"messages": [{"role": "user"}], "stream": "yes"}, "stream"),
        (validation.chat, {"messages": [{"role": "user"}], "max_tokens": 0}, "max_tokens"),
        (validation.chat, {"messages": [{"role": "user"}], "n": 10_000}, "n"),
        (validation.completion, {"prompt": 3}, "prompt"),
        (validation.embedding, {"input": []}, "input"),
        (validation.embedding, {"input": [1, "a"]}, "input"),
        (validation.embedding, {"input": [2**70]}, "input"),
        (validation.embedding, {"input": [[-1]]}, "input"),
        (validation.embedding, {"input": [True]}, "input"),
        (validation.embedding, {"input": "a", "encoding_format": "hex"}, "encoding_format"),
        (validation.image, {"prompt": ""}, "prompt"),
        (validation.speech, {}, "input"),
    ],
)
def test_bad_bodies_name_the_parameter(check: validation.Validator, body: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check(body)
    assert info.value.param == param
    assert info.value.status == 400


@pytest.mark.parametrize("value", ["a", ["a", "b"], [1, 2], [[1], [2, 3]]])
def test_every_embedding_input_form_is_accepted(value: object) -> None:
    validation.embedding({"input": value})

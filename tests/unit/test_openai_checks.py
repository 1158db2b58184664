"""OpenAI's embeddings, images and speech requests, checked before any engine starts."""

from __future__ import annotations

import pytest

from gateway.chat.fields import Validator
from gateway.dialects.openai import checks as validation
from gateway.errors import InvalidRequest


@pytest.mark.parametrize(
    ("check", "body", "param"),
    [
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
def test_bad_bodies_name_the_parameter(check: Validator, body: dict[str, object], param: str) -> None:
    # Chat, completions and responses have their own checks: tests/unit/test_chat_plans.py.
    with pytest.raises(InvalidRequest) as info:
        check(body)
    assert info.value.param == param
    assert info.value.status == 400 and info.value.code  # no 400 without a code


@pytest.mark.parametrize("value", ["a", ["a", "b"], [1, 2], [[1], [2, 3]]])
def test_every_embedding_input_form_is_accepted(value: object) -> None:
    validation.embedding({"input": value})

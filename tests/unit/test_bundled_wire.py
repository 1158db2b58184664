"""gateway/engine/bundled/wire.py: the package's response objects in mistral.rs's wire shapes
(docs/engine-contract.md).

The package's objects are stood in for by plain namespaces with the same attributes (measured on mistralrs
0.9.5); the end-to-end proof against the real engine is in tests/integration/test_real_engine.py.
"""

from __future__ import annotations

import enum
import json
import math
from types import SimpleNamespace
from typing import Any

from gateway.engine.bundled.wire import (
    ChatCollector,
    chunk_json,
    completion_json,
    logprob_json,
    tool_call_json,
    usage_json,
)

# ------------------------------------------------------------------------------------- answer shapes


class ToolCallType(enum.Enum):  # the package's enum prints as ToolCallType.Function
    Function = 0


def tool_call(index: int = 0) -> SimpleNamespace:
    return SimpleNamespace(
        index=index,
        id=f"call-{index}",
        tp=ToolCallType.Function,
        function=SimpleNamespace(name="get_weather", arguments='{"city":"Paris"}'),
    )


def logprob(token: str, value: float = -0.5) -> SimpleNamespace:
    # As the package gives them: the chosen token's bytes as Python bytes, each alternative's id and text.
    tops = [
        SimpleNamespace(token=57, logprob=value, bytes=token),
        SimpleNamespace(token=3, logprob=-math.inf, bytes="x"),
    ]
    return SimpleNamespace(token=token, logprob=value, bytes=token.encode(), top_logprobs=tops)


def usage(prompt: int = 9, completion: int = 2) -> SimpleNamespace:
    return SimpleNamespace(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion, avg_tok_per_sec=1.0
    )


def chunk(
    content: str | None, *, finish: str | None = None, calls: list[Any] | None = None, lp: Any = None, used: Any = None
) -> SimpleNamespace:
    delta = SimpleNamespace(role="assistant", content=content, tool_calls=calls, reasoning_content=None)
    choice = SimpleNamespace(index=0, delta=delta, finish_reason=finish, logprobs=lp)
    return SimpleNamespace(choices=[choice], usage=used)


def test_tool_calls_and_logprobs_in_mistralrs_wire_shape() -> None:
    function = {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    assert tool_call_json(tool_call(1)) == {"index": 1, "id": "call-1", "type": "function", "function": function}
    assert logprob_json(logprob("Hi")) == {
        "token": "Hi",
        "logprob": -0.5,
        "bytes": [72, 105],
        "top_logprobs": [
            {"token": 57, "logprob": -0.5, "bytes": "Hi"},
            {"token": 3, "logprob": None, "bytes": "x"},
        ],
    }
    no_bytes = SimpleNamespace(token="?", logprob=-1.0, bytes=None, top_logprobs=[])
    assert logprob_json(no_bytes)["bytes"] is None
    assert usage_json(usage()) == {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
    assert usage_json(None) is None


def test_stream_chunks() -> None:
    meta = {"id": "chatcmpl-1", "created": 1, "model": "m"}
    piece = chunk("Hi", lp=logprob("Hi"))
    out = chunk_json(piece, meta)
    assert out["object"] == "chat.completion.chunk" and out["usage"] is None
    assert out["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": "Hi", "tool_calls": None},
            "finish_reason": None,
            "logprobs": logprob_json(logprob("Hi")),
        }
    ]
    last = chunk_json(chunk(None, finish="tool_calls", calls=[tool_call()], used=usage()), meta)
    assert last["choices"][0]["delta"]["tool_calls"] == [tool_call_json(tool_call())]
    assert last["choices"][0]["finish_reason"] == "tool_calls" and last["usage"]["total_tokens"] == 11
    json.dumps(out, allow_nan=False)  # valid JSON: -inf alternatives became null


def test_a_collected_answer_with_only_a_tool_call_has_null_content() -> None:
    collector = ChatCollector()
    for piece in (
        chunk(None, lp=logprob("{")),
        chunk(None, lp=logprob("}")),
        chunk(None, finish="tool_calls", calls=[tool_call()], used=usage(9, 2)),
    ):
        collector.add(piece)
    answer = collector.answer({"id": "x", "created": 1, "model": "m"}, logprobs=True)
    (choice,) = answer["choices"]
    assert choice["message"] == {"role": "assistant", "content": None, "tool_calls": [tool_call_json(tool_call())]}
    assert choice["finish_reason"] == "tool_calls"
    assert choice["logprobs"] == {"content": [logprob_json(logprob("{")), logprob_json(logprob("}"))]}
    assert answer["usage"] == {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
    assert answer["object"] == "chat.completion"


def test_a_collected_text_answer() -> None:
    collector = ChatCollector()
    for piece in (chunk("Hel"), chunk(None), chunk("lo", finish="stop", used=usage())):
        collector.add(piece)
    (choice,) = collector.answer({}, logprobs=False)["choices"]
    assert choice == {
        "index": 0,
        "message": {"role": "assistant", "content": "Hello", "tool_calls": None},
        "finish_reason": "stop",
        "logprobs": None,
    }
    assert collector.partial() == {0: "Hello"}
    empty = ChatCollector()
    empty.add(chunk(None, finish="length"))
    assert empty.answer({}, logprobs=False)["choices"][0]["message"]["content"] == ""


def test_a_completion_carries_its_finish_reason_and_usage() -> None:
    response = SimpleNamespace(
        choices=[SimpleNamespace(index=0, text="once", finish_reason="length", logprobs=None)], usage=usage(4, 6)
    )
    assert completion_json(response, {"id": "cmpl-1", "created": 1, "model": "m"}) == {
        "id": "cmpl-1",
        "created": 1,
        "model": "m",
        "object": "text_completion",
        "system_fingerprint": "local",
        "choices": [{"index": 0, "text": "once", "finish_reason": "length", "logprobs": None}],
        "usage": {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10},
    }

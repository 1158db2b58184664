"""gateway/openai/responses.py: Responses requests to chat and back, answers and streams checked against the
openai package's own Response and stream-event types."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.dialects.openai import responses
from gateway.dialects.openai.responses import EventWriter, Skeleton
from gateway.errors import EngineCrashed, InvalidRequest
from tests.oracle import check_body, check_stream

TOOL = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}


def test_a_conversation_with_a_tool_loop_becomes_chat_messages() -> None:
    chat = responses.to_chat(
        {
            "instructions": "be brief",
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
                {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
                {"type": "message", "role": "developer", "content": "answer in French"},
            ],
            "tools": [TOOL],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "max_output_tokens": 20,
            "text": {"format": {"type": "json_object"}},
            "include": ["message.output_text.logprobs"],
            "top_logprobs": 2,
            "stream": True,
        }
    )
    assert chat["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "system", "content": "answer in French"},
    ]
    function = {"name": "get_weather", "parameters": {"type": "object"}}
    assert chat["tools"] == [{"type": "function", "function": function}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert chat["max_tokens"] == 20 and chat["response_format"] == {"type": "json_object"}
    assert chat["logprobs"] is True and chat["top_logprobs"] == 2 and chat["stream"] is True


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
        ({"input": "x", "background": True}, "background"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0]"),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input[0].content[0]"),
        ({"input": "x", "include": ["file_search_call.results"]}, "include"),
        ({"input": 3}, "input"),
        ({}, "input"),
    ],
)
def test_what_the_gateway_cannot_do_is_refused_naming_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        responses.check(body)
    assert info.value.param == param


def chat_answer(content: str | None, finish: str = "stop", calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    return {
        "id": "c",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }


CALL = {"id": "call-1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}


def test_answers_become_responses() -> None:
    skeleton = Skeleton("resp_1", "m", {"input": "x", "tools": [TOOL]})
    text = responses.from_chat(chat_answer("Hello"), skeleton, logprobs=False)
    check_body("response", text)
    assert text["status"] == "completed" and text["output"][0]["content"][0]["text"] == "Hello"
    assert text["usage"]["input_tokens"] == 3 and text["store"] is False
    call = responses.from_chat(chat_answer(None, "tool_calls", [CALL]), skeleton, logprobs=False)
    check_body("response", call)
    assert call["output"] == [
        {
            **call["output"][0],
            "type": "function_call",
            "call_id": "call-1",
            "name": "get_weather",
            "arguments": '{"city":"Paris"}',
        }
    ]
    cut = responses.from_chat(chat_answer("Hel", "length"), skeleton, logprobs=False)
    check_body("response", cut)
    assert cut["status"] == "incomplete" and cut["incomplete_details"] == {"reason": "max_output_tokens"}


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }


def _write(writer: EventWriter, chunks: list[dict[str, Any]]) -> str:
    out = writer.start()
    for chunk in chunks:
        out += writer.chunk(chunk)
    out += writer.finish({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
    return b"".join(out).decode()


def test_a_text_stream_has_the_responses_event_sequence() -> None:
    stream = _write(
        EventWriter(Skeleton("resp_1", "m", {"input": "x"}), logprobs=False),
        [_chunk({"role": "assistant", "content": "Hel"}), _chunk({"content": "lo"}, "stop")],
    )
    events = check_stream("response", stream)
    assert [e.type for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[6].text == "Hello" and events[-1].response.output[0].content[0].text == "Hello"
    assert events[-1].response.usage.output_tokens == 2


def test_a_tool_call_stream_has_function_call_events() -> None:
    writer = EventWriter(Skeleton("resp_1", "m", {"input": "x", "tools": [TOOL]}), logprobs=False)
    stream = _write(writer, [_chunk({"role": "assistant", "tool_calls": [{**CALL, "index": 0}]}, "tool_calls")])
    events = check_stream("response", stream)
    assert [e.type for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[-2].item.arguments == '{"city":"Paris"}' and events[-2].item.call_id == "call-1"


def test_a_failure_after_the_start_is_a_failed_response() -> None:
    writer = EventWriter(Skeleton("resp_1", "m", {"input": "x"}), logprobs=False)
    stream = b"".join([*writer.start(), writer.failed(EngineCrashed("the engine died"))]).decode()
    events = check_stream("response", stream)
    assert events[-1].type == "response.failed" and events[-1].response.error.message == "the engine died"
    assert json.loads(stream.split("data: ")[-1])["response"]["status"] == "failed"

"""The Messages API translation (gateway/anthropic/protocol.py), checked against the anthropic SDK's own types."""

from __future__ import annotations

import json
from typing import Any

import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent
from pydantic import TypeAdapter

from gateway.dialects.anthropic import protocol
from gateway.errors import EngineUnavailable, InvalidRequest, ModelNotFound

EVENTS: TypeAdapter[RawMessageStreamEvent] = TypeAdapter(RawMessageStreamEvent)


def base(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}], **fields}


def test_system_turns_and_sampling_become_a_chat_request() -> None:
    chat = protocol.to_chat(
        base(
            system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
            messages=[
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [{"type": "text", "text": "yo"}]},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            ],
            temperature=0.5,
            top_p=0.9,
            top_k=40,
            stop_sequences=["END"],
            stream=True,
        )
    )
    assert chat == {
        "messages": [
            {"role": "system", "content": "Be brief.\n\nBe kind."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "ab"},
        ],
        "max_tokens": 64,
        "stream": True,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 40,
        "stop": ["END"],
    }


def test_a_tool_loop_becomes_tool_calls_and_tool_messages() -> None:
    chat = protocol.to_chat(
        base(
            messages=[
                {"role": "user", "content": "weather?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "Let me look."},
                        {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                        {"type": "text", "text": "and tomorrow?"},
                    ],
                },
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": "toolu_2", "name": "weather", "input": {}}],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "toolu_2",
                            "is_error": True,
                            "content": [{"type": "text", "text": "timeout"}],
                        }
                    ],
                },
            ],
            tools=[{"name": "weather", "description": "Weather of a city", "input_schema": {"type": "object"}}],
            tool_choice={"type": "any", "disable_parallel_tool_use": True},
        )
    )
    call = {"id": "toolu_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    assert chat["messages"] == [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        {"role": "user", "content": "and tomorrow?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "toolu_2", "type": "function", "function": {"name": "weather", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: timeout"},
    ]
    assert chat["tools"] == [
        {
            "type": "function",
            "function": {"name": "weather", "description": "Weather of a city", "parameters": {"type": "object"}},
        }
    ]
    assert chat["tool_choice"] == "required" and chat["parallel_tool_calls"] is False
    assert protocol.to_chat(base(tool_choice={"type": "tool", "name": "w"}))["tool_choice"] == {
        "type": "function",
        "function": {"name": "w"},
    }


def test_images_become_data_urls() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    chat = protocol.to_chat(base(messages=[{"role": "user", "content": [image, {"type": "text", "text": "what?"}]}]))
    assert chat["messages"][0]["content"] == [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "text", "text": "what?"},
    ]


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"max_tokens": None}, "max_tokens", "Field required"),
        ({"messages": []}, "messages", "non-empty"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "'user', 'assistant' or 'system'"),
        (
            {"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
            "messages[0].content[0].type",
            "'document'",
        ),
        (
            {"messages": [{"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "x"}]}]},
            "messages[0].content[0].type",
            "cannot be in a assistant message",
        ),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type", "server tools"),
        ({"tool_choice": {"type": "sometimes"}}, "tool_choice.type", "'auto', 'any'"),
        ({"temperature": 1.5}, "temperature", "between 0 and 1"),
        ({"mcp_servers": [{"url": "x"}]}, "mcp_servers", "mcp_config"),
    ],
)
def test_what_cannot_be_translated_is_refused_by_name(fields: dict[str, Any], param: str, words: str) -> None:
    body = {key: value for key, value in base(**fields).items() if value is not None}
    with pytest.raises(InvalidRequest) as caught:
        protocol.to_chat(body)
    assert caught.value.param == param and words in caught.value.message


def test_a_chat_answer_becomes_a_message_the_sdk_reads() -> None:
    answer = {
        "choices": [
            {
                "finish_reason": "tool_calls",
                "message": {
                    "role": "assistant",
                    "content": "Checking.",
                    "tool_calls": [
                        {
                            "id": "call_9",
                            "type": "function",
                            "function": {"name": "weather", "arguments": '{"city":"Oslo"}'},
                        }
                    ],
                },
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19},
    }
    message = Message.model_validate(protocol.from_chat(answer, "msg_1", "m"))
    assert message.stop_reason == "tool_use" and message.usage.input_tokens == 12 and message.usage.output_tokens == 7
    text, use = message.content
    assert text.type == "text" and text.text == "Checking."
    assert use.type == "tool_use" and use.id == "call_9" and use.input == {"city": "Oslo"}
    length = {"choices": [{"finish_reason": "length", "message": {"role": "assistant", "content": "abc"}}]}
    assert Message.model_validate(protocol.from_chat(length, "msg_2", "m")).stop_reason == "max_tokens"


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def replay(events: list[bytes]) -> tuple[list[str], Message]:
    """The event types, and the Message the SDK's own accumulator builds from them."""
    kinds, snapshot, buffers = [], None, {}  # type: ignore[var-annotated]
    for raw in events:
        head, data = raw.decode().strip().split("\n")
        payload = json.loads(data.removeprefix("data: "))
        assert head == f"event: {payload['type']}"
        kinds.append(payload["type"])
        if payload["type"] != "ping":  # the SDK skips pings before it parses events
            event = EVENTS.validate_python(payload)
            snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=buffers)
    assert snapshot is not None
    return kinds, Message.model_validate(snapshot.model_dump())


def test_a_stream_of_chunks_becomes_anthropics_event_sequence() -> None:
    writer = protocol.EventWriter("msg_1", "m")
    events = writer.start()
    events += writer.chunk(chunk({"role": "assistant", "content": "Hel"}))
    events += writer.chunk(chunk({"content": "lo"}))
    first = {"index": 0, "id": "call_1", "function": {"name": "w", "arguments": '{"a":'}}
    events += writer.chunk(chunk({"tool_calls": [first]}))
    events += writer.chunk(chunk({"tool_calls": [{"index": 0, "function": {"arguments": " 1}"}}]}, "tool_calls"))
    events += writer.finish({"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9})
    kinds, message = replay(events)
    assert kinds == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert [block.type for block in message.content] == ["text", "tool_use"]
    assert message.content[0].text == "Hello"  # type: ignore[union-attr]
    assert message.content[1].input == {"a": 1}  # type: ignore[union-attr]
    assert message.stop_reason == "tool_use" and message.usage.input_tokens == 5 and message.usage.output_tokens == 4


def test_thinking_comes_in_its_own_block_before_the_text() -> None:
    writer = protocol.EventWriter("msg_1", "m")
    events = [
        *writer.start(),
        *writer.chunk(chunk({"reasoning_content": "hmm"})),
        *writer.chunk(chunk({"content": "yes"}, "stop")),
        *writer.finish(None),
    ]
    _, message = replay(events)
    assert [block.type for block in message.content] == ["thinking", "text"] and message.stop_reason == "end_turn"


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (InvalidRequest("bad"), "invalid_request_error"),
        (ModelNotFound("no"), "not_found_error"),
        (EngineUnavailable("later", retry_after=2), "overloaded_error"),
    ],
)
def test_errors_have_anthropics_types(error: Any, kind: str) -> None:
    assert protocol.error_body(error) == {"type": "error", "error": {"type": kind, "message": error.message}}
    head, data = protocol.error_event(error).decode().strip().split("\n")
    assert head == "event: error" and json.loads(data[6:])["error"]["type"] == kind


def test_a_system_message_in_the_conversation_stays_where_it_is() -> None:
    """Claude Code sends one (the API's mid-conversation-system beta): a chat system message at the same place."""
    chat = protocol.to_chat(
        {
            "model": "m",
            "max_tokens": 10,
            "system": "You are terse.",
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "system", "content": [{"type": "text", "text": "Today is Monday."}]},
            ],
        }
    )
    assert chat["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hi"},
        {"role": "system", "content": "Today is Monday."},
    ]


def test_too_long_a_prompt_is_said_in_anthropics_words() -> None:
    from gateway.errors import ContextLengthExceeded

    error = ContextLengthExceeded("The prompt does not fit.", prompt_tokens=20000, limit=8192, param="messages")
    body = protocol.error_body(error)
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"].startswith("prompt is too long: 20000 tokens > 8192 maximum")


def test_an_answer_cut_for_length_before_max_tokens_ran_out_of_context() -> None:
    answer = {
        "choices": [{"message": {"role": "assistant", "content": "x y"}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 8190, "completion_tokens": 2},
    }
    assert protocol.from_chat(answer, "msg_1", "m", max_tokens=32000)["stop_reason"] == "model_context_window_exceeded"
    assert protocol.from_chat(answer, "msg_1", "m", max_tokens=2)["stop_reason"] == "max_tokens"

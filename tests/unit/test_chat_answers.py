"""gateway/openai/answers.py: mistral.rs's answers in, OpenAI's out, checked against the openai package's types."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.chat import answers
from gateway.chat.answers import CompletionOffsets, Shape
from tests.oracle import check_body

# One token's entry as mistral.rs sends it: top alternatives carry the token id in "token", its text in "bytes".
ENGINE_TOKEN = {
    "token": "Hi",
    "logprob": -0.5,
    "bytes": [72, 105],
    "top_logprobs": [{"token": 57, "logprob": -0.5, "bytes": "Hi"}, {"token": 99, "logprob": -1.5, "bytes": "Yo"}],
}
USAGE = {
    "prompt_tokens": 5,
    "completion_tokens": 2,
    "total_tokens": 7,
    "avg_tok_per_sec": 12.5,
    "prompt_tokens_details": {"cached_tokens": 3},
}


def engine_chat(content: str | None = "Hi there", finish: str = "stop", **extra: Any) -> dict[str, Any]:
    message = {"role": "assistant", "content": content, "tool_calls": None, **extra.pop("message", {})}
    return {
        "id": "7",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "/engine/path",
        "system_fingerprint": "local",
        "usage": USAGE,
        "choices": [{"index": 0, "finish_reason": finish, "message": message, **extra}],
    }


def test_a_chat_answer_carries_the_client_model_and_openai_usage() -> None:
    answer = answers.merge_answers([engine_chat()], [Shape("my-model")], chat=True)
    check_body("chat", answer)
    assert answer["model"] == "my-model"
    assert answer["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 2,
        "total_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 3},
    }
    assert answer["choices"][0]["logprobs"] is None


@pytest.mark.parametrize(
    ("engine", "openai"),
    [
        ("stop", "stop"),
        ("length", "length"),
        ("tool_calls", "tool_calls"),
        ("canceled", "stop"),
        ("generated_image", "stop"),
    ],
)
def test_finish_reasons_are_openai_values(engine: str, openai: str) -> None:
    answer = answers.merge_answers([engine_chat(finish=engine)], [Shape("m")], chat=True)
    check_body("chat", answer)
    assert answer["choices"][0]["finish_reason"] == openai


def test_logprobs_take_openai_shape_and_the_requested_number_of_alternatives() -> None:
    body = engine_chat(logprobs={"content": [ENGINE_TOKEN, ENGINE_TOKEN]})
    answer = answers.merge_answers([body], [Shape("m", logprobs=1)], chat=True)
    check_body("chat", answer)
    content = answer["choices"][0]["logprobs"]["content"]
    assert content[0] == {
        "token": "Hi",
        "logprob": -0.5,
        "bytes": [72, 105],
        "top_logprobs": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105]}],
    }
    assert len(content) == 2
    none = answers.merge_answers([body], [Shape("m", logprobs=0)], chat=True)
    assert none["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == []


def test_logprobs_already_in_openai_shape_pass_unchanged() -> None:
    openai_entry = {
        "token": "a",
        "logprob": -1.0,
        "bytes": [97],
        "top_logprobs": [{"token": "a", "logprob": -1.0, "bytes": [97]}],
    }
    assert answers.token_logprob(openai_entry, 5) == openai_entry


def test_tool_calls_get_openai_fields_and_single_means_one() -> None:
    calls = [
        {"index": 0, "id": "call-1", "type": "function", "function": {"name": "a", "arguments": "{}"}},
        {"index": 1, "id": "call-2", "type": "function", "function": {"name": "b", "arguments": {"x": 1}}},
    ]
    body = engine_chat(content=None, finish="tool_calls", message={"tool_calls": calls})
    answer = answers.merge_answers([body], [Shape("m")], chat=True)
    check_body("chat", answer)
    message = answer["choices"][0]["message"]
    assert message["content"] is None and answer["choices"][0]["finish_reason"] == "tool_calls"
    assert message["tool_calls"][1] == {
        "id": "call-2",
        "type": "function",
        "function": {"name": "b", "arguments": '{"x":1}'},
    }
    single = answers.merge_answers([body], [Shape("m", single_tool_call=True)], chat=True)
    assert [c["id"] for c in single["choices"][0]["message"]["tool_calls"]] == ["call-1"]


def test_fanned_out_answers_merge_into_n_choices_with_prompt_tokens_counted_once() -> None:
    bodies = [engine_chat(content=f"answer {i}") for i in range(3)]
    answer = answers.merge_answers(bodies, [Shape("m")] * 3, chat=True)
    check_body("chat", answer)
    assert [(c["index"], c["message"]["content"]) for c in answer["choices"]] == [
        (0, "answer 0"),
        (1, "answer 1"),
        (2, "answer 2"),
    ]
    assert answer["usage"] == {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}


def test_completions_with_two_prompts_count_each_prompt_once() -> None:
    def body(text: str, prompt_tokens: int) -> dict[str, Any]:
        return {
            "id": "c",
            "object": "text_completion",
            "created": 1,
            "model": "e",
            "choices": [{"index": 0, "text": text, "finish_reason": "length", "logprobs": None}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 4, "total_tokens": prompt_tokens + 4},
        }

    bodies = [body("a", 3), body("b", 3), body("c", 10), body("d", 10)]  # two prompts, n = 2
    answer = answers.merge_answers(bodies, [Shape("m")] * 4, chat=False, prompts=2)
    check_body("completion", answer)
    assert [c["text"] for c in answer["choices"]] == ["a", "b", "c", "d"]
    assert answer["usage"] == {"prompt_tokens": 13, "completion_tokens": 16, "total_tokens": 29}


def test_completion_logprobs_take_the_legacy_shape_with_text_offsets() -> None:
    body = {
        "id": "c",
        "object": "text_completion",
        "created": 1,
        "model": "e",
        "choices": [
            {
                "index": 0,
                "text": "HiHi",
                "finish_reason": "length",
                "logprobs": {"content": [ENGINE_TOKEN, ENGINE_TOKEN]},
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    }
    answer = answers.merge_answers([body], [Shape("m", logprobs=2, text_offset=10)], chat=False)
    check_body("completion", answer)
    assert answer["choices"][0]["logprobs"] == {
        "tokens": ["Hi", "Hi"],
        "token_logprobs": [-0.5, -0.5],
        "top_logprobs": [{"Hi": -0.5, "Yo": -1.5}] * 2,
        "text_offset": [10, 12],
    }


def test_a_chunk_moves_its_usage_out_and_wraps_its_one_logprob() -> None:
    chunk = {
        "id": "7",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "e",
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": "Hi"},
                "finish_reason": "stop",
                "logprobs": ENGINE_TOKEN,
            }
        ],
        "usage": USAGE,
    }
    parts = answers.chat_chunk(chunk, Shape("m", logprobs=2, include_usage=True), index=3)
    assert parts.usage is not None and parts.usage["completion_tokens"] == 2
    assert parts.chunk is not None
    assert parts.chunk["usage"] is None and parts.chunk["choices"][0]["index"] == 3
    assert parts.chunk["choices"][0]["logprobs"]["content"][0]["top_logprobs"][1]["token"] == "Yo"
    without = answers.chat_chunk(chunk, Shape("m"))
    assert without.chunk is not None and "usage" not in without.chunk


def test_completion_chunks_keep_counting_text_offsets() -> None:
    offsets = CompletionOffsets({})
    shape = Shape("m", logprobs=0)
    chunk = {
        "id": "c",
        "object": "text_completion",
        "created": 1,
        "model": "e",
        "choices": [{"index": 0, "text": "Hi", "finish_reason": None, "logprobs": ENGINE_TOKEN}],
    }
    first = answers.completion_chunk(chunk, shape, offsets).chunk
    second = answers.completion_chunk(chunk, shape, offsets).chunk
    assert first is not None and second is not None
    assert first["choices"][0]["logprobs"]["text_offset"] == [0]
    assert second["choices"][0]["logprobs"]["text_offset"] == [2]


def test_the_usage_chunk_is_openais() -> None:
    head = {"id": "7", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": []}
    chunk = answers.usage_chunk(head, {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}, Shape("m"))
    assert chunk == {
        "id": "7",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    }


def test_a_banned_alternative_has_openais_very_unlikely_logprob() -> None:
    banned = {"token": 5, "logprob": None, "bytes": "b"}  # -inf, written as null
    entry = {"token": "a", "logprob": -0.1, "bytes": None, "top_logprobs": [banned]}
    converted = answers.token_logprob(entry, 1)
    assert converted["top_logprobs"] == [{"token": "b", "logprob": -9999.0, "bytes": [98]}]
    assert converted["bytes"] == [97]


@pytest.mark.parametrize(
    ("text", "names", "name", "arguments"),
    [
        ('{"name":"get_weather","arguments":{"city":"Par', ["get_weather"], "get_weather", '{"city":"Par'),
        ('{"name":"get_weather","argu', ["get_weather"], "get_weather", ""),
        ('{"name":"get_w', ["get_time", "get_weather"], "get_weather", ""),  # completed from the tools
        ('{"na', ["get_weather"], "get_weather", ""),  # one tool: it can only be that one
        ('{"na', ["get_time", "get_weather"], "get_time", ""),  # two, no telling which: the first it can be
        ("", [], None, None),  # no tool to name
    ],
)
def test_a_forced_call_cut_by_max_tokens_is_the_call_it_was_becoming(
    text: str, names: list[str], name: str | None, arguments: str | None
) -> None:
    call = answers.cut_tool_call(text, names)
    if name is None:
        assert call is None
        return
    assert call is not None and call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": name, "arguments": arguments}


def test_a_forced_call_cut_by_max_tokens_comes_back_as_a_call_not_as_text() -> None:
    shape = answers.Shape(model="m", forced_tools=("get_weather",))
    engine = {
        "id": "x",
        "choices": [{"message": {"content": '{"name":"get_weather","arguments":{"ci'}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13},
    }
    choice = answers.merge_answers([engine], [shape], chat=True)["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["content"] is None
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"ci'}
    plain = answers.merge_answers([engine], [answers.Shape(model="m")], chat=True)["choices"][0]
    assert plain["message"]["content"].startswith('{"name"')  # not forced: the text is what the model said


async def test_a_forced_calls_stream_holds_its_text_and_ends_with_the_cut_call() -> None:
    from gateway.chat.streams import Leg

    leg = Leg(answers.Shape(model="m", forced_tools=("get_weather",)), chat=True)
    pieces = ['{"name":"get_', 'weather","argu', 'ments":{"city"']
    events: list[dict[str, Any]] = []
    for i, piece in enumerate(pieces):
        finish = "length" if i == len(pieces) - 1 else None
        chunk = {"id": "x", "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": finish}]}
        event = leg.feed(b"data: " + json.dumps(chunk).encode())
        if event is not None and event.data is not None:
            events.append(event.data)
    assert len(events) == 1  # the text never reached the client
    (choice,) = events[0]["choices"]
    assert choice["finish_reason"] == "length" and "content" not in choice["delta"]
    assert choice["delta"]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city"'}

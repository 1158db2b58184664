"""The Ollama translation (gateway/ollama/protocol.py), checked against the ollama client's own types."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from ollama import ChatResponse, GenerateResponse, ListResponse, ProgressResponse, ShowResponse

from gateway.catalog import load_catalog
from gateway.chat.streams import Event
from gateway.dialects.ollama import protocol
from gateway.errors import InvalidRequest

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 32).decode()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_chat_options_format_and_images_become_a_chat_request() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "brief"},
            {"role": "user", "content": "what is it?", "images": [PNG]},
        ],
        "format": {"type": "object"},
        "think": "high",
        "stream": False,
        "options": {
            "temperature": 0.2,
            "top_k": 20,
            "num_predict": 32,
            "stop": ["\n\n"],
            "repeat_penalty": 1.1,
            "seed": 7,
            "num_ctx": 4096,
            "mirostat": 2,
        },
    }
    translated = protocol.chat_request(body)
    assert translated.body == {
        "messages": [
            {"role": "system", "content": "brief"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is it?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                ],
            },
        ],
        "temperature": 0.2,
        "top_k": 20,
        "max_tokens": 32,
        "stop": ["\n\n"],
        "repetition_penalty": 1.1,
        "seed": 7,
        "response_format": {"type": "json_schema", "json_schema": {"name": "format", "schema": {"type": "object"}}},
        "enable_thinking": True,
        "reasoning_effort": "high",
    }
    assert translated.ignored == ["mirostat", "num_ctx"] and not translated.load_only
    assert protocol.chat_request({"model": "m", "messages": [{"role": "user", "content": "x"}]}).body["stream"]
    assert protocol.chat_request({"model": "m", "format": "json", "messages": [{"role": "user", "content": "x"}]}).body[
        "response_format"
    ] == {"type": "json_object"}


def test_tool_calls_get_ids_and_tool_messages_answer_them_in_order() -> None:
    messages = [
        {"role": "user", "content": "weather in Paris and Oslo?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"function": {"name": "weather", "arguments": {"city": "Paris"}}},
                {"function": {"name": "weather", "arguments": {"city": "Oslo"}}},
            ],
        },
        {"role": "tool", "content": "sunny", "tool_name": "weather"},
        {"role": "tool", "content": "snow", "tool_name": "weather"},
    ]
    chat = protocol.chat_request({"model": "m", "messages": messages}).body["messages"]
    ids = [call["id"] for call in chat[1]["tool_calls"]]
    assert chat[1]["content"] is None and chat[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'
    assert [(m["tool_call_id"], m["content"]) for m in chat[2:]] == [(ids[0], "sunny"), (ids[1], "snow")]


def test_generate_is_a_chat_turn_unless_raw() -> None:
    chat = protocol.generate_request({"model": "m", "prompt": "hi", "system": "be brief", "stream": False})
    assert chat.body == {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}
    raw = protocol.generate_request({"model": "m", "prompt": "[INST] hi [/INST]", "raw": True})
    assert raw.raw and raw.body == {"prompt": "[INST] hi [/INST]", "stream": True}
    assert protocol.generate_request({"model": "m"}).load_only


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": "x", "context": [1, 2]}, "context"),
        ({"prompt": "x", "format": "yaml"}, "format"),
        ({"prompt": "x", "options": {"temperature": "hot"}}, "options.temperature"),
        ({"prompt": "x", "images": ["bm90IGFuIGltYWdl"]}, "prompt.images[0]"),
        ({"prompt": "x", "think": "max"}, "think"),
    ],
)
def test_what_cannot_be_translated_is_refused_by_name(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        protocol.generate_request({"model": "m", **body})
    assert caught.value.param == param


def test_a_chat_answer_is_one_object_the_client_reads() -> None:
    clock, wall = Clock(), Clock()
    dialect = protocol.ChatDialect("m", clock, wall)
    clock.now += 2.0
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}}
    answer = {
        "choices": [
            {"finish_reason": "tool_calls", "message": {"role": "assistant", "content": "", "tool_calls": [call]}}
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13},
    }
    response = ChatResponse.model_validate(json.loads(dialect.answer(answer)))
    assert response.done and response.done_reason == "stop" and response.total_duration == 2_000_000_000
    assert response.prompt_eval_count == 9 and response.eval_count == 4
    assert response.message.tool_calls is not None
    assert response.message.tool_calls[0].function.arguments == {"city": "Paris"}


class FakeStream:
    """What gateway.serving.chat.Stream offers a dialect."""

    def __init__(self, chunks: list[dict[str, Any]], clock: Clock) -> None:
        self._chunks = chunks
        self._clock = clock
        self.events = self._events()

    async def _events(self) -> AsyncIterator[Event]:
        for chunk in self._chunks:
            self._clock.now += 0.5
            yield Event(data=chunk)

    def usage(self) -> dict[str, Any]:
        return {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_a_stream_is_ndjson_with_the_counts_and_durations_last() -> None:
    clock = Clock()
    dialect = protocol.GenerateDialect("m", clock, Clock())
    clock.now += 1.0  # waiting for the engine
    chunks = [
        {"choices": [{"index": 0, "delta": {"content": "Hel"}}]},
        {"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "length"}]},
    ]

    async def collect() -> list[bytes]:
        return [line async for line in dialect.stream(FakeStream(chunks, clock))]  # type: ignore[arg-type]

    lines = asyncio.run(collect())
    parts = [GenerateResponse.model_validate(json.loads(line)) for line in lines]
    assert [p.response for p in parts] == ["Hel", "lo", ""] and [p.done for p in parts] == [False, False, True]
    last = parts[-1]
    assert last.done_reason == "length" and last.eval_count == 2 and last.prompt_eval_count == 3
    assert last.load_duration == 1_000_000_000 and last.prompt_eval_duration == 500_000_000
    assert last.eval_duration == 500_000_000 and last.total_duration == 2_000_000_000


def test_models_are_listed_and_shown_as_the_client_expects(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    toml = tmp_path / "models.toml"
    toml.write_text(
        f'[[models]]\nid = "smol"\nkind = "gguf"\npath = "{tmp_path / "m"}"\n'
        'file = "SmolLM2-135M-Instruct.Q4_1.gguf"\naliases = ["llama3.2:1b"]\n'
    )
    model = load_catalog(toml, model_dir=tmp_path).models[0]
    listing = ListResponse.model_validate(
        {"models": [protocol.model_entry(model, name, size=5, modified=1e9) for name in ("smol", "llama3.2:1b")]}
    )
    assert [m.model for m in listing.models] == ["smol:latest", "llama3.2:1b"]
    details = listing.models[0].details
    assert details is not None and details.format == "gguf" and details.quantization_level == "Q4_1"
    shown = ShowResponse.model_validate(protocol.show(model, modified=1e9))
    assert shown.capabilities == ["completion", "tools"]
    assert shown.modelfile and f"FROM {tmp_path / 'm'}/" in shown.modelfile


def test_download_events_become_pull_progress() -> None:
    line = protocol.pull_line("download.progress", {"file": "a.gguf", "bytes": 10, "total": 40})
    progress = ProgressResponse.model_validate(line)
    assert progress.completed == 10 and progress.total == 40 and progress.digest == "a.gguf"
    assert protocol.pull_line("engine.ready", {}) is None

"""The Anthropic Messages and Ollama dialects, driven by their official clients (the `anthropic` SDK, the `ollama`
Python client) against every engine: the fake engine, the bundled engine on a tiny random-weight model, and the
bundled engine on the real model (SmolLM2-135M). The clients parse every answer into their own types, so a shape
they do not accept fails the test.

As in the contract suite, no case asserts what a model says, only what must hold whatever it says: greedy answers
repeat, a stream says what the whole answer says, a forced tool call names the tool with arguments that fit its
schema, the prompt's token count is the one the answer reports.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anthropic
import httpx
import ollama
import pytest

from tests import realmodel
from tests.fileserver import FileServer
from tests.helpers import Gateway, is_json_prefix, start_gateway
from tests.tinymodels import make_qwen3_embedding, make_qwen3_gguf

ENGINES = ["fake", "bundled", "bundled-smollm2"]
GREEDY = {"temperature": 0}
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 32).decode()
FORCED: Any = {"type": "tool", "name": "get_weather"}
NO_TOOL: Any = {"type": "none"}
WEATHER: Any = {
    "name": "get_weather",
    "description": "Get the weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
}


@dataclass
class Target:
    engine: str
    gw: Gateway
    chat_model: str
    tokens: int = 8

    def claude(self, **kw: Any) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.gw.url, api_key="unused", max_retries=0, timeout=300, **kw)

    def ollama(self) -> ollama.Client:
        return ollama.Client(host=self.gw.url, timeout=300)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dialect-models")
    make_qwen3_gguf(root / "q8" / "tiny-Q8_0.gguf", quant="Q8_0")
    make_qwen3_embedding(root / "embed", hidden=64)
    return root


def _models(chat: str, chat_path: Path, embed_path: Path, kind: str = "gguf") -> str:
    return (
        f'default_model = "{chat}"\n[[models]]\nid = "{chat}"\nkind = "{kind}"\npath = "{chat_path}"\n'
        f'aliases = ["claude-haiku-4-5", "llama3.2:1b"]\n'
        f'[[models]]\nid = "embed"\nkind = "embedding"\npath = "{embed_path}"\n'
    )


@pytest.fixture(scope="module", params=ENGINES)
def target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny: Path) -> Iterator[Target]:
    engine: str = request.param
    work = tmp_path_factory.mktemp(f"dialects-{engine}")
    if engine == "fake":
        for name in ("chat", "embed"):
            (work / "models" / name).mkdir(parents=True, exist_ok=True)
        gw = start_gateway(work, _models("chat", work / "models" / "chat", work / "models" / "embed", "plain"))
        t = Target(engine, gw, "chat")
    else:
        pytest.importorskip("mistralrs", reason="the engine extra is not installed")
        env = {"RUST_LOG": "error", "GATEWAY_ENGINE": "bundled", "GATEWAY_ENGINE_BINARY": ""}
        if engine == "bundled-smollm2":
            try:
                gguf = realmodel.smollm2()
            except realmodel.Unavailable as exc:
                pytest.skip(f"the real model could not be fetched: {exc}")
            gw = start_gateway(work, _models("smollm2", gguf, tiny / "embed"), env=env)
            t = Target(engine, gw, "smollm2", tokens=6)
        else:
            gw = start_gateway(work, _models("tiny", tiny / "q8" / "tiny-Q8_0.gguf", tiny / "embed"), env=env)
            t = Target(engine, gw, "tiny")
    try:
        yield t
    finally:
        gw.stop()


# ------------------------------------------------------------------------------------------------- Anthropic


def test_anthropic_create_and_the_stream_helpers_say_the_same(target: Target) -> None:
    client = target.claude()
    # Greedy, for answers that repeat: this SDK no longer offers `temperature` (newer models take none), and the
    # Messages API still does, so it goes as an extra field.
    ask: dict[str, Any] = {
        "model": target.chat_model,
        "max_tokens": target.tokens,
        "extra_body": GREEDY,
        "system": "You are terse.",
        "messages": [{"role": "user", "content": "Say hello."}],
    }
    message = client.messages.create(**ask)
    assert message.type == "message" and message.role == "assistant" and message.model == target.chat_model
    assert message.stop_reason in ("end_turn", "max_tokens") and message.usage.output_tokens > 0
    text = "".join(block.text for block in message.content if block.type == "text")
    with client.messages.stream(**ask) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == text and final.stop_reason == message.stop_reason
    assert final.usage.input_tokens == message.usage.input_tokens > 0
    assert final.usage.output_tokens == message.usage.output_tokens


def test_anthropic_two_turn_tool_loop(target: Target) -> None:
    client = target.claude()
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris? call:get_weather"}]
    first = client.messages.create(
        model=target.chat_model,
        max_tokens=64,
        extra_body=GREEDY,
        messages=messages,
        tools=[WEATHER],
        tool_choice=FORCED,
    )
    uses = [block for block in first.content if block.type == "tool_use"]
    assert first.stop_reason == "tool_use" and len(uses) == 1, first
    assert uses[0].name == "get_weather" and uses[0].input in ({"city": "Paris"}, {"city": "Rome"})
    messages += [
        {"role": "assistant", "content": first.content},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "Sunny, 24 degrees"}],
        },
    ]
    second = client.messages.create(
        model=target.chat_model,
        max_tokens=target.tokens,
        extra_body=GREEDY,
        messages=messages,
        tools=[WEATHER],
        tool_choice=NO_TOOL,
    )
    assert second.stop_reason in ("end_turn", "max_tokens") and second.content[0].type == "text"
    if target.engine == "fake":  # it repeats what the tool said: the result reached the engine as a tool message
        assert second.content[0].text.startswith("tool said: Sunny")


def test_anthropic_count_tokens_is_what_the_answer_reports(target: Target) -> None:
    client = target.claude()
    messages: list[Any] = [{"role": "user", "content": "Count the tokens of this prompt, please."}]
    counted = client.messages.count_tokens(model=target.chat_model, messages=messages, system="Be exact.")
    answer = client.messages.create(model=target.chat_model, max_tokens=2, messages=messages, system="Be exact.")
    assert counted.input_tokens == answer.usage.input_tokens > 0


def test_anthropic_errors_are_anthropic_shaped(target: Target) -> None:
    client = target.claude()
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="nope", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert missing.value.body["type"] == "error" and missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError) as bad:
        image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
        with_image: list[Any] = [{"role": "user", "content": [image]}]
        client.messages.create(model=target.chat_model, max_tokens=4, messages=with_image)
    assert "image" in bad.value.message
    raw = httpx.post(target.gw.url + "/v1/messages", json={"model": target.chat_model, "messages": []}, timeout=30)
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"


# ---------------------------------------------------------------------------------------------------- Ollama


def test_ollama_chat_whole_and_streamed(target: Target) -> None:
    client = target.ollama()
    options = {"temperature": 0, "num_predict": target.tokens}
    messages = [{"role": "user", "content": "Say hello."}]
    whole = client.chat(model="llama3.2:1b", messages=messages, options=options, stream=False)
    assert whole.done and whole.done_reason in ("stop", "length") and whole.message.role == "assistant"
    assert whole.eval_count and whole.prompt_eval_count and whole.total_duration
    parts = list(client.chat(model=f"{target.chat_model}:latest", messages=messages, options=options, stream=True))
    assert [p.done for p in parts][-1] is True and not any(p.done for p in parts[:-1])
    assert "".join(p.message.content or "" for p in parts) == whole.message.content
    assert parts[-1].eval_count == whole.eval_count


def test_ollama_generate(target: Target) -> None:
    client = target.ollama()
    options = {"temperature": 0, "num_predict": target.tokens}
    whole = client.generate(model=target.chat_model, prompt="Say hello.", options=options)
    assert whole.done and whole.response and whole.eval_count
    streamed = "".join(
        p.response or ""
        for p in client.generate(model=target.chat_model, prompt="Say hello.", options=options, stream=True)
    )
    assert streamed == whole.response


def test_ollama_json_formats(target: Target) -> None:
    client = target.ollama()
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    for fmt in ("json", schema):
        answer = client.chat(
            model=target.chat_model,
            format=fmt,
            options={"temperature": 0, "num_predict": 48},
            messages=[{"role": "user", "content": "Is the sky blue? Answer in JSON."}],
        )
        content = answer.message.content or ""
        assert is_json_prefix(content), content
        if answer.done_reason == "stop":  # whole: the format holds from the first character to the last
            value = json.loads(content)
            assert fmt == "json" or value in ({"answer": "yes"}, {"answer": "no"})


def test_ollama_embed_goes_through_the_cache(target: Target) -> None:
    client = target.ollama()
    first = client.embed(model="embed", input=["first text", "second text"])
    assert len(first.embeddings) == 2 and len(first.embeddings[0]) > 0
    hits = target.gw.status()["embedding_cache"]["hits"]
    again = client.embed(model="embed", input="first text")
    assert again.embeddings[0] == first.embeddings[0]
    assert target.gw.status()["embedding_cache"]["hits"] == hits + 1
    assert client.embeddings(model="embed", prompt="second text").embedding == first.embeddings[1]


def test_ollama_list_show_ps_and_keep_alive(target: Target) -> None:
    client = target.ollama()
    assert httpx.get(target.gw.url + "/api/version", timeout=30).json()["version"].count(".") == 2
    names = [m.model for m in client.list().models]
    assert f"{target.chat_model}:latest" in names and "llama3.2:1b" in names and "embed:latest" in names
    shown = client.show(target.chat_model)
    assert shown.capabilities is not None and "completion" in shown.capabilities
    assert shown.details is not None and shown.details.format in ("gguf", "safetensors")

    client.generate(model=target.chat_model, keep_alive=-1)  # no prompt: load it, and keep it
    running = {m.model: m for m in client.ps().models}
    kept = running[f"{target.chat_model}:latest"]
    assert kept.expires_at is not None and kept.expires_at > datetime(2200, 1, 1, tzinfo=UTC)
    assert kept.size is not None and kept.size > 1 << 20  # what the engine process was measured to use
    client.generate(model=target.chat_model, prompt="hi", options={"num_predict": 1}, keep_alive="10m")
    expires = {m.model: m for m in client.ps().models}[f"{target.chat_model}:latest"].expires_at
    assert expires is not None and 590 < (expires - datetime.now(UTC)).total_seconds() <= 600
    unloaded = client.generate(model=target.chat_model, keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert f"{target.chat_model}:latest" not in {m.model for m in client.ps().models}
    assert target.gw.engine(target.chat_model)["state"] == "stopped"


def test_ollama_errors(target: Target) -> None:
    client = target.ollama()
    with pytest.raises(ollama.ResponseError) as missing:
        client.chat(model="nope:7b", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.status_code == 404 and "nope:7b" in missing.value.error
    with pytest.raises(ollama.ResponseError) as bad:
        client.generate(model=target.chat_model, prompt="hi", options={"temperature": "hot"})
    assert bad.value.status_code == 400 and "options.temperature" in bad.value.error
    with pytest.raises(ollama.ResponseError) as no_eyes:  # a model that takes no images says so
        client.chat(model=target.chat_model, messages=[{"role": "user", "content": "what is it?", "images": [PNG]}])
    assert no_eyes.value.status_code == 400 and "image" in no_eyes.value.error


# ------------------------------------------------------------------------- what only the fake engine shows


def test_ollama_tool_loop_and_ignored_options(gateways: Any) -> None:
    gw: Gateway = gateways()
    client = ollama.Client(host=gw.url, timeout=60)
    tools = [
        {
            "type": "function",
            "function": {"name": "get_weather", "description": "weather", "parameters": WEATHER["input_schema"]},
        }
    ]
    messages: list[Any] = [{"role": "user", "content": "call:get_weather"}]
    first = client.chat(model="tiny-chat", messages=messages, tools=tools)
    calls = first.message.tool_calls or []
    assert len(calls) == 1 and calls[0].function.name == "get_weather" and calls[0].function.arguments["city"]
    messages += [first.message, {"role": "tool", "content": "sunny", "tool_name": "get_weather"}]
    second = client.chat(model="tiny-chat", messages=messages, tools=tools)
    assert second.message.content == "tool said: sunny"
    raw = httpx.post(
        gw.url + "/api/chat",
        timeout=60,
        json={
            "model": "tiny-chat",
            "stream": False,
            "messages": [{"role": "user", "content": "hi"}],
            "options": {"num_ctx": 8192, "mirostat": 1, "temperature": 0},
        },
    )
    assert raw.status_code == 200 and raw.headers["x-ignored-options"] == "mirostat,num_ctx"


def test_ollama_pull_shows_the_downloader_progress(gateways: Any) -> None:
    with FileServer(b"\0" * (3 << 20), path="/files/tiny-Q8_0.gguf") as server:
        server.chunk_delay = 0.01
        toml = (
            f'[[models]]\nid = "tiny-chat"\nkind = "gguf"\nurl = "{server.url}"\nfile = "tiny/tiny-Q8_0.gguf"\n'
            f'sha256 = "{server.sha256}"\n'
        )
        gw: Gateway = gateways(toml)
        client = ollama.Client(host=gw.url, timeout=60)
        progress = list(client.pull("tiny-chat", stream=True))
        statuses = [p.status for p in progress]
        assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
        sizes = [p.completed or 0 for p in progress if p.digest == "tiny/tiny-Q8_0.gguf"]
        assert len(sizes) >= 2 and sizes == sorted(sizes) and sizes[-1] == 3 << 20
        assert (Path(gw.env["GATEWAY_MODEL_DIR"]) / "tiny" / "tiny-Q8_0.gguf").stat().st_size == 3 << 20
        again = list(client.pull("tiny-chat", stream=True))  # present already: no download
        assert again[-1].status == "success" and len(server.gets()) == 1
        with pytest.raises(ollama.ResponseError) as missing:
            client.pull("nope")
        assert missing.value.status_code == 404


def test_anthropic_keys_streams_and_failures(gateways: Any) -> None:
    gw: Gateway = gateways(env={"GATEWAY_API_KEYS": "sk-one"})
    with pytest.raises(anthropic.AuthenticationError) as refused:
        anthropic.Anthropic(base_url=gw.url, api_key="wrong", max_retries=0).messages.create(
            model="tiny-chat", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
        )
    assert refused.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    client = anthropic.Anthropic(base_url=gw.url, api_key="sk-one", max_retries=0, timeout=60)  # sent as x-api-key
    answer = client.messages.create(model="tiny-chat", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert answer.content[0].type == "text" and answer.content[0].text == "echo: hi"
    crash: list[Any] = [{"role": "user", "content": "crash"}]  # the engine dies mid-stream: an `error` event
    with (
        pytest.raises(anthropic.APIStatusError) as broken,
        client.messages.stream(model="tiny-chat", max_tokens=8, messages=crash) as stream,
    ):
        list(stream.text_stream)
    assert "engine" in str(broken.value).lower()
    models = httpx.get(
        gw.url + "/v1/models", headers={"x-api-key": "sk-one", "anthropic-version": "2023-06-01"}, timeout=30
    ).json()
    assert models["data"][0]["type"] == "model" and "display_name" in models["data"][0]
    listed = [m.id for m in client.models.list()]
    assert "tiny-chat" in listed

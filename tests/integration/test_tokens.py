"""Tokens as fast as the engine can go (issue 20), with real engine processes: the fast recipe (a slow GGUF served
converted, with its warning, `check` and `convert`), prompt limits before prefill in every dialect, a client that
leaves or is cancelled during a long prefill, an agent's second turn served from the prefix cache.

The gateway runs in this process (tests/inprocess.py) in front of the bundled engine: on tiny random-weight models
where only the mechanics matter, on the real model (SmolLM2-135M, tests/realmodel.py) where the engine's speed is the
point. No test asserts a duration: what the engine did is read from the gateway's own records (which process served,
what the log says), and the prefix cache from a ratio of two measurements in one run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import anthropic
import httpx
import openai
import pytest

from gateway.models.metadata import read_gguf
from gateway.models.prompts import ModelFiles, load_counter
from tests.helpers import Gateway, wait_for
from tests.tinymodels import make_qwen3_gguf

pytest.importorskip("mistralrs", reason="the engine extra is not installed")

Start = Callable[..., Gateway]
BUNDLED = {"GATEWAY_ENGINE": "bundled", "GATEWAY_ENGINE_BINARY": "", "RUST_LOG": "error"}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def gguf_model(model_id: str, path: Path, **options: Any) -> str:
    lines = ["[[models]]", f'id = "{model_id}"', 'kind = "gguf"', f'path = "{path}"']
    if options:
        lines.append("[models.options]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in options.items()]
    return "\n".join(lines) + "\n"


def engine_lines(gw: Gateway) -> list[str]:
    """What the engines printed, and the command lines they were started with."""
    return [line for line in gw.log().splitlines() if "gateway.engine" in line]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tokens-tiny")
    return make_qwen3_gguf(root / "tiny-Q8_0.gguf", quant="Q8_0")


# ------------------------------------------------------------------------------------------- the fast recipe


def test_a_slow_gguf_is_warned_about_and_served_converted_to_q8_0(gateways: Start, tmp_path: Path) -> None:
    slow = make_qwen3_gguf(tmp_path / "files" / "tiny-Q4_1.gguf", quant="Q4_1")
    toml = gguf_model("tiny", slow) + gguf_model("kept", slow, quant="as-is")
    gw = gateways(toml, env=BUNDLED)
    warnings = [line for line in gw.log().splitlines() if "WARNING" in line and "Q4_1 is slow" in line]
    assert len(warnings) == 2 and "Q8_0 is served instead" in warnings[0] and "mistral-gateway convert" in warnings[0]
    assert 'served as it is (quant = "as-is")' in warnings[1]

    client = openai.OpenAI(base_url=gw.v1, api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model="tiny", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content is not None
    converted = Path(gw.env["GATEWAY_MODEL_DIR"]) / "converted" / "tiny-Q8_0.gguf"
    assert read_gguf(converted).weight_type() == "Q8_0" and read_gguf(slow).weight_type() == "Q4_1"
    started = [line for line in engine_lines(gw) if "starting engine:" in line]
    assert "--quantized-filename tiny-Q8_0.gguf" in started[0] and str(converted.parent) in started[0]
    done = [line for line in gw.log().splitlines() if '"type":"convert.done"' in line]
    assert len(done) == 1

    client.chat.completions.create(model="kept", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    started = [line for line in engine_lines(gw) if "starting engine:" in line]
    assert "--quantized-filename tiny-Q4_1.gguf" in started[1]  # as the models file says


def test_check_names_the_slow_type_and_convert_writes_the_fast_copy_the_gateway_then_uses(
    gateways: Start, tmp_path: Path
) -> None:
    slow = make_qwen3_gguf(tmp_path / "files" / "tiny-Q4_1.gguf", quant="Q4_1")
    models = tmp_path / "models.toml"
    models.write_text(gguf_model("tiny", slow))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")},
        "GATEWAY_MODELS_FILE": str(models),
        "GATEWAY_MODEL_DIR": str(tmp_path / "dir"),
        "GATEWAY_ENGINE": "bundled",
    }
    check = subprocess.run(
        [sys.executable, "-m", "gateway", "check"], env=env, capture_output=True, text=True, timeout=120
    )
    assert "weights of tiny: Q4_1, SLOW:" in check.stdout and "Q8_0 is served instead" in check.stdout, check.stdout
    convert = subprocess.run(
        [sys.executable, "-m", "gateway", "convert", "tiny"], env=env, capture_output=True, text=True, timeout=300
    )
    assert convert.returncode == 0, convert.stderr
    target = tmp_path / "dir" / "converted" / "tiny-Q8_0.gguf"
    assert read_gguf(target).weight_type() == "Q8_0" and str(target) in convert.stdout

    gw = gateways(models.read_text(), env={**BUNDLED, "GATEWAY_MODEL_DIR": str(tmp_path / "dir")})
    httpx.post(
        gw.v1 + "/chat/completions",
        json={"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
        timeout=120,
    ).raise_for_status()
    assert not [line for line in gw.log().splitlines() if '"type":"convert.started"' in line]  # done already


# --------------------------------------------------------------------------------------- prompt limits


def test_the_gateways_prompt_count_is_the_engines_own(gateways: Start, tiny: Path, smollm2: Path) -> None:
    gw = gateways(gguf_model("tiny", tiny) + gguf_model("smollm2", smollm2), env=BUNDLED)
    client = openai.OpenAI(base_url=gw.v1, api_key="unused", max_retries=0)
    chats: list[dict[str, Any]] = [
        {"messages": [{"role": "user", "content": "Say hello"}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2 = ?"}]},
        {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER]},
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "Tell me a joke about llamas."},
            ]
        },
    ]
    for model, path in (("tiny", tiny), ("smollm2", smollm2)):
        counter = load_counter(ModelFiles(gguf=path))
        assert counter is not None
        for chat in chats:
            reply = client.chat.completions.create(model=model, max_tokens=1, temperature=0, **chat)
            assert reply.usage is not None and counter.count(chat) == reply.usage.prompt_tokens, (model, chat)


def test_a_prompt_that_cannot_fit_is_refused_at_once_in_every_dialect(gateways: Start, tiny: Path) -> None:
    gw = gateways(gguf_model("tiny", tiny), env=BUNDLED)  # its GGUF says: a context of 2048 tokens
    long = "the quick brown fox jumps over the lazy dog " * 400
    openai_reply = httpx.post(
        gw.v1 + "/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": long}]}
    )
    assert openai_reply.status_code == 400
    error = openai_reply.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert "maximum context length is 2048 tokens" in error["message"]

    claude = anthropic.Anthropic(base_url=gw.url, api_key="unused", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as info:
        claude.messages.create(model="tiny", max_tokens=100, messages=[{"role": "user", "content": long}])
    assert str(info.value.body["error"]["message"]).startswith("prompt is too long: ")  # type: ignore[index]
    assert "tokens > 2048 maximum" in str(info.value.body)

    ollama_reply = httpx.post(
        gw.url + "/api/chat", json={"model": "tiny", "messages": [{"role": "user", "content": long}]}
    )
    assert ollama_reply.status_code == 400 and "maximum context length is 2048" in ollama_reply.json()["error"]
    assert gw.engine()["starts"] == 0  # refused before any engine was started


def test_max_tokens_beyond_the_context_is_refused_by_openai_and_clamped_by_anthropic_and_ollama(
    gateways: Start, tiny: Path
) -> None:
    gw = gateways(gguf_model("tiny", tiny, max_seq_len=64), env=BUNDLED)  # a context of 64 tokens
    hello = [{"role": "user", "content": "hello there"}]
    refused = httpx.post(gw.v1 + "/chat/completions", json={"model": "tiny", "max_tokens": 500, "messages": hello})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"
    assert "you requested" in refused.json()["error"]["message"]

    client = openai.OpenAI(base_url=gw.v1, api_key="unused", max_retries=0)
    open_ended = client.chat.completions.create(model="tiny", temperature=0, messages=hello)  # type: ignore[arg-type]
    assert open_ended.usage is not None
    assert open_ended.usage.prompt_tokens + open_ended.usage.completion_tokens <= 64

    claude = anthropic.Anthropic(base_url=gw.url, api_key="unused", max_retries=0)
    message = claude.messages.create(model="tiny", max_tokens=32000, messages=hello, timeout=120)  # type: ignore[arg-type]
    assert message.usage.input_tokens + message.usage.output_tokens <= 64
    if message.usage.output_tokens < 32000 and message.stop_reason != "end_turn":
        assert message.stop_reason == "model_context_window_exceeded"

    ollama = httpx.post(
        gw.url + "/api/chat",
        json={"model": "tiny", "stream": False, "messages": hello, "options": {"num_predict": 10_000}},
        timeout=120,
    )
    assert ollama.status_code == 200
    body = ollama.json()
    assert body["prompt_eval_count"] + body["eval_count"] <= 64


# ------------------------------------------------------------------------------- leaving frees the engine


class Prefill:
    """A streamed chat whose long prompt keeps the engine in prefill, sent on a socket of its own so that
    ``leave()`` can close the connection before the engine sent anything, as a client that gives up does."""

    def __init__(self, gw: Gateway, prompt: str) -> None:
        body = json.dumps(
            {"model": "smollm2", "stream": True, "max_tokens": 8, "messages": [{"role": "user", "content": prompt}]}
        ).encode()
        host, port = gw.url.removeprefix("http://").split(":")
        self._sock = socket.create_connection((host, int(port)), timeout=600)
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self._sock.sendall(head.encode() + body)
        self.received = b""

    def read_all(self) -> bytes:
        while chunk := self._sock.recv(65536):
            self.received += chunk
        return self.received

    def leave(self) -> None:
        self._sock.close()


@pytest.fixture
def warm(gateways: Start, smollm2: Path) -> Iterator[Gateway]:
    gw = gateways(gguf_model("smollm2", smollm2), env={**BUNDLED, "GATEWAY_LOG_LEVEL": "info"})
    httpx.post(
        gw.v1 + "/chat/completions",
        json={"model": "smollm2", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]},
        timeout=120,
    ).raise_for_status()
    yield gw


def _long_prompt() -> str:
    return "Here is a list of words to remember: " + " ".join(f"item{i}" for i in range(1500))  # about 6,400 tokens


def test_a_client_that_leaves_during_a_long_prefill_frees_the_engine_for_the_next_request(warm: Gateway) -> None:
    gw = warm
    first_pid = gw.engine()["pid"]
    prefill = Prefill(gw, _long_prompt())
    wait_for(lambda: gw.engine()["in_flight"] == 1, 30, "the long request to reach the engine")
    prefill.leave()  # the client goes before any byte of the answer
    abandoned = wait_for(lambda: [line for line in gw.log().splitlines() if "cannot abort" in line], 30, "the log")
    assert "prefill of its" in abandoned[0] and "tokens" in abandoned[0]
    reply = httpx.post(
        gw.v1 + "/chat/completions",
        json={"model": "smollm2", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]},
        timeout=120,
    )
    assert reply.status_code == 200
    # Served by a fresh engine: the one busy with the abandoned prefill was stopped, not waited for.
    assert gw.engine()["pid"] != first_pid and gw.engine()["starts"] == 2


def test_an_operators_cancel_during_a_long_prefill_frees_the_engine_too(warm: Gateway) -> None:
    gw = warm
    first_pid = gw.engine()["pid"]
    prefill = Prefill(gw, _long_prompt())
    record = wait_for(lambda: _in_flight(gw), 30, "the long request in flight")[0]
    assert httpx.post(f"{gw.url}/admin/requests/{record['id']}/cancel", timeout=10).json()["cancelled"] is True
    answer = prefill.read_all().decode()
    assert answer.startswith("HTTP/1.1 503 ")  # nothing had been sent: an error answer, not a stream
    error = json.loads(answer.split("\r\n\r\n", 1)[1])["error"]
    assert error["code"] == "request_cancelled"
    wait_for(lambda: gw.engine()["pid"] != first_pid or gw.engine()["state"] == "stopped", 30, "the engine to stop")
    reply = httpx.post(
        gw.v1 + "/chat/completions",
        json={"model": "smollm2", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]},
        timeout=120,
    )
    assert reply.status_code == 200 and gw.engine()["starts"] == 2


def _in_flight(gw: Gateway) -> list[dict[str, Any]]:
    requests: list[dict[str, Any]] = httpx.get(gw.url + "/admin/requests", timeout=10).json()["in_flight"]
    return requests


# ----------------------------------------------------------------------------------- an agent's second turn


def _ttft(client: openai.OpenAI, messages: list[dict[str, Any]]) -> tuple[float, str]:
    began = time.perf_counter()
    first: float | None = None
    text = []
    chunks = client.chat.completions.create(
        model="smollm2", stream=True, max_tokens=8, temperature=0, messages=cast(Any, messages)
    )
    for chunk in chunks:
        for choice in chunk.choices:
            if choice.delta.content:
                first = first or time.perf_counter()
                text.append(choice.delta.content)
    assert first is not None
    return first - began, "".join(text)


def test_an_agents_second_turn_prefills_only_its_new_tokens(warm: Gateway) -> None:
    """An agent resends the same long system prompt every turn: the engine's prefix cache makes the second turn's
    first token come in a fraction of the first's (a ratio in one run, not a duration)."""
    client = openai.OpenAI(base_url=warm.v1, api_key="unused", max_retries=0)
    system = "You are a coding agent. Rules: " + " ".join(f"rule {i}: be careful with item {i}." for i in range(100))
    turn1 = [{"role": "system", "content": system}, {"role": "user", "content": "List the files."}]
    first, answer = _ttft(client, turn1)
    turn2 = [*turn1, {"role": "assistant", "content": answer}, {"role": "user", "content": "Now read main.py."}]
    second, _ = _ttft(client, turn2)
    assert second < 0.5 * first, (first, second)

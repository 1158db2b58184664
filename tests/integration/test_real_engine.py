"""End to end with the real mistral.rs engine on tiny random-weight models written by the test.

Runs against the bundled engine server (the `mistralrs` package), and against `mistralrs` /
`mistralrs-server` binaries when they are on PATH (skipped, with the reason, when they are not).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import httpx
import openai
import pytest

from tests.helpers import Gateway, pid_alive, start_gateway, wait_for
from tests.tinymodels import make_qwen3_embedding, make_qwen3_gguf, make_qwen3_safetensors

T = TypeVar("T")

HIDDEN = 64
ENGINES = ["bundled", "mistralrs", "mistralrs-server"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    make_qwen3_gguf(root / "q8" / "tiny-Q8_0.gguf", quant="Q8_0")
    make_qwen3_safetensors(root / "plain")
    # Larger, so that generating costs more than relaying a chunk: batching shows in wall time.
    make_qwen3_safetensors(root / "wide", hidden=256, layers=4, heads=8, kv_heads=4)
    make_qwen3_embedding(root / "embed", hidden=HIDDEN)
    return root


def models_toml(root: Path) -> str:
    return f"""
default_model = "tiny-q8"

[[models]]
id = "tiny-q8"
kind = "gguf"
path = "{root / "q8" / "tiny-Q8_0.gguf"}"
aliases = ["gpt-4o-mini"]

[[models]]
id = "tiny-plain"
kind = "plain"
path = "{root / "plain"}"

[[models]]
id = "tiny-embed"
kind = "embedding"
path = "{root / "embed"}"

[[models]]
id = "tiny-wide"
kind = "plain"
path = "{root / "wide"}"
"""


def _engine_env(engine: str) -> dict[str, str]:
    if engine == "bundled":
        pytest.importorskip("mistralrs", reason="the engine extra is not installed")
        return {"GATEWAY_ENGINE": "bundled", "GATEWAY_ENGINE_BINARY": ""}
    path = shutil.which(engine)
    if path is None:
        pytest.skip(f"no `{engine}` binary on PATH: the real-binary run of the end-to-end suite is skipped")
    return {"GATEWAY_ENGINE": engine, "GATEWAY_ENGINE_BINARY": path}


@pytest.fixture(params=ENGINES)
def engine_env(request: pytest.FixtureRequest) -> dict[str, str]:
    return _engine_env(request.param)


@pytest.fixture
def real_gateway(tmp_path: Path, tiny_models: Path, engine_env: dict[str, str]) -> Iterator[Callable[..., Gateway]]:
    started: list[Gateway] = []

    def start(toml: str | None = None, **env: str) -> Gateway:
        gw = start_gateway(
            tmp_path,
            toml or models_toml(tiny_models),
            env={**engine_env, "RUST_LOG": "error", **env},
            name=f"gw{len(started)}",
        )
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


def sdk(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.v1, api_key="unused", max_retries=0, timeout=120)


def ask(client: openai.OpenAI, model: str, text: str = "hello there", tokens: int = 12, **kw: object) -> object:
    return client.chat.completions.create(  # type: ignore[call-overload]
        model=model, messages=[{"role": "user", "content": text}], max_tokens=tokens, temperature=0, **kw
    )


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_chat_stream_completions_embeddings_models_and_lifecycle(real_gateway: Callable[..., Gateway]) -> None:
    gw = real_gateway(GATEWAY_IDLE_TIMEOUT="2")
    client = sdk(gw)
    assert {m.id for m in client.models.list().data} >= {"tiny-q8", "gpt-4o-mini", "tiny-plain", "tiny-embed"}
    assert gw.engine()["state"] == "stopped"  # lazy: /v1/models does not start it

    began = time.monotonic()
    reply = ask(client, "tiny-q8")
    cold = time.monotonic() - began
    text = reply.choices[0].message.content  # type: ignore[attr-defined]
    assert text and reply.model == "tiny-q8" and reply.usage.completion_tokens == 12  # type: ignore[attr-defined]
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in ask(client, "gpt-4o-mini", stream=True)  # type: ignore[attr-defined]
        if c.choices
    )
    assert streamed == text  # greedy decoding: the same text, streamed or not
    by_default = httpx.post(
        gw.v1 + "/chat/completions",
        json={"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 12, "temperature": 0},
        timeout=60,
    )
    assert by_default.json()["choices"][0]["message"]["content"] == text and by_default.json()["model"] == "tiny-q8"
    # Read now: the idle timeout (2 s) starts with this answer, and the other models' requests below do not reset it;
    # on a busy machine they take longer than that.
    engine = gw.engine()
    pid, rss = engine["pid"], rss_mb(engine["pid"])

    plain = ask(client, "tiny-plain")
    assert plain.choices[0].message.content  # type: ignore[attr-defined]
    completion = client.completions.create(model="tiny-plain", prompt="once upon a time", max_tokens=6, temperature=0)
    assert completion.choices[0].text and completion.usage and completion.usage.completion_tokens == 6

    vectors = client.embeddings.create(model="tiny-embed", input=["a first text", "a second one"])
    assert [len(d.embedding) for d in vectors.data] == [HIDDEN, HIDDEN]
    assert abs(sum(x * x for x in vectors.data[0].embedding) - 1) < 1e-3
    default_embed = httpx.post(gw.v1 + "/embeddings", json={"input": "a first text"}, timeout=60).json()
    assert default_embed["model"] == "tiny-embed"
    assert default_embed["data"][0]["embedding"] == pytest.approx(vectors.data[0].embedding, abs=1e-6)

    print(
        f"\ncold start {cold:.2f} s (engine load {engine['last_start_seconds']} s); "
        f"engine RSS while running {rss:.0f} MB"
    )
    wait_for(lambda: gw.engine()["state"] == "stopped", 30, "idle stop")
    wait_for(lambda: not pid_alive(pid), 10, "the engine process to exit")
    assert not os.path.exists(f"/proc/{pid}/status") or not pid_alive(pid)  # its memory is gone with it
    again = ask(client, "tiny-q8")
    assert again.choices[0].message.content == text  # type: ignore[attr-defined]
    assert gw.engine()["starts"] == 2


def test_errors_come_out_openai_shaped(real_gateway: Callable[..., Gateway]) -> None:
    gw = real_gateway()
    client = sdk(gw)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-embed", messages=[{"role": "user", "content": "x"}])
    response = httpx.post(gw.v1 + "/embeddings", json={"input": "x", "dimensions": 8}, timeout=60)
    assert response.status_code in (400, 422) and set(response.json()["error"]) == {"message", "type", "param", "code"}
    response = httpx.post(
        gw.v1 + "/chat/completions",
        timeout=60,
        json={
            "model": "tiny-plain",
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 5,
            "grammar": {"type": "regex", "value": "("},
        },
    )
    assert response.status_code in (400, 422, 500) and "message" in response.json()["error"]


def _at_once(n: int, call: Callable[[int], T]) -> list[T]:
    """``call(0)`` ... ``call(n - 1)`` in threads of their own, released together at a barrier: their results; a
    failure in any of them fails the test here."""
    results: list[T] = []
    errors: list[BaseException] = []
    go = threading.Barrier(n)

    def one(i: int) -> None:
        try:
            go.wait(60)
            results.append(call(i))
        except BaseException as exc:  # asserted below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert errors == [], errors
    assert len(results) == n
    return results


def _fire(client: openai.OpenAI, model: str, n: int, stream: bool, tokens: int) -> None:
    """``n`` chats at once, each answered with some text."""

    def one(i: int) -> str | None:
        if stream:
            pieces = ask(client, model, f"prompt {i}", tokens, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)  # type: ignore[attr-defined]
        text: str | None = ask(client, model, f"prompt {i}", tokens).choices[0].message.content  # type: ignore[attr-defined]
        return text

    assert all(_at_once(n, one))


@pytest.mark.parametrize("engine_env", ["bundled"], indirect=True)
def test_concurrent_requests_on_quantized_and_unquantized_models(real_gateway: Callable[..., Gateway]) -> None:
    gw = real_gateway()
    client = sdk(gw)
    ask(client, "tiny-plain", tokens=2)  # start the engine outside the measurements
    for model in ("tiny-q8", "tiny-plain"):
        for stream in (True, False):
            _fire(client, model, 8, stream, 40)  # 8 at once: none may fail ("not contiguous" on quantized)
    # Side by side, not one after another: streams are in progress at the same time (between their first token and
    # their end). Not all eight at once: on a busy machine the client's threads start at different moments, and a
    # stream alone takes a fraction of a second. (How much faster side by side is depends on the cores the engine
    # has: tests/bench/engine.py measures it.)
    ask(client, "tiny-wide", tokens=2)

    def span(i: int) -> tuple[float, float]:
        first = None
        for chunk in ask(client, "tiny-wide", f"prompt {i}", 200, stream=True):  # type: ignore[attr-defined]
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.monotonic()
        assert first is not None
        return first, time.monotonic()

    spans = _at_once(8, span)
    together = max(sum(1 for first, end in spans if first <= moment < end) for moment, _ in spans)
    assert together >= 2, spans  # one at a time would be 1


def test_two_models_one_engine_each_by_id_and_default(real_gateway: Callable[..., Gateway], tiny_models: Path) -> None:
    toml = f"""
[[models]]
id = "chat"
kind = "gguf"
path = "{tiny_models / "q8" / "tiny-Q8_0.gguf"}"
[[models]]
id = "embed"
kind = "embedding"
path = "{tiny_models / "embed"}"
"""
    gw = real_gateway(toml)
    chat = httpx.post(
        gw.v1 + "/chat/completions", timeout=60, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    )
    assert chat.status_code == 200 and chat.json()["model"] == "chat"
    embed = httpx.post(gw.v1 + "/embeddings", json={"input": "hi"}, timeout=60)
    assert embed.status_code == 200 and embed.json()["model"] == "embed"
    assert len(embed.json()["data"][0]["embedding"]) == HIDDEN
    assert len(gw.spawns()) == 0 and gw.engine()["starts"] == 1  # one engine process for both


@pytest.mark.parametrize("engine_env", ["bundled"], indirect=True)
def test_a_model_that_fails_to_load_is_a_clear_503(real_gateway: Callable[..., Gateway], tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    gw = real_gateway(f'[[models]]\nid = "broken"\nkind = "plain"\npath = "{tmp_path / "empty"}"\n')
    response = httpx.post(
        gw.v1 + "/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}, timeout=60
    )
    assert response.status_code == 503 and "retry-after" in response.headers
    message = response.json()["error"]["message"]
    assert "exited with code 1" in message and "tokenizer.json" in message


MCP_SERVER = """
import json, sys, pathlib
pathlib.Path(sys.argv[1]).write_text("started")
# Just enough of MCP over stdio for a client to connect and list (no) tools.
for line in sys.stdin:
    msg = json.loads(line)
    if "id" not in msg:
        continue
    method = msg.get("method")
    if method == "initialize":
        result = {"protocolVersion": msg["params"].get("protocolVersion", "2024-11-05"),
                  "capabilities": {"tools": {}}, "serverInfo": {"name": "probe", "version": "1"}}
    elif method == "tools/list":
        result = {"tools": []}
    else:
        result = {}
    sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": result}) + "\\n")
    sys.stdout.flush()
"""


@pytest.mark.parametrize("engine_env", ["bundled"], indirect=True)
def test_isq_uqff_and_mcp_config_reach_the_engine(
    real_gateway: Callable[..., Gateway], tiny_models: Path, tmp_path: Path
) -> None:
    import json
    import sys

    from tests.tinymodels import make_uqff

    uqff_dir = tmp_path / "uqff"
    uqff = make_uqff(tiny_models / "plain", uqff_dir)
    marker = tmp_path / "mcp-started"
    server = tmp_path / "mcp_server.py"
    server.write_text(MCP_SERVER)
    mcp = tmp_path / "mcp.json"
    mcp.write_text(
        json.dumps(
            {
                "servers": [
                    {
                        "id": "probe",
                        "name": "probe",
                        "source": {"type": "Process", "command": sys.executable, "args": [str(server), str(marker)]},
                    }
                ]
            }
        )
    )
    toml = f"""
[engine]
mcp_config = "{mcp}"
[[models]]
id = "isq"
kind = "plain"
path = "{tiny_models / "plain"}"
[models.options]
isq = "Q8_0"
[[models]]
id = "uqff"
kind = "plain"
path = "{tiny_models / "plain"}"
[models.options]
from_uqff = "{uqff_dir / uqff}"
"""
    gw = real_gateway(toml)
    client = sdk(gw)
    isq = ask(client, "isq", tokens=8).choices[0].message.content  # type: ignore[attr-defined]
    from_file = ask(client, "uqff", tokens=8).choices[0].message.content  # type: ignore[attr-defined]
    assert isq and from_file == isq  # the same Q8_0 weights, quantised at load or read from the UQFF file
    assert marker.read_text() == "started"  # the engine started the MCP server of the config
    for model in ("isq", "uqff"):  # quantized: concurrent requests must all succeed
        _fire(client, model, 8, True, 20)
    assert "quantized: prefill one request at a time" in gw.log()


@pytest.mark.parametrize("engine_env", ["bundled"], indirect=True)
def test_a_tiny_model_served_over_http_is_downloaded_loaded_and_answers(
    real_gateway: Callable[..., Gateway], tiny_models: Path
) -> None:
    from tests.fileserver import FileServer

    content = (tiny_models / "q8" / "tiny-Q8_0.gguf").read_bytes()
    with FileServer(content, path="/unsloth/tiny-Q8_0.gguf") as server:
        gw = real_gateway(
            f'[[models]]\nid = "remote"\nkind = "gguf"\nurl = "{server.url}"\n'
            f'file = "remote/tiny-Q8_0.gguf"\nsha256 = "{server.sha256}"\n'
        )
        reply = ask(sdk(gw), "remote", tokens=6)
        assert reply.choices[0].message.content and reply.model == "remote"  # type: ignore[attr-defined]
        assert len(server.gets()) == 1


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("engine_env", ["bundled"], indirect=True)
def test_a_client_that_goes_away_stops_its_generation(real_gateway: Callable[..., Gateway], tmp_path: Path) -> None:
    # A context long enough that the 100,000 tokens asked for would take minutes if nobody stopped them.
    make_qwen3_safetensors(
        tmp_path / "long", hidden=256, layers=4, heads=8, kv_heads=4, max_position_embeddings=1 << 20
    )
    gw = real_gateway(f'[[models]]\nid = "tiny-wide"\nkind = "plain"\npath = "{tmp_path / "long"}"\n')
    ask(sdk(gw), "tiny-wide", tokens=2)  # the engine is up
    pid = gw.engine()["pid"]
    body = {
        "model": "tiny-wide",
        "stream": True,
        "max_tokens": 100_000,
        "temperature": 0,
        "messages": [{"role": "user", "content": "go on and on"}],
    }
    with httpx.stream("POST", gw.v1 + "/chat/completions", json=body, timeout=60) as response:
        chunks = response.iter_lines()
        assert next(line for line in chunks if line.startswith("data: {"))
        generating = _cpu_seconds(pid)
        wait_for(lambda: _cpu_seconds(pid) - generating > 0.2, 20, "the engine to be busy generating")
    # Gone: within moments the engine must be idle again, not generating the rest of 100,000 tokens.

    def idle() -> bool:
        before = _cpu_seconds(pid)
        time.sleep(0.5)  # a measuring window, not a wait for an event
        return _cpu_seconds(pid) - before < 0.1

    wait_for(idle, 20, "the engine to stop generating for the client that left")
    assert gw.engine()["in_flight"] == 0
    # The same for a client that did not stream and gave up waiting for the whole answer.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gw.v1 + "/chat/completions", json={**body, "stream": False}, timeout=2)
    wait_for(idle, 20, "the engine to stop generating for the non-streaming client that left")
    wait_for(lambda: gw.engine()["in_flight"] == 0, 10, "the request to be released")

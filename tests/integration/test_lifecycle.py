"""The engine's lifecycle through a real gateway process and the fake engine, driven by the openai SDK."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers import FAKE_ENGINE, Gateway, free_port, pid_alive, wait_for
from tests.integration.conftest import models_toml

Start = Callable[..., Gateway]


def client(gw: Gateway, **kw: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.v1, api_key="unused", max_retries=0, **kw)  # type: ignore[arg-type]


SHARED = (
    '[[groups]]\nname = "all"\nmodels = ["tiny-chat", "tiny-gguf", "tiny-embed", "tiny-flux", "tiny-speech"]\n'
    "share_engine = true\n"
)
SOLO = '[[models]]\nid = "solo"\nkind = "plain"\nrepo = "org/solo"\nprefetch = false\n'


def say(text: str, **kw: object) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": text}], **kw}


def test_lazy_start_and_models_without_engine(gateways: Start) -> None:
    gw = gateways()
    models = client(gw).models.list()
    ids = [m.id for m in models.data]
    assert ids[:3] == ["tiny-chat", "gpt-4o-mini", "tiny-gguf"]
    assert gw.spawns() == [] and gw.engine()["state"] == "stopped"
    assert httpx.get(gw.url + "/healthz").status_code == 200
    assert httpx.get(gw.url + "/readyz").status_code == 200
    assert gw.spawns() == []

    reply = client(gw).chat.completions.create(model="gpt-4o-mini", **say("hello world"))  # type: ignore[call-overload]
    assert reply.choices[0].message.content == "echo: hello world"
    assert reply.model == "tiny-chat"  # the configured id, never the engine's folder path
    assert len(gw.spawns()) == 1  # the chat model's own engine, not the other models'
    argv = gw.spawns()[0]["argv"]
    assert argv[:4] == ["--serve-ip", "127.0.0.1", "--port", str(gw.engine()["port"])]
    assert argv[4] == "plain" and "multi-model" not in argv
    assert [e["state"] for e in gw.engines()] == ["ready", "stopped", "stopped", "stopped", "stopped"]
    # The engine's output reaches the gateway log, prefixed with its pid.
    pid = gw.engine()["pid"]
    wait_for(lambda: f"engine[{pid}]: mistralrs fake engine" in gw.log(), 5, "engine output in the log")


def test_default_model_is_filled_in_and_mapped_to_the_engine_id(gateways: Start, tmp_path: Path) -> None:
    gw = gateways()
    httpx.post(gw.v1 + "/chat/completions", json=say("hi"), timeout=30).raise_for_status()
    emb = client(gw).embeddings.create(input=["a", "b"], model="tiny-embed")
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 64 and emb.model == "tiny-embed"
    httpx.post(gw.v1 + "/embeddings", json={"input": "c"}, timeout=30).raise_for_status()
    sent = [r["body"] for r in gw.upstream_requests() if r["method"] == "POST"]
    # Each model in an engine of its own, loaded from its folder: the engine knows it by that folder.
    assert sent[0]["model"] == str(tmp_path / "models" / "chat")
    assert sent[-1]["model"] == str(tmp_path / "models" / "embed")
    httpx.post(gw.v1 + "/chat/completions", json={"model": "gpt-4o-mini", **say("hi")}, timeout=30)
    sent = [r["body"] for r in gw.upstream_requests() if r["method"] == "POST"]
    assert sent[-1]["model"] == str(tmp_path / "models" / "chat")
    # Members of a group that shares one engine are its aliases there: each configured id is sent as it is.
    shared = gateways(models_toml(tmp_path / "models") + SHARED)
    httpx.post(shared.v1 + "/chat/completions", json=say("hi"), timeout=30).raise_for_status()
    httpx.post(shared.v1 + "/embeddings", json={"input": "c"}, timeout=30).raise_for_status()
    sent = [r["body"] for r in shared.upstream_requests() if r["method"] == "POST"]
    assert [b["model"] for b in sent] == ["tiny-chat", "tiny-embed"] and len(shared.spawns()) == 1


def test_one_spawn_for_fifty_concurrent_cold_requests(gateways: Start) -> None:
    gw = gateways(fake_env={"FAKE_ENGINE_LOAD_DELAY": "1.5"})
    sdk = client(gw, timeout=60)
    results: list[str] = []
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            reply = sdk.chat.completions.create(model="tiny-chat", **say(f"n{i}"))  # type: ignore[call-overload]
            results.append(reply.choices[0].message.content)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sorted(results) == sorted(f"echo: n{i}" for i in range(50))
    assert len(gw.spawns()) == 1


def test_stream_is_relayed_as_it_arrives(gateways: Start) -> None:
    # The engine sends two chunks and then goes silent: receiving them proves nothing is buffered.
    gw = gateways()
    with client(gw, timeout=30).chat.completions.create(
        model="tiny-chat",
        stream=True,
        **say("hang"),  # type: ignore[call-overload]
    ) as stream:
        got = []
        for chunk in stream:
            got.append(chunk.choices[0].delta.content)
            if len(got) == 2:
                break
    assert "".join(got).strip()
    wait_for(lambda: gw.engine()["in_flight"] == 0, 10, "the abandoned stream to be released")


def test_streaming_headers_and_full_stream(gateways: Start) -> None:
    gw = gateways()
    body = {"model": "tiny-chat", "stream": True, **say("count:50")}
    with httpx.stream("POST", gw.v1 + "/chat/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-accel-buffering"] == "no"
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    words = "".join(json.loads(e[6:])["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert words.split() == [f"w{i}" for i in range(50)]
    assert all(json.loads(e[6:])["model"] == "tiny-chat" for e in events[:-1])


def test_cold_stream_gets_loading_comments(gateways: Start) -> None:
    gw = gateways(fake_env={"FAKE_ENGINE_LOAD_DELAY": "2.5"}, env={"GATEWAY_LOADING_INTERVAL": "0.5"})
    body = {"model": "tiny-chat", "stream": True, **say("count:3")}
    with httpx.stream("POST", gw.v1 + "/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    loading = [line for line in lines if line == ": loading"]
    assert len(loading) >= 2
    assert lines.index(": loading") < lines.index(next(line for line in lines if line.startswith("data: {")))
    assert lines[-1] == "data: [DONE]"


def test_idle_stop_frees_the_engine(gateway_processes: Start) -> None:
    gw = gateway_processes(env={"GATEWAY_IDLE_TIMEOUT": "1"})
    client(gw).chat.completions.create(model="tiny-chat", **say("x"))  # type: ignore[call-overload]
    pid = gw.engine()["pid"]
    assert pid_alive(pid)
    wait_for(lambda: gw.engine()["state"] == "stopped", 10, "idle stop")
    wait_for(lambda: not pid_alive(pid), 5, "the engine process to end")
    # The next request starts it again.
    client(gw).chat.completions.create(model="tiny-chat", **say("again"))  # type: ignore[call-overload]
    assert len(gw.spawns()) == 2


def test_stream_longer_than_the_idle_timeout_completes(gateways: Start) -> None:
    gw = gateways(env={"GATEWAY_IDLE_TIMEOUT": "1"})
    with client(gw, timeout=30).chat.completions.create(
        model="tiny-chat",
        stream=True,
        **say("slow:3"),  # type: ignore[call-overload]
    ) as stream:
        chunks = [c for c in stream if c.choices and c.choices[0].delta.content]
    assert len(chunks) == 10
    assert len(gw.spawns()) == 1
    wait_for(lambda: gw.engine()["state"] == "stopped", 10, "idle stop after the stream")


def test_keep_alive_sets_the_idle_deadline_as_in_ollama(gateways: Start) -> None:
    gw = gateways(env={"GATEWAY_IDLE_TIMEOUT": "1"})
    httpx.post(gw.v1 + "/chat/completions", json={**say("x"), "keep_alive": "10m"}, timeout=30).raise_for_status()
    assert "keep_alive" not in gw.upstream_requests()[-1]["body"]
    engine = gw.engine()
    assert engine["seconds_until_idle_stop"] > 500 and engine["keep_alive"] > 500
    httpx.post(gw.v1 + "/chat/completions", json={**say("x"), "keep_alive": -1}, timeout=30).raise_for_status()
    assert gw.engine()["keep_alive"] == -1 and gw.engine()["seconds_until_idle_stop"] is None
    pid = gw.engine()["pid"]
    httpx.post(gw.v1 + "/chat/completions", json={**say("x"), "keep_alive": 0}, timeout=30).raise_for_status()
    wait_for(lambda: gw.engine()["state"] == "stopped", 10, "keep_alive 0 to stop the engine")
    wait_for(lambda: not pid_alive(pid), 10, "the engine process to exit")
    gw2 = gateways(env={"GATEWAY_IDLE_TIMEOUT": "1"})
    headers = {"X-Keep-Alive": "120"}
    httpx.post(gw2.v1 + "/chat/completions", json=say("x"), headers=headers, timeout=30).raise_for_status()
    assert 100 < gw2.engine()["seconds_until_idle_stop"] <= 120
    bad = httpx.post(gw2.v1 + "/chat/completions", json={**say("x"), "keep_alive": "forever"}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "keep_alive"


def test_a_crash_fails_only_the_request_that_hit_it(gateway_processes: Start) -> None:
    gw = gateway_processes()
    assert httpx.post(gw.v1 + "/chat/completions", json=say("hello"), timeout=30).status_code == 200
    body = {"model": "tiny-chat", "stream": True, **say("crash")}
    with httpx.stream("POST", gw.v1 + "/chat/completions", json=body, timeout=30) as response:
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    # Up to three chunks, then the error. (Chunks that reach the gateway together with the crash may be lost: aiohttp
    # fails its reader at once when the connection breaks, dropping what it had buffered; on a busy machine the
    # three chunks and the crash can arrive before the relay reads any.)
    assert len(events) <= 4 and all('"choices"' in event for event in events[:-1])
    error = json.loads(events[-1][6:])["error"]
    assert error["code"] == "engine_crashed" and set(error) == {"message", "type", "param", "code"}
    # The next requests, sent at once by a client that does not retry: the engine is started again and answers.
    for text in ("after", "again"):
        after = httpx.post(gw.v1 + "/chat/completions", json=say(text), timeout=30)
        assert after.status_code == 200, after.text
    assert len(gw.spawns()) == 2 and gw.engine()["crashes"] == 1


def test_a_crash_loop_backs_off_with_growing_delays_then_recovers(gateway_processes: Start) -> None:
    """A request that crashes the engine every time, sent again and again by a client that waits as told: the first
    crash restarts the engine at once; the engine that dies again right after, each time, is started after 1, 2, 2 s
    (GATEWAY_BACKOFF_MAX=2), announced by 503s with Retry-After and ``x-should-retry: false``; nothing is started
    while the backoff runs; a request the engine can answer is served once it ends."""
    gw = gateway_processes(env={"GATEWAY_BACKOFF_MAX": "2"})
    assert httpx.post(gw.v1 + "/chat/completions", json=say("hello"), timeout=30).status_code == 200
    timeline: list[tuple[float, int, str]] = []
    began = time.monotonic()
    while len([t for t in timeline if t[1] == 502]) < 5:
        assert time.monotonic() - began < 60, timeline
        response = httpx.post(gw.v1 + "/chat/completions", json=say("crash"), timeout=30)
        assert response.status_code in (502, 503), response.text
        retry_after = response.headers.get("retry-after", "")
        timeline.append((round(time.monotonic() - began, 2), response.status_code, retry_after))
        if response.status_code == 503:
            assert response.headers["x-should-retry"] == "false"
            assert "after it became ready" in response.json()["error"]["message"]
            time.sleep(float(retry_after))
        else:
            # The engine's sockets close before its exit is reported; a request sent in between hits the dead
            # engine too (another 502). Wait until the gateway has seen the crash, so that the schedule is the
            # backoff's alone, however busy the machine.
            crashes = sum(status == 502 for _, status, _ in timeline)
            wait_for(lambda: gw.engine()["crashes"] >= crashes, 10, "the crash to be seen")  # noqa: B023
    print(f"\ncrash loop (time, status, Retry-After): {timeline}")
    statuses = [status for _, status, _ in timeline]
    assert statuses[:2] == [502, 502]  # the first crash: restarted at once for the next request
    waits = [int(after) for _, status, after in timeline if status == 503]
    assert waits[:3] == [1, 2, 2], timeline  # then the loop backs off, growing to GATEWAY_BACKOFF_MAX
    assert len(gw.spawns()) == statuses.count(502)  # the first engine, then one start per crash; none for a 503
    wait_for(lambda: gw.engine()["retry_in"] is None, 10, "the backoff to end")
    answered = httpx.post(gw.v1 + "/chat/completions", json=say("fine"), timeout=30)
    assert answered.status_code == 200, answered.text


def test_engine_error_event_mid_stream_becomes_an_openai_error(gateways: Start) -> None:
    gw = gateways()
    with pytest.raises(openai.APIError, match="simulated engine error"):
        stream = client(gw).chat.completions.create(model="tiny-chat", stream=True, **say("error"))  # type: ignore[call-overload]
        for _ in stream:
            pass
    with pytest.raises(openai.InternalServerError, match="simulated engine error"):
        client(gw).chat.completions.create(model="tiny-chat", **say("error"))  # type: ignore[call-overload]


def test_start_failure_backs_off_with_retry_after(gateways: Start) -> None:
    gw = gateways(fake_env={"FAKE_ENGINE_EXIT_AT_START": "3"})
    first = httpx.post(gw.v1 + "/chat/completions", json=say("x"), timeout=30)
    assert first.status_code == 503 and int(first.headers["retry-after"]) >= 1
    error = first.json()["error"]
    assert "exited with code 3" in error["message"] and "simulated load failure" in error["message"]
    second = httpx.post(gw.v1 + "/chat/completions", json={**say("x"), "stream": True}, timeout=30)
    assert second.status_code == 503 and "retry-after" in second.headers
    assert len(gw.spawns()) == 1  # no spawn storm
    assert gw.engine()["state"] == "failed" and gw.engine()["retry_in"] > 0
    # One broken model does not take the gateway out of a load balancer; only when no engine can serve.
    assert httpx.get(gw.url + "/readyz").status_code == 200
    solo = gateways(SOLO, fake_env={"FAKE_ENGINE_EXIT_AT_START": "3"})
    assert httpx.post(solo.v1 + "/chat/completions", json=say("x"), timeout=30).status_code == 503
    ready = httpx.get(solo.url + "/readyz")
    assert ready.status_code == 503 and "exited with code 3" in ready.json()["errors"]["solo"]


def test_sdk_sees_503_and_does_not_hang_when_no_engine_is_installed(gateways: Start, tmp_path: Path) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    gw = gateways(env={"GATEWAY_ENGINE_BINARY": "", "GATEWAY_ENGINE": "mistralrs-server", "PATH": str(empty)})
    with pytest.raises(openai.InternalServerError) as info:
        client(gw).chat.completions.create(model="tiny-chat", **say("x"))  # type: ignore[call-overload]
    assert info.value.status_code == 503
    assert "pip install 'mistral-gateway[engine]'" in info.value.message
    assert httpx.get(gw.url + "/healthz").status_code == 200


def test_gateway_sigterm_and_sigkill_leave_no_engine_behind(gateway_processes: Start) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        gw = gateway_processes(fake_env={"FAKE_ENGINE_IGNORE_SIGTERM": "1"}, env={"GATEWAY_STOP_TIMEOUT": "0.5"})
        client(gw).chat.completions.create(model="tiny-chat", **say("x"))  # type: ignore[call-overload]
        pid = gw.engine()["pid"]
        gw.stop(sig)
        wait_for(lambda: not pid_alive(pid), 10, f"the engine to die after the gateway's {sig!r}")  # noqa: B023 (used within this iteration)


def test_adopts_an_engine_already_on_the_fixed_port(gateways: Start, tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "solo").mkdir()
    engine = subprocess.Popen(
        [
            sys.executable,
            str(FAKE_ENGINE),
            "--serve-ip",
            "127.0.0.1",
            "--port",
            str(port),
            "plain",
            "-m",
            str(tmp_path / "solo"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}/health"), 15, "the standalone engine")
        toml = f'[[models]]\nid = "solo"\nkind = "plain"\npath = "{tmp_path / "solo"}"\n'
        for env in ({"GATEWAY_ENGINE_PORT": str(port)}, {"GATEWAY_ENGINE_URL": f"http://127.0.0.1:{port}"}):
            gw = gateways(toml, env={**env, "GATEWAY_IDLE_TIMEOUT": "1"})
            reply = client(gw).chat.completions.create(model="solo", **say("adopted"))  # type: ignore[call-overload]
            assert reply.choices[0].message.content == "echo: adopted"
            assert gw.spawns() == [] and gw.engine()["adopted"] is True
            assert gw.engine()["seconds_until_idle_stop"] is None  # never stopped by us
            gw.stop()
            assert engine.poll() is None  # still running after the gateway left
    finally:
        engine.kill()
        engine.wait()


def test_fixed_port_taken_by_another_program_is_a_clear_error(gateways: Start) -> None:
    import socket

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        gw = gateways(SOLO, env={"GATEWAY_ENGINE_PORT": str(port)})
        reply = httpx.post(gw.v1 + "/chat/completions", json=say("x"), timeout=30)
        assert reply.status_code == 503 and f"GATEWAY_ENGINE_PORT={port}" in reply.json()["error"]["message"]
        assert gw.spawns() == []


def test_new_mistralrs_cli_single_and_multi_model(gateways: Start, tmp_path: Path) -> None:
    gw = gateways(models_toml(tmp_path / "models") + SHARED, engine="mistralrs")
    client(gw).chat.completions.create(model="tiny-chat", **say("x"))  # type: ignore[call-overload]
    argv = gw.spawns()[0]["argv"]
    assert argv[:2] == ["from-config", "--file"]
    (tmp_path / "one").mkdir()
    toml = f'[[models]]\nid = "one"\nkind = "plain"\npath = "{tmp_path / "one"}"\n'
    gw1 = gateways(toml, engine="mistralrs")
    reply = client(gw1).chat.completions.create(model="one", **say("single"))  # type: ignore[call-overload]
    assert reply.choices[0].message.content == "echo: single" and reply.model == "one"
    # No aliases in this dialect: the engine's own id (the folder) goes up, the configured id comes back.
    posted = [r["body"] for r in gw1.upstream_requests() if r["method"] == "POST"]
    assert posted[-1]["model"] == str(tmp_path / "one")
    argv = gw1.spawns()[0]["argv"]
    assert argv[0] == "serve" and argv[argv.index("--host") + 1] == "127.0.0.1"


def test_client_disconnect_cancels_upstream_and_idle_stop_still_happens(gateways: Start) -> None:
    gw = gateways(env={"GATEWAY_IDLE_TIMEOUT": "1"})
    body = {"model": "tiny-chat", "stream": True, **say("slow:30")}
    with httpx.stream("POST", gw.v1 + "/chat/completions", json=body, timeout=30) as response:
        next(response.iter_lines())
    wait_for(lambda: gw.engine()["in_flight"] == 0, 10, "in-flight to return to zero")
    wait_for(lambda: gw.engine()["state"] == "stopped", 10, "idle stop after the disconnect")


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


_ = os

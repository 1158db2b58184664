"""What the console reads and does, through the gateway's HTTP API (the page itself is tested in a browser in
test_console.py): the requests list with time to first token and tokens, cancelling a request in flight in every
dialect and at every stage, token counters, engine logs, and the admin key on all of it."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.helpers import Gateway, wait_for
from tests.integration.conftest import models_toml

Start = Callable[..., Gateway]
HELLO = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}]}


class Streamer(threading.Thread):
    """A streaming POST in a thread; its lines (comments and events) as they arrive."""

    def __init__(self, url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        super().__init__(daemon=True)
        self.url, self.body, self.headers = url, body, headers or {}
        self.lines: list[str] = []
        self.status: int | None = None
        self.start()

    def run(self) -> None:
        with httpx.stream("POST", self.url, json=self.body, headers=self.headers, timeout=120) as response:
            self.status = response.status_code
            for line in response.iter_lines():
                if line:
                    self.lines.append(line)


def requests_of(gw: Gateway, headers: dict[str, str] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(gw.url + "/admin/requests", headers=headers, timeout=10).json()
    return data


def in_flight(gw: Gateway, path: str, started: bool = True) -> dict[str, Any]:
    """The one request in flight on ``path`` (once its engine sent a first token, when ``started``)."""

    def matching() -> list[dict[str, Any]]:
        return [r for r in requests_of(gw)["in_flight"] if r["path"] == path and (r["ttft_ms"] or not started)]

    found = wait_for(matching, 60, f"a request in flight on {path}")
    record: dict[str, Any] = found[0]
    return record


def cancel(gw: Gateway, request_id: str) -> httpx.Response:
    return httpx.post(f"{gw.url}/admin/requests/{request_id}/cancel", timeout=10)


def test_requests_are_listed_with_ttft_tokens_and_counters(gateways: Start) -> None:
    gw = gateways()
    client = openai.OpenAI(base_url=gw.v1, api_key="unused", max_retries=0)
    client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "count:5"}])
    chunks = list(
        client.chat.completions.create(
            model="tiny-chat",
            stream=True,
            messages=[{"role": "user", "content": "count:7"}],
            stream_options={"include_usage": True},
        )
    )
    usage = chunks[-1].usage
    assert usage is not None
    recent = requests_of(gw)["recent"]
    streamed, whole = recent[0], recent[1]  # newest first
    assert streamed["stream"] and streamed["model"] == "tiny-chat" and streamed["status"] == 200
    assert streamed["tokens_in"] == usage.prompt_tokens and streamed["tokens_out"] == usage.completion_tokens == 7
    assert streamed["ttft_ms"] is not None and 0 < streamed["ttft_ms"] <= streamed["duration_ms"]
    assert not whole["stream"] and whole["tokens_out"] == 5 and whole["ttft_ms"] is None and whole["state"] == "done"
    metrics = httpx.get(gw.url + "/metrics", timeout=10).text
    assert 'gateway_tokens_total{kind="completion",model="tiny-chat"} 12.0' in metrics
    assert httpx.get(gw.url + "/v1/models", timeout=10).status_code == 200
    assert all(r["path"] != "/v1/models" for r in requests_of(gw)["recent"])  # only model requests are listed


def test_cancelling_a_stream_ends_it_with_an_error_event_and_stops_the_engine(gateways: Start) -> None:
    gw = gateways()
    slow = {"model": "tiny-chat", "stream": True, "messages": [{"role": "user", "content": "slow:60"}]}
    stream = Streamer(gw.v1 + "/chat/completions", slow)
    record = in_flight(gw, "/v1/chat/completions")
    assert cancel(gw, record["id"]).json() == {"id": record["id"], "cancelled": True}
    stream.join(30)
    assert not stream.is_alive() and stream.status == 200
    error = json.loads(stream.lines[-1].removeprefix("data: "))["error"]
    assert error["code"] == "request_cancelled" and "operator" in error["message"]
    abandoned = wait_for(gw.abandoned_streams, 10, "the engine to notice the gateway left")
    assert abandoned[0]["sent"] < 12  # of 10 chunks, a finish chunk and [DONE]: it stopped generating
    listed = requests_of(gw)
    assert listed["in_flight"] == [] and listed["recent"][0]["state"] == "cancelled"
    assert cancel(gw, record["id"]).status_code == 404  # no longer in flight
    assert gw.engine()["in_flight"] == 0 and gw.engine()["state"] == "ready"  # the engine serves on


def test_cancelling_a_whole_answer_or_a_wait_for_a_cold_engine(gateways: Start) -> None:
    gw = gateways(fake_env={"FAKE_ENGINE_LOAD_DELAY": "60"})
    hello = {"model": "tiny-chat", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    cold = Streamer(gw.v1 + "/chat/completions", hello)
    record = in_flight(gw, "/v1/chat/completions", started=False)
    wait_for(lambda: cold.lines, 30, "the first `: loading` comment")
    cancel(gw, record["id"])
    cold.join(30)
    assert not cold.is_alive() and json.loads(cold.lines[-1][6:])["error"]["code"] == "request_cancelled"

    gw2 = gateways()
    outcome: list[httpx.Response] = []
    slow = {"model": "tiny-chat", "messages": [{"role": "user", "content": "slow:60"}]}
    worker = threading.Thread(
        target=lambda: outcome.append(httpx.post(gw2.v1 + "/chat/completions", json=slow, timeout=120)), daemon=True
    )
    worker.start()
    record = wait_for(lambda: requests_of(gw2)["in_flight"], 30, "the request in flight")[0]
    cancel(gw2, record["id"])
    worker.join(30)
    answer = outcome[0]
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "request_cancelled"
    assert answer.headers["x-should-retry"] == "false"  # the SDKs must not send it again


@pytest.mark.parametrize(
    ("path", "body", "check"),
    [
        (
            "/v1/messages",
            {
                "model": "tiny-chat",
                "max_tokens": 20,
                "stream": True,
                "messages": [{"role": "user", "content": "slow:60"}],
            },
            lambda last: last.startswith("data: ") and json.loads(last[6:])["error"]["type"] == "api_error",
        ),
        (
            "/api/chat",
            {"model": "tiny-chat", "messages": [{"role": "user", "content": "slow:60"}]},
            lambda last: "cancelled" in json.loads(last)["error"],
        ),
        (
            "/v1/responses",
            {"model": "tiny-chat", "stream": True, "input": "slow:60"},
            lambda last: json.loads(last[6:])["type"] == "response.failed",
        ),
    ],
)
def test_a_cancel_ends_each_dialects_stream_in_its_own_words(
    gateways: Start, path: str, body: dict[str, Any], check: Callable[[str], bool]
) -> None:
    gw = gateways()
    stream = Streamer(gw.url + path, body)
    record = in_flight(gw, path)
    cancel(gw, record["id"])
    stream.join(30)
    assert not stream.is_alive() and check(stream.lines[-1]), stream.lines[-3:]


def test_engine_logs_stream_history_then_live_lines(gateways: Start) -> None:
    gw = gateways()
    httpx.post(gw.v1 + "/chat/completions", json=HELLO, timeout=60)
    seen: list[dict[str, Any]] = []
    done = threading.Event()

    def follow() -> None:
        with httpx.stream("GET", gw.url + "/logs/stream?engine=tiny-chat", timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]))
                if done.is_set():
                    return

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    wait_for(lambda: any("serving" in entry["line"] for entry in seen), 30, "the engine's start-up lines")
    assert seen[0]["line"].startswith("$ ") and "--model-id" in seen[0]["line"]  # the command line first
    assert {entry["engine"] for entry in seen} == {"tiny-chat"}
    before = len(seen)
    httpx.post(gw.url + "/admin/engine/stop", timeout=60)
    httpx.post(gw.v1 + "/chat/completions", json=HELLO, timeout=60)
    wait_for(lambda: sum(entry["line"].startswith("$ ") for entry in seen[before:]) == 1, 30, "the new start, live")
    done.set()


def test_the_admin_key_guards_the_data_but_not_the_page(gateways: Start) -> None:
    gw = gateways(env={"GATEWAY_ADMIN_KEY": "adm", "GATEWAY_API_KEYS": "sk-user"})
    assert httpx.get(gw.url + "/", timeout=10, follow_redirects=False).headers["location"] == "/ui"
    page = httpx.get(gw.url + "/ui", timeout=10)
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    assert httpx.get(gw.url + "/ui/../auth.py", timeout=10).status_code == 404
    for path in ("/admin/requests", "/logs/stream", "/status"):
        assert httpx.get(gw.url + path, timeout=10).status_code == 401
        assert httpx.get(gw.url + path, headers={"Authorization": "Bearer sk-user"}, timeout=10).status_code == 401
    admin = {"Authorization": "Bearer adm"}
    assert httpx.get(gw.url + "/admin/requests", headers=admin, timeout=10).status_code == 200
    assert httpx.post(gw.url + "/admin/requests/nope/cancel", headers=admin, timeout=10).status_code == 404
    chat = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(gw.v1 + "/chat/completions", json=chat, headers=admin, timeout=60).status_code == 200
    assert httpx.post(gw.v1 + "/chat/completions", json=chat, timeout=60).status_code == 401


def test_a_shared_engine_logs_under_its_group_name(gateways: Start, tmp_path: Path) -> None:
    shared = '[[groups]]\nname = "text"\nmodels = ["tiny-chat", "tiny-embed"]\nshare_engine = true\n'
    gw = gateways(models_toml(tmp_path / "shared-models") + shared)  # its engine is started with a config file
    httpx.post(gw.v1 + "/chat/completions", json=HELLO, timeout=60)
    with httpx.stream("GET", gw.url + "/logs/stream?engine=text", timeout=30) as response:
        first = next(line for line in response.iter_lines() if line.startswith("data: "))
    entry = json.loads(first[6:])
    assert entry["engine"] == "text" and entry["line"].startswith("$ ") and "multi-model" in entry["line"]

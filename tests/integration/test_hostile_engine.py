"""A gateway in front of an engine that misbehaves at the level of HTTP bytes (tests/fakes/hostile_engine.py,
adopted with GATEWAY_ENGINE_URL).

What needs the gateway's own process: after the matrix of faults, again and again, its file descriptors and memory
stay flat. What each fault gives a client, in every dialect and within the deadlines, is tested with the gateway in
the test's process (test_deadlines.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import HOSTILE_MODELS, Gateway, hostile_engine, start_gateway
from tests.oracle import check_body, check_stream

CLIENT_TIMEOUT = 60.0  # far beyond the gateway's own deadlines below: only a gateway that hangs reaches it
# What each fault gives the client: "ok" (the correct answer) or the HTTP status of an error in OpenAI's shape
# (for a stream that had begun: a 200 whose last event is that error).
WHOLE: dict[str, str | int] = {
    "ok": "ok",
    "extra-bytes": "ok",
    "cut-chunk": 502,
    "short-body": 502,
    "reset-before": 502,
    "reset-during": 502,
    "no-headers": 504,
    "drip": 504,
    "invalid-http": 502,
    "continue": "ok",
    "204": 502,
    "304": 502,
    "html-500": 500,
    "http10": "ok",
    "conn-close": "ok",
    "big-line": "ok",
    "big-header": 502,
}
STREAM: dict[str, str | int] = {
    "ok": "ok",
    "extra-bytes": "ok",
    "cut-chunk": "event",
    "short-body": "event",
    "reset-before": 502,
    "reset-during": "event",
    "no-headers": 504,
    "drip": "event",
    "invalid-http": 502,
    "continue": "ok",
    "204": 502,
    "304": 502,
    "html-500": 500,
    "http10": "ok",
    "conn-close": "ok",
    "big-line": "ok",
    "big-header": 502,
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with hostile_engine(tmp_path_factory.mktemp("hostile"), drip=0.5) as url:
        env = {"GATEWAY_ENGINE_URL": url, "GATEWAY_REQUEST_TIMEOUT": "2", "GATEWAY_STALL_TIMEOUT": "2"}
        gw = start_gateway(tmp_path_factory.mktemp("gateway"), HOSTILE_MODELS, env=env)
        yield gw
        gw.stop()


def ask(gw: Gateway, scenario: str, stream: bool) -> httpx.Response:
    body: dict[str, Any] = {"model": "hostile", "messages": [{"role": "user", "content": scenario}], "stream": stream}
    return httpx.post(gw.v1 + "/chat/completions", json=body, timeout=CLIENT_TIMEOUT)


def check(response: httpx.Response, expected: str | int, stream: bool) -> None:
    if expected == "ok":
        assert response.status_code == 200, response.text[:500]
        if stream:
            chunks = check_stream("chat", response.text)
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) in ("fine", "x" * (1 << 20))
        else:
            answer = check_body("chat", response.json())
            assert answer.choices[0].message.content in ("fine", "x" * (1 << 20))
        return
    if expected == "event":
        assert response.status_code == 200
        events = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
        errors = [e for e in events if e.startswith('{"error"')]
        assert len(errors) == 1 and events[-1] == errors[0], events[-3:]  # one final error event, no [DONE]
        assert set(json.loads(errors[0])["error"]) == {"message", "type", "param", "code"}
        return
    assert response.status_code == expected, response.text[:500]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


def _fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_file_descriptors_and_memory_stay_flat_through_the_matrix(hostile: Gateway) -> None:
    def matrix() -> None:
        for scenario, expected in WHOLE.items():
            if scenario not in ("no-headers", "drip"):  # the slow ones prove deadlines above, not leaks
                check(ask(hostile, scenario, False), expected, False)
                check(ask(hostile, scenario, True), STREAM[scenario], True)

    pid = hostile.proc.pid
    matrix()  # warm: pools, caches and the allocator settle
    fds, rss = _fds(pid), _rss_mb(pid)
    for _ in range(5):
        matrix()
    assert _fds(pid) <= fds + 2, (fds, _fds(pid))  # a connection may be open in the pool, never one per fault
    assert _rss_mb(pid) - rss < 20, (rss, _rss_mb(pid))  # five rounds of 1 MB answers and faults: no growth
    print(
        f"\ngateway after 6 rounds of the matrix: {_fds(pid)} fds (after 1: {fds}), "
        f"RSS {_rss_mb(pid):.1f} MB (after 1: {rss:.1f} MB)"
    )

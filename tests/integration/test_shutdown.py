"""SIGTERM with requests in flight: those waiting for a cold start are answered at once and the loading engine is
stopped; those still running at the drain deadline end in their own shape (a JSON 503, a stream's final error
event), never a plain-text 500 or a cut connection. (Streams that finish within the drain are in
test_reliability.py.)"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable
from typing import Any

import httpx

from tests.helpers import Gateway, pid_alive, wait_for

Start = Callable[..., Gateway]


def chat(text: str, **kw: object) -> dict[str, object]:
    return {"model": "tiny-chat", "messages": [{"role": "user", "content": text}], **kw}


class InFlight:
    """Requests sent from threads: a whole one and a stream, with what each got; the stream's first event (or its
    first loading comment) marks it as in flight."""

    def __init__(self, gw: Gateway, text: str) -> None:
        self.whole: httpx.Response | None = None
        self.events: list[str] = []
        self.started = threading.Event()
        self._threads = [
            threading.Thread(target=self._whole, args=(gw, text)),
            threading.Thread(target=self._stream, args=(gw, text)),
        ]
        for thread in self._threads:
            thread.start()

    def _whole(self, gw: Gateway, text: str) -> None:
        self.whole = httpx.post(gw.v1 + "/chat/completions", json=chat(text), timeout=120)

    def _stream(self, gw: Gateway, text: str) -> None:
        with httpx.stream("POST", gw.v1 + "/chat/completions", json=chat(text, stream=True), timeout=120) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                self.started.set()
                if line.startswith("data: "):
                    self.events.append(line[6:])

    def join(self) -> None:
        for thread in self._threads:
            thread.join(120)
            assert not thread.is_alive()


def shutting_down(answer: httpx.Response | None) -> dict[str, Any]:
    assert answer is not None and answer.status_code == 503 and answer.headers["content-type"] == "application/json"
    error: dict[str, Any] = answer.json()["error"]
    assert error["code"] == "engine_unavailable" and "shutting down" in error["message"]
    return error


def test_sigterm_answers_requests_waiting_for_a_cold_start_at_once_and_stops_the_loading_engine(
    gateway_processes: Start,
) -> None:
    gw = gateway_processes(
        env={"GATEWAY_SHUTDOWN_TIMEOUT": "60", "GATEWAY_LOADING_INTERVAL": "0.2"},
        fake_env={"FAKE_ENGINE_LOAD_DELAY": "600"},
    )
    flight = InFlight(gw, "hello")
    assert flight.started.wait(60)  # the stream got its first `: loading` comment: the engine is loading
    wait_for(lambda: gw.engine()["waiting"] == 2 and gw.spawns(), 30, "both requests to wait for the engine")
    loading_pid = gw.spawns()[0]["pid"]
    gw.proc.send_signal(signal.SIGTERM)
    flight.join()  # long before the 600 s load or the 60 s drain: nothing waits for them
    shutting_down(flight.whole)
    assert len(flight.events) == 1 and json.loads(flight.events[0])["error"]["code"] == "engine_unavailable"
    assert gw.proc.wait(timeout=60) in (0, -signal.SIGTERM)
    wait_for(lambda: not pid_alive(loading_pid), 10, "the loading engine to be stopped")


def test_at_the_drain_deadline_requests_still_running_end_in_their_own_shape(gateway_processes: Start) -> None:
    gw = gateway_processes(env={"GATEWAY_SHUTDOWN_TIMEOUT": "2"})
    httpx.post(gw.v1 + "/chat/completions", json=chat("warm up"), timeout=60).raise_for_status()
    flight = InFlight(gw, "slow:600")  # ten chunks a minute apart: far beyond the drain
    assert flight.started.wait(60)
    wait_for(lambda: gw.engine()["in_flight"] == 2, 30, "both requests to run")
    gw.proc.send_signal(signal.SIGTERM)
    flight.join()
    shutting_down(flight.whole)
    *chunks, last = flight.events
    assert chunks and all(json.loads(c)["choices"] for c in chunks)  # the stream had begun
    assert json.loads(last)["error"]["code"] == "engine_unavailable"  # and ends with one error event
    assert gw.proc.wait(timeout=60) in (0, -signal.SIGTERM)
    assert "Internal Server Error" not in gw.log() and "Cancel " not in gw.log()  # uvicorn's backstop unused

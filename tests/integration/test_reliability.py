"""Faults and floods, for real: hung engines, engines that never load, shutdown with streams in flight,
a crowd waiting on a cold start."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable
from datetime import datetime
from typing import Any

import httpx
import pytest

from tests.helpers import Gateway, pid_alive, wait_for

Start = Callable[..., Gateway]


def chat(text: str, **kw: object) -> dict[str, object]:
    return {"model": "tiny-chat", "messages": [{"role": "user", "content": text}], **kw}


def test_a_stalled_request_is_cut_off_but_an_engine_that_answers_its_health_check_keeps_running(
    gateways: Start,
) -> None:
    gw = gateways(env={"GATEWAY_STALL_TIMEOUT": "1", "GATEWAY_REQUEST_TIMEOUT": "5"})
    # A chunk every 0.3 s: well within the stall timeout, and the whole stream within the request timeout.
    with httpx.stream("POST", gw.v1 + "/chat/completions", json=chat("slow:3", stream=True), timeout=60) as slow:
        lines = slow.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))  # another stream, running
        with httpx.stream("POST", gw.v1 + "/chat/completions", json=chat("hang", stream=True), timeout=30) as hung:
            events = [line for line in hung.iter_lines() if line.startswith("data: ")]
        assert len(events) == 3  # two chunks, then the error: the stall counts from the last byte
        error = json.loads(events[-1][6:])["error"]
        assert error["code"] == "engine_stalled" and "GATEWAY_STALL_TIMEOUT" in error["message"]
        whole = httpx.post(gw.v1 + "/chat/completions", json=chat("hang"), timeout=30)
        assert whole.status_code == 504 and "GATEWAY_REQUEST_TIMEOUT" in whole.json()["error"]["message"]
        wait_for(lambda: "answers its health check: kept running" in gw.log(), 30, "the health check")
        rest = [line for line in lines if line.startswith("data: ")]
    assert json.loads(first[6:])["choices"] and rest[-1] == "data: [DONE]"  # the other stream was not cut
    assert len(gw.spawns()) == 1 and gw.engine()["state"] == "ready"


def test_a_stuck_engine_that_fails_its_health_check_is_restarted(gateway_processes: Start) -> None:
    # A frozen engine ignores SIGTERM: a short stop timeout has it killed soon after.
    gw = gateway_processes(
        env={"GATEWAY_REQUEST_TIMEOUT": "1", "GATEWAY_STOP_TIMEOUT": "1", "GATEWAY_HEALTH_TIMEOUT": "1"}
    )
    response = httpx.post(gw.v1 + "/chat/completions", json=chat("freeze"), timeout=60)
    assert response.status_code == 504 and response.json()["error"]["code"] == "engine_stalled"
    first_pid = gw.spawns()[0]["pid"]
    wait_for(lambda: not pid_alive(first_pid), 30, "the stuck engine to be stopped")
    ok = httpx.post(gw.v1 + "/chat/completions", json=chat("again"), timeout=30)
    assert ok.status_code == 200 and len(gw.spawns()) == 2


def test_an_engine_that_never_becomes_ready_times_out_with_retry_after(gateways: Start) -> None:
    gw = gateways(env={"GATEWAY_STARTUP_TIMEOUT": "1"}, fake_env={"FAKE_ENGINE_NEVER_READY": "1"})
    response = httpx.post(gw.v1 + "/chat/completions", json=chat("x"), timeout=30)
    assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1
    assert "GATEWAY_STARTUP_TIMEOUT=1" in response.json()["error"]["message"]
    pid = gw.spawns()[0]["pid"]
    wait_for(lambda: not pid_alive(pid), 10, "the engine that never loaded to be killed")


def test_sigterm_lets_streams_in_flight_finish_then_stops_everything(gateway_processes: Start) -> None:
    gw = gateway_processes()
    with httpx.stream("POST", gw.v1 + "/chat/completions", json=chat("slow:2", stream=True), timeout=30) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        engine_pid = gw.engine()["pid"]
        gw.proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    words = "".join(json.loads(e[6:])["choices"][0]["delta"].get("content") or "" for e in [first, *rest[:-1]])
    assert len(words.split()) == 10  # every chunk arrived after the SIGTERM, then the end
    # uvicorn re-raises the SIGTERM once its graceful shutdown is done: that is a clean exit for systemd.
    assert gw.proc.wait(timeout=30) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in gw.log()
    wait_for(lambda: not pid_alive(engine_pid), 10, "the engine to stop with the gateway")


def test_a_crowd_waiting_on_a_cold_start_is_served_up_to_the_queue_cap(gateways: Start) -> None:
    gw = gateways(
        env={"GATEWAY_MAX_QUEUE": "450", "GATEWAY_LOG_LEVEL": "warning"}, fake_env={"FAKE_ENGINE_LOAD_DELAY": "4"}
    )

    async def crowd() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=600, max_keepalive_connections=600)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            return await asyncio.gather(
                *(client.post(gw.v1 + "/chat/completions", json=chat(f"n{i}")) for i in range(500))
            )

    responses = asyncio.run(crowd())
    served = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(served) + len(refused) == 500
    assert len(served) >= 450 and refused, [r.status_code for r in responses if r.status_code not in (200, 429)]
    assert all(int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "queue_full" for r in refused)
    for i, response in enumerate(responses):  # each served request got its own answer
        if response.status_code == 200:
            assert response.json()["choices"][0]["message"]["content"] == f"echo: n{i}"
    assert len(gw.spawns()) == 1 and gw.engine()["waiting"] == 0 and gw.engine()["in_flight"] == 0


def test_client_gone_during_a_cold_start_releases_everything(gateways: Start) -> None:
    gw = gateways(
        env={"GATEWAY_IDLE_TIMEOUT": "1", "GATEWAY_LOADING_INTERVAL": "0.2"}, fake_env={"FAKE_ENGINE_LOAD_DELAY": "2"}
    )
    with httpx.stream("POST", gw.v1 + "/chat/completions", json=chat("x", stream=True), timeout=30) as response:
        assert next(response.iter_lines()) == ": loading"
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up while the engine loads
        httpx.post(gw.v1 + "/chat/completions", json=chat("y"), timeout=0.5)
    wait_for(lambda: gw.engine()["in_flight"] == 0 and gw.engine()["waiting"] == 0, 10, "both to be released")
    # The start they triggered still completes, nothing was sent for them, and the idle stop follows.
    wait_for(lambda: gw.engine()["state"] == "ready" or gw.engine()["starts"] == 1, 15, "the start")
    wait_for(lambda: gw.engine()["state"] == "stopped" and gw.engine()["starts"] == 1, 20, "the idle stop")
    assert [r for r in gw.upstream_requests() if r["method"] == "POST"] == []


def _chat_engine(status: dict[str, Any]) -> dict[str, Any]:
    engine: dict[str, Any] = next(e for e in status["engines"] if "tiny-chat" in e["models"])
    return engine


def _events_of(gw: Gateway, kind: str) -> list[dict[str, Any]]:
    """The lifecycle events of one kind, from the gateway's log (logger gateway.events, one JSON object a line)."""
    lines = [line.split("gateway.events: ", 1)[1] for line in gw.log().splitlines() if "gateway.events: " in line]
    return [event for event in map(json.loads, lines) if event["type"] == kind]


def test_an_engine_that_always_dies_causes_no_spawn_storm(gateways: Start) -> None:
    gw = gateways(fake_env={"FAKE_ENGINE_EXIT_AT_START": "1"})
    codes = {httpx.post(gw.v1 + "/chat/completions", json=chat("x"), timeout=30).status_code for _ in range(20)}
    assert codes == {503}
    assert "simulated load failure" in gw.log()  # the engine's last words are in the gateway log
    # However slow the machine, no start comes before the backoff of the failure before it has passed: requests
    # arriving meanwhile are answered at once (20 requests, a handful of starts).
    starts = [datetime.fromisoformat(e["time"].replace("Z", "+00:00")) for e in _events_of(gw, "engine.starting")]
    failures = _events_of(gw, "engine.failed")
    assert len(gw.spawns()) == len(starts) >= 1 and len(failures) == len(starts)
    assert all(f["details"]["retry_in"] > 0 for f in failures)
    for failure, next_start in zip(failures, starts[1:], strict=False):
        failed_at = datetime.fromisoformat(failure["time"].replace("Z", "+00:00"))
        assert (next_start - failed_at).total_seconds() >= failure["details"]["retry_in"] - 0.01


def test_engine_sigkilled_mid_stream_ends_the_stream_with_one_error_then_restarts(gateway_processes: Start) -> None:
    import os

    gw = gateway_processes()
    with httpx.stream("POST", gw.v1 + "/chat/completions", json=chat("slow:30", stream=True), timeout=30) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        os.kill(gw.engine()["pid"], signal.SIGKILL)
        rest = [line for line in lines if line.startswith("data: ")]
    assert json.loads(first[6:])["choices"]
    assert len(rest) == 1 and json.loads(rest[0][6:])["error"]["code"] == "engine_crashed"
    # It had answered (the first chunk): the next request starts it again at once and is answered.
    again = httpx.post(gw.v1 + "/chat/completions", json=chat("back"), timeout=30)
    assert again.status_code == 200, again.text
    assert len(gw.spawns()) == 2 and gw.engine()["crashes"] == 1


def test_requests_waiting_on_a_cold_start_are_served_in_order_of_arrival(gateways: Start) -> None:
    gw = gateways(fake_env={"FAKE_ENGINE_LOAD_DELAY": "3"})

    async def arrive_in_order() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            tasks = []
            for i in range(20):
                tasks.append(asyncio.create_task(client.post(gw.v1 + "/chat/completions", json=chat(f"#{i}"))))
                # The next one leaves only once this one waits in the gateway: arrival order is known.
                deadline = asyncio.get_running_loop().time() + 10
                while _chat_engine((await client.get(gw.url + "/status")).json())["waiting"] < i + 1:
                    assert asyncio.get_running_loop().time() < deadline, f"request {i} never started waiting"
            return list(await asyncio.gather(*tasks))

    responses = asyncio.run(arrive_in_order())
    assert [r.status_code for r in responses] == [200] * 20
    sent = [r["body"]["messages"][0]["content"] for r in gw.upstream_requests() if r["method"] == "POST"]
    assert sorted(sent) == sorted(f"#{i}" for i in range(20))
    # The gateway releases them first come, first served; twenty fresh connections to the engine may still
    # swap neighbours on the wire, so the check is that early arrivals are not overtaken by late ones.
    position = {text: i for i, text in enumerate(sent)}
    assert max(position[f"#{i}"] for i in range(5)) < min(position[f"#{i}"] for i in range(15, 20))

"""The peers' readings and the decision to send a request elsewhere (gateway/fleet/peers.py), fed readings by hand on
a fake clock; one run of the reader against a peer served by httpx's transport for ASGI apps."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.fleet.peers import STALE_READINGS, Peers, Reading, parse, request_key
from tests.fakes.engines import Clock

A, B = "http://10.0.0.1:8080", "http://10.0.0.2:8080"


def peers(clock: Clock, *, busy: int = 4, interval: float = 1.0, urls: tuple[str, ...] = (A, B)) -> Peers:
    return Peers(list(urls), own_name="me", busy=busy, interval=interval, clock=clock)


def reading(name: str, at: float, serving: bool = True, **warm: int) -> Reading:
    return Reading(name, serving, warm, at)


def test_no_reading_no_peer_warm_or_model_cold_everywhere_serves_here() -> None:
    clock = Clock()
    fleet = peers(clock)
    assert fleet.elsewhere("alpha", b"r1") is None  # nothing read yet
    fleet.note(A, reading("a", clock.now, beta=0))
    assert fleet.elsewhere("alpha", b"r1") is None  # warm there: another model only
    assert fleet.sent_elsewhere == {}


def test_a_request_goes_to_a_warm_peer_once_and_is_served_here_when_it_comes_back() -> None:
    clock = Clock()
    fleet = peers(clock)
    fleet.note(A, reading("a", clock.now, alpha=0))
    peer = fleet.elsewhere("alpha", b"r1")
    assert peer is not None and peer.node == "a" and peer.load == 0
    assert fleet.elsewhere("alpha", b"r1") is None  # the router (or an SDK) sent it back: served here
    assert fleet.elsewhere("alpha", b"r2") is not None  # another request goes elsewhere as well
    assert fleet.sent_elsewhere == {"alpha": 2}


def test_a_request_sent_back_long_after_goes_elsewhere_again() -> None:
    clock = Clock()
    fleet = peers(clock)
    fleet.note(A, reading("a", clock.now, alpha=0))
    assert fleet.elsewhere("alpha", b"r1") is not None
    clock.now += 61
    fleet.note(A, reading("a", clock.now, alpha=0))
    assert fleet.elsewhere("alpha", b"r1") is not None  # forgotten: a new request with the same body


def test_the_least_loaded_warm_peer_is_chosen_and_a_busy_one_gets_nothing() -> None:
    clock = Clock()
    fleet = peers(clock, busy=3)
    fleet.note(A, reading("a", clock.now, alpha=2))
    fleet.note(B, reading("b", clock.now, alpha=1))
    first = fleet.elsewhere("alpha", b"r1")
    assert first is not None and (first.node, first.load) == ("b", 1)
    # b now counts 2 (its reading plus the one sent), a 2: a tie keeps the first found; each one sent counts.
    sent = [fleet.elsewhere("alpha", f"r{i}".encode()) for i in range(2, 5)]
    assert [(p.node, p.load) for p in sent if p is not None] == [("a", 2), ("b", 2)]
    assert sent[2] is None  # both at 3 = busy: served here (its engine starts)
    fleet.note(B, reading("b", clock.now, alpha=0))  # a new reading replaces the counts sent since the last one
    again = fleet.elsewhere("alpha", b"r9")
    assert again is not None and (again.node, again.load) == ("b", 0)


def test_stale_readings_draining_peers_and_failed_readings_count_for_nothing() -> None:
    clock = Clock()
    fleet = peers(clock, interval=2.0)
    fleet.note(A, reading("a", clock.now, alpha=0))
    clock.now += STALE_READINGS * 2.0 + 0.1
    assert fleet.elsewhere("alpha", b"r1") is None  # stale: a peer that stopped answering
    fleet.note(A, reading("a", clock.now, serving=False, alpha=0))
    assert fleet.elsewhere("alpha", b"r2") is None  # draining
    fleet.note(A, reading("a", clock.now, alpha=0))
    fleet.failed(A, "ConnectError")
    assert fleet.elsewhere("alpha", b"r3") is None
    assert fleet.status()["peers"][A] == {"node": None, "error": "ConnectError"}


def test_this_node_in_the_list_is_found_by_its_name_and_left_out(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    fleet = peers(clock)
    with caplog.at_level(logging.INFO, "gateway.fleet"):
        fleet.note(B, reading("me", clock.now, alpha=0))
    assert fleet.urls == [A] and fleet.elsewhere("alpha", b"r1") is None
    assert "is this node" in caplog.text


def test_parse_reads_a_gateways_get_load_and_refuses_anything_else() -> None:
    document = {
        "load": 3,
        "node": "n2",
        "serving": True,
        "models": {
            "alpha": {"state": "ready", "running": 1, "waiting": 2},
            "beta": {"state": "stopped", "running": 0, "waiting": 1},
        },
    }
    assert parse(document, 5.0) == Reading("n2", True, {"alpha": 3}, 5.0)
    assert parse({**document, "serving": False}, 5.0).serving is False
    older = {key: value for key, value in document.items() if key != "serving"}
    assert parse(older, 5.0).serving is True  # a node from before the field: serving while it answers
    assert parse({"models": {"a": {"state": "ready"}}}, 0).warm == {"a": 0}  # no counts: none
    bad: object
    for bad in (
        [],
        {"load": 1},
        {"models": []},
        {"models": {"a": 1}},
        {"models": {"a": {"state": "ready", "running": "1"}}},
    ):
        with pytest.raises(ValueError):
            parse(bad, 0)


def test_request_keys_tell_bodies_and_models_apart() -> None:
    assert request_key("m", b"x") == request_key("m", b"x")
    assert (
        len({request_key("m", b"x"), request_key("n", b"x"), request_key("m", b"y"), request_key("m", b"x", b"")}) == 4
    )


async def test_the_reader_reads_each_peer_and_notes_what_fails() -> None:
    answers: dict[str, Any] = {
        "a": {"node": "a", "serving": True, "models": {"alpha": {"state": "ready", "running": 0, "waiting": 0}}},
        "b": "not json",
    }

    async def get_load(request: Request) -> Response:
        answer = answers[request.url.hostname or ""]
        return JSONResponse(answer) if isinstance(answer, dict) else Response(answer)

    app = Starlette(routes=[Route("/get_load", get_load)])
    clock = Clock()
    fleet = peers(clock, urls=("http://a", "http://b/"), interval=0.01)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as client:
        task = asyncio.create_task(fleet.run(client))
        try:
            for _ in range(200):
                await asyncio.sleep(0.01)
                if fleet.status()["peers"]["http://b"]["error"] != "not read yet":
                    break
        finally:
            task.cancel()
    status = fleet.status()["peers"]
    assert status["http://a"]["node"] == "a" and status["http://a"]["warm"] == {"alpha": 0}
    assert status["http://b"]["node"] is None and "JSONDecodeError" in status["http://b"]["error"]

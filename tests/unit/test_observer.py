"""The request log: one line per request, whatever the client puts in its path, method or body."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from gateway.http.observer import RequestObserver, loggable
from gateway.metrics import Metrics

PATH = "/v1/models\n1999-01-01 00:00:00,000 INFO gateway.access: GET /forged\r\x1b[2J\u2028\x7f\ud800"


@pytest.mark.parametrize(
    ("text", "logged"),
    [
        ("/v1/chat/completions", "/v1/chat/completions"),
        ("/a b", "/a%20b"),
        ("/a\nb\rc\td", "/a%0Ab%0Dc%09d"),
        ("\x1b[2J\x7f", "%1B[2J%7F"),
        ("/caf\u00e9", "/caf\u00e9"),
        ("\u2028\u0085", "%E2%80%A8%C2%85"),
        ("\ud800", "%ED%A0%80"),
    ],
)
def test_loggable_escapes_what_could_split_a_line_or_a_field(text: str, logged: str) -> None:
    assert loggable(text) == logged


def observe(log_format: str, scope: dict[str, Any]) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        scope["state"]["model"] = "tiny-chat\nforged"
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        pass

    asyncio.run(RequestObserver(app, metrics=Metrics(), log_format=log_format)(scope, receive, send))


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_one_access_line_per_request(log_format: str, caplog: pytest.LogCaptureFixture) -> None:
    scope = {"type": "http", "method": "GET\n", "path": PATH, "headers": [(b"x-request-id", b"id-1")]}
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        observe(log_format, scope)
    (record,) = caplog.records
    line = record.getMessage()
    assert line.isprintable() and "1999" in line
    if log_format == "json":
        entry = json.loads(line)
        assert (entry["method"], entry["path"], entry["model"]) == ("GET\n", PATH, "tiny-chat\nforged")
    else:
        assert line.startswith("GET%0A /v1/models%0A1999-01-01%2000:00:00,000%20INFO%20")
        assert " model=tiny-chat%0Aforged status=404 " in line and line.endswith(" request_id=id-1")


def test_every_answer_names_the_node_that_sent_it_and_keeps_the_apps_headers() -> None:
    sent: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 503, "headers": [(b"retry-after", b"1")]})
        await send({"type": "http.response.body", "body": b"{}"})

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/health", "headers": [(b"x-request-id", b"id-7")]}
    asyncio.run(RequestObserver(app, metrics=Metrics(), node="gw-2")(scope, receive, send))
    assert sent[0]["headers"] == [(b"retry-after", b"1"), (b"x-request-id", b"id-7"), (b"x-gateway-node", b"gw-2")]

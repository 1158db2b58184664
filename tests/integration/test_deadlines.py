"""Every deadline holds byte by byte: whatever an engine does on the wire, each client gets its answer or an error in
its own dialect, within the configured timeouts.

A property over a matrix: byte-level engine behaviours (tests/fakes/hostile_engine.py, a process of its own, adopted
with GATEWAY_ENGINE_URL) by the three dialects' chat routes by whole and streamed answers. For every cell the client
gets, within GATEWAY_REQUEST_TIMEOUT + GATEWAY_STALL_TIMEOUT and a margin far above any scheduling delay, either the
correct answer or one error in the shape of its dialect (a status before the first byte, or one final error event
once a stream has begun); an error caused by a deadline names the setting that bounds it. The cells of one dialect
and mode run at once, so the matrix costs about one request timeout per row. After each row the engine, which still
answers its health check, serves the next request.

The gateway runs in this process (tests/inprocess.py): what is under test is its deadlines, not its process. Its
file descriptors and memory through the same faults are tested in a process of its own (test_hostile_engine.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.helpers import HOSTILE_MODELS, hostile_engine
from tests.inprocess import InProcessGateway, in_process

STALL = 1.0  # GATEWAY_STALL_TIMEOUT (0.4 s made a cell stall spuriously on a busy machine: a starved loop runs a due
# timer before the read that arrived meanwhile)
TOTAL = 2.5  # GATEWAY_REQUEST_TIMEOUT
DRIP = 0.1  # the engine's pace when it drips: several drips fit in a stall, so only a deadline can end a cell
# Far above the deadlines (and any delay a busy machine adds to a thread's wake-up), far below the client's patience:
# a gateway that ignores a deadline fails here, a slow machine does not.
MARGIN = 8.0
CLIENT_TIMEOUT = 60.0

# What each behaviour must give: the answer, or an error (naming the setting when a deadline ended it).
ANSWER, ERROR = "answer", "error"
BEHAVIOURS: dict[str, tuple[str, str | None]] = {
    "ok": (ANSWER, None),
    "extra-bytes": (ANSWER, None),
    "continue": (ANSWER, None),
    "http10": (ANSWER, None),
    "conn-close": (ANSWER, None),
    "cut-chunk": (ERROR, None),
    "short-body": (ERROR, None),
    "reset-before": (ERROR, None),
    "reset-during": (ERROR, None),
    "invalid-http": (ERROR, None),
    "204": (ERROR, None),
    "html-500": (ERROR, None),
    "big-header": (ERROR, None),
    "no-headers": (ERROR, "GATEWAY_"),  # silence before the head: the stall (stream) or the total (whole)
    "slow-head": (ERROR, "GATEWAY_"),
    "drip": (ERROR, "GATEWAY_"),  # every byte in time, an event (stall) or the answer (total) never done
    "silent": (ERROR, "GATEWAY_"),
    "endless": (ERROR, "GATEWAY_REQUEST_TIMEOUT"),
    "keepalive": (ERROR, "GATEWAY_REQUEST_TIMEOUT"),
}
ROUTES = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages", "ollama": "/api/chat"}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessGateway]:
    with hostile_engine(tmp_path_factory.mktemp("hostile"), drip=DRIP) as url:
        env = {
            "GATEWAY_ENGINE_URL": url,
            "GATEWAY_STALL_TIMEOUT": str(STALL),
            "GATEWAY_REQUEST_TIMEOUT": str(TOTAL),
            "GATEWAY_LOG_LEVEL": "warning",
        }
        with in_process(tmp_path_factory.mktemp("gateway"), HOSTILE_MODELS, env=env) as gw:
            yield gw


def _body(dialect: str, behaviour: str, stream: bool) -> dict[str, Any]:
    messages = [{"role": "user", "content": behaviour}]
    if dialect == "anthropic":
        return {"model": "hostile", "max_tokens": 16, "messages": messages, "stream": stream}
    return {"model": "hostile", "messages": messages, "stream": stream}


@dataclass
class Outcome:
    """What the client got, read in its dialect: the answer's text, or the one error it was told."""

    status: int
    text: str
    error: str | None
    seconds: float


def _whole(dialect: str, response: httpx.Response) -> tuple[str, str | None]:
    body = response.json()
    if response.status_code >= 400:
        if dialect == "openai":
            assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
            return "", str(body["error"]["message"])
        if dialect == "anthropic":
            assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
            return "", str(body["error"]["message"])
        assert set(body) == {"error"} and isinstance(body["error"], str), body
        return "", body["error"]
    if dialect == "openai":
        return str(body["choices"][0]["message"]["content"]), None
    if dialect == "anthropic":
        return "".join(block["text"] for block in body["content"] if block["type"] == "text"), None
    return str(body["message"]["content"]), None


def _streamed(dialect: str, raw: str) -> tuple[str, str | None]:
    """The text of a stream and its error; an error must be the stream's one last event."""
    text, errors, events = "", [], 0
    if dialect == "ollama":
        lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
        for i, line in enumerate(lines):
            if "error" in line:
                assert set(line) == {"error"} and i == len(lines) - 1, lines[-3:]
                errors.append(line["error"])
            else:
                text += line["message"]["content"]
        return text, (errors[0] if errors else None)
    for block in raw.split("\n\n"):
        data = [line[6:] for line in block.split("\n") if line.startswith("data: ")]
        if not data:
            continue
        events += 1
        payload = data[0]
        if payload == "[DONE]":
            continue
        event = json.loads(payload)
        assert not errors, f"an event after the error: {block!r}"
        if dialect == "openai":
            if "error" in event:
                assert set(event["error"]) == {"message", "type", "param", "code"}, event
                errors.append(event["error"]["message"])
            else:
                text += "".join(choice["delta"].get("content") or "" for choice in event["choices"])
        else:
            if event["type"] == "error":
                assert block.startswith("event: error") and set(event["error"]) == {"type", "message"}, block
                errors.append(event["error"]["message"])
            elif event["type"] == "content_block_delta" and event["delta"]["type"] == "text_delta":
                text += event["delta"]["text"]
    return text, (errors[0] if errors else None)


async def _ask(client: httpx.AsyncClient, dialect: str, behaviour: str, stream: bool) -> Outcome:
    started = time.monotonic()
    response = await client.post(ROUTES[dialect], json=_body(dialect, behaviour, stream))
    seconds = time.monotonic() - started
    if stream and response.status_code == 200:
        text, error = _streamed(dialect, response.text)
    else:
        text, error = _whole(dialect, response)
    return Outcome(response.status_code, text, error, seconds)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("dialect", list(ROUTES))
def test_every_client_gets_its_answer_or_its_error_within_the_deadlines(
    gateway: InProcessGateway, dialect: str, stream: bool
) -> None:
    async def row() -> dict[str, Outcome]:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=CLIENT_TIMEOUT) as client:
            outcomes = await asyncio.gather(*(_ask(client, dialect, b, stream) for b in BEHAVIOURS))
            after = await _ask(client, dialect, "ok", stream)
        assert after.error is None and after.text == "fine", after  # the engine is not given up on
        return dict(zip(BEHAVIOURS, outcomes, strict=True))

    outcomes = asyncio.run(row())
    wrong = []
    for behaviour, (expected, setting) in BEHAVIOURS.items():
        outcome = outcomes[behaviour]
        if outcome.seconds > TOTAL + STALL + MARGIN:
            wrong.append(f"{behaviour}: {outcome.seconds:.1f} s")
        elif expected == ANSWER and (outcome.error is not None or outcome.text != "fine"):
            wrong.append(f"{behaviour}: no answer: {outcome}")
        elif expected == ERROR and (outcome.error is None or not outcome.error.strip()):
            wrong.append(f"{behaviour}: no error: {outcome}")
        elif expected == ERROR and setting is not None and setting not in str(outcome.error):
            wrong.append(f"{behaviour}: the error does not name {setting}: {outcome.error}")
    assert wrong == [], "\n".join(wrong)
    assert gateway.engine()["state"] == "ready"


def test_the_deadlines_are_what_ended_the_slow_cells(gateway: InProcessGateway) -> None:
    """Which deadline ended a slow stream: a head that never completes and a silence, the stall timeout; an engine
    that keeps sending, the request timeout (after the events it did send)."""

    async def run() -> dict[str, Outcome]:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=CLIENT_TIMEOUT) as client:
            slow = ("slow-head", "silent", "endless")
            outcomes = await asyncio.gather(*(_ask(client, "openai", b, True) for b in slow))
        return dict(zip(slow, outcomes, strict=True))

    outcomes = asyncio.run(run())
    assert "GATEWAY_STALL_TIMEOUT" in str(outcomes["slow-head"].error), outcomes["slow-head"]
    assert outcomes["slow-head"].status == 504  # no byte had been sent: a status, not an event
    assert "GATEWAY_STALL_TIMEOUT" in str(outcomes["silent"].error) and outcomes["silent"].text == "fine"
    assert "GATEWAY_REQUEST_TIMEOUT" in str(outcomes["endless"].error) and outcomes["endless"].text.startswith("more")

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.errors import EngineCrashed, EngineError, EngineStalled, GatewayError
from gateway.upstream.client import Deadline, UpstreamBroken, UpstreamConnectError, UpstreamTimeout
from gateway.upstream.relay import ModelRename, Relay, engine_error
from tests.fakes.upstream import Answer, Call, FakeUpstream, Handler


def relay_for(handler: Handler, **kw: float) -> Relay:
    return Relay(FakeUpstream(handler), stall_timeout=kw.get("stall", 5.0), request_timeout=kw.get("timeout", 5.0))


@pytest.mark.parametrize(
    ("status", "content", "message", "type_", "out_status"),
    [
        (500, b'{"message": "boom", "partial_response": {}}', "boom", "server_error", 500),
        (
            422,
            b'{"message": "dimensions is not supported"}',
            "dimensions is not supported",
            "invalid_request_error",
            400,
        ),
        (
            400,
            b"Failed to parse the request body as JSON: eof",
            "Failed to parse the request body as JSON: eof",
            "invalid_request_error",
            400,
        ),
        (500, b'{"error": {"message": "shaped", "type": "x"}}', "shaped", "server_error", 500),
        (
            500,
            b'{"message": "Received a request incompatible for this model\'s category"}',
            "Received a request incompatible for this model's category",
            "invalid_request_error",
            400,
        ),
        (503, b"", "The engine answered HTTP 503 with no explanation.", "server_error", 503),
    ],
)
def test_engine_errors_become_openai_errors(
    status: int, content: bytes, message: str, type_: str, out_status: int
) -> None:
    error = engine_error(status, content)
    assert isinstance(error, EngineError)
    assert error.status == out_status
    body = error.body()["error"]
    assert body["message"] == message and body["type"] == type_ and set(body) == {"message", "type", "param", "code"}


def test_model_rename_covers_both_json_spacings() -> None:
    rename = ModelRename.of("/models/qwen", "Qwen/Qwen3")
    assert rename(b'{"model":"/models/qwen","x":1}') == b'{"model":"Qwen/Qwen3","x":1}'
    assert rename(b'{"model": "/models/qwen"}') == b'{"model": "Qwen/Qwen3"}'
    assert rename(b'{"model":"/models/qwen2"}') == b'{"model":"/models/qwen2"}'
    assert ModelRename.of("same", "same").pairs == ()


async def test_stream_relays_the_engine_events_as_they_come() -> None:
    body = b'data: {"model":"e","n":1}\n\n: keep-alive\n\ndata: {"n":2}\n\ndata: engine exploded\n\ndata: [DONE]\n\n'
    relay = relay_for(lambda call: Answer(200, [body], "text/event-stream"))
    upstream = await relay.open_stream("http://e", "/v1/chat/completions", b"{}")
    # What the events say is for the dialect reading them (tests/unit/test_openai_streams.py): the relay moves bytes.
    assert b"".join([chunk async for chunk in relay.events(upstream, "http://e", started=relay.now())]) == body


@pytest.mark.parametrize("piece", [1, 5, 7, 64])
async def test_events_cut_anywhere_by_the_transport_are_relayed_whole(piece: int) -> None:
    body = b'data: {"model":"engine-id","n":1}\n\ndata: {"model":"engine-id","n":2}\n\ndata: [DONE]\n\n'
    pieces = [body[start : start + piece] for start in range(0, len(body), piece)]
    relay = relay_for(lambda call: Answer(200, pieces, "text/event-stream"))
    upstream = await relay.open_stream("http://e", "/v1/chat/completions", b"{}")
    sent = [chunk async for chunk in relay.events(upstream, "http://e", started=relay.now())]
    assert all(chunk.endswith(b"\n\n") for chunk in sent)  # never half an event
    assert b"".join(sent) == body


async def test_error_status_raises_before_the_stream_starts() -> None:
    relay = relay_for(lambda call: Answer.of(b'{"message":"bad","param":"logprobs"}', status=422))
    with pytest.raises(EngineError) as info:
        await relay.open_stream("http://e", "/v1/chat/completions", b"{}")
    assert info.value.status == 400 and info.value.message == "bad"  # a refusal is OpenAI's 400
    assert info.value.param == "logprobs" and info.value.code == "unsupported_parameter"


async def test_a_whole_answer_gets_a_total_deadline_and_a_stream_a_gap_too() -> None:
    calls: list[Call] = []

    def record(call: Call) -> Answer:
        calls.append(call)
        return Answer.of(b"{}")

    relay = relay_for(record, stall=7, timeout=30)
    await relay.request("http://e", "/x", b"{}")
    await relay.open_stream("http://e", "/x", b"{}")
    assert [c.deadline for c in calls] == [Deadline(total=30), Deadline(total=30, gap=7)]


def _raise(error: Exception) -> Handler:
    def handler(call: Call) -> Answer:
        raise error

    return handler


async def test_transport_failures_are_translated_then_reported() -> None:
    reported: list[GatewayError] = []

    def relay(handler: Handler, **kw: float) -> Relay:
        return Relay(
            FakeUpstream(handler),
            stall_timeout=kw.get("stall", 5),
            request_timeout=kw.get("timeout", 5),
            on_failure=lambda base_url, error: reported.append(error),
        )

    with pytest.raises(EngineCrashed, match="could not be reached"):
        await relay(_raise(UpstreamConnectError("refused"))).request("http://e", "/v1/completions", b"{}")
    with pytest.raises(EngineStalled, match=r"within 7 s \(GATEWAY_REQUEST_TIMEOUT\)"):
        await relay(_raise(UpstreamTimeout("slow")), timeout=7).request("http://e", "/x", b"{}")
    with pytest.raises(EngineStalled, match=r"came for 3 s \(GATEWAY_STALL_TIMEOUT\)"):
        await relay(_raise(UpstreamTimeout("slow", silence=True)), stall=3).open_stream("http://e", "/x", b"{}")
    with pytest.raises(EngineCrashed, match="broke off"):
        await relay(_raise(UpstreamBroken("peer closed"))).request("http://e", "/x", b"{}")
    cut = relay(lambda call: Answer(200, [b"data: 1\n\n"], "text/event-stream", fails_with=UpstreamBroken("reset")))
    upstream = await cut.open_stream("http://e", "/x", b"{}")
    with pytest.raises(EngineCrashed):
        [chunk async for chunk in cut.events(upstream, "http://e", started=cut.now())]
    assert [type(e) for e in reported] == [EngineCrashed, EngineStalled, EngineStalled, EngineCrashed, EngineCrashed]


async def test_an_event_without_end_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.upstream import relay as relay_module

    monkeypatch.setattr(relay_module, "MAX_EVENT", 100)
    relay = relay_for(lambda call: Answer(200, [b"data: " + b"x" * 60, b"y" * 60], "text/event-stream"))
    upstream = await relay.open_stream("http://e", "/x", b"{}")
    with pytest.raises(EngineCrashed, match="larger than"):
        [chunk async for chunk in relay.events(upstream, "http://e", started=relay.now())]


async def test_an_event_dripped_slower_than_the_stall_timeout_is_a_stall() -> None:
    ticks = iter(range(100))  # each look at the clock is one second later
    pieces = [b"data: {", b'"a"', b":1", b"}"]  # bytes keep coming, the event never ends in time
    relay = Relay(
        FakeUpstream(lambda call: Answer(200, pieces, "text/event-stream")),
        stall_timeout=2.5,
        request_timeout=5,
        clock=lambda: float(next(ticks)),
    )
    upstream = await relay.open_stream("http://e", "/x", b"{}")
    with pytest.raises(EngineStalled):
        [chunk async for chunk in relay.events(upstream, "http://e", started=relay.now())]


async def test_a_stream_whose_head_never_completes_is_a_stall() -> None:
    class SlowHead(FakeUpstream):
        async def post(
            self, url: str, body: bytes, *, deadline: Deadline, headers: dict[str, str] | None = None
        ) -> Any:
            await asyncio.Event().wait()  # the head's bytes trickle in, each socket read short: it never completes

    reported: list[GatewayError] = []
    relay = Relay(
        SlowHead(lambda call: Answer()),
        stall_timeout=0.05,
        request_timeout=60,
        on_failure=lambda base_url, error: reported.append(error),
    )
    with pytest.raises(EngineStalled, match=r"came for 0.05 s \(GATEWAY_STALL_TIMEOUT\)"):
        await relay.open_stream("http://e", "/x", b"{}")
    assert [type(e) for e in reported] == [EngineStalled]


async def test_a_stream_that_never_ends_is_bounded_by_the_request_timeout() -> None:
    ticks = iter(range(100))  # each look at the clock is one second later
    endless = Answer(200, [b"data: {}\n\n"] * 50, "text/event-stream")  # whole events, never a gap, never an end
    fake = FakeUpstream(lambda call: endless)
    relay = Relay(fake, stall_timeout=2.5, request_timeout=5, clock=lambda: float(next(ticks)))
    started = relay.now()
    upstream = await relay.open_stream("http://e", "/x", b"{}")
    received: list[bytes] = []
    with pytest.raises(EngineStalled, match=r"within 5 s \(GATEWAY_REQUEST_TIMEOUT\)"):
        async for chunk in relay.events(upstream, "http://e", started=started):
            received.append(chunk)
    assert len(received) == 4  # events at 2, 3, 4, 5 s after the start; the one at 6 s is past the deadline
    assert fake.responses[0].closed  # the connection is not kept

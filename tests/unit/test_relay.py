from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from gateway.errors import EngineCrashed, EngineError, EngineStalled
from gateway.relay import ModelRename, Relay, engine_error
from gateway.upstream import HttpxUpstream


def relay_for(handler: httpx.MockTransport, **kw: float) -> Relay:
    return Relay(HttpxUpstream(handler), stall_timeout=kw.get("stall", 5.0), request_timeout=kw.get("timeout", 5.0))


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

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=httpx.ByteStream(body), headers={"content-type": "text/event-stream"})

    relay = relay_for(httpx.MockTransport(handler))
    upstream = await relay.open_stream("http://e", "/v1/chat/completions", b"{}")
    # What the events say is for the dialect reading them (tests/unit/test_openai_streams.py): the relay moves bytes.
    assert b"".join([chunk async for chunk in relay.events(upstream)]) == body


@pytest.mark.parametrize("piece", [1, 5, 7, 64])
async def test_events_cut_anywhere_by_the_transport_are_relayed_whole_and_renamed(piece: int) -> None:
    body = b'data: {"model":"engine-id","n":1}\n\ndata: {"model":"engine-id","n":2}\n\ndata: [DONE]\n\n'

    class Pieces(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            for start in range(0, len(body), piece):
                yield body[start : start + piece]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Pieces(), headers={"content-type": "text/event-stream"})

    relay = relay_for(httpx.MockTransport(handler))
    upstream = await relay.open_stream("http://e", "/v1/chat/completions", b"{}")
    sent = [chunk async for chunk in relay.events(upstream)]
    assert all(chunk.endswith(b"\n\n") for chunk in sent)  # never half an event
    assert b"".join(sent) == body


async def test_error_status_raises_before_the_stream_starts() -> None:
    relay = relay_for(httpx.MockTransport(lambda r: httpx.Response(422, content=b'{"message":"bad"}')))
    with pytest.raises(EngineError) as info:
        await relay.open_stream("http://e", "/v1/chat/completions", b"{}")
    assert info.value.status == 400 and info.value.message == "bad"  # a refusal is OpenAI's 400


async def test_transport_failures_are_translated() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    def stall(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    def cut(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("peer closed", request=request)

    unreachable: list[bool] = []
    relay = Relay(HttpxUpstream(httpx.MockTransport(refuse)), stall_timeout=7, request_timeout=7,
                  on_unreachable=lambda: unreachable.append(True))  # fmt: skip
    with pytest.raises(EngineCrashed):
        await relay.request("http://e", "/v1/completions", b"{}")
    assert unreachable == [True]
    with pytest.raises(EngineStalled, match=r"7 s \(GATEWAY_REQUEST_TIMEOUT\)"):
        await relay_for(httpx.MockTransport(stall), timeout=7).request("http://e", "/x", b"{}")
    with pytest.raises(EngineStalled, match=r"3 s \(GATEWAY_STALL_TIMEOUT\)"):
        await relay_for(httpx.MockTransport(stall), stall=3).open_stream("http://e", "/x", b"{}")
    with pytest.raises(EngineCrashed, match="middle of the response"):
        await relay_for(httpx.MockTransport(cut)).request("http://e", "/x", b"{}")

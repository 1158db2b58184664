"""AiohttpUpstream, the gateway's HTTP client to the engine, against real sockets.

Each test runs a small TCP server whose answers are scripted byte for byte, so that the cases a general
server would never produce on demand (a stall after the headers, a connection cut mid-body, an unframed
body, a malformed status line, bytes after the answer) can be checked. The same faults from a whole engine
program, through a whole gateway, are in tests/integration/test_deadlines.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from gateway.upstream import client as upstream_module
from gateway.upstream.client import AiohttpUpstream, Deadline, UpstreamBroken, UpstreamConnectError, UpstreamTimeout

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Server"], Awaitable[None]]


@dataclass
class Server:
    port: int = 0
    connections: int = 0
    requests: list[tuple[bytes, dict[bytes, bytes], bytes]] = field(default_factory=list)
    closed_by_peer: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def read_request(reader: asyncio.StreamReader, server: Server) -> bool:
    """Read one request (head and Content-Length body); False when the client closed the connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        server.closed_by_peer.set()
        return False
    line, *rest = head[:-4].split(b"\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (h.partition(b":") for h in rest)}
    body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
    server.requests.append((line, headers, body))
    return True


@contextlib.asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[Server]:
    server = Server()

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server.connections += 1
        try:
            await handler(reader, writer, server)
        except ConnectionError:
            pass
        finally:
            writer.close()

    listener = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def answer(body: bytes, *, content_type: bytes = b"application/json", extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: "
        + content_type
        + b"\r\ncontent-length: %d\r\n" % len(body)
        + extra
        + b"\r\n"
        + body
    )


async def echo_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
    while await read_request(reader, server):
        writer.write(answer(b'{"echo":"' + server.requests[-1][2].replace(b'"', b"'") + b'"}'))
        await writer.drain()


WHOLE = Deadline(total=5)


async def post(upstream: AiohttpUpstream, url: str, deadline: Deadline = WHOLE) -> bytes:
    response = await upstream.post(url, b"{}", deadline=deadline)
    return await response.read()


async def test_a_keep_alive_connection_carries_many_requests() -> None:
    upstream = AiohttpUpstream()
    async with serving(echo_forever) as server:
        for i in range(5):
            response = await upstream.post(server.url + "/v1/chat/completions", b'{"n":%d}' % i, deadline=WHOLE)
            assert (response.status, response.content_type) == (200, "application/json")
            assert await response.read() == b"""{"echo":"{'n':%d}"}""" % i
        status, body = await upstream.get(server.url + "/health", timeout=5)
        assert status == 200
        await upstream.aclose()
    assert server.connections == 1
    line, headers, body = server.requests[0]
    assert (line, body) == (b"POST /v1/chat/completions HTTP/1.1", b'{"n":0}')
    assert headers[b"content-type"] == b"application/json" and headers[b"content-length"] == b"7"
    assert server.requests[-1][0] == b"GET /health HTTP/1.1"


async def test_a_chunked_stream_is_relayed_piece_by_piece_as_it_arrives() -> None:
    go_on = asyncio.Event()

    async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await read_request(reader, server)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        writer.write(b"9\r\ndata: 1\n\n\r\n")
        await writer.drain()
        await go_on.wait()  # the second event only once the first has reached the reader
        writer.write(b"9\r\ndata: 2\n\n\r\n0\r\n\r\n")
        await writer.drain()
        await read_request(reader, server)  # keep-alive: the next request comes on this connection

    upstream = AiohttpUpstream()
    async with serving(stream) as server:
        response = await upstream.post(
            server.url + "/s", b"{}", deadline=Deadline(gap=5), headers={"accept": "text/event-stream"}
        )
        assert response.content_type == "text/event-stream"
        chunks = response.chunks()
        assert await anext(chunks) == b"data: 1\n\n"
        go_on.set()
        assert b"".join([c async for c in chunks]) == b"data: 2\n\n"
        assert server.requests[0][1][b"accept"] == b"text/event-stream"
        await upstream.aclose()


async def test_a_body_without_length_ends_with_the_connection() -> None:
    async def unframed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await read_request(reader, server)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")
        await writer.drain()

    upstream = AiohttpUpstream()
    async with serving(unframed) as server:
        assert await post(upstream, server.url + "/x") == b"all of it"
        assert await post(upstream, server.url + "/x") == b"all of it"  # on a new connection
        await upstream.aclose()
    assert server.connections == 2


async def test_a_connection_cut_mid_body_is_a_broken_answer() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await read_request(reader, server)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part")
        await writer.drain()

    upstream = AiohttpUpstream()
    async with serving(cut) as server:
        with pytest.raises(UpstreamBroken):
            await post(upstream, server.url + "/x")
        stream = await upstream.post(server.url + "/x", b"{}", deadline=Deadline(gap=5))
        with pytest.raises(UpstreamBroken):
            [c async for c in stream.chunks()]
        await upstream.aclose()


async def test_nothing_listening_is_a_connect_error() -> None:
    async with serving(echo_forever) as server:
        url = server.url
    upstream = AiohttpUpstream()
    with pytest.raises(UpstreamConnectError):
        await post(upstream, url + "/x")
    await upstream.aclose()


async def test_a_malformed_answer_is_broken_and_the_connection_dropped() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await read_request(reader, server)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        await read_request(reader, server)

    upstream = AiohttpUpstream()
    async with serving(garbage) as server:
        with pytest.raises(UpstreamBroken):
            await post(upstream, server.url + "/x")
        await until(server.closed_by_peer.is_set)
        await upstream.aclose()


async def test_a_stream_silent_longer_than_its_gap_is_a_timeout_and_closes_the_connection() -> None:
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await read_request(reader, server)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await read_request(reader, server)  # returns when the client gives up on the connection

    upstream = AiohttpUpstream()
    async with serving(stall) as server:
        response = await upstream.post(server.url + "/x", b"{}", deadline=Deadline(gap=0.2))
        chunks = response.chunks()
        assert await anext(chunks) == b"first"
        with pytest.raises(UpstreamTimeout):
            await anext(chunks)
        await until(server.closed_by_peer.is_set)
        await upstream.aclose()


async def test_a_whole_answer_has_a_total_deadline_however_it_drips() -> None:
    async def drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await read_request(reader, server)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            while True:  # a byte at a time, never a gap the gap timeout would notice
                writer.write(b"x")
                await writer.drain()
                await asyncio.sleep(0.01)

    upstream = AiohttpUpstream()
    async with serving(drip) as server:
        with pytest.raises(UpstreamTimeout):
            await post(upstream, server.url + "/x", Deadline(total=0.5, gap=5))
        await upstream.aclose()


async def test_a_cancelled_request_closes_its_connection_so_the_engine_sees_the_client_leave() -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await read_request(reader, server)
        await read_request(reader, server)  # no answer; returns when the client closes

    upstream = AiohttpUpstream()
    async with serving(slow) as server:
        call = asyncio.ensure_future(post(upstream, server.url + "/x", Deadline(total=30)))
        await until(lambda: len(server.requests) == 1)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await until(server.closed_by_peer.is_set)
        await upstream.aclose()


async def test_bytes_after_an_answer_never_poison_the_next_request() -> None:
    async def extra(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        while await read_request(reader, server):
            writer.write(answer(b'{"n":1}') + b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nstale one")
            await writer.drain()

    upstream = AiohttpUpstream()
    async with serving(extra) as server:
        for _ in range(3):  # each answer is the one asked for, never the stale bytes of the last
            assert await post(upstream, server.url + "/x") == b'{"n":1}'
        await upstream.aclose()


async def test_an_answer_closed_unread_is_not_reused() -> None:
    big = b"x" * (4 << 20)

    async def large(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        while await read_request(reader, server):
            writer.write(answer(big if len(server.requests) == 1 else b"small"))
            with contextlib.suppress(ConnectionError):
                await writer.drain()

    upstream = AiohttpUpstream()
    async with serving(large) as server:
        response = await upstream.post(server.url + "/x", b"{}", deadline=Deadline(gap=5))
        assert await anext(response.chunks())  # a client that read a little and left
        await response.close()
        assert await post(upstream, server.url + "/x") == b"small"
        assert server.connections == 2  # the half-read connection was closed, not handed to the next request
        await upstream.aclose()


async def test_a_whole_answer_is_bounded_in_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream_module, "MAX_ANSWER", 1000)
    async with serving(lambda r, w, s: _answer_with(r, w, s, b"y" * 5000)) as server:
        upstream = AiohttpUpstream()
        with pytest.raises(UpstreamBroken, match="larger than"):
            await post(upstream, server.url + "/x")
        await upstream.aclose()


async def _answer_with(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server, body: bytes) -> None:
    await read_request(reader, server)
    writer.write(answer(body))
    with contextlib.suppress(ConnectionError):
        await writer.drain()


async def test_closing_the_client_ends_every_answer_in_flight_at_once() -> None:
    async def first_then_silence(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await read_request(reader, server)
        if len(server.requests) == 1:  # a stream that has begun; the other request gets no answer at all
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            await writer.drain()
        await read_request(reader, server)

    upstream = AiohttpUpstream()
    async with serving(first_then_silence) as server:
        stream = await upstream.post(server.url + "/s", b"{}", deadline=Deadline(gap=60))
        chunks = stream.chunks()
        assert await anext(chunks) == b"first"
        reading = asyncio.ensure_future(anext(chunks))
        waiting = asyncio.ensure_future(post(upstream, server.url + "/w", Deadline(total=60)))
        await until(lambda: len(server.requests) == 2)
        await upstream.aclose()  # the end of a graceful shutdown
        for call in (reading, waiting):
            with pytest.raises(UpstreamBroken):
                await asyncio.wait_for(call, 5)

"""H1Upstream, the gateway's HTTP/1.1 client to the engine, against real sockets.

Each test runs a small TCP server whose answers are scripted byte for byte, so that the cases a general
server would never produce on demand (a stall after the headers, a connection cut mid-body, an unframed
body, a malformed status line) can be checked.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from gateway.upstream import H1Upstream, UpstreamBroken, UpstreamConnectError, UpstreamTimeout

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
    return (b"HTTP/1.1 200 OK\r\ncontent-type: " + content_type + b"\r\ncontent-length: %d\r\n" % len(body)
            + extra + b"\r\n" + body)  # fmt: skip


async def echo_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
    while await read_request(reader, server):
        writer.write(answer(b'{"echo":"' + server.requests[-1][2].replace(b'"', b"'") + b'"}'))
        await writer.drain()


async def test_a_keep_alive_connection_carries_many_requests_with_one_write_each() -> None:
    upstream = H1Upstream()
    async with serving(echo_forever) as server:
        for i in range(5):
            response = await upstream.post(server.url + "/v1/chat/completions", b'{"n":%d}' % i, read_timeout=5,
                                           stream=False)  # fmt: skip
            assert (response.status, response.content_type) == (200, "application/json")
            assert await response.read() == b"""{"echo":"{'n':%d}"}""" % i
        status, body = await upstream.get(server.url + "/health", timeout=5)
        assert status == 200
        await upstream.aclose()
    assert server.connections == 1
    line, headers, body = server.requests[0]
    assert (line, body) == (b"POST /v1/chat/completions HTTP/1.1", b'{"n":0}')
    assert headers[b"host"] == b"127.0.0.1:%d" % server.port
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

    upstream = H1Upstream()
    async with serving(stream) as server:
        response = await upstream.post(server.url + "/s", b"{}", read_timeout=5, stream=True,
                                       headers={"accept": "text/event-stream"})  # fmt: skip
        assert response.content_type == "text/event-stream"
        chunks = response.chunks()
        assert await anext(chunks) == b"data: 1\n\n"
        go_on.set()
        assert [c async for c in chunks] == [b"data: 2\n\n"]
        assert server.requests[0][1][b"accept"] == b"text/event-stream"
        await upstream.aclose()


async def test_a_body_without_length_ends_with_the_connection() -> None:
    async def unframed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await read_request(reader, server)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")
        await writer.drain()

    upstream = H1Upstream()
    async with serving(unframed) as server:
        response = await upstream.post(server.url + "/x", b"{}", read_timeout=5, stream=False)
        assert await response.read() == b"all of it"
        # Not reusable: the next request opens a new connection.
        response = await upstream.post(server.url + "/x", b"{}", read_timeout=5, stream=False)
        assert await response.read() == b"all of it"
        await upstream.aclose()
    assert server.connections == 2


async def test_a_connection_cut_mid_body_is_a_broken_answer() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await read_request(reader, server)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part")
        await writer.drain()

    upstream = H1Upstream()
    async with serving(cut) as server:
        with pytest.raises(UpstreamBroken):  # a whole-body answer is awaited in full before post() returns
            await upstream.post(server.url + "/x", b"{}", read_timeout=5, stream=False)
        stream = await upstream.post(server.url + "/x", b"{}", read_timeout=5, stream=True)
        with pytest.raises(UpstreamBroken):
            [c async for c in stream.chunks()]
        await upstream.aclose()


async def test_nothing_listening_is_a_connect_error() -> None:
    async with serving(echo_forever) as server:
        url = server.url
    with pytest.raises(UpstreamConnectError):
        await H1Upstream().post(url + "/x", b"{}", read_timeout=5, stream=False)


async def test_a_malformed_answer_is_broken_and_the_connection_dropped() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await read_request(reader, server)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        await read_request(reader, server)

    upstream = H1Upstream()
    async with serving(garbage) as server:
        with pytest.raises(UpstreamBroken):
            await upstream.post(server.url + "/x", b"{}", read_timeout=5, stream=False)
        await until(server.closed_by_peer.is_set)
        await upstream.aclose()


async def test_silence_beyond_the_read_timeout_is_a_timeout_and_closes_the_connection() -> None:
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await read_request(reader, server)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await read_request(reader, server)  # returns when the client gives up on the connection

    upstream = H1Upstream()
    async with serving(stall) as server:
        response = await upstream.post(server.url + "/x", b"{}", read_timeout=0.2, stream=True)
        chunks = response.chunks()
        assert await anext(chunks) == b"first"
        with pytest.raises(UpstreamTimeout):
            await anext(chunks)
        await until(server.closed_by_peer.is_set)
        await upstream.aclose()


async def test_a_cancelled_request_closes_its_connection_so_the_engine_sees_the_client_leave() -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await read_request(reader, server)
        await read_request(reader, server)  # no answer; returns when the client closes

    upstream = H1Upstream()
    async with serving(slow) as server:
        call = asyncio.ensure_future(upstream.post(server.url + "/x", b"{}", read_timeout=30, stream=False))
        await until(lambda: len(server.requests) == 1)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await until(server.closed_by_peer.is_set)
        await upstream.aclose()


async def test_a_slow_reader_pauses_the_engine_instead_of_buffering_everything() -> None:
    size = 32 * 1024 * 1024
    piece = b"x" * 65536

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await read_request(reader, server)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
        for _ in range(size // len(piece)):
            writer.write(piece)
            await writer.drain()

    upstream = H1Upstream()
    async with serving(flood) as server:
        response = await upstream.post(server.url + "/x", b"{}", read_timeout=5, stream=True)
        # Nobody reads: the client stops reading from the socket once its buffer is full.
        await until(lambda: getattr(response, "_paused", False))
        total = sum([len(c) async for c in response.chunks()])
        assert total == size
        await upstream.aclose()


async def test_a_get_is_retried_once_on_a_pooled_connection_that_dies_but_a_post_is_not() -> None:
    async def one_then_drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await read_request(reader, server)
        writer.write(answer(b"ok"))
        await writer.drain()
        # The next request on this connection is dropped unanswered, as when an engine closes an idle
        # connection at the moment it is reused.
        await read_request(reader, server)
        writer.transport.abort()

    upstream = H1Upstream()
    async with serving(one_then_drop) as server:
        assert await upstream.get(server.url + "/health", timeout=5) == (200, b"ok")
        assert await upstream.get(server.url + "/health", timeout=5) == (200, b"ok")  # dropped, then retried
        assert server.connections == 2
        # A POST may have reached the engine: it is not sent twice.
        with pytest.raises(UpstreamBroken):
            await upstream.post(server.url + "/x", b"{}", read_timeout=5, stream=False)
        assert server.connections == 2
        await upstream.aclose()


async def test_connections_the_engine_closes_leave_nothing_behind_in_the_pool() -> None:
    engine_stops = asyncio.Event()

    async def answer_then_idle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await read_request(reader, server)
        writer.write(answer(b"ok"))
        await writer.drain()
        await engine_stops.wait()  # then the connection is closed, as by an engine that stops

    upstream = H1Upstream()
    async with serving(answer_then_idle) as first, serving(answer_then_idle) as second:
        await asyncio.gather(*(upstream.get(first.url + "/health", timeout=5) for _ in range(3)))
        await upstream.get(second.url + "/health", timeout=5)
        assert first.connections == 3 and len(upstream._idle[("127.0.0.1", first.port)]) == 3
        engine_stops.set()
        # Every connection is dropped, not kept in a list per address (each engine start has a new port).
        await until(lambda: not upstream._idle and not upstream._open)
    await upstream.aclose()

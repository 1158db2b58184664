"""The HTTP client to the engine, behind a small interface with two implementations.

``H1Upstream`` is the default: a keep-alive HTTP/1.1 client on asyncio protocols, parsed by httptools. The
gateway's throughput on two cores is set by its CPU per request (shared/PERF.md: httpx's AsyncClient spent
6.5 ms per request at concurrency 32), and a client that only ever speaks plain HTTP/1.1 to one local engine
spends half of aiohttp's CPU per request (aiohttp was the previous default; the numbers are in
tests/bench/README.md). ``HttpxUpstream`` takes any httpx transport, which is how unit tests drive the relay with
``httpx.MockTransport``. Each translates its failures into the three ``Upstream*`` errors below, so that the
relay maps them to the gateway's error tree in exactly one place.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast
from urllib.parse import urlsplit

import httptools

if TYPE_CHECKING:  # httpx is imported only when used: the gateway at rest does without it
    import httpx


class UpstreamError(Exception):
    """A transport failure talking to the engine."""


class UpstreamConnectError(UpstreamError):
    """Nothing accepted the connection: the engine is not there (any more)."""


class UpstreamTimeout(UpstreamError):
    """No byte arrived for the read timeout."""


class UpstreamBroken(UpstreamError):
    """The connection broke or closed in the middle of the answer."""


class UpstreamResponse(Protocol):
    status: int
    content_type: str

    async def read(self) -> bytes: ...

    def chunks(self) -> AsyncIterator[bytes]: ...

    async def close(self) -> None: ...


class Upstream(Protocol):
    async def get(self, url: str, *, timeout: float) -> tuple[int, bytes]:
        """A small GET (health probes): status and body. Raises :class:`UpstreamError`."""
        ...

    async def post(
        self, url: str, body: bytes, *, read_timeout: float, stream: bool, headers: dict[str, str] | None = None
    ) -> UpstreamResponse: ...

    async def aclose(self) -> None: ...


# ------------------------------------------------------------------------------------ HTTP/1.1 client

_HIGH_WATER = 1 << 20  # bytes of an answer buffered for a slow reader before the engine is made to wait


@dataclass(frozen=True)
class _Target:
    host: str
    port: int
    path: bytes
    host_header: bytes


def _target(url: str) -> _Target:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise UpstreamConnectError(f"The engine URL {url!r} is not a plain http:// URL.")
    port = parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    return _Target(host, port, path.encode(), f"{shown}:{port}".encode())


class _H1Response:
    """One answer arriving on a connection: status and content type, then the body, decoded from chunked
    encoding by the parser, buffered until the reader takes it.

    A stream's reader is woken once the headers are in and then for each piece, and reading stops
    (``pause_reading``) when more than ``_HIGH_WATER`` bytes wait for it, so that a client that reads slowly
    applies back-pressure to the engine instead of filling the gateway's memory. A whole-body reader is woken
    once, when the answer is complete (not at the headers too: a task wake-up is worth saving on every request).
    """

    __slots__ = ("_buffered", "_chunks", "_conn", "_done", "_error", "_framed", "_last", "_paused",
                 "_ready", "_stream", "_timeout", "_timer", "_waiter", "content_type", "status")  # fmt: skip

    def __init__(self, conn: _Connection, timeout: float, stream: bool) -> None:
        self.status = 0
        self._stream = stream
        self.content_type = "application/json"
        self._conn = conn
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._ready: asyncio.Future[None] = conn.loop.create_future()  # see wait_ready()
        self._done = False
        self._error: UpstreamError | None = None
        self._framed = False  # a Content-Length or chunked encoding ends the body; otherwise the connection's end
        self._paused = False
        self._timeout = timeout
        self._last = conn.loop.time()
        self._timer: asyncio.TimerHandle | None = conn.loop.call_at(self._last + timeout, self._check_idle)

    # -- fed by the connection

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-type":
            self.content_type = value.decode("latin-1")
        elif name in (b"content-length", b"transfer-encoding"):
            self._framed = True

    def headers_complete(self, status: int) -> None:
        self.status = status
        if status in (204, 304):
            self._framed = True
        if self._stream and not self._ready.done():
            self._ready.set_result(None)

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        if self._stream:
            self._buffered += len(data)
            if self._buffered > _HIGH_WATER and not self._paused:
                self._paused = True
                self._conn.pause_reading()
            self._wake()

    def finish(self) -> None:
        self._done = True
        self._stop_timer()
        if not self._ready.done():
            self._ready.set_result(None)
        self._wake()

    def fail(self, error: UpstreamError) -> None:
        if self._done:
            return
        self._done = True
        self._error = error
        self._stop_timer()
        if not self._ready.done():
            self._ready.set_exception(error)
            self._ready.exception()  # retrieved: nobody may be waiting any more
        self._wake()

    def connection_ended(self) -> None:
        """The connection closed: the end of an unframed body, otherwise a broken answer."""
        if self.status and not self._framed:
            self.finish()
        else:
            self.fail(UpstreamBroken("The engine closed the connection before the end of its answer."))

    def touched(self) -> None:
        self._last = self._conn.loop.time()

    def _check_idle(self) -> None:
        """One timer per answer, re-armed from the time of the last byte, rather than one per chunk."""
        self._timer = None
        if self._done:
            return
        now = self._conn.loop.time()
        if self._paused:  # the reader is slow, not the engine
            self._last = now
        if now - self._last >= self._timeout:
            self.fail(UpstreamTimeout(f"The engine sent nothing for {self._timeout:g} s."))
            self._conn.close()
            return
        self._timer = self._conn.loop.call_at(self._last + self._timeout, self._check_idle)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- read by the relay

    async def wait_ready(self) -> None:
        """Until a stream's headers are in, or a whole-body answer is complete."""
        await self._ready

    def _take(self) -> bytes:
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        if self._paused:
            self._paused = False
            self._conn.resume_reading()
        return data

    async def _wait(self) -> None:
        self._waiter = self._conn.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def read(self) -> bytes:
        self._stream = False  # the whole body is wanted (e.g. an error answer to a stream): no back-pressure
        if self._paused:
            self._paused = False
            self._conn.resume_reading()
        try:
            while not self._done:
                await self._wait()
        except BaseException:
            self._conn.close()  # cancelled half-way: the engine must see the client leave
            raise
        if self._error is not None:
            raise self._error
        return self._take() if self._chunks else b""

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            if self._chunks:
                yield self._take()
            elif self._error is not None:
                raise self._error
            elif self._done:
                return
            else:
                await self._wait()

    async def close(self) -> None:
        if not self._done:
            self.fail(UpstreamBroken("abandoned"))
            self._conn.close()


class _Connection(asyncio.Protocol):
    """One keep-alive connection to the engine; httptools parses the answers."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: H1Upstream, key: tuple[str, int]) -> None:
        self.loop = loop
        self._pool = pool
        self.key = key
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._response: _H1Response | None = None
        self.closed = False
        self.idle_since = 0.0

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        response = self._response
        if response is None:  # bytes nobody asked for: the connection cannot be trusted any more
            self.close()
            return
        response.touched()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            response.fail(UpstreamBroken(f"The engine sent a malformed answer: {exc}"))
            self.close()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.forget(self)
        response, self._response = self._response, None
        if response is not None:
            response.connection_ended()

    # -- httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._response is not None:
            self._response.header(name, value)

    def on_headers_complete(self) -> None:
        if self._response is not None:
            self._response.headers_complete(self._parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        if self._response is not None:
            self._response.feed(body)

    def on_message_complete(self) -> None:
        response, self._response = self._response, None
        if response is None:
            return
        response.finish()
        if self._parser.should_keep_alive() and not self.closed:
            self._pool.release(self)
        else:
            self.close()

    # -- used by the client and the response

    def send(self, data: bytes, timeout: float, stream: bool) -> _H1Response:
        assert self._transport is not None and self._response is None
        response = _H1Response(self, timeout, stream)
        self._response = response
        self._transport.write(data)
        return response

    def pause_reading(self) -> None:
        if self._transport is not None and not self.closed:
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None and not self.closed:
            self._transport.resume_reading()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self._transport is not None:
                self._transport.close()


class H1Upstream:
    """Keep-alive HTTP/1.1 to the engine on asyncio protocols, with httptools' parser (the one uvicorn uses).

    Why not a general HTTP client: on two cores the gateway's CPU per request is taken from the engine and the
    clients. Measured as a client against the fast fake engine (``python -m tests.bench.upstream``), CPU per
    small request: httpx 0.7-2.9 ms, aiohttp 0.08-0.21 ms, this client 0.04-0.09 ms. It only ever speaks plain
    HTTP/1.1 to one local engine, writes each request with one ``write``, hands the body to the relay as it
    arrives, and keeps one timer per answer for the read timeout.
    """

    def __init__(self, *, max_idle: int = 256, keepalive: float = 30.0, connect_timeout: float = 10.0) -> None:
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._max_idle = max_idle
        self._keepalive = keepalive  # below the engine's idle timeout, so the engine never closes one we pick
        self._connect_timeout = connect_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._targets: dict[str, _Target] = {}  # URLs split once: a handful of them, called millions of times

    def release(self, conn: _Connection) -> None:
        """An answer is complete and the connection may carry the next request."""
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= self._max_idle:
            conn.close()
            return
        conn.idle_since = conn.loop.time()
        idle.append(conn)

    def forget(self, conn: _Connection) -> None:
        """A connection closed: drop every reference to it. Each engine start listens on a new port, so lists of
        dead connections kept per address would grow with every idle stop."""
        self._open.discard(conn)
        idle = self._idle.get(conn.key)
        if idle is not None:
            with contextlib.suppress(ValueError):
                idle.remove(conn)
            if not idle:
                del self._idle[conn.key]

    async def _acquire(self, target: _Target, connect_timeout: float) -> tuple[_Connection, bool]:
        """The most recently used idle connection (LIFO keeps few connections warm), else a new one."""
        loop = self._loop
        if loop is None or loop.is_closed():
            # Looked up once: on Python 3.11 every get_running_loop() is a getpid() system call.
            loop = self._loop = asyncio.get_running_loop()
        key = (target.host, target.port)
        idle = self._idle.get(key)
        now = loop.time()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self._keepalive:
                return conn, True
            conn.close()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(loop, self, key), target.host, target.port),
                connect_timeout,
            )
        except (OSError, asyncio.TimeoutError) as exc:
            raise UpstreamConnectError(
                f"Cannot connect to the engine at {target.host_header.decode()}: {exc or 'timed out'}"
            ) from exc
        self._open.add(conn)
        return conn, False

    async def _exchange(self, url: str, method: bytes, headers: bytes, body: bytes, timeout: float,
                        connect_timeout: float, stream: bool, retry_stale: bool) -> _H1Response:  # fmt: skip
        """Send ``method url`` with ``headers`` (header lines, each ending in CRLF) and ``body``, and wait until
        the answer is ready (see :meth:`_H1Response.wait_ready`)."""
        target = self._targets.get(url)
        if target is None:
            if len(self._targets) > 1024:  # URLs follow the engine's port; old ones are dropped, not kept forever
                self._targets.clear()
            target = self._targets[url] = _target(url)
        request = b"".join((method, b" ", target.path, b" HTTP/1.1\r\nhost: ", target.host_header, b"\r\n", headers,
                            b"\r\n", body))  # one copy of the body, one write
        while True:
            conn, reused = await self._acquire(target, connect_timeout)
            response = conn.send(request, timeout, stream)
            try:
                await response.wait_ready()
            except UpstreamBroken:
                # A pooled connection the engine closed just now, before reading anything: safe to retry only
                # for a GET (a POST might have reached the engine).
                if reused and retry_stale:
                    retry_stale = False
                    continue
                raise
            except BaseException:
                conn.close()  # cancelled or timed out while waiting: the engine must see us leave
                raise
            return response

    async def get(self, url: str, *, timeout: float) -> tuple[int, bytes]:
        response = await self._exchange(url, b"GET", b"", b"", timeout, timeout, stream=False, retry_stale=True)
        return response.status, await response.read()

    async def post(
        self, url: str, body: bytes, *, read_timeout: float, stream: bool, headers: dict[str, str] | None = None
    ) -> UpstreamResponse:
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items()).encode() if headers else b""
        framing = b"content-type: application/json\r\ncontent-length: %d\r\n%s" % (len(body), extra)
        return await self._exchange(url, b"POST", framing, body, read_timeout, self._connect_timeout, stream=stream,
                                    retry_stale=False)  # fmt: skip

    async def aclose(self) -> None:
        for conn in list(self._open):
            conn.close()
        self._open.clear()
        self._idle.clear()


# ----------------------------------------------------------------------------------------------- httpx


class _HttpxResponse:
    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code
        self.content_type = response.headers.get("content-type", "application/json")

    async def read(self) -> bytes:
        import httpx

        try:
            return await self._response.aread()
        except httpx.HTTPError as exc:
            raise _httpx_error(exc) from exc
        finally:
            await self._response.aclose()

    async def chunks(self) -> AsyncIterator[bytes]:
        import httpx

        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            raise _httpx_error(exc) from exc

    async def close(self) -> None:
        await self._response.aclose()


def _httpx_error(exc: httpx.HTTPError) -> UpstreamError:
    import httpx

    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return UpstreamConnectError(str(exc))
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(str(exc) or "read timeout")
    return UpstreamBroken(str(exc) or type(exc).__name__)


class HttpxUpstream:
    """httpx with an injectable transport (``httpx.MockTransport`` in unit tests)."""

    def __init__(self, transport: httpx.AsyncBaseTransport | None = None) -> None:
        import httpx

        self._client = httpx.AsyncClient(
            transport=transport,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=30),
        )

    async def get(self, url: str, *, timeout: float) -> tuple[int, bytes]:
        import httpx

        try:
            response = await self._client.get(url, timeout=timeout)
        except httpx.HTTPError as exc:
            raise _httpx_error(exc) from exc
        return response.status_code, response.content

    async def post(
        self, url: str, body: bytes, *, read_timeout: float, stream: bool, headers: dict[str, str] | None = None
    ) -> UpstreamResponse:
        import httpx

        request = self._client.build_request(
            "POST", url, content=body, headers={"content-type": "application/json", **(headers or {})},
            timeout=httpx.Timeout(10.0, read=read_timeout),
        )  # fmt: skip
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise _httpx_error(exc) from exc
        return _HttpxResponse(response)

    async def aclose(self) -> None:
        await self._client.aclose()

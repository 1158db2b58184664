"""The HTTP client to the engine: aiohttp's pooled keep-alive client behind a small interface.

Framing, pooling, keep-alive and header limits are aiohttp's: a gateway's HTTP client must be the most boring part
of it. (An earlier hand-written client saved a tenth of a millisecond per request and lost requests when the engine
misbehaved.) This module adds only what the gateway needs around it:

- two kinds of deadline (:class:`Deadline`): a total one for a whole answer, so that an engine dripping one byte
  at a time cannot hold a client past it, and a gap between bytes for streams, which may rightly run for hours;
- a bound on what a whole answer may weigh in memory;
- the translation of aiohttp's and the OS's failures into the three :class:`UpstreamError` kinds, at one boundary
  (:func:`_translate`), so that the relay maps them to the gateway's error tree in exactly one place.

Tests drive the relay with a small fake of :class:`Upstream` (tests/unit/test_relay.py) and this client against
misbehaving engine programs over real sockets (tests/integration/test_hostile_engine.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # aiohttp is imported when the first request goes out: `mistral-gateway check` does without it
    import aiohttp

MAX_ANSWER = 256 << 20  # bytes of a whole (non-streamed) answer: more is an engine gone wrong, not an answer


class UpstreamError(Exception):
    """A transport failure talking to the engine."""


class UpstreamConnectError(UpstreamError):
    """Nothing accepted the connection: the engine is not there (any more)."""


class UpstreamTimeout(UpstreamError):
    """A deadline passed: the whole exchange took too long (``silence`` False), or nothing came for longer than the
    longest silence allowed (``silence`` True)."""

    def __init__(self, message: str, *, silence: bool = False) -> None:
        super().__init__(message)
        self.silence = silence


class UpstreamBroken(UpstreamError):
    """The connection broke, or what came over it was not a well-formed HTTP answer."""


@dataclass(frozen=True)
class Deadline:
    """``total``: seconds for the whole exchange (None: no limit); ``gap``: the longest silence between two reads
    (None: no limit). A whole answer gets a total, a stream a gap."""

    total: float | None = None
    gap: float | None = None


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
        self, url: str, body: bytes, *, deadline: Deadline, headers: dict[str, str] | None = None
    ) -> UpstreamResponse:
        """Send ``body`` and wait for the answer's status and headers. Raises :class:`UpstreamError`."""
        ...

    async def aclose(self) -> None: ...


@contextmanager
def _translated() -> Iterator[None]:
    """aiohttp's and the OS's failures as :class:`UpstreamError` (the one boundary where they are translated)."""
    try:
        yield
    except UpstreamError:
        raise
    except Exception as exc:
        raise _translate(exc) from exc


def _translate(exc: Exception) -> UpstreamError:
    import aiohttp

    if isinstance(exc, aiohttp.ClientConnectorError):
        reason = exc.os_error.strerror or "no answer"
        return UpstreamConnectError(f"Nothing accepted the connection to the engine ({reason.lower()}).")
    if isinstance(exc, aiohttp.ServerTimeoutError):  # a socket read waited longer than the gap
        return UpstreamTimeout("The engine sent nothing for too long.", silence=True)
    if isinstance(exc, asyncio.TimeoutError):  # aiohttp's total deadline
        return UpstreamTimeout("The engine took too long.")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return UpstreamBroken("the engine closed the connection before its answer was complete")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return UpstreamBroken("the engine closed the connection without answering")
    if isinstance(exc, aiohttp.ClientResponseError | aiohttp.http_exceptions.HttpProcessingError):
        return UpstreamBroken("the engine's answer was not well-formed HTTP")
    if isinstance(exc, ConnectionResetError):
        return UpstreamBroken("the engine reset the connection")
    if isinstance(exc, aiohttp.ClientError | OSError):
        return UpstreamBroken("the connection to the engine broke")
    raise exc  # anything else is a bug, not the engine's doing: let it surface as one


class _Response:
    """One answer from the engine; releases its connection however it ends (a connection with unread bytes is
    closed, never handed back to the pool)."""

    def __init__(self, response: aiohttp.ClientResponse, open_: set[_Response]) -> None:
        self._response = response
        self._open = open_
        open_.add(self)
        self.status = response.status
        self.content_type = response.headers.get("content-type", "application/json")

    def abort(self, exc: Exception) -> None:
        """Fail whoever reads this answer now (aiohttp's own close drops the reader's wake-up on the floor)."""
        self._response.content.set_exception(exc)

    async def read(self) -> bytes:
        parts: list[bytes] = []
        size = 0
        try:
            with _translated():
                async for data in self._response.content.iter_any():
                    size += len(data)
                    if size > MAX_ANSWER:
                        raise UpstreamBroken(f"The engine's answer is larger than {MAX_ANSWER >> 20} MiB.")
                    parts.append(data)
        finally:
            await self.close()
        return b"".join(parts)

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            with _translated():
                async for data in self._response.content.iter_any():
                    yield data
        finally:
            await self.close()

    async def close(self) -> None:
        self._open.discard(self)
        response = self._response
        if response.content.is_eof():
            response.release()  # read to the end: the connection may serve the next request
        else:
            response.close()  # the client left, or the engine misbehaved: the connection goes


class AiohttpUpstream:
    """The gateway's pool of keep-alive connections to the engine (one aiohttp session, made in the running loop).

    ``keepalive`` is how long an idle connection is kept: shorter than the engine's own keep-alive (the bundled
    engine keeps 120 s, mistral.rs's hyper longer), so that the gateway never sends a request on a connection the
    engine is closing at that moment.
    """

    def __init__(self, *, connect_timeout: float = 10.0, keepalive: float = 30.0) -> None:
        self._connect_timeout = connect_timeout
        self._keepalive = keepalive
        self._session: aiohttp.ClientSession | None = None
        self._open: set[_Response] = set()  # answers being read, to end them all at aclose()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            import aiohttp

            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=self._keepalive, use_dns_cache=False)
            # No default headers beyond HTTP's own, no cookies, no decompression the engine never asks for.
            self._session = aiohttp.ClientSession(
                connector=connector, cookie_jar=aiohttp.DummyCookieJar(), skip_auto_headers=("User-Agent",)
            )
        return self._session

    def _timeout(self, deadline: Deadline) -> aiohttp.ClientTimeout:
        import aiohttp

        return aiohttp.ClientTimeout(total=deadline.total, sock_connect=self._connect_timeout, sock_read=deadline.gap)

    async def get(self, url: str, *, timeout: float) -> tuple[int, bytes]:
        with _translated():
            async with self._client().get(url, timeout=self._timeout(Deadline(total=timeout))) as response:
                return response.status, await response.read()

    async def post(
        self, url: str, body: bytes, *, deadline: Deadline, headers: dict[str, str] | None = None
    ) -> UpstreamResponse:
        sent = {"content-type": "application/json", **(headers or {})}
        with _translated():
            response = await self._client().post(url, data=body, headers=sent, timeout=self._timeout(deadline))
        return _Response(response, self._open)

    async def aclose(self) -> None:
        """Close every connection; answers being read fail at once (a graceful shutdown's deadline relies on it)."""
        if self._open:
            import aiohttp

            for response in list(self._open):
                response.abort(aiohttp.ClientConnectionError("The gateway closed the connection."))
        if self._session is not None:
            await self._session.close()
            self._session = None

"""The HTTP server's own defences: a deadline for each request head, and a cap on open connections.

uvicorn closes keep-alive connections that stay idle, but gives a client all the time it likes to send a request
line and headers: a client that trickles them in (slowloris), or connects and sends nothing, holds a socket and a
file descriptor for ever, and a few thousand such clients make the gateway refuse everyone. Both defences sit in
front of uvicorn's HTTP protocol, the one place that sees connections before any request exists: a
:class:`ConnectionGuard` wraps the protocol object uvicorn would use (composition, no subclass) and follows the
request heads with a parser of its own (httptools, the one uvicorn uses; a few microseconds per request).

uvicorn's own ``limit_concurrency`` is not used: it answers a plain-text 503 that no OpenAI SDK can read, decides
only once a request's headers have arrived (so a slow client still holds its socket), and counts running tasks too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, cast

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..errors import TooManyConnections
from .observer import NODE_HEADER

if TYPE_CHECKING:
    from starlette.types import ASGIApp

    from ..settings import Settings

REFUSAL_RETRY_AFTER = 1  # seconds: connections come and go quickly
WARN_EVERY = 60.0  # seconds between two log lines about refused connections

_log = logging.getLogger("gateway.server")


@dataclass
class Limits:
    """What every connection of one server is held to, and what it has refused since the last warning."""

    header_timeout: float
    max_connections: int  # 0 = no cap
    refusal: bytes
    refused: int = 0
    warned_at: float = float("-inf")


class ConnectionGuard(asyncio.Protocol):
    """One connection: uvicorn's HTTP protocol behind a deadline for each request head and a cap on connections.

    The head deadline runs from the connection's start for its first request, and from a request's first byte for
    the next ones on a keep-alive connection: the wait between two requests stays uvicorn's keep-alive timeout. A
    body is not timed (a large upload on a slow link is legitimate): its size is capped (GATEWAY_MAX_BODY_MB), and
    its connection counts against the cap like any other. A head that waits because uvicorn stopped reading (it
    does while it answers an earlier request of a pipeline) is not the client's delay: its time starts over.
    """

    limits: ClassVar[Limits]

    def __init__(self, **kwargs: Any) -> None:
        self._inner = HttpToolsProtocol(**kwargs)
        self._connections: set[Any] = kwargs["server_state"].connections  # every connection of this server
        self._loop = kwargs.get("_loop") or asyncio.get_event_loop()
        self._heads: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        self._refused = False

    # ------------------------------------------------------------------ asyncio.Protocol, passed on to uvicorn's

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio's classes
        self._transport = transport
        cap = self.limits.max_connections
        if cap and len(self._connections) >= cap:
            self._refuse(transport)
            return
        self._inner.connection_made(transport)  # counts it in the server's connections
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if not self._refused:
            self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            # Read and dropped: closing with unread bytes would make the kernel reset the connection, and the
            # client could lose the refusal before reading it.
            return
        if self._heads is not None:
            try:
                self._heads.feed_data(data)
            except httptools.HttpParserUpgrade:
                self._heads = None  # not HTTP/1.1 requests any more: uvicorn's to handle
            except httptools.HttpParserError:
                self._heads = None  # uvicorn answers it 400 and closes
                self._disarm()
        self._inner.data_received(data)

    def eof_received(self) -> None:
        self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    # -------------------------------------------------------------------------- httptools, on our own parser

    def on_message_begin(self) -> None:
        self._arm()  # no-op for the first request: its deadline runs from the connection's start

    def on_headers_complete(self) -> None:
        self._disarm()

    # --------------------------------------------------------------------------------------------- internals

    def _arm(self) -> None:
        if self._timer is None:
            self._timer = self._loop.call_later(self.limits.header_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_timed_out(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if not transport.is_reading():
            # uvicorn paused reading while it answers earlier requests: the rest of this head may be waiting in
            # the socket. Its time starts over once reading resumes.
            self._arm()
            return
        # Nothing is answered: the client sent no complete request, and most such clients are not listening.
        _log.debug(
            "closing a connection from %s: no complete request head within %g s",
            transport.get_extra_info("peername"),
            self.limits.header_timeout,
        )
        transport.close()

    def _refuse(self, transport: asyncio.Transport) -> None:
        """Answer at once, before any request, then half-close; the head timer closes it if the client lingers."""
        self._refused = True
        transport.write(self.limits.refusal)
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()
        self._arm()
        self._warn()

    def _warn(self) -> None:
        # One line a minute at most: a client hammering a full gateway must not flood its log as well.
        limits = self.limits
        limits.refused += 1
        now = time.monotonic()
        if now - limits.warned_at >= WARN_EVERY:
            _log.warning(
                "refused %d connection(s): %d connections are open (GATEWAY_MAX_CONNECTIONS)",
                limits.refused,
                limits.max_connections,
            )
            limits.refused, limits.warned_at = 0, now


def refusal(max_connections: int, node: str | None = None) -> bytes:
    """The whole HTTP answer to a connection beyond the cap: a 503 in OpenAI's error shape, naming the node."""
    error = TooManyConnections(
        f"The gateway has {max_connections} open connections, as many as it accepts (GATEWAY_MAX_CONNECTIONS); "
        "retry shortly.",
        retry_after=REFUSAL_RETRY_AFTER,
    )
    body = error.body_bytes()
    head = [
        "HTTP/1.1 503 Service Unavailable",
        "content-type: application/json",
        f"content-length: {len(body)}",
        *(f"{name.lower()}: {value}" for name, value in error.headers.items()),
        *([f"{NODE_HEADER}: {node}"] if node else []),
        "connection: close",
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def http_protocol(*, header_timeout: float, max_connections: int, node: str | None = None) -> type[ConnectionGuard]:
    """The protocol class for ``uvicorn.Config(http=...)``, bound to one server's limits (and its node's name)."""

    class Guarded(ConnectionGuard):
        limits = Limits(header_timeout, max_connections, refusal(max_connections, node))

    return Guarded


def uvicorn_config(app: ASGIApp, settings: Settings, **options: Any) -> uvicorn.Config:
    """How uvicorn serves the gateway, for `mistral-gateway` and for the tests' in-process gateways alike; ``options``
    add where and how it logs (host and port, uvicorn's log configuration)."""
    return uvicorn.Config(
        app,
        lifespan="on",
        access_log=False,  # gateway.access logs one richer line per request
        # Longer than any proxy's upstream keep-alive (nginx: 60 s), so the gateway never closes an idle
        # connection at the moment a proxy or client reuses it (which fails that request).
        timeout_keep_alive=75,
        # A deadline for request heads and a cap on connections, on uvicorn's httptools protocol.
        http=http_protocol(
            header_timeout=settings.header_timeout,
            max_connections=settings.max_connections,
            node=settings.node_name,
        ),
        # The app reads forwarded headers itself, from GATEWAY_FORWARDED_ALLOW_IPS only (http/proxies.py).
        proxy_headers=False,
        **options,
    )


__all__ = ["ConnectionGuard", "Limits", "http_protocol", "refusal", "uvicorn_config"]

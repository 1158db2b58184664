"""The HTTP server's own defences: a deadline for each request head, and a cap on open connections.

uvicorn closes keep-alive connections that stay idle, but gives a client all the time it likes to send a request
line and headers: a client that trickles them in (slowloris), or connects and sends nothing, holds a socket and a
file descriptor for ever, and a few thousand such clients make the gateway refuse everyone. Both defences live in
uvicorn's HTTP protocol, the one place that sees connections before any request exists.

uvicorn's own ``limit_concurrency`` is not used: it answers a plain-text 503 that no OpenAI SDK can read, decides
only once a request's headers have arrived (so a slow client still holds its socket), and counts running tasks too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..errors import TooManyConnections

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


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a deadline for each request head and a cap on open connections.

    The head deadline runs from the connection's start for its first request, and from a request's first byte for
    the next ones on a keep-alive connection: the wait between two requests stays uvicorn's keep-alive timeout. A
    body is not timed (a large upload on a slow link is legitimate): its size is capped (GATEWAY_MAX_BODY_MB), and
    its connection counts against the cap like any other.
    """

    limits: ClassVar[Limits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # counts it in self.connections, which all connections share
        self._arm_head_timer()
        cap = self.limits.max_connections
        if cap and len(self.connections) > cap:
            self._refuse()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            # Read and dropped: closing with unread bytes would make the kernel reset the connection, and the
            # client could lose the refusal before reading it.
            return
        super().data_received(data)

    def on_message_begin(self) -> None:
        self._arm_head_timer()  # no-op for the first request: its deadline runs from the connection's start
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._disarm_head_timer()
        super().on_headers_complete()

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.pipeline or (self.cycle is not None and not self.cycle.response_complete):
            # A pipelined head waits while earlier requests are answered (uvicorn may not even read it meanwhile):
            # its time starts over once they are done, rather than cutting their answers short.
            self._arm_head_timer()
            return
        if not self.transport.is_closing():
            # Nothing is answered: the client sent no complete request, and most such clients are not listening.
            _log.debug(
                "closing a connection from %s: no complete request head within %g s",
                self.client,
                self.limits.header_timeout,
            )
            self.transport.close()

    def _refuse(self) -> None:
        """Answer at once, before any request, then half-close; the head timer closes it if the client lingers."""
        self._refused = True
        self.transport.write(self.limits.refusal)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        else:
            self.transport.close()
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


def refusal(max_connections: int) -> bytes:
    """The whole HTTP answer to a connection beyond the cap: a 503 in OpenAI's error shape."""
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
        "connection: close",
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def http_protocol(*, header_timeout: float, max_connections: int) -> type[GuardedHttpProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)``, bound to one server's limits."""

    class Guarded(GuardedHttpProtocol):
        limits = Limits(header_timeout, max_connections, refusal(max_connections))

    return Guarded


__all__ = ["GuardedHttpProtocol", "Limits", "http_protocol", "refusal"]

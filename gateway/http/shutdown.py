"""Graceful shutdown: what the requests in flight get when the gateway is told to stop.

With GATEWAY_SHUTDOWN_NOTICE, the gateway first gives notice: for that long it still listens and serves everything,
while ``/health`` and ``/readyz`` answer 503, so that a router or load balancer polling them stops sending new
requests here before the listener closes (a closed port is a failed request for whoever had not looked yet; a
request refused with a 503 is one that a router may send back to this same node). A second Ctrl+C ends the notice.

Then, on SIGTERM (or Ctrl+C) uvicorn stops accepting connections and waits for the open ones to finish; on its own it
lets requests that wait for a cold engine wait on, and cuts whatever is still running at its deadline (a plain-text
500, or a stream that just stops). :class:`GracefulServer` tells the gateway first (``begin_shutdown``: requests
waiting for an engine are answered 503 at once and the loading engine is stopped), and at the drain deadline ends
the rest in their own shape (``end_drain``: a JSON 503, or a stream's final error event) before uvicorn's own
deadline, which is kept a little later as a backstop.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Protocol

import uvicorn

BACKSTOP = 5.0  # seconds uvicorn waits beyond the drain deadline before it cancels what is left

_log = logging.getLogger("gateway")


class Drainable(Protocol):
    def announce_shutdown(self) -> None: ...

    def begin_shutdown(self) -> None: ...

    async def end_drain(self) -> None: ...


class GracefulServer(uvicorn.Server):
    """uvicorn's server, telling the gateway when a shutdown begins and when its drain deadline comes."""

    def __init__(
        self, config: uvicorn.Config, *, gateway: Drainable, drain_timeout: float, notice: float = 0.0
    ) -> None:
        config.timeout_graceful_shutdown = int(drain_timeout + BACKSTOP)
        super().__init__(config)
        self._gateway = gateway
        self._drain_timeout = drain_timeout
        self._notice = notice

    async def main_loop(self) -> None:
        await super().main_loop()  # returns once told to stop
        if self._notice <= 0 or self.force_exit:
            return
        self._gateway.announce_shutdown()
        _log.info("stopping in %g s (GATEWAY_SHUTDOWN_NOTICE): /health and /readyz answer 503 meanwhile", self._notice)
        loop = asyncio.get_running_loop()
        end = loop.time() + self._notice
        while not self.force_exit and (left := end - loop.time()) > 0:
            await asyncio.sleep(min(0.1, left))  # as uvicorn's own main loop looks at its flags

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._gateway.begin_shutdown()
        deadline = asyncio.create_task(self._end_drain_later(), name="drain-deadline")
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()

    async def _end_drain_later(self) -> None:
        await asyncio.sleep(self._drain_timeout)
        await self._gateway.end_drain()

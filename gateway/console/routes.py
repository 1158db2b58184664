"""The browser console's routes: the page itself (``/ui``, files inside the package, nothing fetched from
elsewhere), the requests it lists and cancels (``/admin/requests``), and the engines' output (``/logs/stream``).

The page reads the rest from the routes every client has: ``/status``, ``/events``, ``/v1/models``, the admin
actions, and ``/v1/chat/completions`` for its playground. The data routes are guarded by the admin key
(gateway/auth.py); the page's own files are not (they hold no data), and are sent with a Content-Security-Policy
that lets them load nothing but themselves.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from ..errors import GatewayError, RouteNotFound
from ..events import SSE_HEADERS
from .engine_logs import LogHub, LogLine
from .tracker import Tracker

UI = Path(__file__).parent / "ui"
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
# Everything the page loads comes from the gateway itself: an offline machine shows it whole, and a page that tried
# to load anything else would be refused by the browser (and the test suite would see the refusal).
PAGE_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}
LOG_TICK = 15.0  # seconds between keep-alive comments on a quiet log stream (proxies cut silent connections)


class Console:
    def __init__(self, tracker: Tracker, logs: LogHub) -> None:
        self._tracker = tracker
        self._logs = logs

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/", self.home, methods=["GET", "HEAD"]),
            Route("/ui", self.page, methods=["GET", "HEAD"]),
            Route("/ui/{name}", self.asset, methods=["GET", "HEAD"]),
            Route("/admin/requests", self.requests, methods=["GET"]),
            Route("/admin/requests/{id}/cancel", self.cancel, methods=["POST"]),
            Route("/logs/stream", self.log_stream, methods=["GET"]),
        ]

    async def home(self, request: Request) -> Response:
        return RedirectResponse("/ui", status_code=307)

    async def page(self, request: Request) -> Response:
        return self._file("index.html")

    async def asset(self, request: Request) -> Response:
        return self._file(request.path_params["name"])

    def _file(self, name: str) -> Response:
        path = UI / name
        # Only the files of the ui folder, by their plain names: no path can reach outside it.
        if "/" in name or name.startswith(".") or path.suffix not in _TYPES or not path.is_file():
            raise RouteNotFound(f"The console has no file {name!r}.")
        return FileResponse(path, media_type=_TYPES[path.suffix], headers=PAGE_HEADERS)

    async def requests(self, request: Request) -> Response:
        return JSONResponse(self._tracker.snapshot())

    async def cancel(self, request: Request) -> Response:
        request_id = request.path_params["id"]
        outcome = self._tracker.cancel(request_id)
        if outcome == "not_found":
            raise RouteNotFound(
                f"No request {request_id!r} is in flight (it may have ended).", code="request_not_found"
            )
        if outcome == "not_cancellable":
            raise GatewayError(
                f"The request {request_id!r} cannot be cancelled now: it is not waiting on an engine.",
                status=409,
                code="request_not_cancellable",
            )
        return JSONResponse({"id": request_id, "cancelled": True})

    async def log_stream(self, request: Request) -> Response:
        """Engine output as Server-Sent Events: each engine's recent lines, then live ones (``?engine=`` for one)."""
        engine = request.query_params.get("engine") or None

        async def stream() -> AsyncIterator[bytes]:
            async with contextlib.aclosing(self._logs.follow(engine, tick=LOG_TICK)) as lines:
                async for item in lines:
                    if item is None:
                        yield b": keep-alive\n\n"
                    elif isinstance(item, LogLine):
                        data = {"engine": item.engine, "time": item.time, "line": item.line}
                        yield b"event: log\ndata: " + json.dumps(data).encode() + b"\n\n"
                    else:
                        yield b"event: dropped\ndata: " + json.dumps({"dropped": item}).encode() + b"\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)

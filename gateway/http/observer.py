"""Per-request observability in one ASGI wrapper: the request id, the node's name, one log line, Prometheus metrics.

The node's name (GATEWAY_NODE_NAME) goes on every answer the app sends as ``x-gateway-node``, so that behind a router
each answer says which of several gateways served it (gateway/http/server.py puts it on its refusals too).

One middleware, not three, because every layer costs CPU on every request and every stream chunk; this
one looks at each outgoing message once (status, headers, first data byte, size) and nothing else.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..console.tracker import Tracker
from ..metrics import Metrics

NODE_HEADER = "x-gateway-node"
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_access = logging.getLogger("gateway.access")
# Asked every second or few by routers, peers, kubelets and Prometheus: their successful answers are logged at DEBUG,
# or they would drown the requests (a failing probe is still logged at INFO).
_POLLED = frozenset({"/health", "/healthz", "/readyz", "/get_load", "/metrics"})


class RequestObserver:
    """Pure ASGI middleware: X-Request-ID in and out, X-Gateway-Node out, an access log line, request metrics."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: Metrics,
        log_format: str = "text",
        clock: Callable[[], float] = time.perf_counter,
        tracker: Tracker | None = None,
        node: str | None = None,
    ) -> None:
        self.app = app
        self._node = [(NODE_HEADER.encode(), node.encode())] if node else []
        self._metrics = metrics
        self._tracker = tracker
        self._json = log_format == "json"
        self._clock = clock
        # Request ids must be unique, not secret: 128 bits from a seeded generator cost a tenth of uuid4().
        self._ids = random.Random()
        # Labelled children resolved once per label set: labels() takes a lock and builds a key every time.
        self._counted: dict[tuple[str, str, int], Any] = {}
        self._timed: dict[str, tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = self._clock()
        request_id = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                request_id = candidate if _VALID_ID.match(candidate) else ""
                break
        request_id = request_id or f"{self._ids.getrandbits(128):032x}"
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        tracker = self._tracker
        record = (
            tracker.begin(request_id, scope["method"], scope["path"])
            if tracker is not None and tracker.tracks(scope["method"], scope["path"])
            else None
        )
        if record is not None:
            state["record"] = record
        header = (b"x-request-id", request_id.encode())
        status = 500
        sent = 0
        cache = ""
        first_data: float | None = None
        streaming = False

        async def observe(message: Message) -> None:
            nonlocal status, sent, cache, first_data, streaming
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                for name, value in headers:
                    if name == b"x-cache":
                        cache = value.decode()
                    elif name == b"content-type" and value.startswith(b"text/event-stream"):
                        streaming = True
                headers.append(header)
                headers += self._node
                message["headers"] = headers
            elif message["type"] == "http.response.body":
                body = message.get("body", b"")
                sent += len(body)
                if streaming and first_data is None and b"data:" in body:
                    first_data = self._clock()
            await send(message)

        self._metrics.in_flight.inc()
        try:
            await self.app(scope, receive, observe)
        finally:
            self._metrics.in_flight.dec()
            elapsed = self._clock() - began
            route = _route_of(scope)
            model = scope["state"].get("model", "")
            if record is not None and tracker is not None:
                tracker.finish(record, status=status, model=model or None, cache=cache or None)
                if record.ttft_ms is not None:  # the engine's first token, not the stream's first event
                    first_data = began + record.ttft_ms / 1000
            key = (route, model, status)  # bounded: routes and models come from the gateway's own tables
            counter = self._counted.get(key)
            if counter is None:
                counter = self._counted[key] = self._metrics.requests.labels(route, model, str(status))
            counter.inc()
            timed = self._timed.get(route)
            if timed is None:
                timed = self._timed[route] = (self._metrics.latency.labels(route), self._metrics.ttft.labels(route))
            timed[0].observe(elapsed)
            if first_data is not None:
                timed[1].observe(first_data - began)
            level = logging.DEBUG if status == 200 and route in _POLLED else logging.INFO
            self._log(level, scope, status, elapsed, sent, model, cache, request_id)

    def _log(
        self, level: int, scope: Scope, status: int, elapsed: float, sent: int, model: str, cache: str, request_id: str
    ) -> None:
        if not _access.isEnabledFor(level):
            return
        if self._json:
            _access.log(
                level,
                json.dumps(
                    {
                        "method": scope["method"],
                        "path": scope["path"],
                        "model": model or None,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 2),
                        "bytes": sent,
                        "cache": cache or None,
                        "request_id": request_id,
                    }
                ),
            )
        else:
            _access.log(
                level,
                "%s %s model=%s status=%d duration_ms=%.1f bytes=%d cache=%s request_id=%s",
                loggable(scope["method"]),
                loggable(scope["path"]),
                loggable(model or "-"),
                status,
                elapsed * 1000,
                sent,
                cache or "-",
                request_id,
            )


def loggable(text: str) -> str:
    """``text`` safe for one field of a text log line: control characters, other unprintable ones and spaces
    percent-encoded (as UTF-8), so that a client cannot end the line and forge the next one (a ``%0a`` in a path
    arrives here as a newline), move a terminal's cursor, or add fields. JSON lines need none of this."""
    if text.isprintable() and " " not in text:  # the usual case, checked in C
        return text
    return "".join(c if c.isprintable() and c != " " else _percent(c) for c in text)


def _percent(char: str) -> str:
    return "".join(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))


def _route_of(scope: Scope) -> str:
    """A bounded label: the matched route's path template, never the raw path (unbounded cardinality)."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path else "unmatched"

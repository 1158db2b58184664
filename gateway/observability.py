"""Per-request observability in one ASGI wrapper: the request id, one log line, Prometheus metrics.

One middleware, not three, because every layer costs CPU on every request and every stream chunk; this
one looks at each outgoing message once (status, headers, first data byte, size) and nothing else.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .tracking import Tracker

_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_ENGINE_STATES = ("stopped", "starting", "ready", "stopping", "failed")
_access = logging.getLogger("gateway.access")


class Metrics:
    """The gateway's metrics, in a registry of their own (never the process-global one)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "gateway_requests",
            "Requests by route, model and status.",
            ["route", "model", "status"],
            registry=self.registry,
        )
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
        self.latency = Histogram(
            "gateway_request_duration_seconds",
            "Time to the last byte of the answer.",
            ["route"],
            registry=self.registry,
            buckets=buckets,
        )
        self.ttft = Histogram(
            "gateway_time_to_first_token_seconds",
            "Time to the engine's first token of a stream.",
            ["route"],
            registry=self.registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        self.in_flight = Gauge("gateway_requests_in_flight", "Requests being answered.", registry=self.registry)
        self.tokens = Counter(
            "gateway_tokens",
            "Tokens by model: prompt (read) and completion (generated), as the engine counted them.",
            ["model", "kind"],
            registry=self.registry,
        )

    def count_tokens(self, model: str, prompt: int, completion: int) -> None:
        """The tracker's token sink (gateway/tracking.py)."""
        self.tokens.labels(model, "prompt").inc(prompt)
        self.tokens.labels(model, "completion").inc(completion)

    def watch(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Add metrics read from the gateway's parts at scrape time (engine, cache, downloads)."""

        class _Reader(Collector):
            def collect(self) -> Iterable[Metric]:
                return collect()

        self.registry.register(_Reader())


def engine_metrics(status: dict[str, Any]) -> list[Metric]:
    """The engines, from the pool's status: totals by state, and each model's engine (labelled by model)."""
    engines = status["engines"]
    state = GaugeMetricFamily("gateway_engine_state", "Engines in each state.", labels=["state"])
    for name in _ENGINE_STATES:
        state.add_metric([name], float(sum(1 for e in engines if e["state"] == name)))
    starts = CounterMetricFamily("gateway_engine_starts", "Engine processes started.")
    starts.add_metric([], sum(e["starts"] for e in engines))
    crashes = CounterMetricFamily("gateway_engine_crashes", "Engine processes that died unexpectedly.")
    crashes.add_metric([], sum(e["crashes"] for e in engines))
    cold = GaugeMetricFamily("gateway_engine_cold_start_seconds", "Seconds the last engine start took.")
    cold.add_metric([], max((e["last_start_seconds"] or 0.0 for e in engines), default=0.0))
    model_state = GaugeMetricFamily(
        "gateway_model_state", "1 for the state of each model's engine.", labels=["model", "state"]
    )
    model_starts = CounterMetricFamily("gateway_model_starts", "Starts of each model's engine.", labels=["model"])
    model_crashes = CounterMetricFamily("gateway_model_crashes", "Crashes of each model's engine.", labels=["model"])
    evictions = CounterMetricFamily(
        "gateway_model_evictions", "Stops of each model's engine to make room for another.", labels=["model"]
    )
    memory = GaugeMetricFamily(
        "gateway_model_memory_bytes",
        "Memory of each model's engine (a shared engine's for each of its models).",
        labels=["model", "engine"],
    )
    for engine in engines:
        for model in engine["models"]:
            for name in _ENGINE_STATES:
                model_state.add_metric([model, name], 1.0 if engine["state"] == name else 0.0)
            model_starts.add_metric([model], engine["starts"])
            model_crashes.add_metric([model], engine["crashes"])
            evictions.add_metric([model], engine["evictions"])
            if engine["memory_mb"] is not None:
                memory.add_metric([model, engine["name"]], engine["memory_mb"] * 1024 * 1024)
    budget = GaugeMetricFamily(
        "gateway_memory_budget_bytes", "GATEWAY_MEMORY_BUDGET_MB, and the part in use.", labels=["kind"]
    )
    if status["budget"]["budget_mb"]:
        budget.add_metric(["budget"], status["budget"]["budget_mb"] * 1024 * 1024)
    budget.add_metric(["used"], status["budget"]["used_mb"] * 1024 * 1024)
    return [state, starts, crashes, cold, model_state, model_starts, model_crashes, evictions, memory, budget]


def cache_metrics(cache: dict[str, Any]) -> list[Metric]:
    hits = CounterMetricFamily("gateway_embedding_cache_hits", "Embedding items answered from the cache.")
    hits.add_metric([], cache["hits"])
    misses = CounterMetricFamily("gateway_embedding_cache_misses", "Embedding items computed by the engine.")
    misses.add_metric([], cache["misses"])
    size = GaugeMetricFamily("gateway_embedding_cache_bytes", "Bytes held by the in-process embedding cache.")
    size.add_metric([], cache["bytes"])
    errors = CounterMetricFamily("gateway_embedding_cache_redis_errors", "Failed Redis cache operations.")
    errors.add_metric([], (cache["redis"] or {}).get("errors", 0))
    rejected = CounterMetricFamily(
        "gateway_embedding_cache_rejected",
        "Cached embeddings refused when read back (not this gateway's format, damaged, wrong dimension), "
        "computed again and replaced.",
    )
    rejected.add_metric([], cache["rejected"])
    return [hits, misses, size, errors, rejected]


def download_metrics(downloads: dict[str, dict[str, Any]]) -> list[Metric]:
    """Bytes fetched by this gateway, per file (files found already present count nothing)."""
    fetched = CounterMetricFamily("gateway_download_bytes", "Model file bytes downloaded.", labels=["file"])
    for file, state in downloads.items():
        if state.get("state") != "present":
            fetched.add_metric([file], float(state.get("bytes") or 0))
    return [fetched]


class RequestObserver:
    """Pure ASGI middleware: X-Request-ID in and out, an access log line, request metrics."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: Metrics,
        log_format: str = "text",
        clock: Callable[[], float] = time.perf_counter,
        tracker: Tracker | None = None,
    ) -> None:
        self.app = app
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
            self._log(scope, status, elapsed, sent, model, cache, request_id)

    def _log(
        self, scope: Scope, status: int, elapsed: float, sent: int, model: str, cache: str, request_id: str
    ) -> None:
        if not _access.isEnabledFor(logging.INFO):
            return
        if self._json:
            _access.info(
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
                )
            )
        else:
            _access.info(
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

"""The gateway's Prometheus metrics: a registry of its own, the request metrics the HTTP observer counts, and what
the engine pool, the embedding cache and the downloads report at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_ENGINE_STATES = ("stopped", "starting", "ready", "stopping", "failed")


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

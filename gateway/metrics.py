"""The gateway's Prometheus metrics: a registry of its own, the request metrics the HTTP observer counts, and what
the engine pool, the embedding cache and the downloads report at scrape time.

Besides its own ``gateway_*`` metrics, the gateway speaks the model-server metrics protocol that the Kubernetes
Gateway API Inference Extension's endpoint picker (and llm-d's, and vLLM's production stack) scrape from every
server, under vLLM's names so that their default mapping reads them unconfigured (:func:`model_server_metrics`):

- ``vllm:num_requests_waiting{model_name}``: requests waiting for their model's engine (to start, for room,
  behind a swap); ``vllm:num_requests_running{model_name}``: the others being answered. Both come from the leases
  of the engine pool (gateway/engine/lifecycle.py), the same counts as /get_load's, one series per model.
- ``vllm:kv_cache_usage_perc{model_name}`` and its older name ``vllm:gpu_cache_usage_perc`` (production-stack,
  GAIE <= 1.0): 0 to 1, only for the models whose engine reports its KV cache (gateway/engine/telemetry.py); for the
  others the series is absent, not 0.
- ``vllm:lora_requests_info{running_lora_adapters, waiting_lora_adapters, max_lora}``: which models are warm here.
  The picker already scores it (its LoRA-affinity scorer prefers the servers where the requested "adapter" runs,
  then those with room for one more), so warm models as its "running adapters" steer requests away from cold
  starts with no plugin or configuration: running = models whose engine is ready, waiting = models with requests
  waiting for their engine, max_lora = how many models can be warm here at once. Its value is the time of the
  reading, as vLLM writes it (the picker keeps the newest series).
- ``gateway_requests_waiting``, ``gateway_requests_running`` (every model's, summed) and
  ``gateway_kv_cache_usage_ratio`` (the highest among the engines that report one): the node as one server, for
  a picker in front of a pool of gateways that all serve the same models. Its metric specs name one series per
  server, and a node has one per model; deploy/kubernetes/inference-extension maps its queue, running and KV specs
  to these, and its LoRA spec to the warm models above.

An endpoint picker scrapes every server 20 times a second, so /metrics must stay cheap: :meth:`Metrics.render`
writes the model-server gauges at every scrape (a few lines a model), and the ``gateway_*`` families (histograms
by route: hundreds of lines, the bulk of the cost) at most once per ``SETTLE`` seconds, reusing their text in
between. Scraped once a second or less, as Prometheus does, every scrape is current; scraped faster, the
``gateway_*`` families may be up to ``SETTLE`` old, while what a picker reads never is.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .engine.pool import ModelLoad

_ENGINE_STATES = ("stopped", "starting", "ready", "stopping", "failed")
SETTLE = 1.0  # seconds the text of the gateway_* families is reused for, by scrapes that come faster


class Metrics:
    """The gateway's metrics, in registries of their own (never the process-global one): ``registry`` for the
    gateway's own, ``protocol`` for the model-server protocol's (see the module docstring)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, settle: float = SETTLE) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.protocol = CollectorRegistry(auto_describe=True)
        self._clock = clock
        self._settle = settle
        self._rendered: tuple[float, bytes] | None = None  # when, and the text of the gateway_* families
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
        self._token_children: dict[str, tuple[Any, Any]] = {}

    def count_tokens(self, model: str, prompt: int, completion: int) -> None:
        """The tracker's token sink (gateway/tracking.py)."""
        children = self._token_children.get(model)
        if children is None:  # resolved once per model: labels() takes a lock and builds a key every time
            children = self._token_children[model] = (
                self.tokens.labels(model, "prompt"),
                self.tokens.labels(model, "completion"),
            )
        children[0].inc(prompt)
        children[1].inc(completion)

    def watch(self, collect: Callable[[], Iterable[Metric]], *, protocol: bool = False) -> None:
        """Add metrics read from the gateway's parts at scrape time (engine, cache, downloads); ``protocol``: the
        model-server protocol's, written at every scrape."""

        class _Reader(Collector):
            def collect(self) -> Iterable[Metric]:
                return collect()

        (self.protocol if protocol else self.registry).register(_Reader())

    def render(self) -> bytes:
        """The Prometheus text of every metric: the gateway's own as of at most ``settle`` ago, the model-server
        protocol's as of now."""
        now = self._clock()
        if self._rendered is None or now - self._rendered[0] >= self._settle:
            self._rendered = now, generate_latest(self.registry)
        return self._rendered[1] + generate_latest(self.protocol)


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


def peer_metrics(sent_elsewhere: Mapping[str, int] | None) -> list[Metric]:
    """Requests answered "warm elsewhere" (gateway/fleet/peers.py), per model; nothing when no peer is configured."""
    if sent_elsewhere is None:
        return []
    sent = CounterMetricFamily(
        "gateway_requests_sent_elsewhere",
        "Requests for a model stopped here answered 503 model_warm_elsewhere, for a router to send to the peer that "
        "has it warm.",
        labels=["model"],
    )
    for model, count in sent_elsewhere.items():
        sent.add_metric([model], count)
    return [sent]


def model_server_metrics(
    loads: Sequence[ModelLoad], kv_usage: Mapping[str, float], capacity: int, now: float
) -> list[Metric]:
    """The model-server protocol's gauges (see the module docstring), from the pool's loads, the KV-cache use of
    the engines that report it (by engine) and how many models can be warm at once; ``now``: the wall clock."""
    waiting = GaugeMetricFamily(
        "vllm:num_requests_waiting", "Requests waiting for their model's engine.", labels=["model_name"]
    )
    running = GaugeMetricFamily("vllm:num_requests_running", "Requests being answered.", labels=["model_name"])
    kv = GaugeMetricFamily(
        "vllm:kv_cache_usage_perc",
        "KV-cache use of the model's engine, 0 to 1, as it reports it.",
        labels=["model_name"],
    )
    gpu = GaugeMetricFamily(
        "vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc under its older name.", labels=["model_name"]
    )
    for load in loads:
        waiting.add_metric([load.model], load.waiting)
        running.add_metric([load.model], load.running)
        usage = kv_usage.get(load.engine)
        if usage is not None:
            kv.add_metric([load.model], usage)
            gpu.add_metric([load.model], usage)
    warm = ",".join(load.model for load in loads if load.warm)
    queued = ",".join(load.model for load in loads if load.waiting and not load.warm)
    lora = GaugeMetricFamily(
        "vllm:lora_requests_info",
        "The models warm here (running), waited for (waiting), and how many can be warm at once (max_lora).",
        labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
    )
    lora.add_metric([str(capacity), warm, queued], now)
    node_waiting = GaugeMetricFamily("gateway_requests_waiting", "Requests waiting for their engine, every model's.")
    node_waiting.add_metric([], sum(load.waiting for load in loads))
    node_running = GaugeMetricFamily("gateway_requests_running", "Requests being answered, every model's.")
    node_running.add_metric([], sum(load.running for load in loads))
    node_kv = GaugeMetricFamily(
        "gateway_kv_cache_usage_ratio", "The highest KV-cache use, 0 to 1, among the engines that report one."
    )
    if kv_usage:
        node_kv.add_metric([], max(kv_usage.values()))
    # No engine reports its KV cache: no family, not an empty one (nor a 0).
    reported = [kv, gpu, node_kv] if kv.samples else []
    return [waiting, running, *reported, lora, node_waiting, node_running]

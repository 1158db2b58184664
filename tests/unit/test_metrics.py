"""The model-server protocol's gauges (gateway/metrics.py), as an endpoint picker parses them: the Prometheus text,
read back with prometheus_client's own parser."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from gateway.engine.pool import ModelLoad
from gateway.engine.state import EngineState
from gateway.metrics import Metrics, model_server_metrics

LOADS = [
    ModelLoad("alpha", "alpha", EngineState.READY, running=3, waiting=0),
    ModelLoad("beta", "pair", EngineState.STARTING, running=0, waiting=2),
    ModelLoad("gamma", "pair", EngineState.STARTING, running=0, waiting=0),
    ModelLoad("org/delta", "org/delta", EngineState.STOPPED, running=0, waiting=0),
]


def scraped(kv: dict[str, float]) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    class Reader(Collector):
        def collect(self) -> Iterable[Metric]:
            return model_server_metrics(LOADS, kv, capacity=3, now=1.7e9)

    registry = CollectorRegistry()
    registry.register(Reader())
    text = generate_latest(registry).decode()
    return {
        family.name: {tuple(sorted(sample.labels.items())): sample.value for sample in family.samples}
        for family in text_string_to_metric_families(text)
    }


def test_requests_by_model_and_the_kv_cache_only_where_an_engine_reports_it() -> None:
    families = scraped({"alpha": 0.25})
    by_model = {
        name: {dict(k)["model_name"]: v for k, v in families[name].items()} for name in families if "num" in name
    }
    assert by_model["vllm:num_requests_running"] == {"alpha": 3, "beta": 0, "gamma": 0, "org/delta": 0}
    assert by_model["vllm:num_requests_waiting"] == {"alpha": 0, "beta": 2, "gamma": 0, "org/delta": 0}
    for name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
        assert families[name] == {(("model_name", "alpha"),): 0.25}  # the others report nothing: absent, not 0
        assert name not in scraped({})  # no engine reports it: no family at all
    assert scraped({"alpha": 0.25, "pair": 0.5})["vllm:kv_cache_usage_perc"] == {
        (("model_name", "alpha"),): 0.25,
        (("model_name", "beta"),): 0.5,  # a shared engine's use, for each of its models
        (("model_name", "gamma"),): 0.5,
    }


def test_the_node_as_one_server_every_models_requests_and_its_busiest_kv_cache() -> None:
    families = scraped({"alpha": 0.25, "pair": 0.5})
    assert families["gateway_requests_running"] == {(): 3} and families["gateway_requests_waiting"] == {(): 2}
    assert families["gateway_kv_cache_usage_ratio"] == {(): 0.5}
    assert "gateway_kv_cache_usage_ratio" not in scraped({})


def test_warm_models_are_the_running_adapters_the_picker_scores() -> None:
    ((labels, value),) = scraped({})["vllm:lora_requests_info"].items()
    assert dict(labels) == {"max_lora": "3", "running_lora_adapters": "alpha", "waiting_lora_adapters": "beta"}
    assert value == 1.7e9  # the time of the reading, as vLLM writes it


def test_the_gateways_own_families_are_reused_within_a_second_the_protocols_never() -> None:
    clock = [100.0]
    metrics = Metrics(clock=lambda: clock[0], settle=1.0)
    waiting = [0]
    metrics.watch(
        lambda: model_server_metrics([ModelLoad("a", "a", EngineState.READY, 0, waiting[0])], {}, 1, 0.0), protocol=True
    )

    def read() -> tuple[float, float]:
        samples = {
            s.name: s.value for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples
        }
        return samples["gateway_requests_in_flight"], samples["vllm:num_requests_waiting"]

    assert read() == (0, 0)
    metrics.in_flight.inc()
    waiting[0] = 4
    clock[0] += 0.5
    assert read() == (0, 4)  # scraped again within the second: the picker's gauge is current, the rest reused
    clock[0] += 0.5
    assert read() == (1, 4)  # a second on: everything current

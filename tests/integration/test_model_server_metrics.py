"""The model-server metrics an endpoint picker scrapes from /metrics (gateway/metrics.py), parsed with
prometheus_client's parser as a scraper reads them, against the gateway's own counts (/get_load) and the engines' own
KV-cache reports, under a load held still: streams running on one model, requests waiting behind an exclusive swap for
another."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.fake_engine import KV_BLOCKS_PER_SEQUENCE, KV_BLOCKS_TOTAL
from tests.helpers import Gateway, held_streams, wait_for

Start = Callable[..., Gateway]

TOML = """
[engine]
paged_attn = true

[[models]]
id = "alpha"
kind = "plain"
repo = "org/alpha"
prefetch = false

[[models]]
id = "beta"
kind = "plain"
repo = "org/beta"
prefetch = false

[[models]]
id = "gamma"
kind = "plain"
repo = "org/gamma"
prefetch = false

[[groups]]
name = "pair"
models = ["alpha", "beta"]
exclusive = true
"""
GAUGES = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc")


def chat(text: str, model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "stream": True}


def scrape(gw: Gateway) -> dict[str, dict[str, Any]]:
    """Each family's samples, by model (or, for the LoRA gauge, its one sample's labels and value)."""
    families: dict[str, dict[str, Any]] = {}
    for family in text_string_to_metric_families(httpx.get(gw.url + "/metrics").text):
        if family.name == "vllm:lora_requests_info":
            ((labels, value),) = [(s.labels, s.value) for s in family.samples]
            families[family.name] = {**labels, "value": value}
        elif family.name.startswith("vllm:"):
            families[family.name] = {s.labels["model_name"]: s.value for s in family.samples}
        elif family.name in ("gateway_requests_waiting", "gateway_requests_running", "gateway_kv_cache_usage_ratio"):
            families[family.name] = {"node": family.samples[0].value}
    return families


def own_counts(gw: Gateway) -> dict[str, dict[str, float]]:
    models = httpx.get(gw.url + "/get_load").json()["models"]
    return {
        "vllm:num_requests_running": {model: load["running"] for model, load in models.items()},
        "vllm:num_requests_waiting": {model: load["waiting"] for model, load in models.items()},
    }


def test_every_gauge_agrees_with_the_gateways_counts_and_the_engines_reports_under_load(gateways: Start) -> None:
    gw = gateways(TOML)
    assert httpx.post(gw.v1 + "/chat/completions", json={**chat("warm", "gamma"), "stream": False}).status_code == 200
    with contextlib.ExitStack() as answered_later:
        with held_streams(gw.url, [chat("hang", "alpha")] * 3):
            wait_for(lambda: own_counts(gw)["vllm:num_requests_running"]["alpha"] == 3, 20, "alpha's streams to run")
            waiting = answered_later.enter_context(held_streams(gw.url, [chat("hi", "beta")] * 2))
            wait_for(lambda: own_counts(gw)["vllm:num_requests_waiting"]["beta"] == 2, 20, "beta's requests to wait")
            # The engines' KV-cache reports arrive in the background, at most a second after a scrape asks.
            used = 3 * KV_BLOCKS_PER_SEQUENCE / KV_BLOCKS_TOTAL
            wait_for(
                lambda: scrape(gw).get("vllm:kv_cache_usage_perc", {}).get("alpha") == used, 20, "alpha's KV report"
            )
            families = scrape(gw)
            counts = own_counts(gw)
            for name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
                assert families[name] == counts[name], name
            assert counts["vllm:num_requests_running"] == {"alpha": 3, "beta": 0, "gamma": 0}
            # Reported by the engines that run (gamma's holds nothing now); beta's engine is not running: absent.
            assert families["vllm:kv_cache_usage_perc"] == {"alpha": used, "gamma": 0.0}
            assert families["vllm:gpu_cache_usage_perc"] == families["vllm:kv_cache_usage_perc"]
            lora = families["vllm:lora_requests_info"]
            assert (lora["running_lora_adapters"], lora["waiting_lora_adapters"]) == ("alpha,gamma", "beta")
            assert lora["max_lora"] == "2"  # alpha or beta, and gamma
            # The node as one server: every model's requests, its busiest engine's KV cache.
            assert families["gateway_requests_running"] == {"node": 3}
            assert families["gateway_requests_waiting"] == {"node": 2}
            assert families["gateway_kv_cache_usage_ratio"] == {"node": used}
        # alpha's clients gone: beta is swapped in and its requests answered.
        wait_for(lambda: all(stream.complete for stream in waiting), 20, "beta's answers")
        assert all(stream.lines[-1] == "[DONE]" for stream in waiting)
    wait_for(lambda: httpx.get(gw.url + "/get_load").json()["load"] == 0, 20, "every request to be released")
    families = scrape(gw)
    assert (
        families["vllm:num_requests_running"]
        == families["vllm:num_requests_waiting"]
        == {
            "alpha": 0,
            "beta": 0,
            "gamma": 0,
        }
    )
    assert families["vllm:lora_requests_info"]["running_lora_adapters"] == "beta,gamma"


def test_without_a_kv_cache_report_there_is_no_kv_gauge_not_a_zero(gateways: Start) -> None:
    gw = gateways()  # engines without PagedAttention report no KV cache, as mistral.rs on a CPU
    with held_streams(gw.url, [chat("hang", "tiny-chat")]):
        wait_for(lambda: own_counts(gw)["vllm:num_requests_running"]["tiny-chat"] == 1, 20, "the stream to run")
        for _ in range(3):  # a reading is asked for, made, and still says nothing
            families = scrape(gw)
        assert families["vllm:num_requests_running"]["tiny-chat"] == 1
        assert not {"vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "gateway_kv_cache_usage_ratio"} & set(
            families
        )
        assert families["vllm:lora_requests_info"]["running_lora_adapters"] == "tiny-chat"

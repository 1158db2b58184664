"""The node protocol routers ask each gateway (gateway/http/node.py): /health, /get_load, /server_info, /model_info,
the /m/<model>/ prefix, the node's name on every answer, and the shutdown notice."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable

import httpx

from tests.helpers import Gateway, held_streams, wait_for

Start = Callable[..., Gateway]


def chat(text: str, model: str = "tiny-chat", **kw: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **kw}


def test_every_answer_names_the_node_and_the_health_routers_poll_never_starts_an_engine(gateways: Start) -> None:
    gw = gateways(env={"GATEWAY_NODE_NAME": "gw-a"})
    for response in (
        httpx.get(gw.url + "/health"),
        httpx.get(gw.url + "/m/tiny-gguf/health"),
        httpx.get(gw.url + "/nowhere"),
        httpx.post(gw.v1 + "/chat/completions", json=chat("hi"), timeout=30),
        httpx.get(gw.url + "/metrics"),
    ):
        assert response.status_code in (200, 404) and response.headers["x-gateway-node"] == "gw-a", response.url
    assert httpx.get(gw.url + "/health").json() == {"status": "ready"}
    assert len(gw.spawns()) == 1  # the chat's: asking about a model never starts its engine


def test_get_load_counts_each_models_requests_running_and_waiting_for_a_cold_engine(gateways: Start) -> None:
    gw = gateways(env={"GATEWAY_NODE_NAME": "gw-a"})
    with held_streams(gw.url, [chat("hang", stream=True)] * 3):
        wait_for(lambda: httpx.get(gw.url + "/get_load").json()["running"] == 3, 20, "3 streams running")
        load = httpx.get(gw.url + "/get_load").json()
        assert load["load"] == 3 and load["waiting"] == 0 and load["node"] == "gw-a"
        assert load["models"]["tiny-chat"] == {"engine": "tiny-chat", "state": "ready", "running": 3, "waiting": 0}
        assert load["models"]["tiny-gguf"]["running"] == 0
        scoped = httpx.get(gw.url + "/m/tiny-chat/get_load").json()
        assert scoped["load"] == 3 and list(scoped["models"]) == ["tiny-chat"]
        assert httpx.get(gw.url + "/m/tiny-gguf/get_load").json()["load"] == 0

    cold = gateways(env={"GATEWAY_STARTUP_TIMEOUT": "600"}, fake_env={"FAKE_ENGINE_NEVER_READY": "1"})
    with held_streams(cold.url, [chat("hi", "tiny-gguf", stream=True)] * 2):
        wait_for(lambda: httpx.get(cold.url + "/get_load").json()["waiting"] == 2, 20, "2 requests waiting")
        load = httpx.get(cold.url + "/get_load").json()["models"]["tiny-gguf"]
        assert load == {"engine": "tiny-gguf", "state": "starting", "running": 0, "waiting": 2}
        cold.stop()  # the waiting requests are answered at once (and the streams end)
    wait_for(lambda: httpx.get(gw.url + "/get_load").json()["load"] == 0, 20, "the streams to be released")


def test_server_and_model_info_in_sglangs_shapes_for_the_node_and_for_each_model(gateways: Start) -> None:
    gw = gateways(env={"GATEWAY_NODE_NAME": "gw-a"})
    node = httpx.get(gw.url + "/server_info").json()
    assert node["node"] == "gw-a" and node["dp_size"] == 1 and node["default_model"] == "tiny-chat"
    assert node["models"] == ["tiny-chat", "tiny-gguf", "tiny-embed", "tiny-flux", "tiny-speech"]
    assert "served_model_name" not in node  # a node of several models names none of them as if it were the only one
    assert node["aliases"] == {"gpt-4o-mini": "tiny-chat"}
    assert httpx.get(gw.url + "/get_server_info").json() == node

    alias = httpx.get(gw.url + "/m/gpt-4o-mini/server_info").json()
    assert (alias["served_model_name"], alias["model_id"], alias["model_path"]) == ("gpt-4o-mini",) * 2 + ("tiny-chat",)
    info = httpx.get(gw.url + "/m/tiny-embed/model_info").json()
    assert info["is_generation"] is False and info["architectures"] == ["qwen3embedding"]
    assert "/" not in info["model_path"]  # a local model's path is not given away
    assert [m["model_id"] for m in httpx.get(gw.url + "/model_info").json()["models"]] == node["models"]

    solo = gateways('[[models]]\nid = "solo"\nkind = "plain"\nrepo = "org/solo"\nprefetch = false\n')
    info = httpx.get(solo.url + "/server_info").json()
    assert (info["served_model_name"], info["model_path"]) == ("solo", "org/solo")  # a server of one model
    assert httpx.get(solo.url + "/get_model_info").json()["model_path"] == "org/solo"


def test_the_model_prefix_serves_as_the_root_does_and_refuses_a_model_the_node_lacks(gateways: Start) -> None:
    gw = gateways(env={"GATEWAY_API_KEYS": "k1"})
    key = {"Authorization": "Bearer k1"}
    url = gw.url + "/m/tiny-chat/v1/chat/completions"
    assert httpx.post(url, json=chat("hi"), timeout=30).status_code == 401  # guarded as the path it stands for
    answer = httpx.post(url, json=chat("prefixed"), headers=key, timeout=30)
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == "echo: prefixed"
    missing = httpx.get(gw.url + "/m/gamma/health")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    ollama = httpx.post(gw.url + "/m/gamma/api/chat", json={}, headers=key)
    assert ollama.status_code == 404 and isinstance(ollama.json()["error"], str)  # in the dialect asked for
    listed = httpx.get(gw.url + "/m/gpt-4o-mini/v1/models", headers=key).json()["data"]
    assert [card["id"] for card in listed] == ["gpt-4o-mini"]  # what a router asks a server of one model
    # Counted under the route it stands for, not as an unmatched path.
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'gateway_requests_total{model="tiny-chat",route="/v1/chat/completions",status="200"} 1.0' in metrics
    assert 'route="unmatched",status="200"' not in metrics


def test_polled_answers_are_logged_at_debug_and_failing_ones_at_info(gateways: Start) -> None:
    gw = gateways()
    for path in ("/health", "/healthz", "/readyz", "/get_load", "/metrics", "/m/tiny-chat/health"):
        assert httpx.get(gw.url + path).status_code == 200
    assert httpx.post(gw.v1 + "/chat/completions", json=chat("hi"), timeout=30).status_code == 200
    gw.app.announce_shutdown()  # type: ignore[attr-defined]  # leaving: /health says 503
    assert httpx.get(gw.url + "/health").status_code == 503
    # A line is written once its answer is sent: the last one's is there when the 503's is.
    wait_for(lambda: "status=503" in gw.log(), 10, "the access log line of the 503")
    logged = [line for line in gw.log().splitlines() if "status=" in line]
    assert any("POST /v1/chat/completions" in line for line in logged)
    assert [line.split()[4:6] for line in logged if " GET " in line] == [["GET", "/health"]], logged


def test_a_node_given_notice_says_so_serves_on_then_drains_and_exits(gateway_processes: Start) -> None:
    gw = gateway_processes(env={"GATEWAY_SHUTDOWN_NOTICE": "2"})
    assert httpx.post(gw.v1 + "/chat/completions", json=chat("warm"), timeout=30).status_code == 200
    with held_streams(gw.url, [chat("slow:4", stream=True)]) as (stream,):
        wait_for(lambda: stream.lines, 20, "the stream's first event")
        gw.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: httpx.get(gw.url + "/health").status_code == 503, 10, "/health to say 503")
        assert httpx.get(gw.url + "/readyz").json() == {"status": "draining"}
        assert httpx.get(gw.url + "/get_load").json()["serving"] is False  # its peers send it nothing more
        late = httpx.post(gw.v1 + "/chat/completions", json=chat("still here"), timeout=30)
        assert late.status_code == 200  # a router that has not looked yet still gets its answer
        wait_for(lambda: stream.complete, 30, "the stream in flight to finish")
    assert gw.proc.wait(30) == -signal.SIGTERM  # uvicorn ends as the signal asked, once it has shut down
    assert "Finished server process" in gw.log()
    assert stream.lines[-1] == "[DONE]"
    text = "".join(json.loads(line)["choices"][0]["delta"].get("content") or "" for line in stream.lines[:-1])
    assert text == " ".join(f"w{i}" for i in range(10))

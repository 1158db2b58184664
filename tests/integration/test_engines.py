"""One engine per model, for real: gateways (python -m gateway) with engine processes of the fake engine, and one
with the bundled engine on tiny models. Each numbered point of the pool's design is shown with processes the test
can see start and stop: the memory budget and eviction, a broken model beside working ones, per-model ttl,
exclusive and shared groups, preload, and the controls (/v1/models, /status, /admin/models, the CLI, metrics)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import Gateway, pid_alive, wait_for

Start = Callable[..., Gateway]


def models(*names: str, **fields: dict[str, Any]) -> str:
    """Chat models the engine "fetches" itself (nothing on disk), with extra fields per model."""
    lines: list[str] = []
    for name in names:
        lines += ["[[models]]", f'id = "{name}"', 'kind = "plain"', f'repo = "org/{name}"', "prefetch = false"]
        lines += [f"{key} = {json.dumps(value)}" for key, value in fields.get(name, {}).items()]
    return "\n".join(lines) + "\n"


def ask(gw: Gateway, model: str, text: str = "hi", timeout: float = 60) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    return httpx.post(gw.v1 + "/chat/completions", json=body, timeout=timeout)


def states(gw: Gateway) -> dict[str, str]:
    return {e["name"]: e["state"] for e in gw.engines()}


class Stream(threading.Thread):
    """A chat stream in a thread; `started` once its first event is in."""

    def __init__(self, gw: Gateway, model: str, text: str) -> None:
        super().__init__()
        self.gw, self.model, self.text = gw, model, text
        self.events: list[str] = []
        self.comments: list[str] = []
        self.started = threading.Event()
        self.start()

    def run(self) -> None:
        body = {"model": self.model, "stream": True, "messages": [{"role": "user", "content": self.text}]}
        with httpx.stream("POST", self.gw.v1 + "/chat/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    self.events.append(line[6:])
                    self.started.set()
                elif line.startswith(":"):
                    self.comments.append(line)


THREE = models("a", "b", "c", a={"memory_mb": 100}, b={"memory_mb": 100}, c={"memory_mb": 100})


def test_a_budget_stops_the_least_recently_used_idle_engine_and_never_a_streaming_one(gateways: Start) -> None:
    gw = gateways(THREE, env={"GATEWAY_MEMORY_BUDGET_MB": "250"})
    for model in ("a", "b"):
        assert ask(gw, model).status_code == 200
    pid_a = gw.engine("a")["pid"]
    assert ask(gw, "c").status_code == 200  # 300 MB would not fit: a, the least recently used, is stopped
    assert states(gw) == {"a": "stopped", "b": "ready", "c": "ready"} and not pid_alive(pid_a)
    assert gw.engine("a")["evictions"] == 1 and gw.status()["budget"] == {"budget_mb": 250.0, "used_mb": 200.0}

    stream = Stream(gw, "b", "slow:4")  # b is streaming; c is idle (and used more recently than b)
    assert stream.started.wait(60)
    assert ask(gw, "a").status_code == 200
    assert states(gw) == {"a": "ready", "b": "ready", "c": "stopped"}  # never the streaming one
    stream.join(120)
    assert stream.events[-1] == "[DONE]" and len(stream.events) > 3
    evicted = [
        json.loads(line.split("gateway.events: ", 1)[1])
        for line in gw.log().splitlines()
        if '"type":"engine.evicted"' in line
    ]
    assert [(e["details"]["engine"], e["details"]["to_start"]) for e in evicted] == [("a", "c"), ("c", "a")]


def test_a_request_waits_while_every_engine_is_busy_and_a_model_too_large_is_refused(gateways: Start) -> None:
    toml = THREE + models("huge", huge={"memory_mb": 1000})
    gw = gateways(toml, env={"GATEWAY_MEMORY_BUDGET_MB": "250"})
    streams = [Stream(gw, model, "slow:3") for model in ("a", "b")]
    for stream in streams:
        assert stream.started.wait(60)
    waiting = Stream(gw, "c", "hello")  # waits for a stream to end, then takes its engine's place
    for stream in [*streams, waiting]:
        stream.join(120)
        assert stream.events[-1] == "[DONE]"
    assert waiting.comments and set(waiting.comments) == {": loading"}  # told it waits while a and b stream
    assert (
        "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in waiting.events[:-1]) == "echo: hello"
    )
    refused = ask(gw, "huge")
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_too_large"
    assert "1000 MB" in refused.json()["error"]["message"] and "250 MB" in refused.json()["error"]["message"]
    assert refused.headers["x-should-retry"] == "false"


def test_a_broken_model_fails_only_its_own_requests(gateways: Start) -> None:
    gw = gateways(models("good", "broken"), fake_env={"FAKE_ENGINE_BROKEN": "org/broken"})
    bad = ask(gw, "broken")
    assert bad.status_code == 503 and "simulated load failure" in bad.json()["error"]["message"]
    assert ask(gw, "good").status_code == 200 and ask(gw, "good").json()["model"] == "good"
    assert states(gw) == {"good": "ready", "broken": "failed"}
    assert httpx.get(gw.url + "/readyz").status_code == 200  # the gateway still serves


def test_each_model_stops_after_its_own_ttl(gateways: Start) -> None:
    gw = gateways(models("brief", "lasting", brief={"ttl": 1}, lasting={"ttl": 0}))
    assert ask(gw, "brief").status_code == 200 and ask(gw, "lasting").status_code == 200
    wait_for(lambda: states(gw)["brief"] == "stopped", 30, "the short-lived engine to stop")
    assert states(gw)["lasting"] == "ready" and gw.engine("lasting")["seconds_until_idle_stop"] is None


def test_concurrent_cold_requests_over_three_models_start_each_once(gateways: Start) -> None:
    gw = gateways(THREE, fake_env={"FAKE_ENGINE_LOAD_DELAY": "1"})

    async def crowd() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=400)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            bodies = [{"model": "abc"[i % 3], "messages": [{"role": "user", "content": f"n{i}"}]} for i in range(300)]
            return await asyncio.gather(*(client.post(gw.v1 + "/chat/completions", json=body) for body in bodies))

    responses = asyncio.run(crowd())
    assert [r.status_code for r in responses] == [200] * 300
    assert all(r.json()["choices"][0]["message"]["content"] == f"echo: n{i}" for i, r in enumerate(responses))
    assert sorted(s["argv"][s["argv"].index("--model-id") + 1] for s in gw.spawns()) == ["org/a", "org/b", "org/c"]


def test_an_exclusive_group_swaps_its_members(gateways: Start) -> None:
    toml = models("x", "y") + '[[groups]]\nname = "pair"\nmodels = ["x", "y"]\nexclusive = true\n'
    gw = gateways(toml)
    assert ask(gw, "x").status_code == 200
    assert ask(gw, "y").status_code == 200
    assert states(gw) == {"x": "stopped", "y": "ready"}
    stream = Stream(gw, "y", "slow:3")
    assert stream.started.wait(60)
    assert ask(gw, "x").status_code == 200  # swapped once y's stream was over
    stream.join(120)
    assert stream.events[-1] == "[DONE]" and states(gw) == {"x": "ready", "y": "stopped"}
    assert len(gw.spawns()) == 3


def test_a_shared_group_starts_one_process_for_its_members(gateways: Start) -> None:
    toml = models("p", "q", "r") + '[[groups]]\nname = "pq"\nmodels = ["p", "q"]\nshare_engine = true\n'
    gw = gateways(toml)
    assert ask(gw, "p").status_code == 200 and ask(gw, "q").status_code == 200
    assert len(gw.spawns()) == 1 and "multi-model" in gw.spawns()[0]["argv"]
    assert states(gw) == {"pq": "ready", "r": "stopped"}
    assert gw.engine("q")["models"] == ["p", "q"]


def test_preload_starts_models_and_groups_with_the_gateway(gateways: Start) -> None:
    toml = (
        models("warm", "cold", "g1", "g2", warm={"preload": True})
        + '[[groups]]\nname = "gg"\nmodels = ["g1", "g2"]\nexclusive = true\npreload = true\n'
    )
    gw = gateways(toml)
    wait_for(
        lambda: states(gw) == {"warm": "ready", "cold": "stopped", "g1": "ready", "g2": "stopped"},
        30,
        "the preloaded engines to be ready",
    )
    assert len(gw.spawns()) == 2  # before any request


def test_models_are_visible_and_controllable(gateway_processes: Start) -> None:
    gw = gateway_processes(THREE, env={"GATEWAY_ADMIN_KEY": "adm", "GATEWAY_IDLE_TIMEOUT": "600"})
    admin = {"Authorization": "Bearer adm"}
    assert httpx.post(gw.url + "/admin/models/a/load", timeout=60).status_code == 401
    loaded = httpx.post(gw.url + "/admin/models/a/load", headers=admin, timeout=60)
    assert loaded.status_code == 200 and loaded.json()["state"] == "ready"
    cards = {m["id"]: m for m in httpx.get(gw.v1 + "/models", timeout=30).json()["data"]}
    assert cards["a"]["state"] == "ready" and 590 < cards["a"]["seconds_until_idle_stop"] <= 600
    assert cards["a"]["memory_mb"] == 100 and cards["b"]["state"] == "stopped"
    engine = httpx.get(gw.url + "/status", headers=admin, timeout=30).json()["engines"][0]
    assert engine["models"] == ["a"] and pid_alive(engine["pid"]) and engine["starts"] == 1
    unloaded = httpx.post(gw.url + "/admin/models/a/unload", headers=admin, timeout=60)
    assert unloaded.status_code == 200 and unloaded.json()["state"] == "stopped" and not pid_alive(engine["pid"])
    missing = httpx.post(gw.url + "/admin/models/nope/load", headers=admin, timeout=60)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    starting = [
        json.loads(line.split("gateway.events: ", 1)[1])
        for line in gw.log().splitlines()
        if '"type":"engine.starting"' in line
    ]
    assert starting[0]["details"] == {"engine": "a", "models": ["a"]}  # lifecycle events say which model


def test_the_bundled_engine_runs_one_process_per_model_and_measures_it(gateways: Start, tmp_path: Path) -> None:
    pytest.importorskip("mistralrs", reason="the engine extra is not installed")
    from tests.tinymodels import make_qwen3_embedding, make_qwen3_safetensors

    make_qwen3_safetensors(tmp_path / "chat")
    make_qwen3_embedding(tmp_path / "embed", hidden=64)
    toml = (
        f'[[models]]\nid = "chat"\nkind = "plain"\npath = "{tmp_path / "chat"}"\n'
        f'[[models]]\nid = "embed"\nkind = "embedding"\npath = "{tmp_path / "embed"}"\n'
    )
    gw = gateways(toml, env={"GATEWAY_ENGINE": "bundled", "GATEWAY_ENGINE_BINARY": "", "RUST_LOG": "error"})
    chat = {"model": "chat", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(gw.v1 + "/chat/completions", json=chat, timeout=120).status_code == 200
    assert httpx.post(gw.v1 + "/embeddings", json={"model": "embed", "input": "hi"}, timeout=120).status_code == 200
    engines = {e["name"]: e for e in gw.engines()}
    assert engines["chat"]["pid"] != engines["embed"]["pid"]
    for engine in engines.values():  # what the engine process really uses, not a guess
        assert engine["memory_source"] == "measured" and engine["memory_mb"] > 10

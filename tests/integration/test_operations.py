"""Operating the gateway: API keys, admin actions and their CLI, metrics, request logs and ids."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers import Gateway, wait_for

Start = Callable[..., Gateway]
CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}]}


def test_api_keys_and_admin_key(gateways: Start, tmp_path: Path) -> None:
    gw = gateways(env={"GATEWAY_API_KEYS": "key-one, key-two", "GATEWAY_ADMIN_KEY": "admin-secret"})
    refused = httpx.get(gw.v1 + "/models")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert set(refused.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(gw.v1 + "/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(gw.v1 + "/models", headers={"Authorization": "Bearer key-two"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gw.v1, api_key="nope", max_retries=0).models.list()
    reply = openai.OpenAI(base_url=gw.v1, api_key="key-one", max_retries=0).chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert reply.choices[0].message.content == "echo: hi"
    # The client's key never reaches the engine.
    assert all(r["authorization"] is None for r in gw.upstream_requests())
    for probe in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(gw.url + probe).status_code == 200
    assert httpx.get(gw.url + "/status").status_code == 401
    assert httpx.get(gw.url + "/status", headers={"Authorization": "Bearer key-one"}).status_code == 401
    assert httpx.get(gw.url + "/status", headers={"Authorization": "Bearer admin-secret"}).status_code == 200
    assert httpx.post(gw.url + "/admin/engine/stop").status_code == 401

    keys = tmp_path / "keys.txt"
    keys.write_text("# one key per line\nfrom-a-file\n")
    gw2 = gateways(env={"GATEWAY_API_KEYS": str(keys)})
    assert httpx.get(gw2.v1 + "/models", headers={"Authorization": "Bearer from-a-file"}).status_code == 200
    assert httpx.get(gw2.v1 + "/models").status_code == 401
    # No admin key: the admin routes are not open to anyone, they take an API key.
    assert httpx.get(gw2.url + "/status").status_code == 401
    assert httpx.get(gw2.url + "/status", headers={"Authorization": "Bearer from-a-file"}).status_code == 200


def test_admin_actions_and_their_cli(gateways: Start) -> None:
    gw = gateways(env={"GATEWAY_ADMIN_KEY": "adm"})
    env = {**gw.env, "GATEWAY_ADMIN_KEY": "adm"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", *args, "--url", gw.url],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def states(out: str) -> set[str]:
        return {e["state"] for e in json.loads(out)["engines"]}

    status = cli("engine", "status")
    assert status.returncode == 0 and states(status.stdout) == {"stopped"}
    started = cli("engine", "start")
    assert started.returncode == 0 and states(started.stdout) == {"ready"}
    assert len(gw.spawns()) == 5  # every model's engine, preloaded before any request
    stopped = cli("engine", "stop")
    assert stopped.returncode == 0 and states(stopped.stdout) == {"stopped"}

    loaded = cli("models", "load", "gpt-4o-mini")  # an alias names its model
    assert loaded.returncode == 0 and json.loads(loaded.stdout) == {
        **json.loads(loaded.stdout),
        "model": "tiny-chat",
        "state": "ready",
    }
    ps = cli("models", "ps")
    lines = ps.stdout.splitlines()
    assert ps.returncode == 0 and lines[0].split()[:3] == ["MODEL", "ENGINE", "STATE"]
    assert lines[1].split()[:3] == ["tiny-chat", "tiny-chat", "ready"] and lines[2].split()[2] == "stopped"
    unloaded = cli("models", "unload", "tiny-chat")
    assert unloaded.returncode == 0 and json.loads(unloaded.stdout)["state"] == "stopped"
    unknown = cli("models", "load", "nope")
    assert unknown.returncode == 1 and "does not exist" in unknown.stderr
    env["GATEWAY_ADMIN_KEY"] = "wrong"
    denied = cli("engine", "start")
    assert denied.returncode == 1 and "admin key" in denied.stderr


def test_metrics(gateway_processes: Start) -> None:
    gw = gateway_processes()
    httpx.post(gw.v1 + "/chat/completions", json=CHAT, timeout=30).raise_for_status()
    with httpx.stream("POST", gw.v1 + "/chat/completions", json={**CHAT, "stream": True}, timeout=30) as r:
        r.read()
    httpx.post(gw.v1 + "/embeddings", json={"input": ["a", "b"]}, timeout=30)
    httpx.post(gw.v1 + "/embeddings", json={"input": ["a"]}, timeout=30)
    text = httpx.get(gw.url + "/metrics").text
    assert 'gateway_requests_total{model="tiny-chat",route="/v1/chat/completions",status="200"} 2.0' in text
    assert 'gateway_time_to_first_token_seconds_count{route="/v1/chat/completions"} 1.0' in text
    assert 'gateway_request_duration_seconds_count{route="/v1/embeddings"} 2.0' in text
    # Two engines (the chat model's, the embedding model's), and each model's own series.
    assert 'gateway_engine_state{state="ready"} 2.0' in text and "gateway_engine_starts_total 2.0" in text
    assert 'gateway_model_state{model="tiny-chat",state="ready"} 1.0' in text
    assert 'gateway_model_state{model="tiny-gguf",state="stopped"} 1.0' in text
    assert 'gateway_model_starts_total{model="tiny-embed"} 1.0' in text
    assert 'gateway_model_evictions_total{model="tiny-chat"} 0.0' in text
    assert 'gateway_model_memory_bytes{engine="tiny-chat",model="tiny-chat"}' in text
    assert "gateway_embedding_cache_hits_total 1.0" in text and "gateway_embedding_cache_misses_total 2.0" in text
    assert "gateway_requests_in_flight 1.0" in text  # the scrape itself
    assert "gateway_engine_cold_start_seconds" in text


def test_request_logs_and_request_ids(gateways: Start) -> None:
    gw = gateways(env={"GATEWAY_LOG_FORMAT": "json"})
    given = httpx.post(gw.v1 + "/chat/completions", json=CHAT, headers={"X-Request-ID": "abc-123"}, timeout=30)
    assert given.headers["x-request-id"] == "abc-123"
    generated = httpx.get(gw.v1 + "/models").headers["x-request-id"]
    assert len(generated) == 32
    evil = httpx.get(gw.v1 + "/models", headers={"X-Request-ID": "x" * 500}).headers["x-request-id"]
    assert evil != "x" * 500  # not echoed: too long to be an id

    def line_for(request_id: str) -> dict[str, object] | None:
        for line in gw.log().splitlines():
            start = line.find("{")
            if start >= 0 and f'"request_id": "{request_id}"' in line:
                return json.loads(line[start:])  # type: ignore[no-any-return]
        return None

    entry = wait_for(lambda: line_for("abc-123"), 10, "the request's log line")
    assert entry is not None
    assert entry["method"] == "POST" and entry["path"] == "/v1/chat/completions"
    assert entry["model"] == "tiny-chat" and entry["status"] == 200 and entry["bytes"] > 0  # type: ignore[operator]
    assert isinstance(entry["duration_ms"], float)


def test_check_prints_models_and_the_engine_command(tmp_path: Path) -> None:
    from tests.helpers import write_fake_engine_bin
    from tests.integration.conftest import models_toml

    models = tmp_path / "models.toml"
    shared = '[[groups]]\nname = "text"\nmodels = ["tiny-chat", "tiny-embed"]\nshare_engine = true\n'
    models.write_text(models_toml(tmp_path / "m") + shared)
    binary = write_fake_engine_bin(tmp_path / "bin") / "mistralrs-server"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")},
        "GATEWAY_MODELS_FILE": str(models),
        "GATEWAY_ENGINE_BINARY": str(binary),
    }
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "check"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "tiny-chat [plain]" in done.stdout and "(aliases: gpt-4o-mini)" in done.stdout
    assert "engine: mistralrs-server (0.8.4), one process per line" in done.stdout
    lines = {line.split(": ", 1)[0].strip(): line for line in done.stdout.splitlines() if "--serve-ip" in line}
    assert sorted(lines) == ["text", "tiny-flux", "tiny-gguf", "tiny-speech"]  # one engine per model or group
    assert "--port PORT" in lines["tiny-gguf"] and " gguf " in lines["tiny-gguf"]
    assert "multi-model --config" in lines["text"]
    assert '"alias": "tiny-chat"' in done.stdout  # the multi-model config the shared engine is given
    env["GATEWAY_ENGINE_BINARY"] = str(tmp_path / "nope")
    missing = subprocess.run(
        [sys.executable, "-m", "gateway", "check"], env=env, capture_output=True, text=True, timeout=60
    )
    assert missing.returncode == 1 and "not an executable program" in missing.stdout
    models.write_text("[[models]]\nid = 'x'\nkind = 'llama'\n")
    broken = subprocess.run(
        [sys.executable, "-m", "gateway", "check"], env=env, capture_output=True, text=True, timeout=60
    )
    assert broken.returncode == 2 and "unknown kind 'llama'" in broken.stderr and str(models) in broken.stderr

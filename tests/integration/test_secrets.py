"""No secret leaves the gateway: real engine processes get none in their environment, and a secret an engine prints
is masked in everything the gateway writes and serves (its log, /logs/stream, /events, error bodies).

Processes, because what is tested is what the kernel hands a process (/proc/<pid>/environ) and what a gateway
process writes to its log.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import Gateway
from tests.tinymodels import make_qwen3_safetensors

Start = Callable[..., Gateway]

ADMIN_KEY = "admin-key-4f9a2c7e"
API_KEY = "api-key-81d3b6f0"
HF_TOKEN = "hf_secretToken12345"
REDIS_PASSWORD = "redisPassw0rd77"
SECRETS = {
    "GATEWAY_ADMIN_KEY": ADMIN_KEY,
    "GATEWAY_API_KEYS": API_KEY,
    "GATEWAY_HF_TOKEN": HF_TOKEN,
    # Nothing listens there: the cache is only tried for embeddings, which these tests do not ask for.
    "GATEWAY_CACHE_URL": f"redis://cache:{REDIS_PASSWORD}@127.0.0.1:9/0",
}
# What an engine needs from the gateway's environment, and gets.
NEEDED = {"LANG": "C.UTF-8", "CUDA_VISIBLE_DEVICES": "", "HF_HOME": "", "RUST_LOG": "warn", "MISTRALRS_X": "1"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def models(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    return f"""
[[models]]
id = "local"
kind = "plain"
path = "{folder}"

[[models]]
id = "fetched"
kind = "plain"
repo = "org/fetched"
prefetch = false
"""


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def chat(gw: Gateway, model: str, key: str = API_KEY) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(gw.v1 + "/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def spawn_of(gw: Gateway, model: str) -> dict[str, Any]:
    return next(s for s in gw.spawns() if any(model in arg for arg in s["argv"]))


def test_engine_processes_hold_no_gateway_secret_and_the_token_only_where_they_download(
    gateway_processes: Start, tmp_path: Path
) -> None:
    env = {**SECRETS, **NEEDED, "HF_HOME": str(tmp_path / "hf"), "CUDA_VISIBLE_DEVICES": "0"}
    gw = gateway_processes(models(tmp_path / "local"), env=env)
    assert chat(gw, "local").status_code == 200 and chat(gw, "fetched").status_code == 200
    local, fetched = spawn_of(gw, str(tmp_path / "local")), spawn_of(gw, "org/fetched")
    assert local["hf_token_set"] is False and fetched["hf_token_set"] is True

    for spawn in (local, fetched):
        seen = environ_of(spawn["pid"])
        assert not [name for name in seen if name.startswith("GATEWAY_")]
        for secret in (ADMIN_KEY, API_KEY, REDIS_PASSWORD):
            assert not [name for name, value in seen.items() if secret in value], secret
        assert {name: seen.get(name) for name in NEEDED} == {
            **NEEDED,
            **{k: env[k] for k in ("HF_HOME", "CUDA_VISIBLE_DEVICES")},
        }
        assert seen["PATH"] and seen["HOME"] and seen["FAKE_ENGINE_SPAWN_LOG"] == gw.env["FAKE_ENGINE_SPAWN_LOG"]
    # The engine that fetches its repo itself has the token, named as its --token-source says; the other has none.
    assert environ_of(fetched["pid"])["HF_TOKEN"] == HF_TOKEN
    assert fetched["argv"][fetched["argv"].index("--token-source") + 1] == "env:HF_TOKEN"
    assert HF_TOKEN not in json.dumps(environ_of(local["pid"])) and "--token-source" not in local["argv"]


def test_the_bundled_engine_process_holds_no_gateway_secret(gateway_processes: Start, tmp_path: Path) -> None:
    pytest.importorskip("mistralrs", reason="the engine extra is not installed")
    folder = tmp_path / "tiny"
    make_qwen3_safetensors(folder)
    toml = f'[[models]]\nid = "tiny"\nkind = "plain"\npath = "{folder}"\n'
    env = {**SECRETS, "HF_TOKEN": HF_TOKEN, "RUST_LOG": "error", "GATEWAY_ENGINE": "bundled"}
    gw = gateway_processes(toml, env={**env, "GATEWAY_ENGINE_BINARY": ""})
    reply = chat(gw, "tiny")
    assert reply.status_code == 200, reply.text
    engine = next(e for e in httpx.get(gw.url + "/status", headers=ADMIN, timeout=5).json()["engines"] if e["pid"])
    seen = environ_of(engine["pid"])
    assert not [name for name in seen if name.startswith("GATEWAY_")]
    for secret in (ADMIN_KEY, API_KEY, HF_TOKEN, REDIS_PASSWORD):
        assert not [name for name, value in seen.items() if secret in value], secret
    assert seen["RUST_LOG"] == "error" and seen["PATH"]


def test_the_gateways_own_hf_token_goes_only_to_an_engine_that_downloads(
    gateway_processes: Start, tmp_path: Path
) -> None:
    gw = gateway_processes(models(tmp_path / "local"), env={"HF_TOKEN": HF_TOKEN})
    assert chat(gw, "local").status_code == 200 and chat(gw, "fetched").status_code == 200
    local, fetched = spawn_of(gw, str(tmp_path / "local")), spawn_of(gw, "org/fetched")
    assert local["hf_token_set"] is False and "HF_TOKEN" not in environ_of(local["pid"])
    assert fetched["hf_token_set"] is True and environ_of(fetched["pid"])["HF_TOKEN"] == HF_TOKEN


def read_stream(gw: Gateway, path: str, until: str, timeout: float = 20) -> str:
    """An SSE stream of the gateway (its history comes first) up to the first line holding ``until``."""
    seen: list[str] = []
    with httpx.stream("GET", gw.url + path, headers=ADMIN, timeout=timeout) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            seen.append(line)
            if until in line:
                break
    return "\n".join(seen)


def test_a_secret_an_engine_prints_is_masked_in_the_log_the_console_events_and_errors(
    gateway_processes: Start, tmp_path: Path
) -> None:
    said = f"leaked: {ADMIN_KEY} {API_KEY} {REDIS_PASSWORD} {HF_TOKEN}"
    toml = models(tmp_path / "local") + f'\n[[models]]\nid = "broken"\nkind = "plain"\npath = "{tmp_path / "broken"}"\n'
    (tmp_path / "broken").mkdir()
    gw = gateway_processes(toml, env=SECRETS, fake_env={"FAKE_ENGINE_SAY": said, "FAKE_ENGINE_BROKEN": "broken"})
    assert chat(gw, "local").status_code == 200
    failed = chat(gw, "broken")  # its engine prints the line, then fails to load: its output is in the error
    assert failed.status_code == 503 and "leaked: *** *** *** ***" in failed.text

    # A line the gateway writes itself (the access log of a path holding a key) goes through the log filter.
    httpx.get(f"{gw.v1}/models/{API_KEY}", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5)
    console = read_stream(gw, "/logs/stream", until="leaked")
    events = read_stream(gw, "/events", until="leaked")
    status = httpx.get(gw.url + "/status", headers=ADMIN, timeout=5).text
    log = gw.log()
    for where, text in {"error": failed.text, "console": console, "events": events, "log": log}.items():
        assert "leaked: *** *** *** ***" in text, where
    assert "/v1/models/*** " in log
    for text in (failed.text, console, events, status, log):
        for secret in (ADMIN_KEY, API_KEY, REDIS_PASSWORD, HF_TOKEN):
            assert secret not in text


def test_an_engine_dumping_its_environment_shows_the_token_masked(gateway_processes: Start, tmp_path: Path) -> None:
    gw = gateway_processes(models(tmp_path / "local"), env=SECRETS, fake_env={"FAKE_ENGINE_PRINT_ENV": "1"})
    assert chat(gw, "fetched").status_code == 200  # an engine that downloads: it has the token
    assert environ_of(spawn_of(gw, "org/fetched")["pid"])["HF_TOKEN"] == HF_TOKEN
    assert "HF_TOKEN=***" in gw.log() and HF_TOKEN not in gw.log()
    assert "HF_TOKEN=***" in read_stream(gw, "/logs/stream", until="HF_TOKEN=")

"""Model files downloaded on demand through the gateway, with events and progress, against a local server."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.fileserver import FileServer
from tests.helpers import Gateway

Start = Callable[..., Gateway]
CONTENT = os.urandom(3 << 20)  # 3 MiB: the fake engine does not read it, the checks do


@pytest.fixture
def server() -> Iterator[FileServer]:
    with FileServer(CONTENT, path="/files/tiny-Q8_0.gguf") as running:
        yield running


def toml(server: FileServer, *, sha256: str | None = None) -> str:
    return f"""
[[models]]
id = "tiny-chat"
kind = "gguf"
url = "{server.url}"
file = "tiny/tiny-Q8_0.gguf"
sha256 = "{sha256 or server.sha256}"
"""


def chat(**kw: object) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": "hi"}], **kw}


def test_lazy_download_on_first_request_with_events(gateways: Start, server: FileServer) -> None:
    gw = gateways(toml(server))
    target = Path(gw.env["GATEWAY_MODEL_DIR"]) / "tiny" / "tiny-Q8_0.gguf"
    assert not target.exists() and server.gets() == []  # nothing happens before a request needs it
    reply = httpx.post(gw.v1 + "/chat/completions", json=chat(), timeout=60)
    assert reply.status_code == 200 and reply.json()["model"] == "tiny-chat"
    assert target.read_bytes() == CONTENT
    argv = gw.spawns()[0]["argv"]
    assert argv[argv.index("--quantized-model-id") + 1] == str(target.parent)
    downloads = gw.status()["downloads"]["tiny/tiny-Q8_0.gguf"]
    assert downloads["state"] == "done" and downloads["bytes"] == len(CONTENT)
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'gateway_download_bytes_total{file="tiny/tiny-Q8_0.gguf"} 3.145728e+06' in metrics

    with httpx.stream("GET", gw.url + "/events", timeout=10) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        seen: list[str] = []
        for line in response.iter_lines():
            if line.startswith("event: "):
                seen.append(line[7:])
            if "engine.ready" in seen:
                break
    order = [t for t in seen if t in ("download.started", "download.done", "engine.starting", "engine.ready")]
    assert order == ["engine.starting", "download.started", "download.done", "engine.ready"]

    # A restart finds the file present and valid: nothing touches the network.
    before = len(server.gets())
    httpx.post(gw.url + "/admin/engine/stop", timeout=30)
    assert httpx.post(gw.v1 + "/chat/completions", json=chat(), timeout=60).status_code == 200
    assert len(server.gets()) == before


def test_streams_waiting_for_a_download_see_its_progress(gateways: Start, server: FileServer) -> None:
    server.hold_after = 1 << 20  # the download pauses after 1 MiB until the test lets it go on
    gw = gateways(toml(server), env={"GATEWAY_LOADING_INTERVAL": "0.2"})
    progress = []
    with httpx.stream("POST", gw.v1 + "/chat/completions", json=chat(stream=True), timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith(": loading tiny/tiny-Q8_0.gguf"):
                progress.append(line)
                server.release()
            if line == "data: [DONE]":
                break
    assert progress and "%" in progress[0] and f"of {len(CONTENT)} bytes" in progress[0]


def test_a_failed_download_is_a_clear_503_and_nothing_is_handed_to_the_engine(
    gateways: Start, server: FileServer
) -> None:
    server.status = 404
    gw = gateways(toml(server))
    response = httpx.post(gw.v1 + "/chat/completions", json=chat(), timeout=60)
    assert response.status_code == 503
    message = response.json()["error"]["message"]
    assert "tiny-Q8_0.gguf" in message and "404" in message
    assert gw.spawns() == []
    gw2 = gateways(toml(server, sha256="0" * 64))
    server.status = None
    response = httpx.post(gw2.v1 + "/chat/completions", json=chat(), timeout=60)
    assert response.status_code == 503 and "sha256" in response.json()["error"]["message"].lower()
    assert gw2.spawns() == [] and not (Path(gw2.env["GATEWAY_MODEL_DIR"]) / "tiny" / "tiny-Q8_0.gguf").exists()


def test_pull_downloads_ahead_with_progress(server: FileServer, tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text(toml(server) + '\n[[models]]\nid = "hub"\nkind = "embedding"\nprefetch = false\n')
    env = {
        **os.environ,
        "GATEWAY_MODELS_FILE": str(models),
        "GATEWAY_MODEL_DIR": str(tmp_path / "dir"),
        "COLUMNS": "120",
    }
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "pull", "--all"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "dir" / "tiny" / "tiny-Q8_0.gguf").read_bytes() == CONTENT
    out = done.stdout + done.stderr
    assert "tiny-Q8_0.gguf" in out and "hub: nothing to download here" in out
    again = subprocess.run(
        [sys.executable, "-m", "gateway", "pull", "tiny-chat"], env=env, capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0 and len(server.gets()) == 1  # present and valid: no second download
    unknown = subprocess.run(
        [sys.executable, "-m", "gateway", "pull", "nope"], env=env, capture_output=True, text=True, timeout=60
    )
    assert unknown.returncode == 2 and "no model 'nope'" in unknown.stderr

"""Numbers for the real engine path (not a test): cold start, tokens/s direct vs through the gateway, RSS.

Run: ``.venv/bin/python -m tests.bench.real_engine`` (needs the engine extra). Uses tiny random-weight
models written on the fly, so it measures the gateway's and the bundled server's overhead, not a model.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from tests.helpers import free_port, pid_alive, start_gateway, wait_for
from tests.tinymodels import make_qwen3_gguf, make_qwen3_safetensors

TOKENS = 400


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def stream_tokens(base: str, model: str, prompt: str = "hello") -> tuple[float, float, int]:
    """(seconds to first chunk, total seconds, chunks) for one greedy stream of TOKENS tokens."""
    body = {
        "model": model,
        "stream": True,
        "max_tokens": TOKENS,
        "temperature": 0,
        "messages": [{"role": "user", "content": prompt}],
    }
    began = time.perf_counter()
    first, chunks = 0.0, 0
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=300) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunks += 1
                if chunks == 1:
                    first = time.perf_counter() - began
    return first, time.perf_counter() - began, chunks


def concurrent_tps(base: str, model: str, n: int = 8) -> float:
    totals: list[int] = []

    def one(i: int) -> None:
        totals.append(stream_tokens(base, model, f"prompt {i}")[2])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(totals) / (time.perf_counter() - began)


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    make_qwen3_safetensors(root / "plain")
    make_qwen3_gguf(root / "q8" / "tiny-Q8_0.gguf", quant="Q8_0")
    results: dict[str, object] = {}

    # The bundled engine server on its own.
    port = free_port()
    began = time.perf_counter()
    engine = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway.engine.bundled",
            "--serve-ip",
            "127.0.0.1",
            "--port",
            str(port),
            "plain",
            "-m",
            str(root / "plain"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={"RUST_LOG": "error", "PATH": "/usr/bin:/bin"},
    )
    direct = f"http://127.0.0.1:{port}"
    wait_for(lambda: _ok(direct + "/health"), 60, "the bundled engine")
    results["bundled engine: spawn to ready (s)"] = round(time.perf_counter() - began, 3)
    stream_tokens(direct, "default")  # warm
    _, total, chunks = stream_tokens(direct, str(root / "plain"))
    results["direct: tokens/s, one stream"] = round(chunks / total, 1)
    results["direct: tokens/s, 8 streams"] = round(concurrent_tps(direct, str(root / "plain")), 1)
    results["bundled engine RSS (MB)"] = round(rss_mb(engine.pid), 1)
    engine.kill()
    engine.wait()

    toml = f'[[models]]\nid = "tiny"\nkind = "plain"\npath = "{root / "plain"}"\n'
    gw = start_gateway(
        root,
        toml,
        env={
            "GATEWAY_ENGINE": "bundled",
            "GATEWAY_ENGINE_BINARY": "",
            "GATEWAY_IDLE_TIMEOUT": "3",
            "RUST_LOG": "error",
        },
    )
    try:
        cold_first, _, _ = stream_tokens(gw.url, "tiny")
        engine_load = gw.engine()["last_start_seconds"]
        results["gateway cold start: request to first chunk (s)"] = round(cold_first, 3)
        results["  of which engine start to ready (s)"] = engine_load
        results["  of which gateway + first token (s)"] = round(cold_first - engine_load, 3)
        stream_tokens(gw.url, "tiny")
        _, total, chunks = stream_tokens(gw.url, "tiny")
        results["gateway: tokens/s, one stream"] = round(chunks / total, 1)
        results["gateway: tokens/s, 8 streams"] = round(concurrent_tps(gw.url, "tiny"), 1)
        pid = gw.engine()["pid"]
        results["engine RSS while running (MB)"] = round(rss_mb(pid), 1)
        results["gateway RSS (MB)"] = round(rss_mb(gw.proc.pid), 1)
        wait_for(lambda: gw.engine()["state"] == "stopped", 30, "idle stop")
        wait_for(lambda: not pid_alive(pid), 10, "engine exit")
        results["engine RSS after idle stop (MB)"] = 0.0 if not pid_alive(pid) else rss_mb(pid)
        results["gateway RSS after idle stop (MB)"] = round(rss_mb(gw.proc.pid), 1)
    finally:
        gw.stop()
    print(json.dumps(results, indent=2))


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()

"""The embedding cache through a real gateway, the fake engine and a real redis-server."""

from __future__ import annotations

import base64
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from tests.helpers import Gateway, free_port, wait_for

Start = Callable[..., Gateway]


def models(root: Path) -> str:
    for name in ("qwen3-embed", "other-embed"):
        (root / name).mkdir(parents=True, exist_ok=True)
    return f"""
[[models]]
id = "qwen3-embed"
kind = "embedding"
path = "{root / "qwen3-embed"}"
[models.options]
arch = "qwen3embedding"

[[models]]
id = "other-embed"
kind = "embedding"
path = "{root / "other-embed"}"
"""


def embed(gw: Gateway, inputs: Any, **kw: Any) -> httpx.Response:
    headers = kw.pop("headers", {})
    response = httpx.post(gw.v1 + "/embeddings", json={"model": "qwen3-embed", "input": inputs, **kw},
                          headers=headers, timeout=30)  # fmt: skip
    return response


def upstream_inputs(gw: Gateway) -> list[Any]:
    return [r["body"]["input"] for r in gw.upstream_requests() if r["path"] == "/v1/embeddings"]


def vectors(response: httpx.Response) -> list[list[float]]:
    data = response.json()["data"]
    assert [d["index"] for d in data] == list(range(len(data)))
    return [d["embedding"] for d in data]


def test_partial_hits_send_only_the_misses_in_order(gateways: Start, tmp_path: Path) -> None:
    gw = gateways(models(tmp_path / "m"))
    first = embed(gw, ["a", "b"])
    assert first.status_code == 200 and first.headers["x-cache"] == "miss"
    second = embed(gw, ["b", "c", "a", "d"])
    assert second.headers["x-cache"] == "partial"
    assert upstream_inputs(gw) == [["a", "b"], ["c", "d"]]
    a, b = vectors(first)
    got = vectors(second)
    assert got[0] == b and got[2] == a and len(got) == 4
    fresh = embed(gw, ["c", "d"])
    assert fresh.headers["x-cache"] == "hit" and vectors(fresh) == [got[1], got[3]]
    assert second.json()["usage"]["prompt_tokens"] == 4 and second.json()["model"] == "qwen3-embed"
    # A string and a one-item list are the same item; token arrays are items too.
    assert embed(gw, "a").headers["x-cache"] == "hit"
    embed(gw, [[1, 2, 3]])
    assert embed(gw, [1, 2, 3]).headers["x-cache"] == "hit"


def test_duplicates_in_one_request_and_across_concurrent_requests_are_computed_once(
    gateways: Start, tmp_path: Path
) -> None:
    gw = gateways(models(tmp_path / "m"), fake_env={"FAKE_ENGINE_EMBED_DELAY": "0.5"})
    response = embed(gw, ["x", "x", "y", "x"])
    assert vectors(response)[0] == vectors(response)[1] == vectors(response)[3]
    assert upstream_inputs(gw) == [["x", "y"]]
    results: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: results.append(embed(gw, ["same", "other"]))) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 10 and all(r.status_code == 200 for r in results)
    assert len({str(vectors(r)) for r in results}) == 1
    assert sum(inputs.count("same") for inputs in upstream_inputs(gw)) == 1


def test_base64_is_the_float_answer_bit_for_bit(gateways: Start, tmp_path: Path) -> None:
    gw = gateways(models(tmp_path / "m"))
    client = openai.OpenAI(base_url=gw.v1, api_key="x", max_retries=0)
    floats = client.embeddings.create(model="qwen3-embed", input=["bits"], encoding_format="float")
    raw = embed(gw, ["bits"], encoding_format="base64").json()["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(raw), dtype="<f4")
    assert np.array_equal(decoded, np.asarray(floats.data[0].embedding, dtype=np.float32))
    assert len(upstream_inputs(gw)) == 1  # encoding_format is not part of the key
    assert all("encoding_format" not in r["body"] or r["body"]["encoding_format"] == "float"
               for r in gw.upstream_requests() if r["path"] == "/v1/embeddings")  # fmt: skip


def test_dimensions_truncate_and_renormalise_or_are_refused(gateways: Start, tmp_path: Path) -> None:
    gw = gateways(models(tmp_path / "m"))
    full = np.asarray(vectors(embed(gw, ["dim"]))[0], dtype=np.float32)
    short = np.asarray(vectors(embed(gw, ["dim"], dimensions=16))[0])
    assert short.shape == (16,) and abs(np.linalg.norm(short) - 1) < 1e-5
    assert np.allclose(short, full[:16] / np.linalg.norm(full[:16]), atol=1e-6)
    assert all("dimensions" not in r["body"] for r in gw.upstream_requests() if r["path"] == "/v1/embeddings")
    refused = httpx.post(gw.v1 + "/embeddings", json={"model": "other-embed", "input": "x", "dimensions": 8})
    assert refused.status_code == 400 and "other-embed" in refused.json()["error"]["message"]
    assert refused.json()["error"]["param"] == "dimensions"
    too_big = embed(gw, ["dim2"], dimensions=10_000)
    assert too_big.status_code == 400 and "64-dimensional" in too_big.json()["error"]["message"]


def test_size_bound_cache_control_and_errors_never_cached(gateways: Start, tmp_path: Path) -> None:
    gw = gateways(models(tmp_path / "m"), env={"GATEWAY_EMBEDDING_CACHE_MB": "0.01"})
    for start in range(0, 100, 20):
        embed(gw, [f"item {i}" for i in range(start, start + 20)])
    cache = gw.status()["embedding_cache"]
    assert cache["bytes"] <= 0.01 * 1024 * 1024 and cache["entries"] < 100
    assert embed(gw, ["item 0"]).headers["x-cache"] == "miss"  # evicted
    assert embed(gw, ["item 99"]).headers["x-cache"] == "hit"
    count = len(upstream_inputs(gw))
    assert embed(gw, ["item 99"], headers={"Cache-Control": "no-cache"}).headers["x-cache"] == "miss"
    assert len(upstream_inputs(gw)) == count + 1
    assert embed(gw, ["never kept"], headers={"Cache-Control": "no-store"}).status_code == 200
    assert embed(gw, ["never kept"]).headers["x-cache"] == "miss"
    failed = embed(gw, ["fine", "error"])
    assert failed.status_code == 500 and set(failed.json()["error"]) == {"message", "type", "param", "code"}
    assert embed(gw, ["fine"]).headers["x-cache"] == "miss"  # nothing from the failed request was kept


class Redis:
    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.tmp = tmp
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.tmp)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for(self.ping, 10, "redis-server to answer")

    def ping(self) -> bool:
        import socket

        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Redis]:
    if shutil.which("redis-server") is None and not Path("/usr/bin/redis-server").exists():
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run does)")
    server = Redis(tmp_path)
    server.start()
    yield server
    server.stop()


def test_redis_is_shared_between_gateways_and_survives_an_outage(
    gateways: Start, tmp_path: Path, redis_server: Redis
) -> None:
    env = {"GATEWAY_CACHE_URL": f"redis://127.0.0.1:{redis_server.port}/0"}
    a = gateways(models(tmp_path / "m"), env=env)
    b = gateways(models(tmp_path / "m"), env=env)
    first = embed(a, ["shared", "items"])
    second = embed(b, ["shared", "items"])
    assert second.headers["x-cache"] == "hit" and vectors(second) == vectors(first)
    assert upstream_inputs(b) == [] and b.spawns() == []  # B never even started its engine

    redis_server.stop()
    during = embed(a, ["while down"])
    assert during.status_code == 200 and during.headers["x-cache"] == "miss"
    assert a.status()["embedding_cache"]["redis"]["errors"] >= 1
    assert embed(b, ["while down too"]).status_code == 200

    redis_server.start()  # back, empty: the gateways recover without a restart
    wait_for(lambda: embed(a, ["after"]).status_code == 200 and embed(b, ["after"]).headers["x-cache"] == "hit",
             20, "the shared cache to work again")  # fmt: skip

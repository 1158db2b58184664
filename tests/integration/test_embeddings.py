"""The embedding cache through a real gateway, the fake engine and a real redis-server."""

from __future__ import annotations

import base64
import shutil
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from gateway.cache.keys import item_key, model_identity
from gateway.cache.store import BadValue, Entry
from gateway.catalog import parse_catalog
from tests.fakes.fake_engine import embedding_vector
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
    response = httpx.post(
        gw.v1 + "/embeddings", json={"model": "qwen3-embed", "input": inputs, **kw}, headers=headers, timeout=30
    )
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
    assert all(
        "encoding_format" not in r["body"] or r["body"]["encoding_format"] == "float"
        for r in gw.upstream_requests()
        if r["path"] == "/v1/embeddings"
    )


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
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.tmp),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
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
    wait_for(
        lambda: embed(a, ["after"]).status_code == 200 and embed(b, ["after"]).headers["x-cache"] == "hit",
        20,
        "the shared cache to work again",
    )


PREFIX = "mistral-gateway:emb:"  # RedisStore's default, as the gateway uses it


def redis_key(toml: str, tmp_path: Path, item: str, dimensions: int | None = None) -> str:
    """The Redis key the gateway uses for ``item`` of qwen3-embed (as gateway/cache/keys.py builds it)."""
    model = parse_catalog(toml, origin="test", model_dir=tmp_path / "unused").models[0]
    assert model.id == "qwen3-embed"
    return PREFIX + item_key(model_identity(model), item, dimensions)


def f32(values: Any) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()


def bad_value(item: str) -> bytes:
    """The bad value of each item, named after what is wrong with it (the fake engine's vectors are 64-d)."""
    floats = f32(embedding_vector(item, 64))
    good = Entry(floats, 1).encode()
    nan = np.frombuffer(floats, dtype="<f4").copy()
    nan[5] = np.nan
    return {
        "empty": b"",
        "truncated": good[:-2],
        "one float short": good[:-4],
        "a flipped bit": good[:-1] + bytes([good[-1] ^ 0x40]),
        "unversioned (written by the gateway before)": struct.pack("<I", 1) + floats,
        "another program's": b"not a vector at all",
        "32 dimensions": Entry(f32(embedding_vector(item, 32)), 1).encode(),
        "nan": Entry(nan.tobytes(), 1).encode(),
    }[item]


BAD_ITEMS = [
    "empty",
    "truncated",
    "one float short",
    "a flipped bit",
    "unversioned (written by the gateway before)",
    "another program's",
    "32 dimensions",
    "nan",
]


def stored(client: Any, key: str) -> Entry | None:
    raw = client.get(key)
    try:
        return Entry.decode(raw)
    except BadValue:
        return None


def test_bad_values_in_redis_are_misses_replaced_by_the_engine_s(
    gateways: Start, tmp_path: Path, redis_server: Redis
) -> None:
    import redis

    toml = models(tmp_path / "m")
    env = {"GATEWAY_CACHE_URL": f"redis://127.0.0.1:{redis_server.port}/0"}
    gw = gateways(toml, env=env)
    items = [*BAD_ITEMS, "good"]
    # What the engine answers with the cache off (this also tells the gateway the model's dimension).
    expected = vectors(embed(gw, items, headers={"Cache-Control": "no-store"}))
    assert [f32(v) for v in expected] == [f32(embedding_vector(item, 64)) for item in items]
    expected_16 = vectors(embed(gw, ["short"], dimensions=16, headers={"Cache-Control": "no-store"}))

    db = redis.Redis(port=redis_server.port)
    keys = {item: redis_key(toml, tmp_path, item) for item in items}
    assert db.keys(PREFIX + "*") == []
    for item in BAD_ITEMS:
        db.set(keys[item], bad_value(item))
    db.set(keys["good"], Entry(f32(expected[-1]), 1).encode())  # in the current format: used as it is
    key_16 = redis_key(toml, tmp_path, "short", 16)
    db.set(key_16, Entry(f32(embedding_vector("short", 64)), 1).encode())  # 64 floats where 16 are asked
    asked_before = len(upstream_inputs(gw))

    client = openai.OpenAI(base_url=gw.v1, api_key="x", max_retries=0)
    raw = client.embeddings.with_raw_response.create(model="qwen3-embed", input=items, encoding_format="float")
    assert raw.http_response.status_code == 200 and raw.headers["x-cache"] == "partial"
    assert [d.embedding for d in raw.parse().data] == expected
    short = client.embeddings.create(model="qwen3-embed", input="short", dimensions=16, encoding_format="float")
    assert [d.embedding for d in short.data] == expected_16
    assert upstream_inputs(gw)[asked_before:] == [BAD_ITEMS, ["short"]]

    # Each bad value was logged once, and replaced by the engine's vector.
    rejected = [line for line in gw.log().splitlines() if "embedding cache: ignored the value of" in line]
    assert len(rejected) == len(BAD_ITEMS) + 1
    assert all(sum(keys[item] in line for line in rejected) == 1 for item in BAD_ITEMS)
    for item, vector in zip(items, expected, strict=True):
        entry = stored(db, keys[item])
        assert entry is not None and entry.vector == f32(vector), item
    entry_16 = stored(db, key_16)
    assert entry_16 is not None and entry_16.vector == f32(expected_16[0])

    # A gateway started afterwards (a restart, a replica) reads them back: all hits, its engine never started.
    later = gateways(toml, env=env)
    again = embed(later, items)
    assert again.headers["x-cache"] == "hit" and vectors(again) == expected
    assert later.spawns() == [] and "ignored the value" not in later.log()


def test_rejected_values_are_counted_in_status_and_metrics(
    gateways: Start, tmp_path: Path, redis_server: Redis
) -> None:
    import redis

    toml = models(tmp_path / "m")
    gw = gateways(toml, env={"GATEWAY_CACHE_URL": f"redis://127.0.0.1:{redis_server.port}/0"})
    db = redis.Redis(port=redis_server.port)
    for item in ("another program's", "truncated"):
        db.set(redis_key(toml, tmp_path, item), bad_value(item))
    assert embed(gw, ["another program's", "truncated"]).status_code == 200
    cache = gw.status()["embedding_cache"]
    assert cache["rejected"] == 2 and cache["redis"]["rejected"] == 2 and cache["redis"]["errors"] == 0
    metrics = httpx.get(gw.url + "/metrics").text
    assert "gateway_embedding_cache_rejected_total 2.0" in metrics

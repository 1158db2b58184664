from __future__ import annotations

import gc
import json
import logging
import os
import struct
import tracemalloc
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest

from gateway.cache.embeddings import Embeddings, _apportion, split_items, supports_matryoshka
from gateway.cache.keys import item_key, model_identity
from gateway.cache.store import BadValue, Entry, MemoryStore, RedisStore, check_dimensions
from gateway.catalog import Model, parse_catalog
from gateway.engine.launcher import Endpoint
from gateway.upstream.relay import Relay

MiB = 1024 * 1024


def vector(*values: float) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()


def test_items_and_keys() -> None:
    assert split_items("a") == ["a"] == split_items(["a"])
    assert split_items([1, 2]) == [[1, 2]] == split_items([[1, 2]])
    assert item_key("m", "a", None) == item_key("m", "a", None)
    assert (
        len(
            {
                item_key("m", "a", None),
                item_key("m", "a", 8),
                item_key("m2", "a", None),
                item_key("m", "b", None),
                item_key("m", [97], None),
            }
        )
        == 5
    )


def test_identity_changes_when_the_file_changes(tmp_path: Path) -> None:
    folder = tmp_path / "emb"
    folder.mkdir()
    weights = folder / "model.safetensors"
    weights.write_bytes(b"one")
    catalog = parse_catalog(
        f'[[models]]\nid = "e"\nkind = "embedding"\npath = "{folder}"\n', origin="m", model_dir=tmp_path
    )
    model = catalog.models[0]
    before = model_identity(model)
    assert model_identity(model) == before
    weights.write_bytes(b"two, longer")
    os.utime(weights, ns=(1, 1))
    assert model_identity(model) != before


def test_matryoshka_support(tmp_path: Path) -> None:
    text = """
[[models]]
id = "Qwen/Qwen3-Embedding-0.6B"
kind = "embedding"
[[models]]
id = "other"
kind = "embedding"
[[models]]
id = "opted-in"
kind = "embedding"
[models.options]
matryoshka = true
"""
    qwen, other, opted = parse_catalog(text, origin="m", model_dir=tmp_path).models
    assert supports_matryoshka(qwen) and not supports_matryoshka(other) and supports_matryoshka(opted)


def test_token_apportioning_keeps_the_total() -> None:
    assert _apportion(7, ["abc"]) == [7]
    shares = _apportion(10, ["a", "bbb", "cc"])
    assert sum(shares) == 10 and shares[1] >= shares[0]


async def test_memory_store_is_bounded_by_bytes() -> None:
    store = MemoryStore(6000)  # 256-byte vectors, each costing some 700 bytes in all
    await store.set_many({f"k{i}": Entry(np.ones(64, dtype="<f4").tobytes(), 1) for i in range(100)})
    assert store.bytes <= 6000 and 5 <= len(store) <= 11
    assert await store.get_many(["k99"]) and not await store.get_many(["k0"])  # LRU: the oldest went first
    await store.set_many({"huge": Entry(b"x" * 10_000, 1)})  # larger than the cache: simply not kept
    assert not await store.get_many(["huge"])


async def test_memory_store_ttl() -> None:
    now = [0.0]
    store = MemoryStore(10_000, ttl=60, timer=lambda: now[0])
    await store.set_many({"a": Entry(b"1234", 1)})
    now[0] = 59
    assert await store.get_many(["a"])
    now[0] = 61
    assert not await store.get_many(["a"])


# The stored format


@pytest.mark.parametrize("tokens", [0, 1, 2**20])
def test_entry_roundtrip(tokens: int) -> None:
    entry = Entry(np.arange(4, dtype="<f4").tobytes(), tokens)
    raw = entry.encode()
    assert raw[:4] == b"MGE\x01" and len(raw) == 16 + 4 * 4
    assert Entry.decode(raw) == entry


@pytest.mark.parametrize("tokens", [2**20 + 1, 2**32 - 1])
def test_a_token_count_no_item_can_have_is_refused_even_with_a_right_checksum(tokens: int) -> None:
    raw = Entry(np.arange(4, dtype="<f4").tobytes(), tokens).encode()  # a well-formed value, checksum and all
    with pytest.raises(BadValue, match="tokens for one item"):
        Entry.decode(raw)


def test_a_value_written_before_is_read_the_same_by_a_later_gateway() -> None:
    """The format is fixed bytes, nothing of the process that wrote it: what a gateway wrote is read after a
    restart. This is the encoding of version 1, written out; a change to the format must bump the version."""
    raw = bytes.fromhex(
        "4d4745 01"  # "MGE", format version 1
        " 867e26b9"  # CRC-32 of the rest
        " 02000000 07000000"  # 2 dimensions, 7 tokens
        " 0000803f 000000c0"  # 1.0, -2.0
    )
    assert zlib.crc32(raw[8:]) == struct.unpack("<I", raw[4:8])[0]
    assert Entry.decode(raw) == Entry(vector(1.0, -2.0), 7) and Entry(vector(1.0, -2.0), 7).encode() == raw


def v1(dimensions: int, tokens: int, floats: bytes, *, version: int = 1) -> bytes:
    """A value in this gateway's format with whatever header fields, its checksum right."""
    body = struct.pack("<II", dimensions, tokens) + floats
    return struct.pack("<3sBI", b"MGE", version, zlib.crc32(body)) + body


GOOD = Entry(vector(0.6, 0.8, 0.0), 3).encode()
BAD_VALUES = {
    "empty": b"",
    "shorter than the header": GOOD[:10],
    "header only": GOOD[:16],
    "written before the format had a version": struct.pack("<I", 3) + vector(0.6, 0.8, 0.0),
    "another program's": b"some other program's value under our prefix",
    "a newer format": v1(3, 3, vector(0.6, 0.8, 0.0), version=2),
    "length not 16 + 4k": GOOD[:-2],
    "one float short": GOOD[:-4],
    "one float too many": GOOD + vector(1.0),
    "no dimensions": v1(0, 3, b""),
    "header and length agree on a wrong size": v1(2, 3, vector(0.6, 0.8)) + vector(0.0),
    "a flipped bit": GOOD[:-1] + bytes([GOOD[-1] ^ 0x01]),
    "nan": Entry(vector(0.6, float("nan"), 0.0), 3).encode(),
    "infinity": Entry(vector(0.6, float("inf"), 0.0), 3).encode(),
    "negative infinity": v1(3, 3, vector(float("-inf"), 0.0, 0.0)),
}


@pytest.mark.parametrize("raw", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_bad_values_are_refused(raw: bytes) -> None:
    with pytest.raises(BadValue):
        Entry.decode(raw)


def test_what_is_not_bytes_is_refused() -> None:
    with pytest.raises(BadValue, match="not bytes"):
        Entry.decode("MGE\x01")


def test_dimension_check() -> None:
    entry = Entry(vector(1, 2, 3), 1)
    assert check_dimensions(entry, None) == check_dimensions(entry, 3) == 3
    with pytest.raises(BadValue, match="3 dimensions where 4 are expected"):
        check_dimensions(entry, 4)


# Reading back from Redis and from memory


class FakeRedis:
    """What RedisStore uses of redis.asyncio.Redis: mget, and set through a pipeline."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}

    async def mget(self, keys: list[str]) -> list[bytes | None]:
        return [self.values.get(k) for k in keys]

    @asynccontextmanager
    async def pipeline(self, transaction: bool = True) -> AsyncIterator[Any]:
        pending: dict[str, bytes] = {}

        async def execute() -> None:
            self.values.update(pending)

        yield SimpleNamespace(set=lambda key, value, ex=None: pending.__setitem__(key, value), execute=execute)

    async def aclose(self) -> None:
        pass


def redis_store(fake: FakeRedis) -> RedisStore:
    return RedisStore("redis://unused", prefix="p:", client=fake)


async def test_redis_bad_values_are_misses_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeRedis()
    fake.values = {f"p:{name}": raw for name, raw in BAD_VALUES.items()} | {"p:good": GOOD}
    store = redis_store(fake)
    with caplog.at_level(logging.WARNING, logger="gateway.cache"):
        found = await store.get_many(["good", *BAD_VALUES, "absent"])
    assert found == {"good": Entry.decode(GOOD)}
    assert store.rejected == len(BAD_VALUES) and store.errors == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == len(BAD_VALUES)  # one per bad value, each naming its key
    assert all(any(f"p:{name} " in w for w in warnings) for name in BAD_VALUES)


async def test_redis_values_of_another_dimension_are_misses() -> None:
    fake = FakeRedis()
    fake.values = {"p:three": GOOD, "p:two": Entry(vector(1, 0), 1).encode(), "p:also-three": GOOD}
    store = redis_store(fake)
    assert set(await store.get_many(["three", "two", "also-three"], 3)) == {"three", "also-three"}
    assert store.rejected == 1
    assert set(await store.get_many(["two", "three"], 2)) == {"two"} and store.rejected == 2
    # Not knowing the dimension, the first value found sets it for the others.
    assert set(await store.get_many(["three", "two", "also-three"])) == {"three", "also-three"}
    assert store.rejected == 3


async def test_redis_writes_what_it_reads_and_never_what_it_would_refuse() -> None:
    fake = FakeRedis()
    store = redis_store(fake)
    good, nan = Entry(vector(0.5, 0.25), 9), Entry(vector(float("nan"), 1), 9)
    await store.set_many({"good": good, "nan": nan})
    assert set(fake.values) == {"p:good"}
    assert await redis_store(fake).get_many(["good"]) == {"good": good}  # another store: a restart, a replica


async def test_memory_entries_of_another_dimension_are_dropped(caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryStore(100_000)
    await store.set_many({"three": Entry(vector(1, 2, 3), 1), "two": Entry(vector(1, 2), 1)})
    with caplog.at_level(logging.WARNING, logger="gateway.cache"):
        assert set(await store.get_many(["three", "two"], 2)) == {"two"}
    assert store.rejected == 1 and len(store) == 1 and "three in memory" in caplog.text
    assert set(await store.get_many(["two"])) == {"two"} and store.rejected == 1


# Through Embeddings: what the engine answers settles the dimension


class FakeEngine:
    """A relay to an engine that answers ``width``-dimensional vectors; it records what it was asked."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.asked: list[list[str]] = []

    def vector(self, item: str) -> list[float]:
        return [float(len(item) + i) for i in range(self.width)]

    async def request(self, base_url: str, path: str, body: bytes) -> SimpleNamespace:
        items = json.loads(body)["input"]
        self.asked.append(items)
        data = [{"index": i, "embedding": self.vector(item)} for i, item in enumerate(items)]
        return SimpleNamespace(content=json.dumps({"data": data, "usage": {"prompt_tokens": len(items)}}).encode())


def embedding_model(tmp_path: Path) -> Model:
    return parse_catalog(
        '[[models]]\nid = "e"\nkind = "embedding"\nrepo = "org/e"\n', origin="m", model_dir=tmp_path
    ).models[0]


async def embed(embeddings: Embeddings, model: Model, items: list[str]) -> tuple[list[list[float]], str]:
    async def endpoint() -> Endpoint:
        return Endpoint("http://engine", {})

    content, status = await embeddings.handle({"input": items}, model, endpoint)
    return [d["embedding"] for d in json.loads(content)["data"]], status


async def test_a_cached_vector_of_the_wrong_dimension_is_recomputed_and_replaced(tmp_path: Path) -> None:
    model = embedding_model(tmp_path)
    engine, fake = FakeEngine(4), FakeRedis()
    embeddings = Embeddings(cast(Relay, engine), MemoryStore(MiB), redis_store(fake))
    key = item_key(model_identity(model), "wrong", None)
    fake.values["p:" + key] = Entry(vector(1, 2), 1).encode()  # well formed, 2 dimensions
    assert await embed(embeddings, model, ["first"]) == ([engine.vector("first")], "miss")  # the engine says 4
    assert await embed(embeddings, model, ["wrong"]) == ([engine.vector("wrong")], "miss")
    assert Entry.decode(fake.values["p:" + key]).dimensions == 4 and embeddings.rejected == 1
    assert await embed(embeddings, model, ["wrong"]) == ([engine.vector("wrong")], "hit")


async def test_before_the_engine_answers_the_first_cached_vector_sets_the_dimension(tmp_path: Path) -> None:
    model = embedding_model(tmp_path)
    engine, fake = FakeEngine(3), FakeRedis()
    identity = model_identity(model)
    fake.values["p:" + item_key(identity, "good", None)] = Entry(vector(*engine.vector("good")), 1).encode()
    fake.values["p:" + item_key(identity, "bad", None)] = Entry(vector(1, 2), 1).encode()
    embeddings = Embeddings(cast(Relay, engine), MemoryStore(MiB), redis_store(fake))
    got, status = await embed(embeddings, model, ["good", "bad"])
    assert got == [engine.vector("good"), engine.vector("bad")] and status == "partial"
    assert engine.asked == [["bad"]] and embeddings.rejected == 1


# The memory bound, in real memory


def gateway_entry(rng: np.random.Generator, dim: int, i: int) -> tuple[str, Entry]:
    """An entry as the gateway makes one: a sha256 hex key, a float32 vector from numpy, a token count."""
    return item_key("model", f"item {i}", None), Entry(rng.standard_normal(dim).astype("<f4").tobytes(), i % 512)


@pytest.mark.parametrize("ttl", [0, 3600], ids=["lru", "ttl"])
@pytest.mark.parametrize("dim", [16, 1024])
async def test_a_full_cache_uses_its_bound_in_real_memory(dim: int, ttl: float) -> None:
    """Real memory (every allocation still alive, as tracemalloc counts it) once the store is full, and once
    three times its bound went through it (evictions leave deleted slots in dicts), is its bound +-25 %."""
    bound = 3 * MiB
    rng = np.random.default_rng(dim)
    used: list[float] = []
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        store = MemoryStore(bound, ttl=ttl)
        inserted, capacity = 0, 0
        while not capacity or inserted < 3 * capacity:
            key, entry = gateway_entry(rng, dim, inserted)
            await store.set_many({key: entry})
            del key, entry
            inserted += 1
            if not capacity and len(store) < inserted:  # the first eviction: full
                capacity = len(store)
                used.append(tracemalloc.get_traced_memory()[0] - base)
        gc.collect()
        used.append(tracemalloc.get_traced_memory()[0] - base)
    finally:
        tracemalloc.stop()
    ratios = [u / bound for u in used]
    assert all(0.75 <= r <= 1.25 for r in ratios), ratios

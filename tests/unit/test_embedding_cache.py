from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from gateway.cache.keys import item_key, model_identity
from gateway.cache.store import Entry, MemoryStore
from gateway.catalog import parse_catalog
from gateway.embeddings import _apportion, split_items, supports_matryoshka


def test_items_and_keys() -> None:
    assert split_items("a") == ["a"] == split_items(["a"])
    assert split_items([1, 2]) == [[1, 2]] == split_items([[1, 2]])
    assert item_key("m", "a", None) == item_key("m", "a", None)
    assert len({item_key("m", "a", None), item_key("m", "a", 8), item_key("m2", "a", None),
                item_key("m", "b", None), item_key("m", [97], None)}) == 5  # fmt: skip


def test_identity_changes_when_the_file_changes(tmp_path: Path) -> None:
    folder = tmp_path / "emb"
    folder.mkdir()
    weights = folder / "model.safetensors"
    weights.write_bytes(b"one")
    catalog = parse_catalog(f'[[models]]\nid = "e"\nkind = "embedding"\npath = "{folder}"\n', origin="m",
                            model_dir=tmp_path)  # fmt: skip
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
    vector = np.ones(64, dtype="<f4").tobytes()  # 256 bytes + overhead each
    store = MemoryStore(4000)
    await store.set_many({f"k{i}": Entry(vector, 1) for i in range(100)})
    assert store.bytes <= 4000 and 5 <= len(store) <= 11
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


@pytest.mark.parametrize("tokens", [0, 1, 2**31])
def test_entry_roundtrip(tokens: int) -> None:
    entry = Entry(np.arange(4, dtype="<f4").tobytes(), tokens)
    assert Entry.decode(entry.encode()) == entry

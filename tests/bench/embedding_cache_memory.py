"""What an in-process embedding cache entry really costs (not a test; it prints numbers).

Run: ``.venv/bin/python -m tests.bench.embedding_cache_memory``. Fills ``MemoryStore``s with entries shaped as
the gateway makes them (64-character sha256 hex keys, float32 vectors from numpy, token counts) and measures:

- with tracemalloc, for 16- and 1024-dimension vectors, LRU and TTL, at several bounds: the memory the store
  holds once it is full (``fresh``) and after three times its bound has gone through it (``churned``: evictions
  leave deleted slots in the dicts until they resize), per entry, what of it is not the vector's bytes object
  and the token count's int (``structure``, what ``_LRU_ENTRY_COST``/``_TTL_ENTRY_COST`` in
  gateway/cache/store.py stand for), and the ratio of real memory to the bound;
- in a child process without tracemalloc: the RSS a 64 MiB store adds once churned, against its bound (RSS
  also counts the allocator's free space inside its pools, which tracemalloc does not).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from gateway.cache.keys import item_key
from gateway.cache.store import Entry, MemoryStore, _int_cost

MiB = 1024 * 1024
BOUNDS_MB = (1, 2, 3, 4, 6, 8, 12, 16)


@dataclass
class Sample:
    entries: int
    real: int  # bytes the store holds (tracemalloc) or adds to RSS
    payload: int  # of which the vectors' bytes objects and the token counts' ints

    def per_entry(self) -> float:
        return self.real / self.entries

    def structure(self) -> float:
        return (self.real - self.payload) / self.entries


def make_entry(rng: np.random.Generator, dim: int, i: int) -> tuple[str, Entry]:
    """An entry as the gateway makes one: the key of an item, a float32 vector, a token count."""
    vector = rng.standard_normal(dim).astype("<f4").tobytes()
    return item_key("bench-model", f"item {i}", None), Entry(vector, i % 512)


def payload(store: MemoryStore) -> int:
    """What the store's entries hold that the store's size function takes as it is: vectors and token counts."""
    entries = [store._cache[key] for key in list(store._cache)]
    return sum(sys.getsizeof(e.vector) + _int_cost(e.tokens) for e in entries)


async def fill(store: MemoryStore, dim: int, rounds: int, on_full: Callable[[], None] | None = None) -> None:
    """Insert entries until ``rounds`` times what the store holds went in; ``on_full`` runs at the first
    eviction. Nothing but the store keeps an entry."""
    rng = np.random.default_rng(dim)
    inserted, capacity = 0, 0
    while not capacity or inserted < rounds * capacity:
        key, entry = make_entry(rng, dim, inserted)
        await store.set_many({key: entry})
        del key, entry
        inserted += 1
        if not capacity and len(store) < inserted:
            capacity = len(store)
            if on_full is not None:
                on_full()


def traced(dim: int, max_bytes: int, ttl: float) -> tuple[Sample, Sample]:
    """Fresh and churned samples, with tracemalloc."""
    samples: list[Sample] = []

    def sample() -> None:
        gc.collect()
        real = tracemalloc.get_traced_memory()[0] - base
        samples.append(Sample(len(store), real, payload(store)))

    make_entry(np.random.default_rng(0), dim, 0)  # numpy and hashlib loaded before the baseline
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    store = MemoryStore(max_bytes, ttl=ttl)
    asyncio.run(fill(store, dim, 3, on_full=sample))
    sample()
    tracemalloc.stop()
    return samples[0], samples[1]


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def child(dim: int, max_bytes: int, ttl: float) -> None:
    """In a fresh process: the RSS a churned store adds (the entries it dropped are freed first)."""
    make_entry(np.random.default_rng(0), dim, 0)  # numpy and hashlib loaded before the baseline
    gc.collect()
    before = rss_kb()
    store = MemoryStore(max_bytes, ttl=ttl)
    asyncio.run(fill(store, dim, 3))
    gc.collect()
    print(json.dumps({"entries": len(store), "rss": (rss_kb() - before) * 1024}))


def rss(dim: int, max_bytes: int, ttl: float) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-m", "tests.bench.embedding_cache_memory", "--child", str(dim), str(max_bytes), str(ttl)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, int] = json.loads(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="4 MiB only, no RSS")
    args = parser.parse_args()
    if args.child:
        child(int(args.child[0]), int(args.child[1]), float(args.child[2]))
        return
    bounds = (4,) if args.quick else BOUNDS_MB
    print("mode dim   MiB | entries  real/entry  structure  real/bound | fresh: structure  real/bound")
    for ttl in (0.0, 3600.0):
        mode = "ttl" if ttl else "lru"
        for dim in (16, 1024):
            structures = []
            for mb in bounds:
                fresh, churned = traced(dim, mb * MiB, ttl)
                structures += [fresh.structure(), churned.structure()]
                print(
                    f"{mode}  {dim:4d} {mb:4d} | {churned.entries:7d} {churned.per_entry():11.0f} "
                    f"{churned.structure():10.0f} {churned.real / (mb * MiB):11.2f} | "
                    f"{fresh.structure():16.0f} {fresh.real / (mb * MiB):11.2f}"
                )
            print(
                f"{mode}  {dim:4d} structure per entry: min {min(structures):.0f}, max {max(structures):.0f}, "
                f"middle {(min(structures) + max(structures)) / 2:.0f}"
            )
    if args.quick:
        return
    for ttl in (0.0, 3600.0):
        for dim in (16, 1024):
            got = rss(dim, 64 * MiB, ttl)
            print(
                f"RSS {'ttl' if ttl else 'lru'} {dim:4d}: 64 MiB bound, {got['entries']} entries, "
                f"{got['rss'] / MiB:.1f} MiB RSS ({got['rss'] / (64 * MiB):.2f} of the bound)"
            )


if __name__ == "__main__":
    main()

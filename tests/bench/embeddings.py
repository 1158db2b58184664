"""Embedding cache benchmark (not a test): requests/s and latency at 0 %, 50 % and 100 % cache hits.

Run: ``.venv/bin/python -m tests.bench.embeddings``. Starts a gateway with the fake engine, sends
batches of ``BATCH`` items, and prints one line per hit ratio.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from tests.helpers import start_gateway

BATCH = 16
REQUESTS = 300
CONCURRENCY = 8


async def run(url: str, hit_ratio: float, fresh: itertools.count[int]) -> dict[str, float]:
    warm = [f"warm item {i}" for i in range(BATCH)]
    hits = int(BATCH * hit_ratio)
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        await client.post("/v1/embeddings", json={"input": warm})  # make the warm items cached

        async def one() -> None:
            items = warm[:hits] + [f"fresh {next(fresh)}" for _ in range(BATCH - hits)]
            began = time.perf_counter()
            response = await client.post("/v1/embeddings", json={"input": items})
            latencies.append(time.perf_counter() - began)
            assert response.status_code == 200

        began = time.perf_counter()
        queue = list(range(REQUESTS))

        async def worker() -> None:
            while queue:
                queue.pop()
                await one()

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        elapsed = time.perf_counter() - began
    latencies.sort()
    return {
        "hit_ratio": hit_ratio,
        "requests_per_s": round(REQUESTS / elapsed, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2),
    }


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    (root / "emb").mkdir()
    toml = f'[[models]]\nid = "emb"\nkind = "embedding"\npath = "{root / "emb"}"\n'
    gw = start_gateway(root, toml, env={"GATEWAY_LOG_LEVEL": "warning"}, fake_env={"FAKE_ENGINE_EMBED_DIM": "1024"})
    fresh = itertools.count()
    try:
        httpx.post(gw.v1 + "/embeddings", json={"input": "start the engine"}, timeout=60)
        rows = [asyncio.run(run(gw.url, ratio, fresh)) for ratio in (0.0, 0.5, 1.0)]
    finally:
        gw.stop()
    print(f"batch {BATCH} items x 1024 dims, {REQUESTS} requests at concurrency {CONCURRENCY}, fake engine")
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()

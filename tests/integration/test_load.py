"""A bounded load test against the fake engine: mixed streams, chats and embeddings at high concurrency.

No request may fail, and afterwards no file descriptor or engine connection may be left over and memory
must be flat. ``LOAD_SOAK=1`` runs the long variant and prints its figures.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.helpers import Gateway, wait_for

Start = Callable[..., Gateway]
SOAK = os.environ.get("LOAD_SOAK") == "1"


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def _round(url: str, requests: int, concurrency: int) -> list[int]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    statuses: list[int] = []
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        pending = iter(range(requests))

        async def worker() -> None:
            for i in pending:
                kind = i % 4
                if kind == 0:
                    body = {"model": "tiny-chat", "stream": True, "messages": [{"role": "user", "content": "count:20"}]}
                    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                        text = b"".join([chunk async for chunk in response.aiter_bytes()])
                        ok = response.status_code == 200 and text.endswith(b"data: [DONE]\n\n")
                        statuses.append(response.status_code if ok else 599)
                elif kind == 1:
                    response = await client.post("/v1/embeddings", json={"input": [f"text {i % 50}", f"new {i}"]})
                    statuses.append(response.status_code)
                else:
                    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": f"n{i}"}]}
                    response = await client.post("/v1/chat/completions", json=body)
                    statuses.append(response.status_code)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


def test_mixed_load_without_errors_or_leaks(gateway_processes: Start) -> None:
    gw = gateway_processes(env={"GATEWAY_LOG_LEVEL": "warning"})
    pid = gw.proc.pid
    # Warm-up at full concurrency: connection pools fill up to their peak, caches and lazy imports settle.
    asyncio.run(_round(gw.url, 600, 256))
    wait_for(lambda: gw.engine()["in_flight"] == 0, 10, "the warm-up to finish")
    fds_before, rss_before = fds(pid), rss_mb(pid)
    rounds = 10 if SOAK else 1
    began = time.monotonic()
    total = 0
    for _ in range(rounds):
        for concurrency in (16, 256):
            statuses = asyncio.run(_round(gw.url, 1500, concurrency))
            total += len(statuses)
            assert statuses.count(200) == len(statuses), {s: statuses.count(s) for s in set(statuses)}
    elapsed = time.monotonic() - began
    wait_for(lambda: gw.engine()["in_flight"] == 0, 10, "every request to be released")
    # Descriptors: the clients' connections close; what remains is the pool of idle connections to the engine, no
    # larger than after the warm-up's burst. On a busy machine requests overlap longer and the pool grows past that;
    # its idle connections close after 30 s (upstream/client.py's keep-alive), so within 45 s every descriptor a
    # request opened is gone, unless one leaked.
    wait_for(lambda: fds(pid) <= fds_before + 10, 45, f"descriptors to return (before {fds_before}, now {fds(pid)})")
    growth = rss_mb(pid) - rss_before
    print(
        f"\nload: {total} requests in {elapsed:.1f} s ({total / elapsed:.0f}/s); gateway fds {fds_before} -> "
        f"{fds(pid)}; RSS {rss_before:.1f} -> {rss_mb(pid):.1f} MB"
    )
    assert growth < 40, f"gateway memory grew {growth:.1f} MB over {total} requests"

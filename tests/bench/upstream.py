"""The CPU an HTTP client spends per request to the engine (not a test): why the gateway has its own.

Run: ``.venv/bin/python -m tests.bench.upstream [--requests N]``.

One fast fake engine (the one ``tests.bench.overhead`` uses) answers small chat completions; each client sends
the same requests at concurrency 1, 8 and 32 from this process, and the program prints this process's CPU
seconds per 1,000 requests (user + system, ``time.process_time``) and requests per second:

- ``H1Upstream``: the gateway's client (gateway/upstream.py);
- ``aiohttp``: ``aiohttp.ClientSession`` as the gateway used it before, when aiohttp is installed;
- ``httpx``: ``httpx.AsyncClient`` through the gateway's ``HttpxUpstream`` (the unit tests' client).

The engine runs in its own process, so its CPU is not counted; on two cores it competes with the client,
which is why requests per second are printed but CPU per request is the number to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from gateway.upstream import H1Upstream, HttpxUpstream, Upstream
from tests.bench.overhead import CHAT_MODEL, _stop, start_engine

BODY = json.dumps({"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hello there"}]}).encode()


class _Aiohttp:
    """aiohttp configured as the gateway had it: one pooled session, no decompression or cookies."""

    def __init__(self) -> None:
        import aiohttp

        self._aiohttp = aiohttp
        self._session: Any = None

    async def post(self, url: str, body: bytes) -> bytes:
        aiohttp = self._aiohttp
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30), auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(), skip_auto_headers=("User-Agent",),
            )  # fmt: skip
        timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=60)
        async with self._session.post(url, data=body, headers={"content-type": "application/json"},
                                      timeout=timeout) as response:  # fmt: skip
            data: bytes = await response.read()
            return data

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def _via(upstream: Upstream) -> Callable[[str, bytes], Awaitable[bytes]]:
    async def post(url: str, body: bytes) -> bytes:
        response = await upstream.post(url, body, read_timeout=60, stream=False)
        return await response.read()

    return post


async def measure(post: Callable[[str, bytes], Awaitable[bytes]], url: str, concurrency: int, count: int) -> tuple[
        float, float]:  # fmt: skip
    await asyncio.gather(*(post(url, BODY) for _ in range(concurrency)))  # connections opened, untimed
    remaining = count

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            answer = await post(url, BODY)
            if b'"choices"' not in answer:
                raise RuntimeError(f"unexpected answer: {answer[:200]!r}")

    cpu0, began = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu, elapsed = time.process_time() - cpu0, time.perf_counter() - began
    return cpu / count * 1000, count / elapsed


async def bench(port: int, count: int) -> None:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    clients: dict[str, Callable[[], Any]] = {"H1Upstream": H1Upstream}
    if importlib.util.find_spec("aiohttp") is not None:
        clients["aiohttp"] = _Aiohttp
    else:
        print("aiohttp: not installed, skipped")
    clients["httpx"] = HttpxUpstream
    print(f"{'client':<12}{'c':>4}{'CPU s/1k':>10}{'req/s':>9}")
    for concurrency in (1, 8, 32):
        for _round in range(2):  # interleaved, twice, so that machine noise falls on every client
            for name, make in clients.items():
                client = make()
                post = client.post if isinstance(client, _Aiohttp) else _via(client)
                cpu, rps = await measure(post, url, concurrency, count if name != "httpx" else count // 4)
                await client.aclose()
                print(f"{name:<12}{concurrency:>4}{cpu:>10.3f}{rps:>9.0f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.upstream", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=4000, help="per client and cell (httpx gets a quarter)")
    args = parser.parse_args()
    run: Callable[[Any], Any] = asyncio.run
    try:
        import uvloop

        run = uvloop.run  # the loop uvicorn runs the gateway on
    except ImportError:
        pass
    engine, port = start_engine(Path(tempfile.mkdtemp(prefix="bench-upstream-")))
    try:
        run(bench(port, args.requests))
    finally:
        _stop(engine)


if __name__ == "__main__":
    main()

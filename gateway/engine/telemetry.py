"""What the engines say about themselves that the gateway cannot count: the use of their KV cache.

mistral.rs with PagedAttention publishes ``mistralrs_kv_cache_blocks_used`` and ``mistralrs_kv_cache_blocks_total``
on its own ``/metrics``; the bundled engine, and mistral.rs without PagedAttention (a CPU), publish no such thing. So
an engine's KV-cache use is known only when it reports it, and is otherwise absent, never a 0 (gateway/metrics.py
exports it as vLLM's ``kv_cache_usage_perc``; a router reading 0 would take a full engine for an empty one).

Reading every engine's ``/metrics`` at each scrape of the gateway's would put an HTTP exchange on a path that an
endpoint picker takes 20 times a second. Instead a scrape only marks the reading as wanted (:meth:`KvCache.usage`),
and :meth:`KvCache.run` reads the ready engines at most once per ``interval`` while scrapes keep coming: a router
sees values at most ``interval`` old, and a gateway nobody scrapes asks its engines nothing. A reading older than
``STALE`` intervals is dropped, as is the reading of an engine that is no longer ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from ..upstream.client import Upstream, UpstreamError

INTERVAL = 1.0  # seconds between two readings, while the gateway's /metrics is being scraped
STALE = 3  # a reading older than this many intervals is not reported
TIMEOUT = 2.0  # seconds an engine gets to answer its /metrics
USED, TOTAL = "mistralrs_kv_cache_blocks_used", "mistralrs_kv_cache_blocks_total"

_log = logging.getLogger("gateway.engine")


class KvCache:
    """The KV-cache use (0 to 1) of the engines that report it, by engine name. ``engines``: the ready engines'
    base URLs by name (the pool's)."""

    def __init__(
        self,
        engines: Callable[[], Mapping[str, str]],
        upstream: Upstream,
        *,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._engines = engines
        self._upstream = upstream
        self._interval = interval
        self._clock = clock
        self._sleep = sleep
        self._wanted = asyncio.Event()
        self._readings: dict[str, tuple[str, float, float]] = {}  # name -> (base URL, usage, when)

    def usage(self) -> dict[str, float]:
        """The latest readings still fresh, of engines still ready; asks for the next reading."""
        self._wanted.set()
        ready = self._engines()
        oldest = self._clock() - STALE * self._interval
        return {
            name: usage
            for name, (url, usage, when) in self._readings.items()
            if when >= oldest and ready.get(name) == url
        }

    async def run(self) -> None:
        """Background work for the gateway's life: read the engines whenever a scrape asked, once per interval."""
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            await self.refresh()
            await self._sleep(self._interval)

    async def refresh(self) -> None:
        """Read every ready engine's /metrics now (concurrently)."""
        engines = dict(self._engines())
        for name in set(self._readings) - set(engines):
            del self._readings[name]
        await asyncio.gather(*(self._read(name, url) for name, url in engines.items()))

    async def _read(self, name: str, url: str) -> None:
        with contextlib.suppress(UpstreamError):
            status, body = await self._upstream.get(url + "/metrics", timeout=TIMEOUT)
            usage = kv_usage(body.decode("utf-8", "replace")) if status == 200 else None
            if usage is None:
                self._readings.pop(name, None)
            else:
                self._readings[name] = (url, usage, self._clock())


def kv_usage(text: str) -> float | None:
    """The share of its KV cache (0 to 1) an engine's Prometheus text says is in use; None when it does not say.
    Only the two gauges are looked for (summed over their series): a full parse of everything an engine exports
    would cost more than the rest of a reading."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("mistralrs_kv_cache_blocks_"):
            continue
        name, _, rest = line.partition("{") if "{" in line.split(" ", 1)[0] else line.partition(" ")
        if name not in (USED, TOTAL):
            continue
        value = rest.rsplit("}", 1)[-1].split()
        with contextlib.suppress(ValueError, IndexError):
            sums[name] = sums.get(name, 0.0) + float(value[0])
    total = sums.get(TOTAL)
    if total is None or USED not in sums or total <= 0:
        return None
    return min(1.0, max(0.0, sums[USED] / total))

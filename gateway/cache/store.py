"""Where cached vectors live: in this process (bounded by bytes), and optionally in Redis (shared).

Values are ``Entry`` objects: the vector as little-endian float32 bytes (the form OpenAI's base64 uses,
so a base64 answer is an encoding of the stored bytes) and the number of input tokens it cost.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cachetools import LRUCache, TTLCache

_log = logging.getLogger("gateway.cache")
_ENTRY_OVERHEAD = 120  # bytes a cached entry costs beyond its vector: key string, tuple, dict slot


@dataclass(frozen=True, slots=True)
class Entry:
    vector: bytes  # little-endian float32
    tokens: int

    def encode(self) -> bytes:
        return struct.pack("<I", self.tokens) + self.vector

    @classmethod
    def decode(cls, raw: bytes) -> Entry:
        return cls(raw[4:], struct.unpack_from("<I", raw)[0])


class Store(Protocol):
    async def get_many(self, keys: Sequence[str]) -> dict[str, Entry]: ...

    async def set_many(self, entries: dict[str, Entry]) -> None: ...


class MemoryStore:
    """An LRU (or TTL when ``ttl`` > 0) cache whose bound is bytes, not entries."""

    def __init__(self, max_bytes: int, *, ttl: float = 0, timer: Callable[[], float] = time.monotonic) -> None:
        def size(entry: Entry) -> int:
            return len(entry.vector) + _ENTRY_OVERHEAD

        self._cache: LRUCache[str, Entry] | TTLCache[str, Entry]
        if ttl > 0:
            self._cache = TTLCache(maxsize=max_bytes, ttl=ttl, timer=timer, getsizeof=size)
        else:
            self._cache = LRUCache(maxsize=max_bytes, getsizeof=size)

    @property
    def bytes(self) -> int:
        return int(self._cache.currsize)

    def __len__(self) -> int:
        return len(self._cache)

    async def get_many(self, keys: Sequence[str]) -> dict[str, Entry]:
        found = {}
        for key in keys:
            entry = self._cache.get(key)
            if entry is not None:
                found[key] = entry
        return found

    async def set_many(self, entries: dict[str, Entry]) -> None:
        for key, entry in entries.items():
            try:
                self._cache[key] = entry
            except ValueError:  # larger than the whole cache: not cached
                continue


class RedisStore:
    """A Redis store shared by gateway replicas. A Redis that fails is skipped, never fatal.

    After a failure the store stays out of the way for ``retry_after`` seconds (so a dead Redis costs one
    timeout, not one per request), then tries again: it recovers by itself when Redis comes back.
    """

    def __init__(self, url: str, *, ttl: float = 0, prefix: str = "mistral-gateway:emb:", timeout: float = 0.5,
                 retry_after: float = 2.0, clock: Callable[[], float] = time.monotonic,
                 client: Any = None) -> None:  # fmt: skip
        import redis.asyncio as redis

        self._client = client or redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, health_check_interval=10
        )
        self._ttl = int(ttl) if ttl > 0 else None
        self._prefix = prefix
        self._retry_after = retry_after
        self._clock = clock
        self._down_until = 0.0
        self.errors = 0

    @property
    def available(self) -> bool:
        return self._clock() >= self._down_until

    def _failed(self, action: str, exc: Exception) -> None:
        self.errors += 1
        self._down_until = self._clock() + self._retry_after
        _log.warning("redis cache %s failed (%s: %s); skipping it for %.0f s", action, type(exc).__name__, exc,
                     self._retry_after)  # fmt: skip

    async def get_many(self, keys: Sequence[str]) -> dict[str, Entry]:
        if not keys or not self.available:
            return {}
        try:
            values = await self._client.mget([self._prefix + k for k in keys])
        except Exception as exc:  # redis errors, OSError, timeouts: the cache is optional
            self._failed("read", exc)
            return {}
        return {k: Entry.decode(v) for k, v in zip(keys, values, strict=True) if v is not None}

    async def set_many(self, entries: dict[str, Entry]) -> None:
        if not entries or not self.available:
            return
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key, entry in entries.items():
                    pipe.set(self._prefix + key, entry.encode(), ex=self._ttl)
                await pipe.execute()
        except Exception as exc:
            self._failed("write", exc)

    async def aclose(self) -> None:
        await self._client.aclose()

"""Where cached vectors live: in this process (bounded by bytes), and optionally in Redis (shared).

Values are ``Entry`` objects: the vector as little-endian float32 bytes (the form OpenAI's base64 uses,
so a base64 answer is an encoding of the stored bytes) and the number of input tokens it cost.

Nothing read back is trusted. Redis is shared with other gateways (older or newer versions), possibly with
other programs, and can hand back a truncated or corrupted value; a value is used only if it is in this
gateway's format (``Entry.encode``), intact (its checksum), has finite floats, and has the dimension the
caller expects. Anything else is a miss, logged and counted in ``rejected``: the item goes to the engine and
its fresh value replaces the bad one.
"""

from __future__ import annotations

import logging
import struct
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cachetools import LRUCache, TTLCache

_log = logging.getLogger("gateway.cache")

# The stored form: a 16-byte header, then the vector as little-endian float32.
#   magic "MGE" and a format version: a value of another program or of the gateway before the version
#   (4 bytes of token count first: as a count, "MGE\x01" would be 21 million tokens) is never misread;
#   CRC-32 of everything after it: a value changed in place (bit rot, a partial overwrite) is refused;
#   dimensions, then tokens (uint32 each): a value cut short by whole floats is refused too.
_MAGIC = b"MGE"
_VERSION = 1
_STAMP = struct.Struct("<3sBI")  # magic, version, CRC-32
_COUNTS = struct.Struct("<II")  # dimensions, tokens
# No text one embedding model reads is this long; a count beyond it (read back from a shared Redis, checksum and
# all) would be served as the answer's usage.
MAX_ITEM_TOKENS = 1 << 20
_HEADER_SIZE = _STAMP.size + _COUNTS.size

# What an entry costs in memory beyond its vector's bytes object and its token count's int (both measured per
# entry): the key (a 64-character sha256 hex string, 113 bytes), the Entry (48), and cachetools' bookkeeping
# for one item: slots in its data dict and its size dict, the size's int, the LRU OrderedDict's slot and node,
# and with a TTL a link object, its expiry float and a second OrderedDict. Dicts grow by powers of two and keep
# deleted slots until they resize, so the real cost moves with the entry count and with eviction churn: measured
# with tracemalloc (tests/bench/embedding_cache_memory.py, CPython 3.11, cachetools 8, bounds of 1-16 MiB, full
# and churned), 323-515 bytes (LRU) and 386-555 (TTL). Near the middles, these keep a full cache's real memory
# within 18 % of its bound with 16-dimension vectors and 2 % with 1024 (tests/unit/test_embedding_cache.py
# checks 25 %; RSS, which also counts the allocator's free space, measured 1.12-1.21 times a 64 MiB bound).
_LRU_ENTRY_COST = 420
_TTL_ENTRY_COST = 480


class BadValue(ValueError):
    """A stored value that must not be used; the message says why (it goes to the log)."""


@dataclass(frozen=True, slots=True)
class Entry:
    vector: bytes  # little-endian float32
    tokens: int

    @property
    def dimensions(self) -> int:
        return len(self.vector) // 4

    def encode(self) -> bytes:
        body = _COUNTS.pack(self.dimensions, self.tokens) + self.vector
        return _STAMP.pack(_MAGIC, _VERSION, zlib.crc32(body)) + body

    @classmethod
    def decode(cls, raw: Any) -> Entry:
        """The entry ``encode`` wrote; ``BadValue`` for anything else."""
        if not isinstance(raw, bytes):
            raise BadValue(f"a {type(raw).__name__}, not bytes")
        if len(raw) < _HEADER_SIZE:
            raise BadValue(f"{len(raw)} bytes, shorter than the header")
        magic, version, crc = _STAMP.unpack_from(raw)
        if magic != _MAGIC:
            raise BadValue("not in this gateway's format (an older gateway's or another program's value)")
        if version != _VERSION:
            raise BadValue(f"format version {version}, this gateway reads {_VERSION}")
        dimensions, tokens = _COUNTS.unpack_from(raw, _STAMP.size)
        if dimensions == 0 or len(raw) != _HEADER_SIZE + 4 * dimensions:
            raise BadValue(f"{len(raw)} bytes for {dimensions} dimensions")
        if tokens > MAX_ITEM_TOKENS:
            raise BadValue(f"{tokens} tokens for one item: more than any model's context")
        if zlib.crc32(memoryview(raw)[_STAMP.size :]) != crc:
            raise BadValue("checksum mismatch")
        vector = raw[_HEADER_SIZE:]
        if not _all_finite(vector):
            raise BadValue("non-finite floats")
        return cls(vector, tokens)


def _all_finite(vector: bytes) -> bool:
    import numpy  # imported here: only embeddings requests decode values, chat-only gateways never pay for it

    return bool(numpy.isfinite(numpy.frombuffer(vector, dtype="<f4")).all())


def _storable(entry: Entry) -> bool:
    """Whether ``decode`` would take the entry back: writing one it would refuse only costs a rejection per read."""
    return bool(entry.vector) and len(entry.vector) % 4 == 0 and _all_finite(entry.vector)


def check_dimensions(entry: Entry, expected: int | None) -> int:
    """The entry's dimension, which must be ``expected`` when that is known (``BadValue`` otherwise)."""
    if expected is not None and entry.dimensions != expected:
        raise BadValue(f"{entry.dimensions} dimensions where {expected} are expected")
    return entry.dimensions


def _rejected(where: str, key: str, exc: BadValue) -> None:
    _log.warning(
        "embedding cache: ignored the value of %s in %s (%s); the engine computes it again and it is replaced",
        key,
        where,
        exc,
    )


class Store(Protocol):
    async def get_many(self, keys: Sequence[str], dimensions: int | None = None) -> dict[str, Entry]:
        """The entries found, all of ``dimensions`` floats, or all of one size when that is ``None``."""
        ...

    async def set_many(self, entries: dict[str, Entry]) -> None: ...


def _int_cost(value: int) -> int:
    """The memory of an int held by an entry: CPython shares the small ones, -5 to 256."""
    return 0 if -5 <= value <= 256 else sys.getsizeof(value)


class MemoryStore:
    """An LRU (or TTL when ``ttl`` > 0) cache whose bound is bytes of real memory, not entries.

    Its entries come from the engine or from validated Redis values, so only their dimension can be wrong
    (a Redis value accepted before the engine had said the model's dimension): that is checked on every read.
    """

    def __init__(self, max_bytes: int, *, ttl: float = 0, timer: Callable[[], float] = time.monotonic) -> None:
        self._cache: LRUCache[str, Entry] | TTLCache[str, Entry]
        if ttl > 0:
            self._cache = TTLCache(maxsize=max_bytes, ttl=ttl, timer=timer, getsizeof=self._ttl_size)
        else:
            self._cache = LRUCache(maxsize=max_bytes, getsizeof=self._lru_size)
        self.rejected = 0

    @staticmethod
    def _lru_size(entry: Entry) -> int:
        return sys.getsizeof(entry.vector) + _int_cost(entry.tokens) + _LRU_ENTRY_COST

    @staticmethod
    def _ttl_size(entry: Entry) -> int:
        return sys.getsizeof(entry.vector) + _int_cost(entry.tokens) + _TTL_ENTRY_COST

    @property
    def bytes(self) -> int:
        return int(self._cache.currsize)

    def __len__(self) -> int:
        return len(self._cache)

    async def get_many(self, keys: Sequence[str], dimensions: int | None = None) -> dict[str, Entry]:
        found = {}
        for key in keys:
            entry = self._cache.get(key)
            if entry is None:
                continue
            try:
                dimensions = check_dimensions(entry, dimensions)  # unknown, the first entry found sets it
            except BadValue as exc:
                self.rejected += 1
                _rejected("memory", key, exc)
                self._cache.pop(key, None)
                continue
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

    def __init__(
        self,
        url: str,
        *,
        ttl: float = 0,
        prefix: str = "mistral-gateway:emb:",
        timeout: float = 0.5,
        retry_after: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        client: Any = None,
    ) -> None:
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
        self.rejected = 0

    @property
    def available(self) -> bool:
        return self._clock() >= self._down_until

    def _failed(self, action: str, exc: Exception) -> None:
        self.errors += 1
        self._down_until = self._clock() + self._retry_after
        _log.warning(
            "redis cache %s failed (%s: %s); skipping it for %.0f s", action, type(exc).__name__, exc, self._retry_after
        )

    async def get_many(self, keys: Sequence[str], dimensions: int | None = None) -> dict[str, Entry]:
        if not keys or not self.available:
            return {}
        try:
            values = await self._client.mget([self._prefix + k for k in keys])
        except Exception as exc:  # redis errors, OSError, timeouts: the cache is optional
            self._failed("read", exc)
            return {}
        found = {}
        for key, raw in zip(keys, values, strict=True):
            if raw is None:
                continue
            try:
                entry = Entry.decode(raw)
                dimensions = check_dimensions(entry, dimensions)  # unknown, the first value found sets it
            except BadValue as exc:
                self.rejected += 1
                _rejected("redis", self._prefix + key, exc)
                continue
            found[key] = entry
        return found

    async def set_many(self, entries: dict[str, Entry]) -> None:
        entries = {k: e for k, e in entries.items() if _storable(e)}
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

"""Embeddings with a per-item cache.

A request's input is split into items; items already cached are answered from the cache, and only the
missing ones go to the engine, in one request, de-duplicated within the request and across concurrent
requests (a key being computed for one request is awaited by the others, not sent twice). The answer is
merged back in the original order. ``dimensions`` is applied here (Matryoshka truncation and
re-normalisation for models trained for it), since the engine rejects it; ``encoding_format`` too.

A cached vector is used only if it has the dimension the request expects: ``dimensions`` when given,
otherwise the model's own dimension, as the engine last answered it for this model (or, until the engine has
answered in this process, as the first cached vector of the model found says; the engine's answer overrides
it). A vector of another dimension is a miss: computed again and replaced in the cache.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from ..catalog import Model
from ..engine.launcher import Endpoint
from ..errors import EngineError, InvalidRequest, UnsupportedForModel
from ..upstream.relay import Relay
from .keys import Item, item_key, model_identity
from .store import Entry, MemoryStore, RedisStore

_LITTLE = sys.byteorder == "little"


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    engine_requests: int = 0


def split_items(value: Any) -> list[Item]:
    """The items of an ``input``: a string and a one-item list holding it are the same single item."""
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(v, int) for v in value):
        return [list(value)]
    return list(value)


def supports_matryoshka(model: Model) -> bool:
    """Qwen3-Embedding is trained for truncation; other models only when the models file says so."""
    explicit = model.entry.options.matryoshka
    if explicit is not None:
        return explicit
    names = f"{model.id} {model.source.model_id} {model.entry.options.arch or ''}".lower()
    return model.kind == "embedding" and "qwen3" in names


def _np() -> Any:
    """numpy, imported at the first embeddings request: a gateway that serves only chat never pays its memory."""
    import numpy

    return numpy


def _to_entry(values: Any, tokens: int) -> Entry:
    vector = _np().asarray(values, dtype="<f4")
    return Entry(vector.tobytes(), tokens)


def _apportion(total: int, items: list[Item]) -> list[int]:
    """Split a batch's token count over its items by length, the sum kept exact (the engine reports
    only the batch total; a lone item gets its count exactly)."""
    weights = [max(1, len(item)) for item in items]
    whole = sum(weights)
    shares = [total * w // whole for w in weights]
    for i in range(total - sum(shares)):
        shares[i % len(shares)] += 1
    return shares


class Embeddings:
    """The embeddings route's logic: cache lookups, engine calls for the misses, the OpenAI answer."""

    def __init__(self, relay: Relay, memory: MemoryStore, shared: RedisStore | None = None) -> None:
        self._relay = relay
        self._memory = memory
        self._shared = shared
        self._inflight: dict[str, asyncio.Future[Entry]] = {}
        # Per model id: its identity (see cache.keys) and the dimension of its vectors; one per model, so an
        # identity that changes replaces the old one.
        self._widths: dict[str, tuple[str, int]] = {}
        self.stats = CacheStats()

    @property
    def memory(self) -> MemoryStore:
        return self._memory

    @property
    def shared(self) -> RedisStore | None:
        return self._shared

    @property
    def rejected(self) -> int:
        """Cached values refused (not this gateway's format, damaged, wrong dimension), in memory and Redis:
        each was a miss, computed again and replaced."""
        return self._memory.rejected + (self._shared.rejected if self._shared is not None else 0)

    def status(self) -> dict[str, Any]:
        """For ``/status`` and the metrics."""
        shared = self._shared
        return {
            "hits": self.stats.hits,
            "misses": self.stats.misses,
            "engine_requests": self.stats.engine_requests,
            "entries": len(self._memory),
            "bytes": self._memory.bytes,
            "rejected": self.rejected,
            "redis": None
            if shared is None
            else {"available": shared.available, "errors": shared.errors, "rejected": shared.rejected},
        }

    def _width(self, model: Model, identity: str) -> int | None:
        known = self._widths.get(model.id)
        return known[1] if known is not None and known[0] == identity else None

    def _learn_width(self, model: Model, identity: str, width: int, *, from_engine: bool) -> None:
        """The engine's answer is the truth; a cached vector only stands in for it until the engine answers."""
        if from_engine or self._width(model, identity) is None:
            self._widths[model.id] = (identity, width)

    async def handle(
        self,
        body: dict[str, Any],
        model: Model,
        endpoint: Callable[[], Awaitable[Endpoint]],
        *,
        cache_control: str | None = None,
    ) -> tuple[bytes, str]:
        """The answer's JSON and its ``X-Cache`` value (hit, miss or partial)."""
        dimensions = body.get("dimensions")
        if dimensions is not None:
            if isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1:
                raise InvalidRequest(
                    "'dimensions' must be a positive integer.", param="dimensions", code="invalid_value"
                )
            if not supports_matryoshka(model):
                raise UnsupportedForModel(
                    f"The model '{model.id}' does not support 'dimensions': it is not trained for truncated "
                    "(Matryoshka) embeddings. Leave 'dimensions' out, or set `matryoshka = true` in its "
                    "[models.options] if it is.",
                    param="dimensions",
                )
        directives = {d.strip().lower() for d in (cache_control or "").split(",")}
        read = not directives & {"no-cache", "no-store"}
        write = "no-store" not in directives

        items = split_items(body["input"])
        identity = model_identity(model)
        keys = [item_key(identity, item, dimensions) for item in items]
        unique = list(dict.fromkeys(keys))
        found: dict[str, Entry] = {}
        if read:
            found = await self._lookup(unique, dimensions or self._width(model, identity))
            if found and dimensions is None:
                self._learn_width(model, identity, next(iter(found.values())).dimensions, from_engine=False)
        hits = sum(1 for k in keys if k in found)
        wanted = {k: items[keys.index(k)] for k in unique if k not in found}
        if wanted:
            computed = await self._compute(wanted, model, endpoint, body, dimensions, share=read, store=write)
            if dimensions is None:
                self._learn_width(model, identity, next(iter(computed.values())).dimensions, from_engine=True)
            found.update(computed)
        self.stats.hits += hits
        self.stats.misses += len(keys) - hits
        status = "hit" if hits == len(keys) else "miss" if hits == 0 else "partial"
        return self._answer(body, model, [found[k] for k in keys]), status

    async def _lookup(self, keys: list[str], width: int | None) -> dict[str, Entry]:
        """The cached entries of ``keys``, all of ``width`` floats (all of one width when it is unknown)."""
        found = await self._memory.get_many(keys, width)
        if width is None and found:
            width = next(iter(found.values())).dimensions
        missing = [k for k in keys if k not in found]
        if missing and self._shared is not None:
            remote = await self._shared.get_many(missing, width)
            if remote:
                await self._memory.set_many(remote)
                found.update(remote)
        return found

    async def _compute(
        self,
        wanted: dict[str, Item],
        model: Model,
        endpoint: Callable[[], Awaitable[Endpoint]],
        body: dict[str, Any],
        dimensions: int | None,
        *,
        share: bool,
        store: bool,
    ) -> dict[str, Entry]:
        results: dict[str, Entry] = {}
        waiting: dict[str, asyncio.Future[Entry]] = {}
        mine: dict[str, Item] = {}
        for key, item in wanted.items():
            if share and key in self._inflight:
                waiting[key] = self._inflight[key]
            else:
                mine[key] = item
        if mine:
            loop = asyncio.get_running_loop()
            futures = {key: loop.create_future() for key in mine}
            if share:
                self._inflight.update(futures)
            # Shielded: a client that goes away must not cancel what other requests are waiting for.
            task = asyncio.ensure_future(self._fetch(mine, futures, model, endpoint, body, dimensions, store))
            await asyncio.shield(task)
            results.update({key: fut.result() for key, fut in futures.items()})
        for key, fut in waiting.items():
            results[key] = await asyncio.shield(fut)
        return results

    async def _fetch(
        self,
        mine: dict[str, Item],
        futures: dict[str, asyncio.Future[Entry]],
        model: Model,
        endpoint: Callable[[], Awaitable[Endpoint]],
        body: dict[str, Any],
        dimensions: int | None,
        store: bool,
    ) -> None:
        try:
            entries = await self._call_engine(list(mine.values()), model, endpoint, body, dimensions)
            computed = dict(zip(mine, entries, strict=True))
            if store:
                await self._memory.set_many(computed)
                if self._shared is not None:
                    await self._shared.set_many(computed)
            for key, fut in futures.items():
                fut.set_result(computed[key])
        except BaseException as exc:
            for fut in futures.values():
                if not fut.done():
                    fut.set_exception(exc)
            for fut in futures.values():
                fut.exception()  # retrieved here, so a future nobody else awaited logs no warning
            raise
        finally:
            for key, fut in futures.items():
                if self._inflight.get(key) is fut:
                    del self._inflight[key]

    async def _call_engine(
        self,
        items: list[Item],
        model: Model,
        endpoint: Callable[[], Awaitable[Endpoint]],
        body: dict[str, Any],
        dimensions: int | None,
    ) -> list[Entry]:
        target = await endpoint()
        extra = {k: v for k, v in body.items() if k not in ("model", "input", "dimensions", "encoding_format")}
        # The stdlib encoder: unknown fields pass through as sent, whatever they hold (orjson refuses
        # integers beyond 64 bits, a client's mistake that must reach the engine, not crash the gateway).
        payload = json.dumps(
            {**extra, "model": target.engine_id(model.id), "input": items, "encoding_format": "float"},
            separators=(",", ":"),
        ).encode()
        self.stats.engine_requests += 1
        reply = await self._relay.request(target.base_url, "/v1/embeddings", payload)
        try:
            answer = orjson.loads(reply.content)
            data = sorted(answer["data"], key=lambda d: d["index"])
            vectors = [d["embedding"] for d in data]
            tokens = int((answer.get("usage") or {}).get("prompt_tokens") or 0)
        except (ValueError, KeyError, TypeError) as exc:
            raise EngineError("The engine's embeddings answer could not be read.", status=502) from exc
        if len(vectors) != len(items):
            raise EngineError(f"The engine returned {len(vectors)} embeddings for {len(items)} inputs.", status=502)
        np = _np()
        entries = []
        for values, share in zip(vectors, _apportion(tokens, items), strict=True):
            if isinstance(values, str):  # an engine that answered base64 anyway
                array = np.frombuffer(base64.b64decode(values), dtype="<f4")
            else:
                array = np.asarray(values, dtype="<f4")
            if dimensions is not None:
                if dimensions > array.size:
                    raise InvalidRequest(
                        f"'dimensions' is {dimensions}, but the model '{model.id}' makes {array.size}-dimensional "
                        "vectors.",
                        param="dimensions",
                        code="invalid_value",
                    )
                array = array[:dimensions]
                norm = float(np.linalg.norm(array))
                if norm > 0:
                    array = array / norm
            entries.append(_to_entry(array, share))
        return entries

    def _answer(self, body: dict[str, Any], model: Model, entries: list[Entry]) -> bytes:
        b64 = body.get("encoding_format") == "base64"
        np = _np()
        data = []
        for index, entry in enumerate(entries):
            if b64:
                embedding: Any = base64.b64encode(entry.vector).decode()
            else:
                embedding = np.frombuffer(entry.vector, dtype="<f4")
                if not _LITTLE:
                    embedding = embedding.astype(np.float32)
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = sum(e.tokens for e in entries)
        answer = {
            "object": "list",
            "data": data,
            "model": model.id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)

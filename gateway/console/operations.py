"""The operator's API, which the console page and the command line (``mistral-gateway engine|models``) read and act
through: ``/status``, ``/events``, and the actions on engines (``/admin/engine/*``, ``/admin/models/*``). Guarded by
the admin key (gateway/http/auth.py)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from ..cache.embeddings import Embeddings
from ..catalog import Catalog, Model
from ..engine.pool import EnginePool
from ..errors import ModelNotFound
from ..events import SSE_HEADERS, EventBus
from ..fleet.peers import Peers


class Operations:
    def __init__(
        self,
        catalog: Catalog,
        pool: EnginePool,
        embeddings: Embeddings,
        events: EventBus,
        *,
        peers: Peers | None = None,
    ) -> None:
        self._catalog = catalog
        self._peers = peers
        self._pool = pool
        self._embeddings = embeddings
        self._events = events

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/status", self.status, methods=["GET"]),
            Route("/events", self.event_stream, methods=["GET"]),
            Route("/admin/engine/start", self.start_all, methods=["POST"]),
            Route("/admin/engine/stop", self.stop_all, methods=["POST"]),
            Route("/admin/models/{model:path}/load", self.load, methods=["POST"]),
            Route("/admin/models/{model:path}/unload", self.unload, methods=["POST"]),
        ]

    async def start_all(self, request: Request) -> Response:
        """Preload: start every engine now rather than at the first request (an exclusive group's first member)."""
        await self._pool.start_all()
        return JSONResponse(self._pool.status())

    async def stop_all(self, request: Request) -> Response:
        """Stop every engine now (each starts again at the next request that needs it)."""
        await self._pool.stop_all("admin request")
        return JSONResponse(self._pool.status())

    def _model(self, request: Request) -> Model:
        name = request.path_params["model"]
        model = self._catalog.find(name)
        if model is None:
            raise ModelNotFound(
                f"The model '{name}' does not exist. Available models: "
                f"{', '.join(m.id for m in self._catalog.models)}.",
                param="model",
            )
        return model

    async def load(self, request: Request) -> Response:
        """Start the engine of one model now (making room under the memory budget if it must)."""
        model = self._model(request)
        await self._pool.load(model.id)
        return JSONResponse({"model": model.id, **self._pool.model_status(model.id)})

    async def unload(self, request: Request) -> Response:
        """Stop the engine of one model now, whatever it is doing (it starts again at its next request)."""
        model = self._model(request)
        await self._pool.unload(model.id)
        return JSONResponse({"model": model.id, **self._pool.model_status(model.id)})

    async def event_stream(self, request: Request) -> Response:
        """Lifecycle events as Server-Sent Events: the recent history, then live ones."""

        async def stream() -> AsyncIterator[bytes]:
            async with contextlib.aclosing(self._events.subscribe()) as events:
                async for event in events:
                    yield f"event: {event.type}\ndata: {event.to_json()}\n\n".encode()

        return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)

    async def status(self, request: Request) -> Response:
        await self._pool.refresh()
        pool = self._pool.status()
        models: list[dict[str, Any]] = [
            {
                "id": m.id,
                "kind": m.kind,
                "aliases": list(m.entry.aliases),
                "engine_id": m.engine_id,
                "source": m.source.model_id + (f"/{m.source.filename}" if m.source.filename else ""),
                **self._pool.model_status(m.id),
            }
            for m in self._catalog.models
        ]
        return JSONResponse(
            {
                "engines": pool["engines"],
                "budget": pool["budget"],
                "models": models,
                "embedding_cache": self._embeddings.status(),
                "downloads": self._events.summary()["downloads"],
                "default_model": self._catalog.default_model,
                "default_embedding_model": self._catalog.default_embedding_model,
                "models_file": self._catalog.origin,
                "fleet": self._peers.status() if self._peers is not None else None,
            }
        )

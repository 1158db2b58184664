"""The route table and its thin handlers: validate, pick the model, call the relay.

A model request reads top to bottom: body -> model -> ``pool.lease(model)`` -> ``pool.ensure_ready(model, lease)``
-> relay -> answer -> ``lease.release()``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from ...cache.embeddings import Embeddings
from ...catalog import CHAT_KINDS, Catalog, Model
from ...chat import checks
from ...chat import fields as validation
from ...chat.plans import plan_chat, plan_completion
from ...engine.launcher import Endpoint
from ...engine.lifecycle import Lease
from ...errors import (
    GatewayError,
    ModelNotFound,
    NotImplementedByGateway,
    RouteNotFound,
)
from ...events import EventBus
from ...http.openapi import openapi_document
from ...http.proxies import PublicOrigin
from ...serving.intake import Intake
from ...serving.intake import keep_alive as intake_keep_alive
from ...serving.relay import ModelRename, error_event
from ...serving.service import SSE_HEADERS, ChatDialect, ModelService, OpenAIChat, Opener
from ...settings import Settings
from . import images, responses

_Encoder = Callable[[Endpoint], tuple[bytes, ModelRename]]
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
OPENAI = OpenAIChat()


@dataclass(frozen=True)
class ModelRoute:
    path: str
    kinds: frozenset[str]
    validate: validation.Validator
    streams: bool = True


MODEL_ROUTES = (
    ModelRoute("/v1/chat/completions", CHAT_KINDS, checks.chat),
    ModelRoute("/v1/completions", CHAT_KINDS, checks.completion),
    ModelRoute("/v1/responses", CHAT_KINDS, responses.check),
    ModelRoute("/v1/embeddings", frozenset({"embedding"}), validation.embedding, streams=False),
    ModelRoute("/v1/images/generations", frozenset({"diffusion"}), validation.image, streams=False),
    ModelRoute("/v1/audio/speech", frozenset({"speech"}), validation.speech, streams=False),
)


class Api:
    """Handlers bound to the gateway's parts."""

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        intake: Intake,
        service: ModelService,
        image_store: images.ImageStore,
        embeddings: Embeddings,
        events: EventBus,
    ) -> None:
        self._settings = settings
        self._catalog = catalog
        self._intake = intake
        self._service = service
        self._pool = service.pool
        self._relay = service.relay
        self._images = image_store
        self._embeddings = embeddings
        self._events = events
        self._origin = PublicOrigin(settings.public_url, host=settings.host, port=settings.port)
        self._created = int(time.time())

    def routes(self) -> list[BaseRoute]:
        routes: list[BaseRoute] = [Route(r.path, self._model_endpoint(r), methods=["POST"]) for r in MODEL_ROUTES]
        routes += [
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.get_model, methods=["GET"]),
            Route("/images/{name}", self.get_image, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
            Route("/status", self.status, methods=["GET"]),
            Route("/openapi.json", self.openapi, methods=["GET"]),
            Route("/events", self.event_stream, methods=["GET"]),
            Route("/admin/engine/start", self.admin_start, methods=["POST"]),
            Route("/admin/engine/stop", self.admin_stop, methods=["POST"]),
            Route("/admin/models/{model:path}/load", self.admin_load, methods=["POST"]),
            Route("/admin/models/{model:path}/unload", self.admin_unload, methods=["POST"]),
        ]
        for prefix in ("/v1/moderations", "/v1/files"):
            routes += [
                Route(prefix, self.not_implemented, methods=ALL_METHODS),
                Route(prefix + "/{rest:path}", self.not_implemented, methods=ALL_METHODS),
            ]
        return routes

    def start_draining(self) -> None:
        self._service.start_draining()

    # ------------------------------------------------------------------------------ model routes

    def _model_endpoint(self, route: ModelRoute) -> Callable[[Request], Awaitable[Response]]:
        # The router keeps the model routes so that another method on them answers 405; their POSTs are taken by
        # ModelRouteDispatch (app.py) before the router sees them, so this runs only in an app built without it.
        async def endpoint(request: Request) -> Response:
            return await self.handle(request, route)

        endpoint.__name__ = "relay_" + route.path.strip("/").replace("/", "_")
        return endpoint

    async def handle(self, request: Request, route: ModelRoute) -> Response:
        """A request to a model route: validate, pick the model, lease the engine, relay."""
        raw = await self._intake.read(request)
        body = validation.parse_json_body(raw, request.headers.get("content-type"))
        route.validate(body)
        model = self._intake.model(body.get("model"), route.kinds, route.path)
        request.state.model = model.id  # for the request log and metrics

        edited = "keep_alive" in body  # taken out of the body: the engine does not know it
        keep_alive = intake_keep_alive(body, request)
        thinking = self._catalog.engine.enable_thinking
        if thinking is not None and route.path == "/v1/chat/completions" and "enable_thinking" not in body:
            # [engine] enable_thinking, applied per request: the HTTP servers of both engine CLIs ignore the
            # command-line flag (it only reaches their interactive mode), but honour the request field.
            body["enable_thinking"] = thinking
            edited = True
        wanted_image = None
        if route.path == "/v1/images/generations":
            wanted_image = images.to_engine_request(body)
            edited = True

        def encode(endpoint: Endpoint) -> tuple[bytes, ModelRename]:
            # The body passes through untouched unless something in it must change.
            engine_id = endpoint.engine_ids.get(model.id, model.id)
            if edited or body.get("model") != engine_id:
                body["model"] = engine_id
                return json.dumps(body, separators=(",", ":")).encode(), ModelRename.of(engine_id, model.id)
            return raw, ModelRename.of(engine_id, model.id)

        lease = self._service.lease(model.id)
        if route.path == "/v1/embeddings":
            return await self._service.whole(
                request, lease, keep_alive, lambda: self._embed(request, body, model, lease)
            )
        if route.path in ("/v1/chat/completions", "/v1/completions", "/v1/responses"):
            return await self._openai(request, route, body, model, lease, keep_alive)
        if route.streams and body.get("stream") is True:
            return await self._service.stream(
                model.id, self._relay_opener(route.path, encode), error_event, lease, keep_alive
            )
        path = route.path
        forward = functools.partial(self._forward, request, model, lease, path, encode, wanted_image)
        return await self._service.whole(request, lease, keep_alive, forward)

    async def _openai(
        self,
        request: Request,
        route: ModelRoute,
        body: dict[str, Any],
        model: Model,
        lease: Lease,
        keep_alive: float | None,
    ) -> Response:
        """Chat, completions and responses: the plan of engine requests, then one answer or one stream, made
        OpenAI's (chat completions and completions) or the Responses API's."""
        dialect: ChatDialect = OPENAI
        try:
            if route.path == "/v1/completions":
                plan = plan_completion(body, model.id)
            else:
                if route.path == "/v1/responses":
                    responses_dialect = responses.Dialect(body, model.id)
                    body, dialect = responses_dialect.chat, responses_dialect
                plan = plan_chat(body, model.id, takes_images=model.kind == "vision-plain")
        except BaseException:
            lease.release(keep_alive)
            raise
        return await self._service.chat(request, model.id, plan, dialect, lease, keep_alive)

    def _relay_opener(self, path: str, encode: _Encoder) -> Opener:
        """A stream relayed as the engine sends it (the routes that are not OpenAI's chat family)."""

        async def open_(endpoint: Endpoint) -> AsyncIterator[bytes]:
            payload, rename = encode(endpoint)
            upstream = await self._relay.open_stream(endpoint.base_url, path, payload)

            async def relayed() -> AsyncIterator[bytes]:
                try:
                    async for block in self._relay.events(upstream, endpoint.base_url):
                        yield rename(block)
                except GatewayError as exc:
                    yield error_event(exc)

            return relayed()

        return open_

    async def _embed(self, request: Request, body: dict[str, Any], model: Model, lease: Lease) -> Response:
        # The engine is started only when some item is not cached: a warm cache answers with it stopped.
        content, cache = await self._embeddings.handle(
            body,
            model,
            functools.partial(self._pool.ensure_ready, model.id, lease),
            cache_control=request.headers.get("cache-control"),
        )
        return Response(content, media_type="application/json", headers={"x-cache": cache})

    async def _forward(
        self, request: Request, model: Model, lease: Lease, path: str, encode: _Encoder, wanted_image: str | None
    ) -> Response:
        endpoint = await self._pool.ensure_ready(model.id, lease)
        payload, rename = encode(endpoint)
        reply = await self._relay.request(endpoint.base_url, path, payload)
        if wanted_image is not None:
            answer = images.from_engine_reply(
                json.loads(reply.content), wanted_image, self._images, self._origin.of(request.scope)
            )
            return Response(rename(json.dumps(answer).encode()), media_type="application/json")
        return Response(rename(reply.content), status_code=reply.status, media_type=reply.content_type)

    # ------------------------------------------------------------------------------ other routes

    def _model_card(self, model: Model, name: str) -> dict[str, Any]:
        card: dict[str, Any] = {
            "id": name,
            "object": "model",
            "created": self._created,
            "owned_by": "mistral-gateway",
            "kind": model.kind,
            **self._pool.model_status(model.id),  # its engine's state, seconds until its idle stop, memory
        }
        if name != model.id:
            card["alias_of"] = model.id
        else:
            card["aliases"] = list(model.entry.aliases)
        return card

    def _anthropic_card(self, model: Model, name: str) -> dict[str, Any]:
        """A model as Anthropic's Models API lists it (its SDKs, Claude Code's model picker)."""
        created = datetime.fromtimestamp(self._created, tz=timezone.utc).isoformat().replace("+00:00", "Z")
        return {"type": "model", "id": name, "display_name": name, "created_at": created}

    async def list_models(self, request: Request) -> Response:
        anthropic = "anthropic-version" in request.headers  # the header every Anthropic client sends
        card = self._anthropic_card if anthropic else self._model_card
        data = [card(model, name) for model in self._catalog.models for name in (model.id, *model.entry.aliases)]
        if anthropic:
            first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
            return JSONResponse({"data": data, "has_more": False, "first_id": first, "last_id": last})
        return JSONResponse({"object": "list", "data": data})

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["model"]
        model = self._catalog.find(name)
        if model is None:
            raise ModelNotFound(f"The model '{name}' does not exist.", param="model")
        card = self._anthropic_card if "anthropic-version" in request.headers else self._model_card
        return JSONResponse(card(model, name))

    async def get_image(self, request: Request) -> Response:
        path = self._images.path_of(request.path_params["name"])
        if path is None:
            raise RouteNotFound("No such image: it may have expired.", code="image_not_found")
        return FileResponse(path, media_type="image/png")

    async def not_implemented(self, request: Request) -> Response:
        what = "/v1/" + request.url.path.split("/")[2]
        raise NotImplementedByGateway(
            f"{what} is not supported: the mistral.rs engine behind this gateway does not provide it."
        )

    async def admin_start(self, request: Request) -> Response:
        """Preload: start every engine now rather than at the first request (an exclusive group's first member)."""
        await self._pool.start_all()
        return JSONResponse(self._pool.status())

    async def admin_stop(self, request: Request) -> Response:
        """Stop every engine now (each starts again at the next request that needs it)."""
        await self._pool.stop_all("admin request")
        return JSONResponse(self._pool.status())

    def _admin_model(self, request: Request) -> Model:
        name = request.path_params["model"]
        model = self._catalog.find(name)
        if model is None:
            raise ModelNotFound(
                f"The model '{name}' does not exist. Available models: "
                f"{', '.join(m.id for m in self._catalog.models)}.",
                param="model",
            )
        return model

    async def admin_load(self, request: Request) -> Response:
        """Start the engine of one model now (making room under the memory budget if it must)."""
        model = self._admin_model(request)
        await self._pool.load(model.id)
        return JSONResponse({"model": model.id, **self._pool.model_status(model.id)})

    async def admin_unload(self, request: Request) -> Response:
        """Stop the engine of one model now, whatever it is doing (it starts again at its next request)."""
        model = self._admin_model(request)
        await self._pool.unload(model.id)
        return JSONResponse({"model": model.id, **self._pool.model_status(model.id)})

    async def event_stream(self, request: Request) -> Response:
        """Lifecycle events as Server-Sent Events: the recent history, then live ones."""

        async def stream() -> AsyncIterator[bytes]:
            async with contextlib.aclosing(self._events.subscribe()) as events:
                async for event in events:
                    yield f"event: {event.type}\ndata: {event.to_json()}\n\n".encode()

        return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document(self._catalog))

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        if self._service.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        engines = self._pool.status()["engines"]
        # Not ready only when no engine can serve: one broken model must not take the whole gateway out of a
        # load balancer while the others work.
        if engines and all(e["state"] == "failed" and e["retry_in"] for e in engines):
            errors = {e["name"]: e["last_error"] for e in engines}
            return JSONResponse({"status": "engines failing", "errors": errors}, status_code=503)
        return JSONResponse({"status": "ready", "engines": {e["name"]: e["state"] for e in engines}})

    def cache_status(self) -> dict[str, Any]:
        stats = self._embeddings.stats
        shared = self._embeddings.shared
        return {
            "hits": stats.hits,
            "misses": stats.misses,
            "engine_requests": stats.engine_requests,
            "entries": len(self._embeddings.memory),
            "bytes": self._embeddings.memory.bytes,
            "rejected": self._embeddings.rejected,
            "redis": None
            if shared is None
            else {"available": shared.available, "errors": shared.errors, "rejected": shared.rejected},
        }

    async def status(self, request: Request) -> Response:
        await self._pool.refresh()
        pool = self._pool.status()
        return JSONResponse(
            {
                "engines": pool["engines"],
                "budget": pool["budget"],
                "models": [
                    {
                        "id": m.id,
                        "kind": m.kind,
                        "aliases": list(m.entry.aliases),
                        "engine_id": m.engine_id,
                        "source": m.source.model_id + (f"/{m.source.filename}" if m.source.filename else ""),
                        **self._pool.model_status(m.id),
                    }
                    for m in self._catalog.models
                ],
                "embedding_cache": self.cache_status(),
                "downloads": self._events.summary()["downloads"],
                "default_model": self._catalog.default_model,
                "default_embedding_model": self._catalog.default_embedding_model,
                "models_file": self._catalog.origin,
            }
        )

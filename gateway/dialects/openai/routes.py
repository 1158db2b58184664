"""OpenAI's routes: the model routes, the model listings, and the routes the engine has no feature for.

A model route only translates: body -> checks -> model -> keep-alive -> a :class:`~gateway.serving.calls.ModelCall`,
which serving answers (gateway/serving/service.py). :data:`MODEL_ROUTES` is the table of them: each path with the
kinds of model it serves, its checks (done before any engine starts) and the call it makes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Scope

from ...catalog import CHAT_KINDS, Catalog, Model
from ...chat import checks
from ...chat.fields import Validator
from ...chat.plans import plan_chat, plan_completion
from ...engine.pool import EnginePool
from ...errors import ModelNotFound, NotImplementedByGateway, RouteNotFound
from ...serving.calls import ChatWork, EmbeddingWork, ModelCall, RelayWork
from ...serving.intake import Intake, keep_alive, scoped_name
from ...serving.service import Serving
from ...upstream.relay import Reply
from . import images, responses
from .chat import OPENAI
from .checks import embedding, image, speech

ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


@dataclass(frozen=True)
class Incoming:
    """A model request as read: its request, the body as sent and as parsed, its model and keep-alive."""

    request: Request
    raw: bytes
    body: dict[str, Any]
    model: Model
    keep_alive: float | None
    edited: bool  # the body lost a field the engine does not know (keep_alive): ``raw`` is not what to send


@dataclass(frozen=True)
class ModelRoute:
    path: str
    kinds: frozenset[str]
    check: Validator
    call: Callable[[OpenAIRoutes, Incoming], ModelCall]


class OpenAIRoutes:
    """OpenAI's routes, bound to the gateway's parts."""

    def __init__(
        self,
        catalog: Catalog,
        intake: Intake,
        serving: Serving,
        image_store: images.ImageStore,
        origin: Callable[[Scope], str],
    ) -> None:
        """``origin``: the ``scheme://host[:port]`` of the URLs handed to a client, for its request (the HTTP edge
        knows it: gateway/http/proxies.py ``PublicOrigin``)."""
        self._catalog = catalog
        self._intake = intake
        self._serving = serving
        self._pool: EnginePool = serving.pool
        self._images = image_store
        self._origin = origin
        self._created = int(time.time())

    def routes(self) -> list[BaseRoute]:
        routes: list[BaseRoute] = [Route(r.path, self._endpoint(r), methods=["POST"]) for r in MODEL_ROUTES]
        routes += [
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.get_model, methods=["GET"]),
            Route("/images/{name}", self.get_image, methods=["GET"]),
        ]
        for prefix in ("/v1/moderations", "/v1/files"):
            routes += [
                Route(prefix, self.not_implemented, methods=ALL_METHODS),
                Route(prefix + "/{rest:path}", self.not_implemented, methods=ALL_METHODS),
            ]
        return routes

    # ------------------------------------------------------------------------------ model routes

    def _endpoint(self, route: ModelRoute) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            raw = await self._intake.read(request)
            body = self._intake.parse(raw, request)
            route.check(body)
            model = self._intake.model(request, body.get("model"), route.kinds)
            edited = "keep_alive" in body
            keep = keep_alive(body, request)  # taken out of the body: the engine does not know it
            return self._serving.serve(route.call(self, Incoming(request, raw, body, model, keep, edited)))

        endpoint.__name__ = "model_route_" + route.path.strip("/").replace("/", "_")
        return endpoint

    def chat(self, incoming: Incoming) -> ModelCall:
        body, model = incoming.body, incoming.model
        thinking = self._catalog.engine.enable_thinking
        if thinking is not None and "enable_thinking" not in body:
            # [engine] enable_thinking, applied per request: the HTTP servers of both engine CLIs ignore the
            # command-line flag (it only reaches their interactive mode), but honour the request field.
            body["enable_thinking"] = thinking
        plan = plan_chat(body, model.id, takes_images=model.kind == "vision-plain")
        return ModelCall(model, incoming.keep_alive, ChatWork(plan, OPENAI))

    def completion(self, incoming: Incoming) -> ModelCall:
        plan = plan_completion(incoming.body, incoming.model.id)
        return ModelCall(incoming.model, incoming.keep_alive, ChatWork(plan, OPENAI))

    def response(self, incoming: Incoming) -> ModelCall:
        model = incoming.model
        dialect = responses.Dialect(incoming.body, model.id)
        plan = plan_chat(dialect.chat, model.id, takes_images=model.kind == "vision-plain")
        return ModelCall(model, incoming.keep_alive, ChatWork(plan, dialect))

    def embedding(self, incoming: Incoming) -> ModelCall:
        def write(content: bytes, cache: str) -> Response:
            return Response(content, media_type="application/json", headers={"x-cache": cache})

        work = EmbeddingWork(incoming.body, incoming.request.headers.get("cache-control"), write)
        return ModelCall(incoming.model, incoming.keep_alive, work)

    def image(self, incoming: Incoming) -> ModelCall:
        wanted = images.to_engine_request(incoming.body)
        origin = self._origin(incoming.request.scope)

        def write(reply: Reply) -> Response:
            answer = images.from_engine_reply(json.loads(reply.content), wanted, self._images, origin)
            return Response(orjson.dumps(answer), media_type="application/json")

        work = RelayWork("/v1/images/generations", incoming.body, incoming.raw, edited=True, write=write)
        return ModelCall(incoming.model, incoming.keep_alive, work)

    def speech(self, incoming: Incoming) -> ModelCall:
        work = RelayWork("/v1/audio/speech", incoming.body, incoming.raw, edited=incoming.edited)
        return ModelCall(incoming.model, incoming.keep_alive, work)

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
        created = datetime.fromtimestamp(self._created, tz=UTC).isoformat().replace("+00:00", "Z")
        return {"type": "model", "id": name, "display_name": name, "created_at": created}

    async def list_models(self, request: Request) -> Response:
        anthropic = "anthropic-version" in request.headers  # the header every Anthropic client sends
        card = self._anthropic_card if anthropic else self._model_card
        data = [card(model, name) for model in self._catalog.models for name in (model.id, *model.entry.aliases)]
        scoped = scoped_name(request.scope)
        if scoped is not None:  # under /m/<model>/: the node as a server of that model alone (a router asks so)
            data = [entry for entry in data if entry["id"] == scoped]
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


MODEL_ROUTES = (
    ModelRoute("/v1/chat/completions", CHAT_KINDS, checks.chat, OpenAIRoutes.chat),
    ModelRoute("/v1/completions", CHAT_KINDS, checks.completion, OpenAIRoutes.completion),
    ModelRoute("/v1/responses", CHAT_KINDS, responses.check, OpenAIRoutes.response),
    ModelRoute("/v1/embeddings", frozenset({"embedding"}), embedding, OpenAIRoutes.embedding),
    ModelRoute("/v1/images/generations", frozenset({"diffusion"}), image, OpenAIRoutes.image),
    ModelRoute("/v1/audio/speech", frozenset({"speech"}), speech, OpenAIRoutes.speech),
)

"""The node protocol: what the routers that spread requests over several model servers ask each one of them.

vllm-router, sglang's router and their kin were written for servers of one model (vLLM, SGLang). A gateway serves
several, so each question has a node-wide answer, and one per model under ``/m/<model>/`` (:class:`ModelScope`):

- ``GET /health``: 200 while the node can serve, 503 from SIGTERM on and while no engine can start (the readiness
  of gateway/http/health.py); ``/m/<model>/health`` asks about that model's engine only. It reads flags and
  counters: routers poll it, and it never starts an engine.
- ``GET /get_load``: requests at the node, running and waiting (for an engine to start, for room, behind a swap),
  by model. vllm-router's load-aware policy reads a top-level integer ``load`` from a JSON *object*; sglang's newer
  routers read a *list* of ``{"dp_rank", "num_tokens", ...}``, one per data-parallel rank of one model, and fall back
  to their own counts for anything else. One document cannot be both, and the list's unit (KV-cache tokens of one
  engine) has no meaning for a node of several engines, so this is the object: ``{"load", "running", "waiting",
  "node", "models": {id: {...}}}``. Its ``load`` counts requests (running + waiting), which is what the router
  compares between nodes. ``serving`` is false from SIGTERM on: the node's peers (gateway/fleet/peers.py) send
  it nothing more.
- ``GET /server_info``, ``/model_info`` (and the older ``/get_server_info``, ``/get_model_info``): what sglang's
  router reads when a server registers (``served_model_name``, ``model_path``, ``dp_size``, ``model_type``...). A
  server of one model gets that model's fields; a node of several says what it serves (``models``) and leaves the
  one-model fields out, rather than name one of them as if it were the only one; ``/m/<model>/...`` answers for one.
- ``/m/<model>/<anything>``: the node seen as a server of ``model`` alone, for routers that key their servers by
  URL and so cannot register one URL for two models (vllm-router's ``--enable-igw``): the prefix is taken off, and
  what follows is served as at the root. The model-server metrics of ``/metrics`` (gateway/metrics.py) carry the
  same counts.

Every answer of the node carries its name (``x-gateway-node``: gateway/http/observer.py).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import __version__
from ..catalog import Catalog, Model
from ..dialects.errors import error_response
from ..engine.pool import EnginePool, ModelLoad
from ..errors import ModelNotFound
from ..serving.intake import scope_to, scoped_name
from .health import Readiness

PREFIX = "/m/"


class ModelScope:
    """Pure ASGI middleware: ``/m/<model>/rest`` is served as ``/rest``, remembering ``<model>`` for the node
    protocol's answers. A model id may hold slashes: the longest id or alias the path starts with wins. Costs one
    ``startswith`` for every other request."""

    def __init__(self, app: ASGIApp, catalog: Catalog) -> None:
        self.app = app
        self._names = {name for model in catalog.models for name in (model.id, *model.entry.aliases)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(PREFIX):
            await self.app(scope, receive, send)
            return
        rest = path[len(PREFIX) :]
        cut = len(rest)
        while cut > 0 and not (rest[:cut] in self._names and (cut == len(rest) or rest[cut] == "/")):
            cut = rest.rfind("/", 0, cut)
        if cut <= 0:
            name, _, after = rest.partition("/")
            error = ModelNotFound(f"This node does not serve the model '{name}'.", param="model")
            await error_response(error, "/" + after)(scope, receive, send)  # in the dialect of the route asked for
            return
        name, tail = rest[:cut], rest[cut:] or "/"
        scope_to(scope, name)
        # A new scope for what follows; the state dict stays shared, so what the app notes (the model, the
        # request's record) still reaches the request log, which shows the path as it was sent.
        inner = {**scope, "path": tail, "raw_path": quote(tail).encode()}
        try:
            await self.app(inner, receive, send)
        finally:
            if "route" in inner:  # the route matched, for the metrics' route label (gateway/http/observer.py)
                scope["route"] = inner["route"]


class Node:
    """The node protocol's routes, bound to the gateway's parts."""

    def __init__(self, name: str, catalog: Catalog, pool: EnginePool, readiness: Readiness) -> None:
        self._name = name
        self._catalog = catalog
        self._pool = pool
        self._readiness = readiness

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/health", self.health, methods=["GET"]),
            Route("/get_load", self.get_load, methods=["GET"]),
            Route("/server_info", self.server_info, methods=["GET"]),
            Route("/get_server_info", self.server_info, methods=["GET"]),
            Route("/model_info", self.model_info, methods=["GET"]),
            Route("/get_model_info", self.model_info, methods=["GET"]),
        ]

    def _scoped(self, request: Request) -> tuple[str, Model] | None:
        name = scoped_name(request.scope)
        if name is None:
            return None
        model = self._catalog.find(name)
        assert model is not None  # ModelScope let only known names through
        return name, model

    async def health(self, request: Request) -> Response:
        scoped = self._scoped(request)
        return self._readiness.response(scoped[1].id if scoped else None)

    async def get_load(self, request: Request) -> Response:
        scoped = self._scoped(request)
        loads = self._pool.loads()
        if scoped is not None:
            loads = [load for load in loads if load.model == scoped[1].id]
        running, waiting = sum(load.running for load in loads), sum(load.waiting for load in loads)
        return JSONResponse(
            {
                "load": running + waiting,
                "running": running,
                "waiting": waiting,
                "node": self._name,
                "serving": not self._readiness.leaving,
                "models": {load.model: _load(load) for load in loads},
            }
        )

    async def server_info(self, request: Request) -> Response:
        scoped = self._scoped(request)
        info: dict[str, Any] = {"node": self._name, "version": __version__, "dp_size": 1}
        if scoped is None:
            info["models"] = [model.id for model in self._catalog.models]
            info["aliases"] = {alias: model.id for model in self._catalog.models for alias in model.entry.aliases}
            info["default_model"] = self._catalog.default_model
            if len(self._catalog.models) != 1:
                return JSONResponse(info)
            model = self._catalog.models[0]
            scoped = model.id, model
        name, model = scoped
        info.update(model_id=name, served_model_name=name, model_path=_model_path(model))
        return JSONResponse(info)

    async def model_info(self, request: Request) -> Response:
        scoped = self._scoped(request)
        if scoped is None:
            if len(self._catalog.models) != 1:
                return JSONResponse({"node": self._name, "models": [_model_info(m) for m in self._catalog.models]})
            scoped = self._catalog.models[0].id, self._catalog.models[0]
        return JSONResponse(_model_info(scoped[1]))


def _load(load: ModelLoad) -> dict[str, Any]:
    return {"engine": load.engine, "state": load.state.value, "running": load.running, "waiting": load.waiting}


def _model_path(model: Model) -> str:
    """A Hugging Face repo by its id; a model from this machine's files by its id only (its path is this machine's
    business, and the answer is open to anyone who can reach the port)."""
    return model.id if model.source.local else model.source.model_id


def _model_info(model: Model) -> dict[str, Any]:
    """sglang's fields: ``is_generation`` is false for embedding models (sglang's routers send them no chat)."""
    arch, tokenizer = model.entry.options.arch, model.source.tokenizer
    if tokenizer is not None and tokenizer.startswith(("/", "~", ".")):
        tokenizer = None  # a file of this machine: not for anyone who can reach the port
    return {
        "model_id": model.id,
        "model_path": _model_path(model),
        "tokenizer_path": tokenizer or _model_path(model),
        "is_generation": model.kind != "embedding",
        "model_type": model.kind,
        "architectures": [arch] if arch else [],
    }

"""Ollama's API routes under ``/api``: chat, generate, embed, the model listings, pull and version.

Requests are translated (``protocol.py``) and served like the OpenAI routes' (lazy start, keep-alive, queueing,
the embedding cache); errors on these paths are written in Ollama's shape (``{"error": "..."}``) by the app's
error handlers (gateway/dialects/errors.py). Model names resolve through the catalog and its aliases, with Ollama's
default tag: ``name:latest`` is ``name``.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from ...catalog import CHAT_KINDS, Catalog, Model
from ...chat import checks
from ...chat.plans import plan_chat, plan_completion
from ...errors import GatewayError, NotImplementedByGateway
from ...serving.calls import ChatWork, EmbeddingWork, LoadWork, ModelCall
from ...serving.intake import Intake, keep_alive
from ...serving.service import Serving
from . import protocol

# What Ollama shows for a model kept "forever" (keep_alive -1, or no idle stop): a time centuries away.
FOREVER = timedelta(days=365 * 290)
_NOT_HERE = ("create", "copy", "delete", "push", "blobs")


class OllamaRoutes:
    def __init__(
        self,
        catalog: Catalog,
        intake: Intake,
        serving: Serving,
        *,
        clock: Callable[[], float] = time.perf_counter,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._catalog = catalog
        self._intake = intake
        self._serving = serving
        self._pool = serving.pool
        self._clock = clock
        self._wall = wall
        self._started = wall()

    def routes(self) -> list[BaseRoute]:
        routes: list[BaseRoute] = [
            Route("/api/version", self.version, methods=["GET", "HEAD"]),
            Route("/api/tags", self.tags, methods=["GET", "HEAD"]),
            Route("/api/ps", self.ps, methods=["GET"]),
            Route("/api/show", self.show, methods=["POST"]),
            Route("/api/chat", self.chat, methods=["POST"]),
            Route("/api/generate", self.generate, methods=["POST"]),
            Route("/api/embed", self.embed, methods=["POST"]),
            Route("/api/embeddings", self.embeddings, methods=["POST"]),
            Route("/api/pull", self.pull, methods=["POST"]),
        ]
        for name in _NOT_HERE:
            routes.append(Route(f"/api/{name}", self.not_here, methods=["POST", "DELETE", "HEAD"]))
            routes.append(Route(f"/api/{name}/{{rest:path}}", self.not_here, methods=["POST", "DELETE", "HEAD"]))
        return routes

    # -------------------------------------------------------------------------------------------- models

    def find(self, name: str) -> Model | None:
        """A model by the name an Ollama client sends: an id or alias, with or without the ``:latest`` tag."""
        model = self._catalog.find(name)
        if model is None and name.endswith(":latest"):
            model = self._catalog.find(name.removesuffix(":latest"))
        return model

    def _model(self, request: Request, body: dict[str, Any], kinds: frozenset[str]) -> Model:
        return self._intake.model(request, body.get("model"), kinds, find=self.find)

    def _modified(self, model: Model) -> float:
        return self._pool.files_modified(model.id) or self._started

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": protocol.OLLAMA_VERSION})

    async def tags(self, request: Request) -> Response:
        entries = []
        for model in self._catalog.models:
            size = self._pool.files_bytes(model.id) or 0
            for name in (model.id, *model.entry.aliases):
                entries.append(protocol.model_entry(model, name, size=size, modified=self._modified(model)))
        return JSONResponse({"models": entries})

    async def ps(self, request: Request) -> Response:
        pool = self._pool
        await pool.refresh()
        now = datetime.fromtimestamp(self._wall(), tz=UTC)
        running = []
        for model in self._catalog.models:
            status = pool.model_status(model.id)
            if status["state"] != "ready":
                continue
            until = status["seconds_until_idle_stop"]
            expires = now + (timedelta(seconds=until) if until is not None else FOREVER)
            size = int((status["memory_mb"] or 0) * (1 << 20))
            name = protocol.ollama_name(model.id)
            running.append(
                {
                    "name": name,
                    "model": name,
                    "size": size,
                    "size_vram": 0,
                    "digest": protocol.digest(model),
                    "details": protocol.details(model),
                    "expires_at": expires.isoformat().replace("+00:00", "Z"),
                }
            )
        return JSONResponse({"models": running})

    async def show(self, request: Request) -> Response:
        body = await self._intake.json(request)
        name = body.get("model", body.get("name"))
        model = self._intake.model(request, name, {m.kind for m in self._catalog.models}, find=self.find)
        return JSONResponse(protocol.show(model, modified=self._modified(model)))

    async def not_here(self, request: Request) -> Response:
        what = request.url.path.split("/")[2]
        why = "the gateway's models come from its models file (GATEWAY_MODELS_FILE): edit it to add or remove one."
        raise NotImplementedByGateway(f"/api/{what} is not supported: {why}")

    # -------------------------------------------------------------------------------------- generation

    async def chat(self, request: Request) -> Response:
        body = await self._intake.json(request)
        model = self._model(request, body, CHAT_KINDS)
        keep = keep_alive(body, request)
        translated = protocol.chat_request(body)
        dialect = protocol.ChatDialect(_named(body, model), self._clock, self._wall)
        return await self._generate(model, translated, dialect, keep, chat=True)

    async def generate(self, request: Request) -> Response:
        body = await self._intake.json(request)
        model = self._model(request, body, CHAT_KINDS)
        keep = keep_alive(body, request)
        translated = protocol.generate_request(body)
        dialect = protocol.GenerateDialect(_named(body, model), self._clock, self._wall)
        return await self._generate(model, translated, dialect, keep, chat=False)

    async def _generate(
        self,
        model: Model,
        translated: protocol.Translated,
        dialect: protocol.ChatDialect | protocol.GenerateDialect,
        keep: float | None,
        *,
        chat: bool,
    ) -> Response:
        # The names come from the client: percent-encoded, so that no name can end the header or add another.
        ignored = ",".join(quote(name, safe="") for name in translated.ignored)
        headers = {"x-ignored-options": ignored} if ignored else {}
        if translated.load_only:
            return await self._load(model, keep, chat=chat, name=dialect.model)
        request_body = translated.body
        work: ChatWork
        if translated.raw:
            # Completion streams carry no usage: a raw prompt is generated whole, then sent as one line.
            checks.completion(request_body)
            wants_stream = request_body.pop("stream", False)
            plan = plan_completion(request_body, model.id)
            if wants_stream:
                work = ChatWork(plan, protocol.OneLine(dialect), answer_media_type=protocol.NDJSON, limit="clamp")
            else:
                work = ChatWork(plan, dialect, limit="clamp")
        else:
            checks.chat(request_body)
            plan = plan_chat(request_body, model.id, takes_images=model.kind == "vision-plain")
            work = ChatWork(plan, dialect, limit="clamp")
        return self._serving.serve(ModelCall(model, keep, work, headers))

    async def _load(self, model: Model, keep: float | None, *, chat: bool, name: str) -> Response:
        """No prompt: load the model (Ollama's preload), or with keep_alive 0 unload it (at once when nothing uses
        its engine, else as soon as the requests in flight are done)."""
        unloading = keep == 0
        answer = protocol.load_answer(name, chat=chat, unloaded=unloading, wall=self._wall())
        if unloading:
            await self._serving.unload(model)
            return JSONResponse(answer)
        return self._serving.serve(ModelCall(model, keep, LoadWork(lambda: JSONResponse(answer))))

    # -------------------------------------------------------------------------------------- embeddings

    async def embed(self, request: Request) -> Response:
        return await self._embed(request, legacy=False)

    async def embeddings(self, request: Request) -> Response:
        return await self._embed(request, legacy=True)

    async def _embed(self, request: Request, *, legacy: bool) -> Response:
        body = await self._intake.json(request)
        model = self._model(request, body, frozenset({"embedding"}))
        keep = keep_alive(body, request)
        began = self._clock()
        openai = protocol.embed_input(body)
        if legacy and openai["input"] == [""]:
            return JSONResponse({"embedding": []})

        def write(content: bytes, cache: str) -> Response:
            answer = orjson.loads(content)
            vectors = [item["embedding"] for item in sorted(answer["data"], key=lambda item: item["index"])]
            if legacy:
                return JSONResponse({"embedding": vectors[0]}, headers={"x-cache": cache})
            answer = {
                "model": _named(body, model),
                "embeddings": vectors,
                "total_duration": int((self._clock() - began) * 1e9),
                "load_duration": 0,
                "prompt_eval_count": (answer.get("usage") or {}).get("prompt_tokens", 0),
            }
            return Response(orjson.dumps(answer), media_type="application/json", headers={"x-cache": cache})

        work = EmbeddingWork(openai, request.headers.get("cache-control"), write)
        return self._serving.serve(ModelCall(model, keep, work))

    # -------------------------------------------------------------------------------------------- pull

    async def pull(self, request: Request) -> Response:
        """Fetch a model's files now (``url`` files, prefetched Hugging Face repos), with Ollama's progress lines
        from the gateway's own downloader; a model whose files are here already succeeds at once."""
        body = await self._intake.json(request)
        name = body.get("model", body.get("name"))
        model = self._intake.model(request, name, {m.kind for m in self._catalog.models}, find=self.find)
        if body.get("stream", True) is False:
            async for _ in self._serving.pull(model):
                pass
            return JSONResponse({"status": "success"})
        return StreamingResponse(self._progress(model), media_type=protocol.NDJSON)

    async def _progress(self, model: Model) -> AsyncIterator[bytes]:
        yield _line({"status": "pulling manifest"})
        try:
            async for event in self._serving.pull(model):
                progress = protocol.pull_line(event.type, dict(event.details))
                if progress is not None:
                    yield _line(progress)
        except GatewayError as exc:
            yield protocol.error_line(exc)
            return
        for status in ("verifying sha256 digest", "writing manifest", "success"):
            yield _line({"status": status})


def _named(body: dict[str, Any], model: Model) -> str:
    """The model's name as the client sent it (``smollm2:135m``): Ollama's answers say that name, not an id."""
    name = body.get("model")
    return name if isinstance(name, str) and name else model.id


def _line(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode() + b"\n"

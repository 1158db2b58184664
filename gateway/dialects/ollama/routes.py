"""Ollama's API routes under ``/api``: chat, generate, embed, the model listings, pull and version.

Requests are translated (``protocol.py``) and served like the OpenAI routes' (lazy start, keep-alive, queueing,
the embedding cache); errors on these paths are written in Ollama's shape (``{"error": "..."}``) by the app's
error handlers (``gateway/dialects.py``). Model names resolve through the catalog and its aliases, with Ollama's
default tag: ``name:latest`` is ``name``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from ...cache.embeddings import Embeddings
from ...catalog import CHAT_KINDS, Catalog, Model
from ...chat import checks
from ...chat.plans import plan_chat, plan_completion
from ...errors import GatewayError, NotImplementedByGateway
from ...events import EventBus
from ...serving.intake import Intake, keep_alive
from ...serving.service import ModelService
from . import protocol

# What Ollama shows for a model kept "forever" (keep_alive -1, or no idle stop): a time centuries away.
FOREVER = timedelta(days=365 * 290)
_NOT_HERE = ("create", "copy", "delete", "push", "blobs")


class OllamaRoutes:
    def __init__(
        self,
        catalog: Catalog,
        intake: Intake,
        service: ModelService,
        embeddings: Embeddings,
        events: EventBus,
        *,
        clock: Callable[[], float] = time.perf_counter,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._catalog = catalog
        self._intake = intake
        self._service = service
        self._embeddings = embeddings
        self._events = events
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
        model = self._intake.model(body.get("model"), kinds, request.url.path, find=self.find)
        request.state.model = model.id  # for the request log and metrics
        return model

    def _modified(self, model: Model) -> float:
        return self._service.pool.files_modified(model.id) or self._started

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": protocol.OLLAMA_VERSION})

    async def tags(self, request: Request) -> Response:
        entries = []
        for model in self._catalog.models:
            size = self._service.pool.files_bytes(model.id) or 0
            for name in (model.id, *model.entry.aliases):
                entries.append(protocol.model_entry(model, name, size=size, modified=self._modified(model)))
        return JSONResponse({"models": entries})

    async def ps(self, request: Request) -> Response:
        pool = self._service.pool
        await pool.refresh()
        now = datetime.fromtimestamp(self._wall(), tz=timezone.utc)
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
        model = self._intake.model(name, {m.kind for m in self._catalog.models}, request.url.path, find=self.find)
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
        dialect = protocol.ChatDialect(model.id, self._clock, self._wall)
        return await self._generate(request, model, translated, dialect, keep, chat=True)

    async def generate(self, request: Request) -> Response:
        body = await self._intake.json(request)
        model = self._model(request, body, CHAT_KINDS)
        keep = keep_alive(body, request)
        translated = protocol.generate_request(body)
        dialect = protocol.GenerateDialect(model.id, self._clock, self._wall)
        return await self._generate(request, model, translated, dialect, keep, chat=False)

    async def _generate(
        self,
        request: Request,
        model: Model,
        translated: protocol.Translated,
        dialect: protocol.ChatDialect | protocol.GenerateDialect,
        keep: float | None,
        *,
        chat: bool,
    ) -> Response:
        headers = {"x-ignored-options": ",".join(translated.ignored)} if translated.ignored else {}
        if translated.load_only:
            return await self._load(request, model, keep, chat=chat)
        request_body = translated.body
        if translated.raw:
            checks.completion(request_body)
            wants_stream = request_body.pop("stream", False)
            plan = plan_completion(request_body, model.id)
        else:
            checks.chat(request_body)
            plan = plan_chat(request_body, model.id, takes_images=model.kind == "vision-plain")
        lease = self._service.lease(model.id)
        if translated.raw:
            # Completion streams carry no usage: a raw prompt is generated whole, then sent as one line.
            async def whole() -> Response:
                text = dialect.answer(await self._service.answer(model.id, plan, lease))
                media = protocol.NDJSON if wants_stream else "application/json"
                return Response(text + (b"\n" if wants_stream else b""), media_type=media, headers=headers)

            return await self._service.whole(request, lease, keep, whole)
        response = await self._service.chat(request, model.id, plan, dialect, lease, keep)
        response.headers.update(headers)
        return response

    async def _load(self, request: Request, model: Model, keep: float | None, *, chat: bool) -> Response:
        """No prompt: load the model (Ollama's preload), or with keep_alive 0 unload it: at once when nothing uses
        its engine, else as soon as the requests in flight are done (as Ollama does: nobody's answer is cut)."""
        unloading = keep == 0
        if unloading:
            lifecycle = self._service.pool.lifecycle(model.id)
            if lifecycle.in_flight == 0:
                await self._service.pool.unload(model.id)
            else:
                lifecycle.keep_alive(0)
        else:
            lease = self._service.lease(model.id)

            async def ready() -> Response:
                await self._service.pool.ensure_ready(model.id, lease)
                return Response()

            await self._service.whole(request, lease, keep, ready)
        answer = protocol.load_answer(model.id, chat=chat, unloaded=unloading, wall=self._wall())
        return JSONResponse(answer)

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
        lease = self._service.lease(model.id)
        ensure = functools.partial(self._service.pool.ensure_ready, model.id, lease)

        async def work() -> Response:
            control = request.headers.get("cache-control")
            content, cache = await self._embeddings.handle(openai, model, ensure, cache_control=control)
            answer = orjson.loads(content)
            vectors = [item["embedding"] for item in sorted(answer["data"], key=lambda item: item["index"])]
            if legacy:
                return JSONResponse({"embedding": vectors[0]}, headers={"x-cache": cache})
            total = int((self._clock() - began) * 1e9)
            return Response(
                orjson.dumps(
                    {
                        "model": model.id,
                        "embeddings": vectors,
                        "total_duration": total,
                        "load_duration": 0,
                        "prompt_eval_count": (answer.get("usage") or {}).get("prompt_tokens", 0),
                    }
                ),
                media_type="application/json",
                headers={"x-cache": cache},
            )

        return await self._service.whole(request, lease, keep, work)

    # -------------------------------------------------------------------------------------------- pull

    async def pull(self, request: Request) -> Response:
        """Fetch a model's files now (``url`` files, prefetched Hugging Face repos), with Ollama's progress lines
        from the gateway's own downloader; a model whose files are here already succeeds at once."""
        body = await self._intake.json(request)
        name = body.get("model", body.get("name"))
        model = self._intake.model(name, {m.kind for m in self._catalog.models}, request.url.path, find=self.find)
        if body.get("stream", True) is False:
            await self._service.pool.prepare(model.id)
            return JSONResponse({"status": "success"})
        files = {name for name in (model.entry.file, model.entry.repo, model.source.model_id) if name}
        return StreamingResponse(self._progress(model.id, files), media_type=protocol.NDJSON)

    async def _progress(self, model_id: str, files: set[str]) -> AsyncIterator[bytes]:
        """Progress lines for the downloads of ``files`` (other models may be downloading at the same time)."""
        lines: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        async def follow() -> None:
            async with contextlib.aclosing(self._events.subscribe(replay=False)) as events:
                async for event in events:
                    progress = protocol.pull_line(event.type, dict(event.details))
                    if progress is not None and event.details.get("file") in files:
                        lines.put_nowait(progress)

        follower = asyncio.ensure_future(follow())
        await asyncio.sleep(0)  # the follower subscribes (its first step) before the pull can publish anything
        pull = asyncio.ensure_future(self._service.pool.prepare(model_id))
        yield _line({"status": "pulling manifest"})
        waiter: asyncio.Future[dict[str, Any]] | None = None
        try:
            while not pull.done():
                waiter = asyncio.ensure_future(lines.get())
                await asyncio.wait([pull, waiter], return_when=asyncio.FIRST_COMPLETED)
                if waiter.done():
                    yield _line(waiter.result())
                else:
                    waiter.cancel()
            await asyncio.sleep(0)  # the follower takes in the last events the pull published as it ended
            while not lines.empty():
                yield _line(lines.get_nowait())
            pull.result()
        except GatewayError as exc:
            yield protocol.error_line(exc)
            return
        finally:
            for task in (waiter, follower, pull):
                if task is not None:
                    task.cancel()
        for status in ("verifying sha256 digest", "writing manifest", "success"):
            yield _line({"status": status})


def _line(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode() + b"\n"

"""The bundled engine's HTTP API: the routes and answer shapes of ``mistralrs-server``.

Errors follow the engine's own conventions (``{"message": ...}`` bodies; 422 for a request the engine
refuses; 500 for an unknown model or a failure while generating; a plain-text ``data:`` event inside a
stream), so the gateway translates them exactly as it translates the real engine's. Where the package
cannot do what a field asks, the 422 names it (``{"message", "param"}``, docs/engine-contract.md) rather
than the field being ignored.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import struct
import sys
import time
import wave
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from .args import ArgsError, parse_args
from .runners import GenerationError, LoadedModel, RequestError, clean_message, load_model, new_id
from .wire import ChatCollector, chunk_json, completion_json

_CHAT_KINDS = frozenset({"plain", "gguf", "multimodal"})
_SSE = "text/event-stream"


def _message(status: int, text: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"message": text, **extra}, status_code=status)


def _refused(exc: RequestError) -> JSONResponse:
    """422, naming the field when one is at fault (the gateway answers its client 400 with that ``param``)."""
    return _message(422, str(exc)) if exc.param is None else _message(422, str(exc), param=exc.param)


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


class EngineApp:
    def __init__(self, models: list[LoadedModel], default_id: str) -> None:
        self.models = models
        self.default_id = default_id
        self._by_name: dict[str, LoadedModel] = {}
        for model in models:
            self._by_name[model.load.pipeline_name] = model
            self._by_name[model.id] = model

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/", lambda r: PlainTextResponse("OK"), methods=["GET"]),
                Route("/health", lambda r: PlainTextResponse("OK"), methods=["GET"]),
                Route("/v1/models", self.list_models, methods=["GET"]),
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/embeddings", self.embeddings, methods=["POST"]),
                Route("/v1/images/generations", self.images, methods=["POST"]),
                Route("/v1/audio/speech", self.speech, methods=["POST"]),
            ]
        )

    async def list_models(self, request: Request) -> Response:
        data = [{"id": "default", "object": "model", "created": self.models[0].created, "owned_by": "local"}]
        data += [
            {"id": m.id, "object": "model", "created": m.created, "owned_by": "local", "status": "loaded"}
            for m in self.models
        ]
        return JSONResponse({"object": "list", "data": data})

    async def _body(self, request: Request) -> dict[str, Any] | Response:
        if "json" not in request.headers.get("content-type", ""):
            return PlainTextResponse("Expected request with `Content-Type: application/json`", status_code=415)
        try:
            body = json.loads(await request.body())
        except ValueError as exc:
            return PlainTextResponse(f"Failed to parse the request body as JSON: {exc}", status_code=400)
        if not isinstance(body, dict):
            return PlainTextResponse("Failed to deserialize the JSON body: expected an object", status_code=422)
        return body

    async def _request(
        self, request: Request, kinds: frozenset[str], unknown_status: int
    ) -> tuple[dict[str, Any], LoadedModel] | Response:
        """The body and the model it names, or the error answer the engine would give."""
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        model = self._model(body, kinds, unknown_status)
        if isinstance(model, Response):
            return model
        return body, model

    def _model(self, body: dict[str, Any], kinds: frozenset[str], status: int) -> LoadedModel | Response:
        name = body.get("model") or "default"
        model = self._by_name.get(self.default_id if name == "default" else str(name))
        if model is None:
            known = ", ".join(m.id for m in self.models)
            return _message(
                status,
                f"Requested model '{name}' is not available. Available models: {known}. "
                "Use 'default' to use the default model.",
            )
        if model.kind not in kinds:
            return _message(422, "Received a request incompatible for this model's category.")
        return model

    # -------------------------------------------------------------------------- chat, completions

    async def completions(self, request: Request) -> Response:
        parsed = await self._request(request, _CHAT_KINDS, 500)
        if isinstance(parsed, Response):
            return parsed
        body, model = parsed
        try:
            response = await model.complete(body)
        except RequestError as exc:
            return _refused(exc)
        except GenerationError as exc:
            return _message(500, str(exc))
        answer = completion_json(response, {"id": new_id("cmpl"), "created": int(time.time()), "model": model.id})
        if body.get("stream") is not True:
            return JSONResponse(answer)

        async def one_chunk() -> AsyncIterator[bytes]:
            yield _sse(answer)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(one_chunk(), media_type=_SSE)

    async def chat(self, request: Request) -> Response:
        """Always generated as a stream (the engine batches streams), collected when the client did not stream."""
        parsed = await self._request(request, _CHAT_KINDS, 500)
        if isinstance(parsed, Response):
            return parsed
        body, model = parsed
        if body.get("messages") is None:
            return PlainTextResponse("Failed to deserialize the JSON body: missing field `messages`", 422)
        try:
            chunks = model.stream_chat(body)
            first = await anext(chunks, None)
        except RequestError as exc:
            return _refused(exc)
        except GenerationError as exc:
            return _message(500, str(exc))
        meta = {"id": new_id("chatcmpl"), "created": int(time.time()), "model": model.id}
        if body.get("stream") is True:
            return StreamingResponse(self._events(first, chunks, meta), media_type=_SSE)
        return await self._collect(request, first, chunks, meta, logprobs=body.get("logprobs") is True)

    async def _events(
        self, first: Any, chunks: AsyncGenerator[Any, None], meta: dict[str, Any]
    ) -> AsyncIterator[bytes]:
        try:
            if first is not None:
                yield _sse(chunk_json(first, meta))
                async for chunk in chunks:
                    yield _sse(chunk_json(chunk, meta))
        except GenerationError as exc:
            # The engine's own way: a plain-text error event, then the end of the stream.
            yield f"data: {exc}\n\n".encode()
        finally:
            await chunks.aclose()
        yield b"data: [DONE]\n\n"

    async def _collect(
        self,
        request: Request,
        first: Any,
        chunks: AsyncGenerator[Any, None],
        meta: dict[str, Any],
        *,
        logprobs: bool,
    ) -> Response:
        collector = ChatCollector()
        count = 0
        try:
            chunk = first
            while chunk is not None:
                count += 1
                if count % 32 == 0 and await request.is_disconnected():
                    # The client (the gateway) went away: stop generating for nobody.
                    await chunks.aclose()
                    return Response(status_code=499)
                collector.add(chunk)
                chunk = await anext(chunks, None)
        except GenerationError as exc:
            return _message(500, str(exc), partial_response=collector.partial())
        return JSONResponse(collector.answer(meta, logprobs=logprobs))

    # ----------------------------------------------------------------------- embeddings, images

    async def embeddings(self, request: Request) -> Response:
        parsed = await self._request(request, frozenset({"embedding"}), 422)
        if isinstance(parsed, Response):
            return parsed
        body, model = parsed
        if "input" not in body:
            return PlainTextResponse("Failed to deserialize the JSON body: missing field `input`", status_code=422)
        if body.get("dimensions") is not None:
            return _message(422, "dimensions is not supported by this engine")
        inputs = body["input"]
        try:
            vectors, tokens = await model.embed(inputs)
        except RequestError as exc:
            return _message(422, str(exc))
        b64 = body.get("encoding_format") == "base64"
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() if b64 else v,
            }
            for i, v in enumerate(vectors)
        ]
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": model.id,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    async def images(self, request: Request) -> Response:
        parsed = await self._request(request, frozenset({"diffusion"}), 500)
        if isinstance(parsed, Response):
            return parsed
        body, model = parsed
        try:
            return JSONResponse(await model.image(body))
        except RequestError as exc:
            return PlainTextResponse(str(exc), status_code=422)
        except GenerationError as exc:
            return _message(500, str(exc))

    async def speech(self, request: Request) -> Response:
        parsed = await self._request(request, frozenset({"speech"}), 500)
        if isinstance(parsed, Response):
            return parsed
        body, model = parsed
        try:
            pcm, rate, channels = await model.speech(str(body.get("input", "")))
        except GenerationError as exc:
            return _message(500, str(exc))
        return Response(_wav(pcm, rate, channels), media_type="audio/wav")


def _wav(pcm: list[float], rate: int, channels: int) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(struct.pack(f"<{len(pcm)}h", *(int(max(-1.0, min(1.0, s)) * 32767) for s in pcm)))
    return buffer.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    """Load every model, then bind and serve; a load failure exits 1 with the reason on stderr."""
    os.environ.setdefault("RUST_LOG", "warn")
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except ArgsError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    for flag in args.unsupported:
        print(f"bundled engine: {flag} is not supported by the mistralrs Python package; ignored", file=sys.stderr)
    try:
        import mistralrs  # noqa: F401
    except ImportError:
        print("Error: the `mistralrs` package is not installed: pip install 'mistral-gateway[engine]'", file=sys.stderr)
        return 1
    executor = ThreadPoolExecutor(max_workers=256, thread_name_prefix="engine")
    models = []
    for load in args.models:
        began = time.monotonic()
        try:
            models.append(load_model(load, args, executor))
        except BaseException as exc:  # a load error, or a Rust panic (PanicException is a BaseException)
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            print(f"Error: failed to load model {load.served_id!r}: {clean_message(exc)}", file=sys.stderr)
            return 1
        print(
            f"bundled engine: loaded {load.served_id} ({load.kind}"
            f"{', quantized: prefill one request at a time' if models[-1].quantized else ''}) "
            f"in {time.monotonic() - began:.2f} s",
            flush=True,
        )
    default = args.default_model_id or models[0].id
    engine = EngineApp(models, default)
    if default not in engine._by_name:
        print(f"Error: Failed to set default model: Model {default} not found", file=sys.stderr)
        return 1
    import uvicorn

    # Keep-alive longer than the gateway's pool keeps idle connections (30 s): the gateway must never reuse
    # a connection this server is closing at that very moment.
    config = uvicorn.Config(
        engine.app(),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=1,
        timeout_keep_alive=120,
    )
    server = uvicorn.Server(config)
    print(f"bundled engine: serving {', '.join(m.id for m in models)} on {args.host}:{args.port}", flush=True)
    asyncio.run(server.serve())
    return 0 if server.started else 1

"""Serving a model request, whatever dialect the client speaks: the engine lease, the wait for a cold engine, the
client leaving, and chat requests answered whole or streamed.

The dialects (OpenAI's chat and completions, the Responses API, Anthropic's Messages, Ollama's API) differ only in
how they read a request and write an answer; everything between the request and the engine is here, once:

    lease(model) -> ensure_ready(model, lease) -> engine request(s) -> answer or stream -> lease.release(keep_alive)

A :class:`ChatDialect` turns the OpenAI chat answer (or stream of chunks) into its own, and says how an error that
comes after a stream began is written, and whether a stream that waits for its engine gets keep-alive comments.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from ..chat.plans import Plan
from ..chat.streams import Event
from ..console.tracker import Record, Tracker, current
from ..engine.launcher import Endpoint
from ..engine.lifecycle import Lease
from ..engine.pool import EnginePool
from ..errors import EngineUnavailable, GatewayError, RequestCancelled
from ..events import EventBus
from . import chat as serving
from .relay import Relay, error_event

T = TypeVar("T")
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
LOADING = b": loading\n\n"
WATCH_AFTER = 0.05  # seconds before a request starts watching for its client to leave
# Opens a stream's engine side once the engine is ready (raising GatewayError before anything is sent), giving the
# bytes to send.
Opener = Callable[[Endpoint], Awaitable[AsyncIterator[bytes]]]
ErrorEvent = Callable[[GatewayError], bytes]


class ChatDialect(Protocol):
    """How one dialect answers a chat request: the OpenAI answer or stream in, the client's bytes out."""

    media_type: str  # of its streams
    loading_comments: bool  # whether its streams can carry `: loading` comments while the engine starts

    def answer(self, chat_answer: dict[str, Any]) -> bytes: ...

    def stream(self, stream: serving.Stream) -> AsyncIterator[bytes]: ...

    def failed(self, error: GatewayError) -> bytes: ...


class OpenAIChat:
    """OpenAI's own chat completions and completions: the answer as it is, Server-Sent Events."""

    media_type = "text/event-stream"
    loading_comments = True

    def answer(self, chat_answer: dict[str, Any]) -> bytes:
        return orjson.dumps(chat_answer)

    def stream(self, stream: serving.Stream) -> AsyncIterator[bytes]:
        return serving.openai_sse(stream)

    def failed(self, error: GatewayError) -> bytes:
        return error_event(error)


class LeasedStream(StreamingResponse):
    """A streaming answer that releases its lease however it ends, even if it never started; ``waiting`` (the wait
    for a cold engine, when the stream owns it) is cancelled then too, so that nothing waits on for nobody."""

    def __init__(
        self,
        content: AsyncIterator[bytes],
        lease: Lease,
        keep_alive: float | None,
        media_type: str = "text/event-stream",
        waiting: asyncio.Future[Any] | None = None,
    ) -> None:
        headers = SSE_HEADERS if media_type == "text/event-stream" else {"x-accel-buffering": "no"}
        super().__init__(content, media_type=media_type, headers=headers)
        self._lease = lease
        self._keep_alive = keep_alive
        self._waiting = waiting

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self._waiting is not None:
                self._waiting.cancel()
            body = self.body_iterator
            if isinstance(body, AsyncGenerator):
                await body.aclose()  # a stream cut short hands its engine connection back now, not at collection
            self._lease.release(self._keep_alive)


async def until_disconnect(loop: asyncio.AbstractEventLoop, request: Request, work: Awaitable[T], gone_value: T) -> T:
    """Run ``work`` unless the client goes away first; then cancel it (and with it the upstream call) and give
    ``gone_value``.

    The work runs in this task; a watcher task cancels it on a disconnect. The watcher is only started once
    the work has taken ``WATCH_AFTER`` seconds: most answers are faster, and on two cores a task per request
    costs throughput, while a generation that runs on for a client that left costs the engine far more.
    """
    current = asyncio.current_task(loop)
    gone = False
    watcher: asyncio.Task[None] | None = None

    async def watch() -> None:
        nonlocal gone
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone = True
        if current is not None:
            current.cancel()

    def start_watching() -> None:
        nonlocal watcher
        watcher = loop.create_task(watch())

    timer = loop.call_later(WATCH_AFTER, start_watching)
    try:
        return await work
    except asyncio.CancelledError:
        if gone:
            # Our own cancellation, not the server's: take it back (Python 3.11+) and end the handler quietly.
            uncancel = getattr(current, "uncancel", None)
            if uncancel is None or uncancel() == 0:
                return gone_value  # nobody is listening any more
        raise
    finally:
        timer.cancel()
        if watcher is not None:
            watcher.cancel()


class ModelService:
    """Runs model requests against the engine pool; shared by every dialect's routes."""

    def __init__(
        self,
        pool: EnginePool,
        relay: Relay,
        events: EventBus,
        *,
        loading_interval: float,
        tracker: Tracker | None = None,
    ) -> None:
        self.pool = pool
        self.relay = relay
        self.tracker = tracker or Tracker()
        self._events = events
        self._loading_interval = loading_interval
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def start_draining(self) -> None:
        self._draining = True

    @property
    def draining(self) -> bool:
        return self._draining

    def event_loop(self) -> asyncio.AbstractEventLoop:
        # Looked up once: on Python 3.11 every get_running_loop() is a getpid() system call.
        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.get_running_loop()
        return self._loop

    def lease(self, model_id: str) -> Lease:
        if self._draining:
            raise EngineUnavailable("The gateway is shutting down.", retry_after=1)
        return self.pool.lease(model_id)

    async def whole(
        self, request: Request, lease: Lease, keep_alive: float | None, work: Callable[[], Awaitable[Response]]
    ) -> Response:
        """A whole answer made by ``work``, cancelled if the client leaves (or an operator cancels it); the lease is
        released at the end."""
        record = current(request.state)
        try:
            _attach(record)
            return await until_disconnect(self.event_loop(), request, work(), Response(status_code=499))
        except asyncio.CancelledError:
            _cancelled_by_operator(record)
            raise
        finally:
            if record is not None:
                record.task = None  # the answer is being sent: too late for a cancel to reach it
            lease.release(keep_alive)

    async def chat(
        self, request: Request, model_id: str, plan: Plan, dialect: ChatDialect, lease: Lease, keep_alive: float | None
    ) -> Response:
        """A chat or completions plan, answered whole or streamed in ``dialect``; the lease is released at the end."""
        record = current(request.state)
        if record is not None:
            record.model, record.stream = model_id, plan.stream
        if plan.stream:

            async def open_(endpoint: Endpoint) -> AsyncIterator[bytes]:
                engine_id = endpoint.engine_ids.get(model_id, model_id)
                if plan.whole:
                    result = await serving.answer(self.relay, endpoint.base_url, plan, engine_id)
                    self._usage(record, result)
                    return serving.whole_as_sse(result, plan.shape)
                stream = await serving.open_stream(self.relay, endpoint.base_url, plan, engine_id)
                if record is not None:
                    stream.events = self._observed(stream.events, stream, record)
                return dialect.stream(stream)

            return await self.stream(
                model_id,
                open_,
                dialect.failed,
                lease,
                keep_alive,
                media_type=dialect.media_type,
                loading=dialect.loading_comments,
                record=record,
                request=request,
            )

        async def whole() -> Response:
            result = await self.answer(model_id, plan, lease, record)
            return Response(dialect.answer(result), media_type="application/json")

        return await self.whole(request, lease, keep_alive, whole)

    async def answer(self, model_id: str, plan: Plan, lease: Lease, record: Record | None = None) -> dict[str, Any]:
        """The OpenAI answer to a non-streaming plan, once the model's engine is ready."""
        endpoint = await self.pool.ensure_ready(model_id, lease)
        engine_id = endpoint.engine_ids.get(model_id, model_id)
        result = await serving.answer(self.relay, endpoint.base_url, plan, engine_id)
        self._usage(record, result)
        return result

    def _usage(self, record: Record | None, answer: dict[str, Any]) -> None:
        if record is not None:
            self.tracker.usage(record, answer.get("usage"))

    async def _observed(
        self, events: AsyncIterator[Event], stream: serving.Stream, record: Record
    ) -> AsyncIterator[Event]:
        """A stream's engine events, noting the first token's time and, at the end, the usage."""
        async for event in events:
            if record.ttft_ms is None and event.comment is None:
                self.tracker.first_token(record)
            yield event
        self.tracker.usage(record, stream.usage())

    async def stream(
        self,
        model_id: str,
        open_: Opener,
        on_error: ErrorEvent,
        lease: Lease,
        keep_alive: float | None,
        *,
        media_type: str = "text/event-stream",
        loading: bool = True,
        record: Record | None = None,
        request: Request | None = None,
    ) -> Response:
        """A streamed answer: opened once the engine is ready; the lease is released when the stream ends.

        Errors that come at once (no engine installed, backoff) still get a proper status code. A start that takes
        a while commits the answer to a 200 stream with `: loading` comments (Server-Sent Events), or, for a
        dialect whose streams cannot carry comments (Ollama's NDJSON), keeps the client waiting for the status.
        An operator's cancel ends it with ``on_error`` (or, before it began, an error answer).
        """
        ready: asyncio.Future[Endpoint] | None = None
        try:
            _attach(record)
            ready = asyncio.ensure_future(self.pool.ensure_ready(model_id, lease))
            if not loading:
                # Nothing is sent before the engine is ready: the client leaving meanwhile must be watched for.
                waited = until_disconnect(self.event_loop(), request, ready, None) if request is not None else ready
                endpoint = await waited
                if endpoint is None:
                    lease.release(keep_alive)
                    return Response(status_code=499)
                body = await open_(endpoint)
            else:
                done, _ = await asyncio.wait({ready}, timeout=min(1.0, self._loading_interval))
                body = await open_(ready.result()) if done else self._cold_stream(ready, open_, on_error)
            if record is not None:
                body = _cancellable(body, record, on_error)
            return LeasedStream(body, lease, keep_alive, media_type, waiting=ready)
        except asyncio.CancelledError:
            _cleanup(ready, lease, keep_alive)
            _cancelled_by_operator(record)
            raise
        except BaseException:
            _cleanup(ready, lease, keep_alive)
            raise

    async def _cold_stream(
        self, ready: asyncio.Future[Endpoint], open_: Opener, on_error: ErrorEvent
    ) -> AsyncIterator[bytes]:
        try:
            yield self._loading()
            while not ready.done():
                await asyncio.wait({ready}, timeout=self._loading_interval)
                if not ready.done():
                    yield self._loading()
            try:
                events = await open_(ready.result())
            except GatewayError as exc:
                yield on_error(exc)
                return
            async for event in events:
                yield event
        finally:
            if not ready.done():
                ready.cancel()

    def _loading(self) -> bytes:
        """The SSE comment sent while a stream waits: `: loading`, with download progress when there is any."""
        parts = []
        for file, state in self._events.summary()["downloads"].items():
            if state.get("state") in ("downloading", "retrying", "waiting"):
                done, total = state.get("bytes") or 0, state.get("total")
                share = f" {100 * done / total:.0f}%" if total else ""
                eta = f", ETA {state['eta']:.0f} s" if state.get("eta") is not None else ""
                parts.append(f" {file}{share} ({done} of {total or '?'} bytes{eta})")
        if not parts:
            return LOADING
        return (": loading" + ";".join(parts)).replace("\n", " ").encode() + b"\n\n"


def _attach(record: Record | None) -> None:
    """Let an operator's cancel reach the task now working for ``record``."""
    if record is None:
        return
    if record.cancelled:
        raise RequestCancelled()
    record.task = asyncio.current_task()


def _cleanup(ready: asyncio.Future[Endpoint] | None, lease: Lease, keep_alive: float | None) -> None:
    """A stream that will not be sent: stop waiting for its engine, give its lease back."""
    if ready is not None:
        ready.cancel()
    lease.release(keep_alive)


def _cancelled_by_operator(record: Record | None) -> None:
    """Called with a CancelledError in flight: if an operator's cancel caused it, take it back (the task goes on, to
    answer) and raise :class:`RequestCancelled` instead; otherwise let the cancellation go on."""
    if record is None or not record.cancelled:
        return
    uncancel = getattr(asyncio.current_task(), "uncancel", None)  # Python 3.11+; nothing to take back before
    if uncancel is None or uncancel() == 0:
        raise RequestCancelled() from None


async def _cancellable(body: AsyncIterator[bytes], record: Record, on_error: ErrorEvent) -> AsyncIterator[bytes]:
    """A stream an operator's cancel ends with the dialect's error event (and with it the engine request)."""
    try:
        _attach(record)
        async for chunk in body:
            yield chunk
    except RequestCancelled as exc:
        yield on_error(exc)
    except asyncio.CancelledError:
        try:
            _cancelled_by_operator(record)
        except RequestCancelled as exc:
            yield on_error(exc)
            return
        raise

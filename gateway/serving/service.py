"""Serving a model call, whatever dialect it came in: the one place that holds an engine for a request.

A route describes what it wants as a :class:`~gateway.serving.calls.ModelCall` and returns
``serving.serve(call)``: an ASGI answer that does nothing until the server sends it. Sending it runs, top to bottom::

    lease(model) -> [ensure_ready(model)] -> the work -> the answer, whole or streamed -> lease.release(keep_alive)

all inside :meth:`_Served.__call__`, so the lease has one owner and is released in one ``finally``, also for a
stream that outlives the route's handler. While the work runs, the client's connection is watched: a client that
leaves at any moment (before the first byte included) cancels the work, and with it the engine request (its
connection is closed, which is how an engine learns that nobody listens). An operator's cancel (the console,
``/admin/requests/{id}/cancel``) cancels the same work and answers :class:`RequestCancelled` in the dialect: an error
answer before anything was sent, the dialect's error event after.

Errors before the first byte propagate as :class:`GatewayError` to the app's handlers, which answer in the route's
dialect with the right status; errors after it are the dialect's last event.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import orjson
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from ..cache.embeddings import Embeddings
from ..catalog import Model
from ..chat.streams import Event
from ..console.tracker import Record, Tracker, current
from ..engine.launcher import Endpoint
from ..engine.lifecycle import Lease
from ..engine.pool import EnginePool
from ..errors import EngineUnavailable, GatewayError, RequestCancelled, WarmElsewhere
from ..events import SSE_HEADERS, EventBus
from ..events import Event as BusEvent
from ..fleet.peers import Peers, request_key
from ..upstream.relay import ModelRename, Relay
from . import chat
from .calls import ChatWork, EmbeddingWork, LoadWork, ModelCall, RelayWork
from .limits import PromptLimits

T = TypeVar("T")
LOADING = b": loading\n\n"


class Serving:
    """Runs model calls against the engine pool; shared by every dialect's routes."""

    def __init__(
        self,
        pool: EnginePool,
        relay: Relay,
        embeddings: Embeddings,
        events: EventBus,
        *,
        limits: PromptLimits,
        loading_interval: float,
        tracker: Tracker | None = None,
        peers: Peers | None = None,
    ) -> None:
        self.pool = pool
        self.relay = relay
        self.limits = limits
        self.tracker = tracker or Tracker()
        self._embeddings = embeddings
        self._events = events
        self._loading_interval = loading_interval
        self._peers = peers
        self._draining = False

    def start_draining(self) -> None:
        self._draining = True

    @property
    def draining(self) -> bool:
        return self._draining

    def serve(self, call: ModelCall) -> Response:
        """The answer to ``call``: served when the server sends it."""
        return _Served(self, call)

    # ------------------------------------------------------------------------------ operations of the routes

    async def unload(self, model: Model) -> None:
        """Ollama's unload (keep_alive 0 with no prompt): at once when nothing uses the engine, else as soon as the
        requests in flight are done (nobody's answer is cut)."""
        await self.pool.unload(model.id, when_idle=True)

    async def pull(self, model: Model) -> AsyncIterator[BusEvent]:
        """Fetch the model's files now, without starting its engine (Ollama's pull): the download events of its files
        as they happen; a failure raises :class:`GatewayError` at the end."""
        files = {name for name in (model.entry.file, model.entry.repo, model.source.model_id) if name}
        # Subscribed before the pull begins, so that no event of it can be missed.
        with self._events.follow() as events:
            pull = asyncio.ensure_future(self.pool.prepare(model.id))
            try:
                while not pull.done():
                    event = asyncio.ensure_future(events.get())
                    await asyncio.wait({pull, event}, return_when=asyncio.FIRST_COMPLETED)
                    if not event.done():
                        event.cancel()
                    elif event.result().details.get("file") in files:
                        yield event.result()
                for late in events.pending():  # published before the pull ended, not read yet
                    if late.details.get("file") in files:
                        yield late
                pull.result()
            finally:
                pull.cancel()

    def loading(self) -> bytes:
        """The SSE comment sent while a stream waits: `: loading`, with download progress when there is any."""
        parts = []
        summary = self._events.summary()
        for file, state in summary["conversions"].items():
            if state.get("state") == "converting":
                done, total = state.get("bytes") or 0, state.get("total")
                share = f" {100 * done / total:.0f}%" if total else ""
                parts.append(f" converting {file} to {state.get('target')}{share}")
        for file, state in summary["downloads"].items():
            if state.get("state") in ("downloading", "retrying", "waiting"):
                done, total = state.get("bytes") or 0, state.get("total")
                share = f" {100 * done / total:.0f}%" if total else ""
                eta = f", ETA {state['eta']:.0f} s" if state.get("eta") is not None else ""
                parts.append(f" {file}{share} ({done} of {total or '?'} bytes{eta})")
        if not parts:
            return LOADING
        return (": loading" + ";".join(parts)).replace("\n", " ").encode() + b"\n\n"

    # ------------------------------------------------------------------------------ the work, once leased

    async def _whole(self, call: ModelCall, lease: Lease, record: Record | None, progress: _Progress) -> Response:
        """The whole answer to a call that does not stream."""
        work, model = call.work, call.model
        if isinstance(work, EmbeddingWork):
            # The engine is started only when some item is not cached: a warm cache answers with it stopped.
            content, cache = await self._embeddings.handle(
                work.body, model, lambda: self._engine(call, lease), cache_control=work.cache_control
            )
            lease.answered()  # a no-op when the cache answered alone (no engine engaged)
            return work.write(content, cache)
        if isinstance(work, LoadWork):  # a preload is meant for this node: never sent elsewhere
            await self.pool.ensure_ready(model.id, lease)
            return work.answer()
        endpoint = await self._engine(call, lease)
        if isinstance(work, RelayWork):
            answer = await self._relayed(work, model, endpoint)
            lease.answered()
            return answer
        progress.sent = time.monotonic()
        result = await chat.answer(self.relay, endpoint.base_url, work.plan, endpoint.engine_id(model.id))
        progress.first = time.monotonic()
        lease.answered()
        if record is not None:
            self.tracker.usage(record, result.get("usage"))
        return Response(work.writer.answer(result), media_type=work.answer_media_type, headers=dict(call.headers))

    async def _engine(self, call: ModelCall, lease: Lease) -> Endpoint:
        """The engine for ``call``, once it answers; started first when it must be, unless a peer has the model warm
        and is not busy with it (gateway/fleet/peers.py): then :class:`WarmElsewhere`, for a router to retry
        elsewhere. Asked only when the work needs the engine (an embedding batch the cache answers does not)."""
        model = call.model
        if self._peers is not None and self.pool.cold(model.id):
            peer = self._peers.elsewhere(model.id, _identity(call))
            if peer is not None:
                raise WarmElsewhere(
                    f"The model '{model.id}' is not loaded on this node and is loaded on {peer.node}: try another "
                    "node. Sent here again, this request is served here, after its engine starts.",
                    node=peer.node,
                )
        return await self.pool.ensure_ready(model.id, lease)

    async def _relayed(self, work: RelayWork, model: Model, endpoint: Endpoint) -> Response:
        engine_id = endpoint.engine_id(model.id)
        payload = work.raw
        if work.edited or work.body.get("model") != engine_id:
            payload = orjson.dumps({**work.body, "model": engine_id})
        reply = await self.relay.request(endpoint.base_url, work.path, payload)
        reply = reply.renamed(ModelRename.of(engine_id, model.id))
        if work.write is not None:
            return work.write(reply)
        return Response(reply.content, status_code=reply.status, media_type=reply.content_type)

    async def _ready_for_stream(self, call: ModelCall, lease: Lease, out: _Out, writer_comments: bool) -> Endpoint:
        """The engine, for a stream. A start that takes a while commits the answer to a 200 stream with
        `: loading` comments (Server-Sent Events); a dialect whose streams cannot carry comments (Ollama's NDJSON)
        keeps the client waiting for the status instead."""
        ready = asyncio.ensure_future(self._engine(call, lease))
        try:
            done, _ = await asyncio.wait({ready}, timeout=min(1.0, self._loading_interval))
            if not done and writer_comments:
                await out.body(self.loading())
                while not ready.done():
                    await asyncio.wait({ready}, timeout=self._loading_interval)
                    if not ready.done():
                        await out.body(self.loading())
            return await ready
        finally:
            ready.cancel()  # nothing waits on for nobody (a no-op once it is done)

    async def _stream(
        self, call: ModelCall, work: ChatWork, lease: Lease, record: Record | None, out: _Out, progress: _Progress
    ) -> None:
        """A streamed answer: the engine made ready, its stream opened, written in the dialect as it comes."""
        writer = work.writer
        try:
            endpoint = await self._ready_for_stream(call, lease, out, writer.loading_comments)
            engine_id = endpoint.engine_id(call.model.id)
            stream: chat.Stream
            progress.sent = time.monotonic()
            if work.plan.whole:
                result = await chat.answer(self.relay, endpoint.base_url, work.plan, engine_id)
                progress.first = time.monotonic()
                lease.answered()
                if record is not None:
                    self.tracker.usage(record, result.get("usage"))
                stream = chat.AnswerStream(work.plan, result)
            else:
                stream = await chat.open_stream(self.relay, endpoint.base_url, work.plan, engine_id)
                stream.events = self._observed(stream.events, stream, call.model, lease, record, progress)
            async with contextlib.aclosing(writer.stream(stream)) as chunks:  # type: ignore[type-var]
                async for chunk in chunks:
                    await out.body(chunk)
        except GatewayError as exc:
            if not out.started:
                raise  # nothing sent yet: an error answer with its status
            await out.body(writer.failed(exc))
        await out.end()

    async def _observed(
        self,
        events: AsyncIterator[Event],
        stream: chat.Stream,
        model: Model,
        lease: Lease,
        record: Record | None,
        progress: _Progress,
    ) -> AsyncIterator[Event]:
        """A stream's engine events, noting the first token's time (the engine's prefill speed with it) and, at the
        end, the usage."""
        async for event in events:
            if progress.first is None and event.comment is None:
                progress.first = time.monotonic()
                lease.answered()
                if progress.prompt_tokens is not None and progress.sent is not None:
                    self.pool.prefilled(model.id, progress.prompt_tokens, progress.first - progress.sent)
                if record is not None:
                    self.tracker.first_token(record)
            yield event
        if record is not None:
            self.tracker.usage(record, stream.usage())


def _identity(call: ModelCall) -> bytes:
    """What makes a request the same one when a router sends it back: its model and what the engine would get."""
    work = call.work
    if isinstance(work, ChatWork):
        return request_key(call.model.id, work.plan.path.encode(), *map(_canonical, work.plan.bodies))
    if isinstance(work, RelayWork):
        return request_key(call.model.id, work.path.encode(), work.raw)
    if isinstance(work, EmbeddingWork):
        return request_key(call.model.id, _canonical(work.body))
    return request_key(call.model.id)


def _canonical(body: Mapping[str, object]) -> bytes:
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


@dataclass
class _Progress:
    """How far a chat call got with its engine: what a call abandoned during its prefill is judged by."""

    prompt_tokens: int | None = None  # counted before any engine saw it (gateway/serving/limits.py)
    sent: float | None = None  # when its engine request went out (monotonic)
    first: float | None = None  # when the engine's first event came back


class _Out:
    """The answer of a stream as it is sent: its head goes out with the first byte."""

    def __init__(self, send: Send, media_type: str, headers: Mapping[str, str]) -> None:
        self._send = send
        self.started = False
        sse = media_type == "text/event-stream"
        content_type = f"{media_type}; charset=utf-8" if media_type.startswith("text/") else media_type
        head = {**(SSE_HEADERS if sse else {"x-accel-buffering": "no"}), **headers, "content-type": content_type}
        self._head: Message = {
            "type": "http.response.start",
            "status": 200,
            "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in head.items()],
        }

    async def body(self, chunk: bytes) -> None:
        if not self.started:
            self.started = True
            await self._send(self._head)
        await self._send({"type": "http.response.body", "body": chunk, "more_body": True})

    async def end(self) -> None:
        if not self.started:
            self.started = True
            await self._send(self._head)
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})


class _Served(Response):
    """The ASGI answer to one model call: takes the lease, runs the work while watching the client, releases."""

    def __init__(self, serving: Serving, call: ModelCall) -> None:
        super().__init__()  # a Response only in type: what it sends is decided when it is sent
        self._serving = serving
        self._call = call

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        serving, call = self._serving, self._call
        state = scope.setdefault("state", {})
        state["model"] = call.model.id  # for the request log and metrics
        record = current(state)
        if record is not None:
            record.model, record.stream = call.model.id, call.streams
        if serving.draining:
            raise EngineUnavailable("The gateway is shutting down.", retry_after=1)
        progress = _Progress()
        if isinstance(call.work, ChatWork):  # a prompt that cannot fit is refused before any engine starts
            checked = await serving.limits.check(call.model, call.work.plan, call.work.limit)
            if checked.plan is not call.work.plan:  # max_tokens lowered to the room the prompt leaves
                call = replace(call, work=replace(call.work, plan=checked.plan))
            progress.prompt_tokens = checked.prompt_tokens
        lease = serving.pool.lease(call.model.id)
        outcome: object = None
        try:
            if isinstance(call.work, ChatWork) and call.streams:
                media = call.work.writer.media_type
                out = _Out(send, media, call.headers)
                stream = serving._stream(call, call.work, lease, record, out, progress)
                finished = outcome = await _watched(receive, stream, record)
                if finished is _GONE:
                    if not out.started:
                        await send({"type": "http.response.start", "status": 499, "headers": []})
                elif finished is _CANCELLED:
                    if not out.started:
                        raise RequestCancelled()
                    await out.body(call.work.writer.failed(RequestCancelled()))
                    await out.end()
                return
            answer = outcome = await _watched(receive, serving._whole(call, lease, record, progress), record)
            if answer is _CANCELLED:
                raise RequestCancelled()
            if answer is _GONE:
                answer = Response(status_code=499)  # nobody reads it; the access log and metrics do
            assert isinstance(answer, Response)
            await answer(scope, receive, send)
        finally:
            lease.release(call.keep_alive)
            if outcome in (_GONE, _CANCELLED) and progress.sent is not None and progress.first is None:
                # Abandoned before the engine sent anything: it may be prefilling for nobody (the pool decides).
                serving.pool.abandoned(call.model.id, progress.prompt_tokens, time.monotonic() - progress.sent)


class _Outcome:
    def __init__(self, name: str) -> None:
        self.name = name


_GONE = _Outcome("the client left")
_CANCELLED = _Outcome("an operator cancelled it")


async def _watched(receive: Receive, work: Awaitable[T], record: Record | None) -> T | _Outcome:
    """Run ``work`` while watching the client's connection: the work's result; ``_GONE`` when the client left first
    (the work is cancelled, and with it its engine request); ``_CANCELLED`` when an operator cancelled it (through the
    record's ``interrupt``, set while the work runs).

    The work runs in the request's own task, which the watcher (or the operator) cancels the way ``asyncio.timeout``
    does, taking back exactly its own cancels however the work ends. Running the work in a task of its own, with
    ``asyncio.wait`` over it and the watcher, cost about 25 us of CPU a small chat (tests/bench/app_cpu.py;
    docs/performance.md)."""
    here = asyncio.current_task()
    assert here is not None
    before = here.cancelling()  # cancels pending when the watch began are not ours to judge
    interrupts = 0
    left = ended = False

    def interrupt() -> None:
        nonlocal interrupts
        if not ended:
            interrupts += 1
            here.cancel()

    async def watch() -> None:
        nonlocal left
        with contextlib.suppress(Exception):  # a connection whose receive fails is gone as well
            while (await receive())["type"] != "http.disconnect":
                pass  # the body was read by now: nothing else can come
        left = True
        interrupt()

    watcher = asyncio.get_running_loop().create_task(watch())
    if record is not None:
        record.interrupt = interrupt
    try:
        return await work
    except asyncio.CancelledError:
        ours, interrupts = interrupts, 0
        if not ours or _take_back(here, ours, before):
            raise  # the server's cancel (a shutdown), not ours: it goes on
        return _CANCELLED if record is not None and record.cancelled else _GONE
    finally:
        ended = True
        watcher.cancel()
        if record is not None:
            record.interrupt = None  # what is left is sending: too late for a cancel to reach it
        if interrupts:  # the work ended in spite of them (its result, or another error, stands)
            _take_back(here, interrupts, before)


def _take_back(task: asyncio.Task[Any], cancels: int, before: int) -> bool:
    """Undo ``cancels`` cancels of ours on ``task``; whether one of someone else's came since (``before``: the count
    of pending cancels when ours could begin)."""
    for _ in range(cancels):
        task.uncancel()
    return task.cancelling() > before


__all__ = ["LOADING", "Serving"]

"""Forwarding requests to the engine, and the one place where engine and transport errors become ours.

Bodies pass through as bytes. The only edit made to an answer is renaming the engine's model id to the
configured id the client asked for, done as a byte replacement on the serialised ``"model":"..."``
pair so that streams are not decoded chunk by chunk.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

from ..errors import EngineCrashed, EngineError, EngineStalled, GatewayError, error_body
from .client import (
    Deadline,
    Upstream,
    UpstreamBroken,
    UpstreamConnectError,
    UpstreamError,
    UpstreamResponse,
    UpstreamTimeout,
)

MAX_EVENT = 16 << 20  # bytes of one SSE event: more is an engine gone wrong (events carry a token or a tool call)


@dataclass(frozen=True)
class ModelRename:
    """Rewrites the engine's id of a model into the configured one, in serialised JSON."""

    pairs: tuple[tuple[bytes, bytes], ...]

    @classmethod
    def of(cls, engine_id: str, client_id: str) -> ModelRename:
        return _rename(engine_id, client_id)

    def __call__(self, data: bytes) -> bytes:
        for old, new in self.pairs:
            if old in data:
                data = data.replace(old, new)
        return data


@functools.lru_cache(maxsize=1024)
def _rename(engine_id: str, client_id: str) -> ModelRename:
    """Built once per pair of ids (a handful per gateway), not once per request."""
    if engine_id == client_id:
        return ModelRename(())
    old, new = json.dumps(engine_id).encode(), json.dumps(client_id).encode()
    # serde_json writes no space after the colon; Python's json module does.
    return ModelRename(((b'"model":' + old, b'"model":' + new), (b'"model": ' + old, b'"model": ' + new)))


@dataclass(frozen=True)
class Reply:
    status: int
    content: bytes
    content_type: str

    def renamed(self, rename: ModelRename) -> Reply:
        """The same answer with the engine's model ids made the client's."""
        return Reply(self.status, rename(self.content), self.content_type)


def engine_error(status: int, content: bytes) -> EngineError:
    """Turn an engine error answer (``{"message"}``, OpenAI-shaped, or plain text) into ours."""
    text = content.decode("utf-8", "replace").strip()
    message = text
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        inner = parsed.get("error")
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            message = inner["message"]
        elif isinstance(parsed.get("message"), str):
            message = parsed["message"]
        elif isinstance(inner, str):
            message = inner
    message = message or f"The engine answered HTTP {status} with no explanation."
    if not 400 <= status < 600:  # not an error status, yet no answer either: the engine is the one at fault
        return EngineError(f"The engine answered HTTP {status} where an answer was expected: {message}", status=502)
    param = parsed.get("param") if isinstance(parsed, dict) and isinstance(parsed.get("param"), str) else None
    if "incompatible for this model's category" in message or 400 <= status < 500:
        # The engine refused the request: OpenAI says 400 for that (the engine's own 415 and 422 included).
        status = 400
    error = EngineError(message, status=status, param=param, code="unsupported_parameter" if param else None)
    if status == 400:
        error.type = "invalid_request_error"
    return error


class Relay:
    """Sends requests to the engine over one shared, pooled upstream client.

    A whole answer must arrive within ``request_timeout`` (a total deadline: an engine that drips bytes cannot hold a
    client longer); a stream may run for as long as the engine keeps sending, with no gap longer than
    ``stall_timeout``. Every transport failure is translated into the gateway's error tree (:meth:`_translate`,
    which does nothing else) and then reported to ``on_failure``: the engine pool decides what it means for the
    engine (it checks the engine's health before it restarts anything).
    """

    def __init__(
        self,
        upstream: Upstream,
        *,
        stall_timeout: float,
        request_timeout: float,
        on_failure: Callable[[str, GatewayError], None] = lambda base_url, error: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._upstream = upstream
        self._clock = clock
        self._closed: GatewayError | None = None
        self._stall_timeout = stall_timeout
        self._request_timeout = request_timeout
        self._on_failure = on_failure

    def _failed(self, exc: UpstreamError, base_url: str) -> GatewayError:
        if self._closed is not None:
            return self._closed  # not the engine's doing: the gateway cut it off
        error = self._translate(exc, stall_timeout=self._stall_timeout, request_timeout=self._request_timeout)
        self._on_failure(base_url, error)
        return error

    async def close(self, error: GatewayError) -> None:
        """End every exchange with the engine now, each with ``error`` (the end of a graceful shutdown): closing the
        connections makes whatever waits on them, a whole answer or a stream, fail at once."""
        self._closed = error
        await self._upstream.aclose()

    async def request(self, base_url: str, path: str, body: bytes) -> Reply:
        """One non-streaming call; raises :class:`GatewayError` for any failure."""
        deadline = Deadline(total=self._request_timeout)
        if self._closed is not None:
            raise self._closed
        try:
            response = await self._upstream.post(base_url + path, body, deadline=deadline)
            content = await response.read()
        except UpstreamError as exc:
            raise self._failed(exc, base_url) from exc
        if response.status >= 400:
            raise engine_error(response.status, content)
        return Reply(response.status, content, response.content_type)

    def now(self) -> float:
        """The relay's clock: a stream's total deadline counts from a time read here before it is opened."""
        return self._clock()

    async def open_stream(self, base_url: str, path: str, body: bytes) -> UpstreamResponse:
        """Send a streaming call and wait for its headers; an error status raises before any byte is relayed.

        An engine sends a stream's head at once (mistral.rs before its prefill, then keep-alive comments), so the
        head must be complete within the stall timeout however the engine sends it: a head dripped a byte at a time
        keeps every socket read short and would otherwise hold the client for as long as the engine likes.
        """
        deadline = Deadline(total=self._request_timeout, gap=self._stall_timeout)
        if self._closed is not None:
            raise self._closed
        try:
            try:
                async with asyncio.timeout(self._stall_timeout):
                    response = await self._upstream.post(
                        base_url + path, body, deadline=deadline, headers={"accept": "text/event-stream"}
                    )
            except TimeoutError as exc:
                raise UpstreamTimeout("The engine has not completed its answer's head.", silence=True) from exc
        except UpstreamError as exc:
            raise self._failed(exc, base_url) from exc
        if response.status != 200:  # an error, or something no stream ever is (204, 304)
            try:
                async with asyncio.timeout(self._stall_timeout):
                    content = await response.read()
            except (UpstreamError, TimeoutError):
                content = b""
            raise engine_error(response.status, content)
        return response

    async def events(self, response: UpstreamResponse, base_url: str, *, started: float) -> AsyncGenerator[bytes, None]:
        """The engine's SSE bytes as they arrive, in blocks of whole events; a transport failure raises
        :class:`GatewayError` (what an event says is for the dialect reading them: gateway/openai/streams.py).

        The stall timeout bounds the silence between two bytes (the upstream's gap) and also the time an event
        takes to complete: an engine that drips the bytes of an event that never ends is as stalled as a silent one.
        The request timeout bounds the whole stream from ``started`` (read from :meth:`now` before it was opened):
        an engine that never ends, even one that keeps sending, cannot hold a client longer.
        """
        buffer = b""
        last_event = self._clock()
        try:
            async for chunk in response.chunks():
                now = self._clock()
                if now - started > self._request_timeout:
                    raise UpstreamTimeout("The engine has not finished its answer.")
                if not buffer and chunk.endswith(b"\n\n"):
                    last_event = now
                    yield chunk  # whole events, the usual case: no copy
                    continue
                buffer += chunk
                end = buffer.rfind(b"\n\n")
                if end >= 0:
                    ready, buffer = buffer[: end + 2], buffer[end + 2 :]
                    last_event = now
                    yield ready
                elif len(buffer) > MAX_EVENT:
                    raise UpstreamBroken(f"The engine sent an event larger than {MAX_EVENT >> 20} MiB.")
                elif now - last_event > self._stall_timeout:
                    raise UpstreamTimeout("The engine has not finished an event.", silence=True)
        except UpstreamError as exc:
            raise self._failed(exc, base_url) from exc
        finally:
            await response.close()
        if buffer.strip():
            yield buffer + b"\n\n"

    @staticmethod
    def _translate(exc: UpstreamError, *, stall_timeout: float, request_timeout: float) -> GatewayError:
        """The one boundary where transport failures become the gateway's errors (and nothing else happens)."""
        if isinstance(exc, UpstreamTimeout):
            return EngineStalled(
                f"The engine stalled: nothing, or nothing complete, came for {stall_timeout:g} s"
                " (GATEWAY_STALL_TIMEOUT); the request was abandoned."
                if exc.silence
                else f"The engine did not finish its answer within {request_timeout:g} s (GATEWAY_REQUEST_TIMEOUT);"
                " the request was abandoned."
            )
        if isinstance(exc, UpstreamConnectError):
            return EngineCrashed("The engine could not be reached; it may have crashed. Retry the request.")
        return EngineCrashed(f"The engine broke off its answer ({exc}). Retry the request.")


__all__ = ["ModelRename", "Relay", "Reply", "engine_error", "error_body"]

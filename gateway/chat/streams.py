"""Engine event streams made OpenAI streams.

:class:`Leg` reads the Server-Sent Events of one engine request and yields :class:`Event` items: chunks made
OpenAI-shaped (``answers.chat_chunk``), comments (keep-alives, passed on), and nothing for ``[DONE]``, which the
stream writes itself once every leg has ended, after the usage chunk when the client asked for one. Chunks that
need no change (most of them: a piece of text, no logprobs, no finish) are passed on as the engine's bytes,
undecoded: a stream costs the gateway one byte search per chunk, not a JSON round trip.

:func:`merge` runs the legs of a fanned-out request (``n`` > 1, several prompts) side by side and interleaves
their events as they come. A failure in any leg ends the whole stream with :class:`GatewayError`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from ..errors import EngineCrashed, EngineError
from . import answers
from .answers import CompletionOffsets, Shape

DONE = b"[DONE]"


@dataclass(slots=True)
class Event:
    """One outgoing event: an engine chunk passed on as bytes, a chunk the gateway rebuilt, or a comment."""

    raw: bytes | None = None  # the engine's JSON, untouched (its model id not yet renamed)
    data: dict[str, Any] | None = None
    comment: bytes | None = None  # an SSE comment line, e.g. b": keep-alive"

    def json(self, model: str) -> dict[str, Any] | None:
        """The chunk as data (None for a comment), with the client's model id."""
        if self.data is None and self.raw is not None:
            self.data = orjson.loads(self.raw)
            self.data["model"] = model
        return self.data


def split_events(block: bytes) -> Iterator[bytes]:
    """The events of a block of whole SSE events (each ends with a blank line)."""
    start = 0
    while start < len(block):
        end = block.find(b"\n\n", start)
        if end < 0:
            end = len(block)
        event = block[start:end].strip(b"\r\n")
        if event:
            yield event
        start = end + 2


class Leg:
    """The events of one engine stream, normalised; ``index`` is the choice it answers for the client."""

    def __init__(self, shape: Shape, *, chat: bool, index: int = 0) -> None:
        self.shape = shape
        self.chat = chat
        self.index = index
        self.usage: dict[str, Any] | None = None
        self.head: dict[str, Any] | None = None  # id, created, ... of a chunk: for the usage chunk
        self.done = False
        self._offsets = CompletionOffsets({})
        # The engine's bytes can pass only when nothing in them needs changing: one choice numbered 0, no
        # logprobs to reshape, no usage or finish to handle, no tool calls to trim, no forced call's text to hold.
        self._passable = index == 0 and shape.logprobs is None and not shape.forced_tools
        self._held: list[str] = []  # a forced call's text, kept back (answers.Shape.forced_tools)

    async def events(self, blocks: AsyncGenerator[bytes, None]) -> AsyncIterator[Event]:
        async with contextlib.aclosing(blocks):  # at [DONE] too: that hands the connection back at once
            async for block in blocks:
                for event in split_events(block):
                    out = self.feed(event)
                    if out is not None:
                        yield out
                    if self.done:
                        return
        raise EngineCrashed("The engine ended the stream before it was complete (no [DONE]). Retry the request.")

    def feed(self, event: bytes) -> Event | None:
        data: bytes | None = None
        comments: list[bytes] = []
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                data = line[5:].strip() if data is None else data + b"\n" + line[5:].strip()
            elif line.startswith(b":"):
                comments.append(line)
        if data is None:
            return Event(comment=b"\n".join(comments)) if comments else None
        if data == DONE:
            self.done = True
            return None
        if data[:1] != b"{":
            # The engine reports a failure inside a stream as a plain-text event.
            raise EngineError(data.decode("utf-8", "replace"), status=500)
        if self._passable and self._plain(data):
            return Event(raw=data)
        try:
            body = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise EngineError(f"The engine sent an event that is not JSON: {data[:200]!r}", status=502) from exc
        if not isinstance(body, dict):
            raise EngineError(f"The engine sent an event that is not a JSON object: {data[:200]!r}", status=502)
        if self.chat:
            parts = answers.chat_chunk(body, self.shape, self.index)
        else:
            parts = answers.completion_chunk(body, self.shape, self._offsets, self.index)
        if parts.usage is not None:
            self.usage = parts.usage
        if parts.chunk is None:
            return None
        if self.shape.forced_tools and self.chat:
            return self._forced(parts.chunk)
        self.head = parts.chunk
        return Event(data=parts.chunk)

    def _forced(self, chunk: dict[str, Any]) -> Event | None:
        """A chunk of a forced call: its text held back (the engine sends the call itself once it is whole); cut
        by max_tokens, the last chunk carries the call as far as it got."""
        for choice in chunk["choices"]:
            delta = choice["delta"]
            if delta.get("content"):
                self._held.append(delta["content"])
            delta.pop("content", None)
            if choice["finish_reason"] == "length" and not delta.get("tool_calls") and self._held:
                cut = answers.cut_tool_call("".join(self._held), self.shape.forced_tools)
                if cut is not None:
                    delta["tool_calls"] = [{**cut, "index": 0}]
        if not any(
            c["finish_reason"] or c["delta"].get("tool_calls") or c["delta"].get("role") for c in chunk["choices"]
        ):
            return None
        self.head = chunk
        return Event(data=chunk)

    def _plain(self, data: bytes) -> bool:
        if b'"finish_reason":null' not in data or b'"logprobs":null' not in data:
            return False
        if self.chat:
            return b'"usage":null' in data and b'"tool_calls":[' not in data
        return b'"usage"' not in data or b'"usage":null' in data


def merge(streams: list[AsyncIterator[Event]]) -> AsyncIterator[Event]:
    """The events of several legs as they come; the first failure cancels the others and is raised. One leg is
    passed on as it is (a layer less for every chunk of the usual stream)."""
    return streams[0] if len(streams) == 1 else _interleave(streams)


async def _interleave(streams: list[AsyncIterator[Event]]) -> AsyncIterator[Event]:
    # Unbounded: a leg's pump must always be able to hand over its end, even when nobody reads any more; what
    # waits in it is bounded by the generation itself.
    queue: asyncio.Queue[Event | Exception | None] = asyncio.Queue()

    async def pump(stream: AsyncIterator[Event]) -> None:
        try:
            async for event in stream:
                queue.put_nowait(event)
        except Exception as exc:
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(None)

    tasks = [asyncio.create_task(pump(stream), name="stream-leg") for stream in streams]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task


def usage_total(legs: list[Leg], prompts: int) -> dict[str, Any] | None:
    """The usage of a fanned-out stream: every leg's completion tokens, each prompt's tokens once."""
    n = len(legs) // prompts
    total: dict[str, Any] | None = None
    for i, leg in enumerate(legs):
        if leg.usage is None:
            return None  # an engine that reports no usage for this kind of stream: nothing true to send
        total = answers.add_usage(total, leg.usage, prompt=i % n == 0)
    return total


class ToolCallPieces:
    """The tool calls of a chat stream put together from their pieces (chunks may interleave several calls), for
    dialects that send each call whole: OpenAI's call shape, in the order the calls began."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, Any]] = {}

    def add(self, pieces: list[dict[str, Any]] | None) -> None:
        for piece in pieces or []:
            index = piece.get("index", 0)
            if index not in self._calls:
                self._calls[index] = {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
            call = self._calls[index]
            function = piece.get("function") or {}
            call["id"] = call["id"] or piece.get("id")
            call["function"]["name"] += function.get("name") or ""
            call["function"]["arguments"] += function.get("arguments") or ""

    def calls(self) -> list[dict[str, Any]]:
        return list(self._calls.values())

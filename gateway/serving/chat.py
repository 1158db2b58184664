"""Serving chat and completions requests: send a :class:`Plan` to the engine, put the answers together.

Whole answers are decoded, normalised and merged (``answers.merge_answers``); streams come back as
:class:`~gateway.chat.streams.Event` items that a dialect writes out: OpenAI's SSE here (:func:`openai_sse`),
the Responses API's events in ``responses.py``. Fanned-out requests run side by side, and the first failure
cancels the rest.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson

from ..chat import answers, streams
from ..chat.plans import Plan
from ..chat.streams import Event, Leg
from ..errors import EngineError, GatewayError
from .relay import ModelRename, Relay, error_event
from .upstream import UpstreamResponse

T = TypeVar("T")


async def gather_all(coros: Sequence[Awaitable[T]]) -> list[T]:
    """All results in order; the first failure cancels the others (and every started call is awaited). One call is
    awaited in the caller's task (a task per request is a cost the usual request need not pay)."""
    if len(coros) == 1:
        return [await coros[0]]
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _encode(body: dict[str, Any], engine_id: str) -> bytes:
    return orjson.dumps({"model": engine_id, **body})


def _decode(content: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(content)
    except orjson.JSONDecodeError as exc:
        raise EngineError(
            f"The engine answered with something that is not JSON: {content[:200]!r}", status=502
        ) from exc
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        raise EngineError(f"The engine's answer has no choices: {content[:200]!r}", status=502)
    return data


async def answer(relay: Relay, base_url: str, plan: Plan, engine_id: str) -> dict[str, Any]:
    """The OpenAI answer to a non-streaming plan."""
    replies = await gather_all([relay.request(base_url, plan.path, _encode(b, engine_id)) for b in plan.bodies])
    bodies = [_decode(reply.content) for reply in replies]
    return answers.merge_answers(bodies, plan.shapes(), chat=plan.chat, prompts=plan.prompts)


@dataclass
class Stream:
    """A plan's engine streams, open (their status was not an error) and not yet read."""

    plan: Plan
    legs: list[Leg]
    events: AsyncIterator[Event]
    rename: ModelRename

    def usage(self) -> dict[str, Any] | None:
        return streams.usage_total(self.legs, self.plan.prompts)

    def head(self) -> dict[str, Any] | None:
        return next((leg.head for leg in self.legs if leg.head is not None), None)


async def open_stream(relay: Relay, base_url: str, plan: Plan, engine_id: str) -> Stream:
    """Open every leg's engine stream; an engine error status raises here, before anything is sent."""
    calls = (relay.open_stream(base_url, plan.path, _encode(b, engine_id)) for b in plan.bodies)
    opened: list[UpstreamResponse | BaseException] = list(await asyncio.gather(*calls, return_exceptions=True))
    failure = next((r for r in opened if isinstance(r, BaseException)), None)
    if failure is not None:
        for response in opened:
            if not isinstance(response, BaseException):
                await response.close()
        raise failure
    legs = [Leg(shape, chat=plan.chat, index=i) for i, shape in enumerate(plan.shapes())]
    responses = [r for r in opened if not isinstance(r, BaseException)]
    merged = streams.merge([leg.events(relay.events(r, base_url)) for leg, r in zip(legs, responses, strict=True)])
    return Stream(plan, legs, merged, ModelRename.of(engine_id, plan.shape.model))


async def whole_as_sse(answer: dict[str, Any], shape: answers.Shape) -> AsyncIterator[bytes]:
    """A whole answer sent as a stream (``Plan.whole``): one chunk per choice, the usage chunk, ``[DONE]``."""
    fields = ("id", "object", "created", "model", "system_fingerprint")
    head: dict[str, Any] = {key: answer[key] for key in fields if key in answer}
    for choice in answer["choices"]:
        chunk = {**head, "choices": [choice]}
        if shape.include_usage:
            chunk["usage"] = None
        yield b"data: " + orjson.dumps(chunk) + b"\n\n"
    if shape.include_usage and answer.get("usage") is not None:
        yield b"data: " + orjson.dumps(answers.usage_chunk(head, answer["usage"], shape)) + b"\n\n"
    yield b"data: [DONE]\n\n"


async def openai_sse(stream: Stream) -> AsyncIterator[bytes]:
    """OpenAI's Server-Sent Events for a stream: the chunks, the usage chunk if asked for, ``[DONE]``; a failure
    after the start is one final error event."""
    rename = stream.rename
    try:
        async for event in stream.events:
            if event.raw is not None:
                yield b"data: " + rename(event.raw) + b"\n\n"
            elif event.data is not None:
                yield b"data: " + orjson.dumps(event.data) + b"\n\n"
            elif event.comment:
                yield event.comment + b"\n\n"
        shape = stream.plan.shape
        total, head = stream.usage(), stream.head()
        if shape.include_usage and total is not None and head is not None:
            yield b"data: " + orjson.dumps(answers.usage_chunk(head, total, shape)) + b"\n\n"
        yield b"data: [DONE]\n\n"
    except GatewayError as exc:
        yield error_event(exc)

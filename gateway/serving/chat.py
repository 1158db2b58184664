"""Running a chat or completions :class:`Plan` against the engine, and putting its answers together.

Whole answers are decoded, normalised and merged (``answers.merge_answers``); streams come back as a :class:`Stream`
of :class:`~gateway.chat.streams.Event` items that a dialect writes out (OpenAI's SSE, the Responses API's events,
Anthropic's, Ollama's lines). Fanned-out requests run side by side, and the first failure cancels the rest.
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
from ..errors import EngineError
from ..upstream.client import UpstreamResponse
from ..upstream.relay import ModelRename, Relay

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


class AnswerStream(Stream):
    """A whole answer told as a stream (``Plan.whole``): one chunk per choice, then what a stream ends with."""

    def __init__(self, plan: Plan, answer: dict[str, Any]) -> None:
        fields = ("id", "object", "created", "model", "system_fingerprint")
        self._head: dict[str, Any] = {key: answer[key] for key in fields if key in answer}
        self._usage = answer.get("usage")
        extra = {"usage": None} if plan.shape.include_usage else {}
        chunks = [Event(data={**self._head, "choices": [choice], **extra}) for choice in answer["choices"]]
        super().__init__(plan, [], _replay(chunks), ModelRename.of(plan.shape.model, plan.shape.model))

    def usage(self) -> dict[str, Any] | None:
        return self._usage

    def head(self) -> dict[str, Any] | None:
        return self._head


async def _replay(events: list[Event]) -> AsyncIterator[Event]:
    for event in events:
        yield event


async def open_stream(relay: Relay, base_url: str, plan: Plan, engine_id: str) -> Stream:
    """Open every leg's engine stream; an engine error status raises here, before anything is sent."""
    started = relay.now()
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
    merged = streams.merge(
        [leg.events(relay.events(r, base_url, started=started)) for leg, r in zip(legs, responses, strict=True)]
    )
    return Stream(plan, legs, merged, ModelRename.of(engine_id, plan.shape.model))

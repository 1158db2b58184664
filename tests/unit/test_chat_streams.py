"""gateway/openai/streams.py: engine events in, OpenAI stream events out, fed event by event."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator

import pytest

from gateway.chat.answers import Shape
from gateway.chat.streams import Event, Leg, merge, split_events, usage_total
from gateway.errors import EngineCrashed, EngineError

PIECE = (
    b'{"id":"1","object":"chat.completion.chunk","created":1,"model":"e","choices":[{"index":0,'
    b'"delta":{"role":"assistant","content":"Hi"},"finish_reason":null,"logprobs":null}],"usage":null}'
)
LAST = (
    b'{"id":"1","object":"chat.completion.chunk","created":1,"model":"e","choices":[{"index":0,'
    b'"delta":{"role":"assistant","content":""},"finish_reason":"stop","logprobs":null}],'
    b'"usage":{"prompt_tokens":4,"completion_tokens":2,"total_tokens":6}}'
)


def test_events_are_split_on_blank_lines() -> None:
    assert list(split_events(b"data: a\n\n: ping\n\ndata: b\n\n")) == [b"data: a", b": ping", b"data: b"]


def test_a_plain_piece_passes_as_the_engines_bytes() -> None:
    leg = Leg(Shape("m"), chat=True)
    event = leg.feed(b"data: " + PIECE)
    assert event is not None and event.raw == PIECE and event.data is None
    assert event.json("m") == {**json.loads(PIECE), "model": "m"}


def test_the_last_chunk_is_rebuilt_and_its_usage_kept_aside() -> None:
    leg = Leg(Shape("m", include_usage=True), chat=True)
    event = leg.feed(b"data: " + LAST)
    assert event is not None and event.data is not None
    assert event.data["usage"] is None and event.data["choices"][0]["finish_reason"] == "stop"
    assert leg.usage == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    assert leg.feed(b"data: [DONE]") is None and leg.done


def test_a_second_choice_is_always_rebuilt_with_its_index() -> None:
    event = Leg(Shape("m"), chat=True, index=2).feed(b"data: " + PIECE)
    assert event is not None and event.raw is None and event.data is not None
    assert event.data["choices"][0]["index"] == 2


def test_comments_pass_and_plain_text_data_is_the_engines_error() -> None:
    leg = Leg(Shape("m"), chat=True)
    comment = leg.feed(b": keep-alive")
    assert comment is not None and comment.comment == b": keep-alive"
    with pytest.raises(EngineError, match="out of memory"):
        leg.feed(b"data: out of memory")


async def _blocks(*blocks: bytes) -> AsyncGenerator[bytes, None]:
    for block in blocks:
        yield block


async def test_a_stream_that_ends_without_done_is_an_error() -> None:
    leg = Leg(Shape("m"), chat=True)
    with pytest.raises(EngineCrashed, match="before it was complete"):
        async for _ in leg.events(_blocks(b"data: " + PIECE + b"\n\n")):
            pass


async def test_a_stream_ends_at_done_and_closes_its_source() -> None:
    closed = asyncio.Event()

    async def source() -> AsyncGenerator[bytes, None]:
        try:
            yield b"data: " + PIECE + b"\n\ndata: " + LAST + b"\n\ndata: [DONE]\n\n"
            yield b"data: never read\n\n"
        finally:
            closed.set()

    leg = Leg(Shape("m"), chat=True)
    events = [e async for e in leg.events(source())]
    assert len(events) == 2 and closed.is_set()


async def test_merged_legs_interleave_and_a_failure_ends_them_all() -> None:
    async def leg(name: str, count: int, fail: bool = False) -> AsyncIterator[Event]:
        for i in range(count):
            await asyncio.sleep(0)
            yield Event(comment=f"{name}{i}".encode())
        if fail:
            raise EngineCrashed("leg failed")

    seen = [e.comment async for e in merge([leg("a", 3), leg("b", 3)])]
    assert sorted(c for c in seen if c) == [b"a0", b"a1", b"a2", b"b0", b"b1", b"b2"]
    with pytest.raises(EngineCrashed):
        async for _ in merge([leg("a", 100), leg("b", 2, fail=True)]):
            pass


def test_stream_usage_sums_legs_and_counts_each_prompt_once() -> None:
    legs = [Leg(Shape("m"), chat=False, index=i) for i in range(4)]
    for leg, prompt in zip(legs, (3, 3, 10, 10), strict=True):
        leg.usage = {"prompt_tokens": prompt, "completion_tokens": 5, "total_tokens": prompt + 5}
    assert usage_total(legs, prompts=2) == {"prompt_tokens": 13, "completion_tokens": 20, "total_tokens": 33}
    legs[1].usage = None  # an engine that reports no usage: nothing is made up
    assert usage_total(legs, prompts=2) is None

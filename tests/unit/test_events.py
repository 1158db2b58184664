"""The event bus: log lines, the ring buffer, followers (history then live), slow followers, the summary."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import AsyncGenerator, Callable

import pytest

from gateway.events import DROPPED, Event, EventBus
from gateway.masking import MASK, Masker


class FakeWallClock:
    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


async def until(condition: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    """Let the loop run until ``condition()`` holds; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0)


async def started(bus: EventBus, stream: AsyncGenerator[Event, None]) -> asyncio.Task[Event]:
    """Begin following: the first ``__anext__`` registers the follower."""
    before = bus.followers
    task = asyncio.ensure_future(stream.__anext__())
    await until(lambda: bus.followers > before or task.done(), "the follower to register")
    return task


def test_publish_logs_one_json_line_with_an_iso_utc_timestamp(caplog: pytest.LogCaptureFixture) -> None:
    bus = EventBus(clock=FakeWallClock(1_700_000_000.25))
    with caplog.at_level(logging.INFO, logger="gateway.events"):
        event = bus.publish("engine.ready", pid=42, url="http://127.0.0.1:1234")
    assert event.time == "2023-11-14T22:13:20.250Z"
    records = [r for r in caplog.records if r.name == "gateway.events"]
    assert len(records) == 1
    logged = json.loads(records[0].getMessage())
    assert logged == {
        "seq": 1,
        "type": "engine.ready",
        "time": "2023-11-14T22:13:20.250Z",
        "details": {"pid": 42, "url": "http://127.0.0.1:1234"},
    }


def test_progress_ticks_are_logged_at_debug_level(caplog: pytest.LogCaptureFixture) -> None:
    bus = EventBus(clock=FakeWallClock())
    with caplog.at_level(logging.DEBUG, logger="gateway.events"):
        bus.publish("download.progress", file="a", bytes=1)
        bus.publish("download.done", file="a", bytes=1)
    assert [r.levelno for r in caplog.records] == [logging.DEBUG, logging.INFO]


def test_details_that_are_not_json_are_logged_as_text(caplog: pytest.LogCaptureFixture) -> None:
    bus = EventBus(clock=FakeWallClock())
    with caplog.at_level(logging.INFO, logger="gateway.events"):
        bus.publish("download.failed", file="a.gguf", error=ValueError("boom"))
    assert json.loads(caplog.records[-1].getMessage())["details"]["error"] == "boom"


def test_a_detail_may_be_called_type() -> None:
    assert EventBus().publish("engine.crashed", type="oom").details == {"type": "oom"}


def test_ring_buffer_keeps_the_last_n_events_in_order() -> None:
    bus = EventBus(history=3, clock=FakeWallClock())
    for n in range(5):
        bus.publish("engine.starting", n=n)
    assert [e.details["n"] for e in bus.history()] == [2, 3, 4]
    assert [e.seq for e in bus.history()] == [3, 4, 5]


async def test_a_follower_gets_the_history_then_live_events() -> None:
    bus = EventBus(clock=FakeWallClock())
    bus.publish("engine.starting")
    bus.publish("engine.ready")
    received: list[str] = []
    async with contextlib.aclosing(bus.subscribe()) as stream:
        async for event in stream:
            received.append(event.type)
            if event.type == "engine.ready":
                bus.publish("engine.stopped", reason="idle")
            if event.type == "engine.stopped":
                break
    assert received == ["engine.starting", "engine.ready", "engine.stopped"]
    assert bus.followers == 0


async def test_replay_false_follows_live_events_only() -> None:
    bus = EventBus(clock=FakeWallClock())
    bus.publish("engine.starting")
    stream = bus.subscribe(replay=False)
    first = await started(bus, stream)
    bus.publish("engine.ready")
    assert (await first).type == "engine.ready"
    await stream.aclose()
    assert bus.followers == 0


async def test_every_follower_gets_every_event() -> None:
    bus = EventBus(clock=FakeWallClock())
    streams = [bus.subscribe(replay=False) for _ in range(3)]
    firsts = [await started(bus, s) for s in streams]
    bus.publish("engine.ready")
    assert [(await f).type for f in firsts] == ["engine.ready"] * 3
    for stream in streams:
        await stream.aclose()


async def test_a_slow_follower_loses_events_and_is_told_how_many() -> None:
    bus = EventBus(queue_size=3, clock=FakeWallClock())
    stream = bus.subscribe(replay=False)
    first = await started(bus, stream)
    for n in range(1, 11):  # nobody reads meanwhile: 3 fit, 7 are lost
        bus.publish("download.progress", file="a", n=n)
    got = [await first]
    got += [await stream.__anext__() for _ in range(2)]
    assert [e.details["n"] for e in got] == [1, 2, 3]

    bus.publish("download.progress", file="a", n=11)
    notice = await stream.__anext__()
    assert notice.type == DROPPED
    assert notice.details == {"dropped": 7}
    assert notice.seq == 10  # the last event it lost
    assert (await stream.__anext__()).details["n"] == 11
    await stream.aclose()


async def test_a_slow_follower_does_not_slow_publishers_or_other_followers() -> None:
    bus = EventBus(queue_size=2, clock=FakeWallClock())
    slow = bus.subscribe(replay=False)
    await started(bus, slow)
    fast_events: list[int] = []

    async def fast() -> None:
        async for event in bus.subscribe(replay=False):
            fast_events.append(event.details["n"])
            if event.details["n"] == 50:
                return

    fast_task = asyncio.create_task(fast())
    await until(lambda: bus.followers == 2, "the fast follower")
    for n in range(1, 51):
        bus.publish("download.progress", file="a", n=n)
        await asyncio.sleep(0)  # the fast follower gets a turn, the slow one never reads
    await asyncio.wait_for(fast_task, 5)
    assert fast_events == list(range(1, 51))
    await slow.aclose()


async def test_events_published_from_another_thread_reach_followers() -> None:
    bus = EventBus(clock=FakeWallClock())
    stream = bus.subscribe(replay=False)
    first = await started(bus, stream)
    thread = threading.Thread(target=lambda: bus.publish("download.progress", file="a", bytes=1))
    thread.start()
    thread.join()
    assert (await asyncio.wait_for(first, 5)).details == {"file": "a", "bytes": 1}
    await stream.aclose()


def test_summary_tracks_each_file_and_the_last_engine_event() -> None:
    clock = FakeWallClock()
    bus = EventBus(history=1, clock=clock)  # the summary must not depend on the ring buffer
    bus.publish("download.present", file="b.gguf", path="/m/b.gguf", bytes=10, verified=True)
    bus.publish("download.started", url="http://x/a", file="a.gguf", path="/m/a", total=1000, resumed_from=100)
    summary = bus.summary()["downloads"]
    assert summary["a.gguf"]["state"] == "downloading"
    assert summary["a.gguf"]["bytes"] == 100
    assert summary["b.gguf"]["state"] == "present"

    bus.publish("download.progress", file="a.gguf", bytes=500, total=1000, rate=100, eta=5.0)
    a = bus.summary()["downloads"]["a.gguf"]
    assert (a["state"], a["bytes"], a["total"], a["rate"], a["eta"]) == ("downloading", 500, 1000, 100, 5.0)

    bus.publish("download.retry", url="http://x/a", file="a.gguf", attempt=1, delay=1.0, error="cut")
    assert bus.summary()["downloads"]["a.gguf"]["state"] == "retrying"
    bus.publish("download.done", url="http://x/a", file="a.gguf", bytes=1000, seconds=3.0, sha256="0" * 64)
    a = bus.summary()["downloads"]["a.gguf"]
    assert (a["state"], a["bytes"], a["rate"], a["eta"], a["error"]) == ("done", 1000, None, None, None)

    bus.publish("download.failed", url="http://x/c", file="c.gguf", error="404")
    assert bus.summary()["downloads"]["c.gguf"]["state"] == "failed"
    assert bus.summary()["downloads"]["c.gguf"]["error"] == "404"

    assert bus.summary()["engine"] is None
    bus.publish("engine.ready", pid=7)
    engine = bus.summary()["engine"]
    assert engine is not None and engine["type"] == "engine.ready" and engine["details"] == {"pid": 7}


def test_queue_size_must_leave_room_for_the_notice() -> None:
    with pytest.raises(ValueError):
        EventBus(queue_size=1)


def test_secrets_in_an_events_details_are_masked_in_history_json_and_log(caplog: pytest.LogCaptureFixture) -> None:
    bus = EventBus(clock=FakeWallClock(), masker=Masker(["redisPassw0rd77"]))
    with caplog.at_level(logging.INFO, logger="gateway.events"):
        event = bus.publish("engine.crashed", error="output: redis://:redisPassw0rd77@h", lines=["redisPassw0rd77"])
    assert event.details == {"error": f"output: redis://:{MASK}@h", "lines": [MASK]}
    assert "redisPassw0rd77" not in event.to_json() + json.dumps(bus.summary()) + caplog.text
    assert bus.history()[0].details == event.details

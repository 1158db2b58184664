"""The console's request list (gateway/tracking.py) and engine log hub (gateway/logs.py), fed by hand, and the
engine output that feeds the hub."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import pytest

from gateway.console.engine_logs import LogHub, LogLine
from gateway.console.tracker import Tracker
from gateway.engine.process import SubprocessSpawner
from gateway.masking import MASK, Masker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_record_from_start_to_finish() -> None:
    clock, counted = Clock(), []
    tracker = Tracker(capacity=2, clock=clock, wall=lambda: 0.0, on_tokens=lambda *a: counted.append(a))
    record = tracker.begin("r1", "POST", "/v1/chat/completions")
    record.model = "m"
    assert [r["id"] for r in tracker.snapshot()["in_flight"]] == ["r1"]
    clock.now += 0.25
    tracker.first_token(record)
    clock.now += 0.5
    tracker.first_token(record)  # the first one counts
    tracker.usage(record, {"prompt_tokens": 3, "completion_tokens": 4})
    tracker.usage(record, {"prompt_tokens": 1, "completion_tokens": 1})  # several engine calls add up
    tracker.finish(record, status=200, model=None, cache=None)
    done = tracker.snapshot()["recent"][0]
    assert done["ttft_ms"] == 250.0 and done["duration_ms"] == 750.0 and done["state"] == "done"
    assert (done["tokens_in"], done["tokens_out"]) == (4, 5) and counted == [("m", 3, 4), ("m", 1, 1)]
    assert tracker.snapshot()["in_flight"] == []
    for name in ("r2", "r3"):
        tracker.finish(tracker.begin(name, "POST", "/api/chat"), status=200, model="m", cache=None)
    assert [r["id"] for r in tracker.snapshot()["recent"]] == ["r3", "r2"]  # newest first, bounded
    tracker.finish(tracker.begin("r4", "POST", "/v1/chat/completions"), status=401, model=None, cache=None)
    assert [r["id"] for r in tracker.snapshot()["recent"]] == ["r3", "r2"]  # refused for want of a key: not listed


def test_cancel_interrupts_the_work_of_the_request() -> None:
    async def scenario() -> None:
        tracker = Tracker()
        record = tracker.begin("r1", "POST", "/v1/chat/completions")
        work = asyncio.ensure_future(asyncio.sleep(60))
        record.interrupt = work.cancel
        idle = tracker.begin("r0", "POST", "/api/pull")  # no work waits on an engine for it
        assert tracker.cancel("r0") == "not_cancellable" and not idle.cancelled
        assert tracker.cancel("r1") == "cancelled" and tracker.cancel("nope") == "not_found"
        with contextlib.suppress(asyncio.CancelledError):
            await work
        assert work.cancelled() and record.cancelled
        tracker.finish(record, status=200, model="m", cache=None)
        assert tracker.snapshot()["recent"][0]["state"] == "cancelled" and tracker.cancel("r1") == "not_found"
        twin = tracker.begin("r0", "POST", "/v1/chat/completions")  # a client reusing an id in flight
        assert twin.id != "r0" and twin.id.startswith("r0.")

    asyncio.run(scenario())


def test_log_followers_get_history_then_live_lines_of_their_engine() -> None:
    async def scenario() -> None:
        hub = LogHub(per_engine=2, queue_size=2, wall=lambda: 5.0)
        for line in ("a1", "a2", "a3"):
            hub.append("a", line)
        hub.append("b", "b1")
        assert [e.line for e in hub.history()] == ["a2", "a3", "b1"]  # bounded per engine, in order
        seen: list[object] = []

        async def follow() -> None:
            async with contextlib.aclosing(hub.follow("a", tick=0.01)) as lines:
                async for item in lines:
                    seen.append(item.line if isinstance(item, LogLine) else item)

        task = asyncio.ensure_future(follow())
        await asyncio.sleep(0.05)  # history read, a few ticks passed
        for line in ("b2", "a4", "a5", "a6", "a7", "a8"):  # a queue of 2: a6 to a8 are lost, then counted
            hub.append(line[0], line)
        await asyncio.sleep(0.05)
        hub.close()
        await asyncio.wait_for(task, 5)
        lines = [item for item in seen if item is not None]
        assert lines[:5] == ["a2", "a3", "a4", "a5", 3] and None in seen  # then, maybe, the closing line

    asyncio.run(scenario())


def test_engine_output_reaches_the_hub_as_plain_lines(tmp_path: Path) -> None:
    """The spawner hands each line of a real process's output on, without the colour codes engines print."""

    async def scenario() -> list[str]:
        lines: list[str] = []
        script = "printf '\\033[32mINFO\\033[0m loading\\n\\nready\\n'"
        proc = await SubprocessSpawner().spawn(
            ["sh", "-c", script], env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path, output=lines.append
        )
        await proc.wait()
        return lines

    assert asyncio.run(scenario()) == ["INFO loading", "ready"]


def test_the_hub_masks_secrets_in_the_lines_it_keeps() -> None:
    hub = LogHub(masker=Masker(["admin-key-123456"]))
    hub.append("a", "printing admin-key-123456 for all to see")
    assert [entry.line for entry in hub.history()] == [f"printing {MASK} for all to see"]


def test_an_engine_printing_a_secret_shows_it_masked_in_its_output_its_tail_and_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> tuple[list[str], list[str]]:
        lines: list[str] = []
        spawner = SubprocessSpawner(logging.getLogger("tests.spawner"), masker=Masker(["hf_secretToken12345"]))
        proc = await spawner.spawn(
            ["sh", "-c", "echo token=hf_secretToken12345"],
            env={"PATH": "/usr/bin:/bin"},
            cwd=tmp_path,
            output=lines.append,
        )
        await proc.wait()
        return lines, proc.output_tail()

    with caplog.at_level(logging.INFO, logger="tests.spawner"):
        output, tail = asyncio.run(scenario())
    assert output == tail == [f"token={MASK}"]
    assert f"token={MASK}" in caplog.text and "hf_secretToken12345" not in caplog.text

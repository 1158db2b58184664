"""The watch over a request's work (gateway/serving/service.py ``_watched``): the client leaving, an operator's cancel
and the server's own cancel, each at every moment that matters, fed as events on a fake connection."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from starlette.types import Message

from gateway.console.tracker import Tracker
from gateway.serving.service import _CANCELLED, _GONE, _watched


class Connection:
    """The client's side of ``receive``: the body was read already; then nothing, until the client leaves."""

    def __init__(self) -> None:
        self._gone = asyncio.Event()

    def leave(self) -> None:
        self._gone.set()

    async def receive(self) -> Message:
        await self._gone.wait()
        return {"type": "http.disconnect"}


async def test_the_works_result_when_the_client_stays() -> None:
    async def work() -> str:
        await asyncio.sleep(0)
        return "answer"

    assert await _watched(Connection().receive, work(), None) == "answer"
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_client_that_leaves_cancels_the_work_and_the_request_goes_on() -> None:
    connection, cancelled = Connection(), asyncio.Event()

    async def work() -> str:
        try:
            connection.leave()
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    assert await _watched(connection.receive, work(), None) is _GONE
    assert cancelled.is_set()
    here = asyncio.current_task()
    assert here is not None and here.cancelling() == 0  # the watcher's cancel taken back
    await asyncio.sleep(0.01)  # the request can still await (to send its 499, release its lease)


async def test_a_client_that_leaves_as_the_work_ends_gets_gone_and_one_that_leaves_after_cancels_nothing() -> None:
    connection = Connection()

    async def work() -> str:
        connection.leave()
        await asyncio.sleep(0)  # the watcher sees the client gone in this turn, before the work can return
        return "answer"

    assert await _watched(connection.receive, work(), None) is _GONE

    later = Connection()

    async def quick() -> str:
        await asyncio.sleep(0)
        return "answer"

    assert await _watched(later.receive, quick(), None) == "answer"
    later.leave()  # while the answer is sent: the watch is over
    for _ in range(5):
        await asyncio.sleep(0)  # a late cancel would land on one of these


async def test_an_operators_cancel_ends_the_work_as_cancelled() -> None:
    tracker = Tracker()
    record = tracker.begin("r1", "POST", "/v1/chat/completions")

    async def work() -> str:
        await asyncio.sleep(0)
        assert tracker.cancel("r1") == "cancelled"  # from the console, while the work waits on the engine
        await asyncio.sleep(60)
        return "never"

    assert await _watched(Connection().receive, work(), record) is _CANCELLED
    assert record.interrupt is None and tracker.cancel("r1") == "not_cancellable"  # the work is over
    here = asyncio.current_task()
    assert here is not None and here.cancelling() == 0


async def test_an_operators_cancel_as_the_client_leaves_ends_as_cancelled() -> None:
    tracker, connection = Tracker(), Connection()
    record = tracker.begin("r1", "POST", "/v1/chat/completions")

    async def work() -> str:
        await asyncio.sleep(0)
        connection.leave()
        tracker.cancel("r1")
        await asyncio.sleep(60)
        return "never"

    assert await _watched(connection.receive, work(), record) is _CANCELLED  # what the console shows
    here = asyncio.current_task()
    assert here is not None and here.cancelling() == 0


async def test_work_that_turns_the_cancel_into_an_error_raises_it_and_the_cancel_is_taken_back() -> None:
    connection = Connection()

    async def work() -> str:
        connection.leave()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            raise RuntimeError("cleanup failed") from None
        return "never"

    with pytest.raises(RuntimeError, match="cleanup failed"):
        await _watched(connection.receive, work(), None)
    here = asyncio.current_task()
    assert here is not None and here.cancelling() == 0
    await asyncio.sleep(0.01)


async def test_a_connection_whose_receive_fails_counts_as_gone() -> None:
    async def broken() -> Message:
        await asyncio.sleep(0)
        raise OSError("connection reset")

    async def work() -> str:
        await asyncio.sleep(60)
        return "never"

    assert await _watched(broken, work(), None) is _GONE


@pytest.mark.parametrize("client_leaves_too", [False, True])
async def test_the_servers_own_cancel_goes_through(client_leaves_too: bool) -> None:
    connection = Connection()
    began = asyncio.Event()

    async def work() -> str:
        began.set()
        await asyncio.sleep(60)
        return "never"

    task = asyncio.ensure_future(_watched(connection.receive, work(), None))
    await began.wait()
    if client_leaves_too:  # at the same moment: the watcher's cancel is taken back, the server's is not
        connection.leave()
    task.cancel()  # a shutdown
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_work_that_swallows_the_cancel_keeps_its_result() -> None:
    connection = Connection()

    async def work() -> str:
        connection.leave()
        with contextlib.suppress(asyncio.CancelledError):  # e.g. a cleanup that finishes the answer anyway
            await asyncio.sleep(60)
        return "answer"

    assert await _watched(connection.receive, work(), None) == "answer"
    here = asyncio.current_task()
    assert here is not None and here.cancelling() == 0
    await asyncio.sleep(0.01)

"""The lock on a model file within one process (a second holder takes another file descriptor, as another process
would): waiting, the notice of the wait, cancellation, and no lock file left behind."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.models.locking import exclusive

DEADLINE = 10.0  # for a broken lock to fail the test rather than hang it


async def test_an_uncontended_lock_is_taken_at_once_and_its_file_removed(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf.lock"
    waits: list[str] = []
    async with exclusive(path, poll=0.01, on_wait=lambda: waits.append("wait")):
        assert path.exists()
    assert waits == [] and not path.exists()


async def test_a_second_holder_is_told_it_waits_and_gets_the_lock_when_the_first_leaves(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf.lock"
    order: list[str] = []
    first_in, second_waits, first_may_leave = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def first() -> None:
        async with exclusive(path, poll=0.01, on_wait=lambda: order.append("first waits")):
            order.append("first in")
            first_in.set()
            await first_may_leave.wait()
            order.append("first out")

    def waiting() -> None:
        order.append("second waits")
        second_waits.set()

    async def second() -> None:
        await first_in.wait()
        async with exclusive(path, poll=0.01, on_wait=waiting):
            order.append("second in")

    tasks = asyncio.gather(first(), second())
    await asyncio.wait_for(second_waits.wait(), DEADLINE)
    first_may_leave.set()
    await asyncio.wait_for(tasks, DEADLINE)
    assert order == ["first in", "second waits", "first out", "second in"]
    assert not path.exists()


async def test_a_waiter_that_is_cancelled_leaves_the_lock_to_its_holder(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf.lock"
    waiting = asyncio.Event()
    async with exclusive(path, poll=0.01, on_wait=lambda: None):

        async def wait_for_it() -> None:
            async with exclusive(path, poll=0.01, on_wait=waiting.set):
                raise AssertionError("the holder still holds the lock")

        waiter = asyncio.create_task(wait_for_it())
        await asyncio.wait_for(waiting.wait(), DEADLINE)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert path.exists()
    assert not path.exists()
    async with exclusive(path, poll=0.01, on_wait=lambda: None):  # free again
        pass

"""Engine output for the console: each engine's recent lines, and live followers (``GET /logs/stream``).

The engine processes' output is read by their spawner (gateway/engine/process.py) and logged; the launcher also
hands each line here, labelled with the engine's name. A follower gets the recent history first, then the lines
as they come; one that cannot keep up loses lines rather than slowing the engines' output down, and is told how
many it lost. A line's secrets are masked as it comes in (gateway/masking.py): what the console shows of an engine is
never what it printed of a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..masking import Masker


@dataclass(frozen=True, slots=True)
class LogLine:
    seq: int
    engine: str
    time: float  # wall clock
    line: str


@dataclass
class _Follower:
    engine: str | None
    queue: asyncio.Queue[LogLine]
    dropped: int = 0


class LogHub:
    def __init__(
        self,
        *,
        per_engine: int = 500,
        queue_size: int = 1000,
        wall: Callable[[], float] = time.time,
        masker: Masker | None = None,
    ) -> None:
        self._masker = masker
        self._per_engine = per_engine
        self._queue_size = queue_size
        self._wall = wall
        self._lines: dict[str, deque[LogLine]] = {}
        self._followers: list[_Follower] = []
        self._seq = 0
        self._closed = False

    def append(self, engine: str, line: str) -> None:
        """One line of an engine's output; never blocks."""
        if self._masker is not None:
            line = self._masker.text(line)
        self._seq += 1
        entry = LogLine(self._seq, engine, self._wall(), line)
        self._lines.setdefault(engine, deque(maxlen=self._per_engine)).append(entry)
        for follower in self._followers:
            if follower.engine not in (None, engine):
                continue
            try:
                follower.queue.put_nowait(entry)
            except asyncio.QueueFull:
                follower.dropped += 1

    def history(self, engine: str | None = None) -> list[LogLine]:
        """The recent lines of one engine, or of all of them in the order they came."""
        if engine is not None:
            return list(self._lines.get(engine, ()))
        return sorted((entry for lines in self._lines.values() for entry in lines), key=lambda e: e.seq)

    async def follow(
        self, engine: str | None = None, *, tick: float | None = None
    ) -> AsyncGenerator[LogLine | int | None, None]:
        """The history, then live lines, until the caller stops (or :meth:`close`); an ``int`` in the stream is
        the number of lines this follower just lost, a ``None`` says ``tick`` seconds passed without a line (for
        keep-alives). Use with ``contextlib.aclosing``."""
        follower = _Follower(engine, asyncio.Queue(self._queue_size))
        backlog = self.history(engine)  # taken with registration, in one step of the loop: nothing falls between
        self._followers.append(follower)
        try:
            for entry in backlog:
                yield entry
            while not self._closed:
                try:
                    entry = await asyncio.wait_for(follower.queue.get(), tick)
                except TimeoutError:
                    yield None
                    continue
                yield entry
                if follower.dropped and follower.queue.empty():  # the loss came after what was queued
                    yield follower.dropped
                    follower.dropped = 0
        finally:
            self._followers.remove(follower)

    def close(self) -> None:
        """End every follower (shutdown): each gets a wake-up and sees the hub closed."""
        self._closed = True
        for follower in self._followers:
            with contextlib.suppress(asyncio.QueueFull):  # a full queue wakes its follower anyway
                follower.queue.put_nowait(LogLine(0, follower.engine or "", self._wall(), "(the gateway is stopping)"))

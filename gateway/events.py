"""The gateway's lifecycle events: one structured log line each, a short history, live followers.

Producers (the downloader, the engine pool) call :meth:`EventBus.publish`; it never blocks and never
fails because of a follower. Followers (``GET /events``, ``mistral-gateway pull``'s progress bars)
iterate :meth:`EventBus.subscribe`: the history first, then live events. A follower that cannot keep up
loses events instead of slowing the gateway down, and is told how many it lost by an
``events.dropped`` event.

Event types and their details:

- ``download.present``  file, path, bytes, verified (True when a sha256 was checked); for a repo loaded from
  huggingface_hub's cache because the hub could not be reached, also files and source
- ``download.waiting``  file, path, lock: another process holds the file's lock and is downloading it
- ``download.started``  url, file, path, total (None if unknown), resumed_from, attempt
- ``download.progress`` file, bytes, total, rate (bytes/s), eta (s; None if unknown)
- ``download.retry``    url, file, attempt, delay (s), error
- ``download.done``     url, file, path, bytes, downloaded (bytes fetched over the network), seconds, sha256
- ``download.failed``   url, file, error
- ``convert.started``   file (the converted file's name), source, target (weight type), model
- ``convert.progress``  file, bytes, total (bytes of the source's tensors read)
- ``convert.done``      file, path, bytes, seconds
- ``convert.failed``    file, error
- ``engine.starting``, ``engine.ready``, ``engine.stopped``, ``engine.crashed``: whatever the engine lifecycle adds
- ``events.dropped``    dropped: events this follower lost (sent to that follower only)

An event's details have the gateway's secrets masked as it is published (gateway/masking.py), so neither /events, nor
/status, nor the events' log lines ever carry one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .masking import Masker

WallClock = Callable[[], float]

_logger = logging.getLogger("gateway.events")

DROPPED = "events.dropped"
CLOSED = "events.closed"  # internal: ends a follower's stream at shutdown, never sent to a client

# The download events that end a file's story; a follower waiting for a set of files stops on these.
DOWNLOAD_FINAL = frozenset({"download.done", "download.failed", "download.present"})


class EventSink(Protocol):
    """Anything events can be published to; :class:`EventBus` is the real one."""

    def publish(self, type: str, /, **details: Any) -> object: ...


class NullSink:
    """Publishes nowhere: for callers that want no events (tests, one-off scripts)."""

    def publish(self, type: str, /, **details: Any) -> object:
        return None


# The headers of every text/event-stream answer (chat streams, the console's /events): not cached, and passed on by
# nginx as each event comes rather than buffered.
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


@dataclass(frozen=True)
class Event:
    """One thing that happened. ``seq`` orders events of one bus (followers resume or spot gaps by it)."""

    seq: int
    type: str
    time: str
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "type": self.type, "time": self.time, "details": dict(self.details)}

    def to_json(self) -> str:
        # default=str: a stray Path or exception in the details must not make publishing fail.
        return json.dumps(self.to_dict(), default=str, separators=(",", ":"))


@dataclass
class _Follower:
    queue: asyncio.Queue[Event]
    loop: asyncio.AbstractEventLoop
    dropped: int = 0
    last_dropped_seq: int = 0


class Subscription:
    """One follower of an :class:`EventBus`: the events published since it was made, in order."""

    def __init__(self, bus: EventBus, follower: _Follower, backlog: list[Event]) -> None:
        self._bus = bus
        self._follower = follower
        self._backlog = deque(backlog)

    async def get(self) -> Event:
        """The next event, waiting for it (a ``events.closed`` one once the bus is closed)."""
        if self._backlog:
            return self._backlog.popleft()
        return await self._follower.queue.get()

    def pending(self) -> list[Event]:
        """The events already here and not read yet, without waiting."""
        events = list(self._backlog)
        self._backlog.clear()
        queue = self._follower.queue
        while not queue.empty():
            events.append(queue.get_nowait())
        return events

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self._bus._unfollow(self._follower)


class EventBus:
    """Publishes events to the log, a ring buffer of the last ``history`` events, and followers.

    ``clock`` gives wall-clock seconds since the epoch (the timestamps are for people and logs; rates are
    computed by the producers with their own monotonic clocks). ``queue_size`` bounds each follower's
    backlog (at least 2: one slot is kept for the "you lost events" notice). Events of ``debug_types``
    are logged at DEBUG rather than INFO: progress ticks would drown the log at the default level.
    """

    def __init__(
        self,
        *,
        history: int = 500,
        queue_size: int = 1000,
        clock: WallClock = time.time,
        logger: logging.Logger = _logger,
        debug_types: Collection[str] = ("download.progress", "convert.progress"),
        masker: Masker | None = None,
    ) -> None:
        if history < 0 or queue_size < 2:
            raise ValueError("history must be >= 0 and queue_size >= 2")
        self._history: deque[Event] = deque(maxlen=history)
        self._queue_size = queue_size
        self._clock = clock
        self._log = logger
        self._debug_types = frozenset(debug_types)
        self._masker = masker
        self._followers: list[_Follower] = []
        self._downloads: dict[str, dict[str, Any]] = {}
        self._conversions: dict[str, dict[str, Any]] = {}
        self._last_engine: Event | None = None
        self._seq = 0
        self._closed = False
        # publish() may be called from a worker thread; the lock keeps seq, history and followers coherent.
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------- public

    def publish(self, type: str, /, **details: Any) -> Event:
        """Record an event and hand it to every follower; never blocks, never raises for a follower."""
        if self._masker is not None:
            details = self._masker.value(details)
        with self._lock:
            self._seq += 1
            event = Event(self._seq, type, _iso(self._clock()), details)
            self._history.append(event)
            self._track(event)
            followers = list(self._followers)
        level = logging.DEBUG if type in self._debug_types else logging.INFO
        if self._log.isEnabledFor(level):
            self._log.log(level, "%s", event.to_json())
        for follower in followers:
            self._deliver(follower, event)
        return event

    def history(self) -> list[Event]:
        with self._lock:
            return list(self._history)

    @property
    def followers(self) -> int:
        return len(self._followers)

    async def subscribe(self, *, replay: bool = True) -> AsyncGenerator[Event, None]:
        """The history (unless ``replay`` is False), then live events, until the caller stops iterating.

        Use it with ``contextlib.aclosing`` (or run it to its end in a task that gets cancelled) so the
        follower is removed at once rather than when the generator is garbage-collected.
        """
        with self.follow(replay=replay) as subscription:
            while True:
                event = await subscription.get()
                if event.type == CLOSED:
                    return
                yield event

    def follow(self, *, replay: bool = False) -> Subscription:
        """A follower registered now (every event published from here on reaches it), the history first when
        ``replay``; use it as a context manager, which removes it."""
        follower = _Follower(asyncio.Queue(self._queue_size), asyncio.get_running_loop())
        # Snapshot and registration under one lock: every event is either in the snapshot or queued.
        with self._lock:
            backlog = list(self._history) if replay else []
            if self._closed:
                backlog.append(Event(0, CLOSED, _iso(self._clock()), {}))
            self._followers.append(follower)
        return Subscription(self, follower, backlog)

    def _unfollow(self, follower: _Follower) -> None:
        with self._lock:
            if follower in self._followers:
                self._followers.remove(follower)

    def close(self) -> None:
        """End every follower's stream (the gateway is shutting down: a live /events stream would hold its
        connection open to the end of the drain)."""
        with self._lock:
            self._closed = True
            followers = list(self._followers)
        for follower in followers:
            queue = follower.queue
            if queue.full():
                queue.get_nowait()  # one event less for a follower that is going away anyway
            queue.put_nowait(Event(0, CLOSED, _iso(self._clock()), {}))

    def summary(self) -> dict[str, Any]:
        """For ``/status``: each file's download state, and the last engine event."""
        with self._lock:
            downloads = {name: dict(state) for name, state in self._downloads.items()}
            conversions = {name: dict(state) for name, state in self._conversions.items()}
            engine = self._last_engine
        return {
            "downloads": downloads,
            "conversions": conversions,
            "engine": engine.to_dict() if engine is not None else None,
        }

    # ---------------------------------------------------------------------------------- internals

    def _deliver(self, follower: _Follower, event: Event) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is follower.loop:
            self._offer(follower, event)
        elif not follower.loop.is_closed():
            # asyncio.Queue is not thread-safe: hand the event to the follower's own loop.
            follower.loop.call_soon_threadsafe(self._offer, follower, event)

    def _offer(self, follower: _Follower, event: Event) -> None:
        queue = follower.queue
        if follower.dropped:
            # The notice must come before the next event it gets, so wait until both fit.
            if queue.maxsize - queue.qsize() < 2:
                follower.dropped += 1
                follower.last_dropped_seq = event.seq
                return
            notice = Event(follower.last_dropped_seq, DROPPED, event.time, {"dropped": follower.dropped})
            queue.put_nowait(notice)
            follower.dropped = 0
        if queue.full():
            follower.dropped = 1
            follower.last_dropped_seq = event.seq
            return
        queue.put_nowait(event)

    def _track(self, event: Event) -> None:
        """Keep the per-file download state that :meth:`summary` reports (the ring buffer forgets)."""
        if event.type.startswith("engine."):
            self._last_engine = event
            return
        if event.type.startswith("convert."):
            kind = event.type.removeprefix("convert.")
            state = self._conversions.setdefault(str(event.details.get("file", "?")), {})
            state.update(event.details, state={"started": "converting", "progress": "converting"}.get(kind, kind))
            state["updated"] = event.time
            return
        if not event.type.startswith("download."):
            return
        details = event.details
        name = str(details.get("file", "?"))
        state = self._downloads.setdefault(
            name,
            {"state": "unknown", "bytes": None, "total": None, "rate": None, "eta": None, "error": None},
        )
        kind = event.type.removeprefix("download.")
        state["updated"] = event.time
        if kind == "started":
            state.update(state="downloading", bytes=details.get("resumed_from"), total=details.get("total"))
            state.update(rate=None, eta=None, error=None, url=details.get("url"))
        elif kind == "progress":
            state.update(state="downloading", bytes=details.get("bytes"), total=details.get("total"))
            state.update(rate=details.get("rate"), eta=details.get("eta"))
        elif kind == "waiting":
            state.update(state="waiting", rate=None, eta=None)
        elif kind == "retry":
            state.update(state="retrying", rate=None, eta=None, error=details.get("error"))
        elif kind in ("done", "present"):
            state.update(state=kind, bytes=details.get("bytes"), total=details.get("bytes"), rate=None, eta=None)
            state.update(error=None, path=details.get("path"))  # where the model loads from
            if "source" in details:
                state["source"] = details["source"]
        elif kind == "failed":
            state.update(state="failed", rate=None, eta=None, error=details.get("error"))


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")

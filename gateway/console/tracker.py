"""Model requests as the console shows them: the last few hundred, the ones in flight, and a way to cancel one.

The request observer opens a :class:`Record` for every model request (a POST under ``/v1/`` or ``/api/``) and
closes it with the status; the model service fills in what only it knows: the model, the time to the first token
(the engine's first chunk), the tokens in and out (the engine's usage), and how to interrupt the work waiting on the
engine, which a cancel calls. A cancelled request ends with :class:`~gateway.errors.RequestCancelled` in its own
dialect: an error answer, or for a stream an error event, which also closes the engine connection so that the
engine stops generating.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

TokenSink = Callable[[str, int, int], None]  # model, prompt tokens, completion tokens


@dataclass(eq=False)
class Record:
    id: str
    time: float  # wall clock, when it came in
    began: float  # the tracker's clock
    method: str
    path: str
    model: str | None = None
    stream: bool = False
    status: int | None = None
    duration_ms: float | None = None
    ttft_ms: float | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    cache: str | None = None
    state: str = "in_flight"  # in_flight | done | cancelled
    cancelled: bool = False
    interrupt: Callable[[], object] | None = field(default=None, repr=False)  # what a cancel calls, while it may

    def to_dict(self) -> dict[str, Any]:
        stamp = datetime.fromtimestamp(self.time, tz=UTC).isoformat(timespec="milliseconds")
        return {
            "id": self.id,
            "time": stamp.replace("+00:00", "Z"),
            "method": self.method,
            "path": self.path,
            "model": self.model,
            "stream": self.stream,
            "status": self.status,
            "duration_ms": self.duration_ms,
            "ttft_ms": self.ttft_ms,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "cache": self.cache,
            "state": self.state,
        }


class Tracker:
    def __init__(
        self,
        *,
        capacity: int = 300,
        clock: Callable[[], float] = time.perf_counter,
        wall: Callable[[], float] = time.time,
        on_tokens: TokenSink | None = None,
    ) -> None:
        self._recent: deque[Record] = deque(maxlen=capacity)
        self._in_flight: dict[str, Record] = {}
        self._clock = clock
        self._wall = wall
        self._on_tokens = on_tokens
        self._serial = 0

    @staticmethod
    def tracks(method: str, path: str) -> bool:
        return method == "POST" and path.startswith(("/v1/", "/api/"))

    def begin(self, request_id: str, method: str, path: str) -> Record:
        # A client may send the X-Request-ID of a request in flight: the list (and a cancel) must not mix them up.
        key = request_id
        while key in self._in_flight:
            self._serial += 1
            key = f"{request_id}.{self._serial}"
        record = Record(key, self._wall(), self._clock(), method, path)
        self._in_flight[key] = record
        return record

    def finish(self, record: Record, *, status: int, model: str | None, cache: str | None) -> None:
        if self._in_flight.get(record.id) is record:
            del self._in_flight[record.id]
        record.status = status
        record.model = record.model or model
        record.cache = cache
        record.duration_ms = round((self._clock() - record.began) * 1000, 1)
        record.state = "cancelled" if record.cancelled else "done"
        record.interrupt = None
        if status != 401:  # refused for want of a key: not a request anybody made, and not to crowd out the others
            self._recent.append(record)

    def first_token(self, record: Record) -> None:
        if record.ttft_ms is None:
            record.ttft_ms = round((self._clock() - record.began) * 1000, 1)

    def usage(self, record: Record, usage: dict[str, Any] | None) -> None:
        """The engine's usage for the request (added up when a request makes several engine calls)."""
        if not usage:
            return
        prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        record.tokens_in = (record.tokens_in or 0) + prompt
        record.tokens_out = (record.tokens_out or 0) + completion
        if self._on_tokens is not None and record.model:
            self._on_tokens(record.model, prompt, completion)

    def cancel(self, request_id: str) -> str:
        """``cancelled``; ``not_found`` (no such request in flight); ``not_cancellable`` (it is not waiting on an
        engine: still being read, or a request of a kind that cannot be stopped halfway, such as a pull)."""
        record = self._in_flight.get(request_id)
        if record is None:
            return "not_found"
        if record.interrupt is None:
            return "not_cancellable"
        record.cancelled = True
        record.interrupt()
        return "cancelled"

    def snapshot(self) -> dict[str, Any]:
        return {
            "recent": [r.to_dict() for r in reversed(self._recent)],
            "in_flight": [r.to_dict() for r in self._in_flight.values()],
        }


def current(scope_state: Any) -> Record | None:
    """The record of the request whose ``request.state`` (or scope state dict) this is, if it is tracked."""
    record = scope_state.get("record") if isinstance(scope_state, dict) else getattr(scope_state, "record", None)
    return record if isinstance(record, Record) else None

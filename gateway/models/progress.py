"""How far a download has come, and how to say it: the progress meter and human-readable sizes and durations.

File downloads and repo snapshots report progress the same way: :class:`ProgressMeter` decides when a
``download.progress`` event is due and computes its rate and ETA, so neither floods the event bus with one event
per chunk. The words for sizes and durations are shared by the log lines and by the progress bars of
``mistral-gateway pull`` (:mod:`gateway.models.bars`), which is why they live here and not in either.
"""

from __future__ import annotations

from collections import deque
from typing import Any


class ProgressMeter:
    """Decides when a progress event is due and computes its rate and ETA.

    An event is due when ``interval`` seconds have passed or ``step`` of the total has been added since the
    last one, so a download yields at most about ``1/step`` events plus ``1/interval`` per second, however
    small its chunks are. The rate is measured over the last ``window`` seconds: it follows a link that
    speeds up or slows down, and does not count bytes that were already on disk.
    """

    def __init__(
        self,
        total: int | None,
        start: int,
        now: float,
        *,
        interval: float = 0.5,
        step: float = 0.01,
        window: float = 5.0,
    ) -> None:
        self.total = total
        self._interval = interval
        self._step = max(1, int(total * step)) if total else None
        self._window = window
        self._samples: deque[tuple[float, int]] = deque([(now, start)])
        self._last_time = now
        self._last_bytes = start

    def update(self, done: int, now: float) -> dict[str, Any] | None:
        """The details of a progress event if one is due, else None."""
        if now - self._last_time < self._interval and (self._step is None or done - self._last_bytes < self._step):
            return None
        return self._emit(done, now)

    def finish(self, done: int, now: float) -> dict[str, Any] | None:
        """The final event, unless the last one already reported ``done`` bytes."""
        if done == self._last_bytes and len(self._samples) > 1:
            return None
        return self._emit(done, now)

    def _emit(self, done: int, now: float) -> dict[str, Any]:
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self._window:
            self._samples.popleft()
        first_time, first_bytes = self._samples[0]
        elapsed = now - first_time
        rate = (done - first_bytes) / elapsed if elapsed > 0 else None
        eta = None
        if rate and self.total is not None:
            eta = round(max(0, self.total - done) / rate, 1)
        self._last_time, self._last_bytes = now, done
        return {"bytes": done, "total": self.total, "rate": round(rate) if rate is not None else None, "eta": eta}


def human_size(size: float | None) -> str:
    """Bytes in binary units (``512 B``, ``1.5 MiB``, at most GiB); ``size unknown`` for None."""
    if size is None:
        return "size unknown"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def human_duration(seconds: Any) -> str:
    """Seconds as ``4.2 s``, ``42 s``, ``3 min 05 s`` or ``1 h 02 min``; ``?`` for anything that is not a number."""
    if not isinstance(seconds, (int, float)):
        return "?"
    whole = int(seconds)
    if whole < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{whole} s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"

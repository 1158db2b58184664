"""Progress bars for `mistral-gateway pull`, drawn from the downloader's events.

Kept apart from the downloader so that the gateway process never imports rich (memory at rest counts).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Collection

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn

from ..events import DOWNLOAD_FINAL, Event
from .progress import human_duration, human_size


class ProgressView:
    """Draws one rich progress bar per file from ``download.*`` events; ``outcome`` holds each file's end."""

    def __init__(self, console: Console | None = None) -> None:
        self.outcome: dict[str, str] = {}
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[eta]}"),
            TextColumn("{task.fields[status]}"),
            console=console,
        )
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> ProgressView:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def finished(self, files: Collection[str]) -> bool:
        return all(name in self.outcome for name in files)

    def handle(self, event: Event) -> None:
        if not event.type.startswith("download."):
            return
        details = event.details
        name = str(details.get("file", "?"))
        task = self._task(name)
        kind = event.type.removeprefix("download.")
        update = self._progress.update
        if kind == "started":
            self.outcome.pop(name, None)
            update(task, total=details.get("total"), completed=details.get("resumed_from") or 0, status="")
        elif kind == "progress":
            update(task, total=details.get("total"), completed=details.get("bytes") or 0)
            rate, eta = details.get("rate"), details.get("eta")
            update(task, rate=f"{human_size(rate)}/s" if rate else "", eta=f"{human_duration(eta)} left" if eta else "")
        elif kind == "waiting":
            update(task, status="waiting for another process")
        elif kind == "retry":
            update(task, status=f"retry {details.get('attempt')}: {details.get('error')}", rate="", eta="")
        elif kind in ("done", "present"):
            size = details.get("bytes") or 0
            status = f"done in {human_duration(details.get('seconds'))}" if kind == "done" else "already here"
            update(task, total=size, completed=size, rate="", eta="", status=status)
        elif kind == "failed":
            update(task, rate="", eta="", status="[red]failed")
            self._progress.console.print(f"[red]{name}: {details.get('error')}", markup=True, highlight=False)
        if event.type in DOWNLOAD_FINAL:
            self.outcome[name] = kind

    def _task(self, name: str) -> TaskID:
        if name not in self._tasks:
            self._tasks[name] = self._progress.add_task(name, total=None, rate="", eta="", status="")
        return self._tasks[name]


async def render_progress(
    events: AsyncIterable[Event],
    files: Collection[str] | None = None,
    *,
    console: Console | None = None,
) -> dict[str, str]:
    """Draw progress bars until every file of ``files`` is done, failed or present (or ``events`` ends).

    Returns each file's outcome: ``done``, ``present`` or ``failed``. ``events`` is usually
    ``bus.subscribe()``, subscribed before the downloads start (its history covers any head start).
    """
    view = ProgressView(console)
    try:
        with view:
            if files is not None and not files:
                return view.outcome
            async for event in events:
                view.handle(event)
                if files is not None and view.finished(files):
                    break
    finally:
        close = getattr(events, "aclose", None)
        if close is not None:
            await close()
    return view.outcome

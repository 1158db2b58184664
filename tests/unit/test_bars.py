"""The progress bars of `mistral-gateway pull`, drawn from download events into a console that writes to a string."""

from __future__ import annotations

import hashlib
import io
from collections.abc import AsyncIterator

from rich.console import Console

from gateway.events import Event, EventBus
from gateway.models.bars import render_progress

SHA = hashlib.sha256(b"a model file").hexdigest()
URL = "https://models.example/tiny.gguf"


async def test_progress_bars_render_until_every_file_is_finished() -> None:
    bus = EventBus()
    bus.publish("download.present", file="b.gguf", path="/m/b.gguf", bytes=10, verified=False)
    bus.publish("download.started", url=URL, file="a.gguf", path="/m/a.gguf", total=1000, resumed_from=0)
    bus.publish("download.progress", file="a.gguf", bytes=500, total=1000, rate=250, eta=2.0)
    bus.publish("download.retry", url=URL, file="a.gguf", attempt=1, delay=1.0, error="the connection was cut")
    bus.publish("download.done", url=URL, file="a.gguf", path="/m/a.gguf", bytes=1000, seconds=4.0, sha256=SHA)
    bus.publish("download.failed", url=URL, file="c.gguf", error="404 Not Found")
    out = io.StringIO()
    console = Console(file=out, width=160, force_terminal=False)
    outcome = await render_progress(bus.subscribe(), ["a.gguf", "b.gguf", "c.gguf"], console=console)
    assert outcome == {"a.gguf": "done", "b.gguf": "present", "c.gguf": "failed"}
    text = out.getvalue()
    assert "c.gguf: 404 Not Found" in text and "a.gguf" in text and "already here" in text
    assert bus.followers == 0


async def test_rendering_nothing_returns_at_once() -> None:
    async def no_events() -> AsyncIterator[Event]:
        return
        yield  # an async generator that ends at once

    assert await render_progress(no_events(), [], console=Console(file=io.StringIO())) == {}

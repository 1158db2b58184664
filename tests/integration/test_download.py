"""Downloads against a real local HTTP server (tests/fileserver.py): resume, restarts, atomicity, checks,
failures, and two processes sharing one model dir."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.events import EventBus
from gateway.models.download import Downloader
from gateway.models.errors import DownloadError
from tests.fileserver import FileServer
from tests.helpers import ROOT, FakeSleep, free_port

SIZE = 2 * 1024 * 1024 + 123  # not a multiple of any chunk size
FILE = "tiny-q8.gguf"


@pytest.fixture
def content() -> bytes:
    return random.Random(4).randbytes(SIZE)


@pytest.fixture
def server(content: bytes) -> Iterator[FileServer]:
    with FileServer(content) as running:
        yield running


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    return folder


@pytest.fixture
async def make(model_dir: Path) -> AsyncIterator[Callable[..., tuple[Downloader, EventBus, FakeSleep]]]:
    made: list[Downloader] = []

    def build(**kwargs: Any) -> tuple[Downloader, EventBus, FakeSleep]:
        bus, sleep = EventBus(), FakeSleep()
        options: dict[str, Any] = {"events": bus, "sleep": sleep, "attempts": 3}
        options.update(kwargs)
        downloader = Downloader(model_dir, **options)
        made.append(downloader)
        return downloader, bus, sleep

    yield build
    for downloader in made:
        await downloader.aclose()


async def until(condition: Callable[[], object], what: str, timeout: float = 15.0) -> None:
    """Poll ``condition`` without blocking the event loop; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != FILE and not p.name.endswith(".sha256"))


def types(bus: EventBus) -> list[str]:
    return [e.type for e in bus.history()]


async def test_download_to_completion_with_events_in_order(
    server: FileServer, make: Callable[..., Any], model_dir: Path, content: bytes
) -> None:
    downloader, bus, sleep = make(progress_step=0.1)
    path = await downloader.ensure(server.url, FILE, sha256=server.sha256)
    assert path == model_dir / FILE and path.read_bytes() == content
    assert leftovers(model_dir) == []
    seen = types(bus)
    assert seen[0] == "download.started" and seen[-1] == "download.done"
    assert set(seen[1:-1]) == {"download.progress"} and len(seen) >= 4
    progress = [e.details for e in bus.history() if e.type == "download.progress"]
    assert [p["bytes"] for p in progress] == sorted(p["bytes"] for p in progress)
    assert progress[-1]["bytes"] == progress[-1]["total"] == SIZE
    done = bus.history()[-1].details
    assert done["sha256"] == server.sha256 and done["bytes"] == SIZE and done["downloaded"] == SIZE
    assert bus.summary()["downloads"][FILE]["state"] == "done"
    assert len(server.gets()) == 1 and sleep.delays == []


async def test_a_cut_download_resumes_without_fetching_bytes_twice(
    server: FileServer, make: Callable[..., Any], content: bytes
) -> None:
    server.cut_after = 700_000
    downloader, bus, sleep = make()
    path = await downloader.ensure(server.url, FILE, sha256=server.sha256)
    assert path.read_bytes() == content
    first, second = server.gets()
    assert first.range is None and first.sent == 700_000
    assert second.range == "bytes=700000-" and second.if_range == '"v1"' and second.status == 206
    assert server.bytes_sent == SIZE
    assert [e.details["resumed_from"] for e in bus.history() if e.type == "download.started"] == [0, 700_000]
    assert "download.retry" in types(bus) and len(sleep.delays) == 1


async def test_a_restarted_gateway_resumes_the_part_file(
    server: FileServer, make: Callable[..., Any], model_dir: Path, content: bytes
) -> None:
    server.hold_after = 500_000
    part = model_dir / f"{FILE}.part"
    first, first_bus, _ = make()
    task = asyncio.create_task(first.ensure(server.url, FILE, sha256=server.sha256))
    await until(lambda: part.exists() and part.stat().st_size >= 400_000, "bytes in the .part file")
    task.cancel()  # the gateway stops in the middle of the download
    with pytest.raises(asyncio.CancelledError):
        await task
    assert first_bus.history()[-1].type == "download.failed"
    kept = part.stat().st_size
    assert not (model_dir / FILE).exists() and not (model_dir / f"{FILE}.lock").exists()

    second, bus, _ = make()  # a new process starts with nothing but the files
    assert (await second.ensure(server.url, FILE, sha256=server.sha256)).read_bytes() == content
    resumed = server.gets()[1]
    assert resumed.range == f"bytes={kept}-" and resumed.status == 206 and resumed.sent == SIZE - kept
    assert bus.history()[-1].details["downloaded"] == SIZE - kept
    assert leftovers(model_dir) == []


async def test_a_server_without_range_support_starts_over_cleanly(
    server: FileServer, make: Callable[..., Any], model_dir: Path, content: bytes
) -> None:
    server.ranges = False
    server.cut_after = 600_000
    downloader, bus, _ = make()
    path = await downloader.ensure(server.url, FILE, sha256=server.sha256)
    assert path.read_bytes() == content
    first, second = server.gets()
    assert first.range is None and first.sent == 600_000
    assert second.range == "bytes=600000-" and second.status == 200  # asked, ignored
    assert server.bytes_sent == 600_000 + SIZE
    assert [e.details["resumed_from"] for e in bus.history() if e.type == "download.started"] == [0, 0]
    assert leftovers(model_dir) == []


async def test_the_final_name_appears_only_when_the_file_is_complete(
    server: FileServer, make: Callable[..., Any], model_dir: Path, content: bytes
) -> None:
    server.chunk_size = 32 * 1024
    server.chunk_delay = 0.002
    server.hold_after = SIZE // 2
    final, part = model_dir / FILE, model_dir / f"{FILE}.part"
    sizes_seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:  # a thread, so it looks while the event loop is busy downloading
        while not stop.is_set():
            try:
                sizes_seen.append(final.stat().st_size)
                return  # the first sight of the final name is the one that matters
            except FileNotFoundError:
                pass

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        downloader, _, _ = make()
        task = asyncio.create_task(downloader.ensure(server.url, FILE, sha256=server.sha256))
        await until(lambda: server.gets() and server.gets()[0].sent >= SIZE // 2, "half the file to be sent")
        await until(lambda: part.exists() and part.stat().st_size >= SIZE // 2, "half the file in .part")
        assert not final.exists()
        server.release()
        assert (await asyncio.wait_for(task, 30)).read_bytes() == content
        await asyncio.to_thread(watcher.join, 30)
    finally:
        stop.set()
        watcher.join()
    assert sizes_seen == [SIZE]
    assert not part.exists()


async def test_a_sha_mismatch_is_a_clear_error_and_leaves_no_file(
    server: FileServer, make: Callable[..., Any], model_dir: Path
) -> None:
    server.corrupt = True
    downloader, bus, sleep = make()
    with pytest.raises(DownloadError) as caught:
        await downloader.ensure(server.url, FILE, sha256=server.sha256)
    message = caught.value.message
    found = hashlib.sha256(server._body()).hexdigest()
    assert FILE in message and server.sha256 in message and found in message
    assert not (model_dir / FILE).exists() and leftovers(model_dir) == []
    assert types(bus)[-1] == "download.failed" and sleep.delays == []
    assert bus.summary()["downloads"][FILE]["state"] == "failed"


@pytest.mark.parametrize("status", [404, 401])
async def test_404_and_401_fail_at_once(
    server: FileServer, make: Callable[..., Any], model_dir: Path, status: int
) -> None:
    server.status = status
    downloader, bus, sleep = make()
    with pytest.raises(DownloadError) as caught:
        await downloader.ensure(server.url, FILE)
    assert str(status) in caught.value.message and server.url in caught.value.message
    assert len(server.requests) == 1 and sleep.delays == []
    assert types(bus) == ["download.failed"]
    assert list(model_dir.iterdir()) == []


async def test_server_errors_are_retried(server: FileServer, make: Callable[..., Any], content: bytes) -> None:
    server.status, server.status_times = 503, 2
    downloader, bus, sleep = make()
    assert (await downloader.ensure(server.url, FILE)).read_bytes() == content
    assert len(server.gets()) == 3 and len(sleep.delays) == 2
    assert types(bus).count("download.retry") == 2


async def test_a_slow_server_works(server: FileServer, make: Callable[..., Any], content: bytes) -> None:
    server.chunk_size = 64 * 1024
    server.chunk_delay = 0.005
    downloader, bus, _ = make(progress_interval=0.05)
    assert (await downloader.ensure(server.url, FILE, sha256=server.sha256)).read_bytes() == content
    progress = [e.details for e in bus.history() if e.type == "download.progress"]
    assert progress and all(p["total"] == SIZE for p in progress)
    assert all(p["rate"] is None or p["rate"] > 0 for p in progress)
    assert progress[-1]["bytes"] == SIZE


async def test_a_stalled_response_times_out_and_is_retried(
    server: FileServer, make: Callable[..., Any], content: bytes
) -> None:
    server.hold_after = 1000  # the first response stops after 1000 bytes until the test ends
    downloader, bus, _ = make(timeout=httpx.Timeout(10.0, read=0.3))
    assert (await downloader.ensure(server.url, FILE, sha256=server.sha256)).read_bytes() == content
    retry = next(e.details for e in bus.history() if e.type == "download.retry")
    assert "timed out" in retry["error"]
    assert server.gets()[1].range == "bytes=1000-"


async def test_connection_refused_is_retried_then_reported(make: Callable[..., Any], model_dir: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/model.bin"
    downloader, bus, sleep = make(attempts=3)
    with pytest.raises(DownloadError) as caught:
        await downloader.ensure(url, FILE)
    assert "after 3 attempts" in caught.value.message and "cannot connect" in caught.value.message
    assert len(sleep.delays) == 2 and types(bus).count("download.retry") == 2
    assert leftovers(model_dir) == []


async def test_a_present_valid_file_needs_no_network(
    server: FileServer, make: Callable[..., Any], model_dir: Path, content: bytes
) -> None:
    (model_dir / FILE).write_bytes(content)
    downloader, bus, _ = make()
    assert (await downloader.ensure(server.url, FILE, sha256=server.sha256)).read_bytes() == content
    assert (await downloader.ensure(server.url, FILE, sha256=server.sha256)).read_bytes() == content
    server.stop()  # not even a connection: the gateway works offline
    assert (await downloader.ensure(server.url, FILE, sha256=server.sha256)).read_bytes() == content
    assert server.requests == []
    assert types(bus) == ["download.present"] * 3
    assert bus.summary()["downloads"][FILE]["state"] == "present"


async def test_too_little_disk_space_is_reported_before_downloading(
    server: FileServer, make: Callable[..., Any], model_dir: Path
) -> None:
    downloader, _, sleep = make(disk_free=lambda folder: 4096)
    with pytest.raises(DownloadError) as caught:
        await downloader.ensure(server.url, FILE)
    message = caught.value.message
    assert str(model_dir) in message and f"needs {SIZE} bytes" in message and "4096 bytes" in message
    assert sleep.delays == [] and len(server.gets()) == 1
    assert not (model_dir / FILE).exists() and not (model_dir / f"{FILE}.part").exists()


SCRIPT = """
import asyncio, json, sys
from pathlib import Path
from gateway.models.download import Downloader
from gateway.models.errors import DownloadError

class Printer:
    def publish(self, type, /, **details):
        print(json.dumps({"type": type, **details}), flush=True)

async def main():
    downloader = Downloader(Path(sys.argv[1]), events=Printer(), lock_poll=0.02)
    try:
        await downloader.ensure(sys.argv[2], sys.argv[3], sha256=sys.argv[4])
    except DownloadError as exc:
        print(json.dumps({"type": "error", "message": exc.message}), flush=True)
        return 1
    finally:
        await downloader.aclose()
    return 0

sys.exit(asyncio.run(main()))
"""


class Child:
    """A downloader in its own process; its events arrive as JSON lines on stdout."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        self.events: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.append(json.loads(line))

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]

    def finish(self) -> int:
        code = self.proc.wait(timeout=60)
        self._reader.join(timeout=10)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


async def test_two_processes_download_once_and_both_get_the_file(
    server: FileServer, model_dir: Path, content: bytes
) -> None:
    server.hold_after = SIZE // 3
    args = (str(model_dir), server.url, FILE, server.sha256)
    first = Child(*args)
    second: Child | None = None
    try:
        await until(lambda: server.gets() and server.gets()[0].sent >= SIZE // 3, "the first download to start")
        second = Child(*args)
        await until(lambda: "download.waiting" in second.types(), "the second process to wait for the lock")
        assert not (model_dir / FILE).exists()
        server.release()
        codes = await asyncio.to_thread(lambda: (first.finish(), second.finish()))
    finally:
        first.kill()
        if second is not None:
            second.kill()
    assert codes == (0, 0), (first.events, second.events)
    assert first.types()[0] == "download.started" and first.types()[-1] == "download.done"
    assert second.types() == ["download.waiting", "download.present"]
    assert len(server.gets()) == 1 and server.bytes_sent == SIZE
    assert (model_dir / FILE).read_bytes() == content
    assert leftovers(model_dir) == []

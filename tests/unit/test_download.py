"""The downloader without a socket: checks, messages, retry rules, and the download logic against
httpx.MockTransport (with a fake clock and a sleep that does not wait)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.catalog import ModelEntry
from gateway.models import download as dl
from gateway.models.checksums import read_sha256_cache
from gateway.models.download import Downloader, check_size
from gateway.models.errors import DownloadError
from tests.helpers import FakeSleep, Recorder

CONTENT = bytes(range(256)) * 400  # 102400 bytes
SHA = hashlib.sha256(CONTENT).hexdigest()
URL = "https://models.example/tiny.gguf"


class FakeClock:
    """Monotonic time that moves only when told (and a little per call, so rates are finite)."""

    def __init__(self, step: float = 0.001) -> None:
        self.now = 100.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


class CutStream(httpx.AsyncByteStream):
    """A body that stops after ``cut`` bytes the way a dropped connection does."""

    def __init__(self, data: bytes, cut: int | None, chunk: int = 8192) -> None:
        self._data, self._cut, self._chunk = data, cut, chunk

    async def __aiter__(self) -> AsyncIterator[bytes]:
        end = len(self._data) if self._cut is None else min(self._cut, len(self._data))
        for start in range(0, end, self._chunk):
            yield self._data[start : min(end, start + self._chunk)]
        if self._cut is not None and self._cut < len(self._data):
            raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")


@dataclass
class MockServer:
    """The handler behind httpx.MockTransport: serves CONTENT, with scripted statuses, errors and cuts."""

    content: bytes = CONTENT
    ranges: bool = True
    etag: str = '"abc"'
    script: list[int | Exception] = field(default_factory=list)  # consumed one per request first
    cuts: list[int | None] = field(default_factory=list)  # one per body served; None = whole
    requests: list[httpx.Request] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.script:
            step = self.script.pop(0)
            if isinstance(step, Exception):
                raise step
            return httpx.Response(step, text=f"status {step}")
        start = 0
        wanted = request.headers.get("range")
        headers = {"etag": self.etag, "content-type": "application/octet-stream"}
        status = 200
        if self.ranges and wanted:
            start = int(wanted.removeprefix("bytes=").split("-")[0])
            if start >= len(self.content):
                return httpx.Response(416, headers={"content-range": f"bytes */{len(self.content)}"})
            status = 206
            headers["content-range"] = f"bytes {start}-{len(self.content) - 1}/{len(self.content)}"
        body = self.content[start:]
        headers["content-length"] = str(len(body))
        cut = self.cuts.pop(0) if self.cuts else None
        return httpx.Response(status, headers=headers, stream=CutStream(body, cut))

    def unexpected(self, request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"no request expected, got {request.method} {request.url}")


def make(tmp_path: Path, server: MockServer, **kwargs: Any) -> tuple[Downloader, Recorder, FakeSleep]:
    events, sleep = Recorder(), FakeSleep()
    options: dict[str, Any] = {
        "events": events,
        "transport": httpx.MockTransport(server),
        "clock": FakeClock(),
        "sleep": sleep,
        "disk_free": lambda _path: 10**12,
        "attempts": 3,
    }
    options.update(kwargs)
    return Downloader(tmp_path, **options), events, sleep


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix in (".part", ".lock", ".json", ".tmp"))


# ---------------------------------------------------------------------------------------- pure checks


def test_size_check_says_what_was_announced_and_what_arrived() -> None:
    check_size("a.gguf", URL, None, 5)  # nothing announced: nothing to check
    check_size("a.gguf", URL, 5, 5)
    with pytest.raises(DownloadError) as short:
        check_size("a.gguf", URL, 100, 40)
    assert (
        "'a.gguf'" in short.value.message and "100 bytes" in short.value.message and "40 bytes" in short.value.message
    )
    assert short.value.retryable  # a short body is a cut connection: try again
    with pytest.raises(DownloadError) as long:
        check_size("a.gguf", URL, 100, 140)
    assert not long.value.retryable


# ---------------------------------------------------------------------------------------- downloads


async def test_download_to_completion(tmp_path: Path) -> None:
    server = MockServer()
    downloader, events, sleep = make(tmp_path, server, progress_interval=1e9, progress_step=0.25)
    path = await downloader.ensure(URL, "tiny.gguf", sha256=SHA)
    assert path == tmp_path / "tiny.gguf" and path.read_bytes() == CONTENT
    assert leftovers(tmp_path) == []
    assert read_sha256_cache(path) == SHA
    types = events.types()
    assert types[0] == "download.started" and types[-1] == "download.done"
    assert set(types[1:-1]) == {"download.progress"} and 4 <= len(types) - 2 <= 5
    assert events.of("download.started")[0] == {
        "url": URL,
        "file": "tiny.gguf",
        "path": str(path),
        "total": len(CONTENT),
        "resumed_from": 0,
        "attempt": 1,
    }
    done = events.of("download.done")[0]
    assert (done["bytes"], done["downloaded"], done["sha256"]) == (len(CONTENT), len(CONTENT), SHA)
    assert events.of("download.progress")[-1]["bytes"] == len(CONTENT)
    assert sleep.delays == []
    assert server.requests[0].headers["accept-encoding"] == "identity"
    await downloader.aclose()


async def test_ensure_model_downloads_url_entries_only(tmp_path: Path) -> None:
    downloader, _, _ = make(tmp_path, MockServer())
    entry = ModelEntry(id="t", kind="gguf", url=URL, file="sub/t.gguf", sha256=SHA)
    assert await downloader.ensure_model(entry) == tmp_path / "sub" / "t.gguf"
    assert await downloader.ensure_model(ModelEntry(id="r", kind="plain", repo="a/b")) is None


@pytest.mark.parametrize("status", [404, 401, 403, 400])
async def test_client_errors_fail_at_once(tmp_path: Path, status: int) -> None:
    server = MockServer(script=[status])
    downloader, events, sleep = make(tmp_path, server)
    with pytest.raises(DownloadError) as caught:
        await downloader.ensure(URL, "tiny.gguf")
    message = caught.value.message
    assert str(status) in message and URL in message and "'tiny.gguf'" in message
    if status == 404:
        assert "no such file" in message
    if status in (401, 403):
        assert "credentials" in message
    assert len(server.requests) == 1 and sleep.delays == []
    assert events.types() == ["download.failed"] and events.of("download.failed")[0]["error"] == message
    assert not (tmp_path / "tiny.gguf").exists() and leftovers(tmp_path) == []


async def test_server_errors_and_network_errors_are_retried_with_backoff(tmp_path: Path) -> None:
    server = MockServer(script=[503, httpx.ConnectError("connection refused"), 429])
    downloader, events, sleep = make(tmp_path, server, attempts=4, backoff_min=1.0, backoff_max=3.0)
    path = await downloader.ensure(URL, "tiny.gguf")
    assert path.read_bytes() == CONTENT
    assert sleep.delays == [1.0, 2.0, 3.0]
    retries = events.of("download.retry")
    assert [r["attempt"] for r in retries] == [1, 2, 3]
    assert "503" in retries[0]["error"] and "cannot connect" in retries[1]["error"]


async def test_giving_up_says_how_often_and_why(tmp_path: Path) -> None:
    refused = [httpx.ConnectError("connection refused") for _ in range(5)]
    server = MockServer(script=list(refused))
    downloader, events, sleep = make(tmp_path, server, attempts=3)
    with pytest.raises(DownloadError) as caught:
        await downloader.ensure(URL, "tiny.gguf")
    assert "after 3 attempts" in caught.value.message and "connection refused" in caught.value.message
    assert len(server.requests) == 3 and len(sleep.delays) == 2
    assert events.types()[-1] == "download.failed"


async def test_a_cut_download_resumes_with_range_and_if_range(tmp_path: Path) -> None:
    server = MockServer(cuts=[30_000])
    downloader, events, _ = make(tmp_path, server)
    path = await downloader.ensure(URL, "tiny.gguf", sha256=SHA)
    assert path.read_bytes() == CONTENT
    assert [r.headers.get("range") for r in server.requests] == [None, "bytes=30000-"]
    assert server.requests[1].headers["if-range"] == '"abc"'
    assert [s["resumed_from"] for s in events.of("download.started")] == [0, 30_000]
    assert events.of("download.done")[0]["downloaded"] == len(CONTENT)  # nothing fetched twice


async def test_attempts_that_make_progress_do_not_count_towards_giving_up(tmp_path: Path) -> None:
    server = MockServer(cuts=[10_000] * 10)  # every response is cut, but each one adds bytes
    downloader, _, sleep = make(tmp_path, server, attempts=2)
    path = await downloader.ensure(URL, "tiny.gguf", sha256=SHA)
    assert path.read_bytes() == CONTENT
    assert len(server.requests) == 11
    assert set(sleep.delays) == {1.0}  # progress resets the backoff too


async def test_attempts_without_progress_give_up(tmp_path: Path) -> None:
    server = MockServer(ranges=False, cuts=[10_000] * 10)  # starts over every time: no progress
    downloader, _, _ = make(tmp_path, server, attempts=3)
    with pytest.raises(DownloadError) as caught:
        await downloader.ensure(URL, "tiny.gguf")
    # The first attempt adds bytes; the next ones only get back to the same point.
    assert len(server.requests) == 4
    assert "the connection was cut" in caught.value.message and "10000 bytes are kept" in caught.value.message


async def test_a_server_that_ignores_range_starts_over_cleanly(tmp_path: Path) -> None:
    server = MockServer(ranges=False, cuts=[30_000])
    downloader, events, _ = make(tmp_path, server)
    path = await downloader.ensure(URL, "tiny.gguf", sha256=SHA)
    assert path.read_bytes() == CONTENT
    assert server.requests[1].headers["range"] == "bytes=30000-"
    assert [s["resumed_from"] for s in events.of("download.started")] == [0, 0]


async def test_a_part_from_another_url_is_not_resumed(tmp_path: Path) -> None:
    (tmp_path / "tiny.gguf.part").write_bytes(b"x" * 500)
    (tmp_path / "tiny.gguf.part.json").write_text(json.dumps({"url": "https://elsewhere/x"}))
    server = MockServer()
    downloader, _, _ = make(tmp_path, server)
    assert (await downloader.ensure(URL, "tiny.gguf", sha256=SHA)).read_bytes() == CONTENT
    assert server.requests[0].headers.get("range") is None


async def test_a_part_that_is_already_whole_is_finished_without_a_body(tmp_path: Path) -> None:
    (tmp_path / "tiny.gguf.part").write_bytes(CONTENT)
    (tmp_path / "tiny.gguf.part.json").write_text(json.dumps({"url": URL, "etag": '"abc"', "total": len(CONTENT)}))
    server = MockServer()
    downloader, events, _ = make(tmp_path, server)
    assert (await downloader.ensure(URL, "tiny.gguf", sha256=SHA)).read_bytes() == CONTENT
    assert [r.headers.get("range") for r in server.requests] == [f"bytes={len(CONTENT)}-"]
    assert events.of("download.done")[0]["downloaded"] == 0


async def test_sha_mismatch_deletes_the_download(tmp_path: Path) -> None:
    server = MockServer(content=CONTENT[:-1] + b"\x00")
    downloader, events, sleep = make(tmp_path, server)
    with pytest.raises(DownloadError) as caught:
        await downloader.ensure(URL, "tiny.gguf", sha256=SHA)
    message = caught.value.message
    assert "'tiny.gguf'" in message and SHA in message and hashlib.sha256(server.content).hexdigest() in message
    assert not (tmp_path / "tiny.gguf").exists() and leftovers(tmp_path) == []
    assert sleep.delays == [] and events.types()[-1] == "download.failed"


async def test_too_little_disk_space_fails_before_any_byte_is_written(tmp_path: Path) -> None:
    (tmp_path / "tiny.gguf.part").write_bytes(CONTENT[:2400])
    (tmp_path / "tiny.gguf.part.json").write_text(json.dumps({"url": URL, "etag": '"abc"', "total": len(CONTENT)}))
    seen: list[Path] = []

    def disk_free(path: Path) -> int:
        seen.append(path)
        return 1000

    server = MockServer()
    downloader, _, sleep = make(tmp_path, server, disk_free=disk_free)
    with pytest.raises(DownloadError) as caught:
        await downloader.ensure(URL, "tiny.gguf")
    message = caught.value.message
    assert str(tmp_path) in message and "needs 100000 bytes" in message and "1000 bytes" in message
    assert seen == [tmp_path] and sleep.delays == [] and len(server.requests) == 1
    assert (tmp_path / "tiny.gguf.part").stat().st_size == 2400  # kept for later


async def test_present_file_needs_no_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tiny.gguf").write_bytes(CONTENT)
    server = MockServer()
    downloader, events, _ = make(tmp_path, server, transport=httpx.MockTransport(server.unexpected))
    assert await downloader.ensure(URL, "tiny.gguf") == tmp_path / "tiny.gguf"
    assert await downloader.ensure(URL, "tiny.gguf", sha256=SHA) == tmp_path / "tiny.gguf"
    assert read_sha256_cache(tmp_path / "tiny.gguf") == SHA

    def no_hashing(*args: Any) -> Any:
        raise AssertionError("the cached sha256 should have been used")

    monkeypatch.setattr(dl, "sha256_of", no_hashing)
    assert await downloader.ensure(URL, "tiny.gguf", sha256=SHA) == tmp_path / "tiny.gguf"
    assert events.of("download.present") == [
        {"file": "tiny.gguf", "path": str(tmp_path / "tiny.gguf"), "bytes": len(CONTENT), "verified": v}
        for v in (False, True, True)
    ]


async def test_present_file_with_the_wrong_sha_is_refused(tmp_path: Path) -> None:
    (tmp_path / "tiny.gguf").write_bytes(b"something else")
    server = MockServer()
    downloader, events, _ = make(tmp_path, server, transport=httpx.MockTransport(server.unexpected))
    with pytest.raises(DownloadError) as caught:
        await downloader.ensure(URL, "tiny.gguf", sha256=SHA)
    message = caught.value.message
    assert str(tmp_path / "tiny.gguf") in message and SHA in message
    assert hashlib.sha256(b"something else").hexdigest() in message
    assert events.types() == ["download.failed"]


@pytest.mark.parametrize("file", ["../escape.gguf", "/etc/passwd", ""])
async def test_file_names_stay_inside_the_model_dir(tmp_path: Path, file: str) -> None:
    server = MockServer()
    downloader, _, _ = make(tmp_path, server, transport=httpx.MockTransport(server.unexpected))
    with pytest.raises(DownloadError, match="inside the model dir"):
        await downloader.ensure(URL, file)


async def test_only_http_urls(tmp_path: Path) -> None:
    server = MockServer()
    downloader, _, _ = make(tmp_path, server, transport=httpx.MockTransport(server.unexpected))
    with pytest.raises(DownloadError, match="not an http"):
        await downloader.ensure("ftp://models.example/a.gguf", "a.gguf")


async def test_disk_errors_become_download_errors(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "models"
    not_a_folder.write_text("a file where the model dir should be")
    downloader, events, _ = make(not_a_folder, MockServer())
    with pytest.raises(DownloadError) as caught:
        await downloader.ensure(URL, "tiny.gguf")
    assert "'tiny.gguf'" in caught.value.message and str(not_a_folder) in caught.value.message
    assert events.types() == ["download.failed"]


async def test_nothing_is_written_through_a_symlink_out_of_the_model_dir(tmp_path: Path) -> None:
    model_dir, elsewhere = tmp_path / "models", tmp_path / "elsewhere"
    model_dir.mkdir()
    elsewhere.mkdir()
    (model_dir / "linked").symlink_to(elsewhere, target_is_directory=True)
    server = MockServer()
    downloader, events, _ = make(model_dir, server)
    with pytest.raises(DownloadError, match="outside the model dir") as folder:
        await downloader.ensure(URL, "linked/tiny.gguf", sha256=SHA)
    assert str(elsewhere) in folder.value.message
    # A .part file that is a link out of the model dir is not appended to either.
    (model_dir / "tiny.gguf.part").symlink_to(elsewhere / "victim")
    with pytest.raises(DownloadError, match="outside the model dir"):
        await downloader.ensure(URL, "tiny.gguf", sha256=SHA)
    with pytest.raises(DownloadError, match=re.escape("without '..'")):
        await downloader.ensure(URL, "../escape.gguf", sha256=SHA)
    assert list(elsewhere.iterdir()) == [] and server.requests == []
    assert [d["error"] for d in events.of("download.failed")] and not (tmp_path / "escape.gguf").exists()
    await downloader.aclose()

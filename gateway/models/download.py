"""Model files on demand: download ``url`` to ``<model_dir>/<file>`` with resume, checks, a lock and events.

This module is the downloader itself: the HTTP exchange, the ``.part`` file and the order of the steps. What it
relies on has a module of its own beside it, each usable and testable without the others: :mod:`.checksums`
(sha256 and its cache), :mod:`.locking` (one download per file across processes), :mod:`.retry` (which failures
are tried again, and for how long), :mod:`.progress` (when to report, in which words) and :mod:`.files` (writes
that survive a crash).

The rules that keep a model file trustworthy:

- Bytes go to ``<file>.part``; the final name appears only by an atomic rename once the size matches the
  server's ``Content-Length`` (or ``Content-Range`` total) and, when the models file gives one, the sha256.
  A file that fails a check is deleted and never handed to the engine.
- ``<file>.part.json`` remembers which URL (and ETag / Last-Modified) the partial bytes came from, so a
  resume after a restart asks for the rest of the *same* file (``Range`` + ``If-Range``); a server that
  answers 200 instead of 206 gets a clean start over.
- ``<file>.lock`` serialises gateways sharing one model dir: the second publishes ``download.waiting``, waits,
  then finds the finished file. The holder removes the lock file when it is done.
- ``<file>.sha256`` caches the file's hash keyed by size and mtime: restarts do not re-read big files, and
  a present, valid file means no network at all.
- Network trouble (refused, reset, timeouts, a connection cut mid-file, 5xx, 429) is retried with
  exponential backoff, and an attempt that made progress resets the count: a flaky link still finishes a
  big file. 404, 401/403 and other client errors fail at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ..catalog import ModelEntry, relative_name
from ..events import EventSink, NullSink
from .checksums import (
    Hasher,
    check_sha256,
    normalise_sha256,
    read_sha256_cache,
    sha256_of,
    write_sha256_cache,
)
from .errors import DownloadError
from .files import free_bytes, fsync_dir, fsync_file, outside, sidecar, size_of, write_all, write_atomic
from .locking import exclusive
from .progress import ProgressMeter, human_size
from .retry import retry_while_progressing

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
DiskFree = Callable[[Path], int]

_logger = logging.getLogger("gateway.models")

DEFAULT_TIMEOUT = httpx.Timeout(30.0, read=120.0)
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)")
_HUB = "https://huggingface.co/"


def mirrored(url: str, endpoint: str | None) -> str:
    """``url`` on the Hugging Face mirror ``endpoint`` (``HF_ENDPOINT``) when it points at huggingface.co."""
    if endpoint and url.startswith(_HUB):
        return endpoint.rstrip("/") + "/" + url[len(_HUB) :]
    return url


# ----------------------------------------------------------------------------------------- checks


def check_size(file: str, url: str, expected: int | None, found: int) -> None:
    """Raise unless ``found`` bytes is what the server announced (nothing to check when it announced none)."""
    if expected is None or expected == found:
        return
    raise DownloadError(
        f"Model file {file!r} from {url}: the server announced {expected} bytes (Content-Length), "
        f"{found} bytes arrived.",
        file=file,
        url=url,
        retryable=found < expected,
    )


# ------------------------------------------------------------------------------------- downloader


@dataclass
class _Job:
    url: str
    file: str
    path: Path
    expected: str | None
    began: float
    attempt: int = 0
    high_water: int = 0  # the most bytes the .part file has held
    downloaded: int = 0  # bytes received over the network, all attempts
    total: int | None = None
    hasher: Hasher | None = None
    hashed: int = 0  # bytes of the .part file that ``hasher`` has seen
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def part(self) -> Path:
        return sidecar(self.path, ".part")

    @property
    def meta_path(self) -> Path:
        return sidecar(self.path, ".part.json")

    @property
    def lock_path(self) -> Path:
        return sidecar(self.path, ".lock")


class Downloader:
    """Provides the files of ``url`` models in ``model_dir``, downloading them when missing.

    ``events`` receives the ``download.*`` events (see :mod:`gateway.events`). ``transport``, ``clock``,
    ``sleep`` (the backoff's) and ``disk_free`` are there for tests. ``attempts`` is how many attempts in a row may
    fail without adding a byte before giving up; backoff doubles from ``backoff_min`` to ``backoff_max``.
    ``lock_poll``: how often a process waiting for another's download of the same file checks the lock.
    """

    def __init__(
        self,
        model_dir: Path,
        *,
        events: EventSink | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        headers: Mapping[str, str] | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        disk_free: DiskFree = free_bytes,
        attempts: int = 5,
        backoff_min: float = 1.0,
        backoff_max: float = 30.0,
        lock_poll: float = 0.25,
        progress_interval: float = 0.5,
        progress_step: float = 0.01,
        hf_endpoint: str | None = None,
        logger: logging.Logger = _logger,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self._model_dir = model_dir
        self._events: EventSink = events if events is not None else NullSink()
        self._client = httpx.AsyncClient(transport=transport, timeout=timeout, follow_redirects=True)
        self._headers = dict(headers or {})
        self._clock = clock
        self._sleep = sleep
        self._disk_free = disk_free
        self._attempts = attempts
        self._backoff_min = backoff_min
        self._backoff_max = backoff_max
        self._lock_poll = lock_poll
        self._progress_interval = progress_interval
        self._progress_step = progress_step
        self._hf_endpoint = hf_endpoint
        self._log = logger

    # ------------------------------------------------------------------------------------- public

    def target(self, file: str) -> Path:
        """Where ``file`` lives: inside the model dir, whatever the models file says, and whatever symlinks the
        model dir holds (the folder, the ``.part`` and ``.lock`` files are written to where they lead)."""
        if not relative_name(file):
            raise DownloadError(
                f"Model file {file!r}: `file` must be a name inside the model dir ({self._model_dir}), "
                "without '..' or a leading '/'.",
                file=file,
            )
        path = self._model_dir / file
        escaped = outside(self._model_dir, path.parent, sidecar(path, ".part"), sidecar(path, ".lock"))
        if escaped is not None:
            raise DownloadError(
                f"Model file {file!r}: {path} would be written to {escaped}, outside the model dir "
                f"({self._model_dir}), through a symbolic link. Remove the link, or set GATEWAY_MODEL_DIR to "
                "the disk it leads to.",
                file=file,
            )
        return path

    async def ensure_model(self, entry: ModelEntry) -> Path | None:
        """The local file of a ``url`` model, downloaded if missing; None for models of other sources."""
        if entry.url is None or entry.file is None:
            return None
        return await self.ensure(mirrored(entry.url, self._hf_endpoint), entry.file, sha256=entry.sha256)

    async def ensure(self, url: str, file: str, *, sha256: str | None = None) -> Path:
        """``<model_dir>/<file>``, complete and checked; downloaded from ``url`` first when it is missing.

        Touches no network when the file is there (and matches ``sha256`` when given). Raises
        :class:`DownloadError`; a cancelled call leaves the ``.part`` file to resume from.
        """
        try:
            path = self.target(file)
            expected = normalise_sha256(sha256, file)
            if path.exists():
                await self._accept_present(path, file, expected)
                return path
            _check_url(url, file)
            path.parent.mkdir(parents=True, exist_ok=True)
            job = _Job(url, file, path, expected, began=self._clock())
            async with exclusive(job.lock_path, poll=self._lock_poll, on_wait=lambda: self._waiting(job)):
                if path.exists():  # another process finished it while we waited
                    await self._accept_present(path, file, expected)
                    return path
                await self._download(job)
            return path
        except DownloadError as exc:
            self._log.error("%s", exc.message)
            self._events.publish("download.failed", url=url, file=file, error=exc.message)
            raise
        except asyncio.CancelledError:
            self._events.publish("download.failed", url=url, file=file, error="interrupted")
            raise
        except OSError as exc:
            message = f"Model file {file!r}: {exc.strerror or exc} ({exc.filename or self._model_dir})."
            self._log.error("%s", message)
            self._events.publish("download.failed", url=url, file=file, error=message)
            raise DownloadError(message, file=file, url=url) from exc

    async def aclose(self) -> None:
        await self._client.aclose()

    # ------------------------------------------------------------------------------ present file

    async def _accept_present(self, path: Path, file: str, expected: str | None) -> None:
        size = path.stat().st_size
        if expected is not None:
            found = read_sha256_cache(path)
            if found is None:
                self._log.info("checking the sha256 of %s (%s)", path, human_size(size))
                found = (await asyncio.to_thread(sha256_of, path)).hexdigest()
                write_sha256_cache(path, found)
            if found != expected:
                raise DownloadError(
                    f"Model file {str(path)!r} is present but its sha256 is {found}, while the models file "
                    f"expects {expected}. Delete the file to download it again, or fix the sha256.",
                    file=file,
                )
        self._events.publish("download.present", file=file, path=str(path), bytes=size, verified=expected is not None)

    def _waiting(self, job: _Job) -> None:
        self._log.info("%s is being downloaded by another process: waiting for it", job.path)
        self._events.publish("download.waiting", file=job.file, path=str(job.path), lock=str(job.lock_path))

    # --------------------------------------------------------------------------------- download

    async def _download(self, job: _Job) -> None:
        try:
            await retry_while_progressing(
                lambda: self._attempt(job),
                lambda: job.high_water,
                attempts=self._attempts,
                backoff_min=self._backoff_min,
                backoff_max=self._backoff_max,
                sleep=self._sleep,
                before_retry=lambda error, delay: self._before_retry(job, error, delay),
            )
        except DownloadError as exc:
            if not exc.retryable:
                raise
            raise self._gave_up(job, exc.message) from exc
        except httpx.TransportError as exc:
            raise self._gave_up(job, _describe(exc)) from exc
        await self._finish(job)

    def _before_retry(self, job: _Job, error: BaseException, delay: float) -> None:
        reason = error.message if isinstance(error, DownloadError) else _describe(error)
        self._log.warning(
            "download of %s failed (attempt %d): %s; retrying in %.1f s", job.file, job.attempt, reason, delay
        )
        self._events.publish(
            "download.retry", url=job.url, file=job.file, attempt=job.attempt, delay=delay, error=reason
        )

    def _gave_up(self, job: _Job, reason: str) -> DownloadError:
        kept = size_of(job.part)
        tail = f" {kept} bytes are kept in {job.part.name}; the next try resumes from there." if kept else ""
        return DownloadError(
            f"Could not download model file {job.file!r} from {job.url} after {job.attempt} "
            f"{'attempt' if job.attempt == 1 else 'attempts'}: {reason}.{tail}",
            file=job.file,
            url=job.url,
            network=True,
        )

    async def _attempt(self, job: _Job) -> None:
        job.attempt += 1
        offset = self._resume_point(job)
        headers = {"Accept-Encoding": "identity", **self._headers}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            validator = job.meta.get("etag") or job.meta.get("last_modified")
            if validator:
                headers["If-Range"] = validator
        async with self._client.stream("GET", job.url, headers=headers) as response:
            if response.status_code == 416 and offset:
                if self._part_is_whole(job, response, offset):
                    return
                self._discard_part(job)
                raise DownloadError(
                    f"{job.url} refused the range {offset}- of model file {job.file!r}; starting over",
                    file=job.file,
                    url=job.url,
                    retryable=True,
                )
            self._raise_for_status(job, response)
            if response.status_code == 206:
                start, total = _parse_content_range(response.headers.get("content-range"))
                if start != offset or job.meta.get("total") not in (None, total):
                    self._discard_part(job)
                    raise DownloadError(
                        f"{job.url} answered bytes {start}- of {total} to a request for bytes {offset}- of "
                        f"{job.meta.get('total')}; starting over",
                        file=job.file,
                        url=job.url,
                        retryable=True,
                    )
            else:
                if offset:
                    self._log.info("%s ignored the Range header: downloading %s from the start", job.url, job.file)
                    self._discard_part(job)
                    offset = 0
                total = _content_length(response)
            job.total = total
            if total is not None:
                self._check_space(job, total - offset)
            self._remember_source(job, response, total)
            await self._prepare_hasher(job, offset)
            self._events.publish(
                "download.started",
                url=job.url,
                file=job.file,
                path=str(job.path),
                total=total,
                resumed_from=offset,
                attempt=job.attempt,
            )
            if offset:
                self._log.info("resuming %s at byte %d of %s", job.file, offset, total if total is not None else "?")
            else:
                self._log.info("downloading %s from %s (%s)", job.file, job.url, human_size(total))
            done = await self._receive(job, response, offset)
        if total is not None and done > total:
            self._discard_part(job)  # more than the whole file: the bytes cannot be trusted
        check_size(job.file, job.url, total, done)

    async def _receive(self, job: _Job, response: httpx.Response, offset: int) -> int:
        meter = ProgressMeter(
            job.total, offset, self._clock(), interval=self._progress_interval, step=self._progress_step
        )
        done = offset
        hasher = job.hasher
        assert hasher is not None
        # Unbuffered: what has arrived is in the .part file, so a gateway that is killed resumes from there.
        with job.part.open("ab", buffering=0) as out:
            async for chunk in response.aiter_raw():
                write_all(out, chunk)
                hasher.update(chunk)
                done += len(chunk)
                job.hashed = done
                job.downloaded += len(chunk)
                job.high_water = max(job.high_water, done)
                details = meter.update(done, self._clock())
                if details is not None:
                    self._events.publish("download.progress", file=job.file, **details)
        details = meter.finish(done, self._clock())
        if details is not None:
            self._events.publish("download.progress", file=job.file, **details)
        return done

    async def _finish(self, job: _Job) -> None:
        size = job.part.stat().st_size
        if job.hasher is not None and job.hashed == size:
            found = job.hasher.hexdigest()
        else:
            found = (await asyncio.to_thread(sha256_of, job.part)).hexdigest()
        try:
            check_size(job.file, job.url, job.total, size)
            check_sha256(job.file, f"downloaded from {job.url}", job.expected, found)
        except DownloadError as exc:
            self._discard_part(job)
            raise DownloadError(exc.message + " The download was deleted.", file=job.file, url=job.url) from None
        await asyncio.to_thread(fsync_file, job.part)
        os.replace(job.part, job.path)
        fsync_dir(job.path.parent)
        write_sha256_cache(job.path, found)
        job.meta_path.unlink(missing_ok=True)
        seconds = round(self._clock() - job.began, 3)
        self._log.info("downloaded %s (%s) in %.1f s", job.path, human_size(size), seconds)
        self._events.publish(
            "download.done",
            url=job.url,
            file=job.file,
            path=str(job.path),
            bytes=size,
            downloaded=job.downloaded,
            seconds=seconds,
            sha256=found,
        )

    # ------------------------------------------------------------------------------- the .part

    def _resume_point(self, job: _Job) -> int:
        """Bytes already in ``.part`` that came from this URL; a part of unknown origin is dropped."""
        size = size_of(job.part)
        if not size:
            job.meta = {}
            return 0
        try:
            meta = json.loads(job.meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = None
        if not isinstance(meta, dict) or meta.get("url") != job.url:
            self._log.info("%s is not from %s: starting over", job.part, job.url)
            self._discard_part(job)
            return 0
        job.meta = meta
        job.high_water = max(job.high_water, size)
        return size

    def _remember_source(self, job: _Job, response: httpx.Response, total: int | None) -> None:
        etag = response.headers.get("etag")
        meta = {
            "url": job.url,
            # If-Range takes only a strong validator; a weak ETag would make every resume start over.
            "etag": etag if etag and not etag.startswith("W/") else None,
            "last_modified": response.headers.get("last-modified"),
            "total": total,
        }
        if meta != job.meta:
            write_atomic(job.meta_path, json.dumps(meta) + "\n")
            job.meta = meta

    def _discard_part(self, job: _Job) -> None:
        job.part.unlink(missing_ok=True)
        job.meta_path.unlink(missing_ok=True)
        job.meta, job.hasher, job.hashed = {}, None, 0

    async def _prepare_hasher(self, job: _Job, offset: int) -> None:
        if job.hasher is not None and job.hashed == offset:
            return  # the same process carries on where it stopped
        if offset:
            job.hasher = await asyncio.to_thread(sha256_of, job.part, offset)
        else:
            job.hasher = hashlib.sha256()
        job.hashed = offset

    def _part_is_whole(self, job: _Job, response: httpx.Response, offset: int) -> bool:
        """A 416 to ``bytes=<size>-`` when the part already holds the whole file: nothing left to fetch."""
        match = _UNSATISFIED_RANGE.fullmatch(response.headers.get("content-range", "").strip())
        if match is None or int(match.group(1)) != offset:
            return False
        job.total = offset
        return True

    # ---------------------------------------------------------------------------------- checks

    def _raise_for_status(self, job: _Job, response: httpx.Response) -> None:
        status = response.status_code
        if status in (200, 206):
            return
        answer = f"{status} {response.reason_phrase}".strip()
        where = f"Model file {job.file!r} from {job.url}"
        if status == 404:
            message = f"{where}: the server answered {answer}: there is no such file. Fix the url in the models file."
        elif status in (401, 403):
            message = (
                f"{where}: the server answered {answer}: it needs credentials or refuses access. Fix the url, "
                f"or download the file yourself to {job.path}."
            )
        elif status >= 500 or status in (408, 429):
            raise DownloadError(f"the server answered {answer}", file=job.file, url=job.url, retryable=True)
        else:
            message = f"{where}: the server answered {answer}. Check the url in the models file."
        raise DownloadError(message, file=job.file, url=job.url)

    def _check_space(self, job: _Job, needed: int) -> None:
        folder = job.path.parent
        free = self._disk_free(folder)
        if needed > free:
            raise DownloadError(
                f"Not enough free disk space in {folder} for model file {job.file!r}: it needs {needed} bytes "
                f"({human_size(needed)}), {free} bytes ({human_size(free)}) are free. Free some space or set "
                "GATEWAY_MODEL_DIR to a larger disk.",
                file=job.file,
                url=job.url,
            )


# ---------------------------------------------------------------------------------------- helpers


def _check_url(url: str, file: str) -> None:
    try:
        scheme = httpx.URL(url).scheme
    except httpx.InvalidURL:
        scheme = ""
    if scheme not in ("http", "https"):
        raise DownloadError(f"Model file {file!r}: url {url!r} is not an http(s) URL. Fix it.", file=file, url=url)


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None


def _parse_content_range(value: str | None) -> tuple[int, int | None]:
    match = _CONTENT_RANGE.fullmatch((value or "").strip())
    if match is None:
        raise DownloadError(f"the server's 206 answer has no usable Content-Range ({value!r})", retryable=True)
    total = match.group(3)
    return int(match.group(1)), (int(total) if total != "*" else None)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, httpx.TimeoutException):
        what = "timed out"
    elif isinstance(exc, httpx.ConnectError):
        what = "cannot connect"
    elif isinstance(exc, httpx.RemoteProtocolError):
        what = "the connection was cut"
    elif isinstance(exc, httpx.NetworkError):
        what = "network error"
    else:
        what = type(exc).__name__
    text = str(exc)
    return f"{what} ({text})" if text else what

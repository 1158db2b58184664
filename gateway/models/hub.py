"""Hugging Face repos on demand: ``repo`` models snapshotted into ``<model_dir>/<repo>`` before the engine starts.

The engine can fetch a repo itself, but then the gateway sees nothing of it: no progress, no clear error, and a
round trip to the hub at every start. Prefetching gives repo models what ``url`` models have:

- Which files: the entry's ``files`` patterns; else, for GGUF, only its ``file`` (a GGUF repo holds every
  quantisation, tens of GB); else the whole repo.
- Each attempt asks the hub which commit the revision names and which files it holds, then runs
  huggingface_hub's ``snapshot_download(local_dir=...)`` pinned to that commit, in a daemon thread: the event loop
  keeps serving, and a gateway that exits does not wait for a big download to end.
- A finished snapshot is recorded in ``<folder>/.cache/mistral-gateway/``: repo, revision, patterns, commit, and
  every file with its size. A later start that finds the record with every file at its size touches no network
  at all. So a branch is not followed once fetched: pin ``revision`` to a commit, or delete the folder to refresh.
- Repo not found, private, gated, unknown revision, a refused token: fail at once with a message that names the
  repo and the fix. Network trouble, 5xx and 429 are retried with backoff; an attempt that completed files
  resets the count, so a flaky link still finishes a big repo.
- When the hub cannot be asked (no network, hub errors, ``HF_HUB_OFFLINE=1``) and huggingface_hub's own cache
  (``HF_HOME``, shared with the engine and other tools) holds a complete copy of the revision, that copy is
  loaded at once, with a warning, instead of retrying: a machine that used a model before keeps working offline.
- The token goes to huggingface_hub only, never to a log line; without one, huggingface_hub uses ``HF_TOKEN`` or
  its saved login.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import hashlib
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from ..catalog import Model, relative_name
from ..events import EventSink, NullSink
from .errors import DownloadError, name_not_resolved
from .files import outside
from .progress import ProgressMeter, human_size
from .retry import retry_while_progressing

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
T = TypeVar("T")

_logger = logging.getLogger("gateway.models")

MARKER_DIR = Path(".cache") / "mistral-gateway"
# Where huggingface_hub keeps the files it is downloading into a local_dir (only used to report progress).
_PARTIAL_DIR = Path(".cache") / "huggingface" / "download"
# Python modules whose exceptions are transport trouble (huggingface_hub used requests, then httpx, then httpx2).
_TRANSPORT_MODULES = frozenset({"httpx", "httpx2", "requests", "urllib3", "httpcore", "h11"})


@dataclass(frozen=True)
class Snapshot:
    """What to fetch of one repo model, and where it goes."""

    repo: str
    revision: str | None
    patterns: tuple[str, ...] | None  # None: every file of the repo
    folder: Path

    @property
    def marker(self) -> Path:
        # One record per (revision, patterns): two models may take different files of one repo.
        key = json.dumps([self.revision, self.patterns]).encode()
        return self.folder / MARKER_DIR / f"snapshot-{hashlib.sha256(key).hexdigest()[:16]}.json"


@dataclass(frozen=True)
class Listing:
    """The hub's answer for a snapshot: the commit, and the files to fetch with their sizes when known."""

    commit: str
    files: Mapping[str, int | None]


class Hub(Protocol):
    """The blocking calls to the Hugging Face hub (run in a worker thread); :class:`HfHub` is the real one."""

    def url(self, repo: str) -> str: ...

    def listing(self, snapshot: Snapshot) -> Listing: ...

    def download(self, snapshot: Snapshot, commit: str) -> None: ...

    def cached(self, snapshot: Snapshot) -> Path | None:
        """A complete copy of the snapshot's revision in the hub client's own cache, found without the network."""
        ...


@dataclass(frozen=True)
class CachedCopy:
    """A complete copy of a snapshot in the hub client's own cache, used when the hub cannot be asked (``reason``).

    An attempt that finds one returns it, which ends the retries: there is nothing left to fetch.
    """

    folder: Path
    sizes: tuple[int, ...]  # of its files
    reason: str


def _unreachable(exc: BaseException, error: DownloadError) -> bool:
    """The hub could not be asked (network, its own errors, offline mode), as opposed to a refusal or a miss."""
    if error.retryable:
        return True
    try:
        from huggingface_hub import errors
    except ImportError:
        return False
    return isinstance(exc, errors.OfflineModeIsEnabled)


def snapshot_of(model: Model, model_dir: Path) -> Snapshot:
    """The snapshot of a repo model: ``<model_dir>/<repo>``, and the patterns that select its files."""
    repo = model.source.model_id
    if not relative_name(repo):  # the models file's ids are checked at start; a catalog made by hand is not
        raise DownloadError(f"Hugging Face repo {repo!r}: not a repository id (use 'owner/name').", file=repo)
    relative = Path(repo)
    patterns = list(model.entry.files)
    if model.source.filename and model.source.filename not in patterns:
        patterns.append(model.source.filename)  # a GGUF model needs its file, whatever `files` says
    return Snapshot(repo, model.entry.revision, tuple(patterns) or None, model_dir / relative)


def recorded_files(snapshot: Snapshot) -> dict[str, int] | None:
    """The files of a complete snapshot, from its record, when every one is still there at its size; else None."""
    try:
        record = json.loads(snapshot.marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        return None
    expected = [snapshot.repo, snapshot.revision, list(snapshot.patterns) if snapshot.patterns else None]
    if [record.get("repo"), record.get("revision"), record.get("patterns")] != expected:
        return None
    files: dict[str, int] = {}
    for name, size in record["files"].items():
        try:
            if (snapshot.folder / name).stat().st_size != size:
                return None
        except OSError:
            return None
        files[name] = size
    return files


def write_record(snapshot: Snapshot, commit: str, files: Mapping[str, int]) -> None:
    record = {
        "repo": snapshot.repo,
        "revision": snapshot.revision,
        "patterns": list(snapshot.patterns) if snapshot.patterns else None,
        "commit": commit,
        "files": dict(files),
    }
    path = snapshot.marker
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


def explain(exc: BaseException, snapshot: Snapshot, hub_url: str) -> DownloadError:
    """A hub failure in words that name the repo and the fix; ``retryable`` when another attempt may cure it."""
    if isinstance(exc, DownloadError):
        return exc
    repo = snapshot.repo
    where = f"Hugging Face repo {repo!r}"

    def fatal(message: str) -> DownloadError:
        return DownloadError(message, file=repo, url=hub_url)

    def retry(reason: str) -> DownloadError:
        return DownloadError(reason, file=repo, url=hub_url, retryable=True, network=True)

    if isinstance(exc, ImportError):
        return fatal(
            f"{where}: fetching it needs the huggingface_hub package ({exc}). Install it (pip install "
            "huggingface_hub), or set prefetch = false in the models file to let the engine fetch it."
        )
    from huggingface_hub import errors  # loaded by then: the failing call imported it

    status = _status_of(exc)
    token_fix = "set GATEWAY_HF_TOKEN (or HF_TOKEN) to a token that can read it"
    if isinstance(exc, errors.OfflineModeIsEnabled):
        return fatal(
            f"{where} is not complete in {snapshot.folder} and HF_HUB_OFFLINE is set, so it cannot be fetched. "
            "Unset HF_HUB_OFFLINE, or copy the files there."
        )
    if isinstance(exc, errors.LocalEntryNotFoundError):
        return retry(f"the hub cannot be reached ({_first_line(exc)})")
    if isinstance(exc, errors.GatedRepoError):
        return fatal(
            f"{where} is gated: the hub answered {status} to this request. Accept its terms at {hub_url} with your "
            f"Hugging Face account, then {token_fix.replace('can read it', 'belongs to that account')}."
        )
    if isinstance(exc, errors.RepositoryNotFoundError):
        return fatal(
            f"{where} was not found on the hub (it answered {status}): it does not exist, or it is private. Fix "
            f"`repo` in the models file, or {token_fix}."
        )
    if isinstance(exc, errors.RevisionNotFoundError):
        return fatal(f"{where} has no revision {snapshot.revision!r}. Fix `revision` in the models file.")
    if isinstance(exc, errors.EntryNotFoundError):
        return fatal(f"{where}: a file it lists is missing on the hub ({_first_line(exc)}). Try again later.")
    if isinstance(exc, errors.HfHubHTTPError):
        if status in (401, 403):
            return fatal(f"{where}: the hub refused access ({status}). Check the token, or {token_fix}.")
        if status is not None and (status >= 500 or status in (408, 429)):
            return retry(f"the hub answered {status}")
        return fatal(f"{where}: the hub answered {status}: {_first_line(exc)}")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return fatal(
            f"Not enough free disk space in {snapshot.folder} for {where}. Free some space or set "
            "GATEWAY_MODEL_DIR to a larger disk."
        )
    if isinstance(exc, ValueError):
        return fatal(f"{where}: {_first_line(exc)}")
    if isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in _TRANSPORT_MODULES:
        if name_not_resolved(exc):  # no network, or one that needs a proxy or a mirror: retrying will not cure it
            return DownloadError(
                f"{hub_url} cannot be reached: its name does not resolve ({_first_line(exc)})",
                file=repo,
                url=hub_url,
                network=True,
            )
        return retry(f"{type(exc).__name__} ({_first_line(exc)})")
    return fatal(f"{where}: {type(exc).__name__}: {_first_line(exc)}")


class HfHub:
    """The hub through huggingface_hub, imported only when a repo is fetched (the gateway at rest stays small).

    ``token`` None lets huggingface_hub find one (``HF_TOKEN``, its saved login). ``endpoint`` None means
    ``HF_ENDPOINT`` or huggingface.co; ``cache_dir`` None means huggingface_hub's own cache (a file found there is
    copied instead of downloaded again).
    """

    def __init__(self, *, token: str | None = None, endpoint: str | None = None, cache_dir: Path | None = None) -> None:
        self._token = token
        self._endpoint = endpoint
        self._cache_dir = cache_dir

    def url(self, repo: str) -> str:
        if self._endpoint is not None:
            return f"{self._endpoint.rstrip('/')}/{repo}"
        from huggingface_hub import constants

        return f"{constants.ENDPOINT.rstrip('/')}/{repo}"

    def listing(self, snapshot: Snapshot) -> Listing:
        from huggingface_hub import HfApi
        from huggingface_hub.utils import filter_repo_objects  # type: ignore[attr-defined]  # public, not re-exported

        api = HfApi(endpoint=self._endpoint, token=self._token)
        info = api.model_info(snapshot.repo, revision=snapshot.revision, files_metadata=True)
        if not info.sha:
            raise DownloadError(
                f"Hugging Face repo {snapshot.repo!r}: the hub named no commit for revision "
                f"{snapshot.revision or 'main'!r}.",
                file=snapshot.repo,
                retryable=True,
            )
        sizes = {sibling.rfilename: sibling.size for sibling in info.siblings or []}
        allow = list(snapshot.patterns) if snapshot.patterns else None
        chosen = list(filter_repo_objects(list(sizes), allow_patterns=allow))
        if not chosen:
            listed = ", ".join(sorted(sizes)[:10]) or "nothing"
            raise DownloadError(
                f"Hugging Face repo {snapshot.repo!r}: no file matches {allow} (it holds {listed}). Fix `files` "
                "(or `file`) in the models file.",
                file=snapshot.repo,
            )
        return Listing(info.sha, {name: sizes[name] for name in chosen})

    def download(self, snapshot: Snapshot, commit: str) -> None:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils.tqdm import tqdm

        class Quiet(tqdm):
            """No progress bars in the gateway's log: progress goes out as events."""

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                kwargs["disable"] = True  # as with HF_HUB_DISABLE_PROGRESS_BARS, without changing the process
                super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]

        snapshot_download(
            snapshot.repo,
            revision=commit,
            allow_patterns=list(snapshot.patterns) if snapshot.patterns else None,
            local_dir=snapshot.folder,
            cache_dir=self._cache_dir,
            token=self._token,
            endpoint=self._endpoint,
            tqdm_class=Quiet,
        )

    def cached(self, snapshot: Snapshot) -> Path | None:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            # Offline, huggingface_hub resolves the revision through the cache's refs and checks the snapshot
            # against the file listing it cached when it downloaded it: a partial copy is not returned.
            folder = Path(
                snapshot_download(
                    snapshot.repo,
                    revision=snapshot.revision,
                    allow_patterns=list(snapshot.patterns) if snapshot.patterns else None,
                    cache_dir=self._cache_dir,
                    local_files_only=True,
                )
            )
        except (LocalEntryNotFoundError, OSError, ValueError):
            return None
        return folder if any(p.is_file() for p in folder.rglob("*")) else None


@dataclass
class _Job:
    snapshot: Snapshot
    began: float
    attempt: int = 0
    url: str | None = None
    listing: Listing | None = None
    files: dict[str, int] = field(default_factory=dict)
    downloaded: int = 0


class HubFetcher:
    """Provides the local folder of ``repo`` models in ``model_dir``, snapshotting them from the hub when needed.

    ``events`` receives ``download.*`` events named by the repo id (see :mod:`gateway.events`). ``hub``, ``clock``
    and ``sleep`` are there for tests. ``attempts`` is how many attempts in a row may fail without completing a
    file before giving up; backoff doubles from ``backoff_min`` to ``backoff_max``.
    """

    def __init__(
        self,
        model_dir: Path,
        *,
        token: str | None = None,
        hub: Hub | None = None,
        events: EventSink | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        attempts: int = 5,
        backoff_min: float = 1.0,
        backoff_max: float = 30.0,
        progress_interval: float = 0.5,
        logger: logging.Logger = _logger,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self._model_dir = model_dir
        self._hub: Hub = hub if hub is not None else HfHub(token=token)
        self._events: EventSink = events if events is not None else NullSink()
        self._clock = clock
        self._sleep = sleep
        self._attempts = attempts
        self._backoff_min = backoff_min
        self._backoff_max = backoff_max
        self._progress_interval = progress_interval
        self._log = logger
        # Downloads still running in their thread (their caller may have been cancelled): one folder, one at a time.
        self._running: dict[Path, concurrent.futures.Future[None]] = {}

    async def ensure_model(self, model: Model) -> Path:
        """The local folder of a repo model, snapshotted first unless it is complete already."""
        try:
            snapshot = snapshot_of(model, self._model_dir)
        except DownloadError as exc:
            self._fail(exc.file or model.source.model_id, None, exc.message)
            raise
        return await self.ensure(snapshot)

    async def ensure(self, snapshot: Snapshot) -> Path:
        """``snapshot.folder``, complete; fetched from the hub first when it is not. Raises :class:`DownloadError`."""
        repo = snapshot.repo
        try:
            escaped = outside(self._model_dir, snapshot.folder)
            if escaped is not None:
                raise DownloadError(
                    f"Hugging Face repo {repo!r}: its folder {snapshot.folder} leads to {escaped}, outside the model "
                    f"dir ({self._model_dir}), through a symbolic link. Remove the link, or set GATEWAY_MODEL_DIR to "
                    "the disk it leads to.",
                    file=repo,
                )
            present = recorded_files(snapshot)
            if present is not None:
                self._events.publish(
                    "download.present",
                    file=repo,
                    path=str(snapshot.folder),
                    bytes=sum(present.values()),
                    verified=False,
                    files=len(present),
                )
                return snapshot.folder
            cached = await self._fetch(_Job(snapshot, began=self._clock()))
            if cached is not None:
                self._use_cached(repo, cached)
                return cached.folder
            return snapshot.folder
        except DownloadError as exc:
            self._fail(repo, exc.url, exc.message)
            raise
        except asyncio.CancelledError:
            self._events.publish("download.failed", url=None, file=repo, error="interrupted")
            raise
        except OSError as exc:
            message = f"Hugging Face repo {repo!r}: {exc.strerror or exc} ({exc.filename or snapshot.folder})."
            self._fail(repo, None, message)
            raise DownloadError(message, file=repo) from exc

    # --------------------------------------------------------------------------------- fetching

    async def _fetch(self, job: _Job) -> CachedCopy | None:
        """Snapshot the repo into its folder and record it; or, when the hub is out of reach, its client's copy."""
        try:
            cached = await retry_while_progressing(
                lambda: self._attempt(job),
                lambda: len(job.files),
                attempts=self._attempts,
                backoff_min=self._backoff_min,
                backoff_max=self._backoff_max,
                sleep=self._sleep,
                before_retry=lambda error, delay: self._before_retry(job, error, delay),
            )
        except DownloadError as exc:
            if not exc.retryable:
                raise
            raise DownloadError(
                f"Could not fetch Hugging Face repo {job.snapshot.repo!r} from {exc.url or 'the hub'} after "
                f"{job.attempt} attempts: {exc.message}.",
                file=job.snapshot.repo,
                url=exc.url,
                network=exc.network,
            ) from exc
        if cached is not None:
            return cached
        assert job.listing is not None
        write_record(job.snapshot, job.listing.commit, job.files)
        size = sum(job.files.values())
        seconds = round(self._clock() - job.began, 3)
        self._log.info(
            "fetched %s (%d files, %s) in %.1f s", job.snapshot.folder, len(job.files), human_size(size), seconds
        )
        self._events.publish(
            "download.done",
            url=job.url,
            file=job.snapshot.repo,
            path=str(job.snapshot.folder),
            bytes=size,
            downloaded=job.downloaded,
            seconds=seconds,
            sha256=None,
            commit=job.listing.commit,
            files=len(job.files),
        )
        return None

    def _use_cached(self, repo: str, cached: CachedCopy) -> None:
        self._log.warning(
            "%s cannot be fetched (%s): loading the copy in huggingface_hub's cache, %s",
            repo,
            cached.reason,
            cached.folder,
        )
        self._events.publish(
            "download.present",
            file=repo,
            path=str(cached.folder),
            bytes=sum(cached.sizes),
            verified=False,
            files=len(cached.sizes),
            source="huggingface_hub cache",
        )

    async def _attempt(self, job: _Job) -> CachedCopy | None:
        """One try: ask the hub, download. When the hub cannot be asked, a complete copy in its client's cache."""
        job.attempt += 1
        snapshot = job.snapshot
        try:
            if job.url is None:
                # In the thread too: the first call imports huggingface_hub, which takes a while.
                job.url = await self._in_thread(lambda: self._hub.url(snapshot.repo), f"hub-url {snapshot.repo}")
            listing = await self._in_thread(lambda: self._hub.listing(snapshot), f"hub-listing {snapshot.repo}")
            job.listing = listing
            await self._download(job, listing, job.url)
        except Exception as exc:
            error = explain(exc, snapshot, job.url or snapshot.repo)
            if _unreachable(exc, error):
                cached = await self._in_thread(
                    lambda: self._look_in_cache(snapshot, error.message), f"hub-cache {snapshot.repo}"
                )
                if cached is not None:
                    return cached
            raise error from exc
        return None

    def _look_in_cache(self, snapshot: Snapshot, reason: str) -> CachedCopy | None:
        """In a worker thread: the hub client's cached copy and the sizes of its files (disk I/O off the loop)."""
        folder = self._hub.cached(snapshot)
        if folder is None:
            return None
        return CachedCopy(folder, tuple(p.stat().st_size for p in folder.rglob("*") if p.is_file()), reason)

    async def _download(self, job: _Job, listing: Listing, url: str) -> None:
        snapshot = job.snapshot
        sizes = listing.files
        # The hub (or a mirror named by HF_ENDPOINT) names the files: none may land outside the repo's folder.
        for name in sizes:
            if not relative_name(name) or outside(snapshot.folder, snapshot.folder / name) is not None:
                raise DownloadError(
                    f"Hugging Face repo {snapshot.repo!r}: the hub lists a file {name!r} that would be written "
                    f"outside its folder {snapshot.folder}; nothing was fetched.",
                    file=snapshot.repo,
                    url=url,
                )
        job.files = {}  # of this listing only: the revision may have moved since the last attempt
        total = sum(s for s in sizes.values() if s is not None) if None not in sizes.values() else None
        stale = set(_partial_files(snapshot.folder))
        start = _bytes_done(snapshot.folder, sizes, stale)
        self._events.publish(
            "download.started",
            url=url,
            file=snapshot.repo,
            path=str(snapshot.folder),
            total=total,
            resumed_from=start,
            attempt=job.attempt,
            commit=listing.commit,
            files=len(sizes),
        )
        self._log.info(
            "fetching %s at %s into %s (%d files, %s)",
            snapshot.repo,
            listing.commit[:12],
            snapshot.folder,
            len(sizes),
            human_size(total),
        )
        previous = self._running.get(snapshot.folder)
        if previous is not None and not previous.done():
            # An earlier start that was cancelled left its download running: let it end rather than race it.
            earlier = asyncio.wrap_future(previous)
            await asyncio.wait({earlier})
            if not earlier.cancelled():
                earlier.exception()  # its outcome was for the caller that went away
        running = _start_thread(lambda: self._hub.download(snapshot, listing.commit), f"hub-download {snapshot.repo}")
        self._running[snapshot.folder] = running
        waiting = asyncio.wrap_future(running)
        meter = ProgressMeter(total, start, self._clock(), interval=self._progress_interval)
        try:
            while not waiting.done():
                await asyncio.wait({waiting}, timeout=self._progress_interval)
                done = _bytes_done(snapshot.folder, sizes, stale)
                details = meter.update(done, self._clock())
                if details is not None and not waiting.done():
                    self._events.publish("download.progress", file=snapshot.repo, **details)
        finally:
            if not waiting.done():
                waiting.cancel()  # we were cancelled; the thread runs on, and the next attempt waits for it
            self._count_complete(job, sizes)
            job.downloaded += max(0, _bytes_done(snapshot.folder, sizes, stale) - start)
        waiting.result()
        missing = [name for name in sizes if name not in job.files]
        if missing:
            sample = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise DownloadError(
                f"{len(missing)} files are missing after the download ({sample})",
                file=snapshot.repo,
                url=url,
                retryable=True,
            )
        details = meter.finish(sum(job.files.values()), self._clock())
        if details is not None:
            self._events.publish("download.progress", file=snapshot.repo, **details)

    def _count_complete(self, job: _Job, sizes: Mapping[str, int | None]) -> None:
        """Record the files that are in place at the size the hub announced."""
        for name, expected in sizes.items():
            try:
                size = (job.snapshot.folder / name).stat().st_size
            except OSError:
                continue
            if expected is None or size == expected:
                job.files[name] = size

    async def _in_thread(self, call: Callable[[], T], name: str) -> T:
        return await asyncio.wrap_future(_start_thread(call, name))

    def _before_retry(self, job: _Job, error: BaseException, delay: float) -> None:
        reason = error.message if isinstance(error, DownloadError) else str(error)
        repo = job.snapshot.repo
        self._log.warning("fetching %s failed (attempt %d): %s; retrying in %.1f s", repo, job.attempt, reason, delay)
        url = error.url if isinstance(error, DownloadError) else None
        self._events.publish("download.retry", url=url, file=repo, attempt=job.attempt, delay=delay, error=reason)

    def _fail(self, repo: str, url: str | None, message: str) -> None:
        self._log.error("%s", message)
        self._events.publish("download.failed", url=url, file=repo, error=message)


def _start_thread(call: Callable[[], T], name: str) -> concurrent.futures.Future[T]:
    """Run ``call`` in a daemon thread: unlike asyncio.to_thread, a gateway that exits does not wait for it."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = call()
        except BaseException as exc:  # handed to the awaiting task, which decides
            future.set_exception(exc)
        else:
            future.set_result(result)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def _partial_files(folder: Path) -> list[Path]:
    try:
        return list((folder / _PARTIAL_DIR).rglob("*.incomplete"))
    except OSError:
        return []


def _bytes_done(folder: Path, sizes: Mapping[str, int | None], stale: set[Path]) -> int:
    """Bytes of the snapshot on disk: finished files, plus those being written (leftovers of killed runs aside)."""
    done = 0
    for name, expected in sizes.items():
        try:
            size = (folder / name).stat().st_size
        except OSError:
            continue
        if expected is None or size == expected:
            done += size
    for partial in _partial_files(folder):
        if partial not in stale:
            with contextlib.suppress(OSError):  # finished and moved in place meanwhile
                done += partial.stat().st_size
    return done


def _status_of(exc: BaseException) -> int | None:
    response: Any = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

"""The engine supervisor: start on demand, one start for any number of waiters, idle stop, crashes.

A request goes ``lease()`` -> ``ensure_ready()`` -> relay -> ``lease.release()``. The lease is what
keeps the idle stopper away: the engine stops only when no lease is held and nothing has been sent to
a client for ``idle_timeout`` seconds (or longer, when a request asked for a longer keep-alive).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tenacity import RetryCallState, wait_exponential

from ..catalog import Catalog, Model
from ..errors import (
    EngineStartFailed,
    EngineUnavailable,
    GatewayError,
    ModelDownloadFailed,
    QueueFull,
    retry_after_header,
)
from ..events import EventSink, NullSink
from ..settings import Settings
from ..upstream import AiohttpUpstream, Upstream, UpstreamError
from .command import CommandError, EngineCommand, build_command
from .discovery import EngineProgram, find_engine
from .process import EngineProcess, ProcessSpawner, SubprocessSpawner
from .state import EngineState, StateMachine

if TYPE_CHECKING:
    from ..models.download import Downloader
    from ..models.hub import HubFetcher

Clock = Callable[[], float]
ProgramFinder = Callable[[], EngineProgram]

_logger = logging.getLogger("gateway.engine")
# A download that failed (after the downloader's own retries) waits at least this long before the next try: the
# network or the mirror it needs rarely comes back within seconds, and every try costs the requests waiting on it.
DOWNLOAD_RETRY_MIN = 30.0
# How long a health check after a failed request may take before the engine counts as not answering.
HEALTH_TIMEOUT = 10.0
# An engine that dies sooner than this after it became ready counts as one that failed to start: it backs off,
# instead of being started again at once by every request (a model that crashes the engine at its first request).
STABLE_AFTER = 60.0


@dataclass(frozen=True)
class Endpoint:
    """A ready engine: where it listens, and the id it answers to for each configured model."""

    base_url: str
    engine_ids: Mapping[str, str]


class Lease:
    """One request's hold on the engine; released once, when its last byte has been sent."""

    __slots__ = ("_released", "_supervisor")

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor
        self._released = False

    def release(self, keep_alive: float | None = None) -> None:
        if not self._released:
            self._released = True
            self._supervisor._release(keep_alive)


class Supervisor:
    """Owns the engine process and its state machine.

    ``downloader`` and ``hub`` build what fetches models before a start (``url`` files; ``repo`` snapshots, by
    default a :class:`~gateway.models.hub.HubFetcher` from the settings). Without a ``downloader`` the supervisor
    fetches nothing and every model is left to the engine.
    """

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        *,
        run_dir: Path,
        spawner: ProcessSpawner | None = None,
        clock: Clock = time.monotonic,
        find_program: ProgramFinder | None = None,
        probe: Upstream | None = None,
        downloader: Callable[[], Downloader] | None = None,
        hub: Callable[[], HubFetcher] | None = None,
        events: EventSink | None = None,
        logger: logging.Logger = _logger,
    ) -> None:
        self._settings = settings
        self._catalog = catalog
        self._run_dir = run_dir
        self._spawner = spawner or SubprocessSpawner(logger)
        self._clock = clock
        self._find_program = find_program or (
            lambda: find_engine(choice=settings.engine, binary=settings.engine_binary)
        )
        self._probe: Upstream = probe or AiohttpUpstream()
        self._log = logger
        self._events: EventSink = events or NullSink()
        self._make_downloader = downloader
        self._downloader: Downloader | None = None
        self._make_hub = hub or self._default_hub
        self._hub: HubFetcher | None = None
        self._activity = asyncio.Event()  # wakes the idle stopper
        self._stopper_parked = False
        self._sm = StateMachine(on_change=self._on_state_change)
        self._backoff = wait_exponential(multiplier=1, min=1, max=settings.backoff_max)

        self._proc: EngineProcess | None = None
        self._endpoint: Endpoint | None = None
        self._port: int | None = None
        self._external = False
        self._start_task: asyncio.Task[Endpoint] | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._stop_reason = ""
        self._health_check: asyncio.Task[None] | None = None
        self._closing = False  # the gateway is shutting down: no engine is started any more
        self._shutdown: asyncio.Task[None] | None = None

        self._in_flight = 0
        self._waiting = 0
        self._last_activity = clock()
        self._expiry: float | None = None  # a keep_alive's stop time (inf: until further notice); None: idle timeout
        self._ready_since: float | None = None
        self._failures = 0
        self._retry_at = 0.0
        self._last_error: str | None = None
        self._failure: type[EngineUnavailable] = EngineStartFailed  # what the last failed start raised
        self.starts = 0
        self.crashes = 0
        self.last_start_seconds: float | None = None

    # ------------------------------------------------------------------------------------- public

    @property
    def state(self) -> EngineState:
        return self._sm.state

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def lease(self) -> Lease:
        # No wake-up for the idle stopper: a request only moves the idle deadline later, which the stopper finds
        # when it wakes (waking it for every request cost a task per request).
        self._in_flight += 1
        return Lease(self)

    def keep_alive(self, seconds: float) -> None:
        """A request's ``keep_alive``, meant as Ollama means it: stop the engine ``seconds`` from now instead of
        after the idle timeout; a negative value keeps it up until a request says otherwise, 0 stops it as soon as
        no request is in flight. The newest request's keep_alive wins, and one without sets the idle timeout back.
        """
        self._expiry = math.inf if seconds < 0 else self._clock() + seconds
        self._activity.set()

    async def ensure_ready(self) -> Endpoint:
        """The engine once it is ready; starts it if needed. Raises :class:`EngineUnavailable`."""
        if self._sm.state is EngineState.READY and self._endpoint is not None:
            return self._endpoint
        if self._waiting >= self._settings.max_queue:
            raise QueueFull(
                f"{self._waiting} requests already wait for the engine to start (GATEWAY_MAX_QUEUE).",
                retry_after=max(1.0, self.last_start_seconds or 5.0),
            )
        self._waiting += 1
        try:
            return await self._join_start()
        finally:
            self._waiting -= 1

    async def _join_start(self) -> Endpoint:
        while True:
            if self._closing:
                raise EngineUnavailable("The gateway is shutting down.", retry_after=1)
            state = self._sm.state
            if state is EngineState.READY and self._endpoint is not None:
                return self._endpoint
            if state is EngineState.STARTING and self._start_task is not None:
                await self._await_start(self._start_task)
                continue
            if state is EngineState.STOPPING and self._stop_task is not None:
                await asyncio.wait({self._stop_task})
                continue
            if state is EngineState.FAILED:
                wait = self._retry_at - self._clock()
                if wait > 0:
                    raise self._failed_start(wait)
            # The transition happens here, synchronously, so that every later caller sees STARTING
            # and joins this start instead of creating its own.
            self._sm.transition(frozenset({EngineState.STOPPED, EngineState.FAILED}), EngineState.STARTING)
            self._start_task = asyncio.create_task(self._start(), name="engine-start")
            await self._await_start(self._start_task)

    async def stop(self, reason: str = "requested") -> None:
        """Stop the engine (never an adopted one's process) and wait until it is gone."""
        if self._stop_task is not None and not self._stop_task.done():
            await asyncio.wait({self._stop_task})
            return
        state = self._sm.state
        if state is EngineState.FAILED:
            self._sm.transition(EngineState.FAILED, EngineState.STOPPED)
            return
        if state not in (EngineState.READY, EngineState.STARTING):
            return
        self._sm.transition(state, EngineState.STOPPING)
        self._stop_task = asyncio.create_task(self._stop(reason), name="engine-stop")
        await asyncio.wait({self._stop_task})

    async def run_idle_stopper(self) -> None:
        """Background task: stop the engine once it has been idle long enough.

        It sleeps until the idle deadline and then checks again, since requests can only have moved the deadline
        later. Without a deadline (engine not ready, or busy) it is parked until something may have set one: a
        state change, the last request ending, a keep_alive.
        """
        while True:
            self._activity.clear()
            delay = self.seconds_until_idle_stop()
            if delay is not None and delay <= 0:
                reason = "its keep_alive has run out" if self._expiry is not None else "it is idle"
                self._log.info("stopping the engine: %s", reason)
                await self.stop("idle")
                continue
            self._stopper_parked = delay is None
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._activity.wait(), delay)

    def seconds_until_idle_stop(self) -> float | None:
        """None while nothing would stop the engine: not ready, adopted, busy, kept alive until further notice, or
        idle stop disabled."""
        if self._sm.state is not EngineState.READY or self._external or self._in_flight > 0:
            return None
        if self._expiry is not None:
            return None if self._expiry == math.inf else self._expiry - self._clock()
        if self._settings.idle_timeout <= 0:
            return None
        return self._last_activity + self._settings.idle_timeout - self._clock()

    def status(self) -> dict[str, Any]:
        now = self._clock()
        until_idle = self.seconds_until_idle_stop()
        return {
            "state": self._sm.state.value,
            "pid": self.pid,
            "port": self._port,
            "url": self._endpoint.base_url if self._endpoint else None,
            "adopted": self._external,
            "uptime": round(now - self._ready_since, 3) if self._ready_since is not None else None,
            "idle_timeout": self._settings.idle_timeout,
            "seconds_until_idle_stop": round(until_idle, 3) if until_idle is not None else None,
            # Seconds a keep_alive still holds the engine up; -1 (as Ollama writes it): until further notice.
            "keep_alive": None if self._expiry is None else -1 if self._expiry == math.inf else round(
                max(0.0, self._expiry - now), 3),
            "in_flight": self._in_flight,
            "waiting": self._waiting,
            "starts": self.starts,
            "crashes": self.crashes,
            "consecutive_start_failures": self._failures,
            "retry_in": round(self._retry_at - now, 3) if self._retry_at > now else None,
            "last_error": self._last_error,
            "last_start_seconds": self.last_start_seconds,
        }

    def begin_shutdown(self) -> None:
        """The gateway stops: start no engine any more, and abandon a start in progress, stopping the engine that
        is loading (every request waiting on it is answered 503 at once, instead of waiting for a load that would
        be stopped anyway)."""
        self._closing = True
        if self._sm.state is EngineState.STARTING:
            self._shutdown = asyncio.create_task(self.stop("gateway shutdown"), name="engine-stop-shutdown")

    async def aclose(self) -> None:
        """Stop the engine and release resources; called at gateway shutdown."""
        if self._start_task is not None and not self._start_task.done():
            self._start_task.cancel()
            await asyncio.wait({self._start_task})
        await self.stop("gateway shutdown")
        await self._probe.aclose()
        if self._downloader is not None:
            await self._downloader.aclose()

    def kill_now(self) -> None:
        """Last-resort synchronous cleanup (a second Ctrl+C skips the async shutdown)."""
        proc = self._proc
        if proc is not None and not self._external and proc.returncode is None:
            proc.signal_group(signal.SIGKILL)

    def engine_failed(self, error: GatewayError) -> None:
        """A request failed talking to the engine (no answer in time, a broken or refused connection).

        Whether the engine is at fault is for its health check to say: a restart ends every other request and stream
        in flight, so only an engine that no longer answers ``/health`` is restarted (an adopted one is marked
        failed). One check runs at a time, however many requests fail together.
        """
        if self._sm.state is not EngineState.READY or self._health_check is not None:
            return
        endpoint = self._endpoint
        if endpoint is None:
            return
        self._health_check = asyncio.create_task(self._check_health(endpoint, error), name="engine-health-check")

    async def _check_health(self, endpoint: Endpoint, error: GatewayError) -> None:
        try:
            if await self._healthy(endpoint.base_url, timeout=HEALTH_TIMEOUT):
                self._log.warning("a request failed (%s), but the engine answers its health check: kept running",
                                  error.message)  # fmt: skip
                return
            if self._endpoint is not endpoint or self._sm.state is not EngineState.READY:
                return  # stopped or restarted meanwhile
            if self._external:
                self._last_error = f"The engine at {endpoint.base_url} stopped answering ({error.message})"
                self._endpoint, self._ready_since = None, None
                self._sm.transition(EngineState.READY, EngineState.FAILED)
                return
            self._log.error("the engine does not answer its health check after %s: restarting it", error.message)
            self._last_error = f"The engine stopped answering and was restarted ({error.message})"
            await self.stop("not answering")
        finally:
            self._health_check = None

    # ----------------------------------------------------------------------------------- leasing

    def _release(self, keep_alive: float | None) -> None:
        self._in_flight -= 1
        self._last_activity = self._clock()
        if keep_alive is not None:
            self.keep_alive(keep_alive)
        elif self._expiry is not None:
            self._expiry = None  # a request without keep_alive: the idle timeout again, which may come sooner
            self._activity.set()
        elif self._in_flight == 0 and self._stopper_parked:
            self._activity.set()  # the stopper waits with no deadline (it saw the engine busy): one may apply now

    def _on_state_change(self, previous: EngineState, current: EngineState) -> None:
        self._log.info("engine %s -> %s", previous.value, current.value)
        self._activity.set()
        if current is EngineState.STARTING:
            self._events.publish("engine.starting")
        elif current is EngineState.READY:
            self._events.publish("engine.ready", pid=self.pid, port=self._port, seconds=self.last_start_seconds,
                                 adopted=self._external)  # fmt: skip
        elif current is EngineState.STOPPED:
            self._events.publish("engine.stopped", reason=self._stop_reason)
        elif current is EngineState.FAILED:
            kind = "engine.crashed" if previous is EngineState.READY else "engine.failed"
            self._events.publish(
                kind, error=self._last_error, retry_in=round(max(0.0, self._retry_at - self._clock()), 3)
            )

    # ---------------------------------------------------------------------------------- starting

    async def _await_start(self, task: asyncio.Task[Endpoint]) -> None:
        # asyncio.wait, not await: one waiter going away must not cancel the start shared by all.
        await asyncio.wait({task})
        if task.cancelled():
            stopped = "The gateway is shutting down." if self._closing else "The engine was stopped while starting."
            raise EngineUnavailable(stopped, retry_after=1)
        exc = task.exception()
        if isinstance(exc, EngineUnavailable):
            # A fresh exception per waiter: the same instance raised in many tasks tangles tracebacks.
            raise self._failed_start(max(0.0, self._retry_at - self._clock()))
        if isinstance(exc, GatewayError):
            raise exc
        if exc is not None:
            raise EngineStartFailed(f"The engine failed to start: {str(exc) or type(exc).__name__}",
                                  retry_after=1) from exc

    async def _start(self) -> Endpoint:
        began = self._clock()
        try:
            endpoint = await self._launch()
        except asyncio.CancelledError:
            await self._discard_process()
            raise
        except Exception as exc:
            await self._discard_process()
            self._fail_start(exc)
            raise
        self.last_start_seconds = round(self._clock() - began, 3)
        self._endpoint = endpoint
        # Failures in a row are forgotten once the engine has proved stable (see _watch), not at once: an engine
        # that dies right after becoming ready keeps backing off longer each time.
        self._retry_at = 0.0
        self._last_error = None
        self._ready_since = self._last_activity = self._clock()
        self._sm.transition(EngineState.STARTING, EngineState.READY)
        self._log.info("engine ready at %s after %.2f s", endpoint.base_url, self.last_start_seconds)
        return endpoint

    def _failed_start(self, wait: float) -> EngineUnavailable:
        """What a request meets while a failed start's backoff runs: the failure, and when the next try comes."""
        error = self._last_error or "The engine failed to start."
        separator = " " if error.endswith(".") else ". "
        return self._failure(f"{error}{separator}Next try in {retry_after_header(wait)} s.", retry_after=wait)

    def _fail_start(self, exc: BaseException) -> None:
        self._failures += 1
        state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        state.attempt_number = self._failures
        delay = self._backoff(state)
        self._failure = type(exc) if isinstance(exc, EngineUnavailable) else EngineStartFailed
        if isinstance(exc, ModelDownloadFailed):
            delay = max(delay, min(DOWNLOAD_RETRY_MIN, self._settings.backoff_max))
        self._retry_at = self._clock() + delay
        if isinstance(exc, GatewayError):
            self._last_error = exc.message
        else:
            self._last_error = f"The engine failed to start: {str(exc) or type(exc).__name__}"
        self._log.error(
            "engine start failed (%d in a row; next try in %.0f s): %s",
            self._failures,
            delay,
            self._last_error,
        )
        if self._sm.state in (EngineState.STARTING, EngineState.READY):
            self._sm.transition(self._sm.state, EngineState.FAILED)

    async def _launch(self) -> Endpoint:
        settings = self._settings
        deadline = self._clock() + settings.startup_timeout
        if settings.engine_url:
            url = settings.engine_url.rstrip("/")
            served = await self._served_ids(url)
            if served is None:
                raise EngineUnavailable(f"The engine at GATEWAY_ENGINE_URL={url} does not answer.")
            self._external, self._port = True, None
            return self._adopted(url, served)
        fixed = settings.engine_port
        if fixed:
            url = f"http://127.0.0.1:{fixed}"
            served = await self._served_ids(url)
            if served is not None:
                self._log.info("a mistral.rs engine already serves port %d: using it, not starting another", fixed)
                self._external, self._port = True, fixed
                return self._adopted(url, served)
            if not _port_is_free(fixed):
                raise EngineStartFailed(
                    f"GATEWAY_ENGINE_PORT={fixed} is taken by a program that is not a mistral.rs engine. "
                    "Free the port, or set GATEWAY_ENGINE_PORT=0 to pick a free one."
                )
        # Finding the program runs `--version`: keep that off the event loop.
        program = await asyncio.to_thread(self._find_program)
        folders = await self._download_models()
        env = {**os.environ, **settings.engine_env}
        if settings.hf_token is not None:
            env["HF_TOKEN"] = settings.hf_token.get_secret_value()
        # The token reaches the engine through its environment only, never its command line.
        catalog = engine_catalog(self._catalog, folders, "env:HF_TOKEN" if env.get("HF_TOKEN") else None)
        self._check_model_files(catalog)
        port = fixed or _free_port()
        try:
            command = build_command(
                program, catalog, port=port, run_dir=str(self._run_dir), extra_args=_split(settings.engine_args)
            )
        except CommandError as exc:
            raise EngineStartFailed(str(exc)) from exc
        self._run_dir.mkdir(parents=True, exist_ok=True)
        for name, text in command.files.items():
            (self._run_dir / name).write_text(text, encoding="utf-8")
        self._log.info("starting engine: %s", " ".join(_redact(a) for a in command.argv))
        self._external, self._port = False, port
        self.starts += 1
        proc = await self._spawner.spawn(command.argv, env=env, cwd=self._run_dir)
        self._proc = proc
        url = f"http://127.0.0.1:{port}"
        await self._wait_ready(proc, url, deadline)
        self._watch_task = asyncio.create_task(self._watch(proc), name=f"engine-watch-{proc.pid}")
        return Endpoint(url, self._match_ids(command, await self._served_ids(url) or set()))

    def _match_ids(self, command: EngineCommand, served: set[str]) -> dict[str, str]:
        """For each model, the first predicted engine id that the engine actually serves."""
        ids = {}
        for model_id, candidates in command.engine_ids.items():
            found = next((c for c in candidates if c in served), None)
            if found is None:
                self._log.warning(
                    "the engine does not list model %r under any of %s (it lists %s); sending %r anyway",
                    model_id,
                    list(candidates),
                    sorted(served),
                    candidates[0],
                )
            ids[model_id] = found or candidates[0]
        return ids

    def _adopted(self, url: str, served: set[str]) -> Endpoint:
        """An engine we did not start: match our models to what it serves, by id or by its source."""
        ids = {}
        for model in self._catalog.models:
            candidates = [model.id, model.source.engine_id, model.source.model_id]
            ids[model.id] = next((c for c in candidates if c in served), model.id)
        return Endpoint(url, ids)

    async def _download_models(self) -> dict[str, Path]:
        """Fetch every `url` model file that is missing (or resume it) and snapshot every `repo` model to prefetch;
        what is complete locally costs nothing. Returns the local folder of each prefetched repo model, by id."""
        wanted = [m for m in self._catalog.models if m.entry.url]
        repos = [m for m in self._catalog.models if not m.source.local and m.entry.prefetch]
        if not (wanted or repos) or self._make_downloader is None:
            return {}
        from ..models.download import DownloadError  # the downloader is loaded only by models that need it

        folders: dict[str, Path] = {}
        for model in [*wanted, *repos]:
            try:
                if model.entry.url:
                    self._downloader = self._downloader or self._make_downloader()
                    await self._downloader.ensure_model(model.entry)
                else:
                    self._hub = self._hub or self._make_hub()
                    folders[model.id] = await self._hub.ensure_model(model)
            except DownloadError as exc:
                reason = exc.message if exc.message.endswith(".") else exc.message + "."
                help_ = f" {_OFFLINE}" if exc.network else ""
                raise ModelDownloadFailed(f"Model {model.id!r} could not be downloaded: {reason}{help_}") from exc
        return folders

    def _default_hub(self) -> HubFetcher:
        from ..models.hub import HubFetcher

        token = self._settings.hf_token
        return HubFetcher(
            self._settings.model_dir, token=token.get_secret_value() if token else None, events=self._events
        )

    def _check_model_files(self, catalog: Catalog) -> None:
        for model in catalog.models:
            if not model.source.local:
                continue
            path = Path(model.source.model_id)
            if model.source.filename:
                path = path / model.source.filename
            if not path.exists():
                origin = f" from {model.entry.url}" if model.entry.url else ""
                raise EngineStartFailed(
                    f"Model {model.id!r}: its file {str(path)!r} is missing. Download it{origin} to that path."
                )

    async def _wait_ready(self, proc: EngineProcess, url: str, deadline: float) -> None:
        """Poll ``/health`` until it answers 200, racing the process's exit and the deadline."""
        exited = asyncio.ensure_future(proc.wait())
        delay = 0.02
        try:
            while True:
                if exited.done():
                    tail = "\n".join(proc.output_tail()[-15:]) or "(no output)"
                    raise EngineStartFailed(
                        f"The engine exited with code {exited.result()} while starting. Its last output:\n{tail}"
                    )
                if await self._healthy(url):
                    return
                remaining = deadline - self._clock()
                if remaining <= 0:
                    raise EngineStartFailed(
                        f"The engine did not become ready within GATEWAY_STARTUP_TIMEOUT="
                        f"{self._settings.startup_timeout:g} s. Raise it for large models or slow downloads."
                    )
                await asyncio.wait({exited}, timeout=min(delay, remaining))
                delay = min(delay * 1.5, 0.5)
        finally:
            if not exited.done():
                exited.cancel()

    async def _healthy(self, url: str, timeout: float = 2.0) -> bool:
        try:
            status, _ = await self._probe.get(f"{url}/health", timeout=timeout)
        except UpstreamError:
            return False
        return status == 200

    async def _served_ids(self, url: str) -> set[str] | None:
        """The model ids a mistral.rs engine at ``url`` lists; None when nothing answers like one there."""
        if not await self._healthy(url):
            return None
        try:
            status, content = await self._probe.get(f"{url}/v1/models", timeout=5.0)
            listing = json.loads(content)
            if status != 200 or listing.get("object") != "list":
                return None
            return {str(item["id"]) for item in listing.get("data", []) if isinstance(item, dict) and "id" in item}
        except (UpstreamError, ValueError, AttributeError, TypeError):
            return None

    # ------------------------------------------------------------------------- crash and stop

    async def _watch(self, proc: EngineProcess) -> None:
        code = await proc.wait()
        if self._proc is not proc or self._sm.state is not EngineState.READY:
            return  # a stop we asked for
        tail = "\n".join(proc.output_tail()[-10:]) or "(no output)"
        self.crashes += 1
        message = f"The engine exited unexpectedly with code {code}. Its last output:\n{tail}"
        self._log.error("%s", message)
        uptime = self._clock() - (self._ready_since or self._clock())
        self._proc, self._endpoint, self._ready_since = None, None, None
        if uptime < STABLE_AFTER:
            early = f"The engine exited with code {code} {uptime:.1f} s after it became ready. Its last output:\n{tail}"
            self._fail_start(EngineStartFailed(early))
            return
        self._failures, self._retry_at = 0, 0.0  # it had been serving: restart at the next request
        self._last_error = message
        self._sm.transition(EngineState.READY, EngineState.FAILED)

    async def _stop(self, reason: str) -> None:
        self._stop_reason = reason
        proc, external = self._proc, self._external
        self._log.info("stopping engine (%s)", reason)
        if self._start_task is not None and not self._start_task.done():
            self._start_task.cancel()
            await asyncio.wait({self._start_task})
        if proc is not None and not external:
            await self._terminate(proc)
        self._proc, self._endpoint, self._ready_since, self._external = None, None, None, False
        if self._watch_task is not None:
            self._watch_task.cancel()
            self._watch_task = None
        self._expiry = None
        self._failures = 0
        self._sm.transition(EngineState.STOPPING, EngineState.STOPPED)

    async def _terminate(self, proc: EngineProcess) -> None:
        """SIGTERM to the process group, a grace period, SIGKILL, reap."""
        proc.signal_group(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self._settings.stop_timeout)
        except asyncio.TimeoutError:
            self._log.warning("engine ignored SIGTERM for %.0f s: killing it", self._settings.stop_timeout)
            proc.signal_group(signal.SIGKILL)
            await proc.wait()
        else:
            proc.signal_group(signal.SIGKILL)  # anything it forked that outlived it

    async def _discard_process(self) -> None:
        """After a failed or interrupted start: make sure the half-started process is gone."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            await self._terminate(proc)


_OFFLINE = (
    "To serve it: run `mistral-gateway pull` once this machine is online; or set HF_ENDPOINT to a Hugging Face "
    "mirror, or HTTPS_PROXY (and NO_PROXY) if the network needs a proxy; or copy the file here and give the model "
    "a local `path` in a models file (GATEWAY_MODELS_FILE)."
)


def engine_catalog(catalog: Catalog, folders: Mapping[str, Path], token_source: str | None) -> Catalog:
    """The catalog the engine is started with: prefetched repo models load from their local folder (clients still
    see the configured ids), and the token source, unless the models file names one."""

    def local(model: Model) -> Model:
        folder = folders.get(model.id)
        if folder is None:
            return model
        return replace(model, source=replace(model.source, model_id=str(folder.resolve()), local=True))

    models = tuple(local(m) for m in catalog.models)
    engine = catalog.engine
    if token_source is not None and engine.token_source is None:
        engine = engine.model_copy(update={"token_source": token_source})
    return replace(catalog, models=models, engine=engine)


def _redact(arg: str) -> str:
    """Keep a literal Hugging Face token (--token-source literal:...) out of the log."""
    return "literal:<redacted>" if arg.startswith("literal:") else arg


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _split(args: str) -> list[str]:
    import shlex

    return shlex.split(args)

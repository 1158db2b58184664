"""The life of one engine: its state table, the requests that hold it, its idle stop, its crashes and backoff.

Crashes are judged as users expect (and as Kubernetes' CrashLoopBackOff does): the request that hit a crash gets an
error, and an engine that had been answering is started again at once by the next request. Only an engine that dies
before it answered any request (a model that cannot serve), or dies again right after such a restart (a crash loop),
backs off, with delays that grow like a failed start's.

A request goes ``lease()`` -> the pool's ``ensure_ready`` -> relay -> ``lease.release()``. The lease is what keeps
the idle stopper away: the engine stops only when no lease is held and nothing has been sent to a client for its
``ttl`` (or longer, or shorter, when a request asked with ``keep_alive``).

A lifecycle knows nothing about downloads, command lines or memory: it is given ``start`` (the pool's: prepare the
models, launch or adopt the engine) and calls it when the pool has admitted a start (:meth:`begin_start`). So the
same class runs every engine, and its tests feed it fake starts and a fake clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import EngineStartFailed, EngineUnavailable, GatewayError, ModelDownloadFailed, retry_after_header
from ..events import EventSink, NullSink
from .launcher import Endpoint, Running
from .process import EngineProcess
from .state import EngineState, StateMachine

Clock = Callable[[], float]

# A download that failed (after the downloader's own retries) waits at least this long before the next try: the
# network or the mirror it needs rarely comes back within seconds, and every try costs the requests waiting on it.
DOWNLOAD_RETRY_MIN = 30.0
# How long a failed health check waits for the engine's exit to be reported before it restarts the engine itself.
EXIT_GRACE = 5.0
# How long it waits for an engine that is still alive to exit: a crashing engine closes its sockets (so its health
# check fails) a moment before it exits, a moment that grows on a busy machine; a hung engine is restarted after it.
DYING_GRACE = 2.0
# Prefill speed assumed for an engine that has not shown its own yet (tokens/s; a small model on a CPU), and the least
# a restart is assumed to cost (seconds) before one has been measured.
DEFAULT_PREFILL_RATE = 500.0
DEFAULT_RESTART_SECONDS = 2.0
# An engine restarted after a crash that dies again sooner than this after it became ready is in a crash loop: it
# backs off. One that ran this long has recovered, and its next crash counts as a first one again.
STABLE_AFTER = 60.0


def start_backoff(failures: int, longest: float) -> float:
    """Seconds before the next start after ``failures`` failed starts in a row: 1, 2, 4 ... up to ``longest``.

    Never less than a second, whatever ``longest`` says. (An integer power: no overflow however long it failed.)
    """
    return float(max(1, min(longest, 2 ** (failures - 1))))


class NotStarted(Exception):
    """The engine is stopped (or may start again after a failure): only the pool may begin a start."""


@dataclass(frozen=True)
class Limits:
    ttl: float  # seconds idle before the idle stop; 0 = never
    backoff_max: float  # longest wait between two failed starts
    health_timeout: float  # after a failed request, how long the health check may take: then "not answering"


class Lease:
    """One request's hold on an engine, from its arrival until its last byte has been sent.

    A lease keeps the engine from its idle stop from the start; it *engages* the engine only once the request has
    the engine's endpoint (:meth:`engage`): only engaged requests keep it from being stopped to make room for another
    (a request still waiting for its engine, e.g. behind a swap, must not hold that swap off). Leases are what a
    model's requests are counted by (:meth:`EngineLifecycle.requests`): waiting while :meth:`queued`, else running.
    """

    __slots__ = ("_answered", "_counts", "_engaged", "_lifecycle", "_released")

    def __init__(self, lifecycle: EngineLifecycle, counts: _Counts) -> None:
        self._lifecycle = lifecycle
        self._counts = counts
        self._released = False
        self._engaged = False
        self._answered = False

    def answered(self) -> None:
        """The engine answered this request (its whole answer, or a stream's first event): it can serve."""
        if self._engaged and not self._answered and not self._released:
            self._answered = True
            self._lifecycle._served = True

    def engage(self) -> None:
        if not self._engaged and not self._released:
            self._engaged = True
            self._lifecycle._engaged += 1

    @contextlib.contextmanager
    def queued(self) -> Iterator[None]:
        """The request waits for its engine inside this block: to start, for room, or behind a swap."""
        self._counts.waiting += 1
        try:
            yield
        finally:
            self._counts.waiting -= 1

    def release(self, keep_alive: float | None = None) -> None:
        if not self._released:
            self._released = True
            self._counts.leased -= 1
            if self._engaged:
                self._lifecycle._engaged -= 1
            self._lifecycle._release(keep_alive)


class _Counts:
    """The requests of one model on its engine: leased (arrived, not yet answered to the last byte), and waiting
    among them (for the engine to start, for room, behind a swap)."""

    __slots__ = ("leased", "waiting")

    def __init__(self) -> None:
        self.leased = 0
        self.waiting = 0


class EngineLifecycle:
    """One engine process (or one adopted engine) and its state machine."""

    def __init__(
        self,
        name: str,
        models: tuple[str, ...],
        *,
        limits: Limits,
        start: Callable[[], Awaitable[Running]],
        terminate: Callable[[EngineProcess], Awaitable[None]],
        healthy: Callable[[str, float], Awaitable[bool]],
        clock: Clock,
        events: EventSink | None = None,
        logger: logging.Logger,
        on_change: Callable[[], None] = lambda: None,
        on_idle: Callable[[], None] = lambda: None,
    ) -> None:
        self.name = name
        self.models = models
        self._limits = limits
        self._start_engine = start
        self._terminate = terminate
        self._healthy = healthy
        self._clock = clock
        self._events: EventSink = events or NullSink()
        self._log = logger
        self._on_change = on_change  # the pool's: memory or an exclusive slot may have come free
        self._on_idle = on_idle  # the pool's: the last request ended (it looks at the engine's memory)
        self._activity = asyncio.Event()  # wakes the idle stopper
        self._stopper_parked = False
        self._sm = StateMachine(on_change=self._on_state_change)

        self._running: Running | None = None
        self._start_task: asyncio.Task[Endpoint] | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._health_check: asyncio.Task[None] | None = None
        self._stop_reason = ""
        self._closing = False  # the gateway is shutting down: no start any more

        self._in_flight = 0
        self._engaged = 0  # leases whose request has the endpoint and may be talking to the engine
        self._counts = {model: _Counts() for model in models}  # the same requests, by model
        self.prefill_rate: float | None = None  # prompt tokens per second, as the engine last showed it
        self._restart: asyncio.Future[None] | None = None  # a stop to free the engine from an abandoned prefill
        self.waiting = 0  # requests waiting for this engine to start (counted by the pool)
        self.last_activity = clock()
        self._expiry: float | None = None  # a keep_alive's stop time (inf: until further notice); None: the ttl
        self._ready_since: float | None = None
        self._served = False  # the running engine has answered a request since it became ready
        self._after_crash = False  # the running engine was started again after a crash, not yet for long
        self._failures = 0
        self._retry_at = 0.0
        self._last_error: str | None = None
        self._failure: type[EngineUnavailable] = EngineStartFailed  # what the last failed start raised
        self.starts = 0
        self.crashes = 0
        self.evictions = 0
        self.last_start_seconds: float | None = None
        # What the engine was last measured to use (the pool's meter), kept after it stops: the best guess of what
        # it will take when it starts again.
        self.memory_mb: float | None = None
        self.loaded_mb: float | None = None  # what it took right after loading, before any request

    # ------------------------------------------------------------------------------------- public

    @property
    def state(self) -> EngineState:
        return self._sm.state

    @property
    def ready(self) -> bool:
        return self._sm.state is EngineState.READY and self._running is not None

    @property
    def died(self) -> bool:
        """Ready, but its process has ended and the watcher has not handled that yet. An engine's sockets close as it
        dies, a moment before its end is reported: a request in between would be sent to nothing."""
        running = self._running
        return self.ready and running is not None and running.proc is not None and running.proc.exited

    async def death_handled(self) -> None:
        """Once the watcher has handled the engine's end (see :meth:`died`): failed, to be started again at once, or
        backing off."""
        watch = self._watch_task
        if watch is not None and not watch.done():
            await asyncio.wait({watch}, timeout=EXIT_GRACE)

    @property
    def endpoint(self) -> Endpoint | None:
        return self._running.endpoint if self._running is not None else None

    @property
    def pid(self) -> int | None:
        proc = self._running.proc if self._running is not None else None
        return proc.pid if proc is not None else None

    @property
    def adopted(self) -> bool:
        return self._running is not None and self._running.proc is None

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def backing_off(self) -> bool:
        """Its last start failed and the next may not begin yet: a request for it is answered with the failure."""
        return self._sm.state is EngineState.FAILED and self._retry_at > self._clock()

    @property
    def last_error(self) -> str | None:
        return self._last_error

    @property
    def busy(self) -> bool:
        """Requests are talking to the engine (not only waiting for it): it must not be stopped to make room."""
        return self._engaged > 0

    def lease(self, model: str | None = None) -> Lease:
        """A request for ``model`` (one of :attr:`models`; default the first) has arrived."""
        # No wake-up for the idle stopper: a request only moves the idle deadline later, which the stopper finds
        # when it wakes (waking it for every request cost a task per request).
        self._in_flight += 1
        counts = self._counts[model or self.models[0]]
        counts.leased += 1
        return Lease(self, counts)

    def requests(self, model: str) -> tuple[int, int]:
        """``model``'s requests on this engine: (running, waiting). Waiting ones wait for the engine (to start, for
        room, behind a swap); the others are being answered (by the engine, or from the embedding cache)."""
        counts = self._counts[model]
        return counts.leased - counts.waiting, counts.waiting

    def prefilled(self, tokens: int, seconds: float) -> None:
        """A request's prompt of ``tokens`` took ``seconds`` to its first token: the engine's prefill speed."""
        if tokens >= 64 and seconds > 0:  # shorter prompts say more about the overhead than about prefill
            rate = tokens / seconds
            self.prefill_rate = rate if self.prefill_rate is None else 0.5 * self.prefill_rate + 0.5 * rate

    def abandoned(self, prompt_tokens: int | None, elapsed: float) -> str | None:
        """A request was abandoned (its client left, or an operator cancelled it) before the engine sent anything:
        the engine may still be prefilling its prompt, which mistral.rs cannot abort on a CPU, and every other
        request to it would wait behind that. When nothing else uses the engine and the rest of that prefill is
        likely to take longer than a restart, the engine is stopped (the next request starts it again at once);
        returns what was done, for the log, or None."""
        if not self.ready or self.adopted or self._engaged > 0 or prompt_tokens is None:
            return None
        rate = self.prefill_rate or DEFAULT_PREFILL_RATE
        remaining = prompt_tokens / rate - elapsed
        restart = self.last_start_seconds or DEFAULT_RESTART_SECONDS
        if remaining <= restart:
            return None
        why = (
            f"a request was abandoned {elapsed:.1f} s into the prefill of its {prompt_tokens}-token prompt, which the "
            f"engine cannot abort (about {remaining:.0f} s left at {rate:.0f} tokens/s; a restart takes about "
            f"{restart:.1f} s): stopped, to start again at the next request"
        )
        self._log.warning("engine %s: %s", self.name, why)
        self._restart = asyncio.ensure_future(self.stop("abandoned prefill"))
        return why

    def keep_alive(self, seconds: float) -> None:
        """A request's ``keep_alive``, meant as Ollama means it: stop the engine ``seconds`` from now instead of
        after its ttl; a negative value keeps it up until a request says otherwise, 0 stops it as soon as no
        request is in flight. The newest request's keep_alive wins, and one without sets the ttl back."""
        self._expiry = math.inf if seconds < 0 else self._clock() + seconds
        self._activity.set()

    def needs_start(self) -> bool:
        """Stopped, or failed and past its backoff: a request must have the pool begin a start."""
        state = self._sm.state
        return state is EngineState.STOPPED or (state is EngineState.FAILED and self._retry_at <= self._clock())

    def check_backoff(self) -> None:
        """Raise the failure a request meets while a failed start's backoff runs."""
        if self._closing:
            raise EngineUnavailable("The gateway is shutting down.", retry_after=1)
        if self._sm.state is EngineState.FAILED:
            wait = self._retry_at - self._clock()
            if wait > 0:
                raise self._failed_start(wait)

    def begin_start(self) -> None:
        """Start the engine now (the pool has made room for it). Synchronous up to the state change, so that every
        later request sees STARTING and joins this start instead of asking for another."""
        self._sm.transition(frozenset({EngineState.STOPPED, EngineState.FAILED}), EngineState.STARTING)
        self._start_task = asyncio.create_task(self._start(), name=f"engine-start-{self.name}")

    async def join(self) -> Endpoint:
        """The engine once a start begun by the pool is done; :class:`NotStarted` when none is under way."""
        while True:
            self.check_backoff()
            state = self._sm.state
            running = self._running
            if state is EngineState.READY and running is not None:
                return running.endpoint
            if state is EngineState.STARTING and self._start_task is not None:
                await self._await_start(self._start_task)
                continue
            if state is EngineState.STOPPING and self._stop_task is not None:
                await asyncio.wait({self._stop_task})
                continue
            raise NotStarted(self.name)

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
        self._stop_task = asyncio.create_task(self._stop(reason), name=f"engine-stop-{self.name}")
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
                self._log.info("stopping the engine of %s: %s", self.name, reason)
                await self.stop("idle")
                continue
            self._stopper_parked = delay is None
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._activity.wait(), delay)

    def tick(self) -> None:
        """The clock moved in a way the idle stopper's sleep cannot see (tests, a resumed machine): look again."""
        self._activity.set()

    @property
    def checking_health(self) -> bool:
        return self._health_check is not None

    async def health_checked(self) -> None:
        """Returns once the health check under way, if any, has given its verdict (the engine kept, restarted, or
        found dead)."""
        check = self._health_check
        if check is not None:
            await asyncio.wait({check})  # a request that gives up waiting does not cancel the check

    def seconds_until_idle_stop(self) -> float | None:
        """None while nothing would stop the engine: not ready, adopted, busy, kept alive until further notice, or
        idle stop disabled (ttl 0)."""
        if not self.ready or self.adopted or self._in_flight > 0:
            return None
        if self._expiry is not None:
            return None if self._expiry == math.inf else self._expiry - self._clock()
        if self._limits.ttl <= 0:
            return None
        return self.last_activity + self._limits.ttl - self._clock()

    def status(self) -> dict[str, Any]:
        now = self._clock()
        until_idle = self.seconds_until_idle_stop()
        running = self._running
        expiry = self._expiry
        return {
            "name": self.name,
            "models": list(self.models),
            "state": self._sm.state.value,
            "pid": self.pid,
            "port": running.port if running is not None else None,
            "url": running.endpoint.base_url if running is not None else None,
            "adopted": self.adopted,
            "uptime": round(now - self._ready_since, 3) if self._ready_since is not None else None,
            "ttl": self._limits.ttl,
            "seconds_until_idle_stop": round(until_idle, 3) if until_idle is not None else None,
            # Seconds a keep_alive still holds the engine up; -1 (as Ollama writes it): until further notice.
            "keep_alive": None if expiry is None else -1 if expiry == math.inf else round(max(0.0, expiry - now), 3),
            "in_flight": self._in_flight,
            "waiting": self.waiting,
            "starts": self.starts,
            "crashes": self.crashes,
            "evictions": self.evictions,
            "consecutive_start_failures": self._failures,
            "retry_in": round(self._retry_at - now, 3) if self._retry_at > now else None,
            "last_error": self._last_error,
            "last_start_seconds": self.last_start_seconds,
            "memory_mb": self.memory_mb,
        }

    def begin_shutdown(self) -> asyncio.Task[None] | None:
        """The gateway stops: start nothing any more; a start in progress is abandoned (its waiters get 503 at once)
        and the engine that was loading is stopped."""
        self._closing = True
        if self._sm.state is EngineState.STARTING:
            return asyncio.create_task(self.stop("gateway shutdown"), name=f"engine-stop-shutdown-{self.name}")
        return None

    async def aclose(self) -> None:
        """Stop the engine; called at gateway shutdown."""
        if self._start_task is not None and not self._start_task.done():
            self._start_task.cancel()
            await asyncio.wait({self._start_task})
        await self.stop("gateway shutdown")

    def kill_now(self) -> None:
        """Last-resort synchronous cleanup (a second Ctrl+C skips the async shutdown)."""
        proc = self._running.proc if self._running is not None else None
        if proc is not None and proc.returncode is None:
            proc.signal_group(signal.SIGKILL)

    def engine_failed(self, error: GatewayError) -> None:
        """A request failed talking to the engine (no answer in time, a broken or refused connection).

        Whether the engine is at fault is for its health check to say: a restart ends every other request and stream
        in flight, so only an engine that no longer answers ``/health`` is restarted (an adopted one is marked
        failed). One check runs at a time, however many requests fail together.
        """
        endpoint = self.endpoint
        if not self.ready or self._health_check is not None or endpoint is None:
            return
        self._health_check = asyncio.create_task(
            self._check_health(endpoint, error), name=f"engine-health-check-{self.name}"
        )

    # ----------------------------------------------------------------------------------- internals

    async def _check_health(self, endpoint: Endpoint, error: GatewayError) -> None:
        try:
            if await self._healthy(endpoint.base_url, self._limits.health_timeout):
                self._log.warning(
                    "a request to %s failed (%s), but the engine answers its health check: kept running",
                    self.name,
                    error.message,
                )
                return
            watch, running = self._watch_task, self._running
            if watch is not None and not watch.done() and running is not None and running.proc is not None:
                # The engine may have died, or be dying (its sockets close before it exits, and before its exit is
                # reported): let the watcher handle an exit, so that a crash is counted and reported as one (and
                # backs off when it repeats) rather than as "not answering".
                await asyncio.wait({watch}, timeout=EXIT_GRACE if running.proc.exited else DYING_GRACE)
            if self.endpoint is not endpoint or not self.ready:
                return  # stopped or restarted meanwhile
            if self.adopted:
                self._last_error = f"The engine at {endpoint.base_url} stopped answering ({error.message})"
                self._running, self._ready_since = None, None
                self._sm.transition(EngineState.READY, EngineState.FAILED)
                return
            self._log.error(
                "the engine of %s does not answer its health check after %s: restarting it", self.name, error.message
            )
            self._last_error = f"The engine stopped answering and was restarted ({error.message})"
            await self.stop("not answering")
        finally:
            self._health_check = None

    def _release(self, keep_alive: float | None) -> None:
        self._in_flight -= 1
        self.last_activity = self._clock()
        if keep_alive is not None:
            self.keep_alive(keep_alive)
        elif self._expiry is not None:
            self._expiry = None  # a request without keep_alive: the ttl again, which may come sooner
            self._activity.set()
        elif self._in_flight == 0 and self._stopper_parked:
            self._activity.set()  # the stopper waits with no deadline (it saw the engine busy): one may apply now
        self._on_change()  # room may have come free (an Event.set(): no cost when nobody waits)
        if self._in_flight == 0:
            self._on_idle()

    def _on_state_change(self, previous: EngineState, current: EngineState) -> None:
        self._log.info("engine %s: %s -> %s", self.name, previous.value, current.value)
        self._activity.set()
        about = {"engine": self.name, "models": list(self.models)}
        if current is EngineState.STARTING:
            self._events.publish("engine.starting", **about)
        elif current is EngineState.READY:
            running = self._running
            self._events.publish(
                "engine.ready",
                **about,
                pid=self.pid,
                port=running.port if running else None,
                seconds=self.last_start_seconds,
                adopted=self.adopted,
            )
        elif current is EngineState.STOPPED:
            self._events.publish("engine.stopped", **about, reason=self._stop_reason)
        elif current is EngineState.FAILED:
            kind = "engine.crashed" if previous is EngineState.READY else "engine.failed"
            retry_in = round(max(0.0, self._retry_at - self._clock()), 3)
            self._events.publish(kind, **about, error=self._last_error, retry_in=retry_in)
        self._on_change()

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
            raise EngineStartFailed(
                f"The engine failed to start: {str(exc) or type(exc).__name__}", retry_after=1
            ) from exc

    async def _start(self) -> Endpoint:
        began = self._clock()
        self.starts += 1
        try:
            running = await self._start_engine()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail_start(exc)
            raise
        self.last_start_seconds = round(self._clock() - began, 3)
        self._running = running
        # Failures in a row are forgotten once the engine has proved stable (see _watch), not at once: an engine
        # that dies right after becoming ready keeps backing off longer each time.
        self._retry_at = 0.0
        self._last_error = None
        self._ready_since = self.last_activity = self._clock()
        self._served = False
        if running.proc is not None:
            self._watch_task = asyncio.create_task(self._watch(running.proc), name=f"engine-watch-{running.proc.pid}")
        self._sm.transition(EngineState.STARTING, EngineState.READY)
        self._log.info(
            "engine %s ready at %s after %.2f s", self.name, running.endpoint.base_url, self.last_start_seconds
        )
        return running.endpoint

    def _failed_start(self, wait: float) -> EngineUnavailable:
        """What a request meets while a failed start's backoff runs: the failure, and when the next try comes."""
        error = self._last_error or "The engine failed to start."
        separator = " " if error.endswith(".") else ". "
        return self._failure(f"{error}{separator}Next try in {retry_after_header(wait)} s.", retry_after=wait)

    def _fail_start(self, exc: BaseException) -> None:
        self._failures += 1
        delay = start_backoff(self._failures, self._limits.backoff_max)
        self._failure = type(exc) if isinstance(exc, EngineUnavailable) else EngineStartFailed
        if isinstance(exc, ModelDownloadFailed):
            delay = max(delay, min(DOWNLOAD_RETRY_MIN, self._limits.backoff_max))
        self._retry_at = self._clock() + delay
        if isinstance(exc, GatewayError):
            self._last_error = exc.message
        else:
            self._last_error = f"The engine failed to start: {str(exc) or type(exc).__name__}"
        self._log.error(
            "engine %s: start failed (%d in a row; next try in %.0f s): %s",
            self.name,
            self._failures,
            delay,
            self._last_error,
        )
        if self._sm.state in (EngineState.STARTING, EngineState.READY):
            self._sm.transition(self._sm.state, EngineState.FAILED)

    async def _watch(self, proc: EngineProcess) -> None:
        code = await proc.wait()
        running = self._running
        if running is None or running.proc is not proc or self._sm.state is not EngineState.READY:
            return  # a stop we asked for
        tail = "\n".join(proc.output_tail()[-10:]) or "(no output)"
        self.crashes += 1
        message = f"The engine exited unexpectedly with code {code}. Its last output:\n{tail}"
        self._log.error("engine %s: %s", self.name, message)
        uptime = self._clock() - (self._ready_since or self._clock())
        self._running, self._ready_since = None, None
        if not self._served or (self._after_crash and uptime < STABLE_AFTER):
            when = "before it answered any request" if not self._served else "again right after a restart"
            early = (
                f"The engine exited with code {code} {uptime:.1f} s after it became ready, {when}. "
                f"Its last output:\n{tail}"
            )
            self._fail_start(EngineStartFailed(early))
            return
        # It had been serving: the next request starts it again at once. If it dies again soon, that is a loop.
        self._failures, self._retry_at = 0, 0.0
        self._after_crash = True
        self._last_error = message
        self._sm.transition(EngineState.READY, EngineState.FAILED)

    async def _stop(self, reason: str) -> None:
        self._stop_reason = reason
        self._log.info("stopping engine %s (%s)", self.name, reason)
        if self._start_task is not None and not self._start_task.done():
            self._start_task.cancel()  # the launch terminates a process it had spawned
            await asyncio.wait({self._start_task})
        running, self._running = self._running, None
        if running is not None and running.proc is not None:
            await self._terminate(running.proc)
        self._ready_since = None
        if self._watch_task is not None:
            self._watch_task.cancel()
            self._watch_task = None
        self._expiry = None
        self._failures = 0
        self._after_crash = False
        self._sm.transition(EngineState.STOPPING, EngineState.STOPPED)

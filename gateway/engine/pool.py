"""The engines of the gateway: one per model (or per group that shares one), and the memory they may take.

The pool owns every :class:`~gateway.engine.lifecycle.EngineLifecycle` and decides when one may start:

- Admission is first come, first served (one lock, fair in asyncio). A request whose engine is ready never
  touches it: the fast path is one dict lookup and a state check.
- The memory budget (GATEWAY_MEMORY_BUDGET_MB, 0 = none): an engine counts what the models file declares
  (``memory_mb``), else what its process was measured to use once loaded, else an estimate from its files.
  Before starting one that does not fit, idle engines are stopped, least recently used first; never one with
  requests or streams in flight, and never a ``persistent`` one. If nothing can be stopped yet, the request waits
  (in order; streams get ``: loading`` comments) until memory frees or GATEWAY_STARTUP_TIMEOUT ends. A model larger
  than the whole budget is refused at once.
- Exclusive groups: at most one member runs; a request for another member stops the running one once its
  requests are done (new requests for it wait behind the swap, so it cannot be held forever), then starts its own.

What starting an engine means (prepare its models, then launch or adopt) is the pool's too; the lifecycle only
knows it as ``start``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..catalog import Catalog, Model, Unit
from ..errors import BudgetExhausted, ConfigError, EngineUnavailable, GatewayError, ModelTooLarge, QueueFull
from ..events import EventSink, NullSink
from ..settings import Settings
from .launcher import Endpoint, Launcher, Running, token_source
from .lifecycle import EngineLifecycle, Lease, Limits, NotStarted
from .memory import Meter, ProcessMeter
from .preparation import Preparer
from .state import EngineState

Clock = Callable[[], float]
_HOLDS_MEMORY = frozenset({EngineState.STARTING, EngineState.READY, EngineState.STOPPING})
ADOPTED = "engine"  # the one lifecycle of an adopted engine (GATEWAY_ENGINE_URL)


@dataclass(frozen=True)
class ModelLoad:
    """One model on this node as a router weighs it: its engine's state and its requests (running: holding the
    engine; waiting: for the engine to start, to make room, or for a swap)."""

    model: str
    engine: str
    state: EngineState
    running: int
    waiting: int

    @property
    def warm(self) -> bool:
        """Its engine is up: a request is answered without a cold start."""
        return self.state is EngineState.READY


class EnginePool:
    """Every engine, the budget they share, and what a request for a model waits on."""

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        *,
        run_dir: Path,
        launcher: Launcher,
        preparer: Preparer,
        clock: Clock = time.monotonic,
        meter: Meter | None = None,
        events: EventSink | None = None,
        logger: logging.Logger,
    ) -> None:
        self._settings = settings
        self._catalog = catalog
        self._run_dir = run_dir
        self._launcher = launcher
        self._preparer = preparer
        self._clock = clock
        self._meter: Meter = meter or ProcessMeter()
        self._events: EventSink = events or NullSink()
        self._log = logger
        self._admission = asyncio.Lock()
        self._changed = asyncio.Event()  # an engine stopped, or its last request ended: room may have come free
        self._draining: set[str] = set()  # engines of exclusive groups about to be swapped out
        self._shutdown: list[asyncio.Task[None]] = []
        self._growth: dict[str, asyncio.Future[None]] = {}  # a memory check of an engine that just went idle
        self._capacity: tuple[float, int] | None = None  # when it was counted, and how many models
        if settings.engine_url:  # one engine, not ours, serving every model
            self._units: dict[str, Unit] = {ADOPTED: Unit(ADOPTED, catalog.models)}
        else:
            self._units = {unit.name: unit for unit in catalog.units}
            if settings.engine_port and len(self._units) > 1:
                raise ConfigError(
                    f"GATEWAY_ENGINE_PORT={settings.engine_port} fixes the port of one engine, but the models file "
                    f"gives {len(self._units)} (one per model or group). Fix: put the models in one [[groups]] with "
                    "share_engine = true, or leave GATEWAY_ENGINE_PORT at 0."
                )
        self._by_model = {model_id: name for name, unit in self._units.items() for model_id in unit.ids}
        self._lifecycles = {name: self._lifecycle(unit) for name, unit in self._units.items()}

    def _lifecycle(self, unit: Unit) -> EngineLifecycle:
        return EngineLifecycle(
            unit.name,
            unit.ids,
            limits=Limits(
                ttl=unit.ttl(self._settings.idle_timeout),
                backoff_max=self._settings.backoff_max,
                health_timeout=self._settings.health_timeout,
            ),
            start=lambda: self._start(unit),
            terminate=self._launcher.terminate,
            healthy=self._launcher.healthy,
            clock=self._clock,
            events=self._events,
            logger=self._log,
            on_change=self._changed.set,
            on_idle=lambda: self._idle(unit.name),
        )

    # ------------------------------------------------------------------------------------- requests

    def lifecycle(self, model_id: str) -> EngineLifecycle:
        return self._lifecycles[self._by_model[model_id]]

    def engine_of(self, model_id: str) -> str:
        return self._by_model[model_id]

    @property
    def engine_count(self) -> int:
        return len(self._lifecycles)

    def lease(self, model_id: str) -> Lease:
        return self.lifecycle(model_id).lease(model_id)

    async def ensure_ready(self, model_id: str, lease: Lease | None = None) -> Endpoint:
        """The engine of ``model_id`` once it answers; started first (making room) when it must be. ``lease``, the
        request's, then engages the engine: it may not be stopped to make room while the request runs."""
        name = self._by_model[model_id]
        lifecycle = self._lifecycles[name]
        if lifecycle.checking_health:
            # A request failed a moment ago and the engine's health is being checked: this one waits for the verdict
            # rather than going to an engine that may have just crashed, its exit not yet reported.
            await lifecycle.health_checked()
        endpoint = lifecycle.endpoint
        if lifecycle.died:
            await lifecycle.death_handled()  # then started again below, or refused while it backs off
        elif lifecycle.ready and endpoint is not None and name not in self._draining:
            if lease is not None:
                lease.engage()
            return endpoint
        if lifecycle.waiting >= self._settings.max_queue:
            raise QueueFull(
                f"{lifecycle.waiting} requests already wait for the engine of {model_id!r} (GATEWAY_MAX_QUEUE).",
                retry_after=max(1.0, lifecycle.last_start_seconds or 5.0),
            )
        lifecycle.waiting += 1
        try:
            with lease.queued() if lease is not None else contextlib.nullcontext():
                deadline = self._clock() + self._settings.startup_timeout
                while True:
                    lifecycle.check_backoff()
                    if lifecycle.needs_start() or (lifecycle.ready and name in self._draining):
                        # In line for a start (or behind a swap that takes this engine away): once through, the start
                        # is under way or the engine ready, and this request joins it even if a later one, in line
                        # behind it, marks the engine for a swap (its lease then holds the swap off).
                        await self._admit(name, deadline)
                    if lease is not None:
                        # Engaged before the engine is ready, not after: the moment it becomes ready, a request for a
                        # rival in its exclusive group (or one that needs room) may look at it, and must see it in use.
                        lease.engage()
                    with contextlib.suppress(NotStarted):
                        return await lifecycle.join()
        finally:
            lifecycle.waiting -= 1

    def prefilled(self, model_id: str, tokens: int, seconds: float) -> None:
        self.lifecycle(model_id).prefilled(tokens, seconds)

    def abandoned(self, model_id: str, prompt_tokens: int | None, elapsed: float) -> str | None:
        """A request to ``model_id`` was abandoned before its engine sent anything (see EngineLifecycle.abandoned)."""
        return self.lifecycle(model_id).abandoned(prompt_tokens, elapsed)

    def engine_failed(self, base_url: str, error: GatewayError) -> None:
        """The relay's report of a failed exchange with the engine at ``base_url``."""
        for lifecycle in self._lifecycles.values():
            endpoint = lifecycle.endpoint
            if endpoint is not None and endpoint.base_url == base_url:
                lifecycle.engine_failed(error)

    # ------------------------------------------------------------------------------------ admission

    async def _admit(self, name: str, deadline: float) -> None:
        """Begin the start of engine ``name``, in the order requests asked, once there is room for it."""
        lifecycle = self._lifecycles[name]
        async with self._admission:
            while True:
                self._changed.clear()  # before looking: a change from here on wakes the wait below
                if lifecycle.ready and name not in self._draining:
                    return
                lifecycle.check_backoff()
                if lifecycle.state is EngineState.STARTING:
                    return  # begun by a request that had the lock before: join it
                if lifecycle.state is EngineState.STOPPING or (lifecycle.ready and name in self._draining):
                    await self._wait_for_change(deadline, name)  # a swap of its exclusive group is under way
                    continue
                try:
                    await self._make_room(self._units[name], deadline)
                finally:
                    self._draining.clear()
                lifecycle.begin_start()
                return

    async def _make_room(self, unit: Unit, deadline: float) -> None:
        """Stop what must stop for ``unit`` to start: the other member of its exclusive group, idle engines
        beyond the budget. Waits for busy ones; raises when the deadline passes or the unit can never fit."""
        needed = self.footprint(unit.name)
        budget = self._settings.memory_budget_mb
        if budget and needed is not None and needed > budget:
            raise ModelTooLarge(
                f"The engine of {', '.join(unit.ids)} takes {needed:g} MB, more than the whole memory budget of "
                f"{budget:g} MB (GATEWAY_MEMORY_BUDGET_MB). Raise the budget, or declare a smaller memory_mb in the "
                "models file if the model really takes less."
            )
        while True:
            self._changed.clear()  # before looking: a change from here on wakes the wait below
            rivals = [name for name in self._exclusive_rivals(unit) if self._lifecycles[name].state in _HOLDS_MEMORY]
            self._draining.update(rivals)
            for rival in rivals:
                other = self._lifecycles[rival]
                if other.state is EngineState.READY and not other.busy:
                    await self._stop_for(other, unit, "swapped out")
            await self._measure()
            if not rivals and budget:
                await self._evict_until_fits(unit, needed or 0.0, budget)
            rivals = [name for name in self._exclusive_rivals(unit) if self._lifecycles[name].state in _HOLDS_MEMORY]
            if not rivals and (not budget or self._used(except_=unit.name) + (needed or 0.0) <= budget):
                return
            await self._wait_for_change(deadline, unit.name, needed=needed, budget=budget)

    async def _evict_until_fits(self, unit: Unit, needed: float, budget: float) -> None:
        candidates = sorted(
            (
                lc
                for name, lc in self._lifecycles.items()
                if name != unit.name
                and lc.state is EngineState.READY
                and not lc.busy
                and not lc.adopted
                and not self._units[name].persistent
            ),
            key=lambda lc: lc.last_activity,
        )
        for victim in candidates:
            if self._used(except_=unit.name) + needed <= budget:
                return
            await self._stop_for(victim, unit, "evicted")

    async def _stop_for(self, victim: EngineLifecycle, unit: Unit, why: str) -> None:
        self._log.info("stopping the engine of %s to make room for %s (%s)", victim.name, unit.name, why)
        victim.evictions += 1
        self._events.publish(
            "engine.evicted",
            engine=victim.name,
            models=list(victim.models),
            to_start=unit.name,
            reason=why,
            memory_mb=self.footprint(victim.name),
        )
        await victim.stop(why)

    async def _wait_for_change(
        self, deadline: float, name: str, *, needed: float | None = None, budget: float = 0.0
    ) -> None:
        remaining = deadline - self._clock()
        if remaining <= 0:
            busy = ", ".join(n for n, lc in self._lifecycles.items() if lc.busy and n != name) or "none"
            if needed is not None and budget:
                raise BudgetExhausted(
                    f"The engine of {name} needs {needed:g} MB; {budget - self._used(except_=name):g} MB of the "
                    f"{budget:g} MB budget are free, and the engines holding the rest stayed busy for "
                    f"GATEWAY_STARTUP_TIMEOUT={self._settings.startup_timeout:g} s (busy: {busy}). Retry later.",
                    retry_after=5,
                )
            raise EngineUnavailable(
                f"The engine of {name} could not start within GATEWAY_STARTUP_TIMEOUT: the other engines of its "
                f"exclusive group stayed busy ({busy}).",
                retry_after=5,
            )
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._changed.wait(), remaining)

    def _exclusive_rivals(self, unit: Unit) -> list[str]:
        if unit.exclusive is None:
            return []
        return [name for name, other in self._units.items() if other.exclusive == unit.exclusive and name != unit.name]

    # --------------------------------------------------------------------------------------- memory

    def footprint(self, name: str) -> float | None:
        """MB the engine counts for: declared, else measured (while it runs, or when it last ran), else estimated
        from its files; None when nothing is known yet (a model the engine fetches itself, never run)."""
        if name == ADOPTED and self._settings.engine_url:
            return 0.0  # not ours: it takes what it takes, wherever it runs
        unit = self._units[name]
        declared = unit.memory_mb
        if declared is not None:
            return declared
        measured = self._lifecycles[name].memory_mb
        return measured if measured is not None else self._preparer.estimate_mb(unit.models)

    def _used(self, except_: str | None = None) -> float:
        return sum(
            self.footprint(name) or 0.0
            for name, lc in self._lifecycles.items()
            if lc.state in _HOLDS_MEMORY and name != except_
        )

    async def _measure(self) -> None:
        """Refresh what every running engine uses (resident memory of its process tree, GPU memory)."""
        for lifecycle in self._lifecycles.values():
            pid = lifecycle.pid
            if lifecycle.ready and pid is not None:
                lifecycle.memory_mb = await asyncio.to_thread(self._meter.measure_mb, pid)

    def _idle(self, name: str) -> None:
        """The last request of engine ``name`` ended: look at how much it has grown since it loaded."""
        lifecycle = self._lifecycles[name]
        if not self._settings.engine_growth_mb or lifecycle.loaded_mb is None or lifecycle.pid is None:
            return
        running = self._growth.get(name)
        if running is None or running.done():
            self._growth[name] = asyncio.ensure_future(self._check_growth(lifecycle))

    async def _check_growth(self, lifecycle: EngineLifecycle) -> None:
        """An engine keeps the KV cache of finished conversations (mistral.rs's prefix cache, so that an agent's next
        turn prefills only its new tokens) and on a CPU never gives it back: once it has grown by more than
        GATEWAY_ENGINE_GROWTH_MB over what it took when loaded, it is stopped while idle (the next request starts it
        afresh), which bounds that memory."""
        pid, loaded = lifecycle.pid, lifecycle.loaded_mb
        if pid is None or loaded is None:
            return
        now = await asyncio.to_thread(self._meter.measure_mb, pid)
        if now is None or lifecycle.pid != pid:
            return
        lifecycle.memory_mb = now
        limit = self._settings.engine_growth_mb
        if now - loaded > limit and lifecycle.ready and lifecycle.in_flight == 0:
            self._log.warning(
                "engine %s: %.0f MB now, %.0f MB more than when it loaded (its prefix cache; the limit is "
                "GATEWAY_ENGINE_GROWTH_MB=%g): stopped while idle, to start afresh at the next request",
                lifecycle.name,
                now,
                now - loaded,
                limit,
            )
            await lifecycle.stop("grown past GATEWAY_ENGINE_GROWTH_MB")

    # ----------------------------------------------------------------------------------- operations

    async def prepare(self, model_id: str) -> None:
        """Download what ``model_id`` needs now, without starting its engine (Ollama's pull)."""
        await self._preparer.prepare(self._catalog.only([model_id]), None)

    def files_bytes(self, model_id: str) -> int | None:
        """What the model's files weigh on this machine; None when they are not all here."""
        return self._preparer.local_bytes(self._model(model_id))

    def files_modified(self, model_id: str) -> float | None:
        """When the model's files last changed on this machine; None when they are not here."""
        return self._preparer.local_mtime(self._model(model_id))

    def _model(self, model_id: str) -> Model:
        return next(model for model in self._catalog.models if model.id == model_id)

    async def load(self, model_id: str) -> None:
        """Start the engine of ``model_id`` now (the admin's preload)."""
        await self.ensure_ready(model_id)

    async def unload(self, model_id: str, *, when_idle: bool = False) -> None:
        """Stop the engine of ``model_id`` now, whatever it is doing; ``when_idle``: at once when no request uses it,
        else as soon as the requests in flight are done (Ollama's unload: nobody's answer is cut)."""
        lifecycle = self.lifecycle(model_id)
        if when_idle and lifecycle.in_flight:
            lifecycle.keep_alive(0)
            return
        await lifecycle.stop("unloaded")

    async def start_all(self) -> None:
        """Start every engine (an exclusive group's first member only)."""
        seen: set[str] = set()
        for unit in self._units.values():
            if unit.exclusive is None or unit.exclusive not in seen:
                seen.add(unit.exclusive or unit.name)
                await self.ensure_ready(unit.ids[0])

    async def stop_all(self, reason: str = "requested") -> None:
        await asyncio.gather(*(lc.stop(reason) for lc in self._lifecycles.values()))

    async def run(self) -> None:
        """Background work for the gateway's life: preload what asks for it, run every idle stopper."""
        stoppers = [
            asyncio.create_task(lc.run_idle_stopper(), name=f"idle-stopper-{name}")
            for name, lc in self._lifecycles.items()
        ]
        try:
            await self._preload()
            await asyncio.gather(*stoppers)
        finally:
            for task in stoppers:
                task.cancel()

    async def _preload(self) -> None:
        seen: set[str] = set()
        for unit in self._units.values():
            if not unit.preload or (unit.exclusive is not None and unit.exclusive in seen):
                continue
            seen.add(unit.exclusive or unit.name)
            try:
                await self.ensure_ready(unit.ids[0])
            except GatewayError as exc:
                self._log.error("preloading %s failed: %s", unit.name, exc.message)

    # ------------------------------------------------------------------------------------ the state

    def model_status(self, model_id: str) -> dict[str, Any]:
        """What a model card says about its engine."""
        name = self._by_model[model_id]
        lifecycle = self._lifecycles[name]
        until = lifecycle.seconds_until_idle_stop()
        return {
            "state": lifecycle.state.value,
            "engine": name,
            "seconds_until_idle_stop": round(until, 3) if until is not None else None,
            "memory_mb": self.footprint(name),
        }

    def status(self) -> dict[str, Any]:
        engines = []
        for name, lifecycle in self._lifecycles.items():
            unit = self._units[name]
            row = lifecycle.status()
            row["memory_mb"] = self.footprint(name)
            row["memory_source"] = (
                "declared"
                if unit.memory_mb is not None
                else "measured"
                if lifecycle.memory_mb is not None
                else "estimated"
            )
            row["persistent"] = unit.persistent
            row["exclusive_group"] = unit.exclusive
            engines.append(row)
        budget = self._settings.memory_budget_mb
        return {"engines": engines, "budget": {"budget_mb": budget or None, "used_mb": round(self._used(), 1)}}

    def loads(self) -> list[ModelLoad]:
        """Every model's engine state and requests, counted where the requests hold their engines (their leases):
        cheap enough to be read many times a second."""
        return [
            ModelLoad(model, name, lifecycle.state, *lifecycle.requests(model))
            for name, lifecycle in self._lifecycles.items()
            for model in lifecycle.models
        ]

    def cold(self, model_id: str) -> bool:
        """Whether a request for ``model_id`` would wait for its engine to start: it is neither up nor starting."""
        lifecycle = self._lifecycles[self._by_model[model_id]]
        return lifecycle.state not in (EngineState.READY, EngineState.STARTING) or lifecycle.died

    def ready_engines(self) -> dict[str, str]:
        """The base URL of every engine that is ready, by engine name."""
        return {
            name: endpoint.base_url
            for name, lc in self._lifecycles.items()
            if lc.ready and (endpoint := lc.endpoint) is not None
        }

    def failing(self) -> dict[str, str | None]:
        """The engines whose last start failed, within their backoff (a request for them fails at once): their
        errors, by engine."""
        return {name: lc.last_error for name, lc in self._lifecycles.items() if lc.backing_off}

    def capacity(self) -> int:
        """How many models can be warm at once here: those of every engine, an exclusive group's largest member
        only, and under a memory budget only as many engines as fit in it side by side (smallest first; one whose
        size is not known yet counts as fitting). Under a budget, sizes may come from the model files on disk:
        the answer is reused for a second (a scraper asks 20 times a second)."""
        now = self._clock()
        if self._capacity is not None and now - self._capacity[0] < 1.0:
            return self._capacity[1]
        self._capacity = now, self._count_capacity()
        return self._capacity[1]

    def _count_capacity(self) -> int:
        largest: dict[str, Unit] = {}
        for unit in self._units.values():
            key = unit.exclusive or f"\0{unit.name}"  # a unit alone is a group of one
            if key not in largest or len(unit.ids) > len(largest[key].ids):
                largest[key] = unit
        units = list(largest.values())
        budget = self._settings.memory_budget_mb
        if not budget:
            return sum(len(unit.ids) for unit in units)
        count, used = 0, 0.0
        for unit in sorted(units, key=lambda u: self.footprint(u.name) or 0.0):
            used += self.footprint(unit.name) or 0.0
            if used > budget:
                break
            count += len(unit.ids)
        return count

    def tick(self) -> None:
        """Have every idle stopper look at its deadline again (see EngineLifecycle.tick)."""
        for lifecycle in self._lifecycles.values():
            lifecycle.tick()

    async def refresh(self) -> None:
        """Measure the running engines again (for /status and /metrics)."""
        await self._measure()

    # ------------------------------------------------------------------------------------- shutdown

    def begin_shutdown(self) -> None:
        for lifecycle in self._lifecycles.values():
            task = lifecycle.begin_shutdown()
            if task is not None:
                self._shutdown.append(task)
        self._changed.set()

    async def aclose(self) -> None:
        await asyncio.gather(*(lc.aclose() for lc in self._lifecycles.values()))
        await self._preparer.aclose()
        await self._launcher.aclose()

    def kill_now(self) -> None:
        for lifecycle in self._lifecycles.values():
            lifecycle.kill_now()

    # -------------------------------------------------------------------------------------- starting

    async def _start(self, unit: Unit) -> Running:
        """Start one engine: adopt it when one runs already, else prepare its models and launch it."""
        catalog = self._catalog if unit.name == ADOPTED else self._catalog.only(unit.ids)
        adopted = await self._launcher.adopt(catalog)
        if adopted is not None:
            return adopted
        program = await self._launcher.program()  # no engine installed: say so before any download
        prepared = await self._preparer.prepare(catalog, token_source(self._settings, self._launcher.environ))
        running = await self._launcher.launch(prepared, self._run_dir / _folder(unit.name), program, name=unit.name)
        if running.proc is not None:
            loaded = await asyncio.to_thread(self._meter.measure_mb, running.proc.pid)
            lifecycle = self._lifecycles[unit.name]
            lifecycle.memory_mb = lifecycle.loaded_mb = loaded
        return running


def _folder(name: str) -> str:
    """A run-dir folder name for an engine (model ids have slashes)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "engine"

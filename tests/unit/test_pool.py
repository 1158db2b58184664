"""The engine pool and its lifecycles, with fake processes, a fake clock and a fake memory meter.

Events are fed by hand (a process exits, the clock moves, a request ends) and each test checks what the pool did:
which processes it spawned and stopped, what a request met. Nothing here waits on time.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from gateway.catalog import load_catalog
from gateway.engine import lifecycle as lifecycle_module
from gateway.engine.launcher import Launcher
from gateway.engine.lifecycle import STABLE_AFTER
from gateway.engine.pool import EnginePool
from gateway.engine.preparation import Preparer
from gateway.engine.state import EngineState
from gateway.errors import (
    BudgetExhausted,
    ConfigError,
    EngineCrashed,
    EngineNotInstalled,
    EngineStalled,
    EngineStartFailed,
    EngineUnavailable,
    ModelTooLarge,
)
from gateway.settings import Settings
from tests.fakes.engines import Clock, FakeMeter, FakeProcess, FakeSpawner, make_pool, repo_models, until

CHAT = repo_models("chat")


def pool_of(tmp_path: Path, toml: str = CHAT, **kw: Any) -> tuple[EnginePool, FakeSpawner, Clock]:
    spawner, clock = FakeSpawner(), Clock()
    return make_pool(tmp_path, toml, spawner=spawner, clock=clock, **kw), spawner, clock


# ----------------------------------------------------------------------------------- one engine's life


async def test_many_cold_requests_share_one_spawn(tmp_path: Path) -> None:
    pool, spawner, _ = pool_of(tmp_path)
    urls = await asyncio.gather(*(pool.ensure_ready("chat") for _ in range(50)))
    assert len(spawner.procs) == 1 and len({u.base_url for u in urls}) == 1
    assert pool.lifecycle("chat").state is EngineState.READY and pool.lifecycle("chat").starts == 1
    await pool.aclose()
    assert spawner.procs[0].signals[0] == signal.SIGTERM


async def test_a_model_is_cold_while_its_engine_is_neither_up_nor_starting(tmp_path: Path) -> None:
    pool, spawner, _ = pool_of(tmp_path)
    assert pool.cold("chat")
    starting = asyncio.ensure_future(pool.ensure_ready("chat"))
    await until(lambda: pool.lifecycle("chat").state is EngineState.STARTING)
    assert not pool.cold("chat")  # a request now joins the start under way
    await starting
    assert not pool.cold("chat")
    spawner.procs[0].die(9)
    assert pool.cold("chat")  # dead, though nothing has handled its exit yet
    await pool.aclose()
    assert pool.cold("chat")


async def test_start_failure_backs_off_then_retries(tmp_path: Path) -> None:
    pool, spawner, clock = pool_of(tmp_path)
    spawner.exit_codes = [1, 1, None]
    with pytest.raises(EngineStartFailed) as info:
        await pool.ensure_ready("chat")
    assert "exited with code 1" in info.value.message and "out of memory" in info.value.message
    assert info.value.headers["x-should-retry"] == "false"
    first_wait = float(info.value.headers["Retry-After"])
    with pytest.raises(EngineStartFailed) as again:  # within the backoff: no new spawn, the same answer at once
        await pool.ensure_ready("chat")
    assert len(spawner.procs) == 1 and "Next try in" in again.value.message
    clock.now += first_wait + 0.1
    with pytest.raises(EngineStartFailed) as second:
        await pool.ensure_ready("chat")
    assert float(second.value.headers["Retry-After"]) > first_wait  # the backoff grows
    clock.now += 1000
    assert await pool.ensure_ready("chat")
    status = pool.lifecycle("chat").status()
    # Forgotten once the engine has proved stable or been stopped, not the moment it is ready.
    assert len(spawner.procs) == 3 and status["consecutive_start_failures"] == 2
    await pool.unload("chat")
    assert pool.lifecycle("chat").status()["consecutive_start_failures"] == 0
    await pool.aclose()


async def test_startup_timeout_kills_the_process(tmp_path: Path) -> None:
    pool, spawner, clock = pool_of(tmp_path, startup_timeout=5)
    original = spawner.spawn

    async def never_ready(argv: Sequence[str], *, env: Mapping[str, str], cwd: Path, output: Any = None) -> FakeProcess:
        proc = await original(argv, env=env, cwd=cwd)
        proc.ready = False
        clock.now += 10  # the engine loads for longer than the startup timeout
        return proc

    spawner.spawn = never_ready  # type: ignore[method-assign]
    with pytest.raises(EngineStartFailed, match="GATEWAY_STARTUP_TIMEOUT"):
        await pool.ensure_ready("chat")
    assert spawner.procs[0].signals[0] == signal.SIGTERM and not spawner.procs[0].alive
    await pool.aclose()


async def test_idle_deadline_counts_from_last_release_and_ttl(tmp_path: Path) -> None:
    pool, _, clock = pool_of(tmp_path, idle_timeout=60)
    lease = pool.lease("chat")
    await pool.ensure_ready("chat")
    lifecycle = pool.lifecycle("chat")
    clock.now += 100
    assert lifecycle.seconds_until_idle_stop() is None  # busy: never stops
    lease.release()
    assert lifecycle.seconds_until_idle_stop() == 60
    clock.now += 30
    assert lifecycle.seconds_until_idle_stop() == 30
    await pool.aclose()


async def test_keep_alive_means_what_it_means_in_ollama(tmp_path: Path) -> None:
    pool, _, clock = pool_of(tmp_path, idle_timeout=300)
    await pool.ensure_ready("chat")
    lifecycle = pool.lifecycle("chat")
    pool.lease("chat").release(keep_alive=10)  # shorter than the idle timeout: it wins, as in Ollama
    assert lifecycle.seconds_until_idle_stop() == 10
    pool.lease("chat").release(keep_alive=-1)  # until further notice
    clock.now += 10**6
    assert lifecycle.seconds_until_idle_stop() is None and lifecycle.status()["keep_alive"] == -1
    busy = pool.lease("chat")
    pool.lease("chat").release(keep_alive=0)  # stop now ... once no request is in flight
    assert lifecycle.seconds_until_idle_stop() is None
    busy.release(keep_alive=0)
    assert lifecycle.seconds_until_idle_stop() == 0
    pool.lease("chat").release()  # the newest request says nothing: the idle timeout again
    assert lifecycle.seconds_until_idle_stop() == 300 and lifecycle.status()["keep_alive"] is None
    await pool.aclose()


async def test_the_idle_stopper_stops_the_engine(tmp_path: Path) -> None:
    pool, spawner, clock = pool_of(tmp_path, idle_timeout=60)
    pool.lease("chat").release()
    await pool.ensure_ready("chat")
    background = asyncio.create_task(pool.run())
    clock.now += 61
    pool.tick()
    await until(lambda: pool.lifecycle("chat").state is EngineState.STOPPED)
    assert not spawner.procs[0].alive
    background.cancel()
    await pool.aclose()


async def _serve_one(pool: EnginePool) -> None:
    """One request the engine answers."""
    lease = pool.lease("chat")
    await pool.ensure_ready("chat", lease)
    lease.answered()
    lease.release()


async def test_a_crash_after_serving_restarts_at_the_next_request(tmp_path: Path) -> None:
    pool, spawner, clock = pool_of(tmp_path)
    await _serve_one(pool)
    clock.now += 1  # however soon after it became ready: it had answered
    spawner.procs[0].exit(137)
    await until(lambda: pool.lifecycle("chat").state is EngineState.FAILED)
    assert pool.lifecycle("chat").crashes == 1 and "code 137" in (pool.lifecycle("chat").status()["last_error"] or "")
    assert pool.lifecycle("chat").status()["retry_in"] is None
    await _serve_one(pool)  # the next request: started again at once, and answered
    assert len(spawner.procs) == 2 and pool.lifecycle("chat").ready
    await pool.aclose()


async def test_a_request_in_the_instant_an_engine_dies_waits_until_its_end_is_handled(tmp_path: Path) -> None:
    pool, spawner, clock = pool_of(tmp_path)
    await _serve_one(pool)
    clock.now += 1
    dead = spawner.procs[0]
    dead.die(137)  # its sockets closed (the request that crashed it got its error); its end not yet reported
    lease = pool.lease("chat")
    ready = asyncio.ensure_future(pool.ensure_ready("chat", lease))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not ready.done()  # not handed the dead engine's address
    dead.report()
    endpoint = await ready  # started again at once (it had served) and answered
    assert len(spawner.procs) == 2 and endpoint.base_url.endswith(f":{spawner.procs[1].port}")
    assert pool.lifecycle("chat").crashes == 1
    lease.release()
    await pool.aclose()


async def test_an_engine_that_dies_before_answering_backs_off_like_a_failed_start(tmp_path: Path) -> None:
    pool, spawner, clock = pool_of(tmp_path)
    waits = []
    for attempt in range(3):
        await pool.ensure_ready("chat")
        clock.now += STABLE_AFTER + 1  # however long it was up: it never answered
        spawner.procs[-1].exit(139)  # e.g. a model that crashes the engine at its first request
        await until(lambda: pool.lifecycle("chat").state is EngineState.FAILED)
        with pytest.raises(EngineStartFailed) as info:  # no new spawn within the backoff
            await pool.ensure_ready("chat")
        assert "before it answered any request" in info.value.message and len(spawner.procs) == attempt + 1
        waits.append(float(info.value.headers["Retry-After"]))
        clock.now += waits[-1] + 0.1
    assert waits[0] < waits[1] < waits[2]  # and it grows, as for a start that fails
    await pool.aclose()


async def test_a_crash_loop_backs_off_with_growing_delays_until_the_engine_runs_for_long(tmp_path: Path) -> None:
    pool, spawner, clock = pool_of(tmp_path)
    await _serve_one(pool)
    spawner.procs[-1].exit(139)  # the first crash: restarted at once
    await until(lambda: pool.lifecycle("chat").state is EngineState.FAILED)
    waits = []
    for _ in range(3):
        await _serve_one(pool)  # started again, answers one request ...
        clock.now += 5
        spawner.procs[-1].exit(139)  # ... and dies again right after the restart: a loop
        await until(lambda: pool.lifecycle("chat").state is EngineState.FAILED)
        with pytest.raises(EngineStartFailed) as info:
            await pool.ensure_ready("chat")
        assert "again right after a restart" in info.value.message
        waits.append(float(info.value.headers["Retry-After"]))
        clock.now += waits[-1] + 0.1
    assert waits[0] < waits[1] < waits[2]
    starts = len(spawner.procs)
    await _serve_one(pool)
    clock.now += STABLE_AFTER  # this time it runs for long: recovered
    spawner.procs[-1].exit(139)
    await until(lambda: pool.lifecycle("chat").state is EngineState.FAILED)
    await _serve_one(pool)  # a first crash again: restarted at once
    assert len(spawner.procs) == starts + 2
    await pool.aclose()


async def test_sigterm_then_sigkill_when_ignored(tmp_path: Path) -> None:
    pool, spawner, _ = pool_of(tmp_path, stop_timeout=0.05)
    spawner.ignore_term = True
    await pool.ensure_ready("chat")
    await pool.unload("chat")
    assert spawner.procs[0].signals[:2] == [signal.SIGTERM, signal.SIGKILL]
    assert pool.lifecycle("chat").state is EngineState.STOPPED


async def test_no_engine_installed_is_a_503_that_says_what_to_install(tmp_path: Path) -> None:
    config = Settings(_env_file=None, engine_binary="/nonexistent/mistralrs-server")
    catalog = load_catalog(None, model_dir=tmp_path)
    spawner = FakeSpawner()
    launcher = Launcher(config, spawner=spawner, probe=spawner.probe(), clock=Clock(), logger=_logger())
    pool = EnginePool(
        config,
        catalog,
        run_dir=tmp_path,
        launcher=launcher,
        preparer=Preparer(config),
        meter=FakeMeter(),
        logger=_logger(),
    )
    with pytest.raises(EngineNotInstalled) as info:
        await pool.ensure_ready(catalog.models[0].id)
    assert "/nonexistent/mistralrs-server" in info.value.message


def _logger() -> Any:
    import logging

    return logging.getLogger("tests.pool")


async def test_a_failed_request_restarts_only_an_engine_that_fails_its_health_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lifecycle_module, "DYING_GRACE", 0.05)  # how long a live engine may take to exit
    pool, spawner, _ = pool_of(tmp_path)
    endpoint = await pool.ensure_ready("chat")
    lifecycle = pool.lifecycle("chat")
    pool.engine_failed(endpoint.base_url, EngineStalled("a request got no answer in time"))
    await until(lambda: not lifecycle.checking_health)
    assert lifecycle.ready and spawner.procs[0].signals == []  # it answers: kept
    spawner.procs[0].ready = False  # now it does not
    for _ in range(5):  # many failing requests, one check
        pool.engine_failed(endpoint.base_url, EngineStalled("a request got no answer in time"))
    await until(lambda: lifecycle.state is EngineState.STOPPED)
    assert spawner.procs[0].signals[0] == signal.SIGTERM
    assert "stopped answering" in (lifecycle.status()["last_error"] or "")
    await pool.aclose()


async def test_the_health_check_after_a_failed_request_waits_as_long_as_gateway_health_timeout(tmp_path: Path) -> None:
    spawner = FakeSpawner()
    probe = spawner.probe()
    spawner.probe = lambda: probe  # type: ignore[method-assign]  # the launcher's, kept to read its calls
    pool = make_pool(tmp_path, CHAT, spawner=spawner, health_timeout=2.5)
    endpoint = await pool.ensure_ready("chat")
    checked = len(probe.calls)
    pool.engine_failed(endpoint.base_url, EngineStalled("a request got no answer in time"))
    await until(lambda: not pool.lifecycle("chat").checking_health)
    deadlines = [call.deadline.total for call in probe.calls[checked:] if call.deadline is not None]
    assert deadlines == [2.5]
    await pool.aclose()


async def test_an_engine_dying_while_its_health_is_checked_counts_as_a_crash(tmp_path: Path) -> None:
    """Its sockets close (the request fails, so does the health check) a moment before the process exits: that is a
    crash, counted and backed off as one, not an engine "not answering" that the gateway stops itself."""
    pool, spawner, _ = pool_of(tmp_path)
    endpoint = await pool.ensure_ready("chat")
    lifecycle = pool.lifecycle("chat")
    proc = spawner.procs[0]
    proc.ready = False  # its port closed; the process still running
    pool.engine_failed(endpoint.base_url, EngineCrashed("the engine closed the connection"))
    await asyncio.sleep(0.2)  # a busy machine: the exit comes well after the health check failed
    proc.exit(1)
    await until(lambda: lifecycle.state is EngineState.FAILED)
    assert proc.signals == [] and lifecycle.crashes == 1  # never stopped by the gateway: it crashed
    assert "not answering" not in (lifecycle.status()["last_error"] or "")
    await pool.aclose()


async def test_a_request_during_the_health_check_waits_for_its_verdict(tmp_path: Path) -> None:
    """The engine crashed: its port is closed, its exit not yet reported. A request that comes meanwhile is not sent
    to it (it would fail as well): it gets the engine started again once the crash is known."""
    pool, spawner, clock = pool_of(tmp_path)
    lease = pool.lease("chat")
    endpoint = await pool.ensure_ready("chat", lease)
    lease.answered()  # it served requests and ran long: a first crash, restarted at once
    lease.release(None)
    clock.now += STABLE_AFTER + 1
    lifecycle = pool.lifecycle("chat")
    dying = spawner.procs[0]
    dying.ready = False
    pool.engine_failed(endpoint.base_url, EngineCrashed("the engine closed the connection"))
    assert lifecycle.checking_health
    waiting = asyncio.ensure_future(pool.ensure_ready("chat"))
    await asyncio.sleep(0.1)
    assert not waiting.done()  # not handed the dying engine
    dying.exit(1)
    fresh = await asyncio.wait_for(waiting, 10)
    assert fresh.base_url != endpoint.base_url and len(spawner.procs) == 2 and lifecycle.crashes == 1
    await pool.aclose()


async def test_a_request_during_the_health_check_of_a_live_engine_gets_it_once_it_answers(tmp_path: Path) -> None:
    pool, spawner, _ = pool_of(tmp_path)
    endpoint = await pool.ensure_ready("chat")
    pool.engine_failed(endpoint.base_url, EngineStalled("a request got no answer in time"))
    assert (await asyncio.wait_for(pool.ensure_ready("chat"), 10)) == endpoint
    assert len(spawner.procs) == 1
    await pool.aclose()


async def test_shutdown_answers_requests_waiting_for_a_start_and_stops_the_loading_engine(tmp_path: Path) -> None:
    pool, spawner, _ = pool_of(tmp_path)
    original = spawner.spawn
    loading = asyncio.Event()

    async def slow(argv: Sequence[str], *, env: Mapping[str, str], cwd: Path, output: Any = None) -> FakeProcess:
        proc = await original(argv, env=env, cwd=cwd)
        proc.ready = False  # loading...
        loading.set()
        return proc

    spawner.spawn = slow  # type: ignore[method-assign]
    waiting = asyncio.ensure_future(pool.ensure_ready("chat"))
    await loading.wait()
    pool.begin_shutdown()
    with pytest.raises(EngineUnavailable, match="shutting down"):
        await waiting
    await until(lambda: not spawner.procs[0].alive)
    with pytest.raises(EngineUnavailable, match="shutting down"):  # and nothing starts any more
        await pool.ensure_ready("chat")
    await pool.aclose()


# ------------------------------------------------------------------------------------- many engines


THREE = repo_models("a", "b", "c", a={"memory_mb": 100}, b={"memory_mb": 100}, c={"memory_mb": 100})


def engine_of(spawner: FakeSpawner, model: str) -> FakeProcess:
    (proc,) = spawner.serving(f"org/{model}")
    return proc


async def test_each_model_has_its_own_engine_and_concurrent_cold_requests_start_each_once(tmp_path: Path) -> None:
    pool, spawner, _ = pool_of(tmp_path, THREE)
    await asyncio.gather(*(pool.ensure_ready(model) for model in ("a", "b", "c") * 100))
    assert len(spawner.procs) == 3
    assert [len(spawner.serving(f"org/{model}")) for model in ("a", "b", "c")] == [1, 1, 1]
    await pool.aclose()


async def test_a_budget_stops_the_least_recently_used_idle_engine_never_a_busy_one(tmp_path: Path) -> None:
    pool, spawner, clock = pool_of(tmp_path, THREE, memory_budget_mb=250)
    await pool.ensure_ready("a")
    pool.lease("a").release()
    clock.now += 1
    await pool.ensure_ready("b")
    pool.lease("b").release()  # b was used after a: a is the least recently used
    clock.now += 1
    await pool.ensure_ready("c")
    assert not engine_of(spawner, "b").signals and not spawner.serving("org/a")  # a made room
    assert pool.lifecycle("a").evictions == 1 and pool.status()["budget"]["used_mb"] == 200

    busy = pool.lease("b")  # b streams; c is idle but used more recently than b
    await pool.ensure_ready("b", busy)
    clock.now += 1
    pool.lease("c").release()
    await pool.ensure_ready("a")
    assert spawner.serving("org/b") and not spawner.serving("org/c")  # the idle one went, never the busy one
    busy.release()
    await pool.aclose()


async def test_with_nothing_to_stop_a_request_waits_in_order_until_memory_frees(tmp_path: Path) -> None:
    pool, spawner, _ = pool_of(tmp_path, THREE, memory_budget_mb=250)
    streams = [pool.lease("a"), pool.lease("b")]  # both busy: nothing may be stopped
    await asyncio.gather(pool.ensure_ready("a", streams[0]), pool.ensure_ready("b", streams[1]))
    waiting = asyncio.ensure_future(pool.ensure_ready("c"))
    await until(lambda: pool.lifecycle("c").waiting == 1)
    await asyncio.sleep(0)
    assert not waiting.done() and len(spawner.procs) == 2
    streams[0].release()  # a is done: it can go
    await waiting
    assert not spawner.serving("org/a") and spawner.serving("org/b") and spawner.serving("org/c")
    streams[1].release()
    await pool.aclose()


async def test_waiting_for_memory_ends_with_the_startup_timeout(tmp_path: Path) -> None:
    pool, _, clock = pool_of(tmp_path, THREE, memory_budget_mb=250, startup_timeout=30)
    holds = [pool.lease("a"), pool.lease("b")]
    await asyncio.gather(pool.ensure_ready("a", holds[0]), pool.ensure_ready("b", holds[1]))
    waiting = asyncio.ensure_future(pool.ensure_ready("c"))
    await until(lambda: pool.lifecycle("c").waiting == 1)
    clock.now += 31
    holds.append(pool.lease("a"))
    holds.pop().release()  # something changes: the waiter looks at its deadline again
    with pytest.raises(BudgetExhausted, match="busy: a, b"):
        await waiting
    for lease in holds:
        lease.release()
    await pool.aclose()


async def test_a_model_larger_than_the_whole_budget_is_refused_at_once(tmp_path: Path) -> None:
    pool, spawner, _ = pool_of(tmp_path, repo_models("huge", huge={"memory_mb": 900}), memory_budget_mb=500)
    with pytest.raises(ModelTooLarge) as info:
        await pool.ensure_ready("huge")
    assert "900 MB" in info.value.message and "500 MB" in info.value.message and spawner.procs == []
    assert info.value.code == "model_too_large" and info.value.headers["x-should-retry"] == "false"


async def test_measured_memory_counts_and_persistent_engines_are_never_evicted(tmp_path: Path) -> None:
    meter = FakeMeter(default=100)
    toml = repo_models("a", "b", "c", a={"persistent": True})
    pool, spawner, clock = pool_of(tmp_path, toml, memory_budget_mb=250, meter=meter)
    assert pool.footprint("c") is None  # fetched by the engine, never run: nothing known yet
    await pool.ensure_ready("c")
    await pool.unload("c")
    assert pool.footprint("c") == 100  # what it used when it last ran
    await pool.ensure_ready("a")
    clock.now += 1
    await pool.ensure_ready("b")
    assert pool.footprint("a") == 100 and pool.status()["engines"][0]["memory_source"] == "measured"
    clock.now += 1
    await pool.ensure_ready("c")  # a is the least recently used, but persistent: b goes
    assert spawner.serving("org/a") and not spawner.serving("org/b") and spawner.serving("org/c")
    await pool.aclose()


async def test_an_exclusive_group_swaps_members_once_the_running_ones_requests_end(tmp_path: Path) -> None:
    toml = repo_models("a", "b") + '[[groups]]\nname = "pair"\nmodels = ["a", "b"]\nexclusive = true\n'
    pool, spawner, _ = pool_of(tmp_path, toml)
    running = pool.lease("a")  # as the gateway does: the lease first, then the engine
    await pool.ensure_ready("a", running)
    wants_b = pool.lease("b")
    swap = asyncio.ensure_future(pool.ensure_ready("b", wants_b))
    await until(lambda: pool.lifecycle("b").waiting == 1)
    wants_a = pool.lease("a")  # a new request for a: waiting behind the swap, it does not hold the swap off
    late = asyncio.ensure_future(pool.ensure_ready("a", wants_a))
    await asyncio.sleep(0)
    assert not swap.done() and not late.done() and spawner.serving("org/a")
    running.release()
    await swap
    assert not spawner.serving("org/a") and spawner.serving("org/b")
    wants_b.release()  # b's request is answered: now a comes back, and b goes
    await late
    assert spawner.serving("org/a") and not spawner.serving("org/b")
    wants_a.release()
    await pool.aclose()


async def test_a_shared_group_is_one_engine_started_and_stopped_together(tmp_path: Path) -> None:
    toml = repo_models("a", "b") + '[[groups]]\nname = "pair"\nmodels = ["a", "b"]\nshare_engine = true\n'
    pool, spawner, _ = pool_of(tmp_path, toml)
    first, second = await asyncio.gather(pool.ensure_ready("a"), pool.ensure_ready("b"))
    assert len(spawner.procs) == 1 and first.base_url == second.base_url
    assert "multi-model" in spawner.procs[0].argv
    await pool.unload("b")
    assert pool.lifecycle("a").state is EngineState.STOPPED
    await pool.aclose()


async def test_each_engine_has_its_own_ttl(tmp_path: Path) -> None:
    toml = repo_models("short", "never", short={"ttl": 5}, never={"ttl": 0})
    pool, spawner, clock = pool_of(tmp_path, toml, idle_timeout=300)
    await asyncio.gather(pool.ensure_ready("short"), pool.ensure_ready("never"))
    pool.lease("short").release()
    pool.lease("never").release()
    background = asyncio.create_task(pool.run())
    clock.now += 6
    pool.tick()
    await until(lambda: pool.lifecycle("short").state is EngineState.STOPPED)
    assert spawner.serving("org/never") and pool.lifecycle("never").seconds_until_idle_stop() is None
    background.cancel()
    await pool.aclose()


async def test_preload_starts_models_and_groups_when_the_gateway_starts(tmp_path: Path) -> None:
    toml = (
        repo_models("a", "b", "c", "d", a={"preload": True})
        + '[[groups]]\nname = "pair"\nmodels = ["c", "d"]\nexclusive = true\npreload = true\n'
    )
    pool, spawner, _ = pool_of(tmp_path, toml)
    background = asyncio.create_task(pool.run())
    await until(lambda: pool.lifecycle("a").ready and pool.lifecycle("c").ready)
    assert not spawner.serving("org/b") and not spawner.serving("org/d")  # an exclusive group: its first member
    background.cancel()
    await pool.aclose()


def test_groups_are_checked_when_the_models_file_is_read(tmp_path: Path) -> None:
    for groups, message in [
        ('[[groups]]\nname = "g"\nmodels = ["a", "nope"]\n', "'nope' names no model"),
        ('[[groups]]\nname = "g"\nmodels = ["a"]\n[[groups]]\nname = "h"\nmodels = ["a"]\n', "already in the group"),
        ('[[groups]]\nname = "g"\nmodels = ["a"]\nshare_engine = true\nexclusive = true\n', "exclude each other"),
        ('[[groups]]\nname = "b"\nmodels = ["a"]\n', "already used"),
    ]:
        with pytest.raises(ConfigError, match=message):
            make_pool(tmp_path, repo_models("a", "b") + groups)


def test_a_fixed_engine_port_needs_a_single_engine(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="share_engine"):
        make_pool(tmp_path, repo_models("a", "b"), engine_port=41234)


# ------------------------------------------------------------------ tokens: abandoned prefills, a growing engine


async def test_an_abandoned_long_prefill_stops_an_engine_nothing_else_uses(tmp_path: Path) -> None:
    pool, spawner, _ = pool_of(tmp_path)
    lease = pool.lease("chat")
    await pool.ensure_ready("chat", lease)
    lifecycle = pool.lifecycle("chat")
    lifecycle.last_start_seconds = 2.0
    lifecycle.prefilled(1000, 1.0)  # the engine prefills 1,000 tokens a second
    other = pool.lease("chat")
    await pool.ensure_ready("chat", other)
    lease.release()
    # Another request is using the engine: it waits behind the prefill either way, so nothing is stopped.
    assert pool.abandoned("chat", 20_000, elapsed=1.0) is None
    other.release()
    # A prompt that is nearly done: waiting costs less than a restart.
    assert pool.abandoned("chat", 2_500, elapsed=1.0) is None
    why = pool.abandoned("chat", 20_000, elapsed=1.0)  # 19 s of prefill left for nobody, against a 2 s restart
    assert why is not None and "20000-token prompt" in why and "19 s left" in why
    await until(lambda: lifecycle.state is EngineState.STOPPED)
    assert not spawner.procs[0].alive
    await pool.ensure_ready("chat")  # the next request starts it afresh
    assert len(spawner.procs) == 2
    await pool.aclose()


async def test_an_engine_grown_past_its_bound_is_restarted_once_idle(tmp_path: Path) -> None:
    meter = FakeMeter(default=300)
    pool, spawner, _ = pool_of(tmp_path, meter=meter, engine_growth_mb=500)
    lease = pool.lease("chat")
    await pool.ensure_ready("chat", lease)
    lifecycle = pool.lifecycle("chat")
    assert lifecycle.loaded_mb == 300
    meter.default = 700  # the prefix cache holds a few conversations: within the bound
    lease.release()
    await until(lambda: lifecycle.memory_mb == 700)
    assert lifecycle.ready
    lease = pool.lease("chat")
    await pool.ensure_ready("chat", lease)
    meter.default = 900  # 600 MB more than when it loaded
    lease.release()
    await until(lambda: lifecycle.state is EngineState.STOPPED)
    assert not spawner.procs[0].alive and lifecycle.status()["state"] == "stopped"
    await pool.aclose()


async def test_a_busy_engine_is_never_restarted_for_its_growth(tmp_path: Path) -> None:
    meter = FakeMeter(default=300)
    pool, _, _ = pool_of(tmp_path, meter=meter, engine_growth_mb=100)
    first, second = pool.lease("chat"), pool.lease("chat")
    await pool.ensure_ready("chat", first)
    meter.default = 2000
    first.release()  # the other request still runs: no look at all
    assert pool.lifecycle("chat").ready and pool.lifecycle("chat").memory_mb == 300
    second.release()
    await until(lambda: pool.lifecycle("chat").state is EngineState.STOPPED)
    await pool.aclose()


# ------------------------------------------------------------------------------------- what routers read


def loads_of(pool: EnginePool) -> dict[str, tuple[str, int, int]]:
    return {load.model: (load.state.value, load.running, load.waiting) for load in pool.loads()}


async def test_a_models_requests_count_as_waiting_while_its_engine_starts_then_as_running(tmp_path: Path) -> None:
    toml = THREE + '[[groups]]\nname = "pair"\nmodels = ["b", "c"]\nshare_engine = true\n'
    pool, spawner, _ = pool_of(tmp_path, toml)
    original = spawner.spawn

    async def loading(argv: Sequence[str], *, env: Mapping[str, str], cwd: Path, output: Any = None) -> FakeProcess:
        proc = await original(argv, env=env, cwd=cwd)
        proc.ready = "org/a" not in argv  # a's engine loads until the test says it is done
        return proc

    spawner.spawn = loading  # type: ignore[method-assign]
    cold = [pool.lease("a") for _ in range(3)]
    starts = [asyncio.ensure_future(pool.ensure_ready("a", lease)) for lease in cold]
    await until(lambda: pool.lifecycle("a").waiting == 3 and spawner.procs)
    assert loads_of(pool)["a"] == ("starting", 0, 3)  # a cold start's waiters count as waiting
    spawner.procs[0].ready = True
    await asyncio.gather(*starts)
    assert loads_of(pool)["a"] == ("ready", 3, 0)
    b = pool.lease("b")
    await pool.ensure_ready("b", b)
    assert loads_of(pool) == {"a": ("ready", 3, 0), "b": ("ready", 1, 0), "c": ("ready", 0, 0)}  # one engine, 2 models
    for lease in (*cold, b):
        lease.release()
    assert {load.model: (load.running, load.waiting) for load in pool.loads()} == {m: (0, 0) for m in "abc"}
    assert [load.warm for load in pool.loads()] == [True, True, True]
    await pool.aclose()


def test_capacity_counts_the_models_that_can_be_warm_together(tmp_path: Path) -> None:
    assert pool_of(tmp_path, THREE)[0].capacity() == 3
    pair = THREE + '[[groups]]\nname = "pair"\nmodels = ["b", "c"]\nexclusive = true\n'
    assert pool_of(tmp_path, pair)[0].capacity() == 2  # b or c, never both
    sized = repo_models("a", "b", "c", a={"memory_mb": 100}, b={"memory_mb": 100}, c={"memory_mb": 300})
    assert pool_of(tmp_path, sized, memory_budget_mb=250)[0].capacity() == 2  # a and b fit together, c never

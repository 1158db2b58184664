"""The supervisor with a fake spawner, a fake clock and a mock transport: no process, no socket."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from gateway.catalog import load_catalog, parse_catalog
from gateway.engine.discovery import EngineProgram
from gateway.engine.state import EngineState
from gateway.engine.supervisor import STABLE_AFTER, Supervisor
from gateway.errors import EngineNotInstalled, EngineStalled, EngineStartFailed
from gateway.settings import Settings
from gateway.upstream import UpstreamConnectError
from tests.fakes.upstream import Answer, Call, FakeUpstream


class FakeProcess:
    def __init__(self, pid: int, port: int, *, exit_code: int | None, ignore_term: bool) -> None:
        self.pid = pid
        self.port = port
        self.returncode: int | None = None
        self.signals: list[int] = []
        self.ready = exit_code is None
        self._ignore_term = ignore_term
        self._exited = asyncio.Event()
        if exit_code is not None:
            self.exit(exit_code)

    def exit(self, code: int) -> None:
        self.returncode = code
        self.ready = False
        self._exited.set()

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    def signal_group(self, sig: int) -> None:
        self.signals.append(sig)
        if self.returncode is None and (sig == signal.SIGKILL or not self._ignore_term):
            self.exit(-sig)

    def output_tail(self) -> list[str]:
        return ["loading", "Error: out of memory"]


class FakeSpawner:
    def __init__(self) -> None:
        self.procs: list[FakeProcess] = []
        self.exit_codes: list[int | None] = []
        self.ignore_term = False

    async def spawn(self, argv: Sequence[str], *, env: Mapping[str, str], cwd: Path) -> FakeProcess:
        port = int(argv[argv.index("--port") + 1])
        code = self.exit_codes.pop(0) if self.exit_codes else None
        proc = FakeProcess(1000 + len(self.procs), port, exit_code=code, ignore_term=self.ignore_term)
        self.procs.append(proc)
        return proc

    def probe(self) -> FakeUpstream:
        """The engines' HTTP side: a ready process answers; a port nobody serves refuses the connection."""

        def handler(call: Call) -> Answer:
            port = int(call.url.split(":")[2].split("/")[0])
            if any(p.port == port and p.ready for p in self.procs):
                return Answer.of(b'{"object": "list", "data": []}')
            raise UpstreamConnectError("refused")

        return FakeUpstream(handler)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(tmp_path: Path, spawner: FakeSpawner, clock: Clock, **settings: Any) -> Supervisor:
    config = Settings(_env_file=None, **settings)
    # Models the engine fetches itself: nothing for the supervisor to download or find on disk.
    catalog = parse_catalog('[[models]]\nid = "chat"\nkind = "plain"\nrepo = "org/chat"\n', origin="m.toml",
                            model_dir=tmp_path)  # fmt: skip
    return Supervisor(
        config,
        catalog,
        run_dir=tmp_path / "run",
        spawner=spawner,
        clock=clock,
        find_program=lambda: EngineProgram(("mistralrs-server",), "legacy", "mistralrs-server"),
        probe=spawner.probe(),
    )


async def test_many_cold_requests_share_one_spawn(tmp_path: Path) -> None:
    spawner, clock = FakeSpawner(), Clock()
    sup = make(tmp_path, spawner, clock)
    urls = await asyncio.gather(*(sup.ensure_ready() for _ in range(50)))
    assert len(spawner.procs) == 1 and len({u.base_url for u in urls}) == 1
    assert sup.state is EngineState.READY and sup.starts == 1
    await sup.aclose()
    assert spawner.procs[0].signals[0] == signal.SIGTERM
    assert sup.state is EngineState.STOPPED  # type: ignore[comparison-overlap]  # mypy keeps the assert's narrowing


async def test_start_failure_backs_off_then_retries(tmp_path: Path) -> None:
    spawner, clock = FakeSpawner(), Clock()
    spawner.exit_codes = [1, 1, None]
    sup = make(tmp_path, spawner, clock)
    with pytest.raises(EngineStartFailed) as info:
        await sup.ensure_ready()
    assert "exited with code 1" in info.value.message and "out of memory" in info.value.message
    assert sup.state is EngineState.FAILED
    first_wait = float(info.value.headers["Retry-After"])
    # Within the backoff window: no new spawn, a fast 503 with Retry-After.
    with pytest.raises(EngineStartFailed) as again:
        await sup.ensure_ready()
    assert len(spawner.procs) == 1 and "Retry-After" in again.value.headers
    clock.now += first_wait + 0.1
    with pytest.raises(EngineStartFailed) as second:
        await sup.ensure_ready()
    assert float(second.value.headers["Retry-After"]) > first_wait  # the backoff grows
    clock.now += 1000
    assert await sup.ensure_ready()
    # Forgotten once the engine has proved stable (see the crash tests), not the moment it is ready.
    assert len(spawner.procs) == 3 and sup.status()["consecutive_start_failures"] == 2
    await sup.stop()
    assert sup.status()["consecutive_start_failures"] == 0
    await sup.aclose()


async def test_startup_timeout_kills_the_process(tmp_path: Path) -> None:
    spawner, clock = FakeSpawner(), Clock()
    sup = make(tmp_path, spawner, clock, startup_timeout=5)
    original = spawner.spawn

    async def never_ready(argv: Sequence[str], *, env: Mapping[str, str], cwd: Path) -> FakeProcess:
        proc = await original(argv, env=env, cwd=cwd)
        proc.ready = False
        clock.now += 10  # the deadline passes while it loads
        return proc

    spawner.spawn = never_ready  # type: ignore[method-assign]
    with pytest.raises(EngineStartFailed, match="GATEWAY_STARTUP_TIMEOUT=5"):
        await sup.ensure_ready()
    assert spawner.procs[0].returncode is not None


async def test_idle_deadline_counts_from_last_release_and_keep_alive(tmp_path: Path) -> None:
    spawner, clock = FakeSpawner(), Clock()
    sup = make(tmp_path, spawner, clock, idle_timeout=60)
    lease = sup.lease()
    await sup.ensure_ready()
    clock.now += 100
    assert sup.seconds_until_idle_stop() is None  # busy: never stops
    lease.release()
    assert sup.seconds_until_idle_stop() == 60
    clock.now += 30
    assert sup.seconds_until_idle_stop() == 30
    sup.lease().release(keep_alive=600)
    assert sup.seconds_until_idle_stop() == 600
    assert sup.status()["keep_alive"] == 600
    await sup.aclose()


async def test_keep_alive_means_what_it_means_in_ollama(tmp_path: Path) -> None:
    spawner, clock = FakeSpawner(), Clock()
    sup = make(tmp_path, spawner, clock, idle_timeout=300)
    await sup.ensure_ready()
    sup.lease().release(keep_alive=10)  # shorter than the idle timeout: it wins, as in Ollama
    assert sup.seconds_until_idle_stop() == 10
    sup.lease().release(keep_alive=-1)  # until further notice
    clock.now += 10**6
    assert sup.seconds_until_idle_stop() is None and sup.status()["keep_alive"] == -1
    busy = sup.lease()
    sup.lease().release(keep_alive=0)  # stop now ... once no request is in flight
    assert sup.seconds_until_idle_stop() is None
    busy.release(keep_alive=0)
    assert sup.seconds_until_idle_stop() == 0
    sup.lease().release()  # the newest request says nothing: the idle timeout again
    assert sup.seconds_until_idle_stop() == 300 and sup.status()["keep_alive"] is None
    await sup.aclose()


async def test_idle_stopper_stops_the_engine(tmp_path: Path) -> None:
    spawner, clock = FakeSpawner(), Clock()
    sup = make(tmp_path, spawner, clock, idle_timeout=60)
    sup.lease().release()
    await sup.ensure_ready()
    stopper = asyncio.create_task(sup.run_idle_stopper())
    clock.now += 61
    sup.keep_alive(0)  # any activity wakes the stopper to re-check
    await asyncio.wait_for(spawner.procs[0].wait(), 5)
    await asyncio.wait_for(_until(lambda: sup.state is EngineState.STOPPED), 5)
    stopper.cancel()


async def test_crash_is_noticed_and_next_request_restarts_at_once(tmp_path: Path) -> None:
    spawner, clock = FakeSpawner(), Clock()
    sup = make(tmp_path, spawner, clock)
    await sup.ensure_ready()
    clock.now += STABLE_AFTER  # it had been serving for a while
    spawner.procs[0].exit(137)
    await asyncio.wait_for(_until(lambda: sup.state is EngineState.FAILED), 5)
    assert sup.crashes == 1 and "code 137" in (sup.status()["last_error"] or "")
    await sup.ensure_ready()
    assert len(spawner.procs) == 2 and sup.state is EngineState.READY
    await sup.aclose()


async def test_an_engine_that_dies_right_after_it_is_ready_backs_off_like_a_failed_start(tmp_path: Path) -> None:
    spawner, clock = FakeSpawner(), Clock()
    sup = make(tmp_path, spawner, clock)
    waits = []
    for attempt in range(3):
        await sup.ensure_ready()
        spawner.procs[-1].exit(139)  # e.g. a model that crashes the engine at its first request
        await asyncio.wait_for(_until(lambda: sup.state is EngineState.FAILED), 5)
        with pytest.raises(EngineStartFailed) as info:  # no new spawn within the backoff
            await sup.ensure_ready()
        assert "after it became ready" in info.value.message and len(spawner.procs) == attempt + 1
        waits.append(float(info.value.headers["Retry-After"]))
        clock.now += waits[-1] + 0.1
    assert waits[0] < waits[1] < waits[2]  # and it grows, as for a start that fails
    assert sup.status()["consecutive_start_failures"] == 3
    await sup.aclose()


async def test_sigterm_then_sigkill_when_ignored(tmp_path: Path) -> None:
    spawner, clock = FakeSpawner(), Clock()
    spawner.ignore_term = True
    sup = make(tmp_path, spawner, clock, stop_timeout=0.05)
    await sup.ensure_ready()
    await sup.stop()
    assert spawner.procs[0].signals[:2] == [signal.SIGTERM, signal.SIGKILL]
    assert sup.state is EngineState.STOPPED


async def test_no_engine_installed_is_a_503_that_says_what_to_install(tmp_path: Path) -> None:
    config = Settings(_env_file=None, engine_binary="/nonexistent/mistralrs-server")
    sup = Supervisor(config, load_catalog(None, model_dir=tmp_path), run_dir=tmp_path, spawner=FakeSpawner())
    with pytest.raises(EngineNotInstalled) as info:
        await sup.ensure_ready()
    assert info.value.status == 503 and "pip install 'mistral-gateway[engine]'" in info.value.message
    await sup.aclose()


async def _until(condition: object) -> None:
    while not condition():  # type: ignore[operator]
        await asyncio.sleep(0.001)


async def test_a_failed_request_restarts_only_an_engine_that_fails_its_health_check(tmp_path: Path) -> None:
    spawner, clock = FakeSpawner(), Clock()
    sup = make(tmp_path, spawner, clock)
    await sup.ensure_ready()
    sup.engine_failed(EngineStalled("a request got no answer in time"))
    await asyncio.wait_for(_until(lambda: sup._health_check is None), 5)
    assert sup.state is EngineState.READY and spawner.procs[0].signals == []  # it answers: kept
    spawner.procs[0].ready = False  # now it does not
    for _ in range(5):  # many failing requests, one check
        sup.engine_failed(EngineStalled("a request got no answer in time"))
    await asyncio.wait_for(_until(lambda: sup.state is EngineState.STOPPED), 5)  # type: ignore[comparison-overlap]
    assert spawner.procs[0].signals[0] == signal.SIGTERM and "stopped answering" in (sup.status()["last_error"] or "")
    await sup.aclose()

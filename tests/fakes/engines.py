"""Fake engine processes, spawner, clock and memory meter, for unit tests of the engine pool and its lifecycles:
no process, no socket, no waiting on time."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.catalog import parse_catalog
from gateway.engine.discovery import EngineProgram
from gateway.engine.launcher import Launcher
from gateway.engine.pool import EnginePool
from gateway.engine.preparation import Preparer
from gateway.settings import Settings
from gateway.upstream.client import UpstreamConnectError
from tests.fakes.upstream import Answer, Call, FakeUpstream

if TYPE_CHECKING:
    from gateway.models.download import Downloader
    from gateway.models.hub import HubFetcher

LEGACY = EngineProgram(("mistralrs-server",), "legacy", "mistralrs-server")


class FakeProcess:
    def __init__(self, pid: int, port: int, argv: Sequence[str], *, exit_code: int | None, ignore_term: bool) -> None:
        self.pid = pid
        self.port = port
        self.argv = list(argv)
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

    def die(self, code: int) -> None:
        """Ended, its end not yet reported to :meth:`wait` (a real engine's sockets close a moment before that)."""
        self.returncode = code
        self.ready = False

    def report(self) -> None:
        """Report an end :meth:`die` left unreported."""
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

    @property
    def alive(self) -> bool:
        return self.returncode is None

    @property
    def exited(self) -> bool:
        return self.returncode is not None


class FakeSpawner:
    """Spawns FakeProcesses; ``exit_codes`` makes the next spawns exit at once with those codes (None: run)."""

    def __init__(self) -> None:
        self.procs: list[FakeProcess] = []
        self.exit_codes: list[int | None] = []
        self.ignore_term = False
        self.envs: list[dict[str, str]] = []

    async def spawn(
        self, argv: Sequence[str], *, env: Mapping[str, str], cwd: Path, output: Callable[[str], None] | None = None
    ) -> FakeProcess:
        port = int(argv[argv.index("--port") + 1])
        code = self.exit_codes.pop(0) if self.exit_codes else None
        proc = FakeProcess(1000 + len(self.procs), port, argv, exit_code=code, ignore_term=self.ignore_term)
        self.procs.append(proc)
        self.envs.append(dict(env))
        return proc

    @property
    def argvs(self) -> list[list[str]]:
        return [p.argv for p in self.procs]

    def running(self) -> list[FakeProcess]:
        return [p for p in self.procs if p.alive]

    def serving(self, model: str) -> list[FakeProcess]:
        """The running processes whose command line loads ``model`` (the legacy CLI names it after -m)."""
        return [p for p in self.running() if any(model in arg for arg in p.argv)]

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


class FakeMeter:
    """Memory each fake engine uses, by pid (MB); unknown pids measure nothing."""

    def __init__(self, default: float | None = None) -> None:
        self.by_pid: dict[int, float] = {}
        self.default = default

    def measure_mb(self, pid: int) -> float | None:
        return self.by_pid.get(pid, self.default)


def make_pool(
    tmp_path: Path,
    toml: str,
    *,
    spawner: FakeSpawner | None = None,
    clock: Clock | None = None,
    meter: FakeMeter | None = None,
    downloader: Callable[[], Downloader] | None = None,
    hub: Callable[[], HubFetcher] | None = None,
    environ: Mapping[str, str] | None = None,
    **settings: Any,
) -> EnginePool:
    """A pool over ``toml``'s models with fake processes; models the engine fetches itself need nothing on disk."""
    spawner = spawner or FakeSpawner()
    clock = clock or Clock()
    config = Settings(_env_file=None, model_dir=tmp_path / "models", **settings)
    catalog = parse_catalog(toml, origin="m.toml", model_dir=config.model_dir)
    logger = logging.getLogger("tests.pool")
    launcher = Launcher(
        config,
        spawner=spawner,
        probe=spawner.probe(),
        clock=clock,
        find_program=lambda: LEGACY,
        environ=environ,
        logger=logger,
    )
    preparer = Preparer(config, downloader=downloader, hub=hub)
    return EnginePool(
        config,
        catalog,
        run_dir=tmp_path / "run",
        launcher=launcher,
        preparer=preparer,
        clock=clock,
        meter=meter or FakeMeter(),
        logger=logger,
    )


def repo_models(*names: str, **fields: Any) -> str:
    """A models file of chat models the engine fetches itself (nothing on disk), with extra fields for each."""
    lines = []
    for name in names:
        lines += ["[[models]]", f'id = "{name}"', 'kind = "plain"', f'repo = "org/{name}"', "prefetch = false"]
        for key, value in fields.get(name, {}).items():
            lines.append(f"{key} = {str(value).lower() if isinstance(value, bool) else value}")
    return "\n".join(lines) + "\n"


async def until(condition: Callable[[], object], timeout: float = 5.0) -> None:
    """Wait for ``condition`` while the event loop runs the code under test (a deadline, not a delay)."""

    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0)

    await asyncio.wait_for(poll(), timeout)

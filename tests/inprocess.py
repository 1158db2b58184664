"""The gateway in this process, for the tests of what it does (routes, dialects, serving, the console's API).

``create_app`` with every real part, except that its engines are the fake engine run inside this process too: the
launcher builds the same command line, the fake engine parses it as strictly as in a process of its own
(tests/fakes/fake_engine.py) and serves its app with uvicorn on the port the command line names. The gateway is
served by uvicorn on a loopback port, in a thread with its own event loop, so that the tests drive it over real
sockets with the clients users have (httpx, the openai, anthropic and ollama SDKs), blocking or not. Starting one
takes milliseconds, where a gateway process and its engine processes take seconds.

A test that sets GATEWAY_ENGINE (the bundled engine on a tiny or real model, or no engine at all) gets real engine
processes, found as ``mistral-gateway`` finds them, with the gateway still in this process. What needs the gateway's
own process, or engine processes to look at, stays in process tests (tests/helpers.py ``start_gateway``): signals,
pids and process groups, engines that crash or block their whole process, the gateway's own file descriptors and
memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import uvicorn

from gateway.app import create_app
from gateway.engine.discovery import EngineProgram
from gateway.http.server import uvicorn_config
from gateway.http.shutdown import GracefulServer
from gateway.masking import MaskingFilter
from gateway.settings import Settings
from tests.fakes import fake_engine
from tests.helpers import Gateway, engine_env, wait_for

PROGRAMS = {
    "mistralrs-server": EngineProgram(("mistralrs-server",), "legacy", "mistralrs-server", (0, 8, 4)),
    "mistralrs": EngineProgram(("mistralrs",), "serve", "mistralrs", (0, 9, 2)),
}
FIRST_PID = 4_200_000  # above Linux's pid_max: never the pid of a real process
_pids = itertools.count(FIRST_PID)
_running: dict[int, FakeEngineProcess] = {}  # by pid, while they run: what pid_alive() asks about them
_engine_log = logging.getLogger("gateway.engine")


class FakeEngineProcess:
    """One fake engine, run as a task in the gateway's event loop: the :class:`EngineProcess` of the launcher."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], cwd: Path, output: Callable[[str], None] | None):
        self.pid = next(_pids)
        self._argv = list(argv)
        self._env = dict(env)
        self._cwd = cwd
        self._output = output
        self._knobs = fake_engine.Knobs.from_env(env)
        self._lines: deque[str] = deque(maxlen=30)
        self._returncode: int | None = None
        self._exited = asyncio.Event()
        self._server: uvicorn.Server | None = None
        self._frozen = asyncio.Event()
        self._task = asyncio.ensure_future(self._run())
        _running[self.pid] = self

    # ------------------------------------------------------------------------------------ EngineProcess

    @property
    def returncode(self) -> int | None:
        return self._returncode

    @property
    def exited(self) -> bool:
        return self._returncode is not None

    async def wait(self) -> int:
        await self._exited.wait()
        assert self._returncode is not None
        return self._returncode

    def signal_group(self, sig: int) -> None:
        if self._returncode is not None or (sig == signal.SIGTERM and self._knobs.ignore_sigterm):
            return
        self._end(-sig)

    def output_tail(self) -> list[str]:
        return list(self._lines)

    # ----------------------------------------------------------------------------------------- its life

    def _print(self, line: str) -> None:
        self._lines.append(line)
        _engine_log.info("engine[%d]: %s", self.pid, line)  # as the process spawner logs an engine's output
        if self._output is not None:
            self._output(line)

    async def _run(self) -> None:
        program, args = self._argv[0], self._argv[1:]
        fake_engine.record_spawn(self._knobs, program, args, str(self._cwd), self._env, self.pid)
        for line in self._knobs.first_lines(self._env):
            self._print(line)
        try:
            spec = fake_engine.parse_command_line(program, args, strict_serde=self._knobs.strict_serde)
            ids = ", ".join(model.model_id for model in spec.models)
            self._print(f"mistralrs fake engine: loading {ids}")
            if self._knobs.never_ready:
                await asyncio.Event().wait()
            await asyncio.sleep(self._knobs.load_delay)
            if self._knobs.exit_at_start is not None:
                self._print("loading model...")
                self._print("Error: simulated load failure")
                self._end(self._knobs.exit_at_start)
                return
            fake_engine.check_load(spec, self._knobs)
            sock = fake_engine.bind(spec.host, spec.port)
        except fake_engine.EngineFailed as exc:
            self._print(f"Error: {exc}")
            self._end(1)
            return
        except SystemExit as exc:  # a command line argparse refuses: its usage went to stderr
            self._print("error: the command line was refused")
            self._end(exc.code if isinstance(exc.code, int) else 2)
            return
        engine = fake_engine.FakeEngine(spec, self._knobs, die=self._crash, freeze=self._freeze)
        self._server = uvicorn.Server(fake_engine.server_config(engine, own_logging=False))
        self._print(f"mistralrs fake engine: serving {ids} on {spec.host}:{spec.port}")
        await self._server.serve(sockets=[sock])

    async def _crash(self) -> None:
        """A `crash` prompt: every connection closed and the port with them at once, as when a process dies (what it
        wrote is still delivered, as the kernel does)."""
        self._end(1)
        await asyncio.Event().wait()  # the handler never returns: its connection is gone

    async def _freeze(self) -> None:
        """A `freeze` prompt: nothing this engine serves answers any more (its health check included)."""
        self._frozen.set()
        await asyncio.Event().wait()

    def _end(self, code: int) -> None:
        if self._returncode is not None:
            return
        server = self._server
        if server is not None:
            for listener in server.servers:
                listener.close()
            for connection in list(server.server_state.connections):
                transport = getattr(connection, "transport", None)
                if transport is not None:
                    transport.close()
            server.should_exit = server.force_exit = True
        if self._task is not asyncio.current_task():
            self._task.cancel()
        self._returncode = code
        self._exited.set()
        _running.pop(self.pid, None)


def fake_engine_alive(pid: int) -> bool:
    """Whether the in-process fake engine with this (made-up) pid still runs."""
    return pid in _running


class FakeEngineSpawner:
    """Starts fake engines in the running event loop (the launcher's ``ProcessSpawner``)."""

    def __init__(self) -> None:
        self.procs: list[FakeEngineProcess] = []

    async def spawn(
        self, argv: Sequence[str], *, env: Mapping[str, str], cwd: Path, output: Callable[[str], None] | None = None
    ) -> FakeEngineProcess:
        proc = FakeEngineProcess(argv, env, cwd, output)
        self.procs.append(proc)
        return proc


class _ThreadLogs(logging.Handler):
    """The gateway's log lines (those logged in its thread, and in the test's while it builds the gateway), written
    to its log file."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._file = path.open("a", encoding="utf-8", errors="backslashreplace")
        self.threads = {threading.get_ident()}
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread in self.threads:
            self._file.write(self.format(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        self._file.close()
        super().close()


class InProcessGateway(Gateway):
    """A gateway served from a thread of this process; the same surface as a gateway process for the tests."""

    def __init__(self, work: Path, env: Mapping[str, str], *, engine: str = "mistralrs-server") -> None:
        work.mkdir(parents=True, exist_ok=True)
        # Logging first: what the gateway logs while it is built (warnings about its models) is in its log too.
        self._logs = _ThreadLogs(work / "gateway.log")
        logging.getLogger().addHandler(self._logs)
        self.spawner = FakeEngineSpawner()
        listener = socket.socket()
        listener.bind(("127.0.0.1", int(env.get("GATEWAY_PORT", 0))))  # a test that must know it first names it
        port = listener.getsockname()[1]
        fields: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": port,
            "model_dir": work / "models",
            "run_dir": work / "run",
        }
        fields.update(
            {key.removeprefix("GATEWAY_").lower(): value for key, value in env.items() if key.startswith("GATEWAY_")}
        )
        fields["engine_env"] = engine_env(dict(env))  # the fake engine's knobs, as tests/helpers.py passes them
        settings = Settings(_env_file=None, **fields)
        # As `mistral-gateway` sets it up (cli.serve): the access log and the engines' output at INFO.
        logging.getLogger("gateway").setLevel(settings.log_level.upper())
        environ = {key: value for key, value in env.items() if not key.startswith("GATEWAY_")}
        if "GATEWAY_ENGINE" in env:
            # A test that chose its engine (the bundled one, or none installed) gets real engine processes, found
            # the way `mistral-gateway` finds them; only the gateway is in this process.
            self.app = create_app(settings, environ={**os.environ, **environ})
        else:
            self.app = create_app(
                settings, spawner=self.spawner, find_program=lambda: PROGRAMS[engine], environ=environ
            )
        if self.app.masker is not None:  # as `mistral-gateway` masks its log handlers (cli.serve)
            self._logs.addFilter(MaskingFilter(self.app.masker))
        # Served as `mistral-gateway` serves it, but uvicorn's log configuration would close every log handler of the
        # test process.
        config = uvicorn_config(self.app, settings, log_config=None, log_level="warning")
        # Stopped as `mistral-gateway` stops on SIGTERM: draining, ending /events and /logs/stream followers.
        self._server = GracefulServer(
            config, gateway=self.app, drain_timeout=settings.shutdown_timeout, notice=settings.shutdown_notice
        )
        self._thread = threading.Thread(target=self._serve, args=(listener,), name=f"gateway-{port}", daemon=True)
        super().__init__(
            url=f"http://127.0.0.1:{port}",
            proc=None,  # type: ignore[arg-type]
            log_path=work / "gateway.log",
            spawn_log=Path(env["FAKE_ENGINE_SPAWN_LOG"]),
            request_log=Path(env["FAKE_ENGINE_REQUEST_LOG"]),
            env=dict(env),
        )
        self._thread.start()
        assert self._thread.ident is not None
        self._logs.threads = {self._thread.ident}
        wait_for(lambda: self._server.started or not self._thread.is_alive(), 20, "the in-process gateway to serve")
        if not self._server.started:
            raise AssertionError(f"the in-process gateway did not start:\n{self.log()}")

    def _serve(self, listener: socket.socket) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._server.serve(sockets=[listener]))
        finally:
            self.app.pool.kill_now()
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self._thread.is_alive():
            self._server.should_exit = True
            self._thread.join(timeout)
        logging.getLogger().removeHandler(self._logs)
        self._logs.close()
        return 0


def gateway_env(
    work: Path,
    *,
    env: Mapping[str, str] | None = None,
    fake_env: Mapping[str, str] | None = None,
    models_toml: str | None = None,
) -> dict[str, str]:
    """The settings and fake-engine knobs of a test gateway, as the environment a gateway process would get."""
    full = {
        "GATEWAY_MODEL_DIR": str(work / "models"),
        "GATEWAY_RUN_DIR": str(work / "run"),
        "GATEWAY_STOP_TIMEOUT": "5",
        "FAKE_ENGINE_SPAWN_LOG": str(work / "spawns.jsonl"),
        "FAKE_ENGINE_REQUEST_LOG": str(work / "requests.jsonl"),
        "FAKE_ENGINE_STRICT_SERDE": "1",
        **(fake_env or {}),
        **(env or {}),
    }
    if models_toml is not None:
        models_file = work / "models.toml"
        work.mkdir(parents=True, exist_ok=True)
        models_file.write_text(models_toml)
        full.setdefault("GATEWAY_MODELS_FILE", str(models_file))
    return full


@contextlib.contextmanager
def in_process(work: Path, models_toml: str | None, **kwargs: Any) -> Iterator[InProcessGateway]:
    """One in-process gateway for the length of a ``with`` block."""
    engine = kwargs.pop("engine", "mistralrs-server")
    gateway = InProcessGateway(work, gateway_env(work, models_toml=models_toml, **kwargs), engine=engine)
    try:
        yield gateway
    finally:
        gateway.stop()


__all__ = ["FakeEngineProcess", "FakeEngineSpawner", "InProcessGateway", "gateway_env", "in_process"]

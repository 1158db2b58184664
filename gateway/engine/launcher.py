"""Starting one engine process: a plan (pure), then a spawn that is ready or gone.

:func:`plan_launch` turns the models of one engine (a catalog already prepared: local folders, token source) into
the command line, environment and config files, and does nothing else. :class:`Launcher` carries a plan out:
writes the files, spawns the process, waits until ``/health`` answers (the engine binds its port only once its
models are loaded), and matches each model to the id the engine serves it under. A launch that fails or is
cancelled leaves no process behind. Adopting an engine that runs already (GATEWAY_ENGINE_URL, or a fixed port where
one answers) is here too: it is the other way to get a :class:`Running` engine.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import shlex
import signal
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..catalog import Catalog
from ..errors import EngineStartFailed, EngineUnavailable
from ..settings import Settings
from ..upstream.client import Upstream, UpstreamError
from .command import CommandError, build_command
from .discovery import EngineProgram, find_engine
from .environment import engine_environment
from .process import EngineProcess, ProcessSpawner

Clock = Callable[[], float]
ProgramFinder = Callable[[], EngineProgram]
OutputSink = Callable[[str, str], None]  # an engine's name, one line of its output (the console's log hub)


@dataclass(frozen=True)
class Endpoint:
    """A ready engine: where it listens, and the id it answers to for each configured model."""

    base_url: str
    engine_ids: Mapping[str, str]

    def engine_id(self, model_id: str) -> str:
        """The id the engine answers to for ``model_id`` (its pipeline name, not always the configured id)."""
        return self.engine_ids.get(model_id, model_id)


@dataclass(frozen=True)
class Running:
    """An engine that answers: its endpoint, and its process (None for an engine the gateway adopted)."""

    endpoint: Endpoint
    proc: EngineProcess | None
    port: int | None


@dataclass(frozen=True)
class LaunchPlan:
    """Everything a start needs, decided before anything happens."""

    argv: tuple[str, ...]
    env: dict[str, str]
    files: dict[str, str]  # name -> text, written into the run dir
    port: int
    run_dir: Path
    engine_ids: dict[str, tuple[str, ...]]  # model id -> the ids the engine may serve it under, likeliest first


def plan_launch(
    program: EngineProgram,
    catalog: Catalog,
    *,
    port: int,
    run_dir: Path,
    settings: Settings,
    environ: Mapping[str, str],
) -> LaunchPlan:
    """The command line, environment and files that start ``catalog``'s models in one engine process (pure).

    The environment is an allowlist of ``environ`` (gateway/engine/environment.py): never the gateway's secrets, and
    the Hugging Face token (in the environment, never on the command line) only where the engine downloads."""
    token = settings.hf_token.get_secret_value() if settings.hf_token is not None else None
    env = engine_environment(environ, catalog, hf_token=token, explicit=settings.engine_env)
    try:
        command = build_command(
            program, catalog, port=port, run_dir=str(run_dir), extra_args=shlex.split(settings.engine_args)
        )
    except CommandError as exc:
        raise EngineStartFailed(str(exc)) from exc
    return LaunchPlan(
        tuple(command.argv),
        env,
        dict(command.files),
        port,
        run_dir,
        {model: tuple(ids) for model, ids in command.engine_ids.items()},
    )


def token_source(settings: Settings, environ: Mapping[str, str]) -> str | None:
    """How the engine reads a Hugging Face token: from HF_TOKEN in its environment, when there is one (an engine
    that downloads nothing is given neither: gateway/engine/preparation.py's engine_catalog)."""
    has_token = settings.hf_token is not None or bool({**environ, **settings.engine_env}.get("HF_TOKEN"))
    return "env:HF_TOKEN" if has_token else None


class Launcher:
    """Spawns engines and waits for them; adopts engines that run already."""

    def __init__(
        self,
        settings: Settings,
        *,
        spawner: ProcessSpawner,
        probe: Upstream,
        clock: Clock,
        find_program: ProgramFinder | None = None,
        environ: Mapping[str, str] | None = None,
        logger: logging.Logger,
        output: OutputSink | None = None,
    ) -> None:
        self._settings = settings
        self._spawner = spawner
        self._probe = probe
        self._clock = clock
        self._find_program = find_program or (
            lambda: find_engine(choice=settings.engine, binary=settings.engine_binary)
        )
        self._environ = dict(os.environ if environ is None else environ)
        self._log = logger
        self._output = output

    @property
    def environ(self) -> Mapping[str, str]:
        return self._environ

    async def program(self) -> EngineProgram:
        # Finding the program runs `--version`: keep that off the event loop.
        return await asyncio.to_thread(self._find_program)

    async def launch(
        self, catalog: Catalog, run_dir: Path, program: EngineProgram | None = None, *, name: str = "engine"
    ) -> Running:
        """Start ``catalog``'s models in one engine (``name``: the console's label for its output) and wait until
        it answers (GATEWAY_STARTUP_TIMEOUT)."""
        deadline = self._clock() + self._settings.startup_timeout
        program = program or await self.program()
        port = self._settings.engine_port or free_port()
        plan = plan_launch(program, catalog, port=port, run_dir=run_dir, settings=self._settings, environ=self._environ)
        run_dir.mkdir(parents=True, exist_ok=True)
        for file, text in plan.files.items():
            (run_dir / file).write_text(text, encoding="utf-8")
        command = " ".join(_redact(a) for a in plan.argv)
        self._log.info("starting engine: %s", command)
        output = None
        if self._output is not None:
            self._output(name, f"$ {command}")
            output = functools.partial(self._output, name)
        proc = await self._spawner.spawn(plan.argv, env=plan.env, cwd=run_dir, output=output)
        url = f"http://127.0.0.1:{port}"
        try:
            await self._wait_ready(proc, url, deadline)
            served = await self.served_ids(url) or set()
        except BaseException:
            await self.terminate(proc)  # a start that failed or was cancelled leaves nothing running
            raise
        return Running(Endpoint(url, self._match_ids(plan, served)), proc, port)

    async def adopt(self, catalog: Catalog) -> Running | None:
        """An engine that runs already and that the gateway must use rather than start: GATEWAY_ENGINE_URL, or a
        mistral.rs engine answering on a fixed GATEWAY_ENGINE_PORT. None when there is none to adopt."""
        settings = self._settings
        if settings.engine_url:
            url = settings.engine_url.rstrip("/")
            served = await self.served_ids(url)
            if served is None:
                raise EngineUnavailable(f"The engine at GATEWAY_ENGINE_URL={url} does not answer.")
            return Running(_adopted(catalog, url, served), None, None)
        fixed = settings.engine_port
        if not fixed:
            return None
        url = f"http://127.0.0.1:{fixed}"
        served = await self.served_ids(url)
        if served is not None:
            self._log.info("a mistral.rs engine already serves port %d: using it, not starting another", fixed)
            return Running(_adopted(catalog, url, served), None, fixed)
        if not port_is_free(fixed):
            raise EngineStartFailed(
                f"GATEWAY_ENGINE_PORT={fixed} is taken by a program that is not a mistral.rs engine. "
                "Free the port, or set GATEWAY_ENGINE_PORT=0 to pick a free one."
            )
        return None

    async def terminate(self, proc: EngineProcess) -> None:
        """SIGTERM to the process group, a grace period, SIGKILL, reap."""
        if proc.returncode is not None:
            proc.signal_group(signal.SIGKILL)  # anything it forked that outlived it
            return
        proc.signal_group(signal.SIGTERM)
        stop_timeout = self._settings.stop_timeout
        try:
            await asyncio.wait_for(proc.wait(), stop_timeout)
        except TimeoutError:
            self._log.warning("engine ignored SIGTERM for %.0f s: killing it", stop_timeout)
            proc.signal_group(signal.SIGKILL)
            await proc.wait()
        else:
            proc.signal_group(signal.SIGKILL)

    async def aclose(self) -> None:
        """Close the connections of the health probe."""
        await self._probe.aclose()

    async def healthy(self, url: str, timeout: float = 2.0) -> bool:
        try:
            status, _ = await self._probe.get(f"{url}/health", timeout=timeout)
        except UpstreamError:
            return False
        return status == 200

    async def served_ids(self, url: str) -> set[str] | None:
        """The model ids a mistral.rs engine at ``url`` lists; None when nothing answers like one there."""
        if not await self.healthy(url):
            return None
        try:
            status, content = await self._probe.get(f"{url}/v1/models", timeout=5.0)
            listing = json.loads(content)
            if status != 200 or listing.get("object") != "list":
                return None
            return {str(item["id"]) for item in listing.get("data", []) if isinstance(item, dict) and "id" in item}
        except (UpstreamError, ValueError, AttributeError, TypeError):
            return None

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
                if await self.healthy(url):
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

    def _match_ids(self, plan: LaunchPlan, served: set[str]) -> dict[str, str]:
        """For each model, the first predicted engine id that the engine actually serves."""
        ids = {}
        for model_id, candidates in plan.engine_ids.items():
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


def _adopted(catalog: Catalog, url: str, served: set[str]) -> Endpoint:
    """An engine the gateway did not start: match the models to what it serves, by id or by source."""
    ids = {}
    for model in catalog.models:
        candidates = [model.id, model.source.engine_id, model.source.model_id]
        ids[model.id] = next((c for c in candidates if c in served), model.id)
    return Endpoint(url, ids)


def _redact(arg: str) -> str:
    """Keep a literal Hugging Face token (--token-source literal:...) out of the log."""
    return "literal:<redacted>" if arg.startswith("literal:") else arg


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True

"""Spawning the engine as a child process that can never outlive the gateway.

The spawner is an injected dependency of the launcher so that unit tests can hand it a fake; the
real one starts the program in its own process group (so a stop reaches anything it forks) with the
parent-death signal set (so even a SIGKILLed gateway takes the engine down with it). Each line the engine prints
has the gateway's secrets masked as it is read (gateway/masking.py), before it goes to the log, the tail that
error messages quote, or the console.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import re
import signal
import sys
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..masking import Masker

_PR_SET_PDEATHSIG = 1


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")  # CSI sequences: colours, cursor moves


class EngineProcess(Protocol):
    """What the launcher and an engine's lifecycle need of a running engine."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    @property
    def exited(self) -> bool:
        """Whether the process has ended, even if its end has not been reported to :meth:`wait` yet."""
        ...

    async def wait(self) -> int: ...

    def signal_group(self, sig: int) -> None: ...

    def output_tail(self) -> list[str]: ...


class ProcessSpawner(Protocol):
    async def spawn(
        self, argv: Sequence[str], *, env: Mapping[str, str], cwd: Path, output: Callable[[str], None] | None = None
    ) -> EngineProcess:
        """Start ``argv``; each line it prints goes to the log, its tail, and ``output``."""
        ...


def _die_with_parent(parent_pid: int) -> None:
    """Runs in the child between fork and exec: ask the kernel to SIGKILL us when the parent dies."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # The parent may have died before prctl took effect; then nobody would ever signal us.
    if os.getppid() != parent_pid:
        os._exit(1)


class _ChildProcess:
    """An engine started by :class:`SubprocessSpawner`; its output is logged and its tail kept."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        logger: logging.Logger,
        tail_lines: int,
        output: Callable[[str], None] | None = None,
        masker: Masker | None = None,
    ) -> None:
        self._proc = proc
        self._logger = logger
        self._output = output
        self._masker = masker
        self._tail: deque[str] = deque(maxlen=tail_lines)
        self._reader = asyncio.create_task(self._pump_output(), name=f"engine-output-{proc.pid}")

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    @property
    def exited(self) -> bool:
        if self._proc.returncode is not None:
            return True
        try:  # WNOWAIT: look without reaping, which stays asyncio's job
            return os.waitid(os.P_PID, self._proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True  # reaped already, its end not yet handed to us

    async def _pump_output(self) -> None:
        stream = self._proc.stdout
        if stream is None:
            return
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line longer than the stream limit: keep going with what we have
                raw = await stream.read(65536)
            if not raw:
                return
            # Colour codes (mistral.rs colours its log on any output) mean nothing in a log file or the console.
            line = _ANSI.sub("", raw.decode("utf-8", "replace")).rstrip()
            if line and self._masker is not None:
                line = self._masker.text(line)
            if line:
                self._tail.append(line)
                self._logger.info("engine[%d]: %s", self._proc.pid, line)
                if self._output is not None:
                    self._output(line)

    async def wait(self) -> int:
        code = await self._proc.wait()
        # Let the reader drain what the process printed last: those lines explain a crash.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._reader), timeout=2)
        return code

    def signal_group(self, sig: int) -> None:
        # Also after the leader has exited: its process group lives on while anything it forked does,
        # and Linux does not reuse the id while the group exists.
        try:
            os.killpg(self._proc.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            if self._proc.returncode is None:
                self._proc.send_signal(sig)

    def output_tail(self) -> list[str]:
        return list(self._tail)


class SubprocessSpawner:
    """Starts real processes with asyncio."""

    def __init__(
        self, logger: logging.Logger | None = None, tail_lines: int = 30, *, masker: Masker | None = None
    ) -> None:
        self._logger = logger or logging.getLogger("gateway.engine")
        self._tail_lines = tail_lines
        self._masker = masker

    async def spawn(
        self, argv: Sequence[str], *, env: Mapping[str, str], cwd: Path, output: Callable[[str], None] | None = None
    ) -> EngineProcess:
        parent = os.getpid()
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=str(cwd),
            env=dict(env),
            start_new_session=True,
            preexec_fn=lambda: _die_with_parent(parent),
            limit=1 << 20,
        )
        return _ChildProcess(proc, self._logger, self._tail_lines, output, self._masker)

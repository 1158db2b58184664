"""Shared test helpers: waiting on conditions with deadlines, free ports, running the gateway for real."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

ROOT = Path(__file__).resolve().parent.parent
FAKE_ENGINE = ROOT / "tests" / "fakes" / "fake_engine.py"

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float = 10.0, what: str = "condition") -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class FakeSleep:
    """Backoff sleeps that do not wait (tests wait on conditions, never on time); the delays are kept."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(0)  # still a switch point, as a real sleep is


class Recorder:
    """An event sink that keeps what is published, for assertions."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def publish(self, type: str, /, **details: Any) -> None:
        self.events.append((type, details))

    def types(self) -> list[str]:
        return [t for t, _ in self.events]

    def of(self, type: str) -> list[dict[str, Any]]:
        return [d for t, d in self.events if t == type]


def wait_serving(proc: subprocess.Popen[bytes], url: str, log: Callable[[], str], timeout: float, what: str) -> None:
    """Wait until ``url`` answers 200, failing at once (with the log) if ``proc`` exits first."""

    def serving() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}:\n{log()}")
        try:
            return httpx.get(url, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(serving, timeout, f"{what} to serve {url}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


HOSTILE_ENGINE = ROOT / "tests" / "fakes" / "hostile_engine.py"
HOSTILE_MODELS = '[[models]]\nid = "hostile"\nkind = "plain"\nrepo = "org/hostile"\nprefetch = false\n'


@contextlib.contextmanager
def hostile_engine(folder: Path, *, drip: float) -> Iterator[str]:
    """The hostile engine (tests/fakes/hostile_engine.py) in a process of its own: its URL, for GATEWAY_ENGINE_URL
    with the models file HOSTILE_MODELS."""
    port = free_port()
    log = folder / "hostile-engine.log"
    with log.open("wb") as out:
        engine = subprocess.Popen(
            [sys.executable, str(HOSTILE_ENGINE), str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={"HOSTILE_DRIP": str(drip), "PATH": "/usr/bin:/bin"},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_serving(engine, url + "/health", log.read_text, 20, "the hostile engine")
        yield url
    finally:
        engine.kill()
        engine.wait()


def pid_alive(pid: int) -> bool:
    from tests.inprocess import FIRST_PID, fake_engine_alive

    if pid >= FIRST_PID:  # a fake engine run inside this process (tests/inprocess.py)
        return fake_engine_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purposes. The process can also be reaped between the two
    # looks (the open or the read then fails with ENOENT or ESRCH): dead as well.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def write_fake_engine_bin(folder: Path) -> Path:
    """Wrapper programs named like the real engines, running the fake engine."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("mistralrs-server", "mistralrs"):
        script = folder / name
        script.write_text(
            f"#!{sys.executable}\nimport runpy, sys\nsys.argv[0] = {str(folder / name)!r}\n"
            f"runpy.run_path({str(FAKE_ENGINE)!r}, run_name='__main__')\n"
        )
        script.chmod(0o755)
    return folder


@dataclass
class Gateway:
    """A gateway running as a real process (python -m gateway)."""

    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    spawn_log: Path
    request_log: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def spawns(self) -> list[dict[str, Any]]:
        if not self.spawn_log.exists():
            return []
        return [json.loads(line) for line in self.spawn_log.read_text().splitlines() if line.strip()]

    def upstream_requests(self) -> list[dict[str, Any]]:
        """What reached the fake engine: one {"method", "path", "body"} per /v1 request."""
        return [entry for entry in self._request_log() if "event" not in entry]

    def abandoned_streams(self) -> list[dict[str, Any]]:
        """Streams the fake engine stopped because its client (the gateway) left: ``{"event", "sent"}`` each."""
        return [entry for entry in self._request_log() if entry.get("event") == "stream_abandoned"]

    def _request_log(self) -> list[dict[str, Any]]:
        if not self.request_log.exists():
            return []
        return [json.loads(line) for line in self.request_log.read_text().splitlines() if line.strip()]

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(self.url + "/status", timeout=5).json()
        return data

    def engine(self, model: str | None = None) -> dict[str, Any]:
        """The status of the engine serving ``model`` (default: the default chat model)."""
        status = self.status()
        wanted = model or status["default_model"]
        engines: list[dict[str, Any]] = status["engines"]
        return next(e for e in engines if wanted in e["models"])

    def engines(self) -> list[dict[str, Any]]:
        engines: list[dict[str, Any]] = self.status()["engines"]
        return engines

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


def engine_env(env: dict[str, str]) -> dict[str, str]:
    """GATEWAY_ENGINE_ENV for a test gateway with the environment ``env``: the one ``env`` sets, and the fake engine's
    knobs (FAKE_ENGINE_*) over it."""
    explicit: dict[str, str] = json.loads(env.get("GATEWAY_ENGINE_ENV") or "{}")
    return {**explicit, **{name: value for name, value in env.items() if name.startswith("FAKE_ENGINE_")}}


def start_gateway(
    tmp_path: Path,
    models_toml: str | None,
    *,
    env: dict[str, str] | None = None,
    fake_env: dict[str, str] | None = None,
    engine: str = "mistralrs-server",
    name: str = "gw",
) -> Gateway:
    """Start ``python -m gateway`` on a free port with the fake engine, and wait until it serves."""
    work = tmp_path / name
    work.mkdir(parents=True, exist_ok=True)
    bin_dir = write_fake_engine_bin(tmp_path / "bin")
    port = free_port()
    spawn_log, request_log = work / "spawns.jsonl", work / "requests.jsonl"
    full_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "FAKE_ENGINE_"))},
        "GATEWAY_PORT": str(port),
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_ENGINE_BINARY": str(bin_dir / engine),
        "GATEWAY_MODEL_DIR": str(work / "models"),
        "GATEWAY_RUN_DIR": str(work / "run"),
        "GATEWAY_STOP_TIMEOUT": "5",
        "FAKE_ENGINE_SPAWN_LOG": str(spawn_log),
        "FAKE_ENGINE_REQUEST_LOG": str(request_log),
        "PYTHONUNBUFFERED": "1",
        # The gateway writes every field the real engine's serde structs require: hold it to that.
        "FAKE_ENGINE_STRICT_SERDE": "1",
        **(fake_env or {}),
        **(env or {}),
    }
    # The fake engine's knobs reach it as an operator's variables would: through GATEWAY_ENGINE_ENV (an engine gets
    # only an allowlist of the gateway's environment). They stay in the gateway's too, where tests look them up.
    full_env["GATEWAY_ENGINE_ENV"] = json.dumps(engine_env(full_env))
    if models_toml is not None:
        models_file = work / "models.toml"
        models_file.write_text(models_toml)
        full_env.setdefault("GATEWAY_MODELS_FILE", str(models_file))
    log_path = work / "gateway.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway"], cwd=work, env=full_env, stdout=log, stderr=subprocess.STDOUT
        )
    gateway = Gateway(f"http://127.0.0.1:{port}", proc, log_path, spawn_log, request_log, full_env)

    try:
        wait_serving(proc, gateway.url + "/healthz", gateway.log, 20, "the gateway")
    except BaseException:
        proc.kill()  # a gateway that never served must not outlive its test
        proc.wait()
        raise
    return gateway


@dataclass
class HeldStream:
    """One answer read off its socket as it comes: the status and headers, the data lines of its events (Server-Sent
    Events' ``data:``), and whether it ended as a whole chunked body ends (its last, empty chunk came)."""

    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    complete: bool = False
    ended: bool = False  # nothing more will come: its last chunk, or its connection closed


@contextlib.contextmanager
def held_streams(
    url: str,
    bodies: Sequence[dict[str, Any]],
    path: str = "/v1/chat/completions",
    headers: Mapping[str, str] | None = None,
) -> Iterator[list[HeldStream]]:
    """One request per body to the server at ``url``, each on a socket of its own read by a thread, held open while
    the block runs. Leaving the block closes the sockets still open, as clients that go away (the gateway cancels
    what they asked)."""
    streams = [HeldStream() for _ in bodies]
    sockets: list[socket.socket] = []
    host, port = url.removeprefix("http://").split(":")

    def run(body: dict[str, Any], into: HeldStream) -> None:
        payload = json.dumps(body).encode()
        sock = socket.create_connection((host, int(port)))
        sockets.append(sock)
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        head = f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n{extra}"
        sock.sendall(f"{head}content-length: {len(payload)}\r\n\r\n".encode() + payload)
        with contextlib.suppress(OSError), sock.makefile("rb") as reader:
            _read_answer(reader, into)
        into.ended = True

    threads = [threading.Thread(target=run, args=pair, daemon=True) for pair in zip(bodies, streams, strict=True)]
    for thread in threads:
        thread.start()
    try:
        yield streams
    finally:
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(30)


def _read_answer(reader: Any, into: HeldStream) -> None:
    status = reader.readline().split()
    into.status = int(status[1]) if len(status) > 1 else None
    for raw in reader:
        if raw in (b"\r\n", b"\n"):
            break
        name, _, value = raw.decode("latin-1").partition(":")
        into.headers[name.strip().lower()] = value.strip()
    for raw in reader:
        line = raw.decode().strip()
        if line.startswith("data: "):  # chunk-size lines never start so
            into.lines.append(line[6:])
        elif line == "0":  # the last chunk (no data line is a bare 0)
            into.complete = True
            return


def is_json_prefix(text: str) -> bool:
    """Whether ``text`` is the beginning of some JSON value: what a JSON grammar lets a model write before
    ``max_tokens`` cuts it off. A small scanner (strings, escapes, numbers, literals, nesting), not a parser."""
    stack: list[str] = []
    i, n = 0, len(text)
    expect_value = True
    while i < n:
        c = text[i]
        if c in " \t\r\n":
            i += 1
        elif c == '"':
            if not expect_value:
                return False
            i += 1
            while i < n and text[i] != '"':
                if text[i] == "\\":
                    i += 1
                    if i < n and text[i] not in '"\\/bfnrtu':
                        return False
                elif ord(text[i]) < 0x20:
                    return False
                i += 1
            if i >= n:
                return True  # cut inside a string
            i += 1
            expect_value = False
        elif c in "{[":
            if not expect_value:
                return False
            stack.append("}" if c == "{" else "]")
            i += 1
        elif c in "}]":
            if not stack or stack.pop() != c:
                return False
            i += 1
            expect_value = False
        elif c in ",:":
            if expect_value or not stack:
                return False
            expect_value = True
            i += 1
        elif c in "-0123456789":
            j = i
            while j < n and text[j] in "-+.eE0123456789":
                j += 1
            if not expect_value:
                return False
            i, expect_value = j, False
        else:
            for word in ("true", "false", "null"):
                piece = text[i : i + len(word)]
                if word.startswith(piece):
                    if not expect_value:
                        return False
                    i, expect_value = i + len(piece), False
                    if len(piece) < len(word):
                        return i == n
                    break
            else:
                return False
    return True

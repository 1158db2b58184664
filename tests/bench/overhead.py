"""What the gateway adds to a request (not a test): the engine direct vs the gateway vs nginx vs LiteLLM.

Run: ``.venv/bin/python -m tests.bench.overhead [--quick] [--json out.json] [--profile out.txt]``.

One fast fake engine (tests/fakes/fake_engine.py, a chat model and an embedding model through a multi-model
JSON config, no artificial delays) serves every path, all on 127.0.0.1:

- ``direct``:  the client talks to the engine;
- ``gateway``: ``python -m gateway`` (tests.helpers.start_gateway) adopting that engine via GATEWAY_ENGINE_URL;
- ``nginx``:   deploy/nginx/mistral-gateway.conf as shipped, its upstream pointed at the engine (what a plain
  proxy costs; skipped when nginx is not installed);
- ``litellm``: a LiteLLM proxy (one worker, no database) for the same engine, when a ``litellm`` program is
  found on PATH or named by LITELLM_BIN (skipped otherwise);
- ``baseline``: with ``--baseline-src DIR``, another gateway (the package in DIR, e.g. an earlier commit
  unpacked with ``git archive``), so that a change is measured before and after in one interleaved run.

Each cell (workload x concurrency) sends the same number of requests through every path, in rounds that
alternate between the paths so that machine noise affects all of them alike. The load generator is a
keep-alive HTTP/1.1 client on raw asyncio streams with pre-encoded requests (a single httpx.AsyncClient is
CPU-heavy at high concurrency, see shared/PERF.md); its own CPU per request is reported so that it can be
checked not to be the bottleneck. Latency is measured by the client, per request. Proxy CPU comes from
/proc/<pid>/stat (utime + stime of the proxy's process tree) before and after each block.

The targets (issue #7) are printed as PASS / MISS next to the results; the program never fails on them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.helpers import FAKE_ENGINE, ROOT, Gateway, free_port, pid_alive, start_gateway, wait_for

CHAT_MODEL = "bench-chat"
EMBED_MODEL = "bench-embed"
EMBED_ITEMS = 64
LITELLM_KEY = "sk-bench-overhead"
SITE = ROOT / "deploy" / "nginx" / "mistral-gateway.conf"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CONTENT = re.compile(rb'"content":\s*"[^"]')  # a chunk that carries text (not the role-only or final chunk)

# Targets, from shared/PERF.md's "The bar to set" and issue #7.
MAX_ADDED_SMALL_MS = 1.0
MAX_ADDED_STREAM100_MS = 3.0
MIN_THROUGHPUT_C32 = 0.5
MIN_CACHE_SPEEDUP = 5.0
MAX_RSS_REST_MB = 80.0


# ---------------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------------


def tree_pids(pid: int) -> list[int]:
    """The process and all its descendants (through /proc/<pid>/task/*/children)."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with contextlib.suppress(OSError):
                    todo.extend(int(p) for p in Path(f"/proc/{current}/task/{task}/children").read_text().split())
    return pids


def cpu_seconds(pids: Sequence[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return total / CLOCK_TICKS


def rss_mb(pids: Sequence[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return round(total / 1024, 1)


def _answers(url: str, headers: dict[str, str] | None = None) -> bool:
    try:
        return httpx.get(url, timeout=2, headers=headers).status_code == 200
    except httpx.HTTPError:
        return False


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15) -> None:
    pids = [p for p in tree_pids(proc.pid) if p != proc.pid]
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pid in pids:  # children that outlived their parent (nginx workers, LiteLLM helpers)
        deadline = time.monotonic() + 5
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "FAKE_ENGINE_"))}


@dataclass
class Target:
    """One path under test: where to send requests and which processes to account for."""

    name: str
    port: int
    proc: subprocess.Popen[bytes] | None  # the proxy process (None: direct)
    extra_headers: bytes = b""
    rss_rest_mb: float | None = None
    rss_after_mb: float | None = None

    def pids(self) -> list[int]:
        return tree_pids(self.proc.pid) if self.proc is not None else []


def start_engine(root: Path) -> tuple[subprocess.Popen[bytes], int]:
    chat, embed = root / "models" / "chat", root / "models" / "embed"
    chat.mkdir(parents=True)
    embed.mkdir(parents=True)
    config = root / "engine-models.json"
    config.write_text(
        json.dumps(
            {
                "chat": {"Plain": {"model_id": str(chat)}, "alias": CHAT_MODEL},
                "embed": {"Embedding": {"model_id": str(embed)}, "alias": EMBED_MODEL},
            }
        )
    )
    port = free_port()
    argv = [
        sys.executable,
        str(FAKE_ENGINE),
        "--serve-ip",
        "127.0.0.1",
        "--port",
        str(port),
        "multi-model",
        "-c",
        str(config),
    ]
    with (root / "engine.log").open("wb") as log:
        proc = subprocess.Popen(argv, env=_clean_env(), stdout=log, stderr=subprocess.STDOUT)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the fake engine exited:\n{_tail(root / 'engine.log')}")
        return _answers(f"http://127.0.0.1:{port}/health")

    wait_for(ready, 20, "the fake engine")
    return proc, port


def gateway_models_toml(root: Path) -> str:
    return (
        f'default_model = "{CHAT_MODEL}"\ndefault_embedding_model = "{EMBED_MODEL}"\n\n'
        f'[[models]]\nid = "{CHAT_MODEL}"\nkind = "plain"\npath = "{root / "models" / "chat"}"\n\n'
        f'[[models]]\nid = "{EMBED_MODEL}"\nkind = "embedding"\npath = "{root / "models" / "embed"}"\n'
    )


def start_the_gateway(root: Path, engine_port: int, source: Path | None, name: str = "gateway") -> Gateway:
    env = {"GATEWAY_ENGINE_URL": f"http://127.0.0.1:{engine_port}", "GATEWAY_LOG_LEVEL": "warning"}
    if source is not None:  # another copy of the gateway package, e.g. `git archive HEAD` unpacked somewhere
        env["PYTHONPATH"] = str(source.resolve())
    return start_gateway(root, gateway_models_toml(root), env=env, name=name)


def find_nginx() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


def nginx_config(folder: Path, upstream_port: int, listen_port: int) -> str:
    """The shipped site file (as tests/integration/test_nginx.py runs it), wrapped in a minimal main config."""
    site = SITE.read_text()
    site, n_upstream = re.subn(r"server 127\.0\.0\.1:8080;", f"server 127.0.0.1:{upstream_port};", site)
    site, n_listen = re.subn(r"^(\s*)listen 80;", rf"\g<1>listen 127.0.0.1:{listen_port};", site, flags=re.M)
    site, n_listen6 = re.subn(r"^\s*listen \[::\]:80;\n", "", site, flags=re.M)
    if (n_upstream, n_listen, n_listen6) != (1, 1, 1):
        raise RuntimeError(f"{SITE}: its upstream or listen lines changed; update tests/bench/overhead.py")
    user = "user root root;\n" if os.geteuid() == 0 else ""
    # No access log: the gateway runs with GATEWAY_LOG_LEVEL=warning, which turns its request log off too.
    return (
        f"daemon off;\nworker_processes 1;\npid {folder}/nginx.pid;\nerror_log {folder}/error.log warn;\n{user}"
        "events { worker_connections 1024; }\n"
        "http {\n    access_log off;\n"
        + "".join(f"    {kind}_temp_path {folder}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi"))
        + f"    scgi_temp_path {folder}/scgi;\n{site}\n}}\n"
    )


def start_nginx(root: Path, binary: str, upstream_port: int) -> Target:
    folder = root / "nginx"
    folder.mkdir()
    port = free_port()
    conf = folder / "nginx.conf"
    conf.write_text(nginx_config(folder, upstream_port, port))
    argv = [binary, "-e", str(folder / "error.log"), "-p", str(folder), "-c", str(conf)]
    check = subprocess.run([*argv, "-t"], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"nginx -t refused the config:\n{check.stderr}")
    with (folder / "stderr.log").open("wb") as err:
        proc = subprocess.Popen(argv, stdout=err, stderr=subprocess.STDOUT)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"nginx exited:\n{_tail(folder / 'error.log')}")
        return _answers(f"http://127.0.0.1:{port}/health")

    wait_for(ready, 15, "nginx")
    return Target("nginx", port, proc)


def find_litellm() -> str | None:
    named = os.environ.get("LITELLM_BIN")
    if named:
        return shutil.which(named) or (named if os.access(named, os.X_OK) else None)
    return shutil.which("litellm")


def start_litellm(root: Path, binary: str, engine_port: int) -> Target:
    folder = root / "litellm"
    folder.mkdir()
    base = f"http://127.0.0.1:{engine_port}/v1"
    entries = "".join(
        f"  - model_name: {name}\n    litellm_params:\n      model: openai/{name}\n"
        f"      api_base: {base}\n      api_key: unused\n"
        for name in (CHAT_MODEL, EMBED_MODEL)
    )
    config = folder / "config.yaml"
    config.write_text(f"model_list:\n{entries}general_settings:\n  master_key: {LITELLM_KEY}\n")
    port = free_port()
    offline = ("MODEL_COST_MAP", "ANTHROPIC_BETA_HEADERS", "BLOG_POSTS", "POLICY_TEMPLATES", "AUTOROUTER_PRESETS")
    env = {
        **_clean_env(),
        **{f"LITELLM_LOCAL_{name}": "True" for name in offline},  # no fetching from the internet at start
        "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",
        "LITELLM_LOG": "ERROR",
        "NO_PROXY": "*",
    }
    log_path = folder / "litellm.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [binary, "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            cwd=folder,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"litellm exited with {proc.returncode}:\n{_tail(log_path)}")
        return _answers(f"http://127.0.0.1:{port}/health/liveliness")

    try:
        wait_for(ready, 120, "the LiteLLM proxy")
    except AssertionError:
        _stop(proc)
        raise
    return Target("litellm", port, proc, extra_headers=f"Authorization: Bearer {LITELLM_KEY}\r\n".encode())


# ---------------------------------------------------------------------------------------------------
# The load generator: keep-alive HTTP/1.1 on asyncio streams
# ---------------------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: bytes
    body: bytes
    chunk_times: list[float]  # when each text-carrying SSE event arrived (streams only)


class Connection:
    """One keep-alive HTTP/1.1 connection. Requests are sent pre-encoded; answers are read with as little
    parsing as HTTP needs (Content-Length or chunked), so that the client stays cheap next to the servers."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port, limit=1 << 22)
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def send(self, request: bytes, stream: bool) -> Reply:
        if self.writer is None:
            await self.open()
        assert self.reader is not None and self.writer is not None
        reader = self.reader
        self.writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        times: list[float] = []
        chunked = b"transfer-encoding: chunked" in lower
        if stream and chunked and status == 200:
            return Reply(status, bytes(head), await self._read_events(reader, times), times)
        if chunked:
            pieces: list[bytes] = []
            pending = b""
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")  # the empty trailer section
                    break
                data = (await reader.readexactly(size + 2))[:-2]
                if stream:
                    now = time.perf_counter()
                    pending += data
                    *events, pending = pending.split(b"\n\n")
                    times.extend(now for event in events if CONTENT.search(event))
                pieces.append(data)
            body = b"".join(pieces)
        else:
            match = re.search(rb"\r\ncontent-length:\s*(\d+)", lower)
            body = await reader.readexactly(int(match.group(1))) if match else b""
        if b"\r\nconnection: close" in lower:
            self.close()
        return Reply(status, bytes(head), body, times)

    @staticmethod
    async def _read_events(reader: asyncio.StreamReader, times: list[float]) -> bytes:
        """Read a chunked SSE answer in whatever pieces the socket gives (one await per network read, not
        two per HTTP chunk), stamping each text-carrying event with the time its last byte arrived."""
        raw = b""  # not yet de-chunked
        text = b""  # de-chunked, not yet cut into events
        while True:
            data = await reader.read(1 << 18)
            if not data:
                raise asyncio.IncompleteReadError(raw, None)
            now = time.perf_counter()
            raw += data
            pos, pieces, finished = 0, [], False
            while True:
                eol = raw.find(b"\r\n", pos)
                if eol < 0:
                    break
                size = int(raw[pos:eol].split(b";", 1)[0], 16)
                if size == 0:
                    finished = len(raw) >= eol + 4  # the last chunk and the empty trailer section
                    break
                if len(raw) < eol + size + 4:
                    break
                pieces.append(raw[eol + 2 : eol + 2 + size])
                pos = eol + size + 4
            raw = raw[pos:]
            if pieces:
                text += b"".join(pieces)
                end = text.rfind(b"\n\n")
                if end >= 0:
                    times.extend(now for _ in CONTENT.finditer(text, 0, end))
                    text = text[end + 2 :]
            if finished:
                return text


# ---------------------------------------------------------------------------------------------------
# Workloads and cells
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    name: str
    route: str
    body: bytes
    stream: bool = False
    chunks: int = 0  # text chunks every stream must carry
    headers: bytes = b""
    prime: bool = False  # send once on each path before the cell (fills the gateway's embedding cache)

    def request(self, target: Target) -> bytes:
        return (
            f"POST {self.route} HTTP/1.1\r\nHost: 127.0.0.1:{target.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(self.body)}\r\n".encode()
            + self.headers
            + target.extra_headers
            + b"\r\n"
            + self.body
        )


def _chat(text: str, stream: bool = False) -> bytes:
    body: dict[str, Any] = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": text}]}
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


EMBED_BATCH = json.dumps(
    {
        "model": EMBED_MODEL,
        "input": [f"benchmark passage {i}: the quick brown fox jumps over the lazy dog" for i in range(EMBED_ITEMS)],
    }
).encode()

SMALL_CHAT = Workload("chat", "/v1/chat/completions", _chat("hello there"))
WORKLOADS = {
    "chat": SMALL_CHAT,
    "stream200": Workload("stream200", "/v1/chat/completions", _chat("count:200", True), True, 200),
    "stream100": Workload("stream100", "/v1/chat/completions", _chat("count:100", True), True, 100),
    "embed-nostore": Workload("embed-nostore", "/v1/embeddings", EMBED_BATCH, headers=b"Cache-Control: no-store\r\n"),
    "embed-warm": Workload("embed-warm", "/v1/embeddings", EMBED_BATCH, prime=True),
}


@dataclass(frozen=True)
class Plan:
    """(workload, concurrencies, requests per path per cell) for a run, and the rounds a cell is split into."""

    cells: tuple[tuple[str, tuple[int, ...], int], ...]
    rounds: int


FULL = Plan(
    (
        ("chat", (1, 16, 32, 64), 4000),  # blocks of 1,000: shorter ones made the c=32 ratio swing by +-15 points
        ("stream200", (1, 16, 64), 192),
        ("stream100", (1,), 192),
        ("embed-nostore", (1, 16, 64), 640),
        ("embed-warm", (1, 16, 64), 640),
    ),
    rounds=4,
)
# Before/after a change to the hot path (with --baseline-src): the small request alone and under load, a stream.
FOCUS = Plan((("chat", (1, 32), 4000), ("stream100", (1,), 192)), rounds=4)
QUICK = Plan(
    (
        ("chat", (1, 16, 32), 400),
        ("stream200", (1, 16), 48),
        ("stream100", (1,), 48),
        ("embed-nostore", (1, 16), 160),
        ("embed-warm", (1, 16), 160),
    ),
    rounds=2,
)


@dataclass
class PathStats:
    """What one path did in one cell, summed over its blocks."""

    latencies: list[float] = field(default_factory=list)
    ttfc: list[float] = field(default_factory=list)
    gap_mean: list[float] = field(default_factory=list)
    gap_max: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    proxy_cpu: float = 0.0
    engine_cpu: float = 0.0
    client_cpu: float = 0.0
    errors: int = 0
    first_error: str = ""
    cache_hits: int = 0


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


async def run_block(
    target: Target, engine_pids: list[int], work: Workload, concurrency: int, count: int, stats: PathStats
) -> None:
    """``count`` requests over ``concurrency`` fresh keep-alive connections; connecting and one untimed small
    request per connection (which also opens the proxy's upstream connections) happen before the clock starts."""
    connections = [Connection(target.port) for _ in range(concurrency)]
    warm = SMALL_CHAT.request(target)
    await asyncio.gather(*(c.send(warm, False) for c in connections))
    request = work.request(target)
    proxy_pids = target.pids()
    remaining = count

    async def worker(connection: Connection) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            began = time.perf_counter()
            try:
                reply = await connection.send(request, work.stream)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                stats.errors += 1
                stats.first_error = stats.first_error or f"{type(exc).__name__}: {exc}"
                connection.close()
                continue
            ended = time.perf_counter()
            if reply.status != 200 or (work.stream and len(reply.chunk_times) != work.chunks):
                stats.errors += 1
                stats.first_error = stats.first_error or (
                    f"HTTP {reply.status}, {len(reply.chunk_times)} chunks: {reply.body[:200]!r}"
                )
                continue
            stats.latencies.append(ended - began)
            if b"\r\nx-cache: hit" in reply.headers.lower():
                stats.cache_hits += 1
            if work.stream:
                times = reply.chunk_times
                stats.ttfc.append(times[0] - began)
                gaps = [b - a for a, b in itertools.pairwise(times)]
                stats.gap_mean.append((times[-1] - times[0]) / max(1, len(gaps)))
                stats.gap_max.append(max(gaps, default=0.0))

    proxy0, engine0, client0 = cpu_seconds(proxy_pids), cpu_seconds(engine_pids), time.process_time()
    began = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in connections))
    stats.elapsed += time.perf_counter() - began
    stats.proxy_cpu += cpu_seconds(proxy_pids) - proxy0
    stats.engine_cpu += cpu_seconds(engine_pids) - engine0
    stats.client_cpu += time.process_time() - client0
    for connection in connections:
        connection.close()


async def run_cell(
    targets: list[Target], engine_pids: list[int], work: Workload, concurrency: int, count: int, rounds: int
) -> dict[str, Any]:
    # Every block keeps each connection busy for a few requests at least, so that ramp-up is a small part of it.
    rounds = max(1, min(rounds, count // (2 * concurrency)))
    per_round = [count // rounds + (1 if i < count % rounds else 0) for i in range(rounds)]
    stats = {t.name: PathStats() for t in targets}
    if work.prime:
        for target in targets:
            reply = await _one(target, work)
            if reply.status != 200:
                raise RuntimeError(
                    f"{target.name}: priming {work.name} failed: HTTP {reply.status} {reply.body[:300]!r}"
                )
    for index, block in enumerate(per_round):
        shift = index % len(targets)
        for target in targets[shift:] + targets[:shift]:  # a different path goes first in each round
            await run_block(target, engine_pids, work, concurrency, block, stats[target.name])
    return summarize(work, concurrency, count, rounds, stats)


async def _one(target: Target, work: Workload) -> Reply:
    connection = Connection(target.port)
    try:
        return await connection.send(work.request(target), work.stream)
    finally:
        connection.close()


def summarize(work: Workload, concurrency: int, count: int, rounds: int, stats: dict[str, PathStats]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for name, s in stats.items():
        done = len(s.latencies)
        row: dict[str, Any] = {"requests": done, "errors": s.errors}
        if s.first_error:
            row["first_error"] = s.first_error
        if done:
            row |= {
                "p50_ms": _ms(statistics.median(s.latencies)),
                "p99_ms": _ms(_pct(s.latencies, 0.99)),
                "mean_ms": _ms(statistics.fmean(s.latencies)),
                "rps": round(done / s.elapsed, 1),
                "proxy_cpu_s_per_1k": round(s.proxy_cpu / done * 1000, 3) if name != "direct" else None,
                "engine_cpu_s_per_1k": round(s.engine_cpu / done * 1000, 3),
                "client_cpu_s_per_1k": round(s.client_cpu / done * 1000, 3),
            }
            if work.name.startswith("embed"):
                row["cache_hits"] = s.cache_hits
            if work.stream:
                row |= {
                    "ttfc_p50_ms": _ms(statistics.median(s.ttfc)),
                    "ttfc_p99_ms": _ms(_pct(s.ttfc, 0.99)),
                    "gap_mean_ms": _ms(statistics.fmean(s.gap_mean)),
                    "gap_max_p50_ms": _ms(statistics.median(s.gap_max)),
                    "gap_max_worst_ms": _ms(max(s.gap_max)),
                }
        paths[name] = row
    direct = paths.get("direct", {})
    for name, row in paths.items():
        if name == "direct" or "p50_ms" not in row or "p50_ms" not in direct:
            continue
        row["added_p50_ms"] = round(row["p50_ms"] - direct["p50_ms"], 3)
        row["p50_ratio"] = round(row["p50_ms"] / direct["p50_ms"], 3)
        row["added_p99_ms"] = round(row["p99_ms"] - direct["p99_ms"], 3)
        row["rps_vs_direct"] = round(row["rps"] / direct["rps"], 3)
        if work.stream:
            row["added_ttfc_p50_ms"] = round(row["ttfc_p50_ms"] - direct["ttfc_p50_ms"], 3)
    return {
        "workload": work.name,
        "concurrency": concurrency,
        "requests_per_path": count,
        "rounds": rounds,
        "paths": paths,
    }


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str = ".2f", signed: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, float | int):
        return f"{value:+{spec}}" if signed else f"{value:{spec}}"
    return str(value)


def table(cells: list[dict[str, Any]]) -> str:
    lines = []
    head = (
        f"{'workload':<14}{'c':>3}  {'path':<8}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>9}{'+p50 ms':>9}{'x p50':>7}"
        f"{'thr %':>7}{'CPU s/1k':>9}{'err':>5}"
    )
    stream_head = f"{'ttfc p50':>9}{'gap mean':>9}{'gap max':>9}"
    last = ""
    for cell in cells:
        stream = cell["workload"].startswith("stream")
        if cell["workload"] != last:
            last = cell["workload"]
            lines.append("")
            lines.append(head + (stream_head if stream else ""))
        for name, row in cell["paths"].items():
            rps_vs = row.get("rps_vs_direct")
            line = (
                f"{cell['workload']:<14}{cell['concurrency']:>3}  {name:<8}{_fmt(row.get('p50_ms')):>9}"
                f"{_fmt(row.get('p99_ms')):>9}{_fmt(row.get('rps'), '.0f'):>9}"
                f"{_fmt(row.get('added_p50_ms'), '.2f', signed=True):>9}{_fmt(row.get('p50_ratio')):>7}"
                f"{_fmt(None if rps_vs is None else rps_vs * 100, '.0f'):>7}"
                f"{_fmt(row.get('proxy_cpu_s_per_1k')):>9}{row['errors']:>5}"
            )
            if stream:
                line += (
                    f"{_fmt(row.get('ttfc_p50_ms')):>9}{_fmt(row.get('gap_mean_ms'), '.3f'):>9}"
                    f"{_fmt(row.get('gap_max_p50_ms')):>9}"
                )
            lines.append(line)
    return "\n".join(lines)


def _cell(cells: list[dict[str, Any]], workload: str, concurrency: int) -> dict[str, Any] | None:
    return next((c for c in cells if c["workload"] == workload and c["concurrency"] == concurrency), None)


def targets_report(cells: list[dict[str, Any]], gateway_rss_rest: float | None) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []

    def path_value(workload: str, c: int, key: str) -> dict[str, Any]:
        cell = _cell(cells, workload, c)
        return {n: r.get(key) for n, r in cell["paths"].items() if n != "direct"} if cell else {}

    def add(
        name: str,
        value: float | None,
        limit: float,
        higher_is_better: bool,
        unit: str,
        others: dict[str, Any] | None = None,
    ) -> None:
        ok = None if value is None else (value >= limit if higher_is_better else value <= limit)
        results.append(
            {
                "target": name,
                "gateway": value,
                "limit": limit,
                "unit": unit,
                "pass": ok,
                "others": {k: v for k, v in (others or {}).items() if k != "gateway"},
            }
        )

    small = path_value("chat", 1, "added_p50_ms")
    add("small chat c=1: added median", small.get("gateway"), MAX_ADDED_SMALL_MS, False, "ms", small)
    stream = path_value("stream100", 1, "added_p50_ms")
    add(
        "100-chunk stream c=1: added total (median)", stream.get("gateway"), MAX_ADDED_STREAM100_MS, False, "ms", stream
    )
    thr = path_value("chat", 32, "rps_vs_direct")
    add("small chat c=32: throughput vs direct", thr.get("gateway"), MIN_THROUGHPUT_C32, True, "x", thr)
    off, warm = _cell(cells, "embed-nostore", 1), _cell(cells, "embed-warm", 1)
    speedup = None
    if off and warm and "p50_ms" in off["paths"].get("gateway", {}) and "p50_ms" in warm["paths"].get("gateway", {}):
        speedup = round(off["paths"]["gateway"]["p50_ms"] / warm["paths"]["gateway"]["p50_ms"], 2)
    add("embeddings c=1: cache-off p50 / warm-cache p50", speedup, MIN_CACHE_SPEEDUP, True, "x")
    add("gateway RSS at rest", gateway_rss_rest, MAX_RSS_REST_MB, False, "MB")
    return results


def print_targets(results: list[dict[str, Any]]) -> None:
    print("\nTargets (issue #7; reported, never enforced):")
    for r in results:
        verdict = {True: "PASS", False: "MISS", None: "n/a "}[r["pass"]]
        sign = ">=" if r["target"].startswith(("small chat c=32", "embeddings")) else "<="
        others = ", ".join(f"{k} {_fmt(v)}" for k, v in r["others"].items() if v is not None)
        print(
            f"  {verdict}  {r['target']}: gateway {_fmt(r['gateway'])} {r['unit']} (target {sign} {r['limit']})"
            + (f"   [{others}]" if others else "")
        )


# ---------------------------------------------------------------------------------------------------
# Profile (optional): py-spy on the gateway under the c=16 small-chat load
# ---------------------------------------------------------------------------------------------------


def find_py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


async def profile_gateway(gateway: Target, out: Path, seconds: float) -> None:
    py_spy = find_py_spy()
    if py_spy is None or gateway.proc is None:
        print("\nprofile: py-spy not found (.venv/bin/pip install py-spy); skipped")
        return
    spy = subprocess.Popen(
        [
            py_spy,
            "record",
            "--pid",
            str(gateway.proc.pid),
            "--duration",
            str(int(seconds)),
            "--rate",
            "250",
            "--format",
            "raw",
            "--output",
            str(out),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    await asyncio.sleep(1.0)  # py-spy attaches
    stats = PathStats()
    deadline = time.monotonic() + seconds - 1.5
    while time.monotonic() < deadline and spy.poll() is None:
        await run_block(gateway, [], SMALL_CHAT, 16, 400, stats)
    _, err = spy.communicate(timeout=60)
    if spy.returncode != 0 or not out.exists():
        print(f"\nprofile: py-spy failed: {err.decode(errors='replace').strip()[-500:]}")
        return
    print(f"\nProfile of the gateway, small chat at c=16 ({len(stats.latencies)} requests), from {out}:")
    print(summarize_profile(out))


def summarize_profile(path: Path, top: int = 15) -> str:
    """Self time by package and by function, and inclusive time of the libraries' frames, from py-spy's raw
    (collapsed stacks) output. py-spy leaves out idle samples: shares are of the time the gateway was busy."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    packages: dict[str, int] = {}
    total = upstream = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]  # line numbers merged
        total += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        where = re.search(r"\(([^/)]+)", frames[-1])
        package = where.group(1) if where else "?"
        packages[package] = packages.get(package, 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
        if any("(httpx/" in f or "(httpcore/" in f for f in frames):
            upstream += count
    if not total:
        return "  (no samples)"

    def share(count: int) -> str:
        return f"{100 * count / total:5.1f} %"

    ranked = sorted(packages.items(), key=lambda kv: -kv[1])
    by_package = ", ".join(f"{name} {100 * n / total:.0f} %" for name, n in ranked if n * 100 >= total)
    lines = [
        f"  {total} busy samples (py-spy shows a resumed coroutine's stack only from where it resumed, so a frame's"
        " inclusive share is a lower bound).",
        f"  self time by package: {by_package}",
        f"  samples inside httpx/httpcore (the upstream call): {share(upstream).strip()}",
        "  self time by function:",
    ]
    lines += [f"  {share(n)}  {frame}" for frame, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]]
    lines.append("  inclusive time:")
    wanted = ("(gateway/", "(starlette/", "(httpx/", "(httpcore/", "(h11/", "(anyio/", "(orjson", "(json/")
    interesting = [
        (f, n)
        for f, n in inclusive.items()
        if any(w in f for w in wanted) and not re.search(r"\(gateway/(cli|__main__)\.py", f)
    ]
    lines += [f"  {share(n)}  {frame}" for frame, n in sorted(interesting, key=lambda kv: -kv[1])[:top]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def processes(
    root: Path, skip: set[str], source: Path | None = None, baseline: Path | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], list[Target], Gateway]]:
    """The engine and every proxy in front of it; all of them are stopped on the way out, whatever happens."""
    started: list[Callable[[], None]] = []
    try:
        engine, engine_port = start_engine(root)
        started.append(lambda: _stop(engine, signal.SIGKILL))
        targets = [Target("direct", engine_port, None)]
        gateway = start_the_gateway(root, engine_port, source)
        started.append(lambda: _stop(gateway.proc, timeout=20))
        gw = Target("gateway", int(gateway.url.rsplit(":", 1)[1]), gateway.proc)
        gw.rss_rest_mb = rss_mb([gateway.proc.pid])  # after start, before any load
        targets.append(gw)
        if baseline is not None:
            before = start_the_gateway(root, engine_port, baseline, name="baseline")
            started.append(lambda: _stop(before.proc, timeout=20))
            base = Target("baseline", int(before.url.rsplit(":", 1)[1]), before.proc)
            base.rss_rest_mb = rss_mb([before.proc.pid])
            targets.append(base)
        nginx = find_nginx()
        if "nginx" in skip:
            print("nginx: skipped (--skip nginx)")
        elif nginx is None:
            print("nginx: not installed (apt-get install nginx); its path is skipped")
        else:
            proxy = start_nginx(root, nginx, engine_port)
            nginx_proc = proxy.proc
            assert nginx_proc is not None
            started.append(lambda: _stop(nginx_proc))
            proxy.rss_rest_mb = rss_mb(proxy.pids())
            targets.append(proxy)
        litellm = find_litellm()
        if "litellm" in skip:
            print("litellm: skipped (--skip litellm)")
        elif litellm is None:
            print(
                "litellm: no `litellm` program on PATH and no LITELLM_BIN; its path is skipped "
                "(python -m venv /tmp/litellm-venv && /tmp/litellm-venv/bin/pip install 'litellm[proxy]', "
                "then LITELLM_BIN=/tmp/litellm-venv/bin/litellm)"
            )
        else:
            try:
                lite = start_litellm(root, litellm, engine_port)
            except (AssertionError, RuntimeError) as exc:
                print(f"litellm: could not start, its path is skipped: {exc}")
            else:
                lite_proc = lite.proc
                assert lite_proc is not None
                started.append(lambda: _stop(lite_proc))
                lite.rss_rest_mb = rss_mb(lite.pids())
                targets.append(lite)
        yield engine, targets, gateway
    finally:
        for stop in reversed(started):
            with contextlib.suppress(Exception):
                stop()


async def bench(args: argparse.Namespace, targets: list[Target], engine: subprocess.Popen[bytes]) -> dict[str, Any]:
    plan = FOCUS if args.focus else QUICK if args.quick else FULL
    engine_pids = [engine.pid]
    for target in targets:  # every path answers, before any clock starts
        for work in (SMALL_CHAT, WORKLOADS["stream100"], WORKLOADS["embed-nostore"]):
            reply = await _one(target, work)
            if reply.status != 200:
                raise RuntimeError(f"{target.name}: {work.name} answered HTTP {reply.status}: {reply.body[:300]!r}")
    cells = []
    began = time.perf_counter()
    for name, concurrencies, count in plan.cells:
        for concurrency in concurrencies:
            cell = await run_cell(targets, engine_pids, WORKLOADS[name], concurrency, count, plan.rounds)
            gw = cell["paths"].get("gateway", {})
            print(
                f"  {name:<14} c={concurrency:<3} done ({time.perf_counter() - began:6.1f} s): gateway "
                f"p50 {_fmt(gw.get('p50_ms'))} ms, {_fmt(gw.get('added_p50_ms'), signed=True)} ms vs direct, "
                f"{_fmt(gw.get('rps'), '.0f')} req/s",
                flush=True,
            )
            cells.append(cell)
    for target in targets:
        if target.proc is not None:
            target.rss_after_mb = rss_mb(target.pids())
    return {"cells": cells, "seconds": round(time.perf_counter() - began, 1)}


def describe_gateway(source: Path | None) -> str:
    """Which gateway code is measured: a given folder, or this repository's commit and its uncommitted changes."""
    if source is not None:
        return f"the package in {source.resolve()}"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "gateway"], cwd=ROOT, capture_output=True, text=True
        )
    except OSError:
        return f"{ROOT} (no git)"
    edits = [line[3:] for line in changed.stdout.splitlines()]
    return f"{ROOT} at {commit.stdout.strip() or '?'}" + (
        f" with uncommitted changes to {', '.join(edits)}" if edits else ""
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests; concurrency 1 and 16 (and 32 for chat)")
    parser.add_argument("--focus", action="store_true", help="only small chat at c=1 and c=32 and a 100-chunk stream")
    parser.add_argument("--json", type=Path, help="write every number to this file")
    parser.add_argument("--skip", action="append", choices=("nginx", "litellm"), default=[], help="leave a path out")
    parser.add_argument("--profile", type=Path, help="then py-spy the gateway under c=16 small chat")
    parser.add_argument("--profile-seconds", type=float, default=10.0)
    parser.add_argument(
        "--gateway-src", type=Path, help="run the gateway package found in this folder (default: this repository)"
    )
    parser.add_argument(
        "--baseline-src", type=Path, help="also run the gateway package in this folder, as the path `baseline`"
    )
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    described = describe_gateway(args.gateway_src)
    print(f"working folder: {root}\ngateway: {described}")
    if args.baseline_src is not None:
        print(f"baseline: {describe_gateway(args.baseline_src)}")
    with processes(root, set(args.skip), args.gateway_src, args.baseline_src) as (engine, targets, gateway):
        print(f"paths: {', '.join(t.name for t in targets)}; {'quick' if args.quick else 'full'} run", flush=True)
        result = asyncio.run(bench(args, targets, engine))
        if args.profile is not None:
            gw = next(t for t in targets if t.name == "gateway")
            asyncio.run(profile_gateway(gw, args.profile, args.profile_seconds))
        if gateway.proc.poll() is not None:
            print(f"the gateway died during the run:\n{gateway.log()[-2000:]}")
    cells = result["cells"]
    print(table(cells))
    print(
        "\n+p50 / x p50 / thr %: against the direct path in the same run. CPU s/1k: the proxy's CPU seconds per "
        "1,000 requests.\nStreams: p50 / p99 are the total time; ttfc = time to first chunk; gap mean, and gap max "
        "as the median of each stream's largest gap (ms)."
    )

    def client_cpu(streaming: bool) -> str:
        worst: dict[str, float] = {}
        for cell in cells:
            if cell["workload"].startswith("stream") == streaming:
                for name, row in cell["paths"].items():
                    worst[name] = max(worst.get(name, 0.0), row.get("client_cpu_s_per_1k") or 0.0)
        return ", ".join(f"{name} {value:.2f}" for name, value in worst.items())

    print(
        f"Load generator CPU, s per 1,000 requests (worst cell): chat and embeddings: {client_cpu(False)}; "
        f"streams: {client_cpu(True)}."
    )
    memory = {t.name: {"rss_rest_mb": t.rss_rest_mb, "rss_after_mb": t.rss_after_mb} for t in targets if t.proc}
    print(
        "RSS (MB, whole process tree), at rest -> after the run: "
        + ", ".join(f"{n} {m['rss_rest_mb']} -> {m['rss_after_mb']}" for n, m in memory.items())
    )
    gw_rest = memory.get("gateway", {}).get("rss_rest_mb")
    targets_result = targets_report(cells, gw_rest)
    print_targets(targets_result)
    if args.json is not None:
        meta = {
            "quick": args.quick,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "machine": platform.platform(),
            "paths": [t.name for t in targets],
            "seconds": result["seconds"],
            "embed_items": EMBED_ITEMS,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "gateway": described,
        }
        args.json.write_text(
            json.dumps({"meta": meta, "memory": memory, "cells": cells, "targets": targets_result}, indent=2) + "\n"
        )
        print(f"\nwrote {args.json}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

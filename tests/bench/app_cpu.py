"""CPU per request of the gateway's ASGI app alone: no sockets, no uvicorn, no engine process.

``create_app`` over a pool of fake engine processes (tests/fakes/engines.py) and an upstream that answers every chat
at once, in the loop's next turn (as an answer over a socket would come); small chats are driven through the whole
ASGI stack, ``--concurrency`` at a time, and the CPU time per request is printed (the best of five rounds). What
tests/bench/overhead.py measures end to end includes uvicorn, aiohttp and the client; this isolates the gateway's
own code, with a run-to-run spread of a few microseconds, so that two versions can be compared:

    .venv/bin/python -m tests.bench.app_cpu                       # this checkout
    .venv/bin/python -m tests.bench.app_cpu --source /tmp/old     # another one (an archive of an older commit)
    .venv/bin/python -m tests.bench.app_cpu --profile /tmp/app.prof --layer BrowserGuard

``--layer NAME`` enters the stack at the middleware of that class name (or ``starlette``), so that what the layers
above it cost is the difference; ``--profile`` writes cProfile's stats of one more round. The access log is written
(to /dev/null) as a gateway at the default log level does.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ANSWER = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "chat",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }
).encode()
BODY = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}).encode()
ASGI = Callable[..., Awaitable[None]]


def build(layer: str | None) -> tuple[ASGI, Callable[[], Awaitable[Any]]]:
    """The app (or the layer of it to enter at), and how to make its engine ready."""
    from gateway.app import create_app
    from gateway.catalog import parse_catalog
    from gateway.settings import Settings
    from tests.fakes.engines import make_pool, repo_models
    from tests.fakes.upstream import Answer, FakeUpstream, _Response

    class Instant(FakeUpstream):
        async def post(self, url: str, body: bytes, *, deadline: Any, headers: Any = None) -> Any:
            await asyncio.sleep(0)
            return _Response(Answer.of(ANSWER))

    root = Path(tempfile.mkdtemp(prefix="bench-app-"))
    pool = make_pool(root, repo_models("chat"))
    settings = Settings(_env_file=None, model_dir=root / "models")
    catalog = parse_catalog(repo_models("chat"), origin="models.toml", model_dir=settings.model_dir)
    app = create_app(settings, catalog=catalog, pool=pool, upstream=Instant(lambda call: Answer.of(ANSWER)))
    target: Any = app
    if layer:
        node: Any = app.app
        while node is not None:
            if type(node).__name__ == layer or (layer == "starlette" and hasattr(node, "router")):
                target = node
                break
            node = getattr(node, "app", None) or getattr(getattr(node, "_proxy", None), "app", None)
        else:
            raise SystemExit(f"no layer {layer!r} in the app's stack")
    return target, lambda: pool.ensure_ready("chat")


async def one(app: ASGI) -> int:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1:8080"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(BODY)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
    }
    read = False
    connected = asyncio.Event()
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal read
        if not read:
            read = True
            return {"type": "http.request", "body": BODY, "more_body": False}
        await connected.wait()  # the client stays
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    await asyncio.sleep(0)  # as a server's loop would turn: what the request left scheduled runs
    return status


async def rounds(app: ASGI, ready: Callable[[], Awaitable[Any]], args: argparse.Namespace) -> None:
    await ready()
    for _ in range(500):
        assert await one(app) == 200

    async def worker(count: int) -> None:
        for _ in range(count):
            await one(app)

    per_worker = max(1, args.requests // args.concurrency)
    best = float("inf")
    for number in range(5):
        began = time.process_time()
        await asyncio.gather(*(worker(per_worker) for _ in range(args.concurrency)))
        per = (time.process_time() - began) / (per_worker * args.concurrency) * 1e6
        best = min(best, per)
        print(f"round {number + 1}: {per:.1f} us of CPU per request", flush=True)
    print(f"best: {best:.1f} us of CPU per request (concurrency {args.concurrency})")
    if args.profile is not None:
        profiler = cProfile.Profile()
        profiler.enable()
        await asyncio.gather(*(worker(per_worker) for _ in range(args.concurrency)))
        profiler.disable()
        profiler.dump_stats(str(args.profile))
        print(f"profile: {args.profile} (python -m pstats {args.profile})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.app_cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=6400, help="requests a round")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--source", type=Path, help="the checkout whose gateway (and tests/fakes) to run")
    parser.add_argument("--layer", help="enter the stack at this middleware class (or 'starlette')")
    parser.add_argument("--profile", type=Path, help="write cProfile stats of one more round here")
    args = parser.parse_args(argv)
    if args.source is not None:
        sys.path.insert(0, str(args.source.resolve()))
        for name in [m for m in sys.modules if m == "tests" or m.startswith(("tests.", "gateway"))]:
            del sys.modules[name]
    logging.basicConfig(stream=open(os.devnull, "w"), level=logging.INFO)  # noqa: SIM115  # for the process's life
    app, ready = build(args.layer)
    print(f"gateway: {Path(sys.modules['gateway'].__file__ or '?').parent}")
    asyncio.run(rounds(app, ready, args))


if __name__ == "__main__":
    main()

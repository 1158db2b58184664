"""What a swap costs (not a test): time from request to first token when another model must be stopped first,
against a cold start with free memory and a warm engine.

Run: ``.venv/bin/python -m tests.bench.swap [--rounds 5] [--json out.json]`` (needs the engine extra). The gateway
runs the bundled engine on the real model (SmolLM2-135M, see ``tests/realmodel.py``) under two ids, each declaring
``memory_mb`` so that the budget holds one of them, plus the same two models in an exclusive group:

- ``cold``: nothing runs; a stream for ``m1`` starts its engine (free memory, nothing to stop);
- ``evict``: ``m2`` runs idle; a stream for ``m1`` stops ``m2`` (budget) and starts ``m1``;
- ``exclusive``: ``x2`` runs idle; a stream for ``x1`` stops ``x2`` (its exclusive group) and starts ``x1``;
- ``warm``: ``m1`` runs; a stream for it.

Time to first token is the time from sending the request to the first event carrying content. Each round also
records how long the stop took (from the gateway's ``engine.stopped`` event, minus its ``engine.evicted`` one).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests.helpers import Gateway, start_gateway, wait_for
from tests.realmodel import smollm2

ADMIN = {"Authorization": "Bearer bench"}


def first_token(gw: Gateway, model: str) -> float:
    body = {
        "model": model,
        "stream": True,
        "max_tokens": 8,
        "temperature": 0,
        "messages": [{"role": "user", "content": "Say hello."}],
    }
    began = time.perf_counter()
    with httpx.stream("POST", gw.v1 + "/chat/completions", json=body, timeout=300) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                return time.perf_counter() - began
    raise RuntimeError(f"the stream for {model} carried no content")


def admin(gw: Gateway, model: str, action: str) -> None:
    httpx.post(f"{gw.url}/admin/models/{model}/{action}", headers=ADMIN, timeout=300).raise_for_status()


def states(gw: Gateway) -> dict[str, str]:
    status = httpx.get(gw.url + "/status", headers=ADMIN, timeout=30).json()
    return {e["name"]: e["state"] for e in status["engines"]}


def settle(gw: Gateway, running: set[str]) -> None:
    """Make exactly ``running`` run, then wait until every other engine is stopped."""
    for name, state in states(gw).items():
        if name not in running and state != "stopped":
            admin(gw, name, "unload")
    for name in running:
        admin(gw, name, "load")
    wait_for(lambda: {n for n, s in states(gw).items() if s != "stopped"} == running, 120, f"only {running} running")


def stop_seconds(gw: Gateway, after: int) -> float | None:
    """Seconds from the last `engine.evicted` event to the `engine.stopped` that followed it, from line ``after``."""
    events = [
        json.loads(line.split("gateway.events: ", 1)[1])
        for line in gw.log().splitlines()[after:]
        if "gateway.events: " in line
    ]
    evicted = [e for e in events if e["type"] == "engine.evicted"]
    stopped = [e for e in events if e["type"] == "engine.stopped"]
    if not evicted or not stopped:
        return None
    return _seconds(stopped[-1]["time"]) - _seconds(evicted[-1]["time"])


def _seconds(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    gguf = smollm2()
    model = f'kind = "gguf"\npath = "{gguf.parent}"\nfile = "{gguf.name}"\nmemory_mb = 300\n'
    toml = "".join(f'[[models]]\nid = "{name}"\n{model}' for name in ("m1", "m2", "x1", "x2"))
    toml += '[[groups]]\nname = "pair"\nmodels = ["x1", "x2"]\nexclusive = true\n'
    root = Path(tempfile.mkdtemp(prefix="bench-swap-"))
    gw = start_gateway(
        root,
        toml,
        env={
            "GATEWAY_ENGINE": "bundled",
            "GATEWAY_ENGINE_BINARY": "",
            "RUST_LOG": "error",
            "GATEWAY_ADMIN_KEY": "bench",
            "GATEWAY_MEMORY_BUDGET_MB": "500",
            "GATEWAY_IDLE_TIMEOUT": "0",
            "GATEWAY_LOG_LEVEL": "info",
        },
    )
    samples: dict[str, list[float]] = {"cold": [], "evict": [], "exclusive": [], "warm": []}
    stops: dict[str, list[float]] = {"evict": [], "exclusive": []}
    try:
        first_token(gw, "m1")  # the first start pays for reading the file from disk; leave it out
        for round_ in range(args.rounds):
            settle(gw, set())
            samples["cold"].append(first_token(gw, "m1"))
            settle(gw, {"m2"})  # 300 of 500 MB: m1 needs m2's room
            lines = len(gw.log().splitlines())
            samples["evict"].append(first_token(gw, "m1"))
            assert states(gw)["m2"] == "stopped", states(gw)
            stops["evict"].append(stop_seconds(gw, lines) or float("nan"))
            settle(gw, {"x2"})
            lines = len(gw.log().splitlines())
            samples["exclusive"].append(first_token(gw, "x1"))
            assert states(gw)["x2"] == "stopped", states(gw)
            stops["exclusive"].append(stop_seconds(gw, lines) or float("nan"))
            settle(gw, {"m1"})
            samples["warm"].append(first_token(gw, "m1"))
            print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1] * 1000:.0f} ms" for k, v in samples.items()))
    finally:
        gw.stop()
    results: dict[str, Any] = {"rounds": args.rounds, "model": gguf.name}
    print(f"\ntime to first token, {args.rounds} rounds (median, min-max), {gguf.name} on the bundled engine:")
    for name, values in samples.items():
        line = f"{statistics.median(values) * 1000:.0f} ms ({min(values) * 1000:.0f}-{max(values) * 1000:.0f})"
        if name in stops:
            line += f"; of which stopping the other engine: {statistics.median(stops[name]) * 1000:.0f} ms"
        print(f"  {name:10s} {line}")
        results[name] = {"median_ms": statistics.median(values) * 1000, "samples_ms": [v * 1000 for v in values]}
        if name in stops:
            results[name]["stop_median_ms"] = statistics.median(stops[name]) * 1000
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

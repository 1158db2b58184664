"""What scraping /metrics costs the gateway (not a test): CPU per scrape, and the share of a core at the rate an
endpoint picker scrapes (the Inference Extension's EPP: every 50 ms, 20 times a second).

Run: ``.venv/bin/python -m tests.bench.metrics_scrape [--seconds 20] [--rate 20]``.

A gateway process (tests.helpers.start_gateway) with the fake engine serves the five models of the integration tests
(two of them warm, their engines reporting a KV cache through PagedAttention, so that the background reading of the
engines' /metrics is part of the cost). Three phases of ``--seconds`` each, CPU read from /proc/<pid>/stat
(utime + stime) of the gateway process alone, then of its engines:

- ``idle``: nobody scrapes (what the gateway costs anyway: its idle stoppers, nothing else);
- ``rate``: /metrics scraped ``--rate`` times a second, as a picker does;
- ``back-to-back``: as fast as one keep-alive client can, for the CPU of one scrape.

It prints the numbers and never fails on them. The access log is at its default (info: one line a scrape) unless
``--log-level warning`` says otherwise; ``--path /healthz`` gives the floor, what any request costs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.helpers import start_gateway
from tests.integration.conftest import models_toml

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14 and 15 of proc(5))


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        found += [int(p) for p in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return found


def engines_cpu(pid: int) -> float:
    total = 0.0
    todo = children(pid)
    while todo:
        current = todo.pop()
        try:
            total += cpu_seconds(current)
            todo += children(current)
        except OSError:
            continue
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--path", default="/metrics", help="what to scrape (/healthz: the floor of any request)")
    parser.add_argument("--log-level", default="info", help="GATEWAY_LOG_LEVEL (info: one access line a scrape)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-metrics-"))
    toml = models_toml(root / "models") + "\n[engine]\npaged_attn = true\n"
    gw = start_gateway(root, toml, env={"GATEWAY_LOG_LEVEL": args.log_level})
    try:
        client = httpx.Client(timeout=10)
        for model in ("tiny-chat", "tiny-gguf"):
            body = {"model": model, "messages": [{"role": "user", "content": "warm"}]}
            assert client.post(gw.v1 + "/chat/completions", json=body).status_code == 200
        pid = gw.proc.pid

        def phase(name: str, scrape_every: float | None) -> tuple[float, float, int]:
            began, cpu, engines = time.monotonic(), cpu_seconds(pid), engines_cpu(pid)
            scrapes, next_at = 0, began
            while (now := time.monotonic()) - began < args.seconds:
                if scrape_every is None:
                    time.sleep(0.05)
                    continue
                if now >= next_at:
                    response = client.get(gw.url + args.path)
                    assert response.status_code == 200
                    scrapes += 1
                    next_at += scrape_every
                elif scrape_every:
                    time.sleep(min(next_at - now, 0.01))
            elapsed = time.monotonic() - began
            gateway_cpu, engine_cpu = cpu_seconds(pid) - cpu, engines_cpu(pid) - engines
            per = f", {1000 * gateway_cpu / scrapes:.2f} ms CPU a scrape" if scrapes else ""
            print(
                f"{name:>13}: {scrapes / elapsed:6.1f} scrapes/s; gateway {100 * gateway_cpu / elapsed:5.2f} % of a "
                f"core{per}; engines {100 * engine_cpu / elapsed:5.2f} % of a core"
            )
            return gateway_cpu / elapsed, engine_cpu / elapsed, scrapes

        idle, idle_engines, _ = phase("idle", None)
        rate, rate_engines, scrapes = phase(f"{args.rate:g}/s", 1 / args.rate)
        text = client.get(gw.url + "/metrics").text
        kinds = sorted({line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("vllm:")})
        print(f"/metrics: {len(text)} bytes, {len(text.splitlines())} lines; model-server gauges: {', '.join(kinds)}")
        _, _, fast = phase("back-to-back", 0.0)
        print(
            f"scraping {args.rate:g} times a second costs the gateway {100 * (rate - idle):.2f} % of a core over idle "
            f"({1000 * (rate - idle) / max(scrapes / args.seconds, 1e-9):.2f} ms a scrape), its engines "
            f"{100 * (rate_engines - idle_engines):.2f} % (their /metrics, read once a second); one client manages "
            f"{fast / args.seconds:.0f} scrapes/s back to back"
        )
    finally:
        gw.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

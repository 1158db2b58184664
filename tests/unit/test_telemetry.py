"""The engines' KV-cache use (gateway/engine/telemetry.py): read from their /metrics when a scrape asks, at most once
per interval, and reported only while fresh and only for engines that say it."""

from __future__ import annotations

import asyncio

import pytest

from gateway.engine.telemetry import STALE, KvCache, kv_usage
from gateway.upstream.client import UpstreamConnectError
from tests.fakes.engines import Clock, until
from tests.fakes.upstream import Answer, Call, FakeUpstream

MISTRALRS = b"""# HELP http_requests_total Requests.
# TYPE http_requests_total counter
http_requests_total{method="POST",path="/v1/chat/completions",model="m",status="200"} 12
# TYPE mistralrs_kv_cache_blocks_used gauge
mistralrs_kv_cache_blocks_used 64
# TYPE mistralrs_kv_cache_blocks_total gauge
mistralrs_kv_cache_blocks_total 256
mistralrs_kv_cache_blocks_used_by_prefix 999
"""


@pytest.mark.parametrize(
    ("text", "usage"),
    [
        (MISTRALRS.decode(), 0.25),
        (
            'mistralrs_kv_cache_blocks_used{rank="0"} 10 1700000000\nmistralrs_kv_cache_blocks_used{rank="1"} 30\n'
            "mistralrs_kv_cache_blocks_total 40\n",
            1.0,
        ),
        ("mistralrs_kv_cache_blocks_used 3\n", None),  # no total: nothing to divide by
        ("mistralrs_kv_cache_blocks_used 3\nmistralrs_kv_cache_blocks_total 0\n", None),
        ("# a server without PagedAttention\nhttp_requests_in_flight 2\n", None),
        ("mistralrs_kv_cache_blocks_used NaN-ish\nmistralrs_kv_cache_blocks_total 8\n", None),
    ],
)
def test_kv_usage_is_used_over_total_when_the_engine_says_both(text: str, usage: float | None) -> None:
    assert kv_usage(text) == usage


async def test_engines_are_read_when_asked_and_only_fresh_readings_of_ready_engines_count() -> None:
    bodies = {
        "http://a": Answer.of(MISTRALRS),
        "http://b": Answer.of(b"no kv here\n"),
        "http://c": Answer.of(b"", 404),
    }

    def handler(call: Call) -> Answer:
        base = call.url.removesuffix("/metrics")
        if base == "http://gone":
            raise UpstreamConnectError("refused")
        return bodies[base]

    ready = {"a": "http://a", "b": "http://b", "c": "http://c", "gone": "http://gone"}
    upstream, clock = FakeUpstream(handler), Clock()
    kv = KvCache(lambda: ready, upstream, interval=1.0, clock=clock)
    assert kv.usage() == {} and upstream.calls == []  # a scrape asks for a reading; it does not wait for one
    await kv.refresh()
    assert kv.usage() == {"a": 0.25}  # b and c report nothing, gone does not answer: absent, not 0
    assert sorted(c.url for c in upstream.calls) == [f"http://{n}/metrics" for n in ("a", "b", "c", "gone")]

    ready["a"] = "http://a2"  # restarted on another port: the old reading is not its
    assert kv.usage() == {}
    ready["a"] = "http://a"
    clock.now += STALE * 1.0 + 0.1
    assert kv.usage() == {}  # too old
    del ready["a"]
    await kv.refresh()
    assert kv.usage() == {}


class Gate:
    """A sleep that lasts until the test opens it (the reader's pause between two readings)."""

    def __init__(self) -> None:
        self.sleeping = False
        self._open = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        self.sleeping = True
        await self._open.wait()
        self._open.clear()
        self.sleeping = False

    def open(self) -> None:
        self._open.set()


async def test_the_background_reader_reads_once_per_interval_and_only_while_scraped() -> None:
    upstream, gate = FakeUpstream(lambda call: Answer.of(MISTRALRS)), Gate()
    kv = KvCache(lambda: {"a": "http://a"}, upstream, sleep=gate)
    reader = asyncio.ensure_future(kv.run())
    try:
        for _ in range(10):
            await asyncio.sleep(0)
        assert upstream.calls == []  # nobody scraped: the engines are asked nothing
        for _ in range(50):
            kv.usage()  # scrapes, many within one interval
        await until(lambda: gate.sleeping)
        assert len(upstream.calls) == 1 and kv.usage() == {"a": 0.25}  # ... and that scrape asks for one more
        gate.open()
        await until(lambda: len(upstream.calls) == 2 and gate.sleeping)
        gate.open()  # no scrape since: the reader waits for one
        for _ in range(10):
            await asyncio.sleep(0)
        assert len(upstream.calls) == 2 and not gate.sleeping
    finally:
        reader.cancel()

"""The backoff between failed engine starts, as a pure function (the lifecycle's behaviour is in test_pool.py)."""

from __future__ import annotations

from gateway.engine.lifecycle import start_backoff


def test_failed_starts_back_off_doubling_from_one_second_up_to_the_longest_wait() -> None:
    assert [start_backoff(failures, 60.0) for failures in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert start_backoff(10_000, 60.0) == 60.0  # no overflow after a long outage
    assert start_backoff(3, 0.5) == 1.0  # never under a second

"""The retry policy without a network: which errors are retried, the backoff, and the count of attempts that
made no progress (with a sleep that does not wait)."""

from __future__ import annotations

import httpx
import pytest

from gateway.models.errors import DownloadError
from gateway.models.retry import backoff_delay, is_retryable, retry_while_progressing
from tests.helpers import FakeSleep


@pytest.mark.parametrize(
    ("exc", "retry"),
    [
        (httpx.ConnectError("refused"), True),
        (httpx.ReadError("reset by peer"), True),
        (httpx.ReadTimeout("slow"), True),
        (httpx.ConnectTimeout("slow"), True),
        (httpx.RemoteProtocolError("peer closed connection"), True),
        (httpx.UnsupportedProtocol("ftp"), False),
        (httpx.LocalProtocolError("bad header"), False),
        (DownloadError("503", retryable=True), True),
        (DownloadError("404"), False),
        (OSError(28, "No space left on device"), False),
        (ValueError("bug"), False),
    ],
)
def test_retry_classification(exc: BaseException, retry: bool) -> None:
    assert is_retryable(exc) is retry


def test_backoff_doubles_from_the_first_delay_up_to_the_longest() -> None:
    delays = [backoff_delay(stalls, first=1.0, longest=10.0) for stalls in range(7)]
    assert delays == [1.0, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert backoff_delay(400, first=0.5, longest=30.0) == 30.0


class Flaky:
    """An attempt that fails with ``errors`` in turn, adding ``gains`` bytes each time, then returns "done".

    :meth:`run` retries it as the downloaders do (backoff from 1 s to 30 s), with a sleep that does not wait; the
    retries it announced are in ``seen``, as (error, delay).
    """

    def __init__(self, errors: list[Exception], gains: list[int]) -> None:
        self.errors, self.gains = errors, gains
        self.bytes = 0
        self.calls = 0
        self.sleep = FakeSleep()
        self.seen: list[tuple[str, float]] = []

    async def __call__(self) -> str:
        self.calls += 1
        if not self.errors:
            return "done"
        self.bytes += self.gains.pop(0)
        raise self.errors.pop(0)

    async def run(self, attempts: int) -> str:
        return await retry_while_progressing(
            self,
            lambda: self.bytes,
            attempts=attempts,
            backoff_min=1.0,
            backoff_max=30.0,
            sleep=self.sleep,
            before_retry=lambda error, delay: self.seen.append((str(error), delay)),
        )


async def test_the_result_comes_back_after_retries_that_are_announced() -> None:
    flaky = Flaky([httpx.ConnectError("refused"), DownloadError("503", retryable=True)], [0, 0])
    assert await flaky.run(attempts=3) == "done" and flaky.calls == 3
    assert flaky.seen == [("refused", 1.0), ("503", 2.0)] and flaky.sleep.delays == [1.0, 2.0]


async def test_only_attempts_without_progress_count_towards_giving_up() -> None:
    cut = [httpx.RemoteProtocolError("cut") for _ in range(6)]
    flaky = Flaky(list(cut), [100, 100, 100, 100, 0, 0])  # four attempts add bytes, then two add nothing
    with pytest.raises(httpx.RemoteProtocolError):
        await flaky.run(attempts=2)
    assert flaky.calls == 6 and flaky.sleep.delays == [1.0] * 5


async def test_an_error_that_is_not_retryable_is_raised_at_once() -> None:
    flaky = Flaky([DownloadError("404")], [0])
    with pytest.raises(DownloadError, match="404"):
        await flaky.run(attempts=5)
    assert flaky.calls == 1 and flaky.sleep.delays == [] and flaky.seen == []

"""Retrying downloads: which failures another attempt may cure, and a loop that gives up only when attempts stop
making progress.

A model file of several GB over a flaky link may be cut ten times and still finish, because each attempt resumes
where the last one stopped; a dead link adds nothing and should give up after a few attempts. So what decides is
not the number of attempts but the failures in a row that made no progress (stalls), and the backoff doubles with
the stalls, back to its minimum after an attempt that made progress. File downloads and repo snapshots share
this policy. tenacity runs the loop (``AsyncRetrying``, ``retry_if_exception``, ``before_sleep``, an injected
``sleep``); the stop and the wait it is given are plain callables over the stall count, which tenacity accepts in
place of its ``stop_*`` and ``wait_*`` strategies (those count attempts, which is not what we count).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from .errors import DownloadError, name_not_resolved

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]
# Told of each failure that will be retried and of the seconds until the next attempt (for a log line, an event).
BeforeRetry = Callable[[BaseException, float], None]


def is_retryable(exc: BaseException) -> bool:
    """Whether another attempt may succeed: network trouble and server-side errors, not client errors.

    A host name that does not resolve is not retried either: that is a machine without network (or one that needs a
    proxy or a mirror), which the seconds of a retry do not cure, and a request waits on every attempt.
    """
    if isinstance(exc, DownloadError):
        return exc.retryable
    if isinstance(exc, (httpx.UnsupportedProtocol, httpx.LocalProtocolError)):
        return False  # our request is wrong; it will be wrong again
    return isinstance(exc, httpx.TransportError) and not name_not_resolved(exc)


def backoff_delay(stalls: int, *, first: float, longest: float) -> float:
    """Seconds before the next attempt after ``stalls`` failures in a row without progress.

    ``first`` after one (or after a failure that made progress, ``stalls`` 0), then doubling up to ``longest``.
    """
    if stalls <= 1:
        return first
    return float(min(longest, first * 2 ** (stalls - 1)))


async def retry_while_progressing(
    attempt: Callable[[], Awaitable[T]],
    progress: Callable[[], int],
    *,
    attempts: int,
    backoff_min: float,
    backoff_max: float,
    sleep: Sleep,
    before_retry: BeforeRetry,
) -> T:
    """Run ``attempt`` until it succeeds, retrying retryable errors with exponential backoff; its result.

    ``attempts`` counts failures in a row that made no progress (``progress()`` did not grow): a flaky link
    that keeps dropping still finishes a big download, a dead one gives up. The last error is raised as it is.
    """
    stalls = 0

    def announce(state: RetryCallState) -> None:
        outcome = state.outcome
        error = outcome.exception() if outcome is not None else None
        if error is not None:  # always: only exceptions are retried
            before_retry(error, state.upcoming_sleep)

    retrying = AsyncRetrying(
        stop=lambda _: stalls >= attempts,
        wait=lambda _: backoff_delay(stalls, first=backoff_min, longest=backoff_max),
        retry=retry_if_exception(is_retryable),
        sleep=sleep,
        before_sleep=announce,
        reraise=True,
    )
    async for try_ in retrying:
        with try_:
            mark = progress()
            try:
                return await attempt()
            except Exception:
                stalls = 0 if progress() > mark else stalls + 1
                raise
    raise AssertionError("unreachable: with reraise=True, tenacity ends the attempts by raising the last error")

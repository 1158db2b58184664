"""One download of a model file at a time, across every process that shares the model dir.

Two gateways (or a gateway and ``mistral-gateway pull``) may want the same file at once; the second must wait for
the first and then use its file, not download it again beside it. The lock is ``<file>.lock``, an ``flock`` held
through filelock's :class:`~filelock.AsyncFileLock`: its attempts run in a worker thread and its waits are asyncio
sleeps, so a process that waits keeps serving and can be cancelled.

filelock keeps a Unix lock file after release (a removed one is a known hazard); we remove it anyway, so that a
finished download leaves nothing behind, and safely: the holder removes it *before* it lets go, and a waiter that
then wins the lock on the removed file finds it has no name any more (filelock checks the link count after every
``flock``) and tries again on the path. So two processes never each hold a lock on a different file of the same
name. That needs filelock 3.30 or later: from 3.21 to 3.29.4 filelock removed the file itself on release, after
our removal, which could take away a newer holder's file; 3.30 added ``fallback_to_soft``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from filelock import AsyncFileLock, Timeout


@contextlib.asynccontextmanager
async def exclusive(path: Path, *, poll: float, on_wait: Callable[[], None]) -> AsyncIterator[None]:
    """Hold the lock file ``path`` for the ``async with`` block, checking every ``poll`` seconds while it is taken.

    ``on_wait`` is called once, before waiting, when another process holds the lock: the caller tells its users.
    """
    # No soft fallback where flock is missing: a marker file left by a killed process would block every later
    # download of the file; without flock the download fails with the OSError, as it always has.
    lock = AsyncFileLock(path, mode=0o644, poll_interval=poll, fallback_to_soft=False)
    try:
        await lock.acquire(blocking=False)  # filelock's way to try once: Timeout when someone else holds it
    except Timeout:
        on_wait()
        await lock.acquire()
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # while still held: see the module docstring
        await lock.release()

"""Settings for the whole suite, before any test module is imported."""

from __future__ import annotations

import os


def _engine_threads_per_worker() -> None:
    """With the suite split over pytest-xdist workers (``make test``), each real engine a test starts gets its share
    of the cores, not all of them.

    mistral.rs computes with a rayon pool as large as the machine's cores, whose threads spin while they wait for
    each other: two engines of two workers on a 2-core machine (four spinning threads on two cores) made Claude
    Code's full-prompt test take 175 s instead of 36, and the whole suite no faster than one worker. With one thread
    each they share the cores without spinning (the same prompt: 54 s alone, unslowed by the other workers). The
    engine environment lets RAYON_NUM_THREADS through (gateway/engine/environment.py); a value set by hand wins.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // workers)))


_engine_threads_per_worker()

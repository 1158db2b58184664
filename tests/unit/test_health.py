"""Readiness (gateway/http/health.py), as /readyz and the routers' /health decide it: from flags and counters, on an
engine pool of fake processes and a fake clock."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.engine.pool import EnginePool
from gateway.errors import EngineStartFailed
from gateway.http.health import Readiness
from tests.fakes.engines import Clock, FakeSpawner, make_pool, repo_models


def pool_of(tmp_path: Path) -> tuple[EnginePool, FakeSpawner, Clock]:
    spawner, clock = FakeSpawner(), Clock()
    return make_pool(tmp_path, repo_models("a", "b"), spawner=spawner, clock=clock), spawner, clock


async def test_one_failing_engine_makes_only_its_model_unready(tmp_path: Path) -> None:
    pool, spawner, clock = pool_of(tmp_path)
    readiness = Readiness(pool, draining=lambda: False)
    assert readiness.check() == (True, {"status": "ready"})
    spawner.exit_codes = [3]
    with pytest.raises(EngineStartFailed):
        await pool.ensure_ready("a")
    ready, body = readiness.check("a")
    assert not ready and body["status"] == "engine failing" and "code 3" in body["errors"]["a"]
    assert readiness.check("b") == (True, {"status": "ready"}) and readiness.check()[0]  # b still serves

    spawner.exit_codes = [3]
    with pytest.raises(EngineStartFailed):
        await pool.ensure_ready("b")
    ready, body = readiness.check()
    assert not ready and body["status"] == "engines failing" and set(body["errors"]) == {"a", "b"}
    assert readiness.response().status_code == 503

    clock.now += 3600  # past every backoff: the next request may start them again, so they may be asked for
    assert readiness.check() == (True, {"status": "ready"}) and readiness.check("a")[0]
    assert len(spawner.procs) == 2  # asking never started anything
    await pool.aclose()


async def test_a_gateway_leaving_or_draining_is_not_ready_for_any_model(tmp_path: Path) -> None:
    pool, _, _ = pool_of(tmp_path)
    draining = [False]
    readiness = Readiness(pool, draining=lambda: draining[0])
    readiness.leave()
    assert readiness.check() == (False, {"status": "draining"}) == readiness.check("a")
    draining[0] = True
    assert Readiness(pool, draining=lambda: draining[0]).response("b").status_code == 503
    await pool.aclose()

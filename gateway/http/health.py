"""Health probes: ``/healthz`` (the process lives) and readiness, which orchestrators ask at ``/readyz`` and routers
at ``/health`` (gateway/http/node.py).

Readiness is decided in one place, :class:`Readiness`: a gateway is not ready while it is leaving (from SIGTERM on,
including GATEWAY_SHUTDOWN_NOTICE, during which it still serves everything so that whoever polls has time to look
elsewhere), or when no engine can serve (every one failing to start, within its backoff). One broken model does not
make the whole gateway unready while the others work; asked about one model (a router that registered this node
for it), the answer is that model's. It reads flags and counters only: routers and kubelets poll it every few
seconds, so it must never start an engine, measure memory or touch a file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ..engine.pool import EnginePool


class Readiness:
    """Whether this gateway (or one of its models) can serve now. ``draining``: whether the serving layer refuses
    new requests (gateway/serving/service.py)."""

    def __init__(self, pool: EnginePool, *, draining: Callable[[], bool]) -> None:
        self._pool = pool
        self._draining = draining
        self._leaving = False

    def leave(self) -> None:
        """SIGTERM with a notice: from now on not ready, though still serving until the notice ends."""
        self._leaving = True

    @property
    def leaving(self) -> bool:
        return self._leaving or self._draining()

    def check(self, model: str | None = None) -> tuple[bool, dict[str, Any]]:
        """(ready, what to say): for the whole gateway, or for ``model``'s engine only."""
        if self.leaving:
            return False, {"status": "draining"}
        failing = self._pool.failing()
        if model is not None:
            engine = self._pool.engine_of(model)
            if engine in failing:
                return False, {"status": "engine failing", "errors": {engine: failing[engine]}}
        elif failing and len(failing) == self._pool.engine_count:
            return False, {"status": "engines failing", "errors": failing}
        return True, {"status": "ready"}

    def response(self, model: str | None = None) -> Response:
        ready, body = self.check(model)
        return JSONResponse(body, status_code=200 if ready else 503)


class Health:
    def __init__(self, readiness: Readiness, pool: EnginePool) -> None:
        self._readiness = readiness
        self._pool = pool

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
        ]

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        ready, body = self._readiness.check()
        if ready:
            body["engines"] = {load.engine: load.state.value for load in self._pool.loads()}
        return JSONResponse(body, status_code=200 if ready else 503)

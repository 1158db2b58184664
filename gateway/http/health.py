"""Health probes for load balancers and orchestrators: ``/healthz`` (the process lives) and ``/readyz`` (the gateway
can serve: it is not draining, and not every engine is failing)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ..engine.pool import EnginePool
from ..serving.service import Serving


class Health:
    def __init__(self, serving: Serving, pool: EnginePool) -> None:
        self._serving = serving
        self._pool = pool

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
        ]

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        if self._serving.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        engines = self._pool.status()["engines"]
        # Not ready only when no engine can serve: one broken model must not take the whole gateway out of a
        # load balancer while the others work.
        if engines and all(e["state"] == "failed" and e["retry_in"] for e in engines):
            errors = {e["name"]: e["last_error"] for e in engines}
            return JSONResponse({"status": "engines failing", "errors": errors}, status_code=503)
        return JSONResponse({"status": "ready", "engines": {e["name"]: e["state"] for e in engines}})

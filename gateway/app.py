"""Wiring: build the gateway's parts from settings, hand them to each other, run their lifespan."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from . import __version__
from .cache.embeddings import Embeddings
from .cache.store import MemoryStore, RedisStore
from .catalog import Catalog, load_catalog
from .console.engine_logs import LogHub
from .console.operations import Operations
from .console.routes import Console
from .console.tracker import Tracker
from .dialects.anthropic.routes import AnthropicRoutes
from .dialects.errors import error_response
from .dialects.ollama.routes import OllamaRoutes
from .dialects.openai.images import ImageStore
from .dialects.openai.routes import OpenAIRoutes
from .engine.launcher import Launcher, ProgramFinder
from .engine.pool import EnginePool
from .engine.preparation import Preparer
from .engine.process import ProcessSpawner, SubprocessSpawner
from .engine.recipes import Machine, engine_on_cpu
from .engine.telemetry import KvCache
from .errors import EngineUnavailable, GatewayError, MethodNotAllowed, RouteNotFound
from .events import EventBus
from .fleet.peers import Peers
from .http.auth import KeyGuard, load_keys
from .http.browsers import BrowserGuard, default_hosts
from .http.health import Health, Readiness
from .http.node import ModelScope, Node
from .http.observer import RequestObserver, loggable
from .http.openapi import openapi_route
from .http.proxies import PublicOrigin, TrustedProxies
from .masking import Masker, build_masker, gateway_secrets
from .metrics import Metrics, cache_metrics, download_metrics, engine_metrics, model_server_metrics, peer_metrics
from .serving.intake import Intake
from .serving.limits import PromptLimits
from .serving.service import Serving
from .settings import Settings
from .upstream.client import AiohttpUpstream, Upstream
from .upstream.relay import Relay

if TYPE_CHECKING:
    from .models.download import Downloader

_log = logging.getLogger("gateway")


def create_app(
    settings: Settings,
    *,
    catalog: Catalog | None = None,
    pool: EnginePool | None = None,
    upstream: Upstream | None = None,
    spawner: ProcessSpawner | None = None,
    find_program: ProgramFinder | None = None,
    environ: Mapping[str, str] | None = None,
    masker: Masker | None = None,
) -> GatewayApp:
    """The ASGI app. Parts not passed in are built from ``settings``: engines are spawned as processes
    (``spawner``), of the program found on this machine (``find_program``), with an environment made from this
    process's own (``environ``); the secrets to mask (``masker``) are those of the settings, ``environ`` and the
    catalog."""
    if catalog is None:
        catalog = load_catalog(
            settings.resolved_models_file(),
            model_dir=settings.model_dir,
            default_model=settings.default_model,
        )
    api_keys = load_keys(settings.api_keys)
    process_environ = os.environ if environ is None else environ
    if masker is None:
        secrets = gateway_secrets(settings, api_keys=api_keys, environ=process_environ, catalog=catalog)
        masker = build_masker(secrets, _log)
    owns_run_dir = settings.run_dir is None
    run_dir = settings.run_dir or Path(tempfile.mkdtemp(prefix="mistral-gateway-"))
    events = EventBus(masker=masker)
    logs = LogHub(masker=masker)
    metrics = Metrics()
    tracker = Tracker(on_tokens=metrics.count_tokens)
    if pool is None:
        logger = logging.getLogger("gateway.engine")
        launcher = Launcher(
            settings,
            spawner=spawner or SubprocessSpawner(logger, masker=masker),
            probe=AiohttpUpstream(),
            clock=time.monotonic,
            find_program=find_program,
            environ=environ,
            logger=logger,
            output=logs.append,
        )
        hf_endpoint = process_environ.get("HF_ENDPOINT")
        on_cpu = engine_on_cpu(engine=settings.engine, binary=settings.engine_binary, cpu_flag=catalog.engine.cpu)
        preparer = Preparer(
            settings,
            downloader=lambda: _downloader(settings, events, hf_endpoint),
            events=events,
            machine=Machine.detect(cpu_only=on_cpu),
        )
        for model, verdict in preparer.verdicts(catalog):
            if not verdict.fast or verdict.serve_as is not None:
                logger.warning("model %s: %s", model.id, preparer.advice(model, verdict))
        for model, _, warning in preparer.isq_plans(catalog):
            if warning is not None:
                logger.warning("model %s: %s", model.id, warning)
        pool = EnginePool(
            settings,
            catalog,
            run_dir=run_dir / "engine",
            launcher=launcher,
            preparer=preparer,
            events=events,
            logger=logger,
        )
    upstream = upstream or AiohttpUpstream()
    kv_cache = KvCache(pool.ready_engines, upstream)
    relay = Relay(
        upstream,
        stall_timeout=settings.stall_timeout,
        request_timeout=settings.request_timeout,
        on_failure=pool.engine_failed,
    )
    memory = MemoryStore(int(settings.embedding_cache_mb * 1024 * 1024), ttl=settings.embedding_cache_ttl)
    shared = RedisStore(settings.cache_url, ttl=settings.embedding_cache_ttl) if settings.cache_url else None
    embeddings = Embeddings(relay, memory, shared)
    limits = PromptLimits(settings.model_dir)
    peer_urls = [url for url in settings.peers.split(",") if url.strip()]
    peers = None
    if peer_urls:
        peers = Peers(
            peer_urls,
            own_name=settings.node_name,
            busy=settings.peer_busy,
            interval=settings.peer_interval,
            clock=time.monotonic,
            logger=logging.getLogger("gateway.fleet"),
        )
    serving = Serving(
        pool,
        relay,
        embeddings,
        events,
        limits=limits,
        loading_interval=settings.loading_interval,
        tracker=tracker,
        peers=peers,
    )
    intake = Intake(catalog, max_body_mb=settings.max_body_mb)
    images = ImageStore(run_dir / "images", ttl=settings.image_ttl)
    origin = PublicOrigin(settings.public_url, host=settings.host, port=settings.port)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        import asyncio

        background = [
            asyncio.create_task(pool.run(), name="engine-pool"),  # idle stoppers, preload
            asyncio.create_task(kv_cache.run(), name="engine-kv-cache"),  # the engines' KV use, while scraped
        ]
        peer_client = None
        if peers is not None:
            import httpx  # only for a node with peers: with rich and pygments, it would double the modules loaded

            # The peers' readings: plain HTTP to addresses the operator gave, never through an environment's proxy.
            peer_client = httpx.AsyncClient(trust_env=False, headers={"user-agent": f"mistral-gateway/{__version__}"})
            background.append(asyncio.create_task(peers.run(peer_client), name="fleet-peers"))
        try:
            yield
        finally:
            serving.start_draining()
            for task in background:
                task.cancel()
            if peer_client is not None:
                await peer_client.aclose()
            await pool.aclose()
            await upstream.aclose()
            if shared is not None:
                await shared.aclose()
            if owns_run_dir:
                shutil.rmtree(run_dir, ignore_errors=True)

    metrics.watch(
        lambda: [
            *engine_metrics(pool.status()),
            *cache_metrics(embeddings.status()),
            *download_metrics(events.summary()["downloads"]),
            *peer_metrics(peers.sent_elsewhere if peers is not None else None),
        ]
    )
    metrics.watch(
        lambda: model_server_metrics(pool.loads(), kv_cache.usage(), pool.capacity(), time.time()), protocol=True
    )

    async def serve_metrics(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    readiness = Readiness(pool, draining=lambda: serving.draining)
    routes = [
        *OpenAIRoutes(catalog, intake, serving, images, origin.of).routes(),
        *AnthropicRoutes(intake, serving).routes(),
        *OllamaRoutes(catalog, intake, serving).routes(),
        *Health(readiness, pool).routes(),
        *Node(settings.node_name, catalog, pool, readiness).routes(),
        *Operations(catalog, pool, embeddings, events, peers=peers).routes(),
        *Console(tracker, logs).routes(),
        openapi_route(catalog),
        Route("/metrics", serve_metrics, methods=["GET"]),
    ]
    routed = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            GatewayError: _gateway_error,
            HTTPException: _http_error,
            Exception: _unexpected_error,
        },
    )
    # No redirect to the path with(out) a trailing slash: its Location would be built from the Host header, and an
    # API client is better served by a 404 in OpenAI's shape that names the path.
    routed.router.redirect_slashes = False
    # The layers every request crosses, outermost first: trusted proxies -> observer -> browsers (hosts, origins, CORS)
    # -> /m/<model>/ -> key guard -> Starlette.
    stack: ASGIApp = routed
    if api_keys or settings.admin_key:  # a layer costs CPU on every request: none when nothing is guarded
        stack = KeyGuard(stack, api_keys=api_keys, admin_key=settings.admin_key)
    stack = ModelScope(stack, catalog)  # before the guard: a prefixed path is guarded as the path it stands for
    stack = BrowserGuard(
        stack,
        hosts=[*default_hosts(settings.public_url, settings.host), *settings.allowed_hosts.split(",")],
        cors_origins=settings.cors_origins.split(","),
        public_origin=settings.public_url,
    )
    stack = RequestObserver(
        stack, metrics=metrics, log_format=settings.log_format, tracker=tracker, node=settings.node_name
    )
    stack = TrustedProxies(stack, allow_ips=settings.forwarded_allow_ips)  # instead of uvicorn's (cli.serve)
    return GatewayApp(
        stack,
        pool=pool,
        catalog=catalog,
        serving=serving,
        relay=relay,
        events=events,
        logs=logs,
        readiness=readiness,
        masker=masker,
    )


class GatewayApp:
    """The ASGI app that uvicorn serves, with the parts the command line needs to reach."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        pool: EnginePool,
        catalog: Catalog,
        serving: Serving,
        relay: Relay,
        events: EventBus,
        logs: LogHub,
        readiness: Readiness,
        masker: Masker | None = None,
    ) -> None:
        self.app = app
        self._readiness = readiness
        self.pool = pool
        self.catalog = catalog
        self.serving = serving
        self.masker = masker  # for the log handlers (cli.serve); None when no secret is configured
        self._relay = relay
        self._events = events
        self._logs = logs

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)

    def announce_shutdown(self) -> None:
        """SIGTERM, with GATEWAY_SHUTDOWN_NOTICE: say "not ready" (/health, /readyz) while still serving everything,
        so that routers and load balancers polling them have time to send elsewhere (gateway/http/shutdown.py)."""
        self._readiness.leave()

    def begin_shutdown(self) -> None:
        """SIGTERM: refuse new requests, answer the ones waiting for an engine to start at once, end /events
        streams; requests being answered get until :meth:`end_drain` (gateway/http/shutdown.py)."""
        self.serving.start_draining()
        self.pool.begin_shutdown()
        self._events.close()
        self._logs.close()

    async def end_drain(self) -> None:
        """The drain deadline: every request still talking to the engine ends now, with an answer in its own shape
        (a JSON 503, or a stream's final error event), never a connection cut or a plain-text 500."""
        await self._relay.close(
            EngineUnavailable(
                "The gateway is shutting down and this request outlasted GATEWAY_SHUTDOWN_TIMEOUT. Retry it.",
                retry_after=1,
            )
        )


def _downloader(settings: Settings, events: EventBus, hf_endpoint: str | None) -> Downloader:
    from .models.download import Downloader

    return Downloader(settings.model_dir, events=events, hf_endpoint=hf_endpoint)


async def _gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    if exc.status >= 500:
        method, path = loggable(request.method), loggable(request.url.path)
        _log.warning("%s %s -> %d: %s", method, path, exc.status, exc.message)
    return error_response(exc, request.url.path)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    path = request.url.path
    error: GatewayError
    if exc.status_code == 404:
        error = RouteNotFound(f"Unknown request URL: {request.method} {path}. Please check the URL for typos.")
    elif exc.status_code == 405:
        error = MethodNotAllowed(f"{request.method} is not allowed on {path}.", headers=dict(exc.headers or {}))
    else:
        error = GatewayError(str(exc.detail), status=exc.status_code, headers=dict(exc.headers or {}))
        error.type = "invalid_request_error"
    return error_response(error, path)


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    _log.exception("unexpected error on %s %s", loggable(request.method), loggable(request.url.path))
    error = GatewayError("The gateway failed unexpectedly; see its log.", code="internal_error")
    return error_response(error, request.url.path)

"""The command line: parse flags into Settings, then delegate to a programmatic ``serve()``."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from . import __version__
from .catalog import Catalog, load_catalog
from .errors import ConfigError, EngineNotInstalled, EngineStartFailed
from .settings import Settings

if TYPE_CHECKING:
    from .engine.preparation import Preparer


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mistral-gateway",
        description="OpenAI-compatible gateway that starts the mistral.rs engine on demand. "
        "Every option can also be set as a GATEWAY_* environment variable or in .env.",
    )
    parser.add_argument("--version", action="version", version=f"mistral-gateway {__version__}")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the gateway (the default)")
    check = sub.add_parser("check", help="check the configuration and print the engine command line")
    pull = sub.add_parser("pull", help="download model files ahead of time, with progress")
    pull.add_argument("models", nargs="*", metavar="ID", help="models to download (default: the default models)")
    pull.add_argument("--all", action="store_true", help="download every model of the models file")
    convert = sub.add_parser(
        "convert", help="rewrite a GGUF model in a weight type the engine is fast with (Q8_0 or Q4_0)"
    )
    convert.add_argument("model", metavar="ID_OR_FILE", help="a model of the models file, or the path of a .gguf file")
    convert.add_argument("--to", choices=["Q8_0", "Q4_0"], default="Q8_0", help="the weight type to write (Q8_0)")
    convert.add_argument("--out", type=Path, help="where to write it (a file given by path: beside it)")
    engine = sub.add_parser("engine", help="start, stop or show every engine of a running gateway")
    engine.add_argument("action", choices=["start", "stop", "status"])
    engine.add_argument("--url", help="the gateway's URL (default: from GATEWAY_HOST and GATEWAY_PORT)")
    models = sub.add_parser("models", help="the models of a running gateway: ps, load ID, unload ID")
    models.add_argument("action", choices=["ps", "load", "unload"])
    models.add_argument("model", nargs="?", metavar="ID", help="the model to load or unload")
    models.add_argument("--url", help="the gateway's URL (default: from GATEWAY_HOST and GATEWAY_PORT)")
    routers = sub.add_parser(
        "routers", help="write the configuration of a router in front of several gateways (docs/scale-out.md)"
    )
    routers.add_argument("router", choices=["vllm-router", "litellm"])
    routers.add_argument(
        "--node",
        action="append",
        required=True,
        metavar="URL[=MODELS_FILE]",
        help="a gateway, asked what it serves (URL/server_info), or read from its models file; once per node",
    )
    routers.add_argument(
        "--api-key", action="store_true", help="the nodes want an API key: the router sends $NODE_API_KEY"
    )
    routers.add_argument(
        "--router-url", default="http://127.0.0.1:30000", help="vllm-router: where it runs (default %(default)s)"
    )
    routers.add_argument(
        "--register", action="store_true", help="vllm-router: register the nodes with the router now, not print them"
    )
    # The same flags before or after the subcommand. A subcommand's defaults are SUPPRESS, so that
    # `mistral-gateway --port 9000 serve` keeps 9000 instead of the subparser resetting it to None.
    for p in (parser, serve, check, pull, convert):
        default = None if p is parser else argparse.SUPPRESS
        p.add_argument("--models-file", default=default, help="models file (TOML); env GATEWAY_MODELS_FILE")
        if p is not pull:
            p.add_argument(
                "--engine-binary",
                default=default,
                help="mistralrs or mistralrs-server program; env GATEWAY_ENGINE_BINARY",
            )
    for p in (parser, serve):
        default = None if p is parser else argparse.SUPPRESS
        p.add_argument("--host", default=default, help="listen address (default 127.0.0.1); env GATEWAY_HOST")
        p.add_argument("--port", type=int, default=default, help="listen port (default 8080); env GATEWAY_PORT")
        p.add_argument(
            "--idle-timeout", type=float, default=default, help="seconds before an idle engine stops; 0 = never"
        )
        p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=default)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for name in ("host", "port", "models_file", "engine_binary", "idle_timeout", "log_level"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    return Settings(**overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args)
        if args.command == "check":
            return check(settings)
        if args.command == "pull":
            return pull_models(settings, args.models, every=args.all)
        if args.command == "convert":
            return convert_model(settings, args.model, target=args.to, out=args.out)
        if args.command == "engine":
            return engine_command(settings, args.action, args.url)
        if args.command == "models":
            return models_command(settings, args.action, args.model, args.url)
        if args.command == "routers":
            return routers_command(settings, args)
        return serve(settings)
    except ConfigError as exc:
        print(f"mistral-gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:  # a setting from the environment, .env or a flag that does not parse
        print(f"mistral-gateway: configuration error: {_explain_settings(exc)}", file=sys.stderr)
        return 2


def _explain_settings(exc: ValidationError) -> str:
    """One line per bad setting, named as it is set (GATEWAY_PORT), without pydantic's links."""
    lines = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else "?"
        message = error["msg"].removeprefix("Value error, ")
        shown = "" if "(got " in message else f" (got {error.get('input')!r})"
        lines.append(f"GATEWAY_{field.upper()}: {message}{shown}")
    return "; ".join(lines)


def check(settings: Settings) -> int:
    """Print what the gateway would run; exit 1 when no engine is installed."""
    from .engine.discovery import find_engine
    from .engine.launcher import plan_launch
    from .engine.preparation import engine_catalog

    catalog = load_catalog(
        settings.resolved_models_file(), model_dir=settings.model_dir, default_model=settings.default_model
    )
    print(f"models from {catalog.origin}:")
    # Prefetched repos load from their folder in the model dir, as their engines are started.
    folders = {
        m.id: settings.model_dir / m.source.model_id for m in catalog.models if not m.source.local and m.entry.prefetch
    }
    for model in catalog.models:
        aliases = f" (aliases: {', '.join(model.entry.aliases)})" if model.entry.aliases else ""
        source = model.source.model_id + (f"/{model.source.filename}" if model.source.filename else "")
        if model.id in folders:
            source = f"Hugging Face repo {model.source.model_id}, fetched into {folders[model.id]}"
        elif model.entry.url:
            source += f" (downloaded from {model.entry.url} when missing)"
        print(f"  {model.id} [{model.kind}] from {source}{aliases}")
    catalog = engine_catalog(catalog, folders, None)
    print(f"default model: {catalog.default_model}; default embedding model: {catalog.default_embedding_model}")
    preparer = _preparer(settings, catalog)
    for model, verdict in preparer.verdicts(catalog):
        fast = "fast" if verdict.fast and verdict.serve_as is None else "SLOW"
        print(f"weights of {model.id}: {verdict.current or 'unknown type'}, {fast}: {preparer.advice(model, verdict)}")
    for model, chosen, warning in preparer.isq_plans(catalog):
        asked = model.entry.options.isq
        print(f"in-situ quantization of {model.id}: {chosen}" + (f' (isq = "{asked}")' if asked != chosen else ""))
        if warning is not None:
            print(f"  SLOW: {warning}")
    catalog = preparer.with_isq(catalog)  # the command lines below as the engine gets them
    if settings.engine_url:
        print(f"engine: the one running at {settings.engine_url}")
        return 0
    try:
        program = find_engine(choice=settings.engine, binary=settings.engine_binary)
    except EngineNotInstalled as exc:
        print(f"engine: {exc.message}")
        return 1
    version = ".".join(map(str, program.version)) if program.version else "unknown version"
    if program.name == "bundled":
        from importlib.metadata import version as package_version

        version = f"the mistralrs package {package_version('mistralrs')}"
    print(f"engine: {program.name} ({version}), one process per line below, each started at its first request:")
    failed = False
    for unit in catalog.units:
        run_dir = Path(f"<run-dir>/{unit.name}")
        try:
            plan = plan_launch(
                program,
                catalog.only(unit.ids),
                port=settings.engine_port or 1234,
                run_dir=run_dir,
                settings=settings,
                environ={},
            )
        except EngineStartFailed as exc:
            print(f"  {unit.name}: {exc.message}")
            failed = True
            continue
        mode = f" (exclusive group {unit.exclusive}: one member at a time)" if unit.exclusive else ""
        argv = list(plan.argv)
        if not settings.engine_port:  # PORT: each start takes a free loopback port
            argv[argv.index("--port") + 1] = "PORT"
        print(f"  {unit.name}{mode}: {shlex.join(argv)}")
        for name, text in plan.files.items():
            print(f"--- {run_dir}/{name}\n{text}")
    return 1 if failed else 0


def pull_models(settings: Settings, names: list[str], *, every: bool) -> int:
    """`mistral-gateway pull`: fetch `url` model files now, one progress bar per file."""
    import asyncio

    from .events import EventBus
    from .models.bars import render_progress
    from .models.download import Downloader
    from .models.errors import DownloadError

    catalog = load_catalog(
        settings.resolved_models_file(), model_dir=settings.model_dir, default_model=settings.default_model
    )
    if every:
        chosen = list(catalog.models)
    else:
        wanted = names or [n for n in (catalog.default_model, catalog.default_embedding_model) if n]
        chosen = []
        for name in wanted:
            model = catalog.find(name)
            if model is None:
                print(f"mistral-gateway: no model {name!r} in {catalog.origin}", file=sys.stderr)
                return 2
            chosen.append(model)
    files = [m for m in chosen if m.entry.url]
    repos = [m for m in chosen if not m.source.local and m.entry.prefetch]
    for model in chosen:
        if model not in files and model not in repos:
            where = model.entry.path or f"the Hugging Face repo {model.source.model_id} (prefetch = false)"
            print(f"{model.id}: nothing to download here (it comes from {where}; the engine reads or fetches it)")
    if not files and not repos:
        return 0

    async def run() -> list[object]:
        from .models.hub import HubFetcher

        bus = EventBus()
        downloader = Downloader(settings.model_dir, events=bus, hf_endpoint=os.environ.get("HF_ENDPOINT"))
        token = settings.hf_token.get_secret_value() if settings.hf_token else None
        hub = HubFetcher(settings.model_dir, token=token, events=bus)
        names = [str(m.entry.file) for m in files] + [m.source.model_id for m in repos]
        bars = asyncio.create_task(render_progress(bus.subscribe(), names))
        try:
            return await asyncio.gather(
                *(downloader.ensure_model(m.entry) for m in files),
                *(hub.ensure_model(m) for m in repos),
                return_exceptions=True,
            )
        finally:
            await bars
            await downloader.aclose()

    failed = 0
    for model, result in zip([*files, *repos], asyncio.run(run()), strict=True):
        if isinstance(result, DownloadError):
            print(f"{model.id}: {result.message}", file=sys.stderr)
            failed += 1
        elif isinstance(result, BaseException):
            raise result
        else:
            print(f"{model.id}: {result}")
    return 1 if failed else 0


def _preparer(settings: Settings, catalog: Catalog) -> Preparer:
    """What decides the weight type each model is served in on this machine (no downloads)."""
    from .engine.preparation import Preparer
    from .engine.recipes import Machine, engine_on_cpu

    on_cpu = engine_on_cpu(engine=settings.engine, binary=settings.engine_binary, cpu_flag=catalog.engine.cpu)
    return Preparer(settings, machine=Machine.detect(cpu_only=on_cpu))


def convert_model(settings: Settings, name: str, *, target: str, out: Path | None) -> int:
    """`mistral-gateway convert`: a GGUF rewritten in a fast weight type, with its progress."""
    import asyncio
    import time

    from .engine.preparation import engine_catalog
    from .models.convert import convert, converted_name
    from .models.metadata import NotGGUF, read_gguf

    path = Path(name).expanduser()
    model_id = None
    if not path.is_file():
        catalog = load_catalog(
            settings.resolved_models_file(), model_dir=settings.model_dir, default_model=settings.default_model
        )
        model = catalog.find(name)
        if model is None:
            print(f"mistral-gateway: {name!r} is neither a file nor a model of {catalog.origin}", file=sys.stderr)
            return 2
        model = engine_catalog(catalog.only([model.id]), {}, None).models[0]
        if model.kind != "gguf" or not model.source.local or not model.source.filename:
            print(
                f"mistral-gateway: {model.id} is not a local GGUF file (run `mistral-gateway pull` first)",
                file=sys.stderr,
            )
            return 2
        path, model_id = Path(model.source.model_id) / model.source.filename, model.id
    try:
        current = read_gguf(path).weight_type()
    except NotGGUF as exc:
        print(f"mistral-gateway: {exc}", file=sys.stderr)
        return 2
    if out is None:
        folder = settings.model_dir / "converted" if model_id else path.parent
        out = folder / converted_name(path, target)
    out.parent.mkdir(parents=True, exist_ok=True)
    shown = [-1]

    def progress(done: int, total: int) -> None:
        share = 100 * done // max(total, 1)
        if share // 10 != shown[0] // 10:
            shown[0] = share
            print(f"  {share:3d}% of {total / 2**20:.0f} MiB", flush=True)

    print(f"converting {path} ({current}) to {target}: {out}")
    began = time.monotonic()
    result = asyncio.run(asyncio.to_thread(convert, path, out, target, only_slow=False, progress=progress))
    print(
        f"done in {time.monotonic() - began:.1f} s: {result.converted} tensors converted, {result.kept} kept, "
        f"{result.bytes / 2**20:.0f} MiB"
    )
    if model_id:
        print(f'the gateway serves it for {model_id} (quant = "auto" does for a slow type, quant = "{target}" for any)')
    return 0


def _admin(settings: Settings, url: str | None, method: str, path: str) -> dict[str, Any] | None:
    """One call to a running gateway's admin API; None (after saying why on stderr) when it fails."""
    import httpx

    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    base = (url or f"http://{host}:{settings.port}").rstrip("/")
    from .http.auth import load_keys

    # The admin key; without one, the admin routes take an API key (gateway/auth.py).
    key = settings.admin_key or next(iter(sorted(load_keys(settings.api_keys))), None)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        response = httpx.request(method, base + path, headers=headers, timeout=settings.startup_timeout + 30)
    except httpx.HTTPError as exc:
        print(f"mistral-gateway: cannot reach the gateway at {base}: {exc}", file=sys.stderr)
        return None
    try:
        body: dict[str, Any] = response.json()
    except ValueError:
        body = {"error": {"message": response.text}}
    if response.status_code >= 400:
        print(f"mistral-gateway: {body.get('error', {}).get('message', response.text)}", file=sys.stderr)
        return None
    return body


def engine_command(settings: Settings, action: str, url: str | None) -> int:
    """`mistral-gateway engine start|stop|status`: every engine of a running gateway."""
    import json

    path = "/status" if action == "status" else f"/admin/engine/{action}"
    body = _admin(settings, url, "GET" if action == "status" else "POST", path)
    if body is None:
        return 1
    print(json.dumps({"engines": body.get("engines"), "budget": body.get("budget")}, indent=2))
    return 0


def models_command(settings: Settings, action: str, model: str | None, url: str | None) -> int:
    """`mistral-gateway models ps | load ID | unload ID`: the models of a running gateway and their engines."""
    import json
    from urllib.parse import quote

    if action == "ps":
        body = _admin(settings, url, "GET", "/status")
        if body is None:
            return 1
        print(models_table(body))
        return 0
    if not model:
        print(f"mistral-gateway: models {action} needs a model id", file=sys.stderr)
        return 2
    body = _admin(settings, url, "POST", f"/admin/models/{quote(model, safe='/')}/{action}")
    if body is None:
        return 1
    print(json.dumps(body, indent=2))
    return 0


def routers_command(settings: Settings, args: argparse.Namespace) -> int:
    """`mistral-gateway routers vllm-router|litellm --node ...`: a router's configuration for these gateways."""
    import httpx

    from .fleet import litellm, nodes, vllm_router

    with httpx.Client(timeout=10) as client:
        fleet = [nodes.parse(spec, model_dir=settings.model_dir, client=client) for spec in args.node]
        if args.router == "litellm":
            print(litellm.config(fleet, api_key=args.api_key), end="")
        elif args.register:
            failed = vllm_router.register(fleet, args.router_url, client=client)
            for line in failed:
                print(f"mistral-gateway: could not register {line}", file=sys.stderr)
            registered = len(vllm_router.workers(fleet)) - len(failed)
            print(f"registered {registered} (node, model) pairs with {args.router_url}")
            return 1 if failed else 0
        else:
            print(vllm_router.script(fleet, router=args.router_url, api_key=args.api_key), end="")
    return 0


def models_table(status: dict[str, Any]) -> str:
    """`models ps`: one line per model, as `ollama ps` shows them, and the memory budget."""
    rows = [("MODEL", "ENGINE", "STATE", "PID", "MEMORY", "IN FLIGHT", "IDLE STOP IN")]
    engines = {e["name"]: e for e in status.get("engines", [])}
    for model in status.get("models", []):
        engine = engines.get(model.get("engine"), {})
        memory = model.get("memory_mb")
        until = model.get("seconds_until_idle_stop")
        rows.append(
            (
                model["id"],
                str(model.get("engine")),
                str(model.get("state")),
                str(engine.get("pid") or "-"),
                f"{memory:g} MB" if memory is not None else "-",
                str(engine.get("in_flight", 0)),
                f"{until:.0f} s" if until is not None else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    budget = status.get("budget") or {}
    if budget.get("budget_mb"):
        lines.append(f"memory: {budget['used_mb']:g} MB of a {budget['budget_mb']:g} MB budget")
    return "\n".join(lines)


def serve(settings: Settings) -> int:
    """Run the gateway until SIGTERM or Ctrl+C; the engine never outlives it."""
    from .app import create_app
    from .http.auth import exposure_warning, load_keys
    from .http.server import uvicorn_config
    from .http.shutdown import GracefulServer
    from .masking import build_masker, gateway_secrets, mask_handlers

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One line per upstream call is noise next to uvicorn's access log.
    for noisy in ("httpx", "httpx2", "huggingface_hub"):  # one INFO line per HTTP request each
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # The secrets are masked in every line from the first one the gateway writes (gateway/masking.py).
    catalog = load_catalog(
        settings.resolved_models_file(), model_dir=settings.model_dir, default_model=settings.default_model
    )
    api_keys = load_keys(settings.api_keys)
    secrets = gateway_secrets(settings, api_keys=api_keys, environ=os.environ, catalog=catalog)
    masker = build_masker(secrets, logging.getLogger("gateway"))
    exposed = exposure_warning(settings.host, settings.port, api_keys=api_keys, admin_key=settings.admin_key)
    if exposed is not None:
        logging.getLogger("gateway").warning(exposed)
    if masker is not None:
        mask_handlers(masker, [logging.getLogger()])
    app = create_app(settings, catalog=catalog, masker=masker)
    pool = app.pool
    # What is loaded by now (modules, settings, the catalog, the app) lives as long as the process: frozen, the garbage
    # collector's full passes, which requests trigger, no longer rescan it. Measured (tests/bench/overhead.py, small
    # chats at c=32, interleaved with d963289): p99 38-47 ms without (d963289: 20-24) in three runs, 19-27 ms with
    # (d963289: 15-25) in six. Kept for that, as issue #22's rule allows (docs/performance.md).
    gc.collect()
    gc.freeze()
    config = uvicorn_config(app, settings, host=settings.host, port=settings.port, log_level=settings.log_level)
    if masker is not None:  # uvicorn's own handlers, which uvicorn.Config has just installed
        mask_handlers(masker, [logging.getLogger(name) for name in ("uvicorn", "uvicorn.error", "uvicorn.access")])
    server = GracefulServer(
        config, gateway=app, drain_timeout=settings.shutdown_timeout, notice=settings.shutdown_notice
    )
    try:
        server.run()
    finally:
        # A second Ctrl+C skips the lifespan shutdown: the engine must still go.
        pool.kill_now()
    return 0 if server.started else 1

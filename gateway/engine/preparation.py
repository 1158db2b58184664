"""Getting models ready to load: files downloaded, Hugging Face repos fetched, weights in a fast type, paths checked.

Before an engine starts, :class:`Preparer` makes every file its models need local (``url`` files with resume and
checks, ``repo`` snapshots with huggingface_hub; what is complete locally costs nothing), converts a GGUF whose
weight type the engine is slow with on this machine (gateway/engine/recipes.py; once, into the model dir's
``converted`` folder, unless the models file says ``quant = "as-is"``), and returns the catalog the engine is
started with: prefetched repos load from their folder and converted files from theirs, under the ids clients use.
A download that fails is a :class:`~gateway.errors.ModelDownloadFailed` that says what to do about it. It also
estimates what a model will take in memory from its files, for the pool's budget before the engine has loaded it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..catalog import Catalog, Model
from ..errors import EngineStartFailed, ModelDownloadFailed
from ..events import EventSink, NullSink
from ..models.files import outside
from ..models.metadata import NotGGUF, read_gguf
from ..settings import Settings
from .environment import engine_downloads
from .recipes import Machine, Verdict, isq_choice, plan

if TYPE_CHECKING:
    from ..models.download import Downloader
    from ..models.hub import HubFetcher

# Said to users who installed the gateway (`mistral-gateway` on their PATH) and to users of a checkout who ran
# `make run` (the command is in the checkout's .venv, not on their PATH): both forms are named.
OFFLINE_HELP = (
    "To serve it: once this machine is online, run `mistral-gateway pull` (in a checkout started with `make run`: "
    "`.venv/bin/mistral-gateway pull`); or set HF_ENDPOINT to a Hugging Face mirror, or HTTPS_PROXY (and NO_PROXY) "
    "if the network needs a proxy; or copy the file here and give the model a local `path` in a models file "
    "(GATEWAY_MODELS_FILE)."
)
# Weights take about their file's size in memory; the engine's own state (KV cache, runtime) comes on top.
ESTIMATE_FACTOR = 1.1
_log = logging.getLogger("gateway.engine")


class Preparer:
    """Downloads and fetches, for every engine of the gateway (one downloader and one hub client, made when first
    needed). Without a ``downloader`` factory nothing is fetched and every model is left to the engine."""

    def __init__(
        self,
        settings: Settings,
        *,
        downloader: Callable[[], Downloader] | None = None,
        hub: Callable[[], HubFetcher] | None = None,
        events: EventSink | None = None,
        machine: Machine | None = None,
    ) -> None:
        self._settings = settings
        self._events: EventSink = events or NullSink()
        self._machine = machine or Machine.detect(cpu_only=True)
        self._converting: dict[Path, asyncio.Future[Path]] = {}  # one conversion of a file, however many wait
        self._make_downloader = downloader
        self._make_hub = hub or self._default_hub
        self._downloader: Downloader | None = None
        self._hub: HubFetcher | None = None

    async def prepare(self, catalog: Catalog, token_source: str | None) -> Catalog:
        """The catalog to start an engine with, once every file of its models is local and in a fast type."""
        folders = await self._download(catalog)
        prepared = engine_catalog(catalog, folders, token_source)
        _check_files(prepared)
        fast = await self._fast(prepared)
        for model, _, warning in self.isq_plans(fast):
            if warning is not None:
                _log.warning("model %s: %s", model.id, warning)
        return self.with_isq(fast)

    def verdicts(self, catalog: Catalog) -> list[tuple[Model, Verdict]]:
        """For each GGUF model whose file is here: its weight type and what is served (start-up log, `check`)."""
        out = []
        for model in catalog.models:
            path = _local_path(model, self._settings.model_dir)
            if model.kind != "gguf" or path is None or not path.is_file():
                continue
            try:
                weight_type = read_gguf(path).weight_type()
            except (OSError, NotGGUF):
                continue
            out.append((model, plan(weight_type, self._machine, wanted=model.entry.options.quant)))
        return out

    def isq_plans(self, catalog: Catalog) -> list[tuple[Model, str, str | None]]:
        """For each model quantized in situ: the type the engine is asked for (``isq = "auto"`` resolved for this
        machine) and a warning when the engine would not quantize every layer to it (start-up log, `check`)."""
        out = []
        for model in catalog.models:
            requested = model.entry.options.isq
            if requested is None:
                continue
            chosen, warning = isq_choice(requested, _linear_widths(model, self._settings.model_dir), self._machine)
            out.append((model, chosen, warning))
        return out

    def with_isq(self, catalog: Catalog) -> Catalog:
        """The catalog with each model's ``isq`` as the engine is to be asked for it (see :meth:`isq_plans`)."""
        resolved = {}
        for model, chosen, _ in self.isq_plans(catalog):
            if chosen != model.entry.options.isq:
                options = model.entry.options.model_copy(update={"isq": chosen})
                resolved[model.id] = replace(model, entry=model.entry.model_copy(update={"options": options}))
        if not resolved:
            return catalog
        return replace(catalog, models=tuple(resolved.get(model.id, model) for model in catalog.models))

    def advice(self, model: Model, verdict: Verdict) -> str:
        """What the log and `mistral-gateway check` say about a model whose file is slow here."""
        if verdict.serve_as is None:
            return verdict.why
        folder = self._settings.model_dir / "converted"
        return (
            f"{verdict.why} (converted once, at its first start, into {folder}; `mistral-gateway convert "
            f'{model.id}` does it now; quant = "as-is" in its [models.options] serves the file as it is)'
        )

    async def _fast(self, catalog: Catalog) -> Catalog:
        """The catalog with each slow GGUF replaced by its converted copy (made now if it is not there yet)."""
        models = []
        for model, verdict in self.verdicts(catalog):
            if verdict.serve_as is None or not model.source.filename:
                models.append(model)
                continue
            source = Path(model.source.model_id) / model.source.filename
            only_slow = model.entry.options.quant == "auto"
            converted = await self.converted(source, verdict.serve_as, model.id, only_slow=only_slow)
            models.append(
                replace(model, source=replace(model.source, model_id=str(converted.parent), filename=converted.name))
            )
        by_id = {model.id: model for model in models}
        return replace(catalog, models=tuple(by_id.get(model.id, model) for model in catalog.models))

    async def converted(self, source: Path, target: str, model_id: str, *, only_slow: bool = True) -> Path:
        """``source`` with its weights in ``target``: converted once into the model dir's ``converted`` folder."""
        from ..models.convert import converted_name

        folder = self._settings.model_dir / "converted"
        path = folder / converted_name(source, target)
        escaped = outside(self._settings.model_dir, path)
        if escaped is not None:
            raise EngineStartFailed(
                f"Model {model_id!r}: its converted copy {path} would be written to {escaped}, outside the model dir, "
                "through a symbolic link. Remove the link."
            )
        if path.is_file() and path.stat().st_mtime >= source.stat().st_mtime:
            return path
        running = self._converting.get(path)
        if running is None:
            running = self._converting[path] = asyncio.ensure_future(
                self._convert(source, path, target, model_id, only_slow=only_slow)
            )
            running.add_done_callback(lambda _: self._converting.pop(path, None))
        return await asyncio.shield(running)

    async def _convert(self, source: Path, path: Path, target: str, model_id: str, *, only_slow: bool) -> Path:
        from ..models.convert import convert

        path.parent.mkdir(parents=True, exist_ok=True)
        file = path.name
        loop = asyncio.get_running_loop()
        began = time.monotonic()
        self._events.publish("convert.started", file=file, source=str(source), target=target, model=model_id)
        _log.warning(
            "model %s: converting %s to %s for the engine's fast kernels (once): %s",
            model_id,
            source.name,
            target,
            path,
        )

        def progress(done: int, total: int) -> None:
            loop.call_soon_threadsafe(
                lambda: self._events.publish("convert.progress", file=file, bytes=done, total=total)
            )

        try:
            result = await asyncio.to_thread(convert, source, path, target, only_slow=only_slow, progress=progress)
        except (OSError, ValueError) as exc:
            self._events.publish("convert.failed", file=file, error=str(exc))
            raise EngineStartFailed(f"Model {model_id!r}: converting {source.name} to {target} failed: {exc}") from exc
        seconds = round(time.monotonic() - began, 2)
        self._events.publish("convert.done", file=file, path=str(path), bytes=result.bytes, seconds=seconds)
        return path

    def estimate_mb(self, models: tuple[Model, ...]) -> float | None:
        """What the models' files weigh (times ESTIMATE_FACTOR), when all of them are on this machine already."""
        total = 0
        for model in models:
            size = _local_size(model, self._settings.model_dir)
            if size is None:
                return None
            total += size
        return round(total * ESTIMATE_FACTOR / (1 << 20), 1)

    def local_bytes(self, model: Model) -> int | None:
        return _local_size(model, self._settings.model_dir)

    def local_mtime(self, model: Model) -> float | None:
        path = _local_path(model, self._settings.model_dir)
        return path.stat().st_mtime if path is not None and path.exists() else None

    async def aclose(self) -> None:
        if self._downloader is not None:
            await self._downloader.aclose()

    async def _download(self, catalog: Catalog) -> dict[str, Path]:
        wanted = [m for m in catalog.models if m.entry.url]
        repos = [m for m in catalog.models if not m.source.local and m.entry.prefetch]
        if not (wanted or repos) or self._make_downloader is None:
            return {}
        from ..models.errors import DownloadError  # loaded only by models that need it

        folders: dict[str, Path] = {}
        for model in [*wanted, *repos]:
            try:
                if model.entry.url:
                    self._downloader = self._downloader or self._make_downloader()
                    await self._downloader.ensure_model(model.entry)
                else:
                    self._hub = self._hub or self._make_hub()
                    folders[model.id] = await self._hub.ensure_model(model)
            except DownloadError as exc:
                reason = exc.message if exc.message.endswith(".") else exc.message + "."
                advice = f" {OFFLINE_HELP}" if exc.network else ""
                raise ModelDownloadFailed(f"Model {model.id!r} could not be downloaded: {reason}{advice}") from exc
        return folders

    def _default_hub(self) -> HubFetcher:
        from ..models.hub import HubFetcher

        token = self._settings.hf_token
        return HubFetcher(
            self._settings.model_dir, token=token.get_secret_value() if token else None, events=self._events
        )


def engine_catalog(catalog: Catalog, folders: Mapping[str, Path], token_source: str | None) -> Catalog:
    """The catalog an engine is started with: prefetched repo models load from their local folder (clients still
    see the configured ids), and the token source, unless the models file names one or the engine downloads nothing
    itself (then it gets no token at all)."""

    def local(model: Model) -> Model:
        folder = folders.get(model.id)
        if folder is None:
            return model
        return replace(model, source=replace(model.source, model_id=str(folder.resolve()), local=True))

    prepared = replace(catalog, models=tuple(local(m) for m in catalog.models))
    engine = catalog.engine
    if token_source is not None and engine.token_source is None and engine_downloads(prepared):
        engine = engine.model_copy(update={"token_source": token_source})
    return replace(prepared, engine=engine)


def _check_files(catalog: Catalog) -> None:
    for model in catalog.models:
        if not model.source.local:
            continue
        path = Path(model.source.model_id)
        if model.source.filename:
            path = path / model.source.filename
        if not path.exists():
            origin = f" from {model.entry.url}" if model.entry.url else ""
            raise EngineStartFailed(
                f"Model {model.id!r}: its file {str(path)!r} is missing. Download it{origin} to that path."
            )


def _local_path(model: Model, model_dir: Path) -> Path | None:
    """Where a model's file (or folder) is on this machine once it is here; None for repos the engine fetches."""
    source = model.source
    if source.local:
        return Path(source.model_id) / source.filename if source.filename else Path(source.model_id)
    if model.entry.prefetch:
        path = model_dir / source.model_id  # where a repo snapshot goes (gateway/models/hub.py)
        return path / source.filename if source.filename else path
    return None


def _linear_widths(model: Model, model_dir: Path) -> list[int]:
    """The input widths of a model's linear layers, from its config.json when its folder is here (empty when not):
    the hidden size (attention and MLP inputs), the attention output's, and the MLP's intermediate size."""
    path = _local_path(model, model_dir)
    if path is None or not path.is_dir():
        return []
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    config = config.get("text_config", config) if isinstance(config, dict) else {}
    widths = [config.get(key) for key in ("hidden_size", "intermediate_size", "moe_intermediate_size")]
    heads, head_dim = config.get("num_attention_heads"), config.get("head_dim")
    if isinstance(heads, int) and isinstance(head_dim, int):
        widths.append(heads * head_dim)
    return [w for w in widths if isinstance(w, int) and w > 0]


def _local_size(model: Model, model_dir: Path) -> int | None:
    """Bytes of a model's files on this machine, or None when they are not all here yet."""
    path = _local_path(model, model_dir)
    if path is None:
        return None
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        sizes = [f.stat().st_size for f in path.rglob("*") if f.is_file() and ".cache" not in f.parts]
        return sum(sizes) if sizes else None
    return None

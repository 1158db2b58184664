"""Getting models ready to load: files downloaded, Hugging Face repos fetched, paths checked.

Before an engine starts, :class:`Preparer` makes every file its models need local (``url`` files with resume and
checks, ``repo`` snapshots with huggingface_hub; what is complete locally costs nothing) and returns the catalog
the engine is started with: prefetched repos load from their folder, under the ids clients use. A download that
fails is a :class:`~gateway.errors.ModelDownloadFailed` that says what to do about it. It also estimates what a
model will take in memory from its files, for the pool's budget before the engine has loaded it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..catalog import Catalog, Model
from ..errors import EngineStartFailed, ModelDownloadFailed
from ..events import EventSink, NullSink
from ..settings import Settings

if TYPE_CHECKING:
    from ..models.download import Downloader
    from ..models.hub import HubFetcher

OFFLINE_HELP = (
    "To serve it: run `mistral-gateway pull` once this machine is online; or set HF_ENDPOINT to a Hugging Face "
    "mirror, or HTTPS_PROXY (and NO_PROXY) if the network needs a proxy; or copy the file here and give the model "
    "a local `path` in a models file (GATEWAY_MODELS_FILE)."
)
# Weights take about their file's size in memory; the engine's own state (KV cache, runtime) comes on top.
ESTIMATE_FACTOR = 1.1


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
    ) -> None:
        self._settings = settings
        self._events: EventSink = events or NullSink()
        self._make_downloader = downloader
        self._make_hub = hub or self._default_hub
        self._downloader: Downloader | None = None
        self._hub: HubFetcher | None = None

    async def prepare(self, catalog: Catalog, token_source: str | None) -> Catalog:
        """The catalog to start an engine with, once every file of its models is local."""
        folders = await self._download(catalog)
        prepared = engine_catalog(catalog, folders, token_source)
        _check_files(prepared)
        return prepared

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
    see the configured ids), and the token source, unless the models file names one."""

    def local(model: Model) -> Model:
        folder = folders.get(model.id)
        if folder is None:
            return model
        return replace(model, source=replace(model.source, model_id=str(folder.resolve()), local=True))

    models = tuple(local(m) for m in catalog.models)
    engine = catalog.engine
    if token_source is not None and engine.token_source is None:
        engine = engine.model_copy(update={"token_source": token_source})
    return replace(catalog, models=models, engine=engine)


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

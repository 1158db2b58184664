"""The models file (TOML): what models exist, where they come from, which one is the default.

The schema is a contract with users: fields may be added, never changed. Everything about it is
checked at start-up so that a broken file stops the gateway with one clear message, instead of an
engine that fails minutes later on the first request.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError

ModelKind = Literal["plain", "gguf", "vision-plain", "diffusion", "embedding", "speech"]
KINDS: tuple[str, ...] = ("plain", "gguf", "vision-plain", "diffusion", "embedding", "speech")
CHAT_KINDS = frozenset({"plain", "gguf", "vision-plain"})


class ModelOptions(BaseModel):
    """Per-model engine options; each maps to one engine flag or multi-model config field."""

    model_config = ConfigDict(extra="forbid")

    arch: str | None = None
    dtype: str | None = None
    max_seq_len: int | None = Field(None, gt=0)
    max_batch_size: int | None = Field(None, gt=0)
    isq: str | None = None
    from_uqff: str | None = None
    max_num_images: int | None = Field(None, gt=0)
    max_image_length: int | None = Field(None, gt=0)
    # Embedding models: whether vectors may be truncated to `dimensions` (default: yes for Qwen3-Embedding).
    matryoshka: bool | None = None
    # GGUF models: the weight type to serve. "auto": the file as it is when the engine is fast with its type on this
    # machine, else a copy converted once to Q8_0 (gateway/engine/recipes.py); "as-is": the file as it is;
    # "Q8_0" or "Q4_0": that type, converted once when the file is of another.
    quant: Literal["auto", "as-is", "Q8_0", "Q4_0"] = "auto"


class EngineOptions(BaseModel):
    """The ``[engine]`` table: options for the whole engine process."""

    model_config = ConfigDict(extra="forbid")

    max_seqs: int | None = Field(None, gt=0)
    paged_attn: bool | None = None
    cpu: bool = False
    enable_thinking: bool | None = None
    token_source: str | None = None
    mcp_config: str | None = None

    @field_validator("token_source")
    @classmethod
    def _token_source_form(cls, value: str | None) -> str | None:
        if value is not None and value not in ("cache", "none") and not value.startswith(("literal:", "env:", "path:")):
            raise ValueError("use cache, none, env:VAR, path:FILE or literal:TOKEN")
        if value is not None and value.upper().startswith("ENV:GATEWAY_"):
            # Engines never see the gateway's settings (gateway/engine/environment.py).
            raise ValueError(
                "engines never get GATEWAY_* variables; use env:HF_TOKEN (GATEWAY_HF_TOKEN is passed as it)"
            )
        return value


class ModelEntry(BaseModel):
    """One ``[[models]]`` table."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    kind: ModelKind
    path: str | None = None
    url: str | None = None
    file: str | None = None
    sha256: str | None = None
    repo: str | None = None
    revision: str | None = None
    # Hugging Face repos: the files to fetch (glob patterns, as huggingface_hub's allow_patterns; default: all of
    # them, or only `file` for GGUF), and whether the gateway fetches them before the engine starts (true) or the
    # engine fetches the repo itself (false).
    files: list[str] = Field(default_factory=list)
    prefetch: bool = True
    tokenizer: str | None = None
    aliases: list[str] = Field(default_factory=list)
    options: ModelOptions = Field(default_factory=ModelOptions)
    # Its engine's life: seconds without requests before it stops (0: never; default GATEWAY_IDLE_TIMEOUT), the
    # memory it takes (MB; default: measured once loaded), whether eviction may stop it, whether it starts with
    # the gateway.
    ttl: float | None = Field(None, ge=0)
    memory_mb: float | None = Field(None, gt=0)
    persistent: bool = False
    preload: bool = False

    @field_validator("aliases")
    @classmethod
    def _aliases_not_blank(cls, value: list[str]) -> list[str]:
        if any(not alias.strip() for alias in value):
            raise ValueError("an alias is empty")
        return value


class GroupEntry(BaseModel):
    """One ``[[groups]]`` table: models that belong together."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    models: list[str] = Field(min_length=1)
    share_engine: bool = False  # one engine process serves every member (mistral.rs's multi-model mode)
    exclusive: bool = False  # at most one member runs at a time: a request for another swaps them
    preload: bool = False


class ModelsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default_model: str | None = None
    default_embedding_model: str | None = None
    engine: EngineOptions = Field(default_factory=EngineOptions)
    models: list[ModelEntry] = Field(min_length=1)
    groups: list[GroupEntry] = Field(default_factory=list)


@dataclass(frozen=True)
class ModelSource:
    """Where the engine loads a model from, in the engine's own terms.

    ``model_id`` is a local folder or file, or a Hugging Face repository; for GGUF, ``filename`` is the
    file inside it (the engine cannot take the path of a GGUF file as its model id).
    """

    model_id: str
    filename: str | None
    tokenizer: str | None
    local: bool

    @property
    def engine_id(self) -> str:
        """The id the engine answers to (its pipeline name): the tokenizer for GGUF when given."""
        if self.filename is not None and self.tokenizer:
            return self.tokenizer
        return self.model_id


@dataclass(frozen=True)
class Model:
    """A configured model, resolved against the model directory."""

    entry: ModelEntry
    source: ModelSource

    @property
    def id(self) -> str:
        return self.entry.id

    @property
    def kind(self) -> str:
        return self.entry.kind

    @property
    def engine_id(self) -> str:
        return self.source.engine_id

    @property
    def quantized(self) -> bool:
        """Quantized weights: batched prefill of such models fails in mistral.rs ("not contiguous")."""
        opts = self.entry.options
        if opts.isq or opts.from_uqff:
            return True
        return self.kind == "gguf" and quantized_gguf(self.source.filename or "")


_UNQUANTIZED_GGUF = re.compile(r"(?i)(^|[-_.])(f32|f16|bf16)([-_.]|$)")


def quantized_gguf(filename: str) -> bool:
    """Whether a GGUF file holds quantized weights, by the type its name states (F32, F16, BF16 are not)."""
    return not _UNQUANTIZED_GGUF.search(filename.rsplit(".", 1)[0])


@dataclass(frozen=True)
class Unit:
    """What one engine process serves: a model, or the members of a group with ``share_engine``.

    ``exclusive``: the name of the exclusive group the unit belongs to (at most one of its units runs at a time).
    """

    name: str
    models: tuple[Model, ...]
    exclusive: str | None = None
    preload: bool = False

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(model.id for model in self.models)

    @property
    def persistent(self) -> bool:
        """Never stopped to make room for another model (the idle stop still applies)."""
        return any(model.entry.persistent for model in self.models)

    @property
    def memory_mb(self) -> float | None:
        """What the models file declares the unit takes; None unless every member declares it."""
        declared = [model.entry.memory_mb for model in self.models]
        return sum(d for d in declared if d is not None) if all(d is not None for d in declared) else None

    def ttl(self, default: float) -> float:
        """Seconds idle before the engine stops (0: never): the longest of its members', any 0 meaning never."""
        ttls = [default if model.entry.ttl is None else model.entry.ttl for model in self.models]
        return 0.0 if 0 in ttls else max(ttls)


@dataclass(frozen=True)
class Catalog:
    """The resolved models file: lookups by id or alias, the defaults, and what each engine process serves."""

    models: tuple[Model, ...]
    default_model: str | None
    default_embedding_model: str | None
    origin: str
    engine: EngineOptions = field(default_factory=EngineOptions)
    units: tuple[Unit, ...] = ()

    def __post_init__(self) -> None:
        if not self.units:  # a catalog built by hand (tests, engine_catalog): one engine per model
            object.__setattr__(self, "units", tuple(Unit(m.id, (m,), preload=m.entry.preload) for m in self.models))

    def unit_of(self, model_id: str) -> Unit:
        return next(unit for unit in self.units if model_id in unit.ids)

    def only(self, ids: Iterable[str]) -> Catalog:
        """The same catalog restricted to some models: what one engine process is started with."""
        wanted = set(ids)
        models = tuple(m for m in self.models if m.id in wanted)
        default = self.default_model if self.default_model in wanted else None
        embedding = self.default_embedding_model if self.default_embedding_model in wanted else None
        return replace(
            self,
            models=models,
            default_model=default,
            default_embedding_model=embedding,
            units=(Unit("+".join(sorted(wanted)), models),),
        )

    def find(self, name: str) -> Model | None:
        for model in self.models:
            if model.id == name or name in model.entry.aliases:
                return model
        return None

    def default_for(self, kinds: Iterable[str]) -> str | None:
        """The default model for a route that serves ``kinds``."""
        wanted = set(kinds)
        if wanted & CHAT_KINDS and self.default_model:
            return self.default_model
        if "embedding" in wanted and self.default_embedding_model:
            return self.default_embedding_model
        return next((m.id for m in self.models if m.kind in wanted), None)


# The pair the origin 4D component shipped, the chat model in a weight type the engine is fast with on every machine
# (Q8_0: vectorized kernels on x86 and ARM CPUs and on GPUs; the Q5_K_M file of old prefilled 3x slower on a CPU):
# the GGUF is downloaded into the model dir by the gateway (with progress, resume and checks), the embedding model's
# Hugging Face repo is snapshotted there by the gateway too.
BUILTIN_MODELS = """
default_model = "Qwen/Qwen3-1.7B"
default_embedding_model = "Qwen/Qwen3-Embedding-0.6B"

[[models]]
id = "Qwen/Qwen3-1.7B"
kind = "gguf"
url = "https://huggingface.co/unsloth/Qwen3-1.7B-GGUF/resolve/main/Qwen3-1.7B-Q8_0.gguf"
file = "Qwen/Qwen3-1.7B-Q8_0.gguf"
tokenizer = "Qwen/Qwen3-1.7B"

[[models]]
id = "Qwen/Qwen3-Embedding-0.6B"
kind = "embedding"
[models.options]
arch = "qwen3embedding"
"""


def load_catalog(path: Path | None, *, model_dir: Path, default_model: str | None = None) -> Catalog:
    """Read and check the models file at ``path``, or the built-in default when ``path`` is None."""
    if path is None:
        text, origin = BUILTIN_MODELS, "the built-in default models"
    else:
        origin = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"{path}: cannot read the models file ({exc.strerror}). "
                "Fix: point GATEWAY_MODELS_FILE at an existing TOML file."
            ) from exc
    return parse_catalog(text, origin=origin, model_dir=model_dir, default_model=default_model)


def parse_catalog(text: str, *, origin: str, model_dir: Path, default_model: str | None = None) -> Catalog:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{origin}: not valid TOML: {exc}. Fix the syntax at that line.") from exc
    try:
        parsed = ModelsFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe_validation_error(origin, raw, exc)) from exc

    models = tuple(Model(entry, _resolve_source(origin, entry, model_dir)) for entry in parsed.models)
    _check_unique_names(origin, models)
    default = default_model or parsed.default_model
    catalog = Catalog(
        models=models,
        default_model=None,
        default_embedding_model=None,
        origin=origin,
    )
    chat = _check_default(origin, catalog, default, "default_model", CHAT_KINDS | {"diffusion", "speech"})
    embed = _check_default(
        origin, catalog, parsed.default_embedding_model, "default_embedding_model", frozenset({"embedding"})
    )
    engine = parsed.engine
    if engine.paged_attn and engine.cpu:
        raise ConfigError(f"{origin}: [engine]: paged_attn = true cannot be used with cpu = true; drop one.")
    if engine.mcp_config is not None:
        mcp = Path(engine.mcp_config).expanduser()
        if not mcp.is_absolute() and Path(origin).is_file():
            mcp = Path(origin).parent / mcp
        if not mcp.is_file():
            raise ConfigError(f"{origin}: [engine]: mcp_config {str(mcp)!r} does not exist. Fix the path.")
        engine = engine.model_copy(update={"mcp_config": str(mcp.resolve())})
    for model in models:
        if model.kind in ("diffusion", "speech") and not model.entry.options.arch:
            example = "flux" if model.kind == "diffusion" else "dia"
            raise ConfigError(
                f"{origin}: [[models]] id = {model.id!r}: a {model.kind} model needs its architecture; "
                f'add [models.options] arch = "{example}".'
            )
    return Catalog(
        models=models,
        default_model=chat or next((m.id for m in models if m.kind in CHAT_KINDS), None),
        default_embedding_model=embed or next((m.id for m in models if m.kind == "embedding"), None),
        origin=origin,
        engine=engine,
        units=_units(origin, models, parsed.groups),
    )


def _units(origin: str, models: tuple[Model, ...], groups: list[GroupEntry]) -> tuple[Unit, ...]:
    """One engine per model, except for groups that share one; every model in at most one group."""
    by_name = {name: model for model in models for name in (model.id, *model.entry.aliases)}
    grouped: dict[str, str] = {}
    names: set[str] = set()
    units: list[Unit] = []
    for group in groups:
        where = f"{origin}: [[groups]] name = {group.name!r}"
        if group.name in names or group.name in by_name:
            raise ConfigError(f"{where}: the name is already used by another group or a model. Fix: rename it.")
        names.add(group.name)
        if group.share_engine and group.exclusive:
            raise ConfigError(
                f"{where}: share_engine and exclusive exclude each other (members that share one "
                "engine always run together). Fix: drop one."
            )
        members: list[Model] = []
        for name in group.models:
            model = by_name.get(name)
            if model is None:
                raise ConfigError(f"{where}: {name!r} names no model. Fix: use the id of a [[models]] entry.")
            if model.id in grouped:
                raise ConfigError(
                    f"{where}: the model {model.id!r} is already in the group {grouped[model.id]!r}. "
                    "Fix: put every model in one group at most."
                )
            grouped[model.id] = group.name
            members.append(model)
        preload = group.preload or any(m.entry.preload for m in members)
        if group.share_engine:
            units.append(Unit(group.name, tuple(members), preload=preload))
        else:
            exclusive = group.name if group.exclusive else None
            units += [Unit(m.id, (m,), exclusive, group.preload or m.entry.preload) for m in members]
    units += [Unit(m.id, (m,), preload=m.entry.preload) for m in models if m.id not in grouped]
    order = {model.id: i for i, model in enumerate(models)}
    return tuple(sorted(units, key=lambda unit: min(order[i] for i in unit.ids)))


def _entry_label(raw: dict[str, Any], index: int) -> str:
    models = raw.get("models")
    if isinstance(models, list) and index < len(models) and isinstance(models[index], dict):
        model_id = models[index].get("id")
        if isinstance(model_id, str):
            return f"[[models]] #{index + 1} (id = {model_id!r})"
    return f"[[models]] #{index + 1}"


def _describe_validation_error(origin: str, raw: dict[str, Any], exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        loc = list(err["loc"])
        where = "top level"
        if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int):
            where = _entry_label(raw, loc[1])
            loc = loc[2:]
        elif loc and loc[0] == "engine":
            where = "[engine]"
            loc = loc[1:]
        field = ".".join(str(part) for part in loc) or "(entry)"
        if err["type"] == "literal_error" and field == "kind":
            fix = f"use one of: {', '.join(KINDS)}"
            problems.append(f"{where}: unknown kind {err['input']!r}; {fix}")
        elif err["type"] == "extra_forbidden":
            problems.append(f"{where}: unknown key {field!r}; remove it or check its spelling")
        elif err["type"] == "missing":
            problems.append(f"{where}: {field!r} is required; add it")
        else:
            problems.append(f"{where}: {field}: {err['msg']}")
    return f"{origin}: " + "; ".join(problems)


def relative_name(name: str) -> bool:
    """Whether ``name`` (a models file's ``file``, a repo's file) names something inside a folder: not empty, not
    absolute, no ``..`` part, no backslash (a Windows path, which means something else here)."""
    path = Path(name)
    return bool(name.strip()) and not path.is_absolute() and ".." not in path.parts and "\\" not in name


# A Hugging Face repo id: a name, or owner/name, of letters, digits, '-', '_' and '.' (the hub refuses '..').
_REPO_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*", re.ASCII)


def _check_names(where: str, entry: ModelEntry) -> None:
    """The names a download writes under (``file``, ``files``, the repo's folder) stay inside the model dir: they are
    refused here, at start, rather than when a download would use them."""
    if entry.file is not None and not relative_name(entry.file):
        inside = "the model dir (GATEWAY_MODEL_DIR)" if entry.url else "its folder or repository"
        raise ConfigError(
            f"{where}: file = {entry.file!r} must name a file inside {inside}: a relative name, without '..', "
            "a leading '/' or a backslash."
        )
    for pattern in entry.files:
        if not relative_name(pattern):
            raise ConfigError(
                f"{where}: files entry {pattern!r} must select files inside the repository: a relative pattern, "
                "without '..', a leading '/' or a backslash."
            )
    if not (entry.path or entry.url):
        repo = entry.repo or entry.id
        if not _REPO_ID.fullmatch(repo) or ".." in repo:
            key = "repo" if entry.repo else "id (the Hugging Face repo, as the model has no path, url or repo)"
            raise ConfigError(
                f"{where}: {key} {repo!r} is not a Hugging Face repository id such as 'owner/name' (letters, digits, "
                "'-', '_' and '.'). Fix it, or give the model a local `path`."
            )


def _resolve_source(origin: str, entry: ModelEntry, model_dir: Path) -> ModelSource:
    where = f"{origin}: [[models]] id = {entry.id!r}"
    _check_names(where, entry)
    sources = [name for name in ("path", "url", "repo") if getattr(entry, name)]
    if len(sources) > 1:
        raise ConfigError(f"{where}: give only one of path, url or repo (found {', '.join(sources)}).")
    if entry.url and not entry.file:
        raise ConfigError(f"{where}: `url` needs `file`, the name to save it under in the model dir.")
    if entry.files and (entry.path or entry.url):
        raise ConfigError(f"{where}: `files` selects files of a Hugging Face `repo`; remove it, or use `repo`.")

    if entry.path or entry.url:
        if entry.path:
            path = Path(entry.path).expanduser()
            if not path.is_absolute():
                path = (Path(origin).parent if Path(origin).is_file() else Path.cwd()) / path
        else:
            path = model_dir / str(entry.file)
        if entry.path and not path.exists():
            raise ConfigError(f"{where}: path {str(path)!r} does not exist. Fix the path or download the model.")
        if entry.kind == "gguf":
            if path.is_dir():
                if not entry.file:
                    raise ConfigError(f"{where}: path is a folder; add `file`, the GGUF file inside it.")
                folder, filename = path, str(entry.file)
            else:
                folder, filename = path.parent, path.name
            return ModelSource(str(folder.resolve()), filename, entry.tokenizer, local=True)
        if entry.kind == "embedding" and path.suffix == ".gguf":
            raise ConfigError(
                f"{where}: mistral.rs cannot embed with a GGUF model; use the safetensors form "
                "(a folder with config.json and model.safetensors, e.g. Qwen/Qwen3-Embedding-0.6B)."
            )
        return ModelSource(str(path.resolve()), None, entry.tokenizer, local=True)

    repo = entry.repo or entry.id
    if entry.kind == "gguf":
        if not entry.file:
            raise ConfigError(f"{where}: a GGUF model from a repository needs `file`, the .gguf file in it.")
        return ModelSource(repo, entry.file, entry.tokenizer, local=False)
    if entry.kind == "embedding" and (entry.file or "").endswith(".gguf"):
        raise ConfigError(f"{where}: mistral.rs cannot embed with a GGUF model; use the safetensors repo.")
    return ModelSource(repo, None, entry.tokenizer, local=False)


def _check_unique_names(origin: str, models: tuple[Model, ...]) -> None:
    owner: dict[str, str] = {}
    for model in models:
        for name in (model.id, *model.entry.aliases):
            if name in owner:
                first = owner[name]
                raise ConfigError(
                    f"{origin}: [[models]] id = {model.id!r}: the name {name!r} is already used by "
                    f"[[models]] id = {first!r}. Fix: give every model and alias a distinct name."
                )
            owner[name] = model.id


def _check_default(origin: str, catalog: Catalog, name: str | None, key: str, kinds: frozenset[str]) -> str | None:
    if name is None:
        return None
    model = catalog.find(name)
    if model is None:
        known = ", ".join(m.id for m in catalog.models)
        raise ConfigError(f"{origin}: {key} = {name!r} names no model. Fix: use one of: {known}.")
    if model.kind not in kinds:
        raise ConfigError(
            f"{origin}: {key} = {name!r} is a {model.kind} model. Fix: name a model of kind "
            f"{' or '.join(sorted(kinds))}."
        )
    return model.id

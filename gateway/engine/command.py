"""Pure builders of the engine's command line, for both of its dialects.

Nothing here touches the disk or the network: a builder returns the argument vector, the contents of
any config file it refers to, and which ids the engine will answer to for each configured model. Every
flag and config field was checked against mistral.rs's own argument definitions; the table in
tests/unit/test_command.py records the versions.

- ``legacy``: ``mistralrs-server`` 0.7 - 0.8.4 (and the bundled engine server, which speaks it). Global
  flags come before the subcommand. Several models go through ``multi-model`` with a JSON config in
  which every entry carries ``alias = <configured id>``, so the engine answers to our ids exactly.
- ``serve``: ``mistralrs`` 0.7+. One model: ``mistralrs serve [server flags] TYPE [model flags]``;
  several: ``mistralrs from-config --file X.toml``. This dialect has no aliases, so the engine's ids
  are predicted (they changed for GGUF in 0.9.1) and confirmed from its ``/v1/models`` once it is up.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..catalog import Catalog, Model
from .discovery import EngineProgram

# The variant key of the legacy multi-model JSON and the serde fields it requires (no serde default):
# a missing one aborts the engine's start-up with "missing field".
_DEFAULTS = {"dtype": "auto", "max_seq_len": 4096, "max_batch_size": 1, "max_num_images": 1, "max_image_length": 1024}
_REQUIRED_JSON_FIELDS = {
    "plain": (),
    "embedding": (),
    "gguf": ("dtype", "max_seq_len", "max_batch_size"),
    "vision-plain": ("dtype", "max_seq_len", "max_batch_size", "max_num_images", "max_image_length"),
    "diffusion": ("dtype",),
    "speech": ("dtype",),
}
# Kinds that take --max-seq-len / --max-batch-size (embedding, diffusion and speech refuse them).
_SEQ_KINDS = frozenset({"plain", "gguf", "vision-plain"})
_UQFF_KINDS = frozenset({"plain", "vision-plain", "embedding"})

MULTI_MODEL_CONFIG = "multi-model.json"
FROM_CONFIG_FILE = "mistralrs.toml"


@dataclass(frozen=True)
class EngineCommand:
    """An engine invocation.

    ``files`` maps file names in the run folder to their text. ``engine_ids`` maps each configured model
    id to the ids the engine may answer to for it, the likeliest first.
    """

    argv: list[str]
    files: dict[str, str] = field(default_factory=dict)
    engine_ids: dict[str, tuple[str, ...]] = field(default_factory=dict)


class CommandError(ValueError):
    """The models cannot be expressed on this engine's command line; the message says why and what to do."""


def build_command(
    program: EngineProgram,
    catalog: Catalog,
    *,
    port: int,
    run_dir: str,
    extra_args: Sequence[str] = (),
) -> EngineCommand:
    """The command that serves every model of ``catalog`` on 127.0.0.1:``port``."""
    if program.dialect == "legacy":
        return _legacy(program, catalog, port=port, run_dir=run_dir, extra_args=extra_args)
    return _serve(program, catalog, port=port, run_dir=run_dir, extra_args=extra_args)


def _before(program: EngineProgram, version: tuple[int, int, int]) -> bool:
    """True when the program is known to be older than ``version`` (unknown: assume the newest)."""
    return program.version is not None and program.version < version


def effective_max_seqs(program: EngineProgram, catalog: Catalog) -> int | None:
    """``[engine] max_seqs``, or 1 for an engine binary serving quantized weights.

    Batched prefill of quantized weights fails in mistral.rs ("input tensor is not contiguous"); the
    bundled engine avoids it by letting one request at a time prefill, but a binary can only be told to
    run one sequence at a time. An explicit ``max_seqs`` is the operator's choice and is kept.
    """
    if catalog.engine.max_seqs is not None:
        return catalog.engine.max_seqs
    if program.name != "bundled" and any(m.quantized for m in catalog.models):
        return 1
    return None


def _legacy_engine_flags(program: EngineProgram, catalog: Catalog) -> list[str]:
    opts = catalog.engine
    flags: list[str] = []
    max_seqs = effective_max_seqs(program, catalog)
    if max_seqs is not None:
        flags += ["--max-seqs", str(max_seqs)]
    if opts.paged_attn is not None:
        flags.append("--paged-attn" if opts.paged_attn else "--no-paged-attn")
    if opts.cpu:
        flags.append("--cpu")
    if opts.token_source:
        flags += ["--token-source", opts.token_source]
    if opts.mcp_config:
        flags += ["--mcp-config", opts.mcp_config]
    return flags


def _default_model(catalog: Catalog) -> Model:
    name = catalog.default_model or catalog.default_embedding_model or catalog.models[0].id
    model = catalog.find(name)
    assert model is not None  # the catalog checked its defaults
    return model


# ---------------------------------------------------------------------------------------------- legacy


def _legacy(
    program: EngineProgram, catalog: Catalog, *, port: int, run_dir: str, extra_args: Sequence[str]
) -> EngineCommand:
    argv = [
        *program.argv,
        "--serve-ip",
        "127.0.0.1",
        "--port",
        str(port),
        *_legacy_engine_flags(program, catalog),
        *extra_args,
    ]
    vision_name = "vision-plain" if _before(program, (0, 8, 0)) else "multimodal-plain"
    if len(catalog.models) == 1:
        model = catalog.models[0]
        if model.entry.options.isq:
            argv += ["--isq", model.entry.options.isq]
        # Single-model mode sets no alias: the engine answers to its pipeline name.
        return EngineCommand(
            [*argv, *_legacy_model_args(model, vision_name)], engine_ids={model.id: (model.source.engine_id,)}
        )
    variant = "VisionPlain" if _before(program, (0, 8, 0)) else "MultimodalPlain"
    config = {f"model-{i}": _multi_model_entry(m, variant) for i, m in enumerate(catalog.models)}
    path = f"{run_dir}/{MULTI_MODEL_CONFIG}"
    argv += ["multi-model", "--config", path, "--default-model-id", _default_model(catalog).id]
    return EngineCommand(
        argv,
        {MULTI_MODEL_CONFIG: json.dumps(config, indent=2)},
        engine_ids={m.id: (m.id,) for m in catalog.models},
    )


def _legacy_model_args(model: Model, vision_name: str) -> list[str]:
    opts = model.entry.options
    src = model.source
    kind = model.kind
    if kind == "gguf":
        args = ["gguf", "--quantized-model-id", src.model_id, "--quantized-filename", str(src.filename)]
        if src.tokenizer:
            args += ["--tok-model-id", src.tokenizer]
    else:
        args = [vision_name if kind == "vision-plain" else kind, "--model-id", src.model_id]
    if opts.arch and kind != "gguf":
        args += ["--arch", opts.arch]
    if opts.dtype:
        args += ["--dtype", opts.dtype]
    if kind in _SEQ_KINDS:
        if opts.max_seq_len:
            args += ["--max-seq-len", str(opts.max_seq_len)]
        if opts.max_batch_size:
            args += ["--max-batch-size", str(opts.max_batch_size)]
    if opts.from_uqff and kind in _UQFF_KINDS:
        args += ["--from-uqff", opts.from_uqff]
    if kind == "vision-plain":
        if opts.max_num_images:
            args += ["--max-num-images", str(opts.max_num_images)]
        if opts.max_image_length:
            args += ["--max-image-length", str(opts.max_image_length)]
    return args


def _multi_model_entry(model: Model, vision_variant: str) -> dict[str, Any]:
    opts = model.entry.options
    src = model.source
    kind = model.kind
    fields: dict[str, Any]
    if kind == "gguf":
        fields = {"quantized_model_id": src.model_id, "quantized_filename": src.filename}
        if src.tokenizer:
            fields["tok_model_id"] = src.tokenizer
    else:
        fields = {"model_id": src.model_id}
        if opts.arch:
            fields["arch"] = opts.arch
    given = {
        "dtype": opts.dtype,
        "max_seq_len": opts.max_seq_len if kind in _SEQ_KINDS else None,
        "max_batch_size": opts.max_batch_size if kind in _SEQ_KINDS else None,
        "max_num_images": opts.max_num_images if kind == "vision-plain" else None,
        "max_image_length": opts.max_image_length if kind == "vision-plain" else None,
        "from_uqff": opts.from_uqff if kind in _UQFF_KINDS else None,
    }
    fields.update({k: v for k, v in given.items() if v is not None})
    for name in _REQUIRED_JSON_FIELDS[kind]:
        fields.setdefault(name, _DEFAULTS[name])
    variant = {
        "plain": "Plain",
        "gguf": "GGUF",
        "vision-plain": vision_variant,
        "diffusion": "DiffusionPlain",
        "embedding": "Embedding",
        "speech": "Speech",
    }[kind]
    entry: dict[str, Any] = {variant: fields, "alias": model.id}
    if opts.isq:
        entry["in_situ_quant"] = opts.isq
    return entry


# ----------------------------------------------------------------------------------------------- serve


def _serve_type(program: EngineProgram, kind: str) -> str:
    if kind == "vision-plain":
        return "vision" if _before(program, (0, 8, 0)) else "multimodal"
    return {"plain": "text", "gguf": "text"}.get(kind, kind)


def _serve_ids(program: EngineProgram, model: Model) -> tuple[str, ...]:
    """What ``mistralrs`` answers to: its pipeline name. For GGUF that became the -m value in 0.9.1."""
    src = model.source
    if model.kind == "gguf" and src.tokenizer:
        newest_first = (src.model_id, src.tokenizer)
        return newest_first[::-1] if _before(program, (0, 9, 1)) else newest_first
    return (src.model_id,)


def _serve(
    program: EngineProgram, catalog: Catalog, *, port: int, run_dir: str, extra_args: Sequence[str]
) -> EngineCommand:
    ids = {m.id: _serve_ids(program, m) for m in catalog.models}
    owner: dict[str, str] = {}
    for model_id, candidates in ids.items():
        for candidate in candidates:
            if candidate in owner:
                raise CommandError(
                    f"Models {owner[candidate]!r} and {model_id!r} would both load under the engine id {candidate!r}, "
                    "which `mistralrs` refuses (it has no aliases). Keep each GGUF file in a folder of its own."
                )
        owner.update(dict.fromkeys(candidates, model_id))
    opts = catalog.engine
    if len(catalog.models) == 1:
        model = catalog.models[0]
        argv = [*program.argv, "serve", "--port", str(port), "--host", "127.0.0.1"]
        max_seqs = effective_max_seqs(program, catalog)
        if max_seqs is not None:
            argv += ["--max-seqs", str(max_seqs)]
        if opts.token_source:
            argv += ["--token-source", opts.token_source]
        if opts.mcp_config:
            argv += ["--mcp-config", opts.mcp_config]
        argv += extra_args
        model_args = _serve_model_args(program, model)
        if opts.cpu:
            model_args.append("--cpu")
        if opts.paged_attn is not None and model.kind not in ("diffusion", "speech"):
            model_args += ["--paged-attn", "on" if opts.paged_attn else "off"]
        return EngineCommand([*argv, *model_args], engine_ids=ids)
    path = f"{run_dir}/{FROM_CONFIG_FILE}"
    argv = [*program.argv, "from-config", "--file", path, *extra_args]
    return EngineCommand(argv, {FROM_CONFIG_FILE: _from_config_toml(program, catalog, port)}, engine_ids=ids)


def _serve_model_args(program: EngineProgram, model: Model) -> list[str]:
    opts = model.entry.options
    src = model.source
    args = [_serve_type(program, model.kind), "--model-id", src.model_id]
    if model.kind == "gguf":
        # Without --format, releases before 0.9.1 silently ignore the file and load the folder as plain.
        args += ["--format", "gguf", "--quantized-file", str(src.filename)]
        if src.tokenizer:
            args += ["--tok-model-id", src.tokenizer]
    # -a only takes text architectures here; embedding, multimodal, diffusion and speech detect their own.
    if opts.arch and model.kind == "plain":
        args += ["--arch", opts.arch]
    if opts.dtype:
        args += ["--dtype", opts.dtype]
    if model.kind not in ("diffusion", "speech"):
        if opts.isq:
            args += ["--isq", opts.isq]
        if opts.from_uqff:
            args += ["--from-uqff", opts.from_uqff]
    if opts.max_seq_len:
        args += ["--max-seq-len", str(opts.max_seq_len)]
    if opts.max_batch_size:
        args += ["--max-batch-size", str(opts.max_batch_size)]
    if model.kind == "vision-plain":
        if opts.max_num_images:
            args += ["--max-num-images", str(opts.max_num_images)]
        if opts.max_image_length:
            args += ["--max-image-length", str(opts.max_image_length)]
    return args


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def _table(name: str, values: dict[str, Any]) -> list[str]:
    present = {k: v for k, v in values.items() if v is not None}
    if not present:
        return []
    return [f"[{name}]", *(f"{k} = {_toml_value(v)}" for k, v in present.items())]


def _from_config_toml(program: EngineProgram, catalog: Catalog, port: int) -> str:
    # No default_model_id: up to 0.9.0 it is checked against model_id but registered under tok_model_id for
    # GGUF, which fails after loading. The first [[models]] entry is the default instead, so it goes first.
    default = _default_model(catalog)
    ordered = [default, *(m for m in catalog.models if m is not default)]
    opts = catalog.engine
    max_seqs = effective_max_seqs(program, catalog)
    lines = ['command = "serve"', ""]
    lines += _table("global", {"token_source": opts.token_source})
    # mcp_config moved from [server] to [runtime] in 0.8.2; unknown keys are ignored, so both are safe.
    lines += _table("runtime", {"max_seqs": max_seqs, "mcp_config": opts.mcp_config})
    lines += _table("server", {"port": port, "host": "127.0.0.1", "mcp_config": opts.mcp_config})
    if opts.paged_attn is not None:
        lines += _table("paged_attn", {"mode": "on" if opts.paged_attn else "off"})
    for model in ordered:
        model_opts = model.entry.options
        src = model.source
        lines += [
            "",
            "[[models]]",
            f"kind = {_toml_value(_serve_type(program, model.kind))}",
            f"model_id = {_toml_value(src.model_id)}",
        ]
        if model_opts.arch and model.kind == "plain":
            lines.append(f"arch = {_toml_value(model_opts.arch)}")
        if model_opts.dtype:
            lines.append(f"dtype = {_toml_value(model_opts.dtype)}")
        if model.kind == "gguf":
            lines += _table(
                "models.format", {"format": "gguf", "quantized_file": src.filename, "tok_model_id": src.tokenizer}
            )
        lines += _table("models.quantization", {"in_situ_quant": model_opts.isq, "from_uqff": model_opts.from_uqff})
        device = {
            "cpu": True if opts.cpu else None,
            "max_seq_len": model_opts.max_seq_len,
            "max_batch_size": model_opts.max_batch_size,
        }
        lines += _table("models.device", device)
        if model.kind == "vision-plain":
            multimodal = {"max_num_images": model_opts.max_num_images, "max_image_length": model_opts.max_image_length}
            lines += _table("models.multimodal", multimodal)
    return "\n".join(lines) + "\n"

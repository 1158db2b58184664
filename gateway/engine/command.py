"""Pure builders of the engine's command line, for both of its dialects.

Nothing here touches the disk or the network: a builder returns the argument vector plus the
contents of any config file it refers to, and the supervisor writes those files. That keeps every
flag testable against mistral.rs's own argument definitions (see tests/unit/test_command.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..catalog import Catalog, Model
from .discovery import EngineProgram

# Subcommand of the legacy CLI, variant of its multi-model JSON config, and model type of `mistralrs serve`,
# for each kind of the models file.
LEGACY_SUBCOMMAND = {
    "plain": "plain",
    "gguf": "gguf",
    "vision-plain": "vision-plain",
    "diffusion": "diffusion",
    "embedding": "embedding",
    "speech": "speech",
}
MULTI_MODEL_VARIANT = {
    "plain": "Plain",
    "gguf": "GGUF",
    "vision-plain": "VisionPlain",
    "diffusion": "DiffusionPlain",
    "embedding": "Embedding",
    "speech": "Speech",
}
SERVE_TYPE = {
    "plain": "text",
    "gguf": "text",
    "vision-plain": "multimodal",
    "diffusion": "diffusion",
    "embedding": "embedding",
    "speech": "speech",
}
# Kinds whose engine pipeline cannot be built without an architecture.
ARCH_REQUIRED = frozenset({"diffusion", "speech"})

MULTI_MODEL_CONFIG = "multi-model.json"
FROM_CONFIG_FILE = "mistralrs.toml"


@dataclass(frozen=True)
class EngineCommand:
    """An engine invocation: its argv, and the files (name -> text) it expects in its run folder."""

    argv: list[str]
    files: dict[str, str] = field(default_factory=dict)


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


def default_engine_id(catalog: Catalog) -> str:
    """The engine id of the model the engine should use when a request names none."""
    name = catalog.default_model or catalog.default_embedding_model or catalog.models[0].id
    model = catalog.find(name)
    assert model is not None  # the catalog checked its defaults
    return model.engine_id


# ---------------------------------------------------------------------------------------------- legacy


def _legacy(
    program: EngineProgram, catalog: Catalog, *, port: int, run_dir: str, extra_args: Sequence[str]
) -> EngineCommand:
    argv = [*program.argv, "--serve-ip", "127.0.0.1", "--port", str(port), *extra_args]
    if len(catalog.models) == 1:
        model = catalog.models[0]
        if model.entry.options.isq:
            argv += ["--isq", model.entry.options.isq]
        return EngineCommand([*argv, *_legacy_model_args(model)])
    config = {_label(i, m): _multi_model_entry(m) for i, m in enumerate(catalog.models)}
    path = f"{run_dir}/{MULTI_MODEL_CONFIG}"
    argv += ["multi-model", "--config", path, "--default-model-id", default_engine_id(catalog)]
    return EngineCommand(argv, {MULTI_MODEL_CONFIG: json.dumps(config, indent=2)})


def _legacy_model_args(model: Model) -> list[str]:
    opts = model.entry.options
    src = model.source
    args = [LEGACY_SUBCOMMAND[model.kind], "--model-id", src.model_id]
    if model.kind == "gguf":
        args += ["--quantized-filename", str(src.filename)]
        if src.tokenizer:
            args += ["--tok-model-id", src.tokenizer]
    if opts.arch:
        args += ["--arch", opts.arch]
    if opts.dtype and model.kind != "embedding":
        args += ["--dtype", opts.dtype]
    if opts.max_seq_len and model.kind in ("plain", "gguf", "vision-plain"):
        args += ["--max-seq-len", str(opts.max_seq_len)]
    if opts.max_batch_size and model.kind in ("plain", "gguf", "vision-plain"):
        args += ["--max-batch-size", str(opts.max_batch_size)]
    if opts.from_uqff and model.kind in ("plain", "vision-plain"):
        args += ["--from-uqff", opts.from_uqff]
    if model.kind == "vision-plain":
        if opts.max_num_images:
            args += ["--max-num-images", str(opts.max_num_images)]
        if opts.max_image_length:
            args += ["--max-image-length", str(opts.max_image_length)]
    return args


def _label(index: int, model: Model) -> str:
    return f"model-{index}"


def _multi_model_entry(model: Model) -> dict[str, Any]:
    opts = model.entry.options
    src = model.source
    fields: dict[str, Any]
    if model.kind == "gguf":
        fields = {"quantized_model_id": src.model_id, "quantized_filename": src.filename}
        if src.tokenizer:
            fields["tok_model_id"] = src.tokenizer
    else:
        fields = {"model_id": src.model_id}
    if opts.arch:
        fields["arch"] = opts.arch
    if opts.dtype and model.kind != "embedding":
        fields["dtype"] = opts.dtype
    if model.kind in ("plain", "gguf", "vision-plain"):
        if opts.max_seq_len:
            fields["max_seq_len"] = opts.max_seq_len
        if opts.max_batch_size:
            fields["max_batch_size"] = opts.max_batch_size
    if opts.from_uqff and model.kind in ("plain", "vision-plain"):
        fields["from_uqff"] = opts.from_uqff
    if model.kind == "vision-plain":
        if opts.max_num_images:
            fields["max_num_images"] = opts.max_num_images
        if opts.max_image_length:
            fields["max_image_length"] = opts.max_image_length
    entry: dict[str, Any] = {MULTI_MODEL_VARIANT[model.kind]: fields}
    if opts.isq:
        entry["in_situ_quant"] = opts.isq
    return entry


# ----------------------------------------------------------------------------------------------- serve


def _serve(
    program: EngineProgram, catalog: Catalog, *, port: int, run_dir: str, extra_args: Sequence[str]
) -> EngineCommand:
    if len(catalog.models) == 1:
        model = catalog.models[0]
        argv = [*program.argv, "serve", "--port", str(port), "--host", "127.0.0.1", *extra_args]
        return EngineCommand([*argv, *_serve_model_args(model)])
    path = f"{run_dir}/{FROM_CONFIG_FILE}"
    argv = [*program.argv, "from-config", "--file", path, *extra_args]
    return EngineCommand(argv, {FROM_CONFIG_FILE: _from_config_toml(catalog, port)})


def _serve_model_args(model: Model) -> list[str]:
    opts = model.entry.options
    src = model.source
    args = [SERVE_TYPE[model.kind], "--model-id", src.model_id]
    if model.kind == "gguf":
        args += ["--format", "gguf", "--quantized-file", str(src.filename)]
        if src.tokenizer:
            args += ["--tok-model-id", src.tokenizer]
    if opts.arch:
        args += ["--arch", opts.arch]
    if opts.dtype:
        args += ["--dtype", opts.dtype]
    if opts.isq:
        args += ["--isq", opts.isq]
    if opts.from_uqff:
        args += ["--from-uqff", opts.from_uqff]
    if opts.max_seq_len:
        args += ["--max-seq-len", str(opts.max_seq_len)]
    if opts.max_batch_size:
        args += ["--max-batch-size", str(opts.max_batch_size)]
    return args


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def _from_config_toml(catalog: Catalog, port: int) -> str:
    lines = [
        'command = "serve"',
        f"default_model_id = {_toml_value(default_engine_id(catalog))}",
        "",
        "[server]",
        f"port = {port}",
        'host = "127.0.0.1"',
    ]
    for model in catalog.models:
        opts = model.entry.options
        src = model.source
        lines += [
            "",
            "[[models]]",
            f"kind = {_toml_value(SERVE_TYPE[model.kind])}",
            f"model_id = {_toml_value(src.model_id)}",
        ]
        if model.kind == "gguf":
            lines += ["[models.format]", 'format = "gguf"', f"quantized_file = {_toml_value(src.filename)}"]
            if src.tokenizer:
                lines.append(f"tok_model_id = {_toml_value(src.tokenizer)}")
        if opts.isq or opts.from_uqff:
            lines.append("[models.quantization]")
            if opts.isq:
                lines.append(f"in_situ_quant = {_toml_value(opts.isq)}")
            if opts.from_uqff:
                lines.append(f"from_uqff = {_toml_value(opts.from_uqff)}")
        model_opts = {
            "arch": opts.arch,
            "dtype": opts.dtype,
            "max_seq_len": opts.max_seq_len,
            "max_batch_size": opts.max_batch_size,
        }
        if any(v is not None for v in model_opts.values()):
            lines.append("[models.model]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in model_opts.items() if v is not None]
    return "\n".join(lines) + "\n"

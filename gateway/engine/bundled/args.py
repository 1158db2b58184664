"""The legacy ``mistralrs-server`` command line, as far as the bundled server supports it.

Global flags come before the subcommand, as with the real program (argparse's subparsers refuse them
after it, the way clap does). Flags the PyPI package cannot honour are accepted and reported in
:attr:`EngineArgs.unsupported` so the server can say so on stderr instead of silently ignoring them.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Variant of the multi-model JSON -> our kind; both spellings of the multimodal variant are accepted.
_VARIANTS = {
    "Plain": "plain",
    "GGUF": "gguf",
    "VisionPlain": "multimodal",
    "MultimodalPlain": "multimodal",
    "DiffusionPlain": "diffusion",
    "Embedding": "embedding",
    "Speech": "speech",
}
_UNSUPPORTED_FIELDS = ("max_seq_len", "max_batch_size", "max_num_images", "max_image_length", "topology")


class ArgsError(ValueError):
    """The command line or the multi-model config is wrong; the message says how."""


@dataclass
class ModelLoad:
    """One model to load: what the engine's pipeline is built from, and the ids it answers to."""

    kind: str
    fields: dict[str, Any]
    alias: str | None = None
    in_situ_quant: str | None = None
    chat_template: str | None = None
    jinja_explicit: str | None = None

    @property
    def pipeline_name(self) -> str:
        """The id mistral.rs gives a pipeline: for GGUF the tokenizer repo when given, else the model id."""
        if self.kind == "gguf":
            return str(self.fields.get("tok_model_id") or self.fields["quantized_model_id"])
        return str(self.fields["model_id"])

    @property
    def served_id(self) -> str:
        return self.alias or self.pipeline_name


@dataclass
class EngineArgs:
    host: str
    port: int
    max_seqs: int
    token_source: str
    cpu: bool
    paged_attn: bool | None
    enable_thinking: bool | None
    mcp_config: str | None
    chat_template: str | None
    jinja_explicit: str | None
    isq: str | None
    models: list[ModelLoad]
    default_model_id: str | None
    unsupported: list[str] = field(default_factory=list)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mistralrs-server (bundled)", allow_abbrev=False)
    parser.add_argument("--serve-ip", default="0.0.0.0")
    parser.add_argument("-p", "--port", type=int, required=True)
    parser.add_argument("--max-seqs", type=int, default=16)
    parser.add_argument("--token-source", default="cache")
    parser.add_argument("--isq")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--paged-attn", action="store_true")
    parser.add_argument("--no-paged-attn", action="store_true")
    parser.add_argument("--thinking", nargs="?", const="true", choices=["true", "false"])
    parser.add_argument("--enable-thinking", action="store_true")
    parser.add_argument("--mcp-config")
    parser.add_argument("-c", "--chat-template")
    parser.add_argument("-j", "--jinja-explicit")
    parser.add_argument("-s", "--seed", type=int)
    sub = parser.add_subparsers(dest="command", required=True)

    def model(name: str, *, id_flag: str = "--model-id") -> argparse.ArgumentParser:
        p = sub.add_parser(name, allow_abbrev=False)
        p.add_argument("-m", id_flag, dest="model_id", required=True)
        p.add_argument("-d", "--dtype", default="auto")
        return p

    plain = model("plain")
    plain.add_argument("-a", "--arch")
    plain.add_argument("-t", "--tokenizer-json")
    plain.add_argument("-f", "--from-uqff")
    for p in (plain,):
        p.add_argument("--max-seq-len", type=int)
        p.add_argument("--max-batch-size", type=int)
    gguf = model("gguf", id_flag="--quantized-model-id")
    gguf.add_argument("-f", "--quantized-filename", required=True)
    gguf.add_argument("-t", "--tok-model-id")
    gguf.add_argument("--max-seq-len", type=int)
    gguf.add_argument("--max-batch-size", type=int)
    for name in ("multimodal-plain", "vision-plain"):
        mm = model(name)
        mm.add_argument("-a", "--arch")
        mm.add_argument("-f", "--from-uqff")
        for flag in ("--max-seq-len", "--max-batch-size", "--max-num-images", "--max-image-length"):
            mm.add_argument(flag, type=int)
    emb = model("embedding")
    emb.add_argument("-a", "--arch")
    emb.add_argument("-t", "--tokenizer-json")
    emb.add_argument("-f", "--from-uqff")
    diffusion = model("diffusion")
    diffusion.add_argument("-a", "--arch", required=True, choices=["flux", "flux-offloaded"])
    speech = sub.add_parser("speech", allow_abbrev=False)
    speech.add_argument("-m", "--model-id", dest="model_id", required=True)
    speech.add_argument("-a", "--arch", required=True, choices=["dia"])
    speech.add_argument("--dtype", default="auto")
    multi = sub.add_parser("multi-model", allow_abbrev=False)
    multi.add_argument("-c", "--config", required=True)
    multi.add_argument("-d", "--default-model-id")
    return parser


def parse_args(argv: Sequence[str]) -> EngineArgs:
    """Parse; a usage error exits 2 (argparse), a bad multi-model config raises :class:`ArgsError`."""
    ns = _parser().parse_args(list(argv))
    thinking = True if ns.enable_thinking else None if ns.thinking is None else ns.thinking == "true"
    paged = True if ns.paged_attn else False if ns.no_paged_attn else None
    args = EngineArgs(
        host=ns.serve_ip,
        port=ns.port,
        max_seqs=ns.max_seqs,
        token_source=ns.token_source,
        cpu=ns.cpu,
        paged_attn=paged,
        enable_thinking=thinking,
        mcp_config=ns.mcp_config,
        chat_template=ns.chat_template,
        jinja_explicit=ns.jinja_explicit,
        isq=ns.isq,
        models=[],
        default_model_id=None,
    )
    if ns.seed is not None:
        # Seeding the CPU generator fails in the PyPI build and poisons every later load in the process.
        args.unsupported.append("--seed (use temperature 0 for repeatable output)")
    if ns.command == "multi-model":
        args.models = _read_multi_model(Path(ns.config))
        args.default_model_id = ns.default_model_id
        if ns.isq or ns.chat_template or ns.jinja_explicit:
            # As in mistralrs-server: multi-model mode takes these per model, from the JSON.
            args.unsupported.append("--isq/--chat-template/--jinja-explicit with multi-model (set them per model)")
        return args
    kind = {"multimodal-plain": "multimodal", "vision-plain": "multimodal"}.get(ns.command, ns.command)
    fields = {k: v for k, v in vars(ns).items() if k not in _GLOBAL_DESTS and v is not None}
    for name in _UNSUPPORTED_FIELDS:
        if fields.pop(name, None) is not None:
            args.unsupported.append(f"--{name.replace('_', '-')}")
    if kind == "gguf":
        fields["quantized_model_id"] = fields.pop("model_id")
    args.models = [
        ModelLoad(kind, fields, in_situ_quant=ns.isq, chat_template=ns.chat_template, jinja_explicit=ns.jinja_explicit)
    ]
    return args


_GLOBAL_DESTS = frozenset(
    {
        "serve_ip",
        "port",
        "max_seqs",
        "token_source",
        "isq",
        "cpu",
        "paged_attn",
        "no_paged_attn",
        "thinking",
        "enable_thinking",
        "mcp_config",
        "chat_template",
        "jinja_explicit",
        "seed",
        "command",
    }
)


def _read_multi_model(path: Path) -> list[ModelLoad]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArgsError(f"Failed to read multi-model config {path}: {exc}") from exc
    if not isinstance(raw, dict) or not raw:
        raise ArgsError(f"Multi-model configuration file {path} is empty or not a JSON object")
    models: list[ModelLoad] = []
    for label, entry in raw.items():
        if not isinstance(entry, dict):
            raise ArgsError(f"Failed to parse multi-model config: entry {label!r} is not an object")
        variants = [k for k in entry if k in _VARIANTS]
        if len(variants) != 1:
            raise ArgsError(
                f"Failed to parse multi-model config: entry {label!r} needs exactly one of {', '.join(_VARIANTS)}"
            )
        kind = _VARIANTS[variants[0]]
        fields = dict(entry[variants[0]])
        needed = ("quantized_model_id", "quantized_filename") if kind == "gguf" else ("model_id",)
        for name in needed:
            if name not in fields:
                raise ArgsError(f"Failed to parse multi-model config: missing field `{name}` in {label!r}")
        for name in _UNSUPPORTED_FIELDS:
            fields.pop(name, None)
        models.append(
            ModelLoad(
                kind,
                fields,
                alias=entry.get("alias"),
                in_situ_quant=entry.get("in_situ_quant"),
                chat_template=entry.get("chat_template"),
                jinja_explicit=entry.get("jinja_explicit"),
            )
        )
    seen: dict[str, str] = {}
    for load in models:
        if load.served_id in seen:
            raise ArgsError(f"Model ID conflict: '{load.served_id}' is already registered")
        seen[load.served_id] = load.kind
    return models

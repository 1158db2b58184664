"""A stand-in for the mistral.rs engine, for integration tests and benchmarks.

It is run exactly like the real binaries::

    python tests/fakes/fake_engine.py --serve-ip 127.0.0.1 -p 8080 plain -m org/model   # mistralrs-server
    python tests/fakes/fake_engine.py serve -p 8080 --host 127.0.0.1 text -m org/model  # mistralrs
    python tests/fakes/fake_engine.py from-config -f models.toml                        # mistralrs

Which grammar applies: the program name when it is ``mistralrs`` or ``mistralrs-server`` (wrapper
scripts), otherwise the first argument (``serve`` / ``from-config``: new CLI, anything else: legacy).
A bad command line exits 2 with a usage message, like clap. A bad config file or a load failure prints
``Error: ...`` on stderr and exits 1, like the engine's ``anyhow`` errors. SIGTERM and SIGINT kill it
at once, like the real engine, which installs no handler for them.

Behaviour knobs (environment variables, since the real command line has nothing to set them):

    FAKE_ENGINE_LOAD_DELAY=SECONDS   sleep before binding (the real engine binds only after loading)
    FAKE_ENGINE_SPAWN_LOG=PATH       at start, append {"pid", "argv", "prog", "cwd", "hf_token_set"} as one
                                     JSON line; argv excludes the program name; hf_token_set: HF_TOKEN is
                                     set in its environment (the token itself is never written)
    FAKE_ENGINE_SAY=TEXT             print TEXT as one line of its output at start, before loading (an engine
                                     that prints a secret it was handed)
    FAKE_ENGINE_PRINT_ENV=1          print its whole environment at start, one NAME=VALUE line each, sorted (an
                                     engine, or something it starts, that dumps what it can read)
    FAKE_ENGINE_BROKEN=TEXT          fail to load (exit 1 with an error, after the load delay) when the id or
                                     path of a model to load contains TEXT: one broken model among good ones
    FAKE_ENGINE_EXIT_AT_START=CODE   print a few lines to stdout and stderr, then exit with CODE after
                                     the load delay, never binding
    FAKE_ENGINE_NEVER_READY=1        never bind: sleep until killed
    FAKE_ENGINE_IGNORE_SIGTERM=1     ignore SIGTERM, so only SIGKILL ends it
    FAKE_ENGINE_CHUNK_DELAY=SECONDS  pause between stream chunks (default 0)
    FAKE_ENGINE_REQUEST_LOG=PATH     append {"method", "path", "body"} as one JSON line per /v1 request;
                                     body is the parsed JSON, or null when absent or unparsable
    FAKE_ENGINE_EMBED_DIM=N          embedding dimension (default 64)
    FAKE_ENGINE_EMBED_DELAY=SECONDS  answer embeddings after this long (to make concurrent requests overlap);
                                     an input item "error" makes the request fail with HTTP 500
    FAKE_ENGINE_VERSION=X.Y.Z        what --version prints (default 0.8.4 as mistralrs-server, else 0.9.2)
    FAKE_ENGINE_STRICT_SERDE=1       in a multi-model JSON config, also require the fields that the
                                     v0.8.4 serde structs require, not only the model ids (see
                                     _JSON_VARIANTS)

Magic prompts. The last user message (chat), the prompt (completions) or the input (responses)
decides what happens:

    count:N        reply "w0 w1 ... w{N-1}", one word per stream chunk
    slow:SECONDS   10 chunks spread evenly over SECONDS (non-streaming: answer after SECONDS)
    crash          stream 3 chunks, then die with os._exit(1); non-streaming: die at once
    hang           stream 2 chunks, then go silent forever; non-streaming: never answer (the engine still
                   answers /health: a slow request, not a stuck engine)
    freeze         stream 2 chunks, then block the whole engine (its /health too) until it is killed;
                   non-streaming: block at once: a stuck engine
    error          stream 2 chunks, a plain-text "data: simulated engine error" event, then [DONE];
                   non-streaming: HTTP 500 {"message": ..., "partial_response": ...}
    anything else  reply "echo: <text>", cut to max_tokens words

Tools (chat, with `tools` given; a `call:`/`calls:` prompt is the last user message):

    call:NAME      tool_choice "auto" (or absent): one call of NAME (a tool not in `tools` is called
                   all the same, with arguments "{}")
    calls:N        tool_choice "auto": N parallel calls of the first N tools in order, cycling when
                   there are fewer; indexes 0..N-1, distinct ids
    tool_choice "required" / {"type": "function", "function": {"name": X}}: always a call of the first
                   tool / of X, whatever the prompt; X not among `tools`, or "required" without tools: 422
    tool_choice "none": never a call
    a forced call longer than max_tokens (one token per 8 characters of its {"name","arguments"} text) stays
                   that text, cut, with finish_reason "length", as mistral.rs leaves it
    last message a `tool` message (second turn of a tool loop): reply "tool said: <its content>" (unless
                   the choice forces a call)

A call answers `content: null`, `finish_reason: "tool_calls"`, `tool_calls: [{"index", "id": "call-<uuid>",
"type": "function", "function": {"name", "arguments": "<compact JSON>"}}]`, the arguments an instance of the
tool's `parameters` (see schema_instance); streamed, all the calls come in ONE chunk with that finish_reason
and the usage, then [DONE]. Usage and logprobs count one token per call. The failure prompts (crash, hang,
error, slow) keep their behaviour when tools are given.

What other request fields do (chat and completions unless said otherwise):

    response_format  chat: {"type": "json_schema", "json_schema": {"name", "schema": S}} makes the content
                     a compact JSON instance of S (schema_instance; an object schema without properties
                     gives {"answer": "<the usual reply>"}), streamed in chunks of up to 8 characters;
                     {"type": "json_object"} is refused with 422 {"message", "param"} (mistral.rs refuses
                     it: the gateway must rewrite it); {"type": "text"} changes nothing
    grammar          mistral.rs's {"type": "json_schema", "value": S}: as the json_schema response format;
                     regex / lark / llguidance are accepted and change nothing; with response_format: 422
    stop             a string or a list of strings: the reply is cut before the first occurrence of any
                     of them (which is not sent), finish_reason "stop"; applied before max_tokens
    logprobs         chat: true (+ top_logprobs N, default 1); completions: the integer N. Per token a
                     mistral.rs ResponseLogprob {"token", "logprob", "bytes": [utf-8 ints],
                     "top_logprobs": N x {"token": <id>, "logprob", "bytes": "<text>"}}, the first top entry
                     the token itself, values from a hash of the token, descending. Non-streaming:
                     {"content": [one per token]}; each chunk: the ResponseLogprob of its piece, or null
    n                n identical choices (index 0..n-1, their own tool call ids), usage counting all of
                     them; every stream chunk carries the n choices; n = 0: 422 naming `n`
    seed, stream_options, parallel_tool_calls, user, metadata: accepted and ignored

Usage rides on the chat chunk that has finish_reason; completion chunks have no usage field (mistral.rs).
A completions `prompt` must be one string: a list, even of strings, is a 422 deserialize error.
Chat deltas are mistral.rs's: {"role": "assistant", "content": piece or null, "tool_calls": null or [...]}.

Streamed pieces keep their leading space, so the deltas joined together equal the non-streaming text.

GET /metrics is Prometheus text, as mistral.rs's server writes it; with PagedAttention on (legacy
``--paged-attn``, new ``--paged-attn on``) it carries the KV-cache gauges mistral.rs's paged scheduler
publishes: ``mistralrs_kv_cache_blocks_total`` (KV_BLOCKS_TOTAL) and ``mistralrs_kv_cache_blocks_used``
(KV_BLOCKS_PER_SEQUENCE for each generation in progress, streamed or not); without it, neither.

Models answer only the requests of their category (text and multimodal: chat, completions, responses;
embedding; diffusion: images; speech), as the real engine does. ``auto`` models (legacy ``run``, new
``auto`` / no type) are embedding models when the id contains "embed", otherwise text models, because
the fake cannot read config.json the way the real auto-loader does.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import signal
import socket
import struct
import sys
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NoReturn

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

# Model categories, as mistral.rs `ModelCategory` decides which requests a model may serve.
TEXT = "text"
MULTIMODAL = "multimodal"
EMBEDDING = "embedding"
DIFFUSION = "diffusion"
SPEECH = "speech"
AUTO = None  # decided from the model id by _auto_category

LEGACY_CLI = "mistralrs-server"
NEW_CLI = "mistralrs"

# The KV cache of an engine with PagedAttention, in blocks (see GET /metrics in the module docstring).
KV_BLOCKS_TOTAL = 256
KV_BLOCKS_PER_SEQUENCE = 8


@dataclass(frozen=True)
class FakeModel:
    """One loaded model, as the HTTP API sees it."""

    model_id: str
    category: str
    # A multi-model `alias` replaces the API id, but the pipeline name keeps answering.
    other_ids: tuple[str, ...] = ()
    # The GGUF folder (`-m` / quantized_model_id / model_id), checked at load time.
    gguf_dir: str | None = None


@dataclass(frozen=True)
class EngineSpec:
    """Everything the command line decided: where to listen and what to load."""

    cli: str
    host: str
    port: int
    models: tuple[FakeModel, ...]
    default_model_id: str | None = None
    paged_attn: bool = False


class EngineFailed(Exception):
    """The engine gives up: ``main()`` prints ``Error: <message>`` on stderr and exits 1, the way the engine's
    ``main() -> anyhow::Result`` does."""


def _fail(message: str) -> NoReturn:
    raise EngineFailed(message)


def _auto_category(model_id: str) -> str:
    return EMBEDDING if "embed" in model_id.lower() else TEXT


# ---------------------------------------------------------------------------------------------------
# Command-line grammar. Everything both CLIs accept is declared in this section, one function per
# command, following the clap definitions in mistral.rs (legacy: mistralrs-server/src/main.rs and
# mistralrs-core/src/model_selected.rs at v0.8.4; new: mistralrs-cli/src/args/*.rs, v0.7 - v0.9.2).
# Where versions differ, both spellings are accepted (vision-plain / multimodal-plain,
# --enable-thinking / --thinking, TYPE vision / multimodal); a flag no version had is refused.
# ---------------------------------------------------------------------------------------------------


def _uint(bits: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if not 0 <= value < 2**bits:
            raise ValueError(text)
        return value

    # argparse names the type in its message: "invalid u16 value: 'x'".
    parse.__name__ = f"u{bits}"
    return parse


U16 = _uint(16)
U64 = _uint(64)
USIZE = _uint(64)


def f32(text: str) -> float:
    return float(text)


def token_source(text: str) -> str:
    if text in ("cache", "none") or text.startswith(("literal:", "env:", "path:")):
        return text
    raise ValueError(text)


DTYPES = ("auto", "bf16", "f16", "f32")
BOOL_VALUES = ("true", "false")


class _Once(argparse.Action):
    """Store a value, refusing a second occurrence as clap does ("cannot be used multiple times")."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        marker = f"_given_{self.dest}"
        if getattr(namespace, marker, False):
            parser.error(f"the argument '{'/'.join(self.option_strings)}' cannot be used multiple times")
        setattr(namespace, marker, True)
        setattr(namespace, self.dest, values)


class _FlagOnce(_Once):
    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.pop("nargs", None)
        kwargs.setdefault("default", False)
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        super().__call__(parser, namespace, True, option_string)


# clap matches long flags exactly; argparse would otherwise accept any unambiguous prefix (allow_abbrev).


def _parser(prog: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, allow_abbrev=False)


def _subparser(group: argparse._SubParsersAction[argparse.ArgumentParser], name: str) -> argparse.ArgumentParser:
    return group.add_parser(name, allow_abbrev=False)


def _opt(
    p: argparse.ArgumentParser,
    *flags: str,
    convert: Callable[[str], Any] = str,
    flag: bool = False,
    required: bool = False,
    choices: Sequence[str] | None = None,
    default: Any = None,
) -> None:
    if flag:
        p.add_argument(*flags, action=_FlagOnce, required=required, default=default or False)
    else:
        p.add_argument(*flags, action=_Once, type=convert, required=required, choices=choices, default=default)


def _thinking(p: argparse.ArgumentParser) -> None:
    # clap: `--thinking [true|false]`, the bare flag meaning true (num_args = 0..=1).
    p.add_argument("--thinking", nargs="?", const="true", choices=BOOL_VALUES, action=_Once)


# --- legacy `mistralrs-server [GLOBAL FLAGS] <SUBCOMMAND> [MODEL FLAGS]` ----------------------------


def legacy_parser() -> argparse.ArgumentParser:
    """The `mistralrs-server` grammar: global flags are only valid BEFORE the subcommand."""
    p = _parser(LEGACY_CLI)
    _opt(p, "--serve-ip")
    _opt(p, "-s", "--seed", convert=U64)
    _opt(p, "-p", "--port", convert=U16)
    _opt(p, "-l", "--log")
    _opt(p, "--max-seqs", convert=USIZE)
    _opt(p, "--no-kv-cache", flag=True)
    _opt(p, "-c", "--chat-template")
    _opt(p, "-j", "--jinja-explicit")
    _opt(p, "--token-source", convert=token_source)
    _opt(p, "-i", "--interactive-mode", flag=True)
    _opt(p, "--prefix-cache-n", convert=USIZE)
    _opt(p, "-n", "--num-device-layers")
    _opt(p, "--isq")
    _opt(p, "--pa-gpu-mem", convert=USIZE)
    _opt(p, "--pa-gpu-mem-usage", convert=f32)
    _opt(p, "--pa-ctxt-len", convert=USIZE)
    _opt(p, "--pa-cache-type")
    _opt(p, "--pa-blk-size", convert=USIZE)
    _opt(p, "--no-paged-attn", flag=True)
    _opt(p, "--paged-attn", flag=True)
    _opt(p, "--cpu", flag=True)
    _opt(p, "--enable-search", flag=True)
    _opt(p, "--search-embedding-model")
    _thinking(p)  # v0.8
    _opt(p, "--enable-thinking", flag=True)  # v0.6 - v0.7
    _opt(p, "--mcp-port", convert=U16)
    _opt(p, "--mcp-config")

    sub = p.add_subparsers(dest="subcommand", required=True, metavar="<COMMAND>")

    run = _subparser(sub, "run")
    _opt(run, "-m", "--model-id", required=True)
    _opt(run, "-t", "--tokenizer-json")
    _opt(run, "-d", "--dtype", choices=DTYPES)
    _opt(run, "--topology")
    _opt(run, "-o", "--organization")
    _opt(run, "-w", "--write-uqff")
    _opt(run, "-f", "--from-uqff")
    _opt(run, "-i", "--imatrix")
    _opt(run, "-c", "--calibration-file")
    _opt(run, "-e", "--max-edge", convert=_uint(32))
    _opt(run, "--max-seq-len", convert=USIZE)
    _opt(run, "--max-batch-size", convert=USIZE)
    _opt(run, "--max-num-images", convert=USIZE)
    _opt(run, "--max-image-length", convert=USIZE)
    _opt(run, "--hf-cache-path")
    _opt(run, "--matformer-config-path")
    _opt(run, "--matformer-slice-name")

    plain = _subparser(sub, "plain")
    _opt(plain, "-m", "--model-id", required=True)
    _opt(plain, "-t", "--tokenizer-json")
    _opt(plain, "-a", "--arch")
    _opt(plain, "-d", "--dtype", choices=DTYPES)
    _opt(plain, "--topology")
    _opt(plain, "-o", "--organization")
    _opt(plain, "-w", "--write-uqff")
    _opt(plain, "-f", "--from-uqff")
    _opt(plain, "-i", "--imatrix")
    _opt(plain, "-c", "--calibration-file")
    _opt(plain, "--max-seq-len", convert=USIZE)
    _opt(plain, "--max-batch-size", convert=USIZE)
    _opt(plain, "--hf-cache-path")
    _opt(plain, "--matformer-config-path")
    _opt(plain, "--matformer-slice-name")

    gguf = _subparser(sub, "gguf")
    _opt(gguf, "-t", "--tok-model-id")
    _opt(gguf, "-m", "--quantized-model-id", required=True)
    _opt(gguf, "-f", "--quantized-filename", required=True)
    _opt(gguf, "-d", "--dtype", choices=DTYPES)
    _opt(gguf, "--topology")
    _opt(gguf, "--max-seq-len", convert=USIZE)
    _opt(gguf, "--max-batch-size", convert=USIZE)

    # `vision-plain` up to v0.7, renamed `multimodal-plain` in v0.8 (no alias kept).
    for name in ("vision-plain", "multimodal-plain"):
        vision = _subparser(sub, name)
        _opt(vision, "-m", "--model-id", required=True)
        _opt(vision, "-t", "--tokenizer-json")
        _opt(vision, "-a", "--arch")
        _opt(vision, "-d", "--dtype", choices=DTYPES)
        _opt(vision, "--topology")
        _opt(vision, "-w", "--write-uqff")
        _opt(vision, "-f", "--from-uqff")
        _opt(vision, "-e", "--max-edge", convert=_uint(32))
        _opt(vision, "-c", "--calibration-file")
        _opt(vision, "-i", "--imatrix")
        _opt(vision, "--max-seq-len", convert=USIZE)
        _opt(vision, "--max-batch-size", convert=USIZE)
        _opt(vision, "--max-num-images", convert=USIZE)
        _opt(vision, "--max-image-length", convert=USIZE)
        _opt(vision, "--hf-cache-path")
        _opt(vision, "--matformer-config-path")
        _opt(vision, "--matformer-slice-name")
        _opt(vision, "--organization")

    diffusion = _subparser(sub, "diffusion")
    _opt(diffusion, "-m", "--model-id", required=True)
    _opt(diffusion, "-a", "--arch", required=True, choices=("flux", "flux-offloaded"))
    _opt(diffusion, "-d", "--dtype", choices=DTYPES)

    speech = _subparser(sub, "speech")
    _opt(speech, "-m", "--model-id", required=True)
    _opt(speech, "-d", "--dac-model-id")
    _opt(speech, "-a", "--arch", required=True)
    _opt(speech, "--dtype", choices=DTYPES)

    embedding = _subparser(sub, "embedding")
    _opt(embedding, "-m", "--model-id", required=True)
    _opt(embedding, "-t", "--tokenizer-json")
    _opt(embedding, "-a", "--arch", choices=("embeddinggemma", "qwen3embedding"))
    _opt(embedding, "-d", "--dtype", choices=DTYPES)
    _opt(embedding, "--topology")
    _opt(embedding, "-w", "--write-uqff")
    _opt(embedding, "-f", "--from-uqff")
    _opt(embedding, "--imatrix")
    _opt(embedding, "--calibration-file")
    _opt(embedding, "--hf-cache-path")

    multi = _subparser(sub, "multi-model")
    _opt(multi, "-c", "--config", required=True)
    _opt(multi, "-d", "--default-model-id")
    return p


# --- new `mistralrs serve [SERVE FLAGS] [TYPE [MODEL FLAGS]]` / `mistralrs from-config -f FILE` ------

# TYPE subcommand -> model category. `vision` is v0.7's name for v0.8's `multimodal`.
NEW_TYPES: dict[str, str | None] = {
    "auto": AUTO,
    "text": TEXT,
    "multimodal": MULTIMODAL,
    "vision": MULTIMODAL,
    "diffusion": DIFFUSION,
    "speech": SPEECH,
    "embedding": EMBEDDING,
}


def _new_globals(p: argparse.ArgumentParser, *, top: bool) -> None:
    # clap `global = true`: valid at every level. Below the top, SUPPRESS keeps a subparser from
    # overwriting a value given earlier with its own default.
    default = None if top else argparse.SUPPRESS
    p.add_argument("--seed", type=U64, default=default)
    p.add_argument("-l", "--log", default=default)
    p.add_argument("--token-source", type=token_source, default=default)
    p.add_argument("-v", "--verbose", action="count", default=0 if top else argparse.SUPPRESS)


def _model_source(p: argparse.ArgumentParser, *, required: bool) -> None:
    _opt(p, "-m", "--model-id", required=required)
    _opt(p, "-t", "--tokenizer")
    _opt(p, "-a", "--arch")
    _opt(p, "--dtype", choices=DTYPES)


def _format_options(p: argparse.ArgumentParser) -> None:
    _opt(p, "--format", choices=("plain", "gguf", "ggml"))
    _opt(p, "-f", "--quantized-file")
    _opt(p, "--tok-model-id")
    _opt(p, "--gqa", convert=USIZE)


def _adapter_options(p: argparse.ArgumentParser) -> None:
    _opt(p, "--enable-lora", flag=True)
    p.add_argument("--lora", "--lora-modules", action="append", nargs="+")
    _opt(p, "--xlora")
    _opt(p, "--xlora-order")
    _opt(p, "--tgt-non-granular-index", convert=USIZE)


def _quantization_options(p: argparse.ArgumentParser) -> None:
    _opt(p, "--quant")
    _opt(p, "--isq")
    _opt(p, "--from-uqff")
    _opt(p, "--isq-organization")
    _opt(p, "--imatrix")
    _opt(p, "--calibration-file")


def _device_options(p: argparse.ArgumentParser) -> None:
    _opt(p, "--cpu", flag=True)
    _opt(p, "-n", "--device-layers")
    _opt(p, "--topology")
    _opt(p, "--hf-cache")
    _opt(p, "--max-seq-len", convert=USIZE)
    _opt(p, "--max-batch-size", convert=USIZE)


def _cache_options(p: argparse.ArgumentParser) -> None:
    _opt(p, "--paged-attn", choices=("auto", "on", "off"))
    _opt(p, "--pa-context-len", convert=USIZE)
    _opt(p, "--pa-memory-mb", convert=USIZE)
    _opt(p, "--pa-memory-fraction", convert=f32)
    _opt(p, "--pa-block-size", convert=USIZE)
    _opt(p, "--pa-cache-type")


def _multimodal_options(p: argparse.ArgumentParser) -> None:
    _opt(p, "--max-edge", convert=_uint(32))
    _opt(p, "--max-num-images", convert=USIZE)
    _opt(p, "--max-image-length", convert=USIZE)


# Which option groups each TYPE subcommand flattens (mistralrs-cli `ModelType`).
_TYPE_GROUPS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], ...]] = {
    "auto": (
        _format_options,
        _adapter_options,
        _quantization_options,
        _device_options,
        _cache_options,
        _multimodal_options,
    ),
    "text": (_format_options, _adapter_options, _quantization_options, _device_options, _cache_options),
    "multimodal": (
        _format_options,
        _adapter_options,
        _quantization_options,
        _device_options,
        _cache_options,
        _multimodal_options,
    ),
    "diffusion": (_device_options,),
    "speech": (_device_options,),
    "embedding": (_format_options, _quantization_options, _device_options, _cache_options),
}
_TYPE_GROUPS["vision"] = _TYPE_GROUPS["multimodal"]


def new_parser() -> argparse.ArgumentParser:
    """The `mistralrs` grammar (only the `serve` and `from-config` commands)."""
    p = _parser(NEW_CLI)
    _new_globals(p, top=True)
    commands = p.add_subparsers(dest="command", required=True, metavar="<COMMAND>")

    serve = _subparser(commands, "serve")
    _new_globals(serve, top=False)
    # Server options: valid only before TYPE (they are not clap-global).
    _opt(serve, "-p", "--port", convert=U16, default=1234)
    _opt(serve, "--host", default="0.0.0.0")
    _opt(serve, "--mcp-port", convert=U16)
    _opt(serve, "--mcp-config")
    _opt(serve, "--ui", flag=True)
    _opt(serve, "--no-ui", flag=True)
    _opt(serve, "--disable-access-log", flag=True)
    _opt(serve, "--disable-metrics", flag=True)
    # Runtime options.
    _opt(serve, "--max-seqs", convert=USIZE)
    _opt(serve, "--no-kv-cache", flag=True)
    _opt(serve, "--prefix-cache-n", convert=USIZE)
    _opt(serve, "-c", "--chat-template")
    _opt(serve, "-j", "--jinja-explicit")
    _opt(serve, "--matformer-config-path")
    _opt(serve, "--matformer-slice-name")
    # Agent options.
    _opt(serve, "--agent", "--agentic", flag=True)
    _opt(serve, "--enable-search", flag=True)
    _opt(serve, "--search-embedding-model")
    # Default model options, used only when no TYPE is given.
    _model_source(serve, required=False)
    for group in _TYPE_GROUPS["auto"]:
        group(serve)

    types = serve.add_subparsers(dest="model_type", required=False, metavar="[TYPE]")
    for name, groups in _TYPE_GROUPS.items():
        t = _subparser(types, name)
        _new_globals(t, top=False)
        _model_source(t, required=True)
        for group in groups:
            group(t)

    from_config = _subparser(commands, "from-config")
    _new_globals(from_config, top=False)
    _opt(from_config, "-f", "--file", required=True)
    return p


# --- from parsed flags to an EngineSpec ------------------------------------------------------------

# Legacy subcommand -> category of the model it loads.
_LEGACY_CATEGORIES: dict[str, str | None] = {
    "run": AUTO,
    "plain": TEXT,
    "vision-plain": MULTIMODAL,
    "multimodal-plain": MULTIMODAL,
    "diffusion": DIFFUSION,
    "speech": SPEECH,
    "embedding": EMBEDDING,
}


def _spec_from_legacy(p: argparse.ArgumentParser, ns: argparse.Namespace, *, strict_serde: bool) -> EngineSpec:
    if ns.port is None:
        # The real engine bails only after loading ("expected port to be specified"); failing here,
        # with a usage message, catches a forgotten flag without waiting for a load.
        p.error("the following required arguments were not provided: --port <PORT>")
    if ns.paged_attn and ns.no_paged_attn:
        p.error("the argument '--paged-attn' cannot be used with '--no-paged-attn'")
    if ns.paged_attn and ns.cpu:
        p.error("the argument '--paged-attn' cannot be used with '--cpu'")
    if ns.interactive_mode:
        _fail("the fake engine has no interactive mode")
    _check_mcp_config(ns.mcp_config)
    host = ns.serve_ip if ns.serve_ip is not None else "0.0.0.0"
    if ns.subcommand == "multi-model":
        models = _models_from_json(ns.config, strict=strict_serde)
        return EngineSpec(LEGACY_CLI, host, ns.port, models, ns.default_model_id, paged_attn=bool(ns.paged_attn))
    if ns.subcommand == "gguf":
        # The pipeline is named after the tokenizer repo when given, else the GGUF location.
        model = FakeModel(ns.tok_model_id or ns.quantized_model_id, TEXT, gguf_dir=ns.quantized_model_id)
    else:
        category = _LEGACY_CATEGORIES[ns.subcommand] or _auto_category(ns.model_id)
        model = FakeModel(ns.model_id, category)
    return EngineSpec(LEGACY_CLI, host, ns.port, (model,), paged_attn=bool(ns.paged_attn))


def _spec_from_serve(ns: argparse.Namespace) -> EngineSpec:
    if ns.model_id is None:
        # clap cannot require -m when TYPE is absent; mistralrs-cli checks it afterwards (anyhow).
        _fail("--model-id (-m) is required")
    _check_mcp_config(ns.mcp_config)
    model_type = ns.model_type or "auto"
    has_format = _format_options in _TYPE_GROUPS[model_type]
    model = _new_cli_model(
        model_id=ns.model_id,
        kind=model_type,
        fmt=ns.format if has_format else None,
        quantized_file=ns.quantized_file if has_format else None,
        tok_model_id=ns.tok_model_id if has_format else None,
    )
    return EngineSpec(NEW_CLI, ns.host, ns.port, (model,), paged_attn=getattr(ns, "paged_attn", None) == "on")


def _new_cli_model(
    *, model_id: str, kind: str, fmt: str | None, quantized_file: str | None, tok_model_id: str | None
) -> FakeModel:
    category = NEW_TYPES[kind] or _auto_category(model_id)
    is_gguf = fmt == "gguf" or (fmt is None and (quantized_file or "").lower().endswith(".gguf"))
    if is_gguf:
        return FakeModel(tok_model_id or model_id, category, gguf_dir=model_id)
    return FakeModel(model_id, category)


def _check_mcp_config(path: str | None) -> None:
    # The engine reads the MCP config before loading anything.
    if path is None:
        return
    try:
        with open(path, encoding="utf-8") as handle:
            json.load(handle)
    except (OSError, ValueError) as exc:
        _fail(f"Failed to load MCP configuration {path}: {exc}")


# --- multi-model JSON (legacy `multi-model --config`) ----------------------------------------------

# Variant -> (category, fields the fake always requires, fields only FAKE_ENGINE_STRICT_SERDE=1 requires).
# The strict set is what serde itself demands at v0.8.4: those structs have no `#[serde(default)]` on
# dtype / max_seq_len / ..., so the upstream docs' minimal examples (e.g. GGUF without "dtype") look
# like they would be refused by the real engine with "missing field `dtype`".
_JSON_VARIANTS: dict[str, tuple[str | None, tuple[str, ...], tuple[str, ...]]] = {
    "Plain": (TEXT, ("model_id",), ()),
    "GGUF": (TEXT, ("quantized_model_id", "quantized_filename"), ("dtype", "max_seq_len", "max_batch_size")),
    "VisionPlain": (
        MULTIMODAL,
        ("model_id",),
        ("dtype", "max_seq_len", "max_batch_size", "max_num_images", "max_image_length"),
    ),
    "MultimodalPlain": (
        MULTIMODAL,
        ("model_id",),
        ("dtype", "max_seq_len", "max_batch_size", "max_num_images", "max_image_length"),
    ),
    "DiffusionPlain": (DIFFUSION, ("model_id",), ("arch", "dtype")),
    "Speech": (SPEECH, ("model_id",), ("arch", "dtype")),
    "Embedding": (EMBEDDING, ("model_id",), ()),
    "Run": (AUTO, ("model_id",), ("dtype", "max_seq_len", "max_batch_size")),
}
# Keys allowed next to the variant in one entry (`ModelConfigParsed`).
_JSON_ENTRY_KEYS = ("alias", "chat_template", "jinja_explicit", "num_device_layers", "in_situ_quant")


def _models_from_json(path: str, *, strict: bool) -> tuple[FakeModel, ...]:
    def bad(detail: str) -> NoReturn:
        _fail(f"Failed to parse multi-model config: {detail}")

    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        _fail(f"Failed to read multi-model config file {path}: {exc.strerror} (os error {exc.errno})")
    try:
        config = json.loads(text)
    except ValueError as exc:
        bad(str(exc))
    if not isinstance(config, dict):
        bad(f"invalid type: {_json_kind(config)}, expected a map")
    if not config:
        _fail("Multi-model configuration file is empty")
    models = []
    for label, entry in config.items():
        if not isinstance(entry, dict):
            bad(f"{label}: invalid type: {_json_kind(entry)}, expected struct ModelConfigParsed")
        variants = [key for key in entry if key not in _JSON_ENTRY_KEYS]
        if len(variants) != 1 or variants[0] not in _JSON_VARIANTS:
            unknown = ", ".join(f"`{key}`" for key in variants) or "none"
            expected = ", ".join(f"`{name}`" for name in _JSON_VARIANTS)
            bad(f"{label}: unknown variant {unknown}, expected one of {expected}")
        variant = variants[0]
        fields = entry[variant]
        if not isinstance(fields, dict):
            bad(f"{label}: invalid type: {_json_kind(fields)}, expected struct variant {variant}")
        category, required, serde_required = _JSON_VARIANTS[variant]
        for name in required + (serde_required if strict else ()):
            if fields.get(name) is None:
                bad(f"{label}: missing field `{name}`")
        for name in ("model_id", "quantized_model_id", "quantized_filename", "tok_model_id"):
            if fields.get(name) is not None and not isinstance(fields[name], str):
                bad(f"{label}: {name}: invalid type: {_json_kind(fields[name])}, expected a string")
        alias = entry.get("alias")
        if alias is not None and not isinstance(alias, str):
            bad(f"{label}: alias: invalid type: {_json_kind(alias)}, expected a string")
        if variant == "GGUF":
            pipeline = fields.get("tok_model_id") or fields["quantized_model_id"]
            gguf_dir = fields["quantized_model_id"]
        else:
            pipeline, gguf_dir = fields["model_id"], None
        model_id = alias or pipeline
        others = (pipeline,) if model_id != pipeline else ()
        models.append(FakeModel(model_id, category or _auto_category(pipeline), others, gguf_dir))
    return tuple(models)


# --- TOML (new `from-config -f FILE`) --------------------------------------------------------------


def _spec_from_toml(path: str) -> EngineSpec:
    def bad(detail: str) -> NoReturn:
        _fail(f"Failed to parse config file {path}: {detail}")

    def table(parent: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
        value = parent.get(key, {})
        if not isinstance(value, dict):
            bad(f"{where}{key}: invalid type, expected a table")
        return value

    def string(parent: Mapping[str, Any], key: str, where: str) -> str | None:
        value = parent.get(key)
        if value is not None and not isinstance(value, str):
            bad(f"{where}{key}: invalid type, expected a string")
        return value

    import tomllib

    try:
        with open(path, "rb") as handle:
            config = tomllib.load(handle)
    except OSError as exc:
        _fail(f"Failed to read config file {path}: {exc.strerror} (os error {exc.errno})")
    except tomllib.TOMLDecodeError as exc:
        bad(str(exc))
    command = config.get("command")
    if command is None:
        bad("missing field `command`")
    if command == "run":
        _fail('the fake engine implements only `command = "serve"`')
    if command != "serve":
        bad(f"unknown variant `{command}`, expected `serve` or `run`")
    server = table(config, "server", "")
    table(config, "runtime", "")  # free-form, but must be a table
    port = server.get("port", 1234)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port < 2**16:
        bad("server.port: invalid value, expected u16")
    host = string(server, "host", "server.") or "0.0.0.0"
    default_model_id = string(config, "default_model_id", "")
    entries = config.get("models", [])
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        bad("models: invalid type, expected an array of tables ([[models]])")
    if not entries:
        _fail(f"No models specified in config file {path}")
    models = []
    for number, entry in enumerate(entries):
        where = f"models[{number}]."
        model_id = string(entry, "model_id", where)
        if model_id is None:
            bad(f"{where[:-1]}: missing field `model_id`")
        kind = entry.get("kind", "auto")
        if kind not in NEW_TYPES:
            bad(f"{where}kind: unknown variant `{kind}`, expected one of {', '.join(NEW_TYPES)}")
        fmt = table(entry, "format", where)
        if fmt.get("format") not in (None, "plain", "gguf", "ggml"):
            bad(f"{where}format.format: unknown variant `{fmt['format']}`, expected plain, gguf or ggml")
        quantization = table(entry, "quantization", where)
        for key in ("isq", "in_situ_quant", "quant", "from_uqff"):
            string(quantization, key, f"{where}quantization.")
        models.append(
            _new_cli_model(
                model_id=model_id,
                kind=kind,
                fmt=fmt.get("format"),
                quantized_file=string(fmt, "quantized_file", f"{where}format."),
                tok_model_id=string(fmt, "tok_model_id", f"{where}format."),
            )
        )
    return EngineSpec(NEW_CLI, host, port, tuple(models), default_model_id)


def _program_name(prog: str) -> str | None:
    """`mistralrs` or `mistralrs-server` when a wrapper runs us under that name, else None.

    A shebang wrapper (`#!.../python` + `runpy.run_path(fake_engine.py)`) shows up in sys.orig_argv even
    though runpy rewrites sys.argv[0]. (`exec -a mistralrs python ...` would not help: a venv's python
    finds its site-packages through its own argv[0].)
    """
    interpreter_args = list(getattr(sys, "orig_argv", []))
    script = next((arg for arg in interpreter_args[1:] if not arg.startswith("-")), None)
    for candidate in (prog, script):
        if candidate and os.path.basename(candidate) in (LEGACY_CLI, NEW_CLI):
            return os.path.basename(candidate)
    return None


def parse_command_line(prog: str, argv: Sequence[str], *, strict_serde: bool = False) -> EngineSpec:
    """Pick the grammar (see the module docstring), parse `argv` and build the EngineSpec.

    `strict_serde`: see FAKE_ENGINE_STRICT_SERDE in the module docstring.
    """
    name = _program_name(prog)
    if name is None:
        name = NEW_CLI if argv and argv[0] in ("serve", "from-config") else LEGACY_CLI
    if name == LEGACY_CLI:
        legacy = legacy_parser()
        return _spec_from_legacy(legacy, legacy.parse_args(argv), strict_serde=strict_serde)
    ns = new_parser().parse_args(argv)
    if ns.command == "from-config":
        return _spec_from_toml(ns.file)
    return _spec_from_serve(ns)


# ---------------------------------------------------------------------------------------------------
# Behaviour knobs
# ---------------------------------------------------------------------------------------------------


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Knobs:
    """The FAKE_ENGINE_* environment variables (see the module docstring)."""

    load_delay: float = 0.0
    spawn_log: str | None = None
    exit_at_start: int | None = None
    never_ready: bool = False
    ignore_sigterm: bool = False
    chunk_delay: float = 0.0
    request_log: str | None = None
    embed_dim: int = 64
    embed_delay: float = 0.0
    strict_serde: bool = False
    broken: str | None = None
    say: str | None = None
    print_env: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Knobs:
        exit_code = env.get("FAKE_ENGINE_EXIT_AT_START")
        return cls(
            load_delay=float(env.get("FAKE_ENGINE_LOAD_DELAY") or 0),
            spawn_log=env.get("FAKE_ENGINE_SPAWN_LOG") or None,
            exit_at_start=int(exit_code) if exit_code else None,
            never_ready=_truthy(env.get("FAKE_ENGINE_NEVER_READY")),
            ignore_sigterm=_truthy(env.get("FAKE_ENGINE_IGNORE_SIGTERM")),
            chunk_delay=float(env.get("FAKE_ENGINE_CHUNK_DELAY") or 0),
            request_log=env.get("FAKE_ENGINE_REQUEST_LOG") or None,
            embed_dim=int(env.get("FAKE_ENGINE_EMBED_DIM") or 64),
            embed_delay=float(env.get("FAKE_ENGINE_EMBED_DELAY") or 0),
            strict_serde=_truthy(env.get("FAKE_ENGINE_STRICT_SERDE")),
            broken=env.get("FAKE_ENGINE_BROKEN") or None,
            say=env.get("FAKE_ENGINE_SAY") or None,
            print_env=_truthy(env.get("FAKE_ENGINE_PRINT_ENV")),
        )

    def first_lines(self, env: Mapping[str, str]) -> list[str]:
        """What FAKE_ENGINE_SAY and FAKE_ENGINE_PRINT_ENV make it print at start."""
        lines = [self.say] if self.say else []
        if self.print_env:
            lines += [f"{name}={value}" for name, value in sorted(env.items())]
        return lines


def _append_line(fd: int, record: Mapping[str, Any]) -> None:
    # One os.write on an O_APPEND descriptor: lines from concurrent processes never interleave.
    os.write(fd, (json.dumps(record) + "\n").encode())


def _open_log(path: str | None) -> int | None:
    if path is None:
        return None
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


# ---------------------------------------------------------------------------------------------------
# Generated content: replies, embeddings, images, audio
# ---------------------------------------------------------------------------------------------------

_PIECE = re.compile(r"\s*\S+")
_COUNT = re.compile(r"count:(\d+)")
_SLOW = re.compile(r"slow:(\d+(?:\.\d*)?|\.\d+)")
_CALL = re.compile(r"call:(\S+)")
_CALLS = re.compile(r"calls:(\d+)")


@dataclass(frozen=True)
class Plan:
    """What one generation request will produce (one choice; n > 1 choices are copies of it)."""

    pieces: tuple[str, ...]  # stream deltas; "".join(pieces) is the whole reply
    finish_reason: str = "stop"
    scenario: str = "normal"  # normal | slow | crash | hang | freeze | error
    interval: float = 0.0  # seconds between chunks (slow)
    calls: tuple[tuple[str, str], ...] = ()  # (name, arguments JSON) of each tool call; no pieces then

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def tokens(self) -> tuple[str, ...]:
        """The generated tokens (usage, logprobs): the pieces, or one JSON object per tool call."""
        if self.calls:
            return tuple(_json_text({"name": name, "arguments": json.loads(args)}) for name, args in self.calls)
        return self.pieces


@dataclass(frozen=True)
class Generation:
    """The request fields of chat and completions that shape the answer (see the HTTP API for parsing)."""

    n: int = 1
    max_tokens: int | None = None
    stops: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 1  # mistral.rs: `top_logprobs.unwrap_or(1)`
    schema: Any = None  # the JSON schema the content must follow (response_format / grammar), or None


def _words(count: int) -> tuple[str, ...]:
    return tuple(f"w{i}" if i == 0 else f" w{i}" for i in range(count))


def _split(text: str) -> tuple[str, ...]:
    pieces = _PIECE.findall(text)
    if not pieces:
        return (text,) if text else ()
    tail = text[len("".join(pieces)) :]
    if tail:  # trailing whitespace rides on the last piece so nothing is lost
        pieces[-1] += tail
    return tuple(pieces)


def reply_plan(prompt: str) -> Plan:
    """The reply to `prompt` before any limit (see "Magic prompts" in the module docstring)."""
    command = prompt.strip()
    if command in ("crash", "hang", "freeze"):
        return Plan(_words(3 if command == "crash" else 2), scenario=command)
    if command == "error":
        return Plan(_words(2), scenario="error")
    slow = _SLOW.match(command)
    if slow:
        return Plan(_words(10), scenario="slow", interval=float(slow.group(1)) / 10)
    count = _COUNT.match(command)
    return Plan(_words(int(count.group(1))) if count else _split("echo: " + prompt))


def _limit(plan: Plan, max_tokens: int | None) -> Plan:
    if max_tokens is not None and len(plan.pieces) > max_tokens:
        return replace(plan, pieces=plan.pieces[:max_tokens], finish_reason="length")
    return plan


def plan_reply(prompt: str, max_tokens: int | None) -> Plan:
    """Decide the reply to `prompt`, cut to `max_tokens` pieces."""
    return _limit(reply_plan(prompt), max_tokens)


def finish_plan(plan: Plan, gen: Generation) -> Plan:
    """Apply the request's constraints to a text reply: JSON schema, then stop strings, then max_tokens."""
    if plan.calls:
        return plan
    if gen.schema is not None and plan.scenario == "normal":
        plan = replace(plan, pieces=_json_pieces(_json_text(schema_instance(gen.schema, plan.text))))
    return _limit(cut_at_stop(plan, gen.stops), gen.max_tokens)


def chat_plan(messages: list[Any] | str, tools: ToolRequest, gen: Generation) -> Plan:
    """The reply to a conversation: a forced tool call, the answer to a tool result, an asked-for call, or text."""
    prompt = messages if isinstance(messages, str) else _last_user_text(messages)
    plan = reply_plan(prompt)
    if plan.scenario == "normal":
        result = None if isinstance(messages, str) else _tool_result(messages)
        forced = tools.forced()
        called = forced or (tools.asked(prompt) if result is None else ())
        if called:
            calls = tuple((tool.name, _json_text(schema_instance(tool.parameters, None))) for tool in called)
            if forced and gen.max_tokens is not None:
                # A forced call is written under a grammar as {"name":...,"arguments":...}, one token per 8
                # characters here; cut by max_tokens, it stays that text (finish "length"), as mistral.rs leaves it.
                pieces = _json_pieces(_json_text({"name": calls[0][0], "arguments": json.loads(calls[0][1])}))
                if gen.max_tokens < len(pieces):
                    return Plan(pieces[: gen.max_tokens], "length")
            return Plan((), "tool_calls", calls=calls)
        if result is not None:
            plan = Plan(_split("tool said: " + result))
    return finish_plan(plan, gen)


# --- stop strings ----------------------------------------------------------------------------------


def cut_at_stop(plan: Plan, stops: Sequence[str]) -> Plan:
    """Cut the reply before the first occurrence of any stop string (which is not sent), finish "stop"."""
    text = plan.text
    found = [text.find(stop) for stop in stops if stop and stop in text]
    if not found:
        return plan
    end, used, pieces = min(found), 0, []
    for piece in plan.pieces:
        if used >= end:
            break
        pieces.append(piece[: end - used])
        used += len(piece)
    return replace(plan, pieces=tuple(pieces), finish_reason="stop")


# --- structured output: a JSON instance of a schema --------------------------------------------------

_STRING_FORMATS = {
    "date": "2024-01-01",
    "date-time": "2024-01-01T00:00:00Z",
    "time": "00:00:00Z",
    "email": "user@example.com",
    "uri": "https://example.com",
    "uuid": "00000000-0000-4000-8000-000000000000",
}


def schema_instance(schema: Any, answer: str | None, root: Any = None, depth: int = 0) -> Any:
    """A small JSON value that `schema` accepts, the same every time.

    An object schema without properties becomes ``{"answer": answer}`` (the reply the request would
    have had without a schema), or ``{}`` when `answer` is None (tool arguments).
    """
    root = schema if root is None else root
    if not isinstance(schema, dict) or depth > 16:
        return {"answer": answer} if answer is not None else {}

    def sub(inner: Any) -> Any:
        return schema_instance(inner, answer, root, depth + 1)

    if isinstance(schema.get("$ref"), str):
        target: Any = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target.get(part) if isinstance(target, dict) and part else target
        return sub(target)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return sub(schema[key][0])
    if isinstance(schema.get("allOf"), list):
        merged = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            merged.update(part if isinstance(part, dict) else {})
        return sub(merged)
    kind = schema.get("type")
    if isinstance(kind, list):  # ["string", "null"]: the first non-null type
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "array" if "items" in schema else "object"
    if kind == "object":
        properties = schema.get("properties")
        if not isinstance(properties, dict) or not properties:
            if answer is None or schema.get("additionalProperties") is False:
                return {}
            return {"answer": answer}
        required = [name for name in schema.get("required") or () if isinstance(name, str)] or list(properties)
        return {name: sub(properties.get(name, {"type": "string"})) for name in required}
    if kind == "array":
        count = max(1, int(schema.get("minItems") or 0))
        if schema.get("maxItems") == 0:
            count = 0
        return [sub(schema.get("items", {"type": "string"})) for _ in range(count)]
    if kind == "string":
        text = _STRING_FORMATS.get(str(schema.get("format")), "word")
        text += "x" * max(0, int(schema.get("minLength") or 0) - len(text))
        maximum = schema.get("maxLength")
        return text[:maximum] if isinstance(maximum, int) else text
    if kind in ("number", "integer"):
        value: float = 0
        if isinstance(schema.get("minimum"), (int, float)):
            value = schema["minimum"]
        elif isinstance(schema.get("exclusiveMinimum"), (int, float)):
            value = schema["exclusiveMinimum"] + 1
        if isinstance(schema.get("maximum"), (int, float)) and value > schema["maximum"]:
            value = schema["maximum"]
        return math.ceil(value) if kind == "integer" else value
    if kind == "boolean":
        return True
    return None


def _json_text(value: Any) -> str:
    # What a model writes: compact, UTF-8 (not \u escapes), as serde_json prints it.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _json_pieces(text: str) -> tuple[str, ...]:
    """Structured output streams as a few chunks of up to 8 characters."""
    return tuple(text[start : start + 8] for start in range(0, len(text), 8))


# --- tools -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tool:
    name: str
    parameters: Any = None  # the JSON schema of its arguments


@dataclass(frozen=True)
class ToolRequest:
    """`tools` and `tool_choice` of a chat request."""

    tools: tuple[Tool, ...] = ()
    choice: str = "auto"  # none | auto | required | named
    name: str | None = None  # the tool a named choice forces

    def forced(self) -> tuple[Tool, ...]:
        """The call `tool_choice` forces: the named tool, or the first tool for "required"."""
        if self.choice == "named":
            return tuple(tool for tool in self.tools if tool.name == self.name)[:1]
        return self.tools[:1] if self.choice == "required" else ()

    def asked(self, prompt: str) -> tuple[Tool, ...]:
        """The calls the prompt asks for with `call:NAME` / `calls:N` (tool_choice "auto" only)."""
        if self.choice != "auto" or not self.tools:
            return ()
        command = prompt.strip()
        many = _CALLS.match(command)
        if many:
            return tuple(self.tools[i % len(self.tools)] for i in range(int(many.group(1))))
        one = _CALL.match(command)
        if one:  # a tool that is not offered is still called, with no arguments (a model can do that)
            return (next((tool for tool in self.tools if tool.name == one.group(1)), Tool(one.group(1))),)
        return ()


def _tool_result(messages: list[Any]) -> str | None:
    """The content of the last message when it is a tool result (the second turn of a tool loop)."""
    last = messages[-1] if messages else None
    if isinstance(last, dict) and last.get("role") == "tool":
        return _message_text(last.get("content"))
    return None


def _tool_call_objects(plan: Plan) -> list[dict[str, Any]] | None:
    """mistral.rs `ToolCallResponse`s for the plan's calls, with new ids (each choice has its own)."""
    if not plan.calls:
        return None
    return [
        {
            "index": index,
            "id": f"call-{uuid.uuid4()}",
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }
        for index, (name, arguments) in enumerate(plan.calls)
    ]


# --- logprobs --------------------------------------------------------------------------------------

VOCAB_SIZE = 32000


def token_logprob(piece: str, top: int) -> dict[str, Any]:
    """mistral.rs `ResponseLogprob` for one generated token, derived from a hash of its text.

    Generation is greedy, so the token itself heads `top_logprobs` (TopLogprob: token id, logprob,
    text); the alternatives share the rest of the probability mass, halving each time.
    """
    digest = hashlib.sha256(piece.encode()).digest()
    chosen = -0.05 - digest[0] / 2550  # a probability between 0.86 and 0.95
    rest = math.log(-math.expm1(chosen))  # log(1 - p)
    first_id = int.from_bytes(digest[1:4], "big") % VOCAB_SIZE
    alternatives = [
        {
            "token": (first_id + rank * 7919) % VOCAB_SIZE,  # 7919 is prime to VOCAB_SIZE: distinct ids
            "logprob": round(chosen if rank == 0 else rest - rank * math.log(2), 6),
            "bytes": piece if rank == 0 else f"alt{rank}",
        }
        for rank in range(min(top, VOCAB_SIZE))
    ]
    return {"token": piece, "logprob": round(chosen, 6), "bytes": list(piece.encode()), "top_logprobs": alternatives}


def _logprobs_whole(plan: Plan, gen: Generation) -> dict[str, Any] | None:
    """A non-streaming choice's `logprobs`: `{"content": [one ResponseLogprob per token]}`."""
    if not gen.logprobs:
        return None
    return {"content": [token_logprob(token, gen.top_logprobs) for token in plan.tokens]}


def _logprob_of_piece(piece: str | None, gen: Generation) -> dict[str, Any] | None:
    """A chunk's `logprobs`: ONE ResponseLogprob, for the chunk's piece (null without one)."""
    return token_logprob(piece, gen.top_logprobs) if gen.logprobs and piece is not None else None


def embedding_vector(item: str | list[int], dim: int) -> tuple[float, ...]:
    """A deterministic unit vector derived from a hash of the item, rounded to float32 like the engine."""
    raw = struct.unpack(f"<{dim}h", hashlib.shake_256(json.dumps(item).encode()).digest(2 * dim))
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return struct.unpack(f"<{dim}f", struct.pack(f"<{dim}f", *(x / norm for x in raw)))


def png_bytes(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A valid solid-colour RGB PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + bytes(rgb) * width  # filter type 0, then the pixels
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * height))
        + chunk(b"IEND", b"")
    )


def _wav_silence(seconds: float = 0.1, rate: int = 24000) -> bytes:
    data = bytes(2 * int(seconds * rate))  # 16-bit mono zeros
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


WAV_SILENCE = _wav_silence()
MAX_IMAGE_SIDE = 64  # real engines default to 1280x720; the fake stays cheap


# ---------------------------------------------------------------------------------------------------
# HTTP API
# ---------------------------------------------------------------------------------------------------


class Abort(Exception):
    """Stop a handler and answer with `response` (turned into the response by the app)."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


def _message(status: int, message: str, **extra: Any) -> Abort:
    # mistral.rs errors are `{"message": ...}`, not OpenAI-shaped.
    return Abort(JSONResponse({"message": message, **extra}, status_code=status))


def _deserialize_error(detail: str) -> Abort:
    # What axum's Json extractor answers when serde rejects the body's shape.
    return Abort(PlainTextResponse(f"Failed to deserialize the JSON body into the target type: {detail}", 422))


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return f"boolean `{str(value).lower()}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{value}`"
    if isinstance(value, str):
        return f"string {json.dumps(value)}"
    if isinstance(value, list):
        return "sequence"
    if isinstance(value, dict):
        return "map"
    return "null"


def _field(body: Mapping[str, Any], key: str, kinds: tuple[type, ...], expected: str) -> Any:
    """An optional body field of the given JSON type (null counts as absent, as with serde Option)."""
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise _deserialize_error(f"{key}: invalid type: {_json_kind(value)}, expected {expected}")
    return value


def _uint_field(body: Mapping[str, Any], key: str) -> int | None:
    value = _field(body, key, (int,), "usize")
    if value is None:
        return None
    if value < 0:
        raise _deserialize_error(f"{key}: invalid value: integer `{value}`, expected usize")
    return int(value)


# --- generation fields of chat and completions requests --------------------------------------------


def _generation(body: Mapping[str, Any], *, chat: bool) -> Generation:
    """Read n, max_tokens, stop, logprobs and the output constraint, as serde and mistral.rs do.

    Chat: `logprobs` is a boolean and `top_logprobs` a count; completions: `logprobs` is the count.
    `seed`, `stream_options`, `parallel_tool_calls`, `user`, `metadata` are accepted and ignored.
    """
    n = _uint_field(body, "n")
    if n == 0:
        raise _message(422, "`n` must be at least 1.", param="n")
    if chat:
        logprobs = bool(_field(body, "logprobs", (bool,), "a boolean"))
        top = _uint_field(body, "top_logprobs")
        top_logprobs = 1 if top is None else top
    else:
        count = _uint_field(body, "logprobs")
        logprobs, top_logprobs = count is not None, count or 0
    return Generation(
        n=1 if n is None else n,
        max_tokens=_uint_field(body, "max_tokens"),
        stops=_stops(body),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        schema=_output_schema(body, chat=chat),
    )


def _stops(body: Mapping[str, Any]) -> tuple[str, ...]:
    """`stop`: one string or a list of strings (serde's untagged `StopTokens`)."""
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise _deserialize_error("stop: data did not match any variant of untagged enum StopTokens")


def _output_schema(body: Mapping[str, Any], *, chat: bool) -> Any:
    """The JSON schema a `response_format` (chat only) or a `grammar` (mistral.rs's extension) imposes."""
    grammar = body.get("grammar")
    response_format = body.get("response_format") if chat else None
    if grammar is not None and response_format is not None:
        raise _message(422, "Request `grammar` and `response_format` were both provided but are mutually exclusive.")
    if grammar is not None:
        if not isinstance(grammar, dict):
            given = _json_kind(grammar)
            raise _deserialize_error(f"grammar: invalid type: {given}, expected adjacently tagged enum Grammar")
        kind = grammar.get("type")
        if kind not in ("regex", "json_schema", "llguidance", "lark"):
            raise _deserialize_error(
                f"grammar: unknown variant `{kind}`, expected one of `regex`, `json_schema`, `llguidance`, `lark`"
            )
        if "value" not in grammar:
            raise _deserialize_error("grammar: missing field `value`")
        # The other grammars constrain the text in ways the fake does not imitate: it answers as usual.
        return grammar["value"] if kind == "json_schema" else None
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        given = _json_kind(response_format)
        raise _deserialize_error(
            f"response_format: invalid type: {given}, expected internally tagged enum ResponseFormat"
        )
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        # The gateway rewrites json_object into a json_schema; reaching an engine with it is a gateway bug.
        raise _message(
            422,
            "response_format `json_object` is not supported; send a `json_schema` response format",
            param="response_format",
        )
    if kind != "json_schema":
        raise _deserialize_error(
            f"response_format: unknown variant `{kind}`, expected one of `text`, `json_object`, `json_schema`"
        )
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise _deserialize_error("response_format: missing field `json_schema`")
    for name in ("name", "schema"):
        if name not in spec:
            raise _deserialize_error(f"response_format: json_schema: missing field `{name}`")
    return spec["schema"]


def _tool_request(body: Mapping[str, Any]) -> ToolRequest:
    """`tools` (Chat Completions form) and `tool_choice`, checked as mistral.rs checks them."""
    given = body.get("tools")
    if given is not None and not isinstance(given, list):
        raise _deserialize_error(f"tools: invalid type: {_json_kind(given)}, expected a sequence")
    tools = []
    for item in given or ():
        function = item.get("function") if isinstance(item, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _deserialize_error("tools: data did not match any variant of untagged enum OpenAiTool")
        tools.append(Tool(function["name"], function.get("parameters")))
    choice = body.get("tool_choice")
    if choice is None or choice in ("none", "auto", "required"):
        request = ToolRequest(tuple(tools), choice or "auto")
    else:
        function = choice.get("function") if isinstance(choice, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _deserialize_error("tool_choice: data did not match any variant of untagged enum ToolChoice")
        request = ToolRequest(tuple(tools), "named", function["name"])
    if request.choice == "required" and not tools:
        raise _message(422, 'tool_choice="required" requires at least one tool.')
    if request.choice == "named" and not request.forced():
        raise _message(422, f"tool_choice references unknown function tool `{request.name}`.")
    return request


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        return " ".join(
            part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _message_text(message.get("content"))
    return ""


def _count_words(messages: list[Any] | str) -> int:
    if isinstance(messages, str):
        return len(messages.split())
    return sum(len(_message_text(message.get("content")).split()) for message in messages if isinstance(message, dict))


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _chat_choice(index: int, plan: Plan, gen: Generation, finish_reason: str) -> dict[str, Any]:
    """One choice of a non-streaming chat answer (mistral.rs `Choice`)."""
    calls = _tool_call_objects(plan)
    message = {"role": "assistant", "content": None if calls else plan.text, "tool_calls": calls}
    return {"index": index, "message": message, "finish_reason": finish_reason, "logprobs": _logprobs_whole(plan, gen)}


def _chat_chunk_choice(
    index: int, plan: Plan, gen: Generation, piece: str | None, finish: str | None
) -> dict[str, Any]:
    """One choice of a chat chunk (mistral.rs `ChunkChoice`): tool calls arrive whole with their finish_reason."""
    calls = _tool_call_objects(plan) if finish == "tool_calls" else None
    delta = {"role": "assistant", "content": piece, "tool_calls": calls}
    return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": _logprob_of_piece(piece, gen)}


def _completion_choice(index: int, text: str, finish: str | None, logprobs: Any) -> dict[str, Any]:
    """One choice of a completions answer or chunk (mistral.rs `CompletionChoice` / `CompletionChunkChoice`)."""
    return {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}


class FakeEngine:
    """The loaded models and the HTTP API that serves them."""

    def __init__(
        self,
        spec: EngineSpec,
        knobs: Knobs,
        *,
        die: Callable[[], Awaitable[None]] | None = None,
        freeze: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.spec = spec
        self.knobs = knobs
        # How the engine dies on a `crash` prompt and blocks on a `freeze` one: a process exits at once and blocks
        # its event loop; an engine run inside a test's process (tests/inprocess.py) does the same to itself only.
        self._die = die or _exit_now
        self._freeze = freeze or _block_the_loop
        self.created = int(time.time())
        self.models = spec.models
        self.by_id: dict[str, FakeModel] = {}
        for model in spec.models:
            for name in (model.model_id, *model.other_ids):
                self.by_id.setdefault(name, model)
        default_id = spec.default_model_id or spec.models[0].model_id
        self.default = self.by_id[default_id]
        self._ids = itertools.count()
        self._request_log = _open_log(knobs.request_log)
        self.paged_attn = spec.paged_attn
        self.sequences = 0  # generations in progress: what the KV cache holds

    def app(self) -> Starlette:
        routes = [
            Route("/", self.root, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
            Route("/v1/images/generations", self.image_generations, methods=["POST"]),
            Route("/v1/audio/speech", self.speech, methods=["POST"]),
            Route("/v1/responses", self.responses, methods=["POST"]),
        ]
        return Starlette(routes=routes, exception_handlers={Abort: self._abort})

    async def _abort(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Abort)
        return exc.response

    # --- shared request handling ------------------------------------------------------------------

    def _log(self, request: Request, body: Any) -> None:
        if self._request_log is not None:
            _append_line(
                self._request_log,
                {
                    "method": request.method,
                    "path": request.url.path,
                    "body": body,
                    "authorization": request.headers.get("authorization"),
                },
            )

    async def _body(self, request: Request, struct_name: str, required: tuple[str, ...]) -> dict[str, Any]:
        """Read the body the way axum's `Json<T>` extractor does, with its plain-text errors."""
        raw = await request.body()
        try:
            body: Any = json.loads(raw)
            syntax_error = None
        except ValueError as exc:
            body, syntax_error = None, exc
        self._log(request, body)
        mime = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if not (mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))):
            raise Abort(PlainTextResponse("Expected request with `Content-Type: application/json`", 415))
        if syntax_error is not None:
            detail = syntax_error.msg if isinstance(syntax_error, json.JSONDecodeError) else str(syntax_error)
            position = ""
            if isinstance(syntax_error, json.JSONDecodeError):
                position = f" at line {syntax_error.lineno} column {syntax_error.colno}"
            raise Abort(PlainTextResponse(f"Failed to parse the request body as JSON: {detail.lower()}{position}", 400))
        if not isinstance(body, dict):
            raise _deserialize_error(f"invalid type: {_json_kind(body)}, expected struct {struct_name}")
        for name in required:
            if name not in body:
                lines = raw.decode(errors="replace").rstrip().split("\n")
                raise _deserialize_error(f"missing field `{name}` at line {len(lines)} column {len(lines[-1])}")
        return body

    def _model(self, body: Mapping[str, Any], *, unknown_status: int) -> FakeModel:
        requested = _field(body, "model", (str,), "a string")
        if requested is None or requested == "default":
            return self.default
        model = self.by_id.get(requested)
        if model is None:
            available = ", ".join(m.model_id for m in self.models)
            raise _message(
                unknown_status,
                f"Requested model '{requested}' is not available. Available models: {available}. "
                "Use 'default' to use the default model.",
            )
        return model

    @staticmethod
    def _require_category(model: FakeModel, categories: tuple[str, ...], status: int = 422) -> None:
        if model.category not in categories:
            raise _message(status, "Received a request incompatible for this model's category.")

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    async def _stream(
        self, plan: Plan, frame: Callable[[int, str | None, str | None], dict[str, Any]]
    ) -> AsyncIterator[bytes]:
        """SSE events for `plan`; `frame(index, delta, finish_reason)` builds one chunk object. A stream its client
        leaves before the end is noted in the request log (``{"event": "stream_abandoned", "sent": chunks}``): it
        shows that the engine stopped generating."""
        sent = 0
        self.sequences += 1
        try:
            async for event in self._frames(plan, frame):
                yield event
                sent += 1
        finally:
            self.sequences -= 1
            if sent < len(plan.pieces) + 2 and plan.scenario in ("normal", "slow") and self._request_log is not None:
                _append_line(self._request_log, {"event": "stream_abandoned", "sent": sent})

    async def _frames(
        self, plan: Plan, frame: Callable[[int, str | None, str | None], dict[str, Any]]
    ) -> AsyncIterator[bytes]:
        delay = plan.interval or self.knobs.chunk_delay
        for index, piece in enumerate(plan.pieces):
            if index and delay:
                await asyncio.sleep(delay)
            yield b"data: " + _compact(frame(index, piece, None)).encode() + b"\n\n"
        if plan.scenario == "crash":
            # The chunks already sit in the kernel's socket buffer; dying now is like a SIGKILL.
            await self._die()
        if plan.scenario == "hang":
            await asyncio.Event().wait()
        if plan.scenario == "freeze":
            await self._freeze()  # nothing this engine serves answers any more
        if plan.scenario == "error":
            # The real engine sends stream errors as plain text, not JSON.
            yield b"data: simulated engine error\n\n"
            yield b"data: [DONE]\n\n"
            return
        if delay:
            await asyncio.sleep(delay)
        yield b"data: " + _compact(frame(len(plan.pieces), None, plan.finish_reason)).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    @staticmethod
    def _sse(events: AsyncIterator[bytes]) -> StreamingResponse:
        return StreamingResponse(events, media_type="text/event-stream", headers={"cache-control": "no-cache"})

    async def _settle(self, plan: Plan, partial: Callable[[], dict[str, Any]]) -> None:
        """Play a non-streaming scenario before the answer is sent (a generation in progress meanwhile)."""
        self.sequences += 1
        try:
            await self._play(plan, partial)
        finally:
            self.sequences -= 1

    async def _play(self, plan: Plan, partial: Callable[[], dict[str, Any]]) -> None:
        if plan.scenario == "crash":
            await self._die()
        if plan.scenario == "hang":
            await asyncio.Event().wait()
        if plan.scenario == "freeze":
            await self._freeze()  # nothing this engine serves answers any more
        if plan.scenario == "slow":
            await asyncio.sleep(plan.interval * (len(plan.pieces) or 1))
        if plan.scenario == "error":
            raise _message(500, "simulated engine error", partial_response=partial())

    # --- routes -----------------------------------------------------------------------------------

    async def root(self, request: Request) -> Response:
        return PlainTextResponse("OK")

    async def health(self, request: Request) -> Response:
        return PlainTextResponse("OK")

    async def metrics(self, request: Request) -> Response:
        lines = ["# HELP http_requests_in_flight Requests in flight.", "# TYPE http_requests_in_flight gauge"]
        lines.append(f"http_requests_in_flight {self.sequences}")
        if self.paged_attn:
            lines += [
                "# TYPE mistralrs_kv_cache_blocks_used gauge",
                f"mistralrs_kv_cache_blocks_used {self.sequences * KV_BLOCKS_PER_SEQUENCE}",
                "# TYPE mistralrs_kv_cache_blocks_total gauge",
                f"mistralrs_kv_cache_blocks_total {KV_BLOCKS_TOTAL}",
            ]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def list_models(self, request: Request) -> Response:
        self._log(request, None)
        data = [{"id": "default", "object": "model", "created": self.created, "owned_by": "local"}]
        data += [
            {
                "id": m.model_id,
                "object": "model",
                "created": self.created,
                "owned_by": "local",
                "status": "loaded",
            }
            for m in self.models
        ]
        return JSONResponse({"object": "list", "data": data})

    async def chat_completions(self, request: Request) -> Response:
        body = await self._body(request, "ChatCompletionRequest", ("messages",))
        messages = body["messages"]
        if not isinstance(messages, (list, str)):
            raise _deserialize_error(
                f"messages: invalid type: {_json_kind(messages)}, expected a sequence of messages or a string"
            )
        stream = _field(body, "stream", (bool,), "a boolean")
        gen = _generation(body, chat=True)
        tools = _tool_request(body)
        model = self._model(body, unknown_status=500)
        self._require_category(model, (TEXT, MULTIMODAL))
        plan = chat_plan(messages, tools, gen)
        request_id, created = self._new_id("chatcmpl"), int(time.time())
        usage = _usage(_count_words(messages), gen.n * len(plan.tokens))

        def head(kind: str) -> dict[str, Any]:
            return {
                "id": request_id,
                "object": kind,
                "created": created,
                "model": model.model_id,
                "system_fingerprint": "local",
            }

        if stream:

            def frame(index: int, piece: str | None, finish: str | None) -> dict[str, Any]:
                choices = [_chat_chunk_choice(i, plan, gen, piece, finish) for i in range(gen.n)]
                return {**head("chat.completion.chunk"), "choices": choices, "usage": usage if finish else None}

            return self._sse(self._stream(plan, frame))

        def completion(finish_reason: str) -> dict[str, Any]:
            choices = [_chat_choice(i, plan, gen, finish_reason) for i in range(gen.n)]
            return {**head("chat.completion"), "choices": choices, "usage": usage}

        await self._settle(plan, lambda: completion("error"))
        return JSONResponse(completion(plan.finish_reason))

    async def completions(self, request: Request) -> Response:
        body = await self._body(request, "CompletionRequest", ("prompt",))
        prompt = body["prompt"]
        if not isinstance(prompt, str):  # one string: the engine takes no list, not even of strings
            raise _deserialize_error(f"prompt: invalid type: {_json_kind(prompt)}, expected a string")
        stream = _field(body, "stream", (bool,), "a boolean")
        gen = _generation(body, chat=False)
        model = self._model(body, unknown_status=500)
        self._require_category(model, (TEXT, MULTIMODAL))
        plan = finish_plan(reply_plan(prompt), gen)
        request_id, created = self._new_id("cmpl"), int(time.time())

        def head() -> dict[str, Any]:
            return {
                "id": request_id,
                "object": "text_completion",
                "created": created,
                "model": model.model_id,
                "system_fingerprint": "local",
            }

        if stream:

            def frame(index: int, piece: str | None, finish: str | None) -> dict[str, Any]:
                # mistral.rs's CompletionChunkResponse has no usage field at all.
                logprobs = _logprob_of_piece(piece, gen)
                choices = [_completion_choice(i, piece or "", finish, logprobs) for i in range(gen.n)]
                return {**head(), "choices": choices}

            return self._sse(self._stream(plan, frame))

        def completion(finish_reason: str) -> dict[str, Any]:
            logprobs = _logprobs_whole(plan, gen)
            choices = [_completion_choice(i, plan.text, finish_reason, logprobs) for i in range(gen.n)]
            return {**head(), "choices": choices, "usage": _usage(len(prompt.split()), gen.n * len(plan.tokens))}

        await self._settle(plan, lambda: completion("error"))
        return JSONResponse(completion(plan.finish_reason))

    async def embeddings(self, request: Request) -> Response:
        body = await self._body(request, "EmbeddingRequest", ("input",))
        items = _embedding_inputs(body["input"])
        encoding = body.get("encoding_format")
        if encoding not in (None, "float", "base64"):
            raise _deserialize_error(f"encoding_format: unknown variant `{encoding}`, expected `float` or `base64`")
        # The order of checks follows mistral.rs: model (422 here), dimensions, empty input, category.
        model = self._model(body, unknown_status=422)
        dimensions = body.get("dimensions")
        if dimensions is not None:
            raise _message(422, f"Custom embedding dimensions ({dimensions}) are not supported.")
        if not items:
            raise _message(422, "input must contain at least one entry.")
        self._require_category(model, (EMBEDDING,), status=500)
        if "error" in items:
            raise _message(500, "simulated embedding failure")
        if self.knobs.embed_delay:
            await asyncio.sleep(self.knobs.embed_delay)
        data = []
        tokens = 0
        for index, item in enumerate(items):
            vector = embedding_vector(item, self.knobs.embed_dim)
            if encoding == "base64":
                value: Any = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            else:
                value = vector
            data.append({"object": "embedding", "embedding": value, "index": index})
            tokens += len(item) if isinstance(item, list) else max(1, len(item.split()))
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": model.model_id,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    async def image_generations(self, request: Request) -> Response:
        body = await self._body(request, "ImageGenerationRequest", ("prompt",))
        prompt = _field(body, "prompt", (str,), "a string")
        response_format = body.get("response_format", "Url")
        if response_format not in ("Url", "B64Json"):
            # A Rust enum: OpenAI's "url" / "b64_json" spellings are refused.
            raise _deserialize_error(
                f"response_format: unknown variant `{response_format}`, expected `Url` or `B64Json`"
            )
        width = _uint_field(body, "width") or 1280
        height = _uint_field(body, "height") or 720
        count = _uint_field(body, "n") or 1
        model = self._model(body, unknown_status=500)
        self._require_category(model, (DIFFUSION,))
        digest = hashlib.sha256((prompt or "").encode()).digest()
        png = png_bytes(min(width, MAX_IMAGE_SIDE), min(height, MAX_IMAGE_SIDE), (digest[0], digest[1], digest[2]))
        data = []
        for _ in range(count):
            if response_format == "Url":
                # Like the engine: a file in its working directory, answered as a relative path.
                name = f"image-generation-{uuid.uuid4()}.png"
                with open(name, "wb") as handle:
                    handle.write(png)
                data.append({"url": name, "b64_json": None})
            else:
                encoded = base64.b64encode(png).decode()
                data.append({"url": None, "b64_json": f"data:image/png;base64,{encoded}"})
        return JSONResponse({"created": int(time.time()), "data": data})

    async def speech(self, request: Request) -> Response:
        body = await self._body(request, "SpeechGenerationRequest", ("input",))
        _field(body, "input", (str,), "a string")
        model = self._model(body, unknown_status=500)
        self._require_category(model, (SPEECH,))
        return Response(WAV_SILENCE, media_type="audio/wav")

    async def responses(self, request: Request) -> Response:
        body = await self._body(request, "ResponsesCreateRequest", ("input",))
        given = body["input"]
        if not isinstance(given, (str, list)):
            raise _deserialize_error(f"input: invalid type: {_json_kind(given)}, expected a string or a sequence")
        max_tokens = _uint_field(body, "max_output_tokens")
        model = self._model(body, unknown_status=500)
        self._require_category(model, (TEXT, MULTIMODAL))
        if _field(body, "stream", (bool,), "a boolean"):
            raise _message(422, "The fake engine does not stream the Responses API.")
        prompt = given if isinstance(given, str) else _last_user_text(given)
        plan = plan_reply(prompt, max_tokens)
        input_tokens = _count_words(given)

        def response(text: str, status: str) -> dict[str, Any]:
            return {
                "id": self._new_id("resp"),
                "object": "response",
                "created_at": int(time.time()),
                "model": model.model_id,
                "status": status,
                "output": [
                    {
                        "type": "message",
                        "id": self._new_id("msg"),
                        "status": status,
                        "role": "assistant",
                        "content": [{"type": "output_text", "text": text, "annotations": []}],
                    }
                ],
                "usage": {
                    "input_tokens": input_tokens,
                    "output_tokens": len(plan.pieces),
                    "total_tokens": input_tokens + len(plan.pieces),
                },
            }

        await self._settle(plan, lambda: response(plan.text, "failed"))
        return JSONResponse(response(plan.text, "completed" if plan.finish_reason == "stop" else "incomplete"))


def _embedding_inputs(value: Any) -> list[str | list[int]]:
    """`EmbeddingInput`: a string, strings, one token list or token lists (an untagged serde enum)."""

    def is_token(item: Any) -> bool:
        return isinstance(item, int) and not isinstance(item, bool) and item >= 0

    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        if all(isinstance(item, str) for item in value):
            return list(value)
        if all(is_token(item) for item in value):
            return [list(value)]
        if all(isinstance(item, list) and all(is_token(token) for token in item) for item in value):
            return list(value)
    raise _deserialize_error("input: data did not match any variant of untagged enum EmbeddingInput")


# ---------------------------------------------------------------------------------------------------
# Process: load, bind, serve
# ---------------------------------------------------------------------------------------------------


async def _exit_now() -> None:
    os._exit(1)


async def _block_the_loop() -> None:
    time.sleep(1e6)  # blocks the event loop: nothing this engine serves answers any more


def record_spawn(knobs: Knobs, prog: str, argv: Sequence[str], cwd: str, env: Mapping[str, str], pid: int) -> None:
    """FAKE_ENGINE_SPAWN_LOG's line for this start (the token itself is never written)."""
    spawn_log = _open_log(knobs.spawn_log)
    if spawn_log is not None:
        record = {"pid": pid, "argv": list(argv), "prog": prog, "cwd": cwd, "hf_token_set": bool(env.get("HF_TOKEN"))}
        _append_line(spawn_log, record)
        os.close(spawn_log)


def check_load(spec: EngineSpec, knobs: Knobs) -> None:
    """What the engine finds wrong only once it loads (after the load delay): raises :class:`EngineFailed`."""
    broken = knobs.broken
    if broken and any(broken in model.model_id or broken in (model.gguf_dir or "") for model in spec.models):
        _fail(f"simulated load failure of the model matching {broken!r}")
    _load(spec)


def _load(spec: EngineSpec) -> None:
    """Failures the real engine only notices while loading, i.e. after the load delay."""
    seen: set[str] = set()
    for model in spec.models:
        if model.model_id in seen:
            _fail(f"Model ID '{model.model_id}' is already loaded; model IDs must be unique")
        seen.update((model.model_id, *model.other_ids))
        if model.gguf_dir is not None and os.path.isfile(model.gguf_dir):
            # mistral.rs joins the folder and the file name (#1431, #1713).
            _fail(
                f"Failed to load GGUF model: `{model.gguf_dir}` is a file, not a directory; pass the folder "
                "holding the .gguf file as the model id and the file name as the quantized file"
            )
    if spec.default_model_id is not None and spec.default_model_id not in seen:
        _fail(f"Default model ID '{spec.default_model_id}' not found among loaded models")


def bind(host: str, port: int) -> socket.socket:
    """Bind exactly the requested address, as the engine's tokio listener does (SO_REUSEADDR)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        _fail(f"{exc.strerror or exc} (os error {exc.errno}) while binding {host}:{port}")
    return sock


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The real engine has no SIGTERM handler: keep the dispositions main() chose (die at once,
        # or ignore), instead of uvicorn's graceful shutdown that would wait for hung streams.
        yield


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    try:
        _main(argv, prog)
    except EngineFailed as exc:
        print(f"Error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)


def _main(argv: Sequence[str] | None, prog: str | None) -> None:
    prog = sys.argv[0] if prog is None else prog
    args = list(sys.argv[1:] if argv is None else argv)
    knobs = Knobs.from_env(os.environ)
    if args == ["--version"]:
        # clap's --version; the version is the newest of each dialect unless FAKE_ENGINE_VERSION says otherwise.
        legacy = _program_name(prog) == LEGACY_CLI
        version = os.environ.get("FAKE_ENGINE_VERSION", "0.8.4" if legacy else "0.9.2")
        print(f"{'mistralrs-server' if legacy else 'mistralrs'} {version}")
        return
    record_spawn(knobs, prog, args, os.getcwd(), os.environ, os.getpid())
    signal.signal(signal.SIGTERM, signal.SIG_IGN if knobs.ignore_sigterm else signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)

    for line in knobs.first_lines(os.environ):
        print(line, flush=True)
    spec = parse_command_line(prog, args, strict_serde=knobs.strict_serde)
    ids = ", ".join(model.model_id for model in spec.models)
    print(f"mistralrs fake engine: loading {ids}", flush=True)
    if knobs.never_ready:
        while True:
            time.sleep(3600)
    if knobs.load_delay > 0:
        time.sleep(knobs.load_delay)
    if knobs.exit_at_start is not None:
        print("loading model...", flush=True)
        print("Error: simulated load failure", file=sys.stderr, flush=True)
        sys.exit(knobs.exit_at_start)
    check_load(spec, knobs)

    sock = bind(spec.host, spec.port)
    engine = FakeEngine(spec, knobs)
    print(f"mistralrs fake engine: serving {ids} on {spec.host}:{spec.port}", flush=True)
    asyncio.run(_Server(server_config(engine)).serve(sockets=[sock]))


def server_config(engine: FakeEngine, *, own_logging: bool = True) -> uvicorn.Config:
    """uvicorn's configuration of the engine's server; ``own_logging``: let uvicorn configure logging, as a process
    of its own may (in a test's process it would close every log handler the test has)."""
    return uvicorn.Config(
        engine.app(),
        log_config=uvicorn.config.LOGGING_CONFIG if own_logging else None,
        log_level="warning",
        access_log=False,
        lifespan="off",
        server_header=False,
        # hyper keeps idle connections open; uvicorn's 5 s default would make pooled clients race it.
        timeout_keep_alive=600,
    )


if __name__ == "__main__":
    main()

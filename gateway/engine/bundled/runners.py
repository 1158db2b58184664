"""One loaded model of the bundled engine: a ``mistralrs.Runner`` made safe for concurrent use.

Facts this module is built on (measured with the 0.9.x wheel, see ../shared/TINY_MODELS.md):

- A Runner refuses two threads at once ("Already borrowed"): every call on it holds ``_lock``.
- A streaming request holds the Runner only while it is submitted; its chunks are then read outside
  the lock, so concurrent requests are batched by the engine. Every chat and completion request is
  therefore generated as a stream, also when the client did not ask for one.
- With quantized weights, two prompts of equal length prefilled in one step fail on CPU with "input
  tensor is not contiguous". ``_prefill`` lets one request at a time be in prefill (until its first
  chunk) on such models: decoding stays batched, and no two prompts ever share a prefill step.
- Dropping a stream's iterator stops its generation: a client that goes away stops costing CPU.
- Blocking calls run on a dedicated thread pool, never on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ...catalog import quantized_gguf
from .args import EngineArgs, ModelLoad
from .requests import (
    GenerationError,
    RequestError,
    argument_error,
    clean_message,
    completion_prompt,
    engine_error,
    engine_messages,
    logit_bias,
    output_grammar,
    stop_sequences,
    submission_error,
    tool_options,
)

T = TypeVar("T")
_END = object()

# Fields of an OpenAI chat request and the ChatCompletionRequest argument each becomes.
_CHAT_FIELDS = {
    "max_tokens": "max_tokens",
    "max_completion_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "repetition_penalty": "repetition_penalty",
    "n": "n_choices",
    "logprobs": "logprobs",
    "top_logprobs": "top_logprobs",
    "enable_thinking": "enable_thinking",
    "reasoning_effort": "reasoning_effort",
    "truncate_sequence": "truncate_sequence",
    "ignore_eos": "ignore_eos",
    "dry_multiplier": "dry_multiplier",
    "dry_base": "dry_base",
    "dry_allowed_length": "dry_allowed_length",
    "dry_sequence_breakers": "dry_sequence_breakers",
}


class LoadedModel:
    """A Runner, its lock, its prefill gate, and the OpenAI <-> mistralrs translation."""

    def __init__(
        self,
        load: ModelLoad,
        runner: Any,
        executor: ThreadPoolExecutor,
        *,
        quantized: bool,
        enable_thinking: bool | None,
    ) -> None:
        self.load = load
        self.id = load.served_id
        self.kind = load.kind
        self.quantized = quantized
        self._runner = runner
        self._executor = executor
        self._lock = threading.Lock()
        self._prefill = asyncio.Lock() if quantized else None
        self._enable_thinking = enable_thinking
        self.created = int(time.time())

    async def _call(self, fn: Callable[[], T]) -> T:
        def locked() -> T:
            with self._lock:
                return fn()

        return await asyncio.get_running_loop().run_in_executor(self._executor, locked)

    # ------------------------------------------------------------------------------------- chat

    def _chat_request(self, body: dict[str, Any]) -> tuple[Any, str | None]:
        """The package's request for an OpenAI chat body, and the field its grammar comes from (if any)."""
        import mistralrs

        kwargs: dict[str, Any] = {
            "messages": engine_messages(body.get("messages"), media=self.kind == "multimodal"),
            "model": self.id,
            "stream": True,
        }
        names = {"messages": "messages", "stop_seqs": "stop", "logit_bias": "logit_bias", "tool_schemas": "tools"}
        for key, arg in _CHAT_FIELDS.items():
            if body.get(key) is not None:
                kwargs[arg] = body[key]
                names[arg] = key
        if self._enable_thinking is not None and "enable_thinking" not in kwargs:
            kwargs["enable_thinking"] = self._enable_thinking
        if (stop := stop_sequences(body.get("stop"))) is not None:
            kwargs["stop_seqs"] = stop
        if (bias := logit_bias(body.get("logit_bias"))) is not None:
            kwargs["logit_bias"] = bias
        tools = tool_options(body)
        if tools.schemas is not None:
            kwargs["tool_schemas"] = tools.schemas
            kwargs["tool_choice"] = mistralrs.ToolChoice.NoTools if tools.no_tools else mistralrs.ToolChoice.Auto
        grammar = output_grammar(body, tools)
        source = None
        if grammar is not None:
            kwargs["grammar"], kwargs["grammar_type"], source = grammar
            names["grammar"] = names["grammar_type"] = source
        try:
            return mistralrs.ChatCompletionRequest(**kwargs), source
        except (TypeError, ValueError, OverflowError) as exc:
            raise argument_error(exc, kwargs, names) from exc

    async def stream_chat(self, body: dict[str, Any]) -> AsyncGenerator[Any, None]:
        """Yield the engine's chunk objects as they come; raises RequestError before the first one."""
        request, grammar_source = self._chat_request(body)
        gate = self._prefill
        if gate is not None:
            await gate.acquire()
        gated = gate is not None
        iterator: Any = None
        try:
            try:
                iterator = await self._call(lambda: self._runner.send_chat_completion_request(request))
            except Exception as exc:
                raise submission_error(exc, grammar_source) from exc
            except BaseException as exc:  # a Rust panic (pyo3 PanicException derives from BaseException)
                if isinstance(exc, KeyboardInterrupt | SystemExit | asyncio.CancelledError | GeneratorExit):
                    raise
                raise submission_error(exc, grammar_source) from exc
            loop = asyncio.get_running_loop()
            first = True
            while True:
                chunk = await loop.run_in_executor(self._executor, _next, iterator)
                if gated and gate is not None:
                    gate.release()  # its prefill is over: the next request may start its own
                    gated = False
                if chunk is _END:
                    return
                if isinstance(chunk, BaseException):
                    # The engine validates a request after accepting it: its refusal comes as the first item.
                    error = engine_error(chunk, prompt="messages", grammar_source=grammar_source)
                    raise error if first else GenerationError(clean_message(chunk))
                first = False
                yield chunk
        finally:
            if gated and gate is not None:
                gate.release()
            # Dropping the iterator is what stops the engine generating. Going out of scope is not enough: a
            # cancelled request's exception keeps this frame, and so its locals, alive through its traceback.
            iterator = None

    async def complete(self, body: dict[str, Any]) -> Any:
        """A raw-prompt completion. The package has no streaming form of it, and a string sent as chat
        messages gets the chat template applied, so it runs as one blocking call (one at a time)."""
        import mistralrs

        if body.get("logprobs") not in (None, False):
            raise RequestError(
                "The mistralrs Python package has no log-probabilities for raw completions: ask "
                "/v1/chat/completions with `logprobs`, or run a mistralrs binary as the engine",
                "logprobs",
            )
        kwargs: dict[str, Any] = {"prompt": completion_prompt(body.get("prompt")), "model": self.id}
        names = {
            "prompt": "prompt",
            "stop_seqs": "stop",
            "logit_bias": "logit_bias",
            "echo_prompt": "echo",
            "n_choices": "n",
        }
        for key in (
            "max_tokens",
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
            "suffix",
            "best_of",
        ):
            if body.get(key) is not None:
                kwargs[key] = body[key]
                names[key] = key
        if body.get("n") is not None:
            kwargs["n_choices"] = body["n"]
            if isinstance(body["n"], int) and isinstance(kwargs.get("best_of", 1), int):
                kwargs["best_of"] = max(body["n"], kwargs.get("best_of", 1))
        if body.get("echo"):
            kwargs["echo_prompt"] = True
        if (stop := stop_sequences(body.get("stop"))) is not None:
            kwargs["stop_seqs"] = stop
        if (bias := logit_bias(body.get("logit_bias"))) is not None:
            kwargs["logit_bias"] = bias
        try:
            request = mistralrs.CompletionRequest(**kwargs)
        except (TypeError, ValueError, OverflowError) as exc:
            raise argument_error(exc, kwargs, names) from exc
        try:
            return await self._call(lambda: self._runner.send_completion_request(request))
        except ValueError as exc:
            raise engine_error(exc, prompt="prompt") from exc
        except BaseException as exc:  # a Rust panic
            if isinstance(exc, KeyboardInterrupt | SystemExit | asyncio.CancelledError):
                raise
            raise GenerationError(clean_message(exc)) from exc

    # ------------------------------------------------------------------------------- embeddings

    async def embed(self, inputs: Any) -> tuple[list[list[float]], int]:
        import mistralrs

        def run() -> tuple[list[list[float]], int]:
            vectors = self._runner.send_embedding_request(mistralrs.EmbeddingRequest(input=inputs))
            items = [inputs] if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)) else inputs
            tokens = 0
            for item in items:
                if isinstance(item, str):
                    tokens += len(self._runner.tokenize_text(item, False, False))
                else:
                    tokens += len(item)
            return [list(v) for v in vectors], tokens

        try:
            return await self._call(run)
        except ValueError as exc:
            raise RequestError(clean_message(exc)) from exc

    # ----------------------------------------------------------------------------- images, audio

    async def image(self, body: dict[str, Any]) -> dict[str, Any]:
        import mistralrs

        fmt = body.get("response_format", "Url")
        if fmt not in ("Url", "B64Json"):
            raise RequestError(f"unknown variant `{fmt}`, expected `Url` or `B64Json`")
        kind = getattr(mistralrs.ImageGenerationResponseFormat, fmt)
        prompt = str(body.get("prompt", ""))
        width, height = int(body.get("width", 1280)), int(body.get("height", 720))
        try:
            response = await self._call(
                lambda: self._runner.generate_image(prompt, kind, height=height, width=width, model_id=None)
            )
        except ValueError as exc:
            raise GenerationError(clean_message(exc)) from exc
        data = [{"url": choice.url, "b64_json": choice.b64_json} for choice in response.data]
        return {"created": int(getattr(response, "created", time.time())), "data": data}

    async def speech(self, text: str) -> tuple[list[float], int, int]:
        try:
            response = await self._call(lambda: self._runner.generate_audio(text, model_id=None))
        except ValueError as exc:
            raise GenerationError(clean_message(exc)) from exc
        return list(response.pcm), int(response.rate), int(response.channels)


def _next(iterator: Any) -> Any:
    """One step of a stream, in a worker thread: the chunk, ``_END``, or the error it raised."""
    try:
        return next(iterator)
    except StopIteration:
        return _END
    except Exception as exc:
        return exc
    except BaseException as exc:  # a Rust panic inside the engine
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        return exc


def is_quantized(load: ModelLoad) -> bool:
    """Whether batched prefill would hit the engine's bug: GGUF quants, in-situ quantisation, UQFF."""
    if load.in_situ_quant or load.fields.get("from_uqff"):
        return True
    return load.kind == "gguf" and quantized_gguf(str(load.fields.get("quantized_filename", "")))


def _enum(enum: Any, name: str | None) -> Any:
    """An engine enum member from the CLI spelling (qwen3 -> Qwen3, phi3.5moe -> Phi3_5MoE, flux-offloaded)."""
    if name is None:
        return None
    wanted = re.sub(r"[^a-z0-9]", "", name.lower())
    for member in dir(enum):
        if not member.startswith("_") and re.sub(r"[^a-z0-9]", "", member.lower()) == wanted:
            return getattr(enum, member)
    raise ValueError(f"unknown architecture {name!r}")


def build_which(load: ModelLoad) -> Any:
    import mistralrs

    f = load.fields
    dtype = _enum(mistralrs.ModelDType, f.get("dtype") or "auto")
    if load.kind == "plain":
        return mistralrs.Which.Plain(
            model_id=f["model_id"],
            arch=_enum(mistralrs.Architecture, f.get("arch")),
            tokenizer_json=f.get("tokenizer_json"),
            from_uqff=f.get("from_uqff"),
            dtype=dtype,
        )
    if load.kind == "gguf":
        return mistralrs.Which.GGUF(
            quantized_model_id=f["quantized_model_id"],
            quantized_filename=f["quantized_filename"],
            tok_model_id=f.get("tok_model_id"),
            dtype=dtype,
        )
    if load.kind == "embedding":
        return mistralrs.Which.Embedding(
            model_id=f["model_id"],
            arch=_enum(mistralrs.EmbeddingArchitecture, f.get("arch")),
            tokenizer_json=f.get("tokenizer_json"),
            from_uqff=f.get("from_uqff"),
            dtype=dtype,
        )
    if load.kind == "multimodal":
        return mistralrs.Which.MultimodalPlain(
            model_id=f["model_id"],
            arch=_enum(mistralrs.MultimodalArchitecture, f.get("arch")),
            from_uqff=f.get("from_uqff"),
            dtype=dtype,
        )
    if load.kind == "diffusion":
        return mistralrs.Which.DiffusionPlain(
            model_id=f["model_id"], arch=_enum(mistralrs.DiffusionArchitecture, f.get("arch")), dtype=dtype
        )
    if load.kind == "speech":
        return mistralrs.Which.Speech(model_id=f["model_id"], arch=mistralrs.SpeechLoaderType.Dia, dtype=dtype)
    raise ValueError(f"unknown model kind {load.kind!r}")


def mcp_client_config(path: str) -> Any:
    """mistral.rs's MCP client config file (JSON: servers with Http, Process or WebSocket sources)."""
    import mistralrs

    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    servers = []
    for i, server in enumerate(raw.get("servers", [])):
        source = server.get("source", {})
        kind = source.get("type")
        if kind == "Http":
            src = mistralrs.McpServerSourcePy.Http(source["url"], source.get("timeout_secs"), source.get("headers"))
        elif kind == "WebSocket":
            src = mistralrs.McpServerSourcePy.WebSocket(
                source["url"], source.get("timeout_secs"), source.get("headers")
            )
        elif kind == "Process":
            src = mistralrs.McpServerSourcePy.Process(
                source["command"], source.get("args", []), source.get("work_dir"), source.get("env")
            )
        else:
            raise ValueError(f"MCP server #{i + 1}: unknown source type {kind!r} (Http, Process or WebSocket)")
        servers.append(
            mistralrs.McpServerConfigPy(
                server.get("id", f"server-{i}"),
                server.get("name", f"server-{i}"),
                src,
                enabled=server.get("enabled", True),
                tool_prefix=server.get("tool_prefix"),
                resources=server.get("resources"),
                bearer_token=server.get("bearer_token"),
            )
        )
    return mistralrs.McpClientConfigPy(
        servers,
        auto_register_tools=raw.get("auto_register_tools", True),
        tool_timeout_secs=raw.get("tool_timeout_secs"),
        max_concurrent_calls=raw.get("max_concurrent_calls"),
    )


def load_model(load: ModelLoad, args: EngineArgs, executor: ThreadPoolExecutor) -> LoadedModel:
    """Build the Runner (blocking: call before serving)."""
    import mistralrs

    kwargs: dict[str, Any] = {
        "which": build_which(load),
        "max_seqs": args.max_seqs,
        "token_source": args.token_source,
        "in_situ_quant": load.in_situ_quant or args.isq,
        "chat_template": load.chat_template or args.chat_template,
        "jinja_explicit": load.jinja_explicit or args.jinja_explicit,
    }
    if args.paged_attn is not None:
        kwargs["paged_attn" if args.paged_attn else "no_paged_attn"] = True
    if args.mcp_config:
        kwargs["mcp_client_config"] = mcp_client_config(args.mcp_config)
    runner = mistralrs.Runner(**kwargs)
    return LoadedModel(load, runner, executor, quantized=is_quantized(load), enable_thinking=args.enable_thinking)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


__all__ = ["GenerationError", "LoadedModel", "RequestError", "clean_message", "is_quantized", "load_model", "new_id"]

"""Ollama's API, spoken by translation to and from the OpenAI requests the engine answers. Pure: no I/O.

Requests: :func:`chat_request` and :func:`generate_request` make the chat (or, for ``raw`` generate, completion)
request; :func:`sampling` maps ``options``. Answers: :class:`ChatDialect` and :class:`GenerateDialect` write the
whole answer or the NDJSON stream (one JSON object per line, ``done: true`` last, with Ollama's counts and
durations in nanoseconds). The model listings (``/api/tags``, ``/api/show``, ``/api/ps``) are shaped by
:func:`model_entry`, :func:`details` and :func:`show`.

``options`` that load a model (``num_ctx``, ``num_gpu``, ``num_thread``...) are set per model in the models file
here, not per request, and a few sampling knobs have no counterpart in the engine (``mirostat``, ``tfs_z``,
``typical_p``, ``repeat_last_n``, ``penalize_newline``): such options are not applied, and the answer names them in
its ``X-Ignored-Options`` header rather than dropping them unseen.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ...chat.fields import invalid, is_int, is_number, unsupported, wrong_type
from ...chat.streams import ToolCallPieces
from ...errors import GatewayError

if TYPE_CHECKING:
    from ...catalog import Model
    from ...serving.chat import Stream

# The Ollama API level the gateway speaks: clients that check /api/version for features compare against it.
OLLAMA_VERSION = "0.13.0"
NDJSON = "application/x-ndjson"
# Options mapped to the engine's sampling fields.
_SAMPLING = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "stop": "stop",
    "repeat_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}
_DONE_REASONS = {"stop": "stop", "length": "length", "tool_calls": "stop"}
_IMAGE_TYPES = (
    (b"\x89PNG", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF8", "image/gif"),
    (b"RIFF", "image/webp"),
)
_QUANT = re.compile(r"(?i)(?:^|[-_.])((?:I?Q\d+(?:_[A-Z0-9]+)*)|F16|BF16|F32)(?:[-_.]|$)")


# ------------------------------------------------------------------------------------------------- errors


def error_body(error: GatewayError) -> dict[str, Any]:
    """Ollama's error body: ``{"error": "<message>"}`` (the client raises it as ResponseError with the status)."""
    return {"error": error.message}


def error_line(error: GatewayError) -> bytes:
    """The line that ends an NDJSON stream which failed after it began."""
    return json.dumps(error_body(error)).encode() + b"\n"


def timestamp(seconds: float) -> str:
    """Ollama's ``created_at``: RFC 3339 in UTC with microseconds."""
    return datetime.fromtimestamp(seconds, tz=UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


# ----------------------------------------------------------------------------------------------- requests


def _object(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise wrong_type(param, "an object")
    return value


def sampling(options: Any) -> tuple[dict[str, Any], list[str]]:
    """``options`` as the engine's sampling fields, and the names of those that are not applied (sorted)."""
    if options is None:
        return {}, []
    options = _object(options, "options")
    out: dict[str, Any] = {}
    ignored: list[str] = []
    for name, value in options.items():
        if value is None:
            continue
        if name == "num_predict":
            if not is_int(value):
                raise wrong_type("options.num_predict", "an integer")
            if value > 0:  # -1: until the model stops, -2: until the context is full
                out["max_tokens"] = value
        elif name == "stop":
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                raise wrong_type("options.stop", "an array of strings")
            if value:
                out["stop"] = value
        elif name in _SAMPLING:
            if not is_number(value):
                raise wrong_type(f"options.{name}", "a number")
            out[_SAMPLING[name]] = int(value) if name in ("top_k", "seed") else value
        else:
            ignored.append(name)
    return out, sorted(ignored)


def _data_url(image: Any, param: str) -> str:
    """An Ollama image (base64, no prefix) as a data URL with the type its bytes show."""
    if not isinstance(image, str):
        raise wrong_type(param, "a base64 string")
    if image.startswith("data:"):
        return image
    try:
        head = base64.b64decode(image[:64] + "=" * (-len(image[:64]) % 4), validate=False)
    except (binascii.Error, ValueError) as exc:
        raise invalid(param, f"Invalid '{param}': not base64 data.") from exc
    media = next((kind for magic, kind in _IMAGE_TYPES if head.startswith(magic)), None)
    if media is None:
        raise invalid(param, f"Invalid '{param}': not a PNG, JPEG, GIF or WebP image.")
    return f"data:{media};base64,{image}"


def _content(text: Any, images: Any, where: str) -> Any:
    if text is not None and not isinstance(text, str):
        raise wrong_type(f"{where}.content", "a string")
    if not images:
        return text or ""
    if not isinstance(images, list):
        raise wrong_type(f"{where}.images", "an array of base64 strings")
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    for j, image in enumerate(images):
        parts.append({"type": "image_url", "image_url": {"url": _data_url(image, f"{where}.images[{j}]")}})
    return parts


def _format(value: Any) -> dict[str, Any] | None:
    if value is None or value == "":
        return None
    if value == "json":
        return {"type": "json_object"}
    if isinstance(value, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": value}}
    raise invalid("format", "Invalid 'format': use \"json\" or a JSON schema object.")


def _think(value: Any, chat: dict[str, Any]) -> None:
    if value is None:
        return
    if isinstance(value, bool):
        chat["enable_thinking"] = value
    elif value in ("low", "medium", "high"):
        chat["enable_thinking"] = True
        chat["reasoning_effort"] = value
    else:
        raise invalid("think", "Invalid 'think': use true, false, 'low', 'medium' or 'high'.")


def _tools(value: Any) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise wrong_type("tools", "an array")
    tools = []
    for i, tool in enumerate(value):
        tool = _object(tool, f"tools[{i}]")
        function = _object(tool.get("function"), f"tools[{i}].function")
        if not isinstance(function.get("name"), str):
            raise wrong_type(f"tools[{i}].function.name", "a string")
        spec = {key: function[key] for key in ("name", "description", "parameters") if function.get(key) is not None}
        tools.append({"type": "function", "function": spec})
    return tools


def _messages(value: Any) -> list[dict[str, Any]]:
    """Ollama's messages as chat messages. Ollama's tool calls carry no ids: each gets one here, and a tool
    message answers the oldest open call of its ``tool_name`` (or the oldest open call)."""
    if not isinstance(value, list):
        raise wrong_type("messages", "an array")
    out: list[dict[str, Any]] = []
    pending: list[tuple[str, str]] = []  # (call id, function name) of calls not answered yet
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        message = _object(message, where)
        role = message.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise invalid(f"{where}.role", f"Invalid '{where}.role': use system, user, assistant or tool.")
        if role == "tool":
            name = message.get("tool_name") or message.get("name")
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str):
                match = next((p for p in pending if p[1] == name), pending[0] if pending else None)
                call_id = match[0] if match else f"call_{i}"
            pending = [p for p in pending if p[0] != call_id]
            content = message.get("content")
            out.append(
                {
                    "role": "tool",
                    "tool_call_id": call_id,
                    "content": content if isinstance(content, str) else json.dumps(content),
                }
            )
            continue
        chat: dict[str, Any] = {"role": role, "content": _content(message.get("content"), message.get("images"), where)}
        calls = message.get("tool_calls")
        if calls and role == "assistant":
            if not isinstance(calls, list):
                raise wrong_type(f"{where}.tool_calls", "an array")
            chat["tool_calls"] = []
            for j, call in enumerate(calls):
                function = _object(
                    _object(call, f"{where}.tool_calls[{j}]").get("function"), f"{where}.tool_calls[{j}].function"
                )
                arguments = function.get("arguments", {})
                call_id = call.get("id") if isinstance(call.get("id"), str) else f"call_{i}_{j}"
                chat["tool_calls"].append(
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {
                            "name": function.get("name", ""),
                            "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments),
                        },
                    }
                )
                pending.append((call_id, str(function.get("name", ""))))
            if not chat["content"]:
                chat["content"] = None
        out.append(chat)
    return out


def _common(body: dict[str, Any], chat: dict[str, Any]) -> list[str]:
    """The fields chat and generate share; the names of options not applied."""
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise wrong_type("stream", "a boolean")
    if stream:
        chat["stream"] = True
    options, ignored = sampling(body.get("options"))
    chat.update(options)
    fmt = _format(body.get("format"))
    if fmt is not None:
        chat["response_format"] = fmt
    _think(body.get("think"), chat)
    if body.get("logprobs") is True:
        chat["logprobs"] = True
        if is_int(body.get("top_logprobs")):
            chat["top_logprobs"] = body["top_logprobs"]
    return ignored


@dataclass
class Translated:
    """An Ollama request as the engine request that answers it."""

    body: dict[str, Any]  # a chat request, or a completion request when ``raw``
    ignored: list[str] = field(default_factory=list)  # options not applied
    raw: bool = False
    load_only: bool = False  # no prompt or messages: Ollama's way to load (or, with keep_alive 0, unload) a model


def chat_request(body: dict[str, Any]) -> Translated:
    messages = body.get("messages") or []
    chat: dict[str, Any] = {"messages": _messages(messages)}
    tools = _tools(body.get("tools"))
    if tools:
        chat["tools"] = tools
    ignored = _common(body, chat)
    return Translated(chat, ignored, load_only=not messages)


def generate_request(body: dict[str, Any]) -> Translated:
    prompt = body.get("prompt") or ""
    if not isinstance(prompt, str):
        raise wrong_type("prompt", "a string")
    for name, why in {
        "suffix": "the engine does not fill in the middle; send the text before it as the prompt.",
        "template": "the model's own chat template applies; send raw: true with a formatted prompt to use another.",
        "context": "the gateway keeps no token context between requests: use /api/chat with the "
        "conversation's messages.",
    }.items():
        if body.get(name):
            raise unsupported(name, why)
    if body.get("raw") is True:
        completion: dict[str, Any] = {"prompt": prompt}
        ignored = _common(body, completion)
        completion.pop("enable_thinking", None)
        completion.pop("reasoning_effort", None)
        return Translated(completion, ignored, raw=True, load_only=not prompt)
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        if not isinstance(system, str):
            raise wrong_type("system", "a string")
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": _content(prompt, body.get("images"), "prompt")})
    chat: dict[str, Any] = {"messages": messages}
    ignored = _common(body, chat)
    return Translated(chat, ignored, load_only=not prompt and not body.get("images"))


def embed_input(body: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI embeddings request for ``/api/embed`` (``input``) or the older ``/api/embeddings`` (``prompt``)."""
    value = body.get("input", body.get("prompt"))
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise wrong_type("input", "a string or an array of strings")
    if not value:
        raise invalid("input", "'input' is an empty array: give at least one text to embed.")
    request: dict[str, Any] = {"input": value}
    if is_int(body.get("dimensions")):
        request["dimensions"] = body["dimensions"]
    return request


# ------------------------------------------------------------------------------------------------ answers


def _tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for call in calls:
        function = call.get("function") or {}
        text = function.get("arguments") or "{}"
        try:
            arguments = json.loads(text)
        except json.JSONDecodeError:
            arguments = {"arguments": text}  # kept as the model wrote it rather than lost
        out.append({"id": call.get("id"), "function": {"name": function.get("name", ""), "arguments": arguments}})
    return out


@dataclass
class Timing:
    """Ollama's durations (nanoseconds), from a clock in seconds: the request's start, the stream's opening (the
    engine was ready), its first token, and the end."""

    clock: Callable[[], float]
    began: float = 0.0
    opened: float | None = None
    first: float | None = None

    def __post_init__(self) -> None:
        self.began = self.clock()

    def stats(self, usage: dict[str, Any] | None) -> dict[str, Any]:
        end = self.clock()
        opened = self.opened if self.opened is not None else self.began
        first = self.first if self.first is not None else opened
        usage = usage or {}
        return {
            "total_duration": _ns(end - self.began),
            "load_duration": _ns(opened - self.began),
            "prompt_eval_count": usage.get("prompt_tokens", 0),
            "prompt_eval_duration": _ns(first - opened),
            "eval_count": usage.get("completion_tokens", 0),
            "eval_duration": _ns(end - first),
        }


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))


def _line(data: dict[str, Any]) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


class _Dialect(ABC):
    """What the chat and generate answers share (a :class:`~gateway.serving.calls.ChatWriter`)."""

    media_type = NDJSON
    loading_comments = False  # NDJSON has no comments: a stream starts once its engine is ready

    def __init__(self, model: str, clock: Callable[[], float], wall: Callable[[], float]) -> None:
        self.model = model  # the name the answers say (as the client sent it)
        self._timing = Timing(clock)
        self._wall = wall

    def _head(self) -> dict[str, Any]:
        return {"model": self.model, "created_at": timestamp(self._wall())}

    @abstractmethod
    def _piece(self, text: str, thinking: str | None, calls: list[dict[str, Any]] | None) -> dict[str, Any]:
        """One line's own fields: a message (chat) or a response piece (generate)."""

    def _finish(self, reason: str | None, usage: dict[str, Any] | None) -> dict[str, Any]:
        done = _DONE_REASONS.get(reason or "stop", reason or "stop")
        return {**self._head(), "done": True, "done_reason": done, **self._timing.stats(usage)}

    def answer(self, chat_answer: dict[str, Any]) -> bytes:
        choice = chat_answer["choices"][0]
        message = choice.get("message") or {}
        text = message.get("content") if "message" in choice else choice.get("text")
        piece = self._piece(text or "", message.get("reasoning_content"), message.get("tool_calls"))
        last = self._finish(choice.get("finish_reason"), chat_answer.get("usage"))
        return json.dumps({**piece, **last}, ensure_ascii=False).encode()

    async def stream(self, stream: Stream) -> AsyncIterator[bytes]:
        self._timing.opened = self._timing.clock()
        finish: str | None = None
        calls = ToolCallPieces()
        try:
            async for item in stream.events:
                data = item.json(self.model)
                if data is None:
                    continue
                for choice in data.get("choices") or []:
                    delta = choice.get("delta") or {}
                    text = delta.get("content") if "delta" in choice else choice.get("text")
                    thinking = delta.get("reasoning_content")
                    calls.add(delta.get("tool_calls"))
                    if text or thinking:
                        if self._timing.first is None:
                            self._timing.first = self._timing.clock()
                        yield _line(self._piece(text or "", thinking, None))
                    finish = choice.get("finish_reason") or finish
            if calls.calls():  # whole, once complete: Ollama sends a tool call in one piece
                yield _line(self._piece("", None, calls.calls()))
            yield _line({**self._piece("", None, None), **self._finish(finish, stream.usage())})
        except GatewayError as exc:
            yield error_line(exc)

    def failed(self, error: GatewayError) -> bytes:
        return error_line(error)


class ChatDialect(_Dialect):
    """``/api/chat`` answers: a ``message`` per line."""

    def _piece(self, text: str, thinking: str | None, calls: list[dict[str, Any]] | None) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if thinking:
            message["thinking"] = thinking
        if calls:
            message["tool_calls"] = _tool_calls(calls)
        return {**self._head(), "message": message, "done": False}


class GenerateDialect(_Dialect):
    """``/api/generate`` answers: a ``response`` piece per line."""

    def _piece(self, text: str, thinking: str | None, calls: list[dict[str, Any]] | None) -> dict[str, Any]:
        piece: dict[str, Any] = {**self._head(), "response": text, "done": False}
        if thinking:
            piece["thinking"] = thinking
        return piece


def load_answer(model: str, *, chat: bool, unloaded: bool, wall: float) -> dict[str, Any]:
    """The answer to a request without prompt or messages: the model was loaded (or unloaded, keep_alive 0)."""
    answer: dict[str, Any] = {
        "model": model,
        "created_at": timestamp(wall),
        "done": True,
        "done_reason": "unload" if unloaded else "load",
    }
    if chat:
        answer["message"] = {"role": "assistant", "content": ""}
    else:
        answer["response"] = ""
    return answer


# ------------------------------------------------------------------------------------------------- models


def ollama_name(name: str) -> str:
    """How Ollama clients show a model: ``name:tag``, ``latest`` when the name has no tag."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def digest(model: Model) -> str:
    """A stable identifier of what a model is loaded from (Ollama's clients show it as the model's digest)."""
    origin = f"{model.kind}\0{model.source.model_id}\0{model.source.filename or ''}\0{model.entry.url or ''}"
    return hashlib.sha256(origin.encode()).hexdigest()


def details(model: Model) -> dict[str, Any]:
    filename = model.source.filename or model.entry.file or ""
    fmt = "gguf" if model.kind == "gguf" or filename.endswith(".gguf") else "safetensors"
    family = model.entry.options.arch or model.kind
    quant = _QUANT.search(filename.rsplit("/", 1)[-1].removesuffix(".gguf"))
    level = quant.group(1).upper() if quant else (model.entry.options.isq or "")
    return {
        "parent_model": "",
        "format": fmt,
        "family": family,
        "families": [family],
        "parameter_size": "",
        "quantization_level": level,
    }


def capabilities(model: Model) -> list[str]:
    if model.kind == "embedding":
        return ["embedding"]
    if model.kind in ("diffusion", "speech"):
        return []
    return ["completion", "tools", *(["vision"] if model.kind == "vision-plain" else [])]


def model_entry(model: Model, name: str, *, size: int, modified: float) -> dict[str, Any]:
    """A model as ``/api/tags`` lists it."""
    return {
        "name": ollama_name(name),
        "model": ollama_name(name),
        "modified_at": timestamp(modified),
        "size": size,
        "digest": digest(model),
        "details": details(model),
    }


def show(model: Model, *, modified: float) -> dict[str, Any]:
    """``/api/show``: what the gateway knows of a model (there is no Modelfile: the models file describes it)."""
    source = model.source.model_id + (f"/{model.source.filename}" if model.source.filename else "")
    family = model.entry.options.arch or model.kind
    return {
        "modelfile": f"# served by mistral-gateway from its models file\nFROM {source}\n",
        "parameters": "",
        "template": "",
        "details": details(model),
        "model_info": {"general.architecture": family, "general.basename": model.id},
        "capabilities": capabilities(model),
        "modified_at": timestamp(modified),
    }


def pull_line(event_type: str, event: dict[str, Any]) -> dict[str, Any] | None:
    """A download event of the gateway as a line of ``/api/pull``'s progress (None: nothing to say)."""
    file = str(event.get("file", ""))
    if event_type == "download.started":
        return {
            "status": f"pulling {file}",
            "digest": file,
            "total": event.get("total") or 0,
            "completed": event.get("resumed_from") or 0,
        }
    if event_type == "download.progress":
        return {
            "status": f"pulling {file}",
            "digest": file,
            "total": event.get("total") or 0,
            "completed": event.get("bytes") or 0,
        }
    if event_type in ("download.done", "download.present"):
        size = event.get("bytes") or 0
        return {"status": f"pulling {file}", "digest": file, "total": size, "completed": size}
    if event_type == "download.retry":
        return {"status": f"retrying {file} in {event.get('delay', 0):.0f} s: {event.get('error')}"}
    if event_type == "download.waiting":
        return {"status": f"waiting for another process downloading {file}"}
    return None


class OneLine:
    """A raw ``/api/generate`` that streams: completion streams carry no usage, so the answer is generated whole and
    sent as the stream's one (last) line."""

    media_type = NDJSON
    loading_comments = False

    def __init__(self, dialect: ChatDialect | GenerateDialect) -> None:
        self._dialect = dialect

    def answer(self, chat_answer: dict[str, Any]) -> bytes:
        return self._dialect.answer(chat_answer) + b"\n"

    def stream(self, stream: Stream) -> AsyncIterator[bytes]:
        return self._dialect.stream(stream)

    def failed(self, error: GatewayError) -> bytes:
        return self._dialect.failed(error)

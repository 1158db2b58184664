"""Anthropic's Messages API, spoken by translation to and from chat completions. Pure: no I/O.

Every engine behind the gateway answers chat completions, and not every one serves ``/v1/messages`` (the bundled
engine does not; the binaries' own translation differs between versions). So the gateway speaks the Messages API
itself, the same way on every engine: :func:`to_chat` turns a request into a chat request, :func:`from_chat` a chat
answer into a ``Message``, and :class:`EventWriter` a stream of chat chunks into Anthropic's stream events.

What cannot be translated faithfully is refused with a clear error (documents, server tools, MCP servers), never
dropped. One thing the engine does not report: which stop sequence ended an answer (chat completions say "stop"
for an end of turn and a stop sequence alike), so ``stop_reason`` is ``end_turn`` in both cases, as in mistral.rs's
own Messages API.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from ...chat.checks import INLINE_IMAGES_ONLY
from ...chat.fields import boolean, integer, invalid, number, require, unsupported, wrong_type
from ...chat.streams import ToolCallPieces
from ...errors import ContextLengthExceeded, GatewayError

if TYPE_CHECKING:
    from ...serving.chat import Stream

# Anthropic's error types, by HTTP status (https://docs.anthropic.com/en/api/errors).
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "content_filter": "refusal"}
_MEDIA_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


# ------------------------------------------------------------------------------------------------- errors


def error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def error_body(error: GatewayError) -> dict[str, Any]:
    """Anthropic's error body: ``{"type": "error", "error": {"type", "message"}}``."""
    # An operator's cancel is a 503 like an overload, but "overloaded" would tell the client the wrong story.
    kind = "api_error" if error.code == "request_cancelled" else error_type(error.status)
    message = error.message
    if isinstance(error, ContextLengthExceeded):
        # Anthropic's own words, which its clients read (Claude Code tells its user the numbers from them).
        message = f"prompt is too long: {error.prompt_tokens} tokens > {error.limit} maximum. {error.message}"
    return {"type": "error", "error": {"type": kind, "message": message}}


def error_event(error: GatewayError) -> bytes:
    """The ``error`` event that ends a stream which failed after it began (the SDKs raise it as an APIError)."""
    return _sse("error", error_body(error))


def _sse(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


# ------------------------------------------------------------------------------------------------ request


def _text(block: dict[str, Any], where: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise wrong_type(f"{where}.text", "a string")
    return text


def _image(block: dict[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source")
    if not isinstance(source, dict):
        raise wrong_type(f"{where}.source", "an object")
    kind = source.get("type")
    if kind == "base64":
        media, data = source.get("media_type"), source.get("data")
        if media not in _MEDIA_TYPES:
            raise invalid(
                f"{where}.source.media_type",
                f"Invalid '{where}.source.media_type': use one of {', '.join(sorted(_MEDIA_TYPES))}.",
            )
        if not isinstance(data, str):
            raise wrong_type(f"{where}.source.data", "a base64 string")
        url = f"data:{media};base64,{data}"
    elif kind == "url":
        raise unsupported(f"{where}.source.type", "images are taken as base64 data: " + INLINE_IMAGES_ONLY)
    else:
        raise unsupported(f"{where}.source.type", "images are taken as base64 data, not by URL or file id.")
    return {"type": "image_url", "image_url": {"url": url}}


def _tool_result(block: dict[str, Any], where: str) -> dict[str, Any]:
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str):
        raise wrong_type(f"{where}.tool_use_id", "a string")
    content = block.get("content", "")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise unsupported(
                    f"{where}.content[{j}]", "a tool result is passed to the engine as text: use text blocks."
                )
            texts.append(_text(part, f"{where}.content[{j}]"))
        content = "\n".join(texts)
    elif not isinstance(content, str):
        raise wrong_type(f"{where}.content", "a string or an array of text blocks")
    if block.get("is_error") is True:
        content = f"Error: {content}"  # the model must know the tool failed; chat's tool role has no flag for it
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def _tool_use(block: dict[str, Any], where: str) -> dict[str, Any]:
    for name in ("id", "name"):
        if not isinstance(block.get(name), str):
            raise wrong_type(f"{where}.{name}", "a string")
    arguments = block.get("input", {})
    if not isinstance(arguments, dict):
        raise wrong_type(f"{where}.input", "an object")
    function = {"name": block["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}
    return {"id": block["id"], "type": "function", "function": function}


def _message(message: Any, where: str) -> list[dict[str, Any]]:
    """One Anthropic message as chat messages: tool results become ``tool`` messages ahead of the rest."""
    if not isinstance(message, dict):
        raise wrong_type(where, "an object")
    role = message.get("role")
    if role not in ("user", "assistant", "system"):
        raise invalid(f"{where}.role", f"Invalid '{where}.role': use 'user', 'assistant' or 'system'.")
    content = message.get("content")
    if role == "system":
        # A system message in the conversation (the API's mid-conversation-system beta, which Claude Code uses):
        # a system message of the chat at the same place.
        return [{"role": "system", "content": _system(content) or ""}]
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise wrong_type(f"{where}.content", "a string or an array of content blocks")
    parts: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(block, dict):
            raise wrong_type(at, "an object")
        kind = block.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": _text(block, at)})
        elif kind == "image" and role == "user":
            parts.append(_image(block, at))
        elif kind == "tool_result" and role == "user":
            results.append(_tool_result(block, at))
        elif kind == "tool_use" and role == "assistant":
            calls.append(_tool_use(block, at))
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            continue  # the model's earlier reasoning is not fed back to it; nothing it needs is lost
        elif kind in ("image", "tool_result", "tool_use"):
            raise invalid(f"{at}.type", f"Invalid '{at}.type': a {kind} block cannot be in a {role} message.")
        else:
            raise unsupported(f"{at}.type", f"the gateway cannot pass {kind!r} blocks to the engine.")
    out: list[dict[str, Any]] = list(results)
    if parts or calls or not results:
        text_only = all(p["type"] == "text" for p in parts)
        body: Any = "".join(p["text"] for p in parts) if text_only else parts
        chat: dict[str, Any] = {"role": role, "content": body if (body or not calls) else None}
        if calls:
            chat["tool_calls"] = calls
        out.append(chat)
    return out


def _system(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise wrong_type("system", "a string or an array of text blocks")
    texts = []
    for i, block in enumerate(value):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise wrong_type(f"system[{i}]", "a text block")
        texts.append(_text(block, f"system[{i}]"))
    return "\n\n".join(texts)


def _tools(value: Any) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise wrong_type("tools", "an array")
    tools = []
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise wrong_type(where, "an object")
        if tool.get("type", "custom") != "custom":
            why = (
                f"{tool.get('type')!r} is one of Anthropic's server tools (they run on Anthropic's platform); "
                "offer the model a custom tool instead."
            )
            raise unsupported(f"{where}.type", why)
        if not isinstance(tool.get("name"), str):
            raise wrong_type(f"{where}.name", "a string")
        schema = tool.get("input_schema")
        if not isinstance(schema, dict):
            raise wrong_type(f"{where}.input_schema", "a JSON schema object")
        spec: dict[str, Any] = {"name": tool["name"], "parameters": schema}
        if isinstance(tool.get("description"), str):
            spec["description"] = tool["description"]
        tools.append({"type": "function", "function": spec})
    return tools


def _tool_choice(value: Any, chat: dict[str, Any]) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise wrong_type("tool_choice", "an object")
    kind = value.get("type")
    if kind == "auto":
        chat["tool_choice"] = "auto"
    elif kind == "any":
        chat["tool_choice"] = "required"
    elif kind == "none":
        chat["tool_choice"] = "none"
    elif kind == "tool":
        if not isinstance(value.get("name"), str):
            raise wrong_type("tool_choice.name", "a string")
        chat["tool_choice"] = {"type": "function", "function": {"name": value["name"]}}
    else:
        raise invalid("tool_choice.type", "Invalid 'tool_choice.type': use 'auto', 'any', 'tool' or 'none'.")
    if value.get("disable_parallel_tool_use") is True:
        chat["parallel_tool_calls"] = False


def _output_format(body: dict[str, Any]) -> dict[str, Any] | None:
    """Structured outputs: ``output_config.format`` (or the beta's ``output_format``) as a JSON-schema format."""
    config = body.get("output_config")
    fmt = config.get("format") if isinstance(config, dict) else body.get("output_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise invalid(
            "output_config.format", "Invalid 'output_config.format': use {'type': 'json_schema', 'schema': {...}}."
        )
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}


def to_chat(body: dict[str, Any], *, count_only: bool = False) -> dict[str, Any]:
    """The chat request that answers a Messages request (or, ``count_only``, measures its prompt); raises
    InvalidRequest with the Messages API's field names."""
    for name, why in {
        "mcp_servers": "the engine connects to MCP servers configured on the gateway's side "
        "([engine] mcp_config), not per request.",
        "container": "there are no code-execution containers here.",
    }.items():
        if body.get(name):
            raise unsupported(name, why)
    value = require(body, "messages")
    if not isinstance(value, list) or not value:
        raise invalid("messages", "'messages' must be a non-empty array.")
    messages: list[dict[str, Any]] = []
    system = _system(body.get("system"))
    if system:
        messages.append({"role": "system", "content": system})
    for i, message in enumerate(value):
        messages += _message(message, f"messages[{i}]")
    chat: dict[str, Any] = {"messages": messages}
    tools = _tools(body.get("tools"))
    if tools:
        chat["tools"] = tools
    _tool_choice(body.get("tool_choice"), chat)
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive", "disabled"):
        chat["enable_thinking"] = thinking["type"] != "disabled"
    if count_only:
        chat["max_tokens"] = 1
        return chat
    chat["max_tokens"] = integer(body, "max_tokens", 1, 1 << 24)
    if chat["max_tokens"] is None:
        raise invalid("max_tokens", "max_tokens: Field required", "missing_required_parameter")
    if boolean(body, "stream"):
        chat["stream"] = True
    for name, high in (("temperature", 1.0), ("top_p", 1.0)):
        if number(body, name, 0, high) is not None:
            chat[name] = body[name]
    if integer(body, "top_k", 0, 1 << 20) is not None:
        chat["top_k"] = body["top_k"]
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise wrong_type("stop_sequences", "an array of strings")
        if stops:
            chat["stop"] = stops
    fmt = _output_format(body)
    if fmt is not None:
        chat["response_format"] = fmt
    return chat


# ------------------------------------------------------------------------------------------------- answer


def _input(arguments: str) -> dict[str, Any]:
    """A tool call's arguments as the ``input`` object Anthropic's clients expect."""
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        return {"arguments": arguments}  # what the model wrote is kept, not lost, even when it is not JSON
    return value if isinstance(value, dict) else {"value": value}


def _tool_block(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function") or {}
    call_id = call.get("id") or new_id("toolu")
    return {
        "type": "tool_use",
        "id": call_id,
        "name": function.get("name", ""),
        "input": _input(function.get("arguments") or ""),
    }


def _usage(usage: dict[str, Any] | None) -> dict[str, Any]:
    usage = usage or {}
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return {
        "input_tokens": usage.get("prompt_tokens", 0),
        "output_tokens": usage.get("completion_tokens", 0),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def _stop_reason(finish: str | None, called: bool, usage: dict[str, Any] | None, max_tokens: int | None) -> str:
    if called and finish != "length":  # a call cut by max_tokens ends as Anthropic's do: max_tokens
        return "tool_use"
    written = (usage or {}).get("completion_tokens")
    if finish == "length" and max_tokens and isinstance(written, int) and written < max_tokens:
        # Cut for length before max_tokens: the context was full (the gateway clamps max_tokens to the room the
        # prompt leaves, gateway/serving/limits.py), which Anthropic's API reports so.
        return "model_context_window_exceeded"
    return _STOP_REASONS.get(finish or "stop", "end_turn")


def from_chat(answer: dict[str, Any], message_id: str, model: str, max_tokens: int | None = None) -> dict[str, Any]:
    """The ``Message`` for a chat answer (``max_tokens``: what the client asked for)."""
    choice = answer["choices"][0]
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if message.get("reasoning_content"):
        content.append({"type": "thinking", "thinking": message["reasoning_content"], "signature": ""})
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    calls = message.get("tool_calls") or []
    content += [_tool_block(call) for call in calls]
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": _stop_reason(choice.get("finish_reason"), bool(calls), answer.get("usage"), max_tokens),
        "stop_sequence": None,
        "usage": _usage(answer.get("usage")),
    }


# -------------------------------------------------------------------------------------------------- stream


class EventWriter:
    """Chat chunks in, Anthropic's stream events out (each as SSE bytes with its ``event:`` line).

    Text and thinking are passed on as they come, each in its content block. Tool calls are sent whole once the
    answer is complete (a start, the arguments as one ``input_json_delta``, a stop): chat streams may interleave
    the pieces of several calls, which Anthropic's one-open-block-at-a-time events cannot, and the engine makes
    a tool call's arguments in one piece at the end anyway.
    """

    def __init__(self, message_id: str, model: str, max_tokens: int | None = None) -> None:
        self._id = message_id
        self._model = model
        self._max_tokens = max_tokens
        self._index = -1  # of the content block being written
        self._open: str | None = None  # its type
        self._calls = ToolCallPieces()
        self._finish: str | None = None

    def start(self) -> list[bytes]:
        message: dict[str, Any] = {
            "id": self._id,
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": _usage(None),
        }
        return [_sse("message_start", {"type": "message_start", "message": message}), self.ping()]

    @staticmethod
    def ping() -> bytes:
        return _sse("ping", {"type": "ping"})

    def _block(self, kind: str) -> list[bytes]:
        """Make ``kind`` the open block (closing the one before)."""
        if self._open == kind:
            return []
        out = self._close()
        self._index += 1
        self._open = kind
        block: dict[str, Any] = (
            {"type": "text", "text": ""} if kind == "text" else {"type": "thinking", "thinking": "", "signature": ""}
        )
        out.append(
            _sse("content_block_start", {"type": "content_block_start", "index": self._index, "content_block": block})
        )
        return out

    def _close(self) -> list[bytes]:
        if self._open is None:
            return []
        self._open = None
        return [_sse("content_block_stop", {"type": "content_block_stop", "index": self._index})]

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return _sse("content_block_delta", {"type": "content_block_delta", "index": self._index, "delta": delta})

    def chunk(self, chunk: dict[str, Any]) -> list[bytes]:
        out: list[bytes] = []
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            thought = delta.get("reasoning_content")
            if thought:
                out += self._block("thinking")
                out.append(self._delta({"type": "thinking_delta", "thinking": thought}))
            text = delta.get("content")
            if text:
                out += self._block("text")
                out.append(self._delta({"type": "text_delta", "text": text}))
            self._calls.add(delta.get("tool_calls"))
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
        return out

    def finish(self, usage: dict[str, Any] | None) -> list[bytes]:
        out = self._close()
        calls = self._calls.calls()
        for call in calls:
            self._index += 1
            block = {**_tool_block(call), "input": {}}
            out.append(
                _sse(
                    "content_block_start", {"type": "content_block_start", "index": self._index, "content_block": block}
                )
            )
            arguments = json.dumps(_input(call["function"]["arguments"]), ensure_ascii=False)
            out.append(self._delta({"type": "input_json_delta", "partial_json": arguments}))
            out.append(_sse("content_block_stop", {"type": "content_block_stop", "index": self._index}))
        counts = _usage(usage)
        delta = {"stop_reason": _stop_reason(self._finish, bool(calls), usage, self._max_tokens), "stop_sequence": None}
        out.append(_sse("message_delta", {"type": "message_delta", "delta": delta, "usage": counts}))
        out.append(_sse("message_stop", {"type": "message_stop"}))
        return out


# ------------------------------------------------------------------------------------------------- serving


class Dialect:
    """One Messages request being served (a :class:`~gateway.serving.calls.ChatWriter`)."""

    media_type = "text/event-stream"
    loading_comments = True  # SSE comments: Anthropic's SDKs skip them like any SSE client

    def __init__(self, body: dict[str, Any], model: str) -> None:
        self.chat = to_chat(body)
        self._id = new_id("msg")
        self._model = model
        self._writer = EventWriter(self._id, model, self.chat.get("max_tokens"))

    def answer(self, chat_answer: dict[str, Any]) -> bytes:
        answer = from_chat(chat_answer, self._id, self._model, self.chat.get("max_tokens"))
        return json.dumps(answer, ensure_ascii=False).encode()

    async def stream(self, stream: Stream) -> AsyncIterator[bytes]:
        writer = self._writer
        try:
            for event in writer.start():
                yield event
            async for item in stream.events:
                data = item.json(self._model)
                if data is not None:
                    for event in writer.chunk(data):
                        yield event
                elif item.comment:
                    yield writer.ping()  # the engine's keep-alive, as Anthropic's own
            for event in writer.finish(stream.usage()):
                yield event
        except GatewayError as exc:
            yield error_event(exc)

    def failed(self, error: GatewayError) -> bytes:
        return error_event(error)


class TokenCount:
    """``count_tokens``: the prompt's tokens, read from the usage of a one-token answer (never streamed)."""

    media_type = "text/event-stream"
    loading_comments = False

    def answer(self, chat_answer: dict[str, Any]) -> bytes:
        usage = chat_answer.get("usage") or {}
        return json.dumps({"input_tokens": usage.get("prompt_tokens", 0)}).encode()

    async def stream(self, stream: Stream) -> AsyncIterator[bytes]:
        raise TypeError("a token count is answered whole: its plan never streams")
        yield b""  # pragma: no cover - makes this an async generator

    def failed(self, error: GatewayError) -> bytes:
        return error_event(error)

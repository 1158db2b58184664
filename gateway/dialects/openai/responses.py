"""The Responses API, spoken by translation to and from chat completions.

Every engine behind the gateway answers chat completions; not every one serves ``/v1/responses`` (the bundled
engine does not), and those that do differ. So the gateway speaks the Responses API itself, the same way on every
engine: :func:`to_chat` turns a request into a chat request, :func:`from_chat` a chat answer into a ``Response``,
and :class:`EventWriter` a stream of chat chunks into the Responses stream events. Pure: no I/O.

The gateway keeps no conversation state: ``previous_response_id``, ``conversation`` and item references are
refused with a clear error (send the whole conversation in ``input``), and every ``Response`` says ``store: false``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...chat import checks
from ...chat.fields import boolean, integer, invalid, number, require, unsupported, wrong_type
from ...errors import GatewayError

if TYPE_CHECKING:
    from ...serving.chat import Stream

_ROLES = frozenset({"user", "system", "developer", "assistant"})
_INCLUDES = frozenset({"message.output_text.logprobs", "reasoning.encrypted_content"})
_STATELESS = "this gateway keeps no conversation state: send the whole conversation in 'input'."


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# ------------------------------------------------------------------------------------------------ request


def _text_of(parts: list[Any], param: str) -> str | list[dict[str, Any]]:
    """A message's content parts as chat content: one string when all are text, else chat parts."""
    out: list[dict[str, Any]] = []
    for j, part in enumerate(parts):
        where = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise wrong_type(where, "an object")
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text", "refusal"):
            text = part.get("refusal" if kind == "refusal" else "text")
            if not isinstance(text, str):
                raise wrong_type(f"{where}.text", "a string")
            out.append({"type": "text", "text": text})
        elif kind == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str):
                raise unsupported(
                    f"{where}.image_url", "images are taken by URL or data URL ('image_url'), not by file id."
                )
            out.append({"type": "image_url", "image_url": {"url": url, "detail": part.get("detail", "auto")}})
        elif kind in ("input_file", "input_audio"):
            raise unsupported(where, f"the engine takes no {kind.removeprefix('input_')} input.")
        else:
            raise invalid(f"{where}.type", f"Invalid '{where}.type': unknown content type {kind!r}.")
    if all(p["type"] == "text" for p in out):
        return "".join(p["text"] for p in out)
    return out


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise wrong_type("instructions", "a string")
        messages.append({"role": "system", "content": instructions})
    value = require(body, "input")
    if isinstance(value, str):
        messages.append({"role": "user", "content": value})
        return messages
    if not isinstance(value, list) or not value:
        raise invalid("input", "'input' must be a string or a non-empty array of items.")
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise wrong_type(where, "an object")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                raise invalid(f"{where}.role", f"Invalid '{where}.role': use user, system, developer or assistant.")
            content = item.get("content")
            if isinstance(content, list):
                content = _text_of(content, f"{where}.content")
            elif not isinstance(content, str):
                raise wrong_type(f"{where}.content", "a string or an array of content parts")
            messages.append({"role": "system" if role == "developer" else role, "content": content})
        elif kind == "function_call":
            call = _function_call(item, where)
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            elif last is not None and last["role"] == "assistant":
                last["tool_calls"] = [call]
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str):
                raise wrong_type(f"{where}.call_id", "a string")
            if isinstance(output, list):
                output = _text_of(output, f"{where}.output")
            if not isinstance(output, str):
                raise wrong_type(f"{where}.output", "a string or an array of text parts")
            messages.append({"role": "tool", "tool_call_id": call_id, "content": output})
        elif kind == "reasoning":
            continue  # the engine's own reasoning is not fed back to it; nothing the model needs is lost
        elif kind == "item_reference":
            raise unsupported(where, _STATELESS)
        else:
            raise unsupported(f"{where}.type", f"the gateway cannot pass {kind!r} items to the engine.")
    return messages


def _function_call(item: dict[str, Any], where: str) -> dict[str, Any]:
    for name in ("call_id", "name", "arguments"):
        if not isinstance(item.get(name), str):
            raise wrong_type(f"{where}.{name}", "a string")
    function = {"name": item["name"], "arguments": item["arguments"]}
    return {"id": item["call_id"], "type": "function", "function": function}


def _tools(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    value = body.get("tools")
    if value is None:
        return None
    if not isinstance(value, list):
        raise wrong_type("tools", "an array")
    tools = []
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise wrong_type(where, "an object")
        if tool.get("type") != "function":
            raise unsupported(
                f"{where}.type",
                f"only function tools are offered (the gateway has no hosted {tool.get('type')!r} tool).",
            )
        function: dict[str, Any] = tool["function"] if isinstance(tool.get("function"), dict) else tool  # chat form
        spec = {key: function[key] for key in ("name", "description", "parameters", "strict") if key in function}
        tools.append({"type": "function", "function": spec})
    return tools


def _tool_choice(value: Any) -> Any:
    if value is None or value in ("none", "auto", "required"):
        return value
    if isinstance(value, dict) and value.get("type") == "function":
        name = value.get("name") or (value.get("function") or {}).get("name")
        return {"type": "function", "function": {"name": name}}
    raise unsupported("tool_choice", "use 'none', 'auto', 'required' or {'type': 'function', 'name': ...}.")


def _text_format(body: dict[str, Any]) -> dict[str, Any] | None:
    text = body.get("text")
    if text is None:
        return None
    if not isinstance(text, dict):
        raise wrong_type("text", "an object")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise wrong_type("text.format", "an object")
    kind = fmt.get("type")
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind == "json_schema":
        spec = {key: fmt[key] for key in ("name", "schema", "strict", "description") if key in fmt}
        return {"type": "json_schema", "json_schema": spec}
    raise invalid("text.format.type", "Invalid 'text.format.type': use 'text', 'json_object' or 'json_schema'.")


def to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """The chat request that answers a Responses request; raises InvalidRequest with Responses' field names."""
    for name in ("previous_response_id", "conversation"):
        if body.get(name) is not None:
            raise unsupported(name, _STATELESS)
    if body.get("prompt") is not None:
        raise unsupported("prompt", "stored prompt templates live on OpenAI's platform; send the text in 'input'.")
    if body.get("background"):
        raise unsupported("background", "answers are given on the request's own connection; leave out background.")
    if body.get("max_tool_calls") is not None:
        raise unsupported("max_tool_calls", "the model decides how many tools to call; the gateway cannot cap it.")
    include = body.get("include") or []
    if not isinstance(include, list) or any(item not in _INCLUDES for item in include):
        raise unsupported("include", f"only {', '.join(sorted(_INCLUDES))} can be included.")
    boolean(body, "stream")
    chat: dict[str, Any] = {"messages": _messages(body)}
    if body.get("stream") is True:
        chat["stream"] = True
    tools = _tools(body)
    if tools is not None:
        chat["tools"] = tools
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    fmt = _text_format(body)
    if fmt is not None:
        chat["response_format"] = fmt
    if integer(body, "max_output_tokens", 1, 1 << 24) is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    for name, (low, high) in {"temperature": (0, 2), "top_p": (0, 1)}.items():
        if number(body, name, low, high) is not None:
            chat[name] = body[name]
    top = integer(body, "top_logprobs", 0, 20)
    if "message.output_text.logprobs" in include:
        chat["logprobs"] = True
        chat["top_logprobs"] = top or 0
    if boolean(body, "parallel_tool_calls") is not None:
        chat["parallel_tool_calls"] = body["parallel_tool_calls"]
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort") is not None:
        chat["reasoning_effort"] = reasoning["effort"]
    if body.get("truncation") == "auto":
        chat["truncate_sequence"] = True
    for name in ("top_k", "min_p", "repetition_penalty", "grammar", "stop"):  # mistral.rs extensions
        if name in body:
            chat[name] = body[name]
    return chat


# ------------------------------------------------------------------------------------------------- answer


def _usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return {
        "input_tokens": usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage["total_tokens"],
    }


def _logprobs(chat_logprobs: Any) -> list[dict[str, Any]]:
    """Chat's per-token logprobs as the Responses API's (the same fields, without the refusal list)."""
    if not isinstance(chat_logprobs, dict):
        return []
    return list(chat_logprobs.get("content") or [])


def _message_item(item_id: str, text: str, status: str, logprobs: list[dict[str, Any]] | None) -> dict[str, Any]:
    part: dict[str, Any] = {"type": "output_text", "text": text, "annotations": []}
    if logprobs is not None:
        part["logprobs"] = logprobs
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": [part]}


def _call_item(item_id: str, call: dict[str, Any], status: str) -> dict[str, Any]:
    function = call.get("function") or {}
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call.get("id") or item_id,
        "name": function.get("name", ""),
        "arguments": function.get("arguments", ""),
    }


@dataclass
class Skeleton:
    """What a Response object says besides its output: the request's settings, echoed as OpenAI does."""

    id: str
    model: str
    request: dict[str, Any]
    created_at: int = field(default_factory=lambda: int(time.time()))

    def response(
        self,
        status: str,
        output: list[dict[str, Any]],
        usage: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        req = self.request
        fmt = (req.get("text") or {}).get("format") if isinstance(req.get("text"), dict) else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "model": self.model,
            "status": status,
            "output": output,
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.get("instructions"),
            "max_output_tokens": req.get("max_output_tokens"),
            "metadata": req.get("metadata") or {},
            "parallel_tool_calls": req.get("parallel_tool_calls", True),
            "previous_response_id": None,
            "reasoning": {"effort": (req.get("reasoning") or {}).get("effort"), "summary": None},
            "store": False,
            "temperature": req.get("temperature"),
            "text": {"format": fmt or {"type": "text"}},
            "tool_choice": _echo_tool_choice(req.get("tool_choice")),
            "tools": [_echo_tool(t) for t in req.get("tools") or []],
            "top_p": req.get("top_p"),
            "truncation": req.get("truncation", "disabled"),
            "usage": usage,
            "user": req.get("user"),
        }


def _echo_tool(tool: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = tool["function"] if isinstance(tool.get("function"), dict) else tool
    return {
        "type": "function",
        "name": spec.get("name"),
        "description": spec.get("description"),
        "parameters": spec.get("parameters"),
        "strict": spec.get("strict", False),
    }


def _echo_tool_choice(choice: Any) -> Any:
    if choice is None:
        return "auto"
    if isinstance(choice, dict):
        return {"type": "function", "name": choice.get("name") or (choice.get("function") or {}).get("name")}
    return choice


def from_chat(answer: dict[str, Any], skeleton: Skeleton, *, logprobs: bool) -> dict[str, Any]:
    """The Response for a chat answer (one choice: the Responses API has no ``n``)."""
    choice = answer["choices"][0]
    message = choice["message"]
    output: list[dict[str, Any]] = []
    if message.get("content"):
        lp = _logprobs(choice.get("logprobs")) if logprobs else None
        output.append(_message_item(new_id("msg"), message["content"], "completed", lp))
    for call in message.get("tool_calls") or []:
        output.append(_call_item(new_id("fc"), call, "completed"))
    status = "incomplete" if choice.get("finish_reason") == "length" else "completed"
    return skeleton.response(status, output, _usage(answer.get("usage")))


# -------------------------------------------------------------------------------------------------- stream


class EventWriter:
    """Chat chunks in, Responses stream events out (each as SSE bytes, ``event:`` line included)."""

    def __init__(self, skeleton: Skeleton, *, logprobs: bool) -> None:
        self._skeleton = skeleton
        self._logprobs = logprobs
        self._sequence = 0
        self._output: list[dict[str, Any]] = []  # finished items
        self._message: dict[str, Any] | None = None  # the message item being written
        self._text: list[str] = []
        self._tokens: list[dict[str, Any]] = []
        self._calls: dict[int, dict[str, Any]] = {}  # tool-call index -> item being written
        self._finish: str | None = None

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()

    def start(self) -> list[bytes]:
        response = self._skeleton.response("in_progress", [])
        return [
            self._event("response.created", response=response),
            self._event("response.in_progress", response=response),
        ]

    def chunk(self, chunk: dict[str, Any]) -> list[bytes]:
        out: list[bytes] = []
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if text:
                out += self._text_delta(text, choice.get("logprobs"))
            for call in delta.get("tool_calls") or []:
                out += self._call_delta(call)
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
        return out

    def _text_delta(self, text: str, logprobs: Any) -> list[bytes]:
        out = []
        if self._message is None:
            self._message = _message_item(new_id("msg"), "", "in_progress", [] if self._logprobs else None)
            self._message["content"] = []
            out.append(self._event("response.output_item.added", output_index=self._index(), item=self._message))
            part = {"type": "output_text", "text": "", "annotations": []}
            out.append(
                self._event(
                    "response.content_part.added",
                    item_id=self._message["id"],
                    output_index=self._index(),
                    content_index=0,
                    part=part,
                )
            )
        tokens = _logprobs(logprobs) if self._logprobs else []
        self._tokens += tokens
        self._text.append(text)
        out.append(
            self._event(
                "response.output_text.delta",
                item_id=self._message["id"],
                output_index=self._index(),
                content_index=0,
                delta=text,
                logprobs=tokens,
            )
        )
        return out

    def _index(self) -> int:
        """The output index of the item being written now."""
        return len(self._output)

    def _call_delta(self, call: dict[str, Any]) -> list[bytes]:
        out = self._close_message()
        index = call.get("index", 0)
        item = self._calls.get(index)
        function = call.get("function") or {}
        if item is None:
            item = _call_item(
                new_id("fc"), {"id": call.get("id"), "function": {"name": function.get("name", "")}}, "in_progress"
            )
            item["arguments"] = ""
            self._calls[index] = item
            out.append(self._event("response.output_item.added", output_index=self._call_index(index), item=item))
        piece = function.get("arguments") or ""
        if piece:
            item["arguments"] += piece
            out.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=self._call_index(index),
                    delta=piece,
                )
            )
        return out

    def _call_index(self, index: int) -> int:
        return len(self._output) + list(self._calls).index(index)

    def _close_message(self) -> list[bytes]:
        if self._message is None:
            return []
        text = "".join(self._text)
        item = _message_item(self._message["id"], text, "completed", self._tokens if self._logprobs else None)
        part = item["content"][0]
        index = self._index()
        out = [
            self._event(
                "response.output_text.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                text=text,
                logprobs=self._tokens if self._logprobs else [],
            ),
            self._event(
                "response.content_part.done", item_id=item["id"], output_index=index, content_index=0, part=part
            ),
            self._event("response.output_item.done", output_index=index, item=item),
        ]
        self._output.append(item)
        self._message, self._text, self._tokens = None, [], []
        return out

    def finish(self, usage: dict[str, Any] | None) -> list[bytes]:
        out = self._close_message()
        for item in self._calls.values():
            index = self._index()
            item["status"] = "completed"
            out.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    name=item["name"],
                    arguments=item["arguments"],
                )
            )
            out.append(self._event("response.output_item.done", output_index=index, item=item))
            self._output.append(item)
        self._calls = {}
        status = "incomplete" if self._finish == "length" else "completed"
        response = self._skeleton.response(status, self._output, _usage(usage))
        out.append(self._event(f"response.{status}", response=response))
        return out

    def failed(self, error: GatewayError) -> bytes:
        """The last event of a stream that failed after it began."""
        detail = {"code": "server_error" if error.status >= 500 else "invalid_prompt", "message": error.message}
        return self._event("response.failed", response=self._skeleton.response("failed", self._output, error=detail))


# ------------------------------------------------------------------------------------------------- serving


def check(body: dict[str, Any]) -> None:
    """The route's check: a request that translates, into a chat request that passes chat's checks."""
    checks.chat(to_chat(body))


class Dialect:
    """One Responses request being served: its chat request, and how chat answers and streams become its own
    (a :class:`~gateway.serving.calls.ChatWriter`)."""

    media_type = "text/event-stream"
    loading_comments = True

    def __init__(self, body: dict[str, Any], model: str) -> None:
        self.chat = to_chat(body)
        self._logprobs = "message.output_text.logprobs" in (body.get("include") or [])
        self._skeleton = Skeleton(new_id("resp"), model, body)
        self._writer = EventWriter(self._skeleton, logprobs=self._logprobs)

    def answer(self, chat_answer: dict[str, Any]) -> bytes:
        return json.dumps(from_chat(chat_answer, self._skeleton, logprobs=self._logprobs)).encode()

    async def stream(self, stream: Stream) -> AsyncIterator[bytes]:
        writer = self._writer
        try:
            for event in writer.start():
                yield event
            async for item in stream.events:
                data = item.json(self._skeleton.model)
                if data is not None:
                    for event in writer.chunk(data):
                        yield event
            for event in writer.finish(stream.usage()):
                yield event
        except GatewayError as exc:
            yield writer.failed(exc)

    def failed(self, error: GatewayError) -> bytes:
        return self._writer.failed(error)
